//! The replacement decision under ordinary faults, with real agents, collector and influxd.
//! A mark ends with a server destroyed, so each test watches for any wrong decision the whole
//! time (an unhealthy state, a mark, a held mark, a group alert), not only at the end:
//! - InfluxDB down for 30 s while agents report: nobody is blamed, and the outage's metrics
//!   arrive once it is back;
//! - a drifted instance frozen (SIGSTOP) until the collector counts it gone, then thawed:
//!   drifted again within 5 s; a clean one reads clean;
//! - a collector restarted (and one that lost its state) while an instance is drifted;
//! - the collector's wall clock stepped +10 min and back (libfaketime): no marks.
//!
//! The tests run one at a time: each times the collector, and four fleets at once on a small
//! machine would measure the machine.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use phoenix_e2e::decide::*;
use phoenix_e2e::*;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ns() -> i64 {
    phoenix_wire::bounds::now_ns()
}

/// Watch for `d`: panic at the first wrong decision about `ids`.
fn no_wrong_decision_for(c: &Collector, d: Duration, ids: &[&str], groups: &[&str], when: &str) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if let Some(why) = wrong_decision(c, ids, groups) {
            panic!(
                "{when}: {why}\ncollector log (tail):\n{}",
                tail(&c.log_text(), 80)
            );
        }
        std::thread::sleep(Duration::from_millis(400));
    }
}

fn all_healthy(c: &Collector, ids: &[&str], within: Duration, what: &str) {
    until(c, what, within, || {
        not_healthy(c, ids).is_none().then_some(())
    });
}

#[test]
fn influxdb_down_for_30s_blames_no_instance_and_loses_no_metric() {
    let _one = serial();
    let mut influx = Influx::start();
    let db = "decide_outage";
    let c = Collector::start(&[
        "--influx-url",
        &influx.url(),
        "--influx-db",
        db,
        "--grace",
        "2s",
        "--silent-after",
        "4s",
        "--budget",
        "100%",
    ]);
    // A one-instance group and a four-instance one: the shapes the issue saw blamed.
    let ids = ["i-out-solo", "i-out-4a", "i-out-4b", "i-out-4c", "i-out-4d"];
    let groups = ["out-solo", "out-four"];
    let _agents: Vec<Agent> = ids
        .iter()
        .map(|id| {
            let g = if id.ends_with("solo") {
                groups[0]
            } else {
                groups[1]
            };
            Agent::start(&c.url(), id, &["--group", g])
        })
        .collect();
    all_healthy(&c, &ids, Duration::from_secs(60), "fleet up and healthy");
    no_wrong_decision_for(
        &c,
        Duration::from_secs(3),
        &ids,
        &groups,
        "before the outage",
    );

    let down_at = now_ns();
    influx.down();
    no_wrong_decision_for(
        &c,
        Duration::from_secs(30),
        &ids,
        &groups,
        "while InfluxDB is down",
    );
    let up_at = now_ns();
    influx.up();
    // Back: everyone healthy, and no late wrong decision while the backlog drains.
    all_healthy(
        &c,
        &ids,
        Duration::from_secs(60),
        "healthy after the outage",
    );
    no_wrong_decision_for(
        &c,
        Duration::from_secs(5),
        &ids,
        &groups,
        "after the outage",
    );

    // Every agent sampled once a second through the outage; all of it must arrive.
    let (from, to) = (down_at + 1_000_000_000, up_at - 1_000_000_000);
    let want = ((to - from) / 1_000_000_000) as u64 - 2;
    for id in ids {
        let q = format!(
            "SELECT count(usage_idle) FROM cpu WHERE cpu = 'cpu-total' AND instance_id = '{id}' \
             AND time >= {from} AND time <= {to}"
        );
        let got = wait_for(Duration::from_secs(90), || {
            let n = influx.count(db, &q);
            (n >= want).then_some(n)
        });
        assert!(
            got.is_some(),
            "{id}: {} cpu samples from the outage reached InfluxDB, wanted at least {want}\n{}",
            influx.count(db, &q),
            tail(&c.log_text(), 40)
        );
    }
}

