//! Domain values that cannot hold an invalid value: parse at the edge, trust inside.
//!
//! Money is `rust_decimal::Decimal` everywhere (28 significant digits, exact); on the wire it is
//! a string (`"0.015"`). JSON numbers are accepted on input and converted through their
//! shortest decimal form, so `0.1` arrives as exactly `0.1`; clients should still send strings.
//!
//! Rounding rules, stated once:
//! - prices and quantities are never rounded: they must be multiples of the market's increments
//!   or the order is refused;
//! - notional = price × quantity, exact;
//! - fee = notional × taker fee rate, rounded **up** (away from zero) to [`MONEY_SCALE`]
//!   decimal places, so rounding never favours the user against the ledger.

use std::fmt;
use std::str::FromStr;

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

/// Decimal places kept for every balance, fee and ledger amount.
pub const MONEY_SCALE: u32 = 8;

/// An asset code: 2 to 10 upper-case letters or digits (`USD`, `BTC`, `DOGE`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Asset(String);

impl Asset {
    pub fn parse(s: &str) -> Result<Asset, String> {
        let ok = (2..=10).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
        if ok { Ok(Asset(s.to_owned())) } else { Err(format!("{s:?} is not an asset code (e.g. USD, BTC)")) }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The quote asset of every seeded market.
    pub fn usd() -> Asset {
        Asset("USD".to_owned())
    }
}

impl TryFrom<String> for Asset {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Asset::parse(&s)
    }
}

impl From<Asset> for String {
    fn from(a: Asset) -> String {
        a.0
    }
}

impl fmt::Display for Asset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A market symbol `BASE-QUOTE` (`BTC-USD`). Whether the market exists is a separate question.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Symbol {
    base: Asset,
    quote: Asset,
}

impl Symbol {
    pub fn parse(s: &str) -> Result<Symbol, String> {
        let bad = || format!("{s:?} is not a market symbol (e.g. BTC-USD)");
        let (base, quote) = s.split_once('-').ok_or_else(bad)?;
        Ok(Symbol { base: Asset::parse(base).map_err(|_| bad())?, quote: Asset::parse(quote).map_err(|_| bad())? })
    }
    pub fn base(&self) -> &Asset {
        &self.base
    }
    pub fn quote(&self) -> &Asset {
        &self.quote
    }
}

impl FromStr for Symbol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Symbol::parse(s)
    }
}

impl TryFrom<String> for Symbol {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Symbol::parse(&s)
    }
}

impl From<Symbol> for String {
    fn from(s: Symbol) -> String {
        s.to_string()
    }
}

impl fmt::Display for Symbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.base, self.quote)
    }
}

/// A strictly positive decimal: a quantity or a price.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "Decimal", into = "Decimal")]
pub struct Positive(Decimal);

impl Positive {
    pub fn new(d: Decimal) -> Result<Positive, String> {
        if d > Decimal::ZERO { Ok(Positive(d.normalize())) } else { Err("must be greater than zero".to_owned()) }
    }
    pub fn get(self) -> Decimal {
        self.0
    }
}

impl TryFrom<Decimal> for Positive {
    type Error = String;
    fn try_from(d: Decimal) -> Result<Self, String> {
        Positive::new(d)
    }
}

impl From<Positive> for Decimal {
    fn from(p: Positive) -> Decimal {
        p.0
    }
}

impl fmt::Display for Positive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An order quantity, in the base asset.
pub type Quantity = Positive;
/// A price, in the quote asset per unit of the base asset.
pub type Price = Positive;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Buy,
    Sell,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderType {
    Market,
    Limit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeInForce {
    /// Good till canceled: rests until it fills or is canceled.
    Gtc,
    /// Immediate or cancel: what cannot fill at once expires.
    Ioc,
    /// Fill or kill: fills completely at once or expires.
    Fok,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MarketStatus {
    Trading,
    Halted,
}

/// A market's trading rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Market {
    pub symbol: Symbol,
    pub status: MarketStatus,
    pub price_increment: Decimal,
    pub quantity_increment: Decimal,
    pub min_notional: Decimal,
    pub taker_fee_rate: Decimal,
}

impl Market {
    /// `Err` naming the rule when `quantity` is not a multiple of the increment.
    pub fn check_quantity(&self, quantity: Quantity) -> Result<(), String> {
        if (quantity.get() % self.quantity_increment).is_zero() {
            Ok(())
        } else {
            Err(format!("must be a multiple of {}", self.quantity_increment.normalize()))
        }
    }

    pub fn check_price(&self, price: Price) -> Result<(), String> {
        if (price.get() % self.price_increment).is_zero() {
            Ok(())
        } else {
            Err(format!("must be a multiple of {}", self.price_increment.normalize()))
        }
    }

    /// The fee for a fill of `notional`, rounded up to [`MONEY_SCALE`] places.
    pub fn fee(&self, notional: Decimal) -> Decimal {
        round_up(notional * self.taker_fee_rate)
    }
}

/// Rounds away from zero to [`MONEY_SCALE`] places.
pub fn round_up(d: Decimal) -> Decimal {
    d.round_dp_with_strategy(MONEY_SCALE, RoundingStrategy::AwayFromZero).normalize()
}

#[cfg(test)]
mod tests {
    use rust_decimal_macros::dec;

    use super::*;

    fn btc() -> Market {
        Market {
            symbol: Symbol::parse("BTC-USD").expect("valid"),
            status: MarketStatus::Trading,
            price_increment: dec!(0.01),
            quantity_increment: dec!(0.00001),
            min_notional: dec!(1),
            taker_fee_rate: dec!(0.001),
        }
    }

    #[test]
    fn symbols_and_assets_parse_strictly() {
        let s = Symbol::parse("BTC-USD").expect("valid");
        assert_eq!((s.base().as_str(), s.quote().as_str(), s.to_string().as_str()), ("BTC", "USD", "BTC-USD"));
        for bad in ["btc-usd", "BTCUSD", "BTC-", "-USD", "B-USD", "BTC-USD-X", "BTC USD"] {
            assert!(Symbol::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(serde_json::to_string(&s).expect("json"), "\"BTC-USD\"");
    }

    #[test]
    fn positives_are_strings_on_the_wire_and_accept_numbers() {
        let p: Positive = serde_json::from_str("\"0.015\"").expect("string");
        assert_eq!(serde_json::to_string(&p).expect("json"), "\"0.015\"");
        let n: Positive = serde_json::from_str("0.1").expect("number");
        assert_eq!(n.get(), dec!(0.1), "a JSON number arrives exactly");
        assert!(serde_json::from_str::<Positive>("\"0\"").is_err());
        assert!(serde_json::from_str::<Positive>("\"-1\"").is_err());
        assert!(serde_json::from_str::<Positive>("\"abc\"").is_err());
    }

    #[test]
    fn increments_and_fees_follow_the_stated_rounding() {
        let m = btc();
        assert!(m.check_quantity(Positive::new(dec!(0.00150)).expect("pos")).is_ok());
        assert!(m.check_quantity(Positive::new(dec!(0.000015)).expect("pos")).is_err());
        assert!(m.check_price(Positive::new(dec!(50000.01)).expect("pos")).is_ok());
        assert!(m.check_price(Positive::new(dec!(50000.001)).expect("pos")).is_err());
        // 0.1% of 0.00001 BTC × 50000.01 = 0.0005000001 → rounded up to 8 places.
        assert_eq!(m.fee(dec!(0.5000001)), dec!(0.00050001));
        assert_eq!(m.fee(dec!(100)), dec!(0.1));
    }
}
