// SPDX-License-Identifier: Apache-2.0 OR MIT
//! A process-memory VM: the engine's three VM traits implemented over plain process memory
//! written by real threads, for tests and benchmarks that need no KVM.
//!
//! [`ProcessVm`] owns guest-like RAM ([`ProcessMemory`], anonymous or memfd, split into several
//! regions at non-contiguous guest-physical addresses) and a set of *writer* threads that stand
//! in for vCPUs. Each write stores a fresh 8-byte value into a page (so the page's content really
//! changes) and then sets the page's bit in an atomic dirty bitmap ([`AtomicDirty`], `AtomicU64`
//! words, the way vm-memory's `AtomicBitmap` tracks device writes). The engine harvests that
//! bitmap with `swap(0)`. Writers run at a configurable rate (MiB of pages dirtied per second,
//! or unlimited) and pattern (sequential sweep, uniform random, hot set).
//!
//! # Why the bitmap is real tracking, not a simulation
//!
//! A writer performs `store(page)` and *then* `fetch_or(bit, Release)`. The harvester does
//! `swap(0, Acquire)` and only afterwards reads (sends) the page. Either the writer's `fetch_or`
//! precedes the swap in the word's modification order — then the swap reads a value in the
//! `fetch_or`'s release sequence, the store happens-before the harvester's read of the page, and
//! the page is sent with the new content — or it follows the swap, and the bit stays set for the
//! next harvest. So a page written after it was sent is always harvested again, and the final
//! harvest while paused (writers parked behind a mutex, which orders everything) sees every
//! remaining write. Tracking is exact: a bit is set if and only if the page was written.
//!
//! # Control
//!
//! [`VmControl::pause`] parks every writer at a barrier and returns once all have acknowledged
//! (the time it took is in [`ProcVmStats::last_pause_ns`]); `save_state` produces a small
//! versioned blob (writer RNG states, positions, counters, and the time of each writer's last
//! write); on the destination, [`ProcessVm::new_destination`] builds the same layout with memory
//! left unpopulated (post-copy registers it with userfaultfd), `restore_state` + `resume` start
//! the writers exactly where the source's stopped. `throttle(percent)` slows the writers down
//! (auto-converge).
//!
//! # What the writers measure
//!
//! Like a guest watching its own progress counter, every writer timestamps each write
//! (`CLOCK_MONOTONIC`, shared by all processes on the host) and records the gap since the
//! previous one: the longest gap, and the count and sum of gaps over 100 µs ([`ProcVmStats`]).
//! A pause is such a gap; across a migration the first write on the destination is measured
//! from the last write on the source (carried in the state blob), so the blackout as the guest
//! saw it is included. A writer touching a missing page on a post-copy destination blocks in the
//! userfaultfd fault until the page arrives: those waits are the post-copy stalls. Intentional
//! idling (rate limiting, throttling) is not counted as a gap.
//!
//! # A second tracker: userfaultfd write protection
//!
//! [`WpDirtyTracker`] tracks the same writers without their cooperation, the way a VMM without
//! a hypervisor dirty log could: all guest memory is registered `UFFDIO_REGISTER_MODE_WP` and
//! write-protected; a handler thread receives each first write to a page as a write-protect
//! fault, records the page and unprotects it (waking the writer). A harvest swaps the bits out
//! and write-protects those pages again. The handler's record-and-unprotect and the harvest's
//! swap-and-reprotect run under one lock, so a page is never unprotected with its bit already
//! harvested (which would lose the next write).
//!
//! Not here: huge pages larger than 4 KiB as the dirty granularity, device state beyond the
//! writers.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use rustix::time::{ClockId, clock_gettime};

use crate::memory::{LayoutError, MemBacking, MemOptions, PAGE_SIZE, ProcessMemory};
use crate::uffd::{Event, Features, RegisterMode, Uffd, UffdOpError, UffdOpenError, UffdReadError};
use crate::vm::{BoxError, DirtyBitmap, DirtyTracker, GuestMemory, GuestRegion, VmControl};

/// Gap between consecutive writes above which a writer counts a stall.
pub const STALL_THRESHOLD_NS: u64 = 100_000;
/// Guest-physical hole between consecutive regions (exercises non-contiguous layouts).
pub const REGION_GPA_GAP: u64 = 256 << 20;
/// How long `pause` waits for the writers before giving up.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Writes between publications of a writer's counters.
const PUBLISH_EVERY: u64 = 256;
/// Target spacing of rate-limited batches.
const BATCH_INTERVAL_NS: u64 = 1_000_000;
/// Work slice of an unlimited writer under throttling.
const THROTTLE_SLICE_NS: u64 = 1_000_000;

const STATE_MAGIC: [u8; 4] = *b"FPVM";
const STATE_VERSION: u16 = 1;
const STATE_HEADER: usize = 4 + 2 + 2 + 8 * 5;
const STATE_PER_WRITER: usize = 8 * 4;

/// Which pages the writers write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritePattern {
    /// Each writer sweeps its own contiguous share of the pages, in order, wrapping around.
    Sequential,
    /// Uniformly random pages over all memory.
    Random,
    /// 90% of writes into a hot set of 10% of the pages, the rest uniformly random.
    HotSet,
}

impl WritePattern {
    fn code(self) -> u64 {
        match self {
            WritePattern::Sequential => 1,
            WritePattern::Random => 2,
            WritePattern::HotSet => 3,
        }
    }
}

