//! The protect file: while it exists (an application creates it for a long job, say), the
//! collector holds voluntary replacement of this instance (drift, expiry); involuntary
//! replacement (failing checks, silence) goes on. The agent only looks whether the path is
//! there: it never opens, reads or trusts the file's content, and nothing else on the box
//! can ask for the hold.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

/// `--protect-file`'s default.
pub const DEFAULT_PATH: &str = "/run/phoenix/do-not-replace";

/// One protect-file path and what the latest look found (to log changes once).
#[derive(Debug, Clone)]
pub struct ProtectFile {
    path: PathBuf,
    last: Option<bool>,
}

impl ProtectFile {
    pub fn new(path: &Path) -> ProtectFile {
        ProtectFile {
            path: path.to_path_buf(),
            last: None,
        }
    }

    /// Whether the path exists now (a symlink counts, dangling or not: it was put there).
    /// A path that cannot be looked at (permissions) counts as present: holding a
    /// replacement is the safe side of not knowing, and it is logged.
    pub fn present(&mut self) -> bool {
        let (now, why) = match std::fs::symlink_metadata(&self.path) {
            Ok(_) => (true, None),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
                (false, None)
            }
            Err(e) => (true, Some(e)),
        };
        if self.last != Some(now) {
            match (&why, now) {
                (Some(e), _) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot tell whether the protect file exists; reporting it present (voluntary replacement held)")
                }
                (None, true) => {
                    tracing::info!(path = %self.path.display(), "protect file present: voluntary replacement of this instance is held")
                }
                (None, false) if self.last.is_some() => {
                    tracing::info!(path = %self.path.display(), "protect file removed")
                }
                (None, false) => {}
            }
            self.last = Some(now);
        }
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_only_and_the_hold_ends_when_the_file_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("do-not-replace");
        let mut p = ProtectFile::new(&path);
        assert!(!p.present());
        std::fs::write(&path, "anything at all, never read").unwrap();
        assert!(p.present());
        std::fs::remove_file(&path).unwrap();
        assert!(!p.present());
        // An empty file, or a dangling symlink, is present too: only the name counts.
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &path).unwrap();
        assert!(p.present());
        std::fs::remove_file(&path).unwrap();
        // A parent that is a file: not present, no error.
        let file = dir.path().join("f");
        std::fs::write(&file, "").unwrap();
        assert!(!ProtectFile::new(&file.join("x")).present());
    }
}
