// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Post-copy recovery over loopback: every socket of the session is cut (`shutdown(2)` on the
//! source's sockets) in the middle of the post-copy push; the source resumes the session, the
//! destination names the pages it still lacks, and the migration ends verified. Also: a source
//! that never comes back (the destination fails after its window, naming the missing pages),
//! and resumptions with the wrong key or an unknown session, which are refused.

mod common;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::common::{NoResume, differing_pages, uffd_available};

    use std::net::{Ipv4Addr, SocketAddr};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::thread;
    use std::time::{Duration, Instant};

    use anyhow::{Result, anyhow, bail};
    use ferry_engine::MigrateError;
    use ferry_engine::dest::DestVm;
    use ferry_engine::layout::Layout;
    use ferry_engine::memory::MemBacking;
    use ferry_engine::policy::{Mode, Policy};
    use ferry_engine::procmem::{ProcVmConfig, ProcessVm, WritePattern};
    use ferry_engine::session::{LocalOutcome, LocalRecovery, SessionOptions, migrate_local_with};
    use ferry_engine::source::{Phase, SourceVm};
    use ferry_engine::vm::{GuestMemory, VmControl};
    use ferry_protocol::handshake::{
        Auth, Capabilities, Compression, Mode as WireMode, Params, Psk, ServerConfig, SessionId,
        TransportKind,
    };
    use ferry_protocol::{GpaRange, MemoryMap};
    use ferry_transport::Endpoint;
    use ferry_transport::session::{ConnectConfig, SessionListener, connect, reconnect};

    fn init_log() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }

    fn key(b: u8) -> Auth {
        Auth::Psk(Psk::from_bytes([b; 32]))
    }

    fn vm_config(backing: MemBacking) -> ProcVmConfig {
        ProcVmConfig {
            mem_bytes: 64 << 20,
            regions: 2,
            backing,
            writers: 1,
            write_mib_s: Some(8),
            pattern: WritePattern::HotSet,
            seed: 11,
            fill_percent: 80,
            ..ProcVmConfig::default()
        }
    }

    fn policy() -> Policy {
        Policy {
            mode: Mode::PostCopy,
            checksums: true,
            timeout: Duration::from_secs(30),
            // The cuts are triggered from progress reports: a 64 MiB push in a release build
            // is over before the default 50 ms interval passes.
            progress_interval: Duration::from_millis(1),
            ..Policy::default()
        }
    }

    fn options(transport: TransportKind) -> SessionOptions {
        SessionOptions {
            transport,
            streams: 2,
            auth: key(9),
            // RDMA over the in-process simulator (no device here).
            #[cfg(feature = "rdma-sim")]
            rdma_provider: (transport == TransportKind::Rdma).then(|| {
                std::sync::Arc::new(ferry_transport::rdma::SimProvider::new())
                    as std::sync::Arc<dyn ferry_transport::rdma::RdmaProvider>
            }),
            ..SessionOptions::default()
        }
    }

    /// Migrates in post-copy and cuts every source socket once `quarters[0]` quarters of the
    /// pages were pushed, again at `quarters[1]`, and so on. `dest` is the destination's
    /// control. Returns the outcome and how many cuts were made.
    fn migrate_and_cut(
        src: &mut ProcessVm,
        dst_mem: &dyn GuestMemory,
        dest: &mut dyn VmControl,
        transport: TransportKind,
        recovery: &LocalRecovery,
        quarters: &[u64],
    ) -> Result<(LocalOutcome, usize)> {
        let src_mem = src.memory();
        let mut tracker = src.tracker();
        let cuts = AtomicUsize::new(0);
        let tap = recovery.tap.clone();
        let out = migrate_local_with(
            SourceVm {
                memory: &*src_mem,
                dirty: &mut tracker,
                control: src,
            },
            DestVm {
                memory: dst_mem,
                control: dest,
                zeroed: false,
            },
            &policy(),
            &options(transport),
            recovery,
            &mut |p| {
                let done = cuts.load(Ordering::Relaxed);
                if p.phase == Phase::PostCopy
                    && quarters
                        .get(done)
                        .is_some_and(|q| p.pages_done * 4 >= q * p.total_pages)
                {
                    let n = tap.cut();
                    eprintln!(
                        "cut {n} sockets after {} of {} pages sent",
                        p.pages_done, p.total_pages
                    );
                    if n > 0 {
                        cuts.store(done + 1, Ordering::Relaxed);
                    }
                }
            },
        )?;
        Ok((out, cuts.load(Ordering::Relaxed)))
    }

    fn recovers(backing: MemBacking, transport: TransportKind, writers_run: bool) -> Result<()> {
        recovers_from(backing, transport, writers_run, &[1])
    }

    fn recovers_from(
        backing: MemBacking,
        transport: TransportKind,
        writers_run: bool,
        quarters: &[u64],
    ) -> Result<()> {
        init_log();
        let cfg = vm_config(backing);
        let mut src = ProcessVm::new(cfg.clone())?;
        src.start()?;
        let mut dst = ProcessVm::new_destination(&cfg)?;
        let dst_mem = dst.memory();
        let recovery = LocalRecovery {
            source_window: Some(Duration::from_secs(20)),
            dest_window: Some(Duration::from_secs(20)),
            ..LocalRecovery::default()
        };
        let t0 = Instant::now();
        let (out, cut) = if writers_run {
            migrate_and_cut(
                &mut src, &*dst_mem, &mut dst, transport, &recovery, quarters,
            )?
        } else {
            let mut still = NoResume(&mut dst);
            migrate_and_cut(
                &mut src, &*dst_mem, &mut still, transport, &recovery, quarters,
            )?
        };
        let source = out.source.map_err(|e| anyhow!("source: {e:#}"))?;
        let dest = out.dest.map_err(|e| anyhow!("destination: {e:#}"))?;
        eprintln!(
            "{backing:?} over {transport:?} (writers at the destination: {writers_run}): \
             {cut} cuts, {} pages missing at the loss, recoveries {} / {}, \
             {:.1} ms without a connection (destination {:.1} ms), faults {}, total {:.0} ms",
            dest.missing_at_loss,
            source.recoveries,
            dest.recoveries,
            source.disconnected_ms,
            dest.disconnected_ms,
            dest.faults.count,
            t0.elapsed().as_secs_f64() * 1000.0
        );
        if cut < quarters.len() {
            bail!(
                "the post-copy push ended before every cut ({cut} of {})",
                quarters.len()
            );
        }
        let expected = u32::try_from(quarters.len())?;
        assert_eq!(
            source.recoveries, expected,
            "source did not resume the session"
        );
        assert_eq!(dest.recoveries, expected, "destination did not recover");
        assert!(dest.missing_at_loss > 0, "nothing was missing at the loss");
        assert!(source.verified && dest.verified, "digest mismatch");
        assert_eq!(source.digest, dest.digest);
        if writers_run {
            thread::sleep(Duration::from_millis(50));
            assert!(
                dst.stats().writes > 0,
                "writers did not run at the destination"
            );
            dst.pause().map_err(|e| anyhow!("pause: {e}"))?;
        } else {
            // Nothing ran at the destination: its memory is the paused source's, exactly.
            let differing = differing_pages(&*src.memory(), &*dst_mem)?;
            assert_eq!(differing, 0, "{differing} pages differ from the source");
        }
        Ok(())
    }

    #[test]
    fn postcopy_recovers_after_every_socket_is_cut_with_writers_running() -> Result<()> {
        if !uffd_available() {
            return Ok(());
        }
        recovers(MemBacking::Anonymous, TransportKind::Tcp, true)?;
        recovers(MemBacking::Memfd, TransportKind::Uring, true)
    }

    #[test]
    fn recovered_memory_equals_the_paused_source() -> Result<()> {
        if !uffd_available() {
            return Ok(());
        }
        recovers(MemBacking::Anonymous, TransportKind::Uring, false)?;
        recovers(MemBacking::Memfd, TransportKind::Tcp, false)
    }

    /// RDMA: the cut takes the TCP streams (the in-band push, the control stream); the
    /// queue pairs stay up, and the resumed session asks for the missing pages over TCP.
    #[cfg(feature = "rdma-sim")]
    #[test]
    fn postcopy_over_simulated_rdma_recovers_after_every_socket_is_cut() -> Result<()> {
        if !uffd_available() {
            return Ok(());
        }
        recovers(MemBacking::Memfd, TransportKind::Rdma, true)?;
        recovers(MemBacking::Anonymous, TransportKind::Rdma, false)
    }

    #[test]
    fn postcopy_recovers_twice() -> Result<()> {
        if !uffd_available() {
            return Ok(());
        }
        recovers_from(MemBacking::Anonymous, TransportKind::Uring, true, &[1, 2])
    }

    #[test]
    fn destination_fails_after_the_window_when_the_source_never_returns() -> Result<()> {
        if !uffd_available() {
            return Ok(());
        }
        init_log();
        let cfg = vm_config(MemBacking::Anonymous);
        let mut src = ProcessVm::new(cfg.clone())?;
        src.start()?;
        let mut dst = ProcessVm::new_destination(&cfg)?;
        let dst_mem = dst.memory();
        let total_pages = Layout::new(&*dst_mem)?.total_pages();
        let window = Duration::from_secs(2);
        let recovery = LocalRecovery {
            source_window: None,
            dest_window: Some(window),
            ..LocalRecovery::default()
        };
        let mut still = NoResume(&mut dst);
        let t0 = Instant::now();
        let (out, cut) = migrate_and_cut(
            &mut src,
            &*dst_mem,
            &mut still,
            TransportKind::Tcp,
            &recovery,
            &[1],
        )?;
        let elapsed = t0.elapsed();
        if cut == 0 {
            bail!("the post-copy push ended before the connection could be cut");
        }
        match out.source {
            Err(MigrateError::PostCopyLost { missing, .. }) => {
                eprintln!("source: post-copy lost with {missing} pages unsent");
            }
            other => bail!("source: expected PostCopyLost, got {other:?}"),
        }
        match out.dest {
            Err(e @ MigrateError::NotRecovered { .. }) => {
                let MigrateError::NotRecovered {
                    missing, window: w, ..
                } = &e
                else {
                    unreachable!()
                };
                eprintln!("destination after {elapsed:?}: {e}");
                assert_eq!(*w, window);
                assert!(
                    *missing > 0 && *missing <= total_pages,
                    "missing {missing} of {total_pages}"
                );
                assert!(e.to_string().contains(&format!("{missing} pages")), "{e}");
                assert!(elapsed >= window, "failed before the window: {elapsed:?}");
            }
            other => bail!("destination: expected NotRecovered, got {other:?}"),
        }
        Ok(())
    }

    fn params() -> Params {
        Params {
            mode: WireMode::PostCopy,
            compression: Compression::None,
            checksums: false,
            streams: 1,
            transport: TransportKind::Tcp,
            memory: MemoryMap::new(4096, vec![GpaRange::new(0, 1 << 20)]).unwrap(),
            rdma: vec![],
        }
    }

    fn connect_cfg(auth: Auth) -> ConnectConfig {
        ConnectConfig {
            auth,
            params: params(),
            urgent: true,
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn resuming_with_a_wrong_key_or_an_unknown_session_is_refused() -> Result<()> {
        let listener = SessionListener::bind(
            &Endpoint::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
            ServerConfig {
                auth: key(1),
                capabilities: Capabilities {
                    modes: vec![WireMode::PostCopy],
                    compression: false,
                    checksums: false,
                    max_streams: 4,
                    transports: vec![TransportKind::Tcp],
                    memory: None,
                    rdma: vec![],
                },
            },
            Duration::from_secs(5),
        )?;
        let ep = listener.endpoint()?;
        thread::scope(|s| -> Result<()> {
            let first = s.spawn(|| connect(&ep, &connect_cfg(key(1))));
            let opened = listener.accept_session(true, Duration::from_secs(10))?;
            let id = first.join().map_err(|_| anyhow!("client panicked"))??.id;
            assert_eq!(opened.id, id);
            drop(opened);
            // The destination now waits for `id` to be resumed.
            let listener = &listener;
            let waiting =
                s.spawn(move || listener.accept_resume(id, |_| true, Duration::from_secs(15)));
            // A stranger with the session id but not the key.
            let e = reconnect(&ep, &connect_cfg(key(2)), id).unwrap_err();
            let msg = ferry_protocol::handshake::error_chain(&e);
            assert!(msg.contains("Authentication failed"), "{msg}");
            // The key but another session.
            let other = SessionId([0x5a; 16]);
            let e = reconnect(&ep, &connect_cfg(key(1)), other).unwrap_err();
            let msg = ferry_protocol::handshake::error_chain(&e);
            assert!(msg.contains("Unknown session 5a5a"), "{msg}");
            // A new session while one is being recovered.
            connect(&ep, &connect_cfg(key(1))).unwrap_err();
            // The rightful source.
            let back = reconnect(&ep, &connect_cfg(key(1)), id)?;
            let resumed = waiting.join().map_err(|_| anyhow!("listener panicked"))??;
            assert_eq!(back.id, id);
            assert_eq!(resumed.id, id);
            assert_eq!(resumed.bulk.len(), 1);
            assert!(resumed.urgent.is_some());
            let refusals = listener.refusals();
            eprintln!("{refusals:#?}");
            assert!(
                refusals.iter().any(|r| r.contains("Authentication failed")),
                "{refusals:?}"
            );
            assert!(
                refusals.iter().any(|r| r.contains("Unknown session 5a5a")),
                "{refusals:?}"
            );
            assert!(
                refusals
                    .iter()
                    .any(|r| r.contains("new session while a session is being recovered")),
                "{refusals:?}"
            );
            Ok(())
        })
    }
}
