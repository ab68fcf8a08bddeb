//! Hostile reports through the whole fleet core: decode, [`Fleet::admit`] (state, health
//! tracking), [`Fleet::stored`], queue passes, acks, points, a store outage, clock steps and
//! restarts, all on a [`ManualClock`].
//!
//! Three honest agents report clean figures every second (their interval) throughout, as
//! their real agent would: a batch refused while the metrics store is down is retried with
//! the same seq. Around them, arbitrary reports from other ids (numbers at the ends of their
//! ranges, streaks of failing checks, drift, forged seqs, retries; some straight past decode)
//! and arbitrary operator and clock events. After every step:
//! - nothing panicked;
//! - no honest instance is marked, held, has a problem, or is anything but new or healthy;
//! - a (instance, boot, seq) has its effects applied exactly once: `first_time` is true the
//!   first time and never again (until the instance is forgotten), and the check streaks and
//!   report counts equal a model that applies each first report once;
//! - only a stored (instance, boot, seq) reads as stored (so only it is answered "duplicate");
//! - memory is bounded by construction: instances by ids seen, boots per instance, seqs per
//!   window, check lists, the rate window, the lateness memory, alerts by groups.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use phoenix_wire::{CheckResult, FileChange, Identity, Limits, Point, Report, Value, VERSION};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use super::state::{BOOTS_KEPT, SEQ_WINDOW};
use super::*;

const T0: i64 = 1_700_000_000_000;
const HONEST: [&str; 3] = ["h-0", "h-1", "h-2"];
/// Ids hostile reports use. None is an honest id; some are near misses, some invalid (they
/// reach the fleet only on the raw path, past decode).
const HOSTILE: [&str; 9] = [
    "x-0",
    "x-1",
    "x-2",
    "x-3",
    "h-0 ",
    "H-0",
    "",
    "ü-0",
    "h-0/../h-1",
];
const BOOTS: [&str; BOOTS_KEPT] = ["b-0", "b-1", "b-2", "b-3"];
const GROUPS: [&str; 3] = ["web", "db", ""];
const CHECK_NAMES: [&str; 4] = ["web", "db", "disk", "x"];
const MAX_CHECKS: usize = 6;
const MAX_CHANGES: usize = 40;
/// The honest agents' interval; every tick is at most this long, so they are never late.
const INTERVAL_MS: u64 = 1000;

fn rules() -> Rules {
    Rules {
        grace: Duration::from_secs(2),
        silent_after: Duration::from_secs(5),
        check_failures: 3,
        pegged_for: Duration::from_secs(3),
        max_lifetime: Some(Duration::from_secs(30 * 86_400)),
        settle_intervals: 2,
        mark_rate_per_min: 10,
        forget_after: Duration::from_secs(20),
        ..Default::default()
    }
}

#[derive(Debug, Clone)]
struct Hostile {
    id: usize,
    group: usize,
    boot: usize,
    seq: u64,
    interval_ms: u64,
    boot_time: u64,
    /// Offset of the points' timestamps from the collector's clock, ns.
    ts_off: i64,
    checks: Vec<(usize, bool, String)>,
    cpu_idle: Option<f64>,
    mem_available: Option<f64>,
    disk_used: Option<f64>,
    /// (drifted, changes, hash)
    drift: Option<(bool, usize, String)>,
    drift_root: Option<String>,
    /// Admitted without decoding: the fleet must hold up on its own.
    raw: bool,
    /// Its points were written (else the store refused them).
    stored: bool,
}

#[derive(Debug, Clone)]
enum Op {
    Hostile(Box<Hostile>),
    /// The latest hostile report again, this many times (a retry, or a replay).
    Retry(u8),
    /// The clock moves on (ms, at most an interval); every honest agent then reports.
    Tick(u64),
    /// An NTP step of the collector's wall clock (s); the total stays within a day.
    StepWall(i64),
    StoreDown(u64),
    StoreUp,
    Late(i64),
    Pass,
    Ack(usize),
    Points(bool),
    /// Saved and restored into a new process this many ms later.
    Restart(i64),
}

fn edge_u64(lo: u64, hi: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0),
        Just(1),
        Just(u64::MAX),
        Just(i64::MAX as u64),
        Just(i64::MAX as u64 + 1),
        lo..=hi,
        any::<u64>(),
    ]
}

fn figure() -> impl Strategy<Value = Option<f64>> {
    prop_oneof![
        Just(None),
        (0.0..100.0f64).prop_map(Some),
        prop::num::f64::ANY.prop_map(Some),
    ]
}

