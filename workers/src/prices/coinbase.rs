//! The `coinbase` source: live prices from the public Coinbase Exchange ticker feed over a
//! WebSocket (`COINBASE_WS_URL`, by default `wss://ws-feed.exchange.coinbase.com`).
//!
//! Protocol: after connecting, the source sends one `subscribe` for the `ticker` and
//! `heartbeat` channels of every market in the `markets` table (product ids are our symbols,
//! `BTC-USD`); the feed answers `subscriptions`, then a `ticker` frame per trade (the price as a
//! decimal string, the trade time, a per-product `sequence`) and a `heartbeat` per product every
//! second. Frames of products we do not list are ignored; unknown frame types are ignored, as
//! the protocol asks; an `error` frame ends the connection.
//!
//! What a ticker becomes: the price is parsed as an exact decimal (never a float) and rounded
//! half-even to the market's price increment; a price that is zero or below (or rounds to zero)
//! is refused and counted as `vault_price_ticks_rejected_total{reason="not_positive"}`. The tick
//! is stamped with the exchange's trade time, never later than the local clock, so a skewed or
//! broken timestamp cannot push a symbol's time ahead and make the validator refuse every later
//! tick; `MAX_PRICE_AGE` thus measures the time since the market's last trade. A frame that
//! cannot be parsed is logged and counted in `vault_price_source_parse_failures_total`, and the
//! feed goes on.
//!
//! Duplicates: the feed may repeat frames around a reconnect. The rule, per product: a ticker is
//! new when its `sequence` is above the highest one seen, or (a sequence reset on Coinbase's
//! side) when its time is after that frame's time; otherwise it is a duplicate, dropped before
//! validation and counted in `vault_price_source_duplicates_total`. What was seen survives
//! reconnects (it lives in the source, not the connection). A frame older than the last accepted
//! tick that slips through (after a sequence reset) is still refused by the validator
//! (`out_of_order`).
//!
//! Liveness: a connection that sends no text frame for [`Options::stall`] (heartbeats count;
//! transport pings do not) is dead. A lost connection or a failed attempt is counted in
//! `vault_price_source_reconnects_total{reason}` (`closed`, `error`, `stalled`, `refused` for an
//! `error` frame, `connect_failed`) and the next attempt waits an exponential backoff with
//! jitter (`backon`: 0.5 s doubling to 30 s, each plus up to 100 %), which starts over once a
//! connection has delivered frames for [`Options::healthy`]. `vault_price_source_connected` is 1
//! while a connection is open.
//!
//! Cancel safety (the worker drops `next_batch` whenever one of its timers fires): everything
//! lives in the struct — the connection, the instant the next attempt is due, the instant of the
//! last frame, the quotes not yet handed out — and every await only waits for one of them. The
//! handshake runs on its own task, so an interrupted wait never abandons a half-made connection
//! (a slow TLS handshake would otherwise never finish between two timer ticks).
//!
//! What this source may not do: hand out a price it did not parse exactly, a product we do not
//! list, or a frame it already handed out; or give up — it retries until the worker stops.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use chrono::{DateTime, Utc};
use futures::{FutureExt, SinkExt, StreamExt};
use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::Value;
use sqlx::PgPool;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use vault_core::domain::{Positive, Symbol};

use super::{PriceSource, Quote, Rejection};

/// The name of this source, in ticks and in the `source` label of its metrics.
const SOURCE: &str = "coinbase";

/// The largest frame accepted: ticker frames are a few hundred bytes.
const MAX_FRAME_BYTES: usize = 1 << 20;

/// The most quotes handed out in one batch (frames already received are drained up to this).
const MAX_BATCH: usize = 256;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Timing of the connection's life.
#[derive(Debug, Clone)]
pub struct Options {
    /// No text frame for this long and the connection is dead.
    pub stall: Duration,
    /// A connection that delivered frames for this long starts the backoff over.
    pub healthy: Duration,
    /// The longest a connection attempt (TCP, TLS, WebSocket handshake, subscribe) may take.
    pub connect_timeout: Duration,
    /// The first wait before reconnecting; doubled on every failure up to `max_backoff`, each
    /// wait plus a random jitter of up to 100 %.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            stall: Duration::from_secs(30),
            healthy: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// A market we list, as the feed's product id maps to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub symbol: Symbol,
    pub increment: Decimal,
}

