// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The versioned, mutually authenticated handshake that opens every stream.
//!
//! Three messages authenticate both sides with a pre-shared key (PSK) and bind the result to
//! everything negotiated:
//!
//! 1. `ClientHello`: magic, the version range the client speaks, a fresh 32-byte client nonce,
//!    the stream's role (control, bulk, urgent) and index, the session id (zero on the control
//!    stream, which opens a session; the session's id on every other stream), whether the client
//!    authenticates, and, on the control stream, the proposed [`Params`].
//! 2. `ServerHello`: the chosen version, a fresh server nonce, the session id, the negotiated
//!    [`Params`] (control stream), and `MAC_s = keyed_blake3(K, "server" || T)` where `T` is the
//!    blake3 hash of both hellos (the server's without its MAC) and `K` is derived from the PSK.
//! 3. `ClientAuth`: `MAC_c = keyed_blake3(K, "client" || T)`; the server answers `AuthOk`.
//!
//! Each side proves knowledge of the key over a transcript containing the other side's fresh
//! nonce, so a recorded handshake replayed to either side fails its MAC check; a peer without
//! the key cannot produce either MAC; and since `T` covers the parameters, a tampered
//! negotiation fails too. No frame other than the handshake is accepted before `AuthOk`, so no
//! byte of guest memory moves on an unauthenticated stream. Either side may answer `Refused`
//! with a reason, which the other side reports.
//!
//! **Resuming a session** (post-copy recovery, version 3): a control stream whose
//! `ClientHello` names an existing session id (instead of zero) asks to resume that session
//! after its connections were lost. The server accepts it only for a session it knows (else
//! `Unknown session`), with the same three messages, so the resuming client proves the key
//! over fresh nonces exactly as the opening one did: a stranger without the key cannot take
//! a session over, and a recorded handshake cannot be replayed. [`Established::resumed`] tells
//! both sides which it was; the new bulk and urgent streams then join the session as usual.
//!
//! `Auth::Insecure` (the CLI's `--insecure-no-auth`) skips the MACs; both sides must choose it,
//! and a side that has a key refuses a peer that does not.
//!
//! The handshake authenticates; it does not encrypt. Page data moves in clear on the data
//! streams (zero-copy and RDMA are incompatible with a TLS record layer): run ferry on a
//! trusted migration network, as QEMU and Cloud Hypervisor deployments do.

use std::fmt;

use thiserror::Error;

use crate::codec::{DecodeError, Reader, Writer};
use crate::frame::{Command, FrameHeader, HEADER_LEN, MAX_MESSAGE_LEN};
use crate::memmap::{GpaRange, MAX_REGIONS, MemoryMap, MemoryMapError};

/// The eight bytes every `ClientHello` starts with.
pub const MAGIC: [u8; 8] = *b"FERRYMIG";
/// The newest protocol version this build speaks.
///
/// History: 1, the first; 2, `FaultStats` carries the count of locally resolved faults; 3,
/// post-copy recovery: a control stream may name an existing session to resume it, and the
/// `Missing` frame; the `FirstTouch` hint at a post-copy switchover; 4, the switchover's point
/// of no return: a session may also be resumed after the source sent `State` but before it
/// saw `Resumed` (stop-and-copy as well as post-copy), and on every resumed session the
/// destination's first control frame says whether it runs the VM (`Resumed` again) or never
/// will (`Abort`); an `Error` or `Abort` the destination sends before `Resumed` promises that
/// its VM does not run and never will (the source may then resume its own).
pub const PROTOCOL_VERSION: u16 = 4;
/// The oldest protocol version this build speaks (4: a version-3 destination does not answer a
/// resumption before `Resumed`, and a version-3 source resumes its VM when `Resumed` is lost,
/// so a migration with either could end with the VM running on both sides).
pub const MIN_PROTOCOL_VERSION: u16 = 4;
/// Most parallel bulk streams in one session.
pub const MAX_STREAMS: u16 = 64;
const MAC_CONTEXT: &str = "ferry 2026-11-25 handshake MAC key v1";

/// A 32-byte pre-shared key.
#[derive(Clone, PartialEq, Eq)]
pub struct Psk([u8; 32]);

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Psk(<redacted>)")
    }
}

/// A key could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyError {
    /// Not 64 hexadecimal digits.
    #[error("Key must be 64 hexadecimal digits (32 bytes), found {found} characters")]
    Length {
        /// Characters found (after trimming white space).
        found: usize,
    },
    /// A character that is not a hex digit.
    #[error("Key has a non-hexadecimal character at position {position}")]
    NotHex {
        /// Position of the character.
        position: usize,
    },
    /// The system random source failed.
    #[error("Cannot read random bytes from /dev/urandom: {0}")]
    Random(String),
}

impl Psk {
    /// A key from raw bytes.
    pub fn from_bytes(b: [u8; 32]) -> Self {
        Self(b)
    }

    /// Parses 64 hex digits (surrounding white space ignored).
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        let s = s.trim();
        if s.len() != 64 {
            return Err(KeyError::Length {
                found: s.chars().count(),
            });
        }
        let mut out = [0u8; 32];
        let b = s.as_bytes();
        for (i, byte) in out.iter_mut().enumerate() {
            let hi = hex_val(b[2 * i]).ok_or(KeyError::NotHex { position: 2 * i })?;
            let lo = hex_val(b[2 * i + 1]).ok_or(KeyError::NotHex {
                position: 2 * i + 1,
            })?;
            *byte = hi << 4 | lo;
        }
        Ok(Self(out))
    }

    /// The key as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// A fresh random key.
    pub fn generate() -> Result<Self, KeyError> {
        Ok(Self(random_bytes()?))
    }

    fn mac_key(&self) -> [u8; 32] {
        blake3::derive_key(MAC_CONTEXT, &self.0)
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `N` bytes from the kernel's random source.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], KeyError> {
    use std::io::Read;
    let mut out = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut out))
        .map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(out)
}

