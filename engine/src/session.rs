// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Opening a migration session on either side: the authenticated handshake
//! (`ferry_transport::session`), guest-memory registration with the transport, and one data
//! stream per connection.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_protocol::handshake::{
    Auth, Capabilities, Mode, Params, ServerConfig, SessionId, TransportKind,
};
use ferry_transport::memory::RegistrationConfig;
use ferry_transport::session::{ConnectConfig, Session, SessionListener};
use ferry_transport::{Backend, Endpoint, MemoryRegistration, Socket, StreamConfig, open_stream};

use crate::dest::{DestRecovery, DestReport, DestStreams, DestVm, Replies, receive_with};
use crate::error::MigrateError;
use crate::layout::Layout;
use crate::memory::AliasMapping;
use crate::policy::Policy;
use crate::report::MigrationReport;
use crate::source::{Progress, SourceRecovery, SourceStreams, SourceVm, migrate_with};
use crate::vm::Backing;

/// How long a receiving stream may sit idle; the engine ends idle streams itself by
/// shutting their sockets down.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Transport options of a session.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// The data transport. `Rdma` (cargo feature `rdma`) pushes page payload by RDMA WRITE
    /// and frame headers over TCP until a switch to post-copy; see `ferry_engine::rdma`.
    pub transport: TransportKind,
    /// Bulk streams to ask for.
    pub streams: u16,
    /// Authentication.
    pub auth: Auth,
    /// Stream tuning (timeouts, zero-copy threshold, ring size).
    pub stream: StreamConfig,
    /// Fixed-buffer slice size (io_uring registration).
    pub registration: RegistrationConfig,
    /// Handshake and connect timeout.
    pub timeout: Duration,
    /// Destination: receive pages of memfd-backed regions arriving for the first time into
    /// the file through the page cache (`splice`), not through a mapping (see
    /// `ferry_transport::Target::File`). Off by default: it halves the receiving CPU per GiB
    /// of fresh memory on the development machine (1–2 GiB guests: pre-copy's first round
    /// 17% shorter), but writes to one file serialise on its inode lock, so parallel streams
    /// no longer receive in parallel (8 GiB post-copy there: 41–45 s against 29 s).
    pub page_cache: bool,
    /// Destination, RDMA sessions: the rdmacm port to listen on (0: the session's TCP port
    /// number, which lives in a separate port space on InfiniBand and RoCE; give another one on
    /// iWARP, whose connections use the host's TCP ports).
    pub rdma_port: u16,
    /// RDMA sessions: where connections come from (`None`: the host's verbs devices through
    /// rdmacm). Tests give `ferry_transport::rdma::SimProvider` (feature `rdma-sim`).
    #[cfg(feature = "rdma")]
    pub rdma_provider: Option<Arc<dyn ferry_transport::rdma::RdmaProvider>>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            transport: TransportKind::Uring,
            streams: 2,
            auth: Auth::Insecure,
            stream: StreamConfig::default(),
            registration: RegistrationConfig::default(),
            timeout: Duration::from_secs(10),
            page_cache: false,
            rdma_port: 0,
            #[cfg(feature = "rdma")]
            rdma_provider: None,
        }
    }
}

fn backend(t: TransportKind) -> Backend {
    match t {
        TransportKind::Uring => Backend::Uring,
        _ => Backend::Socket,
    }
}

fn kind_name(t: TransportKind) -> &'static str {
    match t {
        TransportKind::Tcp => "tcp",
        TransportKind::Unix => "unix",
        TransportKind::Uring => "uring",
        TransportKind::Rdma => "rdma",
    }
}

/// The source side: connects to `endpoint`, negotiates, registers guest memory, opens the
/// streams. Keep the returned registration alive until the migration returned.
pub fn connect_source(
    endpoint: &Endpoint,
    layout: &Layout,
    policy: &Policy,
    opts: &SessionOptions,
) -> Result<(SourceStreams, Arc<MemoryRegistration>), MigrateError> {
    check_transport(opts)?;
    let session =
        ferry_transport::session::connect(endpoint, &connect_config(layout, policy, opts))?;
    let reg = layout.register(None, false, opts.registration)?;
    let streams = if session.params.transport == TransportKind::Rdma {
        rdma_source_streams(session, endpoint, &reg, layout, opts)?
    } else {
        source_streams(session, &reg, layout, opts)?
    };
    Ok((streams, reg))
}

