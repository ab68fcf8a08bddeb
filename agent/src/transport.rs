//! Sends spooled batches to the collector, oldest first, one at a time, and removes each only
//! after the collector acked it. Retries with exponential backoff and jitter; honours
//! Retry-After. The agent only ever connects out: it listens on nothing.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::drift::DriftLink;
use crate::spool::{Entry, Spool};

#[derive(Debug)]
pub struct Sender {
    http: ureq::Agent,
    url: String,
    token: Option<String>,
    spool: Arc<Spool>,
    state_dir: PathBuf,
    drift_link: DriftLink,
}

/// What to do with a batch after one attempt.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Acked,
    /// Try again later; `Some` when the collector said when.
    Retry(Option<Duration>, String),
    /// Can never succeed (400, 413): set aside, do not block the queue.
    Refused(String),
}

const MAX_BACKOFF: Duration = Duration::from_secs(60);

impl Sender {
    /// A sender with the default TLS settings (system CAs, no client certificate).
    pub fn new(
        collector: &str,
        token: Option<String>,
        spool: Arc<Spool>,
        state_dir: PathBuf,
    ) -> Sender {
        let http = crate::tls::http_agent(&Default::default())
            .expect("the default TLS settings read no file that could fail");
        Sender::with_http(http, collector, token, spool, state_dir)
    }

    /// A sender over `http` (see [`crate::tls::http_agent`]).
    pub fn with_http(
        http: ureq::Agent,
        collector: &str,
        token: Option<String>,
        spool: Arc<Spool>,
        state_dir: PathBuf,
    ) -> Sender {
        Sender {
            http,
            url: format!("{}/v1/reports", collector.trim_end_matches('/')),
            token,
            spool,
            state_dir,
            drift_link: DriftLink::default(),
        }
    }

    /// Pass the collector's resend-drift requests (in acks) to the drift source.
    pub fn with_drift_link(mut self, link: DriftLink) -> Sender {
        self.drift_link = link;
        self
    }

    /// Until the agent stops: send, ack, back off.
    pub fn run(&self) {
        let mut backoff = Duration::from_millis(500);
        let mut rng = Jitter::new();
        while !self.spool.stopping() {
            let Some(entry) = self.spool.oldest(Duration::from_secs(1)) else {
                continue;
            };
            match self.send(&entry) {
                Outcome::Acked => {
                    if let Err(e) = self.spool.ack(&entry, &self.state_dir) {
                        tracing::error!(error = %e, "could not record an ack in the state dir; the batch will be sent again");
                    }
                    backoff = Duration::from_millis(500);
                }
                Outcome::Refused(reason) => self.spool.reject(&entry, &self.state_dir, &reason),
                Outcome::Retry(after, why) => {
                    let wait = after
                        .unwrap_or_else(|| rng.spread(backoff))
                        .min(Duration::from_secs(300));
                    tracing::warn!(seq = entry.seq, queued = self.spool.len(), wait_ms = wait.as_millis() as u64, reason = %why, "collector did not take the batch; will retry");
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    if self.spool.sleep(wait) {
                        break;
                    }
                }
            }
        }
    }

    pub fn send(&self, entry: &Entry) -> Outcome {
        let mut req = self
            .http
            .post(&self.url)
            .header("Content-Type", "application/json")
            .header("Content-Encoding", "gzip");
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let mut resp = match req.send(&entry.body[..]) {
            Ok(r) => r,
            Err(e) => return Outcome::Retry(None, format!("cannot reach collector: {e}")),
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let mut body = String::new();
        resp.body_mut()
            .as_reader()
            .take(4096)
            .read_to_string(&mut body)
            .ok();
        match status {
            200..=299 => {
                if let Ok(ack) = serde_json::from_str::<phoenix_wire::Ack>(&body) {
                    self.drift_link.on_ack(&ack);
                }
                Outcome::Acked
            }
            400 | 413 | 422 => Outcome::Refused(format!("HTTP {status}: {}", body.trim())),
            401 | 403 => Outcome::Retry(
                Some(Duration::from_secs(30)),
                format!("HTTP {status}: check the agent token ({})", body.trim()),
            ),
            _ => Outcome::Retry(retry_after, format!("HTTP {status}: {}", body.trim())),
        }
    }
}

/// Spreads retries of a fleet so they do not hit a recovering collector at the same instant.
#[derive(Debug)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new() -> Jitter {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ (std::process::id() as u64) << 32;
        Jitter(seed | 1)
    }

    pub fn next_f64(&mut self) -> f64 {
        // xorshift64*: plenty for spreading timers.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545F4914F6CDD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `d` scattered over [0.8, 1.2) of itself.
    pub fn spread(&mut self, d: Duration) -> Duration {
        d.mul_f64(0.8 + 0.4 * self.next_f64())
    }
}

impl Default for Jitter {
    fn default() -> Self {
        Jitter::new()
    }
}
