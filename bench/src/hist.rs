// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Latency histograms for the benchmark suites: a thin wrapper over HdrHistogram.
//!
//! [`LatencyHist`] records nanoseconds (or microseconds, or a [`Duration`]) with
//! `saturating_record`, so a wild value lands in the top bucket instead of failing; one histogram
//! per thread, merged with [`LatencyHist::merge`]. [`LatencyHist::summary`] gives the figures
//! every result carries ([`LatencySummary`]: count, p50/p90/p99/p99.9/max in µs, total in ms),
//! and [`LatencyHist::log_buckets`] the `[upper_bound_us, count]` pairs the HTML report draws
//! as a histogram chart.
//!
//! Not here: measuring anything (the suites do), coordinated-omission correction (the suites
//! record every operation they issue, so there is nothing to correct for).

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Largest value recorded exactly: one hour in nanoseconds. Larger values saturate to it.
pub const MAX_NS: u64 = 3_600 * 1_000_000_000;

/// Significant decimal digits kept: values are exact to 0.1 %.
const SIGFIG: u8 = 3;

/// A latency histogram in nanoseconds, 1 ns to [`MAX_NS`], three significant digits, plus the
/// exact sum of everything recorded.
#[derive(Debug, Clone)]
pub struct LatencyHist {
    hist: Histogram<u64>,
    sum_ns: u128,
    saturated: u64,
}

/// The summary every latency figure in a result carries. All fields are zero when nothing was
/// recorded.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Values recorded.
    pub count: u64,
    /// Median, µs.
    pub p50_us: f64,
    /// 90th percentile, µs.
    pub p90_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// Largest value, µs.
    pub max_us: f64,
    /// Sum of all values, ms (for fault latencies: the total time threads waited).
    pub total_ms: f64,
}

impl Default for LatencyHist {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHist {
    /// An empty histogram.
    pub fn new() -> Self {
        #[allow(clippy::expect_used)]
        let hist = Histogram::new_with_bounds(1, MAX_NS, SIGFIG)
            // Invariant: constant bounds, low >= 1, high >= 2 * low, sigfig <= 5.
            .expect("constant histogram bounds are valid");
        Self {
            hist,
            sum_ns: 0,
            saturated: 0,
        }
    }

    /// Records one value in nanoseconds (values above [`MAX_NS`] are clamped to it).
    pub fn record_ns(&mut self, ns: u64) {
        if ns > MAX_NS {
            self.saturated += 1;
        }
        let v = ns.min(MAX_NS);
        self.hist.saturating_record(v);
        self.sum_ns += u128::from(v);
    }

    /// Records one value in microseconds.
    pub fn record_us(&mut self, us: u64) {
        self.record_ns(us.saturating_mul(1_000));
    }

