//! The engine binary end to end: commands on ORDERS (as the API publishes them, with the API's
//! intake rows), price ticks on PRICES, and what lands in Postgres and on EVENTS.

mod common;

use std::time::Duration;

use chrono::Utc;
use common::{Desk, start_engine};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde_json::Value;
use uuid::Uuid;
use vault_bus::BusMessage;
use vault_bus::message::{CommandBody, OrderCommand};
use vault_core::domain::{Asset, OrderType, Positive, Side, Symbol, TimeInForce};
use vault_testkit::{NatsServer, Proc, TestDb, poll_until, scrape_metric};

const WAIT: Duration = Duration::from_secs(15);

struct Stack {
    nats: NatsServer,
    db: TestDb,
    desk: Desk,
    engine: Proc,
    ops: String,
    /// Undecodable markers this engine's price feed was sent ([`Stack::feed_caught_up`]).
    markers: u32,
}

impl std::ops::Deref for Stack {
    type Target = Desk;
    fn deref(&self) -> &Desk {
        &self.desk
    }
}

impl std::ops::DerefMut for Stack {
    fn deref_mut(&mut self) -> &mut Desk {
        &mut self.desk
    }
}

impl Stack {
    async fn start() -> Stack {
        let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
        let (engine, ops) = start_engine(&db, &nats, &[]).await;
        let desk = Desk::connect(db.pool().await, &nats).await;
        Stack { nats, db, desk, engine, ops, markers: 0 }
    }

    async fn restart_engine(&mut self) {
        self.engine.stop_cleanly(Duration::from_secs(30)).await;
        let (engine, ops) = start_engine(&self.db, &self.nats, &[]).await;
        self.engine = engine;
        self.ops = ops;
        self.markers = 0;
    }

    /// A deposit as the API makes it, completed.
    async fn deposit(&self, user: Uuid, asset: &str, amount: Decimal) -> Uuid {
        let id = self.desk.deposit(user, asset, amount).await;
        self.wait_status("deposits", id, "completed").await;
        id
    }

    async fn wait_status(&self, table: &str, id: Uuid, want: &str) {
        self.desk.wait_status(table, id, want, WAIT).await;
    }

    async fn balance(&self, user: Uuid, asset: &str) -> (Decimal, Decimal) {
        sqlx::query_as("SELECT total, reserved FROM balances WHERE user_id = $1 AND asset = $2")
            .bind(user)
            .bind(asset)
            .fetch_optional(&self.pool)
            .await
            .expect("query")
            .unwrap_or_default()
    }

    /// Waits until the engine's price feed has handled every tick published so far: a marker
    /// it cannot decode goes on the stream behind them (on another market, so no market's last
    /// tick changes), and the feed, which reads the stream in order, counts it.
    async fn feed_caught_up(&mut self) {
        self.bus.jetstream().publish("prices.ETH-USD", "not a tick".into()).await.expect("sent").await.expect("ack");
        self.markers += 1;
        let want = f64::from(self.markers);
        poll_until(WAIT, "the engine's feed past the marker", || async {
            (scrape_metric(&self.ops, "vault_engine_bad_ticks_total", &[]).await >= want).then_some(())
        })
        .await;
    }

    /// The money invariants of ARCHITECTURE.md over the whole database.
    async fn assert_books_balance(&self) {
        let unbalanced: Vec<(String, Decimal)> =
            sqlx::query_as("SELECT asset, sum(amount) FROM ledger_entries GROUP BY asset HAVING sum(amount) <> 0")
                .fetch_all(&self.pool)
                .await
                .expect("query");
        assert!(unbalanced.is_empty(), "every asset sums to zero: {unbalanced:?}");
        let drift: Vec<(Uuid, String, Decimal, Decimal)> = sqlx::query_as(
            "SELECT b.user_id, b.asset, b.total, COALESCE(l.sum, 0) FROM balances b
               LEFT JOIN (SELECT user_id, asset, sum(amount) AS sum FROM ledger_entries WHERE account = 'user'
                           GROUP BY user_id, asset) l ON l.user_id = b.user_id AND l.asset = b.asset
              WHERE b.total <> COALESCE(l.sum, 0)",
        )
        .fetch_all(&self.pool)
        .await
        .expect("query");
        assert!(drift.is_empty(), "balances equal their ledger sums: {drift:?}");
        let holds: Vec<(Uuid, String, Decimal, Decimal)> = sqlx::query_as(
            "SELECT b.user_id, b.asset, b.reserved, COALESCE(h.sum, 0) FROM balances b
               LEFT JOIN (SELECT user_id, hold_asset, sum(hold) AS sum FROM orders WHERE status = 'open'
                           GROUP BY user_id, hold_asset) h ON h.user_id = b.user_id AND h.hold_asset = b.asset
              WHERE b.reserved <> COALESCE(h.sum, 0) OR b.total - b.reserved < 0",
        )
        .fetch_all(&self.pool)
        .await
        .expect("query");
        assert!(holds.is_empty(), "reserved equals open holds and nothing is negative: {holds:?}");
    }

