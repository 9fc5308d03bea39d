// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The unsafe surface of the RDMA backend, kept small: registering raw memory as a memory region,
//! posting send work requests whose scatter-gather entries point at raw memory, the anonymous
//! mapping behind the bounce-buffer pool, and waiting on the rdmacm event file descriptor.
//!
//! Everything else in `rdma` is safe code over these functions and over sideway's safe API.

use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::memory_region::{
    MemoryRegion, RegisterMemoryRegionError, RegisterMemoryRegionErrorKind,
};
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    GenericQueuePair, PostSendError, PostSendGuard, QueuePair, SetScatterGatherEntry,
    WorkRequestFlags,
};

/// Registers `len` bytes at host address `addr` with the device.
///
/// # Safety
///
/// `addr .. addr + len` must be mapped in this process and stay mapped, at the same physical
/// backing as far as the caller is concerned, until the returned region is dropped (the device
/// pins the pages at registration and DMAs into or out of them afterwards). If `access` allows
/// local or remote writes, the caller must tolerate the memory changing under any Rust reference
/// to it, i.e. hold none.
pub unsafe fn reg_mr(
    pd: &Arc<ProtectionDomain>,
    addr: u64,
    len: u64,
    access: AccessFlags,
) -> Result<Arc<MemoryRegion>, RegisterMemoryRegionError> {
    let (Ok(addr), Ok(len)) = (usize::try_from(addr), usize::try_from(len)) else {
        return Err(
            RegisterMemoryRegionErrorKind::Ibverbs(io::Error::from_raw_os_error(libc::EOVERFLOW))
                .into(),
        );
    };
    // SAFETY: the caller guarantees `addr .. addr + len` stays mapped for the region's life.
    unsafe { pd.reg_mr(addr, len, access) }
}

/// The operation of one send work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOp {
    /// RDMA WRITE to `remote_addr` under `rkey`.
    Write {
        /// Remote key.
        rkey: u32,
        /// Remote address.
        remote_addr: u64,
    },
    /// RDMA WRITE with immediate data (already in network byte order).
    WriteImm {
        /// Remote key.
        rkey: u32,
        /// Remote address.
        remote_addr: u64,
        /// Immediate data, big-endian as the verbs ABI wants it.
        imm_be: u32,
    },
    /// RDMA READ from `remote_addr` under `rkey` into the local buffer.
    Read {
        /// Remote key.
        rkey: u32,
        /// Remote address.
        remote_addr: u64,
    },
}

/// One send work request with a single scatter-gather entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendWr {
    /// `wr_id` reported in the completion.
    pub wr_id: u64,
    /// Ask for a completion.
    pub signalled: bool,
    /// The operation.
    pub op: SendOp,
    /// Local buffer address.
    pub local_addr: u64,
    /// Local buffer length.
    pub len: u32,
    /// Local key of the registration covering the buffer.
    pub lkey: u32,
}

/// Posts `wrs` to the send queue of `qp` in one doorbell (`ibv_wr_start` .. `ibv_wr_complete`);
/// on error none of them is queued.
///
/// # Safety
///
/// For every work request, `local_addr .. local_addr + len` must lie inside a memory region
/// registered with `lkey` on the queue pair's protection domain (with LOCAL_WRITE for reads), and
/// that region must not be deregistered, nor the memory unmapped, until the request's completion
/// (or a later signalled one) has been polled, or the queue pair has been destroyed.
pub unsafe fn post_send(qp: &mut GenericQueuePair, wrs: &[SendWr]) -> Result<(), PostSendError> {
    let mut guard = qp.start_post_send();
    for wr in wrs {
        let flags = if wr.signalled {
            WorkRequestFlags::Signaled
        } else {
            WorkRequestFlags::none()
        };
        let handle = guard.construct_wr(wr.wr_id, flags);
        let handle = match wr.op {
            SendOp::Write { rkey, remote_addr } => handle.setup_write(rkey, remote_addr),
            SendOp::WriteImm {
                rkey,
                remote_addr,
                imm_be,
            } => handle.setup_write_imm(rkey, remote_addr, imm_be),
            SendOp::Read { rkey, remote_addr } => handle.setup_read(rkey, remote_addr),
        };
        // SAFETY: the caller guarantees the buffer is registered under `lkey` and outlives the
        // request.
        unsafe { handle.setup_sge(wr.lkey, wr.local_addr, wr.len) };
    }
    guard.post()
}

