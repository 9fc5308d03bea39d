// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Receives into regions' backing files through the page cache (`Target::File`: splice from the
//! socket through a pipe into a memfd) over each runnable backend, and checks the bytes through
//! a shared mapping of the same file; a region without a file and a peer that closes mid-range
//! are reported with their values.

mod common;

#[cfg(test)]
// Test sizes are a few MiB, so the casts cannot truncate.
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::sync::Arc;
    use std::time::Duration;

    use anyhow::{Result, anyhow, ensure};
    use ferry_transport::{
        At, Backend, DataStream, GpaRange, GuestRegion, MemoryRegistration, RangeError,
        RegistrationConfig, StreamError, Target,
    };

    use super::common::*;

    /// A memfd of `len` bytes with a shared mapping ("guest memory" backed by a file).
    struct FileMem {
        fd: OwnedFd,
        ptr: *mut u8,
        len: usize,
    }

    impl FileMem {
        fn new(len: usize) -> Self {
            let fd = rustix::fs::memfd_create("ferry-file-target", rustix::fs::MemfdFlags::CLOEXEC)
                .unwrap();
            rustix::fs::ftruncate(&fd, len as u64).unwrap();
            // SAFETY: a new shared mapping of the whole file, no fixed address; checked below.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED);
            Self {
                fd,
                ptr: ptr.cast(),
                len,
            }
        }

        fn bytes(&self) -> &[u8] {
            // SAFETY: mapped for `len` bytes; read only after the receivers finished.
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }
    }

    impl Drop for FileMem {
        fn drop(&mut self) {
            // SAFETY: unmapping exactly the mapping made in `new`.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    /// Registration of `mems` at gpa 0, 1 GiB, ...; the file is given only where `with_file`.
    fn register(mems: &[FileMem], with_file: &[bool]) -> Arc<MemoryRegistration> {
        let regions: Vec<GuestRegion> = mems
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let r = GuestRegion::new((i as u64) << 30, m.ptr, m.len as u64);
                if with_file[i] {
                    // Each file is mapped from offset 0 (a non-zero offset: `offset_is_applied`).
                    r.with_file(m.fd.as_raw_fd(), 0)
                } else {
                    r
                }
            })
            .collect();
        // SAFETY: the mappings and files live in `mems`, which the tests drop after every
        // stream and the registration.
        unsafe { MemoryRegistration::new(&regions, RegistrationConfig { slice_size: MIB }) }
            .unwrap()
    }

    fn backends() -> Vec<(Backend, Net)> {
        let mut v = vec![(Backend::Socket, Net::Tcp), (Backend::Socket, Net::Unix)];
        if uring_available() {
            v.push((Backend::Uring, Net::Tcp));
        }
        v
    }

    fn pair(
        backend: Backend,
        net: Net,
        src: &Arc<MemoryRegistration>,
        dst: &Arc<MemoryRegistration>,
    ) -> Result<(Box<dyn DataStream>, Box<dyn DataStream>)> {
        let cfg = config(backend, Duration::from_secs(10));
        let (c, s) = socket_pairs(net, 1)?.into_iter().next().unwrap();
        Ok((open(c, 0, src, &cfg)?, open(s, 0, dst, &cfg)?))
    }

    #[test]
    fn pages_arrive_in_the_file() -> Result<()> {
        for (backend, net) in backends() {
            let sizes = [6 * MIB, 2 * MIB + 8192];
            let src = Guest::new(&sizes, MIB, Some(0xf11e), None);
            let mems: Vec<FileMem> = sizes.iter().map(|&s| FileMem::new(s as usize)).collect();
            let dst = register(&mems, &[true, true]);
            let (mut tx, mut rx) = pair(backend, net, &src.reg, &dst)?;
            let ranges = ranges_for(&src.layout);
            let total: u64 = ranges.iter().map(|r| r.len).sum();
            eprintln!("{backend} {net:?}: {} ranges, {total} bytes", ranges.len());
            let got = std::thread::scope(|s| {
                let h = s.spawn(|| receive_frames(rx.as_mut(), Target::File));
                for r in &ranges {
                    tx.send_frame(&header(r.gpa, r.len), &[*r])?;
                }
                tx.send_frame(&header(END_GPA, 0), &[])?;
                tx.flush()?;
                h.join()
                    .map_err(|_| anyhow!("receiver panicked"))?
                    .map_err(anyhow::Error::from)
            })?;
            ensure!(got == total, "{backend} {net:?}: received {got} of {total}");
            ensure!(rx.stats().bytes_received >= total);
            for (i, m) in mems.iter().enumerate() {
                ensure!(
                    m.bytes() == src.mems[i].bytes(),
                    "{backend} {net:?}: region {i} differs"
                );
            }
            drop((tx, rx));
        }
        Ok(())
    }

    #[test]
    fn offset_is_applied() -> Result<()> {
        // One file holding a region at file offset 1 MiB: bytes for gpa 0 land at 1 MiB.
        let file = FileMem::new(3 * MIB as usize);
        // The region's host mapping is separate anonymous memory: a receive into the file
        // must leave it untouched (proving the file path ran, not a receive into a mapping).
        let host = Mem::new(2 * MIB as usize);
        let region = GuestRegion::new(0, host.ptr(), 2 * MIB).with_file(file.fd.as_raw_fd(), MIB);
        // SAFETY: `host` and `file` live until the end of the test, after the registration.
        let dst =
            unsafe { MemoryRegistration::new(&[region], RegistrationConfig { slice_size: MIB }) }?;
        let src = Guest::new(&[2 * MIB], MIB, Some(7), None);
        let (mut tx, mut rx) = pair(Backend::Socket, Net::Tcp, &src.reg, &dst)?;
        let r = GpaRange::new(4096, MIB);
        tx.send_frame(&[], &[r])?;
        rx.recv_into(&[r], Target::File)?;
        let want = &src.mems[0].bytes()[4096..4096 + MIB as usize];
        let at = (MIB + 4096) as usize;
        ensure!(
            &file.bytes()[at..at + MIB as usize] == want,
            "bytes not at the file offset"
        );
        ensure!(
            file.bytes()[..MIB as usize].iter().all(|&b| b == 0),
            "wrote below the region"
        );
        ensure!(
            host.bytes().iter().all(|&b| b == 0),
            "wrote into the host mapping"
        );
        Ok(())
    }

    #[test]
    fn region_without_file_is_refused_before_any_byte() -> Result<()> {
        for (backend, net) in backends() {
            let src = Guest::new(&[MIB, MIB], MIB, Some(3), None);
            let mems = [FileMem::new(MIB as usize), FileMem::new(MIB as usize)];
            let dst = register(&mems, &[true, false]);
            let (mut tx, mut rx) = pair(backend, net, &src.reg, &dst)?;
            let good = GpaRange::new(0, 8192);
            let bad = GpaRange::new(1 << 30, 4096);
            tx.send_frame(&[], &[good])?;
            tx.flush()?;
            let err = rx.recv_into(&[good, bad], Target::File).unwrap_err();
            ensure!(
                matches!(
                    err,
                    StreamError::Range {
                        source: RangeError::NoFile { gpa, len: 4096 },
                        ..
                    } if gpa == 1 << 30
                ),
                "{backend} {net:?}: {err}"
            );
            // Nothing was consumed: the good range still arrives whole.
            rx.recv_into(&[good], Target::File)?;
            ensure!(mems[0].bytes()[..8192] == src.mems[0].bytes()[..8192]);
            // A host address for the file target is refused too.
            ensure!(matches!(
                dst.segments(good, Target::File),
                Err(RangeError::NotMapped { .. })
            ));
        }
        Ok(())
    }

    #[test]
    fn peer_closing_mid_range_is_reported_with_counts() -> Result<()> {
        for (backend, net) in backends() {
            let src = Guest::new(&[2 * MIB], MIB, Some(5), None);
            let mems = [FileMem::new(2 * MIB as usize)];
            let dst = register(&mems, &[true]);
            let (mut tx, mut rx) = pair(backend, net, &src.reg, &dst)?;
            tx.send_frame(&[], &[GpaRange::new(0, 3 * 4096)])?;
            tx.flush()?;
            drop(tx);
            let want = GpaRange::new(0, MIB);
            let err = rx.recv_into(&[want], Target::File).unwrap_err();
            ensure!(
                matches!(
                    err,
                    StreamError::PeerClosed {
                        received: 12288,
                        expected,
                        at: At::Range(r),
                        ..
                    } if expected == MIB && r == want
                ),
                "{backend} {net:?}: {err}"
            );
            ensure!(mems[0].bytes()[..12288] == src.mems[0].bytes()[..12288]);
            // The stream lost its byte position: it refuses further use.
            let again = rx.recv_exact(&mut [0u8; 1]).unwrap_err();
            ensure!(
                matches!(again, StreamError::Closed { .. }),
                "{backend} {net:?}: after a failed file receive: {again}"
            );
        }
        Ok(())
    }
}