/// The markets to subscribe to: every row of `markets`.
pub async fn listed_markets(pool: &PgPool) -> anyhow::Result<Vec<Listed>> {
    let rows: Vec<(String, Decimal)> =
        sqlx::query_as("SELECT symbol, price_increment FROM markets ORDER BY symbol").fetch_all(pool).await?;
    rows.into_iter()
        .map(|(symbol, increment)| {
            Ok(Listed { symbol: Symbol::parse(&symbol).map_err(anyhow::Error::msg)?, increment })
        })
        .collect()
}

/// One frame of the feed, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Ticker(Ticker),
    Heartbeat,
    /// The feed's confirmation of what we are subscribed to (its `channels`, as JSON text).
    Subscriptions(String),
    /// The feed refused something; it closes the connection after it.
    Error {
        message: String,
        reason: String,
    },
    /// Any other type, named: the protocol may add types at any time and clients ignore them.
    Other(String),
}

/// The fields of a `ticker` frame this source uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticker {
    pub product_id: String,
    /// As sent, exact; not yet checked to be positive.
    pub price: Decimal,
    pub time: DateTime<Utc>,
    /// Per product, increasing.
    pub sequence: u64,
}

/// Parses one text frame; the error says what is wrong, for the log.
pub fn parse_frame(text: &str) -> Result<Frame, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
    let kind = value.get("type").and_then(Value::as_str).ok_or("no \"type\" string")?;
    let text_field = |name: &str| {
        value.get(name).and_then(Value::as_str).ok_or_else(|| format!("{kind} frame without a {name:?} string"))
    };
    match kind {
        "ticker" => {
            let product_id = text_field("product_id")?.to_owned();
            let raw_price = text_field("price")?;
            let price =
                raw_price.parse::<Decimal>().map_err(|_| format!("ticker price {raw_price:?} is not a decimal"))?;
            let raw_time = text_field("time")?;
            let time = DateTime::parse_from_rfc3339(raw_time)
                .map_err(|e| format!("ticker time {raw_time:?} is not RFC 3339 ({e})"))?
                .with_timezone(&Utc);
            let sequence =
                value.get("sequence").and_then(Value::as_u64).ok_or("ticker frame without a \"sequence\" number")?;
            Ok(Frame::Ticker(Ticker { product_id, price, time, sequence }))
        }
        "heartbeat" => Ok(Frame::Heartbeat),
        "subscriptions" => Ok(Frame::Subscriptions(value.get("channels").map(Value::to_string).unwrap_or_default())),
        "error" => Ok(Frame::Error {
            message: text_field("message").unwrap_or_default().to_owned(),
            reason: text_field("reason").unwrap_or_default().to_owned(),
        }),
        other => Ok(Frame::Other(other.to_owned())),
    }
}

/// The subscribe message for `markets`: the ticker channel, and heartbeats so a quiet market
/// still proves the connection alive.
pub fn subscribe_message(markets: &[Listed]) -> String {
    let products: Vec<String> = markets.iter().map(|m| m.symbol.to_string()).collect();
    serde_json::json!({"type": "subscribe", "product_ids": products, "channels": ["ticker", "heartbeat"]}).to_string()
}

/// What becomes of one ticker.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Quote(Quote),
    /// A product we do not list.
    Unlisted,
    /// Seen before (see the module doc for the rule).
    Duplicate,
    /// Zero or below, or rounds to zero at the market's increment.
    NotPositive(Symbol),
    /// So large that rounding it to the increment overflows: not a price.
    OutOfRange(Symbol),
}

/// The ticker-to-quote rules, apart from any connection: listing, duplicates, rounding.
#[derive(Debug)]
struct Intake {
    markets: BTreeMap<String, Listed>,
    /// Per product, the sequence and time of the newest frame seen.
    seen: HashMap<String, (u64, DateTime<Utc>)>,
}

