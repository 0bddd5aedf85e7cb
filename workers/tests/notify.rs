//! The notify worker against real NATS, Postgres and HTTP receivers: events become exactly one
//! notification, signed webhook delivery and email each; failing receivers are retried, slow ones
//! stall nobody, private destinations are refused; new-IP logins alert once; a kill -9 loses and
//! doubles nothing, whether it hits the consumption of events or webhook requests in flight.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::Utc;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vault_bus::message::{AuthEvent, AuthEventKind, EngineEvent, EventKind, encode};
use vault_bus::{Bus, BusMessage, MessageContext};
use vault_testkit::{NatsServer, Proc, TestDb, base_env, http_client, poll_until};
use vault_workers::notify::Wakers;
use vault_workers::notify::consume;
use vault_workers::notify::plan::Source;
use vault_workers::notify::webhook::{DeliveryConfig, run_deliveries};

const BIN: &str = env!("CARGO_BIN_EXE_vault-worker");
const SECRET: &str = "whsec_0123456789abcdef0123456789abcdef";

// ---------------------------------------------------------------------------------------------
// A webhook receiver: POST /<name> records the call; `slow` answers once the test releases it,
// `sluggish` takes 200 ms,
// `flaky` answers 500 on its first call, `broken` always 500, `down` 500 until the test brings it
// `up`, `held` 500 once the test releases it (as `slow`), anything else 200.

#[derive(Debug, Clone)]
struct Hit {
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

#[derive(Debug, Clone)]
struct Receiver {
    hits: Arc<Mutex<HashMap<String, Vec<Hit>>>>,
    slow_finished: Arc<AtomicUsize>,
    /// No permits until the test releases `slow`; then every call passes.
    slow_released: Arc<tokio::sync::Semaphore>,
    /// Whether `down` answers 200 yet.
    up: Arc<std::sync::atomic::AtomicBool>,
}

impl Default for Receiver {
    fn default() -> Self {
        Receiver {
            hits: Arc::default(),
            slow_finished: Arc::default(),
            slow_released: Arc::new(tokio::sync::Semaphore::new(0)),
            up: Arc::default(),
        }
    }
}

impl Receiver {
    async fn start() -> (String, Receiver) {
        let receiver = Receiver::default();
        let app = axum::Router::new().route("/{name}", axum::routing::post(receive)).with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the receiver");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}"), receiver)
    }

    fn hits(&self, name: &str) -> Vec<Hit> {
        self.hits.lock().expect("lock").get(name).cloned().unwrap_or_default()
    }
}

async fn receive(State(r): State<Receiver>, Path(name): Path<String>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let calls = {
        let mut hits = r.hits.lock().expect("lock");
        let list = hits.entry(name.clone()).or_default();
        list.push(Hit { headers, body, at: Instant::now() });
        list.len()
    };
    match name.as_str() {
        "slow" => {
            let _released = r.slow_released.acquire().await;
            r.slow_finished.fetch_add(1, Ordering::SeqCst);
            StatusCode::OK
        }
        "held" => {
            let _released = r.slow_released.acquire().await;
            StatusCode::INTERNAL_SERVER_ERROR
        }
        "sluggish" => {
            tokio::time::sleep(Duration::from_millis(200)).await;
            StatusCode::OK
        }
        "flaky" if calls == 1 => StatusCode::INTERNAL_SERVER_ERROR,
        "broken" => StatusCode::INTERNAL_SERVER_ERROR,
        "down" if !r.up.load(Ordering::SeqCst) => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::OK,
    }
}

// ---------------------------------------------------------------------------------------------
// Stack helpers

struct Stack {
    nats: NatsServer,
    db: TestDb,
    pool: PgPool,
    bus: Bus,
}

impl Stack {
    async fn start() -> Stack {
        let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
        let pool = db.pool().await;
        let bus = Bus::connect(&nats.url(), "test").await.expect("connects");
        bus.ensure_streams().await.expect("streams");
        Stack { nats, db, pool, bus }
    }

    /// Starts `vault-worker notify`; returns it with its ops address.
    async fn worker(&self, allow_private: bool) -> (Proc, String) {
        let mut envs = base_env(&self.db, &self.nats);
        if allow_private {
            envs.push(("WEBHOOK_ALLOW_PRIVATE", "true".to_owned()));
        }
        let (worker, addr) = Proc::start_ready(BIN, &["notify"], &envs).await;
        (worker, addr)
    }

    async fn user(&self) -> (Uuid, String) {
        let id = Uuid::now_v7();
        let email = format!("u{}@example.com", id.simple());
        sqlx::query("INSERT INTO users (id, email, password_hash) VALUES ($1, $2, '$argon2id$test')")
            .bind(id)
            .bind(&email)
            .execute(&self.pool)
            .await
            .expect("user");
        (id, email)
    }

    async fn webhook(&self, user: Uuid, url: &str, events: &[&str]) -> Uuid {
        let id = Uuid::now_v7();
        sqlx::query("INSERT INTO webhooks (id, user_id, url, events, secret) VALUES ($1, $2, $3, $4, $5)")
            .bind(id)
            .bind(user)
            .bind(url)
            .bind(events)
            .bind(SECRET)
            .execute(&self.pool)
            .await
            .expect("webhook");
        id
    }

    async fn count(&self, sql: &str, id: Uuid) -> i64 {
        sqlx::query_scalar(sql).bind(id).fetch_one(&self.pool).await.expect("count")
    }

    async fn delivery(&self, webhook: Uuid) -> Option<(String, i32, Option<i32>, Option<String>)> {
        sqlx::query_as(
            "SELECT status, attempts, last_status_code, last_error FROM webhook_deliveries WHERE webhook_id = $1",
        )
        .bind(webhook)
        .fetch_optional(&self.pool)
        .await
        .expect("delivery")
    }
}

fn order(status: &str) -> Value {
    json!({
        "id": Uuid::now_v7(), "client_order_id": "c1", "symbol": "BTC-USD", "side": "buy", "type": "market",
        "time_in_force": "ioc", "quantity": "0.015", "limit_price": null, "status": status,
        "filled_quantity": "0.015", "average_fill_price": "50000.00", "fee": "0.75", "reject_reason": null,
        "created_at": "2026-11-22T12:00:00.000001Z", "updated_at": "2026-11-22T12:00:00.000002Z", "fills": []
    })
}

fn engine_event(user: Uuid, kind: EventKind, data: Value) -> EngineEvent {
    EngineEvent { id: Uuid::now_v7(), kind, user_id: user, request_id: Some("req-n".into()), at: Utc::now(), data }
}

fn auth_event(user: Uuid, kind: AuthEventKind, ip: &str) -> AuthEvent {
    AuthEvent {
        id: Uuid::now_v7(),
        kind,
        user_id: Some(user),
        request_id: None,
        ip: Some(ip.into()),
        at: Utc::now(),
        data: json!({"family": Uuid::now_v7(), "minutes": 15}),
    }
}

async fn publish<M: BusMessage>(bus: &Bus, msg: &M) {
    bus.publish(msg, &MessageContext::default()).await.expect("publish");
}

/// Publishes `msg` again without its dedupe id, so JetStream stores it as a new message: what a
/// redelivery after a crash looks like to the consumer.
async fn publish_duplicate<M: BusMessage>(bus: &Bus, msg: &M) {
    let payload = encode(msg).expect("encodes");
    bus.jetstream().publish(msg.subject(), payload.into()).await.expect("send").await.expect("ack");
}

