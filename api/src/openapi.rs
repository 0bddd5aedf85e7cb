//! The OpenAPI 3.1 document, generated from the handlers' annotations (utoipa), served at
//! `/api/v1/openapi.json`, and a docs page rendered from it at `/api/v1/docs`.
//!
//! The docs page is plain server-rendered HTML with no scripts and no external assets, so it
//! works offline and under a strict Content-Security-Policy.

use std::fmt::Write;
use std::sync::OnceLock;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use crate::trading::{account, markets, orders};
use crate::{admin, auth, error, notifications, pagination, trading, ws};

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "CryptoVault API", version = "1", description = "Paper-trading crypto brokerage. Decimals are strings; errors are RFC 9457 problem details."),
    paths(
        auth::signup, auth::login, auth::refresh, auth::logout, auth::change_password, auth::me, auth::totp_setup,
        auth::totp_enable,
        auth::create_api_key, auth::list_api_keys, auth::revoke_api_key,
        markets::list_markets, markets::ticker, markets::candles,
        account::deposit, account::portfolio, account::ledger,
        orders::place_order, orders::list_orders, orders::get_order, orders::get_order_by_client_id,
        orders::cancel_order, orders::cancel_all, orders::list_fills,
        admin::list_users, admin::lock_user, admin::unlock_user, admin::reset_totp, admin::audit, admin::queues,
        notifications::list_notifications, notifications::mark_read, notifications::create_webhook,
        notifications::list_webhooks, notifications::delete_webhook, notifications::list_deliveries, admin::halt_market, admin::resume_market,
        ws::upgrade,
        health, readyz, metrics, openapi_json, docs,
    ),
    components(schemas(error::Problem, error::FieldError, auth::caller::Scope,
        trading::OrderDoc, trading::FillDoc, trading::DepositDoc,
        // Query parameter schemas (utoipa collects the schemas of bodies, not of parameters).
        pagination::Cursor, pagination::SeqCursor, markets::CandleInterval)),
    modifiers(&Security, &CommonResponses),
    tags((name = "auth", description = "Accounts, sessions, 2FA and API keys"),
         (name = "markets", description = "Markets and their latest prices (public)"),
         (name = "orders", description = "Placing, reading and canceling orders; fills"),
         (name = "account", description = "Deposits, portfolio and ledger"),
         (name = "notifications", description = "In-app notifications and webhooks"),
         (name = "streaming", description = "The WebSocket feed: prices, your orders and notifications, live"),
         (name = "admin", description = "Administration (role admin)"),
         (name = "ops", description = "Health, readiness, metrics and this document")),
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
        components
            .add_security_scheme("api_key", SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))));
    }
}

/// The answers every operation of a kind can give, added to each so the document is complete
/// (the schemathesis run in `tests/schemathesis.rs` fails on any undocumented status or content
/// type), and problem bodies typed `application/problem+json` as they are sent:
///
/// - every `/api/v1` route: 429 `rate_limited` (every route is behind a limiter) and, except the
///   static document routes, 503 `service_unavailable` (Postgres or NATS down);
/// - routes with security: 401 (missing, invalid, expired or revoked credentials) and 403
///   (an API key without the scope, or on a route that needs a session; not an admin);
/// - routes with a body: 400, 408, 413, 415 and 422 (see `crate::json`);
/// - routes with query parameters: 422 (unknown or malformed parameter).
///
/// An operation's own description of a status wins; only missing ones are added.
struct CommonResponses;

/// The media type of every error body (RFC 9457).
pub const PROBLEM_JSON: &str = "application/problem+json";

impl Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::ParameterIn;
        for (path, item) in openapi.paths.paths.iter_mut() {
            let api = path.starts_with("/api/v1/");
            let static_doc = path.ends_with("/openapi.json") || path.ends_with("/docs");
            for op in
                [&mut item.get, &mut item.post, &mut item.put, &mut item.patch, &mut item.delete].into_iter().flatten()
            {
                let responses = &mut op.responses.responses;
                for response in responses.values_mut() {
                    if let RefOr::T(response) = response {
                        type_problem_bodies(response);
                    }
                }
                let mut add = |status: &str, description: &str, retry_after: bool| {
                    responses.entry(status.to_owned()).or_insert_with(|| problem(description, retry_after));
                };
                if api {
                    add("429", "rate_limited: too many requests (Retry-After)", true);
                    if !static_doc {
                        add("503", "service_unavailable: Postgres or NATS is down (Retry-After)", true);
                    }
                }
                if op.security.as_ref().is_some_and(|s| !s.is_empty()) {
                    add("401", "unauthenticated, invalid_token, token_revoked or invalid_api_key", false);
                    add("403", "insufficient_scope or session_required (an API key), forbidden (not an admin)", false);
                }
                if op.request_body.is_some() {
                    add("400", "malformed_request: the body is not JSON", false);
                    add("408", "request_timeout: the body did not arrive within 10 s", false);
                    add("413", "payload_too_large: the body is over 64 KiB", false);
                    add("415", "unsupported_media_type: the body is not application/json", false);
                    add("422", "validation_failed: errors[] names each invalid field", false);
                }
                let has_query = op.parameters.iter().flatten().any(|p| matches!(p.parameter_in, ParameterIn::Query));
                if has_query {
                    add("422", "validation_failed: an unknown or malformed query parameter", false);
                }
            }
        }
    }
}

