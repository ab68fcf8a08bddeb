//! Typed read views of the fleet: what the API, the page and the self-metrics may see.
//!
//! A [`FleetView`] is built after every queue pass (and after an ack) and published as an
//! `Arc`: readers clone the `Arc` and never hold the fleet's lock, so a page polled by many
//! readers costs reports nothing. It is at most one pass (about a second) old.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use phoenix_wire::CheckResult;
use serde::Serialize;

use super::clock::{rfc3339, rfc3339_opt, Now};
use super::diag::DiagView;
use super::health::{DriftInfo, Reason, Rules};
use super::queue::{Alert, QueueState};
use super::state::{Instance, KernelEvents, ListenSet, Mark, State, TopProcs, Trend};

/// How the metrics store (InfluxDB, or the file sink) is doing, as the decider last saw it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StoreHealth {
    pub up: bool,
    /// Why it is down (None while up).
    pub reason: Option<String>,
    /// Unix ms when the current outage began.
    pub down_since_ms: Option<i64>,
}

/// New instance ids are being refused because the collector knows `--max-instances` ids
/// (raised by the first refusal, cleared [`CAP_ALERT_MS`] after the latest one).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CapAlert {
    /// New ids refused (429) since the alert was raised.
    pub refused: u64,
    pub max_instances: usize,
    /// Unix ms of the first and the latest refusal.
    pub since_ms: i64,
    pub last_ms: i64,
    pub message: String,
}

/// How long the instance-cap alert stays up after the latest refusal.
pub const CAP_ALERT_MS: i64 = 5 * 60_000;

/// A mark as the API shows it. Every time is Unix ms (`_ms`) with an RFC 3339 `_at` twin.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MarkView {
    pub reason: Reason,
    pub evidence: String,
    pub since_ms: i64,
    pub since_at: String,
    pub acked_ms: Option<i64>,
    pub acked_at: Option<String>,
    pub acked_by: Option<String>,
    pub gone_ms: Option<i64>,
    pub gone_at: Option<String>,
}

impl From<&Mark> for MarkView {
    fn from(m: &Mark) -> Self {
        MarkView {
            reason: m.reason,
            evidence: m.evidence.clone(),
            since_ms: m.since_ms,
            since_at: rfc3339(m.since_ms),
            acked_ms: m.acked_ms,
            acked_at: rfc3339_opt(m.acked_ms),
            acked_by: m.acked_by.clone(),
            gone_ms: m.gone_ms,
            gone_at: rfc3339_opt(m.gone_ms),
        }
    }
}

/// One instance in `GET /v1/instances` (the same fields as before the fleet core).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceSummary {
    pub instance_id: String,
    pub image_id: String,
    /// The queue's group: identity.group, else the image id (the same string as the
    /// `group` tag and the page).
    pub group: String,
    pub hostname: String,
    pub boot_id: String,
    pub agent_version: String,
    pub first_seen_ms: i64,
    pub first_seen_at: String,
    pub last_seen_ms: i64,
    pub last_seen_at: String,
    pub interval_ms: u64,
    pub reports: u64,
    pub cpu_used_percent: Option<f64>,
    pub mem_used_percent: Option<f64>,
    pub disk_max_used_percent: Option<f64>,
    pub drifted: Option<bool>,
    pub state: State,
    /// The mark's reason, else the current problem's.
    pub reason: Option<Reason>,
    pub evidence: Option<String>,
    pub held: Option<String>,
    pub mark: Option<MarkView>,
}