    async fn events(&self) -> Vec<(String, Value)> {
        let mut stream = self.bus.jetstream().get_stream("EVENTS").await.expect("EVENTS");
        let last = stream.info().await.expect("info").state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            if let Ok(m) = stream.get_raw_message(seq).await {
                out.push((m.subject.to_string(), serde_json::from_slice(&m.payload).expect("json")));
            }
        }
        out
    }
}

#[tokio::test]
async fn a_deposit_and_a_market_buy_move_money_through_the_double_entry_ledger() {
    let mut s = Stack::start().await;
    let user = s.user().await;
    s.deposit(user, "USD", dec!(10000)).await;
    assert_eq!(s.balance(user, "USD").await, (dec!(10000), dec!(0)));

    s.tick(dec!(50000)).await;
    let (order, _) = s.place(user, Side::Buy, TimeInForce::Ioc, dec!(0.1), None).await;
    // The first order may race the first tick: a no_price rejection is a legitimate verdict,
    // so wait for any terminal state and retry once if the tick had not arrived yet.
    let status = poll_until(WAIT, "the order to be decided", || async {
        let st: Option<String> = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
            .bind(order)
            .fetch_optional(&s.pool)
            .await
            .ok()?;
        st.filter(|st| st != "pending")
    })
    .await;
    let order = if status == "rejected" {
        let (again, _) = s.place(user, Side::Buy, TimeInForce::Ioc, dec!(0.1), None).await;
        s.wait_status("orders", again, "filled").await;
        again
    } else {
        assert_eq!(status, "filled");
        order
    };

    let (price, fee, filled): (Decimal, Decimal, Decimal) =
        sqlx::query_as("SELECT average_fill_price, fee, filled_quantity FROM orders WHERE id = $1")
            .bind(order)
            .fetch_one(&s.pool)
            .await
            .expect("order");
    assert_eq!((price, fee, filled), (dec!(50000), dec!(5), dec!(0.1)));
    assert_eq!(s.balance(user, "USD").await, (dec!(4995), dec!(0)), "10000 − 5000 − 5 fee");
    assert_eq!(s.balance(user, "BTC").await, (dec!(0.1), dec!(0)));
    let fills: i64 = sqlx::query_scalar("SELECT count(*) FROM fills WHERE order_id = $1")
        .bind(order)
        .fetch_one(&s.pool)
        .await
        .expect("n");
    assert_eq!(fills, 1);
    let fee_account: Decimal = sqlx::query_scalar("SELECT sum(amount) FROM ledger_entries WHERE account = 'fees'")
        .fetch_one(&s.pool)
        .await
        .expect("fees");
    assert_eq!(fee_account, dec!(5));
    s.assert_books_balance().await;

    // The results left through the outbox, with the order object as data.
    let events = poll_until(WAIT, "order.filled on EVENTS", || async {
        let events = s.events().await;
        events.iter().any(|(subject, _)| subject == &format!("events.order.filled.{user}")).then_some(events)
    })
    .await;
    let (_, filled_event) = events.iter().find(|(subj, _)| subj.starts_with("events.order.filled.")).expect("filled");
    assert_eq!(filled_event["data"]["id"], order.to_string());
    assert_eq!(filled_event["data"]["status"], "filled");
    assert_eq!(filled_event["data"]["fills"].as_array().expect("fills").len(), 1);
    assert!(events.iter().any(|(subj, _)| subj == &format!("events.deposit.completed.{user}")));
    // Acknowledged events leave the outbox: it holds only what is still to be published.
    poll_until(WAIT, "the outbox to empty", || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&s.pool).await.ok()?;
        (left == 0).then_some(())
    })
    .await;

    let text = vault_testkit::http_client()
        .get(format!("http://{}/metrics", s.ops))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for name in [
        "vault_engine_commands_total{outcome=\"applied\"}",
        "vault_engine_apply_seconds_bucket",
        "vault_engine_commit_seconds_bucket",
        "vault_engine_end_to_end_seconds_bucket",
        "vault_engine_queue_wait_seconds_bucket",
        "vault_engine_actors",
        "vault_engine_mailbox_depth",
        "vault_outbox_published_total",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
}

