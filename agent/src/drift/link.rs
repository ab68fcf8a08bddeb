//! The drift source's line to the rest of the agent: the current root, which every report
//! carries as `drift_root`, and the collector's request (in an ack) to send the full drift
//! state again because its record is missing or differs, e.g. after a collector restart or
//! when an instance it had given up as gone comes back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use phoenix_wire::Ack;

/// Shared between the drift source (writes the root, answers resends), every report builder
/// (reads the root) and the sender (passes acks in). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct DriftLink(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    root: Mutex<Option<String>>,
    resend: AtomicBool,
    /// Spool seq of the last full state queued (0: none). Acks of older batches were judged
    /// before that state reached the collector, so their requests are stale.
    answered: AtomicU64,
    /// Wakes the drift source's wait when a resend is asked for, so it need not poll.
    waker: Waker,
}

type Wake = Box<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct Waker(Mutex<Option<Wake>>);

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = self.0.lock().is_ok_and(|g| g.is_some());
        f.write_str(if set { "Waker(set)" } else { "Waker(none)" })
    }
}

/// Longest the drift source waits between inotify events before it looks for a resend
/// request by itself; the request normally wakes it at once (see [`DriftLink::set_waker`]).
pub const RESEND_POLL: Duration = Duration::from_secs(30);

impl DriftLink {
    /// The root of the drift source's latest scan or event, once it has one.
    pub fn root(&self) -> Option<String> {
        self.0
            .root
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_root(&self, root: String) {
        *self.0.root.lock().unwrap_or_else(|p| p.into_inner()) = Some(root);
    }

    /// Called by the sender for every accepted batch.
    pub fn on_ack(&self, ack: &Ack) {
        if ack.resend_drift && ack.accepted >= self.0.answered.load(Ordering::SeqCst) {
            self.0.resend.store(true, Ordering::SeqCst);
            if let Some(w) = &*self.0.waker.0.lock().unwrap_or_else(|p| p.into_inner()) {
                w();
            }
        }
    }

    /// The drift source's wake-up, called after a resend request is noted.
    pub fn set_waker(&self, wake: impl Fn() + Send + Sync + 'static) {
        *self.0.waker.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(wake));
    }

    /// True once per request: the drift source then queues its full state.
    pub fn take_resend(&self) -> bool {
        self.0.resend.swap(false, Ordering::SeqCst)
    }

    /// The drift source is about to queue its full state: until [`DriftLink::sent_full`]
    /// names its seq, every request is taken as answered by it. Otherwise the sender could
    /// pass on an ack of an older batch after the new state is in the spool but before its
    /// seq is recorded, and the state would go out twice. Returns what to restore if the
    /// push fails.
    pub fn sending_full(&self) -> u64 {
        self.0.answered.swap(u64::MAX, Ordering::SeqCst)
    }

    /// The full state went into the spool as `seq` (None: it could not be queued); `prev`
    /// is what [`DriftLink::sending_full`] returned.
    pub fn sent_full(&self, prev: u64, seq: Option<u64>) {
        let now = seq.map_or(prev, |s| s.max(prev));
        self.0.answered.store(now, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(seq: u64, resend: bool) -> Ack {
        Ack {
            accepted: seq,
            duplicate: false,
            rejected_points: 0,
            resend_drift: resend,
            ..Default::default()
        }
    }

    #[test]
    fn a_request_is_taken_once() {
        let l = DriftLink::default();
        assert!(!l.take_resend());
        l.on_ack(&ack(1, false));
        assert!(!l.take_resend());
        l.on_ack(&ack(2, true));
        assert!(l.take_resend());
        assert!(!l.take_resend(), "one request, one resend");
    }

    #[test]
    fn requests_judged_before_the_answer_arrived_are_stale() {
        let l = DriftLink::default();
        l.on_ack(&ack(5, true));
        assert!(l.take_resend());
        // The full state went out as seq 9; batches 6..8 were already queued before it and
        // their acks still ask: no second resend for them.
        let prev = l.sending_full();
        // While the state is being queued, no request (of any age) starts another one.
        l.on_ack(&ack(u64::MAX - 1, true));
        assert!(!l.take_resend());
        l.sent_full(prev, Some(9));
        for s in 6..9 {
            l.on_ack(&ack(s, true));
        }
        assert!(!l.take_resend());
        // The collector still asks after it had seq 9: that is a new request.
        l.on_ack(&ack(10, true));
        assert!(l.take_resend());
    }

    #[test]
    fn clones_share_the_root() {
        let l = DriftLink::default();
        let c = l.clone();
        assert_eq!(c.root(), None);
        l.set_root("ab".into());
        assert_eq!(c.root().as_deref(), Some("ab"));
    }
}
