//! pgstore-bench: what the PostgreSQL fleet store costs the database, for docs/scaling.md
//! and bench/pgstore-bench.sh. A throw-away PostgreSQL (fsync on, pg_stat_statements) and C
//! collector-side stores in this process; a simulated fleet of N instances at an interval
//! of I seconds is fed for D simulated seconds: each second every store takes its share of
//! the reports (one in OBS_EVERY carries a check observation) and flushes once. It runs as
//! fast as PostgreSQL takes the flushes, so reports/s is what the store sustains.
//!
//!   pgstore-bench [--instances 100000] [--interval 10] [--seconds 30] [--collectors 2]
//!                 [--obs-every 10]
//!
//! Prints one JSON line: reports/s, flush latency (p50, max), PostgreSQL CPU per 1,000
//! reports, statements per report (pg_stat_statements), and the tables' sizes.

use std::sync::Arc;
use std::time::Instant;

use phoenix_collector::pgstore::batch::Seen;
use phoenix_collector::pgstore::{PgOptions, PgStore};
use phoenix_e2e::pg::{server_cpu_s, Postgres, PG_DB};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number"))
        })
        .unwrap_or(default)
}

fn main() {
    let instances = arg("--instances", 100_000) as usize;
    let interval = arg("--interval", 10).max(1) as usize;
    let seconds = arg("--seconds", 30) as usize;
    let collectors = arg("--collectors", 2).max(1) as usize;
    let obs_every = arg("--obs-every", 10).max(1) as usize;

    let pg = Postgres::start_with(&[
        "fsync = on",
        "shared_preload_libraries = 'pg_stat_statements'",
        "shared_buffers = 256MB",
    ]);
    pg.psql(PG_DB, "CREATE EXTENSION pg_stat_statements");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut stores: Vec<Arc<PgStore>> = Vec::new();
        for _ in 0..collectors {
            stores.push(
                PgStore::open(&pg.url(), PgOptions::default())
                    .await
                    .unwrap(),
            );
        }
        pg.psql(PG_DB, "SELECT pg_stat_statements_reset()");
        let cpu0 = server_cpu_s(&pg);
        let lsn0 = pg.scalar("SELECT pg_current_wal_lsn()");
        let t0 = Instant::now();
        let base_ms = phoenix_collector::pgstore::wall_ms();
        let per_second = instances / interval;
        let mut flush_ms: Vec<f64> = Vec::new();
        let mut reports = 0u64;
        for sec in 0..seconds {
            // The slice of the fleet that reports in this second, spread over the stores
            // (a load balancer with no stickiness).
            let start = (sec % interval) * per_second;
            for k in 0..per_second {
                let id = start + k;
                let seq = (sec / interval) as i64 + 1;
                let at = base_ms + (sec as i64) * 1000;
                let s = Seen {
                    instance_id: format!("i-{id:07}"),
                    group: format!("g{:03}", id % 100),
                    image_id: "img-bench".into(),
                    identity_json: format!(
                        r#"{{"instance_id":"i-{id:07}","host":"h{id}","boot_id":"b1"}}"#
                    ),
                    interval_ms: (interval * 1000) as i64,
                    at_ms: at,
                    figures_json: format!(
                        r#"{{"cpu":{:.1},"mem":41.5,"disk":63.0}}"#,
                        (id % 97) as f64
                    ),
                    boot_id: "b1".into(),
                    seq,
                };
                let obs = id
                    .is_multiple_of(obs_every)
                    .then(|| r#"{"checks":[{"name":"web","ok":true}]}"#.to_string());
                stores[(id + sec) % collectors].batch.seen(s, obs).unwrap();
                reports += 1;
            }
            for s in &stores {
                let t = Instant::now();
                s.flush().await.unwrap();
                flush_ms.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
        let wall = t0.elapsed().as_secs_f64();
        let cpu = server_cpu_s(&pg) - cpu0;
        let wal: f64 = pg
            .scalar(&format!(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{lsn0}')"
            ))
            .parse()
            .unwrap();
        let calls: f64 = pg
            .scalar(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s \
                 JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = 'phoenix' \
                 AND s.query NOT ILIKE '%pg_stat_statements%'",
            )
            .parse()
            .unwrap();
        let size = |t: &str| -> f64 {
            pg.scalar(&format!("SELECT pg_total_relation_size('{t}')"))
                .parse::<f64>()
                .unwrap()
                / 1e6
        };
        flush_ms.sort_by(|a, b| a.total_cmp(b));
        let p50 = flush_ms[flush_ms.len() / 2];
        let max = flush_ms.last().copied().unwrap_or(0.0);
        println!(
            "{}",
            serde_json::json!({
                "instances": instances,
                "interval_s": interval,
                "collectors": collectors,
                "simulated_s": seconds,
                "reports": reports,
                "wall_s": (wall * 100.0).round() / 100.0,
                "reports_per_s": (reports as f64 / wall).round(),
                "flush_ms_p50": (p50 * 10.0).round() / 10.0,
                "flush_ms_max": (max * 10.0).round() / 10.0,
                "pg_cpu_s": (cpu * 100.0).round() / 100.0,
                "pg_cpu_ms_per_1000_reports": (cpu * 1e6 / reports as f64).round() / 1.0,
                "statements": calls,
                "wal_bytes_per_report": (wal / reports as f64).round(),
                "statements_per_report": calls / reports as f64,
                "mb_instances": size("phoenix_instances"),
                "mb_seqs": size("phoenix_seqs"),
                "mb_observations": size("phoenix_observations"),
            })
        );
    });
}
