use clap::{Parser, Subcommand};

use phoenix_agent::config::RunArgs;

/// Ships metrics, log lines and a config-drift hash off an immutable server to phoenix-collector.
/// Reads only; listens on nothing.
#[derive(Parser)]
#[command(name = "phoenix-agent", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent: sample, tail, hash and ship until stopped.
    Run(Box<RunArgs>),
    /// Hash the watched files into a baseline manifest (last step of an image build).
    Bake(phoenix_agent::drift::BakeArgs),
    /// Compare this box with its baseline; exit 0 clean, 1 drifted, 2 error.
    Drift(phoenix_agent::drift::DriftArgs),
}

fn main() -> std::process::ExitCode {
    // One malloc arena for every thread: the agent's threads are few and mostly asleep, and
    // glibc's arena per thread keeps each one's freed memory resident (peak RSS, issue 16).
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        // glibc's mmap threshold stays dynamic: fixed at 64 KiB, every log batch's buffers
        // were fresh mappings, page-faulted in and unmapped again (+20 % CPU a line in
        // logs-bench). Freed heap goes back by `release_free_memory` instead.
    }
    let cli = Cli::parse();
    let json = match &cli.cmd {
        Cmd::Run(a) => {
            a.log_format.as_deref() == Some("json")
                || std::env::var("PHOENIX_LOG_FORMAT").is_ok_and(|v| v == "json")
        }
        _ => false,
    };
    init_tracing(json);
    let result = match cli.cmd {
        Cmd::Run(args) => args
            .resolve()
            .and_then(|cfg| phoenix_agent::run(cfg, spawn_signal_thread))
            .map(|_| 0u8),
        Cmd::Bake(args) => phoenix_agent::drift::bake(args).map_err(Into::into),
        Cmd::Drift(args) => phoenix_agent::drift::drift(args).map_err(Into::into),
    };
    match result {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("phoenix-agent: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn init_tracing(json: bool) {
    use tracing_subscriber::prelude::*;
    // `Targets` takes `level` and `target=level` lists: all an agent's log needs. EnvFilter's
    // span and field matchers compile regexes at start-up, which cost the idle agent about
    // 0.5 MB of resident code and heap (docs/benchmarks.md).
    let filter = match log_filter(std::env::var("PHOENIX_LOG_LEVEL").ok().as_deref()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("phoenix-agent: PHOENIX_LOG_LEVEL: {e}; logging at info (give a level such as debug, or target=level pairs separated by commas)");
            log_filter(None).expect("the default filter parses")
        }
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal: a log file or the journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry.with(fmt.json()).init();
    } else {
        registry.with(fmt).init();
    }
}

/// The log filter from `PHOENIX_LOG_LEVEL` (unset or empty: info).
fn log_filter(
    var: Option<&str>,
) -> Result<tracing_subscriber::filter::Targets, tracing_subscriber::filter::ParseError> {
    match var.map(str::trim) {
        None | Some("") => "info".parse(),
        Some(v) => v.parse(),
    }
}

/// SIGTERM/SIGINT stop the agent cleanly: a dedicated thread waits for them with sigwait, so
/// no handler runs in signal context. The signals are blocked in every thread first.
fn spawn_signal_thread(spool: std::sync::Arc<phoenix_agent::spool::Spool>) {
    // SAFETY: plain libc signal-mask calls on a zeroed sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        std::thread::spawn(move || {
            let mut sig = 0;
            libc::sigwait(&set, &mut sig);
            tracing::info!(signal = sig, "stopping");
            spool.stop();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;
    use tracing::Level;

    #[test]
    fn log_levels_and_target_lists_parse_and_nonsense_is_named() {
        let f = log_filter(None).unwrap();
        assert!(f.would_enable("phoenix_agent::logs", &Level::INFO));
        assert!(!f.would_enable("phoenix_agent::logs", &Level::DEBUG));
        let f = log_filter(Some("warn,phoenix_agent::logs=trace")).unwrap();
        assert!(f.would_enable("phoenix_agent::logs", &Level::TRACE));
        assert!(!f.would_enable("phoenix_agent::spool", &Level::INFO));
        assert!(f.would_enable("phoenix_agent::spool", &Level::WARN));
        assert!(log_filter(Some("phoenix_agent=loud")).is_err());
    }
}
