//! The `orders` scenario: N users with deposits, then an open-loop mix of market buys, resting
//! limit buys and cancels at a target rate (or flat out) for a duration, against a running stack.
//!
//! Measured: POST latency (202, from the *scheduled* send time, so a slow server cannot hide by
//! slowing the generator: no coordinated omission), end-to-end latency from POST to the engine's
//! verdict on a sampled fraction of orders sent with `Prefer: wait=10` (201), cancel latency,
//! errors by status, and — with `--database-url` — the rate at which orders leave `pending`
//! (committed by the engine), during the run and until the backlog drains; the CPU each process
//! used over the same span ([`crate::cpu`]). Then the limits of
//! [`crate::limits`] in the same run, and each stage as a ratio of its limit.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::Rng;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::cpu;
use crate::limits::{self, Limit, TrivialServer};
use crate::report::{Latencies, ratio, summary};

/// Relative weights of the operations.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    pub market: u32,
    pub limit: u32,
    pub cancel: u32,
}

impl std::str::FromStr for Mix {
    type Err = String;
    /// `market=70,limit=20,cancel=10`.
    fn from_str(s: &str) -> Result<Mix, String> {
        let mut mix = Mix { market: 0, limit: 0, cancel: 0 };
        for part in s.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(|| format!("{part:?}: expected name=weight"))?;
            let v: u32 = v.trim().parse().map_err(|_| format!("{part:?}: weight is not a whole number"))?;
            match k.trim() {
                "market" => mix.market = v,
                "limit" => mix.limit = v,
                "cancel" => mix.cancel = v,
                other => return Err(format!("unknown operation {other:?}; expected market, limit, cancel")),
            }
        }
        if mix.market + mix.limit + mix.cancel == 0 {
            return Err("all weights are zero".into());
        }
        Ok(mix)
    }
}

#[derive(Debug, Clone)]
pub struct Args {
    pub api: String,
    pub users: usize,
    /// Orders per second; 0 = flat out with `max_inflight` closed loops.
    pub rate: u64,
    pub duration: Duration,
    pub mix: Mix,
    pub wait_fraction: f64,
    pub max_inflight: usize,
    pub database_url: Option<String>,
    pub nats_url: Option<String>,
    pub limits: bool,
    pub limit_duration: Duration,
    pub limit_concurrency: usize,
}

/// A market as the generator trades it: quantities that clear `min_notional` at the current
/// price, and a limit price half the market's, so limit buys rest.
#[derive(Debug, Clone)]
struct Tradable {
    symbol: String,
    market_qty: String,
    limit_price: String,
    limit_qty: String,
}

#[derive(Debug)]
struct User {
    token: String,
    open: Mutex<Vec<Uuid>>,
}

#[derive(Debug, Default)]
struct Tally {
    sent: AtomicU64,
    ok: AtomicU64,
    shed: AtomicU64,
    by_status: Mutex<BTreeMap<String, u64>>,
    post: Latencies,
    e2e: Latencies,
    /// `Prefer: wait` orders answered 202 (no verdict within the wait): how long each took, a
    /// lower bound of its end-to-end latency.
    e2e_unanswered: Latencies,
    cancel: Latencies,
    /// Errors of each line's requests (`post`, `e2e`, `cancel`), for its summary.
    post_errors: AtomicU64,
    e2e_errors: AtomicU64,
    cancel_errors: AtomicU64,
    inflight: AtomicUsize,
}

impl Tally {
    fn error(&self, what: String) {
        if let Ok(mut m) = self.by_status.lock() {
            *m.entry(what).or_default() += 1;
        }
    }
    /// Counts an error of one line (`line`) under `what`.
    fn failed(&self, line: &AtomicU64, what: String) {
        line.fetch_add(1, Ordering::Relaxed);
        self.error(what);
    }
    fn errors(&self) -> u64 {
        self.by_status.lock().map(|m| m.values().sum()).unwrap_or(0)
    }
}

