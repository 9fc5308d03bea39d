// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Frames: the 16-byte header, the commands, and the metadata of each frame.
//!
//! A frame is a header, `meta_len` bytes of metadata (decoded into a [`Frame`]) and
//! `payload_len` bytes of payload. The payload (page contents, a state blob, compressed pages)
//! is never part of [`Frame`]: the receiver validates the metadata first and then reads the
//! payload straight to where it belongs (guest memory, for pages), so a frame never needs a
//! staging copy of page data.

use crate::codec::{DecodeError, Reader, Writer};
use crate::handshake::{RdmaRegion, read_rdma_regions, write_rdma_regions};
use crate::memmap::{GpaRange, MemoryMap, RangeError};

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 16;
/// Most metadata bytes in one frame (bounds every allocation a decoder makes).
pub const MAX_META_LEN: u32 = 1 << 20;
/// Most page bytes in one page-data frame.
pub const MAX_PAGE_PAYLOAD: u64 = 64 << 20;
/// Most bytes of one vCPU/device state blob.
pub const MAX_STATE_LEN: u64 = 256 << 20;
/// Most ranges in one frame.
pub const MAX_RANGES: usize = 1 << 16;
/// Most ranges a frame whose metadata is only a range list (`StaleSet`, `Missing`, `Resend`,
/// `ZeroPages`) carries within [`MAX_META_LEN`] (the list's 4-byte count included): what a
/// sender splits long lists by.
pub const MAX_LIST_RANGES: usize = (MAX_META_LEN as usize - 4) / RANGE_LEN;
/// Most bytes in a reason or error message.
pub const MAX_MESSAGE_LEN: usize = 4096;
/// Most bytes one requested page range may cover.
pub const MAX_REQUEST_LEN: u64 = 2 << 20;

macro_rules! commands {
    ($($(#[$doc:meta])* $name:ident = $code:expr,)*) => {
        /// A frame's command. Code 0 is reserved and always invalid.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum Command {
            $($(#[$doc])* $name = $code,)*
        }

        impl Command {
            /// Decodes a command code; 0 and unknown codes are errors.
            pub fn from_code(code: u16) -> Result<Self, DecodeError> {
                match code {
                    0 => Err(DecodeError::InvalidCommand),
                    $($code => Ok(Command::$name),)*
                    _ => Err(DecodeError::UnknownCommand { code }),
                }
            }

            /// The command's name, for messages.
            pub fn name(self) -> &'static str {
                match self {
                    $(Command::$name => stringify!($name),)*
                }
            }

            /// Every command.
            pub const ALL: &'static [Command] = &[$(Command::$name,)*];
        }
    };
}

commands! {
    /// Handshake, client to server: magic, versions, nonce, role, session, proposed parameters.
    ClientHello = 0x0001,
    /// Handshake, server to client: chosen version, nonce, session, parameters, server MAC.
    ServerHello = 0x0002,
    /// Handshake, client to server: client MAC.
    ClientAuth = 0x0003,
    /// Handshake, server to client: the stream is established.
    AuthOk = 0x0004,
    /// Handshake refused, either direction, with a reason.
    Refused = 0x0005,
    /// Page contents for a list of ranges; payload = the bytes of the ranges in order.
    Pages = 0x0010,
    /// Ranges whose pages are all zero; no payload.
    ZeroPages = 0x0011,
    /// Pages compressed as one zstd frame; payload = the compressed bytes.
    CompressedPages = 0x0012,
    /// Post-copy: the ranges the destination must not trust (still dirty at switchover).
    StaleSet = 0x0013,
    /// Post-copy recovery, destination to source on a resumed session's control stream: the
    /// ranges the destination still lacks (version 3).
    Missing = 0x0014,
    /// Post-copy, at the switchover: the ranges the source's vCPUs touch first, so the
    /// destination maps the ones it already has before the guest faults on them (version 3).
    FirstTouch = 0x0015,
    /// Post-copy: the destination asks for a page range, urgently.
    PageRequest = 0x0020,
    /// Post-copy: the reply to a request; payload = the bytes.
    PageReply = 0x0021,
    /// vCPU and device state: an opaque, versioned blob as payload.
    State = 0x0030,
    /// A pre-copy round begins.
    RoundBegin = 0x0040,
    /// A pre-copy round ended on the sender.
    RoundEnd = 0x0041,
    /// The source stopped the VM; what follows completes the blackout.
    Switchover = 0x0042,
    /// The destination's vCPUs run; sent again as the first frame of every resumed session
    /// whose destination runs the VM (version 4).
    Resumed = 0x0043,
    /// All memory was sent; carries the source's whole-memory digest.
    Complete = 0x0044,
    /// The destination's verdict on the digest.
    Verified = 0x0045,
    /// The migration is abandoned, with a reason. From the destination before `Resumed`, or as
    /// the first frame of a resumed session, it promises that its VM does not run and never
    /// will (version 4).
    Abort = 0x0046,
    /// An error, with a code and message. From the destination before `Resumed`, the same
    /// promise as `Abort` (version 4).
    Error = 0x0047,
    /// Progress statistics.
    Progress = 0x0048,
    /// Pages the destination asks to be sent again (failed per-page checksum during a live round).
    Resend = 0x0049,
    /// A stream is done: no more frames follow on it.
    EndOfStream = 0x004A,
    /// Post-copy fault statistics measured by the destination.
    FaultStats = 0x004B,
    /// RDMA sessions, destination to source on the control stream right after the handshake:
    /// the rdmacm port the destination listens on (same address as the control stream).
    RdmaOffer = 0x0050,
    /// RDMA sessions, on the control stream once the queue pairs are connected: the sender's
    /// registered guest memory (address, length and rkey per chunk). The destination always
    /// sends its own (the source WRITEs into it); the source sends its own first when
    /// post-copy may follow (the destination READs from it).
    RdmaRegions = 0x0051,
}

/// The fixed 16-byte header before every frame (all fields little-endian):
///
/// ```text
/// 0        2        4                 8                                16
/// +--------+--------+-----------------+--------------------------------+
/// | command| flags  |    meta_len     |          payload_len           |
/// +--------+--------+-----------------+--------------------------------+
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The command.
    pub command: Command,
    /// Command-specific flags (see [`flags`]).
    pub flags: u16,
    /// Bytes of metadata after the header.
    pub meta_len: u32,
    /// Bytes of payload after the metadata.
    pub payload_len: u64,
}

/// Header flags.
pub mod flags {
    /// `Pages`/`PageReply`: an xxh3-64 checksum per page is in the metadata.
    pub const CHECKSUMS: u16 = 1 << 0;
    /// `Pages`: sent while the VM is paused (final round or post-copy push): a failed
    /// checksum is fatal rather than a request to resend. `Missing`: the last frame of the set.
    pub const FINAL: u16 = 1 << 1;
}

impl FrameHeader {
    /// Decodes and checks a header: known command, metadata and payload within their limits.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(b);
        let command = Command::from_code(r.u16("command")?)?;
        let flags = r.u16("flags")?;
        let meta_len = r.u32("meta_len")?;
        let payload_len = r.u64("payload_len")?;
        if meta_len > MAX_META_LEN {
            return Err(DecodeError::Oversized {
                what: "metadata",
                len: u64::from(meta_len),
                max: u64::from(MAX_META_LEN),
            });
        }
        let max_payload = max_payload(command);
        if payload_len > max_payload {
            return Err(DecodeError::Oversized {
                what: "payload",
                len: payload_len,
                max: max_payload,
            });
        }
        Ok(Self {
            command,
            flags,
            meta_len,
            payload_len,
        })
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..2].copy_from_slice(&(self.command as u16).to_le_bytes());
        out[2..4].copy_from_slice(&self.flags.to_le_bytes());
        out[4..8].copy_from_slice(&self.meta_len.to_le_bytes());
        out[8..16].copy_from_slice(&self.payload_len.to_le_bytes());
        out
    }
}

