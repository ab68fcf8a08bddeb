//! Batches the points of many reports into few writes, applies Telegraf's status-code policy,
//! and tells each waiting report whether its points were taken.
//!
//! - 2xx: taken.
//! - 413: split the batch in halves and write each; a single line still too large is dropped
//!   and logged.
//! - 400/422: InfluxDB names the lines it could not parse; those are logged and dropped, the
//!   rest are written again (a rewrite of the same series and timestamp overwrites itself, so
//!   this is safe whether or not the store kept the valid lines of a partial write).
//! - 429/503, 5xx, 401/403/404, unreachable: nothing is acked; the store is marked unavailable
//!   until Retry-After (or a backoff) has passed, and reports get 503 + Retry-After meanwhile,
//!   so agents keep their data.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sink::{Response, Sink};

/// Points that one report wants written, and where to say how it went.
#[derive(Debug)]
pub struct Job {
    /// Line protocol, and the offset past each line's newline (string fields may hold newlines).
    pub body: String,
    pub ends: Vec<usize>,
    pub reply: tokio::sync::oneshot::Sender<Result<Written, Unavailable>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Written {
    /// Lines the store refused for good (logged at the collector).
    pub rejected: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Unavailable {
    pub retry_after: Duration,
    pub reason: String,
}

/// Figures for /metrics and `phoenix_collector`.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub writes: AtomicU64,
    pub write_errors: AtomicU64,
    pub points_written: AtomicU64,
    pub points_rejected: AtomicU64,
    pub write_ns_total: AtomicU64,
    pub splits: AtomicU64,
    pub queue_depth: AtomicU64,
    /// Bytes of line protocol in the jobs of `queue_depth`.
    pub queue_bytes: AtomicU64,
    pub last_write_ns: AtomicU64,
    pub write_latency: crate::hist::Histogram,
}

#[derive(Debug, Clone)]
pub struct WriterHandle {
    tx: SyncSender<Job>,
    max_queue_jobs: u64,
    max_queue_bytes: u64,
    down: Arc<Mutex<Option<(Instant, String)>>>,
    pub stats: Arc<WriterStats>,
}

#[derive(Debug)]
pub struct Settings {
    /// Most lines in one write to the store.
    pub batch_lines: usize,
    /// Jobs that may wait for a writer before reports get 503.
    pub queue: usize,
    /// Bytes of line protocol that may wait for a writer before reports get 503. One job is
    /// always let into an empty queue, however large, so a big report cannot starve.
    pub queue_bytes: usize,
    /// Writers working at once.
    pub writers: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            batch_lines: 5000,
            queue: 1024,
            queue_bytes: 64 << 20,
            writers: 2,
        }
    }
}

impl WriterHandle {
    /// Queue a job without blocking. Fails at once when the store is down or the queue full.
    pub fn submit(&self, job: Job) -> Result<(), (Job, Unavailable)> {
        if let Err(u) = self.room() {
            return Err((job, u));
        }
        // Counted before the send: a writer may take the job (and subtract) at once.
        self.stats.queue_depth.fetch_add(1, Ordering::Relaxed);
        self.stats
            .queue_bytes
            .fetch_add(job.body.len() as u64, Ordering::Relaxed);
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(job)) => Err((self.unqueued(job), queue_full())),
            Err(TrySendError::Disconnected(job)) => Err((
                self.unqueued(job),
                Unavailable {
                    retry_after: Duration::from_secs(5),
                    reason: "collector writer stopped".into(),
                },
            )),
        }
    }

    fn unqueued(&self, job: Job) -> Job {
        self.stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
        self.stats
            .queue_bytes
            .fetch_sub(job.body.len() as u64, Ordering::Relaxed);
        job
    }

    /// Whether a job would be queued now: Err while the store is down or the queue holds its
    /// most bytes. A report asks before it builds its lines, so one that would be refused
    /// costs no line protocol and holds none while its 503 is sent.
    pub fn room(&self) -> Result<(), Unavailable> {
        if let Some(u) = self.unavailable() {
            return Err(u);
        }
        if self.stats.queue_depth.load(Ordering::Relaxed) >= self.max_queue_jobs {
            return Err(queue_full());
        }
        if self.stats.queue_bytes.load(Ordering::Relaxed) >= self.max_queue_bytes {
            return Err(Unavailable {
                retry_after: Duration::from_secs(2),
                reason: format!(
                    "collector write queue holds its most ({} MiB of points waiting for the store)",
                    self.max_queue_bytes >> 20
                ),
            });
        }
        Ok(())
    }

    /// Some(reason) while the store is known to be down.
    pub fn unavailable(&self) -> Option<Unavailable> {
        down_now(&self.down)
    }
}

