// SPDX-License-Identifier: Apache-2.0 OR MIT
//! # ferry's wire protocol
//!
//! This crate owns the bytes ferry puts on the wire and nothing else: the versioned,
//! mutually authenticated [`handshake`], the [`frame`] header and the metadata of every frame,
//! and the [`memmap`] check every guest-physical range passes before it touches memory. It does
//! no I/O (sockets, rings and queue pairs are `ferry-transport`'s) and makes no policy (which
//! page moves when is `ferry-engine`'s).
//!
//! ## Rules
//!
//! - Every integer is little-endian. Every frame starts with a 16-byte [`frame::FrameHeader`]:
//!   command (`u16`, 0 is invalid), flags, metadata length, payload length.
//! - Decoding never panics and never allocates more than the metadata it holds can justify:
//!   metadata is capped at [`frame::MAX_META_LEN`], payloads per command, counts are checked
//!   against the bytes left before anything is reserved. Every failure is a typed
//!   [`DecodeError`] naming the values.
//! - Page payloads are not part of a decoded [`frame::Frame`]: the receiver checks the ranges
//!   against the negotiated [`memmap::MemoryMap`] ([`frame::Frame::check_ranges`]) and only then
//!   reads the payload straight into guest memory. Nothing is written for a range outside it.
//! - One session = one control stream + N bulk streams + one urgent stream, each opened by its
//!   own handshake; every stream after the control stream names the session id the control
//!   stream was given, and a stream naming an unknown session is refused.
//!
//! ## A migration
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as Source
//!     participant D as Destination
//!     Note over S,D: control stream
//!     S->>D: ClientHello(magic, versions, nonce_c, role=Control, Params)
//!     D->>S: ServerHello(version, nonce_s, session, negotiated Params, MAC_s)
//!     S->>D: ClientAuth(MAC_c)
//!     D->>S: AuthOk
//!     Note over S,D: N bulk streams + 1 urgent stream, each: Hello(session) / Hello / Auth / AuthOk
//!     opt transport RDMA
//!         D->>S: RdmaOffer(port) [control]
//!         Note over S,D: rdmacm: N RC queue pairs in bulk-stream order (+1 for READs unless pre-copy)
//!         S->>D: RdmaRegions(source memory: addr, len, rkey per chunk) [control, unless pre-copy]
//!         D->>S: RdmaRegions(destination memory) [control]
//!         Note over S,D: Pages payload: RDMA WRITE + WRITE_WITH_IMM(seq, units) on queue pair i,<br/>then the frame's header on bulk stream i; at the switch to post-copy a<br/>zero-length WRITE_WITH_IMM(seq, 0) on each, and payload in-band from then on;<br/>post-copy faults: the destination READs source memory (no PageRequest sent)
//!     end
//!     loop pre-copy rounds (pre-copy, hybrid)
//!         S->>D: RoundBegin(round) [control]
//!         S->>D: Pages / ZeroPages / CompressedPages [bulk, parallel]
//!         S->>D: RoundEnd(round) [control]
//!         D-->>S: Resend(ranges) [control, only on a failed live checksum]
//!         S->>D: drain marker RoundEnd(u32::MAX - 2) on every bulk stream [bulk]
//!         S->>D: RoundEnd(u32::MAX - 2) [control]
//!         D-->>S: RoundEnd(u32::MAX - 2) [control, once every receiver passed the marker]
//!     end
//!     opt hybrid switching to post-copy, VM still running (repeated while it shrinks)
//!         S->>D: drain marker [bulk], StaleSet(ranges dirty now) [control], RoundEnd(u32::MAX - 2) [control]
//!         D-->>S: RoundEnd(u32::MAX - 2) [control, after dropping them]
//!     end
//!     opt post-copy
//!         S->>D: switchover marker on every bulk stream, flushed before the pause [bulk]
//!     end
//!     Note over S: pause vCPUs (blackout starts)
//!     S->>D: Switchover(kind) [control]
//!     Note over S: final dirty harvest, save state
//!     alt stop-and-copy
//!         S->>D: Pages(last) with the final dirty set, then the marker [bulk]
//!         S->>D: State(vCPU + device blob) [control]
//!     else post-copy
//!         S->>D: StaleSet(ranges), FirstTouch(ranges), State(blob) in one write [control]
//!         S->>D: Pages: the stale first-touch pages [bulk]
//!     end
//!     Note over S: point of no return: from here the source resumes its VM only on the<br/>destination's Error/Abort, else it stays paused until it learns the answer
//!     Note over D: restore, resume vCPUs (blackout ends)
//!     D->>S: Resumed(timings) [control]
//!     opt the connection is lost before the source saw Resumed (version 4)
//!         S->>D: ClientHello(role=Control, session=old id) / ... / AuthOk
//!         D->>S: Resumed(timings) if it runs the VM, else Abort(reason) (it never will) [control]
//!     end
//!     opt post-copy
//!         D->>S: PageRequest(id, range) [urgent]
//!         S->>D: PageReply(id, range) + bytes [urgent]
//!         S->>D: Pages (background push, fault neighbourhood first) [bulk]
//!     end
//!     opt post-copy, the connection is lost (recovery, version 3)
//!         Note over D: the VM keeps running; faults wait; missing pages are known
//!         S->>D: ClientHello(role=Control, session=old id) / ServerHello / ClientAuth / AuthOk
//!         Note over S,D: N bulk + 1 urgent stream join the old session id again
//!         D->>S: Resumed(timings) [control, version 4: first frame of every resumed session]
//!         D->>S: Missing(ranges)... Missing(ranges, last) [control]
//!         D->>S: PageRequest (the outstanding ones again) [urgent]
//!         S->>D: Pages (exactly the missing ranges), PageReply [bulk, urgent]
//!     end
//!     S->>D: Complete(source digest) [control]
//!     D->>S: Verified(ok, destination digest) [control]
//!     S->>D: EndOfStream [every stream]
//! ```
//!
//! ## The receiver's state machine (control stream)
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Handshake
//!     Handshake --> Refused: bad magic / version / MAC / session / params
//!     Handshake --> PreCopy: AuthOk (mode pre-copy or hybrid)
//!     Handshake --> Switching: AuthOk (mode post-copy)
//!     PreCopy --> PreCopy: RoundBegin / RoundEnd / Progress
//!     PreCopy --> Switching: Switchover
//!     PreCopy --> Failed: Abort / Error / stream lost (source keeps running)
//!     Switching --> Running: State applied, vCPUs resumed (sends Resumed)
//!     Switching --> Failed: Abort / Error (sends Error: its VM never runs, the source resumes its own)
//!     Switching --> GivingUp: stream lost before State arrived (recovery configured)
//!     GivingUp --> Failed: the source resumed the session (sends Abort) or the window passed
//!     Running --> Running: faults served (post-copy), pages placed
//!     Running --> Completing: Complete(digest) and no page outstanding
//!     Running --> Recovering: stream lost (destination owns the VM; Resumed may be lost)
//!     Recovering --> Running: the source resumed the session (sends Resumed, then Missing in post-copy)
//!     Recovering --> Failed: no resumption within the recovery window (VM waits on the missing pages)
//!     Completing --> [*]: Verified sent
//!     Refused --> [*]
//!     Failed --> [*]
//! ```
//!
//! Every frame is refused with an error before `AuthOk`; after it, a frame not expected in
//! the current state is an error that ends the migration (pre-copy: the source keeps the VM).
#![warn(missing_docs)]

pub mod codec;
pub mod frame;
pub mod handshake;
pub mod memmap;

pub use codec::DecodeError;
pub use frame::{Command, Frame, FrameHeader, HEADER_LEN};
pub use handshake::{Auth, HandshakeError, Params, Psk, SessionId};
pub use memmap::{GpaRange, MemoryMap, RangeError};
