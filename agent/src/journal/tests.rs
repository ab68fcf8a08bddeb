//! The reader against real journal files (written by systemd-journal-remote from export
//! format), the real journalctl and a real spool, drained the way the sender would.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use phoenix_wire::Identity;

use super::*;
use crate::spool::Spool;

const BOOT: &str = "0123456789abcdef0123456789abcdef";

fn journal_remote() -> PathBuf {
    [
        "/lib/systemd/systemd-journal-remote",
        "/usr/lib/systemd/systemd-journal-remote",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect(
        "systemd-journal-remote is needed for these tests: apt-get install systemd-journal-remote",
    )
}

/// A test entry: (realtime µs, unit, priority, message).
struct E<'a>(i64, &'a str, u8, &'a [u8]);

/// Append entries to a journal file through systemd-journal-remote. Monotonic time and
/// realtime grow with `t`, as journald's would within one boot.
fn write_journal(path: &Path, entries: &[E]) {
    let mut out = Vec::new();
    for E(t, unit, prio, msg) in entries {
        let (t, mono, p) = (
            t.to_string(),
            (t - 1_600_000_000_000_000).to_string(),
            prio.to_string(),
        );
        write_entry(
            &mut out,
            &[
                ("__REALTIME_TIMESTAMP", t.as_bytes()),
                ("__MONOTONIC_TIMESTAMP", mono.as_bytes()),
                ("_BOOT_ID", BOOT.as_bytes()),
                ("_SYSTEMD_UNIT", unit.as_bytes()),
                ("PRIORITY", p.as_bytes()),
                ("_PID", b"4242"),
                ("_COMM", b"app"),
                ("MESSAGE", msg),
            ],
        );
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
        "systemd-journal-remote: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

struct Env {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    state: PathBuf,
    spool: Arc<Spool>,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let spool = Arc::new(Spool::open(&state.join("spool"), 64 << 20).unwrap());
        Env {
            dir: dir.path().to_path_buf(),
            _dir: dir,
            state,
            spool,
        }
    }

    fn ctx(&self) -> Ctx {
        let identity = Identity {
            instance_id: "i-1".into(),
            image_id: "img-1".into(),
            hostname: "h".into(),
            ..Default::default()
        };
        Ctx {
            identity: Arc::new(identity),
            spool: self.spool.clone(),
            state_dir: self.state.clone(),
            interval: Duration::from_secs(10),
            drift_link: Default::default(),
        }
    }

    fn opts(&self, loc: Location) -> Options {
        let mut o = Options::new(loc);
        o.quiet = Duration::from_millis(50);
        o.linger = Duration::from_millis(200);
        o.check_every = Duration::from_millis(100);
        o.backoff_max = Duration::from_millis(500);
        o
    }

    /// Run a reader until `want` lines reached the spool (or 20 s), then stop it the way a
    /// kill -9 would: the spool is reopened from disk, what was not queued is gone.
    fn read(&mut self, o: Options, want: usize) -> Vec<LogLine> {
        let mut r = Reader::new(self.ctx(), o).unwrap();
        let spool = self.spool.clone();
        let t = std::thread::spawn(move || {
            let res = r.run();
            r.kill_child();
            res
        });
        let end = Instant::now() + Duration::from_secs(20);
        let mut got = Vec::new();
        while got.len() < want && Instant::now() < end {
            got.extend(self.drain_some());
        }
        // Anything beyond `want` would be a duplicate: give it a moment to show up.
        std::thread::sleep(Duration::from_millis(400));
        got.extend(self.drain_some());
        spool.stop();
        assert!(matches!(t.join().unwrap(), Err(JournalError::Stopping)));
        self.spool = Arc::new(Spool::open(&self.state.join("spool"), 64 << 20).unwrap());
        got
    }

    fn drain_some(&self) -> Vec<LogLine> {
        let mut out = Vec::new();
        while let Some(e) = self.spool.oldest(Duration::from_millis(50)) {
            let r =
                phoenix_wire::decode(&e.body, true, &phoenix_wire::Limits::default().any_time())
                    .unwrap();
            out.extend(r.logs);
            self.spool.ack(&e, &self.state).unwrap();
        }
        out
    }
}

fn msgs(lines: &[LogLine]) -> Vec<Vec<u8>> {
    lines
        .iter()
        .map(|l| logtext::decode(&l.msg, l.escaped))
        .collect()
}

const T0: i64 = 1_700_000_000_000_000;

#[test]
fn every_entry_once_with_exact_bytes_tags_and_timestamps() {
    let mut env = Env::new();
    let file = env.dir.join("j.journal");
    write_journal(&file, &[E(T0, "seed.service", 6, b"before the agent")]);
    let long: &'static [u8] = "é".repeat(50_000).into_bytes().leak(); // 100 KB: two parts
    let entries = [
        E(T0 + 10, "a.service", 6, b"plain"),
        E(T0 + 11, "a.service", 3, b"two\nlines"),
        E(T0 + 11, "b.service", 4, b"same microsecond \xff\xfe binary"),
        E(T0 + 11, "b.service", 0, "unicode ✓ 😀 \\x41".as_bytes()),
        E(T0 + 12, "c.service", 7, b"tab\there, escape \x1b[1m"),
        E(T0 + 13, "c.service", 5, long),
    ];
    // First start at the end: the seed entry is not shipped; all written after it are.
    let mut o = env.opts(Location::Files(vec![file.clone()]));
    o.max_batch_entries = 2;
    let w = file.clone();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        write_journal(&w, &entries[..]);
    });
    let got = env.read(o, 7);
    writer.join().unwrap();
    let m = msgs(&got);
    assert_eq!(m.len(), 7, "{m:?}");
    assert_eq!(m[0], b"plain");
    assert_eq!(m[1], b"two\nlines");
    assert_eq!(m[2], b"same microsecond \xff\xfe binary");
    assert!(got[2].escaped && !got[1].escaped);
    assert_eq!(m[3], "unicode ✓ 😀 \\x41".as_bytes());
    assert_eq!(m[4], b"tab\there, escape \x1b[1m");
    assert_eq!(
        [m[5].clone(), m[6].clone()].concat(),
        "é".repeat(50_000).into_bytes()
    );
    assert_eq!((got[5].part, got[6].part), (Some(1), Some(2)));
    let units: Vec<&str> = got.iter().map(|l| l.tags["unit"].as_str()).collect();
    assert_eq!(
        units,
        [
            "a.service",
            "a.service",
            "b.service",
            "b.service",
            "c.service",
            "c.service",
            "c.service"
        ]
    );
    let levels: Vec<&str> = got.iter().map(|l| l.tags["level"].as_str()).collect();
    assert_eq!(
        levels,
        ["info", "error", "warning", "critical", "debug", "info", "info"]
    );
    assert!(got.iter().all(|l| l.src == "journal"
        && l.fields["pid"] == Value::Int(4242)
        && l.fields["comm"] == Value::Str("app".into())));
    assert_eq!(got[1].fields["priority"], Value::Int(3));
    // The entries' own times; entries sharing a microsecond get nanosecond offsets.
    let ts: Vec<i64> = got.iter().map(|l| l.ts).collect();
    assert_eq!(
        ts,
        [
            (T0 + 10) * 1000,
            (T0 + 11) * 1000,
            (T0 + 11) * 1000 + 1,
            (T0 + 11) * 1000 + 2,
            (T0 + 12) * 1000,
            (T0 + 13) * 1000,
            (T0 + 13) * 1000 + 1
        ]
    );
    assert!(counters::journal_entries.load(Ordering::Relaxed) >= 6);
}

