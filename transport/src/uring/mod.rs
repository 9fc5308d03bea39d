// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The io_uring backend: one ring per stream, the socket as fixed file 0, guest memory as fixed
//! buffers (one per [`crate::memory::Slice`]), `SEND_ZC` with `buf_index` for large ranges and
//! copying `SEND`/`SENDMSG` for headers and small ranges, `RECV`/`RECVMSG` with `MSG_WAITALL`
//! straight into guest memory (or its alias mapping).
//!
//! This module owns the ring and the completion protocol; it does not interpret frames.
//!
//! # Ordering and batching
//!
//! io_uring does not order independent requests on one socket: a send that finds the socket
//! full is parked and a later one may overtake it. A batch is therefore one *link chain*
//! (`IOSQE_IO_LINK`), and the next batch is submitted only after the previous chain completed
//! (its notifications may still be outstanding). A short completion severs the chain: the kernel
//! cancels the rest, and the stream resubmits the unfinished remainder in order. Runs of
//! consecutive copying sends (or receives) travel as one `SENDMSG` (`RECVMSG`) with an iovec
//! per piece, so a frame of many 4 KiB pages does not become a long chain of tiny requests
//! (each link costs a task-work round trip).
//!
//! # Buffer lifetime
//!
//! A chain's header bytes live in the batch's arena, which is not touched until every CQE of the
//! chain has been reaped. A `SEND_ZC` whose first CQE carries `F_MORE` parks an
//! [`InflightGuard`] until its `F_NOTIF` CQE arrives. Receives always complete (or are
//! cancelled and reaped) before the call that issued them returns. Dropping the stream cancels
//! what is left and waits; notifications held back by a stalled peer are released by aborting
//! the connection (reset, which frees the socket's queued data). If they still never arrive,
//! their guards are leaked so the registration can never be unregistered (see
//! [`crate::memory`]).
//!
//! # Timeouts
//!
//! Waits use `io_uring_enter` with a timeout (`IORING_ENTER_EXT_ARG`). When no completion
//! arrives for [`StreamConfig::timeout`], everything in flight is cancelled (`ASYNC_CANCEL_ANY`)
//! and reaped, and the call fails with [`StreamError::Timeout`].

mod sys;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::types::{CancelBuilder, Fd, Fixed, SubmitArgs, Timespec};
use io_uring::{IoUring, Probe, cqueue, opcode, squeue};

use crate::error::{At, ConnectError, Op, StreamError};
use crate::memory::{GpaRange, InflightGuard, MemoryRegistration, SegmentError, Target};
use crate::socket::Socket;
use crate::splice::{FileReceiver, StreamId, recv_for_stream};
use crate::stream::{ADAPTIVE_ZC_PROBE, DataStream, StreamConfig, StreamStats, ZeroCopy};

const TAG_SHIFT: u32 = 62;
const TAG_SEND: u64 = 0;
const TAG_RECV: u64 = 1;
const TAG_CANCEL: u64 = 2;
const GEN_MASK: u64 = (1 << 30) - 1;

/// Kernel features found by probing the ring, and what the stream does without them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UringCaps {
    /// `SEND_ZC` is available and used for large ranges.
    pub send_zc: bool,
    /// `IORING_SEND_ZC_REPORT_USAGE` is requested (kernel >= 6.2).
    pub report_usage: bool,
    /// Guest memory is registered as fixed buffers.
    pub fixed_buffers: bool,
    /// The socket is a registered (fixed) file.
    pub fixed_file: bool,
    /// `SENDMSG`/`RECVMSG` are available: runs of small copying sends or receives go as one
    /// request with an iovec per op.
    pub msg_ops: bool,
}

#[derive(Debug, Clone, Copy)]
enum Addr {
    /// Offset into the batch's header arena.
    Arena(usize),
    /// Host address (guest memory or the caller's receive buffer).
    Host(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Send,
    SendZc { buf_index: Option<u16> },
    Recv,
}

#[derive(Debug, Clone, Copy)]
struct ChainOp {
    addr: Addr,
    len: u32,
    done: u32,
    kind: Kind,
    at: At,
}

#[derive(Debug, Default)]
struct Batch {
    arena: Vec<u8>,
    ops: Vec<ChainOp>,
    bytes: u64,
    frames: u64,
}

impl Batch {
    fn clear(&mut self) {
        self.arena.clear();
        self.ops.clear();
        self.bytes = 0;
        self.frames = 0;
    }
}

/// One link chain in flight (sends or receives).
#[derive(Debug, Default)]
struct Chain {
    batch: Batch,
    /// Op index ranges `[a, b)` of the submitted requests, by request number.
    groups: Vec<(usize, usize)>,
    /// iovecs and message headers of the multi-op requests.
    msgs: sys::MsgVecs,
    outstanding: usize,
    broken: bool,
    generation: u64,
    error: Option<StreamError>,
}

impl Chain {
    fn incomplete(&self) -> bool {
        self.batch.ops.iter().any(|o| o.done < o.len)
    }

