// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The built-in guests: 64-bit long-mode setup written straight into guest RAM (page tables,
//! GDT, TSS, code, parameters), the hand-assembled ring-3 workloads, and the host-side model
//! that reads their statistics and checks their memory.
//!
//! Why ring 3: `/dev/kvm` on the development machine is PVM, which emulates CPL0 code about
//! 1000x slower but runs CPL3 natively; so the guest starts directly at CPL3 (user code/data
//! selectors with RPL 3, U/S set in every page-table entry, IOPL 3 for port I/O) and never
//! enters ring 0. There is no IDT: a guest exception triple-faults and the vCPU reports a
//! shutdown, which the host treats as a guest failure.
//!
//! Guest-virtual address space: VA `x` maps the RAM offset `x` (see [`crate::memory`]), with
//! 2 MiB pages, so RAM above the 32-bit hole is contiguous for the guest.
//!
//! Everything is written by the *source* only: the destination receives it by migration.
//! This module knows nothing about KVM ioctls (see [`crate::vm`]).

use crate::memory::KvmMemory;
use crate::sys::PAGE_SIZE;

/// Guest page-map level 4.
pub const PML4: u64 = 0x1000;
/// Page-directory-pointer table (one; up to 512 GiB).
pub const PDPT: u64 = 0x2000;
/// Global descriptor table.
pub const GDT: u64 = 0x3000;
/// 64-bit task-state segment.
pub const TSS: u64 = 0x4000;
/// Limit of the TSS segment: 0x68 bytes of TSS, the 8 KiB I/O bitmap and its 0xff terminator.
pub const TSS_LIMIT: u64 = 0x68 + 8192;
/// Workload code.
pub const CODE: u64 = 0x8000;
/// Parameter page (read by the guest, written by the host at creation).
pub const PARAMS: u64 = 0x10000;
/// Statistics pages, one per vCPU (`STATS + i * 4096`).
pub const STATS: u64 = 0x20000;
/// Page directories (one per GiB of RAM), 2 MiB pages.
pub const PDS: u64 = 0x60000;
/// First data page of the writer/verifier workloads.
pub const DATA_BASE: u64 = 0x100000;
/// Most vCPUs the layout has statistics pages for.
pub const MAX_VCPUS: u32 = 64;
/// Most RAM the layout has page directories for.
pub const MAX_MEM: u64 = 128 << 30;
/// Fewest entries in a vCPU's gap-log ring (writer and verifier): every gap over the stall
/// threshold is appended as (TSC at its end, length in TSC ticks), 16 bytes. The rings of all
/// vCPUs together take 1/[`GAP_LOG_RAM_SHARE`] of RAM, as a power of two per vCPU between
/// this and [`GAP_LOG_MAX_ENTRIES`] ([`gap_log_entries_for`]): post-copy stalls grow with
/// the memory still to fetch (1 GiB post-copy demos logged 0.9k–6k gaps after the switchover
/// on one vCPU, 16k under heavy host load; its 2 vCPUs get 131072 entries each).
pub const GAP_LOG_MIN_ENTRIES: u64 = 4096;
/// Most entries in a vCPU's gap-log ring (4 MiB).
pub const GAP_LOG_MAX_ENTRIES: u64 = 262_144;
/// RAM bytes per gap-log byte (all vCPUs' rings together).
pub const GAP_LOG_RAM_SHARE: u64 = 256;
/// Bytes of one gap-log entry.
pub const GAP_LOG_ENTRY_BYTES: u64 = 16;
// The guest indexes the ring with `count & (entries - 1)`.
const _: () =
    assert!(GAP_LOG_MIN_ENTRIES.is_power_of_two() && GAP_LOG_MAX_ENTRIES.is_power_of_two());

/// Entries per vCPU ring for a writer or verifier guest of `mem_bytes` on `vcpus` vCPUs: a
/// power of two (see [`GAP_LOG_MIN_ENTRIES`]).
pub fn gap_log_entries_for(mem_bytes: u64, vcpus: u32) -> u64 {
    let per = mem_bytes / GAP_LOG_RAM_SHARE / u64::from(vcpus.max(1)) / GAP_LOG_ENTRY_BYTES;
    let pow2 = if per == 0 {
        1
    } else {
        1 << (63 - per.leading_zeros())
    };
    pow2.clamp(GAP_LOG_MIN_ENTRIES, GAP_LOG_MAX_ENTRIES)
}

/// Port the idle guest writes to ask the host to sleep the vCPU thread briefly.
pub const SLEEP_PORT: u16 = 0xF1;

/// GDT selectors (RPL 3 for the user ones).
pub const SEL_USER_CODE: u16 = 0x18 | 3;
/// User data selector.
pub const SEL_USER_DATA: u16 = 0x20 | 3;
/// TSS selector.
pub const SEL_TSS: u16 = 0x28;

/// Offsets in the parameter page.
mod param {
    pub const MAGIC: u64 = 0x00;
    pub const WORKLOAD: u64 = 0x08;
    pub const VCPUS: u64 = 0x10;
    pub const TSC_KHZ: u64 = 0x18;
    pub const DATA_BASE: u64 = 0x20;
    pub const PAGES_PER_VCPU: u64 = 0x28;
    pub const TICKS_PER_PAGE: u64 = 0x30;
    pub const STALL_TICKS: u64 = 0x38;
    pub const SLACK_TICKS: u64 = 0x40;
    pub const QWORDS: u64 = 0x48;
    pub const HEARTBEAT_TICKS: u64 = 0x50;
    pub const GAP_LOG_BASE: u64 = 0x58;
    /// Ring entries - 1 (a power of two minus one), read by the stall path at 0x19f.
    pub const GAP_LOG_MASK: u64 = 0x60;
}

/// Offsets in a statistics page.
mod stat {
    pub const ITERATIONS: u64 = 0x00;
    pub const MAX_GAP: u64 = 0x08;
    pub const STALL_TICKS: u64 = 0x10;
    pub const STALLS: u64 = 0x18;
    pub const LAST_TSC: u64 = 0x20;
    /// Gap-log entries appended so far (the ring keeps the newest `GuestPlan::gap_log_entries`).
    pub const LOG_COUNT: u64 = 0x28;
    /// Guest address of this vCPU's ring (written by the host at setup).
    pub const LOG_BASE: u64 = 0x30;
}

/// "FERRYGST" little-endian: marks a parameter page written by this module.
pub const PARAMS_MAGIC: u64 = u64::from_le_bytes(*b"FERRYGST");

/// Multiplier of the verifier's value function (the 64-bit golden ratio).
const VALUE_MUL: u64 = 0x9E37_79B9_7F4A_7C15;

/// Offset of the writer/verifier entry point in [`guest_code`].
pub const ENTRY_LOOP: u64 = 0x000;
/// Offset of the idle entry point in [`guest_code`].
pub const ENTRY_IDLE: u64 = 0x13b;

