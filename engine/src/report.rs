// SPDX-License-Identifier: Apache-2.0 OR MIT
//! What a migration reports: rounds, the blackout and its phases, faults, bytes, verification.

use ferry_protocol::frame::FaultSummary;
use serde::Serialize;

/// One pre-copy round, as the source saw it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RoundStats {
    /// Round number (from 1).
    pub round: u32,
    /// Milliseconds since the migration started, when the round began.
    pub start_ms: f64,
    /// Duration in milliseconds.
    pub duration_ms: f64,
    /// Pages the round covered.
    pub pages: u64,
    /// Bytes of page data sent (zero pages excluded).
    pub bytes: u64,
    /// Pages found dirty at the harvest after the round.
    pub dirty_pages: u64,
    /// The blackout predicted after the round, microseconds.
    pub predicted_blackout_us: f64,
    /// The per-round latency the prediction used, microseconds (see `predict`; before a small
    /// round measured it, the last round's time beyond its bytes at the best throughput).
    pub latency_us: f64,
    /// The throughput the prediction used, bytes per microsecond.
    pub bytes_per_us: f64,
}

/// Blackout phases, microseconds. Source: pause, harvest, save, send; destination: apply
/// (stale set, userfaultfd registration, final pages), restore, resume.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BlackoutPhases {
    /// Stopping the vCPUs.
    pub pause: f64,
    /// The final dirty harvest.
    pub harvest: f64,
    /// Saving vCPU/device state.
    pub save: f64,
    /// Sending the final pages (or stale set) and the state.
    pub send: f64,
    /// Destination: from `Switchover` to state received and pages/stale set applied.
    pub apply: f64,
    /// Destination: restoring vCPU/device state.
    pub restore: f64,
    /// Destination: resuming the vCPUs.
    pub resume: f64,
}

/// Post-copy fault statistics (from the destination).
#[derive(Debug, Clone, Default, Serialize)]
pub struct FaultReport {
    /// Faults.
    pub count: u64,
    /// Median, µs.
    pub p50_us: u64,
    /// 90th percentile, µs.
    pub p90_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// 99.9th percentile, µs.
    pub p999_us: u64,
    /// Longest, µs.
    pub max_us: u64,
    /// Summed waiting of faulting threads, ms.
    pub total_stall_ms: f64,
    /// Faults resolved by the background push before their reply came.
    pub resolved_by_push: u64,
    /// Faults resolved locally, with no request: the page had arrived but was not mapped yet
    /// (pre-copy data in the page cache, or a zero page). Not in `count` or the latencies.
    pub local: u64,
    /// Samples `[ms since resume, latency µs]`.
    pub timeline: Vec<[u32; 2]>,
}

impl From<&FaultSummary> for FaultReport {
    fn from(f: &FaultSummary) -> Self {
        Self {
            count: f.count,
            p50_us: f.p50_us,
            p90_us: f.p90_us,
            p99_us: f.p99_us,
            p999_us: f.p999_us,
            max_us: f.max_us,
            total_stall_ms: f.total_stall_us as f64 / 1000.0,
            resolved_by_push: f.resolved_by_push,
            local: f.local,
            timeline: f.points.iter().map(|(t, l)| [*t, *l]).collect(),
        }
    }
}

/// Per-stream totals.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamReport {
    /// Stream index.
    pub index: usize,
    /// Bytes sent (headers and payload).
    pub bytes: u64,
    /// Frames sent.
    pub frames: u64,
    /// Zero-copy sends the kernel reported it copied.
    pub zc_copied: u64,
    /// Zero-copy sends.
    pub zc_sends: u64,
}

/// The source's report of a whole migration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrationReport {
    /// `precopy`, `postcopy` or `hybrid` (what was asked).
    pub mode: String,
    /// How the switchover happened: `stop-and-copy` or `post-copy`.
    pub switchover: String,
    /// Guest memory size.
    pub mem_bytes: u64,
    /// Bulk streams.
    pub streams: usize,
    /// Transport backend.
    pub transport: String,
    /// Blackout, µs: from the source pausing to the destination's `Resumed` arriving back
    /// (an upper bound: it includes the one-way trip of `Resumed`).
    pub blackout_us: f64,
    /// Blackout phases, µs.
    pub blackout_phases_us: BlackoutPhases,
    /// When the blackout began, ms since start.
    pub blackout_start_ms: f64,
    /// Whole migration, ms.
    pub total_ms: f64,
    /// Page bytes sent (data; zero pages cost only their range).
    pub bytes_sent: u64,
    /// Bytes on the wire before compression savings (for the compression ratio).
    pub bytes_uncompressed: u64,
    /// Pages sent as zero ranges.
    pub zero_pages: u64,
    /// Pages sent as data.
    pub data_pages: u64,
    /// Pre-copy rounds.
    pub rounds: u32,
    /// Each round.
    pub rounds_detail: Vec<RoundStats>,
    /// Pages outstanding at a post-copy switchover.
    pub stale_pages: u64,
    /// Of those, pages the VM named as touched first (`VmControl::first_touch_pages`), sent
    /// at the switchover ahead of the state rather than left to the push or to faults.
    pub first_touch_pages: u64,
    /// Post-copy faults.
    pub faults: FaultReport,
    /// Throttle percentage reached by auto-converge (100 = never throttled).
    pub throttle_percent: u8,
    /// Whether the digests matched.
    pub verified: bool,
    /// The source's digest, hex.
    pub digest: String,
    /// Per-stream totals.
    pub streams_detail: Vec<StreamReport>,
    /// `[ms, stream, bytes in interval]` samples.
    pub throughput_series: Vec<[f64; 3]>,
    /// Live checksum mismatches repaired by resending.
    pub resent_pages: u64,
    /// Post-copy connections lost and recovered (the session resumed).
    pub recoveries: u32,
    /// Time without a connection during those recoveries, ms.
    pub disconnected_ms: f64,
}
