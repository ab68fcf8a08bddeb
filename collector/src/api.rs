//! The collector's HTTP API. Every route names the roles it accepts; a token of another role
//! gets 403, no token 401. Bodies are read only after the token was checked.

use std::time::{Duration, Instant};

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use phoenix_wire::Ack;
use serde_json::json;

pub use crate::app::{authorize, read_body, AppState, Shared};
pub use crate::reply::ApiError;

use crate::auth::Role;
use crate::lineproto::Writer;
use crate::writer::Job;

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
        .route(
            "/v1/instances/{id}/diagnostics",
            post(request_diagnostics).get(get_diagnostics),
        )
        .route("/v1/diagnostics", post(post_diagnostics))
        .route(
            "/v1/instances/{id}/enrolment",
            axum::routing::delete(crate::identity::http::delete_enrolment),
        )
        .route("/v1/phoenix", get(get_phoenix))
        .route("/v1/phoenix/preview", get(preview_phoenix))
        .route("/v1/phoenix/{id}/ack", post(ack_phoenix))
        .route("/healthz", get(healthz))
        .route("/metrics", get(get_metrics))
        .merge(crate::page::routes())
        // Unknown routes and methods answer like every other refusal: JSON with a reason.
        .fallback(|uri: axum::http::Uri| async move {
            ApiError::NotFound(format!(
                "no route {}; the routes are in README.md (HTTP API of the collector)",
                phoenix_wire::cut_to(uri.path(), 256)
            ))
        })
        .method_not_allowed_fallback(|m: axum::http::Method, uri: axum::http::Uri| async move {
            ApiError::MethodNotAllowed(format!(
                "{m} is not allowed on {}",
                phoenix_wire::cut_to(uri.path(), 256)
            ))
        })
        .with_state(state)
}

/// The gates every agent request passes before its body is read (so a flood costs hash
/// lookups, not gunzips and parses), in every `--identity` mode: the agent token, the
/// peer's rate limit, the token's, the caller proof's,
/// then the body within `--max-body`. Reports and diagnostics answers share them so they
/// cannot drift apart.
async fn agent_request(
    s: &Shared,
    req: Request,
) -> Result<(HeaderMap, Option<crate::tls::PeerCert>, axum::body::Bytes), ApiError> {
    let headers = req.headers().clone();
    let caller = authorize(s, &headers, &[Role::Agent])?;
    s.security.check_peer(&req)?;
    let peer = req.extensions().get::<crate::tls::PeerCert>().cloned();
    let token = &caller.token_name;
    if let Err(wait) = s.security.agent_tokens.check(&format!("token/{token}")) {
        return Err(crate::security::too_many(
            wait,
            &format!("agent token {token} (--agent-token-rate-limit)"),
        ));
    }
    let presented = crate::identity::Presented::from_headers(&headers);
    if let Some(key) = s.identity.caller_key(&presented, peer.as_ref()) {
        if let Err(wait) = s.security.callers.check(&key) {
            return Err(crate::security::too_many(
                wait,
                "this instance's credential",
            ));
        }
    }
    let body = read_body(req, s.max_body).await?;
    Ok((headers, peer, body))
}

/// A payload error of the wire crate: 413 when it is over a limit, else 400.
fn decode_error(e: phoenix_wire::DecodeError) -> ApiError {
    if e.is_too_large() {
        ApiError::PayloadTooLarge(e.to_string())
    } else {
        ApiError::BadRequest(e.to_string())
    }
}

/// The 503 for points the store cannot take now: the agent keeps the batch.
fn cannot_store(u: crate::writer::Unavailable) -> ApiError {
    ApiError::unavailable(
        u.retry_after,
        format!(
            "cannot store points now: {}; keep the batch and retry",
            u.reason
        ),
    )
}