#[test]
fn restart_resumes_after_the_last_queued_entry() {
    let mut env = Env::new();
    let file = env.dir.join("j.journal");
    write_journal(&file, &[E(T0, "a.service", 6, b"old")]);
    let o = env.opts(Location::Files(vec![file.clone()]));
    // First start: nothing yet (at the end); the position is recorded at once.
    assert!(env.read(o.clone(), 0).is_empty());
    let acked: Checkpoint =
        serde_json::from_slice(&std::fs::read(env.state.join("journal.acked.json")).unwrap())
            .unwrap();
    assert!(acked.after.is_some());
    // Written while the agent was down: read on the next start, once.
    write_journal(
        &file,
        &(1..=50)
            .map(|i| E(T0 + i, "a.service", 6, b"down"))
            .collect::<Vec<_>>(),
    );
    let got = env.read(o.clone(), 50);
    assert_eq!(got.len(), 50);
    // Queued but never sent when the agent died: the next start must not read it again.
    write_journal(
        &file,
        &(51..=60)
            .map(|i| E(T0 + i, "a.service", 6, b"queued"))
            .collect::<Vec<_>>(),
    );
    let mut r = Reader::new(env.ctx(), o.clone()).unwrap();
    let spool = env.spool.clone();
    let t = std::thread::spawn(move || r.run());
    std::thread::sleep(Duration::from_millis(1500));
    spool.stop();
    t.join().ok();
    env.spool = Arc::new(Spool::open(&env.state.join("spool"), 64 << 20).unwrap());
    assert!(
        env.spool.pending_checkpoint(NAME).is_some(),
        "the queued batch is still in the spool"
    );
    write_journal(
        &file,
        &(61..=70)
            .map(|i| E(T0 + i, "a.service", 6, b"later"))
            .collect::<Vec<_>>(),
    );
    let got = env.read(o, 20);
    let m = msgs(&got);
    assert_eq!(m.len(), 20, "{m:?}");
    assert!(m[..10].iter().all(|x| x == b"queued") && m[10..].iter().all(|x| x == b"later"));
    let ts: Vec<i64> = got.iter().map(|l| l.ts).collect();
    assert_eq!(ts, (51..=70).map(|i| (T0 + i) * 1000).collect::<Vec<_>>());
}