/// One instance in full (`GET /v1/instances/{id}`, the instance page).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceView {
    #[serde(flatten)]
    pub summary: InstanceSummary,
    pub checks: Arc<Vec<CheckResult>>,
    #[serde(serialize_with = "drift_json")]
    pub drift: Option<Arc<DriftInfo>>,
    /// What listens on the instance (its agent's latest set; at most
    /// [`super::state::LISTEN_KEPT`] entries, `count` says how many there were).
    pub listening: Arc<ListenSet>,
    /// The agent's SSH evidence when it found SSH on (a listener on TCP 22, a running sshd
    /// or dropbear); None when off. With `--ssh-allowed` it is shown but marks nothing.
    pub ssh: Option<String>,
    /// Diagnostics on demand: the outstanding request and the latest snapshot. The
    /// instance JSON carries the snapshot's summary only; `GET
    /// /v1/instances/{id}/diagnostics` returns it whole.
    #[serde(serialize_with = "diag_summary")]
    pub diagnostics: DiagView,
    /// The queue's group (identity.group, else the image).
    #[serde(skip)]
    pub group_key: String,
    /// Consecutive failed reports per failing check.
    #[serde(skip)]
    pub check_streaks: BTreeMap<String, u32>,
    /// For the page, from the reports this collector took: CPU and memory samples, the top
    /// processes, kernel counters and lines.
    #[serde(skip)]
    pub trend: Trend,
    #[serde(skip)]
    pub top: Arc<TopProcs>,
    #[serde(skip)]
    pub kernel: Arc<KernelEvents>,
    /// Monotonic ms from which its silence counts: its latest report, or when this collector
    /// could first have heard it, as the rules count. A fact, not a duration, so a shared
    /// entry stays true while time passes; [`FleetView::silent_ms`] and
    /// [`FleetView::shown`] turn it into what a person is shown.
    #[serde(skip)]
    pub heard_mono: i64,
}

/// The state the page shows: the queue's, except that an instance still in grace (`new`,
/// where silence marks nothing yet) that stopped reporting shows `suspect` past three
/// intervals and `silent` past `--silent-after`, the thresholds the rules apply after grace.
pub fn shown_state(
    state: State,
    silent_ms: i64,
    interval_ms: u64,
    silent_after_ms: i64,
    late_ms: i64,
) -> &'static str {
    if state != State::New {
        return state.as_str();
    }
    let late = late_ms.max(0);
    if silent_ms >= silent_after_ms.saturating_add(late) {
        "silent"
    } else if silent_ms
        > super::health::interval_of(interval_ms)
            .saturating_mul(3)
            .saturating_add(late)
    {
        State::Suspect.as_str()
    } else {
        state.as_str()
    }
}

fn diag_summary<S: serde::Serializer>(d: &DiagView, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Latest<'a> {
        id: u64,
        probes: &'a str,
        requested_ms: i64,
        requested_at: String,
        received_ms: i64,
        received_at: String,
        bytes: usize,
    }
    #[derive(Serialize)]
    struct Summary<'a> {
        pending: Option<PendingJson<'a>>,
        latest: Option<Latest<'a>>,
    }
    Summary {
        pending: d.pending.as_ref().map(PendingJson::of),
        latest: d.latest.as_ref().map(|l| Latest {
            id: l.id,
            probes: l.probes.as_str(),
            requested_ms: l.requested_ms,
            requested_at: rfc3339(l.requested_ms),
            received_ms: l.received_ms,
            received_at: rfc3339(l.received_ms),
            bytes: l.bytes,
        }),
    }
    .serialize(s)
}

/// An outstanding diagnostics request with the `_at` twins of its times.
#[derive(Debug, Serialize)]
pub struct PendingJson<'a> {
    #[serde(flatten)]
    pending: &'a super::diag::Pending,
    requested_at: String,
    handed_at: Option<String>,
}

impl<'a> PendingJson<'a> {
    pub fn of(p: &'a super::diag::Pending) -> PendingJson<'a> {
        PendingJson {
            pending: p,
            requested_at: rfc3339(p.requested_ms),
            handed_at: rfc3339_opt(p.handed_ms),
        }
    }
}

/// The latest diagnostics snapshot in full (`GET /v1/instances/{id}/diagnostics`).
#[derive(Debug, Serialize)]
pub struct LatestJson<'a> {
    #[serde(flatten)]
    latest: &'a super::diag::Latest,
    requested_at: String,
    received_at: String,
}

