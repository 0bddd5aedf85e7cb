//! Rate limits: token buckets (GCRA, `governor`) per caller, per IP and per login email.
//!
//! | limiter | key | rate | burst | where |
//! |---|---|---|---|---|
//! | user | user id (JWT `sub`) or API key | `RATE_LIMIT_USER_PER_SEC` /s | ×2 | requests with a valid JWT, or an API key found live in the credential cache, except the routes below |
//! | ip | client IP | `RATE_LIMIT_IP_PER_SEC` /s | ×2 | every other request (an API key not checked in the last second included), and `/auth/login`, `/auth/signup`, `/auth/refresh` whatever they carry |
//! | login | lowercased email | `RATE_LIMIT_LOGIN_PER_MIN` /min | = rate | `POST /auth/login` |
//!
//! A rate of 0 turns a limiter off. Limited responses carry `X-RateLimit-Limit` (the bucket
//! size), `X-RateLimit-Remaining` (requests left now) and `X-RateLimit-Reset` (seconds until the
//! bucket is full again); a refused request gets 429 with `Retry-After`.
//! The buckets live in this process: with N replicas behind a balancer, a client can get up
//! to N times the rate. Keys idle for a while are evicted every minute, so memory stays bounded.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vault_core::Settings;

use crate::auth::caller::{Credential, VerifiedClaims};
use crate::auth::tokens;
use crate::error::ApiError;
use crate::startup::AppState;

type Keyed<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock, StateInformationMiddleware>;

/// One keyed token bucket with its advertised size.
pub struct Limiter<K: Hash + Eq + Clone> {
    inner: Keyed<K>,
    burst: u32,
    per: Duration,
    rate: u32,
}

impl<K: Hash + Eq + Clone> std::fmt::Debug for Limiter<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter").field("rate", &self.rate).field("per", &self.per).field("burst", &self.burst).finish()
    }
}

/// The verdict of one check, ready to become headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub limit: u32,
    pub remaining: u32,
    pub reset_secs: u64,
    pub allowed: bool,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    /// `rate` requests per `per`, bucket of `burst`; `None` when `rate` is 0 (limit off).
    fn new(rate: u32, per: Duration, burst: u32) -> Option<Self> {
        let rate_nz = NonZeroU32::new(rate)?;
        let burst = burst.max(rate);
        let quota = Quota::with_period(per / rate_nz.get())
            .expect("a positive rate gives a positive period")
            .allow_burst(NonZeroU32::new(burst).expect("burst ≥ rate > 0"));
        Some(Limiter {
            inner: RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>(),
            burst,
            per,
            rate,
        })
    }

    pub fn check(&self, key: &K) -> Verdict {
        let per_token = self.per.as_secs_f64() / f64::from(self.rate);
        match self.inner.check_key(key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                let reset = (f64::from(self.burst - remaining) * per_token).ceil() as u64;
                Verdict { limit: self.burst, remaining, reset_secs: reset, allowed: true }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Verdict {
                    limit: self.burst,
                    remaining: 0,
                    reset_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
                    allowed: false,
                }
            }
        }
    }

    fn evict_idle(&self) {
        self.inner.retain_recent();
        self.inner.shrink_to_fit();
    }
}

/// Every limiter of the API.
#[derive(Debug)]
pub struct RateLimits {
    pub user: Option<Limiter<String>>,
    pub ip: Option<Limiter<IpAddr>>,
    pub login: Option<Limiter<String>>,
}

impl RateLimits {
    pub fn from_settings(settings: &Settings) -> Self {
        let second = Duration::from_secs(1);
        RateLimits {
            user: Limiter::new(
                settings.rate_limit_user_per_sec,
                second,
                settings.rate_limit_user_per_sec.saturating_mul(2),
            ),
            ip: Limiter::new(settings.rate_limit_ip_per_sec, second, settings.rate_limit_ip_per_sec.saturating_mul(2)),
            login: Limiter::new(
                settings.rate_limit_login_per_min,
                Duration::from_secs(60),
                settings.rate_limit_login_per_min,
            ),
        }
    }

    /// Checks the per-email login bucket: when it is empty, the 429 to answer, carrying this
    /// bucket's headers.
    pub fn check_login(&self, email_lower: &str) -> Result<Option<Verdict>, Box<Response>> {
        match &self.login {
            None => Ok(None),
            Some(limiter) => {
                let verdict = limiter.check(&email_lower.to_owned());
                if verdict.allowed {
                    Ok(Some(verdict))
                } else {
                    metrics::counter!("vault_rate_limited_total").increment(1);
                    let mut refused = ApiError::RateLimited { retry_after_secs: verdict.reset_secs }.into_response();
                    set_headers(refused.headers_mut(), &verdict);
                    Err(Box::new(refused))
                }
            }
        }
    }

