// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Registered guest memory: the regions the engine hands to the transport once, their split into
//! io_uring fixed-buffer slices, and the translation of guest-physical ranges to host pointers.
//!
//! This module owns the *bookkeeping* of registered memory and the lifetime rules that keep the
//! kernel from reading or writing memory that has gone away. It does not map, allocate or free
//! guest memory (the VMM owns it) and it does not talk to the kernel: the io_uring backend
//! registers [`MemoryRegistration::slices`] with its own ring.
//!
//! # Lifetime model
//!
//! A [`MemoryRegistration`] is created once (unsafely: the caller promises the memory stays mapped
//! for as long as the registration exists) and shared as an `Arc`. Every stream holds a clone, and
//! every operation the kernel may still be reading from (a `SEND_ZC` waiting for its notification)
//! holds an [`InflightGuard`], which is a further clone plus an in-flight count. The memory may be
//! unmapped only after [`MemoryRegistration::unregister`] succeeded, which it does only when no
//! stream and no guard holds the registration any more; otherwise it returns
//! [`UnregisterError::Busy`] with the registration handed back. Safe code therefore cannot free a
//! buffer the kernel still references.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::error::{RangeError, RegisterError, UnregisterError};

/// The largest fixed buffer the kernel accepts (1 GiB); the default slice size.
pub const MAX_SLICE_SIZE: u64 = 1 << 30;

/// The most fixed buffers one ring can hold (the kernel's table limit).
pub const MAX_SLICES: usize = 16 * 1024;

/// A guest-physical byte range: the protocol's type, so ranges pass between the engine, the
/// wire and the transport unchanged.
pub use ferry_protocol::GpaRange;

/// One guest-memory region as the VMM mapped it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRegion {
    /// Guest-physical base address.
    pub gpa: u64,
    /// Host virtual address of the region's first byte.
    pub host_addr: usize,
    /// Length in bytes.
    pub len: u64,
    /// Optional second host mapping of the same region (post-copy placement: the destination
    /// receives into an alias mapping that is not registered with userfaultfd, then installs the
    /// pages with `UFFDIO_CONTINUE`). Not registered as fixed buffers.
    pub alias_addr: Option<usize>,
    /// Optional backing file (a memfd or other shmem file) and the offset of the region's first
    /// byte in it, for receives through the page cache ([`Target::File`]). Borrowed only while
    /// [`MemoryRegistration::new`] runs: the registration keeps a duplicate of its own.
    pub file: Option<FileRef>,
}

/// A region's backing file: see [`GuestRegion::file`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileRef {
    /// The open file (only borrowed; see [`GuestRegion::file`]).
    pub fd: RawFd,
    /// Offset in the file of the region's first byte.
    pub offset: u64,
}

impl GuestRegion {
    /// A region of `len` bytes at guest-physical `gpa`, mapped at `host_addr`.
    pub fn new(gpa: u64, host_addr: *mut u8, len: u64) -> Self {
        Self {
            gpa,
            host_addr: host_addr as usize,
            len,
            alias_addr: None,
            file: None,
        }
    }

    /// The same region with an alias mapping at `alias_addr` (see [`GuestRegion::alias_addr`]).
    pub fn with_alias(mut self, alias_addr: *mut u8) -> Self {
        self.alias_addr = Some(alias_addr as usize);
        self
    }

    /// The same region with its backing file (see [`GuestRegion::file`]).
    pub fn with_file(mut self, fd: RawFd, offset: u64) -> Self {
        self.file = Some(FileRef { fd, offset });
        self
    }
}

/// Options for [`MemoryRegistration::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistrationConfig {
    /// Size of one fixed-buffer slice, at most [`MAX_SLICE_SIZE`] and a multiple of 4 KiB.
    /// Tests use small slices (e.g. 1 MiB) to exercise ranges that straddle a slice boundary.
    pub slice_size: u64,
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        Self {
            slice_size: MAX_SLICE_SIZE,
        }
    }
}

/// One fixed-buffer slice: a piece of a region of at most `slice_size` bytes. Its position in
/// [`MemoryRegistration::slices`] is its fixed-buffer index in every ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    /// Guest-physical start.
    pub gpa: u64,
    /// Host virtual address of the first byte.
    pub host_addr: usize,
    /// Length in bytes.
    pub len: u64,
}

