//! Transactional outboxes and their relay: messages committed in Postgres with the change they
//! report, published to JetStream afterwards.
//!
//! A process writes a message's row in the same transaction as the change it reports; the
//! relay publishes committed rows (their subject and payload as stored, the row's id as the
//! dedupe id) and deletes each one in the transaction that saw JetStream acknowledge it. So a
//! crash between the commit and the publish loses nothing — the next pass, of this process or
//! another, publishes the row — and a row published twice (a pass that published and then
//! could not delete) is one stream message, deduplicated by its id.
//!
//! Two outboxes exist: the engine's events ([`Outbox::EVENTS`], table `outbox`) and the API's
//! auth events ([`Outbox::AUTH`], table `auth_outbox`). Each table holds only what is still to
//! be published; the messages themselves stay on their stream and in the audit log.

use std::collections::HashSet;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vault_core::shutdown::{GRACE, finish_or_give_up};

use crate::{Bus, MessageContext};

/// Rows published per pass.
const BATCH: i64 = 256;
/// How often the relay looks for rows when nothing wakes it (rows another process committed,
/// or left by a process that stopped).
const POLL: Duration = Duration::from_secs(1);
/// How long one pass may take before it is given up (rolled back when its session ends; what
/// it published is published again, skipped downstream): a pass waits on Postgres and on acks
/// the client times out after 5 s, and a connection gone silent would stop the relay for good.
const PASS_WITHIN: Duration = vault_core::db::STATEMENT_WITHIN;

/// One outbox table: where its rows are and what counts their publication.
#[derive(Debug, Clone, Copy)]
pub struct Outbox {
    /// `SELECT` of the next batch (locked, skipping rows another relay holds), oldest first.
    select: &'static str,
    /// `DELETE` of the acknowledged rows (`$1` their ids).
    delete: &'static str,
    /// Counter of rows published.
    published_metric: &'static str,
    /// Counter of rows a pass could not publish (they stay and are retried), if counted.
    failed_metric: Option<&'static str>,
    /// What the rows are, for logs.
    what: &'static str,
}

impl Outbox {
    /// The engine's events, to EVENTS.
    pub const EVENTS: Outbox = Outbox {
        select: "SELECT id, subject, payload::text, request_id FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        delete: "DELETE FROM outbox WHERE id = ANY($1)",
        published_metric: vault_core::metric_names::OUTBOX_PUBLISHED,
        failed_metric: None,
        what: "outbox",
    };
    /// The API's auth events, to AUTH.
    pub const AUTH: Outbox = Outbox {
        select: "SELECT id, subject, payload::text, request_id FROM auth_outbox ORDER BY id LIMIT $1
                 FOR UPDATE SKIP LOCKED",
        delete: "DELETE FROM auth_outbox WHERE id = ANY($1)",
        published_metric: vault_core::metric_names::AUTH_EVENTS_PUBLISHED,
        failed_metric: Some(vault_core::metric_names::AUTH_EVENTS_FAILED),
        what: "auth outbox",
    };
}

/// Publishes committed rows of `outbox` until shutdown (and once more after it): a pass when
/// `wake` is notified (after a commit of this process wrote rows) and every second otherwise.
pub async fn relay(bus: &Bus, pool: &PgPool, outbox: Outbox, wake: &Notify, shutdown: &CancellationToken) {
    // Rows JetStream refused, each logged (and counted) once rather than at every pass while
    // NATS is away.
    let mut reported = HashSet::new();
    loop {
        let stop = tokio::select! {
            biased;
            _ = shutdown.cancelled() => true,
            _ = wake.notified() => false,
            _ = tokio::time::sleep(POLL) => false,
        };
        let drain = async {
            loop {
                match vault_core::db::within(PASS_WITHIN, relay_once(bus, pool, outbox, &mut reported)).await {
                    Ok(0) => break,
                    Ok(n) => metrics::counter!(outbox.published_metric).increment(n as u64),
                    Err(e) => {
                        if let Some(metric) = outbox.failed_metric {
                            metrics::counter!(metric).increment(1);
                        }
                        tracing::warn!(error = %e, "{} relay failed; retrying", outbox.what);
                        break;
                    }
                }
            }
        };
        // At the signal, the pass under way (or, between passes, a last one) publishes what the
        // last commits wrote, within GRACE, and the relay ends: one GRACE at most. Rows it
        // leaves stay for the next relay: an unfinished pass rolls back, and what it published
        // is published again later, skipped downstream as a duplicate.
        if finish_or_give_up(shutdown, drain).await.is_none() {
            tracing::warn!(
                waited = ?GRACE,
                "{} relay's last pass unfinished; its rows stay for the next start",
                outbox.what
            );
            return;
        }
        if stop || shutdown.is_cancelled() {
            return;
        }
    }
}

/// Publishes one batch; returns how many rows it published (and deleted). Rows are published as
/// they were encoded (their subject and payload), not decoded and encoded again. A row
/// JetStream refuses is logged and counted the first time (`reported` remembers it).
async fn relay_once(bus: &Bus, pool: &PgPool, outbox: Outbox, reported: &mut HashSet<Uuid>) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(Uuid, String, String, Option<String>)> =
        sqlx::query_as(outbox.select).bind(BATCH).fetch_all(&mut *tx).await?;
    if rows.is_empty() {
        reported.clear();
        return Ok(0);
    }
    let mut acks = Vec::with_capacity(rows.len());
    for (id, subject, payload, request_id) in rows {
        let ctx = MessageContext { request_id };
        acks.push((id, bus.start_publish_encoded(subject, &id.to_string(), &ctx, payload.into()).await?));
    }
    // Awaited together: an ack's timeout (the client's 5 s) starts when it is awaited, so
    // awaiting them one by one after NATS went away mid-batch stalled the relay 5 s per row
    // (a full batch: over twenty minutes).
    let settled = futures::future::join_all(acks.into_iter().map(|(id, ack)| async move { (id, ack.await) })).await;
    let mut published = Vec::with_capacity(settled.len());
    for (id, result) in settled {
        match result {
            Ok(_) => {
                reported.remove(&id);
                published.push(id);
            }
            Err(e) if reported.insert(id) => {
                if let Some(metric) = outbox.failed_metric {
                    metrics::counter!(metric).increment(1);
                }
                tracing::warn!(outbox = outbox.what, row = %id, error = %e, "event not acknowledged; will retry");
            }
            Err(_) => {}
        }
    }
    sqlx::query(outbox.delete).bind(&published).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(published.len())
}
