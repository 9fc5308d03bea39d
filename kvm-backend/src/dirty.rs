// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Dirty-page tracking of a [`crate::KvmVm`]: the KVM dirty bitmap (with manual protection and
//! chunked `KVM_CLEAR_DIRTY_LOG`) or the per-vCPU dirty ring, behind the engine's
//! [`DirtyTracker`].
//!
//! Choices and why:
//! - Bitmap mode enables `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with `MANUAL_PROTECT_ENABLE |
//!   INITIALLY_SET`. Without INITIALLY_SET, turning logging on write-protects the whole slot in
//!   one ioctl under the MMU lock (~10 ms/GiB here, all vCPUs stalled). With it, logging starts
//!   with every bit set and nothing protected; [`DirtyTracker::start`] then clears the log in
//!   128 MiB chunks, so protection is applied piecewise while the guest keeps running, and the
//!   first harvest reports only pages really written since `start`. A harvest is then
//!   `KVM_GET_DIRTY_LOG` (a bitmap copy, no re-protect: ~26 µs/GiB) plus `KVM_CLEAR_DIRTY_LOG`
//!   only over the 128 MiB chunks that have dirty bits.
//! - Ring mode (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`, else `KVM_CAP_DIRTY_LOG_RING`) must be chosen
//!   before vCPUs exist. A harvest walks each vCPU's ring, marks entries harvested and calls
//!   `KVM_RESET_DIRTY_RINGS`; cost is per dirty page, not per GiB. A vCPU whose ring fills
//!   exits with `KVM_EXIT_DIRTY_RING_FULL`; its own thread then harvests its ring into a shared
//!   atomic bitmap (`DirtyCore::overflow`) that the next harvest drains.
//! - Guest page-table pages get accessed/dirty-bit writes and show up as dirty like any page.
//!
//! Correctness of "harvest, then copy": a page is re-protected (CLEAR / RESET) before
//! `harvest` returns and the engine copies it after, so any write after the copy faults and is
//! logged again.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ferry_engine::vm::{BoxError, DirtyBitmap, DirtyTracker, GuestMemory};
use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;

use crate::sys::{self, DirtyRing};
use crate::vm::Core;

/// Which dirty-tracking mechanism a VM uses; fixed at creation (the ring must be enabled
/// before vCPUs are created).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyMode {
    /// Bitmap with manual protection if KVM has it, else the ring, else the classic bitmap.
    #[default]
    Auto,
    /// `KVM_GET_DIRTY_LOG` (+ `KVM_CLEAR_DIRTY_LOG` when manual protection is available).
    Bitmap,
    /// The per-vCPU dirty ring.
    Ring,
}

/// The mechanism actually in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActiveDirtyMode {
    /// Classic `KVM_GET_DIRTY_LOG` (fetch and re-protect in one ioctl).
    ClassicBitmap,
    /// Manual protection: `KVM_GET_DIRTY_LOG` + chunked `KVM_CLEAR_DIRTY_LOG`.
    ManualBitmap,
    /// Dirty ring of `bytes` bytes per vCPU.
    Ring {
        /// Ring size in bytes.
        bytes: u32,
    },
}

/// Pages per `KVM_CLEAR_DIRTY_LOG` call (128 MiB): bounds how long one call holds the MMU lock.
const CLEAR_CHUNK_PAGES: u64 = 32768;

/// Dirty-tracking state shared by the VM, its vCPU threads and the tracker.
#[derive(Debug)]
pub(crate) struct DirtyCore {
    /// The mechanism.
    pub(crate) mode: ActiveDirtyMode,
    /// One ring per vCPU (ring mode only).
    pub(crate) rings: Vec<Mutex<DirtyRing>>,
    /// Pages harvested from rings but not yet reported: one atomic bitmap per region.
    pub(crate) overflow: Vec<Vec<AtomicU64>>,
    /// Logging is on.
    pub(crate) logging: AtomicBool,
    /// Ring-full exits taken by vCPUs.
    pub(crate) ring_full_exits: AtomicU64,
}

impl DirtyCore {
    /// Harvests ring `i` into the overflow bitmap. Returns entries taken.
    pub(crate) fn drain_ring(&self, i: usize) -> u32 {
        let Some(ring) = self.rings.get(i) else {
            return 0;
        };
        let mut ring = ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.harvest(|slot, off| {
            if let Some(words) = self.overflow.get(slot as usize)
                && let Some(w) = words.get((off / 64) as usize)
            {
                w.fetch_or(1 << (off % 64), Ordering::Relaxed);
            }
        })
    }
}

