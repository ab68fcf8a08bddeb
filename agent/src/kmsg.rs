//! Kernel messages from /dev/kmsg, read only: each record ships as a `log` line with
//! `src=kernel` and a `level` tag, and OOM kills, segfaults and hung tasks are counted for the
//! `phoenix_kernel` point the metrics loop sends every interval.
//!
//! At the very first start on a box the reader starts at the end of the kernel's buffer (old
//! boot noise is not news). After that it resumes from its checkpoint: the boot id and the
//! sequence number of the last record shipped, promoted to `kmsg.acked.json` only when the
//! collector acked the batch. A checkpoint from another boot means the whole buffer of this
//! boot is new. The counters travel in the checkpoint too, so a restart does not reset them.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use phoenix_wire::{LogLine, Map, Point, Value};
use serde::{Deserialize, Serialize};

use crate::source::{Ctx, Source};
use crate::spool::Kind;

/// The source name: the checkpoint lives in `<state-dir>/kmsg.acked.json`.
pub const NAME: &str = "kmsg";
/// Most records in one batch.
const MAX_BATCH: usize = 2000;

static RUNNING: AtomicBool = AtomicBool::new(false);
static OOM_KILLS: AtomicU64 = AtomicU64::new(0);
static SEGFAULTS: AtomicU64 = AtomicU64::new(0);
static HUNG_TASKS: AtomicU64 = AtomicU64::new(0);
static LOST: AtomicU64 = AtomicU64::new(0);

/// The `phoenix_kernel` point, when the kmsg source runs in this process.
pub fn kernel_point(ts: i64) -> Option<Point> {
    if !RUNNING.load(Ordering::Relaxed) {
        return None;
    }
    let f = |a: &AtomicU64| Value::Int(a.load(Ordering::Relaxed).min(i64::MAX as u64) as i64);
    Some(Point {
        m: "phoenix_kernel".into(),
        tags: Map::new(),
        fields: Map::from([
            ("oom_kills".to_string(), f(&OOM_KILLS)),
            ("segfaults".to_string(), f(&SEGFAULTS)),
            ("hung_tasks".to_string(), f(&HUNG_TASKS)),
            ("lost_records".to_string(), f(&LOST)),
        ]),
        ts,
    })
}

/// What kind of event a kernel message is, if it is one we count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    OomKill,
    Segfault,
    HungTask,
}

fn classify(msg: &str) -> Option<Event> {
    // "Out of memory: Killed process 4242 (x) ..." and the cgroup form
    // "Memory cgroup out of memory: Killed process ...".
    let lower = msg.to_ascii_lowercase();
    if lower.contains("out of memory: kill") {
        Some(Event::OomKill)
    } else if lower.contains(" segfault at ") {
        Some(Event::Segfault)
    } else if lower.contains("blocked for more than") && lower.contains("task ") {
        Some(Event::HungTask)
    } else {
        None
    }
}

/// Counted events so far this boot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub oom_kills: u64,
    pub segfaults: u64,
    pub hung_tasks: u64,
}

impl Counts {
    fn add(&mut self, e: Event) {
        match e {
            Event::OomKill => self.oom_kills += 1,
            Event::Segfault => self.segfaults += 1,
            Event::HungTask => self.hung_tasks += 1,
        }
    }

    fn publish(&self) {
        OOM_KILLS.store(self.oom_kills, Ordering::Relaxed);
        SEGFAULTS.store(self.segfaults, Ordering::Relaxed);
        HUNG_TASKS.store(self.hung_tasks, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub boot_id: String,
    /// Sequence number of the last record shipped.
    pub seq: u64,
    #[serde(default)]
    pub counts: Counts,
}

/// One /dev/kmsg record: `prio,seq,usec,flags[,...];text` then `\n KEY=value` lines.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Record {
    pub(crate) level: u8,
    pub(crate) facility: u8,
    pub(crate) seq: u64,
    pub(crate) usec: u64,
    pub(crate) text: String,
}

/// Split a read into records: a record starts on a line that does not begin with a space.
pub(crate) fn records(b: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = b;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = 0;
        loop {
            match rest[end..].iter().position(|&c| c == b'\n') {
                Some(i) => {
                    end += i + 1;
                    if rest.get(end).is_none_or(|&c| c != b' ') {
                        break;
                    }
                }
                None => {
                    end = rest.len();
                    break;
                }
            }
        }
        let (r, tail) = rest.split_at(end);
        rest = tail;
        Some(r)
    })
}