fn queue_full() -> Unavailable {
    Unavailable {
        retry_after: Duration::from_secs(2),
        reason: "collector write queue is full".into(),
    }
}

/// The store's down state, if it is still in force (Retry-After is at least a second).
fn down_now(down: &Mutex<Option<(Instant, String)>>) -> Option<Unavailable> {
    let g = down.lock().unwrap();
    match &*g {
        Some((until, why)) if *until > Instant::now() => Some(Unavailable {
            retry_after: (*until - Instant::now()).max(Duration::from_secs(1)),
            reason: why.clone(),
        }),
        _ => None,
    }
}

pub fn start(sink: Arc<dyn Sink>, settings: Settings) -> WriterHandle {
    let (tx, rx) = sync_channel::<Job>(settings.queue);
    let rx = Arc::new(Mutex::new(rx));
    let down = Arc::new(Mutex::new(None));
    let stats = Arc::new(WriterStats::default());
    for i in 0..settings.writers.max(1) {
        let w = Worker {
            sink: sink.clone(),
            rx: rx.clone(),
            down: down.clone(),
            stats: stats.clone(),
            batch_lines: settings.batch_lines,
            backoff: Duration::from_secs(1),
        };
        std::thread::Builder::new()
            .name(format!("influx-writer-{i}"))
            .spawn(move || w.run())
            .expect("spawn writer");
    }
    WriterHandle {
        tx,
        max_queue_jobs: settings.queue as u64,
        max_queue_bytes: settings.queue_bytes.max(1) as u64,
        down,
        stats,
    }
}

struct Worker {
    sink: Arc<dyn Sink>,
    rx: Arc<Mutex<Receiver<Job>>>,
    down: Arc<Mutex<Option<(Instant, String)>>>,
    stats: Arc<WriterStats>,
    batch_lines: usize,
    backoff: Duration,
}

impl Worker {
    fn run(mut self) {
        loop {
            // Take what is waiting, up to one batch: under load jobs pile up during a write,
            // so batches grow by themselves; when idle a report is written at once.
            let mut jobs = Vec::new();
            {
                let rx = self.rx.lock().unwrap();
                let Ok(first) = rx.recv() else { return };
                let mut lines = first.ends.len();
                jobs.push(first);
                while lines < self.batch_lines {
                    match rx.try_recv() {
                        Ok(j) => {
                            lines += j.ends.len();
                            jobs.push(j);
                        }
                        Err(_) => break,
                    }
                }
            }
            self.stats
                .queue_depth
                .fetch_sub(jobs.len() as u64, Ordering::Relaxed);
            self.stats.queue_bytes.fetch_sub(
                jobs.iter().map(|j| j.body.len() as u64).sum(),
                Ordering::Relaxed,
            );
            let jobs: Vec<Job> = jobs.into_iter().filter(|j| !j.reply.is_closed()).collect();
            if jobs.is_empty() {
                continue;
            }
            if let Some(u) = down_now(&self.down) {
                for j in jobs {
                    j.reply.send(Err(u.clone())).ok();
                }
                continue;
            }
            let outcome = self.write_jobs(&jobs).map(|bad| {
                let per_job: Vec<u64> = jobs
                    .iter()
                    .map(|j| {
                        if bad.is_empty() {
                            0
                        } else {
                            job_lines(j).filter(|l| bad.contains(l)).count() as u64
                        }
                    })
                    .collect();
                let total: usize = jobs.iter().map(|j| j.ends.len()).sum();
                (total, bad.len(), per_job)
            });
            match outcome {
                Ok((total, bad, per_job)) => {
                    self.backoff = Duration::from_secs(1);
                    *self.down.lock().unwrap() = None;
                    self.stats
                        .points_written
                        .fetch_add((total - bad) as u64, Ordering::Relaxed);
                    self.stats
                        .points_rejected
                        .fetch_add(bad as u64, Ordering::Relaxed);
                    for (j, rejected) in jobs.into_iter().zip(per_job) {
                        j.reply.send(Ok(Written { rejected })).ok();
                    }
                }
                Err(u) => {
                    self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(reason = %u.reason, retry_after_s = u.retry_after.as_secs(), "store unavailable; reports get 503 until it is back");
                    *self.down.lock().unwrap() =
                        Some((Instant::now() + u.retry_after, u.reason.clone()));
                    for j in jobs {
                        j.reply.send(Err(u.clone())).ok();
                    }
                }
            }
        }
    }

