//! Administration: finding users, locking and unlocking accounts, halting and resuming markets.
//! Every route requires the `admin` role (403 otherwise); a lock also ends every session of the
//! user at once.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use vault_bus::message::AuthEventKind;
use vault_core::domain::Symbol;

use crate::auth::caller::{AdminReader, AdminSession, Caller};
use crate::auth::end_sessions;
use crate::error::{ApiError, Problem};
use crate::events::RequestMeta;
use crate::pagination::{ApiQuery, Cursor, Page, SeqCursor, SeqPage};
use crate::path::{PathText, ResourceId};
use crate::startup::AppState;
use crate::trading::MarketSymbol;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/users", get(list_users))
        .route("/admin/users/{id}/lock", post(lock_user))
        .route("/admin/users/{id}/unlock", post(unlock_user))
        .route("/admin/users/{id}/totp/reset", post(reset_totp))
        .route("/admin/audit", get(audit))
        .route("/admin/queues", get(queues))
        .route("/admin/markets/{symbol}/halt", post(halt_market))
        .route("/admin/markets/{symbol}/resume", post(resume_market))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UserFilter {
    /// Case-insensitive substring of the email (no NUL characters).
    #[param(pattern = "^[^\\x00]*$")]
    pub email: Option<String>,
    /// 1..500, default 100.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    #[param(value_type = Option<Cursor>)]
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct AdminUser {
    pub id: Uuid,
    pub email: String,
    pub name: Option<String>,
    pub role: String,
    pub totp_enabled: bool,
    pub failed_logins: i32,
    #[serde(serialize_with = "vault_core::time::micros_opt")]
    pub locked_until: Option<DateTime<Utc>>,
    #[serde(serialize_with = "vault_core::time::micros")]
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AdminUserList {
    pub users: Vec<AdminUser>,
    pub next_cursor: Option<String>,
}

/// Find users (newest first).
#[utoipa::path(get, path = "/api/v1/admin/users", tag = "admin", security(("bearer" = [])), params(UserFilter),
    responses((status = 200, body = AdminUserList), (status = 403, body = Problem)))]
