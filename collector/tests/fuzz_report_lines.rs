//! Fuzzing whole reports through `convert::report_lines` against a real line-protocol parser
//! (the `influxdb-line-protocol` crate): random reports full of hostile text, each one first
//! accepted by the wire decoder (so exactly what an agent could get through), then written as
//! line protocol. Every line must parse; the lines must be exactly the expected points with
//! exactly the expected measurements (no `evil`), identity tags and tag keys; and every log
//! message, check detail and string field must come back byte for byte.
//!
//! `PHOENIX_FUZZ_SECS` (default 3) bounds the run, `PHOENIX_FUZZ_SEED` replays one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use influxdb_line_protocol::{parse_lines, FieldValue};
use phoenix_collector::convert::report_lines;
use phoenix_collector::lineproto::Writer;
use phoenix_wire::{
    logtext, CheckResult, Identity, Limits, LogLine, Point, Report, Value, VERSION,
};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

const PIECES: &[&str] = &[
    " ",
    ",",
    "=",
    "\"",
    "\\",
    "\n",
    "\r",
    "\t",
    "x\nevil,host=a v=1 1",
    "evil,host=a v=1",
    "\\\"",
    "a b,c=d",
    "é",
    "😀",
    "#",
    "'",
    "\u{2028}",
    "level=error",
    "ERROR",
    "WARN",
    "i-1",
    "cpu",
];

fn text(rng: &mut Rng, max_pieces: usize) -> String {
    let mut s = String::new();
    for _ in 0..rng.below(max_pieces) + 1 {
        if rng.chance(4) {
            s.push(char::from_u32(rng.below(0x11_0000) as u32).unwrap_or('?'));
        } else {
            s.push_str(PIECES[rng.below(PIECES.len())]);
        }
    }
    s
}

/// A name the wire format allows (measurement, tag or field key).
fn name(rng: &mut Rng) -> String {
    const C: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_";
    let n = rng.below(12) + 1;
    let mut s: String = (0..n).map(|_| C[rng.below(C.len())] as char).collect();
    if s.starts_with('_') {
        s.replace_range(0..1, "m");
    }
    s
}

fn value(rng: &mut Rng) -> Value {
    match rng.below(4) {
        0 => Value::Int(rng.next() as i64),
        1 => Value::Float(f64::from_bits(rng.next()) % 1e300),
        2 => Value::Bool(rng.chance(2)),
        _ => Value::Str(text(rng, 6)),
    }
}

fn random_report(rng: &mut Rng) -> Report {
    let id_chars = b"abcdefghijklmnopqrstuvwxyz0123456789-_.:/";
    let id = |rng: &mut Rng| -> String {
        (0..rng.below(20) + 1)
            .map(|_| id_chars[rng.below(id_chars.len())] as char)
            .collect()
    };
    let agent = Identity {
        instance_id: id(rng),
        image_id: id(rng),
        group: rng.chance(2).then(|| id(rng)),
        hostname: text(rng, 3).chars().filter(|c| !c.is_control()).collect(),
        boot_id: "b".into(),
        version: "v".into(),
        boot_time: 0,
    };
    let metrics = (0..rng.below(6))
        .map(|_| Point {
            m: name(rng),
            tags: (0..rng.below(5))
                .map(|_| {
                    (
                        if rng.chance(4) {
                            "instance_id".to_string()
                        } else {
                            name(rng)
                        },
                        text(rng, 4),
                    )
                })
                .collect(),
            fields: (0..rng.below(4) + 1)
                .map(|_| (name(rng), value(rng)))
                .collect(),
            ts: rng.next() as i64,
        })
        .collect();
    let logs = (0..rng.below(6))
        .map(|_| {
            let raw: Vec<u8> = if rng.chance(3) {
                (0..rng.below(40)).map(|_| rng.next() as u8).collect()
            } else {
                text(rng, 8).into_bytes()
            };
            let (msg, escaped) = logtext::encode(&raw);
            LogLine {
                src: if rng.chance(5) {
                    "journal".into()
                } else {
                    text(rng, 3)
                },
                ts: rng.next() as i64,
                offset: rng.next(),
                msg,
                escaped,
                part: rng.chance(4).then(|| rng.below(5) as u32 + 1),
                tags: (0..rng.below(3))
                    .map(|_| {
                        (
                            if rng.chance(3) {
                                "level".to_string()
                            } else {
                                name(rng)
                            },
                            text(rng, 2),
                        )
                    })
                    .collect(),
                fields: (0..rng.below(3))
                    .map(|_| {
                        (
                            if rng.chance(4) {
                                "message".to_string()
                            } else {
                                name(rng)
                            },
                            value(rng),
                        )
                    })
                    .collect(),
            }
        })
        .collect();
    let checks = (0..rng.below(3))
        .map(|i| CheckResult {
            name: format!("c{i}"),
            ok: rng.chance(2),
            detail: text(rng, 5),
            duration_ms: rng.next() % 1000,
        })
        .collect();
    Report {
        v: VERSION,
        agent,
        seq: 1,
        interval_ms: 1000,
        metrics,
        logs,
        drift: None,
        checks,
        drift_root: None,
        protected: None,
    }
}

