//! Faults against the real engine binary: `kill -9` in the middle of a flood of commands, and a
//! misconfigured second engine on the same partitions. After each: every command applied
//! exactly once, nothing pending, the books balanced — and `vault-engine reconcile` finds the
//! database clean.

use std::time::Duration;

use chrono::Utc;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use sqlx::PgPool;
use uuid::Uuid;
use vault_bus::message::{CommandBody, OrderCommand, PriceTick};
use vault_bus::{Bus, MessageContext};
use vault_core::domain::{Asset, OrderType, Positive, Side, Symbol, TimeInForce};
use vault_testkit::{NatsServer, Proc, READY_DEADLINE, TestDb, assert_reconciled, base_env, free_port, poll_until};

const BIN: &str = env!("CARGO_BIN_EXE_vault-engine");

async fn start_engine(db: &TestDb, nats: &NatsServer) -> Proc {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut envs = base_env(db, nats);
    envs.push(("OPS_ADDR", addr.clone()));
    let mut engine = Proc::spawn(BIN, &[], &envs);
    engine.wait_http_status(&addr, "/readyz", 200, READY_DEADLINE).await;
    engine
}

/// Users with USD, intake rows and commands for a mix of market buys, resting limits and
/// cancels. Returns the commands in publish order.
async fn prepare(pool: &PgPool, users: usize, orders_per_user: usize) -> Vec<OrderCommand> {
    let symbol = Symbol::parse("BTC-USD").expect("symbol");
    let mut commands = Vec::new();
    for u in 0..users {
        let user = Uuid::now_v7();
        sqlx::query("INSERT INTO users (id, email, password_hash) VALUES ($1, $2, '$argon2id$x')")
            .bind(user)
            .bind(format!("flood-{u}-{user}@example.com"))
            .execute(pool)
            .await
            .expect("user");
        let deposit = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO deposits (id, user_id, client_deposit_id, asset, amount) VALUES ($1, $2, $3, 'USD', 100000)",
        )
        .bind(deposit)
        .bind(user)
        .bind(format!("d{}", deposit.simple()))
        .execute(pool)
        .await
        .expect("deposit row");
        commands.push(OrderCommand {
            user_id: user,
            request_id: None,
            at: Utc::now(),
            body: CommandBody::Deposit {
                deposit_id: deposit,
                client_deposit_id: format!("d{}", deposit.simple()),
                asset: Asset::usd(),
                amount: Positive::new(dec!(100000)).expect("positive"),
            },
        });
        let mut previous = None;
        for i in 0..orders_per_user {
            let id = Uuid::now_v7();
            let (order_type, tif, limit) = match i % 3 {
                0 => (OrderType::Market, TimeInForce::Ioc, None),
                1 => (OrderType::Limit, TimeInForce::Gtc, Some(dec!(40000) + Decimal::from(i))),
                _ => (OrderType::Limit, TimeInForce::Gtc, Some(dec!(45000))),
            };
            sqlx::query(
                "INSERT INTO orders (id, user_id, client_order_id, symbol, side, type, time_in_force, quantity, limit_price, status)
                 VALUES ($1, $2, $3, 'BTC-USD', 'buy', $4, $5, 0.01, $6, 'pending')",
            )
            .bind(id)
            .bind(user)
            .bind(format!("o{}", id.simple()))
            .bind(if limit.is_some() { "limit" } else { "market" })
            .bind(if limit.is_some() { "gtc" } else { "ioc" })
            .bind(limit)
            .execute(pool)
            .await
            .expect("order row");
            commands.push(OrderCommand {
                user_id: user,
                request_id: None,
                at: Utc::now(),
                body: CommandBody::Place {
                    order_id: id,
                    client_order_id: format!("o{}", id.simple()),
                    symbol: symbol.clone(),
                    side: Side::Buy,
                    order_type,
                    time_in_force: tif,
                    quantity: Positive::new(dec!(0.01)).expect("positive"),
                    limit_price: limit.map(|l| Positive::new(l).expect("positive")),
                },
            });
            // Every third order cancels the previous resting one.
            if i % 3 == 2
                && let Some(prev) = previous
            {
                commands.push(OrderCommand {
                    user_id: user,
                    request_id: None,
                    at: Utc::now(),
                    body: CommandBody::Cancel { order_id: prev },
                });
            }
            if limit.is_some() {
                previous = Some(id);
            }
        }
    }
    commands
}

async fn publish_all(bus: &Bus, commands: &[OrderCommand]) {
    for chunk in commands.chunks(128) {
        let mut acks = Vec::new();
        for c in chunk {
            acks.push(bus.start_publish(c, &MessageContext::default()).await.expect("send"));
        }
        for ack in acks {
            ack.await.expect("ack");
        }
    }
}

async fn tick(bus: &Bus, seq: u64, price: Decimal) {
    let tick = PriceTick {
        symbol: Symbol::parse("BTC-USD").expect("symbol"),
        price: Positive::new(price).expect("positive"),
        ts: Utc::now(),
        source: "fault-test".into(),
        seq,
    };
    bus.publish(&tick, &MessageContext::default()).await.expect("tick");
}

