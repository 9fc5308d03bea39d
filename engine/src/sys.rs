// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The engine's raw memory operations on VMM-owned guest memory: discarding stale pages and
//! clearing shared memory.
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

/// Frees the backing of `addr..addr+len` of a shared mapping (`MADV_REMOVE`: a hole is punched
/// in the file, so every mapping of it reads zeroes there and the page cache holds nothing).
///
/// # Safety
///
/// As for [`discard`]; the mapping must be a shared one (memfd, shmem, hugetlbfs).
pub unsafe fn remove(addr: usize, len: u64) -> io::Result<()> {
    let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the caller guarantees the range is shared guest memory nobody holds references
    // into.
    unsafe { rustix::mm::madvise(addr as *mut c_void, len, Advice::LinuxRemove) }?;
    Ok(())
}
