//! End to end over HTTP: the API and the engine binaries with their own nats-server and
//! database; prices are published on PRICES as any price source would.

mod support;

use std::time::Duration;

use chrono::Utc;
use reqwest::Method;
use serde_json::{Value, json};
use support::{Api, problem};
use vault_bus::message::PriceTick;
use vault_bus::{Bus, MessageContext};
use vault_core::domain::{Positive, Symbol};
use vault_testkit::{Proc, READY_DEADLINE, base_env, free_port, poll_until, workspace_binary};

const WAIT: Duration = Duration::from_secs(20);

struct Stack {
    api: Api,
    _engine: Proc,
    bus: Bus,
    seq: u64,
}

impl Stack {
    async fn start() -> Stack {
        let api = Api::start().await;
        let addr = format!("127.0.0.1:{}", free_port());
        let mut envs = base_env(&api.db, &api.nats);
        envs.push(("OPS_ADDR", addr.clone()));
        let mut engine = Proc::spawn(&workspace_binary("vault-engine"), &[], &envs);
        engine.wait_http_status(&addr, "/readyz", 200, READY_DEADLINE).await;
        let bus = Bus::connect(&api.nats.url(), "e2e").await.expect("connects");
        Stack { api, _engine: engine, bus, seq: 0 }
    }

    async fn tick(&mut self, symbol: &str, price: rust_decimal::Decimal) {
        self.seq += 1;
        let tick = PriceTick {
            symbol: Symbol::parse(symbol).expect("symbol"),
            price: Positive::new(price).expect("positive"),
            ts: Utc::now(),
            source: "e2e".into(),
            seq: self.seq,
        };
        self.bus.publish(&tick, &MessageContext::default()).await.expect("tick");
    }

    /// Deposits and waits until the portfolio shows it.
    async fn fund(&self, token: &str, amount: &str) {
        let resp = self.api.post("/account/deposits", Some(token), json!({"asset": "USD", "amount": amount})).await;
        assert_eq!(resp.status(), 202);
        poll_until(WAIT, "the deposit to reach the portfolio", || async {
            let p: Value = self.api.get("/portfolio", Some(token)).await.json().await.ok()?;
            (p["cash"]["total"].as_str()? != "0").then_some(())
        })
        .await;
    }

    /// Waits until the API shows the ticker at `price` (the API follows PRICES too).
    async fn wait_ticker(&self, symbol: &str, price: &str) {
        poll_until(WAIT, "the API to see the tick", || async {
            let t: Value = self.api.get(&format!("/markets/{symbol}/ticker"), None).await.json().await.ok()?;
            (t["price"].as_str()?.parse::<rust_decimal::Decimal>().ok()?
                == price.parse::<rust_decimal::Decimal>().ok()?)
            .then_some(())
        })
        .await;
    }

    async fn order(&self, token: &str, id: &str) -> Value {
        self.api.get(&format!("/orders/{id}"), Some(token)).await.json().await.expect("order json")
    }
}

fn dec(v: &Value) -> rust_decimal::Decimal {
    v.as_str().unwrap_or_else(|| panic!("a decimal string, got {v}")).parse().expect("decimal")
}

#[tokio::test]
async fn an_order_placed_over_http_is_filled_by_the_engine_and_reads_back_everywhere() {
    let mut s = Stack::start().await;
    let token = s.api.user("trader@example.com").await;
    s.fund(&token, "10000").await;
    s.tick("BTC-USD", "50000".parse().expect("decimal")).await;
    s.wait_ticker("BTC-USD", "50000").await;

    let resp = s
        .api
        .client
        .post(s.api.url("/orders"))
        .bearer_auth(&token)
        .header("prefer", "wait=5")
        .json(&json!({"client_order_id": "first-buy", "symbol": "BTC-USD", "side": "buy", "type": "market", "quantity": "0.1"}))
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.status(), 201, "Prefer: wait answers with the verdict");
    let order: Value = resp.json().await.expect("json");
    assert_eq!(order["status"], "filled", "{order}");
    assert_eq!(dec(&order["filled_quantity"]), "0.1".parse().expect("d"));
    assert_eq!(dec(&order["average_fill_price"]), "50000".parse().expect("d"));
    assert_eq!(dec(&order["fee"]), "5".parse().expect("d"));
    assert_eq!(order["fills"].as_array().expect("fills").len(), 1);
    assert_eq!(order["fills"][0]["liquidity"], "taker");

    let id = order["id"].as_str().expect("id");
    assert_eq!(s.order(&token, id).await["status"], "filled");
    let by_client: Value = s.api.get("/orders/by-client-id/first-buy", Some(&token)).await.json().await.expect("json");
    assert_eq!(by_client["id"], order["id"]);
    // The same client_order_id again: the existing order, never a second one.
    let again = s
        .api
        .post("/orders", Some(&token), json!({"client_order_id": "first-buy", "symbol": "BTC-USD", "side": "buy", "type": "market", "quantity": "0.1"}))
        .await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.expect("json")["id"], order["id"]);

    let fills: Value = s.api.get("/fills?symbol=BTC-USD", Some(&token)).await.json().await.expect("json");
    assert_eq!(fills["fills"].as_array().expect("fills").len(), 1);

    let p: Value = s.api.get("/portfolio", Some(&token)).await.json().await.expect("json");
    assert_eq!(dec(&p["cash"]["total"]), "4995".parse().expect("d"), "{p}");
    assert_eq!(dec(&p["cash"]["available"]), "4995".parse().expect("d"));
    let btc = p["positions"]
        .as_array()
        .expect("positions")
        .iter()
        .find(|x| x["asset"] == "BTC")
        .expect("a BTC position")
        .clone();
    assert_eq!(dec(&btc["quantity"]), "0.1".parse().expect("d"));
    assert_eq!(dec(&btc["avg_cost"]), "50000".parse().expect("d"));
    assert_eq!(dec(&btc["market_value"]), "5000".parse().expect("d"));
    assert_eq!(dec(&btc["unrealized_pnl"]), "0".parse().expect("d"));
    assert_eq!(dec(&p["equity"]), "9995".parse().expect("d"));

    let ledger: Value = s.api.get("/ledger", Some(&token)).await.json().await.expect("json");
    let kinds: Vec<&str> =
        ledger["entries"].as_array().expect("entries").iter().filter_map(|e| e["kind"].as_str()).collect();
    for kind in ["deposit", "trade", "fee"] {
        assert!(kinds.contains(&kind), "{kind} missing from {ledger}");
    }

    // Another user sees none of it.
    let other = s.api.user("stranger@example.com").await;
    problem(s.api.get(&format!("/orders/{id}"), Some(&other)).await, 404, "not_found").await;
    let theirs: Value = s.api.get("/orders?status=all", Some(&other)).await.json().await.expect("json");
    assert!(theirs["orders"].as_array().expect("orders").is_empty());
}

