// SPDX-License-Identifier: Apache-2.0 OR MIT
//! End-to-end migrations of process memory written by live writer threads, over loopback, in
//! every mode, verified by the whole-memory digest.

mod common;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::common::{NoResume, differing_pages, uffd_available};

    use std::thread;
    use std::time::Duration;

    use anyhow::{Context, Result};
    use ferry_engine::dest::DestVm;
    use ferry_engine::memory::MemBacking;
    use ferry_engine::policy::{Mode, Policy};
    use ferry_engine::procmem::{ProcVmConfig, ProcessVm, WritePattern};
    use ferry_engine::session::{SessionOptions, migrate_local};
    use ferry_engine::source::SourceVm;
    use ferry_engine::vm::{Backing, GuestMemory, VmControl};
    use ferry_protocol::handshake::{Auth, Psk, TransportKind};

    struct Outcome {
        source: ferry_engine::MigrationReport,
        dest: ferry_engine::dest::DestReport,
        dest_writes_after: u64,
    }

    fn init_log() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }

    fn run(
        mode: Mode,
        backing: MemBacking,
        transport: TransportKind,
        streams: u16,
        rate: Option<u64>,
    ) -> Result<Outcome> {
        run_with(mode, backing, transport, streams, rate, |_| {})
    }

    /// `run`, with the policy changed by `tweak` first.
    fn run_with(
        mode: Mode,
        backing: MemBacking,
        transport: TransportKind,
        streams: u16,
        rate: Option<u64>,
        tweak: impl Fn(&mut Policy),
    ) -> Result<Outcome> {
        init_log();
        let cfg = ProcVmConfig {
            mem_bytes: 32 << 20,
            regions: 2,
            backing,
            writers: 1,
            write_mib_s: rate,
            pattern: WritePattern::HotSet,
            seed: 7,
            fill_percent: 40,
            ..ProcVmConfig::default()
        };
        let key = Auth::Psk(Psk::from_bytes([3; 32]));
        let mut src = ProcessVm::new(cfg.clone())?;
        src.start()?;
        let mut dst = ProcessVm::new_destination(&cfg)?;
        let dst_mem = dst.memory();
        let opts = SessionOptions {
            transport,
            streams,
            auth: key,
            ..SessionOptions::default()
        };
        let mut policy = Policy {
            mode,
            // Pre-copy must converge however busy the machine is (these tests check that the
            // migration is correct, not how long its blackout is; the prediction counts the
            // measured round trip, ms on a loaded machine); hybrid under heavy writes must not.
            max_blackout: if mode == Mode::PreCopy {
                Duration::from_millis(200)
            } else {
                Duration::from_millis(5)
            },
            max_rounds: 8,
            checksums: true,
            timeout: Duration::from_secs(30),
            ..Policy::default()
        };
        tweak(&mut policy);
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
                control: &mut dst,
                zeroed: false,
            },
            &policy,
            &opts,
            &mut |_| {},
        )?;
        // The writers run on at the destination.
        thread::sleep(Duration::from_millis(50));
        let dest_writes_after = dst.stats().writes;
        dst.pause().map_err(|e| anyhow::anyhow!("pause: {e}"))?;
        Ok(Outcome {
            source: done.source,
            dest: done.dest,
            dest_writes_after,
        })
    }

    fn check(o: &Outcome, switchover: &str) {
        let r = &o.source;
        eprintln!(
            "{} {}: rounds {} blackout {:.0} µs {:?} stale {} faults {} p50 {} µs, bytes {} verified {}",
            r.mode,
            r.transport,
            r.rounds,
            r.blackout_us,
            r.blackout_phases_us,
            r.stale_pages,
            r.faults.count,
            r.faults.p50_us,
            r.bytes_sent,
            r.verified
        );
        assert!(r.verified, "source digest not confirmed");
        assert!(o.dest.verified, "destination digest mismatch");
        assert_eq!(r.digest, o.dest.digest);
        assert_eq!(r.switchover, switchover);
        assert!(
            o.dest_writes_after > 0,
            "writers did not continue at the destination"
        );
        assert!(r.zero_pages > 0, "zero pages were not detected");
    }

    #[test]
    fn precopy_with_writers_over_uring() -> Result<()> {
        let o = run(
            Mode::PreCopy,
            MemBacking::Anonymous,
            TransportKind::Uring,
            2,
            Some(4),
        )
        .context("migration")?;
        check(&o, "stop-and-copy");
        assert!(o.source.rounds >= 1);
        Ok(())
    }

    #[test]
    fn precopy_over_tcp_four_streams() -> Result<()> {
        let o = run(
            Mode::PreCopy,
            MemBacking::Memfd,
            TransportKind::Tcp,
            4,
            Some(2),
        )?;
        check(&o, "stop-and-copy");
        Ok(())
    }

    #[test]
    fn postcopy_anonymous() -> Result<()> {
        if !uffd_available() {
            return Ok(());
        }
        let o = run(
            Mode::PostCopy,
            MemBacking::Anonymous,
            TransportKind::Uring,
            2,
            None,
        )?;
        check(&o, "post-copy");
        assert_eq!(o.source.rounds, 0);
        // The writer's next pages went out at the switchover; the rest were stale.
        assert!(
            o.source.first_touch_pages > 0,
            "no first-touch pages were sent"
        );
        assert_eq!(
            o.source.stale_pages + o.source.first_touch_pages,
            (32 << 20) / 4096
        );
        Ok(())
    }

    #[test]
    fn postcopy_memfd() -> Result<()> {
        if !uffd_available() {
            return Ok(());
        }
        let o = run(
            Mode::PostCopy,
            MemBacking::Memfd,
            TransportKind::Tcp,
            2,
            None,
        )?;
        check(&o, "post-copy");
        Ok(())
    }

    #[test]
    fn hybrid_switches_to_postcopy_under_heavy_writes() -> Result<()> {
        if !uffd_available() {
            return Ok(());
        }
        // Unlimited writers never converge to a 5 ms blackout: hybrid must switch to post-copy.
        let o = run(
            Mode::Hybrid,
            MemBacking::Memfd,
            TransportKind::Uring,
            2,
            None,
        )?;
        check(&o, "post-copy");
        assert!(o.source.rounds >= 1);
        Ok(())
    }

    /// Hybrid stops and copies only when the prediction fits the budget less its reserve. A
    /// writer at 4 MiB/s fits a 200 ms budget at once, however busy the machine: with no
    /// reserve hybrid stops and copies; with the whole budget in reserve the same migration
    /// switches to post-copy instead, once rounds stop shrinking the dirty set.
    #[test]
    fn hybrid_reserve_chooses_between_stop_and_copy_and_post_copy() -> Result<()> {
        if !uffd_available() {
            return Ok(());
        }
        let hybrid = |reserve: f64| {
            run_with(
                Mode::Hybrid,
                MemBacking::Memfd,
                TransportKind::Tcp,
                2,
                Some(4),
                |p| {
                    p.max_blackout = Duration::from_millis(200);
                    p.hybrid_reserve = reserve;
                },
            )
        };
        let o = hybrid(0.0).context("no reserve")?;
        check(&o, "stop-and-copy");
        let o = hybrid(1.0).context("the whole budget in reserve")?;
        check(&o, "post-copy");
        // A round was predicted to fit the 200 ms budget: the reserve, not the budget, made
        // this a post-copy.
        let best = o
            .source
            .rounds_detail
            .iter()
            .map(|r| r.predicted_blackout_us)
            .fold(f64::INFINITY, f64::min);
        assert!(best <= 200_000.0, "best prediction {best} µs");
        Ok(())
    }

    /// The destination's memory is byte-identical to the paused source's when the destination
    /// VM is not resumed (its writers would change it): dirty tracking lost nothing.
    #[test]
    fn precopy_copies_memory_byte_exact() -> Result<()> {
        byte_exact(MemBacking::Anonymous, Mode::PreCopy, Prep::Fresh)
    }

    /// Memfd regions are received through their alias mapping into the page cache only; the
    /// guest mapping must still read exactly the source's bytes.
    #[test]
    fn precopy_copies_memfd_memory_byte_exact() -> Result<()> {
        byte_exact(MemBacking::Memfd, Mode::PreCopy, Prep::Fresh)
    }

    /// A destination memfd allocated ahead (`fallocate`) and declared zeroed keeps its
    /// allocation, and pages the source never wrote (never sent) still read as zero.
    #[test]
    fn prefaulted_memfd_destination_byte_exact() -> Result<()> {
        byte_exact(MemBacking::Memfd, Mode::PreCopy, Prep::Prefaulted)?;
        if uffd_available() {
            byte_exact(MemBacking::Memfd, Mode::PostCopy, Prep::Prefaulted)?;
        }
        Ok(())
    }

    /// Without the zeroed promise, whatever the destination's memfd held is emptied before
    /// anything arrives: a page that arrives as zeroes (not written) must not show it.
    #[test]
    fn dirty_destination_is_emptied_first() -> Result<()> {
        byte_exact(MemBacking::Memfd, Mode::PreCopy, Prep::Garbage)?;
        byte_exact(MemBacking::Anonymous, Mode::PreCopy, Prep::Garbage)
    }

    /// The destination's memory before the migration.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Prep {
        /// As created.
        Fresh,
        /// Every memfd page allocated (`fallocate`), declared zeroed.
        Prefaulted,
        /// Every page holds 0xA5 bytes, not declared zeroed.
        Garbage,
    }

    fn prepare(mem: &dyn GuestMemory, prep: Prep) -> Result<()> {
        for r in mem.regions() {
            match prep {
                Prep::Fresh => {}
                Prep::Prefaulted => {
                    let Backing::Memfd { fd, offset } = &r.backing else {
                        anyhow::bail!("prefault needs memfd backing");
                    };
                    rustix::fs::fallocate(fd, rustix::fs::FallocateFlags::empty(), *offset, r.len)?;
                    let blocks = rustix::fs::fstat(fd)?.st_blocks;
                    anyhow::ensure!(
                        u64::try_from(blocks)? * 512 >= r.len,
                        "not allocated: {blocks}"
                    );
                }
                Prep::Garbage => {
                    let len = usize::try_from(r.len)?;
                    // SAFETY: the destination's guest memory, mapped for `len` bytes at
                    // `host_addr`; its VM is not running and nothing holds references into it.
                    unsafe { std::ptr::write_bytes(r.host_addr as *mut u8, 0xA5, len) }
                }
            }
        }
        Ok(())
    }

    /// Migrates `src` into `dst` over loopback, leaving `dst` restored but not resumed (see
    /// [`NoResume`]) so its memory is exactly what the migration placed; `zeroed` is
    /// `DestVm::zeroed`. Returns the source's report.
    fn migrate_into_paused(
        src: &mut ProcessVm,
        dst: &mut ProcessVm,
        zeroed: bool,
        policy: &Policy,
        opts: &SessionOptions,
    ) -> Result<ferry_engine::MigrationReport> {
        let (src_mem, dst_mem) = (src.memory(), dst.memory());
        let mut tracker = src.tracker();
        Ok(migrate_local(
            SourceVm {
                memory: &*src_mem,
                dirty: &mut tracker,
                control: src,
            },
            DestVm {
                memory: &*dst_mem,
                control: &mut NoResume(dst),
                zeroed,
            },
            policy,
            opts,
            &mut |_| {},
        )?
        .source)
    }

    /// Memfd destinations are checked receiving both ways: through the alias mapping (the
    /// default) and into the file through the page cache (`splice`).
    fn byte_exact(backing: MemBacking, mode: Mode, prep: Prep) -> Result<()> {
        byte_exact_with(backing, mode, prep, true)?;
        if backing == MemBacking::Memfd {
            byte_exact_with(backing, mode, prep, false)?;
        }
        Ok(())
    }

    fn byte_exact_with(
        backing: MemBacking,
        mode: Mode,
        prep: Prep,
        page_cache: bool,
    ) -> Result<()> {
        init_log();
        let cfg = ProcVmConfig {
            mem_bytes: 16 << 20,
            regions: 2,
            backing,
            writers: 1,
            write_mib_s: Some(2),
            pattern: WritePattern::HotSet,
            seed: 11,
            fill_percent: 40,
            ..ProcVmConfig::default()
        };
        let mut src = ProcessVm::new(cfg.clone())?;
        src.start()?;
        let mut dst = ProcessVm::new_destination(&cfg)?;
        let dst_mem = dst.memory();
        prepare(&*dst_mem, prep)?;
        let opts = SessionOptions {
            transport: TransportKind::Tcp,
            streams: 4,
            page_cache,
            ..SessionOptions::default()
        };
        let policy = Policy {
            mode,
            // Bytes are the point here, not the blackout: converge even on a loaded machine.
            max_blackout: Duration::from_millis(100),
            max_rounds: 8,
            checksums: true,
            ..Policy::default()
        };
        let src_mem = src.memory();
        let r = migrate_into_paused(&mut src, &mut dst, prep == Prep::Prefaulted, &policy, &opts)?;
        assert!(r.verified);
        assert_eq!(r.rounds >= 1, mode == Mode::PreCopy);
        assert!(r.zero_pages > 0, "no zero pages: the case is not exercised");
        let differing = differing_pages(&*src_mem, &*dst_mem)?;
        assert_eq!(
            differing, 0,
            "{backing:?} {mode:?} {prep:?} page cache {page_cache}: {differing} pages differ from the paused source"
        );
        Ok(())
    }

    /// A memfd source whose memory is partly never written (file holes): the holes travel as
    /// zero pages without being read, and the io_uring streams register no fixed buffers
    /// (pinning would allocate every page), so after the migration the holes are still holes;
    /// the destination is byte-exact.
    #[test]
    fn sparse_memfd_source_stays_sparse() -> Result<()> {
        init_log();
        let cfg = ProcVmConfig {
            mem_bytes: 16 << 20,
            regions: 2,
            backing: MemBacking::Memfd,
            writers: 1,
            write_mib_s: Some(1),
            pattern: WritePattern::HotSet,
            seed: 5,
            // Every page non-zero: the punched holes are the only zero pages.
            fill_percent: 100,
            ..ProcVmConfig::default()
        };
        // Writers not started: nothing writes into the holes behind the engine's back.
        let mut src = ProcessVm::new(cfg.clone())?;
        let src_mem = src.memory();
        let mut holes = Vec::new();
        for r in src_mem.regions() {
            let Backing::Memfd { fd, offset } = &r.backing else {
                anyhow::bail!("memfd expected");
            };
            let (at, len) = (offset + r.len / 2, r.len / 2);
            rustix::fs::fallocate(
                &**fd,
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                at,
                len,
            )?;
            holes.push((std::sync::Arc::clone(fd), at, at + len));
        }
        let mut dst = ProcessVm::new_destination(&cfg)?;
        let dst_mem = dst.memory();
        let opts = SessionOptions {
            transport: TransportKind::Uring,
            streams: 2,
            ..SessionOptions::default()
        };
        let policy = Policy {
            mode: Mode::PreCopy,
            max_blackout: Duration::from_millis(100),
            ..Policy::default()
        };
        let r = migrate_into_paused(&mut src, &mut dst, false, &policy, &opts)?;
        assert!(r.verified);
        let hole_pages = (cfg.mem_bytes / 2) / 4096;
        assert_eq!(
            r.zero_pages, hole_pages,
            "zero pages sent against pages in holes"
        );
        for (fd, start, end) in holes {
            match rustix::fs::seek(&*fd, rustix::fs::SeekFrom::Data(start)) {
                Err(rustix::io::Errno::NXIO) => {}
                Ok(d) => assert!(
                    d >= end,
                    "the source allocated {start:#x}..{end:#x} (data at {d:#x})"
                ),
                Err(e) => return Err(e.into()),
            }
        }
        let differing = differing_pages(&*src_mem, &*dst_mem)?;
        assert_eq!(differing, 0, "{differing} pages differ from the source");
        Ok(())
    }
}
