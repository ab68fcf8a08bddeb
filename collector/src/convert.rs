//! A report's points, log lines and check results as line protocol. Identity tags come from
//! the report's (validated) identity, never from a point's own tags, so an agent cannot write
//! points as another instance.

use phoenix_wire::{logtext, Report, Value};

use crate::lineproto::{PointWriter, Tag, Writer};

const IDENTITY: [&str; 4] = ["group", "host", "image_id", "instance_id"];

/// One tag of a line, for sorting a line's tags by key: the point's own, or one of the tags
/// escaped once for the whole report (its identity, a log line's path).
#[derive(Clone, Copy)]
enum LineTag<'a> {
    Own(&'a str, &'a str),
    /// `IDENTITY[i]`.
    Ident(usize),
    Path,
}

impl LineTag<'_> {
    fn key(&self) -> &str {
        match *self {
            LineTag::Own(k, _) => k,
            LineTag::Ident(i) => IDENTITY[i],
            LineTag::Path => "path",
        }
    }
}

/// Writes `tags` (sorted) from the point's own text, `ident` and `path`.
fn write_tags<'w>(
    mut pw: PointWriter<'w>,
    tags: &[LineTag<'_>],
    ident: &[Tag; 4],
    path: Option<&Tag>,
) -> PointWriter<'w> {
    for t in tags {
        pw = match *t {
            LineTag::Own(k, v) => pw.tag(k, v),
            LineTag::Ident(i) => pw.tag_escaped(&ident[i]),
            LineTag::Path => match path {
                Some(p) => pw.tag_escaped(p),
                None => pw,
            },
        };
    }
    pw
}

pub fn report_lines(r: &Report, out: &mut Writer) {
    let a = &r.agent;
    let ident: [Tag; 4] = [
        Tag::new(IDENTITY[0], a.group_or_image()),
        Tag::new(IDENTITY[1], &a.hostname),
        Tag::new(IDENTITY[2], &a.image_id),
        Tag::new(IDENTITY[3], &a.instance_id),
    ];
    let idents = (0..IDENTITY.len()).map(LineTag::Ident);
    let mut tags: Vec<LineTag> = Vec::with_capacity(12);
    for p in &r.metrics {
        tags.clear();
        tags.extend(
            p.tags
                .iter()
                .filter(|(k, _)| !IDENTITY.contains(&k.as_str()))
                .map(|(k, v)| LineTag::Own(k, v)),
        );
        tags.extend(idents.clone());
        tags.sort_unstable_by(|x, y| x.key().cmp(y.key()));
        let mut pw = write_tags(out.point(&p.m), &tags, &ident, None);
        for (k, v) in &p.fields {
            pw = pw.field(k, v);
        }
        pw.end(p.ts);
    }
    // A batch's lines mostly come from one file: its path is escaped again only when the
    // source changes.
    let mut path: Option<(&str, Tag)> = None;
    for l in &r.logs {
        tags.clear();
        tags.extend(
            l.tags
                .iter()
                .filter(|(k, _)| !IDENTITY.contains(&k.as_str()) && k.as_str() != "path")
                .map(|(k, v)| LineTag::Own(k, v)),
        );
        if l.src != "journal" {
            if path.as_ref().is_none_or(|(src, _)| *src != l.src) {
                path = Some((&l.src, Tag::new("path", &l.src)));
            }
            tags.push(LineTag::Path);
        }
        if !l.tags.contains_key("level") {
            if let Some(level) = logtext::detect_level(&l.msg) {
                tags.push(LineTag::Own("level", level));
            }
        }
        tags.extend(idents.clone());
        tags.sort_unstable_by(|x, y| x.key().cmp(y.key()));
        let mut pw = write_tags(out.point("log"), &tags, &ident, path.as_ref().map(|p| &p.1));
        pw = pw
            .str_field("message", &l.msg)
            .field("offset", &Value::Int(l.offset.min(i64::MAX as u64) as i64));
        if l.escaped {
            pw = pw.field("escaped", &Value::Bool(true));
        }
        if let Some(part) = l.part {
            pw = pw.field("part", &Value::Int(part as i64));
        }
        for (k, v) in &l.fields {
            if !matches!(k.as_str(), "message" | "offset" | "escaped" | "part") {
                pw = pw.field(k, v);
            }
        }
        pw.end(l.ts);
    }
    let ts = r
        .metrics
        .first()
        .map(|p| p.ts)
        .or_else(|| r.logs.first().map(|l| l.ts))
        .unwrap_or_else(now_ns);
    for c in &r.checks {
        let mut pw = out.point("phoenix_check").tag("check", &c.name);
        for t in &ident {
            pw = pw.tag_escaped(t);
        }
        pw.field("ok", &Value::Bool(c.ok))
            .field("duration_ms", &Value::Int(c.duration_ms as i64))
            .str_field("detail", &c.detail)
            .end(ts);
    }
}

