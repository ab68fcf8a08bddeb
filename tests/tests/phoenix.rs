//! The phoenix queue end to end: a fleet of 26 instances (3 real agents, 23 driven through the
//! real wire format from a thread) reporting to a real collector and a real influxd, with short
//! rule times. A killed agent, a failing check and a drifted file each get marked; a whole
//! group drifting at once is held with an alert; the webhook's signatures verify; a collector
//! restart keeps the queue; the example ASG recycler (with a fake `aws` on PATH) acks the
//! marks, and acked instances that go silent are gone.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use phoenix_e2e::*;
use phoenix_wire::{DriftState, FileChange, Identity, Point, Report, Value, VERSION};
use serde_json::Value as J;

const DB: &str = "phoenix";
const SECRET: &str = "hook-secret-42";

/// One simulated instance: reports every second while `silent` is false.
#[derive(Default, Clone)]
struct Sim {
    id: String,
    group: String,
    seq: u64,
    drifted: bool,
}

fn sim_report(s: &Sim) -> Report {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let pt = |m: &str, tags: &[(&str, &str)], fields: &[(&str, f64)]| Point {
        m: m.into(),
        tags: tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        fields: fields
            .iter()
            .map(|(k, v)| (k.to_string(), Value::Float(*v)))
            .collect(),
        ts,
    };
    let clean = "c1".repeat(32);
    let drift = if s.group == "batch" {
        let (hash, changes) = if s.drifted {
            (
                "d2".repeat(32),
                vec![FileChange {
                    path: "/etc/app.conf".into(),
                    change: "changed".into(),
                    attrs: vec!["content".into()],
                    values: vec![],
                }],
            )
        } else {
            (clean.clone(), vec![])
        };
        Some(DriftState {
            hash,
            baseline: Some(clean),
            changes,
            entries: 10,
            ts,
            note: None,
            entries_list: None,
            hash_version: None,
            baseline_hash_version: None,
        })
    } else {
        None
    };
    Report {
        v: VERSION,
        agent: Identity {
            instance_id: s.id.clone(),
            image_id: format!("img-{}", s.group),
            group: Some(s.group.clone()),
            hostname: format!("host-{}", s.id),
            boot_id: "boot-1".into(),
            version: "sim".into(),
            boot_time: 0,
        },
        seq: s.seq,
        interval_ms: 1000,
        metrics: vec![
            pt(
                "cpu",
                &[("cpu", "cpu-total")],
                &[
                    ("usage_idle", 90.0),
                    ("usage_user", 8.0),
                    ("usage_system", 2.0),
                ],
            ),
            pt(
                "mem",
                &[],
                &[("used_percent", 40.0), ("available_percent", 60.0)],
            ),
            pt("disk", &[("path", "/")], &[("used_percent", 30.0)]),
        ],
        logs: vec![],
        drift,
        checks: vec![],
        drift_root: None,
        protected: None,
    }
}

/// Drives the simulated instances from a thread until dropped.
struct Fleet {
    sims: Arc<Mutex<Vec<Sim>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Fleet {
    fn start(url: String, sims: Vec<Sim>) -> Fleet {
        let sims = Arc::new(Mutex::new(sims));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2) = (sims.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let body_url = format!("{url}/v1/reports");
            while !st2.load(Ordering::Relaxed) {
                let reports: Vec<Report> = {
                    let mut g = s2.lock().unwrap();
                    g.iter_mut()
                        .map(|s| {
                            s.seq += 1;
                            sim_report(s)
                        })
                        .collect()
                };
                for r in reports {
                    // The collector may be restarting: a lost report is just a missed interval.
                    let cred = phoenix_e2e::trust::harness_credential(&r.agent.instance_id);
                    std::panic::catch_unwind(|| {
                        post(
                            &body_url,
                            Some(AGENT_TOKEN),
                            &[
                                ("Content-Type", "application/json"),
                                ("Content-Encoding", "gzip"),
                                (phoenix_e2e::trust::CREDENTIAL_HEADER, &cred),
                            ],
                            &phoenix_wire::encode(&r),
                        )
                    })
                    .ok();
                }
                std::thread::sleep(Duration::from_millis(1000));
            }
        });
        Fleet {
            sims,
            stop,
            thread: Some(thread),
        }
    }

    fn set_drifted(&self, group: &str) {
        for s in self
            .sims
            .lock()
            .unwrap()
            .iter_mut()
            .filter(|s| s.group == group)
        {
            s.drifted = true;
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().ok();
        }
    }
}