impl Intake {
    fn new(markets: Vec<Listed>) -> Intake {
        let markets = markets.into_iter().map(|m| (m.symbol.to_string(), m)).collect();
        Intake { markets, seen: HashMap::new() }
    }

    fn accept(&mut self, ticker: Ticker, now: DateTime<Utc>) -> Verdict {
        let Some(market) = self.markets.get(&ticker.product_id) else {
            return Verdict::Unlisted;
        };
        if let Some(&(sequence, time)) = self.seen.get(&ticker.product_id)
            && ticker.sequence <= sequence
            && ticker.time <= time
        {
            return Verdict::Duplicate;
        }
        self.seen.insert(ticker.product_id.clone(), (ticker.sequence, ticker.time));
        let symbol = market.symbol.clone();
        // Half-even to the increment, as the simulator rounds; checked, as the text may be huge.
        let rounded = ticker
            .price
            .checked_div(market.increment)
            .map(|steps| steps.round_dp_with_strategy(0, RoundingStrategy::MidpointNearestEven))
            .and_then(|steps| steps.checked_mul(market.increment));
        match rounded {
            None => Verdict::OutOfRange(symbol),
            Some(price) => match Positive::new(price) {
                Ok(price) => Verdict::Quote(Quote { symbol, price, ts: ticker.time.min(now) }),
                Err(_) => Verdict::NotPositive(symbol),
            },
        }
    }
}

/// The state of the connection. Only ever advanced after an await completed, so dropping a
/// `next_batch` future at any await leaves it consistent.
#[derive(Debug)]
enum Link {
    /// The next attempt is due at this instant (at once for the first).
    Waiting {
        due: Instant,
    },
    /// A handshake and subscribe on its own task.
    Connecting(JoinHandle<Result<Box<Ws>, String>>),
    Open {
        ws: Box<Ws>,
        opened: Instant,
        last_frame: Instant,
    },
}

/// What one step of the connection produced.
enum Event {
    Due,
    Connected(Result<Box<Ws>, String>),
    Message(Option<Result<Message, tungstenite::Error>>),
    Stalled,
}

/// The `coinbase` price source.
#[derive(Debug)]
pub struct Coinbase {
    url: String,
    subscribe: String,
    options: Options,
    intake: Intake,
    link: Link,
    backoff: ExponentialBackoff,
    /// Quotes parsed and not yet handed out.
    buffer: Vec<Quote>,
}

impl Coinbase {
    /// A source for `markets` at `url`; it connects on the first `next_batch`.
    pub fn new(url: impl Into<String>, markets: Vec<Listed>, options: Options) -> Coinbase {
        register_metrics();
        Coinbase {
            url: url.into(),
            subscribe: subscribe_message(&markets),
            backoff: new_backoff(&options),
            options,
            intake: Intake::new(markets),
            link: Link::Waiting { due: Instant::now() },
            buffer: Vec::new(),
        }
    }

    /// Waits for the next thing to happen to the connection and handles it. Cancel-safe.
    async fn step(&mut self) {
        let event = match &mut self.link {
            Link::Waiting { due } => {
                tokio::time::sleep_until(*due).await;
                Event::Due
            }
            Link::Connecting(task) => {
                Event::Connected(task.await.unwrap_or_else(|e| Err(format!("the connecting task failed: {e}"))))
            }
            Link::Open { ws, last_frame, .. } => {
                let stalled_at = *last_frame + self.options.stall;
                tokio::select! {
                    // A frame already waiting wins over a stall deadline that passed while the
                    // worker was busy publishing.
                    biased;
                    message = ws.next() => Event::Message(message),
                    () = tokio::time::sleep_until(stalled_at) => Event::Stalled,
                }
            }
        };
        match event {
            Event::Due => {
                tracing::info!(url = %self.url, "connecting to the Coinbase feed");
                self.link = Link::Connecting(tokio::spawn(connect(
                    self.url.clone(),
                    self.subscribe.clone(),
                    self.options.connect_timeout,
                )));
            }
            Event::Connected(Ok(ws)) => {
                tracing::info!(url = %self.url, "connected to the Coinbase feed; subscribed");
                metrics::gauge!("vault_price_source_connected", "source" => SOURCE).set(1.0);
                let now = Instant::now();
                self.link = Link::Open { ws, opened: now, last_frame: now };
            }
            Event::Connected(Err(e)) => self.retry("connect_failed", &e, false),
            Event::Stalled => {
                let detail = format!("no frame for {:?}", self.options.stall);
                self.lose("stalled", &detail);
            }
            Event::Message(message) => {
                self.on_message(message);
                // Hand out what has already arrived in one batch, not one frame per batch.
                while self.buffer.len() < MAX_BATCH {
                    let Link::Open { ws, .. } = &mut self.link else { break };
                    match ws.next().now_or_never() {
                        Some(message) => self.on_message(message),
                        None => break,
                    }
                }
            }
        }
    }