fn max_payload(c: Command) -> u64 {
    match c {
        Command::Pages | Command::CompressedPages => MAX_PAGE_PAYLOAD,
        Command::PageReply => MAX_REQUEST_LEN,
        Command::State => MAX_STATE_LEN,
        _ => 0,
    }
}

/// Which state a [`Frame::State`] blob holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StateKind {
    /// vCPU and device state of the VM, as the VMM saved it.
    Vm = 1,
}

/// How the source switches over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SwitchoverKind {
    /// Pre-copy stop-and-copy: every page follows before the destination resumes.
    StopAndCopy = 1,
    /// Post-copy: the destination resumes at once; stale pages are fetched on demand.
    PostCopy = 2,
}

/// Progress counters, sent by either side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProgressStats {
    /// Pre-copy round (0 before the first).
    pub round: u32,
    /// Bytes of page data sent so far.
    pub bytes: u64,
    /// Pages transferred so far (data, zero and compressed).
    pub pages: u64,
    /// Pages dirty at the last harvest.
    pub dirty_pages: u64,
    /// Microseconds since the migration started.
    pub elapsed_us: u64,
}

/// Phase timings of the blackout as the destination measured them, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResumeTimings {
    /// From `Switchover` received to the state blob applied (receive + apply of the final data).
    pub receive_us: u64,
    /// Restoring vCPU/device state.
    pub restore_us: u64,
    /// Resuming the vCPUs.
    pub resume_us: u64,
}

/// Post-copy fault statistics as the destination measured them (latencies in microseconds,
/// from the fault's arrival to the page being in place).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FaultSummary {
    /// Faults taken.
    pub count: u64,
    /// Median latency.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Longest.
    pub max_us: u64,
    /// Summed time faulting threads waited.
    pub total_stall_us: u64,
    /// Faults whose page arrived by the background push before the reply.
    pub resolved_by_push: u64,
    /// Faults resolved locally, without a request: the page had arrived (in pre-copy or by
    /// the push) but was not mapped yet. Not part of `count` or the latencies.
    pub local: u64,
    /// Up to [`MAX_FAULT_POINTS`] samples `(ms since resume, latency µs)` for timelines.
    pub points: Vec<(u32, u32)>,
}

/// Most fault samples in one [`Frame::FaultStats`].
pub const MAX_FAULT_POINTS: usize = 1 << 16;

