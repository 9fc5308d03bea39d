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
//!   atomic bitmap (`Overflow`) that the next harvest drains, visiting only the words a summary
//!   marks. The final harvest (vCPUs paused, inside the blackout) does not reset: its cost is
//!   the entries left in the rings (kept small, see `RING_ENTRIES` in `vm.rs`) plus the dirty
//!   words, whatever the guest's size; a bitmap harvest copies the whole log (~100–200 µs for
//!   8 GiB here).
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
    /// The ring if KVM has it (and takes one of the ring sizes tried), else the bitmap with
    /// manual protection, else the classic bitmap. The ring first: its final harvest, inside
    /// the blackout, costs what the rings hold rather than a copy of the whole log (`ferry bench harvest`, 2 vCPUs, writer guest
    /// over 256 MiB, 30 harvests of ~6.5k dirty pages each, alternating: p50 10 / 16 / 24 µs
    /// at 1 / 4 / 8 GiB, against 17 / 44 / 116 µs for the bitmap).
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

/// Pages harvested from the rings but not yet reported: one bitmap per region, plus a summary
/// with one bit per bitmap word, so that taking it costs the dirty words, not the guest's size
/// (an 8 GiB guest has 32 Ki words; the final harvest is inside the blackout).
#[derive(Debug)]
pub(crate) struct Overflow {
    /// Bit `i` of word `w` of region `r`: page `64 * w + i` of region `r`.
    words: Vec<Vec<AtomicU64>>,
    /// Pages per region (the last word's bits past it are never set).
    pages: Vec<u64>,
    /// Bit `j` of summary word `k` of region `r`: word `64 * k + j` may be non-zero. Set after
    /// the word (by whoever made it non-zero), cleared before the word is taken: a bit set
    /// while a take runs is found by that take or the next.
    summary: Vec<Vec<AtomicU64>>,
}

impl Overflow {
    /// An empty overflow for regions of `pages` pages each.
    pub(crate) fn new(pages: impl IntoIterator<Item = u64>) -> Self {
        let zeros = |n: u64| (0..n).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
        let pages: Vec<u64> = pages.into_iter().collect();
        let (words, summary) = pages
            .iter()
            .map(|p| {
                let w = p.div_ceil(64);
                (zeros(w), zeros(w.div_ceil(64)))
            })
            .unzip();
        Self {
            words,
            pages,
            summary,
        }
    }

    /// Marks page `page` of region `region`; out-of-range positions (not KVM's to report)
    /// are ignored.
    fn set(&self, region: u32, page: u64) {
        let r = region as usize;
        let (Some(words), Some(summary)) = (self.words.get(r), self.summary.get(r)) else {
            return;
        };
        if self.pages.get(r).is_none_or(|n| page >= *n) {
            return;
        }
        let wi = (page / 64) as usize;
        let Some(w) = words.get(wi) else {
            return;
        };
        if w.fetch_or(1 << (page % 64), Ordering::Relaxed) == 0
            && let Some(sw) = summary.get(wi / 64)
        {
            sw.fetch_or(1 << (wi % 64), Ordering::Release);
        }
    }

    /// Moves every marked page into `out` (one bitmap per region; `None`: drops them) and
    /// returns how many there were.
    fn take(&self, mut out: Option<&mut DirtyBitmap>) -> u64 {
        let mut pages = 0;
        for (r, (words, summary)) in self.words.iter().zip(&self.summary).enumerate() {
            let mut dst = out.as_deref_mut().and_then(|o| o.regions.get_mut(r));
            for (k, sw) in summary.iter().enumerate() {
                if sw.load(Ordering::Relaxed) == 0 {
                    continue;
                }
                let mut bits = sw.swap(0, Ordering::Acquire);
                while bits != 0 {
                    let wi = k * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    let Some(w) = words.get(wi) else { continue };
                    let v = w.swap(0, Ordering::Relaxed);
                    pages += u64::from(v.count_ones());
                    if let Some(d) = dst.as_deref_mut().and_then(|d| d.get_mut(wi)) {
                        *d |= v;
                    }
                }
            }
        }
        pages
    }
}

/// Dirty-tracking state shared by the VM, its vCPU threads and the tracker.
#[derive(Debug)]
pub(crate) struct DirtyCore {
    /// The mechanism.
    pub(crate) mode: ActiveDirtyMode,
    /// One ring per vCPU (ring mode only).
    pub(crate) rings: Vec<Mutex<DirtyRing>>,
    /// Pages harvested from rings but not yet reported.
    pub(crate) overflow: Overflow,
    /// Logging is on.
    pub(crate) logging: AtomicBool,
    /// Ring-full exits taken by vCPUs.
    pub(crate) ring_full_exits: AtomicU64,
}

