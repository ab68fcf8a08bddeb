//! The phoenix queue: from rule verdicts to marks, safely.
//!
//! States: new (grace) → healthy ↔ suspect/unhealthy; drifted; marked → acked → gone.
//! A wrong mark kills a healthy server and a storm of marks kills the fleet, so marks pass
//! three gates, per group (identity.group, else image_id):
//! - a mass event (more than `mass_event` of a group bad at once, and at least `mass_min`
//!   instances) holds every new mark in that group and raises an alert: a whole group turning
//!   bad together points at a bad baseline, a rollout or the network, not at the instances;
//! - the budgets, per reason: marked, acked and not-ready (in grace) instances of the group
//!   count against each, and the most restrictive covering a reason wins;
//!   voluntary reasons (drift, age, ssh) also wait for a maintenance window and for the
//!   instance's protect file to go (the arithmetic is [`super::policy`]'s);
//! - the rate limit: at most `mark_rate_per_min` new marks per minute across the fleet.
//!
//! Budgeted marks go to the worst reasons first ([`Reason`]'s order), then the longest bad.
//! An instance with several problems is marked for the first one (worst first) whose gates
//! let it through: a drifted box that dies is replaced under the unhealthy budget even while
//! the drift budget is spent or the window closed.
//! Everything here is a pure function of the fleet state and a [`Now`] given by the caller;
//! every duration is monotonic, every sum saturates.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::clock::{human, Now};
use super::health::{self, Facts, Reason, Rules};
use super::policy::{self, Disruption, Gate};
use super::state::{Instance, Mark, State};

/// A mass event in one group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub group: String,
    pub since_ms: i64,
    pub bad: usize,
    pub size: usize,
    /// Bad instances by reason, e.g. {"drift": 6}.
    pub reasons: BTreeMap<String, usize>,
    pub message: String,
}

/// Fleet-wide queue state (persisted with the fleet).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QueueState {
    /// Active mass-event alerts by group.
    pub alerts: BTreeMap<String, Alert>,
    /// Monotonic ms of the marks made in the last minute (the rate limit).
    pub recent_marks: VecDeque<i64>,
    /// Per group: (size, allowed, marked, acked) as of the latest pass.
    #[serde(skip)]
    pub budget: BTreeMap<String, GroupBudget>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GroupBudget {
    pub size: usize,
    /// The most any one reason may have in disruption at once (the loosest budget).
    pub allowed: usize,
    pub marked: usize,
    pub acked: usize,
    /// In grace (not yet ready), not marked: counts against every budget.
    pub not_ready: usize,
    pub bad: usize,
    /// Each `--budget` entry and what it allows in this group, e.g. ("drift", 1).
    pub limits: Vec<(String, usize)>,
}

impl GroupBudget {
    pub fn disruption(&self) -> Disruption {
        Disruption {
            marked: self.marked,
            acked: self.acked,
            not_ready: self.not_ready,
        }
    }
}

/// What one pass changed, for logs, the webhook and InfluxDB.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Instances marked in this pass.
    pub new_marks: Vec<String>,
    /// Instances whose state, reason or hold changed.
    pub changed: Vec<String>,
    pub alerts_raised: Vec<Alert>,
    pub alerts_cleared: Vec<Alert>,
    pub forgotten: Vec<String>,
    /// Log-only: instances that would have been marked in this pass.
    pub would_mark: Vec<String>,
    /// Instances whose hold started or changed in kind (not merely its countdown) in this
    /// pass: what is logged and audited, so a settling mark is one line, not one per pass.
    pub holds_news: Vec<String>,
}

