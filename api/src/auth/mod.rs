//! Accounts and authentication: signup, login (with lockout and TOTP), refresh-token rotation,
//! logout, `/me`, TOTP enrolment and API keys.
//!
//! Rules this module keeps (each has a test in `tests/auth.rs`):
//! - unknown emails take the same path as wrong passwords (dummy hash) and get the same
//!   `invalid_credentials` answer;
//! - 5 consecutive failures (wrong password or wrong TOTP code) lock the account for 15 minutes;
//!   a locked account answers 423 even to the right password; success resets the count, and so
//!   does a day without failures; an email without an account is counted and locked alike
//!   (`login_failures`), so the lockout does not tell which emails are registered;
//! - a refresh token works once; presenting it again revokes its whole login family;
//! - logout kills the access token (until it expires) and its family, across replicas and
//!   restarts (the revocations live in Postgres); a replica that cached the session notices
//!   within the credential cache's TTL ([`credential_cache`]), this process at once;
//! - API keys cannot manage credentials (`session_required`), and only carry their scopes.

pub mod caller;
pub mod credential_cache;
pub mod password;
pub mod tokens;
mod totp;

use std::sync::LazyLock;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use chrono::{DateTime, Datelike, Duration, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;
use vault_bus::message::AuthEventKind;

use self::caller::{Reader, Scope, SessionCaller};
use crate::error::{ApiError, FieldError, Problem};
use crate::events::RequestMeta;
use crate::json::ApiJson;
use crate::path::ResourceId;
use crate::quota::Quota;
use crate::rate_limit;
use crate::startup::AppState;

/// Consecutive failures that lock an account.
pub const LOCK_AFTER_FAILURES: i32 = 5;
/// How long a lockout lasts.
pub const LOCK_MINUTES: i64 = 15;
/// Failures older than this (counted from the last one) are forgotten: the next starts afresh.
pub const FAILURES_FORGOTTEN_AFTER_HOURS: i32 = 24;
/// The longest email an account can have (and a login may name).
pub const MAX_EMAIL_BYTES: usize = 254;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/auth/signup", post(signup))
        .route("/auth/login", post(login))
        .route("/auth/refresh", post(refresh))
        .route("/auth/logout", post(logout))
        .route("/auth/password", post(change_password))
        .route("/auth/totp/setup", post(totp_setup))
        .route("/auth/totp/enable", post(totp_enable))
        .route("/me", get(me))
        .route("/api-keys", post(create_api_key).get(list_api_keys))
        .route("/api-keys/{id}", delete(revoke_api_key))
}

// ---------------------------------------------------------------------------------------------
// Wire types

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignupRequest {
    /// A valid email address; unique, case-insensitively.
    #[schema(format = Email, max_length = 254)]
    pub email: String,
    /// 10 to 128 characters.
    #[schema(min_length = 10, max_length = 128)]
    pub password: String,
    /// At most 100 characters, no control characters.
    #[schema(max_length = 100, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$")]
    pub name: Option<String>,
}