/// Configuration of a [`ProcessVm`].
#[derive(Debug, Clone)]
pub struct ProcVmConfig {
    /// Guest RAM in bytes (a multiple of 4 KiB times `regions`).
    pub mem_bytes: u64,
    /// Split the RAM into this many equal regions, `REGION_GPA_GAP` apart in guest-physical
    /// space.
    pub regions: usize,
    /// Anonymous or memfd memory.
    pub backing: MemBacking,
    /// Ask for transparent huge pages.
    pub hugepage: bool,
    /// Number of writer threads ("vCPUs").
    pub writers: usize,
    /// Total dirtying rate of all writers in MiB/s, counting one 4 KiB page per write;
    /// `None` = as fast as they can.
    pub write_mib_s: Option<u64>,
    /// Which pages are written.
    pub pattern: WritePattern,
    /// Seed of the writers' random choices and of the initial content.
    pub seed: u64,
    /// Percentage of pages the source fills with non-zero content at creation (the rest stay
    /// zero, as in a real guest).
    pub fill_percent: u8,
}

impl Default for ProcVmConfig {
    fn default() -> Self {
        Self {
            mem_bytes: 64 << 20,
            regions: 2,
            backing: MemBacking::Anonymous,
            hugepage: false,
            writers: 2,
            write_mib_s: None,
            pattern: WritePattern::Random,
            seed: 1,
            fill_percent: 50,
        }
    }
}

/// Creating a [`ProcessVm`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcVmError {
    /// The configuration is unusable.
    #[error("Invalid process-VM config: {0}")]
    Config(&'static str),
    /// Allocating or populating memory failed.
    #[error("Allocating {mem_bytes:#x} bytes of process-VM memory failed")]
    Memory {
        /// The size asked for.
        mem_bytes: u64,
        /// What failed.
        #[source]
        source: LayoutError,
    },
    /// Spawning a writer failed.
    #[error("Spawning writer {index} failed")]
    Spawn {
        /// The writer.
        index: usize,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// A [`VmControl`] operation on a [`ProcessVm`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcVmControlError {
    /// Not every writer reached the pause barrier in time (e.g. blocked in a fault nobody
    /// resolves).
    #[error("Pause timed out: {parked} of {writers} writers parked after {waited_ms} ms")]
    PauseTimeout {
        /// Writers parked.
        parked: usize,
        /// Writers in total.
        writers: usize,
        /// How long `pause` waited.
        waited_ms: u64,
    },
    /// The operation needs the writers paused (or not started).
    #[error("The writers are running")]
    Running,
    /// `restore_state` after the writers were started.
    #[error("Cannot restore state into a VM whose writers already ran")]
    AlreadyStarted,
    /// The blob is not a process-VM state.
    #[error("Bad process-VM state blob ({len} bytes): {why}")]
    BadState {
        /// Blob length.
        len: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// The blob was saved by a VM with another configuration.
    #[error("State blob is for another VM configuration (field {field})")]
    ConfigMismatch {
        /// The field that differs.
        field: &'static str,
    },
    /// Spawning a writer failed.
    #[error("Spawning writer {index} failed")]
    Spawn {
        /// The writer.
        index: usize,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// What the writers measured (since creation or [`ProcessVm::reset_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcVmStats {
    /// Writes done by all writers, including those done on the source before a restore.
    pub writes: u64,
    /// Longest gap any writer saw between two consecutive writes, in nanoseconds.
    pub max_gap_ns: u64,
    /// Gaps over [`STALL_THRESHOLD_NS`].
    pub stalls: u64,
    /// Sum of those gaps, in nanoseconds.
    pub stall_ns: u64,
    /// Duration of the last `pause` call until every writer had parked, in nanoseconds.
    pub last_pause_ns: u64,
}

/// The per-region atomic dirty bitmap the writers set (one bit per 4 KiB page).
pub struct AtomicDirty {
    regions: Vec<Box<[AtomicU64]>>,
}

impl fmt::Debug for AtomicDirty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AtomicDirty")
            .field("regions", &self.regions.len())
            .finish()
    }
}

impl AtomicDirty {
    /// An all-clear bitmap shaped for `regions`.
    pub fn for_regions(regions: &[GuestRegion]) -> Self {
        Self {
            regions: regions
                .iter()
                .map(|r| {
                    (0..r.pages().div_ceil(64))
                        .map(|_| AtomicU64::new(0))
                        .collect()
                })
                .collect(),
        }
    }

    /// Marks page `page` of region `region` written. Call *after* the store.
    #[inline]
    pub fn mark(&self, region: usize, page: u64) {
        let Some(words) = self.regions.get(region) else {
            return;
        };
        let Some(word) = usize::try_from(page / 64).ok().and_then(|i| words.get(i)) else {
            return;
        };
        word.fetch_or(1 << (page % 64), Ordering::Release);
    }

    /// ORs every set bit into `out` and clears it (`swap(0, Acquire)` per non-zero word).
    pub fn harvest_into(&self, out: &mut DirtyBitmap) {
        if out.regions.len() != self.regions.len() {
            out.regions.resize(self.regions.len(), Vec::new());
        }
        for (words, dst) in self.regions.iter().zip(out.regions.iter_mut()) {
            if dst.len() != words.len() {
                dst.resize(words.len(), 0);
            }
            for (w, d) in words.iter().zip(dst.iter_mut()) {
                // A word read as zero has nothing to synchronise with; a bit set after this
                // load is caught by the next harvest.
                if w.load(Ordering::Relaxed) != 0 {
                    *d |= w.swap(0, Ordering::Acquire);
                }
            }
        }
    }

    /// Clears every bit.
    pub fn clear(&self) {
        for w in self.regions.iter().flat_map(|r| r.iter()) {
            w.store(0, Ordering::Relaxed);
        }
    }
}

/// A [`DirtyTracker`] over a [`ProcessVm`]'s atomic bitmap; can be used while the VM itself is
/// borrowed elsewhere (e.g. as the engine's `VmControl`).
#[derive(Debug, Clone)]
pub struct AtomicDirtyTracker {
    dirty: Arc<AtomicDirty>,
}

impl DirtyTracker for AtomicDirtyTracker {
    fn start(&mut self) -> Result<(), BoxError> {
        // The writers always set bits; starting forgets the writes made so far, which the
        // first full pass (after start) covers.
        self.dirty.clear();
        Ok(())
    }

    fn harvest(&mut self, out: &mut DirtyBitmap) -> Result<(), BoxError> {
        self.dirty.harvest_into(out);
        Ok(())
    }

    fn stop(&mut self) -> Result<(), BoxError> {
        Ok(())
    }
}

/// A writer's resumable state (what `save_state` carries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WriterState {
    rng: u64,
    pos: u64,
    writes: u64,
    /// `CLOCK_MONOTONIC` ns of the last write (or of the end of intentional idling); 0 = none.
    last_ns: u64,
}

