// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Integration tests against real /dev/kvm: guests, dirty tracking (bitmap and ring), complete
//! state round trip with an in-process "migration", pause latency. Each test skips with a
//! printed reason when /dev/kvm cannot be opened (fails instead under `FERRY_REQUIRE_CAPS=1`).

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result, anyhow};
    use ferry_engine::vm::{DirtyBitmap, DirtyTracker, GuestMemory, VmControl};
    use ferry_kvm::guest::{DATA_BASE, STATS};
    use ferry_kvm::{ActiveDirtyMode, DirtyMode, KvmVm, MemBacking, VmConfig, VmState, Workload};

    /// Reports a missing capability: a skip, or a failure under `FERRY_REQUIRE_CAPS=1`.
    fn skip(reason: &str) {
        assert!(
            std::env::var("FERRY_REQUIRE_CAPS").as_deref() != Ok("1"),
            "required capability missing (FERRY_REQUIRE_CAPS=1): {reason}"
        );
        eprintln!("SKIP: {reason}");
    }

    fn kvm() -> bool {
        if ferry_kvm::kvm_available() {
            true
        } else {
            skip("/dev/kvm cannot be opened");
            false
        }
    }

    fn pause(vm: &mut KvmVm) -> Result<()> {
        vm.pause().map_err(|e| anyhow!(e))?;
        if let Some(f) = vm.fault() {
            return Err(anyhow!(f));
        }
        Ok(())
    }

    fn cfg(workload: Workload, vcpus: u32, mib: u64) -> VmConfig {
        VmConfig {
            mem_bytes: mib << 20,
            vcpus,
            workload,
            ..Default::default()
        }
    }

    /// Bit of RAM offset `off` (region 0 only: these tests stay below 3 GiB).
    fn bit(bm: &DirtyBitmap, off: u64) -> bool {
        let p = off / 4096;
        bm.regions[0][(p / 64) as usize] >> (p % 64) & 1 == 1
    }

    #[test]
    fn idle_guest_sleeps_through_the_host() -> Result<()> {
        if !kvm() {
            return Ok(());
        }
        let mut vm = KvmVm::new_source(&cfg(Workload::Idle, 2, 8))?;
        let tids = vm.vcpu_tids();
        assert!(
            tids.len() == 2 && tids[0] > 0 && tids[0] != tids[1],
            "{tids:?}"
        );
        vm.start()?;
        std::thread::sleep(Duration::from_millis(200));
        pause(&mut vm)?;
        let st = vm.guest_stats();
        let pio = vm
            .exit_counters()
            .pio
            .load(std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "idle: {st:?}, pio exits {pio}, pause {:?}",
            vm.timings().last_pause
        );
        // ~1 ms sleeps: some iterations, but nowhere near a busy loop.
        assert!(st.per_vcpu.iter().all(|s| s.iterations >= 10), "{st:?}");
        assert!(st.iterations < 2 * 200 * 2, "{st:?}");
        assert_eq!(vm.serial_output(), "ferry guest up\n");
        Ok(())
    }

    #[test]
    fn writer_rate_limit_holds() -> Result<()> {
        if !kvm() {
            return Ok(());
        }
        let w = Workload::Writer {
            working_set_mib: 8,
            rate_mib_s: Some(40),
        };
        let mut vm = KvmVm::new_source(&cfg(w, 1, 32))?;
        vm.start()?;
        let t = Instant::now();
        std::thread::sleep(Duration::from_millis(1300));
        let st = vm.guest_stats();
        let secs = t.elapsed().as_secs_f64();
        pause(&mut vm)?;
        // The banner, then one heartbeat dot per second of guest time.
        let out = vm.serial_output();
        assert!(out.starts_with("ferry guest up\n."), "{out:?}");
        let mib_s = st.iterations as f64 * 4096.0 / (1 << 20) as f64 / secs;
        eprintln!("writer: {mib_s:.1} MiB/s (target 40), {st:?}");
        // Upper bound only: the limiter never exceeds the rate; a loaded host can slow it.
        assert!(mib_s < 48.0 && st.iterations > 0, "rate {mib_s}");
        assert!(vm.verify_memory()?.ok());
        Ok(())
    }

    fn dirty_log_reports_writer_pages(mode: DirtyMode) -> Result<()> {
        let ws_mib = 16;
        let w = Workload::Writer {
            working_set_mib: ws_mib,
            rate_mib_s: None,
        };
        let mut c = cfg(w, 1, 64);
        c.dirty = mode;
        let mut vm = KvmVm::new_source(&c)?;
        let mut tr = vm.dirty_tracker();
        eprintln!("dirty mode {:?}", tr.mode());
        if mode == DirtyMode::Ring {
            assert!(matches!(tr.mode(), ActiveDirtyMode::Ring { .. }));
        }
        let mem = vm.memory();
        let mut bm = DirtyBitmap::for_regions(mem.regions());
        tr.start().map_err(|e| anyhow!(e))?;
        vm.start()?;
        // Harvest while the vCPU runs.
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(400) {
            tr.harvest(&mut bm).map_err(|e| anyhow!(e))?;
            std::thread::sleep(Duration::from_millis(20));
        }
        pause(&mut vm)?;
        tr.harvest(&mut bm).map_err(|e| anyhow!(e))?;
        let st = vm.guest_stats();
        eprintln!(
            "{mode:?}: {} dirty pages, guest iterations {}, ring-full exits {}",
            bm.count(),
            st.iterations,
            tr.ring_full_exits()
        );
        let ws_pages = ws_mib * 256;
        assert!(
            st.iterations > ws_pages,
            "writer did not finish a pass: {st:?}"
        );
        for p in 0..ws_pages {
            assert!(
                bit(&bm, DATA_BASE + p * 4096),
                "working-set page {p} not reported"
            );
        }
        assert!(bit(&bm, STATS), "stats page not reported");
        // Data pages beyond the working set are never written.
        let never_written = |bm: &DirtyBitmap, what: &str| {
            for p in ws_pages..ws_pages + 256 {
                assert!(
                    !bit(bm, DATA_BASE + p * 4096),
                    "page {p} reported by {what} but never written"
                );
            }
        };
        never_written(&bm, "a harvest");
        // Paused: a harvest forgets, the next one is empty.
        let mut again = DirtyBitmap::for_regions(mem.regions());
        tr.harvest(&mut again).map_err(|e| anyhow!(e))?;
        assert_eq!(again.count(), 0, "second harvest while paused not empty");
        // Resume: new writes are reported again, by a harvest and by the final harvest (no
        // re-protect in bitmap mode).
        for last in [false, true] {
            again.clear();
            vm.resume().map_err(|e| anyhow!(e))?;
            std::thread::sleep(Duration::from_millis(100));
            pause(&mut vm)?;
            if last {
                tr.harvest_final(&mut again)
            } else {
                tr.harvest(&mut again)
            }
            .map_err(|e| anyhow!(e))?;
            assert!(
                again.count() > 16,
                "no writes after resume (final harvest: {last}): {}",
                again.count()
            );
        }
        never_written(&again, "the final harvest");
        if mode == DirtyMode::Ring {
            // The final harvest does not reset the rings (the contract is that `stop` comes
            // next). A guest resumed with tracking still on fills them sooner; the ring-full
            // exits reset what that harvest left, so the guest keeps running and is tracked
            // again from that reset on (writes before it to the pages that harvest took are
            // not logged: the writer here rewrites every page, so they show up anyway).
            let exits = tr.ring_full_exits();
            let before = vm.guest_stats().iterations;
            again.clear();
            vm.resume().map_err(|e| anyhow!(e))?;
            std::thread::sleep(Duration::from_millis(300));
            pause(&mut vm)?;
            tr.harvest(&mut again).map_err(|e| anyhow!(e))?;
            let after = vm.guest_stats().iterations;
            eprintln!(
                "after the final harvest: {} iterations, {} ring-full exits, {} pages",
                after - before,
                tr.ring_full_exits() - exits,
                again.count()
            );
            assert!(
                after - before > ws_pages,
                "guest stalled after the final harvest"
            );
            assert!(tr.ring_full_exits() > exits, "no ring-full exit");
            assert!(
                again.count() > 16,
                "no pages tracked after the final harvest"
            );
            never_written(&again, "a harvest after the final one");
        }
        tr.stop().map_err(|e| anyhow!(e))?;
        assert!(vm.verify_memory()?.ok());
        Ok(())
    }

    #[test]
    fn dirty_bitmap_reports_written_pages() -> Result<()> {
        if !kvm() {
            return Ok(());
        }
        dirty_log_reports_writer_pages(DirtyMode::Bitmap)
    }

    #[test]
    fn dirty_ring_reports_written_pages() -> Result<()> {
        if !kvm() {
            return Ok(());
        }
        dirty_log_reports_writer_pages(DirtyMode::Ring)
    }

    /// Compares two states piece by piece, skipping only what legitimately moves with time.
    fn assert_same_state(a: &VmState, b: &VmState) {
        use ferry_kvm::state::VcpuState;
        assert_eq!(a.guest, b.guest);
        assert_eq!(a.serial, b.serial);
        for i in 0..3 {
            assert_eq!(
                raw(&a.irqchips[i]),
                raw(&b.irqchips[i]),
                "irqchip {i} differs"
            );
        }
        let (mut pa, mut pb) = (a.pit, b.pit);
        // count_load_time is a host ktime stamp; it is re-based by KVM on restore.
        for c in pa.channels.iter_mut().chain(pb.channels.iter_mut()) {
            c.count_load_time = 0;
        }
        assert_eq!(raw(&pa), raw(&pb), "PIT differs");
        assert_eq!(a.vcpus.len(), b.vcpus.len());
        for (x, y) in a.vcpus.iter().zip(&b.vcpus) {
            let id = x.id;
            let f = |v: &VcpuState| {
                (
                    raw(&v.regs),
                    raw(&v.sregs),
                    raw(&v.fpu),
                    v.xsave.clone(),
                    raw(&v.xcrs),
                    raw(&v.events),
                    raw(&v.mp_state),
                    raw(&v.debugregs),
                )
            };
            let (fx, fy) = (f(x), f(y));
            assert_eq!(fx.0, fy.0, "vCPU {id} regs");
            assert_eq!(fx.1, fy.1, "vCPU {id} sregs");
            assert_eq!(fx.2, fy.2, "vCPU {id} fpu");
            assert_eq!(fx.3, fy.3, "vCPU {id} xsave");
            assert_eq!(fx.4, fy.4, "vCPU {id} xcrs");
            assert_eq!(fx.5, fy.5, "vCPU {id} events");
            assert_eq!(fx.6, fy.6, "vCPU {id} mp_state");
            assert_eq!(fx.7, fy.7, "vCPU {id} debugregs");
            assert_eq!(raw(&x.lapic), raw(&y.lapic), "vCPU {id} lapic");
            assert_eq!(x.msrs.len(), y.msrs.len());
            for (m, n) in x.msrs.iter().zip(&y.msrs) {
                assert_eq!(m, n, "vCPU {id} MSR {:#x}", m.0);
            }
            // Time moves forward, never back.
            assert!(y.tsc.tsc >= x.tsc.tsc, "vCPU {id} TSC went backwards");
        }
        assert!(b.clock.clock >= a.clock.clock, "kvmclock went backwards");
    }

    fn raw<T: Copy>(v: &T) -> Vec<u8> {
        // Test-only byte view for comparisons; mirrors what the blob stores.
        let blob_size = std::mem::size_of::<T>();
        let p = (v as *const T).cast::<u8>();
        // SAFETY: reading the bytes of a live Copy value of kvm-bindings POD type.
        unsafe { std::slice::from_raw_parts(p, blob_size) }.to_vec()
    }

    #[test]
    fn state_roundtrip_and_in_process_migration() -> Result<()> {
        if !kvm() {
            return Ok(());
        }
        for backing in [MemBacking::Memfd, MemBacking::Anonymous] {
            let mut c = cfg(Workload::Verifier, 2, 32);
            c.backing = backing;
            let mut src = KvmVm::new_source(&c)?;
            src.start()?;
            std::thread::sleep(Duration::from_millis(200));
            pause(&mut src)?;
            let before = src.guest_stats();
            assert!(src.verify_memory()?.ok(), "source memory bad");
            assert!(src.serial_output().starts_with("ferry guest up\n"));
            let blob = src.save_state().map_err(|e| anyhow!(e))?;
            let s1 = VmState::decode(&blob)?;
            eprintln!(
                "{backing:?}: blob {} bytes, {} MSRs per vCPU, save {:?}",
                blob.len(),
                s1.vcpus[0].msrs.len(),
                src.timings().last_save
            );

            let mut dst = KvmVm::new_destination(&c)?;
            assert!(
                matches!(dst.start(), Err(ferry_kvm::VmRunError::NotRestored)),
                "a destination must not run before restore"
            );
            assert!(dst.memory().copy_from(&src.memory()), "layouts differ");
            let t = Instant::now();
            dst.restore_state(&blob).map_err(|e| anyhow!(e))?;
            let restore = t.elapsed();
            // The destination splits the guest's gap log at the source's saved TSCs.
            let src_tsc: Vec<u64> = s1.vcpus.iter().map(|v| v.tsc.tsc).collect();
            assert_eq!(dst.state_tsc(), &src_tsc[..]);
            let s2 = VmState::decode(&dst.save_state().map_err(|e| anyhow!(e))?)?;
            eprintln!("restore {restore:?}: {:?}", dst.timings().restore_steps);
            eprintln!("save steps: {:?}", src.timings().save_steps);
            eprintln!(
                "per vCPU: save {:?} restore {:?}",
                src.timings().vcpu_save,
                dst.timings().vcpu_restore
            );
            assert_same_state(&s1, &s2);
            // The source is done; the destination continues where it stopped.
            drop(src);
            assert!(
                dst.verify_memory()?.ok(),
                "destination memory bad before run"
            );
            dst.resume().map_err(|e| anyhow!(e))?;
            std::thread::sleep(Duration::from_millis(200));
            pause(&mut dst)?;
            let after = dst.guest_stats();
            eprintln!("before {before:?}\nafter {after:?}");
            for (b, a) in before.per_vcpu.iter().zip(&after.per_vcpu) {
                assert!(
                    a.iterations > b.iterations + 100,
                    "no progress after restore"
                );
                assert!(a.last_tsc > b.last_tsc, "guest TSC went backwards");
            }
            let rep = dst.verify_memory()?;
            assert!(rep.ok(), "{rep:?}");
            // Copying 32 MiB and restoring took well over the 100 µs threshold: every vCPU
            // logged one gap across the switchover, and its earlier gaps stay before it.
            let sp = dst.guest_gap_split()?;
            eprintln!("gap split: {sp:?}");
            assert!(sp.complete, "{sp:?}");
            assert!(
                sp.per_vcpu.iter().all(|v| v.switch_gap_us.is_some()),
                "{sp:?}"
            );
            // The guest continued; it did not start over.
            assert!(
                !dst.serial_output().contains("up"),
                "{}",
                dst.serial_output()
            );
            // Restoring into a VM of another shape is refused.
            let mut other = KvmVm::new_destination(&cfg(Workload::Verifier, 1, 32))?;
            assert!(other.restore_state(&blob).is_err());
        }
        Ok(())
    }

    /// The verifier guest keeps its iteration counter in r12 and publishes it to its stats
    /// page right after incrementing it, so a paused vCPU's r12 is the published count or one
    /// more.
    fn assert_state_is_current(st: &VmState, vm: &KvmVm) {
        let stats = vm.guest_stats();
        for (v, g) in st.vcpus.iter().zip(&stats.per_vcpu) {
            assert!(
                v.regs.r12 == g.iterations || v.regs.r12 == g.iterations + 1,
                "vCPU {}: saved r12 {} but the guest published {} iterations",
                v.id,
                v.regs.r12,
                g.iterations
            );
        }
    }

    /// Waits (at most 5 s) until every vCPU of the guest made progress past `since`, so every
    /// vCPU thread is in its run loop (a pause then stops each one inside it).
    fn wait_progress(vm: &KvmVm, since: &ferry_kvm::GuestStats) -> Result<()> {
        let t = Instant::now();
        loop {
            let now = vm.guest_stats();
            if now
                .per_vcpu
                .iter()
                .zip(&since.per_vcpu)
                .all(|(a, b)| a.iterations > b.iterations)
            {
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(5) {
                return Err(anyhow!("guest made no progress in 5 s: {now:?}"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn save_while_parking_is_fresh_and_equals_an_inline_save() -> Result<()> {
        if !kvm() {
            return Ok(());
        }
        let mut vm = KvmVm::new_source(&cfg(Workload::Verifier, 2, 32))?;
        let start = vm.guest_stats();
        vm.start()?;
        std::thread::sleep(Duration::from_millis(100));
        wait_progress(&vm, &start)?;
        pause(&mut vm)?;
        let s1 = VmState::decode(&vm.save_state().map_err(|e| anyhow!(e))?)?;
        assert!(
            vm.timings().save_captured,
            "first save did not use the captures"
        );
        eprintln!(
            "captured: save {:?}, per-vCPU capture {:?}, steps {:?}",
            vm.timings().last_save,
            vm.timings().vcpu_save,
            vm.timings().save_steps
        );
        assert_state_is_current(&s1, &vm);
        // The captures are consumed: the same pause saved again is saved inline, and must be
        // the same state.
        let s2 = VmState::decode(&vm.save_state().map_err(|e| anyhow!(e))?)?;
        assert!(!vm.timings().save_captured, "a capture was used twice");
        eprintln!(
            "inline: save {:?}, per vCPU {:?}",
            vm.timings().last_save,
            vm.timings().vcpu_save
        );
        assert_same_state(&s1, &s2);
        // Run on, pause again: a fresh capture, not the previous one.
        let before = vm.guest_stats();
        vm.resume().map_err(|e| anyhow!(e))?;
        std::thread::sleep(Duration::from_millis(50));
        wait_progress(&vm, &before)?;
        pause(&mut vm)?;
        let s3 = VmState::decode(&vm.save_state().map_err(|e| anyhow!(e))?)?;
        assert!(vm.timings().save_captured);
        assert_state_is_current(&s3, &vm);
        for (a, b) in s1.vcpus.iter().zip(&s3.vcpus) {
            assert!(
                b.regs.r12 > a.regs.r12,
                "vCPU {}: second capture r12 {} did not move on from {}",
                a.id,
                b.regs.r12,
                a.regs.r12
            );
        }
        // A capture does not outlive its pause: pause (captured, never saved), run on, pause
        // with capture off. The save must not use the stale capture.
        let before = vm.guest_stats();
        vm.resume().map_err(|e| anyhow!(e))?;
        wait_progress(&vm, &before)?;
        pause(&mut vm)?;
        vm.set_capture_on_pause(false);
        let before = vm.guest_stats();
        vm.resume().map_err(|e| anyhow!(e))?;
        wait_progress(&vm, &before)?;
        std::thread::sleep(Duration::from_millis(20));
        pause(&mut vm)?;
        let s4 = VmState::decode(&vm.save_state().map_err(|e| anyhow!(e))?)?;
        assert!(!vm.timings().save_captured, "a stale capture was used");
        assert_state_is_current(&s4, &vm);
        assert!(vm.verify_memory()?.ok());
        Ok(())
    }

    #[test]
    fn failed_vcpu_restore_on_resume_runs_no_vcpu() -> Result<()> {
        if !kvm() {
            return Ok(());
        }
        let c = cfg(Workload::Verifier, 2, 32);
        let mut src = KvmVm::new_source(&c)?;
        src.start()?;
        std::thread::sleep(Duration::from_millis(100));
        pause(&mut src)?;
        let before = src.guest_stats();
        let good = src.save_state().map_err(|e| anyhow!(e))?;
        // vCPU 1 in long mode (EFER.LME, CR0.PG) without CR4.PAE: KVM_SET_SREGS refuses it
        // (EINVAL), while the blob itself decodes and vCPU 0 restores fine.
        let mut st = VmState::decode(&good)?;
        assert!(st.vcpus[1].sregs.efer & 0x100 != 0 && st.vcpus[1].sregs.cr0 >> 31 == 1);
        st.vcpus[1].sregs.cr4 &= !0x20;
        let bad = st.encode();

        let mut dst = KvmVm::new_destination(&c)?;
        assert!(dst.memory().copy_from(&src.memory()));
        dst.restore_state(&bad).map_err(|e| anyhow!(e))?;
        let t = Instant::now();
        let err = dst
            .resume()
            .expect_err("resume with a state KVM refuses succeeded");
        eprintln!("resume failed after {:?}: {err}", t.elapsed());
        match err.downcast_ref::<ferry_kvm::VmRunError>() {
            Some(ferry_kvm::VmRunError::RestoreFailed { vcpu: 1, source }) => assert!(
                matches!(
                    **source,
                    ferry_kvm::RestoreStateError::Vcpu {
                        vcpu: 1,
                        what: "sregs",
                        ..
                    }
                ),
                "{source:?}"
            ),
            other => panic!("unexpected error {other:?} ({err})"),
        }
        assert!(!dst.is_running());
        // No vCPU entered KVM_RUN, now or later, and the guest made no progress.
        std::thread::sleep(Duration::from_millis(100));
        let runs = |vm: &KvmVm| {
            vm.exit_counters()
                .runs
                .load(std::sync::atomic::Ordering::SeqCst)
        };
        assert_eq!(runs(&dst), 0, "a vCPU ran after a failed restore");
        assert_eq!(dst.resume_to_run(), None, "a vCPU went on to run");
        let stuck = dst.guest_stats();
        for (b, a) in before.per_vcpu.iter().zip(&stuck.per_vcpu) {
            assert_eq!(a.iterations, b.iterations, "the guest ran");
        }
        // It is left without a state: resuming again is refused, not a run of half a state.
        assert!(
            dst.resume().is_err_and(|e| matches!(
                e.downcast_ref::<ferry_kvm::VmRunError>(),
                Some(ferry_kvm::VmRunError::NotRestored)
            )),
            "resume after a failed restore"
        );
        assert_eq!(runs(&dst), 0);
        // A good state then restores and runs.
        dst.restore_state(&good).map_err(|e| anyhow!(e))?;
        dst.resume().map_err(|e| anyhow!(e))?;
        std::thread::sleep(Duration::from_millis(100));
        pause(&mut dst)?;
        let after = dst.guest_stats();
        for (b, a) in before.per_vcpu.iter().zip(&after.per_vcpu) {
            assert!(
                a.iterations > b.iterations + 100,
                "no progress after restore"
            );
        }
        assert!(dst.verify_memory()?.ok());

        // Restoring on the calling thread instead, the same state fails in restore_state.
        let mut inline = KvmVm::new_destination(&c)?;
        inline.set_restore_on_resume(false);
        assert!(inline.restore_state(&bad).is_err());
        Ok(())
    }

    /// Restore on resume against restore on the calling thread, and save while parking against
    /// saving on the calling thread, in-process on 2 vCPUs: prints the figures (measured, not
    /// asserted; use a release build).
    #[test]
    fn state_transfer_modes_measured() -> Result<()> {
        if !kvm() {
            return Ok(());
        }
        let c = cfg(Workload::Verifier, 2, 32);
        let mut src = KvmVm::new_source(&c)?;
        let mut dst = KvmVm::new_destination(&c)?;
        let pct = |v: &mut Vec<Duration>, p: usize| {
            v.sort();
            v[(v.len() - 1) * p / 100]
        };
        let rounds = 30;
        // (pause, save, pause + save, slowest vCPU's own save) for capture off/on; (restore, resume, to run,
        // restore + to run) for restore on resume off/on. Alternated so both see the same load.
        let mut save = [[(); 4].map(|_| Vec::new()), [(); 4].map(|_| Vec::new())];
        let mut rest = [[(); 4].map(|_| Vec::new()), [(); 4].map(|_| Vec::new())];
        for i in 0..rounds * 2 {
            let m = i % 2;
            src.set_capture_on_pause(m == 1);
            // Only one VM runs at a time, as in a migration's blackout.
            let before = src.guest_stats();
            src.resume().map_err(|e| anyhow!(e))?;
            std::thread::sleep(Duration::from_millis(5));
            wait_progress(&src, &before)?;
            pause(&mut src)?;
            let blob = src.save_state().map_err(|e| anyhow!(e))?;
            let t = src.timings();
            assert_eq!(t.save_captured, m == 1);
            save[m][0].push(t.last_pause);
            save[m][1].push(t.last_save);
            save[m][2].push(t.last_pause + t.last_save);
            save[m][3].push(t.vcpu_save.iter().copied().max().unwrap_or_default());
            assert!(dst.memory().copy_from(&src.memory()));

            dst.set_restore_on_resume(m == 1);
            dst.restore_state(&blob).map_err(|e| anyhow!(e))?;
            dst.resume().map_err(|e| anyhow!(e))?;
            let t = Instant::now();
            let to_run = loop {
                if let Some(d) = dst.resume_to_run() {
                    break d;
                }
                assert!(t.elapsed() < Duration::from_secs(5), "vCPUs never ran");
                std::thread::sleep(Duration::from_micros(200));
            };
            let t = dst.timings();
            rest[m][0].push(t.last_restore);
            rest[m][1].push(t.last_resume);
            rest[m][2].push(to_run);
            rest[m][3].push(t.last_restore + to_run);
            pause(&mut dst)?;
        }
        for (m, name) in [(0, "save on the calling thread"), (1, "save while parking")] {
            let [p, s, ps, v] = &mut save[m];
            eprintln!(
                "{name}: pause p50 {:?} p90 {:?}; save p50 {:?} p90 {:?}; pause+save p50 {:?} p90 {:?}; slowest vCPU's save p50 {:?}",
                pct(p, 50),
                pct(p, 90),
                pct(s, 50),
                pct(s, 90),
                pct(ps, 50),
                pct(ps, 90),
                pct(v, 50)
            );
        }
        for (m, name) in [
            (0, "restore on the calling thread"),
            (1, "restore on resume"),
        ] {
            let [r, re, tr, total] = &mut rest[m];
            eprintln!(
                "{name}: restore p50 {:?} p90 {:?}; resume p50 {:?} p90 {:?}; resume until every vCPU about to run p50 {:?} p90 {:?}; restore + that p50 {:?} p90 {:?}",
                pct(r, 50),
                pct(r, 90),
                pct(re, 50),
                pct(re, 90),
                pct(tr, 50),
                pct(tr, 90),
                pct(total, 50),
                pct(total, 90)
            );
        }
        assert!(dst.verify_memory()?.ok());
        Ok(())
    }

    #[test]
    fn guest_sees_blackout_as_a_gap() -> Result<()> {
        if !kvm() {
            return Ok(());
        }
        let mut vm = KvmVm::new_source(&cfg(Workload::Verifier, 1, 16))?;
        vm.start()?;
        std::thread::sleep(Duration::from_millis(50));
        pause(&mut vm)?;
        std::thread::sleep(Duration::from_millis(30));
        vm.resume().map_err(|e| anyhow!(e))?;
        std::thread::sleep(Duration::from_millis(50));
        pause(&mut vm)?;
        let st = vm.guest_stats();
        eprintln!("{st:?}");
        assert!(st.max_gap_us >= 30_000, "30 ms pause not seen: {st:?}");
        assert!(st.stall_us_over_100 >= 30_000);
        Ok(())
    }

    #[test]
    fn gap_log_places_a_host_pause_after_the_pause_point() -> Result<()> {
        if !kvm() {
            return Ok(());
        }
        let mut vm = KvmVm::new_source(&cfg(Workload::Verifier, 2, 32))?;
        vm.start()?;
        std::thread::sleep(Duration::from_millis(300));
        pause(&mut vm)?;
        // The saved state records each vCPU's guest TSC: the split point.
        vm.save()?;
        let tsc = vm.state_tsc().to_vec();
        let before = vm.guest_gap_log();
        let held = Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        vm.resume().map_err(|e| anyhow!(e))?;
        let held = held.elapsed();
        std::thread::sleep(Duration::from_millis(200));
        pause(&mut vm)?;
        let log = vm.guest_gap_log();
        let sp = vm.guest_gap_split()?;
        eprintln!(
            "host pause {held:?}; split: pre {:?}, switch {:?} µs, after {:?}, lost {}",
            sp.pre, sp.switch_gap_us, sp.after, sp.lost
        );
        assert_eq!(tsc.len(), 2);
        assert!(sp.complete && sp.lost == 0, "{sp:?}");
        for (i, v) in log.vcpus.iter().enumerate() {
            let t = tsc[i];
            // Every gap logged before the pause is classified as before it.
            let b = &before.vcpus[i];
            assert!(b.entries.iter().all(|e| e.end_tsc <= t), "vCPU {i}");
            assert_eq!(sp.per_vcpu[i].pre.count, b.written, "vCPU {i}");
            assert_eq!(v.entries[..b.entries.len()], b.entries[..], "vCPU {i}");
            // One logged gap spans the pause point, at least as long as the pause.
            let span: Vec<_> = v
                .entries
                .iter()
                .filter(|e| e.start_tsc() <= t && e.end_tsc > t)
                .collect();
            assert_eq!(span.len(), 1, "vCPU {i}: {span:?}");
            let us = sp.per_vcpu[i].switch_gap_us.unwrap_or(0);
            assert!(
                (20_000..1_020_000).contains(&us),
                "vCPU {i}: gap across a 20 ms pause was {us} µs"
            );
            assert_eq!(us, span[0].ticks * 1000 / log.tsc_khz);
            // Most of it after the pause point: the 20 ms hold came after the save.
            let (to, from) = sp.per_vcpu[i].switch_parts_us.unwrap_or((0, 0));
            assert!(
                from >= 20_000 && to + from <= us + 1,
                "vCPU {i}: {to} + {from}"
            );
            // The whole-run counters agree with the log.
            assert_eq!(v.stalls, v.written);
            assert_eq!(
                v.stall_ticks,
                v.entries.iter().map(|e| e.ticks).sum::<u64>()
            );
            assert!(v.max_gap_ticks >= span[0].ticks);
        }
        assert_eq!(
            sp.switch_gap_us,
            sp.per_vcpu.iter().filter_map(|s| s.switch_gap_us).max()
        );
        // The rings are not data.
        assert!(vm.verify_memory()?.ok());
        Ok(())
    }

    /// The guest TSC carries over a save/restore into a second VM: a 50 ms hold between the
    /// restore and the resume shows up after the split point, in the gap across it.
    #[test]
    fn gap_split_across_a_restore_sees_the_hold() -> Result<()> {
        if !kvm() {
            return Ok(());
        }
        let c = cfg(Workload::Verifier, 1, 16);
        let mut src = KvmVm::new_source(&c)?;
        src.start()?;
        std::thread::sleep(Duration::from_millis(200));
        let t0 = Instant::now();
        pause(&mut src)?;
        let blob = src.save_state().map_err(|e| anyhow!(e))?;
        let mut dst = KvmVm::new_destination(&c)?;
        assert!(dst.memory().copy_from(&src.memory()), "layouts differ");
        dst.restore_state(&blob).map_err(|e| anyhow!(e))?;
        std::thread::sleep(Duration::from_millis(50));
        let n0 = dst.guest_stats().iterations;
        dst.resume().map_err(|e| anyhow!(e))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while dst.guest_stats().iterations == n0 {
            assert!(Instant::now() < deadline, "no progress after resume");
            std::thread::yield_now();
        }
        let wall = t0.elapsed();
        std::thread::sleep(Duration::from_millis(20));
        pause(&mut dst)?;
        let sp = dst.guest_gap_split()?;
        let (to, from) = sp.switch_parts_us.unwrap_or((0, 0));
        eprintln!(
            "pause to first step {wall:?}; guest gap {:?} µs = {to} + {from}",
            sp.switch_gap_us
        );
        assert!(sp.complete, "{sp:?}");
        assert!(from >= 50_000, "the hold after restore not seen: {sp:?}");
        let gap = sp.switch_gap_us.unwrap_or(0);
        let wall_us = u64::try_from(wall.as_micros())?;
        assert!(
            gap >= 50_000 && gap <= wall_us + 1_000_000,
            "gap {gap} µs, wall {wall_us} µs"
        );
        Ok(())
    }

    /// Enough short host pauses to wrap the smallest gap-log ring: the guest's own index
    /// arithmetic wraps (entries stay in TSC order, nothing lands outside the ring), and the
    /// host reports the overwritten entries.
    #[test]
    fn gap_log_ring_wraps_in_the_guest() -> Result<()> {
        if !kvm() {
            return Ok(());
        }
        let mut vm = KvmVm::new_source(&cfg(Workload::Verifier, 1, 16))?;
        let cap = vm.plan().gap_log_entries;
        assert_eq!(cap, ferry_kvm::guest::GAP_LOG_MIN_ENTRIES);
        vm.start()?;
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        let mut written = 0;
        while written < cap + 100 {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "only {written} gaps logged in 60 s"
            );
            pause(&mut vm)?;
            written = vm.guest_gap_log().vcpus[0].written;
            // Hold > 100 µs (a logged gap), then let the guest make progress.
            std::thread::sleep(Duration::from_micros(300));
            vm.resume().map_err(|e| anyhow!(e))?;
            std::thread::sleep(Duration::from_micros(300));
        }
        pause(&mut vm)?;
        vm.save()?;
        let log = vm.guest_gap_log();
        let v = &log.vcpus[0];
        eprintln!(
            "{} gaps in {:?}, ring {cap}, lost {}",
            v.written,
            t.elapsed(),
            v.lost()
        );
        assert_eq!(v.lost(), v.written - cap);
        assert_eq!(v.entries.len() as u64, cap);
        assert_eq!(v.stalls, v.written);
        assert!(
            v.entries.windows(2).all(|w| w[0].end_tsc < w[1].end_tsc),
            "ring entries out of order after wrapping"
        );
        assert!(v.entries.iter().all(|e| e.ticks > 0 && e.end_tsc > e.ticks));
        let sp = vm.guest_gap_split()?;
        assert_eq!(sp.lost, v.lost());
        assert!(sp.complete, "only the oldest entries were lost: {sp:?}");
        assert_eq!(sp.pre.count, v.written);
        assert!(vm.verify_memory()?.ok());
        Ok(())
    }

    #[test]
    fn pause_resume_latency_measured() -> Result<()> {
        if !kvm() {
            return Ok(());
        }
        let w = Workload::Writer {
            working_set_mib: 8,
            rate_mib_s: None,
        };
        let mut vm = KvmVm::new_source(&cfg(w, 2, 32))?;
        vm.start()?;
        let mut pauses = Vec::new();
        let mut saves = Vec::new();
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(2));
            pause(&mut vm)?;
            pauses.push(vm.timings().last_pause);
            vm.save_state().map_err(|e| anyhow!(e))?;
            saves.push(vm.timings().last_save);
            vm.resume().map_err(|e| anyhow!(e))?;
        }
        pause(&mut vm)?;
        pauses.sort();
        saves.sort();
        let pct = |v: &[Duration], p: usize| v[(v.len() - 1) * p / 100];
        eprintln!(
            "pause (2 vCPUs): p50 {:?} p99 {:?} max {:?}; save_state: p50 {:?} p99 {:?}",
            pct(&pauses, 50),
            pct(&pauses, 99),
            pauses.last().context("no samples")?,
            pct(&saves, 50),
            pct(&saves, 99),
        );
        assert!(vm.verify_memory()?.ok());
        Ok(())
    }

    #[test]
    fn multiboot_kernel_boots_prints_and_migrates() -> Result<()> {
        if !kvm() {
            return Ok(());
        }
        use ferry_kvm::multiboot::{BOOT_MAGIC, DEMO_KERNEL_DATA, MBI_ADDR, demo_kernel};
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("kernel.elf");
        std::fs::write(&path, demo_kernel())?;
        let c = cfg(
            Workload::Kernel {
                path,
                cmdline: "ferry test cmdline".into(),
            },
            1,
            8,
        );
        let mut src = KvmVm::new_source(&c)?;
        src.start()?;
        // CPL0 code is emulated (slow) on PVM: poll for the greeting and a few dots.
        let t = Instant::now();
        while !src.serial_output().contains("...") && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Let the LAPIC timer (period ~16 ms) fire at least once.
        std::thread::sleep(Duration::from_millis(60));
        pause(&mut src)?;
        let out = src.serial_output();
        eprintln!("source serial: {:?}", &out[..out.len().min(80)]);
        assert!(
            out.starts_with("hello from multiboot: ferry test cmdline\n"),
            "{out:?}"
        );
        assert!(out.contains("..."), "{out:?}");
        let mem = src.memory();
        let words = mem.read_u64(DEMO_KERNEL_DATA).context("read")?;
        assert_eq!(words & 0xffff_ffff, u64::from(BOOT_MAGIC), "EAX");
        assert_eq!(words >> 32, MBI_ADDR, "EBX");
        let count_before = mem.read_u64(DEMO_KERNEL_DATA + 8).context("read")? & 0xffff_ffff;
        assert!(matches!(
            src.verify_memory(),
            Err(ferry_kvm::VerifyError::NoModel(_))
        ));

        // Migrate in-process: memcpy the RAM, move the state, run on.
        let blob = src.save_state().map_err(|e| anyhow!(e))?;
        let timers = timer_state(&VmState::decode(&blob)?);
        eprintln!("timers at save: {timers:x?}");
        // (PIT count, PIT mode, LVT timer, TMICT, IRR word with vector 0x30)
        assert_eq!(
            (timers.0, timers.1, timers.2, timers.3),
            (0x1234, 2, 0x20030, 0x100000)
        );
        assert!(
            timers.4 & (1 << 16) != 0,
            "LAPIC timer interrupt not pending"
        );
        let mut dst = KvmVm::new_destination(&c)?;
        assert!(dst.memory().copy_from(&mem));
        dst.restore_state(&blob).map_err(|e| anyhow!(e))?;
        let again = VmState::decode(&dst.save_state().map_err(|e| anyhow!(e))?)?;
        assert_eq!(
            timer_state(&again),
            timers,
            "timer/interrupt state lost in restore"
        );
        drop(src);
        dst.resume().map_err(|e| anyhow!(e))?;
        let t = Instant::now();
        while !dst.serial_output().contains("...") && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(20));
        }
        pause(&mut dst)?;
        let out2 = dst.serial_output();
        eprintln!("destination serial: {:?}", &out2[..out2.len().min(80)]);
        // It continues the dot loop; it does not boot again.
        assert!(out2.starts_with("..."), "{out2:?}");
        assert!(!out2.contains("hello"), "{out2:?}");
        let count_after = dst
            .memory()
            .read_u64(DEMO_KERNEL_DATA + 8)
            .context("read")?
            & 0xffff_ffff;
        assert!(
            count_after > count_before,
            "{count_before} -> {count_after}"
        );
        Ok(())
    }

    #[test]
    fn throttle_slows_the_guest() -> Result<()> {
        if !kvm() {
            return Ok(());
        }
        let w = Workload::Writer {
            working_set_mib: 4,
            rate_mib_s: None,
        };
        let mut vm = KvmVm::new_source(&cfg(w, 1, 16))?;
        vm.start()?;
        let rate = |vm: &KvmVm| -> f64 {
            let a = vm.guest_stats().iterations;
            let t = Instant::now();
            std::thread::sleep(Duration::from_millis(300));
            (vm.guest_stats().iterations - a) as f64 / t.elapsed().as_secs_f64()
        };
        let full = rate(&vm);
        assert!(vm.throttle(20).map_err(|e| anyhow!(e))?);
        let slow = rate(&vm);
        let sleeps = vm
            .exit_counters()
            .throttle_sleeps
            .load(std::sync::atomic::Ordering::Relaxed);
        vm.throttle(100).map_err(|e| anyhow!(e))?;
        let t = Instant::now();
        pause(&mut vm)?;
        eprintln!(
            "throttle: {full:.0} it/s at 100%, {slow:.0} it/s at 20% ({sleeps} sleeps); pause took {:?}",
            t.elapsed()
        );
        assert!(sleeps >= 5, "throttle never slept the vCPU");
        assert!(slow > 0.0, "throttled guest made no progress");
        assert!(vm.verify_memory()?.ok());
        Ok(())
    }

    /// (PIT ch0 count, PIT ch0 mode, LAPIC LVT timer, LAPIC TMICT, LAPIC IRR bits 32..63).
    fn timer_state(st: &VmState) -> (u32, u8, u32, u32, u32) {
        let regs = &st.vcpus[0].lapic.regs;
        let rd = |off: usize| {
            u32::from_le_bytes([
                regs[off].cast_unsigned(),
                regs[off + 1].cast_unsigned(),
                regs[off + 2].cast_unsigned(),
                regs[off + 3].cast_unsigned(),
            ])
        };
        let ch = &st.pit.channels[0];
        (ch.count, ch.mode, rd(0x320), rd(0x380), rd(0x210))
    }

    #[test]
    fn pause_completes_pending_port_io() -> Result<()> {
        if !kvm() {
            return Ok(());
        }
        // The idle guest spends nearly all its time in the host's handling of `out 0xf1`, so
        // pauses land right after that exit. KVM advances RIP past the OUT only on the next
        // KVM_RUN; pause must do that run, or the saved RIP points at the OUT again and the
        // destination would repeat it.
        let out_rip = ferry_kvm::guest::CODE + ferry_kvm::guest::ENTRY_IDLE + 0x28;
        let mut vm = KvmVm::new_source(&cfg(Workload::Idle, 1, 8))?;
        vm.start()?;
        let mut at_out = 0;
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(5));
            pause(&mut vm)?;
            let st = VmState::decode(&vm.save_state().map_err(|e| anyhow!(e))?)?;
            if st.vcpus[0].regs.rip == out_rip {
                at_out += 1;
            }
            vm.resume().map_err(|e| anyhow!(e))?;
        }
        pause(&mut vm)?;
        eprintln!("{at_out} of 20 pauses saved RIP at the OUT");
        assert!(
            at_out <= 3,
            "pending PIO exits are not completed before saving"
        );
        Ok(())
    }
}
