//! Turns SIGTERM and SIGINT into one [`CancellationToken`].
//!
//! Every long-lived task takes a clone of the token and documents how it drains when the token
//! is cancelled: HTTP servers stop accepting and finish in-flight requests, consumers stop
//! pulling and finish (ack or leave for redelivery) the message in hand — within [`GRACE`]
//! ([`finish_or_give_up`]) where that work waits on a database that may not answer.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How long work in hand when the shutdown signal comes (a batch being written, commands being
/// committed, the outbox relay's pass) may take to finish before it is given up.
pub const GRACE: Duration = Duration::from_secs(5);

/// Runs `work` to its end, unless `shutdown` fires first: it then gets [`GRACE`] more, and
/// `None` means it was given up. For work whose messages are acked only after it is durable, so
/// giving it up loses nothing (they come back); a database that does not answer (a lock, a
/// partition) must not hold a process that was asked to stop.
pub async fn finish_or_give_up<T>(shutdown: &CancellationToken, work: impl Future<Output = T>) -> Option<T> {
    tokio::pin!(work);
    tokio::select! {
        done = &mut work => return Some(done),
        _ = shutdown.cancelled() => {}
    }
    tokio::time::timeout(GRACE, work).await.ok()
}

/// Installs the signal handlers and returns the token they cancel.
///
/// A second signal while draining is logged and ignored: the drain deadlines of the servers
/// bound how long an exit can take, and a half-finished drain is exactly what we avoid.
pub fn install() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let name = wait_for_signal().await;
        tracing::info!(signal = name, "shutdown requested; draining");
        trigger.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler cannot fail on unix");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler cannot fail on unix");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() -> &'static str {
    let _ = tokio::signal::ctrl_c().await;
    "ctrl-c"
}