async fn metric(addr: &str, line_prefix: &str) -> f64 {
    let text =
        http_client().get(format!("http://{addr}/metrics")).send().await.expect("metrics").text().await.expect("text");
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_fill_becomes_one_notification_one_signed_delivery_and_one_email_and_a_duplicate_adds_nothing() {
    let stack = Stack::start().await;
    let (base, receiver) = Receiver::start().await;
    let (_worker, ops) = stack.worker(true).await;
    let (user, email) = stack.user().await;
    let fills = stack.webhook(user, &format!("{base}/fills"), &["order.filled"]).await;
    let deposits = stack.webhook(user, &format!("{base}/deposits"), &["deposit.completed"]).await;

    let filled = engine_event(user, EventKind::OrderFilled, order("filled"));
    publish(&stack.bus, &filled).await;
    let hit = poll_until(Duration::from_secs(20), "the signed delivery", || async {
        receiver.hits("fills").first().cloned()
    })
    .await;

    // The signature, checked with an HMAC computed here.
    let header = hit.headers.get("vault-signature").expect("signed").to_str().expect("ascii");
    let (t, v1) = header
        .split_once(',')
        .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v1=")?)))
        .expect("t=…,v1=…");
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(format!("{t}.").as_bytes());
    mac.update(&hit.body);
    mac.verify_slice(&hex::decode(v1).expect("hex")).expect("the signature matches the body");
    let t: i64 = t.parse().expect("unix seconds");
    assert!((Utc::now().timestamp() - t).abs() < 60, "t is the send time");
    assert_eq!(hit.headers.get("content-type").map(|v| v.as_bytes()), Some(&b"application/json"[..]));

    let body: Value = serde_json::from_slice(&hit.body).expect("json body");
    assert_eq!(body["id"], json!(filled.id));
    assert_eq!(body["type"], "order.filled");
    assert_eq!(body["data"], filled.data);
    let created =
        chrono::DateTime::parse_from_rfc3339(body["created_at"].as_str().expect("created_at")).expect("rfc3339");
    assert_eq!(created.timestamp_micros(), filled.at.timestamp_micros());
    assert_eq!(body.as_object().map(|o| o.len()), Some(4), "{body}");

    poll_until(Duration::from_secs(10), "the delivery to be recorded", || async {
        matches!(stack.delivery(fills).await, Some((s, 1, Some(200), None)) if s == "delivered").then_some(())
    })
    .await;
    let (kind, title, data): (String, String, Value) =
        sqlx::query_as("SELECT kind, title, data FROM notifications WHERE user_id = $1")
            .bind(user)
            .fetch_one(&stack.pool)
            .await
            .expect("one notification");
    assert_eq!((kind.as_str(), title.as_str()), ("order.filled", "Order filled"));
    assert_eq!(data, filled.data);
    let to: String = sqlx::query_scalar("SELECT to_address FROM email_outbox WHERE user_id = $1")
        .bind(user)
        .fetch_one(&stack.pool)
        .await
        .expect("one email");
    assert_eq!(to, email);
    poll_until(Duration::from_secs(10), "the email to be sent (to the log)", || async {
        (stack.count("SELECT count(*) FROM email_outbox WHERE user_id = $1 AND status = 'sent'", user).await == 1)
            .then_some(())
    })
    .await;

    // The same event again: once deduped by JetStream, once as a genuinely new message.
    publish(&stack.bus, &filled).await;
    publish_duplicate(&stack.bus, &filled).await;
    // Then a later event on the same stream: once it is handled, the duplicate was too.
    let deposit =
        engine_event(user, EventKind::DepositCompleted, json!({"id": Uuid::now_v7(), "asset": "USD", "amount": "10"}));
    publish(&stack.bus, &deposit).await;
    poll_until(Duration::from_secs(20), "the later event's notification", || async {
        (stack
            .count("SELECT count(*) FROM notifications WHERE user_id = $1 AND kind = 'deposit.completed'", user)
            .await
            == 1)
            .then_some(())
    })
    .await;
    assert_eq!(stack.count("SELECT count(*) FROM notifications WHERE user_id = $1", user).await, 2);
    assert_eq!(stack.count("SELECT count(*) FROM email_outbox WHERE user_id = $1", user).await, 1);
    assert_eq!(stack.count("SELECT count(*) FROM webhook_deliveries WHERE webhook_id = $1", fills).await, 1);
    assert_eq!(metric(&ops, "vault_notify_skipped_total{reason=\"redelivered\"}").await, 1.0);
    // The receiver sees the request before the worker records its answer: wait for the record.
    poll_until(Duration::from_secs(10), "the deposit webhook to be delivered", || async {
        matches!(stack.delivery(deposits).await, Some((s, ..)) if s == "delivered").then_some(())
    })
    .await;
    assert_eq!(receiver.hits("deposits").len(), 1);
    assert_eq!(receiver.hits("fills").len(), 1, "the fill was posted once");
    assert_eq!(metric(&ops, "vault_notifications_total{kind=\"order.filled\"}").await, 1.0);
}

#[tokio::test]
async fn a_new_notification_is_pushed_on_its_users_subject_once_committed_and_a_redelivery_pushes_nothing() {
    use futures::StreamExt;
    use vault_bus::message::{NotificationPush, decode};

    let stack = Stack::start().await;
    let (_worker, ops) = stack.worker(false).await;
    let (user, _) = stack.user().await;
    let mut pushes = stack.bus.client().subscribe(vault_bus::subjects::notification(user)).await.expect("subscribe");
    stack.bus.client().flush().await.expect("the subscription reaches the server");
    async fn next_push(pushes: &mut async_nats::Subscriber) -> NotificationPush {
        let message = tokio::time::timeout(Duration::from_secs(20), pushes.next())
            .await
            .expect("a push within 20 s")
            .expect("the subscription is open");
        decode::<NotificationPush>(message.subject.as_str(), &message.payload).expect("a v1 notification push")
    }

    let filled = engine_event(user, EventKind::OrderFilled, order("filled"));
    publish(&stack.bus, &filled).await;
    let push = next_push(&mut pushes).await;
    // Pushed after the commit: the row is there the moment the push is.
    let (id, kind, title, body, data, created_at): (Uuid, String, String, String, Value, chrono::DateTime<Utc>) =
        sqlx::query_as("SELECT id, kind, title, body, data, created_at FROM notifications WHERE user_id = $1")
            .bind(user)
            .fetch_one(&stack.pool)
            .await
            .expect("the notification row exists when its push arrives");
    assert_eq!(
        push,
        NotificationPush { id, user_id: user, kind, title, body, data, created_at },
        "the push is the row"
    );
    assert_eq!((push.kind.as_str(), &push.data), ("order.filled", &filled.data));

    // The same event again as a new message (a redelivery): no row, so no push. The next push
    // is the later event's.
    publish_duplicate(&stack.bus, &filled).await;
    let deposit =
        engine_event(user, EventKind::DepositCompleted, json!({"id": Uuid::now_v7(), "asset": "USD", "amount": "10"}));
    publish(&stack.bus, &deposit).await;
    assert_eq!(next_push(&mut pushes).await.kind, "deposit.completed");
    assert_eq!(metric(&ops, "vault_notify_skipped_total{reason=\"redelivered\"}").await, 1.0);
    assert_eq!(metric(&ops, "vault_notification_pushes_total{outcome=\"sent\"}").await, 2.0);
}

/// Inserts a due delivery of a made-up event to `url` and returns its id.
async fn pending_delivery(stack_pool: &PgPool, user: Uuid, url: &str) -> Uuid {
    let webhook = vault_testkit::insert_webhook(stack_pool, user, url, SECRET).await;
    vault_testkit::insert_due_delivery(stack_pool, webhook).await;
    webhook
}

#[tokio::test]
async fn a_receiver_failing_once_is_retried_after_the_backoff_and_ends_delivered_with_two_attempts() {
    let stack = Stack::start().await;
    let (base, receiver) = Receiver::start().await;
    let (user, _) = stack.user().await;
    let flaky = pending_delivery(&stack.pool, user, &format!("{base}/flaky")).await;

    let shutdown = CancellationToken::new();
    let config = DeliveryConfig {
        backoff_base: Duration::from_millis(50),
        poll_interval: Duration::from_millis(10),
        ..DeliveryConfig::new(true)
    };
    let wake = Wakers::default().deliveries;
    let loop_ = tokio::spawn(run_deliveries(stack.pool.clone(), config, wake, shutdown.clone()));

    poll_until(Duration::from_secs(20), "the flaky delivery to succeed", || async {
        matches!(stack.delivery(flaky).await, Some((s, _, _, _)) if s == "delivered").then_some(())
    })
    .await;
    assert_eq!(stack.delivery(flaky).await, Some(("delivered".to_owned(), 2, Some(200), None)));
    let hits = receiver.hits("flaky");
    assert_eq!(hits.len(), 2);
    let gap = hits[1].at - hits[0].at;
    assert!(gap >= Duration::from_millis(40), "the retry waited the backoff (50 ms −20 %): {gap:?}");
    assert_eq!(hits[0].body, hits[1].body, "every attempt sends the same payload");

    shutdown.cancel();
    loop_.await.expect("joins").expect("the loop stops cleanly");
}

#[tokio::test]
async fn a_receiver_that_keeps_failing_ends_failed_after_eight_attempts() {
    let stack = Stack::start().await;
    let (base, receiver) = Receiver::start().await;
    let (user, _) = stack.user().await;
    let broken = pending_delivery(&stack.pool, user, &format!("{base}/broken")).await;
    let shutdown = CancellationToken::new();
    // 1 ms × 3^n: the seven waits sum to about 1.1 s.
    let config = DeliveryConfig {
        backoff_base: Duration::from_millis(1),
        poll_interval: Duration::from_millis(10),
        ..DeliveryConfig::new(true)
    };
    let loop_ =
        tokio::spawn(run_deliveries(stack.pool.clone(), config, Wakers::default().deliveries, shutdown.clone()));
    poll_until(Duration::from_secs(30), "the delivery to fail for good", || async {
        matches!(stack.delivery(broken).await, Some((s, _, _, _)) if s == "failed").then_some(())
    })
    .await;
    assert_eq!(
        stack.delivery(broken).await,
        Some(("failed".to_owned(), 8, Some(500), Some("HTTP 500 Internal Server Error".to_owned())))
    );
    assert_eq!(receiver.hits("broken").len(), 8);
    shutdown.cancel();
    loop_.await.expect("joins").expect("the loop stops cleanly");
}

/// A webhook whose attempts keep failing pauses as a whole: three failures in a row (the test's
/// threshold) cost three requests, not one per pending event; its seven other deliveries wait
/// without spending attempts while another user's delivery goes out; a failed probe after the
/// pause pauses it three times longer; and once a pause is over and the receiver answers, every
/// delivery is delivered once and the webhook's failures clear.
#[tokio::test]
async fn a_webhook_that_keeps_failing_pauses_and_its_waiting_deliveries_spend_no_attempts() {
    let stack = Stack::start().await;
    let (base, receiver) = Receiver::start().await;
    let (user, _) = stack.user().await;
    let down = vault_testkit::insert_webhook(&stack.pool, user, &format!("{base}/down"), SECRET).await;
    for _ in 0..10 {
        vault_testkit::insert_due_delivery(&stack.pool, down).await;
    }
    let (other, _) = stack.user().await;
    let fine = pending_delivery(&stack.pool, other, &format!("{base}/fine")).await;
    // Backoffs of ten minutes: nothing that failed comes due again by itself during the test.
    let config = DeliveryConfig {
        backoff_base: Duration::from_secs(600),
        per_webhook: 1,
        pause_after: 3,
        poll_interval: Duration::from_millis(10),
        ..DeliveryConfig::new(true)
    };
    let wake = Wakers::default().deliveries;
    let shutdown = CancellationToken::new();
    let loop_ = tokio::spawn(run_deliveries(stack.pool.clone(), config, wake.clone(), shutdown.clone()));
    let state = |hook: Uuid| {
        let pool = stack.pool.clone();
        async move {
            sqlx::query_as::<_, (i32, Option<chrono::DateTime<Utc>>)>(
                "SELECT consecutive_failures, paused_until FROM webhooks WHERE id = $1",
            )
            .bind(hook)
            .fetch_one(&pool)
            .await
            .expect("webhook")
        }
    };
    let attempts = |hook: Uuid| {
        let pool = stack.pool.clone();
        async move {
            sqlx::query_as::<_, (String, i32, i64)>(
                "SELECT status, attempts, count(*) FROM webhook_deliveries WHERE webhook_id = $1
                  GROUP BY 1, 2 ORDER BY 1, 2",
            )
            .bind(hook)
            .fetch_all(&pool)
            .await
            .expect("deliveries")
        }
    };

    let (failures, until) = poll_until(Duration::from_secs(20), "the failing webhook to pause", || async {
        Some(state(down).await).filter(|(_, until)| until.is_some())
    })
    .await;
    assert_eq!(failures, 3);
    assert!(until.expect("paused") > Utc::now() + chrono::Duration::minutes(7), "paused for 10 min ±20 %");
    assert_eq!(receiver.hits("down").len(), 3, "three requests, then the pause: not one per pending event");
    assert_eq!(
        attempts(down).await,
        [("pending".to_owned(), 0, 7), ("pending".to_owned(), 1, 3)],
        "the waiting deliveries spent no attempt"
    );
    poll_until(Duration::from_secs(20), "another user's delivery during the pause", || async {
        matches!(stack.delivery(fine).await, Some((s, ..)) if s == "delivered").then_some(())
    })
    .await;
    assert_eq!(receiver.hits("down").len(), 3, "still paused");

    // The pause runs out with the receiver still down: one probe fails, and the second pause is
    // three times the first (it counts pauses, not the failures that came with them).
    sqlx::query("UPDATE webhooks SET paused_until = now() WHERE id = $1")
        .bind(down)
        .execute(&stack.pool)
        .await
        .expect("the pause runs out");
    wake.notify_one();
    let (_, until) = poll_until(Duration::from_secs(20), "the second pause", || async {
        Some(state(down).await).filter(|(failures, until)| *failures == 4 && until.is_some_and(|u| u > Utc::now()))
    })
    .await;
    assert!(until.expect("paused") > Utc::now() + chrono::Duration::minutes(23), "paused for 30 min ±20 %");
    assert_eq!(receiver.hits("down").len(), 4, "one probe, then the second pause");

    // The receiver is back; the pause, and the four failed deliveries' own waits, run out.
    receiver.up.store(true, Ordering::SeqCst);
    sqlx::query("UPDATE webhooks SET paused_until = now() WHERE id = $1")
        .bind(down)
        .execute(&stack.pool)
        .await
        .expect("the pause runs out");
    sqlx::query("UPDATE webhook_deliveries SET next_attempt_at = now() WHERE webhook_id = $1 AND attempts = 1")
        .bind(down)
        .execute(&stack.pool)
        .await
        .expect("the failed deliveries come due");
    wake.notify_one();
    poll_until(Duration::from_secs(20), "every delivery of the webhook delivered", || async {
        let rows = attempts(down).await;
        rows.iter().all(|(status, ..)| status == "delivered").then_some(())
    })
    .await;
    assert_eq!(
        attempts(down).await,
        [("delivered".to_owned(), 1, 6), ("delivered".to_owned(), 2, 4)],
        "each delivered once: the six that waited at their first attempt"
    );
    assert_eq!(receiver.hits("down").len(), 14);
    assert_eq!(state(down).await, (0, None), "the success cleared the failures and the pause");
    shutdown.cancel();
    loop_.await.expect("joins").expect("the loop stops cleanly");
}

/// Attempts that fail together start one pause: two attempts of a webhook under way at once both
/// fail with a threshold of one; the first pauses the webhook, the second finds it paused and
/// neither counts another pause nor lengthens it.
#[tokio::test]
async fn attempts_failing_together_start_one_pause_not_a_longer_one() {
    let stack = Stack::start().await;
    let (base, receiver) = Receiver::start().await;
    let (user, _) = stack.user().await;
    let hook = vault_testkit::insert_webhook(&stack.pool, user, &format!("{base}/held"), SECRET).await;
    for _ in 0..2 {
        vault_testkit::insert_due_delivery(&stack.pool, hook).await;
    }
    let config = DeliveryConfig {
        backoff_base: Duration::from_secs(600),
        per_webhook: 2,
        pause_after: 1,
        poll_interval: Duration::from_millis(10),
        ..DeliveryConfig::new(true)
    };
    let shutdown = CancellationToken::new();
    let loop_ =
        tokio::spawn(run_deliveries(stack.pool.clone(), config, Wakers::default().deliveries, shutdown.clone()));
    poll_until(Duration::from_secs(20), "both attempts under way", || async {
        (receiver.hits("held").len() == 2).then_some(())
    })
    .await;
    receiver.slow_released.add_permits(2);
    let (pauses, until) = poll_until(Duration::from_secs(20), "both failures recorded", || async {
        let (failures, pauses, until): (i32, i32, Option<chrono::DateTime<Utc>>) =
            sqlx::query_as("SELECT consecutive_failures, pauses, paused_until FROM webhooks WHERE id = $1")
                .bind(hook)
                .fetch_one(&stack.pool)
                .await
                .expect("webhook");
        (failures == 2).then_some((pauses, until))
    })
    .await;
    assert_eq!(pauses, 1, "one pause");
    let until = until.expect("paused");
    assert!(until < Utc::now() + chrono::Duration::minutes(13), "the first pause's length (10 min ±20 %): {until}");
    assert!(until > Utc::now() + chrono::Duration::minutes(7), "paused: {until}");
    shutdown.cancel();
    loop_.await.expect("joins").expect("the loop stops cleanly");
}

/// Deliveries do not wait for ever: one still pending three days after it was written fails as
/// expired although its webhook is paused; a paused webhook that is deleted has its deliveries
/// failed at once, not after the pause; a recent delivery of a paused webhook waits untouched.
#[tokio::test]
async fn a_paused_webhooks_deliveries_expire_after_three_days_and_fail_at_once_when_it_is_deleted() {
    let stack = Stack::start().await;
    let (user, _) = stack.user().await;
    let old = pending_delivery(&stack.pool, user, "http://127.0.0.1:9/old").await;
    let gone = pending_delivery(&stack.pool, user, "http://127.0.0.1:9/gone").await;
    let fresh = pending_delivery(&stack.pool, user, "http://127.0.0.1:9/fresh").await;
    for sql in [
        "UPDATE webhooks SET consecutive_failures = 5, pauses = 1, paused_until = now() + interval '1 hour'
          WHERE user_id = $1",
        "UPDATE webhook_deliveries SET created_at = now() - interval '73 hours'
          WHERE webhook_id = (SELECT id FROM webhooks WHERE user_id = $1 AND url LIKE '%/old')",
        "UPDATE webhooks SET deleted_at = now() WHERE user_id = $1 AND url LIKE '%/gone'",
    ] {
        sqlx::query(sql).bind(user).execute(&stack.pool).await.expect(sql);
    }
    let config = DeliveryConfig {
        poll_interval: Duration::from_millis(10),
        expire_every: Duration::from_millis(50),
        ..DeliveryConfig::new(true)
    };
    let shutdown = CancellationToken::new();
    let loop_ =
        tokio::spawn(run_deliveries(stack.pool.clone(), config, Wakers::default().deliveries, shutdown.clone()));
    poll_until(Duration::from_secs(20), "the old and the deleted webhook's deliveries to end", || async {
        let ended = |d: Option<(String, i32, Option<i32>, Option<String>)>| d.is_some_and(|d| d.0 != "pending");
        (ended(stack.delivery(old).await) && ended(stack.delivery(gone).await)).then_some(())
    })
    .await;
    assert_eq!(
        stack.delivery(old).await,
        Some(("failed".to_owned(), 0, None, Some("expired: not delivered within 72 hours".to_owned())))
    );
    assert_eq!(
        stack.delivery(gone).await,
        Some(("failed".to_owned(), 0, None, Some("the webhook was deleted".to_owned())))
    );
    assert_eq!(stack.delivery(fresh).await, Some(("pending".to_owned(), 0, None, None)), "it waits for the pause");
    // Nor was it claimed: a claim leases a row (its next attempt pushed a minute on) in the
    // statement that takes it, so the claim that took the deleted webhook's would show here.
    let leased: bool =
        sqlx::query_scalar("SELECT next_attempt_at > now() FROM webhook_deliveries WHERE webhook_id = $1")
            .bind(fresh)
            .fetch_one(&stack.pool)
            .await
            .expect("lease");
    assert!(!leased, "the paused webhook's delivery was not claimed");
    shutdown.cancel();
    loop_.await.expect("joins").expect("the loop stops cleanly");
}

#[tokio::test]
async fn a_webhook_resolving_to_loopback_is_never_called_and_fails_with_a_reason() {
    let stack = Stack::start().await;
    let (base, receiver) = Receiver::start().await;
    let (_worker, _) = stack.worker(false).await;
    let (user, _) = stack.user().await;
    // `localhost` resolves to 127.0.0.1 (and maybe ::1); the receiver really listens there.
    let url = base.replace("127.0.0.1", "localhost") + "/private";
    let hook = stack.webhook(user, &url, &["order.filled"]).await;
    publish(&stack.bus, &engine_event(user, EventKind::OrderFilled, order("filled"))).await;
    let (status, attempts, code, error) = poll_until(Duration::from_secs(20), "the delivery to fail", || async {
        stack.delivery(hook).await.filter(|d| d.0 != "pending")
    })
    .await;
    assert_eq!((status.as_str(), attempts, code), ("failed", 0, None));
    let error = error.expect("a reason");
    assert!(error.contains("refused: localhost resolves to") && error.contains("loopback"), "{error}");
    assert!(receiver.hits("private").is_empty(), "no request was made");
    // The notification itself is unaffected.
    assert_eq!(stack.count("SELECT count(*) FROM notifications WHERE user_id = $1", user).await, 1);
}

#[tokio::test]
async fn a_slow_receiver_does_not_delay_another_webhooks_delivery() {
    let stack = Stack::start().await;
    let (base, receiver) = Receiver::start().await;
    let (_worker, _) = stack.worker(true).await;
    let (user, _) = stack.user().await;
    stack.webhook(user, &format!("{base}/slow"), &["order.accepted"]).await;
    stack.webhook(user, &format!("{base}/fast"), &["order.filled"]).await;

    publish(&stack.bus, &engine_event(user, EventKind::OrderAccepted, order("open"))).await;
    poll_until(Duration::from_secs(20), "the slow receiver to be called", || async {
        (!receiver.hits("slow").is_empty()).then_some(())
    })
    .await;
    // While the slow receiver holds its request (until released below), another delivery goes
    // through.
    publish(&stack.bus, &engine_event(user, EventKind::OrderFilled, order("filled"))).await;
    poll_until(Duration::from_secs(20), "the fast receiver to be called", || async {
        (!receiver.hits("fast").is_empty()).then_some(())
    })
    .await;
    assert_eq!(
        receiver.slow_finished.load(Ordering::SeqCst),
        0,
        "the fast delivery arrived while the slow one was still waiting"
    );
    // And before the worker gave up on the slow request: deliveries one after the other would
    // get the fast one out only once the slow one timed out.
    let (slow, fast) = (receiver.hits("slow")[0].at, receiver.hits("fast")[0].at);
    let timeout = DeliveryConfig::new(true).request_timeout;
    assert!(fast - slow < timeout, "the fast delivery waited {:?} for the slow one", fast - slow);
    receiver.slow_released.add_permits(1);
    // (At least once: held past the worker's 10 s request timeout on a loaded machine, the
    // request is retried, and both calls may complete.)
    poll_until(Duration::from_secs(30), "the slow delivery to complete", || async {
        (receiver.slow_finished.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await;
}

/// One user's receivers cannot take every delivery slot: user A has more webhooks than the
/// delivery loop has slots, all at a receiver that holds every request, and one event for all of
/// them; user B's delivery, published after, still goes out at once — long before A's requests
/// could time out — while A holds no more than its share of the slots.
#[tokio::test]
async fn one_users_hanging_receivers_do_not_delay_another_users_delivery() {
    const CONCURRENCY: usize = 6;
    const A_WEBHOOKS: usize = 8;
    let stack = Stack::start().await;
    let (base, receiver) = Receiver::start().await;
    let (a, _) = stack.user().await;
    for _ in 0..A_WEBHOOKS {
        stack.webhook(a, &format!("{base}/slow"), &["order.filled"]).await;
    }
    let (b, _) = stack.user().await;
    stack.webhook(b, &format!("{base}/fast"), &["order.filled"]).await;

    // The consumer and the delivery loop in this process, with few slots and a request timeout
    // far beyond the wait below: a delivery queued behind A's would wait for it.
    let config = DeliveryConfig {
        concurrency: CONCURRENCY,
        request_timeout: Duration::from_secs(120),
        lease: Duration::from_secs(300),
        poll_interval: Duration::from_millis(10),
        drain: Duration::from_secs(5),
        ..DeliveryConfig::new(true)
    };
    assert!(A_WEBHOOKS > CONCURRENCY && config.per_user < CONCURRENCY, "the test's premise");
    let per_user = config.per_user;
    let (shutdown, wakers) = (CancellationToken::new(), Wakers::default());
    let deliveries =
        tokio::spawn(run_deliveries(stack.pool.clone(), config, wakers.deliveries.clone(), shutdown.clone()));
    stack.bus.ensure_consumers(&vault_bus::consumers::notify()).await.expect("the notifier's consumers");
    let consumers = {
        let (bus, pool, wakers, shutdown) = (stack.bus.clone(), stack.pool.clone(), wakers.clone(), shutdown.clone());
        tokio::spawn(async move {
            vault_workers::notify::consume::run_consumers(&bus, &pool, vault_bus::consumers::notify(), wakers, shutdown)
                .await
        })
    };

    publish(&stack.bus, &engine_event(a, EventKind::OrderFilled, order("filled"))).await;
    poll_until(Duration::from_secs(20), "A's receiver to be called", || async {
        (!receiver.hits("slow").is_empty()).then_some(())
    })
    .await;
    publish(&stack.bus, &engine_event(b, EventKind::OrderFilled, order("filled"))).await;
    poll_until(Duration::from_secs(15), "B's receiver to be called while A's requests hang", || async {
        (!receiver.hits("fast").is_empty()).then_some(())
    })
    .await;
    assert_eq!(receiver.slow_finished.load(Ordering::SeqCst), 0, "A's requests were all still held");
    let a_calls = receiver.hits("slow").len();
    assert!(a_calls <= per_user, "A held {a_calls} slots at once, more than its {per_user}");

    // A's other deliveries wait their turn and all go out once its receiver answers.
    receiver.slow_released.add_permits(A_WEBHOOKS * 4);
    poll_until(Duration::from_secs(30), "every delivery of A delivered", || async {
        let delivered: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id
              WHERE w.user_id = $1 AND d.status = 'delivered'",
        )
        .bind(a)
        .fetch_one(&stack.pool)
        .await
        .ok()?;
        (delivered == A_WEBHOOKS as i64).then_some(())
    })
    .await;
    shutdown.cancel();
    deliveries.await.expect("joins").expect("the delivery loop stops cleanly");
    consumers.await.expect("joins").expect("the consumers stop cleanly");
}

/// A claim skips rows another notify process holds before it counts its limit: with the two
/// oldest due deliveries locked elsewhere and room for two, the third is claimed. (The limit
/// came first: both claims picked the same oldest rows, and the one that found them locked
/// claimed nothing — here, for as long as the lock was held.)
#[tokio::test]
async fn a_claim_takes_the_next_rows_when_the_oldest_are_held_by_another_process() {
    let stack = Stack::start().await;
    let (base, receiver) = Receiver::start().await;
    let mut hooks = Vec::new();
    for name in ["first", "second", "third"] {
        let (user, _) = stack.user().await;
        let hook = stack.webhook(user, &format!("{base}/{name}"), &["order.filled"]).await;
        vault_testkit::insert_due_delivery(&stack.pool, hook).await;
        hooks.push(hook);
    }
    // Due in this order, the first two the oldest.
    for (age, hook) in [(30, hooks[0]), (20, hooks[1]), (10, hooks[2])] {
        sqlx::query(
            "UPDATE webhook_deliveries SET next_attempt_at = now() - make_interval(secs => $2) WHERE webhook_id = $1",
        )
        .bind(hook)
        .bind(f64::from(age))
        .execute(&stack.pool)
        .await
        .expect("aged");
    }
    // Another process's claim, under way: the two oldest rows locked.
    let mut other = stack.pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM webhook_deliveries WHERE webhook_id = ANY($1) FOR UPDATE")
        .bind(&hooks[..2])
        .execute(&mut *other)
        .await
        .expect("locked");

    let config =
        DeliveryConfig { concurrency: 2, poll_interval: Duration::from_millis(10), ..DeliveryConfig::new(true) };
    let shutdown = CancellationToken::new();
    let deliveries =
        tokio::spawn(run_deliveries(stack.pool.clone(), config, Wakers::default().deliveries, shutdown.clone()));
    poll_until(Duration::from_secs(15), "the third delivery, while the first two are held elsewhere", || async {
        (!receiver.hits("third").is_empty()).then_some(())
    })
    .await;
    assert!(receiver.hits("first").is_empty() && receiver.hits("second").is_empty(), "held rows are left alone");
    other.rollback().await.expect("released");
    poll_until(Duration::from_secs(15), "the first two, once released", || async {
        (!receiver.hits("first").is_empty() && !receiver.hits("second").is_empty()).then_some(())
    })
    .await;
    shutdown.cancel();
    deliveries.await.expect("joins").expect("the delivery loop stops cleanly");
}

/// A webhook's own backlog takes at most its share of the slots too: with five deliveries of
/// one webhook held by its receiver, another webhook of the same user still gets its delivery.
#[tokio::test]
async fn one_webhooks_backlog_holds_at_most_two_slots() {
    let stack = Stack::start().await;
    let (base, receiver) = Receiver::start().await;
    let (user, _) = stack.user().await;
    let slow = vault_testkit::insert_webhook(&stack.pool, user, &format!("{base}/slow"), SECRET).await;
    for _ in 0..5 {
        vault_testkit::insert_due_delivery(&stack.pool, slow).await;
    }
    let config = DeliveryConfig {
        concurrency: 6,
        request_timeout: Duration::from_secs(120),
        lease: Duration::from_secs(300),
        poll_interval: Duration::from_millis(10),
        drain: Duration::from_secs(5),
        ..DeliveryConfig::new(true)
    };
    let per_webhook = config.per_webhook;
    let shutdown = CancellationToken::new();
    let loop_ =
        tokio::spawn(run_deliveries(stack.pool.clone(), config, Wakers::default().deliveries, shutdown.clone()));
    poll_until(Duration::from_secs(20), "the held webhook to be called", || async {
        (!receiver.hits("slow").is_empty()).then_some(())
    })
    .await;
    let fast = pending_delivery(&stack.pool, user, &format!("{base}/fast")).await;
    poll_until(Duration::from_secs(15), "the other webhook to be called", || async {
        (!receiver.hits("fast").is_empty()).then_some(())
    })
    .await;
    let held = receiver.hits("slow").len();
    assert!(held <= per_webhook, "one webhook held {held} slots at once, more than its {per_webhook}");
    receiver.slow_released.add_permits(10);
    poll_until(Duration::from_secs(30), "every delivery delivered", || async {
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE status <> 'delivered'")
            .fetch_one(&stack.pool)
            .await
            .ok()?;
        (pending == 0 && stack.delivery(fast).await.is_some()).then_some(())
    })
    .await;
    assert_eq!(receiver.hits("slow").len(), 5, "each held delivery sent once");
    shutdown.cancel();
    loop_.await.expect("joins").expect("the loop stops cleanly");
}

/// An attempt whose row was recorded by another attempt meanwhile (its lease ran out and another
/// process took it over) changes nothing, and is neither counted nor logged as delivered: here
/// the row is marked delivered while the worker's request is held.
#[tokio::test]
async fn a_webhook_attempt_recorded_elsewhere_meanwhile_is_not_counted_again() {
    let stack = Stack::start().await;
    let (base, receiver) = Receiver::start().await;
    let (mut worker, ops) = stack.worker(true).await;
    let (user, _) = stack.user().await;
    let hook = pending_delivery(&stack.pool, user, &format!("{base}/slow")).await;
    poll_until(Duration::from_secs(20), "the request to be held", || async {
        (!receiver.hits("slow").is_empty()).then_some(())
    })
    .await;
    sqlx::query(
        "UPDATE webhook_deliveries SET status = 'delivered', attempts = 1, last_status_code = 299, next_attempt_at = NULL
          WHERE webhook_id = $1",
    )
    .bind(hook)
    .execute(&stack.pool)
    .await
    .expect("recorded elsewhere");
    receiver.slow_released.add_permits(1);
    let delivered = r#"vault_webhook_deliveries_total{outcome="delivered"}"#;
    let noticed = "webhook attempt not recorded";
    poll_until(Duration::from_secs(20), "the worker to record (or skip) its attempt", || async {
        (metric(&ops, delivered).await > 0.0 || worker.output().contains(noticed)).then_some(())
    })
    .await;
    assert_eq!(metric(&ops, delivered).await, 0.0, "the attempt was counted though it recorded nothing");
    assert_eq!(
        stack.delivery(hook).await,
        Some(("delivered".to_owned(), 1, Some(299), None)),
        "the other record stands"
    );
    worker.stop_cleanly(Duration::from_secs(30)).await;
}

/// A user's emails are limited (addresses are not verified, deposits are paper money), each
/// kind on its own budget: 20 fill emails an hour, one account-locked email a day, and a busy
/// trader's fills never use up the security emails. Every event still gets its in-app
/// notification.
#[tokio::test]
async fn a_users_emails_are_limited_per_kind_and_fills_never_use_up_the_security_emails() {
    let stack = Stack::start().await;
    let (_worker, ops) = stack.worker(true).await;
    let (trader, _) = stack.user().await;
    for _ in 0..25 {
        publish(&stack.bus, &engine_event(trader, EventKind::OrderFilled, order("filled"))).await;
    }
    // The first login is recorded, not new; the second, from another address, is mailed.
    publish(&stack.bus, &auth_event(trader, AuthEventKind::LoginSucceeded, "198.51.100.1")).await;
    publish(&stack.bus, &auth_event(trader, AuthEventKind::LoginSucceeded, "203.0.113.7")).await;
    for _ in 0..3 {
        publish(&stack.bus, &auth_event(trader, AuthEventKind::Locked, "203.0.113.9")).await;
    }
    poll_until(Duration::from_secs(30), "every event's notification", || async {
        // 25 fills, one new-IP login, three locks.
        (stack.count("SELECT count(*) FROM notifications WHERE user_id = $1", trader).await == 29).then_some(())
    })
    .await;
    let of_kind = |kind: &'static str| {
        let stack = &stack;
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM email_outbox WHERE user_id = $1 AND kind = $2")
                .bind(trader)
                .bind(kind)
                .fetch_one(&stack.pool)
                .await
                .expect("count")
        }
    };
    assert_eq!(of_kind("order.filled").await, 20, "20 fill emails an hour");
    assert_eq!(of_kind("auth.login.new_ip").await, 1, "the new sign-in is mailed after 25 fills");
    assert_eq!(of_kind("auth.locked").await, 1, "one lock email a day");
    // Counted once the batch's transaction committed: 5 fills over the limit, 2 lock emails.
    poll_until(Duration::from_secs(10), "the throttled emails counted", || async {
        let throttled = metric(&ops, "vault_notify_skipped_total{reason=\"email_throttled\"}").await;
        (throttled == 7.0).then_some(())
    })
    .await;
}

/// Scaled-out notifiers share a user's email budget: two batches of 20 fills each (the hourly
/// budget) written for one user at the same moment mail 20 between them, not 40. Both are held
/// until both are under way (a lock on `email_outbox` stops the first at its count); without the
/// budget's lock each counted only what was committed before it, nothing, and mailed all 20.
#[tokio::test]
async fn two_notifiers_writing_for_one_user_at_once_share_the_users_email_budget() {
    let stack = Stack::start().await;
    let (trader, _) = stack.user().await;
    let fills = || -> Vec<Source> {
        (0..20).map(|_| Source::Engine(engine_event(trader, EventKind::OrderFilled, order("filled")))).collect()
    };
    let mut gate = stack.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE email_outbox IN ACCESS EXCLUSIVE MODE").execute(&mut *gate).await.expect("lock");
    let apply = |sources: Vec<Source>| {
        let pool = stack.pool.clone();
        tokio::spawn(async move { consume::apply(&pool, &sources.iter().collect::<Vec<_>>()).await })
    };
    let (first, second) = (apply(fills()), apply(fills()));
    poll_until(Duration::from_secs(10), "both batches waiting on a lock", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT pid) FROM pg_locks
              WHERE NOT granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&stack.pool)
        .await
        .expect("locks");
        (waiting == 2).then_some(())
    })
    .await;
    gate.rollback().await.expect("release the table");
    let first = first.await.expect("joins").expect("the first batch commits");
    let second = second.await.expect("joins").expect("the second batch commits");
    assert_eq!(first.notifications.len() + second.notifications.len(), 40, "every fill notified");
    assert_eq!(
        (first.emails + second.emails, first.emails_throttled + second.emails_throttled),
        (20, 20),
        "20 fill emails an hour across both notifiers (mailed, throttled): {:?} and {:?}",
        (first.emails, first.emails_throttled),
        (second.emails, second.emails_throttled)
    );
    assert_eq!(stack.count("SELECT count(*) FROM email_outbox WHERE user_id = $1", trader).await, 20);
}

