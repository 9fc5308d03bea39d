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
    use ferry_engine::vm::{GuestMemory, VmControl};
    use ferry_kvm::{KvmVm, MemBacking, VmConfig, Workload};

    const UFFD_API: u64 = 0xAA;
    const fn iowr(nr: u64, size: u64) -> u64 {
        (3 << 30) | (size << 16) | (0xAA << 8) | nr
    }
    const UFFDIO_API: u64 = iowr(0x3F, 24);
    const UFFDIO_REGISTER: u64 = iowr(0x00, 32);
    const UFFDIO_COPY: u64 = iowr(0x03, 40);
    const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
    const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

    #[repr(C)]
    struct UffdioApi {
        api: u64,
        features: u64,
        ioctls: u64,
    }
    #[repr(C)]
    struct UffdioRegister {
        start: u64,
        len: u64,
        mode: u64,
        ioctls: u64,
    }
    #[repr(C)]
    struct UffdioCopy {
        dst: u64,
        src: u64,
        len: u64,
        mode: u64,
        copy: i64,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct UffdMsg {
        event: u8,
        _r: [u8; 7],
        flags: u64,
        address: u64,
        _rest: [u8; 8],
    }

    /// Reports a missing capability: a skip, or a failure under `FERRY_REQUIRE_CAPS=1`.
    fn skip(reason: &str) {
        assert!(
            std::env::var("FERRY_REQUIRE_CAPS").as_deref() != Ok("1"),
            "required capability missing (FERRY_REQUIRE_CAPS=1): {reason}"
        );
        eprintln!("SKIP: {reason}");
    }

    fn userfaultfd() -> Option<i32> {
        // SAFETY: plain syscall; flags only. Not UFFD_USER_MODE_ONLY: KVM touches guest pages
        // from the kernel.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API with a valid struct on our fd.
        if unsafe { libc::ioctl(fd, UFFDIO_API, &mut api) } != 0 {
            return None;
        }
        Some(fd)
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

        let Some(uffd) = userfaultfd() else {
            skip("userfaultfd unavailable");
            return Ok(());
        };
        let mut dst = KvmVm::new_destination(&cfg)?;
        let (smem, dmem) = (src.memory(), dst.memory());
        for r in dmem.regions() {
            let mut reg = UffdioRegister {
                start: r.host_addr as u64,
                len: r.len,
                mode: UFFDIO_REGISTER_MODE_MISSING,
                ioctls: 0,
            };
            // SAFETY: registers a live mapping owned by `dst` on our uffd.
            if unsafe { libc::ioctl(uffd, UFFDIO_REGISTER, &mut reg) } != 0 {
                bail!("UFFDIO_REGISTER: {}", std::io::Error::last_os_error());
            }
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
            std::thread::spawn(move || -> Result<()> {
                let mut pfd = libc::pollfd {
                    fd: uffd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                while !stop.load(Ordering::SeqCst) {
                    // SAFETY: one valid pollfd.
                    if unsafe { libc::poll(&mut pfd, 1, 10) } <= 0 {
                        continue;
                    }
                    let mut msg = std::mem::MaybeUninit::<UffdMsg>::uninit();
                    // SAFETY: reads at most one 32-byte message into `msg`.
                    let n = unsafe { libc::read(uffd, msg.as_mut_ptr().cast(), 32) };
                    if n != 32 {
                        continue;
                    }
                    // SAFETY: the kernel filled all 32 bytes.
                    let msg = unsafe { msg.assume_init() };
                    if msg.event != UFFD_EVENT_PAGEFAULT {
                        continue;
                    }
                    let page = msg.address & !4095;
                    let Some(&(d, s, _)) = map.iter().find(|(d, _, l)| page >= *d && page < d + l)
                    else {
                        bail!("fault outside guest RAM at {page:#x}");
                    };
                    let mut c = UffdioCopy {
                        dst: page,
                        src: s + (page - d),
                        len: 4096,
                        mode: 0,
                        copy: 0,
                    };
                    // SAFETY: copies one page from the (paused) source's live mapping into the
                    // registered destination page.
                    let r = unsafe { libc::ioctl(uffd, UFFDIO_COPY, &mut c) };
                    if r != 0
                        && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
                    {
                        bail!("UFFDIO_COPY: {}", std::io::Error::last_os_error());
                    }
                    faults.fetch_add(1, Ordering::Relaxed);
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
        // SAFETY: closing our own fd after the handler stopped.
        unsafe { libc::close(uffd) };
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
