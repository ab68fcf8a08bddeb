//! The fleet page in a real headless Chromium, driven through chromedriver's W3C WebDriver
//! HTTP API, against a collector fed by real agents: the page lists the instances, shows a
//! drifted instance's changed file and a marked one's reason, updates itself without a
//! reload, escapes what agents send, and fits a phone's width. The fleet list has checks,
//! drift and trend columns and links to Grafana; an instance page shows processes, sockets and
//! a diagnostics snapshot its button asked for; an instance in grace that goes quiet shows
//! `suspect`, then `silent`. Screenshots of the fleet and of an instance page are written to
//! `docs/page-fleet.png` and `docs/page-instance.png` (1280x800); the others are kept under
//! `<target>/page-test/`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (installed by `.ci/run` via
//! `.ci/packages`). `PHOENIX_TEST_CHROMIUM` and `PHOENIX_TEST_CHROMEDRIVER` override the
//! binaries.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use phoenix_e2e::*;
use serde_json::{json, Value};

fn target_dir() -> PathBuf {
    if let Ok(d) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(d);
    }
    // target/<profile>/deps/<test-binary>
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

fn chromium_binary() -> String {
    if let Ok(b) = std::env::var("PHOENIX_TEST_CHROMIUM") {
        return b;
    }
    // Debian's /usr/bin/chromium is a shell wrapper; chromedriver wants the browser itself.
    for p in ["/usr/lib/chromium/chromium", "/usr/bin/chromium"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("no Chromium found: apt-get install -y chromium chromium-driver (CI installs them from .ci/packages), or set PHOENIX_TEST_CHROMIUM");
}

/// One browser session through chromedriver, ended (and the driver killed) on drop.
struct Browser {
    base: String,
    session: String,
    http: ureq::Agent,
    _driver: Proc,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let port = free_port();
        let driver_bin =
            std::env::var("PHOENIX_TEST_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let mut cmd = Command::new(&driver_bin);
        cmd.arg(format!("--port={port}"));
        let driver = Proc::spawn(cmd, profile.path().join("chromedriver.log"));
        let base = format!("http://127.0.0.1:{port}");
        let http = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(60)))
                .http_status_as_error(false)
                .build(),
        );
        let ready = wait_for(Duration::from_secs(20), || {
            let mut r = http.get(&format!("{base}/status")).call().ok()?;
            let v: Value = r.body_mut().read_json().ok()?;
            (v["value"]["ready"] == true).then_some(())
        });
        assert!(
            ready.is_some(),
            "chromedriver ({driver_bin}) did not come up; log:\n{}",
            driver.log_text()
        );
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-domain-reliability",
            "--disable-client-side-phishing-detection",
            "--disable-features=Translate,OptimizationHints,MediaRouter",
            // Anything not on loopback goes to a dead proxy: the test talks to nothing else.
            "--proxy-server=127.0.0.1:9",
            "--window-size=1200,1400",
            &format!(
                "--user-data-dir={}",
                profile.path().join("profile").display()
            ),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {"binary": chromium_binary(), "args": args}}}});
        let mut r = http
            .post(&format!("{base}/session"))
            .send_json(&caps)
            .expect("creating a WebDriver session");
        let v: Value = r.body_mut().read_json().unwrap();
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}\nchromedriver log:\n{}", driver.log_text()))
            .to_owned();
        Browser {
            base,
            session,
            http,
            _driver: driver,
            _profile: profile,
        }
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let r = match (method, body) {
            ("GET", _) => self.http.get(&url).call(),
            ("DELETE", _) => self.http.delete(&url).call(),
            (_, b) => self.http.post(&url).send_json(b.unwrap_or(json!({}))),
        };
        let mut r = r.unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let status = r.status().as_u16();
        let v: Value = r.body_mut().read_json().unwrap();
        assert!(
            status == 200,
            "WebDriver {method} {path}: HTTP {status}: {v}"
        );
        v["value"].clone()
    }

    fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    /// Run `script` (a function body) in the page; its return value.
    fn eval(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
    }

    /// Poll the page (never reloading it) until `script` returns something truthy.
    fn wait_js(&self, what: &str, timeout: Duration, script: &str) -> Value {
        let got = wait_for(timeout, || {
            let v = self.eval(script);
            let truthy = !(v.is_null() || v == false || v == "" || v == 0);
            truthy.then_some(v)
        });
        got.unwrap_or_else(|| {
            panic!(
                "{what}: not seen within {timeout:?}; page text:\n{}",
                self.eval("return document.body.innerText")
            )
        })
    }

    fn screenshot(&self, path: &Path) {
        let b64 = self.cmd("GET", "/screenshot", None);
        let png = base64_decode(b64.as_str().expect("screenshot is base64 text"));
        assert!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
        // Straight to stderr, past the test harness's capture, so CI logs name the artifact.
        std::io::Write::write_all(
            &mut std::io::stderr(),
            format!("screenshot: {}\n", path.display()).as_bytes(),
        )
        .ok();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.http
            .delete(&format!("{}/session/{}", self.base, self.session))
            .call()
            .ok();
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let clean: Vec<u8> = s
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (k, c) in chunk.iter().enumerate() {
            n |= u32::from(val(*c)) << (18 - 6 * k);
        }
        out.push((n >> 16) as u8);
        if chunk.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(n as u8);
        }
    }
    out
}

