// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Sessions: one migration's set of authenticated connections.
//!
//! A session is one control stream, `N` bulk streams and (for post-copy) one urgent stream,
//! each opened by `ferry-protocol`'s handshake over a connected [`Socket`]. The control stream
//! negotiates the parameters and receives the session id; every other stream presents that id
//! and is refused when it names a session the listener does not know. No byte other than the
//! handshake is read from a stream before its handshake succeeded.
//!
//! A session whose connections were lost can be resumed (post-copy recovery): the client's
//! [`reconnect`] opens a control stream naming the session, authenticated like the first one,
//! and the listener's [`SessionListener::accept_resume`] accepts exactly that session and
//! refuses everything else while it waits.
//!
//! This module does the handshakes with blocking socket I/O and hands back the sockets; the
//! caller turns bulk and urgent sockets into data streams ([`crate::stream::open_stream`]) and
//! uses [`ControlChannel`] for control frames. It owns no migration policy.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_protocol::frame::{Frame, FrameHeader, HEADER_LEN, MAX_META_LEN};
use ferry_protocol::handshake::{
    self, Auth, ClientConfig, ClientHandshake, Established, HandshakeError, Params, Role,
    ServerConfig, ServerHandshake, SessionId,
};
use ferry_protocol::{Command, DecodeError};
use thiserror::Error;
use tracing::{info, warn};

use crate::error::ConnectError;
use crate::socket::{Endpoint, Listener, Socket};

