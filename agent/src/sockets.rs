//! Sockets from the kernel's sock_diag netlink interface ([`netlink`]), or /proc/net where
//! netlink is refused (containers, seccomp): `netstat` (Telegraf's TCP state counts and `udp_socket`) every
//! interval, and one `phoenix_listen` point per listening TCP or UDP socket, IPv4 and IPv6,
//! named by the process that holds it (found through the /proc/PID/fd inode links).
//!
//! The listening set is sent when it changes and at least every [`RESEND`]; the costly part,
//! walking every process's fds, runs only then, and stops once every inode is found.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use phoenix_wire::{Map, Point, Value};

#[path = "netlink.rs"]
pub mod netlink;

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
    /// Inodes a walk looked for and no process held (another namespace's, or let go during
    /// the walk): not looked for again until the periodic resend, or every set change of a
    /// busy box would walk every fd of every process again.
    unowned: std::collections::HashSet<u64>,
    /// Whether to ask netlink first, per table of [`TABLES`]; off once it has failed.
    netlink: [bool; 4],
    /// Whether to read both TCP tables in one netlink dump without TIME_WAIT sockets (their
    /// count comes from /proc/net/sockstat); off once the kernel refused it.
    tcp_once: bool,
}

/// TCP_TIME_WAIT, the state left out of the one TCP dump.
const TIME_WAIT: u8 = 0x06;

/// The four socket tables: /proc file, protocol, IPv6, and the netlink family and protocol.
const TABLES: [(&str, &str, bool, u8, u8); 4] = [
    (
        "net/tcp",
        "tcp",
        false,
        netlink::AF_INET,
        netlink::IPPROTO_TCP,
    ),
    (
        "net/tcp6",
        "tcp",
        true,
        netlink::AF_INET6,
        netlink::IPPROTO_TCP,
    ),
    (
        "net/udp",
        "udp",
        false,
        netlink::AF_INET,
        netlink::IPPROTO_UDP,
    ),
    (
        "net/udp6",
        "udp",
        true,
        netlink::AF_INET6,
        netlink::IPPROTO_UDP,
    ),
];

/// Where a sample's tables came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Netlink where it answers, /proc/net where it does not.
    Auto,
    /// /proc/net only.
    Proc,
}

/// One table's tally, merged only once the table was read whole.
#[derive(Debug, Default)]
struct Tally {
    counts: BTreeMap<&'static str, i64>,
    listen: BTreeSet<Listen>,
}

impl Tally {
    /// Count one socket; `addr` is formatted only for a listener.
    fn take(
        &mut self,
        proto: &'static str,
        state: u8,
        remote_port: u16,
        l: impl FnOnce() -> Listen,
    ) {
        if proto == "udp" {
            *self.counts.entry("udp_socket").or_insert(0) += 1;
            // Bound and not connected anywhere: what `ss -lu` lists.
            if state == 0x07 && remote_port == 0 {
                self.listen.insert(l());
            }
        } else {
            let name = TCP_STATES
                .iter()
                .find(|(n, _)| *n == state)
                .map_or("tcp_none", |(_, f)| *f);
            *self.counts.entry(name).or_insert(0) += 1;
            if state == 0x0A {
                self.listen.insert(l());
            }
        }
    }
}

impl Sockets {
    pub fn new(proc: impl Into<PathBuf>) -> Sockets {
        Sockets {
            proc: proc.into(),
            sent: None,
            owned: Vec::new(),
            holders: HashMap::new(),
            unowned: Default::default(),
            netlink: [true; 4],
            tcp_once: true,
        }
    }

