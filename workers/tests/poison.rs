//! Poisoned messages on every stream the workers consume, against the real `vault-worker`
//! binary, real NATS and Postgres: the audit worker on ORDERS, EVENTS and AUTH, the notify
//! worker on EVENTS and AUTH. Two kinds of poison each: bytes that do not decode, and a message
//! that decodes but that Postgres cannot store (a NUL character: text and JSON text refuse it).
//! Each is parked in `parked_messages` with its reason and counted in
//! `vault_parked_messages_total{stream,consumer}`, and the good message published after it is
//! processed: a poisoned message never stops its consumer.

use std::time::Duration;

use chrono::Utc;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;
use vault_bus::message::{AuthEvent, AuthEventKind, CommandBody, EngineEvent, EventKind, OrderCommand};
use vault_bus::{Bus, BusMessage, MessageContext, subjects};
use vault_core::domain::{Asset, Positive};
use vault_testkit::{NatsServer, Proc, TestDb, base_env, http_client, poll_until};

const BIN: &str = env!("CARGO_BIN_EXE_vault-worker");
/// The notifier retries a message it cannot write and parks it on its 10th delivery, a second
/// apart; the audit worker parks content Postgres refuses at once.
const WAIT: Duration = Duration::from_secs(60);
/// Bytes that are not a message.
const GARBAGE: &[u8] = b"\x00\xff{not json";
/// A NUL character, which Postgres text and JSON text cannot hold.
const NUL: &str = "nul\u{0}here";

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

    /// Starts `vault-worker <role>`; returns it with its ops address.
    async fn worker(&self, role: &str) -> (Proc, String) {
        let envs = base_env(&self.db, &self.nats);
        let (worker, addr) = Proc::start_ready(BIN, &[role], &envs).await;
        (worker, addr)
    }

    async fn user(&self) -> Uuid {
        let id = Uuid::now_v7();
        sqlx::query("INSERT INTO users (id, email, password_hash) VALUES ($1, $2, '$argon2id$test')")
            .bind(id)
            .bind(format!("u{}@example.com", id.simple()))
            .execute(&self.pool)
            .await
            .expect("user");
        id
    }

    async fn garbage(&self, subject: String) {
        self.bus.jetstream().publish(subject, GARBAGE.into()).await.expect("send").await.expect("ack");
    }

    async fn publish<M: BusMessage>(&self, message: &M) {
        self.bus.publish(message, &MessageContext::default()).await.expect("published");
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.pool).await.expect("count")
    }

    /// The parked messages of one consumer: their reasons, oldest first.
    async fn parked(&self, stream: &str, consumer: &str) -> Vec<String> {
        sqlx::query_scalar("SELECT reason FROM parked_messages WHERE stream = $1 AND consumer = $2 ORDER BY stream_seq")
            .bind(stream)
            .bind(consumer)
            .fetch_all(&self.pool)
            .await
            .expect("parked")
    }
}