/// A user as the user sees themself.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct User {
    pub id: Uuid,
    pub email: String,
    pub name: Option<String>,
    /// `user` or `admin`.
    pub role: String,
    pub totp_enabled: bool,
    #[serde(serialize_with = "vault_core::time::micros")]
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
    /// The current 6-digit code, required once 2FA is enabled.
    pub totp_code: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenPair {
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    pub expires_in: i64,
    pub refresh_token: String,
    /// Seconds until the refresh token expires.
    pub refresh_expires_in: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    pub refresh_token: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TotpSetup {
    /// Base32 secret for manual entry.
    pub secret: String,
    /// `otpauth://totp/...` for QR codes.
    pub otpauth_url: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePasswordRequest {
    /// The password the account has now.
    #[schema(max_length = 128)]
    pub current_password: String,
    /// 10 to 128 characters.
    #[schema(min_length = 10, max_length = 128)]
    pub new_password: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TotpEnableRequest {
    /// The current 6-digit code of the secret from `/auth/totp/setup`.
    #[schema(pattern = "^[0-9]{6}$")]
    pub code: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKeyRequest {
    /// 1 to 64 characters, not only whitespace, no control characters.
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*[^\\s\\x00-\\x1f\\x7f-\\x9f][^\\x00-\\x1f\\x7f-\\x9f]*$"
    )]
    pub name: String,
    /// `["read"]` or `["read", "trade"]` (in any order; repeats are ignored).
    #[schema(min_items = 1)]
    pub scopes: Vec<Scope>,
}

/// A new API key: `key` is shown this once and never again.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedApiKey {
    pub id: Uuid,
    pub name: String,
    pub scopes: Vec<Scope>,
    pub key: String,
    pub prefix: String,
    #[serde(serialize_with = "vault_core::time::micros")]
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKey {
    pub id: Uuid,
    pub name: String,
    pub scopes: Vec<String>,
    /// The first characters of the key, to tell keys apart.
    pub prefix: String,
    #[serde(serialize_with = "vault_core::time::micros")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "vault_core::time::micros_opt")]
    pub last_used_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyList {
    pub api_keys: Vec<ApiKey>,
}

// ---------------------------------------------------------------------------------------------
// Validation

/// Trims and checks an email address; the stored form keeps the user's case.
pub fn parse_email(raw: &str) -> Result<String, FieldError> {
    let email = raw.trim();
    let bad = || FieldError::new("email", "must be a valid email address");
    if email.len() > 254 || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    let (local, domain) = email.rsplit_once('@').ok_or_else(bad)?;
    let domain_ok = domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
        && domain.chars().all(|c| c.is_alphanumeric() || c == '.' || c == '-');
    if local.is_empty() || local.len() > 64 || local.contains('@') || !domain_ok {
        return Err(bad());
    }
    Ok(email.to_owned())
}

fn invalid_credentials() -> ApiError {
    ApiError::Unauthorized { code: "invalid_credentials", detail: "The email or password is wrong.".to_owned() }
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

// ---------------------------------------------------------------------------------------------
// Signup, login, refresh, logout

/// Create an account.
#[utoipa::path(post, path = "/api/v1/auth/signup", tag = "auth", request_body = SignupRequest,
    responses((status = 201, body = User), (status = 409, description = "email_taken", body = Problem),
              (status = 422, body = Problem)))]
pub async fn signup(
    State(state): State<AppState>,
    meta: RequestMeta,
    ApiJson(body): ApiJson<SignupRequest>,
) -> Result<(StatusCode, axum::Json<User>), ApiError> {
    let mut errors = Vec::new();
    let email = parse_email(&body.email).map_err(|e| errors.push(e)).ok();
    if let Err(message) = password::check_policy(&body.password) {
        errors.push(FieldError::new("password", message));
    }
    // The limit holds for the name as sent (the document says so), before trimming.
    let too_long = body.name.as_ref().is_some_and(|n| n.chars().count() > 100);
    let name = body.name.map(|n| n.trim().to_owned()).filter(|n| !n.is_empty());
    if too_long || name.as_ref().is_some_and(|n| n.chars().any(char::is_control)) {
        errors.push(FieldError::new("name", "must be at most 100 printable characters"));
    }
    let Some(email) = email.filter(|_| errors.is_empty()) else {
        return Err(ApiError::Validation { code: "validation_failed", errors });
    };

    let hash = state.hasher.hash(body.password).await?;
    let mut tx = state.pool.begin().await?;
    let user: User = sqlx::query_as(
        "INSERT INTO users (id, email, name, password_hash) VALUES ($1, $2, $3, $4)
         RETURNING id, email, name, role, totp_enabled, created_at",
    )
    .bind(Uuid::now_v7())
    .bind(&email)
    .bind(&name)
    .bind(&hash)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| {
        if is_unique_violation(&e) {
            ApiError::Conflict { code: "email_taken", detail: "An account with this email exists.".to_owned() }
        } else {
            e.into()
        }
    })?;
    state.events.record(&mut tx, AuthEventKind::Signup, Some(user.id), &meta, serde_json::json!({})).await?;
    state.events.commit(tx).await?;
    Ok((StatusCode::CREATED, axum::Json(user)))
}

#[derive(sqlx::FromRow)]
struct LoginRow {
    id: Uuid,
    password_hash: String,
    role: String,
    totp_enabled: bool,
    totp_secret: Option<String>,
    email: String,
    locked_until: Option<DateTime<Utc>>,
}

/// Log in with email and password (and a TOTP code once 2FA is on).
#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = TokenPair),
              (status = 401, description = "invalid_credentials, totp_required or totp_invalid", body = Problem),
              (status = 422, description = "validation_failed: an email longer than any account's", body = Problem),
              (status = 423, description = "account_locked (Retry-After)", body = Problem),
              (status = 429, body = Problem)))]
