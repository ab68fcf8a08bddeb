//! `phoenix-collector` settings: command line, `PHOENIX_*` env vars and a TOML file
//! (`--config`), merged flag > env > file > default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use serde::Deserialize;

use crate::sink::influx::Api;

/// Takes phoenix-agent reports, writes them to InfluxDB, and marks drifted or unhealthy
/// instances for phoenix replacement.
#[derive(Parser, Deserialize, Default, Debug, Clone)]
#[command(name = "phoenix-collector", version)]
#[serde(default, deny_unknown_fields)]
pub struct Args {
    /// TOML file with any of these settings (flags and env override it).
    #[arg(long, env = "PHOENIX_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7070].
    #[arg(long, env = "PHOENIX_LISTEN")]
    pub listen: Option<String>,
    /// Fleet state, generated tokens and (without InfluxDB) the points [default: ./phoenix-data].
    #[arg(long, env = "PHOENIX_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// InfluxDB base URL, e.g. http://127.0.0.1:8086. Without it points go to line-protocol
    /// files under <data-dir>/influx.
    #[arg(long, env = "PHOENIX_INFLUX_URL")]
    pub influx_url: Option<String>,
    /// v1 API: database [default: phoenix].
    #[arg(long, env = "PHOENIX_INFLUX_DB")]
    pub influx_db: Option<String>,
    /// v1 API: do not create a missing database at start-up (created by default, as
    /// Telegraf does); either way a missing one is logged at warn level.
    #[arg(long, env = "PHOENIX_INFLUX_SKIP_DATABASE_CREATION")]
    pub influx_skip_database_creation: bool,
    /// v1 API: retention policy (must exist: the collector will not start without it).
    #[arg(long, env = "PHOENIX_INFLUX_RP")]
    pub influx_rp: Option<String>,
    /// v1 API: user.
    #[arg(long, env = "PHOENIX_INFLUX_USER")]
    pub influx_user: Option<String>,
    /// v1 API: password.
    #[arg(long, env = "PHOENIX_INFLUX_PASSWORD", hide_env_values = true)]
    pub influx_password: Option<String>,
    /// v2 API: organisation (giving it selects the v2 API).
    #[arg(long, env = "PHOENIX_INFLUX_ORG")]
    pub influx_org: Option<String>,
    /// v2 API: bucket.
    #[arg(long, env = "PHOENIX_INFLUX_BUCKET")]
    pub influx_bucket: Option<String>,
    /// v2 API: token.
    #[arg(long, env = "PHOENIX_INFLUX_TOKEN", hide_env_values = true)]
    pub influx_token: Option<String>,
    /// gzip writes to InfluxDB: true or false [default: true].
    #[arg(long, env = "PHOENIX_INFLUX_GZIP")]
    pub influx_gzip: Option<bool>,
    /// Agent token (repeatable, for rotation).
    #[arg(
        long = "agent-token",
        env = "PHOENIX_AGENT_TOKEN",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub agent_token: Vec<String>,
    /// File(s) holding agent tokens, one per line (`#` starts a comment); kept out of `ps`.
    #[arg(
        long = "agent-token-file",
        env = "PHOENIX_AGENT_TOKEN_FILE",
        value_delimiter = ','
    )]
    pub agent_token_file: Vec<PathBuf>,
    /// Recycler token: reads and acks the phoenix queue (repeatable).
    #[arg(
        long = "recycler-token",
        env = "PHOENIX_RECYCLER_TOKEN",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub recycler_token: Vec<String>,
    /// File(s) holding recycler tokens, one per line (`#` starts a comment); kept out of `ps`.
    #[arg(
        long = "recycler-token-file",
        env = "PHOENIX_RECYCLER_TOKEN_FILE",
        value_delimiter = ','
    )]
    pub recycler_token_file: Vec<PathBuf>,
    /// Pipeline token: registers baked baselines (repeatable).
    #[arg(
        long = "pipeline-token",
        env = "PHOENIX_PIPELINE_TOKEN",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub pipeline_token: Vec<String>,
    /// File(s) holding pipeline tokens, one per line (`#` starts a comment); kept out of `ps`.
    #[arg(
        long = "pipeline-token-file",
        env = "PHOENIX_PIPELINE_TOKEN_FILE",
        value_delimiter = ','
    )]
    pub pipeline_token_file: Vec<PathBuf>,
    /// Reader token: fleet state and the fleet page (repeatable).
    #[arg(
        long = "reader-token",
        env = "PHOENIX_READER_TOKEN",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub reader_token: Vec<String>,
    /// File(s) holding reader tokens, one per line (`#` starts a comment); kept out of `ps`.
    #[arg(
        long = "reader-token-file",
        env = "PHOENIX_READER_TOKEN_FILE",
        value_delimiter = ','
    )]
    pub reader_token_file: Vec<PathBuf>,
    /// Largest request body, compressed [default: 8MiB].
    #[arg(long, env = "PHOENIX_MAX_BODY")]
    #[serde(default, deserialize_with = "phoenix_wire::confval::opt_text")]
    pub max_body: Option<String>,
    /// Largest report once decompressed [default: 64MiB].
    #[arg(long, env = "PHOENIX_MAX_REPORT")]
    #[serde(default, deserialize_with = "phoenix_wire::confval::opt_text")]
    pub max_report: Option<String>,
    /// Most line protocol waiting for the store; past it reports get 503 (agents keep and
    /// resend them) until the writers catch up [default: 64MiB].
    #[arg(long, env = "PHOENIX_MAX_WRITE_QUEUE")]
    #[serde(default, deserialize_with = "phoenix_wire::confval::opt_text")]
    pub max_write_queue: Option<String>,
    /// After an instance's first report only drift counts for this long [default: 300s].
    #[arg(long, env = "PHOENIX_GRACE")]
    #[serde(default, deserialize_with = "phoenix_wire::confval::opt_text")]
    pub grace: Option<String>,
    /// No report for this long: unhealthy (3 missed intervals: suspect) [default: 2m].
    #[arg(long, env = "PHOENIX_SILENT_AFTER")]
    #[serde(default, deserialize_with = "phoenix_wire::confval::opt_text")]
    pub silent_after: Option<String>,
    /// A check failing in this many consecutive reports: unhealthy [default: 3].
    #[arg(long, env = "PHOENIX_CHECK_FAILURES")]
    pub check_failures: Option<u32>,
    /// CPU or memory pegged (CPU > 95 %, available memory < 5 %) this long: unhealthy [default: 5m].
    #[arg(long, env = "PHOENIX_PEGGED_FOR")]
    #[serde(default, deserialize_with = "phoenix_wire::confval::opt_text")]
    pub pegged_for: Option<String>,
    /// A filesystem fuller than this percentage: unhealthy [default: 95].
    #[arg(long, env = "PHOENIX_DISK_FULL")]
    pub disk_full: Option<f64>,
    /// Instances older than this are marked for recycling (off by default).
    #[arg(long, env = "PHOENIX_MAX_LIFETIME")]
    #[serde(default, deserialize_with = "phoenix_wire::confval::opt_text")]
    pub max_lifetime: Option<String>,
    /// Instances of a group in disruption (marked, acked or not yet ready) at once, per reason:
    /// `10%` (every reason), `drift=10%,unhealthy=20%,expired=5%`, or counts (`drift=1`).
    /// A share is rounded up, at least 1; the tightest budget covering a reason wins; a reason
    /// none names gets 10% (docs/policy.md) [default: 10%].
    #[arg(long, env = "PHOENIX_BUDGET")]
    #[serde(default, deserialize_with = "phoenix_wire::confval::opt_text")]
    pub budget: Option<String>,
    /// Maintenance window for voluntary marks (drift, expired, ssh), repeatable:
    /// `DAYS HH:MM-HH:MM [ZONE]`, e.g. 'Mon-Fri 09:00-17:00 Europe/Berlin' (an end before the
    /// start runs past midnight; ZONE from the system tzdb, default UTC) [default: always open].
    #[arg(long = "window", env = "PHOENIX_WINDOW", value_delimiter = ';')]
    pub window: Vec<String>,
    /// Most new marks per minute across the fleet [default: 10].
    #[arg(long, env = "PHOENIX_MARK_RATE")]
    pub mark_rate: Option<u32>,
    /// Share of a group turning bad at once that holds marks and raises an alert [default: 50%].
    #[arg(long, env = "PHOENIX_MASS_EVENT")]
    #[serde(default, deserialize_with = "phoenix_wire::confval::opt_text")]
    pub mass_event: Option<String>,
    /// Fewest bad instances that make a mass event, whatever the share, so one bad box in a
    /// group of three is replaced rather than held [default: 3].
    #[arg(long, env = "PHOENIX_MASS_EVENT_MIN")]
    pub mass_event_min: Option<usize>,
    /// Mark nothing; log what would have been marked.
    #[arg(long, env = "PHOENIX_LOG_ONLY")]
    pub log_only: bool,
    /// SSH on an instance (anything on TCP 22, a running sshd or dropbear) is no finding:
    /// for fleets that still use SSH. Off by default: SSH on is reason `ssh`, like drift.
    #[arg(long, env = "PHOENIX_SSH_ALLOWED")]
    pub ssh_allowed: bool,
    /// Grafana's base URL, e.g. https://grafana.internal: the fleet page links each instance
    /// to the shipped dashboard (uid phoenix-fleet) with var-instance set [default: no links].
    #[arg(long, env = "PHOENIX_GRAFANA_URL")]
    pub grafana_url: Option<String>,
    /// URL to POST each new mark to (JSON, signed).
    #[arg(long, env = "PHOENIX_WEBHOOK")]
    pub webhook: Option<String>,
    /// Secret for the webhook's HMAC-SHA256 signature header.
    #[arg(long, env = "PHOENIX_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// Log format of the collector's own messages: text or json [default: text].
    #[arg(long, env = "PHOENIX_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key); reloaded when it changes.
    #[arg(long, env = "PHOENIX_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "PHOENIX_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: clients must present a certificate from this PEM CA, and an agent's
    /// certificate must name (subjectAltName) the instance id its reports carry.
    #[arg(long, env = "PHOENIX_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    /// Requests per instance (reports) and per token (other roles), e.g. 20/s, 600/m or off [default: 50/s].
    #[arg(long, env = "PHOENIX_RATE_LIMIT")]
    #[serde(default, deserialize_with = "phoenix_wire::confval::opt_text")]
    pub rate_limit: Option<String>,
    /// Requests allowed in a burst above --rate-limit [default: twice the per-second rate].
    #[arg(long, env = "PHOENIX_RATE_BURST")]
    pub rate_burst: Option<u32>,
    /// Most metric points plus log lines in one report [default: 100000].
    #[arg(long, env = "PHOENIX_MAX_POINTS")]
    pub max_points: Option<usize>,
    /// How an instance proves its id: tofu, aws, mtls or shared [default: tofu; mtls with --client-ca].
    #[arg(long, env = "PHOENIX_IDENTITY")]
    pub identity: Option<String>,
    /// --identity aws: AWS's public certificate(s) for instance identity signatures (PEM).
    #[arg(long, env = "PHOENIX_AWS_IDENTITY_CERT")]
    pub aws_identity_cert: Option<PathBuf>,
    /// --identity aws: accept only these AWS account ids (repeatable) [default: any].
    #[arg(
        long = "aws-account",
        env = "PHOENIX_AWS_ACCOUNT",
        value_delimiter = ','
    )]
    pub aws_account: Vec<String>,
    /// Most instance ids kept; a new one past it gets 429 and an alert [default: 10000].
    #[arg(long, env = "PHOENIX_MAX_INSTANCES")]
    pub max_instances: Option<usize>,
    /// Most open connections; past it a new one is answered 503 and closed [default: 4096,
    /// lowered to fit the open-file limit].
    #[arg(long, env = "PHOENIX_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// A connection must send a request's headers within this [default: 10s].
    #[arg(long, env = "PHOENIX_HEADER_TIMEOUT")]
    pub header_timeout: Option<String>,
    /// A request must be read and answered within this [default: 120s].
    #[arg(long, env = "PHOENIX_REQUEST_TIMEOUT")]
    pub request_timeout: Option<String>,
    /// Reports per peer address, checked before the body is read, e.g. 200/s or off [default: 500/s].
    #[arg(long, env = "PHOENIX_PEER_RATE_LIMIT")]
    pub peer_rate_limit: Option<String>,
    /// Reports per agent token (a fleet's, when it shares one), checked before the body is
    /// read, e.g. 2000/s or off [default: 5000/s].
    #[arg(long, env = "PHOENIX_AGENT_TOKEN_RATE_LIMIT")]
    pub agent_token_rate_limit: Option<String>,
    /// Share fleet state with other collectors in PostgreSQL, e.g.
    /// postgres://phoenix@db.internal:5432/phoenix (the schema is created and migrated by the
    /// collector). Every role's token must then be given (generated ones are single-node).
    /// Without it fleet state stays in --data-dir.
    #[arg(long, env = "PHOENIX_FLEET_STORE", hide_env_values = true)]
    pub fleet_store: Option<String>,
    /// With --fleet-store: the decider lease; a dead decider is replaced within about this
    /// [default: 10s].
    #[arg(long, env = "PHOENIX_FLEET_LEASE")]
    #[serde(default, deserialize_with = "phoenix_wire::confval::opt_text")]
    pub fleet_lease: Option<String>,
}

