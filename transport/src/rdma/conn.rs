// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Connection setup with rdmacm: a listener (bind, listen, take connect requests, accept each
//! with our own queue pair) and a connector (resolve address, resolve route, connect,
//! establish), giving an [`RdmaConnection`] of N bulk streams plus one urgent stream, each an RC
//! queue pair with its own completion queue, all on one protection domain.
//!
//! Owns: [`ConnectOptions`] and their clamping to the device ([`QueueSizing`]), the rdmacm event
//! handling with timeouts, the queue-pair state transitions (access flags by [`Role`], READ
//! depth), and the connection's lifetime rules: registrations exposed to the peer stay alive
//! until every queue pair of the connection is destroyed.
//!
//! Stream identity: the connector connects the streams one after another (bulk 0..N, then the
//! urgent one) and waits for each to be established before starting the next, and the listener
//! accepts them in that order, so index `i` names the same queue pair on both sides. A listener
//! therefore serves one peer at a time.
//!
//! READ depth: rdmacm negotiates one outstanding RDMA READ per queue pair by default (sideway's
//! `ConnectionParameter` does not expose `responder_resources`/`initiator_depth`). Both sides
//! raise it to [`ConnectOptions::read_depth`], clamped to their device, when moving the queue
//! pair to RTR/RTS; both peers must use the same value (carry it in the handshake).
//!
//! Not owned: the authenticated handshake that carries the rkey descriptors (ferry-protocol and
//! the engine); this module hands out and accepts them as `RemoteRegion` lists.

use std::collections::VecDeque;
use std::error::Error as StdError;
use std::fmt;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::completion::GenericCompletionQueue;
use sideway::ibverbs::device::DeviceInfo;
use sideway::ibverbs::device_context::DeviceContext;
use sideway::ibverbs::queue_pair::{
    GenericQueuePair, QueuePair, QueuePairState, SendOperationFlags,
};
use sideway::rdmacm::communication_manager::{
    ConnectionParameter, Event, EventChannel, EventType, GetEventErrorKind, Identifier, PortSpace,
};
use thiserror::Error;

use super::device::{self, DeviceError, DeviceLimits};
use super::memory::{RdmaPd, RegisteredMemory, Role};
use super::region::RemoteRegion;
use super::stream::{RdmaStream, StreamConfig, StreamError, StreamKind, VerbsQueue};
use super::sys;

/// How a connection is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Which side we are; decides queue-pair access flags and whether receives are posted.
    pub role: Role,
    /// Bulk streams (at least 1).
    pub streams: usize,
    /// Add the urgent stream for post-copy demand fetches.
    pub urgent: bool,
    /// Send-queue depth per queue pair (clamped to the device's `max_qp_wr`).
    pub send_depth: u32,
    /// Receives kept posted per queue pair on the destination (clamped likewise).
    pub recv_depth: u32,
    /// Signal at least every this many send work requests.
    pub signal_every: u32,
    /// Largest single work request in bytes; ranges are split at this size.
    pub max_wr_bytes: u32,
    /// Outstanding RDMA READs per queue pair (clamped to the device, at least 1).
    pub read_depth: u8,
    /// Bound on each setup step (address and route resolution, each connect and accept).
    pub timeout: Duration,
}

impl ConnectOptions {
    /// Defaults for `role`: 2 bulk streams plus the urgent one, 256-deep send queues, 128
    /// receives, a signal every 16 work requests, 1 MiB work requests, READ depth 16, 5 s steps.
    pub fn new(role: Role) -> Self {
        Self {
            role,
            streams: 2,
            urgent: true,
            send_depth: 256,
            recv_depth: 128,
            signal_every: 16,
            max_wr_bytes: 1 << 20,
            read_depth: 16,
            timeout: Duration::from_secs(5),
        }
    }
}

/// Queue sizes after clamping the options to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSizing {
    /// Send work requests per queue pair.
    pub send_depth: u32,
    /// Receive work requests per queue pair.
    pub recv_depth: u32,
    /// Completion-queue entries (send + receive, so it cannot overrun).
    pub cqe: u32,
    /// Signal interval.
    pub signal_every: u32,
    /// Outstanding READs.
    pub read_depth: u8,
    /// Work-request size limit.
    pub max_wr_bytes: u32,
}