    fn on_message(&mut self, message: Option<Result<Message, tungstenite::Error>>) {
        match message {
            Some(Ok(Message::Text(text))) => {
                self.touch();
                self.on_text(text.as_str());
            }
            Some(Ok(Message::Binary(_))) => {
                self.touch();
                parse_failure("a binary frame", "");
            }
            // Transport keep-alives (tungstenite answers pings itself); they prove nothing about
            // the feed, so they do not reset the stall deadline.
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            Some(Ok(Message::Close(frame))) => {
                let detail = frame.map(|f| format!("{} {}", f.code, f.reason)).unwrap_or_default();
                self.lose("closed", &format!("the feed closed the connection {detail}"));
            }
            None
            | Some(Err(
                tungstenite::Error::ConnectionClosed
                | tungstenite::Error::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake),
            )) => self.lose("closed", "the feed dropped the connection"),
            Some(Err(e)) => self.lose("error", &e.to_string()),
        }
    }

    fn on_text(&mut self, text: &str) {
        match parse_frame(text) {
            Err(problem) => parse_failure(&problem, text),
            Ok(Frame::Ticker(ticker)) => match self.intake.accept(ticker, Utc::now()) {
                Verdict::Quote(quote) => self.buffer.push(quote),
                Verdict::Unlisted => {}
                Verdict::Duplicate => {
                    metrics::counter!("vault_price_source_duplicates_total", "source" => SOURCE).increment(1);
                    tracing::debug!(frame = excerpt(text), "duplicate ticker dropped");
                }
                Verdict::NotPositive(symbol) => {
                    let reason = Rejection::NotPositive.as_str();
                    metrics::counter!("vault_price_ticks_rejected_total", "symbol" => symbol.to_string(), "reason" => reason)
                        .increment(1);
                    tracing::warn!(%symbol, frame = excerpt(text), reason, source = SOURCE, "tick refused");
                }
                Verdict::OutOfRange(_) => parse_failure("the price is out of range", text),
            },
            Ok(Frame::Heartbeat | Frame::Other(_)) => {}
            Ok(Frame::Subscriptions(channels)) => tracing::info!(%channels, "Coinbase feed subscriptions"),
            Ok(Frame::Error { message, reason }) => {
                self.lose("refused", &format!("the feed sent an error: {message} {reason}"));
            }
        }
    }

    fn touch(&mut self) {
        if let Link::Open { last_frame, .. } = &mut self.link {
            *last_frame = Instant::now();
        }
    }

    /// Drops the open connection and schedules the next attempt.
    fn lose(&mut self, reason: &'static str, detail: &str) {
        let healthy = match &self.link {
            Link::Open { opened, last_frame, .. } => last_frame.duration_since(*opened) >= self.options.healthy,
            _ => false,
        };
        self.retry(reason, detail, healthy);
    }

    fn retry(&mut self, reason: &'static str, detail: &str, healthy: bool) {
        if healthy {
            self.backoff = new_backoff(&self.options);
        }
        // The builder has no attempt limit, so the iterator never ends; the cap is a fallback.
        let wait = self.backoff.next().unwrap_or(self.options.max_backoff);
        metrics::counter!("vault_price_source_reconnects_total", "source" => SOURCE, "reason" => reason).increment(1);
        metrics::gauge!("vault_price_source_connected", "source" => SOURCE).set(0.0);
        tracing::warn!(reason, detail, retry_in = ?wait, url = %self.url, "Coinbase feed connection lost");
        self.link = Link::Waiting { due: Instant::now() + wait };
    }
}

