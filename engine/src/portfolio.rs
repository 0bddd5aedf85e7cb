//! The portfolio state machine: one user's balances, holds and resting orders, and the rules
//! that change them. Pure: no I/O, no clock, no randomness — everything it needs arrives in the
//! command and the [`MarketView`], so it can be tested against a model and benchmarked alone.
//!
//! [`Portfolio::apply`] decides: it validates a command against the current state and returns
//! the events that would follow, or a [`Reject`] with a reason a user can read. It changes
//! nothing. [`Portfolio::evolve`] applies one event. The actor persists the events first and
//! evolves after the commit, so memory never runs ahead of the database.
//!
//! Execution model (paper trading, `API.md`): every fill is complete and a taker fill.
//! - market order: fills at the latest price; refused `no_price`, `stale_price` (older than
//!   `MAX_PRICE_AGE`) or `market_halted`;
//! - limit order: fills at once at the latest fresh price when marketable (buy: price ≤ limit,
//!   sell: price ≥ limit); otherwise GTC rests with a hold (buy: limit notional + fee in the
//!   quote asset; sell: the quantity in the base asset) and IOC/FOK expire;
//! - a resting order fills when a tick crosses it, at the tick's price, releasing its hold;
//! - cancel releases the hold; cancelling an order that is no longer open changes nothing.
//!
//! Invariants kept (and property-tested): available = total − reserved ≥ 0 for every asset;
//! reserved = the sum of the holds of open orders; every event's money moves balance.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vault_core::domain::{
    Asset, Market, MarketStatus, OrderType, Positive, Price, Quantity, Side, Symbol, TimeInForce,
};

/// One asset's balance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balance {
    pub total: Decimal,
    pub reserved: Decimal,
}

impl Balance {
    pub fn available(&self) -> Decimal {
        self.total - self.reserved
    }
}

/// An order resting on the book, with the funds it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenOrder {
    pub id: Uuid,
    pub symbol: Symbol,
    pub side: Side,
    pub quantity: Quantity,
    pub limit_price: Price,
    pub hold_asset: Asset,
    pub hold: Decimal,
}

/// A new order as the API validated it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRequest {
    pub order_id: Uuid,
    pub symbol: Symbol,
    pub side: Side,
    pub order_type: OrderType,
    pub time_in_force: TimeInForce,
    pub quantity: Quantity,
    pub limit_price: Option<Price>,
}

/// What a portfolio can be asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Deposit {
        deposit_id: Uuid,
        asset: Asset,
        amount: Positive,
    },
    Place(OrderRequest),
    Cancel {
        order_id: Uuid,
    },
    CancelAll {
        symbol: Option<Symbol>,
    },
    /// A price tick crossed this resting order's limit.
    Trigger {
        order_id: Uuid,
        price: Price,
    },
}

/// The market as the engine sees it when a command is applied.
#[derive(Debug, Clone, Copy)]
pub struct MarketView<'a> {
    pub market: &'a Market,
    pub last_price: Option<(Price, DateTime<Utc>)>,
    pub now: DateTime<Utc>,
    pub max_price_age: chrono::Duration,
}

impl MarketView<'_> {
    /// The latest price, or why there is none to trade at.
    fn fresh_price(&self) -> Result<Price, RejectReason> {
        match self.last_price {
            None => Err(RejectReason::NoPrice),
            Some((_, at)) if self.now - at > self.max_price_age => Err(RejectReason::StalePrice),
            Some((price, _)) => Ok(price),
        }
    }
}

/// Why a command was refused. The snake_case names are the `reject_reason`s of `API.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    InsufficientFunds,
    InsufficientPosition,
    MarketHalted,
    StalePrice,
    NoPrice,
    /// The command needs a market the engine does not know.
    UnknownMarket,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::InsufficientFunds => "insufficient_funds",
            RejectReason::InsufficientPosition => "insufficient_position",
            RejectReason::MarketHalted => "market_halted",
            RejectReason::StalePrice => "stale_price",
            RejectReason::NoPrice => "no_price",
            RejectReason::UnknownMarket => "unknown_market",
        }
    }
}

/// A refused command: nothing changes but the order's state (`rejected`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("rejected: {}", reason.as_str())]
pub struct Reject {
    pub reason: RejectReason,
}

/// A fill: always complete, always taker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fill {
    pub order_id: Uuid,
    pub symbol: Symbol,
    pub side: Side,
    pub quantity: Quantity,
    pub price: Price,
    /// price × quantity, in the quote asset.
    pub notional: Decimal,
    /// In the quote asset.
    pub fee: Decimal,
    /// The taker fee rate in force when it filled (the fee is this rate's, or less: see
    /// [`Command::Trigger`]).
    pub fee_rate: Decimal,
    /// The hold released by this fill (resting orders only).
    pub released: Option<(Asset, Decimal)>,
}