/// Which host mapping a receive writes into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Target {
    /// The region's primary mapping (`host_addr`).
    #[default]
    Guest,
    /// The region's alias mapping (`alias_addr`); the range must lie in a region that has one.
    Alias,
    /// The region's backing file ([`GuestRegion::file`]), written through the page cache with
    /// `splice` (socket → pipe → file): no host mapping is touched, so receiving into fresh
    /// memory allocates page-cache pages without a page fault and a page-table update per 4 KiB
    /// page. Receive only; the range must lie in a region that has a file. Measured on the
    /// development machine (nested VM, loopback, 1 GiB memfd): half the receiving CPU of a
    /// receive through a fresh mapping.
    File,
}

/// A piece of a [`GpaRange`] that lies within one fixed-buffer slice: what one SQE or one iovec
/// covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Host address of the first byte (in the mapping chosen by [`Target`]).
    pub host_addr: usize,
    /// Length in bytes (at most the slice size, so it fits a `u32`).
    pub len: u32,
    /// Fixed-buffer index of the slice, or `None` for the alias mapping (not registered).
    pub buf_index: Option<u16>,
}

#[derive(Debug)]
struct RegionEntry {
    region: GuestRegion,
    /// The registration's own duplicate of `region.file` (its `fd` is not used after `new`).
    file: Option<(OwnedFd, u64)>,
    /// Index of the region's first slice in `slices`.
    first_slice: usize,
}

/// Guest memory registered with the transport: the regions, their fixed-buffer slices and the
/// count of operations the kernel may still be using. See the module docs for the lifetime
/// model.
#[derive(Debug)]
pub struct MemoryRegistration {
    regions: Vec<RegionEntry>,
    slices: Vec<Slice>,
    slice_size: u64,
    inflight: AtomicUsize,
}

impl MemoryRegistration {
    /// Registers `regions` (any order; they must not overlap in guest-physical space).
    ///
    /// # Safety
    ///
    /// Every region's `host_addr..host_addr+len` (and `alias_addr..alias_addr+len` when set)
    /// must be a valid, readable and writable mapping that stays mapped until this registration
    /// is dropped, i.e. until [`MemoryRegistration::unregister`] returned `Ok` (or the last
    /// `Arc` went away). A region's `file`, when set, must be an open descriptor of the file
    /// those mappings map, at that offset, for the duration of this call (the registration
    /// keeps a duplicate, and writes into the file the bytes of received ranges). The
    /// transport reads the memory (sends) and writes it (receives) concurrently with whatever
    /// else the VMM does with guest memory; the VMM accepts torn contents of pages it modifies
    /// meanwhile (that is what dirty tracking is for).
    pub unsafe fn new(
        regions: &[GuestRegion],
        config: RegistrationConfig,
    ) -> Result<Arc<Self>, RegisterError> {
        let slice_size = config.slice_size;
        if slice_size == 0 || slice_size > MAX_SLICE_SIZE || !slice_size.is_multiple_of(4096) {
            return Err(RegisterError::SliceSize { slice_size });
        }
        if regions.is_empty() {
            return Err(RegisterError::NoRegions);
        }
        let mut sorted: Vec<GuestRegion> = regions.to_vec();
        sorted.sort_by_key(|r| r.gpa);
        let mut entries = Vec::with_capacity(sorted.len());
        let mut slices = Vec::new();
        let mut prev_end: Option<u64> = None;
        for region in sorted {
            let range = GpaRange::new(region.gpa, region.len);
            let end = range.end().ok_or(RegisterError::Wraps {
                gpa: region.gpa,
                len: region.len,
            })?;
            if region.len == 0 || region.host_addr == 0 {
                return Err(RegisterError::Empty {
                    gpa: region.gpa,
                    len: region.len,
                });
            }
            let host_fits = usize::try_from(region.len)
                .ok()
                .and_then(|len| region.host_addr.checked_add(len))
                .is_some();
            if !host_fits {
                return Err(RegisterError::Wraps {
                    gpa: region.gpa,
                    len: region.len,
                });
            }
            if let Some(prev_end) = prev_end
                && region.gpa < prev_end
            {
                return Err(RegisterError::Overlap {
                    gpa: region.gpa,
                    len: region.len,
                });
            }
            prev_end = Some(end);
            let file = match region.file {
                None => None,
                Some(f) => {
                    // SAFETY: the caller promises `f.fd` is open for the duration of this call;
                    // it is only duplicated here.
                    let fd = unsafe { BorrowedFd::borrow_raw(f.fd) };
                    let own = fd.try_clone_to_owned().map_err(|e| RegisterError::File {
                        gpa: region.gpa,
                        errno: e.raw_os_error().unwrap_or(0),
                    })?;
                    Some((own, f.offset))
                }
            };
            entries.push(RegionEntry {
                file,
                region,
                first_slice: slices.len(),
            });
            let mut off = 0u64;
            while off < region.len {
                let len = slice_size.min(region.len - off);
                let host_off = usize::try_from(off).map_err(|_| RegisterError::Wraps {
                    gpa: region.gpa,
                    len: region.len,
                })?;
                slices.push(Slice {
                    gpa: region.gpa + off,
                    host_addr: region.host_addr + host_off,
                    len,
                });
                off += len;
            }
        }
        if slices.len() > MAX_SLICES {
            return Err(RegisterError::TooManySlices {
                slices: slices.len(),
                max: MAX_SLICES,
            });
        }
        Ok(Arc::new(Self {
            regions: entries,
            slices,
            slice_size,
            inflight: AtomicUsize::new(0),
        }))
    }

