//! Scale-out: two engine processes on disjoint partition ranges (`ENGINE_PARTITIONS=0-7` and
//! `8-15`), as the compose file and the Kubernetes manifests run them, serving users spread
//! over all sixteen ORDERS partitions.
//!
//! The first engine starts alone: it serves its own partitions and nothing else, and the
//! commands of partitions nobody owns wait in the stream (their consumers do not even exist).
//! The second engine starts, declares its consumers, and serves everything that waited. Then
//! one tick crosses every user's resting order: each engine fills exactly the orders of its own
//! partitions (both follow the same prices), none twice. Each engine's metrics show work on its
//! own partition consumers only, every consumer ends with nothing pending, and reconcile (stream
//! order included) finds the database clean.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use sqlx::PgPool;
use uuid::Uuid;
use vault_bus::message::{CommandBody, OrderCommand, PriceTick};
use vault_bus::subjects::partition_of;
use vault_bus::{Bus, MessageContext, streams};
use vault_core::domain::{Asset, OrderType, Positive, Side, Symbol, TimeInForce};
use vault_testkit::{NatsServer, Proc, TestDb, poll_until, run_reconcile};

mod common;

use common::BIN;
/// Users per partition.
const PER_PARTITION: usize = 3;

async fn start_engine(db: &TestDb, nats: &NatsServer, partitions: &str) -> (Proc, String) {
    common::start_engine(db, nats, &[("ENGINE_PARTITIONS", partitions.to_owned())]).await
}

/// One user's commands: a deposit, a market buy, a resting limit at 40000 that the final tick
/// fills, and one at 41000 that is canceled.
struct Trader {
    id: Uuid,
    partition: u16,
    commands: Vec<OrderCommand>,
}

/// Users until every partition has [`PER_PARTITION`], each with its intake rows written as the
/// API writes them.
async fn traders(pool: &PgPool) -> Vec<Trader> {
    let mut per_partition: BTreeMap<u16, usize> = BTreeMap::new();
    let mut traders = Vec::new();
    while per_partition.len() < 16 || per_partition.values().any(|n| *n < PER_PARTITION) {
        let id = Uuid::now_v7();
        let partition = partition_of(id);
        let n = per_partition.entry(partition).or_insert(0);
        if *n == PER_PARTITION {
            continue;
        }
        *n += 1;
        traders.push(trader(pool, id, partition).await);
    }
    traders
}

async fn trader(pool: &PgPool, id: Uuid, partition: u16) -> Trader {
    common::insert_user(pool, id).await;
    let deposit = Uuid::now_v7();
    let client_deposit_id = format!("d{}", deposit.simple());
    sqlx::query(
        "INSERT INTO deposits (id, user_id, client_deposit_id, asset, amount) VALUES ($1, $2, $3, 'USD', 10000)",
    )
    .bind(deposit)
    .bind(id)
    .bind(&client_deposit_id)
    .execute(pool)
    .await
    .expect("deposit row");
    let command = |body| OrderCommand { user_id: id, request_id: None, at: Utc::now(), body };
    let mut commands = vec![command(CommandBody::Deposit {
        deposit_id: deposit,
        client_deposit_id,
        asset: Asset::usd(),
        amount: Positive::new(dec!(10000)).expect("positive"),
    })];
    let mut canceled = None;
    for limit in [None, Some(dec!(40000)), Some(dec!(41000))] {
        let order = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO orders (id, user_id, client_order_id, symbol, side, type, time_in_force, quantity, limit_price, status)
             VALUES ($1, $2, $3, 'BTC-USD', 'buy', $4, $5, 0.01, $6, 'pending')",
        )
        .bind(order)
        .bind(id)
        .bind(format!("o{}", order.simple()))
        .bind(if limit.is_some() { "limit" } else { "market" })
        .bind(if limit.is_some() { "gtc" } else { "ioc" })
        .bind(limit)
        .execute(pool)
        .await
        .expect("order row");
        commands.push(command(CommandBody::Place {
            order_id: order,
            client_order_id: format!("o{}", order.simple()),
            symbol: Symbol::parse("BTC-USD").expect("symbol"),
            side: Side::Buy,
            order_type: if limit.is_some() { OrderType::Limit } else { OrderType::Market },
            time_in_force: if limit.is_some() { TimeInForce::Gtc } else { TimeInForce::Ioc },
            quantity: Positive::new(dec!(0.01)).expect("positive"),
            limit_price: limit.map(|l| Positive::new(l).expect("positive")),
        }));
        if limit == Some(dec!(41000)) {
            canceled = Some(order);
        }
    }
    commands.push(command(CommandBody::Cancel { order_id: canceled.expect("the 41000 limit") }));
    Trader { id, partition, commands }
}

