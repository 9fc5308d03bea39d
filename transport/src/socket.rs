// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Connected sockets (TCP or Unix-domain) and listeners: the thing a stream is built on.
//!
//! This module owns connection setup on loopback or LAN endpoints and the socket options the
//! data path relies on (`TCP_NODELAY`, timeouts). It does not move guest memory (see
//! [`crate::stream`]) and has no notion of sessions or handshakes (the session layer on top of
//! `ferry-protocol` does that).

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::error::ConnectError;
use crate::sys;

/// Where to listen or connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix-domain socket path.
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix-domain.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `endpoint`. For TCP, port 0 picks a free port (see [`Listener::endpoint`]). An
    /// existing Unix socket file at the path is replaced.
    pub fn bind(endpoint: &Endpoint) -> Result<Self, ConnectError> {
        let err = |source| ConnectError::Bind {
            endpoint: endpoint.to_string(),
            source,
        };
        match endpoint {
            Endpoint::Tcp(addr) => Ok(Listener::Tcp(TcpListener::bind(addr).map_err(err)?)),
            Endpoint::Unix(path) => {
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(err(e)),
                }
                Ok(Listener::Unix(
                    UnixListener::bind(path).map_err(err)?,
                    path.clone(),
                ))
            }
        }
    }

    /// The bound endpoint (with the real port for TCP).
    pub fn endpoint(&self) -> Result<Endpoint, ConnectError> {
        match self {
            Listener::Tcp(l) => {
                l.local_addr()
                    .map(Endpoint::Tcp)
                    .map_err(|source| ConnectError::Bind {
                        endpoint: "tcp".into(),
                        source,
                    })
            }
            Listener::Unix(_, p) => Ok(Endpoint::Unix(p.clone())),
        }
    }

    /// Accepts one connection, waiting at most `timeout`.
    pub fn accept(&self, timeout: Duration) -> Result<Socket, ConnectError> {
        let endpoint = || {
            self.endpoint()
                .map(|e| e.to_string())
                .unwrap_or_else(|_| "?".into())
        };
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ready =
                sys::poll_readable(self.as_fd(), left).map_err(|source| ConnectError::Accept {
                    endpoint: endpoint(),
                    source,
                })?;
            if !ready {
                return Err(ConnectError::Accept {
                    endpoint: endpoint(),
                    source: io::Error::from(io::ErrorKind::TimedOut),
                });
            }
            let res = match self {
                Listener::Tcp(l) => l.accept().map(|(s, a)| Socket::Tcp(s, a.to_string())),
                Listener::Unix(l, p) => l
                    .accept()
                    .map(|(s, _)| Socket::Unix(s, format!("unix:{}", p.display()))),
            };
            match res {
                Ok(s) => return Ok(s),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(ConnectError::Accept {
                        endpoint: endpoint(),
                        source,
                    });
                }
            }
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l, _) => l.as_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            // Best effort: a stale socket file is replaced by the next bind anyway.
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A connected socket plus the peer's name for error messages.
#[derive(Debug)]
pub enum Socket {
    /// TCP, with the peer address.
    Tcp(TcpStream, String),
    /// Unix-domain, with the path.
    Unix(UnixStream, String),
}

impl Socket {
    /// Connects to `endpoint`, waiting at most `timeout` (TCP). `TCP_NODELAY` is set: frames are
    /// written in large batches, and small control frames must not wait for Nagle.
    pub fn connect(endpoint: &Endpoint, timeout: Duration) -> Result<Self, ConnectError> {
        let err = |source| ConnectError::Connect {
            endpoint: endpoint.to_string(),
            source,
        };
        let sock = match endpoint {
            Endpoint::Tcp(addr) => Socket::Tcp(
                TcpStream::connect_timeout(addr, timeout).map_err(err)?,
                addr.to_string(),
            ),
            Endpoint::Unix(path) => Socket::Unix(
                UnixStream::connect(path).map_err(err)?,
                format!("unix:{}", path.display()),
            ),
        };
        sock.set_nodelay()?;
        Ok(sock)
    }

    /// The peer's name (address or path).
    pub fn peer(&self) -> &str {
        match self {
            Socket::Tcp(_, p) | Socket::Unix(_, p) => p,
        }
    }

    /// The local address of a TCP socket (`None` for Unix-domain sockets).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Socket::Tcp(s, _) => s.local_addr().ok(),
            Socket::Unix(..) => None,
        }
    }

    /// True for TCP.
    pub fn is_tcp(&self) -> bool {
        matches!(self, Socket::Tcp(..))
    }

    /// Sets `TCP_NODELAY` (no-op for Unix sockets).
    pub fn set_nodelay(&self) -> Result<(), ConnectError> {
        if let Socket::Tcp(s, peer) = self {
            s.set_nodelay(true)
                .map_err(|source| ConnectError::SocketOption {
                    option: "TCP_NODELAY",
                    peer: peer.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Sets the blocking send and receive timeouts (`SO_SNDTIMEO`, `SO_RCVTIMEO`).
    pub fn set_timeouts(&self, timeout: Duration) -> Result<(), ConnectError> {
        let t = Some(timeout.max(Duration::from_millis(1)));
        let res = match self {
            Socket::Tcp(s, _) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
            Socket::Unix(s, _) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
        };
        res.map_err(|source| ConnectError::SocketOption {
            option: "SO_RCVTIMEO/SO_SNDTIMEO",
            peer: self.peer().to_owned(),
            source,
        })
    }

    /// Sets `SO_BUSY_POLL` (microseconds of busy polling on blocking receives; for the urgent
    /// stream). Needs `CAP_NET_ADMIN` to raise it above the sysctl default.
    pub fn set_busy_poll(&self, micros: u32) -> Result<(), ConnectError> {
        sys::set_busy_poll(self.as_fd(), micros).map_err(|source| ConnectError::SocketOption {
            option: "SO_BUSY_POLL",
            peer: self.peer().to_owned(),
            source,
        })
    }

    /// Shuts both directions down (wakes any blocked receive on either side).
    pub fn shutdown(&self) -> io::Result<()> {
        match self {
            Socket::Tcp(s, _) => s.shutdown(std::net::Shutdown::Both),
            Socket::Unix(s, _) => s.shutdown(std::net::Shutdown::Both),
        }
    }

    /// Aborts a TCP connection at once: `SO_LINGER` 0 and a disconnect (`connect(AF_UNSPEC)`),
    /// which sends a reset and frees the socket's unsent and unacknowledged data even while
    /// other handles (an io_uring fixed-file slot) keep the socket open. That is what releases
    /// the pages of zero-copy sends stuck behind a stalled peer. Unix sockets are shut down.
    pub fn abort(&self) -> io::Result<()> {
        match self {
            Socket::Tcp(..) => {
                rustix::net::sockopt::set_socket_linger(self, Some(Duration::ZERO))?;
                rustix::net::connect_unspec(self)?;
                Ok(())
            }
            Socket::Unix(..) => self.shutdown(),
        }
    }

    /// Makes a second handle to the same socket (e.g. to shut it down from another thread).
    pub fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Tcp(s, p) => Socket::Tcp(s.try_clone()?, p.clone()),
            Socket::Unix(s, p) => Socket::Unix(s.try_clone()?, p.clone()),
        })
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Tcp(s, _) => s.as_fd(),
            Socket::Unix(s, _) => s.as_fd(),
        }
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}
