//! A small NETLINK_SOCK_DIAG client: one SOCK_DIAG_BY_FAMILY dump per (family, protocol),
//! all states, giving what `/proc/net/{tcp,tcp6,udp,udp6}` gives (state, local address and
//! port, remote port, inode) without the kernel re-walking the whole TCP established hash for
//! every page read of the /proc file.
//!
//! The only unsafe code is the four socket syscalls through `libc`; every reply byte is
//! parsed with bounds checks, and the socket has a receive timeout plus an overall deadline,
//! so a dump can neither panic nor hang.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// The older inet_diag request: it names no family, so one dump covers IPv4 and IPv6 (the
/// kernel keeps both in one TCP hash, which a dump per family walks twice).
const TCPDIAG_GETSOCK: u16 = 18;
/// `struct inet_diag_req` (the older request).
const REQ_V1_LEN: usize = 60;
/// Every TCP state in an `idiag_states` mask.
pub const ALL_STATES: u32 = u32::MAX;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg`, before its attributes.
const MSG_LEN: usize = 72;
/// The longest one recv waits.
const RECV_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest one dump may take.
const DEADLINE: Duration = Duration::from_secs(5);
/// Most sockets taken from one dump: past this the kernel is not answering as documented.
const MAX_ENTRIES: usize = 4_000_000;

pub const AF_INET: u8 = libc::AF_INET as u8;
pub const AF_INET6: u8 = libc::AF_INET6 as u8;
pub const IPPROTO_TCP: u8 = libc::IPPROTO_TCP as u8;
pub const IPPROTO_UDP: u8 = libc::IPPROTO_UDP as u8;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening a NETLINK_SOCK_DIAG socket: {0}")]
    Open(io::Error),
    #[error("sending the dump request: {0}")]
    Send(io::Error),
    #[error("receiving the dump: {0}")]
    Recv(io::Error),
    #[error("the kernel refused the dump: {0}")]
    Kernel(io::Error),
    #[error("malformed reply: {0}")]
    Malformed(&'static str),
    #[error("the dump took longer than {DEADLINE:?}")]
    Timeout,
}

/// One socket of a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The kernel's state number, as /proc/net/tcp prints it.
    pub state: u8,
    pub address: IpAddr,
    pub port: u16,
    pub remote_port: u16,
    pub inode: u64,
}

/// An open sock_diag socket; one can run any number of dumps one after another.
#[derive(Debug)]
pub struct Diag {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Diag {
    pub fn open() -> Result<Diag, Error> {
        // SAFETY: plain syscall with constant arguments; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(Error::Open(io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: tv lives across the call and its size is passed.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(Error::Open(io::Error::last_os_error()));
        }
        Ok(Diag {
            fd,
            seq: 0,
            buf: vec![0; 32 * 1024],
        })
    }

    /// Dump every socket of `family` × `protocol`, calling `f` for each. On an error `f` may
    /// have seen part of the dump: callers tally into scratch space.
    pub fn dump(&mut self, family: u8, protocol: u8, f: impl FnMut(Entry)) -> Result<(), Error> {
        self.seq = self.seq.wrapping_add(1);
        let req = request(family, protocol, self.seq);
        self.run(req, f)
    }

    /// Dump the TCP sockets of both families whose state is in `states` (bit N: state N), in
    /// one walk of the kernel's hash tables. A mask without `TCP_TIME_WAIT` saves the kernel
    /// a message per TIME_WAIT socket (thousands on a busy box); the walk itself remains.
    pub fn dump_tcp(&mut self, states: u32, f: impl FnMut(Entry)) -> Result<(), Error> {
        self.seq = self.seq.wrapping_add(1);
        let req = request_tcp_both(states, self.seq);
        self.run(req, f)
    }

    fn run(&mut self, req: Vec<u8>, mut f: impl FnMut(Entry)) -> Result<(), Error> {
        let seq = self.seq;
        // SAFETY: req is a live buffer of the length passed; the kernel is the destination
        // (a zero sockaddr_nl is the kernel, and a connected-less send to it needs no address
        // for sock_diag: the default destination of an AF_NETLINK socket is pid 0).
        let n = unsafe { libc::send(self.fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
        if n < 0 {
            return Err(Error::Send(io::Error::last_os_error()));
        }
        if n as usize != req.len() {
            return Err(Error::Send(io::Error::other("short send")));
        }
        let start = Instant::now();
        let mut taken = 0usize;
        loop {
            if start.elapsed() > DEADLINE {
                return Err(Error::Timeout);
            }
            // SAFETY: buf is a live, writable buffer of the length passed.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if matches!(e.raw_os_error(), Some(libc::EAGAIN)) {
                    return Err(Error::Timeout);
                }
                return Err(Error::Recv(e));
            }
            let data = self.buf.get(..n as usize).unwrap_or_default();
            match parse(data, seq, &mut |e| {
                taken += 1;
                f(e)
            })? {
                Step::Done => return Ok(()),
                Step::More => {}
            }
            if taken > MAX_ENTRIES {
                return Err(Error::Malformed("more sockets than any box holds"));
            }
        }
    }
}

/// nlmsghdr + inet_diag_req_v2 asking for every state of one family and protocol.
fn request(family: u8, protocol: u8, seq: u32) -> Vec<u8> {
    let len = NLMSG_HDRLEN + REQ_LEN;
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    // sdiag_family, sdiag_protocol, idiag_ext, pad
    b.extend_from_slice(&[family, protocol, 0, 0]);
    // idiag_states: all
    b.extend_from_slice(&u32::MAX.to_ne_bytes());
    // inet_diag_sockid: zero (no filter)
    b.resize(len, 0);
    b
}

/// nlmsghdr + the older `struct inet_diag_req`: family left 0, which this request type takes
/// as both; the states mask; no filter.
fn request_tcp_both(states: u32, seq: u32) -> Vec<u8> {
    let len = NLMSG_HDRLEN + REQ_V1_LEN;
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&TCPDIAG_GETSOCK.to_ne_bytes());
    b.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    // idiag_family, idiag_src_len, idiag_dst_len, idiag_ext, then a zero inet_diag_sockid
    b.resize(NLMSG_HDRLEN + 4 + 48, 0);
    b.extend_from_slice(&states.to_ne_bytes());
    // idiag_dbs
    b.extend_from_slice(&0u32.to_ne_bytes());
    b
}

#[derive(Debug, PartialEq)]
enum Step {
    More,
    Done,
}

fn u16_ne(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u16_be(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_ne(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// One datagram of netlink messages. Messages of other sequence numbers are skipped.
fn parse(mut data: &[u8], seq: u32, f: &mut dyn FnMut(Entry)) -> Result<Step, Error> {
    while !data.is_empty() {
        let len = u32_ne(data, 0).ok_or(Error::Malformed("short nlmsghdr"))? as usize;
        let kind = u16_ne(data, 4).ok_or(Error::Malformed("short nlmsghdr"))?;
        let mseq = u32_ne(data, 8).ok_or(Error::Malformed("short nlmsghdr"))?;
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(Error::Malformed("nlmsg_len out of bounds"));
        }
        let body = &data[NLMSG_HDRLEN..len];
        // NLMSG_ALIGN: the next message starts on a 4-byte boundary.
        let next = (len + 3) & !3;
        data = data.get(next..).unwrap_or_default();
        if mseq != seq {
            continue;
        }
        match kind {
            NLMSG_DONE => return Ok(Step::Done),
            NLMSG_ERROR => {
                let errno = u32_ne(body, 0).ok_or(Error::Malformed("short nlmsgerr"))? as i32;
                if errno == 0 {
                    // An ack, not an error.
                    continue;
                }
                return Err(Error::Kernel(io::Error::from_raw_os_error(
                    errno.saturating_neg(),
                )));
            }
            // Replies carry the request's type.
            SOCK_DIAG_BY_FAMILY | TCPDIAG_GETSOCK => f(entry(body)?),
            _ => {}
        }
    }
    Ok(Step::More)
}

/// `struct inet_diag_msg`: family, state, timer, retrans, then inet_diag_sockid (sport and
/// dport big-endian, src and dst 16 bytes each, interface, cookie), expires, rqueue, wqueue,
/// uid, inode.
fn entry(b: &[u8]) -> Result<Entry, Error> {
    let bad = Error::Malformed("short inet_diag_msg");
    if b.len() < MSG_LEN {
        return Err(bad);
    }
    let family = b[0];
    let state = b[1];
    let port = u16_be(b, 4).ok_or(Error::Malformed("short inet_diag_msg"))?;
    let remote_port = u16_be(b, 6).ok_or(Error::Malformed("short inet_diag_msg"))?;
    let src: [u8; 16] = b
        .get(8..24)
        .and_then(|s| s.try_into().ok())
        .ok_or(Error::Malformed("short inet_diag_msg"))?;
    let address = if family == AF_INET6 {
        IpAddr::V6(Ipv6Addr::from(src))
    } else if family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3]))
    } else {
        return Err(Error::Malformed("unknown address family"));
    };
    let inode = u32_ne(b, 68).ok_or(Error::Malformed("short inet_diag_msg"))?;
    Ok(Entry {
        state,
        address,
        port,
        remote_port,
        inode: u64::from(inode),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + body.len();
        let mut b = Vec::new();
        b.extend_from_slice(&(len as u32).to_ne_bytes());
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(body);
        while b.len() % 4 != 0 {
            b.push(0);
        }
        b
    }

    fn diag_msg() -> Vec<u8> {
        let mut m = vec![0u8; MSG_LEN];
        m[0] = AF_INET;
        m[1] = 0x0A;
        m[4..6].copy_from_slice(&22u16.to_be_bytes());
        m[8..12].copy_from_slice(&[127, 0, 0, 1]);
        m[68..72].copy_from_slice(&4242u32.to_ne_bytes());
        m
    }

    #[test]
    fn parses_entries_done_and_errors() {
        let mut got = Vec::new();
        let mut d = msg(SOCK_DIAG_BY_FAMILY, 7, &diag_msg());
        d.extend(msg(SOCK_DIAG_BY_FAMILY, 6, &diag_msg())); // another seq: skipped
        d.extend(msg(NLMSG_DONE, 7, &[0; 4]));
        assert_eq!(parse(&d, 7, &mut |e| got.push(e)).unwrap(), Step::Done);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].address.to_string(), "127.0.0.1");
        assert_eq!((got[0].port, got[0].state, got[0].inode), (22, 0x0A, 4242));

        let e = msg(NLMSG_ERROR, 7, &(-libc::ENOENT).to_ne_bytes());
        assert!(matches!(parse(&e, 7, &mut |_| {}), Err(Error::Kernel(_))));
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        let full = msg(SOCK_DIAG_BY_FAMILY, 1, &diag_msg());
        assert_eq!(parse(&[], 1, &mut |_| {}).unwrap(), Step::More);
        for cut in 1..full.len() {
            assert!(parse(&full[..cut], 1, &mut |_| {}).is_err(), "cut at {cut}");
        }
        let mut lying = full.clone();
        lying[0..4].copy_from_slice(&100_000u32.to_ne_bytes());
        assert!(parse(&lying, 1, &mut |_| {}).is_err());
        let mut tiny = full;
        tiny[0..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(parse(&tiny, 1, &mut |_| {}).is_err());
        let short = msg(SOCK_DIAG_BY_FAMILY, 1, &[0; 10]);
        assert!(parse(&short, 1, &mut |_| {}).is_err());
    }
}
