//! How this agent proves to the collector which instance it is (the collector's
//! `--identity`). The agent token is shared by the fleet; this is per box.
//!
//! - Always: a random instance credential, made once and kept in `<state-dir>/instance-credential`
//!   (mode 600), sent with every report. The collector (`--identity tofu`) binds the instance
//!   id to it on the first report and refuses reports for that id without it. The agent makes
//!   it, not the collector, so an answer lost on the way can never lock the box out.
//! - `--identity aws`: also the EC2 instance identity document and its signature from IMDSv2,
//!   which the collector verifies against AWS's certificate.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context;
use base64::Engine;

pub const CREDENTIAL_HEADER: &str = "X-Phoenix-Instance-Credential";
pub const AWS_DOCUMENT_HEADER: &str = "X-Phoenix-AWS-Identity-Document";
pub const AWS_SIGNATURE_HEADER: &str = "X-Phoenix-AWS-Identity-Signature";
const CREDENTIAL_FILE: &str = "instance-credential";

/// What goes with every report.
#[derive(Clone)]
pub struct Proof {
    pub credential: String,
    pub aws: Option<AwsProof>,
}

/// Never prints the credential.
impl std::fmt::Debug for Proof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proof")
            .field("aws", &self.aws.as_ref().map(|a| &a.instance_id))
            .finish_non_exhaustive()
    }
}

/// The identity document (base64 of IMDS's exact bytes) and signature, as sent.
#[derive(Debug, Clone)]
pub struct AwsProof {
    pub document_b64: String,
    pub signature_b64: String,
    pub instance_id: String,
    pub image_id: Option<String>,
}

static PROOF: OnceLock<Proof> = OnceLock::new();

/// Set once at start; later calls are ignored (tests in one process).
pub fn install(p: Proof) {
    PROOF.set(p).ok();
}

/// The hook where the agent builds a request to the collector.
pub fn present<B>(mut req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
    if let Some(p) = PROOF.get() {
        req = req.header(CREDENTIAL_HEADER, &p.credential);
        if let Some(a) = &p.aws {
            req = req
                .header(AWS_DOCUMENT_HEADER, &a.document_b64)
                .header(AWS_SIGNATURE_HEADER, &a.signature_b64);
        }
    }
    req
}

/// The credential in `state_dir`, made (64 hex chars from the kernel's random source) on the
/// first start. A credential file others can read is refused: it speaks for this box.
pub fn credential(state_dir: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let path = state_dir.join(CREDENTIAL_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let mode = std::fs::metadata(&path)?.permissions().mode();
            anyhow::ensure!(
                mode & 0o077 == 0,
                "{} is readable by others (mode {:o}); chmod 600 it",
                path.display(),
                mode & 0o777
            );
            let s = s.trim().to_owned();
            anyhow::ensure!(
                s.len() >= 32 && s.bytes().all(|b| b.is_ascii_graphic()),
                "{} is damaged; delete it and reset the enrolment at the collector (DELETE /v1/instances/ID/enrolment)",
                path.display()
            );
            Ok(s)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut b = [0u8; 32];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut b))
                .context("reading /dev/urandom")?;
            let s: String = b.iter().map(|x| format!("{x:02x}")).collect();
            // Written aside and renamed, so a crash never leaves half a credential.
            let tmp = state_dir.join(format!("{CREDENTIAL_FILE}.tmp"));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            f.write_all(s.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("renaming {} into place", tmp.display()))?;
            tracing::info!(file = %path.display(), "made this instance's credential");
            Ok(s)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// IMDSv2: a session token, then the identity document and its signature.
pub fn fetch_aws(imds_url: &str, timeout: Duration) -> anyhow::Result<AwsProof> {
    let cfg = crate::tls::lean_buffers(ureq::Agent::config_builder())
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build();
    let agent = ureq::Agent::new_with_config(cfg);
    let base = imds_url.trim_end_matches('/');
    let read = |r: Result<ureq::http::Response<ureq::Body>, ureq::Error>, what: &str| {
        let mut r = r.with_context(|| format!("IMDS {what}: {base} does not answer"))?;
        anyhow::ensure!(
            r.status() == 200,
            "IMDS {what}: HTTP {} from {base}",
            r.status()
        );
        let mut s = String::new();
        r.body_mut()
            .as_reader()
            .take(16 << 10)
            .read_to_string(&mut s)
            .with_context(|| format!("IMDS {what}: reading the answer"))?;
        Ok(s)
    };
    let token = read(
        agent
            .put(&format!("{base}/latest/api/token"))
            .header("X-aws-ec2-metadata-token-ttl-seconds", "300")
            .send_empty(),
        "token",
    )?;
    let get = |p: &str| {
        read(
            agent
                .get(&format!("{base}/latest/dynamic/instance-identity/{p}"))
                .header("X-aws-ec2-metadata-token", token.trim())
                .call(),
            p,
        )
    };
    let document = get("document")?;
    let signature = get("signature")?;
    let v: serde_json::Value = serde_json::from_str(&document)
        .context("IMDS document: not the JSON instance identity document")?;
    let instance_id = v["instanceId"]
        .as_str()
        .context("IMDS document has no instanceId")?
        .to_owned();
    let b64 = base64::engine::general_purpose::STANDARD;
    Ok(AwsProof {
        document_b64: b64.encode(document.as_bytes()),
        signature_b64: signature.split_whitespace().collect(),
        instance_id,
        image_id: v["imageId"].as_str().map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_is_made_once_kept_private_and_stable() {
        let d = tempfile::tempdir().unwrap();
        let a = credential(d.path()).unwrap();
        assert_eq!(a.len(), 64);
        assert_eq!(credential(d.path()).unwrap(), a);
        use std::os::unix::fs::PermissionsExt;
        let p = d.path().join(CREDENTIAL_FILE);
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(credential(d.path())
            .unwrap_err()
            .to_string()
            .contains("chmod 600"));
        let other = tempfile::tempdir().unwrap();
        assert_ne!(credential(other.path()).unwrap(), a);
    }
}
