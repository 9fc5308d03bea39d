// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The crate's unsafe surface: raw ioctls kvm-ioctls lacks, mmap/memfd, the vCPU kick signal and
//! POD byte views of kvm-bindings structs.
//!
//! Everything here is small and documented; the rest of the crate is safe code. What lives here:
//! - `KVM_CLEAR_DIRTY_LOG` and `KVM_RESET_DIRTY_RINGS` (missing from kvm-ioctls 0.25,
//!   rust-vmm/kvm#344), `KVM_GET_DIRTY_LOG` into a caller's buffer (kvm-ioctls allocates a new
//!   one per call, and at 8 GiB a fresh 256 KiB buffer costs page faults inside the blackout), vCPU `KVM_{HAS,GET,SET}_DEVICE_ATTR` (kvm-ioctls exposes them for
//!   aarch64 only; x86 needs them for `KVM_VCPU_TSC_OFFSET`);
//! - [`Mapping`]: a host mapping of guest RAM (memfd `MAP_SHARED` or private anonymous);
//! - [`DirtyRing`]: one vCPU's dirty ring, mmapped at `KVM_DIRTY_LOG_PAGE_OFFSET`;
//! - [`Kicker`]: `immediate_exit` + a real-time signal that gets a vCPU thread out of `KVM_RUN`;
//! - [`Pod`]: byte views of plain-old-data kvm structs for the state blob.
//!
//! It does not own policy (when to harvest, what to save): that is in the modules above it.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_device_attr, kvm_dirty_gfn, kvm_dirty_log, kvm_run,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr};

/// `KVMIO`, the KVM ioctl type byte.
const KVMIO: u32 = 0xAE;

// _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log): KVM writes nothing back, but the kernel
// header declares it _IOWR; the direction bits are part of the number, so they must match.
vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
// _IOW(KVMIO, 0x42, struct kvm_dirty_log).
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
// _IO(KVMIO, 0xc7): re-protects every harvested dirty-ring entry of every vCPU.
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
// _IOW(KVMIO, 0xe1/0xe2/0xe3, struct kvm_device_attr), issued on a vCPU fd.
ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, KVMIO, 0xe1, kvm_device_attr);
ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, KVMIO, 0xe2, kvm_device_attr);
ioctl_iow_nr!(KVM_HAS_DEVICE_ATTR, KVMIO, 0xe3, kvm_device_attr);

/// The host page size ferry assumes for guest RAM and dirty bitmaps.
pub const PAGE_SIZE: u64 = 4096;

fn check(ret: i32) -> io::Result<i32> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `KVM_CLEAR_DIRTY_LOG`: clears (and write-protects again) the pages of `slot` whose bits are
/// set in `bitmap`, where bit 0 is page `first_page`. `first_page` must be a multiple of 64 and
/// `num_pages` a multiple of 64 or reach the end of the slot; `bitmap` must hold at least
/// `num_pages` bits.
pub fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> io::Result<()> {
    if (bitmap.len() as u64) * 64 < u64::from(num_pages) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut arg = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        ..Default::default()
    };
    arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_ptr().cast_mut().cast();
    // SAFETY: `arg` is a valid kvm_clear_dirty_log whose bitmap pointer covers `num_pages` bits
    // (checked above) and stays alive for the call; KVM only reads the bitmap.
    check(unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) }).map(drop)
}

/// `KVM_GET_DIRTY_LOG` into `bitmap`: one bit per page of `slot`. With manual protection this
/// only copies the log (nothing is cleared or re-protected). `EINVAL` when `bitmap` holds fewer
/// than `pages` bits.
///
/// # Safety
///
/// `pages` must be the page count of memory slot `slot` as registered with KVM: KVM writes
/// `ALIGN(pages, 64) / 8` bytes through the buffer pointer, whatever `bitmap`'s length.
pub unsafe fn get_dirty_log(
    vm: &VmFd,
    slot: u32,
    pages: u64,
    bitmap: &mut [u64],
) -> io::Result<()> {
    if (bitmap.len() as u64) * 64 < pages {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut arg = kvm_dirty_log {
        slot,
        ..Default::default()
    };
    arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
    // SAFETY: `arg` is a valid kvm_dirty_log whose bitmap pointer covers `pages` bits rounded up
    // to 64 (checked above), the slot's size (the caller's contract: KVM writes
    // `ALIGN(pages, 64) / 8` bytes), and is exclusively borrowed for the call.
    check(unsafe { ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &arg) }).map(drop)
}

