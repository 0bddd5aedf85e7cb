//! Markets and their prices: `GET /markets`, `GET /markets/{symbol}/ticker` and
//! `GET /markets/{symbol}/candles`.
//!
//! The markets are cached in memory ([`MarketCache`]): read from Postgres at start, again every
//! [`REFRESH`] and at once after an admin halts or resumes one on this replica (another replica
//! shows the change within [`REFRESH`]). Both routes are public market data, like an exchange's
//! public endpoints: no credentials needed (they are still rate limited per IP).
//!
//! The cache may not decide whether an order is accepted on a halted market: the API validates
//! an order's shape against the market's rules, the engine rejects it `market_halted`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use utoipa::{IntoParams, ToSchema};
use vault_core::db;
use vault_core::domain::{MONEY_SCALE, Market, MarketStatus, Symbol};

use crate::error::{ApiError, Problem};
use crate::pagination::ApiQuery;
use crate::path::PathText;
use crate::startup::AppState;
use crate::trading::MarketSymbol;

/// How often the cache is read again from the database.
pub const REFRESH: Duration = Duration::from_secs(5);

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/markets", get(list_markets))
        .route("/markets/{symbol}/ticker", get(ticker))
        .route("/markets/{symbol}/candles", get(candles))
}

/// Every market's rules, by symbol. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct MarketCache {
    // A std lock: held only to swap or clone an `Arc`.
    inner: Arc<RwLock<Arc<Markets>>>,
}

#[derive(Debug, Default)]
struct Markets {
    /// Sorted by symbol.
    list: Vec<Market>,
    by_symbol: HashMap<Symbol, usize>,
}

#[derive(sqlx::FromRow)]
struct MarketRow {
    symbol: String,
    status: String,
    price_increment: Decimal,
    quantity_increment: Decimal,
    min_notional: Decimal,
    taker_fee_rate: Decimal,
}

impl MarketCache {
    /// Reads the markets once; an error here stops start-up.
    pub async fn load(pool: &PgPool) -> Result<MarketCache, sqlx::Error> {
        let cache = MarketCache::default();
        cache.refresh(pool).await?;
        Ok(cache)
    }

    /// Reads the markets from the database and swaps them in.
    pub async fn refresh(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let rows: Vec<MarketRow> = sqlx::query_as(
            "SELECT symbol, status, price_increment, quantity_increment, min_notional, taker_fee_rate
               FROM markets ORDER BY symbol",
        )
        .fetch_all(pool)
        .await?;
        let mut markets = Markets::default();
        for row in rows {
            let (Ok(symbol), Some(status)) = (Symbol::parse(&row.symbol), parse_status(&row.status)) else {
                tracing::error!(symbol = row.symbol, status = row.status, "market row cannot be read; skipped");
                continue;
            };
            markets.by_symbol.insert(symbol.clone(), markets.list.len());
            markets.list.push(Market {
                symbol,
                status,
                price_increment: row.price_increment.normalize(),
                quantity_increment: row.quantity_increment.normalize(),
                min_notional: row.min_notional.normalize(),
                taker_fee_rate: row.taker_fee_rate.normalize(),
            });
        }
        *self.inner.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(markets);
        Ok(())
    }

    /// Re-reads the markets every [`REFRESH`] until `shutdown`; a failed read keeps the last
    /// good copy and is retried on the next round.
    pub fn spawn_refresher(&self, pool: PgPool, shutdown: CancellationToken) {
        let cache = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        // Bounded: a read that never answers would freeze the market rules.
                        if let Err(e) = db::within(db::STATEMENT_WITHIN, cache.refresh(&pool)).await {
                            tracing::warn!(error = %e, "markets could not be refreshed; keeping the last copy");
                        }
                    }
                }
            }
        });
    }

    fn snapshot(&self) -> Arc<Markets> {
        self.inner.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    pub fn get(&self, symbol: &Symbol) -> Option<Market> {
        let markets = self.snapshot();
        markets.by_symbol.get(symbol).map(|&i| markets.list[i].clone())
    }

    /// Every market, sorted by symbol.
    pub fn all(&self) -> Vec<Market> {
        self.snapshot().list.clone()
    }

    /// The market whose base asset is `asset` and whose quote is USD, if any.
    pub fn usd_market_of(&self, asset: &str) -> Option<Market> {
        self.snapshot()
            .list
            .iter()
            .find(|m| m.symbol.base().as_str() == asset && m.symbol.quote().as_str() == "USD")
            .cloned()
    }

    /// The step a deposit of `asset` must be a multiple of: a hundred-millionth for USD, the
    /// quantity increment of the asset's market for a coin (the finest, if it has several);
    /// `None` for an asset that is neither.
    pub fn deposit_increment(&self, asset: &str) -> Option<Decimal> {
        if asset == "USD" {
            return Some(Decimal::new(1, MONEY_SCALE));
        }
        self.snapshot().list.iter().filter(|m| m.symbol.base().as_str() == asset).map(|m| m.quantity_increment).min()
    }
}

