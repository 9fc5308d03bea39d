// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Guest RAM: host mappings (memfd `MAP_SHARED` or anonymous), the guest-physical layout and
//! [`KvmMemory`], the [`GuestMemory`] the engine reads and writes.
//!
//! Layout: RAM is split around the 32-bit MMIO hole. The first `min(mem, 3 GiB)` bytes are at
//! guest-physical 0, the rest at 4 GiB; one KVM memory slot per region (slot id = region index).
//! "RAM offset" is the position in the concatenation of the regions; the built-in guests map
//! guest-virtual address = RAM offset, so their data looks contiguous to them.
//!
//! This module does not register slots with KVM (that is [`crate::vm`]) and never touches the
//! contents of the memory it maps.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;

use ferry_engine::vm::{Backing, GuestMemory, GuestRegion};

use crate::sys::{self, Mapping, PAGE_SIZE};

/// Start of the 32-bit MMIO hole (LAPIC, IOAPIC live above it).
pub const LOW_RAM_END: u64 = 3 << 30;
/// Guest-physical start of RAM above the hole.
pub const HIGH_RAM_START: u64 = 4 << 30;

/// How guest RAM is backed on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemBacking {
    /// A memfd mapped `MAP_SHARED` (default; post-copy can use MINOR faults + `UFFDIO_CONTINUE`).
    #[default]
    Memfd,
    /// Private anonymous memory (post-copy uses MISSING faults + `UFFDIO_COPY`).
    Anonymous,
}

