// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The plain-socket backend: blocking `sendmsg`/`recvmsg` on TCP or Unix-domain sockets with
//! iovecs pointing straight into guest memory. The baseline and the fallback when io_uring is
//! unavailable. Sends complete inside [`DataStream::send_frame`], so `flush` has nothing to wait
//! for.

use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{At, ConnectError, Op, StreamError};
use crate::memory::{GpaRange, MemoryRegistration, SegmentError, Target};
use crate::socket::Socket;
use crate::splice::{FileReceiver, StreamId, recv_for_stream};
use crate::stream::{DataStream, StreamConfig, StreamStats};
use crate::sys::{self, IoVec, IoVecs};

/// The most iovecs handed to one system call (`IOV_MAX` on Linux).
const IOV_MAX: usize = 1024;

/// A stream over a blocking socket. See the module docs.
#[derive(Debug)]
pub struct SocketStream {
    sock: Socket,
    reg: Arc<MemoryRegistration>,
    index: usize,
    timeout: Duration,
    closed: bool,
    stats: StreamStats,
    iov: IoVecs,
    at: Vec<At>,
    /// Pipe for [`Target::File`] receives, made at first use.
    file_rx: Option<FileReceiver>,
}

impl SocketStream {
    /// Wraps `socket`, setting its send/receive timeouts to `config.timeout`.
    pub fn new(
        socket: Socket,
        index: usize,
        reg: &Arc<MemoryRegistration>,
        config: &StreamConfig,
    ) -> Result<Self, ConnectError> {
        socket.set_timeouts(config.timeout)?;
        Ok(Self {
            sock: socket,
            reg: Arc::clone(reg),
            index,
            timeout: config.timeout,
            closed: false,
            stats: StreamStats::default(),
            iov: IoVecs::default(),
            at: Vec::new(),
            file_rx: None,
        })
    }

    fn io_err(&self, op: Op, at: At, source: io::Error) -> StreamError {
        if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            StreamError::Timeout {
                stream: self.index,
                peer: self.sock.peer().to_owned(),
                op,
                timeout: self.timeout,
                at,
            }
        } else {
            StreamError::Io {
                stream: self.index,
                peer: self.sock.peer().to_owned(),
                op,
                at,
                source,
            }
        }
    }

    fn check_open(&self) -> Result<(), StreamError> {
        if self.closed {
            return Err(StreamError::Closed {
                stream: self.index,
                peer: self.sock.peer().to_owned(),
            });
        }
        Ok(())
    }

    /// Collects iovecs for `ranges` into `self.iov`/`self.at`.
    fn gather(&mut self, ranges: &[GpaRange], target: Target) -> Result<(), StreamError> {
        for &range in ranges {
            let (iov, at) = (&mut self.iov.0, &mut self.at);
            self.reg
                .for_each_segment(range, target, |seg| {
                    iov.push(sys::iovec(seg.host_addr, seg.len as usize));
                    at.push(At::Range(range));
                    Ok::<(), std::convert::Infallible>(())
                })
                .map_err(|e| match e {
                    SegmentError::Range(source) => StreamError::Range {
                        stream: self.index,
                        peer: self.sock.peer().to_owned(),
                        source,
                    },
                    SegmentError::Inner(never) => match never {},
                })?;
        }
        Ok(())
    }

    /// Sends everything in `self.iov`, retrying short writes.
    fn send_iov(&mut self) -> Result<(), StreamError> {
        let mut pos = 0;
        while pos < self.iov.0.len() {
            let end = (pos + IOV_MAX).min(self.iov.0.len());
            // SAFETY: the iovecs point at the caller's header slice (borrowed for this call) or at
            // registered guest memory, which the registration keeps mapped (held by `self.reg`).
            let res = unsafe { sys::sendmsg(self.sock.as_fd(), &self.iov.0[pos..end]) };
            let n = match res {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io_err(Op::Send, self.at[pos], e)),
            };
            self.stats.sqes += 1;
            self.stats.bytes_sent += n as u64;
            pos = advance(&mut self.iov.0, pos, n);
        }
        Ok(())
    }

    /// Receives into everything in `self.iov`; `expected` is the total length.
    fn recv_iov(&mut self, op: Op, expected: u64) -> Result<(), StreamError> {
        let mut pos = 0;
        let mut received = 0u64;
        while pos < self.iov.0.len() {
            let end = (pos + IOV_MAX).min(self.iov.0.len());
            // SAFETY: the iovecs point at the caller's `&mut` buffer or at registered guest memory
            // (kept mapped by `self.reg`); neither is aliased by a Rust reference during the call.
            let res = unsafe { sys::recvmsg(self.sock.as_fd(), &self.iov.0[pos..end]) };
            let n = match res {
                Ok(0) => {
                    return Err(StreamError::PeerClosed {
                        stream: self.index,
                        peer: self.sock.peer().to_owned(),
                        received,
                        expected,
                        at: self.at[pos],
                    });
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io_err(op, self.at[pos], e)),
            };
            received += n as u64;
            self.stats.bytes_received += n as u64;
            pos = advance(&mut self.iov.0, pos, n);
        }
        Ok(())
    }
}

