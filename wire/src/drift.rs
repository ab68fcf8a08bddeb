//! The drift hash both programs must agree on: how one [`FileEntry`] becomes a leaf hash, how
//! the leaves become the root, the baseline manifest, and the diff between two entry lists.
//!
//! The root is a two-level Merkle tree: each entry's canonical bytes hash to a 32-byte leaf, and
//! the root hashes the leaves in path order. An agent keeps the leaves cached, so one changed
//! file costs one file's re-hash plus a pass over 32-byte leaves (about 1 ms per 40k entries);
//! a positional binary tree would save that pass but needs rebalancing on every add or remove.

use serde::{Deserialize, Serialize};

use crate::{AttrValue, FileChange, FileEntry};

/// Version of the manifest layout.
pub const MANIFEST_VERSION: u32 = 1;

/// Version of the drift hash: how a file becomes its entry (content hash, attributes) and how
/// entries become leaves and the root. Baselines and reports carry it; two hashes of
/// different versions are never compared, so an upgrade that changes the hashing gives "no
/// verdict" (with a note), never a fleet that looks drifted (Karpenter's drift storm after
/// an upgrade changed its hash, fixed the same way).
pub const HASH_VERSION: u32 = 1;

/// Whether this build computes hashes of version `v`.
pub fn computes(v: u32) -> bool {
    v == HASH_VERSION
}

fn hash_v1() -> u32 {
    1
}

/// Domain-separation contexts, so a leaf can never be confused with a root or with a content hash.
const LEAF_CONTEXT: &str = "phoenix-drift 2024 entry leaf v1";
const ROOT_CONTEXT: &str = "phoenix-drift 2024 merkle root v1";

/// What `phoenix-agent bake` writes into the image and registers with the collector.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub version: u32,
    /// [`HASH_VERSION`] of `root` and `entries`; absent in manifests baked before it (v1).
    #[serde(default = "hash_v1")]
    pub hash_version: u32,
    pub image_id: String,
    /// RFC 3339 UTC time of the bake.
    pub created: String,
    /// Watched paths, absolute, as given to bake.
    pub paths: Vec<String>,
    /// Every exclude glob in force (defaults included), so a later scan covers the same files.
    pub excludes: Vec<String>,
    /// Hex Merkle root of `entries`.
    pub root: String,
    /// Sorted by path, one per path.
    pub entries: Vec<FileEntry>,
}

impl Manifest {
    /// Check what a reader cannot take on trust: the version, the ordering and that `root`
    /// really is the root of `entries` (a hand-edited manifest would otherwise lie).
    pub fn verify(&self) -> Result<(), String> {
        if self.version != MANIFEST_VERSION {
            return Err(format!("baseline manifest version {} is not supported (this build reads v{MANIFEST_VERSION}); re-run phoenix-agent bake", self.version));
        }
        if !crate::valid_id(&self.image_id) {
            return Err(format!(
                "baseline image_id {:?} is not a valid id (1-128 chars of A-Z a-z 0-9 - _ . : /)",
                self.image_id
            ));
        }
        if self.paths.is_empty() {
            return Err("baseline lists no watched paths; bake it with --drift-path".into());
        }
        if let Some(w) = self.entries.windows(2).find(|w| w[0].path >= w[1].path) {
            return Err(format!(
                "baseline entries are not sorted and unique at {:?}",
                w[1].path
            ));
        }
        // A hash this build does not compute cannot be checked here; whoever compares it
        // must refuse to compare (see [`computes`]).
        let root = root_of_entries(&self.entries);
        if computes(self.hash_version) && root != self.root {
            return Err(format!("baseline root {} does not match its entries (computed {root}); the manifest was edited or truncated, bake it again", self.root));
        }
        Ok(())
    }
}

fn put_bytes(h: &mut blake3::Hasher, b: &[u8]) {
    h.update(&(b.len() as u64).to_le_bytes());
    h.update(b);
}

fn put_opt(h: &mut blake3::Hasher, s: Option<&str>) {
    match s {
        None => {
            h.update(&[0]);
        }
        Some(s) => {
            h.update(&[1]);
            put_bytes(h, s.as_bytes());
        }
    }
}

