//! phoenix-collector: takes agents' reports, writes every point to InfluxDB, keeps fleet
//! state and marks drifted or unhealthy instances for phoenix replacement.

pub mod api;
pub mod audit;
pub mod auth;
pub mod baselines;
pub mod config;
pub mod convert;
pub mod drift;
pub mod fleet;
pub mod health;
pub mod identity;
pub mod lineproto;
pub mod listen;
pub mod page;
pub mod queue;
pub mod schema;
pub mod security;
pub mod selfmetrics;
pub mod sink;
pub mod store;
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
        Some((url, api)) => Arc::new(sink::influx::Influx::new(
            url,
            api.clone(),
            cfg.influx_gzip,
            Duration::from_secs(30),
        )),
        None => {
            let db = "phoenix";
            Arc::new(sink::file::FileSink::new(cfg.data_dir.join("influx"), db)?)
        }
    })
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
    {
        let sink = sink.clone();
        // Not fatal: InfluxDB may come up after us; writes then answer 503 until it does.
        tokio::task::spawn_blocking(move || {
            if let Err(e) = sink.prepare() {
                tracing::warn!(error = %e, "store not ready yet");
            }
        });
    }
    let writer = writer::start(sink, writer::Settings::default());
    let limits = phoenix_wire::Limits {
        max_decompressed: cfg.max_report,
        max_points: cfg.max_points,
        ..Default::default()
    };
    let baselines = baselines::Baselines::open(&cfg.data_dir.join("baselines"))
        .with_context(|| format!("opening {}/baselines", cfg.data_dir.display()))?;
    let (phoenix_fleet, phoenix_task, phoenix_stop) = start_phoenix(&cfg, writer.clone())?;
    let obs = Arc::new(selfmetrics::Obs::new(cfg.tls.is_some()));
    tokio::spawn(selfmetrics::run(
        obs.clone(),
        phoenix_fleet.clone(),
        writer.clone(),
    ));
    let identity = Arc::new(cfg.identity.open(&cfg.data_dir, api::now_ms())?);
    tracing::info!(
        identity = identity.mode().as_str(),
        enrolled = identity.len(),
        max_instances = cfg.identity.limits.max_instances,
        "identity gate ready"
    );
    tokio::spawn(identity::sweep_every(
        identity.clone(),
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
            mtls: cfg.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        },
        obs,
    });
    let app = api::router(state);
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
    match tls {
        Some(tls) => {
            tls.watch(tls::RELOAD_POLL);
            tracing::info!(listen = %listener.local_addr()?, store = %store, tls = true, mtls = cfg.tls.as_ref().is_some_and(|t| t.client_ca.is_some()), "phoenix-collector ready");
            tls::serve(listener, app, tls, cfg.listen_limits, shutdown()).await;
        }
        None => {
            if !cfg.listen.ip().is_loopback() {
                tracing::warn!(listen = %cfg.listen, "serving plain HTTP on a non-loopback address: tokens cross the network in clear; give --tls-cert and --tls-key");
            }
            tracing::info!(listen = %listener.local_addr()?, store = %store, tls = false, "phoenix-collector ready");
            listen::serve(listener, app, None, cfg.listen_limits, shutdown()).await;
        }
    }
    // The queue's last pass and the final save of the fleet state.
    phoenix_stop.send(true).ok();
    phoenix_task.await.ok();
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

/// Fleet state from `<data-dir>/fleet.json`, and the phoenix queue's background task.
#[allow(clippy::type_complexity)]
fn start_phoenix(
    cfg: &Config,
    writer: writer::WriterHandle,
) -> anyhow::Result<(
    Arc<fleet::Fleet>,
    tokio::task::JoinHandle<()>,
    tokio::sync::watch::Sender<bool>,
)> {
    let store = store::Store::new(&cfg.data_dir);
    let fleet = Arc::new(fleet::Fleet::new(cfg.health.clone(), api::now_ms()));
    if let Some(snap) = store.load()? {
        tracing::info!(instances = snap.instances.len(), saved_ms = snap.saved_ms, file = %store.path().display(), "fleet state restored");
        fleet.restore(snap);
    }
    if cfg.health.log_only {
        tracing::warn!("--log-only: nothing will be marked for replacement; would-be marks are logged and listed under \"held\" in GET /v1/phoenix");
    }
    let hook = cfg.webhook.as_ref().map(|(url, secret)| {
        webhook::Webhook::start(url.clone(), secret.clone(), webhook::Settings::default())
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(fleet::run(fleet.clone(), writer, hook, store, stop_rx));
    Ok((fleet, task, stop_tx))
}
