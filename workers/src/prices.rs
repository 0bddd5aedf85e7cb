//! `vault-worker prices`: price ingestion. Sources sit behind [`PriceSource`]; the worker
//! checks every tick ([`Validator`]), publishes the accepted ones on `prices.<SYMBOL>` (dedupe id
//! `<source>:<symbol>:<seq>`), keeps `vault_price_age_seconds{symbol}` current and folds them
//! into one-minute candles ([`Candles`], table `candles`).
//!
//! Sources (`PRICE_SOURCE`): `sim` — a seeded random walk per market approximating geometric
//! Brownian motion, computed in exact decimals (no floats anywhere in the pipeline): each step's
//! log-return is an Irwin–Hall sum of uniform integers (close to normal), applied as
//! `price × (1 + r + r²/2)` and rounded half-even to the market's price increment;
//! `replay:<csv>` — a recorded file replayed at its own pace ([`Replay`]); `coinbase` — the
//! public Coinbase Exchange ticker feed over a WebSocket at `COINBASE_WS_URL` ([`Coinbase`]:
//! exact decimal prices, reconnects with backoff, duplicates dropped by Coinbase's per-product
//! sequence); `none` — nothing.
//!
//! What this worker may not do: publish a tick the validator refused, or stop on its own while
//! the process should run (an exhausted source leaves the worker idle until shutdown).

mod candles;
mod coinbase;
mod replay;
mod validate;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::{Decimal, RoundingStrategy};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use vault_bus::message::{PriceTick, decode};
use vault_bus::{Bus, MessageContext, streams, subjects};
use vault_core::Settings;
use vault_core::config::PriceSource as Configured;
use vault_core::domain::{Positive, Symbol};
use vault_core::shutdown::{GRACE, finish_or_give_up};

pub use self::candles::{Candle, Candles, FLUSH_EVERY, minute_of};
pub use self::coinbase::{Coinbase, Frame, Listed, Options as CoinbaseOptions, Ticker, listed_markets, parse_frame};
pub use self::replay::{Recorded, Replay};
pub use self::validate::{Accepted, CONFIRM_FOR, CONFIRM_TICKS, MAX_JUMP, Rejection, Validator};

/// One tick from a source, before it gets its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    pub symbol: Symbol,
    pub price: Positive,
    pub ts: DateTime<Utc>,
}

/// Where ticks come from.
pub trait PriceSource: Send {
    /// The source name written in every tick.
    fn name(&self) -> &'static str;
    /// The next batch of quotes, or `None` when the source is exhausted. Must be cancel-safe:
    /// the worker drops the future whenever one of its timers fires first, and calls it again.
    fn next_batch(&mut self) -> impl Future<Output = Option<Vec<Quote>>> + Send;
}

/// A market as the simulator walks it.
#[derive(Debug, Clone)]
pub struct SimMarket {
    pub symbol: Symbol,
    pub price: Decimal,
    pub increment: Decimal,
}

/// The `sim` source: a random walk per market, one step per market every `interval`.
#[derive(Debug)]
pub struct Sim {
    markets: Vec<SimMarket>,
    rng: StdRng,
    interval: tokio::time::Interval,
    /// Standard deviation of one step's log-return, in units of 1e-6 (e.g. 400 = 0.04%).
    sigma_micro: i64,
}

impl Sim {
    pub fn new(markets: Vec<SimMarket>, seed: u64, interval: Duration) -> Self {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Sim { markets, rng: StdRng::seed_from_u64(seed), interval: tick, sigma_micro: 400 }
    }

