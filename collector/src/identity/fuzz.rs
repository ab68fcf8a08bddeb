//! Hostile enrolment traffic through the identity gate: arbitrary credential headers (any
//! bytes a client can put in a header), resets, sweeps and restarts on the file store, and
//! for `--identity aws` documents and signatures altered anywhere.
//!
//! Three genuine boxes enrol first and keep reporting. After every step: nothing panicked;
//! a credential other than the enrolled one is refused with 403 and changes nothing (the
//! genuine box is still served, after a restart too); only a valid credential enrols; the
//! gate never holds more than `--max-instances` ids; a new id past the cap gets 429.

use std::collections::HashMap;
use std::time::Instant;

use axum::http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use super::*;

const GENUINE: [&str; 3] = ["i-0", "i-1", "i-2"];
/// Ids the hostile side uses: the genuine ones, and some nobody enrolled.
const IDS: [&str; 6] = ["i-0", "i-1", "i-2", "i-3", "i-4", "i-5"];
const MAX: usize = 5;
const MIN: i64 = 60_000;

fn genuine_cred(k: usize) -> String {
    format!("{:064x}", 0x5eed_0000_u64 + k as u64)
}

#[derive(Debug, Clone)]
enum Cred {
    /// The credential of the box that first enrolled this id (as the fuzz knows it).
    Enrolled,
    /// A genuine box's credential presented for another id.
    Other(usize),
    /// Any string.
    Text(String),
    /// Any header bytes, as a client can send them.
    Bytes(Vec<u8>),
    None,
}

#[derive(Debug, Clone)]
enum Op {
    Admit(usize, Cred),
    Reset(usize),
    /// Time passes (ms), then the gate sweeps.
    Sweep(i64),
    /// The collector restarts on its enrolment file.
    Reopen,
    /// The genuine boxes report.
    Genuine,
}

fn cred() -> impl Strategy<Value = Cred> {
    prop_oneof![
        2 => Just(Cred::Enrolled),
        1 => (0..GENUINE.len()).prop_map(Cred::Other),
        3 => prop_oneof![
            "[0-9a-f]{64}",
            "[ -~]{0,300}",
            ".{0,80}",
            Just(String::new()),
        ]
        .prop_map(Cred::Text),
        2 => prop::collection::vec(any::<u8>(), 0..300).prop_map(Cred::Bytes),
        1 => Just(Cred::None),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..IDS.len(), cred()).prop_map(|(i, c)| Op::Admit(i, c)),
        1 => (0..IDS.len()).prop_map(Op::Reset),
        2 => prop_oneof![0..MIN, 0..30 * MIN, Just(8 * 24 * 60 * MIN)].prop_map(Op::Sweep),
        1 => Just(Op::Reopen),
        3 => Just(Op::Genuine),
    ]
}

struct Case {
    dir: tempfile::TempDir,
    gate: Gate,
    now: i64,
    /// id → the credential it is enrolled with (the model).
    enrolled: HashMap<String, String>,
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if cond {
        Ok(())
    } else {
        Err(TestCaseError::fail(what()))
    }
}

fn limits() -> Limits {
    Limits {
        max_instances: MAX,
        ..Limits::default()
    }
}

impl Case {
    fn new() -> Case {
        let dir = tempfile::tempdir().expect("a temp dir");
        let gate = Gate::open(
            Mode::Tofu,
            limits(),
            Box::new(FileEnrolments::new(dir.path())),
            0,
        )
        .expect("an empty store opens");
        let mut c = Case {
            dir,
            gate,
            now: 0,
            enrolled: HashMap::new(),
        };
        for (k, id) in GENUINE.iter().enumerate() {
            let cred = genuine_cred(k);
            assert_eq!(c.gate.admit(id, &with(&cred), 0), Ok(Admitted::New), "{id}");
            c.enrolled.insert(id.to_string(), cred);
        }
        c
    }

