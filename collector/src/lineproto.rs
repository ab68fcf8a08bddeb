//! InfluxDB line protocol, written with InfluxDB's escaping rules so that no input can end a
//! line early, add a tag or field, or start a new point.
//!
//! Rules (as InfluxDB parses them):
//! - measurement: `,` and space are escaped with `\`;
//! - tag keys, tag values, field keys: `,`, `=` and space are escaped with `\`;
//! - string field values: `"` and `\` are escaped with `\`; anything else, a newline
//!   included, is taken literally inside the quotes;
//! - names and tag values cannot hold a newline at all, and InfluxDB reads a backslash before
//!   `,`, `=`, space (or at the very end) as an escape, with no way to write a literal one
//!   there (1.x keeps `\\` as two characters). So newlines, carriage returns and tabs in them
//!   are written as an escaped space, and such a backslash as `/`. Reports are validated before they
//!   get here, so this only ever applies to text an agent took from the box (file paths, unit
//!   names); everywhere else a backslash is written as it is, which InfluxDB keeps.
//!
//! Lines are separated by `\n`, but a string field may hold a newline too, so the writer
//! records where each line ends rather than leaving readers to split on newlines.

use phoenix_wire::Value;

/// Appends points to one newline-separated body.
#[derive(Debug, Default)]
pub struct Writer {
    pub buf: String,
    pub lines: usize,
    /// Offset just past each line's terminating newline.
    pub ends: Vec<usize>,
}

/// The lines of `body`, given the offset just past each one's newline (as [`Writer::ends`]);
/// splitting on newlines instead would cut string fields that hold one.
pub fn lines<'a>(body: &'a str, ends: &'a [usize]) -> impl Iterator<Item = &'a str> {
    let mut start = 0;
    ends.iter().map(move |&e| {
        let l = &body[start..e - 1];
        start = e;
        l
    })
}

/// A tag escaped once, for the many lines that carry it: a report's identity tags go on
/// each of its points, and a log batch's path on each of its lines (escaping them again for
/// every line was about half of the escaper's calls, 3 % of a 40-point report).
#[derive(Debug, Clone, PartialEq)]
pub struct Tag {
    /// `,key=value`, escaped; empty for a tag that is not written (an empty key or value).
    text: String,
}

impl Tag {
    pub fn new(key: &str, value: &str) -> Tag {
        let mut text = String::new();
        if !key.is_empty() && !value.is_empty() {
            text.reserve(key.len() + value.len() + 2);
            text.push(',');
            escape_into(&mut text, key, KEY);
            text.push('=');
            escape_into(&mut text, value, KEY);
        }
        Tag { text }
    }
}

/// One point being written; finish with [`PointWriter::end`].
#[derive(Debug)]
pub struct PointWriter<'a> {
    w: &'a mut Writer,
    start: usize,
    fields: usize,
}

impl Writer {
    pub fn with_capacity(n: usize) -> Writer {
        Writer {
            buf: String::with_capacity(n),
            lines: 0,
            ends: Vec::new(),
        }
    }

    /// Each line, without its newline.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        lines(&self.buf, &self.ends)
    }

    pub fn point(&mut self, measurement: &str) -> PointWriter<'_> {
        let start = self.buf.len();
        escape_into(&mut self.buf, measurement, MEASUREMENT);
        PointWriter {
            w: self,
            start,
            fields: 0,
        }
    }
}

