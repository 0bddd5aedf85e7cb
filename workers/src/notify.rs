//! `vault-worker notify`: in-app notifications, webhooks and emails from EVENTS and AUTH.
//!
//! Three loops share one process:
//! - [`consume`]: the durable consumers `notify-events` and `notify-auth`, written in batches
//!   into `notifications`, `webhook_deliveries`, `email_outbox` and `known_login_ips`
//!   (migration 0005 says what each table is for), idempotent per source event id and acked
//!   after the commit; [`plan`] holds the rules (which event makes what, and the texts);
//! - [`webhook`]: delivers `webhook_deliveries` rows — leased claims, one task per attempt
//!   under a semaphore, signed requests, backoff with jitter, refusal of private destinations;
//! - [`email`]: sends `email_outbox` rows over SMTP, or writes them to the log when `SMTP_URL`
//!   is unset.
//!
//! Beside them, [`consume::prune_processed`] forgets handled event ids once no stream can
//! redeliver them.
//!
//! The tables are the hand-over between the loops, so a crash at any point loses nothing: the
//! consumer's rows commit before its ack, and a delivery or email in flight comes back when its
//! lease expires. This role never writes anything the API owns; the API reads these tables
//! (GET /notifications, /webhooks, /webhooks/{id}/deliveries) and creates the webhooks.
//! For the API's WebSocket, the consumer pushes each notification it inserted on
//! `notifications.<user_id>` (core NATS) after the commit: a best-effort live copy of the row.
//!
//! Shutdown: the consumer stops pulling and commits the batch in hand; the delivery loop lets
//! attempts in flight finish for up to 10 s; the email loop finishes the email in hand.

pub mod consume;
pub mod email;
pub mod plan;
pub mod webhook;

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use vault_bus::Bus;
use vault_bus::consumers::ConsumerSpec;
use vault_core::Settings;

/// Wakes the delivery and email loops when the consumer has written work for them.
#[derive(Debug, Clone, Default)]
pub struct Wakers {
    pub deliveries: Arc<Notify>,
    pub emails: Arc<Notify>,
}

/// Runs the notify role until `shutdown`, then drains its three loops.
pub async fn run(
    bus: &Bus,
    pool: &PgPool,
    settings: &Settings,
    specs: Vec<ConsumerSpec>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let wakers = Wakers::default();
    let deliveries = webhook::run_deliveries(
        pool.clone(),
        webhook::DeliveryConfig::new(settings.webhook_allow_private),
        wakers.deliveries.clone(),
        shutdown.clone(),
    );
    let emails = email::run_emails(
        pool.clone(),
        email::EmailConfig::new(settings.smtp_url.clone()),
        wakers.emails.clone(),
        shutdown.clone(),
    );
    let consumers = consume::run_consumers(bus, pool, specs, wakers, shutdown.clone());
    let housekeeping = consume::prune_processed(pool.clone(), shutdown.clone());
    // If one loop fails the role fails: stop the others too, so the process exits and restarts
    // whole instead of running without, say, webhook delivery.
    let failed = |e: anyhow::Error| {
        shutdown.cancel();
        e
    };
    let (consumed, delivered, mailed, pruned) = tokio::join!(
        async { consumers.await.map_err(failed) },
        async { deliveries.await.map_err(failed) },
        async { emails.await.map_err(failed) },
        async { housekeeping.await.map_err(failed) },
    );
    consumed.and(delivered).and(mailed).and(pruned)
}
