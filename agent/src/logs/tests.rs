//! The tailer against real files and a real spool, drained the way the sender would.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phoenix_wire::{logtext, Identity, LogLine, MAX_FIELD_STRING};

use super::*;
use crate::spool::Spool;

struct Env {
    _dir: tempfile::TempDir,
    state: PathBuf,
    logs: PathBuf,
    spool: Arc<Spool>,
}

impl Env {
    fn new() -> Env {
        Env::with_spool_max(64 << 20)
    }

    fn with_spool_max(max: u64) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let logs = dir.path().join("logs");
        fs::create_dir_all(&logs).unwrap();
        let spool = Arc::new(Spool::open(&state.join("spool"), max).unwrap());
        Env {
            _dir: dir,
            state,
            logs,
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

    fn opts(&self, pattern: &str) -> Options {
        let mut o = Options::new(vec![format!("{}/{pattern}", self.logs.display())]);
        o.scan_every = Duration::ZERO;
        o.linger = Duration::ZERO;
        o.poll = Duration::from_millis(10);
        o.flush_timeout = Duration::from_millis(300);
        o.rotate_wait = Duration::ZERO;
        o.push_wait = Duration::from_millis(50);
        o
    }

    fn tailer(&self, o: Options) -> Tailer {
        Tailer::new(self.ctx(), o).unwrap()
    }

    /// Simulate a kill -9 of the agent: the spool is reopened from disk.
    fn restart_spool(&mut self) {
        self.spool = Arc::new(Spool::open(&self.state.join("spool"), 64 << 20).unwrap());
    }

    /// What the collector would receive: every spooled batch, acked (checkpoints promoted).
    fn drain(&self) -> Vec<LogLine> {
        let mut out = Vec::new();
        while let Some(e) = self.spool.oldest(Duration::ZERO) {
            let r =
                phoenix_wire::decode(&e.body, true, &phoenix_wire::Limits::default().any_time())
                    .unwrap();
            out.extend(r.logs);
            self.spool.ack(&e, &self.state).unwrap();
        }
        out
    }

    fn path(&self, name: &str) -> PathBuf {
        self.logs.join(name)
    }
}

fn append(path: &Path, data: &[u8]) {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
        .write_all(data)
        .unwrap();
}

fn write_lines(path: &Path, range: std::ops::Range<usize>) {
    let mut s = String::new();
    for i in range {
        s.push_str(&format!("line {i} \"quoted\", k=v\n"));
    }
    append(path, s.as_bytes());
}

/// Raw lines back from what was shipped, per src: parts joined, every timestamp checked to
/// increase strictly per src, offsets checked to be contiguous per file.
fn reassemble(lines: &[LogLine]) -> BTreeMap<String, Vec<Vec<u8>>> {
    let mut out: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    let mut last_ts: BTreeMap<&str, i64> = BTreeMap::new();
    for l in lines {
        let prev = last_ts.insert(&l.src, l.ts);
        assert!(
            prev.is_none_or(|p| p < l.ts),
            "timestamps of {} must increase strictly",
            l.src
        );
        assert!(
            l.msg.len() <= MAX_FIELD_STRING,
            "piece of {} bytes exceeds the field limit",
            l.msg.len()
        );
        let raw = logtext::decode(&l.msg, l.escaped);
        let v = out.entry(l.src.clone()).or_default();
        match l.part {
            Some(n) if n > 1 => v
                .last_mut()
                .expect("a continuation follows its first part")
                .extend_from_slice(&raw),
            _ => v.push(raw),
        }
    }
    out
}

fn numbered(lines: &[Vec<u8>]) -> Vec<usize> {
    lines
        .iter()
        .map(|l| {
            let s = std::str::from_utf8(l).unwrap();
            s.split(' ').nth(1).unwrap().parse().unwrap()
        })
        .collect()
}

fn src(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn nasty_lines_round_trip() {
    let env = Env::new();
    let p = env.path("app.log");
    File::create(&p).unwrap();
    let mut t = env.tailer(env.opts("*.log"));
    let big = "x".repeat(100 << 10);
    // Longer than the largest read buffer: cut while being read, still whole at the end.
    let huge: String = "é😀abc".repeat((3 << 20) / 9);
    let mut expect: Vec<Vec<u8>> = vec![
        b"he said \"hi\", a=b, c=\"d e\"".to_vec(),
        b"ends with a backslash \\".to_vec(),
        b"tab\there\tand CR\rinside".to_vec(),
        b"windows line\r".to_vec(),
        "emoji 😀 Zürich 東京".as_bytes().to_vec(),
        b"invalid \xff\xfe utf-8 and \\x41 lookalike".to_vec(),
        b"".to_vec(),
        b"measurement,tag=1 field=\"x\" 123".to_vec(),
        big.into_bytes(),
        huge.into_bytes(),
        b"after the big ones".to_vec(),
    ];
    let mut file = Vec::new();
    for l in &expect {
        file.extend_from_slice(l);
        file.push(b'\n');
    }
    append(&p, &file);
    for _ in 0..3 {
        t.step(Instant::now()).unwrap();
    }
    let shipped = env.drain();
    let got = reassemble(&shipped);
    assert_eq!(got.len(), 1);
    let got = &got[&src(&p)];
    assert_eq!(got.len(), expect.len());
    for (g, e) in got.iter().zip(&expect) {
        assert!(
            g == e,
            "line of {} bytes came back as {} bytes",
            e.len(),
            g.len()
        );
    }
    // The offset of each first piece is where its line starts in the file.
    let starts: Vec<u64> = shipped
        .iter()
        .filter(|l| l.part.is_none_or(|n| n == 1))
        .map(|l| l.offset)
        .collect();
    let mut off = 0u64;
    let want: Vec<u64> = expect
        .drain(..)
        .map(|l| {
            let o = off;
            off += l.len() as u64 + 1;
            o
        })
        .collect();
    assert_eq!(starts, want);
    assert!(
        shipped.iter().any(|l| l.escaped),
        "invalid UTF-8 travels escaped"
    );
    assert!(
        shipped.iter().filter(|l| l.part.is_some()).count() >= 2 + 3 * 4,
        "the long lines were split into parts"
    );
}

#[test]
fn first_start_begins_at_the_end_and_later_files_at_their_start() {
    let env = Env::new();
    let a = env.path("a.log");
    append(&a, b"old 1\nold 2\nhalf wr");
    let mut t = env.tailer(env.opts("*.log"));
    t.step(Instant::now()).unwrap();
    assert!(
        env.drain().is_empty(),
        "existing lines are history on the very first start"
    );
    append(&a, b"itten\nnew 1\n");
    let b = env.path("b.log");
    append(&b, b"b 1\n");
    t.step(Instant::now()).unwrap();
    let got = reassemble(&env.drain());
    assert_eq!(
        got[&src(&a)],
        vec![b"half written".to_vec(), b"new 1".to_vec()],
        "a line being written at start is read whole"
    );
    assert_eq!(
        got[&src(&b)],
        vec![b"b 1".to_vec()],
        "a file appearing later is read from its start"
    );
    drop(t);

    // While the agent is down: more lines, and a new file. Neither may be skipped.
    append(&a, b"while down\n");
    let c = env.path("c.log");
    append(&c, b"c 1\nc 2\n");
    let mut t = env.tailer(env.opts("*.log"));
    t.step(Instant::now()).unwrap();
    let got = reassemble(&env.drain());
    assert_eq!(got[&src(&a)], vec![b"while down".to_vec()]);
    assert_eq!(got[&src(&c)], vec![b"c 1".to_vec(), b"c 2".to_vec()]);
    assert!(!got.contains_key(&src(&b)));
}

#[test]
fn first_start_can_read_from_the_start() {
    let env = Env::new();
    let a = env.path("a.log");
    append(&a, b"old 1\nold 2\n");
    let mut o = env.opts("a.log");
    o.from_start = true;
    let mut t = env.tailer(o);
    t.step(Instant::now()).unwrap();
    assert_eq!(
        reassemble(&env.drain())[&src(&a)],
        vec![b"old 1".to_vec(), b"old 2".to_vec()]
    );
}

#[test]
fn a_first_start_without_lines_still_counts_as_the_first() {
    let env = Env::new();
    let a = env.path("a.log");
    append(&a, b"history\n");
    let t = env.tailer(env.opts("a.log"));
    drop(t);
    append(&a, b"written while the agent was down\n");
    let mut t = env.tailer(env.opts("a.log"));
    t.step(Instant::now()).unwrap();
    assert_eq!(
        reassemble(&env.drain())[&src(&a)],
        vec![b"written while the agent was down".to_vec()]
    );
}

#[test]
fn rename_and_create_rotation_loses_nothing() {
    let env = Env::new();
    let a = env.path("app.log");
    File::create(&a).unwrap();
    let mut o = env.opts("app.log");
    o.rotate_wait = Duration::from_secs(10);
    let mut t = env.tailer(o);
    let rotated_before = counters::files_rotated.load(Ordering::Relaxed);
    write_lines(&a, 0..1000);
    t.step(Instant::now()).unwrap();
    // The writer still holds the old file open after the rename and appends to it.
    let mut old = OpenOptions::new().append(true).open(&a).unwrap();
    fs::rename(&a, env.path("app.log.1")).unwrap();
    let text = |r: std::ops::Range<usize>| {
        r.map(|i| format!("line {i} \"quoted\", k=v\n"))
            .collect::<String>()
    };
    old.write_all(text(1000..1500).as_bytes()).unwrap();
    t.step(Instant::now()).unwrap();
    write_lines(&a, 1500..2000);
    // Late lines through the old descriptor, before the writer reopens.
    old.write_all(text(2000..2100).as_bytes()).unwrap();
    t.step(Instant::now()).unwrap();
    t.step(Instant::now()).unwrap();
    let got = reassemble(&env.drain());
    let mut nums = numbered(&got[&src(&a)]);
    assert_eq!(
        nums[..1500],
        (0..1500).collect::<Vec<_>>()[..],
        "the old file is read to its end first"
    );
    nums.sort();
    assert!(
        nums == (0..2100).collect::<Vec<_>>(),
        "every line exactly once: got {} lines",
        nums.len()
    );
    assert!(counters::files_rotated.load(Ordering::Relaxed) > rotated_before);
    assert_eq!(
        t.files.len(),
        2,
        "the rotated file stays open while its writer may still append"
    );
    t.step(Instant::now() + Duration::from_secs(11)).unwrap();
    assert_eq!(
        t.files.len(),
        1,
        "the rotated file was read to its end and forgotten"
    );
    assert_eq!(t.checkpoint().files.len(), 1);
}

#[test]
fn rotation_while_the_agent_is_down_reads_the_old_file_to_its_end() {
    let mut env = Env::new();
    let a = env.path("app.log");
    File::create(&a).unwrap();
    let mut t = env.tailer(env.opts("app.log"));
    write_lines(&a, 0..10);
    t.step(Instant::now()).unwrap();
    drop(t);
    env.restart_spool();
    write_lines(&a, 10..20);
    fs::rename(&a, env.path("app.log.1")).unwrap();
    write_lines(&a, 20..30);
    let mut t = env.tailer(env.opts("app.log"));
    t.step(Instant::now()).unwrap();
    t.step(Instant::now()).unwrap();
    let got = reassemble(&env.drain());
    assert_eq!(numbered(&got[&src(&a)]), (0..30).collect::<Vec<_>>());
}

fn copytruncate(path: &Path, copy: &Path) {
    fs::copy(path, copy).unwrap();
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(0)
        .unwrap();
}

#[test]
fn copytruncate_is_detected_and_the_copy_read_to_its_end() {
    let mut env = Env::new();
    let a = env.path("app.log");
    File::create(&a).unwrap();
    let mut t = env.tailer(env.opts("app.log"));
    let before = counters::files_truncated.load(Ordering::Relaxed);
    write_lines(&a, 0..100);
    t.step(Instant::now()).unwrap();
    // Lines 100..150 are written but not read when the file is copied and truncated: they
    // are only in the copy now.
    write_lines(&a, 100..150);
    copytruncate(&a, &env.path("app.log.1"));
    write_lines(&a, 150..160);
    t.step(Instant::now()).unwrap();
    t.step(Instant::now()).unwrap();
    // Truncated and written past the old offset before the tailer looked: the head tells.
    copytruncate(&a, &env.path("app.log.2"));
    write_lines(&a, 1000..1200);
    t.step(Instant::now()).unwrap();
    let got = reassemble(&env.drain());
    let want: Vec<usize> = (0..160).chain(1000..1200).collect();
    assert_eq!(numbered(&got[&src(&a)]), want);
    assert!(counters::files_truncated.load(Ordering::Relaxed) >= before + 2);
    assert_eq!(
        t.files.len(),
        1,
        "the copies were read to their end and let go"
    );

    // The same while the agent is down.
    drop(t);
    env.restart_spool();
    write_lines(&a, 1200..1300);
    copytruncate(&a, &env.path("app.log.3"));
    write_lines(&a, 2000..2010);
    let mut t = env.tailer(env.opts("app.log"));
    t.step(Instant::now()).unwrap();
    t.step(Instant::now()).unwrap();
    let got = reassemble(&env.drain());
    assert_eq!(
        numbered(&got[&src(&a)]),
        (1200..1300).chain(2000..2010).collect::<Vec<_>>()
    );
}

#[test]
fn copytruncate_refilled_to_the_size_last_seen_is_still_caught() {
    // An unchanged size is no proof of an unchanged file: fixed-width lines written after a
    // copytruncate can bring it back to exactly the size the tailer last saw. Read from the
    // old offset, that is the middle of another line; the head must be compared anyway.
    let env = Env::new();
    let a = env.path("app.log");
    File::create(&a).unwrap();
    let mut t = env.tailer(env.opts("app.log"));
    write_lines(&a, 100..150);
    // No newline yet: the offset stops before this line, 16 bytes short of the size seen.
    append(&a, b"line 150 unfinis");
    t.step(Instant::now()).unwrap();
    let seen = fs::metadata(&a).unwrap().len();
    append(&a, b"hed\n");
    copytruncate(&a, &env.path("app.log.1"));
    // Other lines, exactly `seen` bytes, so the old offset falls inside the last of them.
    let mut b: Vec<Vec<u8>> = (200..210)
        .map(|i| format!("line {i} second file\n").into_bytes())
        .collect();
    let used: usize = b.iter().map(Vec::len).sum();
    let mut last = b"line 210 ".to_vec();
    last.resize(seen as usize - used - 1, b'y');
    last.push(b'\n');
    b.push(last);
    append(&a, &b.concat());
    assert_eq!(fs::metadata(&a).unwrap().len(), seen);
    t.step(Instant::now()).unwrap();
    t.step(Instant::now()).unwrap();
    let got = reassemble(&env.drain());
    let mut want: Vec<Vec<u8>> = (100..150)
        .map(|i| format!("line {i} \"quoted\", k=v").into_bytes())
        .collect();
    want.push(b"line 150 unfinished".to_vec());
    want.extend(b.iter().map(|l| l[..l.len() - 1].to_vec()));
    let text = |v: &[Vec<u8>]| -> Vec<String> {
        v.iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect()
    };
    assert_eq!(text(&got[&src(&a)]), text(&want));
}

#[test]
fn partial_line_waits_for_its_newline_then_flushes() {
    let env = Env::new();
    let a = env.path("app.log");
    File::create(&a).unwrap();
    let mut t = env.tailer(env.opts("app.log"));
    append(&a, b"abc");
    t.step(Instant::now()).unwrap();
    assert!(env.drain().is_empty(), "a line without its newline waits");
    append(&a, b"def\n");
    t.step(Instant::now()).unwrap();
    assert_eq!(reassemble(&env.drain())[&src(&a)], vec![b"abcdef".to_vec()]);

    append(&a, b"xyz");
    t.step(Instant::now()).unwrap();
    std::thread::sleep(Duration::from_millis(350));
    t.step(Instant::now()).unwrap();
    let first = env.drain();
    assert_eq!(
        reassemble(&first)[&src(&a)],
        vec![b"xyz".to_vec()],
        "shipped after the flush timeout"
    );
    assert_eq!((first[0].offset, first[0].part), (7, Some(1)));
    append(&a, b"123\nnext\n");
    t.step(Instant::now()).unwrap();
    let rest = env.drain();
    assert_eq!(
        (rest[0].msg.as_str(), rest[0].offset, rest[0].part),
        ("123", 10, Some(2)),
        "the rest of a line split by a pause is its part 2, right after part 1"
    );
    let both: Vec<LogLine> = first.into_iter().chain(rest).collect();
    assert_eq!(
        reassemble(&both)[&src(&a)],
        vec![b"xyz123".to_vec(), b"next".to_vec()],
        "the parts join into the line that was written; nothing twice"
    );
}

#[test]
fn restart_resumes_from_the_spooled_checkpoint_then_the_acked_one() {
    let mut env = Env::new();
    let a = env.path("app.log");
    File::create(&a).unwrap();
    let mut t = env.tailer(env.opts("app.log"));
    write_lines(&a, 0..10);
    t.step(Instant::now()).unwrap();
    // Killed with the batch queued but not sent: the spool's checkpoint wins.
    drop(t);
    env.restart_spool();
    write_lines(&a, 10..15);
    let mut t = env.tailer(env.opts("app.log"));
    t.step(Instant::now()).unwrap();
    let got = reassemble(&env.drain());
    assert_eq!(numbered(&got[&src(&a)]), (0..15).collect::<Vec<_>>());
    // All acked: the acked checkpoint wins.
    drop(t);
    env.restart_spool();
    write_lines(&a, 15..20);
    let mut t = env.tailer(env.opts("app.log"));
    t.step(Instant::now()).unwrap();
    let got = reassemble(&env.drain());
    assert_eq!(numbered(&got[&src(&a)]), (15..20).collect::<Vec<_>>());
    // Killed with lines read but not yet queued: they are read again, once.
    let mut o = env.opts("app.log");
    o.linger = Duration::from_secs(3600);
    let mut t2 = env.tailer(o);
    drop(t);
    write_lines(&a, 20..25);
    t2.step(Instant::now()).unwrap();
    assert!(env.drain().is_empty());
    drop(t2);
    let mut t = env.tailer(env.opts("app.log"));
    t.step(Instant::now()).unwrap();
    let got = reassemble(&env.drain());
    assert_eq!(numbered(&got[&src(&a)]), (20..25).collect::<Vec<_>>());
}

#[test]
fn full_spool_pauses_reading_and_loses_nothing() {
    let env = Env::with_spool_max(64 << 10);
    let a = env.path("app.log");
    File::create(&a).unwrap();
    let mut t = env.tailer(env.opts("app.log"));
    // Only log batches in the spool and it is full: the next push has to wait.
    let mut filler = env.ctx().report();
    filler.logs = (0..2000)
        .map(|i| LogLine {
            src: "/filler".into(),
            ts: i,
            offset: 0,
            msg: format!("{i:0>40}{}", i * 7919 % 104729),
            escaped: false,
            part: None,
            tags: Default::default(),
            fields: Default::default(),
        })
        .collect();
    while env.spool.bytes() < 60 << 10 {
        env.spool
            .push(Kind::Logs, filler.clone(), None, Duration::ZERO)
            .unwrap()
            .unwrap();
    }
    write_lines(&a, 0..3000);
    let waits = env.spool.stats.log_waits.load(Ordering::Relaxed);
    t.step(Instant::now()).unwrap();
    assert!(
        env.spool.stats.log_waits.load(Ordering::Relaxed) > waits,
        "the push waited for room"
    );
    assert!(
        t.batch.lines.is_empty(),
        "lines are not held in memory while the spool is full"
    );
    let _ = env.drain();
    for _ in 0..20 {
        t.step(Instant::now()).unwrap();
    }
    let got: Vec<LogLine> = env
        .drain()
        .into_iter()
        .filter(|l| l.src != "/filler")
        .collect();
    assert_eq!(
        numbered(&reassemble(&got)[&src(&a)]),
        (0..3000).collect::<Vec<_>>()
    );
}

#[test]
fn batches_are_bounded() {
    let env = Env::new();
    let a = env.path("app.log");
    File::create(&a).unwrap();
    let mut t = env.tailer(env.opts("app.log"));
    write_lines(&a, 0..12_000);
    t.step(Instant::now()).unwrap();
    let mut sizes = Vec::new();
    while let Some(e) = env.spool.oldest(Duration::ZERO) {
        sizes.push(
            phoenix_wire::decode(&e.body, true, &phoenix_wire::Limits::default().any_time())
                .unwrap()
                .logs
                .len(),
        );
        env.spool.ack(&e, &env.state).unwrap();
    }
    assert_eq!(sizes, vec![5000, 5000, 2000]);
}

#[test]
fn replaced_file_and_stale_checkpoint_read_from_the_start() {
    let mut env = Env::new();
    let a = env.path("app.log");
    File::create(&a).unwrap();
    let mut t = env.tailer(env.opts("app.log"));
    write_lines(&a, 0..100);
    t.step(Instant::now()).unwrap();
    let _ = env.drain();
    drop(t);
    env.restart_spool();
    // Deleted and created again, shorter: whether or not the inode is reused, the new file is
    // read whole.
    fs::remove_file(&a).unwrap();
    write_lines(&a, 500..503);
    let mut t = env.tailer(env.opts("app.log"));
    t.step(Instant::now()).unwrap();
    assert_eq!(
        numbered(&reassemble(&env.drain())[&src(&a)]),
        vec![500, 501, 502]
    );
    // Truncated while down and rewritten shorter with the same first bytes.
    drop(t);
    OpenOptions::new()
        .write(true)
        .open(&a)
        .unwrap()
        .set_len(0)
        .unwrap();
    write_lines(&a, 500..501);
    let mut t = env.tailer(env.opts("app.log"));
    t.step(Instant::now()).unwrap();
    assert_eq!(numbered(&reassemble(&env.drain())[&src(&a)]), vec![500]);
}

#[test]
fn checkpoint_names_every_file_with_its_identity() {
    let env = Env::new();
    let a = env.path("a.log");
    File::create(&a).unwrap();
    let mut t = env.tailer(env.opts("*.log"));
    append(&a, b"one\ntwo\n");
    t.step(Instant::now()).unwrap();
    let _ = env.drain();
    let c: Checkpoint =
        serde_json::from_slice(&fs::read(env.state.join("logs.acked.json")).unwrap()).unwrap();
    assert_eq!(c.files.len(), 1);
    assert_eq!(c.files[0].offset, 8);
    assert_eq!(c.files[0].head_len, 8);
    assert!(c.last_ts > 0);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(c.files[0].ino, fs::metadata(&a).unwrap().ino());
}

#[test]
fn char_boundary_never_splits_a_character() {
    assert_eq!(char_boundary(b"abc"), 3);
    assert_eq!(char_boundary("aé".as_bytes()), 3);
    assert_eq!(char_boundary(&"aé".as_bytes()[..2]), 1);
    assert_eq!(char_boundary(&"a😀".as_bytes()[..4]), 1);
    assert_eq!(char_boundary("a😀".as_bytes()), 5);
}

#[test]
fn a_quiet_round_queues_the_batch_without_waiting_for_linger() {
    let env = Env::new();
    let a = env.path("app.log");
    File::create(&a).unwrap();
    let mut o = env.opts("app.log");
    o.linger = Duration::from_secs(3600);
    let mut t = env.tailer(o);
    write_lines(&a, 0..10);
    t.step(Instant::now()).unwrap();
    assert_eq!(env.spool.len(), 0, "lines still arriving: gather more");
    t.step(Instant::now()).unwrap();
    assert_eq!(
        numbered(&reassemble(&env.drain())[&src(&a)]),
        (0..10).collect::<Vec<_>>()
    );
}

#[test]
fn the_source_thread_ships_and_stops() {
    let env = Env::new();
    let a = env.path("app.log");
    File::create(&a).unwrap();
    let mut o = env.opts("*.log");
    o.poll = Duration::from_millis(20);
    let ctx = env.ctx();
    let th = std::thread::spawn(move || Box::new(LogSource::new(o)).run(ctx));
    std::thread::sleep(Duration::from_millis(100));
    write_lines(&a, 0..100);
    write_lines(&env.path("b.log"), 0..5);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < 105 && Instant::now() < deadline {
        got.extend(env.drain());
        std::thread::sleep(Duration::from_millis(20));
    }
    env.spool.stop();
    th.join().unwrap().unwrap();
    let got = reassemble(&got);
    assert_eq!(numbered(&got[&src(&a)]), (0..100).collect::<Vec<_>>());
    assert_eq!(
        numbered(&got[&src(&env.path("b.log"))]),
        (0..5).collect::<Vec<_>>()
    );
}

/// Wait for inotify to say something changed (or `max`), then run one round; repeat until
/// `done` or the deadline. Returns whether `done` held.
fn step_on_events(
    t: &mut Tailer,
    env: &Env,
    max: Duration,
    mut done: impl FnMut(&Tailer) -> bool,
) -> bool {
    let deadline = Instant::now() + max;
    while Instant::now() < deadline {
        t.step(Instant::now()).unwrap();
        if done(t) {
            return true;
        }
        t.watch.wait(
            deadline.min(Instant::now() + Duration::from_millis(500)),
            &env.spool,
        );
    }
    done(t)
}

fn open_files(t: &Tailer) -> usize {
    t.files.iter().filter(|f| f.file.is_some()).count()
}

#[test]
fn many_files_over_the_open_file_budget_lose_nothing() {
    let mut env = Env::new();
    let n = 60;
    for i in 0..n {
        File::create(env.path(&format!("f{i:03}.log"))).unwrap();
    }
    let mut o = env.opts("*.log");
    o.max_open_files = 8;
    // No safety poll during the test: inotify alone has to find the writes.
    o.scan_every = Duration::from_secs(3600);
    let mut t = env.tailer(o.clone());
    t.step(Instant::now()).unwrap();
    assert_eq!(t.files.len(), n);
    assert!(open_files(&t) <= 8, "{} files open", open_files(&t));
    for i in 0..n {
        write_lines(&env.path(&format!("f{i:03}.log")), i..i + 1);
    }
    let mut got: Vec<LogLine> = Vec::new();
    let ok = step_on_events(&mut t, &env, Duration::from_secs(20), |t| {
        assert!(open_files(t) <= 8, "{} files open", open_files(t));
        got.extend(env.drain());
        got.len() >= n
    });
    assert!(ok, "only {} of {n} lines arrived", got.len());
    let by_src = reassemble(&got);
    for i in 0..n {
        assert_eq!(
            numbered(&by_src[&src(&env.path(&format!("f{i:03}.log")))]),
            vec![i]
        );
    }
    // Restart: every file keeps its place, open or not; a second line each, once.
    drop(t);
    env.restart_spool();
    for i in 0..n {
        write_lines(&env.path(&format!("f{i:03}.log")), 100 + i..101 + i);
    }
    let mut t = env.tailer(o);
    assert_eq!(t.files.len(), n, "no checkpointed file was forgotten");
    assert!(
        open_files(&t) <= 8,
        "resuming opened {} files at once",
        open_files(&t)
    );
    let mut got: Vec<LogLine> = Vec::new();
    let ok = step_on_events(&mut t, &env, Duration::from_secs(20), |_| {
        got.extend(env.drain());
        got.len() >= n
    });
    assert!(
        ok,
        "only {} of {n} lines arrived after the restart",
        got.len()
    );
    let by_src = reassemble(&got);
    for i in 0..n {
        assert_eq!(
            numbered(&by_src[&src(&env.path(&format!("f{i:03}.log")))]),
            vec![100 + i]
        );
    }
    assert!(open_files(&t) <= 8);
}

#[test]
fn a_closed_file_rotated_away_is_read_to_its_end() {
    let env = Env::new();
    let a = env.path("a.log");
    let b = env.path("b.log");
    File::create(&a).unwrap();
    File::create(&b).unwrap();
    let mut o = env.opts("*.log");
    o.max_open_files = 1;
    o.rotate_wait = Duration::from_secs(3600);
    let mut t = env.tailer(o);
    t.step(Instant::now()).unwrap();
    write_lines(&a, 0..5);
    write_lines(&b, 0..5);
    t.step(Instant::now()).unwrap();
    assert_eq!(open_files(&t), 1);
    let closed = t
        .files
        .iter()
        .find(|f| f.file.is_none())
        .unwrap()
        .loc
        .clone();
    // Lines written, then the closed file renamed away and a new one made in its place.
    write_lines(&closed, 5..10);
    fs::rename(&closed, env.path("rotated.1")).unwrap();
    write_lines(&closed, 10..12);
    for _ in 0..3 {
        t.step(Instant::now()).unwrap();
    }
    let got = reassemble(&env.drain());
    assert_eq!(numbered(&got[&src(&closed)]), (0..12).collect::<Vec<_>>());
}

#[test]
fn an_idle_tailer_sleeps_until_inotify_names_a_change() {
    let env = Env::new();
    let a = env.path("a.log");
    File::create(&a).unwrap();
    let mut o = env.opts("*.log");
    o.scan_every = Duration::from_secs(3600);
    let mut t = env.tailer(o);
    t.step(Instant::now()).unwrap();
    assert!(!t.step(Instant::now()).unwrap(), "nothing written: idle");
    let start = Instant::now();
    let stopped = t.watch.wait(start + Duration::from_secs(2), &env.spool);
    assert!(!stopped);
    assert!(
        start.elapsed() >= Duration::from_millis(1900),
        "woke with nothing written"
    );
    // A write, and a new file matching the glob, both wake it and are read.
    write_lines(&a, 0..3);
    write_lines(&env.path("new.log"), 0..2);
    let start = Instant::now();
    t.watch.wait(start + Duration::from_secs(30), &env.spool);
    assert!(start.elapsed() < Duration::from_secs(10), "inotify woke it");
    let mut got = Vec::new();
    let ok = step_on_events(&mut t, &env, Duration::from_secs(10), |_| {
        got.extend(env.drain());
        got.len() >= 5
    });
    assert!(ok, "got {} of 5 lines", got.len());
    let got = reassemble(&got);
    assert_eq!(numbered(&got[&src(&a)]), vec![0, 1, 2]);
    assert_eq!(numbered(&got[&src(&env.path("new.log"))]), vec![0, 1]);
}

#[test]
fn a_log_under_a_very_long_path_is_shipped_with_its_tag_cut() {
    let env = Env::new();
    let mut dir = env.logs.clone();
    while dir.as_os_str().len() < 1100 {
        dir.push("d".repeat(200));
    }
    fs::create_dir_all(&dir).unwrap();
    let long = dir.join("app.log");
    let short = env.path("app.log");
    File::create(&long).unwrap();
    File::create(&short).unwrap();
    let mut o = env.opts("app.log");
    o.patterns.push(long.to_string_lossy().into_owned());
    let mut t = env.tailer(o);
    write_lines(&long, 0..10);
    write_lines(&short, 0..10);
    t.step(Instant::now()).unwrap();
    t.step(Instant::now()).unwrap();
    // drain decodes with the collector's limits: a src over 1024 bytes would fail here.
    let got = env.drain();
    let tag = phoenix_wire::cut_value(&src(&long));
    assert!(tag.len() <= 1024 && tag.contains('…'));
    let got = reassemble(&got);
    assert_eq!(numbered(&got[&tag]), (0..10).collect::<Vec<_>>());
    assert_eq!(numbered(&got[&src(&short)]), (0..10).collect::<Vec<_>>());
    // The checkpoint keeps the whole path, so the file is found again.
    assert_eq!(
        t.checkpoint()
            .files
            .iter()
            .filter(|f| f.src == src(&long))
            .count(),
        1
    );
}

#[test]
fn a_missing_path_is_noted_and_picked_up_when_it_appears() {
    let env = Env::new();
    let a = env.path("later/app.log");
    let mut t = env.tailer(Options {
        scan_every: Duration::ZERO,
        ..env.opts("later/app.log")
    });
    t.step(Instant::now()).unwrap();
    assert!(t.missing.contains(&src(&a)), "warned about once");
    let looped = env.path("loop.log");
    std::os::unix::fs::symlink(&looped, &looped).unwrap();
    let mut o = env.opts("loop.log");
    o.patterns.push(src(&a));
    let mut t2 = env.tailer(o);
    t2.step(Instant::now()).unwrap();
    assert!(
        t2.warned.contains(&looped),
        "a symlink loop is warned about"
    );
    drop(t2);
    fs::create_dir_all(a.parent().unwrap()).unwrap();
    write_lines(&a, 0..3);
    t.step(Instant::now()).unwrap();
    t.step(Instant::now()).unwrap();
    assert!(!t.missing.contains(&src(&a)));
    assert_eq!(numbered(&reassemble(&env.drain())[&src(&a)]), vec![0, 1, 2]);
}

#[test]
fn a_rotation_is_seen_by_inotify_without_the_safety_poll() {
    let env = Env::new();
    let a = env.path("app.log");
    File::create(&a).unwrap();
    let mut o = env.opts("*.log");
    o.scan_every = Duration::from_secs(3600);
    o.rotate_wait = Duration::from_secs(3600);
    let mut t = env.tailer(o);
    t.step(Instant::now()).unwrap();
    write_lines(&a, 0..5);
    fs::rename(&a, env.path("app.log.1")).unwrap();
    write_lines(&a, 5..10);
    let mut got = Vec::new();
    let ok = step_on_events(&mut t, &env, Duration::from_secs(10), |_| {
        got.extend(env.drain());
        got.len() >= 10
    });
    assert!(ok, "got {} of 10 lines: {:?}", got.len(), t.files);
    assert_eq!(
        numbered(&reassemble(&got)[&src(&a)]),
        (0..10).collect::<Vec<_>>()
    );
}
