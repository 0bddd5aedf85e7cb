//! Poisoned messages on the engine's two streams, against the real `vault-engine` binary, real
//! NATS and Postgres.
//!
//! - ORDERS (durable consumers, one per partition): bytes that do not decode, a command of an
//!   unknown schema version, and a command that decodes but that Postgres refuses (a NUL in its
//!   client id, which is part of the command's key) are each parked with their reason and
//!   counted in `vault_parked_messages_total{stream="ORDERS",consumer="engine-pNN"}`; the same
//!   user's next command is applied meanwhile.
//! - PRICES (an ordered consumer, which acks nothing and so parks nothing, by design): a tick
//!   that does not decode is skipped and counted in `vault_engine_bad_ticks_total`, and the
//!   next good tick still moves the market and fills the resting order it crosses.

mod common;
use std::time::Duration;

use chrono::Utc;
use common::{Desk, start_engine};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use uuid::Uuid;
use vault_bus::message::{CommandBody, OrderCommand, PriceTick, encode};
use vault_bus::{BusMessage, MessageContext, subjects};
use vault_core::domain::{Asset, Positive, Side, Symbol, TimeInForce};
use vault_testkit::{NatsServer, Proc, TestDb, poll_until, scrape_metric};

/// A command Postgres refuses is given back and parked on its 10th delivery, a second apart.
const WAIT: Duration = Duration::from_secs(60);

struct Stack {
    _nats: NatsServer,
    _db: TestDb,
    desk: Desk,
    _engine: Proc,
    ops: String,
}

impl std::ops::Deref for Stack {
    type Target = Desk;
    fn deref(&self) -> &Desk {
        &self.desk
    }
}

impl Stack {
    async fn start() -> Stack {
        let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
        let (engine, ops) = start_engine(&db, &nats, &[]).await;
        let desk = Desk::connect(db.pool().await, &nats).await;
        Stack { _nats: nats, _db: db, desk, _engine: engine, ops }
    }

    async fn raw(&self, subject: String, payload: Vec<u8>) {
        self.bus.jetstream().publish(subject, payload.into()).await.expect("send").await.expect("ack");
    }

    async fn metric(&self, prefix: &str, labels: &[&str]) -> f64 {
        scrape_metric(&self.ops, prefix, labels).await
    }
}

#[tokio::test]
async fn poisoned_commands_are_parked_and_counted_and_the_users_next_command_applies() {
    let s = Stack::start().await;
    let user = s.user().await;
    let consumer = format!("engine-p{:02}", subjects::partition_of(user));
    let subject = subjects::order_command(user);

    // Bytes that are not a command.
    s.raw(subject.clone(), b"\xff{not a command".to_vec()).await;
    // A command of a schema version this engine does not know.
    let future = OrderCommand {
        user_id: user,
        request_id: None,
        at: Utc::now(),
        body: CommandBody::Cancel { order_id: Uuid::now_v7() },
    };
    let mut json: serde_json::Value = serde_json::from_slice(&encode(&future).expect("encodes")).expect("json");
    json["v"] = 2.into();
    s.raw(future.subject(), json.to_string().into_bytes()).await;
    // A command that decodes, but whose key (user:deposit:client id) Postgres cannot store.
    s.send(
        user,
        CommandBody::Deposit {
            deposit_id: Uuid::now_v7(),
            client_deposit_id: "nul\u{0}id".to_owned(),
            asset: Asset::usd(),
            amount: Positive::new(dec!(5)).expect("positive"),
        },
    )
    .await;

    // The user's next command does not wait for the poison to be dealt with.
    let deposit = s.deposit(user, "USD", dec!(100)).await;
    s.wait_status("deposits", deposit, "completed", Duration::from_secs(20)).await;

    let reasons: Vec<String> = poll_until(WAIT, "three commands parked", || async {
        let reasons: Vec<String> = sqlx::query_scalar(
            "SELECT reason FROM parked_messages WHERE stream = 'ORDERS' AND consumer = $1 ORDER BY stream_seq",
        )
        .bind(&consumer)
        .fetch_all(&s.pool)
        .await
        .ok()?;
        (reasons.len() == 3).then_some(reasons)
    })
    .await;
    assert!(reasons[0].contains("cannot be decoded"), "{reasons:?}");
    assert!(reasons[1].contains("schema version 2"), "{reasons:?}");
    assert!(reasons[2].contains("failed on delivery 10"), "{reasons:?}");
    let counted =
        s.metric("vault_parked_messages_total{", &["stream=\"ORDERS\"", &format!("consumer=\"{consumer}\"")]).await;
    assert_eq!(counted, 3.0, "every parked command is counted");

    // And after all of it, the user's commands still apply.
    let later = s.deposit(user, "USD", dec!(1)).await;
    s.wait_status("deposits", later, "completed", Duration::from_secs(20)).await;
    let total: Decimal = sqlx::query_scalar("SELECT total FROM balances WHERE user_id = $1 AND asset = 'USD'")
        .bind(user)
        .fetch_one(&s.pool)
        .await
        .expect("balance");
    assert_eq!(total, dec!(101), "only the good deposits moved money");
}