const PASSWORD: &str = "loadgen password 0123456789";
const DEPOSIT: &str = "1000000";

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().pool_max_idle_per_host(1024).build().expect("client builds")
}

pub async fn signup_and_login(http: &reqwest::Client, api: &str, email: &str) -> anyhow::Result<String> {
    let body = json!({"email": email, "password": PASSWORD});
    let resp = send_patiently(|| http.post(format!("{api}/auth/signup")).json(&body)).await?;
    anyhow::ensure!(resp.status().as_u16() == 201, "signup answered {}", resp.status());
    let resp = send_patiently(|| http.post(format!("{api}/auth/login")).json(&body)).await?;
    anyhow::ensure!(resp.status().is_success(), "login answered {}", resp.status());
    let tokens: Value = resp.json().await?;
    tokens["access_token"].as_str().map(str::to_owned).context("login answered no access_token")
}

/// Sends, and on 429 waits as `Retry-After` says (1 s if absent) and sends again, for at most
/// a minute: setup must get through a stack that runs with its rate limits on.
async fn send_patiently(request: impl Fn() -> reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let resp = request().send().await?;
        if resp.status().as_u16() != 429 || Instant::now() > deadline {
            return Ok(resp);
        }
        let wait = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(1);
        tokio::time::sleep(Duration::from_secs(wait.clamp(1, 10))).await;
    }
}

fn dec(v: &Value, field: &str) -> anyhow::Result<Decimal> {
    v[field].as_str().with_context(|| format!("market field {field} missing"))?.parse().context(field.to_owned())
}

/// `min_notional × 1.5` worth of the market at `price`, in whole quantity increments.
fn quantity_for(price: Decimal, increment: Decimal, min_notional: Decimal) -> Decimal {
    let target = (min_notional * Decimal::new(15, 1)).max(Decimal::ONE);
    ((target / (price * increment)).ceil() * increment).normalize()
}

async fn tradables(http: &reqwest::Client, api: &str) -> anyhow::Result<Vec<Tradable>> {
    let markets: Value = http.get(format!("{api}/markets")).send().await?.error_for_status()?.json().await?;
    let mut out = Vec::new();
    for m in markets["markets"].as_array().context("no markets array")? {
        if m["status"] != "trading" || m["last_price"].is_null() {
            continue;
        }
        let (price, pinc, qinc, min) =
            (dec(m, "last_price")?, dec(m, "price_increment")?, dec(m, "quantity_increment")?, dec(m, "min_notional")?);
        let limit = ((price / Decimal::TWO / pinc).floor() * pinc).max(pinc);
        out.push(Tradable {
            symbol: m["symbol"].as_str().unwrap_or_default().to_owned(),
            market_qty: quantity_for(price, qinc, min).to_string(),
            limit_price: limit.normalize().to_string(),
            limit_qty: quantity_for(limit, qinc, min).to_string(),
        });
    }
    anyhow::ensure!(!out.is_empty(), "no market has a price yet: is the prices worker running?");
    Ok(out)
}