    /// One step of every market.
    pub fn step(&mut self, now: DateTime<Utc>) -> Vec<Quote> {
        let sigma = self.sigma_micro;
        let mut out = Vec::with_capacity(self.markets.len());
        for m in &mut self.markets {
            // Irwin–Hall: the sum of 12 uniforms on [-1, 1) has variance 4; halve it for σ = 1.
            let n: i64 = (0..12).map(|_| self.rng.random_range(-1_000_000i64..1_000_000)).sum::<i64>() / 2;
            let r = Decimal::new(n * sigma, 12);
            let factor = Decimal::ONE + r + r * r / Decimal::TWO;
            let next = (m.price * factor / m.increment)
                .round_dp_with_strategy(0, RoundingStrategy::MidpointNearestEven)
                * m.increment;
            // Never below one increment: a price is always positive.
            m.price = next.max(m.increment).normalize();
            if let Ok(price) = Positive::new(m.price) {
                out.push(Quote { symbol: m.symbol.clone(), price, ts: now });
            }
        }
        out
    }
}

impl PriceSource for Sim {
    fn name(&self) -> &'static str {
        "sim"
    }

    async fn next_batch(&mut self) -> Option<Vec<Quote>> {
        self.interval.tick().await;
        Some(self.step(Utc::now()))
    }
}

/// The markets to simulate, each starting from its last published price (so a restart
/// continues the walk) or else its reference price.
pub async fn sim_markets(pool: &PgPool, bus: &Bus) -> anyhow::Result<Vec<SimMarket>> {
    let rows: Vec<(String, Decimal, Decimal)> =
        sqlx::query_as("SELECT symbol, price_increment, reference_price FROM markets ORDER BY symbol")
            .fetch_all(pool)
            .await?;
    let stream = bus.jetstream().get_stream(streams::PRICES.name).await?;
    let mut out = Vec::new();
    for (symbol, increment, reference) in rows {
        let symbol = Symbol::parse(&symbol).map_err(anyhow::Error::msg)?;
        let last = last_tick(&stream, &symbol).await;
        let price = last.map(|t| t.price.get()).unwrap_or(reference);
        out.push(SimMarket { symbol, price, increment });
    }
    Ok(out)
}

async fn last_tick(stream: &async_nats::jetstream::stream::Stream, symbol: &Symbol) -> Option<PriceTick> {
    let subject = subjects::price(&symbol.to_string());
    let msg = stream.get_last_raw_message_by_subject(&subject).await.ok()?;
    decode::<PriceTick>(&subject, &msg.payload).ok()
}

/// Reads and parses a replay file (`PRICE_SOURCE=replay:<path>`); the error names the file and
/// the first bad line.
pub fn load_replay(path: &str) -> anyhow::Result<Replay> {
    Replay::load(path)
}

/// Runs the configured source (`PRICE_SOURCE`) until shutdown.
pub async fn run(settings: &Settings, pool: &PgPool, bus: &Bus, shutdown: CancellationToken) -> anyhow::Result<()> {
    match &settings.price_source {
        Configured::None => {
            tracing::info!("PRICE_SOURCE=none: publishing nothing");
            shutdown.cancelled().await;
            Ok(())
        }
        Configured::Sim => {
            let markets = sim_markets(pool, bus).await?;
            let seed = Utc::now().timestamp_micros() as u64;
            tracing::info!(markets = markets.len(), seed, "simulating prices");
            publish_from(Sim::new(markets, seed, Duration::from_millis(500)), bus, pool, shutdown).await
        }
        Configured::Replay(path) => {
            let replay = Replay::load(path)?;
            let increments = listed_markets(pool).await?.into_iter().map(|m| (m.symbol, m.increment)).collect();
            replay.check_markets(&increments).map_err(|e| anyhow::anyhow!("replay file {path}: {e}"))?;
            tracing::info!(path, ticks = replay.remaining(), "replaying recorded prices");
            publish_from(replay, bus, pool, shutdown).await
        }
        Configured::Coinbase => {
            let markets = listed_markets(pool).await?;
            anyhow::ensure!(
                !markets.is_empty(),
                "PRICE_SOURCE=coinbase: the markets table is empty, nothing to subscribe to"
            );
            let url = &settings.coinbase_ws_url;
            tracing::info!(url, markets = markets.len(), "streaming prices from the Coinbase feed");
            publish_from(Coinbase::new(url.as_str(), markets, CoinbaseOptions::default()), bus, pool, shutdown).await
        }
    }
}

