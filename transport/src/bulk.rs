// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Parallel bulk push: N streams, each driven by its own thread (and, for io_uring, its own
//! ring), fed from one bounded channel of [`Batch`]es so a slow stream simply takes fewer
//! batches and a full channel pushes back on the producer.
//!
//! This module owns the threads, the back-pressure, the per-stream counters, the flush barrier
//! and the shutdown. It does not decide what goes into a batch (the engine does) nor what the
//! frame headers mean (`ferry-protocol`).
//!
//! Errors: the first stream error is kept and returned by every later [`BulkPusher::push`],
//! [`BulkPusher::flush`] and [`BulkPusher::finish`]; the failed stream's worker stops, the
//! others keep serving until `finish`.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, SendTimeoutError, Sender, TryRecvError};

use crate::error::{BulkError, StreamError};
use crate::memory::GpaRange;
use crate::stream::{DataStream, StreamStats};

/// A scatter-gather list of frames: each frame is header bytes (copied into the batch) followed
/// by guest-memory ranges (sent by reference).
#[derive(Debug, Default, Clone)]
pub struct Batch {
    arena: Vec<u8>,
    ranges: Vec<GpaRange>,
    frames: Vec<(Range<usize>, Range<usize>)>,
    payload: u64,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a frame.
    pub fn push(&mut self, header: &[u8], ranges: &[GpaRange]) {
        let h = self.arena.len()..self.arena.len() + header.len();
        self.arena.extend_from_slice(header);
        let r = self.ranges.len()..self.ranges.len() + ranges.len();
        self.ranges.extend_from_slice(ranges);
        self.payload += ranges.iter().map(|r| r.len).sum::<u64>();
        self.frames.push((h, r));
    }

    /// Number of frames.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// True when the batch has no frames.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Payload bytes (guest memory) in the batch.
    pub fn payload_bytes(&self) -> u64 {
        self.payload
    }

    /// Header bytes in the batch.
    pub fn header_bytes(&self) -> u64 {
        self.arena.len() as u64
    }

    /// The frames as (header, ranges).
    pub fn frames(&self) -> impl Iterator<Item = (&[u8], &[GpaRange])> {
        self.frames
            .iter()
            .map(|(h, r)| (&self.arena[h.clone()], &self.ranges[r.clone()]))
    }
}

/// Live counters of one bulk stream (cache-line aligned: each is written by its own thread).
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct StreamCounters {
    /// Bytes completed (headers + payload).
    pub bytes: AtomicU64,
    /// Frames sent.
    pub frames: AtomicU64,
    /// Batches taken from the channel.
    pub batches: AtomicU64,
    /// `SEND_ZC` operations issued.
    pub zc_sends: AtomicU64,
    /// `SEND_ZC` notifications that reported a copy.
    pub zc_copied: AtomicU64,
    /// Send errors (0 or 1: a failed stream stops).
    pub errors: AtomicU64,
}

