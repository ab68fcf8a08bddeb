//! fleetsim: many phoenix agents in one process, speaking the real wire format (gzip JSON
//! reports, per-boot seq numbers, agent token, each instance's own credential under the
//! collector's default `--identity tofu`) to a collector. For bench/fleet-bench.sh.
//!
//!   fleetsim --url http://127.0.0.1:7070 --token T --instances 10000 --interval 10 \
//!            --points 40 --duration 60 [--connections 1000] [--threads 1] \
//!            [--silence-at 20 --recycler-token R]
//!
//! Each instance reports once per interval at its own moment, the fleet spread evenly over
//! it. The instances are dealt to `--connections` lanes; a lane sends each report when it is
//! due, over a free keep-alive HTTP/1.1 connection of its own (up to `--per-lane` reports in
//! flight, one per connection), from source addresses 127.0.0.2 to 127.0.0.254 when the
//! collector is on loopback, so per-peer limits see many peers as with a real fleet. An
//! async runtime on `--threads` threads drives them all: the rate is paced by the instances'
//! intervals, not bound by the collector's ack latency. Every 5 s a line of figures goes to stderr
//! (reports sent and acked per second); at the end one JSON line with the totals goes to
//! stdout. With
//! --rounds N every instance sends N reports as fast as the collector takes them, then it
//! exits (a warm-up: InfluxDB 1.x creates each new series slowly). With
//! --silence-at S the first instance stops reporting after S seconds, and the time from its
//! last acked report until GET /v1/phoenix lists it as marked is measured.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use phoenix_wire::{Identity, Point, Report, Value, VERSION};

struct Opts {
    url: String,
    token: String,
    instances: usize,
    interval: f64,
    points: usize,
    duration: f64,
    threads: usize,
    connections: usize,
    /// Reports of one lane in flight at once, each on its own connection.
    per_lane: usize,
    gzip: bool,
    silence_at: Option<f64>,
    recycler_token: Option<String>,
    prefix: String,
    group_size: usize,
    /// Stop after this many reports per instance, sent as fast as the collector takes them.
    rounds: Option<u64>,
}

fn usage() -> ! {
    eprintln!("usage: fleetsim --url URL --token T [--instances 10000] [--interval 10] [--points 40] [--duration 60] [--connections 1000] [--per-lane 3] [--threads 1] [--no-gzip] [--silence-at S --recycler-token R] [--prefix i-f] [--group-size 100] [--rounds N]");
    std::process::exit(2)
}

fn opts() -> Opts {
    let mut o = Opts {
        url: String::new(),
        token: String::new(),
        instances: 10_000,
        interval: 10.0,
        points: 40,
        duration: 60.0,
        threads: 1,
        connections: 1000,
        per_lane: 3,
        gzip: true,
        silence_at: None,
        recycler_token: None,
        prefix: "i-f".into(),
        group_size: 100,
        rounds: None,
    };
    let mut a = std::env::args().skip(1);
    while let Some(k) = a.next() {
        let mut v = || a.next().unwrap_or_else(|| usage());
        let num = |s: String| s.parse::<f64>().unwrap_or_else(|_| usage());
        match k.as_str() {
            "--url" => o.url = v(),
            "--token" => o.token = v(),
            "--instances" => o.instances = num(v()) as usize,
            "--interval" => o.interval = num(v()),
            "--points" => o.points = num(v()) as usize,
            "--duration" => o.duration = num(v()),
            "--threads" => o.threads = num(v()).max(1.0) as usize,
            "--connections" => o.connections = num(v()).max(1.0) as usize,
            "--per-lane" => o.per_lane = num(v()).clamp(1.0, 64.0) as usize,
            "--no-gzip" => o.gzip = false,
            "--silence-at" => o.silence_at = Some(num(v())),
            "--recycler-token" => o.recycler_token = Some(v()),
            "--prefix" => o.prefix = v(),
            "--group-size" => o.group_size = num(v()).max(1.0) as usize,
            "--rounds" => o.rounds = Some(num(v()) as u64),
            _ => usage(),
        }
    }
    if o.url.is_empty() || o.token.is_empty() {
        usage();
    }
    o
}

