//! The spine: real agent → real collector → real influxd, and the collector's answers to
//! every kind of good and bad report.

use phoenix_wire::Map;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use phoenix_e2e::*;
use phoenix_wire::{Identity, Point, Report, Value, VERSION};

fn report(instance: &str, seq: u64, points: Vec<Point>) -> Report {
    Report {
        v: VERSION,
        agent: Identity {
            instance_id: instance.into(),
            image_id: "img-wire".into(),
            group: Some("g1".into()),
            hostname: "h1".into(),
            boot_id: "boot-1".into(),
            version: "test".into(),
            boot_time: 0,
        },
        seq,
        interval_ms: 1000,
        metrics: points,
        logs: vec![],
        drift: None,
        checks: vec![],
        drift_root: None,
        protected: None,
    }
}

fn pt(m: &str, field: &str, v: Value, ts: i64) -> Point {
    Point {
        m: m.into(),
        tags: Map::new(),
        fields: Map::from([(field.to_string(), v)]),
        ts,
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

fn meminfo_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn agent_metrics_arrive_in_influxdb_with_telegraf_names_and_identity_tags() {
    let influx = Influx::start();
    let c = Collector::start(&["--influx-url", &influx.url(), "--influx-db", "phoenix"]);
    let _a = Agent::start(
        &c.url(),
        "i-spine-1",
        &["--group", "web", "--image-id", "ami-spine"],
    );
    let db = "phoenix";
    let want = ["cpu", "mem", "disk", "diskio", "system", "phoenix_agent"];
    let seen = wait_for(Duration::from_secs(30), || {
        let res = influx.query(db, "SHOW MEASUREMENTS");
        let names: Vec<String> = res["series"][0]["values"]
            .as_array()?
            .iter()
            .map(|v| v[0].as_str().unwrap().to_string())
            .collect();
        want.iter()
            .all(|w| names.iter().any(|n| n == w))
            .then_some(names)
    });
    assert!(
        seen.is_some(),
        "measurements missing; collector log:\n{}",
        c.log_text()
    );

    let cpu = influx.rows(db, "SELECT usage_idle, usage_user, host, instance_id, image_id, \"group\" FROM cpu WHERE cpu = 'cpu-total'");
    assert!(!cpu.is_empty());
    for r in &cpu {
        let idle = r["usage_idle"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&idle), "usage_idle {idle}");
        assert_eq!(r["instance_id"], "i-spine-1");
        assert_eq!(r["image_id"], "ami-spine");
        assert_eq!(r["group"], "web");
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(r["host"], host.trim());
    }
    let ncpu = std::fs::read_to_string("/proc/stat")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .count();
    // A CPU's first point waits until it has moved enough ticks since the start-up
    // baseline (no spike), so an idle CPU's series may come an interval or two later.
    let per_cpu = wait_for(Duration::from_secs(15), || {
        let rows = influx.rows(
            db,
            "SELECT count(usage_idle) FROM cpu WHERE cpu != 'cpu-total' GROUP BY cpu",
        );
        (rows.len() == ncpu).then_some(rows)
    });
    assert!(per_cpu.is_some(), "one series per CPU ({ncpu})");

    // Cross-check against /proc.
    let mem = influx.rows(
        db,
        "SELECT last(total) AS total, last(used_percent) AS up, last(available) AS avail FROM mem",
    );
    assert_eq!(
        mem[0]["total"].as_u64().unwrap(),
        meminfo_kb("MemTotal:") * 1024
    );
    let up = mem[0]["up"].as_f64().unwrap();
    assert!(up > 0.0 && up < 100.0, "used_percent {up}");
    let sys = influx.rows(
        db,
        "SELECT last(n_cpus) AS n, last(uptime) AS up, last(load1) AS l FROM system",
    );
    assert_eq!(sys[0]["n"].as_u64().unwrap() as usize, ncpu);
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((sys[0]["up"].as_f64().unwrap() - uptime).abs() < 60.0);

    // The root filesystem is there with its size as statvfs gives it; no tmpfs.
    let disks = influx.rows(
        db,
        "SELECT last(total) AS total FROM disk GROUP BY path, fstype",
    );
    assert!(disks.iter().any(|d| d["path"] == "/"), "{disks:?}");
    assert!(disks
        .iter()
        .all(|d| d["fstype"] != "tmpfs" && d["fstype"] != "proc"));
    let diskio = influx.rows(db, "SELECT last(reads) FROM diskio GROUP BY \"name\"");
    assert!(!diskio.is_empty());

    // net: every non-loopback interface in /proc/net/dev.
    let ifaces: Vec<String> = std::fs::read_to_string("/proc/net/dev")
        .unwrap()
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(|s| s.trim().to_string())
        .filter(|s| s != "lo")
        .collect();
    if !ifaces.is_empty() {
        let net = wait_for(Duration::from_secs(5), || {
            let n = influx.rows(db, "SELECT last(bytes_recv) FROM net GROUP BY interface");
            (n.len() == ifaces.len()).then_some(n)
        });
        assert!(net.is_some(), "net series for {ifaces:?}");
    }

    // The fleet API knows the instance and its latest figures. The first CPU figure needs
    // two samples (no spike from a start-up baseline), so it may take one more interval.
    let inst = wait_for(Duration::from_secs(10), || {
        let list = c.get("/v1/instances", Some(READER_TOKEN)).json();
        list["instances"]
            .as_array()?
            .iter()
            .find(|i| i["instance_id"] == "i-spine-1" && i["cpu_used_percent"].as_f64().is_some())
            .cloned()
    })
    .expect("i-spine-1 in the fleet list with a CPU figure");
    assert_eq!(inst["image_id"], "ami-spine");
    assert!(inst["mem_used_percent"].as_f64().unwrap() > 0.0);
}

#[test]
fn bad_reports_get_clear_errors_and_good_ones_are_deduplicated() {
    let influx = Influx::start();
    let c = Collector::start(&[
        "--influx-url",
        &influx.url(),
        "--influx-db",
        "wire",
        "--max-body",
        "64KiB",
        "--max-report",
        "1MiB",
    ]);
    let r = report(
        "i-wire-1",
        1,
        vec![pt("wirecheck", "v", Value::Int(1), now_ns())],
    );
    let body = phoenix_wire::encode(&r);

    let no_token = c.post_raw(&body, None, true);
    assert_eq!(no_token.status, 401);
    assert!(no_token.json()["error"]
        .as_str()
        .unwrap()
        .contains("bearer token"));
    assert_eq!(c.post_raw(&body, Some("wrong"), true).status, 401);
    let wrong_role = c.post_raw(&body, Some(RECYCLER_TOKEN), true);
    assert_eq!(wrong_role.status, 403);
    assert!(!wrong_role.body.contains(RECYCLER_TOKEN), "token echoed");

    let bad_json = c.post_raw(
        &phoenix_wire::gzip(b"{\"v\":1,\"agent\":"),
        Some(AGENT_TOKEN),
        true,
    );
    assert_eq!(bad_json.status, 400);
    assert!(bad_json.json()["error"].as_str().unwrap().contains("JSON"));
    let v9 = c.post_raw(&phoenix_wire::gzip(b"{\"v\":9}"), Some(AGENT_TOKEN), true);
    assert_eq!(v9.status, 400);
    assert!(
        v9.json()["error"].as_str().unwrap().contains("version 9"),
        "{}",
        v9.body
    );
    let not_gzip = c.post_raw(b"{\"v\":1}", Some(AGENT_TOKEN), true);
    assert_eq!(not_gzip.status, 400);
    let big = vec![b'x'; 100 << 10];
    assert_eq!(c.post_raw(&big, Some(AGENT_TOKEN), false).status, 413);
    let bomb = phoenix_wire::gzip(&vec![b' '; 8 << 20]);
    assert!(bomb.len() < 64 << 10);
    let b = c.post_raw(&bomb, Some(AGENT_TOKEN), true);
    assert_eq!(b.status, 413, "{}", b.body);
    let mut evil = r.clone();
    evil.agent.instance_id = "i-1,host=x".into();
    let e = c.post_report(&evil);
    assert_eq!(e.status, 400);
    assert!(e.body.contains("instance_id"));

    // The good one, twice: one point in InfluxDB, the second answer says duplicate.
    let first = c.post_report(&r);
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.json()["accepted"], 1);
    assert_eq!(first.json()["duplicate"], false);
    let again = c.post_report(&r);
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["duplicate"], true);
    assert_eq!(influx.count("wire", "SELECT count(v) FROM wirecheck"), 1);
    // The collector kept serving throughout.
    assert_eq!(c.get("/healthz", None).status, 200);
}

