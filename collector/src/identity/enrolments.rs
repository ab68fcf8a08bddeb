//! Where tofu enrolments live between restarts, behind [`EnrolmentStore`] so the fleet
//! core's store (or PostgreSQL) can take the job over without the gate changing. The one
//! for a cluster is `pgstore::registry::PgEnrolments`: first writer wins across collectors.
//!
//! [`FileEnrolments`] is an append-only log, `<data-dir>/enrolments.log`, one JSON object a
//! line. Appending keeps a flood of new ids from rewriting a large file per id; the log is
//! compacted once at start. Only credential *hashes* are written: the file can be read by an
//! operator without handing out the right to speak for any box.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// One enrolled instance: the SHA-256 of its credential (hex) and when it enrolled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolment {
    pub credential_sha256: String,
    pub enrolled_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("enrolment store {path}: {source} (is the data dir writable and not full?)")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("shared enrolment store: {0} (enrolled instances still verify; new ones wait until PostgreSQL answers)")]
    Shared(String),
}

/// What `claim` found: the enrolment that stands for the id, and whether this call made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub stored: Enrolment,
    pub new: bool,
}

/// Enrolments changed behind the gate's back (by another collector).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// These ids were reset or forgotten elsewhere: drop what is cached of them.
    Ids(Vec<String>),
    /// Everything as stored now (after notifications may have been missed): drop what
    /// differs from it.
    All(HashMap<String, Enrolment>),
}

/// Persistence for enrolments. The gate keeps its own copy in memory (the cache: a known id
/// never costs a store round trip); a store loads everything at start and records each
/// change durably before it is answered.
pub trait EnrolmentStore: Send + Sync + std::fmt::Debug {
    fn load(&self) -> Result<HashMap<String, Enrolment>, StoreError>;
    fn enrolled(&self, instance_id: &str, e: &Enrolment) -> Result<(), StoreError>;
    /// The enrolment is gone (reset by an operator, or forgotten after silence).
    fn removed(&self, instance_id: &str) -> Result<(), StoreError>;

    /// Records `e` unless the id is enrolled already, and answers the enrolment that stands
    /// (the first writer's, when several collectors enrol the same id at once). The gate
    /// compares its hash with what the sender presented. A store of one collector only: the
    /// gate's copy is the whole truth, so this is `enrolled`.
    fn claim(&self, instance_id: &str, e: &Enrolment) -> Result<Claimed, StoreError> {
        self.enrolled(instance_id, e)?;
        Ok(Claimed {
            stored: e.clone(),
            new: true,
        })
    }

    /// An operator's reset: true when there was an enrolment to reset (`known_here`: the
    /// gate had one).
    fn reset(&self, instance_id: &str, known_here: bool) -> Result<bool, StoreError> {
        if known_here {
            self.removed(instance_id)?;
        }
        Ok(known_here)
    }

    /// The gate forgot a silent id. A shared store keeps it while other collectors still
    /// hear from the instance.
    fn forgotten(&self, instance_id: &str) -> Result<(), StoreError> {
        self.removed(instance_id)
    }

    /// True for a store other collectors write too (a network round trip): the gate then
    /// asks it without holding its own lock, and it must decide the first writer itself.
    fn is_shared(&self) -> bool {
        false
    }

