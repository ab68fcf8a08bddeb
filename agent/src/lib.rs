//! phoenix-agent: metrics, log lines and a read-only config-drift hash, shipped off the box.
//!
//! Each source runs on its own thread behind [`source::Source`] and pushes batches into the
//! durable [`spool::Spool`]; one [`transport::Sender`] drains it to the collectors.

pub mod checks;
pub mod config;
pub mod counters;
pub mod diag;
pub mod drift;
pub mod enrol;
pub mod identity;
pub mod journal;
pub mod kmsg;
pub mod logs;
pub mod metrics;
pub mod procs;
pub mod protect;
pub mod sockets;
pub mod source;
pub mod spool;
pub mod supervise;
pub mod tls;
pub mod transport;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use config::RunConfig;
use source::{Ctx, Source};

/// Stack of each source's thread (the default is 2 MiB). Only touched pages cost RSS, so this
/// bounds address space, not memory; debug builds keep the default, their frames are larger.
const SOURCE_STACK: usize = if cfg!(debug_assertions) {
    2 << 20
} else {
    1 << 20
};

/// The soft open-file limit (RLIMIT_NOFILE), 1024 if it cannot be read: the agent's sources
/// size what they keep open from it.
pub fn open_file_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0;
    if ok {
        r.rlim_cur
    } else {
        1024
    }
}

/// Hand the heap's free pages back to the kernel. glibc returns only the top of the heap by
/// itself; what a burst (the first drift scan, a log backlog, a big report) freed in the
/// middle stays resident otherwise. Called once an interval (and after a drift push): one
/// walk of the free lists of a heap of about a megabyte.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only takes the allocator's own lock.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Build every source the configuration asks for.
pub fn sources(cfg: &RunConfig) -> anyhow::Result<Vec<Box<dyn Source>>> {
    let mut out: Vec<Box<dyn Source>> = Vec::new();
    let mut m = metrics::MetricsSource::new("/proc");
    if !cfg.checks.is_empty() {
        m.checks = Some(checks::Checks::new(&cfg.checks, cfg.check_timeout)?);
    }
    m.procs = Some(procs::Procs::new("/proc", cfg.top_processes));
    m.sockets = Some(sockets::Sockets::new("/proc"));
    m.protect = Some(protect::ProtectFile::new(&cfg.protect_file));
    out.push(Box::new(m));
    if let Some(path) = &cfg.kmsg {
        out.push(Box::new(kmsg::KmsgSource::new(path)));
    }
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
    for c in &cfg.collectors {
        tls::check_url(c, cfg.tls.insecure_http)?;
    }
    let http = tls::http_agent(&cfg.tls, &cfg.collectors)?;
    let spool = Arc::new(spool::Spool::open(
        &cfg.state_dir.join("spool"),
        cfg.spool_max,
    )?);
    let aws = if cfg.identity == "aws" {
        let p = enrol::fetch_aws(&cfg.imds_url, std::time::Duration::from_secs(5))
            .context("--identity aws: reading the instance identity document from IMDS")?;
        if let Some(given) = cfg.instance_id.as_deref().filter(|i| *i != p.instance_id) {
            tracing::warn!(given, signed = %p.instance_id, "--instance-id differs from the signed instance identity document; the collector will refuse the reports");
        }
        Some(p)
    } else {
        None
    };
    let instance_id = cfg
        .instance_id
        .as_deref()
        .or(aws.as_ref().map(|a| a.instance_id.as_str()));
    let image_id = cfg
        .image_id
        .as_deref()
        .or(aws.as_ref().and_then(|a| a.image_id.as_deref()));
    enrol::install(enrol::Proof {
        credential: enrol::credential(&cfg.state_dir)?,
        aws: aws.clone(),
    });
    let identity = identity::discover(&identity::Overrides {
        instance_id,
        image_id,
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
    tracing::info!(instance_id = %identity.instance_id, image_id = %identity.image_id, collectors = %cfg.collectors.join(","), spooled = spool.len(), "phoenix-agent starting");
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
        let again = cfg.clone();
        let rebuild = move || Ok(sources(&again)?.into_iter().find(|s| s.name() == name));
        threads.push(
            std::thread::Builder::new()
                .name(name.into())
                .stack_size(SOURCE_STACK)
                .spawn(move || supervise::run(src, ctx, rebuild))?,
        );
    }
    let mut sender = transport::Sender::with_http(
        http,
        &cfg.collectors,
        cfg.token.clone(),
        spool.clone(),
        cfg.state_dir.clone(),
    )
    .with_drift_link(ctx.drift_link.clone());
    let diag_link = diag::DiagLink::default();
    sender = sender.with_diag_link(diag_link.clone());
    {
        let probes = diag::Probes {
            kmsg: cfg
                .kmsg
                .clone()
                .unwrap_or_else(|| std::path::PathBuf::from("/dev/kmsg")),
            ..Default::default()
        };
        let post: Arc<dyn diag::Post> = Arc::new(sender.diag_poster());
        let src = diag::DiagSource::new(diag_link, probes, post);
        let again = src.clone();
        let rebuild = move || Ok(Some(Box::new(again.clone()) as Box<dyn Source>));
        let ctx = ctx.clone();
        threads.push(
            std::thread::Builder::new()
                .name("diag".into())
                .stack_size(SOURCE_STACK)
                .spawn(move || supervise::run(Box::new(src), ctx, rebuild))?,
        );
    }
    sender.max_in_flight = cfg.max_in_flight;
    // Often enough that a recovered first collector gets its agents back within a few
    // intervals, rarely enough to cost nothing.
    sender.probe_every = (cfg.interval * 3).clamp(Duration::from_secs(5), Duration::from_secs(60));
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