/// Errors creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is not a positive multiple of 2 MiB.
    #[error("Guest memory size {0:#x} is not a positive multiple of 2 MiB")]
    BadSize(u64),
    /// memfd_create/ftruncate failed.
    #[error("Cannot create a memfd of {len:#x} bytes")]
    Memfd {
        /// Requested size.
        len: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Preallocating memfd-backed RAM failed (short of memory, or a size limit).
    #[error("Cannot preallocate {len:#x} bytes of guest memory")]
    Prefault {
        /// Bytes asked for.
        len: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Preallocation asked for anonymous RAM.
    #[error(
        "Preallocating guest memory needs memfd backing (anonymous memory is emptied when a migration starts)"
    )]
    PrefaultAnonymous,
    /// mmap failed.
    #[error("Cannot map guest region {gpa:#x}+{len:#x}")]
    Map {
        /// Region start.
        gpa: u64,
        /// Region length.
        len: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Guest RAM of one VM: the regions and their host mappings.
#[derive(Debug)]
pub struct KvmMemory {
    regions: Vec<GuestRegion>,
    /// Same order as `regions`; keeps the mappings alive.
    maps: Vec<Mapping>,
    size: u64,
}

impl KvmMemory {
    /// Maps `size` bytes of guest RAM (never populating it).
    pub fn new(size: u64, backing: MemBacking, thp: bool) -> Result<Self, MemoryError> {
        if size == 0 || !size.is_multiple_of(2 << 20) {
            return Err(MemoryError::BadSize(size));
        }
        let low = size.min(LOW_RAM_END);
        let mut layout = vec![(0u64, low)];
        if size > low {
            layout.push((HIGH_RAM_START, size - low));
        }
        let fd = match backing {
            MemBacking::Memfd => Some(Arc::new(
                sys::memfd("ferry-guest-ram", size)
                    .map_err(|source| MemoryError::Memfd { len: size, source })?,
            )),
            MemBacking::Anonymous => None,
        };
        let mut regions = Vec::new();
        let mut maps = Vec::new();
        let mut file_off = 0u64;
        for (gpa, len) in layout {
            let map_err = |source| MemoryError::Map { gpa, len, source };
            let ulen = usize::try_from(len)
                .map_err(|_| map_err(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
            let map = Mapping::new(ulen, fd.as_ref().map(|f| f.as_raw_fd()), file_off)
                .map_err(map_err)?;
            if thp {
                // Best effort: THP may be disabled for shmem; that is not an error.
                if let Err(e) = map.advise_hugepage() {
                    tracing::debug!("MADV_HUGEPAGE on {gpa:#x}: {e}");
                }
            }
            regions.push(GuestRegion {
                gpa,
                len,
                host_addr: map.addr(),
                backing: match &fd {
                    Some(fd) => Backing::Memfd {
                        fd: Arc::clone(fd),
                        offset: file_off,
                    },
                    None => Backing::Anonymous,
                },
                page_size: PAGE_SIZE,
            });
            maps.push(map);
            file_off += len;
        }
        Ok(Self {
            regions,
            maps,
            size,
        })
    }

    /// Allocates every page of memfd-backed RAM now (`fallocate`), like QEMU's
    /// `-mem-prealloc` or Cloud Hypervisor's `prefault=on`, for a destination created ahead of
    /// its migration: pages then arrive into memory that is already backed, and a host short of
    /// memory fails here, before the switchover, rather than while a post-copy guest runs.
    /// Contents stay zero and no mapping is touched, so the engine may be told the memory is
    /// [`zeroed`](ferry_engine::dest::DestVm::zeroed). Anonymous RAM is refused: the engine
    /// drops it from its mapping at session start, which would free the allocation again.
    pub fn prefault(&self) -> Result<(), MemoryError> {
        let Some(Backing::Memfd { fd, .. }) = self.regions.first().map(|r| &r.backing) else {
            return Err(MemoryError::PrefaultAnonymous);
        };
        sys::fallocate(fd.as_fd(), self.size).map_err(|source| MemoryError::Prefault {
            len: self.size,
            source,
        })
    }

    /// Total RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Guest-physical address of RAM offset `off` (see the module docs).
    pub fn ram_offset_to_gpa(&self, off: u64) -> Option<u64> {
        let mut base = 0;
        for r in &self.regions {
            if off < base + r.len {
                return Some(r.gpa + (off - base));
            }
            base += r.len;
        }
        None
    }

    /// RAM offset of guest-physical address `gpa`, if it is RAM (see the module docs).
    pub fn gpa_to_ram_offset(&self, gpa: u64) -> Option<u64> {
        let mut base = 0;
        for r in &self.regions {
            if gpa >= r.gpa && gpa - r.gpa < r.len {
                return Some(base + (gpa - r.gpa));
            }
            base += r.len;
        }
        None
    }

    /// Host address of `len` bytes at RAM offset `off`, if they lie inside one region.
    pub fn host_addr(&self, off: u64, len: u64) -> Option<usize> {
        let mut base = 0;
        for (r, m) in self.regions.iter().zip(&self.maps) {
            if off >= base && off + len <= base + r.len {
                return usize::try_from(off - base).ok().map(|d| m.addr() + d);
            }
            base += r.len;
        }
        None
    }

    /// Copies guest RAM at RAM offset `off` into `out`. `None` if out of range.
    pub fn read(&self, off: u64, out: &mut [u8]) -> Option<()> {
        let addr = self.host_addr(off, out.len() as u64)?;
        // SAFETY: host_addr checked that the range lies inside one live mapping of ours.
        unsafe { sys::read_host(addr, out) };
        Some(())
    }

    /// Copies u64 words (little-endian) of guest RAM at RAM offset `off` into `out`. `None` if
    /// out of range.
    pub fn read_u64s(&self, off: u64, out: &mut [u64]) -> Option<()> {
        let addr = self.host_addr(off, std::mem::size_of_val(out) as u64)?;
        // SAFETY: host_addr checked that the range lies inside one live mapping of ours.
        unsafe { sys::read_host_u64s(addr, out) };
        Some(())
    }

    /// Writes `data` into guest RAM at RAM offset `off`. `None` if out of range.
    pub fn write(&self, off: u64, data: &[u8]) -> Option<()> {
        let addr = self.host_addr(off, data.len() as u64)?;
        // SAFETY: host_addr checked that the range lies inside one live mapping of ours.
        unsafe { sys::write_host(addr, data) };
        Some(())
    }

    /// Reads the little-endian u64 at RAM offset `off`.
    pub fn read_u64(&self, off: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read(off, &mut b)?;
        Some(u64::from_le_bytes(b))
    }

    /// Copies every byte of `other`'s RAM into this one (same layout required); a plain
    /// memcpy "migration" for tests. Returns false if the layouts differ.
    pub fn copy_from(&self, other: &KvmMemory) -> bool {
        if self.size != other.size || self.regions.len() != other.regions.len() {
            return false;
        }
        for (d, s) in self.regions.iter().zip(&other.regions) {
            if d.gpa != s.gpa || d.len != s.len {
                return false;
            }
            let Ok(len) = usize::try_from(d.len) else {
                return false;
            };
            // SAFETY: both ranges are whole live mappings of equal length, in different
            // mappings (two VMs), so they do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    s.host_addr as *const u8,
                    d.host_addr as *mut u8,
                    len,
                );
            }
        }
        true
    }
}

// SAFETY: every region's host range is a live read/write mapping in `maps`, owned by this
// object for its whole lifetime, and `regions` never changes after construction.
unsafe impl GuestMemory for KvmMemory {
    fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Prefaulting a memfd allocates all of it (the file's blocks), keeps it zero, and is
    /// refused for anonymous memory.
    #[test]
    fn prefault_allocates_memfd_and_refuses_anonymous() {
        use std::os::unix::fs::MetadataExt;
        let size = 4 << 20;
        let m = KvmMemory::new(size, MemBacking::Memfd, false).unwrap();
        let Backing::Memfd { fd, .. } = &m.regions()[0].backing else {
            panic!("not memfd")
        };
        let blocks = || {
            std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .unwrap()
                .blocks()
        };
        assert_eq!(blocks(), 0);
        m.prefault().unwrap();
        assert!(blocks() * 512 >= size, "{} blocks", blocks());
        assert_eq!(m.read_u64(size - 8).unwrap(), 0);
        let anon = KvmMemory::new(size, MemBacking::Anonymous, false).unwrap();
        assert!(matches!(
            anon.prefault(),
            Err(MemoryError::PrefaultAnonymous)
        ));
    }

    #[test]
    fn layout_splits_around_hole() {
        // Anonymous + NORESERVE: mapping 3.5 GiB costs nothing until touched.
        let m = KvmMemory::new((3 << 30) + (512 << 20), MemBacking::Anonymous, false).unwrap();
        let r = m.regions();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].gpa, r[0].len), (0, 3 << 30));
        assert_eq!((r[1].gpa, r[1].len), (4 << 30, 512 << 20));
        assert_eq!(m.ram_offset_to_gpa(3 << 30), Some(4 << 30));
        assert_eq!(m.ram_offset_to_gpa((3 << 30) + (512 << 20)), None);
        assert!(m.host_addr((3 << 30) - 4, 8).is_none(), "straddles regions");
    }

    #[test]
    fn memfd_read_write_roundtrip() {
        let m = KvmMemory::new(4 << 20, MemBacking::Memfd, true).unwrap();
        m.write(4096, &42u64.to_le_bytes()).unwrap();
        assert_eq!(m.read_u64(4096), Some(42));
        assert!(matches!(m.regions()[0].backing, Backing::Memfd { .. }));
        assert!(matches!(
            KvmMemory::new(4097, MemBacking::Memfd, false),
            Err(MemoryError::BadSize(4097))
        ));
    }
}
