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

mod fuzz {
    //! Whatever comes back, only a well-formed ack for the very seq sent settles a batch.

    use super::*;
    use proptest::prelude::*;

    /// What an independent reading of the body says: a JSON object whose `accepted` is the
    /// number `seq`.
    fn is_ack_for(body: &[u8], seq: u64) -> bool {
        serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| {
            v.as_object()
                .and_then(|o| o.get("accepted"))
                .and_then(|a| a.as_u64())
                == Some(seq)
        })
    }

    /// Bodies that look like an ack and are not one for `seq` (or are, wrapped in junk).
    fn near_ack(seq: u64) -> impl Strategy<Value = Vec<u8>> {
        let other = any::<u64>().prop_filter("another seq", move |s| *s != seq);
        prop_oneof![
            other.prop_map(|s| format!(r#"{{"accepted":{s}}}"#)),
            Just(format!(r#"<html><body>{{"accepted":{seq}}}</body></html>"#)),
            Just(format!(r#"{{"accepted":"{seq}"}}"#)),
            Just(format!(r#"{{"accepted":{seq}.5}}"#)),
            Just(format!(r#"{{"accepted":{seq}}} trailing"#)),
            Just(format!(r#"[{{"accepted":{seq}}}]"#)),
            Just(format!(r#"{{"ack":{{"accepted":{seq}}}}}"#)),
            Just(format!(r#"{{"accepted":-{seq}}}"#)),
            Just(format!(r#"{{"accepted":{seq},"accepted":{seq}}}"#)),
            (0usize..12).prop_map(move |cut| {
                let s = format!(r#"{{"accepted":{seq}}}"#);
                s[..cut.min(s.len() - 1)].to_string()
            }),
            Just(format!("accepted={seq}")),
            Just(String::new()),
            Just("null".to_string()),
        ]
        .prop_map(String::into_bytes)
    }

    fn status() -> impl Strategy<Value = u16> {
        prop_oneof![
            200..=299u16,
            100..=599u16,
            Just(200),
            Just(204),
            Just(302),
            Just(503)
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn any_answer_is_an_ack_only_if_it_is_one_for_this_seq(
            st in status(),
            body in prop::collection::vec(any::<u8>(), 0..200),
            seq in any::<u64>(),
        ) {
            let out = judge(st, None, &body, seq);
            if let Outcome::Acked(a) = &out {
                prop_assert!((200..300).contains(&st), "HTTP {st} taken as an ack");
                prop_assert_eq!(a.accepted, seq);
                prop_assert!(is_ack_for(&body, seq), "{:?}", String::from_utf8_lossy(&body));
            }
        }

        #[test]
        fn lookalike_bodies_are_never_an_ack(
            (sent, st, body) in (1..=u64::MAX).prop_flat_map(|s| (Just(s), status(), near_ack(s))),
        ) {
            let out = judge(st, None, &body, sent);
            prop_assert!(
                !matches!(out, Outcome::Acked(_)),
                "HTTP {} {:?} taken as the ack for {}", st, String::from_utf8_lossy(&body), sent
            );
        }

        #[test]
        fn a_real_ack_for_the_seq_is_one_and_only_with_a_2xx(
            seq in any::<u64>(),
            st in status(),
            duplicate in any::<bool>(),
            extra in prop_oneof![Just(""), Just(r#","rejected_points":3"#), Just(r#","resend_drift":true"#), Just(r#","later":"field""#)],
        ) {
            let body = format!(r#"{{"accepted":{seq},"duplicate":{duplicate}{extra}}}"#);
            let out = judge(st, None, body.as_bytes(), seq);
            prop_assert_eq!(
                matches!(out, Outcome::Acked(ref a) if a.accepted == seq && a.duplicate == duplicate),
                (200..300).contains(&st),
                "HTTP {} {}: {:?}", st, body, out
            );
        }
    }
}
