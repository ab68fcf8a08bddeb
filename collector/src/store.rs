//! Fleet state on disk: one JSON snapshot in `<data-dir>/fleet.json`, written to a temporary
//! file, fsynced and renamed over the old one (then the directory fsynced), every few seconds
//! when something changed and at shutdown. A crash loses at most the last few seconds, which
//! is harmless: a mark or an ack made then is made again by the next pass or the recycler's
//! next poll, and a batch re-sent because its seq was lost overwrites its own points in
//! InfluxDB (same series, same timestamps).
//!
//! Why not an embedded database: the state is a few KiB per instance and always read whole
//! at start; a snapshot needs no new dependency and is readable with `jq` when debugging.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fleet::Instance;
use crate::queue::QueueState;

pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u32,
    pub saved_ms: i64,
    pub instances: Vec<Instance>,
    pub queue: QueueState,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("writing fleet state to {path}: {err} (is the data dir writable and not full?)")]
    Write { path: PathBuf, err: std::io::Error },
    #[error("reading fleet state from {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("fleet state {path} is not readable ({err}); move it aside to start with an empty fleet state (marks and dedupe history are then lost)")]
    Corrupt { path: PathBuf, err: String },
}

#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
}

impl Store {
    pub fn new(data_dir: &Path) -> Store {
        Store {
            path: data_dir.join("fleet.json"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved snapshot, or None on a first start.
    pub fn load(&self) -> Result<Option<Snapshot>, StoreError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => {
                return Err(StoreError::Read {
                    path: self.path.clone(),
                    err,
                })
            }
        };
        let s: Snapshot = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            err: e.to_string(),
        })?;
        if s.version != VERSION {
            return Err(StoreError::Corrupt {
                path: self.path.clone(),
                err: format!("version {} (this collector reads {VERSION})", s.version),
            });
        }
        Ok(Some(s))
    }

    pub fn save(&self, s: &Snapshot) -> Result<(), StoreError> {
        let err = |err| StoreError::Write {
            path: self.path.clone(),
            err,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let tmp = dir.join(".fleet.json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut f);
        serde_json::to_writer(&mut w, s).map_err(|e| err(std::io::Error::other(e)))?;
        w.flush().map_err(err)?;
        drop(w);
        f.sync_data().map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads_and_refuses_garbage() {
        let d = tempfile::tempdir().unwrap();
        let st = Store::new(d.path());
        assert!(st.load().unwrap().is_none(), "first start");
        let mut i = Instance::default();
        i.identity.instance_id = "i-1".into();
        i.seqs.insert("boot".into(), (41, 5));
        i.phx.mark = Some(crate::queue::Mark {
            reason: crate::health::Reason::Drift,
            evidence: "e".into(),
            since_ms: 3,
            acked_ms: None,
            acked_by: None,
            gone_ms: None,
        });
        let mut q = QueueState::default();
        q.recent_marks.push_back(3);
        st.save(&Snapshot {
            version: VERSION,
            saved_ms: 9,
            instances: vec![i],
            queue: q,
        })
        .unwrap();
        let back = st.load().unwrap().unwrap();
        assert_eq!(back.instances[0].seqs["boot"], (41, 5));
        assert_eq!(
            back.instances[0].phx.mark.as_ref().unwrap().reason,
            crate::health::Reason::Drift
        );
        assert_eq!(back.queue.recent_marks, [3]);
        assert!(!d.path().join(".fleet.json.tmp").exists());
        std::fs::write(st.path(), b"{\"version\":1,").unwrap();
        let e = st.load().unwrap_err().to_string();
        assert!(e.contains("move it aside"), "{e}");
    }
}
