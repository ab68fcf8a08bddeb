//! `--log` patterns: a plain path, or a shell-style glob (`*`, `?`, `[a-z]`, `[!0-9]`, `\` to
//! quote) in any path component, e.g. `/var/log/*/access.log`. Expanded again on every scan,
//! so files created later are picked up. Hand-rolled rather than a crate: it is small, and the
//! tailer needs only matching names against one directory at a time.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

fn has_meta(s: &[u8]) -> bool {
    s.iter().any(|b| matches!(b, b'*' | b'?' | b'['))
}

/// Does an entry exist at `p` (a dangling or looping symlink does: the caller says why it
/// cannot be read, rather than it vanishing without a word)?
fn present(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

/// Every existing path that `pattern` names (regular files and anything else: the caller
/// filters), sorted so scans are deterministic.
#[cfg(test)]
pub(super) fn expand(pattern: &str) -> Vec<PathBuf> {
    expand_into(pattern, &mut BTreeSet::new())
}

/// [`expand`], also adding to `dirs` every directory whose changes can change the answer
/// (the ones read, and the ones the matches live in): what inotify should watch.
pub(super) fn expand_into(pattern: &str, dirs: &mut BTreeSet<PathBuf>) -> Vec<PathBuf> {
    if !has_meta(pattern.as_bytes()) {
        let p = PathBuf::from(pattern);
        let parent = parent_dir(&p);
        if parent.is_dir() {
            dirs.insert(parent.to_path_buf());
        }
        return if present(&p) { vec![p] } else { Vec::new() };
    }
    let (mut current, rest) = if let Some(r) = pattern.strip_prefix('/') {
        (vec![PathBuf::from("/")], r)
    } else {
        (vec![PathBuf::new()], pattern)
    };
    for comp in rest.split('/').filter(|c| !c.is_empty()) {
        let mut next = Vec::new();
        if has_meta(comp.as_bytes()) {
            for dir in &current {
                let read = if dir.as_os_str().is_empty() {
                    std::fs::read_dir(".")
                } else {
                    std::fs::read_dir(dir)
                };
                let Ok(read) = read else { continue };
                dirs.insert(if dir.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    dir.clone()
                });
                let mut names: Vec<_> =
                    read.filter_map(|e| e.ok().map(|e| e.file_name())).collect();
                names.sort();
                for name in names {
                    let n = name.as_bytes();
                    // Like a shell: `*` does not match a leading dot unless the pattern has one.
                    if n.first() == Some(&b'.') && !comp.starts_with('.') {
                        continue;
                    }
                    if matches(comp.as_bytes(), n) {
                        next.push(dir.join(&name));
                    }
                }
            }
        } else {
            let lit = unquote(comp);
            for dir in &current {
                next.push(dir.join(OsStr::from_bytes(&lit)));
            }
        }
        current = next;
        if current.is_empty() {
            break;
        }
    }
    for p in &current {
        let parent = parent_dir(p);
        if !dirs.contains(parent) && parent.is_dir() {
            dirs.insert(parent.to_path_buf());
        }
    }
    current.retain(|p| present(p));
    current
}

fn unquote(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut it = s.bytes();
    while let Some(b) = it.next() {
        if b == b'\\' {
            if let Some(n) = it.next() {
                out.push(n);
                continue;
            }
        }
        out.push(b);
    }
    out
}

/// Does the whole `name` match the one-component `pat`?
pub(super) fn matches(pat: &[u8], name: &[u8]) -> bool {
    // Greedy matching with one backtrack point for the last `*`: linear enough for file names.
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pat.len() {
            match pat[p] {
                b'*' => {
                    star = Some((p, n));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    n += 1;
                    continue;
                }
                b'[' => {
                    if let Some((ok, len)) = class(&pat[p..], name[n]) {
                        if ok {
                            p += len;
                            n += 1;
                            continue;
                        }
                    } else if name[n] == b'[' {
                        // An unclosed `[` is a literal bracket.
                        p += 1;
                        n += 1;
                        continue;
                    }
                }
                b'\\' if p + 1 < pat.len() => {
                    if pat[p + 1] == name[n] {
                        p += 2;
                        n += 1;
                        continue;
                    }
                }
                c => {
                    if c == name[n] {
                        p += 1;
                        n += 1;
                        continue;
                    }
                }
            }
        }
        match star {
            Some((sp, sn)) => {
                p = sp + 1;
                n = sn + 1;
                star = Some((sp, sn + 1));
            }
            None => return false,
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

/// Match `c` against the bracket expression at the start of `pat`: (matched, its length), or
/// None when the bracket is not closed.
fn class(pat: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(pat.get(i), Some(b'!') | Some(b'^'));
    if negate {
        i += 1;
    }
    let mut hit = false;
    let mut first = true;
    while i < pat.len() {
        let lo = pat[i];
        if lo == b']' && !first {
            return Some((hit != negate, i + 1));
        }
        first = false;
        if i + 2 < pat.len() && pat[i + 1] == b'-' && pat[i + 2] != b']' {
            if (lo..=pat[i + 2]).contains(&c) {
                hit = true;
            }
            i += 3;
        } else {
            if lo == c {
                hit = true;
            }
            i += 1;
        }
    }
    None
}

/// The directory a pattern's files live in, for finding a checkpointed file renamed by
/// rotation while the agent was down.
pub(super) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(matches(b"*.log", b"app.log"));
        assert!(!matches(b"*.log", b"app.log.1"));
        assert!(matches(b"app.log*", b"app.log.1"));
        assert!(matches(b"app-?.log", b"app-1.log"));
        assert!(!matches(b"app-?.log", b"app-12.log"));
        assert!(matches(b"app-[0-9].log", b"app-7.log"));
        assert!(!matches(b"app-[!0-9].log", b"app-7.log"));
        assert!(matches(b"a*b*c", b"axxbyyc"));
        assert!(!matches(b"a*b*c", b"axxbyy"));
        assert!(matches(b"\\*x", b"*x"));
        assert!(!matches(b"\\*x", b"ax"));
        assert!(matches(b"[x", b"[x"));
    }

    #[test]
    fn expands_directories_and_skips_dotfiles() {
        let d = tempfile::tempdir().unwrap();
        for p in ["a/x.log", "b/x.log", "b/y.txt", "c/.x.log"] {
            let p = d.path().join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "").unwrap();
        }
        let got = expand(&format!("{}/*/*.log", d.path().display()));
        assert_eq!(
            got,
            vec![d.path().join("a/x.log"), d.path().join("b/x.log")]
        );
        assert_eq!(expand(&format!("{}/b/y.txt", d.path().display())).len(), 1);
        assert!(expand(&format!("{}/nope/*.log", d.path().display())).is_empty());
    }
}
