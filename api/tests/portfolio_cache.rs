//! The portfolio cache (`vault_api::trading::portfolio_cache`) against real servers: what a
//! client can observe of its staleness rule.
//!
//! Where a test must tell an event's invalidation apart from the age bound, the API is built in
//! this process with an age bound of ten minutes, so within the tests' deadlines only an event
//! (or the feed being down) can make a change visible; the `vault-engine` binary applies the
//! deposits and orders. The age bound itself is tested on the `vault-api` binary with its
//! default of one second. Every wait is a deadline, never a sleep.

mod support;

use std::time::{Duration, Instant};

use chrono::Utc;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::Api;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vault_api::startup::Tunables;
use vault_api::trading::portfolio_cache::{PortfolioCacheConfig, TTL};
use vault_api::{Application, ws::WsConfig};
use vault_bus::message::{NotificationPush, PriceTick};
use vault_bus::{Bus, MessageContext};
use vault_core::domain::{Positive, Symbol};
use vault_testkit::{NatsServer, Proc, TEST_JWT_SECRET, TestDb, base_env, http_client, poll_until, workspace_binary};

/// How long anything expected may take; far below [`LONG_TTL`].
const WAIT: Duration = Duration::from_secs(20);

/// The age bound of the API built in process: longer than any test, so it never expires.
const LONG_TTL: Duration = Duration::from_secs(600);

/// The API built in this process with [`LONG_TTL`], over its own nats-server and database.
struct InProcess {
    addr: String,
    http: reqwest::Client,
    shutdown: CancellationToken,
    nats: NatsServer,
    db: TestDb,
}

