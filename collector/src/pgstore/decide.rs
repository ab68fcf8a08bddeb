//! The phoenix queue's writes. Every decision (mark, hold, release, alert) runs in one
//! transaction that first re-checks the decider's fence (`lease::check_fence`), writes the
//! queue row and its audit row, and wakes the other collectors. A mark is also checked
//! against the group's budget inside the same transaction, so however many collectors there
//! are and whatever a confused one believes, a group never has more than `allowed` instances
//! marked or acked at once, nor more than each budget covering the mark's reason allows
//! (`--budget drift=10%,unhealthy=50%`: counted over the reasons that budget covers).
//!
//! Acks come from the recycler through any collector: they are not the decider's decision,
//! need no fence, and are audited with the recycler as actor.

use tokio_postgres::Client;

use super::lease::check_fence;
use super::{PgError, WAKE_CHANNEL};

/// Who decides: the lease name, this collector's holder name and the fence it holds.
#[derive(Debug, Clone)]
pub struct Fence<'a> {
    pub lease: &'a str,
    pub holder: &'a str,
    pub fence: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Mark for replacement if the group's marked + acked count stays within `allowed`.
    Mark {
        instance_id: String,
        group: String,
        reason: String,
        evidence: serde_json::Value,
        allowed: i64,
        /// The per-reason budgets too (None: only `allowed`).
        per_reason: Option<ReasonBudget>,
    },
    /// Hold (a mass event, or over budget) with the reason.
    Hold {
        instance_id: String,
        group: String,
        reason: String,
        evidence: serde_json::Value,
    },
    /// The problem is gone: a held or marked (not yet acked) instance leaves the queue.
    Release { instance_id: String, why: String },
    Alert {
        group: String,
        kind: String,
        message: String,
    },
}

/// The policy's budgets and the group's size, for the per-reason check of a mark.
#[derive(Debug, Clone, PartialEq)]
pub struct ReasonBudget {
    pub budgets: crate::fleet::policy::Budgets,
    pub group_size: usize,
}

impl ReasonBudget {
    /// The first budget covering `reason` that `in_queue` (the reasons of the group's other
    /// marked and acked instances) already fills: (its key, what it allows, how many).
    pub fn spent(&self, reason: &str, in_queue: &[String]) -> Option<(String, usize, usize)> {
        self.budgets
            .list
            .iter()
            .filter(|b| b.selector.covers(reason))
            .find_map(|b| {
                let allowed = b.amount.of(self.group_size);
                let used = in_queue.iter().filter(|r| b.selector.covers(r)).count();
                (used >= allowed).then(|| (b.selector.key(), allowed, used))
            })
    }
}

/// What a decision did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Done,
    /// Nothing to do (already in that state, or not in the queue).
    Unchanged,
    /// A mark refused because the group's budget is spent.
    OverBudget,
}

impl Decision {
    fn action(&self) -> &'static str {
        match self {
            Decision::Mark { .. } => "mark",
            Decision::Hold { .. } => "hold",
            Decision::Release { .. } => "release",
            Decision::Alert { .. } => "alert",
        }
    }
}

