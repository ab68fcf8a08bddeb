//! What every handler shares: the collector's state, and the token check.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::{header, HeaderMap};
use phoenix_wire::Limits;

use crate::auth::{bearer, Caller, Role, Tokens};
use crate::fleet::Fleet;
use crate::reply::ApiError;
use crate::writer::WriterHandle;

#[derive(Debug)]
pub struct AppState {
    /// Who may speak for which instance id (`--identity`), and how many ids are kept.
    pub identity: Arc<crate::identity::Gate>,
    /// Each field's type per measurement.
    pub schema: crate::schema::Registry,
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
    /// What the fleet page links to (`--grafana-url`).
    pub page: crate::page::Settings,
}

pub type Shared = Arc<AppState>;

/// The caller, if its token belongs to one of `allowed`; else the 401/403/429 to answer with.
pub fn authorize(s: &AppState, headers: &HeaderMap, allowed: &[Role]) -> Result<Caller, ApiError> {
    let presented = bearer(
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    );
    let needs = || {
        let roles: Vec<&str> = allowed.iter().map(|r| r.name()).collect();
        roles.join(" or ")
    };
    // Refusals are logged by role and token label (e.g. `reader#1`), never the token itself.
    if presented.is_none() {
        tracing::warn!(status = 401, needs = %needs(), "refused a request without a bearer token");
        return Err(ApiError::Unauthorized {
            reason: "missing bearer token: send Authorization: Bearer <token>".into(),
            invalid_token: false,
        });
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
    if let Some(c) = s.tokens.check(presented, &Role::ALL) {
        tracing::warn!(status = 403, role = %c.role.name(), token = %c.token_name, needs = %needs(), "refused a token of the wrong role");
        return Err(ApiError::Forbidden(format!(
            "this token's role may not do this; needs a {} token",
            needs()
        )));
    }
    tracing::warn!(status = 401, needs = %needs(), "refused an unknown token");
    Err(ApiError::Unauthorized {
        reason: "invalid token".into(),
        invalid_token: true,
    })
}

/// Read a request body of at most `max` bytes (413 past it).
pub async fn read_body(req: Request, max: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(req.into_body(), max)
        .await
        .map_err(|_| {
            ApiError::PayloadTooLarge(format!(
                "request body over {max} bytes (--max-body); send smaller batches"
            ))
        })
}

/// Run `f`, which may wait for the fleet's lock (a queue pass over a large fleet holds it for
/// a while), without holding an async worker hostage: when a pass holds the lock, the worker
/// first hands its other tasks (readers, known agents, the accept loop) to another thread on
/// the multi-threaded runtime. Under a flood of reports this is what keeps
/// `GET /v1/instances` answering. When the lock is free, `f` runs in place: the hand-off
/// costs a thread wake-up and two context switches, and doing it for every report (three
/// times each) was a tenth of the collector's CPU (issue 16).
pub fn may_block<R>(fleet: &crate::fleet::Fleet, f: impl FnOnce() -> R) -> R {
    if !fleet.busy() {
        return f();
    }
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
