//! The log tailer on a hard-pressed box, end to end (real agent, collector and influxd):
//! more log files than the agent may hold open, and a log file under a path longer than any
//! tag value may be. Every line must still arrive once, and metrics must keep flowing.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use phoenix_e2e::*;

const DB: &str = "phoenix";

fn append(path: &Path, text: &str) {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
}

fn count(influx: &Influx, q: &str) -> u64 {
    influx.count(DB, q)
}

fn wait_first_checkpoint(a: &Agent) {
    let ck = a.state_dir.join("logs.acked.json");
    wait_for(Duration::from_secs(60), || ck.exists().then_some(())).unwrap_or_else(|| {
        panic!(
            "the agent wrote no first checkpoint; log:\n{}",
            a.log_text()
        )
    });
}

/// Wait until InfluxDB holds exactly `n` rows for `q` (a count query), failing on more.
fn wait_count(influx: &Influx, q: &str, n: u64, timeout: Duration, what: &dyn Fn() -> String) {
    let mut last = 0;
    let ok = wait_for(timeout, || {
        last = count(influx, q);
        assert!(
            last <= n,
            "{last} rows for {q}, only {n} written: duplicates"
        );
        (last == n).then_some(())
    });
    assert!(ok.is_some(), "only {last} of {n} rows for {q}\n{}", what());
}

/// Metrics of `id` keep arriving: the count of cpu points grows within `timeout`.
fn metrics_flow(influx: &Influx, id: &str, what: &dyn Fn() -> String) {
    let q = format!(
        "SELECT count(usage_idle) FROM cpu WHERE instance_id = '{id}' AND cpu = 'cpu-total'"
    );
    let before = count(influx, &q);
    let grew = wait_for(Duration::from_secs(30), || {
        (count(influx, &q) >= before + 2).then_some(())
    });
    assert!(
        grew.is_some(),
        "metrics stopped ({before} cpu points)\n{}",
        what()
    );
}

#[test]
fn fifteen_hundred_files_under_ulimit_1024_all_arrive_and_metrics_flow() {
    let influx = Influx::start();
    let c = Collector::start(&["--influx-url", &influx.url(), "--influx-db", DB]);
    let dir = tempfile::tempdir().unwrap();
    let n = 1500;
    let file = |i: usize| dir.path().join(format!("app-{i:04}.log"));
    for i in 0..n {
        fs::write(file(i), format!("history {i}\n")).unwrap();
    }
    let id = "i-logs-nofile";
    let pattern = dir.path().join("*.log");
    let args = ["--log", pattern.to_str().unwrap()];
    let mut a = Agent::start_with_nofile(&c.url(), id, &args, 1024);
    wait_first_checkpoint(&a);
    let what = || format!("agent log (tail):\n{}", tail(&a.log_text()));
    for i in 0..n {
        append(&file(i), &format!("first {i}\n"));
    }
    let q = format!("SELECT count(message) FROM log WHERE instance_id = '{id}'");
    wait_count(&influx, &q, n as u64, Duration::from_secs(120), &what);
    metrics_flow(&influx, id, &what);
    let log = a.log_text();
    assert!(
        !log.contains("Too many open files") && !log.contains("source failed"),
        "the agent ran out of descriptors:\n{}",
        tail(&log)
    );

    // Restarted with its checkpoint under the same limit: no file is forgotten, every second
    // line arrives, and nothing is shipped twice.
    a.stop();
    a.up_with_nofile(1024);
    for i in 0..n {
        append(&file(i), &format!("second {i}\n"));
    }
    let what = || format!("agent log (tail):\n{}", tail(&a.log_text()));
    wait_count(&influx, &q, 2 * n as u64, Duration::from_secs(120), &what);
    assert!(
        !a.log_text().contains("gone; forgetting it"),
        "a checkpointed file was dropped:\n{}",
        tail(&a.log_text())
    );
    metrics_flow(&influx, id, &what);
    let second = count(
        &influx,
        &format!(
            "SELECT count(message) FROM log WHERE instance_id = '{id}' AND message =~ /^second /"
        ),
    );
    assert_eq!(second, n as u64, "one second line from every file");
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
fn a_log_under_a_1100_byte_path_and_its_neighbour_lose_nothing() {
    let influx = Influx::start();
    let c = Collector::start(&["--influx-url", &influx.url(), "--influx-db", DB]);
    let dir = tempfile::tempdir().unwrap();
    let mut deep: PathBuf = dir.path().to_path_buf();
    while deep.as_os_str().len() < 1100 {
        deep.push("d".repeat(250));
    }
    fs::create_dir_all(&deep).unwrap();
    let long = deep.join("app.log");
    let short = dir.path().join("app.log");
    assert!(long.as_os_str().len() > 1100);
    fs::write(&long, "").unwrap();
    fs::write(&short, "").unwrap();
    let id = "i-logs-longpath";
    let a = Agent::start(
        &c.url(),
        id,
        &[
            "--log",
            long.to_str().unwrap(),
            "--log",
            short.to_str().unwrap(),
        ],
    );
    wait_first_checkpoint(&a);
    let what = || {
        format!(
            "agent log:\n{}\ncollector log:\n{}",
            tail(&a.log_text()),
            tail(&c.log_text())
        )
    };
    // Interleaved, in several batches.
    for round in 0..5 {
        for i in 0..20 {
            append(&long, &format!("deep {round} {i}\n"));
            append(&short, &format!("near {round} {i}\n"));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let tag = phoenix_wire::cut_value(long.to_str().unwrap());
    assert!(tag.len() <= 1024);
    let q_long =
        format!("SELECT count(message) FROM log WHERE instance_id = '{id}' AND path = '{tag}'");
    let q_short = format!(
        "SELECT count(message) FROM log WHERE instance_id = '{id}' AND path = '{}'",
        short.display()
    );
    wait_count(&influx, &q_short, 100, Duration::from_secs(60), &what);
    wait_count(&influx, &q_long, 100, Duration::from_secs(60), &what);
    metrics_flow(&influx, id, &what);
    assert!(
        !c.log_text().contains("400"),
        "the collector refused a report:\n{}",
        tail(&c.log_text())
    );
}
