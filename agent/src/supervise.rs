//! Keeps every source alive inside a live process: one that fails is logged, counted
//! (`source_restarts` in `phoenix_agent`) and started again with backoff, never left dead
//! while the agent looks healthy from outside.

use std::time::{Duration, Instant};

use crate::counters;
use crate::source::{Ctx, Source};

/// First wait after a failure; it doubles up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A source that ran this long before failing starts again from `MIN_BACKOFF`.
const HEALTHY_RUN: Duration = Duration::from_secs(300);

/// Run `first` until the agent stops; after a failure, build a fresh one with `rebuild`
/// (None: the configuration no longer has it) and run that.
pub fn run(
    first: Box<dyn Source>,
    ctx: Ctx,
    rebuild: impl Fn() -> anyhow::Result<Option<Box<dyn Source>>>,
) {
    let name = first.name();
    let mut next = Some(first);
    let mut backoff = MIN_BACKOFF;
    loop {
        let started = Instant::now();
        let result = match next.take() {
            Some(src) => src.run(ctx.clone()),
            None => match rebuild() {
                Ok(Some(src)) => src.run(ctx.clone()),
                Ok(None) => return,
                Err(e) => Err(e),
            },
        };
        let Err(e) = result else { return };
        if ctx.spool.stopping() {
            return;
        }
        counters::add(&counters::source_restarts, 1);
        if started.elapsed() >= HEALTHY_RUN {
            backoff = MIN_BACKOFF;
        }
        tracing::error!(source = name, error = %format!("{e:#}"), retry_in_s = backoff.as_secs(), "source failed; starting it again");
        if ctx.sleep(backoff) {
            return;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::spool::Spool;

    #[derive(Debug)]
    struct Flaky(Arc<AtomicU32>);

    impl Source for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        fn run(self: Box<Self>, ctx: Ctx) -> anyhow::Result<()> {
            if self.0.fetch_add(1, Ordering::SeqCst) < 1 {
                anyhow::bail!("out of descriptors");
            }
            ctx.spool.stop();
            Ok(())
        }
    }

    #[test]
    fn a_failed_source_is_counted_and_started_again() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = Ctx {
            identity: Default::default(),
            spool: Arc::new(Spool::open(&dir.path().join("spool"), 1 << 20).unwrap()),
            state_dir: dir.path().to_path_buf(),
            interval: Duration::from_secs(10),
            drift_link: Default::default(),
        };
        let runs = Arc::new(AtomicU32::new(0));
        let before = counters::source_restarts.load(Ordering::Relaxed);
        let r = runs.clone();
        run(Box::new(Flaky(runs.clone())), ctx, move || {
            Ok(Some(Box::new(Flaky(r.clone())) as Box<dyn Source>))
        });
        assert_eq!(runs.load(Ordering::SeqCst), 2, "run again after failing");
        assert!(counters::source_restarts.load(Ordering::Relaxed) > before);
    }
}
