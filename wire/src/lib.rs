//! The report an agent sends to the collector: JSON, gzip-compressed, versioned.
//!
//! This crate is the single place both programs agree on. The agent builds a [`Report`] and
//! calls [`encode`]; the collector calls [`decode`] with its limits, which checks every
//! structural rule a hostile or buggy sender could break before anything reaches InfluxDB.

use serde::{Deserialize, Serialize};

pub mod bounds;
pub mod civil;
pub mod confval;
mod cut;
pub mod diag;
pub mod drift;
mod gunzip;
pub mod logtext;
pub mod map;

pub use cut::{cut_to, cut_value, MAX_TAG_VALUE};
pub use gunzip::gunzip_limited;
pub use map::Map;

/// Major version of the wire format. A collector rejects any other major with a 400.
pub const VERSION: u32 = 1;

/// InfluxDB's documented limit for one string field; longer log lines are split by the agent.
pub const MAX_FIELD_STRING: usize = 64 * 1024 - 1;

/// One batch from one agent.
///
/// `L` is how a drift state's full entry list is held: decoded reports own a
/// `Vec<FileEntry>`; an agent serialises its list straight from its own index (any
/// `Serialize` that writes a sequence of [`FileEntry`]), so the whole list is never built.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report<L = Vec<FileEntry>> {
    /// Wire format major version, [`VERSION`].
    pub v: u32,
    pub agent: Identity,
    /// Increasing per agent; the collector drops a batch whose (instance, boot, seq) it already took.
    pub seq: u64,
    /// The agent's reporting interval, so the collector can tell "late" from "silent".
    /// 0 (absent) or [`bounds::MIN_INTERVAL_MS`]..=[`bounds::MAX_INTERVAL_MS`]; decode refuses
    /// anything else.
    #[serde(default)]
    pub interval_ms: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<Point>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<LogLine>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftState<L>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CheckResult>,
    /// The agent's current drift root (hex, the [`DriftState::hash`] of its latest scan or
    /// event), on every report whatever it carries, so the collector notices cheaply when its
    /// record of the instance's drift is missing or stale (a restart, a gone instance coming
    /// back, a lost drift report) and asks for the full state with [`Ack::resend_drift`].
    /// None when the agent watches nothing or has not finished its first scan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift_root: Option<String>,
    /// Whether the agent's protect file (`--protect-file`, default
    /// `/run/phoenix/do-not-replace`) exists: while it does, the collector holds voluntary
    /// marks (drift, expiry) of this instance. Sent on metrics reports; None: not looked at
    /// (other batches, older agents). Only presence counts: the file's content is never read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protected: Option<bool>,
}

impl Report {
    /// An empty report of `agent`: this wire version, seq 0, no interval, nothing carried.
    pub fn new(agent: Identity) -> Report {
        Report {
            v: VERSION,
            agent,
            seq: 0,
            interval_ms: 0,
            metrics: Vec::new(),
            logs: Vec::new(),
            drift: None,
            checks: Vec::new(),
            drift_root: None,
            protected: None,
        }
    }
}

impl<L> Report<L> {
    /// The same report carrying `drift`, whose entry list may be held another way.
    pub fn with_drift<M>(self, drift: DriftState<M>) -> Report<M> {
        let Report {
            v,
            agent,
            seq,
            interval_ms,
            metrics,
            logs,
            drift: _,
            checks,
            drift_root,
            protected,
        } = self;
        Report {
            v,
            agent,
            seq,
            interval_ms,
            metrics,
            logs,
            drift: Some(drift),
            checks,
            drift_root,
            protected,
        }
    }
}

/// Who is speaking. The collector turns these into the `host`, `instance_id`, `image_id` and
/// `group` tags of every point, so an agent cannot tag points as another instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Identity {
    pub instance_id: String,
    pub image_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub hostname: String,
    pub boot_id: String,
    pub version: String,
    /// Unix seconds at which this boot started; lets the collector compute instance age.
    /// 0 (unknown) or from [`bounds::MIN_BOOT_TIME`] to a little after the collector's clock.
    #[serde(default)]
    pub boot_time: u64,
}

