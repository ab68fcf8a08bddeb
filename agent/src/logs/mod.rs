//! Log files off the box: tail every file `--log` names, rotation-safe, checkpointed, nothing
//! lost and nothing twice.
//!
//! How it stays exact:
//! - Lines go into the durable spool in batches; each batch carries a checkpoint (for every
//!   file: device, inode, head hash, offset *after* the batch). The spool promotes it to
//!   `logs.acked.json` when the collector acked the batch.
//! - On start the tailer resumes from the newest checkpoint still in the spool (those lines are
//!   queued already, with their timestamps), else from `logs.acked.json`. A `kill -9` at any
//!   moment therefore neither loses nor repeats a line; a batch sent twice by the sender carries
//!   the same timestamps and overwrites itself in InfluxDB.
//! - Only on the very first start (no checkpoint at all) do files that already exist start at
//!   their end (or start, with `--log-initial start`). Every file met later, whether rotated
//!   in, newly matching a pattern or first seen after a restart, is read from its start.
//! - Rotation by rename keeps reading the old file through its open descriptor to its end;
//!   copytruncate is caught by the size shrinking below the offset or the head changing.
//! - When the spool is full, pushing waits: reading pauses and memory stays bounded (the file
//!   is the buffer). If the wait gives up, the batch is dropped from memory and its lines are
//!   read again from the last checkpoint, never skipped.
//!
//! How it stays cheap with thousands of files:
//! - At most `--max-open-files` are open; the idlest beyond that are closed and opened again
//!   by (device, inode) + head when they change, so a closed file loses and repeats nothing.
//!   A file that cannot be opened (out of descriptors) keeps its checkpoint and is retried.
//! - inotify on the directories (not on every file) wakes the tailer; only the files an
//!   event names are read. A safety poll (`scan_every`, 5 s) expands the patterns again and
//!   compares sizes, for what inotify misses. Scans are linear: one stat per path, identities
//!   looked up in a map.

mod file;
mod pattern;
#[cfg(test)]
mod tests;
mod watch;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use phoenix_wire::{logtext, LogLine, MAX_FIELD_STRING};
use serde::{Deserialize, Serialize};

use crate::counters;
use crate::source::{Ctx, Source};
use crate::spool::{Kind, SpoolError};
use file::{Head, Tracked};

/// The source name: checkpoints live in `<state-dir>/logs.acked.json`.
pub const NAME: &str = "logs";

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("reading log file {0}: {1}")]
    Io(String, std::io::Error),
    #[error("checkpoint {0}: {1} (remove it to re-read the log files from their start)")]
    Checkpoint(PathBuf, String),
    #[error("the agent is stopping")]
    Stopping,
}

/// How the tailer behaves; [`Options::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct Options {
    pub patterns: Vec<String>,
    /// On the very first start, read files that already exist from their start, not their end.
    pub from_start: bool,
    /// A last line without its newline is shipped as it is after waiting this long.
    pub flush_timeout: Duration,
    /// While lines keep coming, how long to gather between two rounds. An idle tailer does
    /// not poll: inotify wakes it.
    pub poll: Duration,
    /// The safety poll: how often the patterns are expanded again and every file checked,
    /// for what inotify misses (NFS, a lost event, no watch left).
    pub scan_every: Duration,
    /// Most tailed files held open at once; the idlest are closed beyond it.
    pub max_open_files: usize,
    /// A batch is queued once it is this old even if not full.
    pub linger: Duration,
    pub max_batch_lines: usize,
    pub max_batch_bytes: usize,
    /// A rotated-away file is closed once read to its end and unchanged this long (a writer
    /// may still append through its old descriptor until it reopens).
    pub rotate_wait: Duration,
    /// How long one push waits for room in a full spool before the batch is dropped from
    /// memory and read again later.
    pub push_wait: Duration,
}

impl Options {
    pub fn new(patterns: Vec<String>) -> Options {
        Options {
            patterns,
            from_start: false,
            flush_timeout: Duration::from_secs(1),
            poll: Duration::from_millis(200),
            scan_every: Duration::from_secs(5),
            max_open_files: default_max_open_files(),
            linger: Duration::from_millis(500),
            max_batch_lines: 5000,
            max_batch_bytes: 4 << 20,
            rotate_wait: Duration::from_secs(5),
            push_wait: Duration::from_secs(60),
        }
    }

    pub fn from_config(cfg: &crate::config::RunConfig) -> Options {
        let mut o = Options::new(cfg.logs.clone());
        o.from_start = cfg.log_from_start;
        // A batch must fit a small spool several times over, or the tailer and the sender
        // would take turns instead of overlapping.
        o.max_batch_bytes = ((cfg.spool_max / 4) as usize).clamp(64 << 10, 4 << 20);
        if let Some(n) = cfg.max_open_files {
            o.max_open_files = n.max(1);
        }
        o
    }
}

/// min(256, a quarter of the open-file limit): the other three quarters stay for the spool,
/// checkpoints, sockets and the other sources, so a glob over thousands of files can never
/// starve them.
pub fn default_max_open_files() -> usize {
    (crate::open_file_limit() / 4).clamp(1, 256) as usize
}