async fn decided(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM applied_commands").fetch_one(pool).await.expect("count")
}

/// Everything the invariants demand once the engine has caught up.
async fn assert_consistent(pool: &PgPool, commands: usize) {
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM applied_commands WHERE command_id NOT LIKE 'fill:%'")
        .fetch_one(pool)
        .await
        .expect("count");
    assert_eq!(applied, commands as i64, "every command applied exactly once");
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'pending'").fetch_one(pool).await.expect("n");
    assert_eq!(pending, 0, "no 202'd order is left undecided");
    let doubled: i64 =
        sqlx::query_scalar("SELECT count(*) FROM (SELECT order_id FROM fills GROUP BY order_id HAVING count(*) > 1) d")
            .fetch_one(pool)
            .await
            .expect("n");
    assert_eq!(doubled, 0, "no order filled twice");
    let unfilled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM orders o WHERE o.status = 'filled' AND NOT EXISTS (SELECT 1 FROM fills f WHERE f.order_id = o.id)",
    )
    .fetch_one(pool)
    .await
    .expect("n");
    assert_eq!(unfilled, 0, "every filled order has its fill");
    let unbalanced: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT asset FROM ledger_entries GROUP BY asset HAVING sum(amount) <> 0) u",
    )
    .fetch_one(pool)
    .await
    .expect("n");
    assert_eq!(unbalanced, 0, "every asset sums to zero");
    let drift: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM balances b
          WHERE b.total <> (SELECT COALESCE(sum(amount), 0) FROM ledger_entries l
                             WHERE l.account = 'user' AND l.user_id = b.user_id AND l.asset = b.asset)
             OR b.reserved <> (SELECT COALESCE(sum(hold), 0) FROM orders o
                                WHERE o.status = 'open' AND o.user_id = b.user_id AND o.hold_asset = b.asset)
             OR b.total < b.reserved",
    )
    .fetch_one(pool)
    .await
    .expect("n");
    assert_eq!(drift, 0, "balances equal ledger sums and holds");
}

#[tokio::test]
async fn kill_9_in_the_middle_of_a_flood_loses_and_doubles_nothing() {
    let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let pool = db.pool().await;
    let bus = Bus::connect(&nats.url(), "test").await.expect("connects");
    let mut engine = start_engine(&db, &nats).await;
    tick(&bus, 1, dec!(42000)).await;

    let commands = prepare(&pool, 12, 30).await;
    let total = commands.len();
    publish_all(&bus, &commands).await;

    // Two crashes at different points of the flood, each followed by a restart. (Messages in
    // flight at a crash come back after the consumer's ack wait, 30 s: that is what bounds
    // this test's time.)
    for third in 1..=2 {
        let target = total as i64 * third / 3;
        poll_until(Duration::from_secs(60), "the engine to make progress", || async {
            (decided(&pool).await >= target).then_some(())
        })
        .await;
        engine.signal("KILL");
        engine.wait_exit(Duration::from_secs(10)).await;
        engine = start_engine(&db, &nats).await;
    }
    poll_until(Duration::from_secs(60), "every command to be applied", || async {
        let applied: i64 =
            sqlx::query_scalar("SELECT count(*) FROM applied_commands WHERE command_id NOT LIKE 'fill:%'")
                .fetch_one(&pool)
                .await
                .ok()?;
        (applied == total as i64).then_some(())
    })
    .await;
    // Then a tick that crosses every resting order at 45000: the book rebuilt after the
    // crashes must know them all.
    tick(&bus, 2, dec!(44000)).await;
    poll_until(Duration::from_secs(30), "crossed orders to fill", || async {
        let open_crossed: i64 =
            sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'open' AND limit_price >= 44000")
                .fetch_one(&pool)
                .await
                .ok()?;
        (open_crossed == 0).then_some(())
    })
    .await;
    assert_consistent(&pool, total).await;
    engine.signal("TERM");
    assert_eq!(engine.wait_exit(Duration::from_secs(30)).await.code(), Some(0));
    assert_reconciled(BIN, &db).await;
}

#[tokio::test]
async fn a_misconfigured_second_engine_on_the_same_partitions_applies_nothing_twice() {
    let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let pool = db.pool().await;
    let bus = Bus::connect(&nats.url(), "test").await.expect("connects");
    let mut first = start_engine(&db, &nats).await;
    let mut second = start_engine(&db, &nats).await;
    tick(&bus, 1, dec!(42000)).await;

    let commands = prepare(&pool, 8, 30).await;
    let total = commands.len();
    publish_all(&bus, &commands).await;
    poll_until(Duration::from_secs(60), "every command to be applied", || async {
        let applied: i64 =
            sqlx::query_scalar("SELECT count(*) FROM applied_commands WHERE command_id NOT LIKE 'fill:%'")
                .fetch_one(&pool)
                .await
                .ok()?;
        (applied == total as i64).then_some(())
    })
    .await;
    assert_consistent(&pool, total).await;
    for engine in [&mut first, &mut second] {
        engine.signal("TERM");
        assert_eq!(engine.wait_exit(Duration::from_secs(30)).await.code(), Some(0), "{}", engine.output());
    }
    assert_reconciled(BIN, &db).await;
}