/// The leaf hash of one entry: every field, length-prefixed, so no two different entries
/// share canonical bytes.
pub fn leaf_hash(e: &FileEntry) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(LEAF_CONTEXT);
    put_bytes(&mut h, e.path.as_bytes());
    h.update(&(e.kind as u32).to_le_bytes());
    h.update(&e.mode.to_le_bytes());
    h.update(&e.uid.to_le_bytes());
    h.update(&e.gid.to_le_bytes());
    put_bytes(&mut h, e.hash.as_bytes());
    put_opt(&mut h, e.target.as_deref());
    put_opt(&mut h, e.error.as_deref());
    *h.finalize().as_bytes()
}

/// The root over leaves given in path order.
pub fn root_of<'a>(count: usize, leaves: impl IntoIterator<Item = &'a [u8; 32]>) -> String {
    let mut h = blake3::Hasher::new_derive_key(ROOT_CONTEXT);
    h.update(&(count as u64).to_le_bytes());
    for l in leaves {
        h.update(l);
    }
    h.finalize().to_hex().to_string()
}

/// The root of an entry list; sorts a copy first if needed, so the order given never matters.
pub fn root_of_entries(entries: &[FileEntry]) -> String {
    let sorted;
    let entries = if is_sorted(entries) {
        entries
    } else {
        let mut v = entries.to_vec();
        v.sort_by(|a, b| a.path.cmp(&b.path));
        sorted = v;
        &sorted
    };
    let leaves: Vec<[u8; 32]> = entries.iter().map(leaf_hash).collect();
    root_of(leaves.len(), leaves.iter())
}

fn is_sorted(e: &[FileEntry]) -> bool {
    e.windows(2).all(|w| w[0].path <= w[1].path)
}

/// Which attributes differ between two entries of the same path: content, mode, owner, type,
/// target, error. Empty when they are equal.
pub fn changed_attrs(base: &FileEntry, cur: &FileEntry) -> Vec<String> {
    let mut out = Vec::new();
    let (be, ce) = (base.kind == 'e', cur.kind == 'e');
    if be || ce {
        // An unreadable file has no content to compare; say so rather than "content".
        if be != ce || base.error != cur.error {
            out.push("error".to_string());
        }
    } else if base.kind != cur.kind {
        out.push("type".to_string());
    } else {
        if base.hash != cur.hash && base.kind != 'l' {
            out.push("content".to_string());
        }
        if base.target != cur.target || (base.kind == 'l' && base.hash != cur.hash) {
            out.push("target".to_string());
        }
    }
    if base.mode != cur.mode {
        out.push("mode".to_string());
    }
    if base.uid != cur.uid || base.gid != cur.gid {
        out.push("owner".to_string());
    }
    out
}

/// Hex digits of a content hash shown as a changed file's old and new `content`: enough to
/// tell two versions apart at a glance, and never the contents themselves.
pub const SHORT_HASH: usize = 12;

/// Values one [`FileChange`] may carry (one per attribute: mode, uid, gid, size, type,
/// target, content, with room for one more).
pub const MAX_VALUES: usize = 8;

fn kind_name(k: char) -> &'static str {
    match k {
        'f' => "file",
        'd' => "directory",
        'l' => "symlink",
        'e' => "unreadable",
        _ => "other",
    }
}

fn short(hash: &str) -> String {
    hash.chars().take(SHORT_HASH).collect()
}