impl<'a> LatestJson<'a> {
    pub fn of(l: &'a super::diag::Latest) -> LatestJson<'a> {
        LatestJson {
            latest: l,
            requested_at: rfc3339(l.requested_ms),
            received_at: rfc3339(l.received_ms),
        }
    }
}

/// Drift as the API shows it: the agent's scan time is Unix ns (`ts_ns`), the collector's
/// first sighting Unix ms (`since_ms`), each with an `_at` twin. The stored [`DriftInfo`]
/// keeps its own field names, so saved fleet state reads back unchanged.
fn drift_json<S: serde::Serializer>(d: &Option<Arc<DriftInfo>>, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Drift<'a> {
        hash: &'a str,
        expected: &'a Option<String>,
        source: &'a Option<String>,
        drifted: bool,
        changes: &'a [phoenix_wire::FileChange],
        note: &'a Option<String>,
        ts_ns: i64,
        ts_at: String,
        since_ms: Option<i64>,
        since_at: Option<String>,
    }
    d.as_deref()
        .map(|d| Drift {
            hash: &d.hash,
            expected: &d.expected,
            source: &d.source,
            drifted: d.drifted,
            changes: &d.changes,
            note: &d.note,
            ts_ns: d.ts,
            ts_at: rfc3339(d.ts.div_euclid(1_000_000)),
            since_ms: d.since_ms,
            since_at: rfc3339_opt(d.since_ms),
        })
        .serialize(s)
}

/// A mass-event alert with the `_at` twin of its start.
fn alerts_json<S: serde::Serializer>(alerts: &[Alert], s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct AlertJson<'a> {
        #[serde(flatten)]
        alert: &'a Alert,
        since_at: String,
    }
    s.collect_seq(alerts.iter().map(|a| AlertJson {
        alert: a,
        since_at: rfc3339(a.since_ms),
    }))
}

fn cap_json<S: serde::Serializer>(c: &Option<CapAlert>, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct CapJson<'a> {
        #[serde(flatten)]
        cap: &'a CapAlert,
        since_at: String,
        last_at: String,
    }
    c.as_ref()
        .map(|c| CapJson {
            cap: c,
            since_at: rfc3339(c.since_ms),
            last_at: rfc3339(c.last_ms),
        })
        .serialize(s)
}

fn store_json<S: serde::Serializer>(h: &StoreHealth, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct StoreJson<'a> {
        #[serde(flatten)]
        store: &'a StoreHealth,
        down_since_at: Option<String>,
    }
    StoreJson {
        store: h,
        down_since_at: rfc3339_opt(h.down_since_ms),
    }
    .serialize(s)
}

impl InstanceView {
    fn of(i: &Instance, diagnostics: DiagView, watch_since_mono: i64) -> InstanceView {
        let a = &i.identity;
        let (reason, evidence) = match (&i.phx.mark, &i.phx.problem) {
            (Some(m), _) => (Some(m.reason), Some(m.evidence.clone())),
            (None, Some(p)) => (Some(p.reason), Some(p.evidence.clone())),
            _ => (None, None),
        };
        InstanceView {
            summary: InstanceSummary {
                instance_id: a.instance_id.clone(),
                image_id: a.image_id.clone(),
                group: i.group().to_owned(),
                hostname: a.hostname.clone(),
                boot_id: a.boot_id.clone(),
                agent_version: a.version.clone(),
                first_seen_ms: i.first_seen_ms,
                first_seen_at: rfc3339(i.first_seen_ms),
                last_seen_ms: i.last_seen_ms,
                last_seen_at: rfc3339(i.last_seen_ms),
                interval_ms: i.interval_ms,
                reports: i.reports,
                cpu_used_percent: i.cpu_used_percent,
                mem_used_percent: i.mem_used_percent,
                disk_max_used_percent: i.disk_max_used_percent,
                drifted: i.drift.as_ref().map(|d| d.drifted),
                state: i.phx.state,
                reason,
                evidence,
                held: i.phx.held.clone(),
                mark: i.phx.mark.as_ref().map(MarkView::from),
            },
            checks: i.checks.clone(),
            drift: i.drift.clone(),
            listening: i.listening.clone(),
            ssh: i.tracking.ssh.clone(),
            diagnostics,
            group_key: i.group().to_owned(),
            check_streaks: i
                .tracking
                .check_streaks
                .iter()
                .map(|(k, (n, _))| (k.clone(), *n))
                .collect(),
            trend: i.trend.clone(),
            top: i.top.clone(),
            kernel: i.kernel.clone(),
            heard_mono: i.last_seen_mono.max(watch_since_mono),
        }
    }

