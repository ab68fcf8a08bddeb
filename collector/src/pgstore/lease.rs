//! Exactly one decider: a lease row with a fencing token.
//!
//! A candidate takes the row when it is free or expired, which raises `fence` by one; the
//! holder renews it every third of the lease time on a connection of its own. The holder
//! stops deciding at once when a renewal fails or its local deadline (counted from *before*
//! the renewal was sent, on the monotonic clock) passes. Every decision re-checks holder,
//! fence and expiry in its own transaction, under the row's lock, so a deposed decider's
//! late writes are refused even when it does not know yet that it was deposed.
//!
//! Why a row and not `pg_try_advisory_lock` alone: a session lock is held as long as the
//! session lives, so a collector that hangs (SIGSTOP, a stuck runtime) with its socket open
//! would keep deciding rights forever. The row expires on the server's clock alone (no
//! clock comparison between collectors). It also names the backend of the holder's lease
//! connection: once that session is gone (`kill -9`, a crash: the kernel closes the socket
//! and the backend exits) a candidate takes over at its next poll, a third of the lease
//! time, instead of waiting for the expiry. Behind a pooler in transaction mode the pid
//! means nothing and only the expiry counts; the fence keeps that safe either way.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, GenericClient};

use super::PgError;

/// The lease every collector of one fleet contends for.
pub const DECIDER: &str = "decider";

/// The lease as this collector holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub fence: i64,
    /// Unix ms (this collector's clock) when it took the lease: the decider counts silence
    /// from no earlier than this.
    pub acquired_ms: i64,
    until: Instant,
}

#[derive(Debug)]
pub struct Lease {
    pub name: String,
    /// Unique per process: `<host>/<pid>/<random>`.
    pub holder: String,
    pub ttl: Duration,
    held: Mutex<Option<Held>>,
}

impl Lease {
    pub fn new(holder: impl Into<String>, ttl: Duration) -> Lease {
        Lease {
            name: DECIDER.into(),
            holder: holder.into(),
            ttl,
            held: Mutex::new(None),
        }
    }

    /// How often `tick` should run: a third of the lease, so two renewals may fail in a row
    /// before the lease can lapse.
    pub fn period(&self) -> Duration {
        self.ttl / 3
    }

    /// The lease if this collector holds it right now.
    pub fn current(&self) -> Option<Held> {
        let mut g = self.held.lock().unwrap();
        match *g {
            Some(h) if Instant::now() < h.until => Some(h),
            Some(_) => {
                tracing::warn!(lease = %self.name, "decider lease ran out before renewal; deciding stops");
                *g = None;
                None
            }
            None => None,
        }
    }

    /// Forget the lease at once (its connection failed): nothing is decided until a tick
    /// takes it again.
    pub fn lose(&self) {
        if self.held.lock().unwrap().take().is_some() {
            tracing::warn!(lease = %self.name, "decider lease lost; deciding stops");
        }
    }

    /// Takes the lease if free or expired, renews it if ours. Returns the lease held after
    /// the call (None: another collector decides). On error the lease is dropped.
    pub async fn tick(&self, client: &Client, now_ms: i64) -> Result<Option<Held>, PgError> {
        let sent = Instant::now();
        let secs = self.ttl.as_secs_f64();
        let res = super::timed(async {
            Ok(client
                .query_opt(
                    "INSERT INTO phoenix_lease AS l
                       (name, holder, fence, holder_pid, acquired_at, expires_at)
                     VALUES ($1, $2, 1, pg_backend_pid(), now(),
                             now() + make_interval(secs => $3))
                     ON CONFLICT (name) DO UPDATE SET
                       fence = CASE WHEN l.holder = EXCLUDED.holder AND l.expires_at > now()
                               THEN l.fence ELSE l.fence + 1 END,
                       acquired_at = CASE WHEN l.holder = EXCLUDED.holder
                                     AND l.expires_at > now()
                                     THEN l.acquired_at ELSE now() END,
                       holder = EXCLUDED.holder,
                       holder_pid = EXCLUDED.holder_pid,
                       expires_at = EXCLUDED.expires_at
                     WHERE l.holder = EXCLUDED.holder OR l.expires_at <= now()
                       OR NOT EXISTS (SELECT 1 FROM pg_stat_activity
                                      WHERE pid = l.holder_pid)
                     RETURNING fence",
                    &[&self.name, &self.holder, &secs],
                )
                .await?)
        })
        .await;
        let row = match res {
            Ok(r) => r,
            Err(e) => {
                self.lose();
                return Err(e);
            }
        };
        let mut g = self.held.lock().unwrap();
        let Some(row) = row else {
            if g.take().is_some() {
                tracing::warn!(lease = %self.name, "decider lease taken by another collector");
            }
            return Ok(None);
        };
        let fence: i64 = row.get(0);
        // A tenth of the lease as margin for the clocks' rates and the reply's travel.
        let until = sent + self.ttl - self.ttl / 10;
        let acquired_ms = match *g {
            Some(h) if h.fence == fence => h.acquired_ms,
            _ => {
                tracing::info!(lease = %self.name, fence, "this collector is now the decider");
                now_ms
            }
        };
        let h = Held {
            fence,
            acquired_ms,
            until,
        };
        *g = Some(h);
        Ok(Some(h))
    }

    /// Gives the lease up (clean shutdown), so another collector takes over at its next poll
    /// rather than after the lease time.
    pub async fn release(&self, client: &Client) -> Result<(), PgError> {
        let Some(h) = self.held.lock().unwrap().take() else {
            return Ok(());
        };
        super::timed(async {
            client
                .execute(
                    "UPDATE phoenix_lease SET expires_at = now()
                     WHERE name = $1 AND holder = $2 AND fence = $3",
                    &[&self.name, &self.holder, &h.fence],
                )
                .await?;
            Ok(())
        })
        .await
    }
}

/// Inside a decision's transaction: locks the lease row and checks that `holder` still holds
/// it with `fence`, unexpired on the server's clock. A takeover waits for this transaction,
/// and a transaction after a takeover finds the new fence and is refused.
pub async fn check_fence<C: GenericClient>(
    tx: &C,
    name: &str,
    holder: &str,
    fence: i64,
) -> Result<(), PgError> {
    let ok = tx
        .query_opt(
            "SELECT 1 FROM phoenix_lease
             WHERE name = $1 AND holder = $2 AND fence = $3 AND expires_at > now()
             FOR UPDATE",
            &[&name, &holder, &fence],
        )
        .await?;
    match ok {
        Some(_) => Ok(()),
        None => Err(PgError::Fenced(fence)),
    }
}

/// A holder name unique to this process.
pub fn holder_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    let mut b = [0u8; 4];
    let rnd = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .map(|_| u32::from_le_bytes(b))
        .unwrap_or(0);
    format!("{host}/{}/{rnd:08x}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn period_leaves_two_renewals_of_slack() {
        let l = Lease::new("a", Duration::from_secs(6));
        assert_eq!(l.period(), Duration::from_secs(2));
        assert!(l.current().is_none());
        l.lose();
        assert!(l.current().is_none());
    }

    #[test]
    fn holder_names_differ_per_call_and_name_the_pid() {
        let a = holder_name();
        let b = holder_name();
        assert!(a.contains(&format!("/{}/", std::process::id())), "{a}");
        assert_ne!(a, b, "random part");
    }
}
