//! The audit trail: every baseline registration, mark, hold and ack, with the name of the token
//! that did it (never its value), in the collector's log and as a `phoenix_audit` point.
//!
//! The log line is written first and always; the point goes through the normal writer, so while
//! the store is down it is lost (and that loss is logged) rather than holding up the action.

use phoenix_wire::Value;

use crate::lineproto::Writer;
use crate::writer::{Job, WriterHandle};

/// The `phoenix_audit` line for one action (tags: action, target, token; field: detail).
pub fn line(
    action: &str,
    caller_token_name: &str,
    instance_or_image: &str,
    detail: &str,
    ts_ns: i64,
) -> Writer {
    let mut w = Writer::with_capacity(128 + detail.len());
    w.point("phoenix_audit")
        .tag("action", action)
        .tag("target", instance_or_image)
        .tag("token", caller_token_name)
        .field("detail", &Value::Str(detail.to_owned()))
        .end(ts_ns);
    w
}

/// Log and store one audited action.
pub fn record(
    writer: &WriterHandle,
    action: &str,
    caller_token_name: &str,
    instance_or_image: &str,
    detail: &str,
) {
    tracing::info!(
        action,
        token = caller_token_name,
        target = instance_or_image,
        detail,
        "audit"
    );
    let w = line(
        action,
        caller_token_name,
        instance_or_image,
        detail,
        crate::convert::now_ns(),
    );
    let (tx, rx) = tokio::sync::oneshot::channel();
    if let Err((_, u)) = writer.submit(Job {
        body: w.buf,
        ends: w.ends,
        reply: tx,
    }) {
        tracing::error!(action, target = instance_or_image, reason = %u.reason, "audit point not stored (the log line above is the record)");
        return;
    }
    let (action, target) = (action.to_owned(), instance_or_image.to_owned());
    let report = move |r: Result<Result<crate::writer::Written, crate::writer::Unavailable>, _>| {
        match r {
            Ok(Ok(w)) if w.rejected == 0 => {}
            Ok(Ok(_)) => tracing::error!(
                action,
                target,
                "the store refused the audit point (the log line is the record)"
            ),
            Ok(Err(u)) => {
                tracing::error!(action, target, reason = %u.reason, "audit point not stored (the log line is the record)")
            }
            Err(_) => tracing::error!(
                action,
                target,
                "collector writer stopped before storing the audit point"
            ),
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            h.spawn(async move { report(rx.await) });
        }
        // Called outside the runtime (tests, tools): nobody waits for the outcome.
        Err(_) => drop(rx),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_line_keeps_hostile_text_inside_its_fields() {
        let w = line(
            "mark",
            "recycler#1",
            "i-1",
            "reason: \"drift\"\nevil,host=a v=1",
            5,
        );
        let lines: Vec<_> = influxdb_line_protocol::parse_lines(&w.buf)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].series.measurement.to_string(), "phoenix_audit");
        let tags: Vec<(String, String)> = lines[0]
            .series
            .tag_set
            .as_ref()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            tags,
            [
                ("action", "mark"),
                ("target", "i-1"),
                ("token", "recycler#1")
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
    }
}
