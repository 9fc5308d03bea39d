// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Guest-memory address arithmetic for the RDMA backend, with no device and no I/O.
//!
//! Owns: the description of guest memory handed in by the engine ([`GuestRegion`]), its split
//! into memory-region chunks of at most the device's `max_mr_size` ([`plan_chunks`]), the table
//! of registered chunks that translates a guest-physical range into (chunk, host address, lkey)
//! pieces ([`ChunkTable`]), the descriptor of registered memory exported to the peer
//! ([`RemoteRegion`]), the validated import of the peer's descriptor ([`RemoteMap`]) and the split
//! of a transfer into work-request pieces that never straddle a local chunk or a remote region
//! ([`split_transfer`], [`split_read`]).
//!
//! Does not own: registration itself (see `memory`), the wire encoding of the descriptor (the
//! authenticated handshake in ferry-protocol carries the four fields of [`RemoteRegion`]), or the
//! negotiated memory map (given here as plain [`GuestRange`]s).

use thiserror::Error;

/// A guest-RAM region as the VMM maps it: guest-physical base, host virtual address, length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GuestRegion {
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Host virtual address of the first byte in this process.
    pub host_addr: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A guest-physical range `gpa .. gpa + len` (an entry of the negotiated memory map, or a range
/// to transfer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GuestRange {
    /// First byte.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

impl GuestRange {
    /// A range.
    pub const fn new(gpa: u64, len: u64) -> Self {
        Self { gpa, len }
    }
}

/// One registered memory-region chunk: a guest-physical span backed by contiguous host memory,
/// with the keys the device assigned to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LocalChunk {
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Host virtual address of the first byte.
    pub host_addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Local key, used in our own scatter-gather entries.
    pub lkey: u32,
    /// Remote key, handed to the peer (never the lkey: they differ on most NICs).
    pub rkey: u32,
}

/// What the handshake carries for one registered chunk: the peer addresses our memory by
/// `addr` (our host virtual address) and `rkey`, and finds it by `gpa`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RemoteRegion {
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// The owner's virtual address of the first byte (the RDMA remote address).
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Remote key of the memory region that covers this span.
    pub rkey: u32,
}

/// The guest regions could not be laid out as memory-region chunks.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LayoutError {
    /// No regions were given.
    #[error("No guest regions")]
    NoRegions,
    /// A region is empty.
    #[error("Region {gpa:#x} is empty")]
    Empty {
        /// Its guest-physical address.
        gpa: u64,
    },
    /// A region's guest or host end overflows.
    #[error("Region {gpa:#x}+{len:#x} overflows")]
    Overflow {
        /// Guest-physical address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// A region is not page aligned (in guest or host address, or length).
    #[error("Region {gpa:#x}+{len:#x} at host {host_addr:#x} is not aligned to {page_size} bytes")]
    Unaligned {
        /// Guest-physical address.
        gpa: u64,
        /// Host address.
        host_addr: u64,
        /// Length.
        len: u64,
        /// Required alignment.
        page_size: u64,
    },
    /// Two regions overlap in guest-physical space.
    #[error("Regions {first:#x} and {second:#x} overlap")]
    Overlap {
        /// Lower region's address.
        first: u64,
        /// Higher region's address.
        second: u64,
    },
    /// The page size is not a power of two.
    #[error("Invalid page size {0}")]
    PageSize(u64),
    /// The chunk limit is smaller than one page.
    #[error("Chunk limit {max_chunk:#x} is below the page size {page_size}")]
    ChunkTooSmall {
        /// The limit (the device's max_mr_size or a configured cap).
        max_chunk: u64,
        /// The page size.
        page_size: u64,
    },
}

/// A guest-physical range could not be translated.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TranslateError {
    /// The range is empty.
    #[error("Empty range at {gpa:#x}")]
    Empty {
        /// Its address.
        gpa: u64,
    },
    /// `gpa + len` overflows.
    #[error("Range {gpa:#x}+{len:#x} overflows")]
    Overflow {
        /// Address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// Part of the range is not registered locally.
    #[error("Range {gpa:#x}+{len:#x} is not registered locally")]
    LocalUnmapped {
        /// First unmapped byte.
        gpa: u64,
        /// Bytes left from there.
        len: u64,
    },
    /// Part of the range is not in the peer's descriptor.
    #[error("Range {gpa:#x}+{len:#x} is not in the peer's registered memory")]
    RemoteUnmapped {
        /// First unmapped byte.
        gpa: u64,
        /// Bytes left from there.
        len: u64,
    },
    /// The range does not fit the local buffer it is read into.
    #[error("Range {gpa:#x}+{len:#x} exceeds the {capacity}-byte buffer")]
    BufferTooSmall {
        /// Address.
        gpa: u64,
        /// Length.
        len: u64,
        /// Buffer size.
        capacity: u64,
    },
    /// The work-request size limit is zero.
    #[error("Work-request size limit is zero")]
    ZeroWrLimit,
}

