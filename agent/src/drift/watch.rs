//! The drift source inside `run`: one full scan at start, then inotify events re-hash only
//! what they name, a full rescan every `rescan`, and an immediate one whenever inotify may
//! have lost events (queue overflow, out of watches).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use notify::{Config, Event, EventKind, EventKindMask, RecursiveMode, Watcher};
use phoenix_wire::drift::{diff, Manifest};
use phoenix_wire::{DriftState, FileEntry};

use super::scan::EntriesList;
use super::{find_baseline, load_baseline, DriftError, Excludes, Scanner, Tree, DEFAULT_EXCLUDES};
use crate::config::RunConfig;
use crate::counters;
use crate::source::{Ctx, Source};
use crate::spool::Kind;

/// After the first event, wait for this much quiet so a burst (an editor's write + rename, a
/// package unpacking) becomes one re-hash and one report.
const QUIET: Duration = Duration::from_millis(100);
/// ...but never hold a report back longer than this while events keep coming.
const MAX_BATCH: Duration = Duration::from_millis(500);
/// With watches missing (the inotify limit was hit) changes in unwatched directories are only
/// seen by full rescans, so they run at least this often.
const DEGRADED_RESCAN: Duration = Duration::from_secs(300);

/// The baseline the agent compares against: root and entries of its manifest.
#[derive(Debug, Clone)]
pub struct Baseline {
    pub root: String,
    pub entries: Vec<FileEntry>,
    /// Its [`phoenix_wire::drift::HASH_VERSION`]: one this agent does not compute is never
    /// compared (no changes are reported, and the collector gives no verdict).
    pub hash_version: u32,
}

#[derive(Debug)]
pub struct DriftSource {
    scanner: Scanner,
    baseline: Option<Baseline>,
    rescan: Duration,
}

impl DriftSource {
    pub fn new(scanner: Scanner, baseline: Option<Baseline>, rescan: Duration) -> DriftSource {
        DriftSource {
            scanner,
            baseline,
            rescan,
        }
    }

    /// Build the source `run` wants, or None when there is nothing to watch (no --drift-path
    /// and no baseline). A baseline's own paths and excludes win over --drift-path, so the
    /// scan covers exactly the files the baseline describes.
    pub fn from_config(cfg: &RunConfig) -> Result<Option<DriftSource>, DriftError> {
        let found = find_baseline(cfg.baseline.as_deref(), &cfg.state_dir);
        let (roots, excludes, baseline) = match found {
            Some(path) => {
                let m: Manifest = load_baseline(&path)?;
                let roots: Vec<PathBuf> = m.paths.iter().map(PathBuf::from).collect();
                if !cfg.drift_paths.is_empty() && cfg.drift_paths != roots {
                    tracing::warn!(baseline = %path.display(), "--drift-path differs from the baseline's paths; watching the baseline's paths so the comparison holds");
                }
                tracing::info!(baseline = %path.display(), image_id = %m.image_id, entries = m.entries.len(), hash_version = m.hash_version, "drift baseline loaded");
                if !phoenix_wire::drift::computes(m.hash_version) {
                    tracing::warn!(baseline = %path.display(), hash_version = m.hash_version, this_agent = phoenix_wire::drift::HASH_VERSION, "the baseline's drift hash version is not computed by this agent: no drift comparison (no verdict, never \"drifted\"); upgrade the agent or bake the baseline with this one");
                }
                (
                    roots,
                    m.excludes,
                    Some(Baseline {
                        root: m.root,
                        entries: m.entries,
                        hash_version: m.hash_version,
                    }),
                )
            }
            None if cfg.drift_paths.is_empty() => return Ok(None),
            None => {
                let mut ex: Vec<String> = DEFAULT_EXCLUDES.iter().map(|s| s.to_string()).collect();
                ex.extend(cfg.drift_excludes.iter().cloned());
                (cfg.drift_paths.clone(), ex, None)
            }
        };
        // One hashing thread: a full rescan is a background check on a server doing real work.
        let scanner = Scanner::new(&roots, Excludes::new(&excludes), 1);
        let state = std::path::absolute(&cfg.state_dir).unwrap_or(cfg.state_dir.clone());
        if scanner.covers(&state.join("spool")) {
            tracing::warn!(state_dir = %state.display(), "the state dir is inside a watched drift path and not excluded: the spool will look like drift; exclude it at bake time");
        }
        Ok(Some(DriftSource::new(scanner, baseline, cfg.drift_rescan)))
    }

