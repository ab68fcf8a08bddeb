//! A report speaks only for the box that sent it: forged reports from a holder of the shared
//! agent token, against real collectors (defaults unless the test is about a mode), real
//! agents and a real influxd.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use phoenix_e2e::trust::{harness_credential, CREDENTIAL_HEADER};
use phoenix_e2e::*;
use phoenix_wire::{DriftState, FileChange, Identity, LogLine, Report, VERSION};
use serde_json::Value as J;

const DB: &str = "phoenix";

fn instance(c: &Collector, id: &str) -> Option<J> {
    let r = trust::try_get(
        &format!("{}/v1/instances/{id}", c.url()),
        Some(READER_TOKEN),
    )?;
    (r.status == 200).then(|| r.json())
}

/// The victim as the collector shows it to anyone who can read the fleet.
fn identity_of(c: &Collector, id: &str) -> Identity {
    let v = instance(c, id).unwrap();
    Identity {
        instance_id: id.into(),
        image_id: v["image_id"].as_str().unwrap().into(),
        group: v["group"].as_str().map(str::to_owned),
        hostname: v["hostname"].as_str().unwrap().into(),
        boot_id: v["boot_id"].as_str().unwrap().into(),
        version: "0.1.0".into(),
        boot_time: 0,
    }
}

