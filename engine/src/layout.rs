// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Guest memory as the engine indexes it: the negotiated [`MemoryMap`], global page numbers,
//! and checked translation from guest-physical ranges to host pointers.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use ferry_protocol::memmap::MemoryMapError;
use ferry_protocol::{GpaRange, MemoryMap, RangeError};
use ferry_transport::memory::{GuestRegion as TransportRegion, RegistrationConfig};
use ferry_transport::{MemoryRegistration, RegisterError};

use crate::vm::{Backing, GuestMemory, GuestRegion};

/// Guest memory could not be described to the protocol or the transport.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The regions do not form a valid memory map.
    #[error("Guest memory regions do not form a valid memory map")]
    Map(#[from] MemoryMapError),
    /// Regions of different page sizes.
    #[error("Region at {gpa:#x} has page size {page_size}, others {expected}")]
    MixedPageSizes {
        /// The region.
        gpa: u64,
        /// Its page size.
        page_size: u64,
        /// The first region's page size.
        expected: u64,
    },
    /// No regions.
    #[error("Guest memory has no regions")]
    Empty,
    /// The transport refused the registration.
    #[error("Cannot register guest memory with the transport")]
    Register(#[from] RegisterError),
}

/// The engine's view of guest memory.
#[derive(Debug, Clone)]
pub struct Layout {
    regions: Vec<GuestRegion>,
    map: MemoryMap,
    /// Global page number of each region's first page.
    first_page: Vec<u64>,
    page_size: u64,
    total_pages: u64,
}

/// `lseek(SEEK_DATA)`: the file offset of the first data at or after `pos`, or `None` when
/// there is none (a hole to the end of the file).
fn next_data(fd: &OwnedFd, pos: u64) -> rustix::io::Result<Option<u64>> {
    match rustix::fs::seek(fd, rustix::fs::SeekFrom::Data(pos)) {
        Ok(d) => Ok(Some(d)),
        Err(rustix::io::Errno::NXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Walks holes from [`Layout::file_holes`] (sorted, not overlapping) alongside guest
/// addresses that never decrease: the sender and the digest skip them the same way.
#[derive(Debug)]
pub(crate) struct HoleCursor<'h> {
    holes: &'h [GpaRange],
}

impl<'h> HoleCursor<'h> {
    pub(crate) fn new(holes: &'h [GpaRange]) -> Self {
        Self { holes }
    }

    /// The end of the hole holding `gpa`, if one does.
    pub(crate) fn hole_end(&mut self, gpa: u64) -> Option<u64> {
        while let Some((h, rest)) = self.holes.split_first()
            && h.gpa + h.len <= gpa
        {
            self.holes = rest;
        }
        self.holes
            .first()
            .filter(|h| h.gpa <= gpa)
            .map(|h| h.gpa + h.len)
    }
}

/// Block size of [`Layout::file_holes`]'s probes.
pub(crate) const HOLE_PROBE_BYTES: u64 = 256 * 1024;

impl Layout {
    /// Describes `memory`.
    pub fn new(memory: &dyn GuestMemory) -> Result<Self, LayoutError> {
        let regions = memory.regions().to_vec();
        let first = regions.first().ok_or(LayoutError::Empty)?;
        let page_size = first.page_size;
        let mut first_page = Vec::with_capacity(regions.len());
        let mut pages = 0u64;
        for r in &regions {
            if r.page_size != page_size {
                return Err(LayoutError::MixedPageSizes {
                    gpa: r.gpa,
                    page_size: r.page_size,
                    expected: page_size,
                });
            }
            first_page.push(pages);
            pages += r.len / page_size;
        }
        let map = MemoryMap::new(
            page_size,
            regions
                .iter()
                .map(|r| GpaRange::new(r.gpa, r.len))
                .collect(),
        )?;
        Ok(Self {
            regions,
            map,
            first_page,
            page_size,
            total_pages: pages,
        })
    }

    /// The memory map sent in the handshake.
    pub fn map(&self) -> &MemoryMap {
        &self.map
    }

    /// The regions.
    pub fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }

    /// Page size.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Pages of guest memory.
    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }

    /// Bytes of guest memory.
    pub fn total_bytes(&self) -> u64 {
        self.total_pages * self.page_size
    }

    /// Checks `range` against the map; returns (region index, offset, first global page).
    pub fn locate(&self, range: GpaRange) -> Result<(usize, u64, u64), RangeError> {
        let (idx, off) = self.map.check(range)?;
        Ok((idx, off, self.first_page[idx] + off / self.page_size))
    }

    /// Host address of a checked range's first byte.
    pub fn host_addr(&self, range: GpaRange) -> Result<usize, RangeError> {
        let (idx, off, _) = self.locate(range)?;
        // off < region len, which fits the address space (the mapping exists).
        Ok(self.regions[idx].host_addr + off as usize)
    }

    /// The bytes of a checked range.
    ///
    /// The slice aliases guest memory that vCPUs (or the kernel) may write concurrently: read
    /// it only for copying or hashing, where a torn read is tolerated (dirty tracking resends).
    pub fn bytes(&self, range: GpaRange) -> Result<&[u8], RangeError> {
        let addr = self.host_addr(range)?;
        // SAFETY: `GuestMemory`'s contract keeps the region mapped and readable while the
        // layout's owner holds the memory object; the range was checked to lie inside one
        // region. Concurrent writers make the content racy, not the access invalid (guest
        // memory is plain bytes with no validity invariant).
        Ok(unsafe { std::slice::from_raw_parts(addr as *const u8, range.len as usize) })
    }

    /// Guest-physical address of global page `page`.
    pub fn page_gpa(&self, page: u64) -> u64 {
        let idx = self.first_page.partition_point(|&f| f <= page) - 1;
        self.regions[idx].gpa + (page - self.first_page[idx]) * self.page_size
    }

    /// Global page number of each region's first page.
    pub fn first_pages(&self) -> &[u64] {
        &self.first_page
    }

    /// Appends to `out` holes of `range` (inside one region) in its region's memfd: pages
    /// never written, which read as zero. They are found with `lseek(SEEK_DATA)`, not by
    /// reading: on shmem, reading a hole through a mapping allocates the page (measured:
    /// reading every page of an unwritten 1 GiB memfd grew `Shmem` by 1 GiB), so a source that
    /// read its guest's untouched memory to find zero pages would allocate all of it.
    ///
    /// One `SEEK_DATA` per [`HOLE_PROBE_BYTES`] block: from a hole it skips to the next data
    /// cheaply, from data it returns at once. `SEEK_HOLE` is not used: from data it walks every
    /// page up to the next hole, the whole rest of a populated file (it made every pre-copy
    /// round of a 1 GiB guest 5× slower). So a hole that starts inside a block after data is
    /// found only from the next block on; the pages before it are read, as before. Only memfd
    /// regions; any error means "no more holes known".
    pub(crate) fn file_holes(&self, range: GpaRange, out: &mut Vec<GpaRange>) {
        let Some((fd, start)) = self.memfd_of(range) else {
            return;
        };
        let ps = self.page_size;
        let end = start + range.len;
        let gpa_of = |file_off: u64| range.gpa + (file_off - start);
        let mut pos = start;
        while pos < end {
            let data = match next_data(fd, pos) {
                Ok(Some(d)) => d.min(end),
                Ok(None) => end,
                Err(_) => return,
            };
            // Page granular on shmem; rounded inwards all the same.
            let (h0, h1) = (pos.next_multiple_of(ps), data / ps * ps);
            if h1 > h0 {
                match out.last_mut() {
                    Some(last) if last.gpa + last.len == gpa_of(h0) => last.len += h1 - h0,
                    _ => out.push(GpaRange::new(gpa_of(h0), h1 - h0)),
                }
            }
            // Data at `data`: probe again from the next block.
            pos = (data / HOLE_PROBE_BYTES + 1) * HOLE_PROBE_BYTES;
        }
    }

    /// Whether `range` (inside one memfd region) holds no data at all: one `SEEK_DATA` from
    /// its start finds none before its end. A check independent of [`Layout::file_holes`]'s
    /// block probing, for the digest.
    pub(crate) fn is_hole(&self, range: GpaRange) -> bool {
        let Some((fd, start)) = self.memfd_of(range) else {
            return false;
        };
        match next_data(fd, start) {
            Ok(Some(d)) => d >= start + range.len,
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// The memfd behind `range` (inside one memfd region) and the file offset of its first
    /// byte; `None` for other backings or a range outside the layout.
    fn memfd_of(&self, range: GpaRange) -> Option<(&OwnedFd, u64)> {
        let (idx, off, _) = self.locate(range).ok()?;
        match &self.regions[idx].backing {
            Backing::Memfd { fd, offset } => Some((&**fd, offset + off)),
            _ => None,
        }
    }

    /// Whether every page of guest memory is allocated: a memfd region without a hole, an
    /// anonymous region whose pages are all resident (`mincore`), a hugetlbfs region always.
    /// Registering io_uring fixed buffers pins, and so allocates, every page: the source
    /// registers them only when this holds (a migration must not inflate a sparse guest to
    /// its full size on the host being drained). Approximate both ways, which costs only
    /// speed: an anonymous page only ever read maps the shared zero page and counts as
    /// resident (pinning it for writing would allocate it), and memfd pages allocated by
    /// `fallocate` but never written count as holes.
    pub fn fully_allocated(&self) -> bool {
        self.regions.iter().all(|r| match &r.backing {
            Backing::Memfd { fd, offset } => {
                matches!(
                    rustix::fs::seek(&**fd, rustix::fs::SeekFrom::Hole(*offset)),
                    Ok(h) if h >= offset + r.len
                )
            }
            Backing::Anonymous => {
                // SAFETY: the region is a mapping of this process (the `GuestMemory`
                // contract); mincore reads only its page tables.
                unsafe { crate::sys::all_resident(r.host_addr, r.len) }.unwrap_or(false)
            }
            Backing::Hugetlbfs { .. } => true,
        })
    }

    /// Registers the memory with the transport (fixed-buffer slices), with optional alias
    /// mappings per region (destination post-copy placement) and, with `files`, the backing
    /// file of every memfd region (destination receives through the page cache:
    /// `Target::File`; hugetlbfs files take no `splice` writes and are left out).
    pub fn register(
        &self,
        aliases: Option<&[Option<usize>]>,
        files: bool,
        config: RegistrationConfig,
    ) -> Result<Arc<MemoryRegistration>, LayoutError> {
        let regions: Vec<TransportRegion> = self
            .regions
            .iter()
            .enumerate()
            .map(|(i, r)| TransportRegion {
                gpa: r.gpa,
                host_addr: r.host_addr,
                len: r.len,
                alias_addr: aliases.and_then(|a| a.get(i).copied().flatten()),
                file: match &r.backing {
                    Backing::Memfd { .. } if files => r
                        .backing
                        .file()
                        .map(|(fd, offset)| ferry_transport::FileRef { fd, offset }),
                    _ => None,
                },
            })
            .collect();
        // SAFETY: the regions come from a `GuestMemory`, whose contract keeps them mapped,
        // readable and writable while its owner lives; the engine holds the registration only
        // for the migration, during which the caller keeps the memory alive (see
        // `source::migrate` / `dest::receive`), and alias mappings are owned by the engine's
        // `AliasMap` values that outlive the registration. The files are open: `self` holds
        // their `Arc<OwnedFd>` during this call (the registration keeps duplicates).
        Ok(unsafe { MemoryRegistration::new(&regions, config)? })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::memory::{MemBacking, MemOptions, ProcessMemory};

    const PS: u64 = 4096;

    #[test]
    fn memfd_holes_are_found_without_reading() {
        // Four probe blocks of 64 pages in region 0.
        let mem = ProcessMemory::new(
            &[(0, 256 * PS), (1 << 30, 16 * PS)],
            MemBacking::Memfd,
            MemOptions::default(),
        )
        .unwrap();
        let r0 = &mem.mem_regions()[0];
        r0.store_u64(3 * PS, 1).unwrap();
        for p in [10, 11, 12, 104] {
            r0.store_u64(p * PS + 8, 2).unwrap();
        }
        let layout = Layout::new(&mem).unwrap();
        let pages = |a: u64, b: u64| GpaRange::new(a * PS, (b - a) * PS);
        let mut holes = Vec::new();
        layout.file_holes(GpaRange::new(0, 256 * PS), &mut holes);
        // Block 0: the leading hole only (pages 4..10 and 13..64 follow data in the block and
        // are read); block 1 (64..128): up to the data at 104; then blocks 2 and 3, a hole.
        assert_eq!(holes, vec![pages(0, 3), pages(64, 104), pages(128, 256)]);
        // A range starting inside data and ending inside a hole.
        holes.clear();
        layout.file_holes(pages(11, 71), &mut holes);
        assert_eq!(holes, vec![pages(64, 71)]);
        // Asked again, the same answer: finding them did not allocate them.
        holes.clear();
        layout.file_holes(GpaRange::new(0, 256 * PS), &mut holes);
        assert_eq!(holes.len(), 3);
        // The second region is one hole (its own memfd).
        holes.clear();
        layout.file_holes(GpaRange::new(1 << 30, 16 * PS), &mut holes);
        assert_eq!(holes, vec![GpaRange::new(1 << 30, 16 * PS)]);
        assert!(!layout.fully_allocated());
    }

    #[test]
    fn fully_allocated_memory() {
        let populated = MemOptions {
            hugepage: false,
            populate: true,
        };
        for backing in [MemBacking::Memfd, MemBacking::Anonymous] {
            let full = ProcessMemory::new(&[(0, 32 * PS)], backing, populated).unwrap();
            assert!(Layout::new(&full).unwrap().fully_allocated(), "{backing:?}");
            let sparse =
                ProcessMemory::new(&[(0, 32 * PS)], backing, MemOptions::default()).unwrap();
            sparse.mem_regions()[0].store_u64(5 * PS, 1).unwrap();
            assert!(
                !Layout::new(&sparse).unwrap().fully_allocated(),
                "{backing:?}"
            );
            // Anonymous regions have no file: no holes reported, pages are read as before.
            let mut holes = Vec::new();
            Layout::new(&sparse)
                .unwrap()
                .file_holes(GpaRange::new(0, 32 * PS), &mut holes);
            assert_eq!(holes.is_empty(), backing == MemBacking::Anonymous);
        }
    }

    /// Two regions in one memfd, the second at a non-zero file offset and a gpa unlike it (as
    /// the KVM backend's memory above the PCI hole): holes come back at their gpas.
    #[test]
    fn holes_of_a_region_at_a_file_offset() {
        use crate::memory::MemRegion;
        use crate::vm::GuestRegion;

        struct TwoInOne(Vec<GuestRegion>);
        // SAFETY: the regions lie in `file`'s mapping, which outlives every use in this test.
        unsafe impl GuestMemory for TwoInOne {
            fn regions(&self) -> &[GuestRegion] {
                &self.0
            }
        }
        let file = MemRegion::memfd("two-in-one", 256 * PS, MemOptions::default()).unwrap();
        let Backing::Memfd { fd, .. } = file.backing() else {
            panic!("memfd expected");
        };
        let base = usize::try_from(file.addr()).unwrap();
        // Low: file pages 0..64 at gpa 0. High: file pages 64..256 at gpa 4 GiB.
        let high_gpa = 4 << 30;
        let mem = TwoInOne(vec![
            GuestRegion {
                gpa: 0,
                len: 64 * PS,
                host_addr: base,
                backing: Backing::Memfd {
                    fd: std::sync::Arc::clone(&fd),
                    offset: 0,
                },
                page_size: PS,
            },
            GuestRegion {
                gpa: high_gpa,
                len: 192 * PS,
                host_addr: base + 64 * PS as usize,
                backing: Backing::Memfd {
                    fd: std::sync::Arc::clone(&fd),
                    offset: 64 * PS,
                },
                page_size: PS,
            },
        ]);
        // Data at high-region page 100 (file page 164) only.
        file.store_u64(164 * PS, 7).unwrap();
        let layout = Layout::new(&mem).unwrap();
        let mut holes = Vec::new();
        layout.file_holes(GpaRange::new(high_gpa, 192 * PS), &mut holes);
        // Probe blocks follow the file offset: 64..128, 128..192 (data at 164), 192..256.
        assert_eq!(
            holes,
            vec![
                GpaRange::new(high_gpa, 100 * PS),
                GpaRange::new(high_gpa + 128 * PS, 64 * PS)
            ]
        );
        assert!(layout.is_hole(GpaRange::new(high_gpa, 100 * PS)));
        assert!(!layout.is_hole(GpaRange::new(high_gpa + 99 * PS, 2 * PS)));
        holes.clear();
        layout.file_holes(GpaRange::new(0, 64 * PS), &mut holes);
        assert_eq!(holes, vec![GpaRange::new(0, 64 * PS)]);
    }

    #[test]
    fn hole_cursor_walks_forward() {
        let holes = [GpaRange::new(PS, 2 * PS), GpaRange::new(8 * PS, PS)];
        let mut c = HoleCursor::new(&holes);
        assert_eq!(c.hole_end(0), None);
        assert_eq!(c.hole_end(PS), Some(3 * PS));
        assert_eq!(c.hole_end(2 * PS), Some(3 * PS));
        assert_eq!(c.hole_end(3 * PS), None);
        assert_eq!(c.hole_end(8 * PS), Some(9 * PS));
        assert_eq!(c.hole_end(9 * PS), None);
    }
}