pub async fn login(
    State(state): State<AppState>,
    meta: RequestMeta,
    ApiJson(body): ApiJson<LoginRequest>,
) -> Result<Response, ApiError> {
    // Before the email keys anything (the per-email limiter, the failure count): no account has
    // a longer one (signup's bound, on the same trimmed form), and a key must not weigh what a
    // client chooses.
    if body.email.trim().len() > MAX_EMAIL_BYTES {
        return Err(ApiError::Validation {
            code: "validation_failed",
            errors: vec![FieldError::new("email", "must be a valid email address")],
        });
    }
    // Lowercased letter by letter (each letter's simple mapping), as Postgres lowercases the
    // email to find the account: with Rust's full mapping, `İ` became `i̇`, and each variant of
    // an email had a rate-limit bucket of its own while reaching the same account.
    let email_key: String = body.email.trim().chars().map(|c| c.to_lowercase().next().unwrap_or(c)).collect();
    let verdict = match state.limits.check_login(&email_key) {
        Ok(verdict) => verdict,
        // The refusal carries the email bucket's headers (the IP's would say requests are left).
        Err(refused) => return Ok(*refused),
    };

    // No account has a NUL in its email (signup refuses control characters), and Postgres text
    // cannot hold one: such an email is unknown without asking, and takes the same path.
    let user: Option<LoginRow> = if email_key.contains('\0') {
        None
    } else {
        sqlx::query_as(
            "SELECT id, password_hash, role, totp_enabled, totp_secret, email, locked_until
               FROM users WHERE lower(email) = lower($1)",
        )
        // Postgres lowercases, as its unique index does: Rust's `to_lowercase` differs from it on
        // a few letters (the Turkish dotted İ, a final Σ), and such a user could never log in.
        .bind(body.email.trim())
        .fetch_optional(&state.pool)
        .await?
    };

    // An account an administrator locked answers as an email without an account does until the
    // right password comes (its failures counted by email, as an unknown email's): a 423 with a
    // day's Retry-After at the first attempt told anyone that the email had an account.
    let admin_locked = user.as_ref().and_then(|u| u.locked_until).is_some_and(is_admin_lock);
    // An email without an account is locked as an account is (see `record_unknown_failure`).
    let locked_until = match &user {
        Some(user) if !admin_locked => user.locked_until,
        None if email_key.contains('\0') => None,
        _ => sqlx::query_scalar("SELECT locked_until FROM login_failures WHERE email = lower($1)")
            .bind(body.email.trim())
            .fetch_optional(&state.pool)
            .await?
            .flatten(),
    };
    let now = Utc::now();
    if let Some(locked_until) = locked_until.filter(|t| *t > now) {
        return Err(refuse_locked(&state, user.as_ref().map(|u| u.id), &meta, locked_until, now).await);
    }

    let matches = state.hasher.verify(body.password, user.as_ref().map(|u| u.password_hash.clone())).await?;
    let user = match user {
        Some(user) if admin_locked => {
            if matches {
                return Err(refuse_locked(&state, Some(user.id), &meta, user.locked_until.unwrap_or(now), now).await);
            }
            record_unknown_failure(&state, body.email.trim(), Some(user.id), &meta).await?;
            return Err(invalid_credentials());
        }
        Some(user) if matches => user,
        Some(user) => {
            record_failure(&state, user.id, &meta, "invalid_credentials").await?;
            return Err(invalid_credentials());
        }
        None => {
            record_unknown_failure(&state, body.email.trim(), None, &meta).await?;
            return Err(invalid_credentials());
        }
    };

    let mut totp_step = None;
    if user.totp_enabled {
        let Some(code) = body.totp_code else {
            return Err(totp_required());
        };
        let secret = user.totp_secret.as_deref().unwrap_or_default();
        match totp::verify(secret, &user.email, &code, now) {
            Some(step) => totp_step = Some(step),
            None => {
                record_failure(&state, user.id, &meta, "totp_invalid").await?;
                return Err(totp_invalid());
            }
        }
    }

    let mut tx = state.pool.begin().await?;
    // The account is checked again here, under the row's lock: the password was verified after
    // the first read (waiting for a hashing slot), and what changed meanwhile must hold even
    // against the right password — a lock (the 5th failure of concurrent attempts, or an
    // admin's), a new password, 2FA turned on (whose revocation of every other session this
    // login would otherwise outlive).
    let accepted = sqlx::query(
        "UPDATE users SET failed_logins = 0, locked_until = NULL, updated_at = now(),
                totp_last_step = COALESCE($2, totp_last_step)
          WHERE id = $1 AND (locked_until IS NULL OR locked_until <= now())
            AND ($2::BIGINT IS NULL OR totp_last_step IS NULL OR totp_last_step < $2)
            AND password_hash = $3 AND ($2::BIGINT IS NOT NULL OR NOT totp_enabled)",
    )
    .bind(user.id)
    .bind(totp_step)
    .bind(&user.password_hash)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if accepted == 0 {
        drop(tx);
        let now_on: Option<(bool, bool)> =
            sqlx::query_as("SELECT totp_enabled, password_hash = $2 FROM users WHERE id = $1")
                .bind(user.id)
                .bind(&user.password_hash)
                .fetch_optional(&state.pool)
                .await?;
        match now_on {
            // The password changed since it was verified: this one is wrong now.
            Some((_, false)) | None => {
                record_failure(&state, user.id, &meta, "invalid_credentials").await?;
                return Err(invalid_credentials());
            }
            // 2FA was turned on since the first read: a code is needed now.
            Some((true, true)) if totp_step.is_none() => {
                return Err(totp_required());
            }
            Some(_) => {}
        }
        // Locked since the first check, or the same TOTP code (time step) was already used: a
        // replay, counted as a failure (which answers 423 itself if the account is locked).
        record_failure(&state, user.id, &meta, "totp_replayed").await?;
        return Err(totp_invalid());
    }
    let family = Uuid::now_v7();
    sqlx::query("INSERT INTO token_families (id, user_id) VALUES ($1, $2)")
        .bind(family)
        .bind(user.id)
        .execute(&mut *tx)
        .await?;
    let refresh_token = insert_refresh_token(&mut tx, family, user.id, now).await?;
    state
        .events
        .record(&mut tx, AuthEventKind::LoginSucceeded, Some(user.id), &meta, serde_json::json!({"family": family}))
        .await?;
    state.events.commit(tx).await?;

    let (access_token, _) = state.jwt.issue(user.id, &user.role, family, now);
    let mut response = axum::Json(token_pair(access_token, refresh_token)).into_response();
    if let Some(v) = verdict {
        rate_limit::set_headers(response.headers_mut(), &v);
    }
    Ok(response)
}

