// SPDX-License-Identifier: Apache-2.0 OR MIT
//! ferry's KVM backend (work in progress).
