//! Config drift end to end: bake and register a baseline, run a real agent over the tree,
//! change it by hand in every way, and watch the collector see it within 2 s — and see it
//! clean again when the change is undone.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use phoenix_e2e::*;
use phoenix_wire::{DriftState, FileEntry, Identity, Report, VERSION};

fn bake(
    tree: &Path,
    out: &Path,
    image: &str,
    collector: &str,
    token: &str,
) -> std::process::Output {
    Command::new(bin("phoenix-agent"))
        .arg("bake")
        .arg("--drift-path")
        .arg(tree)
        .args(["--image-id", image])
        .arg("--out")
        .arg(out)
        .args(["--register", collector, "--token", token])
        .output()
        .unwrap()
}

fn drift_of(c: &Collector, id: &str) -> Option<serde_json::Value> {
    let r = c.get(&format!("/v1/instances/{id}"), Some(READER_TOKEN));
    (r.status == 200)
        .then(|| r.json()["drift"].clone())
        .filter(|d| !d.is_null())
}

/// Wait until the collector's verdict satisfies `ok`; the time it took.
fn until(c: &Collector, id: &str, what: &str, ok: impl Fn(&serde_json::Value) -> bool) -> Duration {
    let t = Instant::now();
    let got = wait_for(Duration::from_secs(10), || {
        drift_of(c, id).filter(|d| ok(d))
    });
    assert!(
        got.is_some(),
        "{what}: collector never showed it; last: {:?}\n{}",
        drift_of(c, id),
        c.log_text()
    );
    t.elapsed()
}

fn changed(d: &serde_json::Value, file: &str, attr: &str) -> bool {
    d["drifted"] == true
        && d["changes"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| {
                c["path"].as_str().is_some_and(|p| p.ends_with(file))
                    && (c["change"] == attr
                        || c["attrs"]
                            .as_array()
                            .is_some_and(|a| a.iter().any(|x| x == attr)))
            })
        })
}

#[test]
fn every_kind_of_change_is_seen_within_two_seconds_and_undoing_it_is_clean() {
    let influx = Influx::start();
    let c = Collector::start(&["--influx-url", &influx.url(), "--influx-db", "drift"]);
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("etc");
    std::fs::create_dir_all(tree.join("app")).unwrap();
    std::fs::write(tree.join("app/app.conf"), "listen = 8080\n").unwrap();
    std::fs::write(tree.join("app/db.conf"), "host = db\n").unwrap();
    std::os::unix::fs::symlink("app/app.conf", tree.join("current.conf")).unwrap();
    let base = tmp.path().join("baseline.json");
    let out = bake(&tree, &base, "img-drift", &c.url(), PIPELINE_TOKEN);
    assert!(
        out.status.success(),
        "bake: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A long interval: drift updates must go out at once, not with the next metrics.
    let _a = Agent::start(
        &c.url(),
        "i-drift-1",
        &[
            "--image-id",
            "img-drift",
            "--baseline",
            base.to_str().unwrap(),
            "--interval",
            "30s",
        ],
    );
    until(&c, "i-drift-1", "clean at start", |d| {
        d["drifted"] == false && d["source"] == "registered baseline"
    });

    let mut worst = Duration::ZERO;
    let mut step = |what: &str, change: &dyn Fn(), ok: &dyn Fn(&serde_json::Value) -> bool| {
        change();
        let took = until(&c, "i-drift-1", what, ok);
        worst = worst.max(took);
        assert!(took < Duration::from_secs(2), "{what}: took {took:?}");
    };
    let app = tree.join("app/app.conf");
    let db = tree.join("app/db.conf");
    let clean = |d: &serde_json::Value| d["drifted"] == false;
    step(
        "content changed",
        &|| std::fs::write(&app, "listen = 9090\n").unwrap(),
        &|d| changed(d, "app/app.conf", "content"),
    );
    step(
        "content restored",
        &|| std::fs::write(&app, "listen = 8080\n").unwrap(),
        &clean,
    );
    step(
        "mode changed",
        &|| std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600)).unwrap(),
        &|d| changed(d, "app/db.conf", "mode"),
    );
    step(
        "mode restored",
        &|| std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap(),
        &clean,
    );
    step(
        "file added",
        &|| std::fs::write(tree.join("app/backdoor.conf"), "x").unwrap(),
        &|d| changed(d, "app/backdoor.conf", "added"),
    );
    step(
        "added file removed",
        &|| std::fs::remove_file(tree.join("app/backdoor.conf")).unwrap(),
        &clean,
    );
    step(
        "file removed",
        &|| std::fs::remove_file(&db).unwrap(),
        &|d| changed(d, "app/db.conf", "removed"),
    );
    step(
        "file put back",
        &|| {
            std::fs::write(&db, "host = db\n").unwrap();
            std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        },
        &clean,
    );
    step(
        "symlink retargeted",
        &|| {
            std::fs::remove_file(tree.join("current.conf")).unwrap();
            std::os::unix::fs::symlink("app/db.conf", tree.join("current.conf")).unwrap();
        },
        &|d| changed(d, "current.conf", "target"),
    );
    eprintln!("slowest change-to-collector time: {worst:?}");

    // InfluxDB has the verdicts for Grafana, with the changed files named.
    let rows = influx.rows(
        "drift",
        "SELECT drifted, changed_files, expected, hash FROM phoenix_drift WHERE drifted = true",
    );
    assert!(
        rows.iter().any(|r| r["changed_files"]
            .as_str()
            .unwrap_or("")
            .contains("app.conf")),
        "{rows:?}"
    );
    assert!(
        influx.count(
            "drift",
            "SELECT count(hash) FROM phoenix_drift WHERE drifted = false"
        ) >= 4
    );
}

