//! Config drift: hash the watched files into a Merkle root, compare with the baked baseline.
//!
//! `bake` (last step of an image build) writes the baseline manifest; `drift` compares the box
//! with it once; [`DriftSource`] keeps the comparison current inside `run` with inotify plus a
//! periodic full rescan. Everything here only reads the watched files, and only hashes and
//! paths leave the box, never contents. The hash itself lives in [`phoenix_wire::drift`] so the
//! collector computes exactly the same roots and diffs.

mod glob;
pub mod link;
pub mod scan;
mod watch;

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use phoenix_wire::drift::{diff, Manifest, MANIFEST_VERSION};

pub use glob::{Excludes, DEFAULT_EXCLUDES};
pub use link::DriftLink;
pub use scan::{path_text, Scanner, Tree};
pub use watch::DriftSource;

/// Where an image build puts the baseline when the state dir has none.
pub const BAKED_BASELINE: &str = "/usr/share/phoenix-agent/baseline.json";

#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    #[error("reading baseline {0}: {1} (bake one with `phoenix-agent bake --drift-path PATH --image-id ID --out FILE`, or point --baseline at it)")]
    ReadBaseline(PathBuf, io::Error),
    #[error("baseline {0} is not a usable manifest: {1}")]
    BadBaseline(PathBuf, String),
    #[error("no baseline: looked for {0} and {BAKED_BASELINE}; give --baseline FILE (bake one with `phoenix-agent bake`)")]
    NoBaseline(PathBuf),
    #[error("--image-id {0:?} is not a valid id: use 1-128 chars of A-Z a-z 0-9 - _ . : /")]
    BadImageId(String),
    #[error("writing the baseline to {0}: {1} (does the directory exist and is it writable?)")]
    Write(PathBuf, io::Error),
    #[error("registering the baseline at {url}: {msg}")]
    Register { url: String, msg: String },
}

/// Threads for one-off scans (bake, drift): BLAKE3 is fast enough that two threads keep a
/// disk or the page cache busy; more only contend on 2-core boxes.
pub fn scan_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4)
}

/// The baseline to use: `explicit` if given, else `<state_dir>/baseline.json`, else the baked
/// [`BAKED_BASELINE`], whichever exists first.
pub fn find_baseline(explicit: Option<&Path>, state_dir: &Path) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    [
        state_dir.join("baseline.json"),
        PathBuf::from(BAKED_BASELINE),
    ]
    .into_iter()
    .find(|p| p.exists())
}

/// Read and verify a manifest (version, order, root matches entries).
pub fn load_baseline(path: &Path) -> Result<Manifest, DriftError> {
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut text))
        .map_err(|e| DriftError::ReadBaseline(path.into(), e))?;
    let m: Manifest = serde_json::from_slice(&text)
        .map_err(|e| DriftError::BadBaseline(path.into(), e.to_string()))?;
    m.verify()
        .map_err(|e| DriftError::BadBaseline(path.into(), e))?;
    Ok(m)
}

/// The image id recorded in the baseline `run` would use, for identity discovery.
pub fn baked_image_id(explicit: Option<&Path>, state_dir: &Path) -> Option<String> {
    let p = find_baseline(explicit, state_dir)?;
    load_baseline(&p).ok().map(|m| m.image_id)
}

/// Flags of `phoenix-agent bake`.
#[derive(clap::Args, Debug, Clone)]
pub struct BakeArgs {
    /// Path whose files are hashed (repeatable); directories are walked, symlinks not followed.
    #[arg(long = "drift-path", required = true, value_delimiter = ',')]
    pub drift_path: Vec<PathBuf>,
    /// Glob excluded on top of the defaults (repeatable). With a `/` it matches the whole path,
    /// without one the file name; `**` crosses directories.
    #[arg(long = "drift-exclude", value_delimiter = ',')]
    pub drift_exclude: Vec<String>,
    /// The image being built, e.g. ami-0123 or web-2024-06-01.
    #[arg(long, env = "PHOENIX_IMAGE_ID")]
    pub image_id: String,
    /// Where to write the manifest, e.g. /usr/share/phoenix-agent/baseline.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Collector base URL to register the baseline with (POST /v1/images/{image_id}/baseline).
    #[arg(long)]
    pub register: Option<String>,
    /// Pipeline token for --register.
    #[arg(long, env = "PHOENIX_PIPELINE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Flags of `phoenix-agent drift`.
#[derive(clap::Args, Debug, Clone)]
pub struct DriftArgs {
    /// Baseline manifest [default: <state-dir>/baseline.json, else /usr/share/phoenix-agent/baseline.json].
    #[arg(long, env = "PHOENIX_BASELINE")]
    pub baseline: Option<PathBuf>,
    /// State dir of the agent, where a baseline.json may be.
    #[arg(
        long,
        env = "PHOENIX_STATE_DIR",
        default_value = "/var/lib/phoenix-agent"
    )]
    pub state_dir: PathBuf,
    /// Print the result as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Scan and build a manifest (entries sorted, root computed from the cached leaves).
pub fn make_manifest(scanner: &Scanner, image_id: &str) -> Manifest {
    let tree = scanner.full_scan();
    Manifest {
        version: MANIFEST_VERSION,
        hash_version: phoenix_wire::drift::HASH_VERSION,
        image_id: image_id.to_string(),
        created: rfc3339_utc(std::time::SystemTime::now()),
        paths: scanner.roots().iter().map(|p| path_text(p)).collect(),
        excludes: scanner.excludes().texts(),
        root: tree.root(),
        entries: tree.entries(),
    }
}

