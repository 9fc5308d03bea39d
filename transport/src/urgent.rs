// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The urgent path for post-copy page requests and replies: its own connection, its own thread,
//! raised CPU priority, so a request never queues behind bulk data (QEMU's postcopy-preempt
//! channel has the same idea).
//!
//! This module owns the thread, its priority, error capture and the stop protocol. The request
//! and reply formats belong to `ferry-protocol`: the caller passes a handler that receives one
//! request from the stream and sends its reply. The requesting side (the destination's fault
//! handler) simply uses a [`DataStream`] opened with [`urgent_config`] on its own connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{BulkError, ConnectError, StreamError};
use crate::memory::MemoryRegistration;
use crate::socket::Socket;
use crate::stream::{Backend, DataStream, StreamConfig, StreamStats, ZeroCopy, open_stream};
use crate::sys;

/// The nice value [`Priority::Nice`] uses by default (needs `CAP_SYS_NICE`).
pub const URGENT_NICE: i32 = -10;

/// How an urgent thread is prioritised over the bulk threads. Failure to apply it (no
/// `CAP_SYS_NICE`) is logged and the thread runs at normal priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// Leave the thread alone.
    Unchanged,
    /// A nice value (negative = larger CPU share under CFS). The default is
    /// `Nice(URGENT_NICE)`.
    Nice(i32),
    /// `SCHED_FIFO` at this priority (1..=99): runs as soon as it wakes, ahead of every normal
    /// thread. Measured *worse* on the 2-vCPU loopback machine (p50 in milliseconds under
    /// saturating bulk: the real-time threads starve the softirq work that delivers their own
    /// packets), so it is opt-in.
    Fifo(i32),
}

impl Default for Priority {
    fn default() -> Self {
        Priority::Nice(URGENT_NICE)
    }
}

/// Applies `priority` to the calling thread; for the thread that issues urgent requests on
/// the destination (the userfaultfd handler), so it is not queued behind the bulk receivers.
pub fn raise_thread_priority(priority: Priority) -> std::io::Result<()> {
    match priority {
        Priority::Unchanged => Ok(()),
        Priority::Nice(n) => sys::set_thread_nice(n),
        Priority::Fifo(p) => sys::set_thread_fifo(p),
    }
}

/// A stream configuration suited to request/reply traffic: the blocking socket backend (lowest
/// round-trip latency measured here), plain sends, and the given stall timeout.
pub fn urgent_config(timeout: Duration) -> StreamConfig {
    StreamConfig {
        backend: Backend::Socket,
        timeout,
        zero_copy: ZeroCopy::Off,
        ..StreamConfig::default()
    }
}

/// What the handler tells the server after one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serve {
    /// Keep serving.
    Continue,
    /// The peer said goodbye; stop cleanly.
    Stop,
}

/// Summary of a stopped urgent server.
#[derive(Debug, Clone, Copy, Default)]
pub struct UrgentReport {
    /// Requests served (handler calls that returned [`Serve::Continue`] or [`Serve::Stop`]).
    pub served: u64,
    /// The stream's counters.
    pub stats: StreamStats,
}

/// A thread serving urgent requests on its own connection. See the module docs.
#[derive(Debug)]
pub struct UrgentServer {
    handle: Option<JoinHandle<(Result<(), StreamError>, StreamStats)>>,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    shutdown_handle: Socket,
    index: usize,
}

impl UrgentServer {
    /// Opens a stream over `socket` (with `config`, usually [`urgent_config`]) and starts the
    /// serving thread, which applies `priority` and calls `handler` in a loop until it returns
    /// [`Serve::Stop`], fails, or [`UrgentServer::stop`] is called.
    pub fn spawn<F>(
        socket: Socket,
        index: usize,
        reg: &Arc<MemoryRegistration>,
        config: &StreamConfig,
        priority: Priority,
        mut handler: F,
    ) -> Result<Self, BulkError>
    where
        F: FnMut(&mut dyn DataStream) -> Result<Serve, StreamError> + Send + 'static,
    {
        let shutdown_handle = socket.try_clone().map_err(|source| BulkError::Spawn {
            stream: index,
            source,
        })?;
        let mut stream = open_stream(socket, index, reg, config).map_err(|e| {
            let source = match e {
                ConnectError::Ring { source, .. }
                | ConnectError::RegisterBuffers { source, .. }
                | ConnectError::SocketOption { source, .. } => source,
                other => std::io::Error::other(other.to_string()),
            };
            BulkError::Spawn {
                stream: index,
                source,
            }
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let (stop2, served2) = (Arc::clone(&stop), Arc::clone(&served));
        let handle = std::thread::Builder::new()
            .name(format!("ferry-urgent-{index}"))
            .spawn(move || {
                if let Err(e) = raise_thread_priority(priority) {
                    tracing::warn!(error = %e, "urgent thread keeps normal priority");
                }
                let res = loop {
                    if stop2.load(Ordering::Acquire) {
                        break Ok(());
                    }
                    match handler(stream.as_mut()) {
                        Ok(Serve::Continue) => {
                            served2.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Serve::Stop) => {
                            served2.fetch_add(1, Ordering::Relaxed);
                            break stream.flush();
                        }
                        // `stop()` shut the socket down under us: not an error.
                        Err(_) if stop2.load(Ordering::Acquire) => break Ok(()),
                        Err(e) => break Err(e),
                    }
                };
                (res, stream.stats())
            })
            .map_err(|source| BulkError::Spawn {
                stream: index,
                source,
            })?;
        Ok(Self {
            handle: Some(handle),
            stop,
            served,
            shutdown_handle,
            index,
        })
    }

    /// Requests served so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// True once the thread has exited (handler stop, error, or [`UrgentServer::stop`]).
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the thread (shutting the connection down wakes a blocked receive) and returns the
    /// report, or the error that ended the thread earlier.
    pub fn stop(self) -> Result<UrgentReport, BulkError> {
        self.stop.store(true, Ordering::Release);
        let _ = self.shutdown_handle.shutdown();
        self.join()
    }

    /// Waits for the thread to end on its own (handler returned [`Serve::Stop`] or failed).
    pub fn join(mut self) -> Result<UrgentReport, BulkError> {
        let Some(h) = self.handle.take() else {
            return Ok(UrgentReport::default());
        };
        let (res, stats) = h
            .join()
            .map_err(|_| BulkError::Panicked { stream: self.index })?;
        res.map_err(|e| BulkError::Stream {
            source: Arc::new(e),
        })?;
        Ok(UrgentReport {
            served: self.served(),
            stats,
        })
    }
}

impl Drop for UrgentServer {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.stop.store(true, Ordering::Release);
            let _ = self.shutdown_handle.shutdown();
            let _ = h.join();
        }
    }
}