/// What happened. Every money movement is in an event, so the ledger is derived from them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    DepositCompleted {
        deposit_id: Uuid,
        asset: Asset,
        amount: Decimal,
    },
    /// Accepted and resting, with its hold reserved.
    OrderAccepted(OpenOrder),
    OrderFilled(Fill),
    OrderCanceled {
        order_id: Uuid,
        released: (Asset, Decimal),
    },
    /// IOC/FOK that could not fill at once.
    OrderExpired {
        order_id: Uuid,
    },
}

/// One double-entry posting of an event: `user_amount` on the user's account and its opposite
/// on the `counter` account (`house` for trades and deposits, `fees` for fees), so every
/// posting sums to zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Posting {
    pub asset: Asset,
    pub user_amount: Decimal,
    pub counter: &'static str,
    /// `deposit`, `trade` or `fee`: the ledger entry's kind.
    pub kind: &'static str,
    pub order_id: Option<Uuid>,
}

impl Event {
    /// The ledger postings of this event (events that move no money have none).
    pub fn postings(&self) -> Vec<Posting> {
        let p = |asset: &Asset, amount: Decimal, counter, kind, order_id| Posting {
            asset: asset.clone(),
            user_amount: amount,
            counter,
            kind,
            order_id,
        };
        match self {
            Event::DepositCompleted { asset, amount, .. } => vec![p(asset, *amount, "house", "deposit", None)],
            Event::OrderFilled(Fill { order_id, symbol, side, quantity, notional, fee, .. }) => {
                let (base, quote, id) = (symbol.base(), symbol.quote(), Some(*order_id));
                let mut out = match side {
                    Side::Buy => {
                        vec![p(quote, -*notional, "house", "trade", id), p(base, quantity.get(), "house", "trade", id)]
                    }
                    Side::Sell => {
                        vec![p(base, -quantity.get(), "house", "trade", id), p(quote, *notional, "house", "trade", id)]
                    }
                };
                if !fee.is_zero() {
                    out.push(p(quote, -*fee, "fees", "fee", id));
                }
                out
            }
            _ => Vec::new(),
        }
    }

    /// The order this event closes, if it closes one.
    pub fn closes(&self) -> Option<Uuid> {
        match self {
            Event::OrderFilled(f) => Some(f.order_id),
            Event::OrderCanceled { order_id, .. } | Event::OrderExpired { order_id } => Some(*order_id),
            _ => None,
        }
    }

    /// The order this event concerns, if any.
    pub fn order_id(&self) -> Option<Uuid> {
        match self {
            Event::OrderAccepted(o) => Some(o.id),
            other => other.closes(),
        }
    }
}

/// One user's portfolio.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Portfolio {
    pub balances: BTreeMap<Asset, Balance>,
    pub open_orders: BTreeMap<Uuid, OpenOrder>,
    /// Cost of the current holding of each base asset, in the quote asset (excluding fees):
    /// `avg_cost = cost / quantity`.
    pub cost_basis: BTreeMap<Asset, Decimal>,
}

impl Portfolio {
    pub fn balance(&self, asset: &Asset) -> Balance {
        self.balances.get(asset).copied().unwrap_or_default()
    }

    /// Decides what `command` does. `market` is required for `Place` and `Trigger`.
    pub fn apply(&self, command: &Command, market: Option<&MarketView<'_>>) -> Result<Vec<Event>, Reject> {
        let reject = |reason| Err(Reject { reason });
        match command {
            Command::Deposit { deposit_id, asset, amount } => Ok(vec![Event::DepositCompleted {
                deposit_id: *deposit_id,
                asset: asset.clone(),
                amount: amount.get(),
            }]),
            Command::Place(order) => {
                let Some(view) = market.filter(|v| v.market.symbol == order.symbol) else {
                    return reject(RejectReason::UnknownMarket);
                };
                self.place(order, view)
            }
            Command::Cancel { order_id } => Ok(self.cancel(*order_id).into_iter().collect()),
            Command::CancelAll { symbol } => Ok(self
                .open_orders
                .values()
                .filter(|o| symbol.as_ref().is_none_or(|s| *s == o.symbol))
                .filter_map(|o| self.cancel(o.id))
                .collect()),
            Command::Trigger { order_id, price } => {
                let Some(order) = self.open_orders.get(order_id) else { return Ok(Vec::new()) };
                let crosses = match order.side {
                    Side::Buy => *price <= order.limit_price,
                    Side::Sell => *price >= order.limit_price,
                };
                let Some(view) = market.filter(|v| v.market.symbol == order.symbol) else {
                    return Ok(Vec::new());
                };
                if !crosses || view.market.status == MarketStatus::Halted {
                    return Ok(Vec::new());
                }
                // A price at which the fill cannot be computed (see `Portfolio::costs`) fills
                // nothing: the order stays open for a sane tick.
                let Some((notional, fee)) = self.costs(order.side, &order.symbol, order.quantity, *price, view.market)
                else {
                    return Ok(Vec::new());
                };
                // A buy never pays more than it reserved: its hold is the notional at its limit
                // plus the fee at the rate in force when it was placed, and a rate raised since
                // is charged only up to what the hold leaves (at the limit price, that is the
                // old rate's fee). Charging more could take funds the user never set aside.
                let fee = match order.side {
                    Side::Buy => fee.min(order.hold - notional),
                    Side::Sell => fee,
                };
                Ok(vec![Event::OrderFilled(Fill {
                    order_id: order.id,
                    symbol: order.symbol.clone(),
                    side: order.side,
                    quantity: order.quantity,
                    price: *price,
                    notional,
                    fee,
                    fee_rate: view.market.taker_fee_rate,
                    released: Some((order.hold_asset.clone(), order.hold)),
                })])
            }
        }
    }

