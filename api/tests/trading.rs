//! The API side of trading against the real API over HTTP, with its own Postgres database and
//! nats-server: markets and prices, deposits, placing and canceling orders, reads, admin halts.
//!
//! The engine does not run here. Where a test needs one of its decisions it writes the row
//! directly (or plays the engine on the bus), and says so.

mod support;

use std::time::Duration;

use chrono::Utc;
use reqwest::{Method, Response};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use support::{Api, problem};
use uuid::Uuid;
use vault_bus::message::{CommandBody, EngineEvent, EventKind, OrderCommand, PriceTick, decode};
use vault_bus::{Bus, BusMessage, MessageContext, streams, subjects};
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

fn limit_order(client_order_id: &str) -> Value {
    json!({"client_order_id": client_order_id, "symbol": "BTC-USD", "side": "buy", "type": "limit",
           "quantity": "0.015", "limit_price": "50000.01"})
}

/// The `order.place` command the API publishes for [`limit_order`] with this client id.
fn limit_place(user: Uuid, client_order_id: &str) -> OrderCommand {
    OrderCommand {
        user_id: user,
        request_id: None,
        at: Utc::now(),
        body: CommandBody::Place {
            order_id: Uuid::now_v7(),
            client_order_id: client_order_id.to_owned(),
            symbol: Symbol::parse("BTC-USD").expect("symbol"),
            side: vault_core::domain::Side::Buy,
            order_type: vault_core::domain::OrderType::Limit,
            time_in_force: vault_core::domain::TimeInForce::Gtc,
            quantity: Positive::new(Decimal::new(15, 3)).expect("positive"),
            limit_price: Some(Positive::new(Decimal::new(5_000_001, 2)).expect("positive")),
        },
    }
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

/// Publishes an engine event of `user` on EVENTS, as the engine's outbox relay would.
async fn publish_engine_event(api: &Api, user: Uuid, kind: EventKind, data: Value) {
    let bus = Bus::connect(&api.nats.url(), "test").await.expect("bus");
    let event = EngineEvent { id: Uuid::now_v7(), kind, user_id: user, request_id: None, at: Utc::now(), data };
    bus.publish(&event, &MessageContext::default()).await.expect("event published");
}

async fn wait_for_price(api: &Api, symbol: &str, price: &str) -> Value {
    poll_until(DEADLINE, &format!("the ticker of {symbol} to show {price}"), || async {
        let resp = api.get(&format!("/markets/{symbol}/ticker"), None).await;
        let body: Value = resp.json().await.ok()?;
        (body["price"] == price).then_some(body)
    })
    .await
}

async fn read_only_key(api: &Api, token: &str) -> String {
    let created =
        json_of(api.post("/api-keys", Some(token), json!({"name": "reader", "scopes": ["read"]})).await, 201).await;
    created["key"].as_str().expect("key").to_owned()
}

#[tokio::test]
async fn a_placed_order_is_answered_202_only_once_it_is_on_the_orders_stream() {
    let api = Api::start().await;
    let (token, user) = trader(&api, "ann@example.com").await;
    let resp = api
        .client
        .post(api.url("/orders"))
        .bearer_auth(&token)
        .header("x-request-id", "req-place-1")
        .json(&limit_order("abc-1"))
        .send()
        .await
        .expect("answer");
    let order = json_of(resp, 202).await;
    assert_eq!(order["status"], "pending");
    assert_eq!(order["client_order_id"], "abc-1");
    assert_eq!(order["symbol"], "BTC-USD");
    assert_eq!(order["side"], "buy");
    assert_eq!(order["type"], "limit");
    assert_eq!(order["time_in_force"], "gtc", "the default for a limit order");
    assert_eq!(order["quantity"], "0.015");
    assert_eq!(order["limit_price"], "50000.01");
    assert_eq!(order["filled_quantity"], "0");
    assert_eq!(order["fee"], "0");
    assert_eq!(order["fills"], json!([]));
    let id: Uuid = order["id"].as_str().and_then(|s| s.parse().ok()).expect("order id");
    assert_eq!(id.get_version_num(), 7, "order ids are UUIDv7");

    // Answered 202, so the command is already stored: no waiting here.
    let stored = stream_messages(&api, streams::ORDERS.name).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    let msg = &stored[0];
    assert_eq!(msg.subject, subjects::order_command(user));
    assert!(msg.subject.starts_with(&format!("orders.{}.", subjects::partition_of(user))));
    assert_eq!(msg.msg_id.as_deref(), Some(format!("{user}:abc-1").as_str()));
    assert_eq!(msg.request_id.as_deref(), Some("req-place-1"));
    let p = &msg.payload;
    assert_eq!(p["v"], 1);
    assert_eq!(p["type"], "order.place");
    assert_eq!(p["user_id"], user.to_string());
    assert_eq!(p["request_id"], "req-place-1");
    assert_eq!(p["order_id"], id.to_string());
    assert_eq!(p["client_order_id"], "abc-1");
    assert_eq!((p["symbol"].as_str(), p["side"].as_str()), (Some("BTC-USD"), Some("buy")));
    assert_eq!((p["order_type"].as_str(), p["time_in_force"].as_str()), (Some("limit"), Some("gtc")));
    assert_eq!((p["quantity"].as_str(), p["limit_price"].as_str()), (Some("0.015"), Some("50000.01")));

    let (status, request_id): (String, Option<String>) =
        sqlx::query_as("SELECT status, request_id FROM orders WHERE id = $1 AND user_id = $2")
            .bind(id)
            .bind(user)
            .fetch_one(&api.db.pool().await)
            .await
            .expect("the pending intake row");
    assert_eq!((status.as_str(), request_id.as_deref()), ("pending", Some("req-place-1")));

    // It reads back the same, by id and by client id.
    let by_id = json_of(api.get(&format!("/orders/{id}"), Some(&token)).await, 200).await;
    assert_eq!(by_id, order);
    let by_client = json_of(api.get("/orders/by-client-id/abc-1", Some(&token)).await, 200).await;
    assert_eq!(by_client, order);

    // Without a client id the API makes one, and a market order defaults to ioc.
    let market = json!({"symbol": "ETH-USD", "side": "sell", "type": "market", "quantity": 0.5});
    let placed = json_of(api.post("/orders", Some(&token), market).await, 202).await;
    assert_eq!(placed["time_in_force"], "ioc");
    assert_eq!(placed["limit_price"], Value::Null);
    assert!(placed["client_order_id"].as_str().is_some_and(|c| !c.is_empty()), "{placed}");
}

#[tokio::test]
async fn a_second_order_with_the_same_client_id_returns_the_first_and_places_nothing() {
    let api = Api::start().await;
    let (token, _) = trader(&api, "bo@example.com").await;
    let first = json_of(api.post("/orders", Some(&token), limit_order("same-1")).await, 202).await;
    let again = json_of(api.post("/orders", Some(&token), limit_order("same-1")).await, 200).await;
    assert_eq!(again["id"], first["id"]);
    // Even with other terms: the client id is the identity of the order.
    let mut other = limit_order("same-1");
    other["quantity"] = json!("0.5");
    let third = json_of(api.post("/orders", Some(&token), other).await, 200).await;
    assert_eq!((third["id"].clone(), third["quantity"].clone()), (first["id"].clone(), json!("0.015")));
    // Even with terms that no longer pass validation (a quantity off the increment, a market that
    // does not exist): a retry must not read as "nothing was placed".
    for (field, value) in [("quantity", "0.0000001"), ("symbol", "NOPE-USD")] {
        let mut invalid = limit_order("same-1");
        invalid[field] = json!(value);
        let replayed = json_of(api.post("/orders", Some(&token), invalid).await, 200).await;
        assert_eq!(replayed["id"], first["id"], "{field}");
    }
    // A client id never used is still refused by validation.
    let mut unknown = limit_order("never-used");
    unknown["symbol"] = json!("NOPE-USD");
    problem(api.post("/orders", Some(&token), unknown).await, 422, "validation_failed").await;

    assert_eq!(count(&api, "SELECT count(*) FROM orders").await, 1);
    // The pending row's command was re-published (healing a crash between insert and publish);
    // JetStream dropped it as a duplicate.
    assert_eq!(stream_messages(&api, streams::ORDERS.name).await.len(), 1);

    // Once the engine decided (simulated: the row is set open directly), a retry just answers it.
    sqlx::query("UPDATE orders SET status = 'open'").execute(&api.db.pool().await).await.expect("update");
    let decided = json_of(api.post("/orders", Some(&token), limit_order("same-1")).await, 200).await;
    assert_eq!(decided["status"], "open");
    assert_eq!(stream_messages(&api, streams::ORDERS.name).await.len(), 1);
}

#[tokio::test]
async fn invalid_orders_are_422_naming_the_field_and_place_nothing() {
    let api = Api::start_with(&[("RATE_LIMIT_USER_PER_SEC", "0")]).await;
    let (token, _) = trader(&api, "cy@example.com").await;
    publish_tick(&api, "BTC-USD", "50000", 1).await;
    wait_for_price(&api, "BTC-USD", "50000").await;

    let base = limit_order("bad-1");
    let with = |changes: Value| {
        let mut body = base.clone();
        for (k, v) in changes.as_object().expect("object") {
            if v.is_null() {
                body.as_object_mut().expect("object").remove(k);
            } else {
                body[k] = v.clone();
            }
        }
        body
    };
    let market = |quantity: &str| json!({"symbol": "BTC-USD", "side": "buy", "type": "market", "quantity": quantity});
    let cases = [
        ("unknown symbol", with(json!({"symbol": "FOO-USD"})), "symbol"),
        ("malformed symbol", with(json!({"symbol": "btc-usd"})), "symbol"),
        ("quantity off increment", with(json!({"quantity": "0.000015"})), "quantity"),
        ("zero quantity", with(json!({"quantity": "0"})), "quantity"),
        ("negative quantity", with(json!({"quantity": "-1"})), "quantity"),
        ("limit price off increment", with(json!({"limit_price": "50000.001"})), "limit_price"),
        ("limit price missing", with(json!({"limit_price": null})), "limit_price"),
        ("notional below the minimum", with(json!({"quantity": "0.00001"})), "quantity"),
        ("limit price on a market order", with(json!({"type": "market", "time_in_force": "ioc"})), "limit_price"),
        (
            "gtc market order",
            json!({"symbol": "BTC-USD", "side": "buy", "type": "market", "quantity": "0.01",
                                    "time_in_force": "gtc"}),
            "time_in_force",
        ),
        ("market notional below the minimum at the latest price", market("0.00001"), "quantity"),
        ("client id with a space", with(json!({"client_order_id": "has space"})), "client_order_id"),
        ("client id too long", with(json!({"client_order_id": "x".repeat(65)})), "client_order_id"),
        ("unknown side", with(json!({"side": "hold"})), "side"),
        ("unknown time in force", with(json!({"time_in_force": "day"})), "time_in_force"),
        ("quantity not a decimal", with(json!({"quantity": "lots"})), "quantity"),
        ("unknown field", with(json!({"leverage": "10"})), "leverage"),
    ];
    for (what, body, field) in cases {
        let resp = api.post("/orders", Some(&token), body).await;
        let problem = problem(resp, 422, "validation_failed").await;
        let fields: Vec<&str> =
            problem["errors"].as_array().expect("errors").iter().filter_map(|e| e["field"].as_str()).collect();
        assert!(fields.contains(&field), "{what}: expected {field:?} in {problem}");
    }
    // A JSON number with more digits than an f64 keeps would be rounded on the way in
    // (50000.010000000000000001 → 50000.01, on the increment): refused, never rounded.
    let raw = r#"{"symbol": "BTC-USD", "side": "buy", "type": "limit", "quantity": "0.015",
                  "limit_price": 50000.010000000000000001}"#;
    let resp = api
        .client
        .post(api.url("/orders"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .expect("answer");
    let refused = problem(resp, 422, "validation_failed").await;
    assert_eq!(refused["errors"][0]["field"], "limit_price", "{refused}");
    assert_eq!(count(&api, "SELECT count(*) FROM orders").await, 0, "no intake row");
    assert!(stream_messages(&api, streams::ORDERS.name).await.is_empty(), "no command");
}

#[tokio::test]
async fn with_nats_down_orders_and_deposits_are_refused_503_leaving_nothing_and_work_after_restart() {
    let mut api = Api::start().await;
    let (token, user) = trader(&api, "dee@example.com").await;
    api.nats.kill();
    api.proc.wait_http_status(&api.addr, "/readyz", 503, READY_DEADLINE).await;

    let resp = api.post("/orders", Some(&token), limit_order("retry-me")).await;
    assert!(resp.headers().get("retry-after").is_some(), "503 carries Retry-After");
    problem(resp, 503, "service_unavailable").await;
    let resp = api
        .post("/account/deposits", Some(&token), json!({"asset": "USD", "amount": "100", "client_deposit_id": "d-1"}))
        .await;
    problem(resp, 503, "service_unavailable").await;
    assert_eq!(count(&api, "SELECT count(*) FROM orders").await, 0, "the intake row was withdrawn");
    assert_eq!(count(&api, "SELECT count(*) FROM deposits").await, 0, "the intake row was withdrawn");
    problem(api.get("/orders/by-client-id/retry-me", Some(&token)).await, 404, "not_found").await;

    api.nats.restart().await;
    api.proc.wait_http_status(&api.addr, "/readyz", 200, READY_DEADLINE).await;
    // The client retries with the same client id, as it should after a 503.
    let order = json_of(api.post("/orders", Some(&token), limit_order("retry-me")).await, 202).await;
    json_of(
        api.post(
            "/account/deposits",
            Some(&token),
            json!({"asset": "USD", "amount": "100", "client_deposit_id": "d-1"}),
        )
        .await,
        202,
    )
    .await;
    assert_eq!(count(&api, "SELECT count(*) FROM orders").await, 1);
    let stored = stream_messages(&api, streams::ORDERS.name).await;
    assert_eq!(stored.len(), 2, "nothing from the outage reached the stream: {stored:?}");
    assert_eq!(stored[0].msg_id.as_deref(), Some(format!("{user}:retry-me").as_str()));
    assert_eq!(stored[0].payload["order_id"], order["id"], "the stored command names the live row");
}

#[tokio::test]
async fn a_read_only_api_key_cannot_trade_but_can_read() {
    let api = Api::start().await;
    let (token, _) = trader(&api, "eve@example.com").await;
    let order = json_of(api.post("/orders", Some(&token), limit_order("mine-1")).await, 202).await;
    let key = read_only_key(&api, &token).await;

    problem(api.post("/orders", Some(&key), limit_order("key-1")).await, 403, "insufficient_scope").await;
    let id = order["id"].as_str().expect("id");
    problem(api.call(Method::DELETE, &format!("/orders/{id}"), Some(&key), None).await, 403, "insufficient_scope")
        .await;
    problem(api.call(Method::DELETE, "/orders", Some(&key), None).await, 403, "insufficient_scope").await;
    problem(
        api.post("/account/deposits", Some(&key), json!({"asset": "USD", "amount": "10"})).await,
        403,
        "insufficient_scope",
    )
    .await;

    // The scope is checked first: what else is wrong with the request does not matter.
    let bad_body = json!({"symbol": "NOPE", "side": "sideways", "quantity": "-1"});
    problem(api.post("/orders", Some(&key), bad_body).await, 403, "insufficient_scope").await;
    let unknown = Uuid::now_v7();
    problem(api.call(Method::DELETE, &format!("/orders/{unknown}"), Some(&key), None).await, 403, "insufficient_scope")
        .await;
    problem(api.call(Method::DELETE, "/orders/not-an-id", Some(&key), None).await, 403, "insufficient_scope").await;
    problem(api.post("/account/deposits", Some(&key), json!({"amount": "x"})).await, 403, "insufficient_scope").await;
    problem(api.post("/webhooks", Some(&key), json!({"url": 7})).await, 403, "session_required").await;

    let list = json_of(api.get("/orders", Some(&key)).await, 200).await;
    assert_eq!(list["orders"][0]["id"], order["id"]);
    json_of(api.get(&format!("/orders/{id}"), Some(&key)).await, 200).await;
    json_of(api.get("/portfolio", Some(&key)).await, 200).await;
    json_of(api.get("/ledger", Some(&key)).await, 200).await;
    json_of(api.get("/fills", Some(&key)).await, 200).await;
    assert_eq!(count(&api, "SELECT count(*) FROM orders").await, 1);
    assert_eq!(count(&api, "SELECT count(*) FROM deposits").await, 0);
}

/// An order and its fills are read from one snapshot: a fill committed between the read of the
/// order and the read of its fills (held apart here by a lock on `fills`) must not show an order
/// still open that has a fill.
#[tokio::test]
async fn an_order_and_its_fills_are_read_from_one_snapshot() {
    let api = Api::start().await;
    let (token, user) = trader(&api, "sol@example.com").await;
    let order = json_of(api.post("/orders", Some(&token), limit_order("snap-1")).await, 202).await;
    let id: Uuid = order["id"].as_str().and_then(|s| s.parse().ok()).expect("id");
    let pool = api.db.pool().await;
    let mut engine = pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE fills IN ACCESS EXCLUSIVE MODE").execute(&mut *engine).await.expect("lock");
    let read = tokio::spawn({
        let (client, url, token) = (api.client.clone(), api.url(&format!("/orders/{id}")), token.clone());
        async move { client.get(url).bearer_auth(token).send().await.expect("answer").json::<Value>().await }
    });
    vault_testkit::wait_for_lock_wait(&pool, "SELECT order_id, id, price%", DEADLINE).await;
    // What the engine commits in one statement: the order filled and its fill.
    sqlx::query("UPDATE orders SET status = 'filled', filled_quantity = quantity WHERE id = $1")
        .bind(id)
        .execute(&mut *engine)
        .await
        .expect("fill the order");
    sqlx::query(
        "INSERT INTO fills (id, order_id, user_id, symbol, side, price, quantity, fee)
         VALUES ($1, $2, $3, 'BTC-USD', 'buy', 40000, 0.015, 0.6)",
    )
    .bind(Uuid::now_v7())
    .bind(id)
    .bind(user)
    .execute(&mut *engine)
    .await
    .expect("its fill");
    engine.commit().await.expect("commit");

    let seen = read.await.expect("task").expect("json");
    let fills = seen["fills"].as_array().map(Vec::len).unwrap_or_default();
    assert_eq!((seen["status"].as_str(), fills), (Some("pending"), 0), "one moment, before the fill: {seen}");
    let now = json_of(api.get(&format!("/orders/{id}"), Some(&token)).await, 200).await;
    assert_eq!((now["status"].as_str(), now["fills"].as_array().map(Vec::len)), (Some("filled"), Some(1)));
}

#[tokio::test]
async fn another_users_order_is_not_found_never_forbidden() {
    let api = Api::start().await;
    let (owner, _) = trader(&api, "fay@example.com").await;
    let (other, _) = trader(&api, "gus@example.com").await;
    let order = json_of(api.post("/orders", Some(&owner), limit_order("private-1")).await, 202).await;
    let id = order["id"].as_str().expect("id");

    problem(api.get(&format!("/orders/{id}"), Some(&other)).await, 404, "not_found").await;
    problem(api.get("/orders/by-client-id/private-1", Some(&other)).await, 404, "not_found").await;
    problem(api.call(Method::DELETE, &format!("/orders/{id}"), Some(&other), None).await, 404, "not_found").await;
    problem(api.get("/orders/not-a-uuid", Some(&other)).await, 404, "not_found").await;
    let list = json_of(api.get("/orders", Some(&other)).await, 200).await;
    assert_eq!(list["orders"], json!([]));
    let canceled = json_of(api.call(Method::DELETE, "/orders", Some(&other), None).await, 202).await;
    assert_eq!(canceled["canceled"], 0, "a cancel-all touches only the caller's orders");
    // The other user could also not take over the client id: it is per user.
    json_of(api.post("/orders", Some(&other), limit_order("private-1")).await, 202).await;
    assert_eq!(count(&api, "SELECT count(*) FROM orders").await, 2);
}

#[tokio::test]
async fn canceling_publishes_a_cancel_and_a_closed_order_cannot_be_canceled() {
    let api = Api::start().await;
    let (token, user) = trader(&api, "hal@example.com").await;
    let done = json_of(api.post("/orders", Some(&token), limit_order("done-1")).await, 202).await;
    let live = json_of(api.post("/orders", Some(&token), limit_order("live-1")).await, 202).await;
    let mut eth = limit_order("live-2");
    eth["symbol"] = json!("ETH-USD");
    json_of(api.post("/orders", Some(&token), eth).await, 202).await;
    // Test setup standing in for the engine's decision: the first order filled.
    sqlx::query("UPDATE orders SET status = 'filled', filled_quantity = quantity WHERE id = $1")
        .bind(done["id"].as_str().and_then(|s| s.parse::<Uuid>().ok()))
        .execute(&api.db.pool().await)
        .await
        .expect("update");

    let done_id = done["id"].as_str().expect("id");
    let body = problem(
        api.call(Method::DELETE, &format!("/orders/{done_id}"), Some(&token), None).await,
        409,
        "order_not_cancelable",
    )
    .await;
    assert!(body["detail"].as_str().is_some_and(|d| d.contains("filled")), "{body}");

    let live_id = live["id"].as_str().expect("id");
    let resp = api.call(Method::DELETE, &format!("/orders/{live_id}"), Some(&token), None).await;
    let answered = json_of(resp, 202).await;
    assert_eq!(answered["id"], live["id"]);
    assert_eq!(answered["status"], "pending", "the engine has not decided yet");
    let stored = stream_messages(&api, streams::ORDERS.name).await;
    let cancel = stored.last().expect("a cancel");
    assert_eq!(cancel.payload["type"], "order.cancel");
    assert_eq!(cancel.payload["order_id"], live["id"]);
    assert_eq!(cancel.msg_id.as_deref(), Some(format!("{user}:cancel:{live_id}").as_str()));

    // Cancel-all of one market: only BTC-USD's pending or open orders (the filled one is not).
    let canceled = json_of(api.call(Method::DELETE, "/orders?symbol=BTC-USD", Some(&token), None).await, 202).await;
    assert_eq!(canceled["canceled"], 1);
    let canceled = json_of(api.call(Method::DELETE, "/orders", Some(&token), None).await, 202).await;
    assert_eq!(canceled["canceled"], 2);
    problem(api.call(Method::DELETE, "/orders?symbol=NOPE-USD", Some(&token), None).await, 422, "validation_failed")
        .await;
    let cancels = stream_messages(&api, streams::ORDERS.name)
        .await
        .into_iter()
        .filter(|m| m.payload["type"] == "order.cancel")
        .count();
    assert_eq!(cancels, 2, "one cancel per order: repeated cancels are the same message (dedupe)");
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
    // Orders on a halted market are still accepted by the API: the engine rejects them.
    let mut sol = limit_order("halted-1");
    sol["symbol"] = json!("SOL-USD");
    sol["quantity"] = json!("1");
    sol["limit_price"] = json!("150");
    json_of(api.post("/orders", Some(&user), sol).await, 202).await;

    problem(api.call(Method::POST, "/admin/markets/SOL-USD/resume", Some(&user), None).await, 403, "forbidden").await;
    let resp = api.call(Method::POST, "/admin/markets/SOL-USD/resume", Some(&admin), None).await;
    assert_eq!(resp.status(), 204);
    assert_eq!(status_of(json_of(api.get("/markets", None).await, 200).await), "trading");

    // An admin's API key reads admin data with `read`, and takes no admin action whatever its
    // scopes: halts and locks need the admin's session.
    let key = read_only_key(&api, &admin).await;
    json_of(api.get("/admin/users?email=jon", Some(&key)).await, 200).await;
    let halted = api.call(Method::POST, "/admin/markets/SOL-USD/halt", Some(&key), None).await;
    problem(halted, 403, "session_required").await;
    let trading_key =
        json_of(api.post("/api-keys", Some(&admin), json!({"name": "bot", "scopes": ["read", "trade"]})).await, 201)
            .await["key"]
            .as_str()
            .expect("key")
            .to_owned();
    let jon: Value = json_of(api.get("/admin/users?email=jon", Some(&admin)).await, 200).await;
    let jon_id = jon["users"][0]["id"].as_str().expect("id").to_owned();
    let locked = api.call(Method::POST, &format!("/admin/users/{jon_id}/lock"), Some(&trading_key), None).await;
    problem(locked, 403, "session_required").await;
    assert_eq!(status_of(json_of(api.get("/markets", None).await, 200).await), "trading");
    assert_eq!(count(&api, "SELECT count(*) FROM users WHERE locked_until IS NOT NULL").await, 0);
}

#[tokio::test]
async fn orders_page_newest_first_with_a_cursor_until_null() {
    let api = Api::start().await;
    let (token, _) = trader(&api, "lea@example.com").await;
    let mut placed = Vec::new();
    for i in 0..5 {
        let order = json_of(api.post("/orders", Some(&token), limit_order(&format!("page-{i}"))).await, 202).await;
        placed.push(order["id"].as_str().expect("id").to_owned());
    }
    placed.reverse();

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/orders?limit=2&cursor={c}"),
            None => "/orders?limit=2".to_owned(),
        };
        let page = json_of(api.get(&path, Some(&token)).await, 200).await;
        pages += 1;
        let orders = page["orders"].as_array().expect("orders");
        assert!(orders.len() <= 2);
        seen.extend(orders.iter().map(|o| o["id"].as_str().expect("id").to_owned()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => {
                assert_eq!(page["next_cursor"], Value::Null);
                break;
            }
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, placed, "newest first, each once");

    let open = json_of(api.get("/orders?status=open&symbol=BTC-USD", Some(&token)).await, 200).await;
    assert_eq!(open["orders"].as_array().map(Vec::len), Some(5), "pending orders are open");
    let closed = json_of(api.get("/orders?status=closed", Some(&token)).await, 200).await;
    assert_eq!(closed["orders"], json!([]));
    problem(api.get("/orders?status=sideways", Some(&token)).await, 422, "validation_failed").await;
    problem(api.get("/orders?limit=501", Some(&token)).await, 422, "validation_failed").await;
}

/// Plays the engine for one user: every `order.place` command is accepted (row set `open`, as
/// the engine would) and an `order.accepted` event is published.
fn fake_engine(api: &Api) -> tokio::task::JoinHandle<()> {
    let (url, db_url) = (api.nats.url(), api.db.url.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = tokio::spawn(async move {
        use futures::StreamExt;
        let bus = Bus::connect(&url, "fake-engine").await.expect("bus");
        let pool = sqlx::PgPool::connect(&db_url).await.expect("db");
        let mut commands = bus.client().subscribe(subjects::ORDERS_ALL).await.expect("subscribe");
        bus.client().flush().await.expect("flush");
        ready_tx.send(()).expect("ready");
        while let Some(msg) = commands.next().await {
            let command: OrderCommand = decode(msg.subject.as_str(), &msg.payload).expect("command");
            let CommandBody::Place { order_id, .. } = command.body else { continue };
            sqlx::query("UPDATE orders SET status = 'open', updated_at = now() WHERE id = $1")
                .bind(order_id)
                .execute(&pool)
                .await
                .expect("accept");
            let data: Value = sqlx::query_scalar("SELECT to_jsonb(o) FROM orders o WHERE id = $1")
                .bind(order_id)
                .fetch_one(&pool)
                .await
                .expect("order json");
            let event = EngineEvent {
                id: Uuid::now_v7(),
                kind: EventKind::OrderAccepted,
                user_id: command.user_id,
                request_id: command.request_id,
                at: Utc::now(),
                data,
            };
            bus.publish(&event, &MessageContext::default()).await.expect("event published");
        }
    });
    ready_rx.recv_timeout(DEADLINE).expect("the fake engine subscribed");
    handle
}

#[tokio::test(flavor = "multi_thread")]
async fn prefer_wait_answers_201_with_the_engines_verdict_or_202_when_it_does_not_come() {
    let api = Api::start().await;
    let (token, _) = trader(&api, "max@example.com").await;

    // No engine: after the wait the order is still pending, so 202.
    let started = std::time::Instant::now();
    let resp = api
        .client
        .post(api.url("/orders"))
        .bearer_auth(&token)
        .header("prefer", "wait=1")
        .json(&limit_order("w-1"))
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.headers().get("preference-applied").and_then(|v| v.to_str().ok()), Some("wait=1"));
    let pending = json_of(resp, 202).await;
    assert_eq!(pending["status"], "pending");
    assert!(started.elapsed() >= Duration::from_secs(1), "it waited");

    let engine = fake_engine(&api);
    let resp = api
        .client
        .post(api.url("/orders"))
        .bearer_auth(&token)
        .header("prefer", "wait=60")
        .json(&limit_order("w-2"))
        .send()
        .await
        .expect("answer");
    assert_eq!(
        resp.headers().get("preference-applied").and_then(|v| v.to_str().ok()),
        Some("wait=10"),
        "capped at 10 s"
    );
    let decided = json_of(resp, 201).await;
    assert_eq!(decided["status"], "open", "the latest state, read after the verdict");
    assert_eq!(decided["client_order_id"], "w-2");
    engine.abort();
}

#[tokio::test]
async fn portfolio_ledger_and_fills_show_what_the_engine_wrote_marked_to_the_latest_price() {
    let api = Api::start().await;
    let (token, user) = trader(&api, "ned@example.com").await;
    let (other, _) = trader(&api, "oli@example.com").await;
    let empty = json_of(api.get("/portfolio", Some(&token)).await, 200).await;
    assert_eq!(empty["cash"], json!({"asset": "USD", "total": "0", "available": "0", "reserved": "0"}));
    assert_eq!((empty["positions"].clone(), empty["equity"].clone()), (json!([]), json!("0")));

    let order = json_of(api.post("/orders", Some(&token), limit_order("filled-1")).await, 202).await;
    let order_id: Uuid = order["id"].as_str().and_then(|s| s.parse().ok()).expect("id");
    // Test setup standing in for the engine: a deposit, a fill of 0.5 BTC at 60000 and their
    // ledger entries (user side only; the house side is irrelevant to these reads).
    let pool = api.db.pool().await;
    for sql in [
        "INSERT INTO balances (user_id, asset, total, reserved, cost_basis) VALUES ($1, 'USD', 1000.00, 100, 0)",
        "INSERT INTO balances (user_id, asset, total, reserved, cost_basis) VALUES ($1, 'BTC', 0.5, 0, 30000)",
        "INSERT INTO balances (user_id, asset, total, reserved, cost_basis) VALUES ($1, 'ETH', 0, 0, 0)",
        // Three SOL bought for 100 in all: avg_cost 33.33333333 (rounded), never priced here.
        "INSERT INTO balances (user_id, asset, total, reserved, cost_basis) VALUES ($1, 'SOL', 3, 0, 100)",
    ] {
        sqlx::query(sql).bind(user).execute(&pool).await.expect("balance");
    }
    for (asset, amount, after, kind, with_order) in [
        ("USD", "31000", "31000", "deposit", false),
        ("BTC", "0.5", "0.5", "trade", true),
        // As the engine stored a notional: with the scale of its factors (0.50 × 60000.0).
        ("USD", "-30000.000", "1000.000", "trade", true),
    ] {
        sqlx::query(
            "INSERT INTO ledger_entries (tx_id, account, user_id, asset, amount, balance_after, kind, order_id)
             VALUES ($1, 'user', $2, $3, $4::NUMERIC, $5::NUMERIC, $6, $7)",
        )
        .bind(Uuid::now_v7())
        .bind(user)
        .bind(asset)
        .bind(amount)
        .bind(after)
        .bind(kind)
        .bind(with_order.then_some(order_id))
        .execute(&pool)
        .await
        .expect("ledger entry");
    }
    sqlx::query(
        "INSERT INTO fills (id, order_id, user_id, symbol, side, price, quantity, fee) VALUES ($1, $2, $3, 'BTC-USD', 'buy', 60000, 0.5, 30)",
    )
    .bind(Uuid::now_v7())
    .bind(order_id)
    .bind(user)
    .execute(&pool)
    .await
    .expect("fill");

    // The engine announces what it wrote; the API's portfolio cache drops the user's balances
    // when the event arrives.
    publish_engine_event(&api, user, EventKind::OrderFilled, json!({"id": order_id})).await;
    // Without a price the position counts at its cost.
    let unpriced = poll_until(DEADLINE, "the fill to reach the portfolio", || async {
        let p = json_of(api.get("/portfolio", Some(&token)).await, 200).await;
        (p["equity"] != "0").then_some(p)
    })
    .await;
    assert_eq!(unpriced["positions"][0]["market_price"], Value::Null);
    assert_eq!(unpriced["equity"], "31100", "cost bases exactly, not the rounded avg_cost times the quantity");

    publish_tick(&api, "BTC-USD", "65000", 1).await;
    wait_for_price(&api, "BTC-USD", "65000").await;
    let portfolio = json_of(api.get("/portfolio", Some(&token)).await, 200).await;
    assert_eq!(portfolio["cash"], json!({"asset": "USD", "total": "1000", "available": "900", "reserved": "100"}));
    assert_eq!(
        portfolio["positions"],
        json!([{"asset": "BTC", "symbol": "BTC-USD", "quantity": "0.5", "available": "0.5", "reserved": "0",
                "avg_cost": "60000", "market_price": "65000", "market_value": "32500", "unrealized_pnl": "2500"},
               {"asset": "SOL", "symbol": "SOL-USD", "quantity": "3", "available": "3", "reserved": "0",
                "avg_cost": "33.33333333", "market_price": null, "market_value": null, "unrealized_pnl": null}]),
        "the empty ETH balance is not a position"
    );
    assert_eq!(portfolio["equity"], "33600");
    assert!(portfolio["as_of"].is_string());

    let first = json_of(api.get("/ledger?limit=2", Some(&token)).await, 200).await;
    let entries = first["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 2);
    assert_eq!((entries[0]["asset"].as_str(), entries[0]["amount"].as_str()), (Some("USD"), Some("-30000")));
    assert_eq!(entries[0]["balance_after"], "1000");
    assert_eq!(entries[0]["order_id"], order["id"]);
    assert!(entries[0]["id"].is_string(), "ledger ids are strings");
    let cursor = first["next_cursor"].as_str().expect("a next page");
    let second = json_of(api.get(&format!("/ledger?limit=2&cursor={cursor}"), Some(&token)).await, 200).await;
    assert_eq!(second["entries"].as_array().map(Vec::len), Some(1));
    assert_eq!(second["entries"][0]["kind"], "deposit");
    assert_eq!(second["entries"][0]["order_id"], Value::Null);
    assert_eq!(second["next_cursor"], Value::Null);
    problem(api.get("/ledger?cursor=nonsense", Some(&token)).await, 422, "validation_failed").await;

    let fills = json_of(api.get("/fills?symbol=BTC-USD", Some(&token)).await, 200).await;
    assert_eq!(fills["fills"][0]["order_id"], order["id"]);
    assert_eq!((fills["fills"][0]["price"].as_str(), fills["fills"][0]["fee"].as_str()), (Some("60000"), Some("30")));
    assert_eq!(fills["next_cursor"], Value::Null);
    let with_fills = json_of(api.get(&format!("/orders/{order_id}"), Some(&token)).await, 200).await;
    assert_eq!(with_fills["fills"][0]["quantity"], "0.5");
    let listed = json_of(api.get("/orders", Some(&token)).await, 200).await;
    assert_eq!(listed["orders"][0]["fills"][0]["liquidity"], "taker");

    // None of it is visible to someone else.
    let theirs = json_of(api.get("/portfolio", Some(&other)).await, 200).await;
    assert_eq!(theirs["equity"], "0");
    assert_eq!(json_of(api.get("/ledger", Some(&other)).await, 200).await["entries"], json!([]));
    assert_eq!(json_of(api.get("/fills", Some(&other)).await, 200).await["fills"], json!([]));
}

#[tokio::test]
async fn a_client_id_whose_refused_attempt_reached_the_stream_later_is_answered_409_not_left_pending() {
    let api = Api::start().await;
    let (token, user) = trader(&api, "pia@example.com").await;
    // Simulates an attempt that was answered 503 and withdrawn, but whose command reached the
    // stream afterwards: it names an order row that no longer exists.
    let bus = Bus::connect(&api.nats.url(), "test").await.expect("bus");
    let stale = limit_place(user, "late-1");
    bus.publish(&stale, &MessageContext::default()).await.expect("published");

    let body = problem(api.post("/orders", Some(&token), limit_order("late-1")).await, 409, "client_id_unusable").await;
    assert!(body["detail"].as_str().is_some_and(|d| d.contains("new client id")), "{body}");
    assert_eq!(count(&api, "SELECT count(*) FROM orders").await, 0, "no order left pending forever");
    // Another client id works.
    json_of(api.post("/orders", Some(&token), limit_order("late-2")).await, 202).await;
}

#[tokio::test]
async fn a_client_id_spent_by_a_refused_attempt_the_engine_applied_is_answered_409_after_the_dedupe_window() {
    let api = Api::start().await;
    let (token, user) = trader(&api, "quin@example.com").await;
    // A refused attempt's command reached the stream after its row was withdrawn, and the
    // engine applied it as void: its key is recorded. JetStream's dedupe window has long passed,
    // so a new attempt's publish would not be a duplicate — but the engine would skip it as one.
    let pool = api.db.pool().await;
    // The keys as the bus names these commands (their `Nats-Msg-Id`, the engine's key).
    let place = limit_place(user, "spent-1");
    let deposit = OrderCommand {
        body: CommandBody::Deposit {
            deposit_id: Uuid::now_v7(),
            client_deposit_id: "spent-d".to_owned(),
            asset: vault_core::domain::Asset::usd(),
            amount: Positive::new(Decimal::new(100, 0)).expect("positive"),
        },
        ..place.clone()
    };
    for key in [place.msg_id(), deposit.msg_id()] {
        sqlx::query("INSERT INTO applied_commands (user_id, command_id, stream_seq, version) VALUES ($1, $2, 1, 1)")
            .bind(user)
            .bind(&key)
            .execute(&pool)
            .await
            .expect("a spent key");
    }
    let body =
        problem(api.post("/orders", Some(&token), limit_order("spent-1")).await, 409, "client_id_unusable").await;
    assert!(body["detail"].as_str().is_some_and(|d| d.contains("new client id")), "{body}");
    let deposit = json!({"asset": "USD", "amount": "100", "client_deposit_id": "spent-d"});
    problem(api.post("/account/deposits", Some(&token), deposit).await, 409, "client_id_unusable").await;
    assert_eq!(count(&api, "SELECT count(*) FROM orders").await, 0, "no order left pending forever");
    assert_eq!(count(&api, "SELECT count(*) FROM deposits").await, 0, "no deposit left pending forever");
    assert!(stream_messages(&api, "ORDERS").await.is_empty(), "nothing was published");
    // Other client ids work.
    json_of(api.post("/orders", Some(&token), limit_order("spent-2")).await, 202).await;
    let deposit = json!({"asset": "USD", "amount": "100", "client_deposit_id": "spent-e"});
    json_of(api.post("/account/deposits", Some(&token), deposit).await, 202).await;
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

#[tokio::test]
async fn candles_aggregate_the_one_minute_rows_into_the_interval_oldest_first() {
    let api = Api::start().await;
    // Test setup: the prices worker writes these rows; it does not run here, so the test writes
    // one-minute candles directly (03:02 has no tick, so no row), and one ETH row to show that
    // other symbols stay out.
    let pool = api.db.pool().await;
    for (symbol, minute, open, high, low, close, volume) in [
        ("BTC-USD", "03:00", "100", "110", "95", "105", "3"),
        ("BTC-USD", "03:01", "105", "108", "101", "102", "2"),
        ("BTC-USD", "03:03", "102", "120", "102", "119.5", "4"),
        ("BTC-USD", "03:04", "119.5", "119.5", "90.25", "91", "5"),
        ("BTC-USD", "03:05", "91", "93", "89", "92", "1"),
        ("BTC-USD", "03:06", "92", "92.5", "91.5", "92.10", "2"),
        ("ETH-USD", "03:01", "3000", "3000", "3000", "3000", "1"),
    ] {
        sqlx::query(
            "INSERT INTO candles (symbol, start, open, high, low, close, volume, open_at, close_at)
             VALUES ($1, $2::TIMESTAMPTZ, $3::NUMERIC, $4::NUMERIC, $5::NUMERIC, $6::NUMERIC, $7::NUMERIC,
                     $2::TIMESTAMPTZ, $2::TIMESTAMPTZ + INTERVAL '59 seconds')",
        )
        .bind(symbol)
        .bind(format!("2026-01-02T{minute}:00Z"))
        .bind(open)
        .bind(high)
        .bind(low)
        .bind(close)
        .bind(volume)
        .execute(&pool)
        .await
        .expect("a one-minute candle");
    }
    let candles = |query: &'static str| {
        let api = &api;
        async move { json_of(api.get(&format!("/markets/BTC-USD/candles?{query}"), None).await, 200).await }
    };
    let row = |start: &str, o: &str, h: &str, l: &str, c: &str, v: &str| json!({"start": start, "open": o, "high": h, "low": l, "close": c, "volume": v});

    let minutes = candles("start=2026-01-02T03:00:00Z&end=2026-01-02T03:10:00Z").await;
    assert_eq!(
        minutes,
        json!({"candles": [
            row("2026-01-02T03:00:00.000000Z", "100", "110", "95", "105", "3"),
            row("2026-01-02T03:01:00.000000Z", "105", "108", "101", "102", "2"),
            row("2026-01-02T03:03:00.000000Z", "102", "120", "102", "119.5", "4"),
            row("2026-01-02T03:04:00.000000Z", "119.5", "119.5", "90.25", "91", "5"),
            row("2026-01-02T03:05:00.000000Z", "91", "93", "89", "92", "1"),
            row("2026-01-02T03:06:00.000000Z", "92", "92.5", "91.5", "92.1", "2"),
        ]}),
        "1m is the rows themselves, oldest first, decimals as strings, times with their fraction"
    );
    let five = candles("interval=5m&start=2026-01-02T03:00:00Z&end=2026-01-02T03:10:00Z").await;
    assert_eq!(
        five,
        json!({"candles": [
            row("2026-01-02T03:00:00.000000Z", "100", "120", "90.25", "91", "14"),
            row("2026-01-02T03:05:00.000000Z", "91", "93", "89", "92.1", "3"),
        ]}),
        "open of the first minute, close of the last, max high, min low, summed volume"
    );
    // A start inside an interval is rounded down to it; `end` is exclusive.
    let hour = candles("interval=1h&start=2026-01-02T03:00:30Z&end=2026-01-02T03:06:00.000001Z").await;
    assert_eq!(hour, json!({"candles": [row("2026-01-02T03:00:00.000000Z", "100", "120", "89", "92.1", "17")]}));
    let upto = candles("interval=5m&start=2026-01-02T03:00:00Z&end=2026-01-02T03:06:00Z").await;
    assert_eq!(upto["candles"][1], row("2026-01-02T03:05:00.000000Z", "91", "93", "89", "92", "1"));
    // Defaults: 1m, the last 100 minutes until now, which hold none of these old rows.
    assert_eq!(candles("").await, json!({"candles": []}));

    problem(api.get("/markets/FOO-USD/candles", None).await, 404, "not_found").await;
    let bad = problem(api.get("/markets/BTC-USD/candles?interval=2m", None).await, 422, "validation_failed").await;
    assert_eq!(bad["errors"][0]["field"], "interval", "{bad}");
    let path = "/markets/BTC-USD/candles?start=2026-01-02T03:00:00Z&end=2026-01-02T03:00:00Z";
    let bad = problem(api.get(path, None).await, 422, "validation_failed").await;
    assert_eq!(bad["errors"][0]["field"], "start", "{bad}");
    let path = "/markets/BTC-USD/candles?interval=1m&start=2026-01-01T00:00:00Z&end=2026-01-02T00:00:00Z";
    let bad = problem(api.get(path, None).await, 422, "validation_failed").await;
    assert!(bad["errors"][0]["message"].as_str().is_some_and(|m| m.contains("1000")), "{bad}");
    let path = "/markets/BTC-USD/candles?interval=1d&start=2026-01-01T00:00:00Z&end=2026-01-03T00:00:00Z";
    let days = json_of(api.get(path, None).await, 200).await;
    assert_eq!(
        days,
        json!({"candles": [row("2026-01-02T00:00:00.000000Z", "100", "120", "89", "92.1", "17")]}),
        "days start at 00:00 UTC"
    );
    problem(api.get("/markets/BTC-USD/candles?start=yesterday", None).await, 422, "validation_failed").await;
    problem(api.get("/markets/BTC-USD/candles?limit=5", None).await, 422, "validation_failed").await;
}

/// Intake rows are inserted in batches: a burst of concurrent orders, each client id sent twice
/// at once, still makes exactly one order per client id — one answer 202 and the other 200 with
/// the same order — and one command each on the stream.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_orders_with_repeated_client_ids_make_one_order_each() {
    const IDS: usize = 20;
    let api = Api::start().await;
    let (token, _) = trader(&api, "burst@example.com").await;
    let requests = (0..IDS * 2).map(|i| {
        let (api, token) = (&api, token.clone());
        async move {
            let resp = api.post("/orders", Some(&token), limit_order(&format!("burst-{}", i % IDS))).await;
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.expect("json");
            let id = body["id"].as_str().unwrap_or_else(|| panic!("an order id in the answer: {status} {body}"));
            (i % IDS, status, id.to_owned())
        }
    });
    let answers = futures::future::join_all(requests).await;
    for id in 0..IDS {
        let mine: Vec<&(usize, u16, String)> = answers.iter().filter(|(c, _, _)| *c == id).collect();
        let mut statuses: Vec<u16> = mine.iter().map(|(_, s, _)| *s).collect();
        statuses.sort();
        assert_eq!(statuses, [200, 202], "client id burst-{id}: one new order, one repeat: {mine:?}");
        assert_eq!(mine[0].2, mine[1].2, "both answers name the same order");
    }
    assert_eq!(count(&api, "SELECT count(*) FROM orders").await, IDS as i64);
    let commands: std::collections::BTreeSet<String> = stream_messages(&api, streams::ORDERS.name)
        .await
        .into_iter()
        .map(|m| m.payload["order_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(commands.len(), IDS, "one command per order on the stream");
}

/// A user of a partition other than `not`.
async fn trader_outside(api: &Api, name: &str, not: u16) -> (String, Uuid) {
    for i in 0.. {
        let (token, user) = trader(api, &format!("{name}{i}@example.com")).await;
        if subjects::partition_of(user) != not {
            return (token, user);
        }
    }
    unreachable!()
}

/// The ORDERS stream of `api`'s nats-server, through a client of the test's own.
async fn orders_stream(api: &Api) -> async_nats::jetstream::stream::Stream {
    async_nats::jetstream::new(async_nats::connect(api.nats.url()).await.expect("connect"))
        .get_stream(streams::ORDERS.name)
        .await
        .expect("stream")
}

/// Places limit orders `{prefix}-1`, `{prefix}-2`, … until one is refused 503: the refusal and
/// how many were answered 202 before it.
async fn place_until_overloaded(api: &Api, token: &str, prefix: &str) -> (Response, usize) {
    let sent = std::sync::atomic::AtomicUsize::new(1);
    let refused = poll_until(DEADLINE, "an order refused as overloaded", || {
        let n = sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        async move {
            let resp = api.post("/orders", Some(token), limit_order(&format!("{prefix}-{n}"))).await;
            match resp.status().as_u16() {
                202 => None,
                503 => Some(resp),
                other => panic!("expected 202 or 503, got {other}"),
            }
        }
    })
    .await;
    // `sent` is one past the refused order's number.
    (refused, sent.load(std::sync::atomic::Ordering::Relaxed) - 2)
}

#[tokio::test]
async fn orders_are_refused_503_overloaded_past_the_partitions_queue_limit_even_before_any_engine_ran() {
    let api = Api::start_with(&[("ORDER_BACKLOG_LIMIT", "2")]).await;
    // No engine has ever run: the API creates the engine's consumers from its start, and nothing
    // consumes, so the queue of every partition grows with each accepted order.
    let orders = orders_stream(&api).await;
    for p in 0..vault_core::config::PARTITIONS {
        let name = format!("engine-p{p:02}");
        let info = poll_until(DEADLINE, "the engine's consumers created by the API", || {
            let (orders, name) = (&orders, &name);
            async move { orders.consumer_info(name).await.ok() }
        })
        .await;
        assert_eq!(info.config.filter_subject, subjects::orders_partition_filter(p));
    }
    poll_until(DEADLINE, "the creation logged as expected at start", || async {
        api.proc.output().contains("created the engine consumers no engine has declared yet").then_some(())
    })
    .await;
    assert!(!api.proc.output().contains("engine consumers were missing"), "not reported as a loss at start");
    let (token, user) = trader(&api, "busy@example.com").await;
    let partition = subjects::partition_of(user);
    let first = json_of(api.post("/orders", Some(&token), limit_order("busy-0")).await, 202).await;

    // Orders are taken until the API has read a queue over the limit; then refused.
    let (refused, taken) = place_until_overloaded(&api, &token, "busy").await;
    // Answered 202: busy-0 and every busy-n before the refused one.
    let accepted = 1 + taken;
    assert!(accepted > 2, "refused only above the limit of 2 (accepted {accepted})");
    assert_eq!(refused.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    let body = problem(refused, 503, "overloaded").await;
    assert!(body["detail"].as_str().is_some_and(|d| d.contains("nothing was placed")), "{body}");
    // A refusal on purpose is a warning in the log, not an error (a NATS blip would write
    // hundreds of them).
    poll_until(DEADLINE, "the refusal logged", || async {
        api.proc.output().lines().any(|l| l.contains("response failed") && l.contains("\"WARN\"")).then_some(())
    })
    .await;
    let errors: Vec<String> = api
        .proc
        .output()
        .lines()
        .filter(|l| l.contains("response failed") && l.contains("\"ERROR\""))
        .map(str::to_owned)
        .collect();
    assert!(errors.is_empty(), "503s logged as errors: {errors:?}");
    // Nothing of the refused order exists: a row and a command per accepted order, no more.
    let rows = count(&api, &format!("SELECT count(*) FROM orders WHERE user_id = '{user}'")).await;
    assert_eq!(rows, accepted as i64);
    assert_eq!(stream_messages(&api, streams::ORDERS.name).await.len(), accepted);

    // A replay of an accepted order still gets that order, and cancels are still taken.
    let replay = json_of(api.post("/orders", Some(&token), limit_order("busy-0")).await, 200).await;
    assert_eq!(replay["id"], first["id"]);
    let first_id = first["id"].as_str().expect("id");
    json_of(api.call(Method::DELETE, &format!("/orders/{first_id}"), Some(&token), None).await, 202).await;
    // Another partition's users are not held up by this one's queue.
    let (calm_token, _) = trader_outside(&api, "calm", partition).await;
    json_of(api.post("/orders", Some(&calm_token), limit_order("calm-1")).await, 202).await;

    // The engine catches up: orders are taken again.
    let consumer: async_nats::jetstream::consumer::PullConsumer =
        orders.get_consumer(&format!("engine-p{partition:02}")).await.expect("the partition's consumer");
    let mut batch =
        consumer.fetch().max_messages(1_000).expires(Duration::from_secs(1)).messages().await.expect("fetch");
    use futures::StreamExt as _;
    while let Some(msg) = batch.next().await {
        msg.expect("message").double_ack().await.expect("ack");
    }
    poll_until(DEADLINE, "an order taken once the queue drained", || {
        let (api, token) = (&api, &token);
        async move {
            let resp = api.post("/orders", Some(token), limit_order("after-drain")).await;
            (resp.status().as_u16() == 202).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn an_engine_consumer_deleted_while_the_api_runs_is_created_again_and_its_queue_still_refuses() {
    let api = Api::start_with(&[("ORDER_BACKLOG_LIMIT", "2")]).await;
    let (token, user) = trader(&api, "deleted@example.com").await;
    let name = format!("engine-p{:02}", subjects::partition_of(user));
    let orders = orders_stream(&api).await;
    poll_until(DEADLINE, "the consumer created by the API", || async { orders.consumer_info(&name).await.ok() }).await;
    assert!(orders.delete_consumer(&name).await.expect("delete").success, "deleted");

    // No engine runs: only the API can bring it back, as the engine would declare it.
    let info = poll_until(DEADLINE, "the consumer created again", || {
        let orders = &orders;
        let name = &name;
        async move { orders.consumer_info(name).await.ok() }
    })
    .await;
    assert_eq!(info.config.filter_subject, subjects::orders_partition_filter(subjects::partition_of(user)));
    assert_eq!(info.config.ack_policy, async_nats::jetstream::consumer::AckPolicy::Explicit);
    poll_until(DEADLINE, "the loss logged as news", || async {
        api.proc.output().contains("engine consumers were missing; created them again").then_some(())
    })
    .await;

    // Its queue is read again: past the limit, the user's orders are refused.
    let (_, accepted) = place_until_overloaded(&api, &token, "again").await;
    assert!(accepted > 2, "refused only above the limit of 2 (accepted {accepted})");
}

/// Postgres ending the API's sessions — a restart, a failover, an operator's
/// `pg_terminate_backend` — fails the next statement of each pooled connection with SQLSTATE
/// 57P01. That is answered 503 with `Retry-After`, as an unreachable database is: never 500, which
/// told clients the request itself was at fault and counted toward the 5xx alert as a bug.
#[tokio::test]
async fn sessions_postgres_ended_are_answered_503_never_500() {
    let api = Api::start().await;
    let (token, _) = trader(&api, "restart@example.com").await;
    let direct = api.db.pool().await;
    let mut answers = Vec::new();
    for _ in 0..5 {
        for _ in 0..4 {
            assert_eq!(api.get("/orders", Some(&token)).await.status(), 200);
        }
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
        )
        .execute(&direct)
        .await
        .expect("sessions ended");
        for _ in 0..4 {
            let resp = api.get("/orders", Some(&token)).await;
            let retry_after = resp.headers().get("retry-after").is_some();
            answers.push((resp.status().as_u16(), retry_after));
        }
    }
    assert!(answers.iter().all(|(status, _)| [200, 503].contains(status)), "{answers:?}");
    assert!(answers.iter().filter(|(status, _)| *status == 503).all(|(_, retry_after)| *retry_after), "{answers:?}");
    assert!(answers.iter().any(|(status, _)| *status == 503), "the ended sessions were met: {answers:?}");
    assert_eq!(api.get("/orders", Some(&token)).await.status(), 200, "healed on fresh connections");
}

/// A tick stamped in the future does not freeze the market, and one on another market's subject
/// moves nothing (anything that can publish on PRICES moves markets: API.md).
#[tokio::test]
async fn a_tick_from_the_future_freezes_nothing_and_one_on_another_markets_subject_moves_nothing() {
    let api = Api::start().await;
    let bus = Bus::connect(&api.nats.url(), "test").await.expect("bus");
    let tick = |symbol: &str, price: &str, ts: chrono::DateTime<Utc>, seq: u64| PriceTick {
        symbol: Symbol::parse(symbol).expect("symbol"),
        price: Positive::new(price.parse::<Decimal>().expect("decimal")).expect("positive"),
        ts,
        source: "ops".to_owned(),
        seq,
    };
    let raw = |subject: &'static str, tick: PriceTick| {
        let js = bus.jetstream().clone();
        async move {
            let payload = vault_bus::message::encode(&tick).expect("encodes");
            js.publish(subject, payload.into()).await.expect("sent").await.expect("stored");
        }
    };
    // Stamped a day ahead: kept as stamped, it was the newest price until then, every true tick
    // older. Taken as of its arrival, the next true tick replaces it.
    raw("prices.BTC-USD", tick("BTC-USD", "1", Utc::now() + chrono::TimeDelta::days(1), 1)).await;
    publish_tick(&api, "BTC-USD", "50000", 2).await;
    wait_for_price(&api, "BTC-USD", "50000").await;
    // A BTC tick on ETH's subject: markets are keyed by the tick's symbol, so it moved BTC.
    raw("prices.ETH-USD", tick("BTC-USD", "7", Utc::now(), 3)).await;
    publish_tick(&api, "ETH-USD", "3000", 4).await;
    wait_for_price(&api, "ETH-USD", "3000").await;
    let btc = json_of(api.get("/markets/BTC-USD/ticker", None).await, 200).await;
    assert_eq!(btc["price"], "50000", "{btc}");
    let refused = vault_testkit::scrape_metric(&api.addr, "vault_api_price_ticks_undecodable_total", &[]).await;
    assert_eq!(refused, 1.0, "the tick on another market's subject is refused and counted");
}

/// PRICES deleted and declared again (or restored from a backup) numbers its ticks from 1 again;
/// the ticker follows the new stream. (The NATS client re-created the API's consumer by itself
/// after the old stream's last sequence, and the ticker showed the old price for good.)
#[tokio::test]
async fn the_ticker_follows_prices_when_the_stream_is_created_again() {
    let api = Api::start().await;
    for (seq, price) in [(1, "40000"), (2, "40100"), (3, "40200")] {
        publish_tick(&api, "BTC-USD", price, seq).await;
    }
    wait_for_price(&api, "BTC-USD", "40200").await;
    let bus = Bus::connect(&api.nats.url(), "test").await.expect("bus");
    bus.jetstream().delete_stream("PRICES").await.expect("PRICES deleted");
    bus.declare(&[]).await.expect("PRICES declared again");
    publish_tick(&api, "BTC-USD", "42000", 4).await;
    wait_for_price(&api, "BTC-USD", "42000").await;
}
