// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The engine's side of a VMM: guest memory, dirty tracking and vCPU/device control.
//!
//! These traits are everything ferry's engine knows about a virtual machine. The KVM backend
//! (`ferry-kvm`) implements them for real KVM VMs; [`crate::procmem`] implements them for plain
//! process memory written by real threads (tests and benchmarks); a VMM implements them for its
//! own VM. Nothing here is KVM-specific.

use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

/// Boxed error a VMM reports from a trait method; the engine wraps it with the operation.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// How a region of guest RAM is backed. Post-copy placement depends on it: anonymous memory is
/// filled with `UFFDIO_COPY`, shared memory (memfd, hugetlbfs) can be filled through a second
/// (alias) mapping of the same file and then mapped in with `UFFDIO_CONTINUE`.
#[derive(Debug, Clone)]
pub enum Backing {
    /// Private anonymous memory (`MAP_PRIVATE | MAP_ANONYMOUS`).
    Anonymous,
    /// A shared mapping of a memfd (or any shmem file) at `offset`.
    Memfd {
        /// The file; shared so an alias mapping can be made.
        fd: Arc<OwnedFd>,
        /// Offset of the region's first byte in the file.
        offset: u64,
    },
    /// A shared mapping of a hugetlbfs file at `offset`.
    Hugetlbfs {
        /// The file.
        fd: Arc<OwnedFd>,
        /// Offset of the region's first byte in the file.
        offset: u64,
    },
}

impl Backing {
    /// The backing file descriptor and offset, if the memory is file-backed.
    pub fn file(&self) -> Option<(RawFd, u64)> {
        match self {
            Backing::Anonymous => None,
            Backing::Memfd { fd, offset } | Backing::Hugetlbfs { fd, offset } => {
                Some((fd.as_raw_fd(), *offset))
            }
        }
    }
}

/// One contiguous region of guest-physical memory and where the VMM mapped it.
#[derive(Clone)]
pub struct GuestRegion {
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes; a multiple of `page_size`.
    pub len: u64,
    /// Host virtual address of the first byte in this process.
    pub host_addr: usize,
    /// The backing of the mapping.
    pub backing: Backing,
    /// Page size of the backing (4 KiB, or the huge page size).
    pub page_size: u64,
}

impl fmt::Debug for GuestRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestRegion")
            .field("gpa", &format_args!("{:#x}", self.gpa))
            .field("len", &format_args!("{:#x}", self.len))
            .field("host_addr", &format_args!("{:#x}", self.host_addr))
            .field("backing", &self.backing)
            .field("page_size", &self.page_size)
            .finish()
    }
}

impl GuestRegion {
    /// Number of pages in the region.
    pub fn pages(&self) -> u64 {
        self.len / self.page_size
    }
}

/// Guest RAM as a list of regions. The regions' host mappings stay valid, at the same
/// addresses, for as long as the implementor lives.
///
/// # Safety
///
/// Implementors guarantee that every region's `host_addr .. host_addr + len` is a readable
/// and writable mapping owned by the implementor for its whole lifetime, and that the list
/// does not change while the engine holds the object. The engine reads and writes those
/// bytes through raw pointers (and the kernel does, for io_uring and RDMA).
pub unsafe trait GuestMemory: Send + Sync {
    /// The regions, sorted by `gpa`, not overlapping.
    fn regions(&self) -> &[GuestRegion];
}

/// Per-region dirty bitmaps: bit `i` of region `r` set means page `i` of region `r` was written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// One bitmap per region, in the order of [`GuestMemory::regions`], `ceil(pages / 64)` words.
    pub regions: Vec<Vec<u64>>,
}

/// The longest range [`DirtyBitmap::take_ranges`] makes, in bytes.
pub const MAX_DIRTY_RANGE: u64 = 1 << 30;

