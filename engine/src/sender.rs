// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Source-side bulk stream workers: each owns one data stream and turns work items (lists of
//! guest ranges) into frames: zero runs become `ZeroPages`, data runs become `Pages` sent by
//! reference from guest memory (or `CompressedPages` when compression pays), with optional
//! per-page checksums. Pages are assigned to streams by chunk, so one page always travels on
//! the same stream and TCP's ordering keeps its versions in order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use ferry_protocol::{Frame, GpaRange};
use ferry_transport::DataStream;

use crate::error::MigrateError;
use crate::layout::{HoleCursor, Layout};
use crate::pages::{is_zero, page_hash};
use crate::policy::Compression;

/// A unit of work for one stream.
#[derive(Debug)]
pub(crate) enum Work {
    /// Send these ranges (page aligned, in guest memory).
    Pages {
        /// The ranges.
        ranges: Vec<GpaRange>,
        /// Sent while the VM is paused.
        last: bool,
    },
    /// Send `RoundEnd { round }` after everything before it, wait for completions, report.
    Barrier(u32),
    /// Send `RoundEnd { round }` after everything before it and carry on: the receiver waits
    /// for it, nobody here does (the switchover marker, inside the blackout).
    Marker(u32),
    /// From here on the destination may run the guest on memory the stream could write
    /// directly: the stream sends payload in-band (see `DataStream::end_direct_placement`).
    InBand,
    /// Send `EndOfStream`, flush, exit.
    End,
}

/// What a worker reports.
#[derive(Debug)]
pub(crate) enum Done {
    /// A barrier was sent and flushed.
    Barrier {
        /// The round.
        round: u32,
    },
    /// The stream failed; the worker has stopped.
    Failed {
        /// The stream.
        stream: usize,
        /// Why.
        error: MigrateError,
    },
    /// The stream ended cleanly.
    Ended,
}

/// Counters shared with the main thread.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub bytes: AtomicU64,
    pub raw_bytes: AtomicU64,
    pub data_pages: AtomicU64,
    pub zero_pages: AtomicU64,
}

pub(crate) struct Worker<'a> {
    pub index: usize,
    pub stream: Box<dyn DataStream>,
    pub layout: &'a Layout,
    pub checksums: bool,
    pub compression: Compression,
    pub frame_bytes: u64,
    /// Probe ranges for memfd holes (see `Layout::file_holes`): guest memory was not fully
    /// allocated when the connection started.
    pub check_holes: bool,
    pub counters: &'a Counters,
}

struct Pending {
    data: Vec<GpaRange>,
    data_bytes: u64,
    sums: Vec<u64>,
    zeros: Vec<GpaRange>,
}

const MAX_ZERO_RANGES: usize = 4096;

/// Ranges of at least this many bytes are checked for memfd holes before their pages are read
/// (see `Layout::file_holes`); a dirty page of a later round has been written, so single
/// pages are not worth a system call.
const HOLE_CHECK_MIN: u64 = 64 * 1024;

