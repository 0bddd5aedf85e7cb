//! The `coinbase` price source against a fake Coinbase Exchange feed: a local WebSocket server
//! speaking the real protocol (it waits for the `subscribe`, answers `subscriptions`, then plays
//! recorded frames from `fixtures/coinbase_ticker.jsonl`: BTC-USD and ETH-USD tickers, heartbeats,
//! and BTC-EUR, a product we do not list).
//!
//! With the real `vault-worker prices` binary, NATS and Postgres: the recorded prices reach
//! `prices.<SYMBOL>` with source `coinbase`; after the feed drops the connection the worker
//! reconnects, the replayed frames are recognised as duplicates (by Coinbase's per-product
//! sequence) and only the new ones are published; malformed frames and bad ticks are refused,
//! counted on `/metrics`, and the feed goes on. With the source alone (short timings): a feed
//! that only sends heartbeats is alive, a silent one is stalled and replaced, an `error` frame
//! ends the connection, and a `next_batch` interrupted again and again loses nothing.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{SinkExt, StreamExt};
use rust_decimal_macros::dec;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use vault_bus::message::{PriceTick, decode};
use vault_core::domain::Symbol;
use vault_testkit::{
    NatsServer, Proc, TestDb, assert_config_error, base_env, free_port, http_client, offline_env, poll_until,
};
use vault_workers::prices::{Coinbase, CoinbaseOptions, Listed, PriceSource, Quote};

const BIN: &str = env!("CARGO_BIN_EXE_vault-worker");

/// Recorded frames, one per line. Lines 1–9 are the "first half" (3 BTC-USD and 2 ETH-USD
/// tickers, 1 BTC-EUR, 3 heartbeats), lines 10–15 the rest (2 BTC-USD, 2 ETH-USD, 1 BTC-EUR,
/// 1 heartbeat).
const RECORDING: &str = include_str!("fixtures/coinbase_ticker.jsonl");
const FIRST_HALF: usize = 9;

/// Injected after the first half on the first connection: two malformed frames, a zero and a
/// negative price, and a tenfold jump. Their sequences and times fall between the two halves.
const FAULTS: [&str; 5] = [
    r#"{"type":"ticker","sequence":80123456840,"product_id":"BTC-USD","price":"61511."#,
    r#"{"type":"ticker","sequence":80123456841,"product_id":"BTC-USD","price":"61,511.20","side":"buy","time":"2024-05-14T13:45:02.010000Z","trade_id":637120090,"last_size":"0.01"}"#,
    r#"{"type":"ticker","sequence":80123456845,"product_id":"BTC-USD","price":"0.00000000","side":"buy","time":"2024-05-14T13:45:02.100000Z","trade_id":637120091,"last_size":"0.01"}"#,
    r#"{"type":"ticker","sequence":52123456840,"product_id":"ETH-USD","price":"-2903.70","side":"sell","time":"2024-05-14T13:45:02.150000Z","trade_id":512230091,"last_size":"0.20"}"#,
    r#"{"type":"ticker","sequence":80123456850,"product_id":"BTC-USD","price":"615100.00","side":"buy","time":"2024-05-14T13:45:02.200000Z","trade_id":637120092,"last_size":"0.01"}"#,
];

fn recording() -> Vec<String> {
    RECORDING.lines().filter(|l| !l.trim().is_empty()).map(str::to_owned).collect()
}

// ---------------------------------------------------------------------------------------------
// The fake feed

/// What the fake feed does on a connection once it has answered the subscribe.
#[derive(Debug, Clone)]
enum Step {
    Send(String),
    /// A heartbeat for BTC-USD every `every`, for `total`.
    HeartbeatsFor {
        every: Duration,
        total: Duration,
    },
    /// A heartbeat every `every` until the client goes.
    Heartbeats(Duration),
    /// Drop the connection (no closing handshake).
    Drop,
}

