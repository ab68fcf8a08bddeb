//! Values an agent makes itself (mount paths, device names, log paths, check names) must never
//! make a report unacceptable. [`cut_value`] brings one within the limit of a tag value; a cut
//! value ends in `…` and a short hash of the whole, so two long paths that share a prefix stay
//! two distinct values.

/// Longest tag value [`crate::decode`] accepts, in bytes.
pub const MAX_TAG_VALUE: usize = 1024;

/// `s` as is when it fits in a tag value, else cut to fit (see [`cut_to`]).
pub fn cut_value(s: &str) -> String {
    cut_to(s, MAX_TAG_VALUE)
}

/// `s` as is when it is at most `max` bytes, else its longest prefix that fits (on a char
/// boundary) followed by `…` and 12 hex digits of the BLAKE3 hash of the whole of `s`.
pub fn cut_to(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let hash = blake3::hash(s.as_bytes()).to_hex();
    let tail = format!("…{}", &hash.as_str()[..12]);
    let mut end = max.saturating_sub(tail.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + tail.len());
    out.push_str(&s[..end]);
    out.push_str(&tail);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_pass_long_ones_are_cut_and_stay_apart() {
        assert_eq!(cut_value("/var"), "/var");
        let edge = "x".repeat(MAX_TAG_VALUE);
        assert_eq!(cut_value(&edge), edge);
        let a = format!("/mnt/{}/a", "d".repeat(1100));
        let b = format!("/mnt/{}/b", "d".repeat(1100));
        let (ca, cb) = (cut_value(&a), cut_value(&b));
        assert!(ca.len() <= MAX_TAG_VALUE && cb.len() <= MAX_TAG_VALUE);
        assert!(ca.starts_with("/mnt/ddd") && ca.contains('…'));
        assert_ne!(ca, cb, "same prefix, different hash");
        assert_eq!(ca, cut_value(&a), "the same value cuts the same way");
    }

    #[test]
    fn multibyte_text_is_cut_on_a_char_boundary() {
        let s = "é".repeat(1000);
        let c = cut_to(&s, 101);
        assert!(c.len() <= 101, "{}", c.len());
        assert!(c.ends_with(&c[c.len() - 12..]));
        assert!(cut_to(&s, 0).starts_with('…'));
    }
}
