//! How the agent reaches the collector safely: HTTPS verified against the system's CA bundle
//! (or `--ca-file`), an optional client certificate for mutual TLS, no redirects (so nothing
//! can bounce the token to plain HTTP or another host), and plain `http://` only to loopback
//! unless `--insecure-http` says otherwise.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig};

/// Debian/Ubuntu's bundle of the system's trusted CAs (the `ca-certificates` package).
pub const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: no PEM certificate in it (give a PEM file with -----BEGIN CERTIFICATE-----)")]
    NoCert(PathBuf),
    #[error("{0}: not a PEM file: {1}")]
    Pem(PathBuf, String),
    #[error("--tls-client-cert and --tls-client-key go together: give both")]
    HalfClientCert,
    #[error(
        "--collector {0:?} is plain http:// to a host that is not loopback: the token and the data would cross the network in clear. Use https://, or give --insecure-http if this network is trusted"
    )]
    PlainHttp(String),
    #[error("--collector {0:?}: give a URL such as https://collector.internal:7070")]
    BadUrl(String),
}

/// TLS settings of `phoenix-agent run`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TlsOptions {
    /// Trust only this CA (PEM) instead of the system's.
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Allow `http://` to a non-loopback collector.
    pub insecure_http: bool,
}

/// Refuse a collector URL that would send the token in clear over the network.
pub fn check_url(url: &str, insecure_http: bool) -> Result<(), TlsError> {
    let lower = url.to_ascii_lowercase();
    if let Some(rest) = lower.strip_prefix("https://") {
        return if host_of(rest).is_empty() {
            Err(TlsError::BadUrl(url.into()))
        } else {
            Ok(())
        };
    }
    let Some(rest) = lower.strip_prefix("http://") else {
        return Err(TlsError::BadUrl(url.into()));
    };
    let host = host_of(rest);
    if host.is_empty() {
        return Err(TlsError::BadUrl(url.into()));
    }
    if insecure_http || is_loopback(host) {
        Ok(())
    } else {
        Err(TlsError::PlainHttp(url.into()))
    }
}

/// The host of `rest` (a URL after its scheme), without userinfo, port or brackets.
fn host_of(rest: &str) -> &str {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(v6) = hostport.strip_prefix('[') {
        return v6.split(']').next().unwrap_or("");
    }
    hostport.split(':').next().unwrap_or("")
}

fn is_loopback(host: &str) -> bool {
    if host == "localhost" || host == "localhost." {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

fn read(p: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(p).map_err(|e| TlsError::Read(p.to_owned(), e))
}

/// Every certificate in a PEM file.
pub fn load_certs(p: &Path) -> Result<Vec<Certificate<'static>>, TlsError> {
    let pem = read(p)?;
    let mut out = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => out.push(c),
            Ok(_) => {}
            Err(e) => return Err(TlsError::Pem(p.to_owned(), e.to_string())),
        }
    }
    if out.is_empty() {
        return Err(TlsError::NoCert(p.to_owned()));
    }
    Ok(out)
}

/// The roots the collector's certificate is checked against: `--ca-file`, else the system
/// bundle when there is one, else the Mozilla roots built into the agent.
///
/// `https` says whether any collector is `https://`. When none is, the system bundle is not
/// read: parsing it (about 220 kB of PEM on Debian) was a tenth of an idle agent's heap, for
/// roots no connection would use (the client follows no redirects, so no `https://` URL can
/// appear later). An explicit `--ca-file` is still read, so a wrong path is still an error.
pub fn roots(opts: &TlsOptions, https: bool) -> Result<RootCerts, TlsError> {
    if let Some(ca) = &opts.ca_file {
        return Ok(RootCerts::new_with_certs(&load_certs(ca)?));
    }
    if !https {
        // The built-in roots are static data: nothing is parsed or allocated for them.
        return Ok(RootCerts::WebPki);
    }
    let system = Path::new(SYSTEM_BUNDLE);
    if system.exists() {
        match load_certs(system) {
            Ok(c) => return Ok(RootCerts::new_with_certs(&c)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot use the system CA bundle; falling back to the built-in Mozilla roots")
            }
        }
    }
    Ok(RootCerts::WebPki)
}

pub fn tls_config(opts: &TlsOptions, https: bool) -> Result<TlsConfig, TlsError> {
    let client = match (&opts.client_cert, &opts.client_key) {
        (None, None) => None,
        (Some(c), Some(k)) => {
            let chain = load_certs(c)?;
            let key = PrivateKey::from_pem(&read(k)?)
                .map_err(|e| TlsError::Pem(k.clone(), format!("no usable private key: {e}")))?;
            Some(ClientCert::new_with_certs(&chain, key))
        }
        _ => return Err(TlsError::HalfClientCert),
    };
    Ok(TlsConfig::builder()
        .root_certs(roots(opts, https)?)
        .client_cert(client)
        .build())
}

