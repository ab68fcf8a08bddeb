//! The fleet page: `GET /` (instances by group, the phoenix queue) and `GET /instances/{id}`
//! (checks, drift, processes, sockets, kernel events, diagnostics, last log lines), rendered on
//! the server with maud templates. A small script fetches the same page with `?fragment=1`
//! every few seconds and swaps it in, so the page stays current without a reload; without
//! script a `<noscript>` refresh does the same. Reading never needs script; asking an instance
//! for diagnostics (a button) does.
//!
//! Everything an agent sends (instance ids, paths, log lines, check details, process names) is
//! hostile input: maud escapes every value it splices in unless told otherwise, and nothing
//! here tells it otherwise for agent text. The Content-Security-Policy allows only the
//! collector's own stylesheet and script, so even a missed escape could not run code.
//!
//! Access: open to requests from loopback (the operator on the box, or an SSH tunnel); from
//! anywhere else a reader (or recycler) token, as `Authorization: Bearer` (scripts, curl) or
//! once as `?token=` in the address, which sets an HttpOnly, SameSite=Strict cookie and
//! redirects to the address without it. A browser cannot attach an Authorization header to a
//! page it navigates to, so a cookie is the only way a person on a phone can keep reading; it
//! is HttpOnly so no script can read the token back, SameSite=Strict so other sites cannot
//! make the browser use it, and the redirect keeps the token out of history and Referer.
//!
//! The diagnostics button POSTs to `/instances/{id}/diagnostics` under the same access, and
//! only from the page itself: the request must carry the `X-Phoenix-Page` header (another
//! site's page cannot add a header to a cross-origin request without a CORS preflight, which
//! this collector never grants) and the browser's `Sec-Fetch-Site: same-origin` (or, from a
//! browser too old to send it, an `Origin` naming this host). The loopback opening matters
//! here: without these checks any web page the operator opens could make their browser ask.

mod fleet;
mod instance;
mod spark;

use std::fmt::Write as _;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use maud::{html, Markup, DOCTYPE};
use serde::Deserialize;

use crate::app::{AppState, Shared};
use crate::auth::Role;
use crate::fleet::clock::{ago, utc};

/// How often the page fetches itself again; a large fleet's page (about 1 KB a row) less
/// often, so a phone left open does not pull megabytes a minute.
pub const REFRESH_MS: u32 = 3000;
pub const REFRESH_LARGE_MS: u32 = 10_000;
const LARGE_FLEET: usize = 300;
const COOKIE: &str = "phoenix_reader";
const COOKIE_MAX_AGE_S: u32 = 12 * 3600;
const READ_ROLES: [Role; 2] = [Role::Reader, Role::Recycler];
/// The header the page's own script sends with the diagnostics request.
pub const PAGE_HEADER: &str = "x-phoenix-page";
const CSS: &str = include_str!("page.css");
const JS: &str = include_str!("page.js");
const CSP: &str = "default-src 'none'; style-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// What the page links to beyond the collector.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// `--grafana-url` (checked, no trailing slash): each instance links to the shipped
    /// dashboard with `var-instance` set.
    pub grafana_url: Option<String>,
}

/// The shipped dashboard's uid (image-snippets/grafana/dashboards/phoenix-fleet.json).
const GRAFANA_DASHBOARD: &str = "phoenix-fleet";

impl Settings {
    /// The Grafana dashboard of one instance, if `--grafana-url` is set.
    pub fn grafana_link(&self, instance_id: &str) -> Option<String> {
        self.grafana_url.as_ref().map(|g| {
            format!(
                "{g}/d/{GRAFANA_DASHBOARD}/phoenix-fleet?var-instance={}",
                pct(instance_id)
            )
        })
    }
}

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/", get(fleet_page))
        .route("/instances/{id}", get(instance_page))
        .route("/instances/{id}/diagnostics", post(request_diagnostics))
        .route(
            "/static/page.css",
            get(|| async { asset(CSS, "text/css; charset=utf-8") }),
        )
        .route(
            "/static/page.js",
            get(|| async { asset(JS, "text/javascript; charset=utf-8") }),
        )
}

/// Percent-encode all but unreserved characters (a path segment or a cookie value).
pub fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            write!(out, "%{b:02X}").ok();
        }
    }
    out
}