/// A change to an account's security (password, 2FA on or off, a new API key, a refresh token
/// presented twice) notifies its owner and mails the account's address, each kind within its
/// own daily budget; a logout or a revoked key concerns nobody.
#[tokio::test]
async fn each_security_change_is_notified_and_mailed_to_its_owner_within_a_budget_of_its_own() {
    let stack = Stack::start().await;
    let (_worker, _) = stack.worker(true).await;
    let (user, address) = stack.user().await;
    let change = |kind: AuthEventKind, data: Value| AuthEvent { data, ..auth_event(user, kind, "198.51.100.23") };
    publish(&stack.bus, &change(AuthEventKind::PasswordChanged, json!({"sessions_ended": 2}))).await;
    publish(&stack.bus, &change(AuthEventKind::ApiKeyCreated, json!({"api_key_id": Uuid::nil(), "scopes": ["read"]})))
        .await;
    publish(&stack.bus, &change(AuthEventKind::RefreshTokenReused, json!({"family": Uuid::nil()}))).await;
    publish(&stack.bus, &change(AuthEventKind::TotpReset, json!({"admin": Uuid::nil(), "sessions_ended": 1}))).await;
    publish(&stack.bus, &change(AuthEventKind::Logout, json!({}))).await;
    publish(&stack.bus, &change(AuthEventKind::ApiKeyRevoked, json!({"api_key_id": Uuid::nil()}))).await;
    // Turned on four times in a day (off again by an administrator between): three emails.
    for _ in 0..4 {
        publish(&stack.bus, &change(AuthEventKind::TotpEnabled, json!({"sessions_ended": 0}))).await;
    }
    poll_until(Duration::from_secs(30), "every security change's notification", || async {
        (stack.count("SELECT count(*) FROM notifications WHERE user_id = $1", user).await == 8).then_some(())
    })
    .await;
    let kinds: Vec<(String, i64)> =
        sqlx::query_as("SELECT kind, count(*) FROM notifications WHERE user_id = $1 GROUP BY kind ORDER BY kind")
            .bind(user)
            .fetch_all(&stack.pool)
            .await
            .expect("kinds");
    let kinds: Vec<(&str, i64)> = kinds.iter().map(|(k, n)| (k.as_str(), *n)).collect();
    assert_eq!(
        kinds,
        [
            ("auth.api_key.created", 1),
            ("auth.password.changed", 1),
            ("auth.refresh_token_reused", 1),
            ("auth.totp.enabled", 4),
            ("auth.totp.reset", 1)
        ]
    );
    let emails: Vec<(String, String, String)> =
        sqlx::query_as("SELECT kind, to_address, subject FROM email_outbox WHERE user_id = $1 ORDER BY kind, id")
            .bind(user)
            .fetch_all(&stack.pool)
            .await
            .expect("emails");
    let totp = "Two-factor authentication was turned on for your CryptoVault account";
    let expected = [
        ("auth.api_key.created", "A new API key was created for your CryptoVault account"),
        ("auth.password.changed", "Your CryptoVault password was changed"),
        ("auth.refresh_token_reused", "A session of your CryptoVault account was ended"),
        ("auth.totp.enabled", totp),
        ("auth.totp.enabled", totp),
        ("auth.totp.enabled", totp),
        ("auth.totp.reset", "Two-factor authentication was turned off for your CryptoVault account"),
    ];
    assert_eq!(emails.len(), expected.len(), "{emails:?}");
    for ((kind, to, subject), (want_kind, want_subject)) in emails.iter().zip(expected) {
        assert_eq!((kind.as_str(), to.as_str(), subject.as_str()), (want_kind, address.as_str(), want_subject));
    }
    let password: String =
        sqlx::query_scalar("SELECT body FROM email_outbox WHERE user_id = $1 AND kind = 'auth.password.changed'")
            .bind(user)
            .fetch_one(&stack.pool)
            .await
            .expect("the password email");
    assert!(password.contains("from 198.51.100.23. 2 other sessions were signed out."), "{password}");
}

