// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Error types, one per operation: registering memory, translating a range, unregistering,
//! setting up a connection or stream, moving bytes on a stream, and bulk pushing.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::memory::{GpaRange, MemoryRegistration};

/// Error from [`MemoryRegistration::new`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegisterError {
    /// The slice size is zero, not a multiple of 4 KiB or above 1 GiB.
    #[error("Slice size {slice_size:#x} invalid (4 KiB multiple, at most 1 GiB)")]
    SliceSize {
        /// The rejected slice size.
        slice_size: u64,
    },
    /// No regions were given.
    #[error("No guest memory regions to register")]
    NoRegions,
    /// A region has zero length or a null host address.
    #[error("Region {gpa:#x}+{len:#x} is empty or has a null host address")]
    Empty {
        /// Guest-physical base.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// A region wraps around the guest-physical or host address space.
    #[error("Region {gpa:#x}+{len:#x} wraps around the address space")]
    Wraps {
        /// Guest-physical base.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// A region overlaps the previous one in guest-physical space.
    #[error("Region {gpa:#x}+{len:#x} overlaps another region")]
    Overlap {
        /// Guest-physical base.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The regions need more fixed-buffer slices than a ring can hold.
    #[error("Regions need {slices} fixed-buffer slices, at most {max} allowed")]
    TooManySlices {
        /// Slices needed.
        slices: usize,
        /// The limit.
        max: usize,
    },
    /// A region's backing file descriptor could not be duplicated.
    #[error(
        "Region {gpa:#x}: cannot duplicate its backing file descriptor: {}",
        std::io::Error::from_raw_os_error(*errno)
    )]
    File {
        /// Guest-physical base.
        gpa: u64,
        /// The `fcntl(F_DUPFD_CLOEXEC)` errno.
        errno: i32,
    },
}

/// Error translating a guest-physical range.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RangeError {
    /// The range has zero length.
    #[error("Range at {gpa:#x} is empty")]
    Empty {
        /// Guest-physical start.
        gpa: u64,
    },
    /// The range is not inside one registered region.
    #[error("Range {gpa:#x}+{len:#x} out of registered memory")]
    OutOfRange {
        /// Guest-physical start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The range's region has no alias mapping.
    #[error("Range {gpa:#x}+{len:#x} has no alias mapping")]
    NoAlias {
        /// Guest-physical start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The range's region has no backing file (`Target::File`).
    #[error("Range {gpa:#x}+{len:#x} has no backing file")]
    NoFile {
        /// Guest-physical start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// A host address was asked for with `Target::File`, which names no mapping.
    #[error("Range {gpa:#x}+{len:#x}: the file target has no host mapping")]
    NotMapped {
        /// Guest-physical start.
        gpa: u64,
        /// Length.
        len: u64,
    },
}

/// Error from [`MemoryRegistration::unregister`].
#[derive(Debug, thiserror::Error)]
pub enum UnregisterError {
    /// Streams or in-flight operations still hold the registration; it is handed back.
    #[error("Registration still held by {holders} owners, {inflight} operations in flight")]
    Busy {
        /// Other holders (streams, guards).
        holders: usize,
        /// Operations the kernel may still be using.
        inflight: usize,
        /// The registration, returned so the caller can retry.
        registration: Arc<MemoryRegistration>,
    },
}

/// Error setting up a listener, connection or stream.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Binding a listener failed.
    #[error("Cannot listen on {endpoint}")]
    Bind {
        /// The endpoint.
        endpoint: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Connecting failed.
    #[error("Cannot connect to {endpoint}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Accepting failed.
    #[error("Cannot accept on {endpoint}")]
    Accept {
        /// The endpoint.
        endpoint: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Setting a socket option failed.
    #[error("Cannot set {option} on connection to {peer}")]
    SocketOption {
        /// The option.
        option: &'static str,
        /// The peer.
        peer: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Creating or configuring the io_uring failed.
    #[error("Stream {stream}: io_uring setup failed ({what})")]
    Ring {
        /// Stream index.
        stream: usize,
        /// The step that failed.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Registering guest memory as fixed buffers failed (ENOMEM: `RLIMIT_MEMLOCK`).
    #[error("Stream {stream}: registering {slices} fixed buffers ({bytes:#x} bytes) failed")]
    RegisterBuffers {
        /// Stream index.
        stream: usize,
        /// Slices.
        slices: usize,
        /// Bytes.
        bytes: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A required io_uring feature or opcode is missing and has no fallback.
    #[error("Stream {stream}: io_uring lacks {what}")]
    Unsupported {
        /// Stream index.
        stream: usize,
        /// What is missing.
        what: &'static str,
    },
}

/// The operation a [`StreamError`] happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Sending a frame.
    Send,
    /// Receiving frame-header bytes.
    RecvHeader,
    /// Receiving payload into guest memory.
    RecvPayload,
    /// Waiting for queued sends.
    Flush,
    /// Shutting the stream down.
    Shutdown,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Send => "send",
            Op::RecvHeader => "header receive",
            Op::RecvPayload => "payload receive",
            Op::Flush => "flush",
            Op::Shutdown => "shutdown",
        })
    }
}

/// Where in a frame a [`StreamError`] happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// Header bytes (not guest memory).
    Header,
    /// A guest-memory range.
    Range(GpaRange),
    /// Not tied to a range.
    Stream,
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            At::Header => f.write_str("header"),
            At::Range(r) => write!(f, "range {r}"),
            At::Stream => f.write_str("stream"),
        }
    }
}