/// Ends every login family of `user` but `keep` (the caller's own, when it stays), recording
/// `why`: its refresh tokens die, and its access tokens with it (checked on every request).
/// Returns how many ended. The caller forgets the user's cached credentials after the commit.
pub(crate) async fn end_sessions(
    conn: &mut sqlx::PgConnection,
    user: Uuid,
    keep: Option<Uuid>,
    why: &str,
) -> Result<u64, sqlx::Error> {
    let ended = sqlx::query(
        "UPDATE token_families SET revoked_at = now(), revoked_why = $3
          WHERE user_id = $1 AND id IS DISTINCT FROM $2 AND revoked_at IS NULL",
    )
    .bind(user)
    .bind(keep)
    .bind(why)
    .execute(conn)
    .await?;
    Ok(ended.rows_affected())
}

fn totp_required() -> ApiError {
    ApiError::Unauthorized { code: "totp_required", detail: "This account has 2FA: send totp_code.".to_owned() }
}

fn totp_invalid() -> ApiError {
    ApiError::Unauthorized { code: "totp_invalid", detail: "The 2FA code is wrong or was already used.".to_owned() }
}

fn token_pair(access_token: String, refresh_token: String) -> TokenPair {
    TokenPair {
        access_token,
        token_type: "Bearer",
        expires_in: tokens::ACCESS_TTL_SECS,
        refresh_token,
        refresh_expires_in: tokens::REFRESH_TTL_SECS,
    }
}

async fn insert_refresh_token(
    tx: &mut sqlx::PgConnection,
    family: Uuid,
    user: Uuid,
    now: DateTime<Utc>,
) -> Result<String, ApiError> {
    let token = tokens::new_refresh_token();
    sqlx::query(
        "INSERT INTO refresh_tokens (id, family_id, user_id, token_hash, expires_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(Uuid::now_v7())
    .bind(family)
    .bind(user)
    .bind(tokens::hash_secret(&token))
    .bind(now + Duration::seconds(tokens::REFRESH_TTL_SECS))
    .execute(&mut *tx)
    .await?;
    Ok(token)
}

/// The `SET` list that counts one more failure on row `t` of `users` or `login_failures` (binds:
/// `$2` failures that lock, `$3` lock minutes, `$4` hours after which failures are forgotten):
/// a lock (over, or the row would not be counted) or a last failure older than the window
/// starts the count afresh; the count that reaches `$2` locks.
fn counted_failure(t: &str) -> String {
    let next = format!(
        "CASE WHEN {t}.locked_until IS NOT NULL OR {t}.last_failed_login_at IS NULL
                   OR {t}.last_failed_login_at < now() - make_interval(hours => $4)
              THEN 1 ELSE {t}.failed_logins + 1 END"
    );
    format!(
        "failed_logins = {next},
         locked_until = CASE WHEN {next} >= $2 THEN now() + make_interval(mins => $3) END,
         last_failed_login_at = now()"
    )
}

/// Whether `locked_until` is an administrator's lock (`POST /admin/users/{id}/lock` stores the
/// year 9999; a lock after failures lasts minutes).
pub(crate) fn is_admin_lock(locked_until: DateTime<Utc>) -> bool {
    locked_until.year() >= 9999
}

/// The 423 for an attempt on a locked account (not counted: a lock is never extended).
async fn refuse_locked(
    state: &AppState,
    user: Option<Uuid>,
    meta: &RequestMeta,
    locked_until: DateTime<Utc>,
    now: DateTime<Utc>,
) -> ApiError {
    let data = serde_json::json!({"reason": "account_locked"});
    if let Err(e) = state.events.emit(AuthEventKind::LoginFailed, user, meta, data).await {
        return e.into();
    }
    let secs = (locked_until - now).num_seconds().clamp(1, 86_400) as u64;
    ApiError::Locked { retry_after_secs: secs }
}

/// Counts a failed attempt; the 5th in a row locks the account for 15 minutes. A lock that
/// has already expired, or a last failure more than [`FAILURES_FORGOTTEN_AFTER_HOURS`] ago,
/// starts the count afresh.
///
/// An attempt that finds the account locked when it is counted — concurrent attempts all pass
/// the login's first check before any is counted — changes nothing (the lock is not extended,
/// an admin's lock not shortened) and is answered 423 like one refused at that check: only the
/// attempts counted before the lock get an answer that says anything about the password.
async fn record_failure(state: &AppState, user: Uuid, meta: &RequestMeta, reason: &str) -> Result<(), ApiError> {
    static COUNT: LazyLock<String> = LazyLock::new(|| {
        format!(
            "UPDATE users u SET {}, updated_at = now()
              WHERE id = $1 AND (locked_until IS NULL OR locked_until <= now())
              RETURNING failed_logins, locked_until IS NOT NULL",
            counted_failure("u")
        )
    });
    let mut tx = state.pool.begin().await?;
    let counted: Option<(i32, bool)> = sqlx::query_as(COUNT.as_str())
        .bind(user)
        .bind(LOCK_AFTER_FAILURES)
        .bind(LOCK_MINUTES as i32)
        .bind(FAILURES_FORGOTTEN_AFTER_HOURS)
        .fetch_optional(&mut *tx)
        .await?;
    let Some((failures, locked)) = counted else {
        drop(tx);
        let locked_until: Option<DateTime<Utc>> = sqlx::query_scalar("SELECT locked_until FROM users WHERE id = $1")
            .bind(user)
            .fetch_optional(&state.pool)
            .await?
            .flatten();
        let now = Utc::now();
        return Err(refuse_locked(state, Some(user), meta, locked_until.unwrap_or(now), now).await);
    };
    let data = serde_json::json!({"reason": reason, "consecutive_failures": failures});
    state.events.record(&mut tx, AuthEventKind::LoginFailed, Some(user), meta, data).await?;
    let locks = locked && failures == LOCK_AFTER_FAILURES;
    if locks {
        let data = serde_json::json!({"minutes": LOCK_MINUTES});
        state.events.record(&mut tx, AuthEventKind::Locked, Some(user), meta, data).await?;
    }
    state.events.commit(tx).await?;
    if locks {
        tracing::warn!(user_id = %user, "account locked after {LOCK_AFTER_FAILURES} failed logins");
    }
    Ok(())
}

/// Counts a failed attempt for an email without an account (`login_failures`, by the trimmed
/// email lowercased by Postgres, as accounts are matched: Rust's `to_lowercase` differs on a few
/// letters, and `alİce@…` then found Alice's locked account if she had one and a fresh count if
/// not — telling the two apart) exactly as [`record_failure`] counts one for an account: the 5th in a row
/// locks it for 15 minutes, and the attempts after it are answered 423 — so the lockout does not
/// tell which emails are registered. Only the answer is the same: nobody is notified.
///
/// An account an administrator locked is counted here too, by its email (`locked_account`: the
/// audit trail names it, and the reason is `admin_locked`); its own count stays as it was.
async fn record_unknown_failure(
    state: &AppState,
    email: &str,
    locked_account: Option<Uuid>,
    meta: &RequestMeta,
) -> Result<(), ApiError> {
    let reason = if locked_account.is_some() { "admin_locked" } else { "unknown_email" };
    // No account has a NUL in its email, and Postgres text cannot hold one: not counted (the
    // per-email rate limit still holds it back).
    if email.contains('\0') {
        state.events.emit(AuthEventKind::LoginFailed, None, meta, serde_json::json!({"reason": reason})).await?;
        return Ok(());
    }
    static COUNT: LazyLock<String> = LazyLock::new(|| {
        format!(
            "INSERT INTO login_failures AS f (email, failed_logins, locked_until)
             VALUES (lower($1), 1, CASE WHEN 1 >= $2 THEN now() + make_interval(mins => $3) END)
             ON CONFLICT (email) DO UPDATE SET {}
              WHERE f.locked_until IS NULL OR f.locked_until <= now()
             RETURNING failed_logins, locked_until IS NOT NULL",
            counted_failure("f")
        )
    });
    let mut tx = state.pool.begin().await?;
    let counted: Option<(i32, bool)> = sqlx::query_as(COUNT.as_str())
        .bind(email)
        .bind(LOCK_AFTER_FAILURES)
        .bind(LOCK_MINUTES as i32)
        .bind(FAILURES_FORGOTTEN_AFTER_HOURS)
        .fetch_optional(&mut *tx)
        .await?;
    let Some((failures, _)) = counted else {
        drop(tx);
        // Locked by concurrent attempts since the first check: answered as an account would be.
        let locked_until: Option<DateTime<Utc>> =
            sqlx::query_scalar("SELECT locked_until FROM login_failures WHERE email = lower($1)")
                .bind(email)
                .fetch_optional(&state.pool)
                .await?
                .flatten();
        let now = Utc::now();
        return Err(refuse_locked(state, locked_account, meta, locked_until.unwrap_or(now), now).await);
    };
    let data = serde_json::json!({"reason": reason, "consecutive_failures": failures});
    state.events.record(&mut tx, AuthEventKind::LoginFailed, locked_account, meta, data).await?;
    state.events.commit(tx).await?;
    Ok(())
}

/// Trade a refresh token for a new pair; the presented token dies.
#[utoipa::path(post, path = "/api/v1/auth/refresh", tag = "auth", request_body = RefreshRequest,
    responses((status = 200, body = TokenPair),
              (status = 401, description = "invalid_refresh_token, refresh_token_expired or refresh_token_reused", body = Problem)))]