impl Identity {
    /// The group an instance is counted in: its `--group`, else its image. The one spelling
    /// the collector uses everywhere (JSON, the `group` tag, the page, the budgets).
    pub fn group_or_image(&self) -> &str {
        self.group.as_deref().unwrap_or(&self.image_id)
    }
}

/// A metric point. Identity tags are added by the collector, not sent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Point {
    /// Measurement name (Telegraf's: cpu, mem, net, disk, diskio, system; or phoenix_*).
    pub m: String,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub tags: Map<String>,
    pub fields: Map<Value>,
    /// Unix nanoseconds, set by the agent so a retried batch overwrites itself.
    pub ts: i64,
}

/// A field value. JSON keeps integers and floats apart (`5` vs `5.0`), which maps onto
/// InfluxDB's integer and float field types.
///
/// Read with a visitor of its own rather than `#[serde(untagged)]`, which buffers every value
/// and builds (and formats) an error for each variant that does not fit: a float field cost
/// a formatted "invalid type" message before it was taken as a float (half the instructions
/// of a report's decode, by callgrind). What is taken is the same: an integer that fits i64
/// is `Int`, any other number `Float`, then `Bool` and `Str`; anything else is refused.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Value;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number, a boolean or a string")
            }
            fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
                Ok(Value::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
                Ok(i64::try_from(v).map_or(Value::Float(v as f64), Value::Int))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
                Ok(Value::Float(v))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
                Ok(Value::Bool(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Value, E> {
                Ok(Value::Str(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Value, E> {
                Ok(Value::Str(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// One log line (or one piece of a line too long for one InfluxDB string).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogLine {
    /// Source: the file path, or `journal`.
    pub src: String,
    /// Unix nanoseconds, strictly increasing per source and fixed at read time.
    pub ts: i64,
    /// Byte offset of the start of this text in the file (journal: 0).
    #[serde(default)]
    pub offset: u64,
    /// The text; see [`logtext`] for how bytes that are not UTF-8 travel.
    pub msg: String,
    /// True when `msg` is in the escaped form of [`logtext::encode`] (the raw line was not UTF-8).
    #[serde(default, skip_serializing_if = "is_false")]
    pub escaped: bool,
    /// For a line split because it was too long: this piece's number, from 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<u32>,
    /// Extra tags (journal: unit, level); files get `level` from the text at the collector.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub tags: Map<String>,
    /// Extra fields (journal: pid, comm, priority).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub fields: Map<Value>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The agent's current view of its watched files against its baseline.
///
/// `L` holds `entries_list`, as for [`Report`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct DriftState<L = Vec<FileEntry>> {
    /// Merkle root over the current entries (hex BLAKE3).
    pub hash: String,
    /// Root of the baseline the agent has on disk, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    /// What differs from the agent's baseline (empty when there is none or it matches).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<FileChange>,
    /// Entries hashed in the scan that produced `hash`.
    #[serde(default)]
    pub entries: u64,
    /// Unix ns of the scan (or event) this state describes.
    #[serde(default)]
    pub ts: i64,
    /// Set when inotify lost events (queue overflow, no more watches) and a rescan happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The full current entry list, sent so the collector can diff against a registered
    /// baseline. Paths and hashes only, never contents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries_list: Option<L>,
    /// [`drift::HASH_VERSION`] of `hash` and `entries_list` (None: 1, agents before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_version: Option<u32>,
    /// The hash version of the agent's baseline (None: 1). When it differs from
    /// `hash_version` the agent did not compare, and the collector does not either.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_hash_version: Option<u32>,
}

/// One watched file as hashed: never its contents, only their hash.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileEntry {
    pub path: String,
    /// `f` file, `d` directory, `l` symlink, `o` other, `e` unreadable.
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Hex BLAKE3 of the contents (files), of the target (symlinks), empty otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// For `e` entries: why the file could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Bytes, for regular files; absent in manifests baked before it was recorded. Not part
    /// of the leaf hash (the content hash covers it), so adding it changed no root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// How one file differs from the baseline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct FileChange {
    pub path: String,
    /// `added`, `removed` or `changed`.
    pub change: String,
    /// For `changed`: which attributes: content, mode, owner, type, target, error.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attrs: Vec<String>,
    /// For `changed`: the baseline's and the box's value of each attribute that differs, as
    /// far as they can be shown. Never contents: `content` is a short prefix of the content
    /// hash. Absent from older agents; older collectors ignore it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<AttrValue>,
}

/// One attribute's old (baseline) and new (on the box) value, e.g. `mode` `0644` → `0666`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct AttrValue {
    /// `mode` (octal), `uid`, `gid`, `size` (bytes), `type`, `target`, `content` (the first
    /// [`drift::SHORT_HASH`] hex digits of the content hash).
    pub attr: String,
    pub old: String,
    pub new: String,
}

/// The outcome of one local check this interval.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckResult {
    pub name: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    #[serde(default)]
    pub duration_ms: u64,
}

/// The collector's answer to an accepted report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Ack {
    pub accepted: u64,
    #[serde(default)]
    pub duplicate: bool,
    /// Lines InfluxDB refused for good (logged at the collector); never retried.
    #[serde(default)]
    pub rejected_points: u64,
    /// The collector's drift record for this instance is missing or differs from the
    /// report's [`Report::drift_root`]: the agent should send its full drift state (changes
    /// and entry list, as in a normal drift report) at once.
    #[serde(default)]
    pub resend_drift: bool,
    /// A reader asked for diagnostics: the agent runs the named probe set (once per id) and
    /// posts the snapshot to `POST /v1/diagnostics`. Sent in every ack until answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnostics: Option<diag::Handed>,
}

/// Limits a collector applies while decoding; every one has a reason in [`DecodeError`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_decompressed: usize,
    pub max_points: usize,
    pub max_tags: usize,
    pub max_fields: usize,
    pub max_string: usize,
    pub max_checks: usize,
    pub max_drift_entries: usize,
    /// How far before the collector's clock a point, line or drift timestamp may lie: a
    /// spooled batch from a long outage still fits, a time decades off does not.
    pub max_age: std::time::Duration,
    /// How far after the collector's clock a timestamp (or `boot_time`) may lie: agents'
    /// clocks run a little ahead, never by hours.
    pub max_ahead: std::time::Duration,
    /// The collector's clock in Unix ns; `None` reads the system clock at each decode.
    /// Tests pin it so a fixed corpus keeps decoding.
    pub now_ns: Option<i64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_decompressed: 64 << 20,
            max_points: 100_000,
            max_tags: 32,
            max_fields: 256,
            max_string: 64 << 10,
            max_checks: 256,
            max_drift_entries: 1_000_000,
            max_age: std::time::Duration::from_secs(7 * 86_400),
            max_ahead: std::time::Duration::from_secs(600),
            now_ns: None,
        }
    }
}

impl Limits {
    /// These limits with the time window opened to (nearly) all of i64: for tools and tests
    /// that read spooled or synthetic reports rather than judge them against a clock.
    pub fn any_time(self) -> Limits {
        Limits {
            max_age: std::time::Duration::MAX,
            max_ahead: std::time::Duration::MAX,
            now_ns: Some(0),
            ..self
        }
    }
}

/// Why a report was refused. `TooLarge` maps to 413, everything else to 400.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("body is not valid gzip: {0} (send the JSON report gzip-compressed, Content-Encoding: gzip)")]
    Gzip(std::io::Error),
    #[error("decompressed body exceeds {0} bytes")]
    TooLarge(usize),
    #[error("report is not valid JSON for wire format v{VERSION}: {0}")]
    Json(serde_json::Error),
    #[error("unsupported wire format version {0}; this collector speaks v{VERSION}: upgrade the collector or pin the agent")]
    Version(u32),
    #[error("{0}")]
    Invalid(String),
}

