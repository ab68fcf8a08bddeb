//! The collector's self-observability: `GET /metrics` read by a real Prometheus text-format
//! parser, the same figures in InfluxDB as `phoenix_collector`, and one JSON object per log
//! line from both programs with `--log-format json`.

use phoenix_wire::Map;
use std::time::Duration;

use phoenix_e2e::*;
use phoenix_wire::{Identity, Point, Report, Value, VERSION};
use prometheus_parse::{LineInfo, Scrape, Value as PValue};

fn report(instance: &str, seq: u64) -> Report {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    Report {
        v: VERSION,
        agent: Identity {
            instance_id: instance.into(),
            image_id: "img-m".into(),
            group: Some("gm".into()),
            hostname: "h".into(),
            boot_id: "b1".into(),
            version: "t".into(),
            boot_time: 0,
        },
        seq,
        interval_ms: 1000,
        metrics: vec![Point {
            m: "app".into(),
            tags: Map::new(),
            fields: Map::from([("v".to_string(), Value::Int(seq as i64))]),
            ts,
        }],
        logs: vec![],
        drift: None,
        checks: vec![],
        drift_root: None,
        protected: None,
    }
}

/// Parse `/metrics` strictly: every line must be a HELP, a TYPE or a sample the parser
/// recognises with a number for a value, and every sample's family must have HELP and TYPE.
fn scrape(c: &Collector) -> (Scrape, String) {
    let r = c.get("/metrics", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{:?}",
        r.header("content-type")
    );
    let mut helped = std::collections::HashSet::new();
    let mut typed = std::collections::HashMap::new();
    for line in r.body.lines() {
        match LineInfo::parse(line) {
            LineInfo::Doc { metric_name, .. } => {
                helped.insert(metric_name.to_string());
            }
            LineInfo::Type {
                metric_name,
                metric_alias,
                sample_type,
            } => {
                typed.insert(metric_alias.unwrap_or(metric_name), sample_type);
            }
            LineInfo::Sample {
                metric_name, value, ..
            } => {
                assert!(value.parse::<f64>().is_ok(), "not a number: {line}");
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| {
                        metric_name
                            .strip_suffix(s)
                            .filter(|f| typed.contains_key(*f))
                    })
                    .unwrap_or(metric_name);
                assert!(
                    helped.contains(family) && typed.contains_key(family),
                    "sample without HELP/TYPE before it: {line}"
                );
                if family.ends_with("_total") {
                    assert_eq!(
                        typed[family],
                        prometheus_parse::SampleType::Counter,
                        "{line}"
                    );
                }
            }
            LineInfo::Empty => {}
            LineInfo::Ignored => panic!("line the Prometheus parser does not understand: {line:?}"),
        }
    }
    let s = Scrape::parse(r.body.lines().map(|l| Ok(l.to_owned()))).unwrap();
    (s, r.body)
}

fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = s
        .samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)));
    match found.map(|x| &x.value) {
        Some(PValue::Counter(v)) | Some(PValue::Gauge(v)) | Some(PValue::Untyped(v)) => *v,
        other => panic!(
            "{name}{labels:?}: {other:?}; samples of that name: {:?}",
            s.samples
                .iter()
                .filter(|x| x.metric == name)
                .collect::<Vec<_>>()
        ),
    }
}

