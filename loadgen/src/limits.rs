//! The physical limits every stage is reported against, measured in the same run:
//!
//! - **HTTP floor**: a trivial axum handler in a child process (`vault-loadgen trivial-server`),
//!   driven by the same client with the same concurrency and the same request bodies. No real
//!   handler can beat it on this machine.
//! - **Backbone**: raw JetStream publish-with-ack of a real order command (the same bytes the API
//!   publishes, with a `Nats-Msg-Id`), into a scratch file-backed stream like `ORDERS`.
//! - **Storage**: the Postgres writes of one market buy, raw: the API's intake row, then the
//!   transaction the engine runs to commit it (command key, version compare-and-set, intake-row
//!   lock, order update, fill, three two-row ledger postings, two balance upserts, the order
//!   read-back, one outbox row), into
//!   scratch tables created `LIKE` the real ones (same columns, constraints and indexes; foreign
//!   keys are not copied, so this limit is slightly optimistic).
//!
//! Each limit is measured closed-loop, flat out, with `concurrency` workers for `duration`.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use tokio::io::AsyncBufReadExt;
use uuid::Uuid;

use crate::report::{Latencies, summary};

/// A measured limit: operations per second, with the latency summary line.
#[derive(Debug, Clone)]
pub struct Limit {
    pub rate: f64,
    pub line: String,
}

/// What the trivial server answers to `POST /orders`: an order object of realistic size.
const ORDER_BODY: &str = r#"{"id":"01936f3e-0000-7000-8000-000000000000","client_order_id":"lg-0000000000","symbol":"BTC-USD","side":"buy","type":"market","time_in_force":"ioc","quantity":"0.0001","limit_price":null,"status":"pending","filled_quantity":"0","average_fill_price":null,"fee":"0","reject_reason":null,"created_at":"2026-11-22T00:00:00Z","updated_at":"2026-11-22T00:00:00Z","fills":[]}"#;

/// What the trivial server answers to `GET /portfolio`.
const PORTFOLIO_BODY: &str = r#"{"cash":{"asset":"USD","total":"1000000","available":"999000","reserved":"1000"},"positions":[{"asset":"BTC","symbol":"BTC-USD","quantity":"0.01","available":"0.01","reserved":"0","avg_cost":"65000","market_price":"65010","market_value":"650.1","unrealized_pnl":"0.1"}],"equity":"1000650.1","as_of":"2026-11-22T00:00:00Z"}"#;

