//! Security end to end: a TLS collector with a CA made here (openssl CLI), real agents that
//! verify it (or refuse to talk), mutual TLS binding a report to its instance, tokens kept to
//! their roles and out of logs, hostile reports refused while others are served, a log line
//! crafted as line protocol, rate limits under a flood, and a load figure with TLS on.

use phoenix_wire::Map;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use phoenix_e2e::*;
use phoenix_wire::{Identity, Point, Report, Value, VERSION};
use ureq::tls::{ClientCert, PrivateKey, RootCerts, TlsConfig};

// ---- a throw-away PKI, made with the openssl CLI ----

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA named `name` in `dir`: `<name>.pem`, `<name>.key`.
fn make_ca(dir: &Path, name: &str) -> PathBuf {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    dir.join(format!("{name}.pem"))
}

/// A certificate for `sans` (e.g. `DNS:localhost,IP:127.0.0.1`) signed by CA `ca`; `usage` is
/// serverAuth or clientAuth. Returns (cert, key).
fn issue(dir: &Path, ca: &str, name: &str, sans: &str, usage: &str) -> (PathBuf, PathBuf) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    std::fs::write(
        dir.join(format!("{name}.ext")),
        format!("subjectAltName={sans}\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n"),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

// ---- an HTTPS client trusting one CA ----

fn https(ca: &Path, client: Option<(&Path, &Path)>) -> ureq::Agent {
    let pem = std::fs::read(ca).unwrap();
    let roots: Vec<_> = ureq::tls::parse_pem(&pem)
        .filter_map(|i| match i.unwrap() {
            ureq::tls::PemItem::Certificate(c) => Some(c),
            _ => None,
        })
        .collect();
    let client = client.map(|(c, k)| {
        let chain: Vec<_> = ureq::tls::parse_pem(&std::fs::read(c).unwrap())
            .filter_map(|i| match i.unwrap() {
                ureq::tls::PemItem::Certificate(c) => Some(c),
                _ => None,
            })
            .collect();
        ClientCert::new_with_certs(
            &chain,
            PrivateKey::from_pem(&std::fs::read(k).unwrap()).unwrap(),
        )
    });
    let tls = TlsConfig::builder()
        .root_certs(RootCerts::new_with_certs(&roots))
        .client_cert(client)
        .build();
    let cfg = ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .max_redirects(0)
        .build();
    ureq::Agent::new_with_config(cfg)
}

/// One request; Err when the connection or handshake failed.
/// Whether a refusal is the collector's JSON error: `{"error": "<reason>"}`.
fn json_error(r: &Resp) -> bool {
    r.header("content-type")
        .is_some_and(|t| t.starts_with("application/json"))
        && r.json()["error"].as_str().is_some_and(|e| !e.is_empty())
}

fn call(
    http: &ureq::Agent,
    method: &str,
    url: &str,
    token: Option<&str>,
    gzip: bool,
    body: &[u8],
) -> Result<Resp, String> {
    let mut b = ureq::http::Request::builder().method(method).uri(url);
    if let Some(t) = token {
        b = b.header("Authorization", format!("Bearer {t}"));
    }
    if gzip {
        b = b.header("Content-Encoding", "gzip");
    }
    let req = b
        .header("Content-Type", "application/json")
        .body(body.to_vec())
        .unwrap();
    let mut r = http.run(req).map_err(|e| e.to_string())?;
    let headers = r
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let mut body = String::new();
    r.body_mut().as_reader().read_to_string(&mut body).ok();
    Ok(Resp {
        status: r.status().as_u16(),
        headers,
        body,
    })
}

fn report(instance: &str, seq: u64, points: usize) -> Report {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    Report {
        v: VERSION,
        agent: Identity {
            instance_id: instance.into(),
            image_id: "img-sec".into(),
            group: Some("sec".into()),
            hostname: "h".into(),
            boot_id: "boot".into(),
            version: "test".into(),
            boot_time: 0,
        },
        seq,
        interval_ms: 1000,
        metrics: (0..points)
            .map(|i| Point {
                m: "secload".into(),
                tags: Map::from([("n".to_string(), i.to_string())]),
                fields: Map::from([("v".to_string(), Value::Int(seq as i64))]),
                ts: now + i as i64,
            })
            .collect(),
        logs: vec![],
        drift: None,
        checks: vec![],
        drift_root: None,
        protected: None,
    }
}

// ---- a collector over TLS, tokens from files ----

struct TlsCollector {
    port: u16,
    proc: Proc,
    _dir: tempfile::TempDir,
}

impl TlsCollector {
    /// `probe` is a client that can reach /healthz (with the client certificate under mTLS).
    fn start(cert: &Path, key: &Path, extra: &[&str], probe: &ureq::Agent) -> TlsCollector {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(bin("phoenix-collector"));
        let port = free_port();
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key);
        for (role, token) in [
            ("agent", AGENT_TOKEN),
            ("recycler", RECYCLER_TOKEN),
            ("pipeline", PIPELINE_TOKEN),
            ("reader", READER_TOKEN),
        ] {
            use std::os::unix::fs::PermissionsExt;
            let f = dir.path().join(format!("{role}.tokens"));
            // Two per role, as during a rotation.
            std::fs::write(&f, format!("# {role} tokens\n{token}\n{token}-next\n")).unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
            cmd.arg(format!("--{role}-token-file")).arg(&f);
        }
        cmd.args(extra).env("PHOENIX_LOG_LEVEL", "info");
        let proc = Proc::spawn(cmd, dir.path().join("collector.log"));
        let c = TlsCollector {
            port,
            proc,
            _dir: dir,
        };
        let url = c.url("/healthz");
        if wait_for(Duration::from_secs(30), || {
            call(probe, "GET", &url, None, false, b"")
                .ok()
                .filter(|r| r.status == 200)
        })
        .is_none()
        {
            panic!("TLS collector did not come up; log:\n{}", c.proc.log_text());
        }
        c
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }

    fn log(&self) -> String {
        self.proc.log_text()
    }
}