fn unpct(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn asset(body: &'static str, kind: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    // The URL carries the version, so a cached copy is never stale across upgrades.
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn accepts_gzip(h: &HeaderMap) -> bool {
    h.get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| {
            let mut parts = e.split(';').map(str::trim);
            parts.next() == Some("gzip") && !parts.any(|q| q.replace(' ', "") == "q=0")
        })
}

/// An HTML answer, gzipped when the client takes it: rows of a large fleet compress about
/// tenfold, and the page fetches itself every few seconds.
fn html_gz(status: StatusCode, body: String, gzip: bool) -> Response {
    if !gzip || body.len() < 1024 {
        return html_response(status, body);
    }
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 6),
        flate2::Compression::fast(),
    );
    let packed = e.write_all(body.as_bytes()).and_then(|_| e.finish());
    let Ok(packed) = packed else {
        return html_response(status, body);
    };
    let mut r = html_response(status, packed);
    r.headers_mut()
        .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    r.headers_mut()
        .insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    r
}

fn html_response(status: StatusCode, body: impl Into<axum::body::Body>) -> Response {
    let mut r = (status, body.into()).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The whole document around a fragment: the header with its links, and the live region
/// the script refreshes from `src`.
fn shell(s: &AppState, title: &str, src: &str, every_ms: u32, inner: Markup) -> String {
    let v = env!("CARGO_PKG_VERSION");
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) }
                link rel="stylesheet" href={ "/static/page.css?v=" (v) };
                script src={ "/static/page.js?v=" (v) } defer {}
                noscript { meta http-equiv="refresh" content="10"; }
            }
            body {
                header {
                    h1 { a href="/" { "Phoenix fleet" } }
                    nav {
                        a href="/v1/phoenix/preview" id="preview-link" title="What a policy would mark, before it is applied (docs/policy.md)" { "Policy preview" }
                        @if let Some(g) = &s.page.grafana_url {
                            a href={ (g) "/d/" (GRAFANA_DASHBOARD) "/phoenix-fleet" } id="grafana-link" rel="noopener noreferrer" { "Grafana" }
                        }
                        span #status .status role="status" { "live" }
                    }
                }
                main #live data-src=(src) data-every=(every_ms) { (inner) }
            }
        }
    }
    .into_string()
}

fn error_page(s: &AppState, status: StatusCode, text: &str) -> Response {
    let inner = html! { h2 { (status.as_u16()) } p { (text) } };
    html_response(status, shell(s, "Phoenix fleet", "/", REFRESH_MS, inner))
}

#[derive(Deserialize, Default)]
struct PageQuery {
    token: Option<String>,
    fragment: Option<String>,
}

fn from_loopback(req: &Request) -> bool {
    // Without ConnectInfo (a server that does not record the peer) the request is not
    // known to be local, so it needs a token.
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .is_some_and(|c| c.0.ip().to_canonical().is_loopback())
}

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    for v in headers.get_all(header::COOKIE) {
        let Ok(v) = v.to_str() else { continue };
        for part in v.split(';') {
            if let Some((k, val)) = part.trim().split_once('=') {
                if k == COOKIE {
                    return unpct(val);
                }
            }
        }
    }
    None
}

/// Who reads: the token's name (from Authorization or the cookie), or `loopback` for a
/// local request without one; else the refusal to answer with.
#[allow(clippy::result_large_err)] // an axum Response, answered at once, never stored
fn reader(s: &AppState, req: &Request) -> Result<String, Response> {
    let presented = match req.headers().get(header::AUTHORIZATION) {
        Some(a) => crate::auth::bearer(a.to_str().ok()).map(str::to_owned),
        None => cookie_token(req.headers()),
    };
    if from_loopback(req) {
        // Open on loopback: a token only names who asked (a stale cookie locks no one out).
        let named = presented
            .as_deref()
            .and_then(|t| s.tokens.check(Some(t), &READ_ROLES));
        return Ok(named.map_or_else(|| "loopback".into(), |c| c.token_name));
    }
    let mut h = HeaderMap::new();
    if let Some(v) = presented.and_then(|t| HeaderValue::from_str(&format!("Bearer {t}")).ok()) {
        h.insert(header::AUTHORIZATION, v);
    }
    match crate::app::authorize(s, &h, &READ_ROLES) {
        Ok(c) => Ok(c.token_name),
        Err(denied) => {
            let denied = axum::response::IntoResponse::into_response(denied);
            let status = denied.status();
            let text = match status {
                StatusCode::UNAUTHORIZED => "This page needs a reader token when opened from another machine: open it once as /?token=READER_TOKEN (the collector keeps it in a cookie for 12 hours), or send Authorization: Bearer READER_TOKEN.",
                StatusCode::FORBIDDEN => "This token's role may not read the fleet page; use a reader or recycler token.",
                StatusCode::TOO_MANY_REQUESTS => "Too many requests with this token (--rate-limit); wait a moment.",
                _ => "Access denied.",
            };
            let mut r = error_page(s, status, text);
            for k in [header::RETRY_AFTER, header::WWW_AUTHENTICATE] {
                if let Some(v) = denied.headers().get(&k) {
                    r.headers_mut().insert(k, v.clone());
                }
            }
            Err(r)
        }
    }
}

