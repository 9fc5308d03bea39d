// SPDX-License-Identifier: Apache-2.0 OR MIT
//! ferry's benchmarks: what every suite shares, and the report.
//!
//! - [`machine`]: the machine description carried in every result ([`machine::Machine`]).
//! - [`hist`]: HdrHistogram-based latency recording, merging and summaries
//!   ([`hist::LatencyHist`], [`hist::LatencySummary`]).
//! - [`report`]: turns a JSON-lines results file into one self-contained HTML report with
//!   inline SVG charts ([`report::render_html`]).
//!
//! - [`transport_bench`]: `ferry bench transport`, a transport between two processes beside
//!   its same-run plain-TCP floor.
//! - [`migrate_bench`]: `ferry bench migrate`, a process VM with live writers migrated to a
//!   second process, beside its same-run fault floor.
//! - [`cli`]: the `ferry bench` arguments, the matrix runner, output, and the peer process.
//!
//! The criterion micro-benchmarks of the hot paths live in `benches/hot_paths.rs`.
//! Not here: the command line (`tools/`), the migration engine and transports themselves.
#![warn(missing_docs)]

pub mod cli;
pub mod hist;
pub mod machine;
pub mod migrate_bench;
pub mod report;
pub mod transport_bench;
