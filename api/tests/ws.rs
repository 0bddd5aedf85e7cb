//! The WebSocket feed (`/api/v1/ws`) against real servers: the `vault-api`, `vault-engine` and
//! `vault-worker notify` binaries with their own nats-server and database, or — where a test
//! needs intervals shorter than the contract's 10/30/90 s — the API built in this process with a
//! shortened `WsConfig`, still over real sockets, NATS and Postgres. Clients are
//! tokio-tungstenite; every wait is a deadline, never a sleep.

mod support;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use support::Api;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use vault_api::Application;
use vault_api::ws::WsConfig;
use vault_bus::message::{BusMessage, PriceTick, encode};
use vault_bus::{Bus, MessageContext};
use vault_core::domain::{Positive, Symbol};
use vault_testkit::{NatsServer, Proc, TEST_JWT_SECRET, TestDb, base_env, http_client, poll_until, workspace_binary};

/// How long any single expected frame may take.
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// A WebSocket client that checks the contract as it reads.

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the server sent next.
#[derive(Debug)]
enum Incoming {
    Json(Value),
    /// The close frame's code and reason (`None`: the connection ended without one).
    Closed(Option<(u16, String)>),
}

struct Client {
    ws: Socket,
    /// The `seq` of the last data frame read; every data frame must be the next number.
    seq: u64,
    /// Data frames read while waiting for something else (an acknowledgement), not yet taken.
    stash: VecDeque<Value>,
    /// `{"op":"ping"}` frames seen.
    pings: usize,
}

fn ws_url(addr: &str) -> String {
    format!("ws://{addr}/api/v1/ws")
}

impl Client {
    async fn connect(addr: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(ws_url(addr)).await.expect("the WebSocket upgrade succeeds");
        Client { ws, seq: 0, stash: VecDeque::new(), pings: 0 }
    }

    /// Connects and authenticates with `token`; checks the acknowledgement.
    async fn authed(addr: &str, token: &str) -> Client {
        let mut client = Client::connect(addr).await;
        client.send(json!({"op": "auth", "token": token})).await;
        let ack = client.next_control().await;
        assert_eq!(ack["op"], "authenticated", "{ack}");
        client
    }

    async fn send(&mut self, frame: Value) {
        self.ws.send(Message::text(frame.to_string())).await.expect("send a frame");
    }