/// The peer's descriptor of its registered memory was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ImportError {
    /// More entries than allowed.
    #[error("{count} remote regions exceed the limit of {max}")]
    TooMany {
        /// Entries received.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// An entry is empty.
    #[error("Remote region {index} at {gpa:#x} is empty")]
    Empty {
        /// Position in the descriptor.
        index: usize,
        /// Its address.
        gpa: u64,
    },
    /// An entry's guest or remote end overflows.
    #[error("Remote region {index} {gpa:#x}+{len:#x} (addr {addr:#x}) overflows")]
    Overflow {
        /// Position in the descriptor.
        index: usize,
        /// Guest-physical address.
        gpa: u64,
        /// Remote address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// An entry is not page aligned in guest address or length.
    #[error("Remote region {index} {gpa:#x}+{len:#x} is not aligned to {page_size} bytes")]
    Unaligned {
        /// Position in the descriptor.
        index: usize,
        /// Guest-physical address.
        gpa: u64,
        /// Length.
        len: u64,
        /// Required alignment.
        page_size: u64,
    },
    /// An entry is not inside one range of the negotiated memory map.
    #[error("Remote region {index} {gpa:#x}+{len:#x} is outside the memory map")]
    OutsideMap {
        /// Position in the descriptor.
        index: usize,
        /// Guest-physical address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// Two entries overlap in guest-physical space.
    #[error("Remote regions at {first:#x} and {second:#x} overlap")]
    Overlap {
        /// Lower entry's address.
        first: u64,
        /// Higher entry's address.
        second: u64,
    },
    /// Part of the memory map is not covered by any entry.
    #[error("Memory map range {gpa:#x}+{len:#x} is not covered by the peer")]
    Uncovered {
        /// First uncovered byte.
        gpa: u64,
        /// Uncovered length from there.
        len: u64,
    },
    /// The memory map itself is malformed (empty, overflowing or overlapping entry).
    #[error("Memory map entry {gpa:#x}+{len:#x} is invalid")]
    BadMap {
        /// Address.
        gpa: u64,
        /// Length.
        len: u64,
    },
}

fn check_page_size(page_size: u64) -> Result<(), LayoutError> {
    if page_size.is_power_of_two() {
        Ok(())
    } else {
        Err(LayoutError::PageSize(page_size))
    }
}

/// Splits guest regions into memory-region chunks of at most `max_chunk` bytes (rounded down to
/// a page multiple), sorted by guest-physical address. `max_chunk` is the device's `max_mr_size`
/// or a smaller configured cap: some stacks silently truncate larger registrations.
pub fn plan_chunks(
    regions: &[GuestRegion],
    max_chunk: u64,
    page_size: u64,
) -> Result<Vec<GuestRegion>, LayoutError> {
    check_page_size(page_size)?;
    if regions.is_empty() {
        return Err(LayoutError::NoRegions);
    }
    let chunk = max_chunk & !(page_size - 1);
    if chunk == 0 {
        return Err(LayoutError::ChunkTooSmall {
            max_chunk,
            page_size,
        });
    }
    let mut sorted = regions.to_vec();
    sorted.sort_by_key(|r| r.gpa);
    let mut prev_end: Option<(u64, u64)> = None;
    let mut out = Vec::new();
    for r in &sorted {
        if r.len == 0 {
            return Err(LayoutError::Empty { gpa: r.gpa });
        }
        let overflow = LayoutError::Overflow {
            gpa: r.gpa,
            len: r.len,
        };
        let end = r.gpa.checked_add(r.len).ok_or(overflow.clone())?;
        r.host_addr.checked_add(r.len).ok_or(overflow)?;
        let mask = page_size - 1;
        if (r.gpa | r.host_addr | r.len) & mask != 0 {
            return Err(LayoutError::Unaligned {
                gpa: r.gpa,
                host_addr: r.host_addr,
                len: r.len,
                page_size,
            });
        }
        if let Some((first, prev)) = prev_end
            && r.gpa < prev
        {
            return Err(LayoutError::Overlap {
                first,
                second: r.gpa,
            });
        }
        prev_end = Some((r.gpa, end));
        let mut off = 0;
        while off < r.len {
            let len = chunk.min(r.len - off);
            out.push(GuestRegion {
                gpa: r.gpa + off,
                host_addr: r.host_addr + off,
                len,
            });
            off += len;
        }
    }
    Ok(out)
}

/// Index of the entry containing `gpa` in a slice sorted by start and non-overlapping.
fn find<T>(items: &[T], gpa: u64, span: impl Fn(&T) -> (u64, u64)) -> Option<usize> {
    let idx = items.partition_point(|it| span(it).0 <= gpa);
    let i = idx.checked_sub(1)?;
    let (start, len) = span(&items[i]);
    (gpa - start < len).then_some(i)
}

fn range_end(gpa: u64, len: u64) -> Result<u64, TranslateError> {
    if len == 0 {
        return Err(TranslateError::Empty { gpa });
    }
    gpa.checked_add(len)
        .ok_or(TranslateError::Overflow { gpa, len })
}

/// A piece of a local translation: part of one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalSegment {
    /// Index of the chunk in [`ChunkTable::chunks`].
    pub chunk: usize,
    /// Guest-physical address of the piece.
    pub gpa: u64,
    /// Host address of the piece.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Local key of the chunk.
    pub lkey: u32,
}

/// The registered chunks of guest memory, sorted by guest-physical address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkTable {
    chunks: Vec<LocalChunk>,
}