/// Clamps `opts` to `limits`.
pub fn size_queues(
    opts: &ConnectOptions,
    limits: &DeviceLimits,
) -> Result<QueueSizing, ConnectError> {
    if opts.streams == 0 {
        return Err(ConnectError::Options {
            what: "streams must be at least 1",
        });
    }
    if opts.send_depth == 0 || opts.max_wr_bytes == 0 {
        return Err(ConnectError::Options {
            what: "send_depth and max_wr_bytes must be non-zero",
        });
    }
    let max_wr = limits.max_qp_wr.max(1);
    let mut send_depth = opts.send_depth.min(max_wr);
    let mut recv_depth = match opts.role {
        Role::Destination => opts.recv_depth.clamp(1, max_wr),
        // The source never receives; one slot keeps the queue pair valid on every provider.
        Role::Source => 1,
    };
    let max_cqe = limits.max_cqe.max(2);
    if send_depth + recv_depth > max_cqe {
        let total = send_depth + recv_depth;
        let scaled = u64::from(send_depth) * u64::from(max_cqe) / u64::from(total);
        send_depth = u32::try_from(scaled)
            .unwrap_or(max_cqe - 1)
            .clamp(1, max_cqe - 1);
        recv_depth = (max_cqe - send_depth).max(1);
    }
    let device_reads = limits.max_qp_rd_atom.min(limits.max_qp_init_rd_atom).max(1);
    Ok(QueueSizing {
        send_depth,
        recv_depth,
        cqe: send_depth + recv_depth,
        signal_every: opts.signal_every.clamp(1, send_depth),
        read_depth: opts.read_depth.clamp(1, device_reads),
        max_wr_bytes: opts.max_wr_bytes,
    })
}

/// A connection could not be set up or driven.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// The options are unusable.
    #[error("Invalid RDMA options: {what}")]
    Options {
        /// What is wrong.
        what: &'static str,
    },
    /// An rdmacm or verbs call failed.
    #[error("RDMA {step} failed (stream {stream})")]
    Verbs {
        /// The call.
        step: &'static str,
        /// Stream index being set up.
        stream: usize,
        /// The library error.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// rdmacm reported an error event, or an event out of order.
    #[error("RDMA {step}: got {event} (status {status}) for stream {stream} with {peer}")]
    Event {
        /// The step waiting.
        step: &'static str,
        /// The event received.
        event: String,
        /// Its status (negative errno for most errors, the reject reason for rejects).
        status: i32,
        /// Stream index.
        stream: usize,
        /// The peer address (ours for a listener).
        peer: SocketAddr,
    },
    /// An rdmacm step did not finish in time.
    #[error("RDMA {step} timed out after {waited:?} (stream {stream}, {peer})")]
    Timeout {
        /// The step.
        step: &'static str,
        /// Stream index.
        stream: usize,
        /// Peer (ours for a listener).
        peer: SocketAddr,
        /// How long.
        waited: Duration,
    },
    /// The address resolved to no RDMA device.
    #[error("No RDMA device routes to {peer}")]
    NoDeviceForRoute {
        /// The peer address.
        peer: SocketAddr,
    },
    /// Streams of one connection resolved to different devices.
    #[error("Stream {stream} resolved to another RDMA device than stream 0")]
    DeviceMismatch {
        /// Stream index.
        stream: usize,
    },
    /// Querying the device or allocating the protection domain failed.
    #[error("RDMA device setup failed")]
    Device(#[from] DeviceError),
    /// Posting the initial receives failed.
    #[error("RDMA stream setup failed")]
    Stream(#[from] StreamError),
    /// The registration belongs to another protection domain than the connection's.
    #[error("Registration is not on this connection's protection domain")]
    ForeignRegistration,
}

fn verbs<E: StdError + Send + Sync + 'static>(
    step: &'static str,
    stream: usize,
) -> impl FnOnce(E) -> ConnectError {
    move |e| ConnectError::Verbs {
        step,
        stream,
        source: Box::new(e),
    }
}

/// An rdmacm event that arrived on a live connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnEvent {
    /// The peer (or we) disconnected this stream.
    Disconnected {
        /// Stream index.
        stream: usize,
    },
    /// The RDMA device went away.
    DeviceRemoval,
    /// Any other event, by name.
    Other(String),
}

