//! Latency histograms and the one-line summaries every scenario prints.
//!
//! Latencies are recorded in microseconds in HDR histograms (3 significant digits, up to 60 s),
//! shared between request tasks behind a plain mutex: recording is a few nanoseconds, far below
//! the cost of the request it measures.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;

/// A latency histogram shared by many tasks.
#[derive(Debug, Clone)]
pub struct Latencies(Arc<Mutex<Histogram<u64>>>);

impl Default for Latencies {
    fn default() -> Self {
        Latencies(Arc::new(Mutex::new(new_histogram())))
    }
}

impl Latencies {
    pub fn record(&self, elapsed: Duration) {
        let micros = (elapsed.as_micros() as u64).clamp(1, 60_000_000);
        if let Ok(mut h) = self.0.lock() {
            let _ = h.record(micros);
        }
    }

    pub fn snapshot(&self) -> Histogram<u64> {
        self.0.lock().map(|h| h.clone()).unwrap_or_else(|_| new_histogram())
    }
}

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds are valid")
}

/// The value at quantile `q`, in milliseconds.
pub fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// `name n= rate= p50= p90= p99= p99.9= max= errors=`.
pub fn summary(name: &str, h: &Histogram<u64>, errors: u64, elapsed: Duration) -> String {
    format!(
        "{name:<30} n={:<8} rate={:>9.1}/s p50={:>8.2}ms p90={:>8.2}ms p99={:>8.2}ms p99.9={:>8.2}ms max={:>8.2}ms errors={errors}",
        h.len(),
        h.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        ms(h, 0.50),
        ms(h, 0.90),
        ms(h, 0.99),
        ms(h, 0.999),
        h.max() as f64 / 1000.0,
    )
}

/// `stage: X/s = NN% of its limit (Y/s)`.
pub fn ratio(stage: &str, rate: f64, limit_name: &str, limit: f64) -> String {
    let pct = if limit > 0.0 { 100.0 * rate / limit } else { f64::NAN };
    format!("{stage:<30} {rate:>9.1}/s = {pct:>5.1}% of {limit_name} ({limit:.1}/s)")
}