/// Error setting up or using a session's connections.
#[derive(Debug, Error)]
pub enum SessionError {
    /// Connecting or accepting failed.
    #[error("Connection setup failed")]
    Connect(#[from] ConnectError),
    /// The handshake on a stream failed.
    #[error("Handshake with {peer} ({role:?} stream {index}) failed")]
    Handshake {
        /// The peer.
        peer: String,
        /// The stream's role.
        role: Role,
        /// The stream's index.
        index: u16,
        /// Why.
        #[source]
        source: HandshakeError,
    },
    /// Socket I/O failed.
    #[error("I/O with {peer} on the {role:?} stream failed during {during}")]
    Io {
        /// The peer.
        peer: String,
        /// The stream's role.
        role: Role,
        /// What was being done.
        during: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The peer closed the connection.
    #[error("{peer} closed the {role:?} stream during {during}")]
    Closed {
        /// The peer.
        peer: String,
        /// The stream's role.
        role: Role,
        /// What was being done.
        during: &'static str,
    },
    /// A frame could not be decoded.
    #[error("Bad frame from {peer} on the {role:?} stream")]
    Decode {
        /// The peer.
        peer: String,
        /// The stream's role.
        role: Role,
        /// Why.
        #[source]
        source: DecodeError,
    },
    /// Not every stream joined in time.
    #[error("Session {session}: only {joined} of {expected} streams joined within {waited:?}")]
    Incomplete {
        /// The session.
        session: SessionId,
        /// Streams that joined.
        joined: usize,
        /// Streams expected.
        expected: usize,
        /// How long the listener waited.
        waited: Duration,
    },
    /// A payload larger than the caller accepts.
    #[error("Payload of {len} bytes on the control stream exceeds {max}")]
    PayloadTooLarge {
        /// Announced length.
        len: u64,
        /// The caller's limit.
        max: u64,
    },
}

/// A connected stream whose handshake succeeded.
#[derive(Debug)]
pub struct JoinedStream {
    /// The socket, ready for data.
    pub socket: Socket,
    /// What the handshake established.
    pub established: Established,
}

/// All the connections of one session, on either side.
#[derive(Debug)]
pub struct Session {
    /// The session id.
    pub id: SessionId,
    /// The negotiated parameters.
    pub params: Params,
    /// The source's proposal (on the destination: carries the source's RDMA regions).
    pub proposal: Params,
    /// Whether the streams are authenticated.
    pub authenticated: bool,
    /// The control stream.
    pub control: ControlChannel,
    /// Bulk streams, by index.
    pub bulk: Vec<Socket>,
    /// The urgent stream, if one was requested.
    pub urgent: Option<Socket>,
}

fn write_all(sock: &Socket, bytes: &[u8]) -> io::Result<()> {
    match sock {
        Socket::Tcp(s, _) => (&*s).write_all(bytes),
        Socket::Unix(s, _) => (&*s).write_all(bytes),
    }
}

fn read_exact(sock: &Socket, buf: &mut [u8]) -> io::Result<()> {
    match sock {
        Socket::Tcp(s, _) => (&*s).read_exact(buf),
        Socket::Unix(s, _) => (&*s).read_exact(buf),
    }
}

/// An I/O error on a session socket: end-of-file means the peer closed.
fn io_error(peer: &str, role: Role, during: &'static str, source: io::Error) -> SessionError {
    if source.kind() == io::ErrorKind::UnexpectedEof {
        SessionError::Closed {
            peer: peer.to_string(),
            role,
            during,
        }
    } else {
        SessionError::Io {
            peer: peer.to_string(),
            role,
            during,
            source,
        }
    }
}

/// Reads one frame's header and metadata (not its payload).
fn read_frame_meta(
    sock: &Socket,
    role: Role,
    during: &'static str,
) -> Result<(FrameHeader, Vec<u8>), SessionError> {
    let io_err = |source: io::Error| io_error(sock.peer(), role, during, source);
    let mut h = [0u8; HEADER_LEN];
    read_exact(sock, &mut h).map_err(io_err)?;
    let header = FrameHeader::decode(&h).map_err(|source| SessionError::Decode {
        peer: sock.peer().to_string(),
        role,
        source,
    })?;
    // decode() bounded meta_len by MAX_META_LEN.
    debug_assert!(header.meta_len <= MAX_META_LEN);
    let mut meta = vec![0u8; header.meta_len as usize];
    read_exact(sock, &mut meta).map_err(io_err)?;
    Ok((header, meta))
}

fn client_handshake(sock: &Socket, cfg: ClientConfig) -> Result<Established, SessionError> {
    let role = cfg.role;
    let index = cfg.stream_index;
    let hs_err = |source| SessionError::Handshake {
        peer: sock.peer().to_string(),
        role,
        index,
        source,
    };
    let io_err = |source| SessionError::Io {
        peer: sock.peer().to_string(),
        role,
        during: "handshake",
        source,
    };
    let (state, hello) = ClientHandshake::start(cfg).map_err(hs_err)?;
    write_all(sock, &hello).map_err(io_err)?;
    let (h, m) = read_frame_meta(sock, role, "handshake")?;
    let (auth, established) = match state.on_server_hello(&h, &m) {
        Ok(x) => x,
        Err(e) => {
            // Tell the server why, unless it was the one refusing.
            if !matches!(e, HandshakeError::Refused { .. }) {
                let _ = write_all(sock, &e.refusal_frame());
            }
            return Err(hs_err(e));
        }
    };
    write_all(sock, &auth).map_err(io_err)?;
    let (h, m) = read_frame_meta(sock, role, "handshake")?;
    handshake::finish_client(&h, &m).map_err(hs_err)?;
    Ok(established)
}

/// What the source asks for when it opens a session.
#[derive(Debug, Clone)]
pub struct ConnectConfig {
    /// Authentication.
    pub auth: Auth,
    /// The proposal.
    pub params: Params,
    /// Open an urgent stream (post-copy and hybrid).
    pub urgent: bool,
    /// Timeout for connecting and for each handshake step.
    pub timeout: Duration,
}

/// Opens a session to `endpoint`: control stream, then the negotiated number of bulk
/// streams, then the urgent stream if asked.
pub fn connect(endpoint: &Endpoint, cfg: &ConnectConfig) -> Result<Session, SessionError> {
    open_session(endpoint, cfg, None)
}

/// Resumes session `session` at `endpoint` after its connections were lost (post-copy
/// recovery): the control stream names the session and authenticates exactly as
/// [`connect`]'s does, then the bulk and urgent streams join it again. The listener accepts
/// this only while it waits for that session ([`SessionListener::accept_resume`]).
pub fn reconnect(
    endpoint: &Endpoint,
    cfg: &ConnectConfig,
    session: SessionId,
) -> Result<Session, SessionError> {
    open_session(endpoint, cfg, Some(session))
}

fn open_session(
    endpoint: &Endpoint,
    cfg: &ConnectConfig,
    resume: Option<SessionId>,
) -> Result<Session, SessionError> {
    let open = |role, stream_index, session, params| -> Result<JoinedStream, SessionError> {
        let socket = Socket::connect(endpoint, cfg.timeout)?;
        socket.set_timeouts(cfg.timeout)?;
        let established = client_handshake(
            &socket,
            ClientConfig {
                auth: cfg.auth.clone(),
                role,
                stream_index,
                session,
                params,
            },
        )?;
        Ok(JoinedStream {
            socket,
            established,
        })
    };
    let control = open(Role::Control, 0, resume, Some(cfg.params.clone()))?;
    let id = control.established.session;
    let params = control
        .established
        .params
        .clone()
        .ok_or_else(|| SessionError::Handshake {
            peer: control.socket.peer().to_string(),
            role: Role::Control,
            index: 0,
            source: HandshakeError::Params(Role::Control),
        })?;
    let mut bulk = Vec::with_capacity(usize::from(params.streams));
    for i in 0..params.streams {
        bulk.push(open(Role::Bulk, i, Some(id), None)?.socket);
    }
    let urgent = if cfg.urgent {
        Some(open(Role::Urgent, 0, Some(id), None)?.socket)
    } else {
        None
    };
    info!(session = %id, streams = params.streams, authenticated = control.established.authenticated, "session open");
    Ok(Session {
        id,
        params,
        proposal: cfg.params.clone(),
        authenticated: control.established.authenticated,
        control: ControlChannel::new(control.socket, Role::Control),
        bulk,
        urgent,
    })
}

#[derive(Debug, Default)]
struct Pending {
    control: Option<JoinedStream>,
    bulk: HashMap<u16, Socket>,
    urgent: Option<Socket>,
}

/// A listener that accepts whole sessions.
#[derive(Debug)]
pub struct SessionListener {
    listener: Listener,
    config: ServerConfig,
    timeout: Duration,
    refusals: Mutex<Vec<String>>,
}

impl SessionListener {
    /// Listens on `endpoint` with the given server configuration; `timeout` bounds each
    /// handshake step.
    pub fn bind(
        endpoint: &Endpoint,
        config: ServerConfig,
        timeout: Duration,
    ) -> Result<Self, SessionError> {
        Ok(Self {
            listener: Listener::bind(endpoint)?,
            config,
            timeout,
            refusals: Mutex::new(Vec::new()),
        })
    }

    /// The bound endpoint (with the real port).
    pub fn endpoint(&self) -> Result<Endpoint, SessionError> {
        Ok(self.listener.endpoint()?)
    }

    /// Replaces the server configuration (e.g. once the destination VM exists).
    pub fn set_config(&mut self, config: ServerConfig) {
        self.config = config;
    }

    /// Messages of the handshakes refused so far (each also logged).
    pub fn refusals(&self) -> Vec<String> {
        self.refusals.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn refuse(&self, peer: &str, e: &HandshakeError) {
        let msg = format!("Refused {peer}: {}", handshake::error_chain(e));
        warn!("{msg}");
        if let Ok(mut r) = self.refusals.lock() {
            r.push(msg);
        }
    }

    /// Accepts connections until one session is complete (control, every bulk stream, and the
    /// urgent stream when `urgent`), or fails after `deadline`. Connections that fail their
    /// handshake (wrong key, no key, replay, unknown session, bad version) are refused with a
    /// reason, recorded in [`SessionListener::refusals`], and do not end the wait.
    pub fn accept_session(
        &self,
        urgent: bool,
        deadline: Duration,
    ) -> Result<Session, SessionError> {
        self.accept_session_with(|_| urgent, deadline)
    }

    /// As [`SessionListener::accept_session`], deciding from the negotiated parameters whether
    /// the session needs an urgent stream (post-copy and hybrid do).
    pub fn accept_session_with(
        &self,
        needs_urgent: impl Fn(&Params) -> bool,
        deadline: Duration,
    ) -> Result<Session, SessionError> {
        self.accept(needs_urgent, deadline, None)
    }

    /// Waits up to `deadline` for the source to resume session `id` (post-copy recovery): a
    /// control stream naming `id`, authenticated with the same key ([`reconnect`]), then its
    /// bulk streams and the urgent stream when `needs_urgent`. Anything else is refused with a
    /// reason and recorded in [`SessionListener::refusals`]: a wrong or missing key, another
    /// session id, and a new session (this listener is busy recovering).
    pub fn accept_resume(
        &self,
        id: SessionId,
        needs_urgent: impl Fn(&Params) -> bool,
        deadline: Duration,
    ) -> Result<Session, SessionError> {
        self.accept(needs_urgent, deadline, Some(id))
    }

    fn accept(
        &self,
        needs_urgent: impl Fn(&Params) -> bool,
        deadline: Duration,
        resume: Option<SessionId>,
    ) -> Result<Session, SessionError> {
        let start = Instant::now();
        let mut sessions: HashMap<SessionId, Pending> = HashMap::new();
        loop {
            let left = deadline.saturating_sub(start.elapsed());
            if left.is_zero() {
                let (session, joined, expected) = sessions
                    .iter()
                    .find_map(|(id, p)| {
                        p.control.as_ref().map(|c| {
                            let n = c.established.params.as_ref().map_or(0, |p| p.streams);
                            let urgent = c.established.params.as_ref().is_some_and(&needs_urgent);
                            (
                                *id,
                                1 + p.bulk.len() + usize::from(p.urgent.is_some()),
                                1 + usize::from(n) + usize::from(urgent),
                            )
                        })
                    })
                    .unwrap_or((SessionId::default(), 0, 1));
                return Err(SessionError::Incomplete {
                    session,
                    joined,
                    expected,
                    waited: deadline,
                });
            }
            let socket = match self.listener.accept(left) {
                Ok(s) => s,
                Err(ConnectError::Accept { source, .. })
                    if source.kind() == io::ErrorKind::TimedOut =>
                {
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            socket.set_timeouts(self.timeout)?;
            // Opening: streams join the sessions opened here. Resuming: only the old session
            // is known, for its control stream as for the others.
            let known: Vec<SessionId> = match resume {
                Some(id) => vec![id],
                None => sessions.keys().copied().collect(),
            };
            let joined = match self.server_handshake(&socket, &known) {
                Ok(est) => est,
                Err(e) => {
                    let (peer, source) = match &e {
                        SessionError::Handshake { peer, source, .. } => {
                            (peer.clone(), source.clone())
                        }
                        other => {
                            warn!("Connection from {} dropped: {other}", socket.peer());
                            continue;
                        }
                    };
                    self.refuse(&peer, &source);
                    continue;
                }
            };
            if joined.role == Role::Control && joined.resumed != resume.is_some() {
                let what = if joined.resumed {
                    "resumption of a session while none is being recovered"
                } else {
                    "new session while a session is being recovered"
                };
                let msg = format!("Refused {}: {what} ({})", socket.peer(), joined.session);
                warn!("{msg}");
                if let Ok(mut r) = self.refusals.lock() {
                    r.push(msg);
                }
                let _ = socket.shutdown();
                continue;
            }
            let id = joined.session;
            let p = sessions.entry(id).or_default();
            match joined.role {
                Role::Control => {
                    p.control = Some(JoinedStream {
                        socket,
                        established: joined,
                    });
                }
                Role::Bulk => {
                    p.bulk.insert(joined.stream_index, socket);
                }
                Role::Urgent => p.urgent = Some(socket),
            }
            if let Some(c) = &p.control {
                let n = c.established.params.as_ref().map_or(0, |x| x.streams);
                let urgent = c.established.params.as_ref().is_some_and(&needs_urgent);
                let complete =
                    (0..n).all(|i| p.bulk.contains_key(&i)) && (!urgent || p.urgent.is_some());
                if complete {
                    let p = sessions.remove(&id).unwrap_or_default();
                    return assemble(id, p);
                }
            }
        }
    }

    fn server_handshake(
        &self,
        socket: &Socket,
        known: &[SessionId],
    ) -> Result<Established, SessionError> {
        let peer = socket.peer().to_string();
        let (h, m) = read_frame_meta(socket, Role::Control, "handshake")?;
        let new_id = SessionId::random().map_err(|e| SessionError::Handshake {
            peer: peer.clone(),
            role: Role::Control,
            index: 0,
            source: e.into(),
        })?;
        let fail = |e: HandshakeError| {
            let _ = write_all(socket, &e.refusal_frame());
            SessionError::Handshake {
                peer: peer.clone(),
                role: Role::Control,
                index: 0,
                source: e,
            }
        };
        let (state, hello) =
            ServerHandshake::on_client_hello(&self.config, &h, &m, new_id, &|s| known.contains(s))
                .map_err(fail)?;
        write_all(socket, &hello).map_err(|source| SessionError::Io {
            peer: peer.clone(),
            role: Role::Control,
            during: "handshake",
            source,
        })?;
        let (h, m) = read_frame_meta(socket, Role::Control, "handshake")?;
        let est = state.on_client_auth(&h, &m).map_err(fail)?;
        write_all(socket, &handshake::auth_ok_frame()).map_err(|source| SessionError::Io {
            peer: peer.clone(),
            role: est.role,
            during: "handshake",
            source,
        })?;
        Ok(est)
    }
}

fn assemble(id: SessionId, p: Pending) -> Result<Session, SessionError> {
    let Some(control) = p.control else {
        return Err(SessionError::Incomplete {
            session: id,
            joined: p.bulk.len(),
            expected: p.bulk.len() + 1,
            waited: Duration::ZERO,
        });
    };
    let params = control
        .established
        .params
        .clone()
        .ok_or_else(|| SessionError::Handshake {
            peer: control.socket.peer().to_string(),
            role: Role::Control,
            index: 0,
            source: HandshakeError::Params(Role::Control),
        })?;
    let proposal = control
        .established
        .proposal
        .clone()
        .unwrap_or_else(|| params.clone());
    let mut bulk: Vec<(u16, Socket)> = p.bulk.into_iter().collect();
    bulk.sort_by_key(|(i, _)| *i);
    info!(session = %id, streams = bulk.len(), "session accepted");
    Ok(Session {
        id,
        params,
        proposal,
        authenticated: control.established.authenticated,
        control: ControlChannel::new(control.socket, Role::Control),
        bulk: bulk.into_iter().map(|(_, s)| s).collect(),
        urgent: p.urgent,
    })
}

/// Frames over a blocking socket: the control stream (and anything else that is not bulk
/// page data). Sends are whole frames; receives return the decoded frame and, for frames with
/// a payload, let the caller read it.
#[derive(Debug)]
pub struct ControlChannel {
    socket: Socket,
    role: Role,
}

impl ControlChannel {
    /// Wraps a socket whose handshake is done.
    pub fn new(socket: Socket, role: Role) -> Self {
        Self { socket, role }
    }

    /// The socket.
    pub fn socket(&self) -> &Socket {
        &self.socket
    }

    /// The peer's name.
    pub fn peer(&self) -> &str {
        self.socket.peer()
    }

    /// A second handle on the same connection (one thread reads, another writes).
    pub fn try_clone(&self) -> Result<Self, SessionError> {
        Ok(Self {
            socket: self
                .socket
                .try_clone()
                .map_err(|source| self.io("clone", source))?,
            role: self.role,
        })
    }

    fn io(&self, during: &'static str, source: io::Error) -> SessionError {
        io_error(self.peer(), self.role, during, source)
    }

    /// Sends a frame with its payload (empty for frames without one).
    pub fn send(&self, frame: &Frame, payload: &[u8]) -> Result<(), SessionError> {
        self.send_all(&[(frame, payload)])
    }

    /// Sends several frames (each with its payload) in one write: one wake-up of the peer's
    /// reader instead of one per frame (tens of µs each on a loaded host).
    pub fn send_all(&self, frames: &[(&Frame, &[u8])]) -> Result<(), SessionError> {
        let mut buf = Vec::new();
        for (frame, payload) in frames {
            debug_assert_eq!(frame.payload_len(), payload.len() as u64);
            buf.extend_from_slice(&frame.encode());
            buf.extend_from_slice(payload);
        }
        write_all(&self.socket, &buf).map_err(|e| self.io("send", e))
    }

    /// Receives a frame's header and metadata; its payload (if any, `payload_len` bytes) must
    /// then be read with [`ControlChannel::read_payload`] or [`ControlChannel::read_payload_vec`].
    pub fn recv(&self) -> Result<(FrameHeader, Frame), SessionError> {
        let (h, m) = read_frame_meta(&self.socket, self.role, "receive")?;
        if matches!(
            h.command,
            Command::ClientHello | Command::ServerHello | Command::ClientAuth | Command::AuthOk
        ) {
            return Err(SessionError::Decode {
                peer: self.peer().to_string(),
                role: self.role,
                source: DecodeError::UnknownCommand {
                    code: h.command as u16,
                },
            });
        }
        let f = Frame::decode(&h, &m).map_err(|source| SessionError::Decode {
            peer: self.peer().to_string(),
            role: self.role,
            source,
        })?;
        Ok((h, f))
    }

    /// Reads exactly `buf.len()` payload bytes.
    pub fn read_payload(&self, buf: &mut [u8]) -> Result<(), SessionError> {
        read_exact(&self.socket, buf).map_err(|e| self.io("payload", e))
    }

    /// Reads a payload of `len` bytes into a new vector, refusing more than `max`.
    pub fn read_payload_vec(&self, len: u64, max: u64) -> Result<Vec<u8>, SessionError> {
        if len > max {
            return Err(SessionError::PayloadTooLarge { len, max });
        }
        let n = usize::try_from(len).map_err(|_| SessionError::PayloadTooLarge { len, max })?;
        let mut v = vec![0u8; n];
        self.read_payload(&mut v)?;
        Ok(v)
    }

    /// Sets the receive timeout (`None` blocks forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> Result<(), SessionError> {
        let r = match &self.socket {
            Socket::Tcp(s, _) => s.set_read_timeout(t),
            Socket::Unix(s, _) => s.set_read_timeout(t),
        };
        r.map_err(|e| self.io("set timeout", e))
    }

    /// Shuts the connection down.
    pub fn shutdown(&self) {
        let _ = self.socket.shutdown();
    }
}
