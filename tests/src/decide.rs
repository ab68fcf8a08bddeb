//! Harness for the replacement-decision tests (tests/tests/decisions.rs): reading the fleet's
//! verdicts, stopping and resuming an agent, and a collector whose wall clock the test steps
//! with Debian's libfaketime.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::{
    bin, free_port, post, wait_for, Agent, Collector, Proc, AGENT_TOKEN, PIPELINE_TOKEN,
    READER_TOKEN, RECYCLER_TOKEN,
};

/// Every instance the collector knows, by id (`GET /v1/instances`).
pub fn instances(c: &Collector) -> BTreeMap<String, Value> {
    let r = c.get("/v1/instances", Some(READER_TOKEN));
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["instances"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|i| Some((i["instance_id"].as_str()?.to_string(), i)))
        .collect()
}

/// One instance in full (`GET /v1/instances/{id}`), None while unknown.
pub fn instance(c: &Collector, id: &str) -> Option<Value> {
    let r = c.get(&format!("/v1/instances/{id}"), Some(READER_TOKEN));
    (r.status == 200).then(|| r.json())
}

/// The drift verdict of an instance: Some(true) drifted, Some(false) clean, None unknown.
pub fn drifted(c: &Collector, id: &str) -> Option<bool> {
    instance(c, id)?["drift"]["drifted"].as_bool()
}

