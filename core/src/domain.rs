//! Domain values that cannot hold an invalid value: parse at the edge, trust inside.
//!
//! Money is `rust_decimal::Decimal` everywhere (28 significant digits, exact); on the wire it is
//! a string (`"0.015"`). JSON numbers are accepted on input and converted through their
//! shortest decimal form, so `0.1` arrives as exactly `0.1`; clients should still send strings
//! (a number with more digits than a double holds is rounded by JSON parsing itself, before
//! this code sees it).
//!
//! Decimals from the wire go through [`parse_decimal`] ([`WireDecimal`]), which is exact or
//! refuses: `Decimal`'s own parser silently rounds digits beyond its precision
//! (`"0.1000000000000000000000000000001"` becomes `0.1`) and accepts `1_000`; a price or
//! quantity that is not what the client sent must be an error, never a different number.
//!
//! Rounding rules, stated once:
//! - prices and quantities are never rounded: they must be multiples of the market's increments
//!   or the order is refused;
//! - notional = price × quantity, exact;
//! - fee = notional × taker fee rate, rounded **up** (away from zero) to [`MONEY_SCALE`]
//!   decimal places, so rounding never favours the user against the ledger;
//! - the cost basis left after a partial sell (cost × what is left ÷ what was held) and the
//!   shown `avg_cost` and `market_value` are rounded half-even to [`MONEY_SCALE`] places: they
//!   are reports, never amounts the ledger moves.

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

/// The longest decimal text [`parse_decimal`] reads (a bound on the work one value can cause;
/// `Decimal` itself has at most 29 significant digits).
pub const MAX_DECIMAL_TEXT: usize = 100;

/// Parses a decimal exactly: `[+-]digits[.digits][(e|E)[+-]digits]` in ASCII (`"0.015"`,
/// `"-2"`, `".5"`, `"1.5e3"`). Refuses, with a message a client can act on, anything else
/// (whitespace, `_`, non-ASCII digits, `NaN`), anything longer than [`MAX_DECIMAL_TEXT`], and
/// any value `Decimal` cannot hold *exactly* (over 96 bits of digits, or more than 28 decimal
/// places after removing trailing zeros): never rounded, never a panic.
pub fn parse_decimal(text: &str) -> Result<Decimal, String> {
    const PLACES: i64 = 28;
    if text.len() > MAX_DECIMAL_TEXT {
        return Err(format!("is longer than {MAX_DECIMAL_TEXT} characters"));
    }
    let malformed = || format!("{text:?} is not a decimal number (e.g. \"0.015\")");
    let bytes = text.as_bytes();
    let (negative, rest) = match bytes.first() {
        Some(b'-') => (true, &bytes[1..]),
        Some(b'+') => (false, &bytes[1..]),
        _ => (false, bytes),
    };
    let (mantissa, exponent) = match rest.iter().position(|b| matches!(b, b'e' | b'E')) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let (whole, fraction) = match mantissa.iter().position(|&b| b == b'.') {
        Some(i) => (&mantissa[..i], &mantissa[i + 1..]),
        None => (mantissa, &mantissa[mantissa.len()..]),
    };
    let all_digits = |part: &[u8]| part.iter().all(u8::is_ascii_digit);
    if whole.len() + fraction.len() == 0 || !all_digits(whole) || !all_digits(fraction) {
        return Err(malformed());
    }
    let exponent: i64 = match exponent {
        None => 0,
        Some(e) => {
            let (sign, digits) = match e.first() {
                Some(b'-') => (-1, &e[1..]),
                Some(b'+') => (1, &e[1..]),
                _ => (1, e),
            };
            if digits.is_empty() || !all_digits(digits) {
                return Err(malformed());
            }
            // At most MAX_DECIMAL_TEXT digits of mantissa: any exponent beyond this range
            // leaves the value out of `Decimal`'s range either way.
            let magnitude = std::str::from_utf8(digits).ok().and_then(|d| d.parse::<i64>().ok());
            match magnitude {
                Some(m) if m <= 1_000 => sign * m,
                _ => return Err("is out of range".to_owned()),
            }
        }
    };
    // The value is 0.D × 10^point, D the significant digits (no leading or trailing zeros).
    let digits: Vec<u8> = whole.iter().chain(fraction).map(|b| b - b'0').collect();
    let mut point = whole.len() as i64 + exponent;
    let leading = digits.iter().take_while(|&&d| d == 0).count();
    let significant = &digits[leading..];
    point -= leading as i64;
    let trailing = significant.iter().rev().take_while(|&&d| d == 0).count();
    let significant = &significant[..significant.len() - trailing];
    if significant.is_empty() {
        return Ok(Decimal::ZERO);
    }
    if significant.len() > 29 {
        return Err("has more significant digits than 29; it would be rounded".to_owned());
    }
    let mut mantissa: i128 = significant.iter().fold(0, |acc, &d| acc * 10 + i128::from(d));
    let mut scale = significant.len() as i64 - point;
    if scale > PLACES {
        return Err(format!("has more than {PLACES} decimal places; it would be rounded"));
    }
    if scale < 0 {
        // A whole number with trailing zeros: scale the mantissa up instead.
        let factor = u32::try_from(-scale).ok().and_then(|e| 10i128.checked_pow(e));
        mantissa = factor.and_then(|f| mantissa.checked_mul(f)).ok_or_else(|| "is out of range".to_owned())?;
        scale = 0;
    }
    if negative {
        mantissa = -mantissa;
    }
    let scale = u32::try_from(scale).map_err(|_| "is out of range".to_owned())?;
    Decimal::try_from_i128_with_scale(mantissa, scale).map_err(|_| "is out of range".to_owned())
}