    /// Whether this view still shows `i` as [`InstanceView::of`] would, compared in place
    /// (no allocation): a view rebuild then shares this entry instead of copying it. A
    /// field added to `of` must be compared here too; debug builds check every reuse
    /// against a fresh `of` (see [`build_list`]).
    fn matches(&self, i: &Instance, diagnostics: &DiagView, watch_since_mono: i64) -> bool {
        let (s, a) = (&self.summary, &i.identity);
        let (reason, evidence) = match (&i.phx.mark, &i.phx.problem) {
            (Some(m), _) => (Some(m.reason), Some(m.evidence.as_str())),
            (None, Some(p)) => (Some(p.reason), Some(p.evidence.as_str())),
            _ => (None, None),
        };
        let mark_same = match (&s.mark, &i.phx.mark) {
            (None, None) => true,
            (Some(v), Some(m)) => {
                v.reason == m.reason
                    && v.evidence == m.evidence
                    && v.since_ms == m.since_ms
                    && v.acked_ms == m.acked_ms
                    && v.acked_by == m.acked_by
                    && v.gone_ms == m.gone_ms
            }
            _ => false,
        };
        let opt_arc = |x: &Option<Arc<DriftInfo>>, y: &Option<Arc<DriftInfo>>| match (x, y) {
            (None, None) => true,
            (Some(x), Some(y)) => Arc::ptr_eq(x, y),
            _ => false,
        };
        s.last_seen_ms == i.last_seen_ms
            && s.reports == i.reports
            && s.state == i.phx.state
            && s.instance_id == a.instance_id
            && s.image_id == a.image_id
            && s.group == i.group()
            && s.hostname == a.hostname
            && s.boot_id == a.boot_id
            && s.agent_version == a.version
            && s.first_seen_ms == i.first_seen_ms
            && s.interval_ms == i.interval_ms
            && s.cpu_used_percent == i.cpu_used_percent
            && s.mem_used_percent == i.mem_used_percent
            && s.disk_max_used_percent == i.disk_max_used_percent
            && s.drifted == i.drift.as_ref().map(|d| d.drifted)
            && s.reason == reason
            && s.evidence.as_deref() == evidence
            && s.held == i.phx.held
            && mark_same
            && Arc::ptr_eq(&self.checks, &i.checks)
            && opt_arc(&self.drift, &i.drift)
            && Arc::ptr_eq(&self.listening, &i.listening)
            && self.ssh == i.tracking.ssh
            && self.diagnostics == *diagnostics
            && self.group_key == i.group()
            && self.heard_mono == i.last_seen_mono.max(watch_since_mono)
            && self.trend == i.trend
            && Arc::ptr_eq(&self.top, &i.top)
            && Arc::ptr_eq(&self.kernel, &i.kernel)
            && self.check_streaks.len() == i.tracking.check_streaks.len()
            && self
                .check_streaks
                .iter()
                .zip(&i.tracking.check_streaks)
                .all(|((k, n), (k2, (n2, _)))| k == k2 && n == n2)
    }
}

/// One entry of the phoenix queue (`GET /v1/phoenix`: marked, held, gone).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueEntry {
    pub instance_id: String,
    pub image_id: String,
    pub group: String,
    pub host: String,
    pub state: State,
    pub last_seen_ms: i64,
    pub last_seen_at: String,
    pub reason: Reason,
    pub evidence: String,
    /// When the mark was made, or (held) since when the problem lasts.
    pub since_ms: Option<i64>,
    pub since_at: Option<String>,
    /// Marked and gone entries: when the recycler acked (null: not yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acked_ms: Option<Option<i64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acked_at: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gone_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gone_at: Option<String>,
    /// Held entries: why no mark was made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold: Option<String>,
}

/// One group's budget as of the latest pass.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupView {
    pub group: String,
    pub size: usize,
    pub allowed: usize,
    pub marked: usize,
    pub acked: usize,
    /// In grace: not yet ready, and counted against every budget.
    pub not_ready: usize,
    pub bad: usize,
    /// Free slots under the loosest budget (`allowed − marked − acked − not ready`).
    pub free: usize,
    /// Each `--budget` entry and what it allows in this group.
    pub limits: Vec<(String, usize)>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BudgetView {
    /// The largest share of a group that may be marked at once (0.1 = 10 %), when one share
    /// covers every reason (else the default share for reasons no budget names).
    pub max_share: f64,
    /// `--budget` as given, e.g. `drift=10%,unhealthy=20%`.
    pub spec: String,
    /// `--window`s (voluntary marks wait for one); empty: always open.
    pub windows: Vec<String>,
    /// Whether a window is open now.
    pub window_open: bool,
    pub mass_event_min: usize,
    pub rate_per_min: u32,
    pub marks_last_minute: usize,
    pub mass_event: f64,
    pub groups: Vec<GroupView>,
}

