//! The fleet core's [`FleetStore`] on PostgreSQL: what `--fleet-store postgres://…` plugs
//! into the `Fleet` door.
//!
//! The trait is synchronous (the fleet calls it under no lock of its own, from the report
//! handlers and the queue driver's thread); the client is async. The bridge is a runtime of
//! its own, on a thread of its own (`phoenix-pgstore`), that runs the store's background
//! tasks (flusher, lease keeper, LISTEN) and every round trip. The report path never waits
//! for it: `observe`, `stored` and `ack` only buffer (bounded) and the flusher writes the
//! buffer in one statement about once a second. `load`, `save` and `pull` hand a job to the
//! store's runtime and wait for its answer with a deadline; the queue driver calls them on
//! its own thread, and `load` runs once at start.
//!
//! What lives where:
//! - `phoenix_reports`: every accepted report's observation, and whether its points were
//!   stored. Every collector pulls what others wrote (by transaction-id cursor, as pull.rs
//!   does), so each shows the whole fleet and answers "duplicate" for a batch stored through
//!   another collector. Pruned after [`KEEP_REPORTS_MS`].
//! - `phoenix_fleet` + `phoenix_state['fleet_queue']`: the decider's state, one row per
//!   instance, written under its fence when it changed in more than liveness and figures
//!   (those are refreshed at most every [`REFRESH_MS`]), so a 5 s save does not rewrite the
//!   whole fleet. Collectors that do not decide take the decider's verdicts (state, marks,
//!   holds) from these rows; a restarted collector loads them and replays the recent reports.
//! - acks are audit rows (`phoenix_audit`, action `ack`), which the decider pulls.
//! - `phoenix_diag`: each instance's newest diagnostics request or answer, flushed with the
//!   reports and adopted by the others at their pull (fleet/diag.rs).
//! - baselines and enrolments: see caches.rs (`enrolments()`, `baselines()`).
//!
//! Only the decider marks: [`FleetStore::is_decider`] is true while this collector holds
//! the lease, PostgreSQL answers, and the catch-up time since it took the lease or since
//! PostgreSQL came back has passed (every collector's buffered reports are flushed and
//! pulled first, so nobody is marked for the gap).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_postgres::Client;

use super::{lease::check_fence, PgError, PgOptions, PgStore, OP_TIMEOUT, WAKE_CHANNEL};
use crate::fleet::clock::Clock;
use crate::fleet::queue::QueueState;
use crate::fleet::state::{Instance, Observation, Phx};
use crate::fleet::store::{
    Decision, FleetStore, Pulled, SharedStatus, Snapshot, StoreError, VERSION,
};

/// Reports older than this are deleted (the decider's rows hold what they did long before).
pub const KEEP_REPORTS_MS: i64 = 5 * 60_000;
/// A first pull replays reports this recent on top of the loaded rows (these are at most
/// [`REFRESH_MS`] behind in liveness and dedupe).
pub const REPLAY_MS: i64 = 120_000;
/// An instance row whose only change is liveness, figures or dedupe is rewritten this often.
pub const REFRESH_MS: i64 = 30_000;
/// Most report rows one pull reads; more wait for the next pull.
pub const PULL_MAX: i64 = 50_000;
/// Most acks buffered while PostgreSQL is away.
const MAX_ACKS: usize = 10_000;
/// Most diagnostics requests and answers buffered while PostgreSQL is away.
const MAX_DIAG: usize = 1_000;
/// Shared diagnostics are deleted after this; a first pull reads this far back.
const KEEP_DIAG_MS: i64 = 24 * 3_600_000;
/// The key of the decider's queue state in `phoenix_state`.
const QUEUE_KEY: &str = "fleet_queue";

#[derive(Debug, Clone)]
struct Row {
    at_ms: i64,
    /// The observation's JSON, or None when only the stored flag is news.
    body: Option<String>,
    stored: bool,
}

#[derive(Debug, Default)]
struct Pending {
    reports: BTreeMap<(String, String, u64), Row>,
    acks: Vec<(String, String, i64)>,
    /// Diagnostics to share: instance → (request id, JSON of `diag::Shared`).
    diag: HashMap<String, (i64, String)>,
    /// A report moved a verdict (drift, a failing check): wake the decider.
    wake: bool,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.reports.is_empty() && self.acks.is_empty() && self.diag.is_empty()
    }

    /// `newer` came in while `self` was being written (and failed): keep both.
    fn merge(&mut self, newer: Pending) {
        for (k, r) in newer.reports {
            match self.reports.get_mut(&k) {
                Some(old) => {
                    old.stored |= r.stored;
                    if old.body.is_none() {
                        old.body = r.body;
                    }
                }
                None => {
                    self.reports.insert(k, r);
                }
            }
        }
        self.acks.extend(newer.acks);
        for (k, d) in newer.diag {
            let newest = self.diag.get(&k).is_none_or(|old| old.0 <= d.0);
            if newest {
                self.diag.insert(k, d);
            }
        }
        self.wake |= newer.wake;
    }
}

