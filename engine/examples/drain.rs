//! The engine stage alone, flat out, against a real nats-server and Postgres: `--users` funded
//! users, then `--orders` market buys published as fast as JetStream takes them (each with the
//! API's pending intake row, written beforehand), while the release engine binary commits them.
//! Prints the engine's commit rate from its first to its last commit of the run (the orders'
//! `updated_at`), the publish rate beside it, and the group commit's transactions and units.
//!
//! ```sh
//! cargo build --release -p vault-engine --bin vault-engine --example drain
//! VAULT_NATS_SERVER=… VAULT_TEST_PG_URL=… ./target/release/examples/drain --users 1000 --orders 20000
//! ```
//!
//! Not a test: it asserts only that every order was decided and filled.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use clap::Parser;
use rust_decimal::Decimal;
use uuid::Uuid;
use vault_bus::message::{CommandBody, OrderCommand, PriceTick};
use vault_bus::{Bus, MessageContext};
use vault_core::domain::{Asset, OrderType, Positive, Side, Symbol, TimeInForce};
use vault_testkit::{NatsServer, Proc, READY_DEADLINE, TestDb, base_env, free_port, poll_until, scrape_metric};

#[derive(Parser)]
struct Args {
    /// Funded users the orders are spread over.
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// Market buys to publish.
    #[arg(long, default_value_t = 20000)]
    orders: usize,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let exe = std::env::current_exe().expect("own path");
    let engine_bin = exe.parent().and_then(|p| p.parent()).expect("target dir").join("vault-engine");
    let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let pool = db.pool().await;
    let ops = format!("127.0.0.1:{}", free_port());
    let mut envs = base_env(&db, &nats);
    envs.push(("OPS_ADDR", ops.clone()));
    envs.push(("RUST_LOG", "warn".to_owned()));
    let mut engine = Proc::spawn(engine_bin.to_str().expect("utf-8 path"), &[], &envs);
    engine.wait_http_status(&ops, "/readyz", 200, READY_DEADLINE).await;
    let bus = Bus::connect(&nats.url(), "drain").await.expect("connects");

    // Users and their deposits, through the engine (it is the only writer of balances).
    let users: Vec<Uuid> = (0..args.users).map(|_| Uuid::now_v7()).collect();
    sqlx::query(
        "INSERT INTO users (id, email, password_hash)
         SELECT id, id::text || '@example.com', '$argon2id$not-a-real-hash' FROM UNNEST($1::uuid[]) AS u(id)",
    )
    .bind(&users)
    .execute(&pool)
    .await
    .expect("users");
    let deposits: Vec<Uuid> = (0..args.users).map(|_| Uuid::now_v7()).collect();
    sqlx::query(
        "INSERT INTO deposits (id, user_id, client_deposit_id, asset, amount)
         SELECT d, u, 'dep-' || d::text, 'USD', 1000000 FROM UNNEST($1::uuid[], $2::uuid[]) AS x(d, u)",
    )
    .bind(&deposits)
    .bind(&users)
    .execute(&pool)
    .await
    .expect("deposit rows");
    let commands = users.iter().zip(&deposits).map(|(user, id)| OrderCommand {
        user_id: *user,
        request_id: None,
        at: Utc::now(),
        body: CommandBody::Deposit {
            deposit_id: *id,
            client_deposit_id: format!("dep-{id}"),
            asset: Asset::usd(),
            amount: Positive::new(Decimal::from(1_000_000)).expect("positive"),
        },
    });
    publish_all(&bus, commands.collect()).await;
    poll_until(Duration::from_secs(300), "every deposit completed", || async {
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM deposits WHERE status <> 'completed'")
            .fetch_one(&pool)
            .await
            .ok()?;
        (pending == 0).then_some(())
    })
    .await;
    let tick = PriceTick {
        symbol: Symbol::parse("BTC-USD").expect("symbol"),
        price: Positive::new(Decimal::from(50_000)).expect("positive"),
        ts: Utc::now(),
        source: "drain".into(),
        seq: 1,
    };
    bus.publish(&tick, &MessageContext::default()).await.expect("tick");
    // Until the engine has the price, a market buy is rejected (`no_price`): probe until one fills.
    poll_until(Duration::from_secs(30), "the engine to have the price", || async {
        let probe = place(&pool, &bus, &[(Uuid::now_v7(), users[0])]).await[0];
        let status = poll_until(Duration::from_secs(30), "the probe decided", || async {
            let status: String = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
                .bind(probe)
                .fetch_one(&pool)
                .await
                .ok()?;
            (status != "pending").then_some(status)
        })
        .await;
        (status == "filled").then_some(())
    })
    .await;
    let (batches_before, units_before) = (
        scrape_metric(&ops, "vault_engine_commit_batches_total", &[]).await,
        scrape_metric(&ops, "vault_engine_commit_batch_units_total", &[]).await,
    );

