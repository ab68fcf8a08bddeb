//! Numeric bounds a report must keep: the reporting interval, the boot time and every
//! timestamp. The collector does arithmetic on these (silence, settling, instance age), so a
//! hostile or broken agent must not be able to hand it `u64::MAX` or a time decades away.
//! Every refusal names the field, the offending value and the bound it broke.

use std::time::Duration;

use crate::{Limits, Report};

/// Shortest reporting interval a collector takes (`interval_ms`); 0 means "not sent" and
/// leaves the collector to assume its default.
pub const MIN_INTERVAL_MS: u64 = 100;
/// Longest reporting interval a collector takes: one day.
pub const MAX_INTERVAL_MS: u64 = 86_400_000;
/// Earliest `boot_time` taken (2000-01-01T00:00:00Z, Unix seconds); 0 means "unknown".
pub const MIN_BOOT_TIME: u64 = 946_684_800;
/// Longest duration a check may report (`duration_ms`): one day, like the interval.
pub const MAX_CHECK_MS: u64 = MAX_INTERVAL_MS;

/// The collector's clock in Unix nanoseconds (0 before 1970, saturating far in the future).
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Human form of a span of nanoseconds, for error messages: `12 s`, `3.5 h`, `56.9 years`.
fn span(ns: i128) -> String {
    let s = ns.unsigned_abs() as f64 / 1e9;
    if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7200.0 {
        format!("{:.0} min", s / 60.0)
    } else if s < 2.0 * 86400.0 {
        format!("{:.1} h", s / 3600.0)
    } else if s < 730.0 * 86400.0 {
        format!("{:.1} d", s / 86400.0)
    } else {
        format!("{:.1} years", s / (365.25 * 86400.0))
    }
}

fn dur_ns(d: Duration) -> i128 {
    d.as_nanos().min(i64::MAX as u128) as i128
}

/// The window timestamps must fall in, as (earliest, latest) Unix ns around `now_ns`.
pub fn window(now_ns: i64, l: &Limits) -> (i128, i128) {
    let now = now_ns as i128;
    (now - dur_ns(l.max_age), now + dur_ns(l.max_ahead))
}

/// Check one timestamp against the window; `what` names the field (`metrics[3].ts`).
fn check_ts(what: &dyn Fn() -> String, ts: i64, now_ns: i64, l: &Limits) -> Result<(), String> {
    let (lo, hi) = window(now_ns, l);
    let t = ts as i128;
    if t >= lo && t <= hi {
        return Ok(());
    }
    let (rel, bound) = if t < lo {
        ("before", format!("{} before", span(dur_ns(l.max_age))))
    } else {
        ("after", format!("{} after", span(dur_ns(l.max_ahead))))
    };
    Err(format!(
        "{} = {ts} (Unix ns) is {} {rel} the collector's clock ({now_ns}); timestamps may be at \
         most {bound} it: fix the agent's clock (NTP) or the collector's",
        what(),
        span(t - now_ns as i128),
    ))
}

/// Every numeric bound of a report, checked against the collector's `now_ns`.
pub fn check_numbers(r: &Report, now_ns: i64, l: &Limits) -> Result<(), String> {
    let iv = r.interval_ms;
    if iv != 0 && !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&iv) {
        return Err(format!(
            "interval_ms = {iv} is outside {MIN_INTERVAL_MS}..={MAX_INTERVAL_MS} \
             (100 ms to 1 day); set the agent's --interval inside it"
        ));
    }
    let bt = r.agent.boot_time;
    if bt != 0 {
        let latest = (now_ns as i128 + dur_ns(l.max_ahead)) / 1_000_000_000;
        if bt < MIN_BOOT_TIME || bt as i128 > latest {
            return Err(format!(
                "agent.boot_time = {bt} (Unix s) is outside {MIN_BOOT_TIME}..={latest} \
                 (2000-01-01 to {} after the collector's clock); send 0 when it is unknown",
                span(dur_ns(l.max_ahead))
            ));
        }
    }
    for (i, p) in r.metrics.iter().enumerate() {
        check_ts(&|| format!("metrics[{i}].ts"), p.ts, now_ns, l)?;
    }
    for (i, line) in r.logs.iter().enumerate() {
        check_ts(&|| format!("logs[{i}].ts"), line.ts, now_ns, l)?;
    }
    if let Some(d) = &r.drift {
        check_ts(&|| "drift.ts".to_string(), d.ts, now_ns, l)?;
    }
    for c in &r.checks {
        if c.duration_ms > MAX_CHECK_MS {
            return Err(format!(
                "check {}: duration_ms = {} is over {MAX_CHECK_MS} (1 day)",
                c.name, c.duration_ms
            ));
        }
    }
    if let Some(root) = &r.drift_root {
        if root.is_empty() || root.len() > 128 || !root.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(format!(
                "drift_root must be 1-128 chars of A-Z a-z 0-9 (a hex root hash); got {} bytes",
                root.len()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_like_people_write_them() {
        assert_eq!(span(12_000_000_000), "12 s");
        assert_eq!(span(-600_000_000_000), "10 min");
        assert_eq!(span(7 * 86_400_000_000_000), "7.0 d");
        assert_eq!(span(i64::MIN as i128 - 1), "292.3 years");
    }

    #[test]
    fn window_holds_at_the_extremes_of_i64() {
        let l = Limits::default();
        for now in [0, i64::MIN, i64::MAX] {
            let (lo, hi) = window(now, &l);
            assert!(lo < hi);
        }
    }
}