/// A local stand-in for `wss://ws-feed.exchange.coinbase.com`. Connection `n` plays plan `n`;
/// after its plan (or beyond the plans) a connection stays open and silent until the client goes.
struct FakeFeed {
    addr: SocketAddr,
    /// Every subscribe message received, in order.
    subscribes: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeFeed {
    async fn start(plans: Vec<Vec<Step>>, handshake_delay: Duration) -> FakeFeed {
        FakeFeed::start_at("127.0.0.1:0", plans, handshake_delay).await
    }

    async fn start_at(addr: &str, plans: Vec<Vec<Step>>, handshake_delay: Duration) -> FakeFeed {
        let listener = TcpListener::bind(addr).await.expect("bind the fake feed");
        let addr = listener.local_addr().expect("its address");
        let subscribes = Arc::new(Mutex::new(Vec::new()));
        let seen = subscribes.clone();
        let task = tokio::spawn(async move {
            let mut n = 0;
            while let Ok((stream, _)) = listener.accept().await {
                let plan = plans.get(n).cloned().unwrap_or_default();
                n += 1;
                tokio::spawn(serve(stream, plan, seen.clone(), handshake_delay));
            }
        });
        FakeFeed { addr, subscribes, task }
    }

    fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    fn subscribes(&self) -> Vec<Value> {
        self.subscribes.lock().expect("not poisoned").clone()
    }
}

impl Drop for FakeFeed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(stream: TcpStream, plan: Vec<Step>, subscribes: Arc<Mutex<Vec<Value>>>, handshake_delay: Duration) {
    tokio::time::sleep(handshake_delay).await;
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
    // Like Coinbase: without a subscribe within 5 seconds the connection is closed.
    let first = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    let Ok(Some(Ok(Message::Text(text)))) = first else { return };
    let subscribe: Value = serde_json::from_str(text.as_str()).unwrap_or_default();
    if subscribe["type"] != "subscribe" {
        let error = json!({"type": "error", "message": "Failed to subscribe", "reason": "expected a subscribe"});
        let _ = ws.send(Message::text(error.to_string())).await;
        return;
    }
    subscribes.lock().expect("not poisoned").push(subscribe.clone());
    let channels: Vec<Value> = subscribe["channels"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|name| json!({"name": name, "product_ids": subscribe["product_ids"]}))
        .collect();
    let answer = json!({"type": "subscriptions", "channels": channels});
    if ws.send(Message::text(answer.to_string())).await.is_err() {
        return;
    }
    let mut sequence = 80_123_500_000u64;
    let mut heartbeat = move || {
        sequence += 1;
        let time = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        Message::text(
            json!({"type": "heartbeat", "last_trade_id": 637120006, "product_id": "BTC-USD", "sequence": sequence, "time": time})
                .to_string(),
        )
    };
    for step in plan {
        let sent = match step {
            Step::Send(frame) => ws.send(Message::text(frame)).await,
            Step::HeartbeatsFor { every, total } => {
                let until = tokio::time::Instant::now() + total;
                let mut sent = Ok(());
                while sent.is_ok() && tokio::time::Instant::now() < until {
                    tokio::time::sleep(every).await;
                    sent = ws.send(heartbeat()).await;
                }
                sent
            }
            Step::Heartbeats(every) => loop {
                tokio::time::sleep(every).await;
                if let Err(e) = ws.send(heartbeat()).await {
                    break Err(e);
                }
            },
            Step::Drop => return,
        };
        if sent.is_err() {
            return;
        }
    }
    // Silent, until the client goes.
    while let Some(Ok(_)) = ws.next().await {}
}

// ---------------------------------------------------------------------------------------------
// Helpers

async fn ticks(nats: &NatsServer, symbol: &str) -> Vec<PriceTick> {
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    let stream = js.get_stream("PRICES").await.expect("the PRICES stream");
    let last = stream.get_info().await.expect("stream info").state.last_sequence;
    let subject = format!("prices.{symbol}");
    let mut out = Vec::new();
    for seq in 1..=last {
        let Ok(msg) = stream.get_raw_message(seq).await else { continue };
        if msg.subject.as_str() == subject {
            out.push(decode::<PriceTick>(&subject, &msg.payload).expect("a price tick"));
        }
    }
    out
}

/// The value of the sample of `name` carrying every label in `labels`, if there is one.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        labels.iter().all(|(k, v)| series.contains(&format!("{k}=\"{v}\""))).then(|| value.parse().ok())?
    })
}