pub async fn refresh(
    State(state): State<AppState>,
    meta: RequestMeta,
    ApiJson(body): ApiJson<RefreshRequest>,
) -> Result<axum::Json<TokenPair>, ApiError> {
    let now = Utc::now();
    let mut tx = state.pool.begin().await?;
    #[allow(clippy::type_complexity)]
    let row: Option<(Uuid, Uuid, Uuid, DateTime<Utc>, Option<DateTime<Utc>>, Option<DateTime<Utc>>, String)> =
        sqlx::query_as(
            "SELECT t.id, t.family_id, t.user_id, t.expires_at, t.used_at, f.revoked_at, u.role
               FROM refresh_tokens t
               JOIN token_families f ON f.id = t.family_id
               JOIN users u ON u.id = t.user_id
              WHERE t.token_hash = $1
              FOR UPDATE OF t, f",
        )
        .bind(tokens::hash_secret(body.refresh_token.trim()))
        .fetch_optional(&mut *tx)
        .await?;
    let Some((token_id, family, user, expires_at, used_at, revoked_at, role)) = row else {
        return Err(ApiError::Unauthorized {
            code: "invalid_refresh_token",
            detail: "The refresh token is not valid.".to_owned(),
        });
    };
    if used_at.is_some() || revoked_at.is_some() {
        // The first reuse ends the family, once: presenting a dead token of a family already
        // ended (by this, a logout, a lock) changes nothing, and must not cost an audit row, an
        // event and a credential re-check of every socket of the user each time it is replayed.
        if revoked_at.is_none() {
            sqlx::query(
                "UPDATE token_families SET revoked_at = now(), revoked_why = 'refresh_token_reused' WHERE id = $1",
            )
            .bind(family)
            .execute(&mut *tx)
            .await?;
            let data = serde_json::json!({"family": family});
            state.events.record(&mut tx, AuthEventKind::RefreshTokenReused, Some(user), &meta, data).await?;
            state.events.commit(tx).await?;
            state.credentials.forget_family(user, family);
            tracing::warn!(user_id = %user, %family, "refresh token reused; login family revoked");
        }
        return Err(ApiError::Unauthorized {
            code: "refresh_token_reused",
            detail: "This refresh token was already used; the session has been ended for safety.".to_owned(),
        });
    }
    if expires_at <= now {
        return Err(ApiError::Unauthorized {
            code: "refresh_token_expired",
            detail: "The refresh token has expired; log in again.".to_owned(),
        });
    }
    sqlx::query("UPDATE refresh_tokens SET used_at = now() WHERE id = $1").bind(token_id).execute(&mut *tx).await?;
    let refresh_token = insert_refresh_token(&mut tx, family, user, now).await?;
    tx.commit().await?;
    let (access_token, _) = state.jwt.issue(user, &role, family, now);
    Ok(axum::Json(token_pair(access_token, refresh_token)))
}