impl StreamCounters {
    fn store(&self, s: &StreamStats) {
        self.bytes.store(s.bytes_sent, Ordering::Relaxed);
        self.frames.store(s.frames_sent, Ordering::Relaxed);
        self.zc_sends.store(s.zc_sends, Ordering::Relaxed);
        self.zc_copied.store(s.zc_copied, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct Shared {
    counters: Vec<StreamCounters>,
    first_error: Mutex<Option<Arc<StreamError>>>,
    failed: AtomicBool,
    abort: AtomicBool,
    submitted: AtomicU64,
    completed: AtomicU64,
    progress: Mutex<()>,
    cond: Condvar,
}

impl Shared {
    fn fail(&self, e: StreamError) {
        let mut slot = self
            .first_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(Arc::new(e));
        }
        self.failed.store(true, Ordering::Release);
        drop(slot);
        self.notify();
    }

    fn notify(&self) {
        let _g = self.progress.lock().unwrap_or_else(PoisonError::into_inner);
        self.cond.notify_all();
    }

    fn error(&self) -> Option<BulkError> {
        self.first_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|e| BulkError::Stream {
                source: Arc::clone(e),
            })
    }
}

/// What a finished pusher moved, per stream.
#[derive(Debug, Clone, Default)]
pub struct BulkReport {
    /// Final counters of each stream, by index.
    pub streams: Vec<StreamStats>,
    /// Batches each stream took.
    pub batches: Vec<u64>,
}

impl BulkReport {
    /// All streams added up.
    pub fn total(&self) -> StreamStats {
        let mut t = StreamStats::default();
        for s in &self.streams {
            t.add(s);
        }
        t
    }
}

/// N parallel sending streams fed by a bounded channel. See the module docs.
#[derive(Debug)]
pub struct BulkPusher {
    tx: Option<Sender<Batch>>,
    workers: Vec<Option<JoinHandle<StreamStats>>>,
    shared: Arc<Shared>,
}

impl BulkPusher {
    /// Starts one worker thread per stream. `queue_depth` batches may wait in the channel
    /// before [`BulkPusher::push`] blocks.
    pub fn new(streams: Vec<Box<dyn DataStream>>, queue_depth: usize) -> Result<Self, BulkError> {
        if streams.is_empty() {
            return Err(BulkError::NoStreams);
        }
        let (tx, rx) = crossbeam_channel::bounded::<Batch>(queue_depth.max(1));
        let shared = Arc::new(Shared {
            counters: streams.iter().map(|_| StreamCounters::default()).collect(),
            ..Shared::default()
        });
        let mut pusher = Self {
            tx: Some(tx),
            workers: Vec::with_capacity(streams.len()),
            shared,
        };
        for (slot, stream) in streams.into_iter().enumerate() {
            let rx = rx.clone();
            let shared = Arc::clone(&pusher.shared);
            let handle = std::thread::Builder::new()
                .name(format!("ferry-bulk-{slot}"))
                .spawn(move || worker(slot, stream, &rx, &shared))
                .map_err(|source| BulkError::Spawn {
                    stream: slot,
                    source,
                })?;
            pusher.workers.push(Some(handle));
        }
        Ok(pusher)
    }

    /// Number of streams.
    pub fn streams(&self) -> usize {
        self.workers.len()
    }

    /// Live counters, by worker slot.
    pub fn counters(&self) -> &[StreamCounters] {
        &self.shared.counters
    }

    /// Hands a batch to whichever stream is free, blocking while the channel is full. Fails
    /// with the first stream error once any stream failed.
    pub fn push(&self, batch: Batch) -> Result<(), BulkError> {
        let Some(tx) = &self.tx else {
            return Err(self.shared.error().unwrap_or(BulkError::NoStreams));
        };
        let mut batch = batch;
        self.shared.submitted.fetch_add(1, Ordering::AcqRel);
        loop {
            if let Some(e) = self.shared.error() {
                self.shared.submitted.fetch_sub(1, Ordering::AcqRel);
                return Err(e);
            }
            match tx.send_timeout(batch, Duration::from_millis(50)) {
                Ok(()) => return Ok(()),
                Err(SendTimeoutError::Timeout(b)) => batch = b,
                Err(SendTimeoutError::Disconnected(_)) => {
                    self.shared.submitted.fetch_sub(1, Ordering::AcqRel);
                    return Err(self.shared.error().unwrap_or(BulkError::NoStreams));
                }
            }
        }
    }

    /// Waits until every pushed batch was sent and flushed (zero-copy notifications included),
    /// or the first error, or `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<(), BulkError> {
        let deadline = Instant::now() + timeout;
        let mut guard = self
            .shared
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(e) = self.shared.error() {
                return Err(e);
            }
            let submitted = self.shared.submitted.load(Ordering::Acquire);
            let completed = self.shared.completed.load(Ordering::Acquire);
            if completed >= submitted {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BulkError::FlushTimeout {
                    outstanding: submitted - completed,
                    timeout,
                });
            }
            guard = self
                .shared
                .cond
                .wait_timeout(guard, left.min(Duration::from_millis(100)))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Closes the channel, lets every worker send what is queued, flush and shut its stream
    /// down, and joins them. Returns the per-stream report, or the first error.
    pub fn finish(mut self) -> Result<BulkReport, BulkError> {
        self.tx = None;
        let mut report = BulkReport::default();
        let mut panicked = None;
        for (slot, w) in self.workers.iter_mut().enumerate() {
            if let Some(h) = w.take() {
                match h.join() {
                    Ok(stats) => report.streams.push(stats),
                    Err(_) => {
                        panicked.get_or_insert(slot);
                        report.streams.push(StreamStats::default());
                    }
                }
            }
            report
                .batches
                .push(self.shared.counters[slot].batches.load(Ordering::Relaxed));
        }
        if let Some(e) = self.shared.error() {
            return Err(e);
        }
        if let Some(stream) = panicked {
            return Err(BulkError::Panicked { stream });
        }
        Ok(report)
    }
}

