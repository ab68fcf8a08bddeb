//! Every error answer the HTTP API gives, as one type: [`ApiError`].
//!
//! Handlers return `Result<_, ApiError>` and use `?`; the one [`IntoResponse`] below turns a
//! refusal into its status, a JSON body `{"error": "<reason>"}` whose reason tells the caller
//! what to do, and the headers the status calls for (`Retry-After`, `WWW-Authenticate`).
//! Keeping them in one place means a 429 can never go out without its `Retry-After`.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Why a request was refused. The `Display` text is the `error` of the JSON body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 400: the request itself is wrong; the reason says how.
    #[error("{0}")]
    BadRequest(String),
    /// 401: no token, or one the collector does not know. `invalid_token` tells a client
    /// that sent one that retrying with the same token is pointless.
    #[error("{reason}")]
    Unauthorized { reason: String, invalid_token: bool },
    /// 403: a known caller that may not do this.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 408: the request was not received and answered within `--request-timeout`.
    #[error("{0}")]
    RequestTimeout(String),
    /// 409: it clashes with the current state (e.g. a diagnostics request already pending).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 429: retry after `retry_after`.
    #[error("{reason}")]
    TooManyRequests {
        retry_after: Duration,
        reason: String,
    },
    /// 503: the collector cannot take this now (its store is down, it is stopping); the
    /// caller keeps what it sent and retries after `retry_after`.
    #[error("{reason}")]
    Unavailable {
        retry_after: Duration,
        reason: String,
    },
}

impl ApiError {
    pub fn bad_request(reason: impl Into<String>) -> ApiError {
        ApiError::BadRequest(reason.into())
    }

    pub fn unavailable(retry_after: Duration, reason: impl Into<String>) -> ApiError {
        ApiError::Unavailable {
            retry_after,
            reason: reason.into(),
        }
    }

    pub fn too_many(retry_after: Duration, reason: impl Into<String>) -> ApiError {
        ApiError::TooManyRequests {
            retry_after,
            reason: reason.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `Retry-After` it carries, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::TooManyRequests { retry_after, .. }
            | ApiError::Unavailable { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

/// Whole seconds for `Retry-After`, rounded up (retrying early only earns another refusal)
/// and at least 1 (HTTP has no finer unit, and 0 invites a busy loop).
pub fn retry_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let retry = self.retry_after();
        let challenge = match &self {
            ApiError::Unauthorized {
                invalid_token: true,
                ..
            } => Some("Bearer error=\"invalid_token\""),
            ApiError::Unauthorized { .. } => Some("Bearer"),
            _ => None,
        };
        let mut r = (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response();
        if let Some(d) = retry {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_secs(d)));
        }
        if let Some(c) = challenge {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(c));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(r: Response) -> serde_json::Value {
        let b = axum::body::to_bytes(r.into_body(), 4096).await.unwrap();
        serde_json::from_slice(&b).unwrap()
    }

    #[tokio::test]
    async fn each_refusal_has_its_status_body_and_headers() {
        let r = ApiError::too_many(Duration::from_millis(1500), "slow down").into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        assert_eq!(body(r).await["error"], "slow down");

        let r = ApiError::unavailable(Duration::ZERO, "store down").into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");

        let r = ApiError::Unauthorized {
            reason: "invalid token".into(),
            invalid_token: true,
        }
        .into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            r.headers()[header::WWW_AUTHENTICATE],
            "Bearer error=\"invalid_token\""
        );
        assert!(!r.headers().contains_key(header::RETRY_AFTER));

        let r = ApiError::bad_request("no such field").into_response();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert!(!r.headers().contains_key(header::WWW_AUTHENTICATE));
        assert_eq!(body(r).await, serde_json::json!({"error": "no such field"}));
    }
}
