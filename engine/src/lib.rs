// SPDX-License-Identifier: Apache-2.0 OR MIT
//! # ferry's migration engine
//!
//! Decides which pages move when, and owns the blackout. It talks to a VM only through the
//! traits in [`vm`] (guest memory, dirty tracking, vCPU/device control), so any VMM can use
//! it; the KVM backend (`ferry-kvm`) is one implementation and [`procmem`] (plain process memory
//! written by real threads) another. It moves bytes through `ferry-transport`'s streams and
//! speaks `ferry-protocol`'s frames; it owns no sockets or rings itself.
//!
//! - [`source::migrate`]: pre-copy rounds over the dirty log, the switchover, post-copy service
//!   (urgent replies, background push by fault neighbourhood), the source digest.
//! - [`dest::receive`]: receive into guest memory, apply the switchover, restore and resume,
//!   post-copy fault resolution with [`uffd`], the destination digest.
//! - `rdma` (cargo feature `rdma`): RDMA sessions, pre-copy pushed by RDMA WRITE.
//! - [`session`]: connecting and accepting a whole migration session (handshake, streams),
//!   and resuming it after a lost connection in post-copy ([`source::migrate_with`],
//!   [`dest::receive_with`]).
#![warn(missing_docs)]
// Guest-physical sizes and offsets are u64 and index host memory: the engine only supports
// 64-bit hosts (as vm-memory does), where u64 -> usize is lossless, and durations in µs fit u64
// for 584,000 years. Those two cast classes are allowed crate-wide; the others stay linted.
#![allow(clippy::cast_possible_truncation)]

#[cfg(not(target_pointer_width = "64"))]
compile_error!("ferry-engine supports 64-bit hosts only");

pub mod boost;
pub mod dest;
pub mod digest;
pub mod error;
pub mod layout;
pub mod memory;
pub mod pages;
pub mod policy;
pub mod predict;
pub mod procmem;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod report;
mod sender;
pub mod session;
pub mod source;
mod sys;
pub mod timeline;
pub mod uffd;
pub mod vm;
pub mod warm;

pub use error::MigrateError;
pub use policy::Policy;
pub use report::MigrationReport;