#[tokio::test]
async fn a_login_from_a_new_ip_notifies_and_emails_once_and_the_same_ip_again_does_not() {
    let stack = Stack::start().await;
    let (_worker, _) = stack.worker(true).await;
    let (user, _) = stack.user().await;
    let count_new_ip =
        || stack.count("SELECT count(*) FROM notifications WHERE user_id = $1 AND kind = 'auth.login.new_ip'", user);

    // The first login after signup is compared with nothing: recorded, not alerted.
    publish(&stack.bus, &auth_event(user, AuthEventKind::LoginSucceeded, "198.51.100.1")).await;
    poll_until(Duration::from_secs(20), "the first IP to be recorded", || async {
        (stack.count("SELECT count(*) FROM known_login_ips WHERE user_id = $1", user).await == 1).then_some(())
    })
    .await;
    assert_eq!(count_new_ip().await, 0);

    publish(&stack.bus, &auth_event(user, AuthEventKind::LoginSucceeded, "203.0.113.9")).await;
    poll_until(Duration::from_secs(20), "the new-IP notification", || async {
        (count_new_ip().await == 1).then_some(())
    })
    .await;
    let (subject, body): (String, String) = sqlx::query_as("SELECT subject, body FROM email_outbox WHERE user_id = $1")
        .bind(user)
        .fetch_one(&stack.pool)
        .await
        .expect("one email");
    assert_eq!(subject, "New sign-in to your CryptoVault account");
    assert!(body.contains("203.0.113.9"), "{body}");

    // The same IP again, then a lock on the same stream as a marker that it was handled.
    publish(&stack.bus, &auth_event(user, AuthEventKind::LoginSucceeded, "203.0.113.9")).await;
    publish(&stack.bus, &auth_event(user, AuthEventKind::Locked, "203.0.113.9")).await;
    poll_until(Duration::from_secs(20), "the lock notification", || async {
        (stack.count("SELECT count(*) FROM notifications WHERE user_id = $1 AND kind = 'auth.locked'", user).await == 1)
            .then_some(())
    })
    .await;
    assert_eq!(count_new_ip().await, 1, "a known IP alerts nobody");
    let subjects: Vec<String> =
        sqlx::query_scalar("SELECT subject FROM email_outbox WHERE user_id = $1 ORDER BY created_at, id")
            .bind(user)
            .fetch_all(&stack.pool)
            .await
            .expect("emails");
    assert_eq!(subjects, ["New sign-in to your CryptoVault account", "Your CryptoVault account is locked"]);
    assert_eq!(stack.count("SELECT count(*) FROM known_login_ips WHERE user_id = $1", user).await, 2);
}