#[test]
fn metrics_endpoint_counts_every_outcome_and_parses_as_prometheus_text() {
    let mut influx = Influx::start();
    let c = Collector::start(&["--influx-url", &influx.url(), "--influx-db", "selfm"]);
    let _a = Agent::start(&c.url(), "i-metrics-1", &["--group", "gm"]);
    assert!(
        wait_for(Duration::from_secs(30), || (c
            .get("/v1/instances/i-metrics-1", Some(READER_TOKEN))
            .status
            == 200)
            .then_some(()))
        .is_some(),
        "{}",
        c.log_text()
    );

    // One of every outcome, sent by hand.
    assert_eq!(c.post_report(&report("i-hand-1", 1)).status, 200);
    let dup = c.post_report(&report("i-hand-1", 1));
    assert_eq!(dup.status, 200);
    assert_eq!(dup.json()["duplicate"], true);
    let gz = phoenix_wire::encode(&report("i-hand-1", 2));
    assert_eq!(c.post_raw(&gz, None, true).status, 401);
    assert_eq!(c.post_raw(&gz, Some(READER_TOKEN), true).status, 403);
    assert_eq!(
        c.post_raw(b"{not json", Some(AGENT_TOKEN), false).status,
        400
    );
    let url = format!("{}/v1/reports", c.url());
    assert_eq!(
        post(&url, Some(AGENT_TOKEN), &[("Content-Encoding", "br")], b"x").status,
        415
    );
    assert_eq!(
        c.post_raw(&vec![b' '; 9 << 20], Some(AGENT_TOKEN), false)
            .status,
        413
    );

    // The queue's budget per group is figured on its next pass (every second).
    let passed = wait_for(Duration::from_secs(5), || {
        c.get("/metrics", None)
            .body
            .contains("phoenix_collector_budget_allowed{group=\"gm\"}")
            .then_some(())
    });
    assert!(
        passed.is_some(),
        "no queue pass within 5 s:\n{}",
        c.get("/metrics", None).body
    );
    let (s, text) = scrape(&c);
    assert!(
        value(&s, "phoenix_collector_reports_accepted_total", &[]) >= 2.0,
        "the agent's reports and the hand-made one:\n{text}"
    );
    for (reason, code, n) in [
        ("duplicate", "200", 1.0),
        ("unauthorized", "401", 1.0),
        ("forbidden", "403", 1.0),
        ("bad_request", "400", 1.0),
        ("unsupported_media", "415", 1.0),
        ("too_large", "413", 1.0),
        ("rate_limited", "429", 0.0),
        ("unavailable", "503", 0.0),
    ] {
        assert_eq!(
            value(
                &s,
                "phoenix_collector_reports_rejected_total",
                &[("reason", reason), ("code", code)]
            ),
            n,
            "{reason}:\n{text}"
        );
    }
    assert!(value(&s, "phoenix_collector_points_written_total", &[]) > 0.0);
    assert!(value(&s, "phoenix_collector_store_writes_total", &[]) > 0.0);
    assert_eq!(
        value(&s, "phoenix_collector_store_write_errors_total", &[]),
        0.0
    );
    assert_eq!(value(&s, "phoenix_collector_store_up", &[]), 1.0);
    assert_eq!(value(&s, "phoenix_collector_write_queue_depth", &[]), 0.0);
    assert_eq!(value(&s, "phoenix_collector_write_queue_bytes", &[]), 0.0);
    let known: f64 = [
        "new",
        "healthy",
        "suspect",
        "unhealthy",
        "drifted",
        "marked",
        "acked",
        "gone",
    ]
    .iter()
    .map(|st| value(&s, "phoenix_collector_instances", &[("state", st)]))
    .sum();
    assert_eq!(known, 2.0, "i-metrics-1 and i-hand-1, each in one state");
    assert_eq!(
        value(&s, "phoenix_collector_marks", &[("reason", "drift")]),
        0.0
    );
    assert_eq!(
        value(&s, "phoenix_collector_budget_allowed", &[("group", "gm")]),
        1.0,
        "{text}"
    );
    // The histogram: cumulative buckets ending in +Inf, which equals the count.
    let h = s
        .samples
        .iter()
        .find(|x| x.metric == "phoenix_collector_store_write_duration_seconds")
        .expect("latency histogram");
    let PValue::Histogram(buckets) = &h.value else {
        panic!("{:?}", h.value)
    };
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].less_than < w[1].less_than && w[0].count <= w[1].count),
        "{buckets:?}"
    );
    assert!(buckets.last().unwrap().less_than.is_infinite());
    let count = value(
        &s,
        "phoenix_collector_store_write_duration_seconds_count",
        &[],
    );
    assert_eq!(buckets.last().unwrap().count, count);
    assert!(
        count > 0.0
            && value(
                &s,
                "phoenix_collector_store_write_duration_seconds_sum",
                &[]
            ) > 0.0
    );

    // The same figures land in InfluxDB every 10 s.
    let row = wait_for(Duration::from_secs(25), || {
        influx
            .rows(
                "selfm",
                "SELECT * FROM phoenix_collector ORDER BY time DESC LIMIT 1",
            )
            .into_iter()
            .next()
    });
    let row = row.unwrap_or_else(|| panic!("no phoenix_collector point; log:\n{}", c.log_text()));
    assert!(row["reports_accepted"].as_u64().unwrap() >= 2, "{row:?}");
    assert_eq!(row["reports_rejected_duplicate"], 1);
    assert_eq!(row["reports_rejected_too_large"], 1);
    assert_eq!(row["store_up"], true);
    assert!(row["points_written"].as_u64().unwrap() > 0);
    assert!(
        row["store_write_ms_mean"].as_f64().unwrap() > 0.0,
        "{row:?}"
    );
    assert_eq!(
        row["host"],
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap()
            .trim()
    );

    // The store goes away: reports get 503, and the figures say so.
    influx.down();
    let mut seq = 10;
    let got_503 = wait_for(Duration::from_secs(20), || {
        seq += 1;
        (c.post_report(&report("i-hand-1", seq)).status == 503).then_some(())
    });
    assert!(got_503.is_some());
    let (s, text) = scrape(&c);
    assert!(
        value(
            &s,
            "phoenix_collector_reports_rejected_total",
            &[("reason", "unavailable"), ("code", "503")]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        value(&s, "phoenix_collector_store_write_errors_total", &[]) >= 1.0,
        "{text}"
    );
    assert_eq!(value(&s, "phoenix_collector_store_up", &[]), 0.0, "{text}");
}

