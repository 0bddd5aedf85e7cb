//! Postgres cut off for 20 s, without touching the shared server: the API and the engine reach
//! Postgres through a TCP proxy this test controls. While it is cut, `/readyz` answers 503
//! naming Postgres, the API refuses what needs the database with 503 and keeps answering what
//! does not (health, tickers), and the engine stops acking: a command that arrives meanwhile
//! stays on the stream. Once the proxy forwards again, everything heals without a restart, the
//! waiting command is applied exactly once, and `vault-engine reconcile` finds the books clean.
//! And every process (API, engine, the three workers) asked to stop during an outage stops with
//! exit code 0 within seconds, whether Postgres refuses connections or stops answering — with
//! a command, ticks and poisoned messages in hand — or waits on a lock while a message is parked.
//! The same proxy in front of NATS holds the API's publishes unanswered, so that requests can
//! leave between their intake row's insert and their publish's answer.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{Value, json};
use support::Api;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use uuid::Uuid;
use vault_bus::message::{AuthEvent, AuthEventKind, CommandBody, OrderCommand, PriceTick};
use vault_bus::{Bus, MessageContext, subjects};
use vault_core::domain::{OrderType, Positive, Side, Symbol, TimeInForce};
use vault_testkit::{
    NatsServer, Proc, READY_DEADLINE, TestDb, assert_reconciled, base_env, free_port, http_client, insert_deposit_row,
    insert_due_delivery, insert_webhook, poll_until, scrape_metric, workspace_binary,
};

const WAIT: Duration = Duration::from_secs(30);
const OUTAGE: Duration = Duration::from_secs(20);

/// A TCP proxy to Postgres that can be cut: every open connection is dropped at once and new
/// ones are closed as soon as they are accepted, until it is restored. It can also go silent
/// ([`Proxy::stall`]): connections stay open and nothing crosses them either way, as behind a
/// network partition that drops packets rather than refusing them; silence the connections open
/// now for good ([`Proxy::blackhole`]), or only their answers ([`Proxy::deafen`]).
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    stalled: tokio::sync::watch::Sender<bool>,
    /// Connections accepted before this many were accepted in all, but the one spared, are
    /// silenced for good ([`Proxy::blackhole`]).
    silenced_below: tokio::sync::watch::Sender<Quiet>,
    /// Connections accepted before this many were accepted in all pass what the client sends,
    /// never what the server answers ([`Proxy::deafen`]).
    deaf_below: tokio::sync::watch::Sender<Quiet>,
    /// Each connection's number, by the local port of its connection to Postgres (the
    /// `client_port` Postgres sees).
    numbers: Arc<Mutex<std::collections::HashMap<u16, u64>>>,
    accepted: Arc<std::sync::atomic::AtomicU64>,
    open: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

/// Which connections are quiet: those numbered below the first, except the one numbered the
/// second.
type Quiet = (u64, Option<u64>);

