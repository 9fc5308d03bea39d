// SPDX-License-Identifier: Apache-2.0 OR MIT
//! ferry's own thin userfaultfd wrapper: creation, API handshake, registration, page placement
//! (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`, `UFFDIO_CONTINUE`), write protection, wake-ups and events.
//!
//! It owns the system-call layer of post-copy and nothing more: which page to place when, and
//! where its bytes come from, is the engine's business. All of ferry's userfaultfd `unsafe` lives
//! here, each block with its invariant. The uapi structures and ioctl numbers come from
//! `linux-raw-sys` (pregenerated, no bindgen); the few constants it lacks are defined below with
//! their kernel header names.
//!
//! Why not the `userfaultfd` crate: it needs libclang at build time, reports `EAGAIN` with no
//! progress as `PartiallyCopied(usize::MAX - 10)` and `EEXIST` as a generic failure, and
//! defaults to `user_mode_only = true`, which hides every fault the kernel itself takes (KVM
//! touching guest memory, io_uring or RDMA writing into it).
//!
//! # Kernel semantics this module relies on (fs/userfaultfd.c, mm/userfaultfd.c)
//!
//! * `UFFDIO_COPY`/`ZEROPAGE`/`CONTINUE` store the number of bytes placed, or `-errno` when
//!   none were, in the struct's result field. The ioctl fails with the first page's errno when
//!   nothing was placed (`EEXIST`: already present, `EAGAIN`: the mapping is changing, e.g. an
//!   unread `UFFD_EVENT_REMOVE`), and with `EAGAIN` when only a prefix was placed (whatever
//!   stopped it). [`Fill`] keeps those cases apart.
//! * The API handshake can be done once per descriptor, and the kernel rejects requested
//!   features it lacks; so [`Uffd::open`] first asks a throw-away descriptor what the kernel
//!   supports and then requests the intersection.
//! * With `EVENT_REMOVE`/`EVENT_UNMAP`/`EVENT_REMAP` enabled, the thread doing `madvise`,
//!   `munmap` or `mremap` on a registered range blocks until the event has been *read*. Unregister
//!   (or close the descriptor) before unmapping memory nobody is reading events for.

use std::fmt;
use std::io;
use std::ops::BitOr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use linux_raw_sys::general as uapi;
use linux_raw_sys::ioctl as nr;
use rustix::event::{PollFd, PollFlags};

/// `USERFAULTFD_IOC_NEW` = `_IO(USERFAULTFD_IOC, 0x00)` (include/uapi/linux/userfaultfd.h);
/// not in linux-raw-sys 0.12.
const USERFAULTFD_IOC_NEW: u32 = uapi::USERFAULTFD_IOC << 8;
/// `UFFDIO_WRITEPROTECT_MODE_WP`.
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT_MODE_DONTWAKE`.
const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
/// `UFFDIO_CONTINUE_MODE_DONTWAKE`.
const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_CONTINUE_MODE_WP` (Linux 6.3+).
const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;
/// `UFFD_USER_MODE_ONLY` as an open flag (the value is 1).
#[allow(clippy::cast_possible_wrap)]
const USER_MODE_ONLY: libc::c_int = uapi::UFFD_USER_MODE_ONLY as libc::c_int;
const _: () = assert!(USER_MODE_ONLY == 1);
/// Size of one `struct uffd_msg` on the wire of `read(2)`.
const MSG_SIZE: usize = 32;
/// Messages read per `read(2)` at most.
const MAX_BATCH: usize = 64;

const _: () = assert!(std::mem::size_of::<uapi::uffd_msg>() == MSG_SIZE);

/// Page size the alignment checks use (userfaultfd works on base pages unless the range is
/// hugetlbfs, where the kernel checks the huge-page alignment itself).
const BASE_PAGE: u64 = 4096;

/// A set of `UFFD_FEATURE_*` bits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Features(u64);

impl Features {
    /// No features.
    pub const NONE: Self = Self(0);
    /// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`: write-protect faults (anonymous memory).
    pub const PAGEFAULT_FLAG_WP: Self = Self(uapi::UFFD_FEATURE_PAGEFAULT_FLAG_WP as u64);
    /// `UFFD_FEATURE_EVENT_FORK`.
    pub const EVENT_FORK: Self = Self(uapi::UFFD_FEATURE_EVENT_FORK as u64);
    /// `UFFD_FEATURE_EVENT_REMAP`: `mremap` of a registered range is reported.
    pub const EVENT_REMAP: Self = Self(uapi::UFFD_FEATURE_EVENT_REMAP as u64);
    /// `UFFD_FEATURE_EVENT_REMOVE`: `MADV_DONTNEED`/`MADV_REMOVE` (e.g. a balloon) is reported.
    pub const EVENT_REMOVE: Self = Self(uapi::UFFD_FEATURE_EVENT_REMOVE as u64);
    /// `UFFD_FEATURE_MISSING_HUGETLBFS`.
    pub const MISSING_HUGETLBFS: Self = Self(uapi::UFFD_FEATURE_MISSING_HUGETLBFS as u64);
    /// `UFFD_FEATURE_MISSING_SHMEM`.
    pub const MISSING_SHMEM: Self = Self(uapi::UFFD_FEATURE_MISSING_SHMEM as u64);
    /// `UFFD_FEATURE_EVENT_UNMAP`: `munmap` of a registered range is reported.
    pub const EVENT_UNMAP: Self = Self(uapi::UFFD_FEATURE_EVENT_UNMAP as u64);
    /// `UFFD_FEATURE_SIGBUS`: faults raise SIGBUS instead of being reported.
    pub const SIGBUS: Self = Self(uapi::UFFD_FEATURE_SIGBUS as u64);
    /// `UFFD_FEATURE_THREAD_ID`: page-fault events carry the faulting thread's id.
    pub const THREAD_ID: Self = Self(uapi::UFFD_FEATURE_THREAD_ID as u64);
    /// `UFFD_FEATURE_MINOR_HUGETLBFS`.
    pub const MINOR_HUGETLBFS: Self = Self(uapi::UFFD_FEATURE_MINOR_HUGETLBFS as u64);
    /// `UFFD_FEATURE_MINOR_SHMEM`.
    pub const MINOR_SHMEM: Self = Self(uapi::UFFD_FEATURE_MINOR_SHMEM as u64);
    /// `UFFD_FEATURE_EXACT_ADDRESS`: fault addresses are not rounded down to the page.
    pub const EXACT_ADDRESS: Self = Self(uapi::UFFD_FEATURE_EXACT_ADDRESS as u64);
    /// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: write protection of shared memory.
    pub const WP_HUGETLBFS_SHMEM: Self = Self(uapi::UFFD_FEATURE_WP_HUGETLBFS_SHMEM as u64);
    /// `UFFD_FEATURE_WP_UNPOPULATED`: write protection also covers unpopulated pages.
    pub const WP_UNPOPULATED: Self = Self(uapi::UFFD_FEATURE_WP_UNPOPULATED as u64);
    /// `UFFD_FEATURE_POISON`.
    pub const POISON: Self = Self(uapi::UFFD_FEATURE_POISON as u64);
    /// `UFFD_FEATURE_WP_ASYNC`: the kernel resolves write-protect faults itself.
    pub const WP_ASYNC: Self = Self(uapi::UFFD_FEATURE_WP_ASYNC as u64);
    /// `UFFD_FEATURE_MOVE`.
    pub const MOVE: Self = Self(uapi::UFFD_FEATURE_MOVE as u64);