/// End the session: the access token and its whole login family stop working.
#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "auth", security(("bearer" = [])),
    responses((status = 204), (status = 401, body = Problem), (status = 403, description = "session_required", body = Problem)))]
pub async fn logout(
    State(state): State<AppState>,
    meta: RequestMeta,
    SessionCaller(caller): SessionCaller,
) -> Result<StatusCode, ApiError> {
    let (jti, family, expires_at) = caller.require_session()?;
    let mut tx = state.pool.begin().await?;
    sqlx::query("INSERT INTO revoked_access_tokens (jti, expires_at) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(jti)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE token_families SET revoked_at = now(), revoked_why = 'logout' WHERE id = $1 AND revoked_at IS NULL",
    )
    .bind(family)
    .execute(&mut *tx)
    .await?;
    let data = serde_json::json!({"family": family});
    state.events.record(&mut tx, AuthEventKind::Logout, Some(caller.user_id), &meta, data).await?;
    state.events.commit(tx).await?;
    state.credentials.forget_family(caller.user_id, family);
    Ok(StatusCode::NO_CONTENT)
}

/// Change the password. The current one is checked (a wrong one counts as a failed login, so
/// a stolen access token cannot guess it freely); every other session of the account ends, the
/// caller's goes on.
#[utoipa::path(post, path = "/api/v1/auth/password", tag = "auth", security(("bearer" = [])),
    request_body = ChangePasswordRequest,
    responses((status = 204), (status = 401, description = "invalid_credentials", body = Problem),
              (status = 403, description = "session_required", body = Problem),
              (status = 422, body = Problem), (status = 423, description = "account_locked", body = Problem)))]
pub async fn change_password(
    State(state): State<AppState>,
    meta: RequestMeta,
    SessionCaller(caller): SessionCaller,
    ApiJson(body): ApiJson<ChangePasswordRequest>,
) -> Result<StatusCode, ApiError> {
    let (_, family, _) = caller.require_session()?;
    if let Err(message) = password::check_policy(&body.new_password) {
        return Err(ApiError::Validation {
            code: "validation_failed",
            errors: vec![FieldError::new("new_password", message)],
        });
    }
    let (current, locked_until): (String, Option<DateTime<Utc>>) =
        sqlx::query_as("SELECT password_hash, locked_until FROM users WHERE id = $1")
            .bind(caller.user_id)
            .fetch_optional(&state.pool)
            .await?
            .ok_or(ApiError::NotFound)?;
    let now = Utc::now();
    if let Some(locked_until) = locked_until.filter(|t| *t > now) {
        return Err(refuse_locked(&state, Some(caller.user_id), &meta, locked_until, now).await);
    }
    if !state.hasher.verify(body.current_password, Some(current.clone())).await? {
        record_failure(&state, caller.user_id, &meta, "invalid_credentials").await?;
        return Err(invalid_credentials());
    }
    let hash = state.hasher.hash(body.new_password).await?;
    let mut tx = state.pool.begin().await?;
    // Against the hash just verified: a concurrent change wins, and this one is refused.
    let changed = sqlx::query(
        "UPDATE users SET password_hash = $2, failed_logins = 0, updated_at = now() WHERE id = $1 AND password_hash = $3",
    )
    .bind(caller.user_id)
    .bind(&hash)
    .bind(&current)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if changed == 0 {
        return Err(invalid_credentials());
    }
    let ended = end_sessions(&mut tx, caller.user_id, Some(family), "password_changed").await?;
    let data = serde_json::json!({"sessions_ended": ended});
    state.events.record(&mut tx, AuthEventKind::PasswordChanged, Some(caller.user_id), &meta, data).await?;
    state.events.commit(tx).await?;
    state.credentials.forget_user(caller.user_id);
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's account.
#[utoipa::path(get, path = "/api/v1/me", tag = "auth", security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = User), (status = 401, body = Problem)))]
pub async fn me(State(state): State<AppState>, Reader(caller): Reader) -> Result<axum::Json<User>, ApiError> {
    let user: User = sqlx::query_as("SELECT id, email, name, role, totp_enabled, created_at FROM users WHERE id = $1")
        .bind(caller.user_id)
        .fetch_optional(&state.pool)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(axum::Json(user))
}

// ---------------------------------------------------------------------------------------------
// TOTP

/// Start 2FA enrolment: a new secret, active once confirmed with `/auth/totp/enable`.
#[utoipa::path(post, path = "/api/v1/auth/totp/setup", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = TotpSetup), (status = 403, description = "session_required", body = Problem),
              (status = 409, description = "totp_already_enabled", body = Problem)))]