/// The workload code, hand-assembled x86-64 (Intel syntax in the comments, offsets from
/// [`CODE`]). Runs at CPL3; `rdi` = vCPU index on entry.
///
/// Writer/verifier (`ENTRY_LOOP`): registers hold rbx = stats page, rsi = first page of this
/// vCPU's partition, r8 = pages per vCPU P, r9 = stall threshold, r13 = TSC ticks per page
/// (0 = no rate limit), r14 = next deadline, r15 = qwords per page, r12 = iteration n,
/// r10 = previous TSC. Each pass of `top` reads the TSC, records the gap since the previous
/// pass (max gap; sum and count of gaps over the threshold, and, out of line at 0x190, each
/// such gap appended to the vCPU's gap-log ring as (TSC now, gap) with the stats page's
/// `LOG_COUNT` bumped after the entry is written), then either spins (rate limit) or
/// does iteration n: page `n mod P`, round `n / P`, value `((round + 1) * K) ^ page_va`,
/// stored into the first r15 qwords of the page with `rep stosq`; then n += 1 and n is
/// published in the stats page. So after n iterations every page's content is a pure function
/// of n (see [`expected_page_value`]); at most the page of iteration n is half-written.
/// vCPU 0 first prints the banner on COM1 and then, when the TSC passes r11, a `.` (one per
/// second); the port exit's own time is not counted as a gap (r10 is re-read after it).
///
/// Idle (`ENTRY_IDLE`): vCPU 0 prints the banner; every vCPU loops on `out 0xf1, al` (the host
/// sleeps the thread ~1 ms) and counts; vCPU 0 prints a `.` every 1024 loops.
#[rustfmt::skip]
pub fn guest_code() -> Vec<u8> {
    vec![
        // loop_entry:
        0x48, 0x89, 0xfb,                            // 0x000: mov rbx,rdi
        0x48, 0xc1, 0xe3, 0x0c,                      // 0x003: shl rbx,0xc
        0x48, 0x81, 0xc3, 0x00, 0x00, 0x02, 0x00,    // 0x007: add rbx,0x20000
        0x49, 0xc7, 0xc3, 0xff, 0xff, 0xff, 0xff,    // 0x00e: mov r11,0xffffffffffffffff
        0x48, 0x85, 0xff,                            // 0x015: test rdi,rdi
        0x75, 0x29,                                  // 0x018: jne 43
        0xb9, 0x7f, 0x81, 0x00, 0x00,                // 0x01a: mov ecx,0x817f
        0x66, 0xba, 0xf8, 0x03,                      // 0x01f: mov dx,0x3f8
        0x8a, 0x01,                                  // 0x023: mov al,byte [rcx]
        0x84, 0xc0,                                  // 0x025: test al,al
        0x74, 0x06,                                  // 0x027: je 2f
        0xee,                                        // 0x029: out dx,al
        0x48, 0xff, 0xc1,                            // 0x02a: inc rcx
        0xeb, 0xf4,                                  // 0x02d: jmp 23
        0x0f, 0x31,                                  // 0x02f: rdtsc
        0x48, 0xc1, 0xe2, 0x20,                      // 0x031: shl rdx,0x20
        0x48, 0x09, 0xd0,                            // 0x035: or rax,rdx
        0x49, 0x89, 0xc3,                            // 0x038: mov r11,rax
        0x4c, 0x03, 0x1c, 0x25, 0x50, 0x00, 0x01, 0x00, // 0x03b: add r11,qword 0x10050
        0x48, 0x89, 0xfe,                            // 0x043: mov rsi,rdi
        0x48, 0x0f, 0xaf, 0x34, 0x25, 0x28, 0x00, 0x01, 0x00, // 0x046: imul rsi,qword 0x10028
        0x48, 0xc1, 0xe6, 0x0c,                      // 0x04f: shl rsi,0xc
        0x48, 0x03, 0x34, 0x25, 0x20, 0x00, 0x01, 0x00, // 0x053: add rsi,qword 0x10020
        0x4c, 0x8b, 0x04, 0x25, 0x28, 0x00, 0x01, 0x00, // 0x05b: mov r8,qword 0x10028
        0x4c, 0x8b, 0x0c, 0x25, 0x38, 0x00, 0x01, 0x00, // 0x063: mov r9,qword 0x10038
        0x4c, 0x8b, 0x2c, 0x25, 0x30, 0x00, 0x01, 0x00, // 0x06b: mov r13,qword 0x10030
        0x4c, 0x8b, 0x3c, 0x25, 0x48, 0x00, 0x01, 0x00, // 0x073: mov r15,qword 0x10048
        0x4c, 0x8b, 0x23,                            // 0x07b: mov r12,qword [rbx]
        0x0f, 0x31,                                  // 0x07e: rdtsc
        0x48, 0xc1, 0xe2, 0x20,                      // 0x080: shl rdx,0x20
        0x48, 0x09, 0xd0,                            // 0x084: or rax,rdx
        0x49, 0x89, 0xc2,                            // 0x087: mov r10,rax
        0x49, 0x89, 0xc6,                            // 0x08a: mov r14,rax
        // top:
        0x0f, 0x31,                                  // 0x08d: rdtsc
        0x48, 0xc1, 0xe2, 0x20,                      // 0x08f: shl rdx,0x20
        0x48, 0x09, 0xd0,                            // 0x093: or rax,rdx
        0x48, 0x89, 0xc2,                            // 0x096: mov rdx,rax
        0x4c, 0x29, 0xd2,                            // 0x099: sub rdx,r10
        0x49, 0x89, 0xc2,                            // 0x09c: mov r10,rax
        0x48, 0x89, 0x43, 0x20,                      // 0x09f: mov qword [rbx+0x20],rax
        0x48, 0x3b, 0x53, 0x08,                      // 0x0a3: cmp rdx,qword [rbx+0x8]
        0x76, 0x04,                                  // 0x0a7: jbe ad
        0x48, 0x89, 0x53, 0x08,                      // 0x0a9: mov qword [rbx+0x8],rdx
        0x4c, 0x39, 0xca,                            // 0x0ad: cmp rdx,r9
        0x76, 0x08,                                  // 0x0b0: jbe ba
        0xe9, 0xd9, 0x00, 0x00, 0x00,                // 0x0b2: jmp 190 (stall: count, log)
        0x0f, 0x1f, 0x00,                            // 0x0b7: nop (never reached)
        0x4c, 0x39, 0xd8,                            // 0x0ba: cmp rax,r11
        0x72, 0x1e,                                  // 0x0bd: jb dd
        0x49, 0x89, 0xc3,                            // 0x0bf: mov r11,rax
        0x4c, 0x03, 0x1c, 0x25, 0x50, 0x00, 0x01, 0x00, // 0x0c2: add r11,qword 0x10050
        0x66, 0xba, 0xf8, 0x03,                      // 0x0ca: mov dx,0x3f8
        0xb0, 0x2e,                                  // 0x0ce: mov al,0x2e
        0xee,                                        // 0x0d0: out dx,al
        0x0f, 0x31,                                  // 0x0d1: rdtsc
        0x48, 0xc1, 0xe2, 0x20,                      // 0x0d3: shl rdx,0x20
        0x48, 0x09, 0xd0,                            // 0x0d7: or rax,rdx
        0x49, 0x89, 0xc2,                            // 0x0da: mov r10,rax
        0x4d, 0x85, 0xed,                            // 0x0dd: test r13,r13
        0x74, 0x1b,                                  // 0x0e0: je fd
        0x4c, 0x39, 0xf0,                            // 0x0e2: cmp rax,r14
        0x72, 0x4d,                                  // 0x0e5: jb 134
        0x4c, 0x89, 0xf2,                            // 0x0e7: mov rdx,r14
        0x48, 0x03, 0x14, 0x25, 0x40, 0x00, 0x01, 0x00, // 0x0ea: add rdx,qword 0x10040
        0x48, 0x39, 0xc2,                            // 0x0f2: cmp rdx,rax
        0x73, 0x03,                                  // 0x0f5: jae fa
        0x49, 0x89, 0xc6,                            // 0x0f7: mov r14,rax
        0x4d, 0x01, 0xee,                            // 0x0fa: add r14,r13
        // work:
        0x4c, 0x89, 0xe0,                            // 0x0fd: mov rax,r12
        0x31, 0xd2,                                  // 0x100: xor edx,edx
        0x49, 0xf7, 0xf0,                            // 0x102: div r8
        0x48, 0xc1, 0xe2, 0x0c,                      // 0x105: shl rdx,0xc
        0x48, 0x01, 0xf2,                            // 0x109: add rdx,rsi
        0x48, 0x89, 0xd7,                            // 0x10c: mov rdi,rdx
        0x48, 0xff, 0xc0,                            // 0x10f: inc rax
        0x48, 0xb9, 0x15, 0x7c, 0x4a, 0x7f, 0xb9, 0x79, 0x37, 0x9e, // 0x112: movabs rcx,0x9e3779b97f4a7c15
        0x48, 0x0f, 0xaf, 0xc1,                      // 0x11c: imul rax,rcx
        0x48, 0x31, 0xf8,                            // 0x120: xor rax,rdi
        0x4c, 0x89, 0xf9,                            // 0x123: mov rcx,r15
        0xf3, 0x48, 0xab,                            // 0x126: rep stos qword es:[rdi],rax
        0x49, 0xff, 0xc4,                            // 0x129: inc r12
        0x4c, 0x89, 0x23,                            // 0x12c: mov qword [rbx],r12
        0xe9, 0x59, 0xff, 0xff, 0xff,                // 0x12f: jmp 8d
        // spin:
        0xf3, 0x90,                                  // 0x134: pause
        0xe9, 0x52, 0xff, 0xff, 0xff,                // 0x136: jmp 8d
        // idle_entry:
        0x48, 0x89, 0xfb,                            // 0x13b: mov rbx,rdi
        0x48, 0xc1, 0xe3, 0x0c,                      // 0x13e: shl rbx,0xc
        0x48, 0x81, 0xc3, 0x00, 0x00, 0x02, 0x00,    // 0x142: add rbx,0x20000
        0x48, 0x85, 0xff,                            // 0x149: test rdi,rdi
        0x75, 0x15,                                  // 0x14c: jne 163
        0xb9, 0x7f, 0x81, 0x00, 0x00,                // 0x14e: mov ecx,0x817f
        0x66, 0xba, 0xf8, 0x03,                      // 0x153: mov dx,0x3f8
        0x8a, 0x01,                                  // 0x157: mov al,byte [rcx]
        0x84, 0xc0,                                  // 0x159: test al,al
        0x74, 0x06,                                  // 0x15b: je 163
        0xee,                                        // 0x15d: out dx,al
        0x48, 0xff, 0xc1,                            // 0x15e: inc rcx
        0xeb, 0xf4,                                  // 0x161: jmp 157
        // idle_top:
        0xe6, 0xf1,                                  // 0x163: out 0xf1,al
        0x48, 0xff, 0x03,                            // 0x165: inc qword [rbx]
        0x48, 0x85, 0xff,                            // 0x168: test rdi,rdi
        0x75, 0xf6,                                  // 0x16b: jne 163
        0x48, 0xf7, 0x03, 0xff, 0x03, 0x00, 0x00,    // 0x16d: test qword [rbx],0x3ff
        0x75, 0xed,                                  // 0x174: jne 163
        0x66, 0xba, 0xf8, 0x03,                      // 0x176: mov dx,0x3f8
        0xb0, 0x2e,                                  // 0x17a: mov al,0x2e
        0xee,                                        // 0x17c: out dx,al
        0xeb, 0xe4,                                  // 0x17d: jmp 163
        // 0x17f: banner, NUL-terminated
        b'f', b'e', b'r', b'r', b'y', b' ', b'g', b'u', b'e', b's', b't', b' ', b'u', b'p', b'\n', 0,
        0xcc,                                        // 0x18f: padding
        // stall (from 0x0b2, rdx = gap > threshold, rax = TSC now): count it and append
        // (end TSC, gap) to this vCPU's gap-log ring, then carry on at 0x0ba.
        0x48, 0x01, 0x53, 0x10,                      // 0x190: add qword [rbx+0x10],rdx
        0x48, 0xff, 0x43, 0x18,                      // 0x194: inc qword [rbx+0x18]
        0x48, 0x8b, 0x4b, 0x28,                      // 0x198: mov rcx,qword [rbx+0x28]
        0x48, 0x89, 0xcf,                            // 0x19c: mov rdi,rcx
        0x48, 0x23, 0x3c, 0x25, 0x60, 0x00, 0x01, 0x00, // 0x19f: and rdi,qword 0x10060
        0x48, 0xc1, 0xe7, 0x04,                      // 0x1a7: shl rdi,0x4
        0x48, 0x03, 0x7b, 0x30,                      // 0x1ab: add rdi,qword [rbx+0x30]
        0x48, 0x89, 0x07,                            // 0x1af: mov qword [rdi],rax
        0x48, 0x89, 0x57, 0x08,                      // 0x1b2: mov qword [rdi+0x8],rdx
        0x48, 0xff, 0xc1,                            // 0x1b6: inc rcx
        0x48, 0x89, 0x4b, 0x28,                      // 0x1b9: mov qword [rbx+0x28],rcx
        0xe9, 0xf8, 0xfe, 0xff, 0xff,                // 0x1bd: jmp ba
    ]
}

