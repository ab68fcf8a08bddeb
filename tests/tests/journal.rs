//! The systemd journal off the box, end to end: real journal files written by
//! systemd-journal-remote from export format, read by the real agent through the real
//! journalctl, shipped through the real collector into a real influxd, and counted there
//! against what was written: every entry once, with its unit, level, time and exact bytes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use phoenix_e2e::*;
use phoenix_wire::logtext;
use serde_json::Value;

const DB: &str = "phoenix";
const BOOT: &str = "fedcba9876543210fedcba9876543210";
/// Realtime of the first test entry, µs; far from "now" so nothing else lands there.
/// The entries' time (µs): a day ago, inside the collector's accepted window (−7 d/+10 min),
/// whole seconds so the expected values stay readable.
static T0: std::sync::LazyLock<i64> = std::sync::LazyLock::new(|| {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    (now - 86_400) * 1_000_000
});

fn journal_remote() -> PathBuf {
    [
        "/lib/systemd/systemd-journal-remote",
        "/usr/lib/systemd/systemd-journal-remote",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("these tests need systemd-journal-remote: apt-get install systemd-journal-remote")
}

/// One journal entry as the test writes it.
struct Entry {
    us: i64,
    unit: String,
    prio: u8,
    msg: Vec<u8>,
}

fn e(us: i64, unit: &str, prio: u8, msg: &[u8]) -> Entry {
    Entry {
        us,
        unit: unit.into(),
        prio,
        msg: msg.to_vec(),
    }
}

/// Append entries to a journal file: export format piped into systemd-journal-remote.
fn write_journal(path: &Path, entries: &[Entry]) {
    let mut out = Vec::new();
    for en in entries {
        let mono = (en.us - *T0 + 1_000_000).to_string();
        let fields: [(&str, &[u8]); 8] = [
            ("__REALTIME_TIMESTAMP", en.us.to_string().as_bytes()),
            ("__MONOTONIC_TIMESTAMP", mono.as_bytes()),
            ("_BOOT_ID", BOOT.as_bytes()),
            ("_SYSTEMD_UNIT", en.unit.as_bytes()),
            ("PRIORITY", en.prio.to_string().as_bytes()),
            ("_PID", b"777"),
            ("_COMM", b"webapp"),
            ("MESSAGE", &en.msg),
        ]
        .map(|(k, v)| (k, v.to_vec()))
        .map(|(k, v)| (k, &*Box::leak(v.into_boxed_slice())));
        for (k, v) in fields {
            out.extend_from_slice(k.as_bytes());
            if std::str::from_utf8(v).is_ok() && !v.iter().any(|&b| b < 0x20) {
                out.push(b'=');
            } else {
                // The binary form: name, newline, little-endian u64 length, the bytes.
                out.push(b'\n');
                out.extend_from_slice(&(v.len() as u64).to_le_bytes());
            }
            out.extend_from_slice(v);
            out.push(b'\n');
        }
        out.push(b'\n');
    }
    let mut child = Command::new(journal_remote())
        .arg(format!("--output={}", path.display()))
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&out).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "systemd-journal-remote failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn setup() -> (Influx, Collector, tempfile::TempDir) {
    let influx = Influx::start();
    let c = Collector::start(&["--influx-url", &influx.url(), "--influx-db", DB]);
    (influx, c, tempfile::tempdir().unwrap())
}

/// Start an agent on the journal and wait for its first-start checkpoint (the end of the
/// journal as it is now: what is written from here on is shipped).
fn agent(c: &Collector, id: &str, extra: &[&str]) -> Agent {
    let a = Agent::start(&c.url(), id, extra);
    wait_checkpoint(&a);
    a
}

fn wait_checkpoint(a: &Agent) {
    let ck = a.state_dir.join("journal.acked.json");
    wait_for(Duration::from_secs(30), || ck.exists().then_some(())).unwrap_or_else(|| {
        panic!(
            "the agent wrote no journal checkpoint; log:\n{}",
            a.log_text()
        )
    });
}

