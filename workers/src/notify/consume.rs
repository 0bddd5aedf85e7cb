//! The consumer side of the notifier: EVENTS and AUTH messages into `notifications`,
//! `webhook_deliveries` and `email_outbox` rows.
//!
//! Messages of the durable consumers `notify-events` and `notify-auth` are merged and taken in
//! batches (up to [`BATCH`] or [`LINGER`]); a batch is written in one transaction and its
//! messages are acked only after the commit. Within the transaction each event first claims its
//! id in `notify_processed_events`: a redelivered event (after a crash between commit and ack,
//! or a duplicate publish) finds its id there and writes nothing. Every row also has a unique
//! key on the event id, as a second line.
//!
//! If a batch cannot be written, its messages are retried one by one, each in its own
//! transaction, so one bad message cannot hold back the rest; a message that still fails is
//! nak'ed with a delay, and parked and terminated on its last delivery ([`MAX_DELIVER`]). A
//! message that does not decode is parked and terminated at once.
//!
//! "New IP" logins: the IP of every successful login is recorded in `known_login_ips`. A login
//! counts as coming from a new IP when its IP was not recorded for the user before *and* the
//! user is known to have logged in before — some IP already recorded, or an earlier login
//! session (`token_families` row other than this login's own). So the very first login after
//! signup does not raise an alert ("new IP" compared with nothing), but the first login the
//! notifier sees of a user who logged in before it was deployed does.
//!
//! Events of a user who does not exist (any more) write nothing and are counted in
//! `vault_notify_skipped_total{reason="unknown_user"}`.
//!
//! Live pushes: every notification row a batch *inserted* (not one a redelivery found already
//! there) is published after the commit on `notifications.<user_id>` ([`NotificationPush`],
//! core NATS), which the API's WebSocket relays to the user's open connections. It is a
//! best-effort push — nobody acknowledges it, a crash between commit and push or NATS being down
//! loses it — because the durable copy is the row itself (`GET /notifications`); it is never
//! sent for an uncommitted row nor twice for one row. Counted in
//! `vault_notification_pushes_total{outcome}`.

use std::time::Duration;

use async_nats::jetstream::Message;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vault_bus::batch::{self, Delivered};
use vault_bus::consumers::{ConsumerSpec, MAX_DELIVER};
use vault_bus::message::{AuthEvent, EngineEvent, NotificationPush, decode};
use vault_bus::{Bus, MessageContext, streams};

use super::Wakers;
use super::plan::{self, Source};

/// Messages written per transaction at most.
pub const BATCH: usize = 128;
/// How long a partial batch waits for more messages.
pub const LINGER: Duration = Duration::from_millis(20);

/// How long an event id is remembered in `notify_processed_events`: longer than either stream
/// keeps a message, so no redelivery can outlive its marker (and the unique keys on every row
/// remain as a second line even then).
pub const PROCESSED_RETENTION: Duration = Duration::from_secs(
    if streams::AUTH.max_age.as_secs() > streams::EVENTS.max_age.as_secs() {
        streams::AUTH.max_age.as_secs()
    } else {
        streams::EVENTS.max_age.as_secs()
    } + 24 * 3600,
);

/// Decodes a message of the notifier's streams.
pub fn decode_source(stream: &str, subject: &str, payload: &[u8]) -> Result<Source, String> {
    if stream == streams::EVENTS.name {
        decode::<EngineEvent>(subject, payload).map(Source::Engine).map_err(|e| e.to_string())
    } else if stream == streams::AUTH.name {
        decode::<AuthEvent>(subject, payload).map(Source::Auth).map_err(|e| e.to_string())
    } else {
        Err(format!("not a stream the notifier reads: {stream}"))
    }
}

/// What a committed transaction wrote.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Written {
    /// The kinds of the notifications written.
    pub notifications: Vec<&'static str>,
    /// The notifications written, to push once the transaction has committed.
    pub pushes: Vec<NotificationPush>,
    pub deliveries: usize,
    pub emails: usize,
    /// Events skipped because they had been handled before.
    pub redelivered: usize,
    pub unknown_users: usize,
}

/// Writes what `sources` call for in one transaction.
pub async fn apply(pool: &PgPool, sources: &[&Source]) -> Result<Written, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut written = Written::default();
    for source in sources {
        apply_one(&mut tx, source, &mut written).await?;
    }
    tx.commit().await?;
    Ok(written)
}