/// Signs up `n` users, deposits into each, and waits until every deposit is completed.
async fn make_users(http: &reqwest::Client, api: &str, n: usize, run: &str) -> anyhow::Result<Vec<Arc<User>>> {
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (http, api, sem, email) =
            (http.clone(), api.to_owned(), sem.clone(), format!("lg-{run}-{i}@loadgen.example"));
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await?;
            let token = signup_and_login(&http, &api, &email).await?;
            let r = send_patiently(|| {
                http.post(format!("{api}/account/deposits"))
                    .bearer_auth(&token)
                    .json(&json!({"asset": "USD", "amount": DEPOSIT, "client_deposit_id": "loadgen"}))
            })
            .await?;
            anyhow::ensure!(r.status().is_success(), "deposit answered {}", r.status());
            anyhow::Ok(Arc::new(User { token, open: Mutex::new(Vec::new()) }))
        }));
    }
    let mut users = Vec::with_capacity(n);
    for t in tasks {
        users.push(t.await??);
    }
    // Every deposit must be completed before the clock starts.
    let deadline = Instant::now() + Duration::from_secs(120);
    for u in &users {
        loop {
            let p: Value = http.get(format!("{api}/portfolio")).bearer_auth(&u.token).send().await?.json().await?;
            if p["cash"]["available"].as_str().and_then(|s| s.parse::<Decimal>().ok()) >= Some(Decimal::from(1_000_000))
            {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "deposits not completed after 120 s: is the engine running?");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    println!("setup: {n} users signed up, logged in and funded in {:.1}s", started.elapsed().as_secs_f64());
    Ok(users)
}

enum Op {
    Market,
    Limit,
    Cancel,
}

fn pick(mix: Mix, rng: &mut SmallRng) -> Op {
    let r = rng.random_range(0..mix.market + mix.limit + mix.cancel);
    if r < mix.market {
        Op::Market
    } else if r < mix.market + mix.limit {
        Op::Limit
    } else {
        Op::Cancel
    }
}

struct Ctx {
    http: reqwest::Client,
    api: String,
    users: Vec<Arc<User>>,
    markets: Vec<Tradable>,
    tally: Tally,
    seq: AtomicU64,
    run: String,
    wait_fraction: f64,
}

/// One operation, scheduled at `scheduled`.
async fn one(ctx: Arc<Ctx>, op: Op, scheduled: Instant, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let user = ctx.users[rng.random_range(0..ctx.users.len())].clone();
    let m = &ctx.markets[rng.random_range(0..ctx.markets.len())];
    let cancel_target = match op {
        Op::Cancel => user.open.lock().ok().and_then(|mut v| v.pop()),
        _ => None,
    };
    if let Some(order_id) = cancel_target {
        let r = ctx.http.delete(format!("{}/orders/{order_id}", ctx.api)).bearer_auth(&user.token).send().await;
        match r {
            // 409: the order closed before the cancel arrived — a legitimate answer.
            Ok(r) if r.status().as_u16() == 202 || r.status().as_u16() == 409 => {
                ctx.tally.cancel.record(scheduled.elapsed());
                ctx.tally.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(r) => ctx.tally.failed(&ctx.tally.cancel_errors, format!("DELETE {}", r.status().as_u16())),
            Err(e) => ctx.tally.failed(&ctx.tally.cancel_errors, format!("DELETE {}", transport(&e))),
        }
        return;
    }
    let limit = matches!(op, Op::Limit | Op::Cancel);
    let n = ctx.seq.fetch_add(1, Ordering::Relaxed);
    let body = if limit {
        json!({"client_order_id": format!("lg{}-{n}", ctx.run), "symbol": m.symbol, "side": "buy", "type": "limit",
               "quantity": m.limit_qty, "limit_price": m.limit_price})
    } else {
        json!({"client_order_id": format!("lg{}-{n}", ctx.run), "symbol": m.symbol, "side": "buy", "type": "market",
               "quantity": m.market_qty})
    };
    let wait = rng.random_bool(ctx.wait_fraction.clamp(0.0, 1.0));
    let errors = if wait { &ctx.tally.e2e_errors } else { &ctx.tally.post_errors };
    let mut req = ctx.http.post(format!("{}/orders", ctx.api)).bearer_auth(&user.token).json(&body);
    if wait {
        req = req.header("Prefer", "wait=10");
    }
    match req.send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let expected = if wait { 201 } else { 202 };
            let elapsed = scheduled.elapsed();
            if status == expected {
                if wait {
                    ctx.tally.e2e.record(elapsed)
                } else {
                    ctx.tally.post.record(elapsed)
                }
                ctx.tally.ok.fetch_add(1, Ordering::Relaxed);
                if limit
                    && let Ok(v) = r.json::<Value>().await
                    && let Some(id) = v["id"].as_str().and_then(|s| s.parse::<Uuid>().ok())
                    && let Ok(mut open) = user.open.lock()
                {
                    open.push(id);
                }
            } else if wait && status == 202 {
                // No verdict within the wait: the order took at least this long. Shown on a line
                // of its own (as well as among the errors): left out, the slowest orders
                // vanished from the figures; in the verdicts' line, they would count as verdicts.
                ctx.tally.e2e_unanswered.record(elapsed);
                ctx.tally.failed(&ctx.tally.e2e_errors, "POST 202 (no verdict within the wait)".to_owned());
            } else {
                ctx.tally.failed(errors, format!("POST {status}"));
            }
        }
        Err(e) => ctx.tally.failed(errors, format!("POST {}", transport(&e))),
    }
}

