//! Verdicts (drift, checks, health state) per instance, written only when they change: each
//! collector remembers what it last wrote, so an unchanged verdict costs nothing, and a
//! changed one is one statement that also wakes the decider through NOTIFY.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio_postgres::Client;

use super::{PgError, WAKE_CHANNEL};

#[derive(Debug)]
pub struct Verdicts {
    /// (instance, kind) → the JSON text last written by this collector.
    written: Mutex<HashMap<(String, String), String>>,
    max: usize,
}

impl Verdicts {
    pub fn new(max: usize) -> Verdicts {
        Verdicts {
            written: Mutex::default(),
            max,
        }
    }

    /// True when `body` differs from what this collector last wrote for (instance, kind).
    pub fn changed(&self, instance: &str, kind: &str, body: &str) -> bool {
        let g = self.written.lock().unwrap();
        !matches!(g.get(&(instance.to_string(), kind.to_string())), Some(b) if b == body)
    }

    /// Writes the verdict if it changed; Ok(true) when the database row changed (another
    /// collector may have written the same already).
    pub async fn put(
        &self,
        client: &Client,
        instance: &str,
        kind: &str,
        body: &str,
        now_ms: i64,
    ) -> Result<bool, PgError> {
        if !self.changed(instance, kind, body) {
            return Ok(false);
        }
        let payload = format!("verdict:{instance}");
        let row = super::timed(async {
            Ok(client
                .query_one(
                    "WITH up AS (
                       INSERT INTO phoenix_verdicts AS v (instance_id, kind, body, updated_ms)
                       VALUES ($1, $2, $3::text::jsonb, $4)
                       ON CONFLICT (instance_id, kind) DO UPDATE SET
                         body = EXCLUDED.body, updated_ms = EXCLUDED.updated_ms
                       WHERE v.body IS DISTINCT FROM EXCLUDED.body
                       RETURNING 1)
                     SELECT count(*), (SELECT count(pg_notify($5, $6)) FROM up) FROM up",
                    &[&instance, &kind, &body, &now_ms, &WAKE_CHANNEL, &payload],
                )
                .await?)
        })
        .await?;
        let mut g = self.written.lock().unwrap();
        if g.len() >= self.max {
            // Only a cache: forgetting it costs one more write per verdict.
            g.clear();
        }
        g.insert((instance.to_string(), kind.to_string()), body.to_string());
        Ok(row.get::<_, i64>(0) == 1)
    }
}

/// Every stored verdict of one kind: instance → JSON.
pub async fn all_of_kind(
    client: &Client,
    kind: &str,
) -> Result<HashMap<String, serde_json::Value>, PgError> {
    let rows = client
        .query(
            "SELECT instance_id, body::text FROM phoenix_verdicts WHERE kind = $1",
            &[&kind],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let body = serde_json::from_str(r.get::<_, &str>(1)).unwrap_or_default();
            (r.get(0), body)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_verdicts_are_not_rewritten() {
        let v = Verdicts::new(10);
        assert!(v.changed("i", "drift", "{}"));
        v.written
            .lock()
            .unwrap()
            .insert(("i".into(), "drift".into()), "{}".into());
        assert!(!v.changed("i", "drift", "{}"));
        assert!(v.changed("i", "drift", "{\"drifted\":true}"));
        assert!(v.changed("i", "checks", "{}"));
    }
}