/// State shared by a connection and its streams; dropped after the last queue pair.
struct ConnShared {
    /// Registrations the peer may access; kept until every queue pair is destroyed.
    exposed: Mutex<Vec<Arc<RegisteredMemory>>>,
    pd: RdmaPd,
    ids: Mutex<Vec<Arc<Identifier>>>,
    channel: Arc<EventChannel>,
    peer: SocketAddr,
}

impl fmt::Debug for ConnShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnShared")
            .field("device", &self.pd.device())
            .field("peer", &self.peer)
            .field(
                "exposed",
                &self
                    .exposed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .len(),
            )
            .finish_non_exhaustive()
    }
}

/// An established RDMA connection: bulk streams, an optional urgent stream, and the protection
/// domain to register memory on.
#[derive(Debug)]
pub struct RdmaConnection {
    streams: Vec<RdmaStream>,
    urgent: Option<RdmaStream>,
    shared: Arc<ConnShared>,
    role: Role,
    sizing: QueueSizing,
}

impl RdmaConnection {
    /// Our role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The peer's address (our bound address on the listening side).
    pub fn peer(&self) -> SocketAddr {
        self.shared.peer
    }

    /// The connection's protection domain: register guest memory and bounce pools here.
    pub fn pd(&self) -> &RdmaPd {
        &self.shared.pd
    }

    /// Queue sizes in use.
    pub fn sizing(&self) -> QueueSizing {
        self.sizing
    }

    /// Bulk streams still held by the connection.
    pub fn streams_mut(&mut self) -> &mut [RdmaStream] {
        &mut self.streams
    }

    /// The urgent stream, if requested and not taken.
    pub fn urgent_mut(&mut self) -> Option<&mut RdmaStream> {
        self.urgent.as_mut()
    }

    /// Moves the streams out, e.g. one per thread. The shared state (protection domain,
    /// exposed registrations) lives until the connection and every stream are dropped.
    pub fn take_streams(&mut self) -> (Vec<RdmaStream>, Option<RdmaStream>) {
        (std::mem::take(&mut self.streams), self.urgent.take())
    }

    /// Exposes `mem` to the peer: keeps it registered for as long as any queue pair of this
    /// connection exists, and returns the descriptor (addresses, lengths, rkeys) for the
    /// authenticated handshake.
    pub fn expose(&self, mem: &Arc<RegisteredMemory>) -> Result<Vec<RemoteRegion>, ConnectError> {
        if mem.pd_key() != self.shared.pd.key() {
            return Err(ConnectError::ForeignRegistration);
        }
        self.shared
            .exposed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::clone(mem));
        Ok(mem.export())
    }

    /// Waits up to `timeout` for an rdmacm event on this connection (`Ok(None)` on timeout).
    pub fn poll_event(&self, timeout: Duration) -> Result<Option<ConnEvent>, ConnectError> {
        let ch = &self.shared.channel;
        let Some(event) = next_event(ch, timeout, "event poll", 0, self.shared.peer)? else {
            return Ok(None);
        };
        let ids = self
            .shared
            .ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let stream = event
            .cm_id()
            .and_then(|id| ids.iter().position(|x| Arc::ptr_eq(x, &id)));
        Ok(Some(match (event.event_type(), stream) {
            (EventType::Disconnected, Some(stream)) => ConnEvent::Disconnected { stream },
            (EventType::DeviceRemoval, _) => ConnEvent::DeviceRemoval,
            (other, _) => ConnEvent::Other(format!("{other:?}")),
        }))
    }

    /// Disconnects every stream: outstanding work requests on both sides flush with errors, and
    /// the peer sees `Disconnected` events.
    pub fn disconnect(&self) -> Result<(), ConnectError> {
        let ids = self
            .shared
            .ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (i, id) in ids.iter().enumerate() {
            id.disconnect().map_err(verbs("disconnect", i))?;
        }
        Ok(())
    }
}

