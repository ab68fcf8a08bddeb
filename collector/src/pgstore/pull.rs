//! What the decider reads back: everything other collectors wrote since its last pull
//! (instances' last seen and figures, stored seqs, observations, acks), and the decider's
//! own memory between passes (fenced key/value rows).
//!
//! The cursor is a transaction id, not a serial: a serial taken by a transaction that
//! commits late would fall behind a cursor already past it and be skipped for good. Each row
//! carries the id of the transaction that last wrote it; a pull returns every row written by
//! a transaction at or after the oldest one still running at the previous pull
//! (`pg_snapshot_xmin`), so a late commit is read at the next pull. Rows may come twice;
//! applying them is idempotent (last seen only moves forward, a (boot, seq) counts once).

use tokio_postgres::Client;

use super::decide::Fence;
use super::lease::check_fence;
use super::PgError;

/// One instance row as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRow {
    pub instance_id: String,
    pub group: String,
    pub image_id: String,
    pub identity_json: String,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub interval_ms: i64,
    pub reports: i64,
    pub figures_json: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ObservationRow {
    pub instance_id: String,
    pub boot_id: String,
    pub seq: i64,
    pub at_ms: i64,
    pub body_json: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AckRow {
    pub instance_id: String,
    pub by: String,
    pub at_ms: i64,
}

/// Rows changed since a cursor, and the cursor for the next pull.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pulled {
    pub instances: Vec<InstanceRow>,
    /// (instance, boot, highest seq stored).
    pub seqs: Vec<(String, String, i64)>,
    pub observations: Vec<ObservationRow>,
    pub acks: Vec<AckRow>,
    pub cursor: i64,
}

/// Everything changed since `cursor` (0: everything), read in one repeatable-read
/// transaction so the rows and the next cursor agree.
pub async fn pull(client: &mut Client, cursor: i64) -> Result<Pulled, PgError> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let next: i64 = tx
        .query_one(
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
            &[],
        )
        .await?
        .get(0);
    let c = cursor.to_string();
    let instances = tx
        .query(
            "SELECT instance_id, group_name, image_id, identity::text, first_seen_ms,
                    last_seen_ms, interval_ms, reports, figures::text
             FROM phoenix_instances WHERE changed >= $1::text::xid8",
            &[&c],
        )
        .await?
        .iter()
        .map(|r| InstanceRow {
            instance_id: r.get(0),
            group: r.get(1),
            image_id: r.get(2),
            identity_json: r.get(3),
            first_seen_ms: r.get(4),
            last_seen_ms: r.get(5),
            interval_ms: r.get(6),
            reports: r.get(7),
            figures_json: r.get(8),
        })
        .collect();
    let seqs = tx
        .query(
            "SELECT instance_id, boot_id, seq FROM phoenix_seqs
             WHERE changed >= $1::text::xid8",
            &[&c],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let observations = tx
        .query(
            "SELECT instance_id, boot_id, seq, at_ms, body::text FROM phoenix_observations
             WHERE changed >= $1::text::xid8 ORDER BY instance_id, boot_id, seq",
            &[&c],
        )
        .await?
        .iter()
        .map(|r| ObservationRow {
            instance_id: r.get(0),
            boot_id: r.get(1),
            seq: r.get(2),
            at_ms: r.get(3),
            body_json: r.get(4),
        })
        .collect();
    let acks = tx
        .query(
            "SELECT instance_id, actor, at_ms FROM phoenix_audit
             WHERE action = 'ack' AND changed >= $1::text::xid8 ORDER BY id",
            &[&c],
        )
        .await?
        .iter()
        .map(|r| AckRow {
            instance_id: r.get::<_, Option<String>>(0).unwrap_or_default(),
            by: r.get(1),
            at_ms: r.get(2),
        })
        .collect();
    tx.commit().await?;
    Ok(Pulled {
        instances,
        seqs,
        observations,
        acks,
        cursor: next,
    })
}

/// Writes one piece of the decider's memory under its fence.
pub async fn save_state(
    client: &mut Client,
    f: &Fence<'_>,
    key: &str,
    body_json: &str,
    now_ms: i64,
) -> Result<(), PgError> {
    let tx = client.transaction().await?;
    check_fence(&tx, f.lease, f.holder, f.fence).await?;
    tx.execute(
        "INSERT INTO phoenix_state (key, body, fence, updated_ms)
         VALUES ($1, $2::text::jsonb, $3, $4)
         ON CONFLICT (key) DO UPDATE SET body = EXCLUDED.body, fence = EXCLUDED.fence,
           updated_ms = EXCLUDED.updated_ms",
        &[&key, &body_json, &f.fence, &now_ms],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

pub async fn load_state(client: &Client, key: &str) -> Result<Option<String>, PgError> {
    Ok(client
        .query_opt(
            "SELECT body::text FROM phoenix_state WHERE key = $1",
            &[&key],
        )
        .await?
        .map(|r| r.get(0)))
}

/// Forgets what no longer matters, so the tables stay the size of the fleet: observations
/// older than `observations_before_ms` (the decider pulled them long ago) and the dedupe
/// rows of boots not seen since `boots_before_ms`. Returns the rows deleted.
pub async fn prune(
    client: &Client,
    observations_before_ms: i64,
    boots_before_ms: i64,
) -> Result<u64, PgError> {
    let o = client
        .execute(
            "DELETE FROM phoenix_observations WHERE at_ms < $1",
            &[&observations_before_ms],
        )
        .await?;
    let s = client
        .execute(
            "DELETE FROM phoenix_seqs WHERE seen_ms < $1",
            &[&boots_before_ms],
        )
        .await?;
    Ok(o + s)
}