fn budget() -> Duration {
    Duration::from_secs_f64(
        std::env::var("PHOENIX_FUZZ_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3.0),
    )
}

fn field_eq(got: &FieldValue, want: &Value) -> bool {
    match (got, want) {
        (FieldValue::I64(a), Value::Int(b)) => a == b,
        (FieldValue::F64(a), Value::Float(b)) => a == b,
        (FieldValue::Boolean(a), Value::Bool(b)) => a == b,
        (FieldValue::String(a), Value::Str(b)) => a == &b.as_str(),
        _ => false,
    }
}

/// Check one report's lines; `Err` says what went wrong.
fn check(r: &Report) -> Result<usize, String> {
    let mut w = Writer::default();
    report_lines(r, &mut w);
    let parsed: Vec<_> = parse_lines(&w.buf)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("line protocol does not parse: {e}"))?;
    let want_n = r.metrics.len() + r.logs.len() + r.checks.len();
    if parsed.len() != want_n || w.lines != want_n || w.ends.len() != want_n {
        return Err(format!(
            "{} lines parsed, {} written, {} expected",
            parsed.len(),
            w.lines,
            want_n
        ));
    }
    // Each recorded line on its own parses to exactly one point too.
    for (i, line) in w.iter().enumerate() {
        let one: Vec<_> = parse_lines(line)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("line {i} alone: {e}"))?;
        if one.len() != 1 {
            return Err(format!("line {i} alone holds {} points", one.len()));
        }
    }
    let expected: Vec<&str> = r
        .metrics
        .iter()
        .map(|p| p.m.as_str())
        .chain(r.logs.iter().map(|_| "log"))
        .chain(r.checks.iter().map(|_| "phoenix_check"))
        .collect();
    let got: Vec<String> = parsed
        .iter()
        .map(|l| l.series.measurement.to_string())
        .collect();
    if got != expected {
        return Err(format!("measurements {got:?}, expected {expected:?}"));
    }
    let a = &r.agent;
    for (i, l) in parsed.iter().enumerate() {
        let tags: BTreeMap<String, String> = l
            .series
            .tag_set
            .as_ref()
            .map(|t| {
                t.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        if tags.get("instance_id") != Some(&a.instance_id)
            || tags.get("image_id") != Some(&a.image_id)
            // The group tag is the group, else the image id (one group string everywhere).
            || tags.get("group").map(String::as_str)
                != Some(a.group_or_image()).filter(|g| !g.is_empty())
        {
            return Err(format!(
                "line {i}: identity tags {tags:?} are not the report's {a:?}"
            ));
        }
        let keys: BTreeSet<&str> = tags.keys().map(String::as_str).collect();
        let mut allowed: BTreeSet<&str> = ["group", "host", "image_id", "instance_id"].into();
        let fields: BTreeMap<String, &FieldValue> = l
            .field_set
            .iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        if i < r.metrics.len() {
            let p = &r.metrics[i];
            allowed.extend(p.tags.keys().map(String::as_str));
            if fields.len() != p.fields.len()
                || p.fields
                    .iter()
                    .any(|(k, v)| !fields.get(k).is_some_and(|f| field_eq(f, v)))
            {
                return Err(format!(
                    "line {i}: fields {fields:?} are not {:?}",
                    p.fields
                ));
            }
            if l.timestamp != Some(p.ts) {
                return Err(format!(
                    "line {i}: timestamp {:?} is not {}",
                    l.timestamp, p.ts
                ));
            }
        } else if i < r.metrics.len() + r.logs.len() {
            let g = &r.logs[i - r.metrics.len()];
            allowed.extend(g.tags.keys().map(String::as_str));
            allowed.extend(["path", "level"]);
            match fields.get("message") {
                Some(FieldValue::String(m)) if *m == g.msg => {}
                other => return Err(format!("line {i}: message {other:?} is not {:?}", g.msg)),
            }
            if logtext::decode(&g.msg, g.escaped).is_empty() != g.msg.is_empty() {
                return Err("log text does not decode".into());
            }
        } else {
            let c = &r.checks[i - r.metrics.len() - r.logs.len()];
            allowed.insert("check");
            match fields.get("detail") {
                Some(FieldValue::String(d)) if *d == c.detail => {}
                other => return Err(format!("line {i}: detail {other:?} is not {:?}", c.detail)),
            }
        }
        if !keys.is_subset(&allowed) {
            return Err(format!("line {i}: tag keys {keys:?} beyond {allowed:?}"));
        }
    }
    Ok(want_n)
}

#[test]
fn whole_reports_become_exactly_their_points() {
    let seed = std::env::var("PHOENIX_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let mut rng = Rng(seed);
    // Decode refuses timestamps far from its clock; the converter must still format any i64,
    // so the window is opened to (almost) the whole range here.
    let any_time = Limits {
        now_ns: Some(0),
        max_age: Duration::MAX,
        max_ahead: Duration::MAX,
        ..Limits::default()
    };
    let (start, end) = (Instant::now(), Instant::now() + budget());
    let (mut execs, mut refused, mut lines) = (0u64, 0u64, 0usize);
    while Instant::now() < end {
        let r = random_report(&mut rng);
        // Only what the collector would accept: through the real decoder.
        let r = match phoenix_wire::decode(&phoenix_wire::encode(&r), true, &any_time) {
            Ok(r) => r,
            Err(_) => {
                refused += 1;
                continue;
            }
        };
        execs += 1;
        match check(&r) {
            Ok(n) => lines += n,
            Err(why) => panic!("{why}\nseed {seed}, report {r:#?}"),
        }
    }
    println!("report_lines: {execs} reports ({lines} lines) checked against influxdb-line-protocol in {:.1}s ({refused} generated reports refused by decode), seed {seed}", start.elapsed().as_secs_f64());
    assert!(
        execs > 50,
        "too few reports got through the decoder: {execs} (refused {refused})"
    );
}

#[test]
fn the_crafted_log_line_is_one_message() {
    let r = Report {
        v: VERSION,
        agent: Identity {
            instance_id: "i-1".into(),
            image_id: "img".into(),
            hostname: "h".into(),
            ..Default::default()
        },
        seq: 1,
        interval_ms: 0,
        metrics: vec![],
        logs: vec![LogLine {
            src: "/var/log/x.log".into(),
            ts: 1,
            offset: 0,
            msg: "x\nevil,host=a v=1".into(),
            escaped: false,
            part: None,
            tags: Default::default(),
            fields: Default::default(),
        }],
        drift: None,
        checks: vec![],
        drift_root: None,
        protected: None,
    };
    assert_eq!(check(&r), Ok(1));
}
