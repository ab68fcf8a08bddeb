//! The fleet core: one room with a narrow door.
//!
//! Everything the collector knows about its instances (state, health rules, the phoenix
//! queue, persistence) lives behind [`Fleet`]. Nothing outside this module takes its lock,
//! touches an [`state::Instance`] or reads its JSON back:
//! - ingest (the report handler) calls [`Fleet::is_stored`], [`Fleet::admit`] and
//!   [`Fleet::stored`];
//! - the recycler's ack calls [`Fleet::ack`];
//! - the queue driver (the decider module) calls [`Fleet::pass`], [`Fleet::due_points`],
//!   [`Fleet::save`] and friends;
//! - readers (API, page, `/metrics`) take [`Fleet::view`], an `Arc` snapshot that never
//!   blocks a report.
//!
//! Where the state lives is a [`FleetStore`] (embedded by default); time comes from one
//! [`Clock`].

pub mod clock;
pub mod diag;
#[cfg(test)]
mod fuzz;
pub mod health;
pub mod policy;
pub mod queue;
pub mod reason;
pub mod state;
pub mod store;
pub mod view;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use phoenix_wire::{Identity, Report};

pub use clock::{Clock, ManualClock, Now, SystemClock};
pub use health::{DriftInfo, Reason, Rules};
pub use queue::{AckError, Alert};
pub use state::{Observation, State};
pub use store::{EmbeddedStore, FleetStore, Snapshot, StoreError};
pub use view::{FleetView, InstanceView, QueueEntry, QueueView, StoreHealth};

use queue::{QueueState, Watch};
use state::Instance;

/// A `phoenix_instance` point per instance at least this often, so Grafana's "last" is fresh.
pub const POINT_EVERY_MS: i64 = 30_000;

/// Views of fleets up to this size are rebuilt on every read that follows a change; larger
/// ones only by the queue pass (a build copies every instance under the lock).
const SMALL_FLEET: usize = 1000;

/// How long a lateness peak counts (the allowance is the largest peak this recent).
const LATE_MEMORY_MS: i64 = 10_000;

#[derive(Debug, Default)]
struct Inner {
    instances: HashMap<String, Instance>,
    queue: QueueState,
    /// (monotonic ms, lateness peak) of the latest passes.
    late: VecDeque<(i64, i64)>,
    /// Diagnostics requests and snapshots (memory only).
    diag: diag::Board,
}

/// What the report handler learns from admitting a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Admission {
    /// Ask the agent for its full drift state (the record is missing or differs).
    pub resend_drift: bool,
    /// This (boot, seq)'s effects were applied now (false: a retry).
    pub first_time: bool,
}

/// A new mark, for the webhook and the audit trail.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MarkEvent {
    pub instance_id: String,
    pub image_id: String,
    pub group: String,
    pub host: String,
    pub reason: Reason,
    pub evidence: String,
    pub since: i64,
    pub state: State,
}

/// What one pass decided, for the queue driver.
#[derive(Debug, Default)]
pub struct PassReport {
    pub at: Now,
    pub marks: Vec<MarkEvent>,
    /// (instance, why) for instances whose mark became held (or whose hold changed).
    pub holds: Vec<(String, String)>,
    pub alerts_raised: Vec<Alert>,
    pub alerts_cleared: Vec<Alert>,
    pub forgotten: Vec<String>,
    pub would_mark: Vec<String>,
}

impl PassReport {
    /// What this pass decided, as an audit trail keeps it.
    pub fn decisions(&self) -> Vec<store::Decision> {
        let at_ms = self.at.wall_ms;
        let marks = self.marks.iter().map(|m| store::Decision {
            at_ms,
            action: "mark",
            instance_id: Some(m.instance_id.clone()),
            group: m.group.clone(),
            detail: serde_json::json!({"reason": m.reason.as_str(), "evidence": m.evidence}),
        });
        let holds = self.holds.iter().map(|(id, why)| store::Decision {
            at_ms,
            action: "hold",
            instance_id: Some(id.clone()),
            group: String::new(),
            detail: serde_json::json!({ "held": why }),
        });
        let alerts = self.alerts_raised.iter().map(|a| store::Decision {
            at_ms,
            action: "alert",
            instance_id: None,
            group: a.group.clone(),
            detail: serde_json::json!({"message": a.message, "bad": a.bad, "size": a.size}),
        });
        marks.chain(holds).chain(alerts).collect()
    }
}

/// The `phoenix_instance` point of one instance.
#[derive(Debug, Clone, PartialEq)]
pub struct InstancePoint {
    pub instance_id: String,
    pub group: String,
    pub host: String,
    pub image_id: String,
    pub state: State,
    pub reason: &'static str,
    pub evidence: String,
    pub marked: bool,
    pub held: String,
}

#[derive(Debug)]
pub struct Fleet {
    inner: Mutex<Inner>,
    view: RwLock<Arc<FleetView>>,
    rules: Rules,
    clock: Arc<dyn Clock>,
    store: Arc<dyn FleetStore>,
    /// Monotonic ms this collector started: silence is counted from then at the earliest.
    started_mono: i64,
    /// Monotonic ms until which silence does not count: the metrics store was down (agents
    /// wait out the Retry-After they were given).
    blind_until: AtomicI64,
    /// The largest lateness reported by the handlers since the last pass.
    late_peak: AtomicI64,
    metrics_store: Mutex<StoreHealth>,
    /// New ids refused at `--max-instances`: the alert, and the monotonic ms of the latest.
    cap: Mutex<Option<(view::CapAlert, i64)>>,
    wake: (Mutex<bool>, Condvar),
    dirty: AtomicBool,
    /// A verdict moved or an instance appeared since the view was built: the next read
    /// rebuilds it (rarely: ordinary reports only refresh figures, which the next pass shows).
    stale: AtomicBool,
    /// A queue pass ran since the published view's instance list was built: the next read
    /// of the list rebuilds it (incrementally). Passes build only the queue and counts, so a
    /// fleet nobody reads costs no per-instance copy each second.
    list_stale: AtomicBool,
    /// One list rebuild at a time (readers arriving meanwhile take its result).
    listing: Mutex<()>,
    /// One preview at a time: each copies the whole fleet under the lock.
    previewing: Mutex<()>,
}

impl Fleet {
    /// An empty fleet.
    pub fn new(rules: Rules, clock: Arc<dyn Clock>, store: Arc<dyn FleetStore>) -> Fleet {
        let started_mono = clock.mono_ms();
        Fleet {
            inner: Mutex::default(),
            view: RwLock::new(Arc::new(FleetView::default())),
            rules,
            clock,
            store,
            started_mono,
            blind_until: AtomicI64::new(i64::MIN),
            late_peak: AtomicI64::new(0),
            metrics_store: Mutex::new(StoreHealth {
                up: true,
                ..Default::default()
            }),
            cap: Mutex::new(None),
            wake: (Mutex::new(false), Condvar::new()),
            dirty: AtomicBool::new(false),
            stale: AtomicBool::new(false),
            list_stale: AtomicBool::new(false),
            listing: Mutex::new(()),
            previewing: Mutex::new(()),
        }
    }

