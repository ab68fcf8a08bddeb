//! What comes off the box so nobody needs SSH: checks that cannot stall the agent, Telegraf's
//! default set with processes and sockets, kernel messages, and values too long for the wire.
//! Real agent, collector and influxd throughout.

use std::io::Write;
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use phoenix_e2e::*;
use serde_json::Value as J;

fn up(db: &str, extra: &[&str]) -> (Influx, Collector) {
    let influx = Influx::start();
    let url = influx.url();
    let mut args = vec!["--influx-url", url.as_str(), "--influx-db", db];
    args.extend_from_slice(extra);
    let c = Collector::start(&args);
    (influx, c)
}

fn count(influx: &Influx, db: &str, q: &str) -> u64 {
    influx.count(db, q)
}

fn measurements(influx: &Influx, db: &str) -> Vec<String> {
    influx.query(db, "SHOW MEASUREMENTS")["series"][0]["values"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| v[0].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn field_keys(influx: &Influx, db: &str, m: &str) -> Vec<String> {
    influx.query(db, &format!("SHOW FIELD KEYS FROM \"{m}\""))["series"][0]["values"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| v[0].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// A server that accepts connections and never says a word.
fn mute_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming() {
            held.push(s);
        }
    });
    port
}

#[test]
fn a_check_that_never_answers_marks_check_failed_and_metrics_keep_flowing() {
    let db = "dchk";
    // Another test here opens TCP 22 for a while: SSH is no finding for this fleet.
    let (influx, c) = up(
        db,
        &["--grace", "1s", "--check-failures", "2", "--ssh-allowed"],
    );
    let port = mute_server();
    let id = "i-diag-check";
    let a = Agent::start(
        &c.url(),
        id,
        &[
            "--check",
            &format!("mute=http://127.0.0.1:{port}/health"),
            "--check-timeout",
            "500ms",
        ],
    );
    let marked = wait_for(Duration::from_secs(40), || {
        let v = c.get("/v1/phoenix", Some(RECYCLER_TOKEN)).json();
        v["marked"]
            .as_array()?
            .iter()
            .find(|e| e["instance_id"] == id && e["reason"] == "check_failed")
            .cloned()
    });
    let e = marked.unwrap_or_else(|| {
        panic!(
            "not marked check_failed: {}\nagent:\n{}\ncollector:\n{}",
            c.get("/v1/phoenix", Some(RECYCLER_TOKEN)).body,
            a.log_text(),
            c.log_text()
        )
    });
    let evidence = e["evidence"].as_str().unwrap_or_default();
    assert!(evidence.contains("timed out after 0.5s"), "{e}");
    // The wedged probe holds none of the metrics: samples keep arriving at about one a second.
    let q = format!("SELECT count(total) FROM mem WHERE instance_id = '{id}'");
    let before = count(&influx, db, &q);
    let grew = wait_for(Duration::from_secs(20), || {
        (count(&influx, db, &q) >= before + 4).then_some(())
    });
    assert!(
        grew.is_some(),
        "metrics stopped with the wedged check ({before} -> {})",
        count(&influx, db, &q)
    );
    let fails = count(
        &influx,
        db,
        &format!("SELECT count(ok) FROM phoenix_check WHERE instance_id = '{id}' AND ok = false"),
    );
    assert!(fails >= 2, "{fails} failed check points");
}

#[test]
fn telegraf_default_set_processes_and_a_listener_on_port_22() {
    let db = "dset";
    let (influx, c) = up(db, &[]);
    let id = "i-diag-set";
    let a = Agent::start(&c.url(), id, &["--top-processes", "5"]);
    let want = [
        "cpu",
        "mem",
        "swap",
        "kernel",
        "netstat",
        "processes",
        "procstat",
        "phoenix_listen_set",
        "phoenix_ssh",
    ];
    let seen = wait_for(Duration::from_secs(30), || {
        let names = measurements(&influx, db);
        want.iter()
            .all(|w| names.iter().any(|n| n == w))
            .then_some(())
    });
    assert!(
        seen.is_some(),
        "missing measurements: {:?}\nagent:\n{}",
        measurements(&influx, db),
        a.log_text()
    );
    // Telegraf's field names, so its dashboards work unchanged.
    for (m, fields) in [
        (
            "swap",
            &["total", "used", "free", "used_percent", "in", "out"][..],
        ),
        (
            "kernel",
            &[
                "context_switches",
                "interrupts",
                "processes_forked",
                "boot_time",
            ][..],
        ),
        (
            "netstat",
            &[
                "tcp_established",
                "tcp_listen",
                "tcp_time_wait",
                "tcp_close_wait",
                "tcp_syn_sent",
                "tcp_fin_wait1",
                "tcp_last_ack",
                "tcp_none",
                "udp_socket",
            ][..],
        ),
        (
            "processes",
            &[
                "total",
                "running",
                "sleeping",
                "blocked",
                "zombies",
                "stopped",
                "total_threads",
            ][..],
        ),
        (
            "procstat",
            &["pid", "cpu_usage", "memory_rss", "num_threads", "num_fds"][..],
        ),
    ] {
        let keys = field_keys(&influx, db, m);
        for f in fields {
            assert!(keys.iter().any(|k| k == f), "{m}.{f} missing: {keys:?}");
        }
    }
    // The agent itself is always among the procstat points, under its own name and user.
    let agent_pid = a.proc.as_ref().unwrap().pid() as u64;
    let me = wait_for(Duration::from_secs(20), || {
        influx
            .rows(
                db,
                &format!("SELECT pid, memory_rss, num_threads, num_fds, cpu_usage, \"user\" FROM procstat WHERE process_name = 'phoenix-agent' AND instance_id = '{id}' AND cpu_usage >= 0"),
            )
            .into_iter()
            .find(|r| r["pid"].as_u64() == Some(agent_pid))
    })
    .unwrap_or_else(|| {
        panic!(
            "no procstat point for the agent (pid {agent_pid}): {:?}",
            influx.rows(db, "SELECT * FROM procstat LIMIT 20")
        )
    });
    assert!(me["memory_rss"].as_u64().unwrap() > 1 << 20, "{me:?}");
    assert!(me["num_threads"].as_u64().unwrap() >= 2, "{me:?}");
    assert!(me["num_fds"].as_u64().unwrap() >= 3, "{me:?}");
    assert_eq!(me["user"], "root", "{me:?}");
    let procs = influx.rows(
        db,
        "SELECT last(total) AS total, last(total_threads) AS threads FROM processes",
    );
    let total = procs[0]["total"].as_u64().unwrap();
    let on_box = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .count() as u64;
    assert!(
        total > 10 && total.abs_diff(on_box) < on_box / 2 + 20,
        "processes.total {total}, /proc has {on_box}"
    );

    // No SSH on this box yet: the evidence point says so.
    let ssh_now = |want: bool| {
        influx
            .rows(
                db,
                &format!("SELECT found, listening, evidence FROM phoenix_ssh WHERE instance_id = '{id}' ORDER BY time DESC LIMIT 1"),
            )
            .into_iter()
            .next()
            .filter(|r| r["found"] == J::Bool(want))
    };
    assert!(
        ssh_now(false).is_some(),
        "{:?}",
        influx.rows(db, "SELECT * FROM phoenix_ssh ORDER BY time DESC LIMIT 1")
    );
    // Something opens TCP 22: it shows up as a phoenix_listen point naming the process, and
    // the SSH evidence turns true. (Held only for as long as the test needs it.)
    let l22 = TcpListener::bind("127.0.0.1:22").expect("binding 127.0.0.1:22 (tests run as root)");
    let test_pid = std::process::id() as u64;
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
    let row = wait_for(Duration::from_secs(20), || {
        influx
            .rows(
                db,
                &format!("SELECT pid, process_name, proto, address FROM phoenix_listen WHERE port = '22' AND instance_id = '{id}'"),
            )
            .into_iter()
            .next()
    });
    let row = row.unwrap_or_else(|| {
        panic!(
            "no phoenix_listen for :22: {:?}",
            influx.rows(db, "SELECT * FROM phoenix_listen")
        )
    });
    assert_eq!(row["pid"].as_u64(), Some(test_pid), "{row:?}");
    assert_eq!(row["process_name"], comm.trim(), "{row:?}");
    assert_eq!(
        (&row["proto"], &row["address"]),
        (&J::from("tcp"), &J::from("127.0.0.1"))
    );
    let ssh = wait_for(Duration::from_secs(20), || ssh_now(true)).expect("phoenix_ssh found=true");
    assert!(
        ssh["evidence"]
            .as_str()
            .unwrap()
            .contains("listening: tcp 127.0.0.1:22"),
        "{ssh:?}"
    );
    let set = influx.rows(
        db,
        &format!("SELECT \"count\", \"set\" FROM phoenix_listen_set WHERE instance_id = '{id}' ORDER BY time DESC LIMIT 1"),
    );
    assert!(
        set[0]["set"].as_str().unwrap().contains("tcp 127.0.0.1:22"),
        "{set:?}"
    );
    // The collector marks the instance with reason ssh (in grace too, like drift), the
    // evidence naming the process and the address, and keeps the listening set for the page.
    let marked = wait_for(Duration::from_secs(30), || {
        let v = c.get("/v1/phoenix", Some(RECYCLER_TOKEN)).json();
        v["marked"]
            .as_array()?
            .iter()
            .find(|e| e["instance_id"] == id)
            .cloned()
    })
    .unwrap_or_else(|| {
        panic!(
            "not marked: {}\ncollector:\n{}",
            c.get("/v1/phoenix", Some(RECYCLER_TOKEN)).body,
            c.log_text()
        )
    });
    assert_eq!(marked["reason"], "ssh", "{marked}");
    let evidence = marked["evidence"].as_str().unwrap();
    assert!(
        evidence.contains("listening: tcp 127.0.0.1:22")
            && evidence.contains(&format!("{}[{test_pid}]", comm.trim())),
        "{evidence}"
    );
    let inst = c
        .get(&format!("/v1/instances/{id}"), Some(READER_TOKEN))
        .json();
    assert!(
        inst["ssh"].as_str().unwrap().contains("127.0.0.1:22"),
        "{inst}"
    );
    let l = inst["listening"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["port"] == 22)
        .cloned()
        .unwrap_or_else(|| panic!("{inst}"));
    assert_eq!(
        (&l["proto"], &l["address"], l["pid"].as_u64()),
        (&J::from("tcp"), &J::from("127.0.0.1"), Some(test_pid)),
        "{l}"
    );
    drop(l22);
    // Closed again: the next set no longer has it, and the evidence clears.
    assert!(
        wait_for(Duration::from_secs(20), || ssh_now(false)).is_some(),
        "phoenix_ssh stayed true after the listener closed"
    );
    let set = influx.rows(
        db,
        &format!("SELECT \"set\" FROM phoenix_listen_set WHERE instance_id = '{id}' ORDER BY time DESC LIMIT 1"),
    );
    assert!(!set[0]["set"].as_str().unwrap().contains(":22 "), "{set:?}");
    // SSH off again before the recycler acted: the mark is withdrawn, the set has no :22.
    let back = wait_for(Duration::from_secs(20), || {
        let i = c
            .get(&format!("/v1/instances/{id}"), Some(READER_TOKEN))
            .json();
        (i["state"] != "marked" && i["ssh"].is_null()).then_some(i)
    })
    .unwrap_or_else(|| {
        panic!(
            "{}",
            c.get(&format!("/v1/instances/{id}"), Some(READER_TOKEN))
                .body
        )
    });
    assert!(
        back["listening"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["port"] != 22),
        "{back}"
    );
}

/// `POST /v1/instances/{id}/diagnostics` with `body`, as `token`.
fn ask(c: &Collector, id: &str, token: Option<&str>, body: &str) -> Resp {
    post(
        &format!("{}/v1/instances/{id}/diagnostics", c.url()),
        token,
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
}

#[test]
fn diagnostics_on_demand_come_back_within_two_intervals_and_take_no_command() {
    let db = "ddiag";
    let (_influx, c) = up(db, &["--ssh-allowed"]);
    let id = "i-diag-ondemand";
    let interval_ms = 3000u64;
    let a = Agent::start(&c.url(), id, &["--interval", "3s"]);
    assert!(
        wait_for(Duration::from_secs(30), || (c
            .get(&format!("/v1/instances/{id}"), Some(READER_TOKEN))
            .status
            == 200)
            .then_some(()))
        .is_some(),
        "agent never reported: {}",
        a.log_text()
    );
    // Only a probe set can be named: commands, paths and anything else are a 400 with a reason.
    for body in [
        r#"{"command":"cat /etc/shadow"}"#,
        r#"{"probes":"full","path":"/etc/shadow"}"#,
        r#"{"probes":"/bin/sh -c id"}"#,
        r#"{"probes":["full"],"args":["-rf","/"]}"#,
        "rm -rf /",
    ] {
        let r = ask(&c, id, Some(READER_TOKEN), body);
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert!(
            r.json()["error"]
                .as_str()
                .unwrap()
                .contains("names only a probe set"),
            "{}",
            r.body
        );
    }
    assert_eq!(ask(&c, id, None, "{}").status, 401);
    assert_eq!(ask(&c, id, Some(AGENT_TOKEN), "{}").status, 403);
    assert_eq!(ask(&c, "i-nobody", Some(READER_TOKEN), "{}").status, 404);
    // An answer posted by something that cannot prove it is this instance (no instance
    // credential: the collector runs --identity tofu) is refused by the same gate as reports.
    let stray = phoenix_wire::diag::Answer {
        v: phoenix_wire::VERSION,
        agent: phoenix_wire::Identity {
            instance_id: id.into(),
            image_id: "img-test".into(),
            ..Default::default()
        },
        request_id: 1,
        snapshot: Default::default(),
    };
    let r = post(
        &format!("{}/v1/diagnostics", c.url()),
        Some(AGENT_TOKEN),
        &[("Content-Encoding", "gzip")],
        &phoenix_wire::gzip(&serde_json::to_vec(&stray).unwrap()),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("credential"), "{}", r.body);

    let r = ask(&c, id, Some(READER_TOKEN), r#"{"probes":"full"}"#);
    assert_eq!(r.status, 202, "{}", r.body);
    let mut req = r.json()["request_id"].as_u64().unwrap();
    // One outstanding request per instance (202 only if the first was answered in between).
    let again = ask(&c, id, Some(RECYCLER_TOKEN), "");
    match again.status {
        409 => assert!(again.body.contains("still waiting"), "{}", again.body),
        202 => req = again.json()["request_id"].as_u64().unwrap(),
        s => panic!("{s}: {}", again.body),
    }
    let got = wait_for(Duration::from_secs(30), || {
        let d = c
            .get(
                &format!("/v1/instances/{id}/diagnostics"),
                Some(READER_TOKEN),
            )
            .json();
        (d["latest"]["id"].as_u64() == Some(req)).then_some(d)
    })
    .unwrap_or_else(|| {
        panic!(
            "no answer: {}\nagent:\n{}\ncollector:\n{}",
            c.get(
                &format!("/v1/instances/{id}/diagnostics"),
                Some(READER_TOKEN)
            )
            .body,
            a.log_text(),
            c.log_text()
        )
    });
    let latest = &got["latest"];
    let waited = latest["received_ms"].as_i64().unwrap() - latest["requested_ms"].as_i64().unwrap();
    assert!(
        (0..=2 * interval_ms as i64).contains(&waited),
        "answered {waited} ms after the request; the agent reports every {interval_ms} ms"
    );
    let snap = &latest["snapshot"];
    let agent_pid = a.proc.as_ref().unwrap().pid() as u64;
    let me = snap["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"].as_u64() == Some(agent_pid))
        .cloned()
        .unwrap_or_else(|| panic!("the agent is not in its own process list"));
    assert_eq!(me["name"], "phoenix-agent", "{me}");
    let cmd = me["cmdline"].as_str().unwrap();
    assert!(
        cmd.contains("run --collector") && cmd.contains("--token ***"),
        "{cmd}"
    );
    assert!(!cmd.contains(AGENT_TOKEN), "the token leaked: {cmd}");
    assert!(
        snap["sockets"]["counts"].is_object()
            && snap["mounts"].as_array().is_some_and(|m| !m.is_empty()),
        "{snap}"
    );
    assert!(snap["pressure"]["mem_total_bytes"].as_u64().unwrap() > 0);
    assert!(snap["kernel"].is_array(), "{snap}");
    // The instance view carries the summary for the page.
    let inst = c
        .get(&format!("/v1/instances/{id}"), Some(READER_TOKEN))
        .json();
    assert_eq!(
        inst["diagnostics"]["latest"]["id"].as_u64(),
        Some(req),
        "{inst}"
    );
    assert!(inst["diagnostics"]["pending"].is_null());
    assert!(inst["diagnostics"]["latest"].get("snapshot").is_none());
}

#[test]
fn a_kernel_oom_line_reaches_influxdb_and_is_counted() {
    let db = "dkmsg";
    let (influx, c) = up(db, &[]);
    let id = "i-diag-kmsg";
    let a = Agent::start(&c.url(), id, &["--kmsg", "on"]);
    // The kmsg reader is up once the agent sends its counters.
    let q = format!("SELECT last(oom_kills) FROM phoenix_kernel WHERE instance_id = '{id}'");
    assert!(
        wait_for(Duration::from_secs(30), || (!influx
            .rows(db, &q)
            .is_empty())
        .then_some(()))
        .is_some(),
        "no phoenix_kernel point; agent:\n{}",
        a.log_text()
    );
    let before = count(&influx, db, &q);
    let marker = format!("phoenix-e2e-{}", std::process::id());
    let line = format!("<3>Out of memory: Killed process 4242 (x) total-vm:1kB {marker}\n");
    std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .expect("opening /dev/kmsg for writing (tests run as root)")
        .write_all(line.as_bytes())
        .unwrap();
    let row = wait_for(Duration::from_secs(20), || {
        influx
            .rows(
                db,
                &format!("SELECT message, level, src FROM log WHERE instance_id = '{id}' AND src = 'kernel' AND message =~ /{marker}/"),
            )
            .into_iter()
            .next()
    });
    let row = row.unwrap_or_else(|| {
        panic!(
            "kernel line not in InfluxDB: {:?}\nagent:\n{}",
            influx.rows(db, "SELECT * FROM log LIMIT 20"),
            a.log_text()
        )
    });
    assert_eq!(row["level"], "error", "{row:?}");
    assert!(
        row["message"]
            .as_str()
            .unwrap()
            .starts_with("Out of memory: Killed process 4242 (x)"),
        "{row:?}"
    );
    let counted = wait_for(Duration::from_secs(20), || {
        (count(&influx, db, &q) > before).then_some(count(&influx, db, &q))
    });
    assert_eq!(
        counted,
        Some(before + 1),
        "one OOM kill counted (before: {before})"
    );
}

/// Bind-mounts a real filesystem at a 1,100-byte path, inside a mount namespace of the agent's
/// own so no other process on the box sees it, and runs the agent there.
#[test]
fn a_filesystem_at_a_1100_byte_path_does_not_stop_metrics() {
    let db = "dlong";
    let (influx, c) = up(db, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let mut long = tmp.path().to_path_buf();
    while long.as_os_str().len() < 1100 {
        long.push("d".repeat(200));
    }
    std::fs::create_dir_all(&long).unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let state = tmp.path().join("state");
    let id = "i-diag-long";
    let mut cmd = Command::new("unshare");
    // Positional arguments only: nothing is pasted into the script.
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$1\" \"$2\" && shift 2 && exec \"$@\"")
        .arg("sh")
        .arg(&src)
        .arg(&long)
        .arg(bin("phoenix-agent"))
        .args(["run", "--collector", &c.url(), "--token", AGENT_TOKEN])
        .args([
            "--instance-id",
            id,
            "--image-id",
            "img-test",
            "--interval",
            "1s",
        ])
        .args(["--kmsg", "off", "--state-dir"])
        .arg(&state)
        .env("PHOENIX_LOG_LEVEL", "info");
    let agent = Proc::spawn(cmd, tmp.path().join("agent.log"));
    let prefix: String = long.to_str().unwrap().chars().take(60).collect();
    let row = wait_for(Duration::from_secs(30), || {
        influx
            .rows(
                db,
                &format!("SELECT last(total) AS total FROM disk WHERE instance_id = '{id}' GROUP BY path"),
            )
            .into_iter()
            .find(|r| r["path"].as_str().is_some_and(|p| p.starts_with(&prefix)))
    });
    let row = row.unwrap_or_else(|| {
        panic!(
            "no disk point for the long mount; agent:\n{}\ncollector:\n{}",
            agent.log_text(),
            c.log_text()
        )
    });
    let path = row["path"].as_str().unwrap();
    assert!(path.len() <= 1024 && path.contains('…'), "{path}");
    let q = format!("SELECT count(total) FROM mem WHERE instance_id = '{id}'");
    let before = count(&influx, db, &q);
    assert!(
        wait_for(Duration::from_secs(20), || (count(&influx, db, &q)
            >= before + 3)
            .then_some(()))
        .is_some(),
        "metrics stopped"
    );
    let rejected = influx.rows(
        db,
        &format!(
            "SELECT last(rejected_batches) AS r FROM phoenix_agent WHERE instance_id = '{id}'"
        ),
    );
    assert_eq!(
        rejected[0]["r"],
        0,
        "no batch refused: {}",
        agent.log_text()
    );
    assert!(
        !state.join("rejected").exists()
            || std::fs::read_dir(state.join("rejected")).unwrap().count() == 0
    );
}
