// SPDX-License-Identifier: Apache-2.0 OR MIT
//! [`RdmaDataStream`]: the [`DataStream`] API over one RDMA queue pair plus one TCP connection,
//! so the engine's pre-copy sender and receiver run unchanged over RDMA.
//!
//! How a frame moves:
//! - **Source** ([`RdmaDataStream::source`]): the frame's guest ranges become RDMA WRITEs from
//!   the source's registered guest memory to the same guest-physical addresses in the
//!   destination's registered memory, ending with a WRITE_WITH_IMM (see
//!   [`RdmaStream::write_batch`]); then the frame's header bytes go on the TCP connection. The
//!   payload never passes through either CPU.
//! - **Destination** ([`RdmaDataStream::destination`]): header bytes are read from TCP as
//!   usual; `recv_into` does not move bytes but waits until the batch that carried them has
//!   arrived (its immediate was consumed: RC placement is in order, so every byte of the batch
//!   is in memory) and checks the batch's sequence number and size against what the frame
//!   expects.
//!
//! The immediate of every batch is `sequence << 16 | units`: a 16-bit sequence number per stream
//! (wrapping) and the batch's payload in 4 KiB units (1..=65535). A frame's ranges longer than
//! that go as several batches. The receiver credits each arrival's bytes against the ranges
//! `recv_into` asks for; a frame that ends with credit left over, a skipped sequence number or a
//! range that is not a whole number of 4 KiB units fail the stream with a typed error.
//!
//! **In-band mode.** Writing into the destination's memory is only right while its guest does
//! not run there. [`DataStream::end_direct_placement`] (the engine's source calls it when a
//! migration switches to post-copy) posts a zero-length WRITE_WITH_IMM with 0 units, in
//! sequence: from that marker on, frames carry their payload on the TCP stream like the socket
//! backend, and the destination, which meets the marker where it would have waited for the
//! next batch, receives them the same way (claims, staging and all). On the destination the
//! same call (the engine makes it before its first post-copy frame) waits for the marker if it
//! has not met it yet; meeting it destroys the queue pair, so the source cannot write the
//! memory the guest now runs on.
//!
//! Receiving into a file (`Target::File`) is refused while payload arrives by RDMA. The
//! destination's registration must cover the mapping its receiver names (guest memory, or the
//! alias of a memfd region); the engine registers the mapping it lands pages in.
//!
//! Lifetime: dropping or shutting down the destination's stream destroys its queue pair, after
//! which the peer cannot write through it any more.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use super::memory::RegisteredMemory;
use super::region::{GuestRange, RemoteMap};
use super::stream::RdmaStream;
use crate::error::StreamError;
use crate::memory::{GpaRange, Target};
use crate::stream::{DataStream, StreamStats};

/// The unit in which a batch's size travels in its immediate.
pub const UNIT: u64 = 4096;
/// Most units in one batch (the immediate's low 16 bits).
pub const MAX_BATCH_UNITS: u64 = u16::MAX as u64;

/// Encodes a batch's immediate.
pub fn encode_imm(sequence: u16, units: u16) -> u32 {
    (u32::from(sequence) << 16) | u32::from(units)
}

/// Decodes a batch's immediate into (sequence, units).
pub fn decode_imm(imm: u32) -> (u16, u16) {
    let [a, b, c, d] = imm.to_be_bytes();
    (u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]))
}