    fn place(&self, order: &OrderRequest, view: &MarketView<'_>) -> Result<Vec<Event>, Reject> {
        let market = view.market;
        if market.status == MarketStatus::Halted {
            return Err(Reject { reason: RejectReason::MarketHalted });
        }
        let (base, quote) = (order.symbol.base(), order.symbol.quote());
        let unaffordable = Reject {
            reason: match order.side {
                Side::Buy => RejectReason::InsufficientFunds,
                Side::Sell => RejectReason::InsufficientPosition,
            },
        };
        let fill_at = |price: Price| {
            // Amounts too large to compute are more than anyone holds.
            let Some((notional, fee)) = self.costs(order.side, &order.symbol, order.quantity, price, market) else {
                return Err(unaffordable);
            };
            match order.side {
                Side::Buy if self.balance(quote).available() < notional + fee => Err(unaffordable),
                Side::Sell if self.balance(base).available() < order.quantity.get() => Err(unaffordable),
                _ => Ok(vec![Event::OrderFilled(Fill {
                    order_id: order.order_id,
                    symbol: order.symbol.clone(),
                    side: order.side,
                    quantity: order.quantity,
                    price,
                    notional,
                    fee,
                    fee_rate: market.taker_fee_rate,
                    released: None,
                })]),
            }
        };
        match (order.order_type, order.limit_price) {
            (OrderType::Market, _) => fill_at(view.fresh_price().map_err(|reason| Reject { reason })?),
            (OrderType::Limit, None) => Err(Reject { reason: RejectReason::UnknownMarket }),
            (OrderType::Limit, Some(limit)) => {
                let marketable = view.fresh_price().ok().filter(|p| match order.side {
                    Side::Buy => *p <= limit,
                    Side::Sell => *p >= limit,
                });
                if let Some(price) = marketable {
                    return fill_at(price);
                }
                // Not fillable now: a hold for GTC, expiry for IOC/FOK — after the funds check,
                // so an unaffordable order is rejected whatever its time in force.
                let (hold_asset, hold) = match order.side {
                    Side::Buy => {
                        let (notional, fee) =
                            self.costs(Side::Buy, &order.symbol, order.quantity, limit, market).ok_or(unaffordable)?;
                        (quote.clone(), notional + fee)
                    }
                    Side::Sell => (base.clone(), order.quantity.get()),
                };
                if self.balance(&hold_asset).available() < hold {
                    return Err(unaffordable);
                }
                match order.time_in_force {
                    TimeInForce::Ioc | TimeInForce::Fok => Ok(vec![Event::OrderExpired { order_id: order.order_id }]),
                    TimeInForce::Gtc => Ok(vec![Event::OrderAccepted(OpenOrder {
                        id: order.order_id,
                        symbol: order.symbol.clone(),
                        side: order.side,
                        quantity: order.quantity,
                        limit_price: limit,
                        hold_asset,
                        hold,
                    })]),
                }
            }
        }
    }