    /// The fixed-buffer slices, in fixed-buffer index order.
    pub fn slices(&self) -> &[Slice] {
        &self.slices
    }

    /// The slice size this registration was built with.
    pub fn slice_size(&self) -> u64 {
        self.slice_size
    }

    /// The registered regions, sorted by guest-physical address.
    pub fn regions(&self) -> impl Iterator<Item = &GuestRegion> {
        self.regions.iter().map(|e| &e.region)
    }

    /// Total registered bytes.
    pub fn total_len(&self) -> u64 {
        self.regions.iter().map(|e| e.region.len).sum()
    }

    /// Number of operations the kernel may still be using (outstanding [`InflightGuard`]s).
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// Checks that `range` lies inside one region (and, for [`Target::Alias`], that the region
    /// has an alias mapping), then calls `f` with each piece of it that lies in one slice, in
    /// address order. Empty ranges are rejected.
    pub fn for_each_segment<E>(
        &self,
        range: GpaRange,
        target: Target,
        mut f: impl FnMut(Segment) -> Result<(), E>,
    ) -> Result<(), SegmentError<E>> {
        let (entry, base) = self.locate(range, target).map_err(SegmentError::Range)?;
        let region = &entry.region;
        let mut off = range.gpa - region.gpa;
        let end = off + range.len;
        while off < end {
            let slice_no = off / self.slice_size;
            let slice_end = ((slice_no + 1) * self.slice_size).min(region.len);
            let len = (slice_end.min(end)) - off;
            let idx = entry
                .first_slice
                .saturating_add(usize::try_from(slice_no).unwrap_or(usize::MAX));
            // Checked at construction: the region fits the host address space and there are at
            // most MAX_SLICES (< u16::MAX) slices; a slice is at most 1 GiB.
            let host_off = usize::try_from(off).map_err(|_| {
                SegmentError::Range(RangeError::OutOfRange {
                    gpa: range.gpa,
                    len: range.len,
                })
            })?;
            let seg = Segment {
                host_addr: base + host_off,
                len: u32::try_from(len).unwrap_or(u32::MAX),
                buf_index: match target {
                    Target::Guest => u16::try_from(idx).ok(),
                    Target::Alias | Target::File => None,
                },
            };
            f(seg).map_err(SegmentError::Inner)?;
            off += len;
        }
        Ok(())
    }

    /// The segments of `range` as a vector (convenience for tests and tools; the data paths use
    /// [`MemoryRegistration::for_each_segment`], which does not allocate).
    pub fn segments(&self, range: GpaRange, target: Target) -> Result<Vec<Segment>, RangeError> {
        let mut out = Vec::new();
        self.for_each_segment(range, target, |s| {
            out.push(s);
            Ok::<(), std::convert::Infallible>(())
        })
        .map_err(|e| match e {
            SegmentError::Range(r) => r,
            SegmentError::Inner(never) => match never {},
        })?;
        Ok(out)
    }

