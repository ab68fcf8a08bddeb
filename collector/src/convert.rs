//! A report's points, log lines and check results as line protocol. Identity tags come from
//! the report's (validated) identity, never from a point's own tags, so an agent cannot write
//! points as another instance.

use phoenix_wire::{logtext, Report, Value};

use crate::lineproto::Writer;

const IDENTITY: [&str; 4] = ["group", "host", "image_id", "instance_id"];

pub fn report_lines(r: &Report, out: &mut Writer) {
    let a = &r.agent;
    let ident: [(&str, &str); 4] = [
        ("group", a.group_or_image()),
        ("host", &a.hostname),
        ("image_id", &a.image_id),
        ("instance_id", &a.instance_id),
    ];
    let mut tags: Vec<(&str, &str)> = Vec::with_capacity(12);
    for p in &r.metrics {
        tags.clear();
        tags.extend(
            p.tags
                .iter()
                .filter(|(k, _)| !IDENTITY.contains(&k.as_str()))
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        tags.extend(ident.iter().copied());
        tags.sort_unstable_by_key(|t| t.0);
        let mut pw = out.point(&p.m);
        for (k, v) in &tags {
            pw = pw.tag(k, v);
        }
        for (k, v) in &p.fields {
            pw = pw.field(k, v);
        }
        pw.end(p.ts);
    }
    for l in &r.logs {
        tags.clear();
        tags.extend(
            l.tags
                .iter()
                .filter(|(k, _)| !IDENTITY.contains(&k.as_str()) && k.as_str() != "path")
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        if l.src != "journal" {
            tags.push(("path", &l.src));
        }
        let detected;
        if !l.tags.contains_key("level") {
            if let Some(level) = logtext::detect_level(&l.msg) {
                detected = level;
                tags.push(("level", detected));
            }
        }
        tags.extend(ident.iter().copied());
        tags.sort_unstable_by_key(|t| t.0);
        let mut pw = out.point("log");
        for (k, v) in &tags {
            pw = pw.tag(k, v);
        }
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
        for (k, v) in ident {
            pw = pw.tag(k, v);
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
}
