//! The schema, as numbered migrations the collector applies itself at start.
//!
//! All of them run in one transaction that first takes `pg_advisory_xact_lock`: two
//! collectors starting together queue on the lock, the second finds the work done. DDL is
//! transactional in PostgreSQL, so a collector killed half way leaves the old version whole.

use tokio_postgres::Client;

use super::PgError;

/// Key of the advisory lock that serialises migrations (an arbitrary constant: "phxmigr").
pub const MIGRATE_LOCK: i64 = 0x0070_6878_6d69_6772;

/// (version, what it does, SQL). Append only: a released migration is never edited.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "fleet state, dedupe, observations, verdicts, baselines, enrolments, queue, lease, audit",
        r#"
CREATE TABLE phoenix_instances (
    instance_id   text PRIMARY KEY,
    group_name    text NOT NULL,
    image_id      text NOT NULL,
    identity      jsonb NOT NULL,
    first_seen_ms bigint NOT NULL,
    last_seen_ms  bigint NOT NULL,
    interval_ms   bigint NOT NULL,
    reports       bigint NOT NULL DEFAULT 0,
    figures       jsonb NOT NULL DEFAULT '{}',
    changed       xid8 NOT NULL DEFAULT pg_current_xact_id()
);
CREATE INDEX phoenix_instances_changed ON phoenix_instances (changed);
CREATE INDEX phoenix_instances_group ON phoenix_instances (group_name);

-- Dedupe window: the highest seq taken per (instance, boot).
CREATE TABLE phoenix_seqs (
    instance_id text NOT NULL,
    boot_id     text NOT NULL,
    seq         bigint NOT NULL,
    seen_ms     bigint NOT NULL,
    changed     xid8 NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (instance_id, boot_id)
);
CREATE INDEX phoenix_seqs_changed ON phoenix_seqs (changed);

-- What a report says that changes fleet state (check results): applied exactly once per
-- (instance, boot, seq), however often the batch is retried and through whichever collector.
CREATE TABLE phoenix_observations (
    instance_id text NOT NULL,
    boot_id     text NOT NULL,
    seq         bigint NOT NULL,
    at_ms       bigint NOT NULL,
    body        jsonb NOT NULL,
    changed     xid8 NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (instance_id, boot_id, seq)
);
CREATE INDEX phoenix_observations_changed ON phoenix_observations (changed);

-- Verdicts per instance and kind (drift, checks, health), written when they change.
CREATE TABLE phoenix_verdicts (
    instance_id text NOT NULL,
    kind        text NOT NULL,
    body        jsonb NOT NULL,
    updated_ms  bigint NOT NULL,
    PRIMARY KEY (instance_id, kind)
);

CREATE TABLE phoenix_baselines (
    image_id      text PRIMARY KEY,
    root          text NOT NULL,
    manifest      jsonb NOT NULL,
    registered_ms bigint NOT NULL
);

-- Enrolments and identities (issued by the trust side): one row per subject.
CREATE TABLE phoenix_enrolments (
    subject    text PRIMARY KEY,
    kind       text NOT NULL,
    body       jsonb NOT NULL,
    created_ms bigint NOT NULL,
    revoked_ms bigint
);

-- The phoenix queue: one row per instance that is marked, acked or held.
CREATE TABLE phoenix_marks (
    instance_id text PRIMARY KEY,
    group_name  text NOT NULL,
    state       text NOT NULL CHECK (state IN ('marked', 'acked', 'held')),
    reason      text NOT NULL,
    evidence    jsonb NOT NULL,
    since_ms    bigint NOT NULL,
    acked_ms    bigint,
    fence       bigint NOT NULL
);
CREATE INDEX phoenix_marks_group ON phoenix_marks (group_name, state);

CREATE TABLE phoenix_alerts (
    id         bigserial PRIMARY KEY,
    group_name text NOT NULL,
    kind       text NOT NULL,
    message    text NOT NULL,
    at_ms      bigint NOT NULL,
    cleared_ms bigint,
    fence      bigint NOT NULL
);

