//! Sockets from /proc/net: `netstat` (Telegraf's TCP state counts and `udp_socket`) every
//! interval, and one `phoenix_listen` point per listening TCP or UDP socket, IPv4 and IPv6,
//! named by the process that holds it (found through the /proc/PID/fd inode links).
//!
//! The listening set is sent when it changes and at least every [`RESEND`]; the costly part,
//! walking every process's fds, runs only then, and stops once every inode is found.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use phoenix_wire::{Point, Value};

/// The longest the listening set goes unsent.
pub const RESEND: Duration = Duration::from_secs(300);
/// Most listening sockets reported; a box with more still gets its count in `netstat`.
const MAX_LISTEN: usize = 1000;

/// Telegraf's `netstat` field for each TCP state number of /proc/net/tcp.
const TCP_STATES: [(u8, &str); 12] = [
    (0x01, "tcp_established"),
    (0x02, "tcp_syn_sent"),
    (0x03, "tcp_syn_recv"),
    (0x04, "tcp_fin_wait1"),
    (0x05, "tcp_fin_wait2"),
    (0x06, "tcp_time_wait"),
    (0x07, "tcp_close"),
    (0x08, "tcp_close_wait"),
    (0x09, "tcp_last_ack"),
    (0x0A, "tcp_listen"),
    (0x0B, "tcp_closing"),
    (0x0C, "tcp_syn_recv"),
];

/// One listening socket.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listen {
    /// `tcp` or `udp`.
    pub proto: &'static str,
    pub address: String,
    pub port: u16,
    pub inode: u64,
}

/// A listener and the process holding it, as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    pub listen: Listen,
    pub pid: Option<u32>,
    pub process: Option<String>,
}

#[derive(Debug)]
pub struct Sockets {
    proc: PathBuf,
    sent: Option<(BTreeSet<Listen>, Instant)>,
    owned: Vec<Owned>,
    /// Inode to holder from earlier walks: a changed set walks the fds only for new inodes.
    holders: HashMap<u64, u32>,
}

impl Sockets {
    pub fn new(proc: impl Into<PathBuf>) -> Sockets {
        Sockets {
            proc: proc.into(),
            sent: None,
            owned: Vec::new(),
            holders: HashMap::new(),
        }
    }

