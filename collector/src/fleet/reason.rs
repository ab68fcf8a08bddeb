//! Why an instance is bad: the one list of reasons that the rules (health), the budgets
//! (policy) and the queue share. Its own file so that policy names reasons without importing
//! the rules that produce them.

use serde::{Deserialize, Serialize};

/// Why an instance is bad, worst first: budgeted marks go in this order. Drift (tampering),
/// SSH left on (a way in that the image says is closed) and failing checks (the service is
/// down) are certain harm; silence, pegged resources and a full disk are symptoms with other
/// possible causes; age is routine recycling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Drift,
    Ssh,
    CheckFailed,
    Silent,
    Pegged,
    DiskFull,
    Age,
}

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::Drift,
        Reason::Ssh,
        Reason::CheckFailed,
        Reason::Silent,
        Reason::Pegged,
        Reason::DiskFull,
        Reason::Age,
    ];

    /// Position in [`Reason::ALL`] (an exhaustive match: a new reason fails to compile here).
    pub fn index(self) -> usize {
        match self {
            Reason::Drift => 0,
            Reason::Ssh => 1,
            Reason::CheckFailed => 2,
            Reason::Silent => 3,
            Reason::Pegged => 4,
            Reason::DiskFull => 5,
            Reason::Age => 6,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Drift => "drift",
            Reason::Ssh => "ssh",
            Reason::CheckFailed => "check_failed",
            Reason::Silent => "silent",
            Reason::Pegged => "pegged",
            Reason::DiskFull => "disk_full",
            Reason::Age => "age",
        }
    }
}
