//! What every report changes, batched: last seen, counters and latest figures per instance,
//! the dedupe window per (instance, boot), and check observations per (instance, boot, seq).
//! A report costs no database round trip; `flush` writes everything pending in ONE
//! statement (data-modifying CTEs over `unnest` arrays), about once a second.
//!
//! Merging keeps every write idempotent and order-free across collectors: last seen and seq
//! only move forward (`GREATEST`), figures are taken from the newest report only, and an
//! observation is inserted once (`ON CONFLICT DO NOTHING` on its key), however often a batch
//! is retried and through whichever collector.
//!
//! While PostgreSQL is down the buffer keeps merging (one entry per instance, so it is
//! bounded by the fleet) up to its limits; past them `seen` says `Full` and the caller
//! answers 503, so the agent keeps the batch and nothing is lost.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use tokio_postgres::Client;

use super::PgError;

/// One accepted report, as far as fleet state goes.
#[derive(Debug, Clone)]
pub struct Seen {
    pub instance_id: String,
    pub group: String,
    pub image_id: String,
    /// The wire identity, as JSON.
    pub identity_json: String,
    pub interval_ms: i64,
    /// Unix ms the collector took the report.
    pub at_ms: i64,
    /// Latest figures (CPU, memory, disk), as JSON.
    pub figures_json: String,
    pub boot_id: String,
    pub seq: i64,
}

#[derive(Debug, Clone)]
struct InstRow {
    group: String,
    image_id: String,
    identity: String,
    first_ms: i64,
    last_ms: i64,
    interval_ms: i64,
    reports: i64,
    figures: String,
}

impl InstRow {
    fn merge(&mut self, o: InstRow) {
        self.first_ms = self.first_ms.min(o.first_ms);
        self.reports = self.reports.saturating_add(o.reports);
        if o.last_ms >= self.last_ms {
            self.last_ms = o.last_ms;
            self.group = o.group;
            self.image_id = o.image_id;
            self.identity = o.identity;
            self.interval_ms = o.interval_ms;
            self.figures = o.figures;
        }
    }
}

type ObsKey = (String, String, i64);

#[derive(Debug, Default)]
struct Pending {
    inst: HashMap<String, InstRow>,
    seqs: HashMap<(String, String), (i64, i64)>,
    obs: BTreeMap<ObsKey, (i64, String)>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.inst.is_empty() && self.seqs.is_empty() && self.obs.is_empty()
    }

    fn merge(&mut self, o: Pending) {
        for (k, v) in o.inst {
            match self.inst.get_mut(&k) {
                Some(r) => r.merge(v),
                None => {
                    self.inst.insert(k, v);
                }
            }
        }
        for (k, (seq, ms)) in o.seqs {
            let e = self.seqs.entry(k).or_insert((seq, ms));
            e.0 = e.0.max(seq);
            e.1 = e.1.max(ms);
        }
        for (k, v) in o.obs {
            self.obs.entry(k).or_insert(v);
        }
    }
}

/// Rows written by one flush.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flushed {
    pub instances: u64,
    pub seqs: u64,
    /// New observations (retries of one already stored are not counted).
    pub observations: u64,
}

#[derive(Debug)]
pub struct Batch {
    p: Mutex<Pending>,
    dropped: std::sync::atomic::AtomicU64,
    max_instances: usize,
    max_observations: usize,
}

impl Batch {
    pub fn new(max_instances: usize, max_observations: usize) -> Batch {
        Batch {
            p: Mutex::default(),
            dropped: Default::default(),
            max_instances,
            max_observations,
        }
    }

