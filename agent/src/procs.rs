//! `processes` (counts per state) and `procstat` (the top N processes by CPU and by RSS), with
//! Telegraf's names, from one pass over /proc each interval.
//!
//! The pass reads one file per process, `/proc/PID/stat`, which holds the state, CPU ticks,
//! threads and RSS. What does not change while a process lives (its owner) is kept between
//! passes, keyed by pid and start time, so a box with thousands of processes costs one small
//! read each. Only the few processes that make the top lists get their `fd/` counted.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use phoenix_wire::{Map, Point, Value};

/// Process names that mean a way in by SSH is running.
const SSH_DAEMONS: [&str; 2] = ["sshd", "dropbear"];

/// What one pass learned about one process.
#[derive(Debug, Clone)]
struct Row {
    pid: u32,
    comm: String,
    uid: u32,
    /// Percent of one core over the last interval; None on the first sight of a process that
    /// was already running at the previous pass (no baseline yet).
    cpu: Option<f64>,
    rss: u64,
    threads: u64,
}

/// What is kept about a process between passes.
#[derive(Debug, Clone, Copy)]
struct Seen {
    start: u64,
    ticks: u64,
    uid: u32,
}

/// A running SSH daemon found in the pass: evidence for the `phoenix_ssh` point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshProcess {
    pub pid: u32,
    pub name: String,
}

#[derive(Debug)]
pub struct Procs {
    proc: PathBuf,
    top: usize,
    seen: HashMap<u32, Seen>,
    /// When the previous pass ran, and the box's uptime in ticks then.
    last: Option<(Instant, u64)>,
    users: HashMap<u32, String>,
    users_loaded: Option<Instant>,
    users_mtime: Option<std::time::SystemTime>,
    clk_tck: u64,
    page_size: u64,
    self_pid: u32,
    buf: Vec<u8>,
    /// `/proc/PID/stat` files kept open between passes, at most `max_open`: reading an open
    /// one from offset 0 regenerates it, one pread instead of an open, a read and a close (the
    /// open's path walk was most of the pass). Once its process has exited a read fails
    /// (ESRCH), so a pid the kernel hands to a new process is never read through the old file.
    stats: HashMap<u32, std::fs::File>,
    max_open: usize,
}

