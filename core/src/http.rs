//! What every HTTP server in CryptoVault wears, and how it stops.
//!
//! [`observe`] adds, outermost first: `X-Request-Id` (the client's, or a fresh UUID), echoed
//! on the response; a tracing span per request carrying that id; and the
//! `http_requests_total` / `http_request_duration_seconds` metrics labelled by the *matched
//! route* (never the raw path, which would explode the label set).
//!
//! [`serve`] binds nothing itself (callers bind, so tests can use port 0), stops accepting
//! when the shutdown token fires and lets in-flight requests finish, bounded by a grace period.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::HeaderName;
use axum::middleware::{self, Next};
use axum::response::Response;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

/// The header that carries a request's id across HTTP, NATS and logs.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// How long in-flight requests may take to finish once shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(25);

/// Wraps `router` in request ids, tracing and HTTP metrics.
pub fn observe(router: Router) -> Router {
    router.layer(
        ServiceBuilder::new()
            .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
            .layer(PropagateRequestIdLayer::new(REQUEST_ID))
            .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
                let request_id =
                    req.extensions().get::<RequestId>().and_then(|id| id.header_value().to_str().ok()).unwrap_or("-");
                tracing::info_span!(
                    "http",
                    request_id = %request_id,
                    method = %req.method(),
                    path = %req.uri().path(),
                    user_id = tracing::field::Empty,
                )
            }))
            .layer(middleware::from_fn(record_metrics)),
    )
}

async fn record_metrics(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().as_str().to_owned();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Serves `app` on `listener` until `shutdown` fires, then drains: no new connections, idle
/// keep-alive connections closed, in-flight requests finished (for at most [`SHUTDOWN_GRACE`]).
pub async fn serve(listener: TcpListener, app: Router, shutdown: CancellationToken) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "listening");
    let drain_started = shutdown.clone();
    let server = std::future::IntoFuture::into_future(
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(shutdown.cancelled_owned()),
    );
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result,
        () = async {
            drain_started.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!(addr = %local, grace = ?SHUTDOWN_GRACE, "in-flight requests did not finish within the grace period");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::Notify;

    use super::*;

    /// A request in flight when shutdown starts is answered in full, and `serve` returns after.
    #[tokio::test]
    async fn shutdown_lets_an_in_flight_request_finish() {
        let entered = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        let (e, r) = (entered.clone(), release.clone());
        let app = Router::new().route(
            "/slow",
            get(move || async move {
                e.notify_one();
                r.notified().await;
                "finished"
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, observe(app), shutdown.clone()));

        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conn.write_all(b"GET /slow HTTP/1.1\r\nhost: test\r\n\r\n").await.expect("send");
        entered.notified().await;

        shutdown.cancel();
        // New connections are refused once draining has begun.
        let refused = async {
            loop {
                if tokio::net::TcpStream::connect(addr).await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), refused).await.expect("listener closes on shutdown");
        assert!(!server.is_finished(), "the server waits for the in-flight request");

        release.notify_one();
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(5), conn.read_to_string(&mut response))
            .await
            .expect("response within deadline")
            .expect("read");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains("x-request-id"), "{response}");
        assert!(response.ends_with("finished"), "{response}");
        tokio::time::timeout(Duration::from_secs(5), server).await.expect("serve returns").expect("join").expect("ok");
    }
}
