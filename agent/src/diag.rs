//! Diagnostics on demand: a fixed, read-only probe set the collector can ask for in an ack.
//!
//! The request names a [`ProbeSet`] and nothing else; every probe here reads /proc, statvfs
//! and /dev/kmsg, and the one program run (`systemctl --failed`, when systemd is PID 1) has a
//! fixed argv and environment. Nothing from the request reaches a path, an argument or a
//! command. The snapshot goes back over the agent's own outbound channel (`POST
//! /v1/diagnostics` at the collector that handed out the request); the agent still listens
//! on nothing.
//!
//! Each request id runs once; a request that arrives while one runs waits its turn (the
//! collector keeps one outstanding per instance).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::procs::parse_stat;
use phoenix_wire::diag::{
    self, Answer, Handed, KernelLine, Mount, Pressure, ProbeSet, Process, Snapshot, Socket, Sockets,
};
use phoenix_wire::Ack;

use crate::source::Ctx;

/// Ids remembered as run, so an id repeated in later acks runs once.
const REMEMBERED: usize = 16;
/// Longest a probe of kernel lines reads /dev/kmsg.
const KMSG_READ_FOR: Duration = Duration::from_secs(2);
/// How long `systemctl --failed` may take.
const SYSTEMCTL_TIMEOUT: Duration = Duration::from_secs(5);
/// Where systemctl may be; never looked up on a PATH.
const SYSTEMCTL: [&str; 2] = ["/usr/bin/systemctl", "/bin/systemctl"];
/// Filesystems with no space worth showing.
const PSEUDO_FS: &[&str] = &[
    "proc",
    "sysfs",
    "cgroup",
    "cgroup2",
    "devpts",
    "mqueue",
    "debugfs",
    "tracefs",
    "securityfs",
    "pstore",
    "bpf",
    "configfs",
    "fusectl",
    "binfmt_misc",
    "autofs",
    "hugetlbfs",
    "nsfs",
    "rpc_pipefs",
    "efivarfs",
];

/// The sender's line to the diagnostics worker: requests seen in acks, with the collector
/// (its index among `--collector`s) that handed each out. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct DiagLink(Arc<(Mutex<LinkState>, Condvar)>);

#[derive(Debug, Default)]
struct LinkState {
    queued: Option<(Handed, usize)>,
    /// Ids queued or run already (newest last).
    seen: VecDeque<u64>,
    /// The agent is stopping: [`DiagLink::next`] returns at once.
    stopped: bool,
}

impl DiagLink {
    /// Called by the sender for every accepted batch; `collector` answered it.
    pub fn on_ack(&self, ack: &Ack, collector: usize) {
        let Some(h) = ack.diagnostics else {
            return;
        };
        let (m, c) = &*self.0;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        if g.seen.contains(&h.id) {
            return;
        }
        g.seen.push_back(h.id);
        while g.seen.len() > REMEMBERED {
            g.seen.pop_front();
        }
        g.queued = Some((h, collector));
        c.notify_all();
    }

    /// The next request to run, waiting up to `d` (or until [`DiagLink::stop`]).
    pub fn next(&self, d: Duration) -> Option<(Handed, usize)> {
        let (m, c) = &*self.0;
        let g = m.lock().unwrap_or_else(|e| e.into_inner());
        let (mut g, _) = c
            .wait_timeout_while(g, d, |s| s.queued.is_none() && !s.stopped)
            .unwrap_or_else(|e| e.into_inner());
        g.queued.take()
    }

    /// Wake the worker for good: the agent stops.
    pub fn stop(&self) {
        let (m, c) = &*self.0;
        m.lock().unwrap_or_else(|e| e.into_inner()).stopped = true;
        c.notify_all();
    }
}

/// Where the probes read (tests point them at fixtures; the agent at the real box).
#[derive(Debug, Clone)]
pub struct Probes {
    pub proc: PathBuf,
    pub kmsg: PathBuf,
    pub passwd: PathBuf,
}

impl Default for Probes {
    fn default() -> Self {
        Probes {
            proc: "/proc".into(),
            kmsg: "/dev/kmsg".into(),
            passwd: "/etc/passwd".into(),
        }
    }
}

