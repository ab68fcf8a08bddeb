//! The collector watching itself: report outcomes, the store writer's figures, fleet states
//! and marks, as Prometheus text on `GET /metrics` and as a `phoenix_collector` point every
//! [`EVERY`] through the normal writer. Also the last log lines of each instance, kept in
//! memory for the fleet page.
//!
//! Everything here is counters and small buffers updated on the request path: atomics, or a
//! short lock that never spans I/O.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use phoenix_wire::{LogLine, Value};

pub use crate::hist::{Histogram, HistogramSnap, LATENCY_BOUNDS};

use crate::fleet::{Fleet, FleetView, Reason, State as PhxState};
use crate::lineproto::Writer;
use crate::writer::{Job, WriterHandle};

/// How often the figures are written to the store as `phoenix_collector`.
pub const EVERY: Duration = Duration::from_secs(10);
/// Log lines kept per instance for the fleet page.
pub const LOG_LINES_KEPT: usize = 20;
/// Instances whose log lines are kept; past it the one quiet longest is dropped. Bounds memory
/// against agents that invent instance ids.
const LOG_INSTANCES_MAX: usize = 20_000;
/// Characters of one kept log line (the store has the whole line).
pub const LOG_CHARS_MAX: usize = 1000;

/// Why a report was not taken; `code` is the HTTP status it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Duplicate,
    BadRequest,
    Unauthorized,
    Forbidden,
    TooLarge,
    UnsupportedMedia,
    RateLimited,
    Unavailable,
    Other,
}

impl Rejection {
    pub const ALL: [Rejection; 9] = [
        Rejection::Duplicate,
        Rejection::BadRequest,
        Rejection::Unauthorized,
        Rejection::Forbidden,
        Rejection::TooLarge,
        Rejection::UnsupportedMedia,
        Rejection::RateLimited,
        Rejection::Unavailable,
        Rejection::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Duplicate => "duplicate",
            Rejection::BadRequest => "bad_request",
            Rejection::Unauthorized => "unauthorized",
            Rejection::Forbidden => "forbidden",
            Rejection::TooLarge => "too_large",
            Rejection::UnsupportedMedia => "unsupported_media",
            Rejection::RateLimited => "rate_limited",
            Rejection::Unavailable => "unavailable",
            Rejection::Other => "other",
        }
    }

    /// The status the agent saw (a duplicate is acked with 200 but not stored again).
    pub fn code(self) -> &'static str {
        match self {
            Rejection::Duplicate => "200",
            Rejection::BadRequest => "400",
            Rejection::Unauthorized => "401",
            Rejection::Forbidden => "403",
            Rejection::TooLarge => "413",
            Rejection::UnsupportedMedia => "415",
            Rejection::RateLimited => "429",
            Rejection::Unavailable => "503",
            Rejection::Other => "other",
        }
    }

    fn of_status(s: StatusCode) -> Rejection {
        match s.as_u16() {
            400 => Rejection::BadRequest,
            401 => Rejection::Unauthorized,
            403 => Rejection::Forbidden,
            413 => Rejection::TooLarge,
            415 => Rejection::UnsupportedMedia,
            429 => Rejection::RateLimited,
            503 => Rejection::Unavailable,
            _ => Rejection::Other,
        }
    }
}

/// Marks a report response as an ack of a duplicate (see [`duplicate`]).
#[derive(Clone, Copy)]
struct DuplicateAck;

/// Tag the ack of a batch that was already taken, so it counts as a duplicate, not as accepted.
pub fn duplicate(mut r: Response) -> Response {
    r.extensions_mut().insert(DuplicateAck);
    r
}

#[derive(Debug, Default)]
pub struct ReportCounters {
    accepted: AtomicU64,
    rejected: [AtomicU64; Rejection::ALL.len()],
}

impl ReportCounters {
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    pub fn rejected(&self, why: Rejection) -> u64 {
        self.rejected[Rejection::ALL
            .iter()
            .position(|r| *r == why)
            .expect("in ALL")]
        .load(Ordering::Relaxed)
    }

