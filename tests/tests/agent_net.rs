//! The agent's sender and spool on a bad day, with real processes: a proxy answering 200 with
//! HTML, a clock stepped back, a collector killed and restarted, a state dir on a full disk.
//! Every line written is looked for in a real InfluxDB.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use phoenix_e2e::net::*;
use phoenix_e2e::*;

const DB: &str = "phoenix";

/// Line `i`: a number to find it by, and `pad` bytes that gzip cannot squeeze much.
fn line(i: usize, pad: usize) -> String {
    let mut x = (i as u64).wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut s = format!("line-{i:06} ");
    while s.len() < pad + 12 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(&format!("{x:016x}"));
    }
    s.push('\n');
    s
}

fn append(path: &Path, from: usize, to: usize, pad: usize) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let s: String = (from..to).map(|i| line(i, pad)).collect();
    f.write_all(s.as_bytes()).unwrap();
}

/// The line numbers of `path` stored in `db`.
fn stored(influx: &Influx, db: &str, path: &Path) -> BTreeSet<usize> {
    influx
        .rows(
            db,
            &format!("SELECT message FROM log WHERE path = '{}'", path.display()),
        )
        .iter()
        .filter_map(|r| r["message"].as_str()?.get(5..11)?.parse().ok())
        .collect()
}

fn count(influx: &Influx, db: &str, path: &Path) -> u64 {
    influx.count(
        db,
        &format!(
            "SELECT count(message) FROM log WHERE path = '{}'",
            path.display()
        ),
    )
}

/// Wait until lines 0..n of `path` are all in `db`.
fn wait_all(influx: &Influx, db: &str, path: &Path, n: usize, timeout: Duration, log: &Proc) {
    let ok = wait_for(timeout, || {
        (count(influx, db, path) >= n as u64).then_some(())
    });
    let got = stored(influx, db, path);
    let missing: Vec<usize> = (0..n).filter(|i| !got.contains(i)).collect();
    assert!(
        ok.is_some() && missing.is_empty(),
        "{} of {n} lines missing (first {:?}); agent log:\n{}",
        missing.len(),
        &missing[..missing.len().min(10)],
        log.log_text()
    );
}