#[tokio::test]
async fn a_resting_limit_order_holds_funds_fills_on_a_crossing_tick_and_cancel_releases_holds() {
    let mut s = Stack::start().await;
    let user = s.user().await;
    s.deposit(user, "USD", dec!(1000)).await;
    s.tick(dec!(50000)).await;

    let (resting, _) = s.place(user, Side::Buy, TimeInForce::Gtc, dec!(0.01), Some(dec!(40000))).await;
    s.wait_status("orders", resting, "open").await;
    assert_eq!(s.balance(user, "USD").await, (dec!(1000), dec!(400.4)), "400 notional + 0.4 fee held");
    let (other, _) = s.place(user, Side::Buy, TimeInForce::Gtc, dec!(0.001), Some(dec!(30000))).await;
    s.wait_status("orders", other, "open").await;

    // Above the limit nothing happens; at 39000 the first fills at the tick's price.
    s.tick(dec!(45000)).await;
    s.tick(dec!(39000)).await;
    s.wait_status("orders", resting, "filled").await;
    assert_eq!(s.fill_price(resting).await, dec!(39000));
    assert_eq!(
        s.balance(user, "USD").await,
        (dec!(609.61), dec!(30.03)),
        "1000 − 390 − 0.39; the other order still holds 30.03"
    );

    s.send(user, CommandBody::Cancel { order_id: other }).await;
    s.wait_status("orders", other, "canceled").await;
    assert_eq!(s.balance(user, "USD").await, (dec!(609.61), dec!(0)));
    s.assert_books_balance().await;
}

/// A cancel that reaches the stream before its order's place command (a cancel of every order,
/// sent while one was still being placed) cancels the order while it is pending: it never rests
/// and holds nothing, its cancel is told on EVENTS, and the place, when it comes, changes
/// nothing. (Before, the cancel did nothing but spend its key: the order rested, and no later
/// cancel could reach it.)
#[tokio::test]
async fn a_cancel_that_comes_before_its_orders_place_cancels_it_and_the_place_changes_nothing() {
    let mut s = Stack::start().await;
    let user = s.user().await;
    s.deposit(user, "USD", dec!(1000)).await;
    s.tick(dec!(50000)).await;
    let (order, place) = s.place_intake(user, Side::Buy, TimeInForce::Gtc, dec!(0.01), Some(dec!(40000))).await;
    s.send(user, CommandBody::Cancel { order_id: order }).await;
    s.wait_status("orders", order, "canceled").await;
    s.send(user, place).await;
    // Commands of one user are applied in stream order: once the next order rests, the place
    // before it has been applied.
    let (next, _) = s.place(user, Side::Buy, TimeInForce::Gtc, dec!(0.001), Some(dec!(30000))).await;
    s.wait_status("orders", next, "open").await;
    let (status, hold): (String, Decimal) = sqlx::query_as("SELECT status, hold FROM orders WHERE id = $1")
        .bind(order)
        .fetch_one(&s.pool)
        .await
        .expect("order");
    assert_eq!((status.as_str(), hold), ("canceled", dec!(0)), "the place changed nothing");
    assert_eq!(s.balance(user, "USD").await, (dec!(1000), dec!(30.03)), "only the next order holds funds");
    let canceled = poll_until(WAIT, "the cancel on EVENTS", || async {
        s.events().await.into_iter().find(|(subject, e)| {
            *subject == format!("events.order.canceled.{user}")
                && e["data"]["id"].as_str() == Some(order.to_string().as_str())
        })
    })
    .await;
    assert_eq!(canceled.1["data"]["status"], "canceled");
    assert!(
        !s.events().await.iter().any(|(subject, e)| *subject == format!("events.order.accepted.{user}")
            && e["data"]["id"].as_str() == Some(order.to_string().as_str())),
        "never accepted"
    );
    s.assert_books_balance().await;
    vault_testkit::assert_reconciled(&vault_testkit::workspace_binary("vault-engine"), &s.db).await;
}

