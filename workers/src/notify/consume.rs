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

use std::collections::{HashMap, HashSet};
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
    /// Emails not written: their user had had their share (see [`EMAIL_LIMITS`]).
    pub emails_throttled: usize,
    /// Events skipped because they had been handled before.
    pub redelivered: usize,
    pub unknown_users: usize,
}

/// Writes what `sources` call for in one transaction, a statement per kind of row for the whole
/// batch (not per event): the event ids claimed, the users' addresses read, then notifications,
/// webhook deliveries and emails each inserted in one statement. Logins' IPs are recorded one
/// by one, in order (they are few, and each decides whether the next is new).
pub async fn apply(pool: &PgPool, sources: &[&Source]) -> Result<Written, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut written = Written::default();
    // Events that concern nobody (signup, failed logins…) cost no write at all.
    let concerned: Vec<(&Source, Uuid)> = sources.iter().filter_map(|s| Some((*s, s.user_id()?))).collect();
    if concerned.is_empty() {
        tx.commit().await?;
        return Ok(written);
    }
    let event_ids: Vec<Uuid> = concerned.iter().map(|(s, _)| s.event_id()).collect();
    let mut first_time: HashSet<Uuid> = sqlx::query_scalar(
        "INSERT INTO notify_processed_events (event_id) SELECT * FROM unnest($1::uuid[])
         ON CONFLICT DO NOTHING RETURNING event_id",
    )
    .bind(&event_ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let user_ids: Vec<Uuid> = concerned.iter().map(|(_, u)| *u).collect();
    let emails: HashMap<Uuid, String> =
        sqlx::query_as::<_, (Uuid, String)>("SELECT id, email FROM users WHERE id = ANY($1)")
            .bind(&user_ids)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();

    let mut plans = Vec::new();
    for (source, user_id) in concerned {
        // A second copy of an event in the same batch finds its id already taken by the first.
        if !first_time.remove(&source.event_id()) {
            written.redelivered += 1;
            continue;
        }
        let Some(email) = emails.get(&user_id) else {
            written.unknown_users += 1;
            continue;
        };
        let new_ip = match source.login_ip() {
            Some(ip) => record_login_ip(&mut tx, user_id, ip, source).await?,
            None => false,
        };
        if let Some(plan) = plan::plan(source, new_ip) {
            plans.push((plan, email));
        }
    }

    let notes: Vec<(Uuid, &plan::Plan, &plan::NotificationDraft)> =
        plans.iter().filter_map(|(p, _)| Some((Uuid::now_v7(), p, p.notification.as_ref()?))).collect();
    if !notes.is_empty() {
        let inserted: HashMap<Uuid, chrono::DateTime<chrono::Utc>> = sqlx::query_as(
            "INSERT INTO notifications (id, user_id, event_id, kind, title, body, data)
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::jsonb[])
             ON CONFLICT (user_id, event_id) DO NOTHING
             RETURNING id, created_at",
        )
        .bind(notes.iter().map(|(id, _, _)| *id).collect::<Vec<_>>())
        .bind(notes.iter().map(|(_, p, _)| p.user_id).collect::<Vec<_>>())
        .bind(notes.iter().map(|(_, p, _)| p.event_id).collect::<Vec<_>>())
        .bind(notes.iter().map(|(_, _, n)| n.kind).collect::<Vec<_>>())
        .bind(notes.iter().map(|(_, _, n)| n.title.as_str()).collect::<Vec<_>>())
        .bind(notes.iter().map(|(_, _, n)| n.body.as_str()).collect::<Vec<_>>())
        .bind(notes.iter().map(|(_, _, n)| &n.data).collect::<Vec<_>>())
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        for (id, p, n) in &notes {
            let Some(created_at) = inserted.get(id) else { continue };
            written.notifications.push(n.kind);
            written.pushes.push(NotificationPush {
                id: *id,
                user_id: p.user_id,
                kind: n.kind.to_owned(),
                title: n.title.clone(),
                body: n.body.clone(),
                data: n.data.clone(),
                created_at: *created_at,
            });
        }
    }

    let hooked: Vec<Uuid> = plans.iter().filter(|(p, _)| p.webhook.is_some()).map(|(p, _)| p.user_id).collect();
    if !hooked.is_empty() {
        let webhooks: Vec<(Uuid, Uuid, Vec<String>)> = sqlx::query_as(
            "SELECT id, user_id, events FROM webhooks WHERE user_id = ANY($1) AND deleted_at IS NULL ORDER BY id",
        )
        .bind(&hooked)
        .fetch_all(&mut *tx)
        .await?;
        let deliveries: Vec<(Uuid, &plan::Plan, &plan::WebhookEvent)> = plans
            .iter()
            .filter_map(|(p, _)| Some((p, p.webhook.as_ref()?)))
            .flat_map(|(p, hook)| {
                webhooks
                    .iter()
                    .filter(move |(_, user, events)| *user == p.user_id && events.iter().any(|e| e == hook.event_type))
                    .map(move |(webhook, _, _)| (*webhook, p, hook))
            })
            .collect();
        if !deliveries.is_empty() {
            written.deliveries += sqlx::query(
                "INSERT INTO webhook_deliveries (id, webhook_id, event_id, event_type, payload, next_attempt_at)
                 SELECT d.*, now() FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::jsonb[])
                     AS d(id, webhook_id, event_id, event_type, payload)
                 ON CONFLICT (webhook_id, event_id) DO NOTHING",
            )
            .bind(deliveries.iter().map(|_| Uuid::now_v7()).collect::<Vec<_>>())
            .bind(deliveries.iter().map(|(w, _, _)| *w).collect::<Vec<_>>())
            .bind(deliveries.iter().map(|(_, p, _)| p.event_id).collect::<Vec<_>>())
            .bind(deliveries.iter().map(|(_, _, h)| h.event_type).collect::<Vec<_>>())
            .bind(deliveries.iter().map(|(_, _, h)| &h.payload).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?
            .rows_affected() as usize;
        }
    }

    let mails = within_limits(&mut tx, &plans, &mut written).await?;
    if !mails.is_empty() {
        written.emails += sqlx::query(
            "INSERT INTO email_outbox (id, user_id, event_id, to_address, subject, body, kind)
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::text[])
             ON CONFLICT (user_id, event_id) DO NOTHING",
        )
        .bind(mails.iter().map(|_| Uuid::now_v7()).collect::<Vec<_>>())
        .bind(mails.iter().map(|(p, _, _)| p.user_id).collect::<Vec<_>>())
        .bind(mails.iter().map(|(p, _, _)| p.event_id).collect::<Vec<_>>())
        .bind(mails.iter().map(|(_, _, to)| to.as_str()).collect::<Vec<_>>())
        .bind(mails.iter().map(|(_, m, _)| m.subject.as_str()).collect::<Vec<_>>())
        .bind(mails.iter().map(|(_, m, _)| m.body.as_str()).collect::<Vec<_>>())
        .bind(mails.iter().map(|(_, m, _)| m.kind).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?
        .rows_affected() as usize;
    }
    tx.commit().await?;
    Ok(written)
}

