//! The physical limits every stage is reported against, measured in the same run:
//!
//! - **HTTP floor**: a trivial axum handler in a child process (`vault-loadgen trivial-server`),
//!   driven by the same client with the same concurrency and the same request bodies. No real
//!   handler can beat it on this machine.
//! - **Backbone**: raw JetStream publish-with-ack of a real order command (the same bytes the API
//!   publishes, with a `Nats-Msg-Id`), into a scratch file-backed stream like `ORDERS`.
//! - **Storage**: the Postgres writes of market buys, raw, the way the engine's group commit
//!   writes them: the API's intake rows, then one transaction per batch of orders (of as many
//!   users) with multi-row statements — command keys, version compare-and-set and intake-row
//!   locks in one; order updates with their fills in one; ledger postings (three two-row
//!   postings per order), balances (two per order) and outbox rows in one; then the audit
//!   worker's rows for the order's messages (as many per order as the run published) in a
//!   transaction of their own. Measured with one
//!   order per transaction too (what each order cost alone), into scratch tables created `LIKE`
//!   the real ones (same columns, constraints and indexes; foreign keys are not copied, so this
//!   limit is slightly optimistic). Its rate is in orders per second.
//!
//! Each limit is measured closed-loop, flat out, with `concurrency` workers for `duration`, and
//! with the CPU it cost ([`crate::cpu`]): the time of the processes that serve it (the trivial
//! server; nats-server; the limit's Postgres backends and Postgres's own processes) per
//! operation, and the whole machine's (the generator's client side included). The served part is
//! what the real path cannot do with less: the API answers HTTP at least as the trivial handler
//! does, NATS stores each message the stack publishes at least as a bare publish costs, Postgres
//! writes at least these rows. Their sum per order ([`Floor`]) bounds the orders per second the
//! machine's cores could carry before any of the stack's own code runs.

use std::process::Stdio;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use tokio::io::AsyncBufReadExt;
use uuid::Uuid;

use crate::cpu;
use crate::report::{Latencies, summary};

/// A measured limit: operations per second, with the latency summary line, and the CPU it cost.
#[derive(Debug, Clone)]
pub struct Limit {
    pub rate: f64,
    pub line: String,
    /// Operations done (orders, for the storage limit).
    pub done: f64,
    /// CPU seconds of the processes that serve the limit, and of the whole machine.
    pub served_cpu: f64,
    pub machine_cpu: f64,
}

impl Limit {
    /// CPU of the serving processes per operation, in microseconds.
    pub fn served_us(&self) -> f64 {
        if self.done > 0.0 { self.served_cpu * 1e6 / self.done } else { f64::NAN }
    }

    /// Appends the CPU per `unit` to the line: `served` names the serving processes.
    fn with_cost(mut self, unit: &str, served: &str) -> Limit {
        let machine = if self.done > 0.0 { self.machine_cpu * 1e6 / self.done } else { f64::NAN };
        self.line.push_str(&format!(
            "; CPU per {unit}: {:.1} µs in {served}, {machine:.1} µs on the whole machine",
            self.served_us()
        ));
        self
    }
}

/// The processes that serve a limit: their CPU is its cost.
#[derive(Debug, Clone)]
pub enum Served {
    /// One process (the trivial server).
    Pid(u32),
    /// Every process of this name (nats-server).
    Name(&'static str),
    /// Postgres: the backends named [`LIMIT_APPLICATION`] and Postgres's own processes (the WAL
    /// writer, the checkpointer…), not the stack's backends. The pool names the backends.
    Postgres(sqlx::PgPool),
}

/// The `application_name` of the storage limit's connections.
const LIMIT_APPLICATION: &str = "vault-loadgen-limit";

impl Served {
    fn pool(&self) -> Option<&sqlx::PgPool> {
        match self {
            Served::Postgres(pool) => Some(pool),
            _ => None,
        }
    }