fn report(agent: Identity, seq: u64) -> Report {
    Report {
        v: VERSION,
        agent,
        seq,
        drift_root: None,
        protected: None,
        interval_ms: 1000,
        metrics: vec![],
        logs: vec![],
        drift: None,
        checks: vec![],
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// POST a report with the agent token and these extra headers.
fn post_with(c: &Collector, r: &Report, headers: &[(&str, &str)]) -> Resp {
    let mut h = vec![
        ("Content-Type", "application/json"),
        ("Content-Encoding", "gzip"),
    ];
    h.extend_from_slice(headers);
    post(
        &format!("{}/v1/reports", c.url()),
        Some(AGENT_TOKEN),
        &h,
        &phoenix_wire::encode(r),
    )
}

/// Every way a token holder on another box can try to speak for `r`'s instance: no
/// credential, the harness's, a made-up one. Each must be refused with 403 and a reason.
fn assert_all_forgeries_refused(c: &Collector, r: &Report) {
    let id = &r.agent.instance_id;
    let made_up = "f".repeat(64);
    let harness = harness_credential(id);
    for (what, headers) in [
        ("no credential", vec![]),
        (
            "a made-up credential",
            vec![(CREDENTIAL_HEADER, made_up.as_str())],
        ),
        (
            "another credential",
            vec![(CREDENTIAL_HEADER, harness.as_str())],
        ),
    ] {
        let resp = post_with(c, r, &headers);
        assert_eq!(resp.status, 403, "{what}: {}", resp.body);
        let why = resp.json()["error"].as_str().unwrap().to_string();
        assert!(why.contains("credential"), "{what}: {why}");
    }
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

fn reports_of(c: &Collector, id: &str) -> u64 {
    instance(c, id)
        .and_then(|v| v["reports"].as_u64())
        .unwrap_or(0)
}

fn marked(c: &Collector, id: &str) -> bool {
    let v = c.get("/v1/phoenix", Some(RECYCLER_TOKEN)).json();
    v.to_string().contains(&format!("\"{id}\""))
}

#[test]
fn a_forged_drift_report_for_an_enrolled_instance_is_refused_and_the_victim_stays_clean() {
    let influx = Influx::start();
    let c = Collector::start(&["--influx-url", &influx.url(), "--influx-db", DB]);
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("app.conf"), "listen = 8080\n").unwrap();
    let base = tmp.path().join("baseline.json");
    bake(&tree, &base, "img-trust", &c.url());
    let victim = "i-victim";
    let a = Agent::start(
        &c.url(),
        victim,
        &[
            "--image-id",
            "img-trust",
            "--baseline",
            base.to_str().unwrap(),
            "--drift-path",
            tree.to_str().unwrap(),
        ],
    );
    wait_for(Duration::from_secs(30), || {
        let v = instance(&c, victim)?;
        (v["drifted"] == false).then_some(())
    })
    .unwrap_or_else(|| panic!("victim never reported clean:\n{}", a.log_text()));
    let cred = trust::agent_credential(&a.state_dir).expect("the agent keeps its credential");
    assert_eq!(cred.len(), 64);

    let mut forged = report(identity_of(&c, victim), 1 << 40);
    forged.drift = Some(DriftState {
        hash: "0".repeat(64),
        baseline: None,
        changes: vec![FileChange {
            path: "/etc/shadow".into(),
            change: "changed".into(),
            attrs: vec!["content".into()],
            values: vec![],
        }],
        entries: 1,
        ts: now_ns(),
        note: None,
        entries_list: None,
        hash_version: None,
        baseline_hash_version: None,
    });
    assert_all_forgeries_refused(&c, &forged);

    // The victim keeps reporting and stays clean and unmarked over several of its reports.
    let before = reports_of(&c, victim);
    let ok = wait_for(Duration::from_secs(20), || {
        let v = instance(&c, victim).unwrap();
        assert_eq!(v["drifted"], false, "victim shown drifted: {v}");
        assert!(!marked(&c, victim), "victim marked: {v}");
        (v["reports"].as_u64().unwrap() >= before + 4).then_some(())
    });
    assert!(
        ok.is_some(),
        "the victim stopped being served:\n{}",
        a.log_text()
    );
    let rows = influx.count(
        DB,
        &format!("SELECT count(drifted) FROM phoenix_drift WHERE instance_id = '{victim}' AND drifted = true"),
    );
    assert_eq!(rows, 0, "a drifted verdict reached InfluxDB");
}

#[test]
fn a_forged_max_seq_costs_the_victim_no_line() {
    let influx = Influx::start();
    let c = Collector::start(&["--influx-url", &influx.url(), "--influx-db", DB]);
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("app.log");
    std::fs::write(&log, "").unwrap();
    let victim = "i-seq-victim";
    let a = Agent::start(&c.url(), victim, &["--log", log.to_str().unwrap()]);
    wait_for(Duration::from_secs(30), || {
        (reports_of(&c, victim) > 0).then_some(())
    })
    .unwrap_or_else(|| panic!("victim never reported:\n{}", a.log_text()));

    let mut forged = report(identity_of(&c, victim), u64::MAX);
    forged.logs = vec![LogLine {
        src: log.to_str().unwrap().into(),
        ts: now_ns(),
        offset: 0,
        msg: "forged".into(),
        escaped: false,
        part: None,
        tags: phoenix_wire::Map::new(),
        fields: phoenix_wire::Map::new(),
    }];
    assert_all_forgeries_refused(&c, &forged);

    let mut f = OpenOptions::new().append(true).open(&log).unwrap();
    for i in 0..300 {
        writeln!(f, "after the forgery line {i}").unwrap();
    }
    drop(f);
    let q = format!(
        "SELECT count(message) FROM log WHERE instance_id = '{victim}' AND message =~ /after the forgery/"
    );
    let mut n = 0;
    let ok = wait_for(Duration::from_secs(60), || {
        n = influx.count(DB, &q);
        assert!(n <= 300, "{n} lines stored, 300 written");
        (n == 300).then_some(())
    });
    assert!(ok.is_some(), "{n} of 300 lines stored:\n{}", a.log_text());
    assert!(!a.log_text().contains("duplicate"), "{}", a.log_text());
}

/// A stand-in for the EC2 metadata service (IMDSv2): a session token by PUT, then the
/// identity document and signature for requests carrying it.
struct Imds {
    port: u16,
    tokens_issued: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Imds {
    fn start(document: String, signature: String) -> Imds {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let tokens = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let t = tokens.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                s.set_read_timeout(Some(Duration::from_secs(5))).ok();
                let mut buf = Vec::new();
                let mut b = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&b[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&buf).to_string();
                let line = req.lines().next().unwrap_or("").to_string();
                let lower = req.to_ascii_lowercase();
                let has_token = lower.contains("x-aws-ec2-metadata-token: tok-1");
                let (status, body) = if line.starts_with("PUT /latest/api/token") {
                    t.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    ("200 OK", "tok-1".to_string())
                } else if !has_token {
                    ("401 Unauthorized", String::new())
                } else if line.starts_with("GET /latest/dynamic/instance-identity/document ") {
                    ("200 OK", document.clone())
                } else if line.starts_with("GET /latest/dynamic/instance-identity/signature ") {
                    ("200 OK", signature.clone())
                } else {
                    ("404 Not Found", String::new())
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(resp.as_bytes()).ok();
            }
        });
        Imds {
            port,
            tokens_issued: tokens,
        }
    }
}

fn openssl(args: &[&str]) {
    let o = Command::new("openssl").args(args).output().unwrap();
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `document` signed the way AWS signs it (RSA, SHA-256), base64.
fn sign(dir: &Path, key: &Path, document: &str) -> String {
    let doc = dir.join("doc-to-sign.json");
    let sig = dir.join("doc.sig");
    std::fs::write(&doc, document).unwrap();
    openssl(&[
        "dgst",
        "-sha256",
        "-sign",
        key.to_str().unwrap(),
        "-out",
        sig.to_str().unwrap(),
        doc.to_str().unwrap(),
    ]);
    b64(&std::fs::read(&sig).unwrap())
}

fn b64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn document(instance_id: &str, account: &str) -> String {
    format!(
        "{{\n  \"accountId\" : \"{account}\",\n  \"architecture\" : \"x86_64\",\n  \"availabilityZone\" : \"eu-west-1a\",\n  \"imageId\" : \"ami-0trust\",\n  \"instanceId\" : \"{instance_id}\",\n  \"instanceType\" : \"t3.micro\",\n  \"pendingTime\" : \"2026-12-01T10:00:00Z\",\n  \"region\" : \"eu-west-1\",\n  \"version\" : \"2017-09-30\"\n}}"
    )
}

#[test]
fn aws_mode_enrols_a_signed_document_and_refuses_forged_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let key = d.join("aws.key");
    let cert = d.join("aws.pem");
    let forger = d.join("forger.key");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=aws test",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
    ]);
    openssl(&["genrsa", "-out", forger.to_str().unwrap(), "2048"]);
    let account = "123456789012";
    let real = "i-0aws00000000000001";
    let doc = document(real, account);
    let imds = Imds::start(doc.clone(), sign(d, &key, &doc));

    let influx = Influx::start();
    let c = Collector::start(&[
        "--influx-url",
        &influx.url(),
        "--influx-db",
        DB,
        "--identity",
        "aws",
        "--aws-identity-cert",
        cert.to_str().unwrap(),
        "--aws-account",
        account,
    ]);
    let a = Agent::start(
        &c.url(),
        real,
        &[
            "--identity",
            "aws",
            "--imds-url",
            &format!("http://127.0.0.1:{}", imds.port),
        ],
    );
    wait_for(Duration::from_secs(30), || {
        (reports_of(&c, real) >= 2).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the aws agent was not served:\n{}\n{}",
            a.log_text(),
            c.log_text()
        )
    });
    assert!(
        imds.tokens_issued.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "IMDSv2 token flow not used"
    );

    let victim = "i-0aws00000000000002";
    let r = report(
        Identity {
            instance_id: victim.into(),
            image_id: "ami-0trust".into(),
            hostname: "h".into(),
            boot_id: "b".into(),
            version: "0".into(),
            ..Default::default()
        },
        1,
    );
    let good_victim_doc = document(victim, account);
    let good_victim_sig = sign(d, &key, &good_victim_doc);
    let real_sig = sign(d, &key, &doc);
    let cases: Vec<(&str, String, String, &str)> = vec![
        (
            "the real box's document for another id",
            b64(doc.as_bytes()),
            real_sig.clone(),
            "is for",
        ),
        (
            "an altered document",
            b64(good_victim_doc.replace(account, "999999999999").as_bytes()),
            good_victim_sig.clone(),
            "does not verify",
        ),
        (
            "a document signed by another key",
            b64(good_victim_doc.as_bytes()),
            sign(d, &forger, &good_victim_doc),
            "does not verify",
        ),
        (
            "a garbage signature",
            b64(good_victim_doc.as_bytes()),
            "AAAA".repeat(86),
            "does not verify",
        ),
        (
            "another account",
            b64(document(victim, "999999999999").as_bytes()),
            sign(d, &key, &document(victim, "999999999999")),
            "--aws-account",
        ),
    ];
    for (what, doc_b64, sig, why) in &cases {
        let resp = post_with(
            &c,
            &r,
            &[
                ("X-Phoenix-AWS-Identity-Document", doc_b64),
                ("X-Phoenix-AWS-Identity-Signature", sig),
            ],
        );
        assert_eq!(resp.status, 403, "{what}: {}", resp.body);
        assert!(resp.body.contains(why), "{what}: {}", resp.body);
    }
    let none = post_with(&c, &r, &[]);
    assert_eq!(none.status, 403, "{}", none.body);
    assert!(
        instance(&c, victim).is_none(),
        "a refused id must leave no trace"
    );
    // The victim's own signed document enrols it.
    let resp = post_with(
        &c,
        &r,
        &[
            (
                "X-Phoenix-AWS-Identity-Document",
                &b64(good_victim_doc.as_bytes()),
            ),
            ("X-Phoenix-AWS-Identity-Signature", &good_victim_sig),
        ],
    );
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert!(instance(&c, victim).is_some());
}

