//! Baselines and enrolments shared through PostgreSQL, behind the traits the embedded
//! collector's files implement (`identity::EnrolmentStore`, `baselines::BaselineStore`).
//!
//! Every collector keeps its copy in memory (the identity gate's map, the baselines' map),
//! so a report for a known instance or image makes no round trip. Writes go to PostgreSQL at
//! once and NOTIFY; a watcher task on the store's runtime turns the notifications of other
//! collectors into changes the copies take at their next read. After a reconnect of the
//! LISTEN connection (notifications may have been lost) the watcher reads everything again.
//!
//! While PostgreSQL is down, known enrolments and baselines still verify from memory; a new
//! enrolment is refused (503, the agent retries) rather than accepted unverified, and a
//! baseline registration fails with 503.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use phoenix_wire::drift::Manifest;
use tokio::sync::broadcast::error::RecvError;

use super::registry::{self, Registered};
use super::store::{PgFleetStore, KEEP_REPORTS_MS};
use super::{listen, wall_ms, PgError, PgStore};
use crate::drift::Registration;
use crate::identity::{Changed, Claimed, Enrolment, EnrolmentStore, StoreError};

/// Most ids remembered between two reads of the gate; past it, it reloads everything.
const MAX_CHANGED_IDS: usize = 10_000;

fn shared(e: PgError) -> StoreError {
    StoreError::Shared(e.to_string())
}

/// Refuses at once while the store is known to be down, instead of making an enrolling
/// agent (or the pipeline) wait for a timeout.
fn up(pg: &PgStore) -> Result<(), PgError> {
    if pg.health.is_up() {
        Ok(())
    } else {
        Err(PgError::Timeout(super::OP_TIMEOUT))
    }
}

/// Tofu enrolments in `phoenix_enrolments`.
#[derive(Debug)]
pub struct PgEnrolments {
    store: Arc<PgFleetStore>,
    dirty: Arc<AtomicBool>,
    pending: Arc<Mutex<Option<Changed>>>,
}

impl PgEnrolments {
    /// Subscribes before anything is loaded, so no change falls between the load and the
    /// first notification.
    pub fn new(store: Arc<PgFleetStore>) -> PgEnrolments {
        let dirty = Arc::new(AtomicBool::new(false));
        let pending = Arc::new(Mutex::new(None));
        let rx = store.pg().subscribe();
        store.spawn(watch_enrolments(
            Arc::clone(store.pg()),
            rx,
            Arc::clone(&dirty),
            Arc::clone(&pending),
        ));
        PgEnrolments {
            store,
            dirty,
            pending,
        }
    }
}

fn as_enrolments(m: HashMap<String, (String, i64)>) -> HashMap<String, Enrolment> {
    m.into_iter()
        .map(|(id, (h, at))| {
            (
                id,
                Enrolment {
                    credential_sha256: h,
                    enrolled_ms: at,
                },
            )
        })
        .collect()
}

async fn watch_enrolments(
    pg: Arc<PgStore>,
    mut rx: tokio::sync::broadcast::Receiver<String>,
    dirty: Arc<AtomicBool>,
    pending: Arc<Mutex<Option<Changed>>>,
) {
    loop {
        let reload = match rx.recv().await {
            Ok(p) if p == listen::RELOAD => true,
            Ok(p) => match p.strip_prefix("enrolment:") {
                Some(id) => {
                    let mut g = pending.lock().unwrap();
                    let full = match &mut *g {
                        Some(Changed::All(m)) => {
                            m.remove(id);
                            false
                        }
                        Some(Changed::Ids(v)) if v.len() < MAX_CHANGED_IDS => {
                            v.push(id.into());
                            false
                        }
                        Some(Changed::Ids(_)) => true,
                        None => {
                            *g = Some(Changed::Ids(vec![id.into()]));
                            false
                        }
                    };
                    drop(g);
                    dirty.store(true, Ordering::Release);
                    // Too many ids unread: read everything instead.
                    full
                }
                None => false,
            },
            Err(RecvError::Lagged(_)) => true,
            Err(RecvError::Closed) => return,
        };
        if reload {
            if let Err(e) = reload_enrolments(&pg, &dirty, &pending).await {
                tracing::warn!(error = %e, "fleet store: reloading enrolments failed; cached ones stand until the next reconnect");
            }
        }
    }
}

