// SPDX-License-Identifier: Apache-2.0 OR MIT
//! RDMA sessions (cargo feature `rdma`): pages pushed by RDMA WRITE.
//!
//! The session starts as every other one: the authenticated TCP handshake opens the control
//! stream and N bulk streams (`TransportKind::Rdma` negotiated). Then, on the control stream:
//! 1. the destination binds an rdmacm listener and sends `RdmaOffer { port }`;
//! 2. the source connects N RC queue pairs (one more, for READs, unless the mode is pre-copy)
//!    to the control stream's address at that port and registers its guest memory; unless the
//!    mode is pre-copy it sends its own `RdmaRegions` (address, length, rkey per chunk);
//! 3. the destination empties its guest memory (as a receiver always does first), registers the
//!    mappings it lands pages in (writable by the peer; pinned in pre-copy, on demand when the
//!    migration may switch to post-copy) and sends its `RdmaRegions`;
//! 4. each side imports the other's, checked against the negotiated memory map.
//!
//! Each bulk stream then becomes a `ferry_transport::rdma::RdmaDataStream`: page payload by
//! RDMA WRITE straight from the source's guest memory into the destination's, frame headers on
//! the TCP stream of the same index. The engine's sender and receiver run unchanged.
//!
//! When the migration switches to post-copy, the source's senders end direct placement on
//! every stream (`DataStream::end_direct_placement`) before anything else of the switch: from
//! that in-order marker on, payload travels on the TCP streams and the destination places it
//! with its usual claims, since its guest will run on that memory. Post-copy page requests are
//! served by one-sided RDMA READs from the source's memory on the extra queue pair
//! (`RdmaFetch`, straight into the page cache for memfd regions); the session's urgent TCP
//! stream stays open and idle, and serves the requests again after a recovery.
//!
//! The destination's receivers destroy their queue pairs before their first post-copy frame
//! (`end_direct_placement` on the receiving side), so the source cannot write memory the guest
//! runs on. After a stop-and-copy switchover the queue pairs live until each stream ends: an
//! authenticated source could write guest memory in that window, as it could send it wrong
//! pages. The READ queue pair grants the source nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_protocol::handshake::{Mode, RdmaRegion};
use ferry_protocol::{Frame, GpaRange};
use ferry_transport::DataStream;
use ferry_transport::rdma::{
    ConnectOptions, PushTarget, RdmaDataStream, RdmaProvider, ReadDone, RegisterOptions, RemoteMap,
    Role, Verbs, list_devices,
};
use ferry_transport::session::ControlChannel;

use crate::dest::{FetchDone, PageFetch};
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
    regions: &[ferry_transport::rdma::GuestRegion],
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
    // while the caller keeps the memory alive (the destination's READ fetch, which also holds
    // it, runs on one of `dest::receive`'s scoped threads); the aliases in `regions` are made
    // by `dest_bulk` and kept by those streams and that fetch, which drop them after their
    // queue pairs and registration (`RdmaDataStream::holding`, `RdmaFetch::_hold`). The
    // destination looks at a pushed page only after the batch carrying it arrived, and the
    // source sends a page again only on the same queue pair after a later frame header, as
    // with the socket transports; the destination's own in-place READs write only pages its
    // fault path claimed (see `RdmaFetch::start`).
    let reg = unsafe { link.register_guest_memory(regions, role, opts) };
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

/// Exposes `mem` on `link` and sends its descriptor to the peer.
fn send_regions(
    control: &ControlChannel,
    link: &dyn ferry_transport::rdma::RdmaLink,
    mem: &Arc<ferry_transport::rdma::RegisteredMemory>,
) -> Result<(), MigrateError> {
    let regions: Vec<RdmaRegion> = link
        .expose(mem)
        .map_err(boxed("exposing guest memory"))?
        .into_iter()
        .map(Into::into)
        .collect();
    control.send(&Frame::RdmaRegions { regions }, &[])?;
    Ok(())
}

/// Waits for the peer's descriptor (it may first register all of guest memory) and imports
/// it, checked against the negotiated memory map. `state` and `step` name the wait and the
/// import in errors.
fn recv_regions(
    control: &ControlChannel,
    layout: &Layout,
    opts: &SessionOptions,
    state: &'static str,
    step: &'static str,
) -> Result<RemoteMap, MigrateError> {
    let regions = match recv_control(control, opts.timeout.max(REGISTER_WAIT))? {
        Frame::RdmaRegions { regions } => regions,
        other => {
            return Err(MigrateError::Unexpected {
                got: other.command().name(),
                state,
            });
        }
    };
    RemoteMap::from_handshake(&regions, layout.map()).map_err(boxed(step))
}