    /// Push `netstat`, and `phoenix_listen` points when due. Returns the current listeners
    /// (with their processes as of the last walk), which the SSH evidence reads.
    pub fn sample(&mut self, ts: i64, out: &mut Vec<Point>) -> &[Owned] {
        let mut counts: BTreeMap<&'static str, i64> =
            TCP_STATES.iter().map(|(_, n)| (*n, 0)).collect();
        counts.insert("tcp_none", 0);
        counts.insert("udp_socket", 0);
        let mut listen = BTreeSet::new();
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
                let Some(s) = parse_line(line, v6) else {
                    continue;
                };
                if proto == "udp" {
                    *counts.get_mut("udp_socket").unwrap_or(&mut 0) += 1;
                    // Bound and not connected anywhere: what `ss -lu` lists.
                    if s.state == 0x07 && s.remote_port == 0 {
                        listen.insert(s.listen("udp"));
                    }
                } else {
                    let name = TCP_STATES
                        .iter()
                        .find(|(n, _)| *n == s.state)
                        .map_or("tcp_none", |(_, f)| *f);
                    *counts.get_mut(name).unwrap_or(&mut 0) += 1;
                    if s.state == 0x0A {
                        listen.insert(s.listen("tcp"));
                    }
                }
            }
        }
        out.push(Point {
            m: "netstat".into(),
            tags: BTreeMap::new(),
            fields: counts
                .into_iter()
                .map(|(k, v)| (k.to_string(), Value::Int(v)))
                .collect(),
            ts,
        });
        let due = match &self.sent {
            Some((set, at)) => *set != listen || at.elapsed() >= RESEND,
            None => true,
        };
        if due {
            // The periodic resend walks everything again: a pid may have handed a socket on.
            if self
                .sent
                .as_ref()
                .is_none_or(|(_, at)| at.elapsed() >= RESEND)
            {
                self.holders.clear();
            }
            self.owned = self.owners(&listen);
            for o in self.owned.iter().take(MAX_LISTEN) {
                out.push(listen_point(o, ts));
            }
            out.push(set_point(&self.owned, ts));
            self.sent = Some((listen, Instant::now()));
        }
        &self.owned
    }

    /// Which process holds each socket: the lowest pid with an fd on its inode.
    fn owners(&mut self, set: &BTreeSet<Listen>) -> Vec<Owned> {
        let live: HashMap<u64, ()> = set.iter().map(|l| (l.inode, ())).collect();
        self.holders.retain(|i, _| live.contains_key(i));
        let want: HashMap<u64, ()> = set
            .iter()
            .filter(|l| !self.holders.contains_key(&l.inode))
            .map(|l| (l.inode, ()))
            .collect();
        let mut found: HashMap<u64, u32> = HashMap::new();
        let dir = if want.is_empty() {
            None
        } else {
            std::fs::read_dir(&self.proc).ok()
        };
        if let Some(dir) = dir {
            let mut pids: Vec<u32> = dir
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect();
            pids.sort_unstable();
            'pids: for pid in pids {
                let Ok(fds) = std::fs::read_dir(self.proc.join(pid.to_string()).join("fd")) else {
                    continue;
                };
                for fd in fds.flatten() {
                    let Ok(t) = std::fs::read_link(fd.path()) else {
                        continue;
                    };
                    let inode = t
                        .to_str()
                        .and_then(|t| t.strip_prefix("socket:["))
                        .and_then(|t| t.strip_suffix(']'))
                        .and_then(|t| t.parse::<u64>().ok());
                    if let Some(i) = inode.filter(|i| want.contains_key(i)) {
                        found.entry(i).or_insert(pid);
                        if found.len() == want.len() {
                            break 'pids;
                        }
                    }
                }
            }
        }
        self.holders.extend(found);
        set.iter()
            .map(|l| {
                let pid = self.holders.get(&l.inode).copied();
                let process = pid.and_then(|p| {
                    let c = std::fs::read_to_string(self.proc.join(p.to_string()).join("comm"));
                    c.ok()
                        .map(|c| c.trim_end().to_string())
                        .filter(|c| !c.is_empty())
                });
                Owned {
                    listen: l.clone(),
                    pid,
                    process,
                }
            })
            .collect()
    }
}

/// `phoenix_listen_set`: the whole set in one point, sent with the listeners, so a set that
/// shrank (or emptied) reads as such without remembering which series stopped.
fn set_point(owned: &[Owned], ts: i64) -> Point {
    let mut set = String::new();
    for o in owned {
        if !set.is_empty() {
            set.push_str(", ");
        }
        set.push_str(&describe(o));
    }
    Point {
        m: "phoenix_listen_set".into(),
        tags: BTreeMap::new(),
        fields: BTreeMap::from([
            ("count".to_string(), Value::Int(owned.len() as i64)),
            (
                "set".to_string(),
                Value::Str(phoenix_wire::cut_to(&set, 8192)),
            ),
        ]),
        ts,
    }
}

/// `tcp 0.0.0.0:22 sshd[812]`, `udp [::]:53 ?`
pub fn describe(o: &Owned) -> String {
    let l = &o.listen;
    let addr = if l.address.contains(':') {
        format!("[{}]:{}", l.address, l.port)
    } else {
        format!("{}:{}", l.address, l.port)
    };
    match (&o.process, o.pid) {
        (Some(n), Some(p)) => format!("{} {addr} {n}[{p}]", l.proto),
        (None, Some(p)) => format!("{} {addr} [{p}]", l.proto),
        _ => format!("{} {addr} ?", l.proto),
    }
}

fn listen_point(o: &Owned, ts: i64) -> Point {
    let mut tags = BTreeMap::from([
        ("proto".to_string(), o.listen.proto.to_string()),
        ("address".to_string(), o.listen.address.clone()),
        ("port".to_string(), o.listen.port.to_string()),
    ]);
    if let Some(p) = &o.process {
        tags.insert("process_name".into(), phoenix_wire::cut_value(p));
    }
    let mut fields = BTreeMap::from([(
        "inode".to_string(),
        Value::Int(o.listen.inode.min(i64::MAX as u64) as i64),
    )]);
    if let Some(pid) = o.pid {
        fields.insert("pid".into(), Value::Int(pid as i64));
    }
    Point {
        m: "phoenix_listen".into(),
        tags,
        fields,
        ts,
    }
}

