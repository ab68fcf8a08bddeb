//! Log lines off the box, end to end: files written here, tailed by the real agent, through
//! the real collector into a real influxd, where every line is counted against what was
//! written: none missing, none twice, in order.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use phoenix_e2e::*;

const DB: &str = "phoenix";

fn setup() -> (Influx, Collector, tempfile::TempDir) {
    let influx = Influx::start();
    let c = Collector::start(&["--influx-url", &influx.url(), "--influx-db", DB]);
    (influx, c, tempfile::tempdir().unwrap())
}

/// Start an agent on `pattern` and wait until its first checkpoint is down, so every file
/// created from now on counts as new (read from its start).
fn agent(c: &Collector, id: &str, pattern: &Path, extra: &[&str]) -> Agent {
    let mut args = vec!["--log", pattern.to_str().unwrap()];
    args.extend_from_slice(extra);
    let a = Agent::start(&c.url(), id, &args);
    let ck = a.state_dir.join("logs.acked.json");
    wait_for(Duration::from_secs(30), || ck.exists().then_some(())).unwrap_or_else(|| {
        panic!(
            "the agent wrote no first checkpoint; log:\n{}",
            a.log_text()
        )
    });
    a
}

fn line(i: usize) -> String {
    // Shapes that need escaping in line protocol, and a number to count by.
    format!(
        "seq={i} level=info msg=\"user said \\\"hi\\\", a=b\" path=C:\\temp\\x tab\there 😀 {}\n",
        "x".repeat(i % 50)
    )
}

fn append(path: &Path, from: usize, to: usize) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let mut s = String::new();
    for i in from..to {
        s.push_str(&line(i));
    }
    f.write_all(s.as_bytes()).unwrap();
}

fn count(influx: &Influx, path: &Path) -> u64 {
    influx.count(
        DB,
        &format!(
            "SELECT count(message) FROM log WHERE path = '{}'",
            path.display()
        ),
    )
}

/// Wait until InfluxDB holds `n` lines of `path` (failing early if it holds more).
fn wait_lines(influx: &Influx, path: &Path, n: u64, timeout: Duration, what: &dyn Fn() -> String) {
    let mut last = 0;
    let ok = wait_for(timeout, || {
        last = count(influx, path);
        assert!(
            last <= n,
            "{last} lines of {} in InfluxDB, only {n} were written: duplicates",
            path.display()
        );
        (last == n).then_some(())
    });
    assert!(
        ok.is_some(),
        "only {last} of {n} lines of {} reached InfluxDB\n{}",
        path.display(),
        what()
    );
}

/// The `seq` numbers of `path`'s lines in InfluxDB, in time order.
fn seqs(influx: &Influx, path: &Path) -> Vec<usize> {
    influx
        .rows(
            DB,
            &format!("SELECT message FROM log WHERE path = '{}'", path.display()),
        )
        .iter()
        .map(|r| {
            let m = r["message"].as_str().unwrap();
            assert!(
                m.contains("😀") && m.contains("\\\"hi\\\"") && m.contains('\t'),
                "line arrived altered: {m:?}"
            );
            m.strip_prefix("seq=")
                .and_then(|s| s.split(' ').next())
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("not a line we wrote: {m:?}"))
        })
        .collect()
}

fn assert_all(influx: &Influx, path: &Path, n: usize) {
    let got = seqs(influx, path);
    assert_eq!(got.len(), n);
    let first_wrong = got.iter().enumerate().find(|(i, s)| *i != **s);
    assert!(
        first_wrong.is_none(),
        "lines of {} out of order or missing, first at {first_wrong:?}",
        path.display()
    );
}

fn logs_of(c: &Collector, a: &Agent) -> String {
    format!(
        "agent log:\n{}\ncollector log:\n{}",
        a.log_text(),
        c.log_text()
    )
}