/// A tick older than `MAX_PRICE_AGE` triggers nothing, even one stamped after an order began
/// to rest (a print that arrives late): a buy limit above it does not fill at it, before or
/// after a restart; the next fresh tick that crosses fills it, at its own price. (Here
/// `MAX_PRICE_AGE` is 2 s, so that a tick can be stamped after the order rested and still be
/// stale.)
#[tokio::test]
async fn a_stale_tick_fills_no_resting_order_even_one_stamped_after_it_rested() {
    let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let max_age = [("MAX_PRICE_AGE", "2".to_owned())];
    let (engine, ops) = start_engine(&db, &nats, &max_age).await;
    let desk = Desk::connect(db.pool().await, &nats).await;
    let mut s = Stack { nats, db, desk, engine, ops, markers: 0 };
    let user = s.user().await;
    s.deposit(user, "USD", dec!(1000)).await;
    s.tick(dec!(52000)).await;
    let (order, _) = s.place(user, Side::Buy, TimeInForce::Gtc, dec!(0.01), Some(dec!(51000))).await;
    s.wait_status("orders", order, "open").await;
    let rested = Utc::now();
    // Time itself is the condition: the print below must be older than MAX_PRICE_AGE.
    poll_until(WAIT, "the print's time to be 2 s old", || async {
        (Utc::now() - rested > chrono::Duration::milliseconds(2500)).then_some(())
    })
    .await;

    // Stamped after the order rested, but stale when it comes. Once the feed is past the marker
    // it has been handled — and any trigger it made was routed to the user's actor before the
    // deposit below, which the actor applies after it.
    s.tick_at(dec!(50000), rested + chrono::Duration::milliseconds(100)).await;
    s.feed_caught_up().await;
    s.deposit(user, "USD", dec!(1)).await;
    let pool = s.pool.clone();
    let status = || async {
        sqlx::query_scalar::<_, String>("SELECT status FROM orders WHERE id = $1")
            .bind(order)
            .fetch_one(&pool)
            .await
            .expect("order")
    };
    assert_eq!(status().await, "open", "not filled at the stale 50,000");
    s.engine.stop_cleanly(Duration::from_secs(30)).await;
    let (engine, ops) = start_engine(&s.db, &s.nats, &max_age).await;
    (s.engine, s.ops, s.markers) = (engine, ops, 0);
    s.feed_caught_up().await;
    s.deposit(user, "USD", dec!(1)).await;
    assert_eq!(status().await, "open", "nor after a restart");

    s.tick(dec!(50500)).await;
    s.wait_status("orders", order, "filled").await;
    assert_eq!(s.fill_price(order).await, dec!(50500));
    s.assert_books_balance().await;
}

/// A tick that crosses a limit order while the order's commit is under way — the order was
/// decided against the price before, and goes into the book only after the tick went by — fills
/// it at the tick's price, as if the order had been in the book when the tick came. (Before, the
/// order rested until another crossing tick came, or for good if the market moved back.)
#[tokio::test]
async fn a_tick_that_crosses_an_order_while_its_commit_is_under_way_fills_it() {
    let mut s = Stack::start().await;
    let user = s.user().await;
    s.deposit(user, "USD", dec!(1000)).await;
    s.tick(dec!(50000)).await;
    s.feed_caught_up().await;

    // The user's portfolio row held: the order's commit waits on it, decided at 50,000.
    let mut blocker = s.pool.begin().await.expect("tx");
    sqlx::query("SELECT 1 FROM portfolios WHERE user_id = $1 FOR UPDATE")
        .bind(user)
        .execute(&mut *blocker)
        .await
        .expect("lock");
    let (order, _) = s.place(user, Side::Buy, TimeInForce::Gtc, dec!(0.01), Some(dec!(40000))).await;
    vault_testkit::wait_for_lock_wait(&s.pool, "%INSERT INTO portfolios%", WAIT).await;
    s.tick(dec!(39000)).await;
    s.feed_caught_up().await;
    blocker.rollback().await.expect("release");

    s.wait_status("orders", order, "filled").await;
    assert_eq!(s.fill_price(order).await, dec!(39000));
    s.assert_books_balance().await;
}