/// Whether this build and host can open a session with `opts.transport`: RDMA needs the
/// `rdma` feature and a device (or a provider given in the options). [`connect_source`] checks
/// it first; a VMM can check before it prepares anything.
pub fn check_transport(opts: &SessionOptions) -> Result<(), MigrateError> {
    if opts.transport == TransportKind::Rdma {
        rdma_precheck(opts)?;
    }
    Ok(())
}

/// What an RDMA session needs before it is asked for: the feature and a device (or a
/// provider given in the options).
#[cfg(feature = "rdma")]
fn rdma_precheck(opts: &SessionOptions) -> Result<(), MigrateError> {
    if opts.rdma_provider.is_some() {
        return Ok(());
    }
    crate::rdma::devices().map(drop)
}

#[cfg(not(feature = "rdma"))]
fn rdma_precheck(_opts: &SessionOptions) -> Result<(), MigrateError> {
    Err(not_built())
}

#[cfg(not(feature = "rdma"))]
fn not_built() -> MigrateError {
    MigrateError::Unsupported {
        transport: "rdma",
        what: "be used: this build lacks the `rdma` cargo feature".into(),
    }
}

/// The streams of an RDMA session: those of a TCP session (control, urgent, and the bulk
/// streams, which then carry frame headers), with RDMA queue pairs under the bulk streams.
#[cfg(feature = "rdma")]
fn rdma_source_streams(
    session: Session,
    endpoint: &Endpoint,
    reg: &Arc<MemoryRegistration>,
    layout: &Layout,
    opts: &SessionOptions,
) -> Result<SourceStreams, MigrateError> {
    let Endpoint::Tcp(peer) = endpoint else {
        return Err(MigrateError::Unsupported {
            transport: "rdma",
            what: format!("reach {endpoint}: RDMA sessions need a TCP address"),
        });
    };
    let mode = session.params.mode;
    let mut st = source_streams(session, reg, layout, opts)?;
    let headers = std::mem::take(&mut st.bulk);
    st.bulk = crate::rdma::source_bulk(&st.control, headers, *peer, layout, mode, opts)
        .inspect_err(|e| {
            // The destination waits for our queue pairs and regions: tell it why not.
            let reason = ferry_protocol::handshake::error_chain(e);
            let _ = st
                .control
                .send(&ferry_protocol::Frame::Abort { reason }, &[]);
        })?;
    st.transport = kind_name(TransportKind::Rdma).into();
    // Registration pinned, and so allocated, every page.
    st.sparse_memory = false;
    Ok(st)
}

#[cfg(not(feature = "rdma"))]
fn rdma_source_streams(
    _session: Session,
    _endpoint: &Endpoint,
    _reg: &Arc<MemoryRegistration>,
    _layout: &Layout,
    _opts: &SessionOptions,
) -> Result<SourceStreams, MigrateError> {
    Err(not_built())
}

/// The source side of a post-copy recovery: resumes `session` at `endpoint` (same key, same
/// proposal) and opens its streams over the registration the first connection made.
pub fn reconnect_source(
    endpoint: &Endpoint,
    session: SessionId,
    layout: &Layout,
    policy: &Policy,
    opts: &SessionOptions,
    reg: &Arc<MemoryRegistration>,
) -> Result<SourceStreams, MigrateError> {
    let s = ferry_transport::session::reconnect(
        endpoint,
        &connect_config(layout, policy, opts),
        session,
    )?;
    source_streams(s, reg, layout, opts)
}

fn connect_config(layout: &Layout, policy: &Policy, opts: &SessionOptions) -> ConnectConfig {
    ConnectConfig {
        auth: opts.auth.clone(),
        params: Params {
            mode: policy.mode,
            compression: policy.compression,
            checksums: policy.checksums,
            streams: opts.streams,
            transport: opts.transport,
            memory: layout.map().clone(),
            rdma: Vec::new(),
        },
        urgent: policy.mode != Mode::PreCopy,
        timeout: opts.timeout,
    }
}

fn clone_socket(s: &Socket) -> Result<Socket, MigrateError> {
    s.try_clone()
        .map_err(|source| MigrateError::Place { gpa: 0, source })
}

