//! journalctl's `--output=export` stream, parsed without copying.
//!
//! The format is systemd's Journal Export Format, documented as a stable interface: an entry
//! is a run of fields ended by an empty line; a field is `NAME=value\n`, or, when the value
//! holds a newline, other control bytes or bytes that are not UTF-8,
//! `NAME\n` + the value's length as a little-endian u64 + the value + `\n`. Both forms carry
//! the exact bytes, so nothing needs unescaping and nothing is lost.

/// The fields the agent asks journalctl for (`--output-fields`), plus the ones it always adds.
pub(super) const FIELDS: &str = "MESSAGE,PRIORITY,_SYSTEMD_UNIT,SYSLOG_IDENTIFIER,_PID,_COMM";

/// Longest field name accepted; journal field names are at most 64 characters.
const MAX_NAME: usize = 256;

#[derive(Debug, thiserror::Error, PartialEq)]
pub(super) enum FormatError {
    #[error("journalctl export stream: field name too long or missing its '=' at byte {0}")]
    BadName(usize),
    #[error("journalctl export stream: binary field not ended by a newline at byte {0}")]
    BadBinary(usize),
}

/// One entry, borrowing from the read buffer.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Entry<'a> {
    pub cursor: Option<&'a [u8]>,
    pub realtime: Option<&'a [u8]>,
    pub boot_id: Option<&'a [u8]>,
    /// Every MESSAGE field; an entry may carry the field more than once.
    pub message: Vec<&'a [u8]>,
    pub priority: Option<&'a [u8]>,
    pub unit: Option<&'a [u8]>,
    pub identifier: Option<&'a [u8]>,
    pub pid: Option<&'a [u8]>,
    pub comm: Option<&'a [u8]>,
}

impl Entry<'_> {
    /// `__REALTIME_TIMESTAMP` (µs since the epoch) as nanoseconds.
    pub(super) fn realtime_ns(&self) -> Option<i64> {
        let us: i64 = std::str::from_utf8(self.realtime?).ok()?.parse().ok()?;
        us.checked_mul(1000)
    }

    pub(super) fn priority(&self) -> Option<u8> {
        match self.priority? {
            [d @ b'0'..=b'7'] => Some(d - b'0'),
            _ => None,
        }
    }
}

/// The first whole entry in `buf` and how many bytes it took, or None when `buf` ends inside
/// an entry (read more and call again). Blank lines before an entry are skipped.
pub(super) fn next_entry(buf: &[u8]) -> Result<Option<(Entry<'_>, usize)>, FormatError> {
    let mut e = Entry::default();
    let mut fields = 0usize;
    let mut i = 0;
    loop {
        let Some(&first) = buf.get(i) else {
            return Ok(None);
        };
        if first == b'\n' {
            i += 1;
            if fields == 0 {
                continue;
            }
            return Ok(Some((e, i)));
        }
        let rest = &buf[i..];
        let scan = &rest[..rest.len().min(MAX_NAME + 1)];
        let Some(p) = scan.iter().position(|&b| b == b'=' || b == b'\n') else {
            if scan.len() > MAX_NAME {
                return Err(FormatError::BadName(i));
            }
            return Ok(None);
        };
        let name = &rest[..p];
        let value;
        if rest[p] == b'=' {
            let v = &rest[p + 1..];
            let Some(nl) = v.iter().position(|&b| b == b'\n') else {
                return Ok(None);
            };
            value = &v[..nl];
            i += p + 1 + nl + 1;
        } else {
            let v = &rest[p + 1..];
            let Some(len) = v.get(..8) else {
                return Ok(None);
            };
            let len = u64::from_le_bytes(len.try_into().expect("8 bytes"));
            let Ok(len) = usize::try_from(len) else {
                return Err(FormatError::BadBinary(i));
            };
            let Some(end) = len.checked_add(8) else {
                return Err(FormatError::BadBinary(i));
            };
            match v.get(end) {
                None => return Ok(None),
                Some(b'\n') => {}
                Some(_) => return Err(FormatError::BadBinary(i)),
            }
            value = &v[8..end];
            i += p + 1 + end + 1;
        }
        fields += 1;
        match name {
            b"__CURSOR" => e.cursor = Some(value),
            b"__REALTIME_TIMESTAMP" => e.realtime = Some(value),
            b"_BOOT_ID" => e.boot_id = Some(value),
            b"MESSAGE" => e.message.push(value),
            b"PRIORITY" => e.priority = e.priority.or(Some(value)),
            b"_SYSTEMD_UNIT" => e.unit = e.unit.or(Some(value)),
            b"SYSLOG_IDENTIFIER" => e.identifier = e.identifier.or(Some(value)),
            b"_PID" => e.pid = e.pid.or(Some(value)),
            b"_COMM" => e.comm = e.comm.or(Some(value)),
            _ => {}
        }
    }
}