    /// The next text frame or the close, within [`WAIT`]; transport pings and pongs are skipped.
    async fn next(&mut self) -> Incoming {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next()).await.expect("a frame within the deadline");
            match message {
                None | Some(Err(_)) => return Incoming::Closed(None),
                Some(Ok(Message::Text(text))) => {
                    return Incoming::Json(serde_json::from_str(&text).expect("text frames are JSON"));
                }
                Some(Ok(Message::Close(frame))) => {
                    return Incoming::Closed(frame.map(|f| (u16::from(f.code), f.reason.to_string())));
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next frame that is not a data frame nor a ping; data frames met on the way are
    /// checked and kept for [`Client::next_data`].
    async fn next_control(&mut self) -> Value {
        loop {
            match self.next().await {
                Incoming::Json(frame) if frame.get("op").is_none() => self.take_data(frame),
                Incoming::Json(frame) if frame["op"] == "ping" => self.pings += 1,
                Incoming::Json(frame) => return frame,
                Incoming::Closed(close) => panic!("closed while waiting for a control frame: {close:?}"),
            }
        }
    }

    fn take_data(&mut self, frame: Value) {
        self.seq += 1;
        assert_eq!(frame["seq"], json!(self.seq), "data frames are numbered 1, 2, 3… without gaps: {frame}");
        assert_eq!(frame.as_object().map(|o| o.len()), Some(3), "{{channel, seq, data}}: {frame}");
        self.stash.push_back(frame);
    }

    /// The next data frame (pings skipped), its `seq` checked.
    async fn next_data(&mut self) -> Value {
        loop {
            if let Some(frame) = self.stash.pop_front() {
                return frame;
            }
            match self.next().await {
                Incoming::Json(frame) if frame.get("op").is_none() => self.take_data(frame),
                Incoming::Json(frame) if frame["op"] == "ping" => self.pings += 1,
                Incoming::Json(frame) => panic!("expected a data frame, got {frame}"),
                Incoming::Closed(close) => panic!("closed while waiting for a data frame: {close:?}"),
            }
        }
    }

    async fn subscribe(&mut self, channels: &[&str]) {
        self.send(json!({"op": "subscribe", "channels": channels})).await;
        assert_eq!(self.next_control().await, json!({"op": "subscribed", "channels": channels}));
    }

    /// Reads until the connection closes: the close code and reason, and the error frames sent
    /// before it.
    async fn closed(&mut self) -> (Option<(u16, String)>, Vec<Value>) {
        let mut errors = Vec::new();
        loop {
            match self.next().await {
                Incoming::Json(frame) if frame["op"] == "error" => errors.push(frame),
                Incoming::Json(_) => {}
                Incoming::Closed(close) => return (close, errors),
            }
        }
    }

    /// Expects an error frame with `code` and the close 1008 with that code as the reason.
    async fn refused(&mut self, code: &str) {
        let (close, errors) = self.closed().await;
        assert_eq!(close, Some((1008, code.to_owned())), "errors before the close: {errors:?}");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0]["code"], code, "{errors:?}");
        assert!(errors[0]["detail"].as_str().is_some_and(|d| !d.is_empty()), "{errors:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Stacks

/// The API binary, optionally with the engine and the notify worker, and a bus for ticks.
struct Stack {
    api: Api,
    _workers: Vec<Proc>,
    bus: Bus,
    seq: u64,
}

impl Stack {
    async fn start(engine: bool, notify: bool) -> Stack {
        let api = Api::start().await;
        let mut workers = Vec::new();
        for (wanted, binary, args) in [(engine, "vault-engine", &[][..]), (notify, "vault-worker", &["notify"][..])] {
            if !wanted {
                continue;
            }
            let envs = base_env(&api.db, &api.nats);
            let (proc, _) = Proc::start_ready(&workspace_binary(binary), args, &envs).await;
            workers.push(proc);
        }
        let bus = Bus::connect(&api.nats.url(), "ws-test").await.expect("connects");
        Stack { api, _workers: workers, bus, seq: 0 }
    }

    async fn tick(&mut self, symbol: &str, price: &str) {
        self.seq += 1;
        let tick = price_tick(symbol, price, self.seq);
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

    /// Waits until the API's ticker shows `price` (the engine follows the same stream).
    async fn wait_ticker(&self, symbol: &str, price: &str) {
        poll_until(WAIT, "the API to see the tick", || async {
            let t: Value = self.api.get(&format!("/markets/{symbol}/ticker"), None).await.json().await.ok()?;
            (t["price"].as_str()?.parse::<rust_decimal::Decimal>().ok()? == price.parse().ok()?).then_some(())
        })
        .await;
    }

    /// Places an order; returns its id.
    async fn place(&self, token: &str, order: Value) -> String {
        let resp = self.api.post("/orders", Some(token), order).await;
        assert_eq!(resp.status(), 202, "order accepted by the API");
        resp.json::<Value>().await.expect("order json")["id"].as_str().expect("id").to_owned()
    }
}

fn price_tick(symbol: &str, price: &str, seq: u64) -> PriceTick {
    PriceTick {
        symbol: Symbol::parse(symbol).expect("symbol"),
        price: Positive::new(price.parse().expect("decimal")).expect("positive"),
        ts: Utc::now(),
        source: "ws-test".into(),
        seq,
    }
}

/// The API built in this process with `config`, over its own nats-server and database.
struct InProcess {
    addr: String,
    http: reqwest::Client,
    shutdown: CancellationToken,
    nats: NatsServer,
    _db: TestDb,
}

impl InProcess {
    async fn start(config: WsConfig) -> InProcess {
        use figment::Figment;
        use figment::providers::Serialized;
        let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
        let figment = Figment::from(Serialized::default("database_url", &db.url))
            .merge(Serialized::default("nats_url", nats.url()))
            .merge(Serialized::default("jwt_secret", TEST_JWT_SECRET))
            .merge(Serialized::default("api_addr", "127.0.0.1:0"));
        let settings = vault_core::Settings::from_figment(vault_core::Role::Api, &figment).expect("settings");
        let shutdown = CancellationToken::new();
        let app = Application::build_with(settings, config, shutdown.clone()).await.expect("the API builds");
        let addr = app.local_addr().expect("bound").to_string();
        tokio::spawn(app.run());
        InProcess { addr, http: http_client(), shutdown, nats, _db: db }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}/api/v1{path}", self.addr)
    }

    /// Signs `email` up and logs in; returns the access token.
    async fn user(&self, email: &str) -> String {
        let body = json!({"email": email, "password": support::PASSWORD});
        let signup = self.http.post(self.url("/auth/signup")).json(&body).send().await.expect("signup");
        assert_eq!(signup.status(), 201);
        let login = self.http.post(self.url("/auth/login")).json(&body).send().await.expect("login");
        assert_eq!(login.status(), 200);
        login.json::<Value>().await.expect("json")["access_token"].as_str().expect("token").to_owned()
    }

    /// The value of the metric sample whose line starts with `prefix` (0 when absent).
    async fn metric(&self, prefix: &str) -> f64 {
        let text = self
            .http
            .get(format!("http://{}/metrics", self.addr))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

// ---------------------------------------------------------------------------------------------
// Orders, prices, notifications

#[tokio::test]
async fn a_client_sees_its_own_orders_go_through_their_events_in_order_with_gap_free_seq_and_never_another_users() {
    let mut s = Stack::start(true, false).await;
    let alice = s.api.user("alice@example.com").await;
    let bob = s.api.user("bob@example.com").await;
    s.fund(&alice, "100000").await;
    s.fund(&bob, "100000").await;
    s.tick("BTC-USD", "50000").await;
    s.wait_ticker("BTC-USD", "50000").await;

    let mut alice_ws = Client::authed(&s.api.addr, &alice).await;
    alice_ws.subscribe(&["orders"]).await;
    let mut bob_ws = Client::authed(&s.api.addr, &bob).await;
    bob_ws.subscribe(&["orders"]).await;

    // Both trade at the same time: Alice a resting limit buy then a market buy, Bob three
    // market buys.
    let limit =
        json!({"symbol": "BTC-USD", "side": "buy", "type": "limit", "quantity": "0.01", "limit_price": "49000"});
    let market = json!({"symbol": "BTC-USD", "side": "buy", "type": "market", "quantity": "0.01"});
    let (alice_ids, bob_ids) = tokio::join!(
        async {
            let resting = s.place(&alice, limit.clone()).await;
            let filled = s.place(&alice, market.clone()).await;
            (resting, filled)
        },
        async {
            let mut ids = Vec::new();
            for _ in 0..3 {
                ids.push(s.place(&bob, market.clone()).await);
            }
            ids
        }
    );
    let (resting, filled) = alice_ids;

    // pending → open for the limit order, pending → filled for the market order.
    let first = alice_ws.next_data().await;
    assert_eq!(first["channel"], "orders");
    assert_eq!((&first["data"]["type"], &first["data"]["data"]["id"]), (&json!("order.accepted"), &json!(resting)));
    assert_eq!(first["data"]["data"]["status"], "open", "{first}");
    let second = alice_ws.next_data().await;
    assert_eq!((&second["data"]["type"], &second["data"]["data"]["id"]), (&json!("order.filled"), &json!(filled)));
    assert_eq!(second["data"]["data"]["status"], "filled", "{second}");
    for frame in [&first, &second] {
        let data = frame["data"].as_object().expect("data");
        assert!(data.contains_key("id") && data.contains_key("created_at") && data.len() == 4, "{frame}");
    }

    // A tick through the limit: open → filled.
    s.tick("BTC-USD", "48900").await;
    let third = alice_ws.next_data().await;
    assert_eq!((&third["data"]["type"], &third["data"]["data"]["id"]), (&json!("order.filled"), &json!(resting)));
    assert_eq!(third["data"]["data"]["status"], "filled");
    assert_eq!(alice_ws.seq, 3);

    // Bob saw his three fills, numbered on his own connection, and nothing of Alice's.
    for _ in 0..3 {
        let frame = bob_ws.next_data().await;
        assert_eq!(frame["data"]["type"], "order.filled");
        let id = frame["data"]["data"]["id"].as_str().expect("order id");
        assert!(bob_ids.iter().any(|b| b == id), "Bob got an order that is not his: {frame}");
    }
    assert_eq!(bob_ws.seq, 3);
    // Nothing else is on its way to either: the next frame each gets is the answer to a ping.
    for ws in [&mut alice_ws, &mut bob_ws] {
        ws.send(json!({"op": "ping"})).await;
        assert_eq!(ws.next_control().await, json!({"op": "pong"}));
        assert!(ws.stash.is_empty(), "unexpected frames: {:?}", ws.stash);
    }
}

#[tokio::test]
async fn price_ticks_reach_the_subscribers_of_their_market_only_until_they_unsubscribe() {
    let mut s = Stack::start(false, false).await;
    let token = s.api.user("prices@example.com").await;
    let mut client = Client::authed(&s.api.addr, &token).await;
    client.subscribe(&["prices:BTC-USD"]).await;
    let mut witness = Client::authed(&s.api.addr, &token).await;
    witness.subscribe(&["prices:BTC-USD"]).await;

    s.tick("ETH-USD", "3000").await;
    s.tick("BTC-USD", "50000.5").await;
    let frame = client.next_data().await;
    assert_eq!(frame["channel"], "prices:BTC-USD", "an ETH tick is not on the BTC channel: {frame}");
    assert_eq!(frame["data"]["symbol"], "BTC-USD");
    assert_eq!(frame["data"]["price"], "50000.5");
    assert_eq!(frame["data"]["source"], "ws-test");
    assert!(frame["data"]["ts"].as_str().is_some(), "{frame}");
    assert_eq!(witness.next_data().await["data"]["price"], "50000.5");

    // Swap BTC for ETH. A BTC tick the witness has seen must not reach the client: its next
    // frame is the ETH tick published after it, numbered right after the first.
    client.send(json!({"op": "unsubscribe", "channels": ["prices:BTC-USD"]})).await;
    assert_eq!(client.next_control().await, json!({"op": "unsubscribed", "channels": ["prices:BTC-USD"]}));
    client.subscribe(&["prices:ETH-USD"]).await;
    s.tick("BTC-USD", "50001").await;
    assert_eq!(witness.next_data().await["data"]["price"], "50001");
    s.tick("ETH-USD", "3001").await;
    let frame = client.next_data().await;
    assert_eq!((&frame["channel"], &frame["data"]["price"]), (&json!("prices:ETH-USD"), &json!("3001")));
    assert_eq!(frame["seq"], 2);
}

#[tokio::test]
async fn a_notification_written_by_the_notify_worker_reaches_its_user_and_nobody_else() {
    let s = Stack::start(true, true).await;
    let alice = s.api.user("alice@example.com").await;
    let bob = s.api.user("bob@example.com").await;
    let mut alice_ws = Client::authed(&s.api.addr, &alice).await;
    alice_ws.subscribe(&["notifications"]).await;
    let mut bob_ws = Client::authed(&s.api.addr, &bob).await;
    bob_ws.subscribe(&["notifications"]).await;

    let deposit = s.api.post("/account/deposits", Some(&alice), json!({"asset": "USD", "amount": "250"})).await;
    assert_eq!(deposit.status(), 202);
    let frame = alice_ws.next_data().await;
    assert_eq!(frame["channel"], "notifications");
    let listed: Value = s.api.get("/notifications", Some(&alice)).await.json().await.expect("json");
    let stored = &listed["notifications"][0];
    assert_eq!(frame["data"], *stored, "the frame is the notification GET /notifications lists");
    assert_eq!(frame["data"]["kind"], "deposit.completed");

    // Bob, subscribed all along, gets his own first: Alice's never reached him.
    let deposit = s.api.post("/account/deposits", Some(&bob), json!({"asset": "USD", "amount": "75"})).await;
    assert_eq!(deposit.status(), 202);
    let frame = bob_ws.next_data().await;
    let listed: Value = s.api.get("/notifications", Some(&bob)).await.json().await.expect("json");
    assert_eq!(frame["data"]["id"], listed["notifications"][0]["id"]);
    assert_eq!(frame["seq"], 1);
}

// ---------------------------------------------------------------------------------------------
// Authentication and protocol errors

#[tokio::test]
async fn bad_or_missing_credentials_get_an_error_frame_and_a_policy_close() {
    let s = Stack::start(false, false).await;
    let addr = s.api.addr.clone();

    let mut client = Client::connect(&addr).await;
    client.send(json!({"op": "auth", "token": "not-a-token"})).await;
    client.refused("invalid_token").await;

    let mut client = Client::connect(&addr).await;
    client.send(json!({"op": "subscribe", "channels": ["orders"]})).await;
    client.refused("auth_required").await;

    // A logged-out session.
    let token = s.api.user("gone@example.com").await;
    assert_eq!(s.api.call(Method::POST, "/auth/logout", Some(&token), None).await.status(), 204);
    let mut client = Client::connect(&addr).await;
    client.send(json!({"op": "auth", "token": token})).await;
    client.refused("token_revoked").await;

    // API keys: a read key works, a revoked one does not, and a key without `read` is refused.
    let token = s.api.user("keys@example.com").await;
    let user_id = s.api.get("/me", Some(&token)).await.json::<Value>().await.expect("me")["id"].clone();
    let created: Value = s
        .api
        .post("/api-keys", Some(&token), json!({"name": "bot", "scopes": ["read"]}))
        .await
        .json()
        .await
        .expect("key");
    let key = created["key"].as_str().expect("key").to_owned();
    let mut client = Client::connect(&addr).await;
    client.send(json!({"op": "auth", "token": key})).await;
    assert_eq!(client.next_control().await, json!({"op": "authenticated", "user_id": user_id}));
    let path = format!("/api-keys/{}", created["id"].as_str().expect("id"));
    assert_eq!(s.api.call(Method::DELETE, &path, Some(&token), None).await.status(), 204);
    let mut client = Client::connect(&addr).await;
    client.send(json!({"op": "auth", "token": key})).await;
    client.refused("invalid_api_key").await;

    let trade_only = "vk_trade_only_key_for_the_websocket_scope_test_0123456789";
    let pool = s.api.db.pool().await;
    sqlx::query(
        "INSERT INTO api_keys (id, user_id, name, prefix, key_hash, scopes) VALUES ($1, $2::uuid, 'trade', 'vk_trade', $3, '{trade}')",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(user_id.as_str().expect("id"))
    .bind(vault_api::auth::tokens::hash_secret(trade_only))
    .execute(&pool)
    .await
    .expect("a trade-only key");
    let mut client = Client::connect(&addr).await;
    client.send(json!({"op": "auth", "token": trade_only})).await;
    client.refused("insufficient_scope").await;
    s.api.assert_never_logged(&[&key, trade_only]);
}

#[tokio::test]
async fn unknown_channels_markets_and_malformed_frames_get_an_error_frame_and_the_socket_stays_open() {
    let s = Stack::start(false, false).await;
    let token = s.api.user("typo@example.com").await;
    let mut client = Client::authed(&s.api.addr, &token).await;

    client.send(json!({"op": "subscribe", "channels": ["orders", "trades"]})).await;
    let error = client.next_control().await;
    assert_eq!(
        (&error["op"], &error["code"], &error["channel"]),
        (&json!("error"), &json!("unknown_channel"), &json!("trades"))
    );
    client.send(json!({"op": "subscribe", "channels": ["prices:FOO-USD"]})).await;
    let error = client.next_control().await;
    assert_eq!((&error["code"], &error["channel"]), (&json!("unknown_market"), &json!("prices:FOO-USD")));
    client.ws.send(Message::text("hello")).await.expect("send");
    assert_eq!(client.next_control().await["code"], "malformed_frame");
    client.send(json!({"op": "subscribe", "channels": "orders"})).await;
    assert_eq!(client.next_control().await["code"], "malformed_frame");
    // A second `auth` frame renews the credential (see the expiry test); it subscribes nothing.
    client.send(json!({"op": "auth", "token": token})).await;
    assert_eq!(client.next_control().await["op"], "authenticated");
    // Still open, and the refused frame subscribed nothing: `orders` is new now.
    client.subscribe(&["orders"]).await;

    // Binary frames and frames over 4 KiB end the connection.
    let mut binary = Client::authed(&s.api.addr, &token).await;
    binary.ws.send(Message::binary(vec![1u8, 2, 3])).await.expect("send");
    let (close, _) = binary.closed().await;
    assert_eq!(close.map(|(code, _)| code), Some(1003));
    let mut big = Client::authed(&s.api.addr, &token).await;
    let padding = "x".repeat(5000);
    big.send(json!({"op": "subscribe", "channels": [padding]})).await;
    let (close, errors) = big.closed().await;
    assert_eq!(close, Some((1009, "message too big".to_owned())));
    assert_eq!(errors[0]["code"], "message_too_big");
    // A plain GET is not an upgrade: a problem answer, not a hang.
    let plain = s.api.get("/ws", None).await;
    assert_eq!(plain.status(), 400);
}

// ---------------------------------------------------------------------------------------------
// Timers, slow consumers, revocation, shutdown (short intervals: the API runs in this process)

fn short(config: impl FnOnce(&mut WsConfig)) -> WsConfig {
    let mut c = WsConfig::default();
    config(&mut c);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_an_auth_frame_is_closed_at_the_deadline() {
    let deadline = Duration::from_millis(600);
    let api = InProcess::start(short(|c| c.auth_timeout = deadline)).await;
    let started = Instant::now();
    let mut client = Client::connect(&api.addr).await;
    client.refused("auth_timeout").await;
    let waited = started.elapsed();
    assert!(waited >= deadline && waited < deadline + Duration::from_secs(5), "closed after {waited:?}");
    assert_eq!(api.metric("vault_ws_disconnects_total{reason=\"auth_timeout\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_pings_and_drops_a_silent_client_while_one_that_answers_stays() {
    let (ping, idle) = (Duration::from_millis(200), Duration::from_millis(1200));
    let api = InProcess::start(short(|c| {
        c.ping_interval = ping;
        c.idle_timeout = idle;
    }))
    .await;
    let token = api.user("pinged@example.com").await;
    // Taken before the auth frame is sent: the server's idle clock starts when it reads it.
    let silent_since = Instant::now();
    let mut silent = Client::authed(&api.addr, &token).await;
    let mut answering = Client::authed(&api.addr, &token).await;

    // The silent one reads everything and sends nothing.
    let silent_task = tokio::spawn(async move {
        let mut pings = 0;
        loop {
            match silent.next().await {
                Incoming::Json(frame) if frame == json!({"op": "ping"}) => pings += 1,
                Incoming::Json(frame) => panic!("unexpected frame {frame}"),
                Incoming::Closed(close) => return (pings, close, silent_since.elapsed()),
            }
        }
    });
    // The other answers every ping with a pong, until the silent one is gone and then some.
    let mut answered = 0;
    let mut pinged_after_drop = 0;
    loop {
        match answering.next().await {
            Incoming::Json(frame) if frame == json!({"op": "ping"}) => {
                answered += 1;
                answering.send(json!({"op": "pong"})).await;
                if silent_task.is_finished() {
                    pinged_after_drop += 1;
                    if pinged_after_drop == 3 {
                        break;
                    }
                }
            }
            other => panic!("the answering client got {other:?}"),
        }
    }
    let (pings, close, lived) = silent_task.await.expect("the silent client's task");
    assert_eq!(close, Some((1008, "idle timeout".to_owned())));
    assert!(pings >= 2, "pinged {pings} times before the drop");
    assert!(lived >= idle && lived < idle + Duration::from_secs(5), "dropped after {lived:?}");
    assert!(answered >= pings, "the answering client kept getting pings ({answered})");
    assert_eq!(api.metric("vault_ws_disconnects_total{reason=\"idle\"}").await, 1.0);
    assert_eq!(api.metric("vault_ws_connections").await, 1.0, "the answering client is still connected");
}

/// A client whose receive buffer is tiny and who never reads: its data backs up into the
/// server's queue.
async fn stalled_client(addr: &str) -> Socket {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("a small receive buffer");
    let stream = socket.connect(addr.parse().expect("addr")).await.expect("connect");
    let (ws, _) = tokio_tungstenite::client_async(ws_url(addr), MaybeTlsStream::Plain(stream))
        .await
        .expect("the WebSocket upgrade succeeds");
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_that_never_reads_is_disconnected_while_another_keeps_receiving() {
    let api = InProcess::start(short(|c| {
        c.queue_capacity = 16;
        c.write_buffer_bytes = 1024;
        c.send_buffer_bytes = 16 * 1024;
    }))
    .await;
    let token = api.user("slow@example.com").await;
    let mut slow = stalled_client(&api.addr).await;
    slow.send(Message::text(json!({"op": "auth", "token": token}).to_string())).await.expect("auth");
    slow.send(Message::text(json!({"op": "subscribe", "channels": ["prices:BTC-USD"]}).to_string()))
        .await
        .expect("sub");
    let mut fast = Client::authed(&api.addr, &token).await;
    fast.subscribe(&["prices:BTC-USD"]).await;
    let nats = async_nats::connect(api.nats.url()).await.expect("nats");

    // Ticks in small bursts, each read by the fast client before the next (its queue is small
    // too), until the slow one is dropped.
    let started = Instant::now();
    let mut published = 0u64;
    while api.metric("vault_ws_slow_clients_dropped_total").await < 1.0 {
        assert!(started.elapsed() < Duration::from_secs(90), "the slow client was not dropped after {published} ticks");
        for _ in 0..50 {
            published += 1;
            let tick = price_tick("BTC-USD", &format!("{}", 50_000 + published), published);
            tokio::time::timeout(WAIT, nats.publish(tick.subject(), encode(&tick).expect("encodes").into()))
                .await
                .expect("a tick published within the deadline")
                .expect("publish");
            if published.is_multiple_of(10) {
                for _ in 0..10 {
                    fast.next_data().await;
                }
            }
        }
    }
    assert_eq!(fast.seq, published, "the fast client got every tick, in order, without a gap");
    assert_eq!(api.metric("vault_ws_disconnects_total{reason=\"slow_consumer\"}").await, 1.0);

    // The fast client keeps receiving after the drop.
    published += 1;
    let tick = price_tick("BTC-USD", "49000", published);
    nats.publish(tick.subject(), encode(&tick).expect("encodes").into()).await.expect("publish");
    let frame = fast.next_data().await;
    assert_eq!((&frame["data"]["price"], &frame["seq"]), (&json!("49000"), &json!(published)));

    // The slow client, reading at last, finds what was in flight, then the end: a close frame
    // "slow consumer" if it fitted in the buffers, else the connection simply ends. The window is
    // widened first, so that what was in flight comes at once.
    if let MaybeTlsStream::Plain(stream) = slow.get_ref() {
        rustix::net::sockopt::set_socket_recv_buffer_size(stream, 4 << 20).expect("a wider receive buffer");
    }
    let mut frames = 0u64;
    let ending = loop {
        match tokio::time::timeout(WAIT, slow.next()).await.expect("the slow client's connection ends") {
            Some(Ok(Message::Text(text))) if text.contains("\"channel\"") => frames += 1,
            Some(Ok(Message::Close(frame))) => break frame.map(|f| (u16::from(f.code), f.reason.to_string())),
            Some(Ok(_)) => {}
            None | Some(Err(_)) => break None,
        }
    };
    assert!(frames < published, "the slow client got {frames} of {published} frames");
    // What was in flight: the queue (16 frames), the server's send buffer (fixed at 16 KiB,
    // 32 KiB reserved), the 1 KiB write buffer and the client's small receive window — a few
    // hundred ~150-byte frames. Left to grow, the send buffer held megabytes: thousands of frames
    // (2,800 still arriving a minute later through the 4 KiB window, before it was widened).
    assert!(frames < 1_000, "{frames} frames were in flight when the slow client was dropped");
    if let Some(close) = &ending {
        assert_eq!(close, &(1008, "slow consumer".to_owned()));
    }
    poll_until(WAIT, "the slow connection to be gone and the fast one to remain", || async {
        (api.metric("vault_ws_connections").await == 1.0).then_some(())
    })
    .await;
    eprintln!("slow client dropped after {published} ticks; it had read {frames} frames, ending {ending:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_closes_an_open_socket_at_its_next_credential_check() {
    let api = InProcess::start(short(|c| c.recheck_interval = Duration::from_millis(300))).await;
    let token = api.user("leaving@example.com").await;
    let mut client = Client::authed(&api.addr, &token).await;
    client.subscribe(&["orders"]).await;
    let logout = api.http.post(api.url("/auth/logout")).bearer_auth(&token).send().await.expect("logout");
    assert_eq!(logout.status(), 204);
    client.refused("token_revoked").await;
    poll_until(WAIT, "the hub to drop the connection's subscription", || async {
        (api.metric("vault_ws_nats_subscriptions").await == 0.0).then_some(())
    })
    .await;
}

/// When the API's NATS connection is lost and made again, whatever was published meanwhile never
/// reached the process (the feed is core NATS): every client is told so, per channel it
/// subscribed, with a `feed_interrupted` error frame, and the feed goes on, numbered without a
/// gap. (Before, nothing told the client: a fill published while the API was reconnecting was
/// simply never shown.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_is_told_its_feed_was_interrupted_and_the_feed_goes_on() {
    let mut api = InProcess::start(WsConfig::default()).await;
    let token = api.user("gap@example.com").await;
    let mut client = Client::authed(&api.addr, &token).await;
    client.subscribe(&["orders", "prices:BTC-USD"]).await;
    api.nats.kill();
    api.nats.restart().await;

    // Ticks until one comes through (the first may be published before the hub's subscription
    // is back in place on the server); every frame is read in order, so the notice must come
    // before the first tick after the gap.
    let bus = Bus::connect(&api.nats.url(), "test").await.expect("connects");
    let deadline = Instant::now() + WAIT;
    let mut told = Vec::new();
    let mut seq = 0;
    let frame = 'ticked: loop {
        seq += 1;
        bus.publish(&price_tick("BTC-USD", "61000", seq), &MessageContext::default()).await.expect("tick");
        while let Ok(incoming) = tokio::time::timeout(Duration::from_millis(500), client.next()).await {
            match incoming {
                Incoming::Json(frame) if frame["op"] == "error" => {
                    assert_eq!(frame["code"], "feed_interrupted", "{frame}");
                    assert!(frame["detail"].as_str().is_some_and(|d| d.contains("REST")), "{frame}");
                    told.push(frame["channel"].as_str().expect("channel").to_owned());
                }
                Incoming::Json(frame) if frame.get("op").is_none() => break 'ticked frame,
                Incoming::Json(_) => {}
                Incoming::Closed(close) => panic!("closed: {close:?}"),
            }
        }
        assert!(Instant::now() < deadline, "timed out waiting for a tick after the interruption");
    };
    assert!(told.contains(&"prices:BTC-USD".to_owned()), "told before the first tick after the gap: {told:?}");
    assert_eq!((frame["channel"].as_str(), frame["data"]["price"].as_str()), (Some("prices:BTC-USD"), Some("61000")));
    assert_eq!(frame["seq"], 1, "numbered on, without a gap");
    // The orders channel is told too, whether or not anything comes on it.
    if !told.contains(&"orders".to_owned()) {
        let frame = client.next_control().await;
        assert_eq!((frame["code"].as_str(), frame["channel"].as_str()), (Some("feed_interrupted"), Some("orders")));
    }
}

/// A credential re-check that the database is slow to answer runs beside the feed: frames keep
/// flowing meanwhile and the client is not closed as a slow consumer. (Awaited in the
/// connection's loop, it held the queue undrained for up to its 5 s: a healthy client on a busy
/// feed was closed 1008 "slow consumer" whenever Postgres was slow.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_credential_check_holds_up_no_frame() {
    let api = InProcess::start(short(|c| {
        c.recheck_interval = Duration::from_secs(2);
        c.queue_capacity = 8;
    }))
    .await;
    let token = api.user("patient@example.com").await;
    let mut client = Client::authed(&api.addr, &token).await;
    client.subscribe(&["prices:BTC-USD"]).await;
    let pool = api._db.pool().await;
    let mut blocker = pool.begin().await.expect("tx");
    sqlx::query("LOCK TABLE token_families IN ACCESS EXCLUSIVE MODE").execute(&mut *blocker).await.expect("lock");
    vault_testkit::wait_for_lock_wait(&pool, "%token_families%", WAIT).await;

    let bus = Bus::connect(&api.nats.url(), "test").await.expect("connects");
    for seq in 1..=24 {
        bus.publish(&price_tick("BTC-USD", &format!("{}", 60000 + seq), seq), &MessageContext::default())
            .await
            .expect("tick");
    }
    for seq in 1..=24 {
        let frame = client.next_data().await;
        assert_eq!(frame["data"]["price"], format!("{}", 60000 + seq), "{frame}");
    }
    blocker.rollback().await.expect("unlock");
    client.send(json!({"op": "ping"})).await;
    assert_eq!(client.next_control().await, json!({"op": "pong"}));
}

/// A revocation ends the socket of the credential it revoked at once — here the periodic
/// re-check is an hour away — whether the socket is a logged-out session's or a revoked API
/// key's; the user's other session goes on. (A revoked credential's socket went on receiving
/// the user's order and notification frames until its next periodic check, up to a minute.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_credentials_socket_ends_at_once_and_the_users_others_go_on() {
    let api = InProcess::start(short(|c| c.recheck_interval = Duration::from_secs(3600))).await;
    let leaving = api.user("revoked@example.com").await;
    let body = json!({"email": "revoked@example.com", "password": support::PASSWORD});
    let login = api.http.post(api.url("/auth/login")).json(&body).send().await.expect("login");
    let staying = login.json::<Value>().await.expect("json")["access_token"].as_str().expect("token").to_owned();
    let created: Value = api
        .http
        .post(api.url("/api-keys"))
        .bearer_auth(&staying)
        .json(&json!({"name": "bot", "scopes": ["read"]}))
        .send()
        .await
        .expect("key")
        .json()
        .await
        .expect("json");
    let key = created["key"].as_str().expect("key");

    let mut logged_out = Client::authed(&api.addr, &leaving).await;
    logged_out.subscribe(&["orders"]).await;
    let mut other_session = Client::authed(&api.addr, &staying).await;
    other_session.subscribe(&["orders"]).await;
    let mut bot = Client::authed(&api.addr, key).await;
    bot.subscribe(&["orders"]).await;

    let logout = api.http.post(api.url("/auth/logout")).bearer_auth(&leaving).send().await.expect("logout");
    assert_eq!(logout.status(), 204);
    logged_out.refused("token_revoked").await;
    let revoke = api
        .http
        .delete(api.url(&format!("/api-keys/{}", created["id"].as_str().expect("id"))))
        .bearer_auth(&staying)
        .send()
        .await
        .expect("revoke");
    assert_eq!(revoke.status(), 204);
    bot.refused("invalid_api_key").await;
    // Checked again twice, and found live both times.
    other_session.send(json!({"op": "ping"})).await;
    assert_eq!(other_session.next_control().await, json!({"op": "pong"}));
}

/// A session's socket ends when its access token expires (as a request with it would be
/// refused), unless the client renews it first with another `auth` frame carrying a fresh token
/// of the same user; a token of another user does not take over the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_ends_when_its_access_token_expires_unless_a_fresh_token_renews_it() {
    use vault_api::auth::tokens::{ACCESS_TTL_SECS, JwtKeys};
    let api = InProcess::start(WsConfig::default()).await;
    let fresh = api.user("expiring@example.com").await;
    let other = api.user("someone-else@example.com").await;
    // A token of the same session that expires in 3 s, signed as the API signs.
    let keys = JwtKeys::new(TEST_JWT_SECRET.as_bytes());
    let claims = keys.verify(&fresh).expect("the API's own token");
    let minted_at = Utc::now() - chrono::Duration::seconds(ACCESS_TTL_SECS - 3);
    let (short, short_claims) = keys.issue(claims.sub, &claims.role, claims.fam, minted_at);

    let mut expiring = Client::authed(&api.addr, &short).await;
    expiring.subscribe(&["orders"]).await;
    let mut renewed = Client::authed(&api.addr, &short).await;
    renewed.subscribe(&["orders"]).await;
    renewed.send(json!({"op": "auth", "token": other})).await;
    let refused = renewed.next_control().await;
    assert_eq!((refused["op"].as_str(), refused["code"].as_str()), (Some("error"), Some("already_authenticated")));
    renewed.send(json!({"op": "auth", "token": fresh})).await;
    assert_eq!(renewed.next_control().await, json!({"op": "authenticated", "user_id": claims.sub}));

    expiring.refused("token_expired").await;
    assert!(Utc::now().timestamp() >= short_claims.exp, "not before the token's expiry");
    // The renewed connection goes on past the first token's expiry.
    renewed.send(json!({"op": "ping"})).await;
    assert_eq!(renewed.next_control().await, json!({"op": "pong"}));
}

/// Renewals are checked at most three times in ten seconds per socket (each check may read the
/// database): a fourth `auth` frame is answered `rate_limited` without a check, and the socket
/// goes on with the credential it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_renews_its_credential_at_most_three_times_in_ten_seconds() {
    let api = InProcess::start(WsConfig::default()).await;
    let token = api.user("renewer@example.com").await;
    let mut client = Client::authed(&api.addr, &token).await;
    for _ in 0..3 {
        client.send(json!({"op": "auth", "token": token})).await;
        assert_eq!(client.next_control().await["op"], "authenticated");
    }
    client.send(json!({"op": "auth", "token": token})).await;
    let refused = client.next_control().await;
    assert_eq!((refused["op"].as_str(), refused["code"].as_str()), (Some("error"), Some("rate_limited")), "{refused}");
    client.send(json!({"op": "ping"})).await;
    assert_eq!(client.next_control().await, json!({"op": "pong"}));
}

#[tokio::test]
async fn sigterm_closes_open_sockets_with_going_away_and_the_api_exits_zero() {
    let mut api = Api::start().await;
    let token = api.user("bye@example.com").await;
    let mut client = Client::authed(&api.addr, &token).await;
    client.subscribe(&["orders", "notifications", "prices:BTC-USD"]).await;
    api.proc.signal("TERM");
    let (close, _) = client.closed().await;
    assert_eq!(close, Some((1001, "going away".to_owned())));
    let status = api.proc.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status:?}:\n{}", api.proc.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_beyond_the_connection_limit_are_refused_until_a_connection_closes() {
    let api = InProcess::start(short(|c| c.max_connections = 2)).await;
    let token = api.user("crowd@example.com").await;
    let first = Client::authed(&api.addr, &token).await;
    let _second = Client::authed(&api.addr, &token).await;
    match tokio_tungstenite::connect_async(ws_url(&api.addr)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        other => panic!("a third connection should be refused with 503, got {:?}", other.map(|(_, r)| r.status())),
    }
    assert_eq!(api.metric("vault_ws_connections_refused_total").await, 1.0);
    // A closed connection frees its place.
    drop(first);
    poll_until(WAIT, "the first connection's place to be free", || async {
        tokio_tungstenite::connect_async(ws_url(&api.addr)).await.ok().map(|_| ())
    })
    .await;
}

/// Sockets that never authenticate cannot take every place: one address holds at most
/// `max_unauthenticated_per_ip` of them (for up to the auth deadline), and a client from another
/// address still gets in and authenticates. (Idle upgrades counted against the process's cap
/// alone: one address could hold ~500 of the 10,000 places at a time, twenty all of them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upgrades_from_one_address_hold_only_their_share() {
    let api = InProcess::start(short(|c| {
        c.max_connections = 4;
        c.max_unauthenticated_per_ip = 2;
    }))
    .await;
    let token = api.user("latecomer@example.com").await;
    let from = |source: &'static str| {
        let addr = api.addr.clone();
        async move {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket.bind(format!("{source}:0").parse().expect("source")).expect("bound");
            let stream = socket.connect(addr.parse().expect("addr")).await.expect("connects");
            tokio_tungstenite::client_async(ws_url(&addr), stream).await
        }
    };
    let _idle = [from("127.0.0.1").await.expect("first idle"), from("127.0.0.1").await.expect("second idle")];
    match from("127.0.0.1").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 429);
            // This limit's headers, not the IP bucket's (which had requests left).
            let header = |name: &str| response.headers()[name].to_str().expect("ascii").to_owned();
            assert_eq!(
                (header("x-ratelimit-limit"), header("x-ratelimit-remaining")),
                ("2".to_owned(), "0".to_owned())
            );
        }
        other => panic!(
            "a third idle upgrade from one address should be refused with 429, got {:?}",
            other.map(|(_, r)| r.status())
        ),
    }
    let (mut ws, _) = from("127.0.0.2").await.expect("another address gets in");
    ws.send(Message::text(json!({"op": "auth", "token": token}).to_string())).await.expect("auth sent");
    let ack = loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("a frame") {
            Some(Ok(Message::Text(text))) => break serde_json::from_str::<Value>(&text).expect("json"),
            Some(Ok(_)) => continue,
            other => panic!("closed: {other:?}"),
        }
    };
    assert_eq!(ack["op"], "authenticated", "{ack}");
}