fn hostile() -> impl Strategy<Value = Hostile> {
    let now_s = (T0 / 1000) as u64;
    (
        (
            0..HOSTILE.len(),
            0..GROUPS.len(),
            0..BOOTS.len(),
            prop_oneof![0..8u64, edge_u64(0, 100)],
            edge_u64(100, 86_400_000),
            edge_u64(now_s - 86_400 * 60, now_s + 86_400),
            prop_oneof![
                Just(0i64),
                -600_000_000_000..600_000_000_000i64,
                Just(i64::MIN),
                Just(i64::MAX),
                any::<i64>(),
            ],
        ),
        (
            prop::collection::vec(
                (0..CHECK_NAMES.len(), any::<bool>(), "[a-z 0-9]{0,12}"),
                0..=MAX_CHECKS,
            ),
            figure(),
            figure(),
            figure(),
            prop::option::of((any::<bool>(), 0..=MAX_CHANGES, "[a-f0-9]{1,8}")),
            prop::option::of(prop_oneof![
                Just("c1ea0".to_string()),
                "[a-f0-9]{1,8}",
                ".{0,4}"
            ]),
            prop::bool::weighted(0.25),
            prop::bool::weighted(0.6),
        ),
    )
        .prop_map(
            |(
                (id, group, boot, seq, interval_ms, boot_time, ts_off),
                (checks, cpu_idle, mem_available, disk_used, drift, drift_root, raw, stored),
            )| Hostile {
                id,
                group,
                boot,
                seq,
                interval_ms,
                boot_time,
                ts_off,
                checks,
                cpu_idle,
                mem_available,
                disk_used,
                drift,
                drift_root,
                raw,
                stored,
            },
        )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => hostile().prop_map(|h| Op::Hostile(Box::new(h))),
        2 => (1..4u8).prop_map(Op::Retry),
        8 => (0..=INTERVAL_MS).prop_map(Op::Tick),
        1 => prop_oneof![-900..900i64, -86_400..86_400i64].prop_map(Op::StepWall),
        1 => (0..60u64).prop_map(Op::StoreDown),
        1 => Just(Op::StoreUp),
        1 => prop_oneof![any::<i64>(), 0..20_000i64].prop_map(Op::Late),
        4 => Just(Op::Pass),
        1 => (0..HOSTILE.len() + HONEST.len()).prop_map(Op::Ack),
        1 => any::<bool>().prop_map(Op::Points),
        1 => (0..60_000i64).prop_map(Op::Restart),
    ]
}

fn point(m: &str, tags: &[(&str, &str)], field: &str, v: f64, ts: i64) -> Point {
    Point {
        m: m.into(),
        tags: tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        fields: [(field.to_string(), Value::Float(v))].into(),
        ts,
    }
}

fn hostile_report(h: &Hostile, wall_ms: i64) -> Report {
    let ts = wall_ms.saturating_mul(1_000_000).saturating_add(h.ts_off);
    let mut metrics = Vec::new();
    if let Some(v) = h.cpu_idle {
        metrics.push(point("cpu", &[("cpu", "cpu-total")], "usage_idle", v, ts));
    }
    if let Some(v) = h.mem_available {
        metrics.push(point("mem", &[], "available_percent", v, ts));
    }
    if let Some(v) = h.disk_used {
        metrics.push(point("disk", &[("path", "/var")], "used_percent", v, ts));
    }
    Report {
        v: VERSION,
        agent: Identity {
            instance_id: HOSTILE[h.id].into(),
            image_id: "img".into(),
            group: Some(GROUPS[h.group].to_string()).filter(|g| !g.is_empty()),
            hostname: "x".into(),
            boot_id: BOOTS[h.boot].into(),
            version: "0".into(),
            boot_time: h.boot_time,
        },
        seq: h.seq,
        interval_ms: h.interval_ms,
        protected: None,
        metrics,
        logs: vec![],
        drift: None,
        checks: h
            .checks
            .iter()
            .map(|(n, ok, detail)| CheckResult {
                name: CHECK_NAMES[*n].into(),
                ok: *ok,
                detail: detail.clone(),
                duration_ms: 1,
            })
            .collect(),
        drift_root: h.drift_root.clone(),
    }
}

fn drift_of(h: &Hostile) -> Option<DriftInfo> {
    let (drifted, n, hash) = h.drift.clone()?;
    Some(DriftInfo {
        hash,
        drifted,
        source: Some("registered baseline".into()),
        changes: (0..n)
            .map(|k| FileChange {
                path: format!("/etc/f{k}"),
                change: "changed".into(),
                attrs: vec!["content".into()],
                values: vec![],
            })
            .collect(),
        ..Default::default()
    })
}

