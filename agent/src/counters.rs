//! Process-wide counters that sources bump and `phoenix_agent` reports.

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
        drift_scans,
        drift_events,
        drift_overflows,
        drift_resends,
        journal_entries,
        journal_cursor_resets
    );
}

pub use names::*;

pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