    fn admit(&mut self, id: &str, cred: &Cred) -> Result<(), TestCaseError> {
        let mut headers = HeaderMap::new();
        let text: Option<String> = match cred {
            Cred::Enrolled => self.enrolled.get(id).cloned(),
            Cred::Other(k) => Some(genuine_cred(*k)),
            Cred::Text(s) => Some(s.clone()),
            Cred::Bytes(_) | Cred::None => None,
        };
        match (cred, &text) {
            (Cred::Bytes(b), _) => {
                if let Ok(v) = HeaderValue::from_bytes(b) {
                    headers.insert(CREDENTIAL_HEADER, v);
                }
            }
            (_, Some(t)) => {
                if let Ok(v) = HeaderValue::from_str(t) {
                    headers.insert(CREDENTIAL_HEADER, v);
                }
            }
            _ => {}
        }
        // What the report handler reads from the request, exactly.
        let p = Presented::from_headers(&headers);
        let presented = p.credential.map(str::to_owned);
        let known_before = self.gate.len();
        let r = self.gate.admit(id, &p, self.now);
        // The rule as documented (32 to 256 visible ASCII characters), not the gate's code.
        let valid = presented.as_deref().is_some_and(|c| {
            (32..=256).contains(&c.len()) && c.bytes().all(|b| (0x21..0x7f).contains(&b))
        });
        match self.enrolled.get(id) {
            Some(want) => {
                let same = presented.as_deref() == Some(want.as_str());
                check(r.is_ok() == same, || {
                    format!("{id}: enrolled, presented {presented:?}: {r:?}")
                })?;
                if let Err(e) = &r {
                    check(matches!(e, Refusal::Forbidden(_)), || {
                        format!("{id}: a wrong credential must be 403: {e:?}")
                    })?;
                }
                check(r.is_err() || r == Ok(Admitted::Known), || {
                    format!("{id}: enrolled ids are known: {r:?}")
                })?;
            }
            None => {
                let full = known_before >= MAX;
                match &r {
                    Ok(a) => {
                        check(valid && !full && *a == Admitted::New, || {
                            format!("{id}: enrolled with {presented:?} (full {full}): {a:?}")
                        })?;
                        self.enrolled
                            .insert(id.to_string(), presented.clone().unwrap_or_default());
                    }
                    Err(Refusal::Forbidden(_)) => check(!valid, || {
                        format!("{id}: a valid credential refused: {r:?}")
                    })?,
                    Err(Refusal::Full(_)) => {
                        check(valid && full, || format!("{id}: 429 below the cap: {r:?}"))?
                    }
                    Err(Refusal::Store(e)) => {
                        return Err(TestCaseError::fail(format!("store failed: {e}")))
                    }
                }
            }
        }
        Ok(())
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Admit(k, c) => self.admit(IDS[*k], c)?,
            Op::Reset(k) => {
                let id = IDS[*k];
                let r = self
                    .gate
                    .reset(id)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                check(r == self.enrolled.remove(id).is_some(), || {
                    format!("reset {id}: {r}")
                })?;
            }
            Op::Sweep(ms) => {
                self.now = self.now.saturating_add(*ms);
                for id in self.gate.sweep(self.now) {
                    check(self.enrolled.remove(&id).is_some(), || {
                        format!("swept {id}, which was not enrolled")
                    })?;
                }
            }
            Op::Reopen => {
                self.gate = Gate::open(
                    Mode::Tofu,
                    limits(),
                    Box::new(FileEnrolments::new(self.dir.path())),
                    self.now,
                )
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
            Op::Genuine => {
                // Each genuine box reports with its own credential: served while its
                // enrolment stands; enrolled again once reset or forgotten (unless a forger
                // was first to the free id: refused then, which the model expects too).
                for (k, id) in GENUINE.iter().enumerate() {
                    let served = self.enrolled.get(*id) == Some(&genuine_cred(k));
                    self.admit(id, &Cred::Other(k))?;
                    check(
                        !served || self.enrolled.get(*id) == Some(&genuine_cred(k)),
                        || format!("genuine {id} lost its enrolment"),
                    )?;
                }
            }
        }
        check(self.gate.len() == self.enrolled.len(), || {
            format!(
                "gate knows {} ids, the model {:?}",
                self.gate.len(),
                self.enrolled.keys()
            )
        })?;
        check(self.gate.len() <= MAX, || {
            format!("{} ids past --max-instances {MAX}", self.gate.len())
        })
    }
}

fn with(c: &str) -> Presented<'_> {
    Presented {
        credential: Some(c),
        ..Default::default()
    }
}

