//! Fuzzing the report decoder without cargo-fuzz (which needs a nightly toolchain): a seeded,
//! time-boxed mutation loop over the committed corpus in `tests/corpus/decoder/`, plus random
//! bytes and random JSON. For every input the decoder must
//! - not panic (a panic in the collector's decode would be a remote crash),
//! - not allocate far past its limit (a gzip bomb or a JSON blow-up is refused, not buffered),
//! - and when it accepts a report, that report must satisfy the limits it was checked against
//!   and re-encode and decode to itself.
//!
//! `PHOENIX_FUZZ_SECS` sets the time per target (default 3 s), `PHOENIX_FUZZ_SEED` replays a
//! run. A failing input is written under the cargo target tmp dir and named in the panic.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use phoenix_wire::{
    decode, encode, gzip, valid_id, valid_name, Limits, Report, COLLECTOR_MEASUREMENTS,
};
use serde_json::{json, Map, Value};

// ---- peak-allocation accounting, per thread (decode runs on the calling thread) ----

struct Counting;

thread_local! {
    static CUR: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        unsafe {
            let p = System.alloc(l);
            if !p.is_null() {
                CUR.try_with(|c| {
                    let n = c.get() + l.size() as isize;
                    c.set(n);
                    PEAK.try_with(|pk| pk.set(pk.get().max(n))).ok();
                })
                .ok();
            }
            p
        }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe {
            CUR.try_with(|c| c.set(c.get() - l.size() as isize)).ok();
            System.dealloc(p, l)
        }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        unsafe {
            let q = System.realloc(p, l, new);
            if !q.is_null() {
                CUR.try_with(|c| {
                    let n = c.get() - l.size() as isize + new as isize;
                    c.set(n);
                    PEAK.try_with(|pk| pk.set(pk.get().max(n))).ok();
                })
                .ok();
            }
            q
        }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Bytes allocated at the peak of `f` above what was live when it started.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CUR.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, (PEAK.with(Cell::get) - base).max(0) as usize)
}

// ---- a small deterministic generator ----

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64: good enough spread for picking mutations, and reproducible from a seed.
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