/// Takes the next event, waiting up to `timeout`; `Ok(None)` on timeout.
fn next_event(
    channel: &Arc<EventChannel>,
    timeout: Duration,
    step: &'static str,
    stream: usize,
    _peer: SocketAddr,
) -> Result<Option<Event>, ConnectError> {
    let start = Instant::now();
    loop {
        match channel.get_cm_event() {
            Ok(ev) => return Ok(Some(ev)),
            Err(e) if matches!(e.0, GetEventErrorKind::NoEvent) => {}
            Err(e) => return Err(verbs(step, stream)(e)),
        }
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Ok(None);
        }
        sys::wait_readable(channel.as_raw_fd(), left).map_err(verbs(step, stream))?;
    }
}

/// Waits for `want` on `id` (any id when `None`), acknowledging unrelated events; error events
/// for `id` fail the step. Connect requests that arrive while waiting for something else are
/// kept in `backlog` (acknowledging them would lose the peer's next stream) and are taken from
/// there first when `want` is a connect request.
#[allow(clippy::too_many_arguments)]
fn expect_event(
    channel: &Arc<EventChannel>,
    backlog: &mut VecDeque<Event>,
    id: Option<&Arc<Identifier>>,
    want: EventType,
    step: &'static str,
    stream: usize,
    peer: SocketAddr,
    timeout: Duration,
) -> Result<Event, ConnectError> {
    if want == EventType::ConnectRequest
        && let Some(ev) = backlog.pop_front()
    {
        return Ok(ev);
    }
    let start = Instant::now();
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        let Some(ev) = next_event(channel, left, step, stream, peer)? else {
            return Err(ConnectError::Timeout {
                step,
                stream,
                peer,
                waited: start.elapsed(),
            });
        };
        let ours = match (id, ev.cm_id()) {
            (None, _) => true,
            (Some(want_id), Some(got)) => Arc::ptr_eq(want_id, &got),
            (Some(_), None) => false,
        };
        let kind = ev.event_type();
        if ours && kind == want {
            return Ok(ev);
        }
        let fatal = matches!(
            kind,
            EventType::AddressError
                | EventType::RouteError
                | EventType::ConnectError
                | EventType::Unreachable
                | EventType::Rejected
                | EventType::DeviceRemoval
                | EventType::Disconnected
        );
        if kind == EventType::ConnectRequest {
            backlog.push_back(ev);
            continue;
        }
        if ours && fatal {
            return Err(ConnectError::Event {
                step,
                event: format!("{kind:?}"),
                status: ev.status(),
                stream,
                peer,
            });
        }
        tracing::debug!(step, ?kind, "ignoring rdmacm event");
        // Dropping the event acknowledges it.
    }
}

/// Per-connection setup state while streams are being added.
struct Builder {
    opts: ConnectOptions,
    peer: SocketAddr,
    channel: Arc<EventChannel>,
    ctx: Option<Arc<DeviceContext>>,
    pd: Option<RdmaPd>,
    sizing: Option<QueueSizing>,
    ids: Vec<Arc<Identifier>>,
    pending: Vec<(GenericQueuePair, GenericCompletionQueue, StreamKind)>,
}

impl Builder {
    fn new(opts: &ConnectOptions, peer: SocketAddr, channel: Arc<EventChannel>) -> Self {
        Self {
            opts: *opts,
            peer,
            channel,
            ctx: None,
            pd: None,
            sizing: None,
            ids: Vec::new(),
            pending: Vec::new(),
        }
    }

    fn total(&self) -> usize {
        self.opts.streams + usize::from(self.opts.urgent)
    }

    fn kind(&self, index: usize) -> StreamKind {
        if index < self.opts.streams {
            StreamKind::Bulk
        } else {
            StreamKind::Urgent
        }
    }

    /// Binds the connection to the device `id` resolved to (the first stream decides).
    fn adopt_device(&mut self, id: &Arc<Identifier>, stream: usize) -> Result<(), ConnectError> {
        let ctx = id
            .get_device_context()
            .ok_or(ConnectError::NoDeviceForRoute { peer: self.peer })?;
        match &self.ctx {
            Some(first) if !Arc::ptr_eq(first, &ctx) => {
                Err(ConnectError::DeviceMismatch { stream })
            }
            Some(_) => Ok(()),
            None => {
                let name = ctx.name();
                let limits = DeviceLimits::query(&ctx, &name)?;
                self.sizing = Some(size_queues(&self.opts, &limits)?);
                self.pd = Some(device::alloc_pd(&ctx, &name, limits)?);
                self.ctx = Some(ctx);
                Ok(())
            }
        }
    }

