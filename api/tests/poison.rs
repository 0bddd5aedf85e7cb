//! Poisoned messages on the stream the API consumes: PRICES, followed by an ordered consumer
//! that keeps the latest price of every market in memory. An ordered consumer acks nothing, so
//! it parks nothing (by design: a tick is superseded by the next one anyway): a tick that does
//! not decode is skipped, logged and counted in `vault_api_price_ticks_undecodable_total`, and
//! the next good tick is the market's price.

mod support;

use std::time::Duration;

use chrono::Utc;
use rust_decimal_macros::dec;
use serde_json::Value;
use support::{Api, problem};
use vault_bus::message::{PriceTick, encode};
use vault_bus::{Bus, MessageContext, subjects};
use vault_core::domain::{Positive, Symbol};
use vault_testkit::poll_until;

async fn undecodable_ticks(api: &Api) -> f64 {
    let text = api.client.get(format!("http://{}/metrics", api.addr)).send().await.expect("metrics").text().await;
    text.expect("text")
        .lines()
        .find_map(|l| l.strip_prefix("vault_api_price_ticks_undecodable_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_poisoned_price_tick_is_skipped_and_counted_and_the_next_one_is_the_price() {
    let api = Api::start().await;
    let bus = Bus::connect(&api.nats.url(), "test").await.expect("connects");
    let subject = subjects::price("BTC-USD");
    let tick = |price, seq| PriceTick {
        symbol: Symbol::parse("BTC-USD").expect("symbol"),
        price: Positive::new(price).expect("positive"),
        ts: Utc::now(),
        source: "test".into(),
        seq,
    };
    let send = |payload: Vec<u8>| {
        let (bus, subject) = (bus.clone(), subject.clone());
        async move { bus.jetstream().publish(subject, payload.into()).await.expect("send").await.expect("ack") }
    };

    // Not a tick; a tick of another schema version; a tick with a negative price.
    send(b"\x00{garbage".to_vec()).await;
    let mut json: Value = serde_json::from_slice(&encode(&tick(dec!(50000), 1)).expect("encodes")).expect("json");
    json["v"] = 2.into();
    send(json.to_string().into_bytes()).await;
    json["v"] = 1.into();
    json["price"] = "-50000".into();
    send(json.to_string().into_bytes()).await;
    poll_until(Duration::from_secs(20), "three undecodable ticks counted", || async {
        (undecodable_ticks(&api).await == 3.0).then_some(())
    })
    .await;
    problem(api.get("/markets/BTC-USD/ticker", None).await, 404, "no_price").await;

    // The feed goes on: the next good tick is the price.
    bus.publish(&tick(dec!(50123.45), 2), &MessageContext::default()).await.expect("tick");
    let ticker: Value = poll_until(Duration::from_secs(20), "the good tick in the ticker", || async {
        let resp = api.get("/markets/BTC-USD/ticker", None).await;
        if resp.status() != 200 {
            return None;
        }
        resp.json().await.ok()
    })
    .await;
    assert_eq!(ticker["price"], "50123.45", "{ticker}");
    assert_eq!(undecodable_ticks(&api).await, 3.0);
}
