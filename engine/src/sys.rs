// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The engine's raw memory operation on VMM-owned guest memory: discarding stale pages.
//! (Alias mappings live in [`crate::memory::AliasMapping`].)

use std::io;
use std::os::raw::c_void;

use rustix::mm::Advice;

/// Drops the pages of `addr..addr+len` from this mapping (`MADV_DONTNEED`): anonymous pages
/// read as missing afterwards; shared pages stay in the page cache and fault as minor.
///
/// # Safety
///
/// The range must be guest memory the caller manages (no Rust reference assumes its
/// contents), page aligned, inside one mapping.
pub unsafe fn discard(addr: usize, len: u64) -> io::Result<()> {
    let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the caller guarantees the range is guest memory nobody holds references into.
    unsafe { rustix::mm::madvise(addr as *mut c_void, len, Advice::LinuxDontNeed) }?;
    Ok(())
}