fn budget() -> Duration {
    let secs: f64 = std::env::var("PHOENIX_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(secs)
}

fn seed() -> u64 {
    std::env::var("PHOENIX_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/decoder");
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    assert!(out.len() >= 10, "corpus in {} is missing", dir.display());
    out
}

fn is_gzip(b: &[u8]) -> bool {
    b.starts_with(&[0x1f, 0x8b])
}

fn gunzip(b: &[u8]) -> Vec<u8> {
    phoenix_wire::gunzip_limited(b, 64 << 20).unwrap_or_default()
}

/// Limits small enough that mutations reach every one of them.
fn limits() -> Limits {
    Limits {
        max_decompressed: 256 << 10,
        max_points: 500,
        max_tags: 16,
        max_fields: 32,
        max_string: 8 << 10,
        max_checks: 16,
        max_drift_entries: 200,
        // The corpus was written around 2023-11-14 (1.7e9 s); pin the collector's clock
        // there so it keeps decoding, and so mutated numbers meet the time window.
        now_ns: Some(CORPUS_NOW),
        ..Limits::default()
    }
}

/// The collector's clock the fuzz targets run at: a minute after the corpus' timestamps.
const CORPUS_NOW: i64 = 1_700_000_060_000_000_000;

/// Generous: JSON text becomes maps and strings several times its size (a one-entry BTreeMap
/// is a ~600-byte node for ~10 bytes of JSON). A decoder that buffered a bomb would blow far
/// past it; one that stopped at the limit stays well inside.
fn alloc_bound(input: usize, l: &Limits) -> usize {
    96 * l.max_decompressed + 4 * input + (1 << 20)
}

#[derive(Default, Debug)]
struct Stats {
    execs: u64,
    ok: u64,
    too_large: u64,
    refused: u64,
    max_peak: usize,
}

/// Run one input through `decode` and check every property; on a failure, keep the input.
fn check(name: &str, body: &[u8], gz: bool, l: &Limits, st: &mut Stats) {
    st.execs += 1;
    let r = std::panic::catch_unwind(|| peak_of(|| decode(body, gz, l)));
    let (res, peak) = match r {
        Ok(x) => x,
        Err(_) => fail(name, body, "decode panicked"),
    };
    st.max_peak = st.max_peak.max(peak);
    if peak > alloc_bound(body.len(), l) {
        fail(
            name,
            body,
            &format!(
                "decode allocated {peak} bytes at its peak for a {}-byte body",
                body.len()
            ),
        );
    }
    match res {
        Ok(rep) => {
            st.ok += 1;
            if let Err(why) = accepted_is_sound(&rep, l) {
                fail(name, body, &why);
            }
        }
        Err(e) if e.is_too_large() => st.too_large += 1,
        Err(_) => st.refused += 1,
    }
}

fn accepted_is_sound(r: &Report, l: &Limits) -> Result<(), String> {
    if r.v != phoenix_wire::VERSION
        || !valid_id(&r.agent.instance_id)
        || !valid_id(&r.agent.image_id)
        || r.agent.group.as_deref().is_some_and(|g| !valid_id(g))
    {
        return Err(format!(
            "accepted a report with a bad version or id: {:?}",
            r.agent
        ));
    }
    if r.metrics.len() + r.logs.len() > l.max_points || r.checks.len() > l.max_checks {
        return Err("accepted a report over its point or check limit".into());
    }
    numbers_are_bounded(r, l)?;
    for p in &r.metrics {
        if !valid_name(&p.m)
            || COLLECTOR_MEASUREMENTS.contains(&p.m.as_str())
            || p.tags.len() > l.max_tags
            || p.fields.is_empty()
            || p.fields.len() > l.max_fields
        {
            return Err(format!("accepted point {:?}", p.m));
        }
        if p.tags.keys().chain(p.fields.keys()).any(|k| !valid_name(k)) {
            return Err(format!("accepted a bad tag or field key in {:?}", p.m));
        }
    }
    // Whatever was accepted must travel again unchanged: the agent's spool and the collector's
    // dedupe both rely on a report meaning the same thing after a round trip.
    let again = decode(
        &encode(r),
        true,
        &Limits {
            max_decompressed: usize::MAX,
            ..*l
        },
    )
    .map_err(|e| format!("accepted report does not decode after re-encoding: {e}"))?;
    if &again != r {
        return Err(format!("re-encoded report differs:\n{r:?}\n{again:?}"));
    }
    Ok(())
}

/// What the collector's arithmetic relies on: every number decode let through is inside its
/// bound, computed here independently of the decoder's own code.
fn numbers_are_bounded(r: &Report, l: &Limits) -> Result<(), String> {
    use phoenix_wire::bounds::{MAX_CHECK_MS, MAX_INTERVAL_MS, MIN_BOOT_TIME, MIN_INTERVAL_MS};
    let now = l.now_ns.expect("the fuzz limits pin the clock") as i128;
    let lo = now - l.max_age.as_nanos() as i128;
    let hi = now + l.max_ahead.as_nanos() as i128;
    let bad_ts = r
        .metrics
        .iter()
        .map(|p| p.ts)
        .chain(r.logs.iter().map(|g| g.ts))
        .chain(r.drift.iter().map(|d| d.ts))
        .find(|&t| (t as i128) < lo || (t as i128) > hi);
    if let Some(t) = bad_ts {
        return Err(format!("accepted timestamp {t} outside [{lo}, {hi}]"));
    }
    let iv = r.interval_ms;
    if iv != 0 && !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&iv) {
        return Err(format!("accepted interval_ms {iv}"));
    }
    let bt = r.agent.boot_time;
    if bt != 0 && (bt < MIN_BOOT_TIME || bt as i128 > hi / 1_000_000_000) {
        return Err(format!("accepted boot_time {bt}"));
    }
    if r.checks.iter().any(|c| c.duration_ms > MAX_CHECK_MS) {
        return Err("accepted a check duration over a day".into());
    }
    Ok(())
}