impl Worker<'_> {
    pub fn run(mut self, work: Receiver<Work>, done: Sender<Done>) {
        crate::warm::thread();
        let index = self.index;
        let mut compressor = match self.compression {
            Compression::Zstd { level } => zstd::bulk::Compressor::new(i32::from(level)).ok(),
            Compression::None => None,
        };
        let mut comp = Adaptive::default();
        for item in work.iter() {
            let res = match item {
                Work::Pages { ranges, last } => {
                    if last {
                        crate::timeline::mark("src stream got final pages");
                    }
                    self.send_ranges(&ranges, last, compressor.as_mut(), &mut comp)
                }
                Work::Barrier(round) => self.barrier(round).map(|()| {
                    let _ = done.send(Done::Barrier { round });
                }),
                // Flushed by this worker (a queued send may sit in an unsubmitted batch), but
                // nobody waits for it.
                Work::Marker(round) => self.barrier(round).map(|()| {
                    if round == crate::source::SWITCH_ROUND {
                        crate::timeline::mark("src stream marker sent");
                    }
                }),
                Work::InBand => {
                    self.stream
                        .end_direct_placement()
                        .map_err(|source| MigrateError::Stream {
                            stream: index,
                            source,
                        })
                }
                Work::End => {
                    let r = self
                        .send(&Frame::EndOfStream.encode(), &[])
                        .and_then(|()| self.flush());
                    let _ = self.stream.shutdown();
                    let _ = done.send(match r {
                        Ok(()) => Done::Ended,
                        Err(error) => Done::Failed {
                            stream: index,
                            error,
                        },
                    });
                    return;
                }
            };
            if let Err(error) = res {
                let _ = done.send(Done::Failed {
                    stream: index,
                    error,
                });
                return;
            }
        }
    }

    /// The stream's counters.
    fn send(&mut self, header: &[u8], ranges: &[GpaRange]) -> Result<(), MigrateError> {
        self.stream
            .send_frame(header, ranges)
            .map_err(|source| MigrateError::Stream {
                stream: self.index,
                source,
            })
    }

    fn flush(&mut self) -> Result<(), MigrateError> {
        self.stream.flush().map_err(|source| MigrateError::Stream {
            stream: self.index,
            source,
        })
    }

    fn barrier(&mut self, round: u32) -> Result<(), MigrateError> {
        self.send(&Frame::RoundEnd { round }.encode(), &[])?;
        self.flush()
    }

    fn send_ranges(
        &mut self,
        ranges: &[GpaRange],
        last: bool,
        mut compressor: Option<&mut zstd::bulk::Compressor<'static>>,
        comp: &mut Adaptive,
    ) -> Result<(), MigrateError> {
        let ps = self.layout.page_size();
        let mut p = Pending {
            data: Vec::new(),
            data_bytes: 0,
            sums: Vec::new(),
            zeros: Vec::new(),
        };
        let mut holes = Vec::new();
        for r in ranges {
            let bytes = self.layout.bytes(*r)?;
            holes.clear();
            if self.check_holes && r.len >= HOLE_CHECK_MIN {
                self.layout.file_holes(*r, &mut holes);
            }
            let mut cursor = HoleCursor::new(&holes);
            let mut off = 0u64;
            while off < r.len {
                let gpa = r.gpa + off;
                // Never-written pages of a memfd: zero without reading (and so allocating)
                // them. A guest write into one after the check is in the dirty log.
                if let Some(hole_end) = cursor.hole_end(gpa) {
                    let n = hole_end - gpa;
                    push_run(&mut p.zeros, gpa, n);
                    if p.zeros.len() >= MAX_ZERO_RANGES {
                        self.flush_zeros(&mut p)?;
                    }
                    off += n;
                    continue;
                }
                let page = &bytes[off as usize..(off + ps) as usize];
                if is_zero(page) {
                    push_run(&mut p.zeros, gpa, ps);
                    if p.zeros.len() >= MAX_ZERO_RANGES {
                        self.flush_zeros(&mut p)?;
                    }
                } else {
                    push_run(&mut p.data, gpa, ps);
                    p.data_bytes += ps;
                    if self.checksums {
                        p.sums.push(page_hash(gpa, page));
                    }
                    if p.data_bytes >= self.frame_bytes || p.data.len() >= MAX_ZERO_RANGES {
                        self.flush_data(&mut p, last, compressor.as_deref_mut(), comp)?;
                    }
                }
                off += ps;
            }
        }
        self.flush_data(&mut p, last, compressor, comp)?;
        self.flush_zeros(&mut p)
    }

    fn flush_zeros(&mut self, p: &mut Pending) -> Result<(), MigrateError> {
        if p.zeros.is_empty() {
            return Ok(());
        }
        let n: u64 = p.zeros.iter().map(|r| r.len).sum::<u64>() / self.layout.page_size();
        let ranges = std::mem::take(&mut p.zeros);
        let f = Frame::ZeroPages { ranges };
        self.send(&f.encode(), &[])?;
        self.counters.zero_pages.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    fn flush_data(
        &mut self,
        p: &mut Pending,
        last: bool,
        compressor: Option<&mut zstd::bulk::Compressor<'static>>,
        comp: &mut Adaptive,
    ) -> Result<(), MigrateError> {
        if p.data.is_empty() {
            return Ok(());
        }
        let ranges = std::mem::take(&mut p.data);
        let raw = p.data_bytes;
        p.data_bytes = 0;
        let sums = std::mem::take(&mut p.sums);
        let pages = raw / self.layout.page_size();
        self.counters.data_pages.fetch_add(pages, Ordering::Relaxed);
        self.counters.raw_bytes.fetch_add(raw, Ordering::Relaxed);
        if let Some(c) = compressor
            && !self.checksums
            && comp.worth_trying()
        {
            let t = Instant::now();
            let mut input = Vec::with_capacity(raw as usize);
            for r in &ranges {
                input.extend_from_slice(self.layout.bytes(*r)?);
            }
            let out = c.compress(&input).map_err(|e| MigrateError::Compression {
                stream: self.index,
                message: e.to_string(),
            })?;
            comp.record(t.elapsed().as_secs_f64(), raw, out.len() as u64);
            if (out.len() as u64) < raw * 9 / 10 {
                let f = Frame::CompressedPages {
                    ranges,
                    compressed_len: out.len() as u64,
                };
                let mut buf = f.encode();
                buf.extend_from_slice(&out);
                let t = Instant::now();
                self.send(&buf, &[])?;
                comp.record_send(t.elapsed().as_secs_f64(), out.len() as u64);
                self.counters
                    .bytes
                    .fetch_add(out.len() as u64, Ordering::Relaxed);
                return Ok(());
            }
        }
        let f = Frame::Pages {
            ranges: ranges.clone(),
            checksums: self.checksums.then_some(sums),
            last,
        };
        let t = Instant::now();
        self.send(&f.encode(), &ranges)?;
        comp.record_send(t.elapsed().as_secs_f64(), raw);
        self.counters.bytes.fetch_add(raw, Ordering::Relaxed);
        Ok(())
    }
}

