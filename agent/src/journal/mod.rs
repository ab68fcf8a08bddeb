//! The systemd journal off the box, with the same guarantees as log files.
//!
//! Entries come from `journalctl` run as a child process with a fixed argument list: the
//! journal location and filters from the agent's own configuration, a cursor from the agent's
//! own checkpoint, nothing from what the journal contains. journalctl is the stable interface
//! systemd offers for reading journal files (the on-disk format changes between versions and
//! libsystemd's `sd_journal` would mean linking C); it handles rotation, vacuuming, several
//! files and directories, and new files while following. It writes `--output=export`, systemd's
//! documented export format, which carries every field's exact bytes (binary and multi-line
//! messages included) and costs journalctl about a quarter of the CPU its JSON output does.
//!
//! How it stays exact:
//! - The journal cursor is the checkpoint. Each batch goes into the durable spool with the
//!   cursor of its last entry, promoted to `journal.acked.json` (fsync + rename) only once the
//!   collector acked it. On start the reader resumes after the newest cursor still in the
//!   spool, else after the acked one: a restart or `kill -9` neither skips nor repeats entries,
//!   and a batch the sender sends twice overwrites itself in InfluxDB (same timestamps).
//! - Timestamps are the entries' own `__REALTIME_TIMESTAMP` in nanoseconds; entries sharing a
//!   microsecond get nanosecond offsets so none overwrites another. The last timestamp given
//!   travels in the checkpoint, so entries read again get the same timestamps again.
//! - Before journalctl starts after a cursor, the reader checks that the cursor's entry still
//!   exists. If it does not (the journal was vacuumed or the file replaced while nobody read
//!   it), that is counted (`journal_cursor_resets`), logged, and reading goes on from the
//!   oldest entry still there; journalctl alone would silently guess a position by time.
//! - A `--journal-file` replaced under the agent (new inode) makes the reader restart
//!   journalctl, which then meets the check above: journalctl keeps reading the old inode.
//! - When the spool is full, pushing waits and the reader stops reading journalctl's pipe, so
//!   journalctl blocks and the journal itself is the buffer. If the wait gives up, the batch is
//!   dropped from memory and journalctl is restarted after the last queued cursor.
//! - If journalctl exits, it is restarted with backoff; nothing else stops.
//!
//! First start on a box (no checkpoint): from the end of the journal, or with
//! `--journal-initial boot` from the first entry of the current boot. The position is written
//! at once, so a restart before the first batch is not another first start.

mod export;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::ffi::OsString;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use phoenix_wire::{logtext, LogLine, Map, Value, MAX_FIELD_STRING};
use serde::{Deserialize, Serialize};

use crate::counters;
use crate::source::{Ctx, Source};
use crate::spool::{Kind, SpoolError};

pub use export::write_entry;

/// The source name: the checkpoint lives in `<state-dir>/journal.acked.json`.
pub const NAME: &str = "journal";

/// An entry bigger than this (journalctl's export form) is skipped with a warning rather
/// than held in memory; journald's own stream limit is 48 KiB per line.
const MAX_ENTRY: usize = 32 << 20;
/// A realtime clock stepping back by more than this keeps the entries' own times (instead of
/// nanosecond offsets after the newest one), so a clock fix does not move hours of entries.
const STEP_BACK_NS: i64 = 1_000_000;
/// Unit and identifier tags longer than this are cut: tags are index keys.
const MAX_TAG: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("--journal-unit {0:?}: not a unit name; use letters, digits and : - _ . \\ @ (and * ? [ ] as globs), e.g. nginx.service")]
    BadUnit(String),
    #[error("--journal-priority {0:?}: use emerg, alert, crit, err, warning, notice, info, debug or 0-7")]
    BadPriority(String),
    #[error("--journal-initial {0:?}: use end or boot")]
    BadInitial(String),
    #[error("give either --journal-dir or --journal-file, not both: journalctl reads one kind of location at a time")]
    DirAndFiles,
    #[error("journal checkpoint {0}: {1} (check that the state dir is writable)")]
    Checkpoint(PathBuf, String),
    #[error("the agent is stopping")]
    Stopping,
}

/// Which journal to read.
#[derive(Debug, Clone, PartialEq)]
pub enum Location {
    /// The local system journal (`/run/log/journal`, `/var/log/journal`).
    Local,
    /// Every journal file in a directory (`journalctl --directory`).
    Dir(PathBuf),
    /// These journal files (`journalctl --file`, repeatable).
    Files(Vec<PathBuf>),
}