    /// A fleet with what `store` saved, if anything.
    pub fn open(
        rules: Rules,
        clock: Arc<dyn Clock>,
        store: Arc<dyn FleetStore>,
    ) -> Result<Fleet, StoreError> {
        let f = Fleet::new(rules, clock, store);
        if let Some(snap) = f.store.load()? {
            tracing::info!(instances = snap.instances.len(), saved_ms = snap.saved_ms, store = %f.store.describe(), "fleet state restored");
            f.restore(snap);
        }
        f.publish();
        Ok(f)
    }

    /// A fleet in memory only, on the system clock (tests, tools).
    pub fn in_memory(rules: Rules) -> Fleet {
        Fleet::new(rules, Arc::new(SystemClock::new()), Arc::new(MemoryStore))
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    pub fn clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }

    pub fn now(&self) -> Now {
        Now::of(self.clock.as_ref())
    }

    pub fn describe_store(&self) -> String {
        self.store.describe()
    }

    pub fn is_decider(&self) -> bool {
        self.store.is_decider()
    }

    /// A shared fleet store's health: None for the embedded one (nothing to be down).
    pub fn store_status(&self) -> Option<store::SharedStatus> {
        self.store.status()
    }

    /// Whether a call through this door would wait for the fleet's lock right now (a queue
    /// pass holds it): the async handlers step off their worker only then
    /// (`app::may_block`). A moment later it may differ; that only costs one short wait.
    pub fn busy(&self) -> bool {
        matches!(
            self.inner.try_lock(),
            Err(std::sync::TryLockError::WouldBlock)
        )
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere must not turn every later report into a panic too.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where silence starts counting and the lateness allowance (`g` is the locked inner).
    fn watch(&self, g: &Inner) -> Watch {
        Watch {
            since_mono: self
                .started_mono
                .max(self.blind_until.load(Ordering::Relaxed)),
            late_ms: late_ms_of(&g.late),
        }
    }

    // ---- ingest ----

    /// Whether the points of this (instance, boot, seq) are known to be stored: only then
    /// may a report be answered "duplicate".
    pub fn is_stored(&self, id: &Identity, seq: u64) -> bool {
        state::is_stored(&self.lock().instances, id, seq)
    }

    /// Admit an authenticated, decoded report: proof of life now, and (once per
    /// (boot, seq)) its figures, checks and drift verdict. Call before writing its points.
    pub fn admit(
        &self,
        r: &Report,
        drift: Option<DriftInfo>,
        drift_root: Option<String>,
    ) -> Admission {
        let o = Observation::of(r, drift, drift_root, self.now());
        let (applied, moved) = {
            let mut g = self.lock();
            let was_protected = g
                .instances
                .get(&o.identity.instance_id)
                .map(|i| i.protected);
            let applied = state::apply(&mut g.instances, &o, &self.rules);
            let w = self.watch(&g);
            let moved = g.instances.get(&o.identity.instance_id).is_some_and(|i| {
                let v = health::judge(&queue::facts(i, w), &self.rules, o.at);
                v.worst().map(|p| p.reason) != i.phx.problem.as_ref().map(|p| p.reason)
                    || i.phx.state == State::Suspect
                    // A protect file came or went: the hold changes at once.
                    || was_protected.is_some_and(|w| w != i.protected)
            });
            (applied, moved || applied.new_life)
        };
        if let Err(e) = self.store.observe(&o) {
            tracing::warn!(error = %e, "fleet store did not take an observation");
        }
        self.dirty.store(true, Ordering::Relaxed);
        if moved {
            self.stale.store(true, Ordering::Relaxed);
            // The queue pass (which needs the whole group) runs at once when a verdict
            // moved, not only on the next tick.
            self.wake();
        }
        Admission {
            resend_drift: applied.resend_drift,
            first_time: applied.first_time,
        }
    }

    /// The points of this report were stored.
    pub fn stored(&self, id: &Identity, seq: u64) {
        let now = self.clock.mono_ms();
        state::stored(&mut self.lock().instances, id, seq, now);
        if let Err(e) = self.store.stored(&id.instance_id, &id.boot_id, seq) {
            tracing::warn!(error = %e, "fleet store did not take a stored seq");
        }
    }

    /// How long a report waited inside this collector (before admission, or for its write):
    /// the collector's own lateness, which must never read as the instance's silence.
    pub fn note_lateness(&self, ms: i64) {
        self.late_peak.fetch_max(ms.max(0), Ordering::Relaxed);
    }

    /// The identity gate refused a new instance id: the collector knows `max_instances` ids.
    /// Raises the instance-cap alert of `GET /v1/phoenix` (cleared
    /// [`view::CAP_ALERT_MS`] after the latest refusal).
    pub fn refused_new_instance(&self, max_instances: usize) {
        let now = self.now();
        let mut g = self.cap.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = g
            .as_ref()
            .is_none_or(|(_, t)| now.mono_ms.saturating_sub(*t) >= view::CAP_ALERT_MS);
        if fresh {
            self.stale.store(true, Ordering::Relaxed);
            *g = Some((
                view::CapAlert {
                    refused: 0,
                    max_instances,
                    since_ms: now.wall_ms,
                    last_ms: now.wall_ms,
                    message: String::new(),
                },
                now.mono_ms,
            ));
        }
        if let Some((a, t)) = g.as_mut() {
            a.refused = a.refused.saturating_add(1);
            a.max_instances = max_instances;
            a.last_ms = now.wall_ms;
            a.message = format!(
                "{} new instance ids refused (429) since {}: this collector already knows --max-instances ({max_instances}) ids. Real new boxes are not being admitted: raise --max-instances if the fleet is this big, else look for a sender inventing ids",
                a.refused,
                clock::utc(a.since_ms)
            );
            *t = now.mono_ms;
        }
    }

    /// The identity gate forgot these ids (silent past its limit): drop them here too,
    /// except those with a standing mark (the recycler still has to see it; the budget
    /// bounds them). Returns how many were dropped.
    pub fn forget(&self, ids: &[String]) -> usize {
        let mut g = self.lock();
        let before = g.instances.len();
        for id in ids {
            let standing = g
                .instances
                .get(id)
                .is_some_and(|i| i.phx.mark.as_ref().is_some_and(|m| m.gone_ms.is_none()));
            if !standing {
                g.instances.remove(id);
            }
        }
        let n = before - g.instances.len();
        drop(g);
        if n > 0 {
            tracing::info!(forgotten = n, "fleet forgot ids the identity gate forgot");
            self.dirty.store(true, Ordering::Relaxed);
            self.stale.store(true, Ordering::Relaxed);
        }
        n
    }

    /// Current drift hashes of every other live instance of `image` (the majority rule),
    /// without `instance_id`'s own previous one.
    pub fn peer_hashes(&self, image: &str, instance_id: &str) -> Vec<String> {
        let g = self.lock();
        g.instances
            .iter()
            .filter(|(id, i)| {
                id.as_str() != instance_id
                    && i.identity.image_id == image
                    && i.phx.state != State::Gone
            })
            .filter_map(|(_, i)| i.drift.as_ref().map(|d| d.hash.clone()))
            .collect()
    }

    // ---- diagnostics on demand ----

    /// A reader or recycler (`by`, a token name) asks `id` for a snapshot of `probes`. At
    /// most [`diag::MAX_OUTSTANDING`] wait per instance.
    pub fn request_diagnostics(
        &self,
        id: &str,
        probes: phoenix_wire::diag::ProbeSet,
        by: &str,
    ) -> Result<diag::Pending, diag::DiagError> {
        let now = self.now();
        let p = {
            let mut g = self.lock();
            match g.instances.get(id) {
                None => return Err(diag::DiagError::Unknown(id.to_string())),
                Some(i) if i.phx.state == State::Gone || i.is_gone() => {
                    return Err(diag::DiagError::Gone(id.to_string()))
                }
                Some(_) => {}
            }
            g.diag.request(id, probes, by, now)?
        };
        self.stale.store(true, Ordering::Relaxed);
        if let Err(e) = self.store.share_diag(id, &diag::Shared::request(&p)) {
            tracing::warn!(error = %e, instance_id = %id, "fleet store: diagnostics request not shared; it reaches the agent only through this collector");
        }
        Ok(p)
    }

    /// The request to hand `identity`'s agent in the ack being built, if one waits.
    pub fn diagnostics_for_ack(&self, identity: &Identity) -> Option<phoenix_wire::diag::Handed> {
        let now = self.now();
        let mut g = self.lock();
        let interval = g
            .instances
            .get(&identity.instance_id)
            .map_or(0, |i| health::interval_of(i.interval_ms));
        let h = g.diag.for_ack(&identity.instance_id, interval, now);
        if h.is_some() {
            self.stale.store(true, Ordering::Relaxed);
        }
        h
    }

    /// An agent's answer (decoded and validated; `bytes` is its JSON's size).
    pub fn answer_diagnostics(
        &self,
        a: phoenix_wire::diag::Answer,
        bytes: usize,
    ) -> Result<Arc<diag::Latest>, diag::DiagError> {
        let now = self.now();
        let l =
            self.lock()
                .diag
                .answer(&a.agent.instance_id, a.request_id, a.snapshot, bytes, now)?;
        self.stale.store(true, Ordering::Relaxed);
        if let Err(e) = self
            .store
            .share_diag(&a.agent.instance_id, &diag::Shared::answer(&l))
        {
            tracing::warn!(error = %e, "fleet store: diagnostics answer not shared; read it through this collector");
        }
        Ok(l)
    }

    // ---- the recycler ----

    /// The recycler took `id`: Ok(true) acked now, Ok(false) acked before.
    pub fn ack(&self, id: &str, by: &str) -> Result<bool, AckError> {
        let now = self.clock.wall_ms();
        let r = queue::ack(&mut self.lock().instances, id, by, now);
        if r == Ok(true) {
            tracing::info!(instance_id = %id, by, "mark acked by the recycler");
            self.dirty.store(true, Ordering::Relaxed);
            if let Err(e) = self.store.ack(id, by, now) {
                tracing::warn!(error = %e, "fleet store did not take an ack");
            }
        }
        if r.is_ok() {
            self.publish();
            self.wake();
        }
        r
    }

    // ---- the queue driver ----

    /// The metrics store's state as the writer sees it; `retry_after` is what reports are
    /// told to wait. While it is down, and for that long after, silence does not count.
    pub fn set_metrics_store(&self, down: Option<(String, Duration)>) {
        let now = self.now();
        let mut s = self.metrics_store.lock().unwrap_or_else(|e| e.into_inner());
        match down {
            Some((reason, retry_after)) => {
                let until = now
                    .mono_ms
                    .saturating_add(health::ms(retry_after))
                    .saturating_add(1000);
                self.blind_until.fetch_max(until, Ordering::Relaxed);
                if s.up {
                    s.down_since_ms = Some(now.wall_ms);
                }
                s.up = false;
                s.reason = Some(reason);
            }
            None => {
                *s = StoreHealth {
                    up: true,
                    ..Default::default()
                }
            }
        }
    }

    /// One queue pass now: merge what other collectors observed, judge every instance, mark
    /// or hold, and publish a new view.
    pub fn pass(&self) -> PassReport {
        let now = self.now();
        let pulled = match self.store.pull() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "fleet store: could not pull observations");
                store::Pulled::default()
            }
        };
        let decider = self.store.is_decider();
        let peak = self.late_peak.swap(0, Ordering::Relaxed);
        let mut rep = PassReport {
            at: now,
            ..Default::default()
        };
        {
            let mut g = self.lock();
            for o in &pulled.observations {
                state::apply(&mut g.instances, o, &self.rules);
            }
            for (i, b, s) in &pulled.stored {
                let id = Identity {
                    instance_id: i.clone(),
                    boot_id: b.clone(),
                    ..Default::default()
                };
                state::stored(&mut g.instances, &id, *s, now.mono_ms);
            }
            for (i, by, at) in &pulled.acks {
                queue::ack(&mut g.instances, i, by, *at).ok();
            }
            // Not deciding: the decider's verdicts (state, marks, holds) as it saved them.
            for (id, phx) in pulled.phx {
                if let Some(i) = g.instances.get_mut(&id) {
                    let last_point_ms = i.phx.last_point_ms;
                    i.phx = phx;
                    i.phx.last_point_ms = last_point_ms;
                }
            }
            for (id, d) in pulled.diag {
                if g.instances.contains_key(&id) {
                    g.diag.adopt(&id, d, now);
                }
            }
            if let Some(q) = pulled.queue {
                let budget = std::mem::take(&mut g.queue.budget);
                g.queue = q;
                g.queue.budget = budget;
            }
            g.late.push_back((now.mono_ms, peak));
            while g
                .late
                .front()
                .is_some_and(|(t, _)| now.mono_ms.saturating_sub(*t) > LATE_MEMORY_MS)
            {
                g.late.pop_front();
            }
            let watch = self.watch(&g);
            if decider {
                let inner = &mut *g;
                let out = queue::evaluate(
                    &mut inner.instances,
                    &mut inner.queue,
                    &self.rules,
                    now,
                    watch,
                );
                if !out.changed.is_empty()
                    || !out.forgotten.is_empty()
                    || !out.alerts_raised.is_empty()
                    || !out.alerts_cleared.is_empty()
                {
                    self.dirty.store(true, Ordering::Relaxed);
                }
                rep.marks = out
                    .new_marks
                    .iter()
                    .filter_map(|id| inner.instances.get(id).and_then(mark_event))
                    .collect();
                rep.holds = out
                    .holds_news
                    .iter()
                    .filter_map(|id| {
                        let h = inner.instances.get(id)?.phx.held.clone()?;
                        Some((id.clone(), h))
                    })
                    .collect();
                rep.alerts_raised = out.alerts_raised;
                rep.alerts_cleared = out.alerts_cleared;
                rep.forgotten = out.forgotten;
                rep.would_mark = out.would_mark;
            }
            let inner = &mut *g;
            let instances = &inner.instances;
            inner.diag.retain(|id| instances.contains_key(id));
            self.stale.store(false, Ordering::Relaxed);
            // The instance list stays the published one (see `list_stale`).
            let list = self.published().instances.clone();
            let v = self.build_view(&g, now, list);
            self.list_stale.store(true, Ordering::Relaxed);
            drop(g);
            self.set_view(v);
        }
        let decisions = rep.decisions();
        if !decisions.is_empty() {
            self.store.audit(&decisions);
        }
        rep
    }

    fn build_view(&self, g: &Inner, now: Now, list: Arc<Vec<Arc<InstanceView>>>) -> FleetView {
        let inputs = view::Inputs {
            now,
            store: self
                .metrics_store
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            decider: self.store.is_decider(),
            late_ms: late_ms_of(&g.late),
            watch_since_mono: self.watch(g).since_mono,
            diag: g.diag.views(),
            instance_cap: self
                .cap
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .filter(|(_, t)| now.mono_ms.saturating_sub(*t) < view::CAP_ALERT_MS)
                .map(|(a, _)| a.clone()),
        };
        view::with_list(&g.instances, &g.queue, &self.rules, &inputs, list)
    }

    fn set_view(&self, v: FleetView) {
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(v);
    }

    fn published(&self) -> Arc<FleetView> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The instance list of `g` now, sharing unchanged entries with the published one.
    fn fresh_list(&self, g: &Inner) -> Arc<Vec<Arc<InstanceView>>> {
        let prev = self.published().instances.clone();
        let list = view::build_list(
            &g.instances,
            &g.diag.views(),
            self.watch(g).since_mono,
            &prev,
        );
        if view::same_list(&list, &prev) {
            prev
        } else {
            Arc::new(list)
        }
    }

    /// Build and publish a view now (after an ack; tests).
    pub fn publish(&self) {
        let now = self.now();
        let v = {
            let g = self.lock();
            self.list_stale.store(false, Ordering::Relaxed);
            let list = self.fresh_list(&g);
            self.build_view(&g, now, list)
        };
        self.set_view(v);
    }

    /// Rebuild the published view's instance list if a pass ran since it was built; its
    /// queue and counts stay the latest pass's.
    fn refresh_list(&self) {
        let _one = self.listing.lock().unwrap_or_else(|e| e.into_inner());
        if !self.list_stale.swap(false, Ordering::Relaxed) {
            return; // another reader just did
        }
        let list = {
            let g = self.lock();
            self.fresh_list(&g)
        };
        let mut cur = self.view.write().unwrap_or_else(|e| e.into_inner());
        if !Arc::ptr_eq(&cur.instances, &list) {
            let mut v = FleetView::clone(&cur);
            v.instances = list;
            *cur = Arc::new(v);
        }
    }

    /// `phoenix_instance` points due: instances whose state changed or whose last point is
    /// older than [`POINT_EVERY_MS`]. Call [`Fleet::points_failed`] if the store refuses them.
    pub fn due_points(&self) -> Vec<InstancePoint> {
        let now_ms = self.clock.wall_ms();
        let mut g = self.lock();
        let mut out = Vec::new();
        for i in g.instances.values_mut() {
            let due = i.phx.last_point_ms == 0
                || (now_ms.saturating_sub(i.phx.last_point_ms) >= POINT_EVERY_MS
                    && i.phx.state != State::Gone);
            if !due {
                continue;
            }
            out.push(instance_point(i));
            i.phx.last_point_ms = now_ms;
        }
        out
    }

    /// The store did not take these instances' points: they are due again.
    pub fn points_failed(&self, ids: &[String]) {
        let mut g = self.lock();
        for id in ids {
            if let Some(i) = g.instances.get_mut(id) {
                i.phx.last_point_ms = 0;
            }
        }
    }

    /// Whether anything changed since the last call.
    pub fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> Snapshot {
        let now = self.now();
        let g = self.lock();
        Snapshot {
            version: store::VERSION,
            saved_ms: now.wall_ms,
            saved_mono: now.mono_ms,
            instances: g.instances.values().cloned().collect(),
            queue: g.queue.clone(),
        }
    }

    /// Persist the whole state (blocking: call it off the async threads).
    pub fn save(&self) -> Result<(), StoreError> {
        let snap = self.snapshot();
        self.store.save(&snap)
    }

    /// Take a saved state. Its monotonic readings belong to the process that wrote it; they
    /// are moved onto this clock as if the time between (measured on the wall clocks, at
    /// least zero) had passed.
    pub fn restore(&self, s: Snapshot) {
        let now = self.now();
        let away = now.wall_ms.saturating_sub(s.saved_ms).max(0);
        let offset = now
            .mono_ms
            .saturating_sub(away)
            .saturating_sub(s.saved_mono);
        let mv = |t: &mut i64| *t = t.saturating_add(offset);
        let mut g = self.lock();
        g.instances = s
            .instances
            .into_iter()
            .map(|mut i| {
                i.shift_mono(offset);
                (i.identity.instance_id.clone(), i)
            })
            .collect();
        g.queue = s.queue;
        for t in g.queue.recent_marks.iter_mut() {
            mv(t);
        }
    }

    /// Wake the queue driver (a verdict moved, an ack came).
    pub fn wake(&self) {
        let (m, c) = &self.wake;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
        c.notify_one();
    }

    /// Block until [`Fleet::wake`] or `timeout`.
    pub fn wait_for_wake(&self, timeout: Duration) {
        let (m, c) = &self.wake;
        let g = m.lock().unwrap_or_else(|e| e.into_inner());
        let (mut g, _) = c
            .wait_timeout_while(g, timeout, |woken| !*woken)
            .unwrap_or_else(|e| e.into_inner());
        *g = false;
    }

    // ---- reads ----

    /// The latest published view (at most one pass old). Never waits for a report, except
    /// that in a small fleet a read right after a verdict moved (or a new instance came)
    /// rebuilds it, so a reader sees what it just caused. A large fleet's readers always get
    /// the latest pass's queue; the instance list is rebuilt by the first read after a pass
    /// (under the lock reports take, but only the instances that changed are copied).
    pub fn view(&self) -> Arc<FleetView> {
        let v = self.published();
        if v.instances.len() <= SMALL_FLEET && self.stale.swap(false, Ordering::Relaxed) {
            self.publish();
        } else if self.list_stale.load(Ordering::Relaxed) {
            self.refresh_list();
        } else {
            return v;
        }
        self.published()
    }

    /// Like [`Fleet::view`] for readers of the queue and the counts only (`/v1/phoenix`,
    /// `/metrics`): a large fleet's instance list is left as last built (it may be older
    /// than the queue), so these reads never copy an instance.
    pub fn queue_view(&self) -> Arc<FleetView> {
        let v = self.published();
        if v.instances.len() <= SMALL_FLEET {
            return self.view();
        }
        v
    }

    /// `GET /v1/phoenix/preview`: which instances a policy (this collector's, with `budget`
    /// and `windows` in place of its own where given) would mark now, and why the others
    /// wait. Runs one queue pass on a copy of the fleet, logging nothing and changing nothing.
    /// None while another preview runs (each copies the fleet under its lock).
    pub fn preview(
        &self,
        budget: Option<policy::Budgets>,
        windows: Option<policy::Windows>,
    ) -> Option<Preview> {
        let _one = self.previewing.try_lock().ok()?;
        let mut rules = self.rules.clone();
        if let Some(b) = budget {
            rules.budget = b;
        }
        if let Some(w) = windows {
            rules.windows = w;
        }
        rules.log_only = false;
        let now = self.now();
        let (mut instances, mut q, w) = {
            let g = self.lock();
            (g.instances.clone(), g.queue.clone(), self.watch(&g))
        };
        let out =
            tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || {
                queue::evaluate(&mut instances, &mut q, &rules, now, w)
            });
        let entry = |id: &str, hold: Option<String>| {
            let i = instances.get(id)?;
            let (reason, evidence) = match (&i.phx.mark, &i.phx.problem) {
                (Some(m), _) if hold.is_none() => (m.reason, m.evidence.clone()),
                (_, Some(p)) => (p.reason, p.evidence.clone()),
                _ => return None,
            };
            Some(PreviewEntry {
                instance_id: id.to_string(),
                group: i.group().to_string(),
                reason,
                evidence,
                hold,
            })
        };
        let mut would_mark: Vec<PreviewEntry> = out
            .new_marks
            .iter()
            .filter_map(|id| entry(id, None))
            .collect();
        would_mark.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        let mut held: Vec<PreviewEntry> = instances
            .iter()
            .filter(|(_, i)| i.phx.mark.is_none())
            .filter_map(|(id, i)| i.phx.held.clone().and_then(|h| entry(id, Some(h))))
            .collect();
        held.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        let already_marked = instances
            .values()
            .filter(|i| i.phx.mark.as_ref().is_some_and(|m| m.gone_ms.is_none()))
            .count()
            .saturating_sub(would_mark.len());
        Some(Preview {
            budget: rules.budget.to_string(),
            windows: rules.windows.texts(),
            window_open: rules.windows.is_open(now.wall_ms),
            would_mark,
            held,
            already_marked,
            groups: q.budget.into_iter().collect(),
        })
    }
}