/// An honest agent: clean figures, passing checks, a clean drift verdict.
#[derive(Debug)]
struct Agent {
    id: &'static str,
    seq: u64,
    /// Its current batch is still to be stored (the store refused it): retry the same seq.
    send_drift: bool,
}

impl Agent {
    fn report(&self, wall_ms: i64) -> Report {
        let ts = wall_ms.saturating_mul(1_000_000);
        Report {
            v: VERSION,
            agent: Identity {
                instance_id: self.id.into(),
                image_id: "img".into(),
                group: Some("web".into()),
                hostname: self.id.into(),
                boot_id: "boot-1".into(),
                version: "1".into(),
                boot_time: (T0 / 1000 - 3 * 86_400) as u64,
            },
            seq: self.seq,
            interval_ms: INTERVAL_MS,
            protected: None,
            metrics: vec![
                point("cpu", &[("cpu", "cpu-total")], "usage_idle", 90.0, ts),
                point("mem", &[], "available_percent", 60.0, ts),
                point("disk", &[("path", "/")], "used_percent", 40.0, ts),
            ],
            logs: vec![],
            drift: None,
            checks: vec![CheckResult {
                name: "web".into(),
                ok: true,
                detail: "HTTP 200".into(),
                duration_ms: 2,
            }],
            drift_root: Some("c1ea0".into()),
        }
    }
}

fn limits_at(wall_ms: i64) -> Limits {
    Limits {
        now_ns: Some(wall_ms.saturating_mul(1_000_000)),
        ..Limits::default()
    }
}

/// What the fleet must show, kept beside it.
#[derive(Debug, Default)]
struct Model {
    applied: HashSet<(String, String, u64)>,
    stored: HashSet<(String, String, u64)>,
    /// Per instance: check streaks and first-time reports since its current life began.
    streaks: HashMap<String, BTreeMap<String, u32>>,
    reports: HashMap<String, u64>,
    ids: HashSet<String>,
}

impl Model {
    fn forget(&mut self, id: &str) {
        self.applied.retain(|(i, _, _)| i != id);
        self.stored.retain(|(i, _, _)| i != id);
        self.streaks.remove(id);
        self.reports.remove(id);
    }
}

/// One fuzz case: the fleet, its clock, the honest agents and the model.
struct Case {
    fleet: Fleet,
    clock: Arc<ManualClock>,
    agents: Vec<Agent>,
    model: Model,
    store_down: bool,
    wall_offset_s: i64,
    last: Option<Hostile>,
    passes: u64,
    stats: Stats,
}

/// What the cases reached (printed, so a fuzz that never marks anything shows it).
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    refused_at_decode: u64,
    raw: u64,
    retries: u64,
    marks: u64,
    holds: u64,
    alerts: u64,
    forgotten: u64,
    restarts: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.refused_at_decode += o.refused_at_decode;
        self.raw += o.raw;
        self.retries += o.retries;
        self.marks += o.marks;
        self.holds += o.holds;
        self.alerts += o.alerts;
        self.forgotten += o.forgotten;
        self.restarts += o.restarts;
    }
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if cond {
        Ok(())
    } else {
        Err(TestCaseError::fail(what()))
    }
}

impl Case {
    fn new() -> Case {
        let clock = Arc::new(ManualClock::new(T0));
        let fleet = Fleet::new(rules(), clock.clone(), Arc::new(MemoryStore));
        let mut c = Case {
            fleet,
            clock,
            agents: HONEST
                .iter()
                .map(|id| Agent {
                    id,
                    seq: 1,
                    send_drift: true,
                })
                .collect(),
            model: Model::default(),
            store_down: false,
            wall_offset_s: 0,
            last: None,
            passes: 0,
            stats: Stats::default(),
        };
        c.honest_round()
            .expect("the first honest reports are taken");
        c
    }