fn fail(name: &str, body: &[u8], why: &str) -> ! {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-crashes");
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join(format!("{name}-{}.bin", body.len()));
    std::fs::write(&f, body).unwrap();
    panic!(
        "{why}\n(input from {name} kept in {}; replay with PHOENIX_FUZZ_SEED)",
        f.display()
    );
}

// ---- hostile values ----

const HOSTILE: &[&str] = &[
    "",
    " ",
    ",",
    "=",
    "\"",
    "\\",
    "\n",
    "\r\n",
    "\t",
    "\0",
    "x\nevil,host=a v=1 1",
    "a b,c=d",
    "\\",
    "é",
    "😀",
    "\u{202e}",
    "\u{feff}",
    "time",
    "_x",
    "cpu",
    "log",
    "phoenix_drift",
    "phoenix_audit",
    "i-0abc",
    "ami-1",
    "-",
    ".",
    "/",
    ":",
    "a:b/c.d-e_f",
];

fn short_hostile(rng: &mut Rng) -> String {
    let mut s = String::new();
    for _ in 0..rng.below(4) + 1 {
        s.push_str(HOSTILE[rng.below(HOSTILE.len())]);
    }
    s
}

fn hostile_string(rng: &mut Rng) -> String {
    let s = short_hostile(rng);
    match rng.below(12) {
        0 => s.repeat(rng.below(2000) + 1),
        1 => "a".repeat(*rng.pick(&[
            63, 64, 65, 127, 128, 129, 1024, 1025, 4096, 8192, 8193, 65535, 65536,
        ])),
        2 => char::from_u32(rng.below(0x11_0000) as u32)
            .map(String::from)
            .unwrap_or(s),
        _ => s,
    }
}

fn random_number(rng: &mut Rng) -> Value {
    match rng.below(8) {
        0 => json!(i64::MAX),
        1 => json!(i64::MIN),
        2 => json!(u64::MAX),
        3 => json!(-0.0),
        4 => json!(f64::MAX),
        5 => json!(f64::MIN_POSITIVE),
        6 => json!((rng.next() as f64) / 3.0),
        _ => json!(rng.next() as i64),
    }
}

fn random_value(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth > 3 { 5 } else { 8 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.chance(2)),
        2 | 3 => random_number(rng),
        4 => Value::String(hostile_string(rng)),
        5 => Value::Array(
            (0..rng.below(4))
                .map(|_| random_value(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let mut m = Map::new();
            for _ in 0..rng.below(4) {
                m.insert(hostile_string(rng), random_value(rng, depth + 1));
            }
            Value::Object(m)
        }
    }
}

/// Some node of `v`, reached by up to `steps` random steps down.
fn descend<'a>(v: &'a mut Value, rng: &mut Rng, steps: usize) -> &'a mut Value {
    let len = match &*v {
        Value::Object(m) => m.len(),
        Value::Array(a) => a.len(),
        _ => 0,
    };
    if steps == 0 || len == 0 {
        return v;
    }
    let i = rng.below(len);
    match v {
        Value::Object(m) => descend(m.iter_mut().nth(i).unwrap().1, rng, steps - 1),
        Value::Array(a) => descend(&mut a[i], rng, steps - 1),
        _ => unreachable!("only containers have children"),
    }
}