fn parse_status(s: &str) -> Option<MarketStatus> {
    match s {
        "trading" => Some(MarketStatus::Trading),
        "halted" => Some(MarketStatus::Halted),
        _ => None,
    }
}

fn status_str(status: MarketStatus) -> &'static str {
    match status {
        MarketStatus::Trading => "trading",
        MarketStatus::Halted => "halted",
    }
}

/// A market with its rules and latest price.
#[derive(Debug, Serialize, ToSchema)]
pub struct MarketInfo {
    #[schema(example = "BTC-USD")]
    pub symbol: String,
    #[schema(example = "BTC")]
    pub base: String,
    #[schema(example = "USD")]
    pub quote: String,
    /// `trading` or `halted`.
    pub status: &'static str,
    #[schema(value_type = String, example = "0.01")]
    pub price_increment: Decimal,
    #[schema(value_type = String, example = "0.00001")]
    pub quantity_increment: Decimal,
    /// The smallest order notional (quantity × price) in the quote asset.
    #[schema(value_type = String, example = "1")]
    pub min_notional: Decimal,
    #[schema(value_type = String, example = "0.001")]
    pub taker_fee_rate: Decimal,
    /// The latest price; null until the first tick.
    #[schema(value_type = Option<String>, example = "65000.00")]
    pub last_price: Option<Decimal>,
    #[serde(serialize_with = "vault_core::time::micros_opt")]
    pub last_price_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MarketList {
    pub markets: Vec<MarketInfo>,
}

/// The latest tick of a market.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ticker {
    #[schema(example = "BTC-USD")]
    pub symbol: String,
    #[schema(value_type = String, example = "65000.00")]
    pub price: Decimal,
    /// When the source observed the price.
    #[serde(serialize_with = "vault_core::time::micros")]
    pub ts: DateTime<Utc>,
    /// Where the price came from (`sim`, `coinbase`, `replay`…).
    pub source: String,
}

/// Every market with its rules and latest price (public).
#[utoipa::path(get, path = "/api/v1/markets", tag = "markets", responses((status = 200, body = MarketList)))]
pub async fn list_markets(State(state): State<AppState>) -> Json<MarketList> {
    let markets = state
        .markets
        .all()
        .into_iter()
        .map(|m| {
            let latest = state.prices.get(&m.symbol);
            MarketInfo {
                symbol: m.symbol.to_string(),
                base: m.symbol.base().to_string(),
                quote: m.symbol.quote().to_string(),
                status: status_str(m.status),
                price_increment: m.price_increment,
                quantity_increment: m.quantity_increment,
                min_notional: m.min_notional,
                taker_fee_rate: m.taker_fee_rate,
                last_price: latest.as_ref().map(|p| p.price),
                last_price_at: latest.map(|p| p.ts),
            }
        })
        .collect();
    Json(MarketList { markets })
}

/// The latest price of a market (public). 404 `not_found` for an unknown symbol, 404 `no_price`
/// while the market has had no tick yet.
#[utoipa::path(get, path = "/api/v1/markets/{symbol}/ticker", tag = "markets", params(("symbol" = MarketSymbol, Path, example = "BTC-USD")),
    responses((status = 200, body = Ticker), (status = 404, description = "not_found (unknown symbol) or no_price (no tick yet)", body = Problem)))]
pub async fn ticker(State(state): State<AppState>, PathText(symbol): PathText) -> Result<Json<Ticker>, ApiError> {
    let symbol = Symbol::parse(&symbol).map_err(|_| ApiError::NotFound)?;
    state.markets.get(&symbol).ok_or(ApiError::NotFound)?;
    let latest = state
        .prices
        .get(&symbol)
        .ok_or_else(|| ApiError::Absent { code: "no_price", detail: format!("{symbol} has no price yet.") })?;
    Ok(Json(Ticker { symbol: symbol.to_string(), price: latest.price, ts: latest.ts, source: latest.source }))
}

