//! Building and running the API server.
//!
//! [`Application::build`] binds first (so tests can ask for port 0 and read the real port),
//! connects Postgres and NATS, declares the streams and assembles the router;
//! [`Application::run`] serves until the shutdown token fires, drains in-flight requests and
//! lets open WebSockets close with 1001 (going away).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::RequestId;
use vault_bus::Bus;
use vault_core::ops::{self, Readiness};
use vault_core::{Settings, db, http, telemetry};

use crate::auth::credential_cache::{self, CredentialCache};
use crate::auth::password::Hasher;
use crate::auth::tokens::JwtKeys;
use crate::error::{ApiError, REQUEST_ID};
use crate::events::AuthEvents;
use crate::json::BODY_LIMIT;
use crate::prices::PriceBook;
use crate::rate_limit::{self, RateLimits};
use crate::trading::backlog::Backlog;
use crate::trading::intake::IntakeWriter;
use crate::trading::markets::MarketCache;
use crate::trading::portfolio_cache::{self, PortfolioCache, PortfolioCacheConfig};
use crate::ws::{Gateway, WsConfig};
use crate::{admin, auth, hardening, notifications, openapi, prices, trading, ws};

/// What every handler can reach: one shared [`Shared`] behind an `Arc`.
///
/// axum clones the state for every extractor and middleware of every request; cloning the
/// fields themselves (a NATS client with its channels, JWT validation sets, pools) cost more
/// CPU per `GET /portfolio` than its handler, so a clone is one reference count here.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The fields of [`AppState`].
#[derive(Debug)]
pub struct Shared {
    pub settings: Arc<Settings>,
    pub pool: PgPool,
    pub bus: Bus,
    pub hasher: Hasher,
    pub jwt: JwtKeys,
    /// Recent positive credential checks (see [`CredentialCache`]).
    pub credentials: CredentialCache,
    pub limits: Arc<RateLimits>,
    pub events: AuthEvents,
    /// Every market's rules, cached (see [`MarketCache`]).
    pub markets: MarketCache,
    /// The latest price of every market, fed by the PRICES stream.
    pub prices: PriceBook,
    /// The WebSocket feed's hub and tunables (`/ws`).
    pub ws: Gateway,
    /// Order intake rows, inserted in batches (see [`IntakeWriter`]).
    pub intake: IntakeWriter,
    /// The engine's queue per partition: new orders are refused above the limit (see [`Backlog`]).
    pub backlog: Backlog,
    /// Recently read balance rows, dropped by engine events (see [`PortfolioCache`]).
    pub portfolios: PortfolioCache,
}

/// The tunables code sets (tests shorten or lengthen them); the defaults are the contract's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tunables {
    pub ws: WsConfig,
    pub portfolio_cache: PortfolioCacheConfig,
}

/// How long one request may take before it is answered 503.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long shutdown waits for open WebSockets to finish their close (each one is bounded by
/// [`WsConfig::close_timeout`] already).
pub const WS_DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    router: Router,
    readiness: Readiness,
    state: AppState,
    shutdown: CancellationToken,
    /// The auth events' relay, and what stops it: after the HTTP drain, so the events of the
    /// requests it finishes go out with its last pass.
    relay: tokio::task::JoinHandle<()>,
    /// Dropped (which stops the relay) in `run` after the drain, or with an application that
    /// never runs or whose serving fails.
    relay_stop: tokio_util::sync::DropGuard,
}