/// Mutate one node somewhere in `v`: descend at random, then change what is there.
fn mutate(v: &mut Value, rng: &mut Rng) {
    let steps = rng.below(6);
    let cur = descend(v, rng, steps);
    match (rng.below(9), cur) {
        (0, c) => *c = random_value(rng, 0),
        (1, Value::Object(m)) if !m.is_empty() => {
            let k = m.keys().nth(rng.below(m.len())).unwrap().clone();
            m.remove(&k);
        }
        (2, Value::Object(m)) => {
            // Many keys at once: the 10,000-tag report and its kin.
            let n = *rng.pick(&[1, 2, 17, 33, 257, 10_000]);
            let val = if n > 100 {
                Value::String(short_hostile(rng))
            } else {
                random_value(rng, 3)
            };
            let base = short_hostile(rng);
            for i in 0..n {
                m.insert(format!("{base}{i}"), val.clone());
            }
        }
        (3, Value::Array(a)) if !a.is_empty() => {
            let i = rng.below(a.len());
            let item = a[i].clone();
            // Copies enough to cross the point limit, but not gigabytes of a big item.
            let n = (*rng.pick(&[1, 2, 50, 501, 5000]))
                .min((4 << 20) / (item.to_string().len() + 1))
                .max(1);
            a.extend(std::iter::repeat_n(item, n));
        }
        (4, Value::Array(a)) if !a.is_empty() => {
            a.remove(rng.below(a.len()));
        }
        (5, c @ Value::String(_)) => *c = Value::String(hostile_string(rng)),
        (6, c @ Value::Number(_)) => *c = random_number(rng),
        (7, c @ Value::Number(_)) => *c = Value::String(c.to_string()),
        (_, c) => *c = Value::String(hostile_string(rng)),
    }
}

