//! The HTTP error of the API, mapped to RFC 9457 problem details in one place.
//!
//! Error policy: handlers return [`ApiError`]; typed errors from lower layers convert into it
//! with `From`. Every variant has exactly one status and one stable snake_case `code`
//! ([`ApiError::status_code`], [`ApiError::code`]). An [`ApiError::Internal`] is logged with its
//! cause and answered as a bare 500: no SQL, no stack, no internal names ever reach a client.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

tokio::task_local! {
    /// The current request's id, set by [`crate::startup`]'s middleware so problem bodies
    /// can carry it without every handler passing it along.
    pub static REQUEST_ID: String;
}

/// One invalid field of a request.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { field: field.into(), message: message.into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("malformed request: {0}")]
    BadRequest(String),
    #[error("unauthenticated")]
    Unauthorized { code: &'static str, detail: String },
    #[error("forbidden")]
    Forbidden { code: &'static str, detail: String },
    #[error("not found")]
    NotFound,
    /// The route exists, the method does not (`Allow` lists the ones that do).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 404 with a more specific code than `not_found` (e.g. `no_price`: the market exists, its
    /// price does not yet).
    #[error("absent: {detail}")]
    Absent { code: &'static str, detail: String },
    #[error("conflict: {detail}")]
    Conflict { code: &'static str, detail: String },
    #[error("request body too large")]
    PayloadTooLarge,
    /// The body did not arrive within its time (`crate::json::BODY_TIMEOUT`).
    #[error("request body timed out")]
    RequestTimeout,
    #[error("unsupported media type")]
    UnsupportedMediaType,
    #[error("validation failed")]
    Validation { code: &'static str, errors: Vec<FieldError> },
    #[error("account locked")]
    Locked { retry_after_secs: u64 },
    #[error("rate limited")]
    RateLimited { retry_after_secs: u64 },
    #[error("dependency unavailable: {0}")]
    Unavailable(&'static str),
    /// The order engine is too far behind to take more orders now (see
    /// `crate::trading::backlog`): 503 `overloaded`, nothing was placed.
    #[error("overloaded: {queued} commands queued")]
    Overloaded { queued: u32 },
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::NotFound | ApiError::Absent { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Validation { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Locked { .. } => StatusCode::LOCKED,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) | ApiError::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "malformed_request",
            ApiError::Unauthorized { code, .. }
            | ApiError::Forbidden { code, .. }
            | ApiError::Conflict { code, .. }
            | ApiError::Absent { code, .. } => code,
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::Validation { code, .. } => code,
            ApiError::Locked { .. } => "account_locked",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Unavailable(_) => "service_unavailable",
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::Internal(_) => "internal_error",
        }
    }

    /// The human-readable explanation a client is shown (never an internal cause).
    pub fn detail(&self) -> String {
        match self {
            ApiError::BadRequest(detail) => detail.clone(),
            ApiError::Unauthorized { detail, .. }
            | ApiError::Forbidden { detail, .. }
            | ApiError::Conflict { detail, .. }
            | ApiError::Absent { detail, .. } => detail.clone(),
            ApiError::NotFound => "The resource does not exist.".to_owned(),
            ApiError::MethodNotAllowed => "This route does not take this method; see Allow.".to_owned(),
            ApiError::PayloadTooLarge => "The request body exceeds 64 KiB.".to_owned(),
            ApiError::RequestTimeout => "The request body did not arrive in time.".to_owned(),
            ApiError::UnsupportedMediaType => "Send the body as application/json.".to_owned(),
            ApiError::Validation { .. } => "The request has invalid fields.".to_owned(),
            ApiError::Locked { .. } => "Too many failed attempts; the account is locked for a while.".to_owned(),
            ApiError::RateLimited { .. } => "Too many requests; slow down.".to_owned(),
            ApiError::Unavailable(what) => {
                format!("A dependency is unavailable ({what}); retry shortly.")
            }
            ApiError::Overloaded { queued } => format!(
                "The order engine is behind ({queued} commands queued before yours would be); nothing was \
                 placed. Retry shortly; cancels are still taken."
            ),
            ApiError::Internal(_) => "Something went wrong on our side; it has been logged.".to_owned(),
        }
    }

    /// A validation error about one field.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        ApiError::Validation { code: "validation_failed", errors: vec![FieldError::new(field, message)] }
    }
}

/// The problem-details body (RFC 9457).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    #[schema(example = "urn:cryptovault:problem:validation_failed")]
    pub kind: String,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    pub code: &'static str,
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(cause) = &self {
            tracing::error!(error = format!("{cause:#}"), "internal error");
        }
        let status = self.status_code();
        let problem = Problem {
            kind: format!("urn:cryptovault:problem:{}", self.code()),
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail: self.detail(),
            code: self.code(),
            request_id: REQUEST_ID.try_with(Clone::clone).ok(),
            errors: match &self {
                ApiError::Validation { errors, .. } => errors.clone(),
                _ => Vec::new(),
            },
        };
        let mut response = (status, Json(problem)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        let retry_after = match &self {
            ApiError::Locked { retry_after_secs } | ApiError::RateLimited { retry_after_secs } => {
                Some(*retry_after_secs)
            }
            ApiError::Unavailable(_) | ApiError::Overloaded { .. } => Some(1),
            _ => None,
        };
        if let Some(secs) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if matches!(self, ApiError::RequestTimeout) {
            // The rest of the body may still be on its way: the connection cannot carry another
            // request (RFC 9110 §15.5.9).
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// Database errors are internal unless a caller maps them first (e.g. a unique violation).
///
/// Two classes are not: a database that is away or busy ([`vault_core::db::is_transient`]: no
/// connection, a session Postgres ended in a restart or failover (57P01), a deadlock, a read-only
/// node after a failover…) is 503 with `Retry-After`, as an unreachable one is — it was a 500,
/// which tells the client its request was at fault; and text Postgres cannot store (a NUL
/// character: SQLSTATE 22021) is the client's. Handlers refuse that on the fields they know;
/// this is the net under them, so a field someone forgets answers 422, not 500.
impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) => {
                tracing::warn!(error = %err, "postgres unavailable");
                ApiError::Unavailable("database")
            }
            sqlx::Error::Database(_) if vault_core::db::is_transient(&err) => {
                tracing::warn!(error = %err, "postgres away or busy");
                ApiError::Unavailable("database")
            }
            sqlx::Error::Database(db) if db.code().as_deref() == Some("22021") => {
                tracing::warn!(error = %db, "request text Postgres cannot store; refused");
                ApiError::Validation {
                    code: "validation_failed",
                    errors: vec![FieldError::new("", "text must not contain NUL characters")],
                }
            }
            other => ApiError::Internal(other.into()),
        }
    }
}
