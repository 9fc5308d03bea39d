// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Memory registration: guest memory as memory-region chunks with access flags by role, and the
//! registered bounce-buffer pool that post-copy READs land in.
//!
//! Owns: [`RdmaPd`] (a protection domain and its device limits), [`Role`] and its access flags,
//! [`RegisteredMemory`] (one memory region per chunk of at most `max_mr_size`, with the
//! [`ChunkTable`] that translates guest-physical ranges and exports the rkeys), and
//! [`BouncePool`] / [`BounceSlot`] / [`FilledSlot`].
//!
//! Lifetime rule: a registration is shared as `Arc<RegisteredMemory>`. Every posted work request
//! that reads from it holds a clone until its completion is polled (see `stream`), and a
//! connection keeps a clone of every registration it exposed to the peer until its queue pairs
//! are destroyed, so a memory region is never deregistered while the device may still touch it.
//! [`RegisteredMemory::try_deregister`] reports [`DeregisterError::Busy`] instead of waiting.
//!
//! # Post-copy on the destination
//!
//! A plain registration pins and populates memory. On a destination that may switch to
//! post-copy the guest RAM is later managed by userfaultfd, which must see every page not
//! received as missing, and the engine drops pages (stale ones) that a pin would keep writing
//! behind the process's back. So:
//! - the pre-copy push (RDMA WRITE) targets destination guest RAM registered with
//!   [`Role::Destination`] and **on-demand paging** ([`RegisterOptions::on_demand`],
//!   `IBV_ACCESS_ON_DEMAND`, ConnectX-4 and later): nothing is pinned, the NIC resolves pages
//!   through the page tables when it writes; a pure pre-copy destination pins instead, which
//!   every NIC supports;
//! - post-copy faults are **staged**: RDMA READ into a small registered bounce buffer
//!   ([`BouncePool`], `RdmaStream::read_to_bounce` / `post_read`), then placed with
//!   `UFFDIO_COPY` (or written through an alias and mapped with `UFFDIO_CONTINUE`).

use std::sync::{Arc, Mutex, PoisonError};

use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::device_context::DeviceContext;
use sideway::ibverbs::memory_region::{MemoryRegion, RegisterMemoryRegionError};
use sideway::ibverbs::protection_domain::ProtectionDomain;
use thiserror::Error;

use super::device::DeviceLimits;
use super::region::{
    ChunkTable, GuestRegion, LayoutError, LocalChunk, LocalSegment, RemoteRegion, TranslateError,
    plan_chunks,
};
use super::sys;

/// Which side of the migration registers the memory; decides the access flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Sends pages: the device reads guest memory locally (WRITE source) and serves the peer's
    /// one-sided READs (post-copy demand fetch). Registered LOCAL_READ (implicit) + REMOTE_READ,
    /// never writable, so a read-only mapping of guest RAM can be registered too.
    Source,
    /// Receives pages: the peer WRITEs into guest memory. Registered LOCAL_WRITE + REMOTE_WRITE
    /// (verbs requires LOCAL_WRITE with REMOTE_WRITE).
    Destination,
}

impl Role {
    /// Memory-region access flags for guest memory of this role. The source's memory is only
    /// read, but registered writable too: a read-only registration may pin an untouched
    /// anonymous page as the shared zero page (or a copy-on-write page), which the guest's next
    /// write replaces behind the device's back; a writable pin breaks the sharing first.
    pub fn mr_access(self) -> AccessFlags {
        match self {
            Role::Source => AccessFlags::LocalWrite | AccessFlags::RemoteRead,
            Role::Destination => AccessFlags::LocalWrite | AccessFlags::RemoteWrite,
        }
    }

    /// Queue-pair access flags (which remote operations the peer may perform on our side).
    pub fn qp_access(self) -> AccessFlags {
        match self {
            Role::Source => AccessFlags::RemoteRead,
            Role::Destination => AccessFlags::RemoteWrite,
        }
    }
}