/// The `logs` source: one thread tailing every file the patterns name.
#[derive(Debug)]
pub struct LogSource {
    opts: Options,
}

impl LogSource {
    pub fn new(opts: Options) -> LogSource {
        LogSource { opts }
    }
}

impl Source for LogSource {
    fn name(&self) -> &'static str {
        NAME
    }

    fn run(self: Box<Self>, ctx: Ctx) -> anyhow::Result<()> {
        let mut t = match Tailer::new(ctx, self.opts) {
            Ok(t) => t,
            Err(LogError::Stopping) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        match t.run() {
            Ok(()) | Err(LogError::Stopping) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// What a checkpoint records: enough to find each file again and know where to go on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Checkpoint {
    v: u32,
    /// Last timestamp given to a line, so timestamps keep increasing even if the clock stepped back.
    last_ts: i64,
    files: Vec<FileCkpt>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct FileCkpt {
    src: String,
    /// Where the file was last seen (differs from `src` after a rotation renamed it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    dev: u64,
    ino: u64,
    head_len: u32,
    head: String,
    offset: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    part: Option<u32>,
}

/// Lines read but not yet in the spool.
#[derive(Debug)]
struct Batch {
    lines: Vec<LogLine>,
    bytes: usize,
    started: Option<Instant>,
    last_ts: i64,
    /// Lines emitted since the start, to tell a quiet round from a busy one.
    emitted: u64,
}

impl Batch {
    fn ts(&mut self, now: i64) -> i64 {
        self.last_ts = now.max(self.last_ts + 1);
        self.last_ts
    }

    /// Add one raw line (or a piece of one) starting at `offset`. `part` continues the
    /// numbering of a line already cut; returns the part number that would come next.
    fn emit(
        &mut self,
        src: &str,
        raw: &[u8],
        offset: u64,
        part: Option<u32>,
        now_ns: i64,
        now: Instant,
    ) -> u32 {
        self.started.get_or_insert(now);
        self.bytes += raw.len();
        self.emitted += 1;
        let (msg, escaped) = logtext::encode(raw);
        if part.is_none() && msg.len() <= MAX_FIELD_STRING {
            let ts = self.ts(now_ns);
            self.lines.push(LogLine {
                src: src.to_owned(),
                ts,
                offset,
                msg,
                escaped,
                part: None,
                tags: Default::default(),
                fields: Default::default(),
            });
            return 1;
        }
        let mut n = part.unwrap_or(1);
        let mut off = offset;
        for piece in logtext::split(raw, MAX_FIELD_STRING) {
            let (msg, escaped) = logtext::encode(piece);
            let ts = self.ts(now_ns);
            self.lines.push(LogLine {
                src: src.to_owned(),
                ts,
                offset: off,
                msg,
                escaped,
                part: Some(n),
                tags: Default::default(),
                fields: Default::default(),
            });
            off += piece.len() as u64;
            n += 1;
        }
        n
    }
}

/// Start of the read buffer; it doubles for a line longer than it, up to `MAX_BUF`, beyond
/// which a line is cut into numbered parts as it is read.
const BUF: usize = 256 << 10;
const MAX_BUF: usize = 1 << 20;

enum Stop {
    /// Read to the end of the file for now.
    Eof,
    /// The batch is full: queue it, then go on.
    Full,
    /// One buffer read; there is more.
    More,
}

#[derive(Debug)]
pub struct Tailer {
    ctx: Ctx,
    opts: Options,
    files: Vec<Tracked>,
    batch: Batch,
    buf: Vec<u8>,
    last_scan: Option<Instant>,
    /// Paths that could not be opened, so the warning is logged once, not every scan.
    warned: HashSet<PathBuf>,
    /// Patterns that matched nothing, warned about once.
    missing: HashSet<String>,
    watch: watch::Watch,
    /// Directories the last scan said to watch.
    dirs: BTreeSet<PathBuf>,
    /// How many files the last scan reported tailing, to log changes only.
    last_tailed: usize,
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |e| LogError::Io(path.display().to_string(), e)
}

impl Tailer {
    /// Resume from the newest checkpoint (spooled, else acked), or take the first-start
    /// positions and record them at once so a restart does not count as a first start.
    pub fn new(ctx: Ctx, opts: Options) -> Result<Tailer, LogError> {
        let acked = ctx.state_dir.join(format!("{NAME}.acked.json"));
        let pending = ctx.spool.pending_checkpoint(NAME);
        let first_start = pending.is_none() && !acked.exists();
        let ckpt: Option<Checkpoint> = match pending {
            Some(v) => {
                Some(serde_json::from_value(v).map_err(|e| {
                    LogError::Checkpoint(ctx.state_dir.join("spool"), e.to_string())
                })?)
            }
            None if !first_start => {
                let data = std::fs::read(&acked)
                    .map_err(|e| LogError::Checkpoint(acked.clone(), e.to_string()))?;
                match serde_json::from_slice(&data) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        // Written atomically, so this is someone's edit; reading everything
                        // again (duplicates) beats skipping lines.
                        tracing::warn!(file = %acked.display(), error = %e, "unreadable log checkpoint; reading the log files from their start");
                        None
                    }
                }
            }
            None => None,
        };
        let mut t = Tailer {
            ctx,
            opts,
            files: Vec::new(),
            batch: Batch {
                lines: Vec::new(),
                bytes: 0,
                started: None,
                last_ts: 0,
                emitted: 0,
            },
            buf: vec![0; BUF],
            last_scan: None,
            warned: Default::default(),
            missing: Default::default(),
            watch: watch::Watch::new(),
            dirs: BTreeSet::new(),
            last_tailed: 0,
        };
        let now = Instant::now();
        if let Some(c) = ckpt {
            t.batch.last_ts = c.last_ts;
            t.restore(c, now);
        }
        t.scan(now, first_start && !t.opts.from_start);
        t.watch.set_dirs(t.dirs.clone());
        t.watch.wake_on_stop(&t.ctx.spool);
        // A line written between the scan and the watches going in raised no event.
        for f in &mut t.files {
            f.pending |= f.file.is_some();
        }
        if first_start {
            let json = serde_json::to_vec(&t.checkpoint()).expect("checkpoint serialises");
            crate::spool::write_atomic(&acked, &json)
                .map_err(|e| LogError::Checkpoint(acked.clone(), e.to_string()))?;
            tracing::info!(
                files = t.files.len(),
                at = if t.opts.from_start { "start" } else { "end" },
                "first start: existing log files begin at their {}",
                if t.opts.from_start { "start" } else { "end" }
            );
        }
        Ok(t)
    }

    /// Tail until the agent stops. While lines come, rounds are `poll` apart (so a trickle is
    /// gathered into batches); when nothing is written the thread sleeps until inotify names
    /// a change or a timer is due (a half line to flush, a rotated file to let go, the safety
    /// poll).
    pub fn run(&mut self) -> Result<(), LogError> {
        loop {
            if self.ctx.spool.stopping() {
                return Err(LogError::Stopping);
            }
            let busy = self.step(Instant::now())?;
            let stop = if busy {
                self.ctx.sleep(self.opts.poll)
            } else {
                let until = self.next_due(Instant::now());
                self.watch.wait(until, &self.ctx.spool)
            };
            if stop {
                return Err(LogError::Stopping);
            }
        }
    }

    /// When the next round is due if no event comes first.
    fn next_due(&self, now: Instant) -> Instant {
        let mut due = self.last_scan.unwrap_or(now) + self.opts.scan_every;
        for f in &self.files {
            if let Some((_, since)) = f.tail_since {
                due = due.min(since + self.opts.flush_timeout);
            }
            if f.path.is_none() {
                due = due.min(f.changed_at + self.opts.rotate_wait);
            }
            if f.pending {
                // Could not be opened or read last round: try again soon, not in a loop.
                due = due.min(now + Duration::from_secs(1));
            }
        }
        due.max(now + Duration::from_millis(10))
    }

    /// One round: rescan if events or the safety poll say so, read every file that may have
    /// something new to its end (queueing full batches on the way), queue what is left once
    /// it lingered long enough, close finished rotated files. True while lines are coming.
    fn step(&mut self, now: Instant) -> Result<bool, LogError> {
        let full = self.absorb(now);
        let before = self.batch.emitted;
        // Files found by a scan during this round wait for the next one, so that a rotated
        // file earlier in the list is read to its end before its successor.
        let mut end = self.files.len();
        let mut i = 0;
        while i < end {
            let f = &mut self.files[i];
            // Rotated-away files and half lines are few and always looked at; open files on
            // the safety poll; the rest only when an event or the scan named them.
            let due = f.pending
                || f.path.is_none()
                || f.tail_since.is_some()
                || (full && f.file.is_some());
            if !due || f.gone {
                i += 1;
                continue;
            }
            f.pending = false;
            if f.file.is_none() && !self.reopen(i) {
                i += 1;
                continue;
            }
            loop {
                // A long drain of one file must not stop the scans and checks of the others:
                // a file rotated in and out, or truncated twice, meanwhile would be missed.
                // inotify saying a file was created or renamed counts as much as the poll.
                let t = Instant::now();
                if self.watch.wants_rescan()
                    || self
                        .last_scan
                        .is_none_or(|l| t.duration_since(l) >= self.opts.scan_every)
                {
                    self.absorb(t);
                    self.check_others(&mut i, &mut end, now)?;
                }
                // Checked before every buffer read, so a truncation is seen before reading
                // from an offset that no longer means anything.
                match self.check(i, now) {
                    Ok(inserted) => end += inserted as usize,
                    Err(LogError::Stopping) => return Err(LogError::Stopping),
                    Err(e) => tracing::warn!(error = %e, "log file check failed"),
                }
                match self.read(i, now) {
                    Ok(Stop::Full) => self.commit()?,
                    Ok(Stop::More) => {}
                    Ok(Stop::Eof) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "log file read failed; will retry");
                        self.files[i].pending = true;
                        break;
                    }
                }
            }
            self.fit_budget(Some(i));
            i += 1;
        }
        // Queue what there is once it lingered, or at once when the files went quiet: a
        // backlog's last lines need not wait, a trickle is gathered into fewer batches.
        let quiet = self.batch.emitted == before;
        if quiet
            || self
                .batch
                .started
                .is_some_and(|t| now.duration_since(t) >= self.opts.linger)
        {
            self.commit()?;
        }
        self.forget_finished(now);
        Ok(self.batch.emitted != before || !self.batch.lines.is_empty())
    }

    /// Take what inotify noted: expand the patterns again when something was created,
    /// renamed or removed (or the safety poll is due), mark the files it named. True when
    /// this is a full round (every open file is checked).
    fn absorb(&mut self, now: Instant) -> bool {
        let ev = self.watch.take();
        let full = ev.full
            || self
                .last_scan
                .is_none_or(|t| now.duration_since(t) >= self.opts.scan_every);
        if ev.rescan {
            self.watch.forget(&ev.paths);
        }
        if full || ev.rescan {
            self.scan(now, false);
            self.watch.set_dirs(self.dirs.clone());
        }
        if !ev.paths.is_empty() {
            for f in &mut self.files {
                if ev.paths.contains(&f.loc)
                    || f.path.as_ref().is_some_and(|p| ev.paths.contains(p))
                {
                    f.pending = true;
                }
            }
        }
        full
    }

    /// Open a file the budget closed (or a checkpoint named) again, by its identity: at the
    /// path it was last seen, else renamed within its directory. False when it cannot be read
    /// now (it stays pending) or is gone.
    fn reopen(&mut self, i: usize) -> bool {
        let f = &mut self.files[i];
        let at = f.path.clone().unwrap_or_else(|| f.loc.clone());
        match locate(&at, f.dev, f.ino) {
            Ok(Some((file, _, p))) => {
                if p != at {
                    counters::add(&counters::files_rotated, 1);
                    tracing::debug!(src = %f.src, now = %p.display(), "closed log file was renamed");
                    f.path = None;
                    f.loc = p;
                }
                f.file = Some(file);
                self.warned.remove(&at);
                true
            }
            Ok(None) => {
                if f.offset < f.size {
                    tracing::warn!(src = %f.src, offset = f.offset, size = f.size, "log file deleted before its end was read; its last lines are lost");
                } else {
                    tracing::info!(src = %f.src, "log file deleted; forgetting it");
                }
                f.gone = true;
                false
            }
            Err(e) => {
                f.pending = true;
                if self.warned.insert(at.clone()) {
                    tracing::warn!(file = %at.display(), error = %e, "cannot open log file again; keeping its place and retrying (raise LimitNOFILE or lower --max-open-files if this says too many open files)");
                }
                false
            }
        }
    }

    /// Close the idlest open files until at most `--max-open-files` are open (a quarter
    /// below, so the next opens do not close one file each). Files read to their end go
    /// first; rotated-away files and half lines stay open (their name may be gone).
    fn fit_budget(&mut self, keep: Option<usize>) {
        let max = self.opts.max_open_files.max(1);
        let open = self.files.iter().filter(|f| f.file.is_some()).count();
        if open <= max {
            return;
        }
        let target = (max - max / 4).max(1);
        let mut idle: Vec<usize> = (0..self.files.len())
            .filter(|&j| {
                let f = &self.files[j];
                Some(j) != keep && f.file.is_some() && f.path.is_some() && f.tail_since.is_none()
            })
            .collect();
        idle.sort_by_key(|&j| {
            let f = &self.files[j];
            (f.offset < f.size, f.changed_at)
        });
        for j in idle.into_iter().take(open - target) {
            let f = &mut self.files[j];
            f.file = None;
            if f.offset < f.size {
                f.pending = true;
            }
        }
    }

    /// Queue everything read so far, with the checkpoint after it.
    fn commit(&mut self) -> Result<(), LogError> {
        if self.batch.lines.is_empty() {
            return Ok(());
        }
        let mut report = self.ctx.report();
        // Grown as lines come: an idle box's batches of a line or two keep no room for 1,024.
        report.logs = std::mem::take(&mut self.batch.lines);
        let n = report.logs.len() as u64;
        self.batch.bytes = 0;
        self.batch.started = None;
        let ckpt = serde_json::to_value(self.checkpoint()).expect("checkpoint serialises");
        match self.ctx.spool.push(
            Kind::Logs,
            report,
            Some((NAME.into(), ckpt)),
            self.opts.push_wait,
        ) {
            Ok(Some(_)) => {
                counters::add(&counters::lines_queued, n);
                for f in &mut self.files {
                    f.committed = f.offset;
                    f.committed_part = f.part;
                }
                Ok(())
            }
            Ok(None) => {
                tracing::warn!(
                    lines = n,
                    "spool still full; these lines will be read again from the file"
                );
                self.rewind();
                Ok(())
            }
            Err(SpoolError::Stopping) => Err(LogError::Stopping),
            Err(e) => {
                tracing::error!(error = %e, lines = n, "could not queue log lines; will read them again");
                self.rewind();
                if self.ctx.sleep(Duration::from_secs(1)) {
                    return Err(LogError::Stopping);
                }
                Ok(())
            }
        }
    }

    fn rewind(&mut self) {
        for f in &mut self.files {
            f.offset = f.committed;
            f.part = f.committed_part;
            f.tail_since = None;
        }
    }

    fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            v: 1,
            last_ts: self.batch.last_ts,
            files: self
                .files
                .iter()
                .map(|f| FileCkpt {
                    src: f.src.clone(),
                    path: Some(f.path.as_ref().unwrap_or(&f.loc))
                        .map(|p| p.to_string_lossy().into_owned())
                        .filter(|p| *p != f.src),
                    dev: f.dev,
                    ino: f.ino,
                    head_len: f.head.len,
                    head: f.head.hex(),
                    offset: f.offset,
                    part: f.part,
                })
                .collect(),
        }
    }

    /// Find the checkpointed files again: at their last path, else renamed within the same
    /// directory (rotated while the agent was down).
    fn restore(&mut self, c: Checkpoint, now: Instant) {
        for e in c.files {
            let last = PathBuf::from(e.path.as_deref().unwrap_or(&e.src));
            let Some(head) = Head::from_hex(e.head_len, &e.head) else {
                continue;
            };
            let (file, md, at) = match locate(&last, e.dev, e.ino) {
                Ok(Some((file, md, at))) => (file, md, at),
                Ok(None) => {
                    tracing::info!(file = %last.display(), "a checkpointed log file is gone; forgetting it");
                    continue;
                }
                Err(err) => {
                    // Out of descriptors, or no access for now: the file is still there, so
                    // its place is kept and it is opened once it can be.
                    if self.warned.insert(last.clone()) {
                        tracing::warn!(file = %last.display(), error = %err, "cannot open a checkpointed log file; keeping its checkpoint and retrying");
                    }
                    let mut f =
                        Tracked::closed(e.src, Some(last), e.dev, e.ino, head, e.offset, now);
                    f.path = None;
                    f.part = e.part;
                    f.committed_part = e.part;
                    self.files.push(f);
                    continue;
                }
            };
            let same_head = file::head_matches(&file, head).unwrap_or(false);
            if !same_head || md.len() < e.offset {
                // Truncated (copytruncate) or rewritten while the agent was down: the unread
                // rest may be in a copy beside it.
                counters::add(&counters::files_truncated, 1);
                tracing::warn!(file = %last.display(), size = md.len(), offset = e.offset, "log file was truncated or replaced while the agent was stopped; reading it from its start");
                let ident = Ident {
                    src: &e.src,
                    path: &last,
                    dev: e.dev,
                    ino: e.ino,
                    head,
                    offset: e.offset,
                    part: e.part,
                };
                if let Some(copy) = find_copy(&ident, &self.files, now) {
                    self.files.push(copy);
                }
                if !same_head {
                    // Another file now: if a pattern names it, the scan adds it from its start.
                    continue;
                }
            }
            let (offset, part) = if md.len() < e.offset {
                (0, None)
            } else {
                (e.offset, e.part)
            };
            let head = if head.len < file::HEAD_MAX as u32 {
                file::head_of(&file).unwrap_or(head)
            } else {
                head
            };
            // Still at its last path: closable by the budget (the scan confirms the name).
            // Renamed while the agent was down: it stays open until read to its end.
            let path = (at == last).then_some(at.clone());
            let mut f = Tracked::new(e.src, path, file, &md, head, offset, now);
            f.loc = at;
            f.part = part;
            f.committed_part = part;
            // Lines may have been written while the agent was down.
            f.pending = true;
            self.files.push(f);
            self.fit_budget(None);
        }
    }

    /// Expand the patterns: note which tracked file each path names now, start tracking new
    /// files (from their start, or their end on a first start), mark the rest as rotated away.
    /// Linear in the number of files: one stat per path, identities looked up in a map.
    fn scan(&mut self, now: Instant, new_at_end: bool) {
        self.last_scan = Some(now);
        let mut seen = vec![false; self.files.len()];
        let mut paths: Vec<PathBuf> = Vec::new();
        let mut uniq: HashSet<PathBuf> = HashSet::new();
        let mut dirs = BTreeSet::new();
        for p in &self.opts.patterns {
            let found = pattern::expand_into(p, &mut dirs);
            if found.is_empty() {
                if self.missing.insert(p.clone()) {
                    tracing::warn!(pattern = %p, "--log names no file (yet): check the path; it is looked for again on every change in its directory and every few seconds");
                }
            } else if self.missing.remove(p) {
                tracing::info!(pattern = %p, files = found.len(), "--log names files now");
            }
            for path in found {
                if uniq.insert(path.clone()) {
                    paths.push(path);
                }
            }
        }
        for f in &self.files {
            if let Some(d) = f.loc.parent().filter(|d| !d.as_os_str().is_empty()) {
                if !dirs.contains(d) && f.path.is_none() {
                    dirs.insert(d.to_path_buf());
                }
            }
        }
        self.dirs = dirs;
        let mut by_id: HashMap<(u64, u64), usize> = self
            .files
            .iter()
            .enumerate()
            .filter(|(_, f)| !f.gone)
            .map(|(i, f)| ((f.dev, f.ino), i))
            .collect();
        let mut open = self.files.iter().filter(|f| f.file.is_some()).count();
        for path in paths {
            let md = match std::fs::metadata(&path) {
                Ok(md) => md,
                Err(e) => {
                    if self.warned.insert(path.clone()) {
                        if e.raw_os_error() == Some(libc::ELOOP) {
                            tracing::warn!(file = %path.display(), "log path is a symlink loop: fix the link; it is checked again on every scan");
                        } else {
                            tracing::warn!(file = %path.display(), error = %e, "log path cannot be read (a dangling symlink?); it is checked again on every scan");
                        }
                    }
                    continue;
                }
            };
            if !md.is_file() {
                continue;
            }
            if let Some(&i) = by_id.get(&(md.dev(), md.ino())) {
                seen[i] = true;
                let f = &mut self.files[i];
                if md.len() != f.size {
                    // The safety poll's check of a file whether open or closed.
                    f.pending = true;
                }
                if f.path.as_ref() != Some(&path) {
                    if f.path.is_some() {
                        counters::add(&counters::files_rotated, 1);
                        tracing::debug!(src = %f.src, now = %path.display(), "log file renamed");
                    }
                    f.loc = path.clone();
                    f.path = Some(path);
                }
                continue;
            }
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) => {
                    if self.warned.insert(path.clone()) {
                        tracing::warn!(file = %path.display(), error = %e, "cannot open log file (give the agent read access, or raise LimitNOFILE if this says too many open files); will retry");
                    }
                    continue;
                }
            };
            self.warned.remove(&path);
            // The identity of what was opened, not of what the path named a moment before.
            let Ok(md) = file.metadata() else { continue };
            if let Some(&i) = by_id.get(&(md.dev(), md.ino())) {
                seen[i] = true;
                continue;
            }
            let head = file::head_of(&file).unwrap_or(Head::EMPTY);
            let offset = if new_at_end {
                file::end_offset(&file, md.len()).unwrap_or(md.len())
            } else {
                0
            };
            tracing::debug!(file = %path.display(), offset, "tailing log file");
            let src = path.to_string_lossy().into_owned();
            let mut t = Tracked::new(src, Some(path), file, &md, head, offset, now);
            t.pending = offset < md.len();
            if open >= self.opts.max_open_files.max(1) {
                // Over the budget: known by identity, opened when it has something to read.
                t.file = None;
            } else {
                open += 1;
            }
            by_id.insert((t.dev, t.ino), self.files.len());
            self.files.push(t);
            seen.push(true);
        }
        let mut rotated = 0u64;
        for (f, seen) in self.files.iter_mut().zip(seen) {
            if !seen && f.path.is_some() {
                counters::add(&counters::files_rotated, 1);
                rotated += 1;
                if rotated <= 20 {
                    tracing::info!(src = %f.src, offset = f.offset, "log file rotated away or deleted; reading it to its end");
                }
                f.path = None;
                f.pending = true;
            }
        }
        let tailed = self.files.len();
        if self.last_tailed != tailed {
            tracing::info!(files = tailed, open, "tailing log files");
            self.last_tailed = tailed;
        }
    }

    /// Catch truncation (copytruncate) and keep the head hash current while a file is young.
    /// True when a copy holding the file's unread rest was inserted at `i` (the file moved
    /// to `i + 1`).
    fn check(&mut self, i: usize, now: Instant) -> Result<bool, LogError> {
        let f = &self.files[i];
        // A closed file is checked when it is opened again.
        let Some(file) = f.file.as_ref() else {
            return Ok(false);
        };
        let md = file.metadata().map_err(io_err(Path::new(&f.src)))?;
        let size = md.len();
        // The size alone would let a copytruncate refilled to the same size pass unseen,
        // and its lines be read from the wrong offset: the head is compared unless an old
        // enough ctime says nothing at all happened to the file.
        if size == f.size && size >= f.offset && f.stamp.is_some_and(|s| s.vouches_for(&md)) {
            return Ok(false);
        }
        let same_head = file::head_matches(file, f.head).map_err(io_err(Path::new(&f.src)))?;
        if size < f.offset || !same_head {
            // Lines read before the truncation must reach the spool before the offset resets.
            self.commit()?;
            let f = &self.files[i];
            tracing::warn!(src = %f.src, size, offset = f.offset, "log file truncated (copytruncate?); reading it from its start");
            counters::add(&counters::files_truncated, 1);
            let fallback = PathBuf::from(&f.src);
            let ident = Ident {
                src: &f.src,
                path: f.path.as_deref().unwrap_or(&fallback),
                dev: f.dev,
                ino: f.ino,
                head: f.head,
                offset: f.offset,
                part: f.part,
            };
            let copy = find_copy(&ident, &self.files, now);
            let f = &mut self.files[i];
            f.offset = 0;
            f.committed = 0;
            f.part = None;
            f.committed_part = None;
            f.tail_since = None;
            f.head = f
                .file
                .as_ref()
                .and_then(|h| file::head_of(h).ok())
                .unwrap_or(Head::EMPTY);
            f.size = size;
            f.stamp = file::Stamp::of(&md);
            f.changed_at = now;
            if let Some(copy) = copy {
                // Read the copy's unread rest first: it comes before the new lines.
                tracing::info!(src = %copy.src, offset = copy.offset, "reading the rest of the log file from its copy");
                self.files.insert(i, copy);
                return Ok(true);
            }
            return Ok(false);
        }
        if (self.files[i].head.len as u64) < file::HEAD_MAX && size > self.files[i].head.len as u64
        {
            let f = &mut self.files[i];
            if let Some(h) = f.file.as_ref().and_then(|h| file::head_of(h).ok()) {
                f.head = h;
            }
        }
        let f = &mut self.files[i];
        if size != f.size {
            f.changed_at = now;
        }
        f.size = size;
        f.stamp = file::Stamp::of(&md);
        Ok(false)
    }

    /// `check` every file but the one being read (`cur`, kept pointing at it; `end` counts
    /// the copies inserted before it).
    fn check_others(
        &mut self,
        cur: &mut usize,
        end: &mut usize,
        now: Instant,
    ) -> Result<(), LogError> {
        let mut j = 0;
        while j < self.files.len() {
            if j == *cur {
                j += 1;
                continue;
            }
            match self.check(j, now) {
                Ok(true) => {
                    if j < *cur {
                        *cur += 1;
                    }
                    if j < *end {
                        *end += 1;
                    }
                    j += 2;
                }
                Ok(false) => j += 1,
                Err(LogError::Stopping) => return Err(LogError::Stopping),
                Err(e) => {
                    tracing::warn!(error = %e, "log file check failed");
                    j += 1;
                }
            }
        }
        Ok(())
    }

    /// Read one buffer of file `i` from its offset into the batch.
    fn read(&mut self, i: usize, now: Instant) -> Result<Stop, LogError> {
        let mut buf = std::mem::take(&mut self.buf);
        let r = self.read_with(i, now, &mut buf);
        self.buf = buf;
        r
    }

    fn read_with(&mut self, i: usize, now: Instant, buf: &mut Vec<u8>) -> Result<Stop, LogError> {
        let (max_lines, max_bytes, flush) = (
            self.opts.max_batch_lines,
            self.opts.max_batch_bytes,
            self.opts.flush_timeout,
        );
        let Tailer { files, batch, .. } = self;
        let f = &mut files[i];
        if batch.lines.len() >= max_lines || batch.bytes >= max_bytes {
            return Ok(Stop::Full);
        }
        let Some(handle) = f.file.as_ref() else {
            return Ok(Stop::Eof);
        };
        let n = file::read_at(handle, buf, f.offset).map_err(io_err(Path::new(&f.src)))?;
        if n == 0 {
            f.tail_since = None;
            return Ok(Stop::Eof);
        }
        let ts = now_ns();
        let data = &buf[..n];
        let mut pos = 0;
        let mut lines = 0u64;
        let mut full = false;
        while let Some(nl) = file::find_nl(&data[pos..]) {
            batch.emit(
                &f.tag,
                &data[pos..pos + nl],
                f.offset + pos as u64,
                f.part.take(),
                ts,
                now,
            );
            pos += nl + 1;
            lines += 1;
            if batch.lines.len() >= max_lines || batch.bytes >= max_bytes {
                full = true;
                break;
            }
        }
        f.offset += pos as u64;
        counters::add(&counters::lines_read, lines);
        counters::add(&counters::bytes_read, pos as u64);
        if full {
            return Ok(Stop::Full);
        }
        if pos == n {
            if n < buf.len() {
                return Ok(Stop::Eof);
            }
            return Ok(Stop::More);
        }
        if n == buf.len() {
            if pos > 0 {
                return Ok(Stop::More); // the unfinished line is read again from the new offset
            }
            if buf.len() < MAX_BUF {
                buf.resize(buf.len() * 2, 0);
                return Ok(Stop::More);
            }
            // A line longer than MAX_BUF: ship what there is as numbered parts, cut on a
            // character boundary, and go on with the rest of the line.
            let cut = char_boundary(data);
            let next = batch.emit(
                &f.tag,
                &data[..cut],
                f.offset,
                Some(f.part.unwrap_or(1)),
                ts,
                now,
            );
            f.part = Some(next);
            f.offset += cut as u64;
            counters::add(&counters::bytes_read, cut as u64);
            return Ok(Stop::More);
        }
        // At the end of the file with a line still missing its newline.
        let rest = &data[pos..n];
        match f.tail_since {
            Some((at, since)) if at == f.offset => {
                if now.duration_since(since) >= flush {
                    // The writer paused mid-line: ship what there is as a numbered part, so
                    // the rest (part 2, its offset right after this one) is linked to it.
                    let cut = match char_boundary(rest) {
                        0 => rest.len(),
                        c => c,
                    };
                    let next = batch.emit(
                        &f.tag,
                        &rest[..cut],
                        f.offset,
                        Some(f.part.unwrap_or(1)),
                        ts,
                        now,
                    );
                    f.part = Some(next);
                    f.offset += cut as u64;
                    counters::add(&counters::lines_read, 1);
                    counters::add(&counters::bytes_read, cut as u64);
                    f.tail_since = None;
                }
            }
            _ => f.tail_since = Some((f.offset, now)),
        }
        Ok(Stop::Eof)
    }

    /// Close rotated-away files that were read to their end, queued, and left alone for
    /// `rotate_wait`: they drop out of the checkpoint, so state stays bounded.
    fn forget_finished(&mut self, now: Instant) {
        let wait = self.opts.rotate_wait;
        self.files.retain(|f| {
            if f.gone {
                return false;
            }
            // A file not open yet (a checkpoint's, out of descriptors) is not finished.
            let done = f.path.is_none()
                && f.file.is_some()
                && f.offset >= f.size
                && f.offset == f.committed
                && f.tail_since.is_none()
                && now.duration_since(f.changed_at) >= wait;
            if done {
                tracing::info!(src = %f.src, offset = f.offset, "finished a rotated log file");
            }
            !done
        });
    }
}