/// A built-in workload.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Workload {
    /// Sleeps: each vCPU loops on an exit the host answers by sleeping ~1 ms.
    #[default]
    Idle,
    /// Dirties `working_set_mib` MiB (split across vCPUs), one 8-byte store per page per
    /// visit, at `rate_mib_s` MiB/s in total (`None`: as fast as it can).
    Writer {
        /// Working set in MiB (capped to the data area).
        working_set_mib: u64,
        /// Total dirtying rate; `None` for unlimited.
        rate_mib_s: Option<u64>,
    },
    /// Rewrites every data page in full, in a deterministic order, so that the whole data
    /// area is a function of the per-vCPU iteration counters ([`crate::KvmVm::verify_memory`]).
    Verifier,
    /// A multiboot (v1) kernel, loaded like QEMU's `-kernel` ([`crate::multiboot`]); only the
    /// boot vCPU starts, in 32-bit protected mode at CPL0. No statistics, no memory model.
    Kernel {
        /// The kernel image (ELF32 with a multiboot header, or a.out kludge).
        path: std::path::PathBuf,
        /// The command line passed in the multiboot information.
        cmdline: String,
    },
}

impl Workload {
    pub(crate) fn id(&self) -> u64 {
        match self {
            Workload::Idle => 1,
            Workload::Writer { .. } => 2,
            Workload::Verifier => 3,
            Workload::Kernel { .. } => 4,
        }
    }

    /// True for the built-in guests (which have statistics pages and a memory model).
    pub fn is_builtin(&self) -> bool {
        !matches!(self, Workload::Kernel { .. })
    }
}

/// Errors building a guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestSetupError {
    /// Too little RAM for the fixed layout plus one data page per vCPU.
    #[error("Guest memory {mem:#x} too small for {vcpus} vCPUs (need > {need:#x})")]
    TooSmall {
        /// RAM size.
        mem: u64,
        /// vCPUs.
        vcpus: u32,
        /// Minimum.
        need: u64,
    },
    /// More RAM or vCPUs than the layout has room for.
    #[error(
        "Guest layout supports at most {MAX_VCPUS} vCPUs and {MAX_MEM:#x} bytes, got {vcpus} and {mem:#x}"
    )]
    TooLarge {
        /// RAM size.
        mem: u64,
        /// vCPUs.
        vcpus: u32,
    },
    /// A write fell outside guest RAM (a layout bug).
    #[error("Guest setup write at {0:#x} outside RAM")]
    OutOfRange(u64),
}

/// The numbers a built-in guest runs with; derived from the config and the TSC frequency,
/// written into the parameter page, and used by the host model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPlan {
    /// The workload.
    pub workload: Workload,
    /// vCPU count.
    pub vcpus: u32,
    /// RAM size.
    pub mem_bytes: u64,
    /// TSC frequency in kHz (`KVM_GET_TSC_KHZ`).
    pub tsc_khz: u64,
    /// Pages in each vCPU's partition (P).
    pub pages_per_vcpu: u64,
    /// Qwords written per page visit (512 = whole page for the verifier, 1 for the writer).
    pub qwords: u64,
    /// TSC ticks per page for the rate limit; 0 = unlimited.
    pub ticks_per_page: u64,
    /// Guest address (= RAM offset) of vCPU 0's gap-log ring; the rings of all vCPUs follow
    /// it and end at or below the top of RAM. The data partitions end here.
    pub gap_log_base: u64,
    /// Entries per vCPU ring ([`gap_log_entries_for`]) for the writer and verifier, 0 for the
    /// workloads that do not log gaps (then `gap_log_base` is the top of the data area).
    pub gap_log_entries: u64,
}

impl GuestPlan {
    /// Computes the plan for `workload` on `vcpus` vCPUs with `mem_bytes` of RAM.
    pub fn new(
        workload: &Workload,
        vcpus: u32,
        mem_bytes: u64,
        tsc_khz: u64,
    ) -> Result<Self, GuestSetupError> {
        if vcpus == 0 || vcpus > MAX_VCPUS || mem_bytes > MAX_MEM {
            return Err(GuestSetupError::TooLarge {
                mem: mem_bytes,
                vcpus,
            });
        }
        let v = u64::from(vcpus);
        let logs = matches!(workload, Workload::Writer { .. } | Workload::Verifier);
        let gap_log_entries = if logs {
            gap_log_entries_for(mem_bytes, vcpus)
        } else {
            0
        };
        let log_bytes = v * gap_log_entries * GAP_LOG_ENTRY_BYTES;
        // The rings sit at the top of the RAM the 2 MiB page tables map.
        let mapped_top = if logs {
            mem_bytes / (2 << 20) * (2 << 20)
        } else {
            mem_bytes
        };
        let need = DATA_BASE + v * PAGE_SIZE + log_bytes;
        if mapped_top < need {
            return Err(GuestSetupError::TooSmall {
                mem: mem_bytes,
                vcpus,
                need,
            });
        }
        let gap_log_base = mapped_top - log_bytes;
        let data_pages = (gap_log_base - DATA_BASE) / PAGE_SIZE;
        let (pages, qwords, ticks) = match workload {
            Workload::Idle | Workload::Kernel { .. } => (data_pages / v, 0, 0),
            Workload::Verifier => (data_pages / v, 512, 0),
            Workload::Writer {
                working_set_mib,
                rate_mib_s,
            } => {
                let ws_pages = (working_set_mib.saturating_mul(256)).clamp(v, data_pages);
                let ticks = match rate_mib_s {
                    Some(r) if *r > 0 => {
                        // ticks/page = tsc_hz * 4096 * vcpus / (rate * 2^20)
                        (tsc_khz * 1000 * v / (r * 256)).max(1)
                    }
                    _ => 0,
                };
                (ws_pages / v, 1, ticks)
            }
        };
        Ok(Self {
            workload: workload.clone(),
            vcpus,
            mem_bytes,
            tsc_khz,
            pages_per_vcpu: pages,
            qwords,
            ticks_per_page: ticks,
            gap_log_base,
            gap_log_entries,
        })
    }