/// The `{old, new}` of `attr` in the change of the file ending in `file`, if shown.
fn value_of(d: &serde_json::Value, file: &str, attr: &str) -> Option<(String, String)> {
    let c = d["changes"]
        .as_array()?
        .iter()
        .find(|c| c["path"].as_str().is_some_and(|p| p.ends_with(file)))?;
    let v = c["values"].as_array()?.iter().find(|v| v["attr"] == attr)?;
    Some((
        v["old"].as_str()?.to_string(),
        v["new"].as_str()?.to_string(),
    ))
}

#[test]
fn a_change_shows_old_and_new_values_and_never_the_contents() {
    let c = Collector::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    let conf = tree.join("app.conf");
    std::fs::write(&conf, "password = hunter2\n").unwrap();
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).unwrap();
    let base = tmp.path().join("baseline.json");
    let out = bake(&tree, &base, "img-values", &c.url(), PIPELINE_TOKEN);
    assert!(
        out.status.success(),
        "bake: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let baked = std::fs::read_to_string(&base).unwrap();
    assert!(
        baked.contains("\"size\": 19"),
        "the manifest records sizes: {baked}"
    );
    let id = "i-drift-values";
    let _a = Agent::start(
        &c.url(),
        id,
        &[
            "--image-id",
            "img-values",
            "--baseline",
            base.to_str().unwrap(),
            "--interval",
            "30s",
        ],
    );
    until(&c, id, "clean at start", |d| d["drifted"] == false);

    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o666)).unwrap();
    until(&c, id, "mode old -> new", |d| {
        value_of(d, "app.conf", "mode").is_some()
    });
    let d = drift_of(&c, id).unwrap();
    assert_eq!(
        value_of(&d, "app.conf", "mode"),
        Some(("0644".into(), "0666".into())),
        "{d:#}"
    );
    // Drift times carry their unit and an RFC 3339 twin.
    assert!(
        d["ts_ns"]
            .as_i64()
            .is_some_and(|t| t > 1_000_000_000_000_000_000),
        "{d}"
    );
    assert!(d["ts_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{d}");
    assert!(d["since_at"].as_str().is_some(), "{d}");

    std::fs::write(&conf, "password = s3cret-longer\n").unwrap();
    until(&c, id, "content old -> new", |d| {
        value_of(d, "app.conf", "content").is_some()
    });
    let d = drift_of(&c, id).unwrap();
    let (old, new) = value_of(&d, "app.conf", "content").unwrap();
    let hex12 = |h: &str| h.len() == 12 && h.chars().all(|c| c.is_ascii_hexdigit());
    assert!(hex12(&old) && hex12(&new) && old != new, "{old} -> {new}");
    assert_eq!(
        value_of(&d, "app.conf", "size"),
        Some(("19".into(), "25".into())),
        "{d:#}"
    );
    // The hashes are those of the baseline's and the box's contents, and the contents
    // themselves appear nowhere: not in the JSON, not on the page.
    assert!(
        baked.contains(&old),
        "old hash prefix {old} is the baseline's"
    );
    let json = c
        .get(&format!("/v1/instances/{id}"), Some(READER_TOKEN))
        .body;
    let page = c.get(&format!("/instances/{id}"), Some(READER_TOKEN));
    assert_eq!(page.status, 200);
    for secret in ["hunter2", "s3cret"] {
        assert!(!json.contains(secret), "{secret} in the JSON: {json}");
        assert!(!page.body.contains(secret), "{secret} on the page");
    }
    assert!(
        page.body
            .contains("mode <code>0644</code> → <code>0666</code>"),
        "the page shows old → new: {}",
        page.body
    );
    assert!(
        page.body
            .contains(&format!("content <code>{old}</code> → <code>{new}</code>")),
        "the page shows the short hashes"
    );
}

