//! Building and running the API server.
//!
//! [`Application::build`] binds first (so tests can ask for port 0 and read the real port),
//! connects Postgres and NATS, declares the streams and assembles the router;
//! [`Application::run`] serves until the shutdown token fires and drains in-flight requests.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::request_id::RequestId;
use vault_bus::Bus;
use vault_core::ops::{self, Readiness};
use vault_core::{Settings, db, http, telemetry};

use crate::error::{ApiError, REQUEST_ID};

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub pool: PgPool,
    pub bus: Bus,
}

#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    router: Router,
    readiness: Readiness,
    state: AppState,
    shutdown: CancellationToken,
}

impl Application {
    pub async fn build(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Application> {
        telemetry::record_build_info(&settings);
        telemetry::spawn_upkeep(shutdown.clone());
        let listener = TcpListener::bind(settings.api_addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on API_ADDR {}: {e}", settings.api_addr))?;

        let pool = db::connect(&settings.database_url, 20).await?;
        let bus = Bus::connect(&settings.nats_url, settings.role.as_str()).await?;
        bus.ensure_streams().await?;

        let readiness = Readiness::new();
        readiness.add("postgres", db::readiness_check(pool.clone()));
        readiness.add("nats", bus.readiness_check(Vec::new()));
        readiness.refresh().await;

        let state = AppState { settings: Arc::new(settings), pool, bus };
        let router = router(state.clone(), readiness.clone());
        Ok(Application { listener, router, readiness, state, shutdown })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until shutdown, then drains in-flight requests and closes the connections.
    pub async fn run(self) -> anyhow::Result<()> {
        self.readiness.spawn_refresher(self.shutdown.clone());
        http::serve(self.listener, self.router, self.shutdown.clone()).await?;
        if let Err(e) = self.state.bus.client().flush().await {
            tracing::warn!(error = %e, "could not flush NATS on shutdown");
        }
        self.state.pool.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The whole HTTP surface: `/api/v1/...` plus the ops routes at the root.
pub fn router(state: AppState, readiness: Readiness) -> Router {
    let api = Router::new().fallback(not_found).with_state(state);
    let app = Router::new()
        .nest("/api/v1", api)
        .merge(ops::router(readiness))
        .fallback(not_found)
        .layer(middleware::from_fn(scope_request_id));
    http::observe(app)
}

async fn not_found() -> ApiError {
    ApiError::NotFound
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
