//! Fuzzing the tailer's line splitting: a real log source thread tails a real file while this
//! test appends random bytes to it in random chunks (so reads end at arbitrary places: mid
//! line, mid UTF-8 character, across the read buffer), and drains the spool the way the
//! sender does. Put back together (parts joined, escaped text decoded), what arrives must be
//! exactly the lines written: no byte lost, added or moved across a line boundary, and each
//! piece's offset must point at its bytes in the file.
//!
//! `PHOENIX_FUZZ_SECS` (default 3) bounds the writing, `PHOENIX_FUZZ_SEED` replays a run.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phoenix_agent::logs::{LogSource, Options};
use phoenix_agent::source::{Ctx, Source};
use phoenix_agent::spool::Spool;
use phoenix_wire::{logtext, Identity, LogLine};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One random line's bytes (without its newline): text, binary, multi-byte characters cut
/// anywhere, \r, NUL, and now and then a line longer than one InfluxDB string (64 KiB) or
/// than the tailer's largest read buffer (1 MiB).
fn line(rng: &mut Rng, huge: bool) -> Vec<u8> {
    let n = match rng.below(200) {
        _ if huge => 1_050_000 + rng.below(100_000),
        0..=2 => 60_000 + rng.below(10_000),
        3..=30 => 0,
        _ => rng.below(200),
    };
    let mut b = Vec::with_capacity(n);
    while b.len() < n {
        match rng.below(6) {
            0 => b.extend_from_slice("é😀".as_bytes()),
            1 => b.push(rng.next() as u8 & 0x7f | if rng.below(4) == 0 { 0x80 } else { 0 }),
            2 => b.extend_from_slice(b"\r\0\\\"x\\xFF"),
            _ => b.extend_from_slice(b"word "),
        }
    }
    b.truncate(n);
    // The newline is the separator; any inside a generated line would be a different line.
    for x in &mut b {
        if *x == b'\n' {
            *x = b'.';
        }
    }
    b
}

/// What arrived, as whole lines: parts joined in order.
fn assemble(pieces: &[LogLine], file: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut expect_offset = 0u64;
    for p in pieces {
        let raw = logtext::decode(&p.msg, p.escaped);
        if p.offset != expect_offset {
            return Err(format!(
                "piece at offset {} but the previous ended at {expect_offset}",
                p.offset
            ));
        }
        let at = p.offset as usize;
        if file.get(at..at + raw.len()) != Some(&raw[..]) {
            return Err(format!(
                "piece at offset {at} ({} bytes) is not the file's bytes there",
                raw.len()
            ));
        }
        match p.part {
            Some(n) if n > 1 => out
                .last_mut()
                .ok_or("a continuation part came first")?
                .extend_from_slice(&raw),
            _ => out.push(raw.clone()),
        }
        expect_offset = p.offset + raw.len() as u64;
        // A piece that ends its line is followed by the newline in the file.
        if file.get(expect_offset as usize) == Some(&b'\n') {
            expect_offset += 1;
        }
    }
    Ok(out)
}

#[test]
fn any_chunking_of_any_bytes_yields_exactly_the_lines() {
    let seed = std::env::var("PHOENIX_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let secs: f64 = std::env::var("PHOENIX_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let path = dir.path().join("app.log");
    std::fs::File::create(&path).unwrap();
    let spool = Arc::new(Spool::open(&state.join("spool"), 256 << 20).unwrap());
    let ctx = Ctx {
        identity: Arc::new(Identity {
            instance_id: "i-fuzz".into(),
            image_id: "img".into(),
            hostname: "h".into(),
            ..Default::default()
        }),
        spool: spool.clone(),
        state_dir: state.clone(),
        interval: Duration::from_secs(10),
        drift_link: Default::default(),
    };
    let mut o = Options::new(vec![path.display().to_string()]);
    o.from_start = true;
    o.poll = Duration::from_millis(1);
    o.scan_every = Duration::from_millis(50);
    o.linger = Duration::from_millis(5);
    // A line without its newline is never flushed early: every line here gets one in the end.
    o.flush_timeout = Duration::from_secs(3600);
    let tailer = std::thread::spawn(move || Box::new(LogSource::new(o)).run(ctx));

    let mut written: Vec<u8> = Vec::new();
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    let mut got: Vec<LogLine> = Vec::new();
    let drain = |got: &mut Vec<LogLine>| {
        while let Some(e) = spool.oldest(Duration::ZERO) {
            got.extend(
                phoenix_wire::decode(&e.body, true, &Default::default())
                    .unwrap()
                    .logs,
            );
            spool.ack(&e, &state).unwrap();
        }
    };
    let (start, end) = (
        Instant::now(),
        Instant::now() + Duration::from_secs_f64(secs),
    );
    let mut chunks = 0u64;
    let mut pending: Vec<u8> = Vec::new();
    while Instant::now() < end || !pending.is_empty() {
        if pending.is_empty() {
            // One line past the largest read buffer in every run, whatever the seed.
            let l = line(&mut rng, lines.len() == 5);
            pending.extend_from_slice(&l);
            pending.push(b'\n');
            lines.push(l);
        }
        // Write a random prefix of what is pending: cuts land anywhere, mid character included.
        let n = match rng.below(4) {
            0 => 1,
            1 => rng.below(16) + 1,
            _ => rng.below(pending.len()) + 1,
        }
        .min(pending.len());
        f.write_all(&pending[..n]).unwrap();
        written.extend_from_slice(&pending[..n]);
        pending.drain(..n);
        chunks += 1;
        if rng.below(8) == 0 {
            // Let the tailer catch up sometimes, so it also meets the half-written line.
            std::thread::sleep(Duration::from_micros(rng.below(3000) as u64));
        }
        if rng.below(64) == 0 {
            drain(&mut got);
        }
    }
    let total: usize = lines.len();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        drain(&mut got);
        let whole = got.iter().filter(|p| p.part.is_none_or(|n| n == 1)).count();
        if whole >= total || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    spool.stop();
    tailer.join().unwrap().unwrap();
    drain(&mut got);
    let back = assemble(&got, &written).unwrap_or_else(|e| panic!("{e} (seed {seed})"));
    assert_eq!(back.len(), lines.len(), "line count (seed {seed})");
    for (i, (a, b)) in back.iter().zip(&lines).enumerate() {
        assert!(
            a == b,
            "line {i} differs: {} vs {} bytes (seed {seed})",
            a.len(),
            b.len()
        );
    }
    println!(
        "line splitter: {} lines, {} bytes written in {chunks} chunks, {} pieces back, in {:.1}s, seed {seed}",
        lines.len(),
        written.len(),
        got.len(),
        start.elapsed().as_secs_f64()
    );
}
