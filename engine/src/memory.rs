// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Guest-like RAM owned by ferry: for tests, benchmarks and the destination side of a migration
//! when no VMM provides the memory.
//!
//! [`MemRegion`] owns one mapping: private anonymous memory, or a shared mapping of a memfd
//! (`memfd_create` + `ftruncate` + `mmap(MAP_SHARED)`), optionally with `MADV_HUGEPAGE` and
//! pre-populated with `MADV_POPULATE_WRITE`. A memfd region can hand out an [`AliasMapping`]: a
//! second shared mapping of the same file, through which post-copy writes a page into the page
//! cache before `UFFDIO_CONTINUE` maps it into the guest mapping (no extra copy, no fault on the
//! guest side in between); [`AliasMapping::of_region`] does the same for any file-backed
//! [`GuestRegion`] a VMM provides (memfd or hugetlbfs, at its file offset). [`ProcessMemory`] is
//! a set of regions at guest-physical addresses and implements [`crate::vm::GuestMemory`].
//!
//! Not here: hugetlbfs backing (`Backing::Hugetlbfs` regions come from a VMM), dirty tracking
//! (see [`crate::procmem`]), userfaultfd registration (see [`crate::uffd`]).
//!
//! Concurrent access: the byte accessors copy with plain `memcpy` semantics while other threads
//! (or the kernel) may be writing the same pages. That is guest-memory semantics, the same as in
//! every VMM: a page read while it is written may be torn, which is why migration re-sends pages
//! whose dirty bit was set after they were read. The 8-byte accessors are atomic.

use std::io;
use std::os::fd::OwnedFd;
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{FallocateFlags, MemfdFlags};
use rustix::mm::{Advice, MapFlags, ProtFlags};

use crate::vm::{Backing, GuestMemory, GuestRegion};

/// Page granularity of regions made here (transparent huge pages still split to 4 KiB for
/// userfaultfd and dirty tracking).
pub const PAGE_SIZE: u64 = 4096;

/// How a [`MemRegion`] is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemBacking {
    /// `MAP_PRIVATE | MAP_ANONYMOUS`: post-copy places pages with `UFFDIO_COPY`.
    Anonymous,
    /// A memfd mapped `MAP_SHARED`: post-copy can write through an alias mapping and map the
    /// page with `UFFDIO_CONTINUE`.
    Memfd,
}

/// Allocation options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemOptions {
    /// Ask for transparent huge pages (`MADV_HUGEPAGE`).
    pub hugepage: bool,
    /// Fault every page in now (`MADV_POPULATE_WRITE`); leave false for a post-copy
    /// destination, whose pages must stay missing.
    pub populate: bool,
}

