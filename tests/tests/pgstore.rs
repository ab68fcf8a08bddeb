//! The collector's PostgreSQL fleet store against a real PostgreSQL 15 (a throw-away server
//! per test, tests/src/pg.rs): migrations raced by two collectors, exactly one decider with
//! fencing, budgets held in the database, one statement per flush however many reports,
//! exactly-once observations, wake-ups across collectors, and a crashed PostgreSQL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use phoenix_collector::pgstore::batch::Seen;
use phoenix_collector::pgstore::decide::{Applied, Decision, Fence};
use phoenix_collector::pgstore::{schema, PgError, PgOptions, PgStore};
use phoenix_e2e::pg::{Postgres, PG_DB};

fn opts(ttl_ms: u64) -> PgOptions {
    PgOptions {
        lease_ttl: Duration::from_millis(ttl_ms),
        flush_every: Duration::from_millis(200),
        ..PgOptions::default()
    }
}

async fn open(pg: &Postgres, ttl_ms: u64) -> Arc<PgStore> {
    PgStore::open(&pg.url(), opts(ttl_ms))
        .await
        .unwrap_or_else(|e| panic!("opening the store: {e}\n{}", pg.log_text()))
}

fn seen(id: usize, seq: i64, at_ms: i64) -> Seen {
    Seen {
        instance_id: format!("i-{id:03}"),
        group: "g1".into(),
        image_id: "img-1".into(),
        identity_json: format!("{{\"instance_id\":\"i-{id:03}\"}}"),
        interval_ms: 1000,
        at_ms,
        figures_json: format!("{{\"cpu\":{seq}}}"),
        boot_id: "boot-a".into(),
        seq,
    }
}

fn mark(id: &str, allowed: i64) -> Decision {
    Decision::Mark {
        instance_id: id.into(),
        group: "g1".into(),
        reason: "drift".into(),
        evidence: serde_json::json!({"changed": ["/etc/passwd"]}),
        allowed,
        per_reason: None,
    }
}