/// `vault_parked_messages_total{stream,consumer}` as the worker exports it (0 before any).
async fn parked_metric(ops: &str, stream: &str, consumer: &str) -> f64 {
    let text = http_client().get(format!("http://{ops}/metrics")).send().await.expect("metrics").text().await;
    text.expect("text")
        .lines()
        .filter(|l| l.starts_with("vault_parked_messages_total{"))
        .find(|l| l.contains(&format!("stream=\"{stream}\"")) && l.contains(&format!("consumer=\"{consumer}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn deposit(user: Uuid, client_deposit_id: &str) -> OrderCommand {
    OrderCommand {
        user_id: user,
        request_id: Some(format!("req-{}", Uuid::now_v7())),
        at: Utc::now(),
        body: CommandBody::Deposit {
            deposit_id: Uuid::now_v7(),
            client_deposit_id: client_deposit_id.to_owned(),
            asset: Asset::usd(),
            amount: Positive::new(10.into()).expect("positive"),
        },
    }
}

fn order(status: &str, client_order_id: &str) -> Value {
    json!({
        "id": Uuid::now_v7(), "client_order_id": client_order_id, "symbol": "BTC-USD", "side": "buy",
        "type": "market", "time_in_force": "ioc", "quantity": "0.015", "limit_price": null, "status": status,
        "filled_quantity": "0.015", "average_fill_price": "50000.00", "fee": "0.75", "reject_reason": null,
        "created_at": "2026-11-22T12:00:00.000001Z", "updated_at": "2026-11-22T12:00:00.000002Z", "fills": []
    })
}

fn engine_event(user: Uuid, kind: EventKind, data: Value) -> EngineEvent {
    EngineEvent { id: Uuid::now_v7(), kind, user_id: user, request_id: None, at: Utc::now(), data }
}

fn auth_event(user: Uuid, kind: AuthEventKind, ip: &str, request_id: Option<&str>) -> AuthEvent {
    AuthEvent {
        id: Uuid::now_v7(),
        kind,
        user_id: Some(user),
        request_id: request_id.map(str::to_owned),
        ip: Some(ip.to_owned()),
        at: Utc::now(),
        data: json!({"minutes": 15}),
    }
}

#[tokio::test]
async fn the_audit_worker_parks_a_poisoned_message_on_each_stream_and_records_the_next_good_one() {
    let s = Stack::start().await;
    let (_worker, ops) = s.worker("audit").await;
    let user = s.user().await;

    // ORDERS: garbage, a command with a NUL in a field, then a good command.
    s.garbage(subjects::order_command(user)).await;
    s.publish(&deposit(user, NUL)).await;
    s.publish(&deposit(user, "good-deposit")).await;
    // EVENTS.
    s.garbage(subjects::event("order.filled", user)).await;
    s.publish(&engine_event(user, EventKind::OrderFilled, order("filled", NUL))).await;
    s.publish(&engine_event(user, EventKind::OrderFilled, order("filled", "good-order"))).await;
    // AUTH.
    s.garbage(subjects::auth("signup")).await;
    s.publish(&auth_event(user, AuthEventKind::LoginFailed, "127.0.0.1", Some(NUL))).await;
    s.publish(&auth_event(user, AuthEventKind::LoginFailed, "127.0.0.1", Some("good-request"))).await;

    poll_until(WAIT, "the three good messages in the audit log", || async {
        (s.count("SELECT count(*) FROM audit_log").await == 3).then_some(())
    })
    .await;
    for (stream, consumer) in [("ORDERS", "audit-orders"), ("EVENTS", "audit-events"), ("AUTH", "audit-auth")] {
        let reasons = poll_until(WAIT, &format!("two messages parked by {consumer}"), || async {
            let reasons = s.parked(stream, consumer).await;
            (reasons.len() == 2).then_some(reasons)
        })
        .await;
        assert!(reasons[0].starts_with("not JSON"), "{consumer}: {reasons:?}");
        assert!(reasons[1].contains("cannot store"), "{consumer}: {reasons:?}");
        assert_eq!(parked_metric(&ops, stream, consumer).await, 2.0, "{consumer} counted its parked messages");
    }
    let good: Vec<String> =
        sqlx::query_scalar("SELECT stream FROM audit_log ORDER BY id").fetch_all(&s.pool).await.expect("rows");
    assert_eq!(good.len(), 3, "{good:?}");
    // The chain over what was written is intact.
    let verify = std::process::Command::new(BIN)
        .args(["audit", "verify"])
        .env_clear()
        .env("DATABASE_URL", &s.db.url)
        .output()
        .expect("verify runs");
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));

    // And it goes on: a later message is recorded too.
    s.publish(&deposit(user, "later-deposit")).await;
    poll_until(WAIT, "the later message in the audit log", || async {
        (s.count("SELECT count(*) FROM audit_log").await == 4).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_notify_worker_parks_a_poisoned_message_on_each_stream_and_handles_the_next_good_one() {
    let s = Stack::start().await;
    let (_worker, ops) = s.worker("notify").await;
    let user = s.user().await;
    let notifications = |kind: &'static str| {
        let s = &s;
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM notifications WHERE user_id = $1 AND kind = $2")
                .bind(user)
                .bind(kind)
                .fetch_one(&s.pool)
                .await
                .expect("count")
        }
    };

    // EVENTS: garbage, a fill whose order cannot be stored, then a good fill.
    s.garbage(subjects::event("order.filled", user)).await;
    s.publish(&engine_event(user, EventKind::OrderFilled, order("filled", NUL))).await;
    s.publish(&engine_event(user, EventKind::OrderFilled, order("filled", "good-order"))).await;
    // AUTH: garbage, an event of a schema version the worker does not know, then a good lock.
    // (Nothing of a decoded auth event reaches Postgres unchecked: the address is parsed, the
    // data picked field by field. A NUL address is an unknown address, not a poison.)
    s.garbage(subjects::auth("locked")).await;
    let mut future = serde_json::to_value(auth_event(user, AuthEventKind::Locked, "127.0.0.1", None)).expect("json");
    future["v"] = 2.into();
    s.bus
        .jetstream()
        .publish(subjects::auth("locked"), future.to_string().into())
        .await
        .expect("send")
        .await
        .expect("ack");
    s.publish(&auth_event(user, AuthEventKind::LoginSucceeded, NUL, None)).await;
    s.publish(&auth_event(user, AuthEventKind::Locked, "127.0.0.1", None)).await;

    // The good ones are handled at once, whatever happens to the poisoned ones meanwhile.
    poll_until(Duration::from_secs(20), "the good fill's and lock's notifications", || async {
        (notifications("order.filled").await == 1 && notifications("auth.locked").await == 1).then_some(())
    })
    .await;
    for (stream, consumer, second) in
        [("EVENTS", "notify-events", "not written after 10 deliveries"), ("AUTH", "notify-auth", "schema version 2")]
    {
        let reasons = poll_until(WAIT, &format!("two messages parked by {consumer}"), || async {
            let reasons = s.parked(stream, consumer).await;
            (reasons.len() == 2).then_some(reasons)
        })
        .await;
        assert!(reasons[0].contains("cannot be decoded"), "{consumer}: {reasons:?}");
        assert!(reasons[1].contains(second), "{consumer}: {reasons:?}");
        assert_eq!(parked_metric(&ops, stream, consumer).await, 2.0, "{consumer} counted its parked messages");
    }
    assert_eq!(notifications("order.filled").await, 1, "the poisoned fill left nothing behind");

    // And it goes on.
    s.publish(&engine_event(user, EventKind::OrderFilled, order("filled", "later-order"))).await;
    poll_until(Duration::from_secs(20), "a later fill's notification", || async {
        (notifications("order.filled").await == 2).then_some(())
    })
    .await;
}
