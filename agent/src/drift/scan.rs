//! Walking and hashing the watched trees into a [`Tree`] of entries with cached leaf hashes.
//!
//! Reads only: files are opened read-only with O_NOFOLLOW|O_NONBLOCK (a file swapped for a FIFO
//! or a symlink between the walk and the open neither blocks nor gets followed), symlinks are
//! never followed, and the walk never leaves the paths it was given.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use phoenix_wire::drift::{leaf_hash, root_of};
use phoenix_wire::FileEntry;

use super::glob::Excludes;

/// Read size for content hashing: big enough that BLAKE3 hashes many chunks per call with SIMD
/// and the syscall count stays low on big files, small enough to stay in L2.
const READ_BUF: usize = 64 << 10;

/// The text form of a path used as the entry's key: the path itself when it is UTF-8 without
/// backslashes, else the lossless escaped form of [`phoenix_wire::logtext`] (backslashes
/// doubled, bad bytes as `\xNN`), so two different paths never share a key.
pub fn path_text(p: &Path) -> String {
    let bytes = p.as_os_str().as_bytes();
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.contains('\\') => s.to_owned(),
        Ok(s) => s.replace('\\', "\\\\"),
        Err(_) => phoenix_wire::logtext::encode(bytes).0,
    }
}

/// What is compared to decide whether a file needs re-hashing on an incremental refresh.
/// ctime moves on any content or metadata change and cannot be set by a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Fingerprint {
    fn of(m: &fs::Metadata) -> Fingerprint {
        Fingerprint {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// What a walked path is: an entry without its path, compact, because an idle agent holds one
/// per watched path for its whole life. Hashes are bytes, not hex; the wire form
/// ([`FileEntry`]) is rebuilt only when a report is queued.
#[derive(Debug, Clone)]
struct Parts {
    kind: u8,
    mode: u32,
    uid: u32,
    gid: u32,
    /// BLAKE3 of the contents (`f`) or of the link target (`l`).
    hash: Option<[u8; 32]>,
    size: Option<u64>,
    /// The link target (`l`) or why the path could not be read (`e`).
    extra: Option<Box<str>>,
}

/// One entry as kept between scans; its path is the tree's key (stored once).
#[derive(Debug, Clone)]
struct Node {
    parts: Parts,
    leaf: [u8; 32],
    fp: Option<Fingerprint>,
}

impl Node {
    fn new(key: &str, parts: Parts, fp: Option<Fingerprint>) -> Node {
        let leaf = leaf_hash(&parts.entry(key));
        Node { parts, leaf, fp }
    }
}

impl Parts {
    /// What `m` says of a path of this kind. Size only for files: shown as old → new next
    /// to the content hash, and left out of the leaf hash.
    fn of(kind: u8, m: &fs::Metadata, hash: Option<[u8; 32]>, extra: Option<Box<str>>) -> Parts {
        Parts {
            kind,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            hash,
            extra,
            size: (kind == b'f').then_some(m.len()),
        }
    }

    /// The wire form of this entry at `key`.
    fn entry(&self, key: &str) -> FileEntry {
        let kind = char::from(self.kind);
        let extra = || self.extra.as_deref().map(str::to_owned);
        FileEntry {
            path: key.to_owned(),
            kind,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            hash: self
                .hash
                .map(|h| blake3::Hash::from(h).to_hex().to_string())
                .unwrap_or_default(),
            target: if kind == 'l' { extra() } else { None },
            error: if kind == 'e' { extra() } else { None },
            size: self.size,
        }
    }
}

/// [`Tree::entries_list`]: serialises as the sequence [`Tree::entries`] would.
#[derive(Debug, Clone, Copy)]
pub struct EntriesList<'a>(&'a Tree);

impl serde::Serialize for EntriesList<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter_entries())
    }
}

/// The current entries of the watched trees, sorted by path, each with its cached leaf hash.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    nodes: BTreeMap<Box<str>, Node>,
}

impl Tree {
    /// The Merkle root over the cached leaves; no file is read.
    pub fn root(&self) -> String {
        root_of(self.nodes.len(), self.nodes.values().map(|n| &n.leaf))
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The entries, sorted by path.
    pub fn entries(&self) -> Vec<FileEntry> {
        self.iter_entries().collect()
    }

    /// Each entry in path order, built from its node as it is reached.
    fn iter_entries(&self) -> impl Iterator<Item = FileEntry> + '_ {
        self.nodes.iter().map(|(k, n)| n.parts.entry(k))
    }

