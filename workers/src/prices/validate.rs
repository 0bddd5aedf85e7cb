//! Tick validation, applied to every source before anything is published.
//!
//! A price is positive by construction ([`Positive`](vault_core::domain::Positive)). On top of
//! that a tick is refused when it is older than the previous accepted tick of its symbol
//! (`out_of_order`: the stream and the engine must see time move forward) or more than
//! [`MAX_JUMP`] away from it (`jump`: a fat finger or a broken feed must not move the market
//! and trigger limit orders). The first tick of a symbol is compared with the last one on the
//! stream ([`Validator::seed`]); a symbol the stream has never seen has nothing to compare with,
//! and its first tick is accepted. A refused tick does not become the reference: the next tick is compared with the
//! last *accepted* one, so a single bad print cannot drag the reference along.
//!
//! But a market can really move more than that — while its feed was down for hours, or in a
//! crash — and a reference that never moved would then refuse every later tick for good, the
//! market frozen stale until a restart. So a jump is taken once the market *holds* its new
//! level: a run of [`CONFIRM_TICKS`] ticks in a row beyond [`MAX_JUMP`] of the reference, each
//! within [`MAX_JUMP`] of the run's first, spanning at least [`CONFIRM_FOR`] by their own times.
//! The tick that completes the run is accepted and becomes the reference (`Confirmed`:
//! published, and logged); a tick back within [`MAX_JUMP`] of the reference, or one that
//! disagrees with the run, starts over. One bad print, or a burst of them shorter than
//! [`CONFIRM_FOR`], still moves nothing.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use vault_core::domain::Symbol;

use super::Quote;

/// The largest accepted move from the previous accepted tick of a symbol, as a fraction (20 %).
pub const MAX_JUMP: Decimal = Decimal::from_parts(20, 0, 0, false, 2);

/// Ticks in a row at one new level (the last of them accepted) that make it the reference.
pub const CONFIRM_TICKS: usize = 3;
/// How long (by the ticks' own times) a new level must hold before it is taken.
pub const CONFIRM_FOR: chrono::TimeDelta = chrono::TimeDelta::seconds(5);

/// A tick [`Validator::check`] accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Within [`MAX_JUMP`] of the previous accepted tick (or the symbol's first).
    InStep,
    /// A move beyond [`MAX_JUMP`] that held (see the module docs): the new reference.
    Confirmed,
}

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

/// Where one symbol stands: its last accepted tick, and the new level its refused ticks hold.
#[derive(Debug)]
struct Reference {
    price: Decimal,
    at: DateTime<Utc>,
    /// The first refused jump of the current run, and how many in a row agreed with it.
    candidate: Option<(Decimal, DateTime<Utc>, usize)>,
}

/// The last accepted tick of every symbol of one source.
#[derive(Debug, Default)]
pub struct Validator {
    last: HashMap<Symbol, Reference>,
}

/// Whether `price` is more than [`MAX_JUMP`] away from `from` (positive, so the division is
/// defined).
fn jumps(from: Decimal, price: Decimal) -> bool {
    ((price - from) / from).abs() > MAX_JUMP
}

impl Validator {
    /// Makes `price` at `at` the reference of `symbol`, if it has none yet: the last tick an
    /// earlier run published.
    pub fn seed(&mut self, symbol: &Symbol, price: Decimal, at: DateTime<Utc>) {
        self.last.entry(symbol.clone()).or_insert(Reference { price, at, candidate: None });
    }

    /// Accepts `quote` (and makes it the reference for its symbol) or says why not.
    pub fn check(&mut self, quote: &Quote) -> Result<Accepted, Rejection> {
        let (price, ts) = (quote.price.get(), quote.ts);
        let Some(reference) = self.last.get_mut(&quote.symbol) else {
            self.last.insert(quote.symbol.clone(), Reference { price, at: ts, candidate: None });
            return Ok(Accepted::InStep);
        };
        if ts < reference.at {
            return Err(Rejection::OutOfOrder);
        }
        if !jumps(reference.price, price) {
            *reference = Reference { price, at: ts, candidate: None };
            return Ok(Accepted::InStep);
        }
        let (level, since, agreed) = match reference.candidate {
            Some((level, since, agreed)) if !jumps(level, price) => (level, since, agreed + 1),
            _ => (price, ts, 1),
        };
        if agreed >= CONFIRM_TICKS && ts - since >= CONFIRM_FOR {
            *reference = Reference { price, at: ts, candidate: None };
            return Ok(Accepted::Confirmed);
        }
        reference.candidate = Some((level, since, agreed));
        Err(Rejection::Jump)
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
        assert_eq!(v.check(&quote("BTC-USD", dec!(65000), now)), Ok(Accepted::InStep));
        assert_eq!(
            v.check(&quote("DOGE-USD", dec!(0.00001), now)),
            Ok(Accepted::InStep),
            "each symbol has its own reference"
        );
    }

