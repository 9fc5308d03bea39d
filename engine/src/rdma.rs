// SPDX-License-Identifier: Apache-2.0 OR MIT
//! RDMA sessions (cargo feature `rdma`): pages pushed by RDMA WRITE.
//!
//! The session starts as every other one: the authenticated TCP handshake opens the control
//! stream and N bulk streams (`TransportKind::Rdma` negotiated). Then, on the control stream:
//! 1. the destination binds an rdmacm listener and sends `RdmaOffer { port }`;
//! 2. the source connects N RC queue pairs to the control stream's address at that port, and
//!    registers its guest memory;
//! 3. the destination empties its guest memory (as a receiver always does first), registers the
//!    mappings it lands pages in (writable by the peer; pinned in pre-copy, on demand when the
//!    migration may switch to post-copy) and sends `RdmaRegions` (address, length, rkey per
//!    chunk);
//! 4. the source imports them, checked against the negotiated memory map.
//!
//! Each bulk stream then becomes a `ferry_transport::rdma::RdmaDataStream`: page payload by
//! RDMA WRITE straight from the source's guest memory into the destination's, frame headers on
//! the TCP stream of the same index. The engine's sender and receiver run unchanged.
//!
//! When the migration switches to post-copy, the source's senders end direct placement on
//! every stream (`DataStream::end_direct_placement`) before anything else of the switch: from
//! that in-order marker on, payload travels on the TCP streams and the destination places it
//! with its usual claims, since its guest will run on that memory. Post-copy page requests use
//! the session's urgent TCP stream, as with every transport (the one-sided READ path,
//! `RdmaStream::read_to_bounce`, is built and tested but the fault path does not use it yet).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_protocol::Frame;
use ferry_protocol::handshake::{Mode, RdmaRegion};
use ferry_transport::DataStream;
use ferry_transport::rdma::{
    ConnectOptions, PushTarget, RdmaDataStream, RdmaProvider, RegisterOptions, RemoteMap, Role,
    Verbs, list_devices,
};
use ferry_transport::session::ControlChannel;

use crate::error::MigrateError;
use crate::layout::Layout;
use crate::memory::AliasMapping;
use crate::session::SessionOptions;
use crate::vm::Backing;

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

/// What the destination registers: for each region, the mapping its receivers land pages in
/// (the primary mapping, or for memfd regions an alias: see `dest::Shared::staged`, which lands
/// memfd pages in the page cache only, never in the guest's own page tables). The aliases made
/// here are kept alive by the streams, after their queue pairs and registration.
struct Landing {
    regions: Vec<ferry_transport::rdma::GuestRegion>,
    aliases: Vec<AliasMapping>,
}

fn landing(layout: &Layout, role: Role) -> Result<Landing, MigrateError> {
    let mut regions = Vec::with_capacity(layout.regions().len());
    let mut aliases = Vec::new();
    for r in layout.regions() {
        let host_addr = match (&r.backing, role) {
            (Backing::Memfd { .. }, Role::Destination) => {
                let a = AliasMapping::of_region(r).map_err(boxed("mapping a memfd region"))?;
                let addr = a.addr();
                aliases.push(a);
                addr
            }
            _ => r.host_addr as u64,
        };
        regions.push(ferry_transport::rdma::GuestRegion {
            gpa: r.gpa,
            host_addr,
            len: r.len,
        });
    }
    Ok(Landing { regions, aliases })
}

/// Registers `landing` on `link` for `role`. The source's memory is read by the NIC and pinned.
/// The destination's is written by the peer: pinned in pre-copy; registered on demand (ODP:
/// nothing pinned, the device follows the page tables) when the migration may switch to
/// post-copy, since the engine then drops pages the device would otherwise keep writing
/// behind the process's back, and userfaultfd must see every page not received as missing.
fn register(
    link: &dyn ferry_transport::rdma::RdmaLink,
    landing: &Landing,
    layout: &Layout,
    role: Role,
    on_demand: bool,
) -> Result<Arc<ferry_transport::rdma::RegisteredMemory>, MigrateError> {
    let opts = RegisterOptions {
        max_chunk: None,
        page_size: layout.page_size(),
        on_demand,
    };
    // SAFETY: the primary mappings come from a `GuestMemory`, whose contract keeps them mapped
    // while its owner lives, and the engine holds this registration only inside the
    // migration's streams, which `source::migrate` / `dest::receive` drop before they return
    // while the caller keeps the memory alive; the aliases in `landing` are kept by those
    // streams and dropped after their registration (`RdmaDataStream::holding`). The
    // destination looks at a pushed page only after the batch carrying it arrived, and the
    // source sends a page again only on the same queue pair after a later frame header, as
    // with the socket transports.
    let reg = unsafe { link.register_guest_memory(&landing.regions, role, opts) };
    reg.map_err(|e| {
        let step = if on_demand {
            "registering guest memory on demand (ODP; post-copy and hybrid over RDMA need a \
             device with on-demand paging, pre-copy does not)"
        } else {
            "registering guest memory"
        };
        boxed(step)(e)
    })
}