    pub fn count(&self, status: StatusCode, duplicate: bool) {
        if status.is_success() && !duplicate {
            self.accepted.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let why = if duplicate {
            Rejection::Duplicate
        } else {
            Rejection::of_status(status)
        };
        self.rejected[Rejection::ALL
            .iter()
            .position(|r| *r == why)
            .expect("in ALL")]
        .fetch_add(1, Ordering::Relaxed);
    }
}

/// One kept log line, cut to [`LOG_CHARS_MAX`].
#[derive(Debug, Clone, PartialEq)]
pub struct KeptLine {
    pub src: String,
    /// Unix ns the agent read it.
    pub ts: i64,
    pub msg: String,
    /// In the `\xNN` form of `phoenix_wire::logtext` (the raw line was not UTF-8).
    pub escaped: bool,
    /// Cut here or split by the agent: the store has the whole line.
    pub cut: bool,
}

/// The last [`LOG_LINES_KEPT`] log lines of each instance, within byte budgets: at most
/// [`LOG_BYTES_PER_INSTANCE`] per instance and [`LOG_BYTES_TOTAL`] in all (past it the
/// instances quiet longest are dropped), so invented ids or huge lines cannot grow it.
#[derive(Debug, Default)]
pub struct LogRing {
    inner: Mutex<LogRingInner>,
}

/// Bytes of kept lines per instance: the fleet page shows a glimpse, the store has the rest.
pub const LOG_BYTES_PER_INSTANCE: usize = 8 << 10;
/// Bytes of kept lines across all instances.
pub const LOG_BYTES_TOTAL: usize = 32 << 20;

#[derive(Debug, Default)]
struct LogRingInner {
    clock: u64,
    per: HashMap<String, Kept>,
    bytes: usize,
}

#[derive(Debug, Default)]
struct Kept {
    touched: u64,
    bytes: usize,
    q: VecDeque<KeptLine>,
}

/// What a kept line costs, roughly: its text plus the bookkeeping around it.
fn cost(l: &KeptLine) -> usize {
    l.msg.len() + l.src.len() + 64
}

impl LogRing {
    pub fn record(&self, instance_id: &str, lines: &[LogLine]) {
        // Later pieces of a split line add nothing readable to a 20-line view.
        let wanted: Vec<&LogLine> = lines
            .iter()
            .filter(|l| !matches!(l.part, Some(p) if p > 1))
            .collect();
        if wanted.is_empty() {
            return;
        }
        let take = &wanted[wanted.len().saturating_sub(LOG_LINES_KEPT)..];
        let mut g = self.inner.lock().unwrap();
        g.clock += 1;
        let clock = g.clock;
        if !g.per.contains_key(instance_id) && g.per.len() >= LOG_INSTANCES_MAX {
            g.drop_quietest(instance_id);
        }
        let mut added = 0usize;
        let mut freed = 0usize;
        {
            let k = g.per.entry(instance_id.to_owned()).or_default();
            k.touched = clock;
            for l in take {
                let cut = l.msg.chars().count() > LOG_CHARS_MAX;
                let msg = if cut {
                    l.msg.chars().take(LOG_CHARS_MAX).collect()
                } else {
                    l.msg.clone()
                };
                let line = KeptLine {
                    src: l.src.chars().take(LOG_CHARS_MAX).collect(),
                    ts: l.ts,
                    msg,
                    escaped: l.escaped,
                    cut: cut || l.part.is_some(),
                };
                let c = cost(&line);
                k.q.push_back(line);
                k.bytes += c;
                added += c;
                while k.q.len() > LOG_LINES_KEPT
                    || (k.bytes > LOG_BYTES_PER_INSTANCE && k.q.len() > 1)
                {
                    let old = k.q.pop_front().expect("more than one line");
                    let c = cost(&old);
                    k.bytes -= c;
                    freed += c;
                }
            }
        }
        g.bytes = (g.bytes + added).saturating_sub(freed);
        while g.bytes > LOG_BYTES_TOTAL && g.per.len() > 1 {
            g.drop_quietest(instance_id);
        }
    }