    /// What a post-copy destination asks for: missing and minor faults on shared memory, write
    /// protection everywhere, removal/unmap events and thread ids.
    pub const POSTCOPY: Self = Self(
        Self::MISSING_SHMEM.0
            | Self::MINOR_SHMEM.0
            | Self::MINOR_HUGETLBFS.0
            | Self::MISSING_HUGETLBFS.0
            | Self::PAGEFAULT_FLAG_WP.0
            | Self::WP_HUGETLBFS_SHMEM.0
            | Self::EVENT_REMOVE.0
            | Self::EVENT_UNMAP.0
            | Self::THREAD_ID.0,
    );

    /// The raw bits.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Features from raw bits (unknown bits are kept).
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    /// Whether every feature of `other` is in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// The features in both sets.
    pub const fn intersection(self, other: Self) -> Self {
        Self(self.0 & other.0)
    }

    /// The features of `self` missing from `other`.
    pub const fn difference(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl BitOr for Features {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl fmt::Debug for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(Features, &str); 18] = [
            (Features::PAGEFAULT_FLAG_WP, "PAGEFAULT_FLAG_WP"),
            (Features::EVENT_FORK, "EVENT_FORK"),
            (Features::EVENT_REMAP, "EVENT_REMAP"),
            (Features::EVENT_REMOVE, "EVENT_REMOVE"),
            (Features::MISSING_HUGETLBFS, "MISSING_HUGETLBFS"),
            (Features::MISSING_SHMEM, "MISSING_SHMEM"),
            (Features::EVENT_UNMAP, "EVENT_UNMAP"),
            (Features::SIGBUS, "SIGBUS"),
            (Features::THREAD_ID, "THREAD_ID"),
            (Features::MINOR_HUGETLBFS, "MINOR_HUGETLBFS"),
            (Features::MINOR_SHMEM, "MINOR_SHMEM"),
            (Features::EXACT_ADDRESS, "EXACT_ADDRESS"),
            (Features::WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM"),
            (Features::WP_UNPOPULATED, "WP_UNPOPULATED"),
            (Features::POISON, "POISON"),
            (Features::WP_ASYNC, "WP_ASYNC"),
            (Features::MOVE, "MOVE"),
            (Features::NONE, ""),
        ];
        let mut list = f.debug_set();
        let mut rest = self.0;
        for (feat, name) in NAMES {
            if !feat.is_empty() && self.contains(feat) {
                list.entry(&format_args!("{name}"));
                rest &= !feat.0;
            }
        }
        if rest != 0 {
            list.entry(&format_args!("{rest:#x}"));
        }
        list.finish()
    }
}

/// Registration modes (`UFFDIO_REGISTER_MODE_*`), combinable with `|`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegisterMode(u64);

impl RegisterMode {
    /// Faults on pages that are not present (anonymous: never touched or discarded; shmem:
    /// not in the page cache).
    pub const MISSING: Self = Self(uapi::UFFDIO_REGISTER_MODE_MISSING as u64);
    /// Faults on writes to write-protected pages.
    pub const WP: Self = Self(uapi::UFFDIO_REGISTER_MODE_WP as u64);
    /// Faults on pages present in the page cache but not mapped here (shmem, hugetlbfs).
    pub const MINOR: Self = Self(uapi::UFFDIO_REGISTER_MODE_MINOR as u64);

    /// The raw bits.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Whether every mode of `other` is in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl BitOr for RegisterMode {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl fmt::Debug for RegisterMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_set();
        for (mode, name) in [
            (Self::MISSING, "MISSING"),
            (Self::WP, "WP"),
            (Self::MINOR, "MINOR"),
        ] {
            if self.contains(mode) {
                list.entry(&format_args!("{name}"));
            }
        }
        list.finish()
    }
}

/// The ioctls the kernel allows on a registered range (the `ioctls` field of
/// `UFFDIO_REGISTER`), or on the descriptor (`UFFDIO_API`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Ioctls(u64);

