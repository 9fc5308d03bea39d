// SPDX-License-Identifier: Apache-2.0 OR MIT
//! One RDMA stream: an RC queue pair with its own completion queue, driven by one thread.
//!
//! Owns the data path:
//! - **Push** ([`RdmaStream::write_batch`]): the page ranges of a batch become RDMA WRITEs from
//!   the source's registered guest memory to the same guest-physical addresses in the
//!   destination's memory; the batch's last work request is a WRITE_WITH_IMM whose immediate data
//!   is the batch id. RC placement is in order, so when the destination sees that immediate,
//!   every byte of the batch is in its memory. Work requests are posted many per doorbell and
//!   signalled every `k` (see `window`).
//! - **Arrivals** ([`RdmaStream::wait_arrival`], [`RdmaStream::poll`]): the destination keeps
//!   zero-length receives posted to consume the immediates and reposts one per arrival.
//! - **Post-copy demand fetch** ([`RdmaStream::read_to_bounce`]): a one-sided RDMA READ from the
//!   source's memory (no source CPU) into a registered staging buffer, for `UFFDIO_COPY`.
//! - **Completions**: polled from the stream's own completion queue; an error status becomes a
//!   [`CompletionError`] naming the stream, the operation, the guest range and the `wr_id`. After
//!   an error the queue pair is in the error state and the stream reports
//!   [`StreamError::Failed`] for every later call.
//!
//! Buffer lifetime: every posted work request holds a guard (an `Arc` of the registration, or the
//! bounce slot) in the send window until a completion retires it; the queue pair is declared
//! first in [`RdmaStream`] so it is destroyed before any guard is released when a stream is
//! dropped with work outstanding.
//!
//! Waiting is busy polling with backoff (spin, then yield, then short sleeps), bounded by the
//! caller's timeout; completion channels (interrupt-driven waits) are not used.
//!
//! Flow control: the destination posts `recv_depth` receives per queue pair; the source's
//! WRITE_WITH_IMMs beyond that wait in receiver-not-ready retries (rnr_retry = 7, unlimited)
//! until the destination reposts, so a slow destination slows the source without failing it.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sideway::ibverbs::completion::{
    GenericCompletionQueue, PollCompletionQueueError, WorkCompletionOperationType,
};
use sideway::ibverbs::queue_pair::{GenericQueuePair, PostRecvError, PostSendError, QueuePair};
use thiserror::Error;

use super::memory::{BouncePool, BounceSlot, FilledSlot, RegisteredMemory};
use super::region::{GuestRange, RemoteMap, TranslateError, WrPiece, split_read, split_transfer};
use super::sys::{self, SendOp, SendWr};
use super::window::{RECV_WR_FLAG, SendWindow, WcStatus, WindowError, WrInfo, WrOp};

/// What a stream is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// Bulk page pushes.
    Bulk,
    /// Post-copy demand fetches; never queued behind bulk data (its own queue pair).
    Urgent,
}

/// The operation behind a completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionOp {
    /// A send-queue work request.
    Send(WrOp),
    /// A receive (consumes a WRITE_WITH_IMM).
    Receive,
    /// A `wr_id` not in the send window.
    Unknown,
}

impl fmt::Display for CompletionOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CompletionOp::Send(op) => op.fmt(f),
            CompletionOp::Receive => f.write_str("receive"),
            CompletionOp::Unknown => f.write_str("unknown work request"),
        }
    }
}

/// A work request completed with an error status.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "Stream {stream}: {op} {gpa:#x}+{len:#x} (wr_id {wr_id:#x}) failed with {status} \
     (vendor {vendor_err:#x})"
)]
pub struct CompletionError {
    /// Stream index.
    pub stream: usize,
    /// The operation.
    pub op: CompletionOp,
    /// Guest-physical address of the failed work request (0 for receives).
    pub gpa: u64,
    /// Its length.
    pub len: u32,
    /// Its `wr_id`.
    pub wr_id: u64,
    /// The status.
    pub status: WcStatus,
    /// Vendor error code (device specific).
    pub vendor_err: u32,
}