/// `state|reason` of an instance's row in the fleet table as the page shows it now.
fn row_js(id: &str) -> String {
    format!(
        "var r = document.querySelector('#instances tr[data-instance=\"{id}\"]'); if (!r) return null; var reason = r.querySelector('.reason'); return r.getAttribute('data-state') + '|' + (reason ? reason.textContent : '');"
    )
}

#[test]
fn fleet_page_in_headless_chromium() {
    let influx = Influx::start();
    let c = Collector::start(&[
        "--influx-url",
        &influx.url(),
        "--influx-db",
        "page",
        "--grace",
        "1s",
        "--grafana-url",
        "http://grafana.invalid:3000/",
        // Whether this box runs SSH (or another test listens on :22) is the machine's
        // business here; the ssh rule has its own test (diagnose.rs).
        "--ssh-allowed",
    ]);
    let tmp = tempfile::tempdir().unwrap();

    // An image baked from a small tree, its baseline registered with the collector.
    let tree = tmp.path().join("etc");
    std::fs::create_dir_all(tree.join("app")).unwrap();
    std::fs::write(tree.join("app/app.conf"), "listen = 8080\n").unwrap();
    std::fs::write(tree.join("app/db.conf"), "host = db\n").unwrap();
    let base = tmp.path().join("baseline.json");
    let out = Command::new(bin("phoenix-agent"))
        .arg("bake")
        .arg("--drift-path")
        .arg(&tree)
        .args(["--image-id", "img-db"])
        .arg("--out")
        .arg(&base)
        .args(["--register", &c.url(), "--token", PIPELINE_TOKEN])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bake: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let app_log = tmp.path().join("app.log");
    std::fs::write(&app_log, "").unwrap();
    let closed = free_port().to_string();
    let db_args = [
        "--group",
        "db",
        "--image-id",
        "img-db",
        "--drift-path",
        tree.to_str().unwrap(),
        "--baseline",
        base.to_str().unwrap(),
    ];
    let _agents = [
        Agent::start(
            &c.url(),
            "i-web-1",
            &["--group", "web", "--log", app_log.to_str().unwrap()],
        ),
        Agent::start(
            &c.url(),
            "i-web-2",
            &[
                "--group",
                "web",
                "--check",
                &format!("db=tcp:127.0.0.1:{closed}"),
            ],
        ),
        Agent::start(&c.url(), "i-db-1", &db_args),
        Agent::start(&c.url(), "i-db-2", &db_args),
    ];
    let listed = |n: usize| {
        wait_for(Duration::from_secs(30), || {
            (c.get("/v1/instances", Some(READER_TOKEN)).json()["instances"]
                .as_array()?
                .len()
                >= n)
                .then_some(())
        })
    };
    assert!(
        listed(4).is_some(),
        "agents did not report; collector log:\n{}",
        c.log_text()
    );

    let b = Browser::start();
    b.goto(&format!("{}/", c.url()));
    // Something only this page load has: a reload would lose it.
    b.eval("window.__phoenixLoad = 'first'; return true;");
    let ids = b.wait_js("the four instances", Duration::from_secs(10), "var ids = Array.from(document.querySelectorAll('#instances tr[data-instance]')).map(function (r) { return r.getAttribute('data-instance'); }); return ids.length >= 4 ? ids.join(',') : null;");
    assert_eq!(
        ids, "i-db-1,i-db-2,i-web-1,i-web-2",
        "grouped by group (db before web), sorted within"
    );
    let groups = b.eval("return Array.from(document.querySelectorAll('#instances h2[data-group]')).map(function (h) { return h.getAttribute('data-group'); }).join(',');");
    assert_eq!(groups, "db,web");
    let cell = |id: &str, label: &str| {
        b.eval(&format!("var c = document.querySelector('#instances tr[data-instance=\"{id}\"] td[data-label=\"{label}\"]'); return c ? c.textContent : null;"))
    };
    assert!(
        cell("i-web-1", "Last seen")
            .as_str()
            .unwrap()
            .contains("s ago"),
        "last seen"
    );
    assert!(cell("i-web-1", "CPU").as_str().unwrap().ends_with('%'));
    assert!(cell("i-web-1", "Mem").as_str().unwrap().ends_with('%'));
    assert_eq!(cell("i-web-1", "Agent"), env!("CARGO_PKG_VERSION"));
    // The checks column: no checks, or the failing ones by name; the drift column.
    assert_eq!(cell("i-web-1", "Checks"), "–");
    let failing = b.wait_js("i-web-2's failing check in the list", Duration::from_secs(45), "var c = document.querySelector('#instances tr[data-instance=\"i-web-2\"] td[data-label=\"Checks\"]'); return c && c.textContent.indexOf('failing') === 0 ? c.textContent : null;");
    assert_eq!(failing, "failing: db");
    assert_eq!(cell("i-web-1", "Drift"), "unknown", "no --drift-path");
    assert_eq!(cell("i-db-1", "Drift"), "clean");
    // A sparkline per instance from the collector's own figures, growing with each report.
    let samples = b.wait_js("a sparkline of a few reports", Duration::from_secs(45), "var s = document.querySelector('#instances tr[data-instance=\"i-web-1\"] svg.spark'); var n = s ? parseInt(s.getAttribute('data-samples'), 10) : 0; return n >= 3 && s.querySelector('path.cpu').getAttribute('d').indexOf('L') > 0 ? n : null;");
    assert!(samples.as_i64().unwrap() >= 3, "{samples}");
    let title = b.eval("return document.querySelector('#instances tr[data-instance=\"i-web-1\"] svg.spark title').textContent;");
    assert!(
        title.as_str().unwrap().contains("CPU") && title.as_str().unwrap().contains("memory"),
        "{title}"
    );
    // Links: Grafana per instance and in the header, the policy preview.
    assert_eq!(
        b.eval("return document.querySelector('#instances tr[data-instance=\"i-web-1\"] a.grafana').getAttribute('href');"),
        "http://grafana.invalid:3000/d/phoenix-fleet/phoenix-fleet?var-instance=i-web-1"
    );
    assert_eq!(
        b.eval("return document.getElementById('preview-link').getAttribute('href');"),
        "/v1/phoenix/preview"
    );

    // The failing check gets i-web-2 marked; the page shows it without a reload.
    let st = b.wait_js("i-web-2 marked for its failing check", Duration::from_secs(20), &format!("var s = (function () {{ {} }})(); return s && s.indexOf('marked|check_failed') === 0 ? s : null;", row_js("i-web-2")));
    assert_eq!(st, "marked|check_failed");

    // Change a watched file: both db instances drift; the budget (1 of a group of 2) marks one
    // and holds the other.
    std::fs::write(tree.join("app/app.conf"), "listen = 9090\n").unwrap();
    b.wait_js("a drift mark and a held one", Duration::from_secs(20), "var m = document.querySelectorAll('#marked tr[data-instance^=\"i-db-\"]').length; var h = document.querySelectorAll('#held tr[data-instance^=\"i-db-\"]').length; return m === 1 && h === 1;");
    let marked_db = b.eval("return document.querySelector('#marked tr[data-instance^=\"i-db-\"]').getAttribute('data-instance');");
    let marked_db = marked_db.as_str().unwrap().to_owned();
    let held_db = if marked_db == "i-db-1" {
        "i-db-2"
    } else {
        "i-db-1"
    };
    assert_eq!(b.eval(&row_js(&marked_db)), "marked|drift");
    assert_eq!(b.eval(&row_js(held_db)), "drifted|drift");
    let held_text = b.eval("return document.querySelector('#held').innerText;");
    assert!(
        held_text.as_str().unwrap().contains("budget"),
        "held because of the budget: {held_text}"
    );
    let drift = b.wait_js("the drift column", Duration::from_secs(45), &format!("var c = document.querySelector('#instances tr[data-instance=\"{held_db}\"] td[data-label=\"Drift\"]'); return c && c.textContent.indexOf('drifted') === 0 ? c.textContent : null;"));
    assert_eq!(drift, "drifted (1 change)");
    let budget = b.eval("return Array.from(document.querySelectorAll('table.budget tr')).map(function (r) { return r.innerText; }).join('\\n');");
    assert!(
        budget.as_str().unwrap().contains("1 of 1"),
        "budget in use: {budget}"
    );

    // A new instance appears on the open page.
    let _late = Agent::start(&c.url(), "i-web-3", &["--group", "web"]);
    b.wait_js(
        "i-web-3 on the open page",
        Duration::from_secs(15),
        "return !!document.querySelector('#instances tr[data-instance=\"i-web-3\"]');",
    );
    assert_eq!(
        b.eval("return window.__phoenixLoad || null;"),
        "first",
        "the page was reloaded instead of updated"
    );
    let shots = target_dir().join("page-test");
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    // A desk's screen for the screenshots kept in docs/.
    b.cmd("POST", "/goog/cdp/execute", Some(json!({"cmd": "Emulation.setDeviceMetricsOverride", "params": {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": false}})));
    b.wait_js(
        "five sparklines",
        Duration::from_secs(45),
        "return document.querySelectorAll('#instances svg.spark').length >= 5;",
    );
    b.screenshot(&docs.join("page-fleet.png"));

    // Drill-down of the drifted, marked instance: its changed file and its reason.
    b.goto(&format!("{}/instances/{marked_db}", c.url()));
    let change = b.wait_js(
        "the changed file",
        Duration::from_secs(10),
        "var r = document.querySelector('#changes tr.change'); return r ? r.innerText : null;",
    );
    let change = change.as_str().unwrap();
    assert!(
        change.contains("app/app.conf") && change.contains("changed") && change.contains("content"),
        "{change}"
    );
    // Old → new per attribute, as the agent compared them with its baseline: the content as
    // a short hash, never the contents themselves.
    assert!(
        change.contains(" → ") && !change.contains("9090"),
        "old → new values, no contents: {change}"
    );
    assert_eq!(
        b.eval("return document.getElementById('reason').textContent;"),
        "drift"
    );
    // Its top processes (the agent's procstat points; the agent always lists itself, maybe
    // in the fold past the first rows, whose text a closed <details> hides from innerText) and
    // what listens on the box (the collector itself, at least).
    let me = b.wait_js("the agent among the top processes", Duration::from_secs(45), "var r = Array.from(document.querySelectorAll('#processes tr.proc')).filter(function (r) { return r.textContent.indexOf('phoenix-agent') >= 0; }); return r.length ? r[0].textContent : null;");
    assert!(me.as_str().unwrap().contains("MiB"), "RSS shown: {me}");
    let port = c.port;
    b.wait_js(
        "the collector's port among the listening sockets",
        Duration::from_secs(45),
        &format!("return !!document.querySelector('#listening tr.sock[data-port=\"{port}\"]');"),
    );
    let ssh = b.eval("return document.getElementById('ssh').innerText;");
    assert!(
        ssh.as_str().unwrap().contains("Off") || ssh.as_str().unwrap().contains("SSH is on"),
        "{ssh}"
    );
    // The diagnostics button: the page's own script asks, the agent answers with its next
    // report, and the snapshot shows with the agent's own process in it.
    assert!(b.eval("return document.getElementById('no-diag') !== null;") == true);
    b.eval("document.getElementById('diag-request').click(); return true;");
    let latest = b.wait_js(
        "a diagnostics snapshot",
        Duration::from_secs(45),
        "var l = document.getElementById('diag-latest'); return l ? l.innerText : null;",
    );
    assert!(latest.as_str().unwrap().contains("full"), "{latest}");
    // The busiest processes of the snapshot, with their command lines; secrets masked.
    let rows = b.eval("return document.querySelectorAll('#diag-processes tr.dproc').length;");
    assert!(rows.as_i64().unwrap() >= 5, "{rows} rows");
    let text = b.eval("return document.getElementById('diagnostics').textContent;");
    assert!(
        !text.as_str().unwrap().contains(AGENT_TOKEN),
        "a token shown on the page"
    );
    let (st, body) = {
        let r = c.get(
            &format!("/v1/instances/{marked_db}/diagnostics"),
            Some(READER_TOKEN),
        );
        (r.status, r.body)
    };
    assert_eq!(st, 200);
    let snap: Value = serde_json::from_str(&body).unwrap();
    let procs = snap["latest"]["snapshot"]["processes"].as_array().unwrap();
    assert!(
        procs.iter().any(|p| p["name"] == "phoenix-agent"),
        "the agent's own process is in the snapshot"
    );
    assert!(
        body.contains("\"requested_by\":\"loopback\""),
        "asked from the page on loopback: {body}"
    );
    // An open section stays open across the page's refresh.
    b.eval("var d = document.getElementById('diag-sockets'); d.open = true; d.__before = 1; return true;");
    b.wait_js(
        "the page's next refresh",
        Duration::from_secs(45),
        "var d = document.getElementById('diag-sockets'); return d && !d.__before;",
    );
    assert_eq!(
        b.eval("return document.getElementById('diag-sockets').open;"),
        true
    );
    b.eval("window.scrollTo(0, 0); return true;");
    b.screenshot(&docs.join("page-instance.png"));

    // The failed check and the last log lines, hostile text shown as text.
    b.goto(&format!("{}/instances/i-web-2", c.url()));
    let check = b.wait_js("the failed check", Duration::from_secs(10), "var r = document.querySelector('tr.check.fail[data-check=\"db\"]'); return r ? r.innerText : null;");
    assert!(check.as_str().unwrap().contains("failed"), "{check}");
    b.goto(&format!("{}/instances/i-web-1", c.url()));
    b.eval("window.__phoenixLoad = 'drill'; return true;");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&app_log)
            .unwrap();
        writeln!(f, "GET /login 200").unwrap();
        writeln!(
            f,
            "GET /<img src=x onerror=\"window.__pwned=1\"><b>bold</b> 404"
        )
        .unwrap();
    }
    let newest = b.wait_js("the log lines", Duration::from_secs(15), "var l = document.querySelectorAll('#logs li.log .msg'); return l.length >= 2 ? l[0].textContent : null;");
    assert_eq!(
        newest, "GET /<img src=x onerror=\"window.__pwned=1\"><b>bold</b> 404",
        "newest first, shown as text"
    );
    assert_eq!(
        b.eval("return document.querySelectorAll('#logs img, #logs b').length;"),
        0,
        "agent text became markup"
    );
    assert_eq!(b.eval("return window.__pwned || null;"), Value::Null);
    assert_eq!(
        b.eval("return window.__phoenixLoad || null;"),
        "drill",
        "the drill-down reloaded instead of updating"
    );

    // A phone's width: rows become cards, nothing scrolls sideways.
    b.cmd("POST", "/goog/cdp/execute", Some(json!({"cmd": "Emulation.setDeviceMetricsOverride", "params": {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": true}})));
    b.goto(&format!("{}/", c.url()));
    b.wait_js(
        "the page at phone width",
        Duration::from_secs(10),
        "return document.querySelectorAll('#instances tr[data-instance]').length >= 5;",
    );
    assert_eq!(b.eval("return window.innerWidth;"), 390);
    assert_eq!(
        b.eval("return getComputedStyle(document.querySelector('#instances thead')).display;"),
        "none"
    );
    let overflow = b.eval("return document.documentElement.scrollWidth - window.innerWidth;");
    assert!(
        overflow.as_i64().unwrap() <= 0,
        "the page is wider than the phone by {overflow} px"
    );
    b.screenshot(&shots.join("fleet-phone.png"));
}

#[test]
fn an_instance_in_grace_that_goes_quiet_shows_suspect_then_silent() {
    // Grace is long, so silence marks nothing yet; the page must still show that the box
    // stopped (three intervals: suspect; --silent-after: silent), while the queue's state
    // stays `new`.
    let c = Collector::start(&["--grace", "10m", "--silent-after", "15s", "--ssh-allowed"]);
    let mut quiet = Agent::start(&c.url(), "i-quiet", &["--group", "web"]);
    let _talker = Agent::start(&c.url(), "i-talker", &["--group", "web"]);
    let b = Browser::start();
    b.goto(&format!("{}/", c.url()));
    let state = |id: &str| {
        format!("var r = document.querySelector('#instances tr[data-instance=\"{id}\"]'); return r ? r.getAttribute('data-state') + '|' + r.querySelector('td[data-label=\"State\"]').textContent : null;")
    };
    assert_eq!(
        b.wait_js("i-quiet listed", Duration::from_secs(45), &state("i-quiet")),
        "new|new"
    );
    quiet.kill();
    let st = b.wait_js(
        "i-quiet suspect",
        Duration::from_secs(45),
        &format!(
            "var s = (function () {{ {} }})(); return s === 'suspect|suspect' ? s : null;",
            state("i-quiet")
        ),
    );
    assert_eq!(st, "suspect|suspect");
    b.wait_js(
        "i-talker, still reporting, new",
        Duration::from_secs(45),
        &format!(
            "var s = (function () {{ {} }})(); return s === 'new|new';",
            state("i-talker")
        ),
    );
    let v = c.get("/v1/instances/i-quiet", Some(READER_TOKEN)).json();
    assert_eq!(
        v["state"], "new",
        "the queue's state: nothing is marked in grace"
    );
    b.wait_js(
        "i-quiet silent",
        Duration::from_secs(45),
        &format!(
            "var s = (function () {{ {} }})(); return s === 'silent|silent';",
            state("i-quiet")
        ),
    );
    // The summary counts what the rows show, and the instance page says for how long.
    let chips = b.eval("return document.getElementById('summary').innerText;");
    assert!(chips.as_str().unwrap().contains("1 silent"), "{chips}");
    b.goto(&format!("{}/instances/i-quiet", c.url()));
    let silence = b.wait_js(
        "the silence on the instance page",
        Duration::from_secs(45),
        "var s = document.getElementById('silence'); return s ? s.textContent : null;",
    );
    assert!(silence.as_str().unwrap().contains("in grace"), "{silence}");
}

#[test]
fn page_answers_plain_http_clients_with_escaped_html() {
    // Without a browser: what curl sees, from loopback (open). Ids are restricted by the wire
    // format, but a hostname or an agent version can hold markup.
    let c = Collector::start(&[]);
    let evil = "<script>x</script>";
    let r = phoenix_wire::Report {
        v: phoenix_wire::VERSION,
        agent: phoenix_wire::Identity {
            instance_id: "i/evil:1".into(),
            image_id: "img".into(),
            group: None,
            hostname: evil.into(),
            boot_id: "b".into(),
            version: evil.into(),
            boot_time: 0,
        },
        seq: 1,
        interval_ms: 1000,
        metrics: vec![phoenix_wire::Point {
            m: "procstat".into(),
            tags: [
                ("process_name".to_string(), evil.to_string()),
                ("user".to_string(), "root".to_string()),
            ]
            .into(),
            fields: [("pid".to_string(), phoenix_wire::Value::Int(7))].into(),
            ts: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as i64,
        }],
        logs: vec![],
        drift: None,
        checks: vec![phoenix_wire::CheckResult {
            name: "web".into(),
            ok: false,
            detail: format!("HTTP 500 {evil}"),
            duration_ms: 2,
        }],
        drift_root: None,
        protected: None,
    };
    let ack = c.post_report(&r);
    assert_eq!(ack.status, 200, "{}", ack.body);
    let page = c.get("/", None);
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page
        .header("content-security-policy")
        .unwrap()
        .contains("default-src 'none'"));
    assert!(page.body.contains("&lt;script&gt;x&lt;/script&gt;"));
    assert!(!page.body.contains("<script>x"));
    assert!(
        page.body.contains("href=\"/instances/i%2Fevil%3A1\""),
        "the link encodes the id"
    );
    let frag = c.get("/?fragment=1", None);
    assert!(
        frag.body.starts_with("<ul class=\"chips\""),
        "a fragment, not a whole page: {}",
        &frag.body[..80.min(frag.body.len())]
    );
    let inst = c.get("/instances/i%2Fevil%3A1", None);
    assert_eq!(inst.status, 200, "{}", inst.body);
    assert!(inst.body.contains("data-instance=\"i/evil:1\""));
    assert!(!inst.body.contains("<script>x"));
    assert!(
        inst.body
            .contains("HTTP 500 &lt;script&gt;x&lt;/script&gt;"),
        "the check detail, escaped"
    );
    assert!(
        inst.body
            .contains("<code>&lt;script&gt;x&lt;/script&gt;</code>"),
        "the process name, escaped"
    );
    assert_eq!(
        inst.body.matches("<script").count(),
        1,
        "only the page's own"
    );
    assert_eq!(c.get("/instances/nobody", None).status, 404);
    // ?token= with a reader token sets the cookie and drops the token from the address.
    let no_redirects = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .max_redirects(0)
            .http_status_as_error(false)
            .build(),
    );
    let r = no_redirects
        .get(&format!("{}/?token={READER_TOKEN}", c.url()))
        .call()
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/");
    let cookie = r.headers()["set-cookie"].to_str().unwrap();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert_eq!(c.get("/?token=wrong", None).status, 401);
}

#[test]
fn over_https_loopback_is_still_open_and_the_cookie_is_secure() {
    // The TLS server records the peer address too, so "open on loopback" holds under HTTPS.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(d.join("key.pem"))
        .arg("-out")
        .arg(d.join("cert.pem"))
        .output()
        .expect("running openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    let mut cmd = Command::new(bin("phoenix-collector"));
    cmd.args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(d.join("data"))
        .arg("--tls-cert")
        .arg(d.join("cert.pem"))
        .arg("--tls-key")
        .arg(d.join("key.pem"));
    cmd.args(["--agent-token", AGENT_TOKEN, "--reader-token", READER_TOKEN]);
    let collector = Proc::spawn(cmd, d.join("collector.log"));
    let curl = |path: &str| -> (String, String) {
        let out = Command::new("curl")
            .args(["-sk", "-D", "-", "-o", "/dev/null", "--max-time", "10"])
            .arg(format!("https://127.0.0.1:{port}{path}"))
            .output()
            .expect("running curl");
        let head = String::from_utf8_lossy(&out.stdout).to_string();
        (
            head.split_whitespace().nth(1).unwrap_or("").to_owned(),
            head,
        )
    };
    let up = wait_for(Duration::from_secs(30), || {
        (curl("/healthz").0 == "200").then_some(())
    });
    assert!(
        up.is_some(),
        "collector did not come up over HTTPS:\n{}",
        collector.log_text()
    );
    let (status, head) = curl("/");
    assert_eq!(status, "200", "{head}");
    let (status, head) = curl(&format!("/?token={READER_TOKEN}"));
    assert_eq!(status, "303", "{head}");
    let cookie = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("{head}"));
    assert!(
        cookie.contains("; Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
}
