//! The API side of trading against the real API over HTTP, with its own Postgres database and
//! nats-server: markets and prices, admin halts.

mod support;

use std::time::Duration;

use chrono::Utc;
use reqwest::{Method, Response};
use rust_decimal::Decimal;
use serde_json::Value;
use support::{Api, problem};
use uuid::Uuid;
use vault_bus::message::PriceTick;
use vault_bus::{Bus, MessageContext};
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