fn transport(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect error"
    } else {
        "transport error"
    }
}

/// Orders of this run's users: (decided, total).
async fn decided(pool: &sqlx::PgPool, users: &[Uuid]) -> anyhow::Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status <> 'pending'), count(*) FROM orders WHERE user_id = ANY($1)",
    )
    .bind(users)
    .fetch_one(pool)
    .await?)
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let api = format!("{}/api/v1", args.api.trim_end_matches('/'));
    let http = client();
    let run = Uuid::new_v4().simple().to_string()[..8].to_owned();
    println!(
        "orders: api={api} users={} rate={} duration={:?} mix=market:{},limit:{},cancel:{} wait_fraction={} max_inflight={}",
        args.users,
        if args.rate == 0 { "flat-out".to_owned() } else { format!("{}/s", args.rate) },
        args.duration,
        args.mix.market,
        args.mix.limit,
        args.mix.cancel,
        args.wait_fraction,
        args.max_inflight
    );
    let markets = tradables(&http, &api).await?;
    let users = make_users(&http, &api, args.users, &run).await?;
    let pool = match &args.database_url {
        Some(url) => Some(sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(url).await?),
        None => None,
    };
    let user_ids: Vec<Uuid> = match &pool {
        Some(pool) => {
            sqlx::query_scalar("SELECT id FROM users WHERE email LIKE $1")
                .bind(format!("lg-{run}-%@loadgen.example"))
                .fetch_all(pool)
                .await?
        }
        None => Vec::new(),
    };
    let (decided_before, _) = match &pool {
        Some(pool) => decided(pool, &user_ids).await?,
        None => (0, 0),
    };
    let js = match &args.nats_url {
        Some(url) => Some(async_nats::jetstream::new(
            async_nats::ConnectOptions::new()
                .name("vault-loadgen")
                .connect(url)
                .await
                .context("connecting to NATS_URL")?,
        )),
        None => None,
    };
    let published_before = match &js {
        Some(js) => Some(published(js).await?),
        None => None,
    };

    let ctx = Arc::new(Ctx {
        http: http.clone(),
        api: api.clone(),
        users,
        markets,
        tally: Tally::default(),
        seq: AtomicU64::new(0),
        run,
        wait_fraction: args.wait_fraction,
    });
    let cpu = Arc::new(std::sync::Mutex::new(cpu::Tracker::new(cpu::snapshot(pool.as_ref()).await)));
    let started = Instant::now();
    let end = started + args.duration;
    let mut rng = SmallRng::seed_from_u64(7);

    // Progress, once a second.
    let progress = {
        let (ctx, pool, user_ids, cpu) = (ctx.clone(), pool.clone(), user_ids.clone(), cpu.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut last = decided_before;
            loop {
                tick.tick().await;
                let snapshot = cpu::snapshot(pool.as_ref()).await;
                cpu.lock().expect("the CPU tracker").observe(snapshot);
                let t = &ctx.tally;
                let committed = match &pool {
                    Some(pool) => match decided(pool, &user_ids).await {
                        Ok((d, total)) => {
                            let line = format!(" committed=+{}/s pending={}", d - last, total - d);
                            last = d;
                            line
                        }
                        Err(_) => String::new(),
                    },
                    None => String::new(),
                };
                println!(
                    "[{:>5.1}s] sent={} ok={} errors={} shed={} inflight={}{committed}",
                    started.elapsed().as_secs_f64(),
                    t.sent.load(Ordering::Relaxed),
                    t.ok.load(Ordering::Relaxed),
                    t.errors(),
                    t.shed.load(Ordering::Relaxed),
                    t.inflight.load(Ordering::Relaxed),
                );
            }
        })
    };

    let mut tasks = Vec::new();
    if args.rate == 0 {
        for w in 0..args.max_inflight {
            let ctx = ctx.clone();
            let mix = args.mix;
            tasks.push(tokio::spawn(async move {
                let mut rng = SmallRng::seed_from_u64(w as u64);
                while Instant::now() < end {
                    let op = pick(mix, &mut rng);
                    ctx.tally.sent.fetch_add(1, Ordering::Relaxed);
                    one(ctx.clone(), op, Instant::now(), rng.random()).await;
                }
            }));
        }
    } else {
        let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / args.rate.max(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        loop {
            let scheduled = tick.tick().await.into_std();
            if scheduled >= end {
                break;
            }
            ctx.tally.sent.fetch_add(1, Ordering::Relaxed);
            if ctx.tally.inflight.load(Ordering::Relaxed) >= args.max_inflight {
                // The generator itself is saturated: count it rather than queue without bound.
                ctx.tally.shed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let op = pick(args.mix, &mut rng);
            let seed = rng.random();
            let ctx = ctx.clone();
            ctx.tally.inflight.fetch_add(1, Ordering::Relaxed);
            tasks.push(tokio::spawn(async move {
                one(ctx.clone(), op, scheduled, seed).await;
                ctx.tally.inflight.fetch_sub(1, Ordering::Relaxed);
            }));
        }
    }
    futures::future::join_all(tasks).await;
    let sending = started.elapsed();

    // Committed during the run, then the drain.
    let mut committed_line = String::new();
    let mut committed_rate = None;
    let mut committed_orders = 0;
    if let Some(pool) = &pool {
        let (at_end, _) = decided(pool, &user_ids).await?;
        let deadline = Instant::now() + Duration::from_secs(300);
        let (mut done, mut total) = decided(pool, &user_ids).await?;
        while done < total && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            (done, total) = decided(pool, &user_ids).await?;
        }
        let all = started.elapsed();
        let during = (at_end - decided_before) as f64 / sending.as_secs_f64();
        let overall = (done - decided_before) as f64 / all.as_secs_f64();
        committed_rate = Some(during);
        committed_orders = u64::try_from(done - decided_before).unwrap_or(0);
        committed_line = format!(
            "committed by the engine: {during:.1}/s while sending; {} orders in {:.1}s including the drain = {overall:.1}/s; still pending: {}",
            done - decided_before,
            all.as_secs_f64(),
            total - done
        );
    }
    progress.abort();
    // Messages per committed order: what the stack's processes published into the streams an
    // order's path writes (commands and the engine's events; nothing else writes them here).
    let messages_per_order = match (&js, published_before) {
        (Some(js), Some(before)) if committed_orders > 0 => {
            let after = published(js).await?;
            let (orders, events) = (after.0 - before.0, after.1 - before.1);
            println!(
                "JetStream: {orders} commands and {events} events published = {:.2} messages per committed order",
                (orders + events) as f64 / committed_orders as f64
            );
            Some((orders + events) as f64 / committed_orders as f64)
        }
        _ => None,
    };
    let last = cpu::snapshot(pool.as_ref()).await;
    let cpu_lines = {
        let mut cpu = cpu.lock().expect("the CPU tracker");
        cpu.observe(last);
        cpu.report(committed_orders)
    };

    let t = &ctx.tally;
    let errors_of = |line: &AtomicU64| line.load(Ordering::Relaxed);
    println!();
    println!("{}", summary("POST /orders → 202", &t.post.snapshot(), errors_of(&t.post_errors), sending));
    println!("{}", summary("POST /orders Prefer:wait → 201", &t.e2e.snapshot(), errors_of(&t.e2e_errors), sending));
    let unanswered = t.e2e_unanswered.snapshot();
    if !unanswered.is_empty() {
        println!("{}", summary("Prefer:wait → 202, no verdict", &unanswered, 0, sending));
        println!("(each of those took at least the latency shown: a lower bound of its end-to-end latency)");
    }
    println!("{}", summary("DELETE /orders/{id}", &t.cancel.snapshot(), errors_of(&t.cancel_errors), sending));
    println!(
        "(rates over {:.1}s: the {:.1}s schedule and {:.1}s for the last answers)",
        sending.as_secs_f64(),
        args.duration.as_secs_f64(),
        sending.saturating_sub(args.duration).as_secs_f64()
    );
    if args.rate == 0 {
        println!(
            "(flat out, {} senders each waiting for its answer: closed loop, so the latencies are service times, not comparable with an open-loop run's)",
            args.max_inflight
        );
    }
    let shed = t.shed.load(Ordering::Relaxed);
    if shed > 0 {
        println!(
            "NOT A VALID LATENCY RUN: {shed} sends were shed at the generator's in-flight cap ({}); they are the ones that would have waited longest, so every percentile above is a lower bound (raise --max-inflight or offer less)",
            args.max_inflight
        );
    }
    let errors = t.by_status.lock().map(|m| m.clone()).unwrap_or_default();
    println!(
        "sent={} ok={} shed={} errors={} {:?}",
        t.sent.load(Ordering::Relaxed),
        t.ok.load(Ordering::Relaxed),
        t.shed.load(Ordering::Relaxed),
        t.errors(),
        errors
    );
    if !committed_line.is_empty() {
        println!("{committed_line}");
    }
    if !cpu_lines.is_empty() {
        println!("CPU per process from the first order to the end of the drain (Postgres by the process it serves):");
        for line in cpu_lines {
            println!("{line}");
        }
    }
    let accepted_rate = t.ok.load(Ordering::Relaxed) as f64 / sending.as_secs_f64();

    if args.limits {
        println!();
        println!("limits (each flat out, {} workers, {:?}):", args.limit_concurrency, args.limit_duration);
        let server = TrivialServer::spawn().await?;
        let body = json!({"client_order_id": "lg00000000-0", "symbol": "BTC-USD", "side": "buy", "type": "market", "quantity": "0.0001"});
        let floor = limits::http_post_floor(&http, &server, body, args.limit_concurrency, args.limit_duration).await;
        println!("{}", floor.line);
        println!("{}", ratio("API accepted orders", accepted_rate, "the trivial POST handler", floor.rate));
        let mut storage_and_backbone: Vec<(String, Limit)> = Vec::new();
        let mut publish_us = None;
        if let Some(url) = &args.nats_url {
            let backbone =
                limits::jetstream_publish(url, sample_command()?, args.limit_concurrency, args.limit_duration).await?;
            println!("{}", backbone.line);
            println!("{}", ratio("API accepted orders", accepted_rate, "JetStream publish+ack", backbone.rate));
            publish_us = Some(backbone.served_us());
            storage_and_backbone.push(("JetStream publish+ack".into(), backbone));
        }
        let mut storage_us = None;
        if let Some(url) = &args.database_url {
            // What each order cost alone, then as the engine writes them: 64 orders per
            // transaction from 2 workers (its 2 shards × 1 transaction under way); with an audit
            // row per message the run published per order (none when that is not known).
            let audit_rows = messages_per_order.map_or(0, |m| m.round() as usize);
            let alone =
                limits::postgres_commit(url, args.limit_concurrency, args.limit_duration, 1, audit_rows).await?;
            println!("{}", alone.line);
            let storage = limits::postgres_commit(url, 2, args.limit_duration, 64, audit_rows).await?;
            println!("{}", storage.line);
            if audit_rows > 0 {
                storage_us = Some(storage.served_us());
            }
            storage_and_backbone.push(("the raw Postgres writes in batches of 64".into(), storage));
        }
        if let (Some(committed), Some((name, l))) =
            (committed_rate, storage_and_backbone.iter().min_by(|a, b| a.1.rate.total_cmp(&b.1.rate)))
        {
            println!("{}", ratio("engine committed orders", committed, name, l.rate));
        }
        if let (Some(publish_us), Some(messages_per_order), Some(storage_us)) =
            (publish_us, messages_per_order, storage_us)
        {
            let bound = limits::Floor { http_us: floor.served_us(), publish_us, messages_per_order, storage_us };
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            for line in bound.lines(cores, FLOOR_TARGET) {
                println!("{line}");
            }
        }
    }
    Ok(())
}

