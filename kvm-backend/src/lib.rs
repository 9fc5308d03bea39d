// SPDX-License-Identifier: Apache-2.0 OR MIT
//! ferry's KVM backend: real KVM virtual machines the engine can live-migrate.
//!
//! What it owns:
//! - [`KvmVm`]: a KVM VM with guest RAM in memory slots (memfd `MAP_SHARED` by default, or
//!   anonymous; optional THP), several vCPUs each on its own thread, CPUID from
//!   `KVM_GET_SUPPORTED_CPUID`, in-kernel irqchip and PIT, and a COM1 serial port. A *source*
//!   VM loads and runs a built-in guest; a *destination* VM has the same layout, leaves its RAM
//!   untouched, and runs only after `restore_state` + `resume`.
//! - Built-in guests ([`Workload`]: idle, writer, verifier) that run at CPL3 and measure their
//!   own stalls ([`GuestStats`], and every stall in a per-vCPU gap log that splits at the
//!   switchover: [`GapSplit`]); the verifier's memory is a pure function of its progress
//!   counters and can be checked page by page ([`KvmVm::verify_memory`]).
//! - The engine interfaces: [`KvmMemory`] implements `GuestMemory`, [`KvmDirtyTracker`]
//!   implements `DirtyTracker` (dirty bitmap with manual protection, or dirty ring), and
//!   [`KvmVm`] implements `VmControl` (pause/resume with immediate_exit + signal, complete
//!   vCPU and VM state in a versioned blob, throttling for auto-converge).
//! - Multiboot (v1) kernels ([`Workload::Kernel`], [`multiboot`]) load like QEMU's `-kernel`.
//!
//! What it does not own: moving bytes between hosts, convergence policy, userfaultfd (all in
//! `ferry-engine`), and command-line handling (`tools/`).
#![warn(missing_docs)]

pub mod dirty;
pub mod guest;
pub mod hot;
pub mod memory;
pub mod multiboot;
pub mod state;
mod sys;
pub mod vm;

pub use dirty::{ActiveDirtyMode, DirtyMode, HarvestStats, KvmDirtyTracker};
pub use guest::{
    GapLog, GapSplit, GapSplitError, GapSummary, GuestStats, VcpuGuestStats, VerifyReport, Workload,
};
pub use memory::{KvmMemory, MemBacking};
pub use state::VmState;
pub use vm::{
    KvmVm, PauseTimings, RestoreStateError, SaveStateError, SerialSink, VerifyError, VmConfig,
    VmCreateError, VmRunError,
};

/// True if `/dev/kvm` can be opened (tests use this to skip on machines without KVM).
pub fn kvm_available() -> bool {
    kvm_ioctls::Kvm::new().is_ok()
}
