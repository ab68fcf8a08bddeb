//! Health rules: when an instance counts as unhealthy, and why.
//!
//! Pure functions over what the fleet state holds and a [`Now`] passed in by the caller, so
//! every rule can be tested with a fake clock. Every duration is measured on the monotonic
//! reading; only the age rule compares wall times (a boot time is a wall time). All arithmetic
//! saturates: report content (intervals, boot times) can be anything a sender likes. The
//! queue decides what a verdict leads to (a mark, a hold, an alert).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::clock::{human, Now};

/// Every rule is configurable; the command line's defaults are the same as these.
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
    /// What may be in disruption at once per group, per reason (see [`super::policy`]).
    pub budget: super::policy::Budgets,
    /// Maintenance windows for voluntary marks (none: always open).
    pub windows: super::policy::Windows,
    /// New marks per minute across the fleet.
    pub mark_rate_per_min: u32,
    /// Share of a group turning bad at once that holds all marks and raises an alert.
    pub mass_event: f64,
    /// Fewest bad instances that make a mass event: in a group of two, one bad instance is
    /// half the group but no sign of a bad baseline.
    pub mass_min: usize,
    /// Mark nothing, log what would have been marked.
    pub log_only: bool,
    /// A problem must last this many of the instance's report intervals before it can be
    /// marked, so every instance of the group has reported since: a group drifting together
    /// arrives as a trickle of reports, and a mass event must be seen before the first mark.
    pub settle_intervals: u32,
    /// Instances gone this long are dropped from the fleet state.
    pub forget_after: Duration,
    /// SSH on an instance (a listener on TCP 22, a running sshd or dropbear) is no finding:
    /// for fleets that still use SSH.
    pub ssh_allowed: bool,
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
            budget: Default::default(),
            windows: Default::default(),
            mark_rate_per_min: 10,
            mass_event: 0.5,
            mass_min: 3,
            log_only: false,
            settle_intervals: 2,
            forget_after: Duration::from_secs(3600),
            ssh_allowed: false,
        }
    }
}

pub use super::reason::Reason;

/// One rule that fired, with what a person needs to believe it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    pub reason: Reason,
    pub evidence: String,
}

/// An instance's drift as the collector judged it.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct DriftInfo {
    pub hash: String,
    pub expected: Option<String>,
    /// Where `expected` came from: registered baseline, agent baseline or majority.
    pub source: Option<String>,
    pub drifted: bool,
    pub changes: Vec<phoenix_wire::FileChange>,
    pub note: Option<String>,
    /// Unix ns of the scan or event the agent reported.
    pub ts: i64,
    /// Unix ms when the collector first saw the current drifted state (None when clean).
    pub since_ms: Option<i64>,
}

/// Per-instance inputs the rules need beyond the latest figures, kept up to date as reports
/// come in ([`Tracking::observe`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tracking {
    /// Check name → (consecutive failed reports, the latest failure's detail).
    pub check_streaks: BTreeMap<String, (u32, String)>,
    /// Monotonic ms since when CPU or memory has been pegged, and which.
    #[serde(rename = "pegged_since_mono")]
    pub pegged_since: Option<i64>,
    pub pegged_what: String,
    /// The fullest filesystem in the latest report: (path, used %).
    pub disk_worst: Option<(String, f64)>,
    /// The agent's latest SSH evidence (`phoenix_ssh`) when it found SSH on: what listens on
    /// TCP 22 and which sshd/dropbear runs. None: off, or never reported.
    #[serde(default)]
    pub ssh: Option<String>,
}

/// What one report said, as far as the rules care.
#[derive(Debug, Clone, Default)]
pub struct Observed<'a> {
    pub checks: &'a [phoenix_wire::CheckResult],
    pub cpu_used_percent: Option<f64>,
    pub mem_available_percent: Option<f64>,
    pub disk_worst: Option<(String, f64)>,
    /// `phoenix_ssh` in this report: Some(Some(evidence)) SSH found, Some(None) not found,
    /// None: the report had no such point (it says nothing).
    pub ssh: Option<Option<String>>,
}

