//! Logs and metrics for one process.
//!
//! - Logs: `tracing` with `LOG_FORMAT=json|pretty` and the `RUST_LOG` filter, to stdout.
//!   Spans carry `request_id` (HTTP), `user_id` and `order_id` where known, so every line of a
//!   request can be found by its id.
//! - Metrics: one Prometheus registry per process (`metrics` facade +
//!   `metrics-exporter-prometheus`), rendered by the ops server's `/metrics`.
//!   Latency metrics whose names end in `_seconds` are histograms with fixed buckets. Every
//!   metric is described in [`crate::metric_names`]; [`init`] registers the role's series at 0
//!   there, so alerts see them before the first event.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{LevelFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, Settings};

/// Buckets for request and message latencies, in seconds: 0.5 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Keeps error reporting alive; dropping it flushes pending Sentry events.
#[derive(Default)]
pub struct Telemetry {
    _sentry: Option<sentry::ClientInitGuard>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").field("sentry", &self._sentry.is_some()).finish()
    }
}

/// Installs the tracing subscriber and, when `SENTRY_DSN` is set, error reporting to Sentry
/// (errors as events, warnings as breadcrumbs), scrubbed by [`scrub`]. Safe to call more than
/// once per process; later calls leave the first subscriber in place (tests build several apps).
pub fn init(settings: &Settings) -> Telemetry {
    install_crypto_provider();
    let sentry = settings.sentry_dsn.as_ref().map(|dsn| {
        let mut options = sentry::ClientOptions::new();
        options.release = sentry::release_name!();
        options.environment = Some(format!("{:?}", settings.app_env).to_lowercase().into());
        options.server_name = Some(settings.role.as_str().into());
        options.send_default_pii = false;
        options.before_send = Some(std::sync::Arc::new(|event| Some(scrub(event))));
        options.before_breadcrumb = Some(std::sync::Arc::new(|mut crumb| {
            crumb.message = crumb.message.map(|m| redact_emails(&m));
            crumb.data.clear();
            Some(crumb)
        }));
        sentry::init((dsn.expose(), options))
    });
    let filter = EnvFilter::try_new(&settings.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // Errors become Sentry events; warnings ride along as breadcrumbs.
    let sentry_errors =
        sentry.as_ref().map(|_| sentry::integrations::tracing::ErrorLayer::new().with_filter(LevelFilter::ERROR));
    let sentry_crumbs = sentry.as_ref().map(|_| {
        sentry::integrations::tracing::BreadcrumbLayer::new()
            .with_filter(filter_fn(|meta| *meta.level() == tracing::Level::WARN))
    });
    let registry = tracing_subscriber::registry().with(filter).with(sentry_crumbs).with(sentry_errors);
    let result = match settings.log_format {
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json().with_current_span(true).with_span_list(false))
            .try_init(),
        LogFormat::Pretty => registry.with(tracing_subscriber::fmt::layer().with_target(false)).try_init(),
    };
    if result.is_err() {
        tracing::debug!("tracing subscriber already installed");
    }
    crate::metric_names::register(settings.role);
    Telemetry { _sentry: sentry }
}

/// Picks rustls's crypto provider for the whole process. Two providers are compiled in (ring for
/// the NATS client, aws-lc-rs for Sentry's HTTP client); without an explicit choice, the first
/// TLS connection would panic. Ring it is, for both.
pub fn install_crypto_provider() {
    // An error means a provider is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Removes what must never leave the process in an error report: request bodies, cookies,
/// credentials in headers, query strings (tokens travel there sometimes), the user's email and
/// any email address in messages.
pub fn scrub(mut event: sentry::protocol::Event<'static>) -> sentry::protocol::Event<'static> {
    if let Some(request) = event.request.as_mut() {
        request.data = None;
        request.cookies = None;
        request.query_string = None;
        request.headers.retain(|name, _| {
            let name = name.to_ascii_lowercase();
            !(name == "authorization" || name == "cookie" || name == "x-api-key" || name.contains("token"))
        });
    }
    if let Some(user) = event.user.as_mut() {
        user.email = None;
        user.ip_address = None;
    }
    event.message = event.message.map(|m| redact_emails(&m));
    if let Some(log) = event.logentry.as_mut() {
        log.message = redact_emails(&log.message);
    }
    for exception in event.exception.values.iter_mut() {
        exception.value = exception.value.as_deref().map(redact_emails);
    }
    for value in event.extra.values_mut() {
        if let serde_json::Value::String(s) = value {
            *s = redact_emails(s);
        }
    }
    event
}

/// Replaces every word that looks like an email address with `[email]`.
pub fn redact_emails(text: &str) -> String {
    let looks_like_email = |word: &str| {
        let word = word.trim_matches(|c: char| !c.is_alphanumeric());
        word.split_once('@').is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.'))
    };
    if !text.contains('@') {
        return text.to_owned();
    }
    text.split_inclusive(char::is_whitespace)
        .map(|word| {
            let trimmed = word.trim_end();
            if looks_like_email(trimmed) { format!("[email]{}", &word[trimmed.len()..]) } else { word.to_owned() }
        })
        .collect()
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
            crate::metric_names::describe_all();
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

/// Records the process identity as a metric so dashboards can tell processes apart.
pub fn record_build_info(settings: &Settings) {
    metrics_handle();
    metrics::gauge!(
        crate::metric_names::BUILD_INFO,
        "role" => settings.role.as_str(),
        "version" => env!("CARGO_PKG_VERSION")
    )
    .set(1.0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use sentry::protocol::{Event, Exception, Request, User};

    #[test]
    fn error_reports_lose_bodies_credentials_and_emails() {
        let mut request = Request { data: Some("{\"password\":\"hunter2\"}".into()), ..Default::default() };
        request.headers.insert("Authorization".into(), "Bearer eyJ.secret".into());
        request.headers.insert("X-API-Key".into(), "vk_live_secret".into());
        request.headers.insert("Accept".into(), "application/json".into());
        let event = Event {
            request: Some(request),
            user: Some(User { email: Some("alice@example.com".into()), ..Default::default() }),
            message: Some("login failed for alice@example.com from 10.0.0.1".into()),
            exception: vec![Exception { value: Some("no user bob@example.org".into()), ..Default::default() }].into(),
            ..Default::default()
        };
        let scrubbed = scrub(event);
        let text = serde_json::to_string(&scrubbed).expect("serializes");
        for secret in ["hunter2", "eyJ.secret", "vk_live_secret", "alice@example.com", "bob@example.org"] {
            assert!(!text.contains(secret), "{secret} survived: {text}");
        }
        assert!(text.contains("application/json"), "harmless headers stay");
        assert_eq!(scrubbed.message.as_deref(), Some("login failed for [email] from 10.0.0.1"));
    }
}