/// Error moving bytes on a stream. Every variant names the stream index and the peer.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The peer closed the connection before all expected bytes arrived.
    #[error("Stream {stream} ({peer}): peer closed after {received} of {expected} bytes at {at}")]
    PeerClosed {
        /// Stream index.
        stream: usize,
        /// Peer address.
        peer: String,
        /// Bytes received in the failed call.
        received: u64,
        /// Bytes the call expected.
        expected: u64,
        /// What was being received.
        at: At,
    },
    /// No progress within the configured timeout (a stalled peer).
    #[error("Stream {stream} ({peer}): {op} made no progress for {timeout:?} at {at}")]
    Timeout {
        /// Stream index.
        stream: usize,
        /// Peer address.
        peer: String,
        /// The operation.
        op: Op,
        /// The configured timeout.
        timeout: Duration,
        /// What was being moved.
        at: At,
    },
    /// A system call or io_uring operation failed.
    #[error("Stream {stream} ({peer}): {op} failed at {at}")]
    Io {
        /// Stream index.
        stream: usize,
        /// Peer address.
        peer: String,
        /// The operation.
        op: Op,
        /// What was being moved.
        at: At,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A range does not translate to registered memory.
    #[error("Stream {stream} ({peer}): bad range")]
    Range {
        /// Stream index.
        stream: usize,
        /// Peer address.
        peer: String,
        /// The cause.
        #[source]
        source: RangeError,
    },
    /// The RDMA data path (queue pair, completions, batch framing) failed; see the source.
    #[error("Stream {stream} ({peer}): RDMA data path failed")]
    Rdma {
        /// Stream index.
        stream: usize,
        /// Peer address.
        peer: String,
        /// The cause (an RDMA stream error or a framing error).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The stream was shut down or failed earlier; it cannot be used any more.
    #[error("Stream {stream} ({peer}): closed after an earlier shutdown or error")]
    Closed {
        /// Stream index.
        stream: usize,
        /// Peer address.
        peer: String,
    },
}

impl StreamError {
    /// True when the error means the peer went away (closed, reset or broken pipe).
    pub fn is_peer_gone(&self) -> bool {
        match self {
            StreamError::PeerClosed { .. } => true,
            StreamError::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN | libc::ECONNABORTED)
            ),
            _ => false,
        }
    }

    /// The stream index the error names.
    pub fn stream(&self) -> usize {
        match self {
            StreamError::PeerClosed { stream, .. }
            | StreamError::Timeout { stream, .. }
            | StreamError::Io { stream, .. }
            | StreamError::Range { stream, .. }
            | StreamError::Rdma { stream, .. }
            | StreamError::Closed { stream, .. } => *stream,
        }
    }
}

/// Error from the bulk pusher or the urgent server.
#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    /// A stream failed; this is the first error any stream reported (shared by every later
    /// call, hence the `Arc`).
    #[error("Stream {stream} failed", stream = source.stream())]
    Stream {
        /// The first stream error.
        #[source]
        source: Arc<StreamError>,
    },
    /// A worker thread panicked.
    #[error("Stream {stream} worker panicked")]
    Panicked {
        /// Stream index.
        stream: usize,
    },
    /// Spawning a worker thread failed.
    #[error("Cannot spawn worker for stream {stream}")]
    Spawn {
        /// Stream index.
        stream: usize,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The pusher has no streams.
    #[error("Bulk pusher needs at least one stream")]
    NoStreams,
    /// A wait for outstanding batches timed out.
    #[error("{outstanding} batches still outstanding after {timeout:?}")]
    FlushTimeout {
        /// Batches not yet completed.
        outstanding: u64,
        /// The timeout.
        timeout: Duration,
    },
}
