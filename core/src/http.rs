//! What every HTTP server in CryptoVault wears, how it defends itself, and how it stops.
//!
//! [`observe`] adds, outermost first: `X-Request-Id` (the client's if it is a usable id — at
//! most [`MAX_REQUEST_ID`] characters of `[A-Za-z0-9._:/+=-]` — else a fresh UUID, so a client
//! cannot put kilobytes of arbitrary text into every log line, NATS header and audit row of its
//! request), echoed on the response; a tracing span per request carrying that id; and the
//! `http_requests_total` / `http_request_duration_seconds` metrics labelled by the *matched
//! route* (never the raw path, which would explode the label set), and the
//! `http_requests_in_flight` gauge: what a drain is waiting for after SIGTERM.
//!
//! [`serve`] binds nothing itself (callers bind with [`bind`], so tests can use port 0), stops
//! accepting when the shutdown token fires and lets in-flight requests finish, bounded by a
//! grace period.
//!
//! # Connection limits
//!
//! Every server here (the API and each process's ops endpoints) runs hyper's HTTP/1.1 server
//! directly rather than through `axum::serve`, which exposes none of these knobs. The limits
//! protect the process from clients that are slow, idle or large on purpose:
//!
//! - [`HEADER_READ_TIMEOUT`] (10 s): the request line and headers must arrive within it,
//!   counted from the moment the server waits for a request: on a new connection and between
//!   requests on a kept-alive one. A slowloris client (a header trickled a byte at a time) and a
//!   connection that sends nothing are closed when it passes, without an answer. It is therefore
//!   also the keep-alive idle timeout: a proxy in front must drop idle upstream connections
//!   sooner than that, or it will now and then send a request into a connection being closed.
//! - [`MAX_HEADER_BYTES`] (32 KiB): the request line and headers together; beyond it the answer
//!   is 431 and the connection is closed. An access token is under 1 KiB; nginx allows 32 KiB by
//!   default, Go 1 MB. hyper's read buffer is capped at [`MAX_BUF_BYTES`] (64 KiB, the 431 too
//!   when a head is still incomplete there), so a connection holds at most that much unparsed
//!   input; at most 100 header fields (hyper's default).
//! - The connection cap: at most [`MAX_CONNECTIONS`] open at once, fewer when the file
//!   descriptor limit is lower (the soft limit is first raised to the hard one; [`FD_RESERVE`]
//!   descriptors stay free for Postgres, NATS, logs). A connection over the cap is closed at
//!   once and counted (`vault_http_connections_refused_total`): a fast, visible refusal that a
//!   load balancer retries elsewhere, instead of a backlog that times out silently. Open
//!   connections are the `vault_http_connections` gauge.
//! - [`bind`] listens with a backlog of [`LISTEN_BACKLOG`] (4096, the kernel caps it at
//!   `net.core.somaxconn`) instead of tokio's 128: with 128, a burst of new connections fills
//!   the queue faster than they are accepted, and every SYN dropped costs its client a one-second
//!   retransmission (measured: 10,000 connections took 30 s to open, under a second with 4096).
//! - An accept error (descriptors exhausted after all, say) pauses accepting for
//!   [`ACCEPT_ERROR_PAUSE`] instead of spinning on the error or stopping the server.
//!
//! What a request may carry and how long it may take once its head has arrived is the
//! application's business: the API limits bodies to 64 KiB, gives a body 10 s to arrive (408
//! after that) and a whole request 30 s (its `json` and `startup` modules).
//!
//! WebSocket upgrades leave this server: an upgraded connection is no longer counted, drained or
//! timed out here (the WebSocket gateway has its own ping and idle rules). A handler about to
//! upgrade may cap the connection's kernel send buffer through the request's
//! [`SendBufferLimit`] (see there why a push feed wants that).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, MatchedPath, Request};
use axum::http::{HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::{ServiceBuilder, ServiceExt};
use tower_http::classify::ServerErrorsFailureClass;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::metric_names as names;

/// The header that carries a request's id across HTTP, NATS and logs.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// How long in-flight requests may take to finish once shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(25);

/// The longest client-chosen request id kept (a UUID is 36 characters).
pub const MAX_REQUEST_ID: usize = 128;

/// Wraps `router` in request ids, tracing and HTTP metrics.
pub fn observe(router: Router) -> Router {
    router.layer(
        ServiceBuilder::new()
            .layer(middleware::from_fn(drop_unusable_request_id))
            .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
            .layer(PropagateRequestIdLayer::new(REQUEST_ID))
            .layer(
                TraceLayer::new_for_http()
                    .make_span_with(|req: &Request| {
                        let request_id = req
                            .extensions()
                            .get::<RequestId>()
                            .and_then(|id| id.header_value().to_str().ok())
                            .unwrap_or("-");
                        tracing::info_span!(
                            "http",
                            request_id = %request_id,
                            method = %req.method(),
                            path = %req.uri().path(),
                            user_id = tracing::field::Empty,
                        )
                    })
                    .on_failure(log_failure),
            )
            .layer(middleware::from_fn(record_metrics)),
    )
}

/// Logs a failed response: a 503 at WARN — the service refusing on purpose (NATS down, the
/// engine's queue over its limit, not ready), its reason logged or counted where it was
/// decided, so a NATS blip of two seconds does not write two hundred errors — anything else at
/// ERROR.
fn log_failure(failure: ServerErrorsFailureClass, latency: Duration, _span: &tracing::Span) {
    let latency = latency.as_millis();
    match failure {
        ServerErrorsFailureClass::StatusCode(StatusCode::SERVICE_UNAVAILABLE) => {
            tracing::warn!(classification = %failure, latency_ms = latency, "response failed");
        }
        _ => tracing::error!(classification = %failure, latency_ms = latency, "response failed"),
    }
}

/// Whether a client's `X-Request-Id` may travel on (see the module docs).
pub fn is_usable_request_id(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID).contains(&id.len()) && id.iter().all(|b| b.is_ascii_alphanumeric() || b"._:/+=-".contains(b))
}

