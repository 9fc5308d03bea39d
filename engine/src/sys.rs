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

/// `struct sched_attr` (include/uapi/linux/sched/types.h), version 1 (56 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
    sched_util_min: u32,
    sched_util_max: u32,
}

/// `SCHED_FLAG_RESET_ON_FORK`: threads the thread creates start at normal priority.
const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;

/// Sets the scheduling of thread `tid` (0: the calling thread): `SCHED_FIFO` at `fifo` when
/// given, else `SCHED_OTHER` at `nice` with a slice of `slice_ns` (0: the default slice; a
/// short slice lets the thread preempt on wake-up under EEVDF, Linux 6.12+). With
/// `reset_on_fork`, threads it creates from then on do not inherit a raised priority (a VM's
/// resume may start threads, such as a process VM's writers: they must not run at it).
pub fn set_sched(
    tid: i32,
    nice: i32,
    slice_ns: u64,
    fifo: Option<u32>,
    reset_on_fork: bool,
) -> io::Result<()> {
    let attr = SchedAttr {
        size: u32::try_from(std::mem::size_of::<SchedAttr>()).unwrap_or(56),
        sched_policy: if fifo.is_some() {
            libc::SCHED_FIFO as u32
        } else {
            libc::SCHED_OTHER as u32
        },
        sched_flags: if reset_on_fork {
            SCHED_FLAG_RESET_ON_FORK
        } else {
            0
        },
        sched_nice: nice,
        sched_priority: fifo.unwrap_or(0),
        sched_runtime: slice_ns,
        ..SchedAttr::default()
    };
    sched_setattr(tid, &attr)
}

fn sched_setattr(tid: i32, attr: &SchedAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid, initialised sched_attr whose `size` field matches its
    // layout; the kernel only reads it. Flags 0.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            libc::c_long::from(tid),
            attr as *const SchedAttr,
            0 as libc::c_long,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The scheduling of thread `tid` (0: the calling thread), as `sched_getattr` reports it.
pub fn get_sched(tid: i32) -> io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    let size = u32::try_from(std::mem::size_of::<SchedAttr>()).unwrap_or(56);
    // SAFETY: `attr` is a writable sched_attr of `size` bytes; the kernel writes at most `size`
    // bytes into it. Flags 0.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            libc::c_long::from(tid),
            &mut attr as *mut SchedAttr,
            libc::c_long::from(size),
            0 as libc::c_long,
        )
    };
    if rc == 0 {
        Ok(attr)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Puts back on thread `tid` (0: the calling thread) scheduling saved by [`get_sched`]: policy,
/// priority, nice and flags. A normal thread's slice goes back to the default (the kernel
/// reports the slice in use, default or not, and setting it would pin it).
pub fn set_sched_attr(tid: i32, saved: &SchedAttr) -> io::Result<()> {
    let normal = [libc::SCHED_OTHER, libc::SCHED_BATCH, libc::SCHED_IDLE]
        .iter()
        .any(|p| u32::try_from(*p).ok() == Some(saved.sched_policy));
    let attr = SchedAttr {
        size: u32::try_from(std::mem::size_of::<SchedAttr>()).unwrap_or(56),
        sched_runtime: if normal { 0 } else { saved.sched_runtime },
        // Utilisation clamps are applied only with their flags; keep the policy's own fields.
        sched_flags: saved.sched_flags & SCHED_FLAG_RESET_ON_FORK,
        ..*saved
    };
    sched_setattr(tid, &attr)
}

impl SchedAttr {
    /// A real-time or deadline policy (already ahead of every normal thread).
    pub fn is_realtime(&self) -> bool {
        [libc::SCHED_FIFO, libc::SCHED_RR]
            .iter()
            .any(|p| u32::try_from(*p).ok() == Some(self.sched_policy))
            || self.sched_policy == SCHED_DEADLINE
    }

    /// The nice value (normal policies).
    pub fn nice(&self) -> i32 {
        self.sched_nice
    }
}

/// `SCHED_DEADLINE` (not in every libc version).
const SCHED_DEADLINE: u32 = 6;