/// What the decider last wrote per instance: the hash of its significant part, and when.
#[derive(Debug, Default)]
struct Written {
    fence: i64,
    rows: HashMap<String, (u64, i64)>,
    pruned_ms: i64,
}

/// `--fleet-store postgres://…`.
pub struct PgFleetStore {
    pg: Arc<PgStore>,
    rt: tokio::runtime::Handle,
    clock: Arc<dyn Clock>,
    url: String,
    pending: Mutex<Pending>,
    max_reports: usize,
    cursor: Mutex<Option<i64>>,
    written: Mutex<Written>,
    /// Decisions waiting for the next save, which writes them as audit rows under the
    /// same fence (at most [`MAX_AUDIT_WAITING`]; older ones are dropped, and counted in a
    /// warning, while PostgreSQL is away that long).
    audit: Mutex<Vec<Decision>>,
    /// Stops the runtime's thread when the store is dropped.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl std::fmt::Debug for PgFleetStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgFleetStore")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl PgFleetStore {
    /// Connects, migrates, and starts the store's runtime and background tasks. Fails when
    /// PostgreSQL cannot be reached now: a collector told to share state refuses to run
    /// without it rather than start a fleet of its own.
    pub fn open(
        url: &str,
        opts: PgOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<PgFleetStore>, PgError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| PgError::Url(format!("starting the fleet store's runtime: {e}")))?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let u = url.to_string();
        std::thread::Builder::new()
            .name("phoenix-pgstore".into())
            .spawn(move || {
                rt.block_on(async move {
                    match PgStore::open(&u, opts).await {
                        Ok(s) => {
                            s.start();
                            if ready_tx.send(Ok(Arc::clone(&s))).is_err() {
                                return; // the opener gave up waiting
                            }
                            // Until the store is dropped (Err: its sender went away).
                            stopped.await.ok();
                        }
                        Err(e) => {
                            ready_tx.send(Err(e)).ok();
                        }
                    }
                });
            })
            .map_err(|e| PgError::Url(format!("starting the fleet store's thread: {e}")))?;
        let pg = ready_rx
            .recv()
            .map_err(|_| PgError::Url("the fleet store's thread ended".into()))??;
        let max_reports = pg.opts.max_pending_observations;
        let store = Arc::new(PgFleetStore {
            pg,
            rt: handle,
            clock,
            url: super::redact(url),
            pending: Mutex::default(),
            max_reports,
            cursor: Mutex::new(None),
            written: Mutex::default(),
            audit: Mutex::default(),
            _stop: stop,
        });
        let s = Arc::clone(&store);
        store.rt.spawn(async move { s.flush_loop().await });
        Ok(store)
    }

    /// A last flush of the buffered reports, then the lease is given up (clean shutdown:
    /// another collector decides at its next poll). Blocks; call it off the async workers.
    pub fn close(self: &Arc<Self>) {
        let s = Arc::clone(self);
        let r = self.call(async move {
            s.flush().await?;
            s.pg.close().await;
            Ok(())
        });
        if let Err(e) = r {
            tracing::warn!(error = %e, "fleet store: last flush failed; the agents resend what was not stored");
        }
    }

    /// The PostgreSQL handle (registry, tests).
    pub fn pg(&self) -> &Arc<PgStore> {
        &self.pg
    }

    /// Runs one registry operation on the store's runtime and waits for it (baselines and
    /// enrolments: see caches.rs). Blocks; never call it from the store's runtime.
    pub fn blocking<T: Send + 'static>(
        &self,
        op: impl for<'c> FnOnce(&'c Client) -> super::RegistryFuture<'c, T> + Send + 'static,
    ) -> Result<T, PgError> {
        let pg = Arc::clone(&self.pg);
        self.call(async move { pg.registry(op).await })
    }

    /// Runs `f` on the store's runtime, not waited for.
    pub fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        self.rt.spawn(f);
    }

    /// The tofu enrolments shared by every collector (`identity::EnrolmentStore`).
    pub fn enrolments(self: &Arc<Self>) -> Box<dyn crate::identity::EnrolmentStore> {
        Box::new(super::caches::PgEnrolments::new(Arc::clone(self)))
    }

    /// The baselines shared by every collector (`baselines::BaselineStore`).
    pub fn baselines(self: &Arc<Self>) -> Box<dyn crate::baselines::BaselineStore> {
        Box::new(super::caches::PgBaselines::new(Arc::clone(self)))
    }

    /// Runs `f` on the store's runtime and waits for it, at most `OP_TIMEOUT` plus a second.
    /// Never call from the store's own runtime (nothing does: the trait's callers are the
    /// fleet's).
    fn call<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = Result<T, PgError>> + Send + 'static,
    ) -> Result<T, PgError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.rt.spawn(async move {
            // The caller may have timed out and gone: nothing to tell then.
            tx.send(f.await).ok();
        });
        rx.recv_timeout(OP_TIMEOUT + Duration::from_secs(1))
            .map_err(|_| PgError::Timeout(OP_TIMEOUT))?
    }

    fn unavailable(&self, e: PgError) -> StoreError {
        StoreError::Unavailable(e.to_string())
    }

    /// Milliseconds after taking the lease, or after PostgreSQL came back, before deciding:
    /// two flushes (every collector's buffer is in) and a pull.
    fn catch_up_ms(&self) -> i64 {
        2 * self.pg.opts.flush_every.as_millis() as i64 + 1000
    }

    async fn flush_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.pg.opts.flush_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.flush().await {
                tracing::debug!(error = %e, "fleet store: report flush failed; kept for the next");
            }
        }
    }

    /// Writes the buffered reports, stored flags and acks in one statement.
    pub async fn flush(&self) -> Result<(), PgError> {
        let taken = std::mem::take(&mut *self.pending.lock().unwrap());
        if taken.is_empty() {
            return Ok(());
        }
        let res = {
            let mut g = self.pg.work().await;
            let r = match self.pg.ensure(&mut g).await {
                Ok(c) => write_reports(c, &taken, &self.pg.lease.holder).await,
                Err(e) => Err(e),
            };
            self.pg.note(&r, &mut g);
            r
        };
        match res {
            Ok(()) => Ok(()),
            Err(e) if !e.is_outage() => {
                tracing::error!(error = %e, reports = taken.reports.len(), "the fleet store refused a report flush for its content; dropped it");
                Err(e)
            }
            Err(e) => {
                let mut p = self.pending.lock().unwrap();
                let newer = std::mem::take(&mut *p);
                *p = taken;
                p.merge(newer);
                Err(e)
            }
        }
    }
}