/// A memory operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// The length is zero or not a multiple of the page size.
    #[error("Length {len:#x} is not a non-zero multiple of the page size")]
    BadLength {
        /// The length asked for.
        len: u64,
    },
    /// `memfd_create` or `ftruncate` failed.
    #[error("Creating a {len:#x}-byte memfd failed")]
    Memfd {
        /// The size asked for.
        len: u64,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// `mmap` failed.
    #[error("Mapping {len:#x} bytes failed")]
    Map {
        /// The length asked for.
        len: u64,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// `madvise` or `fallocate` failed.
    #[error("{what} of {addr:#x}+{len:#x} failed")]
    Advise {
        /// Which advice or operation.
        what: &'static str,
        /// Start address.
        addr: u64,
        /// Length.
        len: u64,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// An access outside the region.
    #[error("Range {offset:#x}+{len:#x} outside a region of {region_len:#x} bytes")]
    OutOfRange {
        /// Offset in the region.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Length of the region.
        region_len: u64,
    },
    /// The file is smaller than the region it should back.
    #[error("File of {size:#x} bytes cannot back {offset:#x}+{len:#x}")]
    FileTooSmall {
        /// The file's size.
        size: u64,
        /// Offset of the region in the file.
        offset: u64,
        /// Length of the region.
        len: u64,
    },
    /// An alias mapping was asked of anonymous memory.
    #[error("Anonymous memory at {addr:#x} has no file to alias")]
    NotShared {
        /// The region's address.
        addr: u64,
    },
}

/// An owned mapping: address and length, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a `Mapping` is an address range owned by this process until drop; nothing in it is
// tied to the creating thread, and all accesses go through raw pointers with guest-memory
// semantics (see the module docs).
unsafe impl Send for Mapping {}
// SAFETY: as above; shared references only hand out raw addresses and atomic or
// copy-based accessors.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes: anonymous private, or `MAP_SHARED` of `fd` from `offset`.
    fn new(len: u64, file: Option<(&OwnedFd, u64)>) -> Result<Self, MemError> {
        let ulen = usize::try_from(len).map_err(|_| MemError::BadLength { len })?;
        let prot = ProtFlags::READ | ProtFlags::WRITE;
        let res = match file {
            // SAFETY: a fresh mapping at an address the kernel chooses; it overlaps nothing
            // that Rust code references.
            None => unsafe {
                rustix::mm::mmap_anonymous(
                    ptr::null_mut(),
                    ulen,
                    prot,
                    MapFlags::PRIVATE | MapFlags::NORESERVE,
                )
            },
            // SAFETY: as above, a fresh shared mapping at an address the kernel chooses; the
            // callers checked that the file covers `offset..offset + len`.
            Some((fd, offset)) => unsafe {
                rustix::mm::mmap(ptr::null_mut(), ulen, prot, MapFlags::SHARED, fd, offset)
            },
        };
        let addr = res.map_err(|e| MemError::Map {
            len,
            source: e.into(),
        })?;
        let ptr = NonNull::new(addr.cast::<u8>()).ok_or(MemError::Map {
            len,
            source: io::Error::from(io::ErrorKind::AddrNotAvailable),
        })?;
        Ok(Self { ptr, len: ulen })
    }

    fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    fn len(&self) -> u64 {
        self.len as u64
    }

    fn advise(
        &self,
        what: &'static str,
        offset: u64,
        len: u64,
        advice: Advice,
    ) -> Result<(), MemError> {
        let (off, ulen) = self.check(offset, len)?;
        // SAFETY: the range lies inside this mapping (checked); the advice values used here
        // (huge page, populate, dontneed) do not unmap anything, and DONTNEED is only issued
        // through `discard`, whose contract makes the zeroing expected.
        unsafe { rustix::mm::madvise(self.ptr.as_ptr().wrapping_add(off).cast(), ulen, advice) }
            .map_err(|e| MemError::Advise {
                what,
                addr: self.addr() + offset,
                len,
                source: e.into(),
            })
    }

    /// Validates `offset..offset+len` and returns it as `usize`s.
    fn check(&self, offset: u64, len: u64) -> Result<(usize, usize), MemError> {
        let err = || MemError::OutOfRange {
            offset,
            len,
            region_len: self.len(),
        };
        let end = offset.checked_add(len).ok_or_else(err)?;
        if end > self.len() {
            return Err(err());
        }
        Ok((
            usize::try_from(offset).map_err(|_| err())?,
            usize::try_from(len).map_err(|_| err())?,
        ))
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let (off, len) = self.check(offset, buf.len() as u64)?;
        // SAFETY: the source range lies inside this live mapping (checked) and `buf` is a
        // distinct Rust buffer of `len` bytes; concurrent writers make the copy racy in the
        // guest-memory sense documented at the top of the module, never out of bounds.
        unsafe {
            ptr::copy_nonoverlapping(self.ptr.as_ptr().wrapping_add(off), buf.as_mut_ptr(), len)
        };
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), MemError> {
        let (off, len) = self.check(offset, data.len() as u64)?;
        // SAFETY: the destination range lies inside this live mapping (checked), which no Rust
        // reference covers; `data` is a distinct buffer.
        unsafe {
            ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().wrapping_add(off), len)
        };
        Ok(())
    }

    fn atomic_u64(&self, offset: u64) -> Result<&AtomicU64, MemError> {
        let (off, _) = self.check(offset, 8)?;
        if !offset.is_multiple_of(8) {
            return Err(MemError::OutOfRange {
                offset,
                len: 8,
                region_len: self.len(),
            });
        }
        // SAFETY: the 8 bytes are inside the live mapping (checked), 8-byte aligned (the
        // mapping is page-aligned and `offset` is a multiple of 8), and only ever accessed as
        // raw guest memory, so viewing them as an `AtomicU64` for the borrow of `self` is
        // sound.
        Ok(unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().wrapping_add(off).cast::<u64>()) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: this object created the mapping and is its only owner; after drop nothing
        // refers to it.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// One mapping of guest-like RAM, unmapped on drop.
#[derive(Debug)]
pub struct MemRegion {
    map: Mapping,
    fd: Option<Arc<OwnedFd>>,
}

impl MemRegion {
    /// Maps `len` bytes (a multiple of [`PAGE_SIZE`]) with `backing`; `name` names the memfd
    /// (shows in `/proc/<pid>/maps`).
    pub fn new(
        backing: MemBacking,
        name: &str,
        len: u64,
        opts: MemOptions,
    ) -> Result<Self, MemError> {
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
            return Err(MemError::BadLength { len });
        }
        let fd = match backing {
            MemBacking::Anonymous => None,
            MemBacking::Memfd => {
                let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC).map_err(|e| {
                    MemError::Memfd {
                        len,
                        source: e.into(),
                    }
                })?;
                rustix::fs::ftruncate(&fd, len).map_err(|e| MemError::Memfd {
                    len,
                    source: e.into(),
                })?;
                Some(Arc::new(fd))
            }
        };
        let map = Mapping::new(len, fd.as_deref().map(|fd| (fd, 0)))?;
        let region = Self { map, fd };
        if opts.hugepage {
            region
                .map
                .advise("MADV_HUGEPAGE", 0, len, Advice::LinuxHugepage)?;
        }
        if opts.populate {
            region.populate()?;
        }
        Ok(region)
    }

    /// Private anonymous memory.
    pub fn anonymous(len: u64, opts: MemOptions) -> Result<Self, MemError> {
        Self::new(MemBacking::Anonymous, "", len, opts)
    }

    /// A shared mapping of a new memfd named `name`.
    pub fn memfd(name: &str, len: u64, opts: MemOptions) -> Result<Self, MemError> {
        Self::new(MemBacking::Memfd, name, len, opts)
    }

    /// Host address of the first byte.
    pub fn addr(&self) -> u64 {
        self.map.addr()
    }

    /// Pointer to the first byte (for placement and transports; see the module docs on
    /// concurrent access).
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.map.len()
    }

    /// Whether the region is empty (never: regions have at least one page).
    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    /// The memfd, if memfd-backed.
    pub fn fd(&self) -> Option<&Arc<OwnedFd>> {
        self.fd.as_ref()
    }

    /// How the region is backed.
    pub fn kind(&self) -> MemBacking {
        if self.fd.is_some() {
            MemBacking::Memfd
        } else {
            MemBacking::Anonymous
        }
    }

    /// The backing in the engine's terms.
    pub fn backing(&self) -> Backing {
        match &self.fd {
            None => Backing::Anonymous,
            Some(fd) => Backing::Memfd {
                fd: Arc::clone(fd),
                offset: 0,
            },
        }
    }

    /// Faults in every page for writing (`MADV_POPULATE_WRITE`).
    pub fn populate(&self) -> Result<(), MemError> {
        self.map.advise(
            "MADV_POPULATE_WRITE",
            0,
            self.len(),
            Advice::LinuxPopulateWrite,
        )
    }

    /// Drops the pages of `offset..offset+len` so they read as zero and are *missing* again:
    /// `MADV_DONTNEED` on anonymous memory; on a memfd, `fallocate(PUNCH_HOLE)` (removes them
    /// from the page cache, so every mapping sees them missing) followed by `MADV_DONTNEED`.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), MemError> {
        self.map.check(offset, len)?;
        if let Some(fd) = &self.fd {
            rustix::fs::fallocate(
                &**fd,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                offset,
                len,
            )
            .map_err(|e| MemError::Advise {
                what: "fallocate(PUNCH_HOLE)",
                addr: self.addr() + offset,
                len,
                source: e.into(),
            })?;
        }
        self.map
            .advise("MADV_DONTNEED", offset, len, Advice::LinuxDontNeed)
    }

    /// A second shared mapping of the same memfd: what is written through it lands in the page
    /// cache the region maps, without faulting the region's own mapping.
    pub fn alias(&self) -> Result<AliasMapping, MemError> {
        let fd = self
            .fd
            .as_ref()
            .ok_or(MemError::NotShared { addr: self.addr() })?;
        Ok(AliasMapping {
            map: Mapping::new(self.len(), Some((fd, 0)))?,
            _fd: Arc::clone(fd),
        })
    }

    /// Copies `buf.len()` bytes at `offset` out of the region.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.map.read(offset, buf)
    }

    /// Copies `data` into the region at `offset` (touching missing pages faults them in).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), MemError> {
        self.map.write(offset, data)
    }

    /// Atomically loads the 8-byte word at `offset` (a multiple of 8).
    pub fn load_u64(&self, offset: u64) -> Result<u64, MemError> {
        Ok(self.map.atomic_u64(offset)?.load(Ordering::Relaxed))
    }

    /// Atomically stores the 8-byte word at `offset` (a multiple of 8).
    pub fn store_u64(&self, offset: u64, value: u64) -> Result<(), MemError> {
        self.map.atomic_u64(offset)?.store(value, Ordering::Relaxed);
        Ok(())
    }

    /// The 8-byte word at `offset` as an atomic, for hot loops that store many times.
    pub fn atomic_u64(&self, offset: u64) -> Result<&AtomicU64, MemError> {
        self.map.atomic_u64(offset)
    }
}

