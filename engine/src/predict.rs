// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The stop-and-copy prediction's model of a copy: a per-round latency plus bytes over the
//! link's throughput, both measured from the pre-copy rounds.
//!
//! A round's time (dispatch, send, the destination placing it, the drain's round trip) is
//! `latency + bytes / throughput`. The final copy inside the blackout has the same shape: the
//! final pages go out on the bulk streams, the destination waits for every stream's marker and
//! answers on the control stream. A model of throughput alone, as before, predicted ~0.2 ms
//! short for a final set of ~100 pages on the README's host, where a round trip between the
//! two processes costs 0.1–0.3 ms: the stop-and-copy overshot a 1 ms budget it was predicted
//! to fit.
//!
//! - **Throughput**: the last round that moved at least [`MIN_MEASURED_BYTES`] of data, and
//!   at least half of what it covered (a first round over a sparse guest spends its time
//!   finding zero pages and would make the link look slow), is the one the copy term uses.
//! - **Latency**: what is left of a round's time once its bytes are paid for at the *highest*
//!   throughput measured so far (so an underestimated link leaves more latency, not less),
//!   never below zero. The least over the last [`LATENCY_ROUNDS`] small rounds (covering under
//!   [`SMALL_ROUND_BYTES`] of guest memory, the scale of a final set that fits a budget; large
//!   rounds' times vary with the link and the memory far more than by a round trip). The least,
//!   not a mean: what delays a round on a busy host (a thread waiting for a CPU) only ever adds,
//!   and inside the blackout the threads on its critical path run raised when the process may
//!   raise them (see [`crate::boost`]). Before any small round, the last round's leftover,
//!   whatever its size: after a few large rounds that is long, so a migration whose dirty set
//!   collapsed early runs a small round more, which measures it; on a fast link whose rounds
//!   all stay large it is close to the real latency.

use std::collections::VecDeque;
use std::time::Duration;

/// A round must move at least this many data bytes, and at least half of the guest memory it
/// covered, to count as a throughput measurement.
pub const MIN_MEASURED_BYTES: u64 = 4 << 20;
/// Link speed assumed until a round measured one: 1 GB/s, below what loopback and any
/// migration network reach, so the first copy term errs on the long side.
pub const ASSUMED_BYTES_PER_US: f64 = 1000.0;
/// Small rounds whose latency is kept (the least is used).
pub const LATENCY_ROUNDS: usize = 5;
/// A round covering less guest memory than this measures the per-round latency.
pub const SMALL_ROUND_BYTES: u64 = 4 << 20;

/// Measured copy costs of the rounds so far.
#[derive(Debug, Clone, Default)]
pub struct CopyModel {
    /// The last measured throughput, bytes per µs; `None` until a round measured one.
    bytes_per_us: Option<f64>,
    /// The highest measured throughput, bytes per µs.
    best_bytes_per_us: Option<f64>,
    /// The most recent small rounds: data bytes and duration in µs.
    recent: VecDeque<(u64, f64)>,
    /// The last round, whatever its size: data bytes and duration in µs.
    last: Option<(u64, f64)>,
}

impl CopyModel {
    /// Records a finished round: the guest memory it covered, the data bytes it sent (zero
    /// pages excluded) and its time, end to end.
    pub fn observe(&mut self, covered: u64, bytes: u64, dur: Duration) {
        let us = dur.as_secs_f64() * 1e6;
        self.last = Some((bytes, us));
        if bytes >= MIN_MEASURED_BYTES && bytes.saturating_mul(2) >= covered {
            let bw = bytes as f64 / us.max(1.0);
            if bw.is_finite() && bw > 0.0 {
                self.bytes_per_us = Some(bw);
                self.best_bytes_per_us = Some(self.best_bytes_per_us.map_or(bw, |b| b.max(bw)));
            }
        }
        if covered < SMALL_ROUND_BYTES {
            if self.recent.len() == LATENCY_ROUNDS {
                self.recent.pop_front();
            }
            self.recent.push_back((bytes, us));
        }
    }

    /// The throughput the copy term uses, bytes per µs (the last measured, or
    /// [`ASSUMED_BYTES_PER_US`]).
    pub fn bytes_per_us(&self) -> f64 {
        self.bytes_per_us.unwrap_or(ASSUMED_BYTES_PER_US)
    }

    /// A round's time beyond its bytes at the highest measured throughput, µs, at least 0.
    fn leftover(&self, (bytes, us): (u64, f64)) -> f64 {
        let best = self.best_bytes_per_us.unwrap_or(ASSUMED_BYTES_PER_US);
        (us - bytes as f64 / best).max(0.0)
    }

    /// The per-round latency, µs: the least leftover of the recent small rounds; before any,
    /// the last round's leftover; 0 before any round.
    pub fn latency_us(&self) -> f64 {
        if self.recent.is_empty() {
            return self.last.map_or(0.0, |r| self.leftover(r));
        }
        self.recent
            .iter()
            .map(|&r| self.leftover(r))
            .fold(f64::INFINITY, f64::min)
    }

