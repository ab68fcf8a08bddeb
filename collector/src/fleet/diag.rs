//! Diagnostics on demand, the fleet's side: requests outstanding per instance (one at a time)
//! and the latest snapshot each instance sent back, within a fleet-wide byte budget.
//!
//! Kept in memory only: a snapshot is a one-off closer look, not fleet state, and a request
//! a restarted collector forgot is asked again. Requests expire when no answer came. Under a
//! shared store each request and answer is also handed to the store ([`Shared`]), and what
//! other collectors shared is adopted at the next pull, so a request made through one
//! collector reaches the agent through whichever it reports to, and the answer is read
//! through any.

use std::collections::HashMap;
use std::sync::Arc;

use phoenix_wire::diag::{Handed, ProbeSet, Snapshot};
use serde::{Deserialize, Serialize};

use super::clock::Now;

/// Outstanding requests per instance: one. A second one while it waits is refused.
pub const MAX_OUTSTANDING: usize = 1;
/// A request unanswered this long (or [`EXPIRE_INTERVALS`] of the agent's intervals, if
/// longer) is dropped, so an old agent that ignores it does not block the next one.
pub const EXPIRE_MS: i64 = 120_000;
pub const EXPIRE_INTERVALS: i64 = 10;
/// All kept snapshots together, in bytes of their JSON; the oldest go first beyond it.
pub const MAX_TOTAL_BYTES: usize = 64 << 20;

/// A request waiting for its answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pending {
    pub id: u64,
    pub probes: ProbeSet,
    /// Unix ms it was made, and by which token (its name, never its value).
    pub requested_ms: i64,
    pub requested_by: String,
    /// Unix ms it first went out in an ack (None: the agent has not reported since).
    pub handed_ms: Option<i64>,
    #[serde(skip)]
    requested_mono: i64,
}

/// The latest snapshot of one instance.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Latest {
    pub id: u64,
    pub probes: ProbeSet,
    pub requested_ms: i64,
    pub requested_by: String,
    /// Unix ms the answer arrived.
    pub received_ms: i64,
    /// Size of the snapshot's JSON.
    pub bytes: usize,
    pub snapshot: Arc<Snapshot>,
}

/// What the instance view shows of diagnostics.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DiagView {
    pub pending: Option<Pending>,
    pub latest: Option<Arc<Latest>>,
}

/// Why a request or an answer was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiagError {
    #[error("no instance {0:?} has reported to this collector")]
    Unknown(String),
    #[error("instance {0:?} is gone: it does not report any more")]
    Gone(String),
    #[error("request {id} for instance {instance:?} is still waiting for the agent (at most {MAX_OUTSTANDING} outstanding); GET the diagnostics to see it answered")]
    Outstanding { instance: String, id: u64 },
    #[error("instance {instance:?} has no outstanding diagnostics request {id} (expired, answered, or never made)")]
    NotRequested { instance: String, id: u64 },
}

/// A request, or its answer, as collectors share it: one per instance, the newest id wins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shared {
    pub id: u64,
    pub probes: ProbeSet,
    pub requested_ms: i64,
    pub requested_by: String,
    pub answer: Option<SharedAnswer>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SharedAnswer {
    pub received_ms: i64,
    pub bytes: usize,
    pub snapshot: Snapshot,
}

impl Shared {
    pub fn request(p: &Pending) -> Shared {
        Shared {
            id: p.id,
            probes: p.probes,
            requested_ms: p.requested_ms,
            requested_by: p.requested_by.clone(),
            answer: None,
        }
    }

    pub fn answer(l: &Latest) -> Shared {
        Shared {
            id: l.id,
            probes: l.probes,
            requested_ms: l.requested_ms,
            requested_by: l.requested_by.clone(),
            answer: Some(SharedAnswer {
                received_ms: l.received_ms,
                bytes: l.bytes,
                snapshot: (*l.snapshot).clone(),
            }),
        }
    }
}

#[derive(Debug, Default)]
pub struct Board {
    pending: HashMap<String, Pending>,
    latest: HashMap<String, Arc<Latest>>,
    bytes: usize,
    next_id: u64,
}

impl Board {
    /// A new request for `instance` (known, not gone: the caller checked).
    pub fn request(
        &mut self,
        instance: &str,
        probes: ProbeSet,
        by: &str,
        now: Now,
    ) -> Result<Pending, DiagError> {
        if let Some(p) = self.pending.get(instance) {
            return Err(DiagError::Outstanding {
                instance: instance.to_string(),
                id: p.id,
            });
        }
        if self.next_id == 0 {
            // Ids from the wall clock at the first request: a restarted collector does not
            // hand out an id an agent already ran.
            self.next_id = (now.wall_ms.max(1) as u64).saturating_mul(1000);
        }
        self.next_id = self.next_id.saturating_add(1);
        let p = Pending {
            id: self.next_id,
            probes,
            requested_ms: now.wall_ms,
            requested_by: by.to_string(),
            handed_ms: None,
            requested_mono: now.mono_ms,
        };
        self.pending.insert(instance.to_string(), p.clone());
        Ok(p)
    }