#[tokio::test]
async fn the_first_login_seen_is_new_only_for_a_user_who_logged_in_before() {
    let stack = Stack::start().await;
    let (_worker, _) = stack.worker(true).await;
    let (fresh, _) = stack.user().await;
    let (veteran, _) = stack.user().await;
    // The veteran logged in yesterday, before the notifier knew any of their IPs.
    sqlx::query("INSERT INTO token_families (id, user_id, created_at) VALUES ($1, $2, now() - interval '1 day')")
        .bind(Uuid::now_v7())
        .bind(veteran)
        .execute(&stack.pool)
        .await
        .expect("family");
    for user in [fresh, veteran] {
        publish(&stack.bus, &auth_event(user, AuthEventKind::LoginSucceeded, "198.51.100.7")).await;
    }
    poll_until(Duration::from_secs(20), "both IPs to be recorded", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM known_login_ips").fetch_one(&stack.pool).await.ok()?;
        (n == 2).then_some(())
    })
    .await;
    let new_ip = "SELECT count(*) FROM notifications WHERE user_id = $1 AND kind = 'auth.login.new_ip'";
    assert_eq!(stack.count(new_ip, fresh).await, 0);
    assert_eq!(stack.count(new_ip, veteran).await, 1);
}

#[tokio::test]
async fn every_event_has_exactly_one_notification_across_a_kill_9() {
    let stack = Stack::start().await;
    let (mut worker, _) = stack.worker(true).await;
    let users = [stack.user().await.0, stack.user().await.0, stack.user().await.0];
    let mut ids = Vec::new();
    let publish_some = |n: usize| {
        let bus = &stack.bus;
        let users = &users;
        async move {
            let mut published = Vec::new();
            for i in 0..n {
                let kind = [EventKind::OrderFilled, EventKind::OrderCanceled, EventKind::DepositCompleted][i % 3];
                let data = match kind {
                    EventKind::DepositCompleted => json!({"id": Uuid::now_v7(), "asset": "USD", "amount": "10"}),
                    _ => order("filled"),
                };
                // Every user gets every kind (fills for all three, so each reaches its email limit).
                let e = engine_event(users[(i / 3) % users.len()], kind, data);
                publish(bus, &e).await;
                published.push(e.id);
            }
            published
        }
    };
    let total = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM notifications").fetch_one(&stack.pool).await.expect("count")
    };

    ids.extend(publish_some(300).await);
    poll_until(Duration::from_secs(30), "some notifications", || async { (total().await >= 30).then_some(()) }).await;
    // The kill must come mid-stream whatever the machine's pace: with the table locked, the next
    // 300 events find the worker waiting on its insert, a batch in hand, when the kill comes.
    let mut lock = stack.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE notifications IN EXCLUSIVE MODE").execute(&mut *lock).await.expect("lock");
    ids.extend(publish_some(300).await);
    vault_testkit::wait_for_lock_wait(&stack.pool, "%INSERT INTO notifications%", Duration::from_secs(30)).await;
    worker.signal("KILL");
    worker.wait_exit(Duration::from_secs(10)).await;
    lock.rollback().await.expect("unlock");
    let at_kill = total().await;
    assert!(at_kill < 600, "the kill came mid-stream ({at_kill} of 600 written)");
    ids.extend(publish_some(60).await);
    let (mut worker, _) = stack.worker(true).await;
    // Messages in flight at the kill come back (the next worker rewinds to the first unacked).
    poll_until(Duration::from_secs(90), "all 660 notifications", || async { (total().await >= 660).then_some(()) })
        .await;
    assert_eq!(total().await, 660, "nothing doubled");
    let covered: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT event_id) FROM notifications WHERE event_id = ANY($1)")
            .bind(&ids)
            .fetch_one(&stack.pool)
            .await
            .expect("count");
    assert_eq!(covered, 660, "every event has its notification");
    // 220 fills, about 73 a user: each user's first 20 are mailed (the hourly limit), exactly
    // once, whatever was in flight at the kill.
    let emails: Vec<i64> = sqlx::query_scalar("SELECT count(*) FROM email_outbox GROUP BY user_id")
        .fetch_all(&stack.pool)
        .await
        .expect("count");
    assert_eq!(emails, [20, 20, 20], "each user's first 20 fills mailed, none twice");
    println!(
        "notify kill -9 while consuming: 660 events, {at_kill} notified before the kill, 660 notifications and 60 emails after (20 a user an hour), 0 lost, 0 doubled"
    );

    worker.stop_cleanly(Duration::from_secs(30)).await;
}

