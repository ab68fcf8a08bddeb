//! Where fleet state lives: the [`FleetStore`] seam, and its embedded implementation
//! ([`EmbeddedStore`]: memory plus `<data-dir>/fleet.json`, nothing else to run).
//!
//! The embedded store writes one JSON snapshot to a temporary file, fsyncs it and renames it
//! over the old one (then fsyncs the directory), every few seconds when something changed
//! and at shutdown. A crash loses at most the last few seconds, which is harmless: a mark or
//! an ack made then is made again by the next pass or the recycler's next poll, and a batch
//! re-sent because its seq was lost is written again, overwriting its own points in InfluxDB
//! (same series, same timestamps).
//!
//! The snapshot carries a `version`; [`migrate`] brings every older format up to
//! [`VERSION`] step by step, and a newer one (a downgrade) is read for what this collector
//! understands, after a copy of it is kept aside, instead of being refused.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::queue::QueueState;

/// One decision of the queue pass, as an audit trail keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub at_ms: i64,
    /// `mark`, `hold` or `alert`.
    pub action: &'static str,
    /// The instance (a mark or a hold), or None for a group's alert.
    pub instance_id: Option<String>,
    pub group: String,
    pub detail: serde_json::Value,
}
use super::state::{Instance, Observation};

/// The fleet state format this collector writes.
pub const VERSION: u32 = 2;

/// The whole fleet state at one moment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u32,
    /// Unix ms and the writer's monotonic ms when it was taken: monotonic readings inside
    /// are translated with these on restore (see `Fleet::restore` in mod.rs).
    pub saved_ms: i64,
    #[serde(default)]
    pub saved_mono: i64,
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
    #[error("fleet store unavailable: {0}")]
    Unavailable(String),
}

/// Where fleet state lives. The rest of the collector talks to a `dyn FleetStore` through
/// the `Fleet` door and never knows which one it has.
///
/// The model, for an implementation shared by N collectors (PostgreSQL):
/// - Every collector takes reports. Each report becomes an [`Observation`] (liveness at
///   arrival, figures, check results, drift verdict, all keyed by (instance, boot, seq)),
///   which the collector applies to its own memory and hands to [`FleetStore::observe`]. A
///   shared store buffers these and writes them in batches (say every second): reports must
///   not wait for a database round trip. Applying one observation twice is harmless by
///   construction (applying a (boot, seq) counts once).
/// - A batch whose points were stored is handed to [`FleetStore::stored`]: only those seqs
///   may ever be answered "duplicate", on any collector.
/// - Exactly one collector is the decider ([`FleetStore::is_decider`], e.g. under a lease).
///   Each pass it merges other collectors' observations and acks ([`FleetStore::pull`]),
///   runs the queue, and persists the result with [`FleetStore::save`] (marks, holds,
///   alerts, acks, the rate limit's memory). A collector that loses the lease must see
///   `is_decider() == false` at once, and then makes no mark: its passes only refresh what
///   it shows from [`FleetStore::load`].
/// - An unavailable store is an `Err(StoreError::Unavailable)`, never a panic: the
///   collector keeps taking reports and writing points, and makes no marks until it is back.
///
/// The embedded implementation is all of that for one process: memory is the truth, so
/// `observe`, `stored` and `pull` have nothing to do, and it is always the decider.
pub trait FleetStore: Send + Sync + std::fmt::Debug {
    /// A short description for logs and `/healthz` (`file /var/lib/phoenix/fleet.json`).
    fn describe(&self) -> String;

    /// The saved state, or None on a first start. Migrated to [`VERSION`].
    fn load(&self) -> Result<Option<Snapshot>, StoreError>;

    /// Persist the whole state (the decider, every few seconds when something changed, and
    /// at shutdown). A shared store may write only what changed since its last save.
    fn save(&self, snapshot: &Snapshot) -> Result<(), StoreError>;

    /// Whether this collector may mark, hold and alert now. Embedded: always.
    fn is_decider(&self) -> bool {
        true
    }