async fn reload_enrolments(
    pg: &PgStore,
    dirty: &AtomicBool,
    pending: &Mutex<Option<Changed>>,
) -> Result<(), PgError> {
    let all = pg
        .registry(|c| Box::pin(registry::tofu_enrolments(c)))
        .await?;
    *pending.lock().unwrap() = Some(Changed::All(as_enrolments(all)));
    dirty.store(true, Ordering::Release);
    Ok(())
}

impl EnrolmentStore for PgEnrolments {
    fn load(&self) -> Result<HashMap<String, Enrolment>, StoreError> {
        self.store
            .blocking(|c| Box::pin(registry::tofu_enrolments(c)))
            .map(as_enrolments)
            .map_err(shared)
    }

    fn enrolled(&self, instance_id: &str, e: &Enrolment) -> Result<(), StoreError> {
        self.claim(instance_id, e).map(|_| ())
    }

    fn removed(&self, instance_id: &str) -> Result<(), StoreError> {
        self.reset(instance_id, true).map(|_| ())
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn claim(&self, instance_id: &str, e: &Enrolment) -> Result<Claimed, StoreError> {
        up(self.store.pg()).map_err(shared)?;
        let (id, hash, at) = (
            instance_id.to_string(),
            e.credential_sha256.clone(),
            e.enrolled_ms,
        );
        let c = self
            .store
            .blocking(move |c| {
                Box::pin(async move { registry::claim_enrolment(c, &id, &hash, at).await })
            })
            .map_err(shared)?;
        Ok(Claimed {
            stored: Enrolment {
                credential_sha256: c.credential_sha256,
                enrolled_ms: c.created_ms,
            },
            new: c.new,
        })
    }

    fn reset(&self, instance_id: &str, known_here: bool) -> Result<bool, StoreError> {
        let id = instance_id.to_string();
        let gone = self
            .store
            .blocking(move |c| Box::pin(async move { registry::reset_enrolment(c, &id).await }))
            .map_err(shared)?;
        Ok(gone || known_here)
    }

    /// Not waited for: the sweep holds the gate's lock. A failure leaves the row, and the
    /// id is swept again only if it reports here again; the instance re-verifies from it.
    fn forgotten(&self, instance_id: &str) -> Result<(), StoreError> {
        let id = instance_id.to_string();
        let pg = Arc::clone(self.store.pg());
        let since = wall_ms().saturating_sub(KEEP_REPORTS_MS);
        self.store.spawn(async move {
            let r = pg
                .registry(move |c| {
                    Box::pin(async move { registry::forget_enrolment(c, &id, since).await })
                })
                .await;
            if let Err(e) = r {
                tracing::debug!(error = %e, "fleet store: forgetting an enrolment failed; kept");
            }
        });
        Ok(())
    }

    fn changed(&self) -> Option<Changed> {
        // A plain load first: this runs for every report, and nearly always finds nothing.
        if !self.dirty.load(Ordering::Acquire) || !self.dirty.swap(false, Ordering::AcqRel) {
            return None;
        }
        self.pending.lock().unwrap().take()
    }
}

/// Baselines in `phoenix_baselines`.
#[derive(Debug)]
pub struct PgBaselines {
    store: Arc<PgFleetStore>,
    dirty: Arc<AtomicBool>,
    news: Arc<Mutex<Vec<Manifest>>>,
}

impl PgBaselines {
    pub fn new(store: Arc<PgFleetStore>) -> PgBaselines {
        let dirty = Arc::new(AtomicBool::new(false));
        let news = Arc::new(Mutex::new(Vec::new()));
        let rx = store.pg().subscribe();
        store.spawn(watch_baselines(
            Arc::clone(store.pg()),
            rx,
            Arc::clone(&dirty),
            Arc::clone(&news),
        ));
        PgBaselines { store, dirty, news }
    }
}

/// A stored manifest, checked as a registration is (a row edited by hand is not trusted).
fn manifest_of(image: &str, json: &str) -> Option<Manifest> {
    match serde_json::from_str::<Manifest>(json) {
        Ok(m) if m.image_id == image && m.verify().is_ok() => Some(m),
        _ => {
            tracing::warn!(image_id = %image, "fleet store: an unreadable or inconsistent baseline row; ignored");
            None
        }
    }
}

async fn watch_baselines(
    pg: Arc<PgStore>,
    mut rx: tokio::sync::broadcast::Receiver<String>,
    dirty: Arc<AtomicBool>,
    news: Arc<Mutex<Vec<Manifest>>>,
) {
    loop {
        let got: Result<Vec<Manifest>, PgError> = match rx.recv().await {
            Ok(p) if p == listen::RELOAD => all_baselines(&pg).await,
            Ok(p) => match p.strip_prefix("baseline:") {
                Some(image) => {
                    let img = image.to_string();
                    pg.registry(move |c| {
                        Box::pin(async move {
                            Ok(registry::baseline(c, &img)
                                .await?
                                .and_then(|j| manifest_of(&img, &j))
                                .into_iter()
                                .collect())
                        })
                    })
                    .await
                }
                None => continue,
            },
            Err(RecvError::Lagged(_)) => all_baselines(&pg).await,
            Err(RecvError::Closed) => return,
        };
        match got {
            Ok(ms) if ms.is_empty() => {}
            Ok(ms) => {
                let mut g = news.lock().unwrap();
                // Bounded: a backlog nobody read is replaced by the newer read.
                if g.len() > 10_000 {
                    g.clear();
                }
                g.extend(ms);
                dirty.store(true, Ordering::Release);
            }
            Err(e) => {
                tracing::warn!(error = %e, "fleet store: reading a baseline another collector registered failed; it is read at the next reconnect")
            }
        }
    }
}

async fn all_baselines(pg: &PgStore) -> Result<Vec<Manifest>, PgError> {
    let rows = pg.registry(|c| Box::pin(registry::baselines(c))).await?;
    Ok(rows
        .into_iter()
        .filter_map(|(img, j)| manifest_of(&img, &j))
        .collect())
}

impl crate::baselines::BaselineStore for PgBaselines {
    fn load(&self) -> Result<Vec<Manifest>, String> {
        self.store
            .blocking(|c| Box::pin(registry::baselines(c)))
            .map(|rows| {
                rows.into_iter()
                    .filter_map(|(img, j)| manifest_of(&img, &j))
                    .collect()
            })
            .map_err(|e| format!("loading baselines from the fleet store: {e}"))
    }

    fn put(&self, image: &str, m: &Manifest, _here: Registration) -> Result<Registration, String> {
        let unavailable = |e: PgError| {
            format!(
                "the fleet store cannot take the baseline now ({e}); retry when PostgreSQL is back"
            )
        };
        up(self.store.pg()).map_err(unavailable)?;
        let json = serde_json::to_string(m).map_err(|e| e.to_string())?;
        let (img, root) = (image.to_string(), m.root.clone());
        let r = self
            .store
            .blocking(move |c| {
                Box::pin(
                    async move { registry::put_baseline(c, &img, &root, &json, wall_ms()).await },
                )
            })
            .map_err(unavailable)?;
        Ok(match r {
            Registered::Created => Registration::Created,
            Registered::Unchanged => Registration::Unchanged,
            Registered::Replaced { old_root } => Registration::Replaced { old_root },
        })
    }

    fn changed(&self) -> Vec<Manifest> {
        // A plain load first: this runs for every report, and nearly always finds nothing.
        if !self.dirty.load(Ordering::Acquire) || !self.dirty.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut *self.news.lock().unwrap())
    }
}
