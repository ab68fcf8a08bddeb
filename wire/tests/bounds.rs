//! Hostile numbers at decode: the interval, the boot time and every timestamp must lie inside
//! their bounds, and a refusal names the field, the value and the bound. Property-tested over
//! the whole ranges of the integer types, with the collector's clock pinned and at extremes.

use phoenix_wire::Map;

use phoenix_wire::bounds::{MAX_CHECK_MS, MAX_INTERVAL_MS, MIN_BOOT_TIME, MIN_INTERVAL_MS};
use phoenix_wire::{
    decode, encode, CheckResult, DriftState, Identity, Limits, LogLine, Point, Report, Value,
    VERSION,
};
use proptest::prelude::*;

/// 2026-01-01T00:00:00Z: any fixed "now" works; the point is that it is pinned.
const NOW: i64 = 1_767_225_600_000_000_000;
const DAY_NS: i64 = 86_400_000_000_000;
const AGE: i64 = 7 * DAY_NS;
const AHEAD: i64 = 600_000_000_000;

fn limits(now: i64) -> Limits {
    Limits {
        now_ns: Some(now),
        ..Limits::default()
    }
}

fn report(now: i64) -> Report {
    Report {
        v: VERSION,
        agent: Identity {
            instance_id: "i-1".into(),
            image_id: "img".into(),
            group: None,
            hostname: "h".into(),
            boot_id: "b".into(),
            version: "t".into(),
            boot_time: (now / 1_000_000_000) as u64 - 3600,
        },
        seq: 1,
        interval_ms: 10_000,
        metrics: vec![Point {
            m: "cpu".into(),
            tags: Map::new(),
            fields: [("usage_idle".to_string(), Value::Float(90.0))].into(),
            ts: now,
        }],
        logs: vec![LogLine {
            src: "/var/log/app.log".into(),
            ts: now,
            offset: 0,
            msg: "hello".into(),
            escaped: false,
            part: None,
            tags: Map::new(),
            fields: Map::new(),
        }],
        drift: Some(DriftState {
            hash: "ab".repeat(32),
            ts: now,
            ..Default::default()
        }),
        checks: vec![CheckResult {
            name: "web".into(),
            ok: true,
            detail: String::new(),
            duration_ms: 3,
        }],
        drift_root: Some("ab".repeat(32)),
        protected: None,
    }
}

fn try_decode(r: &Report, now: i64) -> Result<Report, String> {
    decode(&encode(r), true, &limits(now)).map_err(|e| e.to_string())
}