/// What a policy would do now (`GET /v1/phoenix/preview`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Preview {
    pub budget: String,
    pub windows: Vec<String>,
    pub window_open: bool,
    /// Instances this policy would mark in a pass now.
    pub would_mark: Vec<PreviewEntry>,
    /// Bad instances it would hold, with why.
    pub held: Vec<PreviewEntry>,
    /// Instances marked or acked already (they count against the budgets).
    pub already_marked: usize,
    /// Per group: size, marked, acked, not ready and each budget's limit under this policy.
    pub groups: Vec<(String, queue::GroupBudget)>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PreviewEntry {
    pub instance_id: String,
    pub group: String,
    pub reason: Reason,
    pub evidence: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold: Option<String>,
}

fn late_ms_of(peaks: &VecDeque<(i64, i64)>) -> i64 {
    peaks.iter().map(|(_, p)| *p).max().unwrap_or(0)
}

fn mark_event(i: &Instance) -> Option<MarkEvent> {
    let m = i.phx.mark.as_ref()?;
    Some(MarkEvent {
        instance_id: i.identity.instance_id.clone(),
        image_id: i.identity.image_id.clone(),
        group: i.group().to_owned(),
        host: i.identity.hostname.clone(),
        reason: m.reason,
        evidence: m.evidence.clone(),
        since: m.since_ms,
        state: i.phx.state,
    })
}