    /// The entries, sorted by path, as a list that serialises straight from the tree: a drift
    /// report's full list is never held whole (it was the largest buffer of an idle agent).
    pub fn entries_list(&self) -> EntriesList<'_> {
        EntriesList(self)
    }

    pub fn get(&self, key: &str) -> Option<FileEntry> {
        self.nodes.get(key).map(|n| n.parts.entry(key))
    }

    /// Remove `key` and everything below it; returns what was removed.
    fn take_subtree(&mut self, key: &str) -> BTreeMap<Box<str>, Node> {
        let mut out = BTreeMap::new();
        if let Some((k, n)) = self.nodes.remove_entry(key) {
            out.insert(k, n);
        }
        let prefix = if key.ends_with('/') {
            key.to_string()
        } else {
            format!("{key}/")
        };
        // Keys below `prefix` sort between "prefix" and "prefix" with its '/' bumped to '0'.
        let mut end = prefix.clone();
        end.pop();
        end.push('0');
        let keys: Vec<Box<str>> = self
            .nodes
            .range::<str, _>((
                std::ops::Bound::Included(prefix.as_str()),
                std::ops::Bound::Excluded(end.as_str()),
            ))
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            let n = self.nodes.remove(&k).expect("key just listed");
            out.insert(k, n);
        }
        out
    }
}

/// One path found by the walk, not yet hashed.
struct Item {
    key: String,
    path: PathBuf,
    /// None with `err`: even lstat failed (the entry becomes `e` with zeroed attributes).
    /// None without `err`: a regular file per the directory listing, not stat'ed yet.
    meta: Option<fs::Metadata>,
    /// Set when the directory could not be listed (the entry becomes `e`).
    err: Option<io::Error>,
}

/// The watched roots, the excludes and how many threads hash files.
#[derive(Debug, Clone)]
pub struct Scanner {
    roots: Vec<PathBuf>,
    excludes: Excludes,
    threads: usize,
    /// Files whose contents this scanner has read, for logs and for tests of incrementality.
    hashed: std::sync::Arc<AtomicUsize>,
}

impl Scanner {
    /// `roots` should be absolute; relative ones are made absolute against the current directory.
    pub fn new(roots: &[PathBuf], excludes: Excludes, threads: usize) -> Scanner {
        let roots = roots
            .iter()
            .map(|r| std::path::absolute(r).unwrap_or_else(|_| r.clone()))
            .collect();
        Scanner {
            roots,
            excludes,
            threads: threads.max(1),
            hashed: Default::default(),
        }
    }

    /// How many files' contents this scanner (and its clones) has read so far.
    pub fn files_hashed(&self) -> usize {
        self.hashed.load(Ordering::Relaxed)
    }

    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    pub fn excludes(&self) -> &Excludes {
        &self.excludes
    }

    /// Read every watched file. Nothing is reused from earlier scans: this is the check that
    /// catches whatever inotify missed.
    pub fn full_scan(&self) -> Tree {
        let mut tree = Tree::default();
        if self.threads <= 1 {
            // What `run` does: each file is hashed as the walk reaches it and goes straight
            // into the tree, so the scan never holds a list of every path and its metadata
            // next to the tree (that list was an idle agent's peak RSS, issue 16).
            let mut buf = vec![0u8; READ_BUF];
            for r in &self.roots {
                self.walk(r, false, &mut |it| {
                    if let Some(n) = node_for(&it, None, &mut buf, &self.hashed) {
                        tree.nodes.insert(it.key.into_boxed_str(), n);
                    }
                });
            }
            return tree;
        }
        let mut items = Vec::new();
        for r in &self.roots {
            self.walk(r, false, &mut |it| items.push(it));
        }
        for (k, n) in self.build(items, None) {
            tree.nodes.insert(k.into_boxed_str(), n);
        }
        tree
    }

