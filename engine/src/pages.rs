// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Per-page primitives on the send path: zero-page detection and the per-page checksum.
//!
//! Owns two pure functions over page contents: [`is_zero`] (is every byte zero?) and
//! [`page_hash`] (the xxh3-64 checksum carried in `Pages` frames, seeded with the page's
//! guest-physical address so that a page delivered to the wrong address fails verification).
//! Not here: reading pages from guest memory, compression, framing.
//!
//! Both are hot: a pre-copy round runs them once per dirty page. Their cost is measured by the
//! criterion benchmarks in `bench/benches/hot_paths.rs`.

/// Returns whether every byte of `page` is zero (an empty slice counts as zero).
///
/// Compares 64-byte blocks as eight `u64` words OR-ed together and stops at the first block
/// that is not zero, so a typical non-zero page costs a few nanoseconds and an all-zero 4 KiB
/// page about one pass over L1 at memory-load speed. Plain safe loads: the compiler
/// vectorises the OR of the block.
pub fn is_zero(page: &[u8]) -> bool {
    const BLOCK: usize = 64;
    let mut blocks = page.chunks_exact(BLOCK);
    for block in &mut blocks {
        let mut acc = 0u64;
        for word in block.chunks_exact(8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            acc |= u64::from_ne_bytes(w);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// The per-page checksum of ferry's `Pages` frames: xxh3-64 of the page, seeded with its
/// guest-physical address `gpa`.
///
/// Seeding with the address makes the same contents at two addresses hash differently, so a
/// page applied at the wrong place is caught. It detects corruption, it is not a MAC.
pub fn page_hash(gpa: u64, page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(page, gpa)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_are_zero() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0u8; 4096]));
        assert!(is_zero(&[0u8; 7]));
        assert!(is_zero(&[0u8; 2 << 20]));
    }

    #[test]
    fn any_nonzero_byte_is_found() {
        // Every position, including the unaligned tail after the last 64-byte block.
        for len in [1usize, 63, 64, 65, 100, 4096] {
            for pos in 0..len {
                let mut page = vec![0u8; len];
                page[pos] = 0x80;
                assert!(!is_zero(&page), "len {len} pos {pos}");
            }
        }
    }

    #[test]
    fn unaligned_slices_work() {
        let buf = vec![0u8; 4096 + 3];
        assert!(is_zero(&buf[3..]));
        let mut buf = buf;
        buf[4095 + 3] = 1;
        assert!(!is_zero(&buf[3..]));
        assert!(is_zero(&buf[3..4095 + 3]));
    }

    #[test]
    fn page_hash_is_xxh3_seeded_by_gpa() {
        let page: Vec<u8> = (0..4096u32)
            .map(|i| u8::try_from(i * 7 % 251).unwrap_or(0))
            .collect();
        let h = page_hash(0x1000, &page);
        assert_eq!(h, xxhash_rust::xxh3::xxh3_64_with_seed(&page, 0x1000));
        // Same contents at another address hash differently; a flipped bit changes the hash.
        assert_ne!(h, page_hash(0x2000, &page));
        let mut flipped = page.clone();
        flipped[100] ^= 1;
        assert_ne!(h, page_hash(0x1000, &flipped));
        // Deterministic.
        assert_eq!(h, page_hash(0x1000, &page));
    }
}
