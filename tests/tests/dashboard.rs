//! Every query of the Grafana dashboard, with Grafana's macros filled in the way Grafana fills
//! them, run against a real InfluxDB that real agents wrote to through the real collector:
//! each must parse and return data. Also the template variables' own queries.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use phoenix_e2e::{bin, wait_for, Agent, Collector, Influx, Proc, AGENT_TOKEN, PIPELINE_TOKEN};
use serde_json::Value;

const DB: &str = "phoenix";
const IMAGE: &str = "img-dash.v1";

/// Grafana's regex escaping of a variable value used inside /.../.
fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\^$.|?*+()[]{}/-".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A multi-value variable as Grafana writes it into an InfluxQL regex: (a|b).
fn multi(values: &[&str]) -> String {
    format!(
        "({})",
        values
            .iter()
            .map(|v| regex_escape(v))
            .collect::<Vec<_>>()
            .join("|")
    )
}

fn fill(q: &str, vars: &[(&str, String)]) -> String {
    let mut q = q
        .replace("$timeFilter", "time > now() - 1h")
        .replace("$__interval", "2s");
    for (k, v) in vars {
        q = q.replace(&format!("${k}"), v);
    }
    // A `$` may stay only as a regex anchor, never in front of a name.
    let left = q
        .match_indices('$')
        .any(|(i, _)| q[i + 1..].starts_with(|c: char| c.is_ascii_alphabetic() || c == '_'));
    assert!(!left, "a macro or variable left unfilled: {q}");
    q
}

/// Non-null values other than time and tags in a query result.
fn values(res: &Value) -> usize {
    let mut n = 0;
    for s in res["series"].as_array().into_iter().flatten() {
        let cols: Vec<&str> = s["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        for row in s["values"].as_array().unwrap() {
            n += row
                .as_array()
                .unwrap()
                .iter()
                .zip(&cols)
                .filter(|(v, c)| **c != "time" && !v.is_null())
                .count();
        }
    }
    n
}

