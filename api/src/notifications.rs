//! In-app notifications and webhook registrations: the API side of what `vault-worker notify`
//! writes (`notifications`, `webhooks`, `webhook_deliveries`, see migration 0005).
//!
//! Webhook URLs must be http(s) and resolve only to public addresses (the same rule the
//! delivery worker applies again before every attempt, against DNS rebinding), unless
//! `WEBHOOK_ALLOW_PRIVATE=true`. A name that does not resolve and one that resolves to a refused
//! address get the same answer, so registration cannot be used to map internal DNS. The signing
//! secret (256 random bits, hex) is shown once, at registration. Every route acts only on the
//! caller's own rows: anyone else's id is a 404.
//!
//! A user has at most 10 live webhooks ([`WEBHOOKS`]) (409 `too_many_webhooks` beyond):
//! every event becomes one delivery per matching webhook, and the notifier's fair claim bounds
//! what one user's receivers hold per process, not how many rows they queue.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::caller::{Reader, SessionCaller};
use crate::error::{ApiError, FieldError, Problem};
use crate::json::ApiJson;
use crate::pagination::{ApiQuery, Cursor, Page};
use crate::path::ResourceId;
use crate::quota::Quota;
use crate::startup::AppState;

/// The event types a webhook may subscribe to (`API.md`).
pub const EVENT_TYPES: [&str; 8] = [
    "order.accepted",
    "order.filled",
    "order.canceled",
    "order.rejected",
    "order.expired",
    "deposit.completed",
    "auth.login",
    "auth.locked",
];

/// Live (not deleted) webhooks one user may have. Lock class "WHKS".
pub const WEBHOOKS: Quota = Quota {
    lock_class: 0x5748_4B53,
    count_live: "SELECT count(*) FROM webhooks WHERE user_id = $1 AND deleted_at IS NULL",
    most: 10,
    code: "too_many_webhooks",
    detail: "An account may have at most 10 webhooks; delete one first.",
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/notifications", get(list_notifications))
        .route("/notifications/{id}/read", post(mark_read))
        .route("/webhooks", post(create_webhook).get(list_webhooks))
        .route("/webhooks/{id}", delete(delete_webhook))
        .route("/webhooks/{id}/deliveries", get(list_deliveries))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct NotificationFilter {
    /// Only unread ones.
    pub unread: Option<bool>,
    /// 1..500, default 100.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    #[param(value_type = Option<Cursor>)]
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct Notification {
    pub id: Uuid,
    pub kind: String,
    pub title: String,
    pub body: String,
    pub data: serde_json::Value,
    #[serde(serialize_with = "vault_core::time::micros_opt")]
    pub read_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "vault_core::time::micros")]
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NotificationPage {
    pub notifications: Vec<Notification>,
    pub next_cursor: Option<String>,
}

/// The caller's notifications, newest first.
#[utoipa::path(get, path = "/api/v1/notifications", tag = "notifications", security(("bearer" = []), ("api_key" = [])),
    params(NotificationFilter), responses((status = 200, body = NotificationPage), (status = 422, body = Problem)))]
pub async fn list_notifications(
    State(state): State<AppState>,
    Reader(caller): Reader,
    ApiQuery(filter): ApiQuery<NotificationFilter>,
) -> Result<axum::Json<NotificationPage>, ApiError> {
    let page = Page::parse(filter.limit, filter.cursor.as_deref())?;
    let mut notifications: Vec<Notification> = sqlx::query_as(
        "SELECT id, kind, title, body, data, read_at, created_at FROM notifications
          WHERE user_id = $1 AND (NOT $2 OR read_at IS NULL) AND ($3::UUID IS NULL OR id < $3)
          ORDER BY id DESC LIMIT $4",
    )
    .bind(caller.user_id)
    .bind(filter.unread.unwrap_or(false))
    .bind(page.before)
    .bind(page.fetch_limit())
    .fetch_all(&state.pool)
    .await?;
    let next_cursor = page.finish(&mut notifications, |n| n.id);
    Ok(axum::Json(NotificationPage { notifications, next_cursor }))
}