async fn post_report(State(s): State<Shared>, req: Request) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let (headers, peer, body) = agent_request(&s, req).await?;
    let gz = match headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
    {
        None | Some("identity") => false,
        Some("gzip") => true,
        Some(other) => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "Content-Encoding {other:?} not supported; use gzip"
            )))
        }
    };
    let limits = s.limits;
    let decoded = if body.len() > 64 << 10 {
        tokio::task::spawn_blocking(move || phoenix_wire::decode(&body, gz, &limits))
            .await
            .expect("decode does not panic")
    } else {
        let r = phoenix_wire::decode(&body, gz, &limits);
        // A report can wait seconds for its write: nothing it no longer needs waits with it.
        drop(body);
        r
    };
    let mut report = decoded.map_err(decode_error)?;
    if s.security.mtls {
        if let Err(why) = crate::tls::check_identity(peer.as_ref(), &report.agent.instance_id) {
            tracing::warn!(instance_id = %report.agent.instance_id, reason = %why, "report refused: client certificate does not match");
            return Err(ApiError::Forbidden(why));
        }
    }
    // Before anything the report could change (rate buckets, dedupe, fleet state, points).
    if let Err(r) = crate::identity::http::admit(
        &s.identity,
        &report.agent.instance_id,
        &headers,
        crate::fleet::clock::wall_now_ms(),
    )
    .await
    {
        match &r {
            crate::identity::Refusal::Forbidden(why) => {
                tracing::warn!(instance_id = %report.agent.instance_id, reason = %why, "report refused: it cannot speak for this instance");
            }
            crate::identity::Refusal::Full(_) => s
                .fleet
                .refused_new_instance(s.identity.limits().max_instances),
            crate::identity::Refusal::Store(_) => {}
        }
        return Err(r.into());
    }
    // hyper parses a request's head into slices of the connection's read buffer, so these
    // headers keep that whole buffer (8 KiB or more) allocated. A report can wait seconds for
    // its write, and under a saturated store thousands wait: free it before they do.
    drop(headers);
    drop(peer);
    s.schema
        .enforce(&mut report)
        .map_err(ApiError::BadRequest)?;
    if let Err(wait) = s
        .security
        .limiter
        .check(&format!("instance/{}", report.agent.instance_id))
    {
        return Err(crate::security::too_many(
            wait,
            &format!("instance {}", report.agent.instance_id),
        ));
    }
    // The fleet calls below take the fleet's lock: see `may_block`.
    let dup = crate::app::may_block(&s.fleet, || {
        s.fleet.is_stored(&report.agent, report.seq).then(|| Ack {
            accepted: report.seq,
            duplicate: true,
            rejected_points: 0,
            // Admit it anyway (a retry is a sign of life), and ask for drift if stale.
            resend_drift: s
                .fleet
                .admit(&report, None, report.drift_root.clone())
                .resend_drift,
            diagnostics: s.fleet.diagnostics_for_ack(&report.agent),
        })
    });
    if let Some(ack) = dup {
        return Ok(crate::selfmetrics::duplicate(Json(ack).into_response()));
    }
    let (drift, admission) = crate::app::may_block(&s.fleet, || {
        let drift = report.drift.as_ref().map(|d| judge_drift(&s, &report, d));
        // Proof of life at arrival, before (and whatever becomes of) the write: a store that
        // cannot take points is no sign that the instance is dead.
        let admission = s
            .fleet
            .admit(&report, drift.clone(), report.drift_root.clone());
        (drift, admission)
    });
    s.fleet
        .note_lateness(arrived.elapsed().as_millis().min(i64::MAX as u128) as i64);
    // A report the writer would refuse now is told so before it builds any lines: under a
    // saturated store most reports get this 503, and the line protocol was most of its cost.
    // Its proof of life (above) stands either way.
    if !report.metrics.is_empty() || !report.logs.is_empty() || drift.is_some() {
        s.writer.room().map_err(cannot_store)?;
    }
    let mut w = Writer::with_capacity(256 * (report.metrics.len() + report.logs.len()) + 256);
    crate::convert::report_lines(&report, &mut w);
    if let Some(d) = &drift {
        crate::convert::drift_line(&report.agent, d, &mut w);
    }
    // The points are lines now; the decoded ones would only wait with the write.
    report.metrics = Vec::new();
    let mut rejected = 0;
    if w.lines > 0 {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let submitted = Instant::now();
        if let Err((_, u)) = s.writer.submit(Job {
            body: w.buf,
            ends: w.ends,
            reply: tx,
        }) {
            return Err(cannot_store(u));
        }
        let outcome = rx.await;
        // An agent waits for this ack before its next batch: a slow write delays the next
        // proof of life by as much.
        s.fleet
            .note_lateness(submitted.elapsed().as_millis().min(i64::MAX as u128) as i64);
        match outcome {
            Ok(Ok(written)) => rejected = written.rejected,
            Ok(Err(u)) => return Err(cannot_store(u)),
            Err(_) => {
                return Err(ApiError::unavailable(
                    Duration::from_secs(5),
                    "collector writer stopped",
                ))
            }
        }
    }
    let diagnostics = crate::app::may_block(&s.fleet, || {
        s.fleet.stored(&report.agent, report.seq);
        s.obs.logs.record(&report.agent.instance_id, &report.logs);
        s.fleet.diagnostics_for_ack(&report.agent)
    });
    Ok(Json(Ack {
        accepted: report.seq,
        duplicate: false,
        rejected_points: rejected,
        resend_drift: admission.resend_drift,
        diagnostics,
    })
    .into_response())
}