    /// What changed elsewhere since the last call; asked at every admission, so it must be
    /// cheap when nothing did.
    fn changed(&self) -> Option<Changed> {
        None
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Op {
    Enrol {
        id: String,
        #[serde(flatten)]
        e: Enrolment,
    },
    Remove {
        id: String,
    },
}

/// The append-only file store.
#[derive(Debug)]
pub struct FileEnrolments {
    path: PathBuf,
    /// The open file and how many lines were written to it.
    file: Mutex<(Option<Arc<File>>, u64)>,
    /// How many of those lines an fsync has covered (see [`FileEnrolments::append`]).
    synced: Mutex<u64>,
}

impl FileEnrolments {
    pub fn new(data_dir: &Path) -> FileEnrolments {
        FileEnrolments {
            path: data_dir.join("enrolments.log"),
            file: Mutex::new((None, 0)),
            synced: Mutex::new(0),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, source: std::io::Error) -> StoreError {
        StoreError::File {
            path: self.path.clone(),
            source,
        }
    }

    /// Append one line and return once it is on disk. An enrolment answered but lost in a
    /// crash would let the next sender claim the id, so every line waits for an fsync; but
    /// one fsync covers every line written before it started (group commit), so a fleet that
    /// boots at once shares fsyncs instead of queueing one per new instance behind the
    /// file's lock.
    fn append(&self, op: &Op) -> Result<(), StoreError> {
        let mut line = serde_json::to_vec(op).expect("plain structs serialize");
        line.push(b'\n');
        let (f, mine) = {
            let mut g = self.file.lock().unwrap();
            if g.0.is_none() {
                g.0 = Some(Arc::new(
                    OpenOptions::new()
                        .append(true)
                        .create(true)
                        .mode(0o600)
                        .open(&self.path)
                        .map_err(|e| self.err(e))?,
                ));
            }
            let f = g.0.clone().expect("opened above");
            (&*f).write_all(&line).map_err(|e| self.err(e))?;
            g.1 += 1;
            (f, g.1)
        };
        let mut synced = self.synced.lock().unwrap();
        if *synced >= mine {
            return Ok(()); // an fsync that started after our write covered it
        }
        // Every line written so far is covered by the fsync below.
        let upto = self.file.lock().unwrap().1;
        f.sync_data().map_err(|e| self.err(e))?;
        *synced = upto;
        Ok(())
    }
}

impl EnrolmentStore for FileEnrolments {
    fn load(&self) -> Result<HashMap<String, Enrolment>, StoreError> {
        let mut map = HashMap::new();
        let f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(map),
            Err(e) => return Err(self.err(e)),
        };
        for (n, line) in BufReader::new(f).lines().enumerate() {
            let line = line.map_err(|e| self.err(e))?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Op>(&line) {
                Ok(Op::Enrol { id, e }) => {
                    map.insert(id, e);
                }
                Ok(Op::Remove { id }) => {
                    map.remove(&id);
                }
                // A torn last line after a crash: that enrolment was never answered.
                Err(e) => {
                    tracing::warn!(file = %self.path.display(), line = n + 1, error = %e, "skipping an unreadable enrolment record")
                }
            }
        }
        // Compact: one record per live enrolment, written aside and renamed over the log.
        let tmp = self.path.with_extension("log.tmp");
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| self.err(e))?;
        let mut ids: Vec<&String> = map.keys().collect();
        ids.sort();
        for id in ids {
            let op = Op::Enrol {
                id: id.clone(),
                e: map[id].clone(),
            };
            let mut line = serde_json::to_vec(&op).expect("plain structs serialize");
            line.push(b'\n');
            out.write_all(&line).map_err(|e| self.err(e))?;
        }
        out.sync_all().map_err(|e| self.err(e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| self.err(e))?;
        Ok(map)
    }

    fn enrolled(&self, instance_id: &str, e: &Enrolment) -> Result<(), StoreError> {
        self.append(&Op::Enrol {
            id: instance_id.to_owned(),
            e: e.clone(),
        })
    }

    fn removed(&self, instance_id: &str) -> Result<(), StoreError> {
        self.append(&Op::Remove {
            id: instance_id.to_owned(),
        })
    }
}

/// Nothing persisted: for `--identity shared|mtls|aws`, where no secret is kept, and tests.
#[derive(Debug, Default)]
pub struct NoStore;

impl EnrolmentStore for NoStore {
    fn load(&self) -> Result<HashMap<String, Enrolment>, StoreError> {
        Ok(HashMap::new())
    }
    fn enrolled(&self, _: &str, _: &Enrolment) -> Result<(), StoreError> {
        Ok(())
    }
    fn removed(&self, _: &str) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store shared with "another collector": what it enrolled stands, and it can reset
    /// behind the gate's back. Down: every call fails.
    #[derive(Debug, Default)]
    struct Cluster {
        stored: Mutex<HashMap<String, Enrolment>>,
        changed: Mutex<Vec<String>>,
        /// A full reload's snapshot, answered once by `changed`.
        reloaded: Mutex<Option<HashMap<String, Enrolment>>>,
        down: std::sync::atomic::AtomicBool,
        /// Runs once inside the next claim, before it writes: what other collectors and
        /// other requests do while a claim is on the wire.
        meanwhile: Mutex<Option<Meanwhile>>,
    }

    struct Meanwhile(Box<dyn FnOnce() + Send>);

    impl std::fmt::Debug for Meanwhile {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Meanwhile")
        }
    }

    impl EnrolmentStore for Arc<Cluster> {
        fn load(&self) -> Result<HashMap<String, Enrolment>, StoreError> {
            Ok(self.stored.lock().unwrap().clone())
        }
        fn enrolled(&self, id: &str, e: &Enrolment) -> Result<(), StoreError> {
            self.claim(id, e).map(|_| ())
        }
        fn removed(&self, id: &str) -> Result<(), StoreError> {
            self.stored.lock().unwrap().remove(id);
            Ok(())
        }
        fn claim(&self, id: &str, e: &Enrolment) -> Result<Claimed, StoreError> {
            if self.down.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(StoreError::Shared("down".into()));
            }
            let meanwhile = self.meanwhile.lock().unwrap().take();
            if let Some(Meanwhile(f)) = meanwhile {
                f();
            }
            let mut g = self.stored.lock().unwrap();
            let new = !g.contains_key(id);
            let stored = g.entry(id.into()).or_insert_with(|| e.clone()).clone();
            Ok(Claimed { stored, new })
        }
        fn is_shared(&self) -> bool {
            true
        }
        fn changed(&self) -> Option<Changed> {
            if let Some(all) = self.reloaded.lock().unwrap().take() {
                return Some(Changed::All(all));
            }
            let ids = std::mem::take(&mut *self.changed.lock().unwrap());
            (!ids.is_empty()).then_some(Changed::Ids(ids))
        }
    }