    /// A report's effects, as this collector applied them (see the trait's docs).
    fn observe(&self, _o: &Observation) -> Result<(), StoreError> {
        Ok(())
    }

    /// The points of (instance, boot, seq) were stored.
    fn stored(&self, _instance_id: &str, _boot_id: &str, _seq: u64) -> Result<(), StoreError> {
        Ok(())
    }

    /// A recycler acked `instance_id` on this collector (the decider applies it).
    fn ack(&self, _instance_id: &str, _by: &str, _at_ms: i64) -> Result<(), StoreError> {
        Ok(())
    }

    /// The decider's decisions of one pass (marks, holds, mass-event alerts), for a shared
    /// store's own audit trail: every collector of a cluster reads one trail. The embedded
    /// store keeps none beyond the `phoenix_audit` points the decider writes to InfluxDB.
    fn audit(&self, _decisions: &[Decision]) {}

    /// A diagnostics request made here, or an answer taken here, for the other collectors.
    fn share_diag(&self, _instance_id: &str, _d: &super::diag::Shared) -> Result<(), StoreError> {
        Ok(())
    }

    /// What other collectors observed since the last pull (and, for a collector that does
    /// not decide, the decider's verdicts).
    fn pull(&self) -> Result<Pulled, StoreError> {
        Ok(Pulled::default())
    }

    /// A shared store's health for `/healthz` and the page; None: embedded, nothing to be down.
    fn status(&self) -> Option<SharedStatus> {
        None
    }
}

/// How a shared fleet store is doing, as this collector sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SharedStatus {
    pub up: bool,
    /// Why not, and what happens meanwhile.
    pub reason: Option<String>,
    /// Unix ms of the last change between up and down.
    pub since_ms: i64,
}

/// What [`FleetStore::pull`] hands the decider.
#[derive(Debug, Clone, Default)]
pub struct Pulled {
    pub observations: Vec<Observation>,
    /// (instance, boot, seq) whose points were stored elsewhere.
    pub stored: Vec<(String, String, u64)>,
    /// (instance, by, at_ms) acks taken elsewhere.
    pub acks: Vec<(String, String, i64)>,
    /// For a collector that does not decide: the decider's queue view of these instances
    /// (state, problem, mark, hold), already on this collector's monotonic clock.
    pub phx: Vec<(String, super::state::Phx)>,
    /// For a collector that does not decide: the decider's queue state (alerts, rate).
    pub queue: Option<QueueState>,
    /// Diagnostics requests and answers other collectors shared.
    pub diag: Vec<(String, super::diag::Shared)>,
}

/// Memory plus `<data-dir>/fleet.json`.
#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    path: PathBuf,
}