pub async fn totp_setup(
    State(state): State<AppState>,
    SessionCaller(caller): SessionCaller,
) -> Result<axum::Json<TotpSetup>, ApiError> {
    let (enabled, email): (bool, String) = sqlx::query_as("SELECT totp_enabled, email FROM users WHERE id = $1")
        .bind(caller.user_id)
        .fetch_one(&state.pool)
        .await?;
    if enabled {
        return Err(ApiError::Conflict { code: "totp_already_enabled", detail: "2FA is already on.".to_owned() });
    }
    let setup = totp::generate(&email)?;
    sqlx::query("UPDATE users SET totp_pending_secret = $2, updated_at = now() WHERE id = $1")
        .bind(caller.user_id)
        .bind(&setup.secret)
        .execute(&state.pool)
        .await?;
    Ok(axum::Json(setup))
}

/// Confirm enrolment with a current code; from now on login needs `totp_code`, and every other
/// session of the account ends.
#[utoipa::path(post, path = "/api/v1/auth/totp/enable", tag = "auth", security(("bearer" = [])),
    request_body = TotpEnableRequest,
    responses((status = 204), (status = 403, description = "session_required", body = Problem),
              (status = 409, description = "totp_already_enabled", body = Problem),
              (status = 422, description = "totp_invalid", body = Problem)))]
pub async fn totp_enable(
    State(state): State<AppState>,
    meta: RequestMeta,
    SessionCaller(caller): SessionCaller,
    ApiJson(body): ApiJson<TotpEnableRequest>,
) -> Result<StatusCode, ApiError> {
    let (_, family, _) = caller.require_session()?;
    let (pending, email, enabled): (Option<String>, String, bool) =
        sqlx::query_as("SELECT totp_pending_secret, email, totp_enabled FROM users WHERE id = $1")
            .bind(caller.user_id)
            .fetch_one(&state.pool)
            .await?;
    if enabled {
        return Err(ApiError::Conflict { code: "totp_already_enabled", detail: "2FA is already on.".to_owned() });
    }
    let invalid = || ApiError::Validation {
        code: "totp_invalid",
        errors: vec![FieldError::new("code", "is not the current code of the secret from /auth/totp/setup")],
    };
    let pending = pending.ok_or_else(invalid)?;
    let step = totp::verify(&pending, &email, &body.code, Utc::now()).ok_or_else(invalid)?;
    let mut tx = state.pool.begin().await?;
    let enabled = sqlx::query(
        "UPDATE users SET totp_secret = totp_pending_secret, totp_pending_secret = NULL, totp_enabled = true,
                totp_last_step = $2, updated_at = now()
          WHERE id = $1 AND totp_pending_secret = $3",
    )
    .bind(caller.user_id)
    .bind(step)
    .bind(&pending)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    // With 2FA on, a password alone no longer logs in: nor may a session that a password alone
    // began (an intruder's among them) go on. Every other session of the account ends; the
    // caller's, which just proved the code, stays.
    if enabled == 1 {
        let ended = end_sessions(&mut tx, caller.user_id, Some(family), "totp_enabled").await?;
        let data = serde_json::json!({"sessions_ended": ended});
        state.events.record(&mut tx, AuthEventKind::TotpEnabled, Some(caller.user_id), &meta, data).await?;
    }
    state.events.commit(tx).await?;
    if enabled == 1 {
        state.credentials.forget_user(caller.user_id);
    }
    if enabled == 0 {
        // Between the read and the update another `/auth/totp/setup` replaced the secret (2FA is
        // not on: this code's secret is gone), or a concurrent enable with this same secret
        // turned it on (then this one is done too).
        let on_with_this: bool =
            sqlx::query_scalar("SELECT COALESCE(totp_enabled AND totp_secret = $2, false) FROM users WHERE id = $1")
                .bind(caller.user_id)
                .bind(&pending)
                .fetch_one(&state.pool)
                .await?;
        if !on_with_this {
            return Err(ApiError::Validation {
                code: "totp_invalid",
                errors: vec![FieldError::new(
                    "code",
                    "the secret was replaced by a newer /auth/totp/setup: confirm with its code",
                )],
            });
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------------------------
// API keys

/// Live (not revoked) API keys one user may have: keys are listed whole (`GET /api-keys`), and
/// each is a credential to watch. Lock class "KEYS".
pub const API_KEYS: Quota = Quota {
    lock_class: 0x4B45_5953,
    count_live: "SELECT count(*) FROM api_keys WHERE user_id = $1 AND revoked_at IS NULL",
    most: 25,
    code: "too_many_api_keys",
    detail: "An account may have at most 25 API keys; revoke one first.",
};

/// Create an API key. The key is in this answer only. A user has at most 25 live keys (409
/// `too_many_api_keys` beyond: revoke one first).
#[utoipa::path(post, path = "/api/v1/api-keys", tag = "auth", security(("bearer" = [])),
    request_body = CreateApiKeyRequest,
    responses((status = 201, body = CreatedApiKey), (status = 403, description = "session_required", body = Problem),
              (status = 409, description = "too_many_api_keys", body = Problem), (status = 422, body = Problem)))]
pub async fn create_api_key(
    State(state): State<AppState>,
    meta: RequestMeta,
    SessionCaller(caller): SessionCaller,
    ApiJson(body): ApiJson<CreateApiKeyRequest>,
) -> Result<(StatusCode, axum::Json<CreatedApiKey>), ApiError> {
    let mut errors = Vec::new();
    // The limit holds for the name as sent (the document says so), before trimming.
    let name = body.name.trim().to_owned();
    if name.is_empty() || body.name.chars().count() > 64 || name.chars().any(char::is_control) {
        errors.push(FieldError::new("name", "must be 1 to 64 printable characters"));
    }
    let mut scopes = body.scopes.clone();
    scopes.sort_by_key(|s| s.as_str());
    scopes.dedup();
    if scopes != [Scope::Read] && scopes != [Scope::Read, Scope::Trade] {
        errors.push(FieldError::new("scopes", "must be [\"read\"] or [\"read\", \"trade\"]"));
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation { code: "validation_failed", errors });
    }
    let key = tokens::new_api_key();
    let id = Uuid::now_v7();
    let prefix = tokens::api_key_prefix(&key);
    let scope_names: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
    let mut tx = state.pool.begin().await?;
    API_KEYS.hold(&mut tx, caller.user_id).await?;
    let created_at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO api_keys (id, user_id, name, prefix, key_hash, scopes) VALUES ($1, $2, $3, $4, $5, $6)
         RETURNING created_at",
    )
    .bind(id)
    .bind(caller.user_id)
    .bind(&name)
    .bind(&prefix)
    .bind(tokens::hash_secret(&key))
    .bind(&scope_names)
    .fetch_one(&mut *tx)
    .await?;
    let data = serde_json::json!({"api_key_id": id, "scopes": scope_names});
    state.events.record(&mut tx, AuthEventKind::ApiKeyCreated, Some(caller.user_id), &meta, data).await?;
    state.events.commit(tx).await?;
    Ok((StatusCode::CREATED, axum::Json(CreatedApiKey { id, name, scopes, key, prefix, created_at })))
}