async fn apply_one(conn: &mut PgConnection, source: &Source, written: &mut Written) -> Result<(), sqlx::Error> {
    // Events that concern nobody (signup, failed logins…) cost no write at all.
    let Some(user_id) = source.user_id() else { return Ok(()) };
    let event_id = source.event_id();
    let first_time = sqlx::query("INSERT INTO notify_processed_events (event_id) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(event_id)
        .execute(&mut *conn)
        .await?
        .rows_affected()
        == 1;
    if !first_time {
        written.redelivered += 1;
        return Ok(());
    }
    let Some(email): Option<String> =
        sqlx::query_scalar("SELECT email FROM users WHERE id = $1").bind(user_id).fetch_optional(&mut *conn).await?
    else {
        written.unknown_users += 1;
        return Ok(());
    };
    let new_ip = match source.login_ip() {
        Some(ip) => record_login_ip(conn, user_id, ip, source).await?,
        None => false,
    };
    let Some(plan) = plan::plan(source, new_ip) else { return Ok(()) };

    if let Some(n) = &plan.notification {
        let id = Uuid::now_v7();
        let inserted: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
            "INSERT INTO notifications (id, user_id, event_id, kind, title, body, data)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (user_id, event_id) DO NOTHING
             RETURNING created_at",
        )
        .bind(id)
        .bind(user_id)
        .bind(event_id)
        .bind(n.kind)
        .bind(&n.title)
        .bind(&n.body)
        .bind(&n.data)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(created_at) = inserted {
            written.notifications.push(n.kind);
            written.pushes.push(NotificationPush {
                id,
                user_id,
                kind: n.kind.to_owned(),
                title: n.title.clone(),
                body: n.body.clone(),
                data: n.data.clone(),
                created_at,
            });
        }
    }
    if let Some(hook) = &plan.webhook {
        let webhooks: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM webhooks WHERE user_id = $1 AND deleted_at IS NULL AND $2 = ANY(events) ORDER BY id",
        )
        .bind(user_id)
        .bind(hook.event_type)
        .fetch_all(&mut *conn)
        .await?;
        if !webhooks.is_empty() {
            let ids: Vec<Uuid> = webhooks.iter().map(|_| Uuid::now_v7()).collect();
            written.deliveries += sqlx::query(
                "INSERT INTO webhook_deliveries (id, webhook_id, event_id, event_type, payload, next_attempt_at)
                 SELECT d.id, d.webhook_id, $3, $4, $5, now() FROM UNNEST($1::UUID[], $2::UUID[]) AS d(id, webhook_id)
                 ON CONFLICT (webhook_id, event_id) DO NOTHING",
            )
            .bind(&ids)
            .bind(&webhooks)
            .bind(event_id)
            .bind(hook.event_type)
            .bind(&hook.payload)
            .execute(&mut *conn)
            .await?
            .rows_affected() as usize;
        }
    }
    if let Some(mail) = &plan.email {
        written.emails += sqlx::query(
            "INSERT INTO email_outbox (id, user_id, event_id, to_address, subject, body)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (user_id, event_id) DO NOTHING",
        )
        .bind(Uuid::now_v7())
        .bind(user_id)
        .bind(event_id)
        .bind(&email)
        .bind(&mail.subject)
        .bind(&mail.body)
        .execute(&mut *conn)
        .await?
        .rows_affected() as usize;
    }
    Ok(())
}

/// Records a login's IP; returns whether it counts as a new IP (see the module docs).
async fn record_login_ip(
    conn: &mut PgConnection,
    user_id: Uuid,
    ip: std::net::IpAddr,
    source: &Source,
) -> Result<bool, sqlx::Error> {
    let known_any: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM known_login_ips WHERE user_id = $1)")
        .bind(user_id)
        .fetch_one(&mut *conn)
        .await?;
    let inserted = sqlx::query(
        "INSERT INTO known_login_ips (user_id, ip, first_seen) VALUES ($1, $2::inet, $3) ON CONFLICT DO NOTHING",
    )
    .bind(user_id)
    .bind(ip.to_string())
    .bind(source.at())
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    if !inserted {
        return Ok(false);
    }
    if known_any {
        return Ok(true);
    }
    // No IP recorded yet: new only if the user had logged in before this login.
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM token_families
                         WHERE user_id = $1 AND created_at < $2 AND id IS DISTINCT FROM $3)",
    )
    .bind(user_id)
    .bind(source.at())
    .bind(source.login_family())
    .fetch_one(&mut *conn)
    .await
}