/// None: serve the page; Some(r): answer with `r` instead (a redirect, or a refusal).
fn access(s: &AppState, req: &Request, path: &str, q: &PageQuery) -> Option<Response> {
    if let Some(t) = &q.token {
        if s.tokens.check(Some(t.trim()), &READ_ROLES).is_none() {
            return Some(error_page(
                s,
                StatusCode::UNAUTHORIZED,
                "That token is not a reader or recycler token of this collector.",
            ));
        }
        let secure = if s.obs.tls { "; Secure" } else { "" };
        let cookie = format!(
            "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={COOKIE_MAX_AGE_S}{secure}",
            pct(t.trim())
        );
        let mut r = StatusCode::SEE_OTHER.into_response();
        let h = r.headers_mut();
        h.insert(
            header::LOCATION,
            HeaderValue::from_str(path).unwrap_or(HeaderValue::from_static("/")),
        );
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            h.insert(header::SET_COOKIE, v);
        }
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        return Some(r);
    }
    reader(s, req).err()
}

fn query(req: &Request) -> PageQuery {
    axum::extract::Query::<PageQuery>::try_from_uri(req.uri())
        .map(|q| q.0)
        .unwrap_or_default()
}

async fn fleet_page(State(s): State<Shared>, req: Request) -> Response {
    let q = query(&req);
    if let Some(r) = access(&s, &req, "/", &q) {
        return r;
    }
    let gz = accepts_gzip(req.headers());
    let view = s.fleet.view();
    let inner = fleet::fragment(&s, &view, s.fleet.clock().wall_ms());
    if q.fragment.is_some() {
        return html_gz(StatusCode::OK, inner.into_string(), gz);
    }
    let every = if view.instances.len() > LARGE_FLEET {
        REFRESH_LARGE_MS
    } else {
        REFRESH_MS
    };
    html_gz(
        StatusCode::OK,
        shell(&s, "Phoenix fleet", "/?fragment=1", every, inner),
        gz,
    )
}

async fn instance_page(State(s): State<Shared>, Path(id): Path<String>, req: Request) -> Response {
    let q = query(&req);
    let path = format!("/instances/{}", pct(&id));
    if let Some(r) = access(&s, &req, &path, &q) {
        return r;
    }
    let view = s.fleet.view();
    let Some(v) = view.instance(&id) else {
        let text = format!("No instance {id:?} has reported to this collector (or it was forgotten after going away).");
        if q.fragment.is_some() {
            return html_response(StatusCode::NOT_FOUND, html! { p { (text) } }.into_string());
        }
        return error_page(&s, StatusCode::NOT_FOUND, &text);
    };
    let logs = s.obs.logs.lines(&id);
    let shown = (view.shown(v), view.silent_ms(v));
    let inner = instance::fragment(&s.page, shown, v, &logs, s.fleet.clock().wall_ms());
    let gz = accepts_gzip(req.headers());
    if q.fragment.is_some() {
        return html_gz(StatusCode::OK, inner.into_string(), gz);
    }
    html_gz(
        StatusCode::OK,
        shell(
            &s,
            &format!("{id} · Phoenix"),
            &format!("{path}?fragment=1"),
            REFRESH_MS,
            inner,
        ),
        gz,
    )
}