/// Copies `from` to `to`, holding what it read while `stalled`, and for good once connection
/// number `nth` is quiet by either of `silenced_below`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: tokio::sync::watch::Receiver<bool>,
    [mut silenced_below, mut deaf_below]: [tokio::sync::watch::Receiver<Quiet>; 2],
    nth: u64,
) {
    let quiet = |(below, spared): Quiet| nth < below && spared != Some(nth);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stalled.wait_for(|stalled| !*stalled).await.is_err() {
            return;
        }
        if quiet(*silenced_below.borrow_and_update()) || quiet(*deaf_below.borrow_and_update()) {
            // Open, and nothing crosses it ever again (until the proxy drops it).
            let _ = silenced_below.wait_for(|_| false).await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
        let port = listener.local_addr().expect("addr").port();
        let cut = Arc::new(AtomicBool::new(false));
        let stalled = tokio::sync::watch::Sender::new(false);
        let silenced_below = tokio::sync::watch::Sender::new((0, None));
        let deaf_below = tokio::sync::watch::Sender::new((0, None));
        let numbers: Arc<Mutex<std::collections::HashMap<u16, u64>>> = Arc::default();
        let numbered = numbers.clone();
        let open: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (cut2, stalled2, open2) = (cut.clone(), stalled.clone(), open.clone());
        let (silenced2, deaf2) = (silenced_below.clone(), deaf_below.clone());
        let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let accepted_count = accepted.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else { continue };
                if cut2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let nth = accepted.fetch_add(1, Ordering::SeqCst);
                let (upstream, stalled) = (upstream.clone(), stalled2.subscribe());
                let (silenced, deaf) = (silenced2.subscribe(), deaf2.subscribe());
                let numbered = numbered.clone();
                let task = tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(&upstream).await {
                        if let Ok(local) = outbound.local_addr() {
                            numbered.lock().expect("lock").insert(local.port(), nth);
                        }
                        let (from_client, to_client) = inbound.into_split();
                        let (from_server, to_server) = outbound.into_split();
                        tokio::select! {
                            () = pump(from_client, to_server, stalled.clone(), [silenced.clone(), silenced.clone()], nth) => {}
                            () = pump(from_server, to_client, stalled, [silenced, deaf], nth) => {}
                        }
                    }
                });
                open2.lock().expect("lock").push(task.abort_handle());
            }
        })
        .abort_handle();
        Proxy { port, cut, stalled, silenced_below, deaf_below, numbers, open, accept, accepted: accepted_count }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for task in self.open.lock().expect("lock").drain(..) {
            task.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// Ends a [`Proxy::stall`]: what was held goes on, in order.
    fn resume(&self) {
        self.stalled.send_replace(false);
    }

    /// Every connection open now goes silent for good — nothing crosses it either way, and it
    /// stays open, as when the database's host vanishes mid-statement — while new connections
    /// pass as before.
    fn blackhole(&self) {
        self.silenced_below.send_replace((self.accepted.load(Ordering::SeqCst), None));
    }

    /// As [`Proxy::blackhole`], but the connection Postgres sees coming from `client_port`
    /// passes as before.
    fn blackhole_all_but(&self, client_port: u16) {
        let spared = *self.numbers.lock().expect("lock").get(&client_port).expect("a connection of this proxy");
        self.silenced_below.send_replace((self.accepted.load(Ordering::SeqCst), Some(spared)));
    }

    /// Every connection open now carries what its client sends, and nothing of what the server
    /// answers, for good — statements run and commit, their answers never come — while new
    /// connections pass as before.
    fn deafen(&self) {
        self.deaf_below.send_replace((self.accepted.load(Ordering::SeqCst), None));
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// `url` with its host:port replaced by the proxy's.
fn through(url: &str, port: u16) -> (String, String) {
    let (scheme_auth, rest) = url.split_once('@').expect("a URL with credentials");
    let (host_port, path) = rest.split_once('/').expect("a URL with a database");
    (format!("{scheme_auth}@127.0.0.1:{port}/{path}"), host_port.to_owned())
}

/// The command the API publishes for a market buy of 0.01 BTC.
fn market_buy(user_id: Uuid, order_id: Uuid, client_order_id: String) -> OrderCommand {
    OrderCommand {
        user_id,
        request_id: None,
        at: Utc::now(),
        body: CommandBody::Place {
            order_id,
            client_order_id,
            symbol: Symbol::parse("BTC-USD").expect("symbol"),
            side: Side::Buy,
            order_type: OrderType::Market,
            time_in_force: TimeInForce::Ioc,
            quantity: Positive::new("0.01".parse().expect("decimal")).expect("positive"),
            limit_price: None,
        },
    }
}

/// A NATS server, a migrated database, a proxy in front of it, and the base environment with
/// `DATABASE_URL` pointing through the proxy.
async fn behind_a_proxy() -> (NatsServer, TestDb, Proxy, Vec<(&'static str, String)>) {
    let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let (_, upstream) = through(&db.url, 0);
    let proxy = Proxy::start(upstream).await;
    let (proxied, _) = through(&db.url, proxy.port);
    let envs = with(base_env(&db, &nats), "DATABASE_URL", proxied);
    (nats, db, proxy, envs)
}

/// `envs` with `key` set to `value` (replaced if present).
fn with(
    mut envs: Vec<(&'static str, String)>,
    key: &'static str,
    value: impl Into<String>,
) -> Vec<(&'static str, String)> {
    envs.retain(|(k, _)| *k != key);
    envs.push((key, value.into()));
    envs
}

/// A `users` row the foreign keys need (no real password).
async fn insert_user(pool: &sqlx::PgPool) -> Uuid {
    let user = Uuid::now_v7();
    sqlx::query("INSERT INTO users (id, email, password_hash) VALUES ($1, $2, '$argon2id$test')")
        .bind(user)
        .bind(format!("u{}@example.com", user.simple()))
        .execute(pool)
        .await
        .expect("user");
    user
}

/// Runs `send` every `every` until the returned token is cancelled; the task answers how many
/// times it ran.
fn steadily<F, Fut>(every: Duration, mut send: F) -> (tokio_util::sync::CancellationToken, tokio::task::JoinHandle<i64>)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut sent = 0;
            while !stop.is_cancelled() {
                send().await;
                sent += 1;
                tokio::time::sleep(every).await;
            }
            sent
        }
    });
    (stop, task)
}

/// Deposits of 1 USD to `user` every 50 ms, each as the API makes it: the row, then the
/// command; the task answers how many it sent.
fn deposits_steadily(
    bus: &Bus,
    direct: &sqlx::PgPool,
    user: Uuid,
) -> (tokio_util::sync::CancellationToken, tokio::task::JoinHandle<i64>) {
    steadily(Duration::from_millis(50), {
        let (bus, direct) = (bus.clone(), direct.clone());
        move || {
            let (bus, direct) = (bus.clone(), direct.clone());
            async move {
                let (id, client_deposit_id) = insert_deposit_row(&direct, user, "USD", "1").await;
                let command = OrderCommand {
                    user_id: user,
                    request_id: None,
                    at: Utc::now(),
                    body: CommandBody::Deposit {
                        deposit_id: id,
                        client_deposit_id,
                        asset: vault_core::domain::Asset::parse("USD").expect("asset"),
                        amount: Positive::new(1.into()).expect("positive"),
                    },
                };
                bus.publish(&command, &MessageContext::default()).await.expect("published");
            }
        }
    })
}

async fn completed_deposits(direct: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM deposits WHERE status = 'completed'")
        .fetch_one(direct)
        .await
        .expect("count")
}

