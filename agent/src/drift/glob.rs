//! Exclude globs, hand-written because globset would pull in a regex engine for a dozen patterns.
//!
//! A pattern containing `/` matches the whole absolute path; one without matches the file name
//! alone (so `*~` excludes backup files anywhere). `*` and `?` never cross `/`, `**` does,
//! `[abc]`, `[a-z]` and `[!x]` are classes. A pattern ending in `/**` also matches the directory
//! itself, so `/var/lib/cloud/**` keeps the whole directory out. An excluded directory is not
//! descended into.

/// Files that legitimately change on a baked image at boot or at run time.
pub const DEFAULT_EXCLUDES: &[&str] = &[
    // Per-instance identity written at first boot.
    "/etc/machine-id",
    "/var/lib/dbus/machine-id",
    "/etc/ssh/ssh_host_*",
    "/etc/hostname",
    "/etc/hosts",
    // Written by DHCP / systemd-resolved / cloud-init network setup.
    "/etc/resolv.conf",
    // Clock drift file and the mount table symlink or file.
    "/etc/adjtime",
    "/etc/mtab",
    // Random seeds are rewritten at every boot and shutdown.
    "/var/lib/systemd/random-seed",
    "/var/lib/urandom/random-seed",
    // Rebuilt by ldconfig, which package triggers and some boots run.
    "/etc/ld.so.cache",
    // Lock file of shadow-utils, created by any user/group lookup that writes.
    ".pwd.lock",
    // Editor backups and the copies shadow-utils keeps of passwd, group, shadow.
    "*~",
    "*-",
    // cloud-init's own state and run-time data.
    "/var/lib/cloud/**",
    "/run/cloud-init/**",
    // The agent's own state dir (default location): the spool changes constantly.
    "/var/lib/phoenix-agent/**",
];

/// A compiled set of exclude patterns.
#[derive(Debug, Clone, Default)]
pub struct Excludes {
    patterns: Vec<Pattern>,
}

#[derive(Debug, Clone)]
struct Pattern {
    text: String,
    chars: Vec<char>,
    whole_path: bool,
    /// No wildcard at all: a plain string comparison.
    literal: bool,
    /// For `dir/**`: the directory itself also matches.
    dir_itself: Option<Vec<char>>,
}

impl Excludes {
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Excludes {
        let patterns = patterns
            .iter()
            .map(|p| {
                let text = p.as_ref().to_string();
                Pattern {
                    chars: text.chars().collect(),
                    whole_path: text.contains('/'),
                    literal: !text.contains(['*', '?', '[']),
                    dir_itself: text.strip_suffix("/**").map(|d| d.chars().collect()),
                    text,
                }
            })
            .collect();
        Excludes { patterns }
    }

    /// The pattern texts, as given.
    pub fn texts(&self) -> Vec<String> {
        self.patterns.iter().map(|p| p.text.clone()).collect()
    }

    /// Whether this absolute path (in its text form) is excluded.
    pub fn matches(&self, path: &str) -> bool {
        let name = path.rsplit('/').next().unwrap_or(path);
        // Most patterns are plain paths or names: compare those as strings, and only decode
        // the path into chars when a wildcard pattern is reached.
        if self
            .patterns
            .iter()
            .any(|p| p.literal && p.text == if p.whole_path { path } else { name })
        {
            return true;
        }
        if self.patterns.iter().all(|p| p.literal) {
            return false;
        }
        let name: Vec<char> = name.chars().collect();
        let full: Vec<char> = path.chars().collect();
        self.patterns.iter().filter(|p| !p.literal).any(|p| {
            if p.dir_itself
                .as_deref()
                .is_some_and(|d| glob_match(d, &full))
            {
                return true;
            }
            p.matches_chars(if p.whole_path { &full } else { &name })
        })
    }
}

impl Pattern {
    fn matches_chars(&self, s: &[char]) -> bool {
        glob_match(&self.chars, s)
    }
}