    /// Admit `r` as the report handler does, keeping the model.
    fn admit(
        &mut self,
        r: &Report,
        drift: Option<DriftInfo>,
        store: bool,
    ) -> Result<Admission, TestCaseError> {
        let id = r.agent.instance_id.clone();
        let key = (id.clone(), r.agent.boot_id.clone(), r.seq);
        let new_life = {
            let g = self.fleet.lock();
            g.instances
                .get(&id)
                .is_none_or(|i| i.phx.state == State::Gone || i.is_gone())
        };
        if new_life {
            self.model.streaks.remove(&id);
            self.model.reports.remove(&id);
        }
        let dup = self.fleet.is_stored(&r.agent, r.seq);
        check(!dup || self.model.stored.contains(&key), || {
            format!("{key:?} reads as stored but never was")
        })?;
        // As the report handler does: a duplicate is admitted for liveness, without drift.
        let drift = if dup { None } else { drift };
        let a = self.fleet.admit(r, drift, r.drift_root.clone());
        check(a.first_time != self.model.applied.contains(&key), || {
            format!(
                "{key:?}: first_time {} but applied before: {}",
                a.first_time,
                self.model.applied.contains(&key)
            )
        })?;
        self.model.ids.insert(id.clone());
        if a.first_time {
            self.model.applied.insert(key.clone());
            *self.model.reports.entry(id.clone()).or_default() += 1;
            if !r.checks.is_empty() {
                let old = self.model.streaks.remove(&id).unwrap_or_default();
                let mut next = BTreeMap::new();
                for c in r.checks.iter().filter(|c| !c.ok) {
                    next.insert(c.name.clone(), old.get(&c.name).copied().unwrap_or(0) + 1);
                }
                self.model.streaks.insert(id.clone(), next);
            }
        }
        if store && !dup {
            self.fleet.stored(&r.agent, r.seq);
            self.model.stored.insert(key.clone());
            self.model.applied.insert(key);
        }
        let g = self.fleet.lock();
        let i = &g.instances[&id];
        let streaks: BTreeMap<String, u32> = i
            .tracking
            .check_streaks
            .iter()
            .map(|(k, (n, _))| (k.clone(), *n))
            .collect();
        let want = self.model.streaks.get(&id).cloned().unwrap_or_default();
        check(streaks == want, || {
            format!("{id:?}: check streaks {streaks:?}, applied once each: {want:?}")
        })?;
        let want = self.model.reports.get(&id).copied().unwrap_or(0);
        check(i.reports == want, || {
            format!(
                "{id:?}: {} reports counted, {want} first-time ones",
                i.reports
            )
        })?;
        Ok(a)
    }

    /// Every honest agent sends its batch: decoded like any other, and stored unless the
    /// metrics store is down (then it is retried with the same seq on the next round).
    fn honest_round(&mut self) -> Result<(), TestCaseError> {
        let wall = self.clock.wall_ms();
        for k in 0..self.agents.len() {
            let r = self.agents[k].report(wall);
            let body = phoenix_wire::encode(&r);
            let r = phoenix_wire::decode(&body, true, &limits_at(wall))
                .map_err(|e| TestCaseError::fail(format!("honest report refused: {e}")))?;
            let drift = self.agents[k].send_drift.then(|| DriftInfo {
                hash: "c1ea0".into(),
                drifted: false,
                source: Some("registered baseline".into()),
                ..Default::default()
            });
            let a = self.admit(&r, drift, !self.store_down)?;
            let agent = &mut self.agents[k];
            agent.send_drift = a.resend_drift;
            if !self.store_down {
                agent.seq += 1;
            }
        }
        Ok(())
    }

    fn hostile(&mut self, h: &Hostile) -> Result<(), TestCaseError> {
        let wall = self.clock.wall_ms();
        let r = hostile_report(h, wall);
        let r = if h.raw {
            self.stats.raw += 1;
            r
        } else {
            let body = phoenix_wire::encode(&r);
            match phoenix_wire::decode(&body, true, &limits_at(wall)) {
                Ok(r) => r,
                Err(_) => {
                    self.stats.refused_at_decode += 1;
                    return Ok(());
                }
            }
        };
        let a = self.admit(&r, drift_of(h), h.stored && !self.store_down)?;
        if !a.first_time {
            self.stats.retries += 1;
        }
        Ok(())
    }

    fn pass(&mut self) -> Result<(), TestCaseError> {
        let rep = self.fleet.pass();
        self.passes += 1;
        self.stats.marks += rep.marks.len() as u64;
        self.stats.holds += rep.holds.len() as u64;
        self.stats.alerts += rep.alerts_raised.len() as u64;
        self.stats.forgotten += rep.forgotten.len() as u64;
        for id in &rep.forgotten {
            self.model.forget(id);
        }
        for m in &rep.marks {
            check(!HONEST.contains(&m.instance_id.as_str()), || {
                format!("honest {} marked: {m:?}", m.instance_id)
            })?;
        }
        for (id, why) in &rep.holds {
            check(!HONEST.contains(&id.as_str()), || {
                format!("honest {id} held: {why}")
            })?;
        }
        Ok(())
    }

