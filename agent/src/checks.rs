//! Local probes, run once per interval: the things an operator used to SSH in to look at.
//! Each probe has a timeout and its own worker thread; a round that outlives the timeout
//! reports the probe failed ("timed out after …") and never holds up metrics.
//! No probe runs a shell or builds a command line from a report; `systemd:` runs the fixed
//! program `systemctl is-active` on a unit name checked against systemd's own name syntax.

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use phoenix_wire::CheckResult;

#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    Process(String),
    Http { url: String, expect: u16 },
    Tcp(String),
    Systemd(String),
}

#[derive(Debug, thiserror::Error)]
#[error("--check {spec:?}: {why}")]
pub struct SpecError {
    spec: String,
    why: String,
}

/// The configured probes, each run on its own worker thread by a scheduler thread of its own,
/// so a wedged probe (a hung `systemctl`, a server that accepts and never answers) can stall
/// neither the metrics loop nor the other probes. The metrics loop only reads [`Checks::latest`].
#[derive(Debug)]
pub struct Checks {
    probes: Vec<(String, Probe)>,
    timeout: Duration,
    latest: Arc<Mutex<Vec<CheckResult>>>,
}

pub fn parse(spec: &str) -> Result<(String, Probe), SpecError> {
    let err = |why: &str| SpecError {
        spec: spec.into(),
        why: why.into(),
    };
    let (name, rest) = spec
        .split_once('=')
        .ok_or_else(|| err("write NAME=SPEC, e.g. web=http://127.0.0.1:8080/health"))?;
    if !phoenix_wire::valid_id(name) || name.len() > 64 {
        return Err(err("NAME must be 1-64 chars of A-Z a-z 0-9 - _ . : /"));
    }
    let probe = if let Some(p) = rest.strip_prefix("process:") {
        if p.is_empty() || p.len() > 15 {
            return Err(err("process names are 1-15 chars (the kernel's comm)"));
        }
        Probe::Process(p.into())
    } else if rest.starts_with("http://") || rest.starts_with("https://") {
        // An optional expected status: http://127.0.0.1:8080/health#200
        let (url, expect) = match rest.rsplit_once('#') {
            Some((u, s)) => (
                u,
                s.parse()
                    .map_err(|_| err("after # put the expected HTTP status"))?,
            ),
            None => (rest, 200),
        };
        Probe::Http {
            url: url.into(),
            expect,
        }
    } else if let Some(a) = rest.strip_prefix("tcp:") {
        if !a.contains(':') {
            return Err(err("write tcp:HOST:PORT"));
        }
        Probe::Tcp(a.into())
    } else if let Some(u) = rest.strip_prefix("systemd:") {
        let ok = !u.is_empty()
            && u.len() <= 256
            && !u.starts_with('-')
            && u.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b":-_.\\@".contains(&b));
        if !ok {
            return Err(err("not a systemd unit name"));
        }
        Probe::Systemd(u.into())
    } else {
        return Err(err("SPEC is process:NAME, http://127.0.0.1:PORT/PATH[#STATUS], tcp:HOST:PORT or systemd:UNIT"));
    };
    Ok((name.into(), probe))
}

