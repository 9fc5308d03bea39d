// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Multiboot (v1) kernel loading, the way QEMU's `-kernel` loads one: find the multiboot
//! header in the first 8 KiB, load the ELF32 `PT_LOAD` segments at their physical addresses
//! (or the a.out-kludge ranges when header flag 16 is set), build the multiboot information
//! structure (memory sizes, memory map, command line, boot loader name) and enter the kernel in
//! 32-bit protected mode with paging off, `EAX = 0x2BADB002`, `EBX` = the information's address.
//!
//! Parsing is bounds-checked and returns [`MultibootError`]. Only the source VM loads; the
//! destination receives the kernel's memory by migration. Modules, VBE and ELF64 are not
//! supported (QEMU refuses ELF64 for multiboot too).

use crate::memory::{HIGH_RAM_START, KvmMemory, LOW_RAM_END};

/// The magic a multiboot header starts with.
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// The magic the boot loader leaves in EAX.
pub const BOOT_MAGIC: u32 = 0x2BAD_B002;
/// Where the multiboot information structure goes.
pub const MBI_ADDR: u64 = 0x9000;
/// Memory map entries (inside the MBI page).
const MMAP_ADDR: u64 = 0x9100;
/// Boot loader name.
const NAME_ADDR: u64 = 0x9780;
/// Command line (up to 2 KiB, NUL included).
const CMDLINE_ADDR: u64 = 0x9800;
/// GDT for the protected-mode entry (flat code 0x08, flat data 0x10).
pub const BOOT_GDT: u64 = 0x8F00;

/// Errors loading a multiboot kernel.
#[derive(Debug, thiserror::Error)]
pub enum MultibootError {
    /// The file could not be read.
    #[error("Cannot read kernel {path}")]
    Read {
        /// File.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// No valid multiboot header in the first 8 KiB.
    #[error("No multiboot header in the first 8 KiB")]
    NoHeader,
    /// Not an ELF32 i386 image and no a.out kludge.
    #[error("Kernel is not an ELF32 i386 image (and has no a.out-kludge addresses)")]
    NotElf32,
    /// A header or segment points outside the file.
    #[error("Kernel {what} at {off:#x}+{len:#x} beyond the file ({size:#x} bytes)")]
    Truncated {
        /// What.
        what: &'static str,
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
        /// File size.
        size: usize,
    },
    /// A segment does not fit in guest RAM or overlaps the boot area.
    #[error("Kernel segment {addr:#x}+{len:#x} outside usable RAM")]
    BadSegment {
        /// Physical address.
        addr: u64,
        /// Memory size.
        len: u64,
    },
    /// The command line is longer than 2 KiB.
    #[error("Kernel command line of {0} bytes too long (max 2047)")]
    CmdlineTooLong(usize),
}

/// What [`load`] produced: where to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootInfo {
    /// Entry point (physical = virtual, paging off).
    pub entry: u32,
    /// EBX: the multiboot information address.
    pub mbi: u32,
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
}