impl ChunkTable {
    /// Builds the table; chunks are sorted and must not overlap (they come from [`plan_chunks`]).
    pub fn new(mut chunks: Vec<LocalChunk>) -> Result<Self, LayoutError> {
        chunks.sort_by_key(|c| c.gpa);
        for pair in chunks.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let a_end = a.gpa.checked_add(a.len).ok_or(LayoutError::Overflow {
                gpa: a.gpa,
                len: a.len,
            })?;
            if b.gpa < a_end {
                return Err(LayoutError::Overlap {
                    first: a.gpa,
                    second: b.gpa,
                });
            }
        }
        if let Some(c) = chunks.iter().find(|c| c.len == 0) {
            return Err(LayoutError::Empty { gpa: c.gpa });
        }
        Ok(Self { chunks })
    }

    /// The chunks, sorted by guest-physical address.
    pub fn chunks(&self) -> &[LocalChunk] {
        &self.chunks
    }

    /// Total registered bytes.
    pub fn total_len(&self) -> u64 {
        self.chunks.iter().map(|c| c.len).sum()
    }

    fn find(&self, gpa: u64) -> Option<usize> {
        find(&self.chunks, gpa, |c| (c.gpa, c.len))
    }

    /// Translates `gpa .. gpa + len` into pieces, split wherever a chunk ends.
    pub fn translate(&self, gpa: u64, len: u64) -> Result<Vec<LocalSegment>, TranslateError> {
        let end = range_end(gpa, len)?;
        let mut out = Vec::new();
        let mut cur = gpa;
        while cur < end {
            let i = self.find(cur).ok_or(TranslateError::LocalUnmapped {
                gpa: cur,
                len: end - cur,
            })?;
            let c = &self.chunks[i];
            let off = cur - c.gpa;
            let piece = (c.len - off).min(end - cur);
            out.push(LocalSegment {
                chunk: i,
                gpa: cur,
                addr: c.host_addr + off,
                len: piece,
                lkey: c.lkey,
            });
            cur += piece;
        }
        Ok(out)
    }

    /// The descriptor the handshake sends to the peer: addresses, lengths and **rkeys**.
    pub fn export(&self) -> Vec<RemoteRegion> {
        self.chunks
            .iter()
            .map(|c| RemoteRegion {
                gpa: c.gpa,
                addr: c.host_addr,
                len: c.len,
                rkey: c.rkey,
            })
            .collect()
    }
}

/// Bounds applied when importing a peer's descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportLimits {
    /// Most entries accepted.
    pub max_regions: usize,
    /// Guest page size every entry must be aligned to (a power of two).
    pub page_size: u64,
}

impl Default for ImportLimits {
    fn default() -> Self {
        Self {
            max_regions: 1 << 16,
            page_size: 4096,
        }
    }
}

/// A piece of a remote translation: part of one peer region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteSegment {
    /// Guest-physical address of the piece.
    pub gpa: u64,
    /// Remote address of the piece.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Remote key.
    pub rkey: u32,
}

/// The peer's registered memory, validated against the negotiated memory map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteMap {
    regions: Vec<RemoteRegion>,
}

impl RemoteMap {
    /// Validates the peer's descriptor: a bounded number of non-empty, page-aligned,
    /// non-overflowing entries, each inside one range of `memory_map`, not overlapping each other,
    /// and together covering the whole memory map (both roles register all of guest memory).
    pub fn import(
        regions: &[RemoteRegion],
        memory_map: &[GuestRange],
        limits: ImportLimits,
    ) -> Result<Self, ImportError> {
        if regions.len() > limits.max_regions {
            return Err(ImportError::TooMany {
                count: regions.len(),
                max: limits.max_regions,
            });
        }
        let page_mask = limits.page_size.wrapping_sub(1);
        let mut map = memory_map.to_vec();
        map.sort();
        for (i, m) in map.iter().enumerate() {
            let bad = ImportError::BadMap {
                gpa: m.gpa,
                len: m.len,
            };
            let end = m.gpa.checked_add(m.len).ok_or(bad.clone())?;
            if m.len == 0 || map.get(i + 1).is_some_and(|n| n.gpa < end) {
                return Err(bad);
            }
        }
        for (index, r) in regions.iter().enumerate() {
            if r.len == 0 {
                return Err(ImportError::Empty { index, gpa: r.gpa });
            }
            let overflow = ImportError::Overflow {
                index,
                gpa: r.gpa,
                addr: r.addr,
                len: r.len,
            };
            let end = r.gpa.checked_add(r.len).ok_or(overflow.clone())?;
            r.addr.checked_add(r.len).ok_or(overflow)?;
            if !limits.page_size.is_power_of_two() || (r.gpa | r.len) & page_mask != 0 {
                return Err(ImportError::Unaligned {
                    index,
                    gpa: r.gpa,
                    len: r.len,
                    page_size: limits.page_size,
                });
            }
            let inside = find(&map, r.gpa, |m| (m.gpa, m.len))
                .is_some_and(|i| end <= map[i].gpa + map[i].len);
            if !inside {
                return Err(ImportError::OutsideMap {
                    index,
                    gpa: r.gpa,
                    len: r.len,
                });
            }
        }
        let mut sorted = regions.to_vec();
        sorted.sort_by_key(|r| r.gpa);
        for pair in sorted.windows(2) {
            if pair[1].gpa < pair[0].gpa + pair[0].len {
                return Err(ImportError::Overlap {
                    first: pair[0].gpa,
                    second: pair[1].gpa,
                });
            }
        }
        // Coverage: walk every memory-map range through the sorted entries.
        for m in &map {
            let end = m.gpa + m.len;
            let mut cur = m.gpa;
            while cur < end {
                match find(&sorted, cur, |r| (r.gpa, r.len)) {
                    Some(i) => cur = sorted[i].gpa + sorted[i].len,
                    None => {
                        let next = sorted
                            .iter()
                            .map(|r| r.gpa)
                            .find(|&g| g > cur)
                            .map_or(end, |g| g.min(end));
                        return Err(ImportError::Uncovered {
                            gpa: cur,
                            len: next - cur,
                        });
                    }
                }
            }
        }
        Ok(Self { regions: sorted })
    }

