//! Logs and metrics for one process.
//!
//! - Logs: `tracing` with `LOG_FORMAT=json|pretty` and the `RUST_LOG` filter, to stdout.
//!   Spans carry `request_id` (HTTP), `user_id` and `order_id` where known, so every line of a
//!   request can be found by its id.
//! - Metrics: one Prometheus registry per process (`metrics` facade +
//!   `metrics-exporter-prometheus`), rendered by the ops server's `/metrics`.
//!   Latency metrics whose names end in `_seconds` are histograms with fixed buckets.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, Settings};

/// Buckets for request and message latencies, in seconds: 0.5 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the tracing subscriber. Safe to call once per process; a second call is ignored
/// (tests that build several apps in one process call it freely).
pub fn init_tracing(settings: &Settings) {
    let filter = EnvFilter::try_new(&settings.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match settings.log_format {
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json().with_current_span(true).with_span_list(false))
            .try_init(),
        LogFormat::Pretty => registry.with(tracing_subscriber::fmt::layer().with_target(false)).try_init(),
    };
    if result.is_err() {
        tracing::debug!("tracing subscriber already installed");
    }
}

/// The process-wide Prometheus registry, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    METRICS
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
                .expect("the bucket list is a non-empty constant")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (several apps in one test process):
            // then this handle renders an empty registry, which is harmless there.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

/// Keeps histograms bounded in memory: the exporter needs periodic upkeep.
pub fn spawn_upkeep(shutdown: CancellationToken) {
    let handle = metrics_handle();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => handle.run_upkeep(),
            }
        }
    });
}

fn describe() {
    metrics::describe_counter!("http_requests_total", "HTTP requests by method, route and status");
    metrics::describe_histogram!(
        "http_request_duration_seconds",
        metrics::Unit::Seconds,
        "HTTP request latency by method and route"
    );
    metrics::describe_gauge!("vault_ready", "1 when the named readiness check passes, else 0");
    metrics::describe_gauge!("vault_build_info", "Always 1; labels carry the process role and version");
}

/// Records the process identity as a metric so dashboards can tell processes apart.
pub fn record_build_info(settings: &Settings) {
    metrics_handle();
    metrics::gauge!(
        "vault_build_info",
        "role" => settings.role.as_str(),
        "version" => env!("CARGO_PKG_VERSION")
    )
    .set(1.0);
}