fn at(s: &str) -> DateTime<Utc> {
    s.parse().expect("a time")
}

fn listed(symbol: &str) -> Listed {
    Listed { symbol: Symbol::parse(symbol).expect("valid"), increment: dec!(0.01) }
}

/// Timings short enough for a test.
fn quick(stall: Duration) -> CoinbaseOptions {
    CoinbaseOptions {
        stall,
        healthy: Duration::from_secs(60),
        connect_timeout: Duration::from_secs(5),
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
    }
}

fn prices(quotes: &[Quote]) -> Vec<String> {
    quotes.iter().map(|q| format!("{} {}", q.symbol, q.price)).collect()
}

async fn next(source: &mut Coinbase, what: &str) -> Vec<Quote> {
    tokio::time::timeout(Duration::from_secs(10), source.next_batch())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("the source never ends")
}

// ---------------------------------------------------------------------------------------------
// The worker process

#[tokio::test]
async fn recorded_prices_flow_across_a_dropped_connection_without_duplicates_and_bad_frames_are_counted() {
    let (nats, db) = (NatsServer::start().await, TestDb::migrated().await);
    let lines = recording();
    let mut first: Vec<Step> = lines[..FIRST_HALF].iter().cloned().map(Step::Send).collect();
    first.extend(FAULTS.iter().map(|f| Step::Send((*f).to_owned())));
    first.push(Step::Drop);
    // The second connection replays the whole recording from the start, then stays alive.
    let mut second: Vec<Step> = lines.iter().cloned().map(Step::Send).collect();
    second.push(Step::Heartbeats(Duration::from_millis(500)));
    let feed = FakeFeed::start(vec![first, second], Duration::ZERO).await;

    let mut envs = base_env(&db, &nats);
    envs.push(("PRICE_SOURCE", "coinbase".to_owned()));
    envs.push(("COINBASE_WS_URL", feed.url()));
    let (mut worker, addr) = Proc::start_ready(BIN, &["prices"], &envs).await;

    // The last frame of the recording is an ETH-USD ticker: once it is published, every frame
    // before it (faults and replays included) has been handled.
    let eth = poll_until(Duration::from_secs(30), "the last recorded ETH-USD price", || async {
        let ticks = ticks(&nats, "ETH-USD").await;
        ticks.last().is_some_and(|t| t.price.get() == dec!(2903.90)).then_some(ticks)
    })
    .await;
    let btc = ticks(&nats, "BTC-USD").await;
    let shown = |ticks: &[PriceTick]| ticks.iter().map(|t| (t.seq, t.price.to_string())).collect::<Vec<_>>();
    let expect =
        |prices: &[&str]| prices.iter().enumerate().map(|(i, p)| (i as u64 + 1, (*p).to_owned())).collect::<Vec<_>>();
    assert_eq!(
        shown(&btc),
        expect(&["61512.34", "61513.02", "61510", "61515.55", "61516.1"]),
        "each recorded BTC-USD price once, without the zero and the jump"
    );
    assert_eq!(shown(&eth), expect(&["2903.51", "2903.66", "2904.02", "2903.9"]), "without the negative price");
    assert!(btc.iter().chain(&eth).all(|t| t.source == "coinbase"));
    assert_eq!(btc[0].ts, at("2024-05-14T13:45:00.101234Z"), "stamped with the trade time");
    assert_eq!(eth[3].ts, at("2024-05-14T13:45:03.650009Z"));
    assert!(ticks(&nats, "BTC-EUR").await.is_empty(), "a product we do not list is ignored");

    // The worker subscribed twice, each time to every listed market.
    let subscribes = feed.subscribes();
    assert_eq!(subscribes.len(), 2, "{subscribes:?}");
    let markets = json!([
        "ADA-USD", "AVAX-USD", "BTC-USD", "DOGE-USD", "DOT-USD", "ETH-USD", "LINK-USD", "LTC-USD", "SOL-USD", "XRP-USD"
    ]);
    for s in &subscribes {
        assert_eq!(s["product_ids"], markets, "{s}");
        assert!(s["channels"].as_array().is_some_and(|c| c.contains(&json!("ticker"))), "{s}");
    }

    let text =
        http_client().get(format!("http://{addr}/metrics")).send().await.expect("metrics").text().await.expect("text");
    let source = ("source", "coinbase");
    let value = |name: &str, labels: &[(&str, &str)]| metric(&text, name, labels);
    assert_eq!(value("vault_price_source_parse_failures_total", &[source]), Some(2.0), "the two malformed frames");
    assert_eq!(value("vault_price_source_duplicates_total", &[source]), Some(5.0), "the replayed half's 5 tickers");
    let rejected = "vault_price_ticks_rejected_total";
    assert_eq!(value(rejected, &[("symbol", "BTC-USD"), ("reason", "not_positive")]), Some(1.0));
    assert_eq!(value(rejected, &[("symbol", "ETH-USD"), ("reason", "not_positive")]), Some(1.0));
    assert_eq!(
        value(rejected, &[("symbol", "BTC-USD"), ("reason", "jump")]),
        Some(1.0),
        "refused once, not again on replay"
    );
    assert_eq!(value(rejected, &[("reason", "out_of_order")]), None, "replays are dropped as duplicates first");
    let reconnects = "vault_price_source_reconnects_total";
    assert_eq!(value(reconnects, &[source, ("reason", "closed")]), Some(1.0), "the one dropped connection");
    for reason in ["error", "stalled", "refused", "connect_failed"] {
        assert_eq!(value(reconnects, &[source, ("reason", reason)]), Some(0.0), "{reason}: registered at 0, never hit");
    }
    assert_eq!(value("vault_price_source_connected", &[source]), Some(1.0));
    let output = worker.output();
    assert!(output.contains("unusable frame from the Coinbase feed") && output.contains("tick refused"), "{output}");

    assert!(worker.is_running(), "{output}");
    worker.stop_cleanly(Duration::from_secs(30)).await;
}

