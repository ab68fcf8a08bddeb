//! The collector's one clock, and its one way of writing times.
//!
//! Two readings, for two jobs: wall time (Unix ms) for what people and InfluxDB read
//! (`last_seen_ms`, a mark's `since`, point timestamps), and a monotonic reading for every
//! duration a decision rests on (silence, settling, pegged-for, the mark rate). An NTP step
//! moves the first and never the second, so a clock step on the collector marks no one.
//! Tests drive a [`ManualClock`].

use std::fmt::Debug;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

/// Where the collector reads the time.
pub trait Clock: Send + Sync + Debug {
    /// Unix ms (may jump when the system clock is stepped).
    fn wall_ms(&self) -> i64;
    /// Milliseconds on a clock that never jumps, counted from an arbitrary origin (the
    /// process start for [`SystemClock`]). Comparable only within one process; persisted
    /// values are translated on restore.
    fn mono_ms(&self) -> i64;
}

/// The real clock: `SystemTime` for wall, `Instant` since construction for monotonic.
#[derive(Debug)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    pub fn new() -> SystemClock {
        SystemClock {
            origin: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock::new()
    }
}

impl Clock for SystemClock {
    fn wall_ms(&self) -> i64 {
        wall_now_ms()
    }
    fn mono_ms(&self) -> i64 {
        self.origin.elapsed().as_millis().min(i64::MAX as u128) as i64
    }
}

/// Unix ms from the system clock (0 if it reads before 1970).
pub fn wall_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis().min(i64::MAX as u128) as i64)
        .unwrap_or(0)
}

/// A clock tests move by hand: [`ManualClock::advance`] moves both readings, and
/// [`ManualClock::step_wall`] only the wall one (an NTP step).
#[derive(Debug)]
pub struct ManualClock {
    wall: AtomicI64,
    mono: AtomicI64,
}

impl ManualClock {
    pub fn new(wall_ms: i64) -> ManualClock {
        ManualClock {
            wall: AtomicI64::new(wall_ms),
            mono: AtomicI64::new(0),
        }
    }
    pub fn advance(&self, ms: i64) {
        self.wall.fetch_add(ms, Ordering::Relaxed);
        self.mono.fetch_add(ms, Ordering::Relaxed);
    }
    pub fn step_wall(&self, ms: i64) {
        self.wall.fetch_add(ms, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn wall_ms(&self) -> i64 {
        self.wall.load(Ordering::Relaxed)
    }
    fn mono_ms(&self) -> i64 {
        self.mono.load(Ordering::Relaxed)
    }
}

/// Both readings at one moment; the rules take this instead of reading a clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Now {
    pub wall_ms: i64,
    pub mono_ms: i64,
}

impl Now {
    pub fn of(c: &dyn Clock) -> Now {
        Now {
            wall_ms: c.wall_ms(),
            mono_ms: c.mono_ms(),
        }
    }
}

/// 45s, 2m5s, 3h10m, 7d2h: enough precision for a person reading a mark.
pub fn human(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0 if ms > 0 => format!("{ms}ms"),
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

/// `2024-05-01T12:00:03Z` for a Unix ms time.
pub fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (y, m, d) = phoenix_wire::civil::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// RFC 3339 UTC with milliseconds (`2024-05-01T12:00:03.120Z`) for a Unix ms time: the `_at`
/// companion of every `_ms` time in the JSON API, for people and for tools that parse dates.
pub fn rfc3339(ms: i64) -> String {
    let base = utc(ms);
    // `utc` ends in "Z"; the milliseconds go before it.
    format!("{}.{:03}Z", &base[..base.len() - 1], ms.rem_euclid(1000))
}

/// [`rfc3339`] of an optional time (None stays None, so JSON says null).
pub fn rfc3339_opt(ms: Option<i64>) -> Option<String> {
    ms.map(rfc3339)
}

/// "12 s ago" for a Unix ms time seen at `now_ms`.
pub fn ago(now_ms: i64, t_ms: i64) -> String {
    let d = now_ms.saturating_sub(t_ms).max(0) / 1000;
    match d {
        d if d < 60 => format!("{d} s ago"),
        d if d < 3600 => format!("{} min ago", d / 60),
        d if d < 86400 => format!("{} h ago", d / 3600),
        d => format!("{} d ago", d / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        assert_eq!(human(500), "500ms");
        assert_eq!(human(45_000), "45s");
        assert_eq!(human(125_000), "2m5s");
        assert_eq!(human(3 * 3_600_000 + 600_000), "3h10m");
        assert_eq!(human(7 * 86_400_000 + 2 * 3_600_000), "7d2h");
        assert_eq!(human(-5), "0s");
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_700_000_000_123), "2023-11-14T22:13:20Z");
        assert_eq!(utc(4_107_542_399_000), "2100-02-28T23:59:59Z");
        assert_eq!(utc(-1000), "1969-12-31T23:59:59Z");
        // Hostile extremes give nonsense, never a panic.
        utc(i64::MAX);
        utc(i64::MIN);
        assert_eq!(
            ago(10_000, i64::MIN),
            format!("{} d ago", i64::MAX / 1000 / 86400)
        );
    }

    #[test]
    fn rfc3339_has_milliseconds() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_opt(None), None);
        // Hostile extremes give nonsense, never a panic.
        rfc3339(i64::MAX);
        rfc3339(i64::MIN);
    }

    #[test]
    fn a_wall_step_leaves_the_monotonic_reading_alone() {
        let c = ManualClock::new(1_000);
        c.advance(500);
        c.step_wall(600_000);
        assert_eq!((c.wall_ms(), c.mono_ms()), (601_500, 500));
    }
}
