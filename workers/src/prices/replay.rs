//! The `replay:<csv>` source: a recorded file of ticks played back at its recorded pace.
//!
//! Format: one tick per line, `timestamp,symbol,price` — an RFC 3339 timestamp, a market symbol
//! and a positive decimal, read exactly (refused with an underscore or digits past 28 places). A
//! first line `timestamp,symbol,price` is a header; blank lines are ignored. The whole file is
//! read and checked before anything is published — every symbol a listed market and every price
//! a multiple of its market's price increment (a replay is a recording of real prices; it is
//! never rounded into one) — so a malformed line is a startup error naming its line number,
//! never a half-played file.
//!
//! Pace: the worker waits the gap between consecutive recorded timestamps (lines with the same
//! timestamp go out as one batch; a timestamp earlier than the previous line's is played
//! without waiting). Each tick is stamped with the time it is *published*, not the recorded
//! one: the engine refuses prices older than `MAX_PRICE_AGE`, and a replay of last year's file
//! must still be a live market to it. At the end of the file the source is exhausted and the
//! worker stays up, idle, until it is stopped.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use vault_core::domain::{Positive, Symbol, parse_decimal};

use super::{PriceSource, Quote};

/// One recorded tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// Its line in the file (1-based).
    pub line: usize,
    pub at: DateTime<Utc>,
    pub symbol: Symbol,
    pub price: Positive,
}

/// Parses a whole file; the error names the first bad line (1-based) and what is wrong with it.
pub fn parse(text: &str) -> Result<Vec<Recorded>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || (n == 1 && line.eq_ignore_ascii_case("timestamp,symbol,price")) {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [at, symbol, price] = fields[..] else {
            return Err(format!("line {n}: expected `timestamp,symbol,price`, found {} fields", fields.len()));
        };
        let at = DateTime::parse_from_rfc3339(at)
            .map_err(|e| format!("line {n}: timestamp {at:?} is not RFC 3339 ({e})"))?
            .with_timezone(&Utc);
        let symbol = Symbol::parse(symbol).map_err(|e| format!("line {n}: {e}"))?;
        let price = parse_decimal(price)
            .map_err(|e| format!("line {n}: price {price:?} is not a decimal ({e})"))
            .and_then(|d| Positive::new(d).map_err(|e| format!("line {n}: price {price:?} {e}")))?;
        out.push(Recorded { line: n, at, symbol, price });
    }
    Ok(out)
}

/// The replay source over a parsed file.
#[derive(Debug)]
pub struct Replay {
    ticks: std::vec::IntoIter<Recorded>,
    /// The next tick, taken from `ticks` but not yet played.
    next: Option<Recorded>,
    /// The recorded time of the previous batch, to wait the gap to the next one.
    previous: Option<DateTime<Utc>>,
    /// When the next batch is due, once its wait has begun: a wait interrupted by cancellation
    /// resumes towards the same instant instead of starting the gap again.
    due: Option<tokio::time::Instant>,
}

impl Replay {
    pub fn new(ticks: Vec<Recorded>) -> Replay {
        let mut ticks = ticks.into_iter();
        let next = ticks.next();
        Replay { ticks, next, previous: None, due: None }
    }

    /// Reads and checks `path` (relative to the working directory).
    pub fn load(path: &str) -> anyhow::Result<Replay> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the replay file {path}"))?;
        let ticks = parse(&text).map_err(|e| anyhow::anyhow!("replay file {path}: {e}"))?;
        Ok(Replay::new(ticks))
    }

    /// Checks every tick against the listed markets' price increments (by symbol); the error
    /// names the first line whose symbol is not listed or whose price is off its increment.
    pub fn check_markets(&self, increments: &HashMap<Symbol, Decimal>) -> Result<(), String> {
        for tick in self.next.iter().chain(self.ticks.as_slice()) {
            let Some(increment) = increments.get(&tick.symbol) else {
                return Err(format!("line {}: {} is not a listed market", tick.line, tick.symbol));
            };
            if !(tick.price.get() % increment).is_zero() {
                return Err(format!(
                    "line {}: price {} is not a multiple of {}'s price increment {increment}",
                    tick.line,
                    tick.price.get(),
                    tick.symbol
                ));
            }
        }
        Ok(())
    }

    /// How many ticks are left to play.
    pub fn remaining(&self) -> usize {
        self.ticks.len() + usize::from(self.next.is_some())
    }
}