pub(crate) fn parse_record(b: &[u8]) -> Option<Record> {
    let s = String::from_utf8_lossy(b);
    let (head, rest) = s.split_once(';')?;
    let mut h = head.split(',');
    let prio: u32 = h.next()?.parse().ok()?;
    let seq = h.next()?.parse().ok()?;
    let usec = h.next()?.parse().ok()?;
    // Dictionary lines (" SUBSYSTEM=...") follow the text; they are not part of the message.
    let text = rest.split('\n').next().unwrap_or("").to_string();
    Some(Record {
        level: (prio & 7) as u8,
        facility: (prio >> 3).min(255) as u8,
        seq,
        usec,
        text,
    })
}

#[derive(Debug, Clone)]
pub struct KmsgSource {
    pub path: PathBuf,
    /// Where the boot id is read; a checkpoint of another boot means "all of this boot is new".
    pub boot_id_path: PathBuf,
}

impl KmsgSource {
    pub fn new(path: impl Into<PathBuf>) -> KmsgSource {
        KmsgSource {
            path: path.into(),
            boot_id_path: "/proc/sys/kernel/random/boot_id".into(),
        }
    }

    fn checkpoint(&self, ctx: &Ctx) -> anyhow::Result<Option<Checkpoint>> {
        if let Some(v) = ctx.spool.pending_checkpoint(NAME) {
            return Ok(serde_json::from_value(v).ok());
        }
        let p = ctx.state_dir.join(format!("{NAME}.acked.json"));
        match std::fs::read(&p) {
            Ok(b) => Ok(serde_json::from_slice(&b).ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }
}

impl Source for KmsgSource {
    fn name(&self) -> &'static str {
        NAME
    }

    fn run(self: Box<Self>, ctx: Ctx) -> anyhow::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.path)
            .with_context(|| {
                format!(
                    "opening {} for kernel messages (run as root or with CAP_SYSLOG, or pass --kmsg off)",
                    self.path.display()
                )
            })?;
        let is_device = {
            use std::os::unix::fs::FileTypeExt;
            f.metadata().is_ok_and(|m| m.file_type().is_char_device())
        };
        let boot_id = std::fs::read_to_string(&self.boot_id_path)
            .unwrap_or_default()
            .trim()
            .to_string();
        let (mut last_seq, mut counts) = match self.checkpoint(&ctx)? {
            Some(c) if c.boot_id == boot_id => (Some(c.seq), c.counts),
            Some(_) => (None, Counts::default()),
            None => {
                // First start on this box: from the end of the buffer.
                // SAFETY: lseek on a descriptor we own.
                if unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_END) } < 0 {
                    tracing::warn!(error = %std::io::Error::last_os_error(), "cannot seek to the end of kmsg; reading the whole buffer");
                }
                (None, Counts::default())
            }
        };
        counts.publish();
        RUNNING.store(true, Ordering::Relaxed);
        tracing::info!(path = %self.path.display(), resume_after = ?last_seq, "reading kernel messages");
        let stop = StopFd::new(&ctx);
        let mut buf = vec![0u8; 16 * 1024];
        let mut last_ts = 0i64;
        loop {
            let mut lines = Vec::new();
            let started = Instant::now();
            // Gather what the kernel has now, and whatever follows within a short linger, so a
            // burst of messages is one batch rather than hundreds.
            loop {
                match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        // The device gives one record per read; a plain file (tests) may give
                        // several, one a line, with the device's " KEY=value" lines after each.
                        for chunk in records(&buf[..n]) {
                            let Some(r) = parse_record(chunk) else {
                                continue;
                            };
                            if last_seq.is_some_and(|s| r.seq <= s) {
                                continue;
                            }
                            if let Some(s) = last_seq {
                                if r.seq > s + 1 {
                                    LOST.fetch_add(r.seq - s - 1, Ordering::Relaxed);
                                }
                            }
                            last_seq = Some(r.seq);
                            if let Some(e) = classify(&r.text) {
                                counts.add(e);
                            }
                            let ts = wall_ns(r.usec).max(last_ts + 1);
                            last_ts = ts;
                            lines.push(log_line(&r, ts));
                        }
                        if lines.len() >= MAX_BATCH {
                            break;
                        }
                    }
                    // The kernel overwrote records we had not read yet; the next read goes on
                    // from the oldest one still there, and the seq gap is counted above.
                    Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if lines.is_empty() || started.elapsed() > Duration::from_millis(200) {
                            break;
                        }
                        if ctx.sleep(Duration::from_millis(50)) {
                            break;
                        }
                    }
                    Err(e) => return Err(e).context("reading kernel messages"),
                }
            }
            if !lines.is_empty() {
                counts.publish();
                let mut report = ctx.report();
                report.logs = lines;
                let ck = Checkpoint {
                    boot_id: boot_id.clone(),
                    seq: last_seq.unwrap_or(0),
                    counts,
                };
                let ck = serde_json::to_value(&ck).context("checkpoint as JSON")?;
                match ctx.spool.push(
                    Kind::Logs,
                    report,
                    Some((NAME.into(), ck)),
                    Duration::from_secs(3600),
                ) {
                    Ok(Some(_)) => {}
                    Ok(None) => tracing::warn!("spool full for an hour; kernel lines dropped"),
                    Err(crate::spool::SpoolError::Stopping) => return Ok(()),
                    Err(e) => tracing::error!(error = %e, "could not queue kernel lines"),
                }
            }
            if ctx.spool.stopping() || wait_readable(&f, stop.as_ref(), &ctx) {
                return Ok(());
            }
            // A plain file always polls readable: pace it instead.
            if !is_device && ctx.sleep(Duration::from_millis(200)) {
                return Ok(());
            }
        }
    }
}

