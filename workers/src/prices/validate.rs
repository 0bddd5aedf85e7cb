//! Tick validation, applied to every source before anything is published.
//!
//! A price is positive by construction ([`Positive`](vault_core::domain::Positive)). On top of
//! that a tick is refused when it is older than the previous accepted tick of its symbol
//! (`out_of_order`: the stream and the engine must see time move forward) or more than
//! [`MAX_JUMP`] away from it (`jump`: a fat finger or a broken feed must not move the market
//! and trigger limit orders). The first tick of a symbol has nothing to compare with and is
//! accepted. A refused tick does not become the reference: the next tick is compared with the
//! last *accepted* one, so a single bad print cannot drag the reference along.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use vault_core::domain::Symbol;

use super::Quote;

/// The largest accepted move from the previous accepted tick of a symbol, as a fraction (20 %).
pub const MAX_JUMP: Decimal = Decimal::from_parts(20, 0, 0, false, 2);

/// Why a tick was refused; `as_str` is the `reason` label of `vault_price_ticks_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// More than [`MAX_JUMP`] away from the previous accepted price.
    Jump,
    /// Stamped before the previous accepted tick.
    OutOfOrder,
    /// Zero or negative. A [`Quote`] cannot hold such a price, so a source refuses it before
    /// validation (the `coinbase` feed, whose prices arrive as text); the reason lives here so
    /// the label names of `vault_price_ticks_rejected_total` are listed in one place.
    NotPositive,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Jump => "jump",
            Rejection::OutOfOrder => "out_of_order",
            Rejection::NotPositive => "not_positive",
        }
    }
}

/// The last accepted tick of every symbol of one source.
#[derive(Debug, Default)]
pub struct Validator {
    last: HashMap<Symbol, (Decimal, DateTime<Utc>)>,
}

impl Validator {
    /// Accepts `quote` (and makes it the reference for its symbol) or says why not.
    pub fn check(&mut self, quote: &Quote) -> Result<(), Rejection> {
        let price = quote.price.get();
        if let Some(&(previous, at)) = self.last.get(&quote.symbol) {
            if quote.ts < at {
                return Err(Rejection::OutOfOrder);
            }
            // `previous` is positive, so the division is defined.
            if ((price - previous) / previous).abs() > MAX_JUMP {
                return Err(Rejection::Jump);
            }
        }
        self.last.insert(quote.symbol.clone(), (price, quote.ts));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;
    use rust_decimal_macros::dec;
    use vault_core::domain::Positive;

    use super::*;

    fn quote(symbol: &str, price: Decimal, ts: DateTime<Utc>) -> Quote {
        Quote { symbol: Symbol::parse(symbol).expect("valid"), price: Positive::new(price).expect("positive"), ts }
    }

    #[test]
    fn the_first_tick_of_a_symbol_is_accepted_whatever_its_price() {
        let mut v = Validator::default();
        let now = Utc::now();
        assert_eq!(v.check(&quote("BTC-USD", dec!(65000), now)), Ok(()));
        assert_eq!(v.check(&quote("DOGE-USD", dec!(0.00001), now)), Ok(()), "each symbol has its own reference");
    }

    #[test]
    fn a_move_of_exactly_20_percent_passes_and_more_is_a_jump() {
        let mut v = Validator::default();
        let t = Utc::now();
        assert_eq!(v.check(&quote("BTC-USD", dec!(100), t)), Ok(()));
        assert_eq!(v.check(&quote("BTC-USD", dec!(120), t)), Ok(()), "+20 % exactly");
        assert_eq!(v.check(&quote("BTC-USD", dec!(96), t)), Ok(()), "-20 % of 120 exactly");
        assert_eq!(v.check(&quote("BTC-USD", dec!(115.21), t)), Err(Rejection::Jump), "+20.01 %");
        assert_eq!(v.check(&quote("BTC-USD", dec!(76.79), t)), Err(Rejection::Jump), "-20.01 %");
    }

    #[test]
    fn a_refused_tick_does_not_become_the_reference() {
        let mut v = Validator::default();
        let t = Utc::now();
        assert_eq!(v.check(&quote("ETH-USD", dec!(100), t)), Ok(()));
        assert_eq!(v.check(&quote("ETH-USD", dec!(1000), t)), Err(Rejection::Jump));
        assert_eq!(v.check(&quote("ETH-USD", dec!(1001), t)), Err(Rejection::Jump), "still compared with 100");
        assert_eq!(v.check(&quote("ETH-USD", dec!(110), t)), Ok(()));
    }

    #[test]
    fn a_tick_older_than_the_last_accepted_one_is_out_of_order_and_equal_times_pass() {
        let mut v = Validator::default();
        let t = Utc::now();
        assert_eq!(v.check(&quote("SOL-USD", dec!(150), t)), Ok(()));
        assert_eq!(v.check(&quote("SOL-USD", dec!(151), t)), Ok(()), "same instant");
        assert_eq!(v.check(&quote("SOL-USD", dec!(152), t - TimeDelta::milliseconds(1))), Err(Rejection::OutOfOrder));
        assert_eq!(v.check(&quote("SOL-USD", dec!(152), t + TimeDelta::seconds(1))), Ok(()));
        // Time is per symbol: another symbol may be behind.
        assert_eq!(v.check(&quote("LTC-USD", dec!(80), t - TimeDelta::hours(1))), Ok(()));
    }
}