    /// Records one duration.
    pub fn record(&mut self, d: Duration) {
        self.record_ns(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Adds everything recorded in `other` (e.g. another thread's histogram) to this one.
    pub fn merge(&mut self, other: &LatencyHist) {
        if self.hist.add(&other.hist).is_err() {
            // Both histograms have the same bounds, so `add` cannot fail; should that ever
            // change, re-record value by value (clamped) instead of losing counts.
            for v in other.hist.iter_recorded() {
                self.hist
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
        self.sum_ns += other.sum_ns;
        self.saturated += other.saturated;
    }

    /// Merges a set of histograms (one per thread) into a new one.
    pub fn merged<'a>(parts: impl IntoIterator<Item = &'a LatencyHist>) -> LatencyHist {
        let mut out = LatencyHist::new();
        for p in parts {
            out.merge(p);
        }
        out
    }

    /// Number of values recorded.
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.hist.is_empty()
    }

    /// Number of values that exceeded [`MAX_NS`] and were clamped.
    pub fn saturated(&self) -> u64 {
        self.saturated
    }

    /// The value at quantile `q` (0.0 to 1.0), in nanoseconds (0 when empty).
    pub fn quantile_ns(&self, q: f64) -> u64 {
        if self.hist.is_empty() {
            return 0;
        }
        self.hist.value_at_quantile(q)
    }

    /// Sum of all recorded values in nanoseconds (exact, not bucketed).
    pub fn sum_ns(&self) -> u128 {
        self.sum_ns
    }

    /// The underlying HdrHistogram (nanoseconds).
    pub fn inner(&self) -> &Histogram<u64> {
        &self.hist
    }

    /// count, p50, p90, p99, p99.9, max (µs) and the total (ms).
    pub fn summary(&self) -> LatencySummary {
        if self.hist.is_empty() {
            return LatencySummary::default();
        }
        let us = |ns: u64| ns_to_f64(u128::from(ns)) / 1e3;
        LatencySummary {
            count: self.hist.len(),
            p50_us: us(self.hist.value_at_quantile(0.50)),
            p90_us: us(self.hist.value_at_quantile(0.90)),
            p99_us: us(self.hist.value_at_quantile(0.99)),
            p999_us: us(self.hist.value_at_quantile(0.999)),
            max_us: us(self.hist.max()),
            total_ms: ns_to_f64(self.sum_ns) / 1e6,
        }
    }

    /// Bucketed export for a histogram chart: `(upper_bound_us, count)` pairs with
    /// logarithmic bucket widths, the first bucket ending at `first_upper_ns` (it also holds
    /// everything below) and each next bound `log_base` times the previous one (`2.0` gives
    /// octaves, `2f64.sqrt()` half-octaves; values ≤ 1 are treated as 2). Buckets run up to the
    /// one holding the largest value; empty buckets in between are included (count 0), so the
    /// pairs can be drawn directly. Serialised with serde_json this is the
    /// `[[upper_bound_us, count], ...]` shape of a result's `"faults"."histogram"`.
    pub fn log_buckets(&self, first_upper_ns: u64, log_base: f64) -> Vec<(f64, u64)> {
        if self.hist.is_empty() {
            return Vec::new();
        }
        let base = if log_base > 1.0 { log_base } else { 2.0 };
        self.hist
            .iter_log(first_upper_ns.max(1), base)
            .map(|v| {
                (
                    ns_to_f64(u128::from(v.value_iterated_to())) / 1e3,
                    v.count_since_last_iteration(),
                )
            })
            .collect()
    }
}

/// Nanosecond counts to f64. Precision loss above 2^53 ns (104 days) is irrelevant here.
#[allow(clippy::cast_precision_loss)]
fn ns_to_f64(ns: u128) -> f64 {
    ns as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= b.abs() * 0.002 + 1e-9
    }

    #[test]
    fn empty_summary_is_zero() {
        let h = LatencyHist::new();
        assert_eq!(h.summary(), LatencySummary::default());
        assert!(h.log_buckets(1000, 2.0).is_empty());
        assert_eq!(h.quantile_ns(0.5), 0);
    }

    #[test]
    fn summary_of_a_known_distribution() {
        let mut h = LatencyHist::new();
        // 1..=1000 µs, one each.
        for us in 1..=1000u64 {
            h.record_us(us);
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert!(close(s.p50_us, 500.0), "{s:?}");
        assert!(close(s.p90_us, 900.0), "{s:?}");
        assert!(close(s.p99_us, 990.0), "{s:?}");
        assert!(close(s.p999_us, 999.0), "{s:?}");
        assert!(close(s.max_us, 1000.0), "{s:?}");
        // Exact sum: 1000 * 1001 / 2 µs = 500.5 ms.
        assert!((s.total_ms - 500.5).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn units_agree() {
        let mut a = LatencyHist::new();
        let mut b = LatencyHist::new();
        let mut c = LatencyHist::new();
        a.record_ns(42_000);
        b.record_us(42);
        c.record(Duration::from_micros(42));
        assert_eq!(a.summary(), b.summary());
        assert_eq!(a.summary(), c.summary());
    }

    #[test]
    fn merge_across_threads() {
        let parts: Vec<LatencyHist> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4u64)
                .map(|t| {
                    s.spawn(move || {
                        let mut h = LatencyHist::new();
                        for i in 0..250u64 {
                            h.record_us(t * 250 + i + 1);
                        }
                        h
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        let merged = LatencyHist::merged(&parts);
        let mut single = LatencyHist::new();
        for us in 1..=1000u64 {
            single.record_us(us);
        }
        assert_eq!(merged.summary(), single.summary());
        assert_eq!(merged.count(), 1000);
    }

    #[test]
    fn saturates_instead_of_failing() {
        let mut h = LatencyHist::new();
        h.record_ns(u64::MAX);
        h.record(Duration::from_secs(10 * 3600));
        h.record_us(5);
        assert_eq!(h.count(), 3);
        assert_eq!(h.saturated(), 2);
        assert!(h.summary().max_us >= 3_599e6, "{:?}", h.summary());
    }

    #[test]
    fn log_buckets_cover_every_value() {
        let mut h = LatencyHist::new();
        for us in [3u64, 3, 5, 17, 17, 17, 100, 900] {
            h.record_us(us);
        }
        let b = h.log_buckets(1_000, 2.0);
        let total: u64 = b.iter().map(|&(_, c)| c).sum();
        assert_eq!(total, 8);
        // Bounds double and increase; the last bucket holds the max.
        for w in b.windows(2) {
            assert!(w[1].0 > w[0].0, "{b:?}");
        }
        assert!(b.last().expect("non-empty").0 >= 900.0, "{b:?}");
        // The three 17 µs values share one bucket (16, 32].
        assert!(
            b.iter().any(|&(u, c)| c == 3 && u > 16.0 && u <= 33.0),
            "{b:?}"
        );
    }

    #[test]
    fn summary_serialises_with_the_documented_names() {
        let mut h = LatencyHist::new();
        h.record_us(10);
        let v = serde_json::to_value(h.summary()).expect("serialise");
        for k in [
            "count", "p50_us", "p90_us", "p99_us", "p999_us", "max_us", "total_ms",
        ] {
            assert!(v.get(k).is_some(), "{k} missing in {v}");
        }
        let back: LatencySummary = serde_json::from_value(v).expect("deserialise");
        assert_eq!(back, h.summary());
    }
}