    /// Guest address of vCPU `vcpu`'s gap-log ring.
    pub fn gap_log_addr(&self, vcpu: u64) -> u64 {
        self.gap_log_base + vcpu * self.gap_log_entries * GAP_LOG_ENTRY_BYTES
    }

    /// End of the gap-log rings (`gap_log_base` when there are none).
    pub fn gap_log_end(&self) -> u64 {
        self.gap_log_addr(u64::from(self.vcpus))
    }

    /// Entry point (guest-virtual RIP) of the workload.
    pub fn entry(&self) -> u64 {
        match self.workload {
            Workload::Idle => CODE + ENTRY_IDLE,
            _ => CODE + ENTRY_LOOP,
        }
    }

    fn params(&self) -> [(u64, u64); 13] {
        [
            (param::MAGIC, PARAMS_MAGIC),
            (param::WORKLOAD, self.workload.id()),
            (param::VCPUS, u64::from(self.vcpus)),
            (param::TSC_KHZ, self.tsc_khz),
            (param::DATA_BASE, DATA_BASE),
            (param::PAGES_PER_VCPU, self.pages_per_vcpu),
            (param::TICKS_PER_PAGE, self.ticks_per_page),
            // 100 us: the threshold for a "stall".
            (param::STALL_TICKS, self.tsc_khz / 10),
            // 1 ms: how far the rate limiter may fall behind before it forgets the debt.
            (param::SLACK_TICKS, self.tsc_khz),
            (param::QWORDS, self.qwords),
            // vCPU 0 prints a '.' on COM1 once per second of guest time.
            (param::HEARTBEAT_TICKS, self.tsc_khz * 1000),
            (param::GAP_LOG_BASE, self.gap_log_base),
            (param::GAP_LOG_MASK, self.gap_log_entries.saturating_sub(1)),
        ]
    }
}

fn put(mem: &KvmMemory, off: u64, v: u64) -> Result<(), GuestSetupError> {
    mem.write(off, &v.to_le_bytes())
        .ok_or(GuestSetupError::OutOfRange(off))
}

/// Page-table entry flags: present, writable, user.
const PTE_PWU: u64 = 0x7;
/// Page-directory entry for a 2 MiB page: present, writable, user, page size.
const PDE_2M: u64 = 0x87;

/// Writes page tables, GDT, TSS, code and parameters into `mem` (source only).
pub fn write_guest(mem: &KvmMemory, plan: &GuestPlan) -> Result<(), GuestSetupError> {
    let size = mem.size();
    put(mem, PML4, PDPT | PTE_PWU)?;
    let gib = size.div_ceil(1 << 30);
    for g in 0..gib {
        put(mem, PDPT + g * 8, (PDS + g * PAGE_SIZE) | PTE_PWU)?;
    }
    for k in 0..size / (2 << 20) {
        let gpa = mem
            .ram_offset_to_gpa(k * (2 << 20))
            .ok_or(GuestSetupError::OutOfRange(k * (2 << 20)))?;
        put(mem, PDS + k * 8, gpa | PDE_2M)?;
    }
    for (i, d) in gdt().iter().enumerate() {
        put(mem, GDT + 8 * i as u64, *d)?;
    }
    // TSS: an all-zero I/O permission bitmap right after the 0x68-byte TSS (every port
    // allowed), terminated by 0xff. IOPL 3 already allows port I/O at CPL3; the bitmap is for
    // hypervisors that check it anyway.
    put(mem, TSS + 0x60, 0x68 << 48)?;
    mem.write(TSS + 0x68 + 8192, &[0xff])
        .ok_or(GuestSetupError::OutOfRange(TSS))?;
    mem.write(CODE, &guest_code())
        .ok_or(GuestSetupError::OutOfRange(CODE))?;
    for (o, v) in plan.params() {
        put(mem, PARAMS + o, v)?;
    }
    if plan.gap_log_entries > 0 {
        for i in 0..u64::from(plan.vcpus) {
            put(
                mem,
                STATS + i * PAGE_SIZE + stat::LOG_BASE,
                plan.gap_log_addr(i),
            )?;
        }
    }
    Ok(())
}

/// The GDT: null, kernel code/data (unused, kept conventional), user code (64-bit, DPL 3),
/// user data (DPL 3), and a 16-byte busy 64-bit TSS descriptor.
pub fn gdt() -> [u64; 7] {
    let tss_limit = TSS_LIMIT;
    let tss_lo = (tss_limit & 0xffff)
        | ((TSS & 0xff_ffff) << 16)
        | (0xB << 40) // type: busy 64-bit TSS
        | (1 << 47) // present
        | (((TSS >> 24) & 0xff) << 56);
    [
        0,
        0x00AF_9B00_0000_FFFF,
        0x00CF_9300_0000_FFFF,
        0x00AF_FB00_0000_FFFF,
        0x00CF_F300_0000_FFFF,
        tss_lo,
        TSS >> 32,
    ]
}

/// The value iteration `round` writes into the page at guest-virtual `page_va`.
pub fn expected_page_value(round: u64, page_va: u64) -> u64 {
    (round.wrapping_add(1)).wrapping_mul(VALUE_MUL) ^ page_va
}

/// One vCPU's statistics as the guest published them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VcpuGuestStats {
    /// Completed iterations (pages written, or idle loops).
    pub iterations: u64,
    /// Longest gap between two progress points, in µs.
    pub max_gap_us: u64,
    /// Sum of the gaps longer than 100 µs, in µs.
    pub stall_us_over_100: u64,
    /// Number of gaps longer than 100 µs.
    pub stalls: u64,
    /// Guest TSC at the last progress point.
    pub last_tsc: u64,
}

/// What the built-in guest measured from inside (see [`crate::KvmVm::guest_stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestStats {
    /// Iterations summed over vCPUs.
    pub iterations: u64,
    /// Longest gap any vCPU saw, µs (guest-visible blackout or stall).
    pub max_gap_us: u64,
    /// The largest per-vCPU sum of gaps over 100 µs, µs.
    pub stall_us_over_100: u64,
    /// Per vCPU.
    pub per_vcpu: Vec<VcpuGuestStats>,
}

/// Reads the statistics pages (all zero for a multiboot kernel, which has none).
pub fn read_stats(mem: &KvmMemory, plan: &GuestPlan) -> GuestStats {
    if !plan.workload.is_builtin() {
        return GuestStats::default();
    }
    let khz = plan.tsc_khz.max(1);
    let rd = |o: u64| mem.read_u64(o).unwrap_or(0);
    let per_vcpu: Vec<VcpuGuestStats> = (0..u64::from(plan.vcpus))
        .map(|i| {
            let s = STATS + i * PAGE_SIZE;
            VcpuGuestStats {
                iterations: rd(s + stat::ITERATIONS),
                max_gap_us: rd(s + stat::MAX_GAP).saturating_mul(1000) / khz,
                stall_us_over_100: rd(s + stat::STALL_TICKS).saturating_mul(1000) / khz,
                stalls: rd(s + stat::STALLS),
                last_tsc: rd(s + stat::LAST_TSC),
            }
        })
        .collect();
    GuestStats {
        iterations: per_vcpu.iter().map(|s| s.iterations).sum(),
        max_gap_us: per_vcpu.iter().map(|s| s.max_gap_us).max().unwrap_or(0),
        stall_us_over_100: per_vcpu
            .iter()
            .map(|s| s.stall_us_over_100)
            .max()
            .unwrap_or(0),
        per_vcpu,
    }
}

/// One gap a guest vCPU logged: it ended at guest TSC `end_tsc` and lasted `ticks` TSC ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GapEntry {
    /// Guest TSC at the end of the gap (the first progress point after it).
    pub end_tsc: u64,
    /// Length of the gap in TSC ticks.
    pub ticks: u64,
}

impl GapEntry {
    /// Guest TSC at the start of the gap (the last progress point before it).
    pub fn start_tsc(&self) -> u64 {
        self.end_tsc.saturating_sub(self.ticks)
    }
}

