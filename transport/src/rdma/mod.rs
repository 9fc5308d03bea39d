// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The RDMA backend (cargo feature `rdma`): guest memory moved by the NIC with RDMA WRITE
//! (pre-copy push) and one-sided RDMA READ (post-copy demand fetch), over rdmacm-connected RC
//! queue pairs, through the [`sideway`] verbs bindings.
//!
//! Module map:
//! - [`device`]: discovery, limits, [`DeviceError::NoDevice`].
//! - [`region`]: device-free address arithmetic: chunking by `max_mr_size`, gpa → (chunk, addr,
//!   key) translation, the exported [`RemoteRegion`] descriptor and its validated import
//!   ([`RemoteMap`]), splitting transfers into work requests.
//! - [`memory`]: registration by [`Role`] ([`RegisteredMemory`], pinned or on demand) and the
//!   staging [`BouncePool`] for post-copy READs (see its docs for how the destination's guest
//!   RAM is registered when userfaultfd will manage it).
//! - [`window`]: device-free send-queue bookkeeping (batching, selective signalling, guard
//!   release) and completion-status mapping.
//! - [`conn`]: rdmacm listener / connector, N bulk streams plus one urgent stream.
//! - [`provider`]: [`RdmaProvider`], the seam between session setup and the fabric: [`Verbs`]
//!   (rdmacm and a device), or the in-process simulator (`sim`, cargo feature `rdma-sim`, for
//!   tests on machines without a device).
//! - [`stream`]: the data path of one queue pair.
//! - [`framed`]: [`RdmaDataStream`], the transport's `DataStream` API over one queue pair plus a
//!   TCP connection for frame headers (what the engine's pre-copy push runs on).
//! - `sys`: the unsafe calls (memory registration over raw addresses, posting scatter-gather
//!   entries, the bounce mapping, waiting on the rdmacm fd).
//!
//! Typical use (the engine's RDMA sessions, `ferry_engine::rdma`, do this), source side:
//! `provider.connect` → `link.register_guest_memory(.., Role::Source, ..)` → `link.expose(&mem)`
//! → send the descriptor (`RemoteRegion` converts to and from ferry-protocol's `RdmaRegion`),
//! import the destination's with [`RemoteMap::from_handshake`] (or [`RemoteMap::import`]) → an
//! [`RdmaDataStream`] per bulk stream (or `stream.write_batch(..)` directly).
//! Destination side: `provider.listen(..).accept(..)` → register with `Role::Destination` →
//! expose → [`RdmaDataStream`]s (or `stream.wait_arrival(..)`); on a post-copy fault,
//! `urgent.read_to_bounce(..)` then `UFFDIO_COPY` from the filled slot.
//!
//! Not here: the wire encoding of descriptors (ferry-protocol), authentication, and the choice of
//! which pages go in which batch (ferry-engine).
//!
//! Status: compiled and clippy-checked in CI; everything device-free is unit-tested, and the data
//! path and everything above it run against the in-process simulator (`sim`); the device tests
//! (`tests/rdma.rs`, and the engine's) skip with a printed reason when `ibv_get_device_list` is
//! empty, which is the case on the development machines (no RDMA NIC, no SoftRoCE). Nothing
//! here has run on a NIC.

pub mod conn;
pub mod device;
#[cfg(test)]
mod fake;
pub mod framed;
pub mod memory;
pub mod provider;
pub mod region;
#[cfg(any(test, feature = "rdma-sim"))]
pub mod sim;
pub mod stream;
mod sys;
pub mod window;

pub use conn::{
    ConnEvent, ConnectError, ConnectOptions, QueueSizing, RdmaConnection, RdmaListener, connect,
};
pub use device::{DeviceError, DeviceLimits, DeviceSummary, RdmaDevice, list_devices};
pub use framed::{FramedError, PushTarget, RdmaDataStream};
pub use memory::{
    BouncePool, BounceSlot, DeregisterError, FilledSlot, RdmaPd, RegisterError, RegisterOptions,
    RegisteredMemory, Role,
};
pub use provider::{RdmaAcceptor, RdmaLink, RdmaProvider, Verbs};
pub use region::{
    ChunkTable, GuestRange, GuestRegion, ImportError, ImportLimits, LayoutError, RemoteMap,
    RemoteRegion, TranslateError,
};
#[cfg(any(test, feature = "rdma-sim"))]
pub use sim::SimProvider;
pub use stream::{
    Arrival, BatchStats, CompletionError, CompletionOp, RdmaStream, ReadDone, ReadTicket,
    StreamError, StreamKind, StreamStats,
};
pub use window::{WcStatus, WrOp};

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>() {}
    fn assert_send_sync<T: Send + Sync>() {}

    /// Streams move to their own threads; registrations and pools are shared between them.
    #[test]
    fn thread_bounds() {
        assert_send::<RdmaStream>();
        assert_send::<RdmaConnection>();
        assert_send::<FilledSlot>();
        assert_send::<BounceSlot>();
        assert_send_sync::<RegisteredMemory>();
        assert_send_sync::<BouncePool>();
        assert_send_sync::<RdmaPd>();
        assert_send_sync::<RemoteMap>();
    }
}