#[test]
fn replaced_journal_is_a_counted_reset_and_reading_goes_on_from_its_oldest_entry() {
    let mut env = Env::new();
    let file = env.dir.join("j.journal");
    write_journal(&file, &[E(T0, "a.service", 6, b"seed")]);
    let o = env.opts(Location::Files(vec![file.clone()]));
    assert!(env.read(o.clone(), 0).is_empty());
    write_journal(&file, &[E(T0 + 1, "a.service", 6, b"one")]);
    assert_eq!(msgs(&env.read(o.clone(), 1)), [b"one"]);
    // Vacuumed and rewritten while the agent was down: the cursor's entry is gone.
    let before = counters::journal_cursor_resets.load(Ordering::Relaxed);
    let fresh = env.dir.join("fresh.journal");
    write_journal(
        &fresh,
        &[
            E(T0 - 5, "b.service", 6, b"new 1"),
            E(T0 - 4, "b.service", 6, b"new 2"),
        ],
    );
    std::fs::rename(&fresh, &file).unwrap();
    assert_eq!(msgs(&env.read(o.clone(), 2)), [&b"new 1"[..], b"new 2"]);
    assert!(counters::journal_cursor_resets.load(Ordering::Relaxed) > before);
    // And replaced under a running reader: noticed by its inode.
    let mut r = Reader::new(env.ctx(), o.clone()).unwrap();
    let t = std::thread::spawn(move || {
        let res = r.run();
        r.kill_child();
        res
    });
    std::thread::sleep(Duration::from_millis(500));
    let fresh = env.dir.join("fresh2.journal");
    write_journal(&fresh, &[E(T0 - 9, "c.service", 6, b"newer")]);
    std::fs::rename(&fresh, &file).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.is_empty() && Instant::now() < end {
        got.extend(env.drain_some());
    }
    env.spool.stop();
    t.join().ok();
    assert_eq!(msgs(&got), [b"newer"]);
}

#[test]
fn filters_by_unit_and_priority_and_first_start_at_boot() {
    let mut env = Env::new();
    let dir = env.dir.join("jd");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("a.journal");
    write_journal(
        &file,
        &[
            E(T0, "web.service", 6, b"boot web info"),
            E(T0 + 1, "web.service", 3, b"boot web err"),
            E(T0 + 2, "db.service", 3, b"boot db err"),
        ],
    );
    let mut o = env.opts(Location::Dir(dir.clone()));
    o.units = vec!["web.service".into()];
    o.max_priority = Some(parse_priority("warning").unwrap());
    o.from_boot = true;
    let got = env.read(o.clone(), 1);
    assert_eq!(msgs(&got), [b"boot web err"]);
    write_journal(
        &dir.join("b.journal"),
        &[
            E(T0 + 3, "web.service", 4, b"web warn"),
            E(T0 + 4, "web.service", 5, b"web notice"),
            E(T0 + 5, "db.service", 0, b"db emerg"),
        ],
    );
    assert_eq!(msgs(&env.read(o, 1)), [b"web warn"]);
}

#[test]
fn settings() {
    assert_eq!(parse_priority("err").unwrap(), 3);
    assert_eq!(parse_priority("7").unwrap(), 7);
    assert!(parse_priority("8").is_err());
    assert!(check_unit("nginx.service").is_ok());
    assert!(check_unit("user@1000.service").is_ok());
    assert!(check_unit("app-*.service").is_ok());
    assert!(check_unit("a b").is_err());
    assert!(check_unit("--all").is_err());
    assert!(check_unit("x;rm").is_err());
    assert!(valid_cursor("s=83f9;i=1;b=01;m=3e8;t=66148;x=c481"));
    assert!(!valid_cursor("s=1 --file=/etc/shadow"));
    assert!(parse_initial("boot").unwrap());
    assert!(parse_initial("start").is_err());
}

#[test]
fn the_first_entry_after_a_cursor_that_the_filters_exclude_is_not_skipped() {
    // journalctl --after-cursor would drop "web 1" here: the cursor's own entry (db) does not
    // match --unit, and the entries are already there when journalctl starts.
    let mut env = Env::new();
    let file = env.dir.join("j.journal");
    write_journal(&file, &[E(T0, "db.service", 6, b"db seed")]);
    let mut o = env.opts(Location::Files(vec![file.clone()]));
    o.units = vec!["web.service".into()];
    assert!(env.read(o.clone(), 0).is_empty());
    write_journal(
        &file,
        &[
            E(T0 + 1, "web.service", 6, b"web 1"),
            E(T0 + 2, "web.service", 6, b"web 2"),
            E(T0 + 3, "db.service", 6, b"db 3"),
        ],
    );
    assert_eq!(msgs(&env.read(o.clone(), 2)), [&b"web 1"[..], b"web 2"]);
    // And the last shipped entry (which matches) is not shipped again.
    write_journal(&file, &[E(T0 + 4, "web.service", 6, b"web 4")]);
    assert_eq!(msgs(&env.read(o, 1)), [b"web 4"]);
}