/// One vCPU's gap log as read from guest memory, with its whole-run counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VcpuGapLog {
    /// Entries the guest appended since boot.
    pub written: u64,
    /// Ring capacity (entries); older entries were overwritten.
    pub capacity: u64,
    /// The surviving entries, oldest first (`min(written, capacity)` of them).
    pub entries: Vec<GapEntry>,
    /// Whole-run count of gaps over the threshold (the stats page's `STALLS`).
    pub stalls: u64,
    /// Whole-run sum of those gaps in TSC ticks.
    pub stall_ticks: u64,
    /// Whole-run longest gap in TSC ticks (over the threshold or not).
    pub max_gap_ticks: u64,
}

impl VcpuGapLog {
    /// Entries overwritten before they were read (the oldest ones).
    pub fn lost(&self) -> u64 {
        self.written.saturating_sub(self.capacity)
    }
}

/// Every vCPU's gap log (see [`read_gap_log`], [`GapLog::split`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GapLog {
    /// Guest TSC frequency, to turn ticks into time.
    pub tsc_khz: u64,
    /// Per vCPU, by index.
    pub vcpus: Vec<VcpuGapLog>,
}

/// Count, sum and longest of a set of gaps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GapSummary {
    /// Gaps.
    pub count: u64,
    /// Their sum, µs.
    pub sum_us: u64,
    /// The longest, µs.
    pub max_us: u64,
}

impl GapSummary {
    /// Several vCPUs' summaries as one: the largest count and sum of any vCPU (the
    /// most-affected one, like [`GuestStats`]) and the longest gap of any.
    fn largest(parts: impl Iterator<Item = GapSummary>) -> GapSummary {
        parts.fold(GapSummary::default(), |a, b| GapSummary {
            count: a.count.max(b.count),
            sum_us: a.sum_us.max(b.sum_us),
            max_us: a.max_us.max(b.max_us),
        })
    }
}

/// One vCPU's gaps split at its pause point.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VcpuGapSplit {
    /// The guest TSC the split was made at (the vCPU's TSC when the source paused).
    pub pause_tsc: u64,
    /// Gaps that ended at or before the pause point (pre-copy). With lost entries, count and
    /// sum are the whole-run counters minus the rest (exact when `complete`).
    pub pre: GapSummary,
    /// The gap that spans the pause point: the switchover as the guest saw it. `None` when no
    /// logged gap spans it (below the threshold, or lost when not `complete`).
    pub switch_gap_us: Option<u64>,
    /// The switchover gap in two parts: from the guest's last progress point to the pause
    /// point (the source stopping it and saving its state), and from the pause point to its
    /// first progress point after (sending, restoring, resuming, and in post-copy the faults
    /// before its first iteration completes).
    pub switch_parts_us: Option<(u64, u64)>,
    /// Gaps that started after the pause point (post-copy and after).
    pub after: GapSummary,
    /// Entries the ring overwrote before they were read.
    pub lost: u64,
    /// False when lost entries may include the switchover gap or later ones: then `after`
    /// counts only the surviving entries, and `pre` and `switch_gap_us` are unknown.
    pub complete: bool,
    /// False when entries were lost and `pre.max_us` is only the longest surviving one.
    pub pre_max_exact: bool,
}

/// All vCPUs' gaps split at the switchover: for each part the largest per-vCPU count and sum
/// and the longest gap of any vCPU (like [`GuestStats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GapSplit {
    /// Gaps that ended before the pause (pre-copy).
    pub pre: GapSummary,
    /// The longest gap spanning the pause of any vCPU (the guest-visible blackout).
    pub switch_gap_us: Option<u64>,
    /// That vCPU's [`VcpuGapSplit::switch_parts_us`].
    pub switch_parts_us: Option<(u64, u64)>,
    /// Gaps after the switchover.
    pub after: GapSummary,
    /// Entries lost to ring overflow, summed over vCPUs.
    pub lost: u64,
    /// Every vCPU's split is complete (see [`VcpuGapSplit::complete`]).
    pub complete: bool,
    /// Every vCPU's `pre.max_us` is exact.
    pub pre_max_exact: bool,
    /// Per vCPU.
    pub per_vcpu: Vec<VcpuGapSplit>,
}

/// Errors of [`GapLog::split`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GapSplitError {
    /// The pause points do not match the vCPUs (e.g. no state was saved or restored).
    #[error("Gap split needs one pause TSC per vCPU: got {given} for {vcpus} vCPUs")]
    VcpuCount {
        /// Pause points given.
        given: usize,
        /// vCPUs in the log.
        vcpus: usize,
    },
}

impl GapLog {
    fn us(&self, ticks: u64) -> u64 {
        u64::try_from(u128::from(ticks) * 1000 / u128::from(self.tsc_khz.max(1)))
            .unwrap_or(u64::MAX)
    }

    fn summary(&self, count: u64, sum_ticks: u64, max_ticks: u64) -> GapSummary {
        GapSummary {
            count,
            sum_us: self.us(sum_ticks),
            max_us: self.us(max_ticks),
        }
    }

    /// Splits every vCPU's gaps at its guest TSC `pause_tsc[i]` (the TSC the source saved for
    /// it: every gap ending after it started on the destination, or spans the switchover).
    pub fn split(&self, pause_tsc: &[u64]) -> Result<GapSplit, GapSplitError> {
        if pause_tsc.len() != self.vcpus.len() {
            return Err(GapSplitError::VcpuCount {
                given: pause_tsc.len(),
                vcpus: self.vcpus.len(),
            });
        }
        let per_vcpu: Vec<VcpuGapSplit> = self
            .vcpus
            .iter()
            .zip(pause_tsc)
            .map(|(v, &t)| self.split_vcpu(v, t))
            .collect();
        Ok(GapSplit {
            pre: GapSummary::largest(per_vcpu.iter().map(|s| s.pre)),
            switch_gap_us: per_vcpu.iter().filter_map(|s| s.switch_gap_us).max(),
            switch_parts_us: per_vcpu
                .iter()
                .filter(|s| s.switch_gap_us.is_some())
                .max_by_key(|s| s.switch_gap_us)
                .and_then(|s| s.switch_parts_us),
            after: GapSummary::largest(per_vcpu.iter().map(|s| s.after)),
            lost: per_vcpu.iter().map(|s| s.lost).sum(),
            complete: per_vcpu.iter().all(|s| s.complete),
            pre_max_exact: per_vcpu.iter().all(|s| s.pre_max_exact),
            per_vcpu,
        })
    }

    /// The gaps of each vCPU `i` that started after `from[i]` and at or before `to[i]`
    /// (guest TSCs), summarised like [`Self::split`]'s parts: the largest per-vCPU count and
    /// sum, the longest gap of any vCPU. With `from` the pause points and `to` each vCPU's TSC
    /// when the destination finished the migration, this is what the guest lost while the
    /// migration still ran on this side (post-copy faults and push, the digest), apart from
    /// the switchover gap and from whatever ran on this machine after. Gaps the ring lost are
    /// not counted (see [`GapSplit::complete`]).
    pub fn between(&self, from: &[u64], to: &[u64]) -> Result<GapSummary, GapSplitError> {
        for given in [from.len(), to.len()] {
            if given != self.vcpus.len() {
                return Err(GapSplitError::VcpuCount {
                    given,
                    vcpus: self.vcpus.len(),
                });
            }
        }
        let per_vcpu = self.vcpus.iter().zip(from).zip(to).map(|((v, &a), &b)| {
            let (mut n, mut sum, mut max) = (0u64, 0u64, 0u64);
            for e in v
                .entries
                .iter()
                .filter(|e| e.start_tsc() > a && e.start_tsc() <= b)
            {
                n += 1;
                sum = sum.saturating_add(e.ticks);
                max = max.max(e.ticks);
            }
            self.summary(n, sum, max)
        });
        Ok(GapSummary::largest(per_vcpu))
    }