/// How many emails of a kind one user gets at most, and over what window (`true`: an hour,
/// `false`: a day). Past a limit the event's in-app notification and webhooks are written as
/// usual and the email is not (`vault_notify_skipped_total{reason="email_throttled"}`):
/// addresses are not verified and deposits are paper money, so without limits anyone could have
/// every fill of a trading loop mailed to a stranger's address, or keep an account locked (five
/// wrong passwords every 15 minutes) and mail its owner at every lock. Each kind has its own
/// budget: a busy trader's fills never use up the security emails, nor one security change
/// another's. An owner changes these a few times a year; the budgets bound what an account
/// signed up with a stranger's address can send them a day.
pub const EMAIL_LIMITS: [(&str, i64, bool); 8] = [
    ("order.filled", 20, true),
    ("auth.login.new_ip", 10, false),
    ("auth.locked", 1, false),
    ("auth.password.changed", 5, false),
    ("auth.totp.enabled", 3, false),
    ("auth.totp.reset", 3, false),
    ("auth.api_key.created", 5, false),
    ("auth.refresh_token_reused", 3, false),
];

/// The advisory lock class of a user's email budget ("MAIL"; the object id is a hash of the
/// user id, as the API's quotas do).
pub const EMAIL_LOCK_CLASS: i32 = 0x4D41_494C;