    fn restart(&mut self, after_ms: i64) {
        self.stats.restarts += 1;
        let snap = self.fleet.snapshot();
        let json = serde_json::to_vec(&snap).expect("a snapshot serialises");
        let snap: Snapshot = serde_json::from_slice(&json).expect("and reads back");
        let clock = Arc::new(ManualClock::new(self.clock.wall_ms() + after_ms));
        let fleet = Fleet::new(rules(), clock.clone(), Arc::new(MemoryStore));
        fleet.restore(snap);
        fleet.publish();
        self.fleet = fleet;
        self.clock = clock;
        if self.store_down {
            // A new process learns of the outage from its writer on its first pass.
            self.fleet
                .set_metrics_store(Some(("connection refused".into(), Duration::from_secs(5))));
        }
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Hostile(h) => {
                self.hostile(h)?;
                self.last = Some((**h).clone());
            }
            Op::Retry(n) => {
                if let Some(h) = self.last.clone() {
                    for _ in 0..*n {
                        self.hostile(&h)?;
                    }
                }
            }
            Op::Tick(ms) => {
                self.clock.advance(*ms as i64);
                if self.store_down {
                    self.fleet.set_metrics_store(Some((
                        "connection refused".into(),
                        Duration::from_secs(5),
                    )));
                }
                self.honest_round()?;
            }
            Op::StepWall(s) => {
                let to = (self.wall_offset_s + s).clamp(-86_400, 86_400);
                self.clock.step_wall((to - self.wall_offset_s) * 1000);
                self.wall_offset_s = to;
            }
            Op::StoreDown(retry) => {
                self.store_down = true;
                self.fleet.set_metrics_store(Some((
                    "connection refused".into(),
                    Duration::from_secs(*retry),
                )));
            }
            Op::StoreUp => {
                self.store_down = false;
                self.fleet.set_metrics_store(None);
            }
            Op::Late(ms) => self.fleet.note_lateness(*ms),
            Op::Pass => self.pass()?,
            Op::Ack(k) => {
                let (id, honest) = match HOSTILE.get(*k) {
                    Some(id) => (*id, false),
                    None => (HONEST[*k - HOSTILE.len()], true),
                };
                let r = self.fleet.ack(id, "recycler#fuzz");
                check(!honest || r == Err(AckError::NotMarked), || {
                    format!("an ack for honest {id} was taken: {r:?}")
                })?;
            }
            Op::Points(fail) => {
                let due = self.fleet.due_points();
                for p in due
                    .iter()
                    .filter(|p| HONEST.contains(&p.instance_id.as_str()))
                {
                    check(
                        !p.marked && p.held.is_empty() && p.reason.is_empty(),
                        || format!("honest point {p:?}"),
                    )?;
                }
                if *fail {
                    let ids: Vec<String> = due.into_iter().map(|p| p.instance_id).collect();
                    self.fleet.points_failed(&ids);
                }
            }
            Op::Restart(ms) => self.restart(*ms),
        }
        self.invariants()
    }

    fn invariants(&self) -> Result<(), TestCaseError> {
        {
            let g = self.fleet.lock();
            check(g.instances.len() <= self.model.ids.len(), || {
                format!(
                    "{} instances from {} ids",
                    g.instances.len(),
                    self.model.ids.len()
                )
            })?;
            for (id, i) in &g.instances {
                check(i.boots.len() <= BOOTS_KEPT, || {
                    format!("{id:?}: {} boots", i.boots.len())
                })?;
                for b in i.boots.values() {
                    check(
                        b.applied.remembered() <= SEQ_WINDOW && b.stored.remembered() <= SEQ_WINDOW,
                        || format!("{id:?}: seq windows past {SEQ_WINDOW}"),
                    )?;
                }
                check(i.checks.len() <= MAX_CHECKS, || {
                    format!("{id:?}: {} checks", i.checks.len())
                })?;
                check(i.tracking.check_streaks.len() <= CHECK_NAMES.len(), || {
                    format!("{id:?}: {} streaks", i.tracking.check_streaks.len())
                })?;
                check(
                    i.drift
                        .as_ref()
                        .is_none_or(|d| d.changes.len() <= MAX_CHANGES),
                    || format!("{id:?}: drift changes unbounded"),
                )?;
            }
            check(
                g.queue.recent_marks.len() <= rules().mark_rate_per_min as usize,
                || format!("{} marks in the rate window", g.queue.recent_marks.len()),
            )?;
            check(g.queue.alerts.len() <= GROUPS.len() + 1, || {
                format!("{} alerts", g.queue.alerts.len())
            })?;
            // Trimmed on every pass: what is kept spans at most the memory's length.
            let newest = g.late.back().map_or(0, |(t, _)| *t);
            check(
                g.late
                    .iter()
                    .all(|(t, _)| newest.saturating_sub(*t) <= LATE_MEMORY_MS),
                || format!("lateness kept past {LATE_MEMORY_MS} ms: {:?}", g.late),
            )?;
        }
        let v = self.fleet.view();
        for id in HONEST {
            let Some(i) = v.instance(id) else {
                return Err(TestCaseError::fail(format!("honest {id} missing")));
            };
            let s = &i.summary;
            check(
                s.mark.is_none()
                    && s.held.is_none()
                    && s.reason.is_none()
                    && matches!(s.state, State::New | State::Healthy),
                || format!("honest {id} after {} passes: {s:?}", self.passes),
            )?;
            check(s.drifted == Some(false) || s.drifted.is_none(), || {
                format!("honest {id} drifted: {s:?}")
            })?;
        }
        check(
            v.queue
                .marked
                .iter()
                .chain(&v.queue.held)
                .all(|e| !HONEST.contains(&e.instance_id.as_str())),
            || format!("honest instance in the queue: {:?}", v.queue),
        )?;
        Ok(())
    }
}

