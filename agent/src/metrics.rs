//! Host metrics with Telegraf's measurement, tag and field names, read straight from /proc and
//! statvfs: each interval reads six small files and stats each real filesystem, nothing more.
//! (sysinfo was measured and set aside: it has no per-state CPU times, iowait, steal or
//! diskio, and refreshing it costs more than reading the same files ourselves.)

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use phoenix_wire::{Map, Point, Value};

use crate::source::{Ctx, Source};
use crate::spool::Kind;

/// Filesystems that hold no data worth watching, beyond what /proc/filesystems marks `nodev`.
const SKIP_FS: &[&str] = &[
    "tmpfs",
    "devtmpfs",
    "devfs",
    "iso9660",
    "overlay",
    "aufs",
    "squashfs",
    "ramfs",
    "nsfs",
    "fuse.lxcfs",
    "tracefs",
];

/// A point producer run each interval beside the samplers.
pub type Extra = Box<dyn FnMut(i64, &mut Vec<Point>) + Send>;

pub struct MetricsSource {
    proc: PathBuf,
    prev_cpu: HashMap<String, CpuTimes>,
    /// Extra point producers run each interval (checks, the agent's own figures).
    pub extras: Vec<Extra>,
    /// Run on their own threads; each report carries their latest round.
    pub checks: Option<crate::checks::Checks>,
    /// `processes` and `procstat`.
    pub procs: Option<crate::procs::Procs>,
    /// `netstat`, `phoenix_listen` and `phoenix_listen_set`.
    pub sockets: Option<crate::sockets::Sockets>,
    /// Whether the protect file exists goes with every report.
    pub protect: Option<crate::protect::ProtectFile>,
}

/// Fewer jiffies than this between two /proc/stat reads make no CPU figure: a quarter second
/// of one CPU at the usual 100 Hz, below which one tick is 4 % and a sample reads 0 % or 100 %.
/// The baseline is then kept, and the next sample covers the longer span.
const MIN_CPU_TICKS: u64 = 25;

impl std::fmt::Debug for MetricsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsSource")
            .field("proc", &self.proc)
            .field("extras", &self.extras.len())
            .field("checks", &self.checks)
            .finish_non_exhaustive()
    }
}

impl MetricsSource {
    pub fn new(proc: impl Into<PathBuf>) -> MetricsSource {
        MetricsSource {
            proc: proc.into(),
            prev_cpu: HashMap::new(),
            extras: Vec::new(),
            checks: None,
            procs: None,
            sockets: None,
            protect: None,
        }
    }

    /// Read the baselines (CPU times, per-process ticks) without making points, so the first
    /// report after a start has figures over a real span: no 0 % / 100 % spike on restart.
    pub fn prime(&mut self) {
        let mut scratch = Vec::new();
        self.cpu(0, &mut scratch);
        if let Some(p) = self.procs.as_mut() {
            p.sample(0, &mut scratch);
        }
    }

    /// One sample of every measurement, stamped `ts`.
    pub fn sample(&mut self, ts: i64) -> Vec<Point> {
        let mut out = Vec::with_capacity(48);
        self.cpu(ts, &mut out);
        mem(&self.proc, ts, &mut out);
        net(&self.proc, ts, &mut out);
        disk(&self.proc, ts, &mut out);
        diskio(&self.proc, ts, &mut out);
        system(&self.proc, ts, &mut out);
        swap(&self.proc, ts, &mut out);
        kernel(&self.proc, ts, &mut out);
        let ssh_procs = match self.procs.as_mut() {
            Some(p) => p.sample(ts, &mut out),
            None => Vec::new(),
        };
        if let Some(s) = self.sockets.as_mut() {
            let on_22: Vec<crate::sockets::Owned> = s
                .sample(ts, &mut out)
                .iter()
                .filter(|o| o.listen.proto == "tcp" && o.listen.port == 22)
                .cloned()
                .collect();
            if self.procs.is_some() {
                out.push(ssh_point(&on_22, &ssh_procs, ts));
            }
        }
        if let Some(k) = crate::kmsg::kernel_point(ts) {
            out.push(k);
        }
        out
    }

