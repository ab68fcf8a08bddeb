//! Field types are the collector's to fix, not the first sender's. InfluxDB takes a field's
//! type from the first point written to a shard; a single report with `priority="6"` for a
//! future time would make every genuine `priority=3` in that shard fail, and with it the
//! whole line. So every field has one type here:
//!
//! - the measurements phoenix-agent writes (Telegraf's cpu, mem, net, disk, diskio, system,
//!   and phoenix_agent; the extra fields of log lines) have their types written down below;
//! - any other (measurement, field) keeps the type it was first seen with, for as long as the
//!   collector runs (at most [`MAX_LEARNED`] of them);
//! - the measurements the collector writes itself (`phoenix_check`, `phoenix_drift`, …) and
//!   `log` cannot be sent as metric points at all.
//!
//! A value of the wrong type is converted when that loses nothing (an integer for a float
//! field, within ±2^53; an integral float for an integer field), else the report gets a 400
//! naming the field. Converting keeps an older or odd agent's data instead of setting aside
//! its whole batch; refusing keeps a string out of a number's place.

use std::collections::HashMap;
use std::sync::Mutex;

use phoenix_wire::{Report, Value};

/// Distinct (measurement, field) pairs learned; past it a new pair is refused.
pub const MAX_LEARNED: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Int,
    Float,
    Bool,
    Str,
}

impl Kind {
    fn of(v: &Value) -> Kind {
        match v {
            Value::Int(_) => Kind::Int,
            Value::Float(_) => Kind::Float,
            Value::Bool(_) => Kind::Bool,
            Value::Str(_) => Kind::Str,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Int => "integer",
            Kind::Float => "float",
            Kind::Bool => "boolean",
            Kind::Str => "string",
        }
    }
}

/// Measurements phoenix-agent writes, whose field types are fixed here.
const AGENT_MEASUREMENTS: [&str; 7] = [
    "cpu",
    "mem",
    "net",
    "disk",
    "diskio",
    "system",
    "phoenix_agent",
];

/// The type of a field of one of [`AGENT_MEASUREMENTS`]: floats where the agent computes a
/// share or a load, integers (counters, bytes) everywhere else.
fn agent_kind(m: &str, field: &str) -> Kind {
    let float = match m {
        "cpu" => true,
        "mem" => matches!(field, "used_percent" | "available_percent"),
        "disk" => field == "used_percent",
        "system" => matches!(field, "load1" | "load5" | "load15"),
        "phoenix_agent" => field == "cpu_seconds",
        _ => false,
    };
    if float {
        Kind::Float
    } else {
        Kind::Int
    }
}

/// Extra fields of log lines (the journal's); the collector writes message, offset, escaped
/// and part itself from typed wire fields.
fn log_kind(field: &str) -> Option<Kind> {
    match field {
        "pid" | "priority" => Some(Kind::Int),
        "comm" => Some(Kind::Str),
        _ => None,
    }
}

/// Measurements only the collector writes.
fn reserved(m: &str) -> bool {
    // The wire format's one list: the agent's own phoenix_* measurements (phoenix_agent,
    // phoenix_listen, phoenix_ssh, phoenix_kernel …) stay the agent's.
    phoenix_wire::COLLECTOR_MEASUREMENTS.contains(&m)
}

/// `v` as `want`, if that loses nothing.
fn coerce(v: &Value, want: Kind) -> Option<Value> {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    match (v, want) {
        (Value::Int(i), Kind::Float) if (*i as f64).abs() <= EXACT => Some(Value::Float(*i as f64)),
        (Value::Float(f), Kind::Int) if f.fract() == 0.0 && f.abs() <= EXACT => {
            Some(Value::Int(*f as i64))
        }
        _ => None,
    }
}

#[derive(Debug, Default)]
pub struct Registry {
    learned: Mutex<HashMap<(String, String), Kind>>,
}

impl Registry {
    /// Check (and where lossless, convert) every field of `r`; the reason when it cannot pass.
    pub fn enforce(&self, r: &mut Report) -> Result<(), String> {
        let mut learned = self.learned.lock().unwrap();
        for p in &mut r.metrics {
            if reserved(&p.m) {
                return Err(format!(
                    "measurement {:?} is written by the collector itself; agents may not send it",
                    p.m
                ));
            }
            let fixed = AGENT_MEASUREMENTS.contains(&p.m.as_str());
            for (k, v) in p.fields.iter_mut() {
                let want = if fixed {
                    agent_kind(&p.m, k)
                } else {
                    learn(&mut learned, &p.m, k, Kind::of(v))?
                };
                fit(v, want, &p.m, k)?;
            }
        }
        for l in &mut r.logs {
            for (k, v) in l.fields.iter_mut() {
                if matches!(k.as_str(), "message" | "offset" | "escaped" | "part") {
                    continue; // not written: the line's own fields win (see convert)
                }
                let want = match log_kind(k) {
                    Some(kind) => kind,
                    None => learn(&mut learned, "log", k, Kind::of(v))?,
                };
                fit(v, want, "log", k)?;
            }
        }
        Ok(())
    }