/// Every non-empty line of a log is one JSON object with a timestamp, a level and a message.
fn json_lines(log: &str, who: &str) -> Vec<serde_json::Value> {
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{who}: not one JSON object per line ({e}): {l:?}"));
            assert!(v.is_object(), "{who}: {l}");
            assert!(
                v["timestamp"].is_string()
                    && v["level"].is_string()
                    && v["fields"]["message"].is_string(),
                "{who}: missing timestamp/level/message: {l}"
            );
            v
        })
        .collect();
    assert!(!lines.is_empty(), "{who} logged nothing");
    lines
}

#[test]
fn both_programs_log_one_json_object_per_line() {
    let mut c = Collector::start(&["--log-format", "json"]);
    let mut a = Agent::start(&c.url(), "i-json-1", &["--log-format", "json"]);
    assert!(
        wait_for(Duration::from_secs(30), || (c
            .get("/v1/instances/i-json-1", Some(READER_TOKEN))
            .status
            == 200)
            .then_some(()))
        .is_some(),
        "{}",
        c.log_text()
    );
    // A rejected report makes the collector log a warning with structured fields.
    assert_eq!(c.post_raw(b"junk", Some(READER_TOKEN), false).status, 403);
    // Read the logs once both have stopped, so no line is caught half-written.
    let (agent_path, collector_path) = (
        a.proc.as_ref().unwrap().log.clone(),
        c.proc.as_ref().unwrap().log.clone(),
    );
    a.stop();
    c.down();
    let agent_log = std::fs::read_to_string(agent_path).unwrap();
    let collector_log = std::fs::read_to_string(collector_path).unwrap();
    let collector = json_lines(&collector_log, "collector");
    assert!(
        collector
            .iter()
            .any(|v| v["fields"]["message"] == "phoenix-collector ready"
                && v["fields"]["listen"].is_string()),
        "{collector_log}"
    );
    assert!(
        collector
            .iter()
            .any(|v| v["fields"]["message"] == "stopping"),
        "{collector_log}"
    );
    let agent = json_lines(&agent_log, "agent");
    assert!(agent.iter().any(|v| v["level"] == "INFO"), "{agent_log}");
    // Text is the default: no JSON.
    let plain = Collector::start(&[]);
    assert!(
        plain
            .log_text()
            .lines()
            .any(|l| l.contains("phoenix-collector ready") && !l.starts_with('{')),
        "{}",
        plain.log_text()
    );
}

