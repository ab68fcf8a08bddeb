//! The queue driver: a thread of its own that runs the fleet's queue passes (every [`TICK`],
//! or at once when a report moved a verdict), sends webhooks for new marks and alerts, writes
//! the audit trail and the `phoenix_instance`/`phoenix_alert` points, and saves the fleet
//! state. It talks to the fleet only through its door ([`Fleet`]).
//!
//! A thread, not a task: under a flood of reports the async workers are busy, and a pass that
//! waits behind them would freeze every hold's countdown.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use phoenix_wire::Value;
use serde_json::json;

use crate::fleet::{Alert, Fleet, InstancePoint, MarkEvent};
use crate::lineproto::Writer;
use crate::webhook::Webhook;
use crate::writer::{Job, Unavailable, WriterHandle, Written};

/// How often the queue runs without a report asking for it, and how often state is saved.
pub const TICK: Duration = Duration::from_secs(1);
pub const SAVE_EVERY: Duration = Duration::from_secs(5);
/// Many reports moving verdicts at once: one pass per this is plenty.
const MIN_GAP: Duration = Duration::from_millis(100);

type Reply = tokio::sync::oneshot::Receiver<Result<Written, Unavailable>>;

/// The running driver; [`Decider::stop`] makes a last pass and a last save.
#[derive(Debug)]
pub struct Decider {
    stop: Arc<AtomicBool>,
    fleet: Arc<Fleet>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Decider {
    /// `rt` is the runtime whose tasks watch the outcome of the audit points (a write
    /// nobody waits for is skipped by the writer).
    pub fn start(
        fleet: Arc<Fleet>,
        writer: WriterHandle,
        hook: Option<Webhook>,
        rt: tokio::runtime::Handle,
    ) -> Decider {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (fleet, stop) = (fleet.clone(), stop.clone());
            std::thread::Builder::new()
                .name("phoenix-decider".into())
                .spawn(move || {
                    let _rt = rt.enter();
                    run(&fleet, &writer, hook.as_ref(), &stop)
                })
                .ok()
        };
        if thread.is_none() {
            tracing::error!("could not start the queue driver thread: nothing will be marked");
        }
        Decider {
            stop,
            fleet,
            thread,
        }
    }

    /// Stop after a last save; blocks until then (call it off the async threads).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.fleet.wake();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the queue driver thread panicked");
            }
        }
    }
}

fn run(fleet: &Fleet, writer: &WriterHandle, hook: Option<&Webhook>, stop: &AtomicBool) {
    let mut last_save = Instant::now();
    let mut pending: Vec<(Reply, Vec<String>)> = Vec::new();
    loop {
        fleet.wait_for_wake(TICK);
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let decided = once(fleet, writer, hook, &mut pending);
        // A pass that marked or alerted is saved at once: a shared store's next decider must
        // start from it (budgets hold across a takeover). Holds are not: a held instance's
        // reason counts down on every pass, and saving the whole fleet for each step (up to
        // ten passes a second under load) was most of the collector's CPU; a hold is worked
        // out again by every pass anyway.
        if (decided || last_save.elapsed() >= SAVE_EVERY) && fleet.take_dirty() {
            last_save = Instant::now();
            save(fleet);
        }
        std::thread::sleep(MIN_GAP);
    }
    save(fleet);
}