/// One account cannot take every place: the upgrade carries no credential, so without a cap
/// per user one account could open connections up to the process's limit and shut everyone
/// else out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_holds_at_most_their_share_of_connections_and_others_still_get_in() {
    let api = InProcess::start(short(|c| c.max_connections_per_user = 2)).await;
    let greedy = api.user("greedy@example.com").await;
    let other = api.user("other@example.com").await;
    let first = Client::authed(&api.addr, &greedy).await;
    let _second = Client::authed(&api.addr, &greedy).await;
    let mut third = Client::connect(&api.addr).await;
    third.send(json!({"op": "auth", "token": greedy})).await;
    third.refused("too_many_connections").await;
    assert_eq!(api.metric("vault_ws_connections_refused_total").await, 1.0);
    let mut theirs = Client::authed(&api.addr, &other).await;
    theirs.subscribe(&["orders"]).await;
    // A closed connection gives its place back.
    drop(first);
    poll_until(WAIT, "the greedy user's first place to be free", || async {
        let mut again = Client::connect(&api.addr).await;
        again.send(json!({"op": "auth", "token": greedy})).await;
        (again.next_control().await["op"] == "authenticated").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_flooding_frames_is_closed_while_a_calm_one_is_not() {
    let api = InProcess::start(short(|c| c.max_client_frames_per_sec = 5)).await;
    let token = api.user("flood@example.com").await;
    let mut calm = Client::authed(&api.addr, &token).await;
    let mut flood = Client::authed(&api.addr, &token).await;
    for _ in 0..12 {
        flood.ws.send(Message::text(json!({"op": "ping"}).to_string())).await.expect("send");
    }
    let (close, errors) = flood.closed().await;
    assert_eq!(close, Some((1008, "rate_limited".to_owned())), "errors: {errors:?}");
    assert_eq!(errors.last().map(|e| e["code"].clone()), Some(json!("rate_limited")));
    // Five frames a second is fine: the calm client's frames are all answered.
    calm.send(json!({"op": "ping"})).await;
    assert_eq!(calm.next_control().await, json!({"op": "pong"}));
    calm.subscribe(&["orders"]).await;
}