    /// Creates the stream's completion queue and queue pair (state RESET).
    fn create_qp(
        &self,
        stream: usize,
    ) -> Result<(GenericQueuePair, GenericCompletionQueue), ConnectError> {
        let (Some(ctx), Some(pd), Some(s)) = (&self.ctx, &self.pd, &self.sizing) else {
            return Err(ConnectError::NoDeviceForRoute { peer: self.peer });
        };
        let cq = ctx
            .create_cq_builder()
            .setup_cqe(s.cqe)
            .build()
            .map_err(verbs("create_cq", stream))?;
        let cq = GenericCompletionQueue::from(cq);
        let mut b = pd.raw().create_qp_builder();
        b.setup_max_send_wr(s.send_depth)
            .setup_max_recv_wr(s.recv_depth)
            .setup_max_send_sge(1)
            .setup_max_recv_sge(1)
            .setup_send_cq(cq.clone())
            .setup_recv_cq(cq.clone())
            .setup_send_ops_flags(
                SendOperationFlags::Write
                    | SendOperationFlags::WriteWithImmediate
                    | SendOperationFlags::Read,
            );
        let qp = b.build_ex().map_err(verbs("create_qp", stream))?;
        Ok((GenericQueuePair::from(qp), cq))
    }

    /// RESET → INIT (access flags by role) → receives posted → RTR → RTS (READ depth).
    fn bring_up(
        &self,
        id: &Arc<Identifier>,
        qp: &mut GenericQueuePair,
        stream: usize,
    ) -> Result<(), ConnectError> {
        let read_depth = self.sizing.map_or(1, |s| s.read_depth);
        let mut attr = id
            .get_qp_attr(QueuePairState::Init)
            .map_err(verbs("init_qp_attr(INIT)", stream))?;
        // The destination's urgent queue pair only issues READs: it grants the peer nothing.
        let access = match (self.opts.role, self.kind(stream)) {
            (Role::Destination, StreamKind::Urgent) => AccessFlags::none(),
            (role, _) => role.qp_access(),
        };
        attr.setup_access_flags(access);
        qp.modify(&attr).map_err(verbs("modify_qp(INIT)", stream))?;
        if self.opts.role == Role::Destination {
            let recv = self.sizing.map_or(1, |s| s.recv_depth);
            post_empty_receives(qp, recv as usize, stream)?;
        }
        let mut attr = id
            .get_qp_attr(QueuePairState::ReadyToReceive)
            .map_err(verbs("init_qp_attr(RTR)", stream))?;
        attr.setup_max_dest_read_atomic(read_depth);
        qp.modify(&attr).map_err(verbs("modify_qp(RTR)", stream))?;
        let mut attr = id
            .get_qp_attr(QueuePairState::ReadyToSend)
            .map_err(verbs("init_qp_attr(RTS)", stream))?;
        attr.setup_max_read_atomic(read_depth);
        qp.modify(&attr).map_err(verbs("modify_qp(RTS)", stream))?;
        Ok(())
    }

    fn finish(self) -> Result<RdmaConnection, ConnectError> {
        let (Some(pd), Some(sizing)) = (self.pd, self.sizing) else {
            return Err(ConnectError::NoDeviceForRoute { peer: self.peer });
        };
        let pd_key = pd.key();
        let shared = Arc::new(ConnShared {
            exposed: Mutex::new(Vec::new()),
            pd,
            ids: Mutex::new(self.ids),
            channel: self.channel,
            peer: self.peer,
        });
        let keep: Arc<dyn fmt::Debug + Send + Sync> = shared.clone();
        let mut streams = Vec::new();
        let mut urgent = None;
        for (index, (qp, cq, kind)) in self.pending.into_iter().enumerate() {
            let cfg = StreamConfig {
                index,
                kind,
                send_depth: sizing.send_depth as usize,
                recv_depth: if self.opts.role == Role::Destination {
                    sizing.recv_depth as usize
                } else {
                    0
                },
                signal_every: sizing.signal_every as usize,
                max_wr_bytes: sizing.max_wr_bytes,
                pd_key,
            };
            let queue = Box::new(VerbsQueue::new(qp, cq));
            let mut s = RdmaStream::new(queue, Arc::clone(&keep), cfg);
            s.note_receives_posted(cfg.recv_depth);
            match kind {
                StreamKind::Bulk => streams.push(s),
                StreamKind::Urgent => urgent = Some(s),
            }
        }
        Ok(RdmaConnection {
            streams,
            urgent,
            shared,
            role: self.opts.role,
            sizing,
        })
    }
}

