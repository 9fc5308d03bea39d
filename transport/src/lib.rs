// SPDX-License-Identifier: Apache-2.0 OR MIT
//! ferry's transport: moves bytes between registered guest memory and sockets (plain TCP or
//! Unix-domain, or io_uring with fixed buffers and `SEND_ZC`; RDMA behind the `rdma` feature).
//!
//! What it owns:
//! - [`memory`]: guest-memory registration, fixed-buffer slicing, gpa→host translation and the
//!   buffer-lifetime rules (a range the kernel may still read cannot be unregistered).
//! - [`socket`]: listeners and connected sockets.
//! - [`stream`]: the [`DataStream`] API for one connection (send frames by reference, receive
//!   into guest memory, flush, shutdown) and its backends ([`plain`], [`uring`]).
//! - [`bulk`]: N parallel streams fed by a bounded channel, with per-stream counters.
//! - [`urgent`]: a dedicated, prioritised stream thread for post-copy page requests.
//!
//! What it does not own: frame formats, sessions and handshakes (`ferry-protocol` and the
//! session layer), migration policy (which pages to send when: `ferry-engine`), and guest memory
//! itself (the VMM maps and frees it).
#![warn(missing_docs)]

pub mod bulk;
pub mod error;
pub mod memory;
pub mod plain;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod session;
pub mod socket;
pub(crate) mod splice;
pub mod stream;
mod sys;
pub mod urgent;
pub mod uring;

pub use bulk::{Batch, BulkPusher, BulkReport};
pub use error::{
    At, BulkError, ConnectError, Op, RangeError, RegisterError, StreamError, UnregisterError,
};
pub use memory::{FileRef, GpaRange, GuestRegion, MemoryRegistration, RegistrationConfig, Target};
pub use socket::{Endpoint, Listener, Socket};
pub use stream::{Backend, DataStream, StreamConfig, StreamStats, ZeroCopy, open_stream};
pub use urgent::UrgentServer;
