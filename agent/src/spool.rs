//! The bounded on-disk queue between the sources and the sender.
//!
//! Every batch is written here (fsync + rename) before it is sent, and removed only once the
//! collector acked it, so neither a collector outage nor an agent restart loses data. An entry
//! may carry a source checkpoint (e.g. log file offsets); it is promoted to that source's acked
//! checkpoint when the entry is acked, and a restarting source resumes from the newest
//! checkpoint still in the spool, so lines are neither lost nor read twice.
//!
//! Several batches may be in flight at once and their acks may come back in any order, so an
//! acked entry is only marked done; [`Spool::promote`] then settles done entries from the head
//! of the queue, in seq order. A later ack never promotes a checkpoint past an earlier batch
//! that is still unacked.
//!
//! When the spool is full, the oldest metric entries are evicted and their points counted as
//! dropped; log entries are never evicted: `push` of a log entry waits instead, because the
//! log file itself is the buffer. A state dir that cannot be written (disk full, EIO) is
//! treated the same way: metrics make room oldest first, log pushes wait with backoff.
//!
//! The highest seq handed out is kept in `seq` (fsync + rename, reserved in blocks), so seqs
//! keep increasing within a boot even when every batch was acked and the clock stepped back.
//!
//! Metric entries are the exception to "fsync before send": one is written and renamed at
//! once (so an agent restart finds it: the page cache outlives the process) but synced only
//! if it is still here [`SYNC_AFTER`] later, see [`Spool::sync_overdue`]. With a collector
//! that answers, the ack removes it first and the idle agent's one write per interval costs no
//! fsync. What that risks is a metric sample of the last second on a kernel crash or power
//! loss; a torn entry is then caught by its stored length and set aside. Log and drift
//! entries carry checkpoints, whose order a crash must not break, so they keep the fsync.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use phoenix_wire::Report;
use serde::{Deserialize, Serialize};

use crate::counters;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool directory {0}: {1} (check that the state dir is writable by the agent and has free space)")]
    Io(PathBuf, io::Error),
    #[error("the agent is stopping")]
    Stopping,
}

/// What an entry holds; decides the eviction order when the spool is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Metrics,
    Logs,
    Drift,
}

/// The header stored in front of each entry's body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub kind: Kind,
    pub points: u64,
    /// Source name and its checkpoint after this batch, promoted on ack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<(String, serde_json::Value)>,
    /// Handled without an ack (split into halves, or set aside in `rejected/`): nothing is
    /// left to send, only the checkpoint to promote in order. Stored as a header-only file.
    #[serde(default, skip_serializing_if = "is_false")]
    pub settled: bool,
    /// How often this batch's content was queued again under a new seq (see
    /// [`Spool::reseq`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reseqs: u8,
    /// The body's length when written: an entry cut short by a crash before its sync is
    /// set aside at start-up instead of being sent (older entries have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub len: Option<u64>,
    /// Acked (or settled) and waiting for the batches before it.
    #[serde(skip)]
    pub done: bool,
    #[serde(skip)]
    pub bytes: u64,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u8) -> bool {
    *n == 0
}

/// A batch ready to send.
#[derive(Debug)]
pub struct Entry {
    pub seq: u64,
    pub meta: Meta,
    pub body: Vec<u8>,
}

#[derive(Debug)]
struct Inner {
    index: BTreeMap<u64, Meta>,
    /// Sequence numbers handed out whose entries are still being written. The sender never
    /// sends past the lowest of them, so batches leave in seq order.
    pending: std::collections::BTreeSet<u64>,
    bytes: u64,
    stopping: bool,
    /// Seqs below this are covered by the saved `seq` file.
    ceiling: u64,
    /// Bumped on every change, so a waiter cannot miss one (see [`Spool::wait_change`]).
    generation: u64,
    /// Bumped whenever an entry leaves (acked, evicted, superseded): room may have appeared.
    freed: u64,
    /// After a failed write: how long to rest, until when, and `freed` at the failure. A
    /// push retries early when something was freed since.
    write_backoff: Duration,
    rest_until: Option<Instant>,
    freed_at_failure: u64,
    /// Metric entries written but not yet fsynced, with when they were written.
    unsynced: BTreeMap<u64, Instant>,
}

/// Counters the agent reports about itself in `phoenix_agent`.
#[derive(Debug, Default)]
pub struct Stats {
    pub dropped_points: AtomicU64,
    pub dropped_batches: AtomicU64,
    pub rejected_batches: AtomicU64,
    pub acked_batches: AtomicU64,
    pub log_waits: AtomicU64,
}

#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    next_seq: AtomicU64,
    inner: Mutex<Inner>,
    changed: Condvar,
    /// Only [`Spool::stop`] notifies this one: a thread in [`Spool::sleep`] is not woken by
    /// every push and ack as waiters on `changed` are.
    stopped: Condvar,
    pub stats: Stats,
    /// Called once by [`Spool::stop`], so a thread that sleeps on something else than this
    /// spool (inotify, /dev/kmsg, a request queue) is woken by the stop instead of polling for it.
    stop_hooks: StopHooks,
}

type StopHook = Box<dyn Fn() + Send + Sync>;

/// One hook per name: a source started again replaces its old hook instead of adding one.
#[derive(Default)]
struct StopHooks(Mutex<BTreeMap<&'static str, StopHook>>);

impl std::fmt::Debug for StopHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f.debug_list().entries(g.keys()).finish()
    }
}