/// A hold's text without its figures ("settling: waiting 4s …" and "… 675ms …" are one
/// hold), to tell a new or changed hold from one that only counts down: every word with a
/// digit in it goes.
fn hold_kind(h: &str) -> String {
    h.split_whitespace()
        .filter(|w| !w.bytes().any(|b| b.is_ascii_digit()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where silence can start counting, and how late the collector itself is (see [`Facts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Watch {
    pub since_mono: i64,
    pub late_ms: i64,
}

/// Whether `bad` of `size` instances is a mass event under `rules`.
pub fn is_mass(bad: usize, size: usize, rules: &Rules) -> bool {
    policy::is_mass(bad, size, rules.mass_event, rules.mass_min)
}

fn alert_message(
    group: &str,
    bad: usize,
    size: usize,
    reasons: &BTreeMap<String, usize>,
) -> String {
    let what: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
    format!(
        "{bad} of {size} instances in group {group} turned bad at once ({}): marks in this group are held; more likely a bad baseline, a rollout or the network than the instances. Check and fix; the alert clears by itself",
        what.join(", ")
    )
}

pub fn facts(i: &Instance, w: Watch) -> Facts<'_> {
    Facts {
        first_seen_mono: i.first_seen_mono,
        last_seen_mono: i.last_seen_mono,
        first_seen_ms: i.first_seen_ms,
        interval_ms: i.interval_ms,
        boot_time: i.identity.boot_time,
        tracking: &i.tracking,
        drift: i.drift.as_deref(),
        watch_since_mono: w.since_mono,
        late_ms: w.late_ms,
    }
}

/// A group's budget in this pass, and how many of its members are bad for each reason.
type GroupTally = (GroupBudget, BTreeMap<String, usize>);

/// One pass over the fleet at `now`.
pub fn evaluate(
    instances: &mut HashMap<String, Instance>,
    q: &mut QueueState,
    rules: &Rules,
    now: Now,
    watch: Watch,
) -> Outcome {
    let mut out = Outcome::default();
    let now_ms = now.wall_ms;
    let forget = health::ms(rules.forget_after);
    instances.retain(|id, i| {
        let keep = i
            .phx
            .mark
            .as_ref()
            .and_then(|m| m.gone_ms)
            .is_none_or(|g| now_ms.saturating_sub(g) < forget);
        if !keep {
            out.forgotten.push(id.clone());
        }
        keep
    });

    // 1. Rules, marks that end, and each instance's own state.
    // Verdicts (and whether each id died young) in the map's iteration order, which stays
    // the same until the map changes shape (nothing below inserts or removes): no id is
    // copied or hashed for them.
    let mut verdicts: Vec<health::Verdict> = Vec::with_capacity(instances.len());
    let mut died_young: Vec<bool> = Vec::with_capacity(instances.len());
    for (id, i) in instances.iter_mut() {
        let f = facts(i, watch);
        let v = health::judge(&f, rules, now);
        let silent_for = health::silent_for_ms(&f, now);
        died_young.push(policy::died_young(
            &f,
            silent_for,
            rules,
            i.phx.mark.is_some(),
        ));
        let worst = v.worst().cloned();
        if worst.as_ref().map(|p| p.reason) != i.phx.problem.as_ref().map(|p| p.reason) {
            i.phx.problem_since_ms = worst.as_ref().map(|_| now_ms);
            i.phx.problem_since_mono = worst.as_ref().map(|_| now.mono_ms);
        }
        i.phx.problem = worst;
        if let Some(m) = &mut i.phx.mark {
            if m.gone_ms.is_none() {
                if m.acked_ms.is_some() {
                    // The recycler took it; once it stops reporting it is gone, and frees the budget.
                    let interval = health::interval_of(i.interval_ms);
                    let gone_after = interval
                        .saturating_mul(3)
                        .min(health::ms(rules.silent_after));
                    if silent_for >= gone_after {
                        m.gone_ms = Some(now_ms);
                        tracing::info!(instance_id = %id, reason = m.reason.as_str(), "acked instance went silent: gone");
                    }
                } else if i.last_seen_mono > m.since_mono && v.problems.is_empty() {
                    // Only a report made after the mark can clear it: silence after a collector
                    // restart is no evidence that the instance recovered.
                    tracing::info!(instance_id = %id, reason = m.reason.as_str(), evidence = %m.evidence, "instance recovered before the recycler acted: mark withdrawn");
                    i.phx.mark = None;
                }
            }
        }
        verdicts.push(v);
    }

    // 2. Per group: size, bad, budget in use; mass events.
    // Each instance finds its group through a hash of the borrowed name (a group's name is
    // copied once per pass, not compared along a tree per instance: at 10,000 instances the
    // tree's string compares were a third of the pass). foldhash, seeded per process, because
    // std's SipHash of each name was then as costly as the tree had been.
    let mut slots: Vec<(String, GroupTally)> = Vec::new();
    let mut slot_of: HashMap<&str, usize, foldhash::fast::RandomState> = HashMap::default();
    for ((i, v), young) in instances.values().zip(&verdicts).zip(&died_young) {
        let gone = i.phx.mark.as_ref().is_some_and(|m| m.gone_ms.is_some());
        // An id that never reported past its grace and fell silent is no member of its
        // group: 30 ids made up by a token holder and abandoned must not make a mass event
        // (which holds every real mark in the group) nor fill the budget as "not ready".
        if gone || *young {
            continue;
        }
        let slot = *slot_of.entry(i.group()).or_insert_with(|| {
            slots.push((i.group().to_string(), Default::default()));
            slots.len() - 1
        });
        let (g, reasons) = &mut slots[slot].1;
        g.size += 1;
        match &i.phx.mark {
            Some(m) if m.acked_ms.is_some() => g.acked += 1,
            Some(_) => g.marked += 1,
            None if v.in_grace => g.not_ready += 1,
            None => {}
        }
        // Age is routine recycling, not a sign of trouble: it never makes a mass event.
        let bad_reason = i
            .phx
            .problem
            .as_ref()
            .map(|p| p.reason)
            .filter(|r| *r != Reason::Age)
            .or_else(|| {
                i.phx
                    .mark
                    .as_ref()
                    .filter(|m| m.acked_ms.is_none())
                    .map(|m| m.reason)
            });
        if let Some(r) = bad_reason {
            g.bad += 1;
            *reasons.entry(r.as_str().to_string()).or_default() += 1;
        }
    }
    let mut groups: BTreeMap<String, GroupTally> = slots.into_iter().collect();
    for (name, (g, reasons)) in &mut groups {
        g.limits = rules.budget.limits(g.size);
        g.allowed = Reason::ALL
            .iter()
            .map(|r| rules.budget.allowed(r.as_str(), g.size))
            .max()
            .unwrap_or(1);
        let mass = is_mass(g.bad, g.size, rules);
        match (mass, q.alerts.get_mut(name)) {
            (true, Some(a)) => {
                a.bad = g.bad;
                a.size = g.size;
                a.reasons = reasons.clone();
                a.message = alert_message(name, g.bad, g.size, reasons);
            }
            (true, None) => {
                let message = alert_message(name, g.bad, g.size, reasons);
                let a = Alert {
                    group: name.clone(),
                    since_ms: now_ms,
                    bad: g.bad,
                    size: g.size,
                    reasons: reasons.clone(),
                    message,
                };
                tracing::error!(group = %name, bad = g.bad, size = g.size, "mass event: {}", a.message);
                q.alerts.insert(name.clone(), a.clone());
                out.alerts_raised.push(a);
            }
            (false, Some(_)) => {
                if let Some(a) = q.alerts.remove(name) {
                    tracing::warn!(group = %name, bad = g.bad, size = g.size, "mass event over: marks in this group resume within the budget");
                    out.alerts_cleared.push(a);
                }
            }
            (false, None) => {}
        }
    }
    q.alerts.retain(|g, a| {
        let keep = groups.contains_key(g);
        if !keep {
            out.alerts_cleared.push(a.clone());
        }
        keep
    });

    // 3. Candidates, worst first, through the gates.
    while q
        .recent_marks
        .front()
        .is_some_and(|t| now.mono_ms.saturating_sub(*t) >= 60_000)
    {
        q.recent_marks.pop_front();
    }
    let mut candidates: Vec<(Reason, i64, String, usize)> = instances
        .iter()
        .enumerate()
        .filter(|(k, (_, i))| i.phx.mark.is_none() && !died_young.get(*k).copied().unwrap_or(false))
        .filter_map(|(k, (id, i))| {
            i.phx.problem.as_ref().map(|p| {
                (
                    p.reason,
                    i.phx.problem_since_mono.unwrap_or(now.mono_ms),
                    id.clone(),
                    k,
                )
            })
        })
        .collect();
    candidates.sort();
    // Once a pass: whether voluntary marks wait for a window (and until when).
    let window = policy::window_hold(&rules.windows, now_ms);
    let mut held: HashMap<String, String> = HashMap::new();
    for (_, _, id, k) in candidates {
        let Some(v) = verdicts.get(k) else {
            continue;
        };
        let Some(i) = instances.get_mut(&id) else {
            continue;
        };
        let group = i.group().to_string();
        let Some((g, _)) = groups.get_mut(&group) else {
            continue;
        };
        let interval = health::interval_of(i.interval_ms);
        // Settling is counted on the monotonic clock from when this problem began, so it
        // ends: the hold's "waiting Ns" counts down on every pass.
        let settle_until = i
            .phx
            .problem_since_mono
            .unwrap_or(now.mono_ms)
            .saturating_add(interval.saturating_mul(i64::from(rules.settle_intervals)));
        // The first of its problems (worst first) that every gate lets through. An instance
        // in grace is itself counted as not ready: marking it adds no disruption.
        let in_grace = v.in_grace;
        let mut disruption = g.disruption();
        if in_grace {
            disruption.not_ready = disruption.not_ready.saturating_sub(1);
        }
        let gate = Gate {
            budgets: &rules.budget,
            window: window.as_deref(),
            group: &group,
            size: g.size,
            disruption,
            protected: i.protected,
        };
        let problems: &[health::Problem] = &v.problems;
        let mut holds: Vec<String> = Vec::new();
        let mut chosen = None;
        for p in problems {
            match policy::hold_for(&gate, p.reason.as_str()) {
                None => {
                    chosen = Some(p.clone());
                    break;
                }
                Some(h) if !holds.contains(&h) => holds.push(h),
                Some(_) => {}
            }
        }
        let hold = if let Some(a) = q.alerts.get(&group) {
            Some(format!(
                "mass event in group {group}: {} of {} bad",
                a.bad, a.size
            ))
        } else if now.mono_ms < settle_until {
            Some(format!("settling: waiting {} for the rest of group {group} to report (a mass event holds all marks)", human(settle_until - now.mono_ms)))
        } else if chosen.is_none() {
            // Every problem's hold, worst first: why neither the drift nor the failing check went.
            Some(holds.join(" | "))
        } else if q.recent_marks.len() >= rules.mark_rate_per_min as usize {
            Some(format!(
                "rate limit: {} marks in the last minute",
                q.recent_marks.len()
            ))
        } else if rules.log_only {
            // As if marked, so log-only shows what the budget would allow.
            take_slot(g, in_grace);
            out.would_mark.push(id.clone());
            Some("log-only: would be marked".to_string())
        } else {
            None
        };
        let (Some(problem), None) = (chosen, &hold) else {
            if let Some(h) = hold {
                held.insert(id, h);
            }
            continue;
        };
        let reason = problem.reason;
        take_slot(g, in_grace);
        q.recent_marks.push_back(now.mono_ms);
        tracing::warn!(instance_id = %id, group = %group, reason = reason.as_str(), evidence = %problem.evidence, "marked for replacement");
        i.phx.mark = Some(Mark {
            reason,
            evidence: problem.evidence,
            since_ms: now_ms,
            since_mono: now.mono_ms,
            acked_ms: None,
            acked_by: None,
            gone_ms: None,
        });
        out.new_marks.push(id);
    }
    q.budget = groups.into_iter().map(|(k, (g, _))| (k, g)).collect();

    // 4. States, and what changed.
    for ((id, i), v) in instances.iter_mut().zip(&verdicts) {
        let h = if held.is_empty() {
            None
        } else {
            held.remove(id)
        };
        if h != i.phx.held {
            let news = h.as_deref().map(hold_kind) != i.phx.held.as_deref().map(hold_kind);
            match (&h, &i.phx.problem, &i.phx.held) {
                (Some(h), Some(p), _) if news => {
                    out.holds_news.push(id.clone());
                    if rules.log_only && h.starts_with("log-only") {
                        tracing::warn!(instance_id = %id, reason = p.reason.as_str(), evidence = %p.evidence, "log-only: would mark for replacement");
                    } else {
                        tracing::info!(instance_id = %id, reason = p.reason.as_str(), evidence = %p.evidence, hold = %h, "mark held");
                    }
                }
                (None, _, Some(was)) => {
                    let then = if i.phx.mark.is_some() {
                        "marked"
                    } else {
                        "problem over"
                    };
                    tracing::info!(instance_id = %id, was = %was, then, "mark no longer held");
                }
                _ => {}
            }
            i.phx.held = h;
            out.changed.push(id.clone());
        }
        let state = match &i.phx.mark {
            Some(m) if m.gone_ms.is_some() => State::Gone,
            Some(m) if m.acked_ms.is_some() => State::Acked,
            Some(_) => State::Marked,
            None => match v.worst().map(|p| p.reason) {
                // SSH on is a choice someone made against the image, as drift is.
                Some(Reason::Drift | Reason::Ssh) => State::Drifted,
                Some(_) => State::Unhealthy,
                None if v.suspect => State::Suspect,
                None if v.in_grace => State::New,
                None => State::Healthy,
            },
        };
        if state != i.phx.state {
            tracing::debug!(instance_id = %id, from = i.phx.state.as_str(), to = state.as_str(), "state");
            i.phx.state = state;
            i.phx.last_point_ms = 0;
            if out.changed.last() != Some(id) {
                out.changed.push(id.clone());
            }
        }
    }
    out
}

/// A mark moves an instance into the group's marked count (out of not-ready if in grace).
fn take_slot(g: &mut GroupBudget, in_grace: bool) {
    g.marked += 1;
    if in_grace {
        g.not_ready = g.not_ready.saturating_sub(1);
    }
}

/// Why an ack was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("instance is not marked for replacement (see GET /v1/phoenix)")]
    NotMarked,
}

/// The recycler took `id`: Ok(true) acked now, Ok(false) acked before (harmless).
pub fn ack(
    instances: &mut HashMap<String, Instance>,
    id: &str,
    by: &str,
    now_ms: i64,
) -> Result<bool, AckError> {
    let i = instances.get_mut(id).ok_or(AckError::NotMarked)?;
    let m = i
        .phx
        .mark
        .as_mut()
        .filter(|m| m.gone_ms.is_none())
        .ok_or(AckError::NotMarked)?;
    if m.acked_ms.is_some() {
        return Ok(false);
    }
    m.acked_ms = Some(now_ms);
    m.acked_by = Some(by.to_string());
    i.phx.state = State::Acked;
    i.phx.last_point_ms = 0;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::health::DriftInfo;
    use phoenix_wire::Identity;
    use std::sync::Arc;
    use std::time::Duration;

    const T0: i64 = 1_700_000_000_000;
    const S: i64 = 1000;

    /// A fleet under a fake clock: every instance reports every second until told otherwise.
    struct Sim {
        fleet: HashMap<String, Instance>,
        q: QueueState,
        rules: Rules,
        now: i64,
    }

    impl Sim {
        fn new(rules: Rules) -> Sim {
            Sim {
                fleet: HashMap::new(),
                q: QueueState::default(),
                rules,
                now: T0,
            }
        }
        fn add(&mut self, group: &str, n: usize) -> Vec<String> {
            (0..n)
                .map(|k| {
                    let id = format!("i-{group}-{k:02}");
                    let identity = Identity {
                        instance_id: id.clone(),
                        image_id: "img".into(),
                        group: Some(group.into()),
                        ..Default::default()
                    };
                    self.fleet.insert(
                        id.clone(),
                        Instance {
                            identity,
                            first_seen_ms: self.now,
                            last_seen_ms: self.now,
                            first_seen_mono: self.now,
                            last_seen_mono: self.now,
                            interval_ms: 1000,
                            ..Default::default()
                        },
                    );
                    id
                })
                .collect()
        }
        fn add_one(&mut self, group: &str, id: &str) {
            self.fleet.insert(
                id.to_string(),
                Instance {
                    identity: Identity {
                        instance_id: id.to_string(),
                        image_id: "img".into(),
                        group: Some(group.into()),
                        ..Default::default()
                    },
                    first_seen_ms: self.now,
                    first_seen_mono: self.now,
                    last_seen_ms: self.now,
                    last_seen_mono: self.now,
                    interval_ms: 1000,
                    ..Default::default()
                },
            );
        }
        fn drift(&mut self, id: &str, file: &str) {
            let changes = vec![phoenix_wire::FileChange {
                path: file.into(),
                change: "changed".into(),
                attrs: vec!["content".into()],
                values: vec![],
            }];
            self.fleet.get_mut(id).unwrap().drift = Some(Arc::new(DriftInfo {
                hash: "h".into(),
                drifted: true,
                source: Some("registered baseline".into()),
                changes,
                ..Default::default()
            }));
        }
        fn fail_check(&mut self, id: &str) {
            self.fleet
                .get_mut(id)
                .unwrap()
                .tracking
                .check_streaks
                .insert("web".into(), (9, "HTTP 500".into()));
        }
        /// Advance the clock; every instance not in `silent` reports meanwhile.
        fn tick(&mut self, ms: i64, silent: &[&str]) -> Outcome {
            self.now += ms;
            for (id, i) in self.fleet.iter_mut() {
                if !silent.contains(&id.as_str()) {
                    i.last_seen_ms = self.now;
                    i.last_seen_mono = self.now;
                }
            }
            evaluate(
                &mut self.fleet,
                &mut self.q,
                &self.rules,
                n(self.now),
                Watch::default(),
            )
        }
        fn state(&self, id: &str) -> State {
            self.fleet[id].phx.state
        }
        fn marked(&self) -> Vec<String> {
            let mut v: Vec<String> = self
                .fleet
                .iter()
                .filter(|(_, i)| i.phx.mark.as_ref().is_some_and(|m| m.gone_ms.is_none()))
                .map(|(id, _)| id.clone())
                .collect();
            v.sort();
            v
        }
    }

    fn n(ms: i64) -> Now {
        Now {
            wall_ms: ms,
            mono_ms: ms,
        }
    }

    fn quick() -> Rules {
        // No settling here (see `a_group_drifting_over_an_interval_is_one_mass_event`).
        Rules {
            grace: Duration::from_secs(2),
            silent_after: Duration::from_secs(3),
            mark_rate_per_min: 100,
            settle_intervals: 0,
            ..Default::default()
        }
    }

    #[test]
    fn a_group_drifting_over_an_interval_is_one_mass_event() {
        // Reports of a group that drifts together come in over one interval; settling keeps
        // the first one from being marked before the rest show the mass event.
        let mut s = Sim::new(Rules {
            settle_intervals: 2,
            ..quick()
        });
        let ids = s.add("batch", 6);
        s.tick(3 * S, &[]);
        for id in &ids {
            s.drift(id, "/etc/app.conf");
            let o = s.tick(S / 6, &[]);
            assert!(o.new_marks.is_empty(), "{id}: {:?}", s.fleet[id].phx.held);
        }
        assert_eq!(s.q.alerts["batch"].bad, 6);
        assert!(s.fleet[&ids[0]]
            .phx
            .held
            .as_deref()
            .unwrap()
            .starts_with("mass event"));
        // A lone drift is marked once it settled: two intervals.
        let mut s = Sim::new(Rules {
            settle_intervals: 2,
            ..quick()
        });
        let ids = s.add("web", 10);
        s.tick(3 * S, &[]);
        s.drift(&ids[4], "/etc/x");
        let o = s.tick(S, &[]);
        assert!(o.new_marks.is_empty());
        assert_eq!(o.holds_news, vec![ids[4].clone()], "the hold starts: news");
        assert_eq!(s.fleet[&ids[4]].phx.held.as_deref(), Some("settling: waiting 2s for the rest of group web to report (a mass event holds all marks)"));
        let o = s.tick(S, &[]);
        assert!(o.new_marks.is_empty());
        assert!(
            o.holds_news.is_empty() && o.changed.contains(&ids[4]),
            "a countdown changes the hold's text (shown) but is no news (logged): {o:?}"
        );
        assert_eq!(s.tick(S, &[]).new_marks, vec![ids[4].clone()]);
        assert_eq!(
            hold_kind("settling: waiting 4s for group g1"),
            hold_kind("settling: waiting 675ms for group g1")
        );
        assert_ne!(
            hold_kind("settling: waiting 4s"),
            hold_kind("protected: 4s")
        );
    }

    #[test]
    fn made_up_ids_that_fall_silent_young_raise_no_mass_event_and_hold_no_mark() {
        let mut s = Sim::new(Rules {
            mass_event: 0.2,
            ..quick()
        });
        let real = s.add("web", 4);
        s.tick(3 * S, &[]);
        // 30 ids a token holder made up: one report each, then nothing.
        let fakes: Vec<String> = (0..30).map(|k| format!("i-fake-{k:02}")).collect();
        for f in &fakes {
            s.add_one("web", f);
        }
        let quiet: Vec<&str> = fakes.iter().map(String::as_str).collect();
        // Well past their grace and --silent-after: silent, yet no members of web.
        for _ in 0..8 {
            let o = s.tick(S, &quiet);
            assert!(o.new_marks.is_empty(), "{:?}", o.new_marks);
            assert!(o.alerts_raised.is_empty(), "{:?}", o.alerts_raised);
        }
        assert_eq!(s.state(&fakes[0]), State::Unhealthy, "shown silent");
        assert_eq!(s.fleet[&fakes[0]].phx.held, None);
        let b = &s.q.budget["web"];
        assert_eq!((b.size, b.bad, b.not_ready), (4, 0, 0), "{b:?}");
        // A real drifted instance in web is still marked.
        s.drift(&real[1], "/etc/app.conf");
        let o = s.tick(S, &quiet);
        assert_eq!(o.new_marks, vec![real[1].clone()]);
        assert!(s.q.alerts.is_empty());
        // A real box that reported past its grace and then died is a member: marked silent.
        let mut s = Sim::new(quick());
        let ids = s.add("web", 10);
        s.tick(3 * S, &[]);
        let dead = [ids[0].as_str()];
        let mut marked = Vec::new();
        for _ in 0..6 {
            marked.extend(s.tick(S, &dead).new_marks);
        }
        assert_eq!(marked, vec![ids[0].clone()]);
    }

    #[test]
    fn budget_arithmetic() {
        let r = Rules {
            mass_event: 0.5,
            mass_min: 3,
            ..Default::default()
        };
        assert!(!is_mass(5, 10, &r), "exactly half is not more than half");
        assert!(is_mass(6, 10, &r));
        assert!(!is_mass(2, 2, &r), "two bad instances are no mass event");
        assert!(is_mass(3, 4, &r));
        assert!(!is_mass(3, 0, &r));
    }

    #[test]
    fn states_through_a_life_new_healthy_suspect_marked_acked_gone_forgotten() {
        let mut s = Sim::new(Rules {
            silent_after: Duration::from_secs(5),
            ..quick()
        });
        let ids = s.add("web", 20);
        let a = ids[0].as_str();
        s.tick(0, &[]);
        assert_eq!(s.state(a), State::New);
        s.tick(2 * S, &[]);
        assert_eq!(s.state(a), State::Healthy);
        // Silent: suspect past 3 intervals, marked at silent_after.
        s.tick(S, &[a]);
        s.tick(2 * S + 500, &[a]);
        assert_eq!(s.state(a), State::Suspect);
        let o = s.tick(1500, &[a]);
        assert_eq!(o.new_marks, vec![a.to_string()]);
        assert_eq!(s.state(a), State::Marked);
        let m = s.fleet[a].phx.mark.clone().unwrap();
        assert_eq!(
            (m.reason, m.evidence.as_str(), m.since_ms),
            (Reason::Silent, "silent for 5s; reports every 1s", s.now)
        );
        // Not acked: stays marked while silent.
        s.tick(10 * S, &[a]);
        assert_eq!(s.state(a), State::Marked);
        assert_eq!(ack(&mut s.fleet, a, "recycler#1", s.now), Ok(true));
        assert_eq!(
            ack(&mut s.fleet, a, "recycler#1", s.now),
            Ok(false),
            "acking twice is harmless"
        );
        assert_eq!(
            ack(&mut s.fleet, &ids[1], "recycler#1", s.now),
            Err(AckError::NotMarked),
            "not marked"
        );
        assert_eq!(
            ack(&mut s.fleet, "i-nope", "recycler#1", s.now),
            Err(AckError::NotMarked)
        );
        // Acked and (still) silent: gone at the next pass, and the budget is free again.
        s.tick(S, &[a]);
        assert_eq!(s.state(a), State::Gone);
        assert_eq!(
            s.q.budget["web"],
            GroupBudget {
                size: 19,
                allowed: 2,
                marked: 0,
                acked: 0,
                not_ready: 0,
                bad: 0,
                limits: vec![("all".into(), 2)],
            }
        );
        assert_eq!(
            ack(&mut s.fleet, a, "recycler#1", s.now),
            Err(AckError::NotMarked),
            "a gone instance cannot be acked"
        );
        // Forgotten after forget_after.
        let o = s.tick(health::ms(s.rules.forget_after) - 2 * S, &[a]);
        assert!(o.forgotten.is_empty());
        let o = s.tick(S, &[a]);
        assert!(o.forgotten.is_empty());
        let o = s.tick(S, &[a]);
        assert_eq!(o.forgotten, vec![a.to_string()]);
        assert!(!s.fleet.contains_key(a));
    }

    #[test]
    fn an_acked_instance_that_keeps_reporting_stays_acked_and_holds_the_budget() {
        let mut s = Sim::new(quick());
        let ids = s.add("web", 10);
        s.tick(3 * S, &[]);
        s.drift(&ids[0], "/etc/x");
        s.drift(&ids[1], "/etc/y");
        s.tick(S, &[]);
        assert_eq!(s.marked(), vec![ids[0].clone()], "budget 1 of 10");
        assert_eq!(
            s.fleet[&ids[1]].phx.held.as_deref(),
            Some("budget: 1 of at most 1 in group web in disruption for drift (1 marked, 0 acked, 0 not ready)")
        );
        assert_eq!(s.state(&ids[1]), State::Drifted);
        ack(&mut s.fleet, &ids[0], "r", s.now).unwrap();
        s.tick(10 * S, &[]);
        assert_eq!(s.state(&ids[0]), State::Acked);
        assert_eq!(s.marked(), vec![ids[0].clone()]);
        // Gone: the next in line is marked in the same pass.
        let o = s.tick(3 * S, &[&ids[0]]);
        assert_eq!(s.state(&ids[0]), State::Gone);
        assert_eq!(o.new_marks, vec![ids[1].clone()]);
        assert_eq!(
            s.fleet[&ids[1]].phx.mark.as_ref().unwrap().evidence,
            "drifted from the registered baseline: /etc/y (content)"
        );
    }

    #[test]
    fn budgeted_marks_go_to_the_worst_reason_first() {
        let mut t = Sim::new(Rules {
            max_lifetime: Some(Duration::from_secs(3600)),
            ..quick()
        });
        let ids = t.add("web", 30); // allowed: 3
        t.tick(3 * S, &[]);
        t.fleet.get_mut(&ids[3]).unwrap().tracking.disk_worst = Some(("/".into(), 99.0));
        t.tick(2 * S, &[&ids[5]]);
        t.tick(2 * S, &[&ids[5]]);
        // The full disk and the silence came first, but a failing check and drift are worse.
        t.fail_check(&ids[7]);
        t.drift(&ids[9], "/etc/z");
        let marked_before = t.marked();
        assert_eq!(
            marked_before.len(),
            2,
            "disk and silence took the budget first: {marked_before:?}"
        );
        for id in &marked_before {
            t.fleet.get_mut(id).unwrap().phx.mark = None; // start the comparison from an empty queue
        }
        let o = t.tick(S, &[&ids[5]]);
        assert_eq!(
            o.new_marks,
            vec![ids[9].clone(), ids[7].clone(), ids[5].clone()],
            "drift, the check, then silence"
        );
        assert!(t.fleet[&ids[3]]
            .phx
            .held
            .as_deref()
            .unwrap()
            .starts_with("budget"));
        assert_eq!(
            t.fleet[&ids[7]].phx.mark.as_ref().unwrap().evidence,
            "check web failed 9 times in a row: HTTP 500"
        );
        // Past the lifetime every instance is old, but the disk goes before age as slots free up.
        t.tick(3600 * S, &[&ids[5]]);
        for id in [&ids[5], &ids[7], &ids[9]] {
            ack(&mut t.fleet, id, "r", t.now).unwrap();
        }
        let o = t.tick(4 * S, &[&ids[5], &ids[7], &ids[9]]);
        assert_eq!(t.state(&ids[7]), State::Gone);
        assert_eq!(o.new_marks.len(), 3, "27 left: 10% rounded up is 3");
        assert_eq!(o.new_marks[0], ids[3], "disk full first");
        for m in &o.new_marks[1..] {
            assert_eq!(t.fleet[m].phx.mark.as_ref().unwrap().reason, Reason::Age);
        }
    }

    #[test]
    fn a_mass_drift_holds_every_mark_in_the_group_and_raises_an_alert() {
        let mut s = Sim::new(quick());
        let web = s.add("web", 10);
        let batch = s.add("batch", 6);
        s.tick(3 * S, &[]);
        for id in &batch[..4] {
            s.drift(id, "/etc/app.conf");
        }
        s.drift(&web[0], "/etc/passwd");
        let o = s.tick(S, &[]);
        assert_eq!(
            o.new_marks,
            vec![web[0].clone()],
            "the other group is not affected"
        );
        assert_eq!(o.alerts_raised.len(), 1);
        let a = &s.q.alerts["batch"];
        assert_eq!((a.bad, a.size, a.reasons.get("drift")), (4, 6, Some(&4)));
        assert!(
            a.message.contains("4 of 6 instances in group batch"),
            "{}",
            a.message
        );
        for id in &batch[..4] {
            assert_eq!(s.state(id), State::Drifted);
            assert_eq!(
                s.fleet[id].phx.held.as_deref(),
                Some("mass event in group batch: 4 of 6 bad")
            );
        }
        // Still held on later passes; nothing raised twice.
        let o = s.tick(S, &[]);
        assert!(o.alerts_raised.is_empty() && o.new_marks.is_empty());
        // The baseline is fixed: three go clean, the alert clears, one (budget 1) is marked.
        for id in &batch[..3] {
            s.fleet.get_mut(id).unwrap().drift = None;
        }
        let o = s.tick(S, &[]);
        assert_eq!(o.alerts_cleared.len(), 1);
        assert!(s.q.alerts.is_empty());
        assert_eq!(o.new_marks, vec![batch[3].clone()]);
    }

    #[test]
    fn the_rate_limit_spans_the_fleet() {
        let mut s = Sim::new(Rules {
            mark_rate_per_min: 2,
            budget: crate::fleet::policy::Budgets::share(1.0),
            ..quick()
        });
        let ids = s.add("web", 10);
        s.tick(3 * S, &[]);
        for id in &ids[..4] {
            s.drift(id, "/etc/x");
        }
        let o = s.tick(S, &[]);
        assert_eq!(o.new_marks.len(), 2);
        assert!(s
            .fleet
            .values()
            .filter_map(|i| i.phx.held.as_deref())
            .all(|h| h == "rate limit: 2 marks in the last minute"));
        assert_eq!(s.tick(59 * S, &[]).new_marks.len(), 0);
        assert_eq!(s.tick(S, &[]).new_marks.len(), 2, "a minute later two more");
    }

    #[test]
    fn log_only_marks_nothing_and_shows_what_it_would_mark() {
        let mut s = Sim::new(Rules {
            log_only: true,
            ..quick()
        });
        let ids = s.add("web", 20);
        s.tick(3 * S, &[]);
        for id in &ids[..3] {
            s.drift(id, "/etc/x");
        }
        let o = s.tick(S, &[]);
        assert!(o.new_marks.is_empty());
        assert!(s.marked().is_empty());
        assert_eq!(o.would_mark.len(), 2, "within the budget of 2");
        let holds: Vec<&str> = ids[..3]
            .iter()
            .map(|id| s.fleet[id].phx.held.as_deref().unwrap())
            .collect();
        assert_eq!(
            holds
                .iter()
                .filter(|h| **h == "log-only: would be marked")
                .count(),
            2
        );
        assert_eq!(holds.iter().filter(|h| h.starts_with("budget")).count(), 1);
    }

    #[test]
    fn a_mark_is_withdrawn_only_on_a_healthy_report_after_it() {
        let mut s = Sim::new(quick());
        let ids = s.add("web", 10);
        let a = ids[0].as_str();
        s.tick(3 * S, &[]);
        s.tick(3 * S, &[a]);
        assert_eq!(s.state(a), State::Marked);
        // The collector restarts: silence counts from its start, the silent rule stops
        // firing, but no report came: the mark stays.
        s.now += S;
        let watch = Watch {
            since_mono: s.now,
            late_ms: 0,
        };
        evaluate(&mut s.fleet, &mut s.q, &s.rules, n(s.now), watch);
        assert!(s.fleet[a].phx.problem.is_none());
        assert_eq!(s.state(a), State::Marked);
        // A report after the mark, and healthy: withdrawn.
        s.tick(S, &[]);
        assert_eq!(s.state(a), State::Healthy);
        assert!(s.fleet[a].phx.mark.is_none());
    }

    #[test]
    fn grace_holds_everything_but_drift_and_not_ready_instances_count_against_the_budget() {
        let mut s = Sim::new(Rules {
            grace: Duration::from_secs(300),
            ..quick()
        });
        let ids = s.add("web", 10);
        s.fail_check(&ids[0]);
        s.tick(10 * S, &[&ids[1]]);
        assert!(s.marked().is_empty());
        assert_eq!(s.state(&ids[1]), State::New);
        s.drift(&ids[2], "/etc/x");
        assert!(s.tick(S, &[&ids[1]]).new_marks.is_empty());
        assert_eq!(
            s.fleet[&ids[2]].phx.held.as_deref(),
            Some("budget: 8 of at most 1 in group web in disruption for drift (0 marked, 0 acked, 8 not ready)"),
            "the other eight are not ready yet (the ninth fell silent young: no member)"
        );
        assert_eq!(s.q.budget["web"].not_ready, 9);
        // Grace over: the drift (worst) takes the one slot; the failing check waits.
        let o = s.tick(300 * S, &[]);
        assert_eq!(o.new_marks, vec![ids[2].clone()]);
        assert!(s.fleet[&ids[0]]
            .phx
            .held
            .as_deref()
            .unwrap()
            .starts_with("budget: 1 of at most 1"));
        // A replacement comes up: in grace it holds the budget though the old one is gone.
        ack(&mut s.fleet, &ids[2], "r", s.now).unwrap();
        s.add_one("web", "i-web-new");
        s.tick(3 * S, &[&ids[2]]);
        let o = s.tick(3 * S, &[&ids[2]]);
        assert_eq!(s.state(&ids[2]), State::Gone);
        assert!(
            o.new_marks.is_empty(),
            "the new box is not ready: {:?}",
            s.q.budget["web"]
        );
        assert_eq!(s.q.budget["web"].not_ready, 1);
        let o = s.tick(300 * S, &[&ids[2]]);
        assert_eq!(
            o.new_marks,
            vec![ids[0].clone()],
            "ready: the next one goes: {:?} {:?}",
            s.q.budget["web"],
            s.fleet[&ids[0]].phx
        );
    }

    fn utc(y: i16, mo: i8, d: i8, h: i8, mi: i8) -> i64 {
        jiff::civil::date(y, mo, d)
            .at(h, mi, 0, 0)
            .to_zoned(jiff::tz::TimeZone::UTC)
            .unwrap()
            .timestamp()
            .as_millisecond()
    }

    #[test]
    fn per_reason_budgets_a_spent_drift_budget_does_not_stop_repair() {
        let mut s = Sim::new(Rules {
            budget: policy::Budgets::parse("drift=10%,unhealthy=50%").unwrap(),
            mass_event: 1.0,
            ..quick()
        });
        let ids = s.add("web", 10);
        s.tick(3 * S, &[]);
        for id in &ids {
            s.drift(id, "/etc/app.conf");
        }
        let o = s.tick(S, &[]);
        assert_eq!(o.new_marks.len(), 1, "10% of 10");
        let first = o.new_marks[0].clone();
        assert!(s.q.alerts.is_empty(), "--mass-event 100% never holds");
        s.tick(S, &[]);
        assert_eq!(s.marked(), vec![first.clone()]);
        // Three drifted boxes die: marked for silence, under the unhealthy budget (5).
        let dead: Vec<&str> = ids
            .iter()
            .filter(|i| **i != first)
            .take(3)
            .map(String::as_str)
            .collect();
        s.tick(2 * S, &dead);
        let o = s.tick(2 * S, &dead);
        let mut got = o.new_marks.clone();
        got.sort();
        assert_eq!(got, dead);
        for d in &dead {
            assert_eq!(
                s.fleet[*d].phx.mark.as_ref().unwrap().reason,
                Reason::Silent
            );
        }
        assert_eq!(s.marked().len(), 4, "1 drift + 3 silent");
        let held: Vec<&str> = ids
            .iter()
            .filter_map(|i| s.fleet[i].phx.held.as_deref())
            .collect();
        assert_eq!(held.len(), 6);
        assert!(
            held.iter().all(|h| h.starts_with("budget: 4 of at most 1")),
            "{held:?}"
        );
        // The unhealthy budget is spent at 5 in disruption: a fifth death is marked, a sixth held.
        let more = [dead[0], dead[1], dead[2], ids[8].as_str(), ids[9].as_str()];
        s.tick(2 * S, &more);
        s.tick(2 * S, &more);
        assert_eq!(s.marked().len(), 5);
        let h = s.fleet[&ids[9]]
            .phx
            .held
            .clone()
            .or(s.fleet[&ids[8]].phx.held.clone());
        let h = h.unwrap();
        assert!(
            h.starts_with("budget: 5 of at most 1 in group web in disruption for drift")
                && h.contains(" | budget: 5 of at most 5 in group web in disruption for silent"),
            "{h}"
        );
    }

    #[test]
    fn a_closed_window_holds_drift_not_silence_and_opens_on_time() {
        // Mon 2026-11-30 07:30 UTC is 08:30 in Berlin: the window opens in 30 minutes.
        let mut s = Sim::new(Rules {
            budget: policy::Budgets::share(0.5),
            windows: policy::Windows::parse_all(&["Mon-Fri 09:00-17:00 Europe/Berlin"]).unwrap(),
            ..quick()
        });
        s.now = utc(2026, 11, 30, 7, 30);
        let ids = s.add("web", 10);
        s.tick(3 * S, &[]);
        s.drift(&ids[0], "/etc/x");
        s.tick(S, &[&ids[1]]);
        s.tick(2 * S, &[&ids[1]]);
        assert_eq!(
            s.marked(),
            vec![ids[1].clone()],
            "silence waits for no window"
        );
        let h = s.fleet[&ids[0]].phx.held.clone().unwrap();
        assert!(h.starts_with("window: outside every maintenance window (Mon-Fri 09:00-17:00 Europe/Berlin); opens in 29m"), "{h}");
        assert_eq!(s.state(&ids[0]), State::Drifted);
        s.tick(29 * 60 * S + 44 * S, &[&ids[1]]);
        assert!(s.fleet[&ids[0]].phx.mark.is_none(), "08:59:5x Berlin");
        let o = s.tick(10 * S, &[&ids[1]]);
        assert_eq!(o.new_marks, vec![ids[0].clone()], "09:00 Berlin");
        // Expiry is voluntary: it waits for the window too, and for the budget.
        let mut s = Sim::new(Rules {
            max_lifetime: Some(Duration::from_secs(60)),
            windows: policy::Windows::parse_all(&["Sat 00:00-24:00 UTC"]).unwrap(),
            ..quick()
        });
        s.now = utc(2026, 12, 4, 23, 0);
        let ids = s.add("web", 20);
        s.tick(120 * S, &[]);
        assert!(s.marked().is_empty());
        assert!(s.fleet[&ids[0]]
            .phx
            .held
            .as_deref()
            .unwrap()
            .starts_with("window"));
        let o = s.tick(3600 * S, &[]);
        assert_eq!(
            o.new_marks.len(),
            2,
            "Saturday: 10% of 20, no forceful expiry"
        );
    }

    #[test]
    fn a_protect_file_holds_drift_until_it_goes_but_not_failing_checks() {
        let mut s = Sim::new(Rules {
            budget: policy::Budgets::share(0.5),
            ..quick()
        });
        let ids = s.add("web", 10);
        s.tick(3 * S, &[]);
        for id in &ids[..2] {
            s.fleet.get_mut(id).unwrap().protected = true;
        }
        s.drift(&ids[0], "/etc/x");
        s.fail_check(&ids[1]);
        let o = s.tick(S, &[]);
        assert_eq!(o.new_marks, vec![ids[1].clone()], "involuntary: not held");
        assert_eq!(
            s.fleet[&ids[0]].phx.held.as_deref(),
            Some("protected: the instance's protect file is present (voluntary drift waits until it is removed)")
        );
        s.tick(S, &[]);
        assert!(s.fleet[&ids[0]].phx.mark.is_none());
        s.fleet.get_mut(&ids[0]).unwrap().protected = false;
        assert_eq!(s.tick(S, &[]).new_marks, vec![ids[0].clone()]);
    }
}
