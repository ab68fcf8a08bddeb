//! `phoenix-agent run` settings: one struct read from the command line, `PHOENIX_*` env vars
//! and a TOML file (`--config`), merged flag > env > file > default.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde::Deserialize;

/// Flags of `phoenix-agent run`. In the TOML file the same names are used with `_` for `-`.
#[derive(Args, Deserialize, Default, Debug, Clone)]
#[serde(default, deny_unknown_fields)]
pub struct RunArgs {
    /// TOML file with any of these settings (flags and env override it).
    #[arg(long, env = "PHOENIX_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Collector base URL, e.g. https://collector.internal:7070 (required). Repeat it for
    /// several collectors: the agent fails over in this order and goes back to the first.
    #[arg(long = "collector", env = "PHOENIX_COLLECTOR", value_delimiter = ',')]
    #[serde(deserialize_with = "one_or_many")]
    pub collector: Vec<String>,
    /// Most batches sent at once, not yet acked; acks may come back in any order, checkpoints
    /// are promoted in seq order, and the collector dedupes by a window of stored seqs [default: 4].
    #[arg(long, env = "PHOENIX_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<usize>,
    /// Agent token for the collector (prefer --token-file: flags show in `ps`).
    #[arg(long, env = "PHOENIX_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the agent token.
    #[arg(long, env = "PHOENIX_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Reporting interval: 500ms, 10s, 2m; a bare number is seconds [default: 10s].
    #[arg(long, env = "PHOENIX_INTERVAL")]
    #[serde(default, deserialize_with = "phoenix_wire::confval::opt_text")]
    pub interval: Option<String>,
    /// Where the spool, checkpoints and the agent's baseline live [default: /var/lib/phoenix-agent].
    #[arg(long, env = "PHOENIX_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Most bytes the on-disk spool may hold, e.g. 64MiB [default: 64MiB].
    #[arg(long, env = "PHOENIX_SPOOL_MAX")]
    #[serde(default, deserialize_with = "phoenix_wire::confval::opt_text")]
    pub spool_max: Option<String>,
    /// Log file or glob to ship (repeatable); globs pick up files created later.
    #[arg(long = "log", env = "PHOENIX_LOG", value_delimiter = ',')]
    pub log: Vec<String>,
    /// On the very first start on a box, read files that already exist from `end` or `start` [default: end].
    #[arg(long, env = "PHOENIX_LOG_INITIAL")]
    pub log_initial: Option<String>,
    /// Most tailed log files held open at once; idle ones are closed and found again by inode [default: min(256, open-file limit / 4)].
    #[arg(long, env = "PHOENIX_MAX_OPEN_FILES")]
    pub max_open_files: Option<usize>,
    /// Path whose files are hashed for drift (repeatable).
    #[arg(long = "drift-path", env = "PHOENIX_DRIFT_PATH", value_delimiter = ',')]
    pub drift_path: Vec<PathBuf>,
    /// Glob excluded from drift hashing (repeatable), on top of the defaults.
    #[arg(
        long = "drift-exclude",
        env = "PHOENIX_DRIFT_EXCLUDE",
        value_delimiter = ','
    )]
    pub drift_exclude: Vec<String>,
    /// Baseline manifest [default: <state-dir>/baseline.json, else /usr/share/phoenix-agent/baseline.json].
    #[arg(long, env = "PHOENIX_BASELINE")]
    pub baseline: Option<PathBuf>,
    /// Full drift rescan period, on top of inotify [default: 1h].
    #[arg(long, env = "PHOENIX_DRIFT_RESCAN")]
    #[serde(default, deserialize_with = "phoenix_wire::confval::opt_text")]
    pub drift_rescan: Option<String>,
    /// While this file exists the collector holds voluntary replacement (drift, expiry) of
    /// this instance; only its presence is checked, never its content
    /// [default: /run/phoenix/do-not-replace].
    #[arg(long, env = "PHOENIX_PROTECT_FILE")]
    pub protect_file: Option<PathBuf>,
    /// Override the discovered instance id.
    #[arg(long, env = "PHOENIX_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Override the discovered image id.
    #[arg(long, env = "PHOENIX_IMAGE_ID")]
    pub image_id: Option<String>,
    /// Group (auto-scaling group, role) this instance belongs to.
    #[arg(long, env = "PHOENIX_GROUP")]
    pub group: Option<String>,
    /// Local probe NAME=SPEC (repeatable): process:NAME, http://127.0.0.1:PORT/PATH[#STATUS]
    /// (passes when the answer is exactly STATUS, 200 unless given), tcp:HOST:PORT, systemd:UNIT.
    #[arg(long = "check", env = "PHOENIX_CHECK", value_delimiter = ',')]
    pub check: Vec<String>,
    /// Longest a check may take before it counts as failed [default: the smaller of interval/2 and 5s].
    #[arg(long, env = "PHOENIX_CHECK_TIMEOUT")]
    pub check_timeout: Option<String>,
    /// `procstat` points for the top N processes by CPU and the top N by RSS; 0 = off [default: 10].
    #[arg(long, env = "PHOENIX_TOP_PROCESSES")]
    pub top_processes: Option<usize>,
    /// Kernel messages from /dev/kmsg: auto (on unless --journal already carries them), on or off [default: auto].
    #[arg(long, env = "PHOENIX_KMSG")]
    pub kmsg: Option<String>,
    /// Where the kernel's message device is [default: /dev/kmsg].
    #[arg(long, env = "PHOENIX_KMSG_PATH")]
    pub kmsg_path: Option<PathBuf>,
    /// Log format of the agent's own messages: text or json [default: text].
    #[arg(long, env = "PHOENIX_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Trust only this PEM CA for the collector's certificate [default: the system's CAs].
    #[arg(long, env = "PHOENIX_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for a collector with mutual TLS; its subjectAltName is the instance id.
    #[arg(long, env = "PHOENIX_TLS_CLIENT_CERT")]
    pub tls_client_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-client-cert.
    #[arg(long, env = "PHOENIX_TLS_CLIENT_KEY")]
    pub tls_client_key: Option<PathBuf>,
    /// Allow plain http:// to a collector that is not on loopback (the token then travels in clear).
    #[arg(long, env = "PHOENIX_INSECURE_HTTP")]
    pub insecure_http: bool,
    /// Ship the local systemd journal (read with journalctl; the agent needs the systemd-journal group).
    #[arg(long, env = "PHOENIX_JOURNAL")]
    pub journal: bool,
    /// Only journal entries of this systemd unit (repeatable; journalctl globs allowed), e.g. nginx.service.
    #[arg(
        long = "journal-unit",
        env = "PHOENIX_JOURNAL_UNIT",
        value_delimiter = ','
    )]
    pub journal_unit: Vec<String>,
    /// Only journal entries this important or more: emerg, alert, crit, err, warning, notice, info, debug or 0-7.
    #[arg(long, env = "PHOENIX_JOURNAL_PRIORITY")]
    #[serde(default, deserialize_with = "phoenix_wire::confval::opt_text")]
    pub journal_priority: Option<String>,
    /// Read the journal files in this directory instead of the local journal (turns the journal on).
    #[arg(long, env = "PHOENIX_JOURNAL_DIR")]
    pub journal_dir: Option<PathBuf>,
    /// Read this journal file instead of the local journal (repeatable; turns the journal on).
    #[arg(
        long = "journal-file",
        env = "PHOENIX_JOURNAL_FILE",
        value_delimiter = ','
    )]
    pub journal_file: Vec<PathBuf>,
    /// On the very first start on a box, read the journal from its `end` or from the start of the current `boot` [default: end].
    #[arg(long, env = "PHOENIX_JOURNAL_INITIAL")]
    pub journal_initial: Option<String>,
    /// How this instance proves its id to the collector: tofu, aws, mtls or shared (as the
    /// collector's --identity); aws sends the EC2 instance identity document [default: tofu].
    #[arg(long, env = "PHOENIX_IDENTITY")]
    pub identity: Option<String>,
    /// EC2 metadata service base URL (for tests) [default: http://169.254.169.254].
    #[arg(long, env = "PHOENIX_IMDS_URL")]
    pub imds_url: Option<String>,
}