#[tokio::test]
async fn a_resting_order_is_canceled_over_http_and_its_hold_released() {
    let mut s = Stack::start().await;
    let token = s.api.user("rester@example.com").await;
    s.fund(&token, "1000").await;
    s.tick("ETH-USD", "3000".parse().expect("decimal")).await;
    s.wait_ticker("ETH-USD", "3000").await;

    let resp = s
        .api
        .client
        .post(s.api.url("/orders"))
        .bearer_auth(&token)
        .header("prefer", "wait=5")
        .json(&json!({"symbol": "ETH-USD", "side": "buy", "type": "limit", "quantity": "0.1", "limit_price": "2500"}))
        .send()
        .await
        .expect("answer");
    let order: Value = resp.json().await.expect("json");
    assert_eq!(order["status"], "open", "{order}");
    let id = order["id"].as_str().expect("id").to_owned();
    let p: Value = s.api.get("/portfolio", Some(&token)).await.json().await.expect("json");
    assert_eq!(dec(&p["cash"]["reserved"]), "250.25".parse().expect("d"), "250 notional + 0.25 fee held: {p}");

    let cancel = s.api.call(Method::DELETE, &format!("/orders/{id}"), Some(&token), None).await;
    assert_eq!(cancel.status(), 202);
    poll_until(WAIT, "the cancel to be applied", || async {
        (s.order(&token, &id).await["status"] == "canceled").then_some(())
    })
    .await;
    let p: Value = s.api.get("/portfolio", Some(&token)).await.json().await.expect("json");
    assert_eq!(dec(&p["cash"]["reserved"]), "0".parse().expect("d"));
    assert_eq!(dec(&p["cash"]["available"]), "1000".parse().expect("d"));
    problem(
        s.api.call(Method::DELETE, &format!("/orders/{id}"), Some(&token), None).await,
        409,
        "order_not_cancelable",
    )
    .await;
}

#[tokio::test]
async fn a_halted_market_rejects_orders_with_a_reason() {
    let mut s = Stack::start().await;
    let admin = s.api.user("ops@example.com").await;
    s.api.promote("ops@example.com").await;
    let token = s.api.user("halted@example.com").await;
    s.fund(&token, "1000").await;
    s.tick("SOL-USD", "150".parse().expect("decimal")).await;
    s.wait_ticker("SOL-USD", "150").await;

    let halt = s.api.call(Method::POST, "/admin/markets/SOL-USD/halt", Some(&admin), None).await;
    assert_eq!(halt.status(), 204);
    // The engine picks up market rules within seconds: keep placing until it refuses.
    let rejected = poll_until(WAIT, "an order to be rejected as market_halted", || async {
        let resp = s
            .api
            .client
            .post(s.api.url("/orders"))
            .bearer_auth(&token)
            .header("prefer", "wait=2")
            .json(&json!({"symbol": "SOL-USD", "side": "buy", "type": "market", "quantity": "0.1"}))
            .send()
            .await
            .ok()?;
        let order: Value = resp.json().await.ok()?;
        (order["reject_reason"] == "market_halted").then_some(order)
    })
    .await;
    assert_eq!(rejected["status"], "rejected");
}
