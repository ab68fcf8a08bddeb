//! What the collector knows about each instance: identity, liveness, latest figures, the
//! (boot, seq) windows of the batches whose effects it applied and whose points were stored,
//! and its place in the phoenix queue. Plain data and the one function that folds a report's
//! [`Observation`] in; locking is the door's business (the `Fleet` in mod.rs).

use std::collections::BTreeMap;
use std::sync::Arc;

use phoenix_wire::{CheckResult, Identity, Report, Value};
use serde::{Deserialize, Serialize};

use super::clock::Now;
use super::health::{DriftInfo, Observed, Problem, Reason, Rules, Tracking};

/// Boots whose seq windows are kept per instance: a spool filled before a reboot is sent
/// after it.
pub const BOOTS_KEPT: usize = 4;

/// Listening sockets kept per instance (the agent sends up to 1,000; the count says how many
/// there were).
pub const LISTEN_KEPT: usize = 256;
/// Longest SSH evidence kept, in bytes.
const SSH_EVIDENCE_KEPT: usize = 1024;
/// Samples of (CPU %, memory %) kept per instance for the page's sparklines: ten minutes at
/// the default 10 s interval, in 122 bytes.
pub const TREND_LEN: usize = 60;
/// Top processes kept per instance (the agent sends the top N by CPU and by RSS, N = 10 by
/// default, plus itself).
pub const TOP_KEPT: usize = 24;
/// Kernel log lines kept per instance, and the longest kept (bytes): at most about 5 KB.
pub const KERNEL_LINES_KEPT: usize = 20;
const KERNEL_LINE_BYTES: usize = 240;

/// Out-of-order seqs remembered above a window's floor. An agent keeps a few batches in
/// flight (4), so a seq this many stored batches behind the newest is no longer in flight.
pub const SEQ_WINDOW: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    #[default]
    New,
    Healthy,
    /// Three intervals without a report, not yet long enough to be unhealthy.
    Suspect,
    Unhealthy,
    Drifted,
    Marked,
    Acked,
    Gone,
}

impl State {
    pub const ALL: [State; 8] = [
        State::New,
        State::Healthy,
        State::Suspect,
        State::Unhealthy,
        State::Drifted,
        State::Marked,
        State::Acked,
        State::Gone,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::New => "new",
            State::Healthy => "healthy",
            State::Suspect => "suspect",
            State::Unhealthy => "unhealthy",
            State::Drifted => "drifted",
            State::Marked => "marked",
            State::Acked => "acked",
            State::Gone => "gone",
        }
    }

    /// Position in [`State::ALL`] (an exhaustive match: a new state fails to compile here).
    pub fn index(self) -> usize {
        match self {
            State::New => 0,
            State::Healthy => 1,
            State::Suspect => 2,
            State::Unhealthy => 3,
            State::Drifted => 4,
            State::Marked => 5,
            State::Acked => 6,
            State::Gone => 7,
        }
    }
}

/// A mark for replacement, from the moment it was made until the instance is forgotten.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mark {
    pub reason: Reason,
    pub evidence: String,
    /// Unix ms it was made (shown), and the monotonic reading then (decides).
    pub since_ms: i64,
    #[serde(default)]
    pub since_mono: i64,
    pub acked_ms: Option<i64>,
    /// Which recycler token acked it (its name, never its value).
    pub acked_by: Option<String>,
    pub gone_ms: Option<i64>,
}

/// The queue's view of one instance, kept in its fleet entry (and so persisted with it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Phx {
    pub state: State,
    /// The worst rule that fires now, and since when (that reason without a break): Unix ms
    /// to show, monotonic ms to measure settling with.
    pub problem: Option<Problem>,
    pub problem_since_ms: Option<i64>,
    #[serde(default)]
    pub problem_since_mono: Option<i64>,
    pub mark: Option<Mark>,
    /// Why a bad instance is not marked: mass event, budget, rate limit or log-only.
    pub held: Option<String>,
    /// Unix ms of the latest `phoenix_instance` point; 0: one is due.
    #[serde(skip)]
    pub last_point_ms: i64,
}

impl Phx {
    /// Moves the queue's monotonic readings by `by` ms (see [`Instance::shift_mono`]).
    pub fn shift_mono(&mut self, by: i64) {
        if let Some(t) = &mut self.problem_since_mono {
            *t = t.saturating_add(by);
        }
        if let Some(m) = &mut self.mark {
            m.since_mono = m.since_mono.saturating_add(by);
        }
    }
}

/// Seqs of one boot known to be in a set (applied, or stored): every seq at or below
/// `floor`, and the sorted seqs in `above`.
///
/// The floor only rises to a seq that was itself inserted: one step at a time while the next
/// seq is present, or to the smallest remembered seq when more than [`SEQ_WINDOW`] are
/// remembered above it. So a single report (seq 2^64−1, say) never moves it: it sits in
/// `above` until a thousand real batches pass it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqWindow {
    #[serde(default)]
    floor: Option<u64>,
    #[serde(default)]
    above: Vec<u64>,
}

impl SeqWindow {
    pub fn contains(&self, seq: u64) -> bool {
        self.floor.is_some_and(|f| seq <= f) || self.above.binary_search(&seq).is_ok()
    }