fn measurements(influx: &Influx, db: &str) -> Vec<String> {
    let res = influx.query(db, "SHOW MEASUREMENTS");
    res["series"][0]["values"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| v[0].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn agent_talks_tls_with_the_ca_refuses_without_and_certificates_rotate_live() {
    let pki = tempfile::tempdir().unwrap();
    let p = pki.path();
    let ca1 = make_ca(p, "ca1");
    let ca2 = make_ca(p, "ca2");
    let (cert, key) = issue(p, "ca1", "srv1", "DNS:localhost,IP:127.0.0.1", "serverAuth");
    let influx = Influx::start();
    let trusts_ca1 = https(&ca1, None);
    let c = TlsCollector::start(
        &cert,
        &key,
        &["--influx-url", &influx.url(), "--influx-db", "sec"],
        &trusts_ca1,
    );

    let _good = Agent::start(
        &c.url(""),
        "i-tls-ok",
        &["--ca-file", ca1.to_str().unwrap()],
    );
    let mut without_ca = Agent::start(&c.url(""), "i-tls-noca", &[]);
    let arrived = wait_for(Duration::from_secs(30), || {
        (influx.count(
            "sec",
            "SELECT count(total) FROM mem WHERE instance_id = 'i-tls-ok'",
        ) > 0)
            .then_some(())
    });
    assert!(
        arrived.is_some(),
        "nothing arrived over TLS; collector log:\n{}",
        c.log()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        influx.count(
            "sec",
            "SELECT count(total) FROM mem WHERE instance_id = 'i-tls-noca'"
        ),
        0,
        "an agent that cannot verify the collector sent data"
    );
    let why = wait_for(Duration::from_secs(10), || {
        let log = without_ca.log_text();
        (log.contains("UnknownIssuer") || log.contains("certificate")).then_some(log)
    });
    assert!(
        why.is_some(),
        "the agent without the CA does not say why it cannot send:\n{}",
        without_ca.log_text()
    );
    without_ca.kill();
    // Plain HTTP on the TLS port gets nowhere.
    let plain = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build(),
    );
    assert!(call(
        &plain,
        "GET",
        &format!("http://127.0.0.1:{}/healthz", c.port),
        None,
        false,
        b""
    )
    .map_or(true, |r| r.status != 200));

    // Rotation: a certificate from another CA, swapped in place; no restart.
    let (cert2, key2) = issue(p, "ca2", "srv2", "DNS:localhost,IP:127.0.0.1", "serverAuth");
    std::fs::copy(&key2, &key).unwrap();
    std::fs::copy(&cert2, &cert).unwrap();
    let trusts_ca2 = https(&ca2, None);
    let rotated = wait_for(Duration::from_secs(15), || {
        call(&trusts_ca2, "GET", &c.url("/healthz"), None, false, b"")
            .ok()
            .filter(|r| r.status == 200)
    });
    assert!(
        rotated.is_some(),
        "the rotated certificate is not served; log:\n{}",
        c.log()
    );
    // A new connection (the pooled one from before the rotation may live on, as it should).
    assert!(
        call(
            &https(&ca1, None),
            "GET",
            &c.url("/healthz"),
            None,
            false,
            b""
        )
        .is_err(),
        "the old certificate is still served"
    );

    // A broken key keeps the last good pair in service and says so.
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let logged = wait_for(Duration::from_secs(15), || {
        c.log().contains("do not load").then_some(())
    });
    assert!(
        logged.is_some(),
        "no error for a broken key; log:\n{}",
        c.log()
    );
    assert_eq!(
        call(&trusts_ca2, "GET", &c.url("/healthz"), None, false, b"")
            .unwrap()
            .status,
        200
    );
}

#[test]
fn agent_refuses_plain_http_to_a_collector_off_loopback() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let mut cmd = Command::new(bin("phoenix-agent"));
        cmd.args([
            "run",
            "--collector",
            "http://192.0.2.10:7070",
            "--token",
            AGENT_TOKEN,
            "--instance-id",
            "i-plain",
            "--image-id",
            "img",
            "--interval",
            "1s",
        ])
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .args(extra);
        Proc::spawn(cmd, tmp.path().join(format!("agent-{}.log", extra.len())))
    };
    let mut refused = run(&[]);
    let status = wait_for(Duration::from_secs(10), || {
        refused.child.as_mut().unwrap().try_wait().unwrap()
    });
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(2),
        "the agent did not stop at once"
    );
    let log = refused.log_text();
    assert!(
        log.contains("--insecure-http") && log.contains("in clear"),
        "{log}"
    );
    // With --insecure-http it starts (and keeps retrying the unreachable address).
    let mut allowed = run(&["--insecure-http"]);
    std::thread::sleep(Duration::from_secs(2));
    assert!(allowed.alive(), "{}", allowed.log_text());
    allowed.stop();
}