fn source_streams(
    session: Session,
    reg: &Arc<MemoryRegistration>,
    layout: &Layout,
    opts: &SessionOptions,
) -> Result<SourceStreams, MigrateError> {
    // One look at guest memory (see `Layout::fully_allocated`) serves the streams and the
    // senders: io_uring fixed buffers only when every page is allocated (otherwise `SEND_ZC`
    // works on plain addresses and untouched memory stays unallocated), and hole probing
    // only when some is not.
    let sparse_memory = !layout.fully_allocated();
    let mut stream = opts.stream;
    if sparse_memory && stream.fixed_buffers && opts.transport == TransportKind::Uring {
        tracing::info!(
            "guest memory is not fully allocated: no io_uring fixed buffers (registering pins, \
             and so allocates, every page); SEND_ZC on plain addresses"
        );
        stream.fixed_buffers = false;
    }
    let cfg = StreamConfig {
        backend: backend(session.params.transport),
        ..stream
    };
    let mut sockets = vec![clone_socket(session.control.socket())?];
    let mut bulk = Vec::with_capacity(session.bulk.len());
    for (i, s) in session.bulk.into_iter().enumerate() {
        sockets.push(clone_socket(&s)?);
        bulk.push(
            open_stream(s, i, reg, &cfg)
                .map_err(|source| MigrateError::Open { stream: i, source })?,
        );
    }
    let urgent_cfg = ferry_transport::urgent::urgent_config(IDLE_TIMEOUT);
    let urgent = match session.urgent {
        Some(s) => {
            sockets.push(clone_socket(&s)?);
            Some(
                open_stream(s, usize::MAX, reg, &urgent_cfg).map_err(|source| {
                    MigrateError::Open {
                        stream: usize::MAX,
                        source,
                    }
                })?,
            )
        }
        None => None,
    };
    Ok(SourceStreams {
        control: session.control,
        bulk,
        urgent,
        transport: kind_name(session.params.transport).into(),
        sockets,
        session: session.id,
        sparse_memory,
    })
}

/// The transports this build and host can serve: RDMA only with the `rdma` feature and a
/// device.
fn offered_transports() -> Vec<TransportKind> {
    #[cfg(feature = "rdma")]
    let rdma = crate::rdma::devices().is_ok();
    #[cfg(not(feature = "rdma"))]
    let rdma = false;
    [
        TransportKind::Tcp,
        TransportKind::Unix,
        TransportKind::Uring,
    ]
    .into_iter()
    .chain(rdma.then_some(TransportKind::Rdma))
    .collect()
}

/// The destination's server configuration for guest memory `layout`.
pub fn server_config(layout: &Layout, auth: Auth, max_streams: u16) -> ServerConfig {
    ServerConfig {
        auth,
        capabilities: Capabilities {
            modes: vec![Mode::PreCopy, Mode::PostCopy, Mode::Hybrid],
            compression: true,
            checksums: true,
            max_streams,
            transports: offered_transports(),
            memory: Some(layout.map().clone()),
            rdma: Vec::new(),
        },
    }
}

/// The destination side: accepts one whole session on `listener` (configured with
/// [`server_config`]), registers guest memory (with alias mappings of shared-backed regions),
/// opens the streams. Returns the negotiated parameters too.
pub fn accept_destination(
    listener: &SessionListener,
    layout: &Layout,
    opts: &SessionOptions,
    deadline: Duration,
) -> Result<(DestStreams, Arc<MemoryRegistration>, Params), MigrateError> {
    // Post-copy needs the urgent stream; the listener waits for it when the mode asks.
    let session = listener.accept_session_with(|p| p.mode != Mode::PreCopy, deadline)?;
    let mut aliases = Vec::new();
    for r in layout.regions() {
        aliases.push(match r.backing {
            Backing::Anonymous => None,
            _ => Some(AliasMapping::of_region(r).map_err(|e| MigrateError::Uffd {
                what: format!("alias mapping of region {:#x}: {e}", r.gpa),
            })?),
        });
    }
    let alias_addrs: Vec<Option<usize>> = aliases
        .iter()
        .map(|a| a.as_ref().and_then(|a| usize::try_from(a.addr()).ok()))
        .collect();
    let rdma = session.params.transport == TransportKind::Rdma;
    let reg = layout.register(
        Some(&alias_addrs),
        opts.page_cache && !rdma,
        opts.registration,
    )?;
    let params = session.params.clone();
    let streams = if rdma {
        let port = match (opts.rdma_port, listener.endpoint()?) {
            (0, Endpoint::Tcp(addr)) => addr.port(),
            (p, _) => p,
        };
        rdma_dest_streams(session, &reg, layout, opts, aliases, port)?
    } else {
        dest_streams(session, &reg, opts, aliases)?
    };
    Ok((streams, reg, params))
}

