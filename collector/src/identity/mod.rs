//! Who may speak for an instance id (`--identity`). The agent token is shared by a whole
//! fleet, so it only says "one of ours"; this gate ties each report's instance id to the box
//! that sent it, and bounds how many ids the collector will keep at all.
//!
//! - `tofu` (default): the first report for an id enrols it with the credential the agent
//!   presents (`X-Phoenix-Instance-Credential`, random, made once by the agent and kept in its
//!   state dir). Only its SHA-256 is kept. Later reports for that id must present the same one.
//! - `aws`: the EC2 instance identity document and its signature (see [`aws`]); the signed
//!   `instanceId` must be the report's instance id.
//! - `mtls`: the client certificate names the instance (checked in the report handler with
//!   [`crate::tls::check_identity`]).
//! - `shared`: no per-instance proof, as before; only with the explicit flag.
//!
//! In every mode at most `--max-instances` ids are known; a new id past it gets 429. Ids
//! that reported only briefly and fell silent are forgotten soon, others after a long silence.

pub mod aws;
pub mod enrolments;
#[cfg(test)]
mod fuzz;
pub mod http;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use axum::http::HeaderMap;

pub use enrolments::{
    Changed, Claimed, Enrolment, EnrolmentStore, FileEnrolments, NoStore, StoreError,
};

pub const CREDENTIAL_HEADER: &str = "x-phoenix-instance-credential";
pub const AWS_DOCUMENT_HEADER: &str = "x-phoenix-aws-identity-document";
pub const AWS_SIGNATURE_HEADER: &str = "x-phoenix-aws-identity-signature";
/// Told to the agent on the answer to the report that enrolled it.
pub const ENROLLED_HEADER: &str = "x-phoenix-enrolled";

/// `--identity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeName {
    Tofu,
    Aws,
    Mtls,
    Shared,
}

impl ModeName {
    pub fn parse(s: &str) -> Result<ModeName, String> {
        Ok(match s.trim() {
            "tofu" => ModeName::Tofu,
            "aws" => ModeName::Aws,
            "mtls" => ModeName::Mtls,
            "shared" => ModeName::Shared,
            other => {
                return Err(format!(
                    "--identity {other:?}: give tofu (default), aws, mtls or shared"
                ))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ModeName::Tofu => "tofu",
            ModeName::Aws => "aws",
            ModeName::Mtls => "mtls",
            ModeName::Shared => "shared",
        }
    }
}

/// The checked `--identity` settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub mode: ModeName,
    pub aws_identity_cert: Option<std::path::PathBuf>,
    pub aws_accounts: Vec<String>,
    pub limits: Limits,
}

impl Config {
    pub fn resolve(
        mode: Option<&str>,
        aws_identity_cert: Option<std::path::PathBuf>,
        aws_accounts: Vec<String>,
        max_instances: Option<usize>,
        client_ca: bool,
    ) -> anyhow::Result<Config> {
        let mode = match mode {
            Some(m) => ModeName::parse(m).map_err(anyhow::Error::msg)?,
            None if client_ca => ModeName::Mtls,
            None => ModeName::Tofu,
        };
        anyhow::ensure!(
            mode != ModeName::Mtls || client_ca,
            "--identity mtls needs --client-ca (and --tls-cert, --tls-key): the client certificate is the proof"
        );
        anyhow::ensure!(
            mode != ModeName::Aws || aws_identity_cert.is_some(),
            "--identity aws needs --aws-identity-cert FILE: the AWS public certificate for your region (PEM)"
        );
        anyhow::ensure!(
            aws_identity_cert.is_none() || mode == ModeName::Aws,
            "--aws-identity-cert is only used with --identity aws"
        );
        let max = max_instances.unwrap_or(Limits::default().max_instances);
        anyhow::ensure!(max > 0, "--max-instances must be at least 1");
        Ok(Config {
            mode,
            aws_identity_cert,
            aws_accounts: aws_accounts
                .into_iter()
                .map(|a| a.trim().to_owned())
                .filter(|a| !a.is_empty())
                .collect(),
            limits: Limits {
                max_instances: max,
                ..Limits::default()
            },
        })
    }

