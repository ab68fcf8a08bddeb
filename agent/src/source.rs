//! What every source of data (metrics, log files, drift, ...) looks like to the agent.

use std::path::PathBuf;
use std::sync::Arc;

use phoenix_wire::{Identity, Report};

use crate::drift::DriftLink;
use crate::spool::Spool;

/// Everything a source needs: who we are, where to queue batches, where to keep state.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub identity: Arc<Identity>,
    pub spool: Arc<Spool>,
    pub state_dir: PathBuf,
    pub interval: std::time::Duration,
    /// The drift root every report carries, and the collector's requests to resend drift.
    pub drift_link: DriftLink,
}

impl Ctx {
    /// An empty report carrying this agent's identity; the spool sets its seq.
    pub fn report(&self) -> Report {
        Report {
            interval_ms: self.interval.as_millis() as u64,
            drift_root: self.drift_link.root(),
            ..Report::new((*self.identity).clone())
        }
    }

    /// Sleep until `d` passed or the agent stops; true when stopping.
    pub fn sleep(&self, d: std::time::Duration) -> bool {
        self.spool.sleep(d)
    }
}

/// A source runs on its own thread until the agent stops, pushing batches into the spool.
/// Each source owns its state (offsets, previous samples) and its checkpoint format.
pub trait Source: Send {
    /// Short name, used for the checkpoint file (`<name>.acked.json`) and in logs.
    fn name(&self) -> &'static str;
    /// Run until `ctx.spool.stopping()`; an error ends only this source, and is logged.
    fn run(self: Box<Self>, ctx: Ctx) -> anyhow::Result<()>;
}
