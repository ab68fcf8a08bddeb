//! fleetsim: many phoenix agents in one process, speaking the real wire format (gzip JSON
//! reports, per-boot seq numbers, agent token) to a collector. For bench/fleet-bench.sh.
//!
//!   fleetsim --url http://127.0.0.1:7070 --token T --instances 10000 --interval 10 \
//!            --points 40 --duration 60 [--threads 64] [--silence-at 20 --recycler-token R]
//!
//! Each instance reports once per interval, the fleet spread evenly over it. Every 5 s a line
//! of figures goes to stderr; at the end one JSON line with the totals goes to stdout. With
//! --rounds N every instance sends N reports as fast as the collector takes them, then it
//! exits (a warm-up: InfluxDB 1.x creates each new series slowly). With
//! --silence-at S the first instance stops reporting after S seconds, and the time from its
//! last acked report until GET /v1/phoenix lists it as marked is measured.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use phoenix_wire::{Identity, Point, Report, Value, VERSION};

struct Opts {
    url: String,
    token: String,
    instances: usize,
    interval: f64,
    points: usize,
    duration: f64,
    threads: usize,
    gzip: bool,
    silence_at: Option<f64>,
    recycler_token: Option<String>,
    prefix: String,
    group_size: usize,
    /// Stop after this many reports per instance, sent as fast as the collector takes them.
    rounds: Option<u64>,
}

fn usage() -> ! {
    eprintln!("usage: fleetsim --url URL --token T [--instances 10000] [--interval 10] [--points 40] [--duration 60] [--threads 64] [--no-gzip] [--silence-at S --recycler-token R] [--prefix i-f] [--group-size 100] [--rounds N]");
    std::process::exit(2)
}

fn opts() -> Opts {
    let mut o = Opts {
        url: String::new(),
        token: String::new(),
        instances: 10_000,
        interval: 10.0,
        points: 40,
        duration: 60.0,
        threads: 64,
        gzip: true,
        silence_at: None,
        recycler_token: None,
        prefix: "i-f".into(),
        group_size: 100,
        rounds: None,
    };
    let mut a = std::env::args().skip(1);
    while let Some(k) = a.next() {
        let mut v = || a.next().unwrap_or_else(|| usage());
        let num = |s: String| s.parse::<f64>().unwrap_or_else(|_| usage());
        match k.as_str() {
            "--url" => o.url = v(),
            "--token" => o.token = v(),
            "--instances" => o.instances = num(v()) as usize,
            "--interval" => o.interval = num(v()),
            "--points" => o.points = num(v()) as usize,
            "--duration" => o.duration = num(v()),
            "--threads" => o.threads = num(v()).max(1.0) as usize,
            "--no-gzip" => o.gzip = false,
            "--silence-at" => o.silence_at = Some(num(v())),
            "--recycler-token" => o.recycler_token = Some(v()),
            "--prefix" => o.prefix = v(),
            "--group-size" => o.group_size = num(v()).max(1.0) as usize,
            "--rounds" => o.rounds = Some(num(v()) as u64),
            _ => usage(),
        }
    }
    if o.url.is_empty() || o.token.is_empty() {
        usage();
    }
    o
}

