//! The backbone failing under load, every process real: the API, the engine and the prices,
//! audit and notify workers run against NATS while many users' HTTP clients place and cancel
//! orders at once, and a nats-server is killed with SIGKILL in the middle of the burst:
//!
//! - a 3-node JetStream cluster with R3 streams (`NATS_REPLICAS=3`) loses the node leading
//!   ORDERS; every accepted order must be decided by the two nodes left, and the node rejoins;
//! - a single nats-server is killed and restarted on its store.
//!
//! The clients behave as `API.md` asks: a 503 or a timeout is retried with the same
//! `client_order_id` (which must never make a second order); a 409 `client_id_unusable` (the
//! rare lost publish ack, README) is given up for a new id. Afterwards: every order answered
//! 200, 201 or 202 is decided (market: filled, or rejected for its price; limit: open, or
//! canceled when its cancel was accepted), no order exists that no client was answered for,
//! none is filled twice, a tick crossing half the resting orders fills exactly those (the
//! engine's price feed lived through the fault), the audit trail holds every ORDERS message once
//! with its chain intact, and `vault-engine reconcile` (stream order included) finds the
//! database clean. Each test prints its counts; violations are collected and asserted last.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;
use vault_bus::message::PriceTick;
use vault_bus::{Bus, MessageContext, streams};
use vault_core::domain::{Positive, Symbol};
use vault_testkit::{
    NatsCluster, NatsServer, Proc, READY_DEADLINE, TestDb, base_env_for, free_port, poll_until, run_reconcile,
    workspace_binary,
};

/// Users trading at once, each with its own client task.
const USERS: usize = 20;
/// Orders each user places, one after the other.
const ORDERS_PER_USER: usize = 12;
/// How long a client keeps retrying one request before it gives up (a violation).
const RETRY_FOR: Duration = Duration::from_secs(60);
/// A client's patience with one answer before it retries.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(4);
/// How long a set-up request (signup, login) may take: not part of what is measured.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long every accepted order has to be decided once the fault is over.
const DECIDE_WITHIN: Duration = Duration::from_secs(60);
/// How long the crossing tick may take to fill the orders it crosses: the engine's price feed
/// must be back within seconds of the fault (it was blind for about 17 s after a restart).
const CROSS_WITHIN: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// The stack

/// The API, the engine and three workers over one database and one NATS URL.
struct Stack {
    db: TestDb,
    pool: PgPool,
    api: String,
    client: reqwest::Client,
    procs: Vec<(&'static str, Proc)>,
}

impl Stack {
    /// Starts every process and waits until each is ready. The API goes last: every process
    /// declares the streams with `NATS_REPLICAS`, and one that did not would set a replicated
    /// stream back to one copy, which the cluster test's premise check would catch.
    async fn start(nats_url: &str, replicas: usize) -> Stack {
        let db = TestDb::create().await;
        support::migrate(&db).await;
        let mut env = base_env_for(&db, nats_url);
        env.extend([
            ("NATS_REPLICAS", replicas.to_string()),
            ("RATE_LIMIT_USER_PER_SEC", "0".to_owned()),
            ("RATE_LIMIT_IP_PER_SEC", "0".to_owned()),
            ("RATE_LIMIT_LOGIN_PER_MIN", "0".to_owned()),
            ("PRICE_SOURCE", "sim".to_owned()),
        ]);
        let roles: [(&str, String, &[&str]); 4] = [
            ("engine", workspace_binary("vault-engine"), &[]),
            ("prices", workspace_binary("vault-worker"), &["prices"]),
            ("audit", workspace_binary("vault-worker"), &["audit"]),
            ("notify", workspace_binary("vault-worker"), &["notify"]),
        ];
        let mut procs = Vec::new();
        for (name, binary, args) in roles {
            procs.push((name, Proc::start_ready(&binary, args, &env).await.0));
        }
        let api = format!("127.0.0.1:{}", free_port());
        env.push(("API_ADDR", api.clone()));
        let mut proc = Proc::spawn(support::BIN, &["serve"], &env);
        proc.wait_http_status(&api, "/readyz", 200, READY_DEADLINE).await;
        procs.push(("api", proc));
        // The test's own reads need few connections; the five processes hold enough already.
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(3).connect(&db.url).await.expect("a pool");
        let client = reqwest::Client::builder().no_proxy().timeout(CLIENT_TIMEOUT).build().expect("a client");
        Stack { db, pool, api, client, procs }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}/api/v1{path}", self.api)
    }

