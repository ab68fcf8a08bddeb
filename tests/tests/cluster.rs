//! Three collectors sharing one real PostgreSQL (`--fleet-store`), one real influxd, and ten
//! real agents of one group, each given all three collectors in a different order. One
//! scenario, in steps, each asserted on every collector:
//! 1. one drift is marked once (one `mark` audit point in InfluxDB, one fenced `mark` row in
//!    PostgreSQL's `phoenix_audit`) and seen alike through every collector;
//! 2. `kill -9` of the collector holding the lease: another decides within 2× the lease
//!    time, every agent is served by the survivors, nobody healthy is marked, the queue is
//!    unchanged;
//! 3. PostgreSQL stopped for 30 s: `/healthz` says why, nobody decides, points keep flowing,
//!    no marks; the state is intact after;
//! 4. the rest of the group drifts at once: a mass event; marks stay within the drift
//!    budget (`--budget drift=10%,unhealthy=50%`) across the cluster;
//! 5. the surviving collectors restarted together: the state is intact.
//!
//! Before step 1, what lives in PostgreSQL besides fleet state: baselines registered through
//! one collector judge reports taken by all; an instance enrolled (tofu) through one
//! collector is refused (403) to a forger through another; a diagnostics request through one
//! collector is answered by an agent reporting to another and read through a third.
//!
//! A wrong mark destroys a server: every step watches for one the whole time.

use std::time::{Duration, Instant};

use phoenix_e2e::decide::*;
use phoenix_e2e::pg::Postgres;
use phoenix_e2e::trust::CREDENTIAL_HEADER;
use phoenix_e2e::*;
use phoenix_wire::{Identity, Report, VERSION};
use serde_json::Value;

const LEASE_S: u64 = 4;
const AGENTS: usize = 10;
const DB: &str = "cluster";