    /// The request to put in this ack of `instance`'s, if one waits. `interval_ms` is the
    /// agent's; a request older than its expiry is dropped instead.
    pub fn for_ack(&mut self, instance: &str, interval_ms: i64, now: Now) -> Option<Handed> {
        let p = self.pending.get_mut(instance)?;
        let expire = EXPIRE_MS.max(interval_ms.saturating_mul(EXPIRE_INTERVALS));
        if now.mono_ms.saturating_sub(p.requested_mono) > expire {
            tracing::info!(instance_id = %instance, request = p.id, "diagnostics request expired unanswered");
            self.pending.remove(instance);
            return None;
        }
        p.handed_ms.get_or_insert(now.wall_ms);
        Some(Handed {
            id: p.id,
            probes: p.probes,
        })
    }

    /// The answer to request `id` arrived: it becomes the latest snapshot.
    pub fn answer(
        &mut self,
        instance: &str,
        id: u64,
        snapshot: Snapshot,
        bytes: usize,
        now: Now,
    ) -> Result<Arc<Latest>, DiagError> {
        let p = self
            .pending
            .get(instance)
            .filter(|p| p.id == id)
            .cloned()
            .ok_or_else(|| DiagError::NotRequested {
                instance: instance.to_string(),
                id,
            })?;
        self.pending.remove(instance);
        let l = Arc::new(Latest {
            id,
            probes: p.probes,
            requested_ms: p.requested_ms,
            requested_by: p.requested_by,
            received_ms: now.wall_ms,
            bytes,
            snapshot: Arc::new(snapshot),
        });
        self.keep(instance, l.clone());
        Ok(l)
    }

    /// `l` becomes `instance`'s latest snapshot, within the byte budget.
    fn keep(&mut self, instance: &str, l: Arc<Latest>) {
        let bytes = l.bytes;
        if let Some(old) = self.latest.insert(instance.to_string(), l) {
            self.bytes = self.bytes.saturating_sub(old.bytes);
        }
        self.bytes = self.bytes.saturating_add(bytes);
        while self.bytes > MAX_TOTAL_BYTES && self.latest.len() > 1 {
            let Some(oldest) = self
                .latest
                .iter()
                .filter(|(k, _)| k.as_str() != instance)
                .min_by_key(|(_, l)| l.received_ms)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(old) = self.latest.remove(&oldest) {
                self.bytes = self.bytes.saturating_sub(old.bytes);
            }
        }
    }

    /// Takes what another collector shared: a request this collector's acks then hand out,
    /// or an answer that becomes the latest snapshot. Older than what is here: ignored.
    pub fn adopt(&mut self, instance: &str, s: Shared, now: Now) {
        if self.latest.get(instance).is_some_and(|l| l.id >= s.id) {
            return;
        }
        match s.answer {
            Some(a) => {
                if self.pending.get(instance).is_some_and(|p| p.id <= s.id) {
                    self.pending.remove(instance);
                }
                let l = Latest {
                    id: s.id,
                    probes: s.probes,
                    requested_ms: s.requested_ms,
                    requested_by: s.requested_by,
                    received_ms: a.received_ms,
                    bytes: a.bytes.min(phoenix_wire::diag::MAX_SNAPSHOT_BYTES),
                    snapshot: Arc::new(a.snapshot),
                };
                self.keep(instance, Arc::new(l));
            }
            None => {
                if self.pending.get(instance).is_some_and(|p| p.id >= s.id) {
                    return;
                }
                // Its age counts from when it was made, on this collector's clock.
                let age = now.wall_ms.saturating_sub(s.requested_ms).max(0);
                self.pending.insert(
                    instance.to_string(),
                    Pending {
                        id: s.id,
                        probes: s.probes,
                        requested_ms: s.requested_ms,
                        requested_by: s.requested_by,
                        handed_ms: None,
                        requested_mono: now.mono_ms.saturating_sub(age),
                    },
                );
            }
        }
    }