impl Probes {
    /// Run `set`. Never fails: a probe that cannot run leaves a note.
    pub fn take(&self, set: ProbeSet) -> Snapshot {
        let started = Instant::now();
        let mut s = Snapshot {
            probes: set,
            taken_ns: crate::metrics::now_ns(),
            ..Default::default()
        };
        let mut notes = Vec::new();
        if set.wants(ProbeSet::Processes) {
            s.processes = Some(self.processes(&mut notes));
        }
        if set.wants(ProbeSet::Sockets) {
            s.sockets = Some(self.sockets(&mut notes));
        }
        if set.wants(ProbeSet::Mounts) {
            s.mounts = Some(self.mounts(&mut notes));
        }
        if set.wants(ProbeSet::Kernel) {
            s.kernel = Some(self.kernel(&mut notes));
        }
        if set.wants(ProbeSet::Pressure) {
            s.pressure = Some(self.pressure(&mut notes));
        }
        if set.wants(ProbeSet::Units) {
            s.failed_units = self.failed_units(&mut notes);
        }
        notes.truncate(diag::MAX_NOTES);
        s.notes = notes
            .into_iter()
            .map(|n| phoenix_wire::cut_to(&n, 1024))
            .collect();
        s.took_ms = started.elapsed().as_millis().min(u64::MAX as u128) as u64;
        s
    }

    fn processes(&self, notes: &mut Vec<String>) -> Vec<Process> {
        // SAFETY: sysconf only reads a configuration value.
        let (tck, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let tck = if tck > 0 { tck as u64 } else { 100 };
        let page = if page > 0 { page as u64 } else { 4096 };
        let stat = std::fs::read_to_string(self.proc.join("stat")).unwrap_or_default();
        let btime: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let uptime: f64 = std::fs::read_to_string(self.proc.join("uptime"))
            .unwrap_or_default()
            .split_ascii_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let users = crate::procs::read_passwd(&self.passwd);
        let Ok(dir) = std::fs::read_dir(&self.proc) else {
            notes.push(format!("processes: cannot read {}", self.proc.display()));
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut buf = Vec::with_capacity(1024);
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let base = e.path();
            buf.clear();
            if std::fs::File::open(base.join("stat"))
                .and_then(|mut f| f.read_to_end(&mut buf))
                .is_err()
            {
                continue;
            }
            let Some(st) = parse_stat(&buf) else {
                continue;
            };
            let uid = std::fs::metadata(&base).map(|m| m.uid()).ok();
            let ticks = st.utime.saturating_add(st.stime);
            let age_s = uptime - st.start as f64 / tck as f64;
            let cpu_percent = if age_s > 0.0 {
                (100.0 * ticks as f64 / tck as f64 / age_s).clamp(0.0, 1e6)
            } else {
                0.0
            };
            let mut cmd = Vec::with_capacity(512);
            std::fs::File::open(base.join("cmdline"))
                .and_then(|f| f.take(4096).read_to_end(&mut cmd))
                .ok();
            let args: Vec<String> = cmd
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let cmdline = if args.is_empty() {
                format!("[{}]", st.comm)
            } else {
                diag::mask_cmdline(&args)
            };
            out.push(Process {
                pid,
                ppid: st.ppid,
                user: uid.map_or_else(
                    || "?".into(),
                    |u| users.get(&u).cloned().unwrap_or_else(|| u.to_string()),
                ),
                name: phoenix_wire::cut_to(&st.comm, diag::MAX_NAME),
                state: (st.state as char).to_string(),
                cpu_percent,
                cpu_ms: ticks.saturating_mul(1000) / tck,
                rss_bytes: st.rss_pages.saturating_mul(page),
                start_time: btime.saturating_add(st.start / tck),
                threads: st.threads,
                cmdline,
            });
        }
        if out.len() > diag::MAX_PROCESSES {
            notes.push(format!(
                "processes: {} running, the {} busiest listed",
                out.len(),
                diag::MAX_PROCESSES
            ));
            out.sort_by(|a, b| {
                b.cpu_percent
                    .total_cmp(&a.cpu_percent)
                    .then(b.rss_bytes.cmp(&a.rss_bytes))
            });
            out.truncate(diag::MAX_PROCESSES);
        }
        out.sort_by_key(|p| p.pid);
        out
    }

    fn sockets(&self, notes: &mut Vec<String>) -> Sockets {
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        let mut list = Vec::new();
        let mut total = 0usize;
        for (file, proto, v6) in [
            ("net/tcp", "tcp", false),
            ("net/tcp6", "tcp", true),
            ("net/udp", "udp", false),
            ("net/udp6", "udp", true),
        ] {
            let Ok(text) = std::fs::read_to_string(self.proc.join(file)) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let Some(l) = parse_socket(line, v6) else {
                    continue;
                };
                total += 1;
                let state = if proto == "tcp" {
                    tcp_state(l.state)
                } else if l.state == 0x07 {
                    "unconn"
                } else {
                    "established"
                };
                let key = if proto == "tcp" {
                    format!("tcp_{state}")
                } else {
                    "udp_socket".to_string()
                };
                *counts.entry(key).or_default() += 1;
                if list.len() < diag::MAX_SOCKETS {
                    list.push((
                        l.inode,
                        Socket {
                            proto: proto.into(),
                            local: l.local,
                            remote: l.remote,
                            state: state.into(),
                            pid: None,
                            process: None,
                        },
                    ));
                }
            }
        }
        if total > list.len() {
            notes.push(format!(
                "sockets: {total} open, the first {} listed",
                list.len()
            ));
        }
        let holders = self.socket_holders();
        let mut comms: HashMap<u32, Option<String>> = HashMap::new();
        let list = list
            .into_iter()
            .map(|(inode, mut s)| {
                if let Some(&pid) = holders.get(&inode).filter(|_| inode != 0) {
                    s.pid = Some(pid);
                    s.process = comms
                        .entry(pid)
                        .or_insert_with(|| {
                            std::fs::read_to_string(self.proc.join(pid.to_string()).join("comm"))
                                .ok()
                                .map(|c| phoenix_wire::cut_to(c.trim_end(), diag::MAX_NAME))
                        })
                        .clone();
                }
                s
            })
            .collect();
        Sockets { counts, list }
    }