/// Whether a request comes from a page of this collector, as the browser tells it.
fn same_origin(h: &HeaderMap) -> bool {
    if let Some(site) = h.get("sec-fetch-site") {
        return site.as_bytes() == b"same-origin";
    }
    let (Some(origin), Some(host)) = (h.get(header::ORIGIN), h.get(header::HOST)) else {
        return false;
    };
    let origin = origin.to_str().unwrap_or("");
    let bare = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .unwrap_or("");
    !bare.is_empty() && host.as_bytes() == bare.as_bytes()
}

/// `POST /instances/{id}/diagnostics`: the page's button. Asks for the full, fixed probe set
/// (the same as `POST /v1/instances/{id}/diagnostics` with `{"probes":"full"}`); the body is
/// not read.
async fn request_diagnostics(
    State(s): State<Shared>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, Response> {
    use crate::reply::ApiError;
    if req.headers().get(PAGE_HEADER).is_none() || !same_origin(req.headers()) {
        tracing::warn!(instance_id = %id, status = 403, "refused a diagnostics request from outside the page");
        return Err(ApiError::Forbidden(
            "only the fleet page's own button may ask here; scripts use POST /v1/instances/{id}/diagnostics with a reader token".into(),
        )
        .into_response());
    }
    let by = reader(&s, &req)?;
    let probes = phoenix_wire::diag::ProbeSet::Full;
    use crate::fleet::diag::DiagError;
    match s.fleet.request_diagnostics(&id, probes, &by) {
        Ok(p) => {
            crate::audit::record(
                &s.writer,
                "diagnostics",
                &by,
                &id,
                &format!(
                    "asked for probe set {} from the fleet page (request {})",
                    probes.as_str(),
                    p.id
                ),
            );
            Ok((
                StatusCode::ACCEPTED,
                axum::Json(serde_json::json!({ "instance_id": id, "request_id": p.id, "probes": probes, "state": "pending" })),
            )
                .into_response())
        }
        Err(e @ DiagError::Unknown(_)) => Err(ApiError::NotFound(e.to_string()).into_response()),
        Err(e) => Err(ApiError::Conflict(e.to_string()).into_response()),
    }
}

/// "12 s ago" for a Unix ms time, with the exact UTC time as a tooltip.
fn when(now: i64, t_ms: i64) -> Markup {
    if t_ms <= 0 {
        return html! { "never" };
    }
    let iso = utc(t_ms);
    html! { time datetime=(iso) title=(iso) { (ago(now, t_ms)) } }
}

fn pct_cell(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.0}%")).unwrap_or_else(|| "–".into())
}

fn badge(state: &str) -> Markup {
    html! { span class={ "st st-" (state) } { (state) } }
}

/// 1.2 GiB, 340 MiB, 12 KiB.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v < 10.0 {
        format!("{v:.1} {}", UNITS[u])
    } else {
        format!("{v:.0} {}", UNITS[u])
    }
}

