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
    /// Collector base URL, e.g. https://collector.internal:7070 (required).
    #[arg(long, env = "PHOENIX_COLLECTOR")]
    pub collector: Option<String>,
    /// Agent token for the collector (prefer --token-file: flags show in `ps`).
    #[arg(long, env = "PHOENIX_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the agent token.
    #[arg(long, env = "PHOENIX_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Reporting interval [default: 10s].
    #[arg(long, env = "PHOENIX_INTERVAL")]
    pub interval: Option<String>,
    /// Where the spool, checkpoints and the agent's baseline live [default: /var/lib/phoenix-agent].
    #[arg(long, env = "PHOENIX_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Most bytes the on-disk spool may hold, e.g. 64MiB [default: 64MiB].
    #[arg(long, env = "PHOENIX_SPOOL_MAX")]
    pub spool_max: Option<String>,
    /// Log file or glob to ship (repeatable); globs pick up files created later.
    #[arg(long = "log", env = "PHOENIX_LOG", value_delimiter = ',')]
    pub log: Vec<String>,
    /// On the very first start on a box, read files that already exist from `end` or `start` [default: end].
    #[arg(long, env = "PHOENIX_LOG_INITIAL")]
    pub log_initial: Option<String>,
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
    pub drift_rescan: Option<String>,
    /// Override the discovered instance id.
    #[arg(long, env = "PHOENIX_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Override the discovered image id.
    #[arg(long, env = "PHOENIX_IMAGE_ID")]
    pub image_id: Option<String>,
    /// Group (auto-scaling group, role) this instance belongs to.
    #[arg(long, env = "PHOENIX_GROUP")]
    pub group: Option<String>,
    /// Local probe NAME=SPEC (repeatable): process:NAME, http://127.0.0.1:PORT/PATH, tcp:HOST:PORT, systemd:UNIT.
    #[arg(long = "check", env = "PHOENIX_CHECK", value_delimiter = ',')]
    pub check: Vec<String>,
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
    pub collector: String,
    pub token: Option<String>,
    pub interval: Duration,
    pub state_dir: PathBuf,
    pub spool_max: u64,
    pub logs: Vec<String>,
    pub log_from_start: bool,
    pub drift_paths: Vec<PathBuf>,
    pub drift_excludes: Vec<String>,
    pub baseline: Option<PathBuf>,
    pub drift_rescan: Duration,
    pub instance_id: Option<String>,
    pub image_id: Option<String>,
    pub group: Option<String>,
    pub checks: Vec<String>,
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
        let Some(collector) = pick(self.collector, file.collector) else {
            bail!("no collector: give --collector URL (or PHOENIX_COLLECTOR, or collector = \"...\" in the config file)")
        };
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
        Ok(RunConfig {
            identity,
            imds_url,
            collector,
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
            instance_id: pick(self.instance_id, file.instance_id),
            image_id: pick(self.image_id, file.image_id),
            group: pick(self.group, file.group),
            checks: list(self.check, file.check),
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