/// Waits until every one of `sent` deposits is completed and the user's USD total is `sent`
/// (each applied exactly once), within `deadline`.
async fn every_deposit_applied_once(direct: &sqlx::PgPool, user: Uuid, sent: i64, deadline: Duration, engine: &Proc) {
    let until = Instant::now() + deadline;
    while completed_deposits(direct).await != sent {
        assert!(
            Instant::now() < until,
            "{} of {sent} deposits applied after {deadline:?}; the engine:\n{}",
            completed_deposits(direct).await,
            engine.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total: rust_decimal::Decimal =
        sqlx::query_scalar("SELECT total FROM balances WHERE user_id = $1 AND asset = 'USD'")
            .bind(user)
            .fetch_one(direct)
            .await
            .expect("balance");
    assert_eq!(total, rust_decimal::Decimal::from(sent), "each deposit applied once");
}

/// The API serving with `envs` (and an address of its own), ready.
async fn serve_api(envs: &[(&'static str, String)], db: TestDb, nats: NatsServer) -> Api {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut proc = Proc::spawn(support::BIN, &["serve"], &with(envs.to_vec(), "API_ADDR", addr.clone()));
    proc.wait_http_status(&addr, "/readyz", 200, READY_DEADLINE).await;
    Api { proc, addr, client: http_client(), db, nats }
}

/// A user signed up through `api`, BTC-USD priced at 50,000, and `usd` deposited and applied:
/// the user's id and access token.
async fn funded_trader(api: &Api, bus: &Bus, direct: &sqlx::PgPool, usd: &str) -> (Uuid, String) {
    let email = format!("trader-{}@example.com", Uuid::now_v7().simple());
    let user: Uuid = api.signup(&email).await["id"].as_str().expect("user id").parse().expect("uuid");
    let token = api.tokens(&email).await["access_token"].as_str().expect("token").to_owned();
    let tick = PriceTick {
        symbol: Symbol::parse("BTC-USD").expect("symbol"),
        price: Positive::new(50_000.into()).expect("positive"),
        ts: Utc::now(),
        source: "test".into(),
        seq: 1,
    };
    bus.publish(&tick, &MessageContext::default()).await.expect("tick");
    let deposit = api.post("/account/deposits", Some(&token), json!({"asset": "USD", "amount": usd})).await;
    assert_eq!(deposit.status(), 202);
    poll_until(WAIT, "the deposit to complete", || async {
        let status: String = sqlx::query_scalar("SELECT status FROM deposits WHERE user_id = $1")
            .bind(user)
            .fetch_one(direct)
            .await
            .ok()?;
        (status == "completed").then_some(())
    })
    .await;
    (user, token)
}

async fn status(client: &reqwest::Client, url: &str) -> u16 {
    client.get(url).send().await.map(|r| r.status().as_u16()).unwrap_or(0)
}

#[tokio::test]
async fn a_twenty_second_postgres_outage_is_reported_refused_where_needed_and_healed_without_a_restart() {
    let (nats, db, proxy, envs) = behind_a_proxy().await;
    // The one price of this test must still be fresh when the order waiting out the outage is
    // finally applied.
    let engine_envs = with(envs.clone(), "MAX_PRICE_AGE", "300");
    let api = serve_api(&envs, db, nats).await;
    let api_addr = api.addr.clone();
    let (mut engine, engine_ops) = Proc::start_ready(&workspace_binary("vault-engine"), &[], &engine_envs).await;
    let direct = api.db.pool().await;
    let bus = Bus::connect(&api.nats.url(), "outage-test").await.expect("connects");
    // Before: a funded user with a price.
    let (user, token) = funded_trader(&api, &bus, &direct, "10000").await;

    // The outage.
    let client = http_client();
    proxy.cut();
    let cut_at = Instant::now();
    for addr in [&api_addr, &engine_ops] {
        poll_until(WAIT, "/readyz to turn 503 naming postgres", || async {
            let r = client.get(format!("http://{addr}/readyz")).send().await.ok()?;
            let code = r.status().as_u16();
            let body: Value = r.json().await.ok()?;
            (code == 503 && body["checks"]["postgres"] != "ok").then_some(())
        })
        .await;
    }
    // What needs the database is refused with 503 (Retry-After), and changes nothing...
    let refused = api
        .post(
            "/orders",
            Some(&token),
            json!({"symbol": "BTC-USD", "side": "buy", "type": "market", "quantity": "0.01"}),
        )
        .await;
    assert_eq!(refused.status(), 503);
    // The answer says what is away, never how: no SQL, driver, pool or socket detail.
    let body = refused.text().await.expect("a body");
    let lowered = body.to_lowercase();
    for internal in ["sqlx", "pool", "postgres", "connection refused", "select", "insert", "os error", "5432"] {
        assert!(!lowered.contains(internal), "the 503 leaks {internal:?}: {body}");
    }
    // ...what does not is served as usual.
    assert_eq!(status(&client, &format!("http://{api_addr}/health")).await, 200);
    assert_eq!(status(&client, &api.url("/markets/BTC-USD/ticker")).await, 200);
    assert_eq!(status(&client, &format!("http://{engine_ops}/health")).await, 200);

    // A command that reaches the engine meanwhile (its intake row written directly, as an API
    // replica that still reached Postgres would) cannot be committed, so it is not acked.
    let order_id = Uuid::now_v7();
    let client_id = format!("c-{}", order_id.simple());
    sqlx::query(
        "INSERT INTO orders (id, user_id, client_order_id, symbol, side, type, time_in_force, quantity, status)
         VALUES ($1, $2, $3, 'BTC-USD', 'buy', 'market', 'ioc', 0.01, 'pending')",
    )
    .bind(order_id)
    .bind(user)
    .bind(&client_id)
    .execute(&direct)
    .await
    .expect("intake row");
    bus.publish(&market_buy(user, order_id, client_id), &MessageContext::default()).await.expect("published");
    let status_of = || async {
        sqlx::query_scalar::<_, String>("SELECT status FROM orders WHERE id = $1")
            .bind(order_id)
            .fetch_one(&direct)
            .await
            .expect("status")
    };
    while cut_at.elapsed() < OUTAGE {
        assert_eq!(status_of().await, "pending", "the engine decided an order while Postgres was cut");
        assert!(engine.is_running(), "the engine died during the outage:\n{}", engine.output());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Healing, without restarting anything.
    proxy.restore();
    for addr in [&api_addr, &engine_ops] {
        poll_until(WAIT, "/readyz to be 200 again", || async {
            (status(&client, &format!("http://{addr}/readyz")).await == 200).then_some(())
        })
        .await;
    }
    poll_until(WAIT, "the order sent during the outage to be decided", || async {
        (status_of().await == "filled").then_some(())
    })
    .await;
    let fills: i64 = sqlx::query_scalar("SELECT count(*) FROM fills WHERE order_id = $1")
        .bind(order_id)
        .fetch_one(&direct)
        .await
        .expect("fills");
    assert_eq!(fills, 1, "the waiting command must be applied exactly once");
    let placed = api
        .post(
            "/orders",
            Some(&token),
            json!({"symbol": "BTC-USD", "side": "buy", "type": "market", "quantity": "0.01"}),
        )
        .await;
    assert_eq!(placed.status(), 202, "the API takes orders again");
    let placed: Value = placed.json().await.expect("order");
    let id = placed["id"].as_str().expect("id").to_owned();
    poll_until(WAIT, "the new order to be decided", || async {
        let o: Value = api.get(&format!("/orders/{id}"), Some(&token)).await.json().await.ok()?;
        (o["status"] == "filled").then_some(())
    })
    .await;
    assert!(engine.is_running());
    engine.signal("TERM");
    assert!(engine.wait_exit(Duration::from_secs(30)).await.success(), "{}", engine.output());
    assert_reconciled(&workspace_binary("vault-engine"), &api.db).await;
    println!(
        "postgres outage: {}s cut, 1 order waited on the stream and filled once, reconcile clean",
        OUTAGE.as_secs()
    );
}

/// Asked to stop while Postgres is unreachable, every process stops, with exit code 0 and soon:
/// nothing on its way out waits for the database to come back — whether its connections were
/// refused (`cut`) or went silent (`stall`, a partition that drops packets; `silent`: then the
/// audit worker is known to hold a command it cannot write when the signal comes).
async fn every_process_stops_on_sigterm_while_postgres(fail: fn(&Proxy), silent: bool) {
    let (nats, _db, proxy, envs) = behind_a_proxy().await;
    let envs = with(envs, "PRICE_SOURCE", "none");

    let api_addr = format!("127.0.0.1:{}", free_port());
    let mut api_envs = envs.clone();
    api_envs.push(("API_ADDR", api_addr.clone()));
    let mut api = Proc::spawn(support::BIN, &["serve"], &api_envs);
    api.wait_http_status(&api_addr, "/readyz", 200, READY_DEADLINE).await;
    let mut processes = vec![("api", api, api_addr)];
    let (engine, ops) = Proc::start_ready(&workspace_binary("vault-engine"), &[], &envs).await;
    processes.push(("engine", engine, ops));
    // The prices worker ticks (simulated), so it has candles to write every second while the
    // database does not answer.
    let price_envs = with(envs.clone(), "PRICE_SOURCE", "sim");
    for role in ["prices", "audit", "notify"] {
        let role_envs = if role == "prices" { &price_envs } else { &envs };
        let (worker, ops) = Proc::start_ready(&workspace_binary("vault-worker"), &[role], role_envs).await;
        processes.push((role, worker, ops));
    }

    fail(&proxy);
    for (_, process, addr) in &mut processes {
        process.wait_http_status(addr, "/readyz", 503, WAIT).await;
    }
    // Work in hand when the signal comes: a command the engine and the audit worker have pulled
    // and cannot write.
    let bus = Bus::connect(&nats.url(), "outage-test").await.expect("connects");
    let order_id = Uuid::now_v7();
    let command = market_buy(Uuid::now_v7(), order_id, format!("c-{}", order_id.simple()));
    bus.publish(&command, &MessageContext::default()).await.expect("published");
    if silent {
        // And poison in hand: messages nobody can decode, which each consumer parks — a write
        // too, and one that must not hold the exit either. The command goes to a user of another
        // partition, so the engine holds both at once.
        let poisoned = std::iter::repeat_with(Uuid::now_v7)
            .find(|u| subjects::partition_of(*u) != subjects::partition_of(command.user_id))
            .expect("a user of another partition");
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
        for (subject, garbage) in
            [(subjects::order_command(poisoned), "{not a command"), (subjects::auth("poison"), "{not an event")]
        {
            js.publish(subject, garbage.into()).await.expect("send").await.expect("ack");
        }
        let engine = format!("engine-p{:02}", subjects::partition_of(poisoned));
        for (stream, consumer, holds) in [
            ("ORDERS", "audit-orders", 2),
            ("ORDERS", engine.as_str(), 1),
            ("AUTH", "audit-auth", 1),
            ("AUTH", "notify-auth", 1),
        ] {
            let stream = js.get_stream(stream).await.expect("stream");
            poll_until(WAIT, &format!("{consumer} to hold {holds} messages"), || async {
                let info = stream.consumer_info(consumer).await.ok()?;
                (info.num_ack_pending >= holds).then_some(())
            })
            .await;
        }
    }
    for (_, process, _) in &processes {
        process.signal("TERM");
    }
    for (name, process, _) in &mut processes {
        // Within the deployments' 40 s termination grace (each bounded wait is 5 s or less;
        // a loaded machine adds to their sum, a hang never ends).
        let status = process.wait_exit(Duration::from_secs(30)).await;
        assert_eq!(status.code(), Some(0), "{name} did not stop cleanly:\n{}", process.output());
    }
}

#[tokio::test]
async fn every_process_stops_on_sigterm_while_postgres_refuses_connections() {
    every_process_stops_on_sigterm_while_postgres(Proxy::cut, false).await;
}

#[tokio::test]
async fn every_process_stops_on_sigterm_while_postgres_does_not_answer() {
    every_process_stops_on_sigterm_while_postgres(Proxy::stall, true).await;
}

/// Parking a poisoned message is a write too, and consumers park inline, between pulls: with
/// `parked_messages` locked and a poisoned message in the hands of the engine, the audit worker
/// and the notifier, each of them still stops on SIGTERM (each parking wait is bounded).
/// Asked to stop while start-up still waits for its database or its NATS server (start-up
/// retries each for about a minute), every process stops at once, with exit code 0.
#[tokio::test]
async fn every_process_stops_on_sigterm_while_it_waits_for_postgres_or_nats_at_start() {
    let (nats, db, proxy, envs) = behind_a_proxy().await;
    proxy.cut();
    let unreachable_nats = format!("nats://127.0.0.1:{}", free_port());
    for (missing, envs, waiting) in [
        ("postgres", envs.clone(), "postgres not reachable yet"),
        ("nats", with(base_env(&db, &nats), "NATS_URL", unreachable_nats), "nats not reachable yet"),
    ] {
        let envs = with(with(envs, "PRICE_SOURCE", "none"), "API_ADDR", format!("127.0.0.1:{}", free_port()));
        let mut processes = vec![("api", Proc::spawn(support::BIN, &["serve"], &envs))];
        processes.push(("engine", Proc::spawn(&workspace_binary("vault-engine"), &[], &envs)));
        for role in ["prices", "audit", "notify"] {
            processes.push((role, Proc::spawn(&workspace_binary("vault-worker"), &[role], &envs)));
        }
        for (name, process) in &processes {
            poll_until(WAIT, &format!("{name} to wait for {missing}"), || async {
                process.output().contains(waiting).then_some(())
            })
            .await;
        }
        for (_, process) in &processes {
            process.signal("TERM");
        }
        for (name, process) in &mut processes {
            let status = process.wait_exit(Duration::from_secs(10)).await;
            assert_eq!(status.code(), Some(0), "{name}, waiting for {missing}, did not stop:\n{}", process.output());
        }
    }
}

#[tokio::test]
async fn every_consumer_stops_on_sigterm_while_parking_a_message_waits_on_a_lock() {
    let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let mut envs = base_env(&db, &nats);
    envs.push(("PRICE_SOURCE", "none".to_owned()));
    let (engine, _) = Proc::start_ready(&workspace_binary("vault-engine"), &[], &envs).await;
    let mut processes = vec![("engine", engine)];
    for role in ["audit", "notify"] {
        let (worker, _) = Proc::start_ready(&workspace_binary("vault-worker"), &[role], &envs).await;
        processes.push((role, worker));
    }

    let pool = db.pool().await;
    let mut lock = pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE parked_messages IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.expect("lock");
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    for (subject, garbage) in
        [(subjects::order_command(Uuid::now_v7()), "{not a command"), (subjects::auth("poison"), "{not an event")]
    {
        js.publish(subject, garbage.into()).await.expect("send").await.expect("ack");
    }
    // The engine (the command), the audit worker (one of the two) and the notifier (the event).
    vault_testkit::wait_for_lock_waits(&pool, "%INSERT INTO parked_messages%", 3, WAIT).await;
    for (_, process) in &processes {
        process.signal("TERM");
    }
    for (name, process) in &mut processes {
        // Within the deployments' 40 s termination grace (each bounded wait is 5 s or less;
        // a loaded machine adds to their sum, a hang never ends).
        let status = process.wait_exit(Duration::from_secs(30)).await;
        assert_eq!(status.code(), Some(0), "{name} did not stop cleanly:\n{}", process.output());
    }
    lock.rollback().await.expect("rollback");
}

/// Postgres's host vanishes mid-statement: the connections open at that moment never answer
/// again (nor close), new ones work. Consumers and the price loop must not wait on such a write
/// for ever: the audit worker gives the batch up, its messages come back and are recorded once
/// (the chain lock the silent session held goes with it) and its scheduled walks of the chain
/// go on finishing, the prices worker drops the candles in flight and goes on publishing ticks,
/// and the notifier goes on delivering webhooks.
#[tokio::test]
async fn writes_on_connections_that_go_silent_for_good_are_given_up_and_the_work_goes_on() {
    let (nats, db, proxy, envs) = behind_a_proxy().await;
    let envs =
        with(with(with(envs, "PRICE_SOURCE", "sim"), "WEBHOOK_ALLOW_PRIVATE", "true"), "AUDIT_VERIFY_EVERY", "1");
    let mut workers = Vec::new();
    let mut audit_ops = String::new();
    for role in ["audit", "prices", "notify"] {
        let (worker, ops) = Proc::start_ready(&workspace_binary("vault-worker"), &[role], &envs).await;
        if role == "audit" {
            audit_ops = ops;
        }
        workers.push(worker);
    }
    let direct = db.pool().await;
    let bus = Bus::connect(&nats.url(), "outage-test").await.expect("connects");

    // A webhook receiver that answers 200, and deliveries due to it, written as the notifier's
    // consumer would write them.
    let receiver = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hook = format!("http://{}/hook", receiver.local_addr().expect("addr"));
    let app = axum::Router::new().route("/hook", axum::routing::post(|| async { axum::http::StatusCode::OK }));
    tokio::spawn(async move { axum::serve(receiver, app).await });
    let user = insert_user(&direct).await;
    let webhook = insert_webhook(&direct, user, &hook, "whsec-outage-test-0123456789abcdef").await;
    let deliver = |n: usize| {
        let direct = direct.clone();
        async move {
            for _ in 0..n {
                insert_due_delivery(&direct, webhook).await;
            }
        }
    };
    let delivered = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM webhook_deliveries WHERE status = 'delivered'")
            .fetch_one(&direct)
            .await
            .expect("count")
    };
    deliver(3).await;
    poll_until(WAIT, "the first webhooks delivered", || async { (delivered().await == 3).then_some(()) }).await;

    // Auth events at a steady pace, so the audit worker is always about to write.
    let (stop, publisher) = steadily(Duration::from_millis(20), {
        let bus = bus.clone();
        move || {
            let bus = bus.clone();
            async move {
                let event = AuthEvent {
                    id: Uuid::now_v7(),
                    kind: AuthEventKind::LoginFailed,
                    user_id: None,
                    request_id: None,
                    ip: Some("192.0.2.1".to_owned()),
                    at: Utc::now(),
                    data: json!({}),
                };
                bus.publish(&event, &MessageContext::default()).await.expect("published");
            }
        }
    });
    let recorded = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM audit_log WHERE stream = 'AUTH'")
            .fetch_one(&direct)
            .await
            .expect("count")
    };
    poll_until(WAIT, "the audit worker to record some events", || async { (recorded().await >= 20).then_some(()) })
        .await;
    let candle_before: chrono::DateTime<Utc> = poll_until(WAIT, "a candle written", || async {
        sqlx::query_scalar("SELECT max(close_at) FROM candles").fetch_one(&direct).await.ok().flatten()
    })
    .await;

    proxy.blackhole();
    let silenced_at = Utc::now();
    deliver(5).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // events published after the blackhole, the scenario itself
    stop.cancel();
    let published = publisher.await.expect("publisher");

    // Every event recorded exactly once (a row per stream sequence is the table's key).
    poll_until(Duration::from_secs(120), &format!("all {published} events in the audit log"), || async {
        (recorded().await == published).then_some(())
    })
    .await;
    // Ticks go on, and their candles are written again.
    poll_until(Duration::from_secs(60), "a candle closing after the blackhole", || async {
        let at: Option<chrono::DateTime<Utc>> =
            sqlx::query_scalar("SELECT max(close_at) FROM candles").fetch_one(&direct).await.ok().flatten();
        at.filter(|at| *at > silenced_at + chrono::TimeDelta::seconds(5)).map(|_| ())
    })
    .await;
    assert!(candle_before < silenced_at);
    poll_until(Duration::from_secs(60), "the webhooks due after the blackhole delivered", || async {
        (delivered().await == 8).then_some(())
    })
    .await;
    // The chain's walks go on too (each page bounded: one on a silent connection fails the walk
    // and the next one starts), and find every event recorded, intact.
    poll_until(Duration::from_secs(60), "a walk of the whole chain after the blackhole", || async {
        let text = vault_testkit::metrics_text(&audit_ops).await;
        let at = vault_testkit::sample(&text, "vault_audit_chain_verified_at_seconds ", &[])?;
        let rows = vault_testkit::sample(&text, "vault_audit_chain_rows_verified ", &[])?;
        let intact = vault_testkit::sample(&text, "vault_audit_chain_intact ", &[])?;
        (at > (silenced_at.timestamp() + 5) as f64 && rows >= published as f64 && intact == 1.0).then_some(())
    })
    .await;
    for mut worker in workers {
        worker.stop_cleanly(Duration::from_secs(30)).await;
    }
}

/// The engine through the same silence: its lease connection goes silent with the rest, the
/// lease keeper's heartbeat gives up, serving stops and the lease is taken again on a new
/// connection. Deposits sent before, during and after are each applied exactly once.
#[tokio::test]
async fn the_engine_recovers_from_connections_that_go_silent_for_good_and_applies_each_command_once() {
    let (nats, db, proxy, envs) = behind_a_proxy().await;
    let (mut engine, _) = Proc::start_ready(&workspace_binary("vault-engine"), &[], &envs).await;
    let direct = db.pool().await;
    let bus = Bus::connect(&nats.url(), "outage-test").await.expect("connects");
    let user = insert_user(&direct).await;

    let (stop, sender) = deposits_steadily(&bus, &direct, user);
    poll_until(WAIT, "some deposits applied", || async { (completed_deposits(&direct).await >= 10).then_some(()) })
        .await;
    proxy.blackhole();
    tokio::time::sleep(Duration::from_secs(2)).await; // deposits sent into the silence: the scenario
    stop.cancel();
    let sent = sender.await.expect("sender");
    every_deposit_applied_once(&direct, user, sent, Duration::from_secs(120), &engine).await;
    engine.stop_cleanly(Duration::from_secs(30)).await;
}

/// The API's connections go deaf for good while orders flow: what it sends reaches Postgres and
/// commits, the answers never come back. The intake statements in flight are given up and their
/// requests answered 503; the rows they wrote anyway are withdrawn once the database answers
/// again (a 503 placed nothing); the pool gives up the deaf connections, so new orders are
/// taken on new ones without a restart; a retry of a refused order with its client id is a new
/// order; every order answered 202 is decided by the engine, and the books reconcile.
#[tokio::test]
async fn orders_whose_intake_answers_never_come_are_refused_withdrawn_and_the_api_heals() {
    let (nats, db, proxy, envs) = behind_a_proxy().await;
    // The engine reaches Postgres directly; only the API's connections go deaf.
    let engine_envs = with(base_env(&db, &nats), "MAX_PRICE_AGE", "600");
    let (mut engine, _) = Proc::start_ready(&workspace_binary("vault-engine"), &[], &engine_envs).await;
    let envs = with(with(envs, "RATE_LIMIT_USER_PER_SEC", "0"), "RATE_LIMIT_IP_PER_SEC", "0");
    let api = serve_api(&envs, db, nats).await;
    let api_addr = api.addr.clone();
    let direct = api.db.pool().await;
    let bus = Bus::connect(&api.nats.url(), "outage-test").await.expect("connects");
    let (user, token) = funded_trader(&api, &bus, &direct, "1000000").await;

    // Orders every 20 ms, each its own request with its own client id, for 1 s before the
    // deafness and 3 s into it; each request may wait out the intake's 15 s bound.
    let patient = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(60)).build().expect("client");
    let place = |client_order_id: String| {
        let (patient, url, token) = (patient.clone(), api.url("/orders"), token.clone());
        async move {
            let body = json!({"symbol": "BTC-USD", "side": "buy", "type": "market", "quantity": "0.001",
                              "client_order_id": client_order_id});
            let answer = patient.post(url).bearer_auth(token).json(&body).send().await.expect("an answer");
            (client_order_id, answer.status().as_u16())
        }
    };
    let started = Instant::now();
    let mut requests = tokio::task::JoinSet::new();
    let mut deaf = false;
    while started.elapsed() < Duration::from_secs(4) {
        if !deaf && started.elapsed() >= Duration::from_secs(1) {
            proxy.deafen();
            deaf = true;
        }
        requests.spawn(place(format!("deaf-{}", Uuid::now_v7().simple())));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answers = requests.join_all().await;
    let accepted: Vec<&String> = answers.iter().filter(|(_, s)| *s == 202).map(|(c, _)| c).collect();
    let refused: Vec<&String> = answers.iter().filter(|(_, s)| *s == 503).map(|(c, _)| c).collect();
    let other: Vec<_> = answers.iter().filter(|(_, s)| ![202, 503].contains(s)).collect();
    assert!(other.is_empty(), "202 or 503 only: {other:?}");
    assert!(!accepted.is_empty() && !refused.is_empty(), "{} accepted, {} refused", accepted.len(), refused.len());

    // New orders are taken again, on new connections.
    poll_until(WAIT, "the API to take orders again", || async {
        (place(format!("after-{}", Uuid::now_v7().simple())).await.1 == 202).then_some(())
    })
    .await;
    // A refused order sent again with its client id is a new order.
    let (_, retried) = place(refused[0].clone()).await;
    assert_eq!(retried, 202, "the retry of {} after a 503", refused[0]);

    // Every accepted order (and the retry) decided, nothing left pending, no refused one placed.
    poll_until(WAIT, "every order decided and every refused row withdrawn", || async {
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE user_id = $1 AND status = 'pending'")
            .bind(user)
            .fetch_one(&direct)
            .await
            .ok()?;
        (pending == 0).then_some(())
    })
    .await;
    // Rows written by refused requests turned up (the deaf connections carried their inserts),
    // and were withdrawn.
    let withdrawn = poll_until(WAIT, "an intake row of a refused request counted as withdrawn", || async {
        let withdrawn = scrape_metric(&api_addr, "vault_api_intake_rows_withdrawn_total", &[]).await;
        (withdrawn >= 1.0).then_some(withdrawn)
    })
    .await;
    let placed: Vec<String> =
        sqlx::query_scalar("SELECT client_order_id FROM orders WHERE user_id = $1 AND client_order_id LIKE 'deaf-%'")
            .bind(user)
            .fetch_all(&direct)
            .await
            .expect("orders");
    let mut expected: Vec<String> = accepted.iter().map(|c| (*c).clone()).collect();
    expected.push(refused[0].clone());
    expected.sort();
    let mut placed = placed;
    placed.sort();
    assert_eq!(placed, expected, "the orders in the book are those answered 202 (and the retry)");
    assert!(engine.is_running());
    engine.stop_cleanly(Duration::from_secs(30)).await;
    assert_reconciled(&workspace_binary("vault-engine"), &api.db).await;
    println!(
        "deaf connections: {} orders accepted, {} refused 503, {withdrawn} rows withdrawn",
        accepted.len(),
        refused.len()
    );
}

/// Requests whose clients leave while their command's publish waits: NATS is stalled behind a
/// proxy (the API's connection stays up, nothing crosses it), so an order's and a deposit's
/// requests are dropped between their intake row's insert and their publish's answer, with
/// nothing left to publish or withdraw the row. Both rows are withdrawn instead of staying
/// pending for good; once NATS answers again, the stalled commands reach the stream naming rows
/// that are gone, and a retry with either client id is told it is unusable — nothing placed.
#[tokio::test]
async fn rows_of_requests_dropped_while_their_publish_waits_are_withdrawn() {
    let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let proxy = Proxy::start(nats.url().trim_start_matches("nats://").to_owned()).await;
    let envs = with(base_env(&db, &nats), "NATS_URL", format!("nats://127.0.0.1:{}", proxy.port));
    let api = serve_api(&envs, db, nats).await;
    let direct = api.db.pool().await;
    let email = format!("leaver-{}@example.com", Uuid::now_v7().simple());
    let user: Uuid = api.signup(&email).await["id"].as_str().expect("user id").parse().expect("uuid");
    let token = api.tokens(&email).await["access_token"].as_str().expect("token").to_owned();
    let order = json!({"symbol": "BTC-USD", "side": "buy", "type": "limit", "quantity": "0.01",
                       "limit_price": "30000", "client_order_id": "left-order"});
    let deposit = json!({"asset": "USD", "amount": "100", "client_deposit_id": "left-deposit"});
    let rows = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT (SELECT count(*) FROM orders WHERE user_id = $1) + (SELECT count(*) FROM deposits WHERE user_id = $1)",
        )
        .bind(user)
        .fetch_one(&direct)
        .await
        .expect("count")
    };

    proxy.stall();
    let impatient = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(1)).build().expect("client");
    for (path, body) in [("/orders", &order), ("/account/deposits", &deposit)] {
        let sent = impatient.post(api.url(path)).bearer_auth(&token).json(body).send().await;
        assert!(
            sent.as_ref().is_err_and(reqwest::Error::is_timeout),
            "{path}: no answer while NATS is stalled: {sent:?}"
        );
    }
    // Both rows were inserted (the withdrawals count them) and are gone.
    poll_until(WAIT, "both rows withdrawn", || async {
        let withdrawn = scrape_metric(&api.addr, "vault_api_intake_rows_withdrawn_total", &[]).await;
        (withdrawn == 2.0).then_some(())
    })
    .await;
    assert_eq!(rows().await, 0, "no row left pending");

    // The stalled commands reach the stream now, naming rows that are gone: their client ids
    // are spent, and a retry with either places nothing.
    proxy.resume();
    for (path, body) in [("/orders", &order), ("/account/deposits", &deposit)] {
        support::problem(api.post(path, Some(&token), body.clone()).await, 409, "client_id_unusable").await;
    }
    assert_eq!(rows().await, 0, "nothing placed");
}