/// `KVM_RESET_DIRTY_RINGS`: lets KVM re-protect every dirty-ring entry marked harvested.
/// Returns the number of entries reset.
pub fn reset_dirty_rings(vm: &VmFd) -> io::Result<u32> {
    // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and touches only kernel state.
    let n = check(unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) })?;
    Ok(u32::try_from(n).unwrap_or(0))
}

/// `KVM_SET_USER_MEMORY_REGION` for a region that [`Mapping`] keeps mapped.
pub fn set_memory_region(
    vm: &VmFd,
    slot: u32,
    gpa: u64,
    len: u64,
    host_addr: usize,
    flags: u32,
) -> io::Result<()> {
    let region = kvm_userspace_memory_region {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: len,
        userspace_addr: host_addr as u64,
    };
    // SAFETY: the caller passes the address and length of a live `Mapping` owned by the VM
    // object, which outlives the VM fd's use of it (the VM fd is dropped first, see `Vm`'s
    // field order), so KVM never maps freed memory into the guest.
    unsafe { vm.set_user_memory_region(region) }.map_err(io::Error::from)
}

fn vcpu_attr(fd: RawFd, req: u64, group: u32, attr: u64, val: *mut u64) -> io::Result<()> {
    let arg = kvm_device_attr {
        flags: 0,
        group,
        attr,
        addr: val as u64,
    };
    // SAFETY: `fd` is a vCPU fd; `arg.addr` points at a live u64 (or is null for HAS, which
    // does not dereference it); the ioctl reads or writes at most 8 bytes there.
    check(unsafe { libc::ioctl(fd, req, &arg) }).map(drop)
}

/// `KVM_HAS_DEVICE_ATTR` on a vCPU.
pub fn vcpu_has_attr(vcpu: &VcpuFd, group: u32, attr: u64) -> bool {
    vcpu_attr(
        vcpu.as_raw_fd(),
        KVM_HAS_DEVICE_ATTR(),
        group,
        attr,
        std::ptr::null_mut(),
    )
    .is_ok()
}

/// `KVM_GET_DEVICE_ATTR` of a u64 attribute on a vCPU (e.g. `KVM_VCPU_TSC_OFFSET`).
pub fn vcpu_get_attr_u64(vcpu: &VcpuFd, group: u32, attr: u64) -> io::Result<u64> {
    let mut v = 0u64;
    vcpu_attr(
        vcpu.as_raw_fd(),
        KVM_GET_DEVICE_ATTR(),
        group,
        attr,
        &raw mut v,
    )?;
    Ok(v)
}

/// `KVM_SET_DEVICE_ATTR` of a u64 attribute on a vCPU.
pub fn vcpu_set_attr_u64(vcpu: &VcpuFd, group: u32, attr: u64, value: u64) -> io::Result<()> {
    let mut v = value;
    vcpu_attr(
        vcpu.as_raw_fd(),
        KVM_SET_DEVICE_ATTR(),
        group,
        attr,
        &raw mut v,
    )
}

/// `KVM_GET_XSAVE2` into a wrapper sized from `KVM_CAP_XSAVE2`.
pub fn get_xsave2(vcpu: &VcpuFd, fam_len: usize) -> io::Result<kvm_bindings::Xsave> {
    let mut x = kvm_bindings::Xsave::new(fam_len)
        .map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: `x` was allocated with `fam_len` extra u32 words, computed by the caller from
    // KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2), which is the size KVM writes.
    unsafe { vcpu.get_xsave2(&mut x) }.map_err(io::Error::from)?;
    Ok(x)
}

