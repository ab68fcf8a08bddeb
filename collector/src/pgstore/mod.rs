//! Fleet state in PostgreSQL (`--fleet-store postgres://…`): what lets N collectors behind a
//! load balancer share one fleet.
//!
//! Rooms: `schema` (migrations under an advisory lock), `lease` (exactly one decider, with a
//! fencing token), `batch` (last-seen, counters, dedupe and check observations flushed in one
//! statement a second), `decide` (fenced queue writes: marks, holds, alerts, audit; budgets
//! enforced inside the database), `verdict` (written when they change, with a wake-up),
//! `listen` (LISTEN/NOTIFY between collectors), `pull` (what the decider reads back, by
//! transaction-id cursor, and its fenced memory), `registry` (baselines and enrolments:
//! the SQL), `caches` (the same behind the embedded collector's traits, cached per
//! collector and refreshed by NOTIFY),
//! `health` (is PostgreSQL there, since when,
//! why not), and `store`: the fleet core's `FleetStore` on top of them, which is what
//! `--fleet-store` plugs into the collector (see its docs for what the wiring uses).
//!
//! The client is `tokio-postgres` without TLS: see docs/scaling.md on `sslmode`.

pub mod batch;
pub mod caches;
pub mod decide;
pub mod health;
pub mod lease;
pub mod listen;
pub mod pull;
pub mod registry;
pub mod schema;
pub mod store;
pub mod verdict;

use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, Config, NoTls};

/// The one NOTIFY channel: payload is what changed (`verdict:<instance>`, `ack:<instance>`,
/// `lease`), so the decider runs its pass at once instead of at its next tick.
pub const WAKE_CHANNEL: &str = "phoenix_wake";

/// Every statement gets this long before the store counts as unavailable.
pub const OP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("--fleet-store: {0}")]
    Url(String),
    #[error(
        "--fleet-store: sslmode={0} needs TLS, which this collector does not speak to \
         PostgreSQL; use sslmode=disable (or prefer) on a trusted network, or a local TLS \
         tunnel (stunnel, pgbouncer with server TLS)"
    )]
    Tls(&'static str),
    #[error("PostgreSQL: {}", describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("PostgreSQL did not answer within {0:?}")]
    Timeout(Duration),
    #[error(
        "the fleet store's schema is at version {found}, newer than this collector knows \
         ({known}); upgrade this collector (a newer one migrated the database)"
    )]
    SchemaTooNew { found: i32, known: i32 },
    #[error("refused: this collector no longer holds the decider lease (fence {0})")]
    Fenced(i64),
    #[error("{0} buffered while PostgreSQL is unavailable; retry later")]
    Full(&'static str),
    #[error("not storable in the fleet store: {0}")]
    Invalid(String),
}

/// The server's own message and code when there is one ("db error" alone says nothing).
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(src) => format!("{e}: {src}"),
            None => e.to_string(),
        },
    }
}

impl PgError {
    /// True for a failure of the connection or server (as opposed to a refused decision):
    /// these make the store count as unavailable.
    pub fn is_outage(&self) -> bool {
        match self {
            // A server error about the data (classes 22 data exception, 23 integrity) is
            // not an outage: the server is there and retrying the same rows cannot help.
            PgError::Db(e) => !e
                .as_db_error()
                .is_some_and(|d| matches!(d.code().code().get(..2), Some("22" | "23"))),
            PgError::Timeout(_) => true,
            _ => false,
        }
    }
}

/// Parses and checks a `postgres://` URL (or key=value string) as libpq would, with the
/// defaults a collector wants: a 5 s connect timeout, TCP keepalives after 10 s idle and an
/// application_name, so `pg_stat_activity` shows who is who.
pub fn parse_url(url: &str) -> Result<Config, PgError> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(PgError::Url(format!(
            "{:?} is not a postgres:// URL (e.g. postgres://phoenix@db.internal:5432/phoenix)",
            redact(url)
        )));
    }
    let mut cfg = Config::from_str(url).map_err(|e| PgError::Url(e.to_string()))?;
    match cfg.get_ssl_mode() {
        SslMode::Require => return Err(PgError::Tls("require")),
        // Without a TLS connector "prefer" is plain TCP: say so rather than pretend.
        SslMode::Prefer => {
            cfg.ssl_mode(SslMode::Disable);
        }
        _ => {}
    }
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(5));
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name("phoenix-collector");
    }
    cfg.keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(2))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(10));
    Ok(cfg)
}

/// The URL with any password replaced, for messages and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((a, h)) => (a, h),
        None => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