#[test]
fn a_sound_report_decodes_with_its_new_fields() {
    let r = report(NOW);
    assert_eq!(try_decode(&r, NOW).unwrap(), r);
    // Absent fields keep their old meaning: no root, no resend.
    let mut bare = r.clone();
    bare.drift_root = None;
    let json =
        String::from_utf8(phoenix_wire::gunzip_limited(&encode(&bare), 1 << 20).unwrap()).unwrap();
    assert!(!json.contains("drift_root"), "{json}");
    let ack: phoenix_wire::Ack = serde_json::from_str(r#"{"accepted":3}"#).unwrap();
    assert!(!ack.resend_drift);
    let ack: phoenix_wire::Ack =
        serde_json::from_str(r#"{"accepted":3,"resend_drift":true}"#).unwrap();
    assert!(ack.resend_drift);
}

#[test]
fn the_bounds_themselves_are_inside() {
    let mut r = report(NOW);
    r.metrics[0].ts = NOW - AGE;
    r.logs[0].ts = NOW + AHEAD;
    r.interval_ms = MIN_INTERVAL_MS;
    r.agent.boot_time = MIN_BOOT_TIME;
    r.checks[0].duration_ms = MAX_CHECK_MS;
    try_decode(&r, NOW).unwrap();
    r.interval_ms = MAX_INTERVAL_MS;
    r.agent.boot_time = ((NOW + AHEAD) / 1_000_000_000) as u64;
    try_decode(&r, NOW).unwrap();
    // 0 is "not sent" for both, as before the bounds existed.
    r.interval_ms = 0;
    r.agent.boot_time = 0;
    try_decode(&r, NOW).unwrap();
}

#[test]
fn one_nanosecond_outside_is_refused_and_named() {
    let mut r = report(NOW);
    r.metrics[0].ts = NOW - AGE - 1;
    let e = try_decode(&r, NOW).unwrap_err();
    assert!(e.contains("metrics[0].ts"), "{e}");
    assert!(e.contains(&(NOW - AGE - 1).to_string()), "{e}");
    assert!(e.contains("7.0 d before"), "{e}");
    let mut r = report(NOW);
    r.logs[0].ts = NOW + AHEAD + 1;
    let e = try_decode(&r, NOW).unwrap_err();
    assert!(
        e.contains("logs[0].ts") && e.contains("10 min after"),
        "{e}"
    );
    let mut r = report(NOW);
    r.drift.as_mut().unwrap().ts = 0;
    let e = try_decode(&r, NOW).unwrap_err();
    assert!(
        e.contains("drift.ts = 0") && e.contains("years before"),
        "{e}"
    );
}

/// One change to a sound report.
type Tweak = Box<dyn Fn(&mut Report)>;

#[test]
fn hostile_extremes_are_refused_with_a_reason() {
    let cases: Vec<(&str, Tweak)> = vec![
        ("interval_ms = 0", Box::new(|_| {})),
        (
            "interval_ms = 18446744073709551615",
            Box::new(|r| r.interval_ms = u64::MAX),
        ),
        ("interval_ms = 99 ", Box::new(|r| r.interval_ms = 99)),
        (
            "agent.boot_time = 18446744073709551615",
            Box::new(|r| r.agent.boot_time = u64::MAX),
        ),
        ("agent.boot_time = 1 ", Box::new(|r| r.agent.boot_time = 1)),
        (
            "metrics[0].ts = -9223372036854775808",
            Box::new(|r| r.metrics[0].ts = i64::MIN),
        ),
        (
            "logs[0].ts = 9223372036854775807",
            Box::new(|r| r.logs[0].ts = i64::MAX),
        ),
        (
            "duration_ms = 18446744073709551615",
            Box::new(|r| r.checks[0].duration_ms = u64::MAX),
        ),
        (
            "drift_root",
            Box::new(|r| r.drift_root = Some("x\ny".into())),
        ),
        (
            "drift_root",
            Box::new(|r| r.drift_root = Some(String::new())),
        ),
    ];
    for (i, (want, f)) in cases.iter().enumerate() {
        let mut r = report(NOW);
        f(&mut r);
        let got = try_decode(&r, NOW);
        if i == 0 {
            // The control case: the untouched report decodes.
            got.unwrap();
            continue;
        }
        let e = got.expect_err(want);
        assert!(e.contains(want), "wanted {want:?} in {e}");
    }
}

#[test]
fn a_collector_clock_at_the_ends_of_time_does_not_panic() {
    for now in [i64::MIN, -1, 0, i64::MAX] {
        let r = report(NOW);
        // Whatever the verdict, it is an answer, not an overflow.
        let _verdict: Result<Report, String> = try_decode(&r, now);
        let mut r = report(NOW);
        r.metrics[0].ts = now;
        r.logs[0].ts = now;
        r.drift.as_mut().unwrap().ts = now;
        r.agent.boot_time = 0;
        try_decode(&r, now).unwrap_or_else(|e| panic!("now {now}: {e}"));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Decode takes a report exactly when every number is inside its bound; a refusal names
    /// the first field that is not.
    #[test]
    fn accepted_iff_inside_bounds(
        interval in prop_oneof![Just(0u64), 0u64..200, any::<u64>(), 86_300_000u64..86_500_000],
        boot in prop_oneof![Just(0u64), any::<u64>(), 900_000_000u64..1_800_000_000],
        pts in prop_oneof![any::<i64>(), -AGE - 5..AHEAD + 5],
        lts in prop_oneof![any::<i64>(), -AGE - 5..AHEAD + 5],
        dts in prop_oneof![any::<i64>(), -AGE - 5..AHEAD + 5],
        dur in prop_oneof![any::<u64>(), 0u64..100_000_000],
        now in prop_oneof![Just(NOW), any::<i64>()],
    ) {
        // Small offsets are relative to now; big ones are absolute hostile values.
        let rel = |t: i64| if (-AGE - 5..AHEAD + 5).contains(&t) { now.saturating_add(t) } else { t };
        let mut r = report(NOW);
        r.interval_ms = interval;
        r.agent.boot_time = boot;
        r.metrics[0].ts = rel(pts);
        r.logs[0].ts = rel(lts);
        r.drift.as_mut().unwrap().ts = rel(dts);
        r.checks[0].duration_ms = dur;
        let in_window = |t: i64| {
            let (t, n) = (t as i128, now as i128);
            t >= n - AGE as i128 && t <= n + AHEAD as i128
        };
        let latest_boot = (now as i128 + AHEAD as i128) / 1_000_000_000;
        let want: Option<&str> = if interval != 0
            && !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&interval)
        {
            Some("interval_ms")
        } else if boot != 0 && (boot < MIN_BOOT_TIME || boot as i128 > latest_boot) {
            Some("agent.boot_time")
        } else if !in_window(r.metrics[0].ts) {
            Some("metrics[0].ts")
        } else if !in_window(r.logs[0].ts) {
            Some("logs[0].ts")
        } else if !in_window(r.drift.as_ref().unwrap().ts) {
            Some("drift.ts")
        } else if dur > MAX_CHECK_MS {
            Some("duration_ms")
        } else {
            None
        };
        match (try_decode(&r, now), want) {
            (Ok(back), None) => prop_assert_eq!(back, r),
            (Err(e), Some(field)) => prop_assert!(e.contains(field), "wanted {} in {}", field, e),
            (got, want) => prop_assert!(false, "got {:?}, wanted refusal of {:?}", got, want),
        }
    }
}