/// Replace free-text values (log messages, paths, tag values, string fields, check details)
/// with hostile text: reports that stay valid and so reach the round-trip check.
fn mutate_text(v: &mut Value, rng: &mut Rng, parent: &str) {
    match v {
        Value::Object(m) => {
            for (k, child) in m.iter_mut() {
                let ctx = if matches!(parent, "tags" | "fields") {
                    parent
                } else {
                    k.as_str()
                };
                mutate_text(child, rng, ctx);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|c| mutate_text(c, rng, parent)),
        Value::String(s)
            if matches!(
                parent,
                "msg" | "src" | "detail" | "path" | "note" | "tags" | "fields" | "target" | "error"
            ) && rng.chance(3) =>
        {
            *s = hostile_string(rng);
        }
        _ => {}
    }
}

/// Byte-level havoc: flips, splices, truncation, insertion of JSON-significant bytes.
fn havoc(b: &mut Vec<u8>, rng: &mut Rng) {
    for _ in 0..rng.below(4) + 1 {
        if b.is_empty() {
            b.push(b'{');
        }
        let i = rng.below(b.len());
        match rng.below(7) {
            0 => b[i] ^= 1 << rng.below(8),
            1 => b[i] = rng.next() as u8,
            2 => b.truncate(i),
            3 => {
                let toks: [&[u8]; 13] = [
                    b"\\ud800", b"\"", b"\\", b"{", b"[", b"]", b"}", b",", b":", b"1e999", b"-",
                    b"\x00", b"\xff",
                ];
                let tok = *rng.pick(&toks);
                b.splice(i..i, tok.iter().copied());
            }
            4 => {
                let j = rng.below(b.len());
                let (lo, hi) = (i.min(j), i.max(j));
                let chunk = b[lo..hi].to_vec();
                b.splice(i..i, chunk);
            }
            5 => {
                b.remove(i);
            }
            _ => {
                let j = rng.below(b.len());
                b.swap(i, j)
            }
        }
    }
}

fn report_summary(name: &str, st: &Stats, took: Duration, seed: u64) {
    println!(
        "{name}: {} executions in {:.1}s ({} accepted, {} too large, {} refused), peak decode allocation {} KiB, seed {seed}",
        st.execs,
        took.as_secs_f64(),
        st.ok,
        st.too_large,
        st.refused,
        st.max_peak >> 10
    );
}

#[test]
fn corpus_seeds_decode_as_labelled() {
    let l = limits();
    for (name, body) in corpus() {
        let r = decode(&body, is_gzip(&body), &l);
        if name.starts_with("valid-") {
            let rep = r.unwrap_or_else(|e| panic!("{name}: {e}"));
            accepted_is_sound(&rep, &l).unwrap_or_else(|e| panic!("{name}: {e}"));
        } else {
            assert!(r.is_err(), "{name} was accepted");
        }
        let mut st = Stats::default();
        check(&name, &body, is_gzip(&body), &l, &mut st);
    }
}

#[test]
fn structured_mutations_of_the_corpus() {
    let seeds: Vec<(String, Value)> =
        // The big seeds (4 MiB bomb, 10,000 tags) are checked as they are; mutating them
        // would spend the time budget on gzip rather than on the decoder.
        corpus().into_iter().map(|(n, b)| (n, if is_gzip(&b) { gunzip(&b) } else { b })).filter(|(_, j)| j.len() <= 64 << 10).filter_map(|(n, j)| serde_json::from_slice(&j).ok().map(|v| (n, v))).collect();
    assert!(seeds.len() >= 5);
    let (seed, l, end) = (seed(), limits(), Instant::now() + budget());
    let mut rng = Rng(seed);
    let mut st = Stats::default();
    let start = Instant::now();
    while Instant::now() < end {
        let (name, base) = rng.pick(&seeds);
        let mut v = base.clone();
        if rng.chance(2) {
            mutate_text(&mut v, &mut rng, "");
        }
        for _ in 0..rng.below(3) {
            mutate(&mut v, &mut rng);
        }
        let mut json = serde_json::to_vec(&v).unwrap();
        if rng.chance(5) {
            havoc(&mut json, &mut rng);
        }
        let gz = !rng.chance(4);
        let body = if gz { gzip(&json) } else { json };
        check(name, &body, gz, &l, &mut st);
    }
    report_summary("structured mutations", &st, start.elapsed(), seed);
    assert!(
        st.ok > 0 && st.refused > 0,
        "mutations never reached both outcomes: {st:?}"
    );
}

#[test]
fn byte_mutations_of_compressed_and_plain_bodies() {
    let seeds = corpus();
    let (seed, l, end) = (seed().wrapping_add(1), limits(), Instant::now() + budget());
    let mut rng = Rng(seed);
    let mut st = Stats::default();
    let start = Instant::now();
    while Instant::now() < end {
        let (name, base) = rng.pick(&seeds);
        let mut b = if rng.chance(2) && is_gzip(base) && base.len() < 8 << 10 {
            gunzip(base)
        } else {
            base.clone()
        };
        havoc(&mut b, &mut rng);
        // Sometimes compress the mutated JSON, sometimes hand mutated gzip over as gzip.
        let (body, gz) = match rng.below(3) {
            0 => (gzip(&b), true),
            1 => {
                let gz = is_gzip(&b);
                (b, gz)
            }
            _ => (b, true),
        };
        check(name, &body, gz, &l, &mut st);
    }
    report_summary("byte mutations", &st, start.elapsed(), seed);
}

#[test]
fn random_bytes_and_random_json() {
    let (seed, l, end) = (seed().wrapping_add(2), limits(), Instant::now() + budget());
    let mut rng = Rng(seed);
    let mut st = Stats::default();
    let start = Instant::now();
    while Instant::now() < end {
        let body: Vec<u8> = match rng.below(3) {
            0 => (0..rng.below(512)).map(|_| rng.next() as u8).collect(),
            1 => {
                let mut v = random_value(&mut rng, 0);
                if let Value::Object(m) = &mut v {
                    m.insert("v".into(), json!(1));
                }
                gzip(&serde_json::to_vec(&v).unwrap())
            }
            _ => {
                // A gzip bomb of random size and filler: must stop at the limit, never buffer it.
                let n = rng.below(1 << 20);
                let filler = *rng.pick(b" 0[\"");
                gzip(&vec![filler; n])
            }
        };
        let gz = is_gzip(&body);
        check("random", &body, gz, &l, &mut st);
    }
    report_summary("random bytes and JSON", &st, start.elapsed(), seed);
}