impl DirtyBitmap {
    /// An all-clear bitmap shaped for `regions`.
    pub fn for_regions(regions: &[GuestRegion]) -> Self {
        Self {
            regions: regions
                .iter()
                .map(|r| vec![0u64; usize::try_from(r.pages().div_ceil(64)).unwrap_or(usize::MAX)])
                .collect(),
        }
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        for words in &mut self.regions {
            words.fill(0);
        }
    }

    /// Appends the set bits as maximal runs of pages of `page_size` bytes (at most
    /// [`MAX_DIRTY_RANGE`] each) to `out`, region by region in the order of `regions`, and
    /// leaves the bitmap all clear: one pass, writing only the words that were set (the final
    /// dirty harvest of a large guest does this inside the blackout).
    pub fn take_ranges(
        &mut self,
        regions: &[GuestRegion],
        page_size: u64,
        out: &mut Vec<ferry_protocol::GpaRange>,
    ) {
        for (r, words) in regions.iter().zip(&mut self.regions) {
            ferry_protocol::memmap::take_bitmap_ranges(
                words,
                r.gpa,
                page_size,
                MAX_DIRTY_RANGE,
                out,
            );
        }
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|w| w.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }
}

/// Dirty-page tracking of guest memory.
pub trait DirtyTracker: Send {
    /// Starts tracking: from now on every guest write is recorded.
    fn start(&mut self) -> Result<(), BoxError>;
    /// ORs into `out` the pages written since `start` or the previous harvest, and forgets them.
    /// Must work while the vCPUs run and, cheaply, while they are paused (the final harvest is
    /// inside the blackout).
    fn harvest(&mut self, out: &mut DirtyBitmap) -> Result<(), BoxError>;
    /// The last harvest, inside the blackout with the vCPUs paused: ORs into `out` the pages
    /// written since the previous harvest. [`DirtyTracker::stop`] follows and nothing is
    /// harvested after it, so the pages need not be armed again (the KVM backend skips its
    /// re-protect, `KVM_CLEAR_DIRTY_LOG`). The default is [`DirtyTracker::harvest`].
    fn harvest_final(&mut self, out: &mut DirtyBitmap) -> Result<(), BoxError> {
        self.harvest(out)
    }
    /// Stops tracking.
    fn stop(&mut self) -> Result<(), BoxError>;
}

/// vCPU and device lifecycle and state.
pub trait VmControl: Send {
    /// Stops every vCPU (all out of the run loop and parked) and returns when they are.
    fn pause(&mut self) -> Result<(), BoxError>;
    /// Saves vCPU and device state into an opaque, self-versioned blob. The VM is paused.
    fn save_state(&mut self) -> Result<Vec<u8>, BoxError>;
    /// Restores a blob made by `save_state` (on the destination, VM paused).
    fn restore_state(&mut self, blob: &[u8]) -> Result<(), BoxError>;
    /// Lets the vCPUs run again.
    fn resume(&mut self) -> Result<(), BoxError>;
    /// The destination's switchover has begun: `restore_state` and `resume` follow within
    /// about a millisecond. Get ready without blocking (the KVM backend has its vCPU threads
    /// poll instead of sleep, so the resume does not wait for them to wake). A hint: the
    /// default does nothing.
    fn prepare_restore(&mut self) {}
    /// Slows the guest down to `percent` of its speed (auto-converge); 100 = full speed.
    /// The default does nothing and says so by returning `false`.
    fn throttle(&mut self, percent: u8) -> Result<bool, BoxError> {
        let _ = percent;
        Ok(false)
    }
    /// Guest-physical addresses of the pages the vCPUs will touch first when they run again
    /// (their code, stack, page tables, data their registers point at), most urgent first.
    /// Called with the VM paused, after `save_state`. In post-copy the engine sends those
    /// pages inside the blackout, so the guest's first steps at the destination do not wait
    /// for one fault round trip after another. A hint: the default names none.
    fn first_touch_pages(&mut self) -> Vec<u64> {
        Vec::new()
    }
}
