//! The accept loop for plain HTTP and HTTPS alike, with the limits that keep a crowd of
//! idle or slow clients from taking the collector off the air:
//!
//! - a connection cap (`--max-connections`, lowered to fit the open-file limit so the
//!   collector always keeps descriptors for InfluxDB and its own files); past it a new
//!   connection gets a canned 503 with Retry-After and is closed;
//! - a header-read timeout (`--header-timeout`), which in hyper also bounds how long a
//!   kept-alive connection may sit idle before its next request;
//! - a whole-request timeout (`--request-timeout`) covering a body that trickles in;
//! - for TLS, a handshake timeout.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};

/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections being answered "busy" at once; more are dropped without a word.
const MAX_REFUSING: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
        }
    }
}

/// The open-file limit: raises the soft limit to the hard one, returns the soft limit.
fn nofile() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return None;
        }
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                r.rlim_cur = r.rlim_max;
            }
        }
    }
    Some(r.rlim_cur)
}

/// The cap in force: `--max-connections`, but never so close to the open-file limit that
/// the collector could not open a file or reach InfluxDB.
pub fn effective_cap(wanted: usize, nofile: Option<u64>) -> usize {
    let Some(n) = nofile else { return wanted };
    let reserve = 64 + MAX_REFUSING as u64 + n / 8;
    let fit = n.saturating_sub(reserve).max(16);
    wanted.min(usize::try_from(fit).unwrap_or(usize::MAX))
}

/// Counts open connections; a [`Slot`] is one of them.
#[derive(Debug)]
struct Slots {
    open: AtomicUsize,
    max: usize,
}

#[derive(Debug)]
struct Slot(Arc<Slots>);

impl Slots {
    fn take(self: &Arc<Self>) -> Option<Slot> {
        let mut cur = self.open.load(Ordering::Relaxed);
        loop {
            if cur >= self.max {
                return None;
            }
            match self
                .open
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some(Slot(self.clone())),
                Err(now) => cur = now,
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

const BUSY_BODY: &str = "{\"error\":\"collector has --max-connections open; retry shortly\"}";

fn busy_response() -> Vec<u8> {
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{BUSY_BODY}",
        BUSY_BODY.len()
    )
    .into_bytes()
}

/// Answer 503 and close; reads (and drops) what the client sent first, so the close is not a
/// reset that could destroy the answer before the client reads it.
async fn refuse(tcp: tokio::net::TcpStream) {
    let work = async {
        let msg = busy_response();
        let mut sent = 0;
        while sent < msg.len() {
            if tcp.writable().await.is_err() {
                return;
            }
            match tcp.try_write(&msg[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
        // The answer said Connection: close; the client closes after reading it.
        let mut buf = [0u8; 4096];
        let mut left = 256usize << 10;
        while left > 0 {
            if tcp.readable().await.is_err() {
                return;
            }
            match tcp.try_read(&mut buf) {
                Ok(0) => return,
                Ok(n) => left = left.saturating_sub(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(1), work)
        .await
        .ok();
}

/// A TLS acceptor source: the current server config of a [`crate::tls::Reloader`].
pub type Tls = Arc<crate::tls::Reloader>;

/// Serve `app` on `listener` (over TLS when `tls` is given) until `shutdown` resolves, then let
/// open connections finish for up to 10 s.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Option<Tls>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let cap = effective_cap(limits.max_connections, nofile());
    if cap < limits.max_connections {
        tracing::info!(
            max_connections = cap,
            asked = limits.max_connections,
            "connection cap lowered to fit the open-file limit (raise it with ulimit -n / LimitNOFILE)"
        );
    }
    let slots = Arc::new(Slots {
        open: AtomicUsize::new(0),
        max: cap,
    });
    let refusing = Arc::new(Slots {
        open: AtomicUsize::new(0),
        max: MAX_REFUSING,
    });
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut warned_full = None::<std::time::Instant>;
    loop {
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: wait for descriptors to free up rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Some(slot) = slots.take() else {
            if warned_full.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                warned_full = Some(std::time::Instant::now());
                tracing::warn!(max_connections = cap, peer = %addr, "connection cap reached; answering new connections 503");
            }
            if let Some(r) = refusing.take() {
                tokio::spawn(async move {
                    refuse(tcp).await;
                    drop(r);
                });
            }
            continue;
        };
        tcp.set_nodelay(true).ok();
        let app = app.clone();
        let watcher = graceful.watcher();
        let tls = tls
            .as_ref()
            .map(|t| tokio_rustls::TlsAcceptor::from(t.current()));
        tokio::spawn(async move {
            let _slot = slot;
            match tls {
                None => {
                    let svc = service(app, addr, None, limits.request_timeout);
                    let conn = builder(&limits).serve_connection(TokioIo::new(tcp), svc);
                    finish(watcher.watch(conn).await, addr);
                }
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::info!(peer = %addr, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::info!(peer = %addr, "TLS handshake timed out");
                                return;
                            }
                        };
                    let peer = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| crate::tls::PeerCert(Arc::new(c.clone().into_owned())));
                    let svc = service(app, addr, peer, limits.request_timeout);
                    let conn = builder(&limits).serve_connection(TokioIo::new(stream), svc);
                    finish(watcher.watch(conn).await, addr);
                }
            }
        });
    }
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(10)) => tracing::warn!("connections still open after 10 s; closing them"),
    }
}

fn finish(r: Result<(), hyper::Error>, addr: SocketAddr) {
    if let Err(e) = r {
        tracing::debug!(peer = %addr, error = %e, "connection ended with an error");
    }
}

fn builder(limits: &Limits) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    b
}

/// The router for one connection: the peer address (the fleet page is open to loopback) and
/// certificate as request extensions, and a deadline on each request.
fn service(
    app: Router,
    addr: SocketAddr,
    peer: Option<crate::tls::PeerCert>,
    timeout: Duration,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        if let Some(p) = &peer {
            req.extensions_mut().insert(p.clone());
        }
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(addr));
        let mut app = app.clone();
        async move {
            let call = tower_service::Service::call(&mut app, req);
            match tokio::time::timeout(timeout, call).await {
                Ok(r) => r,
                Err(_) => Ok(axum::response::IntoResponse::into_response(
                    crate::reply::ApiError::RequestTimeout(format!(
                        "request not received and answered within {} s (--request-timeout)",
                        timeout.as_secs()
                    )),
                )),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_fits_the_descriptor_limit() {
        assert_eq!(effective_cap(4096, None), 4096);
        assert_eq!(effective_cap(4096, Some(1 << 20)), 4096);
        let c = effective_cap(4096, Some(1024));
        assert!(c < 1024 - 64 && c > 512, "{c}");
        assert_eq!(effective_cap(100, Some(1024)), 100);
        assert!(effective_cap(4096, Some(10)) >= 1);
    }

    #[test]
    fn slots_count_and_free() {
        let s = Arc::new(Slots {
            open: AtomicUsize::new(0),
            max: 2,
        });
        let a = s.take().unwrap();
        let _b = s.take().unwrap();
        assert!(s.take().is_none());
        drop(a);
        assert!(s.take().is_some());
        assert!(String::from_utf8(busy_response())
            .unwrap()
            .contains("Content-Length: 63"));
    }
}
