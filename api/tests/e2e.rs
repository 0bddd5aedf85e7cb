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
use vault_testkit::{Proc, base_env, poll_until, workspace_binary};

const WAIT: Duration = Duration::from_secs(20);

struct Stack {
    api: Api,
    engine: Proc,
    bus: Bus,
    seq: u64,
}

impl Stack {
    async fn start() -> Stack {
        Stack::start_with(&[]).await
    }

    async fn start_with(extra: &[(&'static str, &str)]) -> Stack {
        let api = Api::start_with(extra).await;
        let envs = base_env(&api.db, &api.nats);
        let (engine, _) = Proc::start_ready(&workspace_binary("vault-engine"), &[], &envs).await;
        let bus = Bus::connect(&api.nats.url(), "e2e").await.expect("connects");
        Stack { api, engine, bus, seq: 0 }
    }

    async fn tick(&mut self, symbol: &str, price: rust_decimal::Decimal) {
        self.tick_at(symbol, price, Utc::now()).await;
    }

    async fn tick_at(&mut self, symbol: &str, price: rust_decimal::Decimal, ts: chrono::DateTime<Utc>) {
        self.seq += 1;
        let tick = PriceTick {
            symbol: Symbol::parse(symbol).expect("symbol"),
            price: Positive::new(price).expect("positive"),
            ts,
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
async fn an_order_placed_over_http_is_filled_by_theengine_and_reads_back_everywhere() {
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

    // The halt's 204 comes once the engine reloaded the rules: the very next order is refused,
    // and after the resume's 204 the very next one fills. (With the engine's 2 s refresh alone,
    // orders placed just after the 204 still filled, and just after a resume were still refused.)
    let buy = json!({"symbol": "SOL-USD", "side": "buy", "type": "market", "quantity": "0.1"});
    let halt = s.api.call(Method::POST, "/admin/markets/SOL-USD/halt", Some(&admin), None).await;
    assert_eq!(halt.status(), 204);
    let rejected = place_and_wait(&s, &token, buy.clone()).await;
    assert_eq!((&rejected["status"], &rejected["reject_reason"]), (&json!("rejected"), &json!("market_halted")));

    // Not a market, and not even a symbol (a NUL reached Postgres: 422 with no field): 404.
    for path in ["/admin/markets/NOPE-USD/halt", "/admin/markets/SOL%00/halt", "/admin/markets/sol-usd/resume"] {
        assert_eq!(s.api.call(Method::POST, path, Some(&admin), None).await.status(), 404, "{path}");
    }
    let resume = s.api.call(Method::POST, "/admin/markets/SOL-USD/resume", Some(&admin), None).await;
    assert_eq!(resume.status(), 204);
    let filled = place_and_wait(&s, &token, buy).await;
    assert_eq!(filled["status"], "filled", "{filled}");
    // Confirmed by the engine's answer, not by its periodic refresh happening to pass by.
    assert!(!s.api.proc.output().contains("not confirmed"), "{}", s.api.proc.output());
}

async fn place_and_wait(s: &Stack, token: &str, body: Value) -> Value {
    let resp = s
        .api
        .client
        .post(s.api.url("/orders"))
        .bearer_auth(token)
        .header("prefer", "wait=10")
        .json(&body)
        .send()
        .await
        .expect("answer");
    assert!(resp.status().is_success(), "{}", resp.status());
    resp.json().await.expect("order json")
}

#[tokio::test]
async fn forty_concurrent_buys_against_cash_for_twenty_fill_exactly_twenty() {
    let mut s = Stack::start_with(&[("RATE_LIMIT_USER_PER_SEC", "0")]).await;
    let token = s.api.user("racer@example.com").await;
    // 20 × (0.01 × 50000 + 0.5 fee) = 10010.
    s.fund(&token, "10010").await;
    s.tick("BTC-USD", "50000".parse().expect("decimal")).await;
    s.wait_ticker("BTC-USD", "50000").await;

    let orders = futures::future::join_all((0..40).map(|_| {
        place_and_wait(&s, &token, json!({"symbol": "BTC-USD", "side": "buy", "type": "market", "quantity": "0.01"}))
    }))
    .await;
    // Every order gets its verdict (poll those the wait did not cover).
    let mut filled = 0;
    let mut refused = 0;
    for order in orders {
        let id = order["id"].as_str().expect("id").to_owned();
        let decided = poll_until(WAIT, "a verdict", || async {
            let o = s.order(&token, &id).await;
            (o["status"] != "pending").then_some(o)
        })
        .await;
        match (decided["status"].as_str(), decided["reject_reason"].as_str()) {
            (Some("filled"), _) => filled += 1,
            (Some("rejected"), Some("insufficient_funds")) => refused += 1,
            other => panic!("unexpected verdict {other:?}: {decided}"),
        }
    }
    assert_eq!((filled, refused), (20, 20));
    let p: Value = s.api.get("/portfolio", Some(&token)).await.json().await.expect("json");
    assert_eq!(dec(&p["cash"]["total"]), "0".parse().expect("d"), "{p}");
}

#[tokio::test]
async fn every_rejection_reason_reaches_the_client_and_pnl_follows_the_ticks() {
    let mut s = Stack::start().await;
    let token = s.api.user("reasons@example.com").await;
    s.fund(&token, "10000").await;
    s.tick("BTC-USD", "50000".parse().expect("decimal")).await;
    s.tick_at("ADA-USD", "0.45".parse().expect("decimal"), Utc::now() - chrono::Duration::seconds(120)).await;
    s.wait_ticker("BTC-USD", "50000").await;
    s.wait_ticker("ADA-USD", "0.45").await;

    let cases = [
        (json!({"symbol": "BTC-USD", "side": "sell", "type": "market", "quantity": "0.1"}), "insufficient_position"),
        (json!({"symbol": "BTC-USD", "side": "buy", "type": "market", "quantity": "1"}), "insufficient_funds"),
        (json!({"symbol": "LINK-USD", "side": "buy", "type": "market", "quantity": "1"}), "no_price"),
        (json!({"symbol": "ADA-USD", "side": "buy", "type": "market", "quantity": "10"}), "stale_price"),
    ];
    for (body, reason) in cases {
        let order = place_and_wait(&s, &token, body).await;
        assert_eq!(order["status"], "rejected", "{order}");
        assert_eq!(order["reject_reason"], reason, "{order}");
    }

    let bought =
        place_and_wait(&s, &token, json!({"symbol": "BTC-USD", "side": "buy", "type": "market", "quantity": "0.1"}))
            .await;
    assert_eq!(bought["status"], "filled");
    s.tick("BTC-USD", "55000".parse().expect("decimal")).await;
    s.wait_ticker("BTC-USD", "55000").await;
    let p: Value = s.api.get("/portfolio", Some(&token)).await.json().await.expect("json");
    let btc = p["positions"].as_array().expect("positions").iter().find(|x| x["asset"] == "BTC").expect("BTC").clone();
    assert_eq!(dec(&btc["market_price"]), "55000".parse().expect("d"), "{p}");
    assert_eq!(dec(&btc["market_value"]), "5500".parse().expect("d"));
    assert_eq!(dec(&btc["unrealized_pnl"]), "500".parse().expect("d"));
    assert_eq!(dec(&p["equity"]), "10495".parse().expect("d"), "4995 cash + 5500");
}

#[tokio::test]
async fn admins_read_the_audit_trail_with_filters_and_pages_and_users_cannot() {
    let s = Stack::start().await;
    let envs = base_env(&s.api.db, &s.api.nats);
    let (mut auditor, _) = Proc::start_ready(&workspace_binary("vault-worker"), &["audit"], &envs).await;

    let admin = s.api.user("auditor@example.com").await;
    s.api.promote("auditor@example.com").await;
    let user = s.api.user("audited@example.com").await;
    let me: Value = s.api.get("/me", Some(&user)).await.json().await.expect("json");
    s.fund(&user, "100").await;

    let signups = poll_until(WAIT, "both signups in the audit trail", || async {
        let page: Value = s.api.get("/admin/audit?action=auth.signup", Some(&admin)).await.json().await.ok()?;
        (page["entries"].as_array()?.len() == 2).then_some(page)
    })
    .await;
    // An empty action is refused naming it (it filtered for an action named "" and answered an
    // empty page, as if the trail held nothing), as is any parameter that is not its type.
    for (query, field) in [("action=", "action"), ("limit=abc", "limit"), ("from=yesterday", "from")] {
        let refused =
            problem(s.api.get(&format!("/admin/audit?{query}"), Some(&admin)).await, 422, "validation_failed").await;
        assert_eq!(refused["errors"][0]["field"], field, "{query}: {refused}");
    }
    let entry = &signups["entries"][0];
    assert_eq!(entry["action"], "auth.signup");
    assert_eq!(entry["actor_id"], me["id"], "newest first: the second signup");
    assert_eq!(entry["hash"].as_str().expect("hash").len(), 64);
    assert!(entry["request_id"].as_str().is_some_and(|r| !r.is_empty()));

    // A request id the client sends is the one the trail keeps (API.md: it lands in the audit
    // log), not one of the API's own.
    let traced: Value = s
        .api
        .client
        .post(s.api.url("/auth/signup"))
        .header("x-request-id", "e2e-trace-42")
        .json(&json!({"email": "traced@example.com", "password": support::PASSWORD}))
        .send()
        .await
        .expect("the API answers")
        .json()
        .await
        .expect("json");
    let kept = poll_until(WAIT, "the traced signup in the audit trail", || async {
        let page: Value = s
            .api
            .get(&format!("/admin/audit?user_id={}", traced["id"].as_str()?), Some(&admin))
            .await
            .json()
            .await
            .ok()?;
        page["entries"].as_array()?.iter().find(|e| e["action"] == "auth.signup").cloned()
    })
    .await;
    assert_eq!(kept["request_id"], "e2e-trace-42", "{kept}");

    let theirs: Value = poll_until(WAIT, "the user's deposit in the trail", || async {
        let page: Value =
            s.api.get(&format!("/admin/audit?user_id={}", me["id"].as_str()?), Some(&admin)).await.json().await.ok()?;
        let actions: Vec<String> =
            page["entries"].as_array()?.iter().filter_map(|e| e["action"].as_str().map(str::to_owned)).collect();
        (actions.contains(&"deposit".to_owned()) && actions.contains(&"deposit.completed".to_owned())).then_some(page)
    })
    .await;
    assert!(theirs["entries"].as_array().expect("entries").iter().all(|e| e["actor_id"] == me["id"]));

    let first: Value = s.api.get("/admin/audit?limit=1", Some(&admin)).await.json().await.expect("json");
    let cursor = first["next_cursor"].as_str().expect("a next page").to_owned();
    let second: Value =
        s.api.get(&format!("/admin/audit?limit=1&cursor={cursor}"), Some(&admin)).await.json().await.expect("json");
    assert!(
        second["entries"][0]["id"].as_str().expect("id").parse::<i64>().expect("number")
            < first["entries"][0]["id"].as_str().expect("id").parse::<i64>().expect("number")
    );

    // The chain can be followed through the API: newest first, each row's prev_hash is the
    // hash of the row after it on the page, and each names its stream and sequence.
    let chain: Value = s.api.get("/admin/audit?limit=50", Some(&admin)).await.json().await.expect("json");
    let rows = chain["entries"].as_array().expect("entries");
    assert!(rows.len() >= 5, "{chain}");
    for pair in rows.windows(2) {
        assert_eq!(pair[0]["prev_hash"], pair[1]["hash"], "{} follows {}", pair[0]["id"], pair[1]["id"]);
    }
    for row in rows {
        assert!(["ORDERS", "EVENTS", "AUTH"].contains(&row["stream"].as_str().expect("stream")), "{row}");
        assert!(row["stream_seq"].as_i64().is_some_and(|n| n >= 1), "{row}");
        assert_eq!(row["prev_hash"].as_str().expect("prev_hash").len(), 64, "{row}");
    }

    problem(s.api.get("/admin/audit", Some(&user)).await, 403, "forbidden").await;
    problem(
        s.api.get("/admin/audit?from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z", Some(&admin)).await,
        422,
        "validation_failed",
    )
    .await;
    // What administrators do, and a key's revocation, are in the trail too: who, to whom, when
    // (the lock ends the user's sessions: last).
    let admin_me: Value = s.api.get("/me", Some(&admin)).await.json().await.expect("json");
    let user_id = me["id"].as_str().expect("id");
    for path in [format!("/admin/users/{user_id}/lock"), format!("/admin/users/{user_id}/unlock")] {
        assert_eq!(s.api.call(Method::POST, &path, Some(&admin), None).await.status(), 204, "{path}");
    }
    for path in ["/admin/markets/SOL-USD/halt", "/admin/markets/SOL-USD/resume"] {
        assert_eq!(s.api.call(Method::POST, path, Some(&admin), None).await.status(), 204, "{path}");
    }
    let key: Value = s
        .api
        .post("/api-keys", Some(&admin), json!({"name": "ops", "scopes": ["read"]}))
        .await
        .json()
        .await
        .expect("key");
    let path = format!("/api-keys/{}", key["id"].as_str().expect("id"));
    assert_eq!(s.api.call(Method::DELETE, &path, Some(&admin), None).await.status(), 204);
    let expected = [
        ("auth.admin.user_locked", &me["id"], json!(user_id)),
        ("auth.admin.user_unlocked", &me["id"], json!(user_id)),
        ("auth.admin.market_halted", &admin_me["id"], json!("SOL-USD")),
        ("auth.admin.market_resumed", &admin_me["id"], json!("SOL-USD")),
        ("auth.api_key.revoked", &admin_me["id"], admin_me["id"].clone()),
    ];
    for (action, actor, subject) in expected {
        let entry = poll_until(WAIT, &format!("{action} in the audit trail"), || async {
            let page: Value =
                s.api.get(&format!("/admin/audit?action={action}"), Some(&admin)).await.json().await.ok()?;
            page["entries"].as_array()?.first().cloned()
        })
        .await;
        assert_eq!((&entry["actor_id"], &entry["subject"]), (actor, &subject), "{entry}");
        if action.starts_with("auth.admin.") {
            assert_eq!(entry["data"]["data"]["admin"], admin_me["id"], "{entry}");
        } else {
            assert_eq!(entry["data"]["data"]["api_key_id"], key["id"], "{entry}");
        }
    }

    auditor.stop_cleanly(Duration::from_secs(30)).await;
}

#[tokio::test]
async fn queue_lag_stays_visible_while_theengine_is_down() {
    let mut s = Stack::start().await;
    let admin = s.api.user("operator@example.com").await;
    s.api.promote("operator@example.com").await;
    let user = s.api.user("waiting@example.com").await;
    s.fund(&user, "100").await;
    s.engine.stop_cleanly(Duration::from_secs(30)).await;

    let placed = s.api.post("/account/deposits", Some(&user), json!({"asset": "USD", "amount": "5"})).await;
    assert_eq!(placed.status(), 202);
    let me: Value = s.api.get("/me", Some(&user)).await.json().await.expect("json");
    let partition = vault_bus::subjects::partition_of(me["id"].as_str().expect("id").parse().expect("uuid"));
    let consumer = format!("engine-p{partition:02}");

    let lag = poll_until(WAIT, "the waiting command to show as lag with an age", || async {
        let q: Value = s.api.get("/admin/queues", Some(&admin)).await.json().await.ok()?;
        let orders = q["streams"].as_array()?.iter().find(|st| st["name"] == "ORDERS")?.clone();
        let c = orders["consumers"].as_array()?.iter().find(|c| c["name"] == consumer.as_str())?.clone();
        (c["num_pending"].as_u64()? >= 1 && c["oldest_pending_age_seconds"].as_f64()? > 0.0).then_some(c)
    })
    .await;
    assert!(lag["last_active"].is_string(), "{lag}");

    let metric = format!("vault_queue_pending_messages{{stream=\"ORDERS\",consumer=\"{consumer}\"}} 1");
    let metrics_url = format!("http://{}/metrics", s.api.addr);
    poll_until(Duration::from_secs(15), "the lag gauges on the API's /metrics", || async {
        let text = s.api.client.get(&metrics_url).send().await.ok()?.text().await.ok()?;
        (text.contains(&metric) && text.contains("vault_queue_oldest_pending_age_seconds")).then_some(())
    })
    .await;
    // Ephemeral consumers (the price feeds' ordered consumers: the API's own, the stopped
    // engine's) are listed, but get no gauges: their names change on every reconnect.
    let q: Value = s.api.get("/admin/queues", Some(&admin)).await.json().await.expect("queues");
    let prices = q["streams"].as_array().expect("streams").iter().find(|st| st["name"] == "PRICES").cloned();
    assert!(
        prices.is_some_and(|p| !p["consumers"].as_array().expect("consumers").is_empty()),
        "the API's price feed consumer is listed: {q}"
    );
    let text = s.api.client.get(&metrics_url).send().await.expect("metrics").text().await.expect("text");
    assert!(
        !text.lines().any(|l| l.starts_with("vault_queue_pending_messages{stream=\"PRICES\"")),
        "no lag series for ephemeral consumers:\n{text}"
    );
    problem(s.api.get("/admin/queues", Some(&user)).await, 403, "forbidden").await;

    // A durable consumer deleted by an operator keeps no stale value: its gauges go NaN (a
    // lag alert on its last value fired on, or a 0 hid that nothing reads its stream).
    let orders = s.bus.jetstream().get_stream("ORDERS").await.expect("ORDERS");
    orders
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("lag-probe".into()),
            ..Default::default()
        })
        .await
        .expect("a probe consumer");
    let gauge_of_probe = || async {
        let text = vault_testkit::metrics_text(&s.api.addr).await;
        vault_testkit::sample(&text, "vault_queue_pending_messages{", &["stream=\"ORDERS\"", "consumer=\"lag-probe\""])
    };
    poll_until(Duration::from_secs(15), "the probe's gauge", || async { gauge_of_probe().await.filter(|v| *v >= 1.0) })
        .await;
    orders.delete_consumer("lag-probe").await.expect("deleted");
    poll_until(Duration::from_secs(15), "the deleted probe's gauge to go NaN", || async {
        gauge_of_probe().await.filter(|v| v.is_nan())
    })
    .await;
}

#[tokio::test]
async fn a_fill_reaches_the_user_as_a_notification_and_a_signed_webhook() {
    use std::sync::{Arc, Mutex};
    let mut s = Stack::start_with(&[("WEBHOOK_ALLOW_PRIVATE", "true")]).await;
    // The notify worker, and a receiver that records what it is sent.
    let mut envs = base_env(&s.api.db, &s.api.nats);
    envs.push(("WEBHOOK_ALLOW_PRIVATE", "true".to_owned()));
    let (mut notifier, _) = Proc::start_ready(&workspace_binary("vault-worker"), &["notify"], &envs).await;
    let received: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let sink = sink.clone();
            async move {
                let signature = headers.get("vault-signature").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                sink.lock().expect("lock").push((signature, body));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hook_url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let token = s.api.user("notified@example.com").await;
    let hook: Value = s
        .api
        .post("/webhooks", Some(&token), json!({"url": hook_url, "events": ["order.filled"]}))
        .await
        .json()
        .await
        .expect("json");
    let secret = hook["secret"].as_str().expect("secret").to_owned();
    s.fund(&token, "1000").await;
    s.tick("BTC-USD", "50000".parse().expect("decimal")).await;
    s.wait_ticker("BTC-USD", "50000").await;
    let order =
        place_and_wait(&s, &token, json!({"symbol": "BTC-USD", "side": "buy", "type": "market", "quantity": "0.01"}))
            .await;
    assert_eq!(order["status"], "filled");

    let note = poll_until(WAIT, "the fill notification", || async {
        let page: Value = s.api.get("/notifications?unread=true", Some(&token)).await.json().await.ok()?;
        page["notifications"].as_array()?.iter().find(|n| n["kind"] == "order.filled").cloned()
    })
    .await;
    assert_eq!(note["data"]["id"], order["id"]);

    let (signature, body) =
        poll_until(WAIT, "the webhook delivery", || async { received.lock().expect("lock").first().cloned() }).await;
    let payload: Value = serde_json::from_str(&body).expect("json body");
    assert_eq!(payload["type"], "order.filled");
    assert_eq!(payload["data"]["id"], order["id"]);
    // Vault-Signature: t=<unix>,v1=<hex hmac_sha256(secret, "<t>.<body>")>, checked independently.
    let (t, v1) = signature.split_once(",v1=").expect("t=…,v1=…");
    let t = t.strip_prefix("t=").expect("t=");
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(format!("{t}.{body}").as_bytes());
    let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(v1, expected, "the signature verifies");

    let id = hook["id"].as_str().expect("id");
    poll_until(WAIT, "the delivery to be recorded as delivered", || async {
        let d: Value = s.api.get(&format!("/webhooks/{id}/deliveries"), Some(&token)).await.json().await.ok()?;
        (d["deliveries"][0]["status"] == "delivered" && d["deliveries"][0]["last_status_code"] == 200).then_some(())
    })
    .await;
    notifier.stop_cleanly(Duration::from_secs(30)).await;
}