    /// Bring `tree` up to date for paths an event named. A file is re-hashed; a directory's
    /// subtree is re-walked, re-hashing only files whose inode, size or times moved; a path that
    /// is gone takes its subtree with it. Returns how many paths were looked at.
    pub fn refresh<'a>(&self, tree: &mut Tree, paths: impl IntoIterator<Item = &'a Path>) -> usize {
        let mut n = 0;
        for path in paths {
            if !self.covers(path) {
                continue;
            }
            n += 1;
            let key = path_text(path);
            let meta = match fs::symlink_metadata(path) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    tree.take_subtree(&key);
                    continue;
                }
                Err(e) => {
                    tree.take_subtree(&key);
                    if let Some(node) = error_node(&key, None, &e) {
                        tree.nodes.insert(key.into_boxed_str(), node);
                    }
                    continue;
                }
            };
            let old = tree.take_subtree(&key);
            let items = if meta.is_dir() {
                let mut items = Vec::new();
                self.walk(path, true, &mut |it| items.push(it));
                items
            } else {
                vec![Item {
                    key,
                    path: path.to_path_buf(),
                    meta: Some(meta),
                    err: None,
                }]
            };
            // A directory's unchanged files keep their hashes; a file named by an event is
            // always read again.
            let prev = meta_is_dir(&items, path).then_some(&old);
            for (k, node) in self.build(items, prev) {
                tree.nodes.insert(k.into_boxed_str(), node);
            }
        }
        n
    }

    /// Whether an event path is inside a watched root and neither it nor a directory between
    /// it and the root is excluded.
    pub fn covers(&self, path: &Path) -> bool {
        let Some(root) = self.roots.iter().find(|r| path.starts_with(r)) else {
            return false;
        };
        path.ancestors()
            .take_while(|a| a.starts_with(root))
            .all(|a| !self.excludes.matches(&path_text(a)))
    }

    /// Collect `start` and, for a directory, everything below it that is not excluded.
    /// Without `stat_files`, regular files (known from the directory listing's d_type) are not
    /// lstat'ed here: the fstat after opening them gives the same attributes, which saves one
    /// syscall per file on a full scan. Refreshes stat them to compare fingerprints.
    fn walk(&self, start: &Path, stat_files: bool, emit: &mut impl FnMut(Item)) {
        let key = path_text(start);
        if self.excludes.matches(&key) {
            return;
        }
        let meta = match fs::symlink_metadata(start) {
            Ok(m) => m,
            // A watched root that does not exist has no entries; its files show as removed.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::debug!(path = %start.display(), error = %e, "cannot stat watched path");
                return;
            }
        };
        let mut stack = vec![(start.to_path_buf(), key, meta)];
        // One directory's files and errors, emitted after the directory itself (whose error
        // is known only once its listing is read): a walk emits `start` first.
        let mut items = Vec::new();
        while let Some((path, key, meta)) = stack.pop() {
            if !meta.is_dir() {
                emit(Item {
                    key,
                    path,
                    meta: Some(meta),
                    err: None,
                });
                continue;
            }
            let mut dir = Item {
                key,
                path: path.clone(),
                meta: Some(meta),
                err: None,
            };
            let rd = match fs::read_dir(&path) {
                Ok(rd) => rd,
                Err(e) => {
                    dir.err = Some(e);
                    emit(dir);
                    continue;
                }
            };
            for de in rd {
                let de = match de {
                    Ok(de) => de,
                    Err(e) => {
                        // The listing broke off: the directory is reported unreadable rather
                        // than silently short of entries.
                        dir.err = Some(e);
                        break;
                    }
                };
                let child = de.path();
                let ck = path_text(&child);
                if self.excludes.matches(&ck) {
                    continue;
                }
                if !stat_files && de.file_type().is_ok_and(|t| t.is_file()) {
                    items.push(Item {
                        key: ck,
                        path: child,
                        meta: None,
                        err: None,
                    });
                    continue;
                }
                // DirEntry::metadata is lstat: symlinks are not followed.
                match de.metadata() {
                    Ok(m) => stack.push((child, ck, m)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => items.push(Item {
                        key: ck,
                        path: child,
                        meta: None,
                        err: Some(e),
                    }),
                }
            }
            emit(dir);
            items.drain(..).for_each(&mut *emit);
        }
    }

    /// Turn walked items into nodes, hashing files on up to `threads` threads.
    fn build(
        &self,
        items: Vec<Item>,
        prev: Option<&BTreeMap<Box<str>, Node>>,
    ) -> Vec<(String, Node)> {
        let threads = self.threads.min(items.len() / 64 + 1);
        if threads <= 1 {
            let mut buf = vec![0u8; READ_BUF];
            return items
                .into_iter()
                .filter_map(|it| node_for(&it, prev, &mut buf, &self.hashed).map(|n| (it.key, n)))
                .collect();
        }
        // Small chunks from a shared counter: one big file does not leave the other threads idle.
        const CHUNK: usize = 16;
        let next = AtomicUsize::new(0);
        let mut slots: Vec<Option<Node>> = Vec::with_capacity(items.len());
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut buf = vec![0u8; READ_BUF];
                        let mut out = Vec::new();
                        loop {
                            let start = next.fetch_add(CHUNK, Ordering::Relaxed);
                            if start >= items.len() {
                                break;
                            }
                            for (i, it) in items.iter().enumerate().skip(start).take(CHUNK) {
                                out.push((i, node_for(it, prev, &mut buf, &self.hashed)));
                            }
                        }
                        out
                    })
                })
                .collect();
            slots.resize(items.len(), None);
            for h in handles {
                for (i, n) in h.join().expect("hashing thread panicked") {
                    slots[i] = n;
                }
            }
        });
        items
            .into_iter()
            .zip(slots)
            .filter_map(|(it, n)| n.map(|n| (it.key, n)))
            .collect()
    }
}