/// The most candles one answer may hold.
pub const MAX_CANDLES: i64 = 1000;
/// How many intervals a request without `start` covers.
pub const DEFAULT_CANDLES: i32 = 100;

/// A candle interval: its length in seconds. Buckets are aligned on the Unix epoch (so `1d`
/// candles start at 00:00 UTC).
fn interval_seconds(interval: &str) -> Option<i64> {
    match interval {
        "1m" => Some(60),
        "5m" => Some(300),
        "1h" => Some(3600),
        "1d" => Some(86_400),
        _ => None,
    }
}

/// A candle interval: `1m`, `5m`, `1h` or `1d`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // The document's enum; requests carry the string (see `interval_seconds`).
pub enum CandleInterval {
    #[schema(rename = "1m")]
    OneMinute,
    #[schema(rename = "5m")]
    FiveMinutes,
    #[schema(rename = "1h")]
    OneHour,
    #[schema(rename = "1d")]
    OneDay,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CandleQuery {
    /// `1m` (default), `5m`, `1h` or `1d`.
    #[param(value_type = Option<CandleInterval>)]
    pub interval: Option<String>,
    /// From this time (RFC 3339; rounded down to the start of its interval). Default: `end`
    /// minus 100 intervals.
    pub start: Option<DateTime<Utc>>,
    /// Until this time (exclusive, RFC 3339). Default: now.
    pub end: Option<DateTime<Utc>>,
}

/// One candle. `volume` is the number of price ticks in it: ticks carry no traded size.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct CandleView {
    /// The first instant of the interval.
    #[serde(serialize_with = "vault_core::time::micros")]
    pub start: DateTime<Utc>,
    #[schema(value_type = String, example = "65000.00")]
    pub open: Decimal,
    #[schema(value_type = String, example = "65120.50")]
    pub high: Decimal,
    #[schema(value_type = String, example = "64980.10")]
    pub low: Decimal,
    #[schema(value_type = String, example = "65100.00")]
    pub close: Decimal,
    #[schema(value_type = String, example = "120")]
    pub volume: Decimal,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CandleList {
    pub candles: Vec<CandleView>,
}

/// The validated range of a candle request: `[start, end)` with `start` on an interval
/// boundary, covering at most [`MAX_CANDLES`] intervals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CandleRange {
    seconds: i64,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
}

fn candle_range(query: &CandleQuery, now: DateTime<Utc>) -> Result<CandleRange, ApiError> {
    let name = query.interval.as_deref().unwrap_or("1m");
    let seconds = interval_seconds(name).ok_or_else(|| ApiError::invalid("interval", "must be 1m, 5m, 1h or 1d"))?;
    // Postgres and chrono agree on every instant in this range; beyond it a date is a mistake.
    let min = DateTime::UNIX_EPOCH;
    let max = DateTime::from_timestamp(253_402_300_799, 0).expect("9999-12-31T23:59:59Z is a valid time");
    let in_range = |t: DateTime<Utc>| t >= min && t <= max;
    let end = query.end.unwrap_or(now);
    if !in_range(end) {
        return Err(ApiError::invalid("end", "must be between 1970 and 9999"));
    }
    let start = match query.start {
        Some(start) => start,
        None => end - chrono::TimeDelta::seconds(seconds * i64::from(DEFAULT_CANDLES)),
    };
    if !in_range(start) && query.start.is_some() {
        return Err(ApiError::invalid("start", "must be between 1970 and 9999"));
    }
    let start = start.max(min);
    if start >= end {
        return Err(ApiError::invalid("start", "must be before `end`"));
    }
    let aligned = start.timestamp() - start.timestamp().rem_euclid(seconds);
    let start = DateTime::from_timestamp(aligned, 0).unwrap_or(min);
    let span = (end - start).num_seconds();
    let count = span / seconds + i64::from(span % seconds != 0 || (end - start).subsec_nanos() != 0);
    if count > MAX_CANDLES {
        return Err(ApiError::invalid(
            "start",
            format!("the range holds {count} {name} candles; at most {MAX_CANDLES} per request"),
        ));
    }
    Ok(CandleRange { seconds, start, end })
}

