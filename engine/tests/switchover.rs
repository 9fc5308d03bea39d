// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The switchover's point of no return, over loopback: once the source handed its VM state to
//! the connection, it resumes its own VM only when the destination said it will not run it.
//!
//! The destination's `Resumed` is lost by a destination VM whose `resume` cuts every socket of
//! the destination (the `dest_tap`) right after resuming, so its `Resumed` send fails: without
//! recovery the source must keep its VM paused and return `SwitchoverUnconfirmed` while the
//! destination runs the VM; with recovery on both sides the source resumes the session, learns
//! that the destination runs the VM, and the migration ends verified. A destination whose
//! restore fails sends `Error` and the source resumes its VM; if the connection is cut in that
//! restore too, the destination answers `Abort` on the resumed session and the source resumes
//! its VM then. A destination whose resume fails pauses its VM again before sending `Error`; if
//! that pause fails too it says nothing, and the source stays paused.

#[allow(dead_code)]
mod common;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::common::uffd_available;

    use std::thread;
    use std::time::{Duration, Instant};

    use anyhow::{Result, anyhow, bail};
    use ferry_engine::MigrateError;
    use ferry_engine::dest::DestVm;
    use ferry_engine::memory::MemBacking;
    use ferry_engine::policy::{Mode, Policy};
    use ferry_engine::procmem::{ProcVmConfig, ProcessVm, WritePattern};
    use ferry_engine::session::{
        ConnectionTap, LocalOutcome, LocalRecovery, SessionOptions, migrate_local_with,
    };
    use ferry_engine::source::SourceVm;
    use ferry_engine::vm::{BoxError, GuestMemory, VmControl};
    use ferry_protocol::handshake::{Auth, Psk, TransportKind};

    fn init_log() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }

    fn vm_config() -> ProcVmConfig {
        ProcVmConfig {
            mem_bytes: 32 << 20,
            regions: 2,
            backing: MemBacking::Memfd,
            writers: 1,
            write_mib_s: Some(4),
            pattern: WritePattern::HotSet,
            seed: 5,
            fill_percent: 50,
            ..ProcVmConfig::default()
        }
    }

    /// Stop-and-copy (pre-copy converging at once: a generous budget) or pure post-copy.
    fn policy(mode: Mode) -> Policy {
        Policy {
            mode,
            max_blackout: Duration::from_millis(200),
            max_rounds: 8,
            checksums: true,
            timeout: Duration::from_secs(20),
            ..Policy::default()
        }
    }

    fn options() -> SessionOptions {
        SessionOptions {
            transport: TransportKind::Tcp,
            streams: 2,
            auth: Auth::Psk(Psk::from_bytes([4; 32])),
            ..SessionOptions::default()
        }
    }

    /// What the destination's VM did.
    #[derive(Debug, Default, Clone, Copy)]
    struct Calls {
        restores: u32,
        resumes: u32,
        pauses: u32,
    }

    /// A destination VM control around a process VM.
    struct DestControl<'a> {
        vm: &'a mut ProcessVm,
        /// Cut after `resume` (the `Resumed` send then fails).
        cut_after_resume: Option<ConnectionTap>,
        /// Fail `restore_state` (after cutting this tap, if any).
        fail_restore: Option<Option<ConnectionTap>>,
        /// Fail `resume` (after starting the writers: some vCPUs ran), and then `pause` too
        /// when the flag says so.
        fail_resume: Option<bool>,
        /// Really run the writers on `resume` (else only record it: in post-copy without
        /// recovery, writers touching a missing page would block forever, and so would
        /// dropping the VM).
        run_writers: bool,
        calls: Calls,
    }

    impl<'a> DestControl<'a> {
        fn new(vm: &'a mut ProcessVm) -> Self {
            Self {
                vm,
                cut_after_resume: None,
                fail_restore: None,
                fail_resume: None,
                run_writers: true,
                calls: Calls::default(),
            }
        }

        /// Whether the VM was resumed and not paused since.
        fn runs(&self) -> bool {
            self.calls.resumes > self.calls.pauses
        }
    }

    impl VmControl for DestControl<'_> {
        fn pause(&mut self) -> Result<(), BoxError> {
            if self.fail_resume == Some(true) {
                return Err("injected pause failure".into());
            }
            self.calls.pauses += 1;
            if self.run_writers {
                self.vm.pause()?;
            }
            Ok(())
        }
        fn save_state(&mut self) -> Result<Vec<u8>, BoxError> {
            self.vm.save_state()
        }
        fn restore_state(&mut self, b: &[u8]) -> Result<(), BoxError> {
            self.calls.restores += 1;
            if let Some(tap) = &self.fail_restore {
                if let Some(tap) = tap {
                    tap.cut();
                }
                return Err("injected restore failure".into());
            }
            self.vm.restore_state(b)
        }
        fn resume(&mut self) -> Result<(), BoxError> {
            self.calls.resumes += 1;
            if self.run_writers {
                self.vm.resume()?;
            }
            if let Some(tap) = &self.cut_after_resume {
                let n = tap.cut();
                eprintln!("destination resumed, then cut its {n} sockets");
            }
            if self.fail_resume.is_some() {
                return Err("injected resume failure".into());
            }
            Ok(())
        }
    }

    fn migrate(
        src: &mut ProcessVm,
        dst_mem: &dyn GuestMemory,
        dest: &mut DestControl<'_>,
        mode: Mode,
        recovery: &LocalRecovery,
        opts: &SessionOptions,
    ) -> Result<LocalOutcome> {
        let src_mem = src.memory();
        let mut tracker = src.tracker();
        Ok(migrate_local_with(
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
            &policy(mode),
            opts,
            recovery,
            &mut |_| {},
        )?)
    }

    /// Writes the VM's writers make in 150 ms.
    fn writes_meanwhile(vm: &ProcessVm) -> u64 {
        let before = vm.stats().writes;
        thread::sleep(Duration::from_millis(150));
        vm.stats().writes - before
    }

    /// The source stayed paused (its writers make no progress) with `SwitchoverUnconfirmed`.
    fn assert_source_paused(
        src: &ProcessVm,
        out: &Result<ferry_engine::MigrationReport, MigrateError>,
    ) -> Result<()> {
        match out {
            Err(e @ MigrateError::SwitchoverUnconfirmed { waited, .. }) => {
                eprintln!(
                    "source (after {waited:?}): {}",
                    ferry_protocol::handshake::error_chain(e)
                );
                assert!(e.to_string().contains("left paused"), "{e}");
            }
            other => bail!("source: expected SwitchoverUnconfirmed, got {other:?}"),
        }
        assert!(src.is_paused(), "the source VM was resumed");
        assert_eq!(writes_meanwhile(src), 0, "the source's writers run");
        Ok(())
    }

    fn resumed_lost_without_recovery(mode: Mode) -> Result<()> {
        init_log();
        let cfg = vm_config();
        let mut src = ProcessVm::new(cfg.clone())?;
        src.start()?;
        let mut dst = ProcessVm::new_destination(&cfg)?;
        let dst_mem = dst.memory();
        let recovery = LocalRecovery::default();
        let mut dest = DestControl::new(&mut dst);
        dest.cut_after_resume = Some(recovery.dest_tap.clone());
        // Post-copy: the destination misses pages forever (nobody serves them); its writers
        // would block on them for good.
        dest.run_writers = mode != Mode::PostCopy;
        let out = migrate(&mut src, &*dst_mem, &mut dest, mode, &recovery, &options())?;
        assert_source_paused(&src, &out.source)?;
        match &out.dest {
            Err(e @ MigrateError::ResumedUnconfirmed { .. }) => eprintln!("destination: {e}"),
            other => bail!("destination: expected ResumedUnconfirmed, got {other:?}"),
        }
        assert!(
            dest.runs(),
            "the destination VM does not run: {:?}",
            dest.calls
        );
        if dest.run_writers {
            assert!(
                writes_meanwhile(&dst) > 0,
                "the destination's writers do not run"
            );
            dst.pause().map_err(|e| anyhow!("pause: {e}"))?;
        }
        Ok(())
    }

    #[test]
    fn resumed_lost_in_stop_and_copy_leaves_the_source_paused() -> Result<()> {
        resumed_lost_without_recovery(Mode::PreCopy)
    }

    #[test]
    fn resumed_lost_in_post_copy_leaves_the_source_paused() -> Result<()> {
        if !uffd_available() {
            return Ok(());
        }
        resumed_lost_without_recovery(Mode::PostCopy)
    }

    #[test]
    fn source_recovery_without_a_destination_to_answer_stays_paused() -> Result<()> {
        init_log();
        let cfg = vm_config();
        let mut src = ProcessVm::new(cfg.clone())?;
        src.start()?;
        let mut dst = ProcessVm::new_destination(&cfg)?;
        let dst_mem = dst.memory();
        let window = Duration::from_secs(2);
        let recovery = LocalRecovery {
            source_window: Some(window),
            ..LocalRecovery::default()
        };
        let mut dest = DestControl::new(&mut dst);
        dest.cut_after_resume = Some(recovery.dest_tap.clone());
        // Each attempt waits for the handshake at most this long (the destination's listener
        // still accepts connections, but nobody answers them).
        let opts = SessionOptions {
            timeout: Duration::from_secs(1),
            ..options()
        };
        let t0 = Instant::now();
        let out = migrate(
            &mut src,
            &*dst_mem,
            &mut dest,
            Mode::PreCopy,
            &recovery,
            &opts,
        )?;
        assert_source_paused(&src, &out.source)?;
        if let Err(MigrateError::SwitchoverUnconfirmed { waited, .. }) = &out.source {
            assert!(*waited >= window, "gave up before the window: {waited:?}");
        }
        assert!(t0.elapsed() >= window);
        assert!(
            dest.runs(),
            "the destination VM does not run: {:?}",
            dest.calls
        );
        dst.pause().map_err(|e| anyhow!("pause: {e}"))?;
        Ok(())
    }

    fn restore_fails(mode: Mode) -> Result<()> {
        init_log();
        let cfg = vm_config();
        let mut src = ProcessVm::new(cfg.clone())?;
        src.start()?;
        let mut dst = ProcessVm::new_destination(&cfg)?;
        let dst_mem = dst.memory();
        let recovery = LocalRecovery::default();
        let mut dest = DestControl::new(&mut dst);
        dest.fail_restore = Some(None);
        let out = migrate(&mut src, &*dst_mem, &mut dest, mode, &recovery, &options())?;
        match &out.source {
            Err(MigrateError::PeerAborted { reason }) => {
                eprintln!("source: the destination refused: {reason}");
                assert!(reason.contains("injected restore failure"), "{reason}");
                assert!(
                    reason.contains("does not run on the destination"),
                    "{reason}"
                );
            }
            other => bail!("source: expected PeerAborted, got {other:?}"),
        }
        assert!(!src.is_paused(), "the source VM stayed paused");
        assert!(
            writes_meanwhile(&src) > 0,
            "the source's writers do not run"
        );
        match &out.dest {
            Err(MigrateError::Vm { op, .. }) => assert_eq!(*op, "restore state"),
            other => bail!("destination: expected the restore error, got {other:?}"),
        }
        assert_eq!(
            dest.calls.resumes, 0,
            "the destination resumed: {:?}",
            dest.calls
        );
        src.pause().map_err(|e| anyhow!("pause: {e}"))?;
        Ok(())
    }

    #[test]
    fn destination_restore_failure_resumes_the_source() -> Result<()> {
        restore_fails(Mode::PreCopy)?;
        if uffd_available() {
            restore_fails(Mode::PostCopy)?;
        }
        Ok(())
    }

    fn resumed_lost_with_recovery(mode: Mode) -> Result<()> {
        init_log();
        let cfg = vm_config();
        let mut src = ProcessVm::new(cfg.clone())?;
        src.start()?;
        let mut dst = ProcessVm::new_destination(&cfg)?;
        let dst_mem = dst.memory();
        let recovery = LocalRecovery {
            source_window: Some(Duration::from_secs(15)),
            dest_window: Some(Duration::from_secs(15)),
            ..LocalRecovery::default()
        };
        let mut dest = DestControl::new(&mut dst);
        dest.cut_after_resume = Some(recovery.dest_tap.clone());
        let out = migrate(&mut src, &*dst_mem, &mut dest, mode, &recovery, &options())?;
        let source = out.source.map_err(|e| anyhow!("source: {e:#}"))?;
        let dreport = out.dest.map_err(|e| anyhow!("destination: {e:#}"))?;
        eprintln!(
            "{mode:?}: {} switchover confirmed on the resumed session after {:.1} ms \
             ({:.1} ms without a connection), recoveries {} / {}",
            source.switchover,
            source.blackout_us / 1000.0,
            source.disconnected_ms,
            source.recoveries,
            dreport.recoveries
        );
        assert_eq!(source.recoveries, 1);
        assert_eq!(dreport.recoveries, 1);
        assert!(source.verified && dreport.verified, "digest mismatch");
        assert_eq!(source.digest, dreport.digest);
        assert!(src.is_paused(), "the source VM was resumed");
        assert_eq!(writes_meanwhile(&src), 0, "the source's writers run");
        assert!(dest.runs());
        assert!(
            writes_meanwhile(&dst) > 0,
            "the destination's writers do not run"
        );
        dst.pause().map_err(|e| anyhow!("pause: {e}"))?;
        Ok(())
    }

    #[test]
    fn resumed_lost_in_stop_and_copy_is_recovered() -> Result<()> {
        resumed_lost_with_recovery(Mode::PreCopy)
    }

    #[test]
    fn resumed_lost_in_post_copy_is_recovered() -> Result<()> {
        if !uffd_available() {
            return Ok(());
        }
        resumed_lost_with_recovery(Mode::PostCopy)
    }

    #[test]
    fn restore_failure_with_a_lost_connection_is_told_on_the_resumed_session() -> Result<()> {
        init_log();
        let cfg = vm_config();
        let mut src = ProcessVm::new(cfg.clone())?;
        src.start()?;
        let mut dst = ProcessVm::new_destination(&cfg)?;
        let dst_mem = dst.memory();
        let recovery = LocalRecovery {
            source_window: Some(Duration::from_secs(15)),
            dest_window: Some(Duration::from_secs(15)),
            ..LocalRecovery::default()
        };
        let mut dest = DestControl::new(&mut dst);
        // The restore cuts the connection and fails: the destination's `Error` cannot go out.
        dest.fail_restore = Some(Some(recovery.dest_tap.clone()));
        let out = migrate(
            &mut src,
            &*dst_mem,
            &mut dest,
            Mode::PreCopy,
            &recovery,
            &options(),
        )?;
        match &out.source {
            Err(MigrateError::PeerAborted { reason }) => {
                eprintln!("source: the destination answered: {reason}");
                assert!(reason.contains("never resumed the VM"), "{reason}");
                assert!(reason.contains("injected restore failure"), "{reason}");
            }
            other => bail!("source: expected PeerAborted, got {other:?}"),
        }
        assert!(!src.is_paused(), "the source VM stayed paused");
        assert!(
            writes_meanwhile(&src) > 0,
            "the source's writers do not run"
        );
        assert!(out.dest.is_err(), "the destination succeeded");
        assert_eq!(
            dest.calls.resumes, 0,
            "the destination resumed: {:?}",
            dest.calls
        );
        src.pause().map_err(|e| anyhow!("pause: {e}"))?;
        Ok(())
    }

    #[test]
    fn destination_resume_failure_pauses_it_and_resumes_the_source() -> Result<()> {
        init_log();
        let cfg = vm_config();
        let mut src = ProcessVm::new(cfg.clone())?;
        src.start()?;
        let mut dst = ProcessVm::new_destination(&cfg)?;
        let dst_mem = dst.memory();
        let recovery = LocalRecovery::default();
        let mut dest = DestControl::new(&mut dst);
        dest.fail_resume = Some(false);
        let out = migrate(
            &mut src,
            &*dst_mem,
            &mut dest,
            Mode::PreCopy,
            &recovery,
            &options(),
        )?;
        match &out.source {
            Err(MigrateError::PeerAborted { reason }) => {
                eprintln!("source: the destination refused: {reason}");
                assert!(reason.contains("injected resume failure"), "{reason}");
                assert!(reason.contains("paused again"), "{reason}");
            }
            other => bail!("source: expected PeerAborted, got {other:?}"),
        }
        assert!(!src.is_paused(), "the source VM stayed paused");
        assert!(
            writes_meanwhile(&src) > 0,
            "the source's writers do not run"
        );
        assert!(!dest.runs(), "the destination VM runs: {:?}", dest.calls);
        assert!(dst.is_paused(), "the destination's writers were not paused");
        assert_eq!(writes_meanwhile(&dst), 0, "the destination's writers run");
        src.pause().map_err(|e| anyhow!("pause: {e}"))?;
        Ok(())
    }

    #[test]
    fn destination_that_cannot_pause_after_a_failed_resume_keeps_the_source_paused() -> Result<()> {
        init_log();
        let cfg = vm_config();
        let mut src = ProcessVm::new(cfg.clone())?;
        src.start()?;
        let mut dst = ProcessVm::new_destination(&cfg)?;
        let dst_mem = dst.memory();
        let recovery = LocalRecovery::default();
        let mut dest = DestControl::new(&mut dst);
        dest.fail_resume = Some(true);
        let out = migrate(
            &mut src,
            &*dst_mem,
            &mut dest,
            Mode::PreCopy,
            &recovery,
            &options(),
        )?;
        // The destination's VM may run: it says nothing, and the source must not resume.
        assert_source_paused(&src, &out.source)?;
        match &out.dest {
            Err(MigrateError::Vm { op, .. }) => assert_eq!(*op, "resume"),
            other => bail!("destination: expected the resume error, got {other:?}"),
        }
        dest.fail_resume = None;
        dest.pause().map_err(|e| anyhow!("pause: {e}"))?;
        Ok(())
    }
}