#[derive(Debug, PartialEq)]
struct Line {
    address: String,
    port: u16,
    remote_port: u16,
    state: u8,
    inode: u64,
}

impl Line {
    fn listen(self, proto: &'static str) -> Listen {
        Listen {
            proto,
            address: self.address,
            port: self.port,
            inode: self.inode,
        }
    }
}

/// `  0: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000  0 0 12345 ...`
fn parse_line(line: &str, v6: bool) -> Option<Line> {
    let f: Vec<&str> = line.split_ascii_whitespace().collect();
    let (local, remote) = (f.get(1)?, f.get(2)?);
    let (la, lp) = local.split_once(':')?;
    let (_, rp) = remote.split_once(':')?;
    let address = if v6 {
        parse_v6(la)?.to_string()
    } else {
        parse_v4(la)?.to_string()
    };
    Some(Line {
        address,
        port: u16::from_str_radix(lp, 16).ok()?,
        remote_port: u16::from_str_radix(rp, 16).ok()?,
        state: u8::from_str_radix(f.get(3)?, 16).ok()?,
        inode: f.get(9)?.parse().ok()?,
    })
}

/// The kernel prints the address as one host-order u32 in hex.
pub(crate) fn parse_v4(h: &str) -> Option<Ipv4Addr> {
    if h.len() != 8 {
        return None;
    }
    let n = u32::from_str_radix(h, 16).ok()?;
    Some(Ipv4Addr::from(n.to_ne_bytes()))
}

/// Four host-order u32 words in hex.
pub(crate) fn parse_v6(h: &str) -> Option<Ipv6Addr> {
    if h.len() != 32 {
        return None;
    }
    let mut b = [0u8; 16];
    for i in 0..4 {
        let w = u32::from_str_radix(h.get(i * 8..i * 8 + 8)?, 16).ok()?;
        b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    Some(Ipv6Addr::from(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_lines() {
        let l = parse_line("   0: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0", false).unwrap();
        assert_eq!(l.address, "127.0.0.1");
        assert_eq!((l.port, l.state, l.inode), (22, 0x0A, 4242));
        let l6 = parse_line("   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1", true).unwrap();
        assert_eq!(l6.address, "::1");
        assert_eq!(l6.port, 8080);
        assert!(parse_line("  sl  local_address rem_address", false).is_none());
    }

    #[test]
    fn a_listener_opened_here_is_found_with_its_process_and_sent_on_change() {
        let mut s = Sockets::new("/proc");
        let mut out = Vec::new();
        s.sample(1, &mut out);
        assert!(out.iter().any(|p| p.m == "netstat"));
        out.clear();
        s.sample(2, &mut out);
        assert!(
            out.iter().all(|p| p.m != "phoenix_listen") || s.owned.is_empty(),
            "an unchanged set is not resent: {out:?}"
        );
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port().to_string();
        out.clear();
        s.sample(3, &mut out);
        let me = std::process::id() as i64;
        let p = out
            .iter()
            .find(|p| p.m == "phoenix_listen" && p.tags["port"] == port)
            .unwrap_or_else(|| panic!("{out:?}"));
        assert_eq!(p.tags["proto"], "tcp");
        assert_eq!(p.tags["address"], "127.0.0.1");
        assert_eq!(p.fields["pid"], Value::Int(me), "{p:?}");
        assert!(p.tags.contains_key("process_name"));
        let ns = out.iter().find(|p| p.m == "netstat").unwrap();
        let Value::Int(n) = ns.fields["tcp_listen"] else {
            panic!()
        };
        assert!(n >= 1);
        drop(l);
        out.clear();
        s.sample(4, &mut out);
        assert!(
            out.iter()
                .all(|p| p.m != "phoenix_listen" || p.tags["port"] != port),
            "closed: gone from the next set"
        );
    }
}
