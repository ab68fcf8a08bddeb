//! Harness for end-to-end tests: a real `influxd` on free loopback ports with its own data
//! dir, and the real `phoenix-collector` and `phoenix-agent` binaries of this workspace.
//!
//! Env: `PHOENIX_TEST_INFLUXD` names the influxd binary (default `influxd` on PATH).

pub mod net;

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod decide;
pub mod nofile;
pub mod pg;
pub mod trust;

pub const AGENT_TOKEN: &str = "agent-secret-1";
pub const RECYCLER_TOKEN: &str = "recycler-secret-1";
pub const PIPELINE_TOKEN: &str = "pipeline-secret-1";
pub const READER_TOKEN: &str = "reader-secret-1";

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Poll `f` until it gives Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

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

/// Path of a workspace binary, built once per test process in the test's own profile.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "phoenix-agent",
            "-p",
            "phoenix-collector",
            "--bins",
        ]);
        if release {
            cmd.arg("--release");
        }
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .join("Cargo.toml");
        cmd.arg("--manifest-path")
            .arg(manifest)
            .env("CARGO_TARGET_DIR", target_dir());
        let st = cmd
            .status()
            .expect("running cargo build for the binaries under test");
        assert!(
            st.success(),
            "building phoenix-agent and phoenix-collector failed"
        );
        profile_dir
    });
    dir.join(name)
}

fn http() -> ureq::Agent {
    let cfg = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(20)))
        .http_status_as_error(false)
        .build();
    ureq::Agent::new_with_config(cfg)
}

/// An HTTP answer, read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn read(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Resp {
    let mut r = r.expect("HTTP request failed");
    let headers = r
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let mut body = String::new();
    r.body_mut().as_reader().read_to_string(&mut body).ok();
    Resp {
        status: r.status().as_u16(),
        headers,
        body,
    }
}

pub fn get(url: &str, token: Option<&str>) -> Resp {
    let mut req = http().get(url);
    if let Some(t) = token {
        req = req.header("Authorization", &format!("Bearer {t}"));
    }
    read(req.call())
}