/// Polls an async condition with a deadline.
async fn until<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collectors_starting_together_migrate_once_and_a_newer_schema_is_refused() {
    let pg = Postgres::start();
    let url = pg.url();
    let (a, b, c) = tokio::join!(
        PgStore::open(&url, opts(2000)),
        PgStore::open(&url, opts(2000)),
        PgStore::open(&url, opts(2000)),
    );
    for r in [a, b, c] {
        r.unwrap_or_else(|e| panic!("a racing collector failed: {e}"));
    }
    assert_eq!(
        pg.scalar("SELECT count(*) FROM phoenix_schema"),
        schema::latest().to_string()
    );
    assert_eq!(
        pg.scalar(
            "SELECT count(*) FROM information_schema.tables WHERE table_name LIKE 'phoenix_%'"
        ),
        "15",
        "migration 2 adds phoenix_reports and phoenix_fleet, 3 phoenix_diag"
    );
    // A newer collector migrated the database: an older one refuses rather than guess.
    pg.psql(
        PG_DB,
        "INSERT INTO phoenix_schema (version, name) VALUES (999, 'from the future')",
    );
    let e = PgStore::open(&url, opts(2000)).await.unwrap_err();
    assert!(e.to_string().contains("newer than this collector"), "{e}");
    // And a store that is not there is an error at start, with the reason.
    let dead = format!(
        "postgres://postgres@127.0.0.1:{}/phoenix",
        phoenix_e2e::free_port()
    );
    let e = PgStore::open(&dead, opts(2000)).await.unwrap_err();
    assert!(e.to_string().starts_with("PostgreSQL"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_decider_takeover_after_expiry_and_a_deposed_deciders_writes_are_refused() {
    let pg = Postgres::start();
    let ttl = Duration::from_millis(2000);
    let a = open(&pg, 2000).await;
    let b = open(&pg, 2000).await;

    let ha = a
        .lease_tick()
        .await
        .unwrap()
        .expect("first candidate takes the lease");
    assert!(b.lease_tick().await.unwrap().is_none(), "a second decider");
    assert_eq!(a.decide(&mark("i-001", 5)).await.unwrap(), Applied::Done);
    assert!(matches!(
        b.decide(&mark("i-002", 5)).await,
        Err(PgError::Fenced(_))
    ));

    // a renews once more, then "hangs" (stops renewing). b must not take over before a's
    // lease ran out, and must within twice the lease time.
    a.lease_tick()
        .await
        .unwrap()
        .expect("renewal keeps the lease");
    let last_renewal = Instant::now();
    assert_eq!(
        a.lease_tick().await.unwrap().map(|h| h.fence),
        Some(ha.fence)
    );
    let mut took = None;
    while last_renewal.elapsed() < ttl * 2 {
        if let Some(h) = b.lease_tick().await.unwrap() {
            took = Some((h, last_renewal.elapsed()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (hb, after) = took.expect("b took over within 2x the lease time");
    assert!(
        after >= ttl - Duration::from_millis(300),
        "taken before expiry: {after:?}"
    );
    assert_eq!(
        hb.fence,
        ha.fence + 1,
        "fence goes up at every change of holder"
    );

    // a's local deadline has passed: it knows it is not the decider.
    assert!(a.decider().is_none());
    // Even a write a deposed decider sends with its old fence is refused by the database.
    let old = Fence {
        lease: &a.lease.name,
        holder: &a.lease.holder,
        fence: ha.fence,
    };
    let late = a.decide_with(&old, &mark("i-003", 5)).await;
    assert!(
        matches!(late, Err(PgError::Fenced(f)) if f == ha.fence),
        "{late:?}"
    );
    assert!(
        a.lease_tick().await.unwrap().is_none(),
        "a cannot take it back"
    );
    let q = b.queue().await.unwrap();
    let ids: Vec<&str> = q.iter().map(|r| r.instance_id.as_str()).collect();
    assert_eq!(ids, ["i-001"], "only the live decider's marks");
    assert_eq!(q[0].fence, ha.fence);
    assert_eq!(
        pg.scalar("SELECT string_agg(action || ':' || fence, ',') FROM phoenix_audit"),
        format!("mark:{}", ha.fence)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_holds_in_the_database_acks_count_and_releases_free_it() {
    let pg = Postgres::start();
    let a = open(&pg, 5000).await;
    a.lease_tick().await.unwrap().expect("lease");
    let mut done = 0;
    for i in 0..10 {
        match a.decide(&mark(&format!("i-{i:03}"), 2)).await.unwrap() {
            Applied::Done => done += 1,
            Applied::OverBudget => {}
            Applied::Unchanged => panic!("nothing was marked twice"),
        }
    }
    assert_eq!(done, 2, "a group of 10 at budget 2");
    // Asking again is idempotent and does not count twice against the budget.
    assert_eq!(
        a.decide(&mark("i-000", 2)).await.unwrap(),
        Applied::Unchanged
    );
    assert!(a.ack("i-000", "recycler").await.unwrap());
    assert!(!a.ack("i-000", "recycler").await.unwrap(), "acked once");
    assert_eq!(
        a.decide(&mark("i-005", 2)).await.unwrap(),
        Applied::OverBudget,
        "an acked instance still counts until it is gone"
    );
    let release = Decision::Release {
        instance_id: "i-001".into(),
        why: "clean again".into(),
    };
    assert_eq!(a.decide(&release).await.unwrap(), Applied::Done);
    assert_eq!(a.decide(&mark("i-005", 2)).await.unwrap(), Applied::Done);
    // A held instance can be promoted to marked only within the budget.
    let hold = Decision::Hold {
        instance_id: "i-007".into(),
        group: "g1".into(),
        reason: "mass event: 8 of 10".into(),
        evidence: serde_json::json!({}),
    };
    assert_eq!(a.decide(&hold).await.unwrap(), Applied::Done);
    assert_eq!(
        a.decide(&mark("i-007", 2)).await.unwrap(),
        Applied::OverBudget
    );
    assert_eq!(
        pg.scalar(
            "SELECT string_agg(instance_id || '=' || state, ',' ORDER BY instance_id) \
             FROM phoenix_marks"
        ),
        "i-000=acked,i-005=marked,i-007=held"
    );
    assert_eq!(
        pg.scalar("SELECT string_agg(action, ',' ORDER BY id) FROM phoenix_audit"),
        "mark,mark,ack,release,mark,hold"
    );
}

/// `--budget drift=10%,unhealthy=50%` in a group of 10, decided through two collectors in
/// turn (each its own fence): the drift budget (1) holds across them, an unhealthy mark
/// still fits its own budget (5) while drift's is spent, and never more than 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_reason_budgets_hold_in_the_database_across_deciders() {
    use phoenix_collector::fleet::policy::Budgets;
    use phoenix_collector::pgstore::decide::ReasonBudget;
    let pg = Postgres::start();
    let a = open(&pg, 1500).await;
    let b = open(&pg, 1500).await;
    let rb = ReasonBudget {
        budgets: Budgets::parse("drift=10%,unhealthy=50%").unwrap(),
        group_size: 10,
    };
    let m = |id: usize, reason: &str| Decision::Mark {
        instance_id: format!("i-{id:03}"),
        group: "g1".into(),
        reason: reason.into(),
        evidence: serde_json::json!({}),
        // The group-wide number alone would allow all of them.
        allowed: 10,
        per_reason: Some(rb.clone()),
    };
    a.lease_tick().await.unwrap().expect("a decides first");
    assert_eq!(a.decide(&m(0, "drift")).await.unwrap(), Applied::Done);
    assert_eq!(
        a.decide(&m(1, "drift")).await.unwrap(),
        Applied::OverBudget,
        "drift=10% of 10 is 1"
    );
    // a stops; b takes over after the expiry and starts from the database's queue.
    drop(a);
    assert!(
        until(Duration::from_secs(10), || async {
            b.lease_tick().await.ok().flatten().is_some()
        })
        .await,
        "b never took the lease"
    );
    for i in 1..10 {
        assert_eq!(
            b.decide(&m(i, "drift")).await.unwrap(),
            Applied::OverBudget,
            "i-{i:03}: the drift budget is spent through the other collector"
        );
    }
    let mut unhealthy = 0;
    for (i, reason) in [
        (1, "check_failed"),
        (2, "silent"),
        (3, "silent"),
        (4, "disk_full"),
    ]
    .into_iter()
    .chain((5..10).map(|i| (i, "check_failed")))
    {
        if b.decide(&m(i, reason)).await.unwrap() == Applied::Done {
            unhealthy += 1;
        }
    }
    assert_eq!(unhealthy, 5, "unhealthy=50% of 10, drift's mark aside");
    let per: String = pg.scalar(
        "SELECT string_agg(reason || '=' || n, ',' ORDER BY reason) FROM \
         (SELECT CASE WHEN reason = 'drift' THEN 'drift' ELSE 'unhealthy' END AS reason, \
                 count(*) AS n FROM phoenix_marks WHERE state = 'marked' GROUP BY 1) c",
    );
    assert_eq!(per, "drift=1,unhealthy=5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_reports_through_two_collectors_are_two_statements_and_exactly_once() {
    let pg = Postgres::start_with(&["shared_preload_libraries = 'pg_stat_statements'"]);
    pg.psql(PG_DB, "CREATE EXTENSION pg_stat_statements");
    let a = open(&pg, 5000).await;
    let b = open(&pg, 5000).await;
    pg.psql(PG_DB, "SELECT pg_stat_statements_reset()");

    // 40 instances x 50 reports, alternating between the collectors (an agent failing over);
    // every 5th report carries a check observation, and each of those is retried through the
    // other collector too (its ack was lost).
    let t0 = 1_700_000_000_000i64;
    let mut observations = 0;
    for seq in 1..=50i64 {
        for id in 0..40usize {
            let at = t0 + seq * 1000 + id as i64;
            let (first, other) = if (seq + id as i64) % 2 == 0 {
                (&a, &b)
            } else {
                (&b, &a)
            };
            let obs = (seq % 5 == 0).then(|| format!("{{\"web\":{}}}", seq % 2 == 0));
            first.batch.seen(seen(id, seq, at), obs.clone()).unwrap();
            if let Some(o) = obs {
                observations += 1;
                other.batch.seen(seen(id, seq, at), Some(o)).unwrap();
            }
        }
    }
    let fa = a.flush().await.unwrap();
    let fb = b.flush().await.unwrap();
    assert_eq!(fa.observations + fb.observations, observations);
    assert_eq!(a.flush().await.unwrap(), Default::default(), "nothing left");

    let calls = pg.scalar(
        "SELECT sum(calls) FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
         WHERE d.datname = 'phoenix' AND s.query NOT ILIKE '%pg_stat_statements%'",
    );
    assert_eq!(calls, "2", "one statement per flush for 2,000 reports");
    assert_eq!(pg.scalar("SELECT count(*) FROM phoenix_instances"), "40");
    // Retries through the other collector counted as reports (2000 + 400) but every
    // observation is stored once.
    assert_eq!(
        pg.scalar("SELECT sum(reports) FROM phoenix_instances"),
        "2400"
    );
    assert_eq!(
        pg.scalar("SELECT count(*) FROM phoenix_observations"),
        observations.to_string()
    );
    // Newest wins whatever order the collectors flushed in.
    assert_eq!(
        pg.scalar(
            "SELECT last_seen_ms - first_seen_ms || ' ' || (figures->>'cpu') \
             FROM phoenix_instances WHERE instance_id = 'i-007'"
        ),
        "49000 50"
    );
    assert_eq!(
        pg.scalar("SELECT min(seq) || '-' || max(seq) FROM phoenix_seqs"),
        "50-50"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_verdict_wakes_the_other_collector_and_an_unchanged_one_costs_nothing() {
    let pg = Postgres::start();
    let a = open(&pg, 5000).await;
    let b = open(&pg, 5000).await;
    let mut sub = b.subscribe();
    b.start();
    // Drain the wake-ups of b's own start (LISTEN connected, lease taken).
    tokio::time::sleep(Duration::from_millis(300)).await;
    while tokio::time::timeout(Duration::from_millis(700), b.wake.notified())
        .await
        .is_ok()
    {}
    let body = r#"{"drifted":true,"hash":"abc"}"#;
    assert!(a.put_verdict("i-001", "drift", body).await.unwrap());
    let woke = tokio::time::timeout(Duration::from_secs(5), b.wake.notified()).await;
    assert!(woke.is_ok(), "NOTIFY from a reached b");
    // Subscribers get the payloads: first the reload of b's (re)connect, then a's verdict.
    let mut seen_payloads = Vec::new();
    while let Ok(Ok(p)) = tokio::time::timeout(Duration::from_millis(500), sub.recv()).await {
        seen_payloads.push(p);
    }
    assert_eq!(seen_payloads, ["reload", "verdict:i-001"]);
    assert!(!a.put_verdict("i-001", "drift", body).await.unwrap());
    // b writing the same verdict changes no row and wakes nobody.
    assert!(!b.put_verdict("i-001", "drift", body).await.unwrap());
    assert_eq!(
        pg.scalar("SELECT body->>'hash' FROM phoenix_verdicts WHERE instance_id = 'i-001'"),
        "abc"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_reports_still_taken_nobody_marked_then_catch_up() {
    let mut pg = Postgres::start();
    let a = open(&pg, 1500).await;
    a.start();
    assert!(
        until(Duration::from_secs(5), || async { a.decider().is_some() }).await,
        "the only collector becomes the decider"
    );
    let t0 = phoenix_collector::pgstore::wall_ms();
    for id in 0..10 {
        a.batch.seen(seen(id, 1, t0), None).unwrap();
    }
    assert!(until(Duration::from_secs(5), || async { a.batch.pending() == 0 }).await);

    pg.kill();
    let down_at = phoenix_collector::pgstore::wall_ms();
    // Reports keep coming; the collector keeps taking them.
    let mut seq = 1;
    let end = Instant::now() + Duration::from_secs(6);
    while Instant::now() < end {
        seq += 1;
        for id in 0..10 {
            a.batch
                .seen(seen(id, seq, phoenix_collector::pgstore::wall_ms()), None)
                .expect("reports are taken while PostgreSQL is down");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let st = a.health.status();
    assert!(!st.up, "the outage is known: {st:?}");
    assert!(
        st.reason
            .as_deref()
            .unwrap_or("")
            .contains("no instance is marked"),
        "{st:?}"
    );
    assert!(a.decider().is_none(), "no decider without the store");
    assert!(a.silence_floor_ms().is_none());
    assert!(a.decide(&mark("i-001", 5)).await.is_err(), "no marks");
    assert_eq!(a.batch.pending(), 10, "one buffered entry per instance");

    pg.up();
    assert!(
        until(Duration::from_secs(15), || async {
            a.health.is_up() && a.batch.pending() == 0 && a.decider().is_some()
        })
        .await,
        "caught up and deciding again: {:?}",
        a.health.status()
    );
    let st = a.health.status();
    assert!(st.back_ms > down_at, "{st:?}");
    let floor = a.silence_floor_ms().unwrap();
    assert!(floor > st.back_ms, "silence counts from after the gap");
    assert_eq!(pg.scalar("SELECT count(*) FROM phoenix_marks"), "0");
    assert_eq!(
        pg.scalar("SELECT sum(reports) FROM phoenix_instances"),
        (10 * seq).to_string(),
        "every report of the gap arrived"
    );
    assert_eq!(
        pg.scalar("SELECT min(seq) FROM phoenix_seqs"),
        seq.to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decider_pulls_what_others_wrote_once_by_cursor_and_its_memory_is_fenced() {
    let pg = Postgres::start();
    let a = open(&pg, 5000).await;
    let b = open(&pg, 5000).await;
    a.lease_tick().await.unwrap().expect("a decides");

    let everything = a.pull(0).await.unwrap();
    assert!(everything.instances.is_empty());
    let t0 = 1_700_000_000_000i64;
    b.batch
        .seen(seen(1, 1, t0), Some(r#"{"checks":"web failed"}"#.into()))
        .unwrap();
    b.flush().await.unwrap();
    assert_eq!(a.decide(&mark("i-001", 1)).await.unwrap(), Applied::Done);
    assert!(b.ack("i-001", "recycler").await.unwrap());

    let p1 = a.pull(everything.cursor).await.unwrap();
    assert_eq!(p1.instances.len(), 1);
    assert_eq!(p1.instances[0].last_seen_ms, t0);
    assert_eq!(p1.seqs, [("i-001".to_string(), "boot-a".to_string(), 1)]);
    assert_eq!(p1.observations.len(), 1);
    assert_eq!(p1.observations[0].body_json, r#"{"checks": "web failed"}"#);
    assert_eq!(p1.acks.len(), 1);
    assert_eq!(p1.acks[0].by, "recycler");

    // Nothing new: the next pull returns nothing.
    let p2 = a.pull(p1.cursor).await.unwrap();
    assert_eq!(
        (
            p2.instances.len(),
            p2.seqs.len(),
            p2.observations.len(),
            p2.acks.len()
        ),
        (0, 0, 0, 0),
        "{p2:?}"
    );
    // A retried, older report changes no row and is not pulled again.
    b.batch.seen(seen(1, 1, t0), None).unwrap();
    b.flush().await.unwrap();
    let p3 = a.pull(p2.cursor).await.unwrap();
    assert!(p3.seqs.is_empty(), "{p3:?}");

    a.save_state("queue", r#"{"recent_marks":[1]}"#)
        .await
        .unwrap();
    assert!(matches!(
        b.save_state("queue", "{}").await,
        Err(PgError::Fenced(_))
    ));
    assert_eq!(
        pg.scalar("SELECT body::text FROM phoenix_state WHERE key = 'queue'"),
        r#"{"recent_marks": [1]}"#
    );
}

/// The fence each holder process last printed, from its log.
fn last_decider_line(p: &phoenix_e2e::Proc) -> Option<i64> {
    p.log_text().lines().rev().find_map(|l| {
        l.strip_prefix("decider ")
            .map(|f| f.trim().parse().unwrap())
    })
}

fn holder(pg: &Postgres, ttl_ms: u64, name: &str) -> phoenix_e2e::Proc {
    let dir = std::env::temp_dir();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgstore-holder"));
    cmd.arg(pg.url()).arg(ttl_ms.to_string());
    let log = dir.join(format!("pgstore-holder-{name}-{}.log", std::process::id()));
    phoenix_e2e::Proc::spawn(cmd, log)
}

#[test]
fn kill_9_of_the_holder_process_hands_the_lease_to_exactly_one_other_before_it_expires() {
    let pg = Postgres::start();
    let ttl = Duration::from_millis(3000);
    let mut a = holder(&pg, 3000, "a");
    let fa = phoenix_e2e::wait_for(Duration::from_secs(10), || last_decider_line(&a))
        .unwrap_or_else(|| panic!("a never decided: {}", a.log_text()));
    let b = holder(&pg, 3000, "b");
    let c = holder(&pg, 3000, "c");
    // Give b and c time to contend: they must not take a live lease.
    std::thread::sleep(ttl);
    assert_eq!(last_decider_line(&b), None, "b decided beside a");
    assert_eq!(last_decider_line(&c), None, "c decided beside a");
    let row_holder = pg.scalar("SELECT holder FROM phoenix_lease");
    assert!(
        row_holder.contains(&format!("/{}/", a.pid())),
        "{row_holder}"
    );

    a.kill();
    let killed = Instant::now();
    let (who, fence) = phoenix_e2e::wait_for(ttl * 2, || {
        last_decider_line(&b)
            .map(|f| ("b", f))
            .or_else(|| last_decider_line(&c).map(|f| ("c", f)))
    })
    .unwrap_or_else(|| {
        panic!(
            "nobody took over within 2x the lease time; b: {} c: {}",
            b.log_text(),
            c.log_text()
        )
    });
    let took = killed.elapsed();
    eprintln!("lease {ttl:?}: {who} took over {took:?} after kill -9 of the holder");
    assert!(took < ttl * 2, "takeover after {took:?}");
    // The killed holder's session is gone, so nobody waits for the expiry: a poll suffices.
    assert!(took < ttl, "waited for the expiry after a kill: {took:?}");
    assert_eq!(fence, fa + 1);
    // Exactly one of the survivors decides.
    std::thread::sleep(ttl / 2);
    let deciding = [&b, &c]
        .iter()
        .filter(|p| last_decider_line(p).is_some())
        .count();
    assert_eq!(deciding, 1, "{who} took over; both decide?");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baselines_and_enrolments_are_shared_atomic_and_never_silently_replaced() {
    use phoenix_collector::pgstore::registry::{self, Registered};
    let pg = Postgres::start();
    let a = open(&pg, 5000).await;
    let b = open(&pg, 5000).await;
    let put = |s: Arc<PgStore>, root: &'static str| async move {
        let m = format!(r#"{{"image_id":"img-1","root":"{root}"}}"#);
        s.registry(move |c| {
            Box::pin(async move { registry::put_baseline(c, "img-1", root, &m, 1).await })
        })
        .await
        .unwrap()
    };
    // Collectors registering the same baseline at once (a retried pipeline step through
    // the balancer): exactly one creates it, on separate tasks so the statements overlap.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(put(s, "r1")));
    }
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.unwrap());
    }
    let created = got.iter().filter(|r| **r == Registered::Created).count();
    assert_eq!(created, 1, "{got:?}");
    assert!(got
        .iter()
        .all(|r| matches!(r, Registered::Created | Registered::Unchanged)));
    assert_eq!(
        put(b.clone(), "r2").await,
        Registered::Replaced {
            old_root: "r1".into()
        }
    );
    let all = a
        .registry(|c| Box::pin(registry::baselines(c)))
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    assert!(all[0].1.contains("\"r2\""), "{all:?}");

    let enrol = |s: Arc<PgStore>, body: &'static str| async move {
        s.registry(move |c| Box::pin(registry::enrol(c, "i-001", "instance", body, 5)))
            .await
            .unwrap()
    };
    assert!(enrol(a.clone(), r#"{"key":"k1"}"#).await);
    assert!(
        !enrol(b.clone(), r#"{"key":"attacker"}"#).await,
        "first stands"
    );
    let e = b
        .registry(|c| Box::pin(registry::enrolment(c, "i-001")))
        .await
        .unwrap()
        .expect("enrolled");
    assert_eq!(e.body_json, r#"{"key": "k1"}"#);
    assert!(b
        .registry(|c| Box::pin(registry::revoke(c, "i-001", 9)))
        .await
        .unwrap());
    assert!(!a
        .registry(|c| Box::pin(registry::revoke(c, "i-001", 10)))
        .await
        .unwrap());
    assert_eq!(
        pg.scalar("SELECT revoked_ms FROM phoenix_enrolments WHERE subject = 'i-001'"),
        "9"
    );
}

mod fleet_store {
    //! The fleet core's seam on PostgreSQL (`pgstore::store::PgFleetStore`), driven through
    //! the `FleetStore` trait as the `Fleet` door drives it.

    use super::*;
    use phoenix_collector::fleet::clock::{Now, SystemClock};
    use phoenix_collector::fleet::state::{Figures, Instance, Mark, Observation};
    use phoenix_collector::fleet::{FleetStore, Reason, Snapshot};
    use phoenix_collector::pgstore::store::PgFleetStore;

    fn store(pg: &Postgres) -> Arc<PgFleetStore> {
        let o = PgOptions {
            lease_ttl: Duration::from_millis(1500),
            flush_every: Duration::from_millis(200),
            ..PgOptions::default()
        };
        PgFleetStore::open(&pg.url(), o, Arc::new(SystemClock::new()))
            .unwrap_or_else(|e| panic!("opening: {e}\n{}", pg.log_text()))
    }

    fn obs(id: &str, seq: u64) -> Observation {
        let identity = phoenix_wire::Identity {
            instance_id: id.into(),
            boot_id: "boot-1".into(),
            image_id: "img".into(),
            ..Default::default()
        };
        Observation {
            identity,
            seq,
            interval_ms: 1000,
            at: Now {
                wall_ms: phoenix_collector::pgstore::wall_ms(),
                mono_ms: 123,
            },
            figures: Figures::default(),
            checks: vec![],
            drift: None,
            drift_root: None,
            protected: None,
        }
    }

    fn wait(what: &str, f: impl FnMut() -> Option<()>) {
        assert!(
            phoenix_e2e::wait_for(Duration::from_secs(15), f).is_some(),
            "{what}: not within 15 s"
        );
    }

    /// Tofu enrolments and baselines as the collector wires them (`identity::Gate` and
    /// `baselines::Baselines` over the PostgreSQL stores): the same new id enrolled through
    /// two collectors at once with different credentials enrols once; a reset through one
    /// reaches the other's cache; with PostgreSQL down a known id still verifies and a new
    /// one is refused (503), never enrolled unverified; a baseline registered through one
    /// is read by the other.
    #[test]
    fn shared_enrolments_first_writer_wins_resets_reach_the_other_outage_refuses_new_ones() {
        use phoenix_collector::baselines::Baselines;
        use phoenix_collector::drift::Registration;
        use phoenix_collector::identity::{Admitted, Gate, Limits, Mode, Presented, Refusal};
        let mut pg = Postgres::start();
        let (a, b) = (store(&pg), store(&pg));
        let gate = |s: &Arc<PgFleetStore>| {
            Arc::new(Gate::open(Mode::Tofu, Limits::default(), s.enrolments(), 0).unwrap())
        };
        let (ga, gb) = (gate(&a), gate(&b));
        let cred = |k: usize| format!("{k:0>40}-credential");
        let admit = |g: &Gate, id: &str, c: &str| {
            let p = Presented {
                credential: Some(c),
                ..Default::default()
            };
            g.admit(id, &p, phoenix_collector::pgstore::wall_ms())
        };
        let racers: Vec<_> = (0..8)
            .map(|k| {
                let g = if k % 2 == 0 { ga.clone() } else { gb.clone() };
                std::thread::spawn(move || {
                    let c = cred(k);
                    let p = Presented {
                        credential: Some(&c),
                        ..Default::default()
                    };
                    (k, g.admit("i-race", &p, 1))
                })
            })
            .collect();
        let got: Vec<_> = racers.into_iter().map(|t| t.join().unwrap()).collect();
        let winners: Vec<usize> = got
            .iter()
            .filter(|(_, r)| *r == Ok(Admitted::New))
            .map(|(k, _)| *k)
            .collect();
        assert_eq!(winners.len(), 1, "{got:?}");
        assert!(
            got.iter()
                .all(|(k, r)| *k == winners[0] || matches!(r, Err(Refusal::Forbidden(_)))),
            "{got:?}"
        );
        let w = cred(winners[0]);
        assert_eq!(admit(&ga, "i-race", &w), Ok(Admitted::Known));
        assert_eq!(admit(&gb, "i-race", &w), Ok(Admitted::Known));

        // A reset through a: b drops its cached copy on the notification, and the box
        // with a fresh credential enrols through b.
        assert!(ga.reset("i-race").unwrap());
        let fresh = cred(99);
        wait("b takes the reset", || {
            admit(&gb, "i-race", &fresh).is_ok().then_some(())
        });
        assert!(matches!(
            admit(&ga, "i-race", &w),
            Err(Refusal::Forbidden(_))
        ));

        // A baseline registered through a is read by b.
        let m = phoenix_wire::drift::Manifest {
            version: phoenix_wire::drift::MANIFEST_VERSION,
            hash_version: phoenix_wire::drift::HASH_VERSION,
            image_id: "img-shared".into(),
            created: "2026-01-01T00:00:00Z".into(),
            paths: vec!["/etc".into()],
            excludes: vec![],
            root: phoenix_wire::drift::root_of_entries(&[]),
            entries: vec![],
        };
        let (ba, bb) = (
            Baselines::with_store(a.baselines()).unwrap(),
            Baselines::with_store(b.baselines()).unwrap(),
        );
        assert_eq!(
            ba.register("img-shared", m.clone()).unwrap(),
            Registration::Created
        );
        wait("b reads a's baseline", || bb.get("img-shared").map(|_| ()));
        assert_eq!(
            bb.register("img-shared", m).unwrap(),
            Registration::Unchanged,
            "registered once, through any collector"
        );

        // PostgreSQL down: the enrolled id verifies from memory; a new one is refused.
        pg.down();
        wait("b sees the outage", || {
            (!b.status().unwrap().up).then_some(())
        });
        assert_eq!(admit(&gb, "i-race", &fresh), Ok(Admitted::Known));
        assert!(matches!(
            admit(&gb, "i-new", &cred(5)),
            Err(Refusal::Store(_))
        ));
        assert!(matches!(
            admit(&gb, "i-race", &w),
            Err(Refusal::Forbidden(_))
        ));
        pg.up();
        wait("a new id enrols once PostgreSQL is back", || {
            (admit(&gb, "i-new", &cred(5)) == Ok(Admitted::New)).then_some(())
        });
        assert_eq!(
            pg.scalar("SELECT count(*) FROM phoenix_enrolments WHERE kind = 'tofu'"),
            "2"
        );
    }

    #[test]
    fn reports_cross_collectors_one_decides_its_state_survives_and_an_outage_decides_nothing() {
        let mut pg = Postgres::start();
        let (a, b) = (store(&pg), store(&pg));
        // Exactly one of the two decides (after the lease and the catch-up).
        wait("one decider", || {
            (a.is_decider() ^ b.is_decider()).then_some(())
        });
        let (dec, other) = if a.is_decider() { (&a, &b) } else { (&b, &a) };
        assert!(dec.status().unwrap().up);

        // A report taken by one collector, stored there: the other sees it, stored.
        other.observe(&obs("i-x", 7)).unwrap();
        other.stored("i-x", "boot-1", 7).unwrap();
        let mut seen = Vec::new();
        wait("the decider pulls the other's report", || {
            let p = dec.pull().unwrap();
            seen.extend(p.observations);
            (!p.stored.is_empty()).then_some(())
        });
        let o = seen
            .iter()
            .find(|o| o.identity.instance_id == "i-x")
            .unwrap();
        assert_eq!(o.seq, 7);
        assert_ne!(
            o.at.mono_ms, 123,
            "another process's monotonic reading is translated"
        );

        // The decider's save (a mark) reaches the other, and a fresh collector loads it.
        let mut i = Instance {
            identity: o.identity.clone(),
            ..Default::default()
        };
        i.phx.mark = Some(Mark {
            reason: Reason::Drift,
            evidence: "drifted".into(),
            since_ms: 1,
            since_mono: 1,
            acked_ms: None,
            acked_by: None,
            gone_ms: None,
        });
        let now = Now::of(&SystemClock::new());
        let snap = Snapshot {
            version: phoenix_collector::fleet::store::VERSION,
            saved_ms: now.wall_ms,
            saved_mono: now.mono_ms,
            instances: vec![i],
            queue: Default::default(),
        };
        // A collector that does not decide writes nothing.
        other.save(&snap).unwrap();
        assert_eq!(pg.scalar("SELECT count(*) FROM phoenix_fleet"), "0");
        dec.save(&snap).unwrap();
        assert_eq!(pg.scalar("SELECT count(*) FROM phoenix_fleet"), "1");
        wait("the other takes the decider's mark", || {
            let p = other.pull().unwrap();
            p.phx
                .iter()
                .any(|(id, phx)| id == "i-x" && phx.mark.is_some())
                .then_some(())
        });
        let c = store(&pg);
        let loaded = c.load().unwrap().expect("state in PostgreSQL");
        assert_eq!(loaded.instances.len(), 1);
        assert_eq!(
            loaded.instances[0].phx.mark.as_ref().unwrap().reason,
            Reason::Drift
        );

        // PostgreSQL gone: reports are still taken (buffered), nobody decides, and the
        // status says why.
        pg.kill();
        wait("nobody decides while PostgreSQL is gone", || {
            (!a.is_decider() && !b.is_decider() && !c.is_decider()).then_some(())
        });
        other.observe(&obs("i-y", 1)).unwrap();
        let st = other.status().unwrap();
        wait("the outage is seen", || {
            (!other.status().unwrap().up).then_some(())
        });
        let st2 = other.status().unwrap();
        assert!(
            st2.reason
                .as_deref()
                .unwrap_or("")
                .contains("no instance is marked"),
            "{st:?} {st2:?}"
        );
        assert!(dec.save(&snap).is_ok(), "not deciding: nothing to save");
        // Back: the buffered report arrives, and one decides again.
        pg.up();
        wait("one decider again", || {
            let n = [&a, &b, &c].iter().filter(|s| s.is_decider()).count();
            (n == 1).then_some(())
        });
        wait("the buffered report was flushed", || {
            (pg.scalar("SELECT count(*) FROM phoenix_reports WHERE instance_id = 'i-y'") == "1")
                .then_some(())
        });
    }
}