/// Serves the trivial handlers on `addr` until killed; prints `listening on <addr>` first.
pub async fn trivial_server(addr: &str) -> anyhow::Result<()> {
    let app = Router::new()
        .route(
            "/api/v1/orders",
            post(|_body: axum::body::Bytes| async {
                (StatusCode::ACCEPTED, [("content-type", "application/json")], ORDER_BODY)
            }),
        )
        .route("/api/v1/portfolio", get(|| async { ([("content-type", "application/json")], PORTFOLIO_BODY) }));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

/// The trivial server as a child process (killed on drop), and its base URL.
#[derive(Debug)]
pub struct TrivialServer {
    pub url: String,
    _child: tokio::process::Child,
}

impl TrivialServer {
    pub async fn spawn() -> anyhow::Result<TrivialServer> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["trivial-server", "--addr", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawning the trivial server")?;
        let stdout = child.stdout.take().context("trivial server stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .context("the trivial server did not start within 10 s")??
            .context("the trivial server exited")?;
        let addr = line.strip_prefix("listening on ").context("unexpected first line from the trivial server")?;
        Ok(TrivialServer { url: format!("http://{addr}"), _child: child })
    }
}

/// Runs `op` closed-loop from `concurrency` workers for `duration`; returns its rate and line.
async fn flat_out<F, Fut>(name: &str, concurrency: usize, duration: Duration, op: F) -> Limit
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let latencies = Latencies::default();
    let started = Instant::now();
    let mut workers = Vec::with_capacity(concurrency);
    for w in 0..concurrency {
        let (op, stop, errors, first_error, latencies) =
            (op.clone(), stop.clone(), errors.clone(), first_error.clone(), latencies.clone());
        workers.push(tokio::spawn(async move {
            let mut i = (w as u64) << 40;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match op(i).await {
                    Ok(()) => latencies.record(t.elapsed()),
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut slot) = first_error.lock() {
                            slot.get_or_insert_with(|| format!("{e:#}"));
                        }
                    }
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    futures::future::join_all(workers).await;
    let elapsed = started.elapsed();
    let h = latencies.snapshot();
    let mut line = summary(name, &h, errors.load(Ordering::Relaxed), elapsed);
    if let Some(e) = first_error.lock().ok().and_then(|s| s.clone()) {
        line.push_str(&format!(" (first error: {e})"));
    }
    Limit { rate: h.len() as f64 / elapsed.as_secs_f64(), line }
}

/// The HTTP floor for `POST /orders` with `body`.
pub async fn http_post_floor(
    http: &reqwest::Client,
    server: &TrivialServer,
    body: serde_json::Value,
    concurrency: usize,
    duration: Duration,
) -> Limit {
    let url = format!("{}/api/v1/orders", server.url);
    let (http, body) = (http.clone(), Arc::new(body));
    flat_out("limit: trivial POST handler", concurrency, duration, move |_| {
        let (http, url, body) = (http.clone(), url.clone(), body.clone());
        async move {
            let r = http.post(&url).bearer_auth("x").json(&*body).send().await?;
            anyhow::ensure!(r.status() == StatusCode::ACCEPTED, "answered {}", r.status());
            r.bytes().await?;
            Ok(())
        }
    })
    .await
}

/// The HTTP floor for `GET /portfolio`.
pub async fn http_get_floor(
    http: &reqwest::Client,
    server: &TrivialServer,
    concurrency: usize,
    duration: Duration,
) -> Limit {
    let url = format!("{}/api/v1/portfolio", server.url);
    let http = http.clone();
    flat_out("limit: trivial GET handler", concurrency, duration, move |_| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let r = http.get(&url).bearer_auth("x").send().await?;
            anyhow::ensure!(r.status().is_success(), "answered {}", r.status());
            r.bytes().await?;
            Ok(())
        }
    })
    .await
}

/// The backbone limit: publish-with-ack of `payload` into a scratch stream, then delete it.
pub async fn jetstream_publish(
    nats_url: &str,
    payload: Vec<u8>,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Limit> {
    let client = async_nats::ConnectOptions::new().name("vault-loadgen").connect(nats_url).await?;
    let js = async_nats::jetstream::new(client);
    let run = Uuid::new_v4().simple().to_string();
    let name = format!("LOADGEN_{run}");
    let prefix = format!("loadgen.{run}");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![format!("{prefix}.>")],
        storage: async_nats::jetstream::stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    let payload = bytes::Bytes::from(payload);
    let limit = {
        let (js, prefix, payload) = (js.clone(), prefix.clone(), payload.clone());
        flat_out("limit: JetStream publish+ack", concurrency, duration, move |i| {
            let (js, payload) = (js.clone(), payload.clone());
            let subject = format!("{prefix}.{}", i % 16);
            async move {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", format!("{i:x}").as_str());
                js.publish_with_headers(subject, headers, payload).await?.await?;
                Ok(())
            }
        })
        .await
    };
    js.delete_stream(&name).await?;
    Ok(limit)
}

const SCRATCH_TABLES: [&str; 7] =
    ["portfolios", "applied_commands", "balances", "orders", "fills", "ledger_entries", "outbox"];

/// The storage limit: one market buy's intake row and engine commit, raw, per worker
/// on its own user; scratch schema dropped afterwards.
pub async fn postgres_commit(database_url: &str, concurrency: usize, duration: Duration) -> anyhow::Result<Limit> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(concurrency as u32 + 1)
        .connect(database_url)
        .await
        .context("connecting to DATABASE_URL")?;
    let schema = format!("loadgen_{}", Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&pool).await?;
    let result = async {
        for t in SCRATCH_TABLES {
            sqlx::query(&format!(
                "CREATE TABLE {schema}.{t} (LIKE public.{t} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES)"
            ))
            .execute(&pool)
            .await
            .with_context(|| format!("creating the scratch copy of {t} (is the database migrated?)"))?;
        }
        let users: Vec<Uuid> = (0..concurrency).map(|_| Uuid::new_v4()).collect();
        for u in &users {
            sqlx::query(&format!("INSERT INTO {schema}.portfolios (user_id, version) VALUES ($1, 1)"))
                .bind(u)
                .execute(&pool)
                .await?;
        }
        let versions = Arc::new(users.iter().map(|_| AtomicU64::new(1)).collect::<Vec<_>>());
        let (pool2, schema2, users) = (pool.clone(), schema.clone(), Arc::new(users));
        let limit = flat_out("limit: Postgres commit (1 buy)", concurrency, duration, move |i| {
            let (pool, schema, users, versions) = (pool2.clone(), schema2.clone(), users.clone(), versions.clone());
            async move {
                let w = (i >> 40) as usize;
                commit_one(&pool, &schema, users[w], &versions[w], i).await
            }
        })
        .await;
        anyhow::Ok(limit)
    }
    .await;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE")).execute(&pool).await?;
    pool.close().await;
    result
}

async fn commit_one(pool: &sqlx::PgPool, s: &str, user: Uuid, version: &AtomicU64, i: u64) -> anyhow::Result<()> {
    use rust_decimal::Decimal;
    let (price, qty, fee) = (Decimal::new(6_500_000, 2), Decimal::new(1, 4), Decimal::new(65, 4));
    let notional = price * qty;
    let order = Uuid::now_v7();
    // The intake row the API would have written (not part of the engine's commit).
    sqlx::query(&format!(
        "INSERT INTO {s}.orders (id, user_id, client_order_id, symbol, side, type, time_in_force, quantity, status)
         VALUES ($1, $2, $3, 'BTC-USD', 'buy', 'market', 'ioc', $4, 'pending')"
    ))
    .bind(order)
    .bind(user)
    .bind(format!("lg-{i}"))
    .bind(qty)
    .execute(pool)
    .await?;

    let v = version.load(Ordering::Relaxed) as i64;
    let mut tx = pool.begin().await?;
    sqlx::query(&format!(
        "INSERT INTO {s}.applied_commands (user_id, command_id, stream_seq, version) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING"
    ))
    .bind(user)
    .bind(format!("{user}:lg-{i}"))
    .bind(i as i64)
    .bind(v + 1)
    .execute(&mut *tx)
    .await?;
    let cas = sqlx::query(&format!(
        "UPDATE {s}.portfolios SET version = version + 1, updated_at = now() WHERE user_id = $1 AND version = $2"
    ))
    .bind(user)
    .bind(v)
    .execute(&mut *tx)
    .await?;
    anyhow::ensure!(cas.rows_affected() == 1, "version conflict");
    let _: Option<String> =
        sqlx::query_scalar(&format!("SELECT status FROM {s}.orders WHERE id = $1 AND user_id = $2 FOR UPDATE"))
            .bind(order)
            .bind(user)
            .fetch_optional(&mut *tx)
            .await?;
    sqlx::query(&format!(
        "UPDATE {s}.orders SET status = 'filled', filled_quantity = quantity, average_fill_price = $2, fee = $3,
                hold = 0, updated_at = now() WHERE id = $1"
    ))
    .bind(order)
    .bind(price)
    .bind(fee)
    .execute(&mut *tx)
    .await?;
    sqlx::query(&format!(
        "INSERT INTO {s}.fills (id, order_id, user_id, symbol, side, price, quantity, fee) VALUES ($1, $2, $3, 'BTC-USD', 'buy', $4, $5, $6)"
    ))
    .bind(Uuid::now_v7())
    .bind(order)
    .bind(user)
    .bind(price)
    .bind(qty)
    .bind(fee)
    .execute(&mut *tx)
    .await?;
    let tx_id = Uuid::now_v7();
    for (asset, amount, counter, kind) in
        [("USD", -notional, "house", "trade"), ("BTC", qty, "house", "trade"), ("USD", -fee, "fees", "fee")]
    {
        sqlx::query(&format!(
            "INSERT INTO {s}.ledger_entries (tx_id, account, user_id, asset, amount, balance_after, kind, order_id)
             VALUES ($1, 'user', $2, $3, $4, 0, $6, $7), ($1, $5, NULL, $3, -$4, NULL, $6, $7)"
        ))
        .bind(tx_id)
        .bind(user)
        .bind(asset)
        .bind(amount)
        .bind(counter)
        .bind(kind)
        .bind(order)
        .execute(&mut *tx)
        .await?;
    }
    for (asset, total) in [("USD", Decimal::new(1_000_000, 0)), ("BTC", qty)] {
        sqlx::query(&format!(
            "INSERT INTO {s}.balances (user_id, asset, total, reserved, cost_basis) VALUES ($1, $2, $3, 0, 0)
             ON CONFLICT (user_id, asset) DO UPDATE SET total = EXCLUDED.total, updated_at = now()"
        ))
        .bind(user)
        .bind(asset)
        .bind(total)
        .execute(&mut *tx)
        .await?;
    }
    let _: (Uuid, String) = sqlx::query_as(&format!("SELECT id, status FROM {s}.orders WHERE id = $1"))
        .bind(order)
        .fetch_one(&mut *tx)
        .await?;
    let _: Vec<(Uuid,)> = sqlx::query_as(&format!("SELECT id FROM {s}.fills WHERE order_id = $1"))
        .bind(order)
        .fetch_all(&mut *tx)
        .await?;
    sqlx::query(&format!("INSERT INTO {s}.outbox (id, subject, payload) VALUES ($1, $2, $3)"))
        .bind(Uuid::now_v7())
        .bind(format!("events.order.filled.{user}"))
        .bind(serde_json::json!({"v": 1, "order": ORDER_BODY}))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    version.fetch_add(1, Ordering::Relaxed);
    Ok(())
}