/// What is known of a file that was truncated: enough to recognise its copy.
struct Ident<'a> {
    src: &'a str,
    path: &'a Path,
    dev: u64,
    ino: u64,
    head: Head,
    offset: u64,
    part: Option<u32>,
}

/// copytruncate copies the file and then truncates it in place, so what had not been read yet
/// is in the copy: a file in the same directory that starts with the same head and reaches at
/// least the offset (the newest such file if several do). Tracked from that offset, it yields
/// the lines that would otherwise be lost.
fn find_copy(f: &Ident, tracked: &[Tracked], now: Instant) -> Option<Tracked> {
    if f.head.len == 0 {
        return None;
    }
    let mut best: Option<(std::time::SystemTime, File, std::fs::Metadata)> = None;
    for ent in std::fs::read_dir(pattern::parent_dir(f.path))
        .ok()?
        .flatten()
    {
        let Ok(md) = ent.metadata() else { continue };
        if !md.is_file() || md.len() < f.offset || (md.dev() == f.dev && md.ino() == f.ino) {
            continue;
        }
        if tracked
            .iter()
            .any(|t| t.dev == md.dev() && t.ino == md.ino())
        {
            continue;
        }
        let Ok(file) = File::open(ent.path()) else {
            continue;
        };
        if !file::head_matches(&file, f.head).unwrap_or(false) {
            continue;
        }
        let mtime = md.modified().unwrap_or(UNIX_EPOCH);
        if best.as_ref().is_none_or(|(t, _, _)| mtime > *t) {
            best = Some((mtime, file, md));
        }
    }
    let (_, file, md) = best?;
    let mut t = Tracked::new(f.src.to_owned(), None, file, &md, f.head, f.offset, now);
    t.part = f.part;
    t.committed_part = f.part;
    Some(t)
}