    /// Socket inode → the lowest pid holding it, from one walk of /proc/*/fd.
    fn socket_holders(&self) -> HashMap<u64, u32> {
        let mut out = HashMap::new();
        let Ok(dir) = std::fs::read_dir(&self.proc) else {
            return out;
        };
        let mut pids: Vec<u32> = dir
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        for pid in pids {
            let Ok(fds) = std::fs::read_dir(self.proc.join(pid.to_string()).join("fd")) else {
                continue;
            };
            for fd in fds.flatten() {
                let Ok(t) = std::fs::read_link(fd.path()) else {
                    continue;
                };
                if let Some(i) = t
                    .to_str()
                    .and_then(|t| t.strip_prefix("socket:["))
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|t| t.parse::<u64>().ok())
                {
                    out.entry(i).or_insert(pid);
                }
            }
        }
        out
    }

    fn mounts(&self, notes: &mut Vec<String>) -> Vec<Mount> {
        let Ok(text) = std::fs::read_to_string(self.proc.join("self/mounts")) else {
            notes.push("mounts: cannot read /proc/self/mounts".into());
            return Vec::new();
        };
        let mut out = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() < 4 || PSEUDO_FS.contains(&f[2]) {
                continue;
            }
            if out.len() >= diag::MAX_MOUNTS {
                notes.push(format!(
                    "mounts: only the first {} listed",
                    diag::MAX_MOUNTS
                ));
                break;
            }
            let path = crate::metrics::unescape_mount(f[1]);
            let mut m = Mount {
                path: phoenix_wire::cut_to(&path, 4096),
                device: phoenix_wire::cut_to(f[0], 4096),
                fstype: phoenix_wire::cut_to(f[2], 64),
                read_only: f[3].split(',').any(|o| o == "ro"),
                ..Default::default()
            };
            if let Some(st) = crate::metrics::statvfs(&path) {
                let frsize = if st.f_frsize > 0 {
                    st.f_frsize
                } else {
                    st.f_bsize
                };
                m.total_bytes = st.f_blocks.saturating_mul(frsize);
                m.free_bytes = st.f_bavail.saturating_mul(frsize);
                m.inodes_total = st.f_files;
                m.inodes_free = st.f_ffree;
            }
            out.push(m);
        }
        out
    }

    /// The last [`diag::MAX_KERNEL_LINES`] records in the kernel's buffer.
    fn kernel(&self, notes: &mut Vec<String>) -> Vec<KernelLine> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.kmsg);
        let mut f = match f {
            Ok(f) => f,
            Err(e) => {
                notes.push(format!("kernel: cannot open {}: {e}", self.kmsg.display()));
                return Vec::new();
            }
        };
        let mut last: VecDeque<KernelLine> = VecDeque::with_capacity(diag::MAX_KERNEL_LINES);
        let mut buf = vec![0u8; 16 * 1024];
        let until = Instant::now() + KMSG_READ_FOR;
        while Instant::now() < until {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    for chunk in crate::kmsg::records(&buf[..n]) {
                        let Some(r) = crate::kmsg::parse_record(chunk) else {
                            continue;
                        };
                        if last.len() == diag::MAX_KERNEL_LINES {
                            last.pop_front();
                        }
                        last.push_back(KernelLine {
                            priority: r.level,
                            usec: r.usec,
                            message: phoenix_wire::cut_to(&r.text, diag::MAX_KERNEL_LINE),
                        });
                    }
                }
                // A record overwritten while we read: the next read goes on.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    notes.push(format!("kernel: reading {}: {e}", self.kmsg.display()));
                    break;
                }
            }
        }
        last.into()
    }

    fn pressure(&self, notes: &mut Vec<String>) -> Pressure {
        let mut p = Pressure::default();
        for res in ["cpu", "memory", "io", "irq"] {
            let Ok(text) = std::fs::read_to_string(self.proc.join("pressure").join(res)) else {
                continue;
            };
            let mut kinds = BTreeMap::new();
            for line in text.lines().take(2) {
                let mut it = line.split_ascii_whitespace();
                let Some(kind @ ("some" | "full")) = it.next() else {
                    continue;
                };
                let figures: BTreeMap<String, f64> = it
                    .filter_map(|kv| {
                        let (k, v) = kv.split_once('=')?;
                        let v: f64 = v.parse().ok().filter(|v: &f64| v.is_finite())?;
                        matches!(k, "avg10" | "avg60" | "avg300" | "total")
                            .then(|| (k.to_string(), v))
                    })
                    .collect();
                kinds.insert(kind.to_string(), figures);
            }
            p.psi.insert(res.to_string(), kinds);
        }
        if p.psi.is_empty() {
            notes.push("pressure: no /proc/pressure (kernel without PSI)".into());
        }
        let mi = std::fs::read_to_string(self.proc.join("meminfo")).unwrap_or_default();
        let kb = |k: &str| {
            mi.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.split_ascii_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                .saturating_mul(1024)
        };
        p.mem_total_bytes = kb("MemTotal:");
        p.mem_available_bytes = kb("MemAvailable:");
        p.swap_total_bytes = kb("SwapTotal:");
        p.swap_free_bytes = kb("SwapFree:");
        p
    }

    /// `systemctl --failed` with a fixed argv, when systemd is PID 1.
    fn failed_units(&self, notes: &mut Vec<String>) -> Option<Vec<String>> {
        let init = std::fs::read_to_string(self.proc.join("1/comm")).unwrap_or_default();
        if init.trim() != "systemd" {
            notes.push(format!(
                "units: systemd is not PID 1 ({:?}); no failed units to list",
                init.trim()
            ));
            return None;
        }
        let Some(bin) = SYSTEMCTL.iter().find(|p| Path::new(p).exists()) else {
            notes.push("units: no systemctl in /usr/bin or /bin".into());
            return None;
        };
        let child = std::process::Command::new(bin)
            .args(["--failed", "--plain", "--no-legend", "--no-pager"])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LANG", "C")
            .env("SYSTEMD_COLORS", "0")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                notes.push(format!("units: cannot run {bin}: {e}"));
                return None;
            }
        };
        let mut out = Vec::new();
        let reader = child.stdout.take().map(|s| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                s.take(64 << 10).read_to_end(&mut v).ok();
                v
            })
        });
        let deadline = Instant::now() + SYSTEMCTL_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    child.kill().ok();
                    child.wait().ok();
                    notes.push(format!(
                        "units: systemctl did not answer within {}s",
                        SYSTEMCTL_TIMEOUT.as_secs()
                    ));
                    break;
                }
            }
        }
        if let Some(r) = reader {
            out = r.join().unwrap_or_default();
        }
        let units: Vec<String> = String::from_utf8_lossy(&out)
            .lines()
            .filter_map(|l| l.split_ascii_whitespace().next())
            .take(diag::MAX_UNITS)
            .map(|u| phoenix_wire::cut_to(u, diag::MAX_NAME))
            .collect();
        Some(units)
    }
}