async fn tick(bus: &Bus, seq: u64, price: Decimal) {
    let tick = PriceTick {
        symbol: Symbol::parse("BTC-USD").expect("symbol"),
        price: Positive::new(price).expect("positive"),
        ts: Utc::now(),
        source: "scale-test".into(),
        seq,
    };
    bus.publish(&tick, &MessageContext::default()).await.expect("tick");
}

/// Commands applied for these users (fills by trigger excluded).
async fn applied(pool: &PgPool, users: &[Uuid]) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM applied_commands WHERE user_id = ANY($1) AND command_id NOT LIKE 'fill:%'")
        .bind(users)
        .fetch_one(pool)
        .await
        .expect("count")
}

/// `vault_messages_processed_total{stream="ORDERS",consumer=…,outcome="ok"}` per consumer, from
/// an engine's `/metrics`.
async fn processed(addr: &str) -> BTreeMap<String, f64> {
    let text = vault_testkit::http_client()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("/metrics answers")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|l| l.starts_with("vault_messages_processed_total{") && l.contains("stream=\"ORDERS\""))
        .filter(|l| l.contains("outcome=\"ok\""))
        .filter_map(|l| {
            let consumer = l.split("consumer=\"").nth(1)?.split('"').next()?.to_owned();
            let value = l.rsplit(' ').next()?.parse().ok()?;
            Some((consumer, value))
        })
        .collect()
}

