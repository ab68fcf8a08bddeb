//! Replacement policy arithmetic: budgets per reason, voluntary versus involuntary reasons,
//! maintenance windows and the mass-event rule. Pure functions over plain numbers and a wall
//! time given by the caller, so every rule is tested on a fake clock; the queue
//! (`queue::evaluate`) calls them and decides what a verdict leads to.
//!
//! - **Budgets** (`--budget drift=10%,unhealthy=20%,expired=5%`; a plain `10%` is every
//!   reason alike). Each is a count (`2`) or a share (`10%`, rounded up, at least 1). In a
//!   group of `size`, a budget allows `amount(size) − in_disruption` new marks, where
//!   `in_disruption` counts the instances marked or acked (for any reason) and those not yet
//!   ready (in grace), as Karpenter's `roundup(total × pct) − deleting − notready`. Every
//!   budget that covers a reason applies, and the most restrictive wins. A reason no budget
//!   names falls under the default 10 %.
//! - **Voluntary** reasons (drift, age a.k.a. `expired`, `ssh`) wait for a maintenance window
//!   (`--window`, none set means always open), for a protect file to go, and respect every
//!   budget. **Involuntary** ones (check_failed, silent, pegged, disk_full: `unhealthy`)
//!   respect their budget and the mass-event hold, never a window or a protect file.
//! - **Mass events**: more than `--mass-event` of a group bad at once, and at least
//!   `--mass-event-min` instances.

use std::fmt;

use super::reason::Reason;

/// Whether a reason is routine (may wait) or the instance is already hurting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// Drift, expiry (`age`), ssh: the instance still serves; replacing it can wait for a
    /// window, a protect file and every budget.
    Voluntary,
    /// Failing checks, silence, pegged, a full disk: the instance is already lost capacity.
    Involuntary,
}

/// The class of `r`, by name, so a reason added elsewhere (`ssh`) is placed without an edit here.
pub fn class(r: Reason) -> Class {
    class_of_name(r.as_str())
}

/// The class of a reason named `name` (its `as_str`).
pub fn class_of_name(name: &str) -> Class {
    match name {
        "drift" | "age" | "expired" | "ssh" => Class::Voluntary,
        _ => Class::Involuntary,
    }
}

/// How many instances a budget allows: a count, or a share of the group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Amount {
    /// Exactly this many at once (0 stops that reason).
    Count(usize),
    /// This share of the group (0..=1), rounded up, at least one instance.
    Share(f64),
}

impl Amount {
    /// Instances allowed at once in a group of `size`.
    pub fn of(self, size: usize) -> usize {
        match self {
            Amount::Count(n) => n,
            // An epsilon so 10 % of 30 is 3, not 3.0000000004 rounded up to 4.
            Amount::Share(p) => ((size as f64 * p) - 1e-9).ceil().max(1.0) as usize,
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Count(n) => write!(f, "{n}"),
            Amount::Share(p) => write!(f, "{}%", (p * 100.0 * 1000.0).round() / 1000.0),
        }
    }
}

/// Which reasons one budget covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Every reason (a plain `10%`).
    All,
    /// `voluntary` or `unhealthy` (every involuntary reason).
    Class(Class),
    /// One reason by its name (`drift`, `silent`, ...); `expired` is stored as `age`.
    Reason(String),
}

impl Selector {
    pub fn covers(&self, reason_name: &str) -> bool {
        match self {
            Selector::All => true,
            Selector::Class(c) => class_of_name(reason_name) == *c,
            Selector::Reason(r) => r == reason_name,
        }
    }