fn run_case(ops: &[Op], stats: &std::sync::Mutex<Stats>) -> Result<(), TestCaseError> {
    let mut c = Case::new();
    for op in ops {
        c.step(op)?;
    }
    // However the case ended: one more round and pass keep every invariant.
    c.step(&Op::Tick(INTERVAL_MS))?;
    c.step(&Op::Pass)?;
    stats.lock().unwrap().add(&c.stats);
    Ok(())
}

const CASES: u32 = 256;

#[test]
fn hostile_reports_through_fleet_health_and_queue_keep_every_invariant() {
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    });
    let started = Instant::now();
    let ops = std::sync::atomic::AtomicUsize::new(0);
    let stats = std::sync::Mutex::new(Stats::default());
    let r = runner.run(&prop::collection::vec(op(), 1..160), |ops_in| {
        ops.fetch_add(ops_in.len(), std::sync::atomic::Ordering::Relaxed);
        run_case(&ops_in, &stats)
    });
    if let Err(e) = r {
        panic!("{e}");
    }
    let st = *stats.lock().unwrap();
    eprintln!(
        "fleet fuzz: {CASES} cases, {} steps, {:.1} s; reached: {st:?}",
        ops.load(std::sync::atomic::Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    // A fuzz that never got a hostile instance marked, held or forgotten proves little.
    assert!(
        st.marks > 0 && st.holds > 0 && st.alerts > 0 && st.retries > 0 && st.refused_at_decode > 0,
        "{st:?}"
    );
}

/// The fuzz's own assertions can fail: a check streak counted on every retry, or a mark on
/// a live instance, is caught.
#[test]
fn the_fuzz_model_catches_what_it_is_for() {
    let mut c = Case::new();
    // A retried report counts once in the fleet; a model that counted it twice disagrees.
    let h = Hostile {
        id: 0,
        group: 0,
        boot: 0,
        seq: 7,
        interval_ms: 1000,
        boot_time: 0,
        ts_off: 0,
        checks: vec![(0, false, "HTTP 500".into())],
        cpu_idle: None,
        mem_available: None,
        disk_used: None,
        drift: None,
        drift_root: None,
        raw: false,
        stored: false,
    };
    c.step(&Op::Hostile(Box::new(h.clone()))).unwrap();
    c.step(&Op::Retry(3)).unwrap();
    c.model.applied.remove(&("x-0".into(), "b-0".into(), 7));
    assert!(c.step(&Op::Hostile(Box::new(h))).is_err());
    // An honest agent that stops reporting is marked silent, and the invariant says so.
    let mut c = Case::new();
    c.agents.truncate(2);
    let mut failed = None;
    for _ in 0..20 {
        if let Err(e) = c
            .step(&Op::Tick(INTERVAL_MS))
            .and_then(|_| c.step(&Op::Pass))
        {
            failed = Some(e);
            break;
        }
    }
    let e = failed.expect("a silent honest instance is marked, and that fails the case");
    assert!(e.to_string().contains("h-2"), "{e}");
}