/// A second `MAP_SHARED` mapping of a memfd region (see [`MemRegion::alias`]); unmapped on
/// drop. Offsets are the same as in the region.
#[derive(Debug)]
pub struct AliasMapping {
    map: Mapping,
    _fd: Arc<OwnedFd>,
}

impl AliasMapping {
    /// An alias of any file-backed guest region (memfd or hugetlbfs, e.g. one a VMM
    /// provided): a second `MAP_SHARED` mapping of its file at its offset, same length.
    pub fn of_region(region: &GuestRegion) -> Result<Self, MemError> {
        let (fd, offset) = match &region.backing {
            Backing::Anonymous => {
                return Err(MemError::NotShared {
                    addr: region.host_addr as u64,
                });
            }
            Backing::Memfd { fd, offset } | Backing::Hugetlbfs { fd, offset } => (fd, *offset),
        };
        let size = rustix::fs::fstat(&**fd)
            .map_err(|e| MemError::Map {
                len: region.len,
                source: e.into(),
            })?
            .st_size;
        let size = u64::try_from(size).unwrap_or(0);
        if offset.checked_add(region.len).is_none_or(|end| end > size) {
            return Err(MemError::FileTooSmall {
                size,
                offset,
                len: region.len,
            });
        }
        Ok(Self {
            map: Mapping::new(region.len, Some((fd, offset)))?,
            _fd: Arc::clone(fd),
        })
    }