/// A pool of one connection, which goes silent for good mid-statement: the statement is given
/// up, and the pool serves the next one on a new connection within seconds. (sqlx's ping of a
/// connection on its way back to the pool waited for good for the answer the silent one owed.)
#[tokio::test]
async fn a_pool_drops_a_connection_that_went_silent_and_serves_on_a_new_one() {
    let (_nats, _db, proxy, envs) = behind_a_proxy().await;
    let proxied = envs.iter().find(|(k, _)| *k == "DATABASE_URL").expect("DATABASE_URL").1.clone();
    let pool = vault_core::db::pool_options(1)
        .connect_with(proxied.parse::<sqlx::postgres::PgConnectOptions>().expect("url"))
        .await
        .expect("pool");
    let one = || sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&pool);
    assert_eq!(one().await.expect("a statement"), 1);
    // Back in the pool: sqlx's release ping answered before the silence.
    poll_until(WAIT, "the connection idle in the pool", || async { (pool.num_idle() == 1).then_some(()) }).await;

    proxy.blackhole();
    let given_up = vault_core::db::within(Duration::from_secs(1), one()).await;
    assert!(given_up.is_err(), "a statement on a silent connection answered: {given_up:?}");
    let since = Instant::now();
    let answered = poll_until(WAIT, "a statement answered on a new connection", || async {
        vault_core::db::within(Duration::from_secs(1), one()).await.ok()
    })
    .await;
    assert_eq!(answered, 1);
    println!("silent connection: the pool served again after {:?}", since.elapsed());
}