/// Source side: sets up the queue pairs of a negotiated RDMA session and turns its bulk
/// streams (`headers`, opened as plain TCP streams) into RDMA streams. `peer` is the address
/// the control stream connected to.
pub(crate) fn source_bulk(
    control: &ControlChannel,
    headers: Vec<Box<dyn DataStream>>,
    peer: SocketAddr,
    layout: &Layout,
    mode: Mode,
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
    // Post-copy: one more queue pair, on which the destination READs the pages its guest
    // faults on, without this side's CPU.
    let reads = mode != Mode::PreCopy;
    let mut copts = ConnectOptions::new(Role::Source);
    copts.streams = headers.len();
    copts.urgent = reads;
    copts.timeout = opts.timeout;
    let mut conn = provider(opts)
        .connect(SocketAddr::new(peer.ip(), port), &copts)
        .map_err(boxed("connecting queue pairs"))?;
    let own = landing(layout, Role::Source)?;
    let local = register(conn.as_ref(), &own.regions, layout, Role::Source, false)?;
    if reads {
        send_regions(control, conn.as_ref(), &local)?;
    }
    // The destination empties and registers all of guest memory first: seconds per tens of
    // GiB when it pins.
    let remote = recv_regions(
        control,
        layout,
        opts,
        "waiting for the destination's RDMA regions",
        "importing the destination's regions",
    )?;
    let target = PushTarget {
        local,
        remote: Arc::new(remote),
    };
    let (queues, urgent) = conn.take_streams();
    // The READ queue pair only needs to exist here: the streams keep it.
    let hold: Arc<dyn std::fmt::Debug + Send + Sync> = Arc::new(std::sync::Mutex::new(urgent));
    Ok(header_bound(headers, queues, "connecting RDMA streams")?
        .into_iter()
        .map(|(h, q)| {
            Box::new(
                RdmaDataStream::source(h, q, target.clone(), opts.stream.timeout)
                    .holding(Arc::clone(&hold)),
            ) as Box<dyn DataStream>
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
) -> Result<DestBulk, MigrateError> {
    // First, so that they are dropped last, after every queue pair and registration over
    // them, on every path out of here.
    let land = landing(layout, Role::Destination)?;
    let hold: Arc<dyn std::fmt::Debug + Send + Sync> = Arc::new(land.aliases);
    let listener = provider(opts)
        .listen(listen)
        .map_err(boxed("binding the rdmacm listener"))?;
    control.send(
        &Frame::RdmaOffer {
            port: listen.port(),
        },
        &[],
    )?;
    let reads = mode != Mode::PreCopy;
    let mut copts = ConnectOptions::new(Role::Destination);
    copts.streams = headers.len();
    copts.urgent = reads;
    copts.timeout = opts.timeout;
    let mut conn = listener
        .accept(&copts)
        .map_err(boxed("accepting queue pairs"))?;
    crate::dest::empty_guest_memory(layout)?;
    let mem = register(
        conn.as_ref(),
        &land.regions,
        layout,
        Role::Destination,
        reads,
    )?;
    send_regions(control, conn.as_ref(), &mem)?;
    let (queues, urgent) = conn.take_streams();
    let read_path = match (reads, urgent) {
        (true, Some(urgent)) => {
            // The source registered and exposed its memory before it waited for ours.
            let remote = recv_regions(
                control,
                layout,
                opts,
                "waiting for the source's RDMA regions",
                "importing the source's regions",
            )?;
            let pool = conn
                .bounce_pool(READ_SLOTS, layout.page_size() as usize)
                .map_err(boxed("registering the READ staging buffers"))?;
            Some(RdmaFetch {
                urgent,
                local: Arc::clone(&mem),
                pool,
                remote,
                timeout: opts.stream.timeout,
                inflight: std::collections::HashMap::new(),
                _hold: Arc::clone(&hold),
            })
        }
        (true, None) => {
            return Err(MigrateError::Unexpected {
                got: "no READ queue pair",
                state: "accepting RDMA streams for post-copy",
            });
        }
        (false, _) => None,
    };
    let bulk = header_bound(headers, queues, "accepting RDMA streams")?
        .into_iter()
        .map(|(h, q)| {
            Box::new(
                RdmaDataStream::destination(h, q, opts.stream.timeout).holding(Arc::clone(&hold)),
            ) as Box<dyn DataStream>
        })
        .collect();
    Ok((bulk, read_path))
}

/// The destination's bulk streams, and its READ fetch when post-copy may follow.
pub(crate) type DestBulk = (Vec<Box<dyn DataStream>>, Option<RdmaFetch>);

/// Staging buffers for post-copy READs in flight (one page each).
const READ_SLOTS: usize = 64;

/// Post-copy demand fetch by one-sided RDMA READ (the engine's [`PageFetch`]): each page the
/// fault path asks for is read from the source's registered memory on the READ queue pair,
/// without the source's CPU. Pages of memfd regions are read straight into this side's page
/// cache (through the alias mapping registered for the push; the fault path then maps them with
/// `UFFDIO_CONTINUE`); the others into a registered staging buffer, from which the fault path
/// places them (`UFFDIO_COPY`). The queue pair is declared first: it is destroyed before the
/// buffers and the memory its registrations cover are released.
#[derive(Debug)]
pub(crate) struct RdmaFetch {
    urgent: ferry_transport::rdma::RdmaStream,
    local: Arc<ferry_transport::rdma::RegisteredMemory>,
    pool: ferry_transport::rdma::BouncePool,
    remote: RemoteMap,
    timeout: Duration,
    inflight: std::collections::HashMap<
        ferry_transport::rdma::ReadTicket,
        (GpaRange, std::time::Instant),
    >,
    _hold: Arc<dyn std::fmt::Debug + Send + Sync>,
}

/// A failed READ is a lost demand path, like a failed urgent stream: a recovery (if any) asks
/// for the missing pages again over TCP.
fn read_err(e: impl std::error::Error + Send + Sync + 'static) -> MigrateError {
    MigrateError::Stream {
        stream: usize::MAX,
        source: ferry_transport::StreamError::Rdma {
            stream: usize::MAX,
            peer: "RDMA READ".into(),
            source: Box::new(e),
        },
    }
}

/// A READ that did not complete within the stream timeout.
#[derive(Debug, thiserror::Error)]
#[error("RDMA READ of {gpa:#x}+{len:#x} did not complete in {waited:?}")]
struct ReadTimeout {
    gpa: u64,
    len: u64,
    waited: Duration,
}

impl PageFetch for RdmaFetch {
    fn start(&mut self, range: GpaRange, in_place: bool) -> Result<bool, MigrateError> {
        let ticket = if in_place {
            // SAFETY: the fault path claimed this page (FILLING) before asking: nothing else
            // writes it, nobody reads it, and the guest cannot see it until the fault path maps
            // it after this READ completed (or gives the claim back only after destroying this
            // fetch, and with it the queue pair).
            unsafe {
                self.urgent.post_read_in_place(
                    &self.local,
                    &self.remote,
                    range.into(),
                    self.timeout,
                )
            }
            .map_err(read_err)?
        } else {
            let Some(slot) = self.pool.try_acquire() else {
                return Ok(false);
            };
            self.urgent
                .post_read(&self.remote, range.into(), slot, self.timeout)
                .map_err(read_err)?
        };
        self.inflight
            .insert(ticket, (range, std::time::Instant::now()));
        Ok(true)
    }

    fn poll(&mut self, done: &mut FetchDone<'_>) -> Result<usize, MigrateError> {
        self.urgent.poll().map_err(read_err)?;
        let mut n = 0;
        for (ticket, read) in self.urgent.take_reads() {
            let Some((range, _)) = self.inflight.remove(&ticket) else {
                continue;
            };
            n += 1;
            match read {
                ReadDone::Slot(filled) => done(range, Some(filled.bytes()))?,
                ReadDone::InPlace { .. } => done(range, None)?,
            }
        }
        // RC hardware fails a READ whose peer is gone, after its retries; a silent one is not
        // waited for forever.
        if let Some((range, t)) = self
            .inflight
            .values()
            .find(|(_, t)| t.elapsed() > self.timeout)
        {
            return Err(read_err(ReadTimeout {
                gpa: range.gpa,
                len: range.len,
                waited: t.elapsed(),
            }));
        }
        Ok(n)
    }
}
