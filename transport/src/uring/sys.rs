// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The io_uring FFI surface of the transport: pushing SQEs that reference memory, registering
//! guest memory as fixed buffers, and the uapi constants the `io-uring` crate does not export.
//!
//! Both functions are `unsafe` because the kernel keeps using the memory after they return; the
//! callers in [`super`] uphold that with owned batches, in-flight guards and the drain-on-drop
//! rule, and say so at each call.

use std::io;

use io_uring::squeue::{Entry, PushError};
use io_uring::{IoUring, SubmissionQueue};

use crate::memory::Slice;

/// `IORING_SEND_ZC_REPORT_USAGE` (uapi `io_uring.h`, kernel 6.2): ask the notification CQE to
/// report whether the kernel fell back to copying.
pub(crate) const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;

/// `IORING_NOTIF_USAGE_ZC_COPIED`: set in a notification's `res` when the data was copied.
pub(crate) const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

/// The most ops one SENDMSG/RECVMSG carries (`UIO_MAXIOV`).
pub(crate) const MAX_GROUP_IOVECS: usize = 1024;

/// Builds an iovec for `len` bytes at `addr`.
pub(crate) fn iovec(addr: usize, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    }
}

/// The iovecs and `msghdr`s of a link chain's SENDMSG/RECVMSG requests. Filled completely
/// (iovecs, then headers) before any pointer into them is handed to the kernel, and not
/// touched again until every request of the chain has completed.
#[derive(Debug, Default)]
pub(crate) struct MsgVecs {
    pub(crate) iov: Vec<libc::iovec>,
    /// (first iovec, count) per message.
    pub(crate) spans: Vec<(usize, usize)>,
    headers: Vec<libc::msghdr>,
}

// SAFETY: the vectors hold plain addresses into memory the stream keeps alive; they are only
// used by the thread that owns the stream, and moving them between threads dereferences nothing.
unsafe impl Send for MsgVecs {}

impl MsgVecs {
    pub(crate) fn clear(&mut self) {
        self.iov.clear();
        self.spans.clear();
        self.headers.clear();
    }

    /// Builds one `msghdr` per span, pointing into `iov` (which must not change afterwards).
    pub(crate) fn build_headers(&mut self) {
        self.headers.clear();
        let base = self.iov.as_mut_ptr();
        for &(first, count) in &self.spans {
            // SAFETY: an all-zero msghdr is a valid empty message.
            let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
            h.msg_iov = base.wrapping_add(first);
            h.msg_iovlen = count;
            self.headers.push(h);
        }
    }

    /// Pointer to message `i` (valid until the next `clear`/`build_headers`).
    pub(crate) fn header(&mut self, i: usize) -> *mut libc::msghdr {
        self.headers.as_mut_ptr().wrapping_add(i)
    }
}

/// Pushes `entries` to the submission queue (all or nothing).
///
/// # Safety
///
/// Every buffer and file an entry references must stay valid until its completion (and, for
/// `SEND_ZC`, its notification) has been reaped.
pub(crate) unsafe fn push_all(
    sq: &mut SubmissionQueue<'_>,
    entries: &[Entry],
) -> Result<(), PushError> {
    // SAFETY: forwarded from this function's contract.
    unsafe { sq.push_multiple(entries) }
}

/// Registers `slices` as the ring's fixed buffers, index `i` = `slices[i]`.
///
/// # Safety
///
/// The slices must stay mapped until the ring is dropped (the ring pins the pages; unmapping them
/// first leaves the ring writing into pages no longer in the address space).
pub(crate) unsafe fn register_buffers(ring: &IoUring, slices: &[Slice]) -> io::Result<()> {
    let iovecs: Vec<libc::iovec> = slices
        .iter()
        .map(|s| libc::iovec {
            iov_base: s.host_addr as *mut libc::c_void,
            iov_len: usize::try_from(s.len).unwrap_or(usize::MAX),
        })
        .collect();
    // SAFETY: forwarded from this function's contract; `iovecs` lives for the call (the kernel
    // copies the table).
    unsafe { ring.submitter().register_buffers(&iovecs) }
}