impl Checks {
    /// `timeout` bounds each probe; one that takes longer counts as failed.
    pub fn new(specs: &[String], timeout: Duration) -> Result<Checks, SpecError> {
        let probes = specs
            .iter()
            .map(|s| parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Checks {
            probes,
            timeout,
            latest: Arc::new(Mutex::new(Vec::new())),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.probes.is_empty()
    }

    /// The newest round of results (empty until the first round ended). Never blocks on a probe.
    pub fn latest(&self) -> Vec<CheckResult> {
        self.latest.lock().unwrap().clone()
    }

    /// Start the scheduler: a round every `every` until `stop` says so. Each round starts every
    /// idle probe and waits at most the timeout for them; a probe still running then is
    /// reported failed, and is not started again until its worker is free.
    pub fn start(&self, every: Duration, stop: impl Fn(Duration) -> bool + Send + 'static) {
        let workers: Vec<Worker> = self
            .probes
            .iter()
            .map(|(name, p)| Worker::spawn(name.clone(), p.clone(), self.timeout))
            .collect();
        let timeout = self.timeout;
        let latest = self.latest.clone();
        let spawned = std::thread::Builder::new()
            .name("checks".into())
            .spawn(move || loop {
                let started = Instant::now();
                let results = round(&workers, timeout);
                *latest.lock().unwrap() = results;
                if stop(every.saturating_sub(started.elapsed())) {
                    return;
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "could not start the checks thread; checks will not run");
        }
    }

    /// One round run right here (tests, and the first round before the scheduler exists).
    pub fn run_all(&self) -> Vec<CheckResult> {
        let workers: Vec<Worker> = self
            .probes
            .iter()
            .map(|(name, p)| Worker::spawn(name.clone(), p.clone(), self.timeout))
            .collect();
        round(&workers, self.timeout)
    }
}

/// What a worker is doing: idle with its last result, or busy since when.
#[derive(Debug)]
struct Slot {
    busy_since: Option<Instant>,
    done: Option<CheckResult>,
}

#[derive(Debug)]
struct Worker {
    name: String,
    slot: Arc<(Mutex<Slot>, Condvar)>,
    kick: std::sync::mpsc::SyncSender<()>,
}

impl Worker {
    fn spawn(name: String, probe: Probe, timeout: Duration) -> Worker {
        let slot = Arc::new((
            Mutex::new(Slot {
                busy_since: None,
                done: None,
            }),
            Condvar::new(),
        ));
        let (kick, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let s = slot.clone();
        let n = name.clone();
        let spawned = std::thread::Builder::new()
            .name(format!(
                "check-{}",
                name.chars().take(9).collect::<String>()
            ))
            .spawn(move || {
                let runner = Runner::new(timeout);
                while rx.recv().is_ok() {
                    let t = Instant::now();
                    let (ok, detail) = runner.run(&probe);
                    let r = CheckResult {
                        name: n.clone(),
                        ok,
                        detail: cut_detail(detail),
                        duration_ms: t.elapsed().as_millis() as u64,
                    };
                    let (m, cv) = &*s;
                    let mut g = m.lock().unwrap();
                    g.busy_since = None;
                    g.done = Some(r);
                    cv.notify_all();
                }
            });
        if let Err(e) = spawned {
            tracing::error!(check = %name, error = %e, "could not start a check worker");
        }
        Worker { name, slot, kick }
    }
}

fn round(workers: &[Worker], timeout: Duration) -> Vec<CheckResult> {
    let now = Instant::now();
    let timed_out = |w: &Worker, since: Option<Instant>| {
        let since = since.map_or(timeout, |t| t.elapsed());
        CheckResult {
            name: w.name.clone(),
            ok: false,
            detail: format!(
                "timed out after {} (still running after {})",
                human(timeout),
                human(since)
            ),
            duration_ms: since.as_millis() as u64,
        }
    };
    // Start every idle probe. One still busy from an earlier round is failed at once: even
    // if it finished during this round, its answer would be about an earlier moment.
    let started: Vec<bool> = workers
        .iter()
        .map(|w| {
            let mut g = w.slot.0.lock().unwrap();
            if g.busy_since.is_some() {
                return false;
            }
            g.done = None;
            // A closed channel means the worker could not start: reported as a timeout.
            if w.kick.try_send(()).is_ok() {
                g.busy_since = Some(now);
            }
            true
        })
        .collect();
    let deadline = now + timeout;
    workers
        .iter()
        .zip(started)
        .map(|(w, started)| {
            let (m, cv) = &*w.slot;
            let mut g = m.lock().unwrap();
            if !started {
                return timed_out(w, g.busy_since);
            }
            loop {
                if let Some(r) = g.done.take() {
                    return r;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return timed_out(w, g.busy_since);
                }
                g = cv.wait_timeout(g, left).unwrap().0;
            }
        })
        .collect()
}

fn human(d: Duration) -> String {
    if d.as_millis().is_multiple_of(1000) {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// The wire format takes at most 4096 bytes of detail (an HTTP error can quote a lot).
fn cut_detail(mut s: String) -> String {
    if s.len() > 4000 {
        let mut end = 4000;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// Runs probes, each bounded by the timeout on its own so a worker comes free again.
struct Runner {
    timeout: Duration,
    http: ureq::Agent,
}

impl Runner {
    fn new(timeout: Duration) -> Runner {
        let cfg = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .build();
        Runner {
            timeout,
            http: ureq::Agent::new_with_config(cfg),
        }
    }

    fn run(&self, p: &Probe) -> (bool, String) {
        match p {
            Probe::Process(name) => {
                let n = count_processes(name);
                (n > 0, format!("{n} running"))
            }
            Probe::Http { url, expect } => match self.http.get(url).call() {
                Ok(r) => {
                    let s = r.status().as_u16();
                    (s == *expect, format!("HTTP {s}"))
                }
                Err(ureq::Error::Timeout(_)) => (false, self.timed_out()),
                Err(e) => (false, e.to_string()),
            },
            Probe::Tcp(addr) => match addr.to_socket_addrs().ok().and_then(|mut a| a.next()) {
                Some(sa) => match TcpStream::connect_timeout(&sa, self.timeout) {
                    Ok(_) => (true, "connected".into()),
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => (false, self.timed_out()),
                    Err(e) => (false, e.to_string()),
                },
                None => (false, format!("cannot resolve {addr}")),
            },
            Probe::Systemd(unit) => self.systemd(unit),
        }
    }

    fn timed_out(&self) -> String {
        format!("timed out after {}", human(self.timeout))
    }

    /// `systemctl is-active`, killed if it outlives the timeout (a wedged D-Bus).
    fn systemd(&self, unit: &str) -> (bool, String) {
        use std::io::Read;
        let child = std::process::Command::new("systemctl")
            .args(["is-active", "--", unit])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => return (false, format!("systemctl: {e}")),
        };
        let end = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(None) => {
                    best_effort_kill(&mut child);
                    return (
                        false,
                        format!("systemctl timed out after {}", human(self.timeout)),
                    );
                }
                Err(e) => return (false, format!("systemctl: {e}")),
            }
        };
        let mut out = String::new();
        if let Some(mut o) = child.stdout.take() {
            if let Err(e) = o.read_to_string(&mut out) {
                return (false, format!("systemctl output: {e}"));
            }
        }
        let state = out.trim().to_string();
        (status.success() && state == "active", state)
    }
}

fn best_effort_kill(child: &mut std::process::Child) {
    if let Err(e) = child.kill() {
        tracing::debug!(error = %e, "killing systemctl");
    }
    if let Err(e) = child.wait() {
        tracing::debug!(error = %e, "reaping systemctl");
    }
}

fn count_processes(name: &str) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(
            parse("web=http://127.0.0.1:8080/health").unwrap().1,
            Probe::Http {
                url: "http://127.0.0.1:8080/health".into(),
                expect: 200
            }
        );
        assert_eq!(
            parse("n=process:nginx").unwrap().1,
            Probe::Process("nginx".into())
        );
        assert_eq!(
            parse("u=systemd:nginx.service").unwrap().1,
            Probe::Systemd("nginx.service".into())
        );
        assert!(parse("u=systemd:--now;rm").is_err());
        assert!(parse("nonsense").is_err());
        assert!(parse("x=ftp://a").is_err());
    }

    #[test]
    fn probes_run_for_real() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let me = std::fs::read_to_string("/proc/self/comm")
            .unwrap()
            .trim()
            .to_string();
        let c = Checks::new(
            &[
                format!("self=process:{me}"),
                "none=process:no-such-proc".into(),
                format!("closed=tcp:127.0.0.1:{port}"),
            ],
            Duration::from_secs(2),
        )
        .unwrap();
        let r = c.run_all();
        assert!(r[0].ok, "{:?}", r[0]);
        assert!(!r[1].ok);
        assert!(!r[2].ok);
    }

    #[test]
    fn a_probe_that_never_answers_times_out_and_the_next_round_still_reports() {
        // Accepts and never says a word: the HTTP probe waits for a status line forever.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let _hold = std::thread::spawn(move || {
            let mut kept = Vec::new();
            for s in l.incoming() {
                kept.push(s);
            }
        });
        let c = Checks::new(
            &[
                format!("mute=http://127.0.0.1:{port}/health"),
                "none=process:no-such-proc".into(),
            ],
            Duration::from_millis(300),
        )
        .unwrap();
        let t = Instant::now();
        let r = c.run_all();
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(!r[0].ok);
        assert!(r[0].detail.starts_with("timed out after 0.3s"), "{r:?}");
        assert_eq!(r[1].detail, "0 running", "the other probe is not held up");

        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        c.start(Duration::from_millis(400), move |d| {
            std::thread::sleep(d);
            s2.load(std::sync::atomic::Ordering::Relaxed)
        });
        let mut rounds = 0;
        let end = Instant::now() + Duration::from_secs(10);
        while rounds < 2 && Instant::now() < end {
            let l = c.latest();
            if l.len() == 2 && !l[0].ok && l[0].detail.contains("timed out") {
                rounds += 1;
            }
            std::thread::sleep(Duration::from_millis(450));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            rounds, 2,
            "rounds keep reporting the wedged probe as failed"
        );
    }
}