fn push_run(v: &mut Vec<GpaRange>, gpa: u64, len: u64) {
    if let Some(last) = v.last_mut()
        && last.gpa + last.len == gpa
    {
        last.len += len;
        return;
    }
    v.push(GpaRange::new(gpa, len));
}

/// Adaptive compression: compress only while it saves more send time than it costs CPU
/// time, i.e. while the link, not the CPU, is the bottleneck. Re-probes now and then.
#[derive(Debug, Default)]
struct Adaptive {
    /// Seconds of compression per input byte (EWMA).
    comp_s_per_b: f64,
    /// Compressed size / raw size (EWMA).
    ratio: f64,
    /// Seconds of send per byte (EWMA; queueing sends make this a lower bound).
    send_s_per_b: f64,
    skipped: u32,
}

impl Adaptive {
    fn worth_trying(&mut self) -> bool {
        if self.comp_s_per_b == 0.0 || self.send_s_per_b == 0.0 {
            return true;
        }
        let saved = self.send_s_per_b * (1.0 - self.ratio);
        if saved > self.comp_s_per_b {
            return true;
        }
        self.skipped += 1;
        if self.skipped >= 64 {
            self.skipped = 0;
            return true;
        }
        false
    }

    fn record(&mut self, secs: f64, raw: u64, out: u64) {
        let c = secs / raw.max(1) as f64;
        let r = out as f64 / raw.max(1) as f64;
        self.comp_s_per_b = ewma(self.comp_s_per_b, c);
        self.ratio = ewma(self.ratio, r);
    }

    fn record_send(&mut self, secs: f64, bytes: u64) {
        self.send_s_per_b = ewma(self.send_s_per_b, secs / bytes.max(1) as f64);
    }
}

fn ewma(old: f64, new: f64) -> f64 {
    if old == 0.0 {
        new
    } else {
        old * 0.8 + new * 0.2
    }
}