/// A stream operation failed.
#[derive(Debug, Error)]
pub enum StreamError {
    /// A range could not be mapped to local or remote memory.
    #[error("Stream {stream}: cannot map range")]
    Translate {
        /// Stream index.
        stream: usize,
        /// Why.
        #[source]
        source: TranslateError,
    },
    /// A batch had no ranges.
    #[error("Stream {stream}: empty batch {batch}")]
    EmptyBatch {
        /// Stream index.
        stream: usize,
        /// Batch id.
        batch: u32,
    },
    /// The registration or bounce pool belongs to another protection domain.
    #[error("Stream {stream}: memory registered on another protection domain")]
    ForeignRegistration {
        /// Stream index.
        stream: usize,
    },
    /// Posting send work requests failed.
    #[error("Stream {stream}: posting {count} work requests failed")]
    Post {
        /// Stream index.
        stream: usize,
        /// Work requests in the failed post.
        count: usize,
        /// The verbs error.
        #[source]
        source: PostSendError,
    },
    /// Posting receives failed.
    #[error("Stream {stream}: posting {count} receives failed")]
    PostRecv {
        /// Stream index.
        stream: usize,
        /// Receives in the failed post.
        count: usize,
        /// The verbs error.
        #[source]
        source: PostRecvError,
    },
    /// Polling the completion queue failed.
    #[error("Stream {stream}: polling the completion queue failed")]
    Poll {
        /// Stream index.
        stream: usize,
        /// The verbs error.
        #[source]
        source: PollCompletionQueueError,
    },
    /// A work request completed with an error.
    #[error(transparent)]
    Completion(#[from] CompletionError),
    /// The stream failed earlier (its queue pair is in the error state).
    #[error("Stream {stream} already failed with {status}")]
    Failed {
        /// Stream index.
        stream: usize,
        /// The first error status.
        status: WcStatus,
    },
    /// Send-window bookkeeping rejected a completion or a request.
    #[error("Stream {stream}: send window")]
    Window {
        /// Stream index.
        stream: usize,
        /// Why.
        #[source]
        source: WindowError,
    },
    /// A completion with an opcode this stream never posts.
    #[error("Stream {stream}: unexpected completion opcode {opcode} for wr_id {wr_id:#x}")]
    Unexpected {
        /// Stream index.
        stream: usize,
        /// Raw opcode.
        opcode: u32,
        /// Its `wr_id`.
        wr_id: u64,
    },
    /// Waiting exceeded the caller's timeout.
    #[error("Stream {stream}: timed out after {waited:?} waiting for {what}")]
    Timeout {
        /// Stream index.
        stream: usize,
        /// What was awaited.
        what: &'static str,
        /// How long.
        waited: Duration,
    },
    /// No free staging buffer.
    #[error("Stream {stream}: all {slots} bounce slots in use")]
    PoolExhausted {
        /// Stream index.
        stream: usize,
        /// Pool size.
        slots: usize,
    },
}

/// A batch whose data is fully placed in the destination's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// The batch id the source sent as immediate data.
    pub batch: u32,
    /// Bytes carried by the batch's final WRITE_WITH_IMM (not the whole batch).
    pub last_wr_bytes: u32,
}

/// What a pushed batch took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchStats {
    /// Work requests posted.
    pub work_requests: usize,
    /// Bytes.
    pub bytes: u64,
}

/// Cumulative counters of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamStats {
    /// Bytes written with RDMA WRITE.
    pub bytes_written: u64,
    /// Bytes read with RDMA READ.
    pub bytes_read: u64,
    /// Send work requests posted.
    pub send_wrs: u64,
    /// Doorbells (post calls).
    pub posts: u64,
    /// Completions polled.
    pub completions: u64,
    /// Immediates received.
    pub arrivals: u64,
}

/// A completed READ (see [`RdmaStream::take_reads`]).
#[derive(Debug)]
pub enum ReadDone {
    /// Into a staging buffer ([`RdmaStream::post_read`]): here are the bytes.
    Slot(FilledSlot),
    /// Into our own registered memory ([`RdmaStream::post_read_in_place`]): the bytes are there.
    InPlace {
        /// Guest-physical address of the range read.
        gpa: u64,
        /// Its length.
        len: u64,
    },
}

/// Identifies a posted READ until [`RdmaStream::wait_read`] returns its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReadTicket(u64);

/// Guard held by a posted work request until it retires.
#[derive(Debug)]
enum Guard {
    /// Nothing to keep (a non-final piece of a READ; the final piece holds the slot).
    None,
    /// The source registration a WRITE reads from.
    Memory(#[allow(dead_code)] Arc<RegisteredMemory>),
    /// The staging buffer a READ fills.
    Read {
        slot: BounceSlot,
        ticket: u64,
        gpa: u64,
        len: usize,
    },
    /// The registration a READ in place fills (its last piece).
    ReadInPlace {
        memory: Arc<RegisteredMemory>,
        ticket: u64,
        gpa: u64,
        len: u64,
    },
}

/// One raw work completion, copied out of the poller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawWc {
    pub wr_id: u64,
    pub status: u32,
    pub opcode: u32,
    pub vendor_err: u32,
    pub byte_len: u32,
    /// Immediate data as received (network byte order); 0 unless a receive with immediate.
    pub imm: u32,
}