/// How often the halted markets are read (see [`publish_from`]).
const HALTS_EVERY: Duration = Duration::from_secs(5);

/// The markets an operator halted; `None` when the database did not answer within a second
/// (the last answer stands).
async fn halted_markets(pool: &PgPool) -> Option<HashSet<Symbol>> {
    let query = sqlx::query_scalar::<_, String>("SELECT symbol FROM markets WHERE status = 'halted'").fetch_all(pool);
    let symbols = tokio::time::timeout(Duration::from_secs(1), query).await.ok()?.ok()?;
    Some(symbols.iter().filter_map(|s| Symbol::parse(s).ok()).collect())
}

/// How long one candle write may take before it is given up (it takes milliseconds; this is
/// for a statement that will never be answered).
const CANDLE_WRITE_WITHIN: Duration = Duration::from_secs(5);

/// Publishes every quote of `source` the [`Validator`] accepts, with a per-symbol sequence
/// continuing the stream's, and folds the acknowledged ones into one-minute candles.
///
/// Runs until `shutdown`; an exhausted source leaves it idle (still reporting price ages) rather
/// than ending the process. Draining: the batch being published is awaited to its acks (at most
/// one batch of ticks in flight), then the pending candles are written once more; a write in
/// flight when the signal comes, and that last one, get [`GRACE`] each before they are given up.
pub async fn publish_from(
    mut source: impl PriceSource,
    bus: &Bus,
    pool: &PgPool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let stream = bus.jetstream().get_stream(streams::PRICES.name).await?;
    let mut seqs: HashMap<Symbol, u64> = HashMap::new();
    let mut last_at: HashMap<Symbol, DateTime<Utc>> = HashMap::new();
    let mut validator = Validator::default();
    seed_from_stream(&stream, pool, &mut last_at, &mut seqs, &mut validator).await;
    let mut candles = Candles::default();
    let mut exhausted = false;
    let mut age = tokio::time::interval(Duration::from_secs(1));
    // Halted markets, read every few seconds: their age is not reported (NaN), so that
    // VaultPriceStale clears once an operator halts a market whose source went quiet for good
    // (its runbook's remedy) instead of firing on for as long as the halt lasts.
    let mut halted: HashSet<Symbol> = HashSet::new();
    let mut halts_read: Option<tokio::time::Instant> = None;
    let mut flush = tokio::time::interval(FLUSH_EVERY);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Biased, the stop first: with the database silent each candle write takes seconds, and
        // after one the flush timer is ready again at once — picked at random among the ready
        // branches, a run of flushes held a stop past its deadline (seen once: 36 s).
        let batch = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = age.tick() => {
                if halts_read.is_none_or(|at| at.elapsed() >= HALTS_EVERY) {
                    halts_read = Some(tokio::time::Instant::now());
                    if let Some(now_halted) = halted_markets(pool).await {
                        halted = now_halted;
                    }
                }
                let now = Utc::now();
                for (symbol, at) in &last_at {
                    let secs = if halted.contains(symbol) {
                        f64::NAN
                    } else {
                        (now - *at).num_milliseconds().max(0) as f64 / 1000.0
                    };
                    metrics::gauge!("vault_price_age_seconds", "symbol" => symbol.to_string()).set(secs);
                }
                continue;
            }
            _ = flush.tick() => {
                // Bounded, and raced with the shutdown (then given GRACE): a database that does
                // not answer must neither stop the ticks nor hold a process asked to stop. A
                // write given up is not sent again: the abandoned statement may yet commit, and
                // a candle's volume added twice would be wrong rather than missing.
                let write = tokio::time::timeout(CANDLE_WRITE_WITHIN, write_candles(&mut candles, pool));
                match finish_or_give_up(&shutdown, write).await {
                    None => {
                        tracing::error!(waited = ?GRACE, "candles were still being written at shutdown; the last ones may be lost");
                        return Ok(());
                    }
                    Some(Err(_)) => {
                        metrics::counter!("vault_candle_flush_failures_total").increment(1);
                        let dropped = candles.discard();
                        tracing::error!(dropped, waited = ?CANDLE_WRITE_WITHIN, "a candle write did not finish; given up, those candles lack the last ticks");
                    }
                    Some(Ok(())) => {}
                }
                continue;
            }
            batch = source.next_batch(), if !exhausted => batch,
        };
        let Some(batch) = batch else {
            tracing::info!(source = source.name(), "the price source is exhausted; idle until shutdown");
            exhausted = true;
            continue;
        };
        let mut acks = Vec::with_capacity(batch.len());
        for quote in batch {
            match validator.check(&quote) {
                Ok(Accepted::InStep) => {}
                Ok(Accepted::Confirmed) => {
                    metrics::counter!("vault_price_levels_confirmed_total", "symbol" => quote.symbol.to_string())
                        .increment(1);
                    tracing::warn!(symbol = %quote.symbol, price = %quote.price, ts = %quote.ts, source = source.name(), "a move beyond the jump limit held; new reference price");
                }
                Err(reason) => {
                    metrics::counter!("vault_price_ticks_rejected_total", "symbol" => quote.symbol.to_string(), "reason" => reason.as_str())
                        .increment(1);
                    tracing::warn!(symbol = %quote.symbol, price = %quote.price, ts = %quote.ts, reason = reason.as_str(), source = source.name(), "tick refused");
                    continue;
                }
            }
            let seq = match seqs.get(&quote.symbol) {
                Some(seq) => seq + 1,
                None => last_tick(&stream, &quote.symbol).await.map(|t| t.seq + 1).unwrap_or(1),
            };
            seqs.insert(quote.symbol.clone(), seq);
            let tick = PriceTick {
                symbol: quote.symbol.clone(),
                price: quote.price,
                ts: quote.ts,
                source: source.name().to_owned(),
                seq,
            };
            // A publish the client cannot even queue (NATS gone long enough to fill the client's
            // buffer) drops this tick; the source goes on, and so does the worker (it ended the
            // role, and the process, after about 19 minutes of outage).
            match bus.start_publish(&tick, &MessageContext::default()).await {
                Ok(ack) => acks.push((quote, ack)),
                Err(e) => tracing::warn!(symbol = %quote.symbol, error = %e, "tick not sent"),
            }
        }
        // Awaited together: an ack's timeout (the client's 5 s) starts when it is awaited, so
        // awaiting them one by one after NATS went away mid-round stopped the ticks for 5 s per
        // market (about 50 s) and held a shutdown past its deadline.
        let settled =
            futures::future::join_all(acks.into_iter().map(|(quote, ack)| async move { (quote, ack.await) })).await;
        for (quote, result) in settled {
            match result {
                // A tick the stream already held under this id (another worker, or a restart
                // that read the last sequence before a dead worker's publish landed) was not
                // stored: it moves no candle and no age.
                Ok(ack) if ack.duplicate => {
                    tracing::warn!(symbol = %quote.symbol, "tick dropped by the stream as a duplicate");
                }
                Ok(_) => {
                    metrics::counter!("vault_price_ticks_published_total", "symbol" => quote.symbol.to_string())
                        .increment(1);
                    candles.add(&quote.symbol, quote.price.get(), quote.ts);
                    last_at.insert(quote.symbol, quote.ts);
                }
                Err(e) => tracing::warn!(symbol = %quote.symbol, error = %e, "tick not acknowledged"),
            }
        }
    }
    // The last write gets GRACE, as the one in flight would have.
    if tokio::time::timeout(GRACE, write_candles(&mut candles, pool)).await.is_err() || !candles.is_empty() {
        tracing::error!("candles of the last ticks could not be written before shutdown");
    }
    Ok(())
}