/// Iterative wildcard matching with backtracking to the last star (two stars: `**` may eat `/`).
fn glob_match(p: &[char], s: &[char]) -> bool {
    let (mut pi, mut si) = (0, 0);
    // Where to resume after the last `*`/`**`: (pattern index after the star, string index, crosses '/').
    let mut star: Option<(usize, usize, bool)> = None;
    // The last `**`: when a later single `*` cannot grow past a '/', the `**` eats one more.
    let mut dstar: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    let double = p.get(pi + 1) == Some(&'*');
                    let next = if double { pi + 2 } else { pi + 1 };
                    star = Some((next, si, double));
                    if double {
                        dstar = Some((next, si));
                    }
                    pi = next;
                    continue;
                }
                '?' if s[si] != '/' => {
                    pi += 1;
                    si += 1;
                    continue;
                }
                '[' => {
                    if let Some((ok, len)) = class_match(&p[pi..], s[si]) {
                        if ok {
                            pi += len;
                            si += 1;
                            continue;
                        }
                    } else if s[si] == '[' {
                        // An unclosed '[' is a literal.
                        pi += 1;
                        si += 1;
                        continue;
                    }
                }
                c if c != '*' && c != '?' && c != '[' && c == s[si] => {
                    pi += 1;
                    si += 1;
                    continue;
                }
                _ => {}
            }
        }
        // Mismatch: let the last star eat one more character, if it may.
        match (star, dstar) {
            (Some((next, start, double)), _) if double || s[start] != '/' => {
                star = Some((next, start + 1, double));
                if double {
                    dstar = Some((next, start + 1));
                }
                pi = next;
                si = start + 1;
            }
            (_, Some((next, start))) => {
                star = Some((next, start + 1, true));
                dstar = Some((next, start + 1));
                pi = next;
                si = start + 1;
            }
            _ => return false,
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// Match one char against a `[...]` class at the start of `p`: Some((matched, class length)),
/// or None when the class is not closed.
fn class_match(p: &[char], c: char) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(p.get(i), Some('!') | Some('^'));
    if negate {
        i += 1;
    }
    let mut hit = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == ']' && !first {
            return Some((hit != negate && c != '/', i + 1));
        }
        first = false;
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            if p[i] <= c && c <= p[i + 2] {
                hit = true;
            }
            i += 3;
        } else {
            if p[i] == c {
                hit = true;
            }
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, s: &str) -> bool {
        Excludes::new(&[p]).matches(s)
    }

    #[test]
    fn wildcards() {
        assert!(m("*~", "/etc/foo.conf~"));
        assert!(!m("*~", "/etc/foo.conf"));
        assert!(m("*-", "/etc/passwd-"));
        assert!(!m("*-", "/etc/passwd"));
        assert!(m(".pwd.lock", "/etc/.pwd.lock"));
        assert!(m(
            "/etc/ssh/ssh_host_*",
            "/etc/ssh/ssh_host_ed25519_key.pub"
        ));
        assert!(!m("/etc/ssh/ssh_host_*", "/etc/ssh/sshd_config"));
        assert!(!m("/etc/*", "/etc/a/b"), "* must not cross /");
        assert!(m("/etc/**", "/etc/a/b"));
        assert!(m("/etc/**/*.conf", "/etc/a/b/c.conf"));
        assert!(!m("/etc/**/*.conf", "/etc/a/b/c.confx"));
        assert!(m("/x/**/b*/*.c", "/x/a/bb/q/bz/y.c"));
        assert!(m("/etc/a?c", "/etc/abc"));
        assert!(!m("/etc/a?c", "/etc/a/c"));
        assert!(m("*.[ch]", "/src/x.h"));
        assert!(!m("*.[!ch]", "/src/x.h"));
        assert!(m("*.[a-c]", "/src/x.b"));
        assert!(m("[", "/x/["), "unclosed class is a literal");
    }

    #[test]
    fn dir_star_star_covers_the_dir() {
        assert!(m("/var/lib/cloud/**", "/var/lib/cloud"));
        assert!(m(
            "/var/lib/cloud/**",
            "/var/lib/cloud/instances/i-1/boot-finished"
        ));
        assert!(!m("/var/lib/cloud/**", "/var/lib/cloudy"));
    }

    #[test]
    fn defaults_cover_boot_time_files() {
        let ex = Excludes::new(DEFAULT_EXCLUDES);
        for p in [
            "/etc/machine-id",
            "/etc/resolv.conf",
            "/etc/hostname",
            "/etc/hosts",
            "/etc/ssh/ssh_host_rsa_key",
            "/etc/shadow-",
            "/etc/.pwd.lock",
            "/var/lib/cloud/data/result.json",
            "/etc/ld.so.cache",
        ] {
            assert!(ex.matches(p), "{p} should be excluded by default");
        }
        for p in [
            "/etc/passwd",
            "/etc/ssh/sshd_config",
            "/etc/hosts.allow",
            "/etc/nginx/nginx.conf",
        ] {
            assert!(!ex.matches(p), "{p} must be watched");
        }
    }
}
