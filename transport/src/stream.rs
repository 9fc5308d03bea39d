// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The stream API: one connection that sends frames (owned header bytes followed by guest-memory
//! ranges sent by reference) and receives header bytes or payload straight into guest memory.
//!
//! A stream is blocking and used from one thread. It owns its socket (and, for io_uring, its
//! ring). It does not interpret the bytes: frame formats, sessions and handshakes belong to
//! `ferry-protocol` and the session layer built on top of streams.
//!
//! Sends may be *queued*: [`DataStream::send_frame`] can return before the bytes left, and guest
//! memory named by the frame must stay unchanged-or-don't-care until [`DataStream::flush`]
//! returned (the registration itself is kept alive by the stream, see [`crate::memory`]).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{ConnectError, StreamError};
use crate::memory::{GpaRange, MemoryRegistration, Target};
use crate::plain::SocketStream;
use crate::socket::Socket;
use crate::uring::UringStream;

/// Counters one stream keeps (cumulative since it was opened).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Bytes handed to the kernel and completed (headers + payload).
    pub bytes_sent: u64,
    /// Bytes received (headers + payload).
    pub bytes_received: u64,
    /// Frames handed to the kernel (io_uring: submitted; sockets: written).
    pub frames_sent: u64,
    /// `SEND_ZC` operations issued.
    pub zc_sends: u64,
    /// `SEND_ZC` notifications received.
    pub zc_notifs: u64,
    /// Notifications in which the kernel reported it copied instead of sending zero-copy
    /// (`IORING_NOTIF_USAGE_ZC_COPIED`; always the case over loopback).
    pub zc_copied: u64,
    /// Submission-queue entries submitted (io_uring) or send system calls (sockets).
    pub sqes: u64,
    /// `io_uring_enter` calls that submitted work (io_uring only).
    pub submits: u64,
    /// Short completions whose remainder was resubmitted (io_uring only).
    pub resubmits: u64,
}

impl StreamStats {
    /// Adds `other` to `self`.
    pub fn add(&mut self, other: &StreamStats) {
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
        self.frames_sent += other.frames_sent;
        self.zc_sends += other.zc_sends;
        self.zc_notifs += other.zc_notifs;
        self.zc_copied += other.zc_copied;
        self.sqes += other.sqes;
        self.submits += other.submits;
        self.resubmits += other.resubmits;
    }
}

/// One connection's data path. Implemented by the plain-socket and the io_uring backends.
pub trait DataStream: Send + fmt::Debug {
    /// The stream's index (for error messages and counters).
    fn index(&self) -> usize;

    /// The peer's name.
    fn peer(&self) -> &str;

    /// The backend's name (`"tcp"`, `"unix"`, `"uring"`).
    fn backend(&self) -> &'static str;

    /// Queues one frame: `header` (copied) followed by the bytes of `ranges` in order, sent from
    /// guest memory by reference. May return before the bytes left; see [`DataStream::flush`].
    fn send_frame(&mut self, header: &[u8], ranges: &[GpaRange]) -> Result<(), StreamError>;

    /// Receives exactly `buf.len()` bytes (frame headers, control messages).
    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<(), StreamError>;

    /// Receives the bytes of `ranges`, in order, straight into guest memory (or its alias
    /// mapping, per `target`).
    fn recv_into(&mut self, ranges: &[GpaRange], target: Target) -> Result<(), StreamError>;

    /// From here on the peer may run its guest on the memory this stream could write directly,
    /// so payload must travel in-band. A transport that places payload in the peer's memory
    /// itself (RDMA WRITE) switches to sending it on the connection, in order with the frames
    /// before and after; the socket transports have nothing to do. Called between frames, on
    /// the sending side at the switch, and on the receiving side before the first frame sent
    /// after it (which makes sure of the switch and revokes the peer's direct access).
    fn end_direct_placement(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    /// Waits until every queued send has completed, zero-copy notifications included. After
    /// `Ok`, the kernel no longer references any guest memory for this stream.
    fn flush(&mut self) -> Result<(), StreamError>;

    /// Flushes, then shuts the connection down in both directions. Later calls fail with
    /// [`StreamError::Closed`].
    fn shutdown(&mut self) -> Result<(), StreamError>;

    /// The stream's counters.
    fn stats(&self) -> StreamStats;
}

/// Which data path a stream uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// Blocking `sendmsg`/`recvmsg` with iovecs into guest memory (TCP or Unix).
    Socket,
    /// io_uring: fixed file, fixed buffers, `SEND_ZC` for large ranges.
    #[default]
    Uring,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Socket => "socket",
            Backend::Uring => "uring",
        })
    }
}

/// Options for opening a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamConfig {
    /// The data path.
    pub backend: Backend,
    /// A call that makes no progress for this long fails with [`StreamError::Timeout`].
    pub timeout: Duration,
    /// Ranges of at least this many bytes go by `SEND_ZC` (io_uring); smaller ones by `SEND`.
    pub zc_threshold: u32,
    /// io_uring submission-queue size; also the most SQEs in one batch.
    pub ring_entries: u32,
    /// Submit a batch once this many payload bytes are queued (io_uring).
    pub batch_bytes: u64,
    /// The largest single SQE (longer segments are split), so progress stays visible to the
    /// stall timeout.
    pub max_sqe_bytes: u32,
    /// Register guest memory as fixed buffers (io_uring); when off or when registration fails,
    /// `SEND_ZC` still works on plain addresses.
    pub fixed_buffers: bool,
    /// When to use `SEND_ZC` (io_uring).
    pub zero_copy: ZeroCopy,
    /// Ask the kernel to complete sends and receives only when the whole buffer moved
    /// (`MSG_WAITALL`), which lets a batch go as one link chain. With `false` the io_uring
    /// stream submits one operation at a time and resubmits the rest of every short
    /// completion itself; much slower, but it exercises that path (and works on kernels whose
    /// `SEND` ignores `MSG_WAITALL`, before 5.18).
    pub wait_all: bool,
}

/// When the io_uring backend sends by `SEND_ZC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZeroCopy {
    /// Never: plain `SEND` (the kernel copies at submission).
    Off,
    /// For every range of at least [`StreamConfig::zc_threshold`] bytes.
    Always,
    /// Like `Always`, but if the first [`ADAPTIVE_ZC_PROBE`] notifications all report that the
    /// kernel copied anyway (loopback, or a NIC without scatter-gather), switch to plain `SEND`,
    /// which is cheaper than a copying `SEND_ZC`.
    #[default]
    Adaptive,
}

/// Notifications [`ZeroCopy::Adaptive`] inspects before deciding.
pub const ADAPTIVE_ZC_PROBE: u64 = 16;

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Uring,
            timeout: Duration::from_secs(10),
            zc_threshold: 16 * 1024,
            ring_entries: 256,
            batch_bytes: 8 << 20,
            max_sqe_bytes: 8 << 20,
            fixed_buffers: true,
            zero_copy: ZeroCopy::Adaptive,
            wait_all: true,
        }
    }
}

/// Opens a stream with index `index` over `socket` for memory `reg`.
pub fn open_stream(
    socket: Socket,
    index: usize,
    reg: &Arc<MemoryRegistration>,
    config: &StreamConfig,
) -> Result<Box<dyn DataStream>, ConnectError> {
    Ok(match config.backend {
        Backend::Socket => Box::new(SocketStream::new(socket, index, reg, config)?),
        Backend::Uring => Box::new(UringStream::new(socket, index, reg, config)?),
    })
}
