//! A newcomer's first start: store mistakes stop the collector at start-up with a message
//! naming them, an unreachable store does not, logs written to a file carry no colour codes,
//! refusals are logged without the token, and `scripts/run-local.sh` fails loudly.

use std::process::{Command, Stdio};
use std::time::Duration;

use phoenix_e2e::*;

/// Run the collector to its exit (or kill it at the deadline): (exit code, stderr).
fn collector_exit(args: &[&str], within: Duration) -> (Option<i32>, String) {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("collector.log");
    let mut cmd = Command::new(bin("phoenix-collector"));
    cmd.args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .args(args);
    let mut p = Proc::spawn(cmd, log);
    let code = wait_for(within, || {
        p.child.as_mut().unwrap().try_wait().ok().flatten()
    });
    let text = p.log_text();
    (code.and_then(|s| s.code()), text)
}

fn databases(influx: &Influx) -> Vec<String> {
    influx
        .rows("", "SHOW DATABASES")
        .iter()
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn a_missing_retention_policy_stops_the_collector_naming_it() {
    let influx = Influx::start();
    influx.create_db("phoenix");
    let (code, log) = collector_exit(
        &[
            "--influx-url",
            &influx.url(),
            "--influx-db",
            "phoenix",
            "--influx-rp",
            "nosuchrp",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(2), "the collector must stop; log:\n{log}");
    assert!(
        log.contains("\"nosuchrp\"") && log.contains("retention policy"),
        "{log}"
    );
    assert!(
        log.contains("autogen"),
        "it lists the policies there are: {log}"
    );
    assert!(log.contains("--influx-rp"), "it says what to fix: {log}");
    assert!(!log.contains("panicked"), "{log}");

    // The same database with a policy that exists starts.
    let c = Collector::start(&[
        "--influx-url",
        &influx.url(),
        "--influx-db",
        "phoenix",
        "--influx-rp",
        "autogen",
    ]);
    assert!(c.log_text().contains("ready"), "{}", c.log_text());
}

#[test]
fn a_missing_database_is_created_or_not_and_named_at_warn_level_either_way() {
    let influx = Influx::start();
    let c = Collector::start(&["--influx-url", &influx.url(), "--influx-db", "phoenx"]);
    let log = c.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("phoenx") && l.contains("creating it"))
        .unwrap_or_else(|| panic!("no warning naming the new database: {log}"));
    assert!(
        line.contains("WARN") && line.contains(&influx.url()),
        "{line}"
    );
    assert!(databases(&influx).contains(&"phoenx".to_string()));

    let c = Collector::start(&[
        "--influx-url",
        &influx.url(),
        "--influx-db",
        "phoenx2",
        "--influx-skip-database-creation",
    ]);
    let log = c.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("phoenx2"))
        .unwrap_or_else(|| panic!("no warning naming the missing database: {log}"));
    assert!(
        line.contains("WARN") && line.contains("skip-database-creation"),
        "{line}"
    );
    assert!(!databases(&influx).contains(&"phoenx2".to_string()));

    // An existing database: no warning about it at all.
    let c = Collector::start(&["--influx-url", &influx.url(), "--influx-db", "phoenx"]);
    assert!(!c.log_text().contains("creating it"), "{}", c.log_text());
}

#[test]
fn an_unreachable_influxdb_is_no_reason_not_to_start() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let c = Collector::start(&["--influx-url", &url, "--influx-rp", "week"]);
    let log = c.log_text();
    assert!(log.contains("unreachable at start-up"), "{log}");
    assert_eq!(c.get("/healthz", None).status, 200);
}