impl Ioctls {
    /// The raw bitmask (`1 << _UFFDIO_*`).
    pub const fn bits(self) -> u64 {
        self.0
    }
    const fn has(self, n: u32) -> bool {
        self.0 & (1u64 << n) != 0
    }
    /// `UFFDIO_COPY` is allowed.
    pub const fn copy(self) -> bool {
        self.has(uapi::_UFFDIO_COPY)
    }
    /// `UFFDIO_ZEROPAGE` is allowed.
    pub const fn zeropage(self) -> bool {
        self.has(uapi::_UFFDIO_ZEROPAGE)
    }
    /// `UFFDIO_CONTINUE` is allowed.
    pub const fn continue_(self) -> bool {
        self.has(uapi::_UFFDIO_CONTINUE)
    }
    /// `UFFDIO_WRITEPROTECT` is allowed.
    pub const fn writeprotect(self) -> bool {
        self.has(uapi::_UFFDIO_WRITEPROTECT)
    }
    /// `UFFDIO_WAKE` is allowed.
    pub const fn wake(self) -> bool {
        self.has(uapi::_UFFDIO_WAKE)
    }
    /// `UFFDIO_MOVE` is allowed.
    pub const fn move_(self) -> bool {
        self.has(uapi::_UFFDIO_MOVE)
    }
    /// `UFFDIO_POISON` is allowed.
    pub const fn poison(self) -> bool {
        self.has(uapi::_UFFDIO_POISON)
    }
}

impl fmt::Debug for Ioctls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_set();
        for (on, name) in [
            (self.copy(), "COPY"),
            (self.zeropage(), "ZEROPAGE"),
            (self.continue_(), "CONTINUE"),
            (self.writeprotect(), "WRITEPROTECT"),
            (self.wake(), "WAKE"),
            (self.move_(), "MOVE"),
            (self.poison(), "POISON"),
        ] {
            if on {
                list.entry(&format_args!("{name}"));
            }
        }
        list.finish()
    }
}

/// Options of a placing ioctl (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`, `UFFDIO_CONTINUE`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlaceMode {
    /// Do not wake the threads waiting on the range (`*_MODE_DONTWAKE`); wake them later with
    /// [`Uffd::wake`], e.g. once for a batch of pages.
    pub dont_wake: bool,
    /// Map the placed pages write-protected (`*_MODE_WP`; copy and continue only).
    pub write_protect: bool,
}

impl PlaceMode {
    /// Wake the waiters, no write protection.
    pub const WAKE: Self = Self {
        dont_wake: false,
        write_protect: false,
    };
    /// Do not wake the waiters.
    pub const DONT_WAKE: Self = Self {
        dont_wake: true,
        write_protect: false,
    };
}

/// What a placing ioctl did. `EEXIST` and `EAGAIN` are normal outcomes in post-copy, not errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// The whole range was placed (and the waiters woken unless `dont_wake`).
    Done,
    /// Only the first `bytes` were placed (the kernel stopped early and said `EAGAIN`; the rest
    /// may be present already or the mapping may be changing). Retry from `start + bytes`.
    Partial {
        /// Bytes placed, a multiple of the page size, less than the length asked for.
        bytes: u64,
    },
    /// `EEXIST`: the first page is already present (the page was pushed and demand-faulted at
    /// once, or placed by an earlier call); nothing was placed.
    Exists,
    /// `EAGAIN` with no progress: the mapping is changing (an unread remove/unmap/remap event,
    /// or a concurrent `mremap`/`munmap`). Read the pending events, then retry.
    Again,
}

/// What [`Uffd::copy_all`] or [`Uffd::continue_all`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlaceSummary {
    /// Bytes placed by this call.
    pub placed: u64,
    /// Bytes skipped because their pages were already present.
    pub existing: u64,
    /// Offset (from the start of the range) where the kernel said `EAGAIN` without progress;
    /// `None` when the whole range was handled.
    pub again_at: Option<u64>,
}

/// Drives a placing ioctl over `len` bytes: `op(offset)` places from `offset` to the end.
fn place_all(
    len: u64,
    mut op: impl FnMut(u64) -> Result<Fill, UffdOpError>,
) -> Result<PlaceSummary, UffdOpError> {
    let mut sum = PlaceSummary::default();
    let mut off = 0;
    while off < len {
        match op(off)? {
            Fill::Done => {
                sum.placed += len - off;
                off = len;
            }
            Fill::Partial { bytes } => {
                sum.placed += bytes;
                off += bytes;
            }
            Fill::Exists => {
                sum.existing += BASE_PAGE;
                off += BASE_PAGE;
            }
            Fill::Again => {
                sum.again_at = Some(off);
                break;
            }
        }
    }
    Ok(sum)
}

/// The operation a [`UffdOpError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdOp {
    /// `UFFDIO_REGISTER`.
    Register,
    /// `UFFDIO_UNREGISTER`.
    Unregister,
    /// `UFFDIO_COPY`.
    Copy,
    /// `UFFDIO_ZEROPAGE`.
    ZeroPage,
    /// `UFFDIO_CONTINUE`.
    Continue,
    /// `UFFDIO_WRITEPROTECT`.
    WriteProtect,
    /// `UFFDIO_WAKE`.
    Wake,
}

impl fmt::Display for UffdOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UffdOp::Register => "Register",
            UffdOp::Unregister => "Unregister",
            UffdOp::Copy => "Copy",
            UffdOp::ZeroPage => "Zeropage",
            UffdOp::Continue => "Continue",
            UffdOp::WriteProtect => "Write-protect",
            UffdOp::Wake => "Wake",
        })
    }
}

/// Creating a userfaultfd failed.
#[derive(Debug, thiserror::Error)]
pub enum UffdOpenError {
    /// Neither `/dev/userfaultfd` nor the `userfaultfd(2)` system call gave a descriptor.
    #[error(
        "Cannot create a userfaultfd (user_mode_only={user_mode_only}; /dev/userfaultfd: {device})"
    )]
    Create {
        /// Whether `UFFD_USER_MODE_ONLY` was asked for.
        user_mode_only: bool,
        /// Why opening or using `/dev/userfaultfd` failed.
        device: io::Error,
        /// Why the system call failed.
        #[source]
        syscall: io::Error,
    },
    /// The `UFFDIO_API` handshake failed.
    #[error("UFFDIO_API handshake with features {features:?} failed")]
    Api {
        /// The features requested.
        features: Features,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
}

