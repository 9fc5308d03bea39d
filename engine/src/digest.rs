// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The whole-memory digest both sides compare at the end.
//!
//! Every page gets `h = xxh3_64(page, seed = gpa)`; the digest is the xxh3-128 of all page
//! hashes in page order. The source computes it over its (paused) memory after the switchover.
//! The destination records each page's hash when it *places* the page (after it is written
//! to guest memory and before the guest can touch it in post-copy), so the comparison covers
//! exactly what the destination VM started from, even though the guest runs on meanwhile.
//! xxh3 detects corruption and engine bugs (a page lost by dirty tracking, misplaced, torn); it
//! is not a MAC.

use crate::layout::{HoleCursor, Layout};
use crate::pages::page_hash;

/// The digest of a page-hash array.
pub fn digest_of(hashes: impl Iterator<Item = u64>) -> [u8; 16] {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for x in hashes {
        h.update(&x.to_le_bytes());
    }
    h.digest128().to_le_bytes()
}

/// Hashes every page of guest memory (the source, paused) and returns the digest. Holes of
/// memfd regions (never-written pages, see `Layout::file_holes`) are hashed as zero pages
/// without being read: reading them would allocate them.
pub fn digest_memory(layout: &Layout) -> [u8; 16] {
    let ps = layout.page_size();
    let zero = vec![0u8; ps as usize];
    let mut hashes = Vec::with_capacity(layout.total_pages() as usize);
    let mut holes = Vec::new();
    for r in layout.regions() {
        let range = ferry_protocol::GpaRange::new(r.gpa, r.len);
        holes.clear();
        layout.file_holes(range, &mut holes);
        // The sender skipped the same holes: confirm each with a probe of its own (no data
        // from its start to its end), so that a fault in the block probing cannot hide from
        // the digest. An unconfirmed hole is read like any page.
        holes.retain(|hole| layout.is_hole(*hole));
        let mut cursor = HoleCursor::new(&holes);
        if let Ok(bytes) = layout.bytes(range) {
            for (i, page) in bytes.chunks_exact(ps as usize).enumerate() {
                let gpa = r.gpa + i as u64 * ps;
                let in_hole = cursor.hole_end(gpa).is_some();
                hashes.push(page_hash(gpa, if in_hole { &zero } else { page }));
            }
        }
    }
    digest_of(hashes.into_iter())
}

/// Lowercase hex of a digest.
pub fn hex(d: &[u8; 16]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}