    #[test]
    fn a_shared_store_decides_first_writer_cache_verifies_while_down() {
        use crate::identity::{Admitted, Refusal};
        use std::sync::atomic::Ordering;
        let a_cred = "0123456789abcdef0123456789abcdef-box-a";
        let forger = "0123456789abcdef0123456789abcdef-forger";
        let cluster = Arc::new(Cluster::default());
        let (a, b) = (tofu_gate(&cluster), tofu_gate(&cluster));
        assert_eq!(a.admit("i-1", &with(a_cred), 1), Ok(Admitted::New));
        // b never saw i-1: the store's enrolment decides, not b's empty memory.
        assert!(matches!(
            b.admit("i-1", &with(forger), 2),
            Err(Refusal::Forbidden(_))
        ));
        assert_eq!(b.admit("i-1", &with(a_cred), 3), Ok(Admitted::Known));
        // Down: the known one still verifies from memory, a new id is refused (503).
        cluster.down.store(true, Ordering::Relaxed);
        assert_eq!(b.admit("i-1", &with(a_cred), 4), Ok(Admitted::Known));
        assert!(matches!(
            b.admit("i-2", &with(forger), 4),
            Err(Refusal::Store(_))
        ));
        assert!(matches!(
            b.admit("i-1", &with(forger), 4),
            Err(Refusal::Forbidden(_))
        ));
        cluster.down.store(false, Ordering::Relaxed);
        // A reset through a reaches b: its cached copy goes, the next sender enrols.
        assert!(a.reset("i-1").unwrap());
        cluster.changed.lock().unwrap().push("i-1".into());
        assert_eq!(b.admit("i-1", &with(forger), 5), Ok(Admitted::New));
        assert!(matches!(
            a.admit("i-1", &with(a_cred), 6),
            Err(Refusal::Forbidden(_))
        ));
    }

    /// A tofu gate over the shared fake; an `Arc`, so a `meanwhile` hook can call it from
    /// inside its own store's claim.
    fn tofu_gate(cluster: &Arc<Cluster>) -> Arc<crate::identity::Gate> {
        use crate::identity::{Gate, Limits, Mode};
        let gate = Gate::open(Mode::Tofu, Limits::default(), Box::new(cluster.clone()), 0);
        Arc::new(gate.unwrap())
    }