/// Where to cut `data` so no UTF-8 character is split: before an incomplete one at its end.
fn char_boundary(data: &[u8]) -> usize {
    let n = data.len();
    let mut k = n;
    while k > 0 && n - k < 3 && (data[k - 1] & 0xC0) == 0x80 {
        k -= 1;
    }
    if k > 0 && data[k - 1] >= 0xC0 {
        let need = if data[k - 1] >= 0xF0 {
            4
        } else if data[k - 1] >= 0xE0 {
            3
        } else {
            2
        };
        if n - (k - 1) < need && k > 1 {
            return k - 1;
        }
    }
    n
}

/// Open the file with identity (dev, ino): at `path` if it is still there, else among the
/// files of the same directory. None only when it is surely gone; an error (out of
/// descriptors, no access) says it could not be looked for.
fn locate(
    path: &Path,
    dev: u64,
    ino: u64,
) -> std::io::Result<Option<(File, std::fs::Metadata, PathBuf)>> {
    let open = |p: &Path| -> std::io::Result<Option<(File, std::fs::Metadata, PathBuf)>> {
        let f = match File::open(p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let md = f.metadata()?;
        Ok((md.dev() == dev && md.ino() == ino && md.is_file()).then(|| (f, md, p.to_owned())))
    };
    if let Ok(md) = std::fs::metadata(path) {
        if md.dev() == dev && md.ino() == ino {
            if let Some(found) = open(path)? {
                return Ok(Some(found));
            }
        }
    }
    let dir = match std::fs::read_dir(pattern::parent_dir(path)) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    for ent in dir.flatten() {
        if ent
            .metadata()
            .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
        {
            return open(&ent.path());
        }
    }
    Ok(None)
}
