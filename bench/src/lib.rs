// SPDX-License-Identifier: Apache-2.0 OR MIT
//! ferry's benchmarks: what every suite shares, and the report.
//!
//! - [`machine`]: the machine description carried in every result ([`machine::Machine`]).
//! - [`hist`]: HdrHistogram-based latency recording, merging and summaries
//!   ([`hist::LatencyHist`], [`hist::LatencySummary`]).
//! - [`report`]: turns a JSON-lines results file into one self-contained HTML report with
//!   inline SVG charts ([`report::render_html`]).
//!
//! The criterion micro-benchmarks of the hot paths live in `benches/hot_paths.rs`.
//! Not here: the command line (`tools/`), the migration engine and transports themselves.
#![warn(missing_docs)]

pub mod hist;
pub mod machine;
pub mod report;