pub async fn list_users(
    State(state): State<AppState>,
    AdminReader(_caller): AdminReader,
    ApiQuery(filter): ApiQuery<UserFilter>,
) -> Result<axum::Json<AdminUserList>, ApiError> {
    let page = Page::parse(filter.limit, filter.cursor.as_deref())?;
    if filter.email.as_deref().is_some_and(|e| e.contains('\0')) {
        return Err(ApiError::invalid("email", "must not contain NUL characters"));
    }
    let pattern =
        filter.email.map(|e| format!("%{}%", e.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")));
    let mut users: Vec<AdminUser> = sqlx::query_as(
        "SELECT id, email, name, role, totp_enabled, failed_logins, locked_until, created_at FROM users
          WHERE ($1::TEXT IS NULL OR email ILIKE $1) AND ($2::UUID IS NULL OR id < $2)
          ORDER BY id DESC LIMIT $3",
    )
    .bind(pattern)
    .bind(page.before)
    .bind(page.fetch_limit())
    .fetch_all(&state.pool)
    .await?;
    let next_cursor = page.finish(&mut users, |u| u.id);
    Ok(axum::Json(AdminUserList { users, next_cursor }))
}

/// Lock an account until unlocked (stored as the year 9999), and end its sessions. Its API keys
/// stop working while the lock lasts (a lockout from failed logins does not touch keys:
/// attackers could use it to stop a victim's trading bots).
#[utoipa::path(post, path = "/api/v1/admin/users/{id}/lock", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path)), responses((status = 204), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn lock_user(
    State(state): State<AppState>,
    meta: RequestMeta,
    AdminSession(caller): AdminSession,
    ResourceId(id): ResourceId,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.pool.begin().await?;
    let found = sqlx::query("UPDATE users SET locked_until = '9999-12-31T00:00:00Z', updated_at = now() WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if found == 0 {
        return Err(ApiError::NotFound);
    }
    let ended = end_sessions(&mut tx, id, None, "admin_lock").await?;
    let data = serde_json::json!({"admin": caller.user_id, "sessions_ended": ended});
    state.events.record(&mut tx, AuthEventKind::AdminUserLocked, Some(id), &meta, data).await?;
    state.events.commit(tx).await?;
    state.credentials.forget_user(id);
    tracing::warn!(admin = %caller.user_id, user_id = %id, "account locked by an administrator");
    Ok(StatusCode::NO_CONTENT)
}

/// Turn an account's 2FA off, for a user who lost their authenticator — or whose 2FA an
/// intruder holding a session turned on with a secret of their own, locking the owner out.
/// Every session of the account ends with it; the user logs in again with their password and
/// can enrol again.
#[utoipa::path(post, path = "/api/v1/admin/users/{id}/totp/reset", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path)), responses((status = 204), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn reset_totp(
    State(state): State<AppState>,
    meta: RequestMeta,
    AdminSession(caller): AdminSession,
    ResourceId(id): ResourceId,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.pool.begin().await?;
    let found = sqlx::query(
        "UPDATE users SET totp_enabled = false, totp_secret = NULL, totp_pending_secret = NULL, totp_last_step = NULL,
                updated_at = now()
          WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if found == 0 {
        return Err(ApiError::NotFound);
    }
    let ended = end_sessions(&mut tx, id, None, "totp_reset").await?;
    let data = serde_json::json!({"admin": caller.user_id, "sessions_ended": ended});
    state.events.record(&mut tx, AuthEventKind::TotpReset, Some(id), &meta, data).await?;
    state.events.commit(tx).await?;
    state.credentials.forget_user(id);
    tracing::warn!(admin = %caller.user_id, user_id = %id, "2FA turned off by an administrator");
    Ok(StatusCode::NO_CONTENT)
}

/// Unlock an account and reset its failure count.
#[utoipa::path(post, path = "/api/v1/admin/users/{id}/unlock", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path)), responses((status = 204), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn unlock_user(
    State(state): State<AppState>,
    meta: RequestMeta,
    AdminSession(caller): AdminSession,
    ResourceId(id): ResourceId,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.pool.begin().await?;
    let found =
        sqlx::query("UPDATE users SET locked_until = NULL, failed_logins = 0, updated_at = now() WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    if found == 0 {
        return Err(ApiError::NotFound);
    }
    let data = serde_json::json!({"admin": caller.user_id});
    state.events.record(&mut tx, AuthEventKind::AdminUserUnlocked, Some(id), &meta, data).await?;
    state.events.commit(tx).await?;
    tracing::warn!(admin = %caller.user_id, user_id = %id, "account unlocked by an administrator");
    Ok(StatusCode::NO_CONTENT)
}