/// OHLC candles of a market, oldest first (public). Each covers `[start, start + interval)`;
/// the last one may still be forming, and one that `end` cuts holds only the one-minute candles
/// that began before `end`. Intervals without a tick have no candle.
#[utoipa::path(get, path = "/api/v1/markets/{symbol}/candles", tag = "markets",
    params(("symbol" = MarketSymbol, Path, example = "BTC-USD"), CandleQuery),
    responses((status = 200, body = CandleList), (status = 404, description = "unknown symbol", body = Problem),
        (status = 422, description = "bad interval, start not before end, or more than 1000 candles", body = Problem)))]
pub async fn candles(
    State(state): State<AppState>,
    PathText(symbol): PathText,
    ApiQuery(query): ApiQuery<CandleQuery>,
) -> Result<Json<CandleList>, ApiError> {
    let symbol = Symbol::parse(&symbol).map_err(|_| ApiError::NotFound)?;
    state.markets.get(&symbol).ok_or(ApiError::NotFound)?;
    let range = candle_range(&query, Utc::now())?;
    // The open of the first minute and the close of the last one of each bucket.
    let mut candles: Vec<CandleView> = sqlx::query_as(
        "SELECT date_bin($2 * INTERVAL '1 second', start, TIMESTAMPTZ 'epoch') AS start,
                (array_agg(open ORDER BY start))[1] AS open, max(high) AS high, min(low) AS low,
                (array_agg(close ORDER BY start DESC))[1] AS close, sum(volume) AS volume
           FROM candles
          WHERE symbol = $1 AND start >= $3 AND start < $4
          GROUP BY 1 ORDER BY 1",
    )
    .bind(symbol.to_string())
    .bind(range.seconds)
    .bind(range.start)
    .bind(range.end)
    .fetch_all(&state.pool)
    .await?;
    for c in &mut candles {
        (c.open, c.high, c.low, c.close, c.volume) =
            (c.open.normalize(), c.high.normalize(), c.low.normalize(), c.close.normalize(), c.volume.normalize());
    }
    Ok(Json(CandleList { candles }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().expect("time")
    }

    fn query(interval: Option<&str>, start: Option<&str>, end: Option<&str>) -> CandleQuery {
        CandleQuery { interval: interval.map(Into::into), start: start.map(at), end: end.map(at) }
    }

    fn refused(q: CandleQuery) -> String {
        match candle_range(&q, at("2026-01-02T03:04:05Z")) {
            Err(ApiError::Validation { errors, .. }) => errors[0].field.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_default_is_the_last_100_minutes_until_now() {
        let r = candle_range(&query(None, None, None), at("2026-01-02T03:04:05Z")).expect("valid");
        assert_eq!(r, CandleRange { seconds: 60, start: at("2026-01-02T01:24:00Z"), end: at("2026-01-02T03:04:05Z") });
    }

    #[test]
    fn start_is_rounded_down_to_its_interval_and_days_start_at_midnight_utc() {
        let r = candle_range(
            &query(Some("5m"), Some("2026-01-02T03:07:30+01:00"), Some("2026-01-02T04:00:00Z")),
            Utc::now(),
        )
        .expect("valid");
        assert_eq!((r.seconds, r.start), (300, at("2026-01-02T02:05:00Z")));
        let r =
            candle_range(&query(Some("1d"), Some("2026-01-02T23:00:00Z"), Some("2026-01-05T00:00:00Z")), Utc::now())
                .expect("valid");
        assert_eq!(r.start, at("2026-01-02T00:00:00Z"));
    }

    #[test]
    fn at_most_1000_candles_and_start_before_end() {
        assert!(
            candle_range(&query(Some("1m"), Some("2026-01-01T00:00:00Z"), Some("2026-01-01T16:40:00Z")), Utc::now())
                .is_ok()
        );
        assert_eq!(refused(query(Some("1m"), Some("2026-01-01T00:00:00Z"), Some("2026-01-01T16:40:00.001Z"))), "start");
        assert_eq!(refused(query(Some("1h"), Some("2026-01-01T00:00:00Z"), Some("2026-01-01T00:00:00Z"))), "start");
        assert_eq!(refused(query(Some("1h"), Some("2026-01-02T00:00:00Z"), Some("2026-01-01T00:00:00Z"))), "start");
        assert_eq!(refused(query(Some("2m"), None, None)), "interval");
        assert_eq!(refused(query(Some("1d"), Some("1960-01-01T00:00:00Z"), None)), "start");
    }
}