/// Serialise fields the way journalctl and systemd-journal-remote expect (tests and bench).
pub fn write_entry(out: &mut Vec<u8>, fields: &[(&str, &[u8])]) {
    for (name, value) in fields {
        out.extend_from_slice(name.as_bytes());
        let plain =
            std::str::from_utf8(value).is_ok() && !value.iter().any(|&b| b < 0x20 && b != b'\t');
        if plain {
            out.push(b'=');
            out.extend_from_slice(value);
        } else {
            out.push(b'\n');
            out.extend_from_slice(&(value.len() as u64).to_le_bytes());
            out.extend_from_slice(value);
        }
        out.push(b'\n');
    }
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn text_and_binary_fields() {
        let mut buf = Vec::new();
        write_entry(
            &mut buf,
            &[
                ("__CURSOR", b"s=1;i=2"),
                ("__REALTIME_TIMESTAMP", b"1700000000123456"),
                ("MESSAGE", b"two\nlines \xff"),
                ("PRIORITY", b"3"),
                ("_SYSTEMD_UNIT", b"a.service"),
                ("OTHER", b"x"),
            ],
        );
        write_entry(
            &mut buf,
            &[
                ("__CURSOR", b"s=1;i=3"),
                ("MESSAGE", b"plain = text"),
                ("MESSAGE", b"again"),
            ],
        );
        let (e, n) = next_entry(&buf).unwrap().unwrap();
        assert_eq!(e.cursor.unwrap(), b"s=1;i=2");
        assert_eq!(e.realtime_ns(), Some(1_700_000_000_123_456_000));
        assert_eq!(e.message, vec![&b"two\nlines \xff"[..]]);
        assert_eq!(e.priority(), Some(3));
        assert_eq!(e.unit.unwrap(), b"a.service");
        let (e2, n2) = next_entry(&buf[n..]).unwrap().unwrap();
        assert_eq!(e2.message, vec![&b"plain = text"[..], b"again"]);
        assert_eq!(n + n2, buf.len());
        assert_eq!(next_entry(&buf[n + n2..]).unwrap(), None);
    }

    #[test]
    fn every_cut_of_the_stream_is_incomplete_not_wrong() {
        let mut buf = Vec::new();
        write_entry(
            &mut buf,
            &[
                ("__CURSOR", b"c1"),
                ("MESSAGE", b"bin\x00ary\n"),
                ("_PID", b"42"),
            ],
        );
        for cut in 0..buf.len() {
            assert_eq!(next_entry(&buf[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert!(next_entry(&buf).unwrap().is_some());
    }

    #[test]
    fn garbage_is_an_error() {
        assert_eq!(next_entry(&[b'A'; 300]), Err(FormatError::BadName(0)));
        let mut bad = b"MESSAGE\n".to_vec();
        bad.extend_from_slice(&3u64.to_le_bytes());
        bad.extend_from_slice(b"abcX");
        assert_eq!(next_entry(&bad), Err(FormatError::BadBinary(0)));
    }

    proptest! {
        #[test]
        fn any_message_round_trips(raw in proptest::collection::vec(any::<u8>(), 0..400), split in 0usize..500) {
            let mut buf = Vec::new();
            write_entry(&mut buf, &[("__CURSOR", b"c"), ("MESSAGE", &raw)]);
            let split = split.min(buf.len());
            // Whatever prefix is available parses as incomplete or as the whole entry.
            if let Some((e, _)) = next_entry(&buf[..split]).unwrap() {
                prop_assert_eq!(split, buf.len());
                prop_assert_eq!(e.message[0], &raw[..]);
            }
            let (e, n) = next_entry(&buf).unwrap().unwrap();
            prop_assert_eq!(n, buf.len());
            prop_assert_eq!(e.message[0], &raw[..]);
        }
    }
}