/// An anonymous private mapping the device writes into (the bounce-buffer pool's memory). Only
/// raw pointers to it exist; bytes are read through [`AnonMapping::bytes`] once the device is done.
#[derive(Debug)]
pub struct AnonMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain process memory owned by this value; every access goes through raw
// pointers whose exclusivity the owners (bounce slots) guarantee.
unsafe impl Send for AnonMapping {}
// SAFETY: as above; `bytes` requires the caller to own the slice's slot.
unsafe impl Sync for AnonMapping {}

impl AnonMapping {
    /// Maps `len` bytes of zeroed, populated, page-aligned memory.
    pub fn new(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a fresh anonymous mapping with no address hint touches no existing memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or(io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(Self { ptr, len })
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Copies `data` to `offset` (unit tests fill memory before any simulated device use).
    #[cfg(test)]
    pub fn write_for_test(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len, "write out of bounds");
        // SAFETY: in bounds of the live mapping, which is `offset + data.len() <= len`.
        let dst = unsafe { self.ptr.as_ptr().add(offset) };
        // SAFETY: `dst .. dst + data.len()` is inside the mapping and cannot overlap `data`, a
        // Rust slice that does not point into memory only reached through raw pointers.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
    }

    /// The bytes at `offset .. offset + len`, or `None` when out of bounds.
    ///
    /// # Safety
    ///
    /// No device operation may be writing the range for the lifetime of the returned slice, and
    /// no other slice of the range may be handed out mutably (the bounce pool gives each slot to
    /// one owner, and the owner gets the slot back only after the READ completed).
    pub unsafe fn bytes(&self, offset: usize, len: usize) -> Option<&[u8]> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: `offset + len <= self.len`, so the pointer stays inside the mapping.
        let start = unsafe { self.ptr.as_ptr().add(offset) };
        // SAFETY: in bounds of a live mapping; the caller guarantees no concurrent writer.
        Some(unsafe { std::slice::from_raw_parts(start, len) })
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: we own the mapping and nothing borrows it any more; the bounce pool declares
        // its memory region before this mapping, so the region is deregistered first.
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        debug_assert_eq!(rc, 0, "munmap of the bounce pool failed");
    }
}

/// Waits until `fd` is readable or `timeout` passes; `Ok(false)` on timeout.
pub fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `pfd` is a valid pollfd for the duration of the call; nfds is 1.
        let rc = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        match rc {
            0 => return Ok(false),
            n if n > 0 => return Ok(true),
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn anon_mapping_is_zeroed_and_bounds_checked() {
        let m = AnonMapping::new(8192).unwrap();
        assert_eq!(m.addr() % 4096, 0);
        assert_eq!(m.len(), 8192);
        // SAFETY: no device is involved in this test.
        let b = unsafe { m.bytes(4096, 4096) }.unwrap();
        assert!(b.iter().all(|&x| x == 0));
        // SAFETY: as above.
        assert!(unsafe { m.bytes(4096, 4097) }.is_none());
        let _ = AnonMapping::new(0).expect_err("empty mapping");
    }

    #[test]
    fn wait_readable_times_out_and_sees_data() {
        let (r, w) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::io::Write;
        use std::os::fd::AsRawFd;
        assert!(!wait_readable(r.as_raw_fd(), Duration::from_millis(20)).unwrap());
        (&w).write_all(b"x").unwrap();
        assert!(wait_readable(r.as_raw_fd(), Duration::from_millis(1000)).unwrap());
    }
}