    /// The notional and fee of filling `quantity` at `price`, or `None` when they cannot be
    /// computed in a `Decimal` (about 7.9e28): the product or the buyer's total overflows, or a
    /// seller's proceeds would overflow its quote balance. Applying a fill then never overflows
    /// (a buyer pays at most what it has; a seller's balance was checked here), so no command can
    /// make the engine panic with amounts.
    fn costs(
        &self,
        side: Side,
        symbol: &Symbol,
        quantity: Positive,
        price: Price,
        market: &Market,
    ) -> Option<(Decimal, Decimal)> {
        // Normalized: a product keeps both factors' scales (0.015 × 65000 = 975.000), and the
        // ledger would show its trailing zeros.
        let notional = quantity.get().checked_mul(price.get())?.normalize();
        let fee = market.checked_fee(notional)?;
        match side {
            Side::Buy => {
                notional.checked_add(fee)?;
            }
            Side::Sell => {
                self.balance(symbol.quote()).total.checked_add(notional)?;
            }
        }
        Some((notional, fee))
    }

    fn cancel(&self, order_id: Uuid) -> Option<Event> {
        self.open_orders
            .get(&order_id)
            .map(|o| Event::OrderCanceled { order_id, released: (o.hold_asset.clone(), o.hold) })
    }

    /// Applies one event decided by [`Portfolio::apply`].
    pub fn evolve(&mut self, event: &Event) {
        match event {
            Event::DepositCompleted { asset, amount, .. } => {
                self.balances.entry(asset.clone()).or_default().total += *amount;
            }
            Event::OrderAccepted(order) => {
                self.balances.entry(order.hold_asset.clone()).or_default().reserved += order.hold;
                self.open_orders.insert(order.id, order.clone());
            }
            Event::OrderCanceled { order_id, released: (asset, amount) } => {
                self.balances.entry(asset.clone()).or_default().reserved -= *amount;
                self.open_orders.remove(order_id);
            }
            Event::OrderExpired { .. } => {}
            Event::OrderFilled(fill) => {
                if let Some((asset, amount)) = &fill.released {
                    self.balances.entry(asset.clone()).or_default().reserved -= *amount;
                    self.open_orders.remove(&fill.order_id);
                }
                let (base, quote) = (fill.symbol.base().clone(), fill.symbol.quote().clone());
                let qty = fill.quantity.get();
                match fill.side {
                    Side::Buy => {
                        self.balances.entry(quote).or_default().total -= fill.notional + fill.fee;
                        self.balances.entry(base.clone()).or_default().total += qty;
                        let cost = self.cost_basis.entry(base).or_default();
                        *cost = cost.saturating_add(fill.notional);
                    }
                    Side::Sell => {
                        let held = self.balance(&base).total;
                        let cost = self.cost_basis.get(&base).copied().unwrap_or_default();
                        // The cost leaves in proportion to the quantity sold: cost × (held −
                        // sold) ÷ held, whose product overflows a `Decimal` for absurd holdings
                        // (it panicked the user's shard); then cost ÷ held × (held − sold),
                        // which cannot overflow when the first form does (it needs held ≥ 1).
                        let left = held - qty;
                        let remaining_cost = if held.is_zero() {
                            Decimal::ZERO
                        } else {
                            cost.checked_mul(left)
                                .and_then(|c| c.checked_div(held))
                                .or_else(|| cost.checked_div(held)?.checked_mul(left))
                                .unwrap_or(cost)
                        };
                        // Half-even, as the domain's rounding rules state.
                        let remaining_cost = remaining_cost.round_dp_with_strategy(
                            vault_core::domain::MONEY_SCALE,
                            rust_decimal::RoundingStrategy::MidpointNearestEven,
                        );
                        self.cost_basis.insert(base.clone(), remaining_cost);
                        self.balances.entry(base).or_default().total -= qty;
                        self.balances.entry(quote).or_default().total += fill.notional - fill.fee;
                    }
                }
            }
        }
    }

    /// `apply` then `evolve` each event: for callers that need no persistence in between.
    pub fn execute(&mut self, command: &Command, market: Option<&MarketView<'_>>) -> Result<Vec<Event>, Reject> {
        let events = self.apply(command, market)?;
        for event in &events {
            self.evolve(event);
        }
        Ok(events)
    }

    /// Checks the invariants; `Err` names the first that does not hold.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut holds: BTreeMap<&Asset, Decimal> = BTreeMap::new();
        for order in self.open_orders.values() {
            *holds.entry(&order.hold_asset).or_default() += order.hold;
        }
        for (asset, balance) in &self.balances {
            if balance.available() < Decimal::ZERO {
                return Err(format!("{asset}: available {} < 0", balance.available()));
            }
            if balance.reserved != holds.get(asset).copied().unwrap_or_default() {
                return Err(format!("{asset}: reserved {} != holds {:?}", balance.reserved, holds.get(asset)));
            }
        }
        for (asset, hold) in holds {
            if !self.balances.contains_key(asset) && !hold.is_zero() {
                return Err(format!("{asset}: holds {hold} without a balance"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