/// Mark one of the caller's notifications read (idempotent).
#[utoipa::path(post, path = "/api/v1/notifications/{id}/read", tag = "notifications", security(("bearer" = []), ("api_key" = [])),
    params(("id" = Uuid, Path)), responses((status = 204), (status = 404, body = Problem)))]
pub async fn mark_read(
    State(state): State<AppState>,
    Reader(caller): Reader,
    ResourceId(id): ResourceId,
) -> Result<StatusCode, ApiError> {
    let found =
        sqlx::query("UPDATE notifications SET read_at = COALESCE(read_at, now()) WHERE id = $1 AND user_id = $2")
            .bind(id)
            .bind(caller.user_id)
            .execute(&state.pool)
            .await?
            .rows_affected();
    if found == 0 { Err(ApiError::NotFound) } else { Ok(StatusCode::NO_CONTENT) }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhookRequest {
    /// http(s) URL resolving to public addresses; at most 2048 characters, no whitespace.
    #[schema(max_length = 2048, pattern = r"^https?://\S+$")]
    pub url: String,
    /// A non-empty subset of the event types (repeats are ignored).
    #[schema(value_type = Vec<WebhookEventType>, min_items = 1)]
    pub events: Vec<String>,
}

/// An event type a webhook may subscribe to ([`EVENT_TYPES`]).
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // The document's enum; requests carry the strings.
enum WebhookEventType {
    #[schema(rename = "order.accepted")]
    OrderAccepted,
    #[schema(rename = "order.filled")]
    OrderFilled,
    #[schema(rename = "order.canceled")]
    OrderCanceled,
    #[schema(rename = "order.rejected")]
    OrderRejected,
    #[schema(rename = "order.expired")]
    OrderExpired,
    #[schema(rename = "deposit.completed")]
    DepositCompleted,
    #[schema(rename = "auth.login")]
    AuthLogin,
    #[schema(rename = "auth.locked")]
    AuthLocked,
}

/// A new webhook: `secret` signs every delivery and is shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedWebhook {
    pub id: Uuid,
    pub url: String,
    pub events: Vec<String>,
    pub secret: String,
    #[serde(serialize_with = "vault_core::time::micros")]
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct Webhook {
    pub id: Uuid,
    pub url: String,
    pub events: Vec<String>,
    #[serde(serialize_with = "vault_core::time::micros")]
    pub created_at: DateTime<Utc>,
    /// Failed attempts in a row since the last delivered one, across the webhook's deliveries (a
    /// streak whose last failure is a day old starts again at the next failure).
    pub consecutive_failures: i32,
    /// Set while the webhook is paused after failing again and again (null once the pause is
    /// over): its deliveries wait, without spending attempts, and are tried again from then on.
    #[serde(serialize_with = "vault_core::time::micros_opt")]
    pub paused_until: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookList {
    pub webhooks: Vec<Webhook>,
}

/// The answer for a host that does not resolve or resolves to an address that may not receive
/// webhooks (the same for both: see the module's documentation).
pub const UNUSABLE_HOST: &str = "must name a host that resolves, and only to public addresses (private, loopback, link-local and reserved ones may not receive webhooks)";

/// Checks the URL's shape and that every address it resolves to may receive webhooks.
async fn check_url(raw: &str, allow_private: bool) -> Result<String, FieldError> {
    let bad = |m: &str| FieldError::new("url", m);
    // Exactly what the document's pattern says: `http://` or `https://` as written, no
    // whitespace anywhere (not trimmed: a URL with a stray space is a mistake to point out).
    let shaped = (raw.starts_with("http://") || raw.starts_with("https://")) && !raw.chars().any(char::is_whitespace);
    if !shaped || raw.chars().count() > 2048 {
        return Err(bad("must be an http(s) URL of at most 2048 characters, without spaces"));
    }
    let uri: axum::http::Uri = raw.parse().map_err(|_| bad("must be an absolute http(s) URL"))?;
    let scheme = uri.scheme_str().unwrap_or_default();
    let authority = uri.authority().ok_or_else(|| bad("must name a host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("must not carry credentials"));
    }
    if authority.host().is_empty() {
        return Err(bad("must name a host"));
    }
    // A port that is not a number from 0 to 65535 is refused, not replaced by the default.
    if authority.port().is_some() && authority.port_u16().is_none() {
        return Err(bad("has an invalid port"));
    }
    let host = authority.host().trim_matches(['[', ']']).to_owned();
    let port = authority.port_u16().unwrap_or(if scheme == "https" { 443 } else { 80 });
    if !allow_private {
        // One answer whether the name does not resolve or resolves to a refused address: two
        // would tell a user which internal names exist (`db.internal` vs `nope.internal`).
        let unusable = || bad(UNUSABLE_HOST);
        let addrs: Vec<std::net::SocketAddr> =
            tokio::net::lookup_host((host.as_str(), port)).await.map_err(|_| unusable())?.collect();
        if addrs.is_empty() || addrs.iter().any(|a| vault_core::net::refusal(a.ip()).is_some()) {
            return Err(unusable());
        }
    }
    // The URL is stored as the parser prints it, which can be longer than what was sent
    // (`https://host` gains a `/`): the limit holds for the stored form too.
    let url = uri.to_string();
    if url.chars().count() > 2048 {
        return Err(bad("must be an http(s) URL of at most 2048 characters, without spaces"));
    }
    Ok(url)
}

/// Register a webhook; a user has at most 10 (409 `too_many_webhooks` beyond: delete one first).
#[utoipa::path(post, path = "/api/v1/webhooks", tag = "notifications", security(("bearer" = [])),
    request_body = CreateWebhookRequest,
    responses((status = 201, body = CreatedWebhook), (status = 403, description = "session_required", body = Problem),
              (status = 409, description = "too_many_webhooks", body = Problem),
              (status = 422, body = Problem)))]
pub async fn create_webhook(
    State(state): State<AppState>,
    // A webhook is a credential: its secret signs what it receives, and it can receive the
    // user's login events. An API key (whose revocation does not reach webhooks) makes none.
    SessionCaller(caller): SessionCaller,
    ApiJson(body): ApiJson<CreateWebhookRequest>,
) -> Result<(StatusCode, axum::Json<CreatedWebhook>), ApiError> {
    let mut errors = Vec::new();
    let mut events = body.events.clone();
    events.sort();
    events.dedup();
    if events.is_empty() || events.iter().any(|e| !EVENT_TYPES.contains(&e.as_str())) {
        errors.push(FieldError::new("events", format!("must be a non-empty subset of {}", EVENT_TYPES.join(", "))));
    }
    let url = check_url(&body.url, state.settings.webhook_allow_private).await.map_err(|e| errors.push(e)).ok();
    let Some(url) = url.filter(|_| errors.is_empty()) else {
        return Err(ApiError::Validation { code: "validation_failed", errors });
    };
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let id = Uuid::now_v7();
    let mut tx = state.pool.begin().await?;
    WEBHOOKS.hold(&mut tx, caller.user_id).await?;
    let created_at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO webhooks (id, user_id, url, events, secret) VALUES ($1, $2, $3, $4, $5) RETURNING created_at",
    )
    .bind(id)
    .bind(caller.user_id)
    .bind(&url)
    .bind(&events)
    .bind(&secret)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, axum::Json(CreatedWebhook { id, url, events, secret, created_at })))
}