/// A report shaped like the agent's: cpu total and per-CPU, mem, disk, net, diskio, system
/// and the agent's own point, cut or padded to `points`.
fn report(id: &str, group: &str, seq: u64, points: usize, interval_ms: u64) -> Report {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let jitter = (seq % 7) as f64;
    let mut metrics = Vec::with_capacity(points);
    let mk = |m: &str, tags: Vec<(&str, String)>, fields: Vec<(&str, Value)>| Point {
        m: m.into(),
        tags: tags.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        fields: fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        ts,
    };
    let cpu = |name: String| {
        mk(
            "cpu",
            vec![("cpu", name)],
            vec![
                ("usage_user", Value::Float(10.0 + jitter)),
                ("usage_system", Value::Float(3.5)),
                ("usage_idle", Value::Float(85.0 - jitter)),
                ("usage_iowait", Value::Float(0.5)),
                ("usage_steal", Value::Float(0.0)),
                ("usage_nice", Value::Float(0.0)),
                ("usage_irq", Value::Float(0.0)),
                ("usage_softirq", Value::Float(1.0)),
            ],
        )
    };
    metrics.push(cpu("cpu-total".into()));
    metrics.push(mk(
        "mem",
        vec![],
        vec![
            ("total", Value::Int(8 << 30)),
            ("available", Value::Int(5 << 30)),
            ("used", Value::Int(3 << 30)),
            ("free", Value::Int(4 << 30)),
            ("cached", Value::Int(1 << 30)),
            ("buffered", Value::Int(1 << 20)),
            ("used_percent", Value::Float(37.5)),
            ("available_percent", Value::Float(62.5)),
        ],
    ));
    metrics.push(mk(
        "system",
        vec![],
        vec![
            ("load1", Value::Float(0.3)),
            ("load5", Value::Float(0.2)),
            ("load15", Value::Float(0.1)),
            ("n_cpus", Value::Int(4)),
            ("uptime", Value::Int(86400 + seq as i64)),
        ],
    ));
    metrics.push(mk(
        "disk",
        vec![
            ("path", "/".into()),
            ("device", "nvme0n1p1".into()),
            ("fstype", "ext4".into()),
        ],
        vec![
            ("total", Value::Int(100 << 30)),
            ("free", Value::Int(60 << 30)),
            ("used", Value::Int(40 << 30)),
            ("used_percent", Value::Float(40.0)),
            ("inodes_total", Value::Int(6_000_000)),
            ("inodes_used", Value::Int(200_000)),
        ],
    ));
    let mut k = 0;
    while metrics.len() < points.saturating_sub(1) {
        match k % 3 {
            0 => metrics.push(cpu(format!("cpu{}", k / 3))),
            1 => metrics.push(mk(
                "net",
                vec![("interface", format!("eth{}", k / 3))],
                vec![
                    ("bytes_sent", Value::Int(1_000_000 * seq as i64)),
                    ("bytes_recv", Value::Int(2_000_000 * seq as i64)),
                    ("packets_sent", Value::Int(1000 * seq as i64)),
                    ("packets_recv", Value::Int(2000 * seq as i64)),
                    ("err_in", Value::Int(0)),
                    ("err_out", Value::Int(0)),
                    ("drop_in", Value::Int(0)),
                    ("drop_out", Value::Int(0)),
                ],
            )),
            _ => metrics.push(mk(
                "diskio",
                vec![("name", format!("nvme{}n1", k / 3))],
                vec![
                    ("reads", Value::Int(500 * seq as i64)),
                    ("writes", Value::Int(900 * seq as i64)),
                    ("read_bytes", Value::Int(4096 * 500 * seq as i64)),
                    ("write_bytes", Value::Int(4096 * 900 * seq as i64)),
                    ("io_time", Value::Int(10 * seq as i64)),
                ],
            )),
        }
        k += 1;
    }
    metrics.push(mk(
        "phoenix_agent",
        vec![("version", "sim".into())],
        vec![
            ("spool_bytes", Value::Int(0)),
            ("dropped_points", Value::Int(0)),
            ("rss_bytes", Value::Int(9 << 20)),
        ],
    ));
    metrics.truncate(points.max(1));
    Report {
        v: VERSION,
        agent: Identity {
            instance_id: id.into(),
            image_id: "img-sim".into(),
            group: Some(group.into()),
            hostname: format!("h-{id}"),
            boot_id: boot_id(),
            version: "fleetsim".into(),
            boot_time: 0,
        },
        seq,
        interval_ms,
        metrics,
        logs: vec![],
        drift: None,
        checks: vec![],
        drift_root: None,
        protected: None,
    }
}

#[derive(Default)]
struct Stats {
    ok: AtomicU64,
    unavailable: AtomicU64,
    errors: AtomicU64,
    lat_us: AtomicU64,
    late: AtomicU64,
    points: AtomicU64,
}