#[tokio::test]
async fn a_message_that_does_not_decode_is_parked_and_the_rest_go_on() {
    let stack = Stack::start().await;
    let (_worker, _) = stack.worker(true).await;
    let (user, _) = stack.user().await;
    stack.bus.jetstream().publish("events.order.filled.x", "{broken".into()).await.expect("send").await.expect("ack");
    publish(&stack.bus, &engine_event(user, EventKind::OrderFilled, order("filled"))).await;
    poll_until(Duration::from_secs(20), "the good message's notification", || async {
        (stack.count("SELECT count(*) FROM notifications WHERE user_id = $1", user).await == 1).then_some(())
    })
    .await;
    let parked: (String, String) =
        sqlx::query_as("SELECT stream, consumer FROM parked_messages").fetch_one(&stack.pool).await.expect("parked");
    assert_eq!(parked, ("EVENTS".to_owned(), "notify-events".to_owned()));
}

// ---------------------------------------------------------------------------------------------
// A minimal SMTP server: accepts everything except recipients containing "reject" (550) and
// senders containing "unauthorised" (530, authentication required), and keeps each message's
// DATA. A message to a recipient containing "hold" is kept at once but
// answered only when the returned `Notify` is notified; a recipient containing "slow" is
// answered after a second.

async fn fake_smtp() -> (u16, Arc<Mutex<Vec<String>>>, Arc<tokio::sync::Notify>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind smtp");
    let port = listener.local_addr().expect("addr").port();
    let messages = Arc::new(Mutex::new(Vec::new()));
    let gate = Arc::new(tokio::sync::Notify::new());
    let (kept, held) = (messages.clone(), gate.clone());
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (kept, held) = (kept.clone(), held.clone());
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut lines = BufReader::new(read).lines();
                write.write_all(b"220 fake ESMTP\r\n").await.ok()?;
                let mut data: Option<String> = None;
                let mut hold = false;
                while let Some(line) = lines.next_line().await.ok()? {
                    if let Some(body) = data.as_mut() {
                        if line == "." {
                            kept.lock().expect("lock").push(data.take().unwrap_or_default());
                            if std::mem::take(&mut hold) {
                                held.notified().await;
                            }
                            write.write_all(b"250 queued\r\n").await.ok()?;
                        } else {
                            body.push_str(&line);
                            body.push('\n');
                        }
                        continue;
                    }
                    let verb = line.get(..4).unwrap_or_default().to_ascii_uppercase();
                    let answer: &[u8] = match verb.as_str() {
                        "RCPT" if line.contains("reject") => b"550 no such user\r\n",
                        "MAIL" if line.contains("unauthorised") => b"530 5.7.0 authentication required\r\n",
                        "RCPT" if line.contains("busy") => b"451 try again later\r\n",
                        "RCPT" if line.contains("hold") => {
                            hold = true;
                            b"250 ok\r\n"
                        }
                        "RCPT" if line.contains("slow") => {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            b"250 ok\r\n"
                        }
                        "DATA" => {
                            data = Some(String::new());
                            b"354 go on\r\n"
                        }
                        "QUIT" => {
                            write.write_all(b"221 bye\r\n").await.ok()?;
                            return Some(());
                        }
                        _ => b"250 ok\r\n",
                    };
                    write.write_all(answer).await.ok()?;
                }
                Some(())
            });
        }
    });
    (port, messages, gate)
}