    /// Write the jobs' bodies as they are (each is whole lines), one after the other; only
    /// an answer other than 2xx looks at single lines. Ok(lines refused for good) or Err when
    /// nothing can be written now.
    fn write_jobs<'a>(&mut self, jobs: &'a [Job]) -> Result<Vec<&'a str>, Unavailable> {
        let parts: Vec<&[u8]> = jobs
            .iter()
            .map(|j| &j.body.as_bytes()[..j.ends.last().copied().unwrap_or(0)])
            .collect();
        let resp = self.send(&parts)?;
        if (200..300).contains(&resp.status) {
            return Ok(Vec::new());
        }
        if jobs.len() > 1
            && matches!(resp.status, 400 | 422)
            && bad_lines_named(&resp.body).is_empty()
        {
            // The store dropped points without naming them (a field type conflict), so whose
            // they were cannot be told from the batch, and each report's ack must count its
            // own. Each job is written again alone: the store kept the batch's valid points,
            // and a point written again overwrites itself, so nothing is doubled.
            let mut bad = Vec::new();
            for j in jobs {
                let lines: Vec<&str> = job_lines(j).collect();
                bad.extend(self.write_lines(&lines)?);
            }
            return Ok(bad);
        }
        let lines: Vec<&str> = jobs.iter().flat_map(job_lines).collect();
        self.answer(&lines, resp)
    }

    /// One write of `parts` to the store, timed.
    fn send(&mut self, parts: &[&[u8]]) -> Result<Response, Unavailable> {
        let t = Instant::now();
        let resp = self.sink.write(parts);
        let ns = t.elapsed().as_nanos() as u64;
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats.write_ns_total.fetch_add(ns, Ordering::Relaxed);
        self.stats.last_write_ns.store(ns, Ordering::Relaxed);
        self.stats.write_latency.observe_ns(ns);
        resp.map_err(|e| self.unavailable(None, e.to_string()))
    }

    /// Write `lines`; Ok(lines refused for good) or Err when nothing can be written now.
    fn write_lines<'a>(&mut self, lines: &[&'a str]) -> Result<Vec<&'a str>, Unavailable> {
        if lines.is_empty() {
            return Ok(Vec::new());
        }
        let mut body = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for l in lines {
            body.push_str(l);
            body.push('\n');
        }
        let resp = self.send(&[body.as_bytes()])?;
        self.answer(lines, resp)
    }

    /// Apply the status-code policy to the store's answer to a write of `lines`.
    fn answer<'a>(
        &mut self,
        lines: &[&'a str],
        resp: Response,
    ) -> Result<Vec<&'a str>, Unavailable> {
        match resp.status {
            200..=299 => Ok(Vec::new()),
            413 if lines.len() > 1 => {
                self.stats.splits.fetch_add(1, Ordering::Relaxed);
                let (a, b) = lines.split_at(lines.len() / 2);
                let mut bad = self.write_lines(a)?;
                bad.extend(self.write_lines(b)?);
                Ok(bad)
            }
            413 => {
                tracing::error!(bytes = lines[0].len(), "store refused a single point as too large; dropped it");
                Ok(lines.to_vec())
            }
            400 | 422 => Ok(self.drop_bad_lines(lines, &resp)),
            404 => {
                // Most likely the database is missing (dropped, or never made): make it again.
                let why = format!("store answered 404: {} (check --influx-db / --influx-bucket)", resp.body.trim());
                if let Err(e) = self.sink.prepare() {
                    tracing::error!(error = %e, "could not create the database");
                }
                Err(self.unavailable(Some(Duration::from_secs(2)), why))
            }
            401 | 403 => Err(self.unavailable(Some(Duration::from_secs(30)), format!("store refused our credentials (HTTP {}): check --influx-user/--influx-password or --influx-token", resp.status))),
            s => Err(self.unavailable(resp.retry_after, format!("store answered HTTP {s}: {}", resp.body.trim()))),
        }
    }

    fn unavailable(&mut self, after: Option<Duration>, reason: String) -> Unavailable {
        let retry_after = after.unwrap_or(self.backoff).min(Duration::from_secs(60));
        self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
        Unavailable {
            retry_after,
            reason,
        }
    }

    fn drop_bad_lines<'a>(&mut self, lines: &[&'a str], resp: &Response) -> Vec<&'a str> {
        let named = bad_lines_named(&resp.body);
        let (bad, good): (Vec<&str>, Vec<&str>) =
            lines.iter().partition(|l| named.iter().any(|n| n == *l));
        for b in &bad {
            tracing::error!(line = %b, "store refused this line for good; dropped it");
        }
        if bad.is_empty() {
            // Nothing named (e.g. a field type conflict): the store kept the rest, says how
            // many it dropped; those cannot be told apart, so count without rewriting.
            let dropped = dropped_count(&resp.body).unwrap_or(lines.len() as u64) as usize;
            tracing::error!(error = %resp.body.trim(), dropped, "store refused part of a batch");
            return lines
                .iter()
                .take(dropped.min(lines.len()))
                .copied()
                .collect();
        }
        if good.is_empty() {
            return bad;
        }
        match self.write_lines(&good) {
            Ok(mut more) => {
                more.extend(bad);
                more
            }
            Err(u) => {
                // The good lines may already be stored (1.x keeps them); if not, they are lost
                // only here, so say it loudly.
                tracing::error!(reason = %u.reason, lines = good.len(), "rewrite of the valid lines after a partial write failed");
                bad
            }
        }
    }
}

