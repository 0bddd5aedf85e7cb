//! The price book: every resting limit order of the engine's users, per symbol, ordered by
//! limit, so a tick finds the orders it crosses in O(log n + k).
//!
//! It lives at engine level, not in the actors, so it survives actor passivation; at start it is
//! rebuilt from the open orders in the database. It only *finds* candidates: the user's actor
//! decides whether the order still fills. An order taken out by [`PriceBook::crossed`] is put
//! back by its actor when it is still open after the trigger (e.g. the fill could not commit).

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};

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
}

#[derive(Debug, Default)]
struct SymbolBook {
    /// Buys fill when price ≤ limit: highest limit first.
    buys: BTreeMap<(Reverse<Decimal>, Uuid), Uuid>,
    /// Sells fill when price ≥ limit: lowest limit first.
    sells: BTreeMap<(Decimal, Uuid), Uuid>,
}

/// All resting orders, by symbol.
#[derive(Debug, Default)]
pub struct PriceBook {
    books: HashMap<Symbol, SymbolBook>,
    /// order id → (symbol, side, limit), to remove an order without knowing its place.
    index: HashMap<Uuid, (Symbol, Side, Decimal)>,
}

impl PriceBook {
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Adds (or re-adds) a resting order.
    pub fn insert(&mut self, symbol: &Symbol, order: Resting) {
        self.remove(order.order_id);
        let book = self.books.entry(symbol.clone()).or_default();
        match order.side {
            Side::Buy => book.buys.insert((Reverse(order.limit), order.order_id), order.user_id),
            Side::Sell => book.sells.insert((order.limit, order.order_id), order.user_id),
        };
        self.index.insert(order.order_id, (symbol.clone(), order.side, order.limit));
    }

    /// Removes an order (filled or canceled); unknown ids are ignored.
    pub fn remove(&mut self, order_id: Uuid) {
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
        let Some(book) = self.books.get_mut(symbol) else { return Vec::new() };
        let mut out = Vec::new();
        while let Some(entry) = book.buys.first_entry() {
            let (Reverse(limit), order_id) = *entry.key();
            if limit < price {
                break;
            }
            let user_id = entry.remove();
            out.push(Resting { order_id, user_id, side: Side::Buy, limit });
        }
        while let Some(entry) = book.sells.first_entry() {
            let (limit, order_id) = *entry.key();
            if limit > price {
                break;
            }
            let user_id = entry.remove();
            out.push(Resting { order_id, user_id, side: Side::Sell, limit });
        }
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
        Resting { order_id: Uuid::now_v7(), user_id: Uuid::now_v7(), side, limit }
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