    fn picks(&self, pid: u32, name: &str) -> bool {
        match self {
            Served::Pid(p) => *p == pid,
            Served::Name(n) => name == *n,
            // Auxiliary processes are in `pg_stat_activity` without an application name; the
            // postmaster and the logger are not in it at all.
            Served::Postgres(_) => {
                name == "postgres" || name == "postgres[unnamed]" || name == format!("postgres[{LIMIT_APPLICATION}]")
            }
        }
    }
}

/// The CPU per order of what the real path cannot do with less, from the limits of one run.
#[derive(Debug, Clone, Copy)]
pub struct Floor {
    /// The trivial handler's server, per request.
    pub http_us: f64,
    /// nats-server per publish, and the messages the stack published per order.
    pub publish_us: f64,
    pub messages_per_order: f64,
    /// Postgres per order of the raw writes (batches of 64).
    pub storage_us: f64,
}

impl Floor {
    pub fn per_order_us(&self) -> f64 {
        self.http_us + self.publish_us * self.messages_per_order + self.storage_us
    }

    /// The lines that state the floor and the rate the machine's `cores` could carry at most.
    pub fn lines(&self, cores: f64, target: f64) -> Vec<String> {
        let per_order = self.per_order_us();
        let most = cores * 1e6 / per_order;
        vec![
            format!(
                "floor per order (the serving processes' CPU of the limits above): HTTP {:.1} µs + JetStream {:.1} µs × {:.2} messages + Postgres {:.1} µs = {per_order:.1} µs",
                self.http_us, self.publish_us, self.messages_per_order, self.storage_us
            ),
            format!(
                "  → at most {most:.0} orders/s on {cores} cores before any of the stack's own code runs (no handler, actor, worker, consumer delivery or ack, and no generator); {target:.0}/s needs {:.1} µs per order in all, the floor is {:.0} % of it",
                cores * 1e6 / target,
                per_order * 100.0 * target / (cores * 1e6)
            ),
        ]
    }
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
    pid: u32,
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
        let pid = child.id().context("the trivial server's pid")?;
        let stdout = child.stdout.take().context("trivial server stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .context("the trivial server did not start within 10 s")??
            .context("the trivial server exited")?;
        let addr = line.strip_prefix("listening on ").context("unexpected first line from the trivial server")?;
        Ok(TrivialServer { url: format!("http://{addr}"), pid, _child: child })
    }
}

/// Runs `op` closed-loop from `concurrency` workers for `duration`; returns its rate and line,
/// and the CPU `served` and the whole machine used meanwhile.
async fn flat_out<F, Fut>(name: &str, concurrency: usize, duration: Duration, served: &Served, op: F) -> Limit
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let latencies = Latencies::default();
    let mut cpu = cpu::Tracker::new(cpu::snapshot(served.pool()).await);
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
    cpu.observe(cpu::snapshot(served.pool()).await);
    let (served_cpu, machine_cpu) = cpu.used(|pid, name| served.picks(pid, name));
    let h = latencies.snapshot();
    let mut line = summary(name, &h, errors.load(Ordering::Relaxed), elapsed);
    if let Some(e) = first_error.lock().ok().and_then(|s| s.clone()) {
        line.push_str(&format!(" (first error: {e})"));
    }
    Limit { rate: h.len() as f64 / elapsed.as_secs_f64(), line, done: h.len() as f64, served_cpu, machine_cpu }
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
    let served = Served::Pid(server.pid);
    flat_out("limit: trivial POST handler", concurrency, duration, &served, move |_| {
        let (http, url, body) = (http.clone(), url.clone(), body.clone());
        async move {
            let r = http.post(&url).bearer_auth("x").json(&*body).send().await?;
            anyhow::ensure!(r.status() == StatusCode::ACCEPTED, "answered {}", r.status());
            r.bytes().await?;
            Ok(())
        }
    })
    .await
    .with_cost("request", "the trivial server")
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
    let served = Served::Pid(server.pid);
    flat_out("limit: trivial GET handler", concurrency, duration, &served, move |_| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let r = http.get(&url).bearer_auth("x").send().await?;
            anyhow::ensure!(r.status().is_success(), "answered {}", r.status());
            r.bytes().await?;
            Ok(())
        }
    })
    .await
    .with_cost("request", "the trivial server")
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
        flat_out("limit: JetStream publish+ack", concurrency, duration, &Served::Name("nats-server"), move |i| {
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
        .with_cost("publish", "nats-server")
    };
    js.delete_stream(&name).await?;
    Ok(limit)
}

const SCRATCH_TABLES: [&str; 8] =
    ["portfolios", "applied_commands", "balances", "orders", "fills", "ledger_entries", "outbox", "audit_log"];