/// A webhook receiver: records each body whose signature openssl (an implementation
/// independent of the collector's) agrees with, and counts the ones it does not.
struct Hook {
    port: u16,
    good: Arc<Mutex<Vec<J>>>,
    bad: Arc<Mutex<Vec<String>>>,
}

fn openssl_hmac(secret: &str, body: &[u8]) -> String {
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", secret, "-r"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl (apt install openssl) computes the expected signature");
    child.stdin.take().unwrap().write_all(body).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

impl Hook {
    fn start() -> Hook {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let good = Arc::new(Mutex::new(Vec::new()));
        let bad = Arc::new(Mutex::new(Vec::new()));
        let (g, b) = (good.clone(), bad.clone());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut c) = conn else { continue };
                let mut r = BufReader::new(c.try_clone().unwrap());
                let (mut len, mut sig) = (0usize, String::new());
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':') {
                        match k.to_ascii_lowercase().as_str() {
                            "content-length" => len = v.trim().parse().unwrap_or(0),
                            "x-phoenix-signature" => sig = v.trim().to_string(),
                            _ => {}
                        }
                    }
                }
                let mut body = vec![0; len];
                if r.read_exact(&mut body).is_err() {
                    continue;
                }
                let want = format!("sha256={}", openssl_hmac(SECRET, &body));
                let ok = sig == want;
                if ok {
                    g.lock()
                        .unwrap()
                        .push(serde_json::from_slice(&body).unwrap());
                } else {
                    b.lock().unwrap().push(format!(
                        "{sig} != {want} for {}",
                        String::from_utf8_lossy(&body)
                    ));
                }
                let status = if ok { "200 OK" } else { "401 Unauthorized" };
                write!(
                    c,
                    "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                )
                .ok();
            }
        });
        Hook { port, good, bad }
    }
}

/// An HTTP server answering every request with 500: the failing service behind a check.
fn broken_service() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut buf = [0u8; 4096];
            // Only to let the client finish sending; what it sent does not matter.
            let _n = c.read(&mut buf);
            c.write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\nconnection: close\r\n\r\nboom").ok();
        }
    });
    port
}

fn phoenix(c: &Collector) -> J {
    let r = c.get("/v1/phoenix", Some(RECYCLER_TOKEN));
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn entry<'a>(list: &'a J, id: &str) -> Option<&'a J> {
    list.as_array()?.iter().find(|e| e["instance_id"] == id)
}

/// Wait until `GET /v1/phoenix` satisfies `ok`.
fn until(c: &Collector, what: &str, secs: u64, ok: impl Fn(&J) -> bool) -> J {
    wait_for(Duration::from_secs(secs), || {
        Some(phoenix(c)).filter(|v| ok(v))
    })
    .unwrap_or_else(|| {
        panic!(
            "{what}: not seen; queue now: {:#}\ncollector log:\n{}",
            phoenix(c),
            c.log_text()
        )
    })
}

fn marked_with(v: &J, id: &str, reason: &str) -> bool {
    entry(&v["marked"], id).is_some_and(|e| e["reason"] == reason)
}

/// (id, reason, state) of every mark, for before/after comparisons.
fn marks(v: &J) -> Vec<(String, String, String, String)> {
    let mut m: Vec<_> = v["marked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["instance_id"].as_str().unwrap().to_string(),
                e["reason"].as_str().unwrap().to_string(),
                e["state"].as_str().unwrap().to_string(),
                e["since_ms"].to_string(),
            )
        })
        .collect();
    m.sort();
    m
}

fn bake(tree: &Path, out: &Path, image: &str, collector: &str) {
    let o = Command::new(bin("phoenix-agent"))
        .arg("bake")
        .arg("--drift-path")
        .arg(tree)
        .args(["--image-id", image, "--out"])
        .arg(out)
        .args(["--register", collector, "--token", PIPELINE_TOKEN])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "bake: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn recycler_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("image-snippets/recycler/asg-recycler.sh")
}