/// One flush; a failure is counted and logged, and the candles stay pending for the next one —
/// unless the write may have committed (a connection lost mid-statement): written again, their
/// volume would count twice, so they are given up as a timed-out write is.
async fn write_candles(candles: &mut Candles, pool: &PgPool) {
    if let Err(e) = candles.flush(pool).await {
        metrics::counter!("vault_candle_flush_failures_total").increment(1);
        if vault_core::db::outcome_unknown(&e) {
            let dropped = candles.discard();
            tracing::error!(error = %e, dropped, "a candle write may have committed; given up rather than counted twice");
        } else {
            tracing::warn!(error = %e, "candles not written; retrying with the next flush");
        }
    }
}

/// Starts where the stream stands, for every market: its age from its last tick on the stream,
/// or from now for a market that has none (the age gauge was set only for ticks published since
/// start, so a restarted worker whose source stayed silent — an unreachable feed, a replay
/// without that market — had no series for VaultPriceStale to fire on); its last sequence; and
/// that tick as the validator's reference, so a restarted worker's first tick of a market is
/// checked for a jump like every other (a replay file played again from its first line, or a
/// feed's bad first print, moved the market by any amount and filled the limits in between).
async fn seed_from_stream(
    stream: &async_nats::jetstream::stream::Stream,
    pool: &PgPool,
    last_at: &mut HashMap<Symbol, DateTime<Utc>>,
    seqs: &mut HashMap<Symbol, u64>,
    validator: &mut Validator,
) {
    let symbols: Vec<String> = match sqlx::query_scalar("SELECT symbol FROM markets").fetch_all(pool).await {
        Ok(symbols) => symbols,
        Err(e) => {
            tracing::warn!(error = %e, "market list not read; price ages show once ticks are published");
            return;
        }
    };
    let now = Utc::now();
    for symbol in symbols.iter().filter_map(|s| Symbol::parse(s).ok()) {
        let last = last_tick(stream, &symbol).await;
        if let Some(tick) = &last {
            seqs.insert(symbol.clone(), tick.seq);
            validator.seed(&symbol, tick.price.get(), tick.ts.min(now));
        }
        last_at.insert(symbol, last.map_or(now, |tick| tick.ts.min(now)));
    }
}

