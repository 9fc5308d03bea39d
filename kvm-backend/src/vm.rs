// SPDX-License-Identifier: Apache-2.0 OR MIT
//! [`KvmVm`]: a real KVM VM — memory slots, vCPU threads, in-kernel irqchip and PIT, the COM1
//! serial port, pause/resume, and complete state save/restore ([`VmControl`]).
//!
//! Threads: every vCPU has its own thread, the only one that ever issues its `KVM_RUN`.
//! Pause sets a flag, sets `kvm_run.immediate_exit` and signals the thread (`sys::Kicker`),
//! then waits until every thread is parked (with save while parking, only until every vCPU is
//! out of `KVM_RUN`: `save` waits for the rest). Throttling (auto-converge) kicks the vCPUs every 10
//! ms and lets them sleep part of the period.
//!
//! State around a blackout is handled where the threads are awake anyway, so the vCPUs'
//! pieces run in parallel and cost no extra thread wake-up:
//! - **Save while parking** ([`KvmVm::set_capture_on_pause`], on by default): a vCPU thread
//!   leaving `KVM_RUN` for a pause saves its own state before it reports parked; `save` takes
//!   these captures and reads only the VM-wide state (clock, irqchip, PIT, serial) itself. A
//!   capture is dropped as soon as the vCPU runs again or its state is set; without one, `save`
//!   saves the vCPUs on the calling thread.
//! - **Restore on resume** ([`KvmVm::set_restore_on_resume`], on by default): `restore`
//!   applies the VM-wide state and hands each vCPU its own; `resume` wakes the threads, each
//!   applies its state (the TSC too, so it is set when the vCPU is about to run, not at
//!   `restore`) and acknowledges, and only when every vCPU succeeded may any of them enter
//!   `KVM_RUN` (else `resume` fails and none runs). `resume` then covers the threads' wake-up,
//!   which it did not wait for before.
//!
//! Measured in-process on this 2-vCPU PVM host (test `state_transfer_modes_measured`, release
//! build, 2 vCPUs, 30 rounds per mode alternated, p50 of each of 11 runs over 15 minutes of
//! varying host load): from the start of `restore` until the last vCPU was about to enter
//! `KVM_RUN`, 0.24–4.4 ms restoring on the calling thread (`restore` 173–204 µs, then the
//! threads' wake-up: 44 µs–4.2 ms), 0.19–1.15 ms restoring on resume (`restore` 20–28 µs,
//! `resume` 149–244 µs); restore on resume was ahead in every run, so it is the default.
//! Saving while parking against saving on the calling thread: pause + save 148–230 µs against
//! 194–227 µs (each vCPU's own save ~70–78 µs either way; the two vCPUs leave `KVM_RUN` up to
//! ~100 µs apart, so on 2 cores their saves overlap only partly).
//!
//! State save/restore done on the calling thread (the fallbacks, and the inline restore mode)
//! handles the first four vCPUs there (KVM serialises the other vCPU ioctls itself, and a
//! thread wake-up can cost milliseconds on a busy host); further vCPUs are handled by their own
//! threads in parallel.
//!
//! Not here: the guest image and model ([`crate::guest`]), dirty tracking ([`crate::dirty`]),
//! the blob format ([`crate::state`]).

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_engine::vm::{BoxError, VmControl};
use kvm_bindings::{
    KVM_CLOCK_HOST_TSC, KVM_CLOCK_REALTIME, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
    KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET, Msrs, kvm_clock_data, kvm_enable_cap, kvm_irqchip,
    kvm_msr_entry, kvm_pit_config, kvm_regs, kvm_segment, kvm_sregs,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};

use crate::dirty::{ActiveDirtyMode, DirtyCore, DirtyMode, KvmDirtyTracker, Overflow};
use crate::guest::{
    self, GapLog, GapSplit, GapSplitError, GuestPlan, GuestSetupError, GuestStats, VerifyReport,
    Workload,
};
use crate::memory::{KvmMemory, MemBacking, MemoryError};
use crate::multiboot::{self, MultibootError};
use crate::state::{SerialState, StateDecodeError, TscState, VcpuState, VmState};
use crate::sys::{self, DirtyRing, Kicker};

/// `MSR_IA32_TSC`.
const MSR_IA32_TSC: u32 = 0x10;
/// Dirty ring size per vCPU in entries (16 bytes each), the first one tried: 512 (8 KiB).
/// What a vCPU's ring holds when it is paused is harvested inside the blackout (~40 ns per
/// entry here), so the ring is kept small: a vCPU exits to empty it every ~450 pages
/// (`KVM_EXIT_DIRTY_RING_FULL`). With 4096 entries the final harvest took 60–230 µs here,
/// depending on how full the rings happened to be.
const RING_ENTRIES: u32 = 512;
/// The largest ring tried when KVM refuses smaller ones (hosts that reserve more entries).
const RING_ENTRIES_MAX: u32 = 4096;
/// COM1 base port.
const COM1: u16 = 0x3F8;
/// Serial output kept in memory, at most.
const SERIAL_BUF_MAX: usize = 16 << 20;

/// Where the guest's COM1 output goes (it is always also kept in memory, up to 16 MiB).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SerialSink {
    /// Only the in-memory buffer ([`KvmVm::serial_output`]).
    #[default]
    Buffer,
    /// Also appended to this file.
    File(PathBuf),
    /// Also logged line by line with `tracing::info!`.
    Log,
}

/// Configuration of a [`KvmVm`]. Source and destination must use the same one.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest RAM in bytes; a multiple of 2 MiB.
    pub mem_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// The built-in guest.
    pub workload: Workload,
    /// Host backing of guest RAM.
    pub backing: MemBacking,
    /// Ask for transparent huge pages.
    pub thp: bool,
    /// Dirty-tracking mechanism.
    pub dirty: DirtyMode,
    /// Serial output.
    pub serial: SerialSink,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            mem_bytes: 64 << 20,
            vcpus: 1,
            workload: Workload::Idle,
            backing: MemBacking::Memfd,
            thp: false,
            dirty: DirtyMode::Auto,
            serial: SerialSink::Buffer,
        }
    }
}

