//! Baselines and enrolments: written rarely (a pipeline registering an image, an instance
//! enrolling), read by every collector. Each write is one statement that also NOTIFYs, so
//! the other collectors refresh what they cache.
//!
//! What is valid is decided before the store is asked (`drift::check_registration` for a
//! baseline, the trust side for an enrolment); the store makes the write atomic across
//! collectors and tells what it did.

use tokio_postgres::Client;

use super::{PgError, WAKE_CHANNEL};

/// What registering a baseline did (mirrors `drift::Registration`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    Created,
    /// The same root again: nothing changed.
    Unchanged,
    Replaced {
        old_root: String,
    },
}

/// Stores the baseline manifest of `image` with its `root`, atomically against another
/// collector registering at the same moment: exactly one of two concurrent first
/// registrations is `Created`, and a replacement names the root it replaced as it was when
/// the row was locked.
pub async fn put_baseline(
    client: &Client,
    image: &str,
    root: &str,
    manifest_json: &str,
    now_ms: i64,
) -> Result<Registered, PgError> {
    let payload = format!("baseline:{image}");
    let created = client
        .query_one(
            "WITH ins AS (
               INSERT INTO phoenix_baselines (image_id, root, manifest, registered_ms)
               VALUES ($1, $2, $3::text::jsonb, $4)
               ON CONFLICT (image_id) DO NOTHING
               RETURNING 1)
             SELECT count(*), (SELECT count(pg_notify($5, $6)) FROM ins) FROM ins",
            &[
                &image,
                &root,
                &manifest_json,
                &now_ms,
                &WAKE_CHANNEL,
                &payload,
            ],
        )
        .await?
        .get::<_, i64>(0)
        == 1;
    if created {
        return Ok(Registered::Created);
    }
    // The row exists: lock it, and replace it only if the root differs.
    let replaced = client
        .query_opt(
            "WITH up AS (
               UPDATE phoenix_baselines b SET root = $2, manifest = $3::text::jsonb,
                 registered_ms = $4
               FROM (SELECT image_id, root FROM phoenix_baselines
                     WHERE image_id = $1 FOR UPDATE) old
               WHERE b.image_id = old.image_id AND old.root <> $2
               RETURNING old.root)
             SELECT root, pg_notify($5, $6) FROM up",
            &[
                &image,
                &root,
                &manifest_json,
                &now_ms,
                &WAKE_CHANNEL,
                &payload,
            ],
        )
        .await?;
    Ok(match replaced {
        Some(r) => Registered::Replaced { old_root: r.get(0) },
        None => Registered::Unchanged,
    })
}

/// Every registered baseline: (image, manifest JSON).
pub async fn baselines(client: &Client) -> Result<Vec<(String, String)>, PgError> {
    Ok(client
        .query(
            "SELECT image_id, manifest::text FROM phoenix_baselines ORDER BY image_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// An enrolment as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Enrolment {
    pub subject: String,
    pub kind: String,
    pub body_json: String,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
}

/// Records an enrolment; false when `subject` was already enrolled (the first one stands:
/// an identity is never silently replaced).
pub async fn enrol(
    client: &Client,
    subject: &str,
    kind: &str,
    body_json: &str,
    now_ms: i64,
) -> Result<bool, PgError> {
    let n = client
        .execute(
            "INSERT INTO phoenix_enrolments (subject, kind, body, created_ms)
             VALUES ($1, $2, $3::text::jsonb, $4) ON CONFLICT (subject) DO NOTHING",
            &[&subject, &kind, &body_json, &now_ms],
        )
        .await?;
    Ok(n == 1)
}

pub async fn enrolment(client: &Client, subject: &str) -> Result<Option<Enrolment>, PgError> {
    Ok(client
        .query_opt(
            "SELECT subject, kind, body::text, created_ms, revoked_ms
             FROM phoenix_enrolments WHERE subject = $1",
            &[&subject],
        )
        .await?
        .map(|r| Enrolment {
            subject: r.get(0),
            kind: r.get(1),
            body_json: r.get(2),
            created_ms: r.get(3),
            revoked_ms: r.get(4),
        }))
}

/// Revokes an enrolment (kept, for the audit); false when there was none or it was revoked.
pub async fn revoke(client: &Client, subject: &str, now_ms: i64) -> Result<bool, PgError> {
    let payload = format!("revoke:{subject}");
    let row = client
        .query_one(
            "WITH up AS (UPDATE phoenix_enrolments SET revoked_ms = $2
                         WHERE subject = $1 AND revoked_ms IS NULL RETURNING 1)
             SELECT count(*), (SELECT count(pg_notify($3, $4)) FROM up) FROM up",
            &[&subject, &now_ms, &WAKE_CHANNEL, &payload],
        )
        .await?;
    Ok(row.get::<_, i64>(0) == 1)
}

/// The payload that tells other collectors an enrolment was reset or forgotten.
pub fn enrolment_payload(subject: &str) -> String {
    format!("enrolment:{subject}")
}

/// What [`claim_enrolment`] found: the credential hash that stands, when it enrolled, and
/// whether this call wrote it. A revoked enrolment has an empty hash (nothing matches it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub credential_sha256: String,
    pub created_ms: i64,
    pub new: bool,
}

