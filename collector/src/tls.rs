//! HTTPS for the collector: rustls (ring provider, TLS 1.2 and 1.3 only), certificates that
//! rotate without a restart, and optional mutual TLS in which an agent's certificate must name
//! the instance its reports speak for.
//!
//! The certificate, key and client CA files are polled; a changed set is loaded into a new
//! `ServerConfig` that every later handshake uses. A set that does not load (a half-written
//! file, a key that does not match the certificate) keeps the old one and logs why, so a
//! botched rotation never takes the collector off the air.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// How often the certificate files are looked at for a rotation.
pub const RELOAD_POLL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: no PEM certificate in it (give a PEM file with -----BEGIN CERTIFICATE-----)")]
    NoCert(PathBuf),
    #[error("{0}: not a PEM certificate file: {1}")]
    BadCert(PathBuf, String),
    #[error("{0}: no PEM private key in it (PKCS#8, PKCS#1 or SEC1): {1}")]
    BadKey(PathBuf, String),
    #[error("client CA {0}: {1}")]
    BadCa(PathBuf, String),
    #[error("certificate {0} and key {1} do not go together: {2}")]
    Mismatch(PathBuf, PathBuf, String),
}

/// The files a TLS set is made of.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// With it, every client must present a certificate issued by this CA.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> impl Iterator<Item = &Path> {
        [self.cert.as_path(), self.key.as_path()]
            .into_iter()
            .chain(self.client_ca.as_deref())
    }

    /// What a rotation changes: each file's inode, size and mtime.
    fn stamp(&self) -> Vec<Option<FileStamp>> {
        self.paths()
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .map(|m| (m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
            })
            .collect()
    }
}

fn read(p: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(p).map_err(|e| TlsError::Read(p.to_owned(), e))
}

pub fn load_certs(p: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(p)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCert(p.to_owned(), e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCert(p.to_owned()));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Build a server config from the files as they are now.
pub fn load(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let chain = load_certs(&files.cert)?;
    let key_pem = read(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| TlsError::BadKey(files.key.clone(), e.to_string()))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3");
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in load_certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| TlsError::BadCa(ca.clone(), e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::BadCa(ca.clone(), e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Mismatch(files.cert.clone(), files.key.clone(), e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// (device, inode, mtime s, mtime ns) of one TLS file, to see when it changed.
type FileStamp = (u64, u64, i64, i64);

/// The server config in force, swapped when the files change.
#[derive(Debug)]
pub struct Reloader {
    files: TlsFiles,
    current: RwLock<(Arc<ServerConfig>, Vec<Option<FileStamp>>)>,
}

impl Reloader {
    /// Load the files once; an error here stops the collector (there is nothing to fall back to).
    pub fn new(files: TlsFiles) -> Result<Arc<Reloader>, TlsError> {
        let stamp = files.stamp();
        let cfg = load(&files)?;
        Ok(Arc::new(Reloader {
            files,
            current: RwLock::new((Arc::new(cfg), stamp)),
        }))
    }

    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.read().unwrap().0.clone()
    }

    /// Load the files again if any changed since the last look. Returns whether a new set
    /// is now in force; a set that fails to load is logged once and retried when the files
    /// change again.
    pub fn refresh(&self) -> bool {
        let stamp = self.files.stamp();
        if stamp == self.current.read().unwrap().1 {
            return false;
        }
        let loaded = load(&self.files);
        let mut g = self.current.write().unwrap();
        g.1 = stamp;
        match loaded {
            Ok(cfg) => {
                g.0 = Arc::new(cfg);
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "new TLS files do not load; still serving the previous certificate (fix the files: they are read again when they change)");
                false
            }
        }
    }

    /// Poll the files every `every` until the runtime stops.
    pub fn watch(self: &Arc<Self>, every: Duration) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(r) = me.upgrade() else { return };
                // Stat and maybe parse PEM: small files, but still file I/O off the reactor.
                tokio::task::spawn_blocking(move || r.refresh()).await.ok();
            }
        });
    }
}

/// The end-entity certificate a client presented, as a request extension (mutual TLS only).
#[derive(Clone, Debug)]
pub struct PeerCert(pub Arc<CertificateDer<'static>>);

/// Mutual TLS: may the client holding `peer` report for `instance_id`? Its certificate must be
/// valid for the instance id as a DNS name (subjectAltName), so one instance cannot speak for
/// another. The certificate chain itself was verified in the handshake.
pub fn check_identity(peer: Option<&PeerCert>, instance_id: &str) -> Result<(), String> {
    let Some(p) = peer else {
        return Err(
            "mutual TLS is on (--client-ca) but this connection carried no client certificate"
                .into(),
        );
    };
    let ee = webpki::EndEntityCert::try_from(p.0.as_ref())
        .map_err(|e| format!("the client certificate cannot be parsed: {e}"))?;
    let name = ServerName::try_from(instance_id).map_err(|_| {
        format!("instance id {instance_id:?} is not a DNS name, so no client certificate can vouch for it; with --client-ca give agents DNS-name instance ids")
    })?;
    ee.verify_is_valid_for_subject_name(&name)
        .map_err(|_| format!("the client certificate is not issued for instance {instance_id:?} (its subjectAltName must be the instance id); an instance may only report for itself"))
}