/// An email to `to` in the outbox of `user`, due `overdue_secs` ago (a claim takes the most
/// overdue first): its id.
async fn queue_email(pool: &PgPool, user: Uuid, to: &str, overdue_secs: i32) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO email_outbox (id, user_id, event_id, to_address, subject, body, next_attempt_at)
         VALUES ($1, $2, $3, $4, 'Your BTC-USD buy order filled', 'Filled at 50000.00.',
                 now() - make_interval(secs => $5))",
    )
    .bind(id)
    .bind(user)
    .bind(Uuid::now_v7())
    .bind(to)
    .bind(overdue_secs)
    .execute(pool)
    .await
    .expect("email row");
    id
}

/// The email sender on `pool`, polling every 10 ms, sending to the fake SMTP server at `port`
/// (`query`: the SMTP URL's query, e.g. `from=…`): its shutdown token and its task.
fn smtp_sender(
    pool: &PgPool,
    port: u16,
    query: &str,
) -> (CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
    use vault_workers::notify::email::{EmailConfig, run_emails};
    let shutdown = CancellationToken::new();
    let config = EmailConfig {
        poll_interval: Duration::from_millis(10),
        ..EmailConfig::new(Some(vault_core::config::Secret::new(format!("smtp://127.0.0.1:{port}?{query}"))))
    };
    (shutdown.clone(), tokio::spawn(run_emails(pool.clone(), config, Wakers::default().emails, shutdown)))
}

#[tokio::test]
async fn with_smtp_url_set_emails_go_out_over_smtp_a_permanent_refusal_fails_the_row_and_a_temporary_one_waits() {
    let stack = Stack::start().await;
    let (port, messages, _) = fake_smtp().await;
    let (user, _) = stack.user().await;
    let mut ids = Vec::new();
    for to in ["alice@example.com", "reject@example.com", "busy@example.com"] {
        ids.push(queue_email(&stack.pool, user, to, 0).await);
    }
    let (shutdown, loop_) = smtp_sender(&stack.pool, port, "from=Vault%20%3Cops%40example.com%3E");
    let pool = &stack.pool;
    let status = |id: Uuid| async move {
        sqlx::query_as::<_, (String, i32, Option<String>)>(
            "SELECT status, attempts, last_error FROM email_outbox WHERE id = $1",
        )
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("row")
    };
    poll_until(Duration::from_secs(20), "every email to be attempted", || async {
        (status(ids[0]).await.0 != "pending" && status(ids[1]).await.0 != "pending" && status(ids[2]).await.1 == 1)
            .then_some(())
    })
    .await;
    let (state, _, error) = status(ids[2]).await;
    assert_eq!(state, "pending", "a 4xx is retried");
    assert!(error.is_some_and(|e| e.contains("451")), "the reason is kept");
    let later: bool =
        sqlx::query_scalar("SELECT next_attempt_at > now() + interval '30 seconds' FROM email_outbox WHERE id = $1")
            .bind(ids[2])
            .fetch_one(pool)
            .await
            .expect("row");
    assert!(later, "the retry waits for its backoff (about a minute)");
    assert_eq!(status(ids[0]).await, ("sent".to_owned(), 1, None));
    let (state, attempts, error) = status(ids[1]).await;
    assert_eq!((state.as_str(), attempts), ("failed", 1), "a 5xx is not retried");
    assert!(error.is_some_and(|e| e.contains("550")), "the reason is kept");
    let sent = messages.lock().expect("lock").clone();
    assert_eq!(sent.len(), 1);
    for expected in ["To: alice@example.com", "From: Vault <ops@example.com>", "Subject: Your BTC-USD buy order filled"]
    {
        assert!(sent[0].contains(expected), "{expected} in:\n{}", sent[0]);
    }
    shutdown.cancel();
    loop_.await.expect("joins").expect("the loop stops cleanly");
}

/// A relay that refuses the sender itself — authentication required (530): the deployment's SMTP
/// set-up, not the email — leaves the email to be retried with the backoff, as a 4xx does; a
/// permanent failure would drop every email of the misconfiguration after one attempt.
#[tokio::test]
async fn an_email_the_relay_refuses_for_want_of_authentication_waits_to_be_retried() {
    let stack = Stack::start().await;
    let (port, messages, _) = fake_smtp().await;
    let (user, _) = stack.user().await;
    let id = queue_email(&stack.pool, user, "alice@example.com", 0).await;
    let (shutdown, loop_) = smtp_sender(&stack.pool, port, "from=unauthorised%40example.com");
    let (state, error, later) = poll_until(Duration::from_secs(20), "the email to be attempted", || async {
        let row: (String, i32, Option<String>, bool) = sqlx::query_as(
            "SELECT status, attempts, last_error, next_attempt_at > now() + interval '30 seconds'
               FROM email_outbox WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&stack.pool)
        .await
        .expect("row");
        (row.1 == 1).then_some((row.0, row.2, row.3))
    })
    .await;
    assert_eq!(state, "pending", "retried, not failed");
    assert!(error.as_deref().is_some_and(|e| e.contains("530")), "the reason is kept: {error:?}");
    assert!(later, "the retry waits for its backoff");
    assert!(messages.lock().expect("lock").is_empty(), "nothing was sent");
    shutdown.cancel();
    loop_.await.expect("joins").expect("the loop stops cleanly");
}

/// With a slow relay, an email that went out is recorded before the next send starts: a crash
/// during that send (here: a send the relay holds unanswered) cannot send the first again.
#[tokio::test]
async fn with_a_slow_relay_each_email_is_recorded_before_the_next_send() {
    let stack = Stack::start().await;
    let (port, messages, gate) = fake_smtp().await;
    let (user, _) = stack.user().await;
    // Claimed in this order: the first takes a second, the second is held.
    let ids = [
        queue_email(&stack.pool, user, "slow@example.com", 2).await,
        queue_email(&stack.pool, user, "hold@example.com", 1).await,
    ];
    let (shutdown, sender) = smtp_sender(&stack.pool, port, "");
    poll_until(Duration::from_secs(20), "the second email held by the relay", || async {
        (messages.lock().expect("lock").len() == 2).then_some(())
    })
    .await;
    let first: String = sqlx::query_scalar("SELECT status FROM email_outbox WHERE id = $1")
        .bind(ids[0])
        .fetch_one(&stack.pool)
        .await
        .expect("row");
    assert_eq!(first, "sent", "recorded before the held send began");
    gate.notify_one();
    shutdown.cancel();
    sender.await.expect("joins").expect("the loop stops cleanly");
}

/// An email whose row another sender recorded while this one's send was under way (its lease
/// ran out): the late record changes nothing and is not counted as sent a second time.
#[tokio::test]
async fn an_email_recorded_elsewhere_while_its_send_was_under_way_is_not_counted_again() {
    let stack = Stack::start().await;
    let (port, messages, gate) = fake_smtp().await;
    let mut envs = base_env(&stack.db, &stack.nats);
    envs.push(("SMTP_URL", format!("smtp://127.0.0.1:{port}")));
    let (mut worker, ops) = Proc::start_ready(BIN, &["notify"], &envs).await;
    let (user, _) = stack.user().await;
    let id = queue_email(&stack.pool, user, "hold@example.com", 0).await;
    poll_until(Duration::from_secs(20), "the email to be held by the relay", || async {
        (!messages.lock().expect("lock").is_empty()).then_some(())
    })
    .await;
    sqlx::query("UPDATE email_outbox SET status = 'sent', attempts = 1, sent_at = now() WHERE id = $1")
        .bind(id)
        .execute(&stack.pool)
        .await
        .expect("recorded elsewhere");
    gate.notify_one();
    let sent = r#"vault_emails_total{outcome="sent"}"#;
    let noticed = "email attempts not recorded";
    poll_until(Duration::from_secs(20), "the worker to record (or skip) its attempt", || async {
        (metric(&ops, sent).await > 0.0 || worker.output().contains(noticed)).then_some(())
    })
    .await;
    assert_eq!(metric(&ops, sent).await, 0.0, "the send was counted though its record changed nothing");
    worker.stop_cleanly(Duration::from_secs(30)).await;
}

/// An email sender running against the fake SMTP server, with one email whose DATA the server
/// has kept and not answered (until the returned gate is notified): the stack, the email's id,
/// the gate, the sender's shutdown token and its task.
async fn an_email_held_by_smtp()
-> (Stack, Uuid, Arc<tokio::sync::Notify>, CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let stack = Stack::start().await;
    let (port, messages, gate) = fake_smtp().await;
    let (user, _) = stack.user().await;
    let id = queue_email(&stack.pool, user, "hold@example.com", 0).await;
    let (shutdown, sender) = smtp_sender(&stack.pool, port, "");
    poll_until(Duration::from_secs(20), "the email to be on its way", || async {
        (!messages.lock().expect("lock").is_empty()).then_some(())
    })
    .await;
    (stack, id, gate, shutdown, sender)
}

