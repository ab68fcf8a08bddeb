//! Sends spooled batches to the collector and settles each only after a real ack for it.
//!
//! Up to `max_in_flight` batches are out at once (on as many sending threads, started once and
//! kept, so an idle agent starts no thread per batch), sent in seq order; their acks may come back in any order, and the spool promotes checkpoints in seq
//! order only. Only a JSON ack `{"accepted": seq}` for the very seq sent counts: a captive
//! portal's 200 page, a wrong seq or an empty body is a retry with backoff, logged with what
//! came back. Retries back off exponentially with jitter and honour Retry-After.
//!
//! Several collectors may be given: the agent fails over in the order given and probes the
//! first one now and then to go back to it once it answers. The agent only ever connects out:
//! it listens on nothing.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::counters;
use crate::spool::{Entry, Spool};

const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Wait between collectors while failing over, before every one of them failed in a row.
const FAILOVER_PAUSE: Duration = Duration::from_millis(100);
/// How often a batch answered "duplicate" is queued again under a new seq.
const MAX_RESEQS: u8 = 3;
/// How much of an unexpected answer goes into the log.
const SNIPPET: usize = 200;

/// What to do with a batch after one attempt.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// The collector acked this very seq (possibly as a duplicate it stored before).
    Acked(phoenix_wire::Ack),
    /// Try again later, at the same collector; `Some` when the collector said when.
    Retry(Option<Duration>, String),
    /// The collector is unreachable or answered something that is no ack: try the next one.
    Down(Option<Duration>, String),
    /// Can never succeed as it is (400, 413, 422): split it, or set it aside.
    Refused(String),
}

/// The HTTP side: one request per batch, to one of the collectors.
#[derive(Debug)]
struct Client {
    http: ureq::Agent,
    /// Base URLs, in the order given: the first is the preferred one.
    bases: Vec<String>,
    token: Option<String>,
}

impl Client {
    /// The one place a report request is built (auth and headers).
    fn request(&self, idx: usize) -> ureq::RequestBuilder<ureq::typestate::WithBody> {
        let mut req = self
            .http
            .post(format!("{}/v1/reports", self.bases[idx]))
            .header("Content-Type", "application/json")
            .header("Content-Encoding", "gzip");
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        crate::enrol::present(req)
    }