/// A report shaped like the agent's: cpu total and per-CPU, mem, disk, net, diskio, system
/// and the agent's own point, cut or padded to `points`.
fn report(id: &str, group: &str, seq: u64, points: usize, interval_ms: u64) -> Report {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let jitter = (seq % 7) as f64;
    let mut metrics = Vec::with_capacity(points);
    let mk = |m: &str, tags: Vec<(&str, String)>, fields: Vec<(&str, Value)>| Point {
        m: m.into(),
        tags: tags.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        fields: fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        ts,
    };
    let cpu = |name: String| {
        mk(
            "cpu",
            vec![("cpu", name)],
            vec![
                ("usage_user", Value::Float(10.0 + jitter)),
                ("usage_system", Value::Float(3.5)),
                ("usage_idle", Value::Float(85.0 - jitter)),
                ("usage_iowait", Value::Float(0.5)),
                ("usage_steal", Value::Float(0.0)),
                ("usage_nice", Value::Float(0.0)),
                ("usage_irq", Value::Float(0.0)),
                ("usage_softirq", Value::Float(1.0)),
            ],
        )
    };
    metrics.push(cpu("cpu-total".into()));
    metrics.push(mk(
        "mem",
        vec![],
        vec![
            ("total", Value::Int(8 << 30)),
            ("available", Value::Int(5 << 30)),
            ("used", Value::Int(3 << 30)),
            ("free", Value::Int(4 << 30)),
            ("cached", Value::Int(1 << 30)),
            ("buffered", Value::Int(1 << 20)),
            ("used_percent", Value::Float(37.5)),
            ("available_percent", Value::Float(62.5)),
        ],
    ));
    metrics.push(mk(
        "system",
        vec![],
        vec![
            ("load1", Value::Float(0.3)),
            ("load5", Value::Float(0.2)),
            ("load15", Value::Float(0.1)),
            ("n_cpus", Value::Int(4)),
            ("uptime", Value::Int(86400 + seq as i64)),
        ],
    ));
    metrics.push(mk(
        "disk",
        vec![
            ("path", "/".into()),
            ("device", "nvme0n1p1".into()),
            ("fstype", "ext4".into()),
        ],
        vec![
            ("total", Value::Int(100 << 30)),
            ("free", Value::Int(60 << 30)),
            ("used", Value::Int(40 << 30)),
            ("used_percent", Value::Float(40.0)),
            ("inodes_total", Value::Int(6_000_000)),
            ("inodes_used", Value::Int(200_000)),
        ],
    ));
    let mut k = 0;
    while metrics.len() < points.saturating_sub(1) {
        match k % 3 {
            0 => metrics.push(cpu(format!("cpu{}", k / 3))),
            1 => metrics.push(mk(
                "net",
                vec![("interface", format!("eth{}", k / 3))],
                vec![
                    ("bytes_sent", Value::Int(1_000_000 * seq as i64)),
                    ("bytes_recv", Value::Int(2_000_000 * seq as i64)),
                    ("packets_sent", Value::Int(1000 * seq as i64)),
                    ("packets_recv", Value::Int(2000 * seq as i64)),
                    ("err_in", Value::Int(0)),
                    ("err_out", Value::Int(0)),
                    ("drop_in", Value::Int(0)),
                    ("drop_out", Value::Int(0)),
                ],
            )),
            _ => metrics.push(mk(
                "diskio",
                vec![("name", format!("nvme{}n1", k / 3))],
                vec![
                    ("reads", Value::Int(500 * seq as i64)),
                    ("writes", Value::Int(900 * seq as i64)),
                    ("read_bytes", Value::Int(4096 * 500 * seq as i64)),
                    ("write_bytes", Value::Int(4096 * 900 * seq as i64)),
                    ("io_time", Value::Int(10 * seq as i64)),
                ],
            )),
        }
        k += 1;
    }
    metrics.push(mk(
        "phoenix_agent",
        vec![("version", "sim".into())],
        vec![
            ("spool_bytes", Value::Int(0)),
            ("dropped_points", Value::Int(0)),
            ("rss_bytes", Value::Int(9 << 20)),
        ],
    ));
    metrics.truncate(points.max(1));
    Report {
        v: VERSION,
        agent: Identity {
            instance_id: id.into(),
            image_id: "img-sim".into(),
            group: Some(group.into()),
            hostname: format!("h-{id}"),
            boot_id: boot_id(),
            version: "fleetsim".into(),
            boot_time: 0,
        },
        seq,
        interval_ms,
        metrics,
        logs: vec![],
        drift: None,
        checks: vec![],
        drift_root: None,
        protected: None,
    }
}

