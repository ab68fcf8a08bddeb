//! `--identity aws`: an EC2 instance proves its id with the instance identity document and
//! its signature, both read by the agent from IMDSv2 and sent as headers. The signature is
//! RSA PKCS#1 v1.5 over SHA-256 of the document's exact bytes, checked against the public
//! certificate AWS publishes per region (`--aws-identity-cert`).

use base64::Engine;
use rustls::pki_types::CertificateDer;
use serde::Deserialize;

/// A document longer than this is not one IMDS wrote (real ones are about 500 bytes).
pub const MAX_DOCUMENT: usize = 8 << 10;

/// The fields the collector uses; the rest of the document is ignored.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Document {
    pub instance_id: String,
    pub account_id: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub image_id: String,
}

#[derive(Debug)]
pub struct AwsVerifier {
    certs: Vec<CertificateDer<'static>>,
    /// Accepted account ids; empty means any account the certificate vouches for.
    accounts: Vec<String>,
}

fn b64(s: &str) -> Result<Vec<u8>, String> {
    let clean: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(clean.as_bytes())
        .map_err(|e| format!("not base64: {e}"))
}

impl AwsVerifier {
    /// `certs` are the AWS public certificates (PEM, one or more: several regions).
    pub fn new(certs: Vec<CertificateDer<'static>>, accounts: Vec<String>) -> Result<Self, String> {
        if certs.is_empty() {
            return Err("--aws-identity-cert holds no certificate".into());
        }
        for c in &certs {
            webpki::EndEntityCert::try_from(c).map_err(|e| {
                format!("--aws-identity-cert: a certificate does not parse ({e}); give the PEM certificate AWS publishes for your region")
            })?;
        }
        Ok(AwsVerifier { certs, accounts })
    }

    /// The document, if `signature_b64` is a valid signature over `document_b64`'s bytes by
    /// one of the certificates and its account is allowed. Errors say what failed, never echo
    /// the input.
    pub fn verify(&self, document_b64: &str, signature_b64: &str) -> Result<Document, String> {
        if document_b64.len() > MAX_DOCUMENT * 2 || signature_b64.len() > 4096 {
            return Err("instance identity document or signature too long".into());
        }
        let doc = b64(document_b64).map_err(|e| format!("instance identity document {e}"))?;
        let sig = b64(signature_b64).map_err(|e| format!("instance identity signature {e}"))?;
        let good = self.certs.iter().any(|c| {
            let Ok(ee) = webpki::EndEntityCert::try_from(c) else {
                return false;
            };
            [
                webpki::ring::RSA_PKCS1_2048_8192_SHA256,
                webpki::ring::RSA_PKCS1_2048_8192_SHA256_ABSENT_PARAMS,
            ]
            .iter()
            .any(|alg| ee.verify_signature(*alg, &doc, &sig).is_ok())
        });
        if !good {
            return Err("the instance identity signature does not verify against --aws-identity-cert: the document was altered or not signed by AWS".into());
        }
        let d: Document = serde_json::from_slice(&doc)
            .map_err(|e| format!("the signed instance identity document is not one: {e}"))?;
        if !self.accounts.is_empty() && !self.accounts.contains(&d.account_id) {
            return Err(format!(
                "account {} is not in --aws-account; this collector takes reports from {}",
                d.account_id,
                self.accounts.join(", ")
            ));
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_never_verifies_or_panics() {
        // Any well-formed certificate will do: nothing below is signed by it.
        let pem = include_bytes!("testdata/aws-test-cert.pem");
        use rustls::pki_types::pem::PemObject;
        let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .unwrap();
        let v = AwsVerifier::new(certs, vec![]).unwrap();
        let doc = base64::engine::general_purpose::STANDARD
            .encode(br#"{"instanceId":"i-1","accountId":"1"}"#);
        for (d, s) in [
            ("", ""),
            ("!!!", "???"),
            (doc.as_str(), ""),
            (doc.as_str(), "AAAA"),
            (doc.as_str(), &"A".repeat(344)),
        ] {
            assert!(v.verify(d, s).is_err(), "{d:?} {s:?}");
        }
        assert!(v.verify(&"A".repeat(MAX_DOCUMENT * 3), "AAAA").is_err());
    }
}