    /// The full state of `tree`, whose Merkle root is `root`.
    fn state<'t>(
        &self,
        tree: &'t Tree,
        root: String,
        note: Option<String>,
    ) -> DriftState<EntriesList<'t>> {
        let changes = match &self.baseline {
            Some(b) if !phoenix_wire::drift::computes(b.hash_version) => Vec::new(),
            // Only a drifted box builds its entries whole, and drops them before encoding.
            Some(b) if b.root != root => diff(&b.entries, &tree.entries()),
            _ => Vec::new(),
        };
        DriftState {
            hash: root,
            baseline: self.baseline.as_ref().map(|b| b.root.clone()),
            changes,
            entries: tree.len() as u64,
            ts: now_ns(),
            note,
            // Always the full list: the collector diffs it against a registered baseline, and
            // a list it has to assemble from deltas would break on any lost report.
            entries_list: Some(tree.entries_list()),
            hash_version: Some(phoenix_wire::drift::HASH_VERSION),
            baseline_hash_version: self.baseline.as_ref().map(|b| b.hash_version),
        }
    }

    fn full_scan(&self) -> Tree {
        let t = Instant::now();
        let tree = self.scanner.full_scan();
        counters::add(&counters::drift_scans, 1);
        tracing::debug!(
            entries = tree.len(),
            ms = t.elapsed().as_millis() as u64,
            "drift full scan"
        );
        tree
    }

    /// Install watches; Some(reason) when some could not be (the watch limit, most often).
    fn watch_all(&self, w: &mut impl Watcher) -> Option<String> {
        let mut problem = None;
        for root in self.scanner.roots() {
            // A single file is watched through its directory: editors and package managers
            // replace files by rename, which a watch on the old inode would not see.
            let (path, mode) = if root.is_dir() {
                (root.as_path(), RecursiveMode::Recursive)
            } else {
                (
                    root.parent().unwrap_or(Path::new("/")),
                    RecursiveMode::NonRecursive,
                )
            };
            if let Err(e) = w.watch(path, mode) {
                let why = watch_error_note(&e);
                tracing::warn!(path = %path.display(), error = %e, "cannot watch for drift; relying on full rescans");
                problem = Some(why);
            }
        }
        problem
    }

    /// Apply one debounced batch of events to `tree`. Returns Some(note) when a full rescan
    /// was needed because inotify may have lost events.
    pub(super) fn apply(
        &self,
        tree: &mut Tree,
        batch: Vec<notify::Result<Event>>,
    ) -> Option<String> {
        let mut paths = BTreeSet::new();
        let mut lost = None;
        for ev in batch {
            match ev {
                Ok(ev) if ev.need_rescan() => {
                    lost = Some("inotify queue overflowed; full rescan done".to_string());
                }
                // Opens and closes say nothing about content; CORE events should not carry
                // them, but a backend that does must not cause re-hashing.
                Ok(Event {
                    kind: EventKind::Access(_),
                    ..
                }) => {}
                Ok(ev) => paths.extend(ev.paths),
                Err(e) => {
                    tracing::warn!(error = %e, "inotify error; doing a full drift rescan");
                    lost = Some(watch_error_note(&e));
                }
            }
        }
        counters::add(&counters::drift_events, paths.len() as u64);
        if let Some(note) = lost {
            counters::add(&counters::drift_overflows, 1);
            *tree = self.full_scan();
            return Some(note);
        }
        self.scanner
            .refresh(tree, paths.iter().map(PathBuf::as_path));
        None
    }

    /// Queue the full state; the spool seq it got, or None when it could not be queued.
    fn push(&self, ctx: &Ctx, tree: &Tree, note: Option<String>) -> Option<u64> {
        // The root first, so this report and every later one (metrics, logs) carry it.
        let root = tree.root();
        ctx.drift_link.set_root(root.clone());
        let report = ctx.report().with_drift(self.state(tree, root, note));
        let prev = ctx.drift_link.sending_full();
        let pushed = ctx.spool.push(Kind::Drift, report, None, Duration::ZERO);
        // The state's entries, JSON and gzip were the largest buffers an idle agent has.
        crate::release_free_memory();
        ctx.drift_link
            .sent_full(prev, pushed.as_ref().ok().copied().flatten());
        match pushed {
            Ok(seq) => seq,
            Err(e) => {
                if !ctx.spool.stopping() {
                    tracing::error!(error = %e, "cannot queue the drift report; will retry on the next change or rescan");
                }
                None
            }
        }
    }

    /// The collector asked (in an ack) for the full state: its record is missing or stale.
    /// Send what we have now; the tree is always current, so no rescan is needed.
    fn answer_resend(&self, ctx: &Ctx, tree: &Tree, note: Option<String>) -> bool {
        if !ctx.drift_link.take_resend() {
            return false;
        }
        match self.push(ctx, tree, note) {
            Some(seq) => {
                counters::add(&counters::drift_resends, 1);
                tracing::info!(
                    seq,
                    root = %tree.root(),
                    "collector asked for the drift state again; queued it"
                );
                true
            }
            None => false,
        }
    }
}