/// The verbs a stream uses: implemented by [`VerbsQueue`] (a queue pair and its completion
/// queue) and, in unit tests, by an in-memory simulator.
pub(crate) trait QueueOps: fmt::Debug + Send {
    /// Posts send work requests in one doorbell; on error none is queued.
    ///
    /// # Safety
    ///
    /// As `sys::post_send`: every local buffer is registered under its lkey and stays so until
    /// the request retires or the queue is destroyed.
    unsafe fn post_send(&mut self, wrs: &[SendWr]) -> Result<(), PostSendError>;

    /// Posts zero-length receives with these `wr_id`s.
    fn post_recv(&mut self, wr_ids: &[u64]) -> Result<(), PostRecvError>;

    /// Appends every available completion to `out`.
    fn poll(&mut self, out: &mut Vec<RawWc>) -> Result<(), PollCompletionQueueError>;

    /// Queue-pair number.
    fn qp_number(&self) -> u32;
}

/// A real RC queue pair with its own completion queue.
#[derive(Debug)]
pub(crate) struct VerbsQueue {
    // Declared first: destroyed before the completion queue it uses.
    qp: GenericQueuePair,
    cq: GenericCompletionQueue,
}

impl VerbsQueue {
    pub(crate) fn new(qp: GenericQueuePair, cq: GenericCompletionQueue) -> Self {
        Self { qp, cq }
    }
}

impl QueueOps for VerbsQueue {
    unsafe fn post_send(&mut self, wrs: &[SendWr]) -> Result<(), PostSendError> {
        // SAFETY: forwarded from this method's contract.
        unsafe { sys::post_send(&mut self.qp, wrs) }
    }

    fn post_recv(&mut self, wr_ids: &[u64]) -> Result<(), PostRecvError> {
        let mut guard = self.qp.start_post_recv();
        for &id in wr_ids {
            let _ = guard.construct_wr(id);
        }
        guard.post()
    }

    fn poll(&mut self, out: &mut Vec<RawWc>) -> Result<(), PollCompletionQueueError> {
        match self.cq.start_poll() {
            Ok(poller) => {
                for wc in poller {
                    let opcode = wc.opcode();
                    let status = wc.status();
                    let is_imm = status == 0
                        && opcode == WorkCompletionOperationType::ReceiveWithImmediate as u32;
                    out.push(RawWc {
                        wr_id: wc.wr_id(),
                        status,
                        opcode,
                        vendor_err: wc.vendor_err(),
                        byte_len: wc.byte_len(),
                        imm: if is_imm { wc.imm_data() } else { 0 },
                    });
                }
                Ok(())
            }
            Err(PollCompletionQueueError::CompletionQueueEmpty) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn qp_number(&self) -> u32 {
        self.qp.qp_number()
    }
}

/// Sizing of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StreamConfig {
    pub index: usize,
    pub kind: StreamKind,
    pub send_depth: usize,
    pub recv_depth: usize,
    pub signal_every: usize,
    pub max_wr_bytes: u32,
    /// Key of the protection domain the queue pair lives on.
    pub pd_key: usize,
}

/// An RC queue pair with its own completion queue. `Send`, so each can run on its own thread.
#[derive(Debug)]
pub struct RdmaStream {
    // Field order matters: the queue pair is destroyed before the window's guards are released.
    queue: Box<dyn QueueOps>,
    window: SendWindow<Guard>,
    /// Keeps the connection's shared state (rdmacm id, exposed registrations, protection
    /// domain) alive while the queue pair exists.
    _keep: Arc<dyn fmt::Debug + Send + Sync>,
    cfg: StreamConfig,
    recv_posted: usize,
    recv_seq: u64,
    arrivals: VecDeque<Arrival>,
    reads_done: Vec<(u64, ReadDone)>,
    next_ticket: u64,
    failure: Option<WcStatus>,
    pieces: Vec<WrPiece>,
    wrs: Vec<SendWr>,
    wcs: Vec<RawWc>,
    recv_ids: Vec<u64>,
    stats: StreamStats,
}

/// Spin, then yield, then sleep briefly: bounded busy polling on a machine with few cores.
struct Backoff {
    empty: u32,
}

impl Backoff {
    fn new() -> Self {
        Self { empty: 0 }
    }