    /// Read every table, from netlink when `src` allows and it answers. Returns the netstat
    /// counts and the listening set.
    fn read(&mut self, src: Source) -> (BTreeMap<&'static str, i64>, BTreeSet<Listen>) {
        let mut counts: BTreeMap<&'static str, i64> =
            TCP_STATES.iter().map(|(_, n)| (*n, 0)).collect();
        counts.insert("tcp_none", 0);
        counts.insert("udp_socket", 0);
        let mut listen = BTreeSet::new();
        // Netlink sees the agent's own network namespace, which is /proc/net only when the
        // agent reads the real /proc (tests point it at a made-up tree).
        let real = self.proc == std::path::Path::new("/proc");
        let mut diag = None;
        if src == Source::Auto && real && self.netlink.iter().any(|on| *on) {
            match netlink::Diag::open() {
                Ok(d) => diag = Some(d),
                Err(e) => {
                    tracing::warn!(error = %e, "sock_diag netlink refused; reading /proc/net instead");
                    self.netlink = [false; 4];
                }
            }
        }
        // Both TCP tables in one dump: each dump walks the kernel's whole established hash
        // (2 MiB and ~2.5 ms of CPU on a 16 GiB box, however few sockets it holds), which
        // was most of an idle agent's CPU. TIME_WAIT sockets are counted by the kernel in
        // sockstat instead of sent one message each.
        let mut tcp_done = false;
        if self.tcp_once && self.netlink[0] && self.netlink[1] {
            if let (Some(d), Some(tw)) = (diag.as_mut(), sockstat_tw(&self.proc)) {
                let mut t = Tally::default();
                match d.dump_tcp(netlink::ALL_STATES & !(1 << TIME_WAIT), |e| {
                    t.take("tcp", e.state, e.remote_port, || Listen {
                        proto: "tcp",
                        address: e.address.to_string(),
                        port: e.port,
                        inode: e.inode,
                    })
                }) {
                    Ok(()) => {
                        *t.counts.entry("tcp_time_wait").or_insert(0) += tw;
                        for (k, v) in t.counts {
                            *counts.entry(k).or_insert(0) += v;
                        }
                        listen.extend(t.listen);
                        tcp_done = true;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "one sock_diag dump of both TCP tables refused; dumping each table");
                        self.tcp_once = false;
                    }
                }
            }
        }
        for (i, (file, proto, v6, family, protocol)) in TABLES.into_iter().enumerate() {
            if tcp_done && proto == "tcp" {
                continue;
            }
            let mut t = Tally::default();
            let mut done = false;
            if let Some(d) = diag.as_mut().filter(|_| self.netlink[i]) {
                let r = d.dump(family, protocol, |e| {
                    t.take(proto, e.state, e.remote_port, || Listen {
                        proto,
                        address: e.address.to_string(),
                        port: e.port,
                        inode: e.inode,
                    })
                });
                match r {
                    Ok(()) => done = true,
                    Err(e) => {
                        tracing::warn!(table = file, error = %e, "sock_diag netlink failed; reading /proc/{file} from now on");
                        self.netlink[i] = false;
                        t = Tally::default();
                    }
                }
            }
            if !done {
                let Ok(text) = std::fs::read_to_string(self.proc.join(file)) else {
                    continue;
                };
                for line in text.lines().skip(1) {
                    let Some(s) = parse_line(line, v6) else {
                        continue;
                    };
                    let (state, rp) = (s.state, s.remote_port);
                    t.take(proto, state, rp, || s.listen(proto));
                }
            }
            for (k, v) in t.counts {
                *counts.entry(k).or_insert(0) += v;
            }
            listen.extend(t.listen);
        }
        (counts, listen)
    }

    /// Push `netstat`, and `phoenix_listen` points when due. Returns the current listeners
    /// (with their processes as of the last walk), which the SSH evidence reads.
    pub fn sample(&mut self, ts: i64, out: &mut Vec<Point>) -> &[Owned] {
        let (counts, listen) = self.read(Source::Auto);
        out.push(Point {
            m: "netstat".into(),
            tags: Map::new(),
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
                self.unowned.clear();
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
        self.unowned.retain(|i| live.contains_key(i));
        let want: HashMap<u64, ()> = set
            .iter()
            .filter(|l| !self.holders.contains_key(&l.inode) && !self.unowned.contains(&l.inode))
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
        self.unowned
            .extend(want.keys().filter(|i| !found.contains_key(i)));
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

/// TIME_WAIT sockets of the agent's network namespace, both families, from the `tw` of the
/// `TCP:` line of /proc/net/sockstat.
fn sockstat_tw(proc: &std::path::Path) -> Option<i64> {
    let text = std::fs::read_to_string(proc.join("net/sockstat")).ok()?;
    let line = text.lines().find_map(|l| l.strip_prefix("TCP:"))?;
    let mut words = line.split_ascii_whitespace();
    while let Some(w) = words.next() {
        let v = words.next()?;
        if w == "tw" {
            return v.parse().ok();
        }
    }
    None
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
        tags: Map::new(),
        fields: Map::from([
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
    let mut tags = Map::from([
        ("proto".to_string(), o.listen.proto.to_string()),
        ("address".to_string(), o.listen.address.clone()),
        ("port".to_string(), o.listen.port.to_string()),
    ]);
    if let Some(p) = &o.process {
        tags.insert("process_name".into(), phoenix_wire::cut_value(p));
    }
    let mut fields = Map::from([(
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

    /// The tests here open sockets in this process, which the others would see as a change.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn time_wait_from_sockstat() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("net")).unwrap();
        std::fs::write(
            d.path().join("net/sockstat"),
            "sockets: used 120\nTCP: inuse 5 orphan 0 tw 3109 alloc 21 mem 3\nUDP: inuse 2 mem 1\n",
        )
        .unwrap();
        assert_eq!(sockstat_tw(d.path()), Some(3109));
        std::fs::write(d.path().join("net/sockstat"), "TCP: inuse 5 tw\n").unwrap();
        assert_eq!(sockstat_tw(d.path()), None);
    }

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

    /// A listener no process holds is looked for once, not on every change of the set: each
    /// look walks every fd of every process.
    #[test]
    fn an_unheld_listener_is_not_looked_for_again_until_the_resend() {
        let d = tempfile::tempdir().unwrap();
        let proc = d.path();
        std::fs::create_dir_all(proc.join("net")).unwrap();
        let line = |port: &str, inode: u64| {
            format!("   0: 0100007F:{port} 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 {inode} 1\n")
        };
        let head = "  sl  local_address rem_address   st\n".to_string();
        std::fs::write(proc.join("net/tcp"), head.clone() + &line("0016", 999)).unwrap();
        let mut s = Sockets::new(proc);
        let mut out = Vec::new();
        s.sample(1, &mut out);
        assert_eq!(s.owned.len(), 1);
        assert_eq!(s.owned[0].pid, None);
        assert!(s.unowned.contains(&999));
        // Now a process holds 999, and a new listener 1000 changes the set.
        for (pid, inode) in [(6, 1000), (7, 999)] {
            let fd = proc.join(format!("{pid}/fd"));
            std::fs::create_dir_all(&fd).unwrap();
            std::os::unix::fs::symlink(format!("socket:[{inode}]"), fd.join("3")).unwrap();
            std::fs::write(proc.join(format!("{pid}/comm")), "fake\n").unwrap();
        }
        std::fs::write(
            proc.join("net/tcp"),
            head + &line("0016", 999) + &line("1F90", 1000),
        )
        .unwrap();
        s.sample(2, &mut out);
        let pid_of = |s: &Sockets, inode| {
            s.owned
                .iter()
                .find(|o| o.listen.inode == inode)
                .unwrap()
                .pid
        };
        assert_eq!(pid_of(&s, 1000), Some(6), "the new one is found");
        assert_eq!(
            pid_of(&s, 999),
            None,
            "the unheld one was not looked for again"
        );
        // The periodic resend looks for everything again (a box up less than RESEND cannot
        // make an Instant that old).
        if let Some(long_ago) = Instant::now().checked_sub(RESEND) {
            s.sent.as_mut().unwrap().1 = long_ago;
            s.sample(3, &mut out);
            assert_eq!(pid_of(&s, 999), Some(7));
        }
    }

    #[test]
    fn a_listener_opened_here_is_found_with_its_process_and_sent_on_change() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
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

    #[test]
    fn netlink_and_proc_agree_on_sockets_opened_here() {
        use std::net::{TcpListener, TcpStream, UdpSocket};
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let l4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let c4 = TcpStream::connect(l4.local_addr().unwrap()).unwrap();
        let (_a4, _) = l4.accept().unwrap();
        let l6 = TcpListener::bind("[::1]:0").ok();
        let u4 = UdpSocket::bind("127.0.0.1:0").unwrap();
        // The side that closes first waits in TIME_WAIT: counted from sockstat by netlink.
        {
            let c = TcpStream::connect(l4.local_addr().unwrap()).unwrap();
            let (a, _) = l4.accept().unwrap();
            drop(c);
            drop(a);
        }
        let mut s = Sockets::new("/proc");
        let (nc, nl) = s.read(Source::Auto);
        assert!(s.netlink[0], "netlink answered for tcp here");
        assert!(s.tcp_once, "one dump of both TCP tables answered here");
        let (pc, pl) = s.read(Source::Proc);
        let ports: Vec<u16> = [
            Some(l4.local_addr().unwrap().port()),
            l6.as_ref().map(|l| l.local_addr().unwrap().port()),
            Some(u4.local_addr().unwrap().port()),
        ]
        .into_iter()
        .flatten()
        .collect();
        let mine = |set: &BTreeSet<Listen>| -> BTreeSet<Listen> {
            set.iter()
                .filter(|l| ports.contains(&l.port))
                .cloned()
                .collect()
        };
        assert_eq!(mine(&nl), mine(&pl));
        assert_eq!(mine(&nl).len(), ports.len(), "{nl:?}");
        assert_eq!(nc.keys().collect::<Vec<_>>(), pc.keys().collect::<Vec<_>>());
        assert!(nc["tcp_established"] >= 2 && pc["tcp_established"] >= 2);
        assert!(nc["udp_socket"] >= 1 && pc["udp_socket"] >= 1);
        assert!(
            nc["tcp_time_wait"] >= 1 && pc["tcp_time_wait"] >= 1,
            "{nc:?} {pc:?}"
        );
        drop(c4);
    }

    /// Prints, never asserts: the CPU of one read of every table by each path.
    #[test]
    fn print_cost_of_each_path() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = Sockets::new("/proc");
        for src in [Source::Proc, Source::Auto] {
            let t = std::time::Instant::now();
            for _ in 0..50 {
                std::hint::black_box(s.read(src));
            }
            eprintln!(
                "{src:?}: {:?} a read of all four tables (wall, 50 reads)",
                t.elapsed() / 50
            );
        }
        assert!(
            s.netlink.iter().all(|on| *on),
            "netlink answered every table: {:?}",
            s.netlink
        );
    }
}