/// Opens one connection; its I/O runs as a task on the current runtime and ends with it.
pub async fn connect(cfg: &Config) -> Result<Client, PgError> {
    let (client, conn) = tokio::time::timeout(OP_TIMEOUT, cfg.connect(NoTls))
        .await
        .map_err(|_| PgError::Timeout(OP_TIMEOUT))??;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// Runs `f` with the store's statement timeout.
pub async fn timed<T, F>(f: F) -> Result<T, PgError>
where
    F: std::future::Future<Output = Result<T, PgError>>,
{
    tokio::time::timeout(OP_TIMEOUT, f)
        .await
        .map_err(|_| PgError::Timeout(OP_TIMEOUT))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_defaults_set() {
        let c = parse_url("postgres://phx@127.0.0.1:5433/phoenix").unwrap();
        assert_eq!(c.get_dbname(), Some("phoenix"));
        assert_eq!(c.get_ports(), &[5433]);
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(5)));
        assert_eq!(c.get_application_name(), Some("phoenix-collector"));
        assert!(matches!(c.get_ssl_mode(), SslMode::Disable));

        let e = parse_url("postgres://phx@db/phoenix?sslmode=require").unwrap_err();
        assert!(e.to_string().contains("sslmode=require needs TLS"), "{e}");
        let e = parse_url("mysql://db/phoenix").unwrap_err();
        assert!(e.to_string().contains("not a postgres:// URL"), "{e}");
        let e = parse_url("postgres://db/phoenix?bogus=1").unwrap_err();
        assert!(e.to_string().starts_with("--fleet-store"), "{e}");
    }

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("postgres://phx:s3cret@db:5432/phoenix"),
            "postgres://phx:***@db:5432/phoenix"
        );
        assert_eq!(
            redact("postgres://phx@db/phoenix"),
            "postgres://phx@db/phoenix"
        );
        let e = parse_url("mysql://u:s3cret@db/x").unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }
}

/// The future of one registry operation borrowing the work connection.
pub type RegistryFuture<'c, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, PgError>> + Send + 'c>>;

/// Tuning of the PostgreSQL store; defaults suit a fleet at 10 s intervals.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// The decider lease: a dead decider is replaced within this plus a third of it.
    pub lease_ttl: Duration,
    /// How often last-seen, counters and observations are flushed.
    pub flush_every: Duration,
    pub max_pending_instances: usize,
    pub max_pending_observations: usize,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            lease_ttl: Duration::from_secs(10),
            flush_every: Duration::from_secs(1),
            max_pending_instances: 500_000,
            max_pending_observations: 200_000,
        }
    }
}

/// Unix ms on the wall clock (what the rows carry; ordering across collectors never depends
/// on it: last seen only moves forward and the lease expires on the server's clock).
pub fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One collector's handle on the shared fleet store: a work connection (flushes, reads,
/// decisions), a lease connection and a LISTEN connection, each re-opened when it fails.
#[derive(Debug)]
pub struct PgStore {
    cfg: Config,
    pub opts: PgOptions,
    pub health: Arc<health::StoreHealth>,
    pub lease: lease::Lease,
    pub batch: batch::Batch,
    pub verdicts: verdict::Verdicts,
    /// Woken by NOTIFY from any collector, and when this one becomes the decider.
    pub wake: Arc<tokio::sync::Notify>,
    /// Payloads of NOTIFYs (`verdict:<id>`, `baseline:<image>`, `revoke:<subject>`...), for
    /// caches to refresh; `listen::RELOAD` after a reconnect.
    payloads: tokio::sync::broadcast::Sender<String>,
    conn: tokio::sync::Mutex<Option<Client>>,
}

use std::sync::Arc;

impl PgStore {
    /// Connects and migrates the schema (under the advisory lock). Fails when PostgreSQL
    /// cannot be reached at start: a collector pointed at a store it never saw refuses to
    /// run rather than run without one.
    pub async fn open(url: &str, opts: PgOptions) -> Result<Arc<PgStore>, PgError> {
        let cfg = parse_url(url)?;
        let mut client = connect(&cfg).await?;
        let applied = timed(schema::migrate(&mut client)).await?;
        if !applied.is_empty() {
            tracing::info!(versions = ?applied, "fleet store schema migrated");
        }
        let health = Arc::new(health::StoreHealth::default());
        health.ok(wall_ms());
        Ok(Arc::new(PgStore {
            lease: lease::Lease::new(lease::holder_name(), opts.lease_ttl),
            batch: batch::Batch::new(opts.max_pending_instances, opts.max_pending_observations),
            verdicts: verdict::Verdicts::new(opts.max_pending_instances * 4),
            cfg,
            opts,
            health,
            wake: Arc::new(tokio::sync::Notify::new()),
            payloads: tokio::sync::broadcast::channel(1024).0,
            conn: tokio::sync::Mutex::new(Some(client)),
        }))
    }