/// `GET /v1/phoenix`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueView {
    pub marked: Vec<QueueEntry>,
    pub held: Vec<QueueEntry>,
    pub gone: Vec<QueueEntry>,
    #[serde(serialize_with = "alerts_json")]
    pub alerts: Vec<Alert>,
    /// New instances refused at `--max-instances` (null: none lately).
    #[serde(serialize_with = "cap_json")]
    pub instance_cap: Option<CapAlert>,
    pub log_only: bool,
    pub budget: BudgetView,
    /// The metrics store: while it is down agents keep their batches, and nobody is silent.
    #[serde(serialize_with = "store_json")]
    pub store: StoreHealth,
    /// Whether this collector makes the marks (always, with the embedded fleet store).
    pub decider: bool,
    /// How far behind this collector is (ms added to every silence threshold).
    pub late_ms: i64,
}

/// Counts for `/metrics` and the `phoenix_collector` point.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    pub by_state: [u64; State::ALL.len()],
    /// Standing marks (marked or acked, not gone), by reason.
    pub marks_by_reason: [u64; Reason::ALL.len()],
    /// Bad instances whose mark is held, by reason.
    pub held_by_reason: [u64; Reason::ALL.len()],
    pub alerts: u64,
    /// Per group: (marks allowed at once, marks in use).
    pub budget: Vec<(String, u64, u64)>,
}

/// The whole fleet at one moment.
#[derive(Debug, Clone)]
pub struct FleetView {
    /// When it was built.
    pub at: Now,
    /// Sorted by instance id. Entries of instances that did not change since the previous
    /// view are shared with it, and a view whose instances did not change at all shares the
    /// whole list.
    pub instances: Arc<Vec<Arc<InstanceView>>>,
    pub queue: QueueView,
    pub counts: Counts,
    /// `--silent-after` in ms, for [`FleetView::shown`].
    pub silent_after_ms: i64,
}

impl Default for FleetView {
    fn default() -> Self {
        build(
            &HashMap::new(),
            &QueueState::default(),
            &Rules::default(),
            &Inputs::default(),
        )
    }
}

impl FleetView {
    /// How long `v` had been silent when this view was built (monotonic ms).
    pub fn silent_ms(&self, v: &InstanceView) -> i64 {
        self.at.mono_ms.saturating_sub(v.heard_mono).max(0)
    }

    /// The state a person is shown for `v`: see [`shown_state`].
    pub fn shown(&self, v: &InstanceView) -> &'static str {
        shown_state(
            v.summary.state,
            self.silent_ms(v),
            v.summary.interval_ms,
            self.silent_after_ms,
            self.queue.late_ms,
        )
    }

    pub fn instance(&self, id: &str) -> Option<&InstanceView> {
        let k = self
            .instances
            .binary_search_by(|v| v.summary.instance_id.as_str().cmp(id))
            .ok()?;
        self.instances.get(k).map(|v| &**v)
    }
}

/// What a view shows beyond the instances and the queue.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub now: Now,
    pub store: StoreHealth,
    pub decider: bool,
    pub late_ms: i64,
    /// Diagnostics by instance id (only instances with a request or a snapshot).
    pub diag: HashMap<String, DiagView>,
    pub instance_cap: Option<CapAlert>,
    /// Monotonic ms from which silence counts (this collector's start, or the end of a
    /// metrics-store outage).
    pub watch_since_mono: i64,
}

/// A whole view, its instance list built afresh.
pub fn build(
    instances: &HashMap<String, Instance>,
    q: &QueueState,
    rules: &Rules,
    inp: &Inputs,
) -> FleetView {
    let list = build_list(instances, &inp.diag, inp.watch_since_mono, &[]);
    with_list(instances, q, rules, inp, Arc::new(list))
}