/// `phoenix-agent bake`: scan, write the manifest atomically, optionally register it.
pub fn bake(args: BakeArgs) -> Result<u8, DriftError> {
    if !phoenix_wire::valid_id(&args.image_id) {
        return Err(DriftError::BadImageId(args.image_id));
    }
    let out = std::path::absolute(&args.out).unwrap_or(args.out.clone());
    let mut excludes: Vec<String> = DEFAULT_EXCLUDES.iter().map(|s| s.to_string()).collect();
    excludes.extend(args.drift_exclude.iter().cloned());
    // The manifest must not describe itself: when written inside a watched tree it would
    // otherwise show up as "added" on every later scan.
    excludes.push(path_text(&out));
    let scanner = Scanner::new(&args.drift_path, Excludes::new(&excludes), scan_threads());
    let t = Instant::now();
    let m = make_manifest(&scanner, &args.image_id);
    let took = t.elapsed();
    let json = serde_json::to_vec_pretty(&m).expect("a manifest always serialises");
    crate::spool::write_atomic(&out, &json).map_err(|e| DriftError::Write(out.clone(), e))?;
    println!(
        "baked {} entries of {} in {} ms: root {} -> {}",
        m.entries.len(),
        m.paths.join(", "),
        took.as_millis(),
        m.root,
        out.display()
    );
    if let Some(url) = &args.register {
        let status = register(url, args.token.as_deref(), &m, &json)?;
        println!(
            "registered with {url} for image {} (HTTP {status})",
            m.image_id
        );
    }
    Ok(0)
}

/// POST the manifest to the collector; 200 and 201 are success, anything else an error that
/// carries the collector's answer.
pub fn register(
    base: &str,
    token: Option<&str>,
    m: &Manifest,
    json: &[u8],
) -> Result<u16, DriftError> {
    let url = format!(
        "{}/v1/images/{}/baseline",
        base.trim_end_matches('/'),
        m.image_id
    );
    let err = |msg: String| DriftError::Register {
        url: url.clone(),
        msg,
    };
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return Err(err(
            "give --register a URL such as https://collector.internal:7070".into(),
        ));
    }
    let cfg = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .build();
    let http = ureq::Agent::new_with_config(cfg);
    let mut req = http.post(&url).header("Content-Type", "application/json");
    if let Some(t) = token {
        req = req.header("Authorization", &format!("Bearer {t}"));
    }
    let mut resp = req
        .send(json)
        .map_err(|e| err(format!("cannot reach the collector: {e}")))?;
    let status = resp.status().as_u16();
    let mut body = String::new();
    resp.body_mut()
        .as_reader()
        .take(8192)
        .read_to_string(&mut body)
        .ok();
    match status {
        200 | 201 => Ok(status),
        401 | 403 => Err(err(format!(
            "HTTP {status}: {} (check --token: registering needs the collector's pipeline token)",
            body.trim()
        ))),
        _ => Err(err(format!("HTTP {status}: {}", body.trim()))),
    }
}

/// `phoenix-agent drift`: rescan the manifest's own paths and excludes, print the differences.
/// 0 clean, 1 drifted.
pub fn drift(args: DriftArgs) -> Result<u8, DriftError> {
    let path = find_baseline(args.baseline.as_deref(), &args.state_dir)
        .ok_or_else(|| DriftError::NoBaseline(args.state_dir.join("baseline.json")))?;
    let base = load_baseline(&path)?;
    if !phoenix_wire::drift::computes(base.hash_version) {
        return Err(DriftError::BadBaseline(
            path,
            format!(
                "its drift hash version {} is not computed by this agent (v{}): no comparison is possible; use the phoenix-agent that baked it",
                base.hash_version,
                phoenix_wire::drift::HASH_VERSION
            ),
        ));
    }
    let roots: Vec<PathBuf> = base.paths.iter().map(PathBuf::from).collect();
    let scanner = Scanner::new(&roots, Excludes::new(&base.excludes), scan_threads());
    let t = Instant::now();
    let tree = scanner.full_scan();
    let took = t.elapsed();
    let root = tree.root();
    let changes = if root == base.root {
        Vec::new()
    } else {
        diff(&base.entries, &tree.entries())
    };
    let clean = changes.is_empty();
    if args.json {
        let out = serde_json::json!({
            "clean": clean, "baseline": path.display().to_string(), "image_id": base.image_id,
            "baseline_root": base.root, "root": root, "entries": tree.len(), "scan_ms": took.as_millis() as u64, "changes": changes,
        });
        println!("{out}");
    } else if clean {
        println!(
            "clean: {} entries match baseline {} (image {}, baked {}), root {} [{} ms]",
            tree.len(),
            path.display(),
            base.image_id,
            base.created,
            root,
            took.as_millis()
        );
    } else {
        println!(
            "DRIFTED: {} of {} entries differ from baseline {} (image {}, baked {}) [{} ms]",
            changes.len(),
            tree.len(),
            path.display(),
            base.image_id,
            base.created,
            took.as_millis()
        );
        println!("  baseline root {}\n  current root  {}", base.root, root);
        for c in &changes {
            if c.attrs.is_empty() {
                println!("  {:<8} {}", c.change, c.path);
            } else {
                println!("  {:<8} {}  ({})", c.change, c.path, c.attrs.join(", "));
            }
        }
    }
    Ok(if clean { 0 } else { 1 })
}

/// RFC 3339 UTC with second precision, from the civil-from-days conversion (proleptic Gregorian).
pub fn rfc3339_utc(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (year, month, day) = phoenix_wire::civil::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests;