/// Posts `count` zero-length receives with ids `RECV_WR_FLAG | i` before the stream exists.
fn post_empty_receives(
    qp: &mut GenericQueuePair,
    count: usize,
    stream: usize,
) -> Result<(), ConnectError> {
    let mut guard = qp.start_post_recv();
    for i in 0..count {
        let _ = guard.construct_wr(super::window::RECV_WR_FLAG | i as u64);
    }
    guard.post().map_err(verbs("post_recv", stream))
}

fn step_timeout(t: Duration) -> Duration {
    // rdmacm takes milliseconds as i32; sideway panics beyond that.
    t.min(Duration::from_secs(3600))
}

/// Listens for RDMA connections (rdmacm, RC, TCP port space).
pub struct RdmaListener {
    channel: Arc<EventChannel>,
    id: Arc<Identifier>,
    addr: SocketAddr,
}

impl fmt::Debug for RdmaListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RdmaListener")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl RdmaListener {
    /// Binds `addr` (an address of an RDMA-capable interface, or unspecified; not loopback,
    /// which rdmacm cannot route) and listens.
    pub fn bind(addr: SocketAddr) -> Result<Self, ConnectError> {
        let channel = EventChannel::new().map_err(verbs("create_event_channel", 0))?;
        channel
            .set_nonblocking(true)
            .map_err(verbs("set_nonblocking", 0))?;
        let id = channel
            .create_id(PortSpace::Tcp)
            .map_err(verbs("create_id", 0))?;
        id.bind_addr(addr).map_err(verbs("bind", 0))?;
        id.listen(16).map_err(verbs("listen", 0))?;
        Ok(Self { channel, id, addr })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Accepts one peer's streams (in the order the connector opens them). Every wait is bounded
    /// by `opts.timeout`; a [`ConnectError::Timeout`] for step `accept` on stream 0 only means
    /// no peer came yet, and the caller may call again.
    pub fn accept(&self, opts: &ConnectOptions) -> Result<RdmaConnection, ConnectError> {
        let timeout = step_timeout(opts.timeout);
        let mut b = Builder::new(opts, self.addr, Arc::clone(&self.channel));
        let mut backlog = VecDeque::new();
        for stream in 0..b.total() {
            let ev = expect_event(
                &self.channel,
                &mut backlog,
                None,
                EventType::ConnectRequest,
                "accept",
                stream,
                self.addr,
                timeout,
            )?;
            let from_us = ev.listener_id().is_some_and(|l| Arc::ptr_eq(&l, &self.id));
            let Some(id) = ev.cm_id().filter(|_| from_us) else {
                return Err(ConnectError::Event {
                    step: "accept",
                    event: "ConnectRequest for another listener".to_owned(),
                    status: ev.status(),
                    stream,
                    peer: self.addr,
                });
            };
            drop(ev);
            b.adopt_device(&id, stream)?;
            let (mut qp, cq) = b.create_qp(stream)?;
            b.bring_up(&id, &mut qp, stream)?;
            let mut param = ConnectionParameter::default();
            param.setup_qp_number(qp.qp_number());
            id.accept(param).map_err(verbs("accept", stream))?;
            drop(expect_event(
                &self.channel,
                &mut backlog,
                Some(&id),
                EventType::Established,
                "establish",
                stream,
                self.addr,
                timeout,
            )?);
            b.ids.push(id);
            let kind = b.kind(stream);
            b.pending.push((qp, cq, kind));
        }
        b.finish()
    }
}

