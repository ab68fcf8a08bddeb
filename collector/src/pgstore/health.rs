//! Whether PostgreSQL is there: every store operation reports its outcome here, and the
//! decider, `/healthz` and the page read it. While it is down the collector keeps taking
//! reports and writing points, and decides nothing.

use std::sync::Mutex;

use serde::Serialize;

/// What `/healthz` and the page show about the fleet store.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StoreStatus {
    pub up: bool,
    /// Unix ms of the last change between up and down (0 before the first contact).
    pub since_ms: i64,
    /// Why it is down: the last error, with what to do about it.
    pub reason: Option<String>,
    /// Unix ms when it last came back after being down; the decider counts silence from
    /// no earlier than this, so nobody is marked for the gap.
    pub back_ms: i64,
}

#[derive(Debug, Default)]
pub struct StoreHealth {
    s: Mutex<StoreStatus>,
}

impl StoreHealth {
    pub fn ok(&self, now_ms: i64) {
        let mut s = self.s.lock().unwrap();
        if !s.up {
            if s.since_ms != 0 {
                tracing::info!("PostgreSQL fleet store is back; deciding resumes after catch-up");
                s.back_ms = now_ms;
            }
            s.up = true;
            s.since_ms = now_ms;
            s.reason = None;
        }
    }

    pub fn failed(&self, err: &super::PgError, now_ms: i64) {
        if !err.is_outage() {
            return;
        }
        let mut s = self.s.lock().unwrap();
        if s.up || s.since_ms == 0 {
            tracing::warn!(error = %err, "PostgreSQL fleet store unavailable: taking reports, writing points, marking nobody");
            s.up = false;
            s.since_ms = now_ms;
        }
        s.reason = Some(format!(
            "fleet store unavailable: {err}; reports are still taken and points written, \
             no instance is marked until it is back"
        ));
    }

    pub fn status(&self) -> StoreStatus {
        self.s.lock().unwrap().clone()
    }

    pub fn is_up(&self) -> bool {
        self.s.lock().unwrap().up
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgstore::PgError;

    #[test]
    fn down_then_back_sets_back_time_and_reason() {
        let h = StoreHealth::default();
        assert!(!h.is_up());
        h.ok(1_000);
        assert_eq!(h.status().back_ms, 0, "first contact is not a comeback");
        h.failed(&PgError::Timeout(crate::pgstore::OP_TIMEOUT), 2_000);
        let s = h.status();
        assert!(!s.up);
        assert_eq!(s.since_ms, 2_000);
        assert!(s.reason.unwrap().contains("no instance is marked"));
        // A refused decision is not an outage.
        h.ok(3_000);
        h.failed(&PgError::Fenced(3), 3_500);
        let s = h.status();
        assert!(s.up);
        assert_eq!(s.back_ms, 3_000);
        assert_eq!(s.since_ms, 3_000);
    }
}