#[test]
fn every_dashboard_query_returns_data_from_real_agents() {
    let influx = Influx::start();
    influx.create_db(DB);
    // Both instances are in grace, and instances in grace count against the group's budget
    // (the policy): a budget of the whole group leaves room for b's drift mark.
    let collector = Collector::start(&[
        "--influx-url",
        &influx.url(),
        "--influx-db",
        DB,
        "--budget",
        "100%",
    ]);
    let tmp = tempfile::tempdir().unwrap();

    // One baseline for the image, registered the way an image build does it.
    let watched = |name: &str| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("app.conf"), "listen = 8080\n").unwrap();
        d
    };
    let (dir_a, dir_b) = (watched("a"), watched("b"));
    let baseline = tmp.path().join("baseline.json");
    let o = Command::new(bin("phoenix-agent"))
        .args([
            "bake",
            "--image-id",
            IMAGE,
            "--register",
            &collector.url(),
            "--token",
            PIPELINE_TOKEN,
            "--drift-path",
        ])
        .arg(&dir_a)
        .arg("--out")
        .arg(&baseline)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "bake: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let log = tmp.path().join("app.log");
    std::fs::write(&log, "").unwrap();
    let args: Vec<String> = [
        "--image-id",
        IMAGE,
        "--group",
        "web",
        "--log",
        log.to_str().unwrap(),
        "--log-initial",
        "start",
        "--drift-path",
        dir_a.to_str().unwrap(),
        "--baseline",
        baseline.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    // a also reads kernel messages, from a file standing in for /dev/kmsg (the box's own
    // kernel log stays out of it), for the kernel panels.
    let kmsg = tmp.path().join("kmsg");
    std::fs::write(&kmsg, "").unwrap();
    let mut a_args: Vec<&str> = args.iter().map(String::as_str).collect();
    a_args.extend(["--kmsg", "on", "--kmsg-path", kmsg.to_str().unwrap()]);
    let _a = Agent::start(&collector.url(), "i-dash-a", &a_args);
    // b is a copy of the same image changed by hand: the same path, other content. Its own mount
    // namespace shows it b's directory at a's path.
    std::fs::write(dir_b.join("app.conf"), "listen = 9090\n").unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "set -e; mount --bind \"$1\" \"$2\"; shift 2; exec \"$@\"",
        "sh",
    ]);
    cmd.arg(&dir_b).arg(&dir_a).arg(bin("phoenix-agent"));
    cmd.args([
        "run",
        "--collector",
        &collector.url(),
        "--token",
        AGENT_TOKEN,
        "--instance-id",
        "i-dash-b",
        "--interval",
        "1s",
        "--state-dir",
    ])
    .arg(tmp.path().join("state-b"))
    .args(&args);
    let _b = Proc::spawn(cmd, tmp.path().join("agent-b.log"));
    let lines = [
        "2026-01-01 ERROR payment failed: card declined",
        "2026-01-01 WARN slow upstream 2.5s",
        "2026-01-01 INFO request served",
    ];
    std::fs::write(&log, format!("{}\n", lines.join("\n"))).unwrap();
    // A kernel OOM kill, stamped now (records carry microseconds since boot).
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let oom = "Out of memory: Killed process 4242 (dash) total-vm:1kB";
    let append_kmsg = || {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&kmsg)
            .unwrap();
        writeln!(f, "3,1,{},-;{oom}", (uptime * 1e6) as u64).unwrap();
    };
    // After the reader started (it begins at the end of the buffer on a first start).
    assert!(
        wait_for(Duration::from_secs(30), || (influx.count(
            DB,
            "SELECT count(\"oom_kills\") FROM \"phoenix_kernel\""
        ) >= 1)
            .then_some(()))
        .is_some(),
        "no phoenix_kernel point"
    );
    append_kmsg();

    // Enough samples for derivatives over 2s buckets, and the collector's judgements.
    let ready = wait_for(Duration::from_secs(90), || {
        let n = |q: &str| influx.count(DB, q);
        (n("SELECT count(\"usage_idle\") FROM \"cpu\"") >= 10
            && n("SELECT count(\"message\") FROM \"log\"") >= 6
            && n("SELECT count(\"hash\") FROM \"phoenix_drift\"") >= 2
            && n("SELECT count(\"message\") FROM \"log\" WHERE \"src\" = 'kernel'") >= 1
            && n("SELECT count(\"pid\") FROM \"procstat\"") >= 2
            && n("SELECT count(\"pid\") FROM \"phoenix_listen\"") >= 1
            && n("SELECT count(\"state\") FROM \"phoenix_instance\" WHERE \"marked\" = true") >= 1)
            .then_some(())
    });
    if ready.is_none() {
        let counts: Vec<(&str, u64)> = ["cpu", "log", "phoenix_drift", "phoenix_instance"]
            .iter()
            .map(|m| {
                (
                    *m,
                    influx.count(DB, &format!("SELECT count(*) FROM \"{m}\"")),
                )
            })
            .collect();
        panic!(
            "the fleet never produced every measurement: {counts:?}; collector log:\n{}",
            collector.log_text()
        );
    }
    std::thread::sleep(Duration::from_secs(3));

    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../image-snippets/grafana/dashboards/phoenix-fleet.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let all = vec![
        ("image", ".*".to_string()),
        ("group", ".*".to_string()),
        ("instance", ".*".to_string()),
        ("level", ".*".to_string()),
    ];

    // The template variables first: they must offer what the fleet has.
    let mut var_values = std::collections::BTreeMap::new();
    for v in dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["type"] == "query")
    {
        let name = v["name"].as_str().unwrap();
        let q = fill(v["query"].as_str().unwrap(), &all);
        let res = influx.query(DB, &q);
        assert!(
            res.get("error").is_none(),
            "variable {name}: {q}: {}",
            res["error"]
        );
        let vals: Vec<String> = res["series"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| {
                s["values"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r[1].as_str().unwrap().to_string())
            })
            .collect();
        var_values.insert(name.to_string(), vals);
    }
    assert!(
        var_values["image"].contains(&IMAGE.to_string()),
        "{var_values:?}"
    );
    assert!(
        var_values["group"].contains(&"web".to_string()),
        "{var_values:?}"
    );
    for id in ["i-dash-a", "i-dash-b"] {
        assert!(
            var_values["instance"].contains(&id.to_string()),
            "{var_values:?}"
        );
    }
    assert!(
        var_values["level"].len() >= 3,
        "three levels were logged: {var_values:?}"
    );

    // Then every panel, once with every variable on All and once narrowed the way a user does.
    let error_level = var_values["level"]
        .iter()
        .find(|l| l.eq_ignore_ascii_case("error"))
        .cloned()
        .expect("an error level");
    let narrowed = vec![
        ("image", regex_escape(IMAGE)),
        ("group", "web".to_string()),
        ("instance", multi(&["i-dash-a", "i-dash-b"])),
        ("level", regex_escape(&error_level)),
    ];
    let mut failures = Vec::new();
    let mut ran = 0;
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            for vars in [&all, &narrowed] {
                let q = fill(t["query"].as_str().unwrap(), vars);
                let res = influx.query(DB, &q);
                ran += 1;
                if let Some(e) = res.get("error") {
                    failures.push(format!("{}: {q}\n  error: {e}", p["title"]));
                } else if values(&res) == 0 {
                    failures.push(format!("{}: {q}\n  no data", p["title"]));
                }
            }
        }
    }
    assert!(ran >= 40, "only {ran} queries ran");
    for title in [
        "Processes",
        "Top processes",
        "Listening sockets",
        "SSH found",
        "Kernel events",
        "Kernel lines",
    ] {
        assert!(
            dash["panels"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["title"] == title),
            "no panel {title}"
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {ran} dashboard queries failed:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // The kernel panels show the OOM kill: one line, and the counter at 1 for a.
    let panel_query = |title: &str| {
        let p = dash["panels"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["title"] == title)
            .unwrap();
        fill(p["targets"][0]["query"].as_str().unwrap(), &all)
    };
    let lines = influx.rows(DB, &panel_query("Kernel lines"));
    assert!(
        lines.iter().any(|r| r["message"] == oom
            && r["instance_id"] == "i-dash-a"
            && r["level"] == "error"),
        "{lines:?}"
    );
    let kernel = influx.query(DB, &panel_query("Kernel events"));
    let oom_max = kernel["series"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["tags"]["instance_id"] == "i-dash-a")
        .flat_map(|s| {
            s["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r[1].as_u64().unwrap_or(0))
        })
        .max();
    assert_eq!(oom_max, Some(1), "{kernel}");

    // And the panels say what happened: b is the drifted, marked one; the error line is there.
    let drift = fill(
        dash["panels"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["title"] == "Config drift")
            .unwrap()["targets"][0]["query"]
            .as_str()
            .unwrap(),
        &all,
    );
    let rows = influx.rows(DB, &drift);
    let drifted = |id: &str| {
        rows.iter()
            .find(|r| r["instance_id"] == id)
            .map(|r| r["drifted"].as_bool().unwrap())
    };
    assert_eq!(
        (drifted("i-dash-a"), drifted("i-dash-b")),
        (Some(false), Some(true)),
        "{rows:?}"
    );
    assert!(
        rows.iter().any(|r| r["changed_files"]
            .as_str()
            .is_some_and(|f| f.contains("app.conf"))),
        "{rows:?}"
    );
    let queue = fill(
        dash["panels"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["title"] == "Phoenix queue")
            .unwrap()["targets"][0]["query"]
            .as_str()
            .unwrap(),
        &all,
    );
    let rows = influx.rows(DB, &queue);
    assert_eq!(
        rows.iter()
            .map(|r| r["instance_id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["i-dash-b"],
        "{rows:?}"
    );
    // The queue is the current one: an instance marked earlier and gone since is not in it.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let tags = format!("group=web,image_id={IMAGE},instance_id=i-dash-old,host=old");
    let lines = format!(
        "phoenix_instance,{tags} state=\"marked\",marked=true,reason=\"drift\",evidence=\"x\",held=\"\" {}\nphoenix_instance,{tags} state=\"gone\",marked=false,reason=\"drift\",evidence=\"x\",held=\"\" {}\n",
        now - 60_000_000_000,
        now - 30_000_000_000
    );
    let w = phoenix_e2e::post(
        &format!("{}/write?db={DB}", influx.url()),
        None,
        &[],
        lines.as_bytes(),
    );
    assert_eq!(w.status, 204, "{}", w.body);
    let rows = influx.rows(DB, &queue);
    assert_eq!(
        rows.iter()
            .map(|r| r["instance_id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["i-dash-b"],
        "a mark that is over is not in the current queue: {rows:?}"
    );
    let logs = fill(
        dash["panels"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["title"] == "Log lines")
            .unwrap()["targets"][0]["query"]
            .as_str()
            .unwrap(),
        &narrowed,
    );
    let rows = influx.rows(DB, &logs);
    assert!(
        !rows.is_empty()
            && rows
                .iter()
                // The kernel's OOM line is an error too (priority 3).
                .all(|r| r["path"] == "kernel" || r["message"].as_str().unwrap().contains("ERROR")),
        "level filter: {rows:?}"
    );
}