/// Applies one decision under `fence`, with its audit row, in one transaction.
pub async fn decide(
    client: &mut Client,
    f: &Fence<'_>,
    d: &Decision,
    now_ms: i64,
) -> Result<Applied, PgError> {
    let tx = client.transaction().await?;
    check_fence(&tx, f.lease, f.holder, f.fence).await?;
    let (applied, instance, group, detail) = match d {
        Decision::Mark {
            instance_id,
            group,
            reason,
            evidence,
            allowed,
            per_reason,
        } => {
            let ev = evidence.to_string();
            // The lease row is locked (check_fence): decisions are serialised, so what is
            // counted here is what the insert below sees.
            let spent = match per_reason {
                Some(rb) => {
                    let in_queue: Vec<String> = tx
                        .query(
                            "SELECT reason FROM phoenix_marks
                             WHERE group_name = $1 AND state IN ('marked', 'acked')
                               AND instance_id <> $2",
                            &[group, instance_id],
                        )
                        .await?
                        .iter()
                        .map(|r| r.get(0))
                        .collect();
                    rb.spent(reason, &in_queue)
                }
                None => None,
            };
            let allowed_now = if spent.is_some() { 0 } else { *allowed };
            // Already marked or acked: nothing new, and it must not count twice.
            let n = tx
                .execute(
                    "INSERT INTO phoenix_marks AS m
                       (instance_id, group_name, state, reason, evidence, since_ms, fence)
                     SELECT $1, $2, 'marked', $3, $4::text::jsonb, $5, $6
                     WHERE (SELECT count(*) FROM phoenix_marks
                            WHERE group_name = $2 AND state IN ('marked', 'acked')
                              AND instance_id <> $1) < $7
                     ON CONFLICT (instance_id) DO UPDATE SET
                       state = 'marked', reason = EXCLUDED.reason,
                       evidence = EXCLUDED.evidence, since_ms = EXCLUDED.since_ms,
                       fence = EXCLUDED.fence
                     WHERE m.state = 'held'",
                    &[
                        instance_id,
                        group,
                        reason,
                        &ev,
                        &now_ms,
                        &f.fence,
                        &allowed_now,
                    ],
                )
                .await?;
            let applied = if n == 1 {
                Applied::Done
            } else {
                let st: Option<String> = tx
                    .query_opt(
                        "SELECT state FROM phoenix_marks WHERE instance_id = $1",
                        &[instance_id],
                    )
                    .await?
                    .map(|r| r.get(0));
                match st.as_deref() {
                    Some("marked") | Some("acked") => Applied::Unchanged,
                    _ => Applied::OverBudget,
                }
            };
            (
                applied,
                Some(instance_id),
                Some(group),
                serde_json::json!({"reason": reason, "evidence": evidence, "allowed": allowed,
                    "reason_budget": spent.map(|(k, a, u)| format!("{k}: {u} of {a}"))}),
            )
        }
        Decision::Hold {
            instance_id,
            group,
            reason,
            evidence,
        } => {
            let ev = evidence.to_string();
            let n = tx
                .execute(
                    "INSERT INTO phoenix_marks AS m
                       (instance_id, group_name, state, reason, evidence, since_ms, fence)
                     VALUES ($1, $2, 'held', $3, $4::text::jsonb, $5, $6)
                     ON CONFLICT (instance_id) DO UPDATE SET
                       reason = EXCLUDED.reason, evidence = EXCLUDED.evidence,
                       fence = EXCLUDED.fence
                     WHERE m.state = 'held' AND m.reason IS DISTINCT FROM EXCLUDED.reason",
                    &[instance_id, group, reason, &ev, &now_ms, &f.fence],
                )
                .await?;
            (
                if n == 1 {
                    Applied::Done
                } else {
                    Applied::Unchanged
                },
                Some(instance_id),
                Some(group),
                serde_json::json!({"reason": reason, "evidence": evidence}),
            )
        }
        Decision::Release { instance_id, why } => {
            let n = tx
                .execute(
                    "DELETE FROM phoenix_marks
                     WHERE instance_id = $1 AND state IN ('held', 'marked')",
                    &[instance_id],
                )
                .await?;
            (
                if n == 1 {
                    Applied::Done
                } else {
                    Applied::Unchanged
                },
                Some(instance_id),
                None,
                serde_json::json!({"why": why}),
            )
        }
        Decision::Alert {
            group,
            kind,
            message,
        } => {
            // One open alert per (group, kind).
            let n = tx
                .execute(
                    "INSERT INTO phoenix_alerts (group_name, kind, message, at_ms, fence)
                     SELECT $1, $2, $3, $4, $5
                     WHERE NOT EXISTS (SELECT 1 FROM phoenix_alerts
                       WHERE group_name = $1 AND kind = $2 AND cleared_ms IS NULL)",
                    &[group, kind, message, &now_ms, &f.fence],
                )
                .await?;
            (
                if n == 1 {
                    Applied::Done
                } else {
                    Applied::Unchanged
                },
                None,
                Some(group),
                serde_json::json!({"kind": kind, "message": message}),
            )
        }
    };
    // Only changes are audited: the decider asks again every pass, and a refused mark
    // becomes a hold (with its own audit row) in the caller.
    if applied == Applied::Done {
        let action = d.action();
        audit(
            &tx,
            now_ms,
            f.holder,
            action,
            instance,
            group,
            &detail,
            Some(f.fence),
        )
        .await?;
        let payload = format!("{}:{}", d.action(), instance.or(group).map_or("", |s| s));
        tx.execute("SELECT pg_notify($1, $2)", &[&WAKE_CHANNEL, &payload])
            .await?;
    }
    tx.commit().await?;
    Ok(applied)
}

#[allow(clippy::too_many_arguments)]
async fn audit(
    tx: &tokio_postgres::Transaction<'_>,
    at_ms: i64,
    actor: &str,
    action: &str,
    instance: Option<&String>,
    group: Option<&String>,
    detail: &serde_json::Value,
    fence: Option<i64>,
) -> Result<(), PgError> {
    let detail = detail.to_string();
    tx.execute(
        "INSERT INTO phoenix_audit (at_ms, actor, action, instance_id, group_name, detail, fence)
         VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7)",
        &[&at_ms, &actor, &action, &instance, &group, &detail, &fence],
    )
    .await?;
    Ok(())
}

/// The recycler took `instance_id`: marked → acked. False when it was not marked.
pub async fn ack(
    client: &mut Client,
    instance_id: &str,
    actor: &str,
    now_ms: i64,
) -> Result<bool, PgError> {
    let tx = client.transaction().await?;
    let n = tx
        .execute(
            "UPDATE phoenix_marks SET state = 'acked', acked_ms = $2
             WHERE instance_id = $1 AND state = 'marked'",
            &[&instance_id, &now_ms],
        )
        .await?;
    if n == 1 {
        let id = instance_id.to_string();
        audit(
            &tx,
            now_ms,
            actor,
            "ack",
            Some(&id),
            None,
            &serde_json::json!({}),
            None,
        )
        .await?;
        let payload = format!("ack:{instance_id}");
        tx.execute("SELECT pg_notify($1, $2)", &[&WAKE_CHANNEL, &payload])
            .await?;
    }
    tx.commit().await?;
    Ok(n == 1)
}

/// One row of the queue as every collector reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueRow {
    pub instance_id: String,
    pub group: String,
    pub state: String,
    pub reason: String,
    pub evidence: serde_json::Value,
    pub since_ms: i64,
    pub acked_ms: Option<i64>,
    pub fence: i64,
}

/// The whole queue, ordered by instance.
pub async fn queue(client: &Client) -> Result<Vec<QueueRow>, PgError> {
    let rows = client
        .query(
            "SELECT instance_id, group_name, state, reason, evidence::text, since_ms,
                    acked_ms, fence
             FROM phoenix_marks ORDER BY instance_id",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| QueueRow {
            instance_id: r.get(0),
            group: r.get(1),
            state: r.get(2),
            reason: r.get(3),
            evidence: serde_json::from_str(r.get::<_, &str>(4)).unwrap_or_default(),
            since_ms: r.get(5),
            acked_ms: r.get(6),
            fence: r.get(7),
        })
        .collect())
}