impl DecodeError {
    pub fn is_too_large(&self) -> bool {
        matches!(self, DecodeError::TooLarge(_))
    }
}

/// Serialise and gzip a report, streaming: the JSON is never held whole, which for a drift
/// report's full entry list is the largest buffer an idle agent would otherwise allocate.
pub fn encode<L: Serialize>(report: &Report<L>) -> Vec<u8> {
    let enc = flate2::write::GzEncoder::new(Vec::with_capacity(4096), flate2::Compression::fast());
    // serde_json writes token by token; the buffer hands the compressor whole blocks.
    let mut w = std::io::BufWriter::with_capacity(16 << 10, enc);
    serde_json::to_writer(&mut w, report).expect("a report always serialises");
    w.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|e| e.finish())
        .expect("writing to a Vec cannot fail")
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 4 + 64),
        flate2::Compression::fast(),
    );
    enc.write_all(data).expect("writing to a Vec cannot fail");
    enc.finish().expect("writing to a Vec cannot fail")
}

/// Decompress (bounded), parse and validate a report.
pub fn decode(body: &[u8], gzipped: bool, limits: &Limits) -> Result<Report, DecodeError> {
    let json: std::borrow::Cow<'_, [u8]> = if gzipped {
        gunzip::gunzip_reusing(body, limits.max_decompressed)?.into()
    } else {
        if body.len() > limits.max_decompressed {
            return Err(DecodeError::TooLarge(limits.max_decompressed));
        }
        body.into()
    };
    // One UTF-8 check of the whole body, a word at a time over ASCII, rather than one per
    // string in serde_json's slice reader: its str reader takes the strings as they are
    // (callgrind: 4 % of a 40-point report).
    let text = std::str::from_utf8(&json).map_err(|e| {
        DecodeError::Invalid(format!("report is not UTF-8 text ({e}); send UTF-8 JSON"))
    })?;
    // One parse in the common case; only a report that does not parse is read again for its
    // version, so a v2 report gets "unsupported version", not a field error.
    let report: Report = match serde_json::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            #[derive(Deserialize)]
            struct V {
                v: Option<u32>,
            }
            return Err(match serde_json::from_str::<V>(text) {
                Ok(V { v: Some(v) }) if v != VERSION => DecodeError::Version(v),
                Ok(V { v: None }) => {
                    DecodeError::Invalid("missing \"v\" (wire format version)".into())
                }
                _ => DecodeError::Json(e),
            });
        }
    };
    if report.v != VERSION {
        return Err(DecodeError::Version(report.v));
    }
    validate(&report, limits).map_err(DecodeError::Invalid)?;
    let now = limits.now_ns.unwrap_or_else(bounds::now_ns);
    bounds::check_numbers(&report, now, limits).map_err(DecodeError::Invalid)?;
    Ok(report)
}