impl Application {
    pub async fn build(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Application> {
        Application::build_with(settings, WsConfig::default(), shutdown).await
    }

    /// [`Application::build`] with the WebSocket tunables given (tests shorten the intervals).
    pub async fn build_with(
        settings: Settings,
        ws_config: WsConfig,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Application> {
        Application::build_tuned(settings, Tunables { ws: ws_config, ..Tunables::default() }, shutdown).await
    }

    /// [`Application::build`] with every tunable given.
    pub async fn build_tuned(
        settings: Settings,
        tunables: Tunables,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Application> {
        telemetry::record_build_info(&settings);
        telemetry::spawn_upkeep(shutdown.clone());
        let listener = http::bind(settings.api_addr)
            .map_err(|e| anyhow::anyhow!("cannot listen on API_ADDR {}: {e}", settings.api_addr))?;

        let pool = db::connect(&settings.database_url, settings.database_pool_size, db::Plans::Custom).await?;
        let bus = Bus::connect(&settings.nats_url, settings.role.as_str()).await?.with_replicas(settings.nats_replicas);
        // Retried like the other processes' declaration: a cluster still electing its leader is
        // waited for, not a reason to exit.
        bus.declare(&[]).await?;

        let readiness = Readiness::new();
        readiness.add("postgres", db::readiness_check(pool.clone()));
        readiness.add("nats", bus.readiness_check(Vec::new()));
        // The API reports the lag of every consumer, so it stays visible while one is down.
        vault_bus::lag::spawn_reporter(bus.clone(), None, shutdown.clone());
        readiness.refresh().await;

        let secret = settings.jwt_secret.as_ref().ok_or_else(|| anyhow::anyhow!("JWT_SECRET is required"))?;
        let jwt = JwtKeys::new(secret.expose().as_bytes());
        // Password hashing gets every core but one: the runtime keeps a core for everything
        // else, so a login storm queues logins instead of slowing every other request.
        let cores = std::thread::available_parallelism().map(usize::from).unwrap_or(2);
        let hashing_slots = cores.saturating_sub(1).max(1);
        let limits = Arc::new(RateLimits::from_settings(&settings));
        limits.clone().spawn_housekeeping(shutdown.clone());
        spawn_housekeeping(pool.clone(), shutdown.clone());
        let markets = MarketCache::load(&pool).await?;
        markets.spawn_refresher(pool.clone(), shutdown.clone());
        let credentials = CredentialCache::default();
        credential_cache::spawn_invalidator(&bus, credentials.clone(), shutdown.clone());
        let price_book = PriceBook::new();
        prices::spawn(bus.clone(), price_book.clone(), markets.clone(), shutdown.clone());
        let portfolios = PortfolioCache::new(bus.client(), tunables.portfolio_cache);
        portfolio_cache::spawn_feed(&bus, portfolios.clone(), shutdown.clone());
        let intake = IntakeWriter::start(settings.database_url.connect_options());
        let backlog = Backlog::new(settings.order_backlog_limit);
        // Also creates the engine's partition consumers no engine has declared yet, from its
        // first reading on (see `trading::backlog`).
        backlog.spawn_monitor(bus.clone(), shutdown.clone());
        let events = AuthEvents::new(pool.clone());
        let relay_stop = CancellationToken::new();
        let relay = events.spawn_relay(bus.clone(), relay_stop.clone());
        let state = AppState(Arc::new(Shared {
            settings: Arc::new(settings),
            intake,
            backlog,
            events: events.clone(),
            pool,
            ws: Gateway::new(&bus, tunables.ws, portfolios.clone(), credentials.revocations(), shutdown.clone()),
            bus,
            hasher: Hasher::new(hashing_slots),
            jwt,
            credentials,
            limits,
            markets,
            prices: price_book,
            portfolios,
        }));
        let router = router(state.clone(), readiness.clone());
        Ok(Application { listener, router, readiness, state, shutdown, relay, relay_stop: relay_stop.drop_guard() })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until shutdown, then drains in-flight requests and closes the connections.
    pub async fn run(self) -> anyhow::Result<()> {
        self.readiness.spawn_refresher(self.shutdown.clone());
        http::serve(self.listener, self.router, self.shutdown.clone()).await?;
        // Upgraded connections are no longer the HTTP server's: they close themselves on the
        // same token; wait for their close frames before the process goes.
        self.state.ws.drain(WS_DRAIN).await;
        drop(self.relay_stop);
        if let Err(e) = self.relay.await {
            tracing::error!(error = %e, "the auth events' relay ended abnormally");
        }
        self.state.bus.flush_before_exit().await;
        db::close_before_exit(&self.state.pool).await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The whole HTTP surface: `/api/v1/...` plus the ops routes at the root, with the hardening of
/// `API.md` on every route (outermost first): request id and metrics, security headers, CORS
/// (preflights from unlisted origins refused), panics answered as a bare 500, a request
/// timeout, and the 64 KiB body limit.
pub fn router(state: AppState, readiness: Readiness) -> Router {
    let cors_origins = state.settings.cors_origins.clone();
    let trusted_proxies = Arc::new(state.settings.trusted_proxies.clone());
    let api = Router::new()
        .merge(auth::router())
        .merge(trading::router())
        .merge(admin::router())
        .merge(notifications::router())
        .merge(ws::router())
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/docs", get(openapi::docs))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), rate_limit::limit))
        .with_state(state);
    let app = Router::new()
        .nest("/api/v1", api)
        .merge(ops::router(readiness))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(refuse_large_bodies))
        .layer(middleware::from_fn(time_limit))
        .layer(CatchPanicLayer::custom(|_: Box<dyn std::any::Any + Send>| {
            ApiError::Internal(anyhow::anyhow!("a handler panicked")).into_response()
        }));
    // Before anything reads the client's address (the rate limits, the handlers); without
    // trusted proxies the client is the peer, read where it is needed, and no layer is added.
    let app = if trusted_proxies.is_empty() {
        app
    } else {
        app.layer(middleware::from_fn_with_state(trusted_proxies, crate::client_ip::resolve))
    };
    let app = app
        .layer(hardening::cors(&cors_origins))
        .layer(middleware::from_fn_with_state(Arc::new(cors_origins), hardening::refuse_foreign_preflight));
    http::observe(hardening::security_headers(app).layer(middleware::from_fn(scope_request_id)))
}

/// 413 before reading a body whose declared length is over the limit.
async fn refuse_large_bodies(req: Request, next: Next) -> Response {
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > BODY_LIMIT as u64) {
        // The unread body is still on the wire: close the connection rather than let the client
        // reuse it (and have its next request read as the rest of this one).
        let mut response = ApiError::PayloadTooLarge.into_response();
        response.headers_mut().insert(header::CONNECTION, axum::http::HeaderValue::from_static("close"));
        return response;
    }
    next.run(req).await
}

async fn time_limit(req: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!("request timed out after {REQUEST_TIMEOUT:?}");
            ApiError::Unavailable("request timed out").into_response()
        }
    }
}

/// Deletes what can no longer matter: denylisted access tokens past their expiry, refresh
/// tokens past theirs, failed logins of emails without an account once forgotten (and not
/// locking). Hourly, until shutdown.
fn spawn_housekeeping(pool: PgPool, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    let result = sqlx::query("DELETE FROM revoked_access_tokens WHERE expires_at < now() - interval '1 minute'")
                        .execute(&pool)
                        .await
                        .and(sqlx::query("DELETE FROM refresh_tokens WHERE expires_at < now() - interval '1 day'").execute(&pool).await)
                        .and(forget_login_failures(&pool).await);
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "token housekeeping failed; will retry");
                    }
                }
            }
        }
    });
}

/// Deletes the failed-login counts of emails without an account whose last failure is older
/// than [`crate::auth::FAILURES_FORGOTTEN_AFTER_HOURS`] (and whose lock, if any, is over): the
/// next failure would start afresh anyway.
pub async fn forget_login_failures(pool: &PgPool) -> Result<sqlx::postgres::PgQueryResult, sqlx::Error> {
    sqlx::query(
        "DELETE FROM login_failures
          WHERE last_failed_login_at < now() - make_interval(hours => $1)
            AND (locked_until IS NULL OR locked_until <= now())",
    )
    .bind(crate::auth::FAILURES_FORGOTTEN_AFTER_HOURS)
    .execute(pool)
    .await
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

/// A problem body for 405 too (axum keeps its `Allow` header on the answer).
async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Makes the request id available to problem bodies built anywhere inside the request.
async fn scope_request_id(req: Request, next: Next) -> Response {
    let id = req
        .extensions()
        .get::<RequestId>()
        .and_then(|id| id.header_value().to_str().ok())
        .unwrap_or_default()
        .to_owned();
    REQUEST_ID.scope(id, next.run(req)).await
}