/// A bulk stream's header stream and its queue pair.
type Paired = (Box<dyn DataStream>, ferry_transport::rdma::RdmaStream);

fn header_bound(
    headers: Vec<Box<dyn DataStream>>,
    queues: Vec<ferry_transport::rdma::RdmaStream>,
    state: &'static str,
) -> Result<Vec<Paired>, MigrateError> {
    if headers.len() != queues.len() {
        return Err(MigrateError::Unexpected {
            got: "a different number of queue pairs than bulk streams",
            state,
        });
    }
    Ok(headers.into_iter().zip(queues).collect())
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

/// Source side: sets up the queue pairs of a negotiated RDMA session and turns its bulk
/// streams (`headers`, opened as plain TCP streams) into RDMA streams. `peer` is the address
/// the control stream connected to.
pub(crate) fn source_bulk(
    control: &ControlChannel,
    headers: Vec<Box<dyn DataStream>>,
    peer: SocketAddr,
    layout: &Layout,
    opts: &SessionOptions,
) -> Result<Vec<Box<dyn DataStream>>, MigrateError> {
    let port = match recv_control(control, opts.timeout)? {
        Frame::RdmaOffer { port } => port,
        other => {
            return Err(MigrateError::Unexpected {
                got: other.command().name(),
                state: "waiting for the destination's RDMA offer",
            });
        }
    };
    let mut copts = ConnectOptions::new(Role::Source);
    copts.streams = headers.len();
    copts.urgent = false;
    copts.timeout = opts.timeout;
    let mut conn = provider(opts)
        .connect(SocketAddr::new(peer.ip(), port), &copts)
        .map_err(boxed("connecting queue pairs"))?;
    let own = landing(layout, Role::Source)?;
    let local = register(conn.as_ref(), &own, layout, Role::Source, false)?;
    // The destination empties and registers all of guest memory first: seconds per tens of
    // GiB when it pins.
    let regions = match recv_control(control, opts.timeout.max(REGISTER_WAIT))? {
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
    Ok(header_bound(headers, queues, "connecting RDMA streams")?
        .into_iter()
        .map(|(h, q)| {
            Box::new(RdmaDataStream::source(
                h,
                q,
                target.clone(),
                opts.stream.timeout,
            )) as Box<dyn DataStream>
        })
        .collect())
}

/// Destination side: offers an rdmacm port (`listen`: the control stream's local address and
/// the port to use), accepts the source's queue pairs, empties guest memory and registers the
/// mappings pages land in (see [`register`] for how, by `mode`), and tells the source where it
/// may write; its bulk streams (`headers`, opened as plain TCP streams) become RDMA streams.
pub(crate) fn dest_bulk(
    control: &ControlChannel,
    headers: Vec<Box<dyn DataStream>>,
    listen: SocketAddr,
    layout: &Layout,
    mode: Mode,
    opts: &SessionOptions,
) -> Result<Vec<Box<dyn DataStream>>, MigrateError> {
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
    copts.streams = headers.len();
    copts.urgent = false;
    copts.timeout = opts.timeout;
    let mut conn = listener
        .accept(&copts)
        .map_err(boxed("accepting queue pairs"))?;
    crate::dest::empty_guest_memory(layout)?;
    let land = landing(layout, Role::Destination)?;
    let mem = register(
        conn.as_ref(),
        &land,
        layout,
        Role::Destination,
        mode != Mode::PreCopy,
    )?;
    let regions: Vec<RdmaRegion> = conn
        .expose(&mem)
        .map_err(boxed("exposing guest memory"))?
        .into_iter()
        .map(Into::into)
        .collect();
    drop(mem);
    control.send(&Frame::RdmaRegions { regions }, &[])?;
    let (queues, _) = conn.take_streams();
    let hold: Arc<dyn std::fmt::Debug + Send + Sync> = Arc::new(land.aliases);
    Ok(header_bound(headers, queues, "accepting RDMA streams")?
        .into_iter()
        .map(|(h, q)| {
            Box::new(
                RdmaDataStream::destination(h, q, opts.stream.timeout).holding(Arc::clone(&hold)),
            ) as Box<dyn DataStream>
        })
        .collect())
}