fn short(h: &str) -> &str {
    h.get(..16).unwrap_or(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn escaping_and_encoding() {
        assert_eq!(
            html! { p title=("\"><img src=x onerror=alert(1)>") { ("<b>&</b>") } }.into_string(),
            "<p title=\"&quot;&gt;&lt;img src=x onerror=alert(1)&gt;\">&lt;b&gt;&amp;&lt;/b&gt;</p>"
        );
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(300 << 20), "300 MiB");
        let g = Settings {
            grafana_url: Some("https://grafana.example".into()),
        };
        assert_eq!(
            g.grafana_link("i-1/x").unwrap(),
            "https://grafana.example/d/phoenix-fleet/phoenix-fleet?var-instance=i-1%2Fx"
        );
        assert_eq!(Settings::default().grafana_link("i-1"), None);
        assert_eq!(pct("i-1/../<x> é"), "i-1%2F..%2F%3Cx%3E%20%C3%A9");
        assert_eq!(
            unpct(&pct("to;ken=\"x\" é")).as_deref(),
            Some("to;ken=\"x\" é")
        );
        assert_eq!(unpct("%zz"), None);
    }

    fn state(dir: &std::path::Path) -> Shared {
        let mut tokens = crate::auth::Tokens::default();
        tokens.add(Role::Reader, "reader-1");
        tokens.add(Role::Agent, "agent-1");
        let sink =
            Arc::new(crate::sink::file::FileSink::new(dir.join("influx"), "phoenix").unwrap());
        Arc::new(AppState {
            identity: Arc::new(crate::identity::Gate::shared_for_tests()),
            schema: Default::default(),
            tokens,
            baselines: crate::baselines::Baselines::open(&dir.join("baselines")).unwrap(),
            writer: crate::writer::start(sink, crate::writer::Settings::default()),
            fleet: Arc::new(crate::fleet::Fleet::in_memory(Default::default())),
            limits: phoenix_wire::Limits::default(),
            max_body: 1 << 20,
            store: "test".into(),
            security: crate::security::Security::default(),
            obs: Arc::new(crate::selfmetrics::Obs::default()),
            page: Settings {
                grafana_url: Some("https://grafana.example".into()),
            },
        })
    }

    async fn call(
        app: &Router,
        uri: &str,
        peer: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, String) {
        call_with("GET", app, uri, peer, headers).await
    }

    async fn call_with(
        method: &str,
        app: &Router,
        uri: &str,
        peer: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, String) {
        let mut b = axum::http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let mut req = b.body(axum::body::Body::empty()).unwrap();
        req.extensions_mut()
            .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
        let r = tower_service::Service::call(&mut app.clone(), req)
            .await
            .unwrap();
        let (parts, body) = r.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 24).await.unwrap();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    #[tokio::test]
    async fn loopback_is_open_elsewhere_a_reader_token_is_needed() {
        let tmp = tempfile::tempdir().unwrap();
        let s = state(tmp.path());
        for k in 0..5 {
            let agent = phoenix_wire::Identity {
                instance_id: format!("i-{k}"),
                image_id: "img".into(),
                hostname: "h".into(),
                boot_id: "b".into(),
                ..Default::default()
            };
            s.fleet.admit(
                &phoenix_wire::Report {
                    seq: 1,
                    interval_ms: 1000,
                    ..phoenix_wire::Report::new(agent)
                },
                None,
                None,
            );
        }
        s.fleet.publish();
        let app = crate::api::router(s);
        let (st, h, body) = call(&app, "/", "127.0.0.1:5000", &[]).await;
        assert_eq!(st, StatusCode::OK);
        assert!(body.contains("id=\"live\""), "{body}");
        assert!(h[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("script-src 'self'"));
        assert_eq!(call(&app, "/", "[::1]:5000", &[]).await.0, StatusCode::OK);
        assert_eq!(
            call(&app, "/", "[::ffff:127.0.0.1]:5000", &[]).await.0,
            StatusCode::OK
        );

        let far = "10.1.2.3:40000";
        let (st, _, body) = call(&app, "/", far, &[]).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        assert!(body.contains("?token="), "{body}");
        assert_eq!(
            call(&app, "/instances/x", far, &[]).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            call(&app, "/", far, &[("authorization", "Bearer agent-1")])
                .await
                .0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            call(&app, "/", far, &[("authorization", "Bearer nope")])
                .await
                .0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            call(&app, "/", far, &[("authorization", "Bearer reader-1")])
                .await
                .0,
            StatusCode::OK
        );

        // ?token= sets an HttpOnly cookie and redirects to the address without the token.
        let (st, h, _) = call(&app, "/?token=reader-1", far, &[]).await;
        assert_eq!(st, StatusCode::SEE_OTHER);
        assert_eq!(h[header::LOCATION], "/");
        let cookie = h[header::SET_COOKIE].to_str().unwrap().to_owned();
        assert!(
            cookie.starts_with("phoenix_reader=reader-1;")
                && cookie.contains("HttpOnly")
                && cookie.contains("SameSite=Strict"),
            "{cookie}"
        );
        assert!(
            !cookie.contains("Secure"),
            "plain HTTP: a Secure cookie would never come back"
        );
        let (st, _, _) = call(
            &app,
            "/?fragment=1",
            far,
            &[("cookie", "other=1; phoenix_reader=reader-1")],
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(
            call(&app, "/", far, &[("cookie", "phoenix_reader=agent-1")])
                .await
                .0,
            StatusCode::FORBIDDEN
        );
        let (st, h, _) = call(&app, "/?token=wrong", far, &[]).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        assert!(h.get(header::SET_COOKIE).is_none());
        // The drill-down keeps its own address across the redirect.
        let (_, h, _) = call(&app, "/instances/a%20b?token=reader-1", far, &[]).await;
        assert_eq!(h[header::LOCATION], "/instances/a%20b");
        // A client that takes gzip gets it; the body inflates to the same page.
        let (_, h, plain) = call(&app, "/?fragment=1", "127.0.0.1:1", &[]).await;
        assert!(h.get(header::CONTENT_ENCODING).is_none());
        let mut req = axum::http::Request::builder()
            .uri("/?fragment=1")
            .header("accept-encoding", "br;q=1, gzip;q=0.8")
            .body(axum::body::Body::empty())
            .unwrap();
        req.extensions_mut()
            .insert(ConnectInfo("127.0.0.1:1".parse::<SocketAddr>().unwrap()));
        let r = tower_service::Service::call(&mut app.clone(), req)
            .await
            .unwrap();
        assert!(
            plain.len() >= 1024,
            "five rows make a page worth compressing"
        );
        assert_eq!(r.headers()[header::CONTENT_ENCODING], "gzip");
        let packed = axum::body::to_bytes(r.into_body(), 1 << 24).await.unwrap();
        assert!(
            packed.len() < plain.len() / 2,
            "{} of {}",
            packed.len(),
            plain.len()
        );
        let mut back = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&packed[..]), &mut back)
            .unwrap();
        // Rendered anew, so compare what does not move with the clock.
        assert!(
            back.starts_with("<ul class=\"chips\"")
                && (0..5).all(|k| back.contains(&format!("data-instance=\"i-{k}\""))),
            "{back}"
        );
        assert!(!accepts_gzip(
            &[(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("gzip;q=0, br")
            )]
            .into_iter()
            .collect()
        ));
        assert!(accepts_gzip(
            &[(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("deflate, gzip")
            )]
            .into_iter()
            .collect()
        ));
        // Assets and /metrics are open: they carry no fleet data.
        assert_eq!(
            call(&app, "/static/page.js", far, &[]).await.0,
            StatusCode::OK
        );
        assert_eq!(call(&app, "/metrics", far, &[]).await.0, StatusCode::OK);
    }

    fn point(
        m: &str,
        tags: &[(&str, &str)],
        fields: Vec<(&str, phoenix_wire::Value)>,
    ) -> phoenix_wire::Point {
        phoenix_wire::Point {
            m: m.into(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            fields: fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            ts: 1,
        }
    }

    #[tokio::test]
    async fn hostile_agent_text_is_escaped_everywhere() {
        use phoenix_wire::Value;
        let tmp = tempfile::tempdir().unwrap();
        let s = state(tmp.path());
        let evil = "<script>alert(1)</script>\"'&";
        let identity = phoenix_wire::Identity {
            instance_id: evil.into(),
            image_id: format!("img{evil}"),
            group: Some(format!("g{evil}")),
            hostname: evil.into(),
            boot_id: "b".into(),
            version: evil.into(),
            boot_time: 0,
        };
        let log = |src: &str, msg: String| phoenix_wire::LogLine {
            src: src.into(),
            ts: 1,
            offset: 0,
            msg,
            escaped: false,
            part: None,
            tags: [("level".to_string(), evil.to_string())].into(),
            fields: Default::default(),
        };
        let r = phoenix_wire::Report {
            v: phoenix_wire::VERSION,
            agent: identity.clone(),
            seq: 1,
            interval_ms: 1000,
            metrics: vec![
                point(
                    "cpu",
                    &[("cpu", "cpu-total")],
                    vec![("usage_idle", Value::Float(75.0))],
                ),
                point("mem", &[], vec![("used_percent", Value::Float(40.0))]),
                point(
                    "procstat",
                    &[("process_name", evil), ("user", evil)],
                    vec![
                        ("pid", Value::Int(42)),
                        ("cpu_usage", Value::Float(12.5)),
                        ("memory_rss", Value::Int(3 << 20)),
                    ],
                ),
                point("phoenix_listen_set", &[], vec![("count", Value::Int(1))]),
                point(
                    "phoenix_listen",
                    &[
                        ("proto", "tcp"),
                        ("address", evil),
                        ("port", "8080"),
                        ("process_name", evil),
                    ],
                    vec![("pid", Value::Int(42))],
                ),
                point("phoenix_kernel", &[], vec![("oom_kills", Value::Int(1))]),
                point(
                    "phoenix_ssh",
                    &[],
                    vec![
                        ("found", Value::Bool(true)),
                        ("evidence", Value::Str(evil.into())),
                    ],
                ),
            ],
            logs: vec![
                log(evil, format!("GET /{evil}")),
                log(
                    "kernel",
                    format!("Out of memory: Killed process 4242 ({evil})"),
                ),
            ],
            drift: None,
            checks: vec![phoenix_wire::CheckResult {
                name: evil.into(),
                ok: false,
                detail: evil.into(),
                duration_ms: 1,
            }],
            drift_root: None,
            protected: None,
        };
        let drift = crate::fleet::DriftInfo {
            hash: "h".into(),
            drifted: true,
            changes: vec![phoenix_wire::FileChange {
                path: format!("/etc/{evil}"),
                change: "added".into(),
                attrs: vec![evil.into()],
                values: vec![phoenix_wire::AttrValue {
                    attr: evil.into(),
                    old: evil.into(),
                    new: evil.into(),
                }],
            }],
            note: Some(evil.into()),
            ..Default::default()
        };
        s.fleet.admit(&r, Some(drift), None);
        s.obs.logs.record(evil, &r.logs);
        // A diagnostics snapshot whose every string is hostile too.
        let p = s
            .fleet
            .request_diagnostics(evil, phoenix_wire::diag::ProbeSet::Full, evil)
            .unwrap();
        let proc_ = phoenix_wire::diag::Process {
            pid: 7,
            user: evil.into(),
            name: evil.into(),
            state: "R".into(),
            cmdline: format!("/bin/{evil} --x"),
            ..Default::default()
        };
        let snap = phoenix_wire::diag::Snapshot {
            processes: Some(vec![proc_]),
            failed_units: Some(vec![evil.into()]),
            notes: vec![evil.into()],
            kernel: Some(vec![phoenix_wire::diag::KernelLine {
                priority: 3,
                usec: 1,
                message: evil.into(),
            }]),
            ..Default::default()
        };
        s.fleet
            .answer_diagnostics(
                phoenix_wire::diag::Answer {
                    v: phoenix_wire::VERSION,
                    agent: identity,
                    request_id: p.id,
                    snapshot: snap,
                },
                100,
            )
            .unwrap();
        s.fleet.pass();
        let app = crate::api::router(s);
        let (st, _, fleet) = call(&app, "/", "127.0.0.1:1", &[]).await;
        assert_eq!(st, StatusCode::OK);
        let (st, _, inst) = call(
            &app,
            &format!("/instances/{}", pct(evil)),
            "127.0.0.1:1",
            &[],
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{inst}");
        let escaped = "&lt;script&gt;alert(1)&lt;/script&gt;&quot;'&amp;";
        for page in [&fleet, &inst] {
            assert!(!page.contains("<script>alert"), "{page}");
            assert!(!page.contains("\"'&<"));
            assert!(page.contains(escaped), "{page}");
            // The only script tag is the page's own.
            assert_eq!(page.matches("<script").count(), 1);
        }
        // Every place agent text lands on the instance page, escaped.
        for (what, at) in [
            ("the log line", format!("GET /{escaped}")),
            ("the changed file", format!("/etc/{escaped}")),
            ("the process name", format!("<code>{escaped}</code></td>")),
            (
                "the check detail",
                format!("<td data-label=\"Detail\">{escaped}</td>"),
            ),
            (
                "the kernel line",
                format!("Killed process 4242 ({escaped})"),
            ),
            ("the command line", format!("/bin/{escaped} --x")),
            ("the SSH evidence", format!("SSH is on: </b>{escaped}")),
        ] {
            assert!(inst.contains(&at), "{what} is shown, escaped: {inst}");
        }
        assert!(inst.contains("<b>1</b> OOM kills"), "{inst}");
        assert!(fleet.contains(&format!("/instances/{}", pct(evil))));
        assert!(
            fleet.contains(&format!(
                "https://grafana.example/d/phoenix-fleet/phoenix-fleet?var-instance={}",
                pct(evil)
            )),
            "the Grafana link: {fleet}"
        );
        assert!(
            fleet.contains("failing: &lt;script&gt;"),
            "the checks column: {fleet}"
        );
        assert!(
            fleet.contains("drifted</span> <small>(1 change)</small>"),
            "{fleet}"
        );
        assert!(fleet.contains("<svg class=\"spark\""), "the trend: {fleet}");
    }

    /// A POST through the router: [`call_with`] with status and body only.
    async fn post(
        app: &Router,
        uri: &str,
        peer: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, String) {
        let (st, _, body) = call_with("POST", app, uri, peer, headers).await;
        (st, body)
    }

    #[tokio::test]
    async fn the_diagnostics_button_asks_only_from_the_page_itself() {
        let tmp = tempfile::tempdir().unwrap();
        let s = state(tmp.path());
        let r = phoenix_wire::Report {
            v: phoenix_wire::VERSION,
            agent: phoenix_wire::Identity {
                instance_id: "i-1".into(),
                image_id: "img".into(),
                hostname: "h".into(),
                boot_id: "b".into(),
                ..Default::default()
            },
            seq: 1,
            interval_ms: 1000,
            metrics: vec![],
            logs: vec![],
            drift: None,
            checks: vec![],
            drift_root: None,
            protected: None,
        };
        s.fleet.admit(&r, None, None);
        s.fleet.publish();
        let fleet = s.fleet.clone();
        let app = crate::api::router(s);
        let url = "/instances/i-1/diagnostics";
        let local = "127.0.0.1:9";
        let page = [(PAGE_HEADER, "1"), ("sec-fetch-site", "same-origin")];
        // Another site's page: a plain form post (no header), or a fetch the browser marks
        // cross-site. Both refused, even from loopback where reading is open.
        for h in [
            &[("sec-fetch-site", "same-origin")][..],
            &[(PAGE_HEADER, "1"), ("sec-fetch-site", "cross-site")][..],
            &[
                (PAGE_HEADER, "1"),
                ("origin", "http://evil.example"),
                ("host", "127.0.0.1:7070"),
            ][..],
            &[(PAGE_HEADER, "1")][..],
        ] {
            let (st, body) = post(&app, url, local, h).await;
            assert_eq!(st, StatusCode::FORBIDDEN, "{h:?}: {body}");
            assert!(body.contains("/v1/instances/{id}/diagnostics"), "{body}");
        }
        assert!(fleet
            .view()
            .instance("i-1")
            .unwrap()
            .diagnostics
            .pending
            .is_none());
        // From elsewhere the page's access rules hold: no token, no request.
        let far = "10.0.0.1:9";
        assert_eq!(
            post(&app, url, far, &page).await.0,
            StatusCode::UNAUTHORIZED
        );
        // The page itself, with the reader's cookie: accepted and named after the token.
        let mut with_cookie = page.to_vec();
        with_cookie.push(("cookie", "phoenix_reader=reader-1"));
        let (st, body) = post(&app, url, far, &with_cookie).await;
        assert_eq!(st, StatusCode::ACCEPTED, "{body}");
        let pending = fleet.diagnostics_for_ack(&r.agent).unwrap();
        assert_eq!(pending.probes, phoenix_wire::diag::ProbeSet::Full);
        fleet.publish();
        let v = fleet.view();
        let p = v
            .instance("i-1")
            .unwrap()
            .diagnostics
            .pending
            .clone()
            .unwrap();
        assert!(p.requested_by.starts_with("reader"), "{p:?}");
        // One at a time; an older browser's Origin check passes the same way.
        let (st, body) = post(
            &app,
            url,
            local,
            &[
                (PAGE_HEADER, "1"),
                ("origin", "http://127.0.0.1:7070"),
                ("host", "127.0.0.1:7070"),
            ],
        )
        .await;
        assert_eq!(st, StatusCode::CONFLICT, "{body}");
        assert_eq!(
            post(&app, "/instances/nobody/diagnostics", local, &page)
                .await
                .0,
            StatusCode::NOT_FOUND
        );
        // The instance page shows the request waiting, and the button off meanwhile.
        let (_, _, inst) = call(&app, "/instances/i-1", local, &[]).await;
        assert!(inst.contains("waiting for its answer"), "{inst}");
        assert!(inst.contains("id=\"diag-request\""), "{inst}");
        assert!(inst.contains("disabled"), "{inst}");
    }
}