/// How many seqs one save of the `seq` file covers: one fsync per this many batches.
const SEQ_RESERVE: u64 = 4096;
const MIN_WRITE_BACKOFF: Duration = Duration::from_millis(500);
const MAX_WRITE_BACKOFF: Duration = Duration::from_secs(30);
/// How long a metric entry may stay in the page cache only: a collector that answers acks
/// it well within this, so it is removed unsynced.
pub const SYNC_AFTER: Duration = Duration::from_secs(1);

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl Spool {
    /// Open (or create) the spool in `dir`, indexing what a previous run left unsent.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        let err = |e| SpoolError::Io(dir.to_path_buf(), e);
        fs::create_dir_all(dir).map_err(err)?;
        let mut index = BTreeMap::new();
        let mut bytes = 0;
        for ent in fs::read_dir(dir).map_err(err)? {
            let ent = ent.map_err(err)?;
            let name = ent.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".tmp") {
                // A write that never reached its rename: the batch was not yet owned by the
                // spool, so its source will produce it again.
                best_effort("fs::remove_file", fs::remove_file(ent.path()));
                continue;
            }
            let Some(seq) = name
                .strip_suffix(".batch")
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            match read_entry(&ent.path()) {
                Ok((mut meta, body)) => {
                    meta.bytes = body.len() as u64;
                    meta.done = meta.settled;
                    bytes += meta.bytes;
                    index.insert(seq, meta);
                }
                Err(e) => {
                    tracing::warn!(file = %ent.path().display(), error = %e, "unreadable spool entry set aside");
                    best_effort(
                        "fs::rename",
                        fs::rename(ent.path(), dir.join(format!("{name}.corrupt"))),
                    );
                }
            }
        }
        // Seqs start from the clock so they keep increasing even if the state dir was wiped,
        // and never below the saved ceiling, so a clock stepped back cannot reuse one: the
        // collector drops a (boot, seq) it already took.
        let saved = fs::read_to_string(dir.join("seq"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let last = index.keys().next_back().copied().unwrap_or(0);
        let next = now_micros().max(last + 1).max(saved);
        Ok(Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            next_seq: AtomicU64::new(next),
            inner: Mutex::new(Inner {
                index,
                pending: Default::default(),
                bytes,
                stopping: false,
                ceiling: next,
                generation: 0,
                freed: 0,
                write_backoff: Duration::ZERO,
                rest_until: None,
                freed_at_failure: 0,
                unsynced: BTreeMap::new(),
            }),
            changed: Condvar::new(),
            stopped: Condvar::new(),
            stats: Stats::default(),
            stop_hooks: StopHooks::default(),
        })
    }

    pub fn bytes(&self) -> u64 {
        self.inner.lock().unwrap().bytes
    }

    /// Entries not yet settled (sent and acked, or set aside).
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries still to be sent (not acked and not settled).
    pub fn unsent(&self) -> usize {
        let g = self.inner.lock().unwrap();
        g.index.values().filter(|m| !m.done).count()
    }

    /// The highest seq in the spool.
    pub fn last_seq(&self) -> Option<u64> {
        self.inner.lock().unwrap().index.keys().next_back().copied()
    }

    /// The newest checkpoint of `source` still waiting in the spool, if any.
    pub fn pending_checkpoint(&self, source: &str) -> Option<serde_json::Value> {
        let g = self.inner.lock().unwrap();
        g.index.values().rev().find_map(|m| match &m.checkpoint {
            Some((s, v)) if s == source => Some(v.clone()),
            _ => None,
        })
    }

    /// Queue a report. Sets its sequence number, writes it durably, wakes the sender.
    /// Log entries wait (up to `wait`) while the spool is full or the state dir cannot be
    /// written; metric entries evict the oldest metric entries. Returns the seq, or None when
    /// a log entry timed out waiting for room, or a metric entry had to be dropped.
    pub fn push<L: serde::Serialize>(
        &self,
        kind: Kind,
        report: Report<L>,
        checkpoint: Option<(String, serde_json::Value)>,
        wait: Duration,
    ) -> Result<Option<u64>, SpoolError> {
        self.push_with(kind, report, checkpoint, wait, 0)
    }

    fn push_with<L: serde::Serialize>(
        &self,
        kind: Kind,
        report: Report<L>,
        checkpoint: Option<(String, serde_json::Value)>,
        wait: Duration,
        reseqs: u8,
    ) -> Result<Option<u64>, SpoolError> {
        let seq = {
            let mut g = self.inner.lock().unwrap();
            let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
            g.pending.insert(seq);
            seq
        };
        let res = self.push_as(seq, kind, report, checkpoint, wait, reseqs);
        // On every path: the seq is no longer pending (on success it already went, with the
        // insert, under one lock).
        let mut g = self.inner.lock().unwrap();
        if g.pending.remove(&seq) {
            g.generation += 1;
            drop(g);
            self.changed.notify_all();
        }
        res
    }

    fn push_as<L: serde::Serialize>(
        &self,
        seq: u64,
        kind: Kind,
        mut report: Report<L>,
        checkpoint: Option<(String, serde_json::Value)>,
        wait: Duration,
        reseqs: u8,
    ) -> Result<Option<u64>, SpoolError> {
        let points = (report.metrics.len() + report.logs.len()) as u64;
        report.seq = seq;
        let body = phoenix_wire::encode(&report);
        let meta = Meta {
            kind,
            points,
            checkpoint,
            settled: false,
            reseqs,
            done: false,
            bytes: body.len() as u64,
            len: Some(body.len() as u64),
        };
        let need = meta.bytes;
        let deadline = Instant::now() + wait;
        let mut g = self.inner.lock().unwrap();
        loop {
            if g.stopping {
                return Err(SpoolError::Stopping);
            }
            let now = Instant::now();
            // A state dir that failed a write gets a rest before the next try, unless an entry
            // left since (room may have appeared): a full disk must not mean a busy loop.
            let resting = g.rest_until.is_some_and(|t| now < t) && g.freed == g.freed_at_failure;
            // Drift states are small and must not be lost: they may overshoot the bound.
            let fits =
                g.bytes + need <= self.max_bytes || g.index.is_empty() || kind == Kind::Drift;
            if !fits {
                // Make room from the oldest metrics first: they are superseded by newer samples.
                if self.evict_oldest_metrics(&mut g, &counters::dropped_points_spool_full) {
                    continue;
                }
                if kind == Kind::Metrics {
                    // Only log and drift entries left: this sample is the one to drop.
                    self.count_dropped(points, &counters::dropped_points_spool_full);
                    return Ok(None);
                }
                self.stats.log_waits.fetch_add(1, Ordering::Relaxed);
            } else if !resting {
                drop(g);
                let written = self.write(seq, &meta, &body, kind != Kind::Metrics);
                g = self.inner.lock().unwrap();
                match written {
                    Ok(()) => {
                        g.write_backoff = Duration::ZERO;
                        g.rest_until = None;
                        if kind == Kind::Metrics {
                            g.unsynced.insert(seq, Instant::now());
                        }
                        break;
                    }
                    Err(e) => {
                        counters::add(&counters::spool_write_errors, 1);
                        g.write_backoff =
                            (g.write_backoff * 2).clamp(MIN_WRITE_BACKOFF, MAX_WRITE_BACKOFF);
                        g.rest_until = Some(Instant::now() + g.write_backoff);
                        g.freed_at_failure = g.freed;
                        // The disk is the limit now: the oldest metrics make room, for new
                        // metrics and for log lines alike (a log file may rotate away).
                        if kind != Kind::Drift
                            && self.evict_oldest_metrics(&mut g, &counters::dropped_points_disk)
                        {
                            continue;
                        }
                        match kind {
                            Kind::Logs => {
                                tracing::warn!(seq, error = %e, retry_ms = g.write_backoff.as_millis() as u64, "cannot write a log batch to the spool; will retry (the log file keeps the lines)");
                            }
                            Kind::Metrics => {
                                self.count_dropped(points, &counters::dropped_points_disk);
                                return Err(SpoolError::Io(self.dir.clone(), e));
                            }
                            Kind::Drift => return Err(SpoolError::Io(self.dir.clone(), e)),
                        }
                    }
                }
            } else if kind == Kind::Metrics {
                // Resting after a failed write: a new sample replaces the oldest one.
                if self.evict_oldest_metrics(&mut g, &counters::dropped_points_disk) {
                    continue;
                }
                self.count_dropped(points, &counters::dropped_points_disk);
                return Err(SpoolError::Io(
                    self.dir.clone(),
                    io::Error::other("the last write failed; resting before the next"),
                ));
            } else if kind == Kind::Drift {
                return Err(SpoolError::Io(
                    self.dir.clone(),
                    io::Error::other("the last write failed; resting before the next"),
                ));
            }
            // Only log entries get here: wait for room, or for the rest to end.
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let mut nap = deadline - now;
            if let Some(t) = g.rest_until.filter(|t| *t > now) {
                nap = nap.min(t - now);
            }
            g = self.changed.wait_timeout(g, nap).unwrap().0;
        }
        if kind == Kind::Drift {
            // A drift state supersedes every older one (each carries the whole entry list), so
            // a long outage with many changes keeps one, not one per change. Removing an
            // entry the sender holds is harmless: its ack then finds nothing to remove.
            let stale: Vec<u64> = g
                .index
                .iter()
                .filter(|(s, m)| m.kind == Kind::Drift && **s < seq && !m.done)
                .map(|(s, _)| *s)
                .collect();
            for s in stale {
                let m = g.index.remove(&s).expect("listed above");
                g.bytes -= m.bytes;
                g.freed += 1;
                best_effort("fs::remove_file", fs::remove_file(self.path(s)));
            }
        }
        g.bytes += meta.bytes;
        g.index.insert(seq, meta);
        g.pending.remove(&seq);
        g.generation += 1;
        drop(g);
        self.changed.notify_all();
        Ok(Some(seq))
    }

    /// Evict the oldest metric entry not yet acked; false when there is none.
    fn evict_oldest_metrics(&self, g: &mut Inner, reason: &AtomicU64) -> bool {
        let victim = g
            .index
            .iter()
            .find(|(_, m)| m.kind == Kind::Metrics && !m.done)
            .map(|(s, _)| *s);
        let Some(v) = victim else { return false };
        let m = g.index.remove(&v).expect("found above");
        g.unsynced.remove(&v);
        g.bytes -= m.bytes;
        g.freed += 1;
        g.generation += 1;
        best_effort("fs::remove_file", fs::remove_file(self.path(v)));
        self.count_dropped(m.points, reason);
        true
    }

    fn count_dropped(&self, points: u64, reason: &AtomicU64) {
        self.stats
            .dropped_points
            .fetch_add(points, Ordering::Relaxed);
        self.stats.dropped_batches.fetch_add(1, Ordering::Relaxed);
        counters::add(reason, points);
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.batch"))
    }

    /// Write an entry, durably unless `durable` is false (then [`Spool::sync_overdue`] syncs
    /// it if it is still here later). Saves a new seq ceiling first when `seq` reaches the old
    /// one; that one is always synced, so no seq is handed out twice.
    fn write(&self, seq: u64, meta: &Meta, body: &[u8], durable: bool) -> io::Result<()> {
        self.save_ceiling(seq)?;
        let tmp = self.dir.join(format!(".tmp-{seq}"));
        let res = (|| {
            let mut f = fs::File::create(&tmp)?;
            let mut head = serde_json::to_vec(meta).expect("meta serialises");
            head.push(b'\n');
            f.write_all(&head)?;
            f.write_all(body)?;
            if durable {
                f.sync_data()?;
            }
            drop(f);
            fs::rename(&tmp, self.path(seq))?;
            if durable {
                sync_dir(&self.dir)?;
            }
            Ok(())
        })();
        if res.is_err() {
            // A half-written temp file on a full disk would only take the room we wait for.
            fs::remove_file(&tmp).ok();
        }
        res
    }

    /// Keep the saved ceiling above every seq handed out, in blocks of [`SEQ_RESERVE`].
    fn save_ceiling(&self, seq: u64) -> io::Result<()> {
        let mut g = self.inner.lock().unwrap();
        if seq < g.ceiling {
            return Ok(());
        }
        let ceiling = seq + SEQ_RESERVE;
        // Under the lock, so two writers cannot save ceilings out of order; once per block.
        write_atomic(&self.dir.join("seq"), ceiling.to_string().as_bytes())?;
        g.ceiling = ceiling;
        Ok(())
    }

    /// When the oldest entry written without a sync is due for one ([`Spool::sync_overdue`]).
    pub fn sync_due(&self) -> Option<Instant> {
        let g = self.inner.lock().unwrap();
        g.unsynced.values().min().map(|t| *t + SYNC_AFTER)
    }

    /// Fsync every entry written without a sync at least `age` ago that is still here (not
    /// acked yet: the collector is slow or away), then the directory once. An entry that
    /// cannot be synced stays (it is sent as usual) and the failure is counted and logged:
    /// retrying an fsync that failed does not make its data durable.
    pub fn sync_overdue(&self, age: Duration) {
        let now = Instant::now();
        let mut due = Vec::new();
        self.inner.lock().unwrap().unsynced.retain(|s, t| {
            let keep = now.saturating_duration_since(*t) < age;
            if !keep {
                due.push(*s);
            }
            keep
        });
        let mut synced = false;
        for seq in due {
            match fs::File::open(self.path(seq)).and_then(|f| f.sync_data()) {
                Ok(()) => synced = true,
                // Acked and removed meanwhile: nothing left to keep.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    counters::add(&counters::spool_write_errors, 1);
                    tracing::warn!(seq, error = %e, "cannot fsync a spool entry; it is still sent, but may not survive a crash");
                }
            }
        }
        if synced {
            if let Err(e) = sync_dir(&self.dir) {
                counters::add(&counters::spool_write_errors, 1);
                tracing::warn!(error = %e, "cannot fsync the spool directory");
            }
        }
    }

    /// A change counter for [`Spool::wait_change`].
    pub fn generation(&self) -> u64 {
        self.inner.lock().unwrap().generation
    }

    /// Wait until something changed since `generation` (an entry, an ack, a [`Spool::poke`])
    /// or `d` passed; true when the agent is stopping.
    pub fn wait_change(&self, generation: u64, d: Duration) -> bool {
        let g = self.inner.lock().unwrap();
        let g = self
            .changed
            .wait_timeout_while(g, d, |i| !i.stopping && i.generation == generation)
            .unwrap()
            .0;
        g.stopping
    }

    /// Wake whoever waits in [`Spool::wait_change`] (the sender's helpers report this way).
    pub fn poke(&self) {
        self.inner.lock().unwrap().generation += 1;
        self.changed.notify_all();
    }

    /// The first entry after `after` that is still to be sent, without waiting. Never one
    /// past an entry still being written, so batches leave in seq order.
    pub fn next_after(&self, after: Option<u64>) -> Option<Entry> {
        loop {
            let seq = {
                let g = self.inner.lock().unwrap();
                let from = after.map_or(0, |a| a.saturating_add(1));
                let (seq, _) = g.index.range(from..).find(|(_, m)| !m.done)?;
                if g.pending.first().is_some_and(|p| p < seq) {
                    return None;
                }
                *seq
            };
            if let Some(e) = self.get(seq) {
                return Some(e);
            }
        }
    }

    /// Entry `seq` if it is still to be sent (it may have been evicted or superseded).
    pub fn get(&self, seq: u64) -> Option<Entry> {
        if self
            .inner
            .lock()
            .unwrap()
            .index
            .get(&seq)
            .is_none_or(|m| m.done)
        {
            return None;
        }
        match read_entry(&self.path(seq)) {
            Ok((meta, body)) => Some(Entry { seq, meta, body }),
            Err(e) => {
                tracing::warn!(seq, error = %e, "spool entry vanished or unreadable; skipping it");
                self.remove(seq);
                None
            }
        }
    }

    /// The oldest entry still to be sent, waiting up to `wait` for one to appear (and for any
    /// older entry still being written, so entries always go out in seq order).
    pub fn oldest(&self, wait: Duration) -> Option<Entry> {
        let deadline = Instant::now() + wait;
        loop {
            let generation = self.generation();
            if let Some(e) = self.next_after(None) {
                return Some(e);
            }
            let now = Instant::now();
            if now >= deadline || self.wait_change(generation, deadline - now) {
                return None;
            }
        }
    }

    /// The collector took `seq`: it is done, and is settled once every batch before it is.
    pub fn mark_acked(&self, seq: u64) {
        let mut g = self.inner.lock().unwrap();
        if let Some(m) = g.index.get_mut(&seq) {
            m.done = true;
        }
        g.generation += 1;
        drop(g);
        self.changed.notify_all();
        self.stats.acked_batches.fetch_add(1, Ordering::Relaxed);
    }

    /// Settle the done entries at the head of the queue, in seq order: promote their
    /// checkpoints, then remove them. Stops at the first entry still out. Returns how many
    /// were removed; an error (the state dir cannot be written) leaves the rest for later.
    pub fn promote(&self, state_dir: &Path) -> io::Result<usize> {
        let run: Vec<(u64, Option<(String, serde_json::Value)>)> = {
            let g = self.inner.lock().unwrap();
            g.index
                .iter()
                .take_while(|(s, m)| m.done && g.pending.first().is_none_or(|p| p > s))
                .map(|(s, m)| (*s, m.checkpoint.clone()))
                .collect()
        };
        if run.is_empty() {
            return Ok(0);
        }
        // Only the newest checkpoint of each source in the run needs writing: one fsync per
        // source, not per batch. Entries are removed in seq order after it, so a crash in
        // between leaves a suffix of the run whose newest checkpoint is the one written.
        let mut newest: BTreeMap<&str, &serde_json::Value> = BTreeMap::new();
        for (_, c) in &run {
            if let Some((src, v)) = c {
                newest.insert(src, v);
            }
        }
        for (src, v) in newest {
            if let Err(e) = write_atomic(
                &state_dir.join(format!("{src}.acked.json")),
                &serde_json::to_vec(v).unwrap_or_default(),
            ) {
                counters::add(&counters::state_write_errors, 1);
                return Err(e);
            }
        }
        for (s, _) in &run {
            self.remove(*s);
        }
        Ok(run.len())
    }

    /// The collector took this entry: mark it and settle what can be settled.
    pub fn ack(&self, entry: &Entry, state_dir: &Path) -> io::Result<()> {
        self.mark_acked(entry.seq);
        self.promote(state_dir).map(|_| ())
    }

    /// Replace an entry the collector refused with two entries holding half its points each
    /// (new seqs, no checkpoint), so one bad point cannot take good ones with it. The entry
    /// itself stays as a settled header holding its checkpoint, promoted in order. False when
    /// it holds a single point or line (or none): that one is for [`Spool::reject`].
    pub fn split(&self, seq: u64) -> io::Result<bool> {
        let Some(e) = self.get(seq) else {
            return Ok(true); // gone already: nothing left to split
        };
        let json = phoenix_wire::gunzip_limited(&e.body, 1 << 30).map_err(io::Error::other)?;
        let mut first: Report = serde_json::from_slice(&json).map_err(io::Error::other)?;
        let (n_m, n_l) = (first.metrics.len(), first.logs.len());
        if n_m + n_l <= 1 {
            return Ok(false);
        }
        // Drift and checks stay with the first part; the second takes half the points, or
        // all the lines when the entry holds both (metrics and lines fail separately).
        let mut second = first.clone();
        second.drift = None;
        second.checks = Vec::new();
        if n_m > 0 && n_l > 0 {
            second.metrics = Vec::new();
            first.logs = Vec::new();
        } else if n_m > 1 {
            second.metrics = first.metrics.split_off(n_m / 2);
        } else {
            second.logs = first.logs.split_off(n_l / 2);
        }
        self.push_part(e.meta.kind, first, 0)?;
        self.push_part(e.meta.kind, second, 0)?;
        self.settle(seq, &e.meta)?;
        counters::add(&counters::batches_bisected, 1);
        Ok(true)
    }

    /// Queue the content of entry `seq` again under a new seq (no checkpoint) and settle the
    /// entry. For an entry a collector called a duplicate although this agent never had it
    /// stored: a collector that keeps only the highest seq per boot says so for a batch that
    /// arrived after a later one. Sending points twice is harmless (they carry their own
    /// timestamps), dropping them is not.
    pub fn reseq(&self, seq: u64) -> io::Result<()> {
        let Some(e) = self.get(seq) else {
            return Ok(());
        };
        let json = phoenix_wire::gunzip_limited(&e.body, 1 << 30).map_err(io::Error::other)?;
        let r: Report = serde_json::from_slice(&json).map_err(io::Error::other)?;
        self.push_part(e.meta.kind, r, e.meta.reseqs.saturating_add(1))?;
        self.settle(seq, &e.meta)
    }

    /// Queue a part of a split entry: no waiting for room (it replaces what it came from).
    fn push_part(&self, kind: Kind, report: Report, reseqs: u8) -> io::Result<()> {
        if report.metrics.is_empty() && report.logs.is_empty() && report.drift.is_none() {
            return Ok(());
        }
        match self.push_with(kind, report, None, Duration::ZERO, reseqs) {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(io::Error::other("no room in the spool for a split batch")),
            Err(SpoolError::Io(_, e)) => Err(e),
            Err(SpoolError::Stopping) => Err(io::Error::other("stopping")),
        }
    }

    /// Turn entry `seq` into a header-only settled entry (atomically), keeping its checkpoint.
    fn settle(&self, seq: u64, meta: &Meta) -> io::Result<()> {
        let mut m = meta.clone();
        m.settled = true;
        m.len = None; // header only now
        let mut head = serde_json::to_vec(&m).expect("meta serialises");
        head.push(b'\n');
        write_atomic(&self.path(seq), &head)?;
        let mut g = self.inner.lock().unwrap();
        if let Some(e) = g.index.get_mut(&seq) {
            e.settled = true;
            e.done = true;
            let old = e.bytes;
            e.bytes = 0;
            g.bytes -= old;
            g.freed += 1;
        }
        g.generation += 1;
        drop(g);
        self.changed.notify_all();
        Ok(())
    }

    /// The collector refused `seq` (a single point or line, or an entry that cannot be
    /// split) for good: keep it aside in `rejected/` for a person, never silently, and move
    /// on. `rejected/` is bounded by the spool's size; its oldest entries go first, counted.
    /// If the entry cannot be set aside, it stays in the spool and the error is returned.
    pub fn reject(&self, seq: u64, state_dir: &Path, reason: &str) -> io::Result<()> {
        let Some(e) = self.get(seq) else {
            return Ok(());
        };
        let dir = state_dir.join("rejected");
        fs::create_dir_all(&dir)?;
        self.bound_rejected(&dir, e.meta.bytes + 512);
        let kept = dir.join(format!("{seq:020}.batch"));
        fs::remove_file(&kept).ok();
        // A link, not a rename: the spool's file stays until the settled header replaces it,
        // so a failure here leaves the batch where it was.
        fs::hard_link(self.path(seq), &kept)?;
        best_effort(
            "fs::write",
            fs::write(dir.join(format!("{seq:020}.reason")), reason),
        );
        self.settle(seq, &e.meta)?;
        self.stats.rejected_batches.fetch_add(1, Ordering::Relaxed);
        let lines = if e.meta.kind == Kind::Logs {
            e.meta.points
        } else {
            0
        };
        counters::add(&counters::refused_lines, lines);
        counters::add(&counters::refused_points, e.meta.points - lines);
        tracing::error!(seq, reason, dir = %dir.display(), "collector refused a batch for good; kept it in the rejected dir");
        Ok(())
    }

    /// Remove the oldest batches of `rejected/` until `room` more bytes fit in the bound.
    fn bound_rejected(&self, dir: &Path, room: u64) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        let mut files: Vec<(PathBuf, u64)> = rd
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".batch"))
            .map(|e| (e.path(), e.metadata().map(|m| m.len()).unwrap_or(0)))
            .collect();
        files.sort();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        for (p, len) in files {
            if total + room <= self.max_bytes {
                break;
            }
            if let Ok((m, _)) = read_entry(&p) {
                if m.kind == Kind::Logs {
                    counters::add(&counters::dropped_lines, m.points);
                    counters::add(&counters::dropped_lines_rejected_full, m.points);
                } else {
                    self.stats
                        .dropped_points
                        .fetch_add(m.points, Ordering::Relaxed);
                    counters::add(&counters::dropped_points_rejected_full, m.points);
                }
            }
            best_effort("fs::remove_file", fs::remove_file(&p));
            best_effort(
                "fs::remove_file",
                fs::remove_file(p.with_extension("reason")),
            );
            total -= len;
        }
    }

    fn remove(&self, seq: u64) {
        let mut g = self.inner.lock().unwrap();
        g.unsynced.remove(&seq);
        if let Some(m) = g.index.remove(&seq) {
            g.bytes -= m.bytes;
            g.freed += 1;
            best_effort("fs::remove_file", fs::remove_file(self.path(seq)));
        }
        g.generation += 1;
        drop(g);
        self.changed.notify_all();
    }

    /// Wake every waiter and make further pushes fail; used at shutdown.
    pub fn stop(&self) {
        self.inner.lock().unwrap().stopping = true;
        self.changed.notify_all();
        self.stopped.notify_all();
        let hooks = self.stop_hooks.0.lock().unwrap_or_else(|e| e.into_inner());
        for h in hooks.values() {
            h();
        }
    }

    /// Run `wake` when the agent stops (at once if it is stopping already). `name` keys it:
    /// registering the same name again replaces the hook.
    pub fn on_stop(&self, name: &'static str, wake: impl Fn() + Send + Sync + 'static) {
        self.stop_hooks
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, Box::new(wake));
        if self.stopping() {
            let hooks = self.stop_hooks.0.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(h) = hooks.get(name) {
                h();
            }
        }
    }

    pub fn stopping(&self) -> bool {
        self.inner.lock().unwrap().stopping
    }

    /// Sleep up to `d`, returning early (true) when the agent is stopping.
    pub fn sleep(&self, d: Duration) -> bool {
        let g = self.inner.lock().unwrap();
        if g.stopping {
            return true;
        }
        let g = self
            .stopped
            .wait_timeout_while(g, d, |i| !i.stopping)
            .unwrap()
            .0;
        g.stopping
    }
}