    fn with(c: &str) -> crate::identity::Presented<'_> {
        crate::identity::Presented {
            credential: Some(c),
            ..Default::default()
        }
    }

    #[test]
    fn a_reload_while_a_claim_is_on_the_wire_keeps_it_and_every_loser_is_refused_not_retried() {
        // As CI once raced it: another collector's box wins i-race, and this collector's
        // reload snapshot (which holds the winner, not our claim in flight) arrives while
        // our claim is on the wire and a rival request of this collector comes in.
        use crate::identity::Refusal;
        let (ours, rival, winner) = (
            "0123456789abcdef0123456789abcdef-ours",
            "0123456789abcdef0123456789abcdef-rival",
            "0123456789abcdef0123456789abcdef-winner",
        );
        let cluster = Arc::new(Cluster::default());
        let gate = tofu_gate(&cluster);
        let won = Enrolment {
            credential_sha256: crate::identity::hex(&crate::identity::sha256(winner)),
            enrolled_ms: 1,
        };
        let rival_got = Arc::new(Mutex::new(None));
        let (c, g, r) = (cluster.clone(), gate.clone(), rival_got.clone());
        *cluster.meanwhile.lock().unwrap() = Some(Meanwhile(Box::new(move || {
            c.stored
                .lock()
                .unwrap()
                .insert("i-race".into(), won.clone());
            *c.reloaded.lock().unwrap() = Some(HashMap::from([("i-race".into(), won)]));
            *r.lock().unwrap() = Some(g.admit("i-race", &with(rival), 2));
        })));
        let got = gate.admit("i-race", &with(ours), 2);
        assert!(matches!(got, Err(Refusal::Forbidden(_))), "{got:?}");
        let rival_got = rival_got.lock().unwrap().take().unwrap();
        assert!(
            matches!(rival_got, Err(Refusal::Forbidden(_))),
            "{rival_got:?}"
        );
        assert_eq!(
            gate.admit("i-race", &with(winner), 3),
            Ok(crate::identity::Admitted::Known)
        );
    }

    #[test]
    fn a_rival_that_enrols_after_our_claim_was_dropped_wins_and_ours_is_refused_not_retried() {
        // A reset notification drops our claim in flight; a rival request of this collector
        // then enrols first in the store. The store's answer is final for both.
        use crate::identity::{Admitted, Refusal};
        let (ours, rival) = (
            "0123456789abcdef0123456789abcdef-ours",
            "0123456789abcdef0123456789abcdef-rival",
        );
        let cluster = Arc::new(Cluster::default());
        let gate = tofu_gate(&cluster);
        let rival_got = Arc::new(Mutex::new(None));
        let (c, g, r) = (cluster.clone(), gate.clone(), rival_got.clone());
        *cluster.meanwhile.lock().unwrap() = Some(Meanwhile(Box::new(move || {
            c.changed.lock().unwrap().push("i-x".into());
            *r.lock().unwrap() = Some(g.admit("i-x", &with(rival), 2));
        })));
        let got = gate.admit("i-x", &with(ours), 2);
        assert!(matches!(got, Err(Refusal::Forbidden(_))), "{got:?}");
        assert_eq!(rival_got.lock().unwrap().take(), Some(Ok(Admitted::New)));
        assert_eq!(gate.admit("i-x", &with(rival), 3), Ok(Admitted::Known));
        assert!(matches!(
            gate.admit("i-x", &with(ours), 3),
            Err(Refusal::Forbidden(_))
        ));
    }

    #[test]
    fn survives_reopen_and_compacts() {
        let d = tempfile::tempdir().unwrap();
        let s = FileEnrolments::new(d.path());
        assert!(s.load().unwrap().is_empty());
        let e = |h: &str| Enrolment {
            credential_sha256: h.into(),
            enrolled_ms: 5,
        };
        s.enrolled("i-1", &e("aa")).unwrap();
        s.enrolled("i-2", &e("bb")).unwrap();
        s.removed("i-1").unwrap();
        s.enrolled("i-1", &e("cc")).unwrap();
        // A torn line at the end, as a crash mid-append leaves it.
        std::fs::OpenOptions::new()
            .append(true)
            .open(s.path())
            .unwrap()
            .write_all(b"{\"op\":\"enr")
            .unwrap();
        let again = FileEnrolments::new(d.path());
        let m = again.load().unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m["i-1"].credential_sha256, "cc");
        assert_eq!(m["i-2"].credential_sha256, "bb");
        let text = std::fs::read_to_string(again.path()).unwrap();
        assert_eq!(text.lines().count(), 2, "compacted: {text}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(again.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "mode {mode:o}");
    }

    #[test]
    fn enrolments_written_at_once_all_return_durable_and_all_load_again() {
        // Many first reports at once (a fleet booting) share fsyncs; each append must still
        // return only after its own line is written, and every line must load again.
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FileEnrolments::new(dir.path()));
        let threads: Vec<_> = (0..16)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for n in 0..25 {
                        let e = Enrolment {
                            credential_sha256: format!("{t:02}{n:02}"),
                            enrolled_ms: n,
                        };
                        store.enrolled(&format!("i-{t}-{n}"), &e).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*store.synced.lock().unwrap(), 400);
        let loaded = FileEnrolments::new(dir.path()).load().unwrap();
        assert_eq!(loaded.len(), 400);
        assert_eq!(loaded["i-7-3"].credential_sha256, "0703");
    }
}