/// Every `log` row of one instance from the journal, in time order.
fn rows(influx: &Influx, id: &str) -> Vec<serde_json::Map<String, Value>> {
    influx.rows(DB, &format!("SELECT message, escaped, part, pid, comm, priority, unit, level, path FROM log WHERE instance_id = '{id}'"))
}

fn count(influx: &Influx, id: &str) -> u64 {
    influx.count(
        DB,
        &format!("SELECT count(message) FROM log WHERE instance_id = '{id}'"),
    )
}

/// Wait until InfluxDB holds exactly `n` entries of the instance, failing on more.
fn wait_count(influx: &Influx, id: &str, n: u64, what: &dyn Fn() -> String) {
    let mut last = 0;
    let ok = wait_for(Duration::from_secs(60), || {
        last = count(influx, id);
        assert!(
            last <= n,
            "{last} journal entries in InfluxDB, only {n} were written: duplicates\n{}",
            what()
        );
        (last == n).then_some(())
    });
    assert!(
        ok.is_some(),
        "only {last} of {n} journal entries reached InfluxDB\n{}",
        what()
    );
    // Nothing more may trickle in.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(count(influx, id), n, "entries arrived twice");
}

/// Everything the agent logged, over all its restarts, and the collector's log.
fn logs(a: &Agent, c: &Collector) -> String {
    let mut out = String::new();
    let mut files: Vec<_> = std::fs::read_dir(a.state_dir.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    files.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    for f in files {
        out.push_str(&format!(
            "--- {}\n{}",
            f.display(),
            std::fs::read_to_string(&f).unwrap_or_default()
        ));
    }
    let dups: String = c
        .get("/metrics", None)
        .body
        .lines()
        .filter(|l| l.contains("duplicate"))
        .map(|l| format!("{l}\n"))
        .collect();
    out + "--- collector\n" + &c.log_text() + "--- collector /metrics\n" + &dups
}

/// Which entry numbers ("entry N") InfluxDB lacks, as ranges.
fn missing(influx: &Influx, id: &str, n: i64) -> String {
    let have: std::collections::BTreeSet<i64> = rows(influx, id)
        .iter()
        .filter_map(|r| {
            String::from_utf8(bytes_of(r))
                .ok()?
                .strip_prefix("entry ")?
                .split('\n')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let mut out = String::new();
    let mut i = 0;
    while i < n {
        if !have.contains(&i) {
            let start = i;
            while i < n && !have.contains(&i) {
                i += 1;
            }
            out.push_str(&format!("{start}..{i} "));
        }
        i += 1;
    }
    out
}

fn bytes_of(r: &serde_json::Map<String, Value>) -> Vec<u8> {
    logtext::decode(
        r["message"].as_str().unwrap(),
        r["escaped"].as_bool() == Some(true),
    )
}

#[test]
fn every_entry_arrives_once_with_unit_level_time_and_exact_bytes() {
    let (influx, c, dir) = setup();
    let file = dir.path().join("app.journal");
    write_journal(
        &file,
        &[e(
            *T0,
            "seed.service",
            6,
            b"written before the agent started: not shipped",
        )],
    );
    let a = agent(
        &c,
        "i-journal-1",
        &["--journal-file", file.to_str().unwrap()],
    );
    let wrote = vec![
        e(*T0 + 1_000, "web.service", 6, b"GET /index.html 200"),
        e(
            *T0 + 2_000,
            "web.service",
            3,
            b"Traceback (most recent call last):\n  File \"app.py\", line 1\nValueError: x",
        ),
        e(
            *T0 + 2_000,
            "db.service",
            4,
            b"binary \xff\xfe\x00 bytes, \\x41 and a backslash",
        ),
        e(
            *T0 + 2_000,
            "db.service",
            2,
            "unicode ✓ Grüße 😀, \"quoted\" a=b,c".as_bytes(),
        ),
        e(
            *T0 + 3_000,
            "cron.service",
            7,
            b"debug line with\ttab and \x1b[31mcolour\x1b[0m",
        ),
        e(*T0 + 4_000, "web.service", 5, b""),
    ];
    write_journal(&file, &wrote);
    wait_count(&influx, "i-journal-1", wrote.len() as u64, &|| a.log_text());
    let got = rows(&influx, "i-journal-1");
    assert_eq!(got.len(), wrote.len());
    let levels = [
        "critical", "critical", "critical", "error", "warning", "info", "info", "debug",
    ];
    let mut prev = 0;
    for (w, r) in wrote.iter().zip(&got) {
        assert_eq!(bytes_of(r), w.msg, "{r:?}");
        assert_eq!(r["unit"], w.unit.as_str());
        assert_eq!(r["level"], levels[w.prio as usize]);
        assert_eq!(r["priority"], w.prio as u64);
        assert_eq!(r["pid"], 777);
        assert_eq!(r["comm"], "webapp");
        assert!(
            r["path"].is_null(),
            "journal entries carry no path tag: {r:?}"
        );
        // Their own time; the three entries sharing a microsecond are a nanosecond apart.
        let ts = r["time"].as_i64().unwrap();
        assert!(
            ts >= w.us * 1000 && ts < w.us * 1000 + 10,
            "ts {ts} for µs {}",
            w.us
        );
        assert!(ts > prev);
        prev = ts;
    }
}

#[test]
fn restarts_and_sigkill_lose_nothing_and_duplicate_nothing() {
    let (influx, c, dir) = setup();
    let jdir = dir.path().join("journal");
    std::fs::create_dir_all(&jdir).unwrap();
    let file = jdir.join("system.journal");
    write_journal(&file, &[e(*T0, "seed.service", 6, b"seed")]);
    let id = "i-journal-2";
    let mut a = agent(&c, id, &["--journal-dir", jdir.to_str().unwrap()]);
    let mut n = 0i64;
    let mut batch = |k: i64| -> Vec<Entry> {
        let out = (n..n + k)
            .map(|i| {
                e(
                    *T0 + 1_000 + i * 10,
                    ["web.service", "db.service", "cron.service"][(i % 3) as usize],
                    (i % 8) as u8,
                    format!("entry {i}\nsecond line {}", "x".repeat((i % 40) as usize)).as_bytes(),
                )
            })
            .collect();
        n += k;
        out
    };
    write_journal(&file, &batch(300));
    wait_count(&influx, id, 300, &|| a.log_text());

    // Clean stop; entries written while the agent is down; start again.
    a.stop();
    write_journal(&file, &batch(300));
    a.up();
    wait_count(&influx, id, 600, &|| a.log_text());

    // kill -9 while a large batch is being read and shipped, more written while dead, and a
    // new journal file (journald's rotation) in the directory.
    let big = batch(20_000);
    write_journal(&file, &big);
    wait_for(Duration::from_secs(30), || {
        (count(&influx, id) > 600).then_some(())
    })
    .expect("the agent started shipping the big batch");
    a.kill();
    let shipped_at_kill = count(&influx, id);
    write_journal(&file, &batch(500));
    write_journal(&jdir.join("system@rotated.journal"), &batch(200));
    a.up();
    wait_count(&influx, id, n as u64, &|| {
        format!(
            "missing entries: {}\n{}",
            missing(&influx, id, n),
            logs(&a, &c)
        )
    });
    assert!(
        shipped_at_kill < n as u64,
        "the kill happened before everything was shipped"
    );

    // Each entry exactly once: its number, its time and its bytes.
    let got = rows(&influx, id);
    let mut seen = BTreeMap::new();
    for r in &got {
        let text = String::from_utf8(bytes_of(r)).unwrap();
        let i: i64 = text
            .strip_prefix("entry ")
            .unwrap()
            .split('\n')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(r["time"].as_i64().unwrap(), (*T0 + 1_000 + i * 10) * 1000);
        assert!(seen.insert(i, ()).is_none(), "entry {i} twice");
    }
    assert_eq!(seen.len() as i64, n);
}

#[test]
fn unit_and_priority_filters() {
    let (influx, c, dir) = setup();
    let file = dir.path().join("f.journal");
    write_journal(&file, &[e(*T0, "seed.service", 6, b"seed")]);
    let a = agent(
        &c,
        "i-journal-3",
        &[
            "--journal-file",
            file.to_str().unwrap(),
            "--journal-unit",
            "web.service",
            "--journal-unit",
            "api.service",
            "--journal-priority",
            "warning",
        ],
    );
    let mut wrote = Vec::new();
    for (i, unit) in ["web.service", "api.service", "db.service"]
        .iter()
        .enumerate()
    {
        for p in 0..8u8 {
            wrote.push(e(
                *T0 + 1_000 + (i as i64) * 100 + p as i64,
                unit,
                p,
                format!("{unit} p{p}").as_bytes(),
            ));
        }
    }
    write_journal(&file, &wrote);
    let want: Vec<String> = wrote
        .iter()
        .filter(|w| w.unit != "db.service" && w.prio <= 4)
        .map(|w| String::from_utf8(w.msg.clone()).unwrap())
        .collect();
    let show = || format!("got {:?}\n{}", rows(&influx, "i-journal-3"), logs(&a, &c));
    wait_count(&influx, "i-journal-3", want.len() as u64, &show);
    let got: Vec<String> = rows(&influx, "i-journal-3")
        .iter()
        .map(|r| String::from_utf8(bytes_of(r)).unwrap())
        .collect();
    assert_eq!(got, want);
}

#[test]
fn a_journal_replaced_under_the_agent_is_reported_and_reading_goes_on() {
    let (influx, c, dir) = setup();
    let file = dir.path().join("r.journal");
    write_journal(&file, &[e(*T0, "seed.service", 6, b"seed")]);
    let id = "i-journal-4";
    let mut a = agent(&c, id, &["--journal-file", file.to_str().unwrap()]);
    write_journal(
        &file,
        &[
            e(*T0 + 10, "a.service", 6, b"one"),
            e(*T0 + 20, "a.service", 6, b"two"),
        ],
    );
    wait_count(&influx, id, 2, &|| a.log_text());

    // Vacuumed and started afresh under the running agent (a new file, new cursors).
    let fresh = dir.path().join("fresh.journal");
    write_journal(
        &fresh,
        &[
            e(*T0 + 30, "b.service", 6, b"three"),
            e(*T0 + 40, "b.service", 6, b"four"),
        ],
    );
    std::fs::rename(&fresh, &file).unwrap();
    wait_count(&influx, id, 4, &|| a.log_text());
    let log = a.log_text();
    assert!(
        log.contains("no longer holds the last entry read"),
        "the reset is reported:\n{log}"
    );
    let resets = wait_for(Duration::from_secs(30), || {
        let r = influx.rows(
            DB,
            &format!(
                "SELECT last(journal_cursor_resets) FROM phoenix_agent WHERE instance_id = '{id}'"
            ),
        );
        r.first()
            .and_then(|r| r["last"].as_u64())
            .filter(|&v| v >= 1)
    });
    assert!(resets.is_some(), "journal_cursor_resets reaches InfluxDB");

    // The same while the agent is down: still no crash, the new entries arrive.
    a.stop();
    let fresh = dir.path().join("fresh2.journal");
    write_journal(&fresh, &[e(*T0 + 50, "c.service", 6, b"five")]);
    std::fs::rename(&fresh, &file).unwrap();
    a.up();
    wait_count(&influx, id, 5, &|| a.log_text());
    let got: Vec<Vec<u8>> = rows(&influx, id).iter().map(bytes_of).collect();
    assert_eq!(got, [&b"one"[..], b"two", b"three", b"four", b"five"]);
}