/// Forgets event ids older than [`PROCESSED_RETENTION`], hourly, until `shutdown`.
pub async fn prune_processed(pool: PgPool, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = every.tick() => {}
        }
        let pruned =
            sqlx::query("DELETE FROM notify_processed_events WHERE processed_at < now() - make_interval(secs => $1)")
                .bind(PROCESSED_RETENTION.as_secs_f64())
                .execute(&pool)
                .await;
        match pruned {
            Ok(done) if done.rows_affected() > 0 => {
                tracing::info!(rows = done.rows_affected(), "forgot old processed event ids")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot prune processed event ids; next hour then"),
        }
    }
}

/// A decoded message in hand.
type Pending = Delivered<Source>;

/// Runs the consumers until shutdown; finishes the batch in hand before returning.
pub async fn run_consumers(
    bus: &Bus,
    pool: &PgPool,
    specs: Vec<ConsumerSpec>,
    wake: Wakers,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let decode = |stream: &'static str, msg: &Message| decode_source(stream, msg.subject.as_str(), &msg.payload);
    batch::consume(bus, pool, &specs, BATCH, LINGER, shutdown, decode, |b| flush(bus, pool, &wake, b)).await?;
    tracing::info!("notify consumers drained");
    Ok(())
}

fn count(written: &Written, wake: &Wakers) {
    for kind in &written.notifications {
        metrics::counter!("vault_notifications_total", "kind" => *kind).increment(1);
    }
    if written.unknown_users > 0 {
        metrics::counter!("vault_notify_skipped_total", "reason" => "unknown_user")
            .increment(written.unknown_users as u64);
    }
    if written.redelivered > 0 {
        metrics::counter!("vault_notify_skipped_total", "reason" => "redelivered")
            .increment(written.redelivered as u64);
    }
    // The delivery and email loops share this process: new rows go out without waiting for
    // their next poll. `notify_one` keeps the wake-up if the loop is busy at this moment.
    if written.deliveries > 0 {
        wake.deliveries.notify_one();
    }
    if written.emails > 0 {
        wake.emails.notify_one();
    }
}

/// Pushes the committed notifications to live listeners (best effort, see the module docs).
async fn push(bus: &Bus, written: &Written) {
    for notification in &written.pushes {
        let outcome = match bus.push(notification, &MessageContext::default()).await {
            Ok(()) => "sent",
            Err(e) => {
                tracing::warn!(error = %e, notification = %notification.id, "notification push failed; it stays readable from GET /notifications");
                "failed"
            }
        };
        metrics::counter!("vault_notification_pushes_total", "outcome" => outcome).increment(1);
    }
}

async fn flush(bus: &Bus, pool: &PgPool, wake: &Wakers, batch: Vec<Pending>) {
    let sources: Vec<&Source> = batch.iter().map(|p| &p.value).collect();
    match apply(pool, &sources).await {
        Ok(written) => {
            count(&written, wake);
            push(bus, &written).await;
            for p in &batch {
                p.ack().await;
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, messages = batch.len(), "notify batch not written; retrying its messages one by one");
            for p in batch {
                match apply(pool, &[&p.value]).await {
                    Ok(written) => {
                        count(&written, wake);
                        push(bus, &written).await;
                        p.ack().await;
                    }
                    Err(e) => give_back(pool, p, &e.to_string()).await,
                }
            }
        }
    }
}

/// A message that could not be written: redelivered later, or parked on its last delivery.
async fn give_back(pool: &PgPool, p: Pending, error: &str) {
    metrics::counter!("vault_notify_write_failures_total").increment(1);
    let delivered = p.msg.info().map(|i| i.delivered).unwrap_or(1);
    if delivered >= MAX_DELIVER {
        let reason = format!("not written after {delivered} deliveries: {error}");
        if p.park(pool, &reason).await {
            return;
        }
    }
    tracing::warn!(error, event = %p.value.event_id(), delivered, "notify message not written; it will be redelivered");
    p.retry(Duration::from_secs(1)).await;
}