#[derive(Debug, Default)]
struct WriterCounters {
    /// Bumped by `reset_stats`; a writer seeing a new value forgets its local maximum.
    epoch: AtomicU64,
    writes: AtomicU64,
    max_gap_ns: AtomicU64,
    stalls: AtomicU64,
    stall_ns: AtomicU64,
}

#[derive(Debug)]
struct Ctl {
    parked: usize,
}

/// Pages in global order: region `i` holds pages `starts[i]..starts[i+1]`.
#[derive(Debug)]
struct PageMap {
    starts: Vec<u64>,
    total: u64,
}

impl PageMap {
    fn new(regions: &[GuestRegion]) -> Self {
        let mut starts = Vec::with_capacity(regions.len());
        let mut total = 0;
        for r in regions {
            starts.push(total);
            total += r.pages();
        }
        Self { starts, total }
    }

    #[inline]
    fn locate(&self, page: u64) -> (usize, u64) {
        let idx = self
            .starts
            .partition_point(|&s| s <= page)
            .saturating_sub(1);
        (idx, page - self.starts[idx])
    }
}

#[derive(Debug)]
struct Shared {
    mem: Arc<ProcessMemory>,
    pages: PageMap,
    dirty: Arc<AtomicDirty>,
    pause_req: AtomicBool,
    stop: AtomicBool,
    throttle: AtomicU8,
    ctl: Mutex<Ctl>,
    /// Writers wait here while parked (and while idling, so a pause wakes them).
    wake: Condvar,
    /// `pause` waits here for the writers' acknowledgements.
    parked_cv: Condvar,
    states: Vec<Mutex<WriterState>>,
    counters: Vec<CachePadded<WriterCounters>>,
    /// Per-writer rate in thousandths of a page per second (`None`: unlimited).
    milli_pages_per_sec: Option<u64>,
    pattern: WritePattern,
    hot: (u64, u64),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_ns() -> u64 {
    let t = clock_gettime(ClockId::Monotonic);
    u64::try_from(t.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0))
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[inline]
fn xorshift(s: &mut u64) -> u64 {
    let mut x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// Content of page `page` at creation: non-zero for `fill_percent`% of pages.
fn initial_word(seed: u64, page: u64, fill_percent: u8) -> u64 {
    let mut s = seed ^ page.wrapping_mul(0xA24B_AED4_963E_E407);
    let h = splitmix(&mut s);
    if h % 100 < u64::from(fill_percent) {
        h | 1
    } else {
        0
    }
}

impl Shared {
    /// This writer's share of the pages for the sequential pattern.
    fn share(&self, id: usize, writers: usize) -> (u64, u64) {
        let n = self.pages.total;
        let (w, ws) = (id as u64, writers as u64);
        let lo = n * w / ws;
        let hi = n * (w + 1) / ws;
        if hi > lo { (lo, hi) } else { (0, n) }
    }

    fn next_page(&self, st: &mut WriterState, share: (u64, u64)) -> u64 {
        let n = self.pages.total;
        match self.pattern {
            WritePattern::Sequential => {
                let (lo, hi) = share;
                if st.pos < lo || st.pos >= hi {
                    st.pos = lo;
                }
                let p = st.pos;
                st.pos += 1;
                p
            }
            WritePattern::Random => xorshift(&mut st.rng) % n,
            WritePattern::HotSet => {
                let r = xorshift(&mut st.rng);
                if !r.is_multiple_of(10) {
                    let (start, len) = self.hot;
                    start + (r / 10) % len
                } else {
                    (r / 10) % n
                }
            }
        }
    }

    /// Parks until the pause is lifted; returns false when the VM is stopping.
    fn park(&self, id: usize, st: &WriterState, local: &mut LocalCounters) -> bool {
        local.publish(&self.counters[id], st.writes);
        *lock(&self.states[id]) = *st;
        let mut ctl = lock(&self.ctl);
        ctl.parked += 1;
        self.parked_cv.notify_all();
        while self.pause_req.load(Ordering::Acquire) && !self.stop.load(Ordering::Acquire) {
            ctl = self.wake.wait(ctl).unwrap_or_else(PoisonError::into_inner);
        }
        ctl.parked -= 1;
        !self.stop.load(Ordering::Acquire)
    }

    /// Idles for `dur` unless a pause or stop comes first.
    fn idle(&self, dur: Duration) {
        let ctl = lock(&self.ctl);
        if self.pause_req.load(Ordering::Acquire) || self.stop.load(Ordering::Acquire) {
            return;
        }
        let _ = self
            .wake
            .wait_timeout(ctl, dur)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

/// Counters a writer keeps locally and publishes now and then.
#[derive(Debug, Default)]
struct LocalCounters {
    max_gap_ns: u64,
    epoch: u64,
}

impl LocalCounters {
    fn publish(&mut self, c: &WriterCounters, writes: u64) {
        c.writes.store(writes, Ordering::Relaxed);
        let epoch = c.epoch.load(Ordering::Relaxed);
        if epoch != self.epoch {
            self.epoch = epoch;
            self.max_gap_ns = 0;
        }
        c.max_gap_ns.fetch_max(self.max_gap_ns, Ordering::Relaxed);
    }
}

fn writer_main(shared: Arc<Shared>, id: usize, writers: usize, mut st: WriterState) {
    let share = shared.share(id, writers);
    let counters = &shared.counters[id];
    let mut local = LocalCounters::default();
    if st.last_ns == 0 {
        st.last_ns = now_ns();
    }
    let tag = u64::try_from(id + 1).unwrap_or(0) << 56;
    'run: loop {
        // Pacing restarts after every park so a pause does not cause a burst afterwards.
        let mut pace_start = now_ns();
        let mut paced: u64 = 0;
        let mut paced_throttle = shared.throttle.load(Ordering::Relaxed);
        loop {
            if shared.pause_req.load(Ordering::Acquire) || shared.stop.load(Ordering::Acquire) {
                if !shared.park(id, &st, &mut local) {
                    break 'run;
                }
                continue 'run;
            }
            let t = shared.throttle.load(Ordering::Relaxed);
            if t != paced_throttle {
                // A new speed: pace from now on, not retroactively.
                paced_throttle = t;
                pace_start = now_ns();
                paced = 0;
            }
            let throttle = u64::from(t.clamp(1, 100));
            let batch = match shared.milli_pages_per_sec {
                Some(rate) => {
                    let eff = u128::from((rate * throttle / 100).max(1));
                    let due_ns = u64::try_from(u128::from(paced) * 1_000_000_000_000 / eff)
                        .unwrap_or(u64::MAX);
                    let elapsed = now_ns().saturating_sub(pace_start);
                    if elapsed > due_ns.saturating_add(100 * BATCH_INTERVAL_NS) {
                        // Far behind (a long stall): do not burst to catch up.
                        pace_start = now_ns();
                        paced = 0;
                        continue;
                    }
                    if due_ns > elapsed {
                        local.publish(counters, st.writes);
                        shared.idle(Duration::from_nanos(due_ns - elapsed));
                        // Intentional idling is not a gap the guest suffers.
                        st.last_ns = now_ns();
                        continue;
                    }
                    u64::try_from(eff * u128::from(BATCH_INTERVAL_NS) / 1_000_000_000_000)
                        .unwrap_or(u64::MAX)
                        .max(1)
                }
                None if throttle < 100 => {
                    let elapsed = now_ns().saturating_sub(pace_start);
                    if elapsed >= THROTTLE_SLICE_NS {
                        let rest = THROTTLE_SLICE_NS * (100 - throttle) / throttle;
                        shared.idle(Duration::from_nanos(rest));
                        st.last_ns = now_ns();
                        pace_start = now_ns();
                    }
                    64
                }
                None => 64,
            };
            let mut done = 0;
            while done < batch {
                // Checked on every write, as a vCPU kick interrupts the guest anywhere.
                if shared.pause_req.load(Ordering::Relaxed) {
                    break;
                }
                done += 1;
                let page = shared.next_page(&mut st, share);
                let (region, rpage) = shared.pages.locate(page);
                st.writes += 1;
                let offset = rpage * PAGE_SIZE + (st.writes % (PAGE_SIZE / 8)) * 8;
                if let Some(r) = shared.mem.mem_regions().get(region)
                    && let Ok(word) = r.atomic_u64(offset)
                {
                    // The store may block in a userfaultfd fault on a post-copy destination.
                    word.store(tag | st.writes, Ordering::Relaxed);
                }
                shared.dirty.mark(region, rpage);
                let now = now_ns();
                let gap = now.saturating_sub(st.last_ns);
                st.last_ns = now;
                if gap > local.max_gap_ns {
                    local.max_gap_ns = gap;
                }
                if gap > STALL_THRESHOLD_NS {
                    counters.stalls.fetch_add(1, Ordering::Relaxed);
                    counters.stall_ns.fetch_add(gap, Ordering::Relaxed);
                    counters.max_gap_ns.fetch_max(gap, Ordering::Relaxed);
                }
                if st.writes.is_multiple_of(PUBLISH_EVERY) {
                    local.publish(counters, st.writes);
                }
            }
            paced += done;
        }
    }
    local.publish(counters, st.writes);
    *lock(&shared.states[id]) = st;
}

/// A VM made of process memory and writer threads; see the module docs.
#[derive(Debug)]
pub struct ProcessVm {
    cfg: ProcVmConfig,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    paused: bool,
    last_pause_ns: u64,
}

impl ProcessVm {
    /// A source VM: memory allocated, populated and filled (`fill_percent`), writers not yet
    /// started (see [`ProcessVm::start`]).
    pub fn new(cfg: ProcVmConfig) -> Result<Self, ProcVmError> {
        let vm = Self::build(cfg, true)?;
        let fill = vm.cfg.fill_percent;
        if fill > 0 {
            for (i, r) in vm.shared.mem.mem_regions().iter().enumerate() {
                let start = vm.shared.pages.starts[i];
                for p in 0..r.len() / PAGE_SIZE {
                    let w = initial_word(vm.cfg.seed, start + p, fill);
                    if w != 0 {
                        let _ = r.store_u64(p * PAGE_SIZE, w);
                    }
                }
            }
        }
        Ok(vm)
    }

    /// A destination VM with the same layout as `cfg`: memory allocated but left unpopulated
    /// (every page missing, for userfaultfd), writers not started until `resume`/`start`.
    pub fn new_destination(cfg: &ProcVmConfig) -> Result<Self, ProcVmError> {
        Self::build(cfg.clone(), false)
    }

    fn build(cfg: ProcVmConfig, populate: bool) -> Result<Self, ProcVmError> {
        if cfg.regions == 0 || cfg.writers == 0 {
            return Err(ProcVmError::Config(
                "regions and writers must be at least 1",
            ));
        }
        let n = cfg.regions as u64;
        if cfg.mem_bytes == 0 || !cfg.mem_bytes.is_multiple_of(n * PAGE_SIZE) {
            return Err(ProcVmError::Config(
                "mem_bytes must be a non-zero multiple of 4 KiB times regions",
            ));
        }
        if cfg.write_mib_s == Some(0) {
            return Err(ProcVmError::Config(
                "write_mib_s must be positive (None = unlimited)",
            ));
        }
        let per = cfg.mem_bytes / n;
        let layout: Vec<(u64, u64)> = (0..n).map(|i| (i * (per + REGION_GPA_GAP), per)).collect();
        let opts = MemOptions {
            hugepage: cfg.hugepage,
            populate,
        };
        let mem = ProcessMemory::new(&layout, cfg.backing, opts).map_err(|source| {
            ProcVmError::Memory {
                mem_bytes: cfg.mem_bytes,
                source,
            }
        })?;
        let pages = PageMap::new(mem.regions());
        if pages.total < cfg.writers as u64 {
            return Err(ProcVmError::Config("fewer pages than writers"));
        }
        let dirty = Arc::new(AtomicDirty::for_regions(mem.regions()));
        let mut seed = cfg.seed;
        let hot_len = (pages.total / 10).max(1);
        let hot_start = splitmix(&mut seed) % (pages.total - hot_len + 1);
        let states = (0..cfg.writers)
            .map(|_| {
                Mutex::new(WriterState {
                    rng: splitmix(&mut seed) | 1,
                    pos: 0,
                    writes: 0,
                    last_ns: 0,
                })
            })
            .collect();
        let milli_pages_per_sec = cfg
            .write_mib_s
            .map(|m| m.saturating_mul((1 << 20) / PAGE_SIZE * 1000) / cfg.writers as u64);
        let shared = Arc::new(Shared {
            mem: Arc::new(mem),
            pages,
            dirty,
            pause_req: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            throttle: AtomicU8::new(100),
            ctl: Mutex::new(Ctl { parked: 0 }),
            wake: Condvar::new(),
            parked_cv: Condvar::new(),
            states,
            counters: (0..cfg.writers).map(|_| CachePadded::default()).collect(),
            milli_pages_per_sec,
            pattern: cfg.pattern,
            hot: (hot_start, hot_len),
        });
        Ok(Self {
            cfg,
            shared,
            threads: Vec::new(),
            paused: false,
            last_pause_ns: 0,
        })
    }

    /// Starts the writers (from their initial or restored state). Does nothing if they run.
    /// (This is the VM's start; the dirty tracker's is `DirtyTracker::start`.)
    pub fn start(&mut self) -> Result<(), ProcVmControlError> {
        if !self.threads.is_empty() {
            return Ok(());
        }
        self.shared.pause_req.store(false, Ordering::Release);
        self.paused = false;
        for id in 0..self.cfg.writers {
            let shared = Arc::clone(&self.shared);
            let st = *lock(&self.shared.states[id]);
            let writers = self.cfg.writers;
            let handle = std::thread::Builder::new()
                .name(format!("ferry-writer-{id}"))
                .spawn(move || writer_main(shared, id, writers, st))
                .map_err(|source| ProcVmControlError::Spawn { index: id, source })?;
            self.threads.push(handle);
        }
        Ok(())
    }

    /// Whether the writers have been started.
    pub fn started(&self) -> bool {
        !self.threads.is_empty()
    }

    /// Whether the writers are parked by `pause`.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// The configuration.
    pub fn config(&self) -> &ProcVmConfig {
        &self.cfg
    }

    /// The guest memory (shareable with the engine's other threads).
    pub fn memory(&self) -> Arc<ProcessMemory> {
        Arc::clone(&self.shared.mem)
    }

    /// A dirty tracker over the writers' bitmap, usable independently of `self`.
    pub fn tracker(&self) -> AtomicDirtyTracker {
        AtomicDirtyTracker {
            dirty: Arc::clone(&self.shared.dirty),
        }
    }

    /// What the writers measured.
    pub fn stats(&self) -> ProcVmStats {
        let mut s = ProcVmStats {
            last_pause_ns: self.last_pause_ns,
            ..ProcVmStats::default()
        };
        for c in &self.shared.counters {
            s.writes += c.writes.load(Ordering::Relaxed);
            s.max_gap_ns = s.max_gap_ns.max(c.max_gap_ns.load(Ordering::Relaxed));
            s.stalls += c.stalls.load(Ordering::Relaxed);
            s.stall_ns += c.stall_ns.load(Ordering::Relaxed);
        }
        s
    }

    /// Forgets the gap statistics (not the write counters), e.g. at switchover.
    pub fn reset_stats(&mut self) {
        for c in &self.shared.counters {
            c.epoch.fetch_add(1, Ordering::Relaxed);
            c.max_gap_ns.store(0, Ordering::Relaxed);
            c.stalls.store(0, Ordering::Relaxed);
            c.stall_ns.store(0, Ordering::Relaxed);
        }
        self.last_pause_ns = 0;
    }

    fn pause_inner(&mut self) -> Result<(), ProcVmControlError> {
        if self.paused || self.threads.is_empty() {
            self.paused = !self.threads.is_empty();
            return Ok(());
        }
        let t0 = Instant::now();
        let writers = self.threads.len();
        let mut ctl = lock(&self.shared.ctl);
        self.shared.pause_req.store(true, Ordering::Release);
        self.shared.wake.notify_all();
        while ctl.parked < writers {
            let waited = t0.elapsed();
            if waited >= PAUSE_TIMEOUT {
                let parked = ctl.parked;
                drop(ctl);
                // Leave the writers running rather than half paused.
                self.shared.pause_req.store(false, Ordering::Release);
                self.shared.wake.notify_all();
                return Err(ProcVmControlError::PauseTimeout {
                    parked,
                    writers,
                    waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                });
            }
            ctl = self
                .shared
                .parked_cv
                .wait_timeout(ctl, PAUSE_TIMEOUT - waited)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        drop(ctl);
        self.last_pause_ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.paused = true;
        Ok(())
    }

    fn save_inner(&self) -> Result<Vec<u8>, ProcVmControlError> {
        if self.started() && !self.paused {
            return Err(ProcVmControlError::Running);
        }
        let mut blob = Vec::with_capacity(STATE_HEADER + STATE_PER_WRITER * self.cfg.writers);
        blob.extend_from_slice(&STATE_MAGIC);
        blob.extend_from_slice(&STATE_VERSION.to_le_bytes());
        blob.extend_from_slice(&0u16.to_le_bytes());
        for v in self.fingerprint() {
            blob.extend_from_slice(&v.to_le_bytes());
        }
        for s in &self.shared.states {
            let st = *lock(s);
            for v in [st.rng, st.pos, st.writes, st.last_ns] {
                blob.extend_from_slice(&v.to_le_bytes());
            }
        }
        Ok(blob)
    }

    fn fingerprint(&self) -> [u64; 5] {
        [
            self.cfg.mem_bytes,
            self.cfg.regions as u64,
            self.cfg.writers as u64,
            self.cfg.pattern.code(),
            self.cfg.seed,
        ]
    }

    fn restore_inner(&mut self, blob: &[u8]) -> Result<(), ProcVmControlError> {
        if self.started() {
            return Err(ProcVmControlError::AlreadyStarted);
        }
        let bad = |why| ProcVmControlError::BadState {
            len: blob.len(),
            why,
        };
        if blob.len() < STATE_HEADER || blob[..4] != STATE_MAGIC {
            return Err(bad("no FPVM header"));
        }
        let word = |off: usize| -> u64 {
            let mut b = [0u8; 8];
            b.copy_from_slice(&blob[off..off + 8]);
            u64::from_le_bytes(b)
        };
        if u16::from_le_bytes([blob[4], blob[5]]) != STATE_VERSION {
            return Err(bad("unsupported version"));
        }
        const FIELDS: [&str; 5] = ["mem_bytes", "regions", "writers", "pattern", "seed"];
        for (i, (want, name)) in self.fingerprint().into_iter().zip(FIELDS).enumerate() {
            if word(8 + 8 * i) != want {
                return Err(ProcVmControlError::ConfigMismatch { field: name });
            }
        }
        if blob.len() != STATE_HEADER + STATE_PER_WRITER * self.cfg.writers {
            return Err(bad("wrong length for the writer count"));
        }
        for (i, s) in self.shared.states.iter().enumerate() {
            let off = STATE_HEADER + STATE_PER_WRITER * i;
            let st = WriterState {
                rng: word(off),
                pos: word(off + 8),
                writes: word(off + 16),
                last_ns: word(off + 24),
            };
            if st.rng == 0 && self.cfg.pattern != WritePattern::Sequential {
                return Err(bad("zero RNG state"));
            }
            self.shared.counters[i]
                .writes
                .store(st.writes, Ordering::Relaxed);
            *lock(s) = st;
        }
        Ok(())
    }

    fn resume_inner(&mut self) -> Result<(), ProcVmControlError> {
        if self.threads.is_empty() {
            return self.start();
        }
        let _ctl = lock(&self.shared.ctl);
        self.shared.pause_req.store(false, Ordering::Release);
        self.shared.wake.notify_all();
        self.paused = false;
        Ok(())
    }
}

impl Drop for ProcessVm {
    fn drop(&mut self) {
        {
            let _ctl = lock(&self.shared.ctl);
            self.shared.stop.store(true, Ordering::Release);
            self.shared.wake.notify_all();
        }
        // A writer blocked in a userfaultfd fault returns once the fault is resolved or the
        // descriptor is closed: drop the engine's userfaultfd before the VM.
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

// SAFETY: the regions are those of the owned `ProcessMemory`, which lives (behind an `Arc`) at
// least as long as `self` and never changes its mappings.
unsafe impl GuestMemory for ProcessVm {
    fn regions(&self) -> &[GuestRegion] {
        self.shared.mem.regions()
    }
}

impl DirtyTracker for ProcessVm {
    fn start(&mut self) -> Result<(), BoxError> {
        self.shared.dirty.clear();
        Ok(())
    }

    fn harvest(&mut self, out: &mut DirtyBitmap) -> Result<(), BoxError> {
        self.shared.dirty.harvest_into(out);
        Ok(())
    }

    fn stop(&mut self) -> Result<(), BoxError> {
        Ok(())
    }
}

impl VmControl for ProcessVm {
    fn pause(&mut self) -> Result<(), BoxError> {
        Ok(self.pause_inner()?)
    }

    fn save_state(&mut self) -> Result<Vec<u8>, BoxError> {
        Ok(self.save_inner()?)
    }

    fn restore_state(&mut self, blob: &[u8]) -> Result<(), BoxError> {
        Ok(self.restore_inner(blob)?)
    }

    fn resume(&mut self) -> Result<(), BoxError> {
        Ok(self.resume_inner()?)
    }

    fn throttle(&mut self, percent: u8) -> Result<bool, BoxError> {
        self.shared
            .throttle
            .store(percent.clamp(1, 100), Ordering::Relaxed);
        Ok(true)
    }

    /// The next 32 pages each writer will write, from its saved
    /// position and random state (the writers are deterministic), round-robin over writers.
    fn first_touch_pages(&mut self) -> Vec<u64> {
        let sh = &self.shared;
        let regions = GuestMemory::regions(&*sh.mem);
        let n = sh.states.len();
        let mut states: Vec<WriterState> = sh.states.iter().map(|s| *lock(s)).collect();
        let mut out = Vec::with_capacity(n * FIRST_TOUCH_PER_WRITER);
        for _ in 0..FIRST_TOUCH_PER_WRITER {
            for (id, st) in states.iter_mut().enumerate() {
                let page = sh.next_page(st, sh.share(id, n));
                let (region, rpage) = sh.pages.locate(page);
                if let Some(r) = regions.get(region) {
                    out.push(r.gpa + rpage * PAGE_SIZE);
                }
            }
        }
        out
    }
}

/// Pages per writer that [`ProcessVm`] names as touched first after a resume.
const FIRST_TOUCH_PER_WRITER: usize = 32;

/// Setting up or running the write-protect tracker failed.
#[derive(Debug, thiserror::Error)]
pub enum WpTrackerError {
    /// No userfaultfd.
    #[error("Cannot open a userfaultfd for write-protect tracking")]
    Open(#[source] UffdOpenError),
    /// The kernel lacks write-protect faults for this memory.
    #[error("Kernel lacks userfaultfd write protection (features {0:?})")]
    Unsupported(Features),
    /// Registering, protecting or unprotecting failed.
    #[error("Write-protect tracking operation failed")]
    Op(#[source] UffdOpError),
    /// Spawning the fault handler failed.
    #[error("Spawning the write-fault handler failed")]
    Spawn(#[source] std::io::Error),
    /// The fault handler stopped with an error.
    #[error("The write-fault handler failed")]
    Handler(#[source] UffdReadError),
}

#[derive(Debug)]
struct WpShared {
    uffd: Uffd,
    /// (host start, length) of each region, in region order.
    spans: Vec<(u64, u64)>,
    dirty: AtomicDirty,
    /// Held by the handler while recording + unprotecting and by harvest while swapping +
    /// reprotecting (see the module docs).
    lock: Mutex<()>,
    stop: AtomicBool,
    faults: AtomicU64,
    error: Mutex<Option<UffdReadError>>,
}

impl WpShared {
    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        self.spans
            .iter()
            .position(|&(h, l)| addr >= h && addr < h + l)
            .map(|i| (i, (addr - self.spans[i].0) / PAGE_SIZE))
    }

    fn handle(&self) {
        let mut events = Vec::new();
        while !self.stop.load(Ordering::Acquire) {
            match self.uffd.poll(Some(Duration::from_millis(20))) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    *lock(&self.error) = Some(e);
                    return;
                }
            }
            events.clear();
            if let Err(e) = self.uffd.read_events(&mut events, 64) {
                *lock(&self.error) = Some(e);
                return;
            }
            for ev in &events {
                let Event::PageFault { addr, .. } = ev else {
                    continue;
                };
                let page_addr = addr & !(PAGE_SIZE - 1);
                let _g = lock(&self.lock);
                if let Some((r, p)) = self.locate(page_addr) {
                    self.dirty.mark(r, p);
                }
                self.faults.fetch_add(1, Ordering::Relaxed);
                // Unprotect and wake the writer; if that fails (range unregistered meanwhile)
                // a plain wake still lets it retry.
                if self
                    .uffd
                    .writeprotect(page_addr, PAGE_SIZE, false, false)
                    .is_err()
                {
                    let _ = self.uffd.wake(page_addr, PAGE_SIZE);
                }
            }
        }
    }
}

/// A [`DirtyTracker`] over any [`ProcessMemory`] using userfaultfd write protection (see the
/// module docs). Write-protecting unpopulated anonymous pages needs `WP_UNPOPULATED` (Linux
/// 6.4+); without it only populated pages are tracked, which covers a populated source.
#[derive(Debug)]
pub struct WpDirtyTracker {
    /// Keeps the tracked memory mapped while it is registered.
    _mem: Arc<ProcessMemory>,
    shared: Arc<WpShared>,
    handler: Option<JoinHandle<()>>,
    registered: bool,
}

impl WpDirtyTracker {
    /// Opens a userfaultfd for `mem` (nothing is registered until `start`).
    pub fn new(mem: Arc<ProcessMemory>) -> Result<Self, WpTrackerError> {
        let wanted =
            Features::PAGEFAULT_FLAG_WP | Features::WP_HUGETLBFS_SHMEM | Features::WP_UNPOPULATED;
        let uffd = Uffd::open(false, wanted).map_err(WpTrackerError::Open)?;
        if !uffd.features().contains(Features::PAGEFAULT_FLAG_WP) {
            return Err(WpTrackerError::Unsupported(uffd.features()));
        }
        let spans = mem
            .regions()
            .iter()
            .map(|r| (r.host_addr as u64, r.len))
            .collect();
        let dirty = AtomicDirty::for_regions(mem.regions());
        Ok(Self {
            _mem: mem,
            shared: Arc::new(WpShared {
                uffd,
                spans,
                dirty,
                lock: Mutex::new(()),
                stop: AtomicBool::new(false),
                faults: AtomicU64::new(0),
                error: Mutex::new(None),
            }),
            handler: None,
            registered: false,
        })
    }

    /// Write-protect faults handled so far.
    pub fn faults(&self) -> u64 {
        self.shared.faults.load(Ordering::Relaxed)
    }

    fn start_inner(&mut self) -> Result<(), WpTrackerError> {
        if !self.registered {
            for &(h, l) in &self.shared.spans {
                // SAFETY: the spans are the regions of `self.mem`, guest memory that no Rust
                // reference reads; write protection only makes writers wait for the handler.
                unsafe { self.shared.uffd.register(h, l, RegisterMode::WP) }
                    .map_err(WpTrackerError::Op)?;
            }
            self.registered = true;
        }
        if self.handler.is_none() {
            self.shared.stop.store(false, Ordering::Release);
            let shared = Arc::clone(&self.shared);
            let handle = std::thread::Builder::new()
                .name("ferry-wp-handler".into())
                .spawn(move || shared.handle())
                .map_err(WpTrackerError::Spawn)?;
            self.handler = Some(handle);
        }
        let _g = lock(&self.shared.lock);
        self.shared.dirty.clear();
        for &(h, l) in &self.shared.spans {
            self.shared
                .uffd
                .writeprotect(h, l, true, false)
                .map_err(WpTrackerError::Op)?;
        }
        Ok(())
    }

    fn harvest_inner(&mut self, out: &mut DirtyBitmap) -> Result<(), WpTrackerError> {
        if let Some(e) = lock(&self.shared.error).take() {
            return Err(WpTrackerError::Handler(e));
        }
        let _g = lock(&self.shared.lock);
        if out.regions.len() != self.shared.dirty.regions.len() {
            out.regions
                .resize(self.shared.dirty.regions.len(), Vec::new());
        }
        for (r, words) in self.shared.dirty.regions.iter().enumerate() {
            let base = self.shared.spans[r].0;
            let dst = &mut out.regions[r];
            if dst.len() != words.len() {
                dst.resize(words.len(), 0);
            }
            // Re-protect each run of harvested pages with one ioctl.
            let mut run: Option<(u64, u64)> = None;
            for (i, w) in words.iter().enumerate() {
                if w.load(Ordering::Relaxed) == 0 {
                    if let Some((s, n)) = run.take() {
                        self.reprotect(base, s, n)?;
                    }
                    continue;
                }
                let bits = w.swap(0, Ordering::Acquire);
                dst[i] |= bits;
                for b in 0..64u64 {
                    let page = i as u64 * 64 + b;
                    if bits & (1 << b) != 0 {
                        run = match run {
                            Some((s, n)) if s + n == page => Some((s, n + 1)),
                            Some((s, n)) => {
                                self.reprotect(base, s, n)?;
                                Some((page, 1))
                            }
                            None => Some((page, 1)),
                        };
                    }
                }
            }
            if let Some((s, n)) = run {
                self.reprotect(base, s, n)?;
            }
        }
        Ok(())
    }

    fn reprotect(&self, base: u64, first: u64, pages: u64) -> Result<(), WpTrackerError> {
        self.shared
            .uffd
            .writeprotect(base + first * PAGE_SIZE, pages * PAGE_SIZE, true, true)
            .map_err(WpTrackerError::Op)
    }

    fn stop_inner(&mut self) -> Result<(), WpTrackerError> {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
        if self.registered {
            // Unregistering removes the protection and wakes any writer still waiting.
            for &(h, l) in &self.shared.spans {
                self.shared
                    .uffd
                    .unregister(h, l)
                    .map_err(WpTrackerError::Op)?;
            }
            self.registered = false;
        }
        Ok(())
    }
}

impl DirtyTracker for WpDirtyTracker {
    fn start(&mut self) -> Result<(), BoxError> {
        Ok(self.start_inner()?)
    }

    fn harvest(&mut self, out: &mut DirtyBitmap) -> Result<(), BoxError> {
        Ok(self.harvest_inner(out)?)
    }

    fn stop(&mut self) -> Result<(), BoxError> {
        Ok(self.stop_inner()?)
    }
}

impl Drop for WpDirtyTracker {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn page_map_locates_across_regions() {
        let regions: Vec<GuestRegion> = [(0u64, 3u64), (0x100_0000, 5)]
            .iter()
            .map(|&(gpa, pages)| GuestRegion {
                gpa,
                len: pages * PAGE_SIZE,
                host_addr: 0,
                backing: crate::vm::Backing::Anonymous,
                page_size: PAGE_SIZE,
            })
            .collect();
        let m = PageMap::new(&regions);
        assert_eq!(m.total, 8);
        assert_eq!(m.locate(0), (0, 0));
        assert_eq!(m.locate(2), (0, 2));
        assert_eq!(m.locate(3), (1, 0));
        assert_eq!(m.locate(7), (1, 4));
    }

    #[test]
    fn atomic_dirty_harvest_swaps() {
        let regions = vec![GuestRegion {
            gpa: 0,
            len: 130 * PAGE_SIZE,
            host_addr: 0,
            backing: crate::vm::Backing::Anonymous,
            page_size: PAGE_SIZE,
        }];
        let d = AtomicDirty::for_regions(&regions);
        d.mark(0, 0);
        d.mark(0, 129);
        d.mark(0, 500); // out of range: ignored
        let mut out = DirtyBitmap::for_regions(&regions);
        d.harvest_into(&mut out);
        assert_eq!(out.count(), 2);
        assert_eq!(out.regions[0][2], 1 << 1);
        let mut again = DirtyBitmap::for_regions(&regions);
        d.harvest_into(&mut again);
        assert_eq!(again.count(), 0);
    }

    #[test]
    fn initial_fill_ratio() {
        let filled = (0..10_000).filter(|&p| initial_word(7, p, 50) != 0).count();
        assert!((4_000..6_000).contains(&filled), "{filled}");
        assert!((0..1000).all(|p| initial_word(7, p, 0) == 0));
    }
}