#[test]
fn mutual_tls_binds_each_report_to_its_certificates_instance() {
    let pki = tempfile::tempdir().unwrap();
    let p = pki.path();
    let ca = make_ca(p, "ca");
    let (cert, key) = issue(p, "ca", "srv", "DNS:localhost,IP:127.0.0.1", "serverAuth");
    let (a_cert, a_key) = issue(p, "ca", "i-a", "DNS:i-a", "clientAuth");
    let (r_cert, r_key) = issue(p, "ca", "reader", "DNS:reader-1", "clientAuth");
    let as_a = https(&ca, Some((&a_cert, &a_key)));
    let as_reader = https(&ca, Some((&r_cert, &r_key)));
    let c = TlsCollector::start(
        &cert,
        &key,
        &["--client-ca", ca.to_str().unwrap()],
        &as_reader,
    );
    let url = c.url("/v1/reports");

    let ok = call(
        &as_a,
        "POST",
        &url,
        Some(AGENT_TOKEN),
        true,
        &phoenix_wire::encode(&report("i-a", 1, 1)),
    )
    .unwrap();
    assert_eq!(ok.status, 200, "{}", ok.body);
    let forged = call(
        &as_a,
        "POST",
        &url,
        Some(AGENT_TOKEN),
        true,
        &phoenix_wire::encode(&report("i-b", 1, 1)),
    )
    .unwrap();
    assert_eq!(forged.status, 403, "{}", forged.body);
    assert!(
        forged.body.contains("i-b") && forged.body.contains("only report for itself"),
        "{}",
        forged.body
    );
    // No client certificate: no connection at all.
    assert!(call(
        &https(&ca, None),
        "POST",
        &url,
        Some(AGENT_TOKEN),
        true,
        &phoenix_wire::encode(&report("i-a", 2, 1))
    )
    .is_err());

    // Real agents: the one whose certificate names it gets through, the impostor does not.
    let certs = |c: &Path, k: &Path| {
        vec![
            "--ca-file".to_string(),
            ca.display().to_string(),
            "--tls-client-cert".into(),
            c.display().to_string(),
            "--tls-client-key".into(),
            k.display().to_string(),
        ]
    };
    let a_args = certs(&a_cert, &a_key);
    let a_args: Vec<&str> = a_args.iter().map(String::as_str).collect();
    let _real = Agent::start(&c.url(""), "i-a", &a_args);
    let impostor = Agent::start(&c.url(""), "i-b", &a_args);
    let listed = |id: &str| {
        let r = call(
            &as_reader,
            "GET",
            &c.url("/v1/instances"),
            Some(READER_TOKEN),
            false,
            b"",
        )
        .unwrap();
        r.json()["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["instance_id"] == id && i["reports"].as_u64().unwrap_or(0) > 1)
            .cloned()
    };
    assert!(
        wait_for(Duration::from_secs(20), || listed("i-a")).is_some(),
        "i-a's agent did not get through; log:\n{}",
        c.log()
    );
    assert!(
        listed("i-b").is_none(),
        "an agent spoke for another instance"
    );
    assert!(
        wait_for(Duration::from_secs(10), || impostor
            .log_text()
            .contains("403")
            .then_some(()))
        .is_some(),
        "{}",
        impostor.log_text()
    );
}

#[test]
fn each_role_is_refused_where_it_does_not_belong_and_no_token_leaks() {
    let c = Collector::start(&["--rate-limit", "off"]);
    let tokens = [
        ("agent", AGENT_TOKEN),
        ("pipeline", PIPELINE_TOKEN),
        ("recycler", RECYCLER_TOKEN),
        ("reader", READER_TOKEN),
    ];
    let routes: [(&str, &str, &[&str]); 6] = [
        ("POST", "/v1/reports", &["agent"]),
        ("POST", "/v1/images/img-x/baseline", &["pipeline"]),
        ("GET", "/v1/instances", &["recycler", "reader"]),
        ("GET", "/v1/instances/i-x", &["recycler", "reader"]),
        // Readers see the queue (the page shows it to them); only recyclers ack.
        ("GET", "/v1/phoenix", &["recycler", "reader"]),
        ("POST", "/v1/phoenix/i-x/ack", &["recycler"]),
    ];
    // A fresh connection per request: a refused request's unread body may end the kept-alive
    // connection, and a POST is not retried on another.
    let call = |method: &str, url: &str, token: Option<&str>, gzip: bool, body: &[u8]| {
        let plain = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build(),
        );
        call(&plain, method, url, token, gzip, body)
    };
    let mut bodies = String::new();
    for (method, path, allowed) in routes {
        let url = format!("{}{path}", c.url());
        for (role, token) in tokens {
            let r = call(method, &url, Some(token), false, b"{}").unwrap();
            if allowed.contains(&role) {
                assert!(
                    r.status != 401 && r.status != 403,
                    "{role} refused on {method} {path}: {} {}",
                    r.status,
                    r.body
                );
            } else {
                assert_eq!(r.status, 403, "{role} token on {method} {path}: {}", r.body);
                assert!(
                    r.json()["error"]
                        .as_str()
                        .is_some_and(|e| e.contains(allowed[0])),
                    "{method} {path}: {}",
                    r.body
                );
            }
            bodies.push_str(&r.body);
        }
        let none = call(method, &url, None, false, b"{}").unwrap();
        assert_eq!(none.status, 401, "{method} {path} without a token");
        let bogus = call(method, &url, Some("bogus-token-value-123"), false, b"{}").unwrap();
        assert_eq!(bogus.status, 401, "{method} {path} with an unknown token");
        // A token that differs from a real one in its last byte is just as unknown.
        let near = call(
            method,
            &url,
            Some(&format!("{}X", &AGENT_TOKEN[..AGENT_TOKEN.len() - 1])),
            false,
            b"{}",
        )
        .unwrap();
        assert_eq!(near.status, 401);
        assert!(
            json_error(&none),
            "{method} {path}: a 401 has a JSON reason: {}",
            none.body
        );
        bodies.push_str(&none.body);
        bodies.push_str(&bogus.body);
    }
    // Unknown routes and methods are refused like the rest: JSON with a reason.
    let r = call("GET", &format!("{}/v1/nosuch", c.url()), None, false, b"").unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(json_error(&r), "{}", r.body);
    let r = call(
        "GET",
        &format!("{}/v1/phoenix/i-x/ack", c.url()),
        None,
        false,
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 405, "{}", r.body);
    assert!(
        r.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("GET is not allowed")),
        "{}",
        r.body
    );
    let log = c.log_text();
    for secret in tokens.iter().map(|t| t.1).chain(["bogus-token-value-123"]) {
        assert!(
            !log.contains(secret),
            "token value {secret:?} in the collector log:\n{log}"
        );
        assert!(
            !bodies.contains(secret),
            "token value {secret:?} echoed in a response"
        );
    }
}