impl Procs {
    /// `top` is N of `--top-processes`; 0 still counts `processes` but sends no `procstat`.
    pub fn new(proc: impl Into<PathBuf>, top: usize) -> Procs {
        // SAFETY: sysconf only reads a configuration value.
        let (tck, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        Procs {
            proc: proc.into(),
            top,
            seen: HashMap::new(),
            last: None,
            users: HashMap::new(),
            users_loaded: None,
            users_mtime: None,
            clk_tck: if tck > 0 { tck as u64 } else { 100 },
            page_size: if page > 0 { page as u64 } else { 4096 },
            self_pid: std::process::id(),
            buf: Vec::with_capacity(1024),
            stats: HashMap::new(),
            max_open: max_open_stats(),
        }
    }

    /// One pass: pushes `processes` and the `procstat` points, returns running SSH daemons.
    pub fn sample(&mut self, ts: i64, out: &mut Vec<Point>) -> Vec<SshProcess> {
        let now = Instant::now();
        let uptime_ticks = self.uptime_ticks();
        let (elapsed, prev_uptime) = match self.last {
            Some((t, u)) => (now.duration_since(t).as_secs_f64(), Some(u)),
            None => (0.0, None),
        };
        let Ok(dir) = std::fs::read_dir(&self.proc) else {
            return Vec::new();
        };
        let mut states: BTreeMap<&'static str, i64> = [
            "running", "sleeping", "blocked", "zombies", "stopped", "idle", "dead", "paging",
            "parked", "unknown",
        ]
        .into_iter()
        .map(|k| (k, 0))
        .collect();
        let (mut total, mut threads) = (0i64, 0i64);
        let mut rows = Vec::with_capacity(self.seen.len() + 16);
        let mut next_seen = HashMap::with_capacity(self.seen.len() + 16);
        let mut ssh = Vec::new();
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Some(st) = self.read_stat(pid) else {
                continue; // gone between readdir and open
            };
            total += 1;
            threads += st.threads as i64;
            *states.get_mut(state_name(st.state)).unwrap_or(&mut 0) += 1;
            let known = self.seen.get(&pid).filter(|s| s.start == st.start).copied();
            let uid = match known {
                Some(s) => s.uid,
                None => match std::fs::metadata(e.path()) {
                    Ok(m) => m.uid(),
                    Err(_) => continue,
                },
            };
            let ticks = st.utime + st.stime;
            let cpu = match (known, prev_uptime) {
                (Some(s), _) if elapsed > 0.0 => Some(ticks.saturating_sub(s.ticks)),
                // Born since the previous pass: all its ticks fall in this interval.
                (None, Some(u)) if st.start >= u && elapsed > 0.0 => Some(ticks),
                _ => None,
            }
            .map(|d| 100.0 * d as f64 / self.clk_tck as f64 / elapsed);
            next_seen.insert(
                pid,
                Seen {
                    start: st.start,
                    ticks,
                    uid,
                },
            );
            if SSH_DAEMONS.contains(&st.comm.as_str()) {
                ssh.push(SshProcess {
                    pid,
                    name: st.comm.clone(),
                });
            }
            rows.push(Row {
                pid,
                comm: st.comm,
                uid,
                cpu,
                rss: st.rss_pages * self.page_size,
                threads: st.threads,
            });
        }
        // Files of processes not seen in this pass are of processes gone.
        self.stats.retain(|pid, _| next_seen.contains_key(pid));
        self.seen = next_seen;
        self.last = Some((now, uptime_ticks));
        let mut fields: Map<Value> = states
            .into_iter()
            .map(|(k, v)| (k.to_string(), Value::Int(v)))
            .collect();
        fields.insert("total".into(), Value::Int(total));
        fields.insert("total_threads".into(), Value::Int(threads));
        out.push(Point {
            m: "processes".into(),
            tags: Map::new(),
            fields,
            ts,
        });
        if self.top > 0 {
            self.procstat(ts, rows, out);
        }
        ssh.sort_by_key(|s| s.pid);
        ssh
    }

    fn procstat(&mut self, ts: i64, mut rows: Vec<Row>, out: &mut Vec<Point>) {
        let n = self.top.min(rows.len());
        let mut pick: Vec<Row> = Vec::with_capacity(2 * n + 1);
        if n > 0 {
            let by_cpu = |a: &Row, b: &Row| {
                b.cpu
                    .unwrap_or(0.0)
                    .total_cmp(&a.cpu.unwrap_or(0.0))
                    .then(a.pid.cmp(&b.pid))
            };
            rows.select_nth_unstable_by(n - 1, by_cpu);
            pick.extend(rows[..n].iter().cloned());
            let by_rss = |a: &Row, b: &Row| b.rss.cmp(&a.rss).then(a.pid.cmp(&b.pid));
            rows.select_nth_unstable_by(n - 1, by_rss);
            pick.extend(rows[..n].iter().cloned());
        }
        // The agent itself always: its own cost is what an operator asks about first.
        if let Some(me) = rows.iter().find(|r| r.pid == self.self_pid) {
            pick.push(me.clone());
        }
        pick.sort_by_key(|r| r.pid);
        pick.dedup_by_key(|r| r.pid);
        for (i, r) in pick.into_iter().enumerate() {
            let user = self.user(r.uid);
            let mut fields = Map::from([
                ("pid".to_string(), Value::Int(r.pid as i64)),
                ("memory_rss".to_string(), int(r.rss)),
                ("num_threads".to_string(), int(r.threads)),
            ]);
            if let Some(c) = r.cpu {
                fields.insert("cpu_usage".into(), Value::Float(c));
            }
            if let Some(n) = count_fds(&self.proc.join(r.pid.to_string()).join("fd")) {
                fields.insert("num_fds".into(), int(n));
            }
            let mut tags = Map::from([("user".to_string(), user)]);
            if !r.comm.is_empty() {
                tags.insert("process_name".into(), phoenix_wire::cut_value(&r.comm));
            }
            out.push(Point {
                m: "procstat".into(),
                tags,
                fields,
                // Two processes of the same name and user would be one series at one instant,
                // and InfluxDB keeps only the last; a nanosecond apart keeps both, without a
                // pid tag's unbounded series.
                ts: ts + i as i64,
            });
        }
    }

    fn uptime_ticks(&self) -> u64 {
        let s = std::fs::read_to_string(self.proc.join("uptime")).unwrap_or_default();
        let secs: f64 = s
            .split_ascii_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        (secs * self.clk_tck as f64) as u64
    }

    fn read_stat(&mut self, pid: u32) -> Option<Stat> {
        if let Some(f) = self.stats.get(&pid) {
            if let Some(st) = read_open_stat(f, &mut self.buf) {
                return Some(st);
            }
            // Gone: the pid may already be another process's, opened afresh below.
            self.stats.remove(&pid);
        }
        let mut p = self.proc.clone();
        p.push(pid.to_string());
        p.push("stat");
        let f = std::fs::File::open(&p).ok()?;
        self.buf.clear();
        // Through `Take`, read_to_end does not statx and lseek the file to size the buffer
        // first (a /proc file's size is 0): two syscalls less per process per interval, and
        // a bound on what is read.
        (&f).take(MAX_STAT).read_to_end(&mut self.buf).ok()?;
        let st = parse_stat(&self.buf)?;
        if self.stats.len() < self.max_open {
            self.stats.insert(pid, f);
        }
        Some(st)
    }

    /// The name of a uid from /etc/passwd. An unknown uid rereads the file only when its
    /// mtime changed, and at most once a minute: a process whose uid has no name (a
    /// container's) then costs one stat, not a parse of the file every interval.
    fn user(&mut self, uid: u32) -> String {
        if !self.users.contains_key(&uid)
            && self
                .users_loaded
                .is_none_or(|t| t.elapsed().as_secs() >= 60)
        {
            let passwd = Path::new("/etc/passwd");
            let mtime = std::fs::metadata(passwd).and_then(|m| m.modified()).ok();
            if self.users_loaded.is_none() || mtime != self.users_mtime {
                self.users = read_passwd(passwd);
                self.users_mtime = mtime;
            }
            self.users_loaded = Some(Instant::now());
        }
        self.users
            .get(&uid)
            .cloned()
            .unwrap_or_else(|| uid.to_string())
    }
}