/// How a side authenticates.
#[derive(Debug, Clone)]
pub enum Auth {
    /// Mutual authentication with a pre-shared key.
    Psk(Psk),
    /// No authentication (benchmarks on a trusted host only). Both sides must choose it.
    Insecure,
}

impl Auth {
    fn wire(&self) -> u8 {
        match self {
            Auth::Psk(_) => 1,
            Auth::Insecure => 0,
        }
    }
}

/// The identity of one migration; binds all its streams.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SessionId(pub [u8; 16]);

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl SessionId {
    /// A fresh random session id.
    pub fn random() -> Result<Self, KeyError> {
        Ok(Self(random_bytes()?))
    }

    fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }
}

/// Defines a one-byte wire enum (`#[repr(u8)]`, explicit values) with `from_wire`, which
/// decodes exactly those values and names `$field` in the error for any other.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident ($field:literal) {
            $($(#[$vmeta:meta])* $variant:ident = $value:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u8)]
        $vis enum $name {
            $($(#[$vmeta])* $variant = $value,)+
        }

        impl $name {
            fn from_wire(v: u8) -> Result<Self, DecodeError> {
                match v {
                    $($value => Ok(Self::$variant),)+
                    _ => Err(DecodeError::InvalidValue {
                        field: $field,
                        value: u64::from(v),
                    }),
                }
            }
        }
    };
}

wire_enum! {
    /// What a stream carries.
    pub enum Role ("role") {
        /// The session's control stream: opens the session, carries control frames and state.
        Control = 1,
        /// A bulk page-data stream.
        Bulk = 2,
        /// The urgent stream for post-copy page requests and replies.
        Urgent = 3,
    }
}

wire_enum! {
    /// Migration modes, also used as a bit set in negotiation.
    pub enum Mode ("mode") {
        /// Iterative pre-copy, then stop-and-copy.
        PreCopy = 1,
        /// Switch over at once; demand-fetch and push the rest.
        PostCopy = 2,
        /// Pre-copy while it converges, then post-copy.
        Hybrid = 4,
    }
}

/// Page compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// None.
    None,
    /// zstd at the given level (negative levels are the fast ones).
    Zstd {
        /// Compression level.
        level: i8,
    },
}

wire_enum! {
    /// The kind of data transport the streams use.
    pub enum TransportKind ("transport") {
        /// Plain blocking TCP sockets.
        Tcp = 1,
        /// Plain blocking Unix-domain sockets.
        Unix = 2,
        /// io_uring over TCP (fixed buffers, SEND_ZC).
        Uring = 3,
        /// RDMA verbs (RC queue pairs).
        Rdma = 4,
    }
}

/// An RDMA memory region a peer may access: guest range, remote address and rkey.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RdmaRegion {
    /// Guest-physical address of the region's first byte.
    pub gpa: u64,
    /// Remote virtual address of that byte in the peer's registration.
    pub addr: u64,
    /// Length.
    pub len: u64,
    /// Remote key.
    pub rkey: u32,
}

/// Most RDMA regions in one list (guest memory chunked by the device's largest memory region).
pub const MAX_RDMA_REGIONS: usize = MAX_REGIONS * 64;

/// Writes a list of RDMA regions: a count, then `gpa, addr, len, rkey` each (28 bytes).
pub(crate) fn write_rdma_regions(w: &mut Writer, regions: &[RdmaRegion]) {
    let n = regions.len().min(MAX_RDMA_REGIONS);
    w.count(n);
    for r in &regions[..n] {
        w.u64(r.gpa).u64(r.addr).u64(r.len).u32(r.rkey);
    }
}

/// Reads a list written by [`write_rdma_regions`], bounded by [`MAX_RDMA_REGIONS`].
pub(crate) fn read_rdma_regions(r: &mut Reader<'_>) -> Result<Vec<RdmaRegion>, DecodeError> {
    let n = r.count("rdma regions", MAX_RDMA_REGIONS, 28)?;
    let mut rdma = Vec::with_capacity(n);
    for _ in 0..n {
        rdma.push(RdmaRegion {
            gpa: r.u64("rdma gpa")?,
            addr: r.u64("rdma addr")?,
            len: r.u64("rdma len")?,
            rkey: r.u32("rdma rkey")?,
        });
    }
    Ok(rdma)
}

/// The parameters of a migration: proposed by the source on the control stream, answered
/// (negotiated) by the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// The migration mode.
    pub mode: Mode,
    /// Page compression.
    pub compression: Compression,
    /// Per-page xxh3 checksums on page data.
    pub checksums: bool,
    /// Parallel bulk streams.
    pub streams: u16,
    /// The transport the data streams use.
    pub transport: TransportKind,
    /// Guest memory (page size and regions).
    pub memory: MemoryMap,
    /// The sender's RDMA regions (RDMA only; empty otherwise).
    pub rdma: Vec<RdmaRegion>,
}