#[tokio::test]
async fn two_engines_on_disjoint_ranges_serve_every_partition_once_and_a_missing_range_waits() {
    let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let pool = db.pool().await;
    let bus = Bus::connect(&nats.url(), "test").await.expect("connects");
    bus.ensure_streams().await.expect("streams");
    tick(&bus, 1, dec!(42000)).await;
    let traders = traders(&pool).await;
    let (low, high): (Vec<&Trader>, Vec<&Trader>) = traders.iter().partition(|t| t.partition < 8);
    let low_users: Vec<Uuid> = low.iter().map(|t| t.id).collect();
    let high_users: Vec<Uuid> = high.iter().map(|t| t.id).collect();
    let per_user = traders[0].commands.len() as i64;

    // The first engine alone, the whole flood published: it serves 0-7, and 8-15 waits.
    let (mut first, first_addr) = start_engine(&db, &nats, "0-7").await;
    for chunk in traders.iter().flat_map(|t| &t.commands).collect::<Vec<_>>().chunks(64) {
        let mut acks = Vec::new();
        for c in chunk {
            acks.push(bus.start_publish(*c, &MessageContext::default()).await.expect("send"));
        }
        for result in futures::future::join_all(acks.into_iter().map(std::future::IntoFuture::into_future)).await {
            result.expect("stored");
        }
    }
    let low_total = low_users.len() as i64 * per_user;
    poll_until(Duration::from_secs(30), "the first engine to apply partitions 0-7", || async {
        (applied(&pool, &low_users).await == low_total).then_some(())
    })
    .await;
    assert_eq!(applied(&pool, &high_users).await, 0, "nothing of partitions 8-15 is applied without their owner");
    let orders = bus.jetstream().get_stream(streams::ORDERS.name).await.expect("ORDERS");
    for p in 8..16 {
        assert!(orders.consumer_info(format!("engine-p{p:02}")).await.is_err(), "engine-p{p:02} has no owner yet");
    }
    let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'pending' AND user_id = ANY($1)")
        .bind(&high_users)
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(waiting, high_users.len() as i64 * 3, "their orders wait, pending");

    // The second engine: everything that waited is served (at a fresh price: the first may be
    // older than MAX_PRICE_AGE by now on a slow machine).
    tick(&bus, 2, dec!(42000)).await;
    let (mut second, second_addr) = start_engine(&db, &nats, "8-15").await;
    let high_total = high_users.len() as i64 * per_user;
    poll_until(Duration::from_secs(30), "the second engine to apply partitions 8-15", || async {
        (applied(&pool, &high_users).await == high_total).then_some(())
    })
    .await;

    // One tick crosses every resting 40000 limit: each engine fills its own.
    tick(&bus, 3, dec!(39000)).await;
    poll_until(Duration::from_secs(30), "every resting order to fill", || async {
        let open: i64 =
            sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'open'").fetch_one(&pool).await.ok()?;
        (open == 0).then_some(())
    })
    .await;
    let states: Vec<(String, Option<Decimal>, i64)> = sqlx::query_as(
        "SELECT o.status, o.limit_price, (SELECT count(*) FROM fills f WHERE f.order_id = o.id)
           FROM orders o ORDER BY o.limit_price NULLS FIRST",
    )
    .fetch_all(&pool)
    .await
    .expect("orders");
    for (status, limit, fills) in &states {
        let expected = match limit.map(|l| l.to_string()) {
            Some(l) if l.starts_with("41000") => ("canceled", 0),
            _ => ("filled", 1),
        };
        assert_eq!((status.as_str(), *fills), expected, "order at {limit:?}");
    }

    // Each engine worked its own consumers only, and every consumer is drained.
    let (by_first, by_second) = (processed(&first_addr).await, processed(&second_addr).await);
    let own = |m: &BTreeMap<String, f64>, range: std::ops::Range<u16>| {
        range.clone().all(|p| m.get(&format!("engine-p{p:02}")).is_some_and(|n| *n > 0.0))
            && m.keys().all(|c| c[8..].parse::<u16>().is_ok_and(|p| range.contains(&p)))
    };
    assert!(own(&by_first, 0..8), "the first engine processed only 0-7, all of them: {by_first:?}");
    assert!(own(&by_second, 8..16), "the second engine processed only 8-15, all of them: {by_second:?}");
    for p in 0..16 {
        let info = orders.consumer_info(format!("engine-p{p:02}")).await.expect("consumer");
        assert_eq!((info.num_pending, info.num_ack_pending), (0, 0), "engine-p{p:02} is drained");
    }

    for engine in [&mut first, &mut second] {
        engine.stop_cleanly(Duration::from_secs(30)).await;
    }
    let (code, report) = run_reconcile(BIN, &db, &["--stream-order"]).await;
    let fills: i64 = sqlx::query_scalar("SELECT count(*) FROM fills").fetch_one(&pool).await.expect("fills");
    println!(
        "two engines: {} users over 16 partitions, {} commands; engine 0-7 processed {:.0} ({} users), engine 8-15 \
         processed {:.0} ({} users, all after waiting for their owner); {fills} fills; reconcile (with stream \
         order): {} violations",
        traders.len(),
        traders.len() as i64 * per_user,
        by_first.values().sum::<f64>(),
        low_users.len(),
        by_second.values().sum::<f64>(),
        high_users.len(),
        report["violations_total"],
    );
    assert!(
        code == 0 && report["clean"] == true,
        "reconcile found violations (exit {code}):\n{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
}
