// SPDX-License-Identifier: Apache-2.0 OR MIT
//! RDMA sessions: what is refused without a device, the feature or pre-copy (runs everywhere),
//! and live pre-copy migrations of process memory over RDMA WRITE (need an RDMA device and
//! `FERRY_RDMA_ADDR`, an IP address of an RDMA interface; they skip with the reason otherwise,
//! which is the case on the development machines: no RDMA NIC, no InfiniBand in the kernel).

#[allow(dead_code)]
mod common;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use anyhow::{Result, bail};
    use ferry_engine::MigrateError;
    use ferry_engine::layout::Layout;
    use ferry_engine::memory::MemBacking;
    use ferry_engine::policy::{Mode, Policy};
    use ferry_engine::procmem::{ProcVmConfig, ProcessVm};
    use ferry_engine::session::{SessionOptions, connect_source, server_config};
    use ferry_protocol::handshake::{Auth, TransportKind};
    use ferry_transport::Endpoint;

    fn cfg(backing: MemBacking) -> ProcVmConfig {
        ProcVmConfig {
            mem_bytes: 16 << 20,
            regions: 2,
            backing,
            writers: 1,
            write_mib_s: Some(4),
            seed: 3,
            fill_percent: 40,
            ..ProcVmConfig::default()
        }
    }

    fn opts() -> SessionOptions {
        SessionOptions {
            transport: TransportKind::Rdma,
            auth: Auth::Insecure,
            timeout: Duration::from_secs(2),
            ..SessionOptions::default()
        }
    }

    fn has_device() -> bool {
        #[cfg(feature = "rdma")]
        return ferry_engine::rdma::devices().is_ok();
        #[cfg(not(feature = "rdma"))]
        false
    }

    /// Refused before any connection is made: nothing listens on the endpoint.
    fn refused(mode: Mode) -> Result<String> {
        let vm = ProcessVm::new_destination(&cfg(MemBacking::Anonymous))?;
        let mem = vm.memory();
        let layout = Layout::new(&*mem)?;
        let policy = Policy {
            mode,
            ..Policy::default()
        };
        let nowhere = Endpoint::Tcp("127.0.0.1:9".parse()?);
        match connect_source(&nowhere, &layout, &policy, &opts()) {
            Ok(_) => bail!("an RDMA session to a closed port was opened"),
            Err(e @ MigrateError::Unsupported { transport, .. }) => {
                assert_eq!(transport, "rdma");
                Ok(e.to_string())
            }
            Err(e) => bail!("expected a refusal naming the transport, got: {e}"),
        }
    }

    #[test]
    fn rdma_without_a_device_is_refused_with_the_reason() -> Result<()> {
        if has_device() {
            eprintln!("SKIP: an RDMA device exists here; the refusal cannot be shown");
            return Ok(());
        }
        for mode in [Mode::PreCopy, Mode::Hybrid, Mode::PostCopy] {
            let msg = refused(mode)?;
            if cfg!(feature = "rdma") {
                assert!(msg.contains("without an RDMA device"), "{msg}");
            } else {
                assert!(msg.contains("`rdma` cargo feature"), "{msg}");
            }
        }
        Ok(())
    }

    #[test]
    fn destinations_offer_rdma_only_when_they_can_serve_it() -> Result<()> {
        let vm = ProcessVm::new_destination(&cfg(MemBacking::Anonymous))?;
        let mem = vm.memory();
        let layout = Layout::new(&*mem)?;
        let offered = server_config(&layout, Auth::Insecure, 4)
            .capabilities
            .transports;
        assert_eq!(
            offered.contains(&TransportKind::Rdma),
            cfg!(feature = "rdma") && has_device(),
            "{offered:?}"
        );
        assert!(offered.contains(&TransportKind::Uring));
        Ok(())
    }

    /// Whole migrations over the in-process RDMA simulator: the session setup, registration,
    /// framing and the engine's pre-copy over `RdmaDataStream`, end to end. Not an RDMA
    /// measurement: the simulator copies with the CPU.
    #[cfg(feature = "rdma-sim")]
    mod simulated {
        use super::super::common::uffd_available as uffd_or_skip;
        use super::*;
        use ferry_engine::dest::DestVm;
        use ferry_engine::session::{
            LocalMigration, LocalOutcome, LocalRecovery, migrate_local_with,
        };
        use ferry_engine::source::{Phase, Progress, SourceVm};
        use ferry_engine::vm::VmControl;
        use ferry_transport::rdma::SimProvider;
        use std::sync::Arc;

        /// Migrates `src` into `dst` over `sim`, reporting progress to `progress`.
        fn run(
            sim: &SimProvider,
            src: &mut ProcessVm,
            dst: &mut ProcessVm,
            policy: &Policy,
            recovery: &LocalRecovery,
            progress: &mut dyn FnMut(&Progress),
        ) -> Result<LocalOutcome> {
            let (src_mem, dst_mem) = (src.memory(), dst.memory());
            let mut tracker = src.tracker();
            let opts = SessionOptions {
                rdma_provider: Some(Arc::new(sim.clone())),
                ..opts()
            };
            Ok(migrate_local_with(
                SourceVm {
                    memory: &*src_mem,
                    dirty: &mut tracker,
                    control: src,
                },
                DestVm {
                    memory: &*dst_mem,
                    control: dst,
                    zeroed: false,
                },
                policy,
                &opts,
                recovery,
                progress,
            )?)
        }

        fn migrate(
            backing: MemBacking,
            mode: Mode,
            rate: Option<u64>,
        ) -> Result<(SimProvider, LocalMigration)> {
            let sim = SimProvider::new();
            let c = ProcVmConfig {
                write_mib_s: rate,
                ..cfg(backing)
            };
            let mut src = ProcessVm::new(c.clone())?;
            src.start()?;
            let mut dst = ProcessVm::new_destination(&c)?;
            let policy = Policy {
                mode,
                // Pre-copy converges however busy the machine is (correctness, not speed);
                // hybrid under full-speed writers switches to post-copy.
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
            let out = run(
                &sim,
                &mut src,
                &mut dst,
                &policy,
                &LocalRecovery::default(),
                &mut |_| {},
            )?;
            let done = LocalMigration {
                source: out.source?,
                dest: out.dest?,
            };
            // The writers run on at the destination.
            std::thread::sleep(Duration::from_millis(30));
            assert!(
                dst.stats().writes > 0,
                "the destination's writers did not run"
            );
            dst.pause().map_err(|e| anyhow::anyhow!("pause: {e}"))?;
            Ok((sim, done))
        }

        fn check(
            sim: &SimProvider,
            done: &ferry_engine::session::LocalMigration,
            switchover: &str,
        ) {
            let r = &done.source;
            eprintln!(
                "rdma (simulated) {}: rounds {} switchover {} blackout {:.0} µs stale {} faults {} bytes {} verified {}",
                r.mode,
                r.rounds,
                r.switchover,
                r.blackout_us,
                r.stale_pages,
                r.faults.count,
                r.bytes_sent,
                r.verified
            );
            assert_eq!(r.transport, "rdma");
            assert!(r.verified && done.dest.verified, "digests differ");
            assert_eq!(r.digest, done.dest.digest);
            assert_eq!(r.switchover, switchover);
            assert!(r.data_pages > 0, "{r:?}");
            let (writes, reads) = sim.executed();
            eprintln!("simulated fabric: {writes} WRITEs, {reads} READs");
            // Markers move no bytes and are not counted.
            assert_eq!(
                writes > 0,
                r.rounds > 0,
                "pre-copy rounds went by RDMA WRITE"
            );
            assert_eq!(
                sim.registered_keys(),
                0,
                "both sides released their registrations when the migration ended"
            );
        }

        #[test]
        fn precopy_over_simulated_rdma_anonymous() -> Result<()> {
            let (sim, done) = migrate(MemBacking::Anonymous, Mode::PreCopy, Some(4))?;
            check(&sim, &done, "stop-and-copy");
            assert!(done.source.rounds >= 1);
            assert_eq!(sim.executed().1, 0, "pre-copy READ nothing");
            Ok(())
        }

        #[test]
        fn precopy_over_simulated_rdma_memfd() -> Result<()> {
            let (sim, done) = migrate(MemBacking::Memfd, Mode::PreCopy, Some(4))?;
            check(&sim, &done, "stop-and-copy");
            Ok(())
        }

        fn hybrid(backing: MemBacking) -> Result<()> {
            if !uffd_or_skip() {
                return Ok(());
            }
            // Writers at full speed: pre-copy cannot converge, hybrid switches to post-copy.
            let (sim, done) = migrate(backing, Mode::Hybrid, None)?;
            check(&sim, &done, "post-copy");
            assert!(done.source.rounds >= 1, "no pre-copy round went by RDMA");
            Ok(())
        }

        #[test]
        fn hybrid_over_simulated_rdma_anonymous() -> Result<()> {
            hybrid(MemBacking::Anonymous)
        }

        #[test]
        fn hybrid_over_simulated_rdma_memfd() -> Result<()> {
            hybrid(MemBacking::Memfd)
        }

        /// The READ path and every TCP socket fail together in the middle of post-copy (a link
        /// going down): the failed READs count as a lost connection, the session is resumed
        /// over TCP, the pages still missing are asked for there, and it ends verified.
        #[test]
        fn postcopy_recovers_when_the_rdma_link_fails() -> Result<()> {
            if !uffd_or_skip() {
                return Ok(());
            }
            let sim = SimProvider::new();
            let c = ProcVmConfig {
                mem_bytes: 64 << 20,
                write_mib_s: Some(8),
                ..cfg(MemBacking::Memfd)
            };
            let mut src = ProcessVm::new(c.clone())?;
            src.start()?;
            let mut dst = ProcessVm::new_destination(&c)?;
            let policy = Policy {
                mode: Mode::PostCopy,
                checksums: true,
                timeout: Duration::from_secs(30),
                progress_interval: Duration::from_millis(1),
                ..Policy::default()
            };
            let recovery = LocalRecovery {
                source_window: Some(Duration::from_secs(20)),
                dest_window: Some(Duration::from_secs(20)),
                ..LocalRecovery::default()
            };
            let tap = recovery.tap.clone();
            let mut cut = 0;
            let out = run(&sim, &mut src, &mut dst, &policy, &recovery, &mut |p| {
                if cut == 0 && p.phase == Phase::PostCopy && p.pages_done * 4 >= p.total_pages {
                    sim.break_all();
                    cut = tap.cut();
                }
            })?;
            assert!(cut > 0, "the link was never broken");
            let source = out.source.map_err(|e| anyhow::anyhow!("source: {e:#}"))?;
            let dest = out
                .dest
                .map_err(|e| anyhow::anyhow!("destination: {e:#}"))?;
            eprintln!(
                "RDMA link failure: recoveries {} / {}, faults {}, missing at the loss {}",
                source.recoveries, dest.recoveries, dest.faults.count, dest.missing_at_loss
            );
            assert_eq!((source.recoveries, dest.recoveries), (1, 1));
            assert!(source.verified && dest.verified, "digest mismatch");
            assert_eq!(source.digest, dest.digest);
            dst.pause().map_err(|e| anyhow::anyhow!("pause: {e}"))?;
            Ok(())
        }

        #[test]
        fn postcopy_over_simulated_rdma_memfd() -> Result<()> {
            postcopy(MemBacking::Memfd)
        }

        #[test]
        fn postcopy_over_simulated_rdma_anonymous() -> Result<()> {
            postcopy(MemBacking::Anonymous)
        }

        /// Faults are fetched by one-sided READ (the source's urgent server answers none).
        fn postcopy(backing: MemBacking) -> Result<()> {
            if !uffd_or_skip() {
                return Ok(());
            }
            let (sim, done) = migrate(backing, Mode::PostCopy, Some(64))?;
            check(&sim, &done, "post-copy");
            assert!(done.source.faults.count > 0, "no page was demand-fetched");
            let (_, reads) = sim.executed();
            let f = &done.source.faults;
            assert!(
                reads >= f.count - f.resolved_by_push && reads > 0,
                "faults not served by RDMA READ: {reads} READs for {} faults ({} by the push)",
                f.count,
                f.resolved_by_push
            );
            Ok(())
        }

        #[test]
        fn a_connection_cut_in_precopy_over_simulated_rdma_leaves_the_source_running() -> Result<()>
        {
            let sim = SimProvider::new();
            let c = ProcVmConfig {
                mem_bytes: 64 << 20,
                ..cfg(MemBacking::Anonymous)
            };
            let mut src = ProcessVm::new(c.clone())?;
            src.start()?;
            let mut dst = ProcessVm::new_destination(&c)?;
            let policy = Policy {
                mode: Mode::PreCopy,
                // No round fits: round 1 ends with a progress report (a round that ends in a
                // switchover reports none), where the connection is cut.
                max_blackout: Duration::ZERO,
                timeout: Duration::from_secs(10),
                progress_interval: Duration::from_millis(1),
                ..Policy::default()
            };
            let recovery = LocalRecovery::default();
            let tap = recovery.tap.clone();
            let mut cut = 0;
            let out = run(&sim, &mut src, &mut dst, &policy, &recovery, &mut |p| {
                if cut == 0 && p.phase == Phase::Round(1) && p.pages_done > 0 {
                    cut = tap.cut();
                }
            })?;
            assert!(cut > 0, "the connection was never cut");
            let e = out
                .source
                .expect_err("the source finished over a cut connection");
            eprintln!("source: {e:#}");
            assert!(
                out.dest.is_err(),
                "the destination finished over a cut connection"
            );
            let before = src.stats().writes;
            std::thread::sleep(Duration::from_millis(30));
            assert!(
                src.stats().writes > before,
                "the source VM does not run after the failed migration"
            );
            src.pause().map_err(|e| anyhow::anyhow!("pause: {e}"))?;
            drop(dst);
            assert_eq!(
                sim.registered_keys(),
                0,
                "registrations outlived the session"
            );
            Ok(())
        }
    }

    #[cfg(feature = "rdma")]
    mod device {
        use super::*;
        use ferry_engine::dest::DestVm;
        use ferry_engine::session::migrate_over;
        use ferry_engine::source::SourceVm;
        use ferry_engine::vm::VmControl;
        use std::net::IpAddr;

        fn rdma_ip_or_skip(test: &str) -> Option<IpAddr> {
            if let Err(e) = ferry_engine::rdma::devices() {
                eprintln!("SKIP {test}: {e}");
                return None;
            }
            match std::env::var("FERRY_RDMA_ADDR")
                .ok()
                .and_then(|a| a.parse().ok())
            {
                Some(ip) => Some(ip),
                None => {
                    eprintln!(
                        "SKIP {test}: set FERRY_RDMA_ADDR to an IP address of an RDMA interface"
                    );
                    None
                }
            }
        }

        fn migrate(backing: MemBacking, mode: Mode, test: &str) -> Result<()> {
            let Some(ip) = rdma_ip_or_skip(test) else {
                return Ok(());
            };
            let c = ProcVmConfig {
                // Hybrid: writers at full speed, so the switch to post-copy happens.
                write_mib_s: if mode == Mode::PreCopy { Some(4) } else { None },
                ..cfg(backing)
            };
            let mut src = ProcessVm::new(c.clone())?;
            src.start()?;
            let mut dst = ProcessVm::new_destination(&c)?;
            let (src_mem, dst_mem) = (src.memory(), dst.memory());
            let mut tracker = src.tracker();
            let policy = Policy {
                mode,
                // Pre-copy converges however busy the machine is (correctness, not speed);
                // hybrid under full-speed writers switches to post-copy.
                max_blackout: if mode == Mode::PreCopy {
                    Duration::from_millis(200)
                } else {
                    Duration::from_millis(5)
                },
                checksums: true,
                timeout: Duration::from_secs(30),
                ..Policy::default()
            };
            let done = migrate_over(
                ip,
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
                &opts(),
                &mut |_| {},
            )?;
            dst.pause().map_err(|e| anyhow::anyhow!("pause: {e}"))?;
            assert_eq!(done.source.transport, "rdma");
            assert!(done.source.verified && done.dest.verified);
            assert_eq!(done.source.digest, done.dest.digest);
            assert!(done.source.bytes_sent > 0);
            Ok(())
        }

        #[test]
        fn precopy_over_rdma_anonymous() -> Result<()> {
            migrate(
                MemBacking::Anonymous,
                Mode::PreCopy,
                "precopy_over_rdma_anonymous",
            )
        }

        /// Needs on-demand paging on the device.
        #[test]
        fn hybrid_over_rdma_memfd() -> Result<()> {
            migrate(MemBacking::Memfd, Mode::Hybrid, "hybrid_over_rdma_memfd")
        }

        #[test]
        fn precopy_over_rdma_memfd() -> Result<()> {
            migrate(MemBacking::Memfd, Mode::PreCopy, "precopy_over_rdma_memfd")
        }
    }
}