/// Instance, image and group ids: what cloud providers use, nothing that needs escaping.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/'))
}

/// Measurement, tag key and field key names an agent may use.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| NAME_BYTE[usize::from(b)])
        && !s.starts_with('_')
}

/// The bytes of [`valid_name`]: A-Z a-z 0-9 _. A table load a byte, where the test it stands
/// for cost several compares (callgrind: 3 % of a 40-point report, ~300 names in each).
static NAME_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = (b as u8).is_ascii_alphanumeric() || b == b'_' as usize;
        b += 1;
    }
    t
};

/// Measurements the collector writes itself from what it judged or did. An agent that could
/// send them could forge a drift verdict, a health state or an audit record.
pub const COLLECTOR_MEASUREMENTS: [&str; 6] = [
    "log",
    "phoenix_audit",
    "phoenix_check",
    "phoenix_collector",
    "phoenix_drift",
    "phoenix_instance",
];

fn validate(r: &Report, l: &Limits) -> Result<(), String> {
    let a = &r.agent;
    for (what, v) in [("instance_id", &a.instance_id), ("image_id", &a.image_id)] {
        if !valid_id(v) {
            return Err(format!(
                "agent.{what} {v:?} is not a valid id (1-128 chars of A-Z a-z 0-9 - _ . : /)"
            ));
        }
    }
    if let Some(g) = &a.group {
        if !valid_id(g) {
            return Err(format!(
                "agent.group {g:?} is not a valid id (1-128 chars of A-Z a-z 0-9 - _ . : /)"
            ));
        }
    }
    for (what, v) in [
        ("hostname", &a.hostname),
        ("boot_id", &a.boot_id),
        ("version", &a.version),
    ] {
        if v.len() > 256 || v.chars().any(char::is_control) {
            return Err(format!(
                "agent.{what} is longer than 256 bytes or holds control characters"
            ));
        }
    }
    if r.metrics.len() + r.logs.len() > l.max_points {
        return Err(format!(
            "{} points and lines in one report; the limit is {}",
            r.metrics.len() + r.logs.len(),
            l.max_points
        ));
    }
    for (i, p) in r.metrics.iter().enumerate() {
        if !valid_name(&p.m) {
            return Err(format!(
                "metrics[{i}]: measurement {:?} must be 1-64 chars of A-Z a-z 0-9 _",
                p.m
            ));
        }
        if COLLECTOR_MEASUREMENTS.contains(&p.m.as_str()) {
            return Err(format!("metrics[{i}]: measurement {:?} is written by the collector itself; agents may not send it", p.m));
        }
        if p.tags.len() > l.max_tags {
            return Err(format!(
                "metrics[{i}]: {} tags; the limit is {}",
                p.tags.len(),
                l.max_tags
            ));
        }
        if p.fields.is_empty() || p.fields.len() > l.max_fields {
            return Err(format!(
                "metrics[{i}]: {} fields; a point needs 1 to {}",
                p.fields.len(),
                l.max_fields
            ));
        }
        check_tags(&p.tags, l).map_err(|e| format!("metrics[{i}]: {e}"))?;
        check_fields(&p.fields, l).map_err(|e| format!("metrics[{i}]: {e}"))?;
    }
    for (i, line) in r.logs.iter().enumerate() {
        if line.src.is_empty() || line.src.len() > 1024 {
            return Err(format!("logs[{i}]: src must be 1-1024 bytes"));
        }
        if line.msg.len() > l.max_string.max(MAX_FIELD_STRING) * 2 {
            return Err(format!(
                "logs[{i}]: message of {} bytes; split lines over {} bytes",
                line.msg.len(),
                MAX_FIELD_STRING
            ));
        }
        if line.tags.len() > 8 || line.fields.len() > 16 {
            return Err(format!("logs[{i}]: too many tags or fields"));
        }
        check_tags(&line.tags, l).map_err(|e| format!("logs[{i}]: {e}"))?;
        check_fields(&line.fields, l).map_err(|e| format!("logs[{i}]: {e}"))?;
    }
    if r.checks.len() > l.max_checks {
        return Err(format!(
            "{} checks; the limit is {}",
            r.checks.len(),
            l.max_checks
        ));
    }
    for c in &r.checks {
        if !valid_id(&c.name) || c.name.len() > 64 {
            return Err(format!(
                "check name {:?} must be 1-64 chars of A-Z a-z 0-9 - _ . : /",
                c.name
            ));
        }
        if c.detail.len() > 4096 {
            return Err(format!("check {}: detail over 4096 bytes", c.name));
        }
    }
    if let Some(d) = &r.drift {
        if d.hash.len() > 128 || d.changes.len() > l.max_drift_entries {
            return Err("drift: hash or change list too long".into());
        }
        if d.entries_list.as_ref().map_or(0, Vec::len) > l.max_drift_entries {
            return Err(format!("drift: more than {} entries", l.max_drift_entries));
        }
        // One value per attribute at most; a value is a mode, an id, a size, a type, a short
        // hash or a link target (a path).
        if let Some(c) = d.changes.iter().find(|c| {
            c.values.len() > drift::MAX_VALUES
                || c.values
                    .iter()
                    .any(|v| v.attr.len() > 16 || v.old.len().max(v.new.len()) > 4096)
        }) {
            return Err(format!(
                "drift: change of {:?} has more than {} values, or a value over 4096 bytes",
                cut_to(&c.path, 256),
                drift::MAX_VALUES
            ));
        }
    }
    Ok(())
}

