//! What the collector knows about each instance: identity, last report, latest figures,
//! the (boot, seq) of the batches it took (to drop duplicates), and its place in the phoenix
//! queue. One lock over the instances; the queue's fleet-wide state has its own, always taken
//! after it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use phoenix_wire::{CheckResult, Identity, Report, Value};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::health::{Observed, Rules, Tracking};
use crate::lineproto::Writer;
use crate::queue::{self, Outcome, Phx, QueueState, State};

/// Sequence numbers taken, per boot; a few boots are kept because a spool filled before a
/// reboot is sent after it.
const BOOTS_KEPT: usize = 4;

/// A `phoenix_instance` point per instance at least this often, so Grafana's "last" is fresh.
pub const POINT_EVERY_MS: i64 = 30_000;

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Instance {
    pub identity: Identity,
    /// Unix ms of the first and the latest report taken.
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub interval_ms: u64,
    pub reports: u64,
    /// boot id → highest seq taken.
    pub seqs: BTreeMap<String, (u64, i64)>,
    /// Latest figures, for the fleet list and the health rules.
    pub cpu_used_percent: Option<f64>,
    pub mem_used_percent: Option<f64>,
    pub mem_available_percent: Option<f64>,
    pub disk_max_used_percent: Option<f64>,
    pub checks: Vec<CheckResult>,
    /// The latest drift verdict, if the agent watches files.
    #[serde(default)]
    pub drift: Option<DriftInfo>,
    /// What the health rules track between reports (check streaks, pegged since).
    #[serde(default)]
    pub tracking: Tracking,
    /// State, problem, mark.
    #[serde(default)]
    pub phx: Phx,
}

/// An instance's drift as the collector judged it.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct DriftInfo {
    pub hash: String,
    pub expected: Option<String>,
    /// Where `expected` came from: registered baseline, agent baseline or majority.
    pub source: Option<String>,
    pub drifted: bool,
    pub changes: Vec<phoenix_wire::FileChange>,
    pub note: Option<String>,
    /// Unix ns of the scan or event the agent reported.
    pub ts: i64,
    /// Unix ms when the collector first saw the current drifted state (None when clean).
    pub since_ms: Option<i64>,
}

#[derive(Debug)]
pub struct Fleet {
    pub instances: Mutex<HashMap<String, Instance>>,
    pub queue: Mutex<QueueState>,
    pub rules: Rules,
    /// Unix ms this collector started: silence is counted from then at the earliest.
    pub started_ms: i64,
    /// Woken when a report changes an instance's verdict, so the queue acts at once.
    pub wake: tokio::sync::Notify,
    dirty: AtomicBool,
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet::new(Rules::default(), 0)
    }
}

impl Fleet {
    pub fn new(rules: Rules, started_ms: i64) -> Fleet {
        Fleet {
            instances: Mutex::default(),
            queue: Mutex::default(),
            rules,
            started_ms,
            wake: tokio::sync::Notify::new(),
            dirty: AtomicBool::new(false),
        }
    }

    /// True when this (instance, boot, seq) or a later one from the same boot was already taken.
    pub fn is_duplicate(&self, id: &Identity, seq: u64) -> bool {
        let g = self.instances.lock().unwrap();
        g.get(&id.instance_id)
            .and_then(|i| i.seqs.get(&id.boot_id))
            .is_some_and(|(s, _)| seq <= *s)
    }

    /// Current drift hashes of every instance of `image` (for the majority rule).
    pub fn peer_hashes(&self, image: &str) -> Vec<String> {
        let g = self.instances.lock().unwrap();
        g.values()
            .filter(|i| i.identity.image_id == image && i.phx.state != State::Gone)
            .filter_map(|i| i.drift.as_ref().map(|d| d.hash.clone()))
            .collect()
    }