/// Connections the storage limit leaves to others (the running stack may open a few more).
const FREE_CONNECTIONS_KEPT: i64 = 8;

/// The storage limit: market buys' intake rows and engine commits, raw, `batch` orders (of as
/// many users) per transaction, per worker on its own users, then `audit_rows` audit rows per
/// order in a transaction of their own (as the audit worker writes the stack's messages);
/// scratch schema dropped afterwards. The rate is in orders per second.
pub async fn postgres_commit(
    database_url: &str,
    concurrency: usize,
    duration: Duration,
    batch: usize,
    audit_rows: usize,
) -> anyhow::Result<Limit> {
    let options = sqlx::postgres::PgConnectOptions::from_str(database_url)
        .context("DATABASE_URL")?
        .application_name(LIMIT_APPLICATION);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(concurrency as u32 + 1)
        .connect_with(options)
        .await
        .context("connecting to DATABASE_URL")?;
    // Beside a running stack Postgres may not have a connection per worker left: workers
    // waiting for one would count as errors and the limit would measure the pool, not the writes.
    let free: i64 = sqlx::query_scalar(
        "SELECT current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int
                - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')",
    )
    .fetch_one(&pool)
    .await?;
    let workers = concurrency.min(usize::try_from(free - FREE_CONNECTIONS_KEPT).unwrap_or(0)).max(1);
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
        let users: Vec<Vec<Uuid>> = (0..workers).map(|_| (0..batch).map(|_| Uuid::new_v4()).collect()).collect();
        sqlx::query(&format!(
            "INSERT INTO {schema}.portfolios (user_id, version) SELECT u, 1 FROM UNNEST($1::uuid[]) AS u"
        ))
        .bind(users.iter().flatten().copied().collect::<Vec<_>>())
        .execute(&pool)
        .await?;
        let versions = Arc::new(users.iter().map(|_| AtomicU64::new(1)).collect::<Vec<_>>());
        let (pool2, schema2, users) = (pool.clone(), schema.clone(), Arc::new(users));
        let mut name = format!(
            "limit: Postgres commits ({batch} {} per transaction, {audit_rows} audit rows each)",
            if batch == 1 { "buy" } else { "buys" }
        );
        if workers < concurrency {
            name.push_str(&format!(" [{workers} workers: Postgres had {free} connections free]"));
        }
        let served = Served::Postgres(pool.clone());
        let mut limit = flat_out(&name, workers, duration, &served, move |i| {
            let (pool, schema, users, versions) = (pool2.clone(), schema2.clone(), users.clone(), versions.clone());
            async move {
                let w = (i >> 40) as usize;
                commit_batch(&pool, &schema, &users[w], &versions[w], i).await?;
                audit_batch(&pool, &schema, &users[w], audit_rows, i).await
            }
        })
        .await;
        limit.rate *= batch as f64;
        limit.done *= batch as f64;
        limit.line.push_str(&format!(" = {:.0} orders/s", limit.rate));
        anyhow::Ok(limit.with_cost("order", "Postgres"))
    }
    .await;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE")).execute(&pool).await?;
    pool.close().await;
    result
}