/// `GET /v1/phoenix`.
pub fn phoenix(c: &Collector) -> Value {
    let r = c.get("/v1/phoenix", Some(RECYCLER_TOKEN));
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// The recycler takes a marked instance.
pub fn ack(c: &Collector, id: &str) {
    let r = post(
        &format!("{}/v1/phoenix/{id}/ack", c.url()),
        Some(RECYCLER_TOKEN),
        &[],
        b"",
    );
    assert_eq!(r.status, 200, "ack {id}: {}", r.body);
}

/// Ids in a `/v1/phoenix` list (`marked`, `held`, `gone`).
pub fn ids_in(v: &Value, list: &str) -> Vec<String> {
    v[list]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["instance_id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Why a fleet is not all healthy, or None when every id in `ids` is known and healthy.
pub fn not_healthy(c: &Collector, ids: &[&str]) -> Option<String> {
    let all = instances(c);
    let bad: Vec<String> = ids
        .iter()
        .filter_map(|id| match all.get(*id) {
            None => Some(format!("{id}: unknown")),
            Some(i) if i["state"] != "healthy" => {
                Some(format!("{id}: {} ({})", i["state"], i["evidence"]))
            }
            Some(_) => None,
        })
        .collect();
    (!bad.is_empty()).then(|| bad.join("; "))
}

/// A wrong decision anywhere in `ids`: unhealthy, marked, held, or a group alert naming them.
pub fn wrong_decision(c: &Collector, ids: &[&str], groups: &[&str]) -> Option<String> {
    let all = instances(c);
    for id in ids {
        if let Some(i) = all.get(*id) {
            let st = i["state"].as_str().unwrap_or("");
            if matches!(st, "unhealthy" | "marked" | "acked" | "gone") || !i["held"].is_null() {
                return Some(format!("{id} is {st}: {i}"));
            }
        }
    }
    let q = phoenix(c);
    for list in ["marked", "held"] {
        if let Some(id) = ids_in(&q, list).iter().find(|x| ids.contains(&x.as_str())) {
            return Some(format!("{id} in {list}: {q}"));
        }
    }
    let alerts = q["alerts"].as_array().cloned().unwrap_or_default();
    if let Some(a) = alerts
        .iter()
        .find(|a| a["group"].as_str().is_some_and(|g| groups.contains(&g)))
    {
        return Some(format!("alert blaming the group: {a}"));
    }
    None
}

/// Bake `tree` into a baseline for `image` and register it with the collector.
pub fn bake_registered(tree: &Path, out: &Path, image: &str, collector: &str) {
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

/// A watched tree with one config file and its registered baseline, for one image.
#[derive(Debug)]
pub struct Watched {
    pub tree: PathBuf,
    pub baseline: PathBuf,
    pub image: String,
    _tmp: tempfile::TempDir,
}

impl Watched {
    pub fn new(image: &str, collector: &str) -> Watched {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("etc");
        std::fs::create_dir_all(&tree).unwrap();
        std::fs::write(tree.join("app.conf"), "listen = 8080\n").unwrap();
        let baseline = tmp.path().join("baseline.json");
        bake_registered(&tree, &baseline, image, collector);
        Watched {
            tree,
            baseline,
            image: image.into(),
            _tmp: tmp,
        }
    }

    /// The agent flags that watch this tree against this baseline.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--image-id".into(),
            self.image.clone(),
            "--drift-path".into(),
            self.tree.display().to_string(),
            "--baseline".into(),
            self.baseline.display().to_string(),
        ]
    }

    /// Tamper with the watched file.
    pub fn tamper(&self) {
        std::fs::write(self.tree.join("app.conf"), "listen = 6666\n").unwrap();
    }
}

/// Start an agent with `flags` (owned strings) on top of the harness defaults.
pub fn agent(collector: &str, id: &str, flags: &[String]) -> Agent {
    let f: Vec<&str> = flags.iter().map(String::as_str).collect();
    Agent::start(collector, id, &f)
}

/// Freeze (SIGSTOP) or thaw (SIGCONT) an agent: a box that drops off and comes back with its
/// memory intact, unlike a restart.
pub fn freeze(a: &Agent, frozen: bool) {
    let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
    a.proc.as_ref().expect("agent running").signal(sig);
}

/// Wait until `f` holds, or panic naming `what` with `last()` and the collector's log.
pub fn until(c: &Collector, what: &str, within: Duration, f: impl FnMut() -> Option<()>) {
    if wait_for(within, f).is_none() {
        panic!(
            "{what}: not within {within:?}; instances: {:#?}\nqueue: {:#}\ncollector log (tail):\n{}",
            instances(c),
            phoenix(c),
            tail(&c.log_text(), 60)
        );
    }
}

/// The last `n` lines of a log.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The wall clock a collector sees, stepped by the test through libfaketime's control file.
/// Only `CLOCK_REALTIME` is faked: an NTP step moves the wall clock, never the monotonic one.
#[derive(Debug)]
pub struct FakeClock {
    file: PathBuf,
    _tmp: tempfile::TempDir,
}

/// Where Debian's libfaketime package puts the multi-threaded library.
pub fn libfaketime() -> PathBuf {
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
    ];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("libfaketime is not installed: apt-get install faketime (listed in .ci/packages)")
}

impl FakeClock {
    pub fn new() -> FakeClock {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("faketime.rc");
        let c = FakeClock { file, _tmp: tmp };
        c.set_offset(0);
        c
    }

    /// Set the collector's wall clock to real time plus `secs` (negative: behind).
    pub fn set_offset(&self, secs: i64) {
        // Written whole then renamed, so the library never reads half a line.
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{secs:+}\n")).unwrap();
        std::fs::rename(&tmp, &self.file).unwrap();
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("LD_PRELOAD", libfaketime().display().to_string()),
            ("FAKETIME_TIMESTAMP_FILE", self.file.display().to_string()),
            // Re-read the control file at most once a second: cheap, and steps land quickly.
            ("FAKETIME_CACHE_DURATION", "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
        ]
    }
}

impl Default for FakeClock {
    fn default() -> Self {
        FakeClock::new()
    }
}

/// A collector (same flags and tokens as [`Collector::start`]) running under `clock`.
pub fn collector_with_clock(extra: &[&str], clock: &FakeClock) -> Collector {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let port = free_port();
    let mut cmd = Command::new(bin("phoenix-collector"));
    cmd.args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(&data_dir)
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
        .args(extra)
        .env("PHOENIX_LOG_LEVEL", "info")
        .envs(clock.env());
    let proc = Proc::spawn(cmd, tmp.path().join("collector-faketime.log"));
    let c = Collector {
        port,
        data_dir,
        args: extra.iter().map(|s| s.to_string()).collect(),
        proc: Some(proc),
        _tmp: Some(tmp),
    };
    let url = format!("{}/healthz", c.url());
    if wait_for(Duration::from_secs(30), || {
        (crate::http().get(&url).call().ok()?.status() == 200).then_some(())
    })
    .is_none()
    {
        panic!(
            "collector under faketime did not come up; log:\n{}",
            c.log_text()
        );
    }
    c
}

/// Seconds the collector's wall clock is ahead of ours (negative: behind), from the `Date`
/// header of its answer: proof that a step of the fake clock reached the process.
pub fn clock_offset(c: &Collector) -> Option<i64> {
    let r = c.get("/healthz", None);
    let theirs = http_date(r.header("date")?)?;
    Some(theirs - unix_now_s())
}

/// This process's wall clock in Unix seconds (the fake clock only moves the collector's).
pub fn unix_now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Unix seconds of an IMF-fixdate (`Tue, 01 Dec 2026 20:27:01 GMT`), the only form servers
/// send today.
pub fn http_date(s: &str) -> Option<i64> {
    let mut it = s.split_whitespace().skip(1);
    let day: i64 = it.next()?.parse().ok()?;
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let mon = it.next()?;
    let month = months.iter().position(|m| *m == mon)? as i64 + 1;
    let year: i64 = it.next()?.parse().ok()?;
    let hms: Vec<i64> = it
        .next()?
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if hms.len() != 3 {
        return None;
    }
    // Days from civil (proleptic Gregorian), with March as the first month of the year.
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hms[0] * 3600 + hms[1] * 60 + hms[2])
}

#[cfg(test)]
mod tests {
    #[test]
    fn http_dates() {
        assert_eq!(super::http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            super::http_date("Tue, 14 Nov 2023 22:13:20 GMT"),
            Some(1_700_000_000)
        );
        assert_eq!(
            super::http_date("Tue, 29 Feb 2028 12:00:01 GMT"),
            Some(1_835_438_401)
        );
        assert_eq!(super::http_date("yesterday"), None);
    }
}