    /// Oldest first.
    pub fn lines(&self, instance_id: &str) -> Vec<KeptLine> {
        self.inner
            .lock()
            .unwrap()
            .per
            .get(instance_id)
            .map(|k| k.q.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn instances(&self) -> usize {
        self.inner.lock().unwrap().per.len()
    }

    /// Bytes of kept lines now (what the budgets bound).
    pub fn bytes(&self) -> usize {
        self.inner.lock().unwrap().bytes
    }
}

impl LogRingInner {
    /// Drop the instance quiet longest (never `keep`, the one being recorded).
    fn drop_quietest(&mut self, keep: &str) {
        let quiet = self
            .per
            .iter()
            .filter(|(k, _)| k.as_str() != keep)
            .min_by_key(|(_, v)| v.touched)
            .map(|(k, _)| k.clone());
        if let Some(q) = quiet {
            if let Some(k) = self.per.remove(&q) {
                self.bytes = self.bytes.saturating_sub(k.bytes);
            }
        }
    }
}

/// The collector's own figures that are not the writer's or the fleet's.
#[derive(Debug)]
pub struct Obs {
    pub reports: ReportCounters,
    /// Reports being handled now (read, decoded, written): the collector's own queue.
    pub in_flight: AtomicU64,
    pub logs: LogRing,
    /// Serving HTTPS: the page's cookie gets `Secure`.
    pub tls: bool,
    pub started_ms: i64,
    host: String,
}

impl Obs {
    pub fn new(tls: bool) -> Obs {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        Obs {
            reports: ReportCounters::default(),
            in_flight: AtomicU64::new(0),
            logs: LogRing::default(),
            tls,
            started_ms: crate::fleet::clock::wall_now_ms(),
            host,
        }
    }
}

impl Default for Obs {
    fn default() -> Self {
        Obs::new(false)
    }
}

/// Middleware on `POST /v1/reports`: count each answer by outcome.
pub async fn count_reports(State(obs): State<Arc<Obs>>, req: Request, next: Next) -> Response {
    /// Counts down however the handler ends (answered, or dropped with its connection).
    struct InFlight<'a>(&'a AtomicU64);
    impl Drop for InFlight<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
    obs.in_flight.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight(&obs.in_flight);
    let r = next.run(req).await;
    obs.reports
        .count(r.status(), r.extensions().get::<DuplicateAck>().is_some());
    r
}

const STATES: [PhxState; 8] = PhxState::ALL;
const REASONS: [Reason; Reason::ALL.len()] = Reason::ALL;

/// Every figure at one moment.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub reports_accepted: u64,
    pub reports_rejected: Vec<(Rejection, u64)>,
    pub points_written: u64,
    pub points_rejected: u64,
    pub writes: u64,
    pub write_errors: u64,
    pub write_splits: u64,
    pub write_latency: HistogramSnap,
    pub queue_depth: u64,
    pub queue_bytes: u64,
    pub store_up: bool,
    pub instances_by_state: [u64; STATES.len()],
    /// Standing marks (marked or acked, not gone), by reason.
    pub marks_by_reason: [u64; REASONS.len()],
    /// Bad instances whose mark is held (budget, rate, mass event, log-only), by reason.
    pub held_by_reason: [u64; REASONS.len()],
    pub alerts: u64,
    /// Per group: (marks allowed at once, marks in use).
    pub budget: Vec<(String, u64, u64)>,
    pub log_instances: u64,
    pub reports_in_flight: u64,
    /// How far behind the collector is (the silence allowance), ms.
    pub late_ms: u64,
    pub uptime_seconds: f64,
}

pub fn figures(obs: &Obs, writer: &WriterHandle, fleet: &FleetView, now_ms: i64) -> Figures {
    let st = &writer.stats;
    let c = &fleet.counts;
    Figures {
        reports_accepted: obs.reports.accepted(),
        reports_rejected: Rejection::ALL
            .iter()
            .map(|r| (*r, obs.reports.rejected(*r)))
            .collect(),
        points_written: st.points_written.load(Ordering::Relaxed),
        points_rejected: st.points_rejected.load(Ordering::Relaxed),
        writes: st.writes.load(Ordering::Relaxed),
        write_errors: st.write_errors.load(Ordering::Relaxed),
        write_splits: st.splits.load(Ordering::Relaxed),
        write_latency: st.write_latency.snapshot(),
        queue_depth: st.queue_depth.load(Ordering::Relaxed),
        queue_bytes: st.queue_bytes.load(Ordering::Relaxed),
        store_up: writer.unavailable().is_none(),
        log_instances: obs.logs.instances() as u64,
        reports_in_flight: obs.in_flight.load(Ordering::Relaxed),
        late_ms: fleet.queue.late_ms.max(0) as u64,
        uptime_seconds: (now_ms - obs.started_ms).max(0) as f64 / 1000.0,
        instances_by_state: c.by_state,
        marks_by_reason: c.marks_by_reason,
        held_by_reason: c.held_by_reason,
        alerts: c.alerts,
        budget: c.budget.clone(),
    }
}

/// A Prometheus label value: `\`, `"` and newline escaped.
pub fn label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Prometheus text format (version 0.0.4).
pub fn prometheus(f: &Figures) -> String {
    let mut o = String::with_capacity(8 << 10);
    fn head(o: &mut String, name: &str, kind: &str, help: &str) {
        writeln!(o, "# HELP {name} {help}").ok();
        writeln!(o, "# TYPE {name} {kind}").ok();
    }
    head(
        &mut o,
        "phoenix_collector_reports_accepted_total",
        "counter",
        "Reports whose points the store took.",
    );
    writeln!(
        o,
        "phoenix_collector_reports_accepted_total {}",
        f.reports_accepted
    )
    .ok();
    head(&mut o, "phoenix_collector_reports_rejected_total", "counter", "Reports not taken, by reason and the HTTP status the agent got (a duplicate is acked with 200 but not stored again).");
    for (r, n) in &f.reports_rejected {
        writeln!(
            o,
            "phoenix_collector_reports_rejected_total{{reason=\"{}\",code=\"{}\"}} {n}",
            r.as_str(),
            r.code()
        )
        .ok();
    }
    head(
        &mut o,
        "phoenix_collector_points_written_total",
        "counter",
        "Points (metrics, log lines, Phoenix's own) the store took.",
    );
    writeln!(
        o,
        "phoenix_collector_points_written_total {}",
        f.points_written
    )
    .ok();
    head(
        &mut o,
        "phoenix_collector_points_rejected_total",
        "counter",
        "Points the store refused for good (logged by the collector).",
    );
    writeln!(
        o,
        "phoenix_collector_points_rejected_total {}",
        f.points_rejected
    )
    .ok();
    head(
        &mut o,
        "phoenix_collector_store_writes_total",
        "counter",
        "Write requests sent to the store.",
    );
    writeln!(o, "phoenix_collector_store_writes_total {}", f.writes).ok();
    head(
        &mut o,
        "phoenix_collector_store_write_errors_total",
        "counter",
        "Writes that left the store unavailable (unreachable, 5xx, refused credentials).",
    );
    writeln!(
        o,
        "phoenix_collector_store_write_errors_total {}",
        f.write_errors
    )
    .ok();
    head(
        &mut o,
        "phoenix_collector_store_write_splits_total",
        "counter",
        "Batches split in two after the store answered 413.",
    );
    writeln!(
        o,
        "phoenix_collector_store_write_splits_total {}",
        f.write_splits
    )
    .ok();
    head(
        &mut o,
        "phoenix_collector_store_write_duration_seconds",
        "histogram",
        "Time one write request to the store took.",
    );
    for (i, c) in f.write_latency.cumulative.iter().enumerate() {
        match LATENCY_BOUNDS.get(i) {
            Some(b) => {
                writeln!(
                    o,
                    "phoenix_collector_store_write_duration_seconds_bucket{{le=\"{b}\"}} {c}"
                )
                .ok();
            }
            None => {
                writeln!(
                    o,
                    "phoenix_collector_store_write_duration_seconds_bucket{{le=\"+Inf\"}} {c}"
                )
                .ok();
            }
        }
    }
    writeln!(
        o,
        "phoenix_collector_store_write_duration_seconds_sum {}",
        f.write_latency.sum_seconds
    )
    .ok();
    writeln!(
        o,
        "phoenix_collector_store_write_duration_seconds_count {}",
        f.write_latency.count
    )
    .ok();
    head(
        &mut o,
        "phoenix_collector_store_up",
        "gauge",
        "1 while the store takes writes, 0 while reports get 503.",
    );
    writeln!(o, "phoenix_collector_store_up {}", u8::from(f.store_up)).ok();
    head(
        &mut o,
        "phoenix_collector_write_queue_depth",
        "gauge",
        "Batches waiting for a store writer.",
    );
    writeln!(o, "phoenix_collector_write_queue_depth {}", f.queue_depth).ok();
    head(
        &mut o,
        "phoenix_collector_write_queue_bytes",
        "gauge",
        "Bytes of line protocol in those batches (--max-write-queue).",
    );
    writeln!(o, "phoenix_collector_write_queue_bytes {}", f.queue_bytes).ok();
    head(
        &mut o,
        "phoenix_collector_instances",
        "gauge",
        "Instances known to the collector, by phoenix state.",
    );
    for (s, n) in STATES.iter().zip(f.instances_by_state) {
        writeln!(
            o,
            "phoenix_collector_instances{{state=\"{}\"}} {n}",
            s.as_str()
        )
        .ok();
    }
    head(
        &mut o,
        "phoenix_collector_marks",
        "gauge",
        "Standing marks for replacement (marked or acked, not yet gone), by reason.",
    );
    for (r, n) in REASONS.iter().zip(f.marks_by_reason) {
        writeln!(
            o,
            "phoenix_collector_marks{{reason=\"{}\"}} {n}",
            r.as_str()
        )
        .ok();
    }
    head(&mut o, "phoenix_collector_held_marks", "gauge", "Bad instances not marked because of the budget, the rate limit, a mass event or --log-only, by reason.");
    for (r, n) in REASONS.iter().zip(f.held_by_reason) {
        writeln!(
            o,
            "phoenix_collector_held_marks{{reason=\"{}\"}} {n}",
            r.as_str()
        )
        .ok();
    }
    head(
        &mut o,
        "phoenix_collector_mass_event_alerts",
        "gauge",
        "Groups with an active mass-event alert (their marks are held).",
    );
    writeln!(o, "phoenix_collector_mass_event_alerts {}", f.alerts).ok();
    head(
        &mut o,
        "phoenix_collector_budget_allowed",
        "gauge",
        "Marks allowed at once in a group (--budget).",
    );
    for (g, allowed, _) in &f.budget {
        writeln!(
            o,
            "phoenix_collector_budget_allowed{{group=\"{}\"}} {allowed}",
            label_value(g)
        )
        .ok();
    }
    head(
        &mut o,
        "phoenix_collector_budget_in_use",
        "gauge",
        "Marked or acked instances in a group, counted against its budget.",
    );
    for (g, _, used) in &f.budget {
        writeln!(
            o,
            "phoenix_collector_budget_in_use{{group=\"{}\"}} {used}",
            label_value(g)
        )
        .ok();
    }
    head(
        &mut o,
        "phoenix_collector_log_buffer_instances",
        "gauge",
        "Instances whose last log lines the fleet page keeps in memory.",
    );
    writeln!(
        o,
        "phoenix_collector_log_buffer_instances {}",
        f.log_instances
    )
    .ok();
    head(
        &mut o,
        "phoenix_collector_reports_in_flight",
        "gauge",
        "Reports being read, decoded or written right now.",
    );
    writeln!(
        o,
        "phoenix_collector_reports_in_flight {}",
        f.reports_in_flight
    )
    .ok();
    head(
        &mut o,
        "phoenix_collector_lateness_seconds",
        "gauge",
        "How long reports waited inside the collector lately; added to every silence threshold.",
    );
    writeln!(
        o,
        "phoenix_collector_lateness_seconds {}",
        f.late_ms as f64 / 1000.0
    )
    .ok();
    head(
        &mut o,
        "phoenix_collector_uptime_seconds",
        "gauge",
        "Seconds since this collector started.",
    );
    writeln!(o, "phoenix_collector_uptime_seconds {}", f.uptime_seconds).ok();
    o
}

/// The `phoenix_collector` point: cumulative counters as integers (like Telegraf's internal
/// plugin, so `non_negative_derivative` gives rates), gauges, and the write latency of the
/// last interval (`before` is the histogram at the previous point).
pub fn point(f: &Figures, before: &HistogramSnap, host: &str, ts_ns: i64, w: &mut Writer) {
    let int = |n: u64| Value::Int(n.min(i64::MAX as u64) as i64);
    let mut p = w.point("phoenix_collector");
    if !host.is_empty() {
        p = p.tag("host", host);
    }
    p = p.field("reports_accepted", &int(f.reports_accepted));
    for (r, n) in &f.reports_rejected {
        p = p.field(&format!("reports_rejected_{}", r.as_str()), &int(*n));
    }
    p = p
        .field("points_written", &int(f.points_written))
        .field("points_rejected", &int(f.points_rejected))
        .field("store_writes", &int(f.writes))
        .field("store_write_errors", &int(f.write_errors))
        .field("store_up", &Value::Bool(f.store_up))
        .field("write_queue_depth", &int(f.queue_depth));
    let n = f.write_latency.count.saturating_sub(before.count);
    if n > 0 {
        let mean = (f.write_latency.sum_seconds - before.sum_seconds).max(0.0) / n as f64;
        p = p.field("store_write_ms_mean", &Value::Float(mean * 1000.0));
        if let Some(b) = f.write_latency.quantile_bound_since(before, 0.99) {
            p = p.field("store_write_ms_p99_bound", &Value::Float(b * 1000.0));
        }
    }
    for (s, n) in STATES.iter().zip(f.instances_by_state) {
        p = p.field(&format!("instances_{}", s.as_str()), &int(n));
    }
    for (r, n) in REASONS.iter().zip(f.marks_by_reason) {
        p = p.field(&format!("marks_{}", r.as_str()), &int(n));
    }
    for (r, n) in REASONS.iter().zip(f.held_by_reason) {
        p = p.field(&format!("held_{}", r.as_str()), &int(n));
    }
    p.field("mass_event_alerts", &int(f.alerts))
        .field("reports_in_flight", &int(f.reports_in_flight))
        .field("lateness_ms", &int(f.late_ms))
        .field("uptime_seconds", &Value::Float(f.uptime_seconds))
        .end(ts_ns);
}

/// Write a `phoenix_collector` point every [`EVERY`] until the runtime stops. A point the
/// store does not take is dropped: the next one carries the same cumulative counters.
pub async fn run(obs: Arc<Obs>, fleet: Arc<Fleet>, writer: WriterHandle) {
    let mut before = writer.stats.write_latency.snapshot();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = fleet.clock().wall_ms();
        let f = figures(&obs, &writer, &fleet.queue_view(), now);
        let mut w = Writer::default();
        point(
            &f,
            &before,
            &obs.host,
            now.saturating_mul(1_000_000),
            &mut w,
        );
        before = f.write_latency.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        match writer.submit(Job {
            body: w.buf,
            ends: w.ends,
            reply: tx,
        }) {
            Ok(()) => {
                tokio::spawn(async move {
                    if let Ok(Err(u)) = rx.await {
                        tracing::debug!(reason = %u.reason, "phoenix_collector point not stored");
                    }
                });
            }
            Err((_, u)) => {
                tracing::debug!(reason = %u.reason, "phoenix_collector point not stored")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(src: &str, msg: &str, part: Option<u32>) -> LogLine {
        LogLine {
            src: src.into(),
            ts: 1,
            offset: 0,
            msg: msg.into(),
            escaped: false,
            part,
            tags: Default::default(),
            fields: Default::default(),
        }
    }

    #[test]
    fn ring_keeps_the_last_lines_cut_and_bounded() {
        let ring = LogRing::default();
        // Byte budgets: 2 KiB lines from many invented ids stay within the total.
        let big: Vec<LogLine> = (0..20)
            .map(|k| line("/var/log/a", &format!("{k} {}", "x".repeat(2048)), None))
            .collect();
        for i in 0..6000 {
            ring.record(&format!("i-{i}"), &big);
        }
        assert!(ring.bytes() <= LOG_BYTES_TOTAL, "{}", ring.bytes());
        assert!(ring.lines("i-5999").len() <= 8);
        assert!(!ring.lines("i-5999").is_empty());
        let ring = LogRing::default();
        let batch: Vec<LogLine> = (0..15)
            .map(|k| line("/var/log/a", &format!("line {k}"), None))
            .collect();
        ring.record("i-1", &batch);
        let more: Vec<LogLine> = (15..30)
            .map(|k| line("/var/log/a", &format!("line {k}"), None))
            .collect();
        ring.record("i-1", &more);
        let got = ring.lines("i-1");
        assert_eq!(got.len(), LOG_LINES_KEPT);
        assert_eq!(got.first().unwrap().msg, "line 10");
        assert_eq!(got.last().unwrap().msg, "line 29");
        // A long line is cut at a character boundary; later pieces of a split line are skipped.
        let long = "é".repeat(LOG_CHARS_MAX + 5);
        ring.record(
            "i-2",
            &[
                line("journal", &long, Some(1)),
                line("journal", "tail piece", Some(2)),
            ],
        );
        let got = ring.lines("i-2");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].msg.chars().count(), LOG_CHARS_MAX);
        assert!(got[0].cut);
        assert!(ring.lines("nobody").is_empty());
    }

    #[test]
    fn ring_drops_the_quietest_instance_past_its_bound() {
        let ring = LogRing::default();
        for k in 0..LOG_INSTANCES_MAX {
            ring.record(&format!("i-{k}"), &[line("a", "x", None)]);
        }
        ring.record("i-0", &[line("a", "y", None)]);
        ring.record("i-new", &[line("a", "z", None)]);
        assert_eq!(ring.instances(), LOG_INSTANCES_MAX);
        assert!(ring.lines("i-1").is_empty(), "i-1 was the quietest");
        assert_eq!(ring.lines("i-0").len(), 2);
    }

    #[test]
    fn histogram_buckets_and_quantile_bound() {
        let h = Histogram::default();
        let before = h.snapshot();
        for _ in 0..98 {
            h.observe_ns(2_000_000); // 2 ms
        }
        h.observe_ns(300_000_000); // 300 ms
        h.observe_ns(20_000_000_000); // 20 s: +Inf
        let s = h.snapshot();
        assert_eq!(s.count, 100);
        assert_eq!(s.cumulative[0], 0);
        assert_eq!(s.cumulative[1], 98, "2 ms goes under le=0.0025");
        assert_eq!(s.cumulative[8], 99, "300 ms under le=0.5");
        assert_eq!(*s.cumulative.last().unwrap(), 100);
        assert!((s.sum_seconds - (0.196 + 0.3 + 20.0)).abs() < 1e-9);
        assert_eq!(s.quantile_bound_since(&before, 0.5), Some(0.0025));
        assert_eq!(s.quantile_bound_since(&before, 0.99), Some(0.5));
        assert_eq!(s.quantile_bound_since(&s, 0.99), None);
    }

    #[test]
    fn report_outcomes_by_status() {
        let c = ReportCounters::default();
        c.count(StatusCode::OK, false);
        c.count(StatusCode::OK, true);
        c.count(StatusCode::PAYLOAD_TOO_LARGE, false);
        c.count(StatusCode::SERVICE_UNAVAILABLE, false);
        c.count(StatusCode::INTERNAL_SERVER_ERROR, false);
        assert_eq!(c.accepted(), 1);
        assert_eq!(c.rejected(Rejection::Duplicate), 1);
        assert_eq!(c.rejected(Rejection::TooLarge), 1);
        assert_eq!(c.rejected(Rejection::Unavailable), 1);
        assert_eq!(c.rejected(Rejection::Other), 1);
        assert_eq!(c.rejected(Rejection::BadRequest), 0);
    }

    #[test]
    fn exposition_escapes_labels_and_point_parses() {
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let f = Figures {
            budget: vec![("we\"b\ngroup".into(), 1, 0)],
            reports_rejected: Rejection::ALL.iter().map(|r| (*r, 0)).collect(),
            write_latency: Histogram::default().snapshot(),
            ..Default::default()
        };
        let text = prometheus(&f);
        assert!(
            text.contains("phoenix_collector_budget_allowed{group=\"we\\\"b\\ngroup\"} 1\n"),
            "{text}"
        );
        // Every sample line is one line: the hostile group name did not break out.
        assert!(
            text.lines()
                .all(|l| l.starts_with('#') || l.starts_with("phoenix_collector_")),
            "{text}"
        );
        let mut w = Writer::default();
        let h = Histogram::default();
        let before = h.snapshot();
        h.observe_ns(3_000_000);
        let f = Figures {
            write_latency: h.snapshot(),
            reports_rejected: Rejection::ALL.iter().map(|r| (*r, 2)).collect(),
            ..f
        };
        point(&f, &before, "collector 1", 5, &mut w);
        let lines: Vec<_> = influxdb_line_protocol::parse_lines(&w.buf)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].series.measurement.to_string(), "phoenix_collector");
        let field = |k: &str| {
            lines[0]
                .field_set
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        };
        assert_eq!(field("reports_rejected_duplicate").as_deref(), Some("2i"));
        assert_eq!(field("store_write_ms_mean").as_deref(), Some("3"));
        assert_eq!(field("instances_healthy").as_deref(), Some("0i"));
    }
}