/// Errors of the dirty tracker.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// Turning logging on or off for a slot failed.
    #[error("Cannot set dirty logging={on} on slot {slot}")]
    SetLogging {
        /// Slot id.
        slot: u32,
        /// Requested state.
        on: bool,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `KVM_GET_DIRTY_LOG` failed.
    #[error("KVM_GET_DIRTY_LOG on slot {slot} failed")]
    GetLog {
        /// Slot id.
        slot: u32,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `KVM_CLEAR_DIRTY_LOG` failed.
    #[error("KVM_CLEAR_DIRTY_LOG on slot {slot} pages {first}+{num} failed")]
    ClearLog {
        /// Slot id.
        slot: u32,
        /// First page.
        first: u64,
        /// Pages.
        num: u32,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `KVM_RESET_DIRTY_RINGS` failed.
    #[error("KVM_RESET_DIRTY_RINGS failed")]
    ResetRings(#[source] std::io::Error),
    /// The output bitmap has another shape than the VM's regions.
    #[error("Dirty bitmap has {got} regions, VM has {want}")]
    Shape {
        /// Regions in the bitmap.
        got: usize,
        /// Regions in the VM.
        want: usize,
    },
}

/// What the last harvest did and how long its parts took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HarvestStats {
    /// Dirty pages reported.
    pub pages: u64,
    /// Time fetching (`KVM_GET_DIRTY_LOG`, or walking the rings).
    pub fetch: std::time::Duration,
    /// Time re-protecting (`KVM_CLEAR_DIRTY_LOG` calls, or `KVM_RESET_DIRTY_RINGS`).
    pub protect: std::time::Duration,
    /// `KVM_CLEAR_DIRTY_LOG` calls made (bitmap mode).
    pub clear_calls: u32,
}

/// [`DirtyTracker`] for a [`crate::KvmVm`]; made by [`crate::KvmVm::dirty_tracker`].
#[derive(Debug)]
pub struct KvmDirtyTracker {
    core: std::sync::Arc<Core>,
    last: HarvestStats,
    /// One bitmap per region that `KVM_GET_DIRTY_LOG` writes into, allocated and written once
    /// here: a fresh buffer per harvest costs page faults (64 of them for 8 GiB, ~7 µs each
    /// here), and the final harvest is inside the blackout.
    scratch: Vec<Vec<u64>>,
}

impl KvmDirtyTracker {
    pub(crate) fn new(core: std::sync::Arc<Core>) -> Self {
        let scratch = core
            .memory
            .regions()
            .iter()
            .map(|r| vec![u64::MAX; usize::try_from(r.pages().div_ceil(64)).unwrap_or(0)])
            .collect();
        Self {
            core,
            last: HarvestStats::default(),
            scratch,
        }
    }

    /// Statistics of the last harvest.
    pub fn last_harvest(&self) -> HarvestStats {
        self.last
    }

    /// The mechanism in use.
    pub fn mode(&self) -> ActiveDirtyMode {
        self.core.dirty.mode
    }

    /// Ring-full exits the vCPUs have taken so far.
    pub fn ring_full_exits(&self) -> u64 {
        self.core.dirty.ring_full_exits.load(Ordering::Relaxed)
    }

    fn set_logging(&self, on: bool) -> Result<(), DirtyError> {
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        for (slot, r) in self.core.memory.regions().iter().enumerate() {
            let slot = u32::try_from(slot).unwrap_or(u32::MAX);
            sys::set_memory_region(&self.core.vm, slot, r.gpa, r.len, r.host_addr, flags)
                .map_err(|source| DirtyError::SetLogging { slot, on, source })?;
        }
        self.core.dirty.logging.store(on, Ordering::SeqCst);
        Ok(())
    }

    /// Fetches the bitmaps and ORs them into `out` if given; with `protect`, clears (and so
    /// re-protects) what was set. The final harvest does not protect: tracking stops after it,
    /// and with manual protection the fetch alone is a copy of the log.
    fn harvest_bitmap(
        &mut self,
        mut out: Option<&mut DirtyBitmap>,
        protect: bool,
    ) -> Result<(), DirtyError> {
        let manual = self.core.dirty.mode == ActiveDirtyMode::ManualBitmap;
        let mut st = HarvestStats::default();
        for (i, r) in self.core.memory.regions().iter().enumerate() {
            let slot = u32::try_from(i).unwrap_or(u32::MAX);
            let Some(bm) = self.scratch.get_mut(i) else {
                return Err(DirtyError::Shape {
                    got: self.scratch.len(),
                    want: self.core.memory.regions().len(),
                });
            };
            let t0 = std::time::Instant::now();
            // SAFETY: slot `i` is region `i`, registered with KVM at its full length (see
            // `set_logging` and the VM's construction), so `r.pages()` is the slot's size.
            unsafe { sys::get_dirty_log(&self.core.vm, slot, r.pages(), bm) }
                .map_err(|source| DirtyError::GetLog { slot, source })?;
            let t1 = std::time::Instant::now();
            st.fetch += t1 - t0;
            // Counted in the same pass that ORs it out (the final harvest of a large guest is
            // inside the blackout: a pass over an 8 GiB slot's bitmap is ~10 µs here).
            match out.as_deref_mut().and_then(|o| o.regions.get_mut(i)) {
                Some(dst) => {
                    for (d, s) in dst.iter_mut().zip(bm.iter()) {
                        *d |= *s;
                        st.pages += u64::from(s.count_ones());
                    }
                }
                None => st.pages += bm.iter().map(|w| u64::from(w.count_ones())).sum::<u64>(),
            }
            let t2 = std::time::Instant::now();
            if manual && protect {
                let pages = r.pages();
                let words_per_chunk = (CLEAR_CHUNK_PAGES / 64) as usize;
                for (c, words) in bm.chunks(words_per_chunk).enumerate() {
                    if words.iter().all(|w| *w == 0) {
                        continue;
                    }
                    let first = c as u64 * CLEAR_CHUNK_PAGES;
                    st.clear_calls += 1;
                    let num = u32::try_from((pages - first).min(CLEAR_CHUNK_PAGES)).unwrap_or(0);
                    sys::clear_dirty_log(&self.core.vm, slot, first, num, words).map_err(
                        |source| DirtyError::ClearLog {
                            slot,
                            first,
                            num,
                            source,
                        },
                    )?;
                }
            }
            st.protect += t2.elapsed();
        }
        self.last = st;
        Ok(())
    }

    fn harvest_rings(&mut self, out: Option<&mut DirtyBitmap>) -> Result<(), DirtyError> {
        let d = &self.core.dirty;
        let mut n = 0;
        let t0 = std::time::Instant::now();
        for i in 0..d.rings.len() {
            n += d.drain_ring(i);
        }
        let t1 = std::time::Instant::now();
        if n > 0 {
            sys::reset_dirty_rings(&self.core.vm).map_err(DirtyError::ResetRings)?;
        }
        let mut st = HarvestStats {
            fetch: t1 - t0,
            protect: t1.elapsed(),
            ..HarvestStats::default()
        };
        match out {
            Some(out) => {
                for (dst, src) in out.regions.iter_mut().zip(&d.overflow) {
                    for (w, a) in dst.iter_mut().zip(src) {
                        let v = a.swap(0, Ordering::Relaxed);
                        st.pages += u64::from(v.count_ones());
                        *w |= v;
                    }
                }
            }
            None => {
                for a in d.overflow.iter().flatten() {
                    a.store(0, Ordering::Relaxed);
                }
            }
        }
        self.last = st;
        Ok(())
    }

    fn harvest_into(
        &mut self,
        out: Option<&mut DirtyBitmap>,
        protect: bool,
    ) -> Result<(), DirtyError> {
        match self.core.dirty.mode {
            ActiveDirtyMode::Ring { .. } => self.harvest_rings(out),
            _ => self.harvest_bitmap(out, protect),
        }
    }

    fn check_shape(&self, out: &DirtyBitmap) -> Result<(), DirtyError> {
        let want = self.core.memory.regions().len();
        if out.regions.len() != want {
            return Err(DirtyError::Shape {
                got: out.regions.len(),
                want,
            });
        }
        Ok(())
    }
}

impl DirtyTracker for KvmDirtyTracker {
    fn start(&mut self) -> Result<(), BoxError> {
        self.set_logging(true)?;
        // Drop what logging-on reported (INITIALLY_SET: everything; the clear is what
        // write-protects, chunk by chunk) so the first harvest is writes since start.
        self.harvest_into(None, true)?;
        Ok(())
    }

    fn harvest(&mut self, out: &mut DirtyBitmap) -> Result<(), BoxError> {
        self.check_shape(out)?;
        self.harvest_into(Some(out), true)?;
        Ok(())
    }

    fn harvest_final(&mut self, out: &mut DirtyBitmap) -> Result<(), BoxError> {
        self.check_shape(out)?;
        self.harvest_into(Some(out), false)?;
        Ok(())
    }

    fn stop(&mut self) -> Result<(), BoxError> {
        self.set_logging(false)?;
        if matches!(self.core.dirty.mode, ActiveDirtyMode::Ring { .. }) {
            self.harvest_rings(None)?;
        }
        Ok(())
    }
}