    fn send(&self, idx: usize, entry: &Entry) -> Outcome {
        let mut resp = match self.request(idx).send(&entry.body[..]) {
            Ok(r) => r,
            Err(e) => return Outcome::Down(None, format!("cannot reach collector: {e}")),
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let mut body = Vec::new();
        if let Err(e) = resp
            .body_mut()
            .as_reader()
            .take(4096)
            .read_to_end(&mut body)
        {
            return Outcome::Down(
                None,
                format!("HTTP {status}, but reading the answer failed: {e}"),
            );
        }
        judge(status, retry_after, &body, entry.seq)
    }

    /// POST a diagnostics snapshot (gzip JSON) to collector `idx`.
    fn post_answer(&self, idx: usize, body: &[u8]) -> Result<(), String> {
        let mut req = self
            .http
            .post(format!("{}/v1/diagnostics", self.bases[idx]))
            .header("Content-Type", "application/json")
            .header("Content-Encoding", "gzip");
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let req = crate::enrol::present(req);
        match req.send(body) {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(mut r) => {
                let mut b = Vec::new();
                r.body_mut().as_reader().take(512).read_to_end(&mut b).ok();
                Err(format!(
                    "HTTP {}: {}",
                    r.status().as_u16(),
                    snippet(String::from_utf8_lossy(&b).trim())
                ))
            }
            Err(e) => Err(format!("cannot reach collector: {e}")),
        }
    }

    /// Is the collector `idx` up? A GET of its /healthz.
    fn healthy(&self, idx: usize) -> bool {
        self.http
            .get(format!("{}/healthz", self.bases[idx]))
            .call()
            .is_ok_and(|r| r.status() == 200)
    }
}

/// What an answer to the batch `seq` means.
pub fn judge(status: u16, retry_after: Option<Duration>, body: &[u8], seq: u64) -> Outcome {
    let text = String::from_utf8_lossy(body);
    match status {
        200..=299 => match serde_json::from_slice::<phoenix_wire::Ack>(body) {
            Ok(ack) if ack.accepted == seq => Outcome::Acked(ack),
            Ok(ack) => Outcome::Down(
                None,
                format!(
                    "HTTP {status} acked seq {} but {seq} was sent; not taken as an ack",
                    ack.accepted
                ),
            ),
            Err(_) => Outcome::Down(
                None,
                format!(
                    "HTTP {status} without a JSON ack for seq {seq} (a proxy or captive portal?); first bytes: {:?}",
                    snippet(&text)
                ),
            ),
        },
        400 | 413 | 422 => Outcome::Refused(format!("HTTP {status}: {}", snippet(text.trim()))),
        401 | 403 => Outcome::Retry(
            Some(Duration::from_secs(30)),
            format!(
                "HTTP {status}: check the agent token ({})",
                snippet(text.trim())
            ),
        ),
        429 => Outcome::Retry(retry_after, format!("HTTP 429: {}", snippet(text.trim()))),
        _ => Outcome::Down(
            retry_after,
            format!("HTTP {status}: {}", snippet(text.trim())),
        ),
    }
}

fn snippet(s: &str) -> &str {
    let mut end = s.len().min(SNIPPET);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// What a helper thread reports back to the dispatcher.
#[derive(Debug)]
enum Msg {
    Sent { seq: u64, idx: usize, out: Outcome },
    Probe { ok: bool },
}

/// The dispatcher's view of the batches out and of the collectors.
#[derive(Debug)]
struct State {
    inflight: BTreeSet<u64>,
    /// Sent, not taken, to send again (lowest first, before new ones).
    retry: BTreeSet<u64>,
    /// Highest seq taken from the spool so far.
    cursor: Option<u64>,
    backoff: Duration,
    retry_at: Option<Instant>,
    /// Failures in a row of the collector in use; past 0 the window shrinks to one batch.
    fails: usize,
    active: usize,
    down_since: Option<Instant>,
    probing: bool,
    next_probe: Instant,
    promote_backoff: Duration,
    promote_at: Option<Instant>,
    jitter: Jitter,
}

#[derive(Debug)]
pub struct Sender {
    client: Arc<Client>,
    spool: Arc<Spool>,
    state_dir: PathBuf,
    /// Most batches out at once.
    pub max_in_flight: usize,
    /// How often the first collector is probed while another one is in use.
    pub probe_every: Duration,
    /// Where the collector's resend-drift requests (in acks) go: the drift source.
    drift_link: crate::drift::DriftLink,
    /// Where diagnostics requests (in acks) go: the diagnostics worker.
    diag_link: crate::diag::DiagLink,
}

/// Stack of a sending thread: a TLS handshake runs on it (the default is 2 MiB; only touched
/// pages cost memory).
const SEND_STACK: usize = if cfg!(debug_assertions) {
    2 << 20
} else {
    1 << 20
};

/// The sending threads: the queue they take batches from and how many run.
struct Pool {
    rx: Arc<std::sync::Mutex<mpsc::Receiver<(usize, Entry)>>>,
    started: usize,
    /// A thread could not be started: no more are tried.
    failed: bool,
}

/// The sender's HTTP client as the diagnostics worker sees it.
#[derive(Debug, Clone)]
pub struct DiagPoster(Arc<Client>);

impl crate::diag::Post for DiagPoster {
    fn post_diagnostics(&self, idx: usize, body: &[u8]) -> Result<(), String> {
        if idx >= self.0.bases.len() {
            return Err(format!("no collector {idx}"));
        }
        self.0.post_answer(idx, body)
    }
    fn collectors(&self) -> usize {
        self.0.bases.len()
    }
}

impl Sender {
    /// A sender over `http` (see [`crate::tls::http_agent`]) to `collectors`, in order of
    /// preference.
    pub fn with_http(
        http: ureq::Agent,
        collectors: &[String],
        token: Option<String>,
        spool: Arc<Spool>,
        state_dir: PathBuf,
    ) -> Sender {
        assert!(!collectors.is_empty(), "the config requires a collector");
        Sender {
            client: Arc::new(Client {
                http,
                bases: collectors
                    .iter()
                    .map(|c| c.trim_end_matches('/').to_string())
                    .collect(),
                token,
            }),
            spool,
            state_dir,
            max_in_flight: 4,
            probe_every: Duration::from_secs(30),
            drift_link: crate::drift::DriftLink::default(),
            diag_link: crate::diag::DiagLink::default(),
        }
    }

    /// Pass the collector's diagnostics requests (in acks) to the diagnostics worker.
    pub fn with_diag_link(mut self, link: crate::diag::DiagLink) -> Sender {
        self.diag_link = link;
        self
    }

    /// What the diagnostics worker posts its snapshots with (same TLS, token and collectors).
    pub fn diag_poster(&self) -> DiagPoster {
        DiagPoster(self.client.clone())
    }

    /// Pass the collector's resend-drift requests (in acks) to the drift source.
    pub fn with_drift_link(mut self, link: crate::drift::DriftLink) -> Sender {
        self.drift_link = link;
        self
    }

    /// One attempt of `entry` at collector `idx` (0 is the first given).
    pub fn send(&self, idx: usize, entry: &Entry) -> Outcome {
        self.client.send(idx, entry)
    }

    /// Start sending threads until `want` run (at most `max_in_flight`): each takes a
    /// batch, sends it, reports the outcome. Started on demand, so an idle agent whose
    /// batches go out one at a time keeps one thread, not `max_in_flight`.
    fn grow(&self, pool: &mut Pool, tx: &mpsc::Sender<Msg>, want: usize) {
        while pool.started < want.min(self.max_in_flight.max(1)) && !pool.failed {
            let (client, tx, spool, work_rx) = (
                self.client.clone(),
                tx.clone(),
                self.spool.clone(),
                pool.rx.clone(),
            );
            let spawned = std::thread::Builder::new()
                .name(format!("send-{}", pool.started))
                .stack_size(SEND_STACK)
                .spawn(move || loop {
                    // The lock is held only while waiting for the next batch.
                    let next = work_rx
                        .lock()
                        .map_err(drop)
                        .and_then(|r| r.recv().map_err(drop));
                    let Ok((idx, entry)) = next else { return };
                    let out = client.send(idx, &entry);
                    // A send error only means the dispatcher is gone (stopping).
                    tx.send(Msg::Sent {
                        seq: entry.seq,
                        idx,
                        out,
                    })
                    .ok();
                    spool.poke();
                });
            match spawned {
                Ok(_) => pool.started += 1,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start a sending thread; fewer batches go out at once");
                    pool.failed = true;
                }
            }
        }
    }

    /// Until the agent stops: send, settle acks in order, back off, fail over.
    pub fn run(&self) {
        let (tx, rx) = mpsc::channel::<Msg>();
        let (work, work_rx) = mpsc::channel::<(usize, Entry)>();
        let mut pool = Pool {
            rx: Arc::new(std::sync::Mutex::new(work_rx)),
            started: 0,
            failed: false,
        };
        let mut st = State {
            inflight: BTreeSet::new(),
            retry: BTreeSet::new(),
            cursor: None,
            backoff: MIN_BACKOFF,
            retry_at: None,
            fails: 0,
            active: 0,
            down_since: None,
            probing: false,
            next_probe: Instant::now(),
            promote_backoff: MIN_BACKOFF,
            promote_at: None,
            jitter: Jitter::new(),
        };
        loop {
            // Read before looking at anything, so a change after this wakes the wait below.
            let generation = self.spool.generation();
            while let Ok(msg) = rx.try_recv() {
                self.handle(&mut st, msg);
            }
            if self.spool.stopping() {
                break;
            }
            let now = Instant::now();
            if st.promote_at.is_some_and(|t| now >= t) {
                self.promote(&mut st);
            }
            let sync_at = self.spool.sync_due();
            if sync_at.is_some_and(|t| now >= t) {
                self.spool.sync_overdue(crate::spool::SYNC_AFTER);
            }
            if st.active != 0 && !st.probing && now >= st.next_probe {
                st.probing = true;
                let (client, tx, spool) = (self.client.clone(), tx.clone(), self.spool.clone());
                std::thread::spawn(move || {
                    let ok = client.healthy(0);
                    // A send error only means the dispatcher is gone (stopping).
                    tx.send(Msg::Probe { ok }).ok();
                    spool.poke();
                });
            }
            let window = if st.fails > 0 {
                1
            } else if pool.failed {
                self.max_in_flight.min(pool.started.max(1))
            } else {
                self.max_in_flight.max(1)
            };
            let resting = st.retry_at.is_some_and(|t| now < t);
            if !resting && st.inflight.len() < window {
                if let Some(entry) = self.next_entry(&mut st) {
                    // One thread per batch in flight, started when first needed.
                    self.grow(&mut pool, &tx, st.inflight.len() + 1);
                    st.inflight.insert(entry.seq);
                    let idx = st.active;
                    if pool.started == 0 {
                        let seq = entry.seq;
                        let out = self.client.send(idx, &entry);
                        self.handle(&mut st, Msg::Sent { seq, idx, out });
                    } else if let Err(mpsc::SendError((idx, entry))) = work.send((idx, entry)) {
                        // Every sending thread is gone (they never end before the dispatcher).
                        let seq = entry.seq;
                        let out = self.client.send(idx, &entry);
                        self.handle(&mut st, Msg::Sent { seq, idx, out });
                    }
                    continue;
                }
            }
            let mut wait = Duration::from_secs(60);
            for t in [
                st.retry_at,
                st.promote_at,
                sync_at.filter(|t| *t > now),
                (st.active != 0).then_some(st.next_probe),
            ]
            .into_iter()
            .flatten()
            {
                wait = wait.min(
                    t.saturating_duration_since(now)
                        .max(Duration::from_millis(1)),
                );
            }
            if self.spool.wait_change(generation, wait) {
                break;
            }
        }
        // Stopping: settle what comes back soon; anything still out is sent again next time
        // (the collector answers "duplicate" for a batch it already stored).
        let end = Instant::now() + Duration::from_secs(2);
        while !st.inflight.is_empty() {
            match rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
                Ok(msg) => self.handle(&mut st, msg),
                Err(_) => break,
            }
        }
        // What is left waits for the next start: on disk, not only in the page cache.
        self.spool.sync_overdue(Duration::ZERO);
    }