    /// The validated entries, sorted by guest-physical address.
    pub fn regions(&self) -> &[RemoteRegion] {
        &self.regions
    }

    fn find(&self, gpa: u64) -> Option<usize> {
        find(&self.regions, gpa, |r| (r.gpa, r.len))
    }

    /// Translates `gpa .. gpa + len` into remote pieces, split wherever a peer region ends.
    pub fn translate(&self, gpa: u64, len: u64) -> Result<Vec<RemoteSegment>, TranslateError> {
        let end = range_end(gpa, len)?;
        let mut out = Vec::new();
        let mut cur = gpa;
        while cur < end {
            let i = self.find(cur).ok_or(TranslateError::RemoteUnmapped {
                gpa: cur,
                len: end - cur,
            })?;
            let r = &self.regions[i];
            let off = cur - r.gpa;
            let piece = (r.len - off).min(end - cur);
            out.push(RemoteSegment {
                gpa: cur,
                addr: r.addr + off,
                len: piece,
                rkey: r.rkey,
            });
            cur += piece;
        }
        Ok(out)
    }
}

/// Adapters to ferry-protocol's handshake types, which carry the same fields on the wire.
mod protocol_adapters {
    use ferry_protocol::MemoryMap;
    use ferry_protocol::handshake::RdmaRegion;
    use ferry_protocol::memmap::{GpaRange, MAX_REGIONS};

    use super::{GuestRange, ImportError, ImportLimits, RemoteMap, RemoteRegion};

    impl From<RemoteRegion> for RdmaRegion {
        fn from(r: RemoteRegion) -> Self {
            Self {
                gpa: r.gpa,
                addr: r.addr,
                len: r.len,
                rkey: r.rkey,
            }
        }
    }

    impl From<RdmaRegion> for RemoteRegion {
        fn from(r: RdmaRegion) -> Self {
            Self {
                gpa: r.gpa,
                addr: r.addr,
                len: r.len,
                rkey: r.rkey,
            }
        }
    }

    impl From<GpaRange> for GuestRange {
        fn from(r: GpaRange) -> Self {
            Self::new(r.gpa, r.len)
        }
    }

    impl RemoteMap {
        /// Imports the regions a peer sent in the handshake, checked against the negotiated
        /// memory map (its page size and regions), with the protocol's bound on the count.
        pub fn from_handshake(
            regions: &[RdmaRegion],
            map: &MemoryMap,
        ) -> Result<Self, ImportError> {
            let remote: Vec<RemoteRegion> = regions.iter().copied().map(Into::into).collect();
            let ranges: Vec<GuestRange> = map.regions().iter().copied().map(Into::into).collect();
            let limits = ImportLimits {
                max_regions: MAX_REGIONS * 64,
                page_size: map.page_size(),
            };
            Self::import(&remote, &ranges, limits)
        }
    }
}

/// One work request's worth of a transfer: a contiguous local span and a contiguous remote span
/// of the same length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrPiece {
    /// Guest-physical address (for error reports).
    pub gpa: u64,
    /// Length in bytes (at most the work-request limit).
    pub len: u32,
    /// Local address.
    pub local_addr: u64,
    /// Local key.
    pub lkey: u32,
    /// Index of the local chunk (0 for a bounce buffer).
    pub chunk: usize,
    /// Remote address.
    pub remote_addr: u64,
    /// Remote key.
    pub rkey: u32,
}