#[test]
fn partial_writes_drop_only_the_bad_points_and_oversized_batches_are_split() {
    // A small max-body makes influxd answer 413 to the collector's bigger writes.
    let influx = Influx::start_with("  max-body-size = 4000");
    let c = Collector::start(&[
        "--influx-url",
        &influx.url(),
        "--influx-db",
        "policy",
        "--influx-gzip",
        "false",
    ]);
    let t = now_ns();
    // The collector fixes each field's type and would refuse a string where a report sent a
    // float (schema.rs), so the float goes into InfluxDB directly, behind its back.
    let direct = format!("{}/write?db=policy", influx.url());
    let line = format!("conflict v=1.5 {t}");
    wait_for(Duration::from_secs(20), || {
        (post(&direct, None, &[], line.as_bytes()).status == 204).then_some(())
    })
    .expect("the collector creates its database");
    // The field as a string now: InfluxDB refuses that point (type conflict), keeps the rest.
    let mixed = vec![
        pt("conflict", "v", Value::Str("high".into()), t + 1),
        pt("fine", "v", Value::Int(7), t + 2),
    ];
    let resp = c.post_report(&report("i-pol", 2, mixed));
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(resp.json()["rejected_points"], 1, "{}", resp.body);
    assert_eq!(influx.count("policy", "SELECT count(v) FROM fine"), 1);
    assert_eq!(influx.count("policy", "SELECT count(v) FROM conflict"), 1);
    // 200 points of ~150 bytes: far over 4000 bytes, so the collector must split to succeed.
    let many: Vec<Point> = (0..200)
        .map(|i| Point {
            m: "split".into(),
            tags: Map::from([("k".to_string(), format!("series-{i:03}-{}", "p".repeat(40)))]),
            fields: Map::from([("v".to_string(), Value::Int(i))]),
            ts: t + i,
        })
        .collect();
    let resp = c.post_report(&report("i-pol", 3, many));
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(influx.count("policy", "SELECT count(v) FROM split"), 200);
}

