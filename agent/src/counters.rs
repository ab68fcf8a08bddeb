//! Process-wide counters that sources bump and `phoenix_agent` reports.
//!
//! What the agent could not keep is counted by reason (`dropped_points_<reason>`,
//! `dropped_lines_<reason>`), next to the totals `dropped_points` (in the spool's stats) and
//! `dropped_lines`: nobody reads the agent's own log on an immutable box, so these figures
//! are how a loss is seen. They are cumulative, so they reach the collector with the first
//! metrics batch that fits once there is room again.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        $(pub static $name: AtomicU64 = AtomicU64::new(0);)*
        /// (field name, value) of every counter.
        pub fn snapshot() -> Vec<(&'static str, u64)> {
            vec![$((stringify!($name), $name.load(Ordering::Relaxed))),*]
        }
    };
}

#[allow(non_upper_case_globals)]
mod names {
    use super::*;
    counters!(
        lines_read,
        lines_queued,
        bytes_read,
        files_rotated,
        files_truncated,
        source_restarts,
        drift_scans,
        drift_events,
        drift_overflows,
        drift_resends,
        journal_entries,
        journal_cursor_resets,
        // Metric points evicted or never queued: the spool was at --spool-max, or the state
        // dir could not be written (disk full, EIO).
        dropped_points_spool_full,
        dropped_points_disk,
        // Points and lines the collector refused even one by one (kept in rejected/), and
        // those removed from rejected/ to keep it within --spool-max.
        refused_points,
        refused_lines,
        dropped_points_rejected_full,
        dropped_lines_rejected_full,
        dropped_lines,
        // Batches the collector refused (400/413) that were split in two to find the bad point.
        batches_bisected,
        // Batches a collector called duplicates, sent again under a new seq (Spool::reseq).
        batches_resent_as_new,
        spool_write_errors,
        state_write_errors,
        send_retries,
        collector_failovers
    );
}

pub use names::*;

pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