    /// The backing file of the region holding `range` and the range's offset in it, for
    /// [`Target::File`] receives. Checks like [`MemoryRegistration::for_each_segment`].
    pub fn file_extent(&self, range: GpaRange) -> Result<(BorrowedFd<'_>, u64), RangeError> {
        let entry = self.entry(range)?;
        let (fd, base) = entry.file.as_ref().ok_or(RangeError::NoFile {
            gpa: range.gpa,
            len: range.len,
        })?;
        let off = base
            .checked_add(range.gpa - entry.region.gpa)
            .ok_or(RangeError::OutOfRange {
                gpa: range.gpa,
                len: range.len,
            })?;
        Ok((fd.as_fd(), off))
    }

    fn locate(&self, range: GpaRange, target: Target) -> Result<(&RegionEntry, usize), RangeError> {
        let entry = self.entry(range)?;
        let base = match target {
            Target::Guest => entry.region.host_addr,
            Target::Alias => entry.region.alias_addr.ok_or(RangeError::NoAlias {
                gpa: range.gpa,
                len: range.len,
            })?,
            Target::File => {
                return Err(RangeError::NotMapped {
                    gpa: range.gpa,
                    len: range.len,
                });
            }
        };
        Ok((entry, base))
    }

    fn entry(&self, range: GpaRange) -> Result<&RegionEntry, RangeError> {
        let out_of_range = RangeError::OutOfRange {
            gpa: range.gpa,
            len: range.len,
        };
        if range.len == 0 {
            return Err(RangeError::Empty { gpa: range.gpa });
        }
        let end = range.end().ok_or(out_of_range.clone())?;
        let pos = self.regions.partition_point(|e| e.region.gpa <= range.gpa);
        let entry = pos
            .checked_sub(1)
            .and_then(|i| self.regions.get(i))
            .ok_or(out_of_range.clone())?;
        let region_end = entry.region.gpa + entry.region.len;
        if end > region_end {
            return Err(out_of_range);
        }
        Ok(entry)
    }