impl Drop for Coinbase {
    fn drop(&mut self) {
        if let Link::Connecting(task) = &self.link {
            task.abort();
        }
    }
}

impl PriceSource for Coinbase {
    fn name(&self) -> &'static str {
        SOURCE
    }

    /// Never exhausted: a lost feed is reconnected until the worker stops.
    async fn next_batch(&mut self) -> Option<Vec<Quote>> {
        loop {
            if !self.buffer.is_empty() {
                return Some(std::mem::take(&mut self.buffer));
            }
            self.step().await;
        }
    }
}

/// Creates this source's series at 0, so the first reconnect or bad frame shows in `increase()`.
fn register_metrics() {
    for reason in ["closed", "error", "stalled", "refused", "connect_failed"] {
        metrics::counter!("vault_price_source_reconnects_total", "source" => SOURCE, "reason" => reason).absolute(0);
    }
    metrics::counter!("vault_price_source_parse_failures_total", "source" => SOURCE).absolute(0);
    metrics::counter!("vault_price_source_duplicates_total", "source" => SOURCE).absolute(0);
    metrics::gauge!("vault_price_source_connected", "source" => SOURCE).set(0.0);
}

fn new_backoff(options: &Options) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(options.min_backoff)
        .with_max_delay(options.max_backoff)
        .with_jitter()
        // Without a seed of its own every worker would jitter alike, defeating the point.
        .with_jitter_seed(rand::random())
        .without_max_times()
        .build()
}

/// Connects and subscribes, within `timeout`.
async fn connect(url: String, subscribe: String, timeout: Duration) -> Result<Box<Ws>, String> {
    let attempt = async {
        let config =
            WebSocketConfig::default().max_message_size(Some(MAX_FRAME_BYTES)).max_frame_size(Some(MAX_FRAME_BYTES));
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), false)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        ws.send(Message::text(subscribe)).await.map_err(|e| format!("cannot subscribe: {e}"))?;
        Ok(Box::new(ws))
    };
    tokio::time::timeout(timeout, attempt).await.map_err(|_| format!("no connection within {timeout:?}"))?
}

fn parse_failure(problem: &str, text: &str) {
    metrics::counter!("vault_price_source_parse_failures_total", "source" => SOURCE).increment(1);
    tracing::warn!(problem, frame = excerpt(text), source = SOURCE, "unusable frame from the Coinbase feed");
}

/// The start of a frame, for a log line.
fn excerpt(text: &str) -> &str {
    let end = text.char_indices().nth(200).map_or(text.len(), |(i, _)| i);
    &text[..end]
}

#[cfg(test)]
mod tests {
    use rust_decimal_macros::dec;

    use super::*;