impl Tracking {
    /// Fold one report in; `now_mono` is when it arrived.
    pub fn observe(&mut self, o: &Observed, rules: &Rules, now_mono: i64) {
        // Reports without check results (log or drift batches) say nothing about checks.
        if !o.checks.is_empty() {
            let mut next = BTreeMap::new();
            for c in o.checks {
                if !c.ok {
                    let n = self.check_streaks.get(&c.name).map_or(0, |s| s.0);
                    next.insert(c.name.clone(), (n.saturating_add(1), c.detail.clone()));
                }
            }
            self.check_streaks = next;
        }
        if o.cpu_used_percent.is_some() || o.mem_available_percent.is_some() {
            let cpu = o.cpu_used_percent.filter(|c| *c > rules.cpu_pegged);
            let mem = o
                .mem_available_percent
                .filter(|m| *m < rules.mem_available_min);
            let what = match (cpu, mem) {
                (Some(c), Some(m)) => Some(format!("CPU {c:.1}% and available memory {m:.1}%")),
                (Some(c), None) => Some(format!("CPU {c:.1}%")),
                (None, Some(m)) => Some(format!("available memory {m:.1}%")),
                (None, None) => None,
            };
            match what {
                Some(w) => {
                    self.pegged_since.get_or_insert(now_mono);
                    self.pegged_what = w;
                }
                None => {
                    self.pegged_since = None;
                    self.pegged_what.clear();
                }
            }
        }
        if o.disk_worst.is_some() {
            self.disk_worst = o.disk_worst.clone();
        }
        if let Some(ssh) = &o.ssh {
            self.ssh = ssh.clone();
        }
    }
}

/// What the rules see of one instance. `_mono` fields are monotonic ms ([`Now::mono_ms`]).
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub first_seen_mono: i64,
    pub last_seen_mono: i64,
    /// Unix ms of the first report (the age rule's fallback when no boot time was sent).
    pub first_seen_ms: i64,
    pub interval_ms: u64,
    /// Unix seconds the instance booted (0: unknown; first_seen counts then).
    pub boot_time: u64,
    pub tracking: &'a Tracking,
    pub drift: Option<&'a DriftInfo>,
    /// Silence counts from here at the earliest: this collector's start, or the end of the
    /// latest outage of the metrics store (agents then wait out their backoff, which is no
    /// sign of death).
    pub watch_since_mono: i64,
    /// How far behind the collector itself is (reports waiting to be admitted or written):
    /// added to every silence threshold, so its own lateness is never the instance's silence.
    pub late_ms: i64,
}

/// The rules' judgement on one instance at `now_ms`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Verdict {
    /// Every rule that fired, worst first.
    pub problems: Vec<Problem>,
    /// Within the grace period after its first report.
    pub in_grace: bool,
    /// Three intervals without a report, not yet `silent_after`.
    pub suspect: bool,
}

impl Verdict {
    pub fn worst(&self) -> Option<&Problem> {
        self.problems.first()
    }
}

/// Default when an agent sent no interval: the agent's own default.
const DEFAULT_INTERVAL_MS: u64 = 10_000;

/// The interval the rules assume: the agent's, or its default when it sent none.
pub fn interval_of(interval_ms: u64) -> i64 {
    if interval_ms == 0 {
        DEFAULT_INTERVAL_MS as i64
    } else {
        interval_ms.min(i64::MAX as u64) as i64
    }
}

/// How long `f` has been silent, measured from when this collector could first have heard it.
pub fn silent_for_ms(f: &Facts, now: Now) -> i64 {
    now.mono_ms
        .saturating_sub(f.last_seen_mono.max(f.watch_since_mono))
        .max(0)
}