    fn cpu(&mut self, ts: i64, out: &mut Vec<Point>) {
        let Ok(stat) = std::fs::read_to_string(self.proc.join("stat")) else {
            return;
        };
        for line in stat.lines().take_while(|l| l.starts_with("cpu")) {
            let mut it = line.split_ascii_whitespace();
            let name = it.next().unwrap_or_default();
            let v: Vec<u64> = it.map(|x| x.parse().unwrap_or(0)).collect();
            if v.len() < 8 {
                continue;
            }
            let cur = CpuTimes::from(&v);
            let tag = if name == "cpu" {
                "cpu-total".to_string()
            } else {
                name.to_string()
            };
            match self.prev_cpu.get(&tag) {
                Some(prev) if cur.total().saturating_sub(prev.total()) < MIN_CPU_TICKS => {
                    // Too short a span: keep the older baseline.
                }
                Some(prev) => {
                    if let Some(fields) = cur.usage_since(prev) {
                        out.push(point("cpu", [("cpu", tag.clone())], fields, ts));
                    }
                    self.prev_cpu.insert(tag, cur);
                }
                None => {
                    self.prev_cpu.insert(tag, cur);
                }
            }
        }
    }
}

/// Jiffies per state, as /proc/stat lists them.
#[derive(Debug, Clone, Copy, Default)]
struct CpuTimes {
    user: u64,
    nice: u64,
    system: u64,
    idle: u64,
    iowait: u64,
    irq: u64,
    softirq: u64,
    steal: u64,
    guest: u64,
    guest_nice: u64,
}

impl CpuTimes {
    fn from(v: &[u64]) -> CpuTimes {
        let g = |i: usize| v.get(i).copied().unwrap_or(0);
        CpuTimes {
            user: g(0),
            nice: g(1),
            system: g(2),
            idle: g(3),
            iowait: g(4),
            irq: g(5),
            softirq: g(6),
            steal: g(7),
            guest: g(8),
            guest_nice: g(9),
        }
    }

    // user and nice already include guest time, so it is not added again to the total.
    fn total(&self) -> u64 {
        self.user
            + self.nice
            + self.system
            + self.idle
            + self.iowait
            + self.irq
            + self.softirq
            + self.steal
    }

    fn usage_since(&self, p: &CpuTimes) -> Option<Map<Value>> {
        let total = self.total().checked_sub(p.total())? as f64;
        if total <= 0.0 {
            return None;
        }
        let pct = |a: u64, b: u64| Value::Float(100.0 * a.saturating_sub(b) as f64 / total);
        let user = self.user.saturating_sub(self.guest);
        let puser = p.user.saturating_sub(p.guest);
        let nice = self.nice.saturating_sub(self.guest_nice);
        let pnice = p.nice.saturating_sub(p.guest_nice);
        Some(Map::from([
            ("usage_user".into(), pct(user, puser)),
            ("usage_nice".into(), pct(nice, pnice)),
            ("usage_system".into(), pct(self.system, p.system)),
            ("usage_idle".into(), pct(self.idle, p.idle)),
            ("usage_iowait".into(), pct(self.iowait, p.iowait)),
            ("usage_irq".into(), pct(self.irq, p.irq)),
            ("usage_softirq".into(), pct(self.softirq, p.softirq)),
            ("usage_steal".into(), pct(self.steal, p.steal)),
            ("usage_guest".into(), pct(self.guest, p.guest)),
            (
                "usage_guest_nice".into(),
                pct(self.guest_nice, p.guest_nice),
            ),
        ]))
    }
}

fn point<const N: usize>(m: &str, tags: [(&str, String); N], fields: Map<Value>, ts: i64) -> Point {
    Point {
        m: m.into(),
        // Values come from the box (mount paths, device names): cut to what the wire takes.
        tags: tags
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.to_string(), phoenix_wire::cut_value(&v)))
            .collect(),
        fields,
        ts,
    }
}

/// `phoenix_ssh`, every interval: whether anything listens on TCP 22 or an SSH daemon runs.
/// `found` is the one field a rule needs; `evidence` names the processes and addresses.
fn ssh_point(
    on_22: &[crate::sockets::Owned],
    daemons: &[crate::procs::SshProcess],
    ts: i64,
) -> Point {
    let mut evidence: Vec<String> = on_22
        .iter()
        .map(|o| format!("listening: {}", crate::sockets::describe(o)))
        .collect();
    evidence.extend(
        daemons
            .iter()
            .take(20)
            .map(|d| format!("running: {}[{}]", d.name, d.pid)),
    );
    let fields = Map::from([
        (
            "found".into(),
            Value::Bool(!on_22.is_empty() || !daemons.is_empty()),
        ),
        ("listening".into(), int(on_22.len() as u64)),
        ("daemons".into(), int(daemons.len() as u64)),
        (
            "evidence".into(),
            Value::Str(phoenix_wire::cut_to(&evidence.join("; "), 4096)),
        ),
    ]);
    point("phoenix_ssh", [], fields, ts)
}