#[cfg(feature = "rdma")]
fn rdma_dest_streams(
    session: Session,
    reg: &Arc<MemoryRegistration>,
    layout: &Layout,
    opts: &SessionOptions,
    aliases: Vec<Option<AliasMapping>>,
    port: u16,
) -> Result<DestStreams, MigrateError> {
    let refuse = |control: &ferry_transport::session::ControlChannel, e: &MigrateError| {
        let message = ferry_protocol::handshake::error_chain(e);
        let _ = control.send(&ferry_protocol::Frame::Error { code: 1, message }, &[]);
    };
    let mode = session.params.mode;
    let local = session.control.socket().local_addr();
    let opts_tcp = SessionOptions {
        page_cache: false,
        ..opts.clone()
    };
    let mut st = dest_streams(session, reg, &opts_tcp, aliases)?;
    let Some(local) = local else {
        let e = MigrateError::Unsupported {
            transport: "rdma",
            what: "listen on a Unix-domain socket: RDMA sessions need a TCP address".into(),
        };
        refuse(&st.control, &e);
        return Err(e);
    };
    let headers = std::mem::take(&mut st.bulk);
    let (bulk, reads) = crate::rdma::dest_bulk(
        &st.control,
        headers,
        std::net::SocketAddr::new(local.ip(), port),
        layout,
        mode,
        opts,
    )
    .inspect_err(|e| refuse(&st.control, e))?;
    st.bulk = bulk;
    st.prepared = true;
    if let Some(fetch) = reads {
        // Page requests are answered by RDMA READs instead of the urgent TCP stream (which
        // stays open, idle, for the session's life): the fault handler writes them into one end
        // of a socket pair, the fetch reads them from the other.
        let (writer, reader) = std::os::unix::net::UnixStream::pair()
            .map_err(|source| MigrateError::Place { gpa: 0, source })?;
        let writer = Socket::Unix(writer, "rdma-read".into());
        let requests = Socket::Unix(reader, "rdma-read".into());
        st.sockets.push(clone_socket(&writer)?);
        st.sockets.push(clone_socket(&requests)?);
        st.urgent = Some((
            Replies::Fetch {
                requests,
                fetch: Box::new(fetch),
            },
            writer,
        ));
    }
    Ok(st)
}

#[cfg(not(feature = "rdma"))]
fn rdma_dest_streams(
    _session: Session,
    _reg: &Arc<MemoryRegistration>,
    _layout: &Layout,
    _opts: &SessionOptions,
    _aliases: Vec<Option<AliasMapping>>,
    _port: u16,
) -> Result<DestStreams, MigrateError> {
    Err(not_built())
}

/// The destination side of a post-copy recovery: waits up to `deadline` on `listener` for the
/// source to resume `session` (same key; anything else is refused, see
/// `SessionListener::accept_resume`) and opens its streams over the registration of the first
/// connection. For [`DestRecovery::accept`].
pub fn accept_recovery(
    listener: &SessionListener,
    session: SessionId,
    reg: &Arc<MemoryRegistration>,
    opts: &SessionOptions,
    deadline: Duration,
) -> Result<DestStreams, MigrateError> {
    let s = listener.accept_resume(session, |p| p.mode != Mode::PreCopy, deadline)?;
    dest_streams(s, reg, opts, Vec::new())
}