    /// Evicts idle keys every minute until shutdown.
    pub fn spawn_housekeeping(self: std::sync::Arc<Self>, shutdown: CancellationToken) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        if let Some(l) = &self.user { l.evict_idle(); }
                        if let Some(l) = &self.ip { l.evict_idle(); }
                        if let Some(l) = &self.login { l.evict_idle(); }
                    }
                }
            }
        });
    }
}

/// Sets the `X-RateLimit-*` headers of `verdict` on `headers`.
pub fn set_headers(headers: &mut HeaderMap, verdict: &Verdict) {
    headers.insert("x-ratelimit-limit", HeaderValue::from(verdict.limit));
    headers.insert("x-ratelimit-remaining", HeaderValue::from(verdict.remaining));
    headers.insert("x-ratelimit-reset", HeaderValue::from(verdict.reset_secs));
}

/// Middleware for `/api/v1`: picks the caller's bucket (user, API key or IP) before any
/// database work, refuses with 429 when it is empty, and sets the headers on every answer.
/// A valid JWT verified here is handed to the [`crate::auth::caller::Caller`] extractor.
pub async fn limit(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let limits = &state.limits;
    let verdict = if needs_no_login(req.uri().path()) {
        client_ip_verdict(limits, &req)
    } else if let Some(claims) = bearer_claims(&state, req.headers()) {
        let verdict = limits.user.as_ref().map(|l| l.check(&format!("u:{}", claims.sub)));
        req.extensions_mut().insert(VerifiedClaims(claims));
        verdict
    } else if let Some(key) = live_api_key(&state, req.headers()) {
        limits.user.as_ref().map(|l| l.check(&format!("k:{key}")))
    } else {
        client_ip_verdict(limits, &req)
    };
    let mut response = match verdict {
        Some(v) if !v.allowed => {
            metrics::counter!("vault_rate_limited_total").increment(1);
            ApiError::RateLimited { retry_after_secs: v.reset_secs }.into_response()
        }
        _ => next.run(req).await,
    };
    // A handler that answered with a tighter bucket's headers (the login's per-email bucket)
    // keeps them: they are the ones that tell the client when to come back.
    if let Some(v) = verdict
        && !response.headers().contains_key("x-ratelimit-limit")
    {
        set_headers(response.headers_mut(), &v);
    }
    response
}

/// The routes a client calls without being logged in. They are charged to the client's IP
/// whatever credential the request carries: a token of the caller's own account would
/// otherwise buy a bucket beside the IP's for logins and signups (each an argon2 hash).
fn needs_no_login(path: &str) -> bool {
    // Seen inside the `/api/v1` nest, which strips its prefix.
    matches!(path.trim_end_matches('/'), "/auth/login" | "/auth/signup" | "/auth/refresh")
}

fn client_ip_verdict(limits: &RateLimits, req: &Request) -> Option<Verdict> {
    let ip = crate::client_ip::client_ip(req.extensions());
    match (ip, &limits.ip) {
        (Some(ip), Some(l)) => Some(l.check(&crate::client_ip::limit_key(ip))),
        _ => None,
    }
}

/// The id of the request's API key if the credential cache found it live within its TTL (no
/// database work here). Any other key — unknown, revoked, made up, or live but not checked in
/// the last second — is charged to the IP's bucket: a made-up key per request must not buy a
/// fresh bucket each time. A busy key's first request of each second goes to its IP's bucket.
fn live_api_key(state: &AppState, headers: &HeaderMap) -> Option<Uuid> {
    let key = headers.get("x-api-key")?.to_str().ok()?.trim();
    match state.credentials.api_key(&tokens::hash_secret(key))?.credential {
        Credential::ApiKey { id, .. } => Some(id),
        Credential::Session { .. } => None,
    }
}

fn bearer_claims(state: &AppState, headers: &HeaderMap) -> Option<tokens::Claims> {
    let value = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?;
    state.jwt.verify(token.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refuses_with_a_reset_time() {
        let limiter = Limiter::<String>::new(2, Duration::from_secs(1), 4).expect("on");
        let key = "alice".to_owned();
        let verdicts: Vec<Verdict> = (0..5).map(|_| limiter.check(&key)).collect();
        assert!(verdicts[..4].iter().all(|v| v.allowed), "{verdicts:?}");
        assert_eq!(verdicts[0].limit, 4);
        assert_eq!(verdicts[3].remaining, 0);
        assert!(!verdicts[4].allowed);
        assert!(verdicts[4].reset_secs >= 1);
        assert!(limiter.check(&"bob".to_owned()).allowed, "other keys have their own bucket");
        assert!(Limiter::<String>::new(0, Duration::from_secs(1), 0).is_none(), "0 turns the limit off");
    }
}