    pub fn insert(&mut self, seq: u64) {
        if self.contains(seq) {
            return;
        }
        if let Err(at) = self.above.binary_search(&seq) {
            self.above.insert(at, seq);
        }
        while self.above.len() > SEQ_WINDOW {
            let oldest = self.above.remove(0);
            self.floor = Some(self.floor.map_or(oldest, |f| f.max(oldest)));
        }
        while let (Some(f), Some(&next)) = (self.floor, self.above.first()) {
            if f.checked_add(1) != Some(next) {
                break;
            }
            self.floor = Some(next);
            self.above.remove(0);
        }
    }

    /// Everything at or below `floor` (a migrated high-water mark).
    pub fn up_to(floor: u64) -> SeqWindow {
        SeqWindow {
            floor: Some(floor),
            above: Vec::new(),
        }
    }

    /// Seqs remembered above the floor (for the memory bound's tests).
    pub fn remembered(&self) -> usize {
        self.above.len()
    }
}

/// The windows of one boot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BootSeqs {
    /// Batches whose fleet effects (figures, check streaks, drift) were applied: once each.
    pub applied: SeqWindow,
    /// Batches whose points the metrics store took: only these are answered "duplicate".
    pub stored: SeqWindow,
    /// Monotonic ms of the latest report of this boot (the oldest boot goes first).
    pub last_mono: i64,
    /// Seq of the drift state applied last. The agent keeps several batches in flight, so an
    /// older state can arrive after a newer one; it must not overwrite it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift_seq: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Instance {
    pub identity: Identity,
    /// Unix ms of the first and the latest report (shown).
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    /// Monotonic ms of the same (what the rules measure with).
    #[serde(default)]
    pub first_seen_mono: i64,
    #[serde(default)]
    pub last_seen_mono: i64,
    pub interval_ms: u64,
    pub reports: u64,
    /// boot id → the seq windows of that boot.
    #[serde(default)]
    pub boots: Boots,
    /// Latest figures, for the fleet list and the health rules.
    pub cpu_used_percent: Option<f64>,
    pub mem_used_percent: Option<f64>,
    pub mem_available_percent: Option<f64>,
    pub disk_max_used_percent: Option<f64>,
    /// Shared with the read snapshots, so publishing one copies no check or drift list.
    pub checks: Arc<Vec<CheckResult>>,
    /// The latest drift verdict, if the agent watches files.
    #[serde(default)]
    pub drift: Option<Arc<DriftInfo>>,
    /// What the health rules track between reports (check streaks, pegged since).
    #[serde(default)]
    pub tracking: Tracking,
    /// State, problem, mark.
    #[serde(default)]
    pub phx: Phx,
    /// The agent's protect file was present at its latest check: voluntary marks wait.
    #[serde(default)]
    pub protected: bool,
    /// The current listening set (from the agent's latest `phoenix_listen_set` and its
    /// `phoenix_listen` points), at most [`LISTEN_KEPT`].
    #[serde(default)]
    pub listening: Arc<ListenSet>,
    /// The page's view of the last reports, kept in memory only (not saved, not shared with
    /// other collectors: a restart or another collector starts them anew): CPU and memory
    /// samples, the top processes, the kernel's counters and latest lines.
    #[serde(skip)]
    pub trend: Trend,
    #[serde(skip)]
    pub top: Arc<TopProcs>,
    #[serde(skip)]
    pub kernel: Arc<KernelEvents>,
}

/// The latest [`TREND_LEN`] samples of CPU and memory use, whole percent, in a fixed ring.
#[derive(Clone, PartialEq, Eq)]
pub struct Trend {
    cpu: [u8; TREND_LEN],
    mem: [u8; TREND_LEN],
    /// Where the next sample goes, and how many are kept.
    next: u8,
    len: u8,
}

/// A sample the report did not carry.
const NO_SAMPLE: u8 = u8::MAX;

impl Default for Trend {
    fn default() -> Self {
        Trend {
            cpu: [NO_SAMPLE; TREND_LEN],
            mem: [NO_SAMPLE; TREND_LEN],
            next: 0,
            len: 0,
        }
    }
}

impl std::fmt::Debug for Trend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trend")
            .field("cpu", &self.cpu())
            .field("mem", &self.mem())
            .finish()
    }
}

impl Trend {
    pub fn push(&mut self, cpu: Option<f64>, mem: Option<f64>) {
        let whole = |v: Option<f64>| match v {
            Some(v) if v.is_finite() => v.clamp(0.0, 100.0).round() as u8,
            _ => NO_SAMPLE,
        };
        let k = usize::from(self.next);
        self.cpu[k] = whole(cpu);
        self.mem[k] = whole(mem);
        self.next = ((k + 1) % TREND_LEN) as u8;
        self.len = (usize::from(self.len) + 1).min(TREND_LEN) as u8;
    }

    fn series(&self, ring: &[u8; TREND_LEN]) -> Vec<Option<u8>> {
        let len = usize::from(self.len);
        let start = (usize::from(self.next) + TREND_LEN - len) % TREND_LEN;
        (0..len)
            .map(|k| Some(ring[(start + k) % TREND_LEN]).filter(|v| *v != NO_SAMPLE))
            .collect()
    }