/// Appends to `out` the work-request pieces that move `range` from local chunks to the same
/// guest-physical addresses on the peer: split at every local chunk end, every remote region end,
/// and every `max_wr_bytes`.
pub fn split_transfer(
    local: &ChunkTable,
    remote: &RemoteMap,
    range: GuestRange,
    max_wr_bytes: u32,
    out: &mut Vec<WrPiece>,
) -> Result<(), TranslateError> {
    if max_wr_bytes == 0 {
        return Err(TranslateError::ZeroWrLimit);
    }
    let end = range_end(range.gpa, range.len)?;
    let start_len = out.len();
    let mut cur = range.gpa;
    while cur < end {
        let (Some(li), Some(ri)) = (local.find(cur), remote.find(cur)) else {
            out.truncate(start_len);
            return Err(if local.find(cur).is_none() {
                TranslateError::LocalUnmapped {
                    gpa: cur,
                    len: end - cur,
                }
            } else {
                TranslateError::RemoteUnmapped {
                    gpa: cur,
                    len: end - cur,
                }
            });
        };
        let c = &local.chunks[li];
        let r = &remote.regions[ri];
        let piece = (c.gpa + c.len - cur)
            .min(r.gpa + r.len - cur)
            .min(end - cur)
            .min(u64::from(max_wr_bytes));
        out.push(WrPiece {
            gpa: cur,
            // Bounded by max_wr_bytes (a u32) just above.
            len: u32::try_from(piece).unwrap_or(max_wr_bytes),
            local_addr: c.host_addr + (cur - c.gpa),
            lkey: c.lkey,
            chunk: li,
            remote_addr: r.addr + (cur - r.gpa),
            rkey: r.rkey,
        });
        cur += piece;
    }
    Ok(())
}