/// Judge a reported drift state against the registered baseline, the agent's, or the majority.
fn judge_drift(
    s: &AppState,
    r: &phoenix_wire::Report,
    d: &phoenix_wire::DriftState,
) -> crate::fleet::DriftInfo {
    let registered = s.baselines.get(&r.agent.image_id);
    // This instance counts with its new hash, not its previous one.
    let mut peers = s.fleet.peer_hashes(&r.agent.image_id, &r.agent.instance_id);
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
) -> Result<Response, ApiError> {
    let headers = req.headers().clone();
    let caller = authorize(&s, &headers, &[Role::Pipeline])?;
    let body = read_body(req, s.limits.max_decompressed).await?;
    let json = if headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v == "gzip")
    {
        phoenix_wire::gunzip_limited(&body, s.limits.max_decompressed).map_err(decode_error)?
    } else {
        body.to_vec()
    };
    let manifest: phoenix_wire::drift::Manifest = serde_json::from_slice(&json).map_err(|e| {
        ApiError::BadRequest(format!(
            "body is not a baseline manifest (as phoenix-agent bake writes): {e}"
        ))
    })?;
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
            Ok((status, Json(json!({ "image_id": image, "root": root, "entries": entries, "outcome": format!("{outcome:?}") }))).into_response())
        }
        Err(e) => Err(ApiError::BadRequest(e)),
    }
}

/// Instances one `GET /v1/instances` answers without `?limit=`: a page of a 10,000-instance
/// fleet, not all of it (10,000 summaries are megabytes of JSON to build per read, and slow
/// every reader while a flood of new ids keeps the fleet full).
pub const LIST_DEFAULT_LIMIT: usize = 1000;
/// Most instances one page may ask for.
pub const LIST_MAX_LIMIT: usize = 10_000;

/// `?limit=&offset=` of the fleet list: (limit, offset), or why not.
fn list_page(q: Option<&str>) -> Result<(usize, usize), String> {
    let (mut limit, mut offset) = (LIST_DEFAULT_LIMIT, 0usize);
    for (k, v) in form_urlencoded::parse(q.unwrap_or("").as_bytes()) {
        let n = || {
            v.parse::<usize>().map_err(|_| {
                format!(
                    "{k}={:?} is not a whole number",
                    phoenix_wire::cut_to(&v, 64)
                )
            })
        };
        match k.as_ref() {
            "limit" => limit = n()?,
            "offset" => offset = n()?,
            other => {
                return Err(format!(
                    "unknown parameter {:?}: use limit and offset",
                    phoenix_wire::cut_to(other, 64)
                ))
            }
        }
    }
    if !(1..=LIST_MAX_LIMIT).contains(&limit) {
        return Err(format!("limit must be 1 to {LIST_MAX_LIMIT}"));
    }
    Ok((limit, offset))
}