    pub fn key(&self) -> String {
        match self {
            Selector::All => "all".into(),
            Selector::Class(Class::Voluntary) => "voluntary".into(),
            Selector::Class(Class::Involuntary) => "unhealthy".into(),
            Selector::Reason(r) if r == "age" => "expired".into(),
            Selector::Reason(r) => r.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    pub selector: Selector,
    pub amount: Amount,
}

/// Every budget in force; the most restrictive one covering a reason wins.
#[derive(Debug, Clone, PartialEq)]
pub struct Budgets {
    pub list: Vec<Budget>,
}

/// The budget for a reason none of the given budgets names.
pub const DEFAULT_SHARE: f64 = 0.10;

impl Default for Budgets {
    fn default() -> Self {
        Budgets::share(DEFAULT_SHARE)
    }
}

/// Reason names a budget may name, besides the classes and `all`.
const REASON_NAMES: [&str; 8] = [
    "drift",
    "expired",
    "age",
    "ssh",
    "check_failed",
    "silent",
    "pegged",
    "disk_full",
];

impl Budgets {
    /// One share for every reason (the old `--budget 10%`).
    pub fn share(p: f64) -> Budgets {
        Budgets {
            list: vec![Budget {
                selector: Selector::All,
                amount: Amount::Share(p),
            }],
        }
    }

    /// `--budget`: comma-separated `[REASON=]AMOUNT`, AMOUNT a share (`10%`) or a whole count
    /// (`2`). REASON is a reason (`drift`, `expired`, `ssh`, `check_failed`, `silent`,
    /// `pegged`, `disk_full`), `unhealthy` (every involuntary reason), `voluntary` or `all`.
    pub fn parse(s: &str) -> Result<Budgets, String> {
        let mut list = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (sel, amount) = match part.split_once('=') {
                None => (Selector::All, part),
                Some((k, v)) => {
                    let k = k.trim().to_ascii_lowercase();
                    let sel = match k.as_str() {
                        "all" | "*" => Selector::All,
                        "unhealthy" | "involuntary" => Selector::Class(Class::Involuntary),
                        "voluntary" => Selector::Class(Class::Voluntary),
                        "expired" | "age" => Selector::Reason("age".into()),
                        r if REASON_NAMES.contains(&r) => Selector::Reason(r.into()),
                        _ => return Err(format!(
                            "--budget {part:?}: unknown reason {k:?}; use drift, expired, ssh, check_failed, silent, pegged, disk_full, unhealthy, voluntary or all"
                        )),
                    };
                    (sel, v.trim())
                }
            };
            let amount = parse_amount(amount).map_err(|e| format!("--budget {part:?}: {e}"))?;
            if list.iter().any(|b: &Budget| b.selector == sel) {
                return Err(format!("--budget {s:?}: {} is given twice", sel.key()));
            }
            list.push(Budget {
                selector: sel,
                amount,
            });
        }
        if list.is_empty() {
            return Err("--budget is empty: write e.g. 10% or drift=10%,unhealthy=20%".into());
        }
        Ok(Budgets { list })
    }

    /// The budgets covering `reason_name`: the given ones, else the default share.
    fn covering<'a>(&'a self, reason_name: &'a str) -> impl Iterator<Item = Amount> + 'a {
        let any = self.list.iter().any(|b| b.selector.covers(reason_name));
        self.list
            .iter()
            .filter(move |b| b.selector.covers(reason_name))
            .map(|b| b.amount)
            .chain((!any).then_some(Amount::Share(DEFAULT_SHARE)))
    }

    /// Instances that may be in disruption at once for `reason_name` in a group of `size`:
    /// the most restrictive covering budget.
    pub fn allowed(&self, reason_name: &str, size: usize) -> usize {
        self.covering(reason_name)
            .map(|a| a.of(size))
            .min()
            .unwrap_or(1)
    }

    /// New marks for `reason_name` still allowed: `allowed − in_disruption`, never negative.
    pub fn free(&self, reason_name: &str, size: usize, in_disruption: usize) -> usize {
        self.allowed(reason_name, size)
            .saturating_sub(in_disruption)
    }

    /// The single share when every reason has the same one (the page's headline), else None.
    pub fn uniform_share(&self) -> Option<f64> {
        match self.list.as_slice() {
            [Budget {
                selector: Selector::All,
                amount: Amount::Share(p),
            }] => Some(*p),
            _ => None,
        }
    }

    /// Each budget's key and what it allows in a group of `size` (for views).
    pub fn limits(&self, size: usize) -> Vec<(String, usize)> {
        self.list
            .iter()
            .map(|b| (b.selector.key(), b.amount.of(size)))
            .collect()
    }
}

impl fmt::Display for Budgets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .list
            .iter()
            .map(|b| match b.selector {
                Selector::All => b.amount.to_string(),
                _ => format!("{}={}", b.selector.key(), b.amount),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// `10%` (a share) or `3` (a count). `2.5` is refused: it reads as 2.5 % as easily as as
/// instances, and a wrong guess marks too many servers.
pub fn parse_amount(s: &str) -> Result<Amount, String> {
    let t = s.trim();
    if let Some(num) = t.strip_suffix('%') {
        let p: f64 = num
            .trim()
            .parse()
            .map_err(|_| format!("{t:?} is not a share such as 10%"))?;
        if !(0.0..=100.0).contains(&p) {
            return Err(format!("{p}% is not between 0% and 100%"));
        }
        return Ok(Amount::Share(p / 100.0));
    }
    match t.parse::<usize>() {
        Ok(n) => Ok(Amount::Count(n)),
        Err(_) => Err(match t.parse::<f64>() {
            Ok(n) => format!("{n} is neither a whole count of instances nor a share: write {n}% for a share of each group, or a whole number of instances"),
            Err(_) => format!("{t:?}: write a share such as 10% or a count such as 2"),
        }),
    }
}

/// Whether `bad` of `size` instances is a mass event: more than `share` of the group and at
/// least `min` instances (so one bad box of three is replaced, not held).
pub fn is_mass(bad: usize, size: usize, share: f64, min: usize) -> bool {
    size > 0 && bad >= min.max(1) && bad as f64 > share * size as f64
}

/// A maintenance window: days of the week, a start and end time, a time zone from the
/// system's tzdb. An end at or before the start runs across midnight into the next day
/// (`Fri 22:00-02:00` is Friday night to Saturday 02:00); the days name the start's day.
#[derive(Debug, Clone)]
pub struct Window {
    /// Monday first.
    days: [bool; 7],
    /// Minutes after local midnight, start inclusive, end exclusive (1440 = 24:00).
    start: u16,
    end: u16,
    tz: jiff::tz::TimeZone,
    text: String,
}

impl PartialEq for Window {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn day(s: &str) -> Result<usize, String> {
    let l = s.trim().to_ascii_lowercase();
    const FULL: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    (0..7)
        .find(|&k| l == DAYS[k] || l == FULL[k])
        .ok_or_else(|| format!("{s:?} is not a day (Mon, Tue, ... Sun)"))
}

fn clock_time(s: &str) -> Result<u16, String> {
    let err = || format!("{s:?} is not a time such as 09:00");
    let (h, m) = s.split_once(':').ok_or_else(err)?;
    let h: u16 = h.parse().map_err(|_| err())?;
    let m: u16 = m.parse().map_err(|_| err())?;
    if m > 59 || h > 24 || (h == 24 && m != 0) {
        return Err(err());
    }
    Ok(h * 60 + m)
}

impl Window {
    /// `DAYS HH:MM-HH:MM [ZONE]`: DAYS is `Mon-Fri`, `Sat,Sun`, `Mon,Wed-Fri`, `daily` or `*`;
    /// ZONE an IANA name from /usr/share/zoneinfo (`Europe/Berlin`) or `UTC` (the default).
    pub fn parse(s: &str) -> Result<Window, String> {
        let e = |m: String| format!("--window {s:?}: {m}");
        let mut parts = s.split_whitespace();
        let (Some(days_text), Some(times)) = (parts.next(), parts.next()) else {
            return Err(e(
                "write DAYS HH:MM-HH:MM [ZONE], e.g. 'Mon-Fri 09:00-17:00 Europe/Berlin'".into(),
            ));
        };
        let zone = parts.next().unwrap_or("UTC");
        if parts.next().is_some() {
            return Err(e("too many words: write DAYS HH:MM-HH:MM [ZONE]".into()));
        }
        let mut days = [false; 7];
        if matches!(days_text.to_ascii_lowercase().as_str(), "daily" | "*") {
            days = [true; 7];
        } else {
            for item in days_text.split(',') {
                match item.split_once('-') {
                    None => days[day(item).map_err(e)?] = true,
                    Some((a, b)) => {
                        let (a, b) = (day(a).map_err(e)?, day(b).map_err(e)?);
                        // Fri-Mon wraps over the weekend.
                        let mut d = a;
                        loop {
                            days[d] = true;
                            if d == b {
                                break;
                            }
                            d = (d + 1) % 7;
                        }
                    }
                }
            }
        }
        let (a, b) = times
            .split_once('-')
            .ok_or_else(|| e(format!("{times:?} is not a span such as 09:00-17:00")))?;
        let (start, end) = (clock_time(a).map_err(e)?, clock_time(b).map_err(e)?);
        if start >= 1440 {
            return Err(e("a window cannot start at 24:00".into()));
        }
        let tz = jiff::tz::TimeZone::get(zone).map_err(|x| {
            e(format!(
                "time zone {zone:?} is not in the system tzdb (/usr/share/zoneinfo; install tzdata): {x}"
            ))
        })?;
        Ok(Window {
            days,
            start,
            end,
            tz,
            text: s.split_whitespace().collect::<Vec<_>>().join(" "),
        })
    }

    /// Whether the window is open at Unix ms `wall_ms`.
    pub fn is_open(&self, wall_ms: i64) -> bool {
        let Ok(ts) = jiff::Timestamp::from_millisecond(wall_ms) else {
            return false;
        };
        let local = self.tz.to_datetime(ts);
        let wd = local.weekday().to_monday_zero_offset() as usize;
        let minute = local.hour() as u16 * 60 + local.minute() as u16;
        let prev = (wd + 6) % 7;
        if self.start < self.end {
            self.days[wd] && minute >= self.start && minute < self.end
        } else {
            // Across midnight (or a whole day from the start when start == end).
            (self.days[wd] && minute >= self.start) || (self.days[prev] && minute < self.end)
        }
    }
}

/// Every `--window`; none means always open.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Windows {
    pub list: Vec<Window>,
}

/// How far ahead [`Windows::next_open`] looks: a week and a day covers every weekly window.
const LOOKAHEAD_MS: i64 = 8 * 86_400_000;

impl Windows {
    pub fn parse_all<S: AsRef<str>>(items: &[S]) -> Result<Windows, String> {
        let list = items
            .iter()
            .map(|s| Window::parse(s.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Windows { list })
    }

    pub fn is_open(&self, wall_ms: i64) -> bool {
        self.list.is_empty() || self.list.iter().any(|w| w.is_open(wall_ms))
    }

    /// The next whole minute at which a window opens (None: open now, or none within 8 days).
    pub fn next_open(&self, wall_ms: i64) -> Option<i64> {
        if self.is_open(wall_ms) {
            return None;
        }
        let mut t = wall_ms
            .div_euclid(60_000)
            .saturating_add(1)
            .saturating_mul(60_000);
        let end = wall_ms.saturating_add(LOOKAHEAD_MS);
        while t <= end {
            if self.is_open(t) {
                return Some(t);
            }
            t = t.saturating_add(60_000);
        }
        None
    }

    pub fn texts(&self) -> Vec<String> {
        self.list.iter().map(|w| w.to_string()).collect()
    }
}

/// Why a voluntary mark waits for a window, for the hold's text.
pub fn window_hold(w: &Windows, wall_ms: i64) -> Option<String> {
    if w.is_open(wall_ms) {
        return None;
    }
    let when = match w.next_open(wall_ms) {
        Some(t) => format!(
            "; opens in {}",
            super::clock::human(t.saturating_sub(wall_ms))
        ),
        None => String::new(),
    };
    Some(format!(
        "window: outside every maintenance window ({}){when}",
        w.texts().join("; ")
    ))
}

/// An instance that never reported past its grace period and has since been silent for more
/// than three intervals (no mark standing): a box that died booting, or an id a token holder
/// made up and abandoned. It counts in no group's size, bad count or not-ready share and is
/// not marked for its silence (there may be no box to replace); the identity gate's sweep
/// forgets it. One that reported past grace is a member, healthy or not: a rollout whose new
/// boxes never get healthy must still raise a mass event.
pub fn died_young(
    f: &super::health::Facts,
    silent_for_ms: i64,
    rules: &super::health::Rules,
    marked: bool,
) -> bool {
    let grace = super::health::ms(rules.grace);
    let lived = f.last_seen_mono.saturating_sub(f.first_seen_mono);
    let late = f.late_ms.max(0);
    let suspect = super::health::interval_of(f.interval_ms)
        .saturating_mul(3)
        .saturating_add(late);
    let silent = super::health::ms(rules.silent_after).saturating_add(late);
    !marked && lived < grace && (silent_for_ms > suspect || silent_for_ms >= silent)
}

/// What a group has in disruption: marked or acked for any reason, and not ready (in grace).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Disruption {
    pub marked: usize,
    pub acked: usize,
    pub not_ready: usize,
}

impl Disruption {
    pub fn total(&self) -> usize {
        self.marked
            .saturating_add(self.acked)
            .saturating_add(self.not_ready)
    }
}

/// The gates one problem of one instance must pass, in order; the first that holds it names
/// the hold. `protected`: the instance's protect file is present.
#[derive(Debug, Clone, Copy)]
pub struct Gate<'a> {
    pub budgets: &'a Budgets,
    /// [`window_hold`] at this pass's time (once a pass: finding the next opening is a walk).
    pub window: Option<&'a str>,
    pub group: &'a str,
    pub size: usize,
    pub disruption: Disruption,
    pub protected: bool,
}

/// None: `reason_name` may be marked now; Some(why) otherwise.
pub fn hold_for(g: &Gate, reason_name: &str) -> Option<String> {
    let voluntary = class_of_name(reason_name) == Class::Voluntary;
    if voluntary && g.protected {
        return Some(format!(
            "protected: the instance's protect file is present (voluntary {reason_name} waits until it is removed)"
        ));
    }
    if voluntary {
        if let Some(h) = g.window {
            return Some(h.to_string());
        }
    }
    let allowed = g.budgets.allowed(reason_name, g.size);
    let used = g.disruption.total();
    if used >= allowed {
        let d = g.disruption;
        return Some(format!(
            "budget: {used} of at most {allowed} in group {} in disruption for {reason_name} ({} marked, {} acked, {} not ready)",
            g.group, d.marked, d.acked, d.not_ready
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::clock::{Clock, ManualClock};

    /// Unix ms of a UTC civil time.
    fn utc(y: i16, mo: i8, d: i8, h: i8, mi: i8) -> i64 {
        jiff::civil::date(y, mo, d)
            .at(h, mi, 0, 0)
            .to_zoned(jiff::tz::TimeZone::UTC)
            .unwrap()
            .timestamp()
            .as_millisecond()
    }

    #[test]
    fn shares_round_up_and_give_at_least_one() {
        let s = |p| Amount::Share(p);
        assert_eq!(s(0.10).of(3), 1);
        assert_eq!(s(0.10).of(10), 1);
        assert_eq!(s(0.10).of(11), 2, "rounded up");
        assert_eq!(s(0.10).of(19), 2);
        assert_eq!(s(0.10).of(20), 2);
        assert_eq!(s(0.10).of(30), 3, "no float loss either way");
        assert_eq!(s(0.10).of(500), 50);
        assert_eq!(s(0.05).of(500), 25);
        assert_eq!(s(0.0).of(10), 1, "at least one, always");
        assert_eq!(s(0.10).of(0), 1);
        assert_eq!(Amount::Count(2).of(3), 2);
        assert_eq!(Amount::Count(0).of(500), 0, "a count of 0 stops the reason");
    }

    #[test]
    fn budgets_parse_per_reason_counts_and_shares() {
        let b = Budgets::parse("drift=10%,unhealthy=20%,expired=5%").unwrap();
        assert_eq!(b.to_string(), "drift=10%,unhealthy=20%,expired=5%");
        assert_eq!(b.allowed("drift", 20), 2);
        assert_eq!(b.allowed("silent", 20), 4, "unhealthy covers silent");
        assert_eq!(b.allowed("check_failed", 20), 4);
        assert_eq!(b.allowed("age", 20), 1, "expired is the age reason");
        assert_eq!(b.allowed("ssh", 20), 2, "no budget named: the default 10%");
        let plain = Budgets::parse("10%").unwrap();
        assert_eq!(plain, Budgets::share(0.10));
        assert_eq!(plain.uniform_share(), Some(0.10));
        for r in ["drift", "silent", "age", "ssh"] {
            assert_eq!(plain.allowed(r, 20), 2, "{r}: all reasons alike");
        }
        let counts = Budgets::parse("2, drift=1").unwrap();
        assert_eq!(counts.allowed("drift", 500), 1, "the most restrictive wins");
        assert_eq!(counts.allowed("silent", 500), 2);
        let both = Budgets::parse("voluntary=5%,drift=50%").unwrap();
        assert_eq!(
            both.allowed("drift", 100),
            5,
            "voluntary is tighter than drift"
        );
        assert_eq!(both.allowed("silent", 100), 10, "default for the rest");
        // Refusals name the fix.
        let e = Budgets::parse("2.5").unwrap_err();
        assert!(e.contains("2.5%"), "{e}");
        assert!(Budgets::parse("drift=120%").unwrap_err().contains("100%"));
        assert!(Budgets::parse("dirft=10%")
            .unwrap_err()
            .contains("unknown reason"));
        assert!(Budgets::parse("drift=1,drift=2")
            .unwrap_err()
            .contains("twice"));
        assert!(Budgets::parse(" , ").unwrap_err().contains("empty"));
        assert!(Budgets::parse("lots").unwrap_err().contains("10%"));
    }

    #[test]
    fn not_ready_and_marked_count_against_the_budget() {
        let budgets = Budgets::parse("drift=10%,unhealthy=50%").unwrap();
        let gate = |marked, acked, not_ready| Gate {
            budgets: &budgets,
            window: None,
            group: "web",
            size: 10,
            disruption: Disruption {
                marked,
                acked,
                not_ready,
            },
            protected: false,
        };
        assert_eq!(hold_for(&gate(0, 0, 0), "drift"), None);
        let h = hold_for(&gate(0, 0, 1), "drift").unwrap();
        assert_eq!(
            h,
            "budget: 1 of at most 1 in group web in disruption for drift (0 marked, 0 acked, 1 not ready)"
        );
        assert!(hold_for(&gate(0, 1, 0), "drift").is_some(), "acked counts");
        // The drift budget is spent, the unhealthy one is not: a dead box is still replaced.
        assert_eq!(hold_for(&gate(1, 0, 0), "silent"), None);
        assert_eq!(hold_for(&gate(2, 1, 1), "silent"), None);
        assert!(hold_for(&gate(3, 1, 1), "silent").is_some(), "5 of 5");
        assert_eq!(budgets.free("silent", 10, 3), 2);
        assert_eq!(budgets.free("silent", 10, 9), 0, "never negative");
    }

    #[test]
    fn protect_holds_voluntary_reasons_only() {
        let budgets = Budgets::default();
        let mut g = Gate {
            budgets: &budgets,
            window: None,
            group: "web",
            size: 10,
            disruption: Disruption::default(),
            protected: true,
        };
        for r in ["drift", "age", "ssh"] {
            assert!(hold_for(&g, r).unwrap().starts_with("protected"), "{r}");
        }
        for r in ["silent", "check_failed", "pegged", "disk_full"] {
            assert_eq!(hold_for(&g, r), None, "{r} is involuntary");
        }
        // A closed window holds voluntary reasons only, too.
        g.protected = false;
        g.window = Some("window: closed");
        assert_eq!(hold_for(&g, "drift").as_deref(), Some("window: closed"));
        assert_eq!(hold_for(&g, "silent"), None);
        assert_eq!(class_of_name("ssh"), Class::Voluntary);
    }

    #[test]
    fn windows_across_midnight_and_time_zones_on_a_fake_clock() {
        // Mon 2026-11-30 is a Monday; Berlin is UTC+1 in winter.
        let clock = ManualClock::new(utc(2026, 11, 30, 7, 59));
        let w = Windows::parse_all(&["Mon-Fri 09:00-17:00 Europe/Berlin"]).unwrap();
        assert!(!w.is_open(clock.wall_ms()), "08:59 in Berlin");
        assert_eq!(
            window_hold(&w, clock.wall_ms()).unwrap(),
            "window: outside every maintenance window (Mon-Fri 09:00-17:00 Europe/Berlin); opens in 1m0s"
        );
        clock.advance(60_000);
        assert!(w.is_open(clock.wall_ms()), "09:00 in Berlin is 08:00 UTC");
        assert_eq!(w.next_open(clock.wall_ms()), None);
        assert!(w.is_open(utc(2026, 11, 30, 15, 59)));
        assert!(!w.is_open(utc(2026, 11, 30, 16, 0)), "17:00 Berlin: closed");
        assert!(!w.is_open(utc(2026, 12, 5, 10, 0)), "Saturday");
        // Summer time: 09:00 Berlin is 07:00 UTC.
        assert!(w.is_open(utc(2026, 7, 1, 7, 0)));
        assert!(!w.is_open(utc(2026, 7, 1, 15, 0)));
        // Friday night to Saturday morning in New York.
        let n = Windows::parse_all(&["Fri 22:00-02:00 America/New_York"]).unwrap();
        // Fri 2026-12-04 22:30 EST = Sat 03:30 UTC.
        assert!(n.is_open(utc(2026, 12, 5, 3, 30)));
        assert!(n.is_open(utc(2026, 12, 5, 6, 59)), "Sat 01:59 local");
        assert!(
            !n.is_open(utc(2026, 12, 5, 7, 0)),
            "Sat 02:00 local: closed"
        );
        assert!(
            !n.is_open(utc(2026, 12, 4, 6, 30)),
            "Fri 01:30 local: Thursday was not named"
        );
        assert!(!n.is_open(utc(2026, 12, 4, 2, 59)), "Thu 21:59 local");
        // The next opening, a week ahead at most.
        let next = n.next_open(utc(2026, 12, 5, 7, 0)).unwrap();
        assert_eq!(next, utc(2026, 12, 12, 3, 0), "next Friday 22:00 EST");
        // Several windows: open when any is. None: always open.
        let two = Windows::parse_all(&["Sat,Sun 00:00-24:00", "Mon-Fri 02:00-04:00 UTC"]).unwrap();
        assert!(two.is_open(utc(2026, 12, 5, 12, 0)));
        assert!(two.is_open(utc(2026, 12, 1, 3, 0)));
        assert!(!two.is_open(utc(2026, 12, 1, 4, 0)));
        assert!(Windows::default().is_open(0));
        // Wrapping day ranges and daily.
        let wk = Windows::parse_all(&["Fri-Mon 10:00-11:00"]).unwrap();
        assert!(wk.is_open(utc(2026, 11, 30, 10, 30)), "Monday");
        assert!(!wk.is_open(utc(2026, 12, 1, 10, 30)), "Tuesday");
        assert!(Windows::parse_all(&["daily 23:00-01:00 UTC"])
            .unwrap()
            .is_open(utc(2026, 12, 1, 0, 30)));
    }

    #[test]
    fn bad_windows_say_what_is_wrong() {
        let e = |s: &str| Window::parse(s).unwrap_err();
        assert!(e("Mon-Fri").contains("DAYS HH:MM-HH:MM"));
        assert!(e("Mon-Fry 09:00-17:00").contains("not a day"));
        assert!(e("Mon 9-17").contains("not a time"));
        assert!(e("Mon 09:00-25:00").contains("not a time"));
        assert!(e("Mon 09:00-17:00 Mars/Olympus").contains("tzdb"));
        assert!(e("Mon 09:00-17:00 UTC extra").contains("too many"));
        assert!(e("Mon 24:00-01:00").contains("24:00"));
    }

    #[test]
    fn the_mass_event_floor_lets_small_groups_repair() {
        // A group of 3 with one bad box: never a mass event, whatever the share.
        assert!(!is_mass(1, 3, 0.2, 3));
        assert!(
            !is_mass(2, 3, 0.2, 3),
            "two of three is below the floor of 3"
        );
        assert!(is_mass(3, 3, 0.5, 3));
        assert!(
            !is_mass(5, 10, 0.5, 3),
            "exactly half is not more than half"
        );
        assert!(is_mass(6, 10, 0.5, 3));
        assert!(!is_mass(250, 500, 0.5, 3));
        assert!(is_mass(251, 500, 0.5, 3));
        assert!(!is_mass(10, 10, 1.0, 3), "100% never holds");
        assert!(is_mass(1, 1, 0.5, 0), "a floor of 0 counts as 1");
        assert!(!is_mass(3, 0, 0.5, 3));
    }
}