fn dest_streams(
    session: Session,
    reg: &Arc<MemoryRegistration>,
    opts: &SessionOptions,
    aliases: Vec<Option<AliasMapping>>,
) -> Result<DestStreams, MigrateError> {
    // Receivers idle legitimately (a stream with no dirty pages, post-copy waiting for faults):
    // they wait long, and the engine shuts their sockets down when it is done or gives up.
    // No fixed buffers here: registering guest memory with io_uring pins (so populates) every
    // page, and userfaultfd never reports a fault on a populated page, so in post-copy the
    // guest would run on the zero-filled pins instead of faulting. The destination only
    // receives, and receives into plain addresses; fixed buffers serve only `SEND_ZC`.
    let cfg = StreamConfig {
        backend: backend(session.params.transport),
        timeout: IDLE_TIMEOUT,
        fixed_buffers: false,
        ..opts.stream
    };
    let mut bulk = Vec::with_capacity(session.bulk.len());
    let mut sockets = Vec::new();
    for (i, s) in session.bulk.into_iter().enumerate() {
        sockets.push(clone_socket(&s)?);
        bulk.push(
            open_stream(s, i, reg, &cfg)
                .map_err(|source| MigrateError::Open { stream: i, source })?,
        );
    }
    let urgent_cfg = ferry_transport::urgent::urgent_config(IDLE_TIMEOUT);
    let urgent = match session.urgent {
        Some(s) => {
            sockets.push(clone_socket(&s)?);
            let writer = clone_socket(&s)?;
            let stream = open_stream(s, usize::MAX, reg, &urgent_cfg).map_err(|source| {
                MigrateError::Open {
                    stream: usize::MAX,
                    source,
                }
            })?;
            Some((Replies::Stream(stream), writer))
        }
        None => None,
    };
    Ok(DestStreams {
        control: session.control,
        bulk,
        urgent,
        page_cache: opts.page_cache,
        aliases,
        sockets,
        session: session.id,
        prepared: false,
    })
}

/// Both ends' reports of a [`migrate_local`] migration.
#[derive(Debug, Clone)]
pub struct LocalMigration {
    /// The source's report (blackout, phases, rounds, bytes, faults).
    pub source: MigrationReport,
    /// The destination's report.
    pub dest: DestReport,
}