/// `swap`, Telegraf's fields: sizes from /proc/meminfo, pages swapped in and out (as bytes,
/// cumulative) from /proc/vmstat.
fn swap(proc: &Path, ts: i64, out: &mut Vec<Point>) {
    let Ok(mi) = std::fs::read_to_string(proc.join("meminfo")) else {
        return;
    };
    let kb = |k: &str| {
        mi.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_ascii_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let (total, free) = (kb("SwapTotal:"), kb("SwapFree:"));
    let used = total.saturating_sub(free);
    let vm = std::fs::read_to_string(proc.join("vmstat")).unwrap_or_default();
    let pages = |k: &str| {
        vm.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    let fields = Map::from([
        ("total".into(), int(total)),
        ("used".into(), int(used)),
        ("free".into(), int(free)),
        (
            "used_percent".into(),
            Value::Float(if total > 0 {
                100.0 * used as f64 / total as f64
            } else {
                0.0
            }),
        ),
        ("in".into(), int(pages("pswpin ").saturating_mul(page))),
        ("out".into(), int(pages("pswpout ").saturating_mul(page))),
    ]);
    out.push(point("swap", [], fields, ts));
}

/// `kernel`, Telegraf's fields, from /proc/stat and the entropy count.
fn kernel(proc: &Path, ts: i64, out: &mut Vec<Point>) {
    let Ok(stat) = std::fs::read_to_string(proc.join("stat")) else {
        return;
    };
    let first = |k: &str| {
        stat.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_ascii_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let mut fields = Map::new();
    for (key, field) in [
        ("ctxt ", "context_switches"),
        ("intr ", "interrupts"),
        ("processes ", "processes_forked"),
        ("btime ", "boot_time"),
    ] {
        if let Some(v) = first(key) {
            fields.insert(field.to_string(), int(v));
        }
    }
    let entropy = std::fs::read_to_string(proc.join("sys/kernel/random/entropy_avail"));
    if let Some(e) = entropy.ok().and_then(|e| e.trim().parse::<u64>().ok()) {
        fields.insert("entropy_avail".into(), int(e));
    }
    if !fields.is_empty() {
        out.push(point("kernel", [], fields, ts));
    }
}

fn int(v: u64) -> Value {
    Value::Int(v.min(i64::MAX as u64) as i64)
}

/// /proc/meminfo, in bytes, with Telegraf's derived figures.
fn mem(proc: &Path, ts: i64, out: &mut Vec<Point>) {
    let Ok(text) = std::fs::read_to_string(proc.join("meminfo")) else {
        return;
    };
    let mut kv = HashMap::new();
    for line in text.lines() {
        let mut it = line.split_ascii_whitespace();
        if let (Some(k), Some(v)) = (it.next(), it.next()) {
            kv.insert(
                k.trim_end_matches(':'),
                v.parse::<u64>().unwrap_or(0) * 1024,
            );
        }
    }
    let g = |k: &str| kv.get(k).copied().unwrap_or(0);
    let total = g("MemTotal");
    if total == 0 {
        return;
    }
    let free = g("MemFree");
    let buffered = g("Buffers");
    let cached = g("Cached") + g("SReclaimable");
    let available = kv
        .get("MemAvailable")
        .copied()
        .unwrap_or(free + buffered + cached);
    let used = total.saturating_sub(free + buffered + cached);
    let fields = Map::from([
        ("total".into(), int(total)),
        ("available".into(), int(available)),
        ("used".into(), int(used)),
        ("free".into(), int(free)),
        ("cached".into(), int(cached)),
        ("buffered".into(), int(buffered)),
        ("active".into(), int(g("Active"))),
        ("inactive".into(), int(g("Inactive"))),
        ("slab".into(), int(g("Slab"))),
        ("dirty".into(), int(g("Dirty"))),
        ("swap_total".into(), int(g("SwapTotal"))),
        ("swap_free".into(), int(g("SwapFree"))),
        (
            "used_percent".into(),
            Value::Float(100.0 * used as f64 / total as f64),
        ),
        (
            "available_percent".into(),
            Value::Float(100.0 * available as f64 / total as f64),
        ),
    ]);
    out.push(point("mem", [], fields, ts));
}

/// /proc/net/dev, cumulative counters per interface; loopback is left out as Telegraf does.
fn net(proc: &Path, ts: i64, out: &mut Vec<Point>) {
    let Ok(text) = std::fs::read_to_string(proc.join("net/dev")) else {
        return;
    };
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name == "lo" {
            continue;
        }
        let v: Vec<u64> = rest
            .split_ascii_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        if v.len() < 16 {
            continue;
        }
        let fields = Map::from([
            ("bytes_recv".into(), int(v[0])),
            ("packets_recv".into(), int(v[1])),
            ("err_in".into(), int(v[2])),
            ("drop_in".into(), int(v[3])),
            ("bytes_sent".into(), int(v[8])),
            ("packets_sent".into(), int(v[9])),
            ("err_out".into(), int(v[10])),
            ("drop_out".into(), int(v[11])),
        ]);
        out.push(point("net", [("interface", name.to_string())], fields, ts));
    }
}

/// Filesystem types the kernel marks `nodev` (proc, sysfs, cgroup ...): never real disks.
fn nodev_types(proc: &Path) -> HashSet<String> {
    std::fs::read_to_string(proc.join("filesystems"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("nodev").map(|t| t.trim().to_string()))
        .collect()
}

pub(crate) fn unescape_mount(s: &str) -> String {
    // /proc/mounts writes space, tab, newline and backslash as \040 \011 \012 \134.
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v as char);
            i += 4;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

fn disk(proc: &Path, ts: i64, out: &mut Vec<Point>) {
    let Ok(text) = std::fs::read_to_string(proc.join("self/mounts")) else {
        return;
    };
    let nodev = nodev_types(proc);
    let mut seen = HashSet::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() < 4 {
            continue;
        }
        let (dev, path, fstype, opts) = (f[0], unescape_mount(f[1]), f[2], f[3]);
        if SKIP_FS.contains(&fstype) || nodev.contains(fstype) || !seen.insert(path.clone()) {
            continue;
        }
        let Some(st) = statvfs(&path) else { continue };
        let frsize = if st.f_frsize > 0 {
            st.f_frsize
        } else {
            st.f_bsize
        };
        let total = st.f_blocks * frsize;
        if total == 0 {
            continue;
        }
        let free = st.f_bfree * frsize;
        let avail = st.f_bavail * frsize;
        let used = total - free;
        // Telegraf's definition: what non-root users see as full.
        let used_percent = if used + avail > 0 {
            100.0 * used as f64 / (used + avail) as f64
        } else {
            0.0
        };
        let (itotal, ifree) = (st.f_files, st.f_ffree);
        let fields = Map::from([
            ("total".into(), int(total)),
            ("free".into(), int(avail)),
            ("used".into(), int(used)),
            ("used_percent".into(), Value::Float(used_percent)),
            ("inodes_total".into(), int(itotal)),
            ("inodes_free".into(), int(ifree)),
            ("inodes_used".into(), int(itotal.saturating_sub(ifree))),
        ]);
        let device = dev.rsplit('/').next().unwrap_or(dev).to_string();
        let mode = if opts.split(',').any(|o| o == "ro") {
            "ro"
        } else {
            "rw"
        };
        out.push(point(
            "disk",
            [
                ("path", path),
                ("device", device),
                ("fstype", fstype.to_string()),
                ("mode", mode.to_string()),
            ],
            fields,
            ts,
        ));
    }
}

pub(crate) fn statvfs(path: &str) -> Option<libc::statvfs> {
    let c = std::ffi::CString::new(path).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and st a properly sized out-parameter.
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0).then_some(st)
}

/// /proc/diskstats; sectors are 512 bytes whatever the device's block size.
fn diskio(proc: &Path, ts: i64, out: &mut Vec<Point>) {
    let Ok(text) = std::fs::read_to_string(proc.join("diskstats")) else {
        return;
    };
    for line in text.lines() {
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        if f.len() < 14 {
            continue;
        }
        let name = f[2];
        if name.starts_with("loop") || name.starts_with("ram") {
            continue;
        }
        let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        let fields = Map::from([
            ("reads".into(), int(n(3))),
            ("merged_reads".into(), int(n(4))),
            ("read_bytes".into(), int(n(5) * 512)),
            ("read_time".into(), int(n(6))),
            ("writes".into(), int(n(7))),
            ("merged_writes".into(), int(n(8))),
            ("write_bytes".into(), int(n(9) * 512)),
            ("write_time".into(), int(n(10))),
            ("iops_in_progress".into(), int(n(11))),
            ("io_time".into(), int(n(12))),
            ("weighted_io_time".into(), int(n(13))),
        ]);
        out.push(point("diskio", [("name", name.to_string())], fields, ts));
    }
}

fn system(proc: &Path, ts: i64, out: &mut Vec<Point>) {
    let load = std::fs::read_to_string(proc.join("loadavg")).unwrap_or_default();
    let l: Vec<f64> = load
        .split_ascii_whitespace()
        .take(3)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    if l.len() < 3 {
        return;
    }
    let uptime = std::fs::read_to_string(proc.join("uptime")).unwrap_or_default();
    let uptime = uptime
        .split_ascii_whitespace()
        .next()
        .and_then(|x| x.parse::<f64>().ok())
        .unwrap_or(0.0) as u64;
    let n_cpus = std::fs::read_to_string(proc.join("stat"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .count();
    let fields = Map::from([
        ("load1".into(), Value::Float(l[0])),
        ("load5".into(), Value::Float(l[1])),
        ("load15".into(), Value::Float(l[2])),
        ("n_cpus".into(), int(n_cpus as u64)),
        ("uptime".into(), int(uptime)),
    ]);
    out.push(point("system", [], fields, ts));
}

pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The agent's own figures, `phoenix_agent`: spool, drops, memory and CPU.
pub fn self_point(ctx: &Ctx, ts: i64) -> Point {
    let s = &ctx.spool.stats;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_ascii_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let mut cpu_ns = 0u64;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            let ss = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            cpu_ns += ss
                .split_ascii_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    let mut fields = Map::from([
        ("spool_bytes".into(), int(ctx.spool.bytes())),
        ("spool_batches".into(), int(ctx.spool.len() as u64)),
        (
            "dropped_points".into(),
            int(s.dropped_points.load(Ordering::Relaxed)),
        ),
        (
            "dropped_batches".into(),
            int(s.dropped_batches.load(Ordering::Relaxed)),
        ),
        (
            "rejected_batches".into(),
            int(s.rejected_batches.load(Ordering::Relaxed)),
        ),
        (
            "acked_batches".into(),
            int(s.acked_batches.load(Ordering::Relaxed)),
        ),
        ("log_waits".into(), int(s.log_waits.load(Ordering::Relaxed))),
        ("rss".into(), int(kb("VmRSS:"))),
        ("rss_peak".into(), int(kb("VmHWM:"))),
        ("cpu_seconds".into(), Value::Float(cpu_ns as f64 / 1e9)),
    ]);
    for (k, v) in crate::counters::snapshot() {
        fields.insert(k.to_string(), int(v));
    }
    Point {
        m: "phoenix_agent".into(),
        tags: Map::from([("version".to_string(), env!("CARGO_PKG_VERSION").to_string())]),
        fields,
        ts,
    }
}

impl Source for MetricsSource {
    fn name(&self) -> &'static str {
        "metrics"
    }

    fn run(mut self: Box<Self>, ctx: Ctx) -> anyhow::Result<()> {
        let mut jitter = crate::transport::Jitter::new();
        // Baselines now, so the first report has usage figures over a real span.
        self.prime();
        if let Some(c) = &self.checks {
            let stop = ctx.clone();
            c.start(ctx.interval, move |d| stop.sleep(d));
        }
        // Spread a fleet booted at once over the first interval.
        if ctx.sleep(ctx.interval.mul_f64(0.2 * jitter.next_f64())) {
            return Ok(());
        }
        loop {
            let started = Instant::now();
            let ts = now_ns();
            let mut report = ctx.report();
            report.metrics = self.sample(ts);
            if let Some(checks) = &self.checks {
                // The collector turns these into `phoenix_check` points and feeds its rules.
                // Only the latest finished round: a wedged probe never holds this loop.
                report.checks = checks.latest();
            }
            if let Some(p) = &mut self.protect {
                report.protected = Some(p.present());
            }
            for extra in self.extras.iter_mut() {
                extra(ts, &mut report.metrics);
            }
            report.metrics.push(self_point(&ctx, ts));
            match ctx.spool.push(Kind::Metrics, report, None, Duration::ZERO) {
                Ok(_) => {}
                Err(crate::spool::SpoolError::Stopping) => return Ok(()),
                Err(e) => tracing::error!(error = %e, "could not queue metrics"),
            }
            // Once an interval, for the whole agent: the other sources' bursts freed memory too.
            crate::release_free_memory();
            let wait = jitter
                .spread(ctx.interval)
                .saturating_sub(started.elapsed());
            if ctx.sleep(wait) {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_machine() {
        let mut m = MetricsSource::new("/proc");
        assert!(
            m.sample(1).iter().all(|p| p.m != "cpu"),
            "no CPU usage before a second sample"
        );
        // Long enough for every CPU line to pass MIN_CPU_TICKS.
        std::thread::sleep(Duration::from_millis(300));
        let pts = m.sample(2);
        let names: HashSet<&str> = pts.iter().map(|p| p.m.as_str()).collect();
        for want in ["cpu", "mem", "disk", "diskio", "system"] {
            assert!(names.contains(want), "missing {want}: {names:?}");
        }
        let total = pts
            .iter()
            .find(|p| p.m == "cpu" && p.tags["cpu"] == "cpu-total")
            .unwrap();
        let sum: f64 = [
            "usage_user",
            "usage_nice",
            "usage_system",
            "usage_idle",
            "usage_iowait",
            "usage_irq",
            "usage_softirq",
            "usage_steal",
        ]
        .iter()
        .map(|k| match total.fields[*k] {
            Value::Float(f) => f,
            _ => panic!(),
        })
        .sum();
        assert!(
            (sum - 100.0).abs() < 0.01 || sum == 0.0,
            "states add up to 100%: {sum}"
        );
        assert!(pts
            .iter()
            .all(|p| p.m != "disk" || p.tags["fstype"] != "tmpfs"));
    }

    #[test]
    fn cpu_percentages_from_two_samples() {
        let a = CpuTimes::from(&[100, 0, 50, 800, 50, 0, 0, 0, 0, 0]);
        let b = CpuTimes::from(&[160, 0, 70, 900, 50, 0, 0, 20, 0, 0]);
        let u = b.usage_since(&a).unwrap();
        assert_eq!(u["usage_user"], Value::Float(30.0));
        assert_eq!(u["usage_idle"], Value::Float(50.0));
        assert_eq!(u["usage_steal"], Value::Float(10.0));
    }

    #[test]
    fn first_cpu_sample_after_start_has_no_spike() {
        let dir = tempfile::tempdir().unwrap();
        let stat = |user: u64, idle: u64| {
            std::fs::write(
                dir.path().join("stat"),
                format!("cpu  {user} 0 0 {idle} 0 0 0 0 0 0\ncpu0 {user} 0 0 {idle} 0 0 0 0 0 0\n"),
            )
            .unwrap()
        };
        let mut m = MetricsSource::new(dir.path());
        stat(1000, 9000);
        m.prime();
        // The agent's first report comes a few ticks after start: 2 busy of 3 would read 67 %.
        stat(1002, 9001);
        let cpu = |pts: Vec<Point>| pts.into_iter().find(|p| p.m == "cpu");
        assert!(
            cpu(m.sample(1)).is_none(),
            "too short a span makes no figure"
        );
        // Later, the figure covers the whole span since the baseline read at start.
        stat(1010, 9090);
        let p = cpu(m.sample(2)).expect("a figure once the span is long enough");
        assert_eq!(p.fields["usage_user"], Value::Float(10.0));
        assert_eq!(p.fields["usage_idle"], Value::Float(90.0));
    }

    #[test]
    fn long_mount_paths_and_device_names_are_cut() {
        let long = format!("/mnt/{}", "p".repeat(1100));
        let p = point(
            "disk",
            [("path", long.clone()), ("device", "sda".into())],
            Map::from([("total".to_string(), Value::Int(1))]),
            1,
        );
        assert!(p.tags["path"].len() <= phoenix_wire::MAX_TAG_VALUE);
        assert_eq!(p.tags["device"], "sda");
    }

    #[test]
    fn swap_and_kernel_with_telegraf_names() {
        let mut out = Vec::new();
        swap(Path::new("/proc"), 1, &mut out);
        kernel(Path::new("/proc"), 1, &mut out);
        let sw = &out[0];
        for k in ["total", "used", "free", "used_percent", "in", "out"] {
            assert!(sw.fields.contains_key(k), "swap {k}");
        }
        let k = &out[1];
        for f in [
            "context_switches",
            "interrupts",
            "processes_forked",
            "boot_time",
        ] {
            assert!(k.fields.contains_key(f), "kernel {f}: {k:?}");
        }
    }

    #[test]
    fn mount_paths_unescape() {
        assert_eq!(unescape_mount("/mnt/a\\040b"), "/mnt/a b");
    }
}