    /// Record a report whose points the store took.
    pub fn record(&self, r: &Report, drift: Option<DriftInfo>, now_ms: i64) {
        let mut g = self.instances.lock().unwrap();
        let inst = g
            .entry(r.agent.instance_id.clone())
            .or_insert_with(|| Instance {
                first_seen_ms: now_ms,
                ..Default::default()
            });
        if inst.phx.state == State::Gone {
            // The id reports again (rebooted, or reused): a new life, but the seqs still count.
            let seqs = std::mem::take(&mut inst.seqs);
            *inst = Instance {
                first_seen_ms: now_ms,
                seqs,
                ..Default::default()
            };
        }
        inst.identity = r.agent.clone();
        inst.last_seen_ms = now_ms;
        inst.interval_ms = r.interval_ms;
        inst.reports += 1;
        let e = inst
            .seqs
            .entry(r.agent.boot_id.clone())
            .or_insert((0, now_ms));
        *e = (e.0.max(r.seq), now_ms);
        while inst.seqs.len() > BOOTS_KEPT {
            let oldest = inst
                .seqs
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone())
                .unwrap();
            inst.seqs.remove(&oldest);
        }
        let f = |p: &phoenix_wire::Point, k: &str| match p.fields.get(k) {
            Some(Value::Float(v)) => Some(*v),
            Some(Value::Int(v)) => Some(*v as f64),
            _ => None,
        };
        let mut disk_worst: Option<(String, f64)> = None;
        let mut cpu = None;
        let mut mem_available = None;
        for p in &r.metrics {
            match p.m.as_str() {
                "cpu" if p.tags.get("cpu").map(String::as_str) == Some("cpu-total") => {
                    cpu = f(p, "usage_idle").map(|i| 100.0 - i);
                    inst.cpu_used_percent = cpu;
                }
                "mem" => {
                    inst.mem_used_percent = f(p, "used_percent");
                    mem_available = f(p, "available_percent");
                    inst.mem_available_percent = mem_available;
                }
                "disk" => {
                    if let Some(u) = f(p, "used_percent") {
                        if disk_worst.as_ref().is_none_or(|(_, m)| u > *m) {
                            disk_worst = Some((p.tags.get("path").cloned().unwrap_or_default(), u));
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some((_, u)) = &disk_worst {
            inst.disk_max_used_percent = Some(*u);
        }
        if !r.checks.is_empty() {
            inst.checks = r.checks.clone();
        }
        inst.tracking.observe(
            &Observed {
                checks: &r.checks,
                cpu_used_percent: cpu,
                mem_available_percent: mem_available,
                disk_worst,
            },
            &self.rules,
            now_ms,
        );
        if let Some(mut d) = drift {
            d.since_ms = match &inst.drift {
                _ if !d.drifted => None,
                Some(old) if old.drifted => old.since_ms,
                _ => Some(now_ms),
            };
            inst.drift = Some(d);
        }
        // Judge this instance now; the queue pass (which needs the whole group) runs at once
        // when the verdict moved, not only on the next tick.
        let f = crate::health::Facts {
            first_seen_ms: inst.first_seen_ms,
            last_seen_ms: inst.last_seen_ms,
            interval_ms: inst.interval_ms,
            boot_time: inst.identity.boot_time,
            tracking: &inst.tracking,
            drift: inst.drift.as_ref(),
            watch_since_ms: self.started_ms,
        };
        let v = crate::health::judge(&f, &self.rules, now_ms);
        let moved = v.worst().map(|p| p.reason) != inst.phx.problem.as_ref().map(|p| p.reason)
            || inst.phx.state == State::Suspect;
        drop(g);
        self.dirty.store(true, Ordering::Relaxed);
        if moved {
            self.wake.notify_one();
        }
    }

    /// One queue pass at `now_ms`.
    pub fn tick(&self, now_ms: i64) -> Outcome {
        let mut g = self.instances.lock().unwrap();
        let mut q = self.queue.lock().unwrap();
        let out = queue::evaluate(&mut g, &mut q, &self.rules, now_ms, self.started_ms);
        if !out.changed.is_empty()
            || !out.forgotten.is_empty()
            || !out.alerts_raised.is_empty()
            || !out.alerts_cleared.is_empty()
        {
            self.dirty.store(true, Ordering::Relaxed);
        }
        out
    }

    /// The recycler took `id`: Ok(true) acked now, Ok(false) acked before, Err(()) not marked.
    #[allow(clippy::result_unit_err)] // replaced by the fleet core's typed errors
    pub fn ack(&self, id: &str, by: &str, now_ms: i64) -> Result<bool, ()> {
        let r = queue::ack(&mut self.instances.lock().unwrap(), id, by, now_ms);
        if r == Ok(true) {
            tracing::info!(instance_id = %id, by, "mark acked by the recycler");
            self.dirty.store(true, Ordering::Relaxed);
        }
        r
    }

    /// Whether anything changed since the last [`Fleet::take_dirty`].
    pub fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::Relaxed)
    }

    pub fn snapshot(&self, now_ms: i64) -> crate::store::Snapshot {
        let g = self.instances.lock().unwrap();
        let q = self.queue.lock().unwrap();
        crate::store::Snapshot {
            version: crate::store::VERSION,
            saved_ms: now_ms,
            instances: g.values().cloned().collect(),
            queue: q.clone(),
        }
    }

    pub fn restore(&self, s: crate::store::Snapshot) {
        let mut g = self.instances.lock().unwrap();
        let mut q = self.queue.lock().unwrap();
        *g = s
            .instances
            .into_iter()
            .map(|i| (i.identity.instance_id.clone(), i))
            .collect();
        *q = s.queue;
    }

    /// `phoenix_instance` points for instances whose state changed or whose last point is
    /// older than [`POINT_EVERY_MS`]; the ids written, to retry if the store refuses them.
    pub fn due_points(&self, now_ms: i64, w: &mut Writer) -> Vec<String> {
        let mut g = self.instances.lock().unwrap();
        let mut ids = Vec::new();
        let ts = now_ms.saturating_mul(1_000_000);
        for (id, i) in g.iter_mut() {
            let due = i.phx.last_point_ms == 0
                || (now_ms - i.phx.last_point_ms >= POINT_EVERY_MS && i.phx.state != State::Gone);
            if !due {
                continue;
            }
            instance_point(i, ts, w);
            i.phx.last_point_ms = now_ms;
            ids.push(id.clone());
        }
        ids
    }

    /// The store did not take these instances' points: write them again next pass.
    pub fn points_failed(&self, ids: &[String]) {
        let mut g = self.instances.lock().unwrap();
        for id in ids {
            if let Some(i) = g.get_mut(id) {
                i.phx.last_point_ms = 0;
            }
        }
    }

    /// `GET /v1/phoenix`.
    pub fn phoenix_view(&self, now_ms: i64) -> serde_json::Value {
        let g = self.instances.lock().unwrap();
        let q = self.queue.lock().unwrap();
        let mut marked = Vec::new();
        let mut held = Vec::new();
        let mut gone = Vec::new();
        for i in g.values() {
            let base = || {
                json!({
                    "instance_id": i.identity.instance_id,
                    "image_id": i.identity.image_id,
                    "group": queue::group_of(i),
                    "host": i.identity.hostname,
                    "state": i.phx.state.as_str(),
                    "last_seen_ms": i.last_seen_ms,
                })
            };
            match (&i.phx.mark, &i.phx.problem, &i.phx.held) {
                (Some(m), _, _) => {
                    let mut v = base();
                    v["reason"] = json!(m.reason.as_str());
                    v["evidence"] = json!(m.evidence);
                    v["since"] = json!(m.since_ms);
                    v["acked_ms"] = json!(m.acked_ms);
                    if m.gone_ms.is_some() {
                        v["gone_ms"] = json!(m.gone_ms);
                        gone.push(v);
                    } else {
                        marked.push(v);
                    }
                }
                (None, Some(p), Some(h)) => {
                    let mut v = base();
                    v["reason"] = json!(p.reason.as_str());
                    v["evidence"] = json!(p.evidence);
                    v["since"] = json!(i.phx.problem_since_ms);
                    v["hold"] = json!(h);
                    held.push(v);
                }
                _ => {}
            }
        }
        let by_since = |a: &serde_json::Value, b: &serde_json::Value| {
            a["since"]
                .as_i64()
                .cmp(&b["since"].as_i64())
                .then(a["instance_id"].as_str().cmp(&b["instance_id"].as_str()))
        };
        marked.sort_by(by_since);
        held.sort_by(by_since);
        gone.sort_by(by_since);
        let marks_last_minute = q
            .recent_marks
            .iter()
            .filter(|t| now_ms - **t < 60_000)
            .count();
        let groups: Vec<serde_json::Value> = q
            .budget
            .iter()
            .map(|(name, b)| json!({"group": name, "size": b.size, "allowed": b.allowed, "marked": b.marked, "acked": b.acked, "bad": b.bad, "free": b.allowed.saturating_sub(b.marked + b.acked)}))
            .collect();
        json!({
            "marked": marked,
            "held": held,
            "gone": gone,
            "alerts": q.alerts.values().collect::<Vec<_>>(),
            "log_only": self.rules.log_only,
            "budget": {
                "share": self.rules.budget,
                "rate_per_min": self.rules.mark_rate_per_min,
                "marks_last_minute": marks_last_minute,
                "mass_event": self.rules.mass_event,
                "groups": groups,
            },
        })
    }
}

/// `phoenix_instance`: state, reason and whether it is marked, for Grafana.
pub fn instance_point(i: &Instance, ts: i64, w: &mut Writer) {
    let a = &i.identity;
    let (reason, evidence) = match (&i.phx.mark, &i.phx.problem) {
        (Some(m), _) => (m.reason.as_str(), m.evidence.as_str()),
        (None, Some(p)) => (p.reason.as_str(), p.evidence.as_str()),
        (None, None) => ("", ""),
    };
    let marked = i.phx.mark.as_ref().is_some_and(|m| m.gone_ms.is_none());
    let mut pw = w.point("phoenix_instance");
    for (k, v) in [
        ("group", queue::group_of(i)),
        ("host", &a.hostname),
        ("image_id", &a.image_id),
        ("instance_id", &a.instance_id),
    ] {
        pw = pw.tag(k, v);
    }
    pw.str_field("state", i.phx.state.as_str())
        .str_field("reason", reason)
        .field("marked", &Value::Bool(marked))
        .str_field("evidence", evidence)
        .str_field("held", i.phx.held.as_deref().unwrap_or(""))
        .end(ts);
}

/// `phoenix_alert`: a mass event raised (active) or over.
pub fn alert_point(a: &queue::Alert, active: bool, ts: i64, w: &mut Writer) {
    w.point("phoenix_alert")
        .tag("group", &a.group)
        .field("active", &Value::Bool(active))
        .field("bad", &Value::Int(a.bad as i64))
        .field("size", &Value::Int(a.size as i64))
        .str_field("message", &a.message)
        .end(ts);
}

/// The body of a webhook for a new mark.
pub fn mark_event(i: &Instance) -> Option<serde_json::Value> {
    let m = i.phx.mark.as_ref()?;
    Some(json!({
        "event": "mark",
        "instance_id": i.identity.instance_id,
        "image_id": i.identity.image_id,
        "group": queue::group_of(i),
        "host": i.identity.hostname,
        "reason": m.reason.as_str(),
        "evidence": m.evidence,
        "since": m.since_ms,
        "state": i.phx.state.as_str(),
    }))
}

/// How often the queue runs without a report asking for it, and how often state is saved.
pub const TICK: std::time::Duration = std::time::Duration::from_secs(1);
pub const SAVE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The background task: queue passes (every [`TICK`], or at once when a report moved a
/// verdict), webhooks for new marks, `phoenix_instance`/`phoenix_alert` points, and saving
/// the fleet state. Returns when `stop` fires, after a last save.
pub async fn run(
    fleet: std::sync::Arc<Fleet>,
    writer: crate::writer::WriterHandle,
    hook: Option<crate::webhook::Webhook>,
    store: crate::store::Store,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::time::{sleep, Instant};
    let mut last_save = Instant::now();
    loop {
        tokio::select! {
            _ = sleep(TICK) => {},
            _ = fleet.wake.notified() => {},
            _ = stop.changed() => break,
        }
        let now = crate::api::now_ms();
        let out = fleet.tick(now);
        let mut w = Writer::default();
        let ts = now.saturating_mul(1_000_000);
        if !out.new_marks.is_empty() || !out.alerts_raised.is_empty() {
            if let Some(h) = &hook {
                let events: Vec<serde_json::Value> = {
                    let g = fleet.instances.lock().unwrap();
                    out.new_marks
                        .iter()
                        .filter_map(|id| g.get(id).and_then(mark_event))
                        .collect()
                };
                for e in &events {
                    h.send(e);
                }
                for a in &out.alerts_raised {
                    h.send(&json!({"event": "alert", "group": a.group, "bad": a.bad, "size": a.size, "reasons": a.reasons, "message": a.message, "since": a.since_ms}));
                }
            }
        }
        // The audit trail: what the collector itself decided, under its own name.
        {
            let entries: Vec<(&str, String, String)> = {
                let g = fleet.instances.lock().unwrap();
                let marks = out.new_marks.iter().filter_map(|id| {
                    g.get(id).and_then(|i| {
                        i.phx.mark.as_ref().map(|m| {
                            (
                                "mark",
                                id.clone(),
                                format!("{}: {}", m.reason.as_str(), m.evidence),
                            )
                        })
                    })
                });
                let holds = out.changed.iter().filter_map(|id| {
                    g.get(id)
                        .and_then(|i| i.phx.held.clone().map(|h| ("hold", id.clone(), h)))
                });
                marks.chain(holds).collect()
            };
            for (action, id, detail) in entries {
                crate::audit::record(&writer, action, "collector", &id, &detail);
            }
            for a in &out.alerts_raised {
                crate::audit::record(&writer, "hold", "collector", &a.group, &a.message);
            }
        }
        for a in &out.alerts_raised {
            alert_point(a, true, ts, &mut w);
        }
        for a in &out.alerts_cleared {
            alert_point(a, false, ts, &mut w);
        }
        let ids = fleet.due_points(now, &mut w);
        if w.lines > 0 {
            let (tx, rx) = tokio::sync::oneshot::channel();
            match writer.submit(crate::writer::Job {
                body: w.buf,
                ends: w.ends,
                reply: tx,
            }) {
                Ok(()) => {
                    let fleet = fleet.clone();
                    // Waiting here would stall the queue while InfluxDB is slow; failures
                    // just make the points due again.
                    tokio::spawn(async move {
                        if !matches!(rx.await, Ok(Ok(_))) {
                            fleet.points_failed(&ids);
                        }
                    });
                }
                Err((_, u)) => {
                    tracing::debug!(reason = %u.reason, "phoenix_instance points not written; retrying next pass");
                    fleet.points_failed(&ids);
                }
            }
        }
        if last_save.elapsed() >= SAVE_EVERY && fleet.take_dirty() {
            last_save = Instant::now();
            save(&fleet, &store).await;
        }
        // Many reports moving verdicts at once: one pass per 100 ms is plenty.
        sleep(std::time::Duration::from_millis(100)).await;
    }
    save(&fleet, &store).await;
}

/// Save a snapshot off the async threads; errors are logged (the next save retries).
pub async fn save(fleet: &std::sync::Arc<Fleet>, store: &crate::store::Store) {
    let snap = fleet.snapshot(crate::api::now_ms());
    let store = store.clone();
    match tokio::task::spawn_blocking(move || store.save(&snap)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(error = %e, "saving fleet state failed; retrying in a few seconds")
        }
        Err(e) => tracing::error!(error = %e, "saving fleet state panicked"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phoenix_wire::{CheckResult, Point, VERSION};
    use std::time::Duration;

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
        }
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
        let fleet = Fleet::new(rules, 0);
        let t0 = 1_700_000_000_000;
        let bad = || {
            vec![CheckResult {
                name: "web".into(),
                ok: false,
                detail: "HTTP 503".into(),
                duration_ms: 3,
            }]
        };
        for k in 0..10 {
            fleet.record(&report(&format!("i-{k}"), 1, vec![], 50.0), None, t0);
        }
        fleet.record(&report("i-0", 2, bad(), 97.5), None, t0 + 1000);
        fleet.record(&report("i-0", 3, bad(), 97.5), None, t0 + 2000);
        assert!(fleet.is_duplicate(&report("i-0", 3, vec![], 0.0).agent, 3));
        assert!(!fleet.is_duplicate(&report("i-0", 4, vec![], 0.0).agent, 4));
        let inst = fleet.instances.lock().unwrap()["i-0"].clone();
        assert_eq!(inst.tracking.disk_worst, Some(("/var".to_string(), 97.5)));
        for k in 1..10 {
            fleet.record(
                &report(
                    &format!("i-{k}"),
                    2,
                    vec![],
                    if k == 1 { 99.0 } else { 50.0 },
                ),
                None,
                t0 + 2000,
            );
        }
        let out = fleet.tick(t0 + 2000);
        assert_eq!(
            out.new_marks,
            vec!["i-0".to_string()],
            "the failed check goes before i-1's full disk"
        );
        let v = fleet.phoenix_view(t0 + 2000);
        assert_eq!(
            v["marked"][0]["evidence"],
            "check web failed 2 times in a row: HTTP 503"
        );
        assert_eq!(v["marked"][0]["group"], "web");
        // i-1's disk is full too, but the budget (1 of 10) is taken.
        assert_eq!(v["held"].as_array().unwrap().len(), 1);
        assert_eq!(v["held"][0]["reason"], "disk_full");
        assert_eq!(
            v["held"][0]["evidence"],
            "filesystem /var 99.0% full (limit 95%)"
        );
        assert_eq!(v["budget"]["groups"][0]["free"], 0);
        // Points: every instance is due once, then not until 30 s later.
        let mut w = Writer::default();
        assert_eq!(fleet.due_points(t0 + 2000, &mut w).len(), 10);
        let line = w
            .iter()
            .find(|l| l.contains("instance_id=i-0 "))
            .unwrap()
            .to_string();
        assert!(line.starts_with("phoenix_instance,group=web,host=h,image_id=img,instance_id=i-0 state=\"marked\",reason=\"check_failed\",marked=true"), "{line}");
        let mut w = Writer::default();
        assert!(fleet.due_points(t0 + 3000, &mut w).is_empty());
        fleet.points_failed(&["i-3".to_string()]);
        assert_eq!(fleet.due_points(t0 + 3000, &mut w), vec!["i-3".to_string()]);
        assert_eq!(
            fleet.due_points(t0 + 2000 + POINT_EVERY_MS, &mut w).len(),
            9
        );
        // Snapshot and restore keep marks, holds and seqs.
        assert_eq!(fleet.ack("i-0", "recycler#1", t0 + 4000), Ok(true));
        let snap = fleet.snapshot(t0 + 4000);
        let back = Fleet::new(fleet.rules.clone(), t0 + 10_000);
        back.restore(serde_json::from_slice(&serde_json::to_vec(&snap).unwrap()).unwrap());
        assert!(back.is_duplicate(&report("i-0", 3, vec![], 0.0).agent, 3));
        let a = back.instances.lock().unwrap()["i-0"].clone();
        assert_eq!(a.phx, fleet.instances.lock().unwrap()["i-0"].phx.clone());
        assert_eq!(a.phx.state, State::Acked);
    }
}