/// The instance list, sorted by id, sharing the entries of `prev` (an earlier list, sorted)
/// whose instance did not change: a rebuild allocates only for instances that reported or
/// moved since, not for the whole fleet.
pub fn build_list(
    instances: &HashMap<String, Instance>,
    diag: &HashMap<String, DiagView>,
    watch_since_mono: i64,
    prev: &[Arc<InstanceView>],
) -> Vec<Arc<InstanceView>> {
    let mut ids: Vec<(&str, &Instance)> = instances.iter().map(|(k, i)| (k.as_str(), i)).collect();
    ids.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let none = DiagView::default();
    let mut old = prev.iter().peekable();
    let mut list = Vec::with_capacity(ids.len());
    for (id, i) in ids {
        // Both lists are sorted by id: walk the old one alongside.
        while old
            .peek()
            .is_some_and(|v| v.summary.instance_id.as_str() < id)
        {
            old.next();
        }
        let d = diag.get(id).unwrap_or(&none);
        let kept = old
            .peek()
            .filter(|v| v.summary.instance_id == id && v.matches(i, d, watch_since_mono))
            .map(|v| Arc::clone(v));
        match kept {
            Some(v) => {
                debug_assert_eq!(
                    *v,
                    InstanceView::of(i, d.clone(), watch_since_mono),
                    "InstanceView::matches missed a field"
                );
                list.push(v);
            }
            None => list.push(Arc::new(InstanceView::of(i, d.clone(), watch_since_mono))),
        }
    }
    list
}

/// Whether `list` shows exactly the entries of `prev` (the same shared entries).
pub fn same_list(list: &[Arc<InstanceView>], prev: &[Arc<InstanceView>]) -> bool {
    list.len() == prev.len() && list.iter().zip(prev).all(|(a, b)| Arc::ptr_eq(a, b))
}