/// Tofu across collectors: the first writer wins. Inserts unless the subject is enrolled,
/// then reads back what stands (a separate statement, so a row another collector committed
/// meanwhile is seen); the caller compares hashes.
pub async fn claim_enrolment(
    client: &Client,
    subject: &str,
    credential_sha256: &str,
    now_ms: i64,
) -> Result<Claim, PgError> {
    // A reset between the two statements deletes the row: try again (twice is plenty).
    for _ in 0..3 {
        let n = client
            .execute(
                "INSERT INTO phoenix_enrolments (subject, kind, body, created_ms)
                 VALUES ($1, 'tofu', jsonb_build_object('credential_sha256', $2::text), $3)
                 ON CONFLICT (subject) DO NOTHING",
                &[&subject, &credential_sha256, &now_ms],
            )
            .await?;
        if n == 1 {
            return Ok(Claim {
                credential_sha256: credential_sha256.to_string(),
                created_ms: now_ms,
                new: true,
            });
        }
        let row = client
            .query_opt(
                "SELECT coalesce(body->>'credential_sha256', ''), created_ms,
                        revoked_ms IS NOT NULL
                 FROM phoenix_enrolments WHERE subject = $1",
                &[&subject],
            )
            .await?;
        if let Some(r) = row {
            let revoked: bool = r.get(2);
            return Ok(Claim {
                credential_sha256: if revoked { String::new() } else { r.get(0) },
                created_ms: r.get(1),
                new: false,
            });
        }
    }
    Err(PgError::Invalid(format!(
        "the enrolment of {subject:?} keeps being reset while it enrols; retry"
    )))
}

/// Every live tofu enrolment: subject → (credential hash, created).
pub async fn tofu_enrolments(
    client: &Client,
) -> Result<std::collections::HashMap<String, (String, i64)>, PgError> {
    Ok(client
        .query(
            "SELECT subject, coalesce(body->>'credential_sha256', ''), created_ms
             FROM phoenix_enrolments WHERE kind = 'tofu' AND revoked_ms IS NULL",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect())
}

/// An operator's reset: the enrolment goes (the next sender enrols afresh) and every
/// collector drops its cached copy. False when there was none.
pub async fn reset_enrolment(client: &Client, subject: &str) -> Result<bool, PgError> {
    let row = client
        .query_one(
            "WITH del AS (DELETE FROM phoenix_enrolments WHERE subject = $1 RETURNING 1)
             SELECT count(*), (SELECT count(pg_notify($2, $3)) FROM del) FROM del",
            &[&subject, &WAKE_CHANNEL, &enrolment_payload(subject)],
        )
        .await?;
    Ok(row.get::<_, i64>(0) > 0)
}

/// A collector forgot a silent instance: the enrolment goes only when no collector has taken
/// a report from it since `heard_since_ms` (it may report to another one). True if it went.
pub async fn forget_enrolment(
    client: &Client,
    subject: &str,
    heard_since_ms: i64,
) -> Result<bool, PgError> {
    let row = client
        .query_one(
            "WITH del AS (
               DELETE FROM phoenix_enrolments WHERE subject = $1
                 AND NOT EXISTS (SELECT 1 FROM phoenix_reports
                                 WHERE instance_id = $1 AND at_ms >= $2)
               RETURNING 1)
             SELECT count(*), (SELECT count(pg_notify($3, $4)) FROM del) FROM del",
            &[
                &subject,
                &heard_since_ms,
                &WAKE_CHANNEL,
                &enrolment_payload(subject),
            ],
        )
        .await?;
    Ok(row.get::<_, i64>(0) > 0)
}

/// One baseline's manifest JSON, if registered.
pub async fn baseline(client: &Client, image: &str) -> Result<Option<String>, PgError> {
    Ok(client
        .query_opt(
            "SELECT manifest::text FROM phoenix_baselines WHERE image_id = $1",
            &[&image],
        )
        .await?
        .map(|r| r.get(0)))
}