impl Location {
    fn args(&self) -> Vec<OsString> {
        let arg = |flag: &str, p: &Path| {
            let mut a = OsString::from(flag);
            a.push(p.as_os_str());
            a
        };
        match self {
            Location::Local => Vec::new(),
            Location::Dir(d) => vec![arg("--directory=", d)],
            Location::Files(fs) => fs.iter().map(|f| arg("--file=", f)).collect(),
        }
    }

    /// Recorded in the checkpoint so that a cursor is only applied to the journal it came from.
    fn describe(&self) -> String {
        match self {
            Location::Local => "local".into(),
            Location::Dir(d) => format!("dir:{}", d.display()),
            Location::Files(fs) => format!(
                "files:{}",
                fs.iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }
}

/// How the reader behaves; [`Options::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct Options {
    pub journalctl: PathBuf,
    pub location: Location,
    /// `journalctl --unit` filters (OR'ed).
    pub units: Vec<String>,
    /// Only entries with this priority or a more important one (0 emerg .. 7 debug).
    pub max_priority: Option<u8>,
    /// On the very first start, begin at the current boot instead of the journal's end.
    pub from_boot: bool,
    pub max_batch_entries: usize,
    pub max_batch_bytes: usize,
    /// A batch is queued once no entry came for this long...
    pub quiet: Duration,
    /// ...or once it is this old.
    pub linger: Duration,
    /// How long one push waits for room in a full spool before journalctl is restarted
    /// after the last queued cursor.
    pub push_wait: Duration,
    /// How often `--journal-file` paths are checked for having been replaced.
    pub check_every: Duration,
    pub backoff_max: Duration,
}

impl Options {
    pub fn new(location: Location) -> Options {
        Options {
            journalctl: find_journalctl(),
            location,
            units: Vec::new(),
            max_priority: None,
            from_boot: false,
            max_batch_entries: 5000,
            max_batch_bytes: 4 << 20,
            quiet: Duration::from_millis(200),
            linger: Duration::from_secs(1),
            push_wait: Duration::from_secs(60),
            check_every: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
        }
    }

    pub fn from_config(cfg: &crate::config::RunConfig) -> Options {
        let location = match (&cfg.journal_dir, cfg.journal_files.is_empty()) {
            (Some(d), _) => Location::Dir(absolute(d)),
            (None, false) => {
                Location::Files(cfg.journal_files.iter().map(|f| absolute(f)).collect())
            }
            (None, true) => Location::Local,
        };
        let mut o = Options::new(location);
        o.units = cfg.journal_units.clone();
        o.max_priority = cfg.journal_priority;
        o.from_boot = cfg.journal_from_boot;
        // As for log files: a batch must fit a small spool several times over.
        o.max_batch_bytes = ((cfg.spool_max / 4) as usize).clamp(64 << 10, 4 << 20);
        o
    }
}

/// journalctl needs absolute paths: with `--follow` it watches each file's directory and
/// fails on a bare file name.
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The child runs with an empty environment, so resolve journalctl with the agent's PATH.
fn find_journalctl() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join("journalctl"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/bin/journalctl"))
}

/// `--journal-priority`: a syslog level name or number, as journalctl spells them.
pub fn parse_priority(s: &str) -> Result<u8, JournalError> {
    Ok(match s.trim().to_ascii_lowercase().as_str() {
        "0" | "emerg" => 0,
        "1" | "alert" => 1,
        "2" | "crit" => 2,
        "3" | "err" | "error" => 3,
        "4" | "warning" | "warn" => 4,
        "5" | "notice" => 5,
        "6" | "info" => 6,
        "7" | "debug" => 7,
        _ => return Err(JournalError::BadPriority(s.into())),
    })
}

/// `--journal-unit`: systemd unit-name characters, plus the glob characters journalctl accepts.
pub fn check_unit(s: &str) -> Result<(), JournalError> {
    let ok = !s.is_empty()
        && s.len() <= 256
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":-_.\\@*?[]".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(JournalError::BadUnit(s.into()))
    }
}

/// `--journal-initial`: true for `boot`.
pub fn parse_initial(s: &str) -> Result<bool, JournalError> {
    match s {
        "end" => Ok(false),
        "boot" => Ok(true),
        o => Err(JournalError::BadInitial(o.into())),
    }
}