/// `--fleet-store`: where fleet state is shared.
#[derive(Debug, Clone)]
pub struct FleetStoreConfig {
    /// A checked `postgres://` URL (may hold a password: never log it unredacted).
    pub url: String,
    pub lease: Duration,
}

/// Merged, checked settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub influx: Option<(String, Api)>,
    pub influx_gzip: bool,
    pub influx_skip_database_creation: bool,
    pub tokens: Vec<(crate::auth::Role, String)>,
    pub max_body: usize,
    pub max_report: usize,
    pub max_write_queue: usize,
    pub health: crate::fleet::Rules,
    pub webhook: Option<(String, String)>,
    /// HTTPS certificate, key and optional client CA.
    pub tls: Option<crate::tls::TlsFiles>,
    pub rate_limit: Option<crate::security::Rate>,
    pub max_points: usize,
    /// `--identity` and what it needs.
    pub identity: crate::identity::Config,
    /// Connection cap and timeouts of the listener.
    pub listen_limits: crate::listen::Limits,
    pub peer_rate_limit: Option<crate::security::Rate>,
    pub agent_token_rate_limit: Option<crate::security::Rate>,
    /// `--fleet-store`; None: embedded (`<data-dir>/fleet.json`).
    pub fleet_store: Option<FleetStoreConfig>,
    /// `--grafana-url`, checked to be http(s) and without a trailing slash.
    pub grafana_url: Option<String>,
}