/// Consumes `n` bytes from `iov[pos..]`, returning the new first unfinished index.
fn advance(iov: &mut [IoVec], mut pos: usize, mut n: usize) -> usize {
    while n > 0 && pos < iov.len() {
        let v = &mut iov[pos];
        if n >= v.iov_len {
            n -= v.iov_len;
            v.iov_len = 0;
            pos += 1;
        } else {
            v.iov_base = v.iov_base.wrapping_byte_add(n);
            v.iov_len -= n;
            n = 0;
        }
    }
    while pos < iov.len() && iov[pos].iov_len == 0 {
        pos += 1;
    }
    pos
}

impl DataStream for SocketStream {
    fn index(&self) -> usize {
        self.index
    }

    fn peer(&self) -> &str {
        self.sock.peer()
    }

    fn backend(&self) -> &'static str {
        if self.sock.is_tcp() { "tcp" } else { "unix" }
    }

    fn send_frame(&mut self, header: &[u8], ranges: &[GpaRange]) -> Result<(), StreamError> {
        self.check_open()?;
        self.iov.0.clear();
        self.at.clear();
        if !header.is_empty() {
            self.iov
                .0
                .push(sys::iovec(header.as_ptr() as usize, header.len()));
            self.at.push(At::Header);
        }
        self.gather(ranges, Target::Guest)?;
        let res = self.send_iov();
        self.iov.0.clear();
        if res.is_ok() {
            self.stats.frames_sent += 1;
        }
        res
    }

    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<(), StreamError> {
        self.check_open()?;
        self.iov.0.clear();
        self.at.clear();
        if buf.is_empty() {
            return Ok(());
        }
        self.iov
            .0
            .push(sys::iovec(buf.as_mut_ptr() as usize, buf.len()));
        self.at.push(At::Header);
        let res = self.recv_iov(Op::RecvHeader, buf.len() as u64);
        self.iov.0.clear();
        res
    }

    fn recv_into(&mut self, ranges: &[GpaRange], target: Target) -> Result<(), StreamError> {
        self.check_open()?;
        if target == Target::File {
            let id = StreamId {
                index: self.index,
                peer: self.sock.peer(),
                timeout: self.timeout,
            };
            let res = recv_for_stream(
                &mut self.file_rx,
                self.sock.as_fd(),
                &self.reg,
                ranges,
                &mut self.stats,
                &id,
            );
            return res.map_err(|(e, lost)| {
                self.closed |= lost;
                e
            });
        }
        self.iov.0.clear();
        self.at.clear();
        self.gather(ranges, target)?;
        let expected = ranges.iter().map(|r| r.len).sum();
        let res = self.recv_iov(Op::RecvPayload, expected);
        self.iov.0.clear();
        res
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        self.check_open()
    }

    fn shutdown(&mut self) -> Result<(), StreamError> {
        self.check_open()?;
        self.closed = true;
        match self.sock.shutdown() {
            Ok(()) => Ok(()),
            // The peer already went away: nothing left to shut down.
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
            Err(e) => Err(self.io_err(Op::Shutdown, At::Stream, e)),
        }
    }

    fn stats(&self) -> StreamStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_consumes_across_iovecs() {
        let mut iov = vec![
            sys::iovec(0x1000, 10),
            sys::iovec(0x2000, 20),
            sys::iovec(0x3000, 5),
        ];
        let pos = advance(&mut iov, 0, 15);
        assert_eq!(pos, 1);
        assert_eq!(iov[1].iov_base as usize, 0x2005);
        assert_eq!(iov[1].iov_len, 15);
        let pos = advance(&mut iov, pos, 15);
        assert_eq!(pos, 2);
        let pos = advance(&mut iov, pos, 5);
        assert_eq!(pos, 3);
    }
}