    /// The next batch to send: a retry first, then the next new one in seq order.
    fn next_entry(&self, st: &mut State) -> Option<Entry> {
        while let Some(seq) = st.retry.pop_first() {
            if let Some(e) = self.spool.get(seq) {
                return Some(e);
            }
        }
        let e = self.spool.next_after(st.cursor)?;
        st.cursor = Some(e.seq);
        Some(e)
    }

    fn handle(&self, st: &mut State, msg: Msg) {
        let (seq, idx, out) = match msg {
            Msg::Probe { ok } => {
                st.probing = false;
                st.next_probe = Instant::now() + self.probe_every;
                if ok && st.active != 0 {
                    tracing::info!(collector = %self.client.bases[0], "first collector answers again; going back to it");
                    st.active = 0;
                }
                return;
            }
            Msg::Sent { seq, idx, out } => (seq, idx, out),
        };
        st.inflight.remove(&seq);
        let now = Instant::now();
        match out {
            Outcome::Acked(ack) if ack.duplicate => {
                // A collector that keeps only the highest seq per boot says "duplicate" for a
                // batch that arrived after a later one, stored or not. Queue it again under a
                // new seq rather than risk losing it (points sent twice overwrite themselves);
                // a few times at most, then believe the collector.
                let reseqs = self.spool.get(seq).map_or(u8::MAX, |e| e.meta.reseqs);
                if reseqs >= MAX_RESEQS {
                    self.on_acked(st, seq, idx, &ack);
                } else if let Err(e) = self.spool.reseq(seq) {
                    self.state_dir_failed(st, seq, &e);
                } else {
                    counters::add(&counters::batches_resent_as_new, 1);
                    tracing::warn!(seq, "collector called a batch a duplicate; queued it again under a new seq in case it was never stored");
                    self.promote(st);
                }
            }
            Outcome::Acked(ack) => self.on_acked(st, seq, idx, &ack),
            Outcome::Refused(reason) => {
                match self.spool.split(seq) {
                    Ok(true) => {
                        tracing::warn!(
                            seq,
                            reason,
                            "collector refused a batch; split it in two to find what it refuses"
                        );
                    }
                    Ok(false) => {
                        if let Err(e) = self.spool.reject(seq, &self.state_dir, &reason) {
                            self.state_dir_failed(st, seq, &e);
                        }
                    }
                    Err(e) => self.state_dir_failed(st, seq, &e),
                }
                self.promote(st);
            }
            Outcome::Retry(_, why) | Outcome::Down(_, why) if idx != st.active => {
                // An answer from a collector we already left: only send the batch again.
                tracing::debug!(seq, reason = %why, "batch failed at a collector no longer in use");
                st.retry.insert(seq);
            }
            Outcome::Retry(after, why) => {
                counters::add(&counters::send_retries, 1);
                st.retry.insert(seq);
                st.fails += 1;
                st.down_since.get_or_insert(now);
                let wait = self.back_off(st, after);
                tracing::warn!(seq, queued = self.spool.unsent(), wait_ms = wait.as_millis() as u64, reason = %why, "collector did not take the batch; will retry");
            }
            Outcome::Down(after, why) => {
                counters::add(&counters::send_retries, 1);
                st.retry.insert(seq);
                st.fails += 1;
                st.down_since.get_or_insert(now);
                let n = self.client.bases.len();
                if n > 1 {
                    let from = st.active;
                    st.active = (st.active + 1) % n;
                    st.next_probe = now + self.probe_every;
                    counters::add(&counters::collector_failovers, 1);
                    tracing::warn!(seq, reason = %why, from = %self.client.bases[from], to = %self.client.bases[st.active], "collector did not take the batch; failing over");
                }
                if n > 1 && st.fails < n {
                    st.retry_at = Some(now + FAILOVER_PAUSE);
                } else {
                    let wait = self.back_off(st, after);
                    tracing::warn!(seq, queued = self.spool.unsent(), wait_ms = wait.as_millis() as u64, reason = %why, "collector did not take the batch; will retry");
                }
            }
        }
    }

