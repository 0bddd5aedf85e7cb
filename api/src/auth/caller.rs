//! Who is calling: the [`Caller`] extractor, for every route that needs authentication.
//!
//! Credentials, in order: `Authorization: Bearer <access JWT>` or `X-API-Key: <key>`.
//! A JWT must verify (see [`super::tokens`]) *and* be live in the database: its `jti` not on the
//! logout denylist, its login family not revoked. An API key must exist, not be revoked, and is
//! limited to its scopes. Failures answer 401 with a stable code; a user never learns whether
//! a token was well-formed but revoked or simply wrong beyond that code.
//!
//! Connections that authenticate without headers (the WebSocket's auth frame) use
//! [`authenticate`] and, while they stay open, [`recheck`]: the same checks, one code path.
//!
//! The database check's positive outcome is kept for up to a second in the process's
//! [`CredentialCache`](super::credential_cache::CredentialCache), so most authenticated requests cost no round trip for their credential;
//! a revocation in this process applies to the very next request, one in another process within
//! that second (the cache's module docs say how).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::tokens::{self, Claims};
use crate::error::ApiError;
use crate::startup::AppState;

/// What an API key may do. Sessions may do everything their role allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Read the account: portfolio, orders, fills, ledger, notifications.
    Read,
    /// Place and cancel orders, deposit.
    Trade,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Trade => "trade",
        }
    }
}

/// How the caller authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    Session { jti: Uuid, family: Uuid, expires_at: DateTime<Utc> },
    ApiKey { id: Uuid, scopes: Vec<Scope> },
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user_id: Uuid,
    pub role: String,
    pub credential: Credential,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.role == "admin"
    }

    /// 403 `insufficient_scope` unless the credential carries `scope`.
    pub fn require_scope(&self, scope: Scope) -> Result<(), ApiError> {
        match &self.credential {
            Credential::ApiKey { scopes, .. } if !scopes.contains(&scope) => Err(ApiError::Forbidden {
                code: "insufficient_scope",
                detail: format!("This API key lacks the {:?} scope.", scope.as_str()),
            }),
            _ => Ok(()),
        }
    }

    /// 403 unless the caller is an admin.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::Forbidden { code: "forbidden", detail: "This route is for administrators.".to_owned() })
        }
    }

    /// 403 unless an admin's logged-in session: admin actions (locks, market halts) are never
    /// taken with an API key, whatever its scopes — a key kept by a monitoring script must not
    /// be able to lock users or halt markets. An API key gets `session_required`.
    pub fn require_admin_session(&self) -> Result<(), ApiError> {
        self.require_admin()?;
        self.require_session().map(|_| ())
    }

    /// 403 unless an admin whose credential may read: a session, or an API key with `read`.
    pub fn require_admin_read(&self) -> Result<(), ApiError> {
        self.require_admin()?;
        self.require_scope(Scope::Read)
    }

    /// The session, or 403 `session_required` for API keys (they cannot manage credentials).
    pub fn require_session(&self) -> Result<(Uuid, Uuid, DateTime<Utc>), ApiError> {
        match &self.credential {
            Credential::Session { jti, family, expires_at } => Ok((*jti, *family, *expires_at)),
            Credential::ApiKey { .. } => Err(ApiError::Forbidden {
                code: "session_required",
                detail: "This route needs a logged-in session, not an API key.".to_owned(),
            }),
        }
    }
}

fn unauthorized(code: &'static str, detail: &str) -> ApiError {
    ApiError::Unauthorized { code, detail: detail.to_owned() }
}

/// Claims already verified by the rate limiter for this request (saves a second verify).
#[derive(Debug, Clone)]
pub struct VerifiedClaims(pub Claims);

/// A credential that passed its cryptographic checks and can be checked against the database
/// again later: a long-lived connection keeps it to notice a logout or a revoked key. It holds
/// an API key only as its hash.
#[derive(Debug, Clone)]
pub enum Presented {
    Session(Claims),
    ApiKey { key_hash: Vec<u8> },
}

/// Authenticates a bare credential — an access JWT, or an API key (told apart by its `vk_`
/// prefix) — exactly as the [`Caller`] extractor authenticates its headers.
pub async fn authenticate(state: &AppState, credential: &str) -> Result<(Caller, Presented), ApiError> {
    let credential = credential.trim();
    let presented = if credential.starts_with(tokens::API_KEY_PREFIX) {
        Presented::ApiKey { key_hash: tokens::hash_secret(credential) }
    } else {
        let claims = state
            .jwt
            .verify(credential)
            .map_err(|_| unauthorized("invalid_token", "The access token is invalid or expired."))?;
        Presented::Session(claims)
    };
    let caller = recheck(state, &presented).await?;
    Ok((caller, presented))
}

/// Checks `presented` against the database: a session must not be logged out or revoked, an API
/// key must exist, not be revoked and not belong to a user an administrator locked. The token's
/// expiry is not looked at again (it was when it was presented; a WebSocket ends at it).
pub async fn recheck(state: &AppState, presented: &Presented) -> Result<Caller, ApiError> {
    match presented {
        Presented::Session(claims) => session_caller(state, claims.clone()).await,
        Presented::ApiKey { key_hash } => api_key_caller(state, key_hash).await,
    }
}

/// A caller whose credential carries the `read` scope. As an extractor it runs before the
/// request's path, query and body are read, so an API key without the scope is refused 403
/// whatever else is wrong with its request (a check inside the handler came after 404 and 422).
#[derive(Debug, Clone)]
pub struct Reader(pub Caller);

/// A caller whose credential carries the `trade` scope (see [`Reader`]).
#[derive(Debug, Clone)]
pub struct Trader(pub Caller);