/// Journal cursors are short ASCII (`s=…;i=…;b=…;m=…;t=…;x=…`); anything else in a
/// checkpoint is not passed to journalctl.
fn valid_cursor(c: &str) -> bool {
    !c.is_empty()
        && c.len() <= 512
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'=' || b == b';')
}

/// The `journal` source.
#[derive(Debug)]
pub struct JournalSource {
    opts: Options,
}

impl JournalSource {
    pub fn new(opts: Options) -> JournalSource {
        JournalSource { opts }
    }
}

impl Source for JournalSource {
    fn name(&self) -> &'static str {
        NAME
    }

    fn run(self: Box<Self>, ctx: Ctx) -> anyhow::Result<()> {
        let mut r = Reader::new(ctx, self.opts)?;
        let res = r.run();
        r.kill_child();
        match res {
            Ok(()) | Err(JournalError::Stopping) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Where reading goes on.
#[derive(Debug, Clone, PartialEq)]
enum Pos {
    /// After the entry with this cursor.
    After(String),
    /// At the entry with this cursor, itself included (first start at the current boot).
    At(String),
    /// From the oldest entry there is.
    Head,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Checkpoint {
    v: u32,
    /// Which journal the cursor belongs to ([`Location::describe`]).
    journal: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    at: Option<String>,
    /// Last timestamp given to an entry.
    last_ts: i64,
}

impl Checkpoint {
    fn pos(&self) -> Option<Pos> {
        match (&self.after, &self.at) {
            (Some(c), _) => valid_cursor(c).then(|| Pos::After(c.clone())),
            (None, Some(c)) => valid_cursor(c).then(|| Pos::At(c.clone())),
            (None, None) => Some(Pos::Head),
        }
    }
}

/// A journalctl child whose output is read without blocking.
#[derive(Debug)]
struct Journalctl {
    child: Child,
    out: ChildStdout,
    err: ChildStderr,
    out_eof: bool,
    err_eof: bool,
    /// Stderr not yet ended by a newline, and complete lines not yet taken.
    err_buf: Vec<u8>,
    err_lines: Vec<String>,
}

impl Journalctl {
    fn spawn(bin: &Path, args: &[OsString]) -> std::io::Result<Journalctl> {
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: only async-signal-safe calls between fork and exec. The agent blocks
        // SIGTERM/SIGINT in every thread (sigwait); the child must not inherit that, and it
        // must not outlive the agent if the agent is killed.
        unsafe {
            cmd.pre_exec(|| {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        for fd in [out.as_raw_fd(), err.as_raw_fd()] {
            // SAFETY: fcntl on pipe fds this struct owns.
            unsafe {
                let fl = libc::fcntl(fd, libc::F_GETFL);
                libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
            }
        }
        Ok(Journalctl {
            child,
            out,
            err,
            out_eof: false,
            err_eof: false,
            err_buf: Vec::new(),
            err_lines: Vec::new(),
        })
    }

    /// Wait up to `timeout` for output, then append what stdout has to `buf` (at most `max`
    /// bytes) and collect stderr lines. Returns the stdout bytes read.
    fn pump(&mut self, buf: &mut Vec<u8>, max: usize, timeout: Duration) -> usize {
        let mut fds = [
            libc::pollfd {
                fd: if self.out_eof {
                    -1
                } else {
                    self.out.as_raw_fd()
                },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if self.err_eof {
                    -1
                } else {
                    self.err.as_raw_fd()
                },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        if self.out_eof && self.err_eof {
            return 0;
        }
        // SAFETY: poll on two pollfd structs we own.
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                2,
                timeout.as_millis().min(i32::MAX as u128) as i32,
            )
        };
        let mut got = 0;
        if fds[0].revents != 0 {
            let start = buf.len();
            buf.resize(start + max, 0);
            match self.out.read(&mut buf[start..]) {
                Ok(0) => self.out_eof = true,
                Ok(n) => got = n,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => self.out_eof = true,
            }
            buf.truncate(start + got);
        }
        if fds[1].revents != 0 {
            let mut tmp = [0u8; 4096];
            match self.err.read(&mut tmp) {
                Ok(0) => self.err_eof = true,
                Ok(n) => self.err_buf.extend_from_slice(&tmp[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => self.err_eof = true,
            }
            while let Some(nl) = self.err_buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.err_buf.drain(..=nl).collect();
                self.push_err_line(&line[..nl]);
            }
            if self.err_buf.len() > 4096 || (self.err_eof && !self.err_buf.is_empty()) {
                let line = std::mem::take(&mut self.err_buf);
                self.push_err_line(&line);
            }
        }
        got
    }

    fn push_err_line(&mut self, line: &[u8]) {
        let line = String::from_utf8_lossy(line).trim().to_string();
        if !line.is_empty() && self.err_lines.len() < 100 {
            self.err_lines.push(line);
        }
    }

    /// Kill (if still running) and reap; the exit status, and stderr not yet taken.
    fn finish(mut self) -> (Option<ExitStatus>, String) {
        if self.out_eof {
            // It closed its output: it is exiting on its own; let it say how.
            let end = Instant::now() + Duration::from_millis(500);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.child.kill().ok();
        let status = self.child.wait().ok();
        self.out_eof = true;
        let end = Instant::now() + Duration::from_millis(200);
        while !self.err_eof && Instant::now() < end {
            let mut sink = Vec::new();
            self.pump(&mut sink, 0, Duration::from_millis(20));
        }
        (status, self.err_lines.join("; "))
    }
}

/// The first entry of a journalctl run that was given no `--follow`.
struct Probe {
    cursor: String,
    boot_id: Option<String>,
}

/// Lines read from the journal but not yet in the spool.
#[derive(Debug, Default)]
struct Batch {
    lines: Vec<LogLine>,
    entries: u64,
    bytes: usize,
    started: Option<Instant>,
    last_entry: Option<Instant>,
}

#[derive(Debug)]
struct Running {
    jc: Journalctl,
    started: Instant,
    entries: u64,
    /// (dev, ino) of each `--journal-file` when journalctl started.
    files: Vec<Option<(u64, u64)>>,
}

#[derive(Debug)]
pub struct Reader {
    ctx: Ctx,
    opts: Options,
    desc: String,
    /// After the last entry read; None until the first-start position is known.
    pos: Option<Pos>,
    last_ts: i64,
    /// Position and timestamp after the last batch the spool took.
    committed: (Option<Pos>, i64),
    batch: Batch,
    child: Option<Running>,
    buf: Vec<u8>,
    next_start: Instant,
    backoff: Duration,
    last_check: Instant,
    /// The entry being read is too big: its bytes are skipped up to the next entry.
    skipping: bool,
    /// The cursor journalctl was started at, whose entry was already shipped.
    skip: Option<String>,
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

const MIN_BACKOFF: Duration = Duration::from_secs(1);

impl Reader {
    /// Take the position from the newest checkpoint (spooled, else acked); with neither, the
    /// first-start position is found when journalctl can first be run.
    pub fn new(ctx: Ctx, opts: Options) -> Result<Reader, JournalError> {
        let desc = opts.location.describe();
        let acked = ctx.state_dir.join(format!("{NAME}.acked.json"));
        let ckpt: Option<Checkpoint> = match ctx.spool.pending_checkpoint(NAME) {
            Some(v) => serde_json::from_value(v)
                .map_err(|e| JournalError::Checkpoint(ctx.state_dir.join("spool"), e.to_string()))
                .map(Some)?,
            None => match std::fs::read(&acked) {
                Ok(data) => match serde_json::from_slice(&data) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        // Written atomically, so this is someone's edit; reading the journal
                        // again from its start (duplicates) beats skipping entries.
                        tracing::warn!(file = %acked.display(), error = %e, "unreadable journal checkpoint; reading the journal from its oldest entry");
                        Some(Checkpoint {
                            v: 1,
                            journal: desc.clone(),
                            after: None,
                            at: None,
                            last_ts: 0,
                        })
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(JournalError::Checkpoint(acked, e.to_string())),
            },
        };
        let (pos, last_ts) = match ckpt {
            Some(c) if c.journal == desc => match c.pos() {
                Some(p) => (Some(p), c.last_ts),
                None => {
                    tracing::warn!(file = %acked.display(), "journal checkpoint holds no usable cursor; reading the journal from its oldest entry");
                    (Some(Pos::Head), c.last_ts)
                }
            },
            Some(c) => {
                tracing::info!(was = %c.journal, now = %desc, "the journal checkpoint is for another journal; starting as on a first start");
                (None, c.last_ts)
            }
            None => (None, 0),
        };
        let now = Instant::now();
        Ok(Reader {
            ctx,
            opts,
            desc,
            committed: (pos.clone(), last_ts),
            pos,
            last_ts,
            batch: Batch::default(),
            child: None,
            buf: Vec::new(),
            next_start: now,
            backoff: MIN_BACKOFF,
            last_check: now,
            skipping: false,
            skip: None,
        })
    }

    /// Read until the agent stops.
    pub fn run(&mut self) -> Result<(), JournalError> {
        loop {
            if self.ctx.spool.stopping() {
                return Err(JournalError::Stopping);
            }
            let now = Instant::now();
            if self.child.is_none() && now >= self.next_start {
                if let Err(e) = self.start() {
                    if matches!(e, StartError::Stopping) {
                        return Err(JournalError::Stopping);
                    }
                    tracing::warn!(error = %e, retry_in = ?self.backoff, "cannot read the journal; will retry");
                    self.next_start = now + self.backoff;
                    self.backoff = (self.backoff * 2).min(self.opts.backoff_max);
                }
            }
            let wait = self.wait_time(now);
            match &mut self.child {
                Some(r) => {
                    let got = r.jc.pump(&mut self.buf, 256 << 10, wait);
                    for line in std::mem::take(&mut r.jc.err_lines) {
                        tracing::warn!(journalctl = %line, "journalctl says");
                    }
                    if got > 0 {
                        self.parse()?;
                    }
                    if self.child.as_ref().is_some_and(|r| r.jc.out_eof) {
                        self.exited();
                    }
                }
                None => {
                    if self.ctx.sleep(wait) {
                        return Err(JournalError::Stopping);
                    }
                }
            }
            let now = Instant::now();
            if now.duration_since(self.last_check) >= self.opts.check_every {
                self.last_check = now;
                self.check_files();
            }
            let b = &self.batch;
            if b.last_entry
                .is_some_and(|t| now.duration_since(t) >= self.opts.quiet)
                || b.started
                    .is_some_and(|t| now.duration_since(t) >= self.opts.linger)
            {
                self.commit()?;
            }
        }
    }

    /// How long to wait for output: until the batch is due, at most 200 ms (to notice stop).
    fn wait_time(&self, now: Instant) -> Duration {
        let mut w = Duration::from_millis(200);
        if let Some(t) = self.batch.last_entry {
            w = w.min((t + self.opts.quiet).saturating_duration_since(now));
        }
        if let Some(t) = self.batch.started {
            w = w.min((t + self.opts.linger).saturating_duration_since(now));
        }
        if self.child.is_none() {
            w = w
                .min(self.next_start.saturating_duration_since(now))
                .max(Duration::from_millis(10));
        }
        w
    }

    fn base_args(&self) -> Vec<OsString> {
        let mut a = self.opts.location.args();
        a.extend([
            "--output=export".into(),
            format!("--output-fields={}", export::FIELDS).into(),
            "--no-pager".into(),
        ]);
        a
    }

    /// Run journalctl without `--follow` and return its first entry (then stop it).
    fn probe(&self, extra: &[&str]) -> Result<Option<Probe>, StartError> {
        let mut args = self.opts.location.args();
        args.extend([
            "--output=export".into(),
            "--output-fields=_BOOT_ID".into(),
            "--no-pager".into(),
        ]);
        args.extend(extra.iter().map(OsString::from));
        let mut jc = Journalctl::spawn(&self.opts.journalctl, &args)
            .map_err(|e| StartError::Spawn(self.opts.journalctl.clone(), e))?;
        let mut buf = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let first = loop {
            if let Some((e, _)) =
                export::next_entry(&buf).map_err(|e| StartError::Output(e.to_string()))?
            {
                break e.cursor.map(|c| Probe {
                    cursor: String::from_utf8_lossy(c).into_owned(),
                    boot_id: e.boot_id.map(|b| String::from_utf8_lossy(b).into_owned()),
                });
            }
            if jc.out_eof {
                break None;
            }
            if self.ctx.spool.stopping() {
                jc.finish();
                return Err(StartError::Stopping);
            }
            if Instant::now() > deadline {
                let (_, err) = jc.finish();
                return Err(StartError::Failed(format!(
                    "journalctl {} gave no answer within 60 s {err}",
                    extra.join(" ")
                )));
            }
            jc.pump(&mut buf, 64 << 10, Duration::from_millis(200));
        };
        let (status, err) = jc.finish();
        match first {
            Some(p) => Ok(Some(p)),
            None if status.is_some_and(|s| s.success()) => Ok(None),
            None => Err(StartError::Failed(format!(
                "journalctl {} failed ({}): {err}",
                extra.join(" "),
                status.map(|s| s.to_string()).unwrap_or_default()
            ))),
        }
    }

    /// Where a first start begins, recorded at once as the acked checkpoint.
    fn first_start(&mut self) -> Result<Pos, StartError> {
        let last = self.probe(&["--lines=1"])?;
        let mut pos = last
            .as_ref()
            .map(|p| Pos::After(p.cursor.clone()))
            .unwrap_or(Pos::Head);
        if self.opts.from_boot {
            let boot = match &self.opts.location {
                // The box's own boot, even if journald wrote nothing in it yet.
                Location::Local => std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                    .ok()
                    .map(|s| s.trim().replace('-', "")),
                // A journal from elsewhere: its latest boot.
                _ => last.as_ref().and_then(|p| p.boot_id.clone()),
            };
            if let Some(b) =
                boot.filter(|b| b.len() == 32 && b.bytes().all(|c| c.is_ascii_hexdigit()))
            {
                match self.probe(&[&format!("--boot={b}")]) {
                    Ok(Some(first)) => pos = Pos::At(first.cursor),
                    // No entry of this boot yet (journalctl fails on a boot it does not
                    // know): everything of this boot comes after the end.
                    Ok(None) | Err(StartError::Failed(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let acked = self.ctx.state_dir.join(format!("{NAME}.acked.json"));
        let json = serde_json::to_vec(&self.checkpoint_of(&pos, self.last_ts))
            .expect("checkpoint serialises");
        crate::spool::write_atomic(&acked, &json).map_err(|e| {
            StartError::Failed(format!(
                "writing {}: {e} (check that the state dir is writable)",
                acked.display()
            ))
        })?;
        let at = match &pos {
            Pos::After(_) => "its end",
            Pos::At(_) => "the start of the current boot",
            Pos::Head => "its start (it is empty)",
        };
        tracing::info!(journal = %self.desc, "first start: reading the journal from {at}");
        Ok(pos)
    }

    /// Check the position still exists, then start `journalctl --follow` from it.
    fn start(&mut self) -> Result<(), StartError> {
        let pos = match self.pos.clone() {
            Some(p) => p,
            None => {
                let p = self.first_start()?;
                self.committed.0 = Some(p.clone());
                self.pos = Some(p.clone());
                p
            }
        };
        let pos = match &pos {
            Pos::After(c) | Pos::At(c) => {
                let found = self.probe(&[&format!("--cursor={c}"), "--lines=1"])?;
                if found.as_ref().is_some_and(|p| &p.cursor == c) {
                    pos
                } else {
                    counters::add(&counters::journal_cursor_resets, 1);
                    tracing::warn!(journal = %self.desc, cursor = %c, "the journal no longer holds the last entry read (rotated, vacuumed or replaced while the agent was not reading it); going on from the oldest entry there is, entries removed in between are lost");
                    self.pos = Some(Pos::Head);
                    if self.batch.lines.is_empty() {
                        self.committed.0 = Some(Pos::Head);
                    }
                    Pos::Head
                }
            }
            Pos::Head => pos,
        };
        let mut args = self.base_args();
        for u in &self.opts.units {
            args.push(format!("--unit={u}").into());
        }
        if let Some(p) = self.opts.max_priority {
            args.push(format!("--priority={p}").into());
        }
        // --no-tail: with --follow, journalctl would otherwise show only the last 10 entries
        // after the cursor.
        args.extend(["--follow".into(), "--no-tail".into()]);
        // Not --after-cursor: journalctl implements it as "skip two entries from the cursor",
        // which drops the first entry after it whenever the cursor's own entry does not
        // match the --unit/--priority filters (the first-start position, changed filters).
        // --cursor includes the cursor's entry when it matches; `add` drops it.
        self.skip = None;
        match &pos {
            Pos::After(c) => {
                args.push(format!("--cursor={c}").into());
                self.skip = Some(c.clone());
            }
            Pos::At(c) => args.push(format!("--cursor={c}").into()),
            Pos::Head => {}
        }
        let files = self.file_ids();
        let jc = Journalctl::spawn(&self.opts.journalctl, &args)
            .map_err(|e| StartError::Spawn(self.opts.journalctl.clone(), e))?;
        tracing::info!(journal = %self.desc, from = ?pos, "reading the journal");
        self.buf.clear();
        self.skipping = false;
        self.child = Some(Running {
            jc,
            started: Instant::now(),
            entries: 0,
            files,
        });
        Ok(())
    }

    fn file_ids(&self) -> Vec<Option<(u64, u64)>> {
        match &self.opts.location {
            Location::Files(fs) => fs
                .iter()
                .map(|f| std::fs::metadata(f).ok().map(|m| (m.dev(), m.ino())))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// A `--journal-file` replaced (rotated by rename, rewritten): journalctl keeps reading
    /// the old inode, so start it again on the new one.
    fn check_files(&mut self) {
        let Some(r) = &self.child else { return };
        if matches!(self.opts.location, Location::Files(_)) && self.file_ids() != r.files {
            tracing::info!(journal = %self.desc, "journal file replaced; reopening it");
            self.kill_child();
            self.next_start = Instant::now();
        }
    }

    fn kill_child(&mut self) {
        if let Some(r) = self.child.take() {
            r.jc.finish();
        }
        self.buf.clear();
    }

    /// journalctl's stdout ended: it exited (or is about to). Restart it with backoff.
    fn exited(&mut self) {
        let Some(r) = self.child.take() else { return };
        let ran = r.started.elapsed();
        let (status, err) = r.jc.finish();
        if r.entries > 0 || ran >= Duration::from_secs(10) {
            self.backoff = MIN_BACKOFF;
        }
        tracing::warn!(status = ?status, stderr = %err, retry_in = ?self.backoff, "journalctl exited; starting it again");
        self.next_start = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(self.opts.backoff_max);
        self.buf.clear();
    }

    /// Turn every whole entry in the buffer into log lines, queueing full batches on the way.
    fn parse(&mut self) -> Result<(), JournalError> {
        let buf = std::mem::take(&mut self.buf);
        let mut off = 0;
        let now = Instant::now();
        let now_wall = now_ns();
        let mut res = Ok(());
        loop {
            if self.skipping {
                // Drop bytes up to the blank line that ends the oversized entry. Its length
                // prefixes are not needed: journalctl's binary fields end in "\n" and a
                // following field name never starts with "\n".
                match buf[off..].windows(2).position(|w| w == b"\n\n") {
                    Some(p) => {
                        off += p + 2;
                        self.skipping = false;
                    }
                    None => {
                        off = buf.len().saturating_sub(1);
                        break;
                    }
                }
            }
            match export::next_entry(&buf[off..]) {
                Ok(Some((e, n))) => {
                    off += n;
                    self.add(&e, now, now_wall);
                    if let Some(r) = &mut self.child {
                        r.entries += 1;
                    }
                    if self.batch.lines.len() >= self.opts.max_batch_entries
                        || self.batch.bytes >= self.opts.max_batch_bytes
                    {
                        res = self.commit();
                        if res.is_err() || self.child.is_none() {
                            break;
                        }
                    }
                }
                Ok(None) => {
                    if buf.len() - off > MAX_ENTRY {
                        self.skip_oversized(&buf[off..]);
                        off = buf.len();
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "journalctl's output could not be read; starting it again after the last entry read");
                    self.kill_child();
                    self.next_start = Instant::now();
                    break;
                }
            }
        }
        let mut buf = buf;
        if self.child.is_some() {
            buf.drain(..off);
            self.buf = buf;
        }
        res
    }

    /// An entry over [`MAX_ENTRY`]: note its cursor (the first field journalctl writes) so
    /// reading goes on after it, and drop its bytes as they come.
    fn skip_oversized(&mut self, partial: &[u8]) {
        let cursor = partial
            .strip_prefix(b"__CURSOR=")
            .and_then(|r| r.iter().position(|&b| b == b'\n').map(|n| &r[..n]))
            .map(|c| String::from_utf8_lossy(c).into_owned());
        tracing::warn!(cursor = ?cursor, limit = MAX_ENTRY, "journal entry too large to ship; skipping it");
        if let Some(c) = cursor.filter(|c| valid_cursor(c)) {
            self.pos = Some(Pos::After(c));
        }
        self.skipping = true;
    }

    fn stamp(&mut self, ns: i64) -> i64 {
        let ts = if ns > self.last_ts || self.last_ts - ns > STEP_BACK_NS {
            ns
        } else {
            self.last_ts + 1
        };
        self.last_ts = ts;
        ts
    }

    fn add(&mut self, e: &export::Entry<'_>, now: Instant, now_wall: i64) {
        if let Some(skip) = self.skip.take() {
            if e.cursor == Some(skip.as_bytes()) {
                return;
            }
        }
        let ns = e.realtime_ns().unwrap_or(now_wall);
        let raw: Cow<[u8]> = match e.message.as_slice() {
            [] => Cow::Borrowed(&[]),
            [one] => Cow::Borrowed(one),
            many => Cow::Owned(many.join(&b'\n')),
        };
        let mut tags = Map::new();
        if let Some(u) = e.unit.or(e.identifier).filter(|u| !u.is_empty()) {
            tags.insert("unit".to_string(), tag_text(u));
        }
        let prio = e.priority();
        if let Some(p) = prio {
            tags.insert(
                "level".to_string(),
                logtext::level_of_priority(p).to_string(),
            );
        }
        let mut fields = Map::new();
        if let Some(pid) = e
            .pid
            .and_then(|p| std::str::from_utf8(p).ok()?.parse::<i64>().ok())
        {
            fields.insert("pid".to_string(), Value::Int(pid));
        }
        if let Some(c) = e.comm {
            fields.insert("comm".to_string(), Value::Str(logtext::encode(c).0));
        }
        if let Some(p) = prio {
            fields.insert("priority".to_string(), Value::Int(p as i64));
        }
        let (msg, escaped) = logtext::encode(&raw);
        if msg.len() <= MAX_FIELD_STRING {
            let ts = self.stamp(ns);
            self.batch.lines.push(LogLine {
                src: NAME.into(),
                ts,
                offset: 0,
                msg,
                escaped,
                part: None,
                tags,
                fields,
            });
        } else {
            for (i, piece) in logtext::split(&raw, MAX_FIELD_STRING)
                .into_iter()
                .enumerate()
            {
                let (msg, escaped) = logtext::encode(piece);
                let ts = self.stamp(ns);
                self.batch.lines.push(LogLine {
                    src: NAME.into(),
                    ts,
                    offset: 0,
                    msg,
                    escaped,
                    part: Some(i as u32 + 1),
                    tags: tags.clone(),
                    fields: fields.clone(),
                });
            }
        }
        self.batch.entries += 1;
        self.batch.bytes += raw.len() + 64;
        self.batch.started.get_or_insert(now);
        self.batch.last_entry = Some(now);
        if let Some(c) = e.cursor {
            self.pos = Some(Pos::After(String::from_utf8_lossy(c).into_owned()));
        }
    }

    fn checkpoint_of(&self, pos: &Pos, last_ts: i64) -> Checkpoint {
        let (after, at) = match pos {
            Pos::After(c) => (Some(c.clone()), None),
            Pos::At(c) => (None, Some(c.clone())),
            Pos::Head => (None, None),
        };
        Checkpoint {
            v: 1,
            journal: self.desc.clone(),
            after,
            at,
            last_ts,
        }
    }

    /// Queue the batch with the cursor after it.
    fn commit(&mut self) -> Result<(), JournalError> {
        if self.batch.lines.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        let mut report = self.ctx.report();
        report.logs = batch.lines;
        let pos = self.pos.clone().unwrap_or(Pos::Head);
        let ckpt = serde_json::to_value(self.checkpoint_of(&pos, self.last_ts))
            .expect("checkpoint serialises");
        match self.ctx.spool.push(
            Kind::Logs,
            report,
            Some((NAME.into(), ckpt)),
            self.opts.push_wait,
        ) {
            Ok(Some(_)) => {
                counters::add(&counters::journal_entries, batch.entries);
                self.committed = (Some(pos), self.last_ts);
                Ok(())
            }
            Ok(None) => {
                tracing::warn!(
                    entries = batch.entries,
                    "spool still full; these journal entries will be read again"
                );
                self.rewind();
                Ok(())
            }
            Err(SpoolError::Stopping) => Err(JournalError::Stopping),
            Err(e) => {
                tracing::error!(error = %e, entries = batch.entries, "could not queue journal entries; will read them again");
                self.rewind();
                self.next_start = Instant::now() + MIN_BACKOFF;
                Ok(())
            }
        }
    }

    /// Forget what was read after the last queued batch and read it again from there.
    fn rewind(&mut self) {
        self.pos = self.committed.0.clone();
        self.last_ts = self.committed.1;
        self.kill_child();
    }
}

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("running {0}: {1} (install systemd's journalctl, or turn --journal off)")]
    Spawn(PathBuf, std::io::Error),
    #[error("{0}")]
    Failed(String),
    #[error("reading journalctl's output: {0}")]
    Output(String),
    #[error("the agent is stopping")]
    Stopping,
}

/// Unit names are ASCII; an identifier could be anything, so it travels like log text.
fn tag_text(raw: &[u8]) -> String {
    let (mut s, _) = logtext::encode(raw);
    if s.len() > MAX_TAG {
        let mut cut = MAX_TAG;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}