    /// CPU use per sample, oldest first (None: that report carried no CPU figure).
    pub fn cpu(&self) -> Vec<Option<u8>> {
        self.series(&self.cpu)
    }

    /// Memory use per sample, oldest first.
    pub fn mem(&self) -> Vec<Option<u8>> {
        self.series(&self.mem)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The agent's latest `procstat` points: its top processes by CPU and by memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TopProcs {
    /// Highest CPU first; at most [`TOP_KEPT`].
    pub list: Vec<TopProc>,
    /// Unix ms of the report that carried them (0: none yet).
    pub at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopProc {
    pub name: String,
    pub user: String,
    pub pid: u32,
    /// Percent of one core over the agent's interval.
    pub cpu_usage: Option<f64>,
    pub memory_rss: Option<u64>,
    pub num_threads: Option<u64>,
    pub num_fds: Option<u64>,
}

/// Kernel events: the agent's `phoenix_kernel` counters and its latest kernel log lines.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KernelEvents {
    pub counts: Option<KernelCounts>,
    /// Oldest first; at most [`KERNEL_LINES_KEPT`], each cut to a few hundred bytes.
    pub lines: std::collections::VecDeque<KernelLog>,
}

/// `phoenix_kernel`: events counted this boot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelCounts {
    pub oom_kills: u64,
    pub segfaults: u64,
    pub hung_tasks: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelLog {
    /// Unix ns, as the agent stamped it.
    pub ts: i64,
    /// The `level` tag (err, warning, info …).
    pub level: String,
    pub msg: String,
}

/// The seq windows of an instance's latest boots (at most [`BOOTS_KEPT`]), by boot id. A
/// short list, not a `BTreeMap`: a map's first node holds room for eleven entries (about a
/// kilobyte here) where an instance has one boot. Saved as a JSON object, as the map was.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Boots(Vec<(String, BootSeqs)>);

impl Boots {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, boot_id: &str) -> Option<&BootSeqs> {
        self.0.iter().find(|(k, _)| k == boot_id).map(|(_, b)| b)
    }

    pub fn get_mut(&mut self, boot_id: &str) -> Option<&mut BootSeqs> {
        self.0
            .iter_mut()
            .find(|(k, _)| k == boot_id)
            .map(|(_, b)| b)
    }

    pub fn contains_key(&self, boot_id: &str) -> bool {
        self.get(boot_id).is_some()
    }

    pub fn insert(&mut self, boot_id: String, b: BootSeqs) -> Option<BootSeqs> {
        match self.get_mut(&boot_id) {
            Some(old) => Some(std::mem::replace(old, b)),
            None => {
                self.0.push((boot_id, b));
                None
            }
        }
    }

    pub fn remove(&mut self, boot_id: &str) -> Option<BootSeqs> {
        let k = self.0.iter().position(|(k, _)| k == boot_id)?;
        Some(self.0.swap_remove(k).1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &BootSeqs)> {
        self.0.iter().map(|(k, b)| (k, b))
    }

    pub fn values(&self) -> impl Iterator<Item = &BootSeqs> {
        self.0.iter().map(|(_, b)| b)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut BootSeqs> {
        self.0.iter_mut().map(|(_, b)| b)
    }

    /// The windows of `boot_id`, new and empty if it was not there.
    pub fn entry_or_default(&mut self, boot_id: &str) -> &mut BootSeqs {
        let k = match self.0.iter().position(|(k, _)| k == boot_id) {
            Some(k) => k,
            None => {
                self.0.push((boot_id.to_owned(), BootSeqs::default()));
                self.0.len() - 1
            }
        };
        &mut self.0[k].1
    }
}

impl Serialize for Boots {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, b)| (k, b)))
    }
}

impl<'de> Deserialize<'de> for Boots {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Boots, D::Error> {
        let m = BTreeMap::<String, BootSeqs>::deserialize(d)?;
        Ok(Boots(m.into_iter().collect()))
    }
}

/// What listens on an instance, as its agent last sent it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ListenSet {
    /// How many listeners the agent counted (may be more than `list` holds).
    pub count: u64,
    pub list: Vec<Listener>,
    /// Unix ms of the report that carried it.
    pub at_ms: i64,
}

/// One listening socket and the process that holds it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Listener {
    /// `tcp` or `udp`.
    pub proto: String,
    pub address: String,
    pub port: u16,
    pub process: Option<String>,
    pub pid: Option<u32>,
}

impl Instance {
    /// The queue's group: identity.group, else the image.
    pub fn group(&self) -> &str {
        self.identity.group_or_image()
    }

    pub fn is_gone(&self) -> bool {
        self.phx.mark.as_ref().is_some_and(|m| m.gone_ms.is_some())
    }

    /// Moves every monotonic reading by `by` ms (onto another process's clock: a restore,
    /// or a state written by another collector).
    pub fn shift_mono(&mut self, by: i64) {
        let mv = |t: &mut i64| *t = t.saturating_add(by);
        mv(&mut self.first_seen_mono);
        mv(&mut self.last_seen_mono);
        for b in self.boots.values_mut() {
            mv(&mut b.last_mono);
        }
        if let Some(t) = &mut self.tracking.pegged_since {
            mv(t);
        }
        self.phx.shift_mono(by);
    }

