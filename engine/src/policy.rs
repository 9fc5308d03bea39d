// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Migration policy: mode, blackout budget, convergence, integrity and economy options.

use std::time::Duration;

pub use ferry_protocol::handshake::{Compression, Mode};

/// What pre-copy does when rounds stop converging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStall {
    /// Give up: the VM keeps running on the source and the migration fails with a reason.
    Abort,
    /// Auto-converge: throttle the guest harder each stalled round (see
    /// [`crate::vm::VmControl::throttle`]), then give up at `max_rounds`.
    Throttle,
}

/// How a migration is run.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Pre-copy, post-copy or hybrid (pre-copy while it converges, then post-copy).
    pub mode: Mode,
    /// The blackout budget: switch over only when the predicted blackout fits.
    pub max_blackout: Duration,
    /// Most pre-copy rounds before the stall rule applies regardless.
    pub max_rounds: u32,
    /// Pre-copy behaviour when rounds stop shrinking the dirty set (hybrid switches to
    /// post-copy instead).
    pub on_stall: OnStall,
    /// A round "stalls" when its dirty set is at least this fraction of the previous one.
    pub stall_ratio: f64,
    /// The VM's part of a stop-and-copy blackout, added to the prediction: pausing the vCPUs,
    /// saving, restoring and resuming them. The rest is measured from the pre-copy rounds (see
    /// [`crate::predict`]): the final harvest, the final copy at the measured throughput, and
    /// the per-round latency (dispatch, the destination's confirmation, the round trips).
    /// The engine does not measure the VM's part: on the 2-core nested PVM host of the README
    /// it is 0.3-0.6 ms for one or two vCPUs depending on load (the pause, restore and resume
    /// phases of a stop-and-copy; its save overlaps the final copy); on hardware KVM it should
    /// be far less.
    pub switch_overhead: Duration,
    /// Hybrid only: the fraction of the budget a stop-and-copy keeps in reserve for the
    /// prediction's error (0.1: it must be predicted to fit 90% of the budget). Hybrid can
    /// always switch to post-copy instead, whose blackout does not grow with the dirty set;
    /// pure pre-copy uses the whole budget. On the README's host a 1-vCPU guest's
    /// stop-and-copy blackout was 0.65–1.47× its prediction (the VM's part varies with load,
    /// and the final set also holds the pages the guest writes until its vCPUs stop). Taken
    /// within 0..=1; a value that is not a number counts as the default.
    pub hybrid_reserve: f64,
    /// Per-page xxh3 checksums on page data.
    pub checksums: bool,
    /// Compression of page data (zstd); used only while the link, not the CPU, is the
    /// bottleneck (see [`crate::source`]).
    pub compression: Compression,
    /// Bytes of guest memory per unit of work handed to a bulk stream.
    pub chunk_bytes: u64,
    /// Most page bytes in one `Pages` frame.
    pub frame_bytes: u64,
    /// Pages around a post-copy fault pushed next ("fault neighbourhood").
    pub prefetch_pages: u64,
    /// Timeout for a peer that stops answering.
    pub timeout: Duration,
    /// Least time between two progress reports (and throughput samples).
    pub progress_interval: Duration,
}

impl Policy {
    /// [`Policy::hybrid_reserve`] as used: within 0..=1, the default for a NaN.
    pub fn hybrid_reserve(&self) -> f64 {
        if self.hybrid_reserve.is_nan() {
            DEFAULT_HYBRID_RESERVE
        } else {
            self.hybrid_reserve.clamp(0.0, 1.0)
        }
    }
}

/// The default [`Policy::hybrid_reserve`].
pub const DEFAULT_HYBRID_RESERVE: f64 = 0.1;

impl Default for Policy {
    fn default() -> Self {
        Self {
            mode: Mode::Hybrid,
            max_blackout: Duration::from_millis(1),
            max_rounds: 30,
            on_stall: OnStall::Abort,
            stall_ratio: 0.9,
            switch_overhead: Duration::from_micros(300),
            hybrid_reserve: DEFAULT_HYBRID_RESERVE,
            checksums: false,
            compression: Compression::None,
            chunk_bytes: 4 << 20,
            frame_bytes: 1 << 20,
            prefetch_pages: 64,
            timeout: Duration::from_secs(30),
            progress_interval: Duration::from_millis(50),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hybrid_reserve_is_taken_within_bounds_and_nan_is_the_default() {
        let with = |r: f64| Policy {
            hybrid_reserve: r,
            ..Policy::default()
        };
        assert_eq!(with(0.25).hybrid_reserve(), 0.25);
        assert_eq!(with(-1.0).hybrid_reserve(), 0.0);
        assert_eq!(with(7.0).hybrid_reserve(), 1.0);
        assert_eq!(with(f64::NAN).hybrid_reserve(), DEFAULT_HYBRID_RESERVE);
        assert_eq!(Policy::default().hybrid_reserve(), DEFAULT_HYBRID_RESERVE);
    }
}