/// The old and new value of every attribute that differs between two entries of one path,
/// for a person to read (`mode` `0644` → `0666`). Contents never appear: a changed file shows
/// the first [`SHORT_HASH`] hex digits of each content hash, and its sizes when both are known.
pub fn changed_values(base: &FileEntry, cur: &FileEntry) -> Vec<AttrValue> {
    let mut out = Vec::new();
    let mut put = |attr: &str, old: String, new: String| {
        if old != new {
            out.push(AttrValue {
                attr: attr.to_string(),
                old,
                new,
            });
        }
    };
    put(
        "type",
        kind_name(base.kind).to_string(),
        kind_name(cur.kind).to_string(),
    );
    put(
        "mode",
        format!("{:04o}", base.mode),
        format!("{:04o}", cur.mode),
    );
    put("uid", base.uid.to_string(), cur.uid.to_string());
    put("gid", base.gid.to_string(), cur.gid.to_string());
    if base.kind == cur.kind {
        match base.kind {
            'f' => {
                put("content", short(&base.hash), short(&cur.hash));
                if let (Some(a), Some(b)) = (base.size, cur.size) {
                    put("size", a.to_string(), b.to_string());
                }
            }
            'l' => put(
                "target",
                base.target.clone().unwrap_or_default(),
                cur.target.clone().unwrap_or_default(),
            ),
            _ => {}
        }
    }
    out
}

