//! The fleet page: `GET /` (instances by group, the phoenix queue) and `GET /instances/{id}`
//! (drift, checks, last log lines), rendered on the server as plain HTML. A small script
//! fetches the same page with `?fragment=1` every few seconds and swaps it in, so the page
//! stays current without a reload; without script a `<noscript>` refresh does the same.
//!
//! Everything an agent sends (instance ids, paths, log lines, check details) is hostile input:
//! every dynamic string goes through [`Esc`], and the Content-Security-Policy allows only the
//! collector's own stylesheet and script, so even a missed escape could not run code.
//!
//! Access: open to requests from loopback (the operator on the box, or an SSH tunnel); from
//! anywhere else a reader (or recycler) token, as `Authorization: Bearer` (scripts, curl) or
//! once as `?token=` in the address, which sets an HttpOnly, SameSite=Strict cookie and
//! redirects to the address without it. A browser cannot attach an Authorization header to a
//! page it navigates to, so a cookie is the only way a person on a phone can keep reading; it
//! is HttpOnly so no script can read the token back, SameSite=Strict so other sites cannot
//! make the browser use it, and the redirect keeps the token out of history and Referer.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;

use crate::app::{AppState, Shared};
use crate::auth::Role;
use crate::fleet::clock::{ago, utc};
use crate::fleet::view::{FleetView, InstanceView, QueueView};

/// How often the page fetches itself again; a large fleet's page (about 0.5 KB a row) less
/// often, so a phone left open does not pull megabytes a minute.
pub const REFRESH_MS: u32 = 3000;
pub const REFRESH_LARGE_MS: u32 = 10_000;
const LARGE_FLEET: usize = 300;
const COOKIE: &str = "phoenix_reader";
const COOKIE_MAX_AGE_S: u32 = 12 * 3600;
const READ_ROLES: [Role; 2] = [Role::Reader, Role::Recycler];
const CSS: &str = include_str!("page.css");
const JS: &str = include_str!("page.js");
const CSP: &str = "default-src 'none'; style-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/", get(fleet_page))
        .route("/instances/{id}", get(instance_page))
        .route(
            "/static/page.css",
            get(|| async { asset(CSS, "text/css; charset=utf-8") }),
        )
        .route(
            "/static/page.js",
            get(|| async { asset(JS, "text/javascript; charset=utf-8") }),
        )
}

/// HTML-escapes its text when formatted.
#[derive(Debug)]
pub struct Esc<'a>(pub &'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut last = 0;
        for (i, c) in self.0.char_indices() {
            let rep = match c {
                '&' => "&amp;",
                '<' => "&lt;",
                '>' => "&gt;",
                '"' => "&quot;",
                '\'' => "&#39;",
                _ => continue,
            };
            f.write_str(&self.0[last..i])?;
            f.write_str(rep)?;
            last = i + 1;
        }
        f.write_str(&self.0[last..])
    }
}

/// A drift change's attributes, with old → new where the agent sent them (`mode 0644 →
/// 0666`), escaped. Never contents: `content` is a short hash.
fn change_attrs(c: &phoenix_wire::FileChange) -> String {
    if c.values.is_empty() {
        return esc(&c.attrs.join(", ")).to_string();
    }
    let shown: Vec<String> = c
        .values
        .iter()
        .map(|v| {
            format!(
                "<span class=\"attr\">{} <code>{}</code> → <code>{}</code></span>",
                esc(&v.attr),
                esc(&v.old),
                esc(&v.new)
            )
        })
        .collect();
    shown.join(", ")
}

fn esc(s: &str) -> Esc<'_> {
    Esc(s)
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
        return html(status, body);
    }
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 6),
        flate2::Compression::fast(),
    );
    let packed = e.write_all(body.as_bytes()).and_then(|_| e.finish());
    let Ok(packed) = packed else {
        return html(status, body);
    };
    let mut r = html(status, packed);
    r.headers_mut()
        .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    r.headers_mut()
        .insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    r
}