/// The end-to-end rate the floor line compares with (the performance target).
const FLOOR_TARGET: f64 = 5_000.0;

/// The last sequences of the ORDERS and EVENTS streams: the messages ever published into them.
async fn published(js: &async_nats::jetstream::Context) -> anyhow::Result<(u64, u64)> {
    let mut last = [0; 2];
    for (slot, spec) in last.iter_mut().zip([vault_bus::streams::ORDERS, vault_bus::streams::EVENTS]) {
        *slot = js
            .get_stream(spec.name)
            .await
            .with_context(|| format!("the {} stream", spec.name))?
            .cached_info()
            .state
            .last_sequence;
    }
    Ok((last[0], last[1]))
}

/// The bytes the API publishes for a market buy, for the backbone limit.
fn sample_command() -> anyhow::Result<Vec<u8>> {
    use vault_bus::message::{CommandBody, OrderCommand, encode};
    use vault_core::domain::{OrderType, Positive, Side, Symbol, TimeInForce};
    let cmd = OrderCommand {
        user_id: Uuid::now_v7(),
        request_id: Some(Uuid::now_v7().to_string()),
        at: chrono::Utc::now(),
        body: CommandBody::Place {
            order_id: Uuid::now_v7(),
            client_order_id: "lg00000000-000000".into(),
            symbol: Symbol::parse("BTC-USD").map_err(anyhow::Error::msg)?,
            side: Side::Buy,
            order_type: OrderType::Market,
            time_in_force: TimeInForce::Ioc,
            quantity: Positive::new(Decimal::new(1, 4)).map_err(anyhow::Error::msg)?,
            limit_price: None,
        },
    };
    Ok(encode(&cmd)?)
}