    // The orders: intake rows first (as the API writes them), then the commands, flat out.
    let orders: Vec<(Uuid, Uuid)> = (0..args.orders).map(|i| (Uuid::now_v7(), users[i % users.len()])).collect();
    let started = Instant::now();
    let ids = place(&pool, &bus, &orders).await;
    let published = started.elapsed();
    poll_until(Duration::from_secs(600), "every order decided", || async {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'pending'").fetch_one(&pool).await.ok()?;
        (pending == 0).then_some(())
    })
    .await;
    let drained = started.elapsed();
    let (filled, first, last): (i64, DateTime<Utc>, DateTime<Utc>) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'filled'), min(updated_at), max(updated_at) FROM orders
          WHERE id = ANY($1)",
    )
    .bind(&ids)
    .fetch_one(&pool)
    .await
    .expect("orders");
    assert_eq!(filled as usize, args.orders, "every order filled");
    let batches = scrape_metric(&ops, "vault_engine_commit_batches_total", &[]).await - batches_before;
    let units = scrape_metric(&ops, "vault_engine_commit_batch_units_total", &[]).await - units_before;
    let commit_secs = (last - first).num_microseconds().unwrap_or(1) as f64 / 1e6;
    println!(
        "{} market buys of {} users: intake rows and commands published in {:.2} s ({:.0}/s); all filled {:.2} s after the start",
        args.orders,
        args.users,
        published.as_secs_f64(),
        args.orders as f64 / published.as_secs_f64(),
        drained.as_secs_f64()
    );
    println!(
        "engine: {:.0} commits/s from its first to its last commit ({commit_secs:.2} s); {units:.0} units in {batches:.0} transactions ({:.1} per transaction)",
        args.orders as f64 / commit_secs,
        units / batches.max(1.0)
    );
    engine.signal("TERM");
    engine.wait_exit(Duration::from_secs(30)).await;
}

/// Market buys of 0.001 BTC: the intake rows in one statement, then the commands; returns the ids.
async fn place(pool: &sqlx::PgPool, bus: &Bus, orders: &[(Uuid, Uuid)]) -> Vec<Uuid> {
    let ids: Vec<Uuid> = orders.iter().map(|(o, _)| *o).collect();
    sqlx::query(
        "INSERT INTO orders (id, user_id, client_order_id, symbol, side, type, time_in_force, quantity, status)
         SELECT o, u, 'c-' || o::text, 'BTC-USD', 'buy', 'market', 'ioc', 0.001, 'pending'
           FROM UNNEST($1::uuid[], $2::uuid[]) AS x(o, u)",
    )
    .bind(&ids)
    .bind(orders.iter().map(|(_, u)| *u).collect::<Vec<_>>())
    .execute(pool)
    .await
    .expect("order rows");
    let commands = orders.iter().map(|(id, user)| OrderCommand {
        user_id: *user,
        request_id: None,
        at: Utc::now(),
        body: CommandBody::Place {
            order_id: *id,
            client_order_id: format!("c-{id}"),
            symbol: Symbol::parse("BTC-USD").expect("symbol"),
            side: Side::Buy,
            order_type: OrderType::Market,
            time_in_force: TimeInForce::Ioc,
            quantity: Positive::new(Decimal::new(1, 3)).expect("positive"),
            limit_price: None,
        },
    });
    publish_all(bus, commands.collect()).await;
    ids
}

/// Publishes every command with its ack awaited in windows of 1,000 (the acks pipelined).
async fn publish_all(bus: &Bus, commands: Vec<OrderCommand>) {
    for chunk in commands.chunks(1000) {
        let mut acks = Vec::with_capacity(chunk.len());
        for command in chunk {
            acks.push(bus.start_publish(command, &MessageContext::default()).await.expect("publish"));
        }
        for ack in acks {
            ack.await.expect("ack");
        }
    }
}