/// A view with the queue and counts of `instances` now and the instance list `list` (built
/// by [`build_list`], possibly earlier: the queue pass does not rebuild it).
pub fn with_list(
    instances: &HashMap<String, Instance>,
    q: &QueueState,
    rules: &Rules,
    inp: &Inputs,
    list: Arc<Vec<Arc<InstanceView>>>,
) -> FleetView {
    let mut counts = Counts::default();
    let (mut marked, mut held, mut gone) = (Vec::new(), Vec::new(), Vec::new());
    for i in instances.values() {
        counts.by_state[i.phx.state.index()] += 1;
        let entry = |reason: Reason, evidence: &str, since: Option<i64>| QueueEntry {
            instance_id: i.identity.instance_id.clone(),
            image_id: i.identity.image_id.clone(),
            group: i.group().to_owned(),
            host: i.identity.hostname.clone(),
            state: i.phx.state,
            last_seen_ms: i.last_seen_ms,
            last_seen_at: rfc3339(i.last_seen_ms),
            reason,
            evidence: evidence.to_owned(),
            since_ms: since,
            since_at: rfc3339_opt(since),
            acked_ms: None,
            acked_at: None,
            gone_ms: None,
            gone_at: None,
            hold: None,
        };
        match (&i.phx.mark, &i.phx.problem, &i.phx.held) {
            (Some(m), _, _) => {
                let mut e = entry(m.reason, &m.evidence, Some(m.since_ms));
                e.acked_ms = Some(m.acked_ms);
                e.acked_at = Some(rfc3339_opt(m.acked_ms));
                if m.gone_ms.is_some() {
                    e.gone_ms = m.gone_ms;
                    e.gone_at = rfc3339_opt(m.gone_ms);
                    gone.push(e);
                } else {
                    counts.marks_by_reason[m.reason.index()] += 1;
                    marked.push(e);
                }
            }
            (None, Some(p), Some(h)) => {
                counts.held_by_reason[p.reason.index()] += 1;
                let mut e = entry(p.reason, &p.evidence, i.phx.problem_since_ms);
                e.hold = Some(h.clone());
                held.push(e);
            }
            _ => {}
        }
    }
    let by_since = |a: &QueueEntry, b: &QueueEntry| {
        a.since_ms
            .cmp(&b.since_ms)
            .then_with(|| a.instance_id.cmp(&b.instance_id))
    };
    marked.sort_by(by_since);
    held.sort_by(by_since);
    gone.sort_by(by_since);
    let marks_last_minute = q
        .recent_marks
        .iter()
        .filter(|t| inp.now.mono_ms.saturating_sub(**t) < 60_000)
        .count();
    let groups: Vec<GroupView> = q
        .budget
        .iter()
        .map(|(name, b)| GroupView {
            group: name.clone(),
            size: b.size,
            allowed: b.allowed,
            marked: b.marked,
            acked: b.acked,
            not_ready: b.not_ready,
            bad: b.bad,
            free: b.allowed.saturating_sub(b.disruption().total()),
            limits: b.limits.clone(),
        })
        .collect();
    counts.alerts = q.alerts.len() as u64;
    counts.budget = q
        .budget
        .iter()
        .map(|(g, b)| {
            let used = b.disruption().total();
            (g.clone(), b.allowed as u64, used as u64)
        })
        .collect();
    FleetView {
        at: inp.now,
        instances: list,
        queue: QueueView {
            marked,
            held,
            gone,
            alerts: q.alerts.values().cloned().collect(),
            instance_cap: inp.instance_cap.clone(),
            log_only: rules.log_only,
            budget: BudgetView {
                max_share: rules
                    .budget
                    .uniform_share()
                    .unwrap_or(super::policy::DEFAULT_SHARE),
                spec: rules.budget.to_string(),
                windows: rules.windows.texts(),
                window_open: rules.windows.is_open(inp.now.wall_ms),
                mass_event_min: rules.mass_min,
                rate_per_min: rules.mark_rate_per_min,
                marks_last_minute,
                mass_event: rules.mass_event,
                groups,
            },
            store: inp.store.clone(),
            decider: inp.decider,
            late_ms: inp.late_ms,
        },
        counts,
        silent_after_ms: super::health::ms(rules.silent_after),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use phoenix_wire::{Identity, Point, Report, Value, VERSION};

    use super::super::{Fleet, ManualClock, MemoryStore, Rules, State};

    fn report(seq: u64, cpu_idle: f64) -> Report {
        Report {
            v: VERSION,
            agent: Identity {
                instance_id: "i-1".into(),
                image_id: "img".into(),
                hostname: "h".into(),
                boot_id: "b".into(),
                ..Default::default()
            },
            seq,
            interval_ms: 2000,
            metrics: vec![Point {
                m: "cpu".into(),
                tags: [("cpu".to_string(), "cpu-total".to_string())].into(),
                fields: [("usage_idle".to_string(), Value::Float(cpu_idle))].into(),
                ts: 1,
            }],
            logs: vec![],
            drift: None,
            checks: vec![],
            drift_root: None,
            protected: None,
        }
    }

    #[test]
    fn in_grace_a_silent_instance_shows_suspect_then_silent_by_the_monotonic_clock() {
        let rules = Rules {
            grace: Duration::from_secs(300),
            silent_after: Duration::from_secs(120),
            ..Default::default()
        };
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let f = Fleet::new(rules, clock.clone(), Arc::new(MemoryStore));
        for seq in 1..=3 {
            f.admit(&report(seq, 90.0 - seq as f64 * 10.0), None, None);
            clock.advance(2000);
        }
        f.pass();
        let shown = |f: &Fleet| {
            let v = f.view();
            let i = v.instance("i-1").unwrap();
            (i.summary.state, v.shown(i), v.silent_ms(i))
        };
        assert_eq!(shown(&f), (State::New, "new", 2000));
        // 47 s without a report at a 2 s interval: still in grace (nothing is marked), but a
        // person must see that it stopped.
        clock.advance(45_000);
        f.pass();
        assert_eq!(shown(&f), (State::New, "suspect", 47_000));
        // An NTP step moves the wall clock only: the shown state does not move with it.
        clock.step_wall(-3_600_000);
        f.pass();
        assert_eq!(shown(&f).1, "suspect");
        clock.advance(73_000);
        f.pass();
        assert_eq!(shown(&f), (State::New, "silent", 120_000));
        // It reports again: new, as the queue says.
        f.admit(&report(4, 50.0), None, None);
        f.pass();
        assert_eq!(shown(&f), (State::New, "new", 0));
        // The trend holds one sample per report, oldest first.
        let v = f.view();
        let t = &v.instance("i-1").unwrap().trend;
        assert_eq!(t.cpu(), [Some(20), Some(30), Some(40), Some(50)]);
        assert_eq!(t.mem(), [None, None, None, None]);
    }
}