#[tokio::test]
async fn a_coinbase_ws_url_that_is_not_a_websocket_url_stops_the_worker_with_exit_code_two() {
    assert_config_error(
        BIN,
        &["prices"],
        &offline_env("COINBASE_WS_URL", "https://ws-feed.exchange.coinbase.com"),
        "COINBASE_WS_URL",
        &["db-password-not-printed"],
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// The source alone

const BTC_TICKER: &str = r#"{"type":"ticker","sequence":80123456900,"product_id":"BTC-USD","price":"61517.25","side":"buy","time":"2024-05-14T13:45:04.000001Z","trade_id":637120007,"last_size":"0.002"}"#;
const BTC_NEXT: &str = r#"{"type":"ticker","sequence":80123456910,"product_id":"BTC-USD","price":"61518.00","side":"sell","time":"2024-05-14T13:45:05.000001Z","trade_id":637120008,"last_size":"0.010"}"#;

#[tokio::test]
async fn heartbeats_keep_a_connection_alive_and_a_silent_one_is_replaced_after_the_stall_timeout() {
    let stall = Duration::from_secs(1);
    let feed = FakeFeed::start(
        vec![
            // Heartbeats only, for more than twice the stall timeout, then a price, then silence.
            vec![
                Step::HeartbeatsFor { every: Duration::from_millis(200), total: Duration::from_millis(2500) },
                Step::Send(BTC_TICKER.to_owned()),
            ],
            vec![Step::Send(BTC_NEXT.to_owned())],
        ],
        Duration::ZERO,
    )
    .await;
    let mut source = Coinbase::new(feed.url(), vec![listed("BTC-USD")], quick(stall));

    let first = next(&mut source, "the price after the heartbeats").await;
    assert_eq!(prices(&first), ["BTC-USD 61517.25"]);
    assert_eq!(feed.subscribes().len(), 1, "heartbeats kept the first connection alive");

    let silent_since = std::time::Instant::now();
    let second = next(&mut source, "a price from a new connection").await;
    assert_eq!(prices(&second), ["BTC-USD 61518"]);
    assert_eq!(feed.subscribes().len(), 2, "the silent connection was replaced");
    assert!(silent_since.elapsed() >= stall, "replaced because it stalled: {:?}", silent_since.elapsed());
}

#[tokio::test]
async fn an_error_frame_ends_the_connection_and_the_source_subscribes_again() {
    let error = r#"{"type":"error","message":"Failed to subscribe","reason":"BTC-USD is delisted"}"#;
    let feed = FakeFeed::start(
        vec![vec![Step::Send(error.to_owned())], vec![Step::Send(BTC_TICKER.to_owned())]],
        Duration::ZERO,
    )
    .await;
    // A stall timeout far beyond the test: only the error frame can end the first connection.
    let mut source = Coinbase::new(feed.url(), vec![listed("BTC-USD")], quick(Duration::from_secs(60)));
    let batch = next(&mut source, "a price after the error").await;
    assert_eq!(prices(&batch), ["BTC-USD 61517.25"]);
    assert_eq!(feed.subscribes().len(), 2);
}

#[tokio::test]
async fn a_feed_that_is_down_is_retried_until_it_comes_up() {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut source = Coinbase::new(format!("ws://{addr}"), vec![listed("BTC-USD")], quick(Duration::from_secs(60)));
    // Nothing listens yet: attempts fail (refused) and are retried with backoff.
    let nothing = tokio::time::timeout(Duration::from_millis(500), source.next_batch()).await;
    assert!(nothing.is_err(), "no feed, no prices: {nothing:?}");
    let feed = FakeFeed::start_at(&addr, vec![vec![Step::Send(BTC_TICKER.to_owned())]], Duration::ZERO).await;
    let batch = next(&mut source, "a price once the feed is up").await;
    assert_eq!(prices(&batch), ["BTC-USD 61517.25"]);
    assert_eq!(feed.subscribes().len(), 1);
}

#[tokio::test]
async fn a_next_batch_interrupted_again_and_again_loses_no_frame_even_during_a_slow_handshake() {
    let lines = recording();
    // Every handshake takes 300 ms, far longer than the 20 ms the caller waits each time.
    let feed = FakeFeed::start(vec![lines.iter().cloned().map(Step::Send).collect()], Duration::from_millis(300)).await;
    let mut source =
        Coinbase::new(feed.url(), vec![listed("BTC-USD"), listed("ETH-USD")], quick(Duration::from_secs(60)));
    let expected = [
        "BTC-USD 61512.34",
        "ETH-USD 2903.51",
        "BTC-USD 61513.02",
        "ETH-USD 2903.66",
        "BTC-USD 61510",
        "BTC-USD 61515.55",
        "ETH-USD 2904.02",
        "BTC-USD 61516.1",
        "ETH-USD 2903.9",
    ];
    let mut quotes = Vec::new();
    let mut interrupted = 0;
    let started = std::time::Instant::now();
    while quotes.len() < expected.len() {
        assert!(started.elapsed() < Duration::from_secs(10), "only {:?} after 10 s", prices(&quotes));
        match tokio::time::timeout(Duration::from_millis(20), source.next_batch()).await {
            Ok(batch) => quotes.extend(batch.expect("the source never ends")),
            // Counted until the first quote: the waits that interrupted the handshake.
            Err(_) if quotes.is_empty() => interrupted += 1,
            Err(_) => {}
        }
    }
    assert_eq!(prices(&quotes), expected);
    // About 15 on a quiet machine; a loaded one wakes the waits late, so fewer fit in 300 ms,
    // but a handshake interrupted again and again is still one interrupted at least twice.
    assert!(interrupted >= 2, "the handshake outlasts several waits: {interrupted}");
    assert_eq!(feed.subscribes().len(), 1, "one connection, never abandoned half-made");
}