/// Removes a client's `X-Request-Id` that is not a usable id, so a fresh one replaces it.
async fn drop_unusable_request_id(mut req: Request, next: Next) -> Response {
    let usable = req.headers().get_all(&REQUEST_ID).iter().count() <= 1
        && req.headers().get(&REQUEST_ID).is_none_or(|id| is_usable_request_id(id.as_bytes()));
    if !usable {
        req.headers_mut().remove(&REQUEST_ID);
    }
    next.run(req).await
}

/// The `http_requests_in_flight` handle, looked up once. Unlabelled: a drain waits for the
/// process's total, and a gauge by route would cost a registry lookup on every request for
/// series that sit at 0 nearly always. A scrape of `/metrics` counts itself.
fn requests_in_flight() -> &'static metrics::Gauge {
    static GAUGE: OnceLock<metrics::Gauge> = OnceLock::new();
    GAUGE.get_or_init(|| metrics::gauge!("http_requests_in_flight"))
}

/// The `method` label of a request: one of the nine methods of RFC 9110 (and PATCH), or
/// `other`. hyper accepts any token as a method, so labelling the raw one let anyone who can
/// reach a port add a counter and a histogram to the registry per made-up method, for good.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

async fn record_metrics(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".to_owned());
    let method = method_label(req.method());
    let _in_flight = Held::new(requests_in_flight().clone());
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("http_requests_total", "method" => method, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// The listen backlog of [`bind`].
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener for [`serve`] on `addr` (port 0 picks a free one), with address reuse and a
/// backlog of [`LISTEN_BACKLOG`].
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// How long a client has to send a request's line and headers, and how long a kept-alive
/// connection may sit idle (see the module docs).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The most a request line and its headers may weigh; beyond it, 431.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;
/// hyper's per-connection read and write buffer cap.
pub const MAX_BUF_BYTES: usize = 64 * 1024;
/// The most connections a server holds open at once (fewer if the fd limit says so).
pub const MAX_CONNECTIONS: usize = 16_384;
/// File descriptors kept out of the connection cap for everything else the process opens.
pub const FD_RESERVE: u64 = 256;
/// How long accepting pauses after an accept error.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// At most one warning per this interval while connections are being refused at the cap.
const REFUSAL_WARN_EVERY: Duration = Duration::from_secs(10);

/// The connection cap of this process: [`MAX_CONNECTIONS`], or the file descriptor limit minus
/// [`FD_RESERVE`] when that is lower. The first call raises the soft descriptor limit to the
/// hard one (process-wide, so it happens once).
pub fn connection_cap() -> usize {
    static CAP: OnceLock<usize> = OnceLock::new();
    *CAP.get_or_init(|| match raise_fd_limit() {
        Some(limit) => {
            usize::try_from(limit.saturating_sub(FD_RESERVE)).unwrap_or(MAX_CONNECTIONS).clamp(1, MAX_CONNECTIONS)
        }
        None => MAX_CONNECTIONS,
    })
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (Go's runtime does the same at start: the
/// soft default of 1024 is a relic of `select`, which nothing here uses). Returns the soft limit
/// in force afterwards; `None` means unlimited. Tests that open thousands of connections call it
/// for themselves too.
pub fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    // An unlimited hard limit is still bounded by the kernel's nr_open (2^20 by default).
    const KERNEL_DEFAULT_NR_OPEN: u64 = 1 << 20;
    let limit = getrlimit(Resource::Nofile);
    let target = limit.maximum.map_or(KERNEL_DEFAULT_NR_OPEN, |max| max.min(KERNEL_DEFAULT_NR_OPEN));
    match limit.current {
        Some(current) if current < target => {
            match setrlimit(Resource::Nofile, Rlimit { current: Some(target), maximum: limit.maximum }) {
                Ok(()) => Some(target),
                Err(e) => {
                    tracing::warn!(error = %e, current, target, "could not raise the open file limit");
                    Some(current)
                }
            }
        }
        current => current,
    }
}

/// Serves `app` on `listener` until `shutdown` fires, with the limits of the module docs, then
/// drains: no new connections, idle keep-alive connections closed, in-flight requests finished
/// (for at most [`SHUTDOWN_GRACE`]).
pub async fn serve(listener: TcpListener, app: Router, shutdown: CancellationToken) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let cap = connection_cap();
    tracing::info!(addr = %local, max_connections = cap, "listening");
    // A permit per open connection: the cap, and (all permits back) the end of the drain.
    let permits = Arc::new(Semaphore::new(cap));
    let refused = metrics::counter!(names::HTTP_CONNECTIONS_REFUSED);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_header_size(MAX_HEADER_BYTES)
        .max_buf_size(MAX_BUF_BYTES);
    let mut last_refusal_warning: Option<Instant> = None;
    loop {
        let (stream, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // The peer gave up between SYN and accept: nothing to do.
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    tracing::warn!(addr = %local, error = %e, pause = ?ACCEPT_ERROR_PAUSE, "accept failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                    }
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refused.increment(1);
            if last_refusal_warning.is_none_or(|at| at.elapsed() >= REFUSAL_WARN_EVERY) {
                last_refusal_warning = Some(Instant::now());
                tracing::warn!(addr = %local, max_connections = cap, "connection cap reached; closing new connections");
            }
            drop(stream);
            continue;
        };
        tokio::spawn(serve_connection(stream, remote, app.clone(), builder.clone(), shutdown.clone(), permit));
    }
    // Closing the listener refuses new connections while the open ones drain.
    drop(listener);
    tokio::select! {
        _ = permits.acquire_many(u32::try_from(cap).unwrap_or(u32::MAX)) => Ok(()),
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!(addr = %local, grace = ?SHUTDOWN_GRACE, "in-flight requests did not finish within the grace period");
            Ok(())
        }
    }
}

/// Errors of one half-open connection, not of the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Counts one in a gauge for as long as it lives: an open connection in
/// `vault_http_connections`, a request in `http_requests_in_flight` (dropped with a cancelled
/// request too).
struct Held(metrics::Gauge);

impl Held {
    fn new(gauge: metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Held(gauge)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// A request extension (on every request [`serve`] serves): asks the connection the request came
/// on to cap its kernel send buffer from its next write on — the response's — for as long as it
/// lives, upgraded or not.
///
/// For a connection about to become a long-lived push feed (the WebSocket). Linux grows a TCP
/// socket's send buffer up to `net.ipv4.tcp_wmem`'s maximum (4 MiB by default) while its receiver
/// reads slowly; a client that stops reading then has that much queued in the kernel — seconds
/// of stale prices — before the server's writes block and the feed can tell it is too slow. A
/// fixed buffer bounds that (Linux doubles the value asked for, for its bookkeeping, and stops
/// growing it). Plain requests keep the default.
#[derive(Debug, Clone)]
pub struct SendBufferLimit(Arc<AtomicUsize>);

impl SendBufferLimit {
    /// Caps the send buffer at `bytes` (0: leave it as it is).
    pub fn set(&self, bytes: usize) {
        self.0.store(bytes, Ordering::Release);
    }
}

/// An accepted connection's socket: applies a [`SendBufferLimit`] before its next write.
#[derive(Debug)]
struct Socket {
    stream: TcpStream,
    send_buffer_limit: Arc<AtomicUsize>,
}

impl Socket {
    fn apply_send_buffer_limit(&self) {
        // One relaxed load per write while nothing is asked, which is nearly always.
        if self.send_buffer_limit.load(Ordering::Relaxed) == 0 {
            return;
        }
        let bytes = self.send_buffer_limit.swap(0, Ordering::AcqRel);
        if bytes > 0
            && let Err(e) = rustix::net::sockopt::set_socket_send_buffer_size(&self.stream, bytes)
        {
            tracing::warn!(error = %e, bytes, "could not cap a connection's send buffer");
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.apply_send_buffer_limit();
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.apply_send_buffer_limit();
        Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Serves one connection until the client leaves, a limit closes it, or shutdown (which lets
/// the request in flight finish and then closes it).
async fn serve_connection(
    stream: TcpStream,
    remote: SocketAddr,
    app: Router,
    builder: http1::Builder,
    shutdown: CancellationToken,
    permit: OwnedSemaphorePermit,
) {
    let _permit = permit;
    let _open = Held::new(metrics::gauge!(names::HTTP_CONNECTIONS));
    // Small answers go out at once rather than waiting for Nagle.
    let _ = stream.set_nodelay(true);
    let socket = Socket { stream, send_buffer_limit: Arc::default() };
    let limit = SendBufferLimit(socket.send_buffer_limit.clone());
    let service = service_fn(move |mut req: hyper::Request<Incoming>| {
        // What `into_make_service_with_connect_info` did: handlers read the peer with ConnectInfo.
        req.extensions_mut().insert(ConnectInfo(remote));
        req.extensions_mut().insert(limit.clone());
        app.clone().oneshot(req)
    });
    let conn = builder.serve_connection(TokioIo::new(socket), service).with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        // A header timeout, a 431, a client that vanished: the client's problem, not ours.
        tracing::debug!(peer = %remote, error = %e, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::Notify;

    use super::*;

    #[test]
    fn only_short_plain_request_ids_are_kept() {
        for ok in ["req-1", "01a20259-40ca-75ff-846a-35624739b146", "trace:abc/def+x=y.z_1", &"a".repeat(128)] {
            assert!(is_usable_request_id(ok.as_bytes()), "{ok}");
        }
        for bad in ["", "has space", "quote\"", "<script>", "line\nbreak", "é", &"a".repeat(129)] {
            assert!(!is_usable_request_id(bad.as_bytes()), "{bad:?}");
        }
    }

    /// A client's unusable request id is replaced by a fresh one; a usable one is echoed.
    #[tokio::test]
    async fn an_unusable_client_request_id_is_replaced() {
        let app = observe(Router::new().route("/", get(|| async { "ok" })));
        let call = |id: &'static str| {
            let app = app.clone();
            async move {
                let req = Request::builder().uri("/").header("x-request-id", id).body(axum::body::Body::empty());
                let resp = app.oneshot(req.expect("a request")).await.expect("infallible");
                resp.headers()["x-request-id"].to_str().expect("ascii").to_owned()
            }
        };
        assert_eq!(call("client-42").await, "client-42");
        let replaced = call("<script>alert(1)</script>").await;
        assert!(uuid::Uuid::parse_str(&replaced).is_ok(), "{replaced}");
    }

    /// A limit asked for through the extension is set on the socket at its next write, doubled
    /// by Linux as it reports it, and only then.
    #[tokio::test]
    async fn a_send_buffer_limit_takes_effect_at_the_next_write() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let _client = TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (stream, _) = listener.accept().await.expect("accept");
        let size = |socket: &Socket| rustix::net::sockopt::socket_send_buffer_size(&socket.stream).expect("getsockopt");
        let mut socket = Socket { stream, send_buffer_limit: Arc::default() };
        let limit = SendBufferLimit(socket.send_buffer_limit.clone());
        let default = size(&socket);
        socket.write_all(b"plain").await.expect("write");
        assert_eq!(size(&socket), default, "nothing asked, nothing changed");

        limit.set(16 * 1024);
        assert_eq!(size(&socket), default, "not before the next write");
        socket.write_all(b"upgraded").await.expect("write");
        assert_eq!(size(&socket), 32 * 1024);
        assert_ne!(default, 32 * 1024, "the default differs, so the change shows");
    }

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