fn main() {
    let o = Arc::new(opts());
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    // Unix ms of the silenced instance's last acked report.
    let silenced_last_ok = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let interval = Duration::from_secs_f64(o.interval);
    let mut handles = Vec::new();
    for t in 0..o.threads {
        let (o, stats, stop, silenced_last_ok) = (
            o.clone(),
            stats.clone(),
            stop.clone(),
            silenced_last_ok.clone(),
        );
        handles.push(std::thread::spawn(move || {
            let cfg = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(30)))
                .http_status_as_error(false)
                .build();
            let http = ureq::Agent::new_with_config(cfg);
            let url = format!("{}/v1/reports", o.url);
            let auth = format!("Bearer {}", o.token);
            let mine: Vec<usize> = (t..o.instances).step_by(o.threads).collect();
            let mut seq = vec![0u64; mine.len()];
            let ids: Vec<String> = mine
                .iter()
                .map(|k| format!("{}-{k:06}", o.prefix))
                .collect();
            let groups: Vec<String> = mine
                .iter()
                .map(|k| format!("g{:04}", k / o.group_size))
                .collect();
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for (j, &k) in mine.iter().enumerate() {
                    // Instance k reports at k/N of each interval.
                    let due = interval.mul_f64(round as f64 + k as f64 / o.instances as f64);
                    let now = start.elapsed();
                    if o.rounds.is_some() {
                        // Warm-up: as fast as it goes.
                    } else if due > now {
                        std::thread::sleep(due - now);
                    } else if now - due > interval {
                        stats.late.fetch_add(1, Ordering::Relaxed);
                    }
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    if k == 0
                        && o.silence_at
                            .is_some_and(|s| start.elapsed().as_secs_f64() >= s)
                    {
                        continue;
                    }
                    seq[j] += 1;
                    let r = report(
                        &ids[j],
                        &groups[j],
                        seq[j],
                        o.points,
                        (o.interval * 1000.0) as u64,
                    );
                    let body = if o.gzip {
                        phoenix_wire::encode(&r)
                    } else {
                        serde_json::to_vec(&r).unwrap()
                    };
                    let t0 = Instant::now();
                    let mut req = http
                        .post(&url)
                        .header("Authorization", &auth)
                        .header("Content-Type", "application/json")
                        .header(
                            phoenix_e2e::trust::CREDENTIAL_HEADER,
                            &phoenix_e2e::trust::harness_credential(&ids[j]),
                        );
                    if o.gzip {
                        req = req.header("Content-Encoding", "gzip");
                    }
                    match req.send(&body[..]) {
                        Ok(mut resp) => {
                            resp.body_mut().read_to_vec().ok();
                            match resp.status().as_u16() {
                                200 => {
                                    stats.ok.fetch_add(1, Ordering::Relaxed);
                                    stats
                                        .points
                                        .fetch_add(r.metrics.len() as u64, Ordering::Relaxed);
                                    stats.lat_us.fetch_add(
                                        t0.elapsed().as_micros() as u64,
                                        Ordering::Relaxed,
                                    );
                                    if k == 0 {
                                        silenced_last_ok.store(now_ms(), Ordering::Relaxed);
                                    }
                                }
                                503 | 429 => {
                                    stats.unavailable.fetch_add(1, Ordering::Relaxed);
                                }
                                s => {
                                    if stats.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                                        eprintln!("fleetsim: HTTP {s}");
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            if stats.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("fleetsim: {e}");
                            }
                        }
                    }
                }
                round += 1;
                if o.rounds.is_some_and(|n| round >= n) {
                    return;
                }
            }
        }));
    }
    // Figures every 5 s; the time to mark when an instance was silenced.
    let mut prev = (0u64, 0u64, Instant::now());
    let mut marked_after_ms: Option<u64> = None;
    let recycler = o.recycler_token.clone();
    let silenced_id = format!("{}-{:06}", o.prefix, 0);
    let mut next_print = Duration::from_secs(5);
    while start.elapsed().as_secs_f64() < o.duration
        && !(o.rounds.is_some() && handles.iter().all(|h| h.is_finished()))
    {
        std::thread::sleep(Duration::from_millis(250));
        if let (Some(_), Some(tok), None) = (o.silence_at, &recycler, marked_after_ms) {
            let last = silenced_last_ok.load(Ordering::Relaxed);
            if last > 0
                && o.silence_at
                    .is_some_and(|s| start.elapsed().as_secs_f64() > s)
                && is_marked(&o.url, tok, &silenced_id)
            {
                let ms = now_ms().saturating_sub(last);
                eprintln!(
                    "fleetsim: {silenced_id} marked {:.1}s after its last report",
                    ms as f64 / 1000.0
                );
                marked_after_ms = Some(ms);
            }
        }
        if start.elapsed() >= next_print {
            next_print += Duration::from_secs(5);
            let ok = stats.ok.load(Ordering::Relaxed);
            let lat = stats.lat_us.load(Ordering::Relaxed);
            let dt = prev.2.elapsed().as_secs_f64();
            let n = ok - prev.0;
            eprintln!(
                "fleetsim: t={:.0}s {:.0} reports/s ({:.0} points/s), mean latency {:.1} ms, 503/429 {}, errors {}, late {}",
                start.elapsed().as_secs_f64(),
                n as f64 / dt,
                n as f64 * o.points as f64 / dt,
                if n > 0 { (lat - prev.1) as f64 / n as f64 / 1000.0 } else { 0.0 },
                stats.unavailable.load(Ordering::Relaxed),
                stats.errors.load(Ordering::Relaxed),
                stats.late.load(Ordering::Relaxed)
            );
            prev = (ok, lat, Instant::now());
        }
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    for h in handles {
        h.join().ok();
    }
    let ok = stats.ok.load(Ordering::Relaxed);
    let out = serde_json::json!({
        "instances": o.instances,
        "interval_s": o.interval,
        "points_per_report": o.points,
        "wanted_reports_per_s": o.instances as f64 / o.interval,
        "seconds": elapsed,
        "reports_ok": ok,
        "reports_per_s": ok as f64 / elapsed,
        "points_per_s": stats.points.load(Ordering::Relaxed) as f64 / elapsed,
        "mean_latency_ms": if ok > 0 { stats.lat_us.load(Ordering::Relaxed) as f64 / ok as f64 / 1000.0 } else { 0.0 },
        "unavailable": stats.unavailable.load(Ordering::Relaxed),
        "errors": stats.errors.load(Ordering::Relaxed),
        "late": stats.late.load(Ordering::Relaxed),
        "silent_to_mark_s": marked_after_ms.map(|m| m as f64 / 1000.0),
    });
    println!("{out}");
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn is_marked(url: &str, token: &str, id: &str) -> bool {
    let Ok(mut r) = ureq::get(&format!("{url}/v1/phoenix"))
        .header("Authorization", &format!("Bearer {token}"))
        .call()
    else {
        return false;
    };
    let Ok(v) = r.body_mut().read_json::<serde_json::Value>() else {
        return false;
    };
    v["marked"]
        .as_array()
        .is_some_and(|m| m.iter().any(|e| e["instance_id"] == id))
}

/// One boot id per fleetsim run: each run starts its seqs at 1, which the collector would
/// otherwise drop as duplicates of an earlier run's.
fn boot_id() -> String {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| format!("sim-{}", now_ms())).clone()
}