/// Asked to stop while recording an attempt is blocked (a lock on its row), the email sender
/// stops within its grace instead of waiting for the lock, and the row is not lost: left to
/// its lease, or recorded by the statement that was still waiting when the lock went.
#[tokio::test]
async fn the_email_sender_asked_to_stop_while_its_record_is_blocked_stops_within_its_grace_and_loses_nothing() {
    let (stack, id, gate, shutdown, sender) = an_email_held_by_smtp().await;
    // Claimed and sent, not yet recorded: lock the row, then let the server answer.
    let mut blocker = stack.pool.begin().await.expect("tx");
    sqlx::query("SELECT 1 FROM email_outbox WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut *blocker)
        .await
        .expect("lock");
    gate.notify_one();
    vault_testkit::wait_for_lock_wait(&stack.pool, "%UPDATE email_outbox%", Duration::from_secs(20)).await;

    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(20), sender).await;
    let result = stopped.expect("the sender stops while the lock is held").expect("joins");
    result.expect("the loop stops cleanly");
    blocker.rollback().await.expect("unlock");
    let (status, attempts, leased): (String, i32, bool) =
        sqlx::query_as("SELECT status, attempts, next_attempt_at > now() FROM email_outbox WHERE id = $1")
            .bind(id)
            .fetch_one(&stack.pool)
            .await
            .expect("row");
    // Giving the record up drops the client's side only: the statement may still be waiting on
    // the lock at the server and land once the lock goes. Either way nothing is lost.
    assert!(
        [("pending", 0, true), ("sent", 1, true)].contains(&(status.as_str(), attempts, leased)),
        "left to its lease (due again after it), or recorded once the lock went: {status} {attempts} {leased}"
    );
}

/// Asked to stop while an SMTP server holds its send unanswered, the email sender stops within
/// its grace, not after the SMTP timeout (30 s), and gives the row back to be sent again.
#[tokio::test]
async fn the_email_sender_asked_to_stop_while_a_send_goes_unanswered_stops_within_its_grace_and_gives_it_back() {
    // The server has the message and will not answer it.
    let (stack, id, _gate, shutdown, sender) = an_email_held_by_smtp().await;

    shutdown.cancel();
    // GRACE (5 s) for the send, then the release; the SMTP timeout is 30 s.
    let stopped = tokio::time::timeout(Duration::from_secs(15), sender).await;
    stopped.expect("the sender stops within its grace").expect("joins").expect("the loop stops cleanly");
    let (status, attempts, due): (String, i32, bool) =
        sqlx::query_as("SELECT status, attempts, next_attempt_at <= now() FROM email_outbox WHERE id = $1")
            .bind(id)
            .fetch_one(&stack.pool)
            .await
            .expect("row");
    assert_eq!((status.as_str(), attempts, due), ("pending", 0, true), "given back, due at once");
}

/// A kill -9 while webhook requests are in flight: every delivery row exists once per event and
/// webhook, none is lost (rows claimed by the dead worker come back when their lease runs out —
/// moved to now here, as the clock would after 60 s), and a receiver sees a payload twice only
/// if its first request was under way at the kill (at least once, as the contract says).
#[tokio::test]
async fn webhook_requests_in_flight_at_a_kill_9_are_neither_lost_nor_sent_twice_except_the_interrupted_ones() {
    const EVENTS: usize = 300;
    let stack = Stack::start().await;
    let (base, receiver) = Receiver::start().await;
    let mut users = Vec::new();
    for _ in 0..3 {
        let (user, _) = stack.user().await;
        stack.webhook(user, &format!("{base}/sluggish"), &["order.filled"]).await;
        users.push(user);
    }
    let (mut worker, _) = stack.worker(true).await;
    let mut ids = Vec::new();
    for i in 0..EVENTS {
        let e = engine_event(users[i % users.len()], EventKind::OrderFilled, order("filled"));
        publish(&stack.bus, &e).await;
        ids.push(e.id);
    }
    let deliveries = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM webhook_deliveries").fetch_one(&stack.pool).await.ok()
    };
    // The events are consumed (their rows committed) before the kill: this kill hits webhook
    // requests, not the consumer (the test above covers that).
    poll_until(Duration::from_secs(30), "every delivery row", || async {
        (deliveries().await? == EVENTS as i64).then_some(())
    })
    .await;
    poll_until(Duration::from_secs(30), "deliveries under way", || async {
        (receiver.hits("sluggish").len() >= EVENTS / 5).then_some(())
    })
    .await;
    worker.signal("KILL");
    worker.wait_exit(Duration::from_secs(10)).await;
    let hits_at_kill = receiver.hits("sluggish").len();
    // A claim the worker sent just before it died still runs, and commits, in its Postgres
    // backend: its rows are leased only then. Read the leases once the dead worker's backends
    // are gone (read before, such rows were neither counted as leased nor free for 60 s, and the
    // wait below timed out on a busy machine).
    poll_until(Duration::from_secs(30), "the dead worker's Postgres backends to end", || async {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'vault-worker-notify'",
        )
        .fetch_one(&stack.pool)
        .await
        .ok()?;
        (left == 0).then_some(())
    })
    .await;
    // Claimed and not recorded: their lease (60 s) is still running. These are the requests under
    // way at the kill (the receiver's clock cannot say which: it may read a request the dead
    // worker wrote before it died only after the kill, when its runtime gets to it).
    let leased_ids: HashSet<String> = sqlx::query_scalar(
        "SELECT payload->>'id' FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at > now() + interval '10 seconds'",
    )
    .fetch_all(&stack.pool)
    .await
    .expect("leased rows")
    .into_iter()
    .collect();
    let leased = leased_ids.len() as i64;
    assert!(hits_at_kill < EVENTS && leased > 0, "the kill came mid-stream ({hits_at_kill} requests, {leased} leased)");

    let (mut worker, _) = stack.worker(true).await;
    // Everything not leased is delivered by the new worker; the leased rows wait for their lease.
    poll_until(Duration::from_secs(30), "every delivery not leased by the dead worker", || async {
        let delivered: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE status = 'delivered'")
            .fetch_one(&stack.pool)
            .await
            .ok()?;
        (delivered == EVENTS as i64 - leased).then_some(())
    })
    .await;
    // The leases run out.
    sqlx::query("UPDATE webhook_deliveries SET next_attempt_at = now() WHERE status = 'pending'")
        .execute(&stack.pool)
        .await
        .expect("time passes");
    poll_until(Duration::from_secs(30), "every delivery delivered", || async {
        let delivered: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE status = 'delivered'")
            .fetch_one(&stack.pool)
            .await
            .ok()?;
        (delivered == EVENTS as i64).then_some(())
    })
    .await;

    assert_eq!(deliveries().await, Some(EVENTS as i64), "one row per event and webhook");
    let covered: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT event_id) FROM webhook_deliveries WHERE event_id = ANY($1)")
            .bind(&ids)
            .fetch_one(&stack.pool)
            .await
            .expect("count");
    assert_eq!(covered, EVENTS as i64, "every event has its delivery");
    let mut seen: HashMap<String, Vec<Instant>> = HashMap::new();
    for hit in receiver.hits("sluggish") {
        let body: Value = serde_json::from_slice(&hit.body).expect("json body");
        seen.entry(body["id"].as_str().expect("an id").to_owned()).or_default().push(hit.at);
    }
    assert_eq!(seen.len(), EVENTS, "every payload reached the receiver");
    let doubled: Vec<(&String, &Vec<Instant>)> = seen.iter().filter(|(_, at)| at.len() > 1).collect();
    assert!(
        doubled.iter().all(|(id, at)| at.len() == 2 && leased_ids.contains(id.as_str())),
        "only requests under way at the kill (leased by the dead worker) were sent again, once: {doubled:?}"
    );
    println!(
        "notify kill -9 during webhook delivery: {EVENTS} events, {} requests before the kill, {leased} leased by the \
         dead worker, {} payloads sent twice (their first request was under way at the kill), 0 lost, 0 rows doubled",
        hits_at_kill,
        doubled.len(),
    );
    worker.stop_cleanly(Duration::from_secs(30)).await;
}

/// Two senders on one outbox with a relay slower than the lease allows for the whole claimed
/// batch: a sender works through its claim only while a send can end within the lease, so the
/// other, claiming what it gave back, never sends an email twice.
#[tokio::test]
async fn two_email_senders_with_a_slow_relay_send_every_email_once() {
    use vault_workers::notify::email::{EmailConfig, run_emails};
    let stack = Stack::start().await;
    let (port, messages, _) = fake_smtp().await;
    let (user, _) = stack.user().await;
    for n in 0..10 {
        queue_email(&stack.pool, user, &format!("slow{n}@example.com"), 0).await;
    }
    // Each send takes a second; a claim of ten would need ten seconds of an eight-second lease.
    let config = EmailConfig {
        poll_interval: Duration::from_millis(10),
        lease: Duration::from_secs(8),
        smtp_timeout: Duration::from_secs(2),
        ..EmailConfig::new(Some(vault_core::config::Secret::new(format!("smtp://127.0.0.1:{port}"))))
    };
    let shutdown = CancellationToken::new();
    let senders: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(run_emails(stack.pool.clone(), config.clone(), Wakers::default().emails, shutdown.clone()))
        })
        .collect();
    poll_until(Duration::from_secs(60), "every email sent", || async {
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM email_outbox WHERE status <> 'sent'")
            .fetch_one(&stack.pool)
            .await
            .expect("count");
        (pending == 0).then_some(())
    })
    .await;
    shutdown.cancel();
    for sender in senders {
        sender.await.expect("joins").expect("stops cleanly");
    }
    let mut to: Vec<String> = messages
        .lock()
        .expect("lock")
        .iter()
        .filter_map(|m| m.lines().find(|l| l.starts_with("To: ")).map(str::to_owned))
        .collect();
    to.sort();
    let sent = to.len();
    to.dedup();
    assert_eq!((sent, to.len()), (10, 10), "each of the ten emails once: {to:?}");
}