#[test]
fn log_files_carry_no_colour_codes_and_refusals_name_the_role_not_the_token() {
    let c = Collector::start(&[]);
    assert_eq!(c.get("/v1/instances", Some("not-a-token-xyz")).status, 401);
    assert_eq!(c.get("/v1/instances", None).status, 401);
    assert_eq!(c.post_raw(b"{}", Some(READER_TOKEN), false).status, 403);
    let log = wait_for(Duration::from_secs(10), || {
        let t = c.log_text();
        (t.contains("status=403") && t.matches("status=401").count() >= 2).then_some(t)
    })
    .unwrap_or_else(|| panic!("refusals not logged: {}", c.log_text()));
    let forbidden = log.lines().find(|l| l.contains("status=403")).unwrap();
    assert!(
        forbidden.contains("role=reader") && forbidden.contains("reader#1"),
        "{forbidden}"
    );
    assert!(forbidden.contains("needs=agent"), "{forbidden}");
    for secret in ["not-a-token-xyz", READER_TOKEN, AGENT_TOKEN] {
        assert!(!log.contains(secret), "a token reached the log: {log}");
    }
    assert!(
        !log.contains('\u{1b}'),
        "ANSI codes in the collector's log file: {log:?}"
    );

    let a = Agent::start(&c.url(), "i-nocolour", &[]);
    let alog = wait_for(Duration::from_secs(20), || {
        let t = a.log_text();
        (t.lines().count() >= 1).then_some(t)
    })
    .expect("the agent logged nothing");
    assert!(
        !alog.contains('\u{1b}'),
        "ANSI codes in the agent's log file: {alog:?}"
    );
    assert!(alog.contains("INFO"), "{alog}");
}

/// The script with its output in `<data>.out` (a file, so a chatty agent never blocks on a pipe).
fn run_local(listen: &str, data: &std::path::Path) -> std::process::Child {
    let out = std::fs::File::create(data.with_extension("out")).unwrap();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let bin_dir = bin("phoenix-collector").parent().unwrap().to_path_buf();
    bin("phoenix-agent");
    Command::new(format!("{root}/scripts/run-local.sh"))
        .env("PHOENIX_LISTEN", listen)
        .env("PHOENIX_DATA_DIR", data)
        .env("PHOENIX_BIN_DIR", bin_dir)
        .env_remove("PHOENIX_INFLUX_URL")
        .args(["--interval", "1s", "--instance-id", "i-run-local"])
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap()
}

#[test]
fn run_local_exits_non_zero_when_its_port_is_taken_and_runs_when_it_is_free() {
    let tmp = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let a = tmp.path().join("a");
    let mut child = run_local(&listen, &a);
    let status = wait_for(Duration::from_secs(30), || child.try_wait().ok().flatten());
    let err = std::fs::read_to_string(a.with_extension("out")).unwrap();
    let status = status.unwrap_or_else(|| panic!("run-local kept running: {err}"));
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("already in use") && err.contains(&listen),
        "{err}"
    );
    assert!(!err.contains("agent pid"), "{err}");
    drop(taken);

    // A free port: collector and agent come up, and the agent's reports arrive.
    let listen = format!("127.0.0.1:{}", free_port());
    let data = tmp.path().join("b");
    let mut child = run_local(&listen, &data);
    let reader = wait_for(Duration::from_secs(60), || {
        std::fs::read_to_string(data.join("tokens/reader.token")).ok()
    })
    .expect("no reader token generated");
    let seen = wait_for(Duration::from_secs(90), || {
        let r = get(
            &format!("http://{listen}/v1/instances"),
            Some(reader.trim()),
        );
        (r.status == 200 && r.body.contains("i-run-local")).then_some(())
    });
    // SAFETY: kill(2) on our own child's pid; the script's trap stops its children.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = wait_for(Duration::from_secs(15), || child.try_wait().ok().flatten());
    if st.is_none() {
        child.kill().ok();
    }
    assert!(
        seen.is_some(),
        "the agent's reports never reached run-local's collector"
    );
    assert!(st.is_some(), "run-local did not stop on SIGTERM");
}

#[test]
fn a_taken_port_is_a_plain_start_up_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(bin("phoenix-collector"));
    cmd.args(["--listen", &listen])
        .arg("--data-dir")
        .arg(tmp.path().join("data"));
    let mut p = Proc::spawn(cmd, tmp.path().join("collector.log"));
    let st = wait_for(Duration::from_secs(20), || {
        p.child.as_mut().unwrap().try_wait().ok().flatten()
    });
    let log = p.log_text();
    assert_eq!(st.and_then(|s| s.code()), Some(2), "{log}");
    assert!(log.contains(&listen) && log.contains("--listen"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}