/// Telegraf's netstat name, without `tcp_`, of a /proc/net/tcp state.
fn tcp_state(s: u8) -> &'static str {
    match s {
        0x01 => "established",
        0x02 => "syn_sent",
        0x03 => "syn_recv",
        0x04 => "fin_wait1",
        0x05 => "fin_wait2",
        0x06 => "time_wait",
        0x07 => "close",
        0x08 => "close_wait",
        0x09 => "last_ack",
        0x0A => "listen",
        0x0B => "closing",
        0x0C => "syn_recv",
        _ => "none",
    }
}

#[derive(Debug, PartialEq)]
struct SockLine {
    local: String,
    remote: String,
    state: u8,
    inode: u64,
}

fn parse_socket(line: &str, v6: bool) -> Option<SockLine> {
    let f: Vec<&str> = line.split_ascii_whitespace().collect();
    let addr = |s: &str| -> Option<String> {
        let (a, p) = s.split_once(':')?;
        let port = u16::from_str_radix(p, 16).ok()?;
        Some(if v6 {
            format!("[{}]:{port}", crate::sockets::parse_v6(a)?)
        } else {
            format!("{}:{port}", crate::sockets::parse_v4(a)?)
        })
    };
    Some(SockLine {
        local: addr(f.get(1)?)?,
        remote: addr(f.get(2)?)?,
        state: u8::from_str_radix(f.get(3)?, 16).ok()?,
        inode: f.get(9)?.parse().ok()?,
    })
}