/// Loads `image` into `mem` with `cmdline` and returns the entry state.
pub fn load(mem: &KvmMemory, image: &[u8], cmdline: &str) -> Result<BootInfo, MultibootError> {
    // Header: 4-byte aligned, in the first 8192 bytes, magic + flags + checksum == 0.
    let hdr = (0..8192usize.min(image.len()).saturating_sub(11))
        .step_by(4)
        .find(|&o| {
            let (Some(m), Some(f), Some(c)) =
                (u32_at(image, o), u32_at(image, o + 4), u32_at(image, o + 8))
            else {
                return false;
            };
            m == HEADER_MAGIC && m.wrapping_add(f).wrapping_add(c) == 0
        })
        .ok_or(MultibootError::NoHeader)?;
    let flags = u32_at(image, hdr + 4).ok_or(MultibootError::NoHeader)?;
    let trunc = |what, off: u64, len: u64| MultibootError::Truncated {
        what,
        off,
        len,
        size: image.len(),
    };
    let entry = if flags & (1 << 16) != 0 {
        // a.out kludge: header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr.
        let f = |i: usize| u32_at(image, hdr + 12 + 4 * i).ok_or(trunc("a.out fields", 0, 20));
        let (header_addr, load_addr, load_end, bss_end, entry) =
            (f(0)?, f(1)?, f(2)?, f(3)?, f(4)?);
        let file_off = u64::try_from(hdr)
            .unwrap_or(u64::MAX)
            .checked_sub(u64::from(header_addr.wrapping_sub(load_addr)))
            .ok_or(trunc("a.out load", 0, 0))?;
        let end = if load_end == 0 {
            u64::from(load_addr) + image.len() as u64 - file_off
        } else {
            u64::from(load_end)
        };
        let len = end.saturating_sub(u64::from(load_addr));
        let mem_len = if bss_end == 0 {
            len
        } else {
            u64::from(bss_end)
                .saturating_sub(u64::from(load_addr))
                .max(len)
        };
        place(mem, image, file_off, len, u64::from(load_addr), mem_len)?;
        entry
    } else {
        // ELF32, little-endian, i386.
        if image.get(0..4) != Some(b"\x7fELF".as_slice())
            || image.get(4) != Some(&1)
            || image.get(5) != Some(&1)
            || u16_at(image, 18) != Some(3)
        {
            return Err(MultibootError::NotElf32);
        }
        let entry = u32_at(image, 24).ok_or(MultibootError::NotElf32)?;
        let phoff = u32_at(image, 28).ok_or(MultibootError::NotElf32)? as usize;
        let phentsize = usize::from(u16_at(image, 42).ok_or(MultibootError::NotElf32)?);
        let phnum = usize::from(u16_at(image, 44).ok_or(MultibootError::NotElf32)?);
        if phentsize < 32 {
            return Err(MultibootError::NotElf32);
        }
        for i in 0..phnum {
            let ph = phoff + i * phentsize;
            let f =
                |k: usize| u32_at(image, ph + 4 * k).ok_or(trunc("program header", ph as u64, 32));
            // p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz
            if f(0)? != 1 {
                continue;
            }
            let (off, paddr, filesz, memsz) = (f(1)?, f(3)?, f(4)?, f(5)?);
            place(
                mem,
                image,
                u64::from(off),
                u64::from(filesz),
                u64::from(paddr),
                u64::from(memsz),
            )?;
        }
        entry
    };
    write_info(mem, cmdline)?;
    Ok(BootInfo {
        entry,
        mbi: u32::try_from(MBI_ADDR).unwrap_or(0),
    })
}

/// Copies `len` file bytes from `off` to guest-physical `addr` and zeroes up to `mem_len`.
fn place(
    mem: &KvmMemory,
    image: &[u8],
    off: u64,
    len: u64,
    addr: u64,
    mem_len: u64,
) -> Result<(), MultibootError> {
    let bad = MultibootError::BadSegment { addr, len: mem_len };
    let src = usize::try_from(off)
        .ok()
        .zip(usize::try_from(len).ok())
        .and_then(|(o, l)| image.get(o..o.checked_add(l)?))
        .ok_or(MultibootError::Truncated {
            what: "segment",
            off,
            len,
            size: image.len(),
        })?;
    let end = addr.checked_add(mem_len.max(len)).ok_or(bad)?;
    // Kernels live in low RAM above the boot area (GDT + MBI at 0x8F00..0xA000).
    if addr < 0xA000 || end > mem.size().min(LOW_RAM_END) {
        return Err(MultibootError::BadSegment { addr, len: mem_len });
    }
    mem.write(addr, src)
        .ok_or(MultibootError::BadSegment { addr, len })?;
    if mem_len > len {
        let zeros = vec![0u8; usize::try_from(mem_len - len).unwrap_or(0)];
        mem.write(addr + len, &zeros)
            .ok_or(MultibootError::BadSegment { addr, len: mem_len })?;
    }
    Ok(())
}

fn write_info(mem: &KvmMemory, cmdline: &str) -> Result<(), MultibootError> {
    if cmdline.len() > 2047 {
        return Err(MultibootError::CmdlineTooLong(cmdline.len()));
    }
    let w32 = |a: u64, v: u32| {
        mem.write(a, &v.to_le_bytes())
            .ok_or(MultibootError::BadSegment { addr: a, len: 4 })
    };
    let size = mem.size();
    let low = size.min(LOW_RAM_END);
    // Memory map: conventional memory, the EBDA/BIOS holes, RAM above 1 MiB, RAM above 4 GiB.
    let mut map = vec![
        (0u64, 0x9FC00u64, 1u32),
        (0x9FC00, 0x400, 2),
        (0xF0000, 0x10000, 2),
    ];
    map.push((0x100000, low - 0x100000, 1));
    if size > low {
        map.push((HIGH_RAM_START, size - low, 1));
    }
    let mut a = MMAP_ADDR;
    for (base, len, ty) in &map {
        w32(a, 20)?;
        mem.write(a + 4, &base.to_le_bytes())
            .ok_or(MultibootError::BadSegment { addr: a, len: 24 })?;
        mem.write(a + 12, &len.to_le_bytes())
            .ok_or(MultibootError::BadSegment { addr: a, len: 24 })?;
        w32(a + 20, *ty)?;
        a += 24;
    }
    let mut name = b"ferry".to_vec();
    name.push(0);
    mem.write(NAME_ADDR, &name)
        .ok_or(MultibootError::BadSegment {
            addr: NAME_ADDR,
            len: 6,
        })?;
    let mut cl = cmdline.as_bytes().to_vec();
    cl.push(0);
    mem.write(CMDLINE_ADDR, &cl)
        .ok_or(MultibootError::BadSegment {
            addr: CMDLINE_ADDR,
            len: 2048,
        })?;
    let as32 = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    // flags: mem_* (0), cmdline (2), mmap (6), boot_loader_name (9).
    w32(MBI_ADDR, 1 | (1 << 2) | (1 << 6) | (1 << 9))?;
    w32(MBI_ADDR + 4, 640)?;
    w32(MBI_ADDR + 8, as32((low - 0x100000) / 1024))?;
    w32(MBI_ADDR + 16, as32(CMDLINE_ADDR))?;
    w32(MBI_ADDR + 44, as32(a - MMAP_ADDR))?;
    w32(MBI_ADDR + 48, as32(MMAP_ADDR))?;
    w32(MBI_ADDR + 64, as32(NAME_ADDR))?;
    // Flat GDT: null, code 0x08 (32-bit, ring 0), data 0x10.
    for (i, d) in [0u64, 0x00CF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF]
        .iter()
        .enumerate()
    {
        mem.write(BOOT_GDT + 8 * i as u64, &d.to_le_bytes())
            .ok_or(MultibootError::BadSegment {
                addr: BOOT_GDT,
                len: 24,
            })?;
    }
    Ok(())
}

