//! The latest price of every market, in memory, fed by the PRICES stream.
//!
//! An ordered JetStream consumer on `prices.*` starts with `DeliverPolicy::LastPerSubject`, so a
//! freshly started API knows the last tick of every market at once, then follows live ticks.
//! Reading a price is one hash-map lookup under a read lock: no database query and no NATS round
//! trip per request, and nothing is written anywhere per tick.
//!
//! What this module may not do: decide anything with a price. The engine alone fills orders and
//! judges staleness (`stale_price`, `no_price`); the API only shows prices and uses them for the
//! min-notional pre-check of market orders. The `vault_price_age_seconds` gauge belongs to the
//! prices worker.
//!
//! Ordering: a tick replaces the one held for its symbol unless it is older (its `ts` before
//! the held one's) — the engine's rule, so the price shown is the price the engine trades at.
//! (Kept in stream order alone, a tick published late with an older `ts` showed here while the
//! engine went on at the newer one.)

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use rust_decimal::Decimal;
use tokio_util::sync::CancellationToken;
use vault_bus::message::{PriceTick, decode_tick};
use vault_bus::{Bus, streams, subjects};
use vault_core::domain::Symbol;

use crate::trading::markets::MarketCache;

/// The latest tick of one market.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatestPrice {
    pub price: Decimal,
    pub ts: DateTime<Utc>,
    pub source: String,
}

/// Symbol → latest price. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct PriceBook {
    // A std lock: every critical section is a map lookup or insert, never held across an await.
    inner: Arc<RwLock<HashMap<Symbol, LatestPrice>>>,
}

impl PriceBook {
    pub fn new() -> Self {
        PriceBook::default()
    }

    /// The latest price of `symbol`, if any tick arrived since start (or was on the stream).
    pub fn get(&self, symbol: &Symbol) -> Option<LatestPrice> {
        self.inner.read().unwrap_or_else(|poisoned| poisoned.into_inner()).get(symbol).cloned()
    }

    /// The latest price of `symbol` if it is no older than `max_age`: the price the engine
    /// would trade at now (it refuses an older one, `stale_price`).
    pub fn fresh(&self, symbol: &Symbol, max_age: Duration) -> Option<Decimal> {
        let latest = self.get(symbol)?;
        let age = (Utc::now() - latest.ts).to_std().unwrap_or_default();
        (age <= max_age).then_some(latest.price)
    }

    /// Records `tick` as the latest price of its symbol, unless the one held is newer.
    pub fn apply(&self, tick: PriceTick) {
        let mut prices = self.inner.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if prices.get(&tick.symbol).is_some_and(|held| held.ts > tick.ts) {
            return;
        }
        prices.insert(tick.symbol, LatestPrice { price: tick.price.get(), ts: tick.ts, source: tick.source });
    }
}

/// The longest pause between two attempts to (re)start following the stream.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How often the connection is looked at while following or waiting for it.
const CONNECTION_POLL: Duration = Duration::from_millis(100);

/// The longest a pull of the feed waits; the client's idle heartbeat is half of it. In a
/// cluster the feed's consumer (in memory, one replica) lives on one node: when that node dies
/// while our connection to another survives, only missed heartbeats tell, and with the
/// client's default (15 s) the ticker stood still for about half a minute.
const FEED_EXPIRES: Duration = Duration::from_secs(4);

/// How often the feed checks that PRICES is still the stream it opened.
const STREAM_CHECK: Duration = Duration::from_secs(5);

/// Follows PRICES until `shutdown` fires. Ticks of symbols that are not markets are ignored
/// (they would only grow the map).
///
/// When the connection drops, following stops at once and starts again as soon as the client is
/// connected, from the last tick per subject, so the book catches up with whatever it missed
/// (the ordered consumer would notice by itself, but only after missing its heartbeats: ~15 s of
/// stale prices). Any other failure (stream recreated, consumer lost) restarts it after a short
/// backoff. Draining: nothing to drain, the task just stops.
pub fn spawn(bus: Bus, book: PriceBook, markets: MarketCache, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(250);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = connected(&bus) => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                result = follow(&bus, &book, &markets, &mut backoff) => {
                    if let Err(e) = result {
                        tracing::warn!(error = format!("{e:#}"), retry_in = ?backoff, "price feed interrupted");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    });
}

fn is_connected(bus: &Bus) -> bool {
    bus.client().connection_state() == State::Connected
}