/// Errors creating a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmCreateError {
    /// `/dev/kvm` could not be opened.
    #[error("Cannot open /dev/kvm")]
    OpenKvm(#[source] std::io::Error),
    /// A KVM ioctl during setup failed.
    #[error("KVM setup step '{step}' failed")]
    Kvm {
        /// What was being done.
        step: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A required capability is missing.
    #[error("KVM lacks capability {0}")]
    MissingCap(&'static str),
    /// Guest RAM could not be set up.
    #[error("Guest memory setup failed")]
    Memory(#[from] MemoryError),
    /// The built-in guest could not be laid out.
    #[error("Guest image setup failed")]
    Guest(#[from] GuestSetupError),
    /// The multiboot kernel could not be loaded.
    #[error("Cannot load the multiboot kernel")]
    Multiboot(#[from] MultibootError),
    /// The serial output file could not be opened.
    #[error("Cannot open serial output file {path}")]
    SerialFile {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A vCPU thread could not be spawned.
    #[error("Cannot spawn vCPU thread {0}")]
    Thread(u32, #[source] std::io::Error),
}

/// Errors of the lifecycle operations ([`VmControl`], start).
#[derive(Debug, thiserror::Error)]
pub enum VmRunError {
    /// A vCPU stopped because of a guest or KVM failure.
    #[error("vCPU {vcpu} failed: {reason}")]
    VcpuFault {
        /// vCPU index.
        vcpu: u32,
        /// What happened (exit reason or errno).
        reason: String,
    },
    /// A vCPU thread is gone.
    #[error("vCPU {0} thread exited")]
    ThreadGone(u32),
    /// Pause did not complete in time.
    #[error("vCPU {vcpu} did not park within {ms} ms")]
    PauseTimeout {
        /// vCPU index.
        vcpu: u32,
        /// Timeout.
        ms: u64,
    },
    /// The operation needs a paused VM.
    #[error("VM must be paused for {0}")]
    NotPaused(&'static str),
    /// A destination VM runs only after a state restore.
    #[error("Destination VM has no state yet: restore_state before resume")]
    NotRestored,
    /// A vCPU could not apply its state when resumed; no vCPU was let run.
    #[error("vCPU {vcpu} failed to restore its state on resume; no vCPU runs")]
    RestoreFailed {
        /// vCPU index.
        vcpu: u32,
        /// Cause.
        #[source]
        source: Box<RestoreStateError>,
    },
    /// A vCPU did not acknowledge its state restore in time; no vCPU was let run.
    #[error("vCPU {vcpu} did not acknowledge its state restore within {ms} ms; no vCPU runs")]
    RestoreTimeout {
        /// vCPU index.
        vcpu: u32,
        /// Timeout.
        ms: u64,
    },
}

/// Errors saving state.
#[derive(Debug, thiserror::Error)]
pub enum SaveStateError {
    /// A vCPU get ioctl failed.
    #[error("Saving {what} of vCPU {vcpu} failed")]
    Vcpu {
        /// vCPU.
        vcpu: u32,
        /// Which piece.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A VM get ioctl failed.
    #[error("Saving VM {what} failed")]
    Vm {
        /// Which piece.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A restored state not yet applied (restore on resume) could not be applied first.
    #[error("Cannot apply the pending vCPU restore before saving")]
    PendingRestore(#[source] Box<RestoreStateError>),
    /// Lifecycle failure (not paused, thread gone).
    #[error("Cannot save state")]
    Run(#[from] VmRunError),
}

/// Errors restoring state.
#[derive(Debug, thiserror::Error)]
pub enum RestoreStateError {
    /// The blob is malformed.
    #[error("State blob invalid")]
    Decode(#[from] StateDecodeError),
    /// The blob is for another VM shape.
    #[error(
        "State is for {blob_vcpus} vCPUs / guest {blob_guest:?}, this VM has {vcpus} / {guest:?}"
    )]
    Mismatch {
        /// vCPUs in the blob.
        blob_vcpus: usize,
        /// Guest identity in the blob.
        blob_guest: Vec<u64>,
        /// vCPUs here.
        vcpus: usize,
        /// Guest identity here.
        guest: Vec<u64>,
    },
    /// A vCPU set ioctl failed.
    #[error("Restoring {what} of vCPU {vcpu} failed")]
    Vcpu {
        /// vCPU.
        vcpu: u32,
        /// Which piece.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Some MSRs were refused.
    #[error("vCPU {vcpu}: KVM_SET_MSRS stopped at MSR {index:#x} ({set} of {total} set)")]
    Msr {
        /// vCPU.
        vcpu: u32,
        /// First MSR not set.
        index: u32,
        /// How many were set.
        set: usize,
        /// How many were given.
        total: usize,
    },
    /// A VM set ioctl failed.
    #[error("Restoring VM {what} failed")]
    Vm {
        /// Which piece.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Lifecycle failure.
    #[error("Cannot restore state")]
    Run(#[from] VmRunError),
}

/// Errors of [`KvmVm::verify_memory`].
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The VM is running; the model is only exact while paused.
    #[error("VM must be paused to verify memory")]
    Running,
    /// The workload has no memory model.
    #[error("Workload {0:?} has no memory model")]
    NoModel(Box<Workload>),
}

/// The COM1 UART (16550-style registers; transmit only).
#[derive(Debug, Default)]
struct Serial {
    regs: SerialState,
    out: Vec<u8>,
    file: Option<File>,
    log: bool,
    line: Vec<u8>,
}

impl Serial {
    fn dlab(&self) -> bool {
        self.regs.lcr & 0x80 != 0
    }

    fn write(&mut self, off: u16, v: u8) {
        match off {
            0 if self.dlab() => self.regs.dll = v,
            0 => {
                if self.out.len() < SERIAL_BUF_MAX {
                    self.out.push(v);
                }
                if let Some(f) = &mut self.file {
                    let _ = f.write_all(&[v]);
                }
                if self.log {
                    if v == b'\n' {
                        tracing::info!(target: "ferry_kvm::serial", "{}", String::from_utf8_lossy(&self.line));
                        self.line.clear();
                    } else {
                        self.line.push(v);
                    }
                }
            }
            1 if self.dlab() => self.regs.dlm = v,
            1 => self.regs.ier = v,
            3 => self.regs.lcr = v,
            4 => self.regs.mcr = v,
            7 => self.regs.scr = v,
            _ => {}
        }
    }

    fn read(&self, off: u16) -> u8 {
        match off {
            0 if self.dlab() => self.regs.dll,
            1 if self.dlab() => self.regs.dlm,
            1 => self.regs.ier,
            2 => 0x01, // IIR: no interrupt pending
            3 => self.regs.lcr,
            4 => self.regs.mcr,
            5 => 0x60, // LSR: transmitter holding register and shift register empty
            6 => 0xB0, // MSR: DCD, DSR, CTS
            7 => self.regs.scr,
            _ => 0,
        }
    }
}

/// Counters of exits the VMM handled or ignored.
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// Port I/O exits handled (serial, sleep).
    pub pio: AtomicU64,
    /// Port I/O exits to ports nobody owns (reads return 0xff, writes dropped).
    pub pio_unhandled: AtomicU64,
    /// MMIO exits (no MMIO devices: reads return 0xff, writes dropped).
    pub mmio: AtomicU64,
    /// Total `KVM_RUN` returns.
    pub runs: AtomicU64,
    /// Times a vCPU slept because of [`VmControl::throttle`].
    pub throttle_sleeps: AtomicU64,
}

/// State shared by the VM handle, vCPU threads and dirty tracker. Field order matters for
/// drop: `vm` (the KVM VM fd) goes before `memory`, so KVM never maps unmapped memory.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) vm: VmFd,
    pub(crate) memory: Arc<KvmMemory>,
    pub(crate) dirty: DirtyCore,
    serial: Mutex<Serial>,
    counters: ExitCounters,
    /// Share of each throttle period the vCPUs may run, in percent (100 = unthrottled).
    throttle_pct: AtomicU8,
}

/// vCPUs whose state is saved/restored on the calling thread (see `KvmVm::on_vcpus`).
const INLINE_VCPUS: usize = 4;

/// Words of the guest identity that must match between source and destination.
const IDENTITY_LEN: usize = 5;

/// Throttle period: every vCPU is kicked once per period and sleeps the throttled share of it.
const THROTTLE_PERIOD: Duration = Duration::from_millis(10);

/// How long `resume` waits for every vCPU to acknowledge its state restore.
const RESTORE_ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// How long either side of a restore round spins before it sleeps (see [`RestoreRound`]).
const SPIN_BUDGET: Duration = Duration::from_millis(2);

/// Polls `done`, yielding the CPU between polls, for at most [`SPIN_BUDGET`]; whether it got
/// true.
fn spin_until(mut done: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    loop {
        if done() {
            return true;
        }
        if t0.elapsed() >= SPIN_BUDGET {
            return false;
        }
        std::thread::yield_now();
    }
}

type Job = Box<dyn FnOnce(&mut VcpuFd) + Send>;

#[derive(Default)]
struct CtlState {
    run: bool,
    parked: bool,
    exit: bool,
    fault: Option<String>,
    jobs: VecDeque<Job>,
    /// Save the vCPU's state when it next leaves `KVM_RUN` for a pause (set by each pause).
    capture: bool,
    /// The state saved by the vCPU's thread when it parked for the current pause. Only valid
    /// for that pause: `resume` and the thread (before it runs again) clear it, `restore`
    /// clears it, `save` takes it.
    captured: Option<Captured>,
    /// A state the thread applies when it is next told to run (restore on resume).
    restore: Option<PendingRestore>,
}

/// A vCPU state saved by the vCPU's own thread as it parked.
struct Captured {
    state: VcpuState,
    steps: Steps,
}

/// What a vCPU needs to restore its state (on its own thread or the caller's).
struct RestoreJob {
    state: VcpuState,
    caps: Arc<VcpuCaps>,
    /// (host TSC, realtime) of the source's and this host's `KVM_GET_CLOCK`, when both have them.
    host_pairs: Option<((u64, u64), (u64, u64))>,
    /// The source's TSC rate differs from this host's: ask KVM to scale.
    scale_tsc: bool,
}

impl RestoreJob {
    fn apply(&self, id: u32, v: &mut VcpuFd) -> Result<Steps, RestoreStateError> {
        if self.scale_tsc
            && let Err(e) = v.set_tsc_khz(self.caps.tsc_khz)
        {
            tracing::warn!(
                "vCPU {id}: cannot scale the TSC to the source's {} kHz: {e}",
                self.caps.tsc_khz
            );
        }
        restore_vcpu(id, v, &self.state, &self.caps, self.host_pairs)
    }
}

/// A restore job handed to a vCPU thread, and the round it acknowledges to.
struct PendingRestore {
    job: RestoreJob,
    round: Arc<RestoreRound>,
}

/// One vCPU's answer to a restore round.
struct Ack {
    /// Its steps, or why it failed.
    result: Result<Steps, RestoreStateError>,
    /// From the start of `resume` until the thread began applying its state.
    woke: Duration,
}

#[derive(Default)]
struct RoundState {
    /// vCPUs that have not acknowledged yet.
    pending: usize,
    /// Some vCPU failed to restore.
    failed: bool,
    /// Acknowledgements by vCPU index.
    acks: Vec<Option<Ack>>,
    /// Go (every vCPU restored) or no-go; decided once, by `resume` when every vCPU has
    /// acknowledged or one failed or time ran out, or by a vCPU thread that waited too long.
    /// No vCPU enters `KVM_RUN` before it is `Some(true)`.
    go: Option<bool>,
}

/// The restore-on-resume hand-shake between `resume` and the vCPU threads. Both sides first
/// spin (yielding the CPU) for up to [`SPIN_BUDGET`] on the atomic mirrors of the state, then
/// sleep on the condvars: on this 2-core host a sleeping thread woken while the vCPUs run the
/// guest waits for a whole scheduler slice (milliseconds), and a thread it wakes may preempt
/// it. `resume` spins only when the host has a CPU for it beside one per vCPU thread.
struct RestoreRound {
    m: Mutex<RoundState>,
    /// Mirrors `pending == 0 || failed`, for spinning.
    settled: AtomicBool,
    /// Mirrors `go`: 0 undecided, 1 go, 2 no-go, for spinning.
    decision: AtomicU8,
    /// `resume` waits here for the acknowledgements.
    acked: Condvar,
    /// The vCPU threads wait here for the decision.
    decided: Condvar,
    /// When `resume` told the threads to run (set once, by `resume`).
    started: OnceLock<Instant>,
}

impl std::fmt::Debug for RestoreRound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.lock();
        f.debug_struct("RestoreRound")
            .field("pending", &g.pending)
            .field("go", &g.go)
            .finish_non_exhaustive()
    }
}

impl RestoreRound {
    fn new(vcpus: usize) -> Self {
        Self {
            m: Mutex::new(RoundState {
                pending: vcpus,
                failed: false,
                acks: (0..vcpus).map(|_| None).collect(),
                go: None,
            }),
            settled: AtomicBool::new(false),
            decision: AtomicU8::new(0),
            acked: Condvar::new(),
            decided: Condvar::new(),
            started: OnceLock::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, RoundState> {
        self.m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides (under the lock): `go` and its mirror, and wakes sleeping vCPU threads.
    fn decide(&self, g: &mut RoundState, go: bool) {
        g.go = Some(go);
        self.decision
            .store(if go { 1 } else { 2 }, Ordering::SeqCst);
        self.decided.notify_all();
    }

    /// A vCPU thread reports its restore, then waits for the decision; true means it may run.
    /// It never waits longer than `resume` does (plus a margin): no decision means no-go.
    fn ack(&self, id: u32, result: Result<Steps, RestoreStateError>, woke: Instant) -> bool {
        let woke = self
            .started
            .get()
            .map_or(Duration::ZERO, |s| woke.saturating_duration_since(*s));
        let mut g = self.lock();
        if result.is_err() {
            g.failed = true;
        }
        if let Some(slot) = g.acks.get_mut(id as usize)
            && slot.is_none()
        {
            *slot = Some(Ack { result, woke });
            g.pending = g.pending.saturating_sub(1);
        }
        if g.pending == 0 || g.failed {
            self.settled.store(true, Ordering::SeqCst);
            self.acked.notify_all();
        }
        if g.go.is_none() {
            drop(g);
            spin_until(|| self.decision.load(Ordering::SeqCst) != 0);
            g = self.lock();
        }
        let deadline = Instant::now() + RESTORE_ACK_TIMEOUT + Duration::from_secs(1);
        while g.go.is_none() {
            let now = Instant::now();
            if now >= deadline {
                self.decide(&mut g, false);
                break;
            }
            g = self
                .decided
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        g.go == Some(true)
    }
}

struct VcpuCtl {
    id: u32,
    /// Kernel thread id of the vCPU thread (userfaultfd reports it for vCPU faults).
    tid: OnceLock<i32>,
    /// The vCPU. Its thread holds the lock while running; while it is parked, other threads
    /// may lock it for get/set ioctls (KVM serialises vCPU ioctls on vcpu->mutex, and only
    /// `KVM_RUN` is tied to one thread: changing its thread costs an RCU grace period).
    vcpu: Mutex<VcpuFd>,
    m: Mutex<CtlState>,
    cv: Condvar,
    pause_req: AtomicBool,
    kicker: OnceLock<Kicker>,
    thread: OnceLock<std::thread::Thread>,
    /// When the thread last left its parking to enter `KVM_RUN` (after any restore).
    entered_run: Mutex<Option<Instant>>,
    /// Mirrors `CtlState::parked` (set and cleared under the lock, with a notify), so waits
    /// can combine it with `stopped_flag`.
    parked_flag: AtomicBool,
    /// Set by the thread as soon as it is out of `KVM_RUN` for a pause (before it saves its
    /// state and parks); cleared when it leaves its parking to run. From then on the vCPU no
    /// longer changes guest memory: the dirty log can be harvested while it saves.
    stopped_flag: AtomicBool,
    /// The thread is raised for the blackout ([`ferry_engine::boost`], by a pause or a
    /// standby): its scheduling before, which it puts back before it next enters `KVM_RUN`.
    boosted: Mutex<Option<ferry_engine::boost::Prior>>,
}

impl VcpuCtl {
    /// Raises the thread for the blackout (see `boosted`).
    fn boost(&self) {
        if let Some(&tid) = self.tid.get() {
            let mut b = self.boosted.lock().unwrap_or_else(|e| e.into_inner());
            if b.is_none() {
                *b = ferry_engine::boost::raise(Some(tid));
            }
        }
    }
}

impl std::fmt::Debug for VcpuCtl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuCtl")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl VcpuCtl {
    fn lock(&self) -> MutexGuard<'_, CtlState> {
        self.m.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Static facts about the vCPUs, fixed at creation.
#[derive(Debug, Clone)]
struct VcpuCaps {
    msr_list: Vec<u32>,
    /// Extra u32 words of the XSAVE area beyond 4096 bytes (`KVM_CAP_XSAVE2`), if XSAVE2.
    /// XSAVE support: `None` without `KVM_CAP_XSAVE` (then the FPU state is saved with
    /// `KVM_GET_FPU`), else the extra u32 words beyond 4096 bytes (`KVM_CAP_XSAVE2`; 0 without).
    xsave_fam: Option<usize>,
    /// `KVM_GET_XSAVE2` exists.
    xsave2: bool,
    /// `KVM_GET_CLOCK` returns (host TSC, realtime) pairs, which the `KVM_VCPU_TSC_OFFSET`
    /// algorithm needs; without them the offset is not read at all.
    clock_pairs: bool,
    tsc_offset_attr: bool,
    tsc_khz: u32,
}

/// Durations of the pieces of a save or restore: (what, duration), in order.
pub type Steps = Vec<(&'static str, Duration)>;

/// Records the duration of consecutive steps.
struct StepTimer {
    t: Instant,
    steps: Steps,
}

impl StepTimer {
    fn new() -> Self {
        Self {
            t: Instant::now(),
            steps: Vec::with_capacity(16),
        }
    }

    fn mark(&mut self, what: &'static str) {
        let now = Instant::now();
        self.steps.push((what, now - self.t));
        self.t = now;
    }
}

/// Pause/resume timings, measured by [`KvmVm`].
#[derive(Debug, Clone, Default)]
pub struct PauseTimings {
    /// Time from the start of the last `pause` until every vCPU was parked (with save while
    /// parking: until every vCPU was out of `KVM_RUN`; the threads' own saves follow).
    pub last_pause: Duration,
    /// Time the last `resume` took: until every thread was told to run; after a restore on
    /// resume, until every vCPU thread had woken up, applied its state and was about to enter
    /// `KVM_RUN` (the decision to let them run).
    pub last_resume: Duration,
    /// Time the last `save_state` took.
    pub last_save: Duration,
    /// Time the last `restore_state` took (with restore on resume: the VM-wide state and the
    /// hand-over only; the vCPUs' part is in `last_resume`).
    pub last_restore: Duration,
    /// The last save's pieces: VM-level ones, then vCPU 0's (saved while parking when
    /// `save_captured`, so outside `last_save`).
    pub save_steps: Steps,
    /// Whether the last save used the states the vCPU threads captured while parking.
    pub save_captured: bool,
    /// The last restore's pieces: VM-level ones and vCPU 0's (with restore on resume, vCPU 0's
    /// are added by the `resume` that applied them).
    pub restore_steps: Steps,
    /// Per vCPU: time its thread spent saving in the last save (excluding the hand-off); the
    /// time of its capture while parking when `save_captured`.
    pub vcpu_save: Vec<Duration>,
    /// Per vCPU: time spent restoring its state in the last restore.
    pub vcpu_restore: Vec<Duration>,
    /// Per vCPU, after a restore on resume: from the start of `resume` until its thread woke up
    /// and began applying its state (empty otherwise).
    pub vcpu_wake: Vec<Duration>,
}

/// A KVM virtual machine with a built-in guest. See the crate docs.
#[derive(Debug)]
pub struct KvmVm {
    // Field order is drop order: vCPU fds close before the VM fd and the guest RAM mappings.
    ctls: Vec<Arc<VcpuCtl>>,
    core: Arc<Core>,
    threads: Vec<JoinHandle<()>>,
    caps: VcpuCaps,
    plan: GuestPlan,
    cfg: VmConfig,
    running: bool,
    /// When the last `resume` started.
    resumed_at: Option<Instant>,
    /// Source, or a destination that has been restored: its vCPUs have a state to run.
    has_state: bool,
    timings: PauseTimings,
    /// Each vCPU's guest TSC in the last state saved or restored (where the gap log splits).
    state_tsc: Vec<u64>,
    /// The pages the vCPUs of the last saved state touch first ([`crate::hot`]).
    first_touch: Vec<u64>,
    /// vCPU threads save their state when they park for a pause.
    capture_on_pause: bool,
    /// `restore` hands vCPU states to their threads, which apply them on `resume`.
    restore_on_resume: bool,
    /// The restore round handed to the vCPU threads and not yet resumed.
    pending_round: Option<Arc<RestoreRound>>,
    /// `resume` may spin while the vCPU threads restore: there is a CPU for it beside one per
    /// vCPU thread (see `finish_restore_round`).
    spin_on_resume: bool,
    /// The thread that kicks vCPUs while throttled, and its stop flag.
    throttler: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
    _kvm: Kvm,
}

fn kvm_err(step: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmCreateError {
    move |e| VmCreateError::Kvm {
        step,
        source: e.into(),
    }
}

fn realtime_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn user_seg(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xB } else { 0x3 },
        present: 1,
        dpl: 3,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long mode at CPL3: paging on, user segments, busy TSS, no IDT.
fn initial_sregs(mut s: kvm_sregs) -> kvm_sregs {
    s.cs = user_seg(guest::SEL_USER_CODE, true);
    let d = user_seg(guest::SEL_USER_DATA, false);
    s.ds = d;
    s.es = d;
    s.fs = d;
    s.gs = d;
    s.ss = d;
    s.tr = kvm_segment {
        base: guest::TSS,
        limit: u32::try_from(guest::TSS_LIMIT).unwrap_or(0x67),
        selector: guest::SEL_TSS,
        type_: 0xB,
        present: 1,
        s: 0,
        ..Default::default()
    };
    s.ldt = kvm_segment {
        selector: 0,
        type_: 0x2,
        present: 1,
        limit: 0xffff,
        unusable: 1,
        ..Default::default()
    };
    s.gdt.base = guest::GDT;
    s.gdt.limit = 7 * 8 - 1;
    s.idt.base = 0;
    s.idt.limit = 0;
    // PE | MP | ET | NE | WP | PG
    s.cr0 = 0x8005_0033;
    // PAE | OSFXSR | OSXMMEXCPT
    s.cr4 = 0x620;
    s.cr3 = guest::PML4;
    // LME | LMA
    s.efer = 0x500;
    s
}

/// 32-bit protected mode, paging off, flat ring-0 segments (multiboot entry state).
fn multiboot_sregs(mut s: kvm_sregs) -> kvm_sregs {
    let seg = |selector: u16, type_: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.cs = seg(0x08, 0xB);
    let d = seg(0x10, 0x3);
    s.ds = d;
    s.es = d;
    s.fs = d;
    s.gs = d;
    s.ss = d;
    s.tr = kvm_segment {
        limit: 0xffff,
        type_: 0xB,
        present: 1,
        ..Default::default()
    };
    s.ldt = kvm_segment {
        type_: 0x2,
        present: 1,
        limit: 0xffff,
        unusable: 1,
        ..Default::default()
    };
    s.gdt.base = multiboot::BOOT_GDT;
    s.gdt.limit = 3 * 8 - 1;
    s.idt.base = 0;
    s.idt.limit = 0;
    // PE | ET
    s.cr0 = 0x11;
    s.cr3 = 0;
    s.cr4 = 0;
    s.efer = 0;
    s
}

impl KvmVm {
    /// Creates a source VM: RAM allocated and the guest image written, vCPUs set up to start
    /// the workload; nothing runs until [`KvmVm::start`].
    pub fn new_source(cfg: &VmConfig) -> Result<Self, VmCreateError> {
        Self::create(cfg, true)
    }

    /// Creates a destination VM with the same layout; its RAM is left unpopulated (not read,
    /// not written) for the engine to fill, and its vCPUs run only after
    /// [`VmControl::restore_state`] and [`VmControl::resume`].
    pub fn new_destination(cfg: &VmConfig) -> Result<Self, VmCreateError> {
        Self::create(cfg, false)
    }

    fn create(cfg: &VmConfig, source: bool) -> Result<Self, VmCreateError> {
        let kvm = Kvm::new().map_err(|e| VmCreateError::OpenKvm(e.into()))?;
        let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
        for (cap, name) in [
            (Cap::Irqchip, "IRQCHIP"),
            (Cap::ImmediateExit, "IMMEDIATE_EXIT"),
            (Cap::UserMemory, "USER_MEMORY"),
        ] {
            if !vm.check_extension(cap) {
                return Err(VmCreateError::MissingCap(name));
            }
        }
        let mode = choose_dirty_mode(&vm, cfg.dirty)?;
        vm.create_irq_chip().map_err(kvm_err("create irqchip"))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("create PIT"))?;
        let memory = Arc::new(KvmMemory::new(cfg.mem_bytes, cfg.backing, cfg.thp)?);
        for (slot, r) in ferry_engine::vm::GuestMemory::regions(&*memory)
            .iter()
            .enumerate()
        {
            let slot = u32::try_from(slot).unwrap_or(u32::MAX);
            sys::set_memory_region(&vm, slot, r.gpa, r.len, r.host_addr, 0).map_err(|source| {
                VmCreateError::Kvm {
                    step: "set memory region",
                    source,
                }
            })?;
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get supported CPUID"))?;
        let mut vcpus = Vec::new();
        let mut rings = Vec::new();
        for id in 0..cfg.vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("create vCPU"))?;
            let mut c = cpuid.clone();
            for e in c.as_mut_slice() {
                match e.function {
                    // Initial APIC id in EBX[31:24].
                    1 => e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24),
                    // x2APIC id.
                    0xB | 0x1F => e.edx = id,
                    _ => {}
                }
            }
            vcpu.set_cpuid2(&c).map_err(kvm_err("set CPUID"))?;
            if let ActiveDirtyMode::Ring { bytes } = mode {
                rings.push(Mutex::new(DirtyRing::map(&vcpu, bytes).map_err(
                    |source| VmCreateError::Kvm {
                        step: "map dirty ring",
                        source,
                    },
                )?));
            }
            vcpus.push(vcpu);
        }
        let Some(vcpu0) = vcpus.first() else {
            return Err(VmCreateError::Guest(GuestSetupError::TooLarge {
                mem: cfg.mem_bytes,
                vcpus: 0,
            }));
        };
        let tsc_khz = vcpu0.get_tsc_khz().map_err(kvm_err("get TSC kHz"))?;
        let caps = VcpuCaps {
            msr_list: usable_msrs(&kvm, vcpu0)?,
            xsave_fam: vm.check_extension(Cap::Xsave).then(|| {
                let sz = vm.check_extension_int(Cap::Xsave2);
                (usize::try_from(sz).unwrap_or(4096).saturating_sub(4096)).div_ceil(4)
            }),
            xsave2: vm.check_extension_int(Cap::Xsave2) > 0,
            clock_pairs: vm.get_clock().is_ok_and(|c| {
                c.flags & (KVM_CLOCK_HOST_TSC | KVM_CLOCK_REALTIME)
                    == (KVM_CLOCK_HOST_TSC | KVM_CLOCK_REALTIME)
            }),
            tsc_offset_attr: sys::vcpu_has_attr(
                vcpu0,
                KVM_VCPU_TSC_CTRL,
                u64::from(KVM_VCPU_TSC_OFFSET),
            ),
            tsc_khz,
        };
        let plan = GuestPlan::new(&cfg.workload, cfg.vcpus, cfg.mem_bytes, u64::from(tsc_khz))?;
        if let (true, Workload::Kernel { path, cmdline }) = (source, &cfg.workload) {
            let image = std::fs::read(path).map_err(|source| MultibootError::Read {
                path: path.clone(),
                source,
            })?;
            let boot = multiboot::load(&memory, &image, cmdline)?;
            // Only the boot processor starts; the others wait for INIT/SIPI as on hardware.
            let vcpu = &vcpus[0];
            let sregs = vcpu.get_sregs().map_err(kvm_err("get sregs"))?;
            vcpu.set_sregs(&multiboot_sregs(sregs))
                .map_err(kvm_err("set sregs"))?;
            let regs = kvm_regs {
                rip: u64::from(boot.entry),
                rax: u64::from(multiboot::BOOT_MAGIC),
                rbx: u64::from(boot.mbi),
                rflags: 0x2,
                ..Default::default()
            };
            vcpu.set_regs(&regs).map_err(kvm_err("set regs"))?;
        } else if source {
            guest::write_guest(&memory, &plan)?;
            for (id, vcpu) in vcpus.iter().enumerate() {
                let sregs = vcpu.get_sregs().map_err(kvm_err("get sregs"))?;
                vcpu.set_sregs(&initial_sregs(sregs))
                    .map_err(kvm_err("set sregs"))?;
                let regs = kvm_regs {
                    rip: plan.entry(),
                    rdi: id as u64,
                    // Reserved bit 1 | IOPL 3 (port I/O from ring 3); IF clear (no IDT).
                    rflags: 0x3002,
                    ..Default::default()
                };
                vcpu.set_regs(&regs).map_err(kvm_err("set regs"))?;
                // Application processors start in UNINITIALIZED (waiting for INIT/SIPI) with an
                // in-kernel LAPIC; our guest starts every vCPU directly.
                vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
                    mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
                })
                .map_err(kvm_err("set MP state"))?;
            }
        }
        let serial = Serial {
            file: match &cfg.serial {
                SerialSink::File(p) => Some(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)
                        .map_err(|source| VmCreateError::SerialFile {
                            path: p.clone(),
                            source,
                        })?,
                ),
                _ => None,
            },
            log: cfg.serial == SerialSink::Log,
            ..Default::default()
        };
        let overflow = Overflow::new(
            ferry_engine::vm::GuestMemory::regions(&*memory)
                .iter()
                .map(|r| r.pages()),
        );
        let core = Arc::new(Core {
            vm,
            memory,
            dirty: DirtyCore {
                mode,
                rings,
                overflow,
                logging: AtomicBool::new(false),
                ring_full_exits: AtomicU64::new(0),
            },
            serial: Mutex::new(serial),
            counters: ExitCounters::default(),
            throttle_pct: AtomicU8::new(100),
        });
        sys::install_kick_handler();
        let mut ctls = Vec::new();
        let mut threads = Vec::new();
        let thread_caps = Arc::new(caps.clone());
        for (id, vcpu) in vcpus.into_iter().enumerate() {
            let id = u32::try_from(id).unwrap_or(u32::MAX);
            let ctl = Arc::new(VcpuCtl {
                id,
                tid: OnceLock::new(),
                vcpu: Mutex::new(vcpu),
                m: Mutex::new(CtlState::default()),
                cv: Condvar::new(),
                pause_req: AtomicBool::new(false),
                kicker: OnceLock::new(),
                thread: OnceLock::new(),
                entered_run: Mutex::new(None),
                parked_flag: AtomicBool::new(false),
                stopped_flag: AtomicBool::new(false),
                boosted: Mutex::new(None),
            });
            let (c2, core2, caps2) = (
                Arc::clone(&ctl),
                Arc::clone(&core),
                Arc::clone(&thread_caps),
            );
            let h = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu_thread(&c2, &core2, &caps2))
                .map_err(|e| VmCreateError::Thread(id, e))?;
            let _ = ctl.thread.set(h.thread().clone());
            ctls.push(ctl);
            threads.push(h);
        }
        let vm = Self {
            core,
            ctls,
            threads,
            caps,
            plan,
            cfg: cfg.clone(),
            running: false,
            resumed_at: None,
            has_state: source,
            timings: PauseTimings::default(),
            state_tsc: Vec::new(),
            first_touch: Vec::new(),
            capture_on_pause: true,
            restore_on_resume: true,
            pending_round: None,
            spin_on_resume: std::thread::available_parallelism()
                .is_ok_and(|n| n.get() > usize::try_from(cfg.vcpus).unwrap_or(usize::MAX)),
            throttler: None,
            _kvm: kvm,
        };
        // Wait until every thread has published its kicker and parked.
        vm.wait_parked(Duration::from_secs(5)).map_err(|_| {
            VmCreateError::Thread(0, std::io::Error::other("vCPU thread did not start"))
        })?;
        Ok(vm)
    }

    /// Runs the vCPUs (source); same as [`VmControl::resume`].
    pub fn start(&mut self) -> Result<(), VmRunError> {
        self.resume_inner()
    }

    /// Whether each vCPU thread saves its own state when it parks for a pause (default on), so
    /// that `save` only reads the VM-wide state. Off: `save` saves every vCPU itself. Takes
    /// effect at the next pause.
    pub fn set_capture_on_pause(&mut self, on: bool) {
        self.capture_on_pause = on;
    }

    /// Whether `restore` leaves the vCPUs' state to their own threads, which apply it when
    /// `resume` wakes them and acknowledge before any vCPU runs (default on); off: `restore`
    /// applies every vCPU's state itself and `resume` only lets the threads run. Takes effect
    /// at the next restore.
    pub fn set_restore_on_resume(&mut self, on: bool) {
        self.restore_on_resume = on;
    }

    /// The guest RAM, for the engine.
    pub fn memory(&self) -> Arc<KvmMemory> {
        Arc::clone(&self.core.memory)
    }

    /// A dirty tracker for this VM (several may exist; they share the KVM log).
    pub fn dirty_tracker(&self) -> KvmDirtyTracker {
        KvmDirtyTracker::new(Arc::clone(&self.core))
    }

    /// The dirty-tracking mechanism chosen at creation.
    pub fn dirty_mode(&self) -> ActiveDirtyMode {
        self.core.dirty.mode
    }

    /// The guest's plan (workload parameters as the guest sees them).
    pub fn plan(&self) -> &GuestPlan {
        &self.plan
    }

    /// TSC frequency of the vCPUs in kHz.
    pub fn tsc_khz(&self) -> u32 {
        self.caps.tsc_khz
    }

    /// Whether the TSC is saved and restored through `KVM_VCPU_TSC_OFFSET` (KVM exposes it and
    /// `KVM_GET_CLOCK` gives host TSC/realtime pairs); else through `MSR_IA32_TSC`.
    pub fn has_tsc_offset_control(&self) -> bool {
        self.caps.tsc_offset_attr && self.caps.clock_pairs
    }

    /// The configuration the VM was created with.
    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }

    /// MSRs saved per vCPU (from `KVM_GET_MSR_INDEX_LIST`, filtered to readable/writable ones,
    /// TSC excluded because it is handled separately).
    pub fn msr_list(&self) -> &[u32] {
        &self.caps.msr_list
    }

    /// Kernel thread ids of the vCPU threads, by vCPU index (a userfaultfd event's `ptid` names
    /// the vCPU that faulted).
    pub fn vcpu_tids(&self) -> Vec<i32> {
        self.ctls
            .iter()
            .map(|c| c.tid.get().copied().unwrap_or(0))
            .collect()
    }

    /// Whether the vCPUs are running.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Exit counters.
    pub fn exit_counters(&self) -> &ExitCounters {
        &self.core.counters
    }

    /// Time from the start of the last `resume` until the last vCPU thread was about to enter
    /// `KVM_RUN` (woken, state applied); `None` while some thread has not got there yet. It
    /// covers the thread wake-ups that `resume` itself does not wait for without restore on
    /// resume.
    pub fn resume_to_run(&self) -> Option<Duration> {
        let t0 = self.resumed_at?;
        let mut last = t0;
        for c in &self.ctls {
            let at = (*c.entered_run.lock().unwrap_or_else(|e| e.into_inner()))?;
            last = last.max(at);
        }
        Some(last - t0)
    }

    /// Latest pause/resume/save/restore timings.
    pub fn timings(&self) -> &PauseTimings {
        &self.timings
    }

    /// What the built-in guest published in its statistics pages (readable while running).
    pub fn guest_stats(&self) -> GuestStats {
        guest::read_stats(&self.core.memory, &self.plan)
    }

    /// The built-in guest's gap logs (read while paused: a running guest appends to them).
    pub fn guest_gap_log(&self) -> GapLog {
        guest::read_gap_log(&self.core.memory, &self.plan)
    }

    /// Each vCPU's guest TSC in the last state this VM saved (source: taken right after the
    /// pause) or restored (destination: the source's); empty before either.
    pub fn state_tsc(&self) -> &[u64] {
        &self.state_tsc
    }

    /// The gap logs split at [`Self::state_tsc`]: before the pause, the gap spanning it (the
    /// switchover as the guest saw it), after it. Fails before any save or restore.
    pub fn guest_gap_split(&self) -> Result<GapSplit, GapSplitError> {
        self.guest_gap_log().split(&self.state_tsc)
    }

    /// Checks every data page (plus code and parameters) against the workload's model. The VM
    /// must be paused (the model is exact only at a standstill).
    pub fn verify_memory(&self) -> Result<VerifyReport, VerifyError> {
        if self.running {
            return Err(VerifyError::Running);
        }
        if !self.plan.workload.is_builtin() {
            return Err(VerifyError::NoModel(Box::new(self.plan.workload.clone())));
        }
        Ok(guest::verify(&self.core.memory, &self.plan))
    }

    /// Everything the guest wrote to COM1 so far (lossy UTF-8).
    pub fn serial_output(&self) -> String {
        let s = self.core.serial.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&s.out).into_owned()
    }

    /// The first vCPU failure, if a vCPU stopped because of the guest or KVM.
    pub fn fault(&self) -> Option<VmRunError> {
        self.ctls.iter().find_map(|c| {
            c.lock()
                .fault
                .clone()
                .map(|reason| VmRunError::VcpuFault { vcpu: c.id, reason })
        })
    }

    /// Sleeps until `done` holds for every vCPU (the threads notify their condvar when they
    /// stop and when they park).
    fn wait_stopped(
        &self,
        done: &dyn Fn(&VcpuCtl) -> bool,
        timeout: Duration,
    ) -> Result<(), VmRunError> {
        let deadline = Instant::now() + timeout;
        for c in &self.ctls {
            let mut g = c.lock();
            while !done(c) && !g.exit {
                let now = Instant::now();
                if now >= deadline {
                    return Err(VmRunError::PauseTimeout {
                        vcpu: c.id,
                        ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                    });
                }
                g =
                    c.cv.wait_timeout(g, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
            }
        }
        Ok(())
    }

    fn wait_parked(&self, timeout: Duration) -> Result<(), VmRunError> {
        // `parked_flag` mirrors `parked` and is set under the lock, with a notify.
        self.wait_stopped(&|c| c.parked_flag.load(Ordering::SeqCst), timeout)
    }

    /// Raises every vCPU thread for the blackout (see [`ferry_engine::boost`]): the restore
    /// and resume that follow within about a millisecond do not wait behind other threads for
    /// a CPU. Each thread drops back to its own priority before it runs the guest.
    pub fn standby(&self) {
        for c in &self.ctls {
            c.boost();
        }
    }

    /// Parks every vCPU; with `capture`, each thread leaving `KVM_RUN` saves its state first.
    fn pause_inner(&mut self, capture: bool) -> Result<(), VmRunError> {
        let t0 = Instant::now();
        for c in &self.ctls {
            {
                let mut g = c.lock();
                g.run = false;
                g.capture = capture;
            }
            c.pause_req.store(true, Ordering::SeqCst);
            if let Some(k) = c.kicker.get() {
                k.kick();
            }
            if let Some(t) = c.thread.get() {
                t.unpark();
            }
        }
        ferry_engine::timeline::mark("kvm kicked");
        // Then raised, so that a thread waiting for a CPU handles its kick and saves its
        // state ahead of everything else (after the kicks: raising costs a system call each).
        for c in &self.ctls {
            c.boost();
        }
        ferry_engine::timeline::mark("kvm boosted");
        // The threads stop within a few hundred µs (a kick, completing a pending exit): spin
        // rather than sleep, a wake-up costs as much here (see `RestoreRound`). With capture,
        // the pause ends when every vCPU is out of `KVM_RUN`: the threads save their state
        // while the caller harvests the dirty log, and `save` waits for them to park.
        let done = |c: &VcpuCtl| {
            c.parked_flag.load(Ordering::SeqCst)
                || (capture && c.stopped_flag.load(Ordering::SeqCst))
        };
        // Sleep: a thread polling here kept a vCPU thread that waited for a CPU from handling
        // its kick (on two cores, measured).
        if capture {
            self.wait_stopped(&done, Duration::from_secs(10))?;
        } else {
            self.wait_parked(Duration::from_secs(10))?;
        }
        self.running = false;
        self.timings.last_pause = t0.elapsed();
        Ok(())
    }

    fn resume_inner(&mut self) -> Result<(), VmRunError> {
        if let Some(f) = self.fault() {
            return Err(f);
        }
        if !self.has_state {
            return Err(VmRunError::NotRestored);
        }
        let t0 = Instant::now();
        self.resumed_at = Some(t0);
        for c in &self.ctls {
            *c.entered_run.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        let round = self.pending_round.take();
        if let Some(r) = &round {
            let _ = r.started.set(t0);
        }
        for c in &self.ctls {
            let mut g = c.lock();
            c.pause_req.store(false, Ordering::SeqCst);
            g.run = true;
            // The vCPU may run from here on: its capture belongs to the pause that ends.
            g.captured = None;
            c.cv.notify_all();
        }
        if let Some(round) = round
            && let Err(e) = self.finish_restore_round(&round, t0)
        {
            // Nobody ran (the round said no-go); park them all again, with no state.
            for c in &self.ctls {
                let mut g = c.lock();
                g.run = false;
                g.restore = None;
                c.pause_req.store(true, Ordering::SeqCst);
            }
            if let Err(pe) = self.wait_parked(Duration::from_secs(10)) {
                tracing::warn!("parking after a failed restore: {pe}");
            }
            self.has_state = false;
            self.running = false;
            self.timings.last_resume = t0.elapsed();
            return Err(e);
        }
        self.running = true;
        self.timings.last_resume = t0.elapsed();
        Ok(())
    }

    /// Waits (bounded) for every vCPU thread to acknowledge its restore, and records the
    /// timings; an error if any failed or did not answer, after making sure none will run.
    fn finish_restore_round(
        &mut self,
        round: &RestoreRound,
        t0: Instant,
    ) -> Result<(), VmRunError> {
        let deadline = t0 + RESTORE_ACK_TIMEOUT;
        // Spinning holds a CPU. With no CPU to spare beside the vCPU threads it holds one that
        // a vCPU thread needs: on the 2-core host, with 2 vCPUs, the two restores then ran one
        // after the other on the other CPU (~100 µs more blackout; a yield does not help, the
        // waiting thread is queued on the other CPU). Sleep instead: the CPU goes to the
        // vCPU thread, and the last acknowledgement wakes this thread.
        if self.spin_on_resume {
            spin_until(|| round.settled.load(Ordering::SeqCst));
        }
        let mut g = round.lock();
        while g.go.is_none() {
            if g.pending == 0 || g.failed {
                let go = !g.failed;
                round.decide(&mut g, go);
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                // No-go: whoever acknowledges later will not run.
                round.decide(&mut g, false);
                let vcpu = g.acks.iter().position(Option::is_none).unwrap_or(0);
                return Err(VmRunError::RestoreTimeout {
                    vcpu: u32::try_from(vcpu).unwrap_or(u32::MAX),
                    ms: u64::try_from(RESTORE_ACK_TIMEOUT.as_millis()).unwrap_or(u64::MAX),
                });
            }
            g = round
                .acked
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let acks = std::mem::take(&mut g.acks);
        let go = g.go == Some(true);
        drop(g);
        let mut vcpu_restore = Vec::with_capacity(acks.len());
        let mut vcpu_wake = Vec::with_capacity(acks.len());
        let mut failed = None;
        for (i, a) in acks.into_iter().enumerate() {
            let id = u32::try_from(i).unwrap_or(u32::MAX);
            match a {
                Some(Ack {
                    result: Ok(steps),
                    woke,
                }) => {
                    vcpu_restore.push(steps.iter().map(|s| s.1).sum());
                    vcpu_wake.push(woke);
                    if id == 0 {
                        self.timings.restore_steps.extend(steps);
                    }
                }
                Some(Ack {
                    result: Err(e),
                    woke,
                }) => {
                    vcpu_restore.push(Duration::ZERO);
                    vcpu_wake.push(woke);
                    if failed.is_none() {
                        failed = Some(VmRunError::RestoreFailed {
                            vcpu: id,
                            source: Box::new(e),
                        });
                    }
                }
                None => {
                    vcpu_restore.push(Duration::ZERO);
                    vcpu_wake.push(Duration::ZERO);
                }
            }
        }
        self.timings.vcpu_restore = vcpu_restore;
        self.timings.vcpu_wake = vcpu_wake;
        if let Some(e) = failed {
            return Err(e);
        }
        if !go {
            // Decided no-go without a failure recorded: a thread gave up waiting.
            return Err(VmRunError::RestoreTimeout {
                vcpu: 0,
                ms: u64::try_from(RESTORE_ACK_TIMEOUT.as_millis()).unwrap_or(u64::MAX),
            });
        }
        tracing::debug!(
            resume_us = micros(t0.elapsed()),
            wake_us = ?self.timings.vcpu_wake.iter().map(|d| micros(*d)).collect::<Vec<_>>(),
            restore_us = ?self.timings.vcpu_restore.iter().map(|d| micros(*d)).collect::<Vec<_>>(),
            "vCPUs restored on resume"
        );
        Ok(())
    }

    /// Runs `f` for every (parked) vCPU and collects the results by index: the first
    /// [`INLINE_VCPUS`] on the calling thread, one after the other, the rest on their own
    /// threads in parallel with them. Waking a parked thread costs ~50 µs on an idle host but
    /// up to a scheduler period (measured 3-11 ms here) on a busy one, while one vCPU's state
    /// is ~80 µs of ioctls, so small VMs are faster and more predictable inline.
    fn on_vcpus<R: Send + 'static>(
        &self,
        f: impl Fn(u32, &mut VcpuFd) -> R + Send + Sync + 'static,
    ) -> Result<Vec<R>, VmRunError> {
        let f = Arc::new(f);
        let (tx, rx) = std::sync::mpsc::channel();
        for c in self.ctls.iter().skip(INLINE_VCPUS) {
            let (f, tx, id) = (Arc::clone(&f), tx.clone(), c.id);
            let mut g = c.lock();
            if g.exit {
                return Err(VmRunError::ThreadGone(c.id));
            }
            g.jobs.push_back(Box::new(move |v: &mut VcpuFd| {
                let _ = tx.send((id, f(id, v)));
            }));
            c.cv.notify_all();
        }
        drop(tx);
        let mut out: Vec<Option<R>> = (0..self.ctls.len()).map(|_| None).collect();
        for (slot, c) in out.iter_mut().zip(&self.ctls).take(INLINE_VCPUS) {
            // Parked (the caller checked), so the lock is free or about to be.
            let mut v = c.vcpu.lock().unwrap_or_else(|e| e.into_inner());
            *slot = Some(f(c.id, &mut v));
        }
        for _ in INLINE_VCPUS.min(self.ctls.len())..self.ctls.len() {
            let (id, r) = rx
                .recv_timeout(Duration::from_secs(10))
                .map_err(|_| VmRunError::ThreadGone(0))?;
            if let Some(slot) = out.get_mut(id as usize) {
                *slot = Some(r);
            }
        }
        out.into_iter()
            .enumerate()
            .map(|(i, r)| r.ok_or(VmRunError::ThreadGone(u32::try_from(i).unwrap_or(0))))
            .collect()
    }

    /// What the blob records about the guest: the first [`IDENTITY_LEN`] words must match the
    /// destination's configuration; the last two (TSC ticks per page and TSC kHz) are the
    /// source host's and are adopted by the destination.
    fn guest_identity(&self) -> Vec<u64> {
        vec![
            self.plan.workload.id(),
            u64::from(self.plan.vcpus),
            self.plan.mem_bytes,
            self.plan.pages_per_vcpu,
            self.plan.qwords,
            self.plan.ticks_per_page,
            self.plan.tsc_khz,
        ]
    }

    /// Captures the complete state (the VM must be paused). Uses the vCPU states the threads
    /// saved while parking for this pause when every vCPU has one, else saves the vCPUs here.
    pub fn save(&mut self) -> Result<VmState, SaveStateError> {
        if self.running {
            return Err(VmRunError::NotPaused("save_state").into());
        }
        let t0 = Instant::now();
        let mut t = StepTimer::new();
        // The VM-wide state first: after a pause with capture, the vCPU threads are still
        // saving theirs.
        let vm = &self.core.vm;
        let vm_err = |what| {
            move |e: kvm_ioctls::Error| SaveStateError::Vm {
                what,
                source: e.into(),
            }
        };
        let clock = vm.get_clock().map_err(vm_err("clock"))?;
        let mut irqchips = [kvm_irqchip::default(); 3];
        for (i, c) in irqchips.iter_mut().enumerate() {
            c.chip_id = u32::try_from(i).unwrap_or(0);
            vm.get_irqchip(c).map_err(vm_err("irqchip"))?;
        }
        let pit = vm.get_pit2().map_err(vm_err("PIT"))?;
        t.mark("vm clock/irqchip/pit");
        ferry_engine::timeline::mark("kvm vm state saved");
        // A pause with capture returns before the threads have saved and parked.
        self.wait_parked(Duration::from_secs(10))?;
        ferry_engine::timeline::mark("kvm all parked");
        // State handed to the threads but not applied yet is the vCPUs' state: apply it now.
        if let Err(e) = self.apply_pending_restore() {
            self.has_state = false;
            return Err(SaveStateError::PendingRestore(Box::new(e)));
        }
        let mut vcpus = Vec::with_capacity(self.ctls.len());
        let mut vcpu0_steps = Vec::new();
        self.timings.vcpu_save.clear();
        let captured: Vec<Option<Captured>> =
            self.ctls.iter().map(|c| c.lock().captured.take()).collect();
        self.timings.save_captured = captured.iter().all(Option::is_some);
        if self.timings.save_captured {
            for cap in captured.into_iter().flatten() {
                self.timings
                    .vcpu_save
                    .push(cap.steps.iter().map(|s| s.1).sum());
                if cap.state.id == 0 {
                    vcpu0_steps = cap.steps;
                }
                vcpus.push(cap.state);
            }
            t.mark("vcpus (captured while parking)");
        } else {
            let caps = self.caps.clone();
            for r in self.on_vcpus(move |id, v| save_vcpu(id, v, &caps))? {
                let (st, steps) = r?;
                self.timings.vcpu_save.push(steps.iter().map(|s| s.1).sum());
                if st.id == 0 {
                    vcpu0_steps = steps;
                }
                vcpus.push(st);
            }
            t.mark("vcpus");
        }
        let serial = self
            .core
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .regs;
        let st = VmState {
            clock,
            irqchips,
            pit,
            serial,
            guest: self.guest_identity(),
            saved_at_ns: realtime_ns(),
            vcpus,
        };
        self.timings.last_save = t0.elapsed();
        self.state_tsc = tsc_by_vcpu(&st.vcpus);
        self.first_touch = first_touch(&self.core.memory, &st.vcpus);
        ferry_engine::timeline::mark("kvm first touch walked");
        tracing::debug!(
            save_us = micros(self.timings.last_save),
            captured = self.timings.save_captured,
            vcpu_save_us = ?self.timings.vcpu_save.iter().map(|d| micros(*d)).collect::<Vec<_>>(),
            "vCPU state saved"
        );
        t.steps.extend(vcpu0_steps);
        self.timings.save_steps = t.steps;
        Ok(st)
    }

    /// Applies a saved state (the VM must be paused; normally a fresh destination). The
    /// VM-wide state is applied here; the vCPUs' own state here too, or, with restore on resume
    /// (the default), by their threads when [`VmControl::resume`] wakes them, which reports
    /// any failure.
    pub fn restore(&mut self, st: &VmState) -> Result<(), RestoreStateError> {
        if self.running {
            return Err(VmRunError::NotPaused("restore_state").into());
        }
        // A pause with capture returns before the threads have saved and parked.
        self.wait_parked(Duration::from_secs(10))?;
        let mine = self.guest_identity();
        let mismatch = || RestoreStateError::Mismatch {
            blob_vcpus: st.vcpus.len(),
            blob_guest: st.guest.clone(),
            vcpus: self.ctls.len(),
            guest: mine.clone(),
        };
        if st.vcpus.len() != self.ctls.len()
            || st.guest.len() != mine.len()
            || st.guest[..IDENTITY_LEN] != mine[..IDENTITY_LEN]
        {
            return Err(mismatch());
        }
        let t0 = Instant::now();
        let mut t = StepTimer::new();
        // Each vCPU's state, by vCPU index.
        let mut states = Vec::with_capacity(self.ctls.len());
        for c in &self.ctls {
            states.push(
                st.vcpus
                    .iter()
                    .find(|s| s.id == c.id)
                    .ok_or_else(mismatch)?
                    .clone(),
            );
        }
        // Whatever the threads captured or were handed before is superseded from here on.
        self.pending_round = None;
        for c in &self.ctls {
            let mut g = c.lock();
            g.captured = None;
            g.restore = None;
        }
        let vm = &self.core.vm;
        let vm_err = |what| {
            move |e: kvm_ioctls::Error| RestoreStateError::Vm {
                what,
                source: e.into(),
            }
        };
        for c in &st.irqchips {
            vm.set_irqchip(c).map_err(vm_err("irqchip"))?;
        }
        vm.set_pit2(&st.pit).map_err(vm_err("PIT"))?;
        t.mark("vm irqchip/pit");
        // kvmclock and TSC advance by the wall-clock time since the save, so the guest sees
        // the blackout as elapsed time and never goes backwards.
        let now_clock = vm.get_clock().map_err(vm_err("clock"))?;
        let elapsed = realtime_ns().saturating_sub(st.saved_at_ns);
        let clock = kvm_clock_data {
            clock: st.clock.clock.wrapping_add(elapsed),
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(vm_err("clock"))?;
        t.mark("vm clock");
        // The KVM_VCPU_TSC_OFFSET algorithm needs the (host TSC, realtime) pairs of both ends.
        // Any consistent pair of this host serves: the offset it yields makes the guest TSC
        // the saved one plus the wall-clock time since, whenever it is applied.
        let host_pair_src = (st.clock.flags & (KVM_CLOCK_HOST_TSC | KVM_CLOCK_REALTIME)
            == (KVM_CLOCK_HOST_TSC | KVM_CLOCK_REALTIME))
            .then_some((st.clock.host_tsc, st.clock.realtime));
        let host_pair_dst = (now_clock.flags & (KVM_CLOCK_HOST_TSC | KVM_CLOCK_REALTIME)
            == (KVM_CLOCK_HOST_TSC | KVM_CLOCK_REALTIME))
            .then_some((now_clock.host_tsc, now_clock.realtime));
        self.core
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .regs = st.serial;
        let mut caps = self.caps.clone();
        let src_khz = u32::try_from(st.guest[6]).unwrap_or(caps.tsc_khz);
        // A guest's TSC must tick at the source's rate: ask KVM to scale it (TSC_CONTROL) when
        // this host's differs; without scaling the guest's clock runs at the wrong rate, which
        // is reported but not fatal.
        let scale_tsc = src_khz != caps.tsc_khz;
        caps.tsc_khz = src_khz;
        let caps = Arc::new(caps);
        let jobs: Vec<RestoreJob> = states
            .into_iter()
            .map(|state| RestoreJob {
                state,
                caps: Arc::clone(&caps),
                host_pairs: host_pair_src.zip(host_pair_dst),
                scale_tsc,
            })
            .collect();
        self.timings.vcpu_restore.clear();
        self.timings.vcpu_wake.clear();
        if self.restore_on_resume {
            let round = Arc::new(RestoreRound::new(jobs.len()));
            for (c, job) in self.ctls.iter().zip(jobs) {
                c.lock().restore = Some(PendingRestore {
                    job,
                    round: Arc::clone(&round),
                });
            }
            self.pending_round = Some(round);
            t.mark("vcpus handed to their threads");
            self.timings.restore_steps = t.steps;
        } else {
            let steps = self.restore_inline(jobs)?;
            t.mark("vcpus");
            t.steps.extend(steps);
            self.timings.restore_steps = t.steps;
        }
        self.timings.last_restore = t0.elapsed();
        // The guest keeps the source's parameters (they are in its memory); so does the model.
        self.plan.ticks_per_page = st.guest[5];
        self.plan.tsc_khz = st.guest[6];
        self.state_tsc = tsc_by_vcpu(&st.vcpus);
        self.has_state = true;
        Ok(())
    }

    /// Restores every vCPU from this thread ([`Self::on_vcpus`]); `jobs` by vCPU index.
    /// Returns vCPU 0's steps and records the per-vCPU times.
    fn restore_inline(&mut self, jobs: Vec<RestoreJob>) -> Result<Steps, RestoreStateError> {
        let jobs = Arc::new(jobs);
        let results = self.on_vcpus(move |id, v| match jobs.get(id as usize) {
            Some(job) => job.apply(id, v),
            None => Err(RestoreStateError::Run(VmRunError::ThreadGone(id))),
        })?;
        self.timings.vcpu_restore.clear();
        let mut vcpu0 = Vec::new();
        for (id, r) in results.into_iter().enumerate() {
            let steps = r?;
            self.timings
                .vcpu_restore
                .push(steps.iter().map(|s| s.1).sum());
            if id == 0 {
                vcpu0 = steps;
            }
        }
        Ok(vcpu0)
    }

    /// Applies, from this thread, vCPU states handed to their threads and not yet resumed (a
    /// `save` between `restore` and `resume` must see them).
    fn apply_pending_restore(&mut self) -> Result<(), RestoreStateError> {
        if self.pending_round.take().is_none() {
            return Ok(());
        }
        let mut jobs = Vec::with_capacity(self.ctls.len());
        for c in &self.ctls {
            match c.lock().restore.take() {
                Some(p) => jobs.push(p.job),
                None => return Err(VmRunError::ThreadGone(c.id).into()),
            }
        }
        let steps = self.restore_inline(jobs)?;
        self.timings.restore_steps.extend(steps);
        Ok(())
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Each vCPU's saved guest TSC, by vCPU index.
/// The pages `vcpus` touch first when they run again, interleaved across vCPUs so each one's
/// most urgent pages (code, stack) come first.
fn first_touch(mem: &KvmMemory, vcpus: &[VcpuState]) -> Vec<u64> {
    let read = |gpa: u64| mem.gpa_to_ram_offset(gpa).and_then(|off| mem.read_u64(off));
    let is_ram = |gpa: u64| mem.gpa_to_ram_offset(gpa).is_some();
    let per_vcpu: Vec<Vec<u64>> = vcpus
        .iter()
        .map(|v| crate::hot::first_touch_pages(&v.regs, &v.sregs, &read, &is_ram))
        .collect();
    let longest = per_vcpu.iter().map(Vec::len).max().unwrap_or(0);
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for i in 0..longest {
        for pages in &per_vcpu {
            if let Some(&p) = pages.get(i)
                && seen.insert(p)
            {
                out.push(p);
            }
        }
    }
    out
}

fn tsc_by_vcpu(vcpus: &[VcpuState]) -> Vec<u64> {
    let mut v: Vec<(u32, u64)> = vcpus.iter().map(|s| (s.id, s.tsc.tsc)).collect();
    v.sort_unstable();
    v.into_iter().map(|(_, t)| t).collect()
}

fn choose_dirty_mode(vm: &VmFd, want: DirtyMode) -> Result<ActiveDirtyMode, VmCreateError> {
    let manual = vm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
    let ring_acq = vm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL));
    let ring = vm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_DIRTY_LOG_RING));
    let use_ring = match want {
        DirtyMode::Ring => true,
        DirtyMode::Bitmap => false,
        DirtyMode::Auto => ring_acq > 0 || ring > 0,
    };
    if use_ring {
        let (cap, max) = if ring_acq > 0 {
            (kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL, ring_acq)
        } else if ring > 0 {
            (kvm_bindings::KVM_CAP_DIRTY_LOG_RING, ring)
        } else {
            return Err(VmCreateError::MissingCap("DIRTY_LOG_RING"));
        };
        // The smallest ring KVM takes (it needs room for its reserved entries: 64, plus 512
        // on hosts with Intel PML), up to the largest it allows.
        let max = u32::try_from(max).unwrap_or(u32::MAX);
        let mut entries = RING_ENTRIES;
        let enabled = loop {
            let bytes = (entries * 16).min(max);
            let mut c = kvm_enable_cap {
                cap,
                ..Default::default()
            };
            c.args[0] = u64::from(bytes);
            match vm.enable_cap(&c) {
                Ok(()) => break Ok(bytes),
                Err(e)
                    if e.errno() == libc::EINVAL
                        && entries < RING_ENTRIES_MAX
                        && entries * 16 < max =>
                {
                    entries *= 2;
                }
                Err(e) => break Err(e),
            }
        };
        match enabled {
            Ok(bytes) => return Ok(ActiveDirtyMode::Ring { bytes }),
            // Asked for: the caller hears why not.
            Err(e) if want == DirtyMode::Ring => return Err(kvm_err("enable dirty ring")(e)),
            // Auto: a KVM that offers the ring but refuses every size tried still has the
            // bitmap (nothing was enabled).
            Err(e) => tracing::debug!("dirty ring refused ({e}): using the dirty bitmap"),
        }
    }
    let flags = u64::from(
        kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            | kvm_bindings::KVM_DIRTY_LOG_INITIALLY_SET,
    );
    if u64::try_from(manual).is_ok_and(|m| m & flags == flags) {
        let mut c = kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            ..Default::default()
        };
        c.args[0] = flags;
        vm.enable_cap(&c)
            .map_err(kvm_err("enable manual dirty log protect"))?;
        return Ok(ActiveDirtyMode::ManualBitmap);
    }
    Ok(ActiveDirtyMode::ClassicBitmap)
}

/// `KVM_GET_MSR_INDEX_LIST`, keeping MSRs this vCPU can read and write back unchanged
/// (probed before the vCPU ever runs, so writing the value read is a no-op).
fn usable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, VmCreateError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(kvm_err("get MSR index list"))?;
    let mut out = Vec::new();
    for &index in list.as_slice() {
        if index == MSR_IA32_TSC {
            continue;
        }
        let Ok(mut m) = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }]) else {
            continue;
        };
        if vcpu.get_msrs(&mut m).ok() == Some(1) && vcpu.set_msrs(&m).ok() == Some(1) {
            out.push(index);
        }
    }
    Ok(out)
}

fn save_vcpu(
    id: u32,
    v: &mut VcpuFd,
    caps: &VcpuCaps,
) -> Result<(VcpuState, Steps), SaveStateError> {
    let mut t = StepTimer::new();
    let err = |what| {
        move |e: kvm_ioctls::Error| SaveStateError::Vcpu {
            vcpu: id,
            what,
            source: e.into(),
        }
    };
    // Every MSR plus the TSC last, in one KVM_GET_MSRS.
    let mut msrs = Msrs::from_entries(
        &caps
            .msr_list
            .iter()
            .chain(std::iter::once(&MSR_IA32_TSC))
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect::<Vec<_>>(),
    )
    .map_err(|_| SaveStateError::Vcpu {
        vcpu: id,
        what: "MSR list",
        source: std::io::Error::from_raw_os_error(libc::E2BIG),
    })?;
    let n = v.get_msrs(&mut msrs).map_err(err("MSRs"))?;
    let rt = realtime_ns();
    if n != caps.msr_list.len() + 1 {
        let index = msrs.as_slice().get(n).map_or(0, |e| e.index);
        return Err(SaveStateError::Vcpu {
            vcpu: id,
            what: "MSRs",
            source: std::io::Error::other(format!("KVM_GET_MSRS stopped at MSR {index:#x}")),
        });
    }
    t.mark("vcpu msrs+tsc");
    let offset = if caps.tsc_offset_attr && caps.clock_pairs {
        Some(
            sys::vcpu_get_attr_u64(v, KVM_VCPU_TSC_CTRL, u64::from(KVM_VCPU_TSC_OFFSET)).map_err(
                |source| SaveStateError::Vcpu {
                    vcpu: id,
                    what: "TSC offset",
                    source,
                },
            )?,
        )
    } else {
        None
    };
    let xsave = match caps.xsave_fam {
        Some(fam) if caps.xsave2 => {
            let x = sys::get_xsave2(v, fam).map_err(|source| SaveStateError::Vcpu {
                vcpu: id,
                what: "XSAVE2",
                source,
            })?;
            let mut b = sys::u32s_as_bytes(&x.as_fam_struct_ref().xsave.region).to_vec();
            b.extend_from_slice(sys::u32s_as_bytes(x.as_slice()));
            b
        }
        Some(_) => sys::u32s_as_bytes(&v.get_xsave().map_err(err("XSAVE"))?.region).to_vec(),
        None => Vec::new(),
    };
    // The XSAVE area's legacy region holds the x87/SSE state: KVM_GET_FPU only without XSAVE.
    let fpu = if xsave.is_empty() {
        v.get_fpu().map_err(err("FPU"))?
    } else {
        kvm_bindings::kvm_fpu::default()
    };
    t.mark("vcpu xsave/fpu");
    let regs = v.get_regs().map_err(err("regs"))?;
    let sregs = v.get_sregs().map_err(err("sregs"))?;
    let xcrs = v.get_xcrs().map_err(err("XCRs"))?;
    t.mark("vcpu regs/sregs/xcrs");
    let lapic = v.get_lapic().map_err(err("LAPIC"))?;
    t.mark("vcpu lapic");
    let events = v.get_vcpu_events().map_err(err("vCPU events"))?;
    let mp_state = v.get_mp_state().map_err(err("MP state"))?;
    let debugregs = v.get_debug_regs().map_err(err("debug registers"))?;
    t.mark("vcpu events/mp/debug");
    let st = VcpuState {
        id,
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        msrs: msrs.as_slice()[..caps.msr_list.len()]
            .iter()
            .map(|e| (e.index, e.data))
            .collect(),
        lapic,
        events,
        mp_state,
        debugregs,
        tsc: TscState {
            tsc: msrs.as_slice().last().map_or(0, |e| e.data),
            realtime_ns: rt,
            offset,
        },
    };
    Ok((st, t.steps))
}

fn restore_vcpu(
    id: u32,
    v: &mut VcpuFd,
    s: &VcpuState,
    caps: &VcpuCaps,
    host_pairs: Option<((u64, u64), (u64, u64))>,
) -> Result<Steps, RestoreStateError> {
    let mut t = StepTimer::new();
    let err = |what| {
        move |e: kvm_ioctls::Error| RestoreStateError::Vcpu {
            vcpu: id,
            what,
            source: e.into(),
        }
    };
    let io_err = |what| {
        move |source: std::io::Error| RestoreStateError::Vcpu {
            vcpu: id,
            what,
            source,
        }
    };
    v.set_sregs(&s.sregs).map_err(err("sregs"))?;
    t.mark("vcpu sregs");
    v.set_regs(&s.regs).map_err(err("regs"))?;
    if s.xsave.is_empty() {
        v.set_fpu(&s.fpu).map_err(err("FPU"))?;
    } else {
        // The blob's XSAVE size must be this host's (KVM reads exactly that much).
        let fam = caps.xsave_fam.ok_or_else(|| {
            io_err("XSAVE")(std::io::Error::other(
                "blob has XSAVE state, KVM has no XSAVE",
            ))
        })?;
        let x = sys::xsave_from_bytes(&s.xsave, fam).map_err(io_err("XSAVE size"))?;
        sys::set_xsave2(v, &x).map_err(io_err("XSAVE"))?;
    }
    v.set_xcrs(&s.xcrs).map_err(err("XCRs"))?;
    t.mark("vcpu regs/xsave/xcrs");
    let msrs = Msrs::from_entries(
        &s.msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect::<Vec<_>>(),
    )
    .map_err(|_| io_err("MSRs")(std::io::Error::from_raw_os_error(libc::E2BIG)))?;
    let n = v.set_msrs(&msrs).map_err(err("MSRs"))?;
    t.mark("vcpu msrs");
    if n != s.msrs.len() {
        return Err(RestoreStateError::Msr {
            vcpu: id,
            index: s.msrs.get(n).map_or(0, |m| m.0),
            set: n,
            total: s.msrs.len(),
        });
    }
    // TSC: saved + elapsed wall time * frequency.
    match (s.tsc.offset, host_pairs, caps.tsc_offset_attr) {
        (Some(ofs_src), Some(((tsc_src, rt_src), (tsc_dst, rt_dst))), true) => {
            let elapsed_ticks = rt_dst.saturating_sub(rt_src) * u64::from(caps.tsc_khz) / 1_000_000;
            let ofs = ofs_src
                .wrapping_add(tsc_src)
                .wrapping_add(elapsed_ticks)
                .wrapping_sub(tsc_dst);
            sys::vcpu_set_attr_u64(v, KVM_VCPU_TSC_CTRL, u64::from(KVM_VCPU_TSC_OFFSET), ofs)
                .map_err(io_err("TSC offset"))?;
            t.mark("vcpu tsc (KVM_VCPU_TSC_OFFSET)");
        }
        _ => {
            let elapsed = realtime_ns().saturating_sub(s.tsc.realtime_ns);
            let tsc = s
                .tsc
                .tsc
                .wrapping_add(elapsed.saturating_mul(u64::from(caps.tsc_khz)) / 1_000_000);
            let m = Msrs::from_entries(&[kvm_msr_entry {
                index: MSR_IA32_TSC,
                data: tsc,
                ..Default::default()
            }])
            .map_err(|_| io_err("TSC")(std::io::Error::from_raw_os_error(libc::E2BIG)))?;
            v.set_msrs(&m).map_err(err("TSC"))?;
            t.mark("vcpu tsc (MSR_IA32_TSC)");
        }
    }

    v.set_mp_state(s.mp_state).map_err(err("MP state"))?;
    v.set_lapic(&s.lapic).map_err(err("LAPIC"))?;
    t.mark("vcpu mp/lapic");
    v.set_vcpu_events(&s.events).map_err(err("vCPU events"))?;
    v.set_debug_regs(&s.debugregs)
        .map_err(err("debug registers"))?;
    t.mark("vcpu events/debug");
    Ok(t.steps)
}

impl VmControl for KvmVm {
    fn pause(&mut self) -> Result<(), BoxError> {
        let capture = self.capture_on_pause;
        Ok(self.pause_inner(capture)?)
    }

    fn save_state(&mut self) -> Result<Vec<u8>, BoxError> {
        Ok(self.save()?.encode())
    }

    fn restore_state(&mut self, blob: &[u8]) -> Result<(), BoxError> {
        let st = VmState::decode(blob).map_err(RestoreStateError::from)?;
        Ok(self.restore(&st)?)
    }

    fn resume(&mut self) -> Result<(), BoxError> {
        Ok(self.resume_inner()?)
    }

    fn prepare_restore(&mut self) {
        self.standby();
    }

    /// From the last saved state: the page tables, code, stack, descriptor tables and
    /// register-held addresses of every vCPU (see [`crate::hot`]).
    fn first_touch_pages(&mut self) -> Vec<u64> {
        self.first_touch.clone()
    }

    /// Auto-converge: every 10 ms each vCPU is kicked out of `KVM_RUN` and sleeps
    /// `(100 - percent)`% of the period. 100 switches it off.
    fn throttle(&mut self, percent: u8) -> Result<bool, BoxError> {
        let p = percent.clamp(1, 100);
        self.core.throttle_pct.store(p, Ordering::SeqCst);
        if p < 100 && self.throttler.is_none() {
            let stop = Arc::new(AtomicBool::new(false));
            let (stop2, ctls) = (Arc::clone(&stop), self.ctls.clone());
            let core = Arc::clone(&self.core);
            let h = std::thread::Builder::new()
                .name("vcpu-throttle".into())
                .spawn(move || {
                    while !stop2.load(Ordering::SeqCst) {
                        std::thread::sleep(THROTTLE_PERIOD);
                        if core.throttle_pct.load(Ordering::SeqCst) >= 100 {
                            continue;
                        }
                        for c in &ctls {
                            // Holding the lock keeps the thread from exiting while we kick.
                            let g = c.lock();
                            if g.run
                                && !g.exit
                                && !c.pause_req.load(Ordering::SeqCst)
                                && let Some(k) = c.kicker.get()
                            {
                                k.kick();
                            }
                        }
                    }
                })?;
            self.throttler = Some((stop, h));
        }
        Ok(true)
    }
}

impl Drop for KvmVm {
    fn drop(&mut self) {
        if let Some((stop, h)) = self.throttler.take() {
            stop.store(true, Ordering::SeqCst);
            let _ = h.join();
        }
        // Park everything first: kicks touch the vCPU's kvm_run, which its thread unmaps on
        // exit, so no kick may follow `exit`.
        if let Err(e) = self.pause_inner(false) {
            tracing::warn!("pause before drop: {e}");
        }
        for c in &self.ctls {
            let mut g = c.lock();
            g.exit = true;
            g.run = false;
            c.cv.notify_all();
        }
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

/// Why the run loop returned.
enum Stop {
    Paused,
    Fault(String),
}

fn vcpu_thread(ctl: &VcpuCtl, core: &Core, caps: &VcpuCaps) {
    let lock_vcpu = || ctl.vcpu.lock().unwrap_or_else(|e| e.into_inner());
    let tid = rustix::thread::gettid();
    let _ = ctl.tid.set(tid.as_raw_nonzero().get());
    let _ = ctl.kicker.set(Kicker::for_current_thread(&mut lock_vcpu()));
    // Its state is saved (pause) or restored (resume) inside the blackout, on deeper stack
    // frames and fresh allocations: those pages resident now (see `ferry_engine::warm`). So is
    // the `kvm_run` page: a destination's vCPU first writes it (`immediate_exit`) right after
    // the resume, a write fault on the guest's first step otherwise.
    ferry_engine::warm::thread();
    if let Some(k) = ctl.kicker.get() {
        k.set_immediate_exit(0);
    }
    loop {
        let restore = {
            let mut g = ctl.lock();
            loop {
                if let Some(job) = g.jobs.pop_front() {
                    drop(g);
                    job(&mut lock_vcpu());
                    g = ctl.lock();
                    continue;
                }
                if g.exit {
                    g.parked = true;
                    ctl.parked_flag.store(true, Ordering::SeqCst);
                    ctl.cv.notify_all();
                    return;
                }
                if g.run && g.fault.is_none() {
                    break;
                }
                if !g.parked {
                    g.parked = true;
                    ctl.parked_flag.store(true, Ordering::SeqCst);
                    ctl.cv.notify_all();
                }
                g = ctl.cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            g.parked = false;
            ctl.parked_flag.store(false, Ordering::SeqCst);
            ctl.stopped_flag.store(false, Ordering::SeqCst);
            // The vCPU is about to change: what was captured at the pause no longer holds.
            g.captured = None;
            g.restore.take()
        };
        if let Some(p) = restore {
            ferry_engine::timeline::mark("kvm vcpu woke for restore");
            let woke = Instant::now();
            let result = p.job.apply(ctl.id, &mut lock_vcpu());
            if !p.round.ack(ctl.id, result, woke) {
                // No-go: some vCPU could not be restored (or resume gave up). Do not run.
                ctl.lock().run = false;
                continue;
            }
        }
        let prior = ctl.boosted.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(p) = prior {
            ferry_engine::boost::restore(None, p);
        }
        if let Some(k) = ctl.kicker.get() {
            k.set_immediate_exit(0);
        }
        *ctl.entered_run.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let stop = run_loop(&mut lock_vcpu(), ctl, core);
        match stop {
            Stop::Paused => {
                ferry_engine::timeline::mark("kvm vcpu out of run");
                // Out of `KVM_RUN`, any pending I/O completed: guest memory is quiet.
                {
                    let _g = ctl.lock();
                    ctl.stopped_flag.store(true, Ordering::SeqCst);
                    ctl.cv.notify_all();
                }
                if ctl.lock().capture {
                    // Still awake from the kick: save the state here, in parallel with the
                    // other vCPUs, before reporting parked.
                    let r = save_vcpu(ctl.id, &mut lock_vcpu(), caps);
                    let mut g = ctl.lock();
                    match r {
                        Ok((state, steps)) => {
                            ferry_engine::timeline::mark("kvm vcpu saved");
                            g.captured = Some(Captured { state, steps })
                        }
                        Err(e) => {
                            // `save` then saves this vCPU itself and reports the error if it
                            // is real.
                            tracing::debug!("vCPU {}: saving while parking failed: {e}", ctl.id);
                            g.captured = None;
                        }
                    }
                }
            }
            Stop::Fault(reason) => {
                tracing::warn!("vCPU {} stopped: {reason}", ctl.id);
                let mut g = ctl.lock();
                g.fault = Some(reason);
                g.run = false;
            }
        }
    }
}

fn run_loop(vcpu: &mut VcpuFd, ctl: &VcpuCtl, core: &Core) -> Stop {
    let c = &core.counters;
    // The last KVM_RUN returned an exit we handled (I/O, MMIO, ...) rather than EINTR.
    let mut exit_pending = false;
    loop {
        if ctl.pause_req.load(Ordering::SeqCst) {
            ferry_engine::timeline::mark("kvm vcpu saw pause");
            if exit_pending {
                // KVM completes a PIO/MMIO exit (e.g. advances RIP past an OUT, stores the
                // data of an IN) only on the next KVM_RUN, and KVM_GET_* do not show the
                // pending part: re-enter once with immediate_exit set so the saved state is
                // consistent and the destination does not repeat the instruction (KVM API
                // docs, KVM_RUN). It returns EINTR without running the guest.
                if let Some(k) = ctl.kicker.get() {
                    k.set_immediate_exit(1);
                }
                match vcpu.run() {
                    Err(e) if e.errno() == libc::EINTR => {}
                    Err(e) => return Stop::Fault(format!("completing a pending exit: {e}")),
                    Ok(exit) => tracing::warn!(
                        "vCPU {}: completing a pending exit returned {exit:?}, not EINTR",
                        ctl.id
                    ),
                }
            }
            return Stop::Paused;
        }
        c.runs.fetch_add(1, Ordering::Relaxed);
        let r = vcpu.run();
        exit_pending = r.is_ok();
        match r {
            Ok(VcpuExit::IoOut(port, data)) => {
                if (COM1..COM1 + 8).contains(&port) {
                    let mut s = core.serial.lock().unwrap_or_else(|e| e.into_inner());
                    for &b in data.iter() {
                        s.write(port - COM1, b);
                    }
                    c.pio.fetch_add(1, Ordering::Relaxed);
                } else if port == guest::SLEEP_PORT {
                    c.pio.fetch_add(1, Ordering::Relaxed);
                    // Pause unparks the thread, so this never delays a pause.
                    std::thread::park_timeout(Duration::from_millis(1));
                } else {
                    c.pio_unhandled.fetch_add(1, Ordering::Relaxed);
                    tracing::trace!("vCPU {}: OUT to unhandled port {port:#x}", ctl.id);
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if (COM1..COM1 + 8).contains(&port) {
                    let s = core.serial.lock().unwrap_or_else(|e| e.into_inner());
                    let v = s.read(port - COM1);
                    data.fill(v);
                    c.pio.fetch_add(1, Ordering::Relaxed);
                } else {
                    data.fill(0xff);
                    c.pio_unhandled.fetch_add(1, Ordering::Relaxed);
                    tracing::trace!("vCPU {}: IN from unhandled port {port:#x}", ctl.id);
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                data.fill(0xff);
                c.mmio.fetch_add(1, Ordering::Relaxed);
                tracing::trace!("vCPU {}: MMIO read {addr:#x}", ctl.id);
            }
            Ok(VcpuExit::MmioWrite(addr, _)) => {
                c.mmio.fetch_add(1, Ordering::Relaxed);
                tracing::trace!("vCPU {}: MMIO write {addr:#x}", ctl.id);
            }
            Ok(VcpuExit::Hlt) => std::thread::park_timeout(Duration::from_millis(1)),
            Ok(VcpuExit::Intr) => interrupted(ctl, core),
            Ok(VcpuExit::Unsupported(r)) if r == kvm_bindings::KVM_EXIT_DIRTY_RING_FULL => {
                core.dirty.ring_full_exits.fetch_add(1, Ordering::Relaxed);
                // Reset even when this drain took nothing: the entries may have been drained
                // by a final harvest, which does not reset.
                core.dirty.drain_ring(ctl.id as usize);
                if let Err(e) = sys::reset_dirty_rings(&core.vm) {
                    return Stop::Fault(format!("KVM_RESET_DIRTY_RINGS failed: {e}"));
                }
            }
            Ok(VcpuExit::Shutdown) => return Stop::Fault("guest shutdown (triple fault)".into()),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Stop::Fault(format!("entry failed, reason {reason:#x} on cpu {cpu}"));
            }
            Ok(VcpuExit::InternalError) => return Stop::Fault("KVM internal error".into()),
            Ok(VcpuExit::SystemEvent(t, _)) => {
                return Stop::Fault(format!("system event {t}"));
            }
            Ok(other) => return Stop::Fault(format!("unhandled exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                interrupted(ctl, core);
            }
            Err(e) => return Stop::Fault(format!("KVM_RUN failed: {e}")),
        }
    }
}

/// `KVM_RUN` returned because of a kick or a signal. Unless it is a pause, this is the throttle
/// (or a stray signal): sleep the throttled share of the period, then clear `immediate_exit`.
/// The caller re-checks `pause_req` after this, and pause sets `pause_req` before it sets
/// `immediate_exit`, so clearing it here cannot lose a pause.
fn interrupted(ctl: &VcpuCtl, core: &Core) {
    if ctl.pause_req.load(Ordering::SeqCst) {
        return;
    }
    let p = core.throttle_pct.load(Ordering::SeqCst);
    if p < 100 {
        core.counters
            .throttle_sleeps
            .fetch_add(1, Ordering::Relaxed);
        // Pause unparks the thread, so a throttled vCPU still pauses at once.
        std::thread::park_timeout(THROTTLE_PERIOD * u32::from(100 - p) / 100);
    }
    if let Some(k) = ctl.kicker.get() {
        k.set_immediate_exit(0);
    }
}