fn check_tags(tags: &Map<String>, l: &Limits) -> Result<(), String> {
    for (k, v) in tags {
        if !valid_name(k) || k == "time" {
            return Err(format!(
                "tag key {k:?} must be 1-64 chars of A-Z a-z 0-9 _ (and not time)"
            ));
        }
        if v.is_empty() || v.len() > 1024.min(l.max_string) {
            return Err(format!("tag {k}: value must be 1-1024 bytes"));
        }
    }
    Ok(())
}

fn check_fields(fields: &Map<Value>, l: &Limits) -> Result<(), String> {
    for (k, v) in fields {
        if !valid_name(k) || k == "time" {
            return Err(format!(
                "field key {k:?} must be 1-64 chars of A-Z a-z 0-9 _ (and not time)"
            ));
        }
        match v {
            Value::Str(s) if s.len() > l.max_string => {
                return Err(format!(
                    "field {k}: string of {} bytes; the limit is {}",
                    s.len(),
                    l.max_string
                ))
            }
            Value::Float(f) if !f.is_finite() => {
                return Err(format!("field {k}: not a finite number"))
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        let mut fields = Map::new();
        fields.insert("usage_idle".to_string(), Value::Float(97.5));
        fields.insert("n".to_string(), Value::Int(3));
        Report {
            v: VERSION,
            agent: Identity {
                instance_id: "i-0abc".into(),
                image_id: "ami-1".into(),
                group: Some("web".into()),
                hostname: "web-1".into(),
                boot_id: "b".into(),
                version: "0.1.0".into(),
                boot_time: 1_700_000_000,
            },
            seq: 7,
            interval_ms: 10_000,
            metrics: vec![Point {
                m: "cpu".into(),
                tags: [("cpu".to_string(), "cpu-total".to_string())].into(),
                fields,
                ts: bounds::now_ns(),
            }],
            logs: vec![],
            drift: None,
            checks: vec![],
            drift_root: None,
            protected: None,
        }
    }

    #[test]
    fn names_take_exactly_ascii_letters_digits_and_underscore() {
        for b in 0..=255u8 {
            let want = b.is_ascii_alphanumeric() || b == b'_';
            assert_eq!(NAME_BYTE[usize::from(b)], want, "byte {b:#04x}");
            // Every byte of every position, not only the first (which may not be `_`).
            let s = String::from_utf8_lossy(&[b'a', b, b'z']).into_owned();
            assert_eq!(valid_name(&s), want, "{s:?}");
        }
        assert!(!valid_name("_x") && !valid_name("") && !valid_name(&"a".repeat(65)));
        assert!(valid_name(&"a".repeat(64)));
    }

    #[test]
    fn round_trip_keeps_int_and_float_apart() {
        let mut r = sample();
        r.metrics[0]
            .fields
            .insert("whole_float".into(), Value::Float(5.0));
        let back = decode(&encode(&r), true, &Limits::default()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.metrics[0].fields["whole_float"], Value::Float(5.0));
        assert_eq!(back.metrics[0].fields["n"], Value::Int(3));
    }

    #[test]
    fn field_values_are_read_as_the_untagged_enum_read_them() {
        let read = |j: &str| serde_json::from_str::<Value>(j).ok();
        assert_eq!(read("5"), Some(Value::Int(5)));
        assert_eq!(read("-5"), Some(Value::Int(-5)));
        assert_eq!(read("5.0"), Some(Value::Float(5.0)));
        assert_eq!(read("1e3"), Some(Value::Float(1000.0)));
        assert_eq!(
            read("18446744073709551615"),
            Some(Value::Float(u64::MAX as f64))
        );
        assert_eq!(read("true"), Some(Value::Bool(true)));
        assert_eq!(read("\"x\\\"y\""), Some(Value::Str("x\"y".into())));
        for bad in ["null", "[1]", "{\"a\":1}"] {
            assert_eq!(read(bad), None, "{bad}");
        }
    }

    #[test]
    fn unknown_version_is_named() {
        let json = serde_json::to_vec(&serde_json::json!({"v": 2, "anything": true})).unwrap();
        let e = decode(&json, false, &Limits::default()).unwrap_err();
        assert!(matches!(e, DecodeError::Version(2)), "{e}");
        assert!(e.to_string().contains("version 2"));
    }

    #[test]
    fn gzip_bomb_is_too_large_not_oom() {
        let zeros = vec![0u8; 8 << 20];
        let bomb = gzip(&zeros);
        assert!(bomb.len() < 64 << 10);
        let e = decode(
            &bomb,
            true,
            &Limits {
                max_decompressed: 1 << 20,
                ..Limits::default()
            },
        )
        .unwrap_err();
        assert!(e.is_too_large());
    }

    #[test]
    fn bad_ids_and_names_are_refused() {
        let mut r = sample();
        r.agent.instance_id = "i-1 evil=1".into();
        assert!(decode(&encode(&r), true, &Limits::default())
            .unwrap_err()
            .to_string()
            .contains("instance_id"));
        let mut r = sample();
        r.metrics[0].m = "cpu,evil=1".into();
        assert!(decode(&encode(&r), true, &Limits::default()).is_err());
        let mut r = sample();
        r.metrics[0].tags = (0..40)
            .map(|i| (format!("t{i}"), "v".to_string()))
            .collect();
        assert!(decode(&encode(&r), true, &Limits::default())
            .unwrap_err()
            .to_string()
            .contains("40 tags"));
    }

    #[test]
    fn invalid_utf8_is_refused_wherever_it_is() {
        let json = serde_json::to_vec(&sample()).unwrap();
        // Inside a string (the measurement "cpu" becomes "c\xffu"), and between tokens.
        let mut inside = json.clone();
        let at = json.windows(5).position(|w| w == b"\"cpu\"").unwrap();
        inside[at + 2] = 0xff;
        let mut between = json.clone();
        between.insert(1, 0xc3);
        for body in [inside, between] {
            for gz in [false, true] {
                let b = if gz { gzip(&body) } else { body.clone() };
                let e = decode(&b, gz, &Limits::default()).unwrap_err();
                assert!(e.to_string().contains("UTF-8"), "{e}");
            }
        }
    }

    #[test]
    fn not_gzip_is_a_clear_error() {
        let e = decode(b"{\"v\":1}", true, &Limits::default()).unwrap_err();
        assert!(e.to_string().contains("gzip"));
    }
}

/// Durations as people write them in flags and config: `500ms`, `10s`, `2m`, `1h`, `7d`, or
/// bare seconds. Shared so both programs accept exactly the same spellings.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: write e.g. 500ms, 10s, 2m, 1h or 7d"))?;
    let secs = match unit.trim() {
        "" | "s" | "sec" | "secs" => n,
        "ms" => n / 1000.0,
        "m" | "min" | "mins" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        u => return Err(format!("{s:?}: unknown unit {u:?}; use ms, s, m, h or d")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// Sizes as people write them: `64MiB`, `500KB`, `1G`, or plain bytes. Shared with
/// [`parse_duration`] so both programs accept the same spellings.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a size: write e.g. 64MiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        u => {
            return Err(format!(
                "{s:?}: unknown size unit {u:?}; use KiB, MiB or GiB"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod duration_tests {
    #[test]
    fn spellings() {
        use std::time::Duration;
        assert_eq!(
            super::parse_duration("10s").unwrap(),
            Duration::from_secs(10)
        );
        assert_eq!(
            super::parse_duration("2m").unwrap(),
            Duration::from_secs(120)
        );
        assert_eq!(
            super::parse_duration("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(
            super::parse_duration("300").unwrap(),
            Duration::from_secs(300)
        );
        assert!(super::parse_duration("ten").is_err());
        assert!(super::parse_duration("5y").is_err());
    }
}
