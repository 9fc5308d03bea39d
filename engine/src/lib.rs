// SPDX-License-Identifier: Apache-2.0 OR MIT
//! ferry's migration engine (work in progress; see README's status table).
#![warn(missing_docs)]

pub mod vm;
