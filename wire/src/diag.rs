//! Diagnostics on demand: a reader asks the collector for a closer look at one instance, the
//! collector hands the request to the agent in an [`crate::Ack`], the agent runs a **fixed,
//! read-only** probe set and posts the snapshot back over its own outbound channel.
//!
//! Nothing in a request can name a command, a path or an argument: it names a [`ProbeSet`] and
//! nothing else, and [`Request`] refuses unknown fields. Every list and string of a
//! [`Snapshot`] is bounded here, and [`validate`] is what the collector checks on arrival.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Identity;

/// Processes listed in a snapshot at most (the busiest first when a box has more).
pub const MAX_PROCESSES: usize = 4096;
/// Command lines are cut to this many bytes (after masking).
pub const MAX_CMDLINE: usize = 256;
/// Individual sockets listed at most (the counts per state cover all of them).
pub const MAX_SOCKETS: usize = 2048;
pub const MAX_MOUNTS: usize = 512;
/// The last kernel lines a snapshot holds.
pub const MAX_KERNEL_LINES: usize = 200;
/// Longest kernel line kept, in bytes.
pub const MAX_KERNEL_LINE: usize = 1024;
pub const MAX_UNITS: usize = 256;
/// Notes (probes that could not run, lists that were cut).
pub const MAX_NOTES: usize = 32;
/// Longest name-like value (process, user, mount path, unit, address) in bytes.
pub const MAX_NAME: usize = 512;
/// The largest snapshot body a collector takes, decompressed. With the bounds above a
/// snapshot stays well below it.
pub const MAX_SNAPSHOT_BYTES: usize = 4 << 20;

/// What an operator may ask for. Every probe is read-only and fixed in the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeSet {
    /// Every probe below.
    #[default]
    Full,
    Processes,
    Sockets,
    Mounts,
    Kernel,
    Pressure,
    Units,
}

impl ProbeSet {
    pub const ALL: [ProbeSet; 7] = [
        ProbeSet::Full,
        ProbeSet::Processes,
        ProbeSet::Sockets,
        ProbeSet::Mounts,
        ProbeSet::Kernel,
        ProbeSet::Pressure,
        ProbeSet::Units,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProbeSet::Full => "full",
            ProbeSet::Processes => "processes",
            ProbeSet::Sockets => "sockets",
            ProbeSet::Mounts => "mounts",
            ProbeSet::Kernel => "kernel",
            ProbeSet::Pressure => "pressure",
            ProbeSet::Units => "units",
        }
    }

    /// Whether this set includes `probe` (a single probe, not [`ProbeSet::Full`]).
    pub fn wants(self, probe: ProbeSet) -> bool {
        self == ProbeSet::Full || self == probe
    }
}

/// The body of `POST /v1/instances/{id}/diagnostics`: a probe set and nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    #[serde(default)]
    pub probes: ProbeSet,
}

/// Why a request body was refused (the collector answers 400 with this).
pub fn parse_request(body: &[u8]) -> Result<Request, String> {
    let names: Vec<&str> = ProbeSet::ALL.iter().map(|p| p.as_str()).collect();
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Request::default());
    }
    let object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let parsed = if object {
        serde_json::from_slice::<Request>(body).map_err(|e| e.to_string())
    } else {
        Err("the body must be a JSON object".to_string())
    };
    parsed.map_err(|e| {
        format!(
            "a diagnostics request names only a probe set, {{\"probes\": \"full\"}} (one of {}); \
             no command, path or argument can be given: {e}",
            names.join(", ")
        )
    })
}

/// A request as handed to the agent in an ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handed {
    /// The collector's id for this request; the agent answers with it, and runs each id once.
    pub id: u64,
    pub probes: ProbeSet,
}

/// What the agent posts to `POST /v1/diagnostics` (gzip JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// Wire format major version, [`crate::VERSION`].
    pub v: u32,
    pub agent: Identity,
    /// The [`Handed::id`] this answers.
    pub request_id: u64,
    pub snapshot: Snapshot,
}