    /// Host address of the first byte.
    pub fn addr(&self) -> u64 {
        self.map.addr()
    }

    /// Pointer to the first byte (a receive target for transports).
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.map.len()
    }

    /// Whether the mapping is empty (never).
    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    /// Writes `data` at `offset` into the page cache.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), MemError> {
        self.map.write(offset, data)
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.map.read(offset, buf)
    }
}

/// Building a [`ProcessMemory`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// No regions.
    #[error("Empty memory layout")]
    Empty,
    /// A region's address or length is not page-aligned, or it is empty.
    #[error("Region {gpa:#x}+{len:#x} is empty or not page-aligned")]
    Unaligned {
        /// Guest-physical address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// Two regions overlap.
    #[error("Region {gpa:#x}+{len:#x} overlaps the previous one")]
    Overlap {
        /// Guest-physical address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// Allocating a region failed.
    #[error("Allocating region {gpa:#x}+{len:#x} failed")]
    Alloc {
        /// Guest-physical address.
        gpa: u64,
        /// Length.
        len: u64,
        /// What failed.
        #[source]
        source: MemError,
    },
}

/// Guest RAM made of [`MemRegion`]s at guest-physical addresses.
#[derive(Debug)]
pub struct ProcessMemory {
    regions: Vec<MemRegion>,
    guest: Vec<GuestRegion>,
}

impl ProcessMemory {
    /// Allocates one region per `(gpa, len)` of `layout` (sorted here; must not overlap),
    /// each backed by `backing` (one memfd per region).
    pub fn new(
        layout: &[(u64, u64)],
        backing: MemBacking,
        opts: MemOptions,
    ) -> Result<Self, LayoutError> {
        if layout.is_empty() {
            return Err(LayoutError::Empty);
        }
        let mut sorted = layout.to_vec();
        sorted.sort_unstable();
        let mut end = 0u64;
        for (i, &(gpa, len)) in sorted.iter().enumerate() {
            if len == 0 || !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
                return Err(LayoutError::Unaligned { gpa, len });
            }
            if i > 0 && gpa < end {
                return Err(LayoutError::Overlap { gpa, len });
            }
            end = gpa
                .checked_add(len)
                .ok_or(LayoutError::Unaligned { gpa, len })?;
        }
        let mut regions = Vec::with_capacity(sorted.len());
        let mut guest = Vec::with_capacity(sorted.len());
        for &(gpa, len) in &sorted {
            let name = format!("ferry-ram-{gpa:#x}");
            let region = MemRegion::new(backing, &name, len, opts)
                .map_err(|source| LayoutError::Alloc { gpa, len, source })?;
            let host_addr = usize::try_from(region.addr()).unwrap_or(0);
            guest.push(GuestRegion {
                gpa,
                len,
                host_addr,
                backing: region.backing(),
                page_size: PAGE_SIZE,
            });
            regions.push(region);
        }
        Ok(Self { regions, guest })
    }

    /// The regions, in guest-physical order (same order as [`GuestMemory::regions`]).
    pub fn mem_regions(&self) -> &[MemRegion] {
        &self.regions
    }

    /// Total bytes of guest RAM.
    pub fn total_bytes(&self) -> u64 {
        self.guest.iter().map(|r| r.len).sum()
    }

    /// The region index and offset holding guest-physical address `gpa`.
    pub fn locate(&self, gpa: u64) -> Option<(usize, u64)> {
        let idx = self.guest.partition_point(|r| r.gpa + r.len <= gpa);
        let r = self.guest.get(idx)?;
        (gpa >= r.gpa).then(|| (idx, gpa - r.gpa))
    }

    /// Reads guest memory at `gpa` (within one region).
    pub fn read_gpa(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let (idx, off) = self.locate(gpa).ok_or(MemError::OutOfRange {
            offset: gpa,
            len: buf.len() as u64,
            region_len: 0,
        })?;
        self.regions[idx].read(off, buf)
    }

    /// Writes guest memory at `gpa` (within one region).
    pub fn write_gpa(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        let (idx, off) = self.locate(gpa).ok_or(MemError::OutOfRange {
            offset: gpa,
            len: data.len() as u64,
            region_len: 0,
        })?;
        self.regions[idx].write(off, data)
    }
}