fn spool_batches(state: &Path) -> usize {
    fs::read_dir(state.join("spool"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".batch"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn html_answers_from_a_proxy_delete_no_batch() {
    let influx = Influx::start();
    let c = Collector::start(&["--influx-url", &influx.url(), "--influx-db", DB]);
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("app.log");
    fs::write(&log, "").unwrap();
    let proxy = HtmlProxy::start(c.port, Duration::from_secs(6));
    let state = tmp.path().join("state");
    let log_arg = log.to_str().unwrap();
    let agent = spawn(
        agent_cmd(
            &[],
            &[proxy.url()],
            "i-net-html",
            &state,
            &["--log", log_arg, "--log-initial", "start"],
        ),
        tmp.path().join("agent.log"),
    );
    // Lines written while the proxy answers with its login page.
    let t0 = Instant::now();
    let mut n = 0;
    while t0.elapsed() < Duration::from_secs(5) {
        append(&log, n, n + 5, 40);
        n += 5;
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        proxy.html_answers.load(Ordering::Relaxed) > 0,
        "the agent sent nothing during the HTML phase; log:\n{}",
        agent.log_text()
    );
    wait_all(&influx, DB, &log, n, Duration::from_secs(60), &agent);
    assert!(proxy.passed.load(Ordering::Relaxed) > 0);
    let text = agent.log_text();
    assert!(
        text.contains("without a JSON ack") && text.contains("Please log in"),
        "the refusal is logged with what came back:\n{text}"
    );
    assert!(
        text.contains("collector reachable again after"),
        "recovery is logged:\n{text}"
    );
}

#[test]
fn a_clock_stepped_back_in_the_same_boot_does_not_make_reports_duplicates() {
    let influx = Influx::start();
    let c = Collector::start(&["--influx-url", &influx.url(), "--influx-db", DB]);
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("app.log");
    fs::write(&log, "").unwrap();
    let state = tmp.path().join("state");
    let log_arg = log.to_str().unwrap();
    // A long interval, so that once the lines are in, no metrics batch is left unacked.
    let args = [
        "--log",
        log_arg,
        "--log-initial",
        "start",
        "--interval",
        "60s",
    ];
    let mut a = spawn(
        agent_cmd(&[], &[c.url()], "i-net-clock", &state, &args),
        tmp.path().join("agent-1.log"),
    );
    append(&log, 0, 20, 40);
    wait_all(&influx, DB, &log, 20, Duration::from_secs(30), &a);
    wait_for(Duration::from_secs(30), || {
        (spool_batches(&state) == 0).then_some(())
    })
    .expect("every batch acked");
    a.stop();
    assert_eq!(spool_batches(&state), 0, "all acked before the restart");
    // Same boot (same boot id), clock ten minutes behind: seqs from the clock would all be
    // below what the collector already took.
    let b = spawn(
        {
            let mut cmd = agent_cmd(
                &["faketime", "-f", "-10m"],
                &[c.url()],
                "i-net-clock",
                &state,
                &args,
            );
            cmd.env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
            cmd
        },
        tmp.path().join("agent-2.log"),
    );
    append(&log, 20, 40, 40);
    wait_all(&influx, DB, &log, 40, Duration::from_secs(30), &b);
    let dup = c.get("/metrics", None).body;
    assert!(
        !dup.lines()
            .any(|l| l.contains("duplicate") && !l.starts_with('#') && !l.ends_with(" 0")),
        "no report was taken for a duplicate:\n{dup}"
    );
}

#[test]
fn lines_keep_arriving_through_the_second_collector_and_come_back_to_the_first() {
    let influx = Influx::start();
    let mut c1 = Collector::start(&["--influx-url", &influx.url(), "--influx-db", "one"]);
    let c2 = Collector::start(&["--influx-url", &influx.url(), "--influx-db", "two"]);
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("app.log");
    fs::write(&log, "").unwrap();
    let state = tmp.path().join("state");
    let log_arg = log.to_str().unwrap().to_string();
    let agent = spawn(
        agent_cmd(
            &[],
            &[c1.url(), c2.url()],
            "i-net-failover",
            &state,
            &["--log", &log_arg, "--log-initial", "start"],
        ),
        tmp.path().join("agent.log"),
    );
    // A steady writer: 5 lines every 200 ms until told to stop.
    let written = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (written, stop, log) = (written.clone(), stop.clone(), log.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let n = written.load(Ordering::Relaxed);
                append(&log, n, n + 5, 40);
                written.store(n + 5, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let grows = |db: &str, from: u64, what: &str| {
        wait_for(Duration::from_secs(45), || {
            (count(&influx, db, &log) >= from + 10).then_some(())
        })
        .unwrap_or_else(|| panic!("{what}; agent log:\n{}", agent.log_text()));
    };
    grows("one", 0, "no lines through the first collector");
    c1.proc.take().unwrap().kill();
    grows(
        "two",
        0,
        "no lines through the second collector after the first died",
    );
    c1.up();
    let back_from = count(&influx, "one", &log);
    grows(
        "one",
        back_from,
        "the agent did not go back to the first collector",
    );
    // Back for good: the second gets nothing new for a while.
    let two = count(&influx, "two", &log);
    let one = count(&influx, "one", &log);
    wait_for(Duration::from_secs(10), || {
        (count(&influx, "one", &log) >= one + 20).then_some(())
    })
    .expect("lines keep going to the first collector");
    assert_eq!(
        count(&influx, "two", &log),
        two,
        "the second one is left alone"
    );
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let n = written.load(Ordering::Relaxed);
    // Every line is in one of the two databases (a batch taken by the collector that was
    // killed before its ack may be in both: written twice, lost never).
    let ok = wait_for(Duration::from_secs(30), || {
        let mut all = stored(&influx, "one", &log);
        all.extend(stored(&influx, "two", &log));
        (all.len() == n).then_some(())
    });
    assert!(
        ok.is_some(),
        "lines lost in the failover; agent log:\n{}",
        agent.log_text()
    );
    let text = agent.log_text();
    assert!(text.contains("failing over"), "{text}");
    assert!(text.contains("going back to it"), "{text}");
    drop(c2);
}

#[test]
fn a_full_state_dir_costs_little_loses_no_line_and_counts_what_it_dropped() {
    let influx = Influx::start();
    let mut c = Collector::start(&["--influx-url", &influx.url(), "--influx-db", DB]);
    let disk = Tmpfs::mount("2m");
    let state = disk.path().join("state");
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("app.log");
    fs::write(&log, "").unwrap();
    let log_arg = log.to_str().unwrap();
    let mut agent = spawn(
        agent_cmd(
            &[],
            &[c.url()],
            "i-net-disk",
            &state,
            // The spool may hold 1.5 MiB; with another 1 MiB taken on the 2 MiB disk, the
            // disk fills before the spool's own bound is reached.
            &[
                "--log",
                log_arg,
                "--log-initial",
                "start",
                "--spool-max",
                "1536KiB",
            ],
        ),
        tmp.path().join("agent.log"),
    );
    wait_for(Duration::from_secs(30), || {
        state.join("logs.acked.json").exists().then_some(())
    })
    .expect("the agent's first checkpoint");
    c.down();
    // Someone else fills half the disk.
    fs::write(disk.path().join("ballast"), vec![7u8; 1 << 20]).ok();
    // 4,000 lines of ~500 bytes that gzip cannot squeeze much: more than the disk holds.
    let n = 4000;
    for k in 0..20 {
        append(&log, k * n / 20, (k + 1) * n / 20, 500);
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for(Duration::from_secs(60), || {
        agent
            .log_text()
            .contains("cannot write a log batch to the spool")
            .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the disk never filled (free {}); log:\n{}",
            disk.free(),
            agent.log_text()
        )
    });
    // While the disk is full and the collector down: alive and nearly idle.
    let pid = agent.pid();
    let (c0, t0) = (cpu_seconds(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(10));
    let share = (cpu_seconds(pid) - c0) / t0.elapsed().as_secs_f64();
    assert!(agent.alive(), "the agent died: {}", agent.log_text());
    assert!(
        share < 0.05,
        "the agent used {:.1} % of a core on a full disk",
        share * 100.0
    );
    eprintln!(
        "agent CPU on a full state dir, collector down: {:.2} % of a core",
        share * 100.0
    );
    c.up();
    wait_all(&influx, DB, &log, n, Duration::from_secs(120), &agent);
    // What could not be kept is counted, and the count reached InfluxDB.
    let q = "SELECT last(dropped_points) AS d, last(dropped_points_disk) AS dd, last(spool_write_errors) AS e FROM phoenix_agent WHERE instance_id = 'i-net-disk'";
    let row = wait_for(Duration::from_secs(30), || {
        let r = influx.rows(DB, q).into_iter().next()?;
        (r["dd"].as_u64()? > 0).then_some(r)
    })
    .unwrap_or_else(|| {
        panic!(
            "no dropped_points_disk > 0 in phoenix_agent: {:?}",
            influx.rows(DB, q)
        )
    });
    assert!(row["d"].as_u64().unwrap() >= row["dd"].as_u64().unwrap());
    assert!(row["e"].as_u64().unwrap() > 0);
    agent.stop();
}

#[test]
fn a_batch_the_collector_refuses_is_split_until_every_good_line_is_stored() {
    let influx = Influx::start();
    // At most 60 points a report: the agent's 600-line batch is refused with 400 as a whole.
    let c = Collector::start(&[
        "--influx-url",
        &influx.url(),
        "--influx-db",
        DB,
        "--max-points",
        "60",
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("app.log");
    append(&log, 0, 600, 40);
    let state = tmp.path().join("state");
    let log_arg = log.to_str().unwrap();
    let agent = spawn(
        agent_cmd(
            &[],
            &[c.url()],
            "i-net-split",
            &state,
            &["--log", log_arg, "--log-initial", "start"],
        ),
        tmp.path().join("agent.log"),
    );
    wait_all(&influx, DB, &log, 600, Duration::from_secs(60), &agent);
    assert!(
        agent.log_text().contains("split it in two"),
        "{}",
        agent.log_text()
    );
    // Nothing was set aside: every part fitted once small enough.
    let reasons: Vec<String> = fs::read_dir(state.join("rejected"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "reason"))
                .map(|e| fs::read_to_string(e.path()).unwrap_or_default())
                .collect()
        })
        .unwrap_or_default();
    assert!(reasons.is_empty(), "set aside: {reasons:?}");
}
