use clap::Parser;

/// jemalloc: see collector/Cargo.toml for the figures that chose it.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let args = phoenix_collector::config::Args::parse();
    let json = args.log_format.as_deref() == Some("json");
    let filter = tracing_subscriber::EnvFilter::try_from_env("PHOENIX_LOG_LEVEL")
        .unwrap_or_else(|_| "info".into());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal: a log file or the journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        b.json().init();
    } else {
        b.init();
    }
    let result = args.resolve().and_then(|cfg| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(phoenix_collector::serve(cfg))
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("phoenix-collector: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
