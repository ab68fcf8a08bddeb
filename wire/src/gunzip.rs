//! Bounded gunzip of a body already in memory.
//!
//! The gzip framing (RFC 1952: a 10-byte header with optional fields, a deflate stream, CRC32
//! and length) is read here; miniz_oxide's inflate core does the deflate and flate2's `Crc`
//! checks. flate2's `GzDecoder` does the same, but it makes a fresh inflate state for every
//! body (miniz_oxide's is about 43 KB, allocated, zeroed and moved) and `read_to_end` zeroes
//! the output it grows into. By callgrind that was a tenth of a collector's instructions for
//! a 40-point report. Here the collector's decode keeps one decompressor per thread, and
//! inflates straight into the output, sized from the gzip trailer: that output is the
//! window back-references read from, so there is no 32 KiB dictionary to zero for each body
//! (flate2's `Decompress::reset` zeroed one: 4 % of a report) or to copy out of.
//!
//! Each member inflates into its own slice of the output, with miniz_oxide's non-wrapping
//! flag: a back-reference before the member's first byte is a "corrupt" error, as in zlib,
//! never a read of an earlier member or of what another body left in a kept state.

use std::cell::RefCell;
use std::io;

use flate2::Crc;
use miniz_oxide::inflate::core::inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
use miniz_oxide::inflate::core::{decompress, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

use crate::DecodeError;

thread_local! {
    /// The decompressor [`gunzip_reusing`] keeps between bodies on this thread (its Huffman
    /// tables, about 11 KB; rebuilt from each block's header, so nothing carries over).
    static INFLATE: RefCell<Option<Box<DecompressorOxide>>> = const { RefCell::new(None) };
}

/// Gunzip at most `max` bytes; more is an error rather than an allocation (gzip bombs).
/// Every member of a multi-member body is read, as `gzip -d` does.
pub fn gunzip_limited(body: &[u8], max: usize) -> Result<Vec<u8>, DecodeError> {
    gunzip_with(&mut DecompressorOxide::default(), body, max)
}

/// [`gunzip_limited`] with this thread's kept decompressor: for the collector's reports,
/// where a state made for each body was most of the gunzip's cost. The agent, which gunzips
/// rarely, uses the one above and keeps nothing.
pub(crate) fn gunzip_reusing(body: &[u8], max: usize) -> Result<Vec<u8>, DecodeError> {
    INFLATE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut slot) => gunzip_with(slot.get_or_insert_with(Box::default), body, max),
        // Not reached (nothing in here calls back), but a fresh state is right anyway.
        Err(_) => gunzip_limited(body, max),
    })
}

fn bad(why: impl Into<String>) -> DecodeError {
    DecodeError::Gzip(io::Error::new(io::ErrorKind::InvalidData, why.into()))
}