/// One snapshot of a box, taken on request.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub probes: ProbeSet,
    /// Unix ns when the agent began, and how long the probes took.
    pub taken_ns: i64,
    pub took_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<Vec<Process>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sockets: Option<Sockets>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mounts: Option<Vec<Mount>>,
    /// The last kernel lines, oldest first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<Vec<KernelLine>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pressure: Option<Pressure>,
    /// Failed systemd units; None when systemd is not PID 1 or the probe was not asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_units: Option<Vec<String>>,
    /// Probes that could not run, lists that were cut.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    pub ppid: u32,
    pub user: String,
    pub name: String,
    /// The /proc state letter (R, S, D, Z, T, I …).
    pub state: String,
    /// Percent of one core since the process started.
    pub cpu_percent: f64,
    /// User + system CPU time so far, ms.
    pub cpu_ms: u64,
    pub rss_bytes: u64,
    /// Unix seconds the process started.
    pub start_time: u64,
    pub threads: u64,
    /// The command line, arguments joined by spaces, secret-looking values masked, cut to
    /// [`MAX_CMDLINE`] bytes.
    pub cmdline: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Sockets {
    /// `tcp_established`, `tcp_listen`, … (Telegraf's netstat names) and `udp_socket`.
    pub counts: BTreeMap<String, u64>,
    pub list: Vec<Socket>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Socket {
    pub proto: String,
    pub local: String,
    pub remote: String,
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Mount {
    pub path: String,
    pub device: String,
    pub fstype: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub inodes_total: u64,
    pub inodes_free: u64,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct KernelLine {
    /// Syslog priority 0-7 (3 = error).
    pub priority: u8,
    /// Microseconds since boot, as the kernel stamps it.
    pub usec: u64,
    pub message: String,
}

/// `/proc/pressure/*` and the memory figures that go with it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Pressure {
    /// cpu, memory, io, irq → some/full → avg10, avg60, avg300, total.
    pub psi: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>>,
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    pub swap_total_bytes: u64,
    pub swap_free_bytes: u64,
}

fn short(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.len() > max {
        return Err(format!("{what}: {} bytes; the limit is {max}", s.len()));
    }
    Ok(())
}

/// Every bound of an answer; what the collector checks before keeping it.
pub fn validate(a: &Answer) -> Result<(), String> {
    if a.v != crate::VERSION {
        return Err(format!(
            "unsupported wire format version {}; this collector speaks v{}",
            a.v,
            crate::VERSION
        ));
    }
    if !crate::valid_id(&a.agent.instance_id) || !crate::valid_id(&a.agent.image_id) {
        return Err("agent.instance_id or agent.image_id is not a valid id".into());
    }
    let s = &a.snapshot;
    if let Some(p) = &s.processes {
        if p.len() > MAX_PROCESSES {
            return Err(format!(
                "{} processes; the limit is {MAX_PROCESSES}",
                p.len()
            ));
        }
        for p in p {
            short("process user", &p.user, MAX_NAME)?;
            short("process name", &p.name, MAX_NAME)?;
            short("process state", &p.state, 8)?;
            short("process cmdline", &p.cmdline, MAX_CMDLINE)?;
            if !p.cpu_percent.is_finite() {
                return Err(format!("process {}: cpu_percent is not finite", p.pid));
            }
        }
    }
    if let Some(so) = &s.sockets {
        if so.list.len() > MAX_SOCKETS || so.counts.len() > 32 {
            return Err(format!(
                "{} sockets listed; the limit is {MAX_SOCKETS}",
                so.list.len()
            ));
        }
        for k in so.counts.keys() {
            short("socket state name", k, 64)?;
        }
        for x in &so.list {
            short("socket proto", &x.proto, 8)?;
            short("socket address", &x.local, MAX_NAME)?;
            short("socket address", &x.remote, MAX_NAME)?;
            short("socket state", &x.state, 32)?;
            short(
                "socket process",
                x.process.as_deref().unwrap_or(""),
                MAX_NAME,
            )?;
        }
    }
    if let Some(m) = &s.mounts {
        if m.len() > MAX_MOUNTS {
            return Err(format!("{} mounts; the limit is {MAX_MOUNTS}", m.len()));
        }
        for m in m {
            short("mount path", &m.path, 4096)?;
            short("mount device", &m.device, 4096)?;
            short("mount fstype", &m.fstype, 64)?;
        }
    }
    if let Some(k) = &s.kernel {
        if k.len() > MAX_KERNEL_LINES {
            return Err(format!(
                "{} kernel lines; the limit is {MAX_KERNEL_LINES}",
                k.len()
            ));
        }
        for l in k {
            short("kernel line", &l.message, MAX_KERNEL_LINE)?;
        }
    }
    if let Some(p) = &s.pressure {
        if p.psi.len() > 8
            || p.psi
                .values()
                .any(|v| v.len() > 4 || v.values().any(|x| x.len() > 8))
        {
            return Err("pressure: too many entries".into());
        }
        if p.psi
            .values()
            .flat_map(|v| v.values())
            .flat_map(|x| x.values())
            .any(|f| !f.is_finite())
        {
            return Err("pressure: a figure is not finite".into());
        }
    }
    if let Some(u) = &s.failed_units {
        if u.len() > MAX_UNITS {
            return Err(format!(
                "{} failed units; the limit is {MAX_UNITS}",
                u.len()
            ));
        }
        for u in u {
            short("unit name", u, MAX_NAME)?;
        }
    }
    if s.notes.len() > MAX_NOTES {
        return Err(format!("{} notes; the limit is {MAX_NOTES}", s.notes.len()));
    }
    for n in &s.notes {
        short("note", n, 1024)?;
    }
    Ok(())
}

/// Decompress (bounded), parse and validate an answer.
pub fn decode_answer(body: &[u8], gzipped: bool) -> Result<Answer, crate::DecodeError> {
    let json = if gzipped {
        crate::gunzip_limited(body, MAX_SNAPSHOT_BYTES)?
    } else if body.len() > MAX_SNAPSHOT_BYTES {
        return Err(crate::DecodeError::TooLarge(MAX_SNAPSHOT_BYTES));
    } else {
        body.to_vec()
    };
    let a: Answer = serde_json::from_slice(&json).map_err(crate::DecodeError::Json)?;
    validate(&a).map_err(crate::DecodeError::Invalid)?;
    Ok(a)
}

/// Whether an argument's name says its value is a secret.
fn secret_name(name: &str) -> bool {
    let n = name.trim_start_matches('-').to_ascii_lowercase();
    [
        "pass",
        "pwd",
        "secret",
        "token",
        "key",
        "auth",
        "credential",
        "cookie",
        "session",
    ]
    .iter()
    .any(|w| n.contains(w))
}

/// Mask the values of password-, token- and key-like arguments and the password of a URL's
/// user info, then join the arguments with spaces and cut to [`MAX_CMDLINE`] bytes.
/// `--password hunter2`, `--token=abc`, `API_KEY=abc`, `-p` forms with a separate value and
/// `https://user:pw@host` all come out as `***`.
pub fn mask_cmdline<S: AsRef<str>>(args: &[S]) -> String {
    let mut out: Vec<String> = Vec::with_capacity(args.len());
    let mut mask_next = false;
    for a in args {
        let a = a.as_ref();
        if mask_next {
            mask_next = false;
            if !a.starts_with('-') {
                out.push("***".into());
                continue;
            }
        }
        if let Some((name, _)) = a.split_once('=') {
            if secret_name(name) {
                out.push(format!("{name}=***"));
                continue;
            }
        } else if a.starts_with('-') && secret_name(a) {
            mask_next = true;
        }
        out.push(mask_url(a));
    }
    crate::cut_to(&out.join(" "), MAX_CMDLINE)
}

/// `scheme://user:secret@host…` → `scheme://user:***@host…`.
fn mask_url(a: &str) -> String {
    let Some(start) = a.find("://").map(|i| i + 3) else {
        return a.to_string();
    };
    let rest = &a[start..];
    let end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..end].rfind('@') else {
        return a.to_string();
    };
    let Some(colon) = rest[..at].find(':') else {
        return a.to_string();
    };
    format!("{}{}:***{}", &a[..start], &rest[..colon], &rest[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_names_a_probe_set_and_nothing_else() {
        assert_eq!(parse_request(b"").unwrap().probes, ProbeSet::Full);
        assert_eq!(parse_request(b"{}").unwrap().probes, ProbeSet::Full);
        assert_eq!(
            parse_request(br#"{"probes":"kernel"}"#).unwrap().probes,
            ProbeSet::Kernel
        );
        for bad in [
            &br#"{"command":"cat /etc/shadow"}"#[..],
            br#"{"probes":"full","path":"/etc/shadow"}"#,
            br#"{"probes":"/bin/sh"}"#,
            br#"{"probes":["full","rm -rf /"]}"#,
            br#"["full"]"#,
            b"not json",
        ] {
            let e = parse_request(bad).unwrap_err();
            assert!(e.contains("names only a probe set"), "{e}");
        }
        let e = parse_request(br#"{"command":"id"}"#).unwrap_err();
        assert!(e.contains("unknown field `command`"), "{e}");
    }

    #[test]
    fn secrets_in_command_lines_are_masked_before_the_cut() {
        let m = mask_cmdline(&[
            "app",
            "--password",
            "hunter2",
            "--db-token=abc123",
            "API_KEY=zzz",
            "-v",
            "postgres://me:s3cret@db:5432/x",
            "--keyfile",
            "/etc/k",
            "--verbose",
        ]);
        assert_eq!(
            m,
            "app --password *** --db-token=*** API_KEY=*** -v postgres://me:***@db:5432/x --keyfile *** --verbose"
        );
        for s in ["hunter2", "abc123", "zzz", "s3cret"] {
            assert!(!m.contains(s), "{m}");
        }
        // A flag without a value does not swallow the next flag.
        assert_eq!(
            mask_cmdline(&["x", "--token", "--debug"]),
            "x --token --debug"
        );
        let long: Vec<String> = (0..100).map(|i| format!("arg{i}")).collect();
        let m = mask_cmdline(&long);
        assert!(m.len() <= MAX_CMDLINE, "{}", m.len());
        assert!(mask_cmdline(&["ä".repeat(300)]).len() <= MAX_CMDLINE);
    }

    #[test]
    fn answers_over_a_bound_are_refused() {
        let mut a = Answer {
            v: crate::VERSION,
            agent: Identity {
                instance_id: "i-1".into(),
                image_id: "img".into(),
                ..Default::default()
            },
            request_id: 1,
            snapshot: Snapshot::default(),
        };
        assert!(validate(&a).is_ok());
        a.snapshot.kernel = Some(vec![KernelLine::default(); MAX_KERNEL_LINES + 1]);
        assert!(validate(&a).unwrap_err().contains("kernel lines"));
        a.snapshot.kernel = None;
        a.snapshot.processes = Some(vec![Process {
            cmdline: "x".repeat(MAX_CMDLINE + 1),
            ..Default::default()
        }]);
        assert!(validate(&a).unwrap_err().contains("cmdline"));
        let bomb = crate::gzip(&vec![b' '; MAX_SNAPSHOT_BYTES + 10]);
        assert!(decode_answer(&bomb, true).unwrap_err().is_too_large());
    }
}