impl Drop for BulkPusher {
    fn drop(&mut self) {
        if self.workers.iter().all(Option::is_none) {
            return;
        }
        // Dropped without `finish`: skip what is still queued, then join.
        self.shared.abort.store(true, Ordering::Release);
        self.tx = None;
        for w in &mut self.workers {
            if let Some(h) = w.take() {
                let _ = h.join();
            }
        }
    }
}

fn worker(
    slot: usize,
    mut stream: Box<dyn DataStream>,
    rx: &Receiver<Batch>,
    shared: &Shared,
) -> StreamStats {
    let counters = &shared.counters[slot];
    let mut unflushed = 0u64;
    let result = (|| -> Result<(), StreamError> {
        loop {
            let batch = match rx.try_recv() {
                Ok(b) => b,
                Err(TryRecvError::Empty) => {
                    // Idle: make everything sent so far complete before blocking, so that
                    // `flush` on the owner side sees it.
                    if unflushed > 0 {
                        stream.flush()?;
                        counters.store(&stream.stats());
                        shared.completed.fetch_add(unflushed, Ordering::AcqRel);
                        unflushed = 0;
                        shared.notify();
                    }
                    match rx.recv() {
                        Ok(b) => b,
                        Err(_) => return Ok(()),
                    }
                }
                Err(TryRecvError::Disconnected) => return Ok(()),
            };
            if shared.abort.load(Ordering::Acquire) || shared.failed.load(Ordering::Acquire) {
                // Count it so a concurrent `flush` does not wait for a batch nobody sends.
                shared.completed.fetch_add(1, Ordering::AcqRel);
                continue;
            }
            counters.batches.fetch_add(1, Ordering::Relaxed);
            for (header, ranges) in batch.frames() {
                stream.send_frame(header, ranges)?;
            }
            unflushed += 1;
            counters.store(&stream.stats());
        }
    })();
    let result = result.and_then(|()| {
        if shared.abort.load(Ordering::Acquire) {
            return Ok(());
        }
        stream.shutdown()?;
        shared.completed.fetch_add(unflushed, Ordering::AcqRel);
        Ok(())
    });
    counters.store(&stream.stats());
    let stats = stream.stats();
    match result {
        Ok(()) => tracing::debug!(
            stream = stream.index(),
            bytes = stats.bytes_sent,
            frames = stats.frames_sent,
            zc_copied = stats.zc_copied,
            "bulk stream finished"
        ),
        Err(e) => {
            tracing::warn!(stream = stream.index(), error = %e, "bulk stream failed");
            counters.errors.fetch_add(1, Ordering::Relaxed);
            shared.fail(e);
        }
    }
    shared.notify();
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_frames_round_trip() {
        let mut b = Batch::new();
        b.push(b"abc", &[GpaRange::new(0, 4096), GpaRange::new(8192, 10)]);
        b.push(b"", &[]);
        b.push(b"zz", &[GpaRange::new(1 << 20, 1)]);
        assert_eq!(b.len(), 3);
        assert_eq!(b.payload_bytes(), 4096 + 10 + 1);
        assert_eq!(b.header_bytes(), 5);
        let frames: Vec<_> = b.frames().collect();
        assert_eq!(frames[0].0, b"abc");
        assert_eq!(frames[0].1.len(), 2);
        assert!(frames[1].0.is_empty() && frames[1].1.is_empty());
        assert_eq!(frames[2].1, &[GpaRange::new(1 << 20, 1)]);
    }

    #[test]
    fn no_streams_is_an_error() {
        assert!(matches!(
            BulkPusher::new(Vec::new(), 4),
            Err(BulkError::NoStreams)
        ));
    }
}