/// What changed from `baseline` to `current`, sorted by path. Either list may be in any order.
pub fn diff(baseline: &[FileEntry], current: &[FileEntry]) -> Vec<FileChange> {
    let mut b: Vec<&FileEntry> = baseline.iter().collect();
    let mut c: Vec<&FileEntry> = current.iter().collect();
    b.sort_by(|x, y| x.path.cmp(&y.path));
    c.sort_by(|x, y| x.path.cmp(&y.path));
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    let change = |path: &str, what: &str, attrs: Vec<String>| FileChange {
        path: path.to_string(),
        change: what.to_string(),
        attrs,
        values: Vec::new(),
    };
    while i < b.len() || j < c.len() {
        match (b.get(i), c.get(j)) {
            (Some(x), Some(y)) if x.path == y.path => {
                let attrs = changed_attrs(x, y);
                if !attrs.is_empty() {
                    let mut ch = change(&x.path, "changed", attrs);
                    ch.values = changed_values(x, y);
                    out.push(ch);
                }
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if x.path < y.path => {
                out.push(change(&x.path, "removed", vec![]));
                i += 1;
            }
            (Some(x), None) => {
                out.push(change(&x.path, "removed", vec![]));
                i += 1;
            }
            (_, Some(y)) => {
                out.push(change(&y.path, "added", vec![]));
                j += 1;
            }
            (None, None) => unreachable!("loop condition"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn file(path: &str, content: &str) -> FileEntry {
        FileEntry {
            path: path.into(),
            kind: 'f',
            mode: 0o644,
            uid: 0,
            gid: 0,
            hash: blake3::hash(content.as_bytes()).to_hex().to_string(),
            target: None,
            error: None,
            size: Some(content.len() as u64),
        }
    }

    fn manifest(entries: Vec<FileEntry>) -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            hash_version: HASH_VERSION,
            image_id: "img-1".into(),
            created: "2024-01-01T00:00:00Z".into(),
            paths: vec!["/etc".into()],
            excludes: vec![],
            root: root_of_entries(&entries),
            entries,
        }
    }

    #[test]
    fn attributes_are_named() {
        let a = file("/etc/a", "x");
        let mut b = a.clone();
        b.mode = 0o600;
        assert_eq!(changed_attrs(&a, &b), vec!["mode"]);
        b.hash = file("/etc/a", "y").hash;
        b.uid = 1;
        assert_eq!(changed_attrs(&a, &b), vec!["content", "mode", "owner"]);
        let link = |t: &str| FileEntry {
            kind: 'l',
            hash: blake3::hash(t.as_bytes()).to_hex().to_string(),
            target: Some(t.into()),
            ..file("/etc/l", "")
        };
        assert_eq!(changed_attrs(&link("/a"), &link("/b")), vec!["target"]);
        let dir = FileEntry {
            kind: 'd',
            hash: String::new(),
            ..a.clone()
        };
        assert_eq!(changed_attrs(&a, &dir), vec!["type"]);
        let err = FileEntry {
            kind: 'e',
            hash: String::new(),
            error: Some("permission denied".into()),
            ..a.clone()
        };
        assert_eq!(changed_attrs(&a, &err), vec!["error"]);
        assert!(changed_attrs(&err, &err).is_empty());
    }

    #[test]
    fn values_show_old_and_new_never_contents() {
        let a = file("/etc/a", "secret=1");
        let mut b = file("/etc/a", "secret=22");
        b.mode = 0o666;
        b.uid = 1000;
        let v = changed_values(&a, &b);
        let got: Vec<(&str, &str, &str)> = v
            .iter()
            .map(|v| (v.attr.as_str(), v.old.as_str(), v.new.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("mode", "0644", "0666"),
                ("uid", "0", "1000"),
                ("content", &a.hash[..SHORT_HASH], &b.hash[..SHORT_HASH]),
                ("size", "8", "9"),
            ]
        );
        assert!(
            v.iter()
                .all(|v| !v.old.contains("secret") && !v.new.contains("secret")),
            "{v:?}"
        );
        // A manifest baked before sizes were recorded: no size, the rest as usual.
        let old = FileEntry {
            size: None,
            ..a.clone()
        };
        assert!(changed_values(&old, &b).iter().all(|v| v.attr != "size"));
        let link = |t: &str| FileEntry {
            kind: 'l',
            hash: blake3::hash(t.as_bytes()).to_hex().to_string(),
            target: Some(t.into()),
            size: None,
            ..file("/etc/l", "")
        };
        let v = changed_values(&link("/a"), &link("/b"));
        assert_eq!(
            (v[0].attr.as_str(), v[0].old.as_str(), v[0].new.as_str()),
            ("target", "/a", "/b")
        );
        let dir = FileEntry {
            kind: 'd',
            hash: String::new(),
            size: None,
            ..a.clone()
        };
        assert_eq!(
            changed_values(&a, &dir),
            vec![AttrValue {
                attr: "type".into(),
                old: "file".into(),
                new: "directory".into()
            }]
        );
        // diff fills them in.
        let d = diff(std::slice::from_ref(&a), std::slice::from_ref(&b));
        assert_eq!(d[0].values.len(), 4);
        assert!(changed_values(&a, &a).is_empty());
    }

    const PINNED_ROOT: &str = "d725247f8ff85d49cdbbe84d4e2cf03e48af339b9d2b799aac151f4302ab357b";

    #[test]
    fn size_is_not_hashed() {
        // Adding `size` to entries must not move any root (HASH_VERSION stays 1).
        let with = file("/etc/a", "x");
        let without = FileEntry {
            size: None,
            ..with.clone()
        };
        assert_eq!(leaf_hash(&with), leaf_hash(&without));
        // Pinned: the v1 root of this entry, computed before `size` existed.
        assert_eq!(root_of_entries(&[without]), PINNED_ROOT);
    }

    #[test]
    fn diff_names_added_removed_changed() {
        let base = vec![
            file("/etc/a", "1"),
            file("/etc/b", "2"),
            file("/etc/c", "3"),
        ];
        let mut cur = vec![
            file("/etc/d", "4"),
            file("/etc/a", "1"),
            file("/etc/c", "changed"),
        ];
        cur[0].mode = 0o600;
        let d = diff(&base, &cur);
        let brief: Vec<(&str, &str, Vec<String>)> = d
            .iter()
            .map(|c| (c.path.as_str(), c.change.as_str(), c.attrs.clone()))
            .collect();
        assert_eq!(
            brief,
            vec![
                ("/etc/b", "removed", vec![]),
                ("/etc/c", "changed", vec!["content".to_string()]),
                ("/etc/d", "added", vec![])
            ]
        );
        assert!(diff(&base, &base).is_empty());
    }

    #[test]
    fn manifest_verify_catches_edits() {
        let mut m = manifest(vec![file("/etc/a", "1"), file("/etc/b", "2")]);
        m.verify().unwrap();
        m.entries[1].mode = 0o777;
        assert!(m.verify().unwrap_err().contains("does not match"));
        let mut m = manifest(vec![file("/etc/b", "1"), file("/etc/a", "2")]);
        m.root = root_of_entries(&m.entries);
        assert!(m.verify().unwrap_err().contains("sorted"));
        let mut m = manifest(vec![]);
        m.version = 9;
        assert!(m.verify().unwrap_err().contains("version 9"));
    }

    #[test]
    fn empty_and_single_roots_differ() {
        assert_ne!(root_of_entries(&[]), root_of_entries(&[file("/a", "")]));
        // A leaf must never equal a root built from it.
        let e = file("/a", "");
        assert_ne!(
            blake3::Hash::from(leaf_hash(&e)).to_hex().to_string(),
            root_of_entries(&[e])
        );
    }

    fn arb_entry() -> impl Strategy<Value = FileEntry> {
        (
            "/[a-c]{1,3}(/[a-c]{1,3}){0,2}",
            prop::sample::select(vec!['f', 'd', 'l', 'o', 'e']),
            0u32..0o7777,
            0u32..3,
            0u32..3,
            "[0-9a-f]{0,4}",
        )
            .prop_map(|(path, kind, mode, uid, gid, hash)| FileEntry {
                path,
                kind,
                mode,
                uid,
                gid,
                target: (kind == 'l').then(|| hash.clone()),
                error: (kind == 'e').then(|| "permission denied".to_string()),
                size: (kind == 'f').then_some(hash.len() as u64),
                hash,
            })
    }

    fn unique(mut v: Vec<FileEntry>) -> Vec<FileEntry> {
        v.sort_by(|a, b| a.path.cmp(&b.path));
        v.dedup_by(|a, b| a.path == b.path);
        v
    }

    proptest! {
        #[test]
        fn root_ignores_order(v in prop::collection::vec(arb_entry(), 0..40), seed in any::<u64>()) {
            let v = unique(v);
            let mut shuffled = v.clone();
            // A cheap deterministic shuffle driven by the seed.
            let n = shuffled.len();
            for i in 0..n {
                let j = ((seed.wrapping_mul(6364136223846793005).wrapping_add(i as u64)) % n as u64) as usize;
                shuffled.swap(i, j);
            }
            prop_assert_eq!(root_of_entries(&v), root_of_entries(&shuffled));
        }

        #[test]
        fn any_single_change_moves_root_and_is_reported(v in prop::collection::vec(arb_entry(), 1..40), pick in any::<prop::sample::Index>(), field in 0u8..5) {
            let v = unique(v);
            let i = pick.index(v.len());
            let mut w = v.clone();
            let e = &mut w[i];
            let want = match field {
                0 => { e.mode ^= 0o001; "mode" }
                1 => { e.uid += 10; "owner" }
                2 => { e.gid += 10; "owner" }
                3 if e.kind == 'f' => { e.hash.push('0'); "content" }
                3 if e.kind == 'l' => { e.target = Some(format!("{}x", e.target.clone().unwrap_or_default())); "target" }
                _ if e.kind == 'e' => { e.error = Some("input/output error".into()); "error" }
                _ => { e.kind = if e.kind == 'd' { 'o' } else { 'd' }; e.target = None; "type" }
            };
            prop_assert_ne!(root_of_entries(&v), root_of_entries(&w));
            let d = diff(&v, &w);
            prop_assert_eq!(d.len(), 1);
            prop_assert_eq!(&d[0].path, &v[i].path);
            prop_assert!(d[0].attrs.iter().any(|a| a == want), "{:?} lacks {}", d[0].attrs, want);
        }

        #[test]
        fn adding_or_removing_moves_root(v in prop::collection::vec(arb_entry(), 1..40), pick in any::<prop::sample::Index>()) {
            let v = unique(v);
            let mut w = v.clone();
            let gone = w.remove(pick.index(v.len()));
            prop_assert_ne!(root_of_entries(&v), root_of_entries(&w));
            let d = diff(&v, &w);
            prop_assert_eq!(d, vec![FileChange { path: gone.path.clone(), change: "removed".into(), attrs: vec![], values: vec![] }]);
            let d = diff(&w, &v);
            prop_assert_eq!(d, vec![FileChange { path: gone.path, change: "added".into(), attrs: vec![], values: vec![] }]);
        }
    }
}