/// A decimal as a client or a message sends it: a JSON string through [`parse_decimal`], or a
/// JSON number through its shortest decimal form (then the same checks). Serializes as the
/// string of its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(into = "Decimal")]
pub struct WireDecimal(pub Decimal);

impl WireDecimal {
    pub fn get(self) -> Decimal {
        self.0
    }
}

impl From<WireDecimal> for Decimal {
    fn from(d: WireDecimal) -> Decimal {
        d.0
    }
}

impl<'de> Deserialize<'de> for WireDecimal {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = WireDecimal;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a decimal number as a string (e.g. \"0.015\") or a JSON number")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<WireDecimal, E> {
                parse_decimal(v).map(WireDecimal).map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<WireDecimal, E> {
                Ok(WireDecimal(Decimal::from(v)))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<WireDecimal, E> {
                Ok(WireDecimal(Decimal::from(v)))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<WireDecimal, E> {
                if !v.is_finite() {
                    return Err(E::custom("is not a finite number"));
                }
                // `Display` of an f64 is its shortest round-trip form, without an exponent.
                let text = v.to_string();
                if text.len() > MAX_DECIMAL_TEXT {
                    return Err(E::custom("is out of range"));
                }
                parse_decimal(&text).map(WireDecimal).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A strictly positive decimal: a quantity or a price.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "WireDecimal", into = "Decimal")]
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

impl TryFrom<WireDecimal> for Positive {
    type Error = String;
    fn try_from(d: WireDecimal) -> Result<Self, String> {
        Positive::new(d.0)
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

    /// The fee for a fill of `notional`, rounded up to [`MONEY_SCALE`] places; `None` when it
    /// cannot be computed in a `Decimal`.
    pub fn checked_fee(&self, notional: Decimal) -> Option<Decimal> {
        notional.checked_mul(self.taker_fee_rate).map(round_up)
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
    fn decimals_from_the_wire_are_exact_or_refused() {
        for (text, value) in [
            ("0.015", dec!(0.015)),
            ("50000.00", dec!(50000)),
            ("-2", dec!(-2)),
            ("+1.5", dec!(1.5)),
            (".5", dec!(0.5)),
            ("1.", dec!(1)),
            ("1.5e3", dec!(1500)),
            ("15E-4", dec!(0.0015)),
            ("000000000000000000000000000000000000000001", dec!(1)),
            ("0.1000000000000000000000000000000000", dec!(0.1)),
            ("79228162514264337593543950335", Decimal::MAX),
        ] {
            assert_eq!(parse_decimal(text), Ok(value), "{text}");
        }
        for text in [
            "",
            " 1",
            "1 ",
            "1_000",
            "１",
            "٣",
            "NaN",
            "inf",
            "0x10",
            "1e",
            "e5",
            ".",
            "-",
            "+-1",
            "1.2.3",
            "1e5.5",
            // What `Decimal::from_str` would round instead of refusing:
            "0.1000000000000000000000000000001",
            "0.00000000000000000000000000001",
            "79228162514264337593543950336",
            "1e29",
            "1e99999999999999999999",
        ] {
            assert!(parse_decimal(text).is_err(), "{text:?} accepted");
        }
        assert!(parse_decimal(&"1".repeat(MAX_DECIMAL_TEXT + 1)).is_err());
        let err = serde_json::from_str::<Positive>("\"0.0150000000000000000000000000001\"").expect_err("rounded");
        assert!(err.to_string().contains("rounded"), "{err}");
        assert!(serde_json::from_str::<Positive>("1e-30").is_err(), "a tiny number is refused, not made 0");
        assert!(serde_json::from_str::<WireDecimal>("1e400").is_err());
    }

    #[test]
    fn increments_and_fees_follow_the_stated_rounding() {
        let m = btc();
        assert!(m.check_quantity(Positive::new(dec!(0.00150)).expect("pos")).is_ok());
        assert!(m.check_quantity(Positive::new(dec!(0.000015)).expect("pos")).is_err());
        assert!(m.check_price(Positive::new(dec!(50000.01)).expect("pos")).is_ok());
        assert!(m.check_price(Positive::new(dec!(50000.001)).expect("pos")).is_err());
        // 0.1% of 0.00001 BTC × 50000.01 = 0.0005000001 → rounded up to 8 places.
        assert_eq!(m.checked_fee(dec!(0.5000001)), Some(dec!(0.00050001)));
        assert_eq!(m.checked_fee(dec!(100)), Some(dec!(0.1)));
    }

    mod props {
        use proptest::prelude::*;

        use super::*;

        /// Any `Decimal` (every mantissa of 96 bits, every scale).
        fn decimal() -> impl Strategy<Value = Decimal> {
            (any::<i128>(), 0u32..=28).prop_map(|(m, scale)| {
                let m = m % (1i128 << 96);
                Decimal::try_from_i128_with_scale(m, scale).expect("a 96-bit mantissa fits")
            })
        }

        /// `digits[.digits]` with leading zeros stripped and trailing fraction zeros dropped:
        /// what an exact parse must print back.
        fn canonical(whole: &str, fraction: &str) -> String {
            let whole = whole.trim_start_matches('0');
            let fraction = fraction.trim_end_matches('0');
            match (whole.is_empty(), fraction.is_empty()) {
                (true, true) => "0".to_owned(),
                (true, false) => format!("0.{fraction}"),
                (false, true) => whole.to_owned(),
                (false, false) => format!("{whole}.{fraction}"),
            }
        }

        proptest! {
            #[test]
            fn any_text_is_parsed_or_refused_without_panicking(text in "\\PC{0,120}") {
                if let Ok(d) = parse_decimal(&text) {
                    // What parses is plain ASCII number syntax.
                    prop_assert!(text.bytes().all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b)), "{text:?}");
                    prop_assert_eq!(parse_decimal(&d.to_string()), Ok(d));
                }
            }

            #[test]
            fn number_like_text_is_parsed_or_refused_without_panicking(
                text in "[+-]?[0-9]{0,60}(\\.[0-9]{0,60})?([eE][+-]?[0-9]{0,25})?",
            ) {
                let _ = parse_decimal(&text);
            }

            #[test]
            fn every_decimal_round_trips_exactly_in_plain_and_scientific_form(d in decimal()) {
                prop_assert_eq!(parse_decimal(&d.to_string()), Ok(d));
                prop_assert_eq!(parse_decimal(&format!("{d:e}")), Ok(d));
                prop_assert_eq!(parse_decimal(&format!("{d:E}")), Ok(d));
                let json = serde_json::to_string(&d.to_string()).expect("json");
                prop_assert_eq!(serde_json::from_str::<WireDecimal>(&json).map(WireDecimal::get).ok(), Some(d));
            }

            #[test]
            fn long_digit_strings_are_exact_or_refused_never_rounded(
                whole in "[0-9]{0,45}",
                fraction in "[0-9]{0,45}",
                negative in any::<bool>(),
            ) {
                prop_assume!(!(whole.is_empty() && fraction.is_empty()));
                let text = format!("{}{whole}.{fraction}", if negative { "-" } else { "" });
                let expected = canonical(&whole, &fraction);
                match parse_decimal(&text) {
                    Ok(d) => {
                        prop_assert_eq!(d.abs().normalize().to_string(), expected.clone(), "{}", text);
                        prop_assert_eq!(d.is_sign_negative() && !d.is_zero(), negative && expected != "0");
                    }
                    Err(reason) => {
                        // Refused only for the two honest reasons: too many digits or too big.
                        let digits = expected.replace('.', "").trim_start_matches('0').len();
                        let places = expected.split_once('.').map_or(0, |(_, f)| f.len());
                        prop_assert!(digits > 28 || places > 28, "{text} refused: {reason}");
                    }
                }
            }

            #[test]
            fn an_exponent_moves_the_point_or_is_refused(mantissa in 1i64..1_000_000, exponent in -40i32..40) {
                let text = format!("{mantissa}e{exponent}");
                let (mut m, mut e) = (mantissa, exponent);
                while m % 10 == 0 {
                    m /= 10;
                    e += 1;
                }
                let expected = if e >= 0 {
                    (0..e).try_fold(Decimal::from(m), |acc, _| acc.checked_mul(Decimal::TEN))
                } else {
                    Decimal::try_from_i128_with_scale(i128::from(m), e.unsigned_abs()).ok()
                };
                match (parse_decimal(&text), expected) {
                    (Ok(d), Some(e)) => prop_assert_eq!(d, e),
                    (Err(_), None) => {}
                    (got, want) => prop_assert!(false, "{text}: got {got:?}, want {want:?}"),
                }
            }

            #[test]
            fn whitespace_underscores_and_unicode_digits_are_refused(
                d in decimal(),
                at in any::<prop::sample::Index>(),
                junk in prop::sample::select(vec![" ", "\t", "\n", "_", "\u{a0}", "١", "０", "٫", ",", "\u{200b}"]),
            ) {
                let text = d.to_string();
                let i = at.index(text.len() + 1);
                let spoiled = format!("{}{junk}{}", &text[..i], &text[i..]);
                prop_assert!(parse_decimal(&spoiled).is_err(), "{spoiled:?}");
            }

            #[test]
            fn json_numbers_are_exact_or_refused(v in any::<f64>()) {
                let json = serde_json::to_string(&v).unwrap_or_else(|_| "null".to_owned());
                if let Ok(WireDecimal(d)) = serde_json::from_str::<WireDecimal>(&json) {
                    // The decimal is the number's shortest form: nothing was lost (serde_json's
                    // float_roundtrip parses the number back to exactly `v`).
                    prop_assert_eq!(d.to_string().parse::<f64>().ok(), Some(v));
                }
            }

            #[test]
            fn signs_apply_to_the_whole_value(d in decimal()) {
                let text = d.abs().to_string();
                prop_assert_eq!(parse_decimal(&format!("-{text}")), Ok(-d.abs()));
                prop_assert_eq!(parse_decimal(&format!("+{text}")), Ok(d.abs()));
                let doubled = format!("--{text}");
                prop_assert!(parse_decimal(&doubled).is_err(), "{doubled}");
            }
        }
    }
}
