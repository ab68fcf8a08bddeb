//! Health rules: when an instance counts as unhealthy, and how many may be marked at once.

use std::time::Duration;

/// Every rule is configurable; defaults are in [`crate::config`].
#[derive(Debug, Clone)]
pub struct Rules {
    /// After the first report only drift counts for this long.
    pub grace: Duration,
    /// No report for this long: unhealthy. Three missed intervals: suspect.
    pub silent_after: Duration,
    /// A check failing in this many consecutive reports: unhealthy.
    pub check_failures: u32,
    /// CPU above `cpu_pegged` % or available memory below `mem_available_min` % this long.
    pub pegged_for: Duration,
    pub cpu_pegged: f64,
    pub mem_available_min: f64,
    /// A filesystem fuller than this percentage.
    pub disk_full: f64,
    /// Older than this: marked for recycling. None: off.
    pub max_lifetime: Option<Duration>,
    /// Share of a group that may be marked at once (at least one instance).
    pub budget: f64,
    /// New marks per minute across the fleet.
    pub mark_rate_per_min: u32,
    /// Share of a group turning bad at once that holds all marks and raises an alert.
    pub mass_event: f64,
    /// Mark nothing, log what would have been marked.
    pub log_only: bool,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            grace: Duration::from_secs(300),
            silent_after: Duration::from_secs(120),
            check_failures: 3,
            pegged_for: Duration::from_secs(300),
            cpu_pegged: 95.0,
            mem_available_min: 5.0,
            disk_full: 95.0,
            max_lifetime: None,
            budget: 0.10,
            mark_rate_per_min: 10,
            mass_event: 0.5,
            log_only: false,
        }
    }
}
