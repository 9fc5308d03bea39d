// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The engine's errors.

use std::time::Duration;

use ferry_protocol::frame::FrameRangeError;
use ferry_protocol::{DecodeError, RangeError};
use ferry_transport::session::SessionError;
use ferry_transport::{ConnectError, StreamError};

use crate::layout::LayoutError;
use crate::vm::BoxError;

/// Why a migration failed. On the source, every error before the VM state was handed to the
/// connection leaves the VM running on the source; after that, only an error the destination
/// sent (`PeerAborted`: it does not run the VM) does, and otherwise the source returns
/// [`MigrateError::SwitchoverUnconfirmed`] with its VM paused.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Guest memory could not be described or registered.
    #[error("Guest memory layout")]
    Layout(#[from] LayoutError),
    /// Setting up or using the session failed.
    #[error("Session")]
    Session(#[from] SessionError),
    /// Opening a data stream failed.
    #[error("Opening stream {stream}")]
    Open {
        /// The stream.
        stream: usize,
        /// Why.
        #[source]
        source: ConnectError,
    },
    /// A data stream failed.
    #[error("Stream {stream}")]
    Stream {
        /// The stream.
        stream: usize,
        /// Why.
        #[source]
        source: StreamError,
    },
    /// A frame from the peer was malformed.
    #[error("Bad frame from the peer on stream {stream}")]
    Decode {
        /// The stream (`usize::MAX` for the control stream).
        stream: usize,
        /// Why.
        #[source]
        source: DecodeError,
    },
    /// A frame named memory outside the negotiated map.
    #[error("Frame on stream {stream} refused")]
    Range {
        /// The stream.
        stream: usize,
        /// Why.
        #[source]
        source: FrameRangeError,
    },
    /// A range outside guest memory.
    #[error("Range refused")]
    BadRange(#[from] RangeError),
    /// The VMM failed an operation.
    #[error("VM operation '{op}' failed")]
    Vm {
        /// The operation.
        op: &'static str,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// A frame arrived that the current state does not allow.
    #[error("Unexpected {got} while {state}")]
    Unexpected {
        /// The frame's command.
        got: &'static str,
        /// What the receiver was doing.
        state: &'static str,
    },
    /// The peer abandoned the migration.
    #[error("Peer aborted: {reason}")]
    PeerAborted {
        /// Its reason.
        reason: String,
    },
    /// Pre-copy does not converge and the policy says give up.
    #[error(
        "Pre-copy does not converge after {rounds} rounds: {dirty_pages} pages dirty, predicted blackout {predicted_us:.0} µs > budget {budget_us} µs"
    )]
    NotConverging {
        /// Rounds run.
        rounds: u32,
        /// Pages dirty at the last harvest.
        dirty_pages: u64,
        /// Predicted blackout.
        predicted_us: f64,
        /// The budget.
        budget_us: u64,
    },
    /// The peer did not answer in time.
    #[error("Timed out after {waited:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        waited: Duration,
    },
    /// A page failed its checksum while the VM was paused.
    #[error("Page {gpa:#x} failed its checksum: expected {expected:#018x}, got {got:#018x}")]
    Checksum {
        /// The page.
        gpa: u64,
        /// The sender's checksum.
        expected: u64,
        /// The received page's.
        got: u64,
    },
    /// Compressed data did not decompress to the announced size.
    #[error("Compressed frame on stream {stream}: {message}")]
    Compression {
        /// The stream.
        stream: usize,
        /// What went wrong.
        message: String,
    },
    /// Post-copy placement failed.
    #[error("Placing page {gpa:#x}")]
    Place {
        /// The page.
        gpa: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// userfaultfd setup or use failed.
    #[error("userfaultfd: {what}")]
    Uffd {
        /// What failed.
        what: String,
    },
    /// An RDMA session could not be set up.
    #[error("RDMA session setup: {step}")]
    Rdma {
        /// The step that failed.
        step: &'static str,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The chosen transport cannot do what the migration needs.
    #[error("Transport {transport} cannot {what}")]
    Unsupported {
        /// The transport.
        transport: &'static str,
        /// What it cannot do, and why.
        what: String,
    },
    /// A worker thread panicked or vanished.
    #[error("Worker thread '{0}' died")]
    Worker(&'static str),
    /// Post-copy lost its connection after the destination took over the VM.
    #[error(
        "Connection lost in post-copy with {missing} pages still on the source; the destination owns the VM and the source keeps its memory for recovery"
    )]
    PostCopyLost {
        /// Pages not yet at the destination.
        missing: u64,
        /// The cause.
        #[source]
        source: Box<MigrateError>,
    },
    /// Source: the VM was paused and its state handed to the connection, then the connection
    /// (or the wait for the answer) failed before the destination confirmed that it resumed
    /// the VM, and nothing (no `Error`/`Abort` from it, no resumed session) said it will not.
    /// The destination may be running the VM, so the source VM is left paused: resuming it
    /// could run the same VM on both hosts.
    #[error(
        "Switchover unconfirmed after {waited:?}: the destination may be running the VM, so the source VM is left paused (not resumed); check the destination: if it runs the VM, discard the source's copy; only if it never resumed it, resume the source VM"
    )]
    SwitchoverUnconfirmed {
        /// Time from handing the state to the connection until the source gave up (recovery
        /// attempts included).
        waited: Duration,
        /// Post-copy: pages the destination may still lack (0 for stop-and-copy).
        stale_pages: u64,
        /// What ended the wait.
        #[source]
        source: Box<MigrateError>,
    },
    /// Destination: the VM was resumed here, but the `Resumed` frame could not be sent (and no
    /// recovery re-sent it). This side owns the VM and keeps it running; the source, which
    /// never heard of it, keeps its copy paused.
    #[error(
        "The VM runs here but the source was not told (Resumed could not be sent): this side owns the VM and keeps it running, {missing} pages still missing; the source keeps its copy paused"
    )]
    ResumedUnconfirmed {
        /// Pages not yet here (post-copy; threads touching them stay blocked).
        missing: u64,
        /// Why sending failed.
        #[source]
        source: Box<MigrateError>,
    },
    /// The connection was lost after the VM was resumed here (post-copy, or stop-and-copy
    /// before the digests were compared) and the source did not resume the session within the
    /// recovery window (destination side).
    #[error(
        "Connection lost after the VM was resumed here and not resumed within {window:?}: {missing} pages never arrived; the VM runs on here, blocked on any of them it touches (userfaultfd stays registered, they are never read as zeroes)"
    )]
    NotRecovered {
        /// Pages still missing at the destination.
        missing: u64,
        /// The recovery window.
        window: Duration,
        /// The loss that started the wait.
        #[source]
        source: Box<MigrateError>,
    },
}

impl MigrateError {
    /// Whether this error is the loss of a connection (closed, reset or silent peer, a failed
    /// stream), which post-copy recovery may repair, as opposed to a refusal, a protocol
    /// violation or a local failure.
    pub fn is_connection_loss(&self) -> bool {
        match self {
            MigrateError::Session(SessionError::Closed { .. } | SessionError::Io { .. })
            | MigrateError::Stream { .. }
            | MigrateError::Timeout { .. } => true,
            MigrateError::PostCopyLost { source, .. }
            | MigrateError::SwitchoverUnconfirmed { source, .. }
            | MigrateError::ResumedUnconfirmed { source, .. } => source.is_connection_loss(),
            _ => false,
        }
    }

    pub(crate) fn vm(op: &'static str) -> impl FnOnce(BoxError) -> Self {
        move |source| MigrateError::Vm { op, source }
    }
}