// SAFETY: every `GuestRegion` describes a `MemRegion` mapping owned by `self`, readable and
// writable, unmapped only when `self` is dropped; the list never changes after construction.
unsafe impl GuestMemory for ProcessMemory {
    fn regions(&self) -> &[GuestRegion] {
        &self.guest
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_read_write_and_discard() {
        let r = MemRegion::anonymous(4 * PAGE_SIZE, MemOptions::default()).unwrap();
        r.write(PAGE_SIZE + 8, b"hello").unwrap();
        let mut buf = [0u8; 5];
        r.read(PAGE_SIZE + 8, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        r.discard(PAGE_SIZE, PAGE_SIZE).unwrap();
        r.read(PAGE_SIZE + 8, &mut buf).unwrap();
        assert_eq!(buf, [0; 5]);
        assert!(matches!(
            r.read(4 * PAGE_SIZE - 2, &mut buf),
            Err(MemError::OutOfRange { .. })
        ));
        assert!(matches!(r.alias(), Err(MemError::NotShared { .. })));
    }

    #[test]
    fn memfd_alias_shares_pages() {
        let opts = MemOptions {
            hugepage: false,
            populate: true,
        };
        let r = MemRegion::memfd("test", 2 * PAGE_SIZE, opts).unwrap();
        let alias = r.alias().unwrap();
        assert_ne!(alias.addr(), r.addr());
        alias.write(PAGE_SIZE, &7u64.to_ne_bytes()).unwrap();
        assert_eq!(r.load_u64(PAGE_SIZE).unwrap(), 7);
        r.store_u64(16, 99).unwrap();
        let mut b = [0u8; 8];
        alias.read(16, &mut b).unwrap();
        assert_eq!(u64::from_ne_bytes(b), 99);
        // Punching a hole drops the page from both mappings.
        r.discard(PAGE_SIZE, PAGE_SIZE).unwrap();
        alias.read(PAGE_SIZE, &mut b).unwrap();
        assert_eq!(u64::from_ne_bytes(b), 0);
        assert!(matches!(r.backing(), Backing::Memfd { offset: 0, .. }));
    }

    #[test]
    fn alias_of_guest_region_at_offset() {
        let r = MemRegion::memfd("off", 4 * PAGE_SIZE, MemOptions::default()).unwrap();
        let Backing::Memfd { fd, .. } = r.backing() else {
            panic!("memfd expected");
        };
        // A "VMM" region covering pages 2..4 of the file.
        let g = GuestRegion {
            gpa: 0x1000_0000,
            len: 2 * PAGE_SIZE,
            host_addr: usize::try_from(r.addr() + 2 * PAGE_SIZE).unwrap(),
            backing: Backing::Memfd {
                fd: Arc::clone(&fd),
                offset: 2 * PAGE_SIZE,
            },
            page_size: PAGE_SIZE,
        };
        let alias = AliasMapping::of_region(&g).unwrap();
        assert_eq!(alias.len(), 2 * PAGE_SIZE);
        alias.write(PAGE_SIZE, &5u64.to_ne_bytes()).unwrap();
        assert_eq!(r.load_u64(3 * PAGE_SIZE).unwrap(), 5);
        let too_far = GuestRegion {
            backing: Backing::Memfd {
                fd,
                offset: 3 * PAGE_SIZE,
            },
            ..g.clone()
        };
        assert!(matches!(
            AliasMapping::of_region(&too_far),
            Err(MemError::FileTooSmall { .. })
        ));
        let anon = GuestRegion {
            backing: Backing::Anonymous,
            ..g
        };
        assert!(matches!(
            AliasMapping::of_region(&anon),
            Err(MemError::NotShared { .. })
        ));
    }

    #[test]
    fn layout_sorted_and_checked() {
        let m = ProcessMemory::new(
            &[(0x10_0000, 2 * PAGE_SIZE), (0, PAGE_SIZE)],
            MemBacking::Anonymous,
            MemOptions::default(),
        )
        .unwrap();
        let gpas: Vec<u64> = m.regions().iter().map(|r| r.gpa).collect();
        assert_eq!(gpas, vec![0, 0x10_0000]);
        assert_eq!(m.total_bytes(), 3 * PAGE_SIZE);
        assert_eq!(m.locate(0x10_1008), Some((1, 0x1008)));
        assert_eq!(m.locate(0x2000), None);
        m.write_gpa(0x10_1000, b"x").unwrap();
        let mut b = [0u8; 1];
        m.read_gpa(0x10_1000, &mut b).unwrap();
        assert_eq!(&b, b"x");
        assert!(matches!(
            ProcessMemory::new(
                &[(0, 2 * PAGE_SIZE), (PAGE_SIZE, PAGE_SIZE)],
                MemBacking::Anonymous,
                MemOptions::default()
            ),
            Err(LayoutError::Overlap { .. })
        ));
        assert!(matches!(
            ProcessMemory::new(&[(1, PAGE_SIZE)], MemBacking::Memfd, MemOptions::default()),
            Err(LayoutError::Unaligned { .. })
        ));
    }
}