    /// The gate, with the tofu enrolments kept under `data_dir`, or in `shared` (the
    /// cluster's store, `--fleet-store`) when given.
    pub fn open(
        &self,
        data_dir: &std::path::Path,
        shared: Option<Box<dyn EnrolmentStore>>,
        now_ms: i64,
    ) -> anyhow::Result<Gate> {
        use anyhow::Context;
        let (mode, store): (Mode, Box<dyn EnrolmentStore>) = match self.mode {
            ModeName::Tofu => (
                Mode::Tofu,
                shared.unwrap_or_else(|| Box::new(FileEnrolments::new(data_dir))),
            ),
            ModeName::Mtls => (Mode::Mtls, Box::new(NoStore)),
            ModeName::Shared => {
                tracing::warn!("--identity shared: any holder of the agent token can report as any instance (forge drift, fail checks, get a healthy box recycled); use tofu, aws or mtls");
                (Mode::Shared, Box::new(NoStore))
            }
            ModeName::Aws => {
                let path = self.aws_identity_cert.as_ref().expect("checked in resolve");
                let certs = crate::tls::load_certs(path)
                    .with_context(|| format!("--aws-identity-cert {}", path.display()))?;
                let v = aws::AwsVerifier::new(certs, self.aws_accounts.clone())
                    .map_err(anyhow::Error::msg)?;
                (Mode::Aws(v), Box::new(NoStore))
            }
        };
        Gate::open(mode, self.limits, store, now_ms).context("loading enrolments")
    }
}

/// The mode with what it needs to check.
#[derive(Debug)]
pub enum Mode {
    Tofu,
    Aws(aws::AwsVerifier),
    Mtls,
    Shared,
}

impl Mode {
    pub fn name(&self) -> ModeName {
        match self {
            Mode::Tofu => ModeName::Tofu,
            Mode::Aws(_) => ModeName::Aws,
            Mode::Mtls => ModeName::Mtls,
            Mode::Shared => ModeName::Shared,
        }
    }
}

/// Limits on the ids the collector keeps.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `--max-instances`.
    pub max_instances: usize,
    /// An id that reported for less than this is "never established" …
    pub established_after_ms: i64,
    /// … and is forgotten after this much silence (an invented id, a box that died young).
    pub forget_unestablished_ms: i64,
    /// Every other id is forgotten after this much silence (a replaced box).
    pub forget_established_ms: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_instances: 10_000,
            established_after_ms: 10 * 60_000,
            forget_unestablished_ms: 15 * 60_000,
            forget_established_ms: 7 * 24 * 3_600_000,
        }
    }
}

/// What a request presented besides the agent token.
#[derive(Debug, Default, Clone, Copy)]
pub struct Presented<'a> {
    pub credential: Option<&'a str>,
    pub aws_document: Option<&'a str>,
    pub aws_signature: Option<&'a str>,
}

impl<'a> Presented<'a> {
    pub fn from_headers(h: &'a HeaderMap) -> Presented<'a> {
        let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok());
        Presented {
            credential: get(CREDENTIAL_HEADER),
            aws_document: get(AWS_DOCUMENT_HEADER),
            aws_signature: get(AWS_SIGNATURE_HEADER),
        }
    }
}

/// Why a report may not speak for its instance id.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// 403: the sender cannot prove it is that instance.
    Forbidden(String),
    /// 429: a new id past `--max-instances`.
    Full(String),
    /// 503: the enrolment could not be recorded; retry.
    Store(String),
}

impl From<Refusal> for crate::reply::ApiError {
    fn from(r: Refusal) -> Self {
        use crate::reply::ApiError;
        match r {
            Refusal::Forbidden(m) => ApiError::Forbidden(m),
            // A new id stays refused until an old one is forgotten: no point retrying soon.
            Refusal::Full(m) => ApiError::too_many(std::time::Duration::from_secs(60), m),
            Refusal::Store(m) => ApiError::unavailable(std::time::Duration::from_secs(5), m),
        }
    }
}

/// How a report passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    Known,
    /// Its first report: the id is now enrolled (tofu) or counted.
    New,
}

#[derive(Debug, Clone)]
struct Known {
    /// SHA-256 of the credential (tofu only).
    cred: Option<[u8; 32]>,
    /// Its enrolment is being written to the store (outside the lock: an fsync per new id
    /// under it would stall every report of every known id behind a flood of new ones).
    pending: bool,
    enrolled_ms: i64,
    first_ms: i64,
    last_ms: i64,
}