/// Halt a market: from now on the engine rejects its orders `market_halted`. Idempotent.
#[utoipa::path(post, path = "/api/v1/admin/markets/{symbol}/halt", tag = "admin", security(("bearer" = [])),
    params(("symbol" = MarketSymbol, Path, example = "BTC-USD")),
    responses((status = 204), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn halt_market(
    State(state): State<AppState>,
    meta: RequestMeta,
    AdminSession(caller): AdminSession,
    PathText(symbol): PathText,
) -> Result<StatusCode, ApiError> {
    set_market_status(&state, &meta, &caller, &symbol, "halted").await
}

/// Resume trading on a halted market. Idempotent.
#[utoipa::path(post, path = "/api/v1/admin/markets/{symbol}/resume", tag = "admin", security(("bearer" = [])),
    params(("symbol" = MarketSymbol, Path, example = "BTC-USD")),
    responses((status = 204), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn resume_market(
    State(state): State<AppState>,
    meta: RequestMeta,
    AdminSession(caller): AdminSession,
    PathText(symbol): PathText,
) -> Result<StatusCode, ApiError> {
    set_market_status(&state, &meta, &caller, &symbol, "trading").await
}

/// Writes `markets.status` (one of the two things the API writes in the trading schema),
/// refreshes this replica's market cache and has the engines reload their rules, all before it
/// answers; other API replicas' caches follow within their refresh.
async fn set_market_status(
    state: &AppState,
    meta: &RequestMeta,
    caller: &Caller,
    symbol: &str,
    status: &str,
) -> Result<StatusCode, ApiError> {
    // Not a symbol (a NUL in it reached Postgres and came back as a 422 with no field): no such
    // market, as the public market routes answer.
    Symbol::parse(symbol).map_err(|_| ApiError::NotFound)?;
    let mut tx = state.pool.begin().await?;
    let found = sqlx::query("UPDATE markets SET status = $2, updated_at = now() WHERE symbol = $1")
        .bind(symbol)
        .bind(status)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if found == 0 {
        return Err(ApiError::NotFound);
    }
    let kind = if status == "halted" { AuthEventKind::AdminMarketHalted } else { AuthEventKind::AdminMarketResumed };
    let data = serde_json::json!({"admin": caller.user_id, "symbol": symbol});
    state.events.record(&mut tx, kind, Some(caller.user_id), meta, data).await?;
    state.events.commit(tx).await?;
    tracing::warn!(admin = %caller.user_id, symbol, status, "market status changed by an administrator");
    if let Err(e) = state.markets.refresh(&state.pool).await {
        tracing::warn!(error = %e, "market cache not refreshed; the periodic refresh will catch up");
    }
    // The engines reload the rules at once and answer: the 204 then means the market's next
    // orders are decided under the new status. With a partition unconfirmed (its engine down,
    // NATS down) the change is still made; engines read it within their 2 s refresh.
    if let Err(unconfirmed) = engines_reloaded(state.bus.client()).await {
        tracing::warn!(
            symbol,
            unconfirmed,
            "market change not confirmed for every partition; engines read it within 2 s"
        );
    }
    Ok(StatusCode::NO_CONTENT)
}

/// How long a halt or resume waits for the engines to confirm they reloaded the market rules.
const ENGINES_CONFIRM_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Asks every engine to reload the market rules, and waits until the engines that answered
/// (each names the partitions it serves) cover every partition, for at most
/// [`ENGINES_CONFIRM_WITHIN`]; `Err` names what was not confirmed. (A request takes the first
/// answer only, and the deployments run one engine per half of the partitions.)
async fn engines_reloaded(client: &async_nats::Client) -> Result<(), String> {
    use futures::StreamExt;
    use vault_core::config::{PARTITIONS, PartitionRange};

    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await.map_err(|e| e.to_string())?;
    client
        .publish_with_reply(vault_bus::subjects::MARKETS_CHANGED, inbox, Default::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut confirmed = vec![false; usize::from(PARTITIONS)];
    let _ = tokio::time::timeout(ENGINES_CONFIRM_WITHIN, async {
        while let Some(answer) = answers.next().await {
            let range = std::str::from_utf8(&answer.payload).ok().and_then(|t| t.parse::<PartitionRange>().ok());
            for partition in range.into_iter().flat_map(PartitionRange::iter) {
                confirmed[usize::from(partition)] = true;
            }
            if confirmed.iter().all(|c| *c) {
                return;
            }
        }
    })
    .await;
    let _ = answers.unsubscribe().await;
    let missing: Vec<String> = confirmed.iter().enumerate().filter(|(_, c)| !**c).map(|(p, _)| p.to_string()).collect();
    if missing.is_empty() { Ok(()) } else { Err(format!("partitions {}", missing.join(","))) }
}

/// `vault-api admin create --email E`: promotes E to admin, or creates E as an admin with the
/// password `read_password` returns (read only when E does not exist). Returns what was done.
pub async fn create_admin(
    pool: &sqlx::PgPool,
    email: &str,
    read_password: impl FnOnce() -> std::io::Result<String>,
) -> anyhow::Result<String> {
    let email = crate::auth::parse_email(email).map_err(|e| anyhow::anyhow!("--email {}", e.message))?;
    let promoted: Option<Uuid> = sqlx::query_scalar(
        "UPDATE users SET role = 'admin', updated_at = now() WHERE lower(email) = lower($1) RETURNING id",
    )
    .bind(&email)
    .fetch_optional(pool)
    .await?;
    if let Some(id) = promoted {
        tracing::info!(user_id = %id, "promoted to admin");
        return Ok(format!("promoted {email} ({id}) to admin"));
    }
    let password = read_password()?;
    crate::auth::password::check_policy(&password).map_err(|e| anyhow::anyhow!("password {e}"))?;
    let hash = crate::auth::password::Hasher::new(1).hash(password).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let id = Uuid::now_v7();
    sqlx::query("INSERT INTO users (id, email, password_hash, role) VALUES ($1, $2, $3, 'admin')")
        .bind(id)
        .bind(&email)
        .bind(&hash)
        .execute(pool)
        .await?;
    tracing::info!(user_id = %id, "admin created");
    Ok(format!("created admin {email} ({id})"))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditFilter {
    /// Entries whose actor is this user.
    pub user_id: Option<Uuid>,
    /// Exact action, e.g. `order.place`, `order.filled`, `auth.login.failed` (not empty, no NUL
    /// characters).
    #[param(pattern = "^[^\\x00]+$")]
    pub action: Option<String>,
    /// From this time (inclusive, RFC 3339).
    pub from: Option<DateTime<Utc>>,
    /// Until this time (exclusive, RFC 3339).
    pub to: Option<DateTime<Utc>>,
    /// 1..500, default 100.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    #[param(value_type = Option<SeqCursor>)]
    pub cursor: Option<String>,
}

/// One audit-log row as operators read it.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct AuditEntry {
    /// The log's sequence (a string, like the ledger's ids).
    #[serde(serialize_with = "as_string")]
    #[schema(value_type = String)]
    pub id: i64,
    #[serde(serialize_with = "vault_core::time::micros")]
    pub at: DateTime<Utc>,
    pub actor_id: Option<Uuid>,
    pub action: String,
    pub subject: Option<String>,
    pub request_id: Option<String>,
    pub data: serde_json::Value,
    /// Hex SHA-256 chaining this row to the one before (see `vault-worker audit verify`).
    pub hash: String,
    /// The previous row's `hash` (64 zeros before the first row): with `hash`, the chain can be
    /// followed through this API.
    pub prev_hash: String,
    /// The stream the row's message came from (`ORDERS`, `EVENTS`, `AUTH`), and its sequence
    /// there: what the trail is compared with the streams by. `OPERATOR` for rows an operator
    /// appended (`audit.gap_accepted`), numbered on their own.
    pub stream: String,
    pub stream_seq: i64,
}

fn as_string<S: serde::Serializer>(id: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    pub next_cursor: Option<String>,
}

/// Read the audit trail (newest first).
#[utoipa::path(get, path = "/api/v1/admin/audit", tag = "admin", security(("bearer" = [])), params(AuditFilter),
    responses((status = 200, body = AuditPage), (status = 403, body = Problem), (status = 422, body = Problem)))]
pub async fn audit(
    State(state): State<AppState>,
    AdminReader(_caller): AdminReader,
    ApiQuery(filter): ApiQuery<AuditFilter>,
) -> Result<axum::Json<AuditPage>, ApiError> {
    let page = SeqPage::parse(filter.limit, filter.cursor.as_deref())?;
    if let (Some(from), Some(to)) = (filter.from, filter.to)
        && from >= to
    {
        return Err(ApiError::invalid("from", "must be before `to`"));
    }
    if filter.action.as_deref().is_some_and(|a| a.contains('\0')) {
        return Err(ApiError::invalid("action", "must not contain NUL characters"));
    }
    // An empty action filtered for an action named "" and answered an empty page, as if the
    // trail held nothing.
    if filter.action.as_deref() == Some("") {
        return Err(ApiError::invalid("action", "must not be empty (leave it out for every action)"));
    }
    let mut entries: Vec<AuditEntry> = sqlx::query_as(
        "SELECT id, at, actor_id, action, subject, request_id, data, encode(hash, 'hex') AS hash,
                encode(prev_hash, 'hex') AS prev_hash, stream, stream_seq
           FROM audit_log
          WHERE ($1::UUID IS NULL OR actor_id = $1) AND ($2::TEXT IS NULL OR action = $2)
            AND ($3::TIMESTAMPTZ IS NULL OR at >= $3) AND ($4::TIMESTAMPTZ IS NULL OR at < $4)
            AND ($5::BIGINT IS NULL OR id < $5)
          ORDER BY id DESC LIMIT $6",
    )
    .bind(filter.user_id)
    .bind(filter.action)
    .bind(filter.from)
    .bind(filter.to)
    .bind(page.before)
    .bind(page.fetch_limit())
    .fetch_all(&state.pool)
    .await?;
    let next_cursor = page.finish(&mut entries, |e| e.id);
    Ok(axum::Json(AuditPage { entries, next_cursor }))
}

/// Every stream with its consumers' lag, read from JetStream now.
#[utoipa::path(get, path = "/api/v1/admin/queues", tag = "admin", security(("bearer" = [])),
    responses((status = 200, description = "{streams: [{name, messages, bytes, first_seq, last_seq, consumers: [{name, num_pending, num_ack_pending, num_redelivered, oldest_pending_age_seconds, last_active}]}]}"),
              (status = 403, body = Problem), (status = 503, body = Problem)))]
