// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Guest-physical ranges and the negotiated memory map every received range is checked against.

use thiserror::Error;

/// A range of guest-physical memory: `gpa .. gpa + len`. Same 16-byte little-endian layout as
/// Cloud Hypervisor's `MemoryRange`, so range tables can be forwarded unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GpaRange {
    /// First byte.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

impl GpaRange {
    /// A range.
    pub const fn new(gpa: u64, len: u64) -> Self {
        Self { gpa, len }
    }

    /// One past the last byte, or `None` on overflow.
    pub const fn end(&self) -> Option<u64> {
        self.gpa.checked_add(self.len)
    }
}

impl std::fmt::Display for GpaRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}+{:#x}", self.gpa, self.len)
    }
}

/// A guest-physical range failed the memory-map check.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RangeError {
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
    /// Not page aligned.
    #[error("Range {gpa:#x}+{len:#x} is not aligned to the {page_size}-byte page")]
    Unaligned {
        /// Address.
        gpa: u64,
        /// Length.
        len: u64,
        /// The negotiated page size.
        page_size: u64,
    },
    /// Not inside one region of the memory map.
    #[error("Range {gpa:#x}+{len:#x} is outside guest memory")]
    OutOfRange {
        /// Address.
        gpa: u64,
        /// Length.
        len: u64,
    },
}

/// The memory map could not be built.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MemoryMapError {
    /// Page size not a power of two between 4 KiB and 1 GiB.
    #[error("Invalid page size {0}")]
    PageSize(u64),
    /// More regions than the protocol allows.
    #[error("{count} regions exceed the limit of {max}")]
    TooManyRegions {
        /// Regions given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A region is bad on its own.
    #[error("Region {index} is invalid")]
    Region {
        /// Index of the region.
        index: usize,
        /// What is wrong.
        #[source]
        source: RangeError,
    },
    /// Two regions overlap or are not sorted.
    #[error("Region {index} at {gpa:#x} overlaps or precedes the previous region")]
    Overlap {
        /// Index of the second region.
        index: usize,
        /// Its address.
        gpa: u64,
    },
}

/// Most regions a memory map may have.
pub const MAX_REGIONS: usize = 512;

/// Guest memory as negotiated in the handshake: sorted, disjoint, page-aligned regions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryMap {
    page_size: u64,
    regions: Vec<GpaRange>,
}

impl MemoryMap {
    /// Validates and builds a map.
    pub fn new(page_size: u64, regions: Vec<GpaRange>) -> Result<Self, MemoryMapError> {
        if !page_size.is_power_of_two() || !(4096..=1 << 30).contains(&page_size) {
            return Err(MemoryMapError::PageSize(page_size));
        }
        if regions.len() > MAX_REGIONS {
            return Err(MemoryMapError::TooManyRegions {
                count: regions.len(),
                max: MAX_REGIONS,
            });
        }
        let mut prev_end = 0u64;
        for (index, r) in regions.iter().enumerate() {
            check_shape(*r, page_size)
                .map_err(|source| MemoryMapError::Region { index, source })?;
            if index > 0 && r.gpa < prev_end {
                return Err(MemoryMapError::Overlap { index, gpa: r.gpa });
            }
            // check_shape proved the end does not overflow.
            prev_end = r.gpa + r.len;
        }
        Ok(Self { page_size, regions })
    }

    /// The page size every range is aligned to.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The regions.
    pub fn regions(&self) -> &[GpaRange] {
        &self.regions
    }

    /// Total bytes of guest memory.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// Total pages of guest memory.
    pub fn total_pages(&self) -> u64 {
        self.total_bytes() / self.page_size
    }

    /// Checks that `range` is non-empty, page aligned and inside exactly one region, and
    /// returns `(region index, offset in region)`.
    pub fn check(&self, range: GpaRange) -> Result<(usize, u64), RangeError> {
        check_shape(range, self.page_size)?;
        let end = range.gpa + range.len;
        let idx = self.regions.partition_point(|r| r.gpa + r.len <= range.gpa);
        match self.regions.get(idx) {
            Some(r) if r.gpa <= range.gpa && end <= r.gpa + r.len => Ok((idx, range.gpa - r.gpa)),
            _ => Err(RangeError::OutOfRange {
                gpa: range.gpa,
                len: range.len,
            }),
        }
    }

    /// Global page index (0 .. total_pages) of the page at `gpa`, which must be mapped.
    pub fn page_index(&self, gpa: u64) -> Result<u64, RangeError> {
        let (idx, off) = self.check(GpaRange::new(gpa & !(self.page_size - 1), self.page_size))?;
        let before: u64 = self.regions[..idx].iter().map(|r| r.len).sum();
        Ok((before + off) / self.page_size)
    }
}

fn check_shape(r: GpaRange, page_size: u64) -> Result<(), RangeError> {
    if r.len == 0 {
        return Err(RangeError::Empty { gpa: r.gpa });
    }
    if r.end().is_none() {
        return Err(RangeError::Overflow {
            gpa: r.gpa,
            len: r.len,
        });
    }
    if !r.gpa.is_multiple_of(page_size) || !r.len.is_multiple_of(page_size) {
        return Err(RangeError::Unaligned {
            gpa: r.gpa,
            len: r.len,
            page_size,
        });
    }
    Ok(())
}

