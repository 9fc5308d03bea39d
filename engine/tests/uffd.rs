// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Integration tests of `ferry_engine::uffd` against the real kernel: missing faults resolved by
//! `UFFDIO_COPY`, minor faults on memfd resolved through an alias mapping + `UFFDIO_CONTINUE`,
//! `EEXIST`/`EAGAIN` outcomes, write-protect faults, zero pages, and a printed fault-latency
//! measurement. Every test skips (with a reason on stderr) when no userfaultfd can be created.

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {

    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread;
    use std::time::{Duration, Instant};

    use ferry_engine::memory::{MemOptions, MemRegion, PAGE_SIZE};
    use ferry_engine::uffd::{
        Event, Features, Fill, PlaceMode, ProbeMode, RegisterMode, Uffd, UffdOpError,
        probe_fault_latency,
    };

    /// Opens a kernel-mode userfaultfd, or explains why the test is skipped.
    fn open_or_skip(test: &str, features: Features) -> Option<Uffd> {
        match Uffd::open(false, features) {
            Ok(u) => Some(u),
            Err(e) => {
                assert!(
                    std::env::var("FERRY_REQUIRE_CAPS").as_deref() != Ok("1"),
                    "{test}: userfaultfd required (FERRY_REQUIRE_CAPS=1) but unavailable: {e}"
                );
                eprintln!("SKIP: {test}: cannot create a userfaultfd: {e} ({e:?})");
                None
            }
        }
    }

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; usize::try_from(PAGE_SIZE).unwrap()]
    }

    /// Reads events until `done` or the deadline, calling `on_fault(addr, event)` for each.
    fn serve(uffd: &Uffd, done: &AtomicBool, deadline: Duration, mut on_event: impl FnMut(Event)) {
        let end = Instant::now() + deadline;
        let mut events = Vec::new();
        while !done.load(Ordering::Acquire) {
            assert!(Instant::now() < end, "handler timed out");
            if !uffd.poll(Some(Duration::from_millis(20))).unwrap() {
                continue;
            }
            events.clear();
            uffd.read_events(&mut events, 64).unwrap();
            for ev in events.drain(..) {
                on_event(ev);
            }
        }
    }

    #[test]
    fn missing_fault_resolved_by_copy() {
        let Some(uffd) = open_or_skip("missing_fault_resolved_by_copy", Features::THREAD_ID) else {
            return;
        };
        const PAGES: u64 = 16;
        let region = MemRegion::anonymous(PAGES * PAGE_SIZE, MemOptions::default()).unwrap();
        // SAFETY: the region is test-owned guest-like memory that no Rust reference reads.
        let ioctls =
            unsafe { uffd.register(region.addr(), region.len(), RegisterMode::MISSING) }.unwrap();
        assert!(ioctls.copy() && ioctls.zeropage() && ioctls.wake());
        let done = AtomicBool::new(false);
        let base = region.addr();
        let (faults, toucher_tid) = thread::scope(|s| {
            let toucher = s.spawn(|| {
                let tid = rustix::thread::gettid().as_raw_nonzero().get();
                let mut seen = Vec::new();
                for p in 0..PAGES {
                    seen.push(region.load_u64(p * PAGE_SIZE + 8).unwrap());
                }
                done.store(true, Ordering::Release);
                (seen, tid)
            });
            let mut faults = Vec::new();
            serve(&uffd, &done, Duration::from_secs(10), |ev| match ev {
                Event::PageFault {
                    addr,
                    flags,
                    thread_id,
                } => {
                    assert!(!flags.wp && !flags.minor, "{flags:?}");
                    let idx = (addr - base) / PAGE_SIZE;
                    let fill = u8::try_from(idx + 1).unwrap();
                    let out = uffd
                        .copy(
                            addr & !(PAGE_SIZE - 1),
                            &page(fill),
                            PAGE_SIZE,
                            PlaceMode::WAKE,
                        )
                        .unwrap();
                    assert_eq!(out, Fill::Done);
                    faults.push((idx, thread_id));
                }
                other => panic!("unexpected event {other:?}"),
            });
            let (seen, tid) = toucher.join().unwrap();
            for (p, v) in seen.iter().enumerate() {
                let fill = u8::try_from(p + 1).unwrap();
                assert_eq!(*v, u64::from_ne_bytes([fill; 8]), "page {p}");
            }
            (faults, tid)
        });
        assert_eq!(
            faults.len(),
            usize::try_from(PAGES).unwrap(),
            "one fault per page"
        );
        for (i, (idx, tid)) in faults.iter().enumerate() {
            assert_eq!(*idx, u64::try_from(i).unwrap());
            assert_eq!(*tid, Some(u32::try_from(toucher_tid).unwrap()));
        }
        uffd.unregister(region.addr(), region.len()).unwrap();
    }

    #[test]
    fn minor_fault_on_memfd_resolved_by_alias_and_continue() {
        let Some(uffd) = open_or_skip(
            "minor_fault_on_memfd",
            Features::MINOR_SHMEM | Features::MISSING_SHMEM,
        ) else {
            return;
        };
        const PAGES: u64 = 16;
        let region =
            MemRegion::memfd("uffd-minor", PAGES * PAGE_SIZE, MemOptions::default()).unwrap();
        let alias = region.alias().unwrap();
        // Even pages are in the page cache before the guest touches them (minor faults), odd pages
        // are missing (missing faults); both are resolved by writing through the alias + CONTINUE.
        for p in (0..PAGES).step_by(2) {
            alias.write(p * PAGE_SIZE, &page(0xEE)).unwrap();
        }
        // SAFETY: the region is test-owned guest-like memory that no Rust reference reads.
        let ioctls = unsafe {
            uffd.register(
                region.addr(),
                region.len(),
                RegisterMode::MISSING | RegisterMode::MINOR,
            )
        };
        let ioctls = match ioctls {
            Ok(i) => i,
            Err(e) => {
                eprintln!("minor_fault_on_memfd: skipped, MINOR registration refused: {e}");
                return;
            }
        };
        assert!(ioctls.continue_(), "{ioctls:?}");
        let done = AtomicBool::new(false);
        let base = region.addr();
        let (mut minor, mut missing) = (0u32, 0u32);
        thread::scope(|s| {
            let toucher = s.spawn(|| {
                let seen: Vec<u64> = (0..PAGES)
                    .map(|p| region.load_u64(p * PAGE_SIZE).unwrap())
                    .collect();
                done.store(true, Ordering::Release);
                seen
            });
            serve(&uffd, &done, Duration::from_secs(10), |ev| {
                let Event::PageFault { addr, flags, .. } = ev else {
                    panic!("unexpected event {ev:?}");
                };
                let off = (addr - base) & !(PAGE_SIZE - 1);
                let idx = off / PAGE_SIZE;
                if flags.minor {
                    assert_eq!(idx % 2, 0, "minor fault on page {idx}");
                    minor += 1;
                } else {
                    assert_eq!(idx % 2, 1, "missing fault on page {idx}");
                    missing += 1;
                }
                // Write the final content through the alias (into the page cache), then map it.
                alias
                    .write(off, &page(u8::try_from(idx + 1).unwrap()))
                    .unwrap();
                let out = uffd
                    .continue_(base + off, PAGE_SIZE, PlaceMode::WAKE)
                    .unwrap();
                assert_eq!(out, Fill::Done);
            });
            let seen = toucher.join().unwrap();
            for (p, v) in seen.iter().enumerate() {
                let fill = u8::try_from(p + 1).unwrap();
                assert_eq!(*v, u64::from_ne_bytes([fill; 8]), "page {p}");
            }
        });
        assert_eq!((minor, missing), (8, 8));
        // A page already mapped: CONTINUE reports it as present, not as an error.
        assert_eq!(
            uffd.continue_(base, PAGE_SIZE, PlaceMode::WAKE).unwrap(),
            Fill::Exists
        );
        uffd.unregister(region.addr(), region.len()).unwrap();
    }

    #[test]
    fn copy_twice_reports_exists_and_partial() {
        let Some(uffd) = open_or_skip("copy_twice_reports_exists", Features::NONE) else {
            return;
        };
        let region = MemRegion::anonymous(4 * PAGE_SIZE, MemOptions::default()).unwrap();
        let a = region.addr();
        // SAFETY: the region is test-owned guest-like memory that no Rust reference reads.
        unsafe { uffd.register(a, region.len(), RegisterMode::MISSING) }.unwrap();
        let data = vec![0x5Au8; usize::try_from(2 * PAGE_SIZE).unwrap()];
        assert_eq!(
            uffd.copy(a + PAGE_SIZE, &data, PAGE_SIZE, PlaceMode::WAKE)
                .unwrap(),
            Fill::Done
        );
        // Same page again: EEXIST, its own outcome.
        assert_eq!(
            uffd.copy(a + PAGE_SIZE, &data, PAGE_SIZE, PlaceMode::WAKE)
                .unwrap(),
            Fill::Exists
        );
        // Two pages, the second present: the first is placed, the call stops with partial progress.
        assert_eq!(
            uffd.copy(a, &data, 2 * PAGE_SIZE, PlaceMode::WAKE).unwrap(),
            Fill::Partial { bytes: PAGE_SIZE }
        );
        assert_eq!(region.load_u64(0).unwrap(), u64::from_ne_bytes([0x5A; 8]));
        // A source shorter than the range is refused before the kernel sees it.
        let short = uffd.copy(a + 2 * PAGE_SIZE, &data[..8], PAGE_SIZE, PlaceMode::WAKE);
        assert!(
            matches!(short, Err(UffdOpError::ShortSource { .. })),
            "{short:?}"
        );
        uffd.unregister(a, region.len()).unwrap();
    }

    #[test]
    fn copy_all_skips_present_pages() {
        let Some(uffd) = open_or_skip("copy_all_skips_present_pages", Features::NONE) else {
            return;
        };
        const PAGES: u64 = 8;
        let region = MemRegion::anonymous(PAGES * PAGE_SIZE, MemOptions::default()).unwrap();
        let a = region.addr();
        // SAFETY: the region is test-owned guest-like memory that no Rust reference reads.
        unsafe { uffd.register(a, region.len(), RegisterMode::MISSING) }.unwrap();
        // Pages 2, 3 and 7 arrive "on demand" first with other content.
        for p in [2u64, 3, 7] {
            let out = uffd.copy(a + p * PAGE_SIZE, &page(0xDD), PAGE_SIZE, PlaceMode::WAKE);
            assert_eq!(out.unwrap(), Fill::Done);
        }
        // The background push of the whole range places the other five and keeps those three.
        let data: Vec<u8> = (0..PAGES)
            .flat_map(|p| page(u8::try_from(p + 1).unwrap()))
            .collect();
        let sum = uffd
            .copy_all(a, &data, PAGES * PAGE_SIZE, PlaceMode::WAKE)
            .unwrap();
        assert_eq!(sum.placed, 5 * PAGE_SIZE);
        assert_eq!(sum.existing, 3 * PAGE_SIZE);
        assert_eq!(sum.again_at, None);
        for p in 0..PAGES {
            let want = if [2, 3, 7].contains(&p) {
                0xDD
            } else {
                u8::try_from(p + 1).unwrap()
            };
            assert_eq!(
                region.load_u64(p * PAGE_SIZE).unwrap(),
                u64::from_ne_bytes([want; 8]),
                "page {p}"
            );
        }
        uffd.unregister(a, region.len()).unwrap();
    }

    #[test]
    fn unmap_of_registered_range_is_reported() {
        let Some(uffd) = open_or_skip("unmap_is_reported", Features::EVENT_UNMAP) else {
            return;
        };
        if !uffd.features().contains(Features::EVENT_UNMAP) {
            eprintln!("unmap_is_reported: skipped, kernel lacks EVENT_UNMAP");
            return;
        }
        let region = MemRegion::anonymous(4 * PAGE_SIZE, MemOptions::default()).unwrap();
        let (a, len) = (region.addr(), region.len());
        // SAFETY: the region is test-owned guest-like memory that no Rust reference reads.
        unsafe { uffd.register(a, len, RegisterMode::MISSING) }.unwrap();
        thread::scope(|s| {
            // munmap of a registered range blocks until the UNMAP event is read.
            let dropper = s.spawn(move || drop(region));
            assert!(
                uffd.poll(Some(Duration::from_secs(10))).unwrap(),
                "no UNMAP event"
            );
            let mut events = Vec::new();
            assert_eq!(uffd.read_events(&mut events, 64).unwrap(), 1);
            assert!(
                matches!(events[0], Event::Unmap { start, end } if start == a && end == a + len),
                "{:?}",
                events[0]
            );
            dropper.join().unwrap();
        });
    }

    #[test]
    fn zeropage_places_zeroes_once() {
        let Some(uffd) = open_or_skip("zeropage_places_zeroes_once", Features::NONE) else {
            return;
        };
        let region = MemRegion::anonymous(2 * PAGE_SIZE, MemOptions::default()).unwrap();
        let a = region.addr();
        // SAFETY: the region is test-owned guest-like memory that no Rust reference reads.
        unsafe { uffd.register(a, region.len(), RegisterMode::MISSING) }.unwrap();
        assert_eq!(
            uffd.zeropage(a, 2 * PAGE_SIZE, PlaceMode::WAKE).unwrap(),
            Fill::Done
        );
        assert_eq!(
            uffd.zeropage(a, PAGE_SIZE, PlaceMode::WAKE).unwrap(),
            Fill::Exists
        );
        assert_eq!(
            uffd.copy(a + PAGE_SIZE, &page(1), PAGE_SIZE, PlaceMode::WAKE)
                .unwrap(),
            Fill::Exists
        );
        // Present now: reading does not fault (it would hang without a handler otherwise).
        assert_eq!(region.load_u64(PAGE_SIZE + 64).unwrap(), 0);
        uffd.unregister(a, region.len()).unwrap();
    }

    #[test]
    fn write_protect_fault_caught() {
        let Some(uffd) = open_or_skip("write_protect_fault_caught", Features::PAGEFAULT_FLAG_WP)
        else {
            return;
        };
        if !uffd.features().contains(Features::PAGEFAULT_FLAG_WP) {
            eprintln!(
                "write_protect_fault_caught: skipped, kernel lacks UFFD_FEATURE_PAGEFAULT_FLAG_WP"
            );
            return;
        }
        const PAGES: u64 = 8;
        let opts = MemOptions {
            hugepage: false,
            populate: true,
        };
        let region = MemRegion::anonymous(PAGES * PAGE_SIZE, opts).unwrap();
        let a = region.addr();
        // SAFETY: the region is test-owned guest-like memory that no Rust reference reads.
        let ioctls = unsafe { uffd.register(a, region.len(), RegisterMode::WP) }.unwrap();
        assert!(ioctls.writeprotect(), "{ioctls:?}");
        uffd.writeprotect(a, region.len(), true, false).unwrap();
        // Reads of protected pages do not fault.
        assert_eq!(region.load_u64(0).unwrap(), 0);
        let done = AtomicBool::new(false);
        let mut caught = Vec::new();
        thread::scope(|s| {
            s.spawn(|| {
                for p in [1u64, 5, 1] {
                    region.store_u64(p * PAGE_SIZE, 100 + p).unwrap();
                }
                done.store(true, Ordering::Release);
            });
            serve(&uffd, &done, Duration::from_secs(10), |ev| {
                let Event::PageFault { addr, flags, .. } = ev else {
                    panic!("unexpected event {ev:?}");
                };
                assert!(flags.wp && flags.write, "{flags:?}");
                let pa = addr & !(PAGE_SIZE - 1);
                caught.push((pa - a) / PAGE_SIZE);
                // Record and unprotect: the writer retries and proceeds.
                uffd.writeprotect(pa, PAGE_SIZE, false, false).unwrap();
            });
        });
        // Page 1's second write is to an unprotected page: no fault.
        assert_eq!(caught, vec![1, 5]);
        assert_eq!(region.load_u64(PAGE_SIZE).unwrap(), 101);
        assert_eq!(region.load_u64(5 * PAGE_SIZE).unwrap(), 105);
        uffd.unregister(a, region.len()).unwrap();
    }

    #[test]
    fn copy_during_unread_remove_event_is_again() {
        let Some(uffd) = open_or_skip("copy_during_remove_is_again", Features::EVENT_REMOVE) else {
            return;
        };
        if !uffd.features().contains(Features::EVENT_REMOVE) {
            eprintln!("copy_during_remove_is_again: skipped, kernel lacks EVENT_REMOVE");
            return;
        }
        let opts = MemOptions {
            hugepage: false,
            populate: true,
        };
        let region = MemRegion::anonymous(4 * PAGE_SIZE, opts).unwrap();
        let a = region.addr();
        region.discard(2 * PAGE_SIZE, 2 * PAGE_SIZE).unwrap(); // pages 2 and 3 missing
        // SAFETY: the region is test-owned guest-like memory that no Rust reference reads.
        unsafe { uffd.register(a, region.len(), RegisterMode::MISSING) }.unwrap();
        thread::scope(|s| {
            // MADV_DONTNEED on a registered range blocks until the REMOVE event is read.
            let remover = s.spawn(|| region.discard(0, PAGE_SIZE));
            assert!(
                uffd.poll(Some(Duration::from_secs(10))).unwrap(),
                "no REMOVE event"
            );
            // The event is pending and unread: the mapping is "changing", nothing is placed.
            assert_eq!(
                uffd.copy(a + 2 * PAGE_SIZE, &page(3), PAGE_SIZE, PlaceMode::WAKE)
                    .unwrap(),
                Fill::Again
            );
            let mut events = Vec::new();
            assert_eq!(uffd.read_events(&mut events, 64).unwrap(), 1);
            assert!(
                matches!(events[0], Event::Remove { start, end } if start == a && end == a + PAGE_SIZE),
                "{:?}",
                events[0]
            );
            remover.join().unwrap().unwrap();
        });
        // Once the event is consumed the copy goes through.
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            match uffd
                .copy(a + 2 * PAGE_SIZE, &page(3), PAGE_SIZE, PlaceMode::WAKE)
                .unwrap()
            {
                Fill::Done => break,
                Fill::Again if Instant::now() < end => thread::yield_now(),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            region.load_u64(2 * PAGE_SIZE).unwrap(),
            u64::from_ne_bytes([3; 8])
        );
        uffd.unregister(a, region.len()).unwrap();
    }

    fn percentile(sorted: &[Duration], pct: usize) -> Duration {
        sorted[(sorted.len() - 1) * pct / 100]
    }

    /// Measures (prints, does not assert) the latency of faults resolved by a handler thread.
    fn measure(name: &str, mode: ProbeMode) {
        if open_or_skip(name, Features::NONE).is_none() {
            return;
        }
        let mut lat = probe_fault_latency(2000, mode).unwrap();
        lat.sort_unstable();
        eprintln!(
            "{name}: {} faults resolved by a handler thread: p50 {:?}, p99 {:?}, max {:?}",
            lat.len(),
            percentile(&lat, 50),
            percentile(&lat, 99),
            lat[lat.len() - 1]
        );
        // Every touch waited for the handler: no fault is free.
        assert!(lat[0] > Duration::from_nanos(500), "{:?}", lat[0]);
    }

    #[test]
    fn fault_latency_missing_copy() {
        measure("fault_latency_missing_copy", ProbeMode::MissingCopy);
    }

    #[test]
    fn fault_latency_minor_continue() {
        measure("fault_latency_minor_continue", ProbeMode::MinorContinue);
    }
}