/// Only the engine's pool connections go silent, mid-commit; its lease connection is spared, so
/// the engine keeps its lease and must give the silent commits up itself (before, the shard's
/// one transaction waited for good, and every later command of its users with it). Every
/// deposit sent before, during and after is applied exactly once, and the lease is never lost.
#[tokio::test]
async fn the_engine_gives_up_commits_on_silent_connections_while_its_lease_holds() {
    let (nats, db, proxy, envs) = behind_a_proxy().await;
    let (mut engine, _) = Proc::start_ready(&workspace_binary("vault-engine"), &[], &envs).await;
    let direct = db.pool().await;
    let bus = Bus::connect(&nats.url(), "outage-test").await.expect("connects");
    let user = insert_user(&direct).await;
    let (stop, sender) = deposits_steadily(&bus, &direct, user);
    poll_until(WAIT, "some deposits applied", || async { (completed_deposits(&direct).await >= 10).then_some(()) })
        .await;
    // The lease's session is the one holding the partitions' advisory locks.
    let lease_port: i32 = sqlx::query_scalar(
        "SELECT DISTINCT a.client_port FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid
          WHERE l.locktype = 'advisory' AND a.datname = current_database()",
    )
    .fetch_one(&direct)
    .await
    .expect("one session holds the lease");
    proxy.blackhole_all_but(u16::try_from(lease_port).expect("a port"));
    tokio::time::sleep(Duration::from_secs(2)).await; // deposits sent into the silence: the scenario
    stop.cancel();
    let sent = sender.await.expect("sender");

    every_deposit_applied_once(&direct, user, sent, Duration::from_secs(120), &engine).await;
    assert!(!engine.output().contains("lost the partition lease"), "the lease was lost:\n{}", engine.output());
    engine.stop_cleanly(Duration::from_secs(30)).await;
}