impl PriceSource for Replay {
    fn name(&self) -> &'static str {
        "replay"
    }

    /// Cancel-safe: the only await is the wait, before anything is taken from the file.
    async fn next_batch(&mut self) -> Option<Vec<Quote>> {
        let at = self.next.as_ref()?.at;
        if let Some(previous) = self.previous {
            // A negative gap (a timestamp going back) is played at once.
            let gap = (at - previous).to_std().unwrap_or(Duration::ZERO);
            let due = *self.due.get_or_insert_with(|| tokio::time::Instant::now() + gap);
            tokio::time::sleep_until(due).await;
        }
        self.due = None;
        let first = self.next.take()?;
        // The clock of the file only goes forward: after a line that goes back, the next ones
        // are timed from the latest time seen (timed from the earlier one, a line an hour back
        // held the rest of the file, every market stale, for that hour).
        self.previous = Some(self.previous.map_or(first.at, |previous| previous.max(first.at)));
        let now = Utc::now();
        let mut batch = vec![Quote { symbol: first.symbol, price: first.price, ts: now }];
        for tick in self.ticks.by_ref() {
            if tick.at != at {
                self.next = Some(tick);
                break;
            }
            batch.push(Quote { symbol: tick.symbol, price: tick.price, ts: now });
        }
        Some(batch)
    }
}

#[cfg(test)]
mod tests {
    use rust_decimal_macros::dec;

    use super::*;

    #[test]
    fn a_file_with_a_header_and_blank_lines_parses_in_order() {
        let ticks = parse(
            "timestamp,symbol,price\n2026-01-02T03:04:05Z,BTC-USD,65000.10\n\n 2026-01-02T04:04:05.5+01:00 , ETH-USD , 3200\n",
        )
        .expect("valid");
        assert_eq!(ticks.len(), 2);
        assert_eq!(ticks[0].symbol.to_string(), "BTC-USD");
        assert_eq!(ticks[0].price.get(), dec!(65000.1));
        assert_eq!(ticks[1].at, "2026-01-02T03:04:05.5Z".parse::<DateTime<Utc>>().expect("time"));
    }

