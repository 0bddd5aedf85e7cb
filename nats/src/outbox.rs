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

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vault_core::shutdown::GRACE;

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
    let reported = Reported::default();
    loop {
        let stopped = tokio::select! {
            biased;
            _ = shutdown.cancelled() => true,
            _ = wake.notified() => false,
            _ = tokio::time::sleep(POLL) => false,
        };
        // At the signal: the pass under way, if any, then one more for what the last commits
        // wrote, all within one GRACE. Rows left stay for the next relay: an unfinished pass
        // rolls back, and what it published is published again later, skipped downstream as a
        // duplicate.
        let last = if stopped {
            tokio::time::timeout(GRACE, drain(bus, pool, outbox, &reported)).await
        } else {
            let pass = drain(bus, pool, outbox, &reported);
            tokio::pin!(pass);
            let interrupted = tokio::select! {
                () = &mut pass => false,
                () = shutdown.cancelled() => true,
            };
            if !interrupted {
                continue;
            }
            tokio::time::timeout(GRACE, async {
                pass.await;
                drain(bus, pool, outbox, &reported).await;
            })
            .await
        };
        if last.is_err() {
            tracing::warn!(
                waited = ?GRACE,
                "{} relay's last pass unfinished; its rows stay for the next start",
                outbox.what
            );
        }
        return;
    }
}

/// Rows JetStream refused and when each was last logged: a row is logged again only after
/// [`REPORT_AGAIN`], not at every pass while NATS is away (nor at every pass of another relay's
/// replica that holds it meanwhile).
#[derive(Debug, Default)]
struct Reported(std::sync::Mutex<HashMap<Uuid, Instant>>);

/// How long a refused row stays quiet in the log.
const REPORT_AGAIN: Duration = Duration::from_secs(600);

impl Reported {
    /// Whether to log `id`'s refusal now (and note that it was).
    fn first_in_a_while(&self, id: Uuid) -> bool {
        let mut seen = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        seen.retain(|_, at| now.duration_since(*at) < REPORT_AGAIN);
        match seen.entry(id) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(now);
                true
            }
        }
    }

    fn published(&self, ids: &[Uuid]) {
        let mut seen = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for id in ids {
            seen.remove(id);
        }
    }
}

/// Passes until one publishes nothing (or fails).
async fn drain(bus: &Bus, pool: &PgPool, outbox: Outbox, reported: &Reported) {
    loop {
        match vault_core::db::within(PASS_WITHIN, relay_once(bus, pool, outbox, reported)).await {
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
}

/// Publishes one batch; returns how many rows it published (and deleted). Rows are published as
/// they were encoded (their subject and payload), not decoded and encoded again. Every refusal
/// is counted; a row's is logged once in a while ([`Reported`]).
async fn relay_once(bus: &Bus, pool: &PgPool, outbox: Outbox, reported: &Reported) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(Uuid, String, String, Option<String>)> =
        sqlx::query_as(outbox.select).bind(BATCH).fetch_all(&mut *tx).await?;
    if rows.is_empty() {
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
    let mut refused = 0;
    for (id, result) in settled {
        match result {
            Ok(_) => published.push(id),
            Err(e) => {
                refused += 1;
                if reported.first_in_a_while(id) {
                    tracing::warn!(outbox = outbox.what, row = %id, error = %e, "event not acknowledged; will retry");
                }
            }
        }
    }
    if let (Some(metric), 1..) = (outbox.failed_metric, refused) {
        metrics::counter!(metric).increment(refused);
    }
    reported.published(&published);
    sqlx::query(outbox.delete).bind(&published).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(published.len())
}