/// The merged, checked settings `run` works with.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The first of `collectors`.
    pub collector: String,
    /// Every collector, in order of preference.
    pub collectors: Vec<String>,
    pub max_in_flight: usize,
    pub token: Option<String>,
    pub interval: Duration,
    pub state_dir: PathBuf,
    pub spool_max: u64,
    pub logs: Vec<String>,
    pub log_from_start: bool,
    /// `--max-open-files`; None: min(256, RLIMIT_NOFILE / 4).
    pub max_open_files: Option<usize>,
    pub drift_paths: Vec<PathBuf>,
    pub drift_excludes: Vec<String>,
    pub baseline: Option<PathBuf>,
    pub drift_rescan: Duration,
    /// `--protect-file`: its presence is reported with every metrics batch.
    pub protect_file: PathBuf,
    pub instance_id: Option<String>,
    pub image_id: Option<String>,
    pub group: Option<String>,
    pub checks: Vec<String>,
    pub check_timeout: Duration,
    /// N for the top-N-by-CPU and top-N-by-RSS `procstat` points; 0 = off.
    pub top_processes: usize,
    /// Read kernel messages from this device (None: off, or the journal carries them).
    pub kmsg: Option<PathBuf>,
    /// CA, client certificate and whether plain http:// may leave the box.
    pub tls: crate::tls::TlsOptions,
    /// Ship the systemd journal: on with --journal, --journal-dir or --journal-file.
    pub journal: bool,
    pub journal_units: Vec<String>,
    /// Highest priority number shipped (0 emerg .. 7 debug).
    pub journal_priority: Option<u8>,
    pub journal_dir: Option<PathBuf>,
    pub journal_files: Vec<PathBuf>,
    pub journal_from_boot: bool,
    /// `tofu`, `aws`, `mtls` or `shared`; only `aws` changes what the agent sends.
    pub identity: String,
    pub imds_url: String,
}

