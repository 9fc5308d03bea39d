// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Which guest pages a paused vCPU will touch first when it runs again, read from its saved
//! state: the page-table pages that translate its instruction pointer, stack pointer,
//! descriptor tables, segment bases and every general-purpose register that holds a mapped
//! address, and the pages those addresses land on.
//!
//! Why: after a post-copy switchover every page the guest touches before the background push
//! delivers it is a fault with a network round trip, and the first instructions on the
//! destination touch exactly these pages (its code, its stack, its page tables, the data its
//! registers point at), one fault after the other. Sending them inside the blackout costs a
//! few 4 KiB pages; not sending them costs the guest several round trips in a row.
//!
//! This is a heuristic, not a guarantee: a register may hold a number that happens to be a
//! mapped address (one wasted page), and the guest may touch pages no register names. The walk
//! reads guest memory only through the caller's `read_u64` and never trusts a table entry
//! beyond reading the next one; it understands 4-level long-mode paging and unpaged mode and
//! gives only the root table for other paging modes.

use kvm_bindings::{kvm_regs, kvm_sregs};

/// CR0.PG: paging enabled.
const CR0_PG: u64 = 1 << 31;
/// CR4.LA57: 5-level paging.
const CR4_LA57: u64 = 1 << 12;
/// EFER.LMA: long mode active.
const EFER_LMA: u64 = 1 << 10;
/// Page-table entry: present.
const PTE_P: u64 = 1;
/// Page-table entry: large page (in a PDPT or PD entry).
const PTE_PS: u64 = 1 << 7;
/// Physical-address bits 51:12 of an entry.
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
/// The guest page size.
const PAGE: u64 = 4096;

/// The page-aligned guest-physical addresses a vCPU with these registers touches first, in
/// priority order (instruction pointer and stack first), without duplicates. `read_u64(gpa)`
/// reads a little-endian word of guest RAM (`None` outside RAM); `is_ram(gpa)` says whether a
/// page is guest RAM (addresses elsewhere, e.g. MMIO, are left out).
pub fn first_touch_pages(
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    read_u64: &dyn Fn(u64) -> Option<u64>,
    is_ram: &dyn Fn(u64) -> bool,
) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    let mut add = |gpa: u64| {
        let page = gpa & !(PAGE - 1);
        if is_ram(page) && !out.contains(&page) {
            out.push(page);
        }
    };
    let paged = sregs.cr0 & CR0_PG != 0;
    let long = sregs.efer & EFER_LMA != 0 && sregs.cr4 & CR4_LA57 == 0;
    if paged {
        add(sregs.cr3 & ADDR_MASK);
    }
    // Linear addresses, most urgent first.
    let mut linear = vec![
        sregs.cs.base.wrapping_add(regs.rip),
        sregs.ss.base.wrapping_add(regs.rsp),
        sregs.tr.base,
        sregs.gdt.base,
        sregs.idt.base,
        sregs.fs.base,
        sregs.gs.base,
    ];
    linear.extend([
        regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi, regs.rbp, regs.r8, regs.r9,
        regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
    ]);
    for va in linear {
        if !paged {
            add(va);
            continue;
        }
        if !long {
            // 32-bit or PAE paging: only the root table (added above).
            continue;
        }
        let (tables, page) = walk4(sregs.cr3, va, read_u64);
        // A register that is not a mapped address adds nothing, not even the tables walked.
        if let Some(page) = page {
            for t in tables {
                add(t);
            }
            add(page);
        }
    }
    out
}

