// SPDX-License-Identifier: Apache-2.0 OR MIT
//! RDMA sessions (cargo feature `rdma`): pre-copy pushes over RDMA WRITE.
//!
//! The session starts as every other one: the authenticated TCP handshake opens the control
//! stream and N bulk streams (`TransportKind::Rdma` negotiated). Then, on the control stream:
//! 1. the destination binds an rdmacm listener and sends `RdmaOffer { port }`;
//! 2. the source connects N RC queue pairs to the control stream's address at that port, and
//!    registers its guest memory;
//! 3. the destination empties its guest memory (as a receiver always does first), registers it
//!    (pinned, writable by the peer) and sends `RdmaRegions` (address, length, rkey per chunk);
//! 4. the source imports them, checked against the negotiated memory map.
//!
//! Each bulk stream then becomes a `ferry_transport::rdma::RdmaDataStream`: page payload by
//! RDMA WRITE straight from the source's guest memory into the destination's, frame headers on
//! the TCP stream of the same index. The engine's sender and receiver run unchanged.
//!
//! Not here: post-copy (and so hybrid) over RDMA. The push writes wherever the source says,
//! which is only safe while the guest does not run on the destination; post-copy needs the
//! destination to pull with one-sided READs it claims first (`RdmaStream::read_to_bounce` is
//! built; the engine's fault path does not use it yet). Both sides refuse those modes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_protocol::Frame;
use ferry_protocol::handshake::{Mode, RdmaRegion};
use ferry_transport::rdma::{
    ConnectOptions, PushTarget, RdmaDataStream, RdmaProvider, RegisterOptions, RemoteMap, Role,
    Verbs, list_devices,
};
use ferry_transport::session::{ControlChannel, Session};
use ferry_transport::{Backend, DataStream, MemoryRegistration, Socket, StreamConfig, open_stream};

use crate::error::MigrateError;
use crate::layout::Layout;
use crate::session::{IDLE_TIMEOUT, SessionOptions};

/// The least time the source waits for the destination's regions.
const REGISTER_WAIT: Duration = Duration::from_secs(120);

fn setup_err(
    step: &'static str,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> MigrateError {
    move |source| MigrateError::Rdma { step, source }
}

fn boxed<E: std::error::Error + Send + Sync + 'static>(
    step: &'static str,
) -> impl FnOnce(E) -> MigrateError {
    move |e| setup_err(step)(Box::new(e))
}

/// Names of the RDMA devices on this host; an error when there is none.
pub fn devices() -> Result<Vec<String>, MigrateError> {
    let none = |why: String| MigrateError::Unsupported {
        transport: "rdma",
        what: format!("run without an RDMA device ({why})"),
    };
    let devices = match list_devices() {
        Ok(d) => d,
        Err(e) if e.is_no_device() => return Err(none(e.to_string())),
        Err(e) => return Err(boxed("listing devices")(e)),
    };
    if devices.is_empty() {
        return Err(none("ibv_get_device_list is empty".into()));
    }
    Ok(devices.into_iter().map(|d| d.name).collect())
}

/// The provider a session uses: the options' (a simulator, in tests), else verbs devices.
pub(crate) fn provider(opts: &SessionOptions) -> Arc<dyn RdmaProvider> {
    opts.rdma_provider
        .clone()
        .unwrap_or_else(|| Arc::new(Verbs))
}

/// Registers guest memory (every region's primary mapping) on `link` for `role`: the source's
/// memory is read by the NIC, the destination's written by the peer. Registration pins, and so
/// allocates, every page.
fn register(
    link: &dyn ferry_transport::rdma::RdmaLink,
    layout: &Layout,
    role: Role,
) -> Result<Arc<ferry_transport::rdma::RegisteredMemory>, MigrateError> {
    let regions: Vec<ferry_transport::rdma::GuestRegion> = layout
        .regions()
        .iter()
        .map(|r| ferry_transport::rdma::GuestRegion {
            gpa: r.gpa,
            host_addr: r.host_addr as u64,
            len: r.len,
        })
        .collect();
    let opts = RegisterOptions {
        max_chunk: None,
        page_size: layout.page_size(),
    };
    // SAFETY: the regions come from a `GuestMemory`, whose contract keeps them mapped while its
    // owner lives; the engine holds this registration only inside the migration's streams,
    // which `source::migrate` / `dest::receive` drop before they return, while the caller keeps
    // the memory alive. The destination looks at a pushed page only after the batch carrying it
    // arrived, and the source sends a page again only on the same queue pair after a later
    // frame header, as with the socket transports.
    unsafe { link.register_guest_memory(&regions, role, opts) }
        .map_err(boxed("registering guest memory"))
}

/// RDMA sessions migrate in pre-copy only (see the module docs).
pub(crate) fn check_mode(mode: Mode) -> Result<(), MigrateError> {
    if mode == Mode::PreCopy {
        Ok(())
    } else {
        Err(MigrateError::Unsupported {
            transport: "rdma",
            what: format!(
                "migrate in {mode:?} mode: RDMA sessions are pre-copy only (post-copy over RDMA \
                 needs destination-driven READs, not built yet)"
            ),
        })
    }
}

fn header_config(opts: &SessionOptions, timeout: Duration) -> StreamConfig {
    StreamConfig {
        backend: Backend::Socket,
        timeout,
        fixed_buffers: false,
        ..opts.stream
    }
}