    /// Notifications from every collector, as they arrive (bounded: a receiver that falls
    /// more than 1,024 behind gets `Lagged` and should reload what it caches).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.payloads.subscribe()
    }

    /// Starts the background tasks: flusher, lease keeper, listener.
    pub fn start(self: &Arc<Self>) {
        let s = Arc::clone(self);
        tokio::spawn(async move { s.flush_loop().await });
        let s = Arc::clone(self);
        tokio::spawn(async move { s.lease_loop().await });
        tokio::spawn(listen::run(
            self.cfg.clone(),
            Arc::clone(&self.wake),
            self.payloads.clone(),
            Arc::clone(&self.health),
            wall_ms,
        ));
    }

    /// The work connection (one statement at a time; see `ensure` and `note`).
    pub(crate) async fn work(&self) -> tokio::sync::MutexGuard<'_, Option<Client>> {
        self.conn.lock().await
    }

    /// Records an outcome on the work connection: an outage drops it, to be re-opened.
    pub(crate) fn note<T>(&self, r: &Result<T, PgError>, g: &mut Option<Client>) {
        match r {
            Ok(_) => self.health.ok(wall_ms()),
            Err(e) if e.is_outage() => {
                self.health.failed(e, wall_ms());
                *g = None;
            }
            Err(_) => {}
        }
    }

    /// The work connection, (re)opened if needed.
    pub(crate) async fn ensure<'a>(
        &self,
        g: &'a mut Option<Client>,
    ) -> Result<&'a mut Client, PgError> {
        if g.as_ref().is_none_or(|c| c.is_closed()) {
            match connect(&self.cfg).await {
                Ok(c) => *g = Some(c),
                Err(e) => {
                    self.health.failed(&e, wall_ms());
                    return Err(e);
                }
            }
        }
        g.as_mut().ok_or(PgError::Timeout(OP_TIMEOUT))
    }

    /// Writes what is buffered now (the flusher does this every `flush_every`).
    pub async fn flush(&self) -> Result<batch::Flushed, PgError> {
        let mut g = self.conn.lock().await;
        let r = match self.ensure(&mut g).await {
            Ok(c) => self.batch.flush(c).await,
            Err(e) => Err(e),
        };
        self.note(&r, &mut g);
        r
    }

    /// One lease tick on the work connection (the lease keeper uses its own; tests and
    /// tools drive the lease by hand with this).
    pub async fn lease_tick(&self) -> Result<Option<lease::Held>, PgError> {
        let mut g = self.conn.lock().await;
        let r = match self.ensure(&mut g).await {
            Ok(c) => self.lease.tick(c, wall_ms()).await,
            Err(e) => Err(e),
        };
        self.note(&r, &mut g);
        r
    }

    /// The lease if this collector decides right now (and the store is up).
    pub fn decider(&self) -> Option<lease::Held> {
        if !self.health.is_up() {
            return None;
        }
        self.lease.current()
    }

    /// While deciding: the earliest Unix ms silence may be counted from, i.e. when this
    /// collector took the lease or when the store last came back, whichever is later, plus
    /// one flush so every collector's buffered last-seen is in. None while not deciding.
    pub fn silence_floor_ms(&self) -> Option<i64> {
        let h = self.decider()?;
        let flush = self.opts.flush_every.as_millis() as i64;
        Some(h.acquired_ms.max(self.health.status().back_ms) + flush)
    }

    /// One decision under this collector's fence; refused unless it holds the lease.
    pub async fn decide(&self, d: &decide::Decision) -> Result<decide::Applied, PgError> {
        let Some(h) = self.decider() else {
            return Err(PgError::Fenced(0));
        };
        let f = decide::Fence {
            lease: &self.lease.name,
            holder: &self.lease.holder,
            fence: h.fence,
        };
        self.decide_with(&f, d).await
    }

    /// As `decide` with an explicit fence (a deposed decider's view, for the tests).
    pub async fn decide_with(
        &self,
        f: &decide::Fence<'_>,
        d: &decide::Decision,
    ) -> Result<decide::Applied, PgError> {
        let mut g = self.conn.lock().await;
        let r = match self.ensure(&mut g).await {
            Ok(c) => timed(decide::decide(c, f, d, wall_ms())).await,
            Err(e) => Err(e),
        };
        self.note(&r, &mut g);
        r
    }

    pub async fn ack(&self, instance_id: &str, actor: &str) -> Result<bool, PgError> {
        let mut g = self.conn.lock().await;
        let r = match self.ensure(&mut g).await {
            Ok(c) => timed(decide::ack(c, instance_id, actor, wall_ms())).await,
            Err(e) => Err(e),
        };
        self.note(&r, &mut g);
        r
    }

    pub async fn queue(&self) -> Result<Vec<decide::QueueRow>, PgError> {
        let mut g = self.conn.lock().await;
        let r = match self.ensure(&mut g).await {
            Ok(c) => timed(decide::queue(c)).await,
            Err(e) => Err(e),
        };
        self.note(&r, &mut g);
        r
    }

    /// Rows other collectors changed since `cursor` (see pull.rs).
    pub async fn pull(&self, cursor: i64) -> Result<pull::Pulled, PgError> {
        let mut g = self.conn.lock().await;
        let r = match self.ensure(&mut g).await {
            Ok(c) => timed(pull::pull(c, cursor)).await,
            Err(e) => Err(e),
        };
        self.note(&r, &mut g);
        r
    }

    /// Deletes old observations and dedupe rows of long-gone boots (the decider, now and
    /// then; see pull.rs).
    pub async fn prune(
        &self,
        observations_before_ms: i64,
        boots_before_ms: i64,
    ) -> Result<u64, PgError> {
        let mut g = self.conn.lock().await;
        let r = match self.ensure(&mut g).await {
            Ok(c) => timed(pull::prune(c, observations_before_ms, boots_before_ms)).await,
            Err(e) => Err(e),
        };
        self.note(&r, &mut g);
        r
    }

    /// Runs one registry operation on the work connection (baselines, enrolments), e.g.
    /// `store.registry(|c| Box::pin(registry::baselines(c))).await`.
    pub async fn registry<T>(
        &self,
        op: impl for<'c> FnOnce(&'c Client) -> RegistryFuture<'c, T>,
    ) -> Result<T, PgError> {
        let mut g = self.conn.lock().await;
        let r = match self.ensure(&mut g).await {
            Ok(c) => timed(op(c)).await,
            Err(e) => Err(e),
        };
        self.note(&r, &mut g);
        r
    }

    /// Saves a piece of the decider's memory; refused unless this collector decides.
    pub async fn save_state(&self, key: &str, body_json: &str) -> Result<(), PgError> {
        let Some(h) = self.decider() else {
            return Err(PgError::Fenced(0));
        };
        let f = decide::Fence {
            lease: &self.lease.name,
            holder: &self.lease.holder,
            fence: h.fence,
        };
        let mut g = self.conn.lock().await;
        let r = match self.ensure(&mut g).await {
            Ok(c) => timed(pull::save_state(c, &f, key, body_json, wall_ms())).await,
            Err(e) => Err(e),
        };
        self.note(&r, &mut g);
        r
    }

    /// Writes a verdict if it changed (and wakes the decider).
    pub async fn put_verdict(
        &self,
        instance: &str,
        kind: &str,
        body: &str,
    ) -> Result<bool, PgError> {
        if !self.verdicts.changed(instance, kind, body) {
            return Ok(false);
        }
        let mut g = self.conn.lock().await;
        let r = match self.ensure(&mut g).await {
            Ok(c) => self.verdicts.put(c, instance, kind, body, wall_ms()).await,
            Err(e) => Err(e),
        };
        self.note(&r, &mut g);
        r
    }

    async fn flush_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.opts.flush_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.flush().await {
                tracing::debug!(error = %e, pending = self.batch.pending(), "fleet store flush failed; kept for the next");
            }
        }
    }

    async fn lease_loop(self: Arc<Self>) {
        let mut conn: Option<Client> = None;
        let mut was = false;
        loop {
            if conn.as_ref().is_none_or(|c| c.is_closed()) {
                self.lease.lose();
                match connect(&self.cfg).await {
                    Ok(c) => conn = Some(c),
                    Err(e) => self.health.failed(&e, wall_ms()),
                }
            }
            if let Some(c) = &conn {
                match self.lease.tick(c, wall_ms()).await {
                    Ok(h) => {
                        self.health.ok(wall_ms());
                        if h.is_some() && !was {
                            self.wake.notify_one();
                        }
                        was = h.is_some();
                    }
                    Err(e) => {
                        self.health.failed(&e, wall_ms());
                        conn = None;
                        was = false;
                    }
                }
            }
            tokio::time::sleep(self.lease.period()).await;
        }
    }

    /// Gives up the lease (clean shutdown) after a last flush.
    pub async fn close(&self) {
        if let Err(e) = self.flush().await {
            tracing::warn!(error = %e, "last flush to the fleet store failed");
        }
        if let Ok(c) = connect(&self.cfg).await {
            if let Err(e) = self.lease.release(&c).await {
                tracing::warn!(error = %e, "releasing the decider lease failed; it expires on its own");
            }
        }
    }
}