    /// Drops the registration if nothing else holds it, waiting up to `timeout` for streams and
    /// in-flight operations to let go. After `Ok` the VMM may unmap the memory. On timeout the
    /// registration is handed back inside [`UnregisterError::Busy`].
    pub fn unregister(this: Arc<Self>, timeout: Duration) -> Result<(), UnregisterError> {
        let deadline = Instant::now() + timeout;
        let mut this = this;
        loop {
            match Arc::try_unwrap(this) {
                Ok(reg) => {
                    drop(reg);
                    return Ok(());
                }
                Err(back) => {
                    if Instant::now() >= deadline {
                        return Err(UnregisterError::Busy {
                            holders: Arc::strong_count(&back) - 1,
                            inflight: back.inflight(),
                            registration: back,
                        });
                    }
                    this = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
}

/// Error from [`MemoryRegistration::for_each_segment`]: either the range was bad or the callback
/// failed.
#[derive(Debug)]
pub enum SegmentError<E> {
    /// The range does not translate.
    Range(RangeError),
    /// The callback returned an error.
    Inner(E),
}

/// Keeps a [`MemoryRegistration`] alive (and counted as in flight) while the kernel may still
/// read or write memory it covers, e.g. from a `SEND_ZC` until its notification arrives.
#[derive(Debug)]
pub struct InflightGuard {
    reg: Arc<MemoryRegistration>,
}

impl InflightGuard {
    /// Marks one operation on `reg` as in flight until the guard is dropped.
    pub fn new(reg: &Arc<MemoryRegistration>) -> Self {
        reg.inflight.fetch_add(1, Ordering::AcqRel);
        Self {
            reg: Arc::clone(reg),
        }
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.reg.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
// Test constants are small (MiB), so the casts cannot truncate.
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn reg(slice: u64) -> Arc<MemoryRegistration> {
        // The host addresses are never dereferenced by these tests.
        let regions = [
            GuestRegion::new(0, 0x1000_0000 as *mut u8, 4 * MIB),
            GuestRegion::new(16 * MIB, 0x2000_0000 as *mut u8, 3 * MIB + 4096)
                .with_alias(0x3000_0000 as *mut u8),
        ];
        // SAFETY: the test only translates addresses; nothing dereferences them.
        unsafe { MemoryRegistration::new(&regions, RegistrationConfig { slice_size: slice }) }
            .unwrap()
    }

    #[test]
    fn slices_cover_regions() {
        let r = reg(MIB);
        assert_eq!(r.slices().len(), 4 + 4);
        assert_eq!(r.slices()[7].len, 4096);
        assert_eq!(r.slices()[4].gpa, 16 * MIB);
        assert_eq!(r.slices()[5].host_addr, 0x2000_0000 + MIB as usize);
        assert_eq!(r.total_len(), 7 * MIB + 4096);
    }

    #[test]
    fn range_straddling_slices_splits() {
        let r = reg(MIB);
        let segs = r
            .segments(GpaRange::new(MIB - 4096, MIB + 8192), Target::Guest)
            .unwrap();
        assert_eq!(segs.len(), 3);
        assert_eq!(
            segs[0],
            Segment {
                host_addr: 0x1000_0000 + MIB as usize - 4096,
                len: 4096,
                buf_index: Some(0)
            }
        );
        assert_eq!(segs[1].len, MIB as u32);
        assert_eq!(segs[1].buf_index, Some(1));
        assert_eq!(segs[2].len, 4096);
        assert_eq!(segs[2].buf_index, Some(2));
        let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
        assert_eq!(total, MIB + 8192);
    }

    #[test]
    fn second_region_indices_and_alias() {
        let r = reg(MIB);
        let segs = r
            .segments(GpaRange::new(16 * MIB + 3 * MIB, 4096), Target::Guest)
            .unwrap();
        assert_eq!(segs[0].buf_index, Some(7));
        let alias = r
            .segments(GpaRange::new(16 * MIB + 8192, 4096), Target::Alias)
            .unwrap();
        assert_eq!(alias[0].host_addr, 0x3000_0000 + 8192);
        assert_eq!(alias[0].buf_index, None);
        assert_eq!(
            r.segments(GpaRange::new(0, 4096), Target::Alias),
            Err(RangeError::NoAlias { gpa: 0, len: 4096 })
        );
    }

    #[test]
    fn out_of_range_is_rejected() {
        let r = reg(MIB);
        for (gpa, len) in [
            (4 * MIB - 4096, 8192),
            (5 * MIB, 4096),
            (19 * MIB + 4096, 1),
            (u64::MAX, 2),
        ] {
            assert_eq!(
                r.segments(GpaRange::new(gpa, len), Target::Guest),
                Err(RangeError::OutOfRange { gpa, len }),
                "{gpa:#x}+{len:#x}"
            );
        }
        assert_eq!(
            r.segments(GpaRange::new(0, 0), Target::Guest),
            Err(RangeError::Empty { gpa: 0 })
        );
        let msg = RangeError::OutOfRange {
            gpa: 0x5000,
            len: 0x1000,
        }
        .to_string();
        assert!(msg.contains("0x5000") && msg.contains("0x1000"), "{msg}");
    }

    #[test]
    fn bad_registrations() {
        let mk = |regions: &[GuestRegion], slice| {
            // SAFETY: never dereferenced.
            unsafe { MemoryRegistration::new(regions, RegistrationConfig { slice_size: slice }) }
        };
        let a = GuestRegion::new(0, 0x1000 as *mut u8, 2 * MIB);
        let b = GuestRegion::new(MIB, 0x9000_0000 as *mut u8, MIB);
        assert!(matches!(
            mk(&[a, b], MIB),
            Err(RegisterError::Overlap { .. })
        ));
        assert!(matches!(
            mk(&[a], 1000),
            Err(RegisterError::SliceSize { .. })
        ));
        assert!(matches!(
            mk(&[a], 2 << 30),
            Err(RegisterError::SliceSize { .. })
        ));
        assert!(matches!(mk(&[], MIB), Err(RegisterError::NoRegions)));
        let huge = GuestRegion::new(0, 0x1000 as *mut u8, 32 << 30);
        assert!(matches!(
            mk(&[huge], 1 << 20),
            Err(RegisterError::TooManySlices { .. })
        ));
    }

    #[test]
    fn unregister_waits_for_guards() {
        let r = reg(MIB);
        let guard = InflightGuard::new(&r);
        assert_eq!(r.inflight(), 1);
        let err = MemoryRegistration::unregister(r, Duration::from_millis(5)).unwrap_err();
        let UnregisterError::Busy {
            holders,
            inflight,
            registration,
        } = err;
        assert_eq!((holders, inflight), (1, 1));
        drop(guard);
        assert_eq!(registration.inflight(), 0);
        MemoryRegistration::unregister(registration, Duration::from_millis(5)).unwrap();
    }
}