/// Connects to an [`RdmaListener`] at `peer`: resolves address and route and connects each
/// stream in order.
pub fn connect(peer: SocketAddr, opts: &ConnectOptions) -> Result<RdmaConnection, ConnectError> {
    let timeout = step_timeout(opts.timeout);
    let channel = EventChannel::new().map_err(verbs("create_event_channel", 0))?;
    channel
        .set_nonblocking(true)
        .map_err(verbs("set_nonblocking", 0))?;
    let mut b = Builder::new(opts, peer, Arc::clone(&channel));
    let mut backlog = VecDeque::new();
    for stream in 0..b.total() {
        let id = channel
            .create_id(PortSpace::Tcp)
            .map_err(verbs("create_id", stream))?;
        id.resolve_addr(None, peer, timeout)
            .map_err(verbs("resolve_addr", stream))?;
        drop(expect_event(
            &channel,
            &mut backlog,
            Some(&id),
            EventType::AddressResolved,
            "resolve_addr",
            stream,
            peer,
            timeout,
        )?);
        b.adopt_device(&id, stream)?;
        id.resolve_route(timeout)
            .map_err(verbs("resolve_route", stream))?;
        drop(expect_event(
            &channel,
            &mut backlog,
            Some(&id),
            EventType::RouteResolved,
            "resolve_route",
            stream,
            peer,
            timeout,
        )?);
        let (mut qp, cq) = b.create_qp(stream)?;
        let mut param = ConnectionParameter::default();
        param.setup_qp_number(qp.qp_number());
        id.connect(param).map_err(verbs("connect", stream))?;
        drop(expect_event(
            &channel,
            &mut backlog,
            Some(&id),
            EventType::ConnectResponse,
            "connect",
            stream,
            peer,
            timeout,
        )?);
        b.bring_up(&id, &mut qp, stream)?;
        id.establish().map_err(verbs("establish", stream))?;
        b.ids.push(id);
        let kind = b.kind(stream);
        b.pending.push((qp, cq, kind));
    }
    b.finish()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn limits() -> DeviceLimits {
        DeviceLimits {
            max_mr_size: u64::MAX,
            max_qp_wr: 32768,
            max_sge: 30,
            max_cqe: 4_194_303,
            max_qp_rd_atom: 16,
            max_qp_init_rd_atom: 16,
            phys_port_cnt: 1,
        }
    }

    #[test]
    fn sizing_keeps_sane_options() {
        let s = size_queues(&ConnectOptions::new(Role::Destination), &limits()).unwrap();
        assert_eq!(
            s,
            QueueSizing {
                send_depth: 256,
                recv_depth: 128,
                cqe: 384,
                signal_every: 16,
                read_depth: 16,
                max_wr_bytes: 1 << 20,
            }
        );
        // The source posts no receives.
        let s = size_queues(&ConnectOptions::new(Role::Source), &limits()).unwrap();
        assert_eq!((s.recv_depth, s.cqe), (1, 257));
    }

    #[test]
    fn sizing_clamps_to_the_device() {
        let mut opts = ConnectOptions::new(Role::Destination);
        opts.send_depth = 100_000;
        opts.recv_depth = 100_000;
        opts.read_depth = 200;
        opts.signal_every = 0;
        let small = DeviceLimits {
            max_qp_wr: 1024,
            max_cqe: 1500,
            max_qp_rd_atom: 4,
            max_qp_init_rd_atom: 8,
            ..limits()
        };
        let s = size_queues(&opts, &small).unwrap();
        assert!(s.send_depth <= 1024 && s.recv_depth <= 1024);
        assert!(s.cqe <= 1500, "completion queue must fit the device: {s:?}");
        assert_eq!(s.cqe, s.send_depth + s.recv_depth);
        assert_eq!(s.read_depth, 4);
        assert_eq!(s.signal_every, 1);
    }

    #[test]
    fn sizing_rejects_unusable_options() {
        let mut opts = ConnectOptions::new(Role::Source);
        opts.streams = 0;
        assert!(matches!(
            size_queues(&opts, &limits()),
            Err(ConnectError::Options { .. })
        ));
        let mut opts = ConnectOptions::new(Role::Source);
        opts.max_wr_bytes = 0;
        assert!(matches!(
            size_queues(&opts, &limits()),
            Err(ConnectError::Options { .. })
        ));
    }

    #[test]
    fn step_timeout_is_capped_for_rdmacm() {
        assert_eq!(step_timeout(Duration::from_secs(5)), Duration::from_secs(5));
        assert_eq!(step_timeout(Duration::MAX), Duration::from_secs(3600));
    }
}