fn int(v: u64) -> Value {
    Value::Int(v.min(i64::MAX as u64) as i64)
}

/// Telegraf's `processes` field for a /proc state letter.
fn state_name(c: u8) -> &'static str {
    match c {
        b'R' => "running",
        b'S' => "sleeping",
        b'D' => "blocked",
        b'Z' => "zombies",
        b'T' | b't' => "stopped",
        b'I' => "idle",
        b'X' | b'x' => "dead",
        b'W' => "paging",
        b'P' => "parked",
        _ => "unknown",
    }
}

/// The fields of `/proc/PID/stat` the agent reads (here and in diagnostics).
#[derive(Debug, PartialEq)]
pub(crate) struct Stat {
    pub(crate) comm: String,
    pub(crate) state: u8,
    pub(crate) ppid: u32,
    pub(crate) utime: u64,
    pub(crate) stime: u64,
    pub(crate) threads: u64,
    pub(crate) start: u64,
    pub(crate) rss_pages: u64,
}

/// Most read of one /proc/PID/stat (about 300 bytes; the name is at most 64).
const MAX_STAT: u64 = 4096;

/// Read an open `/proc/PID/stat` again from its start; None once its process is gone.
fn read_open_stat(f: &std::fs::File, buf: &mut Vec<u8>) -> Option<Stat> {
    use std::os::unix::fs::FileExt;
    buf.clear();
    buf.resize(MAX_STAT as usize, 0);
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    buf.truncate(n);
    parse_stat(buf)
}

/// How many stat files a pass keeps open: min(128, an eighth of the open-file limit), so
/// the logs' quarter and the rest of the agent always have theirs.
fn max_open_stats() -> usize {
    (crate::open_file_limit() / 8).min(128) as usize
}

/// How many descriptors the process has open. Since Linux 6.2 the size of /proc/PID/fd says
/// it in one stat; before, that size is 0 and the directory is listed.
fn count_fds(dir: &Path) -> Option<u64> {
    match std::fs::metadata(dir) {
        Ok(m) if m.size() > 0 => Some(m.size()),
        Ok(_) => std::fs::read_dir(dir).ok().map(|d| d.count() as u64),
        Err(_) => None,
    }
}

/// `/proc/PID/stat`. The name sits in parentheses and may itself hold spaces and `)`, so the
/// numbers are read after the last `)`.
pub(crate) fn parse_stat(b: &[u8]) -> Option<Stat> {
    let open = b.iter().position(|&c| c == b'(')?;
    let close = b.iter().rposition(|&c| c == b')')?;
    let comm = String::from_utf8_lossy(b.get(open + 1..close)?).into_owned();
    let rest = std::str::from_utf8(b.get(close + 1..)?).ok()?;
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    // f[0] is field 3 of proc(5), so field N is f[N - 3].
    let n = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok());
    Some(Stat {
        comm,
        state: *f.first()?.as_bytes().first()?,
        ppid: n(4)?.min(u32::MAX as u64) as u32,
        utime: n(14)?,
        stime: n(15)?,
        threads: n(20)?,
        start: n(22)?,
        rss_pages: n(24)?,
    })
}

