//! Turns SIGTERM and SIGINT into one [`CancellationToken`].
//!
//! Every long-lived task takes a clone of the token and documents how it drains when the token
//! is cancelled: HTTP servers stop accepting and finish in-flight requests, consumers stop
//! pulling and finish (ack or leave for redelivery) the message in hand.

use tokio_util::sync::CancellationToken;

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