#[test]
fn hostile_reports_are_refused_while_others_are_served() {
    let c = Collector::start(&[
        "--max-report",
        "1MiB",
        "--max-points",
        "5000",
        "--rate-limit",
        "off",
        // This test posts made-up instances itself, as fast as it can, from one address.
        "--identity",
        "shared",
        "--peer-rate-limit",
        "off",
    ]);
    let url = c.url();
    let stop = Arc::new(AtomicBool::new(false));
    let (good, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let bg = {
        let (stop, good, bad) = (stop.clone(), good.clone(), bad.clone());
        std::thread::spawn(move || {
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let r = post(
                    &format!("{url}/v1/reports"),
                    Some(AGENT_TOKEN),
                    &[("Content-Encoding", "gzip")],
                    &phoenix_wire::encode(&report("i-bystander", seq, 5)),
                );
                if r.status == 200 { &good } else { &bad }.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    for _ in 0..3 {
        // 256 MiB of zeros in 250 KiB of gzip.
        let bomb = phoenix_wire::gzip(&vec![0u8; 256 << 20]);
        let r = c.post_raw(&bomb, Some(AGENT_TOKEN), true);
        assert_eq!(r.status, 413, "{}", r.body);
    }
    let mut tags = report("i-tags", 1, 1);
    tags.metrics[0].tags = (0..10_000)
        .map(|i| (format!("t{i}"), "v".to_string()))
        .collect();
    let r = c.post_report(&tags);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("10000 tags"), "{}", r.body);
    let r = c.post_report(&report("i-many", 1, 6000));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("6000 points"), "{}", r.body);
    let mut forged = report("i-forge", 1, 1);
    forged.metrics[0].m = "phoenix_drift".into();
    let r = c.post_report(&forged);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("written by the collector"), "{}", r.body);
    let mut long = report("i-long", 1, 1);
    long.agent.hostname = "h".repeat(300);
    assert_eq!(c.post_report(&long).status, 400);
    stop.store(true, Ordering::Relaxed);
    bg.join().unwrap();
    assert!(
        good.load(Ordering::Relaxed) > 5,
        "the bystander was not served"
    );
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "a bystander's report was refused while hostile ones were"
    );
    assert_eq!(c.get("/healthz", None).status, 200);
}