/// Words checked together for all-zero: a sparse bitmap's clean stretches cost one OR per
/// word and no store (a large guest's final harvest scans its whole bitmap inside the
/// blackout: 32 Ki words at 8 GiB).
const SCAN_BLOCK: usize = 8;

/// Turns a dirty bitmap of one region (bit `i` = page `i`) into maximal runs of set bits,
/// appended to `out` as ranges starting at `base`, each at most `max_len` bytes.
pub fn bitmap_to_ranges(
    bitmap: &[u64],
    base: u64,
    page_size: u64,
    max_len: u64,
    out: &mut Vec<GpaRange>,
) {
    let mut runs = Runs::new(base, page_size, max_len, out);
    for (bi, block) in bitmap.chunks(SCAN_BLOCK).enumerate() {
        let w0 = bi * SCAN_BLOCK;
        if block.iter().fold(0, |a, w| a | w) == 0 {
            runs.zero(w0);
            continue;
        }
        for (i, w) in block.iter().enumerate() {
            runs.word(w0 + i, *w);
        }
    }
    runs.finish(bitmap.len());
}

/// [`bitmap_to_ranges`], leaving `bitmap` all zero: one pass where a caller that reuses the
/// bitmap would otherwise scan it and then clear it (the final dirty harvest of a large guest is
/// inside the blackout). Only non-zero words are written.
pub fn take_bitmap_ranges(
    bitmap: &mut [u64],
    base: u64,
    page_size: u64,
    max_len: u64,
    out: &mut Vec<GpaRange>,
) {
    let len = bitmap.len();
    let mut runs = Runs::new(base, page_size, max_len, out);
    for (bi, block) in bitmap.chunks_mut(SCAN_BLOCK).enumerate() {
        let w0 = bi * SCAN_BLOCK;
        if block.iter().fold(0, |a, w| a | w) == 0 {
            runs.zero(w0);
            continue;
        }
        for (i, w) in block.iter_mut().enumerate() {
            if *w != 0 {
                runs.word(w0 + i, std::mem::take(w));
            } else {
                runs.zero(w0 + i);
            }
        }
    }
    runs.finish(len);
}

/// Builds maximal runs of set bits from a bitmap fed word by word, in order.
struct Runs<'a> {
    base: u64,
    page_size: u64,
    max_pages: u64,
    /// First page of the run being built.
    start: Option<u64>,
    out: &'a mut Vec<GpaRange>,
}

impl<'a> Runs<'a> {
    fn new(base: u64, page_size: u64, max_len: u64, out: &'a mut Vec<GpaRange>) -> Self {
        Self {
            base,
            page_size,
            max_pages: (max_len / page_size).max(1),
            start: None,
            out,
        }
    }

    /// Ends the open run, if any, at page `end`.
    fn close(&mut self, end: u64) {
        let Some(mut s) = self.start.take() else {
            return;
        };
        while s < end {
            let n = (end - s).min(self.max_pages);
            self.out.push(GpaRange::new(
                self.base + s * self.page_size,
                n * self.page_size,
            ));
            s += n;
        }
    }

    /// Word `wi` (and any number of words after it, up to the next call) is zero.
    fn zero(&mut self, wi: usize) {
        self.close(wi as u64 * 64);
    }

    /// Word `wi` is `word`.
    fn word(&mut self, wi: usize, word: u64) {
        let w0 = wi as u64 * 64;
        if word == 0 {
            self.close(w0);
            return;
        }
        if word == u64::MAX {
            self.start.get_or_insert(w0);
            return;
        }
        let mut w = word;
        let mut bit = 0u64;
        while bit < 64 {
            if w & 1 == 1 {
                // Length of the run of ones starting here.
                let ones = u64::from(w.trailing_ones());
                self.start.get_or_insert(w0 + bit);
                bit += ones;
                w = w
                    .checked_shr(u32::try_from(ones).unwrap_or(64))
                    .unwrap_or(0);
            } else {
                self.close(w0 + bit);
                let zeros = u64::from(w.trailing_zeros()).min(64 - bit);
                bit += zeros;
                w = w
                    .checked_shr(u32::try_from(zeros).unwrap_or(64))
                    .unwrap_or(0);
            }
        }
    }

    /// The bitmap had `words` words.
    fn finish(mut self, words: usize) {
        self.close(words as u64 * 64);
    }
}

