//! The collector's HTTP API. Every route names the roles it accepts; a token of another role
//! gets 403, no token 401. Bodies are read only after the token was checked.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use phoenix_wire::{Ack, Limits};
use serde_json::json;

use crate::auth::{bearer, Caller, Role, Tokens};
use crate::fleet::Fleet;
use crate::lineproto::Writer;
use crate::writer::{Job, WriterHandle};

#[derive(Debug)]
pub struct AppState {
    pub tokens: Tokens,
    pub baselines: crate::baselines::Baselines,
    pub writer: WriterHandle,
    pub fleet: Arc<Fleet>,
    pub limits: Limits,
    pub max_body: usize,
    pub store: String,
    /// Rate limits and the mutual-TLS switch.
    pub security: crate::security::Security,
    /// Self-metrics and the last log lines per instance (fleet page, /metrics).
    pub obs: Arc<crate::selfmetrics::Obs>,
}

pub type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    Router::new()
        .route(
            "/v1/reports",
            post(post_report).layer(axum::middleware::from_fn_with_state(
                state.obs.clone(),
                crate::selfmetrics::count_reports,
            )),
        )
        .route("/v1/images/{image_id}/baseline", post(post_baseline))
        .route("/v1/instances", get(list_instances))
        .route("/v1/instances/{id}", get(get_instance))
        .route("/v1/phoenix", get(get_phoenix))
        .route("/v1/phoenix/{id}/ack", post(ack_phoenix))
        .route("/healthz", get(healthz))
        .merge(crate::page::routes())
        .with_state(state)
}

/// A JSON error with a reason the caller can act on.
pub fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

pub fn unavailable(retry_after: Duration, msg: &str) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, msg);
    let secs = retry_after.as_secs().max(1);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    r
}

/// The caller, if its token belongs to one of `allowed`; else the 401/403 to answer with.
#[allow(clippy::result_large_err)] // an axum Response, answered at once, never stored
pub fn authorize(s: &AppState, headers: &HeaderMap, allowed: &[Role]) -> Result<Caller, Response> {
    let presented = bearer(
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    );
    if presented.is_none() {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "missing bearer token: send Authorization: Bearer <token>",
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return Err(r);
    }
    if let Some(c) = s.tokens.check(presented, allowed) {
        // Agent tokens are shared by a fleet: reports are limited per instance instead.
        if c.role != Role::Agent {
            if let Err(wait) = s.security.limiter.check(&format!("token/{}", c.token_name)) {
                return Err(crate::security::too_many(
                    wait,
                    &format!("token {}", c.token_name),
                ));
            }
        }
        return Ok(c);
    }
    // A valid token of another role is a 403; an unknown token a 401. Neither is echoed.
    if s.tokens.check(presented, &Role::ALL).is_some() {
        let roles: Vec<&str> = allowed.iter().map(|r| r.name()).collect();
        return Err(error(
            StatusCode::FORBIDDEN,
            format!(
                "this token's role may not do this; needs a {} token",
                roles.join(" or ")
            ),
        ));
    }
    let mut r = error(StatusCode::UNAUTHORIZED, "invalid token");
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer error=\"invalid_token\""),
    );
    Err(r)
}

/// Read a request body of at most `max` bytes (413 past it).
pub async fn read_body(req: Request, max: usize) -> Result<Bytes, Response> {
    axum::body::to_bytes(req.into_body(), max)
        .await
        .map_err(|_| {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {max} bytes (--max-body); send smaller batches"),
            )
        })
}