/// A well-formed command for a user without an account (a stray publisher, a database restored
/// from an older backup) fails its foreign key every time. It is given back and parked like any
/// command Postgres refuses, and the partition's other users go on. (Before, only data
/// exceptions counted as the command's own failure: this one was retried in place for ever, and
/// each ack wait added a copy behind it.)
#[tokio::test]
async fn a_command_for_a_user_without_an_account_is_parked_and_holds_no_one_up() {
    let s = Stack::start().await;
    let user = s.user().await;
    let partition = subjects::partition_of(user);
    let consumer = format!("engine-p{partition:02}");
    let stranger = std::iter::repeat_with(Uuid::now_v7)
        .find(|u| subjects::partition_of(*u) == partition)
        .expect("a user id on the same partition");
    s.send(
        stranger,
        CommandBody::Deposit {
            deposit_id: Uuid::now_v7(),
            client_deposit_id: "from-nowhere".to_owned(),
            asset: Asset::usd(),
            amount: Positive::new(dec!(5)).expect("positive"),
        },
    )
    .await;

    let deposit = s.deposit(user, "USD", dec!(100)).await;
    s.wait_status("deposits", deposit, "completed", Duration::from_secs(20)).await;
    let (subject, reason): (String, String) = poll_until(WAIT, "the stranger's command parked", || async {
        sqlx::query_as("SELECT subject, reason FROM parked_messages WHERE stream = 'ORDERS' AND consumer = $1")
            .bind(&consumer)
            .fetch_optional(&s.pool)
            .await
            .ok()
            .flatten()
    })
    .await;
    assert_eq!(subject, subjects::order_command(stranger));
    assert!(reason.contains("failed on delivery 10") && reason.contains("foreign key"), "{reason}");
    let later = s.deposit(user, "USD", dec!(1)).await;
    s.wait_status("deposits", later, "completed", Duration::from_secs(20)).await;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM applied_commands WHERE user_id = $1")
        .bind(stranger)
        .fetch_one(&s.pool)
        .await
        .expect("count");
    assert_eq!(stored, 0, "nothing of the stranger's command was stored");
}

#[tokio::test]
async fn a_poisoned_price_tick_is_skipped_and_counted_and_the_next_tick_still_fills() {
    let s = Stack::start().await;
    let user = s.user().await;
    let deposit = s.deposit(user, "USD", dec!(1000)).await;
    s.wait_status("deposits", deposit, "completed", Duration::from_secs(20)).await;
    let order = s.place(user, Side::Buy, TimeInForce::Gtc, dec!(0.01), Some(dec!(40000))).await.0;
    s.wait_status("orders", order, "open", Duration::from_secs(20)).await;

    let subject = subjects::price("BTC-USD");
    let good = |price: Decimal, seq: u64| PriceTick {
        symbol: Symbol::parse("BTC-USD").expect("symbol"),
        price: Positive::new(price).expect("positive"),
        ts: Utc::now(),
        source: "test".into(),
        seq,
    };
    // Not a tick; a tick of another schema version; a tick with a negative price.
    s.raw(subject.clone(), b"\x00garbage".to_vec()).await;
    let mut future: serde_json::Value =
        serde_json::from_slice(&encode(&good(dec!(39000), 1)).expect("encodes")).expect("json");
    future["v"] = 2.into();
    s.raw(subject.clone(), future.to_string().into_bytes()).await;
    let mut negative = future.clone();
    negative["v"] = 1.into();
    negative["price"] = "-39000".into();
    s.raw(subject.clone(), negative.to_string().into_bytes()).await;
    poll_until(Duration::from_secs(20), "three bad ticks counted", || async {
        (s.metric("vault_engine_bad_ticks_total", &[]).await == 3.0).then_some(())
    })
    .await;
    let status: String = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
        .bind(order)
        .fetch_one(&s.pool)
        .await
        .expect("status");
    assert_eq!(status, "open", "no bad tick moved the market");

    // The feed goes on: the next good tick crosses the resting order and fills it.
    s.bus.publish(&good(dec!(39000), 2), &MessageContext::default()).await.expect("tick");
    s.wait_status("orders", order, "filled", Duration::from_secs(20)).await;
}
