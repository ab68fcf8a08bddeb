//! phoenix-collector: takes agents' reports, writes every point to InfluxDB, keeps fleet
//! state and marks drifted or unhealthy instances for phoenix replacement.

pub mod api;
pub mod app;
pub mod audit;
pub mod auth;
pub mod baselines;
pub mod config;
pub mod convert;
pub mod decider;
pub mod drift;
pub mod fleet;
pub mod hist;
pub mod identity;
pub mod lineproto;
pub mod listen;
pub mod page;
pub mod pgstore;
pub mod reply;
pub mod schema;
pub mod security;
pub mod selfmetrics;
pub mod sink;
pub mod tls;
pub mod webhook;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use auth::{Role, Tokens};
use config::Config;
use sink::Sink;

/// Tokens from the configuration; for a role with none, a generated one kept in
/// `<data-dir>/tokens/<role>.token` (mode 600), so a fresh collector is never open.
pub fn load_tokens(cfg: &Config) -> anyhow::Result<Tokens> {
    let mut t = Tokens::default();
    for (role, v) in &cfg.tokens {
        t.add(*role, v);
    }
    if cfg.fleet_store.is_some() {
        // A generated token lives in one collector's data dir: agents that fail over to
        // another collector would be refused there.
        let missing: Vec<&str> = Role::ALL
            .into_iter()
            .filter(|r| !t.has(*r))
            .map(Role::name)
            .collect();
        anyhow::ensure!(
            missing.is_empty(),
            "--fleet-store: give every collector the same tokens from files or env \
             (--{0}-token-file F or PHOENIX_{1}_TOKEN); generated tokens are single-node. \
             Missing: {2}",
            missing[0],
            missing[0].to_uppercase(),
            missing.join(", ")
        );
        return Ok(t);
    }
    let dir = cfg.data_dir.join("tokens");
    for role in Role::ALL {
        if t.has(role) {
            continue;
        }
        let path = dir.join(format!("{}.token", role.name()));
        let token = if path.exists() {
            auth::read_token_file(&path).with_context(|| format!("reading {}", path.display()))?
        } else {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let token = auth::generate().context("reading /dev/urandom")?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            std::io::Write::write_all(&mut f, token.as_bytes())?;
            tracing::info!(role = role.name(), file = %path.display(), "no token given for this role; generated one");
            token
        };
        t.add(role, &token);
    }
    Ok(t)
}

pub fn make_sink(cfg: &Config) -> anyhow::Result<Arc<dyn Sink>> {
    Ok(match &cfg.influx {
        Some((url, api)) => Arc::new(
            sink::influx::Influx::new(url, api.clone(), cfg.influx_gzip, Duration::from_secs(30))
                .create_database(!cfg.influx_skip_database_creation),
        ),
        None => {
            let db = "phoenix";
            Arc::new(sink::file::FileSink::new(cfg.data_dir.join("influx"), db)?)
        }
    })
}

/// The store's start-up check. Reachable but lacking what we write to (a retention policy,
/// a bucket): stop here with its name. Unreachable: start anyway (InfluxDB may come up after
/// us; reports answer 503 meanwhile and agents keep them) and check again until it answers.
async fn check_store(sink: &Arc<dyn Sink>) -> anyhow::Result<()> {
    let first = {
        let sink = sink.clone();
        tokio::task::spawn_blocking(move || sink.prepare()).await?
    };
    match first {
        Ok(()) => Ok(()),
        Err(e @ sink::SinkError::NotFound(_)) => Err(e.into()),
        Err(sink::SinkError::Unreachable { what, err }) => {
            tracing::warn!(store = %what, error = %err, "store unreachable at start-up; starting anyway, reports get 503 until it answers (agents keep them); retrying");
            let sink = sink.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    let s = sink.clone();
                    match tokio::task::spawn_blocking(move || s.prepare()).await {
                        Ok(Err(sink::SinkError::Unreachable { .. })) => continue,
                        Ok(Ok(())) => tracing::info!(store = %sink.describe(), "store reachable"),
                        Ok(Err(e)) => {
                            tracing::error!(store = %sink.describe(), error = %e, "store reachable but not ready for writes")
                        }
                        Err(e) => tracing::error!(error = %e, "store check failed"),
                    }
                    break;
                }
            });
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "store not ready for writes; starting anyway, reports get 503 until it is");
            Ok(())
        }
    }
}