    fn split_vcpu(&self, v: &VcpuGapLog, pause: u64) -> VcpuGapSplit {
        let (mut pre_n, mut pre_sum, mut pre_max) = (0u64, 0u64, 0u64);
        let (mut aft_n, mut aft_sum, mut aft_max) = (0u64, 0u64, 0u64);
        let mut switch = None;
        for e in &v.entries {
            if e.end_tsc <= pause {
                pre_n += 1;
                pre_sum = pre_sum.saturating_add(e.ticks);
                pre_max = pre_max.max(e.ticks);
            } else if e.start_tsc() <= pause {
                switch = Some(*e);
            } else {
                aft_n += 1;
                aft_sum = aft_sum.saturating_add(e.ticks);
                aft_max = aft_max.max(e.ticks);
            }
        }
        let lost = v.lost();
        // Lost entries are the oldest: the split is complete when the oldest survivor started
        // at or before the pause (so everything from the switchover on survived).
        let complete = lost == 0 || v.entries.first().is_some_and(|e| e.start_tsc() <= pause);
        let mut pre_max_exact = lost == 0;
        if lost > 0 && complete {
            // The lost entries were all pre-copy: the whole-run counters minus the rest.
            let s = switch.map_or(0, |e| e.ticks);
            pre_n = v.stalls.saturating_sub(aft_n + u64::from(switch.is_some()));
            pre_sum = v.stall_ticks.saturating_sub(aft_sum.saturating_add(s));
            if v.max_gap_ticks > aft_max.max(s) {
                // The whole run's longest gap is neither the switchover nor after it.
                pre_max = v.max_gap_ticks;
                pre_max_exact = true;
            }
        }
        let pre = if complete {
            self.summary(pre_n, pre_sum, pre_max)
        } else {
            GapSummary::default()
        };
        VcpuGapSplit {
            pause_tsc: pause,
            pre,
            switch_gap_us: switch.filter(|_| complete).map(|e| self.us(e.ticks)),
            switch_parts_us: switch
                .filter(|_| complete)
                .map(|e| (self.us(pause - e.start_tsc()), self.us(e.end_tsc - pause))),
            after: self.summary(aft_n, aft_sum, aft_max),
            lost,
            complete,
            pre_max_exact: pre_max_exact && complete,
        }
    }
}

/// Reads every vCPU's gap log and whole-run counters (empty for workloads without one). Read
/// it while the VM is paused: a running guest may be appending.
pub fn read_gap_log(mem: &KvmMemory, plan: &GuestPlan) -> GapLog {
    let mut log = GapLog {
        tsc_khz: plan.tsc_khz,
        vcpus: Vec::new(),
    };
    if !plan.workload.is_builtin() {
        return log;
    }
    let rd = |o: u64| mem.read_u64(o).unwrap_or(0);
    let cap = plan.gap_log_entries;
    let mut ring = vec![0u64; usize::try_from(cap * 2).unwrap_or(0)];
    for i in 0..u64::from(plan.vcpus) {
        let s = STATS + i * PAGE_SIZE;
        let written = if cap > 0 { rd(s + stat::LOG_COUNT) } else { 0 };
        let mut entries = Vec::new();
        // Page by page: a ring may straddle the RAM regions around the 32-bit hole.
        let base = plan.gap_log_addr(i);
        let readable = ring
            .chunks_mut(512)
            .zip((base..).step_by(4096))
            .all(|(c, off)| mem.read_u64s(off, c).is_some());
        // An unreadable ring (a layout bug) counts as all entries lost, never as no gaps.
        let capacity = if readable { cap } else { 0 };
        if written > 0 && readable {
            entries.reserve(usize::try_from(written.min(cap)).unwrap_or(0));
            for k in written.saturating_sub(cap)..written {
                // cap is a power of two (gap_log_entries_for); the guest indexes with the mask.
                let j = usize::try_from((k & (cap - 1)) * 2).unwrap_or(0);
                entries.push(GapEntry {
                    end_tsc: ring[j],
                    ticks: ring[j + 1],
                });
            }
        }
        log.vcpus.push(VcpuGapLog {
            written,
            capacity,
            entries,
            stalls: rd(s + stat::STALLS),
            stall_ticks: rd(s + stat::STALL_TICKS),
            max_gap_ticks: rd(s + stat::MAX_GAP),
        });
    }
    log
}

/// One page that does not match the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageMismatch {
    /// RAM offset (= guest-virtual address) of the page.
    pub ram_offset: u64,
    /// Index of the first wrong qword in the page.
    pub qword: u64,
    /// What was there.
    pub found: u64,
    /// What the model expects.
    pub expected: u64,
}

/// Result of checking guest memory against the workload model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Pages compared (data pages, plus code and parameter pages).
    pub pages_checked: u64,
    /// Pages that did not match.
    pub bad_pages: u64,
    /// The first few mismatches.
    pub mismatches: Vec<PageMismatch>,
    /// The per-vCPU iteration counters the model was evaluated at.
    pub iterations: Vec<u64>,
}

impl VerifyReport {
    /// True when every checked page matched.
    pub fn ok(&self) -> bool {
        self.bad_pages == 0
    }

    fn bad(&mut self, m: PageMismatch) {
        self.bad_pages += 1;
        if self.mismatches.len() < 16 {
            self.mismatches.push(m);
        }
    }
}