/// An eventfd the spool's stop makes readable, so the wait for a kernel record needs no
/// timeout to notice the agent stopping.
struct StopFd(std::os::fd::OwnedFd);

impl StopFd {
    fn new(ctx: &Ctx) -> Option<std::sync::Arc<StopFd>> {
        use std::os::fd::FromRawFd;
        // SAFETY: eventfd takes no pointers; a non-negative result is a descriptor we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return None; // the wait falls back to its timeout
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let s = std::sync::Arc::new(StopFd(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }));
        let w = s.clone();
        ctx.spool.on_stop(NAME, move || {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to a descriptor `w` keeps open.
            unsafe { libc::write(w.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
        });
        Some(s)
    }
}

/// Longest a wait for a kernel record lasts without the stop eventfd (a backstop only).
const WAIT_MS: libc::c_int = 60_000;

/// Wait until the device has a record or the agent stops (true).
fn wait_readable(f: &std::fs::File, stop: Option<&std::sync::Arc<StopFd>>, ctx: &Ctx) -> bool {
    let mut p = [
        libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.map_or(-1, |s| s.0.as_raw_fd()),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // Without the eventfd, a short timeout keeps a stop noticed within a second.
    let timeout = if stop.is_some() { WAIT_MS } else { 1000 };
    // SAFETY: two pollfds we own (a negative fd is ignored by poll).
    let n = unsafe { libc::poll(p.as_mut_ptr(), 2, timeout) };
    if n < 0 {
        // EINTR and friends: do not spin.
        return ctx.sleep(Duration::from_millis(200));
    }
    ctx.spool.stopping()
}

fn log_line(r: &Record, ts: i64) -> LogLine {
    let level = phoenix_wire::logtext::level_of_priority(r.level);
    LogLine {
        src: "kernel".into(),
        ts,
        offset: 0,
        msg: phoenix_wire::cut_to(&r.text, phoenix_wire::MAX_FIELD_STRING),
        escaped: false,
        part: None,
        tags: Map::from([
            ("src".to_string(), "kernel".to_string()),
            ("level".to_string(), level.to_string()),
        ]),
        fields: Map::from([
            (
                "seq".to_string(),
                Value::Int(r.seq.min(i64::MAX as u64) as i64),
            ),
            ("priority".to_string(), Value::Int(r.level as i64)),
            ("facility".to_string(), Value::Int(r.facility as i64)),
        ]),
    }
}

/// A record's time since boot (the kernel's monotonic clock) as Unix nanoseconds.
fn wall_ns(usec: u64) -> i64 {
    let mut mono = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut mono) };
    let mono_ns = mono.tv_sec * 1_000_000_000 + mono.tv_nsec;
    let now = crate::metrics::now_ns();
    now - mono_ns + (usec.min(i64::MAX as u64 / 1000) as i64) * 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_events() {
        let r = parse_record(
            b"3,812,5000000,-;Out of memory: Killed process 4242 (x) total-vm:1kB\n SUBSYSTEM=x\n",
        )
        .unwrap();
        assert_eq!((r.level, r.facility, r.seq, r.usec), (3, 0, 812, 5_000_000));
        assert_eq!(
            r.text,
            "Out of memory: Killed process 4242 (x) total-vm:1kB"
        );
        assert_eq!(classify(&r.text), Some(Event::OomKill));
        assert_eq!(
            classify("Memory cgroup out of memory: Killed process 9 (y)"),
            Some(Event::OomKill)
        );
        assert_eq!(
            classify("a.out[77]: segfault at 0 ip 0000 sp 0000 error 4 in a.out"),
            Some(Event::Segfault)
        );
        assert_eq!(
            classify("INFO: task kworker:12 blocked for more than 120 seconds."),
            Some(Event::HungTask)
        );
        assert_eq!(classify("eth0: link up"), None);
        let user = parse_record(b"11,9,1,-;hello").unwrap();
        assert_eq!((user.level, user.facility), (3, 1));
        assert!(parse_record(b"garbage").is_none());
        let l = log_line(&r, 5);
        assert_eq!(l.tags["level"], "error");
        assert_eq!(l.src, "kernel");
    }