fn meta_is_dir(items: &[Item], path: &Path) -> bool {
    items
        .first()
        .is_some_and(|it| it.path == path && it.meta.as_ref().is_some_and(fs::Metadata::is_dir))
}

/// A stable, short reason for an `e` entry: the same failure gives the same text every scan.
fn error_text(e: &io::Error) -> String {
    e.kind().to_string()
}

fn error_node(key: &str, meta: Option<&fs::Metadata>, e: &io::Error) -> Option<Node> {
    let parts = Parts {
        kind: b'e',
        mode: meta.map_or(0, |m| m.mode() & 0o7777),
        uid: meta.map_or(0, |m| m.uid()),
        gid: meta.map_or(0, |m| m.gid()),
        hash: None,
        extra: Some(error_text(e).into_boxed_str()),
        size: None,
    };
    Some(Node::new(key, parts, None))
}

/// Build the node for one walked item; None when the path vanished meanwhile.
fn node_for(
    it: &Item,
    prev: Option<&BTreeMap<Box<str>, Node>>,
    buf: &mut [u8],
    hashed: &AtomicUsize,
) -> Option<Node> {
    let m = match (&it.meta, &it.err) {
        (Some(m), None) => m,
        (m, Some(e)) => return error_node(&it.key, m.as_ref(), e),
        (None, None) => return lazy_file(it, buf, hashed),
    };
    let key = it.key.as_str();
    let ft = m.file_type();
    if ft.is_dir() {
        Some(Node::new(key, Parts::of(b'd', m, None, None), None))
    } else if ft.is_symlink() {
        match fs::read_link(&it.path) {
            Ok(t) => {
                let hash = *blake3::hash(t.as_os_str().as_bytes()).as_bytes();
                Some(Node::new(
                    key,
                    Parts::of(b'l', m, Some(hash), Some(path_text(&t).into_boxed_str())),
                    None,
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => error_node(key, Some(m), &e),
        }
    } else if ft.is_file() {
        let fp = Fingerprint::of(m);
        if let Some(old) = prev.and_then(|p| p.get(key)) {
            if old.fp == Some(fp) && old.parts.kind == b'f' {
                return Some(old.clone());
            }
        }
        hashed.fetch_add(1, Ordering::Relaxed);
        match hash_file(&it.path, buf) {
            // Attributes from fstat of the file that was read, so they match the content.
            Ok((hash, fm)) => Some(Node::new(
                key,
                Parts::of(b'f', &fm, Some(hash), None),
                Some(Fingerprint::of(&fm)),
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => error_node(key, Some(m), &e),
        }
    } else {
        Some(Node::new(key, Parts::of(b'o', m, None, None), None))
    }
}

/// A regular file the walk did not stat: open it, and take its attributes from fstat.
fn lazy_file(it: &Item, buf: &mut [u8], hashed: &AtomicUsize) -> Option<Node> {
    hashed.fetch_add(1, Ordering::Relaxed);
    let fallback = |e: io::Error, buf: &mut [u8]| -> Option<Node> {
        // Unreadable, or no longer a regular file: lstat decides what it is now.
        match fs::symlink_metadata(&it.path) {
            Ok(m) if m.is_file() => error_node(&it.key, Some(&m), &e),
            Ok(m) => node_for(
                &Item {
                    key: it.key.clone(),
                    path: it.path.clone(),
                    meta: Some(m),
                    err: None,
                },
                None,
                buf,
                hashed,
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => error_node(&it.key, None, &e),
        }
    };
    match hash_file(&it.path, buf) {
        Ok((hash, m)) => Some(Node::new(
            &it.key,
            Parts::of(b'f', &m, Some(hash), None),
            Some(Fingerprint::of(&m)),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => fallback(e, buf),
    }
}

fn hash_file(path: &Path, buf: &mut [u8]) -> io::Result<([u8; 32], fs::Metadata)> {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other(
            "replaced by a non-regular file during the scan",
        ));
    }
    let mut h = blake3::Hasher::new();
    loop {
        match f.read(buf) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((*h.finalize().as_bytes(), meta))
}