    #[test]
    fn a_malformed_line_is_refused_naming_its_number() {
        for (text, needle) in [
            ("2026-01-02T03:04:05Z,BTC-USD\n", "line 1: expected"),
            ("timestamp,symbol,price\n\n2026-01-02 03:04,BTC-USD,1\n", "line 3: timestamp"),
            ("2026-01-02T03:04:05Z,BTC-USD,1\n2026-01-02T03:04:06Z,btc,1\n", "line 2: \"btc\" is not a market symbol"),
            ("2026-01-02T03:04:05Z,BTC-USD,abc\n", "line 1: price \"abc\" is not a decimal"),
            ("2026-01-02T03:04:05Z,BTC-USD,0\n", "line 1: price \"0\" must be greater than zero"),
            ("2026-01-02T03:04:05Z,BTC-USD,1,2\n", "line 1: expected"),
            ("2026-01-02T03:04:05Z,BTC-USD,1\ntimestamp,symbol,price\n", "line 2: timestamp"),
            ("2026-01-02T03:04:05Z,BTC-USD,65_000\n", "line 1: price \"65_000\" is not a decimal"),
            ("2026-01-02T03:04:05Z,BTC-USD,1.00000000000000000000000000001\n", "line 1: price"),
        ] {
            let err = parse(text).expect_err(text);
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn ticks_of_unlisted_markets_or_off_their_increment_are_refused_naming_the_line() {
        let increments: HashMap<Symbol, Decimal> =
            [(Symbol::parse("BTC-USD").expect("symbol"), dec!(0.01))].into_iter().collect();
        let file = |text: &str| Replay::new(parse(text).expect("parses"));
        assert_eq!(file("2026-01-02T03:04:05Z,BTC-USD,65000.12\n").check_markets(&increments), Ok(()));
        let off = file("2026-01-02T03:04:05Z,BTC-USD,65000.12\n2026-01-02T03:04:06Z,BTC-USD,65000.123456789\n");
        let err = off.check_markets(&increments).expect_err("off the increment");
        assert!(err.starts_with("line 2: price 65000.123456789 is not a multiple"), "{err}");
        let unlisted = file("2026-01-02T03:04:05Z,DOGE-USD,0.1\n");
        assert_eq!(unlisted.check_markets(&increments), Err("line 1: DOGE-USD is not a listed market".to_owned()));
    }

    #[tokio::test]
    async fn ticks_are_played_at_the_recorded_pace_stamped_when_published() {
        let text = "2026-01-02T03:04:05Z,BTC-USD,1\n2026-01-02T03:04:05Z,ETH-USD,2\n2026-01-02T03:04:05.3Z,BTC-USD,3\n";
        let mut replay = Replay::new(parse(text).expect("valid"));
        let before = Utc::now();
        let first = replay.next_batch().await.expect("a batch");
        assert_eq!(first.len(), 2, "same recorded instant, one batch");
        assert!(first.iter().all(|q| q.ts >= before), "stamped with the publish time, not 2026-01-02");
        let started = std::time::Instant::now();
        let second = replay.next_batch().await.expect("a batch");
        assert_eq!(second[0].price.get(), dec!(3));
        assert!(started.elapsed() >= Duration::from_millis(300), "the recorded gap is waited");
        assert!(second[0].ts - first[0].ts >= chrono::TimeDelta::milliseconds(300));
        assert_eq!(replay.remaining(), 0);
        assert_eq!(replay.next_batch().await, None, "exhausted at the end of the file");
    }

    #[tokio::test]
    async fn an_interrupted_wait_loses_no_tick_and_does_not_start_the_gap_again() {
        let text = "2026-01-02T03:04:05Z,BTC-USD,1\n2026-01-02T03:04:05.4Z,BTC-USD,2\n";
        let mut replay = Replay::new(parse(text).expect("valid"));
        replay.next_batch().await.expect("the first batch");
        let started = std::time::Instant::now();
        let mut due = None;
        for _ in 0..3 {
            // The worker drops `next_batch` whenever one of its timers fires first.
            let interrupted = tokio::time::timeout(Duration::from_millis(50), replay.next_batch()).await;
            assert!(interrupted.is_err(), "not due yet");
            // The gap is counted once, from the first wait: every later one keeps its due time
            // (checked on the due time itself, not on the wall clock a loaded machine stretches).
            let now_due = replay.due.expect("an interrupted wait keeps its due time");
            assert_eq!(*due.get_or_insert(now_due), now_due, "the gap started again");
        }
        let second = replay.next_batch().await.expect("the second tick survived");
        assert_eq!(second[0].price.get(), dec!(2));
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(400), "the recorded gap is waited: {waited:?}");
    }

    #[tokio::test]
    async fn after_a_line_that_goes_back_the_next_ones_keep_the_files_pace() {
        let text = "2026-01-02T10:00:00Z,BTC-USD,1\n2026-01-02T10:00:00.2Z,BTC-USD,2\n\
                    2026-01-02T09:00:00Z,BTC-USD,3\n2026-01-02T10:00:00.4Z,BTC-USD,4\n";
        let mut replay = Replay::new(parse(text).expect("valid"));
        for price in [dec!(1), dec!(2), dec!(3)] {
            assert_eq!(replay.next_batch().await.expect("a batch")[0].price.get(), price);
        }
        // Interrupted at once: the fourth line's due time is set, 0.2 s after the latest time
        // seen (10:00:00.2) — not an hour and 0.4 s after the line that went back.
        let interrupted = tokio::time::timeout(Duration::from_millis(20), replay.next_batch()).await;
        assert!(interrupted.is_err(), "not due yet");
        let wait = replay.due.expect("waiting for the fourth line") - tokio::time::Instant::now();
        assert!(wait <= Duration::from_millis(200), "{wait:?}");
        assert_eq!(replay.next_batch().await.expect("the fourth")[0].price.get(), dec!(4));
    }
}