async fn post_report(State(s): State<Shared>, req: Request) -> Response {
    let headers = req.headers().clone();
    if let Err(r) = authorize(&s, &headers, &[Role::Agent]) {
        return r;
    }
    let peer = req.extensions().get::<crate::tls::PeerCert>().cloned();
    let body = match read_body(req, s.max_body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let gz = match headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
    {
        None | Some("identity") => false,
        Some("gzip") => true,
        Some(other) => {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("Content-Encoding {other:?} not supported; use gzip"),
            )
        }
    };
    let limits = s.limits;
    let decoded = if body.len() > 64 << 10 {
        tokio::task::spawn_blocking(move || phoenix_wire::decode(&body, gz, &limits))
            .await
            .expect("decode does not panic")
    } else {
        phoenix_wire::decode(&body, gz, &limits)
    };
    let report = match decoded {
        Ok(r) => r,
        Err(e) if e.is_too_large() => return error(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if s.security.mtls {
        if let Err(why) = crate::tls::check_identity(peer.as_ref(), &report.agent.instance_id) {
            tracing::warn!(instance_id = %report.agent.instance_id, reason = %why, "report refused: client certificate does not match");
            return error(StatusCode::FORBIDDEN, why);
        }
    }
    if let Err(wait) = s
        .security
        .limiter
        .check(&format!("instance/{}", report.agent.instance_id))
    {
        return crate::security::too_many(wait, &format!("instance {}", report.agent.instance_id));
    }
    if s.fleet.is_duplicate(&report.agent, report.seq) {
        return crate::selfmetrics::duplicate(
            Json(Ack {
                accepted: report.seq,
                duplicate: true,
                rejected_points: 0,
                resend_drift: false,
            })
            .into_response(),
        );
    }
    let mut w = Writer::with_capacity(256 * (report.metrics.len() + report.logs.len()) + 256);
    crate::convert::report_lines(&report, &mut w);
    let drift = report.drift.as_ref().map(|d| judge_drift(&s, &report, d));
    if let Some(d) = &drift {
        crate::convert::drift_line(&report.agent, d, &mut w);
    }
    let mut rejected = 0;
    if w.lines > 0 {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Err((_, u)) = s.writer.submit(Job {
            body: w.buf,
            ends: w.ends,
            reply: tx,
        }) {
            return unavailable(
                u.retry_after,
                &format!(
                    "cannot store points now: {}; keep the batch and retry",
                    u.reason
                ),
            );
        }
        match rx.await {
            Ok(Ok(written)) => rejected = written.rejected,
            Ok(Err(u)) => {
                return unavailable(
                    u.retry_after,
                    &format!(
                        "cannot store points now: {}; keep the batch and retry",
                        u.reason
                    ),
                )
            }
            Err(_) => return unavailable(Duration::from_secs(5), "collector writer stopped"),
        }
    }
    s.fleet.record(&report, drift, now_ms());
    s.obs.logs.record(&report.agent.instance_id, &report.logs);
    Json(Ack {
        accepted: report.seq,
        duplicate: false,
        rejected_points: rejected,
        resend_drift: false,
    })
    .into_response()
}

/// Judge a reported drift state against the registered baseline, the agent's, or the majority.
fn judge_drift(
    s: &AppState,
    r: &phoenix_wire::Report,
    d: &phoenix_wire::DriftState,
) -> crate::fleet::DriftInfo {
    let registered = s.baselines.get(&r.agent.image_id);
    let mut peers = s.fleet.peer_hashes(&r.agent.image_id);
    // This instance counts with its new hash, not its previous one.
    if let Some(old) = s
        .fleet
        .instances
        .lock()
        .unwrap()
        .get(&r.agent.instance_id)
        .and_then(|i| i.drift.as_ref())
        .map(|d| d.hash.clone())
    {
        if let Some(pos) = peers.iter().position(|h| *h == old) {
            peers.remove(pos);
        }
    }
    peers.push(d.hash.clone());
    let peer_refs: Vec<&str> = peers.iter().map(String::as_str).collect();
    let v = crate::drift::judge(registered.as_deref(), d, &peer_refs);
    crate::fleet::DriftInfo {
        hash: d.hash.clone(),
        expected: v.expected,
        source: v.reason.map(|r| r.as_str().to_string()),
        drifted: v.drifted,
        changes: v.changes,
        note: v.note.or_else(|| d.note.clone()),
        ts: d.ts,
        since_ms: None,
    }
}

async fn post_baseline(
    State(s): State<Shared>,
    Path(image): Path<String>,
    req: Request,
) -> Response {
    let headers = req.headers().clone();
    let caller = match authorize(&s, &headers, &[Role::Pipeline]) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let body = match read_body(req, s.limits.max_decompressed).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let json = if headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v == "gzip")
    {
        match phoenix_wire::gunzip_limited(&body, s.limits.max_decompressed) {
            Ok(j) => j,
            Err(e) if e.is_too_large() => {
                return error(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
            }
            Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
        }
    } else {
        body.to_vec()
    };
    let manifest: phoenix_wire::drift::Manifest = match serde_json::from_slice(&json) {
        Ok(m) => m,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("body is not a baseline manifest (as phoenix-agent bake writes): {e}"),
            )
        }
    };
    let root = manifest.root.clone();
    let entries = manifest.entries.len();
    match s.baselines.register(&image, manifest) {
        Ok(outcome) => {
            tracing::info!(image_id = %image, root = %root, entries, token = %caller.token_name, outcome = ?outcome, "baseline registered");
            crate::audit::record(
                &s.writer,
                "baseline",
                &caller.token_name,
                &image,
                &format!("root {root}, {entries} entries, {outcome:?}"),
            );
            let status = if outcome == crate::drift::Registration::Created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (status, Json(json!({ "image_id": image, "root": root, "entries": entries, "outcome": format!("{outcome:?}") }))).into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn list_instances(State(s): State<Shared>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&s, &headers, &[Role::Recycler, Role::Reader]) {
        return r;
    }
    let g = s.fleet.instances.lock().unwrap();
    let mut list: Vec<serde_json::Value> = g.values().map(summary).collect();
    list.sort_by(|a, b| a["instance_id"].as_str().cmp(&b["instance_id"].as_str()));
    Json(json!({ "instances": list })).into_response()
}

fn summary(i: &crate::fleet::Instance) -> serde_json::Value {
    json!({
        "instance_id": i.identity.instance_id,
        "image_id": i.identity.image_id,
        "group": i.identity.group,
        "hostname": i.identity.hostname,
        "boot_id": i.identity.boot_id,
        "agent_version": i.identity.version,
        "first_seen_ms": i.first_seen_ms,
        "last_seen_ms": i.last_seen_ms,
        "interval_ms": i.interval_ms,
        "reports": i.reports,
        "cpu_used_percent": i.cpu_used_percent,
        "mem_used_percent": i.mem_used_percent,
        "disk_max_used_percent": i.disk_max_used_percent,
        "drifted": i.drift.as_ref().map(|d| d.drifted),
        "state": i.phx.state.as_str(),
        "reason": i.phx.mark.as_ref().map(|m| m.reason.as_str()).or(i.phx.problem.as_ref().map(|p| p.reason.as_str())),
        "evidence": i.phx.mark.as_ref().map(|m| m.evidence.as_str()).or(i.phx.problem.as_ref().map(|p| p.evidence.as_str())),
        "held": i.phx.held,
        "mark": i.phx.mark,
    })
}

/// The phoenix queue: marked (and acked) instances, held marks, alerts, the budget.
async fn get_phoenix(State(s): State<Shared>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&s, &headers, &[Role::Recycler]) {
        return r;
    }
    Json(s.fleet.phoenix_view(now_ms())).into_response()
}

/// The recycler took a marked instance; the mark stays (as acked) until it goes silent.
async fn ack_phoenix(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let caller = match authorize(&s, &headers, &[Role::Recycler]) {
        Ok(c) => c,
        Err(r) => return r,
    };
    match s.fleet.ack(&id, &caller.token_name, now_ms()) {
        Ok(now) => {
            if now {
                crate::audit::record(
                    &s.writer,
                    "ack",
                    &caller.token_name,
                    &id,
                    "recycler took the marked instance",
                );
            }
            s.fleet.wake.notify_one();
            Json(json!({ "instance_id": id, "state": "acked", "already_acked": !now }))
                .into_response()
        }
        Err(()) => error(
            StatusCode::NOT_FOUND,
            format!("instance {id:?} is not marked for replacement (see GET /v1/phoenix)"),
        ),
    }
}

async fn get_instance(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = authorize(&s, &headers, &[Role::Recycler, Role::Reader]) {
        return r;
    }
    let g = s.fleet.instances.lock().unwrap();
    match g.get(&id) {
        Some(i) => {
            let mut v = summary(i);
            v["checks"] = json!(i.checks);
            v["drift"] = json!(i.drift);
            Json(v).into_response()
        }
        None => error(
            StatusCode::NOT_FOUND,
            format!("no instance {id:?} has reported to this collector"),
        ),
    }
}

async fn healthz(State(s): State<Shared>) -> Response {
    let down = s.writer.unavailable();
    let body = json!({ "status": "ok", "store": s.store, "store_up": down.is_none(), "store_error": down.map(|d| d.reason) });
    (StatusCode::OK, Json(body)).into_response()
}
