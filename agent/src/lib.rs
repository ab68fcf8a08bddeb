//! phoenix-agent: metrics, log lines and a read-only config-drift hash, shipped off the box.
//!
//! Each source runs on its own thread behind [`source::Source`] and pushes batches into the
//! durable [`spool::Spool`]; one [`transport::Sender`] drains it to the collector.

pub mod checks;
pub mod config;
pub mod counters;
pub mod drift;
pub mod identity;
pub mod journal;
pub mod logs;
pub mod metrics;
pub mod source;
pub mod spool;
pub mod tls;
pub mod transport;

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use config::RunConfig;
use source::{Ctx, Source};

/// Build every source the configuration asks for.
pub fn sources(cfg: &RunConfig) -> anyhow::Result<Vec<Box<dyn Source>>> {
    let mut out: Vec<Box<dyn Source>> = Vec::new();
    let mut m = metrics::MetricsSource::new("/proc");
    if !cfg.checks.is_empty() {
        m.checks = Some(checks::Checks::new(&cfg.checks)?);
    }
    out.push(Box::new(m));
    if !cfg.logs.is_empty() {
        out.push(Box::new(logs::LogSource::new(logs::Options::from_config(
            cfg,
        ))));
    }
    if cfg.journal {
        out.push(Box::new(journal::JournalSource::new(
            journal::Options::from_config(cfg),
        )));
    }
    if let Some(d) = drift::DriftSource::from_config(cfg)? {
        out.push(Box::new(d));
    }
    Ok(out)
}

/// `phoenix-agent run`: start the sources and drain the spool until SIGTERM or SIGINT.
pub fn run(
    cfg: RunConfig,
    stop_signal: impl FnOnce(Arc<spool::Spool>) + Send + 'static,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.state_dir).with_context(|| {
        format!(
            "creating state dir {} (give --state-dir a writable path)",
            cfg.state_dir.display()
        )
    })?;
    tls::check_url(&cfg.collector, cfg.tls.insecure_http)?;
    let http = tls::http_agent(&cfg.tls)?;
    let spool = Arc::new(spool::Spool::open(
        &cfg.state_dir.join("spool"),
        cfg.spool_max,
    )?);
    let identity = identity::discover(&identity::Overrides {
        instance_id: cfg.instance_id.as_deref(),
        image_id: cfg.image_id.as_deref(),
        group: cfg.group.as_deref(),
        baked_image_id: drift::baked_image_id(cfg.baseline.as_deref(), &cfg.state_dir),
        root: Path::new("/"),
    });
    if let Some(g) = &identity.group {
        anyhow::ensure!(
            phoenix_wire::valid_id(g),
            "--group {g:?}: use 1-128 chars of A-Z a-z 0-9 - _ . : /"
        );
    }
    tracing::info!(instance_id = %identity.instance_id, image_id = %identity.image_id, collector = %cfg.collector, spooled = spool.len(), "phoenix-agent starting");
    // Before any thread starts, so every thread inherits the blocked signal mask.
    stop_signal(spool.clone());
    let ctx = Ctx {
        identity: Arc::new(identity),
        spool: spool.clone(),
        state_dir: cfg.state_dir.clone(),
        interval: cfg.interval,
        drift_link: drift::DriftLink::default(),
    };
    let mut threads = Vec::new();
    for src in sources(&cfg)? {
        let ctx = ctx.clone();
        let name = src.name();
        threads.push(
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    if let Err(e) = src.run(ctx) {
                        tracing::error!(source = name, error = %format!("{e:#}"), "source stopped");
                    }
                })?,
        );
    }
    let sender = transport::Sender::with_http(
        http,
        &cfg.collector,
        cfg.token.clone(),
        spool.clone(),
        cfg.state_dir.clone(),
    )
    .with_drift_link(ctx.drift_link.clone());
    sender.run();
    for t in threads {
        t.join().ok();
    }
    tracing::info!(
        spooled = spool.len(),
        "phoenix-agent stopped; unsent batches stay in the spool"
    );
    Ok(())
}