impl RunArgs {
    /// Layer the config file under what flags and env gave.
    pub fn resolve(self) -> anyhow::Result<RunConfig> {
        let file: RunArgs = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading config file {}", p.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("parsing config file {}", p.display()))?
            }
            None => RunArgs::default(),
        };
        let pick = |a: Option<String>, b: Option<String>| a.or(b);
        let list = |a: Vec<String>, b: Vec<String>| if a.is_empty() { b } else { a };
        let collectors = list(self.collector, file.collector);
        let Some(collector) = collectors.first().cloned() else {
            bail!("no collector: give --collector URL (or PHOENIX_COLLECTOR, or collector = \"...\" in the config file)")
        };
        let max_in_flight = self.max_in_flight.or(file.max_in_flight).unwrap_or(4);
        if !(1..=64).contains(&max_in_flight) {
            bail!("--max-in-flight {max_in_flight}: use 1 to 64");
        }
        let token = match (
            pick(self.token, file.token),
            self.token_file.or(file.token_file),
        ) {
            (Some(t), _) => Some(t),
            (None, Some(f)) => Some(
                std::fs::read_to_string(&f)
                    .with_context(|| format!("reading token file {}", f.display()))?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let dur = |v: Option<String>, default: &str, what: &str| -> anyhow::Result<Duration> {
            phoenix_wire::parse_duration(v.as_deref().unwrap_or(default))
                .map_err(|e| anyhow::anyhow!("--{what}: {e}"))
        };
        let interval = dur(pick(self.interval, file.interval), "10s", "interval")?;
        if interval < Duration::from_millis(100) {
            bail!("--interval must be at least 100ms");
        }
        let log_initial = pick(self.log_initial, file.log_initial).unwrap_or_else(|| "end".into());
        let log_from_start = match log_initial.as_str() {
            "end" => false,
            "start" | "beginning" => true,
            o => bail!("--log-initial {o:?}: use end or start"),
        };
        let journal_dir = self.journal_dir.or(file.journal_dir);
        let journal_files = if self.journal_file.is_empty() {
            file.journal_file
        } else {
            self.journal_file
        };
        if journal_dir.is_some() && !journal_files.is_empty() {
            return Err(crate::journal::JournalError::DirAndFiles.into());
        }
        let journal =
            self.journal || file.journal || journal_dir.is_some() || !journal_files.is_empty();
        let journal_units = list(self.journal_unit, file.journal_unit);
        for u in &journal_units {
            crate::journal::check_unit(u)?;
        }
        let journal_priority = pick(self.journal_priority, file.journal_priority)
            .map(|p| crate::journal::parse_priority(&p))
            .transpose()?;
        if !journal && (!journal_units.is_empty() || journal_priority.is_some()) {
            bail!("--journal-unit and --journal-priority filter the journal: add --journal (or --journal-dir / --journal-file)");
        }
        let journal_from_boot = crate::journal::parse_initial(
            pick(self.journal_initial, file.journal_initial)
                .as_deref()
                .unwrap_or("end"),
        )?;
        let identity = pick(self.identity, file.identity).unwrap_or_else(|| "tofu".into());
        if !matches!(identity.as_str(), "tofu" | "aws" | "mtls" | "shared") {
            bail!("--identity {identity:?}: give tofu (default), aws, mtls or shared, as the collector's --identity");
        }
        let imds_url =
            pick(self.imds_url, file.imds_url).unwrap_or_else(|| "http://169.254.169.254".into());
        let check_timeout = match pick(self.check_timeout, file.check_timeout) {
            Some(v) => dur(Some(v), "", "check-timeout")?,
            None => (interval / 2).min(Duration::from_secs(5)),
        };
        if check_timeout.is_zero() || check_timeout > interval {
            bail!("--check-timeout must be above 0 and at most --interval");
        }
        // The journal read whole from the local box (no unit filter) already has the kernel's
        // lines; reading /dev/kmsg as well would ship each of them twice.
        let journal_has_kernel = journal
            && journal_units.is_empty()
            && journal_dir.is_none()
            && journal_files.is_empty();
        let kmsg_path = self
            .kmsg_path
            .or(file.kmsg_path)
            .unwrap_or_else(|| "/dev/kmsg".into());
        let kmsg = match pick(self.kmsg, file.kmsg).as_deref().unwrap_or("auto") {
            "auto" => (!journal_has_kernel).then_some(kmsg_path),
            "on" => Some(kmsg_path),
            "off" => None,
            o => bail!("--kmsg {o:?}: use auto, on or off"),
        };
        Ok(RunConfig {
            identity,
            imds_url,
            collector,
            collectors,
            max_in_flight,
            token,
            interval,
            state_dir: self
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| "/var/lib/phoenix-agent".into()),
            spool_max: parse_size(
                pick(self.spool_max, file.spool_max)
                    .as_deref()
                    .unwrap_or("64MiB"),
            )?,
            logs: list(self.log, file.log),
            log_from_start,
            max_open_files: self.max_open_files.or(file.max_open_files),
            drift_paths: if self.drift_path.is_empty() {
                file.drift_path
            } else {
                self.drift_path
            },
            drift_excludes: list(self.drift_exclude, file.drift_exclude),
            baseline: self.baseline.or(file.baseline),
            drift_rescan: dur(
                pick(self.drift_rescan, file.drift_rescan),
                "1h",
                "drift-rescan",
            )?,
            protect_file: self
                .protect_file
                .or(file.protect_file)
                .unwrap_or_else(|| crate::protect::DEFAULT_PATH.into()),
            instance_id: pick(self.instance_id, file.instance_id),
            image_id: pick(self.image_id, file.image_id),
            group: pick(self.group, file.group),
            checks: list(self.check, file.check),
            check_timeout,
            top_processes: self.top_processes.or(file.top_processes).unwrap_or(10),
            kmsg,
            tls: crate::tls::TlsOptions {
                ca_file: self.ca_file.or(file.ca_file),
                client_cert: self.tls_client_cert.or(file.tls_client_cert),
                client_key: self.tls_client_key.or(file.tls_client_key),
                insecure_http: self.insecure_http || file.insecure_http,
            },
            journal,
            journal_units,
            journal_priority,
            journal_dir,
            journal_files,
            journal_from_boot,
        })
    }
}