impl PointWriter<'_> {
    /// Tags must be given sorted by key (InfluxDB's preferred order) and before any field.
    pub fn tag(self, key: &str, value: &str) -> Self {
        if key.is_empty() || value.is_empty() {
            return self; // InfluxDB refuses empty tag keys and values; an absent tag is the same
        }
        debug_assert_eq!(self.fields, 0, "tags go before fields");
        self.w.buf.push(',');
        escape_into(&mut self.w.buf, key, KEY);
        self.w.buf.push('=');
        escape_into(&mut self.w.buf, value, KEY);
        self
    }

    /// A tag escaped beforehand; the same place in the line as [`PointWriter::tag`].
    pub fn tag_escaped(self, tag: &Tag) -> Self {
        debug_assert_eq!(self.fields, 0, "tags go before fields");
        self.w.buf.push_str(&tag.text);
        self
    }

    pub fn field(mut self, key: &str, value: &Value) -> Self {
        if let Value::Float(f) = value {
            if !f.is_finite() {
                return self; // NaN and inf have no line-protocol spelling
            }
        }
        self.key(key);
        let b = &mut self.w.buf;
        match value {
            Value::Int(i) => {
                // itoa: the same digits as `{i}`, without the formatting machinery.
                b.push_str(itoa::Buffer::new().format(*i));
                b.push('i');
            }
            Value::Float(f) => {
                // ryu: the shortest text that reads back as the same f64, like `{f:?}`, at a
                // fraction of core::fmt's cost (float fields were a twentieth of a report's
                // instructions). Whole numbers keep their `.0`, large and tiny ones take an
                // exponent (`1e21`); InfluxDB reads both as floats.
                b.push_str(ryu::Buffer::new().format_finite(*f));
            }
            Value::Bool(v) => b.push_str(if *v { "true" } else { "false" }),
            Value::Str(s) => quote_into(b, s),
        }
        self
    }

    /// A string field, written from the borrowed text (no copy of it is made first).
    pub fn str_field(mut self, key: &str, value: &str) -> Self {
        self.key(key);
        quote_into(&mut self.w.buf, value);
        self
    }

    /// The separator before a field and its escaped key with `=`.
    fn key(&mut self, key: &str) {
        self.w.buf.push(if self.fields == 0 { ' ' } else { ',' });
        self.fields += 1;
        escape_into(&mut self.w.buf, key, KEY);
        self.w.buf.push('=');
    }

    /// Ends the line with its timestamp (ns). A point without fields is dropped: InfluxDB
    /// refuses it and it would take its whole batch down with a 400.
    pub fn end(self, ts: i64) -> bool {
        if self.fields == 0 {
            self.w.buf.truncate(self.start);
            return false;
        }
        self.w.buf.push(' ');
        self.w.buf.push_str(itoa::Buffer::new().format(ts));
        self.w.buf.push('\n');
        self.w.lines += 1;
        self.w.ends.push(self.w.buf.len());
        true
    }
}

/// What is escaped in a measurement name.
const MEASUREMENT: &[u8] = b", ";
/// What is escaped in tag keys, tag values and field keys.
const KEY: &[u8] = b",= ";

/// Every byte `escape_into` may change, whichever set of specials it is given.
static MAY_ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    let may = b"\n\r\t\\,= ";
    while i < may.len() {
        t[may[i] as usize] = true;
        i += 1;
    }
    t
};

/// Append `s` escaped for a name or tag value: runs of ordinary bytes are copied whole. Every
/// byte looked at is ASCII, so each cut falls on a char boundary.
fn escape_into(out: &mut String, s: &str, special: &[u8]) {
    let b = s.as_bytes();
    let mut from = 0;
    for (i, &c) in b.iter().enumerate() {
        // Most bytes of most names need nothing: one table load passes them, where the match
        // below costs several compares a byte (callgrind: 0.7 % of a steady report).
        if !MAY_ESCAPE[usize::from(c)] {
            continue;
        }
        let with: &str = match c {
            // As an escaped space: a bare one would end the tag set and shift the rest of the
            // line into the fields (found by tests/fuzz_report_lines.rs).
            b'\n' | b'\r' | b'\t' => "\\ ",
            b'\\'
                if b.get(i + 1)
                    .is_none_or(|n| special.contains(n) || matches!(n, b'\n' | b'\r' | b'\t')) =>
            {
                "/"
            }
            b',' if special.contains(&c) => "\\,",
            b'=' if special.contains(&c) => "\\=",
            b' ' if special.contains(&c) => "\\ ",
            _ => continue,
        };
        out.push_str(&s[from..i]);
        out.push_str(with);
        from = i + 1;
    }
    out.push_str(&s[from..]);
}