/// One market buy per user of `users`: the intake rows (one statement, as the API's batch would
/// be), then the engine's transaction in three multi-row statements.
async fn commit_batch(pool: &sqlx::PgPool, s: &str, users: &[Uuid], version: &AtomicU64, i: u64) -> anyhow::Result<()> {
    use rust_decimal::Decimal;
    let n = users.len();
    let (price, qty, fee) = (Decimal::new(6_500_000, 2), Decimal::new(1, 4), Decimal::new(65, 4));
    let notional = price * qty;
    let orders: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    let keys: Vec<String> = (0..n).map(|k| format!("lg-{i}-{k}")).collect();
    sqlx::query(&format!(
        "INSERT INTO {s}.orders (id, user_id, client_order_id, symbol, side, type, time_in_force, quantity, status)
         SELECT o, u, k, 'BTC-USD', 'buy', 'market', 'ioc', $4, 'pending' FROM UNNEST($1::uuid[], $2::uuid[], $3::text[]) AS x(o, u, k)"
    ))
    .bind(&orders)
    .bind(users)
    .bind(&keys)
    .bind(qty)
    .execute(pool)
    .await?;

    let v = version.load(Ordering::Relaxed) as i64;
    let mut tx = pool.begin().await?;
    let claimed: i64 = sqlx::query_scalar(&format!(
        "WITH i AS (SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::uuid[]) AS i(user_id, key, order_id)),
         cmd AS (INSERT INTO {s}.applied_commands (user_id, command_id, stream_seq, version)
                 SELECT user_id, key, $4, $5 + 1 FROM i ON CONFLICT DO NOTHING RETURNING user_id),
         cas AS (UPDATE {s}.portfolios p SET version = p.version + 1, updated_at = now()
                   FROM cmd WHERE p.user_id = cmd.user_id AND p.version = $5 RETURNING p.user_id)
         SELECT (SELECT count(*) FROM cas)
                + 0 * (SELECT count(*) FROM (SELECT status FROM {s}.orders WHERE id IN (SELECT order_id FROM i) FOR UPDATE) l)"
    ))
    .bind(users)
    .bind(&keys)
    .bind(&orders)
    .bind(i as i64)
    .bind(v)
    .fetch_one(&mut *tx)
    .await?;
    anyhow::ensure!(claimed == n as i64, "version conflict");
    let fills: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    let filled: i64 = sqlx::query_scalar(&format!(
        "WITH u AS (SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[]) AS u(order_id, fill_id, user_id)),
         o AS (UPDATE {s}.orders SET status = 'filled', filled_quantity = quantity, average_fill_price = $4, fee = $5,
                      hold = 0, updated_at = now() FROM u WHERE {s}.orders.id = u.order_id RETURNING {s}.orders.id),
         f AS (INSERT INTO {s}.fills (id, order_id, user_id, symbol, side, price, quantity, fee)
               SELECT fill_id, order_id, user_id, 'BTC-USD', 'buy', $4, $6, $5 FROM u RETURNING order_id)
         SELECT count(*) FROM o JOIN f ON f.order_id = o.id"
    ))
    .bind(&orders)
    .bind(&fills)
    .bind(users)
    .bind(price)
    .bind(fee)
    .bind(qty)
    .fetch_one(&mut *tx)
    .await?;
    anyhow::ensure!(filled == n as i64, "not every order filled");
    // Three postings per order (trade USD, trade BTC, fee), each a user entry and its counter.
    let (mut p_user, mut p_tx, mut p_asset, mut p_amount, mut p_counter, mut p_kind, mut p_order) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for (user, order) in users.iter().zip(&orders) {
        let tx_id = Uuid::now_v7();
        for (asset, amount, counter, kind) in
            [("USD", -notional, "house", "trade"), ("BTC", qty, "house", "trade"), ("USD", -fee, "fees", "fee")]
        {
            p_user.push(*user);
            p_tx.push(tx_id);
            p_asset.push(asset);
            p_amount.push(amount);
            p_counter.push(counter);
            p_kind.push(kind);
            p_order.push(*order);
        }
    }
    let b_user: Vec<Uuid> = users.iter().flat_map(|u| [*u, *u]).collect();
    let b_asset: Vec<&str> = users.iter().flat_map(|_| ["USD", "BTC"]).collect();
    let b_total: Vec<Decimal> = users.iter().flat_map(|_| [Decimal::new(1_000_000, 0), qty]).collect();
    let outbox: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    let subjects: Vec<String> = users.iter().map(|u| format!("events.order.filled.{u}")).collect();
    let payload = serde_json::json!({"v": 1, "order": ORDER_BODY}).to_string();
    sqlx::query(&format!(
        "WITH ledger AS (
             INSERT INTO {s}.ledger_entries (tx_id, account, user_id, asset, amount, balance_after, kind, order_id)
             SELECT p.tx_id, e.account, CASE WHEN e.side = 0 THEN p.user_id END, p.asset,
                    CASE WHEN e.side = 0 THEN p.amount ELSE -p.amount END, CASE WHEN e.side = 0 THEN 0 END,
                    p.kind, p.order_id
               FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::numeric[], $5::text[], $6::text[], $7::uuid[])
                    WITH ORDINALITY AS p(user_id, tx_id, asset, amount, counter, kind, order_id, n)
              CROSS JOIN LATERAL (VALUES ('user', 0), (p.counter, 1)) AS e(account, side)
              ORDER BY p.n, e.side
         ), balance AS (
             INSERT INTO {s}.balances (user_id, asset, total, reserved, cost_basis)
             SELECT b.user_id, b.asset, b.total, 0, 0 FROM UNNEST($8::uuid[], $9::text[], $10::numeric[]) AS b(user_id, asset, total)
             ON CONFLICT (user_id, asset) DO UPDATE SET total = EXCLUDED.total, updated_at = now()
         )
         INSERT INTO {s}.outbox (id, subject, payload)
         SELECT o.id, o.subject, $13::jsonb FROM UNNEST($11::uuid[], $12::text[]) AS o(id, subject)"
    ))
    .bind(&p_user)
    .bind(&p_tx)
    .bind(&p_asset)
    .bind(&p_amount)
    .bind(&p_counter)
    .bind(&p_kind)
    .bind(&p_order)
    .bind(&b_user)
    .bind(&b_asset)
    .bind(&b_total)
    .bind(&outbox)
    .bind(&subjects)
    .bind(&payload)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    version.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// `rows` audit rows for each user of `users` (one order each), in one transaction, as the audit