#[tokio::test]
async fn a_redelivered_command_is_applied_once_and_a_withdrawn_one_not_at_all() {
    let mut s = Stack::start().await;
    let user = s.user().await;
    s.deposit(user, "USD", dec!(100000)).await;
    s.tick(dec!(50000)).await;
    let (order, body) = s.place(user, Side::Buy, TimeInForce::Gtc, dec!(0.5), Some(dec!(60000))).await;
    s.wait_status("orders", order, "filled").await;

    // The same command again under another JetStream id (as a redelivery after a crash would
    // arrive): the engine's own key recognises it.
    let command = OrderCommand { user_id: user, request_id: None, at: Utc::now(), body };
    let payload = vault_bus::message::encode(&command).expect("encodes");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "a-different-dedupe-id");
    s.bus
        .jetstream()
        .publish_with_headers(command.subject(), headers, payload.into())
        .await
        .expect("send")
        .await
        .expect("ack");

    // A command whose intake row the API withdrew (no row) changes nothing.
    let ghost = CommandBody::Place {
        order_id: Uuid::now_v7(),
        client_order_id: "ghost".into(),
        symbol: Symbol::parse("BTC-USD").expect("symbol"),
        side: Side::Buy,
        order_type: OrderType::Market,
        time_in_force: TimeInForce::Ioc,
        quantity: Positive::new(dec!(0.1)).expect("positive"),
        limit_price: None,
    };
    s.send(user, ghost).await;

    // Both are consumed (acked) without effect: wait until the consumer has nothing pending.
    let js = s.bus.jetstream().clone();
    poll_until(WAIT, "the partition consumer to drain", || async {
        let stream = js.get_stream("ORDERS").await.ok()?;
        let partition = vault_bus::subjects::partition_of(user);
        let mut consumer: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer(&format!("engine-p{partition:02}")).await.ok()?;
        let info = consumer.info().await.ok()?;
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
    })
    .await;
    let fills: i64 = sqlx::query_scalar("SELECT count(*) FROM fills WHERE user_id = $1")
        .bind(user)
        .fetch_one(&s.pool)
        .await
        .expect("n");
    assert_eq!(fills, 1, "applied exactly once");
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE user_id = $1")
        .bind(user)
        .fetch_one(&s.pool)
        .await
        .expect("n");
    assert_eq!(orders, 1, "the withdrawn command created nothing");
    assert_eq!(s.balance(user, "BTC").await, (dec!(0.5), dec!(0)));
    s.assert_books_balance().await;
    let metrics = vault_testkit::http_client().get(format!("http://{}/metrics", s.ops)).send().await.expect("metrics");
    let text = metrics.text().await.expect("text");
    assert!(text.contains(r#"vault_engine_commands_total{outcome="duplicate"} 1"#), "{text}");
    assert!(text.contains(r#"vault_engine_commands_total{outcome="void"} 1"#), "{text}");
}

#[tokio::test]
async fn rejections_carry_their_reason_and_poison_messages_are_parked() {
    let mut s = Stack::start().await;
    let user = s.user().await;
    let (no_price, _) = s.place(user, Side::Buy, TimeInForce::Ioc, dec!(1), None).await;
    s.wait_status("orders", no_price, "rejected").await;
    s.tick(dec!(50000)).await;
    let (broke, _) = s.place(user, Side::Buy, TimeInForce::Gtc, dec!(1), Some(dec!(100))).await;
    s.wait_status("orders", broke, "rejected").await;
    let reasons: Vec<String> = sqlx::query_scalar("SELECT reject_reason FROM orders WHERE user_id = $1 ORDER BY id")
        .bind(user)
        .fetch_all(&s.pool)
        .await
        .expect("reasons");
    assert_eq!(reasons, ["no_price", "insufficient_funds"]);

    // Garbage on the user's subject is parked with its reason, and the consumer goes on.
    let subject = vault_bus::subjects::order_command(user);
    s.bus.jetstream().publish(subject, "{not json".into()).await.expect("send").await.expect("ack");
    let reason: String = poll_until(WAIT, "the poison message to be parked", || async {
        sqlx::query_scalar("SELECT reason FROM parked_messages").fetch_optional(&s.pool).await.ok().flatten()
    })
    .await;
    assert!(reason.contains("cannot be decoded"), "{reason}");
    s.deposit(user, "USD", dec!(5)).await;
    // Counted once, on the consumer of the user's partition (every consumer's series exists
    // from the start, at 0).
    let consumer = format!(r#"consumer="engine-p{:02}""#, vault_bus::subjects::partition_of(user));
    let text = vault_testkit::metrics_text(&s.ops).await;
    assert_eq!(
        vault_testkit::sample(&text, "vault_parked_messages_total{", &[r#"stream="ORDERS""#, &consumer]),
        Some(1.0),
        "the parked message is counted on {consumer}:\n{text}"
    );
    let all: f64 = text
        .lines()
        .filter(|l| l.starts_with("vault_parked_messages_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(all, 1.0, "one message parked in all");
}

/// Market orders that queued while no engine served (a restart, a deploy, a takeover) are
/// decided at the last price of their market, which the engine reads before it takes its first
/// command. The price feed opens beside the partition consumers: the commands waiting for them
/// were decided before its first ticks arrived, and the market orders among them were refused
/// `no_price`.
#[tokio::test]
async fn market_orders_queued_while_no_engine_served_fill_at_the_last_price() {
    const USERS: usize = 24;
    let mut s = Stack::start().await;
    let mut users = Vec::new();
    for _ in 0..USERS {
        let user = s.user().await;
        s.deposit(user, "USD", dec!(1000)).await;
        users.push(user);
    }
    s.tick(dec!(40000)).await;
    s.engine.stop_cleanly(Duration::from_secs(30)).await;
    let mut orders = Vec::new();
    for user in &users {
        let (order, _) = s.place(*user, Side::Buy, TimeInForce::Ioc, dec!(0.01), None).await;
        orders.push(order);
    }

    let (engine, ops) = start_engine(&s.db, &s.nats, &[]).await;
    (s.engine, s.ops) = (engine, ops);
    let mut verdicts = Vec::new();
    for order in &orders {
        verdicts.push(s.decided(*order, WAIT).await);
    }
    let refused: Vec<String> =
        sqlx::query_scalar("SELECT coalesce(reject_reason, '') FROM orders WHERE id = ANY($1) AND status = 'rejected'")
            .bind(&orders)
            .fetch_all(&s.pool)
            .await
            .expect("rejections");
    assert!(verdicts.iter().all(|v| v == "filled"), "verdicts {verdicts:?}, rejections {refused:?}");
    for order in &orders {
        assert_eq!(s.fill_price(*order).await, dec!(40000));
    }
    s.assert_books_balance().await;
}

/// PRICES deleted and declared again (or restored from a backup) numbers its ticks from 1
/// again. The engine's feed follows the new stream: a market order fills at the first price
/// published on it. (The feed used to wait, silently, for sequence numbers the new stream would
/// reach only days later; the engine traded at its last price until that went stale, then
/// refused every market order `stale_price` until a restart.)
#[tokio::test]
async fn the_feed_follows_prices_when_the_stream_is_created_again() {
    let mut s = Stack::start().await;
    let user = s.user().await;
    s.deposit(user, "USD", dec!(100000)).await;
    for price in [dec!(40000), dec!(40100), dec!(40200)] {
        s.tick(price).await;
    }
    s.feed_caught_up().await;
    s.bus.jetstream().delete_stream("PRICES").await.expect("PRICES deleted");
    s.bus.declare(&[]).await.expect("PRICES declared again");
    s.tick(dec!(42000)).await;
    let order = poll_until(Duration::from_secs(30), "a market buy filled at the new stream's price", || async {
        let (order, _) = s.place(user, Side::Buy, TimeInForce::Ioc, dec!(0.01), None).await;
        (s.decided(order, WAIT).await == "filled" && s.fill_price(order).await == dec!(42000)).then_some(order)
    })
    .await;
    assert_eq!(s.fill_price(order).await, dec!(42000));
    s.assert_books_balance().await;
}

/// Ticks published while no engine served — a restart, a deploy, a takeover — are replayed when
/// the next one starts (those of the last `MAX_PRICE_AGE`), after the commands that waited too:
/// one that crossed a resting order fills it at its price, though the market went back before
/// the engine came; one stamped before an order started resting does not fill it; and an order
/// whose cancel was accepted before the tick is canceled, not filled. (The feed began at each
/// market's last tick: the sell limit below stayed open, its crossing never seen.)
#[tokio::test]
async fn ticks_published_while_no_engine_served_fill_the_orders_resting_then() {
    let mut s = Stack::start().await;
    let user = s.user().await;
    s.deposit(user, "USD", dec!(10000)).await;
    s.deposit(user, "BTC", dec!(1)).await;
    s.tick(dec!(99)).await;
    s.feed_caught_up().await;
    s.tick(dec!(105)).await;
    s.feed_caught_up().await;
    // Placed after the tick at 99: a replay of that tick must not fill the buy.
    let (buy, _) = s.place(user, Side::Buy, TimeInForce::Gtc, dec!(0.1), Some(dec!(100))).await;
    let (sell, _) = s.place(user, Side::Sell, TimeInForce::Gtc, dec!(0.1), Some(dec!(110))).await;
    let (canceled, _) = s.place(user, Side::Sell, TimeInForce::Gtc, dec!(0.1), Some(dec!(112))).await;
    for order in [buy, sell, canceled] {
        s.wait_status("orders", order, "open").await;
    }

    s.engine.stop_cleanly(Duration::from_secs(30)).await;
    s.send(user, CommandBody::Cancel { order_id: canceled }).await;
    s.tick(dec!(113)).await;
    s.tick(dec!(104)).await;
    let (engine, ops) = start_engine(&s.db, &s.nats, &[]).await;
    (s.engine, s.ops) = (engine, ops);
    s.wait_status("orders", sell, "filled").await;
    assert_eq!(s.fill_price(sell).await, dec!(113), "at the tick that crossed it while no engine served");
    s.wait_status("orders", canceled, "canceled").await;
    s.feed_caught_up().await;
    let status: String =
        sqlx::query_scalar("SELECT status FROM orders WHERE id = $1").bind(buy).fetch_one(&s.pool).await.expect("buy");
    assert_eq!(status, "open", "the tick at 99 came before the buy rested");
    s.assert_books_balance().await;
}

#[tokio::test]
async fn resting_orders_survive_an_engine_restart() {
    let mut s = Stack::start().await;
    let user = s.user().await;
    s.deposit(user, "BTC", dec!(1)).await;
    s.tick(dec!(50000)).await;
    let (sell, _) = s.place(user, Side::Sell, TimeInForce::Gtc, dec!(0.2), Some(dec!(55000))).await;
    s.wait_status("orders", sell, "open").await;

    s.restart_engine().await;
    s.tick(dec!(56000)).await;
    s.wait_status("orders", sell, "filled").await;
    assert_eq!(s.balance(user, "BTC").await, (dec!(0.8), dec!(0)));
    assert_eq!(s.balance(user, "USD").await, (dec!(11188.8), dec!(0)), "0.2 × 56000 − 11.2 fee");
    s.assert_books_balance().await;
}

/// Group commit: commands of many users that are waiting together are committed together, and
/// the result is exactly what committing them one by one gives — every deposit and fill once,
/// the books balanced, each balance exact; a command Postgres refuses (a NUL in its key) does
/// not take the others of its transaction down with it.
#[tokio::test]
async fn many_users_commands_commit_in_shared_transactions_with_exact_results() {
    const USERS: usize = 120;
    let mut s = Stack::start().await;
    s.tick(dec!(50000)).await;
    let mut users = Vec::new();
    for _ in 0..USERS {
        users.push(s.user().await);
    }
    // Its one command is refused: with no command of its own before it, it is taken with the
    // commands waiting around it, into a transaction with others.
    let refused_user = s.user().await;
    // The engine is stopped while the commands arrive, so they wait together when it starts.
    s.engine.stop_cleanly(Duration::from_secs(30)).await;
    let mut deposits = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let (id, body) = s.deposit_intake(*user, "USD", Decimal::from(1000 + i as i64)).await;
        s.send(*user, body).await;
        deposits.push(id);
        if i == USERS / 2 {
            // Decodes, but its key (user:deposit:client id) cannot be stored.
            s.send(
                refused_user,
                CommandBody::Deposit {
                    deposit_id: Uuid::now_v7(),
                    client_deposit_id: "nul\u{0}id".to_owned(),
                    asset: Asset::usd(),
                    amount: Positive::new(dec!(5)).expect("positive"),
                },
            )
            .await;
        }
    }
    let (engine, ops) = start_engine(&s.db, &s.nats, &[]).await;
    (s.engine, s.ops) = (engine, ops);
    for id in &deposits {
        s.wait_status("deposits", *id, "completed").await;
    }
    // A price the restarted engine has seen, then one market buy per user, all sent at once.
    s.tick(dec!(50000)).await;
    poll_until(WAIT, "the engine to see the price", || async {
        let (id, _) = s.place(users[1], Side::Buy, TimeInForce::Ioc, dec!(0.001), None).await;
        (s.decided(id, WAIT).await == "filled").then_some(())
    })
    .await;
    let mut orders = Vec::new();
    for user in &users {
        orders.push(s.place(*user, Side::Buy, TimeInForce::Ioc, dec!(0.01), None).await.0);
    }
    for id in &orders {
        s.wait_status("orders", *id, "filled").await;
    }

    s.assert_books_balance().await;
    for (i, user) in users.iter().enumerate() {
        // 0.01 BTC at 50000 = 500 USD, plus the 0.1 % taker fee; users[1] bought 0.001 more.
        let extra = if i == 1 { dec!(50.05) } else { dec!(0) };
        let (usd, reserved) = s.balance(*user, "USD").await;
        assert_eq!(usd, Decimal::from(1000 + i as i64) - dec!(500.5) - extra, "user {i}'s USD");
        assert_eq!(reserved, dec!(0));
    }
    let fills: i64 = sqlx::query_scalar("SELECT count(*) FROM fills").fetch_one(&s.pool).await.expect("count");
    assert_eq!(fills, USERS as i64 + 1, "one fill per order");
    let events = s.events().await;
    let completed = events.iter().filter(|(subject, _)| subject.starts_with("events.deposit.completed.")).count();
    assert_eq!(completed, USERS, "one deposit.completed event per deposit: {:?}", &events[..3.min(events.len())]);

    let batches = scrape_metric(&s.ops, "vault_engine_commit_batches_total", &[]).await;
    let units = scrape_metric(&s.ops, "vault_engine_commit_batch_units_total", &[]).await;
    let split = scrape_metric(&s.ops, "vault_engine_commit_batches_split_total", &[]).await;
    println!("{units} units in {batches} transactions ({:.1} per transaction), {split} split", units / batches);
    assert!(units >= (2 * USERS) as f64, "every command went through the group commit: {units}");
    assert!(units > batches, "waiting commands shared transactions: {units} units in {batches}");
    // The refused command waited with others: its transaction was refused and split, and the
    // others of it committed one by one (every deposit completed, above).
    assert!(split >= 1.0, "the refused command's transaction carried others and was split: {split}");
    // It is refused on every delivery and parked on its last, alone; nothing else is parked.
    let parked: Vec<(String, String)> = poll_until(WAIT * 2, "the refused command to be parked", || async {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT subject, reason FROM parked_messages WHERE stream = 'ORDERS'")
                .fetch_all(&s.pool)
                .await
                .ok()?;
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(parked.len(), 1, "only the refused command is parked: {parked:?}");
    assert_eq!(parked[0].0, vault_bus::subjects::order_command(refused_user), "{parked:?}");
    assert!(parked[0].1.contains("failed on delivery"), "parked for its own failure: {parked:?}");
}