#[test]
fn a_log_line_crafted_as_line_protocol_arrives_as_one_message() {
    let influx = Influx::start();
    let c = Collector::start(&["--influx-url", &influx.url(), "--influx-db", "crafted"]);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let crafted = [
        "x\\nevil,host=a v=1",
        "evil,host=a v=1 1",
        "x\" \\nevil,host=a v=1 1",
        "x\revil,host=a v=1",
        "x\\\"\nevil2 v=2",
    ];
    // The last one holds a real newline: in a file that is two lines, `x\"` and `evil2 v=2`.
    let lines: Vec<&str> = crafted.iter().flat_map(|l| l.split('\n')).collect();
    std::fs::write(
        &log,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    let _a = Agent::start(
        &c.url(),
        "i-crafted",
        &["--log", log.to_str().unwrap(), "--log-initial", "start"],
    );
    let q = format!("SELECT message FROM log WHERE path = '{}'", log.display());
    let rows = wait_for(Duration::from_secs(30), || {
        let r = influx.rows("crafted", &q);
        (r.len() >= lines.len()).then_some(r)
    });
    let rows = rows
        .unwrap_or_else(|| panic!("log lines did not arrive; collector log:\n{}", c.log_text()));
    let mut got: Vec<String> = rows
        .iter()
        .map(|r| r["message"].as_str().unwrap().to_string())
        .collect();
    let mut want: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "each line is exactly one message");
    let names = measurements(&influx, "crafted");
    assert!(
        names.iter().all(|n| !n.starts_with("evil")),
        "injected measurement in {names:?}"
    );
    assert!(names.contains(&"log".to_string()));
}