pub fn judge(f: &Facts, rules: &Rules, now: Now) -> Verdict {
    let mut v = Verdict {
        in_grace: now.mono_ms.saturating_sub(f.first_seen_mono) < ms(rules.grace),
        ..Default::default()
    };
    if let Some(d) = f.drift.filter(|d| d.drifted) {
        v.problems.push(Problem {
            reason: Reason::Drift,
            evidence: drift_evidence(d),
        });
    }
    // Like drift, SSH is no symptom but a state someone chose (an image that ships sshd, a
    // listener someone opened): it counts from the first report, grace or not.
    if let Some(e) = f.tracking.ssh.as_ref().filter(|_| !rules.ssh_allowed) {
        v.problems.push(Problem {
            reason: Reason::Ssh,
            evidence: format!("SSH is on: {e}"),
        });
    }
    let interval = interval_of(f.interval_ms);
    let silent = silent_for_ms(f, now);
    let late = f.late_ms.max(0);
    if v.in_grace {
        // A booting instance is slow, busy and maybe not yet serving: only tampering counts.
        v.problems.sort_by_key(|p| p.reason);
        return v;
    }
    for (name, (n, detail)) in &f.tracking.check_streaks {
        if *n >= rules.check_failures {
            let detail = if detail.is_empty() {
                String::new()
            } else {
                format!(": {detail}")
            };
            v.problems.push(Problem {
                reason: Reason::CheckFailed,
                evidence: format!("check {name} failed {n} times in a row{detail}"),
            });
        }
    }
    if silent >= ms(rules.silent_after).saturating_add(late) {
        v.problems.push(Problem {
            reason: Reason::Silent,
            evidence: format!(
                "silent for {}; reports every {}",
                human(silent),
                human(interval)
            ),
        });
    } else if silent > interval.saturating_mul(3).saturating_add(late) {
        v.suspect = true;
    }
    if let Some(since) = f.tracking.pegged_since {
        let pegged = now.mono_ms.saturating_sub(since);
        if pegged >= ms(rules.pegged_for) {
            v.problems.push(Problem {
                reason: Reason::Pegged,
                evidence: format!("{} for {}", f.tracking.pegged_what, human(pegged)),
            });
        }
    }
    if let Some((path, used)) = &f.tracking.disk_worst {
        if *used > rules.disk_full {
            v.problems.push(Problem {
                reason: Reason::DiskFull,
                evidence: format!(
                    "filesystem {path} {used:.1}% full (limit {}%)",
                    rules.disk_full
                ),
            });
        }
    }
    if let Some(max) = rules.max_lifetime {
        let born_ms = if f.boot_time > 0 {
            (f.boot_time.min(i64::MAX as u64) as i64).saturating_mul(1000)
        } else {
            f.first_seen_ms
        };
        let age = now.wall_ms.saturating_sub(born_ms);
        if age > ms(max) {
            v.problems.push(Problem {
                reason: Reason::Age,
                evidence: format!(
                    "running for {}, over the maximum lifetime of {}",
                    human(age),
                    human(ms(max))
                ),
            });
        }
    }
    v.problems.sort_by_key(|p| p.reason);
    v
}

fn drift_evidence(d: &DriftInfo) -> String {
    let against = d.source.as_deref().unwrap_or("baseline");
    if d.changes.is_empty() {
        let short = |h: &str| h.chars().take(12).collect::<String>();
        let expected = d
            .expected
            .as_deref()
            .map(short)
            .unwrap_or_else(|| "?".into());
        return format!(
            "drifted from the {against}: hash {} instead of {expected}",
            short(&d.hash)
        );
    }
    let shown: Vec<String> = d
        .changes
        .iter()
        .take(5)
        .map(|c| {
            if c.attrs.is_empty() {
                format!("{} ({})", c.path, c.change)
            } else {
                format!("{} ({})", c.path, c.attrs.join("+"))
            }
        })
        .collect();
    let more = if d.changes.len() > 5 {
        format!(" and {} more", d.changes.len() - 5)
    } else {
        String::new()
    };
    format!("drifted from the {against}: {}{more}", shown.join(", "))
}