    /// Drop what belongs to instances the fleet no longer has.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.pending.retain(|k, _| keep(k));
        let before = self.latest.len();
        self.latest.retain(|k, _| keep(k));
        if self.latest.len() != before {
            self.bytes = self.latest.values().map(|l| l.bytes).sum();
        }
    }

    /// The view of every instance that has a request or a snapshot.
    pub fn views(&self) -> HashMap<String, DiagView> {
        let mut out: HashMap<String, DiagView> = HashMap::new();
        for (k, p) in &self.pending {
            out.entry(k.clone()).or_default().pending = Some(p.clone());
        }
        for (k, l) in &self.latest {
            out.entry(k.clone()).or_default().latest = Some(l.clone());
        }
        out
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> Now {
        Now {
            wall_ms: 1_700_000_000_000 + ms,
            mono_ms: ms,
        }
    }

    #[test]
    fn one_request_at_a_time_handed_until_answered_then_kept() {
        let mut b = Board::default();
        assert_eq!(b.for_ack("i-1", 1000, at(0)), None);
        let p = b.request("i-1", ProbeSet::Full, "reader", at(0)).unwrap();
        assert!(matches!(
            b.request("i-1", ProbeSet::Kernel, "reader", at(1)),
            Err(DiagError::Outstanding { id, .. }) if id == p.id
        ));
        // Other instances are not held up.
        let q = b.request("i-2", ProbeSet::Kernel, "r", at(1)).unwrap();
        assert_ne!(p.id, q.id);
        let h = b.for_ack("i-1", 1000, at(10)).unwrap();
        assert_eq!((h.id, h.probes), (p.id, ProbeSet::Full));
        assert_eq!(
            b.for_ack("i-1", 1000, at(20)),
            Some(h),
            "every ack until answered"
        );
        assert_eq!(
            b.answer("i-1", p.id + 7, Snapshot::default(), 10, at(30)),
            Err(DiagError::NotRequested {
                instance: "i-1".into(),
                id: p.id + 7
            })
        );
        let l = b
            .answer("i-1", p.id, Snapshot::default(), 10, at(30))
            .unwrap();
        assert_eq!(l.received_ms, at(30).wall_ms);
        assert_eq!(b.for_ack("i-1", 1000, at(40)), None);
        assert!(
            b.answer("i-1", p.id, Snapshot::default(), 10, at(50))
                .is_err(),
            "once"
        );
        let v = b.views();
        assert_eq!(v["i-1"].latest.as_ref().unwrap().id, p.id);
        assert!(v["i-1"].pending.is_none() && v["i-2"].pending.is_some());
        // A new request is possible now.
        assert!(b.request("i-1", ProbeSet::Full, "r", at(60)).is_ok());
    }

    #[test]
    fn unanswered_requests_expire_and_the_byte_budget_holds() {
        let mut b = Board::default();
        b.request("i-1", ProbeSet::Full, "r", at(0)).unwrap();
        assert!(b.for_ack("i-1", 1000, at(EXPIRE_MS)).is_some());
        assert!(b.for_ack("i-1", 1000, at(EXPIRE_MS + 1)).is_none());
        assert!(b
            .request("i-1", ProbeSet::Full, "r", at(EXPIRE_MS + 2))
            .is_ok());
        // A slow agent (60 s interval) gets 10 intervals.
        let mut b = Board::default();
        b.request("i-1", ProbeSet::Full, "r", at(0)).unwrap();
        assert!(b.for_ack("i-1", 60_000, at(500_000)).is_some());
        let mut b = Board::default();
        let big = MAX_TOTAL_BYTES / 3 + 1;
        for k in 0..5 {
            let id = format!("i-{k}");
            let p = b.request(&id, ProbeSet::Full, "r", at(k)).unwrap();
            b.answer(&id, p.id, Snapshot::default(), big, at(k))
                .unwrap();
            assert!(b.bytes() <= MAX_TOTAL_BYTES, "{}", b.bytes());
        }
        let v = b.views();
        assert!(v.contains_key("i-4") && v.contains_key("i-3") && !v.contains_key("i-0"));
        b.retain(|k| k != "i-4");
        assert_eq!(b.bytes(), big);
    }

    #[test]
    fn a_request_shared_by_another_collector_is_handed_and_its_answer_read_there() {
        let (mut a, mut b) = (Board::default(), Board::default());
        let p = a.request("i-1", ProbeSet::Kernel, "reader", at(0)).unwrap();
        b.adopt("i-1", Shared::request(&p), at(5));
        assert_eq!(b.for_ack("i-1", 1000, at(6)).map(|h| h.id), Some(p.id));
        let l = b
            .answer("i-1", p.id, Snapshot::default(), 10, at(7))
            .unwrap();
        // The answer travels back; a stale copy of the request does not undo it.
        a.adopt("i-1", Shared::answer(&l), at(8));
        a.adopt("i-1", Shared::request(&p), at(9));
        let v = a.views();
        assert!(v["i-1"].pending.is_none(), "{v:?}");
        assert_eq!(v["i-1"].latest.as_ref().unwrap().id, p.id);
        assert_eq!(a.for_ack("i-1", 1000, at(10)), None);
        // An adopted request expires by its own age, not by when it arrived here.
        let mut c = Board::default();
        let mut old = Shared::request(&p);
        old.requested_ms = at(0).wall_ms - EXPIRE_MS - 1;
        c.adopt("i-1", old, at(0));
        assert_eq!(c.for_ack("i-1", 1000, at(0)), None);
    }
}