impl Params {
    fn encode(&self, w: &mut Writer) {
        w.u8(self.mode as u8);
        match self.compression {
            Compression::None => w.u8(0).u8(0),
            Compression::Zstd { level } => w.u8(1).bytes(&level.to_le_bytes()),
        };
        w.u8(u8::from(self.checksums))
            .u16(self.streams)
            .u8(self.transport as u8)
            .u64(self.memory.page_size());
        w.count(self.memory.regions().len());
        for r in self.memory.regions() {
            w.u64(r.gpa).u64(r.len);
        }
        write_rdma_regions(w, &self.rdma);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, HandshakeError> {
        let mode = Mode::from_wire(r.u8("mode")?)?;
        let compression = match (r.u8("compression")?, r.array::<1>("compression level")?) {
            (0, _) => Compression::None,
            (1, [l]) => Compression::Zstd {
                level: i8::from_le_bytes([l]),
            },
            (v, _) => {
                return Err(DecodeError::InvalidValue {
                    field: "compression",
                    value: u64::from(v),
                }
                .into());
            }
        };
        let checksums = match r.u8("checksums")? {
            0 => false,
            1 => true,
            v => {
                return Err(DecodeError::InvalidValue {
                    field: "checksums",
                    value: u64::from(v),
                }
                .into());
            }
        };
        let streams = r.u16("streams")?;
        if streams == 0 || streams > MAX_STREAMS {
            return Err(DecodeError::InvalidValue {
                field: "streams",
                value: u64::from(streams),
            }
            .into());
        }
        let transport = TransportKind::from_wire(r.u8("transport")?)?;
        let page_size = r.u64("page size")?;
        let n = r.count("memory regions", MAX_REGIONS, 16)?;
        let mut regions = Vec::with_capacity(n);
        for _ in 0..n {
            regions.push(GpaRange::new(r.u64("region gpa")?, r.u64("region len")?));
        }
        let memory = MemoryMap::new(page_size, regions)?;
        let rdma = read_rdma_regions(r)?;
        Ok(Self {
            mode,
            compression,
            checksums,
            streams,
            transport,
            memory,
            rdma,
        })
    }
}

/// What the destination (server) supports; the proposal is negotiated against it.
#[derive(Debug, Clone)]
pub struct Capabilities {
    /// Modes accepted.
    pub modes: Vec<Mode>,
    /// Whether zstd is accepted (otherwise compression is turned off).
    pub compression: bool,
    /// Whether per-page checksums are accepted (otherwise turned off).
    pub checksums: bool,
    /// Most bulk streams (the negotiated count is the smaller of both).
    pub max_streams: u16,
    /// Transports accepted.
    pub transports: Vec<TransportKind>,
    /// The destination's memory map, when it already has a VM: the proposal must match.
    pub memory: Option<MemoryMap>,
    /// The destination's RDMA regions, returned in the negotiated parameters.
    pub rdma: Vec<RdmaRegion>,
}

/// Negotiation failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NegotiationError {
    /// Mode not accepted.
    #[error("Mode {0:?} is not accepted by the destination")]
    Mode(Mode),
    /// Transport not accepted.
    #[error("Transport {0:?} is not accepted by the destination")]
    Transport(TransportKind),
    /// Memory layouts differ.
    #[error(
        "Memory map differs: source has {source_regions} regions / {source_bytes} bytes (page {source_page}), destination {dest_regions} / {dest_bytes} (page {dest_page})"
    )]
    Memory {
        /// Source regions.
        source_regions: usize,
        /// Source bytes.
        source_bytes: u64,
        /// Source page size.
        source_page: u64,
        /// Destination regions.
        dest_regions: usize,
        /// Destination bytes.
        dest_bytes: u64,
        /// Destination page size.
        dest_page: u64,
    },
}

impl Capabilities {
    /// Negotiates a proposal: the result is what both sides then use.
    pub fn negotiate(&self, p: &Params) -> Result<Params, NegotiationError> {
        if !self.modes.contains(&p.mode) {
            return Err(NegotiationError::Mode(p.mode));
        }
        if !self.transports.contains(&p.transport) {
            return Err(NegotiationError::Transport(p.transport));
        }
        if let Some(m) = &self.memory
            && m != &p.memory
        {
            return Err(NegotiationError::Memory {
                source_regions: p.memory.regions().len(),
                source_bytes: p.memory.total_bytes(),
                source_page: p.memory.page_size(),
                dest_regions: m.regions().len(),
                dest_bytes: m.total_bytes(),
                dest_page: m.page_size(),
            });
        }
        Ok(Params {
            mode: p.mode,
            compression: if self.compression {
                p.compression
            } else {
                Compression::None
            },
            checksums: p.checksums && self.checksums,
            streams: p.streams.min(self.max_streams).max(1),
            transport: p.transport,
            memory: p.memory.clone(),
            rdma: self.rdma.clone(),
        })
    }
}