/// A caller with a logged-in session, not an API key: for the routes that manage credentials.
/// Like [`Reader`], refused (403 `session_required`) before the rest of the request is read.
#[derive(Debug, Clone)]
pub struct SessionCaller(pub Caller);

/// An administrator whose credential may read (a session, or an API key with `read`): for the
/// admin reads. Like [`Reader`], refused (403) before the rest of the request is read, so a
/// non-administrator learns nothing from a malformed id or query.
#[derive(Debug, Clone)]
pub struct AdminReader(pub Caller);

/// An administrator's logged-in session: for admin actions (see
/// [`Caller::require_admin_session`]), refused (403) before the rest of the request is read.
#[derive(Debug, Clone)]
pub struct AdminSession(pub Caller);

/// Implements `$name` as an extractor: the [`Caller`], if `$check` passes — before the rest of
/// the request is read.
macro_rules! checked_caller {
    ($name:ident, $check:expr) => {
        impl FromRequestParts<AppState> for $name {
            type Rejection = ApiError;

            async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
                let caller = Caller::from_request_parts(parts, state).await?;
                let check: fn(&Caller) -> Result<(), ApiError> = $check;
                check(&caller)?;
                Ok($name(caller))
            }
        }
    };
}

checked_caller!(Reader, |c| c.require_scope(Scope::Read));
checked_caller!(Trader, |c| c.require_scope(Scope::Trade));
checked_caller!(SessionCaller, |c| c.require_session().map(|_| ()));
checked_caller!(AdminReader, Caller::require_admin_read);
checked_caller!(AdminSession, Caller::require_admin_session);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = if let Some(value) = parts.headers.get(axum::http::header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
                .map(str::trim)
                .ok_or_else(|| unauthorized("invalid_token", "Use Authorization: Bearer <access token>."))?;
            let claims = match parts.extensions.get::<VerifiedClaims>() {
                Some(VerifiedClaims(claims)) => claims.clone(),
                None => state
                    .jwt
                    .verify(token)
                    .map_err(|_| unauthorized("invalid_token", "The access token is invalid or expired."))?,
            };
            session_caller(state, claims).await?
        } else if let Some(value) = parts.headers.get("x-api-key") {
            let key = value.to_str().map_err(|_| unauthorized("invalid_api_key", "The API key is invalid."))?.trim();
            if !key.starts_with(tokens::API_KEY_PREFIX) {
                return Err(unauthorized("invalid_api_key", "The API key is invalid or revoked."));
            }
            api_key_caller(state, &tokens::hash_secret(key)).await?
        } else {
            return Err(unauthorized("unauthenticated", "Send Authorization: Bearer <token> or X-API-Key."));
        };
        tracing::Span::current().record("user_id", tracing::field::display(caller.user_id));
        Ok(caller)
    }
}

async fn session_caller(state: &AppState, claims: Claims) -> Result<Caller, ApiError> {
    let cache = &state.credentials;
    if let Some(caller) = cache.session(claims.jti, claims.sub, claims.fam) {
        return Ok(caller);
    }
    // Taken before the query: a revocation committed while it runs keeps its answer out.
    let ticket = cache.ticket();
    let row: Option<(String, bool, bool)> = sqlx::query_as(
        "SELECT u.role,
                EXISTS (SELECT 1 FROM revoked_access_tokens r WHERE r.jti = $2),
                COALESCE((SELECT f.revoked_at IS NOT NULL FROM token_families f WHERE f.id = $3), true)
           FROM users u WHERE u.id = $1",
    )
    .bind(claims.sub)
    .bind(claims.jti)
    .bind(claims.fam)
    .fetch_optional(&state.pool)
    .await?;
    match row {
        Some((role, false, false)) => {
            let caller = Caller {
                user_id: claims.sub,
                role,
                credential: Credential::Session {
                    jti: claims.jti,
                    family: claims.fam,
                    expires_at: DateTime::from_timestamp(claims.exp, 0).unwrap_or_else(Utc::now),
                },
            };
            cache.put_session(ticket, claims.jti, &caller);
            Ok(caller)
        }
        Some(_) => Err(unauthorized("token_revoked", "The session has ended; log in again.")),
        None => Err(unauthorized("invalid_token", "The access token is invalid or expired.")),
    }
}

async fn api_key_caller(state: &AppState, key_hash: &[u8]) -> Result<Caller, ApiError> {
    let cache = &state.credentials;
    if let Some(caller) = cache.api_key(key_hash) {
        return Ok(caller);
    }
    let ticket = cache.ticket();
    let row: Option<(Uuid, Uuid, Vec<String>, String)> = sqlx::query_as(
        "SELECT k.id, k.user_id, k.scopes, u.role
           FROM api_keys k JOIN users u ON u.id = k.user_id
          WHERE k.key_hash = $1 AND k.revoked_at IS NULL
            AND (u.locked_until IS NULL OR u.locked_until < '9999-01-01T00:00:00Z')",
    )
    .bind(key_hash)
    .fetch_optional(&state.pool)
    .await?;
    let (id, user_id, scopes, role) =
        row.ok_or_else(|| unauthorized("invalid_api_key", "The API key is invalid or revoked."))?;
    // Last-used time at minute resolution: one write per key per minute, not one per request
    // (and only on a cache miss, at most once a second, is it even asked for).
    sqlx::query(
        "UPDATE api_keys SET last_used_at = now()
          WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
    )
    .bind(id)
    .execute(&state.pool)
    .await?;
    let scopes = scopes
        .iter()
        .filter_map(|s| match s.as_str() {
            "read" => Some(Scope::Read),
            "trade" => Some(Scope::Trade),
            _ => None,
        })
        .collect();
    let caller = Caller { user_id, role, credential: Credential::ApiKey { id, scopes } };
    cache.put_api_key(ticket, key_hash, &caller);
    Ok(caller)
}