/// A key string PostgreSQL text can hold (no NUL byte).
fn storable(s: &str) -> bool {
    !s.contains('\0')
}

async fn write_reports(c: &Client, p: &Pending, holder: &str) -> Result<(), PgError> {
    let (mut ids, mut boots, mut seqs, mut ats, mut bodies, mut stored) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut u_ids, mut u_boots, mut u_seqs) = (vec![], vec![], vec![]);
    for ((i, b, s), r) in &p.reports {
        match &r.body {
            Some(body) => {
                ids.push(i.as_str());
                boots.push(b.as_str());
                seqs.push(*s as i64);
                ats.push(r.at_ms);
                bodies.push(body.as_str());
                stored.push(r.stored);
            }
            None if r.stored => {
                u_ids.push(i.as_str());
                u_boots.push(b.as_str());
                u_seqs.push(*s as i64);
            }
            None => {}
        }
    }
    let (mut a_ids, mut a_by, mut a_at) = (vec![], vec![], vec![]);
    for (i, by, at) in &p.acks {
        a_ids.push(i.as_str());
        a_by.push(by.as_str());
        a_at.push(*at);
    }
    let (mut d_ids, mut d_reqs, mut d_bodies) = (vec![], vec![], vec![]);
    for (i, (req, body)) in &p.diag {
        d_ids.push(i.as_str());
        d_reqs.push(*req);
        d_bodies.push(body.as_str());
    }
    let now_ms = super::wall_ms();
    super::timed(async {
        c.query_one(
            "WITH ins AS (
               INSERT INTO phoenix_reports AS t
                 (instance_id, boot_id, seq, at_ms, writer, body, stored)
               SELECT i, b, q, a, $5, body, st
               FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $6::text[],
                           $7::bool[]) AS u(i, b, q, a, body, st)
               ON CONFLICT (instance_id, boot_id, seq) DO UPDATE
                 SET stored = true, changed = pg_current_xact_id()
                 WHERE EXCLUDED.stored AND NOT t.stored
               RETURNING 1),
             upd AS (
               UPDATE phoenix_reports t SET stored = true, changed = pg_current_xact_id()
               FROM unnest($8::text[], $9::text[], $10::bigint[]) AS u(i, b, q)
               WHERE t.instance_id = u.i AND t.boot_id = u.b AND t.seq = u.q AND NOT t.stored
               RETURNING 1),
             ack AS (
               INSERT INTO phoenix_audit (at_ms, actor, action, instance_id, detail)
               SELECT a, by, 'ack', i, '{}'::jsonb
               FROM unnest($11::text[], $12::text[], $13::bigint[]) AS u(i, by, a)
               RETURNING 1),
             diag AS (
               INSERT INTO phoenix_diag AS t (instance_id, req_id, body, writer, updated_ms)
               SELECT i, r, b, $5, $20
               FROM unnest($17::text[], $18::bigint[], $19::text[]) AS u(i, r, b)
               ON CONFLICT (instance_id) DO UPDATE SET req_id = EXCLUDED.req_id,
                 body = EXCLUDED.body, writer = EXCLUDED.writer,
                 updated_ms = EXCLUDED.updated_ms, changed = pg_current_xact_id()
               -- An answer replaces its request; an old request never its answer.
               WHERE EXCLUDED.req_id > t.req_id
                  OR (EXCLUDED.req_id = t.req_id AND EXCLUDED.body <> t.body
                      AND EXCLUDED.body LIKE '%\"answer\":{%')
               RETURNING 1)
             SELECT (SELECT count(*) FROM ins), (SELECT count(*) FROM upd),
                    (SELECT count(*) FROM ack), (SELECT count(*) FROM diag),
                    (SELECT count(pg_notify($14, 'reports'))
                     FROM (SELECT 1 WHERE $15::bool OR $16::bool) w)",
            &[
                &ids,
                &boots,
                &seqs,
                &ats,
                &holder,
                &bodies,
                &stored,
                &u_ids,
                &u_boots,
                &u_seqs,
                &a_ids,
                &a_by,
                &a_at,
                &WAKE_CHANNEL,
                &p.wake,
                &!p.acks.is_empty(),
                &d_ids,
                &d_reqs,
                &d_bodies,
                &now_ms,
            ],
        )
        .await?;
        Ok(())
    })
    .await
}