/// Each way's buffer of the agent's own HTTP connections (sender, IMDS, enrolment). ureq's
/// default is 128 KiB each, zero-filled and so resident from the first request: 256 KiB of an
/// idle agent's ~6 MiB (issue 16). The agent's request heads and the answers it reads are a
/// few hundred bytes, and a large body goes out in writes of this size instead. A response
/// head over it is refused as too large (the collector's are under 1 KiB). Health checks
/// keep ureq's defaults: their servers are not ours, and a big header must not fail a check.
pub const HTTP_BUFFER: usize = 16 << 10;

/// `b` with [`HTTP_BUFFER`]-sized connection buffers and response-head limit.
pub fn lean_buffers(
    b: ureq::config::ConfigBuilder<ureq::typestate::AgentScope>,
) -> ureq::config::ConfigBuilder<ureq::typestate::AgentScope> {
    b.input_buffer_size(HTTP_BUFFER)
        .output_buffer_size(HTTP_BUFFER)
        .max_response_header_size(HTTP_BUFFER)
}

/// The HTTP client the sender uses: verified TLS, no redirects, bounded timeouts, and HTTP
/// statuses as values (the sender decides what each means). The roots are read only when
/// one of `collectors` is `https://` (see [`roots`]).
pub fn http_agent(opts: &TlsOptions, collectors: &[String]) -> Result<ureq::Agent, TlsError> {
    let https = collectors.iter().any(|c| {
        c.get(..8)
            .is_some_and(|p| p.eq_ignore_ascii_case("https://"))
    });
    let cfg = lean_buffers(ureq::Agent::config_builder())
        .timeout_connect(Some(Duration::from_secs(5)))
        .timeout_global(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        // A redirect could send the next request, token and all, somewhere else or downgrade
        // it to http://; the collector never redirects, so none is followed.
        .max_redirects(0)
        .tls_config(tls_config(opts, https)?)
        .user_agent(concat!("phoenix-agent/", env!("CARGO_PKG_VERSION")))
        .build();
    Ok(ureq::Agent::new_with_config(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_to_loopback() {
        for ok in [
            "http://127.0.0.1:7070",
            "http://127.1.2.3",
            "http://localhost:7070/",
            "http://[::1]:7070",
            "https://collector.internal:7070",
            "HTTPS://c.example",
        ] {
            assert!(check_url(ok, false).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.5:7070",
            "http://collector.internal",
            "http://127.0.0.1@evil.example/",
            "http://localhost.evil.example:80",
            "http://[::2]:1",
        ] {
            let e = check_url(bad, false).unwrap_err();
            assert!(e.to_string().contains("--insecure-http"), "{bad}: {e}");
            assert!(check_url(bad, true).is_ok(), "{bad}");
        }
        for nonsense in ["collector:7070", "ftp://x", "http://", "https:///x"] {
            assert!(
                matches!(check_url(nonsense, true), Err(TlsError::BadUrl(_))),
                "{nonsense}"
            );
        }
    }

    #[test]
    fn files_that_are_not_pem_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ca.pem");
        std::fs::write(&f, "not a certificate\n").unwrap();
        let e = roots(
            &TlsOptions {
                ca_file: Some(f.clone()),
                ..Default::default()
            },
            false,
        )
        .unwrap_err();
        assert!(e.to_string().contains("ca.pem"), "{e}");
        // An explicit --ca-file is read whatever the collectors' scheme.
        for https in [true, false] {
            let e = roots(
                &TlsOptions {
                    ca_file: Some(dir.path().join("missing.pem")),
                    ..Default::default()
                },
                https,
            )
            .unwrap_err();
            assert!(e.to_string().contains("missing.pem"), "{e}");
        }
        let e = tls_config(
            &TlsOptions {
                client_cert: Some(f),
                ..Default::default()
            },
            false,
        )
        .unwrap_err();
        assert!(matches!(e, TlsError::HalfClientCert));
    }

    #[test]
    fn system_bundle_is_used_when_present_and_only_for_https() {
        let r = roots(&TlsOptions::default(), false).unwrap();
        assert!(matches!(r, RootCerts::WebPki), "{r:?}");
        let r = roots(&TlsOptions::default(), true).unwrap();
        if Path::new(SYSTEM_BUNDLE).exists() {
            assert!(
                matches!(r, RootCerts::Specific(ref c) if c.len() > 10),
                "{r:?}"
            );
        } else {
            assert!(matches!(r, RootCerts::WebPki));
        }
    }
}