fn dur(v: Option<&str>, default: &str, flag: &str) -> anyhow::Result<Duration> {
    phoenix_wire::parse_duration(v.unwrap_or(default)).map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
}

fn size(v: Option<&str>, default: &str, flag: &str) -> anyhow::Result<usize> {
    let n = phoenix_wire::parse_size(v.unwrap_or(default))
        .map_err(|e| anyhow::anyhow!("--{flag}: {e}"))?;
    usize::try_from(n).map_err(|_| anyhow::anyhow!("--{flag}: too large for this machine"))
}

fn percent(v: Option<&str>, default: &str, flag: &str) -> anyhow::Result<f64> {
    let s = v.unwrap_or(default).trim().trim_end_matches('%');
    let p: f64 = s
        .parse()
        .with_context(|| format!("--{flag}: write a percentage such as 10%"))?;
    anyhow::ensure!(
        (0.0..=100.0).contains(&p),
        "--{flag}: {p} is not between 0% and 100%"
    );
    Ok(p / 100.0)
}

/// `--budget`: per reason, counts (`2`, whole instances) or shares (`10%`); see
/// [`crate::fleet::policy::Budgets::parse`]. `2.5` is refused: it reads as 2.5 % as easily as
/// as instances, and a wrong guess marks too many servers.
pub fn parse_budget(s: &str) -> Result<crate::fleet::policy::Budgets, String> {
    crate::fleet::policy::Budgets::parse(s)
}