/// `collector = "URL"` or `collector = ["URL", ...]` in the config file.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// `64MiB`, `500KB`, `1G`, or plain bytes.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    phoenix_wire::parse_size(s).map_err(|e| anyhow::anyhow!(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_beats_file_beats_default() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agent.toml");
        std::fs::write(
            &f,
            "collector = \"http://file:1\"\ninterval = \"30s\"\nlog = [\"/var/log/a.log\"]\n",
        )
        .unwrap();
        let args = RunArgs {
            config: Some(f.clone()),
            interval: Some("2s".into()),
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.collector, "http://file:1");
        assert_eq!(c.interval, Duration::from_secs(2));
        assert_eq!(c.logs, vec!["/var/log/a.log".to_string()]);
        assert_eq!(c.spool_max, 64 << 20);
        assert_eq!(c.max_in_flight, 4);
        std::fs::write(
            &f,
            "collector = [\"http://a:1\", \"http://b:1\"]\nmax_in_flight = 2\n",
        )
        .unwrap();
        let c = RunArgs {
            config: Some(f.clone()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.collectors, ["http://a:1", "http://b:1"]);
        assert_eq!(c.collector, "http://a:1");
        assert_eq!(c.max_in_flight, 2);
        std::fs::write(&f, "colector = \"typo\"\n").unwrap();
        let e = RunArgs {
            config: Some(f),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(format!("{e:#}").contains("colector"), "{e:#}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("lots").is_err());
    }
}

#[cfg(test)]
mod cli_tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    #[test]
    fn toml_numbers_mean_what_the_flags_mean() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agent.toml");
        std::fs::write(
            &f,
            "collector = \"http://127.0.0.1:1\"\ninterval = 10\nspool_max = 4096\njournal = true\njournal_priority = 3\n",
        )
        .unwrap();
        let c = RunArgs {
            config: Some(f),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.interval, Duration::from_secs(10));
        assert_eq!(c.spool_max, 4096);
        assert_eq!(c.journal_priority, Some(3));
    }

    #[test]
    fn help_is_complete_and_unknown_flags_get_the_nearest_one() {
        let cmd = Cli::command();
        for a in cmd.get_arguments() {
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            assert!(!help.trim().is_empty(), "--{} has no help", a.get_id());
        }
        let check = cmd.get_arguments().find(|a| a.get_id() == "check").unwrap();
        assert!(check.get_help().unwrap().to_string().contains("#STATUS"));
        let e = Cli::try_parse_from(["x", "--intervall", "2"])
            .err()
            .unwrap();
        assert!(e.to_string().contains("--interval"), "{e}");
    }
}