fn gunzip_with(d: &mut DecompressorOxide, body: &[u8], max: usize) -> Result<Vec<u8>, DecodeError> {
    // The trailer's length (of the last member) sizes the output, so it is not grown and
    // copied. It is the sender's word: capped by the limit, and by what deflate's 1:1032
    // ratio allows, so a lie costs at most a bounded allocation.
    let said = body
        .len()
        .checked_sub(4)
        .map_or(0, |at| u32::from_le_bytes(tail4(&body[at..])) as usize);
    let first = said
        .min(max.saturating_add(1))
        .min(body.len().saturating_mul(1032))
        .max(64);
    // `out[..filled]` is inflated; past it, zeroed room the inflater writes into.
    let mut out: Vec<u8> = Vec::new();
    let mut filled = 0;
    let mut pos = 0;
    loop {
        pos += member_header(&body[pos..]).map_err(bad)?;
        d.init();
        let start = filled;
        loop {
            if filled == out.len() {
                // The trailer's figure first; then doubling, but never past one byte over
                // the limit (that byte proves "more").
                let room = max.saturating_add(1) - filled;
                let grow = if out.is_empty() {
                    first
                } else {
                    filled.max(4096)
                };
                out.resize(filled + grow.min(room), 0);
            }
            // The whole input is here, so running out of it is the end, not a wait.
            let (status, used_in, used_out) = decompress(
                d,
                &body[pos..],
                &mut out[start..],
                filled - start,
                TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
            );
            pos += used_in;
            filled += used_out;
            // The output never grows past max + 1: that byte proves "more".
            if filled > max {
                return Err(DecodeError::TooLarge(max));
            }
            match status {
                TINFLStatus::Done => break,
                TINFLStatus::HasMoreOutput => {}
                TINFLStatus::FailedCannotMakeProgress | TINFLStatus::NeedsMoreInput => {
                    return Err(bad("the gzip stream ends before its last block"))
                }
                other => return Err(bad(format!("corrupt deflate stream: {other:?}"))),
            }
        }
        let trailer = body
            .get(pos..pos + 8)
            .ok_or_else(|| bad("the gzip member ends without its CRC and length"))?;
        let mut crc = Crc::new();
        crc.update(&out[start..filled]);
        if crc.sum() != u32::from_le_bytes(tail4(&trailer[..4])) {
            return Err(bad("gzip CRC mismatch: the body was damaged on the way"));
        }
        if (filled - start) as u32 != u32::from_le_bytes(tail4(&trailer[4..])) {
            return Err(bad("gzip length mismatch: the body was damaged on the way"));
        }
        pos += 8;
        if pos == body.len() {
            out.truncate(filled);
            return Ok(out);
        }
    }
}

/// The first four bytes of `b` (callers pass at least four).
fn tail4(b: &[u8]) -> [u8; 4] {
    let mut a = [0; 4];
    a.copy_from_slice(&b[..4]);
    a
}