    const TICKER: &str = r#"{"type":"ticker","sequence":98765432101,"product_id":"BTC-USD","price":"67012.34000000","open_24h":"66100.01","volume_24h":"12345.67","low_24h":"65800","high_24h":"67500","volume_30d":"401234.5","best_bid":"67012.33","best_bid_size":"0.05","best_ask":"67012.34","best_ask_size":"0.25","side":"buy","time":"2026-03-04T05:06:07.123456Z","trade_id":712345678,"last_size":"0.00150000"}"#;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().expect("a time")
    }

    fn listed(symbol: &str, increment: Decimal) -> Listed {
        Listed { symbol: Symbol::parse(symbol).expect("valid"), increment }
    }

    fn ticker(product: &str, price: Decimal, sequence: u64, time: &str) -> Ticker {
        Ticker { product_id: product.to_owned(), price, time: at(time), sequence }
    }

    #[test]
    fn a_ticker_frame_parses_to_an_exact_price_its_time_and_sequence() {
        let Ok(Frame::Ticker(t)) = parse_frame(TICKER) else { panic!("a ticker: {:?}", parse_frame(TICKER)) };
        assert_eq!(t.product_id, "BTC-USD");
        assert_eq!(t.price, dec!(67012.34));
        assert_eq!(t.price.to_string(), "67012.34000000", "kept exactly as sent");
        assert_eq!(t.time, at("2026-03-04T05:06:07.123456Z"));
        assert_eq!(t.sequence, 98765432101);
    }

    #[test]
    fn heartbeats_subscriptions_errors_and_unknown_types_parse() {
        let heartbeat = r#"{"type":"heartbeat","sequence":90,"last_trade_id":20,"product_id":"BTC-USD","time":"2026-03-04T05:06:07.5Z"}"#;
        assert_eq!(parse_frame(heartbeat), Ok(Frame::Heartbeat));
        let subs = r#"{"type":"subscriptions","channels":[{"name":"ticker","product_ids":["BTC-USD"]}]}"#;
        assert_eq!(
            parse_frame(subs),
            Ok(Frame::Subscriptions(r#"[{"name":"ticker","product_ids":["BTC-USD"]}]"#.into()))
        );
        let error = r#"{"type":"error","message":"Failed to subscribe","reason":"BTC-XYZ is not a valid product"}"#;
        assert_eq!(
            parse_frame(error),
            Ok(Frame::Error { message: "Failed to subscribe".into(), reason: "BTC-XYZ is not a valid product".into() })
        );
        assert_eq!(parse_frame(r#"{"type":"status","products":[]}"#), Ok(Frame::Other("status".into())));
    }

    #[test]
    fn a_malformed_frame_is_refused_saying_what_is_wrong() {
        let with = |field: &str, value: &str| {
            let mut v: Value = serde_json::from_str(TICKER).expect("json");
            v[field] = serde_json::from_str(value).expect("a JSON value");
            v.to_string()
        };
        let without = |field: &str| {
            let mut v: Value = serde_json::from_str(TICKER).expect("json");
            v.as_object_mut().expect("an object").remove(field);
            v.to_string()
        };
        for (text, needle) in [
            ("{\"type\":\"ticker\",".to_owned(), "not JSON"),
            ("[1,2]".to_owned(), "no \"type\""),
            (r#"{"product_id":"BTC-USD"}"#.to_owned(), "no \"type\""),
            (without("price"), "without a \"price\" string"),
            (with("price", "67012.34"), "without a \"price\" string"),
            (with("price", "\"67k\""), "price \"67k\" is not a decimal"),
            (with("price", "\"NaN\""), "is not a decimal"),
            (without("product_id"), "without a \"product_id\""),
            (with("time", "\"2026-03-04 05:06:07\""), "time \"2026-03-04 05:06:07\" is not RFC 3339"),
            (without("sequence"), "without a \"sequence\" number"),
            (with("sequence", "\"98765432101\""), "without a \"sequence\" number"),
            (with("sequence", "-1"), "without a \"sequence\" number"),
        ] {
            let err = parse_frame(&text).expect_err(&text);
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn the_subscribe_message_names_every_listed_market_and_both_channels() {
        let msg = subscribe_message(&[listed("BTC-USD", dec!(0.01)), listed("ETH-USD", dec!(0.01))]);
        let v: Value = serde_json::from_str(&msg).expect("json");
        assert_eq!(v["type"], "subscribe");
        assert_eq!(v["product_ids"], serde_json::json!(["BTC-USD", "ETH-USD"]));
        assert_eq!(v["channels"], serde_json::json!(["ticker", "heartbeat"]));
    }

    #[test]
    fn prices_are_rounded_half_even_to_the_increment_and_must_stay_positive() {
        let mut intake = Intake::new(vec![listed("DOGE-USD", dec!(0.00001)), listed("BTC-USD", dec!(0.01))]);
        let now = at("2030-01-01T00:00:00Z");
        let price = |v: Verdict| match v {
            Verdict::Quote(q) => q.price.get().to_string(),
            other => format!("{other:?}"),
        };
        let t = "2026-03-04T05:06:07Z";
        assert_eq!(price(intake.accept(ticker("DOGE-USD", dec!(0.123455), 1, t), now)), "0.12346", "half up to even");
        assert_eq!(price(intake.accept(ticker("DOGE-USD", dec!(0.123465), 2, t), now)), "0.12346", "half down to even");
        assert_eq!(price(intake.accept(ticker("BTC-USD", dec!(67012.34000000), 1, t), now)), "67012.34");
        let symbol = Symbol::parse("BTC-USD").expect("valid");
        assert_eq!(intake.accept(ticker("BTC-USD", dec!(0), 2, t), now), Verdict::NotPositive(symbol.clone()));
        assert_eq!(intake.accept(ticker("BTC-USD", dec!(-67012.34), 3, t), now), Verdict::NotPositive(symbol.clone()));
        assert_eq!(intake.accept(ticker("BTC-USD", dec!(0.004), 4, t), now), Verdict::NotPositive(symbol.clone()));
        assert_eq!(
            intake.accept(ticker("DOGE-USD", Decimal::MAX, 3, t), now),
            Verdict::OutOfRange(Symbol::parse("DOGE-USD").expect("valid"))
        );
        assert_eq!(intake.accept(ticker("BTC-EUR", dec!(61000), 1, t), now), Verdict::Unlisted);
    }

    #[test]
    fn a_ticker_is_new_when_its_sequence_grows_or_its_time_moves_on_and_a_duplicate_otherwise() {
        let mut intake = Intake::new(vec![listed("BTC-USD", dec!(0.01)), listed("ETH-USD", dec!(0.01))]);
        let now = at("2030-01-01T00:00:00Z");
        let new = |v: &Verdict| matches!(v, Verdict::Quote(_));
        assert!(new(&intake.accept(ticker("BTC-USD", dec!(1), 100, "2026-03-04T05:06:07Z"), now)));
        assert!(new(&intake.accept(ticker("BTC-USD", dec!(1), 105, "2026-03-04T05:06:07Z"), now)), "same time");
        let replayed = ticker("BTC-USD", dec!(1), 100, "2026-03-04T05:06:07Z");
        assert_eq!(intake.accept(replayed, now), Verdict::Duplicate);
        let again = ticker("BTC-USD", dec!(1), 105, "2026-03-04T05:06:07Z");
        assert_eq!(intake.accept(again, now), Verdict::Duplicate);
        assert!(new(&intake.accept(ticker("ETH-USD", dec!(1), 7, "2026-03-04T05:06:00Z"), now)), "per product");
        let reset = ticker("BTC-USD", dec!(1), 3, "2026-03-04T05:06:08Z");
        assert!(new(&intake.accept(reset, now)), "a sequence reset on a later trade is not a duplicate");
        assert!(new(&intake.accept(ticker("BTC-USD", dec!(1), 4, "2026-03-04T05:06:08Z"), now)), "counts on from it");
        // A refused tick is still seen: its replay is a duplicate, not a second refusal.
        assert!(matches!(
            intake.accept(ticker("BTC-USD", dec!(0), 9, "2026-03-04T05:06:09Z"), now),
            Verdict::NotPositive(_)
        ));
        assert_eq!(intake.accept(ticker("BTC-USD", dec!(0), 9, "2026-03-04T05:06:09Z"), now), Verdict::Duplicate);
    }

    #[test]
    fn a_tick_is_stamped_with_the_trade_time_but_never_after_the_local_clock() {
        let mut intake = Intake::new(vec![listed("BTC-USD", dec!(0.01))]);
        let now = at("2026-03-04T05:06:07Z");
        let Verdict::Quote(past) = intake.accept(ticker("BTC-USD", dec!(1), 1, "2026-03-04T05:06:06.5Z"), now) else {
            panic!("a quote")
        };
        assert_eq!(past.ts, at("2026-03-04T05:06:06.5Z"));
        let Verdict::Quote(future) = intake.accept(ticker("BTC-USD", dec!(1), 2, "2099-01-01T00:00:00Z"), now) else {
            panic!("a quote")
        };
        assert_eq!(future.ts, now);
    }

    #[test]
    fn an_excerpt_is_cut_on_a_character_boundary() {
        let long = "é".repeat(300);
        assert_eq!(excerpt(&long).chars().count(), 200);
        assert_eq!(excerpt("short"), "short");
    }
}