/// Moves a `Problem` body from `application/json` to `application/problem+json`.
fn type_problem_bodies(response: &mut utoipa::openapi::Response) {
    let is_problem =
        |content: &Content| matches!(&content.schema, Some(RefOr::Ref(r)) if r.ref_location.ends_with("/Problem"));
    if response.content.get("application/json").is_some_and(is_problem)
        && let Some(content) = response.content.shift_remove("application/json")
    {
        response.content.insert(PROBLEM_JSON.to_owned(), content);
    }
}

/// A problem-details answer.
fn problem(description: &str, retry_after: bool) -> RefOr<utoipa::openapi::Response> {
    let mut response = ResponseBuilder::new()
        .description(description)
        .content(PROBLEM_JSON, ContentBuilder::new().schema(Some(Ref::from_schema_name("Problem"))).build());
    if retry_after {
        response = response.header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(1)))
                .description(Some("Seconds to wait before trying again"))
                .build(),
        );
    }
    RefOr::T(response.build())
}

fn document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document serializes");
        refine(&mut doc);
        serde_json::to_string_pretty(&doc).expect("the OpenAPI document serializes")
    })
}

/// What utoipa's model of JSON Schema lacks, added to the generated document.
fn refine(doc: &mut serde_json::Value) {
    // `["read"]` or `["read", "trade"]`: whatever the order, "read" is in it (`contains`).
    if let Some(scopes) = doc.pointer_mut("/components/schemas/CreateApiKeyRequest/properties/scopes") {
        scopes["contains"] = serde_json::json!({"const": "read"});
    }
}

/// Liveness: 200 while the process lives.
#[utoipa::path(get, path = "/health", tag = "ops", responses((status = 200, description = "alive")))]
#[allow(dead_code)]
fn health() {}

/// Readiness: 200 when Postgres and NATS work, else 503 naming what is down.
#[utoipa::path(get, path = "/readyz", tag = "ops", responses((status = 200, description = "ready"), (status = 503, description = "a dependency is down")))]
#[allow(dead_code)]
fn readyz() {}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, description = "Prometheus text", content_type = "text/plain")))]
#[allow(dead_code)]
fn metrics() {}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "ops", responses((status = 200, description = "OpenAPI 3.1 JSON")))]
pub async fn openapi_json() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], document()).into_response()
}

/// Human-readable API reference.
#[utoipa::path(get, path = "/api/v1/docs", tag = "ops", responses((status = 200, description = "HTML", content_type = "text/html")))]
pub async fn docs() -> Response {
    static PAGE: OnceLock<String> = OnceLock::new();
    let page = PAGE.get_or_init(|| render(document()));
    let mut response = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page.as_str()).into_response();
    // Inline styles only; still no scripts, frames or external loads.
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
    );
    response
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Renders the document as one HTML page: every operation with its parameters, body and answers.
fn render(json: &str) -> String {
    let doc: serde_json::Value = serde_json::from_str(json).expect("our own document is JSON");
    let mut html = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>CryptoVault API</title><style>\
         body{font:15px/1.5 system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}\
         code,.m{font-family:ui-monospace,monospace}.op{border-top:1px solid #ddd;padding:.6em 0}\
         .m{display:inline-block;width:4.5em;font-weight:bold}.s{color:#555}</style></head><body>",
    );
    let _ = write!(
        html,
        "<h1>{}</h1><p>{}</p><p>Machine-readable: <a href=\"/api/v1/openapi.json\">openapi.json</a></p>",
        escape(doc["info"]["title"].as_str().unwrap_or("API")),
        escape(doc["info"]["description"].as_str().unwrap_or(""))
    );
    if let Some(paths) = doc["paths"].as_object() {
        for (path, item) in paths {
            for method in ["get", "post", "put", "patch", "delete"] {
                let Some(op) = item.get(method) else { continue };
                let _ = write!(
                    html,
                    "<div class=\"op\"><span class=\"m\">{}</span><code>{}</code> — {}",
                    method.to_uppercase(),
                    escape(path),
                    escape(op["summary"].as_str().or(op["description"].as_str()).unwrap_or(""))
                );
                if let Some(body) = op["requestBody"]["content"]["application/json"]["schema"]["$ref"].as_str() {
                    let _ = write!(
                        html,
                        "<div class=\"s\">body: <code>{}</code></div>",
                        escape(body.rsplit('/').next().unwrap_or(body))
                    );
                }
                if let Some(params) = op["parameters"].as_array() {
                    let names: Vec<String> = params.iter().filter_map(|p| p["name"].as_str()).map(escape).collect();
                    let _ = write!(html, "<div class=\"s\">parameters: <code>{}</code></div>", names.join(", "));
                }
                if let Some(responses) = op["responses"].as_object() {
                    let codes: Vec<String> = responses
                        .iter()
                        .map(|(code, r)| format!("{code} {}", escape(r["description"].as_str().unwrap_or(""))))
                        .collect();
                    let _ = write!(html, "<div class=\"s\">answers: {}</div>", codes.join(" · "));
                }
                html.push_str("</div>");
            }
        }
    }
    html.push_str("</body></html>");
    html
}