/// A range operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UffdOpError {
    /// The range is empty or not page-aligned.
    #[error("{op} of {start:#x}+{len:#x}: range not page-aligned or empty")]
    Unaligned {
        /// The operation.
        op: UffdOp,
        /// Start address.
        start: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The copy source is shorter than the destination range.
    #[error("Copy to {start:#x}+{len:#x}: source has only {src_len:#x} bytes")]
    ShortSource {
        /// Destination start.
        start: u64,
        /// Destination length.
        len: u64,
        /// Source length.
        src_len: usize,
    },
    /// The kernel refused.
    #[error("{op} of {start:#x}+{len:#x} failed")]
    Failed {
        /// The operation.
        op: UffdOp,
        /// Start address.
        start: u64,
        /// Length in bytes.
        len: u64,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

/// Reading or waiting for events failed.
#[derive(Debug, thiserror::Error)]
pub enum UffdReadError {
    /// `read(2)` on the descriptor failed.
    #[error("Reading userfaultfd events failed")]
    Read(#[source] io::Error),
    /// `poll(2)` on the descriptor failed.
    #[error("Polling the userfaultfd failed")]
    Poll(#[source] io::Error),
    /// The kernel returned a partial message.
    #[error("Short userfaultfd read: {0} bytes")]
    Short(usize),
}

/// Flags of a page-fault event (`UFFD_PAGEFAULT_FLAG_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultFlags {
    /// The access was a write.
    pub write: bool,
    /// A write-protect fault (the page is present but protected).
    pub wp: bool,
    /// A minor fault (the page is in the page cache but not mapped here).
    pub minor: bool,
}

/// One event read from the descriptor.
#[derive(Debug)]
pub enum Event {
    /// A thread faulted on a registered page; it sleeps until the page is placed, unprotected or
    /// the range is woken.
    PageFault {
        /// Faulting address (rounded down to the page unless `EXACT_ADDRESS`).
        addr: u64,
        /// What kind of fault.
        flags: FaultFlags,
        /// The faulting thread, when `THREAD_ID` is enabled.
        thread_id: Option<u32>,
    },
    /// `MADV_DONTNEED`/`MADV_REMOVE` dropped `start..end`: those pages read as missing again.
    Remove {
        /// Start address.
        start: u64,
        /// End address (exclusive).
        end: u64,
    },
    /// `munmap` removed `start..end` from the registration.
    Unmap {
        /// Start address.
        start: u64,
        /// End address (exclusive).
        end: u64,
    },
    /// `mremap` moved a registered range.
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The process forked; the child's userfaultfd.
    Fork {
        /// The new descriptor (now owned by the reader).
        uffd: OwnedFd,
    },
    /// An event type this module does not know.
    Unknown {
        /// The `event` byte.
        kind: u8,
    },
}

/// A userfaultfd descriptor after the API handshake.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: Features,
    ioctls: Ioctls,
}

/// Opens a fresh, not yet handshaken userfaultfd: `/dev/userfaultfd` first (works for any user
/// with access to the device), then the system call (needs `vm.unprivileged_userfaultfd=1` or
/// `CAP_SYS_PTRACE` unless `user_mode_only`).
fn create_fd(user_mode_only: bool) -> Result<OwnedFd, UffdOpenError> {
    let mut flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    if user_mode_only {
        flags |= USER_MODE_ONLY;
    }
    let device = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        Ok(dev) => {
            // SAFETY: USERFAULTFD_IOC_NEW takes its flags as the integer argument and reads no
            // memory; `dev` is an open descriptor of the userfaultfd device.
            let ret = unsafe {
                libc::ioctl(
                    dev.as_raw_fd(),
                    libc::c_ulong::from(USERFAULTFD_IOC_NEW),
                    flags,
                )
            };
            if ret >= 0 {
                // SAFETY: the ioctl returned a new descriptor that nothing else owns.
                return Ok(unsafe { OwnedFd::from_raw_fd(ret) });
            }
            io::Error::last_os_error()
        }
        Err(e) => e,
    };
    // SAFETY: userfaultfd(2) takes only the flags and returns a new descriptor or -1.
    let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if ret < 0 {
        return Err(UffdOpenError::Create {
            user_mode_only,
            device,
            syscall: io::Error::last_os_error(),
        });
    }
    let raw = RawFd::try_from(ret).map_err(|_| UffdOpenError::Create {
        user_mode_only,
        device: io::Error::from(io::ErrorKind::InvalidData),
        syscall: io::Error::from(io::ErrorKind::InvalidData),
    })?;
    // SAFETY: the system call returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// `UFFDIO_API` on `fd` requesting `features`; returns (all features the kernel supports,
/// ioctls allowed on the descriptor).
fn api(fd: BorrowedFd<'_>, features: Features) -> Result<(Features, Ioctls), UffdOpenError> {
    let mut api = uapi::uffdio_api {
        api: u64::from(uapi::UFFD_API),
        features: features.bits(),
        ioctls: 0,
    };
    // SAFETY: `api` is a valid, correctly sized `struct uffdio_api` that the kernel reads and
    // writes for the duration of the call only.
    let ret = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::c_ulong::from(nr::UFFDIO_API),
            &raw mut api,
        )
    };
    if ret < 0 {
        return Err(UffdOpenError::Api {
            features,
            source: io::Error::last_os_error(),
        });
    }
    Ok((Features(api.features), Ioctls(api.ioctls)))
}

fn check_range(op: UffdOp, start: u64, len: u64) -> Result<(), UffdOpError> {
    if len == 0
        || !start.is_multiple_of(BASE_PAGE)
        || !len.is_multiple_of(BASE_PAGE)
        || start.checked_add(len).is_none()
    {
        return Err(UffdOpError::Unaligned { op, start, len });
    }
    Ok(())
}