    /// The source over a plain file: starts at its end, ships what is appended with a
    /// checkpoint, and after a restart (checkpoint acked) ships only what is new.
    #[test]
    fn from_the_end_then_from_the_checkpoint() {
        use std::io::Write;
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let spool = Arc::new(crate::spool::Spool::open(&state.join("spool"), 1 << 20).unwrap());
        let ctx = Ctx {
            identity: Arc::new(phoenix_wire::Identity {
                instance_id: "i-1".into(),
                image_id: "img-1".into(),
                hostname: "h".into(),
                ..Default::default()
            }),
            spool: spool.clone(),
            state_dir: state.clone(),
            interval: Duration::from_secs(1),
            drift_link: Default::default(),
        };
        let dev = dir.path().join("kmsg");
        let boot = dir.path().join("boot_id");
        std::fs::write(&boot, "b1\n").unwrap();
        std::fs::write(&dev, "6,1,10,-;old news\n").unwrap();
        let start = |ctx: Ctx| {
            let mut s = KmsgSource::new(&dev);
            s.boot_id_path = boot.clone();
            std::thread::spawn(move || Box::new(s).run(ctx))
        };
        let t = start(ctx.clone());
        let append = |text: &str| {
            let mut f = std::fs::OpenOptions::new().append(true).open(&dev).unwrap();
            f.write_all(text.as_bytes()).unwrap();
        };
        // Give the reader time to open and seek, then append.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !RUNNING.load(Ordering::Relaxed) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        append("3,2,20,-;Out of memory: Killed process 4242 (x) total-vm:1kB\n SUBSYSTEM=mem\n4,3,30,-;x[1]: segfault at 0 ip 0 sp 0 error 4\n");
        let e = spool.oldest(Duration::from_secs(5)).expect("a batch");
        let r = phoenix_wire::decode(&e.body, true, &Default::default()).unwrap();
        let msgs: Vec<&str> = r.logs.iter().map(|l| l.msg.as_str()).collect();
        assert_eq!(
            msgs,
            [
                "Out of memory: Killed process 4242 (x) total-vm:1kB",
                "x[1]: segfault at 0 ip 0 sp 0 error 4"
            ],
            "from the end: the old line is not shipped"
        );
        assert!(r.logs[0].ts < r.logs[1].ts);
        assert_eq!(OOM_KILLS.load(Ordering::Relaxed), 1);
        spool.ack(&e, &state).unwrap();
        spool.stop();
        t.join().unwrap().unwrap();

        let spool = Arc::new(crate::spool::Spool::open(&state.join("spool"), 1 << 20).unwrap());
        let ctx = Ctx {
            spool: spool.clone(),
            ..ctx
        };
        append("3,4,40,-;Out of memory: Killed process 5 (y)\n");
        let t = start(ctx);
        let e = spool.oldest(Duration::from_secs(5)).expect("a batch");
        let r = phoenix_wire::decode(&e.body, true, &Default::default()).unwrap();
        assert_eq!(r.logs.len(), 1, "only the new record: {:?}", r.logs);
        assert_eq!(r.logs[0].fields["seq"], Value::Int(4));
        let ck: Checkpoint = serde_json::from_value(e.meta.checkpoint.unwrap().1).unwrap();
        assert_eq!(ck.counts.oom_kills, 2, "the count survived the restart");
        assert_eq!(ck.counts.segfaults, 1);
        spool.stop();
        t.join().unwrap().unwrap();
    }

    #[test]
    fn wall_time_of_a_record_is_near_now() {
        let mut mono = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut mono) };
        let usec = mono.tv_sec as u64 * 1_000_000 + mono.tv_nsec as u64 / 1000;
        let d = (wall_ns(usec) - crate::metrics::now_ns()).abs();
        assert!(d < 1_000_000_000, "{d}");
    }
}