/// InfluxDB 1.6 has no /api/v2/write. This small proxy checks each v2 request's shape (path,
/// org, bucket, precision, `Authorization: Token`, gzip) and passes the body on to the real
/// influxd's /write, so the points still land in a real InfluxDB.
fn v2_proxy(influx_url: String, db: &'static str) -> (u16, std::sync::mpsc::Receiver<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            let mut buf = Vec::new();
            let mut tmp = [0u8; 65536];
            let (head, body) = loop {
                let n = s.read(&mut tmp).unwrap_or(0);
                if n == 0 {
                    break (String::new(), Vec::new());
                }
                buf.extend_from_slice(&tmp[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..i]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    let mut body = buf[i + 4..].to_vec();
                    while body.len() < len {
                        let n = s.read(&mut tmp).unwrap();
                        body.extend_from_slice(&tmp[..n]);
                    }
                    break (head, body);
                }
            };
            if head.is_empty() {
                continue;
            }
            tx.send(head.clone()).ok();
            let first = head.lines().next().unwrap_or_default().to_string();
            let gz = head.to_ascii_lowercase().contains("content-encoding: gzip");
            let r = if first.starts_with("POST /api/v2/write?") {
                let mut h = vec![];
                if gz {
                    h.push(("Content-Encoding", "gzip"));
                }
                post(
                    &format!("{influx_url}/write?db={db}&precision=ns"),
                    None,
                    &h,
                    &body,
                )
            } else {
                Resp {
                    status: 404,
                    headers: vec![],
                    body: "not found".into(),
                }
            };
            let out = format!(
                "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                r.status,
                r.body.len(),
                r.body
            );
            s.write_all(out.as_bytes()).ok();
        }
    });
    (port, rx)
}