#[test]
fn a_fleet_gets_its_sick_instances_marked_safely_and_recycled() {
    let influx = Influx::start();
    let hook = Hook::start();
    let hook_url = format!("http://127.0.0.1:{}/phoenix", hook.port);
    let mut c = Collector::start(&[
        "--influx-url",
        &influx.url(),
        "--influx-db",
        DB,
        "--grace",
        "3s",
        "--silent-after",
        "3s",
        "--check-failures",
        "2",
        "--budget",
        "20%",
        "--webhook",
        &hook_url,
        "--webhook-secret",
        SECRET,
    ]);

    // Group web: 3 real agents and 17 simulated ones (budget 20 % of 20: 4).
    let (killed, checked, drifter) = (
        "i-00000000000000a01",
        "i-00000000000000a02",
        "i-00000000000000a03",
    );
    let mut a_killed = Agent::start(&c.url(), killed, &["--group", "web"]);
    let svc = broken_service();
    let mut a_checked = Agent::start(
        &c.url(),
        checked,
        &[
            "--group",
            "web",
            "--check",
            &format!("web=http://127.0.0.1:{svc}/health"),
        ],
    );
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("app.conf"), "listen = 8080\n").unwrap();
    let baseline = tmp.path().join("baseline.json");
    bake(&tree, &baseline, "img-web-drift", &c.url());
    let _a_drifter = Agent::start(
        &c.url(),
        drifter,
        &[
            "--group",
            "web",
            "--image-id",
            "img-web-drift",
            "--drift-path",
            tree.to_str().unwrap(),
            "--baseline",
            baseline.to_str().unwrap(),
        ],
    );
    let mut sims: Vec<Sim> = (0..17)
        .map(|k| Sim {
            id: format!("i-0000000000000b0{k:02x}"),
            group: "web".into(),
            ..Default::default()
        })
        .collect();
    // Group batch: 6 simulated instances, clean at first.
    sims.extend((0..6).map(|k| Sim {
        id: format!("i-0000000000000c0{k:02x}"),
        group: "batch".into(),
        ..Default::default()
    }));
    let fleet = Fleet::start(c.url(), sims);

    // Everyone reports and leaves the grace period healthy; the failing check is the exception.
    let all_healthy = wait_for(Duration::from_secs(60), || {
        let r = c.get("/v1/instances", Some(READER_TOKEN)).json();
        let list = r["instances"].as_array()?.clone();
        let states: BTreeMap<String, String> = list
            .iter()
            .map(|i| {
                (
                    i["instance_id"].as_str().unwrap().to_string(),
                    i["state"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        (states.len() == 26
            && states
                .iter()
                .filter(|(id, _)| id.as_str() != checked)
                .all(|(_, s)| s == "healthy"))
        .then_some(states)
    });
    assert!(
        all_healthy.is_some(),
        "fleet not up and healthy: {}\n{}",
        c.get("/v1/instances", Some(READER_TOKEN)).body,
        c.log_text()
    );

    // A failing check: marked once it failed twice in a row after the grace period.
    let v = until(&c, "failing check marked", 30, |v| {
        marked_with(v, checked, "check_failed")
    });
    let e = entry(&v["marked"], checked).unwrap();
    assert_eq!(
        (e["state"].as_str(), e["group"].as_str()),
        (Some("marked"), Some("web"))
    );
    assert!(
        e["evidence"]
            .as_str()
            .unwrap()
            .starts_with("check web failed")
            && e["evidence"].as_str().unwrap().contains("HTTP 500"),
        "{e}"
    );

    // A killed agent: marked silent after --silent-after.
    a_killed.kill();
    let t = std::time::Instant::now();
    let v = until(&c, "killed agent marked silent", 30, |v| {
        marked_with(v, killed, "silent")
    });
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "marked before --silent-after 3s (+ up to one interval) could pass: {took:?}"
    );
    assert!(
        entry(&v["marked"], killed).unwrap()["evidence"]
            .as_str()
            .unwrap()
            .starts_with("silent for"),
        "{v}"
    );
    eprintln!("kill to mark: {took:?}");

    // A hand-edited file: marked for drift, with the file named.
    std::fs::write(tree.join("app.conf"), "listen = 9090\n").unwrap();
    let v = until(&c, "drifted agent marked", 30, |v| {
        marked_with(v, drifter, "drift")
    });
    let ev = entry(&v["marked"], drifter).unwrap()["evidence"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        ev.contains("app.conf (content)") && ev.contains("registered baseline"),
        "{ev}"
    );
    assert_eq!(
        v["marked"].as_array().unwrap().len(),
        3,
        "nothing else marked: {v:#}"
    );

    // The whole batch group drifts at once: a mass event, nothing marked, an alert.
    fleet.set_drifted("batch");
    let v = until(&c, "mass drift alert", 30, |v| {
        v["alerts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a["group"] == "batch" && a["bad"] == 6))
    });
    let alert = v["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["group"] == "batch")
        .unwrap()
        .clone();
    assert!(
        alert["message"]
            .as_str()
            .unwrap()
            .contains("6 of 6 instances in group batch"),
        "{alert}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let v = phoenix(&c);
    assert!(
        v["marked"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["group"] != "batch"),
        "no batch instance marked: {v:#}"
    );
    let held: Vec<&J> = v["held"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["group"] == "batch")
        .collect();
    assert_eq!(held.len(), 6, "{v:#}");
    assert!(
        held.iter().all(|h| h["reason"] == "drift"
            && h["hold"]
                .as_str()
                .unwrap()
                .starts_with("mass event in group batch")),
        "{held:?}"
    );
    assert!(c.log_text().contains("mass event"), "the alert is logged");
    let web = v["budget"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["group"] == "web")
        .unwrap()
        .clone();
    assert_eq!(
        (
            web["size"].as_u64(),
            web["allowed"].as_u64(),
            web["marked"].as_u64()
        ),
        (Some(20), Some(4), Some(3)),
        "{web}"
    );

    // The webhook got each mark and the alert, every signature checked out.
    let got = wait_for(Duration::from_secs(15), || {
        let g = hook.good.lock().unwrap();
        let marks: Vec<String> = g
            .iter()
            .filter(|e| e["event"] == "mark")
            .map(|e| e["instance_id"].as_str().unwrap().to_string())
            .collect();
        (marks.len() >= 3
            && g.iter()
                .any(|e| e["event"] == "alert" && e["group"] == "batch"))
        .then(|| g.clone())
    });
    assert!(
        got.is_some(),
        "webhook events: {:?}; bad signatures: {:?}",
        hook.good.lock().unwrap(),
        hook.bad.lock().unwrap()
    );
    assert!(
        hook.bad.lock().unwrap().is_empty(),
        "{:?}",
        hook.bad.lock().unwrap()
    );
    let got = got.unwrap();
    for id in [killed, checked, drifter] {
        let e = got
            .iter()
            .find(|e| e["instance_id"] == id)
            .unwrap_or_else(|| panic!("no webhook for {id}: {got:?}"));
        assert_eq!(e["group"], "web");
        assert!(!e["evidence"].as_str().unwrap().is_empty());
    }

    // Grafana's view: states and marks in InfluxDB.
    let rows = wait_for(Duration::from_secs(15), || {
        let rows = influx.rows(DB, "SELECT last(marked) AS marked, last(state) AS state, last(reason) AS reason FROM phoenix_instance GROUP BY instance_id");
        (rows.iter().filter(|r| r["marked"] == true).count() == 3).then_some(rows)
    })
    .unwrap_or_else(|| panic!("phoenix_instance: {:?}", influx.rows(DB, "SELECT last(marked) FROM phoenix_instance GROUP BY instance_id")));
    assert_eq!(rows.len(), 26);
    let row = rows.iter().find(|r| r["instance_id"] == checked).unwrap();
    assert_eq!(
        (row["state"].as_str(), row["reason"].as_str()),
        (Some("marked"), Some("check_failed"))
    );
    assert!(rows
        .iter()
        .filter(|r| r["instance_id"]
            .as_str()
            .unwrap()
            .starts_with("i-0000000000000c"))
        .all(|r| r["state"] == "drifted" && r["marked"] == false));
    assert!(
        influx.count(
            DB,
            "SELECT count(active) FROM phoenix_alert WHERE \"group\" = 'batch'"
        ) >= 1
    );
    // The audit trail names every mark and the held group, by the collector's own name.
    let audit = influx.rows(
        DB,
        "SELECT action, target, token, detail FROM phoenix_audit",
    );
    for id in [killed, checked, drifter] {
        assert!(
            audit
                .iter()
                .any(|r| r["action"] == "mark" && r["target"] == id),
            "no audit of the mark on {id}: {audit:?}"
        );
    }
    assert!(
        audit
            .iter()
            .any(|r| r["action"] == "hold" && r["target"] == "batch"),
        "{audit:?}"
    );
    // The failing check's results are in InfluxDB too.
    assert!(influx.count(DB, &format!("SELECT count(ok) FROM phoenix_check WHERE instance_id = '{checked}' AND ok = false")) >= 2);

    // Restart the collector: the same marks, the same alert, and duplicates still dropped.
    let before = phoenix(&c);
    c.down();
    c.up();
    let after = phoenix(&c);
    assert_eq!(
        marks(&after),
        marks(&before),
        "before: {before:#}\nafter: {after:#}"
    );
    assert_eq!(after["alerts"][0]["group"], "batch");
    assert_eq!(
        after["alerts"][0]["since_ms"], before["alerts"][0]["since_ms"],
        "the same alert, not a new one"
    );
    let seq = fleet.sims.lock().unwrap()[0].seq;
    let mut old = sim_report(&Sim {
        id: "i-0000000000000b000".into(),
        group: "web".into(),
        seq: seq - 1,
        drifted: false,
    });
    old.seq = seq - 1;
    let r = c.post_report(&old);
    assert_eq!(
        (r.status, r.json()["duplicate"].as_bool()),
        (200, Some(true)),
        "{}",
        r.body
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        marks(&phoenix(&c)),
        marks(&before),
        "a pass after the restart changes nothing"
    );
    assert!(!phoenix(&c)["alerts"].as_array().unwrap().is_empty());

    // The example recycler, with a fake aws that records its arguments.
    let bin_dir = tmp.path().join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let aws_log = tmp.path().join("aws.log");
    let fake = bin_dir.join("aws");
    std::fs::write(
        &fake,
        "#!/bin/sh\nprintf '%s|' \"$@\" >> \"$AWS_LOG\"\nprintf '\\n' >> \"$AWS_LOG\"\n",
    )
    .unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&fake).unwrap().permissions(),
        0o755,
    );
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap());
    let out = Command::new("bash")
        .arg(recycler_script())
        .arg("--once")
        .env("PATH", &path)
        .env("AWS_LOG", &aws_log)
        .env("PHOENIX_URL", c.url())
        .env("PHOENIX_RECYCLER_TOKEN", RECYCLER_TOKEN)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "recycler: {stderr}");
    assert!(
        stderr.contains("mass event") || stderr.contains("alert"),
        "the recycler shows the alert: {stderr}"
    );
    assert!(
        stderr.contains("; marked at 20"),
        "the recycler names when each mark was made (since_at): {stderr}"
    );
    let calls = std::fs::read_to_string(&aws_log).unwrap();
    let mut calls: Vec<&str> = calls.lines().collect();
    calls.sort();
    let want: Vec<String> = {
        let mut w: Vec<String> = [killed, checked, drifter].iter().map(|id| format!("autoscaling|set-instance-health|--instance-id|{id}|--health-status|Unhealthy|--no-should-respect-grace-period|")).collect();
        w.sort();
        w
    };
    assert_eq!(calls, want);
    let v = phoenix(&c);
    for id in [killed, checked, drifter] {
        let e = entry(&v["marked"], id)
            .or_else(|| entry(&v["gone"], id))
            .unwrap_or_else(|| panic!("{id} missing: {v:#}"));
        assert!(e["state"] == "acked" || e["state"] == "gone", "{e}");
    }
    // A second run has nothing left to do.
    let out = Command::new("bash")
        .arg(recycler_script())
        .arg("--once")
        .env("PATH", &path)
        .env("AWS_LOG", &aws_log)
        .env("PHOENIX_URL", c.url())
        .env("PHOENIX_RECYCLER_TOKEN", RECYCLER_TOKEN)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        std::fs::read_to_string(&aws_log).unwrap().lines().count(),
        3,
        "no second call"
    );

    // Acked and silent: gone, and the budget is free again. The one still running stays acked.
    a_checked.kill();
    let v = until(&c, "acked instances gone", 30, |v| {
        entry(&v["gone"], killed).is_some() && entry(&v["gone"], checked).is_some()
    });
    assert_eq!(entry(&v["marked"], drifter).unwrap()["state"], "acked");
    let web = v["budget"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["group"] == "web")
        .unwrap()
        .clone();
    assert_eq!(
        (
            web["size"].as_u64(),
            web["acked"].as_u64(),
            web["marked"].as_u64()
        ),
        (Some(18), Some(1), Some(0)),
        "{web}"
    );
    // The ack API: 404 for an instance that is not marked, 401 without the token, 403 for a reader.
    let ack = |id: &str, tok: Option<&str>| {
        post(&format!("{}/v1/phoenix/{id}/ack", c.url()), tok, &[], b"")
    };
    assert_eq!(ack("i-0000000000000b000", Some(RECYCLER_TOKEN)).status, 404);
    assert_eq!(ack(drifter, None).status, 401);
    assert_eq!(ack(drifter, Some(READER_TOKEN)).status, 403);
    assert_eq!(c.get("/v1/phoenix", Some(AGENT_TOKEN)).status, 403);
    // A reader may read the queue it sees on the page, and its times carry units.
    let q = c.get("/v1/phoenix", Some(READER_TOKEN));
    assert_eq!(q.status, 200, "{}", q.body);
    let q = q.json();
    let m = entry(&q["marked"], drifter)
        .or_else(|| entry(&q["gone"], drifter))
        .unwrap_or_else(|| panic!("{drifter} missing: {q:#}"));
    assert!(
        m["since_ms"].as_i64().is_some() && m.get("since").is_none(),
        "{m}"
    );
    assert!(
        m["since_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z') && t.contains('T')),
        "{m}"
    );
    assert!(
        q["budget"]["max_share"].as_f64().is_some(),
        "{}",
        q["budget"]
    );
    drop(fleet);
}

#[test]
fn log_only_marks_nothing_and_shows_what_it_would_mark() {
    let c = Collector::start(&["--grace", "1s", "--silent-after", "2s", "--log-only"]);
    let sims: Vec<Sim> = (0..4)
        .map(|k| Sim {
            id: format!("i-00000000000000d0{k}"),
            group: "batch".into(),
            ..Default::default()
        })
        .collect();
    let fleet = Fleet::start(c.url(), sims);
    until(&c, "fleet up", 30, |_| {
        c.get("/v1/instances", Some(READER_TOKEN)).json()["instances"]
            .as_array()
            .is_some_and(|l| l.len() == 4 && l.iter().all(|i| i["state"] == "healthy"))
    });
    fleet.sims.lock().unwrap()[0].drifted = true;
    let v = until(&c, "would-be mark", 30, |v| {
        entry(&v["held"], "i-00000000000000d00").is_some_and(|h| {
            h["hold"] != J::Null && !h["hold"].as_str().unwrap().starts_with("settling")
        })
    });
    assert_eq!(v["log_only"], true);
    assert!(v["marked"].as_array().unwrap().is_empty());
    let h = entry(&v["held"], "i-00000000000000d00").unwrap();
    assert_eq!(
        (h["reason"].as_str(), h["hold"].as_str()),
        (Some("drift"), Some("log-only: would be marked"))
    );
    assert!(
        c.log_text()
            .contains("log-only: would mark for replacement"),
        "{}",
        c.log_text()
    );
    assert_eq!(
        post(
            &format!("{}/v1/phoenix/i-00000000000000d00/ack", c.url()),
            Some(RECYCLER_TOKEN),
            &[],
            b""
        )
        .status,
        404
    );
}
