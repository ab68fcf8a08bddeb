//! What wakes the tailer: inotify on the directories the patterns search and the tailed files
//! live in. A watch on a directory reports writes to every file in it, so closed files (see
//! the open-file budget) are still heard; one watch per directory, not per file.
//!
//! Events only say *where* to look; the tailer still reads by offset, so a lost or merged
//! event costs latency (the slow safety poll finds it), never a line.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use notify::event::ModifyKind;
use notify::{Config, Event, EventKind, EventKindMask, RecursiveMode, Watcher};

use crate::spool::Spool;

/// Paths remembered between two rounds; past this the next round is a full one instead.
const MAX_PATHS: usize = 16 * 1024;
/// Longest a wait sleeps before looking whether the agent stops. The spool's stop hook wakes
/// the wait at once; this is only a backstop, and the safety poll comes sooner anyway.
const STOP_CHECK: Duration = Duration::from_secs(60);

/// What happened since the tailer last looked.
#[derive(Debug, Default)]
pub(super) struct Events {
    /// Files written to (or touched) by name.
    pub paths: HashSet<PathBuf>,
    /// Something was created, renamed or removed: expand the patterns again.
    pub rescan: bool,
    /// Events may have been lost (queue overflow, error): check everything.
    pub full: bool,
    any: bool,
}

#[derive(Debug, Default)]
struct Shared {
    events: Mutex<Events>,
    woken: Condvar,
}

impl Shared {
    fn note(&self, ev: notify::Result<Event>) {
        let mut g = self.events.lock().unwrap_or_else(|e| e.into_inner());
        match ev {
            Err(_) => g.full = true,
            Ok(ev) if ev.need_rescan() => g.full = true,
            // Our own reads open files; those events say nothing about new data.
            Ok(Event {
                kind: EventKind::Access(_),
                ..
            }) => return,
            Ok(ev) => {
                if !matches!(ev.kind, EventKind::Modify(ModifyKind::Data(_))) {
                    g.rescan = true;
                }
                if g.paths.len() + ev.paths.len() > MAX_PATHS {
                    g.full = true;
                    g.paths.clear();
                } else if !g.full {
                    g.paths.extend(ev.paths);
                }
            }
        }
        g.any = true;
        self.woken.notify_one();
    }
}

/// The inotify side of the tailer. Without inotify (no instance left, not Linux) it still
/// works: every wait then lasts until the safety poll.
pub(super) struct Watch {
    watcher: Option<notify::RecommendedWatcher>,
    shared: Arc<Shared>,
    watched: BTreeSet<PathBuf>,
    /// Watches that could not be added, warned about once each.
    failed: HashSet<PathBuf>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("inotify", &self.watcher.is_some())
            .field("watched", &self.watched.len())
            .finish()
    }
}

impl Watch {
    pub(super) fn new() -> Watch {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let config = Config::default()
            .with_follow_symlinks(false)
            .with_event_kinds(EventKindMask::CORE);
        let watcher = match notify::RecommendedWatcher::new(move |ev| s.note(ev), config) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "no inotify for the log tailer (raise fs.inotify.max_user_instances); new lines are found by the safety poll only");
                None
            }
        };
        Watch {
            watcher,
            shared,
            watched: BTreeSet::new(),
            failed: HashSet::new(),
        }
    }

    /// Watch exactly `dirs` from now on (adding what is new, dropping what went away).
    pub(super) fn set_dirs(&mut self, dirs: BTreeSet<PathBuf>) {
        let Some(w) = self.watcher.as_mut() else {
            return;
        };
        let gone: Vec<PathBuf> = self.watched.difference(&dirs).cloned().collect();
        for d in gone {
            // Fails when the directory was deleted: the kernel dropped the watch already.
            w.unwatch(&d).ok();
            self.watched.remove(&d);
        }
        for d in dirs {
            if self.watched.contains(&d) {
                continue;
            }
            match w.watch(&d, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.failed.remove(&d);
                    self.watched.insert(d);
                }
                Err(e) => {
                    if self.failed.insert(d.clone()) {
                        tracing::warn!(dir = %d.display(), error = %e, "cannot watch a log directory (raise fs.inotify.max_user_watches?); its files are checked by the safety poll only");
                    }
                }
            }
        }
    }

    /// A directory itself was removed or renamed: its watch is gone, add it again when it is
    /// back.
    pub(super) fn forget(&mut self, paths: &HashSet<PathBuf>) {
        self.watched.retain(|d| !paths.contains(d));
    }

    /// Has something been created, renamed or removed (or events lost) since the last take?
    pub(super) fn wants_rescan(&self) -> bool {
        let g = self.shared.events.lock().unwrap_or_else(|e| e.into_inner());
        g.rescan || g.full
    }

    /// Everything noted since the last call.
    pub(super) fn take(&self) -> Events {
        let mut g = self.shared.events.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *g)
    }

    /// From now on the agent stopping wakes [`Watch::wait`] at once.
    pub(super) fn wake_on_stop(&self, spool: &Spool) {
        let s = self.shared.clone();
        spool.on_stop("logs", move || {
            // Under the lock: a waiter between its stop check and its wait cannot miss this.
            let _g = s.events.lock().unwrap_or_else(|e| e.into_inner());
            s.woken.notify_all();
        });
    }

    /// Sleep until an event, `deadline`, or the agent stopping (true).
    pub(super) fn wait(&self, deadline: Instant, spool: &Spool) -> bool {
        let mut g = self.shared.events.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if g.any {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            if spool.stopping() {
                return true;
            }
            let d = (deadline - now).min(STOP_CHECK);
            g = self
                .shared
                .woken
                .wait_timeout(g, d)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}