fn html(status: StatusCode, body: impl Into<axum::body::Body>) -> Response {
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

fn shell(title: &str, src: &str, every_ms: u32, inner: &str) -> String {
    let v = env!("CARGO_PKG_VERSION");
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{title}</title><link rel=\"stylesheet\" href=\"/static/page.css?v={v}\">\
<script src=\"/static/page.js?v={v}\" defer></script>\
<noscript><meta http-equiv=\"refresh\" content=\"10\"></noscript></head>\n<body>\
<header><h1><a href=\"/\">Phoenix fleet</a></h1><span id=\"status\" class=\"status\" role=\"status\">live</span></header>\n\
<main id=\"live\" data-src=\"{src}\" data-every=\"{every_ms}\">{inner}</main>\n</body></html>\n",
        title = esc(title),
        src = esc(src),
    )
}

fn error_page(status: StatusCode, text: &str) -> Response {
    let inner = format!("<h2>{}</h2><p>{}</p>", status.as_u16(), esc(text));
    html(status, shell("Phoenix fleet", "/", REFRESH_MS, &inner))
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

/// None: serve the page; Some(r): answer with `r` instead (a redirect, or a refusal).
fn access(s: &AppState, req: &Request, path: &str, q: &PageQuery) -> Option<Response> {
    if let Some(t) = &q.token {
        if s.tokens.check(Some(t.trim()), &READ_ROLES).is_none() {
            return Some(error_page(
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
    if from_loopback(req) {
        return None;
    }
    let mut h = HeaderMap::new();
    if let Some(a) = req.headers().get(header::AUTHORIZATION) {
        h.insert(header::AUTHORIZATION, a.clone());
    } else if let Some(t) = cookie_token(req.headers()) {
        if let Ok(v) = HeaderValue::from_str(&format!("Bearer {t}")) {
            h.insert(header::AUTHORIZATION, v);
        }
    }
    match crate::app::authorize(s, &h, &READ_ROLES) {
        Ok(_) => None,
        Err(denied) => {
            let denied = axum::response::IntoResponse::into_response(denied);
            let status = denied.status();
            let text = match status {
                StatusCode::UNAUTHORIZED => "This page needs a reader token when opened from another machine: open it once as /?token=READER_TOKEN (the collector keeps it in a cookie for 12 hours), or send Authorization: Bearer READER_TOKEN.",
                StatusCode::FORBIDDEN => "This token's role may not read the fleet page; use a reader or recycler token.",
                StatusCode::TOO_MANY_REQUESTS => "Too many requests with this token (--rate-limit); wait a moment.",
                _ => "Access denied.",
            };
            let mut r = error_page(status, text);
            for k in [header::RETRY_AFTER, header::WWW_AUTHENTICATE] {
                if let Some(v) = denied.headers().get(&k) {
                    r.headers_mut().insert(k, v.clone());
                }
            }
            Some(r)
        }
    }
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
    let inner = fleet_fragment(&s, &view, s.fleet.clock().wall_ms());
    if q.fragment.is_some() {
        return html_gz(StatusCode::OK, inner, gz);
    }
    let every = if view.instances.len() > LARGE_FLEET {
        REFRESH_LARGE_MS
    } else {
        REFRESH_MS
    };
    html_gz(
        StatusCode::OK,
        shell("Phoenix fleet", "/?fragment=1", every, &inner),
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
    let Some(inner) = instance_fragment(&s, &view, &id, s.fleet.clock().wall_ms()) else {
        let text = format!("No instance {id:?} has reported to this collector (or it was forgotten after going away).");
        if q.fragment.is_some() {
            return html(StatusCode::NOT_FOUND, format!("<p>{}</p>", esc(&text)));
        }
        return error_page(StatusCode::NOT_FOUND, &text);
    };
    let gz = accepts_gzip(req.headers());
    if q.fragment.is_some() {
        return html_gz(StatusCode::OK, inner, gz);
    }
    html_gz(
        StatusCode::OK,
        shell(
            &format!("{id} · Phoenix"),
            &format!("{path}?fragment=1"),
            REFRESH_MS,
            &inner,
        ),
        gz,
    )
}

/// "12 s ago" for a Unix ms time, with the exact UTC time as a tooltip.
fn when(now: i64, t_ms: i64) -> String {
    if t_ms <= 0 {
        return "never".into();
    }
    format!(
        "<time datetime=\"{iso}\" title=\"{iso}\">{rel}</time>",
        iso = utc(t_ms),
        rel = ago(now, t_ms)
    )
}

fn pct_cell(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.0}%")).unwrap_or_else(|| "–".into())
}

fn badge(state: &str) -> String {
    format!("<span class=\"st st-{s}\">{s}</span>", s = esc(state))
}

fn fleet_fragment(s: &AppState, view: &FleetView, now: i64) -> String {
    let rows: Vec<&InstanceView> = view.instances.iter().map(|r| &**r).collect();
    let phx = &view.queue;
    let mut o = String::with_capacity(4096 + rows.len() * 512);

    // Summary.
    let mut by_state: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &rows {
        *by_state.entry(r.summary.state.as_str()).or_default() += 1;
    }
    write!(
        o,
        "<ul class=\"chips\" id=\"summary\"><li><b>{}</b> instances</li>",
        rows.len()
    )
    .ok();
    for (st, n) in &by_state {
        write!(o, "<li>{n} {}</li>", badge(st)).ok();
    }
    o.push_str("</ul>");
    if let Some(d) = s.writer.unavailable() {
        write!(o, "<p class=\"banner bad\" id=\"store-down\">The store is not taking writes: {}. Agents keep their data and retry; silence does not count meanwhile.</p>", esc(&d.reason)).ok();
    }
    if let Some(fs) = s.fleet.store_status().filter(|f| !f.up) {
        write!(
            o,
            "<p class=\"banner bad\" id=\"fleet-store-down\">{}</p>",
            esc(fs.reason.as_deref().unwrap_or("fleet store unavailable"))
        )
        .ok();
    }
    if !phx.decider {
        o.push_str("<p class=\"banner\">This collector is not the decider: another one makes the marks.</p>");
    }
    if phx.log_only {
        o.push_str("<p class=\"banner\">--log-only: nothing is marked for replacement; would-be marks are listed as held.</p>");
    }
    for a in &phx.alerts {
        write!(
            o,
            "<p class=\"banner bad\">Mass event in group <b>{}</b>: {}</p>",
            esc(&a.group),
            esc(&a.message)
        )
        .ok();
    }

    queue_section(&mut o, phx, now);

    // Instances by group (the list is sorted by id already).
    let mut groups: BTreeMap<&str, Vec<&InstanceView>> = BTreeMap::new();
    for &r in &rows {
        groups.entry(r.group_key.as_str()).or_default().push(r);
    }
    o.push_str("<section id=\"instances\">");
    if groups.is_empty() {
        o.push_str("<h2>Instances</h2><p class=\"muted\">No agent has reported yet.</p>");
    }
    for (group, list) in groups {
        let mut images: Vec<&str> = list.iter().map(|r| r.summary.image_id.as_str()).collect();
        images.sort_unstable();
        images.dedup();
        write!(
            o,
            "<h2 data-group=\"{g}\">{g} <small>{} instance{}, image {}</small></h2>",
            list.len(),
            if list.len() == 1 { "" } else { "s" },
            esc(&images.join(", ")),
            g = esc(group)
        )
        .ok();
        o.push_str("<table><thead><tr><th>Instance</th><th>State</th><th>Reason</th><th>Last seen</th><th class=\"num\">CPU</th><th class=\"num\">Mem</th><th>Agent</th></tr></thead><tbody>");
        for v in list {
            let r = &v.summary;
            let st = r.state.as_str();
            write!(o, "<tr class=\"inst\" data-instance=\"{id}\" data-state=\"{st}\"><td data-label=\"Instance\"><a href=\"/instances/{link}\">{id}</a><small class=\"evidence\">{host}</small></td><td data-label=\"State\">{badge}</td><td data-label=\"Reason\">",
                id = esc(&r.instance_id), link = pct(&r.instance_id), host = esc(&r.hostname), badge = badge(st)).ok();
            match r.reason {
                Some(reason) => {
                    write!(
                        o,
                        "<span class=\"reason\">{}</span><span class=\"evidence\">{}</span>",
                        esc(reason.as_str()),
                        esc(r.evidence.as_deref().unwrap_or(""))
                    )
                    .ok();
                }
                None => o.push_str("<span class=\"muted\">–</span>"),
            }
            if let Some(h) = &r.held {
                write!(o, "<span class=\"held\">held: {}</span>", esc(h)).ok();
            }
            write!(o, "</td><td data-label=\"Last seen\">{}</td><td class=\"num\" data-label=\"CPU\">{}</td><td class=\"num\" data-label=\"Mem\">{}</td><td data-label=\"Agent\">{}</td></tr>",
                when(now, r.last_seen_ms), pct_cell(r.cpu_used_percent), pct_cell(r.mem_used_percent), esc(&r.agent_version)).ok();
        }
        o.push_str("</tbody></table>");
    }
    o.push_str("</section>");
    o
}

fn queue_section(o: &mut String, phx: &QueueView, now: i64) {
    let b = &phx.budget;
    write!(
        o,
        "<section id=\"queue\"><h2>Phoenix queue <small>budget {} of a group, {} of {} marks in the last minute{} (<a href=\"/v1/phoenix/preview\" id=\"preview\">preview a policy</a>, docs/policy.md)</small></h2>",
        esc(&b.spec),
        b.marks_last_minute,
        b.rate_per_min,
        if b.windows.is_empty() { String::new() } else { format!("; voluntary marks in {}", esc(&b.windows.join("; "))) },
    ).ok();
    if !b.groups.is_empty() {
        o.push_str("<table class=\"budget\"><thead><tr><th>Group</th><th class=\"num\">Size</th><th class=\"num\">Bad</th><th class=\"num\">Budget in use</th><th class=\"num\">Free</th></tr></thead><tbody>");
        for g in &b.groups {
            write!(
                o,
                "<tr><td data-label=\"Group\">{}</td><td class=\"num\" data-label=\"Size\">{}</td><td class=\"num\" data-label=\"Bad\">{}</td><td class=\"num\" data-label=\"In use\">{} of {}{}</td><td class=\"num\" data-label=\"Free\">{}</td></tr>",
                esc(&g.group),
                g.size,
                g.bad,
                g.marked.saturating_add(g.acked).saturating_add(g.not_ready),
                g.allowed,
                match (g.acked, g.not_ready) {
                    (0, 0) => String::new(),
                    (a, 0) => format!(" ({a} acked)"),
                    (0, n) => format!(" ({n} not ready)"),
                    (a, n) => format!(" ({a} acked, {n} not ready)"),
                },
                g.free
            ).ok();
        }
        o.push_str("</tbody></table>");
    }
    o.push_str("<h3>Marked for replacement</h3>");
    if phx.marked.is_empty() {
        o.push_str("<p class=\"muted\" id=\"no-marks\">No instance is marked.</p>");
    } else {
        o.push_str("<table id=\"marked\"><thead><tr><th>Instance</th><th>Group</th><th>Reason</th><th>Since</th><th>Recycler</th></tr></thead><tbody>");
        for m in &phx.marked {
            let acked = m
                .acked_ms
                .flatten()
                .map(|t| format!("acked {}", when(now, t)))
                .unwrap_or_else(|| "waiting".into());
            write!(
                o,
                "<tr data-instance=\"{idq}\"><td data-label=\"Instance\"><a href=\"/instances/{link}\">{idq}</a></td><td data-label=\"Group\">{}</td><td data-label=\"Reason\"><span class=\"reason\">{}</span><span class=\"evidence\">{}</span></td><td data-label=\"Since\">{}</td><td data-label=\"Recycler\">{}</td></tr>",
                esc(&m.group),
                esc(m.reason.as_str()),
                esc(&m.evidence),
                when(now, m.since_ms.unwrap_or(0)),
                acked,
                idq = esc(&m.instance_id),
                link = pct(&m.instance_id),
            ).ok();
        }
        o.push_str("</tbody></table>");
    }
    if !phx.held.is_empty() {
        o.push_str("<h3>Held marks</h3><table id=\"held\"><thead><tr><th>Instance</th><th>Group</th><th>Reason</th><th>Held because</th></tr></thead><tbody>");
        for m in &phx.held {
            write!(
                o,
                "<tr data-instance=\"{idq}\"><td data-label=\"Instance\"><a href=\"/instances/{link}\">{idq}</a></td><td data-label=\"Group\">{}</td><td data-label=\"Reason\"><span class=\"reason\">{}</span><span class=\"evidence\">{}</span></td><td data-label=\"Held\">{}</td></tr>",
                esc(&m.group),
                esc(m.reason.as_str()),
                esc(&m.evidence),
                esc(m.hold.as_deref().unwrap_or("")),
                idq = esc(&m.instance_id),
                link = pct(&m.instance_id),
            ).ok();
        }
        o.push_str("</tbody></table>");
    }
    o.push_str("</section>");
}

fn instance_fragment(s: &AppState, view: &FleetView, id: &str, now: i64) -> Option<String> {
    let v = view.instance(id)?;
    let i = &v.summary;
    let logs = s.obs.logs.lines(id);
    let mut o = String::with_capacity(8192);
    write!(o, "<p><a href=\"/\">&larr; fleet</a></p><h2 id=\"instance\" data-instance=\"{id}\">{id} {}</h2>", badge(i.state.as_str()), id = esc(id)).ok();
    o.push_str("<dl class=\"facts\">");
    let mut fact = |k: &str, v: String| {
        write!(o, "<dt>{k}</dt><dd>{v}</dd>").ok();
    };
    fact("Image", format!("<code>{}</code>", esc(&i.image_id)));
    fact("Group", esc(&v.group_key).to_string());
    fact("Host", esc(&i.hostname).to_string());
    fact("Agent", esc(&i.agent_version).to_string());
    fact("Boot", format!("<code>{}</code>", esc(&i.boot_id)));
    fact("First seen", when(now, i.first_seen_ms));
    fact("Last seen", when(now, i.last_seen_ms));
    fact(
        "Reports",
        format!("{} every {} s", i.reports, i.interval_ms / 1000),
    );
    fact(
        "CPU / memory / fullest disk",
        format!(
            "{} / {} / {}",
            pct_cell(i.cpu_used_percent),
            pct_cell(i.mem_used_percent),
            pct_cell(i.disk_max_used_percent)
        ),
    );
    match (&i.mark, i.reason) {
        (Some(m), _) => {
            let acked = match (m.acked_ms, &m.acked_by) {
                (Some(t), by) => format!(
                    "; acked {} by {}",
                    when(now, t),
                    esc(by.as_deref().unwrap_or("?"))
                ),
                (None, _) => String::new(),
            };
            fact("Marked", format!("<span class=\"reason\" id=\"reason\">{}</span> {}{acked}<span class=\"evidence\">{}</span>", esc(m.reason.as_str()), when(now, m.since_ms), esc(&m.evidence)));
        }
        (None, Some(reason)) => fact(
            "Problem",
            format!(
                "<span class=\"reason\" id=\"reason\">{}</span><span class=\"evidence\">{}</span>",
                esc(reason.as_str()),
                esc(i.evidence.as_deref().unwrap_or(""))
            ),
        ),
        (None, None) => {}
    }
    if let Some(h) = &i.held {
        fact("Mark held", esc(h).to_string());
    }
    o.push_str("</dl>");

    o.push_str("<section id=\"drift\"><h3>Drift</h3>");
    match &v.drift {
        None => o.push_str("<p class=\"muted\">This agent watches no files (no --drift-path).</p>"),
        Some(d) => {
            let verdict = if d.drifted { "<b>drifted</b>" } else { "clean" };
            write!(
                o,
                "<p>{verdict} against the {}",
                esc(d.source.as_deref().unwrap_or("(no baseline)"))
            )
            .ok();
            if let Some(since) = d.since_ms {
                write!(o, ", since {}", when(now, since)).ok();
            }
            write!(o, ". Hash <code>{}</code>", esc(short(&d.hash))).ok();
            if let Some(e) = &d.expected {
                write!(o, ", expected <code>{}</code>", esc(short(e))).ok();
            }
            o.push_str(".</p>");
            if let Some(n) = &d.note {
                write!(o, "<p class=\"muted\">{}</p>", esc(n)).ok();
            }
            if !d.changes.is_empty() {
                o.push_str("<table id=\"changes\"><thead><tr><th>File</th><th>Change</th><th>Attributes</th></tr></thead><tbody>");
                for c in &d.changes {
                    write!(
                        o,
                        "<tr class=\"change\"><td data-label=\"File\"><code>{}</code></td><td data-label=\"Change\">{}</td><td data-label=\"Attributes\">{}</td></tr>",
                        esc(&c.path),
                        esc(&c.change),
                        change_attrs(c)
                    ).ok();
                }
                o.push_str("</tbody></table>");
            }
        }
    }
    o.push_str("</section><section id=\"checks\"><h3>Checks</h3>");
    if v.checks.is_empty() {
        o.push_str("<p class=\"muted\">No checks configured (--check).</p>");
    } else {
        let mut checks: Vec<_> = v.checks.iter().collect();
        checks.sort_by(|a, b| a.ok.cmp(&b.ok).then(a.name.cmp(&b.name)));
        o.push_str("<table><thead><tr><th>Check</th><th>Result</th><th>Detail</th><th class=\"num\">Took</th></tr></thead><tbody>");
        for c in &checks {
            let streak = v.check_streaks.get(&c.name).copied().unwrap_or(0);
            let result = if c.ok {
                "ok".to_string()
            } else {
                format!("<b>failed</b> ({streak} in a row)")
            };
            write!(
                o,
                "<tr class=\"check{}\" data-check=\"{name}\"><td data-label=\"Check\">{name}</td><td data-label=\"Result\">{result}</td><td data-label=\"Detail\">{}</td><td class=\"num\" data-label=\"Took\">{} ms</td></tr>",
                if c.ok { "" } else { " fail" },
                esc(&c.detail),
                c.duration_ms,
                name = esc(&c.name),
            ).ok();
        }
        o.push_str("</tbody></table>");
    }
    write!(o, "</section><section id=\"logs\"><h3>Last log lines <small>up to {}; the store has them all</small></h3>", crate::selfmetrics::LOG_LINES_KEPT).ok();
    if logs.is_empty() {
        o.push_str("<p class=\"muted\">No log lines since this collector started.</p>");
    } else {
        o.push_str("<ol class=\"logs\">");
        for l in logs.iter().rev() {
            let mut flags = String::new();
            if l.escaped {
                flags.push_str(" · not UTF-8, bytes as \\xNN");
            }
            if l.cut {
                flags.push_str(" · cut");
            }
            write!(o, "<li class=\"log\"><small>{} · <code>{}</code>{}</small><span class=\"msg\">{}</span></li>", when(now, l.ts / 1_000_000), esc(&l.src), esc(&flags), esc(&l.msg)).ok();
        }
        o.push_str("</ol>");
    }
    o.push_str("</section>");
    Some(o)
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
            esc("<img src=x onerror=\"alert('1')\">&").to_string(),
            "&lt;img src=x onerror=&quot;alert(&#39;1&#39;)&quot;&gt;&amp;"
        );
        assert_eq!(esc("plain é").to_string(), "plain é");
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
        })
    }

    async fn call(
        app: &Router,
        uri: &str,
        peer: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, String) {
        let mut b = axum::http::Request::builder().uri(uri);
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
            String::from_utf8(bytes.to_vec()).unwrap(),
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
                    v: phoenix_wire::VERSION,
                    agent,
                    seq: 1,
                    interval_ms: 1000,
                    metrics: vec![],
                    logs: vec![],
                    drift: None,
                    checks: vec![],
                    drift_root: None,
                    protected: None,
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

    #[tokio::test]
    async fn hostile_agent_text_is_escaped_everywhere() {
        let tmp = tempfile::tempdir().unwrap();
        let s = state(tmp.path());
        let evil = "<script>alert(1)</script>\"'&";
        let r = phoenix_wire::Report {
            v: phoenix_wire::VERSION,
            agent: phoenix_wire::Identity {
                instance_id: evil.into(),
                image_id: format!("img{evil}"),
                group: Some(format!("g{evil}")),
                hostname: evil.into(),
                boot_id: "b".into(),
                version: evil.into(),
                boot_time: 0,
            },
            seq: 1,
            interval_ms: 1000,
            metrics: vec![],
            logs: vec![phoenix_wire::LogLine {
                src: evil.into(),
                ts: 1,
                offset: 0,
                msg: format!("GET /{evil}"),
                escaped: false,
                part: None,
                tags: Default::default(),
                fields: Default::default(),
            }],
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
                attrs: vec![],
                values: vec![],
            }],
            note: Some(evil.into()),
            ..Default::default()
        };
        s.fleet.admit(&r, Some(drift), None);
        s.obs.logs.record(evil, &r.logs);
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
        for page in [&fleet, &inst] {
            assert!(!page.contains("<script>alert"), "{page}");
            assert!(!page.contains("\"'&<"));
            assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;"));
            // The only script tag is the page's own.
            assert_eq!(page.matches("<script").count(), 1);
        }
        assert!(
            inst.contains("GET /&lt;script&gt;"),
            "the log line is shown, escaped"
        );
        assert!(
            inst.contains("/etc/&lt;script&gt;"),
            "the changed file is shown, escaped"
        );
        assert!(fleet.contains(&format!("/instances/{}", pct(evil))));
    }
}