/// Checks every data page (and the code and parameter pages) against the model. The VM must
/// be paused.
pub fn verify(mem: &KvmMemory, plan: &GuestPlan) -> VerifyReport {
    let mut rep = VerifyReport::default();
    // Code and parameters are constant.
    let code = guest_code();
    let mut buf = vec![0u8; code.len()];
    rep.pages_checked += 2;
    if mem.read(CODE, &mut buf).is_none() || buf != code {
        let q = buf.iter().zip(&code).position(|(a, b)| a != b).unwrap_or(0) as u64;
        rep.bad(PageMismatch {
            ram_offset: CODE,
            qword: q / 8,
            found: 0,
            expected: 0,
        });
    }
    for (o, v) in plan.params() {
        let found = mem.read_u64(PARAMS + o).unwrap_or(!v);
        if found != v {
            rep.bad(PageMismatch {
                ram_offset: PARAMS,
                qword: o / 8,
                found,
                expected: v,
            });
            break;
        }
    }
    let p = plan.pages_per_vcpu;
    let q = plan.qwords;
    let mut page = [0u64; 512];
    let mut expected = [0u64; 512];
    let mut check = |rep: &mut VerifyReport,
                     va: u64,
                     fast: Option<u64>,
                     f: &dyn Fn(u64, u64) -> bool,
                     exp: &dyn Fn(u64) -> u64| {
        rep.pages_checked += 1;
        if mem.read_u64s(va, &mut page).is_none() {
            rep.bad(PageMismatch {
                ram_offset: va,
                qword: 0,
                found: 0,
                expected: 0,
            });
            return;
        }
        // Fast path: the page is exactly "first q qwords = v, rest 0" (a memcmp).
        if let Some(v) = fast {
            let q = usize::try_from(q).unwrap_or(512).min(512);
            expected[..q].fill(v);
            if page == expected {
                return;
            }
        }
        for (i, &v) in page.iter().enumerate() {
            let i = i as u64;
            if !f(i, v) {
                rep.bad(PageMismatch {
                    ram_offset: va,
                    qword: i,
                    found: v,
                    expected: exp(i),
                });
                return;
            }
        }
    };
    for vcpu in 0..u64::from(plan.vcpus) {
        let n = mem
            .read_u64(STATS + vcpu * PAGE_SIZE + stat::ITERATIONS)
            .unwrap_or(0);
        rep.iterations.push(n);
        let base = DATA_BASE + vcpu * p * PAGE_SIZE;
        for j in 0..p {
            let va = base + j * PAGE_SIZE;
            // Value of the last completed write of page j (0 if never written).
            let done = if q > 0 && n > j {
                expected_page_value((n - 1 - j) / p, va)
            } else {
                0
            };
            if q > 0 && j == n % p {
                // The page of iteration n may be partly written: a prefix of new values, then
                // old ones, inside the first q qwords.
                let new = expected_page_value(n / p, va);
                let seen_old = std::cell::Cell::new(false);
                check(
                    &mut rep,
                    va,
                    None,
                    &|i, v| {
                        if i >= q {
                            return v == 0;
                        }
                        if v == new && !seen_old.get() {
                            return true;
                        }
                        seen_old.set(true);
                        v == done
                    },
                    &|i| if i < q { new } else { 0 },
                );
            } else {
                check(
                    &mut rep,
                    va,
                    Some(done),
                    &|i, v| v == if i < q { done } else { 0 },
                    &|i| if i < q { done } else { 0 },
                );
            }
        }
    }
    // Data pages past the partitions are never written; nor is RAM above the gap-log rings
    // (the rings themselves hold measurements, not data).
    let mut va = DATA_BASE + u64::from(plan.vcpus) * p * PAGE_SIZE;
    while va < plan.mem_bytes {
        if (plan.gap_log_base..plan.gap_log_end()).contains(&va) {
            va = plan.gap_log_end();
            continue;
        }
        check(&mut rep, va, Some(0), &|_, v| v == 0, &|_| 0);
        va += PAGE_SIZE;
    }
    rep
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::memory::MemBacking;

    #[test]
    fn code_entry_points_match_listing() {
        let c = guest_code();
        assert_eq!(c.len(), 0x1c2);
        // idle_entry: mov rbx, rdi
        assert_eq!(&c[0x13b..0x13e], &[0x48, 0x89, 0xfb]);
        assert_eq!(&c[0x17f..0x18f], b"ferry guest up\n\0");
        // The stall path jumps out to 0x190 and back to 0x0ba (rel32 from the next insn).
        let rel = |at: usize| i32::from_le_bytes(c[at + 1..at + 5].try_into().unwrap());
        assert_eq!(c[0xb2], 0xe9);
        assert_eq!(0xb7 + i64::from(rel(0xb2)), 0x190);
        assert_eq!(c[0x1bd], 0xe9);
        assert_eq!(0x1c2 + i64::from(rel(0x1bd)), 0xba);
        // It reads the mask parameter and the stats page's log fields.
        assert_eq!(
            &c[0x1a3..0x1a7],
            &(PARAMS + param::GAP_LOG_MASK).to_le_bytes()[..4]
        );
        assert_eq!(c[0x19b], u8::try_from(stat::LOG_COUNT).unwrap());
        assert_eq!(c[0x1ae], u8::try_from(stat::LOG_BASE).unwrap());
    }

    /// Appends gaps to vCPU `vcpu`'s log the way the guest's stall path does.
    fn log_gaps(mem: &KvmMemory, plan: &GuestPlan, vcpu: u64, gaps: &[(u64, u64)]) {
        let s = STATS + vcpu * PAGE_SIZE;
        let base = mem.read_u64(s + stat::LOG_BASE).unwrap();
        assert_eq!(base, plan.gap_log_addr(vcpu));
        let mask = mem.read_u64(PARAMS + param::GAP_LOG_MASK).unwrap();
        for &(end, ticks) in gaps {
            let n = mem.read_u64(s + stat::LOG_COUNT).unwrap();
            let e = base + (n & mask) * GAP_LOG_ENTRY_BYTES;
            mem.write(e, &end.to_le_bytes()).unwrap();
            mem.write(e + 8, &ticks.to_le_bytes()).unwrap();
            mem.write(s + stat::LOG_COUNT, &(n + 1).to_le_bytes())
                .unwrap();
            let add = |o: u64, v: u64| {
                let old = mem.read_u64(s + o).unwrap();
                mem.write(s + o, &(old + v).to_le_bytes()).unwrap();
            };
            add(stat::STALLS, 1);
            add(stat::STALL_TICKS, ticks);
            let max = mem.read_u64(s + stat::MAX_GAP).unwrap().max(ticks);
            mem.write(s + stat::MAX_GAP, &max.to_le_bytes()).unwrap();
        }
    }

    #[test]
    fn gap_log_splits_at_the_pause_point() {
        let mem = KvmMemory::new(4 << 20, MemBacking::Anonymous, false).unwrap();
        // 1 MHz TSC: one tick per µs.
        let plan = GuestPlan::new(&Workload::Verifier, 2, 4 << 20, 1000).unwrap();
        write_guest(&mem, &plan).unwrap();
        // vCPU 0: two pre-copy gaps, one spanning the pause at 10_000, two after.
        log_gaps(
            &mem,
            &plan,
            0,
            &[
                (1000, 200),
                (9000, 500),
                (12_000, 2500),
                (13_000, 300),
                (20_000, 900),
            ],
        );
        // vCPU 1 paused at 10_050: a gap ending exactly at its pause point is pre-copy.
        log_gaps(&mem, &plan, 1, &[(10_050, 150), (11_000, 1000)]);
        let log = read_gap_log(&mem, &plan);
        assert_eq!(log.vcpus[0].written, 5);
        assert_eq!(
            log.vcpus[0].entries[2],
            GapEntry {
                end_tsc: 12_000,
                ticks: 2500
            }
        );
        assert!(matches!(
            log.split(&[10_000]),
            Err(GapSplitError::VcpuCount { given: 1, vcpus: 2 })
        ));
        let sp = log.split(&[10_000, 10_050]).unwrap();
        let v0 = &sp.per_vcpu[0];
        assert_eq!(
            v0.pre,
            GapSummary {
                count: 2,
                sum_us: 700,
                max_us: 500
            }
        );
        assert_eq!(v0.switch_gap_us, Some(2500));
        // It started at 9500: 500 µs before the pause point, 2000 after.
        assert_eq!(v0.switch_parts_us, Some((500, 2000)));
        assert_eq!(
            v0.after,
            GapSummary {
                count: 2,
                sum_us: 1200,
                max_us: 900
            }
        );
        assert!(v0.complete && v0.pre_max_exact && v0.lost == 0);
        let v1 = &sp.per_vcpu[1];
        assert_eq!(
            v1.pre,
            GapSummary {
                count: 1,
                sum_us: 150,
                max_us: 150
            }
        );
        assert_eq!(v1.switch_gap_us, Some(1000));
        assert_eq!(v1.switch_parts_us, Some((50, 950)));
        assert_eq!(v1.after, GapSummary::default());
        // Aggregates: longest switchover gap, largest per-vCPU count and sum.
        assert_eq!(sp.switch_gap_us, Some(2500));
        assert_eq!(sp.switch_parts_us, Some((500, 2000)));
        assert_eq!(
            sp.pre,
            GapSummary {
                count: 2,
                sum_us: 700,
                max_us: 500
            }
        );
        assert_eq!(sp.after.count, 2);
        assert!(sp.complete && sp.lost == 0);
        // Between the pause points and TSC 15_000 (vCPU 0) / 10_900 (vCPU 1): vCPU 0's gap
        // that started at 12_700 counts, the one from 19_100 is later, the switchover gaps
        // started before; vCPU 1 has none.
        assert_eq!(
            log.between(&[10_000, 10_050], &[15_000, 10_900]).unwrap(),
            GapSummary {
                count: 1,
                sum_us: 300,
                max_us: 300
            }
        );
        assert_eq!(
            log.between(&[10_000, 10_050], &[30_000, 30_000]).unwrap(),
            sp.after
        );
        assert!(matches!(
            log.between(&[10_000, 10_050], &[1]),
            Err(GapSplitError::VcpuCount { given: 1, vcpus: 2 })
        ));
        // The rings are not data: scribbling on them leaves the verifier model intact.
        assert!(verify(&mem, &plan).ok());
    }

    #[test]
    fn gap_log_overflow_is_reported_and_accounted() {
        let mem = KvmMemory::new(4 << 20, MemBacking::Anonymous, false).unwrap();
        let plan = GuestPlan::new(
            &Workload::Writer {
                working_set_mib: 1,
                rate_mib_s: None,
            },
            1,
            4 << 20,
            1000,
        )
        .unwrap();
        let cap = plan.gap_log_entries;
        write_guest(&mem, &plan).unwrap();
        // cap + 100 pre-copy gaps (the longest, 5000, among the first ones, so overwritten),
        // then the switchover gap and 10 after it.
        let mut gaps: Vec<(u64, u64)> = (0..cap + 100).map(|k| (1000 + k * 1000, 200)).collect();
        gaps[3].1 = 5000;
        let pause = 1000 + (cap + 100) * 1000;
        gaps.push((pause + 700, 1000));
        gaps.extend((1..=10).map(|k| (pause + 700 + k * 1000, 300)));
        log_gaps(&mem, &plan, 0, &gaps);
        let log = read_gap_log(&mem, &plan);
        let v = &log.vcpus[0];
        assert_eq!(v.written, cap + 111);
        assert_eq!(v.lost(), 111);
        assert_eq!(v.entries.len(), usize::try_from(cap).unwrap());
        // Oldest surviving first, newest last.
        assert_eq!(v.entries[0].end_tsc, 1000 + 111 * 1000);
        assert_eq!(v.entries.last().unwrap().end_tsc, pause + 10_700);
        let sp = log.split(&[pause]).unwrap();
        assert_eq!(sp.lost, 111);
        assert!(sp.complete, "only pre-copy entries were lost");
        assert_eq!(sp.switch_gap_us, Some(1000));
        assert_eq!(
            sp.after,
            GapSummary {
                count: 10,
                sum_us: 3000,
                max_us: 300
            }
        );
        // Pre-copy count and sum come from the whole-run counters; the overwritten 5000 is
        // still the whole run's longest gap, so the pre-copy max is exact too.
        assert_eq!(sp.pre.count, cap + 100);
        assert_eq!(sp.pre.sum_us, (cap + 99) * 200 + 5000);
        assert_eq!(sp.pre.max_us, 5000);
        assert!(sp.pre_max_exact);

        // Overflow after the switchover: the switchover gap and early post-copy gaps are gone.
        let mem = KvmMemory::new(4 << 20, MemBacking::Anonymous, false).unwrap();
        write_guest(&mem, &plan).unwrap();
        let mut gaps = vec![(500, 200), (2000, 1500)];
        gaps.extend((1..=cap).map(|k| (2000 + k * 1000, 300)));
        log_gaps(&mem, &plan, 0, &gaps);
        let sp = read_gap_log(&mem, &plan).split(&[1000]).unwrap();
        assert_eq!(sp.lost, 2);
        assert!(!sp.complete && !sp.pre_max_exact);
        assert_eq!(sp.switch_gap_us, None);
        assert_eq!(sp.switch_parts_us, None);
        assert_eq!(sp.pre, GapSummary::default());
        assert_eq!(sp.after.count, cap);
    }

    #[test]
    fn gap_log_ring_across_the_32_bit_hole_reads_whole() {
        // 3 GiB + 2 MiB, 2 vCPUs: 4 MiB rings from 3 GiB - 6 MiB; vCPU 1's straddles the hole.
        let mem = KvmMemory::new((3 << 30) + (2 << 20), MemBacking::Anonymous, false).unwrap();
        let plan = GuestPlan::new(&Workload::Verifier, 2, mem.size(), 1000).unwrap();
        assert_eq!(plan.gap_log_entries, GAP_LOG_MAX_ENTRIES);
        let ring = plan.gap_log_addr(1);
        assert!(ring < 3 << 30 && ring + GAP_LOG_MAX_ENTRIES * GAP_LOG_ENTRY_BYTES > 3 << 30);
        write_guest(&mem, &plan).unwrap();
        let cap = plan.gap_log_entries;
        for k in 0..cap {
            let e = ring + k * GAP_LOG_ENTRY_BYTES;
            mem.write(e, &((k + 1) * 1000).to_le_bytes()).unwrap();
            mem.write(e + 8, &500u64.to_le_bytes()).unwrap();
        }
        let s = STATS + PAGE_SIZE;
        mem.write(s + stat::LOG_COUNT, &cap.to_le_bytes()).unwrap();
        let log = read_gap_log(&mem, &plan);
        let v = &log.vcpus[1];
        assert_eq!((v.written, v.lost()), (cap, 0));
        assert_eq!(v.entries.len(), usize::try_from(cap).unwrap());
        assert!(
            v.entries
                .iter()
                .zip(1..)
                .all(|(e, k)| e.end_tsc == k * 1000 && e.ticks == 500)
        );
    }

    #[test]
    fn gap_log_rings_sit_at_the_top_of_mapped_ram() {
        let plan = GuestPlan::new(&Workload::Verifier, 2, 64 << 20, 1_000_000).unwrap();
        assert_eq!(plan.gap_log_end(), 64 << 20);
        // 64 MiB / 256 = 256 KiB for both vCPUs: 8192 entries each.
        assert_eq!(plan.gap_log_entries, 8192);
        assert_eq!(
            plan.gap_log_base,
            (64 << 20) - 2 * 8192 * GAP_LOG_ENTRY_BYTES
        );
        assert_eq!(
            DATA_BASE + 2 * plan.pages_per_vcpu * PAGE_SIZE,
            plan.gap_log_base
        );
        // Not a multiple of 2 MiB: the rings end at the last mapped 2 MiB page.
        let plan = GuestPlan::new(&Workload::Verifier, 1, (64 << 20) + 4096, 1_000_000).unwrap();
        assert_eq!(plan.gap_log_end(), 64 << 20);
        // Scaled with RAM per vCPU, within bounds, always a power of two.
        assert_eq!(gap_log_entries_for(1 << 30, 2), 131_072);
        assert_eq!(gap_log_entries_for(3 << 30, 2), 262_144);
        assert_eq!(gap_log_entries_for(96 << 20, 2), 8192);
        assert_eq!(gap_log_entries_for(4 << 20, 2), GAP_LOG_MIN_ENTRIES);
        assert_eq!(gap_log_entries_for(128 << 30, 1), GAP_LOG_MAX_ENTRIES);
        // The idle guest logs nothing and keeps all its RAM.
        let plan = GuestPlan::new(&Workload::Idle, 2, 64 << 20, 1_000_000).unwrap();
        assert_eq!(plan.gap_log_entries, 0);
        assert_eq!(plan.gap_log_base, 64 << 20);
        // Too small for the rings.
        assert!(matches!(
            GuestPlan::new(&Workload::Verifier, 32, 2 << 20, 1_000_000),
            Err(GuestSetupError::TooSmall { .. })
        ));
    }

    #[test]
    fn model_accepts_simulated_guest_and_rejects_corruption() {
        let mem = KvmMemory::new(4 << 20, MemBacking::Anonymous, false).unwrap();
        let plan = GuestPlan::new(&Workload::Verifier, 2, 4 << 20, 1_000_000).unwrap();
        write_guest(&mem, &plan).unwrap();
        // Simulate the guest: vCPU 0 does 1000 iterations, vCPU 1 does 17 plus half a page.
        let p = plan.pages_per_vcpu;
        for (vcpu, n) in [(0u64, 1000u64), (1, 17)] {
            for it in 0..n {
                let va = DATA_BASE + (vcpu * p + it % p) * PAGE_SIZE;
                let v = expected_page_value(it / p, va);
                for qw in 0..512 {
                    mem.write(va + qw * 8, &v.to_le_bytes()).unwrap();
                }
            }
            mem.write(STATS + vcpu * PAGE_SIZE, &n.to_le_bytes())
                .unwrap();
        }
        let va = DATA_BASE + (p + 17) * PAGE_SIZE;
        let v = expected_page_value(0, va);
        for qw in 0..100 {
            mem.write(va + qw * 8, &v.to_le_bytes()).unwrap();
        }
        let rep = verify(&mem, &plan);
        assert!(rep.ok(), "{rep:?}");
        assert_eq!(rep.iterations, vec![1000, 17]);
        // Corrupt one qword of a written page.
        let va = DATA_BASE + 5 * PAGE_SIZE;
        mem.write(va + 8 * 77, &1u64.to_le_bytes()).unwrap();
        let rep = verify(&mem, &plan);
        assert_eq!(rep.bad_pages, 1);
        assert_eq!(rep.mismatches[0].ram_offset, va);
        assert_eq!(rep.mismatches[0].qword, 77);
    }

    #[test]
    fn page_tables_map_ram_above_the_hole_contiguously() {
        // Anonymous + NORESERVE: only the pages written here get memory.
        let mem = KvmMemory::new((3 << 30) + (64 << 20), MemBacking::Anonymous, false).unwrap();
        let plan = GuestPlan::new(&Workload::Verifier, 1, mem.size(), 1_000_000).unwrap();
        write_guest(&mem, &plan).unwrap();
        let pde = |va: u64| {
            let pdpt = mem.read_u64(PDPT + (va >> 30) * 8).unwrap();
            assert_eq!(
                pdpt & 0x7,
                0x7,
                "PDPT entry for {va:#x} not present/user/writable"
            );
            let pd = pdpt & !0xfff;
            mem.read_u64(pd + ((va >> 21) & 511) * 8).unwrap()
        };
        // Identity below the hole, shifted by 1 GiB above it; 2 MiB user pages everywhere.
        assert_eq!(pde(0), PDE_2M);
        assert_eq!(pde((3 << 30) - (2 << 20)), ((3 << 30) - (2 << 20)) | PDE_2M);
        assert_eq!(pde(3 << 30), (4 << 30) | PDE_2M);
        assert_eq!(
            pde((3 << 30) + (62 << 20)),
            ((4 << 30) + (62 << 20)) | PDE_2M
        );
        // The PML4 points at the PDPT.
        assert_eq!(mem.read_u64(PML4), Some(PDPT | PTE_PWU));
    }

    #[test]
    fn writer_rate_is_split_per_vcpu() {
        let w = Workload::Writer {
            working_set_mib: 64,
            rate_mib_s: Some(100),
        };
        let plan = GuestPlan::new(&w, 2, 256 << 20, 2_000_000).unwrap();
        assert_eq!(plan.pages_per_vcpu, 64 * 256 / 2);
        // 2 GHz, 100 MiB/s = 25600 pages/s in total, 12800 per vCPU: 156250 ticks per page.
        assert_eq!(plan.ticks_per_page, 156_250);
        assert!(matches!(
            GuestPlan::new(&w, 2, 1 << 20, 1),
            Err(GuestSetupError::TooSmall { .. })
        ));
    }
}