/// `GET /v1/instances?limit=&offset=`: a page of the fleet, sorted by instance id, from the
/// published snapshot (never the fleet lock). `total` is the fleet's size; `next_offset` is
/// where the next page starts (null on the last).
async fn list_instances(
    State(s): State<Shared>,
    headers: HeaderMap,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    authorize(&s, &headers, &[Role::Recycler, Role::Reader])?;
    let (limit, offset) = list_page(q.as_deref()).map_err(ApiError::BadRequest)?;
    /// Serialised straight from the snapshot: no `serde_json::Value` tree of the whole fleet.
    #[derive(serde::Serialize)]
    struct List<'a> {
        instances: Vec<&'a crate::fleet::view::InstanceSummary>,
        total: usize,
        offset: usize,
        limit: usize,
        next_offset: Option<usize>,
    }
    let v = s.fleet.view();
    let total = v.instances.len();
    let page = v.instances.iter().skip(offset).take(limit);
    let instances: Vec<_> = page.map(|i| &i.summary).collect();
    let end = offset.saturating_add(instances.len());
    let list = List {
        instances,
        total,
        offset,
        limit,
        next_offset: (end < total).then_some(end),
    };
    Ok(Json(list).into_response())
}

/// The phoenix queue: marked (and acked) instances, held marks, alerts, the budget. Readers
/// may look (the page shows them the same queue); only recyclers ack.
async fn get_phoenix(State(s): State<Shared>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&s, &headers, &[Role::Recycler, Role::Reader])?;
    Ok(Json(&s.fleet.queue_view().queue).into_response())
}

/// Most `window` parameters one preview takes.
const MAX_PREVIEW_WINDOWS: usize = 32;

/// `GET /v1/phoenix/preview?budget=…&window=…&window=…`: which instances a policy would mark
/// now, and why the others wait; changes nothing. Without parameters, this collector's own.
async fn preview_phoenix(
    State(s): State<Shared>,
    headers: HeaderMap,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    authorize(&s, &headers, &[Role::Recycler, Role::Reader])?;
    let bad = |e: String| ApiError::BadRequest(phoenix_wire::cut_to(&e, 1024).to_string());
    let mut budget = None;
    let mut windows: Vec<String> = Vec::new();
    for (k, v) in form_urlencoded::parse(q.as_deref().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "budget" if budget.is_none() => {
                budget = Some(crate::fleet::policy::Budgets::parse(&v).map_err(bad)?)
            }
            "budget" => {
                return Err(ApiError::bad_request(
                    "give budget once (comma-separate reasons: drift=10%,unhealthy=20%)",
                ))
            }
            "window" if windows.len() < MAX_PREVIEW_WINDOWS => windows.push(v.into_owned()),
            "window" => {
                return Err(ApiError::BadRequest(format!(
                    "at most {MAX_PREVIEW_WINDOWS} window parameters"
                )))
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown parameter {:?}: use budget and window",
                    phoenix_wire::cut_to(other, 64)
                )))
            }
        }
    }
    let windows = if windows.is_empty() {
        None
    } else {
        Some(crate::fleet::policy::Windows::parse_all(&windows).map_err(bad)?)
    };
    match s.fleet.preview(budget, windows) {
        Some(p) => Ok(Json(p).into_response()),
        None => Err(ApiError::too_many(
            Duration::from_secs(1),
            "another preview is running; retry in a second",
        )),
    }
}

/// The recycler took a marked instance; the mark stays (as acked) until it goes silent.
async fn ack_phoenix(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let caller = authorize(&s, &headers, &[Role::Recycler])?;
    match s.fleet.ack(&id, &caller.token_name) {
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
            Ok(
                Json(json!({ "instance_id": id, "state": "acked", "already_acked": !now }))
                    .into_response(),
            )
        }
        Err(e) => Err(ApiError::NotFound(format!("instance {id:?}: {e}"))),
    }
}

