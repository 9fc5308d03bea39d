// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Where RDMA connections come from: [`RdmaProvider`] is the seam between the code that sets up
//! an RDMA session (listen, connect, register guest memory, expose it, take the streams) and the
//! fabric underneath. [`Verbs`] is the real one (rdmacm and a verbs device); the in-process
//! simulator (`SimProvider`, cargo feature `rdma-sim`) lets tests run the same setup and data
//! path on machines without an RDMA device.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use super::conn::{ConnectError, ConnectOptions, RdmaConnection, RdmaListener, connect};
use super::memory::{BouncePool, RegisterError, RegisterOptions, RegisteredMemory, Role};
use super::region::{GuestRegion, RemoteRegion};
use super::stream::RdmaStream;

/// A source of RDMA connections.
pub trait RdmaProvider: fmt::Debug + Send + Sync {
    /// A short name for reports (`"verbs"`, `"simulated"`).
    fn name(&self) -> &'static str;

    /// Listens at `addr` for one peer's streams.
    fn listen(&self, addr: SocketAddr) -> Result<Box<dyn RdmaAcceptor>, ConnectError>;

    /// Connects `opts.streams` bulk streams (plus the urgent one if asked) to a listener at
    /// `peer`.
    fn connect(
        &self,
        peer: SocketAddr,
        opts: &ConnectOptions,
    ) -> Result<Box<dyn RdmaLink>, ConnectError>;
}

/// A listener of an [`RdmaProvider`].
pub trait RdmaAcceptor: fmt::Debug + Send {
    /// Accepts one peer's streams, each wait bounded by `opts.timeout`.
    fn accept(&self, opts: &ConnectOptions) -> Result<Box<dyn RdmaLink>, ConnectError>;
}

/// One side of an established connection: its protection domain and its streams.
pub trait RdmaLink: fmt::Debug + Send {
    /// Registers guest memory on this connection's protection domain.
    ///
    /// # Safety
    ///
    /// As [`super::RdmaPd::register_guest_memory`]: every region stays mapped until the
    /// registration and all its clones are dropped, and for [`Role::Destination`] the caller
    /// holds no Rust references into memory the peer may write.
    unsafe fn register_guest_memory(
        &self,
        regions: &[GuestRegion],
        role: Role,
        opts: RegisterOptions,
    ) -> Result<Arc<RegisteredMemory>, RegisterError>;

    /// Keeps `mem` registered while any stream of this connection exists and returns its
    /// descriptor for the peer.
    fn expose(&self, mem: &Arc<RegisteredMemory>) -> Result<Vec<RemoteRegion>, ConnectError>;

    /// Moves the streams out (bulk, then the urgent one).
    fn take_streams(&mut self) -> (Vec<RdmaStream>, Option<RdmaStream>);

    /// A pool of `slots` registered staging buffers of `slot_size` bytes on this connection's
    /// protection domain, for READs placed with `UFFDIO_COPY`.
    fn bounce_pool(&self, slots: usize, slot_size: usize) -> Result<BouncePool, RegisterError>;
}

/// RDMA through rdmacm and the host's verbs devices.
#[derive(Debug, Clone, Copy, Default)]
pub struct Verbs;

impl RdmaProvider for Verbs {
    fn name(&self) -> &'static str {
        "verbs"
    }

    fn listen(&self, addr: SocketAddr) -> Result<Box<dyn RdmaAcceptor>, ConnectError> {
        Ok(Box::new(RdmaListener::bind(addr)?))
    }

    fn connect(
        &self,
        peer: SocketAddr,
        opts: &ConnectOptions,
    ) -> Result<Box<dyn RdmaLink>, ConnectError> {
        Ok(Box::new(connect(peer, opts)?))
    }
}

impl RdmaAcceptor for RdmaListener {
    fn accept(&self, opts: &ConnectOptions) -> Result<Box<dyn RdmaLink>, ConnectError> {
        Ok(Box::new(RdmaListener::accept(self, opts)?))
    }
}

impl RdmaLink for RdmaConnection {
    unsafe fn register_guest_memory(
        &self,
        regions: &[GuestRegion],
        role: Role,
        opts: RegisterOptions,
    ) -> Result<Arc<RegisteredMemory>, RegisterError> {
        // SAFETY: forwarded from this method's contract.
        unsafe { self.pd().register_guest_memory(regions, role, opts) }
    }

    fn expose(&self, mem: &Arc<RegisteredMemory>) -> Result<Vec<RemoteRegion>, ConnectError> {
        RdmaConnection::expose(self, mem)
    }

    fn take_streams(&mut self) -> (Vec<RdmaStream>, Option<RdmaStream>) {
        RdmaConnection::take_streams(self)
    }

    fn bounce_pool(&self, slots: usize, slot_size: usize) -> Result<BouncePool, RegisterError> {
        self.pd().bounce_pool(slots, slot_size)
    }
}