    #[test]
    fn a_move_of_exactly_20_percent_passes_and_more_is_a_jump() {
        let mut v = Validator::default();
        let t = Utc::now();
        assert_eq!(v.check(&quote("BTC-USD", dec!(100), t)), Ok(Accepted::InStep));
        assert_eq!(v.check(&quote("BTC-USD", dec!(120), t)), Ok(Accepted::InStep), "+20 % exactly");
        assert_eq!(v.check(&quote("BTC-USD", dec!(96), t)), Ok(Accepted::InStep), "-20 % of 120 exactly");
        assert_eq!(v.check(&quote("BTC-USD", dec!(115.21), t)), Err(Rejection::Jump), "+20.01 %");
        assert_eq!(v.check(&quote("BTC-USD", dec!(76.79), t)), Err(Rejection::Jump), "-20.01 %");
    }

    #[test]
    fn a_refused_tick_does_not_become_the_reference() {
        let mut v = Validator::default();
        let t = Utc::now();
        assert_eq!(v.check(&quote("ETH-USD", dec!(100), t)), Ok(Accepted::InStep));
        assert_eq!(v.check(&quote("ETH-USD", dec!(1000), t)), Err(Rejection::Jump));
        assert_eq!(v.check(&quote("ETH-USD", dec!(1001), t)), Err(Rejection::Jump), "still compared with 100");
        assert_eq!(v.check(&quote("ETH-USD", dec!(110), t)), Ok(Accepted::InStep));
    }

    #[test]
    fn a_new_level_that_holds_three_ticks_over_five_seconds_becomes_the_reference() {
        let mut v = Validator::default();
        let t = Utc::now();
        let at = |secs| t + TimeDelta::seconds(secs);
        assert_eq!(v.check(&quote("DOGE-USD", dec!(0.10), at(0))), Ok(Accepted::InStep));
        // The market moved 30 % while the feed was away: refused until the level holds.
        assert_eq!(v.check(&quote("DOGE-USD", dec!(0.130), at(100))), Err(Rejection::Jump));
        assert_eq!(v.check(&quote("DOGE-USD", dec!(0.131), at(102))), Err(Rejection::Jump));
        assert_eq!(v.check(&quote("DOGE-USD", dec!(0.129), at(104))), Err(Rejection::Jump), "three ticks, 4 s");
        assert_eq!(v.check(&quote("DOGE-USD", dec!(0.132), at(105))), Ok(Accepted::Confirmed), "four ticks, 5 s");
        assert_eq!(v.check(&quote("DOGE-USD", dec!(0.133), at(106))), Ok(Accepted::InStep), "the new reference");
        assert_eq!(
            v.check(&quote("DOGE-USD", dec!(0.10), at(107))),
            Err(Rejection::Jump),
            "the old level is a jump now"
        );
    }

    #[test]
    fn bad_prints_that_do_not_hold_a_level_never_move_the_reference() {
        let mut v = Validator::default();
        let t = Utc::now();
        let at = |secs| t + TimeDelta::seconds(secs);
        assert_eq!(v.check(&quote("BTC-USD", dec!(100), at(0))), Ok(Accepted::InStep));
        // A burst of one bad level shorter than CONFIRM_FOR, however many ticks.
        for i in 1..=10 {
            assert_eq!(
                v.check(&quote("BTC-USD", dec!(1000), at(1) + TimeDelta::milliseconds(i * 300))),
                Err(Rejection::Jump)
            );
        }
        // Back in step: the run starts over.
        assert_eq!(v.check(&quote("BTC-USD", dec!(101), at(5))), Ok(Accepted::InStep));
        assert_eq!(v.check(&quote("BTC-USD", dec!(1000), at(6))), Err(Rejection::Jump));
        assert_eq!(v.check(&quote("BTC-USD", dec!(1000), at(8))), Err(Rejection::Jump));
        assert_eq!(v.check(&quote("BTC-USD", dec!(1000), at(10))), Err(Rejection::Jump), "three ticks, but 4 s");
        // Prints that jump about without agreeing with each other never confirm, however long.
        assert_eq!(v.check(&quote("ETH-USD", dec!(100), at(0))), Ok(Accepted::InStep));
        for (i, price) in [dec!(10), dec!(500), dec!(10), dec!(500), dec!(10), dec!(500)].into_iter().enumerate() {
            assert_eq!(v.check(&quote("ETH-USD", price, at(20 + 10 * i as i64))), Err(Rejection::Jump), "{price}");
        }
    }

    #[test]
    fn a_tick_older_than_the_last_accepted_one_is_out_of_order_and_equal_times_pass() {
        let mut v = Validator::default();
        let t = Utc::now();
        assert_eq!(v.check(&quote("SOL-USD", dec!(150), t)), Ok(Accepted::InStep));
        assert_eq!(v.check(&quote("SOL-USD", dec!(151), t)), Ok(Accepted::InStep), "same instant");
        assert_eq!(v.check(&quote("SOL-USD", dec!(152), t - TimeDelta::milliseconds(1))), Err(Rejection::OutOfOrder));
        assert_eq!(v.check(&quote("SOL-USD", dec!(152), t + TimeDelta::seconds(1))), Ok(Accepted::InStep));
        // Time is per symbol: another symbol may be behind.
        assert_eq!(v.check(&quote("LTC-USD", dec!(80), t - TimeDelta::hours(1))), Ok(Accepted::InStep));
    }
}
