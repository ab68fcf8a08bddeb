//! Harness for the agent's network and disk tests: a proxy that answers like a captive
//! portal for a while, a small tmpfs to fill, an agent started under a wrapper (faketime), and
//! the CPU a process used.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{bin, Proc, AGENT_TOKEN};

/// A loopback HTTP proxy in front of `upstream` that answers every request with a 200 HTML
/// page until `html_until`, then passes requests through (one request per connection).
#[derive(Debug)]
pub struct HtmlProxy {
    pub port: u16,
    /// Requests answered with the HTML page so far.
    pub html_answers: Arc<AtomicU64>,
    /// Requests passed through so far.
    pub passed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl HtmlProxy {
    pub fn start(upstream: u16, html_for: Duration) -> HtmlProxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let until = Instant::now() + html_for;
        let (html, passed, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (h, p, s) = (html.clone(), passed.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (h, p) = (h.clone(), p.clone());
                std::thread::spawn(move || {
                    if Instant::now() < until {
                        h.fetch_add(1, Ordering::Relaxed);
                        answer_html(conn);
                    } else {
                        p.fetch_add(1, Ordering::Relaxed);
                        pass(conn, upstream);
                    }
                });
            }
        });
        HtmlProxy {
            port,
            html_answers: html,
            passed,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for HtmlProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        TcpStream::connect(("127.0.0.1", self.port)).ok();
    }
}

/// Read one request (head and Content-Length body); None when the client went away.
fn read_request(c: &mut TcpStream) -> Option<Vec<u8>> {
    c.set_read_timeout(Some(Duration::from_secs(20))).ok();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = c.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = c.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(buf)
}

fn answer_html(mut c: TcpStream) {
    if read_request(&mut c).is_none() {
        return;
    }
    let page = "<html><head><title>Wi-Fi login</title></head><body>Please log in to continue</body></html>";
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
        page.len()
    );
    c.write_all(resp.as_bytes()).ok();
}

fn pass(mut c: TcpStream, upstream: u16) {
    let Some(req) = read_request(&mut c) else {
        return;
    };
    // Ask the upstream to close after its answer, so reading to EOF reads exactly one.
    let head_end = req.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&req[..head_end - 4]).to_string();
    let mut out: Vec<u8> = Vec::new();
    for l in head.split("\r\n") {
        if !l.to_ascii_lowercase().starts_with("connection:") {
            out.extend_from_slice(l.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out.extend_from_slice(&req[head_end..]);
    let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return; // the client sees a closed connection, as with a dead upstream
    };
    up.set_read_timeout(Some(Duration::from_secs(30))).ok();
    if up.write_all(&out).is_err() {
        return;
    }
    let mut resp = Vec::new();
    up.read_to_end(&mut resp).ok();
    c.write_all(&resp).ok();
}

/// A tmpfs of `size` (e.g. "2m") mounted on a fresh temp dir; unmounted when dropped.
#[derive(Debug)]
pub struct Tmpfs {
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("running mount");
        assert!(st.success(), "mount -t tmpfs failed: run the tests as root");
        Tmpfs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Free bytes, as statvfs gives them.
    pub fn free(&self) -> u64 {
        let c = std::ffi::CString::new(self.path().as_os_str().to_str().unwrap()).unwrap();
        // SAFETY: statvfs(3) on a NUL-terminated path into a zeroed struct.
        unsafe {
            let mut s: libc::statvfs = std::mem::zeroed();
            assert_eq!(libc::statvfs(c.as_ptr(), &mut s), 0);
            s.f_bavail * s.f_frsize
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status()
            .ok();
    }
}

/// `phoenix-agent run` for `collectors` (in order), optionally under `wrapper` (e.g.
/// `["faketime", "-f", "-1h"]`), with `--interval 1s` and `--image-id img-test` unless given.
pub fn agent_cmd(
    wrapper: &[&str],
    collectors: &[String],
    instance_id: &str,
    state_dir: &Path,
    extra: &[&str],
) -> Command {
    let agent = bin("phoenix-agent");
    let mut cmd = match wrapper.split_first() {
        Some((w, rest)) => {
            let mut c = Command::new(w);
            c.args(rest).arg(&agent);
            c
        }
        None => Command::new(&agent),
    };
    cmd.arg("run");
    for c in collectors {
        cmd.args(["--collector", c]);
    }
    cmd.args(["--token", AGENT_TOKEN, "--instance-id", instance_id])
        .arg("--state-dir")
        .arg(state_dir);
    if !extra.contains(&"--image-id") {
        cmd.args(["--image-id", "img-test"]);
    }
    if !extra.contains(&"--interval") {
        cmd.args(["--interval", "1s"]);
    }
    cmd.args(extra).env("PHOENIX_LOG_LEVEL", "info");
    cmd
}

/// Start `cmd` with its output in `log`.
pub fn spawn(cmd: Command, log: PathBuf) -> Proc {
    Proc::spawn(cmd, log)
}

/// CPU seconds (user + system) process `pid` used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}