fn job_lines(j: &Job) -> impl Iterator<Item = &str> {
    crate::lineproto::lines(&j.body, &j.ends)
}

/// The lines InfluxDB names in "unable to parse '<line>': reason" (1.x and 2.x spell it so).
pub fn bad_lines_named(body: &str) -> Vec<String> {
    // The error is JSON with the text in "error" (1.x) or "message" (2.x); fall back to raw.
    let text = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("error")
                .or_else(|| v.get("message"))
                .and_then(|e| e.as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| body.to_owned());
    let mut out = Vec::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("unable to parse '") {
        rest = &rest[i + "unable to parse '".len()..];
        if let Some(end) = rest.find("': ") {
            out.push(rest[..end].to_owned());
            rest = &rest[end..];
        } else {
            break;
        }
    }
    out
}

fn dropped_count(body: &str) -> Option<u64> {
    let i = body.rfind("dropped=")?;
    body[i + 8..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::SinkError;

    /// A store with InfluxDB 1.x's answers: 413 over a size, 400 naming unparsable lines
    /// (keeping the rest), 503 while "down".
    struct FakeInflux {
        max_body: usize,
        down: std::sync::atomic::AtomicBool,
        stored: Mutex<Vec<String>>,
    }

    impl Sink for FakeInflux {
        fn write(&self, parts: &[&[u8]]) -> Result<Response, SinkError> {
            let body = &parts.concat()[..];
            if self.down.load(Ordering::SeqCst) {
                return Ok(Response {
                    status: 503,
                    retry_after: Some(Duration::from_millis(50)),
                    body: String::new(),
                });
            }
            if body.len() > self.max_body {
                return Ok(Response {
                    status: 413,
                    retry_after: None,
                    body: "{\"error\":\"Request Entity Too Large\"}".into(),
                });
            }
            let text = std::str::from_utf8(body).unwrap();
            let mut errs = Vec::new();
            let mut conflicts = 0;
            for l in text.lines() {
                if l.contains("BAD") {
                    errs.push(format!("unable to parse '{l}': invalid field format"));
                } else if l.contains("CONFLICT") {
                    // Like a field type conflict: dropped, counted, not named.
                    conflicts += 1;
                } else {
                    self.stored.lock().unwrap().push(l.to_owned());
                }
            }
            if errs.is_empty() && conflicts > 0 {
                let e = format!("partial write: field type conflict dropped={conflicts}");
                return Ok(Response {
                    status: 400,
                    retry_after: None,
                    body: serde_json::json!({ "error": e }).to_string(),
                });
            }
            if errs.is_empty() {
                Ok(Response {
                    status: 204,
                    retry_after: None,
                    body: String::new(),
                })
            } else {
                let e = format!("partial write: {} dropped=0", errs.join("\n"));
                Ok(Response {
                    status: 400,
                    retry_after: None,
                    body: serde_json::json!({ "error": e }).to_string(),
                })
            }
        }
        fn describe(&self) -> String {
            "fake".into()
        }
    }

    fn submit(
        h: &WriterHandle,
        body: &str,
    ) -> tokio::sync::oneshot::Receiver<Result<Written, Unavailable>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let ends = body.match_indices('\n').map(|(i, _)| i + 1).collect();
        h.submit(Job {
            body: body.into(),
            ends,
            reply: tx,
        })
        .map_err(|(_, u)| u)
        .unwrap();
        rx
    }

    #[test]
    fn policy() {
        let sink = Arc::new(FakeInflux {
            max_body: 50,
            down: false.into(),
            stored: Mutex::new(vec![]),
        });
        let h = start(
            sink.clone(),
            Settings {
                batch_lines: 100,
                queue: 16,
                writers: 1,
                ..Settings::default()
            },
        );
        // 413: split until each piece fits; everything arrives.
        let body: String = (0..10).map(|i| format!("m v={i}i {i}\n")).collect();
        assert_eq!(
            submit(&h, &body).blocking_recv().unwrap(),
            Ok(Written { rejected: 0 })
        );
        assert_eq!(sink.stored.lock().unwrap().len(), 10);
        assert!(h.stats.splits.load(Ordering::Relaxed) > 0);
        // 400: only the bad line goes.
        sink.stored.lock().unwrap().clear();
        assert_eq!(
            submit(&h, "a v=1i 1\nBAD line\nb v=2i 2\n")
                .blocking_recv()
                .unwrap(),
            Ok(Written { rejected: 1 })
        );
        let stored = sink.stored.lock().unwrap().clone();
        assert!(
            stored.contains(&"a v=1i 1".to_string()) && stored.contains(&"b v=2i 2".to_string())
        );
        // 503: nothing acked, the store is marked down, later submits fail fast, then recover.
        sink.down.store(true, Ordering::SeqCst);
        let r = submit(&h, "c v=1i 1\n").blocking_recv().unwrap();
        assert!(r.is_err());
        assert!(h.unavailable().is_some());
        sink.down.store(false, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(
            submit(&h, "c v=1i 1\n").blocking_recv().unwrap(),
            Ok(Written { rejected: 0 })
        );
    }

    #[test]
    fn job_bodies_are_written_whole_and_nothing_past_the_last_line() {
        let sink = Arc::new(FakeInflux {
            max_body: 1 << 20,
            down: false.into(),
            stored: Mutex::new(vec![]),
        });
        let mut w = Worker {
            sink: sink.clone(),
            rx: Arc::new(Mutex::new(sync_channel(1).1)),
            down: Arc::new(Mutex::new(None)),
            stats: Arc::new(WriterStats::default()),
            batch_lines: 100,
            backoff: Duration::from_secs(1),
        };
        let job = |body: &str, ends: Vec<usize>| Job {
            body: body.into(),
            ends,
            reply: tokio::sync::oneshot::channel().0,
        };
        // The second body holds text after its last line (a point never ended): not sent.
        let jobs = vec![
            job("a v=1i 1\nb v=\"x\ny\" 2\n", vec![9, 21]),
            job("c v=3i 3\npartial", vec![9]),
        ];
        assert_eq!(w.write_jobs(&jobs), Ok(vec![]));
        assert_eq!(
            *sink.stored.lock().unwrap(),
            ["a v=1i 1", "b v=\"x", "y\" 2", "c v=3i 3"]
        );
        assert_eq!(w.stats.writes.load(Ordering::Relaxed), 1);
        // A refused line among whole bodies: only it is dropped, the rest written again.
        sink.stored.lock().unwrap().clear();
        let jobs = vec![
            job("d v=1i 1\n", vec![9]),
            job("BAD x\ne v=1i 2\n", vec![6, 15]),
        ];
        assert_eq!(w.write_jobs(&jobs), Ok(vec!["BAD x"]));
        assert!(sink
            .stored
            .lock()
            .unwrap()
            .ends_with(&["d v=1i 1".to_string(), "e v=1i 2".to_string()]));
        // A point dropped unnamed (a type conflict) in a batch of two reports: counted
        // against the report that sent it, not the first line of the batch.
        let jobs = vec![
            job("f v=1i 1\n", vec![9]),
            job("g v=1i 2\nCONFLICT 3\n", vec![9, 20]),
        ];
        let bad = w.write_jobs(&jobs).unwrap();
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(job_lines(&jobs[1]).any(|l| l == bad[0]), "{bad:?}");
        assert!(!job_lines(&jobs[0]).any(|l| l == bad[0]), "{bad:?}");
    }

    /// A store that takes nothing until the test opens it, so jobs stay in the queue.
    struct Gated {
        open: Mutex<bool>,
        opened: std::sync::Condvar,
    }

    impl Sink for Gated {
        fn write(&self, _: &[&[u8]]) -> Result<Response, SinkError> {
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
            Ok(Response {
                status: 204,
                retry_after: None,
                body: String::new(),
            })
        }
        fn describe(&self) -> String {
            "gated".into()
        }
    }

    #[test]
    fn the_queue_holds_at_most_its_bytes_but_always_one_job() {
        let sink = Arc::new(Gated {
            open: Mutex::new(false),
            opened: std::sync::Condvar::new(),
        });
        let h = start(
            sink.clone(),
            Settings {
                batch_lines: 1,
                queue: 100,
                queue_bytes: 100,
                writers: 1,
            },
        );
        let until = |what: &str, f: &dyn Fn() -> bool| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !f() {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        // The writer takes the first job and waits in the store with it.
        let first = submit(&h, "a v=1i 1\n");
        until("the writer to take the first job", &|| {
            h.stats.queue_depth.load(Ordering::Relaxed) == 0
        });
        // The queue is empty, so a job over the byte limit is let in...
        let big = "b v=2i 2\n".repeat(20);
        let second = submit(&h, &big);
        assert_eq!(
            h.stats.queue_bytes.load(Ordering::Relaxed),
            big.len() as u64
        );
        // ...and nothing after it: the report is told before it builds lines, and a job
        // submitted anyway is handed back whole.
        let full = h.room().unwrap_err();
        assert!(full.reason.contains("holds its most"), "{full:?}");
        let (tx, _rx) = tokio::sync::oneshot::channel();
        let (back, why) = h
            .submit(Job {
                body: "c v=3i 3\n".into(),
                ends: vec![9],
                reply: tx,
            })
            .unwrap_err();
        assert_eq!((back.body.as_str(), why), ("c v=3i 3\n", full));
        assert_eq!(h.stats.queue_depth.load(Ordering::Relaxed), 1);
        // The store takes the two: the queue is empty and open again.
        *sink.open.lock().unwrap() = true;
        sink.opened.notify_all();
        assert_eq!(first.blocking_recv().unwrap(), Ok(Written { rejected: 0 }));
        assert_eq!(second.blocking_recv().unwrap(), Ok(Written { rejected: 0 }));
        assert_eq!(h.stats.queue_bytes.load(Ordering::Relaxed), 0);
        assert_eq!(h.stats.queue_depth.load(Ordering::Relaxed), 0);
        assert_eq!(h.room(), Ok(()));
    }

    #[test]
    fn error_texts() {
        let body = r#"{"error":"partial write: unable to parse 'part,host=b v= 1700000000000000000': missing field value\nunable to parse 'garbage line here': invalid field format dropped=0"}"#;
        assert_eq!(
            bad_lines_named(body),
            vec![
                "part,host=b v= 1700000000000000000".to_string(),
                "garbage line here".to_string()
            ]
        );
        assert_eq!(dropped_count("field type conflict ... dropped=3"), Some(3));
    }
}