#[derive(Default)]
struct Stats {
    /// Reports written to a connection (the simulator's own rate).
    sent: AtomicU64,
    ok: AtomicU64,
    unavailable: AtomicU64,
    errors: AtomicU64,
    lat_us: AtomicU64,
    late: AtomicU64,
    points: AtomicU64,
    connects: AtomicU64,
}

impl Stats {
    fn error(&self, what: impl std::fmt::Display) {
        if self.errors.fetch_add(1, Ordering::Relaxed) < 5 {
            eprintln!("fleetsim: {what}");
        }
    }
}

/// Where the collector listens, and the source address of connection `c`: on loopback the
/// connections spread over 127.0.0.2..=254 (Linux routes all of 127/8 to lo).
struct Target {
    addr: SocketAddr,
    host: String,
}

impl Target {
    fn of(url: &str) -> Target {
        let hostport = url
            .strip_prefix("http://")
            .unwrap_or_else(|| {
                eprintln!("fleetsim: only http:// URLs");
                std::process::exit(2)
            })
            .trim_end_matches('/');
        let addr: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(hostport)
            .ok()
            .and_then(|mut a| a.next())
            .unwrap_or_else(|| {
                eprintln!("fleetsim: cannot resolve {hostport}");
                std::process::exit(2)
            });
        Target {
            addr,
            host: hostport.to_string(),
        }
    }

    fn source(&self, c: usize) -> Option<SocketAddr> {
        match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_loopback() => Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (c % 253) as u8)),
                0,
            )),
            _ => None,
        }
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(t: &Target, c: usize) -> std::io::Result<Sender> {
    let sock = match t.addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    if let Some(src) = t.source(c) {
        sock.bind(src)?;
    }
    let stream = sock.connect(t.addr).await?;
    stream.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        conn.await.ok();
    });
    Ok(send)
}

struct Shared {
    o: Opts,
    t: Target,
    stats: Stats,
    stop: AtomicBool,
    start: Instant,
    /// Unix ms of the silenced instance's last acked report.
    silenced_last_ok: AtomicU64,
    auth: String,
}

/// One connection and the instances that report over it (c, c + C, c + 2C, ...), each at its
/// own moment of every interval.
async fn lane(sh: Arc<Shared>, c: usize) {
    let o = &sh.o;
    let mine: Vec<usize> = (c..o.instances).step_by(o.connections).collect();
    let ids: Vec<String> = mine
        .iter()
        .map(|k| format!("{}-{k:06}", o.prefix))
        .collect();
    let groups: Vec<String> = mine
        .iter()
        .map(|k| format!("g{:04}", k / o.group_size))
        .collect();
    let creds: Vec<String> = ids
        .iter()
        .map(|id| phoenix_e2e::trust::harness_credential(id))
        .collect();
    let mut seq = vec![0u64; mine.len()];
    let interval = Duration::from_secs_f64(o.interval);
    let pool: Arc<std::sync::Mutex<Vec<Sender>>> = Arc::default();
    let lane_slots = Arc::new(tokio::sync::Semaphore::new(o.per_lane));
    let mut round = 0u64;
    while !sh.stop.load(Ordering::Relaxed) {
        for (j, &k) in mine.iter().enumerate() {
            let due = interval.mul_f64(round as f64 + k as f64 / o.instances as f64);
            let now = sh.start.elapsed();
            if o.rounds.is_some() {
                // Warm-up: as fast as it goes.
            } else if due > now {
                tokio::time::sleep(due - now).await;
            } else if now - due > interval {
                sh.stats.late.fetch_add(1, Ordering::Relaxed);
            }
            if sh.stop.load(Ordering::Relaxed) {
                break;
            }
            if k == 0
                && o.silence_at
                    .is_some_and(|s| sh.start.elapsed().as_secs_f64() >= s)
            {
                continue;
            }
            seq[j] += 1;
            let r = report(
                &ids[j],
                &groups[j],
                seq[j],
                o.points,
                (o.interval * 1000.0) as u64,
            );
            let body = if o.gzip {
                phoenix_wire::encode(&r)
            } else {
                serde_json::to_vec(&r).unwrap_or_default()
            };
            let mut req = hyper::Request::post("/v1/reports")
                .header("Host", &sh.t.host)
                .header("Authorization", &sh.auth)
                .header("Content-Type", "application/json")
                .header(phoenix_e2e::trust::CREDENTIAL_HEADER, &creds[j]);
            if o.gzip {
                req = req.header("Content-Encoding", "gzip");
            }
            let Ok(req) = req.body(Full::new(Bytes::from(body))) else {
                sh.stats.error("could not build a request");
                continue;
            };
            // Sent from a task of its own: the next instance's moment does not wait for
            // this ack. At most `--per-lane` reports of this lane are in flight, each on its
            // own keep-alive connection (a real fleet has a connection per agent).
            let Ok(permit) = lane_slots.clone().acquire_owned().await else {
                return;
            };
            let (sh, pool, points) = (sh.clone(), pool.clone(), r.metrics.len() as u64);
            tokio::spawn(async move {
                post(&sh, c, &pool, req, k == 0, points).await;
                drop(permit);
            });
        }
        round += 1;
        if o.rounds.is_some_and(|n| round >= n) {
            break;
        }
    }
    // The lane ends when its reports in flight are answered.
    lane_slots.acquire_many(o.per_lane as u32).await.ok();
}