    /// Pairs learned so far.
    pub fn learned(&self) -> usize {
        self.learned.lock().unwrap().len()
    }
}

fn learn(
    map: &mut HashMap<(String, String), Kind>,
    m: &str,
    field: &str,
    seen: Kind,
) -> Result<Kind, String> {
    if let Some(k) = map.get(&(m.to_owned(), field.to_owned())) {
        return Ok(*k);
    }
    if map.len() >= MAX_LEARNED {
        return Err(format!(
            "field {m}.{field} is new and this collector already keeps {MAX_LEARNED} distinct fields; send fewer field names"
        ));
    }
    map.insert((m.to_owned(), field.to_owned()), seen);
    Ok(seen)
}

fn fit(v: &mut Value, want: Kind, m: &str, field: &str) -> Result<(), String> {
    let got = Kind::of(v);
    if got == want {
        return Ok(());
    }
    match coerce(v, want) {
        Some(c) => {
            *v = c;
            Ok(())
        }
        None => Err(format!(
            "field {m}.{field} must be {} here, not {}: types are fixed per measurement, so one report cannot break later data",
            want.name(),
            got.name(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phoenix_wire::Map;
    use phoenix_wire::{Identity, LogLine, Point};

    fn report(metrics: Vec<Point>, logs: Vec<LogLine>) -> Report {
        Report {
            v: 1,
            agent: Identity::default(),
            seq: 1,
            drift_root: None,
            protected: None,
            interval_ms: 1000,
            metrics,
            logs,
            drift: None,
            checks: vec![],
        }
    }

    fn pt(m: &str, k: &str, v: Value) -> Point {
        Point {
            m: m.into(),
            tags: Map::new(),
            fields: Map::from([(k.to_string(), v)]),
            ts: 1,
        }
    }

    fn log(k: &str, v: Value) -> LogLine {
        LogLine {
            src: "journal".into(),
            ts: 1,
            offset: 0,
            msg: "m".into(),
            escaped: false,
            part: None,
            tags: Map::new(),
            fields: Map::from([(k.to_string(), v)]),
        }
    }

    #[test]
    fn a_string_cannot_take_a_numbers_place() {
        let s = Registry::default();
        let mut r = report(vec![], vec![log("priority", Value::Str("6".into()))]);
        let why = s.enforce(&mut r).unwrap_err();
        assert!(
            why.contains("log.priority must be integer here, not string"),
            "{why}"
        );
        let mut r = report(vec![], vec![log("priority", Value::Int(3))]);
        assert!(s.enforce(&mut r).is_ok());
        let mut r = report(vec![pt("mem", "used", Value::Str("x".into()))], vec![]);
        assert!(s.enforce(&mut r).is_err());
    }

    #[test]
    fn lossless_conversions_keep_the_data() {
        let s = Registry::default();
        let mut r = report(
            vec![
                pt("cpu", "usage_user", Value::Int(5)),
                pt("mem", "used", Value::Float(1024.0)),
            ],
            vec![],
        );
        s.enforce(&mut r).unwrap();
        assert_eq!(r.metrics[0].fields["usage_user"], Value::Float(5.0));
        assert_eq!(r.metrics[1].fields["used"], Value::Int(1024));
        let mut r = report(vec![pt("mem", "used", Value::Float(1.5))], vec![]);
        assert!(s.enforce(&mut r).is_err());
        let mut r = report(vec![pt("cpu", "usage_user", Value::Int(i64::MAX))], vec![]);
        assert!(s.enforce(&mut r).is_err());
    }

    #[test]
    fn unknown_fields_keep_their_first_type_and_reserved_names_are_refused() {
        let s = Registry::default();
        let mut r = report(vec![pt("app", "n", Value::Int(1))], vec![]);
        s.enforce(&mut r).unwrap();
        let mut r = report(vec![pt("app", "n", Value::Bool(true))], vec![]);
        assert!(s.enforce(&mut r).is_err());
        for m in ["phoenix_audit", "phoenix_drift", "log", "phoenix_check"] {
            let mut r = report(vec![pt(m, "x", Value::Int(1))], vec![]);
            assert!(s.enforce(&mut r).unwrap_err().contains("collector itself"));
        }
        let mut r = report(vec![pt("phoenix_agent", "rss", Value::Int(1))], vec![]);
        assert!(s.enforce(&mut r).is_ok());
        assert_eq!(s.learned(), 1);
    }
}
