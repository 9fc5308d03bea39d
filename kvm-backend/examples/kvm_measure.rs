// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Measures the KVM backend's blackout-relevant costs on this machine: pause, paused dirty
//! harvest (bitmap and ring), save, restore, verify, resume (which applies the vCPUs' state).
//! Usage: `cargo run --release -p ferry-kvm --example kvm_measure -- [MEM_MIB] [VCPUS]`.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use ferry_engine::vm::{DirtyBitmap, DirtyTracker, GuestMemory, VmControl};
use ferry_kvm::{DirtyMode, KvmVm, VmConfig, Workload};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().map_or(Ok(1024), |a| a.parse())?;
    let vcpus: u32 = args.next().map_or(Ok(2), |a| a.parse())?;
    for mode in [DirtyMode::Bitmap, DirtyMode::Ring] {
        let cfg = VmConfig {
            mem_bytes: mib << 20,
            vcpus,
            workload: Workload::Verifier,
            dirty: mode,
            ..Default::default()
        };
        let t = Instant::now();
        let mut vm = KvmVm::new_source(&cfg)?;
        let created = t.elapsed();
        println!(
            "TSC {} kHz, KVM_VCPU_TSC_OFFSET {}, {} MSRs saved per vCPU",
            vm.tsc_khz(),
            vm.has_tsc_offset_control(),
            vm.msr_list().len()
        );
        let mut tr = vm.dirty_tracker();
        let mem = vm.memory();
        let mut bm = DirtyBitmap::for_regions(mem.regions());
        vm.start()?;
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        tr.start().map_err(|e| anyhow!(e))?;
        let start = t.elapsed();
        std::thread::sleep(Duration::from_millis(500));
        let mut harvests = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            tr.harvest(&mut bm).map_err(|e| anyhow!(e))?;
            harvests.push(t.elapsed());
            std::thread::sleep(Duration::from_millis(50));
        }
        vm.pause().map_err(|e| anyhow!(e))?;
        let pause = vm.timings().last_pause;
        bm.clear();
        let t = Instant::now();
        tr.harvest(&mut bm).map_err(|e| anyhow!(e))?;
        let paused_harvest = t.elapsed();
        let dirty_after_last = bm.count();
        let blob = vm.save_state().map_err(|e| anyhow!(e))?;
        let save = vm.timings().last_save;
        let mut dst = KvmVm::new_destination(&cfg)?;
        let t = Instant::now();
        dst.memory().copy_from(&mem);
        let copy = t.elapsed();
        dst.restore_state(&blob).map_err(|e| anyhow!(e))?;
        let restore = dst.timings().last_restore;
        let t = Instant::now();
        let rep = dst.verify_memory()?;
        let verify = t.elapsed();
        // With restore on resume (the default) the vCPUs' state is applied here, by their threads.
        dst.resume().map_err(|e| anyhow!(e))?;
        let resume = dst.timings().last_resume;
        let st = vm.guest_stats();
        harvests.sort();
        println!(
            "{mib} MiB, {vcpus} vCPUs, {:?}: create {created:?}, dirty start {start:?}, \
             running harvest p50 {:?} max {:?}, pause {pause:?}, paused harvest {paused_harvest:?} \
             ({dirty_after_last} pages), save {save:?} ({} B), memcpy {copy:?}, restore {restore:?}, \
             resume {resume:?}, \
             verify {verify:?} ok={} ({} pages), guest iterations {}, ring-full exits {}",
            tr.mode(),
            harvests[harvests.len() / 2],
            harvests[harvests.len() - 1],
            blob.len(),
            rep.ok(),
            rep.pages_checked,
            st.iterations,
            tr.ring_full_exits(),
        );
    }
    Ok(())
}