/// The gate every report passes after decoding and before anything else is done with it.
#[derive(Debug)]
pub struct Gate {
    mode: Mode,
    limits: Limits,
    store: Box<dyn EnrolmentStore>,
    known: Mutex<HashMap<String, Known>>,
    /// New ids refused because the collector was full (an alert for operators).
    pub refused_full: AtomicU64,
    last_full_warning_ms: Mutex<i64>,
}

fn sha256(s: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn mismatch(instance_id: &str) -> Refusal {
    Refusal::Forbidden(format!(
        "instance {instance_id:?} is enrolled with another credential: only the box that enrolled it may report for it. If that box lost its state dir, a reader or recycler resets the enrolment: DELETE /v1/instances/{instance_id}/enrolment"
    ))
}

/// Drops cached enrolments another collector reset or replaced (the next report for such an
/// id asks the store again).
fn drop_changed(known: &mut HashMap<String, Known>, c: Changed) {
    match c {
        Changed::Ids(ids) => {
            for id in ids {
                known.remove(&id);
            }
        }
        // A claim still being written is not in a snapshot read before it landed; its own
        // claim, which the store answers, decides it.
        Changed::All(stored) => known.retain(|id, k| {
            k.pending
                || k.cred.is_none_or(|have| {
                    stored
                        .get(id)
                        .and_then(|e| unhex(&e.credential_sha256))
                        .is_some_and(|want| ct_eq(&want, &have))
                })
        }),
    }
}

fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A credential as the agent makes it: 32..=256 visible ASCII characters.
fn credential_ok(c: &str) -> bool {
    (32..=256).contains(&c.len()) && c.bytes().all(|b| b.is_ascii_graphic())
}

fn no_credential() -> Refusal {
    Refusal::Forbidden(format!(
        "no instance credential: this collector runs --identity tofu, so reports must carry the agent's {CREDENTIAL_HEADER} header (upgrade phoenix-agent, or start the collector with --identity shared)"
    ))
}

fn no_aws_document() -> Refusal {
    Refusal::Forbidden(format!(
        "this collector runs --identity aws: send the EC2 instance identity document and signature ({AWS_DOCUMENT_HEADER}, {AWS_SIGNATURE_HEADER}; phoenix-agent run --identity aws)"
    ))
}

impl Gate {
    /// Load the enrolments the store kept.
    pub fn open(
        mode: Mode,
        limits: Limits,
        store: Box<dyn EnrolmentStore>,
        now_ms: i64,
    ) -> Result<Gate, StoreError> {
        let mut known = HashMap::new();
        for (id, e) in store.load()? {
            let Some(cred) = unhex(&e.credential_sha256) else {
                tracing::warn!(instance_id = %id, "enrolment with an unreadable hash skipped; the instance enrols again");
                continue;
            };
            // Silence is counted from this start: the collector was not listening before.
            known.insert(
                id,
                Known {
                    cred: Some(cred),
                    pending: false,
                    enrolled_ms: e.enrolled_ms,
                    first_ms: e.enrolled_ms.min(now_ms),
                    last_ms: now_ms,
                },
            );
        }
        Ok(Gate {
            mode,
            limits,
            store,
            known: Mutex::new(known),
            refused_full: AtomicU64::new(0),
            last_full_warning_ms: Mutex::new(i64::MIN),
        })
    }

    /// `--identity shared` with default limits and nothing stored (unit tests of other modules).
    pub fn shared_for_tests() -> Gate {
        Gate::open(Mode::Shared, Limits::default(), Box::new(NoStore), 0)
            .expect("NoStore loads nothing")
    }

    pub fn mode(&self) -> ModeName {
        self.mode.name()
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Ids known now (enrolled or counted).
    pub fn len(&self) -> usize {
        self.known.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Before the body is read: the rate-limit key of the proof this request carries of who
    /// sent it. Only a proof the sender holds keys a bucket, so a forger cannot spend its
    /// victim's: the credential's hash (tofu), the signature's (aws), the client
    /// certificate's (mtls). `shared` has none, nor a request without its mode's proof (that
    /// one is refused after decoding, whose 400s come first): only the token and the peer
    /// address limit those.
    pub fn caller_key(&self, p: &Presented, cert: Option<&crate::tls::PeerCert>) -> Option<String> {
        match &self.mode {
            Mode::Tofu => p.credential.map(|c| format!("cred/{}", hex(&sha256(c)))),
            Mode::Aws(_) => p
                .aws_document
                .and(p.aws_signature)
                .map(|s| format!("aws/{}", hex(&sha256(s)))),
            Mode::Mtls => cert.map(|c| {
                let d = ring::digest::digest(&ring::digest::SHA256, c.0.as_ref());
                format!("cert/{}", hex(d.as_ref()))
            }),
            Mode::Shared => None,
        }
    }

    /// May this request speak for `instance_id`? Enrols it on its first report.
    pub fn admit(
        &self,
        instance_id: &str,
        p: &Presented,
        now_ms: i64,
    ) -> Result<Admitted, Refusal> {
        let cred = match &self.mode {
            Mode::Tofu => {
                let Some(c) = p.credential else {
                    return Err(no_credential());
                };
                if !credential_ok(c) {
                    return Err(Refusal::Forbidden(format!(
                        "{CREDENTIAL_HEADER} must be 32 to 256 visible ASCII characters"
                    )));
                }
                Some(sha256(c))
            }
            Mode::Aws(v) => {
                let (Some(d), Some(s)) = (p.aws_document, p.aws_signature) else {
                    return Err(no_aws_document());
                };
                let doc = v.verify(d, s).map_err(Refusal::Forbidden)?;
                if doc.instance_id != instance_id {
                    return Err(Refusal::Forbidden(format!(
                        "the signed instance identity document is for {:?}, not {instance_id:?}: an instance may only report for itself",
                        doc.instance_id
                    )));
                }
                None
            }
            Mode::Mtls | Mode::Shared => None,
        };
        let mut g = self.known.lock().unwrap();
        if let Some(c) = self.store.changed() {
            drop_changed(&mut g, c);
        }
        if let Some(k) = g.get_mut(instance_id) {
            if let (Some(want), Some(got)) = (&k.cred, &cred) {
                if !ct_eq(want, got) {
                    return Err(mismatch(instance_id));
                }
            }
            if k.pending {
                // Not yet durable: answering it now could let a crash hand the id to another.
                return Err(Refusal::Store(format!(
                    "the enrolment of {instance_id:?} is being recorded; retry"
                )));
            }
            k.last_ms = k.last_ms.max(now_ms);
            return Ok(Admitted::Known);
        }
        if g.len() >= self.limits.max_instances {
            drop(g);
            self.refused_full.fetch_add(1, Ordering::Relaxed);
            let mut w = self.last_full_warning_ms.lock().unwrap();
            if now_ms.saturating_sub(*w) >= 60_000 {
                *w = now_ms;
                tracing::warn!(instance_id = %instance_id, max_instances = self.limits.max_instances, refused = self.refused_full.load(Ordering::Relaxed), "ALERT: the collector knows --max-instances ids; new instances are refused (429) until silent ones are forgotten; raise --max-instances if the fleet really is this big");
            }
            return Err(Refusal::Full(format!(
                "this collector already knows {} instances (--max-instances); new instance {instance_id:?} refused, retry later",
                self.limits.max_instances
            )));
        }
        // Claimed now (the cap counts it, a rival credential is refused, a retry of the same
        // one waits), durable below: the store is written without the gate's lock, so known
        // instances keep verifying meanwhile (and while a shared store is down).
        g.insert(
            instance_id.to_owned(),
            Known {
                cred,
                pending: cred.is_some(),
                enrolled_ms: now_ms,
                first_ms: now_ms,
                last_ms: now_ms,
            },
        );
        drop(g);
        let Some(c) = &cred else {
            return Ok(Admitted::New);
        };
        let e = Enrolment {
            credential_sha256: hex(c),
            enrolled_ms: now_ms,
        };
        // A shared store decides the first writer itself, across collectors.
        let claimed = self.store.claim(instance_id, &e);
        let mut g = self.known.lock().unwrap();
        let ours = g.get(instance_id).map(|k| k.pending && k.cred == cred);
        match (claimed, ours) {
            (Ok(claimed), Some(was_ours)) => {
                // The first writer's credential stands, wherever it enrolled. When the
                // cached claim is no longer ours (another collector's change dropped it and
                // a rival's took its place), the store's answer still decides: the rival's
                // own claim gets the same one.
                let first = matches!(
                    unhex(&claimed.stored.credential_sha256),
                    Some(want) if ct_eq(&want, c)
                );
                if !first {
                    if was_ours {
                        g.remove(instance_id);
                    }
                    return Err(mismatch(instance_id));
                }
                // Ours was inserted by this call at now_ms and left alone while pending.
                g.insert(
                    instance_id.to_owned(),
                    Known {
                        cred,
                        pending: false,
                        enrolled_ms: claimed.stored.enrolled_ms,
                        first_ms: claimed.stored.enrolled_ms.min(now_ms),
                        last_ms: now_ms,
                    },
                );
                drop(g);
                if claimed.new {
                    tracing::info!(instance_id = %instance_id, "instance enrolled (tofu)");
                    Ok(Admitted::New)
                } else {
                    Ok(Admitted::Known)
                }
            }
            (Ok(claimed), None) => {
                // Reset while it was being written: the store must not keep it either.
                drop(g);
                if claimed.new {
                    if let Err(e) = self.store.removed(instance_id) {
                        tracing::warn!(error = %e, instance_id = %instance_id, "cannot record the reset of an enrolment made meanwhile");
                    }
                }
                Err(Refusal::Store(format!(
                    "the enrolment of {instance_id:?} was reset while it was recorded; retry"
                )))
            }
            (Err(e), ours) => {
                if ours == Some(true) {
                    g.remove(instance_id);
                }
                drop(g);
                tracing::error!(error = %e, instance_id = %instance_id, "cannot record an enrolment");
                Err(Refusal::Store(format!(
                    "cannot record the enrolment now ({e}); keep the batch and retry"
                )))
            }
        }
    }

    /// Whether `instance_id` is known (a report for it cannot enrol, so the store is not written).
    pub fn is_known(&self, instance_id: &str) -> bool {
        self.known.lock().unwrap().contains_key(instance_id)
    }

    /// Forget an id's enrolment, so the next report for it enrols afresh. `Ok(false)` when
    /// it was not known.
    pub fn reset(&self, instance_id: &str) -> Result<bool, StoreError> {
        let here = self.known.lock().unwrap().contains_key(instance_id);
        // A shared store knows ids enrolled through other collectors too.
        let was = self.store.reset(instance_id, here)?;
        self.known.lock().unwrap().remove(instance_id);
        Ok(was)
    }

    /// When the id enrolled, if it is known.
    pub fn enrolled_ms(&self, instance_id: &str) -> Option<i64> {
        self.known
            .lock()
            .unwrap()
            .get(instance_id)
            .map(|k| k.enrolled_ms)
    }

    /// Forget ids silent past their limit; returns them (the fleet forgets them too).
    pub fn sweep(&self, now_ms: i64) -> Vec<String> {
        let l = self.limits;
        let mut g = self.known.lock().unwrap();
        let stale: Vec<String> = g
            .iter()
            .filter(|(_, k)| {
                let lived = k.last_ms.saturating_sub(k.first_ms);
                let silent = now_ms.saturating_sub(k.last_ms);
                if lived < l.established_after_ms {
                    silent > l.forget_unestablished_ms
                } else {
                    silent > l.forget_established_ms
                }
            })
            .map(|(id, _)| id.clone())
            .collect();
        let mut gone = Vec::with_capacity(stale.len());
        for id in stale {
            if g[&id].cred.is_some() {
                if let Err(e) = self.store.forgotten(&id) {
                    tracing::warn!(error = %e, "cannot forget an enrolment now; trying again later");
                    continue;
                }
            }
            g.remove(&id);
            gone.push(id);
        }
        if !gone.is_empty() {
            tracing::info!(
                forgotten = gone.len(),
                "silent instances forgotten by the identity gate"
            );
        }
        gone
    }
}

/// Forget silent ids every `every`, off the async threads (the store may fsync); the fleet
/// forgets them too, so `--max-instances` bounds the fleet state as well as the gate.
pub async fn sweep_every(
    gate: std::sync::Arc<Gate>,
    fleet: std::sync::Arc<crate::fleet::Fleet>,
    every: std::time::Duration,
) {
    loop {
        tokio::time::sleep(every).await;
        let (g, f) = (gate.clone(), fleet.clone());
        tokio::task::spawn_blocking(move || {
            let gone = g.sweep(crate::fleet::clock::wall_now_ms());
            if !gone.is_empty() {
                f.forget(&gone);
            }
        })
        .await
        .ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0123456789abcdef0123456789abcdef-box-a";
    const B: &str = "0123456789abcdef0123456789abcdef-box-b";

    fn tofu(limits: Limits) -> Gate {
        Gate::open(Mode::Tofu, limits, Box::new(NoStore), 0).unwrap()
    }

    fn with(c: &str) -> Presented<'_> {
        Presented {
            credential: Some(c),
            ..Default::default()
        }
    }

    #[test]
    fn tofu_binds_an_id_to_its_first_credential() {
        let g = tofu(Limits::default());
        assert_eq!(g.admit("i-1", &with(A), 1), Ok(Admitted::New));
        assert_eq!(g.admit("i-1", &with(A), 2), Ok(Admitted::Known));
        let Err(Refusal::Forbidden(why)) = g.admit("i-1", &with(B), 3) else {
            panic!("another credential must be refused")
        };
        assert!(why.contains("/v1/instances/i-1/enrolment"), "{why}");
        let Err(Refusal::Forbidden(why)) = g.admit("i-1", &Presented::default(), 3) else {
            panic!("no credential must be refused")
        };
        assert!(why.contains("--identity shared"), "{why}");
        assert!(matches!(
            g.admit("i-1", &with("short"), 3),
            Err(Refusal::Forbidden(_))
        ));
        // A reset lets the box with a fresh state dir enrol again.
        assert!(g.reset("i-1").unwrap());
        assert!(!g.reset("i-1").unwrap());
        assert_eq!(g.admit("i-1", &with(B), 4), Ok(Admitted::New));
        assert!(g.admit("i-1", &with(A), 5).is_err());
    }

    #[test]
    fn enrolments_survive_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let open = || {
            Gate::open(
                Mode::Tofu,
                Limits::default(),
                Box::new(FileEnrolments::new(d.path())),
                10,
            )
            .unwrap()
        };
        let g = open();
        g.admit("i-1", &with(A), 1).unwrap();
        g.admit("i-2", &with(B), 1).unwrap();
        g.reset("i-2").unwrap();
        drop(g);
        let g = open();
        assert_eq!(g.len(), 1);
        assert_eq!(g.admit("i-1", &with(A), 11), Ok(Admitted::Known));
        assert!(g.admit("i-1", &with(B), 11).is_err());
        assert_eq!(g.admit("i-2", &with(A), 11), Ok(Admitted::New));
        let text = std::fs::read_to_string(d.path().join("enrolments.log")).unwrap();
        assert!(
            !text.contains(A) && !text.contains(B),
            "only hashes: {text}"
        );
    }

    #[test]
    fn the_cap_refuses_new_ids_and_forgetting_frees_room() {
        let l = Limits {
            max_instances: 2,
            ..Limits::default()
        };
        let g = Gate::open(Mode::Shared, l, Box::new(NoStore), 0).unwrap();
        let none = Presented::default();
        g.admit("i-1", &none, 0).unwrap();
        g.admit("i-2", &none, 0).unwrap();
        assert!(matches!(g.admit("i-3", &none, 0), Err(Refusal::Full(_))));
        // Known ids keep being served at the cap.
        assert_eq!(g.admit("i-1", &none, 1), Ok(Admitted::Known));
        assert_eq!(g.refused_full.load(Ordering::Relaxed), 1);
        // i-1 keeps reporting for an hour and is established; i-2 fell silent at once.
        let hour = 3_600_000;
        g.admit("i-1", &none, hour).unwrap();
        assert!(g.sweep(hour).contains(&"i-2".to_string()));
        assert_eq!(g.admit("i-3", &none, hour), Ok(Admitted::New));
        // A day of silence does not forget an established id; a week does.
        assert!(g.sweep(hour + 24 * hour).iter().all(|i| i != "i-1"));
        assert!(g.sweep(hour + 8 * 24 * hour).contains(&"i-1".to_string()));
    }

    #[test]
    fn shared_and_mtls_need_nothing_here() {
        for m in [Mode::Shared, Mode::Mtls] {
            let g = Gate::open(m, Limits::default(), Box::new(NoStore), 0).unwrap();
            assert_eq!(g.admit("i-1", &Presented::default(), 0), Ok(Admitted::New));
        }
    }
}