/// Why a handshake failed. The `Display` text is what both sides print.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandshakeError {
    /// Malformed handshake message.
    #[error("Malformed handshake message")]
    Decode(#[from] DecodeError),
    /// Bad memory map in the parameters.
    #[error("Invalid memory map in the handshake")]
    MemoryMap(#[from] MemoryMapError),
    /// A frame other than the one expected at this step.
    #[error("Expected {expected} during the handshake, got {got}")]
    Unexpected {
        /// The command expected.
        expected: &'static str,
        /// The command received.
        got: &'static str,
    },
    /// The peer's MAC does not verify.
    #[error(
        "Authentication failed: the peer's {which} MAC does not verify (wrong key, or a replayed or tampered handshake)"
    )]
    AuthFailed {
        /// `"server"` or `"client"`.
        which: &'static str,
    },
    /// This side requires a key; the peer offers none.
    #[error(
        "Peer does not authenticate, but this side requires a pre-shared key (give both sides the same --key-file, or --insecure-no-auth on both)"
    )]
    PeerUnauthenticated,
    /// This side has no key; the peer requires one.
    #[error("Peer requires a pre-shared key, but this side has none (--key-file or FERRY_KEY)")]
    NoKey,
    /// The stream names a session this side does not know.
    #[error("Unknown session {0}: refused")]
    UnknownSession(SessionId),
    /// The control stream must not name a session; other streams must.
    #[error("A {role:?} stream with session {session} is not allowed")]
    BadSession {
        /// The stream's role.
        role: Role,
        /// The session it named.
        session: SessionId,
    },
    /// The control stream must carry parameters; others must not.
    #[error("Parameters missing or misplaced on a {0:?} stream")]
    Params(Role),
    /// Parameters cannot be agreed.
    #[error("Negotiation failed")]
    Negotiation(#[from] NegotiationError),
    /// The server's answer does not fit the client's request.
    #[error("Server answered for session {got}, expected {expected}")]
    SessionMismatch {
        /// Session requested.
        expected: SessionId,
        /// Session answered.
        got: SessionId,
    },
    /// The peer refused, with its reason.
    #[error("Peer refused the handshake: {reason}")]
    Refused {
        /// Refusal code.
        code: u16,
        /// The peer's message.
        reason: String,
    },
    /// No randomness for nonces or session ids.
    #[error("No randomness for the handshake")]
    Random(#[from] KeyError),
}

impl HandshakeError {
    /// The refusal code sent to the peer for this error.
    pub fn refusal_code(&self) -> u16 {
        match self {
            HandshakeError::Decode(DecodeError::UnsupportedVersion { .. }) => 1,
            HandshakeError::Decode(_)
            | HandshakeError::MemoryMap(_)
            | HandshakeError::Unexpected { .. }
            | HandshakeError::Params(_)
            | HandshakeError::SessionMismatch { .. }
            | HandshakeError::Random(_) => 2,
            HandshakeError::AuthFailed { .. } => 3,
            HandshakeError::PeerUnauthenticated | HandshakeError::NoKey => 4,
            HandshakeError::UnknownSession(_) | HandshakeError::BadSession { .. } => 5,
            HandshakeError::Negotiation(_) => 6,
            HandshakeError::Refused { code, .. } => *code,
        }
    }

    /// The `Refused` frame to send to the peer for this error (header + metadata).
    pub fn refusal_frame(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u16(self.refusal_code());
        w.string(&error_chain(self), MAX_MESSAGE_LEN);
        frame(Command::Refused, w)
    }
}

/// The error's message followed by its sources, `": "`-separated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

fn frame(command: Command, w: Writer) -> Vec<u8> {
    let meta = w.into_vec();
    let header = FrameHeader {
        command,
        flags: 0,
        meta_len: u32::try_from(meta.len()).unwrap_or(u32::MAX),
        payload_len: 0,
    };
    let mut out = Vec::with_capacity(HEADER_LEN + meta.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(&meta);
    out
}

fn expect(header: &FrameHeader, cmd: Command) -> Result<(), HandshakeError> {
    if header.command == cmd {
        return Ok(());
    }
    if header.command == Command::Refused {
        return Err(HandshakeError::Refused {
            code: 0,
            reason: String::new(),
        });
    }
    Err(HandshakeError::Unexpected {
        expected: cmd.name(),
        got: header.command.name(),
    })
}

fn check_refused(header: &FrameHeader, meta: &[u8]) -> Result<(), HandshakeError> {
    if header.command != Command::Refused {
        return Ok(());
    }
    let mut r = Reader::new(meta);
    let code = r.u16("refusal code")?;
    let reason = r.string("refusal reason", MAX_MESSAGE_LEN)?;
    Err(HandshakeError::Refused { code, reason })
}

fn transcript(client_hello: &[u8], server_hello_body: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"ferry handshake transcript v1");
    h.update(&(client_hello.len() as u64).to_le_bytes());
    h.update(client_hello);
    h.update(&(server_hello_body.len() as u64).to_le_bytes());
    h.update(server_hello_body);
    *h.finalize().as_bytes()
}

fn mac(psk: &Psk, label: &[u8], t: &[u8; 32]) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(&psk.mac_key());
    h.update(label);
    h.update(t);
    h.finalize()
}

/// The result of a successful handshake on one stream.
#[derive(Debug, Clone)]
pub struct Established {
    /// The protocol version in use.
    pub version: u16,
    /// The session.
    pub session: SessionId,
    /// The stream's role.
    pub role: Role,
    /// The stream's index among streams of its role.
    pub stream_index: u16,
    /// The negotiated parameters (control stream only).
    pub params: Option<Params>,
    /// The client's proposal as it sent it (control stream only); the server keeps it to read
    /// the source's RDMA regions.
    pub proposal: Option<Params>,
    /// Whether the stream is authenticated (false only with [`Auth::Insecure`]).
    pub authenticated: bool,
    /// A control stream that resumed an existing session (post-copy recovery) rather than
    /// opening a new one.
    pub resumed: bool,
}

/// What the client asks for.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// How this side authenticates.
    pub auth: Auth,
    /// The stream's role.
    pub role: Role,
    /// The stream's index.
    pub stream_index: u16,
    /// `None` to open a session (control stream), the session's id to join it (other
    /// streams) or to resume it (control stream, post-copy recovery).
    pub session: Option<SessionId>,
    /// The proposal (control stream only).
    pub params: Option<Params>,
}

/// The client side of a handshake, between sending `ClientHello` and receiving `ServerHello`.
#[derive(Debug)]
pub struct ClientHandshake {
    cfg: ClientConfig,
    hello_meta: Vec<u8>,
}

impl ClientHandshake {
    /// Starts a handshake: returns the state and the `ClientHello` frame to send.
    pub fn start(cfg: ClientConfig) -> Result<(Self, Vec<u8>), HandshakeError> {
        let nonce: [u8; 32] = random_bytes()?;
        Ok(Self::start_with_nonce(cfg, nonce))
    }

    /// As [`ClientHandshake::start`] with a given nonce (tests).
    pub fn start_with_nonce(cfg: ClientConfig, nonce: [u8; 32]) -> (Self, Vec<u8>) {
        let mut w = Writer::new();
        w.bytes(&MAGIC)
            .u16(MIN_PROTOCOL_VERSION)
            .u16(PROTOCOL_VERSION)
            .bytes(&nonce)
            .u8(cfg.role as u8)
            .u16(cfg.stream_index)
            .bytes(&cfg.session.unwrap_or_default().0)
            .u8(cfg.auth.wire());
        match &cfg.params {
            Some(p) => {
                w.u8(1);
                p.encode(&mut w);
            }
            None => {
                w.u8(0);
            }
        }
        let hello_meta = w.into_vec();
        let mut frame_bytes = Vec::new();
        let header = FrameHeader {
            command: Command::ClientHello,
            flags: 0,
            meta_len: u32::try_from(hello_meta.len()).unwrap_or(u32::MAX),
            payload_len: 0,
        };
        frame_bytes.extend_from_slice(&header.encode());
        frame_bytes.extend_from_slice(&hello_meta);
        (Self { cfg, hello_meta }, frame_bytes)
    }