/// The bytes of a u32 slice (native = little-endian on x86).
pub fn u32s_as_bytes(w: &[u32]) -> &[u8] {
    // SAFETY: u32 has no padding and any byte is a valid u8; the slice borrows `w`.
    unsafe { std::slice::from_raw_parts(w.as_ptr().cast::<u8>(), std::mem::size_of_val(w)) }
}

/// Builds an XSAVE wrapper from the 4096-byte region followed by `fam` extension words.
pub fn xsave_from_bytes(b: &[u8], fam: usize) -> io::Result<kvm_bindings::Xsave> {
    if b.len() != 4096 + 4 * fam {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut x =
        kvm_bindings::Xsave::new(fam).map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: we only write the fixed 1024-word region; the FAM length (`len`) stays as
    // `Xsave::new` set it, which is the invariant as_mut_fam_struct asks us to keep.
    let fs = unsafe { x.as_mut_fam_struct() };
    copy_into_u32s(&mut fs.xsave.region, &b[..4096]);
    copy_into_u32s(x.as_mut_slice(), &b[4096..]);
    Ok(x)
}

fn copy_into_u32s(dst: &mut [u32], src: &[u8]) {
    let n = std::mem::size_of_val(dst).min(src.len());
    // SAFETY: copies at most the byte size of `dst` from `src`; any bytes are valid u32s.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr().cast::<u8>(), n) };
}

/// `KVM_SET_XSAVE` from a wrapper that holds the full `KVM_CAP_XSAVE2` size.
pub fn set_xsave2(vcpu: &VcpuFd, x: &kvm_bindings::Xsave) -> io::Result<()> {
    // SAFETY: the caller built `x` with the FAM length KVM reports for this VM (checked against
    // KVM_CAP_XSAVE2 when the blob was decoded), so KVM reads only inside the allocation.
    unsafe { vcpu.set_xsave2(x) }.map_err(io::Error::from)
}

/// A host mapping of guest RAM, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    addr: usize,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes of `fd` at `offset` shared, or private anonymous memory when `fd` is
    /// `None`. Never populates (no `MAP_POPULATE`): a destination's RAM must stay untouched.
    pub fn new(len: usize, fd: Option<RawFd>, offset: u64) -> io::Result<Self> {
        let (flags, fd, off) = match fd {
            Some(fd) => (libc::MAP_SHARED, fd, offset),
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            ),
        };
        let off =
            libc::off_t::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a fresh mapping at a kernel-chosen address; it aliases no Rust object.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            addr: p as usize,
            len,
        })
    }

    /// Asks for transparent huge pages (`MADV_HUGEPAGE`).
    pub fn advise_hugepage(&self) -> io::Result<()> {
        // SAFETY: madvise on our own live mapping; it changes no contents.
        check(unsafe {
            libc::madvise(
                self.addr as *mut libc::c_void,
                self.len,
                libc::MADV_HUGEPAGE,
            )
        })
        .map(drop)
    }

    /// Host address of the first byte.
    pub fn addr(&self) -> usize {
        self.addr
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own the mapping; after this no pointer derived from it is used (the owner
        // drops the VM fd, and with it KVM's reference, before the mapping).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// Allocates `len` bytes of file `fd` from offset 0 (`fallocate`, mode 0): the pages exist,
/// zeroed, in the page cache afterwards; no mapping of the file is touched.
pub fn fallocate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: plain syscall on a borrowed, open descriptor; no memory is passed.
    check(unsafe { libc::fallocate(fd.as_raw_fd(), 0, 0, len) })?;
    Ok(())
}

/// Creates a memfd of `len` bytes (sparse: nothing is allocated until written).
pub fn memfd(name: &str, len: u64) -> io::Result<OwnedFd> {
    let cname =
        std::ffi::CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: plain syscall with a valid NUL-terminated name.
    let fd = check(unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) })?;
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: ftruncate on the fd we own.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), len) })?;
    Ok(fd)
}