#[test]
fn hostile_enrolments_never_override_and_stay_bounded() {
    const CASES: u32 = 96;
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    });
    let started = Instant::now();
    let r = runner.run(&prop::collection::vec(op(), 1..60), |ops| {
        let mut c = Case::new();
        for op in &ops {
            c.step(op)?;
        }
        // The genuine boxes nobody reset are served at the end, whatever came before.
        c.step(&Op::Genuine)
    });
    if let Err(e) = r {
        panic!("{e}");
    }
    eprintln!(
        "identity fuzz: {CASES} cases, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The model's checks can fail: a gate that let a second credential in would be caught.
#[test]
fn the_enrolment_model_catches_an_override() {
    let mut c = Case::new();
    c.enrolled.insert("i-0".into(), "z".repeat(40));
    assert!(c.admit("i-0", &Cred::Other(0)).is_err());
}

mod aws_signed {
    //! A real RSA key and certificate made by openssl, a document signed with it: the
    //! genuine pair verifies, and any change to either never does.

    use super::*;
    use base64::Engine;
    use std::process::Command;

    fn openssl(args: &[&str]) {
        let o = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl (Debian's openssl package) runs");
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    struct Signed {
        certs: Vec<rustls::pki_types::CertificateDer<'static>>,
        verifier: aws::AwsVerifier,
        doc: Vec<u8>,
        sig: Vec<u8>,
    }

    fn signed() -> Signed {
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n).to_str().unwrap().to_owned();
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &p("key.pem"),
            "-out",
            &p("cert.pem"),
            "-days",
            "2",
            "-subj",
            "/CN=aws-fuzz",
        ]);
        let doc = br#"{"accountId":"123456789012","instanceId":"i-0fuzz","region":"eu-west-1","imageId":"ami-1"}"#;
        std::fs::write(p("doc.json"), doc).unwrap();
        openssl(&[
            "dgst",
            "-sha256",
            "-sign",
            &p("key.pem"),
            "-out",
            &p("doc.sig"),
            &p("doc.json"),
        ]);
        let certs = crate::tls::load_certs(std::path::Path::new(&p("cert.pem"))).unwrap();
        Signed {
            verifier: aws::AwsVerifier::new(certs.clone(), vec!["123456789012".into()]).unwrap(),
            certs,
            doc: doc.to_vec(),
            sig: std::fs::read(p("doc.sig")).unwrap(),
        }
    }

    fn b64(b: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    #[test]
    fn any_change_to_a_signed_document_or_its_signature_is_refused() {
        let s = signed();
        let good = s.verifier.verify(&b64(&s.doc), &b64(&s.sig)).unwrap();
        assert_eq!(good.instance_id, "i-0fuzz");
        let gate = Gate::open(
            Mode::Aws(aws::AwsVerifier::new(s.certs.clone(), vec![]).unwrap()),
            Limits::default(),
            Box::new(NoStore),
            0,
        )
        .unwrap();
        let (d, g) = (b64(&s.doc), b64(&s.sig));
        let p = Presented {
            aws_document: Some(&d),
            aws_signature: Some(&g),
            ..Default::default()
        };
        assert_eq!(gate.admit("i-0fuzz", &p, 0), Ok(Admitted::New));
        assert!(
            matches!(gate.admit("i-victim", &p, 0), Err(Refusal::Forbidden(_))),
            "a genuine document speaks for its own instance only"
        );
        let mut runner = TestRunner::new(Config {
            cases: 512,
            failure_persistence: None,
            ..Config::default()
        });
        let strategy = (
            any::<bool>(),
            any::<prop::sample::Index>(),
            1..=255u8,
            prop::option::of(prop::collection::vec(any::<u8>(), 0..64)),
        );
        runner
            .run(&strategy, |(in_doc, at, flip, tail)| {
                let (mut doc, mut sig) = (s.doc.clone(), s.sig.clone());
                let target = if in_doc { &mut doc } else { &mut sig };
                let k = at.index(target.len());
                target[k] ^= flip;
                if let Some(t) = tail {
                    target.extend(t);
                }
                let r = s.verifier.verify(&b64(&doc), &b64(&sig));
                prop_assert!(r.is_err(), "an altered pair verified: {r:?}");
                Ok(())
            })
            .unwrap();
        // Any text at all in the two headers: refused, never a panic.
        runner
            .run(&(".{0,600}", "[A-Za-z0-9+/=]{0,400}"), |(d, g)| {
                prop_assert!(s.verifier.verify(&d, &g).is_err());
                Ok(())
            })
            .unwrap();
    }
}