/// The 404 for an id the fleet does not know.
fn unknown_instance(id: &str) -> ApiError {
    ApiError::NotFound(format!("no instance {id:?} has reported to this collector"))
}

async fn get_instance(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers, &[Role::Recycler, Role::Reader])?;
    let v = s.fleet.view();
    match v.instance(&id) {
        Some(i) => Ok(Json(i).into_response()),
        None => Err(unknown_instance(&id)),
    }
}

async fn healthz(State(s): State<Shared>) -> Response {
    let down = s.writer.unavailable();
    let body = json!({ "status": "ok", "store": s.store, "store_up": down.is_none(), "store_error": down.map(|d| d.reason), "fleet_store": s.fleet.describe_store(), "fleet_store_status": s.fleet.store_status(), "decider": s.fleet.is_decider() });
    (StatusCode::OK, Json(body)).into_response()
}

/// `GET /metrics` (open: figures only, no instance ids).
async fn get_metrics(State(s): State<Shared>) -> Response {
    let now = s.fleet.clock().wall_ms();
    let f = crate::selfmetrics::figures(&s.obs, &s.writer, &s.fleet.queue_view(), now);
    let mut r = (StatusCode::OK, crate::selfmetrics::prometheus(&f)).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

/// Largest body of a diagnostics request: it names a probe set, nothing more.
const MAX_DIAG_REQUEST: usize = 4096;

/// `POST /v1/instances/{id}/diagnostics`: ask the instance's agent for a snapshot of a fixed,
/// read-only probe set. The body names the probe set and nothing else (`{"probes":"full"}`,
/// or empty); anything naming a command, a path or an argument is a 400.
async fn request_diagnostics(
    State(s): State<Shared>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let headers = req.headers().clone();
    let caller = authorize(&s, &headers, &[Role::Reader, Role::Recycler])?;
    let body = read_body(req, MAX_DIAG_REQUEST).await?;
    let r = phoenix_wire::diag::parse_request(&body).map_err(ApiError::BadRequest)?;
    use crate::fleet::diag::DiagError;
    match s
        .fleet
        .request_diagnostics(&id, r.probes, &caller.token_name)
    {
        Ok(p) => {
            crate::audit::record(
                &s.writer,
                "diagnostics",
                &caller.token_name,
                &id,
                &format!(
                    "asked for probe set {} (request {})",
                    r.probes.as_str(),
                    p.id
                ),
            );
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({ "instance_id": id, "request_id": p.id, "probes": r.probes, "state": "pending" })),
            )
                .into_response())
        }
        Err(e @ DiagError::Unknown(_)) => Err(ApiError::NotFound(e.to_string())),
        Err(e) => Err(ApiError::Conflict(e.to_string())),
    }
}

/// `GET /v1/instances/{id}/diagnostics`: the outstanding request and the latest snapshot,
/// with when it was asked for and when it arrived.
async fn get_diagnostics(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    use crate::fleet::view::{LatestJson, PendingJson};
    authorize(&s, &headers, &[Role::Reader, Role::Recycler])?;
    let v = s.fleet.view();
    match v.instance(&id) {
        Some(i) => Ok(Json(json!({
            "instance_id": id,
            "pending": i.diagnostics.pending.as_ref().map(PendingJson::of),
            "latest": i.diagnostics.latest.as_deref().map(LatestJson::of),
        }))
        .into_response()),
        None => Err(unknown_instance(&id)),
    }
}