#[test]
fn a_flooding_instance_gets_429_and_the_rest_of_the_fleet_does_not() {
    let pki = tempfile::tempdir().unwrap();
    let ca = make_ca(pki.path(), "ca");
    let (cert, key) = issue(
        pki.path(),
        "ca",
        "srv",
        "DNS:localhost,IP:127.0.0.1",
        "serverAuth",
    );
    let http = https(&ca, None);
    let c = TlsCollector::start(
        &cert,
        &key,
        // Made-up instances posted by the test itself: per-instance limits, not identity.
        &[
            "--rate-limit",
            "20/s",
            "--rate-burst",
            "20",
            "--identity",
            "shared",
            "--peer-rate-limit",
            "off",
        ],
        &http,
    );
    let url = c.url("/v1/reports");
    let calm = {
        let (http, url) = (http.clone(), url.clone());
        std::thread::spawn(move || {
            (1..=15u64)
                .map(|seq| {
                    std::thread::sleep(Duration::from_millis(200));
                    call(
                        &http,
                        "POST",
                        &url,
                        Some(AGENT_TOKEN),
                        true,
                        &phoenix_wire::encode(&report("i-calm", seq, 3)),
                    )
                    .unwrap()
                    .status
                })
                .collect::<Vec<u16>>()
        })
    };
    let (mut ok, mut limited, mut seq) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        seq += 1;
        let r = call(
            &http,
            "POST",
            &url,
            Some(AGENT_TOKEN),
            true,
            &phoenix_wire::encode(&report("i-flood", seq, 3)),
        )
        .unwrap();
        match r.status {
            200 => ok += 1,
            429 => {
                limited += 1;
                let after: u64 = r
                    .header("retry-after")
                    .expect("429 without Retry-After")
                    .parse()
                    .unwrap();
                assert!((1..=2).contains(&after), "Retry-After {after}");
            }
            s => panic!("flood got {s}: {}", r.body),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let calm = calm.join().unwrap();
    assert!(
        calm.iter().all(|s| *s == 200),
        "the calm instance was limited: {calm:?}"
    );
    // 20 of burst + 20/s for 3 s, give or take the clock.
    assert!((60..=95).contains(&ok), "{ok} accepted from the flood");
    println!(
        "FIGURE flood: one instance sent {} reports in {secs:.1}s over TLS with --rate-limit 20/s --rate-burst 20: {ok} accepted, {limited} refused with 429 ({:.1}% refused); a calm instance beside it: {} of {} accepted",
        ok + limited,
        100.0 * limited as f64 / (ok + limited) as f64,
        calm.len(),
        calm.len()
    );
}

#[test]
fn load_figure_reports_per_second_over_tls() {
    let pki = tempfile::tempdir().unwrap();
    let ca = make_ca(pki.path(), "ca");
    let (cert, key) = issue(
        pki.path(),
        "ca",
        "srv",
        "DNS:localhost,IP:127.0.0.1",
        "serverAuth",
    );
    let influx = Influx::start();
    let probe = https(&ca, None);
    let c = TlsCollector::start(
        &cert,
        &key,
        &[
            "--influx-url",
            &influx.url(),
            "--influx-db",
            "load",
            "--identity",
            "shared",
            "--peer-rate-limit",
            "off",
            "--rate-limit",
            "off",
        ],
        &probe,
    );
    let secs: f64 = std::env::var("PHOENIX_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let senders = 8;
    let points = 20;
    let total = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..senders)
        .map(|t| {
            let (url, total, ca) = (c.url("/v1/reports"), total.clone(), ca.clone());
            std::thread::spawn(move || {
                // One client (one kept-alive TLS connection) per simulated agent.
                let http = https(&ca, None);
                let mut seq = 0;
                while start.elapsed().as_secs_f64() < secs {
                    seq += 1;
                    let r = call(
                        &http,
                        "POST",
                        &url,
                        Some(AGENT_TOKEN),
                        true,
                        &phoenix_wire::encode(&report(&format!("i-load-{t}"), seq, points)),
                    )
                    .unwrap();
                    assert_eq!(r.status, 200, "{}", r.body);
                    total.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let took = start.elapsed().as_secs_f64();
    let n = total.load(Ordering::Relaxed);
    let stored = influx.count("load", "SELECT count(v) FROM secload");
    assert_eq!(
        stored,
        n * points as u64,
        "every acked point is in InfluxDB"
    );
    println!(
        "FIGURE load: {n} reports ({} points) in {took:.1}s over TLS from {senders} concurrent senders = {:.0} reports/s ({:.0} points/s), all acked after InfluxDB took them",
        n * points as u64,
        n as f64 / took,
        (n * points as u64) as f64 / took
    );
    assert!(n as f64 / took > 20.0, "under 20 reports/s");
}