impl EmbeddedStore {
    pub fn new(data_dir: &Path) -> EmbeddedStore {
        EmbeddedStore {
            path: data_dir.join("fleet.json"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl FleetStore for EmbeddedStore {
    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }

    fn load(&self) -> Result<Option<Snapshot>, StoreError> {
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
        let corrupt = |err: String| StoreError::Corrupt {
            path: self.path.clone(),
            err,
        };
        let raw: Json = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let found = version_of(&raw);
        if found > VERSION {
            // Written by a newer collector (a downgrade): keep its file, read what we can.
            let aside = self.path.with_extension(format!("json.v{found}"));
            std::fs::write(&aside, &bytes).map_err(|err| StoreError::Write {
                path: aside.clone(),
                err,
            })?;
            tracing::warn!(version = found, reads = VERSION, kept = %aside.display(), "fleet state written by a newer collector: reading the fields this one knows");
        }
        let snap = migrate(raw).map_err(corrupt)?;
        Ok(Some(snap))
    }

    fn save(&self, s: &Snapshot) -> Result<(), StoreError> {
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

fn version_of(raw: &Json) -> u32 {
    raw.get("version")
        .and_then(Json::as_u64)
        .map_or(0, |v| v.min(u64::from(u32::MAX)) as u32)
}

/// One step: the format of version `n` to version `n + 1`.
type Step = fn(Json) -> Result<Json, String>;

/// `MIGRATIONS[k]` turns version `k + 1` into `k + 2`.
const MIGRATIONS: [Step; 1] = [v1_to_v2];

/// Any saved format up to [`VERSION`] (or newer: read as far as understood) to a snapshot.
pub fn migrate(mut raw: Json) -> Result<Snapshot, String> {
    if !raw.is_object() {
        return Err("not a JSON object".into());
    }
    let mut v = version_of(&raw);
    if v == 0 {
        return Err("no version field".into());
    }
    while v < VERSION {
        let step = MIGRATIONS
            .get(v as usize - 1)
            .ok_or_else(|| format!("no migration from version {v}"))?;
        raw = step(raw).map_err(|e| format!("migrating version {v}: {e}"))?;
        v += 1;
        raw["version"] = Json::from(v);
    }
    let mut s: Snapshot = serde_json::from_value(raw).map_err(|e| e.to_string())?;
    s.version = VERSION;
    Ok(s)
}

/// Version 1 (until the fleet core): times were wall-clock only, dedupe was one high-water
/// mark per boot (`seqs: {boot: [seq, ms]}`), the pegged rule kept `pegged_since_ms`.
///
/// Version 2 measures with a monotonic clock. The old wall times become monotonic readings
/// of a process whose clock read `saved_ms` when the snapshot was taken (`saved_mono` =
/// `saved_ms`), so restore translates them like any other. A high-water mark meant "all
/// taken up to here": it becomes the floor of both windows, applied and stored.
fn v1_to_v2(mut raw: Json) -> Result<Json, String> {
    let saved_ms = raw.get("saved_ms").and_then(Json::as_i64).unwrap_or(0);
    raw["saved_mono"] = Json::from(saved_ms);
    let Some(list) = raw.get_mut("instances").and_then(Json::as_array_mut) else {
        return Err("no instances list".into());
    };
    for i in list {
        let Some(o) = i.as_object_mut() else {
            return Err("an instance is not an object".into());
        };
        for (wall, mono) in [
            ("first_seen_ms", "first_seen_mono"),
            ("last_seen_ms", "last_seen_mono"),
        ] {
            let t = o.get(wall).cloned().unwrap_or(Json::from(0));
            o.insert(mono.into(), t);
        }
        let mut boots = serde_json::Map::new();
        if let Some(seqs) = o.remove("seqs").as_ref().and_then(Json::as_object) {
            for (boot, v) in seqs {
                let seq = v.get(0).and_then(Json::as_u64).unwrap_or(0);
                let at = v.get(1).and_then(Json::as_i64).unwrap_or(0);
                let w = serde_json::to_value(super::state::SeqWindow::up_to(seq))
                    .map_err(|e| e.to_string())?;
                boots.insert(
                    boot.clone(),
                    serde_json::json!({"applied": w, "stored": w, "last_mono": at}),
                );
            }
        }
        o.insert("boots".into(), Json::Object(boots));
        if let Some(t) = o.get_mut("tracking").and_then(Json::as_object_mut) {
            let p = t.remove("pegged_since_ms").unwrap_or(Json::Null);
            t.insert("pegged_since_mono".into(), p);
        }
        if let Some(p) = o.get_mut("phx").and_then(Json::as_object_mut) {
            let since = p.get("problem_since_ms").cloned().unwrap_or(Json::Null);
            p.insert("problem_since_mono".into(), since);
            if let Some(m) = p.get_mut("mark").and_then(Json::as_object_mut) {
                let since = m.get("since_ms").cloned().unwrap_or(Json::from(0));
                m.insert("since_mono".into(), since);
            }
        }
    }
    // The rate limit's recent marks were wall times; as monotonic readings they translate too.
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::health::Reason;
    use crate::fleet::state::{Mark, State};

    #[test]
    fn saves_and_loads_and_refuses_garbage() {
        let d = tempfile::tempdir().unwrap();
        let st = EmbeddedStore::new(d.path());
        assert!(st.load().unwrap().is_none(), "first start");
        let mut i = Instance::default();
        i.identity.instance_id = "i-1".into();
        i.phx.mark = Some(Mark {
            reason: Reason::Drift,
            evidence: "e".into(),
            since_ms: 3,
            since_mono: 2,
            acked_ms: None,
            acked_by: None,
            gone_ms: None,
        });
        let mut q = QueueState::default();
        q.recent_marks.push_back(3);
        st.save(&Snapshot {
            version: VERSION,
            saved_ms: 9,
            saved_mono: 8,
            instances: vec![i],
            queue: q,
        })
        .unwrap();
        let back = st.load().unwrap().unwrap();
        assert_eq!(
            back.instances[0].phx.mark.as_ref().unwrap().reason,
            Reason::Drift
        );
        assert_eq!(back.queue.recent_marks, [3]);
        assert_eq!((back.saved_ms, back.saved_mono), (9, 8));
        assert!(!d.path().join(".fleet.json.tmp").exists());
        std::fs::write(st.path(), b"{\"version\":1,").unwrap();
        let e = st.load().unwrap_err().to_string();
        assert!(e.contains("move it aside"), "{e}");
    }

    #[test]
    fn the_version_1_format_migrates_with_marks_acks_holds_and_dedupe_history() {
        let d = tempfile::tempdir().unwrap();
        let st = EmbeddedStore::new(d.path());
        // Written by the collector before the fleet core (store.rs, format version 1).
        std::fs::write(st.path(), include_str!("testdata/fleet-v1.json")).unwrap();
        let s = st.load().unwrap().unwrap();
        assert_eq!(s.version, VERSION);
        assert_eq!(s.saved_mono, 1_700_000_900_500);
        let by = |id: &str| s.instances.iter().find(|i| i.identity.instance_id == id);
        let a = by("i-drifted").unwrap();
        let m = a.phx.mark.as_ref().unwrap();
        assert_eq!(a.phx.state, State::Acked);
        assert_eq!(
            (m.reason, m.acked_by.as_deref()),
            (Reason::Drift, Some("recycler#1"))
        );
        assert_eq!(m.since_mono, m.since_ms);
        assert_eq!(a.last_seen_mono, 1_700_000_900_000);
        assert!(a.drift.as_ref().unwrap().drifted);
        assert_eq!(a.drift.as_ref().unwrap().changes[0].path, "/etc/passwd");
        assert_eq!(a.tracking.pegged_since, Some(1_700_000_800_000));
        assert_eq!(a.tracking.check_streaks["web"].0, 2);
        // The high-water mark became the floor: 80 and below were stored, 81 was not.
        let b = a.boots.get("boot-a").unwrap();
        assert!(b.stored.contains(80) && b.stored.contains(1) && !b.stored.contains(81));
        assert!(b.applied.contains(80));
        assert!(a.boots.get("boot-0").unwrap().stored.contains(12));
        let h = by("i-held").unwrap();
        assert!(h.phx.held.as_deref().unwrap().starts_with("budget"));
        assert_eq!(h.phx.problem_since_mono, Some(1_700_000_880_000));
        assert_eq!(s.queue.alerts["batch"].bad, 4);
        assert_eq!(s.queue.recent_marks, [1_700_000_860_000]);
    }

    #[test]
    fn a_newer_format_is_read_not_refused_and_kept_aside() {
        let d = tempfile::tempdir().unwrap();
        let st = EmbeddedStore::new(d.path());
        let mut raw: Json = serde_json::to_value(Snapshot {
            version: VERSION,
            saved_ms: 1,
            saved_mono: 1,
            instances: vec![Instance::default()],
            queue: QueueState::default(),
        })
        .unwrap();
        raw["version"] = Json::from(VERSION + 1);
        raw["a_field_from_the_future"] = Json::from(true);
        std::fs::write(st.path(), serde_json::to_vec(&raw).unwrap()).unwrap();
        let s = st.load().unwrap().unwrap();
        assert_eq!(s.instances.len(), 1);
        assert!(d
            .path()
            .join(format!("fleet.json.v{}", VERSION + 1))
            .exists());
    }
}