pub fn post(url: &str, token: Option<&str>, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut req = http().post(url);
    if let Some(t) = token {
        req = req.header("Authorization", &format!("Bearer {t}"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    read(req.send(body))
}

/// A child process killed when dropped.
#[derive(Debug)]
pub struct Proc {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        Proc {
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }

    /// SIGTERM, then wait up to 10 s (SIGKILL after).
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > end {
                c.kill().ok();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A throw-away influxd bound to loopback only, with reporting and `_internal` off.
#[derive(Debug)]
pub struct Influx {
    pub dir: tempfile::TempDir,
    pub port: u16,
    rpc_port: u16,
    extra_http: String,
    pub proc: Option<Proc>,
}

impl Influx {
    pub fn start() -> Influx {
        Self::start_with("")
    }

    /// `extra_http` is appended to the [http] section (e.g. `max-body-size = 2000`).
    pub fn start_with(extra_http: &str) -> Influx {
        let mut i = Influx {
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            rpc_port: free_port(),
            extra_http: extra_http.into(),
            proc: None,
        };
        i.up();
        i
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// (Re)start on the same ports and data.
    pub fn up(&mut self) {
        let d = self.dir.path();
        let conf = format!(
            "reporting-disabled = true\nbind-address = \"127.0.0.1:{rpc}\"\n[meta]\n  dir = \"{d}/meta\"\n[data]\n  dir = \"{d}/data\"\n  wal-dir = \"{d}/wal\"\n  query-log-enabled = false\n[http]\n  bind-address = \"127.0.0.1:{port}\"\n  log-enabled = false\n{extra}\n[monitor]\n  store-enabled = false\n",
            rpc = self.rpc_port,
            d = d.display(),
            port = self.port,
            extra = self.extra_http
        );
        std::fs::write(d.join("influxdb.conf"), conf).unwrap();
        let bin = std::env::var("PHOENIX_TEST_INFLUXD").unwrap_or_else(|_| "influxd".into());
        let mut cmd = Command::new(bin);
        cmd.arg("-config").arg(d.join("influxdb.conf"));
        self.proc = Some(Proc::spawn(cmd, d.join("influxd.log")));
        let url = format!("{}/ping", self.url());
        wait_for(Duration::from_secs(20), || {
            (http().get(&url).call().ok()?.status() == 204).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "influxd did not answer /ping; log:\n{}",
                self.proc.as_ref().unwrap().log_text()
            )
        });
    }

    pub fn down(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    pub fn create_db(&self, db: &str) {
        let r = post(
            &format!("{}/query", self.url()),
            None,
            &[("Content-Type", "application/x-www-form-urlencoded")],
            format!("q=CREATE DATABASE \"{db}\"").as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }

    /// Run an InfluxQL query; the first statement's result.
    pub fn query(&self, db: &str, q: &str) -> Value {
        let url = format!("{}/query?db={}&epoch=ns&q={}", self.url(), db, urlencode(q));
        let r = get(&url, None);
        assert_eq!(r.status, 200, "query {q}: {}", r.body);
        r.json()["results"][0].clone()
    }

    /// Rows of a query as (columns, values).
    pub fn rows(&self, db: &str, q: &str) -> Vec<serde_json::Map<String, Value>> {
        let res = self.query(db, q);
        let mut out = Vec::new();
        for s in res["series"].as_array().cloned().unwrap_or_default() {
            let cols: Vec<String> = s["columns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_string())
                .collect();
            let tags = s.get("tags").cloned();
            for v in s["values"].as_array().unwrap() {
                let mut m = serde_json::Map::new();
                for (c, x) in cols.iter().zip(v.as_array().unwrap()) {
                    m.insert(c.clone(), x.clone());
                }
                if let Some(Value::Object(t)) = &tags {
                    for (k, v) in t {
                        m.insert(k.clone(), v.clone());
                    }
                }
                out.push(m);
            }
        }
        out
    }

    /// `SELECT count(field) FROM m WHERE ...` as a number (0 when there are no rows).
    pub fn count(&self, db: &str, q: &str) -> u64 {
        self.rows(db, q)
            .first()
            .and_then(|r| {
                r.iter()
                    .find(|(k, _)| k.as_str() != "time")
                    .and_then(|(_, v)| v.as_u64())
            })
            .unwrap_or(0)
    }
}

pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A real phoenix-collector on a free loopback port with fixed test tokens.
#[derive(Debug)]
pub struct Collector {
    pub port: u16,
    pub data_dir: PathBuf,
    args: Vec<String>,
    pub proc: Option<Proc>,
    _tmp: Option<tempfile::TempDir>,
}

impl Collector {
    /// `extra` are more flags, e.g. `["--influx-url", url, "--influx-db", "phoenix"]`.
    pub fn start(extra: &[&str]) -> Collector {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        let mut c = Collector {
            port: free_port(),
            data_dir,
            args: extra.iter().map(|s| s.to_string()).collect(),
            proc: None,
            _tmp: Some(tmp),
        };
        c.up();
        c
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn up(&mut self) {
        let mut cmd = Command::new(bin("phoenix-collector"));
        cmd.args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args([
                "--agent-token",
                AGENT_TOKEN,
                "--recycler-token",
                RECYCLER_TOKEN,
                "--pipeline-token",
                PIPELINE_TOKEN,
                "--reader-token",
                READER_TOKEN,
            ])
            .args(&self.args)
            .env("PHOENIX_LOG_LEVEL", "info");
        std::fs::create_dir_all(&self.data_dir).unwrap();
        let log = self
            .data_dir
            .parent()
            .unwrap()
            .join(format!("collector-{}.log", rand_u64()));
        self.proc = Some(Proc::spawn(cmd, log));
        let url = format!("{}/healthz", self.url());
        let ok = wait_for(Duration::from_secs(30), || {
            (http().get(&url).call().ok()?.status() == 200).then_some(())
        });
        if ok.is_none() {
            panic!(
                "collector did not come up; log:\n{}",
                self.proc.as_ref().unwrap().log_text()
            );
        }
    }

    pub fn down(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    pub fn log_text(&self) -> String {
        self.proc.as_ref().map(|p| p.log_text()).unwrap_or_default()
    }

    pub fn get(&self, path: &str, token: Option<&str>) -> Resp {
        get(&format!("{}{path}", self.url()), token)
    }

    /// POST a report the way an agent does (gzip JSON, agent token).
    pub fn post_report(&self, report: &phoenix_wire::Report) -> Resp {
        let cred = trust::harness_credential(&report.agent.instance_id);
        let h = [
            ("Content-Type", "application/json"),
            ("Content-Encoding", "gzip"),
            (trust::CREDENTIAL_HEADER, cred.as_str()),
        ];
        let url = format!("{}/v1/reports", self.url());
        post(&url, Some(AGENT_TOKEN), &h, &phoenix_wire::encode(report))
    }

    pub fn post_raw(&self, body: &[u8], token: Option<&str>, gzip: bool) -> Resp {
        let mut h = vec![("Content-Type", "application/json")];
        if gzip {
            h.push(("Content-Encoding", "gzip"));
        }
        post(&format!("{}/v1/reports", self.url()), token, &h, body)
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    u64::from_le_bytes(b)
}

/// A real phoenix-agent with its own state dir.
#[derive(Debug)]
pub struct Agent {
    pub state_dir: PathBuf,
    pub instance_id: String,
    args: Vec<String>,
    collector: String,
    pub proc: Option<Proc>,
    _tmp: tempfile::TempDir,
}

impl Agent {
    /// `extra` are more `run` flags; `--instance-id`, `--image-id img-test` and
    /// `--interval 1s` are set unless given.
    pub fn start(collector: &str, instance_id: &str, extra: &[&str]) -> Agent {
        let tmp = tempfile::tempdir().unwrap();
        let mut a = Agent {
            state_dir: tmp.path().join("state"),
            instance_id: instance_id.into(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            collector: collector.into(),
            proc: None,
            _tmp: tmp,
        };
        a.up();
        a
    }

    pub fn up(&mut self) {
        let mut cmd = Command::new(bin("phoenix-agent"));
        cmd.arg("run")
            .args([
                "--collector",
                &self.collector,
                "--token",
                AGENT_TOKEN,
                "--instance-id",
                &self.instance_id,
            ])
            .arg("--state-dir")
            .arg(&self.state_dir);
        if !self.args.iter().any(|a| a == "--image-id") {
            cmd.args(["--image-id", "img-test"]);
        }
        if !self.args.iter().any(|a| a == "--interval") {
            cmd.args(["--interval", "1s"]);
        }
        // Kernel lines are the box's, not the test's: only tests that ask read them.
        if !self.args.iter().any(|a| a == "--kmsg") {
            cmd.args(["--kmsg", "off"]);
        }
        cmd.args(&self.args).env("PHOENIX_LOG_LEVEL", "info");
        let log = self._tmp.path().join(format!("agent-{}.log", rand_u64()));
        self.proc = Some(Proc::spawn(cmd, log));
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.proc.take().and_then(|mut p| p.stop())
    }

    pub fn log_text(&self) -> String {
        self.proc.as_ref().map(|p| p.log_text()).unwrap_or_default()
    }
}