fn instance_point(i: &Instance) -> InstancePoint {
    let (reason, evidence) = match (&i.phx.mark, &i.phx.problem) {
        (Some(m), _) => (m.reason.as_str(), m.evidence.clone()),
        (None, Some(p)) => (p.reason.as_str(), p.evidence.clone()),
        (None, None) => ("", String::new()),
    };
    InstancePoint {
        instance_id: i.identity.instance_id.clone(),
        group: i.group().to_owned(),
        host: i.identity.hostname.clone(),
        image_id: i.identity.image_id.clone(),
        state: i.phx.state,
        reason,
        evidence,
        marked: i.phx.mark.as_ref().is_some_and(|m| m.gone_ms.is_none()),
        held: i.phx.held.clone().unwrap_or_default(),
    }
}

/// A fleet store that keeps nothing (tests, tools): memory is all there is.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryStore;

impl FleetStore for MemoryStore {
    fn describe(&self) -> String {
        "memory".into()
    }
    fn load(&self) -> Result<Option<Snapshot>, StoreError> {
        Ok(None)
    }
    fn save(&self, _: &Snapshot) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phoenix_wire::{CheckResult, Point, Value, VERSION};

    const T0: i64 = 1_700_000_000_000;

    fn report(id: &str, seq: u64, checks: Vec<CheckResult>, var_used: f64) -> Report {
        Report {
            v: VERSION,
            agent: Identity {
                instance_id: id.into(),
                image_id: "img".into(),
                group: Some("web".into()),
                hostname: "h".into(),
                boot_id: "b1".into(),
                ..Default::default()
            },
            seq,
            interval_ms: 1000,
            metrics: vec![
                Point {
                    m: "cpu".into(),
                    tags: [("cpu".to_string(), "cpu-total".to_string())].into(),
                    fields: [("usage_idle".to_string(), Value::Float(50.0))].into(),
                    ts: 1,
                },
                Point {
                    m: "disk".into(),
                    tags: [("path".to_string(), "/var".to_string())].into(),
                    fields: [("used_percent".to_string(), Value::Float(var_used))].into(),
                    ts: 1,
                },
                Point {
                    m: "disk".into(),
                    tags: [("path".to_string(), "/".to_string())].into(),
                    fields: [("used_percent".to_string(), Value::Float(40.0))].into(),
                    ts: 1,
                },
            ],
            logs: vec![],
            drift: None,
            checks,
            drift_root: None,
            protected: None,
        }
    }

