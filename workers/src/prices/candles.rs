//! One-minute candles of the published ticks, batched into the `candles` table.
//!
//! Ticks are folded in memory, one pending candle per (symbol, minute); [`Candles::flush`]
//! writes them all in one upsert statement, so the database sees at most one row write per
//! symbol and minute per flush (the worker flushes every [`FLUSH_EVERY`] and on shutdown).
//! The upsert merges with what is stored (another flush, another worker): high is the greatest,
//! low the least, open the earliest tick's and close the latest tick's by time (the row keeps
//! `open_at` and `close_at` for that), volume the sum. Volume is a tick count: ticks carry no
//! traded size. A failed flush keeps the pending candles and retries them with the next one,
//! so nothing is counted twice (the statement is atomic) and nothing is lost while the process
//! lives.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;
use vault_core::domain::Symbol;

/// How often pending candles are written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// A candle being built from ticks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candle {
    pub open: Decimal,
    pub high: Decimal,
    pub low: Decimal,
    pub close: Decimal,
    /// Ticks in the minute.
    pub volume: Decimal,
    pub open_at: DateTime<Utc>,
    pub close_at: DateTime<Utc>,
}

impl Candle {
    fn new(price: Decimal, at: DateTime<Utc>) -> Candle {
        Candle { open: price, high: price, low: price, close: price, volume: Decimal::ONE, open_at: at, close_at: at }
    }

    /// Folds a tick in, whatever its place in time among the ticks already folded.
    fn add(&mut self, price: Decimal, at: DateTime<Utc>) {
        self.high = self.high.max(price);
        self.low = self.low.min(price);
        if at < self.open_at {
            (self.open, self.open_at) = (price, at);
        }
        if at >= self.close_at {
            (self.close, self.close_at) = (price, at);
        }
        self.volume += Decimal::ONE;
    }
}

/// The first instant of the minute of `at`.
pub fn minute_of(at: DateTime<Utc>) -> DateTime<Utc> {
    // Truncating a valid UTC time to a whole minute cannot overflow.
    at.duration_trunc(TimeDelta::minutes(1)).expect("a UTC time truncates to its minute")
}

/// The candles not written yet.
#[derive(Debug, Default)]
pub struct Candles {
    pending: HashMap<(Symbol, DateTime<Utc>), Candle>,
}

impl Candles {
    /// Folds a published tick into its minute's candle.
    pub fn add(&mut self, symbol: &Symbol, price: Decimal, at: DateTime<Utc>) {
        match self.pending.get_mut(&(symbol.clone(), minute_of(at))) {
            Some(candle) => candle.add(price, at),
            None => {
                self.pending.insert((symbol.clone(), minute_of(at)), Candle::new(price, at));
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Forgets every pending candle (a write given up that may yet commit is not sent again:
    /// its volumes would count twice); returns how many there were.
    pub fn discard(&mut self) -> usize {
        let n = self.pending.len();
        self.pending.clear();
        n
    }

    /// Writes every pending candle in one statement; on failure they stay pending.
    pub async fn flush(&mut self, pool: &PgPool) -> Result<(), sqlx::Error> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let n = self.pending.len();
        let (mut symbols, mut starts) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut opens, mut highs, mut lows, mut closes, mut volumes) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut open_ats, mut close_ats) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for ((symbol, start), c) in &self.pending {
            symbols.push(symbol.to_string());
            starts.push(*start);
            opens.push(c.open);
            highs.push(c.high);
            lows.push(c.low);
            closes.push(c.close);
            volumes.push(c.volume);
            open_ats.push(c.open_at);
            close_ats.push(c.close_at);
        }
        sqlx::query(
            "INSERT INTO candles AS c (symbol, start, open, high, low, close, volume, open_at, close_at)
             SELECT * FROM UNNEST($1::TEXT[], $2::TIMESTAMPTZ[], $3::NUMERIC[], $4::NUMERIC[], $5::NUMERIC[],
                                  $6::NUMERIC[], $7::NUMERIC[], $8::TIMESTAMPTZ[], $9::TIMESTAMPTZ[])
             ON CONFLICT (symbol, start) DO UPDATE SET
                 open     = CASE WHEN EXCLUDED.open_at < c.open_at THEN EXCLUDED.open ELSE c.open END,
                 open_at  = LEAST(c.open_at, EXCLUDED.open_at),
                 high     = GREATEST(c.high, EXCLUDED.high),
                 low      = LEAST(c.low, EXCLUDED.low),
                 close    = CASE WHEN EXCLUDED.close_at >= c.close_at THEN EXCLUDED.close ELSE c.close END,
                 close_at = GREATEST(c.close_at, EXCLUDED.close_at),
                 volume   = c.volume + EXCLUDED.volume",
        )
        .bind(symbols)
        .bind(starts)
        .bind(opens)
        .bind(highs)
        .bind(lows)
        .bind(closes)
        .bind(volumes)
        .bind(open_ats)
        .bind(close_ats)
        .execute(pool)
        .await?;
        self.pending.clear();
        metrics::counter!("vault_candle_flushes_total").increment(1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use rust_decimal_macros::dec;

    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().expect("time")
    }

    #[test]
    fn ticks_fold_into_their_minute_whatever_their_order() {
        let btc = Symbol::parse("BTC-USD").expect("valid");
        let mut candles = Candles::default();
        candles.add(&btc, dec!(100), at("2026-01-02T03:04:10Z"));
        candles.add(&btc, dec!(105), at("2026-01-02T03:04:30Z"));
        candles.add(&btc, dec!(99), at("2026-01-02T03:04:05Z"));
        candles.add(&btc, dec!(101), at("2026-01-02T03:04:59.999Z"));
        candles.add(&btc, dec!(200), at("2026-01-02T03:05:00Z"));
        let minute = candles.pending[&(btc.clone(), at("2026-01-02T03:04:00Z"))].clone();
        assert_eq!(
            minute,
            Candle {
                open: dec!(99),
                high: dec!(105),
                low: dec!(99),
                close: dec!(101),
                volume: dec!(4),
                open_at: at("2026-01-02T03:04:05Z"),
                close_at: at("2026-01-02T03:04:59.999Z"),
            }
        );
        assert_eq!(candles.pending[&(btc, at("2026-01-02T03:05:00Z"))].volume, dec!(1));
    }
}