/// The caller's webhooks (never their secrets).
#[utoipa::path(get, path = "/api/v1/webhooks", tag = "notifications", security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = WebhookList)))]
pub async fn list_webhooks(
    State(state): State<AppState>,
    Reader(caller): Reader,
) -> Result<axum::Json<WebhookList>, ApiError> {
    let webhooks: Vec<Webhook> = sqlx::query_as(
        "SELECT id, url, events, created_at, consecutive_failures,
                CASE WHEN paused_until > now() THEN paused_until END AS paused_until
           FROM webhooks WHERE user_id = $1 AND deleted_at IS NULL ORDER BY id DESC",
    )
    .bind(caller.user_id)
    .fetch_all(&state.pool)
    .await?;
    Ok(axum::Json(WebhookList { webhooks }))
}

/// Delete one of the caller's webhooks; its pending deliveries end failed.
#[utoipa::path(delete, path = "/api/v1/webhooks/{id}", tag = "notifications", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses((status = 204), (status = 403, description = "session_required", body = Problem), (status = 404, body = Problem)))]
pub async fn delete_webhook(
    State(state): State<AppState>,
    SessionCaller(caller): SessionCaller,
    ResourceId(id): ResourceId,
) -> Result<StatusCode, ApiError> {
    let found =
        sqlx::query("UPDATE webhooks SET deleted_at = now() WHERE id = $1 AND user_id = $2 AND deleted_at IS NULL")
            .bind(id)
            .bind(caller.user_id)
            .execute(&state.pool)
            .await?
            .rows_affected();
    if found == 0 { Err(ApiError::NotFound) } else { Ok(StatusCode::NO_CONTENT) }
}

