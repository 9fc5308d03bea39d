// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The socket system calls the plain-socket backend needs on raw guest-memory pointers
//! (`sendmsg`/`recvmsg` with iovecs), plus a few socket and thread options. Every `unsafe` of the
//! socket path lives here; the io_uring FFI lives in `uring::sys`.
//!
//! Guest memory is never turned into `&[u8]`/`&mut [u8]`: the VMM's vCPUs may write it
//! concurrently, so the kernel is handed raw iovecs and copies the bytes itself.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// An iovec over memory the caller vouches for (see the `# Safety` sections below).
pub(crate) type IoVec = libc::iovec;

/// A reusable iovec list. It holds only addresses (no ownership) and is cleared after every
/// call that uses it.
#[derive(Debug, Default)]
pub(crate) struct IoVecs(pub(crate) Vec<IoVec>);

// SAFETY: the iovecs are plain address/length pairs used only by the thread that owns the
// stream during one call; moving the (cleared or stale) list to another thread dereferences
// nothing.
unsafe impl Send for IoVecs {}

/// Builds an iovec for `len` bytes at `addr`.
pub(crate) fn iovec(addr: usize, len: usize) -> IoVec {
    libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    }
}

/// `sendmsg(fd, iov, MSG_NOSIGNAL)`: returns the bytes sent.
///
/// # Safety
///
/// Every iovec must describe memory that is mapped and readable for the duration of the call.
pub(crate) unsafe fn sendmsg(fd: BorrowedFd<'_>, iov: &[IoVec]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr().cast_mut();
    msg.msg_iovlen = iov.len();
    // SAFETY: `msg` points at `iov`, which lives for the call; the caller guarantees the iovecs
    // reference readable memory. MSG_NOSIGNAL turns a dead peer into EPIPE instead of SIGPIPE.
    let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// `recvmsg(fd, iov, 0)`: returns the bytes received (0 at end of stream).
///
/// # Safety
///
/// Every iovec must describe memory that is mapped and writable for the duration of the call and
/// that no Rust reference aliases.
pub(crate) unsafe fn recvmsg(fd: BorrowedFd<'_>, iov: &[IoVec]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr().cast_mut();
    msg.msg_iovlen = iov.len();
    // SAFETY: `msg` points at `iov`, which lives for the call; the caller guarantees the iovecs
    // reference writable, unaliased memory.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, 0) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Waits up to `timeout` for `fd` to become readable; `Ok(false)` on timeout.
pub(crate) fn poll_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let ts = Timespec {
        tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    loop {
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sets `SO_BUSY_POLL` on a socket.
pub(crate) fn set_busy_poll(fd: BorrowedFd<'_>, micros: u32) -> io::Result<()> {
    let val = libc::c_int::try_from(micros).unwrap_or(libc::c_int::MAX);
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: `val` is a c_int that lives for the call and `len` is its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BUSY_POLL,
            (&raw const val).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets the calling thread's nice value (negative = more CPU share; needs `CAP_SYS_NICE`).
pub(crate) fn set_thread_nice(nice: i32) -> io::Result<()> {
    let tid = rustix::thread::gettid();
    rustix::process::setpriority_process(Some(tid), nice).map_err(io::Error::from)
}

/// Switches the calling thread to `SCHED_FIFO` at `priority` (1..=99; needs `CAP_SYS_NICE`).
pub(crate) fn set_thread_fifo(priority: i32) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is a valid sched_param for the call; pid 0 means the calling thread.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