impl DirtyCore {
    /// Harvests ring `i` into the overflow bitmap (its callers reset the rings whether or not
    /// it took anything, see `harvest_rings`).
    pub(crate) fn drain_ring(&self, i: usize) {
        let Some(ring) = self.rings.get(i) else {
            return;
        };
        let mut ring = ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.harvest(|slot, off| self.overflow.set(slot, off));
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
    /// Time fetching (`KVM_GET_DIRTY_LOG`, or walking the rings and taking the overflow).
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

    /// Drains every ring into the overflow, takes the overflow into `out` (`None`: drops it)
    /// and, with `protect`, lets KVM re-protect the drained pages. The final harvest does not
    /// protect (tracking stops after it, and its cost is then per entry left in the rings plus
    /// per dirty overflow word); the drained entries are reset by the next harvest, the next
    /// ring-full exit or [`DirtyTracker::stop`], all of which reset unconditionally.
    fn harvest_rings(
        &mut self,
        out: Option<&mut DirtyBitmap>,
        protect: bool,
    ) -> Result<(), DirtyError> {
        let d = &self.core.dirty;
        let t0 = std::time::Instant::now();
        for i in 0..d.rings.len() {
            d.drain_ring(i);
        }
        let t1 = std::time::Instant::now();
        if protect {
            sys::reset_dirty_rings(&self.core.vm).map_err(DirtyError::ResetRings)?;
        }
        let t2 = std::time::Instant::now();
        let pages = d.overflow.take(out);
        self.last = HarvestStats {
            pages,
            fetch: (t1 - t0) + t2.elapsed(),
            protect: t2 - t1,
            clear_calls: 0,
        };
        Ok(())
    }

    fn harvest_into(
        &mut self,
        out: Option<&mut DirtyBitmap>,
        protect: bool,
    ) -> Result<(), DirtyError> {
        match self.core.dirty.mode {
            ActiveDirtyMode::Ring { .. } => self.harvest_rings(out, protect),
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
            self.harvest_rings(None, true)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitmap(pages: &[u64]) -> DirtyBitmap {
        DirtyBitmap {
            regions: pages
                .iter()
                .map(|p| vec![0; usize::try_from(p.div_ceil(64)).unwrap_or(0)])
                .collect(),
        }
    }

    fn set_bits(bm: &DirtyBitmap, region: usize) -> Vec<u64> {
        let mut v = Vec::new();
        for (wi, w) in bm.regions[region].iter().enumerate() {
            for b in 0..64 {
                if w >> b & 1 == 1 {
                    v.push(wi as u64 * 64 + b);
                }
            }
        }
        v
    }

    #[test]
    fn overflow_takes_exactly_what_was_set_and_empties() {
        let pages = [5000u64, 200];
        let o = Overflow::new(pages);
        let marked = [0u64, 1, 63, 64, 4095, 4096, 4999];
        for p in marked {
            o.set(0, p);
        }
        o.set(1, 199);
        // Twice, and positions KVM could never report: ignored, not a panic.
        o.set(0, 63);
        o.set(0, 5000);
        o.set(0, 5056);
        o.set(1, 255);
        o.set(2, 0);
        let mut out = bitmap(&pages);
        assert_eq!(o.take(Some(&mut out)), marked.len() as u64 + 1);
        assert_eq!(set_bits(&out, 0), marked);
        assert_eq!(set_bits(&out, 1), vec![199]);
        let mut again = bitmap(&pages);
        assert_eq!(o.take(Some(&mut again)), 0);
        assert_eq!(again.count(), 0);
        // Dropping, then marking again.
        o.set(0, 7);
        assert_eq!(o.take(None), 1);
        o.set(0, 8);
        let mut last = bitmap(&pages);
        assert_eq!(o.take(Some(&mut last)), 1);
        assert_eq!(set_bits(&last, 0), vec![8]);
    }

    #[test]
    fn overflow_loses_no_page_set_while_taking() {
        // Writers mark every page once while a taker runs; what the takes gathered plus a
        // last take after the writers stopped is every page, each exactly once.
        let pages = 64 * 64 * 3u64;
        let o = Overflow::new([pages]);
        let mut seen = bitmap(&[pages]);
        let mut total = 0;
        std::thread::scope(|s| {
            let o = &o;
            let writers: Vec<_> = (0..2u64)
                .map(|t| {
                    s.spawn(move || {
                        for p in (t..pages).step_by(2) {
                            o.set(0, p);
                        }
                    })
                })
                .collect();
            while writers.iter().any(|w| !w.is_finished()) {
                total += o.take(Some(&mut seen));
            }
        });
        total += o.take(Some(&mut seen));
        assert_eq!(total, pages);
        assert_eq!(seen.count(), pages);
    }
}