/// One vCPU's dirty ring: `entries` `kvm_dirty_gfn`s shared with KVM.
#[derive(Debug)]
pub struct DirtyRing {
    map: Mapping,
    entries: u32,
    /// Next entry to harvest (free-running; index modulo `entries`).
    next: u32,
}

/// `KVM_DIRTY_GFN_F_DIRTY`: KVM published the entry.
const GFN_DIRTY: u32 = 1;
/// `KVM_DIRTY_GFN_F_RESET`: userspace harvested it; KVM may reuse it after a reset.
const GFN_RESET: u32 = 2;

impl DirtyRing {
    /// Maps the ring of `vcpu`, `bytes` long (the size given to `KVM_CAP_DIRTY_LOG_RING`).
    pub fn map(vcpu: &VcpuFd, bytes: u32) -> io::Result<Self> {
        let off = u64::from(kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET) * PAGE_SIZE;
        let map = Mapping::new(bytes as usize, Some(vcpu.as_raw_fd()), off)?;
        // 16-byte entries (asserted by kvm-bindings' layout tests).
        let entries = bytes / 16;
        Ok(Self {
            map,
            entries,
            next: 0,
        })
    }

    /// Collects every published entry as (slot, page offset), marks it harvested, and returns
    /// how many it took. The caller then issues [`reset_dirty_rings`].
    pub fn harvest(&mut self, mut f: impl FnMut(u32, u64)) -> u32 {
        let base = self.map.addr() as *mut kvm_dirty_gfn;
        let mut n = 0;
        loop {
            let idx = (self.next % self.entries) as usize;
            // SAFETY: idx < entries, so the entry lies inside the ring mapping, which is
            // 8-aligned; KVM writes `flags` concurrently, hence the atomic view of that field
            // (u32, 4-aligned at offset 0 of a 16-byte entry).
            let e = unsafe { base.add(idx) };
            // SAFETY: as above; `flags` is the first u32 field of the entry.
            let flags = unsafe { AtomicU32::from_ptr(e.cast::<u32>()) };
            // Acquire pairs with KVM's release store of the flag (ACQ_REL ring protocol): the
            // slot/offset written before it are visible after it.
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                break;
            }
            // SAFETY: the entry is published (DIRTY) so KVM does not write it until we reset.
            let entry = unsafe { e.read() };
            let (slot, offset) = (entry.slot, entry.offset);
            f(slot, offset);
            flags.store(GFN_RESET, Ordering::Release);
            self.next = self.next.wrapping_add(1);
            n += 1;
        }
        n
    }
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int) {}

/// Installs a no-op handler for [`kick_signal`] without `SA_RESTART`, so a blocked `KVM_RUN`
/// returns `EINTR`. Idempotent.
pub fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = noop_handler as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = 0;
        // SAFETY: installs an async-signal-safe no-op handler for a real-time signal that
        // nothing else in the process uses.
        unsafe { libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) };
    });
}

/// Gets one vCPU thread out of `KVM_RUN`: sets `kvm_run.immediate_exit` (covers the window
/// before the thread enters `KVM_RUN`) and signals the thread (covers a thread inside it).
#[derive(Debug)]
pub struct Kicker {
    run: *mut kvm_run,
    thread: libc::pthread_t,
}

// SAFETY: `run` points into the vCPU's kvm_run mapping, which lives as long as the VcpuFd; the
// Kicker is stored next to its VcpuFd (in the same control block, `vm::VcpuCtl`), so it never
// outlives it. The only access is a volatile byte store, which KVM tolerates at any time. The
// signal goes to a thread that is only joined after the last kick (see `KvmVm`'s Drop).
unsafe impl Send for Kicker {}
// SAFETY: see Send; concurrent kicks only write the same byte values.
unsafe impl Sync for Kicker {}