#[test]
fn a_drifted_instance_back_from_gone_is_drifted_again_within_5s() {
    let _one = serial();
    let c = Collector::start(&["--grace", "1s", "--silent-after", "3s", "--budget", "100%"]);
    let dirty = Watched::new("img-dec-dirty", &c.url());
    let clean = Watched::new("img-dec-clean", &c.url());
    let (d_id, c_id) = ("i-gone-drifted", "i-gone-clean");
    let mut fd = dirty.flags();
    fd.extend(["--group".into(), "gone-d".into()]);
    let mut fc = clean.flags();
    fc.extend(["--group".into(), "gone-c".into()]);
    let a_dirty = agent(&c.url(), d_id, &fd);
    let a_clean = agent(&c.url(), c_id, &fc);
    all_healthy(&c, &[d_id, c_id], Duration::from_secs(60), "both up");
    until(&c, "both known clean", Duration::from_secs(20), || {
        (drifted(&c, d_id) == Some(false) && drifted(&c, c_id) == Some(false)).then_some(())
    });

    // Tampered, marked, taken by the recycler — which then fails to destroy it.
    dirty.tamper();
    until(
        &c,
        "drifted instance marked",
        Duration::from_secs(30),
        || {
            ids_in(&phoenix(&c), "marked")
                .contains(&d_id.to_string())
                .then_some(())
        },
    );
    ack(&c, d_id);
    // The clean one drops off too: marked silent, acked.
    freeze(&a_clean, true);
    until(
        &c,
        "frozen clean instance marked",
        Duration::from_secs(30),
        || {
            ids_in(&phoenix(&c), "marked")
                .contains(&c_id.to_string())
                .then_some(())
        },
    );
    ack(&c, c_id);
    freeze(&a_dirty, true);
    until(&c, "both gone", Duration::from_secs(30), || {
        let gone = ids_in(&phoenix(&c), "gone");
        (gone.contains(&d_id.to_string()) && gone.contains(&c_id.to_string())).then_some(())
    });

    // Both come back with their memory intact: no new drift event will ever be sent.
    freeze(&a_dirty, false);
    freeze(&a_clean, false);
    let back = Instant::now();
    let mut seen_clean = false;
    // Until its first report after the thaw the collector still shows the gone record; what
    // counts is the verdict on the instance that came back.
    let returned = |id: &str| instance(&c, id).filter(|i| i["state"] != "gone");
    until(
        &c,
        "drifted again after coming back",
        Duration::from_secs(20),
        || {
            let v = returned(d_id)?["drift"]["drifted"].as_bool();
            seen_clean |= v == Some(false);
            (v == Some(true)).then_some(())
        },
    );
    let took = back.elapsed();
    assert!(!seen_clean, "the tampered box read clean on its way back");
    assert!(
        took <= Duration::from_secs(5),
        "drift unknown for {took:?} after the instance came back"
    );
    until(&c, "clean one reads clean", Duration::from_secs(5), || {
        (returned(c_id)?["drift"]["drifted"].as_bool() == Some(false)).then_some(())
    });
    let d = instance(&c, d_id).unwrap();
    assert!(
        d["drift"]["changes"].as_array().is_some_and(|cs| cs
            .iter()
            .any(|x| x["path"].as_str().is_some_and(|p| p.ends_with("app.conf")))),
        "the verdict names the file: {d}"
    );
}

