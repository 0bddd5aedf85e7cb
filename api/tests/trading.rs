//! The API side of trading against the real API over HTTP, with its own Postgres database and
//! nats-server: markets and prices, deposits, admin halts.
//!
//! The engine does not run here. Where a test needs one of its decisions it writes the row
//! directly, and says so.

mod support;

use std::time::Duration;

use chrono::Utc;
use reqwest::{Method, Response};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use support::{Api, problem};
use uuid::Uuid;
use vault_bus::message::PriceTick;
use vault_bus::{Bus, MessageContext, streams, subjects};
use vault_core::domain::{Positive, Symbol};
use vault_testkit::{Proc, READY_DEADLINE, base_env, free_port, poll_until};

const DEADLINE: Duration = Duration::from_secs(15);

/// A signed-up, logged-in user: (access token, user id).
async fn trader(api: &Api, email: &str) -> (String, Uuid) {
    let user = api.signup(email).await;
    let id = user["id"].as_str().and_then(|id| id.parse().ok()).expect("user id");
    let token = api.tokens(email).await["access_token"].as_str().expect("access token").to_owned();
    (token, id)
}

/// One message stored on a stream.
#[derive(Debug)]
struct Stored {
    subject: String,
    msg_id: Option<String>,
    request_id: Option<String>,
    payload: Value,
}

async fn stream_messages(api: &Api, stream: &str) -> Vec<Stored> {
    let client = async_nats::connect(api.nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(stream).await.expect("stream");
    let state = stream.info().await.expect("info").state.clone();
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(msg) = stream.get_raw_message(seq).await {
            out.push(Stored {
                subject: msg.subject.to_string(),
                msg_id: msg.headers.get(vault_bus::MSG_ID_HEADER).map(|v| v.as_str().to_owned()),
                request_id: msg.headers.get(vault_bus::REQUEST_ID_HEADER).map(|v| v.as_str().to_owned()),
                payload: serde_json::from_slice(&msg.payload).expect("json payload"),
            });
        }
    }
    out
}

async fn count(api: &Api, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&api.db.pool().await).await.expect("count")
}

async fn json_of(resp: Response, status: u16) -> Value {
    assert_eq!(resp.status(), status, "unexpected status");
    resp.json().await.expect("json body")
}

async fn publish_tick(api: &Api, symbol: &str, price: &str, seq: u64) {
    let bus = Bus::connect(&api.nats.url(), "test").await.expect("bus");
    let tick = PriceTick {
        symbol: Symbol::parse(symbol).expect("symbol"),
        price: Positive::new(price.parse::<Decimal>().expect("decimal")).expect("positive"),
        ts: Utc::now(),
        source: "test".to_owned(),
        seq,
    };
    bus.publish(&tick, &MessageContext::default()).await.expect("tick published");
}

async fn wait_for_price(api: &Api, symbol: &str, price: &str) -> Value {
    poll_until(DEADLINE, &format!("the ticker of {symbol} to show {price}"), || async {
        let resp = api.get(&format!("/markets/{symbol}/ticker"), None).await;
        let body: Value = resp.json().await.ok()?;
        (body["price"] == price).then_some(body)
    })
    .await
}

#[tokio::test]
async fn markets_list_the_seeded_markets_and_follow_price_ticks() {
    let api = Api::start().await;
    let markets = json_of(api.get("/markets", None).await, 200).await;
    let list = markets["markets"].as_array().expect("markets");
    let symbols: Vec<&str> = list.iter().filter_map(|m| m["symbol"].as_str()).collect();
    assert_eq!(
        symbols,
        [
            "ADA-USD", "AVAX-USD", "BTC-USD", "DOGE-USD", "DOT-USD", "ETH-USD", "LINK-USD", "LTC-USD", "SOL-USD",
            "XRP-USD"
        ]
    );
    let btc = list.iter().find(|m| m["symbol"] == "BTC-USD").expect("BTC-USD");
    assert_eq!(btc["base"], "BTC");
    assert_eq!(btc["quote"], "USD");
    assert_eq!(btc["status"], "trading");
    assert_eq!(btc["price_increment"], "0.01", "decimals are strings");
    assert_eq!(btc["quantity_increment"], "0.00001");
    assert_eq!(btc["min_notional"], "1");
    assert_eq!(btc["taker_fee_rate"], "0.001");
    assert_eq!((btc["last_price"].clone(), btc["last_price_at"].clone()), (Value::Null, Value::Null));

    problem(api.get("/markets/BTC-USD/ticker", None).await, 404, "no_price").await;
    problem(api.get("/markets/FOO-USD/ticker", None).await, 404, "not_found").await;

    publish_tick(&api, "BTC-USD", "50000.01", 1).await;
    let ticker = wait_for_price(&api, "BTC-USD", "50000.01").await;
    assert_eq!(ticker["symbol"], "BTC-USD");
    assert_eq!(ticker["source"], "test");
    assert!(ticker["ts"].as_str().is_some_and(|ts| ts.ends_with('Z')), "{ticker}");
    publish_tick(&api, "BTC-USD", "50100", 2).await;
    let ticker = wait_for_price(&api, "BTC-USD", "50100").await;
    let markets = json_of(api.get("/markets", None).await, 200).await;
    let btc = markets["markets"].as_array().and_then(|l| l.iter().find(|m| m["symbol"] == "BTC-USD")).expect("BTC-USD");
    assert_eq!(btc["last_price"], "50100");
    assert_eq!(btc["last_price_at"], ticker["ts"]);

    // A freshly started API knows the latest price from the stream (last per subject).
    let addr = format!("127.0.0.1:{}", free_port());
    let mut envs = base_env(&api.db, &api.nats);
    envs.push(("API_ADDR", addr.clone()));
    let mut second = Proc::spawn(support::BIN, &["serve"], &envs);
    second.wait_http_status(&addr, "/readyz", 200, READY_DEADLINE).await;
    let client = vault_testkit::http_client();
    let url = format!("http://{addr}/api/v1/markets/BTC-USD/ticker");
    let ticker = poll_until(DEADLINE, "the second API to know the latest price", || async {
        let body: Value = client.get(&url).send().await.ok()?.json().await.ok()?;
        (body["price"] == "50100").then_some(body)
    })
    .await;
    assert_eq!(ticker["symbol"], "BTC-USD");
}