/// The decoded metadata of a frame (its payload, if any, follows on the stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Page data: `ranges` in order; payload = sum of their lengths. With `checksums`, one
    /// xxh3-64 per page, in order.
    Pages {
        /// The ranges.
        ranges: Vec<GpaRange>,
        /// Per-page checksums, when negotiated.
        checksums: Option<Vec<u64>>,
        /// Sent while the VM is paused.
        last: bool,
    },
    /// Zero pages.
    ZeroPages {
        /// The ranges.
        ranges: Vec<GpaRange>,
    },
    /// Ranges compressed together into `payload_len` bytes of one zstd frame.
    CompressedPages {
        /// The ranges, whose total length is the decompressed size.
        ranges: Vec<GpaRange>,
        /// Bytes of compressed payload.
        compressed_len: u64,
    },
    /// Post-copy: ranges the destination must fetch before the guest may touch them.
    StaleSet {
        /// The ranges.
        ranges: Vec<GpaRange>,
    },
    /// Post-copy switchover: the pages the vCPUs touch first (a hint; pages still stale are
    /// on their way separately).
    FirstTouch {
        /// The ranges.
        ranges: Vec<GpaRange>,
    },
    /// Post-copy recovery: ranges the destination still lacks after a lost connection (every
    /// page not placed yet); `last` marks the final frame of the set.
    Missing {
        /// The ranges.
        ranges: Vec<GpaRange>,
        /// The last frame of the set.
        last: bool,
    },
    /// Post-copy demand fetch.
    PageRequest {
        /// Request id, echoed in the reply.
        id: u64,
        /// The range.
        range: GpaRange,
    },
    /// Reply to a `PageRequest`; payload = the bytes of `range`.
    PageReply {
        /// Request id.
        id: u64,
        /// The range.
        range: GpaRange,
        /// xxh3-64 of each page, when negotiated.
        checksums: Option<Vec<u64>>,
    },
    /// vCPU/device state blob of `len` bytes as payload.
    State {
        /// What the blob holds.
        kind: StateKind,
        /// The blob's own format version (opaque to ferry).
        version: u32,
        /// Blob length.
        len: u64,
    },
    /// A pre-copy round begins.
    RoundBegin {
        /// Round number, from 1.
        round: u32,
        /// Pages the round will send.
        pages: u64,
    },
    /// A pre-copy round ended on the sender.
    RoundEnd {
        /// Round number.
        round: u32,
    },
    /// The source VM is stopped.
    Switchover {
        /// How the migration continues.
        kind: SwitchoverKind,
        /// Source-side pause time, microseconds (for the report).
        pause_us: u64,
    },
    /// The destination's vCPUs run.
    Resumed {
        /// The destination's phase timings.
        timings: ResumeTimings,
    },
    /// All memory sent; the source's digest of all guest memory at switchover.
    Complete {
        /// 128-bit digest.
        digest: [u8; 16],
        /// Pages covered.
        pages: u64,
    },
    /// The destination's verdict.
    Verified {
        /// Whether the destination's digest equals the source's.
        ok: bool,
        /// The destination's digest.
        digest: [u8; 16],
    },
    /// The migration is abandoned.
    Abort {
        /// Why.
        reason: String,
    },
    /// An error.
    Error {
        /// Error class (see the engine's codes).
        code: u32,
        /// Message.
        message: String,
    },
    /// Progress counters.
    Progress(ProgressStats),
    /// Pages to send again.
    Resend {
        /// The ranges.
        ranges: Vec<GpaRange>,
    },
    /// No more frames on this stream.
    EndOfStream,
    /// Post-copy fault statistics.
    FaultStats(FaultSummary),
    /// RDMA sessions: where the destination's rdmacm listener waits.
    RdmaOffer {
        /// Its port, on the control stream's address.
        port: u16,
    },
    /// RDMA sessions: the sender's registered guest memory, which the peer may write
    /// (destination's) or read (source's).
    RdmaRegions {
        /// The regions (at most [`MAX_RDMA_REGIONS`]).
        regions: Vec<RdmaRegion>,
    },
}

pub use crate::handshake::MAX_RDMA_REGIONS;

const RANGE_LEN: usize = 16;

fn read_ranges(r: &mut Reader<'_>, what: &'static str) -> Result<Vec<GpaRange>, DecodeError> {
    let n = r.count(what, MAX_RANGES, RANGE_LEN)?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let gpa = r.u64("range gpa")?;
        let len = r.u64("range len")?;
        v.push(GpaRange::new(gpa, len));
    }
    Ok(v)
}

fn write_ranges(w: &mut Writer, ranges: &[GpaRange]) {
    w.count(ranges.len());
    for r in ranges {
        w.u64(r.gpa).u64(r.len);
    }
}

fn read_checksums(r: &mut Reader<'_>) -> Result<Vec<u64>, DecodeError> {
    let n = r.count("checksums", MAX_META_LEN as usize / 8, 8)?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(r.u64("checksum")?);
    }
    Ok(v)
}

fn sum_len(ranges: &[GpaRange], what: &'static str) -> Result<u64, DecodeError> {
    ranges.iter().try_fold(0u64, |acc, r| {
        acc.checked_add(r.len).ok_or(DecodeError::InvalidValue {
            field: what,
            value: r.len,
        })
    })
}