#[test]
fn a_registered_baseline_wins_over_what_the_agent_claims() {
    let c = Collector::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("cfg");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("a.conf"), "a").unwrap();
    let base = tmp.path().join("b.json");
    // Only the pipeline may register.
    let refused = bake(&tree, &base, "img-auth", &c.url(), AGENT_TOKEN);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("403"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(bake(&tree, &base, "img-auth", &c.url(), PIPELINE_TOKEN)
        .status
        .success());
    let manifest: phoenix_wire::drift::Manifest =
        serde_json::from_slice(&std::fs::read(&base).unwrap()).unwrap();

    // A tampered instance reports its altered tree as its own "baseline" too.
    let mut entries: Vec<FileEntry> = manifest.entries.clone();
    entries.push(FileEntry {
        path: format!("{}/evil.conf", tree.display()),
        kind: 'f',
        mode: 0o100644,
        uid: 0,
        gid: 0,
        hash: "00".repeat(32),
        target: None,
        error: None,
        size: None,
    });
    entries.sort();
    let forged = phoenix_wire::drift::root_of_entries(&entries);
    let report = Report {
        v: VERSION,
        agent: Identity {
            instance_id: "i-forger".into(),
            image_id: "img-auth".into(),
            hostname: "h".into(),
            boot_id: "b".into(),
            version: "t".into(),
            ..Default::default()
        },
        seq: 1,
        interval_ms: 1000,
        metrics: vec![],
        logs: vec![],
        drift: Some(DriftState {
            hash: forged.clone(),
            baseline: Some(forged.clone()),
            changes: vec![],
            entries: entries.len() as u64,
            ts: phoenix_wire::bounds::now_ns(),
            note: None,
            entries_list: Some(entries),
            hash_version: None,
            baseline_hash_version: None,
        }),
        checks: vec![],
        drift_root: None,
        protected: None,
    };
    let r = c.post_report(&report);
    assert_eq!(r.status, 200, "{}", r.body);
    let d = drift_of(&c, "i-forger").unwrap();
    assert_eq!(d["drifted"], true, "{d}");
    assert_eq!(d["source"], "registered baseline");
    assert_eq!(d["expected"], manifest.root.as_str());
    assert!(changed(&d, "evil.conf", "added"), "{d}");
    // The registered baseline is unchanged by the report: the untouched tree is still clean.
    let mut honest = report.clone();
    honest.seq = 2;
    honest.drift = Some(DriftState {
        hash: manifest.root.clone(),
        baseline: Some(manifest.root.clone()),
        changes: vec![],
        entries: manifest.entries.len() as u64,
        ts: phoenix_wire::bounds::now_ns(),
        note: None,
        entries_list: Some(manifest.entries.clone()),
        hash_version: None,
        baseline_hash_version: None,
    });
    assert_eq!(c.post_report(&honest).status, 200);
    let d = drift_of(&c, "i-forger").unwrap();
    assert_eq!(d["drifted"], false, "{d}");
}