/// Migrates `src` into `dst`, both in this process, over a loopback TCP session: the
/// destination listens on 127.0.0.1 (an ephemeral port) and receives on its own thread, the
/// source connects and migrates on the calling thread. Both VMs are given back to the caller
/// when both sides are done (the destination running unless its control says otherwise).
/// Errors from the source come first; the destination's are returned when the source
/// succeeded. For tests, benchmarks and VMMs that move a VM between two local instances.
pub fn migrate_local(
    src: SourceVm<'_>,
    dst: DestVm<'_>,
    policy: &Policy,
    opts: &SessionOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<LocalMigration, MigrateError> {
    let out = migrate_local_with(src, dst, policy, opts, &LocalRecovery::default(), progress)?;
    Ok(LocalMigration {
        source: out.source?,
        dest: out.dest?,
    })
}

/// Every socket of one side's connections (control, bulk, urgent; the first session's and
/// each resumed one's), so that a test can cut them all at once.
#[derive(Debug, Clone, Default)]
pub struct ConnectionTap(Arc<Mutex<Vec<Socket>>>);

impl ConnectionTap {
    fn add(&self, sockets: &[Socket]) {
        if let Ok(mut v) = self.0.lock() {
            v.extend(sockets.iter().filter_map(|s| s.try_clone().ok()));
        }
    }

    /// Shuts down (`shutdown(2)`, both directions) every socket added so far and forgets
    /// them; returns how many.
    pub fn cut(&self) -> usize {
        let sockets = self.0.lock().map(|mut v| std::mem::take(&mut *v));
        let sockets = sockets.unwrap_or_default();
        for s in &sockets {
            let _ = s.shutdown();
        }
        sockets.len()
    }
}

/// Recovery (post-copy, and of a switchover whose `Resumed` was lost) in a
/// [`migrate_local_with`] migration.
#[derive(Debug, Clone, Default)]
pub struct LocalRecovery {
    /// How long the source tries to resume the session after losing it (`None`: it does not).
    pub source_window: Option<Duration>,
    /// How long the destination waits for the resumption (`None`: it does not).
    pub dest_window: Option<Duration>,
    /// Receives every source socket.
    pub tap: ConnectionTap,
    /// Receives every destination socket (cutting these makes the destination's own sends
    /// fail, e.g. its `Resumed`).
    pub dest_tap: ConnectionTap,
}

/// Both ends' results of a [`migrate_local_with`] migration.
#[derive(Debug)]
pub struct LocalOutcome {
    /// The source's.
    pub source: Result<MigrationReport, MigrateError>,
    /// The destination's.
    pub dest: Result<DestReport, MigrateError>,
}

/// As [`migrate_local`], with recovery on either side as `recovery` says, and both
/// sides' results.
pub fn migrate_local_with(
    src: SourceVm<'_>,
    dst: DestVm<'_>,
    policy: &Policy,
    opts: &SessionOptions,
    recovery: &LocalRecovery,
    progress: &mut dyn FnMut(&Progress),
) -> Result<LocalOutcome, MigrateError> {
    migrate_on(
        std::net::Ipv4Addr::LOCALHOST.into(),
        src,
        dst,
        policy,
        opts,
        recovery,
        progress,
    )
}

/// As [`migrate_local`], with the destination listening on `ip` (an ephemeral port) instead of
/// loopback: RDMA sessions need the address of an RDMA interface, which rdmacm can route.
pub fn migrate_over(
    ip: std::net::IpAddr,
    src: SourceVm<'_>,
    dst: DestVm<'_>,
    policy: &Policy,
    opts: &SessionOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<LocalMigration, MigrateError> {
    let out = migrate_on(
        ip,
        src,
        dst,
        policy,
        opts,
        &LocalRecovery::default(),
        progress,
    )?;
    Ok(LocalMigration {
        source: out.source?,
        dest: out.dest?,
    })
}

fn migrate_on(
    ip: std::net::IpAddr,
    src: SourceVm<'_>,
    dst: DestVm<'_>,
    policy: &Policy,
    opts: &SessionOptions,
    recovery: &LocalRecovery,
    progress: &mut dyn FnMut(&Progress),
) -> Result<LocalOutcome, MigrateError> {
    let layout_d = Layout::new(dst.memory)?;
    let layout_s = Layout::new(src.memory)?;
    #[allow(unused_mut)]
    let mut config = server_config(
        &layout_d,
        opts.auth.clone(),
        ferry_protocol::handshake::MAX_STREAMS,
    );
    // A given RDMA provider (a simulator) serves RDMA without a device.
    #[cfg(feature = "rdma")]
    if opts.rdma_provider.is_some()
        && !config
            .capabilities
            .transports
            .contains(&TransportKind::Rdma)
    {
        config.capabilities.transports.push(TransportKind::Rdma);
    }
    let listener = SessionListener::bind(
        &Endpoint::Tcp(std::net::SocketAddr::new(ip, 0)),
        config,
        opts.timeout,
    )?;
    let endpoint = listener.endpoint()?;
    let tap = &recovery.tap;
    let dest_tap = &recovery.dest_tap;
    let tap_dest = |st: &DestStreams| {
        dest_tap.add(&st.sockets);
        if let Ok(c) = st.control.socket().try_clone() {
            dest_tap.add(&[c]);
        }
    };
    std::thread::scope(|s| {
        let dest = std::thread::Builder::new()
            .name("ferry-local-dest".into())
            .spawn_scoped(s, || -> Result<DestReport, MigrateError> {
                let (streams, reg, _) =
                    accept_destination(&listener, &layout_d, opts, policy.timeout)?;
                tap_dest(&streams);
                let mut accept = |id: SessionId, left: Duration| {
                    let st = accept_recovery(&listener, id, &reg, opts, left)?;
                    tap_dest(&st);
                    Ok(st)
                };
                let rec = recovery.dest_window.map(|window| DestRecovery {
                    window,
                    accept: &mut accept,
                });
                receive_with(dst, streams, policy.timeout, rec)
            })
            .map_err(|_| MigrateError::Worker("local destination"))?;
        let source =
            connect_source(&endpoint, &layout_s, policy, opts).and_then(|(streams, reg)| {
                tap.add(&streams.sockets);
                let session = streams.session;
                let mut reconnect = || {
                    let st = reconnect_source(&endpoint, session, &layout_s, policy, opts, &reg)?;
                    tap.add(&st.sockets);
                    Ok(st)
                };
                let rec = recovery.source_window.map(|window| SourceRecovery {
                    window,
                    reconnect: &mut reconnect,
                });
                migrate_with(src, streams, policy, progress, rec)
            });
        let dest = dest
            .join()
            .map_err(|_| MigrateError::Worker("local destination"))?;
        Ok(LocalOutcome { source, dest })
    })
}
