// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Little-endian readers and writers for the wire format, and the decode error type.
//!
//! The [`Reader`] never reads past its slice and never allocates more than the bytes it holds
//! can justify: every count read from the wire is checked against the remaining bytes before a
//! vector is reserved.

use thiserror::Error;

/// Why bytes from the network could not be decoded. Every variant names the offending values.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Fewer bytes than the field needs.
    #[error("Truncated {what}: need {needed} bytes, have {have}")]
    Truncated {
        /// The field or structure being read.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        have: usize,
    },
    /// A length or count above its limit.
    #[error("Oversized {what}: {len} exceeds the limit of {max}")]
    Oversized {
        /// The field.
        what: &'static str,
        /// The value read.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// Command 0, which is never valid.
    #[error("Invalid command 0")]
    InvalidCommand,
    /// A command this version does not know.
    #[error("Unknown command {code:#06x}")]
    UnknownCommand {
        /// The command code read.
        code: u16,
    },
    /// The handshake did not start with ferry's magic.
    #[error("Bad magic {found:02x?}: not a ferry peer")]
    BadMagic {
        /// The eight bytes found.
        found: [u8; 8],
    },
    /// No protocol version in common.
    #[error(
        "Unsupported protocol version: peer speaks {peer_min}..={peer_max}, we speak {our_min}..={our_max}"
    )]
    UnsupportedVersion {
        /// Lowest version the peer speaks.
        peer_min: u16,
        /// Highest version the peer speaks.
        peer_max: u16,
        /// Lowest version we speak.
        our_min: u16,
        /// Highest version we speak.
        our_max: u16,
    },
    /// A field holds a value outside its domain.
    #[error("Invalid {field}: {value:#x}")]
    InvalidValue {
        /// The field.
        field: &'static str,
        /// The value read.
        value: u64,
    },
    /// The payload length in the header disagrees with what the metadata describes.
    #[error("Payload length {declared} of {command} does not match its metadata ({expected})")]
    PayloadMismatch {
        /// The command's name.
        command: &'static str,
        /// Length in the header.
        declared: u64,
        /// Length the metadata implies.
        expected: u64,
    },
    /// Bytes left over after a structure.
    #[error("{extra} trailing bytes after {what}")]
    TrailingBytes {
        /// The structure.
        what: &'static str,
        /// Number of unread bytes.
        extra: usize,
    },
    /// A string that is not UTF-8.
    #[error("{what} is not UTF-8")]
    BadUtf8 {
        /// The field.
        what: &'static str,
    },
}

/// A bounds-checked little-endian cursor over received bytes.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Takes `n` bytes.
    pub fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let have = self.remaining();
        if n > have {
            return Err(DecodeError::Truncated {
                what,
                needed: n,
                have,
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    /// Takes a fixed-size array.
    pub fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let b = self.bytes(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    /// Reads a `u8`.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    /// Reads a little-endian `u16`.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    /// Reads a little-endian `u32`.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    /// Reads a little-endian `u64`.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Reads a `u32` element count, checks it against `max` and against the bytes left (each
    /// element taking at least `min_elem_len` bytes), and returns it as a `usize` that is safe
    /// to reserve.
    pub fn count(
        &mut self,
        what: &'static str,
        max: usize,
        min_elem_len: usize,
    ) -> Result<usize, DecodeError> {
        let n = self.u32(what)? as usize;
        if n > max {
            return Err(DecodeError::Oversized {
                what,
                len: n as u64,
                max: max as u64,
            });
        }
        let needed = n.saturating_mul(min_elem_len);
        if needed > self.remaining() {
            return Err(DecodeError::Truncated {
                what,
                needed,
                have: self.remaining(),
            });
        }
        Ok(n)
    }

    /// Reads a length-prefixed (u16) UTF-8 string of at most `max` bytes.
    pub fn string(&mut self, what: &'static str, max: usize) -> Result<String, DecodeError> {
        let n = usize::from(self.u16(what)?);
        if n > max {
            return Err(DecodeError::Oversized {
                what,
                len: n as u64,
                max: max as u64,
            });
        }
        let b = self.bytes(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::BadUtf8 { what })
    }

    /// Fails unless every byte was read.
    pub fn finish(&self, what: &'static str) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes { what, extra }),
        }
    }
}

/// A little-endian writer appending to a vector.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty writer with room for `n` bytes.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            buf: Vec::with_capacity(n),
        }
    }

    /// Appends raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }

    /// Appends a `u8`.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    /// Appends a little-endian `u16`.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    /// Appends a little-endian `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    /// Appends a little-endian `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    /// Appends a count as `u32` (callers keep counts within the protocol's limits, which are
    /// far below `u32::MAX`; larger values saturate and are then refused by the peer).
    pub fn count(&mut self, n: usize) -> &mut Self {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// Appends a u16-length-prefixed string, truncated at a character boundary to `max` bytes.
    pub fn string(&mut self, s: &str, max: usize) -> &mut Self {
        let mut end = s.len().min(max).min(usize::from(u16::MAX));
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        // `end` is at most u16::MAX by the min above.
        self.u16(u16::try_from(end).unwrap_or(u16::MAX));
        self.bytes(&s.as_bytes()[..end])
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The bytes.
    pub fn into_vec(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_refuses_to_overrun() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(
            r.u32("x"),
            Err(DecodeError::Truncated {
                what: "x",
                needed: 4,
                have: 3
            })
        );
        assert_eq!(r.u16("y"), Ok(0x0201));
        assert_eq!(
            r.finish("z"),
            Err(DecodeError::TrailingBytes {
                what: "z",
                extra: 1
            })
        );
    }

    #[test]
    fn count_checked_against_remaining_bytes_before_allocation() {
        let mut w = Writer::new();
        w.u32(1_000_000);
        let b = w.into_vec();
        let mut r = Reader::new(&b);
        assert!(matches!(
            r.count("ranges", 10_000_000, 16),
            Err(DecodeError::Truncated { .. })
        ));
        let mut r = Reader::new(&b);
        assert!(matches!(
            r.count("ranges", 10, 16),
            Err(DecodeError::Oversized {
                len: 1_000_000,
                max: 10,
                ..
            })
        ));
    }

    #[test]
    fn string_truncates_on_char_boundary() {
        let mut w = Writer::new();
        w.string("ééé", 3);
        let b = w.into_vec();
        let mut r = Reader::new(&b);
        assert_eq!(r.string("s", 10).as_deref(), Ok("é"));
    }
}