    /// Buffers one report's effects, with its check observation if it carries one.
    /// Anything PostgreSQL would refuse is refused here, before it can poison a flush.
    pub fn seen(&self, s: Seen, observation: Option<String>) -> Result<(), PgError> {
        check(&s, observation.as_deref())?;
        let mut p = self.p.lock().unwrap();
        if !p.inst.contains_key(&s.instance_id) && p.inst.len() >= self.max_instances {
            return Err(PgError::Full("instances"));
        }
        if observation.is_some() && p.obs.len() >= self.max_observations {
            return Err(PgError::Full("check observations"));
        }
        let row = InstRow {
            group: s.group,
            image_id: s.image_id,
            identity: s.identity_json,
            first_ms: s.at_ms,
            last_ms: s.at_ms,
            interval_ms: s.interval_ms,
            reports: 1,
            figures: s.figures_json,
        };
        match p.inst.get_mut(&s.instance_id) {
            Some(r) => r.merge(row),
            None => {
                p.inst.insert(s.instance_id.clone(), row);
            }
        }
        let e = p
            .seqs
            .entry((s.instance_id.clone(), s.boot_id.clone()))
            .or_insert((s.seq, s.at_ms));
        e.0 = e.0.max(s.seq);
        e.1 = e.1.max(s.at_ms);
        if let Some(body) = observation {
            p.obs
                .entry((s.instance_id, s.boot_id, s.seq))
                .or_insert((s.at_ms, body));
        }
        Ok(())
    }

    /// Instances waiting to be flushed.
    pub fn pending(&self) -> usize {
        self.p.lock().unwrap().inst.len()
    }

    /// Batches dropped because PostgreSQL refused their content (not an outage).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Writes everything pending in one statement. On an outage it all goes back into the
    /// buffer, merged with what came in meanwhile, for the next try. A batch the server
    /// refuses for its content is dropped with an error: kept, it would fail every second
    /// for ever, last seen would stop moving and the decider would take the whole fleet
    /// for silent. The agents' next reports carry the same facts again.
    pub async fn flush(&self, client: &Client) -> Result<Flushed, PgError> {
        let taken = std::mem::take(&mut *self.p.lock().unwrap());
        if taken.is_empty() {
            return Ok(Flushed::default());
        }
        match super::timed(write(client, &taken)).await {
            Ok(f) => Ok(f),
            Err(e) if !e.is_outage() => {
                self.dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(error = %e, instances = taken.inst.len(), "the fleet store refused a flush for its content; dropped it (the next reports refresh it)");
                Err(e)
            }
            Err(e) => {
                let mut p = self.p.lock().unwrap();
                let newer = std::mem::take(&mut *p);
                *p = taken;
                p.merge(newer);
                Err(e)
            }
        }
    }
}

/// PostgreSQL text holds no NUL, and jsonb takes no `\u0000` escape; JSON must parse.
fn check(s: &Seen, observation: Option<&str>) -> Result<(), PgError> {
    for (what, v) in [
        ("instance id", &s.instance_id),
        ("group", &s.group),
        ("image id", &s.image_id),
        ("boot id", &s.boot_id),
    ] {
        if v.contains('\0') {
            return Err(PgError::Invalid(format!("the {what} holds a NUL byte")));
        }
    }
    let json = [
        ("identity", Some(s.identity_json.as_str())),
        ("figures", Some(s.figures_json.as_str())),
        ("observation", observation),
    ];
    for (what, v) in json {
        let Some(v) = v else { continue };
        if v.contains('\0') || v.contains("\\u0000") {
            return Err(PgError::Invalid(format!(
                "the {what} holds a NUL character"
            )));
        }
        if serde_json::from_str::<serde::de::IgnoredAny>(v).is_err() {
            return Err(PgError::Invalid(format!("the {what} is not JSON")));
        }
    }
    Ok(())
}