    fn first_incomplete_at(&self) -> At {
        self.batch
            .ops
            .iter()
            .find(|o| o.done < o.len)
            .map_or(At::Stream, |o| o.at)
    }

    fn done_bytes(&self) -> u64 {
        self.batch.ops.iter().map(|o| u64::from(o.done)).sum()
    }

    fn total_bytes(&self) -> u64 {
        self.batch.ops.iter().map(|o| u64::from(o.len)).sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Send,
    Recv,
}

/// A stream over io_uring. See the module docs.
pub struct UringStream {
    // Field order matters: the ring is dropped (and its registrations released) before the
    // socket and before the registration it pins.
    ring: IoUring,
    sock: Socket,
    reg: Arc<MemoryRegistration>,
    index: usize,
    cfg: StreamConfig,
    caps: UringCaps,
    cap: usize,
    pending: Batch,
    send: Chain,
    recv: Chain,
    notifs: HashMap<u64, InflightGuard>,
    failed: bool,
    /// `SEND_ZC` currently used for large ranges (cleared by [`ZeroCopy::Adaptive`]).
    zc_active: bool,
    recv_op: Op,
    stats: StreamStats,
    entries: Vec<squeue::Entry>,
    segs: Vec<(usize, u32, Option<u16>)>,
    /// Pipe for [`Target::File`] receives (blocking `splice` on the socket, outside the ring),
    /// made at first use, when the socket also gets its receive timeout.
    file_rx: Option<FileReceiver>,
}

fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let maj = it.next().and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
    let min = it.next().and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
    (maj, min) >= (major, minor)
}

impl std::fmt::Debug for UringStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringStream")
            .field("index", &self.index)
            .field("peer", &self.sock.peer())
            .field("caps", &self.caps)
            .field("send_outstanding", &self.send.outstanding)
            .field("recv_outstanding", &self.recv.outstanding)
            .field("notifs", &self.notifs.len())
            .field("failed", &self.failed)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl UringStream {
    /// Builds a ring for `socket`, probes opcodes, registers the socket as a fixed file and
    /// `reg`'s slices as fixed buffers (falling back, with a logged reason, when something is
    /// missing), and returns the stream.
    pub fn new(
        socket: Socket,
        index: usize,
        reg: &Arc<MemoryRegistration>,
        config: &StreamConfig,
    ) -> Result<Self, ConnectError> {
        let ring_err = |what, source| ConnectError::Ring {
            stream: index,
            what,
            source,
        };
        let entries = config.ring_entries.clamp(8, 4096);
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .setup_cqsize(entries * 4)
            .build(entries)
            .or_else(|e| {
                tracing::warn!(stream = index, error = %e, "io_uring COOP_TASKRUN unavailable, plain ring");
                IoUring::builder().setup_cqsize(entries * 4).build(entries)
            })
            .map_err(|e| ring_err("create", e))?;
        if !ring.params().is_feature_ext_arg() {
            return Err(ConnectError::Unsupported {
                stream: index,
                what: "IORING_FEAT_EXT_ARG (timed waits)",
            });
        }
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| ring_err("probe", e))?;
        for (code, name) in [
            (opcode::Send::CODE, "IORING_OP_SEND"),
            (opcode::Recv::CODE, "IORING_OP_RECV"),
            (opcode::AsyncCancel::CODE, "IORING_OP_ASYNC_CANCEL"),
        ] {
            if !probe.is_supported(code) {
                return Err(ConnectError::Unsupported {
                    stream: index,
                    what: name,
                });
            }
        }
        let msg_ops =
            probe.is_supported(opcode::SendMsg::CODE) && probe.is_supported(opcode::RecvMsg::CODE);
        if !msg_ops {
            tracing::warn!(
                stream = index,
                "SENDMSG/RECVMSG not supported, no request coalescing"
            );
        }
        let mut send_zc = config.zero_copy != ZeroCopy::Off;
        if send_zc && !probe.is_supported(opcode::SendZc::CODE) {
            tracing::warn!(
                stream = index,
                "IORING_OP_SEND_ZC not supported, using SEND"
            );
            send_zc = false;
        }
        if send_zc && !socket.is_tcp() {
            tracing::info!(
                stream = index,
                "SEND_ZC does not support Unix sockets, using SEND"
            );
            send_zc = false;
        }
        let report_usage = send_zc && kernel_at_least(6, 2);
        if send_zc && !report_usage {
            tracing::warn!(
                stream = index,
                "kernel < 6.2: SEND_ZC copy reports unavailable"
            );
        }
        let fixed_file = match ring.submitter().register_files(&[socket.as_raw_fd()]) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(stream = index, error = %e, "cannot register socket as fixed file");
                false
            }
        };
        let mut fixed_buffers = false;
        if config.fixed_buffers && send_zc {
            // SAFETY: the registration's contract keeps every slice mapped while it exists, and
            // the stream holds an `Arc` of it in a field dropped after the ring.
            match unsafe { sys::register_buffers(&ring, reg.slices()) } {
                Ok(()) => fixed_buffers = true,
                Err(source) => {
                    tracing::warn!(
                        stream = index,
                        slices = reg.slices().len(),
                        bytes = reg.total_len(),
                        error = %source,
                        "registering fixed buffers failed (RLIMIT_MEMLOCK?), SEND_ZC on plain addresses"
                    );
                }
            }
        }
        socket.set_nodelay()?;
        let cap = usize::try_from(ring.params().sq_entries()).unwrap_or(256);
        Ok(Self {
            ring,
            sock: socket,
            reg: Arc::clone(reg),
            index,
            cfg: *config,
            caps: UringCaps {
                send_zc,
                report_usage,
                fixed_buffers,
                fixed_file,
                msg_ops,
            },
            cap,
            pending: Batch::default(),
            send: Chain::default(),
            recv: Chain::default(),
            notifs: HashMap::new(),
            failed: false,
            zc_active: send_zc,
            recv_op: Op::RecvPayload,
            stats: StreamStats::default(),
            entries: Vec::with_capacity(cap),
            segs: Vec::new(),
            file_rx: None,
        })
    }

    /// What the probe found and what the stream uses.
    pub fn caps(&self) -> UringCaps {
        self.caps
    }

    fn peer_string(&self) -> String {
        self.sock.peer().to_owned()
    }

    fn closed_err(&self) -> StreamError {
        StreamError::Closed {
            stream: self.index,
            peer: self.peer_string(),
        }
    }

    /// [`Target::File`] receives: blocking `splice` on the socket (see `crate::splice`), with
    /// the stall timeout as the socket's receive timeout. No ring operation is in flight on the
    /// receive side between calls, so the byte order of the stream is kept.
    fn recv_file(&mut self, ranges: &[GpaRange]) -> Result<(), StreamError> {
        if self.file_rx.is_none()
            && let Err(e) = rustix::net::sockopt::set_socket_timeout(
                self.sock.as_fd(),
                rustix::net::sockopt::Timeout::Recv,
                Some(self.cfg.timeout),
            )
        {
            self.failed = true;
            return Err(StreamError::Io {
                stream: self.index,
                peer: self.peer_string(),
                op: Op::RecvPayload,
                at: At::Stream,
                source: e.into(),
            });
        }
        let id = StreamId {
            index: self.index,
            peer: self.sock.peer(),
            timeout: self.cfg.timeout,
        };
        let res = recv_for_stream(
            &mut self.file_rx,
            self.sock.as_fd(),
            &self.reg,
            ranges,
            &mut self.stats,
            &id,
        );
        res.map_err(|(e, lost)| {
            self.failed |= lost;
            e
        })
    }

    fn check_open(&self) -> Result<(), StreamError> {
        if self.failed {
            Err(self.closed_err())
        } else {
            Ok(())
        }
    }

    fn range_err(&self, e: SegmentError<std::convert::Infallible>) -> StreamError {
        match e {
            SegmentError::Range(source) => StreamError::Range {
                stream: self.index,
                peer: self.peer_string(),
                source,
            },
            SegmentError::Inner(never) => match never {},
        }
    }

    /// Collects the (split) segments of `range` into `self.segs`.
    fn collect_segments(&mut self, range: GpaRange, target: Target) -> Result<(), StreamError> {
        self.segs.clear();
        let max = self.cfg.max_sqe_bytes.max(4096);
        let segs = &mut self.segs;
        let res = self.reg.for_each_segment(range, target, |seg| {
            let mut off = 0u32;
            while off < seg.len {
                let len = max.min(seg.len - off);
                segs.push((seg.host_addr + off as usize, len, seg.buf_index));
                off += len;
            }
            Ok(())
        });
        res.map_err(|e| self.range_err(e))
    }

    fn chain(&mut self, which: Which) -> &mut Chain {
        match which {
            Which::Send => &mut self.send,
            Which::Recv => &mut self.recv,
        }
    }

    /// Builds and submits SQEs for every unfinished op of the chain, linked in order.
    fn submit_chain(&mut self, which: Which) -> Result<(), StreamError> {
        let use_fixed = self.caps.fixed_file;
        let wait_all = self.cfg.wait_all;
        let report = self.caps.report_usage;
        let raw_fd = self.sock.as_raw_fd();
        let tag = match which {
            Which::Send => TAG_SEND,
            Which::Recv => TAG_RECV,
        };
        let coalesce = self.caps.msg_ops;
        let max_group = self.cfg.max_sqe_bytes.max(4096);
        let mut entries = std::mem::take(&mut self.entries);
        entries.clear();
        let chain = self.chain(which);
        chain.generation = (chain.generation + 1) & GEN_MASK;
        chain.broken = false;
        let arena = chain.batch.arena.as_ptr() as usize;
        let op_ptr = |op: &ChainOp| {
            let base = match op.addr {
                Addr::Arena(off) => arena + off,
                Addr::Host(a) => a,
            };
            base + op.done as usize
        };
        // Pass 1: group the unfinished ops. Consecutive copying sends (headers, small ranges)
        // or receives become one SENDMSG/RECVMSG with an iovec each: long link chains of tiny
        // requests cost a task-work round per link. Zero-copy sends stay single (each has its
        // own fixed buffer and notification).
        chain.groups.clear();
        let ops = &chain.batch.ops;
        let mut i = ops.iter().position(|o| o.done < o.len).unwrap_or(ops.len());
        while i < ops.len() {
            let kind = ops[i].kind;
            let mut j = i + 1;
            let mut bytes = u64::from(ops[i].len - ops[i].done);
            if coalesce && matches!(kind, Kind::Send | Kind::Recv) {
                while j < ops.len()
                    && ops[j].kind == kind
                    && j - i < sys::MAX_GROUP_IOVECS
                    && bytes + u64::from(ops[j].len) <= u64::from(max_group)
                {
                    bytes += u64::from(ops[j].len - ops[j].done);
                    j += 1;
                }
            }
            chain.groups.push((i, j));
            i = j;
            // Without MSG_WAITALL a short completion does not sever a link chain (the kernel
            // only fails a request that moved less than its minimum, which is 0 then), so the
            // next request would run after a gap: submit one group at a time instead.
            if !wait_all {
                break;
            }
        }
        // Pass 2: iovecs and message headers for multi-op groups. Both vectors are complete
        // before any pointer into them is taken, and stay untouched until the chain is reaped.
        chain.msgs.clear();
        for &(a, b) in &chain.groups {
            if b - a > 1 {
                let first = chain.msgs.iov.len();
                for op in &ops[a..b] {
                    chain
                        .msgs
                        .iov
                        .push(sys::iovec(op_ptr(op), (op.len - op.done) as usize));
                }
                chain.msgs.spans.push((first, b - a));
            }
        }
        chain.msgs.build_headers();
        let mut zc = 0u64;
        let mut msg_no = 0;
        let waitall = if wait_all { libc::MSG_WAITALL } else { 0 };
        let flags = libc::MSG_NOSIGNAL | waitall;
        for (g, &(a, b)) in chain.groups.iter().enumerate() {
            let op = &ops[a];
            let ud = (tag << TAG_SHIFT) | (chain.generation << 32) | g as u64;
            macro_rules! with_fd {
                ($build:expr) => {
                    if use_fixed {
                        let fd = Fixed(0);
                        $build(fd)
                    } else {
                        let fd = Fd(raw_fd);
                        $build(fd)
                    }
                };
            }
            let e = if b - a > 1 {
                let msg = chain.msgs.header(msg_no);
                msg_no += 1;
                match op.kind {
                    Kind::Recv => {
                        with_fd!(|fd| opcode::RecvMsg::new(fd, msg)
                            .flags(waitall.cast_unsigned())
                            .build())
                    }
                    _ => with_fd!(|fd| opcode::SendMsg::new(fd, msg.cast_const())
                        .flags(flags.cast_unsigned())
                        .build()),
                }
            } else {
                let ptr = op_ptr(op) as *mut u8;
                let len = op.len - op.done;
                match op.kind {
                    Kind::Send => with_fd!(|fd| opcode::Send::new(fd, ptr.cast_const(), len)
                        .flags(flags)
                        .build()),
                    Kind::SendZc { buf_index } => {
                        zc += 1;
                        with_fd!(|fd| opcode::SendZc::new(fd, ptr.cast_const(), len)
                            .buf_index(buf_index)
                            .flags(flags)
                            .zc_flags(if report { sys::SEND_ZC_REPORT_USAGE } else { 0 })
                            .build())
                    }
                    Kind::Recv => {
                        with_fd!(|fd| opcode::Recv::new(fd, ptr, len).flags(waitall).build())
                    }
                }
            };
            entries.push(e.user_data(ud));
        }
        if entries.is_empty() {
            self.entries = entries;
            return Ok(());
        }
        // Link every entry to the next; the last one ends the chain. (Not `clear_flags`: that
        // would also drop IOSQE_FIXED_FILE.)
        let n = entries.len();
        for e in &mut entries[..n - 1] {
            *e = e.clone().flags(squeue::Flags::IO_LINK);
        }
        chain.outstanding += n;
        {
            let mut sq = self.ring.submission();
            // SAFETY: header bytes live in the chain's arena and receive buffers are borrowed by
            // the current call; neither is touched or freed until every CQE of the chain was
            // reaped (`drive` returns only then; `Drop` waits or leaks). Guest memory is kept
            // mapped by `self.reg`, and zero-copy sends park an `InflightGuard` until their
            // notification. The fixed file and buffers belong to this ring.
            let pushed = unsafe { sys::push_all(&mut sq, &entries) };
            drop(sq);
            if pushed.is_err() {
                // Cannot happen: a chain never exceeds the SQ size and the SQ is drained by
                // every submit. Report instead of panicking.
                self.chain(which).outstanding -= n;
                self.entries = entries;
                return Err(StreamError::Io {
                    stream: self.index,
                    peer: self.peer_string(),
                    op: Op::Send,
                    at: At::Stream,
                    source: io::Error::other("submission queue full"),
                });
            }
        }
        self.entries = entries;
        self.stats.sqes += n as u64;
        self.stats.zc_sends += zc;
        self.stats.submits += 1;
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) =>
                {
                    self.reap();
                }
                Err(source) => {
                    // Nothing was consumed; forget the ops so the stream can fail cleanly.
                    self.failed = true;
                    return Err(StreamError::Io {
                        stream: self.index,
                        peer: self.peer_string(),
                        op: if which == Which::Send {
                            Op::Send
                        } else {
                            Op::RecvPayload
                        },
                        at: At::Stream,
                        source,
                    });
                }
            }
        }
    }

    /// Processes every available CQE.
    fn reap(&mut self) {
        let mut cqes: Vec<(u64, i32, u32)> = Vec::new();
        {
            let mut cq = self.ring.completion();
            cq.sync();
            for cqe in &mut cq {
                cqes.push((cqe.user_data(), cqe.result(), cqe.flags()));
            }
        }
        for (ud, res, flags) in cqes {
            self.on_cqe(ud, res, flags);
        }
    }

    fn on_cqe(&mut self, ud: u64, res: i32, flags: u32) {
        let tag = ud >> TAG_SHIFT;
        if tag == TAG_CANCEL {
            return;
        }
        if cqueue::notif(flags) {
            self.stats.zc_notifs += 1;
            if res.cast_unsigned() & sys::NOTIF_USAGE_ZC_COPIED != 0 {
                self.stats.zc_copied += 1;
            }
            if self.notifs.remove(&ud).is_none() {
                tracing::warn!(stream = self.index, ud, "notification for unknown SEND_ZC");
            }
            if self.zc_active
                && self.cfg.zero_copy == ZeroCopy::Adaptive
                && self.caps.report_usage
                && self.stats.zc_notifs == ADAPTIVE_ZC_PROBE
                && self.stats.zc_copied == self.stats.zc_notifs
            {
                tracing::info!(
                    stream = self.index,
                    peer = self.sock.peer(),
                    "kernel copied every SEND_ZC so far (loopback?); switching to SEND"
                );
                self.zc_active = false;
            }
            return;
        }
        if cqueue::more(flags) {
            self.notifs.insert(ud, InflightGuard::new(&self.reg));
        }
        let (which, op) = if tag == TAG_RECV {
            (Which::Recv, self.recv_op)
        } else {
            (Which::Send, Op::Send)
        };
        let index = self.index;
        let peer = self.sock.peer().to_owned();
        let generation = (ud >> 32) & GEN_MASK;
        let idx = usize::try_from(ud & 0xffff_ffff).unwrap_or(usize::MAX);
        let chain = self.chain(which);
        if generation != chain.generation || idx >= chain.groups.len() {
            tracing::warn!(stream = index, ud, "stale completion");
            return;
        }
        chain.outstanding = chain.outstanding.saturating_sub(1);
        let expected = chain.total_bytes();
        let received = chain.done_bytes();
        let (a, b) = chain.groups[idx];
        let Some(first) = chain.batch.ops[a..b].iter().find(|o| o.done < o.len) else {
            return;
        };
        let (at, kind) = (first.at, first.kind);
        if res > 0 {
            let mut n = res.cast_unsigned();
            let moved = n;
            for o in &mut chain.batch.ops[a..b] {
                let take = n.min(o.len - o.done);
                o.done += take;
                n -= take;
            }
            if chain.batch.ops[a..b].iter().any(|o| o.done < o.len) {
                chain.broken = true;
                self.stats.resubmits += 1;
            }
            match which {
                Which::Send => self.stats.bytes_sent += u64::from(moved - n),
                Which::Recv => self.stats.bytes_received += u64::from(moved - n),
            }
        } else if res == 0 {
            if chain.error.is_none() {
                chain.error = Some(if kind == Kind::Recv {
                    StreamError::PeerClosed {
                        stream: index,
                        peer,
                        received,
                        expected,
                        at,
                    }
                } else {
                    StreamError::Io {
                        stream: index,
                        peer,
                        op,
                        at,
                        source: io::Error::from(io::ErrorKind::WriteZero),
                    }
                });
            }
        } else if res == -libc::ECANCELED {
            // Severed chain (a short op before it) or our own cancel after a timeout.
            chain.broken = true;
        } else if chain.error.is_none() {
            chain.error = Some(StreamError::Io {
                stream: index,
                peer,
                op,
                at,
                source: io::Error::from_raw_os_error(-res),
            });
        }
    }

    /// Waits for at least one CQE or `timeout`; `Ok(false)` on timeout.
    fn wait(&mut self, timeout: Duration) -> Result<bool, io::Error> {
        let ts = Timespec::from(timeout);
        let args = SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(false),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => Ok(true),
            Err(e) => Err(e),
        }
    }

    fn busy(&self) -> bool {
        self.send.outstanding > 0 || self.recv.outstanding > 0
    }

    /// Cancels everything in flight and waits for it to be reaped; shuts the socket down if
    /// cancellation alone does not finish it.
    fn cancel_all(&mut self) {
        self.failed = true;
        let e = opcode::AsyncCancel2::new(CancelBuilder::any())
            .build()
            .user_data(TAG_CANCEL << TAG_SHIFT);
        {
            let mut sq = self.ring.submission();
            // SAFETY: a cancel request references no memory.
            let _ = unsafe { sys::push_all(&mut sq, std::slice::from_ref(&e)) };
        }
        let _ = self.ring.submit();
        let mut shut = false;
        let mut deadline = Instant::now() + self.cfg.timeout;
        loop {
            self.reap();
            if !self.busy() {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                if shut {
                    tracing::error!(
                        stream = self.index,
                        "io_uring ops survive cancel and shutdown; still waiting"
                    );
                } else {
                    let _ = self.sock.abort();
                    shut = true;
                }
                deadline = Instant::now() + self.cfg.timeout;
                continue;
            }
            if self.wait(left.min(Duration::from_millis(100))).is_err() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Drives chain `which` to completion: reaps, resubmits severed remainders, and turns a
    /// stall into a timeout.
    fn drive(&mut self, which: Which, op: Op) -> Result<(), StreamError> {
        let mut last_progress = Instant::now();
        loop {
            self.reap();
            let c = self.chain(which);
            if c.outstanding == 0 {
                if let Some(e) = c.error.take() {
                    c.batch.clear();
                    self.failed = true;
                    if self.busy() {
                        self.cancel_all();
                    }
                    return Err(e);
                }
                if c.incomplete() {
                    if self.failed {
                        self.chain(which).batch.clear();
                        return Err(self.closed_err());
                    }
                    self.submit_chain(which)?;
                    continue;
                }
                c.batch.clear();
                return Ok(());
            }
            let elapsed = last_progress.elapsed();
            if elapsed >= self.cfg.timeout {
                let at = self.chain(which).first_incomplete_at();
                self.cancel_all();
                let e = StreamError::Timeout {
                    stream: self.index,
                    peer: self.peer_string(),
                    op,
                    timeout: self.cfg.timeout,
                    at,
                };
                self.send.batch.clear();
                self.recv.batch.clear();
                self.send.error = None;
                self.recv.error = None;
                return Err(e);
            }
            match self.wait(self.cfg.timeout - elapsed) {
                Ok(true) => last_progress = Instant::now(),
                Ok(false) => {}
                Err(source) => {
                    self.cancel_all();
                    return Err(StreamError::Io {
                        stream: self.index,
                        peer: self.peer_string(),
                        op,
                        at: At::Stream,
                        source,
                    });
                }
            }
        }
    }

    /// Submits the queued batch (after the in-flight one completed).
    fn submit_pending(&mut self) -> Result<(), StreamError> {
        if self.pending.ops.is_empty() {
            return Ok(());
        }
        self.drive(Which::Send, Op::Send)?;
        std::mem::swap(&mut self.send.batch, &mut self.pending);
        self.pending.clear();
        let frames = self.send.batch.frames;
        self.submit_chain(Which::Send)?;
        self.stats.frames_sent += frames;
        Ok(())
    }

    fn push_pending(&mut self, op: ChainOp) -> Result<(), StreamError> {
        if self.pending.ops.len() >= self.cap {
            self.submit_pending()?;
        }
        self.pending.bytes += u64::from(op.len);
        self.pending.ops.push(op);
        Ok(())
    }

    /// Receives into the ops placed in `self.recv.batch`.
    fn run_recv(&mut self, op: Op) -> Result<(), StreamError> {
        self.recv_op = op;
        let all = std::mem::take(&mut self.recv.batch.ops);
        let total: u64 = all.iter().map(|o| u64::from(o.len)).sum();
        let mut before = 0u64;
        let res = (|| {
            for chunk in all.chunks(self.cap) {
                self.recv.batch.ops.clear();
                self.recv.batch.ops.extend_from_slice(chunk);
                self.submit_chain(Which::Recv)?;
                self.drive(Which::Recv, op)?;
                before += chunk.iter().map(|o| u64::from(o.len)).sum::<u64>();
            }
            Ok(())
        })();
        self.recv.batch.clear();
        // The chain counts only its own chunk; report the whole call.
        res.map_err(|e| match e {
            StreamError::PeerClosed {
                stream,
                peer,
                received,
                at,
                ..
            } => StreamError::PeerClosed {
                stream,
                peer,
                received: before + received,
                expected: total,
                at,
            },
            other => other,
        })
    }

    /// Waits until every `SEND_ZC` notification arrived.
    fn wait_notifs(&mut self) -> Result<(), StreamError> {
        let mut last_progress = Instant::now();
        loop {
            self.reap();
            if self.notifs.is_empty() {
                return Ok(());
            }
            let elapsed = last_progress.elapsed();
            if elapsed >= self.cfg.timeout {
                self.failed = true;
                return Err(StreamError::Timeout {
                    stream: self.index,
                    peer: self.peer_string(),
                    op: Op::Flush,
                    timeout: self.cfg.timeout,
                    at: At::Stream,
                });
            }
            match self.wait(self.cfg.timeout - elapsed) {
                Ok(true) => last_progress = Instant::now(),
                Ok(false) => {}
                Err(source) => {
                    self.failed = true;
                    return Err(StreamError::Io {
                        stream: self.index,
                        peer: self.peer_string(),
                        op: Op::Flush,
                        at: At::Stream,
                        source,
                    });
                }
            }
        }
    }
}

impl DataStream for UringStream {
    fn index(&self) -> usize {
        self.index
    }

    fn peer(&self) -> &str {
        self.sock.peer()
    }

    fn backend(&self) -> &'static str {
        "uring"
    }

    fn send_frame(&mut self, header: &[u8], ranges: &[GpaRange]) -> Result<(), StreamError> {
        self.check_open()?;
        if !header.is_empty() {
            let len = u32::try_from(header.len()).map_err(|_| StreamError::Io {
                stream: self.index,
                peer: self.peer_string(),
                op: Op::Send,
                at: At::Header,
                source: io::Error::from(io::ErrorKind::InvalidInput),
            })?;
            if self.pending.ops.len() >= self.cap {
                self.submit_pending()?;
            }
            let off = self.pending.arena.len();
            self.pending.arena.extend_from_slice(header);
            self.push_pending(ChainOp {
                addr: Addr::Arena(off),
                len,
                done: 0,
                kind: Kind::Send,
                at: At::Header,
            })?;
        }
        for &range in ranges {
            self.collect_segments(range, Target::Guest)?;
            let segs = std::mem::take(&mut self.segs);
            let mut res = Ok(());
            for &(addr, len, buf_index) in &segs {
                let kind = if self.zc_active && len >= self.cfg.zc_threshold {
                    Kind::SendZc {
                        buf_index: if self.caps.fixed_buffers {
                            buf_index
                        } else {
                            None
                        },
                    }
                } else {
                    Kind::Send
                };
                res = self.push_pending(ChainOp {
                    addr: Addr::Host(addr),
                    len,
                    done: 0,
                    kind,
                    at: At::Range(range),
                });
                if res.is_err() {
                    break;
                }
            }
            self.segs = segs;
            res?;
        }
        self.pending.frames += 1;
        if self.pending.bytes >= self.cfg.batch_bytes {
            self.submit_pending()?;
        }
        Ok(())
    }

    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<(), StreamError> {
        self.check_open()?;
        let len = u32::try_from(buf.len()).map_err(|_| StreamError::Io {
            stream: self.index,
            peer: self.peer_string(),
            op: Op::RecvHeader,
            at: At::Header,
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
        if len == 0 {
            return Ok(());
        }
        self.recv.batch.clear();
        self.recv.batch.ops.push(ChainOp {
            addr: Addr::Host(buf.as_mut_ptr() as usize),
            len,
            done: 0,
            kind: Kind::Recv,
            at: At::Header,
        });
        self.run_recv(Op::RecvHeader)
    }

    fn recv_into(&mut self, ranges: &[GpaRange], target: Target) -> Result<(), StreamError> {
        self.check_open()?;
        if target == Target::File {
            return self.recv_file(ranges);
        }
        self.recv.batch.clear();
        let mut ops = std::mem::take(&mut self.recv.batch.ops);
        for &range in ranges {
            if let Err(e) = self.collect_segments(range, target) {
                self.recv.batch.ops = ops;
                return Err(e);
            }
            ops.extend(self.segs.iter().map(|&(addr, len, _)| ChainOp {
                addr: Addr::Host(addr),
                len,
                done: 0,
                kind: Kind::Recv,
                at: At::Range(range),
            }));
        }
        self.recv.batch.ops = ops;
        self.run_recv(Op::RecvPayload)
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        self.check_open()?;
        self.submit_pending()?;
        self.drive(Which::Send, Op::Flush)?;
        self.wait_notifs()
    }

    fn shutdown(&mut self) -> Result<(), StreamError> {
        self.check_open()?;
        let flushed = self.flush();
        self.failed = true;
        let shut = self.sock.shutdown();
        flushed?;
        match shut {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
            Err(source) => Err(StreamError::Io {
                stream: self.index,
                peer: self.peer_string(),
                op: Op::Shutdown,
                at: At::Stream,
                source,
            }),
        }
    }

    fn stats(&self) -> StreamStats {
        self.stats
    }
}

impl Drop for UringStream {
    fn drop(&mut self) {
        if self.busy() {
            self.cancel_all();
        }
        if self.notifs.is_empty() {
            return;
        }
        // Notifications arrive once TCP released the pages, i.e. after the peer acknowledged
        // the data. A stalled or vanished peer never does: abort the connection (reset, purge
        // the send and retransmit queues), which releases them promptly.
        let mut deadline = Instant::now() + self.cfg.timeout.min(Duration::from_secs(1));
        let mut aborted = false;
        while !self.notifs.is_empty() {
            self.reap();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                if aborted {
                    break;
                }
                if let Err(e) = self.sock.abort() {
                    tracing::warn!(stream = self.index, error = %e, "cannot abort connection");
                }
                aborted = true;
                deadline = Instant::now() + self.cfg.timeout;
                continue;
            }
            let _ = self.wait(left.min(Duration::from_millis(50)));
        }
        if !self.notifs.is_empty() {
            tracing::error!(
                stream = self.index,
                pending = self.notifs.len(),
                "SEND_ZC notifications never arrived; leaking their guards so the memory stays registered"
            );
            let notifs = std::mem::take(&mut self.notifs);
            std::mem::forget(notifs);
        }
    }
}

#[cfg(test)]
// Test pattern bytes and page-sized lengths: truncation is intended or impossible.
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::memory::{GuestRegion, RegistrationConfig};

    const PAGE: usize = 4096;

    fn ud(generation: u64, i: u64) -> u64 {
        (TAG_SEND << TAG_SHIFT) | (generation << 32) | i
    }

    /// Injects the completions of a severed chain (a short send, then two cancelled ones) and
    /// checks that the stream resubmits exactly the unsent remainder, in order.
    #[test]
    fn severed_chain_resubmits_remainder_in_order() {
        let mut mem: Vec<u8> = (0..3 * PAGE).map(|i| (i * 7 + i / 251) as u8).collect();
        let base = mem.as_mut_ptr();
        let region = GuestRegion::new(0x10_0000, base, (3 * PAGE) as u64);
        // SAFETY: `mem` outlives the registration and the stream (both dropped first below).
        let reg =
            unsafe { MemoryRegistration::new(&[region], RegistrationConfig { slice_size: 4096 }) }
                .unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let cfg = StreamConfig {
            timeout: Duration::from_secs(5),
            ..StreamConfig::default()
        };
        let mut s = match UringStream::new(Socket::Unix(a, "pair".into()), 4, &reg, &cfg) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("skipping: io_uring unavailable: {e}");
                return;
            }
        };
        let op = |i: usize| ChainOp {
            addr: Addr::Host(base as usize + i * PAGE),
            len: PAGE as u32,
            done: 0,
            kind: Kind::Send,
            at: At::Range(GpaRange::new(0x10_0000 + (i * PAGE) as u64, PAGE as u64)),
        };
        // As if a three-op chain with generation 5 had been submitted.
        s.send.batch.ops = vec![op(0), op(1), op(2)];
        s.send.groups = vec![(0, 1), (1, 2), (2, 3)];
        s.send.generation = 5;
        s.send.outstanding = 3;
        s.on_cqe(ud(5, 0), 1000, 0);
        s.on_cqe(ud(5, 1), -libc::ECANCELED, 0);
        // A completion from another generation is ignored.
        s.on_cqe(ud(4, 2), 4096, 0);
        assert_eq!(s.send.outstanding, 1);
        s.on_cqe(ud(5, 2), -libc::ECANCELED, 0);
        assert!(s.send.broken);
        assert_eq!(s.send.outstanding, 0);
        assert_eq!(s.stats.resubmits, 1);
        assert_eq!(s.send.batch.ops[0].done, 1000);
        s.drive(Which::Send, Op::Send).unwrap();
        assert_eq!(s.send.generation, 6);
        // The remainder went as one SENDMSG of three iovecs, the first starting mid-page.
        assert_eq!(s.stats.sqes, 1);
        let mut got = vec![0u8; 3 * PAGE - 1000];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got[..], &mem[1000..]);
        assert_eq!(s.stats.bytes_sent, 1000 + got.len() as u64);

        // A hard error fails the call with its range and closes the stream.
        s.send.batch.ops = vec![op(1)];
        s.send.groups = vec![(0, 1)];
        s.send.outstanding = 1;
        let g = s.send.generation;
        s.on_cqe(ud(g, 0), -libc::EPIPE, 0);
        let err = s.drive(Which::Send, Op::Send).unwrap_err();
        match &err {
            StreamError::Io {
                stream: 4,
                op: Op::Send,
                at: At::Range(r),
                source,
                ..
            } => {
                assert_eq!(*r, GpaRange::new(0x10_0000 + PAGE as u64, PAGE as u64));
                assert_eq!(source.raw_os_error(), Some(libc::EPIPE));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.is_peer_gone());
        assert!(matches!(
            s.send_frame(b"x", &[]),
            Err(StreamError::Closed { stream: 4, .. })
        ));
        drop(s);
        drop(reg);
        drop(mem);
    }

    #[test]
    fn kernel_version_parse() {
        assert!(kernel_at_least(2, 6));
        assert!(!kernel_at_least(999, 0));
    }
}
