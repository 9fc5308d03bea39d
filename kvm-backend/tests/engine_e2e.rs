// SPDX-License-Identifier: Apache-2.0 OR MIT
//! End to end through the real engine: a KVM guest migrated over loopback TCP by
//! `ferry_engine::session::migrate_local` (the engine's source and destination, in one
//! process), in pre-copy, post-copy and hybrid mode; the destination guest must continue (more
//! iterations, same serial stream) and pass the engine's digest check and this crate's
//! full-memory model check. Skips without /dev/kvm (and, for post-copy and hybrid, without
//! userfaultfd); fails instead under `FERRY_REQUIRE_CAPS=1`.

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::thread;
    use std::time::Duration;

    use anyhow::{Result, anyhow};
    use ferry_engine::dest::DestVm;
    use ferry_engine::policy::{Mode, Policy};
    use ferry_engine::session::{SessionOptions, migrate_local};
    use ferry_engine::source::SourceVm;
    use ferry_engine::vm::VmControl;
    use ferry_kvm::{KvmVm, MemBacking, VmConfig, Workload};
    use ferry_protocol::handshake::{Auth, Psk, TransportKind};

    /// Reports a missing capability: a skip, or a failure under `FERRY_REQUIRE_CAPS=1`.
    fn skip(reason: &str) {
        assert!(
            std::env::var("FERRY_REQUIRE_CAPS").as_deref() != Ok("1"),
            "required capability missing (FERRY_REQUIRE_CAPS=1): {reason}"
        );
        eprintln!("SKIP: {reason}");
    }

    fn caps(uffd: bool) -> bool {
        if !ferry_kvm::kvm_available() {
            skip("/dev/kvm cannot be opened");
            return false;
        }
        if uffd
            && let Err(e) =
                ferry_engine::uffd::Uffd::open(false, ferry_engine::uffd::Features::NONE)
        {
            skip(&format!("userfaultfd unavailable: {e}"));
            return false;
        }
        true
    }

    /// One migration at a time: each spins a vCPU and an engine, and the CI machine has few
    /// cores (in parallel they starve each other into the engine's timeouts).
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn run(mode: Mode, backing: MemBacking, workload: Workload) -> Result<()> {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let cfg = VmConfig {
            mem_bytes: 32 << 20,
            vcpus: 1,
            workload,
            backing,
            ..Default::default()
        };
        let key = Auth::Psk(Psk::from_bytes([5; 32]));
        let mut src = KvmVm::new_source(&cfg)?;
        src.start()?;
        thread::sleep(Duration::from_millis(200));
        let mut dst = KvmVm::new_destination(&cfg)?;
        let dst_mem = dst.memory();
        let opts = SessionOptions {
            transport: TransportKind::Tcp,
            streams: 2,
            auth: key,
            ..SessionOptions::default()
        };
        let policy = Policy {
            mode,
            // Generous: these tests check correctness, not blackout (a loaded debug build
            // under-estimates bandwidth on tiny final rounds).
            max_blackout: Duration::from_millis(200),
            max_rounds: 6,
            checksums: true,
            timeout: Duration::from_secs(60),
            ..Policy::default()
        };
        let src_mem = src.memory();
        let mut tracker = src.dirty_tracker();
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
        let r = done.source;
        assert!(done.dest.verified, "destination digest mismatch");
        // The guest runs on at the destination.
        thread::sleep(Duration::from_millis(300));
        dst.pause().map_err(|e| anyhow!("pause: {e}"))?;
        eprintln!("last (blackout) harvest: {:?}", tracker.last_harvest());
        let before = src.guest_stats();
        if let Some(f) = dst.fault() {
            return Err(anyhow!("{f}"));
        }
        let after = dst.guest_stats();
        eprintln!(
            "{} ({:?}): rounds {} blackout {:.0} µs {:?}, faults {} p50 {} µs; guest max gap {} µs, \
             stalled {} µs",
            r.mode,
            backing,
            r.rounds,
            r.blackout_us,
            r.blackout_phases_us,
            r.faults.count,
            r.faults.p50_us,
            after.max_gap_us,
            after.stall_us_over_100
        );
        assert!(r.verified, "source digest not confirmed");
        if mode == Mode::PostCopy {
            // Pure post-copy: every page is stale, so the vCPUs' first-touch pages (code,
            // stack, page tables, parameters...) all went out at the switchover.
            assert!(
                r.first_touch_pages >= 4,
                "only {} first-touch pages sent",
                r.first_touch_pages
            );
        }
        assert!(
            after.iterations > before.iterations,
            "guest did not continue: {before:?} -> {after:?}"
        );
        let rep = dst.verify_memory()?;
        assert!(rep.ok(), "{rep:?}");
        // The destination continues the source's serial stream; it does not boot again.
        assert!(
            !dst.serial_output().contains("up"),
            "{}",
            dst.serial_output()
        );
        Ok(())
    }

    #[test]
    fn precopy_rate_limited_writer() -> Result<()> {
        if !caps(false) {
            return Ok(());
        }
        let w = Workload::Writer {
            working_set_mib: 8,
            rate_mib_s: Some(8),
        };
        run(Mode::PreCopy, MemBacking::Memfd, w)
    }

    #[test]
    fn postcopy_verifier_memfd() -> Result<()> {
        if !caps(true) {
            return Ok(());
        }
        run(Mode::PostCopy, MemBacking::Memfd, Workload::Verifier)
    }

    #[test]
    fn hybrid_verifier_anonymous() -> Result<()> {
        if !caps(true) {
            return Ok(());
        }
        run(Mode::Hybrid, MemBacking::Anonymous, Workload::Verifier)
    }
}