/// The emails of `plans` within [`EMAIL_LIMITS`], counting what each user was sent of each kind
/// recently and what this batch adds, in order; the others are counted in `written`.
///
/// The users' budgets are locked first ([`EMAIL_LOCK_CLASS`], held to the end of the
/// transaction), so scaled-out notifiers writing for one user at the same moment count one
/// after the other: the second sees the first's committed emails. Without the lock each saw
/// only what was committed before it and could let through what remained of a budget again.
/// The locks are taken in one order (sorted by key: Postgres evaluates a volatile function of the
/// select list after the sort) and after every other write of the batch but
/// the emails themselves, whose rows (keyed by event id) no other batch writes: two batches
/// cannot wait for each other.
async fn within_limits<'a>(
    tx: &mut PgConnection,
    plans: &'a [(plan::Plan, &'a String)],
    written: &mut Written,
) -> Result<Vec<(&'a plan::Plan, &'a plan::EmailDraft, &'a String)>, sqlx::Error> {
    let users: Vec<Uuid> = plans.iter().filter(|(p, _)| p.email.is_some()).map(|(p, _)| p.user_id).collect();
    if users.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query(
        "SELECT pg_advisory_xact_lock($1, k)
           FROM (SELECT DISTINCT hashtext(u::text) AS k FROM unnest($2::uuid[]) AS u) AS keys ORDER BY k",
    )
    .bind(EMAIL_LOCK_CLASS)
    .bind(&users)
    .execute(&mut *tx)
    .await?;
    // (user, kind) → (sent in the last hour, sent in the last day).
    let mut sent: HashMap<(Uuid, String), (i64, i64)> = sqlx::query_as::<_, (Uuid, String, i64, i64)>(
        "SELECT user_id, kind, count(*) FILTER (WHERE created_at > now() - interval '1 hour'), count(*)
           FROM email_outbox
          WHERE user_id = ANY($1) AND created_at > now() - interval '1 day' AND kind IS NOT NULL
          GROUP BY user_id, kind",
    )
    .bind(&users)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|(user, kind, hour, day)| ((user, kind), (hour, day)))
    .collect();
    let mut mails = Vec::new();
    for (p, to) in plans {
        let Some(mail) = p.email.as_ref() else { continue };
        let counts = sent.entry((p.user_id, mail.kind.to_owned())).or_default();
        let over = EMAIL_LIMITS.iter().find(|(kind, ..)| *kind == mail.kind).is_some_and(|(_, most, hourly)| {
            let so_far = if *hourly { counts.0 } else { counts.1 };
            so_far >= *most
        });
        if over {
            written.emails_throttled += 1;
            continue;
        }
        counts.0 += 1;
        counts.1 += 1;
        mails.push((p, mail, *to));
    }
    Ok(mails)
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
        let prune =
            sqlx::query("DELETE FROM notify_processed_events WHERE processed_at < now() - make_interval(secs => $1)")
                .bind(PROCESSED_RETENTION.as_secs_f64())
                .execute(&pool);
        // Raced with the shutdown: a database that does not answer must not hold a process asked
        // to stop, and an abandoned prune loses nothing (the next one deletes the same rows).
        let pruned = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            pruned = prune => pruned,
        };
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
    if written.emails_throttled > 0 {
        metrics::counter!("vault_notify_skipped_total", "reason" => "email_throttled")
            .increment(written.emails_throttled as u64);
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
                    Err(e) => give_back(pool, p, &e).await,
                }
            }
        }
    }
}

/// A message that could not be written: redelivered later, or parked on its last delivery if
/// the failure is its own (never for a database that is away: see [`vault_core::db::is_transient`]).
async fn give_back(pool: &PgPool, p: Pending, error: &sqlx::Error) {
    metrics::counter!("vault_notify_write_failures_total").increment(1);
    let delivered = p.msg.info().map(|i| i.delivered).unwrap_or(1);
    if delivered >= MAX_DELIVER && !vault_core::db::is_transient(error) {
        let reason = format!("not written after {delivered} deliveries: {error}");
        if p.park(pool, &reason).await {
            return;
        }
    }
    tracing::warn!(error = %error, event = %p.value.event_id(), delivered, "notify message not written; it will be redelivered");
    p.retry(Duration::from_secs(1)).await;
}
