//! Log text as it travels: lossless for any bytes, readable for the usual ones.
//!
//! A line that is valid UTF-8 travels unchanged. A line that is not is sent in an escaped form
//! and flagged (`escaped: true`, stored in InfluxDB as field `escaped=true`): backslashes are
//! doubled and every byte that is not part of valid UTF-8 becomes `\xNN`. [`decode`] reverses
//! it exactly, so no byte is ever lost or replaced by U+FFFD.

/// Turn raw bytes into text. Returns the text and whether it is in the escaped form.
pub fn encode(raw: &[u8]) -> (String, bool) {
    match std::str::from_utf8(raw) {
        Ok(s) => (s.to_owned(), false),
        Err(_) => (escape(raw), true),
    }
}

fn escape(mut raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len() + 16);
    loop {
        match std::str::from_utf8(raw) {
            Ok(s) => {
                push_doubling_backslashes(&mut out, s);
                return out;
            }
            Err(e) => {
                let (good, rest) = raw.split_at(e.valid_up_to());
                push_doubling_backslashes(&mut out, std::str::from_utf8(good).unwrap_or_default());
                let bad = e.error_len().unwrap_or(rest.len());
                for b in &rest[..bad] {
                    out.push_str(&format!("\\x{b:02X}"));
                }
                raw = &rest[bad..];
            }
        }
    }
}

fn push_doubling_backslashes(out: &mut String, s: &str) {
    for c in s.chars() {
        if c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
}

/// The raw bytes back from [`encode`]'s output.
pub fn decode(text: &str, escaped: bool) -> Vec<u8> {
    if !escaped {
        return text.as_bytes().to_vec();
    }
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            if b[i + 1] == b'\\' {
                out.push(b'\\');
                i += 2;
                continue;
            }
            if b[i + 1] == b'x' && i + 4 <= b.len() {
                if let (Some(h), Some(l)) = (hex(b[i + 2]), hex(b[i + 3])) {
                    out.push(h << 4 | l);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Split `raw` into pieces of at most `max` bytes of *encoded* text each, never inside a UTF-8
/// character, so a 100 KiB line becomes two InfluxDB strings rather than a refused write.
pub fn split(raw: &[u8], max: usize) -> Vec<&[u8]> {
    let max = max.max(8);
    let mut parts = Vec::new();
    let mut rest = raw;
    // Escaping can at most quadruple a byte (\xNN), so cut raw pieces at max/4 when unsure.
    while !rest.is_empty() {
        if encoded_len(rest) <= max {
            parts.push(rest);
            break;
        }
        let mut cut = max.min(rest.len());
        while cut > 0 && encoded_len(&rest[..cut]) > max {
            cut = cut * 3 / 4;
        }
        // Do not cut a UTF-8 character in two: back up to a char boundary when one is near.
        let mut c = cut;
        while c > 0 && c > cut.saturating_sub(4) && (rest[c] & 0xC0) == 0x80 {
            c -= 1;
        }
        if c > 0 && (rest[c] & 0xC0) != 0x80 {
            cut = c;
        }
        let cut = cut.max(1);
        parts.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    parts
}

fn encoded_len(raw: &[u8]) -> usize {
    match std::str::from_utf8(raw) {
        Ok(s) => s.len(),
        Err(_) => escape(raw).len(),
    }
}

/// The level word a line announces, for the `level` tag: the first of the usual spellings
/// found near the start of the line (`ERROR`, `level=warn`, `[info]`, `"level":"debug"` ...).
pub fn detect_level(text: &str) -> Option<&'static str> {
    let head = &text.as_bytes()[..text.len().min(200)];
    let mut i = 0;
    while i < head.len() {
        if head[i].is_ascii_alphabetic() && (i == 0 || !head[i - 1].is_ascii_alphanumeric()) {
            let start = i;
            while i < head.len() && head[i].is_ascii_alphabetic() {
                i += 1;
            }
            if i < head.len() && head[i].is_ascii_alphanumeric() {
                continue;
            }
            let word = &head[start..i];
            if let Some(l) = level_of(word) {
                return Some(l);
            }
        } else {
            i += 1;
        }
    }
    None
}

fn level_of(word: &[u8]) -> Option<&'static str> {
    if word.len() > 9 {
        return None;
    }
    let mut buf = [0u8; 9];
    for (d, s) in buf.iter_mut().zip(word) {
        *d = s.to_ascii_lowercase();
    }
    Some(match &buf[..word.len()] {
        b"emerg" | b"emergency" | b"panic" | b"fatal" | b"crit" | b"critical" | b"alert" => {
            "critical"
        }
        b"err" | b"error" | b"eror" => "error",
        b"warn" | b"warning" => "warning",
        b"notice" | b"info" => "info",
        b"debug" | b"trace" | b"dbug" => "debug",
        _ => return None,
    })
}

/// Syslog priority (0-7) to the level tag used for log lines.
pub fn level_of_priority(p: u8) -> &'static str {
    match p {
        0..=2 => "critical",
        3 => "error",
        4 => "warning",
        5 | 6 => "info",
        _ => "debug",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn utf8_travels_unchanged() {
        let (s, esc) = encode("he said \"hi\", a=b \\ 😀".as_bytes());
        assert!(!esc);
        assert_eq!(s, "he said \"hi\", a=b \\ 😀");
    }

    #[test]
    fn invalid_utf8_is_escaped_losslessly() {
        let raw = b"bad \xff\xfe byte and a \\x41 lookalike";
        let (s, esc) = encode(raw);
        assert!(esc);
        assert_eq!(s, "bad \\xFF\\xFE byte and a \\\\x41 lookalike");
        assert_eq!(decode(&s, esc), raw.to_vec());
    }

    #[test]
    fn levels() {
        assert_eq!(
            detect_level("2024-01-01 12:00:00 ERROR db down"),
            Some("error")
        );
        assert_eq!(detect_level("level=warn msg=\"slow\""), Some("warning"));
        assert_eq!(detect_level("{\"level\":\"debug\"}"), Some("debug"));
        assert_eq!(detect_level("[INFO] started"), Some("info"));
        assert_eq!(detect_level("errors happened elsewhere"), None);
        assert_eq!(detect_level("GET /index.html 200"), None);
    }

    #[test]
    fn split_keeps_characters_whole() {
        let line = "é".repeat(100_000);
        let parts = split(line.as_bytes(), 1000);
        assert!(parts.len() > 100);
        for p in &parts {
            assert!(std::str::from_utf8(p).is_ok());
            assert!(p.len() <= 1000);
        }
        assert_eq!(parts.concat(), line.as_bytes());
    }

    proptest! {
        #[test]
        fn any_bytes_round_trip(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            let (s, esc) = encode(&raw);
            prop_assert_eq!(decode(&s, esc), raw);
        }

        #[test]
        fn split_is_lossless_and_bounded(raw in proptest::collection::vec(any::<u8>(), 0..3000), max in 8usize..500) {
            let parts = split(&raw, max);
            prop_assert_eq!(parts.concat(), raw.clone());
            for p in parts { prop_assert!(encode(p).0.len() <= max); }
        }
    }
}
