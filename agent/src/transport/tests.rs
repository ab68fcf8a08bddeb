use super::*;

#[test]
fn only_a_json_ack_for_the_seq_sent_is_an_ack() {
    let ok = judge(200, None, br#"{"accepted":42,"duplicate":false}"#, 42);
    assert!(matches!(ok, Outcome::Acked(a) if a.accepted == 42 && !a.duplicate));
    let dup = judge(200, None, br#"{"accepted":42,"duplicate":true}"#, 42);
    assert!(matches!(dup, Outcome::Acked(a) if a.duplicate));
    // A captive portal, a wrong seq, an empty body, JSON of another shape: retries.
    let html = judge(200, None, b"<html><body>Please log in</body></html>", 42);
    assert!(
        matches!(&html, Outcome::Down(None, why) if why.contains("<html><body>Please log in")),
        "{html:?}"
    );
    let wrong = judge(200, None, br#"{"accepted":41}"#, 42);
    assert!(
        matches!(&wrong, Outcome::Down(_, why) if why.contains("41")),
        "{wrong:?}"
    );
    assert!(matches!(judge(204, None, b"", 42), Outcome::Down(..)));
    assert!(matches!(
        judge(200, None, br#"{"ok":true}"#, 42),
        Outcome::Down(..)
    ));
    assert!(matches!(judge(200, None, b"null", 42), Outcome::Down(..)));
}

#[test]
fn statuses() {
    assert!(
        matches!(judge(400, None, b"bad tag", 1), Outcome::Refused(r) if r.contains("bad tag"))
    );
    assert!(matches!(judge(413, None, b"", 1), Outcome::Refused(_)));
    assert!(matches!(
        judge(429, Some(Duration::from_secs(3)), b"", 1),
        Outcome::Retry(Some(d), _) if d == Duration::from_secs(3)
    ));
    assert!(matches!(judge(401, None, b"", 1), Outcome::Retry(..)));
    assert!(matches!(
        judge(503, Some(Duration::from_secs(5)), b"", 1),
        Outcome::Down(Some(_), _)
    ));
    assert!(matches!(judge(302, None, b"", 1), Outcome::Down(None, _)));
}

#[test]
fn a_long_answer_is_cut_on_a_char_boundary() {
    let body = "é".repeat(300);
    let Outcome::Down(_, why) = judge(200, None, body.as_bytes(), 1) else {
        panic!()
    };
    assert!(why.len() < 300, "{why}");
}
