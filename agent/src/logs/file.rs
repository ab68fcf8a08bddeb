//! One tailed file: its identity, how far it has been read, and the low-level reads.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::time::Instant;

/// How many leading bytes identify a file's contents (with its device and inode).
pub(super) const HEAD_MAX: u64 = 256;

/// The first bytes of a file, hashed: tells a reused inode or a rewritten file from the one
/// a checkpoint was taken of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Head {
    pub len: u32,
    pub hash: u64,
}

impl Head {
    pub(super) const EMPTY: Head = Head { len: 0, hash: 0 };

    pub(super) fn hex(&self) -> String {
        format!("{:016x}", self.hash)
    }

    pub(super) fn from_hex(len: u32, s: &str) -> Option<Head> {
        u64::from_str_radix(s, 16)
            .ok()
            .map(|hash| Head { len, hash })
    }
}

fn hash(bytes: &[u8]) -> u64 {
    if bytes.is_empty() {
        return 0;
    }
    let h = blake3::hash(bytes);
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// The head of `file` as it is now, over at most `HEAD_MAX` bytes.
pub(super) fn head_of(file: &File) -> io::Result<Head> {
    let mut buf = [0u8; HEAD_MAX as usize];
    let n = read_full_at(file, &mut buf, 0)?;
    Ok(Head {
        len: n as u32,
        hash: hash(&buf[..n]),
    })
}

/// Does `file` still start with the bytes `head` was taken of?
pub(super) fn head_matches(file: &File, head: Head) -> io::Result<bool> {
    if head.len == 0 {
        return Ok(true);
    }
    let mut buf = [0u8; HEAD_MAX as usize];
    let want = (head.len as usize).min(buf.len());
    let n = read_full_at(file, &mut buf[..want], 0)?;
    Ok(n == want && hash(&buf[..n]) == head.hash)
}

/// pread until `buf` is full or the end of the file.
pub(super) fn read_full_at(file: &File, buf: &mut [u8], mut off: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], off) {
            Ok(0) => break,
            Ok(k) => {
                n += k;
                off += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// One pread (retried on EINTR). A short count means the end of the file at that moment.
pub(super) fn read_at(file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    loop {
        match file.read_at(buf, off) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

/// Where "start at the end" really starts: just after the last complete line, so a line being
/// written at that moment is read whole rather than cut in two.
pub(super) fn end_offset(file: &File, size: u64) -> io::Result<u64> {
    const BACK: u64 = 64 << 10;
    let from = size.saturating_sub(BACK);
    let mut buf = vec![0u8; (size - from) as usize];
    let n = read_full_at(file, &mut buf, from)?;
    Ok(match buf[..n].iter().rposition(|&b| b == b'\n') {
        Some(i) => from + i as u64 + 1,
        None => size,
    })
}

/// The index of the first newline in `hay` (libc's memchr: vectorised, no extra crate).
#[inline]
pub(super) fn find_nl(hay: &[u8]) -> Option<usize> {
    if hay.is_empty() {
        return None;
    }
    // SAFETY: memchr reads at most hay.len() bytes from a valid slice; a non-null result
    // points inside it.
    let p = unsafe { libc::memchr(hay.as_ptr().cast(), b'\n' as libc::c_int, hay.len()) };
    if p.is_null() {
        None
    } else {
        Some(p as usize - hay.as_ptr() as usize)
    }
}

/// A file being tailed. Identity is (dev, ino) + head; `src` is the path it was first seen
/// under (the `path` tag), kept when rotation renames it.
#[derive(Debug)]
pub(super) struct Tracked {
    pub src: String,
    /// `src` cut to what a tag value may hold: the `path` tag of its lines.
    pub tag: String,
    /// The pattern match that names this file now; None once it was rotated away or deleted.
    pub path: Option<PathBuf>,
    /// Where the file was last seen, to open it again after the budget closed it.
    pub loc: PathBuf,
    /// None while closed to stay within `--max-open-files`; (dev, ino) + head find it again.
    pub file: Option<File>,
    /// Something may be unread: it changed, was closed before its end, or could not be
    /// opened. Read on the next round even without an event.
    pub pending: bool,
    /// Deleted while it was closed: nothing more can be read; dropped at the end of a round.
    pub gone: bool,
    pub dev: u64,
    pub ino: u64,
    pub head: Head,
    /// Next byte to read: everything before it is in the current batch or in the spool.
    pub offset: u64,
    /// `offset` as of the last batch the spool took; a batch the spool refused rewinds here.
    pub committed: u64,
    /// Next part number when the line at `offset` continues one cut for being huge.
    pub part: Option<u32>,
    pub committed_part: Option<u32>,
    /// A last line without its newline: where it starts and since when it has been waiting.
    pub tail_since: Option<(u64, Instant)>,
    /// File size at the last check, and when it last changed.
    pub size: u64,
    pub changed_at: Instant,
    /// The file's ctime at the last check, if it was already old then (see `Stamp`).
    pub stamp: Option<Stamp>,
}

/// A file's status-change time (ctime, which truncation and every write move) as of a check.
/// An unchanged size alone does not prove an unchanged file: copytruncate followed by the
/// same number of bytes (fixed-width lines) gives the same size with other lines in it.
/// Equal size and equal ctime do, but only once the ctime is older than the kernel's
/// timestamp granularity, so a rewrite within the same clock tick cannot hide behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stamp(i64, i64);

impl Stamp {
    /// How old a ctime must be before it vouches for the file: well above the coarse clock
    /// tick (1-10 ms) that file timestamps use.
    const SETTLED_NS: i128 = 1_000_000_000;

    /// The stamp of `md`, or None while its ctime is too recent to vouch for anything.
    pub(super) fn of(md: &std::fs::Metadata) -> Option<Stamp> {
        let s = Stamp::read(md);
        let ct = s.0 as i128 * 1_000_000_000 + s.1 as i128;
        (super::now_ns() as i128 - ct >= Self::SETTLED_NS).then_some(s)
    }

    /// True when `md` is the file this stamp was taken of, unchanged since.
    pub(super) fn vouches_for(self, md: &std::fs::Metadata) -> bool {
        self == Stamp::read(md)
    }

    fn read(md: &std::fs::Metadata) -> Stamp {
        Stamp(md.ctime(), md.ctime_nsec())
    }
}

impl Tracked {
    pub(super) fn new(
        src: String,
        path: Option<PathBuf>,
        file: File,
        md: &std::fs::Metadata,
        head: Head,
        offset: u64,
        now: Instant,
    ) -> Tracked {
        let mut t = Tracked::closed(src, path, md.dev(), md.ino(), head, offset, now);
        t.file = Some(file);
        t.size = md.len();
        t.stamp = Stamp::of(md);
        t.pending = false;
        t
    }

    /// A file known only from a checkpoint (it could not be opened yet): read from `offset`
    /// once it can be.
    pub(super) fn closed(
        src: String,
        path: Option<PathBuf>,
        dev: u64,
        ino: u64,
        head: Head,
        offset: u64,
        now: Instant,
    ) -> Tracked {
        Tracked {
            tag: phoenix_wire::cut_value(&src),
            loc: path.clone().unwrap_or_else(|| PathBuf::from(&src)),
            src,
            path,
            file: None,
            pending: true,
            gone: false,
            dev,
            ino,
            head,
            offset,
            committed: offset,
            part: None,
            committed_part: None,
            tail_since: None,
            size: offset,
            changed_at: now,
            stamp: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newline_search() {
        assert_eq!(find_nl(b""), None);
        assert_eq!(find_nl(b"abc"), None);
        assert_eq!(find_nl(b"\n"), Some(0));
        assert_eq!(
            find_nl(&[b"x".repeat(1000), b"\n".to_vec()].concat()),
            Some(1000)
        );
    }

    #[test]
    fn head_tells_files_apart() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, "first line\n").unwrap();
        let f = File::open(&p).unwrap();
        let h = head_of(&f).unwrap();
        assert_eq!(h.len, 11);
        std::fs::write(&p, "first line\nand more\n").unwrap();
        assert!(head_matches(&f, h).unwrap(), "appending keeps the head");
        std::fs::write(&p, "other text\n").unwrap();
        assert!(
            !head_matches(&f, h).unwrap(),
            "rewritten content is another file"
        );
        std::fs::write(&p, "first").unwrap();
        assert!(
            !head_matches(&f, h).unwrap(),
            "shorter than the head is not the same file"
        );
        assert_eq!(Head::from_hex(11, &h.hex()), Some(h));
    }

    #[test]
    fn end_offset_backs_up_to_a_line_start() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, "one\ntwo\nthr").unwrap();
        let f = File::open(&p).unwrap();
        assert_eq!(end_offset(&f, 11).unwrap(), 8);
        std::fs::write(&p, "no newline").unwrap();
        assert_eq!(end_offset(&f, 10).unwrap(), 10);
    }
}
