// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Post-copy placement lands in guest memory even when the destination's memory was populated
//! before the switchover (a pinning registration, a stray write): userfaultfd never faults on a
//! populated page, and `UFFDIO_COPY`/`UFFDIO_ZEROPAGE` refuse it with `EEXIST`, so unless the
//! destination drops such pages before registering, the guest keeps whatever was there while
//! the digest (computed from the received bytes) still matches. The destination here is
//! restored but never resumed, so after the migration its memory must equal the paused
//! source's byte for byte.

mod common;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::common::{NoResume, uffd_available};
    use std::net::{Ipv4Addr, SocketAddr};
    use std::thread;
    use std::time::Duration;

    use anyhow::Result;
    use ferry_engine::dest::{DestVm, receive};
    use ferry_engine::layout::Layout;
    use ferry_engine::memory::MemBacking;
    use ferry_engine::policy::{Mode, Policy};
    use ferry_engine::procmem::{ProcVmConfig, ProcessVm, WritePattern};
    use ferry_engine::session::{
        SessionOptions, accept_destination, connect_source, server_config,
    };
    use ferry_engine::source::{SourceVm, migrate};
    use ferry_engine::vm::GuestMemory;
    use ferry_protocol::handshake::{Auth, TransportKind};
    use ferry_transport::Endpoint;
    use ferry_transport::session::SessionListener;

    fn run(backing: MemBacking, transport: TransportKind) -> Result<()> {
        let cfg = ProcVmConfig {
            mem_bytes: 8 << 20,
            regions: 2,
            backing,
            writers: 1,
            write_mib_s: Some(2),
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
        let layout_d = Layout::new(&*dst_mem)?;
        let listener = SessionListener::bind(
            &Endpoint::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
            server_config(&layout_d, Auth::Insecure, 8),
            Duration::from_secs(10),
        )?;
        let ep = listener.endpoint()?;
        let opts = SessionOptions {
            transport,
            streams: 2,
            ..SessionOptions::default()
        };
        let policy = Policy {
            mode: Mode::PostCopy,
            checksums: true,
            timeout: Duration::from_secs(30),
            ..Policy::default()
        };
        let dest_opts = opts.clone();
        let dm = dst_mem.clone();
        let dest = thread::spawn(move || -> Result<bool> {
            let (streams, _reg, _) =
                accept_destination(&listener, &layout_d, &dest_opts, Duration::from_secs(20))?;
            let rep = receive(
                DestVm {
                    memory: &*dm,
                    control: &mut NoResume(&mut dst),
                },
                streams,
                Duration::from_secs(30),
            )?;
            Ok(rep.verified)
        });
        let src_mem = src.memory();
        let layout_s = Layout::new(&*src_mem)?;
        let (streams, _reg) = connect_source(&ep, &layout_s, &policy, &opts)?;
        let mut tracker = src.tracker();
        let r = migrate(
            SourceVm {
                memory: &*src_mem,
                dirty: &mut tracker,
                control: &mut src,
            },
            streams,
            &policy,
            &mut |_| {},
        )?;
        let dest_verified = dest
            .join()
            .map_err(|_| anyhow::anyhow!("destination panicked"))??;
        assert_eq!(r.switchover, "post-copy");
        assert!(r.verified && dest_verified, "digest mismatch");
        assert!(
            r.zero_pages > 0,
            "no zero pages: the zero-page path is untested"
        );
        let layout_d = Layout::new(&*dst_mem)?;
        for region in layout_s.regions() {
            let range = ferry_protocol::GpaRange::new(region.gpa, region.len);
            let a = layout_s.bytes(range)?;
            let b = layout_d.bytes(range)?;
            let differing = a
                .chunks(4096)
                .zip(b.chunks(4096))
                .filter(|(x, y)| x != y)
                .count();
            assert_eq!(
                differing, 0,
                "{backing:?} over {transport:?}: pages differ in region {:#x}",
                region.gpa
            );
        }
        Ok(())
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
}