    /// Handles `ServerHello` (or `Refused`): verifies the server and returns the `ClientAuth`
    /// frame to send and the result, which holds once the server answers `AuthOk` (see
    /// [`finish_client`]).
    pub fn on_server_hello(
        self,
        header: &FrameHeader,
        meta: &[u8],
    ) -> Result<(Vec<u8>, Established), HandshakeError> {
        check_refused(header, meta)?;
        expect(header, Command::ServerHello)?;
        let mut r = Reader::new(meta);
        let version = r.u16("version")?;
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
            return Err(DecodeError::UnsupportedVersion {
                peer_min: version,
                peer_max: version,
                our_min: MIN_PROTOCOL_VERSION,
                our_max: PROTOCOL_VERSION,
            }
            .into());
        }
        let _server_nonce = r.array::<32>("server nonce")?;
        let session = SessionId(r.array("session id")?);
        let server_auth = r.u8("auth")?;
        let params = match r.u8("has params")? {
            0 => None,
            1 => Some(Params::decode(&mut r)?),
            v => {
                return Err(DecodeError::InvalidValue {
                    field: "has params",
                    value: u64::from(v),
                }
                .into());
            }
        };
        let body_len = meta.len() - r.remaining();
        let server_mac = r.array::<32>("server mac")?;
        r.finish("ServerHello")?;
        if let Some(expected) = self.cfg.session
            && expected != session
        {
            return Err(HandshakeError::SessionMismatch {
                expected,
                got: session,
            });
        }
        if (self.cfg.role == Role::Control) != params.is_some() {
            return Err(HandshakeError::Params(self.cfg.role));
        }
        let t = transcript(&self.hello_meta, &meta[..body_len]);
        let mut w = Writer::new();
        let authenticated = match (&self.cfg.auth, server_auth) {
            (Auth::Psk(psk), 1) => {
                if mac(psk, b"server", &t) != blake3::Hash::from(server_mac) {
                    return Err(HandshakeError::AuthFailed { which: "server" });
                }
                w.bytes(mac(psk, b"client", &t).as_bytes());
                true
            }
            (Auth::Psk(_), _) => return Err(HandshakeError::PeerUnauthenticated),
            (Auth::Insecure, 1) => return Err(HandshakeError::NoKey),
            (Auth::Insecure, _) => {
                w.bytes(&[0u8; 32]);
                false
            }
        };
        Ok((
            frame(Command::ClientAuth, w),
            Established {
                version,
                session,
                role: self.cfg.role,
                stream_index: self.cfg.stream_index,
                params,
                resumed: self.cfg.role == Role::Control && self.cfg.session.is_some(),
                proposal: self.cfg.params,
                authenticated,
            },
        ))
    }
}

/// Checks the server's final answer to `ClientAuth`: `AuthOk`, or `Refused` with its reason.
pub fn finish_client(header: &FrameHeader, meta: &[u8]) -> Result<(), HandshakeError> {
    check_refused(header, meta)?;
    expect(header, Command::AuthOk)?;
    Reader::new(meta).finish("AuthOk")?;
    Ok(())
}

/// What the server accepts.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// How this side authenticates.
    pub auth: Auth,
    /// What it supports.
    pub capabilities: Capabilities,
}

/// The server side of a handshake, between sending `ServerHello` and receiving `ClientAuth`.
#[derive(Debug)]
pub struct ServerHandshake {
    psk: Option<Psk>,
    transcript: [u8; 32],
    established: Established,
}

impl ServerHandshake {
    /// Handles `ClientHello`. `new_session` is the id to give a new session (control stream);
    /// `known_session` says whether a joining stream's session exists. Returns the state and
    /// the `ServerHello` frame to send. On error, send [`HandshakeError::refusal_frame`].
    pub fn on_client_hello(
        cfg: &ServerConfig,
        header: &FrameHeader,
        meta: &[u8],
        new_session: SessionId,
        known_session: &dyn Fn(&SessionId) -> bool,
    ) -> Result<(Self, Vec<u8>), HandshakeError> {
        let nonce: [u8; 32] = random_bytes()?;
        Self::on_client_hello_with_nonce(cfg, header, meta, new_session, known_session, nonce)
    }