    fn reset(&mut self) {
        self.empty = 0;
    }

    fn wait(&mut self) {
        self.empty = self.empty.saturating_add(1);
        if self.empty < 64 {
            std::hint::spin_loop();
        } else if self.empty < 256 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

impl RdmaStream {
    pub(crate) fn new(
        queue: Box<dyn QueueOps>,
        keep: Arc<dyn fmt::Debug + Send + Sync>,
        cfg: StreamConfig,
    ) -> Self {
        Self {
            queue,
            window: SendWindow::new(cfg.send_depth, cfg.signal_every),
            _keep: keep,
            cfg,
            recv_posted: 0,
            recv_seq: 0,
            arrivals: VecDeque::new(),
            reads_done: Vec::new(),
            next_ticket: 1,
            failure: None,
            pieces: Vec::new(),
            wrs: Vec::new(),
            wcs: Vec::new(),
            recv_ids: Vec::new(),
            stats: StreamStats::default(),
        }
    }

    /// Index of the stream (the urgent stream comes after the bulk ones).
    pub fn index(&self) -> usize {
        self.cfg.index
    }

    /// Bulk or urgent.
    pub fn kind(&self) -> StreamKind {
        self.cfg.kind
    }

    /// Queue-pair number.
    pub fn qp_number(&self) -> u32 {
        self.queue.qp_number()
    }

    /// Counters.
    pub fn stats(&self) -> StreamStats {
        self.stats
    }

    /// Send work requests posted and not yet retired.
    pub fn outstanding(&self) -> usize {
        self.window.outstanding()
    }

    /// Receives currently posted.
    pub fn receives_posted(&self) -> usize {
        self.recv_posted
    }

    fn check_failed(&self) -> Result<(), StreamError> {
        match self.failure {
            Some(status) => Err(StreamError::Failed {
                stream: self.cfg.index,
                status,
            }),
            None => Ok(()),
        }
    }

    /// Posts `count` zero-length receives (each consumes one WRITE_WITH_IMM).
    pub(crate) fn post_receives(&mut self, count: usize) -> Result<(), StreamError> {
        if count == 0 {
            return Ok(());
        }
        self.recv_ids.clear();
        for _ in 0..count {
            self.recv_ids.push(RECV_WR_FLAG | self.recv_seq);
            self.recv_seq = (self.recv_seq + 1) & !RECV_WR_FLAG;
        }
        self.queue
            .post_recv(&self.recv_ids)
            .map_err(|source| StreamError::PostRecv {
                stream: self.cfg.index,
                count,
                source,
            })?;
        self.recv_posted += count;
        Ok(())
    }

    /// Records receives posted during setup (ids `RECV_WR_FLAG | 0 .. count`).
    pub(crate) fn note_receives_posted(&mut self, count: usize) {
        self.recv_posted = count;
        self.recv_seq = count as u64;
    }

    /// Tops the receive queue up to `recv_depth` (after a failed repost, for instance).
    pub fn fill_receives(&mut self) -> Result<(), StreamError> {
        let missing = self.cfg.recv_depth.saturating_sub(self.recv_posted);
        self.post_receives(missing)
    }

    /// Polls the completion queue once: retires send work requests (releasing their guards),
    /// queues arrivals and finished READs, and reposts consumed receives. Returns the number of
    /// completions seen.
    pub fn poll(&mut self) -> Result<usize, StreamError> {
        self.check_failed()?;
        let stream = self.cfg.index;
        self.wcs.clear();
        self.queue
            .poll(&mut self.wcs)
            .map_err(|source| StreamError::Poll { stream, source })?;
        let seen = self.wcs.len();
        self.stats.completions += seen as u64;
        let mut consumed_recvs = 0;
        for i in 0..seen {
            let wc = self.wcs[i];
            let status = WcStatus::from_raw(wc.status);
            if status != WcStatus::Success {
                return Err(self.fail(wc, status));
            }
            if wc.wr_id & RECV_WR_FLAG != 0 {
                if wc.opcode != WorkCompletionOperationType::ReceiveWithImmediate as u32 {
                    return Err(StreamError::Unexpected {
                        stream,
                        opcode: wc.opcode,
                        wr_id: wc.wr_id,
                    });
                }
                self.recv_posted = self.recv_posted.saturating_sub(1);
                consumed_recvs += 1;
                self.stats.arrivals += 1;
                self.arrivals.push_back(Arrival {
                    // The verbs ABI carries immediate data in network byte order.
                    batch: u32::from_be(wc.imm),
                    last_wr_bytes: wc.byte_len,
                });
                continue;
            }
            let retired = self
                .window
                .complete(wc.wr_id)
                .map_err(|source| StreamError::Window { stream, source })?;
            for posted in retired {
                match posted.payload {
                    Guard::Read {
                        slot,
                        ticket,
                        gpa,
                        len,
                    } => self
                        .reads_done
                        .push((ticket, ReadDone::Slot(FilledSlot::new(slot, gpa, len)))),
                    Guard::ReadInPlace {
                        memory,
                        ticket,
                        gpa,
                        len,
                    } => {
                        drop(memory);
                        self.reads_done
                            .push((ticket, ReadDone::InPlace { gpa, len }));
                    }
                    Guard::None | Guard::Memory(_) => {}
                }
            }
        }
        if consumed_recvs > 0 {
            self.post_receives(consumed_recvs)?;
        }
        Ok(seen)
    }

    fn fail(&mut self, wc: RawWc, status: WcStatus) -> StreamError {
        self.failure = Some(status);
        let (op, gpa, len) = if wc.wr_id & RECV_WR_FLAG != 0 {
            (CompletionOp::Receive, 0, 0)
        } else {
            match self.window.lookup(wc.wr_id) {
                Some(info) => (CompletionOp::Send(info.op), info.gpa, info.len),
                None => (CompletionOp::Unknown, 0, 0),
            }
        };
        tracing::warn!(
            stream = self.cfg.index,
            %op, gpa, len, wr_id = wc.wr_id, %status, vendor_err = wc.vendor_err,
            "RDMA work request failed"
        );
        StreamError::Completion(CompletionError {
            stream: self.cfg.index,
            op,
            gpa,
            len,
            wr_id: wc.wr_id,
            status,
            vendor_err: wc.vendor_err,
        })
    }

    /// Polls until `want` send slots are free.
    fn wait_slots(
        &mut self,
        want: usize,
        deadline: Instant,
        start: Instant,
    ) -> Result<(), StreamError> {
        let mut backoff = Backoff::new();
        while self.window.free() < want {
            if self.poll()? > 0 {
                backoff.reset();
            } else if Instant::now() >= deadline {
                return Err(StreamError::Timeout {
                    stream: self.cfg.index,
                    what: "send-queue slots",
                    waited: start.elapsed(),
                });
            } else {
                backoff.wait();
            }
        }
        Ok(())
    }

    /// Posts the staged work requests in `self.wrs` and commits or aborts the window.
    fn post_staged(&mut self) -> Result<(), StreamError> {
        // SAFETY: every staged work request's local buffer was taken from a registration (chunk
        // table or bounce slot) on this stream's protection domain (checked by the callers via
        // `pd_key`), and the window holds that registration's guard until the request retires;
        // the queue pair is destroyed before the window when the stream is dropped.
        let posted = unsafe { self.queue.post_send(&self.wrs) };
        match posted {
            Ok(()) => {
                self.window.commit();
                self.stats.posts += 1;
                self.stats.send_wrs += self.wrs.len() as u64;
                Ok(())
            }
            Err(source) => {
                drop(self.window.abort());
                Err(StreamError::Post {
                    stream: self.cfg.index,
                    count: self.wrs.len(),
                    source,
                })
            }
        }
    }

    /// Pushes `ranges` from `local` (this host's registered guest memory) to the same
    /// guest-physical addresses in the peer's memory, ending with a WRITE_WITH_IMM carrying
    /// `batch`. Returns once everything is posted (not completed; see [`RdmaStream::flush`]).
    /// Waits for send-queue space at most `timeout`.
    pub fn write_batch(
        &mut self,
        local: &Arc<RegisteredMemory>,
        remote: &RemoteMap,
        ranges: &[GuestRange],
        batch: u32,
        timeout: Duration,
    ) -> Result<BatchStats, StreamError> {
        let max_wr = self.cfg.max_wr_bytes;
        self.post_split(
            local.pd_key(),
            |pieces| {
                ranges
                    .iter()
                    .try_for_each(|r| split_transfer(local.table(), remote, *r, max_wr, pieces))
            },
            |st, pieces, start| {
                st.post_pieces_as_writes(local, pieces, batch, start + timeout, start)
            },
        )
    }

    /// What every post of guest ranges starts with: checks the stream and that the local
    /// memory (`pd_key`) belongs to its protection domain, has `split` cut the ranges into
    /// work requests (in the stream's reused piece buffer), then `post`s them with the time
    /// it started.
    fn post_split<T>(
        &mut self,
        pd_key: usize,
        split: impl FnOnce(&mut Vec<WrPiece>) -> Result<(), TranslateError>,
        post: impl FnOnce(&mut Self, &[WrPiece], Instant) -> Result<T, StreamError>,
    ) -> Result<T, StreamError> {
        self.check_failed()?;
        let stream = self.cfg.index;
        if pd_key != self.cfg.pd_key {
            return Err(StreamError::ForeignRegistration { stream });
        }
        let start = Instant::now();
        let mut pieces = std::mem::take(&mut self.pieces);
        pieces.clear();
        let result = split(&mut pieces)
            .map_err(|source| StreamError::Translate { stream, source })
            .and_then(|()| post(self, &pieces, start));
        self.pieces = pieces;
        result
    }

    fn post_pieces_as_writes(
        &mut self,
        local: &Arc<RegisteredMemory>,
        pieces: &[WrPiece],
        batch: u32,
        deadline: Instant,
        start: Instant,
    ) -> Result<BatchStats, StreamError> {
        let stream = self.cfg.index;
        let total = pieces.len();
        if total == 0 {
            return Err(StreamError::EmptyBatch { stream, batch });
        }
        let mut next = 0;
        let mut bytes = 0u64;
        while next < total {
            self.wait_slots(1, deadline, start)?;
            let n = self.window.free().min(total - next);
            self.wrs.clear();
            for (i, p) in pieces.iter().enumerate().skip(next).take(n) {
                let last = i + 1 == total;
                let (op, send_op) = if last {
                    (
                        WrOp::WriteImm,
                        SendOp::WriteImm {
                            rkey: p.rkey,
                            remote_addr: p.remote_addr,
                            imm_be: batch.to_be(),
                        },
                    )
                } else {
                    (
                        WrOp::Write,
                        SendOp::Write {
                            rkey: p.rkey,
                            remote_addr: p.remote_addr,
                        },
                    )
                };
                let info = WrInfo {
                    op,
                    gpa: p.gpa,
                    len: p.len,
                };
                let (wr_id, signalled) = self
                    .window
                    .stage(info, Guard::Memory(Arc::clone(local)), i + 1 == next + n)
                    .map_err(|source| StreamError::Window { stream, source })?;
                self.wrs.push(SendWr {
                    wr_id,
                    signalled,
                    op: send_op,
                    local_addr: p.local_addr,
                    len: p.len,
                    lkey: p.lkey,
                });
                bytes += u64::from(p.len);
            }
            self.post_staged()?;
            next += n;
        }
        self.stats.bytes_written += bytes;
        Ok(BatchStats {
            work_requests: total,
            bytes,
        })
    }

    /// Posts a zero-length WRITE_WITH_IMM carrying `imm` (host order): it moves no data, and
    /// the peer sees it, like a batch's immediate, in order after everything posted before it.
    /// A signal between the sides of a framing built on immediates.
    pub fn post_marker(
        &mut self,
        local: &Arc<RegisteredMemory>,
        remote: &RemoteMap,
        imm: u32,
        timeout: Duration,
    ) -> Result<(), StreamError> {
        self.check_failed()?;
        let stream = self.cfg.index;
        if local.pd_key() != self.cfg.pd_key {
            return Err(StreamError::ForeignRegistration { stream });
        }
        // Any registered addresses do: nothing is read or written.
        let (Some(l), Some(r)) = (local.table().chunks().first(), remote.regions().first()) else {
            return Err(StreamError::EmptyBatch { stream, batch: imm });
        };
        let start = Instant::now();
        self.wait_slots(1, start + timeout, start)?;
        let info = WrInfo {
            op: WrOp::WriteImm,
            gpa: l.gpa,
            len: 0,
        };
        let (wr_id, signalled) = self
            .window
            .stage(info, Guard::Memory(Arc::clone(local)), true)
            .map_err(|source| StreamError::Window { stream, source })?;
        self.wrs.clear();
        self.wrs.push(SendWr {
            wr_id,
            signalled,
            op: SendOp::WriteImm {
                rkey: r.rkey,
                remote_addr: r.addr,
                imm_be: imm.to_be(),
            },
            local_addr: l.host_addr,
            len: 0,
            lkey: l.lkey,
        });
        self.post_staged()
    }

    /// Polls until every posted send work request has completed.
    pub fn flush(&mut self, timeout: Duration) -> Result<(), StreamError> {
        let start = Instant::now();
        let mut backoff = Backoff::new();
        while self.window.outstanding() > 0 {
            if self.poll()? > 0 {
                backoff.reset();
            } else if start.elapsed() >= timeout {
                return Err(StreamError::Timeout {
                    stream: self.cfg.index,
                    what: "send completions",
                    waited: start.elapsed(),
                });
            } else {
                backoff.wait();
            }
        }
        Ok(())
    }

    /// Takes the arrivals polled so far.
    pub fn take_arrivals(&mut self) -> Vec<Arrival> {
        self.arrivals.drain(..).collect()
    }

    /// Waits for the next batch whose data is fully placed in our memory.
    pub fn wait_arrival(&mut self, timeout: Duration) -> Result<Arrival, StreamError> {
        let start = Instant::now();
        let mut backoff = Backoff::new();
        loop {
            if let Some(a) = self.arrivals.pop_front() {
                return Ok(a);
            }
            if self.poll()? > 0 {
                backoff.reset();
            } else if start.elapsed() >= timeout {
                return Err(StreamError::Timeout {
                    stream: self.cfg.index,
                    what: "a batch arrival",
                    waited: start.elapsed(),
                });
            } else {
                backoff.wait();
            }
        }
    }

    /// Posts one-sided RDMA READs that fetch `range` of the peer's memory into `slot`. The
    /// peer's CPU is not involved. The slot comes back filled from [`RdmaStream::wait_read`].
    pub fn post_read(
        &mut self,
        remote: &RemoteMap,
        range: GuestRange,
        slot: BounceSlot,
        timeout: Duration,
    ) -> Result<ReadTicket, StreamError> {
        let (max_wr, addr, cap, lkey) = (
            self.cfg.max_wr_bytes,
            slot.addr(),
            slot.capacity() as u64,
            slot.lkey(),
        );
        let len = usize::try_from(range.len).unwrap_or(usize::MAX);
        let pd_key = slot.pd_key();
        let mut slot = Some(slot);
        self.post_split(
            pd_key,
            |pieces| split_read(remote, range, addr, cap, lkey, max_wr, pieces),
            |st, pieces, start| {
                st.post_reads(
                    pieces,
                    range,
                    |last, ticket| match (last, slot.take()) {
                        (true, Some(slot)) => Guard::Read {
                            slot,
                            ticket,
                            gpa: range.gpa,
                            len,
                        },
                        (_, s) => {
                            slot = s;
                            Guard::None
                        }
                    },
                    start + timeout,
                    start,
                )
            },
        )
    }

    /// Posts `pieces` as READs of `range` in one doorbell; `guard(last, ticket)` gives each
    /// work request what it keeps alive (the last one also says where the data went).
    fn post_reads(
        &mut self,
        pieces: &[WrPiece],
        range: GuestRange,
        mut guard: impl FnMut(bool, u64) -> Guard,
        deadline: Instant,
        start: Instant,
    ) -> Result<ReadTicket, StreamError> {
        let stream = self.cfg.index;
        let n = pieces.len();
        // One post, so the window must have room for every piece; a READ of a few pages needs
        // one piece per remote region it touches.
        if n == 0 || n > self.cfg.send_depth {
            return Err(StreamError::Window {
                stream,
                source: WindowError::Full {
                    depth: self.cfg.send_depth,
                },
            });
        }
        self.wait_slots(n, deadline, start)?;
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.wrs.clear();
        for (i, p) in pieces.iter().enumerate() {
            let last = i + 1 == n;
            let info = WrInfo {
                op: WrOp::Read,
                gpa: p.gpa,
                len: p.len,
            };
            let (wr_id, signalled) = self
                .window
                .stage(info, guard(last, ticket), last)
                .map_err(|source| StreamError::Window { stream, source })?;
            self.wrs.push(SendWr {
                wr_id,
                signalled,
                op: SendOp::Read {
                    rkey: p.rkey,
                    remote_addr: p.remote_addr,
                },
                local_addr: p.local_addr,
                len: p.len,
                lkey: p.lkey,
            });
        }
        self.post_staged()?;
        self.stats.bytes_read += range.len;
        Ok(ReadTicket(ticket))
    }

    /// Waits until the READ behind `ticket` (from [`RdmaStream::post_read`]) completed and
    /// returns its filled slot. A ticket of [`RdmaStream::post_read_in_place`] is not waited
    /// for here (it would time out): take those from [`RdmaStream::take_reads`].
    pub fn wait_read(
        &mut self,
        ticket: ReadTicket,
        timeout: Duration,
    ) -> Result<FilledSlot, StreamError> {
        let start = Instant::now();
        let mut backoff = Backoff::new();
        loop {
            let found = self
                .reads_done
                .iter()
                .position(|(t, d)| *t == ticket.0 && matches!(d, ReadDone::Slot(_)));
            if let Some(pos) = found
                && let (_, ReadDone::Slot(slot)) = self.reads_done.swap_remove(pos)
            {
                return Ok(slot);
            }
            if self.poll()? > 0 {
                backoff.reset();
            } else if start.elapsed() >= timeout {
                return Err(StreamError::Timeout {
                    stream: self.cfg.index,
                    what: "an RDMA READ",
                    waited: start.elapsed(),
                });
            } else {
                backoff.wait();
            }
        }
    }

    /// Takes the READs completed so far (polled by [`RdmaStream::poll`] or any wait).
    pub fn take_reads(&mut self) -> Vec<(ReadTicket, ReadDone)> {
        self.reads_done
            .drain(..)
            .map(|(t, d)| (ReadTicket(t), d))
            .collect()
    }

    /// Posts one-sided RDMA READs that fetch `range` of the peer's memory into the same
    /// guest-physical range of `local` (this side's registered memory: no staging buffer).
    /// Completion comes as [`ReadDone::InPlace`] from [`RdmaStream::take_reads`].
    ///
    /// # Safety
    ///
    /// The device writes `range` of `local` until the READ completes or the queue pair is
    /// destroyed: the caller owns those bytes for that long (nothing else writes them, nothing
    /// relies on reading them), as with a receive buffer.
    pub unsafe fn post_read_in_place(
        &mut self,
        local: &Arc<RegisteredMemory>,
        remote: &RemoteMap,
        range: GuestRange,
        timeout: Duration,
    ) -> Result<ReadTicket, StreamError> {
        let max_wr = self.cfg.max_wr_bytes;
        self.post_split(
            local.pd_key(),
            |pieces| split_transfer(local.table(), remote, range, max_wr, pieces),
            |st, pieces, start| {
                st.post_reads(
                    pieces,
                    range,
                    |last, ticket| {
                        if last {
                            Guard::ReadInPlace {
                                memory: Arc::clone(local),
                                ticket,
                                gpa: range.gpa,
                                len: range.len,
                            }
                        } else {
                            Guard::Memory(Arc::clone(local))
                        }
                    },
                    start + timeout,
                    start,
                )
            },
        )
    }

    /// Post-copy demand fetch: READs `range` of the peer's memory into a slot of `pool` and
    /// returns it filled, ready for `UFFDIO_COPY` to `range.gpa`.
    pub fn read_to_bounce(
        &mut self,
        remote: &RemoteMap,
        range: GuestRange,
        pool: &BouncePool,
        timeout: Duration,
    ) -> Result<FilledSlot, StreamError> {
        let slot = pool.try_acquire().ok_or(StreamError::PoolExhausted {
            stream: self.cfg.index,
            slots: pool.slots(),
        })?;
        let start = Instant::now();
        let ticket = self.post_read(remote, range, slot, timeout)?;
        self.wait_read(ticket, timeout.saturating_sub(start.elapsed()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_error_names_stream_op_and_range() {
        let e = CompletionError {
            stream: 2,
            op: CompletionOp::Send(WrOp::WriteImm),
            gpa: 0x20_0000,
            len: 4096,
            wr_id: 17,
            status: WcStatus::RemoteAccess,
            vendor_err: 0x88,
        };
        assert_eq!(
            e.to_string(),
            "Stream 2: write-imm 0x200000+0x1000 (wr_id 0x11) failed with RemoteAccess \
             (vendor 0x88)"
        );
        let s = StreamError::from(e.clone());
        assert_eq!(s.to_string(), e.to_string());
        let f = StreamError::Failed {
            stream: 2,
            status: WcStatus::Other(42),
        };
        assert_eq!(f.to_string(), "Stream 2 already failed with status 42");
    }

    #[test]
    fn backoff_escalates_and_resets() {
        let mut b = Backoff::new();
        for _ in 0..300 {
            b.wait();
        }
        assert!(b.empty >= 300);
        b.reset();
        assert_eq!(b.empty, 0);
    }
}
