//! The price book: every resting limit order of the engine's users, per symbol, ordered by
//! limit, so a tick finds the orders it crosses in O(log n + k).
//!
//! It lives at engine level, not in the actors, so it survives actor passivation; at start it is
//! rebuilt from the open orders in the database. It only *finds* candidates: the user's actor
//! decides whether the order still fills. An order taken out by [`PriceBook::crossed`] is put
//! back by its actor when it is still open after the trigger (e.g. the fill could not commit).
//!
//! Each order also keeps when it started resting, so that the ticks an engine replays when it
//! starts — those published while no engine served, which may have crossed it and gone back —
//! fill only orders that were resting when the tick came ([`PriceBook::crossed_resting_at`]).

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use uuid::Uuid;
use vault_core::domain::{Side, Symbol};

/// A resting order as the book knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resting {
    pub order_id: Uuid,
    pub user_id: Uuid,
    pub side: Side,
    pub limit: Decimal,
    /// When it started resting (its commit as `open`). An order the book knows keeps the first
    /// time it was given, when it is put back (see [`PriceBook::insert`]).
    pub since: DateTime<Utc>,
}

#[derive(Debug, Default)]
struct SymbolBook {
    /// Buys fill when price ≤ limit: highest limit first.
    buys: BTreeMap<(Reverse<Decimal>, Uuid), (Uuid, DateTime<Utc>)>,
    /// Sells fill when price ≥ limit: lowest limit first.
    sells: BTreeMap<(Decimal, Uuid), (Uuid, DateTime<Utc>)>,
}

/// All resting orders, by symbol.
#[derive(Debug, Default)]
pub struct PriceBook {
    books: HashMap<Symbol, SymbolBook>,
    /// order id → (symbol, side, limit), to remove an order without knowing its place.
    index: HashMap<Uuid, (Symbol, Side, Decimal)>,
    /// When each order started resting. Kept while the order is out for a trigger and when it
    /// is put in again (put back after a trigger that did not fill it, or by a command delivered
    /// again): only [`PriceBook::remove`] (a fill, a cancel) forgets it. (Put back with the time
    /// of the put-back, an order missed the ticks replayed after that: see the module docs.)
    since: HashMap<Uuid, DateTime<Utc>>,
}

impl PriceBook {
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Adds (or re-adds) a resting order; one the book knew keeps the time it started resting.
    /// Returns whether the book did not know it.
    pub fn insert(&mut self, symbol: &Symbol, order: Resting) -> bool {
        self.take_out(order.order_id);
        let new = !self.since.contains_key(&order.order_id);
        let since = *self.since.entry(order.order_id).or_insert(order.since);
        let book = self.books.entry(symbol.clone()).or_default();
        match order.side {
            Side::Buy => book.buys.insert((Reverse(order.limit), order.order_id), (order.user_id, since)),
            Side::Sell => book.sells.insert((order.limit, order.order_id), (order.user_id, since)),
        };
        self.index.insert(order.order_id, (symbol.clone(), order.side, order.limit));
        new
    }

    /// Removes an order (filled or canceled); unknown ids are ignored.
    pub fn remove(&mut self, order_id: Uuid) {
        self.take_out(order_id);
        self.since.remove(&order_id);
    }

    /// Takes an order out of its symbol's book, remembering when it started resting.
    fn take_out(&mut self, order_id: Uuid) {
        let Some((symbol, side, limit)) = self.index.remove(&order_id) else { return };
        if let Some(book) = self.books.get_mut(&symbol) {
            match side {
                Side::Buy => book.buys.remove(&(Reverse(limit), order_id)),
                Side::Sell => book.sells.remove(&(limit, order_id)),
            };
        }
    }

    /// Takes out and returns every order of `symbol` that `price` crosses ([`crosses`]).
    pub fn crossed(&mut self, symbol: &Symbol, price: Decimal) -> Vec<Resting> {
        self.crossed_resting_at(symbol, price, None)
    }

    /// [`Self::crossed`], but with `at`, only the orders resting at that time: a tick of `at`
    /// leaves the orders that started resting after it where they are.
    pub fn crossed_resting_at(&mut self, symbol: &Symbol, price: Decimal, at: Option<DateTime<Utc>>) -> Vec<Resting> {
        let Some(book) = self.books.get_mut(symbol) else { return Vec::new() };
        let resting_then = |since: &DateTime<Utc>| at.is_none_or(|at| *since <= at);
        let buys: Vec<Resting> = book
            .buys
            .range(..=(Reverse(price), Uuid::max()))
            .filter(|(_, (_, since))| resting_then(since))
            .map(|((Reverse(limit), order_id), (user_id, since))| Resting {
                order_id: *order_id,
                user_id: *user_id,
                side: Side::Buy,
                limit: *limit,
                since: *since,
            })
            .collect();
        let sells: Vec<Resting> = book
            .sells
            .range(..=(price, Uuid::max()))
            .filter(|(_, (_, since))| resting_then(since))
            .map(|((limit, order_id), (user_id, since))| Resting {
                order_id: *order_id,
                user_id: *user_id,
                side: Side::Sell,
                limit: *limit,
                since: *since,
            })
            .collect();
        for r in &buys {
            book.buys.remove(&(Reverse(r.limit), r.order_id));
        }
        for r in &sells {
            book.sells.remove(&(r.limit, r.order_id));
        }
        let out: Vec<Resting> = buys.into_iter().chain(sells).collect();
        for r in &out {
            self.index.remove(&r.order_id);
        }
        out
    }
}

