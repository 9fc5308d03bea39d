// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Post-copy placement lands in guest memory even when the destination's memory was populated
//! before the switchover (a pinning registration, a stray write): userfaultfd never faults on a
//! populated page, and `UFFDIO_COPY`/`UFFDIO_ZEROPAGE` refuse it with `EEXIST`, so unless the
//! destination drops such pages before registering, the guest keeps whatever was there while
//! the digest (computed from the received bytes) still matches. The destination here is
//! restored but never resumed, so after the migration its memory must equal the paused
//! source's byte for byte.
//!
//! The hybrid variants also read every destination page while post-copy is under way (from
//! `resume`): pages that arrived in pre-copy but are not mapped (page-cache data of a memfd,
//! zero pages never written) must be resolved locally, not left waiting until the migration
//! ends.

mod common;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::common::{NoResume, differing_pages, uffd_available};
    use std::sync::mpsc;
    use std::thread;
    use std::time::Duration;

    use anyhow::Result;
    use ferry_engine::dest::DestVm;
    use ferry_engine::memory::MemBacking;
    use ferry_engine::policy::{Mode, Policy};
    use ferry_engine::procmem::{ProcVmConfig, ProcessVm, WritePattern};
    use ferry_engine::session::{SessionOptions, migrate_local};
    use ferry_engine::source::SourceVm;
    use ferry_engine::vm::{BoxError, GuestMemory, VmControl};
    use ferry_protocol::handshake::TransportKind;

    /// A destination control that restores, never runs its writers, and on `resume` reads one
    /// byte of every guest page from another thread, waiting (bounded) until all reads are done.
    struct TouchOnResume<'a> {
        vm: &'a mut ProcessVm,
        regions: Vec<(usize, usize)>,
    }

    impl VmControl for TouchOnResume<'_> {
        fn pause(&mut self) -> Result<(), BoxError> {
            Ok(())
        }
        fn save_state(&mut self) -> Result<Vec<u8>, BoxError> {
            self.vm.save_state()
        }
        fn restore_state(&mut self, b: &[u8]) -> Result<(), BoxError> {
            self.vm.restore_state(b)
        }
        fn resume(&mut self) -> Result<(), BoxError> {
            let regions = self.regions.clone();
            let (tx, rx) = mpsc::channel();
            thread::spawn(move || {
                let mut sum = 0u64;
                for (addr, len) in regions {
                    for off in (0..len).step_by(4096) {
                        // SAFETY: a live guest-memory mapping of `len` bytes owned by the
                        // destination VM, which outlives the migration; reading faults the page
                        // in through userfaultfd.
                        sum += u64::from(unsafe {
                            std::ptr::read_volatile((addr + off) as *const u8)
                        });
                    }
                }
                let _ = tx.send(sum);
            });
            rx.recv_timeout(Duration::from_secs(20))
                .map(|_| ())
                .map_err(|_| "reading guest memory after resume did not finish in 20 s".into())
        }
    }

    fn run(backing: MemBacking, transport: TransportKind) -> Result<()> {
        run_mode(backing, transport, Mode::PostCopy).map(drop)
    }

    /// Hybrid: the scenario needs pages dirty at the switch, which depends on when the writer
    /// thread gets a CPU; a migration that had none (no fault after it) is verified, then run
    /// again (5 tries).
    fn run_hybrid(backing: MemBacking) -> Result<()> {
        for attempt in 1..=5 {
            if run_mode(backing, TransportKind::Uring, Mode::Hybrid)? {
                return Ok(());
            }
            eprintln!("attempt {attempt}: no page was dirty at the switch; again");
        }
        anyhow::bail!("no page was dirty at the switch in 5 hybrid migrations")
    }

    /// Whether the scenario happened (hybrid: some pages stale at the switch).
    fn run_mode(backing: MemBacking, transport: TransportKind, mode: Mode) -> Result<bool> {
        let hybrid = mode == Mode::Hybrid;
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let cfg = ProcVmConfig {
            mem_bytes: 8 << 20,
            regions: 2,
            backing,
            writers: 1,
            // Hybrid: fast enough that pages are dirty at every switch (so post-copy has
            // stale pages and lasts), slow enough that most pages arrive in pre-copy.
            write_mib_s: Some(if hybrid { 200 } else { 2 }),
            pattern: WritePattern::HotSet,
            seed: 5,
            fill_percent: 50,
            ..ProcVmConfig::default()
        };
        let mut src = ProcessVm::new(cfg.clone())?;
        src.start()?;
        let mut dst = ProcessVm::new_destination(&cfg)?;
        let dst_mem = dst.memory();
        // Populate every destination page with bytes the source never had.
        for r in dst_mem.regions() {
            let len = usize::try_from(r.len)?;
            // SAFETY: the region is a live read/write mapping of `len` bytes owned by `dst`,
            // which nobody else touches before the migration starts.
            unsafe { std::ptr::write_bytes(r.host_addr as *mut u8, 0xA5, len) };
        }
        let opts = SessionOptions {
            transport,
            streams: 2,
            ..SessionOptions::default()
        };
        let policy = Policy {
            mode,
            // Hybrid must switch to post-copy (with some pages stale and most arrived): no
            // stop-and-copy fits 1 µs.
            max_blackout: if hybrid {
                Duration::from_micros(1)
            } else {
                Policy::default().max_blackout
            },
            checksums: true,
            timeout: Duration::from_secs(30),
            ..Policy::default()
        };
        let regions: Vec<(usize, usize)> = dst_mem
            .regions()
            .iter()
            .map(|r| (r.host_addr, usize::try_from(r.len).unwrap_or(0)))
            .collect();
        let mut touch;
        let mut still;
        let control: &mut dyn VmControl = if hybrid {
            touch = TouchOnResume {
                vm: &mut dst,
                regions,
            };
            &mut touch
        } else {
            still = NoResume(&mut dst);
            &mut still
        };
        let src_mem = src.memory();
        let mut tracker = src.tracker();
        let done = migrate_local(
            SourceVm {
                memory: &*src_mem,
                dirty: &mut tracker,
                control: &mut src,
            },
            DestVm {
                memory: &*dst_mem,
                control,
                zeroed: false,
            },
            &policy,
            &opts,
            &mut |_| {},
        )?;
        let (r, dest_verified, local) = (done.source, done.dest.verified, done.dest.faults.local);
        assert_eq!(r.switchover, "post-copy");
        // No fault at all: nothing was left to fetch after the switch (no page dirty at it).
        if hybrid && local == 0 && r.faults.count == 0 {
            assert!(r.verified && dest_verified, "digest mismatch");
            // The digest is built from the hashes taken when pages were placed: compare the
            // memory itself too.
            let differing = differing_pages(&*src_mem, &*dst_mem)?;
            assert_eq!(differing, 0, "{backing:?}: {differing} pages differ");
            return Ok(false);
        }
        if hybrid {
            assert!(r.rounds >= 1, "hybrid switched before any pre-copy round");
            assert!(
                local > 0,
                "no page that arrived in pre-copy was resolved locally ({} rounds, {} stale \
                 pages, {} faults, {} zero pages)",
                r.rounds,
                r.stale_pages,
                r.faults.count,
                r.zero_pages
            );
            eprintln!(
                "{backing:?} hybrid: {} stale pages, {} faults, {local} resolved locally",
                r.stale_pages, r.faults.count
            );
        }
        assert!(r.verified && dest_verified, "digest mismatch");
        assert!(
            r.zero_pages > 0,
            "no zero pages: the zero-page path is untested"
        );
        let differing = differing_pages(&*src_mem, &*dst_mem)?;
        assert_eq!(
            differing, 0,
            "{backing:?} over {transport:?}: {differing} pages differ from the paused source"
        );
        Ok(true)
    }

    #[test]
    fn postcopy_places_over_populated_anonymous_memory() -> Result<()> {
        if !uffd_available() {
            return Ok(());
        }
        run(MemBacking::Anonymous, TransportKind::Tcp)?;
        run(MemBacking::Anonymous, TransportKind::Uring)
    }

    #[test]
    fn postcopy_places_over_populated_memfd_memory() -> Result<()> {
        if !uffd_available() {
            return Ok(());
        }
        run(MemBacking::Memfd, TransportKind::Tcp)?;
        run(MemBacking::Memfd, TransportKind::Uring)
    }

    #[test]
    fn hybrid_resolves_arrived_pages_locally_anonymous() -> Result<()> {
        if !uffd_available() {
            return Ok(());
        }
        run_hybrid(MemBacking::Anonymous)
    }

    #[test]
    fn hybrid_resolves_arrived_pages_locally_memfd() -> Result<()> {
        if !uffd_available() {
            return Ok(());
        }
        run_hybrid(MemBacking::Memfd)
    }
}