#[test]
fn idle_connections_past_the_descriptor_limit_do_not_starve_a_real_agent() {
    let have = trust::raise_nofile();
    assert!(have >= 2400, "this test needs 2400 descriptors, has {have}");
    let influx = Influx::start();
    let c = trust::collector_with_nofile(&["--influx-url", &influx.url(), "--influx-db", DB], 1024);
    let addr = format!("127.0.0.1:{}", c.port);
    let mut idle: Vec<TcpStream> = Vec::new();
    for _ in 0..1100 {
        if let Ok(s) = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2)) {
            idle.push(s);
        }
    }
    assert!(idle.len() >= 1000, "only {} connections opened", idle.len());
    let id = "i-crowded";
    let t0 = Instant::now();
    let a = Agent::start(&c.url(), id, &[]);
    let served = wait_for(Duration::from_secs(45), || {
        (reports_of(&c, id) >= 3).then_some(())
    });
    assert!(
        served.is_some(),
        "the agent was not served beside 1100 idle connections:\n{}\n{}",
        a.log_text(),
        c.log_text()
    );
    eprintln!(
        "agent served 3 reports {:.1} s after 1100 idle connections",
        t0.elapsed().as_secs_f64()
    );
    // Connections past the cap were told so, not left hanging.
    let mut busy = 0;
    for s in idle.iter_mut().rev().take(100) {
        s.set_read_timeout(Some(Duration::from_millis(200))).ok();
        let mut b = [0u8; 64];
        if let Ok(n) = s.read(&mut b) {
            if String::from_utf8_lossy(&b[..n]).starts_with("HTTP/1.1 503") {
                busy += 1;
            }
        }
    }
    // Reported, not asserted: whether the newest idle connections still hold the 503 depends
    // on whether the kernel took them into the backlog before the collector's accept loop
    // reached its cap (seen both ways on this 2-core machine). The assertion that matters is
    // the agent's, above and below.
    eprintln!("{busy} of the newest 100 idle connections were answered 503");
    // A second crowd while the first is still held: the agent keeps being served.
    let mut more = Vec::new();
    for _ in 0..1100 {
        if let Ok(s) = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2)) {
            more.push(s);
        }
    }
    let now = reports_of(&c, id);
    let again = wait_for(Duration::from_secs(45), || {
        (reports_of(&c, id) >= now + 3).then_some(())
    });
    assert!(
        again.is_some(),
        "the agent stopped being served:\n{}",
        a.log_text()
    );
    drop(idle);
    drop(more);
    let url = format!("{}/healthz", c.url());
    let alive = wait_for(Duration::from_secs(20), || {
        (trust::try_get(&url, None)?.status == 200).then_some(())
    });
    assert!(alive.is_some(), "collector gone:\n{}", c.log_text());
}