/// `phoenix_drift`: the instance's hash, the one expected, and what changed.
pub fn drift_line(a: &phoenix_wire::Identity, d: &crate::fleet::DriftInfo, out: &mut Writer) {
    let mut files = String::new();
    for c in &d.changes {
        if files.len() > 4000 {
            files.push_str(&format!(" … ({} in all)", d.changes.len()));
            break;
        }
        if !files.is_empty() {
            files.push_str(", ");
        }
        files.push_str(&c.path);
        if c.attrs.is_empty() {
            files.push_str(&format!(" ({})", c.change));
        } else {
            files.push_str(&format!(" ({})", c.attrs.join("+")));
        }
    }
    let expected = d.expected.clone().unwrap_or_default();
    let mut pw = out.point("phoenix_drift");
    for (k, v) in [
        ("group", a.group_or_image()),
        ("host", &a.hostname),
        ("image_id", &a.image_id),
        ("instance_id", &a.instance_id),
    ] {
        pw = pw.tag(k, v);
    }
    pw.str_field("hash", &d.hash)
        .str_field("expected", &expected)
        .str_field("baseline", &expected)
        .field("drifted", &Value::Bool(d.drifted))
        .str_field("changed_files", &files)
        .field("changed_count", &Value::Int(d.changes.len() as i64))
        .str_field("source", d.source.as_deref().unwrap_or("none"))
        .end(if d.ts > 0 { d.ts } else { now_ns() });
}

pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use phoenix_wire::{Identity, LogLine, Point, VERSION};

    #[test]
    fn identity_tags_cannot_be_forged() {
        let r = Report {
            v: VERSION,
            agent: Identity {
                instance_id: "i-1".into(),
                image_id: "img".into(),
                group: Some("web".into()),
                hostname: "h".into(),
                ..Default::default()
            },
            seq: 1,
            interval_ms: 0,
            metrics: vec![Point {
                m: "cpu".into(),
                tags: [
                    ("instance_id".to_string(), "i-other".to_string()),
                    ("cpu".to_string(), "cpu0".to_string()),
                ]
                .into(),
                fields: [("usage_idle".to_string(), Value::Float(1.5))].into(),
                ts: 7,
            }],
            logs: vec![LogLine {
                src: "/var/log/app.log".into(),
                ts: 8,
                offset: 3,
                msg: "ERROR x\"\nevil,host=a v=1".into(),
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
        let mut w = Writer::default();
        report_lines(&r, &mut w);
        let mut lines = w.iter();
        assert_eq!(
            lines.next().unwrap(),
            "cpu,cpu=cpu0,group=web,host=h,image_id=img,instance_id=i-1 usage_idle=1.5 7"
        );
        assert_eq!(lines.next().unwrap(), "log,group=web,host=h,image_id=img,instance_id=i-1,level=error,path=/var/log/app.log message=\"ERROR x\\\"\nevil,host=a v=1\",offset=3i 8");
        assert_eq!(w.lines, 2);
    }

    #[test]
    fn each_log_line_keeps_its_own_path_when_sources_alternate() {
        let line = |src: &str, ts| LogLine {
            src: src.into(),
            ts,
            offset: 0,
            msg: "m".into(),
            escaped: false,
            part: None,
            tags: Default::default(),
            fields: Default::default(),
        };
        let mut r = Report::new(Identity {
            instance_id: "i-1".into(),
            image_id: "img".into(),
            hostname: "h".into(),
            ..Default::default()
        });
        r.logs = vec![
            line("/a", 1),
            line("/a", 2),
            line("/c", 3),
            line("journal", 4),
            line("/c", 5),
            line("/a", 6),
            line("/x y", 7),
        ];
        let mut w = Writer::default();
        report_lines(&r, &mut w);
        let paths: Vec<Option<&str>> = w
            .iter()
            .map(|l| {
                let tags = l.split(' ').next().unwrap_or("");
                let at = tags.find(",path=")?;
                Some(tags[at + 6..].split(',').next().unwrap_or(""))
            })
            .collect();
        let want = [
            Some("/a"),
            Some("/a"),
            Some("/c"),
            None,
            Some("/c"),
            Some("/a"),
        ];
        assert_eq!(paths[..6], want);
        // A path with a space keeps it, escaped, inside the tag value.
        assert!(w.iter().nth(6).unwrap().contains(",path=/x\\ y message="));
    }
}