impl Kicker {
    /// A kicker for the vCPU whose kvm_run is `run`, run by the calling thread.
    pub fn for_current_thread(vcpu: &mut VcpuFd) -> Self {
        let run: *mut kvm_run = vcpu.get_kvm_run();
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        Self { run, thread }
    }

    /// Sets `immediate_exit` to `v`.
    pub fn set_immediate_exit(&self, v: u8) {
        // SAFETY: `run` is valid (see the Send impl); a volatile byte store.
        let p = unsafe { &raw mut (*self.run).immediate_exit };
        // SAFETY: `p` points at the immediate_exit byte of the live kvm_run mapping.
        unsafe { p.write_volatile(v) };
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// Sets `immediate_exit` and sends the kick signal.
    pub fn kick(&self) {
        self.set_immediate_exit(1);
        // SAFETY: the thread is alive: it is joined only after kicks stop (see Send impl).
        unsafe { libc::pthread_kill(self.thread, kick_signal()) };
    }
}

/// Plain-old-data kvm structs: every bit pattern is valid and there is no padding that the
/// kernel depends on, so they can be copied to and from bytes.
///
/// # Safety
///
/// Implementors must be `repr(C)` structs of integers, arrays and unions of integers.
pub unsafe trait Pod: Copy + Default {}

macro_rules! pod {
    ($($t:ty),* $(,)?) => { $(
        // SAFETY: a bindgen `repr(C)` struct made only of integers, integer arrays and unions
        // of those; any byte pattern is a valid value.
        unsafe impl Pod for $t {}
    )* };
}
pod!(
    kvm_bindings::kvm_regs,
    kvm_bindings::kvm_sregs,
    kvm_bindings::kvm_fpu,
    kvm_bindings::kvm_xcrs,
    kvm_bindings::kvm_lapic_state,
    kvm_bindings::kvm_vcpu_events,
    kvm_bindings::kvm_mp_state,
    kvm_bindings::kvm_debugregs,
    kvm_bindings::kvm_clock_data,
    kvm_bindings::kvm_irqchip,
    kvm_bindings::kvm_pit_state2,
);

/// The bytes of a POD value.
pub fn pod_bytes<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: T is POD (trait contract); the slice covers exactly the value and borrows it.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// A POD value from exactly `size_of::<T>()` bytes; `None` on a length mismatch.
pub fn pod_from_bytes<T: Pod>(b: &[u8]) -> Option<T> {
    if b.len() != std::mem::size_of::<T>() {
        return None;
    }
    let mut v = T::default();
    // SAFETY: T is POD, so any bytes are a valid T; lengths are equal; no overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(b.as_ptr(), (&raw mut v).cast::<u8>(), b.len());
    }
    Some(v)
}

/// Reads `len` bytes of guest RAM at host address `addr` into `out`.
///
/// # Safety
///
/// `addr .. addr + out.len()` must be inside a live [`Mapping`].
pub unsafe fn read_host(addr: usize, out: &mut [u8]) {
    // SAFETY: guaranteed by the caller; guest memory may change concurrently, which is fine
    // for plain bytes (we never form references into it).
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, out.as_mut_ptr(), out.len()) };
}

/// Reads `out.len()` u64 words of guest RAM at host address `addr` (native endianness).
///
/// # Safety
///
/// `addr .. addr + 8 * out.len()` must be inside a live [`Mapping`].
pub unsafe fn read_host_u64s(addr: usize, out: &mut [u64]) {
    // SAFETY: guaranteed by the caller; any bytes are valid u64s; the destination is `out`.
    unsafe {
        std::ptr::copy_nonoverlapping(
            addr as *const u8,
            out.as_mut_ptr().cast::<u8>(),
            std::mem::size_of_val(out),
        );
    }
}

/// Writes `data` into guest RAM at host address `addr`.
///
/// # Safety
///
/// `addr .. addr + data.len()` must be inside a live [`Mapping`].
pub unsafe fn write_host(addr: usize, data: &[u8]) {
    // SAFETY: guaranteed by the caller.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, data.len()) };
}