/// Walks 4-level paging for `va` from `cr3`: the table pages visited (below the root) and the
/// physical address `va` maps to, if it is mapped.
fn walk4(cr3: u64, va: u64, read_u64: &dyn Fn(u64) -> Option<u64>) -> (Vec<u64>, Option<u64>) {
    let mut tables = Vec::with_capacity(3);
    let mut table = cr3 & ADDR_MASK;
    // (index shift, whether a large page is allowed at this level, large-page offset mask)
    let levels = [
        (39, None),
        (30, Some((1u64 << 30) - 1)),
        (21, Some((1u64 << 21) - 1)),
        (12, None),
    ];
    for (depth, (shift, large)) in levels.into_iter().enumerate() {
        if depth > 0 {
            tables.push(table);
        }
        let Some(e) = read_u64(table + ((va >> shift) & 511) * 8) else {
            return (tables, None);
        };
        if e & PTE_P == 0 {
            return (tables, None);
        }
        if shift == 12 {
            return (tables, Some((e & ADDR_MASK) + (va & (PAGE - 1))));
        }
        if let Some(mask) = large
            && e & PTE_PS != 0
        {
            return (tables, Some((e & ADDR_MASK & !mask) + (va & mask)));
        }
        table = e & ADDR_MASK;
    }
    (tables, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A guest with 4-level tables at 0x1000 (PML4), 0x2000 (PDPT), 0x3000 (PD), 0x4000 (PT):
    /// VA 0x40_0000.. (PD entry 2) maps 4 KiB pages through the PT, VA 0x20_0000 (PD entry 1)
    /// is a 2 MiB page at 0x80_0000, everything else unmapped.
    fn guest() -> (HashMap<u64, u64>, kvm_sregs) {
        let mut m = HashMap::new();
        m.insert(0x1000, 0x2000 | PTE_P);
        m.insert(0x2000, 0x3000 | PTE_P);
        m.insert(0x3000 + 8, 0x80_0000 | PTE_P | PTE_PS);
        m.insert(0x3000 + 2 * 8, 0x4000 | PTE_P);
        // VA 0x40_5000 -> PT entry 5 -> 0x9000.
        m.insert(0x4000 + 5 * 8, 0x9000 | PTE_P);
        let sregs = kvm_sregs {
            cr0: CR0_PG | 1,
            cr3: 0x1000,
            cr4: 1 << 5,
            efer: EFER_LMA | (1 << 8),
            ..Default::default()
        };
        (m, sregs)
    }

    fn run(regs: &kvm_regs, sregs: &kvm_sregs, m: &HashMap<u64, u64>) -> Vec<u64> {
        let read = |gpa: u64| -> Option<u64> {
            if gpa >= 0x100_0000 {
                return None;
            }
            Some(m.get(&gpa).copied().unwrap_or(0))
        };
        first_touch_pages(regs, sregs, &read, &|gpa| gpa < 0x100_0000)
    }

    #[test]
    fn walks_four_levels_and_large_pages() {
        let (m, sregs) = guest();
        let regs = kvm_regs {
            rip: 0x40_5123,
            rsp: 0x20_1ff8,
            // Not mapped: adds nothing.
            rax: 0x7777_0000,
            ..Default::default()
        };
        let pages = run(&regs, &sregs, &m);
        // Root first, then RIP's tables and page, then RSP's page (tables already there).
        assert_eq!(
            pages,
            vec![0x1000, 0x2000, 0x3000, 0x4000, 0x9000, 0x80_1000]
        );
    }

    #[test]
    fn unpaged_mode_uses_addresses_as_physical() {
        let (m, _) = guest();
        let sregs = kvm_sregs::default();
        let regs = kvm_regs {
            rip: 0x7c00,
            rsp: 0x6ff0,
            rbx: 0x2000_0000, // outside RAM
            ..Default::default()
        };
        let pages = run(&regs, &sregs, &m);
        assert_eq!(pages, vec![0x7000, 0x6000, 0]);
    }

    #[test]
    fn garbage_tables_never_escape_ram() {
        // Every entry present and pointing far outside RAM: reads fail, nothing is added
        // beyond the root.
        let sregs = kvm_sregs {
            cr0: CR0_PG,
            cr3: 0x1000,
            efer: EFER_LMA,
            ..Default::default()
        };
        let read = |gpa: u64| -> Option<u64> {
            (gpa < 0x10_0000).then_some(0xFFF0_0000_0000_0000 | ADDR_MASK | PTE_P)
        };
        let regs = kvm_regs {
            rip: 0x1234_5678,
            ..Default::default()
        };
        let pages = first_touch_pages(&regs, &sregs, &read, &|gpa| gpa < 0x10_0000);
        assert_eq!(pages, vec![0x1000]);
    }
}