/// Log text that does not compress to nothing.
fn noise(seed: u64, len: usize) -> String {
    let mut x = seed | 1;
    let mut s = String::with_capacity(len);
    while s.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(&format!("{:016x} ", x));
    }
    s.truncate(len);
    s
}

#[test]
fn a_flood_of_made_up_ids_is_bounded_and_a_calm_agent_keeps_being_served() {
    let influx = Influx::start();
    let c = Collector::start(&["--influx-url", &influx.url(), "--influx-db", DB]);
    let calm = "i-calm";
    let a = Agent::start(&c.url(), calm, &[]);
    wait_for(Duration::from_secs(30), || {
        (reports_of(&c, calm) > 0).then_some(())
    })
    .unwrap_or_else(|| panic!("calm agent never served:\n{}", a.log_text()));
    let pid = c.proc.as_ref().unwrap().pid();
    let dst: std::net::SocketAddrV4 = format!("127.0.0.1:{}", c.port).parse().unwrap();
    let src: std::net::Ipv4Addr = "127.0.0.2".parse().unwrap();
    let lines: Vec<String> = (0..20).map(|i| noise(i + 1, 2048)).collect();
    let total = 12_000u64;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let outcomes = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::<u16, u64>::new()));
    let t0 = Instant::now();
    let mut threads = Vec::new();
    for _ in 0..4 {
        let (next, outcomes, lines) = (next.clone(), outcomes.clone(), lines.clone());
        threads.push(std::thread::spawn(move || loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if i >= total {
                return;
            }
            let id = format!("i-fake-{i:06}");
            let mut r = report(
                Identity {
                    instance_id: id.clone(),
                    image_id: "img-fake".into(),
                    group: Some("web".into()),
                    hostname: id.clone(),
                    boot_id: "b".into(),
                    version: "0".into(),
                    boot_time: 0,
                },
                1,
            );
            let ts = now_ns();
            r.logs = lines
                .iter()
                .enumerate()
                .map(|(k, l)| LogLine {
                    src: "/var/log/fake.log".into(),
                    ts: ts + k as i64,
                    offset: 0,
                    msg: l.clone(),
                    escaped: false,
                    part: None,
                    tags: phoenix_wire::Map::new(),
                    fields: phoenix_wire::Map::new(),
                })
                .collect();
            let body = phoenix_wire::encode(&r);
            let cred = harness_credential(&id);
            let auth = format!("Bearer {AGENT_TOKEN}");
            let h = [
                ("Authorization", auth.as_str()),
                ("Content-Type", "application/json"),
                ("Content-Encoding", "gzip"),
                (CREDENTIAL_HEADER, cred.as_str()),
            ];
            // Retried while rate-limited (429 for the peer) so every report is seen once.
            loop {
                match trust::post_from(src, dst, "/v1/reports", &h, &body) {
                    Ok((429, b)) if b.contains("peer") => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Ok((s, _)) => {
                        *outcomes.lock().unwrap().entry(s).or_default() += 1;
                        break;
                    }
                    Err(_) => {
                        *outcomes.lock().unwrap().entry(0).or_default() += 1;
                        break;
                    }
                }
            }
        }));
    }
    // Meanwhile: the calm agent keeps being served and the fleet list stays fast.
    let mut worst_list = Duration::ZERO;
    let mut lists = 0u32;
    let mut calm_seen = vec![reports_of(&c, calm)];
    let mut stalled = Duration::ZERO;
    let mut last_change = Instant::now();
    let mut peak_kib = 0;
    while threads.iter().any(|t| !t.is_finished()) {
        let t = Instant::now();
        let r = c.get("/v1/instances", Some(READER_TOKEN));
        assert_eq!(r.status, 200);
        worst_list = worst_list.max(t.elapsed());
        lists += 1;
        let n = reports_of(&c, calm);
        if Some(&n) != calm_seen.last() {
            last_change = Instant::now();
        }
        stalled = stalled.max(last_change.elapsed());
        calm_seen.push(n);
        peak_kib = peak_kib.max(trust::peak_rss_kib(pid).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(500));
    }
    for t in threads {
        t.join().unwrap();
    }
    let flood_s = t0.elapsed().as_secs_f64();
    // After the flood, the calm agent is still being served.
    let after = reports_of(&c, calm);
    wait_for(Duration::from_secs(20), || {
        (reports_of(&c, calm) >= after + 3).then_some(())
    })
    .unwrap_or_else(|| panic!("calm agent not served after the flood:\n{}", a.log_text()));
    let t = Instant::now();
    let list = c.get("/v1/instances", Some(READER_TOKEN));
    let list_after = t.elapsed();
    let list = list.json();
    let known = list["total"].as_u64().unwrap() as usize;
    let page = list["instances"].as_array().unwrap().len();
    assert!(page <= 1000, "a page of {page} instances by default");
    peak_kib = peak_kib.max(trust::peak_rss_kib(pid).unwrap_or(0));
    let outcomes = outcomes.lock().unwrap().clone();
    // The refusals at the cap are an alert for operators in the queue the recycler reads
    // (within a queue pass of the last one).
    let cap = wait_for(Duration::from_secs(5), || {
        let q = c.get("/v1/phoenix", Some(RECYCLER_TOKEN)).json();
        let a = q["instance_cap"].clone();
        let want = outcomes.get(&429).copied().unwrap_or(1).max(1);
        a["refused"]
            .as_u64()
            .is_some_and(|n| n >= want)
            .then_some(a)
    });
    eprintln!(
        "FLOOD: {total} reports in {flood_s:.1} s, outcomes {outcomes:?}; collector peak RSS {} MiB; fleet list worst {} ms during ({lists} reads), {} ms after ({known} instances); calm agent longest stall {} ms, reports {:?}; instance-cap alert: {:?}",
        peak_kib / 1024,
        worst_list.as_millis(),
        list_after.as_millis(),
        stalled.as_millis(),
        calm_seen,
        cap.as_ref().map(|a| a["message"].clone())
    );
    // Figures first (above), then what must hold. The cap is reached only if the flood
    // outruns the sweep that forgets ids silent for 15 min after a short life: on a box too
    // loaded to send 12,000 reports in 15 min it is not, and this says so.
    assert!(
        cap.is_some(),
        "no instance-cap alert for {outcomes:?} (flood took {flood_s:.0} s): {}",
        c.get("/v1/phoenix", Some(RECYCLER_TOKEN)).body
    );
    assert!(
        peak_kib < 256 * 1024,
        "collector peak RSS {} MiB",
        peak_kib / 1024
    );
    // The list is a page of the fleet's published snapshot, and new ids enrol off the async
    // threads that serve it: the slowest of the reads during the flood, and the one after.
    assert!(
        worst_list < Duration::from_secs(1),
        "fleet list took {worst_list:?} at worst during the flood ({lists} reads)"
    );
    assert!(
        list_after < Duration::from_secs(1),
        "fleet list took {list_after:?}"
    );
    assert!(
        known <= 10_000 + 1,
        "{known} instances kept past --max-instances"
    );
    assert!(
        outcomes.get(&429).copied().unwrap_or(0) >= 1_999,
        "{outcomes:?}"
    );
    // The calm agent (1 s interval) was served all along, never stalled for long.
    assert!(
        calm_seen.last() > calm_seen.first(),
        "calm agent starved: {calm_seen:?}"
    );
    assert!(
        stalled < Duration::from_secs(10),
        "calm agent stalled {stalled:?}: {calm_seen:?}"
    );
}