    /// As [`ServerHandshake::on_client_hello`] with a given nonce (tests).
    pub fn on_client_hello_with_nonce(
        cfg: &ServerConfig,
        header: &FrameHeader,
        meta: &[u8],
        new_session: SessionId,
        known_session: &dyn Fn(&SessionId) -> bool,
        nonce: [u8; 32],
    ) -> Result<(Self, Vec<u8>), HandshakeError> {
        expect(header, Command::ClientHello)?;
        let mut r = Reader::new(meta);
        let magic = r.array::<8>("magic")?;
        if magic != MAGIC {
            return Err(DecodeError::BadMagic { found: magic }.into());
        }
        let peer_min = r.u16("min version")?;
        let peer_max = r.u16("max version")?;
        let version = peer_max.min(PROTOCOL_VERSION);
        if peer_min > peer_max || version < peer_min || version < MIN_PROTOCOL_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                peer_min,
                peer_max,
                our_min: MIN_PROTOCOL_VERSION,
                our_max: PROTOCOL_VERSION,
            }
            .into());
        }
        let _client_nonce = r.array::<32>("client nonce")?;
        let role = Role::from_wire(r.u8("role")?)?;
        let stream_index = r.u16("stream index")?;
        let requested = SessionId(r.array("session id")?);
        let client_auth = r.u8("auth")?;
        let proposal = match r.u8("has params")? {
            0 => None,
            1 => Some(Params::decode(&mut r)?),
            v => {
                return Err(DecodeError::InvalidValue {
                    field: "has params",
                    value: u64::from(v),
                }
                .into());
            }
        };
        r.finish("ClientHello")?;
        let psk = match (&cfg.auth, client_auth) {
            (Auth::Psk(p), 1) => Some(p.clone()),
            (Auth::Psk(_), _) => return Err(HandshakeError::PeerUnauthenticated),
            // The client wants authentication we cannot give: answer unauthenticated and let
            // the client refuse, so the side with the key reports the problem.
            (Auth::Insecure, _) => None,
        };
        let session = match role {
            Role::Control if requested.is_zero() => new_session,
            // A control stream naming a session resumes it: only a session this side knows.
            Role::Control if !known_session(&requested) => {
                return Err(HandshakeError::UnknownSession(requested));
            }
            Role::Control => requested,
            _ if requested.is_zero() => {
                return Err(HandshakeError::BadSession {
                    role,
                    session: requested,
                });
            }
            _ if !known_session(&requested) => {
                return Err(HandshakeError::UnknownSession(requested));
            }
            _ => requested,
        };
        let params = match (role, &proposal) {
            (Role::Control, Some(p)) => Some(cfg.capabilities.negotiate(p)?),
            (Role::Control, None) | (_, Some(_)) => return Err(HandshakeError::Params(role)),
            (_, None) => None,
        };
        let mut w = Writer::new();
        w.u16(version)
            .bytes(&nonce)
            .bytes(&session.0)
            .u8(cfg.auth.wire());
        match &params {
            Some(p) => {
                w.u8(1);
                p.encode(&mut w);
            }
            None => {
                w.u8(0);
            }
        }
        let body = w.into_vec();
        let t = transcript(meta, &body);
        let mut w = Writer::with_capacity(body.len() + 32);
        w.bytes(&body);
        match &psk {
            Some(p) => w.bytes(mac(p, b"server", &t).as_bytes()),
            None => w.bytes(&[0u8; 32]),
        };
        Ok((
            Self {
                psk,
                transcript: t,
                established: Established {
                    version,
                    session,
                    role,
                    stream_index,
                    params,
                    proposal,
                    authenticated: cfg_is_psk(&cfg.auth),
                    resumed: role == Role::Control && !requested.is_zero(),
                },
            },
            frame(Command::ServerHello, w),
        ))
    }

    /// Handles `ClientAuth`: verifies the client. On success send [`auth_ok_frame`]; on error
    /// send the error's [`HandshakeError::refusal_frame`].
    pub fn on_client_auth(
        self,
        header: &FrameHeader,
        meta: &[u8],
    ) -> Result<Established, HandshakeError> {
        check_refused(header, meta)?;
        expect(header, Command::ClientAuth)?;
        let mut r = Reader::new(meta);
        let client_mac = r.array::<32>("client mac")?;
        r.finish("ClientAuth")?;
        if let Some(psk) = &self.psk
            && mac(psk, b"client", &self.transcript) != blake3::Hash::from(client_mac)
        {
            return Err(HandshakeError::AuthFailed { which: "client" });
        }
        Ok(self.established)
    }
}

fn cfg_is_psk(a: &Auth) -> bool {
    matches!(a, Auth::Psk(_))
}