    fn boot(&mut self, boot_id: &str, now_mono: i64) -> &mut BootSeqs {
        if !self.boots.contains_key(boot_id) {
            while self.boots.len() >= BOOTS_KEPT {
                let Some(oldest) = self
                    .boots
                    .iter()
                    .min_by_key(|(_, b)| b.last_mono)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                self.boots.remove(&oldest);
            }
        }
        let b = self.boots.entry_or_default(boot_id);
        b.last_mono = b.last_mono.max(now_mono);
        b
    }
}

/// The latest figures of one report, as far as the fleet list and the rules care.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    pub cpu_used_percent: Option<f64>,
    pub mem_used_percent: Option<f64>,
    pub mem_available_percent: Option<f64>,
    /// The fullest filesystem: (path, used %).
    pub disk_worst: Option<(String, f64)>,
    /// `phoenix_ssh`: Some(Some(evidence)) found, Some(None) not found, None: not sent.
    #[serde(default)]
    pub ssh: Option<Option<String>>,
    /// The listening set, when the report carried one (`phoenix_listen_set`).
    #[serde(default)]
    pub listening: Option<ListenSet>,
    /// `phoenix_kernel`, when sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelCounts>,
    /// `procstat` points and kernel log lines, for the page of the collector that took the
    /// report: not shared with other collectors (a few KB a report through the fleet store
    /// for what only a person reading one instance looks at).
    #[serde(skip)]
    pub top: Option<Vec<TopProc>>,
    #[serde(skip)]
    pub kernel_lines: Vec<KernelLog>,
}