pub async fn queues(
    State(state): State<AppState>,
    AdminReader(_caller): AdminReader,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let streams = vault_bus::lag::snapshot(&state.bus, None).await.map_err(|e| {
        tracing::warn!(error = %e, "queue snapshot failed");
        ApiError::Unavailable("nats")
    })?;
    // The gauges are the reporter's alone (every 5 s): it also turns those of consumers that
    // are gone to NaN, which a series set here, unknown to it, would never be.
    Ok(axum::Json(serde_json::json!({ "streams": streams })))
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use vault_testkit::NatsServer;

    use super::*;

    /// Answers every market-change request with `partitions`, after `delay`.
    async fn engine(client: async_nats::Client, partitions: &'static str, delay: std::time::Duration) {
        let mut asked = client.subscribe(vault_bus::subjects::MARKETS_CHANGED).await.expect("subscribed");
        client.flush().await.expect("flushed");
        tokio::spawn(async move {
            while let Some(request) = asked.next().await {
                tokio::time::sleep(delay).await;
                let reply = request.reply.expect("a request");
                client.publish(reply, partitions.into()).await.expect("answered");
            }
        });
    }

    #[tokio::test]
    async fn a_market_change_is_confirmed_once_the_engines_cover_every_partition() {
        let nats = NatsServer::start().await;
        let client = async_nats::connect(nats.url()).await.expect("connects");
        engine(client.clone(), "0-7", std::time::Duration::ZERO).await;
        let unconfirmed = engines_reloaded(&client).await.expect_err("half the partitions answered");
        assert_eq!(unconfirmed, "partitions 8,9,10,11,12,13,14,15");
        // The second engine answers later than the first: its answer is waited for.
        engine(client.clone(), "8-15", std::time::Duration::from_millis(300)).await;
        engines_reloaded(&client).await.expect("every partition confirmed");
    }
}