/// Maps the result of a placing ioctl. `ret` is the ioctl's return value, `result` the
/// struct's result field, `len` the length asked for.
fn fill_outcome(
    op: UffdOp,
    start: u64,
    len: u64,
    ret: libc::c_int,
    result: i64,
) -> Result<Fill, UffdOpError> {
    if ret == 0 {
        return Ok(Fill::Done);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) if result > 0 => Ok(Fill::Partial {
            bytes: u64::try_from(result).unwrap_or(0),
        }),
        Some(libc::EAGAIN) => Ok(Fill::Again),
        Some(libc::EEXIST) => Ok(Fill::Exists),
        _ => Err(UffdOpError::Failed {
            op,
            start,
            len,
            source: err,
        }),
    }
}

impl Uffd {
    /// Creates a non-blocking, close-on-exec userfaultfd and performs the API handshake,
    /// enabling the features of `wanted` that the kernel supports ([`Uffd::features`] says
    /// which). `user_mode_only` must be `false` for memory the kernel touches on the guest's
    /// behalf (KVM guest memory, io_uring/RDMA targets): such faults are otherwise not reported
    /// and fail with `EFAULT`.
    pub fn open(user_mode_only: bool, wanted: Features) -> Result<Self, UffdOpenError> {
        // The handshake is once per descriptor and fails on unsupported features, so probe the
        // supported set on a throw-away descriptor first.
        let probe = create_fd(user_mode_only)?;
        let (supported, _) = api(probe.as_fd(), Features::NONE)?;
        drop(probe);
        let granted = wanted.intersection(supported);
        let fd = create_fd(user_mode_only)?;
        let (_, ioctls) = api(fd.as_fd(), granted)?;
        Ok(Self {
            fd,
            features: granted,
            ioctls,
        })
    }

    /// Wraps a descriptor on which the API handshake was already done (e.g. received from a
    /// VMM over a Unix socket), with the features it was enabled with.
    pub fn from_handshaken_fd(fd: OwnedFd, features: Features) -> Self {
        Self {
            fd,
            features,
            ioctls: Ioctls::default(),
        }
    }

    /// The features enabled on this descriptor.
    pub fn features(&self) -> Features {
        self.features
    }

    /// The ioctls the handshake allowed on the descriptor (empty for
    /// [`Uffd::from_handshaken_fd`]).
    pub fn api_ioctls(&self) -> Ioctls {
        self.ioctls
    }

