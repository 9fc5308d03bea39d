// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The stop-and-copy prediction's model of a copy: a per-round latency plus bytes over the
//! link's throughput, both measured from the pre-copy rounds.
//!
//! A round's time (dispatch, send, the destination placing it, the drain's round trip) is
//! `latency + bytes / throughput`. The throughput comes from rounds large enough to measure it
//! (at least [`MIN_MEASURED_BYTES`] of data); the latency is what is left of the most recent
//! small rounds' times (rounds covering under [`SMALL_ROUND_BYTES`] of guest memory, the scale
//! of a final set that fits a blackout budget) once their bytes are paid for at that
//! throughput: the least of the last [`LATENCY_ROUNDS`], never below zero. The least, not a
//! mean: what delays a round on a busy host (a thread waiting for a CPU) only ever adds, and
//! inside the blackout the threads on its critical path are raised above that (see
//! [`crate::boost`]), so the fastest recent round is the best estimate of the latency there. Large rounds say
//! little about latency: their time varies with the link and the memory far more than by a
//! round trip, and a first round over a sparse guest spends its time finding zero pages; and
//! the round that measured the throughput leaves nothing by construction. Until a small round
//! measured it, the latency is bounded by the last round's whole time, so a switchover decided
//! that early must fit even that (a migration whose dirty set collapsed after a few large rounds
//! then runs one small round more, which measures it). The final copy inside the blackout has the same
//! shape: the final pages go out on the bulk streams and the destination waits for every
//! stream's marker, then answers on the control stream. A model of throughput alone, as before,
//! predicted ~0.2 ms short for a final set of ~100 pages on the README's host, where a round
//! trip between the two processes costs 0.1–0.3 ms: the stop-and-copy overshot a 1 ms budget
//! it was predicted to fit.

use std::collections::VecDeque;
use std::time::Duration;

/// A round must move at least this many data bytes to count as a throughput measurement.
pub const MIN_MEASURED_BYTES: u64 = 4 << 20;
/// Link speed assumed until a round measured one: 1 GB/s, below what loopback and any
/// migration network reach, so the first prediction errs on the long side.
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
    /// The most recent small rounds: data bytes and duration in µs.
    recent: VecDeque<(u64, f64)>,
    /// The last round's duration in µs, whatever its size.
    last_us: Option<f64>,
}

impl CopyModel {
    /// Records a finished round: the guest memory it covered, the data bytes it sent (zero
    /// pages excluded) and its time, end to end.
    pub fn observe(&mut self, covered: u64, bytes: u64, dur: Duration) {
        let us = dur.as_secs_f64() * 1e6;
        self.last_us = Some(us);
        // Only rounds that moved real data measure the link: a round of mostly zero pages (an
        // idle guest's first pass) or a tiny last round would make it look slow.
        if bytes >= MIN_MEASURED_BYTES {
            let bw = bytes as f64 / us.max(1.0);
            if bw.is_finite() && bw > 0.0 {
                self.bytes_per_us = Some(bw);
            }
        }
        if covered < SMALL_ROUND_BYTES {
            if self.recent.len() == LATENCY_ROUNDS {
                self.recent.pop_front();
            }
            self.recent.push_back((bytes, us));
        }
    }

    /// The throughput in use, bytes per µs (measured, or [`ASSUMED_BYTES_PER_US`]).
    pub fn bytes_per_us(&self) -> f64 {
        self.bytes_per_us.unwrap_or(ASSUMED_BYTES_PER_US)
    }

    /// The per-round latency, µs: the least, over the recent small rounds, of their time
    /// beyond their bytes at [`Self::bytes_per_us`]. Before any small round, the last round's
    /// whole time (an upper bound: no round is faster than its latency); 0 before any round.
    pub fn latency_us(&self) -> f64 {
        if self.recent.is_empty() {
            return self.last_us.unwrap_or(0.0);
        }
        let bw = self.bytes_per_us();
        self.recent
            .iter()
            .map(|&(bytes, us)| (us - bytes as f64 / bw).max(0.0))
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

    #[test]
    fn no_rounds_assumes_the_link_and_no_latency() {
        let m = CopyModel::default();
        assert_eq!(m.latency_us(), 0.0);
        assert_eq!(m.bytes_per_us(), ASSUMED_BYTES_PER_US);
        assert_eq!(m.copy_us(1_000_000), 1000.0);
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
        assert_eq!(m.bytes_per_us(), ASSUMED_BYTES_PER_US);
        // Their time beyond the assumed link counts as latency.
        assert!((m.latency_us() - (100_000.0 - (1u64 << 20) as f64 / 1000.0)).abs() < 1e-6);
    }

    #[test]
    fn latency_is_the_least_of_the_recent_small_rounds_and_never_negative() {
        let mut m = CopyModel::default();
        m.observe(100 << 20, 100 << 20, us(100_000)); // 1048.576 bytes/µs.
        for extra in [70u64, 5_000, 300, 200, 400, 900] {
            m.observe(4096, 0, us(extra));
        }
        // 70 left the window: the least of 5000, 300, 200, 400, 900.
        assert_eq!(m.latency_us(), 200.0);
        // A small round faster than the link leaves nothing, not a negative latency.
        let mut m = CopyModel::default();
        m.observe(100 << 20, 100 << 20, us(100_000));
        m.observe(1 << 20, 1 << 20, us(10));
        assert_eq!(m.latency_us(), 0.0);
    }

    #[test]
    fn a_round_delayed_on_a_busy_host_does_not_raise_the_latency() {
        let mut m = CopyModel::default();
        for extra in [300u64, 280, 6_000, 310] {
            m.observe(4096, 0, us(extra));
        }
        assert_eq!(m.latency_us(), 280.0);
    }

    #[test]
    fn large_rounds_measure_the_link_and_only_bound_the_latency() {
        // A first round over a sparse 1 GiB guest: 2 MiB of data, 50 ms finding zero pages.
        let mut m = CopyModel::default();
        m.observe(1 << 30, 2 << 20, us(50_000));
        assert_eq!(m.bytes_per_us(), ASSUMED_BYTES_PER_US);
        // No small round yet: the latency is at most the last round's time.
        assert_eq!(m.latency_us(), 50_000.0);
        // A large round of data measures the link, and bounds the latency by its time.
        m.observe(64 << 20, 64 << 20, us(40_000));
        assert!((m.bytes_per_us() - (64u64 << 20) as f64 / 40_000.0).abs() < 1e-9);
        assert_eq!(m.latency_us(), 40_000.0);
        // The first small round measures it; large rounds after it do not change it.
        m.observe(40_960, 40_960, us(300));
        let lat = 300.0 - 40_960.0 / m.bytes_per_us();
        assert!((m.latency_us() - lat).abs() < 1e-9);
        m.observe(8 << 20, 8 << 20, us(5_000));
        let lat = 300.0 - 40_960.0 / m.bytes_per_us();
        assert!((m.latency_us() - lat).abs() < 1e-9);
    }
}