/// Where [`demo_kernel`] keeps EAX, EBX and its loop counter (3 u32 words).
pub const DEMO_KERNEL_DATA: u64 = 0x200000;

/// A tiny multiboot kernel (an ELF32 image, built here, no toolchain needed) for demos and
/// tests. It stores EAX and EBX at [`DEMO_KERNEL_DATA`]; programs PIT channel 0 (rate
/// generator, count 0x1234) and the local APIC timer (periodic, vector 0x30, divide by 16,
/// initial count 0x100000) — with interrupts disabled, so timer interrupts stay pending in the
/// PIC and LAPIC (state a migration must carry); prints `hello from multiboot: <cmdline>` and a
/// newline on COM1; then forever prints `.` and increments the u32 at `DEMO_KERNEL_DATA + 8`,
/// with a short delay loop between dots. Needs at least 4 MiB of RAM.
pub fn demo_kernel() -> Vec<u8> {
    #[rustfmt::skip]
    let code: [u8; 0x86] = [
        0xa3, 0x00, 0x00, 0x20, 0x00,             // 0x00: mov [0x200000], eax
        0x89, 0x1d, 0x04, 0x00, 0x20, 0x00,       // 0x05: mov [0x200004], ebx
        0xb0, 0x34,                               // 0x0b: mov al, 0x34 (ch 0, lo/hi, mode 2)
        0xe6, 0x43,                               // 0x0d: out 0x43, al
        0xe6, 0x40,                               // 0x0f: out 0x40, al (count low 0x34)
        0xb0, 0x12,                               // 0x11: mov al, 0x12
        0xe6, 0x40,                               // 0x13: out 0x40, al (count high 0x12)
        0xc7, 0x05, 0xf0, 0x00, 0xe0, 0xfe,
        0xff, 0x01, 0x00, 0x00,                   // 0x15: mov [0xfee000f0], 0x1ff (SVR: on)
        0xc7, 0x05, 0xe0, 0x03, 0xe0, 0xfe,
        0x03, 0x00, 0x00, 0x00,                   // 0x1f: mov [0xfee003e0], 3 (divide by 16)
        0xc7, 0x05, 0x20, 0x03, 0xe0, 0xfe,
        0x30, 0x00, 0x02, 0x00,                   // 0x29: mov [0xfee00320], 0x20030 (LVT timer)
        0xc7, 0x05, 0x80, 0x03, 0xe0, 0xfe,
        0x00, 0x00, 0x10, 0x00,                   // 0x33: mov [0xfee00380], 0x100000 (TMICT)
        0x66, 0xba, 0xf8, 0x03,                   // 0x3d: mov dx, 0x3f8
        0xbe, 0xcf, 0x00, 0x10, 0x00,             // 0x41: mov esi, 0x1000cf (the greeting)
        0xac,                                     // 0x46: lodsb
        0x84, 0xc0,                               // 0x47: test al, al
        0x74, 0x03,                               // 0x49: jz 0x4e
        0xee,                                     // 0x4b: out dx, al
        0xeb, 0xf8,                               // 0x4c: jmp 0x46
        0x8b, 0x73, 0x10,                         // 0x4e: mov esi, [ebx + 16] (cmdline)
        0xac,                                     // 0x51: lodsb
        0x84, 0xc0,                               // 0x52: test al, al
        0x74, 0x03,                               // 0x54: jz 0x59
        0xee,                                     // 0x56: out dx, al
        0xeb, 0xf8,                               // 0x57: jmp 0x51
        0xb0, 0x0a,                               // 0x59: mov al, '\n'
        0xee,                                     // 0x5b: out dx, al
        0xb0, 0x2e,                               // 0x5c: mov al, '.'
        0xee,                                     // 0x5e: out dx, al
        0xff, 0x05, 0x08, 0x00, 0x20, 0x00,       // 0x5f: inc dword [0x200008]
        0xb9, 0xd0, 0x07, 0x00, 0x00,             // 0x65: mov ecx, 2000
        0x49,                                     // 0x6a: dec ecx
        0x75, 0xfd,                               // 0x6b: jnz 0x6a
        0xeb, 0xed,                               // 0x6d: jmp 0x5c
        // 0x6f: "hello from multiboot: \0"
        b'h', b'e', b'l', b'l', b'o', b' ', b'f', b'r', b'o', b'm', b' ', b'm', b'u', b'l',
        b't', b'i', b'b', b'o', b'o', b't', b':', b' ', 0,
    ];
    tiny_elf(&code)
}

