//! Response hardening for every route: security headers and CORS.
//!
//! - Security headers of `API.md`: HSTS, `nosniff`, `X-Frame-Options: DENY`,
//!   `Content-Security-Policy: default-src 'none'` (a route may set its own, like the docs page),
//!   `Referrer-Policy: no-referrer`.
//! - CORS: only the origins of `CORS_ORIGINS` (no cookies are used, so no credentials). A
//!   preflight from any other origin is answered 403 with a problem body, so a misconfigured
//!   front end learns why at once instead of from a silent browser error.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use vault_core::config::CorsOrigins;

use crate::error::ApiError;

/// Adds the five security headers to every response of `router`; a route's own
/// `Content-Security-Policy` wins.
pub fn security_headers(router: Router) -> Router {
    router.layer(
        ServiceBuilder::new()
            .layer(SetResponseHeaderLayer::overriding(
                header::STRICT_TRANSPORT_SECURITY,
                HeaderValue::from_static("max-age=63072000; includeSubDomains"),
            ))
            .layer(SetResponseHeaderLayer::overriding(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ))
            .layer(SetResponseHeaderLayer::overriding(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")))
            .layer(SetResponseHeaderLayer::if_not_present(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
            ))
            .layer(SetResponseHeaderLayer::overriding(
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            )),
    )
}

/// The CORS layer for the configured origins (`*` only outside production: config refuses it there).
pub fn cors(origins: &CorsOrigins) -> CorsLayer {
    let allow = if origins.allows_any() {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.0.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("x-api-key"),
            HeaderName::from_static("x-request-id"),
            HeaderName::from_static("prefer"),
        ])
        .expose_headers([
            HeaderName::from_static("x-request-id"),
            HeaderName::from_static("x-ratelimit-limit"),
            HeaderName::from_static("x-ratelimit-remaining"),
            HeaderName::from_static("x-ratelimit-reset"),
            header::RETRY_AFTER,
            // Whether `Prefer: wait` was honoured (201 with the verdict) or not (202).
            HeaderName::from_static("preference-applied"),
        ])
        .max_age(Duration::from_secs(600))
}

/// Answers 403 to a CORS preflight from an origin that is not allowed.
pub async fn refuse_foreign_preflight(State(origins): State<Arc<CorsOrigins>>, req: Request, next: Next) -> Response {
    let is_preflight =
        req.method() == Method::OPTIONS && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if is_preflight && !origins.allows_any() {
        let origin = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !origins.0.iter().any(|o| o == origin) {
            return ApiError::Forbidden {
                code: "cors_origin_refused",
                detail: "This origin may not call the API from a browser.".to_owned(),
            }
            .into_response();
        }
    }
    next.run(req).await
}
