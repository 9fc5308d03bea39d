// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Blackout timeline marks: `CLOCK_MONOTONIC` timestamps, shared by every process on a host, so
//! the source's and the destination's marks of one switchover can be merged into one timeline
//! (`FERRY_LOG=ferry_timeline=debug`; `ferry demo` runs both processes on one host).

use rustix::time::{ClockId, clock_gettime};

/// Nanoseconds of `CLOCK_MONOTONIC`.
pub fn mono_ns() -> u64 {
    let t = clock_gettime(ClockId::Monotonic);
    u64::try_from(t.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0))
}

/// Records one point of the switchover timeline (a `debug` event of target `ferry_timeline`).
pub fn mark(what: &'static str) {
    tracing::debug!(target: "ferry_timeline", t_ns = mono_ns(), what);
}