/// Send one report over a free connection of the lane's pool (or a new one), and count how
/// it went.
async fn post(
    sh: &Shared,
    c: usize,
    pool: &std::sync::Mutex<Vec<Sender>>,
    req: hyper::Request<Full<Bytes>>,
    silenced: bool,
    points: u64,
) {
    let free = pool.lock().ok().and_then(|mut p| p.pop());
    // A closed connection (the collector's idle timeout, an error) is opened again.
    let mut s = match free.filter(|s| !s.is_closed()) {
        Some(s) => s,
        None => match connect(&sh.t, c).await {
            Ok(s) => {
                sh.stats.connects.fetch_add(1, Ordering::Relaxed);
                s
            }
            Err(e) => {
                sh.stats.error(format_args!("connect: {e}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
                return;
            }
        },
    };
    if s.ready().await.is_err() {
        sh.stats.error("connection closed");
        return;
    }
    let t0 = Instant::now();
    sh.stats.sent.fetch_add(1, Ordering::Relaxed);
    match s.send_request(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let whole = resp.into_body().collect().await.is_ok();
            match status {
                200 => {
                    sh.stats.ok.fetch_add(1, Ordering::Relaxed);
                    sh.stats.points.fetch_add(points, Ordering::Relaxed);
                    sh.stats
                        .lat_us
                        .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                    if silenced {
                        sh.silenced_last_ok.store(now_ms(), Ordering::Relaxed);
                    }
                }
                503 | 429 => {
                    sh.stats.unavailable.fetch_add(1, Ordering::Relaxed);
                }
                s => sh.stats.error(format_args!("HTTP {s}")),
            }
            if whole {
                if let Ok(mut p) = pool.lock() {
                    p.push(s);
                }
            }
        }
        Err(e) => sh.stats.error(e),
    }
}

fn main() {
    let o = opts();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.threads)
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("fleetsim: no runtime: {e}");
            std::process::exit(1)
        });
    rt.block_on(run(o));
}

