//! `/health`, `/readyz` and `/metrics`, served by every process.
//!
//! - `/health` answers 200 while the process lives: a liveness probe must not restart a process
//!   because a dependency is down.
//! - `/readyz` answers 200 only when every registered [`Check`] passes, else 503 with a JSON body
//!   naming what is down (and `Retry-After`, as every 503 of the API has). Checks run in the background every [`REFRESH`] (and once before the
//!   server starts), so a probe storm never becomes a load on Postgres or NATS, and the answer
//!   returns to 200 on its own when the dependency does. Shutdown turns it 503 at once
//!   (`draining`) so load balancers stop sending work while in-flight requests finish.
//! - `/metrics` renders this process's Prometheus registry.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::future::BoxFuture;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// How often readiness checks run.
pub const REFRESH: Duration = Duration::from_secs(1);
/// A check that takes longer than this counts as failed.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// One readiness check: `Ok` when the dependency works, else a short reason for operators.
pub type Check = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// The latest readiness verdict and the checks that produce it. Cheap to clone.
#[derive(Clone)]
pub struct Readiness {
    inner: Arc<Inner>,
}

struct Inner {
    checks: RwLock<Vec<(&'static str, Check)>>,
    report: RwLock<Report>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness").field("report", &self.report()).finish()
    }
}

/// What `/readyz` answers.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Report {
    pub ready: bool,
    /// `true` once shutdown started.
    pub draining: bool,
    /// Check name → `"ok"` or the reason it failed.
    pub checks: BTreeMap<&'static str, String>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    /// Not ready until the first refresh has run.
    pub fn new() -> Self {
        Readiness {
            inner: Arc::new(Inner {
                checks: RwLock::new(Vec::new()),
                report: RwLock::new(Report { ready: false, draining: false, checks: BTreeMap::new() }),
            }),
        }
    }

    /// Registers a named check (e.g. `postgres`, `nats`).
    pub fn add(&self, name: &'static str, check: Check) {
        self.inner
            .checks
            .write()
            .expect("readiness lock is never poisoned: no code panics holding it")
            .push((name, check));
    }

    pub fn report(&self) -> Report {
        self.inner.report.read().expect("readiness lock is never poisoned: no code panics holding it").clone()
    }

    /// Runs every check once (concurrently, each bounded by [`CHECK_TIMEOUT`]) and stores the verdict.
    pub async fn refresh(&self) -> Report {
        let checks: Vec<(&'static str, Check)> =
            self.inner.checks.read().expect("readiness lock is never poisoned: no code panics holding it").clone();
        let results = futures::future::join_all(checks.iter().map(|(name, check)| {
            let check = check.clone();
            async move {
                let verdict = match tokio::time::timeout(CHECK_TIMEOUT, check()).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(reason)) => Err(reason),
                    Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
                };
                (*name, verdict)
            }
        }))
        .await;
        let mut report =
            self.inner.report.write().expect("readiness lock is never poisoned: no code panics holding it");
        for (name, verdict) in results {
            metrics::gauge!("vault_ready", "check" => name).set(if verdict.is_ok() { 1.0 } else { 0.0 });
            let now = verdict.err().unwrap_or_else(|| "ok".to_owned());
            // Log transitions only: a dependency down for an hour is one warning, not 3,600.
            match report.checks.get(name) {
                Some(before) if *before == now => {}
                _ if now == "ok" => tracing::info!(check = name, "ready"),
                _ => tracing::warn!(check = name, reason = %now, "not ready"),
            }
            report.checks.insert(name, now);
        }
        report.ready = !report.draining && report.checks.values().all(|v| v == "ok");
        report.clone()
    }

    /// Marks the process as draining: `/readyz` answers 503 from now on.
    pub fn set_draining(&self) {
        let mut report =
            self.inner.report.write().expect("readiness lock is never poisoned: no code panics holding it");
        report.draining = true;
        report.ready = false;
    }

    /// Refreshes every [`REFRESH`] until `shutdown`, then marks the process draining.
    pub fn spawn_refresher(&self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => { this.refresh().await; }
                }
            }
            this.set_draining();
        })
    }
}

/// The ops routes. The API merges them into its router; other processes serve them alone.
pub fn router(readiness: Readiness) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(readiness)
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(readiness): State<Readiness>) -> Response {
    let report = readiness.report();
    if report.ready {
        return (StatusCode::OK, Json(report)).into_response();
    }
    // The answer can change at the next round of checks.
    let retry_after = REFRESH.as_secs().max(1).to_string();
    (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, retry_after)], Json(report)).into_response()
}

async fn metrics_text() -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], crate::telemetry::metrics_handle().render())
        .into_response()
}
