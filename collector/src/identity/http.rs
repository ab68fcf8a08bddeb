//! `DELETE /v1/instances/{id}/enrolment`: forget a tofu enrolment, for a box whose state dir
//! (and with it its credential) was wiped. Audited: a reset opens the id to the next sender.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use serde_json::json;

use crate::app::{authorize, Shared};
use crate::auth::Role;
use crate::reply::ApiError;

pub async fn delete_enrolment(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = authorize(&s, &headers, &[Role::Recycler, Role::Reader])?;
    let gate = s.identity.clone();
    let id2 = id.clone();
    // The store fsyncs: off the async threads.
    let done = tokio::task::spawn_blocking(move || gate.reset(&id2)).await;
    match done {
        Ok(Ok(true)) => {
            tracing::warn!(instance_id = %id, token = %caller.token_name, "enrolment reset: the next report for this id enrols it");
            crate::audit::record(
                &s.writer,
                "enrolment_reset",
                &caller.token_name,
                &id,
                "enrolment reset; the next report for this id enrols it",
            );
            Ok(Json(json!({ "instance_id": id, "reset": true })))
        }
        Ok(Ok(false)) => Err(ApiError::NotFound(format!(
            "instance {id:?} is not enrolled here (nothing to reset)"
        ))),
        Ok(Err(e)) => Err(ApiError::unavailable(
            std::time::Duration::from_secs(5),
            format!("cannot record the reset: {e}"),
        )),
        Err(_) => Err(ApiError::unavailable(
            std::time::Duration::from_secs(5),
            "reset failed",
        )),
    }
}

/// [`super::Gate::admit`] for a request's headers. A known id is checked in place (a hash
/// and a map lookup); a new one may enrol, and enrolling fsyncs the store: that runs on the
/// blocking pool, so a flood of new ids never holds the async threads that serve known
/// agents and readers.
pub async fn admit(
    gate: &std::sync::Arc<super::Gate>,
    instance_id: &str,
    headers: &HeaderMap,
    now_ms: i64,
) -> Result<super::Admitted, super::Refusal> {
    if gate.is_known(instance_id) || gate.mode() != super::ModeName::Tofu {
        return gate.admit(
            instance_id,
            &super::Presented::from_headers(headers),
            now_ms,
        );
    }
    let (g, id, h) = (gate.clone(), instance_id.to_owned(), headers.clone());
    tokio::task::spawn_blocking(move || g.admit(&id, &super::Presented::from_headers(&h), now_ms))
        .await
        .unwrap_or_else(|_| {
            Err(super::Refusal::Store(
                "the enrolment was interrupted; retry".into(),
            ))
        })
}