/// How guest memory is registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisterOptions {
    /// Cap on a chunk's size, below the device's `max_mr_size` (`None`: the device limit).
    pub max_chunk: Option<u64>,
    /// Guest page size every region must be aligned to.
    pub page_size: u64,
    /// On-demand paging (`IBV_ACCESS_ON_DEMAND`): nothing is pinned or populated; the device
    /// resolves pages through the process's page tables when it touches them, and follows
    /// them when they change (`MADV_DONTNEED`, userfaultfd placement). Needs a device with ODP
    /// (ConnectX-4 and later); registration fails otherwise.
    pub on_demand: bool,
}

impl Default for RegisterOptions {
    fn default() -> Self {
        Self {
            max_chunk: None,
            page_size: 4096,
            on_demand: false,
        }
    }
}

/// Guest memory could not be registered.
#[derive(Debug, Error)]
pub enum RegisterError {
    /// The regions are malformed.
    #[error("Invalid guest memory layout")]
    Layout(#[from] LayoutError),
    /// The device refused one chunk (often ENOMEM: RLIMIT_MEMLOCK without CAP_IPC_LOCK).
    #[error("Cannot register chunk {gpa:#x}+{len:#x}")]
    Register {
        /// Chunk address.
        gpa: u64,
        /// Chunk length.
        len: u64,
        /// The verbs error.
        #[source]
        source: RegisterMemoryRegionError,
    },
    /// The bounce pool's size is zero or overflows.
    #[error("Invalid bounce pool of {slots} slots of {slot_size} bytes")]
    PoolSize {
        /// Slots asked for.
        slots: usize,
        /// Slot size asked for.
        slot_size: usize,
    },
    /// Mapping the bounce pool failed.
    #[error("Cannot map a {len}-byte bounce pool")]
    Map {
        /// Bytes.
        len: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A protection domain with the limits of its device. Memory registered here can be used only
/// by queue pairs of the same protection domain.
#[derive(Debug, Clone)]
pub struct RdmaPd {
    pd: Arc<ProtectionDomain>,
    _ctx: Arc<DeviceContext>,
    device: String,
    limits: DeviceLimits,
}

impl RdmaPd {
    pub(crate) fn new(
        pd: Arc<ProtectionDomain>,
        ctx: Arc<DeviceContext>,
        device: String,
        limits: DeviceLimits,
    ) -> Self {
        Self {
            pd,
            _ctx: ctx,
            device,
            limits,
        }
    }

    pub(crate) fn raw(&self) -> &Arc<ProtectionDomain> {
        &self.pd
    }

    /// Identity of the protection domain, to check that memory and queue pairs match.
    pub(crate) fn key(&self) -> usize {
        Arc::as_ptr(&self.pd).addr()
    }

    /// Name of the device.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Limits of the device.
    pub fn limits(&self) -> DeviceLimits {
        self.limits
    }

    /// Registers guest memory for `role`, one memory region per chunk of at most the device's
    /// `max_mr_size` (or `opts.max_chunk`).
    ///
    /// # Safety
    ///
    /// Every region's `host_addr .. host_addr + len` must be mapped in this process and stay
    /// mapped until the returned registration and all its clones are dropped. For
    /// [`Role::Destination`], the memory changes under the caller whenever the peer writes: hold
    /// no Rust references into it while the registration is exposed.
    pub unsafe fn register_guest_memory(
        &self,
        regions: &[GuestRegion],
        role: Role,
        opts: RegisterOptions,
    ) -> Result<Arc<RegisteredMemory>, RegisterError> {
        let max_chunk = opts
            .max_chunk
            .map_or(self.limits.max_mr_size, |c| c.min(self.limits.max_mr_size));
        let plan = plan_chunks(regions, max_chunk, opts.page_size)?;
        let mut mrs = Vec::with_capacity(plan.len());
        let mut chunks = Vec::with_capacity(plan.len());
        for c in plan {
            let access = if opts.on_demand {
                role.mr_access() | AccessFlags::OnDemand
            } else {
                role.mr_access()
            };
            let mr =
                // SAFETY: each chunk lies inside a region the caller guarantees stays mapped for
                // the registration's life; the memory region is dropped with the registration.
                unsafe { sys::reg_mr(&self.pd, c.host_addr, c.len, access) }.map_err(|source| {
                    RegisterError::Register {
                        gpa: c.gpa,
                        len: c.len,
                        source,
                    }
                })?;
            chunks.push(LocalChunk {
                gpa: c.gpa,
                host_addr: c.host_addr,
                len: c.len,
                lkey: mr.lkey(),
                rkey: mr.rkey(),
            });
            mrs.push(mr);
        }
        let table = ChunkTable::new(chunks)?;
        Ok(Arc::new(RegisteredMemory {
            mrs,
            table,
            role,
            device: self.device.clone(),
            pd_key: self.key(),
            #[cfg(any(test, feature = "rdma-sim"))]
            _sim: None,
        }))
    }

    /// A pool of `slots` registered, page-aligned staging buffers of `slot_size` bytes each
    /// (LOCAL_WRITE), for RDMA READs whose data is then placed with `UFFDIO_COPY`.
    pub fn bounce_pool(&self, slots: usize, slot_size: usize) -> Result<BouncePool, RegisterError> {
        let mapping = pool_mapping(slots, slot_size)?;
        let len64 = mapping.len() as u64;
        // SAFETY: the mapping is owned by the pool together with the region, and the pool drops
        // the region first (field order), so the memory outlives its registration.
        let mr = unsafe { sys::reg_mr(&self.pd, mapping.addr(), len64, AccessFlags::LocalWrite) }
            .map_err(|source| RegisterError::Register {
            gpa: 0,
            len: len64,
            source,
        })?;
        Ok(BouncePool {
            inner: Arc::new(PoolInner {
                lkey: mr.lkey(),
                _mr: Some(mr),
                #[cfg(any(test, feature = "rdma-sim"))]
                _sim: None,
                mapping,
                slot_size,
                slots,
                pd_key: self.key(),
                free: Mutex::new((0..slots).rev().collect()),
            }),
        })
    }
}

/// The memory of a pool of `slots` buffers of `slot_size` bytes.
fn pool_mapping(slots: usize, slot_size: usize) -> Result<sys::AnonMapping, RegisterError> {
    let len = slots
        .checked_mul(slot_size)
        .filter(|&l| l > 0)
        .ok_or(RegisterError::PoolSize { slots, slot_size })?;
    sys::AnonMapping::new(len).map_err(|source| RegisterError::Map { len, source })
}

/// Guest memory registered as memory-region chunks.
#[derive(Debug)]
pub struct RegisteredMemory {
    mrs: Vec<Arc<MemoryRegion>>,
    table: ChunkTable,
    role: Role,
    device: String,
    pd_key: usize,
    /// A simulated registration's keys, revoked when it is dropped.
    #[cfg(any(test, feature = "rdma-sim"))]
    _sim: Option<super::sim::SimKeys>,
}

/// A registration could not be released.
#[derive(Debug, Error)]
pub enum DeregisterError {
    /// Work requests or connections still reference it.
    #[error("Registration on {device} busy: {outstanding} other references")]
    Busy {
        /// Device name.
        device: String,
        /// Other references (outstanding work requests, connections that exposed it).
        outstanding: usize,
        /// The registration, handed back.
        registration: Arc<RegisteredMemory>,
    },
}

impl RegisteredMemory {
    /// The chunk table (guest-physical → host address and keys).
    pub fn table(&self) -> &ChunkTable {
        &self.table
    }

    /// The role it was registered for.
    pub fn role(&self) -> Role {
        self.role
    }

    pub(crate) fn pd_key(&self) -> usize {
        self.pd_key
    }

    /// Number of memory regions.
    pub fn region_count(&self) -> usize {
        self.mrs.len()
    }

    /// The descriptor for the handshake: `(gpa, addr, len, rkey)` per chunk.
    pub fn export(&self) -> Vec<RemoteRegion> {
        self.table.export()
    }

    /// Translates a guest-physical range into per-chunk pieces.
    pub fn translate(&self, gpa: u64, len: u64) -> Result<Vec<LocalSegment>, TranslateError> {
        self.table.translate(gpa, len)
    }

    /// A registration without memory regions, over a chunk table whose keys the unit tests'
    /// simulated device knows (registered by hand, never revoked).
    #[cfg(test)]
    pub(crate) fn for_test(table: ChunkTable, role: Role, pd_key: usize) -> Arc<Self> {
        Self::simulated(table, role, pd_key, None)
    }

    /// A registration on the simulated fabric; `keys`, if any, are revoked with it.
    #[cfg(any(test, feature = "rdma-sim"))]
    pub(crate) fn simulated(
        table: ChunkTable,
        role: Role,
        pd_key: usize,
        keys: Option<super::sim::SimKeys>,
    ) -> Arc<Self> {
        Arc::new(Self {
            mrs: Vec::new(),
            table,
            role,
            device: "simulated".to_owned(),
            pd_key,
            _sim: keys,
        })
    }

    /// Deregisters now if nothing else holds the registration; otherwise hands it back.
    pub fn try_deregister(this: Arc<Self>) -> Result<(), DeregisterError> {
        match Arc::try_unwrap(this) {
            Ok(mem) => {
                drop(mem);
                Ok(())
            }
            Err(registration) => Err(DeregisterError::Busy {
                device: registration.device.clone(),
                outstanding: Arc::strong_count(&registration) - 1,
                registration,
            }),
        }
    }
}

#[derive(Debug)]
struct PoolInner {
    // Declared before `mapping`: the region is deregistered before the memory is unmapped.
    // `None` only for the simulated device.
    _mr: Option<Arc<MemoryRegion>>,
    /// A simulated pool's key, revoked before the memory is unmapped.
    #[cfg(any(test, feature = "rdma-sim"))]
    _sim: Option<super::sim::SimKeys>,
    lkey: u32,
    mapping: sys::AnonMapping,
    slot_size: usize,
    slots: usize,
    pd_key: usize,
    free: Mutex<Vec<usize>>,
}

/// Registered staging buffers for post-copy READs. Cloning shares the pool.
#[derive(Debug, Clone)]
pub struct BouncePool {
    inner: Arc<PoolInner>,
}

impl BouncePool {
    /// Takes a free slot, or `None` when all are in use.
    pub fn try_acquire(&self) -> Option<BounceSlot> {
        let index = self
            .inner
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()?;
        Some(BounceSlot {
            pool: Arc::clone(&self.inner),
            index,
        })
    }

    /// Bytes per slot.
    pub fn slot_size(&self) -> usize {
        self.inner.slot_size
    }

    /// Slots in the pool.
    pub fn slots(&self) -> usize {
        self.inner.slots
    }

    /// Slots currently free.
    pub fn available(&self) -> usize {
        self.inner
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
impl BouncePool {
    /// A pool over plain memory for the simulated device: the caller registers
    /// [`BouncePool::test_span`] with the simulator under `lkey`.
    pub(crate) fn for_test(slots: usize, slot_size: usize, lkey: u32, pd_key: usize) -> Self {
        let mapping = sys::AnonMapping::new(slots * slot_size).expect("test mapping");
        Self {
            inner: Arc::new(PoolInner {
                _mr: None,
                _sim: None,
                lkey,
                mapping,
                slot_size,
                slots,
                pd_key,
                free: Mutex::new((0..slots).rev().collect()),
            }),
        }
    }

    /// Address and length of the whole pool.
    pub(crate) fn test_span(&self) -> (u64, u64) {
        (self.inner.mapping.addr(), self.inner.mapping.len() as u64)
    }
}

#[cfg(any(test, feature = "rdma-sim"))]
impl BouncePool {
    /// A pool on the simulated fabric: `register` gets the pool's span and returns its key's
    /// guard.
    pub(crate) fn simulated(
        slots: usize,
        slot_size: usize,
        pd_key: usize,
        register: impl FnOnce(u64, u64) -> (u32, super::sim::SimKeys),
    ) -> Result<Self, RegisterError> {
        let mapping = pool_mapping(slots, slot_size)?;
        let (lkey, keys) = register(mapping.addr(), mapping.len() as u64);
        Ok(Self {
            inner: Arc::new(PoolInner {
                _mr: None,
                _sim: Some(keys),
                lkey,
                mapping,
                slot_size,
                slots,
                pd_key,
                free: Mutex::new((0..slots).rev().collect()),
            }),
        })
    }
}

/// One staging buffer, owned exclusively; returns to its pool when dropped.
#[derive(Debug)]
pub struct BounceSlot {
    pool: Arc<PoolInner>,
    index: usize,
}

impl BounceSlot {
    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.pool.slot_size
    }

    /// Host address of the buffer.
    pub(crate) fn addr(&self) -> u64 {
        self.pool.mapping.addr() + (self.index * self.pool.slot_size) as u64
    }

    /// Local key of the pool's registration.
    pub(crate) fn lkey(&self) -> u32 {
        self.pool.lkey
    }

    pub(crate) fn pd_key(&self) -> usize {
        self.pool.pd_key
    }
}

impl Drop for BounceSlot {
    fn drop(&mut self) {
        self.pool
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(self.index);
    }
}

/// A staging buffer whose READ has completed: holds the page bytes for `UFFDIO_COPY`.
#[derive(Debug)]
pub struct FilledSlot {
    slot: BounceSlot,
    gpa: u64,
    len: usize,
}

impl FilledSlot {
    /// Only the stream makes these, after the READ's completion was polled.
    pub(crate) fn new(slot: BounceSlot, gpa: u64, len: usize) -> Self {
        Self { slot, gpa, len }
    }

    /// Guest-physical address the bytes belong at.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Number of bytes read.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no bytes were read (never the case for a completed READ).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Host address of the bytes (the `src` of `UFFDIO_COPY`).
    pub fn addr(&self) -> u64 {
        self.slot.addr()
    }

    /// The bytes read from the peer.
    pub fn bytes(&self) -> &[u8] {
        let offset = self.slot.index * self.slot.pool.slot_size;
        // SAFETY: the slot is owned by this value alone (not in the free list, not in any send
        // window) and its READ completed before this value was made, so no device write to the
        // range can happen while the slice lives. `len <= slot_size` by construction.
        unsafe { self.slot.pool.mapping.bytes(offset, self.len) }.unwrap_or(&[])
    }

    /// Gives the buffer back for another READ.
    pub fn into_slot(self) -> BounceSlot {
        self.slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_access_flags() {
        let src = Role::Source.mr_access();
        assert!(src.contains(AccessFlags::RemoteRead));
        assert!(
            src.contains(AccessFlags::LocalWrite),
            "pinned writable, see mr_access"
        );
        assert!(!src.contains(AccessFlags::RemoteWrite));
        let dst = Role::Destination.mr_access();
        assert!(dst.contains(AccessFlags::LocalWrite));
        assert!(dst.contains(AccessFlags::RemoteWrite));
        assert!(!dst.contains(AccessFlags::RemoteRead));
        assert_eq!(Role::Source.qp_access(), AccessFlags::RemoteRead);
        assert_eq!(Role::Destination.qp_access(), AccessFlags::RemoteWrite);
    }
}
