//! The bounded on-disk queue between the sources and the sender.
//!
//! Every batch is written here (fsync + rename) before it is sent, and removed only once the
//! collector acked it, so neither a collector outage nor an agent restart loses data. An entry
//! may carry a source checkpoint (e.g. log file offsets); it is promoted to that source's acked
//! checkpoint when the entry is acked, and a restarting source resumes from the newest
//! checkpoint still in the spool, so lines are neither lost nor read twice.
//!
//! When the spool is full, the oldest metric entries are evicted and their points counted as
//! dropped; log entries are never evicted: `push` of a log entry waits instead, because the
//! log file itself is the buffer.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use phoenix_wire::Report;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool directory {0}: {1} (check that the state dir is writable by the agent)")]
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
    #[serde(skip)]
    pub bytes: u64,
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
    /// sends past the lowest of them: the collector keeps only the highest seq it took per
    /// boot, so sending N+1 before N would make N look like a duplicate and lose it.
    pending: std::collections::BTreeSet<u64>,
    bytes: u64,
    stopping: bool,
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
    pub stats: Stats,
}

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
        // Sequence numbers start from the clock so they keep increasing across restarts even
        // if the state dir was wiped; the collector drops a (boot, seq) it already took.
        let last = index.keys().next_back().copied().unwrap_or(0);
        let next = now_micros().max(last + 1);
        Ok(Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            next_seq: AtomicU64::new(next),
            inner: Mutex::new(Inner {
                index,
                pending: Default::default(),
                bytes,
                stopping: false,
            }),
            changed: Condvar::new(),
            stats: Stats::default(),
        })
    }

    pub fn bytes(&self) -> u64 {
        self.inner.lock().unwrap().bytes
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    /// Log entries wait (up to `wait`) while the spool is full; metric entries evict the oldest
    /// metric entries. Returns the seq, or None when a log entry timed out waiting for room.
    pub fn push(
        &self,
        kind: Kind,
        report: Report,
        checkpoint: Option<(String, serde_json::Value)>,
        wait: Duration,
    ) -> Result<Option<u64>, SpoolError> {
        let seq = {
            let mut g = self.inner.lock().unwrap();
            let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
            g.pending.insert(seq);
            seq
        };
        let res = self.push_as(seq, kind, report, checkpoint, wait);
        // On every path: the seq is no longer pending (on success it already went, with the
        // insert, under one lock).
        let mut g = self.inner.lock().unwrap();
        if g.pending.remove(&seq) {
            drop(g);
            self.changed.notify_all();
        }
        res
    }

    fn push_as(
        &self,
        seq: u64,
        kind: Kind,
        mut report: Report,
        checkpoint: Option<(String, serde_json::Value)>,
        wait: Duration,
    ) -> Result<Option<u64>, SpoolError> {
        let points = (report.metrics.len() + report.logs.len()) as u64;
        report.seq = seq;
        let body = phoenix_wire::encode(&report);
        let meta = Meta {
            kind,
            points,
            checkpoint,
            bytes: body.len() as u64,
        };
        let need = meta.bytes;
        let deadline = std::time::Instant::now() + wait;
        let mut g = self.inner.lock().unwrap();
        loop {
            if g.stopping {
                return Err(SpoolError::Stopping);
            }
            if g.bytes + need <= self.max_bytes || g.index.is_empty() {
                break;
            }
            // Make room from the oldest metrics first: they are superseded by newer samples.
            let victim = g
                .index
                .iter()
                .find(|(_, m)| m.kind == Kind::Metrics)
                .map(|(s, _)| *s);
            if let Some(v) = victim {
                let m = g.index.remove(&v).unwrap();
                g.bytes -= m.bytes;
                best_effort("fs::remove_file", fs::remove_file(self.path(v)));
                self.stats
                    .dropped_points
                    .fetch_add(m.points, Ordering::Relaxed);
                self.stats.dropped_batches.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if kind == Kind::Metrics {
                // Only log and drift entries left: this sample is the one to drop.
                self.stats
                    .dropped_points
                    .fetch_add(points, Ordering::Relaxed);
                self.stats.dropped_batches.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            if kind == Kind::Drift {
                break; // drift states are small and must not be lost; allow the overshoot
            }
            self.stats.log_waits.fetch_add(1, Ordering::Relaxed);
            let now = std::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            g = self.changed.wait_timeout(g, deadline - now).unwrap().0;
        }
        drop(g);
        self.write(seq, &meta, &body)
            .map_err(|e| SpoolError::Io(self.dir.clone(), e))?;
        let mut g = self.inner.lock().unwrap();
        if kind == Kind::Drift {
            // A drift state supersedes every older one (each carries the whole entry list), so
            // a long outage with many changes keeps one, not one per change. Removing an
            // entry the sender holds is harmless: its ack then finds nothing to remove.
            let stale: Vec<u64> = g
                .index
                .iter()
                .filter(|(s, m)| m.kind == Kind::Drift && **s < seq)
                .map(|(s, _)| *s)
                .collect();
            for s in stale {
                let m = g.index.remove(&s).expect("listed above");
                g.bytes -= m.bytes;
                best_effort("fs::remove_file", fs::remove_file(self.path(s)));
            }
        }
        g.bytes += meta.bytes;
        g.index.insert(seq, meta);
        g.pending.remove(&seq);
        drop(g);
        self.changed.notify_all();
        Ok(Some(seq))
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.batch"))
    }

    fn write(&self, seq: u64, meta: &Meta, body: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join(format!(".tmp-{seq}"));
        let mut f = fs::File::create(&tmp)?;
        let mut head = serde_json::to_vec(meta).expect("meta serialises");
        head.push(b'\n');
        f.write_all(&head)?;
        f.write_all(body)?;
        f.sync_data()?;
        drop(f);
        fs::rename(&tmp, self.path(seq))?;
        sync_dir(&self.dir)
    }

    /// The oldest entry, waiting up to `wait` for one to appear (and for any older entry still
    /// being written, so entries always go out in seq order).
    pub fn oldest(&self, wait: Duration) -> Option<Entry> {
        let deadline = std::time::Instant::now() + wait;
        let mut g = self.inner.lock().unwrap();
        let seq = loop {
            let first = g.index.keys().next().copied();
            let blocked = matches!((first, g.pending.first()), (Some(f), Some(p)) if *p < f);
            if let (Some(f), false) = (first, blocked) {
                break f;
            }
            let now = std::time::Instant::now();
            if g.stopping || now >= deadline {
                return None;
            }
            g = self.changed.wait_timeout(g, deadline - now).unwrap().0;
        };
        drop(g);
        match read_entry(&self.path(seq)) {
            Ok((meta, body)) => Some(Entry { seq, meta, body }),
            Err(e) => {
                tracing::warn!(seq, error = %e, "spool entry vanished or unreadable; skipping it");
                self.remove(seq);
                None
            }
        }
    }

    /// The collector took `seq`: promote its checkpoint, then forget it.
    pub fn ack(&self, entry: &Entry, state_dir: &Path) -> io::Result<()> {
        if let Some((source, ckpt)) = &entry.meta.checkpoint {
            write_atomic(
                &state_dir.join(format!("{source}.acked.json")),
                &serde_json::to_vec(ckpt).unwrap_or_default(),
            )?;
        }
        self.stats.acked_batches.fetch_add(1, Ordering::Relaxed);
        self.remove(entry.seq);
        Ok(())
    }

    /// The collector refused `seq` for good (400/413): keep it aside for a person, never
    /// silently, and move on so one bad batch does not block the rest.
    pub fn reject(&self, entry: &Entry, state_dir: &Path, reason: &str) {
        let dir = state_dir.join("rejected");
        best_effort("fs::create_dir_all", fs::create_dir_all(&dir));
        best_effort(
            "fs::rename",
            fs::rename(
                self.path(entry.seq),
                dir.join(format!("{:020}.batch", entry.seq)),
            ),
        );
        best_effort(
            "fs::write",
            fs::write(dir.join(format!("{:020}.reason", entry.seq)), reason),
        );
        self.stats.rejected_batches.fetch_add(1, Ordering::Relaxed);
        tracing::error!(seq = entry.seq, reason, dir = %dir.display(), "collector refused a batch for good; kept it in the rejected dir");
        // The checkpoint still moves on: those lines are accounted for in the rejected dir.
        if let Some((source, ckpt)) = &entry.meta.checkpoint {
            best_effort(
                "write_atomic",
                write_atomic(
                    &state_dir.join(format!("{source}.acked.json")),
                    &serde_json::to_vec(ckpt).unwrap_or_default(),
                ),
            );
        }
        self.remove(entry.seq);
    }

    fn remove(&self, seq: u64) {
        let mut g = self.inner.lock().unwrap();
        if let Some(m) = g.index.remove(&seq) {
            g.bytes -= m.bytes;
            best_effort("fs::remove_file", fs::remove_file(self.path(seq)));
        }
        drop(g);
        self.changed.notify_all();
    }

    /// Wake every waiter and make further pushes fail; used at shutdown.
    pub fn stop(&self) {
        self.inner.lock().unwrap().stopping = true;
        self.changed.notify_all();
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
            .changed
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
    let mut f = fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_data()?;
    drop(f);
    fs::rename(&tmp, path)?;
    sync_dir(dir)
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
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
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
}