/// `GET /portfolio` flat out from `concurrency` clients, against the trivial GET handler.
pub async fn reads(base: &str, concurrency: usize, duration: Duration) -> anyhow::Result<()> {
    let api = format!("{}/api/v1", base.trim_end_matches('/'));
    let http = client();
    let run = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let token = signup_and_login(&http, &api, &format!("lg-{run}-reader@loadgen.example")).await?;
    let r = http
        .post(format!("{api}/account/deposits"))
        .bearer_auth(&token)
        .json(&json!({"asset": "USD", "amount": DEPOSIT, "client_deposit_id": "loadgen"}))
        .send()
        .await?;
    anyhow::ensure!(r.status().as_u16() == 202, "deposit answered {}", r.status());
    println!("reads: GET /portfolio flat out, {concurrency} clients, {duration:?}");
    let latencies = Latencies::default();
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let end = started + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (http, url, token, latencies, errors) =
            (http.clone(), format!("{api}/portfolio"), token.clone(), latencies.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                let t = Instant::now();
                let ok = match http.get(&url).bearer_auth(&token).send().await {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if ok {
                    latencies.record(t.elapsed());
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    futures::future::join_all(tasks).await;
    let elapsed = started.elapsed();
    let h = latencies.snapshot();
    println!("{}", summary("GET /portfolio", &h, errors.load(Ordering::Relaxed), elapsed));
    let server = TrivialServer::spawn().await?;
    let floor = limits::http_get_floor(&http, &server, concurrency, duration).await;
    println!("{}", floor.line);
    println!(
        "{}",
        ratio("GET /portfolio", h.len() as f64 / elapsed.as_secs_f64(), "the trivial GET handler", floor.rate)
    );
    Ok(())
}
