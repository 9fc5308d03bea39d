// SPDX-License-Identifier: Apache-2.0 OR MIT
//! `ferry __harvest` (run by `ferry bench harvest`, with its options): the blackout's final
//! dirty harvest of a real KVM guest, timed in the dirty bitmap and the dirty ring modes side
//! by side. Latencies go through the benchmarks' HdrHistogram summary (`LatencySummary`).
//!
//! Two VMs of the same size run the writer guest at full speed over the same working set, one
//! tracked by the bitmap (`KVM_GET_DIRTY_LOG`, manual protect), one by the ring. Each
//! iteration, for each VM in turn: a harvest that re-protects (what a pre-copy round ends
//! with), the guest writes for `--run-ms`, the vCPUs are paused, and the final harvest is
//! timed the way the engine's blackout runs it: the tracker's `harvest_final` into a reused
//! bitmap, then the scan into ranges that empties it. Then the VM resumes. The bitmap mode is
//! the baseline of the same run: the two modes alternate, one iteration at a time.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use ferry_bench::cli::HarvestArgs;
use ferry_bench::hist::LatencyHist;
use ferry_engine::vm::{DirtyBitmap, DirtyTracker, GuestMemory, VmControl};
use ferry_kvm::{DirtyMode, KvmDirtyTracker, KvmVm, VmConfig, Workload};
use serde_json::{Value, json};

/// One VM under test and what was measured on it.
struct Subject {
    name: &'static str,
    vm: KvmVm,
    tracker: KvmDirtyTracker,
    bitmap: DirtyBitmap,
    /// The final harvest, tracker and scan, per iteration.
    total: LatencyHist,
    /// The tracker's part.
    tracker_part: LatencyHist,
    /// Dirty pages found by each final harvest.
    pages: Vec<u64>,
}

impl Subject {
    fn new(name: &'static str, dirty: DirtyMode, mib: u64, a: &HarvestArgs) -> Result<Self> {
        let cfg = VmConfig {
            mem_bytes: mib << 20,
            vcpus: a.vcpus,
            workload: Workload::Writer {
                working_set_mib: a.working_set_mib,
                rate_mib_s: None,
            },
            dirty,
            ..Default::default()
        };
        let mut vm =
            KvmVm::new_source(&cfg).with_context(|| format!("Cannot create the {name} VM"))?;
        let mut tracker = vm.dirty_tracker();
        let bitmap = DirtyBitmap::for_regions(vm.memory().regions());
        vm.start()
            .with_context(|| format!("Cannot start the {name} VM"))?;
        tracker
            .start()
            .map_err(|e| anyhow!("Cannot start dirty tracking ({name}): {e}"))?;
        Ok(Self {
            name,
            vm,
            tracker,
            bitmap,
            total: LatencyHist::new(),
            tracker_part: LatencyHist::new(),
            pages: Vec::new(),
        })
    }

    /// One round's harvest, `run` of guest writes, pause, the timed final harvest, resume.
    fn iteration(
        &mut self,
        run: Duration,
        ranges: &mut Vec<ferry_protocol::GpaRange>,
    ) -> Result<()> {
        self.tracker
            .harvest(&mut self.bitmap)
            .map_err(|e| anyhow!("Harvest failed ({}): {e}", self.name))?;
        self.bitmap.clear();
        std::thread::sleep(run);
        self.vm
            .pause()
            .map_err(|e| anyhow!("Pause failed ({}): {e}", self.name))?;
        if let Some(f) = self.vm.fault() {
            bail!("The {} VM stopped: {f}", self.name);
        }
        ranges.clear();
        let t0 = Instant::now();
        self.tracker
            .harvest_final(&mut self.bitmap)
            .map_err(|e| anyhow!("Final harvest failed ({}): {e}", self.name))?;
        let t1 = Instant::now();
        // The engine's own scan (as `Run::harvest` does it); KVM guest memory is in 4 KiB pages.
        self.bitmap
            .take_ranges(self.vm.memory().regions(), 4096, ranges);
        let t2 = Instant::now();
        self.total.record(t2 - t0);
        self.tracker_part.record(t1 - t0);
        self.pages
            .push(ranges.iter().map(|r| r.len / 4096).sum::<u64>());
        self.vm
            .resume()
            .map_err(|e| anyhow!("Resume failed ({}): {e}", self.name))?;
        Ok(())
    }

    fn result(&self, mib: u64, a: &HarvestArgs) -> Value {
        json!({
            "suite": "harvest",
            "dirty_mode": self.name,
            "active_dirty_mode": format!("{:?}", self.tracker.mode()),
            "mem_bytes": mib << 20,
            "vcpus": a.vcpus,
            "working_set_mib": a.working_set_mib,
            "run_ms": a.run_ms,
            "iterations": self.total.count(),
            "final_harvest": self.total.summary(),
            "tracker": self.tracker_part.summary(),
            "pages_p50": median(&self.pages),
            "ring_full_exits": self.tracker.ring_full_exits(),
        })
    }
}

/// The median of `v` (the lower one of an even count; 0 when empty).
fn median(v: &[u64]) -> u64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    s.get(s.len().saturating_sub(1) / 2).copied().unwrap_or(0)
}

/// Runs the measurement for each size in turn and prints one JSON line per size and mode.
pub fn run(a: HarvestArgs) -> Result<()> {
    if !ferry_kvm::kvm_available() {
        bail!("/dev/kvm cannot be opened: this command needs KVM (run as root on a KVM host)");
    }
    if a.iterations == 0 {
        bail!("--iterations must be at least 1");
    }
    for &mib in &a.mem_mib {
        let mut subjects = [
            Subject::new("bitmap", DirtyMode::Bitmap, mib, &a)?,
            Subject::new("ring", DirtyMode::Ring, mib, &a)?,
        ];
        // The guests fill their working sets first.
        std::thread::sleep(Duration::from_millis(500));
        let run = Duration::from_millis(a.run_ms);
        let mut ranges = Vec::new();
        for _ in 0..a.iterations {
            for s in &mut subjects {
                s.iteration(run, &mut ranges)?;
            }
        }
        for s in &subjects {
            println!("{}", s.result(mib, &a));
        }
        for s in &mut subjects {
            s.tracker
                .stop()
                .map_err(|e| anyhow!("Cannot stop tracking ({}): {e}", s.name))?;
        }
    }
    Ok(())
}