#[tokio::test]
async fn deposits_are_accepted_pending_idempotent_and_validated() {
    let api = Api::start().await;
    let (token, user) = trader(&api, "ivy@example.com").await;
    let body = json!({"asset": "USD", "amount": "1000.50", "client_deposit_id": "dep-1"});
    let deposit = json_of(api.post("/account/deposits", Some(&token), body.clone()).await, 202).await;
    assert_eq!(deposit["status"], "pending");
    assert_eq!(deposit["asset"], "USD");
    assert_eq!(deposit["amount"], "1000.5");
    assert_eq!(deposit["client_deposit_id"], "dep-1");
    let again = json_of(api.post("/account/deposits", Some(&token), body).await, 200).await;
    assert_eq!(again["id"], deposit["id"]);
    assert_eq!(count(&api, "SELECT count(*) FROM deposits").await, 1);

    let stored = stream_messages(&api, streams::ORDERS.name).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].msg_id.as_deref(), Some(format!("{user}:deposit:dep-1").as_str()));
    assert_eq!(stored[0].subject, subjects::order_command(user));
    assert!(stored[0].request_id.is_some(), "the request id travels in the headers");
    assert_eq!(stored[0].payload["type"], "deposit");
    assert_eq!(stored[0].payload["deposit_id"], deposit["id"]);
    assert_eq!(stored[0].payload["amount"], "1000.5");

    let generated =
        json_of(api.post("/account/deposits", Some(&token), json!({"asset": "BTC", "amount": 0.5})).await, 202).await;
    assert!(generated["client_deposit_id"].as_str().is_some_and(|c| !c.is_empty()));

    for (what, body, field) in [
        ("over the maximum", json!({"asset": "USD", "amount": "1000000.01"}), "amount"),
        ("negative", json!({"asset": "USD", "amount": "-5"}), "amount"),
        ("zero", json!({"asset": "USD", "amount": "0"}), "amount"),
        ("more than 8 decimals", json!({"asset": "USD", "amount": "1.000000001"}), "amount"),
        ("not an asset of ours", json!({"asset": "EUR", "amount": "5"}), "asset"),
        ("malformed asset", json!({"asset": "usd!", "amount": "5"}), "asset"),
    ] {
        let body = problem(api.post("/account/deposits", Some(&token), body).await, 422, "validation_failed").await;
        assert_eq!(body["errors"][0]["field"], field, "{what}: {body}");
    }
    json_of(api.post("/account/deposits", Some(&token), json!({"asset": "USD", "amount": "1000000"})).await, 202).await;
    assert_eq!(count(&api, "SELECT count(*) FROM deposits").await, 3);
}

#[tokio::test]
async fn admins_halt_and_resume_markets_and_users_cannot() {
    let api = Api::start().await;
    let (user, _) = trader(&api, "jon@example.com").await;
    let (admin, _) = trader(&api, "kim@example.com").await;
    api.promote("kim@example.com").await;

    problem(api.call(Method::POST, "/admin/markets/BTC-USD/halt", Some(&user), None).await, 403, "forbidden").await;
    problem(api.call(Method::POST, "/admin/markets/FOO-USD/halt", Some(&admin), None).await, 404, "not_found").await;
    let status_of = |markets: Value| {
        markets["markets"].as_array().and_then(|l| l.iter().find(|m| m["symbol"] == "SOL-USD").cloned()).expect("SOL")["status"]
            .clone()
    };
    let resp = api.call(Method::POST, "/admin/markets/SOL-USD/halt", Some(&admin), None).await;
    assert_eq!(resp.status(), 204);
    assert_eq!(status_of(json_of(api.get("/markets", None).await, 200).await), "halted");
    problem(api.call(Method::POST, "/admin/markets/SOL-USD/resume", Some(&user), None).await, 403, "forbidden").await;
    let resp = api.call(Method::POST, "/admin/markets/SOL-USD/resume", Some(&admin), None).await;
    assert_eq!(resp.status(), 204);
    assert_eq!(status_of(json_of(api.get("/markets", None).await, 200).await), "trading");
}

#[tokio::test]
async fn the_price_feed_follows_again_after_nats_restarts() {
    let mut api = Api::start().await;
    publish_tick(&api, "ETH-USD", "3000", 1).await;
    wait_for_price(&api, "ETH-USD", "3000").await;
    api.nats.kill();
    api.proc.wait_http_status(&api.addr, "/readyz", 503, READY_DEADLINE).await;
    let ticker = json_of(api.get("/markets/ETH-USD/ticker", None).await, 200).await;
    assert_eq!(ticker["price"], "3000", "the last price is kept while NATS is away");
    api.nats.restart().await;
    api.proc.wait_http_status(&api.addr, "/readyz", 200, READY_DEADLINE).await;
    publish_tick(&api, "ETH-USD", "3100.5", 2).await;
    wait_for_price(&api, "ETH-USD", "3100.5").await;
}