    fn bad() -> Vec<CheckResult> {
        vec![CheckResult {
            name: "web".into(),
            ok: false,
            detail: "HTTP 503".into(),
            duration_ms: 3,
        }]
    }

    fn fleet(rules: Rules) -> (Fleet, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(T0));
        let f = Fleet::new(rules, clock.clone(), Arc::new(MemoryStore));
        (f, clock)
    }

    /// Admit and store, as a report whose points were written.
    fn take(f: &Fleet, r: &Report) {
        f.admit(r, None, None);
        f.stored(&r.agent, r.seq);
    }

    #[test]
    fn reports_feed_the_rules_and_the_queue_end_to_end_in_memory() {
        let rules = Rules {
            grace: Duration::ZERO,
            check_failures: 2,
            pegged_for: Duration::from_secs(2),
            settle_intervals: 0,
            ..Default::default()
        };
        let (fleet, clock) = fleet(rules);
        for k in 0..10 {
            take(&fleet, &report(&format!("i-{k}"), 1, vec![], 50.0));
        }
        clock.advance(1000);
        take(&fleet, &report("i-0", 2, bad(), 97.5));
        clock.advance(1000);
        take(&fleet, &report("i-0", 3, bad(), 97.5));
        assert!(fleet.is_stored(&report("i-0", 3, vec![], 0.0).agent, 3));
        assert!(!fleet.is_stored(&report("i-0", 4, vec![], 0.0).agent, 4));
        for k in 1..10 {
            let used = if k == 1 { 99.0 } else { 50.0 };
            take(&fleet, &report(&format!("i-{k}"), 2, vec![], used));
        }
        let out = fleet.pass();
        let marked: Vec<&str> = out.marks.iter().map(|m| m.instance_id.as_str()).collect();
        assert_eq!(
            marked,
            ["i-0"],
            "the failed check goes before i-1's full disk"
        );
        let v = fleet.view();
        let q = &v.queue;
        assert_eq!(
            q.marked[0].evidence,
            "check web failed 2 times in a row: HTTP 503"
        );
        assert_eq!(q.marked[0].group, "web");
        // i-1's disk is full too, but the budget (1 of 10) is taken.
        assert_eq!(q.held.len(), 1);
        assert_eq!(q.held[0].reason, Reason::DiskFull);
        assert_eq!(q.held[0].evidence, "filesystem /var 99.0% full (limit 95%)");
        assert_eq!(q.budget.groups[0].free, 0);
        let json = serde_json::to_value(q).unwrap();
        assert_eq!(json["marked"][0]["reason"], "check_failed");
        assert!(json["marked"][0]["acked_ms"].is_null());
        assert!(json["marked"][0]["acked_at"].is_null());
        // Every time is Unix ms with an RFC 3339 twin.
        let since = json["marked"][0]["since_ms"].as_i64().unwrap();
        assert_eq!(json["marked"][0]["since_at"], clock::rfc3339(since));
        assert!(json["marked"][0].get("since").is_none());
        assert_eq!(json["budget"]["max_share"], 0.1);
        assert_eq!(
            v.instance("i-1").unwrap().summary.disk_max_used_percent,
            Some(99.0)
        );
        assert_eq!(v.counts.marks_by_reason[Reason::CheckFailed.index()], 1);
        // A preview: under a 20% budget i-1 would be marked now; nothing changes.
        let p = fleet
            .preview(Some(policy::Budgets::parse("20%").unwrap()), None)
            .unwrap();
        assert_eq!(p.would_mark.len(), 1);
        assert_eq!(p.would_mark[0].instance_id, "i-1");
        assert_eq!(p.would_mark[0].reason, Reason::DiskFull);
        assert_eq!(p.already_marked, 1);
        assert_eq!(p.budget, "20%");
        // A closed window does not hold a full disk (involuntary); a tighter budget does.
        let shut = policy::Windows::parse_all(&["Sat 00:00-00:01"]).unwrap();
        let p = fleet
            .preview(
                Some(policy::Budgets::parse("unhealthy=1").unwrap()),
                Some(shut),
            )
            .unwrap();
        assert!(p.would_mark.is_empty());
        assert!(
            p.held[0]
                .hold
                .as_deref()
                .unwrap()
                .starts_with("budget: 1 of at most 1"),
            "{:?}",
            p.held
        );
        assert!(!p.window_open);
        assert_eq!(
            fleet.view().queue.held.len(),
            1,
            "the preview marked nothing"
        );
        assert!(
            fleet.pass().marks.is_empty(),
            "and the real policy still holds i-1"
        );
        // Points: every instance is due once, then not until 30 s later.
        let due = fleet.due_points();
        assert_eq!(due.len(), 10);
        let p0 = due.iter().find(|p| p.instance_id == "i-0").unwrap();
        assert!(p0.marked && p0.reason == "check_failed" && p0.state == State::Marked);
        assert!(fleet.due_points().is_empty());
        fleet.points_failed(&["i-3".to_string()]);
        assert_eq!(fleet.due_points()[0].instance_id, "i-3");
        clock.advance(POINT_EVERY_MS);
        assert_eq!(fleet.due_points().len(), 10);
        // Snapshot and restore keep marks, holds and seqs.
        assert_eq!(fleet.ack("i-0", "recycler#1"), Ok(true));
        assert_eq!(
            fleet.view().queue.marked[0].acked_ms,
            Some(Some(clock.wall_ms()))
        );
        let snap = fleet.snapshot();
        let (back, _) = self::fleet(fleet.rules.clone());
        back.restore(serde_json::from_slice(&serde_json::to_vec(&snap).unwrap()).unwrap());
        assert!(back.is_stored(&report("i-0", 3, vec![], 0.0).agent, 3));
        back.publish();
        let a = back.view();
        let a = a.instance("i-0").unwrap();
        assert_eq!(a.summary.state, State::Acked);
        assert_eq!(
            a.summary.mark.as_ref().unwrap().acked_by.as_deref(),
            Some("recycler#1")
        );
    }

    #[test]
    fn ssh_on_marks_in_grace_and_a_diagnostics_request_rides_the_next_ack() {
        let ssh = |r: &mut Report, found: bool| {
            r.metrics.push(Point {
                m: "phoenix_ssh".into(),
                tags: Default::default(),
                fields: [
                    ("found".to_string(), Value::Bool(found)),
                    (
                        "evidence".to_string(),
                        Value::Str("listening: tcp 0.0.0.0:22 sshd[812]".into()),
                    ),
                ]
                .into(),
                ts: 1,
            })
        };
        for allowed in [false, true] {
            // The whole group is in grace, and instances in grace count against the budget
            // (policy): a budget of the whole group leaves room for the one with SSH on.
            let (fleet, clock) = fleet(Rules {
                settle_intervals: 0,
                ssh_allowed: allowed,
                budget: policy::Budgets::share(1.0),
                ..Default::default()
            });
            for k in 1..10 {
                take(&fleet, &report(&format!("i-{k}"), 1, vec![], 50.0));
            }
            let mut r = report("i-0", 1, vec![], 50.0);
            ssh(&mut r, true);
            take(&fleet, &r);
            clock.advance(1000);
            fleet.pass();
            let v = fleet.view();
            let i = v.instance("i-0").unwrap();
            assert_eq!(
                i.ssh.as_deref(),
                Some("listening: tcp 0.0.0.0:22 sshd[812]")
            );
            if allowed {
                assert!(v.queue.marked.is_empty(), "--ssh-allowed: {:?}", v.queue);
                continue;
            }
            assert_eq!(
                v.queue.marked[0].reason,
                Reason::Ssh,
                "in grace, like drift"
            );
            assert_eq!(
                v.queue.marked[0].evidence,
                "SSH is on: listening: tcp 0.0.0.0:22 sshd[812]"
            );
            // Off again before the recycler acted: the mark is withdrawn.
            clock.advance(1000);
            let mut r = report("i-0", 2, vec![], 50.0);
            ssh(&mut r, false);
            take(&fleet, &r);
            fleet.pass();
            assert!(fleet.view().queue.marked.is_empty());
        }
        let (fleet, _) = fleet(Rules::default());
        let r = report("i-0", 1, vec![], 50.0);
        use phoenix_wire::diag::ProbeSet;
        assert!(matches!(
            fleet.request_diagnostics("i-0", ProbeSet::Full, "reader"),
            Err(diag::DiagError::Unknown(_))
        ));
        take(&fleet, &r);
        assert_eq!(fleet.diagnostics_for_ack(&r.agent), None);
        let p = fleet
            .request_diagnostics("i-0", ProbeSet::Full, "reader")
            .unwrap();
        assert_eq!(
            fleet.diagnostics_for_ack(&r.agent).map(|h| h.id),
            Some(p.id)
        );
        assert!(fleet
            .view()
            .instance("i-0")
            .unwrap()
            .diagnostics
            .pending
            .is_some());
        let answer = phoenix_wire::diag::Answer {
            v: VERSION,
            agent: r.agent.clone(),
            request_id: p.id,
            snapshot: Default::default(),
        };
        fleet.answer_diagnostics(answer.clone(), 100).unwrap();
        let v = fleet.view();
        let d = &v.instance("i-0").unwrap().diagnostics;
        assert!(d.pending.is_none() && d.latest.as_ref().unwrap().id == p.id);
        assert!(
            fleet.answer_diagnostics(answer, 100).is_err(),
            "answered once"
        );
        assert_eq!(fleet.diagnostics_for_ack(&r.agent), None);
    }

    #[test]
    fn a_retried_report_counts_for_liveness_but_its_checks_count_once() {
        let rules = Rules {
            grace: Duration::ZERO,
            check_failures: 3,
            settle_intervals: 0,
            ..Default::default()
        };
        let (fleet, clock) = fleet(rules);
        for k in 0..10 {
            take(&fleet, &report(&format!("i-{k}"), 1, vec![], 50.0));
        }
        // The store is down: seq 2 with a failing check is retried five times.
        for _ in 0..5 {
            clock.advance(1000);
            let a = fleet.admit(&report("i-0", 2, bad(), 50.0), None, None);
            assert!(!fleet.is_stored(&report("i-0", 2, vec![], 0.0).agent, 2));
            let _ = a;
        }
        fleet.pass();
        assert!(
            fleet.view().queue.marked.is_empty(),
            "one failure, not five"
        );
        let v = fleet.view();
        let i = v.instance("i-0").unwrap();
        assert_eq!(i.check_streaks["web"], 1);
        assert_eq!(
            i.summary.last_seen_ms,
            clock.wall_ms(),
            "every retry is a sign of life"
        );
        // Written at last: now it is a duplicate, and still counted once.
        fleet.stored(&report("i-0", 2, vec![], 0.0).agent, 2);
        assert!(fleet.is_stored(&report("i-0", 2, vec![], 0.0).agent, 2));
    }

    #[test]
    fn a_wall_clock_step_on_the_collector_marks_no_one() {
        let rules = Rules {
            grace: Duration::ZERO,
            silent_after: Duration::from_secs(5),
            settle_intervals: 0,
            ..Default::default()
        };
        let (fleet, clock) = fleet(rules);
        for seq in 1..=3 {
            for k in 0..5 {
                take(&fleet, &report(&format!("i-{k}"), seq, vec![], 50.0));
            }
            clock.advance(1000);
            fleet.pass();
        }
        clock.step_wall(600_000);
        fleet.pass();
        clock.step_wall(-1_200_000);
        fleet.pass();
        let v = fleet.view();
        assert!(
            v.queue.marked.is_empty() && v.queue.held.is_empty(),
            "{:?}",
            v.queue
        );
        assert!(v
            .instances
            .iter()
            .all(|i| i.summary.state == State::Healthy));
        // Real silence still counts.
        for seq in 4..11 {
            clock.advance(1000);
            for k in 0..4 {
                take(&fleet, &report(&format!("i-{k}"), seq, vec![], 50.0));
            }
            fleet.pass();
        }
        assert_eq!(fleet.view().queue.marked[0].instance_id, "i-4");
    }

    #[test]
    fn a_metrics_store_outage_makes_nobody_silent() {
        let rules = Rules {
            grace: Duration::ZERO,
            silent_after: Duration::from_secs(4),
            settle_intervals: 0,
            ..Default::default()
        };
        let (fleet, clock) = fleet(rules);
        for k in 0..4 {
            take(&fleet, &report(&format!("i-{k}"), 1, vec![], 50.0));
        }
        fleet.pass();
        // 30 s of outage; the agents were told to come back in 5 s and do not make it.
        for _ in 0..30 {
            clock.advance(1000);
            fleet.set_metrics_store(Some(("connection refused".into(), Duration::from_secs(5))));
            fleet.pass();
        }
        let v = fleet.view();
        assert!(!v.queue.store.up);
        assert_eq!(v.queue.store.reason.as_deref(), Some("connection refused"));
        assert!(v.queue.marked.is_empty() && v.queue.alerts.is_empty());
        assert!(v
            .instances
            .iter()
            .all(|i| i.summary.state == State::Healthy));
        // Back: the agents report within their Retry-After, and all is well.
        fleet.set_metrics_store(None);
        clock.advance(3000);
        for k in 0..4 {
            take(&fleet, &report(&format!("i-{k}"), 2, vec![], 50.0));
        }
        fleet.pass();
        let v = fleet.view();
        assert!(v.queue.store.up && v.queue.marked.is_empty());
        // One that never comes back is marked after silent_after counted from the recovery.
        clock.advance(7000);
        for k in 0..3 {
            take(&fleet, &report(&format!("i-{k}"), 3, vec![], 50.0));
        }
        fleet.pass();
        let v = fleet.view();
        let marked: Vec<&str> = v
            .queue
            .marked
            .iter()
            .map(|m| m.instance_id.as_str())
            .collect();
        assert_eq!(marked, ["i-3"]);
    }

    #[test]
    fn the_collectors_own_lateness_is_not_silence() {
        let rules = Rules {
            grace: Duration::ZERO,
            silent_after: Duration::from_secs(5),
            settle_intervals: 0,
            ..Default::default()
        };
        let (fleet, clock) = fleet(rules);
        take(&fleet, &report("i-0", 1, vec![], 50.0));
        fleet.pass();
        // Writes take 8 s: the agent's next report waits for its ack.
        fleet.note_lateness(8000);
        clock.advance(7000);
        fleet.pass();
        assert!(fleet.view().queue.marked.is_empty());
        assert_eq!(fleet.view().queue.late_ms, 8000);
        clock.advance(7000);
        fleet.pass();
        assert_eq!(fleet.view().queue.marked.len(), 1, "14 s is past 5 s + 8 s");
    }

    #[test]
    fn settling_counts_down_and_ends() {
        let rules = Rules {
            grace: Duration::ZERO,
            silent_after: Duration::from_secs(3),
            settle_intervals: 2,
            ..Default::default()
        };
        let (fleet, clock) = fleet(rules);
        for k in 0..10 {
            take(&fleet, &report(&format!("i-{k}"), 1, vec![], 50.0));
        }
        let mut holds = Vec::new();
        for s in 2..10 {
            clock.advance(1000);
            for k in 1..10 {
                take(&fleet, &report(&format!("i-{k}"), s, vec![], 50.0));
            }
            fleet.pass();
            let v = fleet.view();
            if let Some(h) = v.queue.held.first() {
                holds.push(h.hold.clone().unwrap());
            }
            if !v.queue.marked.is_empty() {
                break;
            }
        }
        assert_eq!(
            holds,
            [
                "settling: waiting 2s for the rest of group web to report (a mass event holds all marks)",
                "settling: waiting 1s for the rest of group web to report (a mass event holds all marks)",
            ]
        );
        assert_eq!(fleet.view().queue.marked[0].instance_id, "i-0");
    }

    #[test]
    fn a_returning_gone_instance_keeps_its_drift_verdict_and_a_missing_record_asks_for_it() {
        let rules = Rules {
            grace: Duration::ZERO,
            silent_after: Duration::from_secs(3),
            settle_intervals: 0,
            ..Default::default()
        };
        let (fleet, clock) = fleet(rules);
        for k in 1..10 {
            take(&fleet, &report(&format!("i-{k}"), 1, vec![], 50.0));
        }
        let drifted = DriftInfo {
            hash: "root-x".into(),
            drifted: true,
            source: Some("registered baseline".into()),
            ..Default::default()
        };
        let r = report("i-0", 1, vec![], 50.0);
        let a = fleet.admit(&r, Some(drifted), Some("root-x".into()));
        assert!(!a.resend_drift, "the record matches the root");
        fleet.pass();
        assert_eq!(fleet.ack("i-0", "r"), Ok(true));
        // It stays up but goes quiet past gone, then returns.
        for s in 2..8 {
            clock.advance(1000);
            for k in 1..10 {
                take(&fleet, &report(&format!("i-{k}"), s, vec![], 50.0));
            }
            fleet.pass();
        }
        assert_eq!(
            fleet.view().instance("i-0").unwrap().summary.state,
            State::Gone
        );
        let a = fleet.admit(&report("i-0", 2, vec![], 50.0), None, Some("root-x".into()));
        assert!(!a.resend_drift);
        fleet.pass();
        let v = fleet.view();
        let i = v.instance("i-0").unwrap();
        assert_eq!(
            i.summary.drifted,
            Some(true),
            "not back as new with drift null"
        );
        assert_eq!(i.summary.state, State::Marked);
        // An agent whose root the collector has no record of is asked for its entries.
        let a = fleet.admit(&report("i-5", 9, vec![], 50.0), None, Some("root-y".into()));
        assert!(a.resend_drift);
        let a = fleet.admit(&report("i-0", 3, vec![], 50.0), None, Some("root-z".into()));
        assert!(a.resend_drift, "the root moved since the record");
    }

    #[test]
    fn restore_translates_monotonic_readings_onto_the_new_clock() {
        let rules = Rules {
            grace: Duration::ZERO,
            silent_after: Duration::from_secs(60),
            settle_intervals: 0,
            ..Default::default()
        };
        let (a, clock) = fleet(rules.clone());
        clock.advance(50_000); // mono 50 s into the old process
        take(&a, &report("i-0", 1, vec![], 50.0));
        let snap = a.snapshot();
        // A new process (mono starts at 0) 10 s later by the wall clock.
        let clock2 = Arc::new(ManualClock::new(clock.wall_ms() + 10_000));
        let b = Fleet::new(rules, clock2.clone(), Arc::new(MemoryStore));
        b.restore(snap);
        {
            let g = b.lock();
            assert_eq!(g.instances["i-0"].last_seen_mono, -10_000);
        }
        b.pass();
        assert!(b.view().queue.marked.is_empty());
        clock2.advance(61_000);
        b.pass();
        assert_eq!(
            b.view().queue.marked.len(),
            1,
            "silent since this collector started"
        );
    }

    #[test]
    fn hostile_numbers_reach_no_panic() {
        let rules = Rules {
            grace: Duration::ZERO,
            max_lifetime: Some(Duration::from_secs(1)),
            settle_intervals: u32::MAX,
            ..Default::default()
        };
        let (fleet, clock) = fleet(rules);
        for (k, (interval, boot_time)) in [
            (u64::MAX, u64::MAX),
            (0, 0),
            (1, u64::MAX / 1000),
            (i64::MAX as u64 + 1, 1),
        ]
        .into_iter()
        .enumerate()
        {
            let mut r = report(&format!("i-{k}"), u64::MAX, bad(), f64::MAX);
            r.interval_ms = interval;
            r.agent.boot_time = boot_time;
            r.metrics[0]
                .fields
                .insert("usage_idle".into(), Value::Float(f64::NAN));
            take(&fleet, &r);
        }
        clock.advance(i64::MAX / 2);
        fleet.pass();
        clock.step_wall(i64::MIN / 2);
        fleet.pass();
        let _ = fleet.due_points();
        assert_eq!(fleet.view().instances.len(), 4);
    }

    #[test]
    fn refused_new_ids_raise_the_instance_cap_alert_until_they_stop() {
        let (fleet, clock) = fleet(Rules::default());
        take(&fleet, &report("i-0", 1, vec![], 50.0));
        fleet.pass();
        assert_eq!(fleet.view().queue.instance_cap, None);
        fleet.refused_new_instance(1);
        clock.advance(1000);
        fleet.refused_new_instance(1);
        fleet.pass();
        let v = fleet.view();
        let a = v.queue.instance_cap.as_ref().expect("raised");
        assert_eq!((a.refused, a.max_instances), (2, 1));
        assert_eq!((a.since_ms, a.last_ms), (T0, T0 + 1000));
        assert!(
            a.message.starts_with("2 new instance ids refused (429)"),
            "{}",
            a.message
        );
        let json = serde_json::to_value(&v.queue).unwrap();
        assert_eq!(json["instance_cap"]["refused"], 2);
        clock.advance(view::CAP_ALERT_MS - 1);
        fleet.pass();
        assert!(fleet.view().queue.instance_cap.is_some());
        clock.advance(1);
        fleet.pass();
        assert_eq!(
            fleet.view().queue.instance_cap,
            None,
            "cleared 5 min after the last"
        );
        // A new refusal later is a new alert, counted from one.
        fleet.refused_new_instance(1);
        fleet.pass();
        assert_eq!(fleet.view().queue.instance_cap.as_ref().unwrap().refused, 1);
    }

    #[test]
    fn ids_the_gate_forgot_are_forgotten_unless_marked() {
        let rules = Rules {
            grace: Duration::ZERO,
            check_failures: 1,
            settle_intervals: 0,
            ..Default::default()
        };
        let (fleet, _clock) = fleet(rules);
        for k in 0..10 {
            take(&fleet, &report(&format!("i-{k}"), 1, vec![], 50.0));
        }
        take(&fleet, &report("i-0", 2, bad(), 50.0));
        fleet.pass();
        assert_eq!(fleet.view().queue.marked[0].instance_id, "i-0");
        let ids: Vec<String> = ["i-0", "i-1", "i-2", "nobody"].map(String::from).into();
        assert_eq!(fleet.forget(&ids), 2);
        fleet.pass();
        let v = fleet.view();
        assert_eq!(v.instances.len(), 8);
        assert!(v.instance("i-0").is_some(), "a standing mark stays");
        assert!(v.instance("i-1").is_none() && v.instance("i-2").is_none());
    }

    #[test]
    fn passes_leave_the_list_alone_and_a_read_shares_what_did_not_change() {
        let (fleet, clock) = fleet(Rules::default());
        for k in 0..3 {
            take(&fleet, &report(&format!("i-{k}"), 1, vec![], 50.0));
        }
        fleet.pass();
        let a = fleet.view();
        assert_eq!(a.instances.len(), 3);
        clock.advance(1000);
        fleet.pass();
        let b = fleet.view();
        assert!(
            Arc::ptr_eq(&a.instances, &b.instances),
            "nothing reported: the same list"
        );
        take(&fleet, &report("i-1", 2, vec![], 50.0));
        fleet.pass();
        let q = fleet.queue_view();
        assert_eq!(q.counts.by_state.iter().sum::<u64>(), 3);
        let c = fleet.view();
        let entry = |v: &FleetView, k: usize| v.instances[k].clone();
        assert!(Arc::ptr_eq(&entry(&a, 0), &entry(&c, 0)), "i-0 is shared");
        assert!(Arc::ptr_eq(&entry(&a, 2), &entry(&c, 2)), "i-2 is shared");
        assert!(!Arc::ptr_eq(&entry(&a, 1), &entry(&c, 1)), "i-1 is new");
        assert_eq!(c.instance("i-1").unwrap().summary.reports, 2);
        assert_eq!(a.instance("i-1").unwrap().summary.reports, 1);
        assert!(c.instance("i-9").is_none());
    }
}