fn digest(r: &mut Reader<'_>) -> Result<[u8; 16], DecodeError> {
    r.array::<16>("digest")
}

impl Frame {
    /// The frame's command.
    pub fn command(&self) -> Command {
        match self {
            Frame::Pages { .. } => Command::Pages,
            Frame::ZeroPages { .. } => Command::ZeroPages,
            Frame::CompressedPages { .. } => Command::CompressedPages,
            Frame::StaleSet { .. } => Command::StaleSet,
            Frame::FirstTouch { .. } => Command::FirstTouch,
            Frame::Missing { .. } => Command::Missing,
            Frame::PageRequest { .. } => Command::PageRequest,
            Frame::PageReply { .. } => Command::PageReply,
            Frame::State { .. } => Command::State,
            Frame::RoundBegin { .. } => Command::RoundBegin,
            Frame::RoundEnd { .. } => Command::RoundEnd,
            Frame::Switchover { .. } => Command::Switchover,
            Frame::Resumed { .. } => Command::Resumed,
            Frame::Complete { .. } => Command::Complete,
            Frame::Verified { .. } => Command::Verified,
            Frame::Abort { .. } => Command::Abort,
            Frame::Error { .. } => Command::Error,
            Frame::Progress(_) => Command::Progress,
            Frame::Resend { .. } => Command::Resend,
            Frame::EndOfStream => Command::EndOfStream,
            Frame::FaultStats(_) => Command::FaultStats,
            Frame::RdmaOffer { .. } => Command::RdmaOffer,
            Frame::RdmaRegions { .. } => Command::RdmaRegions,
        }
    }

    /// Bytes of payload that follow this frame's metadata on the stream.
    pub fn payload_len(&self) -> u64 {
        match self {
            Frame::Pages { ranges, .. } => ranges.iter().map(|r| r.len).sum(),
            Frame::PageReply { range, .. } => range.len,
            Frame::CompressedPages { compressed_len, .. } => *compressed_len,
            Frame::State { len, .. } => *len,
            _ => 0,
        }
    }

