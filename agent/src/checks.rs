//! Local probes, run once per interval: the things an operator used to SSH in to look at.
//! No probe runs a shell or builds a command line from a report; `systemd:` runs the fixed
//! program `systemctl is-active` on a unit name checked against systemd's own name syntax.

use std::net::{TcpStream, ToSocketAddrs};
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

#[derive(Debug)]
pub struct Checks {
    probes: Vec<(String, Probe)>,
    timeout: Duration,
    http: ureq::Agent,
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
    pub fn new(specs: &[String]) -> Result<Checks, SpecError> {
        let probes = specs
            .iter()
            .map(|s| parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        let timeout = Duration::from_secs(2);
        let cfg = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .build();
        Ok(Checks {
            probes,
            timeout,
            http: ureq::Agent::new_with_config(cfg),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.probes.is_empty()
    }

    pub fn run_all(&mut self) -> Vec<CheckResult> {
        self.probes
            .iter()
            .map(|(name, p)| {
                let t = Instant::now();
                let (ok, detail) = self.run(p);
                CheckResult {
                    name: name.clone(),
                    ok,
                    detail,
                    duration_ms: t.elapsed().as_millis() as u64,
                }
            })
            .collect()
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
                Err(e) => (false, e.to_string()),
            },
            Probe::Tcp(addr) => match addr.to_socket_addrs().ok().and_then(|mut a| a.next()) {
                Some(sa) => match TcpStream::connect_timeout(&sa, self.timeout) {
                    Ok(_) => (true, "connected".into()),
                    Err(e) => (false, e.to_string()),
                },
                None => (false, format!("cannot resolve {addr}")),
            },
            Probe::Systemd(unit) => match std::process::Command::new("systemctl")
                .args(["is-active", "--", unit])
                .stdin(std::process::Stdio::null())
                .output()
            {
                Ok(o) => {
                    let state = String::from_utf8_lossy(&o.stdout).trim().to_string();
                    (o.status.success() && state == "active", state)
                }
                Err(e) => (false, format!("systemctl: {e}")),
            },
        }
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
        let mut c = Checks::new(&[
            format!("self=process:{me}"),
            "none=process:no-such-proc".into(),
            format!("closed=tcp:127.0.0.1:{port}"),
        ])
        .unwrap();
        let r = c.run_all();
        assert!(r[0].ok, "{:?}", r[0]);
        assert!(!r[1].ok);
        assert!(!r[2].ok);
    }
}