/// `POST /v1/diagnostics` (agent): the snapshot answering a request handed out in an ack.
/// The same gates as a report: token, peer, client certificate, the identity gate.
async fn post_diagnostics(State(s): State<Shared>, req: Request) -> Result<Response, ApiError> {
    let (headers, peer, body) = agent_request(&s, req).await?;
    let gz = headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v == "gzip");
    let decoded = tokio::task::spawn_blocking(move || {
        phoenix_wire::diag::decode_answer(&body, gz).map(|a| {
            let bytes = serde_json::to_vec(&a.snapshot).map_or(0, |j| j.len());
            (a, bytes)
        })
    })
    .await;
    let (answer, bytes) = match decoded {
        Ok(a) => a.map_err(decode_error)?,
        Err(_) => {
            return Err(ApiError::unavailable(
                Duration::from_secs(5),
                "collector is stopping",
            ))
        }
    };
    let instance = answer.agent.instance_id.clone();
    if s.security.mtls {
        crate::tls::check_identity(peer.as_ref(), &instance).map_err(ApiError::Forbidden)?;
    }
    crate::identity::http::admit(
        &s.identity,
        &instance,
        &headers,
        crate::fleet::clock::wall_now_ms(),
    )
    .await?;
    if let Err(wait) = s.security.limiter.check(&format!("instance/{instance}")) {
        return Err(crate::security::too_many(
            wait,
            &format!("instance {instance}"),
        ));
    }
    let id = answer.request_id;
    match s.fleet.answer_diagnostics(answer, bytes) {
        Ok(_) => {
            tracing::info!(instance_id = %instance, request = id, bytes, "diagnostics snapshot received");
            Ok(Json(json!({ "accepted": id })).into_response())
        }
        Err(e) => Err(ApiError::Conflict(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Gate, Limits, Mode, NoStore};
    use crate::security::{Limiter, Rate};
    use std::sync::Arc;

    const AGENT: &str = "agent-1";

    /// One request a second (and a burst of one) for every limiter named.
    fn one(on: bool) -> Limiter {
        Limiter::new(on.then_some(Rate {
            per_sec: 0.001,
            burst: 1.0,
        }))
    }

    fn aws_mode() -> Mode {
        use rustls::pki_types::pem::PemObject;
        let pem = include_bytes!("identity/testdata/aws-test-cert.pem");
        let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .unwrap();
        Mode::Aws(crate::identity::aws::AwsVerifier::new(certs, vec![]).unwrap())
    }

    fn app(dir: &std::path::Path, mode: Mode, peers: bool, callers: bool, tokens: bool) -> Router {
        let mut t = crate::auth::Tokens::default();
        t.add(Role::Agent, AGENT);
        let sink =
            Arc::new(crate::sink::file::FileSink::new(dir.join("influx"), "phoenix").unwrap());
        let mtls = matches!(mode, Mode::Mtls);
        router(Arc::new(AppState {
            identity: Arc::new(Gate::open(mode, Limits::default(), Box::new(NoStore), 0).unwrap()),
            schema: Default::default(),
            tokens: t,
            baselines: crate::baselines::Baselines::open(&dir.join("baselines")).unwrap(),
            writer: crate::writer::start(sink, crate::writer::Settings::default()),
            fleet: Arc::new(crate::fleet::Fleet::in_memory(Default::default())),
            limits: phoenix_wire::Limits::default(),
            max_body: 1 << 20,
            store: "test".into(),
            security: crate::security::Security {
                limiter: one(false),
                peers: one(peers),
                callers: one(callers),
                agent_tokens: one(tokens),
                mtls,
            },
            obs: Arc::new(crate::selfmetrics::Obs::default()),
            page: Default::default(),
        }))
    }

    /// POST a body that is not gzip at all: a 400 says it was unzipped, anything else that
    /// a gate before the gunzip answered.
    async fn report(app: &Router, peer: &str, headers: &[(&str, &str)]) -> (StatusCode, String) {
        let mut b = axum::http::Request::builder()
            .method("POST")
            .uri("/v1/reports")
            .header("authorization", format!("Bearer {AGENT}"))
            .header("content-encoding", "gzip");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let mut req = b.body(axum::body::Body::from("this is not gzip")).unwrap();
        req.extensions_mut().insert(axum::extract::ConnectInfo(
            peer.parse::<std::net::SocketAddr>().unwrap(),
        ));
        req.extensions_mut().insert(crate::tls::PeerCert(Arc::new(
            rustls::pki_types::CertificateDer::from(vec![1u8, 2, 3]),
        )));
        let r = tower_service::Service::call(&mut app.clone(), req)
            .await
            .unwrap();
        let status = r.status();
        let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// What each mode's agents present.
    fn proof(mode: &str) -> Vec<(&'static str, &'static str)> {
        match mode {
            "tofu" => vec![(
                crate::identity::CREDENTIAL_HEADER,
                "0123456789abcdef0123456789abcdef-box-a",
            )],
            "aws" => vec![
                (crate::identity::AWS_DOCUMENT_HEADER, "ZG9j"),
                (crate::identity::AWS_SIGNATURE_HEADER, "c2ln"),
            ],
            _ => vec![],
        }
    }

    fn modes() -> Vec<(&'static str, Mode)> {
        vec![
            ("tofu", Mode::Tofu),
            ("aws", aws_mode()),
            ("mtls", Mode::Mtls),
            ("shared", Mode::Shared),
        ]
    }

    #[tokio::test]
    async fn in_every_mode_the_peer_limit_answers_before_the_gunzip() {
        for (name, mode) in modes() {
            let d = tempfile::tempdir().unwrap();
            let a = app(d.path(), mode, true, false, false);
            let h = proof(name);
            let (st, body) = report(&a, "10.0.0.1:5000", &h).await;
            assert_eq!(
                st,
                StatusCode::BAD_REQUEST,
                "{name}: unzipped first: {body}"
            );
            let (st, body) = report(&a, "10.0.0.1:5001", &h).await;
            assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{name}: {body}");
            assert!(body.contains("peer 10.0.0.1"), "{name}: {body}");
            // Another peer has its own bucket.
            let (st, _) = report(&a, "10.0.0.2:5000", &h).await;
            assert_eq!(st, StatusCode::BAD_REQUEST, "{name}");
        }
    }

    #[tokio::test]
    async fn in_every_mode_the_agent_token_limit_answers_before_the_gunzip() {
        for (name, mode) in modes() {
            let d = tempfile::tempdir().unwrap();
            let a = app(d.path(), mode, false, false, true);
            let h = proof(name);
            assert_eq!(
                report(&a, "10.0.0.1:1", &h).await.0,
                StatusCode::BAD_REQUEST
            );
            // From another peer: the token is the fleet's, wherever it is sent from.
            let (st, body) = report(&a, "10.0.0.9:1", &h).await;
            assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{name}: {body}");
            assert!(body.contains("agent token"), "{name}: {body}");
        }
    }

    #[tokio::test]
    async fn the_caller_proof_limit_answers_before_the_gunzip_where_a_mode_has_one() {
        for (name, mode) in modes() {
            let d = tempfile::tempdir().unwrap();
            let a = app(d.path(), mode, false, true, false);
            let h = proof(name);
            assert_eq!(
                report(&a, "10.0.0.1:1", &h).await.0,
                StatusCode::BAD_REQUEST
            );
            let (st, body) = report(&a, "10.0.0.2:1", &h).await;
            if name == "shared" {
                // Nothing says who sent it: only the token and peer limits apply.
                assert_eq!(st, StatusCode::BAD_REQUEST, "{name}: {body}");
                continue;
            }
            assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{name}: {body}");
            assert!(body.contains("credential"), "{name}: {body}");
            if name == "tofu" {
                // Another box's credential is another bucket: a forger cannot spend its victim's.
                let other = [(
                    crate::identity::CREDENTIAL_HEADER,
                    "0123456789abcdef0123456789abcdef-box-b",
                )];
                assert_eq!(
                    report(&a, "10.0.0.2:1", &other).await.0,
                    StatusCode::BAD_REQUEST
                );
            }
        }
    }
}