/// The length of the gzip member header at the start of `b` (RFC 1952 section 2.3).
fn member_header(b: &[u8]) -> Result<usize, &'static str> {
    const FHCRC: u8 = 2;
    const FEXTRA: u8 = 4;
    const FNAME: u8 = 8;
    const FCOMMENT: u8 = 16;
    const SHORT: &str = "the gzip header is cut short";
    if b.len() < 2 || b[..2] != [0x1f, 0x8b] {
        return Err("no gzip magic (1f 8b) where a gzip member should start");
    }
    if b.len() < 10 {
        return Err(SHORT);
    }
    if b[2] != 8 {
        return Err("gzip compression method is not deflate");
    }
    let flags = b[3];
    if flags & 0xe0 != 0 {
        return Err("reserved gzip header flags are set");
    }
    let mut p = 10;
    if flags & FEXTRA != 0 {
        let n = b.get(p..p + 2).ok_or(SHORT)?;
        p += 2 + usize::from(u16::from_le_bytes([n[0], n[1]]));
    }
    for field in [FNAME, FCOMMENT] {
        if flags & field != 0 {
            let nul = b.get(p..).and_then(|r| r.iter().position(|&c| c == 0));
            p += nul.ok_or(SHORT)? + 1;
        }
    }
    if flags & FHCRC != 0 {
        p += 2; // not checked, as gzip(1) does not
    }
    if p > b.len() {
        return Err(SHORT);
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::{Read, Write};

    fn gz(data: &[u8], level: u32) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// flate2's own reader: what every body must agree with.
    fn reference(body: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        flate2::bufread::MultiGzDecoder::new(body).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn header_fields_and_several_members() {
        let mut e = flate2::GzBuilder::new()
            .filename("report.json")
            .comment("from a test")
            .extra(vec![1, 2, 3])
            .write(Vec::new(), flate2::Compression::fast());
        e.write_all(b"{\"a\":").unwrap();
        let mut body = e.finish().unwrap();
        body.extend(gz(b"1}", 6));
        assert_eq!(gunzip_limited(&body, 1 << 20).unwrap(), b"{\"a\":1}");
        assert_eq!(gunzip_reusing(&body, 1 << 20).unwrap(), b"{\"a\":1}");
    }

    #[test]
    fn damage_is_an_error_and_the_kept_state_recovers() {
        let data: Vec<u8> = (0..50_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let good = gz(&data, 1);
        let mut flipped = good.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x55;
        let mut crc = good.clone();
        let at = crc.len() - 6;
        crc[at] ^= 1;
        let cut = &good[..good.len() - 3];
        let mid_cut = &good[..good.len() / 2];
        let trailing = [&good[..], &b"x"[..]].concat();
        for (what, body) in [
            ("flipped", &flipped[..]),
            ("crc", &crc[..]),
            ("cut", cut),
            ("mid-cut", mid_cut),
            ("trailing", &trailing[..]),
            ("empty", &b""[..]),
            ("json", &b"{\"v\":1}"[..]),
        ] {
            let e = gunzip_reusing(body, 1 << 30).unwrap_err();
            assert!(matches!(e, DecodeError::Gzip(_)), "{what}: {e}");
            assert!(e.to_string().contains("gzip"), "{what}: {e}");
            // The same thread's next body starts from a clean state.
            assert_eq!(gunzip_reusing(&good, 1 << 30).unwrap(), data, "{what}");
        }
    }

    #[test]
    fn the_limit_is_exact() {
        let data = vec![7u8; 100_000];
        let body = gz(&data, 1);
        assert_eq!(gunzip_reusing(&body, 100_000).unwrap().len(), 100_000);
        assert!(gunzip_reusing(&body, 99_999).unwrap_err().is_too_large());
        assert!(gunzip_limited(&body, 0).unwrap_err().is_too_large());
        // A trailer that claims 4 GiB sizes nothing beyond the limit.
        let mut lying = body.clone();
        let n = lying.len();
        lying[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(gunzip_reusing(&lying, 1 << 30).is_err());
    }

    /// A gzip member of one fixed-Huffman block whose first symbol is a match of length 3
    /// at distance 1: a back-reference to before the member's first byte.
    fn reaches_back() -> Vec<u8> {
        // (value, bits): header fields LSB first; Huffman codes MSB first (RFC 1951 3.1.1).
        let mut bits: Vec<u8> = vec![1, 1, 0]; // BFINAL, BTYPE = 01 (fixed)
        let mut code = |v: u32, n: u32| (0..n).rev().for_each(|i| bits.push((v >> i & 1) as u8));
        code(0b000_0001, 7); // length code 257: length 3
        code(0, 5); // distance code 0: distance 1
        code(0, 7); // end of block (256)
        let mut deflate = vec![0u8; bits.len().div_ceil(8)];
        for (i, b) in bits.iter().enumerate() {
            deflate[i / 8] |= b << (i % 8);
        }
        let mut m = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
        m.extend(deflate);
        let mut crc = Crc::new();
        crc.update(&[0, 0, 0]);
        m.extend(crc.sum().to_le_bytes());
        m.extend(3u32.to_le_bytes());
        m
    }

    #[test]
    fn a_member_cannot_read_before_its_own_start() {
        // Alone, it would read bytes that are not there (or whatever a kept state held).
        let e = gunzip_reusing(&reaches_back(), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("corrupt deflate"), "{e}");
        // After another member, it would read that member's bytes: members are separate
        // streams (RFC 1952), so that is an error too, not a copy across them.
        let body = [gz(b"abc", 6), reaches_back()].concat();
        let e = gunzip_reusing(&body, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("corrupt deflate"), "{e}");
        assert!(gunzip_limited(&body, 1 << 20).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Any body, gzip or damaged gzip, reads as flate2's reader reads it: the same bytes,
        /// or an error where it errs.
        #[test]
        fn agrees_with_flate2(
            parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..3000), 1..4),
            level in 0u32..10,
            damage in proptest::option::of((any::<prop::sample::Index>(), 1u8..=255)),
        ) {
            let mut body: Vec<u8> = parts.iter().flat_map(|p| gz(p, level)).collect();
            if let Some((at, x)) = damage {
                let i = at.index(body.len());
                body[i] ^= x;
            }
            let want = reference(&body);
            let got = gunzip_reusing(&body, 1 << 20);
            match (&want, &got) {
                (Ok(w), Ok(g)) => prop_assert_eq!(w, g),
                (Err(_), Err(_)) => {}
                _ => prop_assert!(false, "flate2 {:?}, here {:?}", want.map(|v| v.len()), got.map(|v| v.len())),
            }
        }
    }
}