/// A minimal ELF32 with one PT_LOAD at 1 MiB holding a multiboot header and `code` (entry at
/// 0x100060, 4 KiB of bss after the code).
fn tiny_elf(code: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 0x60];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 1; // 32-bit
    f[5] = 1; // little-endian
    f[6] = 1; // version
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&3u16.to_le_bytes()); // EM_386
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..28].copy_from_slice(&(0x100000u32 + 0x60).to_le_bytes()); // entry
    f[28..32].copy_from_slice(&52u32.to_le_bytes()); // phoff
    f[40..42].copy_from_slice(&52u16.to_le_bytes()); // ehsize
    f[42..44].copy_from_slice(&32u16.to_le_bytes()); // phentsize
    f[44..46].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let total = u32::try_from(0x60 + code.len()).unwrap_or(u32::MAX);
    for (k, v) in [
        1u32,
        0,
        0x100000,
        0x100000,
        total,
        total + 0x1000,
        7,
        0x1000,
    ]
    .iter()
    .enumerate()
    {
        f[52 + 4 * k..56 + 4 * k].copy_from_slice(&v.to_le_bytes());
    }
    // Multiboot header at 0x54: magic, flags (mem info), checksum.
    let flags = 2u32;
    f[0x54..0x58].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
    f[0x58..0x5c].copy_from_slice(&flags.to_le_bytes());
    f[0x5c..0x60]
        .copy_from_slice(&(0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags)).to_le_bytes());
    f.extend_from_slice(code);
    f
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::memory::MemBacking;

    #[test]
    fn loads_elf_and_writes_info() {
        let mem = KvmMemory::new(8 << 20, MemBacking::Anonymous, false).unwrap();
        let img = demo_kernel();
        let bi = load(&mem, &img, "console=ttyS0").unwrap();
        assert_eq!(bi.entry, 0x100060);
        let mut b = [0u8; 5];
        mem.read(0x100060, &mut b).unwrap();
        assert_eq!(b, [0xa3, 0x00, 0x00, 0x20, 0x00]);
        // The greeting is where the code's `mov esi` points.
        let mut g = [0u8; 5];
        mem.read(0x1000cf, &mut g).unwrap();
        assert_eq!(&g, b"hello");
        // bss zeroed, cmdline and mmap present
        assert_eq!(mem.read_u64(0x100060 + 0x86 + 8), Some(0));
        let mut cl = [0u8; 14];
        mem.read(CMDLINE_ADDR, &mut cl).unwrap();
        assert_eq!(&cl, b"console=ttyS0\0");
        assert_eq!(
            mem.read_u64(MBI_ADDR + 44).map(|v| v & 0xffff_ffff),
            Some(4 * 24)
        );
    }

    #[test]
    fn rejects_bad_images() {
        let mem = KvmMemory::new(8 << 20, MemBacking::Anonymous, false).unwrap();
        assert!(matches!(
            load(&mem, b"garbage", ""),
            Err(MultibootError::NoHeader)
        ));
        let mut img = tiny_elf(&[0x90]);
        img[18] = 62; // EM_X86_64
        assert!(matches!(
            load(&mem, &img, ""),
            Err(MultibootError::NotElf32)
        ));
        let mut img = tiny_elf(&[0x90]);
        img[52 + 12..52 + 16].copy_from_slice(&0x7f0_0000u32.to_le_bytes()); // paddr past RAM
        assert!(matches!(
            load(&mem, &img, ""),
            Err(MultibootError::BadSegment { .. })
        ));
        for n in 0..img.len() {
            let _ = load(&mem, &img[..n], "");
        }
    }
}