fn recv_control(control: &ControlChannel, timeout: Duration) -> Result<Frame, MigrateError> {
    control.set_read_timeout(Some(timeout))?;
    let got = control.recv();
    control.set_read_timeout(None)?;
    let (_, frame) = got?;
    match frame {
        Frame::Abort { reason } => Err(MigrateError::PeerAborted { reason }),
        Frame::Error { message, .. } => Err(MigrateError::PeerAborted { reason: message }),
        f => Ok(f),
    }
}

/// Source side: turns a negotiated RDMA session's bulk streams into RDMA streams. `peer` is
/// the address the control stream connected to.
pub(crate) fn source_bulk(
    session: &mut Session,
    peer: SocketAddr,
    reg: &Arc<MemoryRegistration>,
    layout: &Layout,
    opts: &SessionOptions,
) -> Result<Vec<Box<dyn DataStream>>, MigrateError> {
    let port = match recv_control(&session.control, opts.timeout)? {
        Frame::RdmaOffer { port } => port,
        other => {
            return Err(MigrateError::Unexpected {
                got: other.command().name(),
                state: "waiting for the destination's RDMA offer",
            });
        }
    };
    let n = session.bulk.len();
    let mut copts = ConnectOptions::new(Role::Source);
    copts.streams = n;
    copts.urgent = false;
    copts.timeout = opts.timeout;
    let mut conn = provider(opts)
        .connect(SocketAddr::new(peer.ip(), port), &copts)
        .map_err(boxed("connecting queue pairs"))?;
    let local = register(conn.as_ref(), layout, Role::Source)?;
    // The destination empties and registers (pins) all of guest memory first: seconds per
    // tens of GiB.
    let regions = match recv_control(&session.control, opts.timeout.max(REGISTER_WAIT))? {
        Frame::RdmaRegions { regions } => regions,
        other => {
            return Err(MigrateError::Unexpected {
                got: other.command().name(),
                state: "waiting for the destination's RDMA regions",
            });
        }
    };
    let remote = RemoteMap::from_handshake(&regions, layout.map())
        .map_err(boxed("importing the destination's regions"))?;
    let target = PushTarget {
        local,
        remote: Arc::new(remote),
    };
    let (queues, _) = conn.take_streams();
    if queues.len() != n {
        return Err(MigrateError::Unexpected {
            got: "a different number of queue pairs",
            state: "connecting RDMA streams",
        });
    }
    let cfg = header_config(opts, opts.stream.timeout);
    let mut bulk: Vec<Box<dyn DataStream>> = Vec::with_capacity(n);
    for (i, (socket, queue)) in std::mem::take(&mut session.bulk)
        .into_iter()
        .zip(queues)
        .enumerate()
    {
        let header = open_stream(socket, i, reg, &cfg)
            .map_err(|source| MigrateError::Open { stream: i, source })?;
        bulk.push(Box::new(RdmaDataStream::source(
            header,
            queue,
            target.clone(),
            opts.stream.timeout,
        )));
    }
    Ok(bulk)
}

/// Destination side: offers an rdmacm port (`listen`: the control stream's local address and
/// the port to use), accepts the source's queue pairs,
/// empties guest memory and registers it (registration pins the pages, which must not be
/// dropped afterwards) and tells the source where it may write. `sockets` are the
/// session's bulk TCP sockets, in order.
pub(crate) fn dest_bulk(
    control: &ControlChannel,
    sockets: Vec<Socket>,
    listen: SocketAddr,
    reg: &Arc<MemoryRegistration>,
    layout: &Layout,
    opts: &SessionOptions,
) -> Result<Vec<Box<dyn DataStream>>, MigrateError> {
    let n = sockets.len();
    let listener = provider(opts)
        .listen(listen)
        .map_err(boxed("binding the rdmacm listener"))?;
    control.send(
        &Frame::RdmaOffer {
            port: listen.port(),
        },
        &[],
    )?;
    let mut copts = ConnectOptions::new(Role::Destination);
    copts.streams = n;
    copts.urgent = false;
    copts.timeout = opts.timeout;
    let mut conn = listener
        .accept(&copts)
        .map_err(boxed("accepting queue pairs"))?;
    crate::dest::empty_guest_memory(layout)?;
    let mem = register(conn.as_ref(), layout, Role::Destination)?;
    let regions: Vec<RdmaRegion> = conn
        .expose(&mem)
        .map_err(boxed("exposing guest memory"))?
        .into_iter()
        .map(Into::into)
        .collect();
    control.send(&Frame::RdmaRegions { regions }, &[])?;
    let (queues, _) = conn.take_streams();
    // Receivers idle legitimately; the engine shuts their sockets down when it is done.
    let cfg = header_config(opts, IDLE_TIMEOUT);
    let mut bulk: Vec<Box<dyn DataStream>> = Vec::with_capacity(n);
    for (i, (socket, queue)) in sockets.into_iter().zip(queues).enumerate() {
        let header = open_stream(socket, i, reg, &cfg)
            .map_err(|source| MigrateError::Open { stream: i, source })?;
        bulk.push(Box::new(RdmaDataStream::destination(
            header,
            queue,
            opts.stream.timeout,
        )));
    }
    if bulk.len() != n {
        return Err(MigrateError::Unexpected {
            got: "a different number of queue pairs",
            state: "accepting RDMA streams",
        });
    }
    Ok(bulk)
}