async fn run(mut o: Opts) {
    o.connections = o.connections.min(o.instances).max(1);
    let sh = Arc::new(Shared {
        t: Target::of(&o.url),
        auth: format!("Bearer {}", o.token),
        o,
        stats: Stats::default(),
        stop: AtomicBool::new(false),
        start: Instant::now(),
        silenced_last_ok: AtomicU64::new(0),
    });
    let o = &sh.o;
    let stats = &sh.stats;
    let mut lanes = tokio::task::JoinSet::new();
    for c in 0..o.connections {
        lanes.spawn(lane(sh.clone(), c));
    }
    // Figures every 5 s; the time to mark when an instance was silenced.
    let mut prev = (0u64, 0u64, 0u64, Instant::now());
    let mut marked_after_ms: Option<u64> = None;
    let recycler = o.recycler_token.clone();
    let silenced_id = format!("{}-{:06}", o.prefix, 0);
    let mut next_print = Duration::from_secs(5);
    while sh.start.elapsed().as_secs_f64() < o.duration && !(o.rounds.is_some() && lanes.is_empty())
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
        while lanes.try_join_next().is_some() {}
        if let (Some(_), Some(tok), None) = (o.silence_at, &recycler, marked_after_ms) {
            let last = sh.silenced_last_ok.load(Ordering::Relaxed);
            let (url, tok, id) = (o.url.clone(), tok.clone(), silenced_id.clone());
            if last > 0
                && o.silence_at
                    .is_some_and(|s| sh.start.elapsed().as_secs_f64() > s)
                && tokio::task::spawn_blocking(move || is_marked(&url, &tok, &id))
                    .await
                    .unwrap_or(false)
            {
                let ms = now_ms().saturating_sub(last);
                eprintln!(
                    "fleetsim: {silenced_id} marked {:.1}s after its last report",
                    ms as f64 / 1000.0
                );
                marked_after_ms = Some(ms);
            }
        }
        if sh.start.elapsed() >= next_print {
            next_print += Duration::from_secs(5);
            let ok = stats.ok.load(Ordering::Relaxed);
            let sent = stats.sent.load(Ordering::Relaxed);
            let lat = stats.lat_us.load(Ordering::Relaxed);
            let dt = prev.3.elapsed().as_secs_f64();
            let n = ok - prev.0;
            eprintln!(
                "fleetsim: t={:.0}s sent {:.0} reports/s, acked {:.0} reports/s ({:.0} points/s), mean latency {:.1} ms, 503/429 {}, errors {}, late {}",
                sh.start.elapsed().as_secs_f64(),
                (sent - prev.2) as f64 / dt,
                n as f64 / dt,
                n as f64 * o.points as f64 / dt,
                if n > 0 { (lat - prev.1) as f64 / n as f64 / 1000.0 } else { 0.0 },
                stats.unavailable.load(Ordering::Relaxed),
                stats.errors.load(Ordering::Relaxed),
                stats.late.load(Ordering::Relaxed)
            );
            prev = (ok, lat, sent, Instant::now());
        }
    }
    sh.stop.store(true, Ordering::Relaxed);
    let elapsed = sh.start.elapsed().as_secs_f64();
    // Reports in flight get a moment to be answered; lanes asleep end at once.
    let drain = tokio::time::timeout(Duration::from_secs(10), async {
        while lanes.join_next().await.is_some() {}
    });
    if drain.await.is_err() {
        lanes.abort_all();
    }
    let ok = stats.ok.load(Ordering::Relaxed);
    let sent = stats.sent.load(Ordering::Relaxed);
    let out = serde_json::json!({
        "instances": o.instances,
        "interval_s": o.interval,
        "points_per_report": o.points,
        "lanes": o.connections,
        "per_lane": o.per_lane,
        "source_addresses": if sh.t.source(0).is_some() { o.connections.min(253) } else { 1 },
        "wanted_reports_per_s": o.instances as f64 / o.interval,
        "seconds": elapsed,
        "reports_sent": sent,
        "sent_per_s": sent as f64 / elapsed,
        "reports_ok": ok,
        "reports_per_s": ok as f64 / elapsed,
        "points_per_s": stats.points.load(Ordering::Relaxed) as f64 / elapsed,
        "mean_latency_ms": if ok > 0 { stats.lat_us.load(Ordering::Relaxed) as f64 / ok as f64 / 1000.0 } else { 0.0 },
        "unavailable": stats.unavailable.load(Ordering::Relaxed),
        "errors": stats.errors.load(Ordering::Relaxed),
        "late": stats.late.load(Ordering::Relaxed),
        "connects": stats.connects.load(Ordering::Relaxed),
        "silent_to_mark_s": marked_after_ms.map(|m| m as f64 / 1000.0),
    });
    println!("{out}");
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn is_marked(url: &str, token: &str, id: &str) -> bool {
    let Ok(mut r) = ureq::get(&format!("{url}/v1/phoenix"))
        .header("Authorization", &format!("Bearer {token}"))
        .call()
    else {
        return false;
    };
    let Ok(v) = r.body_mut().read_json::<serde_json::Value>() else {
        return false;
    };
    v["marked"]
        .as_array()
        .is_some_and(|m| m.iter().any(|e| e["instance_id"] == id))
}

/// One boot id per fleetsim run: each run starts its seqs at 1, which the collector would
/// otherwise drop as duplicates of an earlier run's.
fn boot_id() -> String {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| format!("sim-{}", now_ms())).clone()
}