#[test]
fn a_collector_restart_keeps_a_drifted_instance_drifted() {
    let _one = serial();
    let influx = Influx::start();
    let mut c = Collector::start(&[
        "--influx-url",
        &influx.url(),
        "--influx-db",
        "decide_restart",
        "--grace",
        "1s",
        "--silent-after",
        "10s",
        "--budget",
        "100%",
    ]);
    let dirty = Watched::new("img-rs-dirty", &c.url());
    let clean = Watched::new("img-rs-clean", &c.url());
    let (d_id, c_id) = ("i-rs-drifted", "i-rs-clean");
    let _a_dirty = agent(&c.url(), d_id, &dirty.flags());
    let _a_clean = agent(&c.url(), c_id, &clean.flags());
    until(&c, "both known clean", Duration::from_secs(60), || {
        (drifted(&c, d_id) == Some(false) && drifted(&c, c_id) == Some(false)).then_some(())
    });
    dirty.tamper();
    until(&c, "drift seen", Duration::from_secs(20), || {
        (drifted(&c, d_id) == Some(true)).then_some(())
    });

    // Twice: a plain restart, then one whose fleet state is gone (a rebuilt collector host,
    // a lost disk). Either way the agent's next report carries its root, and the verdict
    // must be back within one interval (1 s) plus slack, never clean in between.
    for lose_state in [false, true] {
        let what = if lose_state {
            "restart without its fleet state"
        } else {
            "restart"
        };
        c.down();
        if lose_state {
            for e in std::fs::read_dir(&c.data_dir).unwrap() {
                let p = e.unwrap().path();
                if p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("fleet"))
                {
                    std::fs::remove_file(&p).unwrap();
                }
            }
        }
        c.up();
        let back = Instant::now();
        let mut seen_clean = false;
        until(&c, what, Duration::from_secs(20), || {
            let v = drifted(&c, d_id);
            seen_clean |= v == Some(false);
            (v == Some(true)).then_some(())
        });
        let took = back.elapsed();
        assert!(!seen_clean, "{what}: the tampered box read clean");
        assert!(
            took <= Duration::from_secs(5),
            "{what}: drift unknown for {took:?}"
        );
        until(&c, "the clean one is clean", Duration::from_secs(5), || {
            (drifted(&c, c_id) == Some(false)).then_some(())
        });
    }
}

#[test]
fn a_collector_clock_stepped_10_min_marks_no_one() {
    let _one = serial();
    let influx = Influx::start();
    let db = "decide_clock";
    let clock = FakeClock::new();
    let c = collector_with_clock(
        &[
            "--influx-url",
            &influx.url(),
            "--influx-db",
            db,
            "--grace",
            "2s",
            "--silent-after",
            "4s",
            "--budget",
            "100%",
        ],
        &clock,
    );
    let ids = ["i-clk-3a", "i-clk-3b", "i-clk-3c", "i-clk-solo"];
    let groups = ["clk-three", "clk-solo"];
    let _agents: Vec<Agent> = ids
        .iter()
        .map(|id| {
            let g = if id.ends_with("solo") {
                groups[1]
            } else {
                groups[0]
            };
            Agent::start(&c.url(), id, &["--group", g])
        })
        .collect();
    all_healthy(&c, &ids, Duration::from_secs(60), "fleet up and healthy");
    let off = clock_offset(&c).expect("a Date header");
    assert!(off.abs() <= 2, "fake clock not at real time: {off} s");

    // Only the forward step: after a backward step the test cannot see the collector's clock,
    // because hyper caches its Date header until the (future) next second it computed.
    {
        let (step, what) = (600, "+10 min");
        let reports_before: u64 = instances(&c)
            .values()
            .filter_map(|i| i["reports"].as_u64())
            .sum();
        clock.set_offset(step);
        until(
            &c,
            &format!("clock stepped {what}"),
            Duration::from_secs(10),
            || {
                clock_offset(&c)
                    .is_some_and(|o| (o - step).abs() <= 2)
                    .then_some(())
            },
        );
        no_wrong_decision_for(
            &c,
            Duration::from_secs(20),
            &ids,
            &groups,
            &format!("after stepping the collector's clock {what}"),
        );
        // Reports were taken all along, not just tolerated.
        let reports_after: u64 = instances(&c)
            .values()
            .filter_map(|i| i["reports"].as_u64())
            .sum();
        assert!(
            reports_after >= reports_before + 4 * 10,
            "{what}: only {} reports taken in 20 s",
            reports_after - reports_before
        );
    }
    assert_eq!(not_healthy(&c, &ids), None);
    // The agents' own clocks did not move: their samples are in InfluxDB at real time.
    let q = "SELECT count(usage_idle) FROM cpu WHERE cpu = 'cpu-total' AND time > now() - 1m";
    let n = wait_for(Duration::from_secs(30), || {
        let n = influx.count(db, q);
        (n >= 4 * 30).then_some(n)
    });
    assert!(
        n.is_some(),
        "samples of the last minute: {}",
        influx.count(db, q)
    );
}