impl Figures {
    pub fn of(r: &Report) -> Figures {
        let f = |p: &phoenix_wire::Point, k: &str| match p.fields.get(k) {
            Some(Value::Float(v)) if v.is_finite() => Some(*v),
            Some(Value::Int(v)) => Some(*v as f64),
            _ => None,
        };
        let mut out = Figures::default();
        let mut listeners = Vec::new();
        for p in &r.metrics {
            match p.m.as_str() {
                "phoenix_ssh" => {
                    if let Some(Value::Bool(found)) = p.fields.get("found") {
                        let evidence = match p.fields.get("evidence") {
                            Some(Value::Str(e)) if !e.is_empty() => {
                                phoenix_wire::cut_to(e, SSH_EVIDENCE_KEPT)
                            }
                            _ => "SSH found (no evidence sent)".to_string(),
                        };
                        out.ssh = Some(found.then_some(evidence));
                    }
                }
                "phoenix_listen_set" => {
                    let count = match p.fields.get("count") {
                        Some(Value::Int(n)) => (*n).max(0) as u64,
                        _ => 0,
                    };
                    out.listening = Some(ListenSet {
                        count,
                        list: Vec::new(),
                        at_ms: 0,
                    });
                }
                "phoenix_listen" if listeners.len() < LISTEN_KEPT => {
                    let tag = |k: &str| p.tags.get(k).cloned();
                    let (Some(proto), Some(address), Some(port)) = (
                        tag("proto"),
                        tag("address"),
                        tag("port").and_then(|v| v.parse::<u16>().ok()),
                    ) else {
                        continue;
                    };
                    let pid = match p.fields.get("pid") {
                        Some(Value::Int(n)) => u32::try_from(*n).ok(),
                        _ => None,
                    };
                    listeners.push(Listener {
                        proto: phoenix_wire::cut_to(&proto, 16),
                        address: phoenix_wire::cut_to(&address, 128),
                        port,
                        process: tag("process_name").map(|n| phoenix_wire::cut_to(&n, 256)),
                        pid,
                    });
                }
                "phoenix_kernel" => {
                    let n = |k: &str| match p.fields.get(k) {
                        Some(Value::Int(v)) => (*v).max(0) as u64,
                        _ => 0,
                    };
                    out.kernel = Some(KernelCounts {
                        oom_kills: n("oom_kills"),
                        segfaults: n("segfaults"),
                        hung_tasks: n("hung_tasks"),
                    });
                }
                "procstat" => {
                    let top = out.top.get_or_insert_with(Vec::new);
                    let Some(Value::Int(pid)) = p.fields.get("pid") else {
                        continue;
                    };
                    let n = |k: &str| match p.fields.get(k) {
                        Some(Value::Int(v)) => u64::try_from(*v).ok(),
                        _ => None,
                    };
                    let tag = |k: &str| {
                        p.tags
                            .get(k)
                            .map(|v| phoenix_wire::cut_to(v, 64))
                            .unwrap_or_default()
                    };
                    top.push(TopProc {
                        name: tag("process_name"),
                        user: tag("user"),
                        pid: u32::try_from(*pid).unwrap_or(0),
                        cpu_usage: f(p, "cpu_usage"),
                        memory_rss: n("memory_rss"),
                        num_threads: n("num_threads"),
                        num_fds: n("num_fds"),
                    });
                }
                "cpu" if p.tags.get("cpu").map(String::as_str) == Some("cpu-total") => {
                    out.cpu_used_percent = f(p, "usage_idle").map(|i| 100.0 - i);
                }
                "mem" => {
                    out.mem_used_percent = f(p, "used_percent");
                    out.mem_available_percent = f(p, "available_percent");
                }
                "disk" => {
                    if let Some(u) = f(p, "used_percent") {
                        if out.disk_worst.as_ref().is_none_or(|(_, m)| u > *m) {
                            let path = p.tags.get("path").cloned().unwrap_or_default();
                            out.disk_worst = Some((path, u));
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(top) = &mut out.top {
            top.sort_by(|a, b| {
                let cpu = |p: &TopProc| p.cpu_usage.unwrap_or(0.0);
                cpu(b)
                    .total_cmp(&cpu(a))
                    .then(b.memory_rss.cmp(&a.memory_rss))
                    .then(a.pid.cmp(&b.pid))
            });
            top.truncate(TOP_KEPT);
        }
        // Kernel lines: from the kmsg source (`src=kernel`); only the newest few are kept.
        let kernel = r
            .logs
            .iter()
            .filter(|l| l.src == "kernel")
            .collect::<Vec<_>>();
        out.kernel_lines = kernel[kernel.len().saturating_sub(KERNEL_LINES_KEPT)..]
            .iter()
            .map(|l| KernelLog {
                ts: l.ts,
                level: phoenix_wire::cut_to(
                    l.tags.get("level").map(String::as_str).unwrap_or(""),
                    16,
                ),
                msg: phoenix_wire::cut_to(&l.msg, KERNEL_LINE_BYTES),
            })
            .collect();
        if let Some(set) = &mut out.listening {
            listeners.sort();
            listeners.dedup();
            set.count = set.count.max(listeners.len() as u64);
            set.list = listeners;
        }
        out
    }

    fn is_empty(&self) -> bool {
        *self == Figures::default()
    }
}

/// What one report tells the fleet, recorded by the collector that took it. Applying the
/// same (instance, boot, seq) twice only refreshes liveness: its figures, check results and
/// drift verdict count once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    pub identity: Identity,
    pub seq: u64,
    pub interval_ms: u64,
    /// When the report arrived (proof of life at that moment).
    pub at: Now,
    pub figures: Figures,
    pub checks: Vec<CheckResult>,
    /// The collector's verdict on the drift state the report carried, if any.
    pub drift: Option<DriftInfo>,
    /// The agent's current drift root (sent on every report by agents that watch files).
    pub drift_root: Option<String>,
    /// Whether the agent's protect file exists (None: this report did not look).
    #[serde(default)]
    pub protected: Option<bool>,
}

impl Observation {
    pub fn of(r: &Report, drift: Option<DriftInfo>, drift_root: Option<String>, at: Now) -> Self {
        Observation {
            identity: r.agent.clone(),
            seq: r.seq,
            interval_ms: r.interval_ms,
            at,
            figures: Figures::of(r),
            checks: r.checks.clone(),
            drift,
            drift_root,
            protected: r.protected,
        }
    }
}

/// What applying an observation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Applied {
    /// The instance was not known (or was gone and came back).
    pub new_life: bool,
    /// Its effects were applied now (false: this (boot, seq) was applied before).
    pub first_time: bool,
    /// The collector's drift record is missing or differs from the agent's root: the agent
    /// should send its full drift state with the next report.
    pub resend_drift: bool,
}

/// Fold `o` into `instances`.
pub fn apply(
    instances: &mut std::collections::HashMap<String, Instance>,
    o: &Observation,
    rules: &Rules,
) -> Applied {
    let mut out = Applied::default();
    let inst = instances
        .entry(o.identity.instance_id.clone())
        .or_insert_with(|| {
            out.new_life = true;
            Instance {
                first_seen_ms: o.at.wall_ms,
                first_seen_mono: o.at.mono_ms,
                ..Default::default()
            }
        });
    if inst.phx.state == State::Gone || inst.is_gone() {
        // The id reports again (rebooted, or reused): a new life. The seq windows still
        // count, and so does the drift verdict: a box that was drifted when it went away is
        // drifted when it comes back until it reports otherwise.
        let boots = std::mem::take(&mut inst.boots);
        let drift = inst.drift.take();
        *inst = Instance {
            first_seen_ms: o.at.wall_ms,
            first_seen_mono: o.at.mono_ms,
            boots,
            drift,
            ..Default::default()
        };
        out.new_life = true;
    }
    if inst.identity != o.identity {
        inst.identity = o.identity.clone();
    }
    // Liveness counts every time, retries included: a retry is a sign of life too.
    inst.last_seen_ms = inst.last_seen_ms.max(o.at.wall_ms);
    inst.last_seen_mono = inst.last_seen_mono.max(o.at.mono_ms);
    inst.interval_ms = o.interval_ms;
    let boot = inst.boot(&o.identity.boot_id, o.at.mono_ms);
    out.first_time = !boot.applied.contains(o.seq);
    if out.first_time {
        boot.applied.insert(o.seq);
        let newer_drift = o.drift.is_some() && boot.drift_seq.is_none_or(|s| s < o.seq);
        if newer_drift {
            boot.drift_seq = Some(o.seq);
        } else if o.drift.is_some() {
            tracing::debug!(instance_id = %o.identity.instance_id, seq = o.seq, "an older drift state arrived after a newer one; not applied");
        }
        apply_effects(inst, o, rules, newer_drift);
    }
    out.resend_drift = o
        .drift_root
        .as_deref()
        .is_some_and(|root| inst.drift.as_ref().map(|d| d.hash.as_str()) != Some(root));
    out
}

fn apply_effects(inst: &mut Instance, o: &Observation, rules: &Rules, drift_is_newer: bool) {
    inst.reports = inst.reports.saturating_add(1);
    let f = &o.figures;
    if !f.is_empty() {
        if f.cpu_used_percent.is_some() {
            inst.cpu_used_percent = f.cpu_used_percent;
        }
        if f.mem_used_percent.is_some() || f.mem_available_percent.is_some() {
            inst.mem_used_percent = f.mem_used_percent;
            inst.mem_available_percent = f.mem_available_percent;
        }
        if let Some((_, u)) = &f.disk_worst {
            inst.disk_max_used_percent = Some(*u);
        }
        if let Some(set) = &f.listening {
            let mut set = set.clone();
            set.at_ms = o.at.wall_ms;
            inst.listening = Arc::new(set);
        }
        if f.cpu_used_percent.is_some() || f.mem_used_percent.is_some() {
            inst.trend.push(f.cpu_used_percent, f.mem_used_percent);
        }
        if let Some(top) = &f.top {
            inst.top = Arc::new(TopProcs {
                list: top.clone(),
                at_ms: o.at.wall_ms,
            });
        }
        // Copied on write (the published view shares it): only when something is new.
        let counts_moved = f.kernel.is_some() && f.kernel != inst.kernel.counts;
        if counts_moved || !f.kernel_lines.is_empty() {
            let k = Arc::make_mut(&mut inst.kernel);
            if counts_moved {
                k.counts = f.kernel;
            }
            for l in &f.kernel_lines {
                if k.lines.len() >= KERNEL_LINES_KEPT {
                    k.lines.pop_front();
                }
                k.lines.push_back(l.clone());
            }
        }
    }
    if !o.checks.is_empty() {
        inst.checks = Arc::new(o.checks.clone());
    }
    if let Some(p) = o.protected {
        if p != inst.protected {
            tracing::info!(instance_id = %o.identity.instance_id, protected = p, "protect file {}", if p { "present: voluntary marks wait" } else { "removed" });
        }
        inst.protected = p;
    }
    inst.tracking.observe(
        &Observed {
            checks: &o.checks,
            cpu_used_percent: f.cpu_used_percent,
            mem_available_percent: f.mem_available_percent,
            disk_worst: f.disk_worst.clone(),
            ssh: f.ssh.clone(),
        },
        rules,
        o.at.mono_ms,
    );
    if let Some(d) = o.drift.as_ref().filter(|_| drift_is_newer) {
        let mut d = d.clone();
        d.since_ms = match &inst.drift {
            _ if !d.drifted => None,
            Some(old) if old.drifted => old.since_ms,
            _ => Some(o.at.wall_ms),
        };
        inst.drift = Some(Arc::new(d));
    }
}

/// The points of (instance, boot, seq) were stored: from now on it is a duplicate.
pub fn stored(
    instances: &mut std::collections::HashMap<String, Instance>,
    id: &Identity,
    seq: u64,
    now_mono: i64,
) {
    if let Some(i) = instances.get_mut(&id.instance_id) {
        let b = i.boot(&id.boot_id, now_mono);
        b.stored.insert(seq);
        b.applied.insert(seq);
    }
}

/// Whether the points of (instance, boot, seq) are known to be stored.
pub fn is_stored(
    instances: &std::collections::HashMap<String, Instance>,
    id: &Identity,
    seq: u64,
) -> bool {
    instances
        .get(&id.instance_id)
        .and_then(|i| i.boots.get(&id.boot_id))
        .is_some_and(|b| b.stored.contains(seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_drift_state_arriving_late_does_not_overwrite_a_newer_one() {
        let obs = |seq: u64, boot: &str, drifted: bool| Observation {
            identity: Identity {
                instance_id: "i-1".into(),
                boot_id: boot.into(),
                ..Default::default()
            },
            seq,
            interval_ms: 10_000,
            at: Now {
                wall_ms: 1_000 + seq as i64,
                mono_ms: 1_000 + seq as i64,
            },
            figures: Figures::default(),
            checks: vec![],
            drift: Some(DriftInfo {
                hash: if drifted { "new" } else { "base" }.into(),
                drifted,
                ..Default::default()
            }),
            drift_root: None,
            protected: None,
        };
        let rules = Rules::default();
        let mut m = std::collections::HashMap::new();
        let drifted = |m: &std::collections::HashMap<String, Instance>| {
            m["i-1"].drift.as_ref().map(|d| d.drifted)
        };
        // Sent as 4 (clean) then 5 (drifted); 5 arrives first.
        assert!(apply(&mut m, &obs(5, "b1", true), &rules).first_time);
        let late = apply(&mut m, &obs(4, "b1", false), &rules);
        assert!(late.first_time, "its other effects still count, once");
        assert_eq!(drifted(&m), Some(true), "the late, older state was ignored");
        // A newer state of the same boot applies, and so does any state of another boot.
        apply(&mut m, &obs(6, "b1", false), &rules);
        assert_eq!(drifted(&m), Some(false));
        apply(&mut m, &obs(1, "b2", true), &rules);
        assert_eq!(drifted(&m), Some(true));
        // The order survives a save and load of the state.
        let saved = serde_json::to_string(&m["i-1"]).unwrap();
        let mut back: Instance = serde_json::from_str(&saved).unwrap();
        assert_eq!(back.boot("b1", 0).drift_seq, Some(6));
    }

    #[test]
    fn boots_are_a_short_list_saved_as_a_map_oldest_out_first() {
        let mut i = Instance::default();
        for (k, t) in [("b0", 10), ("b1", 20), ("b2", 30), ("b3", 40)] {
            i.boot(k, t).applied.insert(1);
        }
        i.boot("b0", 50).stored.insert(7);
        i.boot("b4", 60);
        assert_eq!(i.boots.len(), BOOTS_KEPT);
        assert!(!i.boots.contains_key("b1"), "the least recent boot goes");
        assert!(i.boots.get("b0").unwrap().stored.contains(7));
        let json = serde_json::to_value(&i).unwrap();
        assert_eq!(json["boots"]["b0"]["last_mono"], 50);
        assert!(json["boots"].is_object(), "the saved format of the map");
        let back: Instance = serde_json::from_value(json).unwrap();
        assert_eq!(back.boots.len(), BOOTS_KEPT);
        assert_eq!(back.boots.get("b3"), i.boots.get("b3"));
        assert_eq!(i.boots.remove("b3").map(|b| b.last_mono), Some(40));
        assert_eq!(i.boots.insert("b3".into(), BootSeqs::default()), None);
    }

    #[test]
    fn ssh_evidence_and_the_listening_set_come_from_the_agents_points() {
        use phoenix_wire::Point;
        let pt = |m: &str, tags: &[(&str, &str)], fields: Vec<(&str, Value)>| Point {
            m: m.into(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            fields: fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            ts: 1,
        };
        let mut r = Report {
            v: 1,
            agent: Identity::default(),
            seq: 1,
            interval_ms: 0,
            metrics: vec![
                pt(
                    "phoenix_ssh",
                    &[],
                    vec![
                        ("found", Value::Bool(true)),
                        (
                            "evidence",
                            Value::Str("listening: tcp 127.0.0.1:22 x[7]".into()),
                        ),
                    ],
                ),
                pt("phoenix_listen_set", &[], vec![("count", Value::Int(2))]),
                pt(
                    "phoenix_listen",
                    &[
                        ("proto", "tcp"),
                        ("address", "127.0.0.1"),
                        ("port", "22"),
                        ("process_name", "x"),
                    ],
                    vec![("pid", Value::Int(7))],
                ),
                pt(
                    "phoenix_listen",
                    &[("proto", "udp"), ("address", "::"), ("port", "not-a-port")],
                    vec![("pid", Value::Int(-1))],
                ),
            ],
            logs: vec![],
            drift: None,
            checks: vec![],
            drift_root: None,
            protected: None,
        };
        let f = Figures::of(&r);
        assert_eq!(
            f.ssh,
            Some(Some("listening: tcp 127.0.0.1:22 x[7]".to_string()))
        );
        let set = f.listening.unwrap();
        assert_eq!(
            set.count, 2,
            "the agent's count, though one point was unreadable"
        );
        assert_eq!(
            set.list,
            [Listener {
                proto: "tcp".into(),
                address: "127.0.0.1".into(),
                port: 22,
                process: Some("x".into()),
                pid: Some(7)
            }]
        );
        // No set point: the report says nothing about listeners (they are sent on change).
        r.metrics.retain(|p| p.m == "phoenix_ssh");
        assert_eq!(Figures::of(&r).listening, None);
        // Hostile volume is bounded.
        r.metrics = (0..LISTEN_KEPT + 50)
            .map(|k| {
                let port = k.to_string();
                pt(
                    "phoenix_listen",
                    &[("proto", "tcp"), ("address", "0.0.0.0"), ("port", &port)],
                    vec![("pid", Value::Int(1))],
                )
            })
            .collect();
        r.metrics.push(pt(
            "phoenix_listen_set",
            &[],
            vec![("count", Value::Int(9))],
        ));
        let set = Figures::of(&r).listening.unwrap();
        assert_eq!(set.list.len(), LISTEN_KEPT);
        assert_eq!(set.count, LISTEN_KEPT as u64);
    }

    #[test]
    fn the_trend_ring_keeps_the_latest_samples_in_a_fixed_size() {
        assert!(std::mem::size_of::<Trend>() <= 2 * TREND_LEN + 2);
        let mut t = Trend::default();
        assert!(t.is_empty() && t.cpu().is_empty());
        for k in 0..TREND_LEN + 10 {
            t.push(Some(k as f64), None);
        }
        let cpu = t.cpu();
        assert_eq!(cpu.len(), TREND_LEN);
        assert_eq!(cpu[0], Some(10));
        assert_eq!(cpu[TREND_LEN - 1], Some(69));
        assert!(t.mem().iter().all(Option::is_none));
        // Hostile figures are clamped, never a panic.
        t.push(Some(f64::NAN), Some(1e300));
        t.push(Some(-5.0), Some(f64::INFINITY));
        assert_eq!(t.cpu()[TREND_LEN - 2..], [None, Some(0)]);
        assert_eq!(t.mem()[TREND_LEN - 2..], [Some(100), None]);
    }

    #[test]
    fn procstat_points_and_kernel_lines_are_kept_bounded() {
        use phoenix_wire::{LogLine, Point};
        let proc_point = |k: i64| Point {
            m: "procstat".into(),
            tags: [
                ("process_name".to_string(), "x".repeat(500)),
                ("user".to_string(), "root".to_string()),
            ]
            .into(),
            fields: [
                ("pid".to_string(), Value::Int(k)),
                ("cpu_usage".to_string(), Value::Float(k as f64)),
                ("memory_rss".to_string(), Value::Int(-1)),
            ]
            .into(),
            ts: 1,
        };
        let line = |k: usize| LogLine {
            src: if k.is_multiple_of(2) { "kernel" } else { "app" }.into(),
            ts: k as i64,
            offset: 0,
            msg: format!("{k} {}", "y".repeat(1000)),
            escaped: false,
            part: None,
            tags: [("level".to_string(), "err".to_string())].into(),
            fields: Default::default(),
        };
        let mut metrics: Vec<Point> = (1..=100).map(proc_point).collect();
        metrics.push(Point {
            m: "phoenix_kernel".into(),
            tags: Default::default(),
            fields: [("oom_kills".to_string(), Value::Int(2))].into(),
            ts: 1,
        });
        let r = Report {
            v: 1,
            agent: Identity {
                instance_id: "i-1".into(),
                ..Default::default()
            },
            seq: 1,
            interval_ms: 1000,
            metrics,
            logs: (0..100).map(line).collect(),
            drift: None,
            checks: vec![],
            drift_root: None,
            protected: None,
        };
        let f = Figures::of(&r);
        let top = f.top.as_ref().unwrap();
        assert_eq!(top.len(), TOP_KEPT);
        assert_eq!(top[0].pid, 100, "highest CPU first");
        assert!(top[0].name.len() <= 64 && top[0].memory_rss.is_none());
        assert_eq!(f.kernel.unwrap().oom_kills, 2);
        assert_eq!(f.kernel_lines.len(), KERNEL_LINES_KEPT);
        assert!(
            f.kernel_lines[0].msg.starts_with("60 "),
            "the newest kernel lines"
        );
        assert!(f
            .kernel_lines
            .iter()
            .all(|l| l.msg.len() <= KERNEL_LINE_BYTES));
        // Not shared through the fleet store: only the counters travel.
        let json = serde_json::to_string(&f).unwrap();
        assert!(
            !json.contains("procstat") && !json.contains("yyyy"),
            "{json}"
        );
        // Applied twice, the ring stays at its size.
        let mut m = std::collections::HashMap::new();
        let rules = Rules::default();
        for seq in 1..=3 {
            let mut o = Observation::of(&r, None, None, Now::default());
            o.seq = seq;
            apply(&mut m, &o, &rules);
        }
        let i = &m["i-1"];
        assert_eq!(i.kernel.lines.len(), KERNEL_LINES_KEPT);
        assert_eq!(i.top.list.len(), TOP_KEPT);
        assert_eq!(i.trend.cpu().len(), 0, "no CPU figure, no sample");
    }

    #[test]
    fn a_window_answers_only_for_what_was_inserted_and_one_seq_cannot_poison_it() {
        let mut w = SeqWindow::default();
        assert!(!w.contains(0) && !w.contains(5));
        // Out of order within a boot (several batches in flight).
        for s in [3, 1, 2, 5] {
            w.insert(s);
        }
        assert!(w.contains(1) && w.contains(2) && w.contains(3) && w.contains(5));
        assert!(!w.contains(4), "4 was never stored: not a duplicate");
        assert!(
            !w.contains(0),
            "below the first seq seen is unknown, not stored"
        );
        // A forged seq at the end of the range moves nothing.
        w.insert(u64::MAX);
        assert!(w.contains(u64::MAX));
        assert!(!w.contains(6) && !w.contains(u64::MAX - 1));
        for s in 6..=1000 {
            w.insert(s);
        }
        assert!(
            !w.contains(4),
            "a gap stays unknown while it could still be in flight"
        );
        for s in 1001..=3000 {
            w.insert(s);
        }
        // A thousand batches later the gap is given up (nothing sends it any more), the
        // window compacts, and the forged seq is still the only thing above the floor.
        assert!(w.contains(4) && w.contains(3000));
        assert_eq!(w.remembered(), 1);
        assert!(!w.contains(3001) && !w.contains(u64::MAX - 1));
        // In order, a window that has a floor keeps almost nothing above it.
        let mut w = SeqWindow::up_to(10);
        for s in 11..100_000 {
            w.insert(s);
        }
        assert_eq!(w.remembered(), 0);
        assert!(w.contains(99_999) && !w.contains(100_000));
        let mut w = SeqWindow::up_to(u64::MAX - 1);
        w.insert(u64::MAX);
        assert!(w.contains(u64::MAX), "no overflow at the end of the range");
    }
}