/// Append `s` as a quoted string field value: `"` and `\` get a backslash, nothing else
/// changes (a newline included).
fn quote_into(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    let mut from = 0;
    for (i, &c) in s.as_bytes().iter().enumerate() {
        if c == b'"' || c == b'\\' {
            out.push_str(&s[from..i]);
            out.push('\\');
            from = i;
        }
    }
    out.push_str(&s[from..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use influxdb_line_protocol::{parse_lines, FieldValue};
    use proptest::prelude::*;

    #[test]
    fn known_lines() {
        let mut w = Writer::default();
        w.point("cpu")
            .tag("cpu", "cpu-total")
            .tag("host", "web 1,x=y")
            .field("usage_idle", &Value::Float(5.0))
            .field("n", &Value::Int(3))
            .end(1);
        w.point("log")
            .tag("path", "/var/log/a b.log")
            .str_field("message", "he said \"hi\", C:\\temp\\ end\\")
            .end(2);
        assert_eq!(
            w.buf,
            "cpu,cpu=cpu-total,host=web\\ 1\\,x\\=y usage_idle=5.0,n=3i 1\nlog,path=/var/log/a\\ b.log message=\"he said \\\"hi\\\", C:\\\\temp\\\\ end\\\\\" 2\n"
        );
        assert_eq!(w.lines, 2);
    }

    #[test]
    fn every_special_byte_is_in_the_fast_table() {
        // The table only lets bytes skip the match: a special missing from it would be
        // written unescaped.
        for &c in KEY.iter().chain(MEASUREMENT).chain(b"\n\r\t\\") {
            assert!(MAY_ESCAPE[usize::from(c)], "{:?}", char::from(c));
        }
        assert_eq!(MAY_ESCAPE.iter().filter(|&&m| m).count(), 7);
    }

    #[test]
    fn floats_read_back_as_floats() {
        let mut w = Writer::default();
        let v = [3.0, 0.1, 1e21, 2.5e-7, -1e300, 123456789.125];
        let mut p = w.point("m");
        for (i, f) in v.iter().enumerate() {
            p = p.field(&format!("f{i}"), &Value::Float(*f));
        }
        assert!(p.end(1));
        assert!(w.buf.starts_with("m f0=3.0,f1=0.1,f2=1e21,"), "{}", w.buf);
        let l = parse_lines(&w.buf).next().unwrap().unwrap();
        let got: Vec<f64> = l
            .field_set
            .iter()
            .map(|(_, v)| match v {
                FieldValue::F64(f) => *f,
                other => panic!("not a float: {other:?}"),
            })
            .collect();
        assert_eq!(got, v);
    }

    #[test]
    fn backslashes_in_tags() {
        let mut w = Writer::default();
        w.point("m")
            .tag("p", "C:\\temp\\x")
            .tag("q", "a\\ b\\")
            .field("v", &Value::Int(1))
            .end(1);
        assert_eq!(w.buf, "m,p=C:\\temp\\x,q=a/\\ b/ v=1i 1\n");
    }

    #[test]
    fn injection_stays_inside_the_string() {
        let mut w = Writer::default();
        w.point("log")
            .tag("host", "a")
            .str_field("message", "x\"\nevil,host=a v=1 1")
            .end(5);
        let lines: Vec<_> = parse_lines(&w.buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].series.measurement.to_string(), "log");
    }

    #[test]
    fn fieldless_points_are_dropped() {
        let mut w = Writer::default();
        assert!(!w
            .point("cpu")
            .tag("a", "b")
            .field("x", &Value::Float(f64::NAN))
            .end(1));
        assert_eq!(w.buf, "");
        assert_eq!(w.lines, 0);
    }

    proptest! {
        #[test]
        fn str_field_writes_what_a_string_value_writes(key in "[a-z ,=\\\\]{1,8}", text in any::<String>()) {
            let mut a = Writer::default();
            a.point("m").str_field(&key, &text).end(1);
            let mut b = Writer::default();
            b.point("m").field(&key, &Value::Str(text.clone())).end(1);
            prop_assert_eq!(a.buf, b.buf);
        }
    }

    proptest! {
        #[test]
        fn a_tag_escaped_beforehand_writes_what_tag_writes(
            key in "[a-z ,=\\\n]{0,8}",
            value in "[a-z ,=\\\n\té]{0,12}",
        ) {
            let mut a = Writer::default();
            a.point("m").tag(&key, &value).field("v", &Value::Int(1)).end(1);
            let mut b = Writer::default();
            let t = Tag::new(&key, &value);
            b.point("m").tag_escaped(&t).field("v", &Value::Int(1)).end(1);
            prop_assert_eq!(a.buf, b.buf);
        }
    }

    /// The char-by-char escaping this module had before it copied runs of bytes.
    fn escape_reference(s: &str, special: &[char]) -> String {
        let mut out = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\n' | '\r' | '\t' => out.push_str("\\ "),
                '\\' if chars
                    .peek()
                    .is_none_or(|n| special.contains(n) || matches!(n, '\n' | '\r' | '\t')) =>
                {
                    out.push('/')
                }
                c if special.contains(&c) => {
                    out.push('\\');
                    out.push(c);
                }
                c => out.push(c),
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn escaping_matches_the_char_by_char_rules(s in "[a-z ,=\\\\\n\r\té😀\"]{0,24}") {
            for (bytes, chars) in [(MEASUREMENT, &[',', ' '][..]), (KEY, &[',', '=', ' '][..])] {
                let mut got = String::new();
                escape_into(&mut got, &s, bytes);
                prop_assert_eq!(got, escape_reference(&s, chars));
            }
        }
    }

    fn name() -> impl Strategy<Value = String> {
        // Any printable text with separators, but no backslash or newline: those are the
        // documented substitutions, checked against a real InfluxDB in the end-to-end tests.
        "[a-zA-Z0-9 ,=\"'_.:/é😀-]{1,20}"
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn every_input_parses_back_exactly(
            m in name(),
            tags in proptest::collection::btree_map(name(), name(), 0..5),
            key in name().prop_filter("distinct", |k| k != "i_" && k != "f_"),
            sval in any::<String>(),
            ival in any::<i64>(),
            fval in any::<f64>().prop_filter("finite", |f| f.is_finite()),
            ts in any::<i64>(),
        ) {
            let mut w = Writer::default();
            let mut p = w.point(&m);
            for (k, v) in &tags { p = p.tag(k, v); }
            let ok = p.field(&key, &Value::Str(sval.clone())).field("i_", &Value::Int(ival)).field("f_", &Value::Float(fval)).end(ts);
            prop_assert!(ok);
            let parsed: Vec<_> = parse_lines(&w.buf).collect::<Result<_, _>>().map_err(|e| TestCaseError::fail(format!("{e} in {:?}", w.buf)))?;
            prop_assert_eq!(parsed.len(), 1);
            let l = &parsed[0];
            prop_assert_eq!(l.series.measurement.to_string(), m);
            let got: Vec<(String, String)> = l.series.tag_set.as_ref().map(|t| t.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()).unwrap_or_default();
            let want: Vec<(String, String)> = tags.into_iter().collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(l.timestamp, Some(ts));
            let mut saw_string = false;
            for (k, v) in &l.field_set {
                match v {
                    FieldValue::String(s) if *k == key => { prop_assert_eq!(s.to_string(), sval.clone()); saw_string = true; }
                    FieldValue::I64(i) => prop_assert_eq!(*i, ival),
                    FieldValue::F64(f) => prop_assert_eq!(*f, fval),
                    other => prop_assert!(false, "unexpected field {k}={other:?}"),
                }
            }
            prop_assert!(saw_string);
        }
    }
}