#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct Delivery {
    pub id: Uuid,
    /// The event type.
    #[sqlx(rename = "event_type")]
    pub event: String,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    pub attempts: i32,
    pub last_status_code: Option<i32>,
    #[serde(serialize_with = "vault_core::time::micros_opt")]
    pub next_attempt_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryList {
    pub deliveries: Vec<Delivery>,
    /// The cursor of the next (older) page; `null` on the last one.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeliveryFilter {
    /// 1..500, default 100.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    #[param(value_type = Option<Cursor>)]
    pub cursor: Option<String>,
}

/// The deliveries of one of the caller's webhooks, newest first, a page at a time.
#[utoipa::path(get, path = "/api/v1/webhooks/{id}/deliveries", tag = "notifications", security(("bearer" = []), ("api_key" = [])),
    params(("id" = Uuid, Path), DeliveryFilter),
    responses((status = 200, body = DeliveryList), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn list_deliveries(
    State(state): State<AppState>,
    Reader(caller): Reader,
    ResourceId(id): ResourceId,
    ApiQuery(filter): ApiQuery<DeliveryFilter>,
) -> Result<axum::Json<DeliveryList>, ApiError> {
    let page = Page::parse(filter.limit, filter.cursor.as_deref())?;
    // A deleted webhook is gone for this route too, as for a second delete and the list.
    let mine: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM webhooks WHERE id = $1 AND user_id = $2 AND deleted_at IS NULL")
            .bind(id)
            .bind(caller.user_id)
            .fetch_optional(&state.pool)
            .await?;
    mine.ok_or(ApiError::NotFound)?;
    let mut deliveries: Vec<Delivery> = sqlx::query_as(
        "SELECT id, event_type, status, attempts, last_status_code,
                CASE WHEN status = 'pending' THEN next_attempt_at END AS next_attempt_at
           FROM webhook_deliveries WHERE webhook_id = $1 AND ($2::UUID IS NULL OR id < $2)
          ORDER BY id DESC LIMIT $3",
    )
    .bind(id)
    .bind(page.before)
    .bind(page.fetch_limit())
    .fetch_all(&state.pool)
    .await?;
    // Pages, as every list has (the first 100 used to be all there was).
    let next_cursor = page.finish(&mut deliveries, |d| d.id);
    Ok(axum::Json(DeliveryList { deliveries, next_cursor }))
}