/// The caller's live API keys (never the keys themselves).
#[utoipa::path(get, path = "/api/v1/api-keys", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = ApiKeyList), (status = 403, description = "session_required", body = Problem)))]
pub async fn list_api_keys(
    State(state): State<AppState>,
    SessionCaller(caller): SessionCaller,
) -> Result<axum::Json<ApiKeyList>, ApiError> {
    #[allow(clippy::type_complexity)]
    let rows: Vec<(Uuid, String, Vec<String>, String, DateTime<Utc>, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT id, name, scopes, prefix, created_at, last_used_at FROM api_keys
          WHERE user_id = $1 AND revoked_at IS NULL ORDER BY id DESC",
    )
    .bind(caller.user_id)
    .fetch_all(&state.pool)
    .await?;
    let api_keys = rows
        .into_iter()
        .map(|(id, name, scopes, prefix, created_at, last_used_at)| ApiKey {
            id,
            name,
            scopes,
            prefix,
            created_at,
            last_used_at,
        })
        .collect();
    Ok(axum::Json(ApiKeyList { api_keys }))
}

/// Revoke one of the caller's API keys; 404 for anyone else's.
#[utoipa::path(delete, path = "/api/v1/api-keys/{id}", tag = "auth", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses((status = 204), (status = 403, description = "session_required", body = Problem), (status = 404, body = Problem)))]
pub async fn revoke_api_key(
    State(state): State<AppState>,
    meta: RequestMeta,
    SessionCaller(caller): SessionCaller,
    ResourceId(id): ResourceId,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.pool.begin().await?;
    let revoked =
        sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL")
            .bind(id)
            .bind(caller.user_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    if revoked == 0 {
        return Err(ApiError::NotFound);
    }
    let data = serde_json::json!({"api_key_id": id});
    state.events.record(&mut tx, AuthEventKind::ApiKeyRevoked, Some(caller.user_id), &meta, data).await?;
    state.events.commit(tx).await?;
    state.credentials.forget_api_key(caller.user_id, id);
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_checked_and_trimmed() {
        assert_eq!(parse_email("  Alice@Example.com ").expect("valid"), "Alice@Example.com");
        for bad in
            ["", "alice", "@example.com", "alice@", "alice@example", "a b@example.com", "a@b@example.com", "a@.com"]
        {
            assert!(parse_email(bad).is_err(), "{bad:?} accepted");
        }
    }
}