/// The `AuthOk` frame.
pub fn auth_ok_frame() -> Vec<u8> {
    frame(Command::AuthOk, Writer::new())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::frame::HEADER_LEN;
    use proptest::prelude::*;

    fn split(buf: &[u8]) -> (FrameHeader, &[u8]) {
        let h = FrameHeader::decode(buf[..HEADER_LEN].try_into().unwrap()).unwrap();
        (h, &buf[HEADER_LEN..])
    }

    fn params() -> Params {
        Params {
            mode: Mode::Hybrid,
            compression: Compression::Zstd { level: -3 },
            checksums: true,
            streams: 4,
            transport: TransportKind::Uring,
            memory: MemoryMap::new(4096, vec![GpaRange::new(0, 1 << 30)]).unwrap(),
            rdma: vec![RdmaRegion {
                gpa: 0,
                addr: 0x7f00_0000_0000,
                len: 1 << 30,
                rkey: 0x1234,
            }],
        }
    }

    fn server_cfg(auth: Auth) -> ServerConfig {
        ServerConfig {
            auth,
            capabilities: Capabilities {
                modes: vec![Mode::PreCopy, Mode::PostCopy, Mode::Hybrid],
                compression: true,
                checksums: true,
                max_streams: 2,
                transports: vec![TransportKind::Tcp, TransportKind::Uring],
                memory: None,
                rdma: vec![],
            },
        }
    }

    fn key(b: u8) -> Auth {
        Auth::Psk(Psk::from_bytes([b; 32]))
    }

    /// Runs a whole handshake in memory; returns (client result, server result).
    fn run(
        client: ClientConfig,
        server: &ServerConfig,
        known: &dyn Fn(&SessionId) -> bool,
    ) -> (
        Result<Established, HandshakeError>,
        Result<Established, HandshakeError>,
    ) {
        let (c, hello) = ClientHandshake::start(client).unwrap();
        let (h, m) = split(&hello);
        let (s, server_hello) =
            match ServerHandshake::on_client_hello(server, &h, m, SessionId([7; 16]), known) {
                Ok(x) => x,
                Err(e) => {
                    let refusal = e.refusal_frame();
                    let (h, m) = split(&refusal);
                    let client_side = c.on_server_hello(&h, m).map(|x| x.1);
                    return (client_side, Err(e));
                }
            };
        let (h, m) = split(&server_hello);
        let (auth, est_c) = match c.on_server_hello(&h, m) {
            Ok(x) => x,
            Err(e) => {
                return (
                    Err(e),
                    Err(HandshakeError::Refused {
                        code: 0,
                        reason: "client gave up".into(),
                    }),
                );
            }
        };
        let (h, m) = split(&auth);
        match s.on_client_auth(&h, m) {
            Ok(est_s) => {
                let ok = auth_ok_frame();
                let (h, m) = split(&ok);
                (finish_client(&h, m).map(|()| est_c), Ok(est_s))
            }
            Err(e) => {
                let refusal = e.refusal_frame();
                let (h, m) = split(&refusal);
                (finish_client(&h, m).map(|()| est_c), Err(e))
            }
        }
    }

    fn control(auth: Auth) -> ClientConfig {
        ClientConfig {
            auth,
            role: Role::Control,
            stream_index: 0,
            session: None,
            params: Some(params()),
        }
    }

    #[test]
    fn authenticated_handshake_negotiates() {
        let (c, s) = run(control(key(1)), &server_cfg(key(1)), &|_| false);
        let c = c.unwrap();
        let s = s.unwrap();
        assert_eq!(c.session, SessionId([7; 16]));
        assert_eq!(s.session, c.session);
        assert!(c.authenticated && s.authenticated);
        let p = c.params.unwrap();
        assert_eq!(p.streams, 2, "negotiated down to the server's maximum");
        assert_eq!(p.compression, Compression::Zstd { level: -3 });
        assert_eq!(s.proposal.unwrap().rdma[0].rkey, 0x1234);
    }

    #[test]
    fn wrong_key_is_refused_on_both_sides() {
        let (c, s) = run(control(key(1)), &server_cfg(key(2)), &|_| false);
        let c = c.unwrap_err();
        assert_eq!(c, HandshakeError::AuthFailed { which: "server" });
        assert!(c.to_string().contains("wrong key"), "{c}");
        s.unwrap_err();
    }

    #[test]
    fn peer_without_key_is_refused() {
        let (c, s) = run(control(Auth::Insecure), &server_cfg(key(1)), &|_| false);
        assert_eq!(s.unwrap_err(), HandshakeError::PeerUnauthenticated);
        match c.unwrap_err() {
            HandshakeError::Refused { code: 4, reason } => {
                assert!(reason.contains("requires a pre-shared key"), "{reason}")
            }
            e => panic!("unexpected {e:?}"),
        }
        let (c, _) = run(control(key(1)), &server_cfg(Auth::Insecure), &|_| false);
        assert_eq!(c.unwrap_err(), HandshakeError::PeerUnauthenticated);
    }

    #[test]
    fn insecure_on_both_sides_works_unauthenticated() {
        let (c, s) = run(
            control(Auth::Insecure),
            &server_cfg(Auth::Insecure),
            &|_| false,
        );
        assert!(!c.unwrap().authenticated);
        assert!(!s.unwrap().authenticated);
    }

    #[test]
    fn replayed_client_handshake_is_refused() {
        // Record a good client's messages against server 1...
        let cfg = server_cfg(key(1));
        let (c, hello) = ClientHandshake::start(control(key(1))).unwrap();
        let (h, m) = split(&hello);
        let (s1, sh) =
            ServerHandshake::on_client_hello(&cfg, &h, m, SessionId([1; 16]), &|_| false).unwrap();
        let (h2, m2) = split(&sh);
        let (client_auth, _) = c.on_server_hello(&h2, m2).unwrap();
        let (ha, ma) = split(&client_auth);
        s1.on_client_auth(&ha, ma).unwrap();
        // ...and replay them to a new server connection: its fresh nonce defeats the old MAC.
        let (s2, _) =
            ServerHandshake::on_client_hello(&cfg, &h, m, SessionId([2; 16]), &|_| false).unwrap();
        assert_eq!(
            s2.on_client_auth(&ha, ma).unwrap_err(),
            HandshakeError::AuthFailed { which: "client" }
        );
    }

    #[test]
    fn replayed_server_hello_is_refused() {
        let cfg = server_cfg(key(1));
        let (c1, hello1) = ClientHandshake::start(control(key(1))).unwrap();
        let (h, m) = split(&hello1);
        let (_, sh) =
            ServerHandshake::on_client_hello(&cfg, &h, m, SessionId([1; 16]), &|_| false).unwrap();
        drop(c1);
        // A second client gets the old ServerHello (a man in the middle replaying it).
        let (c2, _) = ClientHandshake::start(control(key(1))).unwrap();
        let (h2, m2) = split(&sh);
        assert_eq!(
            c2.on_server_hello(&h2, m2).unwrap_err(),
            HandshakeError::AuthFailed { which: "server" }
        );
    }

    #[test]
    fn tampered_parameters_fail_the_mac() {
        let cfg = server_cfg(key(1));
        let (c, hello) = ClientHandshake::start(control(key(1))).unwrap();
        let (h, m) = split(&hello);
        let (_, sh) =
            ServerHandshake::on_client_hello(&cfg, &h, m, SessionId([1; 16]), &|_| false).unwrap();
        let mut sh = sh;
        // Flip the negotiated checksum flag (byte after mode and compression).
        let off = HEADER_LEN + 2 + 32 + 16 + 1 + 1 + 1 + 2;
        sh[off] ^= 1;
        let (h2, m2) = split(&sh);
        assert_eq!(
            c.on_server_hello(&h2, m2).unwrap_err(),
            HandshakeError::AuthFailed { which: "server" }
        );
    }

    #[test]
    fn streams_join_known_sessions_only() {
        let session = SessionId([7; 16]);
        let known = move |s: &SessionId| *s == session;
        let cfg = server_cfg(key(1));
        for i in 0..2 {
            let (c, s) = run(
                ClientConfig {
                    auth: key(1),
                    role: Role::Bulk,
                    stream_index: i,
                    session: Some(session),
                    params: None,
                },
                &cfg,
                &known,
            );
            assert_eq!(c.unwrap().session, session);
            assert_eq!(s.unwrap().stream_index, i);
        }
        let forged = SessionId([9; 16]);
        let (c, s) = run(
            ClientConfig {
                auth: key(1),
                role: Role::Bulk,
                stream_index: 2,
                session: Some(forged),
                params: None,
            },
            &cfg,
            &known,
        );
        assert_eq!(s.unwrap_err(), HandshakeError::UnknownSession(forged));
        match c.unwrap_err() {
            HandshakeError::Refused { code: 5, reason } => {
                assert!(reason.contains("Unknown session 0909"), "{reason}")
            }
            e => panic!("unexpected {e:?}"),
        }
    }

    fn resume(auth: Auth, session: SessionId) -> ClientConfig {
        ClientConfig {
            session: Some(session),
            ..control(auth)
        }
    }

    #[test]
    fn control_stream_resumes_a_known_session_only() {
        let session = SessionId([7; 16]);
        let known = move |s: &SessionId| *s == session;
        let cfg = server_cfg(key(1));
        let (c, s) = run(resume(key(1), session), &cfg, &known);
        let (c, s) = (c.unwrap(), s.unwrap());
        assert!(c.resumed && s.resumed);
        assert_eq!(c.session, session);
        assert_eq!(s.session, session);
        assert!(
            c.params.is_some(),
            "a resumed control stream negotiates again"
        );
        // A fresh control stream is not a resumption.
        let (c, s) = run(control(key(1)), &cfg, &known);
        assert!(!c.unwrap().resumed && !s.unwrap().resumed);
        // An unknown session is refused on both sides.
        let other = SessionId([8; 16]);
        let (c, s) = run(resume(key(1), other), &cfg, &known);
        assert_eq!(s.unwrap_err(), HandshakeError::UnknownSession(other));
        assert!(matches!(
            c.unwrap_err(),
            HandshakeError::Refused { code: 5, .. }
        ));
        // The right session with the wrong key cannot take it over.
        let (c, s) = run(resume(key(2), session), &cfg, &known);
        assert_eq!(
            c.unwrap_err(),
            HandshakeError::AuthFailed { which: "server" }
        );
        s.unwrap_err();
    }

    #[test]
    fn wrong_version_and_magic_are_typed_errors() {
        let (_, hello) = ClientHandshake::start(control(key(1))).unwrap();
        let mut bad = hello.clone();
        // min = max = 9
        bad[HEADER_LEN + 8..HEADER_LEN + 12].copy_from_slice(&[9, 0, 9, 0]);
        let (h, m) = split(&bad);
        let e = ServerHandshake::on_client_hello(
            &server_cfg(key(1)),
            &h,
            m,
            SessionId([1; 16]),
            &|_| false,
        )
        .unwrap_err();
        assert_eq!(
            e,
            HandshakeError::Decode(DecodeError::UnsupportedVersion {
                peer_min: 9,
                peer_max: 9,
                our_min: MIN_PROTOCOL_VERSION,
                our_max: PROTOCOL_VERSION
            })
        );
        assert_eq!(e.refusal_code(), 1);
        let mut bad = hello;
        bad[HEADER_LEN] = b'X';
        let (h, m) = split(&bad);
        assert!(matches!(
            ServerHandshake::on_client_hello(
                &server_cfg(key(1)),
                &h,
                m,
                SessionId([1; 16]),
                &|_| false
            ),
            Err(HandshakeError::Decode(DecodeError::BadMagic { .. }))
        ));
    }

    #[test]
    fn negotiation_refuses_mismatched_memory() {
        let mut cfg = server_cfg(key(1));
        cfg.capabilities.memory =
            Some(MemoryMap::new(4096, vec![GpaRange::new(0, 1 << 29)]).unwrap());
        let (c, s) = run(control(key(1)), &cfg, &|_| false);
        assert!(matches!(
            s.unwrap_err(),
            HandshakeError::Negotiation(NegotiationError::Memory { .. })
        ));
        assert!(matches!(
            c.unwrap_err(),
            HandshakeError::Refused { code: 6, .. }
        ));
    }

    #[test]
    fn keys_parse_and_print() {
        let k = Psk::generate().unwrap();
        assert_eq!(Psk::from_hex(&format!("  {}\n", k.to_hex())).unwrap(), k);
        assert_eq!(Psk::from_hex("abc"), Err(KeyError::Length { found: 3 }));
        let mut s = "0".repeat(64);
        s.replace_range(5..6, "g");
        assert_eq!(Psk::from_hex(&s), Err(KeyError::NotHex { position: 5 }));
        assert_eq!(format!("{k:?}"), "Psk(<redacted>)");
    }

    proptest! {
        #[test]
        fn server_never_panics_on_arbitrary_hello(meta in proptest::collection::vec(any::<u8>(), 0..300)) {
            let h = FrameHeader { command: Command::ClientHello, flags: 0, meta_len: u32::try_from(meta.len()).unwrap(), payload_len: 0 };
            let _ = ServerHandshake::on_client_hello_with_nonce(&server_cfg(key(1)), &h, &meta, SessionId([1; 16]), &|_| true, [0; 32]);
        }

        #[test]
        fn params_round_trip(streams in 1u16..=MAX_STREAMS, level in any::<i8>(), cks in any::<bool>(), mode in 0usize..3, tr in 0usize..4) {
            let p = Params {
                mode: [Mode::PreCopy, Mode::PostCopy, Mode::Hybrid][mode],
                compression: Compression::Zstd { level },
                checksums: cks,
                streams,
                transport: [TransportKind::Tcp, TransportKind::Unix, TransportKind::Uring, TransportKind::Rdma][tr],
                memory: MemoryMap::new(4096, vec![GpaRange::new(0, 4096), GpaRange::new(1 << 32, 1 << 21)]).unwrap(),
                rdma: vec![RdmaRegion { gpa: 0, addr: 1, len: 4096, rkey: 3 }],
            };
            let mut w = Writer::new();
            p.encode(&mut w);
            let b = w.into_vec();
            let mut r = Reader::new(&b);
            prop_assert_eq!(Params::decode(&mut r).unwrap(), p);
            prop_assert_eq!(r.remaining(), 0);
        }
    }
}