fn watch_error_note(e: &notify::Error) -> String {
    match e.kind {
        notify::ErrorKind::MaxFilesWatch => {
            "inotify watch limit reached (raise fs.inotify.max_user_watches); some changes are only seen by full rescans".to_string()
        }
        _ => format!("inotify error ({e}); some changes are only seen by full rescans"),
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

impl Source for DriftSource {
    fn name(&self) -> &'static str {
        "drift"
    }

    fn run(self: Box<Self>, ctx: Ctx) -> anyhow::Result<()> {
        // inotify's events, and `None` to wake the wait: a resend request or the agent
        // stopping, so an idle box's drift thread sleeps until something happens.
        let (tx, rx) = mpsc::channel::<Option<notify::Result<Event>>>();
        let config = Config::default()
            .with_follow_symlinks(false)
            .with_event_kinds(EventKindMask::CORE);
        let events = tx.clone();
        let mut watcher = notify::RecommendedWatcher::new(
            move |ev| {
                // The receiver is gone only when this source is ending.
                events.send(Some(ev)).ok();
            },
            config,
        )?;
        let wake = std::sync::Mutex::new(tx.clone());
        ctx.drift_link.set_waker(move || {
            wake.lock().map(|t| t.send(None)).ok();
        });
        let wake = std::sync::Mutex::new(tx);
        ctx.spool.on_stop("drift", move || {
            wake.lock().map(|t| t.send(None)).ok();
        });
        // Watches go in before the first scan, so nothing changes unseen between the two.
        let degraded = self.watch_all(&mut watcher);
        if degraded.is_some() {
            counters::add(&counters::drift_overflows, 1);
        }
        let rescan_every = if degraded.is_some() {
            self.rescan.min(DEGRADED_RESCAN)
        } else {
            self.rescan
        };
        let mut tree = self.full_scan();
        let mut pushed: Option<(String, Option<String>)> = None;
        if self.push(&ctx, &tree, degraded.clone()).is_some() {
            pushed = Some((tree.root(), degraded.clone()));
        }
        // A request that came in during the first scan is answered by the state just queued.
        ctx.drift_link.take_resend();
        tracing::info!(entries = tree.len(), root = %tree.root(), paths = ?self.scanner.roots(), "drift watching");
        let mut next_full = Instant::now() + rescan_every;
        while !ctx.spool.stopping() {
            let now = Instant::now();
            let note = if now >= next_full {
                tree = self.full_scan();
                next_full = now + rescan_every;
                degraded.clone()
            } else {
                // A stop or a resend request sends `None`; the timeout is a backstop.
                let first = match rx.recv_timeout((next_full - now).min(super::link::RESEND_POLL)) {
                    Ok(Some(ev)) => ev,
                    Ok(None) | Err(mpsc::RecvTimeoutError::Timeout) => {
                        if self.answer_resend(
                            &ctx,
                            &tree,
                            pushed.as_ref().and_then(|p| p.1.clone()),
                        ) {
                            pushed = Some((tree.root(), pushed.and_then(|p| p.1)));
                        }
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        anyhow::bail!("the inotify watcher thread ended")
                    }
                };
                let start = Instant::now();
                let mut batch = vec![first];
                while start.elapsed() < MAX_BATCH {
                    match rx.recv_timeout(QUIET.min(MAX_BATCH.saturating_sub(start.elapsed()))) {
                        Ok(Some(ev)) => batch.push(ev),
                        // A stop or a resend: this batch is applied and pushed first.
                        Ok(None) | Err(_) => break,
                    }
                }
                match self.apply(&mut tree, batch) {
                    Some(lost) => {
                        next_full = Instant::now() + rescan_every;
                        Some(lost)
                    }
                    None => degraded.clone(),
                }
            };
            let root = tree.root();
            // A new root always goes out; a note only when it is news (a note going away alone
            // is not worth a report).
            let changed = pushed
                .as_ref()
                .is_none_or(|(r, n)| *r != root || (note.is_some() && *n != note));
            if changed && self.push(&ctx, &tree, note.clone()).is_some() {
                tracing::debug!(root = %root, entries = tree.len(), "drift state queued");
                pushed = Some((root, note));
            } else if self.answer_resend(&ctx, &tree, note.clone()) {
                pushed = Some((root, note));
            }
        }
        drop(watcher);
        Ok(())
    }
}
