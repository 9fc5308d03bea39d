// SPDX-License-Identifier: Apache-2.0 OR MIT
//! ferry's transports (work in progress; see README's status table).
#![warn(missing_docs)]

#[cfg(feature = "rdma")]
pub mod rdma;