impl Args {
    pub fn resolve(self) -> anyhow::Result<Config> {
        let f: Args = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading config file {}", p.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("parsing config file {}", p.display()))?
            }
            None => Args::default(),
        };
        macro_rules! pick {
            ($f:ident) => {
                self.$f.clone().or(f.$f.clone())
            };
        }
        macro_rules! list {
            ($f:ident) => {
                if self.$f.is_empty() {
                    f.$f.clone()
                } else {
                    self.$f.clone()
                }
            };
        }
        let listen = pick!(listen).unwrap_or_else(|| "127.0.0.1:7070".into());
        let listen: SocketAddr = listen
            .parse()
            .with_context(|| format!("--listen {listen:?}: give HOST:PORT, e.g. 0.0.0.0:7070"))?;
        let data_dir = pick!(data_dir).unwrap_or_else(|| "./phoenix-data".into());
        let influx = match pick!(influx_url) {
            None => None,
            Some(url) => {
                anyhow::ensure!(
                    url.starts_with("http://") || url.starts_with("https://"),
                    "--influx-url {url:?}: give http(s)://HOST:PORT"
                );
                let api = match pick!(influx_org) {
                    Some(org) => Api::V2 {
                        org,
                        bucket: pick!(influx_bucket)
                            .context("--influx-org selects the v2 API: give --influx-bucket too")?,
                        token: pick!(influx_token),
                    },
                    None => Api::V1 {
                        db: pick!(influx_db).unwrap_or_else(|| "phoenix".into()),
                        rp: pick!(influx_rp),
                        user: pick!(influx_user),
                        password: pick!(influx_password),
                    },
                };
                Some((url, api))
            }
        };
        use crate::auth::Role;
        let mut tokens = Vec::new();
        for (role, values, files) in [
            (Role::Agent, list!(agent_token), list!(agent_token_file)),
            (
                Role::Recycler,
                list!(recycler_token),
                list!(recycler_token_file),
            ),
            (
                Role::Pipeline,
                list!(pipeline_token),
                list!(pipeline_token_file),
            ),
            (Role::Reader, list!(reader_token), list!(reader_token_file)),
        ] {
            for v in values {
                tokens.push((role, v));
            }
            for p in files {
                let text = crate::auth::read_token_file(&p).with_context(|| {
                    format!("reading {} token file {}", role.name(), p.display())
                })?;
                tokens.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(|l| (role, l.to_owned())),
                );
            }
        }
        let log_only = self.log_only || f.log_only;
        let max_lifetime = match pick!(max_lifetime).as_deref() {
            None | Some("off") | Some("0") => None,
            Some(v) => Some(dur(Some(v), "", "max-lifetime")?),
        };
        let health = crate::fleet::Rules {
            grace: dur(pick!(grace).as_deref(), "300s", "grace")?,
            silent_after: dur(pick!(silent_after).as_deref(), "2m", "silent-after")?,
            check_failures: pick!(check_failures).unwrap_or(3).max(1),
            pegged_for: dur(pick!(pegged_for).as_deref(), "5m", "pegged-for")?,
            cpu_pegged: 95.0,
            mem_available_min: 5.0,
            disk_full: pick!(disk_full).unwrap_or(95.0),
            max_lifetime,
            budget: parse_budget(pick!(budget).as_deref().unwrap_or("10%"))
                .map_err(|e| anyhow::anyhow!(e))?,
            windows: crate::fleet::policy::Windows::parse_all(&list!(window))
                .map_err(|e| anyhow::anyhow!(e))?,
            mass_min: pick!(mass_event_min).unwrap_or(3),
            mark_rate_per_min: pick!(mark_rate).unwrap_or(10).max(1),
            mass_event: percent(pick!(mass_event).as_deref(), "50%", "mass-event")?,
            log_only,
            ssh_allowed: self.ssh_allowed || f.ssh_allowed,
            ..Default::default()
        };
        let webhook = match (pick!(webhook), pick!(webhook_secret)) {
            (Some(u), Some(s)) => Some((u, s)),
            (Some(_), None) => {
                bail!("--webhook needs --webhook-secret: receivers verify the signature")
            }
            (None, _) => None,
        };
        let tls = match (pick!(tls_cert), pick!(tls_key), pick!(client_ca)) {
            (Some(cert), Some(key), client_ca) => Some(crate::tls::TlsFiles {
                cert,
                key,
                client_ca,
            }),
            (None, None, None) => None,
            (Some(_), None, _) => {
                bail!("--tls-cert needs --tls-key (the certificate's PEM private key)")
            }
            (None, Some(_), _) => bail!("--tls-key needs --tls-cert (the PEM certificate chain)"),
            (None, None, Some(_)) => {
                bail!("--client-ca needs TLS: give --tls-cert and --tls-key too")
            }
        };
        let rate_limit = crate::security::Rate::parse(
            pick!(rate_limit).as_deref().unwrap_or("50/s"),
            pick!(rate_burst),
        )
        .map_err(|e| anyhow::anyhow!(e))?;
        let max_points = pick!(max_points).unwrap_or(100_000);
        anyhow::ensure!(max_points > 0, "--max-points must be at least 1");
        let identity = crate::identity::Config::resolve(
            pick!(identity).as_deref(),
            pick!(aws_identity_cert),
            list!(aws_account),
            pick!(max_instances),
            tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        )?;
        let listen_limits = crate::listen::Limits {
            max_connections: pick!(max_connections).unwrap_or(4096).max(1),
            header_timeout: dur(pick!(header_timeout).as_deref(), "10s", "header-timeout")?,
            request_timeout: dur(pick!(request_timeout).as_deref(), "120s", "request-timeout")?,
        };
        let peer_rate_limit = crate::security::Rate::parse(
            pick!(peer_rate_limit).as_deref().unwrap_or("500/s"),
            None,
        )
        .map_err(|e| anyhow::anyhow!(e.replace("--rate-limit", "--peer-rate-limit")))?;
        let agent_token_rate_limit = crate::security::Rate::parse(
            pick!(agent_token_rate_limit).as_deref().unwrap_or("5000/s"),
            None,
        )
        .map_err(|e| anyhow::anyhow!(e.replace("--rate-limit", "--agent-token-rate-limit")))?;
        let fleet_store = match pick!(fleet_store) {
            None => None,
            Some(url) => {
                crate::pgstore::parse_url(&url)?;
                let lease = dur(pick!(fleet_lease).as_deref(), "10s", "fleet-lease")?;
                anyhow::ensure!(
                    lease >= Duration::from_secs(1),
                    "--fleet-lease must be at least 1s"
                );
                Some(FleetStoreConfig { url, lease })
            }
        };
        let grafana_url = match pick!(grafana_url) {
            None => None,
            Some(u) => {
                let u = u.trim().trim_end_matches('/').to_owned();
                let scheme_ok = u.starts_with("http://") || u.starts_with("https://");
                anyhow::ensure!(
                    scheme_ok && u.len() > "https://".len() && !u.contains(['?', '#', '"', '<', '>', ' ']),
                    "--grafana-url: {u:?} is not a plain http:// or https:// address; give Grafana's base URL, e.g. https://grafana.internal"
                );
                Some(u)
            }
        };
        Ok(Config {
            grafana_url,
            fleet_store,
            identity,
            listen_limits,
            peer_rate_limit,
            agent_token_rate_limit,
            tls,
            rate_limit,
            max_points,
            listen,
            data_dir,
            influx,
            influx_gzip: pick!(influx_gzip).unwrap_or(true),
            influx_skip_database_creation: self.influx_skip_database_creation
                || f.influx_skip_database_creation,
            tokens,
            max_body: size(pick!(max_body).as_deref(), "8MiB", "max-body")?,
            max_report: size(pick!(max_report).as_deref(), "64MiB", "max-report")?,
            max_write_queue: size(
                pick!(max_write_queue).as_deref(),
                "64MiB",
                "max-write-queue",
            )?,
            health,
            webhook,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_takes_shares_counts_and_reasons() {
        use crate::fleet::policy::Budgets;
        assert_eq!(parse_budget("10%"), Ok(Budgets::share(0.10)));
        assert_eq!(parse_budget(" 2.5 % "), Ok(Budgets::share(0.025)));
        assert_eq!(parse_budget("2").unwrap().allowed("drift", 500), 2);
        let e = parse_budget("2.5").unwrap_err();
        assert!(e.contains("2.5%") && e.contains("whole number"), "{e}");
        assert!(parse_budget("120%").is_err());
        assert!(parse_budget("lots").unwrap_err().contains("10%"));
        let b = parse_budget("drift=10%,unhealthy=20%,expired=5%").unwrap();
        assert_eq!(b.allowed("silent", 10), 2);
    }

    #[test]
    fn the_grafana_url_is_a_plain_http_address() {
        let url = |v: &str| {
            Args::try_parse_from(["phoenix-collector", "--grafana-url", v])
                .unwrap()
                .resolve()
                .map(|c| c.grafana_url)
        };
        assert_eq!(
            url("https://grafana.internal:3000/").unwrap().as_deref(),
            Some("https://grafana.internal:3000")
        );
        for bad in [
            "javascript:alert(1)",
            "grafana.internal",
            "https://",
            "http://g/\"><x",
        ] {
            let e = url(bad).unwrap_err().to_string();
            assert!(
                e.contains("--grafana-url") && e.contains("https://grafana.internal"),
                "{e}"
            );
        }
        let none = Args::try_parse_from(["phoenix-collector"])
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(none.grafana_url, None);
    }

    #[test]
    fn windows_and_the_mass_event_floor_come_from_flags_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "window = [\"Sat,Sun 00:00-24:00\"]\nmass_event_min = 2\nbudget = \"drift=1,20%\"\n",
        )
        .unwrap();
        let c = Args::try_parse_from(["phoenix-collector", "--config", f.to_str().unwrap()])
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(c.health.windows.texts(), vec!["Sat,Sun 00:00-24:00"]);
        assert_eq!(c.health.mass_min, 2);
        assert_eq!(c.health.budget.to_string(), "drift=1,20%");
        let c = Args::try_parse_from([
            "phoenix-collector",
            "--config",
            f.to_str().unwrap(),
            "--window",
            "Mon-Fri 09:00-17:00 Europe/Berlin",
            "--window",
            "Fri 22:00-02:00",
        ])
        .unwrap()
        .resolve()
        .unwrap();
        assert_eq!(
            c.health.windows.list.len(),
            2,
            "flags replace the file's list"
        );
        let e = Args::try_parse_from(["phoenix-collector", "--window", "Mon 9-5"])
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(format!("{e:#}").contains("not a time"), "{e:#}");
    }

    #[test]
    fn toml_numbers_mean_what_the_flags_mean() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "grace = 10\nsilent_after = 90\nmax_body = 1024\n").unwrap();
        let args = Args::try_parse_from([
            "phoenix-collector",
            "--config",
            f.to_str().unwrap(),
            "--data-dir",
            dir.path().to_str().unwrap(),
        ])
        .unwrap();
        let c = args.resolve().unwrap();
        assert_eq!(c.health.grace, Duration::from_secs(10));
        assert_eq!(c.health.silent_after, Duration::from_secs(90));
        assert_eq!(c.max_body, 1024);
        std::fs::write(&f, "budget = 2.5\n").unwrap();
        let args = Args::try_parse_from(["phoenix-collector", "--config", f.to_str().unwrap()]);
        let e = args.unwrap().resolve().unwrap_err();
        assert!(format!("{e:#}").contains("2.5%"), "{e:#}");
        std::fs::write(&f, "budget = 2\n").unwrap();
        let args = Args::try_parse_from(["phoenix-collector", "--config", f.to_str().unwrap()]);
        let c = args.unwrap().resolve().unwrap();
        assert_eq!(
            c.health.budget.to_string(),
            "2",
            "a TOML number is a count, as the flag"
        );
    }

    #[test]
    fn unknown_flags_get_the_nearest_one() {
        let e = Args::try_parse_from(["phoenix-collector", "--influx-bucekt", "b"]).unwrap_err();
        assert!(e.to_string().contains("--influx-bucket"), "{e}");
    }

    #[test]
    fn every_flag_has_help() {
        use clap::CommandFactory;
        for a in Args::command().get_arguments() {
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            assert!(!help.trim().is_empty(), "--{} has no help", a.get_id());
        }
    }
}