    /// Registers `start..start+len` (page-aligned) in `mode`; returns the ioctls allowed on it.
    ///
    /// # Safety
    ///
    /// The range must be memory that the caller owns and manages as guest memory: no Rust
    /// reference may assume the contents of its pages, because through this registration safe
    /// code can fill missing pages (`copy`, `zeropage`, `continue`) and make writes block
    /// (`WP`). The kernel refuses the other operations on ranges not registered with this
    /// descriptor, which is what makes them safe.
    pub unsafe fn register(
        &self,
        start: u64,
        len: u64,
        mode: RegisterMode,
    ) -> Result<Ioctls, UffdOpError> {
        check_range(UffdOp::Register, start, len)?;
        let mut reg = uapi::uffdio_register {
            range: uapi::uffdio_range { start, len },
            mode: mode.bits(),
            ioctls: 0,
        };
        // SAFETY: `reg` is a valid `struct uffdio_register` borrowed for the call only; the
        // registration itself only changes how faults in the range are handled.
        let ret = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::c_ulong::from(nr::UFFDIO_REGISTER),
                &raw mut reg,
            )
        };
        if ret < 0 {
            return Err(UffdOpError::Failed {
                op: UffdOp::Register,
                start,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Ioctls(reg.ioctls))
    }

    /// Unregisters `start..start+len`; threads waiting on it are woken.
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), UffdOpError> {
        self.range_ioctl(UffdOp::Unregister, nr::UFFDIO_UNREGISTER, start, len)
    }

    /// Wakes the threads waiting on `start..start+len` (after `dont_wake` placements); they
    /// retry their access.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdOpError> {
        self.range_ioctl(UffdOp::Wake, nr::UFFDIO_WAKE, start, len)
    }

    fn range_ioctl(&self, op: UffdOp, req: u32, start: u64, len: u64) -> Result<(), UffdOpError> {
        check_range(op, start, len)?;
        let mut range = uapi::uffdio_range { start, len };
        // SAFETY: `range` is a valid `struct uffdio_range` borrowed for the call only;
        // UNREGISTER and WAKE do not touch the memory of the range.
        let ret = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::c_ulong::from(req),
                &raw mut range,
            )
        };
        if ret < 0 {
            return Err(UffdOpError::Failed {
                op,
                start,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// `UFFDIO_COPY`: atomically places `src[..len]` at the missing pages `dst..dst+len` of a
    /// range registered `MISSING` with this descriptor.
    pub fn copy(
        &self,
        dst: u64,
        src: &[u8],
        len: u64,
        mode: PlaceMode,
    ) -> Result<Fill, UffdOpError> {
        check_range(UffdOp::Copy, dst, len)?;
        let src_ok = usize::try_from(len).is_ok_and(|l| l <= src.len());
        if !src_ok {
            return Err(UffdOpError::ShortSource {
                start: dst,
                len,
                src_len: src.len(),
            });
        }
        let mut m = 0;
        if mode.dont_wake {
            m |= u64::from(uapi::UFFDIO_COPY_MODE_DONTWAKE);
        }
        if mode.write_protect {
            m |= u64::from(uapi::UFFDIO_COPY_MODE_WP);
        }
        let mut copy = uapi::uffdio_copy {
            dst,
            src: src.as_ptr() as u64,
            len,
            mode: m,
            copy: 0,
        };
        // SAFETY: `copy` is a valid `struct uffdio_copy` borrowed for the call; the kernel reads
        // `len` bytes from `src`, which the slice covers (checked above), and writes only pages
        // that are missing in a range registered with this descriptor (see `register`).
        let ret = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::c_ulong::from(nr::UFFDIO_COPY),
                &raw mut copy,
            )
        };
        fill_outcome(UffdOp::Copy, dst, len, ret, copy.copy)
    }

    /// `UFFDIO_ZEROPAGE`: maps zero pages at the missing pages `start..start+len` of a range
    /// registered `MISSING` with this descriptor (`write_protect` is ignored).
    pub fn zeropage(&self, start: u64, len: u64, mode: PlaceMode) -> Result<Fill, UffdOpError> {
        check_range(UffdOp::ZeroPage, start, len)?;
        let mut zp = uapi::uffdio_zeropage {
            range: uapi::uffdio_range { start, len },
            mode: if mode.dont_wake {
                u64::from(uapi::UFFDIO_ZEROPAGE_MODE_DONTWAKE)
            } else {
                0
            },
            zeropage: 0,
        };
        // SAFETY: `zp` is a valid `struct uffdio_zeropage` borrowed for the call; the kernel
        // only maps zero pages where pages are missing in a range registered with this
        // descriptor.
        let ret = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::c_ulong::from(nr::UFFDIO_ZEROPAGE),
                &raw mut zp,
            )
        };
        fill_outcome(UffdOp::ZeroPage, start, len, ret, zp.zeropage)
    }

    /// `UFFDIO_CONTINUE`: maps the page-cache pages of `start..start+len` into a range
    /// registered `MINOR` with this descriptor (fill the page cache first, e.g. through an
    /// alias mapping). Fails with `EFAULT` if a page is not in the page cache.
    pub fn continue_(&self, start: u64, len: u64, mode: PlaceMode) -> Result<Fill, UffdOpError> {
        check_range(UffdOp::Continue, start, len)?;
        let mut m = 0;
        if mode.dont_wake {
            m |= UFFDIO_CONTINUE_MODE_DONTWAKE;
        }
        if mode.write_protect {
            m |= UFFDIO_CONTINUE_MODE_WP;
        }
        let mut cont = uapi::uffdio_continue {
            range: uapi::uffdio_range { start, len },
            mode: m,
            mapped: 0,
        };
        // SAFETY: `cont` is a valid `struct uffdio_continue` borrowed for the call; the kernel
        // only maps existing page-cache pages into a range registered with this descriptor.
        let ret = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::c_ulong::from(nr::UFFDIO_CONTINUE),
                &raw mut cont,
            )
        };
        fill_outcome(UffdOp::Continue, start, len, ret, cont.mapped)
    }

    /// Places all of `dst..dst+len` from `src` with `UFFDIO_COPY`, skipping pages that are
    /// already present (`EEXIST`, e.g. demand-faulted while a background push was on its way)
    /// and continuing after partial progress. Stops at `EAGAIN` with no progress (the mapping is
    /// changing: read the events, then call again from [`PlaceSummary::again_at`]).
    pub fn copy_all(
        &self,
        dst: u64,
        src: &[u8],
        len: u64,
        mode: PlaceMode,
    ) -> Result<PlaceSummary, UffdOpError> {
        check_range(UffdOp::Copy, dst, len)?;
        if usize::try_from(len).map_or(true, |l| l > src.len()) {
            return Err(UffdOpError::ShortSource {
                start: dst,
                len,
                src_len: src.len(),
            });
        }
        place_all(len, |off| {
            let from = usize::try_from(off).unwrap_or(usize::MAX);
            self.copy(dst + off, src.get(from..).unwrap_or(&[]), len - off, mode)
        })
    }

    /// Maps all of `start..start+len` with `UFFDIO_CONTINUE`, skipping pages already mapped and
    /// continuing after partial progress; stops at `EAGAIN` with no progress (see
    /// [`Uffd::copy_all`]).
    pub fn continue_all(
        &self,
        start: u64,
        len: u64,
        mode: PlaceMode,
    ) -> Result<PlaceSummary, UffdOpError> {
        check_range(UffdOp::Continue, start, len)?;
        place_all(len, |off| self.continue_(start + off, len - off, mode))
    }

    /// `UFFDIO_WRITEPROTECT`: write-protects (`protect`) or unprotects `start..start+len` of a
    /// range registered `WP`. Unprotecting wakes the waiting writers unless `dont_wake`
    /// (ignored when protecting).
    /// Protecting unpopulated anonymous pages has no effect unless `WP_UNPOPULATED` is enabled.
    pub fn writeprotect(
        &self,
        start: u64,
        len: u64,
        protect: bool,
        dont_wake: bool,
    ) -> Result<(), UffdOpError> {
        check_range(UffdOp::WriteProtect, start, len)?;
        let mut mode = 0;
        if protect {
            mode |= UFFDIO_WRITEPROTECT_MODE_WP;
        }
        // The kernel rejects DONTWAKE together with WP (protecting wakes nobody anyway).
        if dont_wake && !protect {
            mode |= UFFDIO_WRITEPROTECT_MODE_DONTWAKE;
        }
        let mut wp = uapi::uffdio_writeprotect {
            range: uapi::uffdio_range { start, len },
            mode,
        };
        // SAFETY: `wp` is a valid `struct uffdio_writeprotect` borrowed for the call; it only
        // changes page protection inside a range registered with this descriptor.
        let ret = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::c_ulong::from(nr::UFFDIO_WRITEPROTECT),
                &raw mut wp,
            )
        };
        if ret < 0 {
            return Err(UffdOpError::Failed {
                op: UffdOp::WriteProtect,
                start,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Waits until events are readable or `timeout` passes (`None`: forever). Returns whether
    /// the descriptor is readable; an interrupted wait returns `false`.
    pub fn poll(&self, timeout: Option<Duration>) -> Result<bool, UffdReadError> {
        let ts = timeout.map(|t| rustix::time::Timespec {
            tv_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(t.subsec_nanos()),
        });
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        match rustix::event::poll(&mut fds, ts.as_ref()) {
            Ok(n) => Ok(n > 0 && fds[0].revents().contains(PollFlags::IN)),
            Err(rustix::io::Errno::INTR) => Ok(false),
            Err(e) => Err(UffdReadError::Poll(e.into())),
        }
    }

    /// Reads up to `max` (at most 64) pending events without blocking, appending them to
    /// `out`; returns how many were read (0 when none are pending).
    pub fn read_events(&self, out: &mut Vec<Event>, max: usize) -> Result<usize, UffdReadError> {
        let mut buf = [0u8; MSG_SIZE * MAX_BATCH];
        let want = max.clamp(1, MAX_BATCH) * MSG_SIZE;
        let n = loop {
            match rustix::io::read(&self.fd, &mut buf[..want]) {
                Ok(n) => break n,
                Err(rustix::io::Errno::AGAIN) => return Ok(0),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(UffdReadError::Read(e.into())),
            }
        };
        if !n.is_multiple_of(MSG_SIZE) {
            return Err(UffdReadError::Short(n));
        }
        let thread_ids = self.features.contains(Features::THREAD_ID);
        for msg in buf[..n].chunks_exact(MSG_SIZE) {
            out.push(parse_msg(msg, thread_ids));
        }
        Ok(n / MSG_SIZE)
    }
}

fn u64_at(msg: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&msg[off..off + 8]);
    u64::from_ne_bytes(b)
}

fn u32_at(msg: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&msg[off..off + 4]);
    u32::from_ne_bytes(b)
}

