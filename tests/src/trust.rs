//! Identity for reports the tests post themselves. A collector under its defaults
//! (`--identity tofu`) binds each instance id to the credential of its first report, so the
//! harness posts every made-up instance with a credential derived from its id: tests and
//! `fleetsim` that speak for the same id agree, and a real agent (with its own random one)
//! never shares an id with them.

pub const CREDENTIAL_HEADER: &str = "X-Phoenix-Instance-Credential";

/// The credential the harness presents for `instance_id`.
pub fn harness_credential(instance_id: &str) -> String {
    format!("phoenix-e2e-harness-credential/{instance_id}")
}

/// The credential a real agent made for itself in its state dir.
pub fn agent_credential(state_dir: &std::path::Path) -> Option<String> {
    std::fs::read_to_string(state_dir.join("instance-credential"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// A collector like [`crate::Collector::start`], but whose open-file limit (soft and hard) is
/// `nofile`, set in the child before it runs.
pub fn collector_with_nofile(extra: &[&str], nofile: u64) -> crate::Collector {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let mut c = crate::Collector {
        port: crate::free_port(),
        data_dir: tmp.path().join("data"),
        args: extra.iter().map(|s| s.to_string()).collect(),
        proc: None,
        _tmp: Some(tmp),
    };
    let mut cmd = std::process::Command::new(crate::bin("phoenix-collector"));
    cmd.args(["--listen", &format!("127.0.0.1:{}", c.port)])
        .arg("--data-dir")
        .arg(&c.data_dir)
        .args([
            "--agent-token",
            crate::AGENT_TOKEN,
            "--recycler-token",
            crate::RECYCLER_TOKEN,
            "--pipeline-token",
            crate::PIPELINE_TOKEN,
            "--reader-token",
            crate::READER_TOKEN,
        ])
        .args(&c.args)
        .env("PHOENIX_LOG_LEVEL", "info");
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: nofile,
                rlim_max: nofile,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    std::fs::create_dir_all(&c.data_dir).unwrap();
    let log = c.data_dir.parent().unwrap().join("collector-nofile.log");
    c.proc = Some(crate::Proc::spawn(cmd, log));
    let url = format!("{}/healthz", c.url());
    let up = crate::wait_for(std::time::Duration::from_secs(30), || {
        (try_get(&url, None)?.status == 200).then_some(())
    });
    assert!(up.is_some(), "collector did not come up:\n{}", c.log_text());
    c
}

/// Raise this process's soft open-file limit to its hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a pointer to a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
    }
    r.rlim_cur
}

/// Peak resident set size (VmHWM) of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// One HTTP/1.1 request over a fresh connection from the local address `src` (a second
/// loopback address, so a flood is limited per peer apart from real agents on 127.0.0.1).
/// Returns the status and body.
pub fn post_from(
    src: std::net::Ipv4Addr,
    dst: std::net::SocketAddrV4,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;
    let sa = |a: std::net::SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor owned here until TcpStream takes it.
    let mut s = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = std::net::TcpStream::from_raw_fd(fd);
        let local = sa(std::net::SocketAddrV4::new(src, 0));
        if libc::bind(fd, &local as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sa(dst);
        if libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        stream
    };
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))?;
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {dst}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// GET that gives None instead of panicking when the connection fails (a collector at its
/// connection cap may close a connection without a word).
pub fn try_get(url: &str, token: Option<&str>) -> Option<crate::Resp> {
    let mut req = crate::http().get(url);
    if let Some(t) = token {
        req = req.header("Authorization", &format!("Bearer {t}"));
    }
    let r = req.call().ok()?;
    Some(crate::read(Ok(r)))
}