    /// Encodes header and metadata into one buffer (the payload is sent separately, by
    /// reference, by the transport).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(64);
        let mut flag_bits = 0u16;
        match self {
            Frame::Pages {
                ranges,
                checksums,
                last,
            } => {
                write_ranges(&mut w, ranges);
                if let Some(c) = checksums {
                    flag_bits |= flags::CHECKSUMS;
                    w.count(c.len());
                    for v in c {
                        w.u64(*v);
                    }
                }
                if *last {
                    flag_bits |= flags::FINAL;
                }
            }
            Frame::ZeroPages { ranges }
            | Frame::StaleSet { ranges }
            | Frame::FirstTouch { ranges }
            | Frame::Resend { ranges } => {
                write_ranges(&mut w, ranges);
            }
            Frame::CompressedPages { ranges, .. } => write_ranges(&mut w, ranges),
            Frame::Missing { ranges, last } => {
                write_ranges(&mut w, ranges);
                if *last {
                    flag_bits |= flags::FINAL;
                }
            }
            Frame::PageRequest { id, range } => {
                w.u64(*id).u64(range.gpa).u64(range.len);
            }
            Frame::PageReply {
                id,
                range,
                checksums,
            } => {
                w.u64(*id).u64(range.gpa).u64(range.len);
                if let Some(c) = checksums {
                    flag_bits |= flags::CHECKSUMS;
                    w.count(c.len());
                    for v in c {
                        w.u64(*v);
                    }
                }
            }
            Frame::State { kind, version, .. } => {
                w.u8(*kind as u8).u32(*version);
            }
            Frame::RoundBegin { round, pages } => {
                w.u32(*round).u64(*pages);
            }
            Frame::RoundEnd { round } => {
                w.u32(*round);
            }
            Frame::Switchover { kind, pause_us } => {
                w.u8(*kind as u8).u64(*pause_us);
            }
            Frame::Resumed { timings } => {
                w.u64(timings.receive_us)
                    .u64(timings.restore_us)
                    .u64(timings.resume_us);
            }
            Frame::Complete { digest, pages } => {
                w.bytes(digest).u64(*pages);
            }
            Frame::Verified { ok, digest } => {
                w.u8(u8::from(*ok)).bytes(digest);
            }
            Frame::Abort { reason } => {
                w.string(reason, MAX_MESSAGE_LEN);
            }
            Frame::Error { code, message } => {
                w.u32(*code).string(message, MAX_MESSAGE_LEN);
            }
            Frame::Progress(p) => {
                w.u32(p.round)
                    .u64(p.bytes)
                    .u64(p.pages)
                    .u64(p.dirty_pages)
                    .u64(p.elapsed_us);
            }
            Frame::EndOfStream => {}
            Frame::FaultStats(f) => {
                w.u64(f.count)
                    .u64(f.p50_us)
                    .u64(f.p90_us)
                    .u64(f.p99_us)
                    .u64(f.p999_us)
                    .u64(f.max_us)
                    .u64(f.total_stall_us)
                    .u64(f.resolved_by_push)
                    .u64(f.local);
                let n = f.points.len().min(MAX_FAULT_POINTS);
                w.count(n);
                for (t, l) in &f.points[..n] {
                    w.u32(*t).u32(*l);
                }
            }
            Frame::RdmaOffer { port } => {
                w.u16(*port);
            }
            Frame::RdmaRegions { regions } => write_rdma_regions(&mut w, regions),
        }
        let meta = w.into_vec();
        let header = FrameHeader {
            command: self.command(),
            flags: flag_bits,
            meta_len: u32::try_from(meta.len()).unwrap_or(u32::MAX),
            payload_len: self.payload_len(),
        };
        let mut out = Vec::with_capacity(HEADER_LEN + meta.len());
        out.extend_from_slice(&header.encode());
        out.extend_from_slice(&meta);
        out
    }

    /// Decodes the metadata of a frame whose header was already decoded. Checks that the
    /// payload length agrees with the metadata and that nothing is left over. Does not check
    /// ranges against the memory map: call [`Frame::check_ranges`] before touching memory.
    pub fn decode(header: &FrameHeader, meta: &[u8]) -> Result<Frame, DecodeError> {
        if meta.len() != header.meta_len as usize {
            return Err(DecodeError::Truncated {
                what: "metadata",
                needed: header.meta_len as usize,
                have: meta.len(),
            });
        }
        let mut r = Reader::new(meta);
        let name = header.command.name();
        let frame = match header.command {
            Command::ClientHello
            | Command::ServerHello
            | Command::ClientAuth
            | Command::AuthOk
            | Command::Refused => {
                // Handshake frames are decoded by `handshake`; seeing one here is a protocol
                // violation, reported as an unknown command in this context.
                return Err(DecodeError::UnknownCommand {
                    code: header.command as u16,
                });
            }
            Command::Pages => {
                let ranges = read_ranges(&mut r, "page ranges")?;
                let checksums = if header.flags & flags::CHECKSUMS != 0 {
                    Some(read_checksums(&mut r)?)
                } else {
                    None
                };
                Frame::Pages {
                    ranges,
                    checksums,
                    last: header.flags & flags::FINAL != 0,
                }
            }
            Command::ZeroPages => Frame::ZeroPages {
                ranges: read_ranges(&mut r, "zero ranges")?,
            },
            Command::CompressedPages => Frame::CompressedPages {
                ranges: read_ranges(&mut r, "compressed ranges")?,
                compressed_len: header.payload_len,
            },
            Command::StaleSet => Frame::StaleSet {
                ranges: read_ranges(&mut r, "stale ranges")?,
            },
            Command::FirstTouch => Frame::FirstTouch {
                ranges: read_ranges(&mut r, "first-touch ranges")?,
            },
            Command::Missing => Frame::Missing {
                ranges: read_ranges(&mut r, "missing ranges")?,
                last: header.flags & flags::FINAL != 0,
            },
            Command::Resend => Frame::Resend {
                ranges: read_ranges(&mut r, "resend ranges")?,
            },
            Command::PageRequest => {
                let id = r.u64("request id")?;
                let range = GpaRange::new(r.u64("request gpa")?, r.u64("request len")?);
                if range.len > MAX_REQUEST_LEN || range.len == 0 {
                    return Err(DecodeError::InvalidValue {
                        field: "request len",
                        value: range.len,
                    });
                }
                Frame::PageRequest { id, range }
            }
            Command::PageReply => {
                let id = r.u64("reply id")?;
                let range = GpaRange::new(r.u64("reply gpa")?, r.u64("reply len")?);
                let checksums = if header.flags & flags::CHECKSUMS != 0 {
                    Some(read_checksums(&mut r)?)
                } else {
                    None
                };
                Frame::PageReply {
                    id,
                    range,
                    checksums,
                }
            }
            Command::State => {
                let kind = match r.u8("state kind")? {
                    1 => StateKind::Vm,
                    v => {
                        return Err(DecodeError::InvalidValue {
                            field: "state kind",
                            value: u64::from(v),
                        });
                    }
                };
                Frame::State {
                    kind,
                    version: r.u32("state version")?,
                    len: header.payload_len,
                }
            }
            Command::RoundBegin => Frame::RoundBegin {
                round: r.u32("round")?,
                pages: r.u64("round pages")?,
            },
            Command::RoundEnd => Frame::RoundEnd {
                round: r.u32("round")?,
            },
            Command::Switchover => {
                let kind = match r.u8("switchover kind")? {
                    1 => SwitchoverKind::StopAndCopy,
                    2 => SwitchoverKind::PostCopy,
                    v => {
                        return Err(DecodeError::InvalidValue {
                            field: "switchover kind",
                            value: u64::from(v),
                        });
                    }
                };
                Frame::Switchover {
                    kind,
                    pause_us: r.u64("pause_us")?,
                }
            }
            Command::Resumed => Frame::Resumed {
                timings: ResumeTimings {
                    receive_us: r.u64("receive_us")?,
                    restore_us: r.u64("restore_us")?,
                    resume_us: r.u64("resume_us")?,
                },
            },
            Command::Complete => Frame::Complete {
                digest: digest(&mut r)?,
                pages: r.u64("pages")?,
            },
            Command::Verified => {
                let ok = match r.u8("verified")? {
                    0 => false,
                    1 => true,
                    v => {
                        return Err(DecodeError::InvalidValue {
                            field: "verified",
                            value: u64::from(v),
                        });
                    }
                };
                Frame::Verified {
                    ok,
                    digest: digest(&mut r)?,
                }
            }
            Command::Abort => Frame::Abort {
                reason: r.string("abort reason", MAX_MESSAGE_LEN)?,
            },
            Command::Error => Frame::Error {
                code: r.u32("error code")?,
                message: r.string("error message", MAX_MESSAGE_LEN)?,
            },
            Command::Progress => Frame::Progress(ProgressStats {
                round: r.u32("round")?,
                bytes: r.u64("bytes")?,
                pages: r.u64("pages")?,
                dirty_pages: r.u64("dirty pages")?,
                elapsed_us: r.u64("elapsed")?,
            }),
            Command::EndOfStream => Frame::EndOfStream,
            Command::FaultStats => {
                let mut f = FaultSummary {
                    count: r.u64("fault count")?,
                    p50_us: r.u64("p50")?,
                    p90_us: r.u64("p90")?,
                    p99_us: r.u64("p99")?,
                    p999_us: r.u64("p99.9")?,
                    max_us: r.u64("max")?,
                    total_stall_us: r.u64("total stall")?,
                    resolved_by_push: r.u64("resolved by push")?,
                    local: r.u64("local faults")?,
                    points: Vec::new(),
                };
                let n = r.count("fault points", MAX_FAULT_POINTS, 8)?;
                f.points.reserve(n);
                for _ in 0..n {
                    f.points
                        .push((r.u32("point time")?, r.u32("point latency")?));
                }
                Frame::FaultStats(f)
            }
            Command::RdmaOffer => Frame::RdmaOffer {
                port: r.u16("rdma port")?,
            },
            Command::RdmaRegions => Frame::RdmaRegions {
                regions: read_rdma_regions(&mut r)?,
            },
        };
        r.finish(name)?;
        let expected = match &frame {
            Frame::Pages { ranges, .. } => sum_len(ranges, "page range len")?,
            Frame::PageReply { range, .. } => range.len,
            Frame::CompressedPages { .. } | Frame::State { .. } => header.payload_len,
            _ => 0,
        };
        if expected != header.payload_len {
            return Err(DecodeError::PayloadMismatch {
                command: name,
                declared: header.payload_len,
                expected,
            });
        }
        if let Frame::CompressedPages { ranges, .. } = &frame {
            let raw = sum_len(ranges, "compressed range len")?;
            if raw > MAX_PAGE_PAYLOAD {
                return Err(DecodeError::Oversized {
                    what: "decompressed pages",
                    len: raw,
                    max: MAX_PAGE_PAYLOAD,
                });
            }
        }
        Ok(frame)
    }

    /// Checks every guest-physical range the frame names against the negotiated memory map,
    /// and that per-page checksums (if any) number one per page. Call before any byte of the
    /// payload touches guest memory.
    pub fn check_ranges(&self, map: &MemoryMap) -> Result<(), FrameRangeError> {
        let ranges: &[GpaRange] = match self {
            Frame::Pages { ranges, .. }
            | Frame::ZeroPages { ranges }
            | Frame::CompressedPages { ranges, .. }
            | Frame::StaleSet { ranges }
            | Frame::FirstTouch { ranges }
            | Frame::Missing { ranges, .. }
            | Frame::Resend { ranges } => ranges,
            Frame::PageRequest { range, .. } | Frame::PageReply { range, .. } => {
                std::slice::from_ref(range)
            }
            _ => &[],
        };
        for (index, r) in ranges.iter().enumerate() {
            map.check(*r)
                .map_err(|source| FrameRangeError::Range { index, source })?;
        }
        let checksums = match self {
            Frame::Pages {
                checksums: Some(c), ..
            }
            | Frame::PageReply {
                checksums: Some(c), ..
            } => c,
            _ => return Ok(()),
        };
        let pages: u64 = ranges.iter().map(|r| r.len / map.page_size()).sum();
        if checksums.len() as u64 != pages {
            return Err(FrameRangeError::Checksums {
                count: checksums.len(),
                pages,
            });
        }
        Ok(())
    }
}