pub fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use phoenix_wire::{CheckResult, FileChange};

    const T0: i64 = 1_700_000_000_000;

    fn rules() -> Rules {
        Rules {
            grace: Duration::from_secs(300),
            silent_after: Duration::from_secs(120),
            pegged_for: Duration::from_secs(300),
            ..Default::default()
        }
    }

    fn facts(t: &Tracking) -> Facts<'_> {
        Facts {
            first_seen_mono: T0,
            last_seen_mono: T0,
            first_seen_ms: T0,
            interval_ms: 10_000,
            boot_time: 0,
            tracking: t,
            drift: None,
            watch_since_mono: 0,
            late_ms: 0,
        }
    }

    /// Wall and monotonic readings alike (the clock tests move them apart).
    fn n(ms: i64) -> Now {
        Now {
            wall_ms: ms,
            mono_ms: ms,
        }
    }

    fn reasons(v: &Verdict) -> Vec<Reason> {
        v.problems.iter().map(|p| p.reason).collect()
    }

    fn check(name: &str, ok: bool, detail: &str) -> CheckResult {
        CheckResult {
            name: name.into(),
            ok,
            detail: detail.into(),
            duration_ms: 1,
        }
    }

    #[test]
    fn silent_is_suspect_after_three_intervals_then_unhealthy_after_silent_after() {
        let t = Tracking::default();
        let r = rules();
        let mut f = facts(&t);
        f.first_seen_mono = T0 - 3_600_000; // out of grace
        let at = |s: i64| judge(&f, &r, n(T0 + s * 1000));
        assert_eq!(
            (at(30).suspect, reasons(&at(30))),
            (false, vec![]),
            "exactly 3 intervals is not yet suspect"
        );
        assert_eq!((at(31).suspect, reasons(&at(31))), (true, vec![]));
        assert_eq!((at(119).suspect, reasons(&at(119))), (true, vec![]));
        let v = at(120);
        assert_eq!((v.suspect, reasons(&v)), (false, vec![Reason::Silent]));
        assert_eq!(v.problems[0].evidence, "silent for 2m0s; reports every 10s");
        // A collector that was itself down measures silence from its own start.
        f.watch_since_mono = T0 + 100_000;
        assert!(judge(&f, &r, n(T0 + 150_000)).problems.is_empty());
        assert_eq!(
            reasons(&judge(&f, &r, n(T0 + 220_000))),
            vec![Reason::Silent]
        );
    }

    #[test]
    fn grace_lets_only_drift_count() {
        let mut t = Tracking::default();
        let r = rules();
        for _ in 0..5 {
            t.observe(
                &Observed {
                    checks: &[check("web", false, "HTTP 500")],
                    cpu_used_percent: Some(100.0),
                    disk_worst: Some(("/".into(), 99.0)),
                    ..Default::default()
                },
                &r,
                T0,
            );
        }
        let drift = DriftInfo {
            hash: "a".into(),
            drifted: true,
            changes: vec![FileChange {
                path: "/etc/x".into(),
                change: "changed".into(),
                attrs: vec!["content".into()],
                values: vec![],
            }],
            source: Some("registered baseline".into()),
            ..Default::default()
        };
        let mut f = facts(&t);
        let v = judge(&f, &r, n(T0 + 299_000));
        assert!(v.in_grace && v.problems.is_empty(), "{v:?}");
        f.drift = Some(&drift);
        let v = judge(&f, &r, n(T0 + 299_000));
        assert_eq!(reasons(&v), vec![Reason::Drift]);
        assert_eq!(
            v.problems[0].evidence,
            "drifted from the registered baseline: /etc/x (content)"
        );
        // Out of grace (and still reporting) every rule counts, worst first.
        f.last_seen_mono = T0 + 299_000;
        f.first_seen_mono = T0 - 1;
        let v = judge(&f, &r, n(T0 + 300_000));
        assert!(!v.in_grace);
        assert_eq!(
            reasons(&v),
            vec![
                Reason::Drift,
                Reason::CheckFailed,
                Reason::Pegged,
                Reason::DiskFull
            ]
        );
    }

    #[test]
    fn ssh_on_counts_in_grace_like_drift_and_ssh_allowed_turns_it_off() {
        let r = rules();
        let mut t = Tracking::default();
        let found = |e: Option<&str>| Observed {
            ssh: Some(e.map(str::to_string)),
            ..Default::default()
        };
        t.observe(
            &found(Some(
                "listening: tcp 0.0.0.0:22 sshd[812]; running: sshd[812]",
            )),
            &r,
            T0,
        );
        let f = facts(&t);
        let v = judge(&f, &r, n(T0 + 1000));
        assert!(v.in_grace);
        assert_eq!(reasons(&v), vec![Reason::Ssh]);
        assert_eq!(
            v.problems[0].evidence,
            "SSH is on: listening: tcp 0.0.0.0:22 sshd[812]; running: sshd[812]"
        );
        let allowed = Rules {
            ssh_allowed: true,
            ..rules()
        };
        assert!(judge(&f, &allowed, n(T0 + 1000)).problems.is_empty());
        // A report without the point says nothing; one that finds nothing clears it.
        t.observe(&Observed::default(), &r, T0);
        assert_eq!(reasons(&judge(&facts(&t), &r, n(T0))), vec![Reason::Ssh]);
        t.observe(&found(None), &r, T0);
        assert!(judge(&facts(&t), &r, n(T0)).problems.is_empty());
        // Worst first: drift, then SSH, then the rest.
        assert!(Reason::Drift < Reason::Ssh && Reason::Ssh < Reason::CheckFailed);
    }

    #[test]
    fn a_check_must_fail_n_consecutive_reports() {
        let r = Rules {
            check_failures: 3,
            grace: Duration::ZERO,
            ..rules()
        };
        let mut t = Tracking::default();
        let bad = [check("web", false, "HTTP 500"), check("db", true, "")];
        let good = [check("web", true, "HTTP 200"), check("db", true, "")];
        let verdict = |t: &Tracking| judge(&facts(t), &r, n(T0));
        t.observe(
            &Observed {
                checks: &bad,
                ..Default::default()
            },
            &r,
            T0,
        );
        t.observe(
            &Observed {
                checks: &bad,
                ..Default::default()
            },
            &r,
            T0,
        );
        assert!(verdict(&t).problems.is_empty());
        // A report without check results (a log batch) neither breaks nor extends the streak.
        t.observe(&Observed::default(), &r, T0);
        assert!(verdict(&t).problems.is_empty());
        t.observe(
            &Observed {
                checks: &good,
                ..Default::default()
            },
            &r,
            T0,
        );
        t.observe(
            &Observed {
                checks: &bad,
                ..Default::default()
            },
            &r,
            T0,
        );
        t.observe(
            &Observed {
                checks: &bad,
                ..Default::default()
            },
            &r,
            T0,
        );
        assert!(verdict(&t).problems.is_empty(), "a pass resets the count");
        t.observe(
            &Observed {
                checks: &bad,
                ..Default::default()
            },
            &r,
            T0,
        );
        let v = verdict(&t);
        assert_eq!(reasons(&v), vec![Reason::CheckFailed]);
        assert_eq!(
            v.problems[0].evidence,
            "check web failed 3 times in a row: HTTP 500"
        );
    }

    #[test]
    fn pegged_cpu_or_memory_for_the_whole_period() {
        let r = Rules {
            grace: Duration::ZERO,
            ..rules()
        };
        let mut t = Tracking::default();
        let obs = |cpu: f64, mem: f64| Observed {
            cpu_used_percent: Some(cpu),
            mem_available_percent: Some(mem),
            ..Default::default()
        };
        t.observe(&obs(96.0, 50.0), &r, T0);
        t.observe(&obs(99.0, 50.0), &r, T0 + 200_000);
        let mut f = facts(&t);
        f.last_seen_mono = T0 + 299_000;
        assert!(judge(&f, &r, n(T0 + 299_000)).problems.is_empty());
        let v = judge(&f, &r, n(T0 + 300_000));
        assert_eq!(
            v.problems,
            vec![Problem {
                reason: Reason::Pegged,
                evidence: "CPU 99.0% for 5m0s".into()
            }]
        );
        // One normal sample resets the clock.
        t.observe(&obs(50.0, 50.0), &r, T0 + 301_000);
        t.observe(&obs(50.0, 4.0), &r, T0 + 302_000);
        let mut f = facts(&t);
        f.last_seen_mono = T0 + 600_000;
        assert!(judge(&f, &r, n(T0 + 601_000)).problems.is_empty());
        let v = judge(&f, &r, n(T0 + 602_000));
        assert_eq!(v.problems[0].evidence, "available memory 4.0% for 5m0s");
        // Exactly at the threshold is not pegged.
        let mut t = Tracking::default();
        t.observe(&obs(95.0, 5.0), &r, T0);
        assert_eq!(t.pegged_since, None);
    }

    #[test]
    fn disk_over_the_limit() {
        let r = Rules {
            grace: Duration::ZERO,
            disk_full: 90.0,
            ..rules()
        };
        let mut t = Tracking::default();
        t.observe(
            &Observed {
                disk_worst: Some(("/var".into(), 90.0)),
                ..Default::default()
            },
            &r,
            T0,
        );
        assert!(judge(&facts(&t), &r, n(T0)).problems.is_empty());
        t.observe(
            &Observed {
                disk_worst: Some(("/var".into(), 90.5)),
                ..Default::default()
            },
            &r,
            T0,
        );
        assert_eq!(
            judge(&facts(&t), &r, n(T0)).problems[0].evidence,
            "filesystem /var 90.5% full (limit 90%)"
        );
    }

    #[test]
    fn age_from_boot_time_or_first_seen_and_off_by_default() {
        let t = Tracking::default();
        let off = rules();
        let mut f = facts(&t);
        f.last_seen_mono = T0 + 400 * 86_400_000;
        assert!(judge(&f, &off, n(f.last_seen_mono)).problems.is_empty());
        let r = Rules {
            max_lifetime: Some(Duration::from_secs(7 * 86400)),
            ..rules()
        };
        f.last_seen_mono = T0 + 7 * 86_400_000;
        assert!(
            judge(&f, &r, n(f.last_seen_mono)).problems.is_empty(),
            "exactly the lifetime is not over it"
        );
        f.last_seen_mono += 1000;
        let v = judge(&f, &r, n(f.last_seen_mono));
        assert_eq!(reasons(&v), vec![Reason::Age]);
        assert_eq!(
            v.problems[0].evidence,
            "running for 7d0h, over the maximum lifetime of 7d0h"
        );
        // The boot time counts when the agent sent it: it booted 8 days before the collector saw it.
        f.boot_time = ((T0 - 86_400_000) / 1000) as u64;
        f.last_seen_mono = T0 + 6 * 86_400_000 + 1000;
        assert_eq!(
            reasons(&judge(&f, &r, n(f.last_seen_mono))),
            vec![Reason::Age]
        );
    }
}