    /// Signs up and logs in `USERS` users at once; returns their ids and access tokens.
    async fn traders(&self) -> Vec<(Uuid, String)> {
        let one = |i: usize| async move {
            let email = format!("burst-{i}@example.com");
            let creds = json!({"email": email, "password": support::PASSWORD});
            // Twenty argon2id hashes at once on a loaded machine outlast a trader's patience:
            // the set-up waits longer than the burst's clients do.
            // And a hash refused with 503 (the hashing queue full for 5 s: the hashing threads run
            // at the lowest CPU priority) is tried again, as a client would.
            let send = |path: &'static str| {
                let creds = &creds;
                poll_until(SETUP_TIMEOUT, path, move || async move {
                    let resp = self.client.post(self.url(path)).json(creds).timeout(SETUP_TIMEOUT).send().await.ok()?;
                    (resp.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE).then_some(resp)
                })
            };
            let signup = send("/auth/signup").await;
            assert_eq!(signup.status(), 201, "signup {email}");
            let user: Value = signup.json().await.expect("user json");
            let id = user["id"].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("a user id: {user}"));
            let login = send("/auth/login").await;
            assert_eq!(login.status(), 200, "login {email}");
            let tokens: Value = login.json().await.expect("token json");
            let token = tokens["access_token"].as_str().unwrap_or_else(|| panic!("an access token: {tokens}"));
            (id, token.to_owned())
        };
        futures::future::join_all((0..USERS).map(one)).await
    }

    /// Funds every trader (retrying as a client would) and waits for the deposits to land.
    async fn fund(&self, traders: &[(Uuid, String)]) {
        for (_, token) in traders {
            let body = json!({"asset": "USD", "amount": "10000", "client_deposit_id": "fund"});
            let (status, answer) =
                match send_retrying(|| self.client.post(self.url("/account/deposits")).bearer_auth(token).json(&body))
                    .await
                    .0
                {
                    Final::Answered(status, answer) => (status, answer),
                    other => panic!("a deposit was not accepted: {other:?}"),
                };
            assert_eq!(status, 202, "{answer}");
        }
        poll_until(DECIDE_WITHIN, "every deposit to complete", || async {
            let done: i64 = sqlx::query_scalar("SELECT count(*) FROM deposits WHERE status = 'completed'")
                .fetch_one(&self.pool)
                .await
                .ok()?;
            (done == traders.len() as i64).then_some(())
        })
        .await;
    }

    /// The price the API shows for BTC-USD (the prices worker's simulation).
    async fn btc_price(&self) -> Decimal {
        poll_until(READY_DEADLINE, "a BTC-USD price", || async {
            let ticker: Value =
                self.client.get(self.url("/markets/BTC-USD/ticker")).send().await.ok()?.json().await.ok()?;
            ticker["price"].as_str()?.parse().ok()
        })
        .await
    }

    /// Every process still runs (none died of the fault); panics with the output of one that
    /// did.
    fn assert_all_running(&mut self) {
        for (name, proc) in &mut self.procs {
            assert!(proc.is_running(), "{name} exited during the fault; output:\n{}", proc.output());
        }
    }

    /// Stops every process with SIGTERM; each must exit 0.
    async fn stop(&mut self) {
        for (name, proc) in self.procs.iter_mut().rev() {
            proc.signal("TERM");
            let status = proc.wait_exit(Duration::from_secs(40)).await;
            assert!(status.success(), "{name} did not stop cleanly:\n{}", proc.output());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The clients

/// What a request came to after the client's retries.
#[derive(Debug)]
enum Final {
    /// Any answer but 503 (and 409 `client_id_unusable`).
    Answered(u16, Value),
    /// 409 `client_id_unusable`: the id is spent, nothing was placed.
    Unusable,
    /// Still 503s or timeouts after [`RETRY_FOR`].
    GaveUp(String),
}

/// How a client's requests went.
#[derive(Debug, Default, Clone)]
struct Counts {
    requests: usize,
    unavailable: usize,
    timeouts: usize,
    other_errors: usize,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.unavailable += other.unavailable;
        self.timeouts += other.timeouts;
        self.other_errors += other.other_errors;
    }
}

/// Sends the request `make` builds until it gets an answer other than 503, retrying 503s,
/// timeouts and connection errors every 200 ms for at most [`RETRY_FOR`].
async fn send_retrying(make: impl Fn() -> reqwest::RequestBuilder) -> (Final, Counts) {
    let start = Instant::now();
    let mut counts = Counts::default();
    loop {
        counts.requests += 1;
        let last = match make().send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body: Value = resp.json().await.unwrap_or(Value::Null);
                match status {
                    503 => {
                        counts.unavailable += 1;
                        format!("503 {body}")
                    }
                    409 if body["code"] == "client_id_unusable" => return (Final::Unusable, counts),
                    _ => return (Final::Answered(status, body), counts),
                }
            }
            Err(e) => {
                if e.is_timeout() {
                    counts.timeouts += 1;
                } else {
                    counts.other_errors += 1;
                }
                e.to_string()
            }
        };
        if start.elapsed() > RETRY_FOR {
            return (Final::GaveUp(last), counts);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// Fills at the simulated price (or is rejected for it: `stale_price`, `no_price`).
    Market,
    /// Rests at half the price; the final crossing tick fills it.
    HighLimit,
    /// Rests at 40 % of the price and stays open (every other one is canceled).
    LowLimit,
}

/// An order some client was answered 200, 201 or 202 for.
#[derive(Debug, Clone)]
struct Placed {
    user: Uuid,
    client_order_id: String,
    id: Uuid,
    kind: Kind,
    status: u16,
    cancel_accepted: bool,
}

/// What one client did.
#[derive(Debug, Default)]
struct ClientLog {
    placed: Vec<Placed>,
    /// (user, client_order_id) answered 409 `client_id_unusable`.
    unusable: Vec<(Uuid, String)>,
    counts: Counts,
    /// Answers the contract does not allow here.
    unexpected: Vec<String>,
}

/// The limit prices of the resting orders.
#[derive(Debug, Clone, Copy)]
struct Levels {
    high: Decimal,
    low: Decimal,
}

/// One user's client: places its orders one after the other, cancels every other low limit.
async fn trade(
    client: reqwest::Client,
    base: String,
    (user, token): (Uuid, String),
    levels: Levels,
    accepted: Arc<AtomicUsize>,
) -> ClientLog {
    let mut log = ClientLog::default();
    for i in 0..ORDERS_PER_USER {
        let kind = [Kind::Market, Kind::HighLimit, Kind::LowLimit][i % 3];
        let mut body = match kind {
            Kind::Market => json!({"symbol": "BTC-USD", "side": "buy", "type": "market", "quantity": "0.001"}),
            Kind::HighLimit | Kind::LowLimit => json!({
                "symbol": "BTC-USD", "side": "buy", "type": "limit", "quantity": "0.001",
                "limit_price": if kind == Kind::HighLimit { levels.high } else { levels.low }.to_string(),
            }),
        };
        let mut placed = None;
        for attempt in 0.. {
            let client_order_id = format!("o{i}-a{attempt}");
            body["client_order_id"] = json!(client_order_id);
            let (outcome, counts) =
                send_retrying(|| client.post(format!("{base}/orders")).bearer_auth(&token).json(&body)).await;
            log.counts.add(&counts);
            match outcome {
                Final::Answered(status @ 200..=202, order) => {
                    let id = order["id"].as_str().and_then(|s| s.parse().ok()).expect("an order id");
                    accepted.fetch_add(1, Ordering::Relaxed);
                    placed = Some(Placed { user, client_order_id, id, kind, status, cancel_accepted: false });
                }
                Final::Unusable => {
                    log.unusable.push((user, client_order_id));
                    continue;
                }
                Final::Answered(status, answer) => {
                    log.unexpected.push(format!("order {client_order_id} of {user}: {status} {answer}"))
                }
                Final::GaveUp(last) => {
                    log.unexpected.push(format!("order {client_order_id} of {user}: gave up, {last}"))
                }
            }
            break;
        }
        let Some(mut placed) = placed else { continue };
        if kind == Kind::LowLimit && i % 6 == 5 {
            let url = format!("{base}/orders/{}", placed.id);
            let (outcome, counts) = send_retrying(|| client.delete(&url).bearer_auth(&token)).await;
            log.counts.add(&counts);
            let retried = counts.requests > 1;
            match outcome {
                Final::Answered(202, _) => placed.cancel_accepted = true,
                // A retry after a cancel that went through finds the order canceled (terminal:
                // 409 by the contract); a client looks the order up.
                Final::Answered(409, answer) if retried && answer["code"] == "order_not_cancelable" => {
                    match send_retrying(|| client.get(&url).bearer_auth(&token)).await.0 {
                        Final::Answered(200, order) if order["status"] == "canceled" => placed.cancel_accepted = true,
                        other => log.unexpected.push(format!("cancel of {} refused, then {other:?}", placed.id)),
                    }
                }
                other => log.unexpected.push(format!("cancel of {}: {other:?}", placed.id)),
            }
        }
        log.placed.push(placed);
    }
    log
}

/// The burst: one client task per user, all at once.
struct Burst {
    tasks: Vec<tokio::task::JoinHandle<ClientLog>>,
    accepted: Arc<AtomicUsize>,
}

impl Burst {
    fn start(stack: &Stack, traders: &[(Uuid, String)], levels: Levels) -> Burst {
        let accepted = Arc::new(AtomicUsize::new(0));
        let tasks = traders
            .iter()
            .map(|trader| {
                let (client, base, trader, accepted) =
                    (stack.client.clone(), format!("http://{}/api/v1", stack.api), trader.clone(), accepted.clone());
                tokio::spawn(trade(client, base, trader, levels, accepted))
            })
            .collect();
        Burst { tasks, accepted }
    }

    /// Waits until a third of the burst's orders were accepted: the moment of the fault.
    async fn reach_a_third(&self) -> usize {
        let third = USERS * ORDERS_PER_USER / 3;
        poll_until(Duration::from_secs(60), "a third of the burst to be accepted", || async {
            let n = self.accepted.load(Ordering::Relaxed);
            (n >= third).then_some(n)
        })
        .await
    }

    async fn finish(self) -> ClientLog {
        let mut all = ClientLog::default();
        for task in self.tasks {
            let log = task.await.expect("a client task");
            all.placed.extend(log.placed);
            all.unusable.extend(log.unusable);
            all.counts.add(&log.counts);
            all.unexpected.extend(log.unexpected);
        }
        all
    }
}

// ---------------------------------------------------------------------------------------------
// The checks

/// Polls `check` every 50 ms until it holds or `deadline` passes; how long it took, or a
/// violation naming `what`. After the fault a wait that runs out is one more violation, reported
/// with the others and the processes' warnings, not a bare panic.
async fn within<F, Fut>(deadline: Duration, what: &str, mut check: F) -> Result<Duration, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return Ok(start.elapsed());
        }
        if start.elapsed() > deadline {
            return Err(format!("timed out after {deadline:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until no accepted order is pending any more.
async fn wait_decided(pool: &PgPool, log: &ClientLog) -> Result<Duration, String> {
    let ids: Vec<Uuid> = log.placed.iter().map(|p| p.id).collect();
    within(DECIDE_WITHIN, "every accepted order to be decided", || async {
        let pending: Result<i64, _> =
            sqlx::query_scalar("SELECT count(*) FROM orders WHERE id = ANY($1) AND status = 'pending'")
                .bind(&ids)
                .fetch_one(pool)
                .await;
        pending.is_ok_and(|n| n == 0)
    })
    .await
}

/// Publishes a tick between the two limit levels and waits until no crossed order is open.
async fn cross_high_limits(stack: &Stack, nats_url: &str, levels: Levels, log: &ClientLog) -> Result<Duration, String> {
    let bus = Bus::connect(nats_url, "fault-test").await.expect("the test reaches NATS");
    let tick = PriceTick {
        symbol: Symbol::parse("BTC-USD").expect("symbol"),
        price: Positive::new((levels.high + levels.low) / Decimal::TWO).expect("positive"),
        ts: Utc::now(),
        source: "fault-test".into(),
        seq: 1,
    };
    bus.publish(&tick, &MessageContext::default()).await.map_err(|e| format!("the crossing tick: {e}"))?;
    let high: Vec<Uuid> = log.placed.iter().filter(|p| p.kind == Kind::HighLimit).map(|p| p.id).collect();
    within(CROSS_WITHIN, "the crossing tick to fill the high limits", || async {
        let open: Result<i64, _> =
            sqlx::query_scalar("SELECT count(*) FROM orders WHERE id = ANY($1) AND status = 'open'")
                .bind(&high)
                .fetch_one(&stack.pool)
                .await;
        open.is_ok_and(|n| n == 0)
    })
    .await
}

/// An order row: id, user, client order id, status, reject reason, number of fills.
type OrderRow = (Uuid, Uuid, String, String, Option<String>, i64);

/// Every order against what its client was told; returns the violations and the final states.
async fn check_orders(pool: &PgPool, log: &ClientLog) -> (Vec<String>, BTreeMap<String, usize>) {
    let mut violations = log.unexpected.clone();
    let rows: Vec<OrderRow> = sqlx::query_as(
        "SELECT o.id, o.user_id, o.client_order_id, o.status, o.reject_reason,
                (SELECT count(*) FROM fills f WHERE f.order_id = o.id)
           FROM orders o",
    )
    .fetch_all(pool)
    .await
    .expect("orders");
    let by_id: BTreeMap<Uuid, &OrderRow> = rows.iter().map(|r| (r.0, r)).collect();
    let mut states = BTreeMap::new();
    for p in &log.placed {
        let Some((_, user, client_order_id, status, reason, fills)) = by_id.get(&p.id).copied() else {
            violations
                .push(format!("order {} ({}) was answered {} and does not exist", p.id, p.client_order_id, p.status));
            continue;
        };
        *states.entry(status.clone()).or_insert(0) += 1;
        if (*user, client_order_id) != (p.user, &p.client_order_id) {
            violations.push(format!(
                "order {} belongs to {user}/{client_order_id}, not {}/{}",
                p.id, p.user, p.client_order_id
            ));
        }
        let fine = match (p.kind, status.as_str(), reason.as_deref()) {
            (Kind::Market, "filled", _) => *fills == 1,
            (Kind::Market, "rejected", Some("stale_price" | "no_price")) => *fills == 0,
            (Kind::HighLimit, "filled", _) => *fills == 1,
            (Kind::LowLimit, "canceled", _) => p.cancel_accepted && *fills == 0,
            (Kind::LowLimit, "open", _) => !p.cancel_accepted && *fills == 0,
            _ => false,
        };
        if !fine {
            violations.push(format!(
                "{:?} order {} ended {status} ({reason:?}) with {fills} fills, cancel accepted: {}",
                p.kind, p.id, p.cancel_accepted
            ));
        }
    }
    let answered: HashSet<(Uuid, &str)> = log.placed.iter().map(|p| (p.user, p.client_order_id.as_str())).collect();
    for (id, user, client_order_id, status, _, _) in &rows {
        if !answered.contains(&(*user, client_order_id.as_str())) {
            violations.push(format!(
                "order {id} ({user}/{client_order_id}, {status}) exists but no client was answered for it"
            ));
        }
    }
    for (user, client_order_id) in &log.unusable {
        if rows.iter().any(|r| r.1 == *user && &r.2 == client_order_id) {
            violations.push(format!("{user}/{client_order_id} was answered client_id_unusable but exists"));
        }
    }
    let doubled: i64 =
        sqlx::query_scalar("SELECT count(*) FROM (SELECT order_id FROM fills GROUP BY order_id HAVING count(*) > 1) d")
            .fetch_one(pool)
            .await
            .expect("doubled fills");
    if doubled > 0 {
        violations.push(format!("{doubled} orders filled more than once"));
    }
    (violations, states)
}

/// Waits until the audit trail holds every ORDERS message once, then runs `audit verify`.
/// Returns the number of rows verified and how long the trail took to be complete.
async fn check_audit(stack: &Stack, nats_url: &str) -> Result<(i64, Duration), String> {
    let bus = Bus::connect(nats_url, "fault-test").await.expect("the test reaches NATS");
    let mut orders = bus.jetstream().get_stream(streams::ORDERS.name).await.expect("ORDERS");
    let messages = orders.info().await.expect("ORDERS info").state.messages as i64;
    let waited = within(DECIDE_WITHIN, "the audit trail to hold every ORDERS message", || async {
        let rows: Result<i64, _> =
            sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE stream = 'ORDERS'").fetch_one(&stack.pool).await;
        rows.is_ok_and(|n| n >= messages)
    })
    .await;
    let (rows, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT stream_seq) FROM audit_log WHERE stream = 'ORDERS'")
            .fetch_one(&stack.pool)
            .await
            .expect("audit rows");
    if rows != messages || distinct != rows {
        return Err(format!("{rows} ORDERS audit rows ({distinct} distinct) for {messages} messages"));
    }
    let waited = waited?;
    let mut verify =
        Proc::spawn(&workspace_binary("vault-worker"), &["audit", "verify"], &[("DATABASE_URL", stack.db.url.clone())]);
    let status = verify.wait_exit(Duration::from_secs(60)).await;
    if !status.success() {
        return Err(format!("audit verify failed: {}", verify.output()));
    }
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log").fetch_one(&stack.pool).await.expect("n");
    Ok((total, waited))
}

/// Reconcile with stream order; the violations it found, as lines.
async fn check_reconcile(stack: &Stack) -> Vec<String> {
    let (code, report) = run_reconcile(&workspace_binary("vault-engine"), &stack.db, &["--stream-order"]).await;
    if code == 0 && report["clean"] == true {
        return Vec::new();
    }
    vec![format!(
        "reconcile (exit {code}): {}",
        serde_json::to_string_pretty(&report["violations"]).unwrap_or_default()
    )]
}

/// The end of both tests: every check, one line of counts, then the verdict. `decided` is how
/// the wait for every accepted order's decision went.
async fn verdict(
    stack: &mut Stack,
    nats_url: &str,
    fault: &str,
    levels: Levels,
    log: ClientLog,
    decided: Result<Duration, String>,
) {
    let mut violations = Vec::new();
    let mut timing = |what: &str, result: Result<Duration, String>| match result {
        Ok(took) => format!("{what} {took:.1?}"),
        Err(e) => {
            violations.push(e);
            format!("{what} never")
        }
    };
    let decided_in = timing("decided after the fault in", decided);
    // The prices worker publishes again: a tick newer than now reaches the API.
    let now = Utc::now();
    let fresh = within(CROSS_WITHIN, "a fresh ETH-USD tick from the prices worker", || async {
        let ticker = async {
            let t: Value =
                stack.client.get(stack.url("/markets/ETH-USD/ticker")).send().await.ok()?.json().await.ok()?;
            t["ts"].as_str()?.parse::<chrono::DateTime<Utc>>().ok()
        };
        ticker.await.is_some_and(|ts| ts > now)
    })
    .await;
    let priced_in = timing("a fresh tick in", fresh);
    let crossed = cross_high_limits(stack, nats_url, levels, &log).await;
    let crossed_in = timing("the crossing tick filled in", crossed);
    let (audit, audited_in) = match check_audit(stack, nats_url).await {
        Ok((rows, took)) => (rows, timing("complete in", Ok(took))),
        Err(e) => (-1, timing("complete in", Err(e))),
    };
    let (order_violations, states) = check_orders(&stack.pool, &log).await;
    violations.extend(order_violations);
    // The copies a rewind sends again are recognised as duplicates, never refused as corrupt.
    for (name, proc) in &stack.procs {
        let corrupt = proc.output().lines().filter(|l| l.contains("corrupt state")).count();
        if corrupt > 0 {
            violations.push(format!("{name} refused {corrupt} commands as corrupt state"));
        }
    }
    stack.assert_all_running();
    stack.stop().await;
    violations.extend(check_reconcile(stack).await);
    let answered: BTreeMap<u16, usize> = log.placed.iter().fold(BTreeMap::new(), |mut m, p| {
        *m.entry(p.status).or_insert(0) += 1;
        m
    });
    let c = &log.counts;
    let engine_rewinds = stack
        .procs
        .iter()
        .filter(|(name, _)| *name == "engine")
        .map(|(_, proc)| proc.output().matches("deliveries lost in transit").count())
        .sum::<usize>();
    println!(
        "{fault}: {USERS} users, {} orders accepted {answered:?} of {} placed, {} cancels accepted; \
         {} requests, {} answered 503, {} timed out, {} other errors, {} client ids unusable; \
         {decided_in} ({engine_rewinds} engine rewinds for lost deliveries); final states {states:?}; \
         {priced_in}, {crossed_in}; audit rows {audit} ({audited_in}); \
         violations {}",
        log.placed.len(),
        USERS * ORDERS_PER_USER,
        log.placed.iter().filter(|p| p.cancel_accepted).count(),
        c.requests,
        c.unavailable,
        c.timeouts,
        c.other_errors,
        log.unusable.len(),
        violations.len(),
    );
    if !violations.is_empty() {
        // What the processes had to say about it.
        let warnings: Vec<String> = stack
            .procs
            .iter()
            .flat_map(|(name, proc)| {
                let output = proc.output();
                let lines: Vec<String> = output
                    .lines()
                    .filter(|l| l.contains("\"WARN\"") || l.contains("\"ERROR\""))
                    .map(|l| format!("{name}: {l}"))
                    .collect();
                lines.into_iter().rev().take(20).rev().collect::<Vec<_>>()
            })
            .collect();
        panic!("{} violations:\n{}\n\nwarnings:\n{}", violations.len(), violations.join("\n"), warnings.join("\n"));
    }
}

fn levels(price: Decimal) -> Levels {
    Levels { high: (price / Decimal::TWO).floor(), low: (price * Decimal::new(4, 1)).floor() }
}

// ---------------------------------------------------------------------------------------------
// The faults

#[tokio::test]
async fn the_cluster_loses_the_orders_leader_mid_burst_and_every_accepted_order_is_decided_once() {
    let mut cluster = NatsCluster::start().await;
    let url = cluster.url();
    let mut stack = Stack::start(&url, 3).await;
    let bus = Bus::connect(&url, "fault-test").await.expect("connects");
    // The premise: ORDERS is replicated on all three nodes, and which one leads it.
    let leader = poll_until(READY_DEADLINE, "ORDERS on three nodes with a leader", || async {
        let info = bus.jetstream().get_stream(streams::ORDERS.name).await.ok()?.info().await.ok()?.clone();
        let c = info.cluster?;
        let current = c.replicas.iter().filter(|r| r.current).count();
        (info.config.num_replicas == 3 && current == 2).then_some(c.leader?)
    })
    .await;
    let leader = cluster.index_of(&leader).expect("the leader is one of ours");

    let traders = stack.traders().await;
    stack.fund(&traders).await;
    let levels = levels(stack.btc_price().await);
    let burst = Burst::start(&stack, &traders, levels);
    let at = burst.reach_a_third().await;
    cluster.kill(leader);
    let killed = Instant::now();
    let log = burst.finish().await;
    // Without the node: the two left decide everything.
    let decided = wait_decided(&stack.pool, &log).await.map(|_| killed.elapsed());
    stack.assert_all_running();
    // The node comes back, catches up, and the rest of the checks run with all three.
    cluster.restart(leader).await;
    let fault = format!("NATS cluster, ORDERS leader {} killed after {at} accepted", cluster.name(leader));
    verdict(&mut stack, &url, &fault, levels, log, decided).await;
}

#[tokio::test]
async fn a_single_nats_server_killed_mid_burst_and_restarted_on_its_store_loses_and_doubles_nothing() {
    let mut nats = NatsServer::start().await;
    let url = nats.url();
    let mut stack = Stack::start(&url, 1).await;
    let traders = stack.traders().await;
    stack.fund(&traders).await;
    let levels = levels(stack.btc_price().await);
    let burst = Burst::start(&stack, &traders, levels);
    let at = burst.reach_a_third().await;
    nats.kill();
    let killed = Instant::now();
    // An outage of a moment: every client meets it (their retries run every 200 ms).
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.restart().await;
    let log = burst.finish().await;
    let decided = wait_decided(&stack.pool, &log).await.map(|_| killed.elapsed());
    let fault = format!("single nats-server killed after {at} accepted, restarted on its store");
    verdict(&mut stack, &url, &fault, levels, log, decided).await;
}