/// Returns once the client is connected.
async fn connected(bus: &Bus) {
    while !is_connected(bus) {
        tokio::time::sleep(CONNECTION_POLL).await;
    }
}

/// Follows the stream until it fails or the connection drops.
async fn follow(bus: &Bus, book: &PriceBook, markets: &MarketCache, backoff: &mut Duration) -> anyhow::Result<()> {
    let config = pull::OrderedConfig {
        description: Some("vault-api: latest prices".to_owned()),
        filter_subject: subjects::PRICES_ALL.to_owned(),
        deliver_policy: DeliverPolicy::LastPerSubject,
        max_expires: FEED_EXPIRES,
        ..Default::default()
    };
    let stream = bus.jetstream().get_stream(streams::PRICES.name).await?;
    let born = stream.cached_info().created;
    let mut messages = stream.create_consumer(config).await?.messages().await?;
    tracing::info!("following the price feed");
    let mut poll = tokio::time::interval(CONNECTION_POLL);
    let mut checked = tokio::time::Instant::now();
    loop {
        let message = tokio::select! {
            message = messages.next() => message,
            _ = poll.tick() => {
                if !is_connected(bus) {
                    anyhow::bail!("NATS disconnected");
                }
                // The client re-creates a vanished consumer by itself, after the last sequence
                // it saw: on a stream created again (deleted and declared, restored) that waits
                // for good, and the ticker showed the old stream's last price for ever.
                if checked.elapsed() >= STREAM_CHECK {
                    checked = tokio::time::Instant::now();
                    if bus.stream_created(streams::PRICES.name).await.is_some_and(|now| now != born) {
                        anyhow::bail!("PRICES was created again");
                    }
                }
                continue;
            }
        };
        let Some(message) = message else { anyhow::bail!("the price feed ended") };
        let message = message?;
        *backoff = Duration::from_millis(250);
        match decode_tick(message.subject.as_str(), &message.payload, Utc::now()) {
            Ok(tick) if markets.get(&tick.symbol).is_some() => book.apply(tick),
            Ok(tick) => tracing::debug!(symbol = %tick.symbol, "tick for a symbol that is not a market; ignored"),
            Err(e) => {
                metrics::counter!("vault_api_price_ticks_undecodable_total").increment(1);
                tracing::warn!(error = %e, "undecodable price tick ignored");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use vault_core::domain::Positive;

    use super::*;

    #[test]
    fn the_newest_tick_is_the_latest_price_as_the_engine_holds_it() {
        let book = PriceBook::new();
        let btc = Symbol::parse("BTC-USD").expect("valid");
        assert_eq!(book.get(&btc), None);
        let now = Utc::now();
        let tick = |price: i64, seq, ts| PriceTick {
            symbol: btc.clone(),
            price: Positive::new(Decimal::new(price, 2)).expect("positive"),
            ts,
            source: "sim".to_owned(),
            seq,
        };
        book.apply(tick(5_000_000, 1, now));
        book.apply(tick(5_000_100, 2, now));
        assert_eq!(book.get(&btc).expect("a price").price, Decimal::new(5_000_100, 2), "a tick as new replaces it");
        book.apply(tick(9_000_000, 3, now - chrono::Duration::seconds(5)));
        assert_eq!(book.get(&btc).expect("a price").price, Decimal::new(5_000_100, 2), "an older one does not");
        book.apply(tick(5_000_200, 4, now + chrono::Duration::seconds(1)));
        assert_eq!(book.get(&btc).expect("a price").price, Decimal::new(5_000_200, 2));
    }

    #[test]
    fn only_a_price_the_engine_would_trade_at_is_fresh() {
        let book = PriceBook::new();
        let btc = Symbol::parse("BTC-USD").expect("valid");
        let at = |ts| PriceTick {
            symbol: btc.clone(),
            price: Positive::new(Decimal::new(25_000, 0)).expect("positive"),
            ts,
            source: "sim".to_owned(),
            seq: 1,
        };
        book.apply(at(Utc::now() - chrono::Duration::seconds(40)));
        assert_eq!(book.fresh(&btc, Duration::from_secs(30)), None, "40 s old");
        assert_eq!(book.fresh(&btc, Duration::from_secs(60)), Some(Decimal::new(25_000, 0)));
        book.apply(at(Utc::now()));
        assert_eq!(book.fresh(&btc, Duration::from_secs(30)), Some(Decimal::new(25_000, 0)));
    }
}
