// SPDX-License-Identifier: Apache-2.0 OR MIT
//! A destination VM works under userfaultfd: its RAM is never touched by `new_destination`,
//! `restore_state` or `resume`, so every page the vCPUs (or KVM on their behalf) touch arrives
//! through a MISSING fault that a handler thread resolves with `UFFDIO_COPY` from the source's
//! memory — a minimal in-process post-copy. (The real post-copy machinery is the engine's; this
//! test only shows the backend fits it.) Skips without /dev/kvm or userfaultfd (fails instead
//! under `FERRY_REQUIRE_CAPS=1`).

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use anyhow::{Result, anyhow, bail};
    use ferry_engine::uffd::{Event, Features, Fill, PlaceMode, RegisterMode, Uffd};
    use ferry_engine::vm::{GuestMemory, VmControl};
    use ferry_kvm::{KvmVm, MemBacking, VmConfig, Workload};

    /// Reports a missing capability: a skip, or a failure under `FERRY_REQUIRE_CAPS=1`.
    fn skip(reason: &str) {
        assert!(
            std::env::var("FERRY_REQUIRE_CAPS").as_deref() != Ok("1"),
            "required capability missing (FERRY_REQUIRE_CAPS=1): {reason}"
        );
        eprintln!("SKIP: {reason}");
    }

    fn run(backing: MemBacking) -> Result<()> {
        let cfg = VmConfig {
            mem_bytes: 32 << 20,
            vcpus: 2,
            workload: Workload::Verifier,
            backing,
            ..Default::default()
        };
        let mut src = KvmVm::new_source(&cfg)?;
        src.start()?;
        std::thread::sleep(Duration::from_millis(200));
        src.pause().map_err(|e| anyhow!(e))?;
        let before = src.guest_stats();
        let blob = src.save_state().map_err(|e| anyhow!(e))?;

        // Not user-mode-only: KVM touches guest pages from the kernel.
        let uffd = match Uffd::open(false, Features::NONE) {
            Ok(u) => Arc::new(u),
            Err(e) => {
                skip(&format!("userfaultfd unavailable: {e}"));
                return Ok(());
            }
        };
        let mut dst = KvmVm::new_destination(&cfg)?;
        let (smem, dmem) = (src.memory(), dst.memory());
        for r in dmem.regions() {
            // SAFETY: guest RAM owned by `dst`, which nothing in this test holds references
            // into; the VM has not run.
            unsafe { uffd.register(r.host_addr as u64, r.len, RegisterMode::MISSING) }?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let faults = Arc::new(AtomicU64::new(0));
        // (dst host addr, src host addr, len) per region, for the handler.
        let map: Vec<(u64, u64, u64)> = dmem
            .regions()
            .iter()
            .zip(smem.regions())
            .map(|(d, s)| (d.host_addr as u64, s.host_addr as u64, d.len))
            .collect();
        let handler = {
            let (stop, faults) = (Arc::clone(&stop), Arc::clone(&faults));
            let uffd = Arc::clone(&uffd);
            std::thread::spawn(move || -> Result<()> {
                let mut events = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    if !uffd.poll(Some(Duration::from_millis(10)))? {
                        continue;
                    }
                    events.clear();
                    uffd.read_events(&mut events, 16)?;
                    for ev in events.drain(..) {
                        let Event::PageFault { addr, .. } = ev else {
                            continue;
                        };
                        let page = addr & !4095;
                        let Some(&(d, s, _)) =
                            map.iter().find(|(d, _, l)| page >= *d && page < d + l)
                        else {
                            bail!("fault outside guest RAM at {page:#x}");
                        };
                        let src_addr = usize::try_from(s + (page - d))?;
                        // SAFETY: the source VM is paused and its RAM stays mapped while
                        // `smem` lives (the test holds it until the handler is joined).
                        let src =
                            unsafe { std::slice::from_raw_parts(src_addr as *const u8, 4096) };
                        match uffd.copy(page, src, 4096, PlaceMode::WAKE)? {
                            Fill::Done | Fill::Exists | Fill::Partial { .. } | Fill::Again => {}
                        }
                        faults.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(())
            })
        };

        // Nothing may have touched destination RAM so far.
        assert_eq!(
            faults.load(Ordering::SeqCst),
            0,
            "new_destination touched RAM"
        );
        dst.restore_state(&blob).map_err(|e| anyhow!(e))?;
        assert_eq!(faults.load(Ordering::SeqCst), 0, "restore touched RAM");
        let t = Instant::now();
        dst.resume().map_err(|e| anyhow!(e))?;
        std::thread::sleep(Duration::from_millis(300));
        dst.pause().map_err(|e| anyhow!(e))?;
        let during = faults.load(Ordering::SeqCst);
        let after = dst.guest_stats();
        let rep = dst.verify_memory()?;
        stop.store(true, Ordering::SeqCst);
        handler.join().map_err(|_| anyhow!("handler panicked"))??;
        eprintln!(
            "{backing:?}: {during} faults while running {:?}, guest max gap {} us, stalled {} us",
            t.elapsed(),
            after.max_gap_us,
            after.stall_us_over_100
        );
        if let Some(f) = dst.fault() {
            bail!("{f}");
        }
        assert!(during > 0, "the guest ran without faulting pages in");
        for (b, a) in before.per_vcpu.iter().zip(&after.per_vcpu) {
            assert!(
                a.iterations > b.iterations,
                "no progress on the destination"
            );
        }
        assert!(rep.ok(), "{rep:?}");
        Ok(())
    }

    #[test]
    fn destination_runs_under_userfaultfd() -> Result<()> {
        if !ferry_kvm::kvm_available() {
            skip("/dev/kvm cannot be opened");
            return Ok(());
        }
        run(MemBacking::Memfd)?;
        run(MemBacking::Anonymous)
    }
}