#[cfg(test)]
mod tests {
    use rust_decimal_macros::dec;

    use super::*;

    fn market(symbol: &str, price: Decimal, increment: Decimal) -> SimMarket {
        SimMarket { symbol: Symbol::parse(symbol).expect("valid"), price, increment }
    }

    #[tokio::test]
    async fn the_walk_is_seeded_stays_on_increments_and_moves_gently() {
        let markets = vec![market("BTC-USD", dec!(65000), dec!(0.01)), market("DOGE-USD", dec!(0.15), dec!(0.00001))];
        let now = Utc::now();
        let mut a = Sim::new(markets.clone(), 7, Duration::from_millis(1));
        let mut b = Sim::new(markets, 7, Duration::from_millis(1));
        let mut last = dec!(65000);
        for _ in 0..1000 {
            let (qa, qb) = (a.step(now), b.step(now));
            assert_eq!(qa, qb, "same seed, same walk");
            for q in &qa {
                let inc = if q.symbol.to_string() == "BTC-USD" { dec!(0.01) } else { dec!(0.00001) };
                assert!((q.price.get() % inc).is_zero(), "{} off increment", q.price);
            }
            let btc = qa[0].price.get();
            // One step moves a few basis points at most (σ = 4 bp; 6σ bound).
            assert!(((btc - last) / last).abs() < dec!(0.0025), "{last} → {btc}");
            last = btc;
        }
        assert_ne!(last, dec!(65000), "the market moved");
    }
}