/// Decodes one `struct uffd_msg` (packed: event u8 at 0, the argument union at 8).
fn parse_msg(msg: &[u8], thread_ids: bool) -> Event {
    let kind = msg[0];
    match u32::from(kind) {
        uapi::UFFD_EVENT_PAGEFAULT => {
            let flags = u64_at(msg, 8);
            Event::PageFault {
                addr: u64_at(msg, 16),
                flags: FaultFlags {
                    write: flags & u64::from(uapi::UFFD_PAGEFAULT_FLAG_WRITE) != 0,
                    wp: flags & u64::from(uapi::UFFD_PAGEFAULT_FLAG_WP) != 0,
                    minor: flags & u64::from(uapi::UFFD_PAGEFAULT_FLAG_MINOR) != 0,
                },
                thread_id: thread_ids.then(|| u32_at(msg, 24)),
            }
        }
        uapi::UFFD_EVENT_REMOVE => Event::Remove {
            start: u64_at(msg, 8),
            end: u64_at(msg, 16),
        },
        uapi::UFFD_EVENT_UNMAP => Event::Unmap {
            start: u64_at(msg, 8),
            end: u64_at(msg, 16),
        },
        uapi::UFFD_EVENT_REMAP => Event::Remap {
            from: u64_at(msg, 8),
            to: u64_at(msg, 16),
            len: u64_at(msg, 24),
        },
        uapi::UFFD_EVENT_FORK => match RawFd::try_from(u32_at(msg, 8)) {
            Ok(raw) => Event::Fork {
                // SAFETY: for a fork event the kernel installed a new descriptor in our table
                // and hands its ownership to the reader of the message.
                uffd: unsafe { OwnedFd::from_raw_fd(raw) },
            },
            Err(_) => Event::Unknown { kind },
        },
        _ => Event::Unknown { kind },
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// How [`probe_fault_latency`] creates and resolves its faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeMode {
    /// Anonymous memory registered `MISSING`, resolved with `UFFDIO_COPY` of a 4 KiB page.
    MissingCopy,
    /// A memfd whose page cache is filled beforehand through an alias mapping, registered
    /// `MINOR`, resolved with `UFFDIO_CONTINUE`.
    MinorContinue,
}

/// [`probe_fault_latency`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No userfaultfd.
    #[error("Cannot open a userfaultfd for the fault probe")]
    Open(#[source] UffdOpenError),
    /// Allocating the probe memory failed.
    #[error("Allocating fault-probe memory failed")]
    Memory(#[source] crate::memory::MemError),
    /// A userfaultfd operation failed.
    #[error("Fault-probe userfaultfd operation failed")]
    Op(#[source] UffdOpError),
    /// Reading the faults failed.
    #[error("Fault-probe handler failed")]
    Read(#[source] UffdReadError),
    /// The handler thread could not be spawned.
    #[error("Spawning the fault-probe handler failed")]
    Spawn(#[source] io::Error),
    /// The faults were not all resolved in time.
    #[error("Fault probe timed out after {resolved} of {samples} faults")]
    Timeout {
        /// Faults resolved.
        resolved: usize,
        /// Faults asked for.
        samples: usize,
    },
}

/// Measures what a locally resolved userfaultfd fault costs on this machine: the calling thread
/// touches `samples` missing pages one by one while a handler thread (blocking in `poll`)
/// resolves each; returns every touch's duration, unsorted. This is the unavoidable part of a
/// post-copy fault (the `fault_floor` of a benchmark, together with a network round trip). Uses
/// `samples` × 4 KiB of memory; gives up after 30 s.
pub fn probe_fault_latency(samples: usize, mode: ProbeMode) -> Result<Vec<Duration>, ProbeError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    use crate::memory::{MemOptions, MemRegion, PAGE_SIZE};

    let samples = samples.max(1);
    let len = PAGE_SIZE * samples as u64;
    let uffd = Uffd::open(false, Features::MINOR_SHMEM).map_err(ProbeError::Open)?;
    let (region, register) = match mode {
        ProbeMode::MissingCopy => (
            MemRegion::anonymous(len, MemOptions::default()).map_err(ProbeError::Memory)?,
            RegisterMode::MISSING,
        ),
        ProbeMode::MinorContinue => {
            let r = MemRegion::memfd("ferry-fault-probe", len, MemOptions::default())
                .map_err(ProbeError::Memory)?;
            let alias = r.alias().map_err(ProbeError::Memory)?;
            for p in 0..samples as u64 {
                alias
                    .write(p * PAGE_SIZE, &(p + 1).to_ne_bytes())
                    .map_err(ProbeError::Memory)?;
            }
            (r, RegisterMode::MINOR)
        }
    };
    let base = region.addr();
    // SAFETY: the probe's own fresh mapping; only the probe touches it, as raw memory.
    unsafe { uffd.register(base, len, register) }.map_err(ProbeError::Op)?;
    let done = AtomicBool::new(false);
    let src = vec![0x5Au8; 4096];
    let deadline = Instant::now() + Duration::from_secs(30);
    std::thread::scope(|s| {
        let handler = std::thread::Builder::new()
            .name("ferry-fault-probe".into())
            .spawn_scoped(s, || -> Result<(), ProbeError> {
                let mut events = Vec::new();
                let result = loop {
                    if done.load(Ordering::Acquire) {
                        break Ok(());
                    }
                    if Instant::now() >= deadline {
                        break Err(ProbeError::Timeout {
                            resolved: 0,
                            samples,
                        });
                    }
                    match uffd.poll(Some(Duration::from_millis(20))) {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(e) => break Err(ProbeError::Read(e)),
                    }
                    events.clear();
                    if let Err(e) = uffd.read_events(&mut events, MAX_BATCH) {
                        break Err(ProbeError::Read(e));
                    }
                    let mut failed = None;
                    for ev in &events {
                        if let Event::PageFault { addr, .. } = ev {
                            let pa = addr & !(PAGE_SIZE - 1);
                            let out = match mode {
                                ProbeMode::MissingCopy => {
                                    uffd.copy(pa, &src, PAGE_SIZE, PlaceMode::WAKE)
                                }
                                ProbeMode::MinorContinue => {
                                    uffd.continue_(pa, PAGE_SIZE, PlaceMode::WAKE)
                                }
                            };
                            if let Err(e) = out {
                                failed = Some(ProbeError::Op(e));
                            }
                        }
                    }
                    if let Some(e) = failed {
                        break Err(e);
                    }
                };
                if result.is_err() {
                    // Unregistering wakes the toucher, which then faults pages in normally.
                    let _ = uffd.unregister(base, len);
                }
                result
            })
            .map_err(ProbeError::Spawn)?;
        let mut lat = Vec::with_capacity(samples);
        for p in 0..samples as u64 {
            let t = Instant::now();
            let _ = region.load_u64(p * PAGE_SIZE);
            lat.push(t.elapsed());
        }
        done.store(true, Ordering::Release);
        match handler.join() {
            Ok(Ok(())) => {}
            Ok(Err(ProbeError::Timeout { samples, .. })) => {
                return Err(ProbeError::Timeout {
                    resolved: lat.len(),
                    samples,
                });
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(ProbeError::Timeout {
                    resolved: 0,
                    samples,
                });
            }
        }
        uffd.unregister(base, len).map_err(ProbeError::Op)?;
        Ok(lat)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_pagefault_message() {
        let mut msg = [0u8; MSG_SIZE];
        msg[0] = u8::try_from(uapi::UFFD_EVENT_PAGEFAULT).expect("fits");
        let flags = u64::from(uapi::UFFD_PAGEFAULT_FLAG_WRITE | uapi::UFFD_PAGEFAULT_FLAG_MINOR);
        msg[8..16].copy_from_slice(&flags.to_ne_bytes());
        msg[16..24].copy_from_slice(&0x7f00_1234_5000u64.to_ne_bytes());
        msg[24..28].copy_from_slice(&4242u32.to_ne_bytes());
        match parse_msg(&msg, true) {
            Event::PageFault {
                addr,
                flags,
                thread_id,
            } => {
                assert_eq!(addr, 0x7f00_1234_5000);
                assert!(flags.write && flags.minor && !flags.wp);
                assert_eq!(thread_id, Some(4242));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            parse_msg(&msg, false),
            Event::PageFault {
                thread_id: None,
                ..
            }
        ));
    }

    #[test]
    fn parse_remove_and_remap() {
        let mut msg = [0u8; MSG_SIZE];
        msg[0] = u8::try_from(uapi::UFFD_EVENT_REMOVE).expect("fits");
        msg[8..16].copy_from_slice(&0x1000u64.to_ne_bytes());
        msg[16..24].copy_from_slice(&0x3000u64.to_ne_bytes());
        assert!(matches!(
            parse_msg(&msg, false),
            Event::Remove {
                start: 0x1000,
                end: 0x3000
            }
        ));
        msg[0] = u8::try_from(uapi::UFFD_EVENT_REMAP).expect("fits");
        msg[24..32].copy_from_slice(&0x2000u64.to_ne_bytes());
        assert!(matches!(
            parse_msg(&msg, false),
            Event::Remap {
                from: 0x1000,
                to: 0x3000,
                len: 0x2000
            }
        ));
        msg[0] = 99;
        assert!(matches!(
            parse_msg(&msg, false),
            Event::Unknown { kind: 99 }
        ));
    }

    #[test]
    fn range_checks() {
        check_range(UffdOp::Copy, 0x1000, 0x1000).expect("aligned");
        assert!(matches!(
            check_range(UffdOp::Copy, 0x1001, 0x1000),
            Err(UffdOpError::Unaligned { .. })
        ));
        assert!(matches!(
            check_range(UffdOp::Copy, 0x1000, 0),
            Err(UffdOpError::Unaligned { .. })
        ));
        let msg = check_range(UffdOp::Wake, 0x1000, 0x10)
            .expect_err("unaligned")
            .to_string();
        assert_eq!(msg, "Wake of 0x1000+0x10: range not page-aligned or empty");
    }

    #[test]
    fn features_debug_and_sets() {
        let f = Features::MINOR_SHMEM | Features::THREAD_ID;
        assert!(f.contains(Features::THREAD_ID));
        assert!(!f.contains(Features::EVENT_REMOVE));
        assert_eq!(format!("{f:?}"), "{THREAD_ID, MINOR_SHMEM}");
        assert_eq!(f.difference(Features::THREAD_ID), Features::MINOR_SHMEM);
        let m = RegisterMode::MISSING | RegisterMode::MINOR;
        assert!(m.contains(RegisterMode::MINOR) && !m.contains(RegisterMode::WP));
    }

    #[test]
    fn ioc_new_number() {
        // _IO(0xAA, 0) from include/uapi/linux/userfaultfd.h.
        assert_eq!(USERFAULTFD_IOC_NEW, 0xAA00);
    }
}