/// Posts snapshots to a collector: implemented by the sender's HTTP client.
pub trait Post: Send + Sync {
    /// POST `body` (gzip JSON) to collector `idx`; Err with what came back.
    fn post_diagnostics(&self, idx: usize, body: &[u8]) -> Result<(), String>;
    fn collectors(&self) -> usize;
}

/// How long one probe set may run before its request is answered with a note instead.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// Stack of the thread that runs a probe set: the probes read /proc line by line and keep
/// their lists on the heap.
const PROBE_STACK: usize = 256 << 10;

/// Runs a probe set: [`Probes::take`] in the agent; tests put in one that wedges or panics.
pub type Take = Arc<dyn Fn(ProbeSet) -> Snapshot + Send + Sync>;

/// The diagnostics worker, run as a [`Source`](crate::source::Source) under
/// [`supervise::run`](crate::supervise::run), so a failed run is logged, counted in
/// `source_restarts` and started again with backoff like every other source. Each probe set
/// runs on its own thread with [`PROBE_TIMEOUT`]: one that panics (in a build that unwinds)
/// or wedges on a hung /proc read still gets its request answered, with a note saying so,
/// and the worker goes on with the next request after the restart. While a wedged probe
/// thread is still alive no second one starts (requests are answered with a note), so a
/// stuck kernel read costs one thread, not one per request.
#[derive(Clone)]
pub struct DiagSource {
    link: DiagLink,
    take: Take,
    post: Arc<dyn Post>,
    pub timeout: Duration,
    /// A probe thread is running (set by it, cleared when it ends, even by a panic).
    busy: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for DiagSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiagSource")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Clears the busy flag when the probe thread ends, however it ends.
struct Busy(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl DiagSource {
    pub fn new(link: DiagLink, probes: Probes, post: Arc<dyn Post>) -> DiagSource {
        let probes = Arc::new(probes);
        DiagSource::with_take(link, Arc::new(move |set| probes.take(set)), post)
    }

    pub fn with_take(link: DiagLink, take: Take, post: Arc<dyn Post>) -> DiagSource {
        DiagSource {
            link,
            take,
            post,
            timeout: PROBE_TIMEOUT,
            busy: Default::default(),
        }
    }

    /// Run `set` on a probe thread, waiting at most `timeout`.
    fn take_bounded(&self, set: ProbeSet) -> Result<Snapshot, String> {
        use std::sync::atomic::Ordering;
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err("the previous probe set is still running (a /proc read hangs?)".into());
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let (take, busy) = (self.take.clone(), Busy(self.busy.clone()));
        let spawned = std::thread::Builder::new()
            .name("diag-probe".into())
            .stack_size(PROBE_STACK)
            .spawn(move || {
                let _busy = busy;
                tx.send(take(set)).ok();
            });
        if let Err(e) = spawned {
            self.busy.store(false, Ordering::SeqCst);
            return Err(format!("cannot start the probe thread: {e}"));
        }
        match rx.recv_timeout(self.timeout) {
            Ok(s) => Ok(s),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(format!(
                "the probe set did not finish within {}s",
                self.timeout.as_secs_f64()
            )),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err("the probe set failed (panicked)".into())
            }
        }
    }

    /// Post `answer` to the collector that handed the request out first (it holds the
    /// request), then the others, a few rounds with a pause; a snapshot that no collector
    /// took is dropped (the request expires there, and can be made again).
    fn send(&self, ctx: &Ctx, answer: &Answer, from: usize) {
        let body = phoenix_wire::gzip(&serde_json::to_vec(answer).unwrap_or_default());
        let n = self.post.collectors().max(1);
        for round in 0..3 {
            for k in 0..n {
                let idx = (from + k) % n;
                match self.post.post_diagnostics(idx, &body) {
                    Ok(()) => {
                        tracing::info!(
                            request = answer.request_id,
                            took_ms = answer.snapshot.took_ms,
                            bytes = body.len(),
                            "diagnostics sent"
                        );
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(request = answer.request_id, collector = idx, error = %e, "diagnostics not taken")
                    }
                }
            }
            if ctx.sleep(Duration::from_secs(1 << round)) {
                return;
            }
        }
    }
}

impl crate::source::Source for DiagSource {
    fn name(&self) -> &'static str {
        "diag"
    }

