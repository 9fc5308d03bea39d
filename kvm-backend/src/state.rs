// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The saved VM state and its versioned binary encoding.
//!
//! Blob layout (all little-endian): magic `b"FERRYKVM"`, `u32` version, `u32` section count,
//! then sections `{ u32 tag, u32 len, len bytes }`. A vCPU section's payload is itself a
//! sequence of sections (regs, sregs, ...). KVM structs are stored as their raw `repr(C)`
//! bytes, with the length checked on decode, so a blob only restores on the same KVM ABI (the
//! same architecture and kvm-bindings layout) — which is what a live migration between two
//! ferry processes needs. Decoding is bounds-checked and returns [`StateDecodeError`]; it never
//! panics on bad input.
//!
//! This module only converts; capturing from and applying to KVM is in [`crate::vm`].

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};

use crate::sys::{Pod, pod_bytes, pod_from_bytes};

/// Blob magic.
pub const MAGIC: [u8; 8] = *b"FERRYKVM";
/// Blob format version.
pub const VERSION: u32 = 1;

/// Errors decoding a state blob.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateDecodeError {
    /// The blob does not start with the magic.
    #[error("State blob has a bad magic")]
    BadMagic,
    /// Another format version.
    #[error("State blob version {0} unsupported (want {VERSION})")]
    Version(u32),
    /// The blob ends inside a field.
    #[error("State blob truncated at byte {at} (need {need} more)")]
    Truncated {
        /// Offset where reading stopped.
        at: usize,
        /// Bytes missing.
        need: usize,
    },
    /// A section has the wrong size for its type.
    #[error("State section {tag:#x} has {len} bytes, expected {want}")]
    BadLength {
        /// Section tag.
        tag: u32,
        /// Its length.
        len: usize,
        /// Expected length.
        want: usize,
    },
    /// A required section is absent.
    #[error("State section {0:#x} missing")]
    Missing(u32),
    /// An unknown section tag.
    #[error("State section {0:#x} unknown")]
    UnknownSection(u32),
}

/// Tags of top-level sections.
mod tag {
    pub const CLOCK: u32 = 0x01;
    pub const PIC_MASTER: u32 = 0x02;
    pub const PIC_SLAVE: u32 = 0x03;
    pub const IOAPIC: u32 = 0x04;
    pub const PIT: u32 = 0x05;
    pub const SERIAL: u32 = 0x06;
    pub const GUEST: u32 = 0x07;
    pub const SAVED_AT: u32 = 0x08;
    pub const VCPU: u32 = 0x10;
    // Inside a vCPU section.
    pub const REGS: u32 = 0x101;
    pub const SREGS: u32 = 0x102;
    pub const FPU: u32 = 0x103;
    pub const XSAVE: u32 = 0x104;
    pub const XCRS: u32 = 0x105;
    pub const MSRS: u32 = 0x106;
    pub const LAPIC: u32 = 0x107;
    pub const EVENTS: u32 = 0x108;
    pub const MP_STATE: u32 = 0x109;
    pub const DEBUGREGS: u32 = 0x10a;
    pub const TSC: u32 = 0x10b;
    pub const ID: u32 = 0x10c;
}

/// A vCPU's TSC at save time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TscState {
    /// Guest TSC (`MSR_IA32_TSC`) when saved.
    pub tsc: u64,
    /// `CLOCK_REALTIME` in ns right after reading `tsc`.
    pub realtime_ns: u64,
    /// Guest TSC offset (`KVM_VCPU_TSC_OFFSET`), when KVM exposes it.
    pub offset: Option<u64>,
}

/// Everything KVM holds for one vCPU.
#[derive(Clone, Default)]
pub struct VcpuState {
    /// vCPU index.
    pub id: u32,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// Legacy FPU/SSE state, saved only when KVM lacks XSAVE (else all zero: the XSAVE
    /// area's legacy region carries it).
    pub fpu: kvm_fpu,
    /// XSAVE area bytes (4096-byte region plus the `KVM_CAP_XSAVE2` extension); empty
    /// without XSAVE.
    pub xsave: Vec<u8>,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Every saved MSR as (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
    /// Multiprocessor state.
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Time stamp counter.
    pub tsc: TscState,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("id", &self.id)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .field("xsave_bytes", &self.xsave.len())
            .field("tsc", &self.tsc)
            .finish_non_exhaustive()
    }
}