/// Splits `ranges` into pieces of at most `max_len` bytes (page aligned), preserving order.
pub fn partition(ranges: &[GpaRange], max_len: u64, page_size: u64) -> Vec<GpaRange> {
    let max_len = (max_len / page_size).max(1) * page_size;
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let mut off = 0;
        while off < r.len {
            let n = (r.len - off).min(max_len);
            out.push(GpaRange::new(r.gpa + off, n));
            off += n;
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn map() -> MemoryMap {
        MemoryMap::new(
            4096,
            vec![
                GpaRange::new(0, 0x10_0000),
                GpaRange::new(0x1_0000_0000, 0x20_0000),
            ],
        )
        .unwrap()
    }

    #[test]
    fn check_accepts_inside_and_refuses_outside() {
        let m = map();
        assert_eq!(m.check(GpaRange::new(0x1000, 0x2000)), Ok((0, 0x1000)));
        assert_eq!(
            m.check(GpaRange::new(0x1_0000_1000, 0x1000)),
            Ok((1, 0x1000))
        );
        assert_eq!(
            m.check(GpaRange::new(0xF_F000, 0x2000)),
            Err(RangeError::OutOfRange {
                gpa: 0xF_F000,
                len: 0x2000
            })
        );
        assert_eq!(
            m.check(GpaRange::new(0x20_0000, 0x1000)),
            Err(RangeError::OutOfRange {
                gpa: 0x20_0000,
                len: 0x1000
            })
        );
        assert!(matches!(
            m.check(GpaRange::new(0x1001, 0x1000)),
            Err(RangeError::Unaligned { .. })
        ));
        assert!(matches!(
            m.check(GpaRange::new(u64::MAX - 0xFFF, 0x2000)),
            Err(RangeError::Overflow { .. })
        ));
        assert_eq!(
            m.check(GpaRange::new(0, 0)),
            Err(RangeError::Empty { gpa: 0 })
        );
        assert_eq!(m.page_index(0x1_0000_0000).unwrap(), 0x100);
    }

    #[test]
    fn map_refuses_overlap_and_bad_page_size() {
        assert!(matches!(
            MemoryMap::new(
                4096,
                vec![GpaRange::new(0, 0x2000), GpaRange::new(0x1000, 0x1000)]
            ),
            Err(MemoryMapError::Overlap { index: 1, .. })
        ));
        assert_eq!(
            MemoryMap::new(3000, vec![]),
            Err(MemoryMapError::PageSize(3000))
        );
    }

    #[test]
    fn bitmap_runs() {
        let mut out = Vec::new();
        // pages 0,1,2 and 5, and 63..=65 across a word boundary
        let bm = [0b100111u64 | 1 << 63, 0b11];
        bitmap_to_ranges(&bm, 0x1000_0000, 4096, 1 << 30, &mut out);
        assert_eq!(
            out,
            vec![
                GpaRange::new(0x1000_0000, 3 * 4096),
                GpaRange::new(0x1000_0000 + 5 * 4096, 4096),
                GpaRange::new(0x1000_0000 + 63 * 4096, 3 * 4096),
            ]
        );
    }

    /// Bitmaps up to 40 words (several scan blocks): mostly zero words, some full, some
    /// random, so that runs cross word and block boundaries and blocks are skipped.
    fn sparse_words() -> impl Strategy<Value = Vec<u64>> {
        proptest::collection::vec(
            prop_oneof![4 => Just(0u64), 1 => Just(u64::MAX), 2 => any::<u64>()],
            0..40,
        )
    }

    proptest! {
        #[test]
        fn bitmap_to_ranges_covers_exactly_the_set_bits(words in sparse_words(), max_pages in 1u64..100) {
            let mut out = Vec::new();
            bitmap_to_ranges(&words, 0, 4096, max_pages * 4096, &mut out);
            let mut rebuilt = vec![0u64; words.len()];
            for r in &out {
                prop_assert!(r.len <= max_pages * 4096 && r.len > 0);
                for p in r.gpa / 4096..(r.gpa + r.len) / 4096 {
                    prop_assert_eq!(rebuilt[(p / 64) as usize] >> (p % 64) & 1, 0, "page covered twice");
                    rebuilt[(p / 64) as usize] |= 1 << (p % 64);
                }
            }
            prop_assert_eq!(rebuilt, words);
        }

        #[test]
        fn take_bitmap_ranges_matches_and_clears(words in sparse_words(), max_pages in 1u64..100) {
            let mut want = Vec::new();
            bitmap_to_ranges(&words, 0x4000_0000, 4096, max_pages * 4096, &mut want);
            let mut taken = words.clone();
            let mut got = Vec::new();
            take_bitmap_ranges(&mut taken, 0x4000_0000, 4096, max_pages * 4096, &mut got);
            prop_assert_eq!(got, want);
            prop_assert!(taken.iter().all(|w| *w == 0));
        }

        #[test]
        fn partition_preserves_bytes(lens in proptest::collection::vec(1u64..50, 0..10), max in 1u64..20) {
            let mut gpa = 0;
            let ranges: Vec<_> = lens.iter().map(|l| { let r = GpaRange::new(gpa, l * 4096); gpa += (l + 1) * 4096; r }).collect();
            let parts = partition(&ranges, max * 4096, 4096);
            prop_assert_eq!(parts.iter().map(|r| r.len).sum::<u64>(), ranges.iter().map(|r| r.len).sum::<u64>());
            prop_assert!(parts.iter().all(|r| r.len <= max * 4096));
        }
    }
}