/// Run the collector until SIGTERM or SIGINT.
pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| {
        format!(
            "creating data dir {} (give --data-dir a writable path)",
            cfg.data_dir.display()
        )
    })?;
    let tokens = load_tokens(&cfg)?;
    let sink = make_sink(&cfg)?;
    let store = sink.describe();
    check_store(&sink).await?;
    // Bind before the fleet task starts: a port in use is then a plain start-up error, with
    // no background task cut off mid-save.
    // Load TLS before binding, so a bad certificate is a start-up error, not a silent port.
    let tls = match &cfg.tls {
        Some(files) => Some(
            tls::Reloader::new(files.clone())
                .context("loading TLS files (PEM certificate chain and private key)")?,
        ),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| {
            format!(
                "listening on {} (is another collector running? use --listen)",
                cfg.listen
            )
        })?;
    let writer = writer::start(
        sink,
        writer::Settings {
            queue_bytes: cfg.max_write_queue,
            ..Default::default()
        },
    );
    let limits = phoenix_wire::Limits {
        max_decompressed: cfg.max_report,
        max_points: cfg.max_points,
        ..Default::default()
    };
    let (phoenix_fleet, decider, shared) = start_phoenix(&cfg, writer.clone())?;
    let baselines = match &shared {
        None => baselines::Baselines::open(&cfg.data_dir.join("baselines"))
            .with_context(|| format!("opening {}/baselines", cfg.data_dir.display()))?,
        Some(pg) => baselines::Baselines::with_store(pg.baselines()).map_err(anyhow::Error::msg)?,
    };
    let obs = Arc::new(selfmetrics::Obs::new(cfg.tls.is_some()));
    tokio::spawn(selfmetrics::run(
        obs.clone(),
        phoenix_fleet.clone(),
        writer.clone(),
    ));
    let identity = Arc::new(cfg.identity.open(
        &cfg.data_dir,
        shared.as_ref().map(|pg| pg.enrolments()),
        fleet::clock::wall_now_ms(),
    )?);
    tracing::info!(
        identity = identity.mode().as_str(),
        enrolled = identity.len(),
        max_instances = cfg.identity.limits.max_instances,
        "identity gate ready"
    );
    tokio::spawn(identity::sweep_every(
        identity.clone(),
        phoenix_fleet.clone(),
        Duration::from_secs(60),
    ));
    let state = Arc::new(api::AppState {
        identity,
        schema: schema::Registry::default(),
        tokens,
        baselines,
        writer,
        fleet: phoenix_fleet.clone(),
        limits,
        max_body: cfg.max_body,
        store: store.clone(),
        security: security::Security {
            limiter: security::Limiter::new(cfg.rate_limit),
            peers: security::Limiter::new(cfg.peer_rate_limit),
            callers: security::Limiter::new(cfg.rate_limit),
            agent_tokens: security::Limiter::new(cfg.agent_token_rate_limit),
            mtls: cfg.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        },
        obs,
        page: page::Settings {
            grafana_url: cfg.grafana_url.clone(),
        },
    });
    let app = api::router(state);
    match tls {
        Some(tls) => {
            tls.watch(tls::RELOAD_POLL);
            tracing::info!(listen = %listener.local_addr()?, store = %store, tls = true, mtls = cfg.tls.as_ref().is_some_and(|t| t.client_ca.is_some()), "phoenix-collector ready");
            listen::serve(listener, app, Some(tls), cfg.listen_limits, shutdown()).await;
        }
        None => {
            if !cfg.listen.ip().is_loopback() {
                tracing::warn!(listen = %cfg.listen, "serving plain HTTP on a non-loopback address: tokens cross the network in clear; give --tls-cert and --tls-key");
            }
            tracing::info!(listen = %listener.local_addr()?, store = %store, tls = false, "phoenix-collector ready");
            listen::serve(listener, app, None, cfg.listen_limits, shutdown()).await;
        }
    }
    // The final save of the fleet state, a last flush to a shared store, the lease given up.
    tokio::task::spawn_blocking(move || {
        decider.stop();
        if let Some(pg) = shared {
            pg.close();
        }
    })
    .await
    .ok();
    Ok(())
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    tracing::info!("stopping");
}

type Shared = Option<Arc<pgstore::store::PgFleetStore>>;

/// Fleet state from its store (`<data-dir>/fleet.json` embedded, or PostgreSQL), and the
/// queue driver.
fn start_phoenix(
    cfg: &Config,
    writer: writer::WriterHandle,
) -> anyhow::Result<(Arc<fleet::Fleet>, decider::Decider, Shared)> {
    let clock: Arc<dyn fleet::Clock> = Arc::new(fleet::SystemClock::new());
    let (store, shared): (Arc<dyn fleet::FleetStore>, Shared) = match &cfg.fleet_store {
        None => (Arc::new(fleet::EmbeddedStore::new(&cfg.data_dir)), None),
        Some(fs) => {
            let opts = pgstore::PgOptions {
                lease_ttl: fs.lease,
                ..Default::default()
            };
            let pg = pgstore::store::PgFleetStore::open(&fs.url, opts, clock.clone())
                .with_context(|| {
                    format!(
                        "opening the fleet store {} (is PostgreSQL up and the database created?)",
                        pgstore::redact(&fs.url)
                    )
                })?;
            tracing::info!(store = %fleet::FleetStore::describe(pg.as_ref()), "fleet state shared in PostgreSQL");
            (pg.clone(), Some(pg))
        }
    };
    let fleet = Arc::new(fleet::Fleet::open(cfg.health.clone(), clock, store)?);
    if cfg.health.log_only {
        tracing::warn!("--log-only: nothing will be marked for replacement; would-be marks are logged and listed under \"held\" in GET /v1/phoenix");
    }
    let hook = cfg.webhook.as_ref().map(|(url, secret)| {
        webhook::Webhook::start(url.clone(), secret.clone(), webhook::Settings::default())
    });
    let rt = tokio::runtime::Handle::current();
    let decider = decider::Decider::start(fleet.clone(), writer, hook, rt);
    Ok((fleet, decider, shared))
}
