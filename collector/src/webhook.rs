//! The optional webhook: each new mark (and each mass-event alert) POSTed as JSON with
//! `X-Phoenix-Signature: sha256=<hex HMAC-SHA256 of the body>`, so the receiver knows it came
//! from this collector. Deliveries run on their own thread behind a bounded queue: the
//! request path and the queue pass never wait for the receiver. Failed deliveries are retried
//! with exponential backoff; when the queue is full new events are dropped and logged (the
//! recycler's poll of GET /v1/phoenix is the source of truth, the webhook only a nudge).

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::time::Duration;

pub const SIGNATURE_HEADER: &str = "X-Phoenix-Signature";

#[derive(Debug, Clone)]
pub struct Settings {
    pub attempts: u32,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    pub timeout: Duration,
    pub queue: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            attempts: 8,
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            timeout: Duration::from_secs(10),
            queue: 1000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Webhook {
    tx: SyncSender<Vec<u8>>,
}

/// `sha256=<hex>` of `body` under `secret`.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, body);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

impl Webhook {
    pub fn start(url: String, secret: String, settings: Settings) -> Webhook {
        let (tx, rx) = sync_channel(settings.queue);
        std::thread::Builder::new()
            .name("webhook".into())
            .spawn(move || deliver_all(rx, &url, &secret, &settings))
            .expect("spawn webhook thread");
        Webhook { tx }
    }

    /// Queue one event; never blocks.
    pub fn send(&self, event: &serde_json::Value) {
        let body = serde_json::to_vec(event).expect("JSON values serialize");
        match self.tx.try_send(body) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => tracing::warn!("webhook queue full (the receiver is down or slow): event dropped; the recycler still sees it in GET /v1/phoenix"),
            Err(TrySendError::Disconnected(_)) => tracing::error!("webhook thread stopped: event dropped"),
        }
    }
}

fn deliver_all(rx: Receiver<Vec<u8>>, url: &str, secret: &str, s: &Settings) {
    let cfg = ureq::Agent::config_builder()
        .timeout_global(Some(s.timeout))
        .http_status_as_error(false)
        .max_redirects(0)
        .build();
    let http = ureq::Agent::new_with_config(cfg);
    while let Ok(body) = rx.recv() {
        let sig = sign(secret, &body);
        let mut backoff = s.first_backoff;
        for attempt in 1..=s.attempts {
            let r = http
                .post(url)
                .header("Content-Type", "application/json")
                .header(SIGNATURE_HEADER, &sig)
                .send(&body[..]);
            let why = match r {
                Ok(resp) if resp.status().is_success() => break,
                Ok(resp) => format!("HTTP {}", resp.status().as_u16()),
                Err(e) => e.to_string(),
            };
            if attempt == s.attempts {
                tracing::error!(url, error = %why, attempts = attempt, "webhook delivery failed for good; the mark is still in GET /v1/phoenix");
                break;
            }
            tracing::warn!(url, error = %why, attempt, retry_in = ?backoff, "webhook delivery failed; retrying");
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(s.max_backoff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    #[test]
    fn signature_matches_rfc_4231_test_case_2() {
        // RFC 4231, test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            sign("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    /// A receiver that answers 500 twice, then 200: the third delivery carries the same body
    /// and signature, and `send` never waited for any of it.
    #[test]
    fn retries_with_backoff_until_the_receiver_takes_it() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", l.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            let mut got = Vec::new();
            for (n, conn) in l.incoming().take(3).enumerate() {
                let mut c = conn.unwrap();
                let mut r = BufReader::new(c.try_clone().unwrap());
                let (mut len, mut sig) = (0usize, String::new());
                loop {
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    if line == "\r\n" {
                        break;
                    }
                    let (k, v) = line.split_once(':').unwrap_or((&line, ""));
                    match k.to_ascii_lowercase().as_str() {
                        "content-length" => len = v.trim().parse().unwrap(),
                        "x-phoenix-signature" => sig = v.trim().to_string(),
                        _ => {}
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                got.push((sig, body, std::time::Instant::now()));
                let status = if n < 2 {
                    "500 Internal Server Error"
                } else {
                    "200 OK"
                };
                write!(
                    c,
                    "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                )
                .unwrap();
            }
            got
        });
        let hook = Webhook::start(
            url,
            "s3cret".into(),
            Settings {
                first_backoff: Duration::from_millis(100),
                ..Default::default()
            },
        );
        let t = std::time::Instant::now();
        hook.send(&serde_json::json!({"event": "mark", "instance_id": "i-1"}));
        assert!(
            t.elapsed() < Duration::from_millis(50),
            "send does not wait for delivery"
        );
        let got = server.join().unwrap();
        assert_eq!(got.len(), 3);
        for (sig, body, _) in &got {
            assert_eq!(sig, &sign("s3cret", body));
            assert_eq!(body, br#"{"event":"mark","instance_id":"i-1"}"#);
        }
        // 100 ms, then 200 ms between attempts.
        assert!(got[1].2 - got[0].2 >= Duration::from_millis(100));
        assert!(got[2].2 - got[1].2 >= Duration::from_millis(200));
    }
}
