//! Markets and their latest prices: `GET /markets` and `GET /markets/{symbol}/ticker`.
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
use axum::extract::{Path, State};
use axum::routing::get;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;
use vault_core::domain::{Market, MarketStatus, Symbol};

use crate::error::{ApiError, Problem};
use crate::startup::AppState;

/// How often the cache is read again from the database.
pub const REFRESH: Duration = Duration::from_secs(5);

pub fn router() -> Router<AppState> {
    Router::new().route("/markets", get(list_markets)).route("/markets/{symbol}/ticker", get(ticker))
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
                        if let Err(e) = cache.refresh(&pool).await {
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

    /// Whether `asset` can be deposited: USD or the base asset of a market.
    pub fn is_known_asset(&self, asset: &str) -> bool {
        asset == "USD" || self.snapshot().list.iter().any(|m| m.symbol.base().as_str() == asset)
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
#[utoipa::path(get, path = "/api/v1/markets/{symbol}/ticker", tag = "markets", params(("symbol" = String, Path, example = "BTC-USD")),
    responses((status = 200, body = Ticker), (status = 404, description = "not_found (unknown symbol) or no_price (no tick yet)", body = Problem)))]
pub async fn ticker(State(state): State<AppState>, Path(symbol): Path<String>) -> Result<Json<Ticker>, ApiError> {
    let symbol = Symbol::parse(&symbol).map_err(|_| ApiError::NotFound)?;
    state.markets.get(&symbol).ok_or(ApiError::NotFound)?;
    let latest = state
        .prices
        .get(&symbol)
        .ok_or_else(|| ApiError::Absent { code: "no_price", detail: format!("{symbol} has no price yet.") })?;
    Ok(Json(Ticker { symbol: symbol.to_string(), price: latest.price, ts: latest.ts, source: latest.source }))
}
