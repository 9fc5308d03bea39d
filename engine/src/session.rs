// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Opening a migration session on either side: the authenticated handshake
//! (`ferry_transport::session`), guest-memory registration with the transport, and one data
//! stream per connection.

use std::sync::Arc;
use std::time::Duration;

use ferry_protocol::handshake::{Auth, Capabilities, Mode, Params, ServerConfig, TransportKind};
use ferry_transport::memory::RegistrationConfig;
use ferry_transport::session::{ConnectConfig, SessionListener};
use ferry_transport::{Backend, Endpoint, MemoryRegistration, StreamConfig, open_stream};

use crate::dest::{DestReport, DestStreams, DestVm, receive};
use crate::error::MigrateError;
use crate::layout::Layout;
use crate::memory::AliasMapping;
use crate::policy::Policy;
use crate::report::MigrationReport;
use crate::source::{Progress, SourceStreams, SourceVm, migrate};
use crate::vm::Backing;

/// How long a receiving stream may sit idle; the engine ends idle streams itself by
/// shutting their sockets down.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Transport options of a session.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// The data transport (`Tcp`, `Unix` or `Uring`; RDMA sessions are set up by
    /// `ferry_transport::rdma`).
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
    let params = Params {
        mode: policy.mode,
        compression: policy.compression,
        checksums: policy.checksums,
        streams: opts.streams,
        transport: opts.transport,
        memory: layout.map().clone(),
        rdma: Vec::new(),
    };
    let session = ferry_transport::session::connect(
        endpoint,
        &ConnectConfig {
            auth: opts.auth.clone(),
            params,
            urgent: policy.mode != Mode::PreCopy,
            timeout: opts.timeout,
        },
    )?;
    let reg = layout.register(None, opts.registration)?;
    let cfg = StreamConfig {
        backend: backend(session.params.transport),
        ..opts.stream
    };
    let mut bulk = Vec::with_capacity(session.bulk.len());
    for (i, s) in session.bulk.into_iter().enumerate() {
        bulk.push(
            open_stream(s, i, &reg, &cfg)
                .map_err(|source| MigrateError::Open { stream: i, source })?,
        );
    }
    let urgent_cfg = ferry_transport::urgent::urgent_config(IDLE_TIMEOUT);
    let mut sockets = Vec::new();
    let urgent = match session.urgent {
        Some(s) => {
            sockets.push(
                s.try_clone()
                    .map_err(|source| MigrateError::Place { gpa: 0, source })?,
            );
            Some(
                open_stream(s, usize::MAX, &reg, &urgent_cfg).map_err(|source| {
                    MigrateError::Open {
                        stream: usize::MAX,
                        source,
                    }
                })?,
            )
        }
        None => None,
    };
    Ok((
        SourceStreams {
            control: session.control,
            bulk,
            urgent,
            transport: kind_name(session.params.transport).into(),
            sockets,
        },
        reg,
    ))
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
            transports: vec![
                TransportKind::Tcp,
                TransportKind::Unix,
                TransportKind::Uring,
            ],
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
    let reg = layout.register(Some(&alias_addrs), opts.registration)?;
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
        sockets.push(
            s.try_clone()
                .map_err(|source| MigrateError::Place { gpa: 0, source })?,
        );
        bulk.push(
            open_stream(s, i, &reg, &cfg)
                .map_err(|source| MigrateError::Open { stream: i, source })?,
        );
    }
    let urgent_cfg = ferry_transport::urgent::urgent_config(IDLE_TIMEOUT);
    let urgent = match session.urgent {
        Some(s) => {
            sockets.push(
                s.try_clone()
                    .map_err(|source| MigrateError::Place { gpa: 0, source })?,
            );
            let writer = s
                .try_clone()
                .map_err(|source| MigrateError::Place { gpa: 0, source })?;
            let stream = open_stream(s, usize::MAX, &reg, &urgent_cfg).map_err(|source| {
                MigrateError::Open {
                    stream: usize::MAX,
                    source,
                }
            })?;
            Some((stream, writer))
        }
        None => None,
    };
    Ok((
        DestStreams {
            control: session.control,
            bulk,
            urgent,
            aliases,
            sockets,
        },
        reg,
        session.params,
    ))
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
    let layout_d = Layout::new(dst.memory)?;
    let layout_s = Layout::new(src.memory)?;
    let listener = SessionListener::bind(
        &Endpoint::Tcp(std::net::SocketAddr::from((
            std::net::Ipv4Addr::LOCALHOST,
            0,
        ))),
        server_config(
            &layout_d,
            opts.auth.clone(),
            ferry_protocol::handshake::MAX_STREAMS,
        ),
        opts.timeout,
    )?;
    let endpoint = listener.endpoint()?;
    std::thread::scope(|s| {
        let dest = std::thread::Builder::new()
            .name("ferry-local-dest".into())
            .spawn_scoped(s, || -> Result<DestReport, MigrateError> {
                let (streams, reg, _) =
                    accept_destination(&listener, &layout_d, opts, policy.timeout)?;
                let report = receive(dst, streams, policy.timeout);
                drop(reg);
                report
            })
            .map_err(|_| MigrateError::Worker("local destination"))?;
        let source =
            connect_source(&endpoint, &layout_s, policy, opts).and_then(|(streams, reg)| {
                let r = migrate(src, streams, policy, progress);
                drop(reg);
                r
            });
        let dest = dest
            .join()
            .map_err(|_| MigrateError::Worker("local destination"))?;
        Ok(LocalMigration {
            source: source?,
            dest: dest?,
        })
    })
}