pub(crate) fn read_passwd(p: &Path) -> HashMap<u32, String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split(':');
            let name = it.next()?;
            let uid = it.nth(1)?.parse().ok()?;
            (!name.is_empty()).then(|| (uid, name.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_descriptors_are_counted_as_the_listing_counts_them() {
        // A sleeping child: its descriptors (stdio, and whatever the test harness passed
        // down) do not change while they are counted both ways.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let dir = PathBuf::from(format!("/proc/{}/fd", child.id()));
        let listed = std::fs::read_dir(&dir).unwrap().count() as u64;
        let counted = count_fds(&dir);
        child.kill().ok();
        child.wait().ok();
        assert!(listed >= 3, "stdin, stdout and stderr at least: {listed}");
        assert_eq!(counted, Some(listed));
        assert_eq!(count_fds(Path::new("/proc/0/fd")), None);
    }

    #[test]
    fn stat_with_a_hostile_name() {
        let s = b"42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 5 0 12345 1000 250 18446744073709551615";
        let st = parse_stat(s).unwrap();
        assert_eq!(st.comm, "a) b (c)");
        assert_eq!((st.state, st.utime, st.stime), (b'S', 7, 3));
        assert_eq!((st.threads, st.start, st.rss_pages), (5, 12345, 250));
        assert!(parse_stat(b"42 (x").is_none());
        assert!(parse_stat(b"42 (x) S 1").is_none());
    }

    #[test]
    fn this_machine_counts_and_the_agent_itself_is_in_procstat() {
        let mut p = Procs::new("/proc", 3);
        let mut out = Vec::new();
        p.sample(1, &mut out);
        let procs = out.iter().find(|p| p.m == "processes").unwrap();
        let Value::Int(total) = procs.fields["total"] else {
            panic!()
        };
        assert!(total > 1);
        let Value::Int(threads) = procs.fields["total_threads"] else {
            panic!()
        };
        assert!(threads >= total);
        // Burn a little CPU so this process has a figure the second time.
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed().as_millis() < 60 {
            x = x.wrapping_mul(31).wrapping_add(1);
        }
        assert_ne!(x, 1);
        out.clear();
        p.sample(2, &mut out);
        let st: Vec<&Point> = out.iter().filter(|p| p.m == "procstat").collect();
        assert!(st.len() <= 2 * 3 + 1 && st.len() >= 3, "{}", st.len());
        let me = st
            .iter()
            .find(|p| p.fields["pid"] == Value::Int(std::process::id() as i64))
            .expect("the test process itself");
        for k in ["memory_rss", "num_threads", "num_fds", "cpu_usage"] {
            assert!(me.fields.contains_key(k), "{k}: {me:?}");
        }
        let Value::Float(cpu) = me.fields["cpu_usage"] else {
            panic!()
        };
        assert!(cpu > 5.0, "spun for 60 ms: {cpu}");
        let mut ts: Vec<i64> = st.iter().map(|p| p.ts).collect();
        ts.dedup();
        assert_eq!(ts.len(), st.len(), "each point at its own nanosecond");
    }

    /// The kept files: a live process is read through its open file pass after pass with
    /// figures that move, and an exited one's file is dropped and the process not counted.
    #[test]
    fn kept_stat_files_follow_a_live_process_and_drop_an_exited_one() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut p = Procs::new("/proc", 500);
        let mut out = Vec::new();
        p.sample(1, &mut out);
        assert!(p.stats.contains_key(&pid), "the child's stat file is kept");
        let ticks = |p: &Procs| p.seen[&pid].ticks;
        let first = ticks(&p);
        // Poll with a deadline: the busy child's ticks move as soon as it has run a tick.
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while ticks(&p) == first {
            assert!(Instant::now() < deadline, "the child's ticks never moved");
            std::thread::sleep(std::time::Duration::from_millis(20));
            out.clear();
            p.sample(2, &mut out);
            assert!(p.stats.contains_key(&pid));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // Unless the kernel gave the pid to a new process already (then with its own start).
        let child_start = p.seen[&pid].start;
        out.clear();
        p.sample(3, &mut out);
        if let Some(s) = p.seen.get(&pid) {
            assert_ne!(s.start, child_start, "an exited process is not counted");
        } else {
            assert!(!p.stats.contains_key(&pid), "nor is its file kept");
        }
        // A process opened fresh each pass when the cap is reached: same counts.
        let mut capped = Procs::new("/proc", 0);
        capped.max_open = 0;
        let mut a = Vec::new();
        capped.sample(4, &mut a);
        assert!(capped.stats.is_empty());
        assert!(!capped.seen.is_empty());
    }

    #[test]
    fn zero_means_counts_only() {
        let mut p = Procs::new("/proc", 0);
        let mut out = Vec::new();
        p.sample(1, &mut out);
        p.sample(2, &mut out);
        assert!(out.iter().all(|p| p.m == "processes"));
    }
}