/// One pass and everything it leads to; true when it marked or alerted.
pub fn once(
    fleet: &Fleet,
    writer: &WriterHandle,
    hook: Option<&Webhook>,
    pending: &mut Vec<(Reply, Vec<String>)>,
) -> bool {
    // Points of earlier passes the store refused are due again.
    pending.retain_mut(|(rx, ids)| match rx.try_recv() {
        Ok(Ok(_)) => false,
        Err(tokio::sync::oneshot::error::TryRecvError::Empty) => true,
        _ => {
            fleet.points_failed(ids);
            false
        }
    });
    fleet.set_metrics_store(writer.unavailable().map(|u| (u.reason, u.retry_after)));
    let rep = fleet.pass();
    let decided =
        !rep.marks.is_empty() || !rep.alerts_raised.is_empty() || !rep.alerts_cleared.is_empty();
    if let Some(h) = hook {
        for m in &rep.marks {
            h.send(&mark_event(m));
        }
        for a in &rep.alerts_raised {
            h.send(&json!({"event": "alert", "group": a.group, "bad": a.bad, "size": a.size, "reasons": a.reasons, "message": a.message, "since_ms": a.since_ms, "since_at": crate::fleet::clock::rfc3339(a.since_ms)}));
        }
    }
    // The audit trail: what the collector itself decided, under its own name.
    for m in &rep.marks {
        let detail = format!("{}: {}", m.reason.as_str(), m.evidence);
        crate::audit::record(writer, "mark", "collector", &m.instance_id, &detail);
    }
    for (id, hold) in &rep.holds {
        crate::audit::record(writer, "hold", "collector", id, hold);
    }
    for a in &rep.alerts_raised {
        crate::audit::record(writer, "hold", "collector", &a.group, &a.message);
    }
    let ts = rep.at.wall_ms.saturating_mul(1_000_000);
    let mut w = Writer::default();
    for a in &rep.alerts_raised {
        alert_point(a, true, ts, &mut w);
    }
    for a in &rep.alerts_cleared {
        alert_point(a, false, ts, &mut w);
    }
    // One collector writes the `phoenix_instance` points: the one that decides.
    let due = if fleet.is_decider() {
        fleet.due_points()
    } else {
        Vec::new()
    };
    let ids: Vec<String> = due.iter().map(|p| p.instance_id.clone()).collect();
    for p in &due {
        instance_point(p, ts, &mut w);
    }
    if w.lines == 0 {
        return decided;
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    match writer.submit(Job {
        body: w.buf,
        ends: w.ends,
        reply: tx,
    }) {
        // Waiting here would stall the queue while InfluxDB is slow: the reply is looked
        // at on a later pass.
        Ok(()) => pending.push((rx, ids)),
        Err((_, u)) => {
            tracing::debug!(reason = %u.reason, "phoenix_instance points not written; retrying next pass");
            fleet.points_failed(&ids);
        }
    }
    decided
}

fn save(fleet: &Fleet) {
    if let Err(e) = fleet.save() {
        tracing::error!(error = %e, "saving fleet state failed; retrying in a few seconds");
    }
}

/// The body of a webhook for a new mark.
pub fn mark_event(m: &MarkEvent) -> serde_json::Value {
    json!({
        "event": "mark",
        "instance_id": m.instance_id,
        "image_id": m.image_id,
        "group": m.group,
        "host": m.host,
        "reason": m.reason.as_str(),
        "evidence": m.evidence,
        "since_ms": m.since,
        "since_at": crate::fleet::clock::rfc3339(m.since),
        "state": m.state.as_str(),
    })
}

/// `phoenix_instance`: state, reason and whether it is marked, for Grafana.
pub fn instance_point(p: &InstancePoint, ts: i64, w: &mut Writer) {
    let mut pw = w.point("phoenix_instance");
    for (k, v) in [
        ("group", &p.group),
        ("host", &p.host),
        ("image_id", &p.image_id),
        ("instance_id", &p.instance_id),
    ] {
        pw = pw.tag(k, v);
    }
    pw.str_field("state", p.state.as_str())
        .str_field("reason", p.reason)
        .field("marked", &Value::Bool(p.marked))
        .str_field("evidence", &p.evidence)
        .str_field("held", &p.held)
        .end(ts);
}

/// `phoenix_alert`: a mass event raised (active) or over.
pub fn alert_point(a: &Alert, active: bool, ts: i64, w: &mut Writer) {
    w.point("phoenix_alert")
        .tag("group", &a.group)
        .field("active", &Value::Bool(active))
        .field("bad", &Value::Int(a.bad.min(i64::MAX as usize) as i64))
        .field("size", &Value::Int(a.size.min(i64::MAX as usize) as i64))
        .str_field("message", &a.message)
        .end(ts);
}
