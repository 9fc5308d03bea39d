// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Integration tests of `ferry_engine::procmem`: the writers really change memory and the
//! atomic bitmap records exactly the pages they changed (also under concurrent harvesting, as a
//! pre-copy does), pause really stops them, state saved on one instance continues on another,
//! throttling slows them, and a destination writer blocks in a userfaultfd fault until the page
//! arrives. Small memory (a few MiB), bounded in time.

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {

    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread;
    use std::time::{Duration, Instant};

    use ferry_engine::memory::{MemBacking, PAGE_SIZE, ProcessMemory};
    use ferry_engine::procmem::{
        AtomicDirty, ProcVmConfig, ProcVmControlError, ProcessVm, WpDirtyTracker, WritePattern,
    };
    use ferry_engine::uffd::{Event, Features, Fill, PlaceMode, RegisterMode, Uffd};
    use ferry_engine::vm::{
        Backing, DirtyBitmap, DirtyTracker, GuestMemory, GuestRegion, VmControl,
    };

    fn cfg(pattern: WritePattern, backing: MemBacking) -> ProcVmConfig {
        ProcVmConfig {
            mem_bytes: 4 << 20,
            regions: 4,
            backing,
            hugepage: false,
            writers: 2,
            write_mib_s: None,
            pattern,
            seed: 42,
            fill_percent: 50,
        }
    }

    fn snapshot(mem: &ProcessMemory) -> Vec<Vec<u8>> {
        mem.mem_regions()
            .iter()
            .map(|r| {
                let mut v = vec![0u8; usize::try_from(r.len()).unwrap()];
                r.read(0, &mut v).unwrap();
                v
            })
            .collect()
    }

    fn page_of(buf: &[u8], p: usize) -> &[u8] {
        let ps = usize::try_from(PAGE_SIZE).unwrap();
        &buf[p * ps..(p + 1) * ps]
    }

    /// Global indices of the pages that differ between two snapshots.
    fn changed_pages(a: &[Vec<u8>], b: &[Vec<u8>]) -> Vec<usize> {
        let ps = usize::try_from(PAGE_SIZE).unwrap();
        let mut out = Vec::new();
        let mut base = 0;
        for (ra, rb) in a.iter().zip(b) {
            for p in 0..ra.len() / ps {
                if page_of(ra, p) != page_of(rb, p) {
                    out.push(base + p);
                }
            }
            base += ra.len() / ps;
        }
        out
    }

    fn bit(bm: &DirtyBitmap, r: usize, p: usize) -> bool {
        bm.regions[r][p / 64] & (1 << (p % 64)) != 0
    }

    fn control_err(e: &ferry_engine::vm::BoxError) -> &ProcVmControlError {
        e.downcast_ref::<ProcVmControlError>().unwrap()
    }

    /// The atomic bitmap, or the userfaultfd write-protect tracker (None: skipped).
    fn make_tracker(vm: &ProcessVm, wp: bool, test: &str) -> Option<Box<dyn DirtyTracker>> {
        if !wp {
            return Some(Box::new(vm.tracker()));
        }
        match WpDirtyTracker::new(vm.memory()) {
            Ok(t) => Some(Box::new(t)),
            Err(e) => {
                eprintln!("{test}: skipped, no userfaultfd write protection: {e} ({e:?})");
                None
            }
        }
    }

    /// Pages changed between two snapshots == pages whose bit was harvested.
    fn bitmap_matches_changes(pattern: WritePattern, backing: MemBacking, wp: bool) {
        let mut vm = ProcessVm::new(cfg(pattern, backing)).unwrap();
        let Some(mut tracker) = make_tracker(&vm, wp, "bitmap_matches_changes") else {
            return;
        };
        vm.start().unwrap();
        thread::sleep(Duration::from_millis(10));
        vm.pause().unwrap();
        let mem = vm.memory();
        let before = snapshot(&mem);
        tracker.start().unwrap();
        let written_before = vm.stats().writes;
        vm.resume().unwrap();
        thread::sleep(Duration::from_millis(30));
        vm.pause().unwrap();
        let after = snapshot(&mem);
        let mut bm = DirtyBitmap::for_regions(mem.regions());
        tracker.harvest(&mut bm).unwrap();
        let mut changed = 0u64;
        for (r, (b, a)) in before.iter().zip(&after).enumerate() {
            for p in 0..b.len() / usize::try_from(PAGE_SIZE).unwrap() {
                let differs = page_of(b, p) != page_of(a, p);
                changed += u64::from(differs);
                assert_eq!(
                    differs,
                    bit(&bm, r, p),
                    "{pattern:?}/{backing:?}: region {r} page {p}: changed={differs}"
                );
            }
        }
        assert!(changed > 0, "writers changed nothing");
        assert_eq!(bm.count(), changed);
        assert!(vm.stats().writes > written_before);
    }

    #[test]
    fn bitmap_matches_changed_pages_random_anonymous() {
        bitmap_matches_changes(WritePattern::Random, MemBacking::Anonymous, false);
    }

    #[test]
    fn bitmap_matches_changed_pages_hotset_memfd() {
        bitmap_matches_changes(WritePattern::HotSet, MemBacking::Memfd, false);
    }

    #[test]
    fn bitmap_matches_changed_pages_sequential() {
        bitmap_matches_changes(WritePattern::Sequential, MemBacking::Anonymous, false);
    }

    #[test]
    fn wp_tracker_matches_changed_pages_anonymous() {
        bitmap_matches_changes(WritePattern::HotSet, MemBacking::Anonymous, true);
    }

    #[test]
    fn wp_tracker_matches_changed_pages_memfd() {
        bitmap_matches_changes(WritePattern::Random, MemBacking::Memfd, true);
    }

    /// A miniature pre-copy: full copy while writers run, three rounds of harvest + copy while
    /// they run, then pause, final harvest + copy. The copy must equal the source byte for byte.
    #[test]
    fn concurrent_harvest_supports_precopy() {
        precopy(false);
    }

    #[test]
    fn wp_tracker_supports_precopy() {
        precopy(true);
    }

    fn precopy(wp: bool) {
        let c = ProcVmConfig {
            write_mib_s: Some(200),
            ..cfg(WritePattern::HotSet, MemBacking::Anonymous)
        };
        let mut src = ProcessVm::new(c.clone()).unwrap();
        let dst = ProcessVm::new_destination(&c).unwrap();
        let (smem, dmem) = (src.memory(), dst.memory());
        let Some(mut tracker) = make_tracker(&src, wp, "precopy") else {
            return;
        };
        src.start().unwrap();
        tracker.start().unwrap();
        let mut page = vec![0u8; usize::try_from(PAGE_SIZE).unwrap()];
        let copy_page = |r: usize, p: u64, page: &mut Vec<u8>| {
            smem.mem_regions()[r].read(p * PAGE_SIZE, page).unwrap();
            dmem.mem_regions()[r].write(p * PAGE_SIZE, page).unwrap();
        };
        for (r, region) in smem.mem_regions().iter().enumerate() {
            for p in 0..region.len() / PAGE_SIZE {
                copy_page(r, p, &mut page);
            }
        }
        let mut bm = DirtyBitmap::for_regions(smem.regions());
        let mut round = |bm: &mut DirtyBitmap, tracker: &mut dyn DirtyTracker| -> u64 {
            bm.clear();
            tracker.harvest(bm).unwrap();
            for (r, words) in bm.regions.iter().enumerate() {
                for (w, &word) in words.iter().enumerate() {
                    let mut bits = word;
                    while bits != 0 {
                        let b = u64::from(bits.trailing_zeros());
                        bits &= bits - 1;
                        copy_page(r, u64::try_from(w).unwrap() * 64 + b, &mut page);
                    }
                }
            }
            bm.count()
        };
        let mut sent = 0;
        for _ in 0..3 {
            thread::sleep(Duration::from_millis(5));
            sent += round(&mut bm, tracker.as_mut());
        }
        src.pause().unwrap();
        sent += round(&mut bm, tracker.as_mut());
        assert!(sent > 0, "no page was dirtied");
        assert_eq!(
            snapshot(&smem),
            snapshot(&dmem),
            "copy differs from the source"
        );
    }

    #[test]
    fn pause_really_stops_writes() {
        let mut vm = ProcessVm::new(cfg(WritePattern::Random, MemBacking::Anonymous)).unwrap();
        vm.start().unwrap();
        thread::sleep(Duration::from_millis(10));
        vm.pause().unwrap();
        let stats = vm.stats();
        assert!(stats.last_pause_ns > 0);
        eprintln!(
            "pause of {} writers took {} µs",
            2,
            stats.last_pause_ns / 1000
        );
        let mem = vm.memory();
        let a = snapshot(&mem);
        thread::sleep(Duration::from_millis(50));
        assert_eq!(a, snapshot(&mem), "memory changed while paused");
        assert_eq!(vm.stats().writes, stats.writes);
        // Pausing twice is harmless; saving needs the pause.
        vm.pause().unwrap();
        vm.resume().unwrap();
        let e = vm.save_state().unwrap_err();
        assert!(matches!(control_err(&e), ProcVmControlError::Running));
        thread::sleep(Duration::from_millis(20));
        vm.pause().unwrap();
        assert!(vm.stats().writes > stats.writes, "writers did not resume");
        // The pause is a gap the writers saw.
        assert!(vm.stats().max_gap_ns >= 50_000_000, "{:?}", vm.stats());
    }

    #[test]
    fn save_restore_continues_on_destination() {
        let c = ProcVmConfig {
            writers: 1,
            write_mib_s: Some(16),
            ..cfg(WritePattern::Sequential, MemBacking::Memfd)
        };
        let mut src = ProcessVm::new(c.clone()).unwrap();
        src.start().unwrap();
        thread::sleep(Duration::from_millis(30));
        src.pause().unwrap();
        let blob = src.save_state().unwrap();
        let saved = src.stats().writes;
        assert!(saved > 0);
        let smem = src.memory();
        let src_snap = snapshot(&smem);

        let mut dst = ProcessVm::new_destination(&c).unwrap();
        assert!(!dst.started());
        let dmem = dst.memory();
        for (s, d) in smem.mem_regions().iter().zip(dmem.mem_regions()) {
            let mut buf = vec![0u8; usize::try_from(s.len()).unwrap()];
            s.read(0, &mut buf).unwrap();
            d.write(0, &buf).unwrap();
        }
        // Wrong blobs are refused.
        let e = dst.restore_state(&blob[..10]).unwrap_err();
        assert!(matches!(
            control_err(&e),
            ProcVmControlError::BadState { .. }
        ));
        let other = ProcVmConfig {
            seed: 7,
            ..c.clone()
        };
        let mut wrong = ProcessVm::new_destination(&other).unwrap();
        let e = wrong.restore_state(&blob).unwrap_err();
        assert!(matches!(
            control_err(&e),
            ProcVmControlError::ConfigMismatch { field: "seed" }
        ));

        dst.restore_state(&blob).unwrap();
        assert_eq!(dst.stats().writes, saved, "counter restored");
        let blackout = Duration::from_millis(20);
        thread::sleep(blackout);
        dst.resume().unwrap();
        thread::sleep(Duration::from_millis(30));
        dst.pause().unwrap();
        let st = dst.stats();
        assert!(st.writes > saved, "destination writers did not continue");
        // The first write on the destination is measured from the last one on the source.
        assert!(
            st.max_gap_ns >= u64::try_from(blackout.as_nanos()).unwrap(),
            "gap across the migration not seen: {st:?}"
        );
        assert_ne!(src_snap, snapshot(&dmem), "destination memory unchanged");
        assert_eq!(src_snap, snapshot(&smem), "source changed while paused");
        // The sequential writer continued where it stopped: the source swept pages 0..P, the
        // destination changed pages from P on (not from 0 again).
        let initial = snapshot(&ProcessVm::new(c.clone()).unwrap().memory());
        let src_changed = changed_pages(&initial, &src_snap);
        let dst_changed = changed_pages(&src_snap, &snapshot(&dmem));
        let last_src = *src_changed.last().unwrap();
        assert_eq!(
            src_changed,
            (0..=last_src).collect::<Vec<_>>(),
            "source sweep not contiguous"
        );
        assert_eq!(
            dst_changed.first(),
            Some(&(last_src + 1)),
            "destination did not continue"
        );
        let e = dst.restore_state(&blob).unwrap_err();
        assert!(matches!(
            control_err(&e),
            ProcVmControlError::AlreadyStarted
        ));
    }

    /// Prints (does not assert) what the process VM costs: writer speed, pause latency,
    /// harvest time of a 1 GiB bitmap.
    #[test]
    fn measure_writers_pause_and_harvest() {
        let mut vm = ProcessVm::new(cfg(WritePattern::Random, MemBacking::Anonymous)).unwrap();
        vm.start().unwrap();
        thread::sleep(Duration::from_millis(20));
        let w0 = vm.stats().writes;
        let t = Instant::now();
        thread::sleep(Duration::from_millis(200));
        let rate = (vm.stats().writes - w0) as f64 / t.elapsed().as_secs_f64();
        let mut pauses = Vec::new();
        for _ in 0..100 {
            vm.pause().unwrap();
            pauses.push(vm.stats().last_pause_ns);
            vm.resume().unwrap();
            thread::sleep(Duration::from_millis(1));
        }
        vm.pause().unwrap();
        pauses.sort_unstable();
        eprintln!(
            "2 unlimited writers: {:.1} M writes/s total; pause of 2 writers over 100 pauses: \
             p50 {} µs, p99 {} µs, max {} µs",
            rate / 1e6,
            pauses[50] / 1000,
            pauses[98] / 1000,
            pauses[99] / 1000
        );
        // A 1 GiB-shaped bitmap (no memory behind it is needed to time the harvest).
        let regions = vec![GuestRegion {
            gpa: 0,
            len: 1 << 30,
            host_addr: 0,
            backing: Backing::Anonymous,
            page_size: PAGE_SIZE,
        }];
        let dirty = AtomicDirty::for_regions(&regions);
        let mut out = DirtyBitmap::for_regions(&regions);
        let t = Instant::now();
        dirty.harvest_into(&mut out);
        let clean = t.elapsed();
        for p in 0..(1u64 << 30) / PAGE_SIZE {
            dirty.mark(0, p);
        }
        let t = Instant::now();
        dirty.harvest_into(&mut out);
        let full = t.elapsed();
        assert_eq!(out.count(), (1 << 30) / PAGE_SIZE);
        eprintln!(
            "atomic bitmap harvest, 1 GiB: clean {clean:?}, all dirty {full:?} (debug build)"
        );
    }

    #[test]
    fn throttle_slows_writers() {
        let c = ProcVmConfig {
            writers: 1,
            write_mib_s: Some(64),
            ..cfg(WritePattern::Random, MemBacking::Anonymous)
        };
        let mut vm = ProcessVm::new(c).unwrap();
        vm.start().unwrap();
        let measure = |vm: &ProcessVm| {
            let w0 = vm.stats().writes;
            let t = Instant::now();
            thread::sleep(Duration::from_millis(300));
            (vm.stats().writes - w0) as f64 / t.elapsed().as_secs_f64()
        };
        let full = measure(&vm);
        assert!(vm.throttle(10).unwrap());
        thread::sleep(Duration::from_millis(20));
        let slow = measure(&vm);
        eprintln!("writes/s at 100%: {full:.0}, at 10%: {slow:.0} (target 16384 pages/s at 100%)");
        assert!(full > 0.0);
        assert!(
            slow < full / 2.0,
            "throttle had no effect: {full} -> {slow}"
        );
    }

    /// A destination writer touching a missing page blocks in the userfaultfd fault until a handler
    /// places the page; the writer measures that wait as a stall.
    #[test]
    fn destination_writer_stalls_in_userfault_until_page_arrives() {
        let uffd = match Uffd::open(false, Features::THREAD_ID) {
            Ok(u) => u,
            Err(e) => {
                eprintln!("destination_writer_stalls: skipped, cannot create a userfaultfd: {e}");
                return;
            }
        };
        let c = ProcVmConfig {
            writers: 1,
            regions: 2,
            mem_bytes: 1 << 20,
            ..cfg(WritePattern::Random, MemBacking::Anonymous)
        };
        let mut src = ProcessVm::new(c.clone()).unwrap();
        src.start().unwrap();
        thread::sleep(Duration::from_millis(10));
        src.pause().unwrap();
        let blob = src.save_state().unwrap();
        let smem = src.memory();

        let mut dst = ProcessVm::new_destination(&c).unwrap();
        let dmem = dst.memory();
        for r in dmem.regions() {
            // SAFETY: destination guest memory, accessed only as raw guest memory.
            unsafe { uffd.register(r.host_addr as u64, r.len, RegisterMode::MISSING) }.unwrap();
        }
        dst.restore_state(&blob).unwrap();
        let delay = Duration::from_millis(3);
        let done = AtomicBool::new(false);
        let mut placed = Vec::new();
        thread::scope(|s| {
            let handler = s.spawn(|| {
                let mut events = Vec::new();
                let mut page = vec![0u8; usize::try_from(PAGE_SIZE).unwrap()];
                let end = Instant::now() + Duration::from_secs(10);
                while !done.load(Ordering::Acquire) && Instant::now() < end {
                    if !uffd.poll(Some(Duration::from_millis(10))).unwrap() {
                        continue;
                    }
                    events.clear();
                    uffd.read_events(&mut events, 64).unwrap();
                    for ev in &events {
                        let Event::PageFault { addr, .. } = ev else {
                            continue;
                        };
                        // A slow "network": every fault waits before its page arrives.
                        thread::sleep(delay);
                        let pa = addr & !(PAGE_SIZE - 1);
                        let (ri, off) = dmem
                            .regions()
                            .iter()
                            .enumerate()
                            .find_map(|(i, r)| {
                                let h = r.host_addr as u64;
                                (pa >= h && pa < h + r.len).then(|| (i, pa - h))
                            })
                            .unwrap();
                        smem.mem_regions()[ri].read(off, &mut page).unwrap();
                        let out = uffd.copy(pa, &page, PAGE_SIZE, PlaceMode::WAKE).unwrap();
                        assert!(matches!(out, Fill::Done | Fill::Exists), "{out:?}");
                        placed.push((ri, off));
                    }
                }
            });
            dst.reset_stats();
            dst.resume().unwrap();
            thread::sleep(Duration::from_millis(60));
            dst.pause().unwrap();
            done.store(true, Ordering::Release);
            handler.join().unwrap();
        });
        let st = dst.stats();
        eprintln!(
            "destination writer under post-copy: {st:?}, {} pages placed",
            placed.len()
        );
        assert!(!placed.is_empty(), "no fault reached the handler");
        assert!(st.stalls >= 1, "{st:?}");
        assert!(
            st.max_gap_ns >= u64::try_from(delay.as_nanos()).unwrap(),
            "{st:?}"
        );
        for r in dmem.regions() {
            uffd.unregister(r.host_addr as u64, r.len).unwrap();
        }
    }
}