/// The part of an instance's JSON that is more than liveness, figures and dedupe: a change
/// there is written at the next save; the rest every [`REFRESH_MS`].
fn significant_hash(v: &serde_json::Value) -> u64 {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        for k in [
            "last_seen_ms",
            "last_seen_mono",
            "reports",
            "boots",
            "cpu_used_percent",
            "mem_used_percent",
            "mem_available_percent",
            "disk_max_used_percent",
        ] {
            o.remove(k);
        }
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.to_string().hash(&mut h);
    h.finish()
}

/// The decider's memory between passes, with the clock pair its readings belong to.
#[derive(serde::Serialize, serde::Deserialize)]
struct QueueRow {
    version: u32,
    saved_ms: i64,
    saved_mono: i64,
    queue: QueueState,
}

struct SaveJob {
    fence: i64,
    holder: String,
    lease: String,
    full: bool,
    saved_ms: i64,
    saved_mono: i64,
    ids: Vec<String>,
    bodies: Vec<String>,
    gone: Vec<String>,
    all: Vec<String>,
    queue: String,
    prune_before: Option<i64>,
    audit: Vec<Decision>,
}

async fn save_rows(c: &mut Client, j: &SaveJob) -> Result<(), PgError> {
    let tx = c.transaction().await?;
    check_fence(&tx, &j.lease, &j.holder, j.fence).await?;
    if !j.ids.is_empty() {
        tx.execute(
            "INSERT INTO phoenix_fleet AS f (instance_id, body, saved_ms, saved_mono, fence)
             SELECT i, b, $3, $4, $5 FROM unnest($1::text[], $2::text[]) AS u(i, b)
             ON CONFLICT (instance_id) DO UPDATE SET body = EXCLUDED.body,
               saved_ms = EXCLUDED.saved_ms, saved_mono = EXCLUDED.saved_mono,
               fence = EXCLUDED.fence, changed = pg_current_xact_id()",
            &[&j.ids, &j.bodies, &j.saved_ms, &j.saved_mono, &j.fence],
        )
        .await?;
    }
    if j.full {
        // The first save under a new fence: rows of instances this decider does not know
        // (forgotten by the previous one) go.
        tx.execute(
            "DELETE FROM phoenix_fleet WHERE instance_id <> ALL($1::text[])",
            &[&j.all],
        )
        .await?;
    } else if !j.gone.is_empty() {
        tx.execute(
            "DELETE FROM phoenix_fleet WHERE instance_id = ANY($1::text[])",
            &[&j.gone],
        )
        .await?;
    }
    tx.execute(
        "INSERT INTO phoenix_state (key, body, fence, updated_ms)
         VALUES ($1, $2::text::jsonb, $3, $4)
         ON CONFLICT (key) DO UPDATE SET body = EXCLUDED.body, fence = EXCLUDED.fence,
           updated_ms = EXCLUDED.updated_ms",
        &[&QUEUE_KEY, &j.queue, &j.fence, &j.saved_ms],
    )
    .await?;
    if let Some(before) = j.prune_before {
        tx.execute("DELETE FROM phoenix_reports WHERE at_ms < $1", &[&before])
            .await?;
        tx.execute(
            "DELETE FROM phoenix_diag WHERE updated_ms < $1",
            &[&before.saturating_sub(KEEP_DIAG_MS)],
        )
        .await?;
    }
    if !j.audit.is_empty() {
        let at: Vec<i64> = j.audit.iter().map(|d| d.at_ms).collect();
        let action: Vec<&str> = j.audit.iter().map(|d| d.action).collect();
        let ids: Vec<Option<&str>> = j.audit.iter().map(|d| d.instance_id.as_deref()).collect();
        let groups: Vec<&str> = j.audit.iter().map(|d| d.group.as_str()).collect();
        let details: Vec<String> = j.audit.iter().map(|d| d.detail.to_string()).collect();
        // The decider's own decisions, under the fence just checked: a collector that lost
        // the lease cannot add to the trail.
        tx.execute(
            "INSERT INTO phoenix_audit (at_ms, actor, action, instance_id, group_name, detail, fence)
             SELECT a, 'collector:' || $6, x, i, NULLIF(g, ''), d::jsonb, $7
             FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[])
               AS u(a, x, i, g, d)",
            &[&at, &action, &ids, &groups, &details, &j.holder, &j.fence],
        )
        .await?;
    }
    tx.execute("SELECT pg_notify($1, 'fleet')", &[&WAKE_CHANNEL])
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Most decisions waiting for a save (a whole mass event's holds fit many times over).
const MAX_AUDIT_WAITING: usize = 10_000;

/// Drops the oldest decisions past [`MAX_AUDIT_WAITING`], saying how many.
fn bound_audit(a: &mut Vec<Decision>) {
    if a.len() > MAX_AUDIT_WAITING {
        let over = a.len() - MAX_AUDIT_WAITING;
        a.drain(..over);
        tracing::warn!(
            dropped = over,
            "fleet store: PostgreSQL has been away too long to keep every decision for its audit table; the oldest are left to the phoenix_audit points in InfluxDB"
        );
    }
}

/// Rows as read back: (instance, body, saved_ms, saved_mono).
type FleetRow = (String, String, i64, i64);

struct PullRows {
    cursor: i64,
    reports: Vec<(String, String, i64, String, String, bool)>,
    acks: Vec<(String, String, i64)>,
    fleet: Vec<FleetRow>,
    queue: Option<String>,
    diag: Vec<(String, String)>,
}

async fn pull_rows(
    c: &mut Client,
    cursor: Option<i64>,
    replay_from_ms: i64,
    with_decided: bool,
    me: &str,
) -> Result<PullRows, PgError> {
    let tx = c
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let mut next: i64 = tx
        .query_one(
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
            &[],
        )
        .await?
        .get(0);
    let from = cursor.unwrap_or(0).to_string();
    let at_least = if cursor.is_none() {
        replay_from_ms
    } else {
        i64::MIN
    };
    let rows = tx
        .query(
            "SELECT instance_id, boot_id, seq, writer, body, stored, changed::text::bigint
             FROM phoenix_reports WHERE changed >= $1::text::xid8 AND at_ms >= $2
             ORDER BY changed LIMIT $3",
            &[&from, &at_least, &PULL_MAX],
        )
        .await?;
    if rows.len() as i64 >= PULL_MAX {
        // The rest next time, from the newest transaction read (its rows come again).
        if let Some(last) = rows.last() {
            next = next.min(last.get::<_, i64>(6));
        }
    }
    let reports = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    let acks = tx
        .query(
            "SELECT instance_id, actor, at_ms FROM phoenix_audit
             WHERE action = 'ack' AND instance_id IS NOT NULL AND changed >= $1::text::xid8
               AND at_ms >= $2
             ORDER BY id",
            // A first pull takes only recent acks: an old one must not ack a later mark.
            &[&from, &at_least],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let diag_from = if cursor.is_none() {
        replay_from_ms.saturating_sub(KEEP_DIAG_MS)
    } else {
        i64::MIN
    };
    let diag = tx
        .query(
            "SELECT instance_id, body FROM phoenix_diag
             WHERE changed >= $1::text::xid8 AND updated_ms >= $2 AND writer <> $3",
            &[&from, &diag_from, &me],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let (fleet, queue) = if with_decided {
        let fleet = tx
            .query(
                "SELECT instance_id, body, saved_ms, saved_mono FROM phoenix_fleet
                 WHERE changed >= $1::text::xid8",
                &[&from],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        let queue = tx
            .query_opt(
                "SELECT body::text FROM phoenix_state WHERE key = $1",
                &[&QUEUE_KEY],
            )
            .await?
            .map(|r| r.get(0));
        (fleet, queue)
    } else {
        (Vec::new(), None)
    };
    tx.commit().await?;
    Ok(PullRows {
        cursor: next,
        reports,
        acks,
        fleet,
        queue,
        diag,
    })
}

async fn load_rows(c: &Client) -> Result<(Vec<FleetRow>, Option<String>), PgError> {
    let fleet = c
        .query(
            "SELECT instance_id, body, saved_ms, saved_mono FROM phoenix_fleet",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let queue = c
        .query_opt(
            "SELECT body::text FROM phoenix_state WHERE key = $1",
            &[&QUEUE_KEY],
        )
        .await?
        .map(|r| r.get(0));
    Ok((fleet, queue))
}

impl PgFleetStore {
    /// The offset that moves a reading of a process whose clocks read (`saved_ms`,
    /// `saved_mono`) together onto this collector's monotonic clock.
    fn offset(&self, saved_ms: i64, saved_mono: i64) -> i64 {
        let now_wall = self.clock.wall_ms();
        let now_mono = self.clock.mono_ms();
        let away = now_wall.saturating_sub(saved_ms).max(0);
        now_mono.saturating_sub(away).saturating_sub(saved_mono)
    }

    fn queue_of(&self, body: &str) -> Option<QueueState> {
        let row: QueueRow = match serde_json::from_str(body) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "fleet store: the decider's queue state is unreadable; ignored");
                return None;
            }
        };
        if row.version > VERSION {
            tracing::warn!(
                version = row.version,
                reads = VERSION,
                "fleet state written by a newer collector: reading the fields this one knows"
            );
        }
        let by = self.offset(row.saved_ms, row.saved_mono);
        let mut q = row.queue;
        for t in q.recent_marks.iter_mut() {
            *t = t.saturating_add(by);
        }
        Some(q)
    }
}

impl FleetStore for PgFleetStore {
    fn describe(&self) -> String {
        format!("postgres {}", self.url)
    }

    fn load(&self) -> Result<Option<Snapshot>, StoreError> {
        let (rows, queue) = self
            .call({
                let pg = Arc::clone(&self.pg);
                async move { pg.registry(|c| Box::pin(load_rows(c))).await }
            })
            .map_err(|e| self.unavailable(e))?;
        if rows.is_empty() && queue.is_none() {
            return Ok(None);
        }
        let now = crate::fleet::Now::of(self.clock.as_ref());
        let mut instances = Vec::with_capacity(rows.len());
        for (id, body, saved_ms, saved_mono) in rows {
            match serde_json::from_str::<Instance>(&body) {
                Ok(mut i) => {
                    // Onto this clock here: rows were written by different deciders.
                    i.shift_mono(self.offset(saved_ms, saved_mono));
                    instances.push(i);
                }
                Err(e) => {
                    tracing::warn!(instance_id = %id, error = %e, "fleet store: an unreadable instance row; skipped (its next report brings it back)")
                }
            }
        }
        Ok(Some(Snapshot {
            version: VERSION,
            // Already translated: restore moves nothing.
            saved_ms: now.wall_ms,
            saved_mono: now.mono_ms,
            instances,
            queue: queue
                .as_deref()
                .and_then(|q| self.queue_of(q))
                .unwrap_or_default(),
        }))
    }

    fn save(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let Some(held) = self.pg.decider() else {
            // Not deciding: the decider keeps the shared state; this one has nothing to add
            // (its reports went through `observe`).
            return Ok(());
        };
        let now_ms = snapshot.saved_ms;
        let mut w = self.written.lock().unwrap();
        let full = w.fence != held.fence;
        if full {
            w.rows.clear();
            w.fence = held.fence;
        }
        let (mut ids, mut bodies, mut fresh, mut all) = (vec![], vec![], vec![], vec![]);
        for i in &snapshot.instances {
            let id = &i.identity.instance_id;
            if !storable(id) {
                continue;
            }
            all.push(id.clone());
            let v = serde_json::to_value(i).map_err(|e| StoreError::Unavailable(e.to_string()))?;
            let h = significant_hash(&v);
            let due = match w.rows.get(id) {
                Some((old, at)) => *old != h || now_ms.saturating_sub(*at) >= REFRESH_MS,
                None => true,
            };
            if due {
                ids.push(id.clone());
                bodies.push(v.to_string());
                fresh.push((id.clone(), h));
            }
        }
        let known: std::collections::HashSet<&str> = all.iter().map(String::as_str).collect();
        let gone: Vec<String> = w
            .rows
            .keys()
            .filter(|k| !known.contains(k.as_str()))
            .cloned()
            .collect();
        let queue = serde_json::to_string(&QueueRow {
            version: VERSION,
            saved_ms: snapshot.saved_ms,
            saved_mono: snapshot.saved_mono,
            queue: snapshot.queue.clone(),
        })
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let prune_before = (now_ms.saturating_sub(w.pruned_ms) >= 60_000)
            .then(|| now_ms.saturating_sub(KEEP_REPORTS_MS));
        let job = SaveJob {
            fence: held.fence,
            holder: self.pg.lease.holder.clone(),
            lease: self.pg.lease.name.clone(),
            full,
            saved_ms: snapshot.saved_ms,
            saved_mono: snapshot.saved_mono,
            ids,
            bodies,
            gone: gone.clone(),
            all,
            queue,
            prune_before,
            audit: std::mem::take(&mut *self.audit.lock().unwrap()),
        };
        drop(w);
        let pg = Arc::clone(&self.pg);
        let (r, unsaved) = self
            .call(async move {
                let mut g = pg.work().await;
                let r = match pg.ensure(&mut g).await {
                    Ok(c) => super::timed(save_rows(c, &job)).await,
                    Err(e) => Err(e),
                };
                pg.note(&r, &mut g);
                let unsaved = if r.is_err() { job.audit } else { Vec::new() };
                Ok::<_, PgError>((r, unsaved))
            })
            .unwrap_or_else(|e| (Err(e), Vec::new()));
        if !unsaved.is_empty() {
            // Kept for the next save, before what was decided meanwhile.
            let mut a = self.audit.lock().unwrap();
            let newer = std::mem::replace(&mut *a, unsaved);
            a.extend(newer);
            bound_audit(&mut a);
        }
        let mut w = self.written.lock().unwrap();
        match r {
            Ok(()) => {
                for (id, h) in fresh {
                    w.rows.insert(id, (h, now_ms));
                }
                for id in gone {
                    w.rows.remove(&id);
                }
                if prune_before.is_some() {
                    w.pruned_ms = now_ms;
                }
                Ok(())
            }
            Err(e) => {
                // Written again in full once it works (under whichever fence).
                w.fence = 0;
                Err(self.unavailable(e))
            }
        }
    }

    fn audit(&self, decisions: &[Decision]) {
        let mut a = self.audit.lock().unwrap();
        a.extend(decisions.iter().cloned());
        bound_audit(&mut a);
    }

    fn is_decider(&self) -> bool {
        let Some(h) = self.pg.decider() else {
            return false;
        };
        let st = self.pg.health.status();
        let from = h.acquired_ms.max(st.back_ms);
        super::wall_ms() >= from.saturating_add(self.catch_up_ms())
    }

    fn observe(&self, o: &Observation) -> Result<(), StoreError> {
        let id = &o.identity;
        if !storable(&id.instance_id) || !storable(&id.boot_id) {
            return Err(StoreError::Unavailable(
                "an id holds a NUL byte; not shared with the other collectors".into(),
            ));
        }
        let body = serde_json::to_string(o).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let wake = o.drift.is_some() || o.checks.iter().any(|c| !c.ok);
        let mut p = self.pending.lock().unwrap();
        let key = (id.instance_id.clone(), id.boot_id.clone(), o.seq);
        if !p.reports.contains_key(&key) && p.reports.len() >= self.max_reports {
            return Err(StoreError::Unavailable(format!(
                "{} reports buffered while PostgreSQL is unavailable; this one is not shared",
                p.reports.len()
            )));
        }
        p.wake |= wake;
        let r = p.reports.entry(key).or_insert(Row {
            at_ms: o.at.wall_ms,
            body: None,
            stored: false,
        });
        r.body = Some(body);
        Ok(())
    }

    fn stored(&self, instance_id: &str, boot_id: &str, seq: u64) -> Result<(), StoreError> {
        if !storable(instance_id) || !storable(boot_id) {
            return Ok(());
        }
        let mut p = self.pending.lock().unwrap();
        let key = (instance_id.to_string(), boot_id.to_string(), seq);
        if !p.reports.contains_key(&key) && p.reports.len() >= self.max_reports {
            return Err(StoreError::Unavailable(
                "report buffer full while PostgreSQL is unavailable".into(),
            ));
        }
        let at_ms = self.clock.wall_ms();
        p.reports
            .entry(key)
            .or_insert(Row {
                at_ms,
                body: None,
                stored: false,
            })
            .stored = true;
        Ok(())
    }

    fn ack(&self, instance_id: &str, by: &str, at_ms: i64) -> Result<(), StoreError> {
        if !storable(instance_id) || !storable(by) {
            return Err(StoreError::Unavailable("an id holds a NUL byte".into()));
        }
        let mut p = self.pending.lock().unwrap();
        if p.acks.len() >= MAX_ACKS {
            return Err(StoreError::Unavailable(
                "ack buffer full while PostgreSQL is unavailable; the recycler should retry".into(),
            ));
        }
        p.acks
            .push((instance_id.to_string(), by.to_string(), at_ms));
        Ok(())
    }

    fn share_diag(
        &self,
        instance_id: &str,
        d: &crate::fleet::diag::Shared,
    ) -> Result<(), StoreError> {
        if !storable(instance_id) {
            return Err(StoreError::Unavailable("an id holds a NUL byte".into()));
        }
        let body = serde_json::to_string(d).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        if body.len() > phoenix_wire::diag::MAX_SNAPSHOT_BYTES + 4096 {
            return Err(StoreError::Unavailable(format!(
                "a diagnostics answer of {} bytes is larger than the API takes; not shared",
                body.len()
            )));
        }
        let mut p = self.pending.lock().unwrap();
        if !p.diag.contains_key(instance_id) && p.diag.len() >= MAX_DIAG {
            return Err(StoreError::Unavailable(
                "diagnostics buffer full while PostgreSQL is unavailable".into(),
            ));
        }
        let req = i64::try_from(d.id).unwrap_or(i64::MAX);
        let newest = p.diag.get(instance_id).is_none_or(|old| old.0 <= req);
        if newest {
            p.diag.insert(instance_id.to_string(), (req, body));
        }
        Ok(())
    }

    fn pull(&self) -> Result<Pulled, StoreError> {
        let cursor = *self.cursor.lock().unwrap();
        let with_decided = !self.is_decider();
        let replay_from = self.clock.wall_ms().saturating_sub(REPLAY_MS);
        let pg = Arc::clone(&self.pg);
        let rows = self
            .call(async move {
                let mut g = pg.work().await;
                let me = pg.lease.holder.clone();
                let r = match pg.ensure(&mut g).await {
                    Ok(c) => {
                        super::timed(pull_rows(c, cursor, replay_from, with_decided, &me)).await
                    }
                    Err(e) => Err(e),
                };
                pg.note(&r, &mut g);
                r
            })
            .map_err(|e| self.unavailable(e))?;
        let me = &self.pg.lease.holder;
        let now_wall = self.clock.wall_ms();
        let now_mono = self.clock.mono_ms();
        let mut out = Pulled::default();
        for (id, boot, seq, writer, body, stored) in rows.reports {
            match serde_json::from_str::<Observation>(&body) {
                Ok(mut o) => {
                    if &writer != me {
                        // Another process's monotonic reading means nothing here: place
                        // the report by its wall time, never in this clock's future.
                        let ago = now_wall.saturating_sub(o.at.wall_ms).max(0);
                        o.at.mono_ms = now_mono.saturating_sub(ago);
                    }
                    out.observations.push(o);
                }
                Err(e) => {
                    tracing::debug!(instance_id = %id, error = %e, "fleet store: an unreadable report row; skipped")
                }
            }
            if stored {
                out.stored.push((id, boot, seq as u64));
            }
        }
        out.acks = rows.acks;
        for (id, body, saved_ms, saved_mono) in rows.fleet {
            match serde_json::from_str::<Instance>(&body) {
                Ok(i) => {
                    let mut phx: Phx = i.phx;
                    phx.shift_mono(self.offset(saved_ms, saved_mono));
                    out.phx.push((id, phx));
                }
                Err(e) => {
                    tracing::debug!(instance_id = %id, error = %e, "fleet store: an unreadable instance row; skipped")
                }
            }
        }
        out.queue = rows.queue.as_deref().and_then(|q| self.queue_of(q));
        for (id, body) in rows.diag {
            match serde_json::from_str::<crate::fleet::diag::Shared>(&body) {
                Ok(d) => out.diag.push((id, d)),
                Err(e) => {
                    tracing::debug!(instance_id = %id, error = %e, "fleet store: an unreadable diagnostics row; skipped")
                }
            }
        }
        *self.cursor.lock().unwrap() = Some(rows.cursor);
        Ok(out)
    }

    fn status(&self) -> Option<SharedStatus> {
        let s = self.pg.health.status();
        let mut reason = s.reason;
        if s.up && self.pg.decider().is_some() && !self.is_decider() {
            reason = Some("took the decider lease; catching up with the other collectors' reports before deciding".into());
        }
        Some(SharedStatus {
            up: s.up,
            reason,
            since_ms: s.since_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_figures_and_dedupe_are_not_significant_but_verdicts_are() {
        let mut i = Instance::default();
        i.identity.instance_id = "i-1".into();
        let a = significant_hash(&serde_json::to_value(&i).unwrap());
        i.last_seen_ms = 99;
        i.last_seen_mono = 98;
        i.reports = 7;
        i.cpu_used_percent = Some(12.0);
        i.boots.insert("b".into(), Default::default());
        assert_eq!(a, significant_hash(&serde_json::to_value(&i).unwrap()));
        i.phx.held = Some("budget".into());
        assert_ne!(a, significant_hash(&serde_json::to_value(&i).unwrap()));
    }

    #[test]
    fn a_failed_flush_keeps_both_batches() {
        let row = |body: Option<&str>, stored| Row {
            at_ms: 1,
            body: body.map(str::to_string),
            stored,
        };
        let k = |s| ("i".to_string(), "b".to_string(), s);
        let mut old = Pending::default();
        old.reports.insert(k(1), row(Some("{}"), false));
        old.acks.push(("i".into(), "r".into(), 3));
        let mut newer = Pending::default();
        newer.reports.insert(k(1), row(None, true));
        newer.reports.insert(k(2), row(Some("{}"), false));
        newer.wake = true;
        old.merge(newer);
        assert_eq!(old.reports.len(), 2);
        let r1 = &old.reports[&k(1)];
        assert!(r1.stored && r1.body.is_some(), "{r1:?}");
        assert!(old.wake && old.acks.len() == 1);
    }
}