    /// The single place an accepted ack is handled.
    fn on_acked(&self, st: &mut State, seq: u64, idx: usize, ack: &phoenix_wire::Ack) {
        self.spool.mark_acked(seq);
        self.drift_link.on_ack(ack);
        self.diag_link.on_ack(ack, idx);
        if ack.rejected_points > 0 {
            tracing::warn!(
                seq,
                rejected_points = ack.rejected_points,
                "InfluxDB refused some points of an acked batch (see the collector's log)"
            );
        }
        if let Some(since) = st.down_since.take() {
            tracing::info!(
                collector = %self.client.bases[st.active],
                "collector reachable again after {} s, {} batches queued",
                since.elapsed().as_secs(),
                self.spool.unsent()
            );
        }
        st.fails = 0;
        st.backoff = MIN_BACKOFF;
        st.retry_at = None;
        self.promote(st);
    }

    /// Exponential backoff with jitter (or the collector's Retry-After); returns the wait.
    fn back_off(&self, st: &mut State, after: Option<Duration>) -> Duration {
        let wait = after
            .unwrap_or_else(|| st.jitter.spread(st.backoff))
            .min(Duration::from_secs(300));
        st.backoff = (st.backoff * 2).min(MAX_BACKOFF);
        st.retry_at = Some(Instant::now() + wait);
        wait
    }

    /// A batch could not be split or set aside (state dir not writable): keep it, rest, retry.
    fn state_dir_failed(&self, st: &mut State, seq: u64, e: &std::io::Error) {
        counters::add(&counters::state_write_errors, 1);
        st.retry.insert(seq);
        let wait = self.back_off(st, None);
        tracing::error!(seq, error = %e, wait_ms = wait.as_millis() as u64, "cannot set aside a refused batch in the state dir; it stays in the spool");
    }

    /// Settle acked batches in seq order; a state dir that cannot be written is retried with
    /// backoff (the batches stay in the spool meanwhile: nothing is sent again for it).
    fn promote(&self, st: &mut State) {
        match self.spool.promote(&self.state_dir) {
            Ok(_) => {
                st.promote_at = None;
                st.promote_backoff = MIN_BACKOFF;
            }
            Err(e) => {
                let wait = st.jitter.spread(st.promote_backoff);
                st.promote_backoff = (st.promote_backoff * 2).min(MAX_BACKOFF);
                st.promote_at = Some(Instant::now() + wait);
                tracing::error!(error = %e, wait_ms = wait.as_millis() as u64, "could not record acks in the state dir; will retry (nothing is lost or sent again)");
            }
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

#[cfg(test)]
mod tests;