/// The serial port's registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SerialState {
    /// Interrupt enable.
    pub ier: u8,
    /// Line control.
    pub lcr: u8,
    /// Modem control.
    pub mcr: u8,
    /// Scratch.
    pub scr: u8,
    /// Divisor latch low.
    pub dll: u8,
    /// Divisor latch high.
    pub dlm: u8,
}

/// Everything saved for a VM.
#[derive(Clone, Default)]
pub struct VmState {
    /// kvmclock (`KVM_GET_CLOCK`).
    pub clock: kvm_clock_data,
    /// PIC master, PIC slave, IOAPIC (`KVM_GET_IRQCHIP` chip ids 0, 1, 2).
    pub irqchips: [kvm_irqchip; 3],
    /// PIT (`KVM_GET_PIT2`).
    pub pit: kvm_pit_state2,
    /// COM1 registers.
    pub serial: SerialState,
    /// The built-in guest's identity (workload id, vCPUs, RAM size, TSC kHz); empty for none.
    /// The destination checks it against its own configuration.
    pub guest: Vec<u64>,
    /// `CLOCK_REALTIME` ns when the VM state was captured.
    pub saved_at_ns: u64,
    /// Per vCPU, by index.
    pub vcpus: Vec<VcpuState>,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("clock", &self.clock.clock)
            .field("serial", &self.serial)
            .field("guest", &self.guest)
            .field("vcpus", &self.vcpus)
            .finish_non_exhaustive()
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn section(&mut self, tag: u32, body: &[u8]) {
        self.u32(tag);
        // Sections are far below 4 GiB (the largest is XSAVE, a few KiB).
        self.u32(u32::try_from(body.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(body);
    }
    fn pod<T: Pod>(&mut self, tag: u32, v: &T) {
        self.section(tag, pod_bytes(v));
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateDecodeError> {
        let rest = self.b.len() - self.at;
        if n > rest {
            return Err(StateDecodeError::Truncated {
                at: self.at,
                need: n - rest,
            });
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, StateDecodeError> {
        let mut w = [0u8; 4];
        w.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(w))
    }
    fn section(&mut self) -> Result<(u32, &'a [u8]), StateDecodeError> {
        let t = self.u32()?;
        let n = self.u32()? as usize;
        Ok((t, self.take(n)?))
    }
    fn done(&self) -> bool {
        self.at == self.b.len()
    }
}

fn pod<T: Pod>(tag: u32, b: &[u8]) -> Result<T, StateDecodeError> {
    pod_from_bytes(b).ok_or(StateDecodeError::BadLength {
        tag,
        len: b.len(),
        want: std::mem::size_of::<T>(),
    })
}

fn u64s(tag: u32, b: &[u8]) -> Result<Vec<u64>, StateDecodeError> {
    if !b.len().is_multiple_of(8) {
        return Err(StateDecodeError::BadLength {
            tag,
            len: b.len(),
            want: b.len() / 8 * 8,
        });
    }
    Ok(b.chunks_exact(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_le_bytes(w)
        })
        .collect())
}

fn u64_bytes(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn encode_vcpu(v: &VcpuState) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(8192));
    w.section(tag::ID, &v.id.to_le_bytes());
    w.pod(tag::REGS, &v.regs);
    w.pod(tag::SREGS, &v.sregs);
    w.pod(tag::FPU, &v.fpu);
    w.section(tag::XSAVE, &v.xsave);
    w.pod(tag::XCRS, &v.xcrs);
    let mut m = Vec::with_capacity(v.msrs.len() * 12);
    for (i, d) in &v.msrs {
        m.extend_from_slice(&i.to_le_bytes());
        m.extend_from_slice(&d.to_le_bytes());
    }
    w.section(tag::MSRS, &m);
    w.pod(tag::LAPIC, &v.lapic);
    w.pod(tag::EVENTS, &v.events);
    w.pod(tag::MP_STATE, &v.mp_state);
    w.pod(tag::DEBUGREGS, &v.debugregs);
    let t = &v.tsc;
    w.section(
        tag::TSC,
        &u64_bytes(&[
            t.tsc,
            t.realtime_ns,
            u64::from(t.offset.is_some()),
            t.offset.unwrap_or(0),
        ]),
    );
    w.0
}

fn decode_vcpu(b: &[u8]) -> Result<VcpuState, StateDecodeError> {
    let mut r = Reader { b, at: 0 };
    let mut v = VcpuState::default();
    let mut seen = 0u32;
    while !r.done() {
        let (t, s) = r.section()?;
        match t {
            tag::ID => {
                let mut w = [0u8; 4];
                if s.len() != 4 {
                    return Err(StateDecodeError::BadLength {
                        tag: t,
                        len: s.len(),
                        want: 4,
                    });
                }
                w.copy_from_slice(s);
                v.id = u32::from_le_bytes(w);
            }
            tag::REGS => v.regs = pod(t, s)?,
            tag::SREGS => v.sregs = pod(t, s)?,
            tag::FPU => v.fpu = pod(t, s)?,
            tag::XSAVE => v.xsave = s.to_vec(),
            tag::XCRS => v.xcrs = pod(t, s)?,
            tag::MSRS => {
                if s.len() % 12 != 0 {
                    return Err(StateDecodeError::BadLength {
                        tag: t,
                        len: s.len(),
                        want: s.len() / 12 * 12,
                    });
                }
                v.msrs = s
                    .chunks_exact(12)
                    .map(|c| {
                        let mut i = [0u8; 4];
                        let mut d = [0u8; 8];
                        i.copy_from_slice(&c[..4]);
                        d.copy_from_slice(&c[4..]);
                        (u32::from_le_bytes(i), u64::from_le_bytes(d))
                    })
                    .collect();
            }
            tag::LAPIC => v.lapic = pod(t, s)?,
            tag::EVENTS => v.events = pod(t, s)?,
            tag::MP_STATE => v.mp_state = pod(t, s)?,
            tag::DEBUGREGS => v.debugregs = pod(t, s)?,
            tag::TSC => {
                let w = u64s(t, s)?;
                if w.len() != 4 {
                    return Err(StateDecodeError::BadLength {
                        tag: t,
                        len: s.len(),
                        want: 32,
                    });
                }
                v.tsc = TscState {
                    tsc: w[0],
                    realtime_ns: w[1],
                    offset: (w[2] != 0).then_some(w[3]),
                };
            }
            other => return Err(StateDecodeError::UnknownSection(other)),
        }
        seen |= 1 << (t - 0x100);
    }
    // Every vCPU section must carry every piece.
    for t in tag::REGS..=tag::ID {
        if seen & (1 << (t - 0x100)) == 0 {
            return Err(StateDecodeError::Missing(t));
        }
    }
    Ok(v)
}

impl VmState {
    /// Serializes into a blob.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(16384 * (1 + self.vcpus.len())));
        w.0.extend_from_slice(&MAGIC);
        w.u32(VERSION);
        w.u32(u32::try_from(8 + self.vcpus.len()).unwrap_or(u32::MAX));
        w.pod(tag::CLOCK, &self.clock);
        w.pod(tag::PIC_MASTER, &self.irqchips[0]);
        w.pod(tag::PIC_SLAVE, &self.irqchips[1]);
        w.pod(tag::IOAPIC, &self.irqchips[2]);
        w.pod(tag::PIT, &self.pit);
        let s = &self.serial;
        w.section(tag::SERIAL, &[s.ier, s.lcr, s.mcr, s.scr, s.dll, s.dlm]);
        w.section(tag::GUEST, &u64_bytes(&self.guest));
        w.section(tag::SAVED_AT, &self.saved_at_ns.to_le_bytes());
        for v in &self.vcpus {
            w.section(tag::VCPU, &encode_vcpu(v));
        }
        w.0
    }

    /// Parses a blob made by [`VmState::encode`].
    pub fn decode(b: &[u8]) -> Result<Self, StateDecodeError> {
        let mut r = Reader { b, at: 0 };
        if r.take(8).map_err(|_| StateDecodeError::BadMagic)? != MAGIC {
            return Err(StateDecodeError::BadMagic);
        }
        let ver = r.u32()?;
        if ver != VERSION {
            return Err(StateDecodeError::Version(ver));
        }
        let count = r.u32()?;
        let mut st = VmState::default();
        let mut seen = 0u32;
        for _ in 0..count {
            let (t, s) = r.section()?;
            match t {
                tag::CLOCK => st.clock = pod(t, s)?,
                tag::PIC_MASTER => st.irqchips[0] = pod(t, s)?,
                tag::PIC_SLAVE => st.irqchips[1] = pod(t, s)?,
                tag::IOAPIC => st.irqchips[2] = pod(t, s)?,
                tag::PIT => st.pit = pod(t, s)?,
                tag::SERIAL => {
                    let [ier, lcr, mcr, scr, dll, dlm] =
                        <[u8; 6]>::try_from(s).map_err(|_| StateDecodeError::BadLength {
                            tag: t,
                            len: s.len(),
                            want: 6,
                        })?;
                    st.serial = SerialState {
                        ier,
                        lcr,
                        mcr,
                        scr,
                        dll,
                        dlm,
                    };
                }
                tag::GUEST => st.guest = u64s(t, s)?,
                tag::SAVED_AT => {
                    st.saved_at_ns = *u64s(t, s)?.first().ok_or(StateDecodeError::BadLength {
                        tag: t,
                        len: s.len(),
                        want: 8,
                    })?;
                }
                tag::VCPU => st.vcpus.push(decode_vcpu(s)?),
                other => return Err(StateDecodeError::UnknownSection(other)),
            }
            if t < tag::VCPU {
                seen |= 1 << t;
            }
        }
        for t in tag::CLOCK..=tag::SAVED_AT {
            if seen & (1 << t) == 0 {
                return Err(StateDecodeError::Missing(t));
            }
        }
        if !r.done() {
            return Err(StateDecodeError::UnknownSection(0xffff_ffff));
        }
        Ok(st)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample() -> VmState {
        let mut v = VcpuState {
            id: 1,
            xsave: vec![7u8; 4096],
            msrs: vec![(0x10, 5), (0xc000_0080, 0x500)],
            tsc: TscState {
                tsc: 123,
                realtime_ns: 456,
                offset: Some(789),
            },
            ..Default::default()
        };
        v.regs.rip = 0x8000;
        v.sregs.cr3 = 0x1000;
        v.lapic.regs[0x20] = 3;
        let mut st = VmState {
            guest: vec![3, 2, 64 << 20, 2_000_000],
            saved_at_ns: 99,
            vcpus: vec![v.clone(), VcpuState { id: 0, ..v }],
            ..Default::default()
        };
        st.clock.clock = 42;
        st.pit.channels[0].count = 17;
        st.serial.lcr = 3;
        st
    }

    #[test]
    fn roundtrip_is_exact() {
        let st = sample();
        let blob = st.encode();
        let back = VmState::decode(&blob).unwrap();
        assert_eq!(back.encode(), blob);
        assert_eq!(back.vcpus[0].tsc.offset, Some(789));
        assert_eq!(back.vcpus[1].regs.rip, 0x8000);
        assert_eq!(back.vcpus[0].msrs, vec![(0x10, 5), (0xc000_0080, 0x500)]);
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let blob = sample().encode();
        for n in 0..blob.len() {
            assert!(VmState::decode(&blob[..n]).is_err(), "prefix {n} accepted");
        }
        // Flip every byte of the first 200 bytes (headers): decode must not panic.
        for i in 0..200.min(blob.len()) {
            let mut b = blob.clone();
            b[i] ^= 0xff;
            let _ = VmState::decode(&b);
        }
        let mut b = blob.clone();
        b[8] = 9;
        assert_eq!(
            VmState::decode(&b).unwrap_err(),
            StateDecodeError::Version(9)
        );
        assert_eq!(
            VmState::decode(b"nope").unwrap_err(),
            StateDecodeError::BadMagic
        );
    }
}