#[test]
fn made_up_ids_that_go_silent_raise_no_mass_event_and_a_real_drift_is_still_marked() {
    let c = Collector::start(&["--grace", "2s", "--silent-after", "3s"]);
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("app.conf"), "listen = 8080\n").unwrap();
    let base = tmp.path().join("baseline.json");
    bake(&tree, &base, "img-web", &c.url());
    let watched = |id: &str| {
        Agent::start(
            &c.url(),
            id,
            &[
                "--image-id",
                "img-web",
                "--group",
                "web",
                "--baseline",
                base.to_str().unwrap(),
                "--drift-path",
                tree.to_str().unwrap(),
                "--interval",
                "1s",
            ],
        )
    };
    let calm = watched("i-web-real-1");
    // 30 ids a token holder makes up in group web, one report each (each enrols), then silence.
    for k in 0..30 {
        let id = format!("i-web-fake-{k:02}");
        let r = report(
            Identity {
                instance_id: id.clone(),
                image_id: "img-web".into(),
                group: Some("web".into()),
                hostname: id.clone(),
                boot_id: "b".into(),
                version: "0".into(),
                boot_time: 0,
            },
            1,
        );
        let cred = harness_credential(&id);
        let resp = post_with(&c, &r, &[(CREDENTIAL_HEADER, cred.as_str())]);
        assert_eq!(resp.status, 200, "{id}: {}", resp.body);
    }
    // Past their grace and --silent-after: shown silent, yet no mass event in web.
    wait_for(Duration::from_secs(30), || {
        let v = instance(&c, "i-web-fake-00")?;
        (v["state"] == "unhealthy").then_some(())
    })
    .unwrap_or_else(|| panic!("made-up ids never shown silent"));
    let q = c.get("/v1/phoenix", Some(RECYCLER_TOKEN)).json();
    assert_eq!(q["alerts"], serde_json::json!([]), "{q:#}");
    assert!(
        !q.to_string().contains("i-web-fake-"),
        "a made-up id is marked or held: {q:#}"
    );
    // A real instance of web whose files drift is marked, not held.
    std::fs::write(tree.join("app.conf"), "listen = 9090\n").unwrap();
    let marked = wait_for(Duration::from_secs(30), || {
        let q = c.get("/v1/phoenix", Some(RECYCLER_TOKEN)).json();
        assert_eq!(q["alerts"], serde_json::json!([]), "{q:#}");
        q["marked"]
            .as_array()?
            .iter()
            .any(|m| m["instance_id"] == "i-web-real-1" && m["reason"] == "drift")
            .then_some(())
    });
    assert!(
        marked.is_some(),
        "the drifted real instance was not marked: {}\n{}",
        c.get("/v1/phoenix", Some(RECYCLER_TOKEN)).body,
        calm.log_text()
    );
}