/// A `Prefer: wait` order whose verdict cannot be read is answered 202 pending, not 503: its
/// command was published and acknowledged, so it is placed, and a 503 ("nothing was placed")
/// would have a client without a client id place it again. A stand-in engine cuts the API's
/// Postgres when the command arrives, then publishes the verdict, so the API's read of it fails.
#[tokio::test]
async fn a_waited_order_whose_verdict_cannot_be_read_is_answered_pending_not_refused() {
    use futures::StreamExt;
    use vault_bus::message::{EngineEvent, EventKind, decode};
    let (nats, db, proxy, envs) = behind_a_proxy().await;
    let api = serve_api(&envs, db, nats).await;
    let email = format!("waiter-{}@example.com", Uuid::now_v7().simple());
    let user: Uuid = api.signup(&email).await["id"].as_str().expect("user id").parse().expect("uuid");
    let token = api.tokens(&email).await["access_token"].as_str().expect("token").to_owned();
    let bus = Bus::connect(&api.nats.url(), "stand-in-engine").await.expect("connects");
    let mut commands = bus.client().subscribe(subjects::order_command(user)).await.expect("subscribe");
    bus.client().flush().await.expect("flush");
    let proxy = Arc::new(proxy);
    let engine = {
        let (bus, proxy) = (bus.clone(), proxy.clone());
        tokio::spawn(async move {
            let msg = commands.next().await.expect("the command");
            let command: OrderCommand = decode(msg.subject.as_str(), &msg.payload).expect("a command");
            let CommandBody::Place { order_id, .. } = command.body else { panic!("a place command") };
            proxy.cut();
            let event = EngineEvent {
                id: Uuid::now_v7(),
                kind: EventKind::OrderAccepted,
                user_id: user,
                request_id: None,
                at: Utc::now(),
                data: json!({"id": order_id, "status": "open"}),
            };
            bus.publish(&event, &MessageContext::default()).await.expect("the verdict published");
            order_id
        })
    };
    let body = json!({"symbol": "BTC-USD", "side": "buy", "type": "limit", "quantity": "0.01", "limit_price": "100"});
    let answer = api
        .client
        .post(api.url("/orders"))
        .bearer_auth(&token)
        .header("prefer", "wait=10")
        .json(&body)
        .send()
        .await
        .expect("an answer");
    let status = answer.status().as_u16();
    let order: Value = answer.json().await.expect("a body");
    let placed = tokio::time::timeout(WAIT, engine).await.expect("the stand-in engine ran").expect("it did not panic");
    proxy.restore();
    assert_eq!(status, 202, "the order was placed: {order}");
    assert_eq!((order["id"].as_str(), order["status"].as_str()), (Some(placed.to_string().as_str()), Some("pending")));
}