/// Appends to `out` the RDMA READ pieces that fetch `range` from the peer into a contiguous local
/// buffer (`buf_addr`, `capacity` bytes, key `lkey`): the staging-buffer path for post-copy.
pub fn split_read(
    remote: &RemoteMap,
    range: GuestRange,
    buf_addr: u64,
    capacity: u64,
    lkey: u32,
    max_wr_bytes: u32,
    out: &mut Vec<WrPiece>,
) -> Result<(), TranslateError> {
    if max_wr_bytes == 0 {
        return Err(TranslateError::ZeroWrLimit);
    }
    range_end(range.gpa, range.len)?;
    if range.len > capacity {
        return Err(TranslateError::BufferTooSmall {
            gpa: range.gpa,
            len: range.len,
            capacity,
        });
    }
    let segs = remote.translate(range.gpa, range.len)?;
    for s in segs {
        let mut off = 0;
        while off < s.len {
            let piece = (s.len - off).min(u64::from(max_wr_bytes));
            out.push(WrPiece {
                gpa: s.gpa + off,
                len: u32::try_from(piece).unwrap_or(max_wr_bytes),
                local_addr: buf_addr + (s.gpa + off - range.gpa),
                lkey,
                chunk: 0,
                remote_addr: s.addr + off,
                rkey: s.rkey,
            });
            off += piece;
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;
    const MIB: u64 = 1 << 20;

    fn region(gpa: u64, host: u64, len: u64) -> GuestRegion {
        GuestRegion {
            gpa,
            host_addr: host,
            len,
        }
    }

    /// Local table with fake keys: lkey = 100 + i, rkey = 200 + i.
    fn table(chunks: &[GuestRegion]) -> ChunkTable {
        ChunkTable::new(
            chunks
                .iter()
                .enumerate()
                .map(|(i, c)| LocalChunk {
                    gpa: c.gpa,
                    host_addr: c.host_addr,
                    len: c.len,
                    lkey: 100 + u32::try_from(i).unwrap(),
                    rkey: 200 + u32::try_from(i).unwrap(),
                })
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn chunks_split_at_limit_and_keep_host_offsets() {
        let plan = plan_chunks(
            &[
                region(0x1_0000_0000, 0x7f00_0000_0000, 10 * MIB),
                region(0, 0x7e00_0000_0000, 3 * MIB),
            ],
            4 * MIB,
            PAGE,
        )
        .unwrap();
        let got: Vec<_> = plan.iter().map(|c| (c.gpa, c.host_addr, c.len)).collect();
        assert_eq!(
            got,
            vec![
                (0, 0x7e00_0000_0000, 3 * MIB),
                (0x1_0000_0000, 0x7f00_0000_0000, 4 * MIB),
                (0x1_0040_0000, 0x7f00_0040_0000, 4 * MIB),
                (0x1_0080_0000, 0x7f00_0080_0000, 2 * MIB),
            ]
        );
    }

    #[test]
    fn chunk_limit_is_rounded_down_to_pages() {
        let plan = plan_chunks(&[region(0, 0x10000, 4 * PAGE)], PAGE + 7, PAGE).unwrap();
        assert_eq!(plan.len(), 4);
        assert!(plan.iter().all(|c| c.len == PAGE));
        assert_eq!(
            plan_chunks(&[region(0, 0x10000, PAGE)], PAGE - 1, PAGE),
            Err(LayoutError::ChunkTooSmall {
                max_chunk: PAGE - 1,
                page_size: PAGE
            })
        );
        // A device limit of u64::MAX (typical for ConnectX) leaves regions whole.
        let plan = plan_chunks(&[region(0, 0x10000, 64 * MIB)], u64::MAX, PAGE).unwrap();
        assert_eq!(plan.len(), 1);
    }

    #[test]
    fn bad_regions_are_rejected() {
        assert_eq!(plan_chunks(&[], MIB, PAGE), Err(LayoutError::NoRegions));
        assert_eq!(
            plan_chunks(&[region(0, 0, 0)], MIB, PAGE),
            Err(LayoutError::Empty { gpa: 0 })
        );
        assert!(matches!(
            plan_chunks(&[region(0, 0x1000, 0x1800)], MIB, PAGE),
            Err(LayoutError::Unaligned { .. })
        ));
        assert!(matches!(
            plan_chunks(&[region(u64::MAX - PAGE + 1, 0, 2 * PAGE)], MIB, PAGE),
            Err(LayoutError::Overflow { .. })
        ));
        assert_eq!(
            plan_chunks(
                &[region(0, 0, 2 * PAGE), region(PAGE, 0x10_0000, PAGE)],
                MIB,
                PAGE
            ),
            Err(LayoutError::Overlap {
                first: 0,
                second: PAGE
            })
        );
        assert_eq!(
            plan_chunks(&[region(0, 0, PAGE)], MIB, 3000),
            Err(LayoutError::PageSize(3000))
        );
    }

    #[test]
    fn translate_splits_at_chunk_boundaries() {
        let t = table(&plan_chunks(&[region(0, 0x10_0000, 4 * MIB)], MIB, PAGE).unwrap());
        let segs = t.translate(MIB - PAGE, 2 * MIB + 2 * PAGE).unwrap();
        let got: Vec<_> = segs
            .iter()
            .map(|s| (s.chunk, s.gpa, s.addr, s.len, s.lkey))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, MIB - PAGE, 0x10_0000 + MIB - PAGE, PAGE, 100),
                (1, MIB, 0x10_0000 + MIB, MIB, 101),
                (2, 2 * MIB, 0x10_0000 + 2 * MIB, MIB, 102),
                (3, 3 * MIB, 0x10_0000 + 3 * MIB, PAGE, 103),
            ]
        );
        assert_eq!(segs.iter().map(|s| s.len).sum::<u64>(), 2 * MIB + 2 * PAGE);
    }

    #[test]
    fn translate_reports_holes_and_bad_ranges() {
        let t = table(&[region(0, 0x10_0000, MIB), region(2 * MIB, 0x90_0000, MIB)]);
        assert_eq!(
            t.translate(MIB - PAGE, 2 * PAGE),
            Err(TranslateError::LocalUnmapped {
                gpa: MIB,
                len: PAGE
            })
        );
        assert_eq!(t.translate(5, 0), Err(TranslateError::Empty { gpa: 5 }));
        assert!(matches!(
            t.translate(u64::MAX, 2),
            Err(TranslateError::Overflow { .. })
        ));
        assert_eq!(t.total_len(), 2 * MIB);
    }

    #[test]
    fn export_carries_rkeys_not_lkeys() {
        let t = table(&[region(0, 0x10_0000, MIB)]);
        assert_eq!(
            t.export(),
            vec![RemoteRegion {
                gpa: 0,
                addr: 0x10_0000,
                len: MIB,
                rkey: 200
            }]
        );
    }

    fn remote(gpa: u64, addr: u64, len: u64, rkey: u32) -> RemoteRegion {
        RemoteRegion {
            gpa,
            addr,
            len,
            rkey,
        }
    }

    fn map() -> Vec<GuestRange> {
        vec![GuestRange::new(0, 4 * MIB), GuestRange::new(8 * MIB, MIB)]
    }

    #[test]
    fn import_accepts_a_covering_descriptor_in_any_order() {
        let regions = [
            remote(8 * MIB, 0xa000_0000, MIB, 3),
            remote(2 * MIB, 0xb020_0000, 2 * MIB, 2),
            remote(0, 0xb000_0000, 2 * MIB, 1),
        ];
        let m = RemoteMap::import(&regions, &map(), ImportLimits::default()).unwrap();
        let gpas: Vec<_> = m.regions().iter().map(|r| r.gpa).collect();
        assert_eq!(gpas, vec![0, 2 * MIB, 8 * MIB]);
        let segs = m.translate(2 * MIB - PAGE, 2 * PAGE).unwrap();
        assert_eq!(
            segs,
            vec![
                RemoteSegment {
                    gpa: 2 * MIB - PAGE,
                    addr: 0xb000_0000 + 2 * MIB - PAGE,
                    len: PAGE,
                    rkey: 1
                },
                RemoteSegment {
                    gpa: 2 * MIB,
                    addr: 0xb020_0000,
                    len: PAGE,
                    rkey: 2
                },
            ]
        );
        assert_eq!(
            m.translate(4 * MIB, PAGE),
            Err(TranslateError::RemoteUnmapped {
                gpa: 4 * MIB,
                len: PAGE
            })
        );
    }

    #[test]
    fn import_rejects_bad_descriptors() {
        let lim = ImportLimits::default();
        let ok_tail = remote(8 * MIB, 0xa000_0000, MIB, 3);
        let cases: Vec<(Vec<RemoteRegion>, ImportError)> = vec![
            (
                vec![remote(0, 1 << 40, 0, 1), ok_tail],
                ImportError::Empty { index: 0, gpa: 0 },
            ),
            (
                vec![remote(0, u64::MAX - PAGE, 4 * MIB, 1), ok_tail],
                ImportError::Overflow {
                    index: 0,
                    gpa: 0,
                    addr: u64::MAX - PAGE,
                    len: 4 * MIB,
                },
            ),
            (
                vec![remote(0, 1 << 40, 4 * MIB - 1, 1), ok_tail],
                ImportError::Unaligned {
                    index: 0,
                    gpa: 0,
                    len: 4 * MIB - 1,
                    page_size: PAGE,
                },
            ),
            (
                // Straddles the end of the first memory-map range.
                vec![remote(0, 1 << 40, 5 * MIB, 1), ok_tail],
                ImportError::OutsideMap {
                    index: 0,
                    gpa: 0,
                    len: 5 * MIB,
                },
            ),
            (
                vec![
                    remote(0, 1 << 40, 3 * MIB, 1),
                    remote(2 * MIB, 1 << 41, 2 * MIB, 2),
                    ok_tail,
                ],
                ImportError::Overlap {
                    first: 0,
                    second: 2 * MIB,
                },
            ),
            (
                vec![
                    remote(0, 1 << 40, MIB, 1),
                    remote(2 * MIB, 1 << 41, 2 * MIB, 2),
                    ok_tail,
                ],
                ImportError::Uncovered { gpa: MIB, len: MIB },
            ),
            (
                vec![remote(0, 1 << 40, 4 * MIB, 1)],
                ImportError::Uncovered {
                    gpa: 8 * MIB,
                    len: MIB,
                },
            ),
        ];
        for (regions, want) in cases {
            assert_eq!(RemoteMap::import(&regions, &map(), lim), Err(want));
        }
        let many = vec![ok_tail; 3];
        assert_eq!(
            RemoteMap::import(
                &many,
                &map(),
                ImportLimits {
                    max_regions: 2,
                    page_size: PAGE
                }
            ),
            Err(ImportError::TooMany { count: 3, max: 2 })
        );
        assert_eq!(
            RemoteMap::import(&[ok_tail], &[GuestRange::new(0, 0)], lim),
            Err(ImportError::BadMap { gpa: 0, len: 0 })
        );
    }

    #[test]
    fn split_transfer_cuts_at_both_sides_and_wr_limit() {
        // Local chunks of 1 MiB; remote regions of 3 MiB + 1 MiB; WR limit 768 KiB.
        let local = table(&plan_chunks(&[region(0, 0x1000_0000, 4 * MIB)], MIB, PAGE).unwrap());
        let remote_map = RemoteMap::import(
            &[
                remote(0, 0x5000_0000, 3 * MIB, 7),
                remote(3 * MIB, 0x6000_0000, MIB, 8),
            ],
            &[GuestRange::new(0, 4 * MIB)],
            ImportLimits::default(),
        )
        .unwrap();
        let mut out = Vec::new();
        let limit = 768 * 1024;
        split_transfer(
            &local,
            &remote_map,
            GuestRange::new(MIB / 2, 3 * MIB),
            limit,
            &mut out,
        )
        .unwrap();
        // Every piece lies within one local chunk and one remote region, within the limit,
        // and the pieces tile the range in order.
        let mut cur = MIB / 2;
        for p in &out {
            assert_eq!(p.gpa, cur);
            assert!(p.len <= limit && p.len > 0);
            let c = &local.chunks()[p.chunk];
            assert!(p.gpa >= c.gpa && p.gpa + u64::from(p.len) <= c.gpa + c.len);
            assert_eq!(p.local_addr, c.host_addr + (p.gpa - c.gpa));
            let (base, addr, rkey) = if p.gpa < 3 * MIB {
                (0, 0x5000_0000, 7)
            } else {
                (3 * MIB, 0x6000_0000, 8)
            };
            assert!(p.gpa + u64::from(p.len) <= base + 3 * MIB);
            assert_eq!((p.remote_addr, p.rkey), (addr + p.gpa - base, rkey));
            cur += u64::from(p.len);
        }
        assert_eq!(cur, MIB / 2 + 3 * MIB);
        // 0.5M..1M | 1M..1.75M 1.75M..2M | 2M..2.75M 2.75M..3M | 3M..3.5M
        let lens: Vec<u64> = out.iter().map(|p| u64::from(p.len) / 1024).collect();
        assert_eq!(lens, vec![512, 768, 256, 768, 256, 512]);
    }

    #[test]
    fn split_transfer_leaves_out_untouched_on_error() {
        let local = table(&[region(0, 0x1000_0000, MIB)]);
        let remote_map = RemoteMap::import(
            &[remote(0, 0x5000_0000, 2 * MIB, 7)],
            &[GuestRange::new(0, 2 * MIB)],
            ImportLimits::default(),
        )
        .unwrap();
        let mut out = Vec::new();
        assert_eq!(
            split_transfer(
                &local,
                &remote_map,
                GuestRange::new(0, 2 * MIB),
                1 << 20,
                &mut out
            ),
            Err(TranslateError::LocalUnmapped { gpa: MIB, len: MIB })
        );
        assert!(out.is_empty());
        assert_eq!(
            split_transfer(&local, &remote_map, GuestRange::new(0, PAGE), 0, &mut out),
            Err(TranslateError::ZeroWrLimit)
        );
    }

    #[test]
    fn split_read_fills_the_buffer_in_order() {
        let remote_map = RemoteMap::import(
            &[
                remote(0, 0x5000_0000, 2 * PAGE, 7),
                remote(2 * PAGE, 0x6000_0000, 2 * PAGE, 8),
            ],
            &[GuestRange::new(0, 4 * PAGE)],
            ImportLimits::default(),
        )
        .unwrap();
        let mut out = Vec::new();
        split_read(
            &remote_map,
            GuestRange::new(PAGE, 2 * PAGE),
            0x9000,
            2 * PAGE,
            55,
            1 << 20,
            &mut out,
        )
        .unwrap();
        let got: Vec<_> = out
            .iter()
            .map(|p| (p.local_addr, p.remote_addr, p.len, p.rkey, p.lkey))
            .collect();
        assert_eq!(
            got,
            vec![
                (0x9000, 0x5000_0000 + PAGE, 4096, 7, 55),
                (0x9000 + PAGE, 0x6000_0000, 4096, 8, 55),
            ]
        );
        assert_eq!(
            split_read(
                &remote_map,
                GuestRange::new(0, 4 * PAGE),
                0x9000,
                2 * PAGE,
                55,
                1 << 20,
                &mut out
            ),
            Err(TranslateError::BufferTooSmall {
                gpa: 0,
                len: 4 * PAGE,
                capacity: 2 * PAGE
            })
        );
    }

    /// xorshift64*, so the randomized test below needs no extra dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn randomized_splits_tile_ranges_within_both_maps() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..300 {
            // Guest memory: 1..4 regions of 1..64 pages with gaps; local chunks of 1..16 pages;
            // the peer splits the same memory differently.
            let mut map = Vec::new();
            let mut gpa = rng.below(4) * PAGE;
            for _ in 0..=rng.below(4) {
                let len = (1 + rng.below(64)) * PAGE;
                map.push(GuestRange::new(gpa, len));
                gpa += len + rng.below(3) * PAGE;
            }
            let regions: Vec<GuestRegion> = map
                .iter()
                .map(|r| region(r.gpa, 0x1000_0000 + r.gpa, r.len))
                .collect();
            let local = table(&plan_chunks(&regions, (1 + rng.below(16)) * PAGE, PAGE).unwrap());
            let mut peer = Vec::new();
            for r in &map {
                let mut off = 0;
                while off < r.len {
                    let len = ((1 + rng.below(8)) * PAGE).min(r.len - off);
                    let rkey = u32::try_from(peer.len()).unwrap();
                    peer.push(remote(
                        r.gpa + off,
                        0x7000_0000 + (r.gpa + off) * 3,
                        len,
                        rkey,
                    ));
                    off += len;
                }
            }
            let remote_map = RemoteMap::import(&peer, &map, ImportLimits::default()).unwrap();
            let r = map[usize::try_from(rng.below(map.len() as u64)).unwrap()];
            let start = r.gpa + rng.below(r.len / PAGE) * PAGE;
            let len = 1 + rng.below(r.gpa + r.len - start);
            let limit = u32::try_from(1 + rng.below(4 * PAGE)).unwrap();
            let mut out = Vec::new();
            split_transfer(
                &local,
                &remote_map,
                GuestRange::new(start, len),
                limit,
                &mut out,
            )
            .unwrap();
            let mut cur = start;
            for p in &out {
                let plen = u64::from(p.len);
                assert_eq!(p.gpa, cur);
                assert!(p.len >= 1 && p.len <= limit);
                let c = &local.chunks()[p.chunk];
                assert!(p.gpa >= c.gpa && p.gpa + plen <= c.gpa + c.len);
                assert_eq!(p.local_addr, 0x1000_0000 + p.gpa);
                let owner = remote_map
                    .regions()
                    .iter()
                    .find(|q| q.gpa <= p.gpa && p.gpa + plen <= q.gpa + q.len)
                    .expect("piece inside one peer region");
                assert_eq!(owner.rkey, p.rkey);
                assert_eq!(p.remote_addr, owner.addr + (p.gpa - owner.gpa));
                cur += plen;
            }
            assert_eq!(cur, start + len);
        }
    }

    #[test]
    fn handshake_regions_round_trip_and_import() {
        use ferry_protocol::handshake::RdmaRegion;
        use ferry_protocol::{GpaRange, MemoryMap};
        let t = table(&plan_chunks(&[region(0, 0x10_0000, 2 * MIB)], MIB, PAGE).unwrap());
        let wire: Vec<RdmaRegion> = t.export().into_iter().map(Into::into).collect();
        assert_eq!(wire[1].rkey, 201);
        let back: Vec<RemoteRegion> = wire.iter().copied().map(Into::into).collect();
        assert_eq!(back, t.export());
        let map = MemoryMap::new(4096, vec![GpaRange::new(0, 2 * MIB)]).unwrap();
        let m = RemoteMap::from_handshake(&wire, &map).unwrap();
        assert_eq!(m.regions().len(), 2);
        let short = MemoryMap::new(4096, vec![GpaRange::new(0, 3 * MIB)]).unwrap();
        assert_eq!(
            RemoteMap::from_handshake(&wire, &short),
            Err(ImportError::Uncovered {
                gpa: 2 * MIB,
                len: MIB
            })
        );
    }
}