    /// Until the agent stops: run each request and post its snapshot. Err after a probe set
    /// that failed or timed out (its request answered with a note), so the supervisor logs
    /// it and starts the worker again after its backoff.
    fn run(self: Box<Self>, ctx: Ctx) -> anyhow::Result<()> {
        let link = self.link.clone();
        ctx.spool.on_stop("diag", move || link.stop());
        while !ctx.spool.stopping() {
            // No timeout needed: a request or the stop wakes the wait.
            let Some((h, from)) = self.link.next(Duration::from_secs(3600)) else {
                continue;
            };
            tracing::info!(
                request = h.id,
                probes = h.probes.as_str(),
                "running diagnostics"
            );
            let started = Instant::now();
            let (snapshot, failed) = match self.take_bounded(h.probes) {
                Ok(s) => (s, None),
                Err(why) => {
                    let s = Snapshot {
                        probes: h.probes,
                        taken_ns: crate::metrics::now_ns(),
                        took_ms: started.elapsed().as_millis().min(u64::MAX as u128) as u64,
                        notes: vec![why.clone()],
                        ..Default::default()
                    };
                    (s, Some(why))
                }
            };
            let answer = Answer {
                v: phoenix_wire::VERSION,
                agent: (*ctx.identity).clone(),
                request_id: h.id,
                snapshot,
            };
            self.send(&ctx, &answer, from);
            if let Some(why) = failed {
                anyhow::bail!("diagnostics request {}: {why}", h.id);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phoenix_wire::Identity;

    fn ack(id: Option<u64>) -> Ack {
        Ack {
            accepted: 1,
            diagnostics: id.map(|id| Handed {
                id,
                probes: ProbeSet::Full,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn each_request_id_runs_once() {
        let l = DiagLink::default();
        l.on_ack(&ack(None), 0);
        assert!(l.next(Duration::from_millis(10)).is_none());
        l.on_ack(&ack(Some(7)), 1);
        l.on_ack(&ack(Some(7)), 0);
        let (h, from) = l.next(Duration::from_millis(10)).unwrap();
        assert_eq!((h.id, from), (7, 1));
        l.on_ack(&ack(Some(7)), 0);
        assert!(l.next(Duration::from_millis(10)).is_none(), "ran once");
        l.on_ack(&ack(Some(8)), 0);
        assert_eq!(l.next(Duration::from_millis(10)).unwrap().0.id, 8);
    }

    #[test]
    fn a_full_snapshot_of_this_machine_has_this_process_masked_and_within_bounds() {
        let kmsg = tempfile::NamedTempFile::new().unwrap();
        let mut lines = String::new();
        for i in 0..250 {
            lines.push_str(&format!("6,{i},{i}000,-;line {i}\n"));
        }
        lines.push_str("3,250,250000,-;Out of memory: Killed process 4242 (x)\n");
        std::fs::write(kmsg.path(), lines).unwrap();
        let p = Probes {
            kmsg: kmsg.path().into(),
            ..Default::default()
        };
        let s = p.take(ProbeSet::Full);
        let procs = s.processes.as_ref().unwrap();
        let me = procs
            .iter()
            .find(|p| p.pid == std::process::id())
            .expect("this process");
        assert!(
            me.rss_bytes > 0 && me.threads >= 1 && me.start_time > 1_000_000_000,
            "{me:?}"
        );
        assert!(!me.cmdline.is_empty() && me.cmdline.len() <= diag::MAX_CMDLINE);
        assert!(procs.iter().any(|p| p.pid == 1));
        let k = s.kernel.as_ref().unwrap();
        assert_eq!(k.len(), diag::MAX_KERNEL_LINES);
        assert_eq!(k.last().unwrap().priority, 3);
        assert!(k.last().unwrap().message.starts_with("Out of memory"));
        assert_eq!(k[0].message, "line 51", "the last 200");
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let s2 = p.take(ProbeSet::Sockets);
        assert!(s2.processes.is_none() && s2.mounts.is_none());
        let so = s2.sockets.unwrap();
        let mine = so
            .list
            .iter()
            .find(|x| x.local == format!("127.0.0.1:{port}"))
            .unwrap_or_else(|| panic!("{:?}", so.list));
        assert_eq!(
            (mine.state.as_str(), mine.pid),
            ("listen", Some(std::process::id()))
        );
        assert!(so.counts["tcp_listen"] >= 1);
        assert!(!s.mounts.as_ref().unwrap().is_empty());
        assert!(s.pressure.as_ref().unwrap().mem_total_bytes > 0);
        let answer = Answer {
            v: phoenix_wire::VERSION,
            agent: Identity {
                instance_id: "i-1".into(),
                image_id: "img".into(),
                ..Default::default()
            },
            request_id: 1,
            snapshot: s,
        };
        phoenix_wire::diag::validate(&answer).unwrap();
    }

    /// The collector's side of `Post`: keeps every answer it is sent.
    #[derive(Default)]
    struct Collector(Mutex<Vec<Answer>>);

    impl Post for Collector {
        fn post_diagnostics(&self, _idx: usize, body: &[u8]) -> Result<(), String> {
            let json = phoenix_wire::gunzip_limited(body, 1 << 20).map_err(|e| e.to_string())?;
            let a: Answer = serde_json::from_slice(&json).map_err(|e| e.to_string())?;
            diag::validate(&a)?;
            self.0.lock().unwrap().push(a);
            Ok(())
        }
        fn collectors(&self) -> usize {
            1
        }
    }

    impl Collector {
        /// The answers so far, once there are `n` (polled with a deadline).
        fn wait_for(&self, n: usize) -> Vec<Answer> {
            let until = Instant::now() + Duration::from_secs(20);
            loop {
                let got = self.0.lock().unwrap().clone();
                if got.len() >= n || Instant::now() > until {
                    return got;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    fn test_ctx(dir: &Path) -> Ctx {
        Ctx {
            identity: Arc::new(Identity {
                instance_id: "i-diag".into(),
                image_id: "img-diag".into(),
                ..Default::default()
            }),
            spool: Arc::new(crate::spool::Spool::open(&dir.join("spool"), 1 << 20).unwrap()),
            state_dir: dir.to_path_buf(),
            interval: Duration::from_secs(10),
            drift_link: Default::default(),
        }
    }

    /// The bad day: a probe set that wedges, then one that panics. Each request is still
    /// answered (with a note saying why), the failures are counted as restarts, no second
    /// probe thread starts while the wedged one lives, and the worker answers normally after.
    #[test]
    fn a_wedged_or_panicking_probe_set_is_answered_and_the_worker_restarted() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let ctx = test_ctx(dir.path());
        let link = DiagLink::default();
        let collector = Arc::new(Collector::default());
        let (release, wedge) = std::sync::mpsc::channel::<()>();
        let wedge = Mutex::new(wedge);
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let take: Take = Arc::new(move |set| {
            match c.fetch_add(1, Ordering::SeqCst) {
                // Wedged until the test lets it go, like a read of a hung NFS mount.
                0 => {
                    wedge.lock().unwrap().recv().ok();
                }
                1 => panic!("a probe bug"),
                _ => {}
            }
            Snapshot {
                probes: set,
                notes: vec!["ran".into()],
                ..Default::default()
            }
        });
        let mut src = DiagSource::with_take(link.clone(), take, collector.clone());
        // Long enough for a panic to print its backtrace in a debug build.
        src.timeout = Duration::from_secs(3);
        let again = src.clone();
        let watch = src.clone();
        let restarts = crate::counters::source_restarts.load(Ordering::Relaxed);
        let worker = {
            let ctx = ctx.clone();
            std::thread::spawn(move || {
                crate::supervise::run(Box::new(src), ctx, move || {
                    Ok(Some(
                        Box::new(again.clone()) as Box<dyn crate::source::Source>
                    ))
                })
            })
        };
        let ask = |id| link.on_ack(&ack(Some(id)), 0);

        ask(1);
        let got = collector.wait_for(1);
        assert_eq!(got.len(), 1, "the wedged request is answered");
        assert_eq!(got[0].request_id, 1);
        assert!(
            got[0].snapshot.notes[0].contains("did not finish"),
            "{:?}",
            got[0].snapshot.notes
        );
        // Counted once the run returns to the supervisor, just after the answer went out.
        let until = Instant::now() + Duration::from_secs(10);
        while crate::counters::source_restarts.load(Ordering::Relaxed) <= restarts
            && Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(crate::counters::source_restarts.load(Ordering::Relaxed) > restarts);

        // The first probe thread is still stuck: the next request is answered without a
        // second one.
        ask(2);
        let got = collector.wait_for(2);
        assert_eq!(got.len(), 2);
        assert!(
            got[1].snapshot.notes[0].contains("still running"),
            "{:?}",
            got[1].snapshot.notes
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1, "no second probe thread");

        release.send(()).unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        while watch.busy.load(Ordering::SeqCst) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!watch.busy.load(Ordering::SeqCst), "the stuck thread ended");
        // Requests run again: a panic is answered too...
        ask(3);
        let got = collector.wait_for(3);
        assert_eq!(got.len(), 3);
        assert!(
            got[2].snapshot.notes[0].contains("panicked"),
            "{:?}",
            got[2].snapshot.notes
        );
        // ...and after the restart's backoff, the next one runs normally.
        ask(4);
        let got = collector.wait_for(4);
        assert_eq!(got.len(), 4);
        assert_eq!(got[3].request_id, 4);
        assert_eq!(got[3].snapshot.notes, vec!["ran".to_string()]);
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        ctx.spool.stop();
        worker.join().unwrap();
    }

    #[test]
    fn stat_and_socket_lines() {
        let st = parse_stat(
            b"42 (a) b) S 7 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 5 0 12345 1000 250 1",
        )
        .unwrap();
        assert_eq!((st.comm.as_str(), st.ppid, st.threads), ("a) b", 7, 5));
        let l = parse_socket("   1: 0100007F:0016 0200007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4242 1", false).unwrap();
        assert_eq!(
            l,
            SockLine {
                local: "127.0.0.1:22".into(),
                remote: "127.0.0.2:50000".into(),
                state: 1,
                inode: 4242
            }
        );
    }
}