-- Every decision and every ack, with the fence of the decider that made it.
CREATE TABLE phoenix_audit (
    id          bigserial PRIMARY KEY,
    at_ms       bigint NOT NULL,
    actor       text NOT NULL,
    action      text NOT NULL,
    instance_id text,
    group_name  text,
    detail      jsonb NOT NULL,
    fence       bigint,
    changed     xid8 NOT NULL DEFAULT pg_current_xact_id()
);
CREATE INDEX phoenix_audit_changed ON phoenix_audit (changed);

-- The decider's own memory between passes (rate limit, alert state...), by key, fenced.
CREATE TABLE phoenix_state (
    key        text PRIMARY KEY,
    body       jsonb NOT NULL,
    fence      bigint NOT NULL,
    updated_ms bigint NOT NULL
);

-- The decider's lease: whoever holds the row unexpired decides; `fence` goes up by one at
-- every change of holder, and every decision write checks it in its own transaction.
CREATE TABLE phoenix_lease (
    name        text PRIMARY KEY,
    holder      text NOT NULL,
    fence       bigint NOT NULL,
    -- The backend of the holder's lease connection: when that session is gone (the holder
    -- was killed), a candidate need not wait for the expiry.
    holder_pid  integer NOT NULL,
    acquired_at timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL
);
"#,
    ),
    (
        2,
        "the fleet store seam: reports (observations and stored seqs), the decider's fleet rows",
        r#"
-- One row per accepted report (instance, boot, seq): the observation the collector that took
-- it applied (JSON text: agent strings may hold what jsonb refuses), and whether its points
-- were stored (only then may any collector answer "duplicate"). Pruned after a while.
CREATE TABLE phoenix_reports (
    instance_id text NOT NULL,
    boot_id     text NOT NULL,
    seq         bigint NOT NULL,
    at_ms       bigint NOT NULL,
    writer      text NOT NULL,
    body        text NOT NULL,
    stored      boolean NOT NULL DEFAULT false,
    changed     xid8 NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (instance_id, boot_id, seq)
);
CREATE INDEX phoenix_reports_changed ON phoenix_reports (changed);
CREATE INDEX phoenix_reports_at ON phoenix_reports (at_ms);

-- The decider's fleet state, one row per instance (JSON text), written under its fence when
-- it changed; `saved_ms`/`saved_mono` translate the monotonic readings inside.
CREATE TABLE phoenix_fleet (
    instance_id text PRIMARY KEY,
    body        text NOT NULL,
    saved_ms    bigint NOT NULL,
    saved_mono  bigint NOT NULL,
    fence       bigint NOT NULL,
    changed     xid8 NOT NULL DEFAULT pg_current_xact_id()
);
CREATE INDEX phoenix_fleet_changed ON phoenix_fleet (changed);
"#,
    ),
    (
        3,
        "diagnostics shared between collectors: one request or answer per instance",
        r#"
-- The newest diagnostics request of an instance, or its answer (JSON text, the snapshot
-- capped as the API caps it), so a request made through one collector reaches the agent
-- through another, and the answer is read through any. Pruned after a day.
CREATE TABLE phoenix_diag (
    instance_id text PRIMARY KEY,
    req_id      bigint NOT NULL,
    body        text NOT NULL,
    writer      text NOT NULL,
    updated_ms  bigint NOT NULL,
    changed     xid8 NOT NULL DEFAULT pg_current_xact_id()
);
CREATE INDEX phoenix_diag_changed ON phoenix_diag (changed);
"#,
    ),
];

/// The newest version this build knows.
pub fn latest() -> i32 {
    MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
}

/// Brings the schema to `latest()`; returns the versions this call applied (empty when
/// another collector had done it). Refuses a database migrated by a newer collector.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, PgError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS phoenix_schema (
            version    integer PRIMARY KEY,
            name       text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .await?;
    let current: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM phoenix_schema", &[])
        .await?
        .get(0);
    if current > latest() {
        return Err(PgError::SchemaTooNew {
            found: current,
            known: latest(),
        });
    }
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO phoenix_schema (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        applied.push(*version);
    }
    tx.commit().await?;
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_contiguous_from_one() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.0, i as i32 + 1, "migration {} out of order", m.1);
        }
        assert_eq!(latest(), MIGRATIONS.len() as i32);
    }
}