/// A frame names memory that is not ours, or carries the wrong number of checksums.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameRangeError {
    /// Range `index` of the frame failed the memory-map check.
    #[error("Range {index} of the frame is refused")]
    Range {
        /// Index in the frame.
        index: usize,
        /// Why.
        #[source]
        source: RangeError,
    },
    /// Not one checksum per page.
    #[error("{count} checksums for {pages} pages")]
    Checksums {
        /// Checksums carried.
        count: usize,
        /// Pages covered.
        pages: u64,
    },
}

/// Splits an encoded frame (header + metadata) back into its parts: a convenience for tests,
/// fuzzing and message-oriented transports. Fails on any inconsistency.
pub fn decode_buffer(buf: &[u8]) -> Result<(FrameHeader, Frame), DecodeError> {
    let mut r = Reader::new(buf);
    let header = FrameHeader::decode(&r.array::<HEADER_LEN>("frame header")?)?;
    let meta = r.bytes(header.meta_len as usize, "metadata")?;
    let frame = Frame::decode(&header, meta)?;
    r.finish("frame")?;
    Ok((header, frame))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_range() -> impl Strategy<Value = GpaRange> {
        (0u64..1 << 40, 1u64..1024).prop_map(|(p, n)| GpaRange::new(p * 4096, n * 4096))
    }

    fn arb_ranges() -> impl Strategy<Value = Vec<GpaRange>> {
        proptest::collection::vec(arb_range(), 0..20)
    }

    fn arb_string() -> impl Strategy<Value = String> {
        "\\PC{0,200}"
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (arb_ranges(), any::<bool>(), any::<bool>()).prop_map(|(ranges, cks, last)| {
                let checksums = cks.then(|| {
                    (0..ranges.iter().map(|r| r.len / 4096).sum::<u64>().min(64))
                        .collect::<Vec<_>>()
                });
                Frame::Pages {
                    ranges,
                    checksums,
                    last,
                }
            }),
            arb_ranges().prop_map(|ranges| Frame::ZeroPages { ranges }),
            (arb_ranges(), 0u64..1 << 20).prop_map(|(ranges, compressed_len)| {
                Frame::CompressedPages {
                    ranges,
                    compressed_len,
                }
            }),
            arb_ranges().prop_map(|ranges| Frame::StaleSet { ranges }),
            arb_ranges().prop_map(|ranges| Frame::FirstTouch { ranges }),
            (arb_ranges(), any::<bool>())
                .prop_map(|(ranges, last)| Frame::Missing { ranges, last }),
            arb_ranges().prop_map(|ranges| Frame::Resend { ranges }),
            (any::<u64>(), 1u64..512).prop_map(|(id, n)| Frame::PageRequest {
                id,
                range: GpaRange::new(n * 4096, 4096)
            }),
            (
                any::<u64>(),
                arb_range(),
                proptest::option::of(proptest::collection::vec(any::<u64>(), 0..8))
            )
                .prop_map(|(id, mut range, checksums)| {
                    range.len = range.len.min(MAX_REQUEST_LEN);
                    Frame::PageReply {
                        id,
                        range,
                        checksums,
                    }
                }),
            (any::<u32>(), 0u64..MAX_STATE_LEN).prop_map(|(version, len)| Frame::State {
                kind: StateKind::Vm,
                version,
                len
            }),
            (any::<u32>(), any::<u64>())
                .prop_map(|(round, pages)| Frame::RoundBegin { round, pages }),
            any::<u32>().prop_map(|round| Frame::RoundEnd { round }),
            any::<u16>().prop_map(|port| Frame::RdmaOffer { port }),
            proptest::collection::vec(
                (any::<u64>(), any::<u64>(), any::<u64>(), any::<u32>()),
                0..20
            )
            .prop_map(|v| Frame::RdmaRegions {
                regions: v
                    .into_iter()
                    .map(|(gpa, addr, len, rkey)| RdmaRegion {
                        gpa,
                        addr,
                        len,
                        rkey
                    })
                    .collect()
            }),
            (
                prop_oneof![
                    Just(SwitchoverKind::StopAndCopy),
                    Just(SwitchoverKind::PostCopy)
                ],
                any::<u64>()
            )
                .prop_map(|(kind, pause_us)| Frame::Switchover { kind, pause_us }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, b, c)| Frame::Resumed {
                timings: ResumeTimings {
                    receive_us: a,
                    restore_us: b,
                    resume_us: c
                }
            }),
            (any::<[u8; 16]>(), any::<u64>())
                .prop_map(|(digest, pages)| Frame::Complete { digest, pages }),
            (any::<bool>(), any::<[u8; 16]>())
                .prop_map(|(ok, digest)| Frame::Verified { ok, digest }),
            arb_string().prop_map(|reason| Frame::Abort { reason }),
            (any::<u32>(), arb_string()).prop_map(|(code, message)| Frame::Error { code, message }),
            (
                any::<u32>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>()
            )
                .prop_map(|(round, bytes, pages, dirty_pages, elapsed_us)| {
                    Frame::Progress(ProgressStats {
                        round,
                        bytes,
                        pages,
                        dirty_pages,
                        elapsed_us,
                    })
                }),
            Just(Frame::EndOfStream),
            (
                any::<[u64; 9]>(),
                proptest::collection::vec(any::<(u32, u32)>(), 0..50)
            )
                .prop_map(|(v, points)| {
                    Frame::FaultStats(FaultSummary {
                        count: v[0],
                        p50_us: v[1],
                        p90_us: v[2],
                        p99_us: v[3],
                        p999_us: v[4],
                        max_us: v[5],
                        total_stall_us: v[6],
                        resolved_by_push: v[7],
                        local: v[8],
                        points,
                    })
                }),
        ]
    }

    proptest! {
        #[test]
        fn every_frame_round_trips(frame in arb_frame()) {
            let buf = frame.encode();
            let (header, decoded) = decode_buffer(&buf).unwrap();
            prop_assert_eq!(header.command, frame.command());
            prop_assert_eq!(header.payload_len, frame.payload_len());
            prop_assert_eq!(decoded, frame);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_buffer(&bytes);
        }

        #[test]
        fn every_truncation_is_an_error(frame in arb_frame(), cut in any::<prop::sample::Index>()) {
            let buf = frame.encode();
            let n = cut.index(buf.len());
            prop_assert!(decode_buffer(&buf[..n]).is_err());
        }
    }

    #[test]
    fn a_full_range_list_fits_one_frame() {
        let ranges: Vec<GpaRange> = (0..MAX_LIST_RANGES as u64)
            .map(|i| GpaRange::new(i * 8192, 4096))
            .collect();
        let f = Frame::Missing { ranges, last: true };
        let (_, back) = decode_buffer(&f.encode()).unwrap();
        assert_eq!(back, f);
        let Frame::Missing { mut ranges, .. } = f else {
            unreachable!()
        };
        ranges.push(GpaRange::new(1 << 40, 4096));
        decode_buffer(&Frame::Missing { ranges, last: true }.encode()).unwrap_err();
    }

    #[test]
    fn every_command_is_covered_by_the_round_trip_strategy() {
        // Handshake commands are round-tripped in `handshake`'s tests.
        let handshake = [
            Command::ClientHello,
            Command::ServerHello,
            Command::ClientAuth,
            Command::AuthOk,
            Command::Refused,
        ];
        assert_eq!(Command::ALL.len(), handshake.len() + 23);
    }

    #[test]
    fn typed_errors_for_bad_headers() {
        let mut h = Frame::EndOfStream.encode();
        h[0] = 0;
        h[1] = 0;
        assert_eq!(decode_buffer(&h), Err(DecodeError::InvalidCommand));
        h[0] = 0xEE;
        h[1] = 0x7E;
        assert_eq!(
            decode_buffer(&h),
            Err(DecodeError::UnknownCommand { code: 0x7EEE })
        );
        let header = FrameHeader {
            command: Command::Pages,
            flags: 0,
            meta_len: MAX_META_LEN + 1,
            payload_len: 0,
        };
        assert_eq!(
            FrameHeader::decode(&header.encode()),
            Err(DecodeError::Oversized {
                what: "metadata",
                len: u64::from(MAX_META_LEN) + 1,
                max: u64::from(MAX_META_LEN)
            })
        );
        let header = FrameHeader {
            command: Command::Pages,
            flags: 0,
            meta_len: 4,
            payload_len: MAX_PAGE_PAYLOAD + 1,
        };
        assert!(matches!(
            FrameHeader::decode(&header.encode()),
            Err(DecodeError::Oversized {
                what: "payload",
                ..
            })
        ));
        let buf = Frame::EndOfStream.encode();
        assert!(matches!(
            decode_buffer(&buf[..10]),
            Err(DecodeError::Truncated {
                what: "frame header",
                needed: 16,
                have: 10
            })
        ));
    }

    #[test]
    fn payload_must_match_ranges() {
        let f = Frame::Pages {
            ranges: vec![GpaRange::new(0, 4096)],
            checksums: None,
            last: false,
        };
        let mut buf = f.encode();
        buf[8..16].copy_from_slice(&8192u64.to_le_bytes());
        assert_eq!(
            decode_buffer(&buf),
            Err(DecodeError::PayloadMismatch {
                command: "Pages",
                declared: 8192,
                expected: 4096
            })
        );
    }

    #[test]
    fn out_of_range_addresses_are_refused_before_memory_is_touched() {
        let map = MemoryMap::new(4096, vec![GpaRange::new(0, 1 << 20)]).unwrap();
        let ok = Frame::Pages {
            ranges: vec![GpaRange::new(0, 4096), GpaRange::new(0xF_F000, 4096)],
            checksums: Some(vec![1, 2]),
            last: false,
        };
        assert_eq!(ok.check_ranges(&map), Ok(()));
        let bad = Frame::Pages {
            ranges: vec![GpaRange::new(0, 4096), GpaRange::new(1 << 20, 4096)],
            checksums: None,
            last: false,
        };
        assert_eq!(
            bad.check_ranges(&map),
            Err(FrameRangeError::Range {
                index: 1,
                source: RangeError::OutOfRange {
                    gpa: 1 << 20,
                    len: 4096
                }
            })
        );
        let wrong_count = Frame::Pages {
            ranges: vec![GpaRange::new(0, 8192)],
            checksums: Some(vec![1]),
            last: false,
        };
        assert_eq!(
            wrong_count.check_ranges(&map),
            Err(FrameRangeError::Checksums { count: 1, pages: 2 })
        );
        let req = Frame::PageRequest {
            id: 1,
            range: GpaRange::new(1 << 30, 4096),
        };
        assert!(req.check_ranges(&map).is_err());
    }

    #[test]
    fn count_larger_than_metadata_is_truncation_not_allocation() {
        // A frame claiming 65536 ranges in 4 bytes of metadata.
        let mut meta = Vec::new();
        meta.extend_from_slice(&65536u32.to_le_bytes());
        let header = FrameHeader {
            command: Command::ZeroPages,
            flags: 0,
            meta_len: 4,
            payload_len: 0,
        };
        assert!(matches!(
            Frame::decode(&header, &meta),
            Err(DecodeError::Truncated {
                what: "zero ranges",
                ..
            })
        ));
    }
}
