//! What the engine's process tests share: starting the engine binary, and a [`Desk`] that does
//! what the API and the prices worker do — the API's intake rows, commands on ORDERS, ticks on
//! PRICES — and watches what the engine decided.

#![allow(dead_code)] // each test binary uses its own part of it

use std::time::Duration;

use chrono::Utc;
use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;
use vault_bus::message::{CommandBody, OrderCommand, PriceTick};
use vault_bus::{Bus, MessageContext};
use vault_core::domain::{Asset, OrderType, Positive, Side, Symbol, TimeInForce};
use vault_testkit::{NatsServer, Proc, READY_DEADLINE, TestDb, base_env, poll_until};

pub const BIN: &str = env!("CARGO_BIN_EXE_vault-engine");

/// Spawns the engine binary with `extra` environment on top of the test defaults, without
/// waiting for it; returns the process and its ops address.
pub fn spawn_engine(db: &TestDb, nats: &NatsServer, extra: &[(&'static str, String)]) -> (Proc, String) {
    let mut envs = base_env(db, nats);
    envs.extend(extra.iter().cloned());
    Proc::spawn_with_ops(BIN, &[], &envs)
}

/// [`spawn_engine`], then waits for `/readyz`.
pub async fn start_engine(db: &TestDb, nats: &NatsServer, extra: &[(&'static str, String)]) -> (Proc, String) {
    let (mut engine, ops) = spawn_engine(db, nats, extra);
    engine.wait_http_status(&ops, "/readyz", 200, READY_DEADLINE).await;
    (engine, ops)
}

/// Inserts the `users` row the engine's foreign keys need (no real password).
pub async fn insert_user(pool: &PgPool, id: Uuid) {
    sqlx::query("INSERT INTO users (id, email, password_hash) VALUES ($1, $2, '$argon2id$not-a-real-hash')")
        .bind(id)
        .bind(format!("{id}@example.com"))
        .execute(pool)
        .await
        .expect("user");
}

/// Sends what clients send, the way the API and the prices worker send it.
pub struct Desk {
    pub pool: PgPool,
    pub bus: Bus,
    tick_seq: u64,
}

impl Desk {
    pub async fn connect(pool: PgPool, nats: &NatsServer) -> Desk {
        let bus = Bus::connect(&nats.url(), "test").await.expect("connects");
        Desk { pool, bus, tick_seq: 0 }
    }

    pub async fn user(&self) -> Uuid {
        let id = Uuid::now_v7();
        insert_user(&self.pool, id).await;
        id
    }

    /// Publishes a command as the API does (with a request id).
    pub async fn send(&self, user: Uuid, body: CommandBody) {
        let command =
            OrderCommand { user_id: user, request_id: Some(format!("req-{}", Uuid::now_v7())), at: Utc::now(), body };
        self.bus
            .publish(&command, &MessageContext { request_id: command.request_id.clone() })
            .await
            .expect("published");
    }

    /// The API's pending deposit row and the command for it (not sent).
    pub async fn deposit_intake(&self, user: Uuid, asset: &str, amount: Decimal) -> (Uuid, CommandBody) {
        let (id, client_id) = vault_testkit::insert_deposit_row(&self.pool, user, asset, &amount.to_string()).await;
        let body = CommandBody::Deposit {
            deposit_id: id,
            client_deposit_id: client_id,
            asset: Asset::parse(asset).expect("asset"),
            amount: Positive::new(amount).expect("positive"),
        };
        (id, body)
    }

    /// A deposit as the API makes it: the pending row, then the command. Does not wait.
    pub async fn deposit(&self, user: Uuid, asset: &str, amount: Decimal) -> Uuid {
        let (id, body) = self.deposit_intake(user, asset, amount).await;
        self.send(user, body).await;
        id
    }

    /// An order on BTC-USD as the API makes it: the pending row, then the command (returned
    /// too, to send again). Does not wait.
    pub async fn place(
        &self,
        user: Uuid,
        side: Side,
        tif: TimeInForce,
        quantity: Decimal,
        limit: Option<Decimal>,
    ) -> (Uuid, CommandBody) {
        let (id, body) = self.place_intake(user, side, tif, quantity, limit).await;
        self.send(user, body.clone()).await;
        (id, body)
    }

    /// The API's pending row of an order on BTC-USD and its command (not sent).
    pub async fn place_intake(
        &self,
        user: Uuid,
        side: Side,
        tif: TimeInForce,
        quantity: Decimal,
        limit: Option<Decimal>,
    ) -> (Uuid, CommandBody) {
        let id = Uuid::now_v7();
        let client_id = format!("c-{}", id.simple());
        sqlx::query(
            "INSERT INTO orders (id, user_id, client_order_id, symbol, side, type, time_in_force, quantity, limit_price, status)
             VALUES ($1, $2, $3, 'BTC-USD', $4, $5, $6, $7, $8, 'pending')",
        )
        .bind(id)
        .bind(user)
        .bind(&client_id)
        .bind(if side == Side::Buy { "buy" } else { "sell" })
        .bind(if limit.is_some() { "limit" } else { "market" })
        .bind(match tif {
            TimeInForce::Gtc => "gtc",
            TimeInForce::Ioc => "ioc",
            TimeInForce::Fok => "fok",
        })
        .bind(quantity)
        .bind(limit)
        .execute(&self.pool)
        .await
        .expect("intake row");
        let body = CommandBody::Place {
            order_id: id,
            client_order_id: client_id,
            symbol: Symbol::parse("BTC-USD").expect("symbol"),
            side,
            order_type: if limit.is_some() { OrderType::Limit } else { OrderType::Market },
            time_in_force: tif,
            quantity: Positive::new(quantity).expect("positive"),
            limit_price: limit.map(|l| Positive::new(l).expect("positive")),
        };
        (id, body)
    }

    /// Publishes a BTC-USD tick with the next sequence number.
    pub async fn tick(&mut self, price: Decimal) {
        self.tick_at(price, Utc::now()).await;
    }

    /// Publishes a BTC-USD tick stamped `ts` with the next sequence number.
    pub async fn tick_at(&mut self, price: Decimal, ts: chrono::DateTime<Utc>) {
        self.tick_seq += 1;
        let tick = PriceTick {
            symbol: Symbol::parse("BTC-USD").expect("symbol"),
            price: Positive::new(price).expect("positive"),
            ts,
            source: "test".into(),
            seq: self.tick_seq,
        };
        self.bus.publish(&tick, &MessageContext::default()).await.expect("tick published");
    }

    /// Polls the row's status until `want` accepts it; returns it.
    pub async fn wait_for(&self, table: &str, id: Uuid, within: Duration, want: impl Fn(&str) -> bool) -> String {
        let sql = format!("SELECT status FROM {table} WHERE id = $1");
        poll_until(within, &format!("{table} {id} to reach the expected status"), || async {
            let status: String = sqlx::query_scalar(&sql).bind(id).fetch_optional(&self.pool).await.ok()??;
            want(&status).then_some(status)
        })
        .await
    }

    pub async fn wait_status(&self, table: &str, id: Uuid, want: &str, within: Duration) {
        self.wait_for(table, id, within, |s| s == want).await;
    }

    /// The price of the order's fill.
    pub async fn fill_price(&self, order: Uuid) -> Decimal {
        sqlx::query_scalar("SELECT price FROM fills WHERE order_id = $1")
            .bind(order)
            .fetch_one(&self.pool)
            .await
            .expect("fill")
    }

    /// The engine's verdict on an order: its first status other than `pending`.
    pub async fn decided(&self, id: Uuid, within: Duration) -> String {
        self.wait_for("orders", id, within, |s| s != "pending").await
    }
}