fn healthz(c: &Collector) -> Value {
    let r = c.get("/healthz", None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn is_decider(c: &Collector) -> bool {
    healthz(c)["decider"] == true
}

fn marked(c: &Collector) -> Vec<String> {
    let mut v = ids_in(&phoenix(c), "marked");
    v.sort();
    v
}

fn ms() -> i64 {
    phoenix_wire::bounds::now_ns() / 1_000_000
}

/// Every live collector, as (index, collector).
fn live(cs: &[Option<Collector>]) -> Vec<(usize, &Collector)> {
    cs.iter()
        .enumerate()
        .filter_map(|(k, c)| c.as_ref().map(|c| (k, c)))
        .collect()
}

fn logs(cs: &[Option<Collector>]) -> String {
    live(cs)
        .iter()
        .map(|(k, c)| format!("--- collector {k} ---\n{}", tail(&c.log_text(), 40)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Panics at the first wrong decision on any live collector: an instance outside `allowed`
/// marked, held or unhealthy, or any other state than drifted/marked for the drifted ones.
fn watch(cs: &[Option<Collector>], d: Duration, healthy: &[&str], marks: &[&str], when: &str) {
    let end = Instant::now() + d;
    loop {
        for (k, c) in live(cs) {
            if let Some(why) = wrong_decision(c, healthy, &[]) {
                panic!("{when}: collector {k}: {why}\n{}", logs(cs));
            }
            let m = marked(c);
            if m.iter().any(|id| !marks.contains(&id.as_str())) {
                panic!(
                    "{when}: collector {k} marked {m:?}, allowed {marks:?}\n{}",
                    logs(cs)
                );
            }
        }
        if Instant::now() >= end {
            return;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn until_all(
    cs: &[Option<Collector>],
    what: &str,
    within: Duration,
    f: impl Fn(&Collector) -> bool,
) {
    let ok = wait_for(within, || live(cs).iter().all(|(_, c)| f(c)).then_some(()));
    if ok.is_none() {
        let (_, c) = live(cs)[0];
        panic!(
            "{what}: not within {within:?}\nqueue: {:#}\n{}",
            phoenix(c),
            logs(cs)
        );
    }
}

#[test]
fn three_collectors_one_postgres_ten_agents_marks_once_survive_kill_9_outage_and_restart() {
    let mut pg = Postgres::start();
    let influx = Influx::start();
    let lease = format!("{LEASE_S}s");
    let flags = [
        "--influx-url",
        &influx.url(),
        "--influx-db",
        DB,
        "--fleet-store",
        &pg.url(),
        "--fleet-lease",
        &lease,
        "--grace",
        "2s",
        "--silent-after",
        "15s",
        "--budget",
        "drift=10%,unhealthy=50%",
    ];
    let mut cs: Vec<Option<Collector>> = (0..3).map(|_| Some(Collector::start(&flags))).collect();
    let urls: Vec<String> = live(&cs).iter().map(|(_, c)| c.url()).collect();

    // One group of two images: the first agent watches a tree of its own (image a), the
    // other nine share one (image b), so one drift and a mass drift are one tamper each.
    // Baselines are registered once, through collector 0: PostgreSQL shares them.
    let trees = [
        Watched::new("img-cl-a", &urls[0]),
        Watched::new("img-cl-b", &urls[0]),
    ];
    let ids: Vec<String> = (0..AGENTS).map(|k| format!("i-cl-{k}")).collect();
    let _agents: Vec<Agent> = (0..AGENTS)
        .map(|k| {
            // Each agent gets all three collectors, starting at a different one.
            let order: Vec<&String> = (0..3).map(|j| &urls[(k + j) % 3]).collect();
            let mut f = trees[usize::from(k > 0)].flags();
            f.extend(["--group".into(), "web".into()]);
            for u in &order[1..] {
                f.extend(["--collector".into(), (*u).clone()]);
            }
            agent(order[0], &ids[k], &f)
        })
        .collect();
    let all: Vec<&str> = ids.iter().map(String::as_str).collect();

    // Up: one decider, everyone healthy through every collector.
    until_all(
        &cs,
        "fleet healthy on every collector",
        Duration::from_secs(60),
        |c| not_healthy(c, &all).is_none(),
    );
    let deciders: Vec<usize> = live(&cs)
        .iter()
        .filter(|(_, c)| is_decider(c))
        .map(|(k, _)| *k)
        .collect();
    assert_eq!(deciders.len(), 1, "exactly one decider: {deciders:?}");
    for (_, c) in live(&cs) {
        let h = healthz(c);
        assert_eq!(h["fleet_store_status"]["up"], true, "{h}");
        assert!(
            h["fleet_store"].as_str().unwrap().starts_with("postgres "),
            "{h}"
        );
    }
    watch(&cs, Duration::from_secs(3), &all, &[], "before any drift");

    // Baselines registered through collector 0 judge the reports every collector takes (a
    // third of the agents report to each first): clean, against the registered baseline.
    until_all(
        &cs,
        "every instance clean against the registered baseline on every collector",
        Duration::from_secs(30),
        |c| {
            all.iter().all(|id| {
                instance(c, id).is_some_and(|i| {
                    i["drift"]["drifted"] == false && i["drift"]["source"] == "registered baseline"
                })
            })
        },
    );

    // Enrolments are shared: agent 0 enrolled through collector 0; a forger holding the agent
    // token but not its credential is refused by collector 1, which never heard from it.
    let victim = instance(cs[0].as_ref().unwrap(), &ids[0]).unwrap();
    let forged: Report = Report {
        v: VERSION,
        agent: Identity {
            instance_id: ids[0].clone(),
            image_id: victim["image_id"].as_str().unwrap().into(),
            group: Some("web".into()),
            hostname: victim["hostname"].as_str().unwrap().into(),
            boot_id: victim["boot_id"].as_str().unwrap().into(),
            version: "0.1.0".into(),
            boot_time: 0,
        },
        seq: 1 << 40,
        drift_root: None,
        protected: None,
        interval_ms: 1000,
        metrics: vec![],
        logs: vec![],
        drift: None,
        checks: vec![],
    };
    let made_up = "f".repeat(64);
    for (what, cred) in [("no credential", None), ("a made-up one", Some(&made_up))] {
        let mut h = vec![
            ("Content-Type", "application/json"),
            ("Content-Encoding", "gzip"),
        ];
        if let Some(c) = cred {
            h.push((CREDENTIAL_HEADER, c.as_str()));
        }
        let r = post(
            &format!("{}/v1/reports", urls[1]),
            Some(AGENT_TOKEN),
            &h,
            &phoenix_wire::encode(&forged),
        );
        assert_eq!(
            r.status, 403,
            "forger with {what} through collector 1: {}",
            r.body
        );
        assert!(r.body.contains("credential"), "{what}: {}", r.body);
    }

    // Diagnostics: asked through collector 0 for agent 1 (which reports to collector 1),
    // answered there, read through collector 2.
    let asked = post(
        &format!("{}/v1/instances/{}/diagnostics", urls[0], ids[1]),
        Some(READER_TOKEN),
        &[("Content-Type", "application/json")],
        b"",
    );
    assert_eq!(asked.status, 202, "{}", asked.body);
    let req = asked.json()["request_id"].as_u64().unwrap();
    let path = format!("/v1/instances/{}/diagnostics", ids[1]);
    let answered = wait_for(Duration::from_secs(30), || {
        let d = cs[2]
            .as_ref()
            .unwrap()
            .get(&path, Some(READER_TOKEN))
            .json();
        (d["latest"]["id"].as_u64() == Some(req)).then_some(d)
    });
    assert!(
        answered.is_some(),
        "diagnostics request {req} not answered across collectors: {}\n{}",
        cs[2].as_ref().unwrap().get(&path, Some(READER_TOKEN)).body,
        logs(&cs)
    );

    // 1. One drift: marked once, seen alike through every collector.
    trees[0].tamper();
    let first = ids[0].as_str();
    until_all(
        &cs,
        "the drifted one marked on every collector",
        Duration::from_secs(30),
        |c| marked(c) == [first],
    );
    for (_, c) in live(&cs) {
        let i = instance(c, first).unwrap();
        assert_eq!(i["state"], "marked", "{i}");
        assert_eq!(i["reason"], "drift", "{i}");
        assert_eq!(i["drift"]["drifted"], true, "{i}");
    }
    let rest: Vec<&str> = all[1..].to_vec();
    watch(
        &cs,
        Duration::from_secs(3),
        &rest,
        &[first],
        "after one drift",
    );
    let audit = format!(
        "SELECT count(detail) FROM phoenix_audit WHERE action = 'mark' AND target = '{first}'"
    );
    let n = wait_for(Duration::from_secs(20), || {
        let n = influx.count(DB, &audit);
        (n >= 1).then_some(n)
    });
    assert_eq!(
        n,
        Some(1),
        "one mark audited across the cluster\n{}",
        logs(&cs)
    );
    // And once in PostgreSQL's own trail, by the decider, under its fence.
    let sql = format!(
        "SELECT count(*) FROM phoenix_audit WHERE action = 'mark' AND instance_id = '{first}' AND fence IS NOT NULL AND actor LIKE 'collector:%'"
    );
    let rows = wait_for(Duration::from_secs(20), || {
        let n: u64 = pg.scalar(&sql).parse().unwrap_or(0);
        (n >= 1).then_some(n)
    });
    assert_eq!(
        rows,
        Some(1),
        "one mark row in phoenix_audit\n{}",
        logs(&cs)
    );
    let queue_before = marked(live(&cs)[0].1);

    // 2. kill -9 of the lease holder: another decides within 2× the lease time.
    let holder = deciders[0];
    let mut dead = cs[holder].take().unwrap();
    let killed_at = Instant::now();
    let killed_ms = ms();
    dead.proc.as_mut().unwrap().kill();
    let took = wait_for(Duration::from_secs(2 * LEASE_S + 5), || {
        live(&cs)
            .iter()
            .any(|(_, c)| is_decider(c))
            .then(|| killed_at.elapsed())
    })
    .expect("nobody took over");
    assert!(
        took <= Duration::from_secs(2 * LEASE_S),
        "takeover took {took:?}, lease {LEASE_S}s\n{}",
        logs(&cs)
    );
    let now_deciding = live(&cs).iter().filter(|(_, c)| is_decider(c)).count();
    assert_eq!(now_deciding, 1, "one decider after the takeover");
    // Every agent is served by the survivors (its last report newer than the kill).
    until_all(
        &cs,
        "every agent served by the survivors",
        Duration::from_secs(30),
        |c| {
            let i = instances(c);
            all.iter().all(|id| {
                i.get(*id)
                    .and_then(|v| v["last_seen_ms"].as_i64())
                    .is_some_and(|t| t > killed_ms + 1000)
            })
        },
    );
    watch(
        &cs,
        Duration::from_secs(5),
        &rest,
        &[first],
        "after the kill -9",
    );
    for (_, c) in live(&cs) {
        assert_eq!(marked(c), queue_before, "queue unchanged by the takeover");
    }

    // 3. PostgreSQL stopped for 30 s.
    let down_ns = phoenix_wire::bounds::now_ns();
    pg.down();
    until_all(
        &cs,
        "healthz says the fleet store is down",
        Duration::from_secs(15),
        |c| {
            let h = healthz(c);
            h["fleet_store_status"]["up"] == false
                && h["fleet_store_status"]["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("no instance is marked"))
                && h["decider"] == false
        },
    );
    watch(
        &cs,
        Duration::from_secs(27),
        &rest,
        &[first],
        "while PostgreSQL is down",
    );
    let up_ns = phoenix_wire::bounds::now_ns();
    pg.up();
    until_all(&cs, "fleet store back", Duration::from_secs(30), |c| {
        healthz(c)["fleet_store_status"]["up"] == true
    });
    let back = wait_for(Duration::from_secs(2 * LEASE_S + 10), || {
        (live(&cs).iter().filter(|(_, c)| is_decider(c)).count() == 1).then_some(())
    });
    assert!(
        back.is_some(),
        "one decider again after the outage\n{}",
        logs(&cs)
    );
    watch(
        &cs,
        Duration::from_secs(8),
        &rest,
        &[first],
        "after PostgreSQL came back",
    );
    for (_, c) in live(&cs) {
        assert_eq!(marked(c), queue_before, "state intact after the outage");
        assert_eq!(instances(c).len(), AGENTS);
    }
    // Points kept flowing: every agent's CPU samples from the outage are in InfluxDB.
    let (from, to) = (down_ns + 2_000_000_000, up_ns - 2_000_000_000);
    let want = ((to - from) / 1_000_000_000) as u64 - 3;
    for id in &all {
        let q = format!(
            "SELECT count(usage_idle) FROM cpu WHERE cpu = 'cpu-total' AND instance_id = '{id}' \
             AND time >= {from} AND time <= {to}"
        );
        let got = wait_for(Duration::from_secs(30), || {
            (influx.count(DB, &q) >= want).then_some(())
        });
        assert!(
            got.is_some(),
            "{id}: {} CPU samples from the outage, wanted {want}",
            influx.count(DB, &q)
        );
    }

    // 4. The rest of the group drifts at once: within the drift budget (1 of 10) across the
    // cluster, whichever collector decides.
    trees[1].tamper();
    until_all(&cs, "a mass event alert", Duration::from_secs(30), |c| {
        let q = phoenix(c);
        q["alerts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["group"] == "web"))
            && ids_in(&q, "held").len() >= AGENTS / 2
    });
    let end = Instant::now() + Duration::from_secs(6);
    while Instant::now() < end {
        for (k, c) in live(&cs) {
            let m = marked(c);
            assert_eq!(
                m,
                queue_before,
                "collector {k}: marks past the budget\n{}",
                logs(&cs)
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let held_before: Vec<Vec<String>> = live(&cs)
        .iter()
        .map(|(_, c)| {
            let mut h = ids_in(&phoenix(c), "held");
            h.sort();
            h
        })
        .collect();
    assert!(
        held_before.windows(2).all(|w| w[0] == w[1]),
        "held alike on every collector: {held_before:?}"
    );

    // 5. The survivors restarted together: the state is intact.
    for c in cs.iter_mut().flatten() {
        c.down();
    }
    for c in cs.iter_mut().flatten() {
        c.up();
    }
    until_all(
        &cs,
        "state intact after the restart",
        Duration::from_secs(30),
        |c| {
            let q = phoenix(c);
            let mut held = ids_in(&q, "held");
            held.sort();
            marked(c) == queue_before
                && held == held_before[0]
                && q["alerts"].as_array().is_some_and(|a| !a.is_empty())
                && instances(c).len() == AGENTS
        },
    );
    for (_, c) in live(&cs) {
        assert_eq!(instance(c, first).unwrap()["state"], "marked");
    }
    let n = influx.count(DB, &audit);
    assert_eq!(
        n,
        1,
        "still one mark audited across the cluster\n{}",
        logs(&cs)
    );
    drop(dead);
}

#[test]
fn a_shared_fleet_store_refuses_generated_tokens_at_start_naming_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin("phoenix-collector"))
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(tmp.path())
        .args(["--agent-token", AGENT_TOKEN])
        .args(["--fleet-store", "postgres://postgres@127.0.0.1:1/phoenix"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("generated tokens are single-node")
            && err.contains("Missing: pipeline, recycler, reader"),
        "{err}"
    );
    assert!(
        !tmp.path().join("tokens").exists(),
        "no token was generated"
    );
}