#[test]
fn v2_api_requests_have_the_v2_shape() {
    let influx = Influx::start();
    influx.create_db("v2db");
    let (port, heads) = v2_proxy(influx.url(), "v2db");
    let c = Collector::start(&[
        "--influx-url",
        &format!("http://127.0.0.1:{port}"),
        "--influx-org",
        "my org",
        "--influx-bucket",
        "fleet",
        "--influx-token",
        "s3cret",
    ]);
    let resp = c.post_report(&report(
        "i-v2",
        1,
        vec![pt("v2check", "v", Value::Int(42), now_ns())],
    ));
    assert_eq!(resp.status, 200, "{}\n{}", resp.body, c.log_text());
    // The start-up check may look the bucket up first (GET /api/v2/buckets); the write
    // is the first POST.
    let head = loop {
        let h = heads.recv_timeout(Duration::from_secs(5)).unwrap();
        if h.starts_with("POST ") {
            break h;
        }
    };
    let first = head.lines().next().unwrap();
    assert!(
        first.starts_with("POST /api/v2/write?org=my%20org&bucket=fleet&precision=ns "),
        "{first}"
    );
    assert!(
        head.contains("Authorization: Token s3cret")
            || head.contains("authorization: Token s3cret"),
        "{head}"
    );
    assert!(head.to_ascii_lowercase().contains("content-encoding: gzip"));
    assert_eq!(influx.count("v2db", "SELECT count(v) FROM v2check"), 1);
}

#[test]
fn influxdb_down_means_503_then_nothing_lost() {
    let mut influx = Influx::start();
    let c = Collector::start(&["--influx-url", &influx.url(), "--influx-db", "outage"]);
    let mut a = Agent::start(&c.url(), "i-outage", &[]);
    let db = "outage";
    assert!(
        wait_for(Duration::from_secs(20), || (influx
            .count(db, "SELECT count(total) FROM mem")
            >= 2)
            .then_some(()))
        .is_some(),
        "no points before the outage:\n{}",
        c.log_text()
    );

    influx.down();
    let down_at = now_ns();
    // A report during the outage is refused with 503 + Retry-After, so its sender keeps it.
    let r = wait_for(Duration::from_secs(10), || {
        let r = c.post_report(&report(
            "i-direct",
            now_ns() as u64,
            vec![pt("direct", "v", Value::Int(1), now_ns())],
        ));
        (r.status == 503).then_some(r)
    })
    .expect("503 while InfluxDB is down");
    assert!(
        r.header("retry-after")
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|s| s >= 1),
        "{:?}",
        r.headers
    );
    std::thread::sleep(Duration::from_secs(4));
    let up_at = now_ns();
    influx.up();
    // Every interval sampled during the outage arrives once InfluxDB is back.
    let during = wait_for(Duration::from_secs(40), || {
        let n = influx.count(
            db,
            &format!("SELECT count(total) FROM mem WHERE time > {down_at} AND time < {up_at}"),
        );
        (n >= 3).then_some(n)
    });
    assert!(
        during.is_some(),
        "points sampled during the outage did not arrive\ncollector:\n{}\nagent:\n{}",
        c.log_text(),
        a.log_text()
    );
    // No interval twice: one mem point per timestamp (retries overwrite, never duplicate).
    let all = influx.rows(db, "SELECT total FROM mem");
    let mut ts: Vec<i64> = all.iter().map(|r| r["time"].as_i64().unwrap()).collect();
    let n = ts.len();
    ts.dedup();
    assert_eq!(ts.len(), n);
    a.stop();
}