fn meminfo_bytes(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// Telegraf's swap, kernel, netstat, processes and procstat reach InfluxDB with its field
/// names and values that agree with /proc, as cpu and mem do in the spine test.
#[test]
fn swap_kernel_netstat_processes_and_procstat_agree_with_proc() {
    let influx = Influx::start();
    let db = "mtel";
    let c = Collector::start(&["--influx-url", &influx.url(), "--influx-db", db]);
    let id = "i-metrics-tel";
    // A listener held for the whole test: netstat must count at least it.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = Agent::start(&c.url(), id, &["--top-processes", "3"]);
    let q = |q: &str| influx.rows(db, q);
    let seen = wait_for(Duration::from_secs(40), || {
        ["swap", "kernel", "netstat", "processes", "procstat"]
            .iter()
            .all(|m| {
                !q(&format!(
                    "SELECT * FROM \"{m}\" WHERE instance_id = '{id}' LIMIT 1"
                ))
                .is_empty()
            })
            .then_some(())
    });
    assert!(
        seen.is_some(),
        "measurements missing; agent:\n{}",
        a.log_text()
    );

    let swap = q("SELECT last(total) AS total, last(used) AS used, last(free) AS free, last(used_percent) AS up, last(\"in\") AS si, last(\"out\") AS so FROM swap");
    let s = &swap[0];
    assert_eq!(
        s["total"].as_u64(),
        Some(meminfo_bytes("SwapTotal:")),
        "{s:?}"
    );
    let (total, used, free) = (
        s["total"].as_u64().unwrap(),
        s["used"].as_u64().unwrap(),
        s["free"].as_u64().unwrap(),
    );
    assert_eq!(used + free, total, "{s:?}");
    let up = s["up"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&up), "{s:?}");
    assert!(
        s["si"].as_u64().is_some() && s["so"].as_u64().is_some(),
        "{s:?}"
    );

    let k = &q("SELECT last(boot_time) AS bt, last(context_switches) AS cs, last(interrupts) AS intr, last(processes_forked) AS pf, last(entropy_avail) AS ea FROM kernel")[0];
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let btime: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(k["bt"].as_u64(), Some(btime), "{k:?}");
    let ctxt_now: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("ctxt "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let cs = k["cs"].as_u64().unwrap();
    assert!(
        cs > 0 && cs <= ctxt_now,
        "context_switches {cs}, /proc/stat now {ctxt_now}"
    );
    assert!(
        k["intr"].as_u64().unwrap() > 0 && k["pf"].as_u64().unwrap() > 0,
        "{k:?}"
    );

    let n = &q(&format!(
        "SELECT last(tcp_listen) AS l, last(tcp_established) AS e, last(udp_socket) AS u FROM netstat WHERE instance_id = '{id}'"
    ))[0];
    assert!(n["l"].as_u64().unwrap() >= 1, "the held listener: {n:?}");
    assert!(
        n["e"].as_u64().is_some() && n["u"].as_u64().is_some(),
        "{n:?}"
    );

    let p = &q("SELECT last(total) AS t, last(running) AS r, last(sleeping) AS s, last(zombies) AS z, last(total_threads) AS th FROM processes")[0];
    let t = p["t"].as_u64().unwrap();
    // Per process, as Telegraf counts: a process's state is its main thread's, so the agent
    // itself may read as sleeping while another of its threads counts; every state is a part
    // of the total.
    let part = |k: &str| p[k].as_u64().unwrap();
    assert!(t >= 1, "{p:?}");
    assert!(
        part("r") + part("s") + part("z") <= t,
        "states are parts of the total: {p:?}"
    );
    assert!(p["th"].as_u64().unwrap() >= t, "{p:?}");

    // procstat: the agent itself, its RSS close to what /proc says of it now.
    let pid = a.proc.as_ref().unwrap().pid();
    let me = wait_for(Duration::from_secs(20), || {
        q(&format!("SELECT last(memory_rss) AS rss, last(cpu_usage) AS cpu, last(num_threads) AS th FROM procstat WHERE process_name = 'phoenix-agent' AND instance_id = '{id}' AND pid = {pid} AND cpu_usage >= 0"))
            .into_iter()
            .next()
    })
    .unwrap_or_else(|| panic!("no procstat for the agent: {:?}", q("SELECT * FROM procstat LIMIT 10")));
    let rss = me["rss"].as_u64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let vm_rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap()
        * 1024;
    assert!(
        rss > vm_rss / 4 && rss < vm_rss * 4,
        "procstat memory_rss {rss}, VmRSS now {vm_rss}"
    );
    let cpu = me["cpu"].as_f64().unwrap();
    let ncpu = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .count();
    assert!(
        (0.0..=100.0 * ncpu as f64).contains(&cpu),
        "cpu_usage {cpu}"
    );
    drop(held);
}