fn read_entry(path: &Path) -> io::Result<(Meta, Vec<u8>)> {
    let data = fs::read(path)?;
    let nl = data
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| io::Error::other("no header"))?;
    let mut meta: Meta = serde_json::from_slice(&data[..nl]).map_err(io::Error::other)?;
    let body = data[nl + 1..].to_vec();
    meta.bytes = body.len() as u64;
    if let Some(want) = meta.len.filter(|n| *n != meta.bytes) {
        return Err(io::Error::other(format!(
            "cut short (a crash before its sync?): body of {} bytes, {want} written",
            meta.bytes
        )));
    }
    Ok((meta, body))
}

/// A clean-up step whose failure loses nothing (the entry is already accounted for), but
/// which must not fail in silence: a person reading the log can then see why files pile up.
fn best_effort<T>(what: &str, r: io::Result<T>) {
    if let Err(e) = r {
        tracing::warn!(op = what, error = %e, "spool clean-up step failed");
    }
}

/// Write a file so that a crash leaves either the old or the new contents, never a torn one.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("x")
    ));
    let res = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_data()?;
        drop(f);
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if res.is_err() {
        fs::remove_file(&tmp).ok();
    }
    res
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use phoenix_wire::{Identity, LogLine, Point, Value, VERSION};

    fn report(points: usize, logs: usize) -> Report {
        Report {
            v: VERSION,
            agent: Identity {
                instance_id: "i-1".into(),
                image_id: "img".into(),
                ..Default::default()
            },
            seq: 0,
            interval_ms: 1000,
            metrics: (0..points)
                .map(|i| Point {
                    m: "cpu".into(),
                    tags: Default::default(),
                    fields: [("v".to_string(), Value::Int(i as i64))].into(),
                    ts: i as i64,
                })
                .collect(),
            logs: (0..logs)
                .map(|i| LogLine {
                    src: "/x".into(),
                    ts: i as i64,
                    offset: 0,
                    msg: format!("line {i} {}", "x".repeat(200)),
                    escaped: false,
                    part: None,
                    tags: Default::default(),
                    fields: Default::default(),
                })
                .collect(),
            drift: None,
            checks: vec![],
            drift_root: None,
            protected: None,
        }
    }

    #[test]
    fn survives_reopen_in_order_with_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        let a = s
            .push(Kind::Metrics, report(3, 0), None, Duration::ZERO)
            .unwrap()
            .unwrap();
        let b = s
            .push(
                Kind::Logs,
                report(0, 2),
                Some(("logs".into(), serde_json::json!({"off": 42}))),
                Duration::ZERO,
            )
            .unwrap()
            .unwrap();
        assert!(b > a);
        drop(s);
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s.pending_checkpoint("logs").unwrap()["off"], 42);
        let e = s.oldest(Duration::ZERO).unwrap();
        assert_eq!(e.seq, a);
        let r = phoenix_wire::decode(&e.body, true, &phoenix_wire::Limits::default().any_time())
            .unwrap();
        assert_eq!(r.seq, a);
        assert_eq!(r.metrics.len(), 3);
        s.ack(&e, dir.path()).unwrap();
        let e = s.oldest(Duration::ZERO).unwrap();
        s.ack(&e, dir.path()).unwrap();
        assert!(s.is_empty());
        let acked: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join("logs.acked.json")).unwrap()).unwrap();
        assert_eq!(acked["off"], 42);
        // New sequence numbers stay above everything seen before, even after a restart.
        let s2 = Spool::open(dir.path(), 1 << 20).unwrap();
        assert!(
            s2.push(Kind::Metrics, report(1, 0), None, Duration::ZERO)
                .unwrap()
                .unwrap()
                > b
        );
    }

    #[test]
    fn an_entry_still_being_written_holds_back_later_ones() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        // Simulate a push that took its seq and is still writing.
        let early = {
            let mut g = s.inner.lock().unwrap();
            let q = s.next_seq.fetch_add(1, Ordering::SeqCst);
            g.pending.insert(q);
            q
        };
        let late = s
            .push(Kind::Metrics, report(1, 0), None, Duration::ZERO)
            .unwrap()
            .unwrap();
        assert!(late > early);
        assert!(
            s.oldest(Duration::from_millis(50)).is_none(),
            "must not send {late} before {early}"
        );
        s.inner.lock().unwrap().pending.remove(&early);
        s.changed.notify_all();
        assert_eq!(s.oldest(Duration::from_millis(50)).unwrap().seq, late);
    }

    #[test]
    fn a_new_drift_state_replaces_unsent_older_ones() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        s.push(Kind::Drift, report(0, 0), None, Duration::ZERO)
            .unwrap();
        s.push(Kind::Metrics, report(1, 0), None, Duration::ZERO)
            .unwrap();
        let last = s
            .push(Kind::Drift, report(0, 0), None, Duration::ZERO)
            .unwrap()
            .unwrap();
        let kinds: Vec<(u64, Kind)> = s
            .inner
            .lock()
            .unwrap()
            .index
            .iter()
            .map(|(q, m)| (*q, m.kind))
            .collect();
        assert_eq!(kinds.len(), 2);
        assert_eq!(
            kinds
                .iter()
                .filter(|(_, k)| *k == Kind::Drift)
                .map(|(q, _)| *q)
                .collect::<Vec<_>>(),
            vec![last]
        );
        let batches = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                let e = e.as_ref().unwrap();
                e.file_name().to_string_lossy().ends_with(".batch")
            })
            .count();
        assert_eq!(batches, 2);
    }

    #[test]
    fn full_spool_evicts_metrics_and_makes_logs_wait() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 2000).unwrap();
        let mut pushed = 0;
        for _ in 0..50 {
            if s.push(Kind::Metrics, report(20, 0), None, Duration::ZERO)
                .unwrap()
                .is_some()
            {
                pushed += 1;
            }
        }
        assert_eq!(
            pushed, 50,
            "metrics make room for themselves by evicting older metrics"
        );
        assert!(s.bytes() <= 2000);
        assert!(s.stats.dropped_points.load(Ordering::Relaxed) > 0);
        // Fill with logs until a log push has to wait: logs are never evicted.
        let mut waited = false;
        for _ in 0..100 {
            if s.push(Kind::Logs, report(0, 5), None, Duration::from_millis(10))
                .unwrap()
                .is_none()
            {
                waited = true;
                break;
            }
        }
        assert!(waited, "a log push must wait when only logs fill the spool");
        let logs = s
            .inner
            .lock()
            .unwrap()
            .index
            .values()
            .filter(|m| m.kind == Kind::Logs)
            .count();
        assert!(logs > 0);
        assert_eq!(
            s.inner
                .lock()
                .unwrap()
                .index
                .values()
                .filter(|m| m.kind == Kind::Metrics)
                .count(),
            0,
            "metrics were evicted for logs"
        );
    }

    fn ckpt(n: u64) -> Option<(String, serde_json::Value)> {
        Some(("logs".into(), serde_json::json!({ "off": n })))
    }

    fn acked_off(state: &Path) -> Option<u64> {
        let v: serde_json::Value =
            serde_json::from_slice(&fs::read(state.join("logs.acked.json")).ok()?).ok()?;
        v["off"].as_u64()
    }

    #[test]
    fn acks_out_of_order_promote_in_seq_order_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(&dir.path().join("spool"), 1 << 20).unwrap();
        let seqs: Vec<u64> = (1..=3)
            .map(|n| {
                s.push(Kind::Logs, report(0, 1), ckpt(n), Duration::ZERO)
                    .unwrap()
                    .unwrap()
            })
            .collect();
        // All three out; the last two come back first.
        let out: Vec<Entry> =
            std::iter::successors(s.next_after(None), |e| s.next_after(Some(e.seq))).collect();
        assert_eq!(out.iter().map(|e| e.seq).collect::<Vec<_>>(), seqs);
        s.mark_acked(seqs[2]);
        s.mark_acked(seqs[1]);
        assert_eq!(s.promote(dir.path()).unwrap(), 0);
        assert_eq!(acked_off(dir.path()), None, "nothing promoted past batch 1");
        assert_eq!(s.len(), 3);
        assert!(s.next_after(Some(seqs[2])).is_none());
        // A restart now resends all three: the acks of 2 and 3 were only in memory.
        assert_eq!(s.pending_checkpoint("logs").unwrap()["off"], 3);
        s.mark_acked(seqs[0]);
        assert_eq!(s.promote(dir.path()).unwrap(), 3);
        assert_eq!(acked_off(dir.path()), Some(3));
        assert!(s.is_empty());
    }

    #[test]
    fn seq_never_goes_back_once_everything_was_acked() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        let a = s
            .push(Kind::Metrics, report(1, 0), None, Duration::ZERO)
            .unwrap()
            .unwrap();
        let e = s.oldest(Duration::ZERO).unwrap();
        s.ack(&e, dir.path()).unwrap();
        assert!(s.is_empty());
        drop(s);
        let saved: u64 = fs::read_to_string(dir.path().join("seq"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(saved > a, "the saved ceiling {saved} covers seq {a}");
        // A clock far behind the seqs used: a ceiling from the future stands in for it.
        let future = now_micros() + 3_600_000_000;
        write_atomic(&dir.path().join("seq"), future.to_string().as_bytes()).unwrap();
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        let b = s
            .push(Kind::Metrics, report(1, 0), None, Duration::ZERO)
            .unwrap()
            .unwrap();
        assert!(b >= future, "{b} < {future}");
    }

    #[test]
    fn a_refused_batch_is_split_then_its_single_bad_point_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(&dir.path().join("spool"), 1 << 20).unwrap();
        let big = s
            .push(Kind::Logs, report(0, 4), ckpt(9), Duration::ZERO)
            .unwrap()
            .unwrap();
        assert!(s.split(big).unwrap());
        // The original is settled (header only, checkpoint kept); two halves of 2 lines.
        let halves: Vec<Entry> =
            std::iter::successors(s.next_after(None), |e| s.next_after(Some(e.seq))).collect();
        assert_eq!(halves.len(), 2);
        assert!(halves
            .iter()
            .all(|e| e.seq > big && e.meta.checkpoint.is_none()));
        let lines = |e: &Entry| {
            phoenix_wire::decode(&e.body, true, &phoenix_wire::Limits::default().any_time())
                .unwrap()
                .logs
                .len()
        };
        assert_eq!(halves.iter().map(lines).collect::<Vec<_>>(), [2, 2]);
        // Settled entries survive a restart as settled, and are not sent again.
        drop(halves);
        let s = Spool::open(&dir.path().join("spool"), 1 << 20).unwrap();
        let first = s.next_after(None).unwrap();
        assert!(first.seq > big);
        assert_eq!(s.promote(dir.path()).unwrap(), 1, "the settled head goes");
        assert_eq!(acked_off(dir.path()), Some(9));
        // Down to one line: not splittable; set aside, and counted.
        assert!(s.split(first.seq).unwrap());
        let one = std::iter::successors(s.next_after(None), |e| s.next_after(Some(e.seq)))
            .last()
            .unwrap();
        assert_eq!(lines(&one), 1);
        assert!(!s.split(one.seq).unwrap());
        let refused = counters::refused_lines.load(Ordering::Relaxed);
        s.reject(one.seq, dir.path(), "HTTP 400: bad").unwrap();
        assert!(counters::refused_lines.load(Ordering::Relaxed) > refused);
        let kept = dir.path().join(format!("rejected/{:020}.batch", one.seq));
        assert!(read_entry(&kept).is_ok());
        assert!(s.get(one.seq).is_none(), "not sent again");
    }

    #[test]
    fn a_batch_that_cannot_be_set_aside_stays_in_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(&dir.path().join("spool"), 1 << 20).unwrap();
        let q = s
            .push(Kind::Metrics, report(1, 0), None, Duration::ZERO)
            .unwrap()
            .unwrap();
        // rejected/ cannot be made: a file is in its way.
        fs::write(dir.path().join("rejected"), b"").unwrap();
        assert!(s.reject(q, dir.path(), "HTTP 400").is_err());
        assert_eq!(
            s.get(q).unwrap().seq,
            q,
            "the batch is still there to retry"
        );
    }

    #[test]
    fn rejected_dir_is_bounded_oldest_first_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(&dir.path().join("spool"), 1500).unwrap();
        let before = counters::dropped_points_rejected_full.load(Ordering::Relaxed);
        let mut seqs = vec![];
        for _ in 0..12 {
            let q = s
                .push(Kind::Metrics, report(30, 0), None, Duration::ZERO)
                .unwrap()
                .unwrap();
            s.reject(q, dir.path(), "HTTP 400").unwrap();
            seqs.push(q);
        }
        let size: u64 = fs::read_dir(dir.path().join("rejected"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".batch"))
            .map(|e| e.metadata().unwrap().len())
            .sum();
        assert!(size <= 1500, "rejected/ holds {size} bytes");
        assert!(counters::dropped_points_rejected_full.load(Ordering::Relaxed) > before);
        let newest = dir.path().join(format!("rejected/{:020}.batch", seqs[11]));
        assert!(newest.exists(), "the newest is kept");
        let oldest = dir.path().join(format!("rejected/{:020}.batch", seqs[0]));
        assert!(!oldest.exists(), "the oldest went first");
    }

    #[test]
    fn reseq_queues_the_same_content_under_a_new_seq_and_keeps_the_checkpoint_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(&dir.path().join("spool"), 1 << 20).unwrap();
        let a = s
            .push(Kind::Logs, report(0, 3), ckpt(5), Duration::ZERO)
            .unwrap()
            .unwrap();
        s.reseq(a).unwrap();
        let again = s.next_after(None).unwrap();
        assert!(again.seq > a);
        assert_eq!(again.meta.reseqs, 1);
        assert!(again.meta.checkpoint.is_none());
        let r = phoenix_wire::decode(
            &again.body,
            true,
            &phoenix_wire::Limits::default().any_time(),
        )
        .unwrap();
        assert_eq!((r.seq, r.logs.len()), (again.seq, 3));
        // The original's checkpoint is promoted now (its lines are safe in the new entry).
        assert_eq!(s.promote(dir.path()).unwrap(), 1);
        assert_eq!(acked_off(dir.path()), Some(5));
        s.ack(&again, dir.path()).unwrap();
        assert!(s.is_empty());
    }

    #[test]
    fn a_metric_entry_is_synced_only_if_it_outlives_its_ack_window() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        // Log entries carry checkpoints: synced before push returns, nothing left due.
        s.push(Kind::Logs, report(0, 1), ckpt(1), Duration::ZERO)
            .unwrap()
            .unwrap();
        assert_eq!(s.sync_due(), None);
        let before = Instant::now();
        let a = s
            .push(Kind::Metrics, report(2, 0), None, Duration::ZERO)
            .unwrap()
            .unwrap();
        let due = s.sync_due().expect("a metric entry waits for its sync");
        assert!(due >= before + SYNC_AFTER, "{due:?}");
        // Not old enough: nothing is synced, it stays due.
        s.sync_overdue(SYNC_AFTER);
        assert_eq!(s.sync_due(), Some(due));
        // Acked (and removed) first: it is never synced, and nothing is left due.
        let head = s.oldest(Duration::ZERO).unwrap();
        s.ack(&head, dir.path()).unwrap();
        let e = s.get(a).unwrap();
        s.ack(&e, dir.path()).unwrap();
        assert!(s.is_empty());
        assert_eq!(s.sync_due(), None);
        // Still there when due (the collector is away): synced, no longer due, and kept.
        let b = s
            .push(Kind::Metrics, report(2, 0), None, Duration::ZERO)
            .unwrap()
            .unwrap();
        s.sync_overdue(Duration::ZERO);
        assert_eq!(s.sync_due(), None);
        assert_eq!(s.get(b).map(|e| e.meta.points), Some(2));
    }

    #[test]
    fn an_entry_cut_short_before_its_sync_is_set_aside_not_sent() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        let a = s
            .push(Kind::Metrics, report(50, 0), None, Duration::ZERO)
            .unwrap()
            .unwrap();
        let b = s
            .push(Kind::Metrics, report(3, 0), None, Duration::ZERO)
            .unwrap()
            .unwrap();
        drop(s);
        // What a crash leaves of a file whose data had not reached the disk: its start.
        let path = dir.path().join(format!("{a:020}.batch"));
        let len = fs::metadata(&path).unwrap().len();
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 10).unwrap();
        drop(f);
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s.oldest(Duration::ZERO).map(|e| e.seq), Some(b));
        assert!(dir.path().join(format!("{a:020}.batch.corrupt")).exists());
    }
}