    /// Predicted time to copy `bytes` and have the destination confirm it, µs.
    pub fn copy_us(&self, bytes: u64) -> f64 {
        self.latency_us() + bytes as f64 / self.bytes_per_us()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(x: u64) -> Duration {
        Duration::from_micros(x)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn no_rounds_assumes_the_link_and_no_latency() {
        let m = CopyModel::default();
        assert!(close(m.latency_us(), 0.0));
        assert!(close(m.bytes_per_us(), ASSUMED_BYTES_PER_US));
        assert!(close(m.copy_us(1_000_000), 1000.0));
    }

    #[test]
    fn recovers_latency_and_throughput_of_rounds_that_follow_the_model() {
        // 2000 bytes/µs and 250 µs per round; the throughput is measured on a round large
        // enough that its latency hardly counts.
        let mut m = CopyModel::default();
        for bytes in [1u64 << 30, 1 << 20, 600_000, 400_000, 300_000, 200_000] {
            m.observe(bytes, bytes, us(250 + bytes / 2000));
        }
        let bw = m.bytes_per_us();
        assert!((1999.0..2000.0).contains(&bw), "{bw}");
        let lat = m.latency_us();
        assert!((249.0..=250.0).contains(&lat), "{lat}");
        let p = m.copy_us(500_000);
        assert!((499.0..=501.0).contains(&p), "{p}");
        // Throughput alone (the model before) would have said 250 µs.
        assert!(p - 500_000.0 / bw > 249.0);
    }

    #[test]
    fn small_rounds_do_not_measure_the_link() {
        let mut m = CopyModel::default();
        m.observe(1 << 20, 1 << 20, us(100_000));
        assert!(close(m.bytes_per_us(), ASSUMED_BYTES_PER_US));
        // Their time beyond the assumed link counts as latency.
        let want = 100_000.0 - (1u64 << 20) as f64 / ASSUMED_BYTES_PER_US;
        assert!(close(m.latency_us(), want));
    }

    #[test]
    fn a_round_mostly_of_zero_pages_does_not_measure_the_link() {
        // 1 GiB covered, 100 MiB of data: the time went to finding zero pages.
        let mut m = CopyModel::default();
        m.observe(1 << 30, 100 << 20, us(200_000));
        assert!(close(m.bytes_per_us(), ASSUMED_BYTES_PER_US));
        // Half of it data: measured.
        m.observe(200 << 20, 100 << 20, us(50_000));
        assert!(close(m.bytes_per_us(), (100u64 << 20) as f64 / 50_000.0));
    }

    #[test]
    fn latency_is_the_least_of_the_recent_small_rounds_and_never_negative() {
        let mut m = CopyModel::default();
        m.observe(100 << 20, 100 << 20, us(100_000)); // 1048.576 bytes/µs.
        for extra in [70u64, 5_000, 300, 200, 400, 900] {
            m.observe(4096, 0, us(extra));
        }
        // 70 left the window: the least of 5000, 300, 200, 400, 900.
        assert!(close(m.latency_us(), 200.0));
        // A small round faster than the link leaves nothing, not a negative latency.
        let mut m = CopyModel::default();
        m.observe(100 << 20, 100 << 20, us(100_000));
        m.observe(1 << 20, 1 << 20, us(10));
        assert!(close(m.latency_us(), 0.0));
    }

    #[test]
    fn a_round_delayed_on_a_busy_host_does_not_raise_the_latency() {
        let mut m = CopyModel::default();
        for extra in [300u64, 280, 6_000, 310] {
            m.observe(4096, 0, us(extra));
        }
        assert!(close(m.latency_us(), 280.0));
    }

    #[test]
    fn leftovers_are_taken_at_the_best_throughput_measured() {
        // The link measured fast once (2000 bytes/µs), then slow (1000): the copy term uses
        // the last measurement, the leftovers the best, so a slow measurement cannot hide the
        // latency of a small round (at 1000 bytes/µs this one would leave nothing).
        let mut m = CopyModel::default();
        m.observe(64 << 20, 64 << 20, us((64 << 20) / 2000));
        m.observe(8 << 20, 8 << 20, us((8 << 20) / 1000));
        assert!(close(
            m.bytes_per_us(),
            (8u64 << 20) as f64 / ((8u64 << 20) / 1000) as f64
        ));
        m.observe(1 << 20, 1 << 20, us(1000));
        let best = (64u64 << 20) as f64 / ((64u64 << 20) / 2000) as f64;
        assert!(close(m.latency_us(), 1000.0 - (1u64 << 20) as f64 / best));
        assert!(m.latency_us() > 400.0);
    }

    #[test]
    fn before_a_small_round_the_last_rounds_leftover_is_the_latency() {
        // A first round over a sparse 1 GiB guest: 2 MiB of data, 50 ms finding zero pages.
        let mut m = CopyModel::default();
        m.observe(1 << 30, 2 << 20, us(50_000));
        assert!(close(m.bytes_per_us(), ASSUMED_BYTES_PER_US));
        let want = 50_000.0 - (2u64 << 20) as f64 / ASSUMED_BYTES_PER_US;
        assert!(close(m.latency_us(), want));
        // A fast round then slower large rounds (2000, then 1000 bytes/µs): the slower one
        // leaves its extra time as latency, so a switchover is not decided on it.
        m.observe(64 << 20, 64 << 20, us((64 << 20) / 2000));
        assert!(m.latency_us() < 1.0);
        m.observe(8 << 20, 8 << 20, us((8 << 20) / 1000));
        let best = (64u64 << 20) as f64 / ((64u64 << 20) / 2000) as f64;
        let want = ((8u64 << 20) / 1000) as f64 - (8u64 << 20) as f64 / best;
        assert!(close(m.latency_us(), want));
        // The first small round measures it, and a large round after it does not change it
        // (it changes the copy term's throughput).
        m.observe(40_960, 40_960, us(300));
        let want = 300.0 - 40_960.0 / best;
        assert!(close(m.latency_us(), want));
        m.observe(16 << 20, 16 << 20, us(12_000));
        assert!(close(m.latency_us(), want));
        assert!(close(m.bytes_per_us(), (16u64 << 20) as f64 / 12_000.0));
    }
}
