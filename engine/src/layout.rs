// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Guest memory as the engine indexes it: the negotiated [`MemoryMap`], global page numbers,
//! and checked translation from guest-physical ranges to host pointers.

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