impl InProcess {
    async fn start() -> InProcess {
        use figment::Figment;
        use figment::providers::Serialized;
        let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
        let figment = Figment::from(Serialized::default("database_url", &db.url))
            .merge(Serialized::default("nats_url", nats.url()))
            .merge(Serialized::default("jwt_secret", TEST_JWT_SECRET))
            .merge(Serialized::default("api_addr", "127.0.0.1:0"))
            .merge(Serialized::default("rate_limit_user_per_sec", 0));
        let settings = vault_core::Settings::from_figment(vault_core::Role::Api, &figment).expect("settings");
        let tunables = Tunables {
            ws: WsConfig::default(),
            portfolio_cache: PortfolioCacheConfig { ttl: LONG_TTL, ..PortfolioCacheConfig::default() },
        };
        let shutdown = CancellationToken::new();
        let app = Application::build_tuned(settings, tunables, shutdown.clone()).await.expect("the API builds");
        let addr = app.local_addr().expect("bound").to_string();
        tokio::spawn(app.run());
        InProcess { addr, http: http_client(), shutdown, nats, db }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}/api/v1{path}", self.addr)
    }

    /// Signs `email` up and logs in; returns the access token and the user id.
    async fn user(&self, email: &str) -> (String, Uuid) {
        let body = json!({"email": email, "password": support::PASSWORD});
        let signup = self.http.post(self.url("/auth/signup")).json(&body).send().await.expect("signup");
        assert_eq!(signup.status(), 201);
        let id = signup.json::<Value>().await.expect("json")["id"].as_str().expect("id").parse().expect("uuid");
        let login = self.http.post(self.url("/auth/login")).json(&body).send().await.expect("login");
        assert_eq!(login.status(), 200);
        let token = login.json::<Value>().await.expect("json")["access_token"].as_str().expect("token").to_owned();
        (token, id)
    }

    async fn portfolio(&self, token: &str) -> Value {
        let resp = self.http.get(self.url("/portfolio")).bearer_auth(token).send().await.expect("the API answers");
        assert_eq!(resp.status(), 200);
        resp.json().await.expect("json")
    }

    async fn cash(&self, token: &str) -> String {
        self.portfolio(token).await["cash"]["total"].as_str().expect("a decimal string").to_owned()
    }

    /// Sets the user's USD balance in the database directly: a change no event announces.
    async fn set_cash_behind_the_caches_back(&self, user: Uuid, total: u32) {
        sqlx::query(
            "INSERT INTO balances (user_id, asset, total, reserved, cost_basis) VALUES ($1, 'USD', $2, 0, 0)
             ON CONFLICT (user_id, asset) DO UPDATE SET total = EXCLUDED.total",
        )
        .bind(user)
        .bind(rust_decimal::Decimal::from(total))
        .execute(&self.db.pool().await)
        .await
        .expect("balance written");
    }

    /// Waits until the user's portfolio is served from the cache: a read is kept, and a change
    /// made behind the cache's back after it does not show. (The cache serves only once its
    /// event feed has confirmed its subscription on the current connection.) Returns the cash
    /// total the cache holds.
    async fn until_cached(&self, user: Uuid, token: &str) -> String {
        let mut next = 1_000;
        poll_until(WAIT, "the portfolio to be served from the cache", || {
            next += 1;
            let value = next;
            async move {
                let held = self.cash(token).await;
                self.set_cash_behind_the_caches_back(user, value).await;
                (self.cash(token).await == held).then_some(held)
            }
        })
        .await
    }

    /// Waits until the cache serves, shown on a user of its own (its balances are rewritten).
    async fn until_feed_live(&self) {
        let (token, user) = self.user(&format!("probe-{}@example.com", Uuid::now_v7().simple())).await;
        self.until_cached(user, &token).await;
    }

    async fn readyz(&self) -> u16 {
        match self.http.get(format!("http://{}/readyz", self.addr)).send().await {
            Ok(resp) => resp.status().as_u16(),
            Err(_) => 0,
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The `vault-engine` binary over the API's nats-server and database.
async fn engine(api: &InProcess) -> Proc {
    Proc::start_ready(&workspace_binary("vault-engine"), &[], &base_env(&api.db, &api.nats)).await.0
}

fn btc_of(portfolio: &Value) -> Option<&str> {
    portfolio["positions"].as_array()?.iter().find(|p| p["asset"] == "BTC")?["quantity"].as_str()
}

#[tokio::test(flavor = "multi_thread")]
async fn what_the_engine_applies_shows_in_the_next_portfolio_read_once_its_event_reached_the_api() {
    let api = InProcess::start().await;
    let _engine = engine(&api).await;
    let (token, user) = api.user("cache-events@example.com").await;
    api.until_feed_live().await;
    // Held from now on: only an event can make the deposit visible in time (the cache's age
    // bound is ten minutes).
    assert_eq!(api.cash(&token).await, "0");

    let deposit = api
        .http
        .post(api.url("/account/deposits"))
        .bearer_auth(&token)
        .json(&json!({"asset": "USD", "amount": "20000"}))
        .send()
        .await
        .expect("deposit");
    assert_eq!(deposit.status(), 202);
    poll_until(WAIT, "the deposit to show once its event arrived", || async {
        (api.cash(&token).await == "20000").then_some(())
    })
    .await;

    let bus = Bus::connect(&api.nats.url(), "cache-test").await.expect("bus");
    let tick = PriceTick {
        symbol: Symbol::parse("BTC-USD").expect("symbol"),
        price: Positive::new(50_000.into()).expect("positive"),
        ts: Utc::now(),
        source: "test".into(),
        seq: 1,
    };
    bus.publish(&tick, &MessageContext::default()).await.expect("tick");
    poll_until(WAIT, "the API to see the tick", || async {
        let t: Value = api.http.get(api.url("/markets/BTC-USD/ticker")).send().await.ok()?.json().await.ok()?;
        (t["price"] == "50000").then_some(())
    })
    .await;
    let order = json!({"symbol": "BTC-USD", "side": "buy", "type": "market", "quantity": "0.1"});

    // A fill answered 201 through `Prefer: wait`: the very next read shows it.
    assert_eq!(btc_of(&api.portfolio(&token).await), None);
    let waited = api
        .http
        .post(api.url("/orders"))
        .bearer_auth(&token)
        .header("prefer", "wait=10")
        .json(&order)
        .send()
        .await
        .expect("order");
    assert_eq!(waited.status(), 201);
    assert_eq!(waited.json::<Value>().await.expect("json")["status"], "filled");
    let after = api.portfolio(&token).await;
    assert_eq!(btc_of(&after), Some("0.1"), "{after}");
    assert_eq!(after["cash"]["total"], "14995", "20000 − 5000 − a fee of 5: {after}");
    assert_eq!(after["positions"][0]["market_price"], "50000", "marked to the latest price");

    // A fill seen first as an `orders` frame on this process's WebSocket: the very next read
    // shows it too.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/api/v1/ws", api.addr)).await.expect("the upgrade succeeds");
    for frame in [json!({"op": "auth", "token": token}), json!({"op": "subscribe", "channels": ["orders"]})] {
        ws.send(Message::text(frame.to_string())).await.expect("send");
        let answer = next_json(&mut ws).await;
        assert!(answer["op"] == "authenticated" || answer["op"] == "subscribed", "{answer}");
    }
    assert_eq!(btc_of(&api.portfolio(&token).await), Some("0.1"));
    let placed = api.http.post(api.url("/orders")).bearer_auth(&token).json(&order).send().await.expect("order");
    assert_eq!(placed.status(), 202);
    loop {
        let frame = next_json(&mut ws).await;
        if frame["channel"] == "orders" && frame["data"]["type"] == "order.filled" {
            break;
        }
    }
    let after = api.portfolio(&token).await;
    assert_eq!(btc_of(&after), Some("0.2"), "{after}");
    assert_eq!(after["cash"]["total"], "9990", "{after}");

    // A change seen first as a `notifications` frame (the notify worker writes it after the
    // engine's commit): the very next read shows it too. Here the change is made in Postgres
    // behind the cache's back, and the frame is pushed as the notify worker pushes it.
    ws.send(Message::text(json!({"op": "subscribe", "channels": ["notifications"]}).to_string())).await.expect("send");
    assert_eq!(next_json(&mut ws).await["op"], "subscribed");
    sqlx::query("UPDATE balances SET total = total + 1 WHERE user_id = $1 AND asset = 'USD'")
        .bind(user)
        .execute(&api.db.pool().await)
        .await
        .expect("balance");
    let push = NotificationPush {
        id: Uuid::now_v7(),
        user_id: user,
        kind: "deposit.completed".into(),
        title: "Deposit completed".into(),
        body: "1 USD".into(),
        data: json!({}),
        created_at: Utc::now(),
    };
    bus.push(&push, &MessageContext::default()).await.expect("pushed");
    loop {
        let frame = next_json(&mut ws).await;
        if frame["channel"] == "notifications" {
            break;
        }
    }
    let after = api.portfolio(&token).await;
    assert_eq!(after["cash"]["total"], "9991", "{after}");
}

/// The next text frame as JSON, within [`WAIT`].
async fn next_json<S>(ws: &mut S) -> Value
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("a frame within the deadline") {
            Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).expect("JSON"),
            Some(Ok(_)) => continue,
            other => panic!("the WebSocket ended: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_change_made_behind_the_caches_back_shows_within_its_age_bound() {
    let api = Api::start().await;
    let email = "cache-age@example.com";
    let user: Uuid = api.signup(email).await["id"].as_str().expect("id").parse().expect("uuid");
    let token = api.tokens(email).await["access_token"].as_str().expect("token").to_owned();
    let cash = |p: Value| p["cash"]["total"].as_str().map(str::to_owned);
    assert_eq!(cash(api.get("/portfolio", Some(&token)).await.json().await.expect("json")).as_deref(), Some("0"));

    // An operator's SQL: no event announces it.
    sqlx::query("INSERT INTO balances (user_id, asset, total, reserved, cost_basis) VALUES ($1, 'USD', 250, 0, 0)")
        .bind(user)
        .execute(&api.db.pool().await)
        .await
        .expect("balance");
    let committed = Instant::now();
    poll_until(WAIT, "the change to show", || async {
        let sent = Instant::now();
        let shown = cash(api.get("/portfolio", Some(&token)).await.json().await.ok()?)?;
        if shown == "250" {
            return Some(());
        }
        // A read that reached the API more than the bound after the commit must show it.
        assert!(sent.duration_since(committed) <= TTL, "still {shown} {:?} after the commit", sent - committed);
        None
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cache_is_not_served_while_the_event_feed_is_down_nor_from_before_a_reconnect() {
    let mut api = InProcess::start().await;
    let (token, user) = api.user("cache-feed@example.com").await;
    let held = api.until_cached(user, &token).await;

    api.nats.kill();
    api.set_cash_behind_the_caches_back(user, 7).await;
    poll_until(WAIT, "the database's value while NATS is down", || async {
        (api.cash(&token).await == "7").then_some(())
    })
    .await;
    assert_ne!(held, "7");
    // Nothing read while the feed is down is kept.
    api.set_cash_behind_the_caches_back(user, 8).await;
    assert_eq!(api.cash(&token).await, "8");

    // Serving resumes once the feed is back...
    api.nats.restart().await;
    poll_until(WAIT, "/readyz after NATS is back", || async { (api.readyz().await == 200).then_some(()) }).await;
    let held = api.until_cached(user, &token).await;
    // ...and what was cached before a reconnect is not served after it: events published in
    // between may have been lost.
    api.nats.kill();
    api.set_cash_behind_the_caches_back(user, 9).await;
    api.nats.restart().await;
    poll_until(WAIT, "/readyz after NATS is back", || async { (api.readyz().await == 200).then_some(()) }).await;
    api.until_feed_live().await;
    assert_ne!(held, "9");
    assert_eq!(api.cash(&token).await, "9");
}