/// What the framing above RDMA found wrong.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FramedError {
    /// A range to send is not a whole, non-zero number of 4 KiB units.
    #[error("Range {gpa:#x}+{len:#x} is not a non-zero multiple of {UNIT} bytes")]
    Unaligned {
        /// Guest-physical address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// A batch arrived out of sequence.
    #[error("RDMA batch {got} arrived where batch {expected} was due")]
    Sequence {
        /// The sequence number due.
        expected: u16,
        /// The one that arrived.
        got: u16,
    },
    /// The in-band marker arrived in the middle of a frame's payload.
    #[error("RDMA in-band marker {sequence} arrived {consumed} bytes into a frame's payload")]
    MarkerInFrame {
        /// Its sequence number.
        sequence: u16,
        /// Bytes of the frame already accounted for.
        consumed: u64,
    },
    /// A frame ended before it consumed all the bytes its batch carried.
    #[error("A frame ended with {left} bytes of its RDMA batch {sequence} unaccounted for")]
    Leftover {
        /// The batch.
        sequence: u16,
        /// Bytes the frames did not claim.
        left: u64,
    },
    /// A batch arrived where the switch to in-band payload was due.
    #[error("RDMA batch {sequence} arrived where the switch to in-band payload was due")]
    BatchAfterSwitch {
        /// The batch.
        sequence: u16,
    },
    /// The receiver asked for a target this stream's registration does not cover.
    #[error("RDMA streams land in registered memory only, not in {target:?}")]
    Target {
        /// The refused target.
        target: Target,
    },
    /// The receiver asked for more bytes than fit in a `u64`.
    #[error("Receive of {ranges} ranges overflows a byte count")]
    Overflow {
        /// How many ranges.
        ranges: usize,
    },
    /// The stream's queue pair is gone (shut down).
    #[error("The RDMA queue pair was shut down")]
    Gone,
    /// This side of the stream cannot do that (a source does not receive payload).
    #[error("A {side} RDMA stream cannot {op}")]
    WrongSide {
        /// Source or destination.
        side: &'static str,
        /// The refused operation.
        op: &'static str,
    },
}

/// The source's view of the peer: its own registered memory and the peer's imported map.
#[derive(Debug, Clone)]
pub struct PushTarget {
    /// This side's registered guest memory (RDMA WRITE reads from it).
    pub local: Arc<RegisteredMemory>,
    /// The destination's memory, imported from its descriptor.
    pub remote: Arc<RemoteMap>,
}

#[derive(Debug)]
enum Side {
    Source(PushTarget),
    /// `credit`: bytes of the last batch (number `sequence - 1`) no frame claimed yet.
    Destination {
        credit: u64,
    },
}

/// A [`DataStream`] whose frame headers travel on a TCP stream and whose payload travels by RDMA
/// WRITE. See the module docs.
pub struct RdmaDataStream {
    header: Box<dyn DataStream>,
    // Declared before nothing that it needs: dropping it destroys the queue pair first.
    rdma: Option<RdmaStream>,
    side: Side,
    sequence: u16,
    /// Payload travels on the TCP stream (after the in-band marker).
    inline: bool,
    timeout: Duration,
    payload_received: u64,
    batches: Vec<Vec<GuestRange>>,
    max_units: u64,
    /// Kept alive until after the queue pair (declared after it): what the registration the
    /// peer writes into covers, when the stream owns it (e.g. mappings made for it).
    _hold: Option<Arc<dyn fmt::Debug + Send + Sync>>,
}

impl fmt::Debug for RdmaDataStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RdmaDataStream")
            .field("index", &self.header.index())
            .field("peer", &self.header.peer())
            .field("side", &self.side)
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