/// worker writes a batch of the stack's messages: a row per message, chained by hashes (random
/// here: the hashing is the worker's CPU, not Postgres's), ids and sequences unique per `i`.
async fn audit_batch(pool: &sqlx::PgPool, s: &str, users: &[Uuid], rows: usize, i: u64) -> anyhow::Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let n = users.len() * rows;
    let first = i64::try_from(i)? * n as i64;
    let ids: Vec<i64> = (first..first + n as i64).collect();
    let actors: Vec<Uuid> = users.iter().flat_map(|u| std::iter::repeat_n(*u, rows)).collect();
    let subjects: Vec<String> = actors.iter().map(|u| format!("events.order.filled.{u}")).collect();
    let hash = || -> Vec<u8> { [Uuid::new_v4().into_bytes(), Uuid::new_v4().into_bytes()].concat() };
    let hashes: Vec<Vec<u8>> = (0..=n).map(|_| hash()).collect();
    let payload = serde_json::json!({"v": 1, "order": ORDER_BODY}).to_string();
    let mut tx = pool.begin().await?;
    sqlx::query(&format!(
        "INSERT INTO {s}.audit_log (id, stream, stream_seq, at, actor_id, action, subject, request_id, data, prev_hash, hash)
         SELECT id, 'LOADGEN', id, now(), actor, 'order.filled', subject, 'lg', $4::jsonb, prev, hash
           FROM UNNEST($1::int8[], $2::uuid[], $3::text[], $5::bytea[], $6::bytea[]) AS r(id, actor, subject, prev, hash)"
    ))
    .bind(&ids)
    .bind(&actors)
    .bind(&subjects)
    .bind(&payload)
    .bind(&hashes[..n])
    .bind(&hashes[1..])
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_adds_the_served_costs_per_order_and_bounds_the_rate_by_the_cores() {
        let floor = Floor { http_us: 10.0, publish_us: 15.0, messages_per_order: 2.0, storage_us: 260.0 };
        assert_eq!(floor.per_order_us(), 300.0);
        let lines = floor.lines(2.0, 5_000.0);
        assert!(lines[0].ends_with("= 300.0 µs"), "{lines:?}");
        assert!(lines[1].contains("at most 6667 orders/s on 2 cores"), "{lines:?}");
        assert!(lines[1].contains("needs 400.0 µs per order") && lines[1].contains("75 % of it"), "{lines:?}");
    }

    #[tokio::test]
    async fn postgres_is_its_own_processes_and_the_limits_backends_not_the_stacks() {
        let pool = sqlx::postgres::PgPoolOptions::new().connect_lazy("postgres://localhost/x").expect("a lazy pool");
        let served = Served::Postgres(pool);
        for name in ["postgres", "postgres[unnamed]", "postgres[vault-loadgen-limit]"] {
            assert!(served.picks(1, name), "{name}");
        }
        for name in ["postgres[vault-engine]", "postgres[vault-api]", "vault-loadgen"] {
            assert!(!served.picks(1, name), "{name}");
        }
        assert!(Served::Pid(7).picks(7, "vault-loadgen") && !Served::Pid(7).picks(8, "vault-loadgen"));
    }
}