/// Whether `price` crosses a resting order: a buy's limit ≥ price, a sell's limit ≤ price.
pub fn crosses(side: Side, limit: Decimal, price: Decimal) -> bool {
    match side {
        Side::Buy => limit >= price,
        Side::Sell => limit <= price,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rust_decimal_macros::dec;

    use super::*;

    fn sym() -> Symbol {
        Symbol::parse("BTC-USD").expect("valid")
    }

    fn resting(side: Side, limit: Decimal) -> Resting {
        Resting { order_id: Uuid::now_v7(), user_id: Uuid::now_v7(), side, limit, since: Utc::now() }
    }

    #[test]
    fn a_tick_takes_exactly_the_orders_it_crosses() {
        let mut book = PriceBook::default();
        let (b1, b2, s1, s2) = (
            resting(Side::Buy, dec!(100)),
            resting(Side::Buy, dec!(90)),
            resting(Side::Sell, dec!(110)),
            resting(Side::Sell, dec!(120)),
        );
        for r in [b1, b2, s1, s2] {
            book.insert(&sym(), r);
        }
        assert!(book.crossed(&sym(), dec!(105)).is_empty());
        assert_eq!(book.crossed(&sym(), dec!(100)), vec![b1]);
        assert_eq!(book.crossed(&sym(), dec!(100)), vec![], "taken out once");
        let high = book.crossed(&sym(), dec!(125));
        assert_eq!(high, vec![s1, s2]);
        assert_eq!(book.len(), 1);
        book.remove(b2.order_id);
        assert!(book.is_empty());
        assert!(book.crossed(&Symbol::parse("ETH-USD").expect("valid"), dec!(1)).is_empty());
    }

    #[test]
    fn a_tick_of_a_past_time_takes_only_the_orders_resting_then() {
        let mut book = PriceBook::default();
        let t0 = Utc::now();
        let early = Resting { since: t0 - chrono::Duration::seconds(20), ..resting(Side::Buy, dec!(100)) };
        let late = Resting { since: t0, ..resting(Side::Buy, dec!(101)) };
        book.insert(&sym(), early);
        book.insert(&sym(), late);
        let tick_at = t0 - chrono::Duration::seconds(10);
        assert_eq!(book.crossed_resting_at(&sym(), dec!(99), Some(tick_at)), vec![early]);
        assert_eq!(book.len(), 1, "the order that started resting after the tick stays");
        assert_eq!(book.crossed_resting_at(&sym(), dec!(99), Some(t0)), vec![late]);
        // Put back (a trigger that did not fill it, a command delivered again) with a later
        // time, an order keeps the one it started resting at; removed, it is forgotten.
        book.insert(&sym(), Resting { since: t0 + chrono::Duration::seconds(5), ..early });
        assert_eq!(book.crossed_resting_at(&sym(), dec!(99), Some(tick_at)), vec![early]);
        book.insert(&sym(), Resting { since: t0 + chrono::Duration::seconds(5), ..early });
        book.remove(early.order_id);
        book.insert(&sym(), Resting { since: t0 + chrono::Duration::seconds(5), ..early });
        assert!(book.crossed_resting_at(&sym(), dec!(99), Some(tick_at)).is_empty());
    }

    proptest! {
        #[test]
        fn crossed_agrees_with_a_linear_scan(limits in prop::collection::vec((any::<bool>(), 1u32..1000), 0..200), price in 1u32..1000) {
            let mut book = PriceBook::default();
            let orders: Vec<Resting> = limits
                .iter()
                .map(|(buy, l)| resting(if *buy { Side::Buy } else { Side::Sell }, Decimal::from(*l)))
                .collect();
            for o in &orders {
                book.insert(&sym(), *o);
            }
            let price = Decimal::from(price);
            let mut got: Vec<Uuid> = book.crossed(&sym(), price).iter().map(|r| r.order_id).collect();
            let mut want: Vec<Uuid> = orders
                .iter()
                .filter(|o| match o.side { Side::Buy => o.limit >= price, Side::Sell => o.limit <= price })
                .map(|o| o.order_id)
                .collect();
            got.sort();
            want.sort();
            prop_assert_eq!(&got, &want);
            prop_assert_eq!(book.len(), orders.len() - want.len());
        }
    }
}