#[test]
fn nasty_lines_arrive_intact() {
    let (influx, c, dir) = setup();
    let p = dir.path().join("app.log");
    let big: Vec<u8> = (0..100 * 1024).map(|i| b"abcdefghij"[i % 10]).collect();
    let lines: Vec<Vec<u8>> = vec![
        b"he said \"hi\", a=b, c=\"d e\"".to_vec(),
        b"ends with a backslash \\".to_vec(),
        b"tab\there and CR\rinside".to_vec(),
        b"windows line\r".to_vec(),
        "emoji 😀 Zürich 東京 Ελλάδα".as_bytes().to_vec(),
        b"invalid \xff\xfe utf-8 and a \\x41 lookalike".to_vec(),
        b"measurement,tag=1 field=\"x\" 123".to_vec(),
        b"2025-03-12 10:00:00 ERROR db down".to_vec(),
        big,
        b"the last one".to_vec(),
    ];
    let mut body = Vec::new();
    for l in &lines {
        body.extend_from_slice(l);
        body.push(b'\n');
    }
    fs::write(&p, &body).unwrap();
    // Existing lines are read too on a first start with --log-initial start.
    let a = agent(&c, "i-logs-nasty", &p, &["--log-initial", "start"]);
    // The 100 KiB line travels as two parts.
    wait_lines(
        &influx,
        &p,
        lines.len() as u64 + 1,
        Duration::from_secs(60),
        &|| logs_of(&c, &a),
    );
    let rows = influx.rows(
        DB,
        &format!(
            "SELECT message, escaped, part, \"offset\", level FROM log WHERE path = '{}'",
            p.display()
        ),
    );
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut offsets = Vec::new();
    for r in &rows {
        let raw = phoenix_wire::logtext::decode(
            r["message"].as_str().unwrap(),
            r["escaped"].as_bool().unwrap_or(false),
        );
        match r["part"].as_u64() {
            Some(n) if n > 1 => got.last_mut().unwrap().extend_from_slice(&raw),
            _ => {
                got.push(raw);
                offsets.push(r["offset"].as_u64().unwrap());
            }
        }
    }
    assert_eq!(got.len(), lines.len());
    for (g, w) in got.iter().zip(&lines) {
        assert!(
            g == w,
            "{:?} arrived as {:?}",
            String::from_utf8_lossy(&w[..w.len().min(80)]),
            String::from_utf8_lossy(&g[..g.len().min(80)])
        );
    }
    let mut off = 0;
    for (o, l) in offsets.iter().zip(&lines) {
        assert_eq!(
            *o, off,
            "offset of each line is where it starts in the file"
        );
        off += l.len() as u64 + 1;
    }
    assert!(rows
        .iter()
        .any(|r| r["level"] == "error" && r["message"].as_str().unwrap().contains("db down")));
    assert!(
        rows.iter().any(|r| r["escaped"] == true),
        "invalid UTF-8 travels escaped"
    );
}