async fn write(client: &Client, p: &Pending) -> Result<Flushed, PgError> {
    let mut ids = Vec::with_capacity(p.inst.len());
    let (mut groups, mut images, mut idents, mut figs) = (vec![], vec![], vec![], vec![]);
    let (mut firsts, mut lasts, mut ivals, mut counts) = (vec![], vec![], vec![], vec![]);
    for (id, r) in &p.inst {
        ids.push(id.as_str());
        groups.push(r.group.as_str());
        images.push(r.image_id.as_str());
        idents.push(r.identity.as_str());
        figs.push(r.figures.as_str());
        firsts.push(r.first_ms);
        lasts.push(r.last_ms);
        ivals.push(r.interval_ms);
        counts.push(r.reports);
    }
    let (mut s_ids, mut s_boots, mut s_seqs, mut s_ms) = (vec![], vec![], vec![], vec![]);
    for ((id, boot), (seq, ms)) in &p.seqs {
        s_ids.push(id.as_str());
        s_boots.push(boot.as_str());
        s_seqs.push(*seq);
        s_ms.push(*ms);
    }
    let (mut o_ids, mut o_boots, mut o_seqs, mut o_ms, mut o_body) =
        (vec![], vec![], vec![], vec![], vec![]);
    for ((id, boot, seq), (ms, body)) in &p.obs {
        o_ids.push(id.as_str());
        o_boots.push(boot.as_str());
        o_seqs.push(*seq);
        o_ms.push(*ms);
        o_body.push(body.as_str());
    }
    let row = client
        .query_one(
            "WITH i AS (
               INSERT INTO phoenix_instances AS t (instance_id, group_name, image_id, identity,
                   first_seen_ms, last_seen_ms, interval_ms, reports, figures)
               SELECT id, g, img, ident::jsonb, f, l, iv, n, fig::jsonb
               FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[],
                           $6::bigint[], $7::bigint[], $8::bigint[], $9::text[])
                    AS u(id, g, img, ident, f, l, iv, n, fig)
               ON CONFLICT (instance_id) DO UPDATE SET
                 first_seen_ms = LEAST(t.first_seen_ms, EXCLUDED.first_seen_ms),
                 last_seen_ms = GREATEST(t.last_seen_ms, EXCLUDED.last_seen_ms),
                 reports = t.reports + EXCLUDED.reports,
                 group_name = CASE WHEN EXCLUDED.last_seen_ms >= t.last_seen_ms
                              THEN EXCLUDED.group_name ELSE t.group_name END,
                 image_id = CASE WHEN EXCLUDED.last_seen_ms >= t.last_seen_ms
                            THEN EXCLUDED.image_id ELSE t.image_id END,
                 identity = CASE WHEN EXCLUDED.last_seen_ms >= t.last_seen_ms
                            THEN EXCLUDED.identity ELSE t.identity END,
                 interval_ms = CASE WHEN EXCLUDED.last_seen_ms >= t.last_seen_ms
                               THEN EXCLUDED.interval_ms ELSE t.interval_ms END,
                 figures = CASE WHEN EXCLUDED.last_seen_ms >= t.last_seen_ms
                           THEN EXCLUDED.figures ELSE t.figures END,
                 changed = pg_current_xact_id()
               RETURNING 1),
             s AS (
               INSERT INTO phoenix_seqs AS t (instance_id, boot_id, seq, seen_ms)
               SELECT * FROM unnest($10::text[], $11::text[], $12::bigint[], $13::bigint[])
               ON CONFLICT (instance_id, boot_id) DO UPDATE SET
                 seq = GREATEST(t.seq, EXCLUDED.seq),
                 seen_ms = GREATEST(t.seen_ms, EXCLUDED.seen_ms),
                 changed = pg_current_xact_id()
               WHERE EXCLUDED.seq > t.seq OR EXCLUDED.seen_ms > t.seen_ms
               RETURNING 1),
             o AS (
               INSERT INTO phoenix_observations (instance_id, boot_id, seq, at_ms, body)
               SELECT id, b, q, ms, body::jsonb
               FROM unnest($14::text[], $15::text[], $16::bigint[], $17::bigint[],
                           $18::text[]) AS u(id, b, q, ms, body)
               ON CONFLICT DO NOTHING
               RETURNING 1)
             SELECT (SELECT count(*) FROM i), (SELECT count(*) FROM s),
                    (SELECT count(*) FROM o)",
            &[
                &ids, &groups, &images, &idents, &firsts, &lasts, &ivals, &counts, &figs, &s_ids,
                &s_boots, &s_seqs, &s_ms, &o_ids, &o_boots, &o_seqs, &o_ms, &o_body,
            ],
        )
        .await?;
    Ok(Flushed {
        instances: row.get::<_, i64>(0) as u64,
        seqs: row.get::<_, i64>(1) as u64,
        observations: row.get::<_, i64>(2) as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(id: &str, at: i64, seq: i64) -> Seen {
        Seen {
            instance_id: id.into(),
            group: "g".into(),
            image_id: "img".into(),
            identity_json: format!("{{\"at\":{at}}}"),
            interval_ms: 1000,
            at_ms: at,
            figures_json: format!("{{\"cpu\":{at}}}"),
            boot_id: "b".into(),
            seq,
        }
    }

    #[test]
    fn reports_merge_per_instance_newest_figures_win() {
        let b = Batch::new(10, 10);
        b.seen(seen("i1", 2_000, 2), None).unwrap();
        b.seen(seen("i1", 1_000, 1), Some("{}".into())).unwrap();
        b.seen(seen("i2", 1_500, 7), None).unwrap();
        let p = b.p.lock().unwrap();
        let r = &p.inst["i1"];
        assert_eq!((r.first_ms, r.last_ms, r.reports), (1_000, 2_000, 2));
        assert_eq!(r.figures, "{\"cpu\":2000}", "an older report never wins");
        assert_eq!(p.seqs[&("i1".to_string(), "b".to_string())], (2, 2_000));
        assert_eq!(p.obs.len(), 1);
    }

    #[test]
    fn limits_refuse_rather_than_grow() {
        let b = Batch::new(2, 1);
        b.seen(seen("i1", 1, 1), Some("{}".into())).unwrap();
        b.seen(seen("i2", 1, 1), None).unwrap();
        assert!(matches!(
            b.seen(seen("i3", 1, 1), None),
            Err(PgError::Full("instances"))
        ));
        // Known instances still merge; a second observation is refused.
        b.seen(seen("i1", 2, 2), None).unwrap();
        assert!(matches!(
            b.seen(seen("i1", 3, 3), Some("{}".into())),
            Err(PgError::Full(_))
        ));
        assert_eq!(b.pending(), 2);
    }

    #[test]
    fn what_postgres_would_refuse_is_refused_before_the_buffer() {
        let b = Batch::new(10, 10);
        let mut s = seen("i1", 1, 1);
        s.instance_id = "i\0x".into();
        assert!(matches!(b.seen(s, None), Err(PgError::Invalid(m)) if m.contains("NUL")));
        let mut s = seen("i1", 1, 1);
        s.figures_json = r#"{"x":"a\u0000b"}"#.into();
        assert!(b.seen(s, None).is_err());
        assert!(b.seen(seen("i1", 1, 1), Some("{not json".into())).is_err());
        assert_eq!(b.pending(), 0, "nothing refused entered the buffer");
        b.seen(seen("i1", 1, 1), Some(r#"{"ok":true}"#.into()))
            .unwrap();
        assert_eq!(b.pending(), 1);
    }

    #[test]
    fn failed_flush_merges_back() {
        let mut a = Pending::default();
        let mut b = Pending::default();
        let bt = Batch::new(10, 10);
        bt.seen(seen("i1", 1_000, 1), None).unwrap();
        std::mem::swap(&mut a, &mut *bt.p.lock().unwrap());
        bt.seen(seen("i1", 3_000, 3), None).unwrap();
        std::mem::swap(&mut b, &mut *bt.p.lock().unwrap());
        a.merge(b);
        let r = &a.inst["i1"];
        assert_eq!((r.first_ms, r.last_ms, r.reports), (1_000, 3_000, 2));
    }
}