/// Splits `ranges`, in order, into batches of at most `max_units` 4 KiB units each (at least
/// one), cutting a range where a batch fills up. Every range must be a non-zero multiple of
/// [`UNIT`] bytes that does not overflow the address space.
pub fn plan_batches(
    ranges: &[GpaRange],
    max_units: u64,
    out: &mut Vec<Vec<GuestRange>>,
) -> Result<(), FramedError> {
    out.clear();
    let max_units = max_units.clamp(1, MAX_BATCH_UNITS);
    let mut cur: Vec<GuestRange> = Vec::new();
    let mut units = 0u64;
    for r in ranges {
        if r.len == 0 || r.len % UNIT != 0 || r.gpa.checked_add(r.len).is_none() {
            out.clear();
            return Err(FramedError::Unaligned {
                gpa: r.gpa,
                len: r.len,
            });
        }
        let (mut gpa, mut left) = (r.gpa, r.len / UNIT);
        while left > 0 {
            let take = left.min(max_units - units);
            cur.push(GuestRange::new(gpa, take * UNIT));
            units += take;
            left -= take;
            gpa += take * UNIT;
            if units == max_units {
                out.push(std::mem::take(&mut cur));
                units = 0;
            }
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    Ok(())
}

fn rdma_err(header: &dyn DataStream, source: impl StdError + Send + Sync + 'static) -> StreamError {
    StreamError::Rdma {
        stream: header.index(),
        peer: header.peer().to_owned(),
        source: Box::new(source),
    }
}

impl RdmaDataStream {
    /// The source end: pushes frames' ranges from `target.local` to the peer's memory through
    /// `rdma`, and frame headers through `header`. Waits for send-queue space and completions
    /// at most `timeout`.
    pub fn source(
        header: Box<dyn DataStream>,
        rdma: RdmaStream,
        target: PushTarget,
        timeout: Duration,
    ) -> Self {
        Self::new(header, rdma, Side::Source(target), timeout)
    }

    /// The destination end: reads headers from `header` and accounts for payload that the
    /// peer's WRITEs placed in this side's registered memory. Waits for a batch at most
    /// `timeout` once its frame's header arrived.
    pub fn destination(header: Box<dyn DataStream>, rdma: RdmaStream, timeout: Duration) -> Self {
        Self::new(header, rdma, Side::Destination { credit: 0 }, timeout)
    }

    fn new(header: Box<dyn DataStream>, rdma: RdmaStream, side: Side, timeout: Duration) -> Self {
        Self {
            header,
            rdma: Some(rdma),
            side,
            sequence: 0,
            inline: false,
            timeout,
            payload_received: 0,
            batches: Vec::new(),
            max_units: MAX_BATCH_UNITS,
            _hold: None,
        }
    }

    /// Keeps `hold` alive until after this stream's queue pair is destroyed: the memory a
    /// destination's registration covers, when the caller made it for the session.
    pub fn holding(mut self, hold: Arc<dyn fmt::Debug + Send + Sync>) -> Self {
        self._hold = Some(hold);
        self
    }

    /// The queue pair, while the stream has one (tests: raw work requests beside the framing).
    #[cfg(test)]
    pub(crate) fn queue_pair(&mut self) -> Option<&mut RdmaStream> {
        self.rdma.as_mut()
    }

    /// Caps batches at `units` (tests: exercises frames that span several batches).
    #[cfg(test)]
    pub(crate) fn with_max_batch_units(mut self, units: u64) -> Self {
        self.max_units = units.clamp(1, MAX_BATCH_UNITS);
        self
    }

    fn err(&self, source: impl StdError + Send + Sync + 'static) -> StreamError {
        rdma_err(self.header.as_ref(), source)
    }

    /// Splits `ranges` into `self.batches` (see [`plan_batches`]).
    fn plan(&mut self, ranges: &[GpaRange]) -> Result<(), FramedError> {
        let mut batches = std::mem::take(&mut self.batches);
        let r = plan_batches(ranges, self.max_units, &mut batches);
        self.batches = batches;
        r
    }

    fn rdma(&mut self) -> Result<&mut RdmaStream, StreamError> {
        match self.rdma {
            Some(ref mut s) => Ok(s),
            None => Err(rdma_err(self.header.as_ref(), FramedError::Gone)),
        }
    }

    /// Destination: makes sure the peer switched to in-band payload (waits for its marker if
    /// not met yet) and destroys the queue pair, so the peer cannot write our memory through
    /// it any more.
    fn revoke(&mut self) -> Result<(), StreamError> {
        if !self.inline {
            self.no_leftover()?;
            if self.next_batch()? != 0 {
                let sequence = self.sequence.wrapping_sub(1);
                return Err(self.err(FramedError::BatchAfterSwitch { sequence }));
            }
            self.inline = true;
        }
        self.rdma = None;
        Ok(())
    }

    /// Fails if the last batch still has bytes no frame claimed (a frame ended short of them).
    fn no_leftover(&self) -> Result<(), StreamError> {
        match self.side {
            Side::Destination { credit } if credit != 0 => Err(self.err(FramedError::Leftover {
                sequence: self.sequence.wrapping_sub(1),
                left: credit,
            })),
            _ => Ok(()),
        }
    }

    /// Waits for the next batch and returns its size in bytes (0: the in-band marker).
    fn next_batch(&mut self) -> Result<u64, StreamError> {
        let timeout = self.timeout;
        let expected = self.sequence;
        let arrival = self
            .rdma()?
            .wait_arrival(timeout)
            .map_err(|e| self.err(e))?;
        let (got, units) = decode_imm(arrival.batch);
        if got != expected {
            return Err(self.err(FramedError::Sequence { expected, got }));
        }
        self.sequence = self.sequence.wrapping_add(1);
        Ok(u64::from(units) * UNIT)
    }
}

impl DataStream for RdmaDataStream {
    fn index(&self) -> usize {
        self.header.index()
    }

    fn peer(&self) -> &str {
        self.header.peer()
    }

    fn backend(&self) -> &'static str {
        "rdma"
    }

    fn send_frame(&mut self, header: &[u8], ranges: &[GpaRange]) -> Result<(), StreamError> {
        if self.inline {
            return self.header.send_frame(header, ranges);
        }
        if !ranges.is_empty() {
            let Side::Source(target) = &self.side else {
                return Err(self.err(FramedError::WrongSide {
                    side: "destination",
                    op: "send page data",
                }));
            };
            let target = target.clone();
            self.plan(ranges).map_err(|e| self.err(e))?;
            let batches = std::mem::take(&mut self.batches);
            let timeout = self.timeout;
            let mut result = Ok(());
            for b in &batches {
                let units: u64 = b.iter().map(|r| r.len / UNIT).sum();
                // `plan` keeps every batch within 1..=MAX_BATCH_UNITS units.
                let imm = encode_imm(self.sequence, u16::try_from(units).unwrap_or(u16::MAX));
                let posted = match self.rdma() {
                    Ok(s) => s
                        .write_batch(&target.local, &target.remote, b, imm, timeout)
                        .map_err(|e| self.err(e)),
                    Err(e) => Err(e),
                };
                if let Err(e) = posted {
                    result = Err(e);
                    break;
                }
                self.sequence = self.sequence.wrapping_add(1);
            }
            self.batches = batches;
            result?;
        }
        self.header.send_frame(header, &[])
    }

    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<(), StreamError> {
        self.no_leftover()?;
        self.header.recv_exact(buf)
    }

    fn recv_into(&mut self, ranges: &[GpaRange], target: Target) -> Result<(), StreamError> {
        if !matches!(self.side, Side::Destination { .. }) {
            return Err(self.err(FramedError::WrongSide {
                side: "source",
                op: "receive page data",
            }));
        }
        if self.inline {
            return self.header.recv_into(ranges, target);
        }
        let mut need = 0u64;
        for r in ranges {
            need = need.checked_add(r.len).ok_or_else(|| {
                self.err(FramedError::Overflow {
                    ranges: ranges.len(),
                })
            })?;
        }
        let total = need;
        while need > 0 {
            let Side::Destination { credit } = self.side else {
                break;
            };
            let have = if credit == 0 {
                let bytes = self.next_batch()?;
                if bytes == 0 {
                    // The in-band marker: this frame's payload, and every later one, is on the
                    // TCP stream. It only ever comes between frames.
                    let sequence = self.sequence.wrapping_sub(1);
                    if need != total {
                        return Err(self.err(FramedError::MarkerInFrame {
                            sequence,
                            consumed: total - need,
                        }));
                    }
                    self.inline = true;
                    // The peer may not write through it any more: destroy it.
                    self.rdma = None;
                    return self.header.recv_into(ranges, target);
                }
                // Payload the peer placed in our registered memory: it cannot be in a file.
                if target == Target::File {
                    return Err(self.err(FramedError::Target { target }));
                }
                bytes
            } else {
                credit
            };
            let take = have.min(need);
            need -= take;
            self.payload_received += take;
            if let Side::Destination { credit } = &mut self.side {
                *credit = have - take;
            }
        }
        Ok(())
    }

    fn end_direct_placement(&mut self) -> Result<(), StreamError> {
        let Side::Source(target) = &self.side else {
            return self.revoke();
        };
        if self.inline {
            return Ok(());
        }
        let target = target.clone();
        let imm = encode_imm(self.sequence, 0);
        let timeout = self.timeout;
        self.rdma()?
            .post_marker(&target.local, &target.remote, imm, timeout)
            .map_err(|e| rdma_err(self.header.as_ref(), e))?;
        self.sequence = self.sequence.wrapping_add(1);
        self.inline = true;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        let timeout = self.timeout;
        if let Some(s) = self.rdma.as_mut() {
            s.flush(timeout)
                .map_err(|e| rdma_err(self.header.as_ref(), e))?;
        }
        self.header.flush()
    }

    fn shutdown(&mut self) -> Result<(), StreamError> {
        let flushed = self.flush();
        // Destroys the queue pair: the peer can no longer write through it.
        self.rdma = None;
        let closed = self.header.shutdown();
        flushed.and(closed)
    }

    fn stats(&self) -> StreamStats {
        let mut s = self.header.stats();
        if let Some(r) = &self.rdma {
            let r = r.stats();
            s.bytes_sent += r.bytes_written;
            s.sqes += r.send_wrs;
            s.submits += r.posts;
        }
        s.bytes_received += self.payload_received;
        s
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn immediate_round_trips() {
        for (seq, units) in [(0, 1), (1, 65535), (65535, 7), (0x1234, 0x5678)] {
            assert_eq!(decode_imm(encode_imm(seq, units)), (seq, units));
        }
        assert_eq!(encode_imm(2, 3), 0x0002_0003);
    }

    proptest::proptest! {
        /// Batches cover the ranges exactly, in order, each within 1..=max units, and only
        /// the last may be short.
        #[test]
        fn batches_cover_the_ranges_in_order(
            ranges in proptest::collection::vec((0u64..1 << 30, 1u64..300), 0..12),
            max in 1u64..100,
        ) {
            let ranges: Vec<GpaRange> =
                ranges.iter().map(|&(p, n)| GpaRange::new(p * UNIT, n * UNIT)).collect();
            let mut out = Vec::new();
            plan_batches(&ranges, max, &mut out).unwrap();
            let units: Vec<u64> =
                out.iter().map(|b| b.iter().map(|r| r.len / UNIT).sum()).collect();
            for (i, u) in units.iter().enumerate() {
                proptest::prop_assert!(*u >= 1 && *u <= max);
                if i + 1 < units.len() {
                    proptest::prop_assert_eq!(*u, max);
                }
            }
            // Concatenated, adjacent pieces merge back into the input ranges.
            let mut merged: Vec<GpaRange> = Vec::new();
            let mut first_of_range = true;
            let mut want = ranges.iter();
            let mut cur = want.next().copied();
            for piece in out.iter().flatten() {
                let Some(c) = cur.as_mut() else {
                    proptest::prop_assert!(false, "more pieces than ranges");
                    break;
                };
                if first_of_range {
                    proptest::prop_assert_eq!(piece.gpa, c.gpa);
                    merged.push(GpaRange::new(piece.gpa, 0));
                    first_of_range = false;
                }
                let m = merged.last_mut().unwrap();
                proptest::prop_assert_eq!(piece.gpa, m.gpa + m.len);
                m.len += piece.len;
                if m.len == c.len {
                    cur = want.next().copied();
                    first_of_range = true;
                }
            }
            proptest::prop_assert_eq!(merged, ranges);
        }
    }

    #[test]
    fn unusable_ranges_are_refused() {
        let mut out = vec![vec![GuestRange::new(0, UNIT)]];
        for bad in [
            GpaRange::new(0, 0),
            GpaRange::new(0, 100),
            GpaRange::new(u64::MAX - UNIT + 1, 2 * UNIT),
        ] {
            let e = plan_batches(&[GpaRange::new(0, UNIT), bad], 8, &mut out).unwrap_err();
            assert_eq!(
                e,
                FramedError::Unaligned {
                    gpa: bad.gpa,
                    len: bad.len
                }
            );
            assert!(out.is_empty(), "nothing planned from a refused list");
        }
    }

    #[test]
    fn errors_name_the_values() {
        assert_eq!(
            FramedError::Sequence {
                expected: 4,
                got: 6
            }
            .to_string(),
            "RDMA batch 6 arrived where batch 4 was due"
        );
        assert_eq!(
            FramedError::Unaligned {
                gpa: 0x1000,
                len: 100
            }
            .to_string(),
            "Range 0x1000+0x64 is not a non-zero multiple of 4096 bytes"
        );
    }
}