#[test]
fn rename_and_copytruncate_rotation_under_a_fast_writer_lose_nothing() {
    let (influx, c, dir) = setup();
    let a_log = dir.path().join("a.log");
    let b_log = dir.path().join("b.log");
    fs::write(&a_log, "").unwrap();
    fs::write(&b_log, "").unwrap();
    let pattern = dir.path().join("*.log");
    let a = agent(&c, "i-logs-rotate", &pattern, &[]);
    // 25k lines/s into each file, rotated every second. (A file renamed away again before
    // the agent's next look, 250 ms, could not be followed: polling sees only what is there.)
    const N: usize = 100_000;
    const EVERY: usize = 25_000;
    let (pa, pb) = (a_log.clone(), b_log.clone());
    let writer = std::thread::spawn(move || {
        let mut fa = OpenOptions::new().append(true).open(&pa).unwrap();
        let mut fb = OpenOptions::new().append(true).open(&pb).unwrap();
        for chunk in 0..N / 250 {
            let (from, to) = (chunk * 250, chunk * 250 + 250);
            let text: String = (from..to).map(line).collect();
            fa.write_all(text.as_bytes()).unwrap();
            fb.write_all(text.as_bytes()).unwrap();
            if to % EVERY == 0 && to < N {
                let k = to / EVERY;
                // logrotate's default: rename, and the application opens a new file.
                fs::rename(&pa, pa.with_extension(format!("log.{k}"))).unwrap();
                fa = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&pa)
                    .unwrap();
                // copytruncate: copy, then truncate in place; the writer goes on (O_APPEND).
                fs::copy(&pb, pb.with_extension(format!("log.{k}"))).unwrap();
                fb.set_len(0).unwrap();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    writer.join().unwrap();
    wait_lines(&influx, &a_log, N as u64, Duration::from_secs(180), &|| {
        logs_of(&c, &a)
    });
    wait_lines(&influx, &b_log, N as u64, Duration::from_secs(60), &|| {
        logs_of(&c, &a)
    });
    assert_all(&influx, &a_log, N);
    assert_all(&influx, &b_log, N);
}

#[test]
fn collector_and_influxdb_outages_lose_nothing() {
    let (mut influx, mut c, dir) = setup();
    let p = dir.path().join("app.log");
    fs::write(&p, "").unwrap();
    let a = agent(&c, "i-logs-outage", &p, &[]);
    append(&p, 0, 5000);
    wait_lines(&influx, &p, 5000, Duration::from_secs(60), &|| {
        logs_of(&c, &a)
    });
    c.down();
    append(&p, 5000, 15_000);
    std::thread::sleep(Duration::from_secs(3));
    c.up();
    wait_lines(&influx, &p, 15_000, Duration::from_secs(90), &|| {
        logs_of(&c, &a)
    });
    influx.down();
    append(&p, 15_000, 25_000);
    std::thread::sleep(Duration::from_secs(3));
    influx.up();
    wait_lines(&influx, &p, 25_000, Duration::from_secs(120), &|| {
        logs_of(&c, &a)
    });
    assert_all(&influx, &p, 25_000);
}

#[test]
fn agent_killed_mid_stream_then_restarted_loses_and_repeats_nothing() {
    let (influx, c, dir) = setup();
    let p = dir.path().join("app.log");
    fs::write(&p, "").unwrap();
    let mut a = agent(&c, "i-logs-kill", &p, &[]);
    const N: usize = 80_000;
    let pw = p.clone();
    let writer = std::thread::spawn(move || {
        for chunk in 0..N / 400 {
            append(&pw, chunk * 400, chunk * 400 + 400);
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    for _ in 0..3 {
        // Wait until lines are flowing, then kill -9 in the middle of it.
        let before = count(&influx, &p);
        wait_for(Duration::from_secs(30), || {
            (count(&influx, &p) > before).then_some(())
        });
        std::thread::sleep(Duration::from_millis(300));
        a.kill();
        std::thread::sleep(Duration::from_millis(500));
        a.up();
    }
    writer.join().unwrap();
    wait_lines(&influx, &p, N as u64, Duration::from_secs(180), &|| {
        logs_of(&c, &a)
    });
    assert_all(&influx, &p, N);
}

fn status_kb(pid: u32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
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

fn dir_bytes(d: &Path) -> u64 {
    fs::read_dir(d)
        .map(|r| {
            r.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn full_spool_pauses_logs_keeps_memory_bounded_and_counts_dropped_metrics() {
    let (influx, mut c, dir) = setup();
    let p = dir.path().join("app.log");
    fs::write(&p, "").unwrap();
    let mut a = agent(&c, "i-logs-full", &p, &["--spool-max", "1MiB"]);
    c.down();
    // ~45 MB of lines while the collector is away: far more than the spool holds, and far
    // more than the agent's memory would be if it kept them.
    const N: usize = 300_000;
    for chunk in 0..N / 10_000 {
        append(&p, chunk * 10_000, chunk * 10_000 + 10_000);
    }
    let pid = a.proc.as_ref().unwrap().pid();
    let spool = a.state_dir.join("spool");
    // Let the agent fill the spool and sit there with metrics arriving every second.
    std::thread::sleep(Duration::from_secs(6));
    let spooled = dir_bytes(&spool);
    assert!(spooled > 512 << 10, "the spool filled up: {spooled} bytes");
    assert!(
        spooled < 2 << 20,
        "the spool stays near --spool-max: {spooled} bytes"
    );
    let hwm = status_kb(pid, "VmHWM:");
    assert!(
        hwm < 64 * 1024,
        "agent peak RSS {hwm} kB while {} MB of lines waited",
        fs::metadata(&p).unwrap().len() >> 20
    );
    c.up();
    wait_lines(&influx, &p, N as u64, Duration::from_secs(300), &|| {
        logs_of(&c, &a)
    });
    assert_all(&influx, &p, N);
    let dropped = wait_for(Duration::from_secs(30), || {
        let r = influx.rows(
            DB,
            "SELECT max(dropped_points) AS d FROM phoenix_agent WHERE instance_id = 'i-logs-full'",
        );
        r.first().and_then(|r| r["d"].as_u64()).filter(|d| *d > 0)
    });
    assert!(
        dropped.is_some(),
        "dropped metric points are counted in phoenix_agent"
    );
    a.stop();
}
