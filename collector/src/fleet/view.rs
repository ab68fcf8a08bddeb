//! Typed read views of the fleet: what the API, the page and the self-metrics may see.
//!
//! A [`FleetView`] is built after every queue pass (and after an ack) and published as an
//! `Arc`: readers clone the `Arc` and never hold the fleet's lock, so a page polled by many
//! readers costs reports nothing. It is at most one pass (about a second) old.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use phoenix_wire::CheckResult;
use serde::Serialize;

use super::clock::Now;
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

/// A mark as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MarkView {
    pub reason: Reason,
    pub evidence: String,
    pub since_ms: i64,
    pub acked_ms: Option<i64>,
    pub acked_by: Option<String>,
    pub gone_ms: Option<i64>,
}

impl From<&Mark> for MarkView {
    fn from(m: &Mark) -> Self {
        MarkView {
            reason: m.reason,
            evidence: m.evidence.clone(),
            since_ms: m.since_ms,
            acked_ms: m.acked_ms,
            acked_by: m.acked_by.clone(),
            gone_ms: m.gone_ms,
        }
    }
}

/// One instance in `GET /v1/instances` (the same fields as before the fleet core).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceSummary {
    pub instance_id: String,
    pub image_id: String,
    pub group: Option<String>,
    pub hostname: String,
    pub boot_id: String,
    pub agent_version: String,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
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
    /// How long it had been silent when the view was built (monotonic ms, counted from when
    /// this collector could first have heard it, as the rules count).
    #[serde(skip)]
    pub silent_ms: i64,
    /// The state a person is shown: see [`shown_state`].
    #[serde(skip)]
    pub shown: &'static str,
}

/// The state the page shows: the queue's, except that an instance still in grace (`new`,
/// where silence marks nothing yet) that stopped reporting shows `suspect` past three
/// intervals and `silent` past `--silent-after`, the thresholds the rules apply after grace.
pub fn shown_state(
    state: State,
    silent_ms: i64,
    interval_ms: u64,
    rules: &Rules,
    late_ms: i64,
) -> &'static str {
    if state != State::New {
        return state.as_str();
    }
    let late = late_ms.max(0);
    if silent_ms >= super::health::ms(rules.silent_after).saturating_add(late) {
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
        received_ms: i64,
        bytes: usize,
    }
    #[derive(Serialize)]
    struct Summary<'a> {
        pending: &'a Option<super::diag::Pending>,
        latest: Option<Latest<'a>>,
    }
    Summary {
        pending: &d.pending,
        latest: d.latest.as_ref().map(|l| Latest {
            id: l.id,
            probes: l.probes.as_str(),
            requested_ms: l.requested_ms,
            received_ms: l.received_ms,
            bytes: l.bytes,
        }),
    }
    .serialize(s)
}

impl InstanceView {
    fn of(i: &Instance, diagnostics: DiagView, rules: &Rules, inp: &Inputs) -> InstanceView {
        let silent_ms = inp
            .now
            .mono_ms
            .saturating_sub(i.last_seen_mono.max(inp.watch_since_mono))
            .max(0);
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
                group: a.group.clone(),
                hostname: a.hostname.clone(),
                boot_id: a.boot_id.clone(),
                agent_version: a.version.clone(),
                first_seen_ms: i.first_seen_ms,
                last_seen_ms: i.last_seen_ms,
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
            silent_ms,
            shown: shown_state(i.phx.state, silent_ms, i.interval_ms, rules, inp.late_ms),
        }
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
    pub reason: Reason,
    pub evidence: String,
    /// When the mark was made, or (held) since when the problem lasts.
    pub since: Option<i64>,
    /// Marked and gone entries: when the recycler acked (null: not yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acked_ms: Option<Option<i64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gone_ms: Option<i64>,
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
    /// The share of a group that may be marked at once, when one share covers every reason
    /// (else the default share for reasons no budget names).
    pub share: f64,
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
    pub alerts: Vec<Alert>,
    /// New instances refused at `--max-instances` (null: none lately).
    pub instance_cap: Option<CapAlert>,
    pub log_only: bool,
    pub budget: BudgetView,
    /// The metrics store: while it is down agents keep their batches, and nobody is silent.
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
    /// Sorted by instance id.
    pub instances: Vec<InstanceView>,
    index: HashMap<String, usize>,
    pub queue: QueueView,
    pub counts: Counts,
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
    pub fn instance(&self, id: &str) -> Option<&InstanceView> {
        self.index.get(id).and_then(|k| self.instances.get(*k))
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

pub fn build(
    instances: &HashMap<String, Instance>,
    q: &QueueState,
    rules: &Rules,
    inp: &Inputs,
) -> FleetView {
    let mut list: Vec<InstanceView> = instances
        .iter()
        .map(|(id, i)| {
            InstanceView::of(i, inp.diag.get(id).cloned().unwrap_or_default(), rules, inp)
        })
        .collect();
    list.sort_by(|a, b| a.summary.instance_id.cmp(&b.summary.instance_id));
    let index = list
        .iter()
        .enumerate()
        .map(|(k, v)| (v.summary.instance_id.clone(), k))
        .collect();
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
            reason,
            evidence: evidence.to_owned(),
            since,
            acked_ms: None,
            gone_ms: None,
            hold: None,
        };
        match (&i.phx.mark, &i.phx.problem, &i.phx.held) {
            (Some(m), _, _) => {
                let mut e = entry(m.reason, &m.evidence, Some(m.since_ms));
                e.acked_ms = Some(m.acked_ms);
                if m.gone_ms.is_some() {
                    e.gone_ms = m.gone_ms;
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
        a.since
            .cmp(&b.since)
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
        index,
        queue: QueueView {
            marked,
            held,
            gone,
            alerts: q.alerts.values().cloned().collect(),
            instance_cap: inp.instance_cap.clone(),
            log_only: rules.log_only,
            budget: BudgetView {
                share: rules
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
            (i.summary.state, i.shown, i.silent_ms)
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
