// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The source side of a migration: pre-copy rounds, the switchover (the blackout), post-copy
//! service (demand replies on the urgent stream, background push ordered by fault
//! neighbourhood), and the final digest.
//!
//! Failure rule (the point of no return is handing `State` to the connection):
//! - Before it (rounds, pause, harvest, save, stale set), any error resumes the VM here (if
//!   it was paused) and returns the error: the VM keeps running on the source, unharmed.
//! - After it, the destination may have the state and run the VM, so the source resumes its VM
//!   only when it positively knows the destination will not run it: the destination sent
//!   `Error`/`Abort` (it sends them before `Resumed` only when its VM does not run and never
//!   will, e.g. its restore failed), or a resumed session's first frame is `Abort`. Otherwise
//!   (connection lost, the wait for `Resumed` timed out, a protocol violation) the VM stays
//!   paused and the source returns [`MigrateError::SwitchoverUnconfirmed`]. With a
//!   [`SourceRecovery`], a lost connection there is first recovered like post-copy's: the
//!   session is resumed and the destination's first frame settles it (`Resumed`: the migration
//!   goes on, in post-copy with the `Missing` pages; `Abort`: the source resumes its VM).
//! - After `Resumed`, the destination owns the VM; in post-copy the source keeps its (paused)
//!   memory and reports [`MigrateError::PostCopyLost`].
//!
//! Recovery ([`migrate_with`] and a [`SourceRecovery`]): when the connection is lost after
//! `State` was sent (post-copy, or stop-and-copy before the verdict), the source ends the old
//! connections and their threads, keeps the paused memory, and resumes the same session (same
//! endpoint, same key, see `ferry_transport::session::reconnect`), retrying until the recovery
//! window passes. The destination first says whether it runs the VM (`Resumed`, again), then
//! in post-copy names the pages it still lacks (`Missing`); exactly those are pushed,
//! requests are served again, and the migration ends with the digest as before. The report
//! counts the recoveries and the time without a connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded, unbounded};
use ferry_protocol::frame::{FrameHeader, HEADER_LEN, MAX_LIST_RANGES, StateKind, SwitchoverKind};
use ferry_protocol::handshake::{Mode, SessionId};
use ferry_protocol::{Frame, GpaRange};
use ferry_transport::DataStream;
use ferry_transport::session::{ControlChannel, SessionError};
use tracing::{debug, info, warn};

use crate::digest;
use crate::error::MigrateError;
use crate::layout::Layout;
use crate::policy::{OnStall, Policy};
use crate::predict::CopyModel;
use crate::report::{BlackoutPhases, FaultReport, MigrationReport, RoundStats, StreamReport};
use crate::sender::{Counters, Done, Work, Worker};
use crate::vm::{DirtyBitmap, DirtyTracker, GuestMemory, VmControl};

/// The barrier round number that marks the switchover on every bulk stream.
pub const SWITCH_ROUND: u32 = u32::MAX;
/// Round number of the drain handshake before the switchover: the source sends it as a marker
/// on every bulk stream, then (after any pre-switch stale set, hybrid) as `RoundEnd` on the
/// control stream; the destination echoes that once every receiver passed the marker, that is
/// placed everything sent before it, and dropped the stale set.
pub const PRE_STALE_ROUND: u32 = u32::MAX - 2;
/// Most pre-switch drop rounds (hybrid) before the switchover.
const MAX_PRE_DROPS: u32 = 3;
/// The barrier round number that ends the post-copy push.
pub const PUSH_DONE_ROUND: u32 = u32::MAX - 1;

/// Version of the engine's state framing (the blob itself is the VMM's).
pub const STATE_VERSION: u32 = 1;

/// The source VM, as the engine drives it.
#[allow(missing_debug_implementations)]
pub struct SourceVm<'a> {
    /// Guest memory.
    pub memory: &'a dyn GuestMemory,
    /// Dirty tracking.
    pub dirty: &'a mut dyn DirtyTracker,
    /// vCPU and device control.
    pub control: &'a mut dyn VmControl,
}

/// The connections of a source session, ready for data.
#[allow(missing_debug_implementations)]
pub struct SourceStreams {
    /// Control stream.
    pub control: ControlChannel,
    /// Bulk streams.
    pub bulk: Vec<Box<dyn DataStream>>,
    /// Urgent stream (post-copy and hybrid).
    pub urgent: Option<Box<dyn DataStream>>,
    /// Transport name for the report.
    pub transport: String,
    /// Second handles on the sockets (control, bulk, urgent), shut down when the migration
    /// ends (or the connection is abandoned) so no thread waits on them.
    pub sockets: Vec<ferry_transport::Socket>,
    /// The session these connections belong to.
    pub session: SessionId,
    /// Guest memory was not fully allocated when these streams were opened
    /// (`Layout::fully_allocated`): no io_uring fixed buffers were registered, and the senders
    /// probe ranges for memfd holes (a system call per 256 KiB) instead of reading them.
    pub sparse_memory: bool,
}

/// How the source recovers a migration whose connection was lost after the state was sent
/// (see the module docs).
#[allow(missing_debug_implementations)]
pub struct SourceRecovery<'r> {
    /// How long to keep trying to resume the session after a loss.
    pub window: Duration,
    /// Resumes the session once (e.g. [`crate::session::reconnect_source`]).
    pub reconnect: &'r mut dyn FnMut() -> Result<SourceStreams, MigrateError>,
}

/// Pause between two attempts to resume a session.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// What the source is doing, for progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Pre-copy round `n`.
    Round(u32),
    /// In the blackout.
    Switchover,
    /// Post-copy: pushing the rest, serving faults.
    PostCopy,
    /// Comparing digests.
    Verifying,
}

/// A progress update.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// The phase.
    pub phase: Phase,
    /// Page bytes sent so far.
    pub bytes_sent: u64,
    /// Pages covered so far (data and zero).
    pub pages_done: u64,
    /// Guest pages.
    pub total_pages: u64,
    /// Pages dirty at the last harvest.
    pub dirty_pages: u64,
}

enum Ctl {
    /// A frame and when the reader got it (before the control thread wakes to see it).
    Frame(Frame, Instant),
    Error(SessionError),
}

/// How the switchover ended in [`Run::drive`].
enum Switched {
    /// The destination confirmed (`Resumed`) that it runs the VM.
    Confirmed {
        /// Whether it switched over to post-copy.
        post_copy: bool,
    },
    /// The state was handed to the connection, then something failed without the destination
    /// refusing the VM: the source VM is left paused (dirty tracking stopped). Unless a
    /// `Resumed` arrived meanwhile ([`Run::confirmed`]), the switchover is unconfirmed.
    Unconfirmed {
        /// Whether it switched over to post-copy.
        post_copy: bool,
        /// What ended the wait.
        cause: MigrateError,
        /// When the state was handed to the connection.
        handed: Instant,
        /// When the blackout began.
        t0: Instant,
    },
}

struct Run<'s, 'a> {
    layout: &'a Layout,
    policy: &'a Policy,
    work: Vec<Sender<Work>>,
    done: Receiver<Done>,
    ctl: ControlChannel,
    ctl_rx: Receiver<Ctl>,
    /// Post-copy recovery: the pages the destination still lacks, and whether it named all.
    missing: Vec<GpaRange>,
    missing_done: bool,
    /// The paused memory's digest, once computed.
    src_digest: Option<[u8; 16]>,
    counters: &'a [Counters],
    /// The bulk sender threads (see [`Ctx`]).
    stream_threads: &'a crate::boost::ThreadSet,
    start: Instant,
    report: MigrationReport,
    resend: Vec<GpaRange>,
    progress: &'s mut dyn FnMut(&Progress),
    last_sample: Instant,
    last_bytes: Vec<u64>,
    dirty_pages: u64,
    stream_count: usize,
    fault_stats: Option<FaultReport>,
    verified: Option<(bool, [u8; 16])>,
    /// `Resumed`: the destination's timings, and when the control reader got it (the
    /// blackout's end as this side can know it; the control thread may wake later: on this
    /// host a wake-up queued to an idle CPU waited up to ~0.65 ms, which is not the guest's
    /// time).
    resumed: Option<(ferry_protocol::frame::ResumeTimings, Instant)>,
    /// The destination said it runs the VM (a `Resumed` frame arrived, on any connection).
    confirmed: bool,
    /// Barrier completions that `check_workers` took off the channel while `barrier` was still
    /// queueing work; `barrier` counts them first (else it waits for them forever).
    early_barriers: Vec<u32>,
    /// The destination confirmed it dropped the pre-switch stale set.
    pre_stale_acked: bool,
}

/// Migrates the VM to the peer at the other end of `streams`. Returns the report; see the
/// module docs for what an error means for the VM. Without recovery (see [`migrate_with`]).
pub fn migrate(
    vm: SourceVm<'_>,
    streams: SourceStreams,
    policy: &Policy,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, MigrateError> {
    migrate_with(vm, streams, policy, progress, None)
}

/// What the threads of one connection share with the migration.
struct Ctx<'a> {
    layout: &'a Layout,
    counters: &'a [Counters],
    to_send: &'a AtomicBitmap,
    policy: &'a Policy,
    hints: Sender<u64>,
    /// The bulk sender threads, raised for a stop-and-copy switchover.
    stream_threads: &'a crate::boost::ThreadSet,
}

/// One connection's threads and channels.
struct Conn<'scope> {
    ctl: ControlChannel,
    work: Vec<Sender<Work>>,
    done: Receiver<Done>,
    ctl_rx: Receiver<Ctl>,
    sockets: Vec<ferry_transport::Socket>,
    urgent: Option<thread::ScopedJoinHandle<'scope, Result<(), MigrateError>>>,
}

/// Starts a connection's threads: one sender per bulk stream, the control reader, and the
/// urgent server.
fn start_conn<'scope>(
    s: &'scope thread::Scope<'scope, '_>,
    ctx: &Ctx<'scope>,
    streams: SourceStreams,
) -> Result<Conn<'scope>, MigrateError> {
    let SourceStreams {
        control,
        bulk,
        urgent,
        sockets,
        sparse_memory,
        ..
    } = streams;
    if bulk.len() != ctx.counters.len() {
        return Err(MigrateError::Unexpected {
            got: "a different number of bulk streams",
            state: "resuming the session",
        });
    }
    let layout = ctx.layout;
    let policy = ctx.policy;
    let ctl_reader = control.try_clone()?;
    let (done_tx, done_rx) = unbounded();
    let mut work = Vec::with_capacity(bulk.len());
    for (index, stream) in bulk.into_iter().enumerate() {
        let (tx, rx) = bounded(2);
        work.push(tx);
        let w = Worker {
            index,
            stream,
            layout,
            checksums: policy.checksums,
            compression: policy.compression,
            frame_bytes: policy.frame_bytes,
            check_holes: sparse_memory,
            counters: &ctx.counters[index],
        };
        let done_tx = done_tx.clone();
        let threads = ctx.stream_threads;
        thread::Builder::new()
            .name(format!("ferry-send-{index}"))
            .spawn_scoped(s, move || {
                let _enrolled = threads.enrol();
                w.run(rx, done_tx);
            })
            .map_err(|_| MigrateError::Worker("sender"))?;
    }
    drop(done_tx);
    let (ctl_tx, ctl_rx) = unbounded();
    thread::Builder::new()
        .name("ferry-src-ctl".into())
        .spawn_scoped(s, move || control_reader(ctl_reader, ctl_tx))
        .map_err(|_| MigrateError::Worker("control reader"))?;
    let urgent = match urgent {
        Some(u) => {
            let to_send = ctx.to_send;
            let hint_tx = ctx.hints.clone();
            let checksums = policy.checksums;
            Some(
                thread::Builder::new()
                    .name("ferry-src-urgent".into())
                    .spawn_scoped(s, move || {
                        if let Err(e) = ferry_transport::urgent::raise_thread_priority(
                            ferry_transport::urgent::Priority::default(),
                        ) {
                            debug!(%e, "urgent server keeps normal priority");
                        }
                        crate::warm::thread();
                        let r = serve_urgent(u, layout, to_send, hint_tx, checksums);
                        if let Err(e) = &r {
                            warn!(error = %ferry_protocol::handshake::error_chain(e), "urgent server failed");
                        }
                        r
                    })
                    .map_err(|_| MigrateError::Worker("urgent server"))?,
            )
        }
        None => None,
    };
    Ok(Conn {
        ctl: control,
        work,
        done: done_rx,
        ctl_rx,
        sockets,
        urgent,
    })
}

/// Ends a connection: shuts its sockets down, stops its senders (waiting for them, bounded)
/// and joins its urgent server.
fn end_conn(
    run: &mut Run<'_, '_>,
    sockets: &[ferry_transport::Socket],
    urgent: Option<thread::ScopedJoinHandle<'_, Result<(), MigrateError>>>,
) {
    run.ctl.shutdown();
    for s in sockets {
        let _ = s.shutdown();
    }
    run.work.clear();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match run.done.recv_timeout(Duration::from_millis(20)) {
            Ok(Done::Failed { stream, error }) => debug!(stream, %error, "sender stopped"),
            Ok(_) => {}
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(RecvTimeoutError::Timeout) => {
                warn!("senders of the lost connection did not stop in 10 s");
                break;
            }
        }
    }
    if let Some(h) = urgent {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(%e, "urgent server ended"),
            Err(_) => warn!("urgent server panicked"),
        }
    }
}

/// Resumes the session, retrying until `window` after `t_lost` has passed.
fn reconnect_within(
    rec: &mut SourceRecovery<'_>,
    t_lost: Instant,
) -> Result<SourceStreams, MigrateError> {
    let end = t_lost + rec.window;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match (rec.reconnect)() {
            Ok(st) => {
                info!(attempts, "session resumed");
                return Ok(st);
            }
            Err(e) if Instant::now() + RECONNECT_PAUSE >= end => {
                warn!(attempts, error = %ferry_protocol::handshake::error_chain(&e), "could not resume the session");
                return Err(e);
            }
            Err(e) => {
                debug!(attempts, %e, "resuming the session failed; retrying");
                thread::sleep(RECONNECT_PAUSE);
            }
        }
    }
}

/// As [`migrate`]; with `recovery`, a migration survives connections lost after the state was
/// sent (see the module docs).
pub fn migrate_with(
    vm: SourceVm<'_>,
    streams: SourceStreams,
    policy: &Policy,
    progress: &mut dyn FnMut(&Progress),
    recovery: Option<SourceRecovery<'_>>,
) -> Result<MigrationReport, MigrateError> {
    let layout = Layout::new(vm.memory)?;
    let n = streams.bulk.len();
    let counters: Vec<Counters> = (0..n).map(|_| Counters::default()).collect();
    let to_send = AtomicBitmap::new(layout.total_pages());
    let (hint_tx, hint_rx) = unbounded::<u64>();
    let transport = streams.transport.clone();
    let stream_threads = crate::boost::ThreadSet::default();
    let ctx = Ctx {
        layout: &layout,
        counters: &counters,
        to_send: &to_send,
        policy,
        hints: hint_tx,
        stream_threads: &stream_threads,
    };
    thread::scope(|s| {
        let Conn {
            ctl,
            work,
            done,
            ctl_rx,
            sockets,
            urgent,
        } = start_conn(s, &ctx, streams)?;
        let mut run = Run {
            layout: &layout,
            policy,
            work,
            done,
            ctl,
            ctl_rx,
            missing: Vec::new(),
            missing_done: false,
            src_digest: None,
            counters: &counters,
            stream_threads: &stream_threads,
            start: Instant::now(),
            report: MigrationReport {
                mode: mode_name(policy.mode).into(),
                mem_bytes: layout.total_bytes(),
                streams: n,
                transport,
                ..MigrationReport::default()
            },
            resend: Vec::new(),
            progress,
            last_sample: Instant::now(),
            last_bytes: vec![0; n],
            dirty_pages: 0,
            stream_count: n,
            fault_stats: None,
            verified: None,
            resumed: None,
            confirmed: false,
            pre_stale_acked: false,
            early_barriers: Vec::new(),
        };
        let mut handles = Handles { sockets, urgent };
        let SourceVm {
            memory,
            dirty,
            control,
        } = vm;
        let switched = run.drive(
            SourceVm {
                memory,
                dirty,
                control: &mut *control,
            },
            &to_send,
        );
        let r = switched.and_then(|sw| match sw {
            Switched::Confirmed { post_copy } => finish_with_recovery(
                s,
                &ctx,
                &mut run,
                &mut handles,
                post_copy,
                recovery,
                &hint_rx,
                None,
            ),
            Switched::Unconfirmed {
                post_copy,
                cause,
                handed,
                t0,
            } => {
                let r = finish_with_recovery(
                    s,
                    &ctx,
                    &mut run,
                    &mut handles,
                    post_copy,
                    recovery,
                    &hint_rx,
                    Some(Unanswered { cause, handed, t0 }),
                );
                if let Err(e @ MigrateError::PeerAborted { .. }) = &r
                    && !run.confirmed
                {
                    // The destination answered on the resumed session that it never ran the
                    // VM and never will: it is ours again.
                    warn!(%e, "the destination gave the VM up; resuming it on the source");
                    if let Err(re) = control.resume() {
                        warn!(%re, "resuming the source VM failed");
                    }
                }
                r
            }
        });
        if let Err(e) = &r {
            let _ = run.ctl.send(
                &Frame::Abort {
                    reason: ferry_protocol::handshake::error_chain(e),
                },
                &[],
            );
        }
        // Stop the workers (End closes each stream after flushing).
        for tx in &run.work {
            let _ = tx.send(Work::End);
        }
        run.work.clear();
        for d in run.done.iter() {
            if let Done::Failed { stream, error } = d {
                debug!(stream, %error, "stream ended with an error");
            }
        }
        run.ctl.shutdown();
        for s in &handles.sockets {
            let _ = s.shutdown();
        }
        if let Some(h) = handles.urgent {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%e, "urgent server ended"),
                Err(_) => warn!("urgent server panicked"),
            }
        }
        let stats: Vec<StreamReport> = counters
            .iter()
            .enumerate()
            .map(|(index, c)| StreamReport {
                index,
                bytes: c.bytes.load(Ordering::Relaxed),
                frames: 0,
                zc_copied: 0,
                zc_sends: 0,
            })
            .collect();
        r.map(|mut rep| {
            rep.streams_detail = stats;
            rep
        })
    })
}

/// The parts of the current connection the migration keeps outside [`Run`].
struct Handles<'scope> {
    sockets: Vec<ferry_transport::Socket>,
    urgent: Option<thread::ScopedJoinHandle<'scope, Result<(), MigrateError>>>,
}

/// A switchover that passed the point of no return without the destination's answer.
struct Unanswered {
    /// What ended the wait for `Resumed`.
    cause: MigrateError,
    /// When the state was handed to the connection.
    handed: Instant,
    /// When the blackout began.
    t0: Instant,
}

/// After the switchover: [`Run::finish`]. With `recovery`, each lost connection is followed by
/// resuming the session; the destination first says whether it runs the VM (`Resumed`) or
/// never will (`Abort`), then, in post-copy, names its missing pages, and the migration
/// finishes again, for as long as resuming succeeds within the window. With `unanswered`, the
/// switchover itself is not confirmed yet: the first step is that recovery. An `Abort` before
/// any `Resumed` is returned as [`MigrateError::PeerAborted`] (the caller resumes the VM);
/// other failures before it as [`MigrateError::SwitchoverUnconfirmed`].
#[allow(clippy::too_many_arguments)]
fn finish_with_recovery<'scope>(
    s: &'scope thread::Scope<'scope, '_>,
    ctx: &Ctx<'scope>,
    run: &mut Run<'_, '_>,
    handles: &mut Handles<'scope>,
    post_copy: bool,
    mut recovery: Option<SourceRecovery<'_>>,
    hints: &Receiver<u64>,
    unanswered: Option<Unanswered>,
) -> Result<MigrationReport, MigrateError> {
    let to_send = ctx.to_send;
    let mut resumed_session = false;
    let (mut pending, since) = match unanswered {
        Some(u) => (Some(u.cause), Some((u.handed, u.t0))),
        None => (None, None),
    };
    loop {
        let e = match pending.take() {
            Some(e) => e,
            None => {
                let step = if resumed_session {
                    run.await_answer(post_copy, since)
                        .and_then(|()| {
                            if post_copy {
                                run.take_missing(to_send)
                            } else {
                                Ok(())
                            }
                        })
                        .and_then(|()| run.finish(post_copy, to_send, hints))
                } else {
                    run.finish(post_copy, to_send, hints)
                };
                match step {
                    Ok(rep) => return Ok(rep),
                    Err(e) => e,
                }
            }
        };
        if !run.confirmed && matches!(e, MigrateError::PeerAborted { .. }) {
            // The destination never ran the VM and never will.
            return Err(e);
        }
        let Some(rec) = recovery.as_mut().filter(|_| e.is_connection_loss()) else {
            return Err(run.lost(e, post_copy, to_send, since));
        };
        let t_lost = Instant::now();
        warn!(
            error = %ferry_protocol::handshake::error_chain(&e),
            confirmed = run.confirmed,
            "connection lost after the switchover; resuming the session"
        );
        end_conn(run, &handles.sockets, handles.urgent.take());
        handles.sockets.clear();
        let conn = match reconnect_within(rec, t_lost).and_then(|st| start_conn(s, ctx, st)) {
            Ok(conn) => conn,
            Err(_) => return Err(run.lost(e, post_copy, to_send, since)),
        };
        run.ctl = conn.ctl;
        run.work = conn.work;
        run.done = conn.done;
        run.ctl_rx = conn.ctl_rx;
        run.early_barriers.clear();
        handles.sockets = conn.sockets;
        handles.urgent = conn.urgent;
        run.report.recoveries += 1;
        run.report.disconnected_ms += t_lost.elapsed().as_secs_f64() * 1000.0;
        resumed_session = true;
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::PreCopy => "precopy",
        Mode::PostCopy => "postcopy",
        Mode::Hybrid => "hybrid",
    }
}

fn control_reader(ctl: ControlChannel, tx: Sender<Ctl>) {
    // Timeouts are the main thread's business; this thread blocks until the socket closes.
    let _ = ctl.set_read_timeout(None);
    // Mostly idle; inside the blackout it delivers `Resumed`.
    crate::boost::raise(None);
    crate::warm::thread();
    loop {
        match ctl.recv() {
            Ok((h, f)) => {
                if h.payload_len > 0 {
                    // The destination sends no payloads on the control stream.
                    let _ = tx.send(Ctl::Error(SessionError::PayloadTooLarge {
                        len: h.payload_len,
                        max: 0,
                    }));
                    return;
                }
                if matches!(f, Frame::Resumed { .. }) {
                    crate::timeline::mark("src reader got resumed");
                }
                if tx.send(Ctl::Frame(f, Instant::now())).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(Ctl::Error(e));
                return;
            }
        }
    }
}

impl Run<'_, '_> {
    fn elapsed_ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1000.0
    }

    fn bytes_sent(&self) -> u64 {
        self.counters
            .iter()
            .map(|c| c.bytes.load(Ordering::Relaxed))
            .sum()
    }

    fn pages_done(&self) -> u64 {
        self.counters
            .iter()
            .map(|c| c.data_pages.load(Ordering::Relaxed) + c.zero_pages.load(Ordering::Relaxed))
            .sum()
    }

    fn tick(&mut self, phase: Phase) {
        if self.last_sample.elapsed() < self.policy.progress_interval {
            return;
        }
        let t = self.elapsed_ms();
        for (i, c) in self.counters.iter().enumerate() {
            let b = c.bytes.load(Ordering::Relaxed);
            let d = b - self.last_bytes[i];
            self.last_bytes[i] = b;
            self.report.throughput_series.push([t, i as f64, d as f64]);
        }
        self.last_sample = Instant::now();
        let p = Progress {
            phase,
            bytes_sent: self.bytes_sent(),
            pages_done: self.pages_done(),
            total_pages: self.layout.total_pages(),
            dirty_pages: self.dirty_pages,
        };
        (self.progress)(&p);
    }

    /// Handles a control frame that may arrive at any time; returns an error for aborts.
    fn on_ctl(&mut self, c: Ctl) -> Result<(), MigrateError> {
        match c {
            Ctl::Error(e) => Err(e.into()),
            Ctl::Frame(f, arrived) => match f {
                Frame::Resend { ranges } => {
                    for r in &ranges {
                        self.layout.locate(*r)?;
                    }
                    self.report.resent_pages +=
                        ranges.iter().map(|r| r.len).sum::<u64>() / self.layout.page_size();
                    self.resend.extend(ranges);
                    Ok(())
                }
                Frame::Abort { reason } => Err(MigrateError::PeerAborted { reason }),
                Frame::Error { message, .. } => Err(MigrateError::PeerAborted { reason: message }),
                Frame::Progress(_) => Ok(()),
                Frame::Resumed { timings } => {
                    self.resumed = Some((timings, arrived));
                    self.confirmed = true;
                    Ok(())
                }
                Frame::FaultStats(s) => {
                    self.fault_stats = Some(FaultReport::from(&s));
                    Ok(())
                }
                Frame::Verified { ok, digest } => {
                    self.verified = Some((ok, digest));
                    Ok(())
                }
                Frame::RoundEnd { round } if round == PRE_STALE_ROUND => {
                    self.pre_stale_acked = true;
                    Ok(())
                }
                Frame::Missing { ranges, last } => {
                    for r in &ranges {
                        self.layout.locate(*r)?;
                    }
                    self.missing.extend(ranges);
                    self.missing_done |= last;
                    Ok(())
                }
                other => Err(MigrateError::Unexpected {
                    got: other.command().name(),
                    state: "migrating (source)",
                }),
            },
        }
    }

    fn poll_ctl(&mut self) -> Result<(), MigrateError> {
        while let Ok(c) = self.ctl_rx.try_recv() {
            self.on_ctl(c)?;
        }
        Ok(())
    }

    /// Waits until `pred` holds on the control state, handling frames as they come.
    fn wait_ctl(
        &mut self,
        what: &'static str,
        pred: impl Fn(&Self) -> bool,
        phase: Phase,
    ) -> Result<(), MigrateError> {
        let deadline = Instant::now() + self.policy.timeout;
        while !pred(self) {
            match self.ctl_rx.recv_timeout(Duration::from_millis(20)) {
                Ok(c) => self.on_ctl(c)?,
                Err(RecvTimeoutError::Timeout) => {
                    if Instant::now() > deadline {
                        return Err(MigrateError::Timeout {
                            what,
                            waited: self.policy.timeout,
                        });
                    }
                    self.tick(phase);
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(MigrateError::Worker("control reader"));
                }
            }
        }
        Ok(())
    }

    /// Splits ranges by chunk and queues them on the chunk's stream.
    fn dispatch(
        &mut self,
        ranges: &[GpaRange],
        last: bool,
        phase: Phase,
    ) -> Result<(), MigrateError> {
        let chunk = self.policy.chunk_bytes.max(self.layout.page_size());
        let n = self.stream_count as u64;
        let mut pending: Vec<(Vec<GpaRange>, u64)> = vec![(Vec::new(), 0); self.stream_count];
        for r in ranges {
            let mut gpa = r.gpa;
            let end = r.gpa + r.len;
            while gpa < end {
                let chunk_end = (gpa / chunk + 1) * chunk;
                let piece_end = end.min(chunk_end);
                let s = ((gpa / chunk) % n) as usize;
                let piece = GpaRange::new(gpa, piece_end - gpa);
                let (v, bytes) = &mut pending[s];
                v.push(piece);
                *bytes += piece.len;
                if *bytes >= chunk {
                    let ranges = std::mem::take(v);
                    *bytes = 0;
                    self.send_work(s, Work::Pages { ranges, last }, phase)?;
                }
                gpa = piece_end;
            }
        }
        for (s, (v, _)) in pending.into_iter().enumerate() {
            if !v.is_empty() {
                self.send_work(s, Work::Pages { ranges: v, last }, phase)?;
            }
        }
        Ok(())
    }

    fn send_work(&mut self, s: usize, mut w: Work, phase: Phase) -> Result<(), MigrateError> {
        loop {
            match self.work[s].send_timeout(w, Duration::from_millis(20)) {
                Ok(()) => return Ok(()),
                Err(crossbeam_channel::SendTimeoutError::Timeout(back)) => {
                    w = back;
                    self.check_workers()?;
                    self.poll_ctl()?;
                    self.tick(phase);
                }
                Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => {
                    self.check_workers()?;
                    return Err(MigrateError::Worker("sender"));
                }
            }
        }
    }

    fn check_workers(&mut self) -> Result<(), MigrateError> {
        while let Ok(d) = self.done.try_recv() {
            match d {
                Done::Failed { error, .. } => return Err(error),
                Done::Barrier { round } => self.early_barriers.push(round),
                Done::Ended => {}
            }
        }
        Ok(())
    }

    /// Queues the switchover marker on every stream without waiting: the destination waits for
    /// it on each stream before it resumes, so the source need not wait for send completions
    /// inside the blackout (a stream error still surfaces through the workers' reports).
    fn marker(&mut self, round: u32, phase: Phase) -> Result<(), MigrateError> {
        for s in 0..self.stream_count {
            self.send_work(s, Work::Marker(round), phase)?;
        }
        self.check_workers()
    }

    /// Waits until the destination placed everything sent so far (a drain round: the marker on
    /// every bulk stream, then `RoundEnd(PRE_STALE_ROUND)` on control, echoed once every
    /// receiver passed the marker). The sender threads' barrier only says the pages left; the
    /// destination may still be placing (and hashing) a round's data, ms of it after a large
    /// round. Drained after every round, the harvest that decides the switchover comes after
    /// it, so no backlog lands inside the blackout and no page dirtied while waiting is left
    /// out of the prediction; the round's time, and so the measured throughput, is end to end.
    /// With `stale` (hybrid, before switching to post-copy), the destination also drops those
    /// pages before it answers.
    fn drain(&mut self, round: u32, stale: &[GpaRange]) -> Result<(), MigrateError> {
        self.marker(PRE_STALE_ROUND, Phase::Round(round))?;
        for chunk in stale.chunks(MAX_LIST_RANGES) {
            self.ctl.send(
                &Frame::StaleSet {
                    ranges: chunk.to_vec(),
                },
                &[],
            )?;
        }
        self.pre_stale_acked = false;
        self.ctl.send(
            &Frame::RoundEnd {
                round: PRE_STALE_ROUND,
            },
            &[],
        )?;
        self.wait_ctl(
            "the destination to place the round (and drop the stale pages)",
            |r| r.pre_stale_acked,
            Phase::Round(round),
        )
    }

    /// Sends a barrier on every stream and waits for all of them.
    fn barrier(&mut self, round: u32, phase: Phase) -> Result<(), MigrateError> {
        for s in 0..self.stream_count {
            self.send_work(s, Work::Barrier(round), phase)?;
        }
        let early = self.early_barriers.iter().filter(|r| **r == round).count();
        self.early_barriers.retain(|r| *r != round);
        let mut left = self.stream_count.saturating_sub(early);
        let deadline = Instant::now() + self.policy.timeout;
        while left > 0 {
            match self.done.recv_timeout(Duration::from_millis(20)) {
                Ok(Done::Barrier { round: r }) if r == round => left -= 1,
                Ok(Done::Barrier { .. } | Done::Ended) => {}
                Ok(Done::Failed { error, .. }) => return Err(error),
                Err(RecvTimeoutError::Timeout) => {
                    if Instant::now() > deadline {
                        return Err(MigrateError::Timeout {
                            what: "bulk streams to drain",
                            waited: self.policy.timeout,
                        });
                    }
                    self.poll_ctl()?;
                    self.tick(phase);
                }
                Err(RecvTimeoutError::Disconnected) => return Err(MigrateError::Worker("sender")),
            }
        }
        Ok(())
    }

    /// Harvests the dirty log into ranges; `last` is the final harvest, in the blackout.
    fn harvest(
        &mut self,
        dirty: &mut dyn DirtyTracker,
        bitmap: &mut DirtyBitmap,
        last: bool,
    ) -> Result<Vec<GpaRange>, MigrateError> {
        // `bitmap` is all zero here: fresh, or emptied by the scan below (one pass instead of a
        // scan and a clear: at 8 GiB each pass over the 256 KiB bitmap is tens of µs, and the
        // final harvest is inside the blackout). After an error it is not used again.
        if last {
            dirty.harvest_final(bitmap)
        } else {
            dirty.harvest(bitmap)
        }
        .map_err(MigrateError::vm("harvest dirty log"))?;
        let mut ranges = Vec::new();
        bitmap.take_ranges(self.layout.regions(), self.layout.page_size(), &mut ranges);
        // Pages the destination asked to be resent.
        ranges.append(&mut self.resend);
        Ok(ranges)
    }

    /// Pre-copy rounds and the switchover, until the destination runs the VM, or until the
    /// switchover passed the point of no return (the state handed to the connection) without
    /// the destination's answer ([`Switched::Unconfirmed`]: the VM stays paused).
    fn drive(
        &mut self,
        vm: SourceVm<'_>,
        to_send: &AtomicBitmap,
    ) -> Result<Switched, MigrateError> {
        let SourceVm {
            memory: _,
            dirty,
            control,
        } = vm;
        let ps = self.layout.page_size();
        let mut bitmap = DirtyBitmap::for_regions(self.layout.regions());
        let all: Vec<GpaRange> = self
            .layout
            .regions()
            .iter()
            .map(|r| GpaRange::new(r.gpa, r.len))
            .collect();
        let mut post_copy = self.policy.mode == Mode::PostCopy;
        let mut throttle = 100u8;
        let mut pending = all.clone();
        let mut round = 0u32;
        let mut model = CopyModel::default();
        // The stack and heap the blackout uses, resident from the start: warmed only right
        // before the pause, the first touch of them took ~170 µs there (page faults on this
        // nested host), while the guest ran on and dirtied ~15 more pages for the final set.
        // The call before the pause then only re-touches them.
        crate::warm::thread();
        let mut prev_dirty = u64::MAX;
        let mut stalls = 0u32;
        if !post_copy {
            dirty
                .start()
                .map_err(MigrateError::vm("start dirty tracking"))?;
        }
        // Pre-copy rounds.
        let result: Result<(), MigrateError> = (|| {
            while !post_copy {
                round += 1;
                let pages: u64 = pending.iter().map(|r| r.len).sum::<u64>() / ps;
                let t0 = Instant::now();
                let start_ms = self.elapsed_ms();
                let bytes0 = self.bytes_sent();
                self.ctl.send(&Frame::RoundBegin { round, pages }, &[])?;
                self.dispatch(&pending, false, Phase::Round(round))?;
                self.barrier(round, Phase::Round(round))?;
                self.ctl.send(&Frame::RoundEnd { round }, &[])?;
                self.drain(round, &[])?;
                let dur = t0.elapsed();
                let bytes = self.bytes_sent() - bytes0;
                // The round's time end to end (the drain included) measures the link and the
                // per-round latency the final copy will pay too (see `predict`).
                model.observe(pages * ps, bytes, dur);
                self.poll_ctl()?;
                let t_harvest = Instant::now();
                pending = self.harvest(dirty, &mut bitmap, false)?;
                // The final harvest is inside the blackout and grows with guest size (a
                // 2 Mi-page bitmap at 8 GiB): predict it from this one, which also re-protects
                // and so errs long.
                let harvest_us = t_harvest.elapsed().as_secs_f64() * 1e6;
                crate::timeline::mark("src round harvested");
                let dirty_pages: u64 = pending.iter().map(|r| r.len).sum::<u64>() / ps;
                self.dirty_pages = dirty_pages;
                let latency_us = model.latency_us();
                let predicted = self.policy.switch_overhead.as_secs_f64() * 1e6
                    + harvest_us
                    + model.copy_us(dirty_pages * ps);
                self.report.rounds_detail.push(RoundStats {
                    round,
                    start_ms,
                    duration_ms: dur.as_secs_f64() * 1000.0,
                    pages,
                    bytes,
                    dirty_pages,
                    predicted_blackout_us: predicted,
                    latency_us,
                    bytes_per_us: model.bytes_per_us(),
                });
                let budget = self.policy.max_blackout.as_secs_f64() * 1e6;
                // Hybrid has a switchover whose blackout does not grow with the dirty set, so
                // it stops and copies only with part of the budget to spare for the
                // prediction's error; pre-copy has no other way out and uses all of it.
                let fit = if self.policy.mode == Mode::Hybrid {
                    budget * (1.0 - self.policy.hybrid_reserve())
                } else {
                    budget
                };
                // The guest runs on until the pause, so a switchover follows the harvest at once:
                // the round's log line, progress frame (the destination ignores it) and
                // progress callback come only when another round follows. (Traced here: with
                // those first, and the control thread's stack and heap warmed only before the
                // pause, 0.2-0.37 ms passed between them and ~20 more pages were dirty in the
                // final set; the deciding round is in the report's `rounds_detail`.)
                if predicted <= fit {
                    break;
                }
                info!(
                    round,
                    pages,
                    dirty_pages,
                    predicted_us = predicted,
                    "round done"
                );
                self.ctl.send(
                    &Frame::Progress(ferry_protocol::frame::ProgressStats {
                        round,
                        bytes: self.bytes_sent(),
                        pages: self.pages_done(),
                        dirty_pages,
                        elapsed_us: self.start.elapsed().as_micros() as u64,
                    }),
                    &[],
                )?;
                self.last_sample = Instant::now() - Duration::from_secs(1);
                self.tick(Phase::Round(round));
                if dirty_pages as f64 >= prev_dirty as f64 * self.policy.stall_ratio {
                    stalls += 1;
                } else {
                    stalls = 0;
                }
                prev_dirty = dirty_pages;
                let stalled = stalls >= 2 || round >= self.policy.max_rounds;
                if stalled {
                    match (self.policy.mode, self.policy.on_stall) {
                        (Mode::Hybrid, _) => post_copy = true,
                        (_, OnStall::Throttle)
                            if round < self.policy.max_rounds && throttle > 10 =>
                        {
                            throttle = throttle.saturating_sub(20).max(10);
                            let done = control
                                .throttle(throttle)
                                .map_err(MigrateError::vm("throttle"))?;
                            if !done {
                                return Err(MigrateError::NotConverging {
                                    rounds: round,
                                    dirty_pages,
                                    predicted_us: predicted,
                                    budget_us: self.policy.max_blackout.as_micros() as u64,
                                });
                            }
                            stalls = 0;
                        }
                        _ => {
                            return Err(MigrateError::NotConverging {
                                rounds: round,
                                dirty_pages,
                                predicted_us: predicted,
                                budget_us: self.policy.max_blackout.as_micros() as u64,
                            });
                        }
                    }
                }
            }
            Ok(())
        })();
        crate::timeline::mark("src rounds done");
        self.report.throttle_percent = throttle;
        if let Err(e) = result {
            let _ = dirty.stop();
            if throttle < 100 {
                let _ = control.throttle(100);
            }
            return Err(e);
        }
        self.report.rounds = round;

        // Post-copy follows: the destination will run the guest while pages still arrive, so
        // no stream may write its memory directly any more (RDMA WRITE); payload goes in-band
        // from here, behind everything queued so far. Nothing for the socket transports.
        if post_copy {
            let phase = Phase::Round(round);
            let r = (0..self.stream_count).try_for_each(|s| self.send_work(s, Work::InBand, phase));
            if let Err(e) = r {
                let _ = dirty.stop();
                return Err(e);
            }
        }

        // Hybrid switching to post-copy: the pages dirty now will be stale. Have the
        // destination drop them while the VM still runs here, so the blackout only drops what
        // is dirtied from now on (dropping costs ~0.1–1 µs per page at the destination).
        let mut pre_stale: Vec<GpaRange> = Vec::new();
        // Repeat while that shrinks the set (a writer faster than the destination can drop
        // pages never converges; what is left is dropped inside the blackout).
        let mut drop_now = if post_copy && round > 0 {
            std::mem::take(&mut pending)
        } else {
            Vec::new()
        };
        let mut drops = 0;
        while !drop_now.is_empty() {
            drops += 1;
            let r = (|| -> Result<Vec<GpaRange>, MigrateError> {
                // Behind the last pages on every stream: the destination drops nothing before
                // its receivers passed the marker.
                self.drain(round, &drop_now)?;
                self.harvest(dirty, &mut bitmap, false)
            })();
            let next = match r {
                Ok(next) => next,
                Err(e) => {
                    let _ = dirty.stop();
                    return Err(e);
                }
            };
            let dropped: u64 = drop_now.iter().map(|r| r.len).sum();
            let again: u64 = next.iter().map(|r| r.len).sum();
            pre_stale.append(&mut drop_now);
            if drops >= MAX_PRE_DROPS || again * 2 > dropped {
                pending = next;
                break;
            }
            drop_now = next;
        }

        // Pure post-copy comes straight from the session's start, when the destination may
        // still be setting up (dropping its memory, starting threads) at normal priority: the
        // pause would then preempt it, and its control thread would take the switchover late
        // (traced: 0.7-2 ms blackouts, the destination's main thread runnable behind the
        // source's raised threads). A drain answered by the destination says it is ready:
        // its control loop runs (raised) and every receiver passed the marker. Rounds end with
        // one anyway.
        if post_copy
            && round == 0
            && let Err(e) = self.drain(0, &[])
        {
            let _ = dirty.stop();
            return Err(e);
        }

        // The switchover: the blackout starts.
        let kind = if post_copy {
            SwitchoverKind::PostCopy
        } else {
            SwitchoverKind::StopAndCopy
        };
        // Post-copy: no page is dispatched between here and the push, so the switchover
        // marker leaves before the pause, and we wait until every stream has sent it. The
        // stream threads then sleep again before the blackout starts (on two cores, waking
        // them inside it preempted this thread or the vCPU threads for ~100 µs), and the
        // destination's receivers have passed it by the time its `Switchover` frame arrives.
        if post_copy && let Err(e) = self.barrier(SWITCH_ROUND, Phase::Round(round)) {
            let _ = dirty.stop();
            return Err(e);
        }
        // This thread is on the blackout's critical path until the destination resumed.
        // Post-copy: the push list, as far as it is known before the pause (every page in
        // pure post-copy; the pages the destination dropped already in hybrid), filled here
        // rather than inside the blackout (a bitmap of 2 Mi pages at 8 GiB: ~0.1 ms).
        if post_copy {
            let known = if round == 0 { &all } else { &pre_stale };
            for r in known {
                match self.layout.locate(*r) {
                    Ok((_, _, first)) => to_send.set_range(first, r.len / ps),
                    Err(e) => {
                        let _ = dirty.stop();
                        return Err(e.into());
                    }
                }
            }
        }
        // The stack and heap this thread uses inside the blackout, resident (see `warm`).
        crate::warm::thread();
        crate::timeline::mark("src warmed");
        let boost = crate::boost::Boost::current();
        crate::timeline::mark("src raised");
        // Stop-and-copy: the final pages go out on the bulk streams inside the blackout, so
        // their threads go ahead of normal threads until it ends (raised before the pause:
        // they are idle now, and raising costs system calls).
        let streams_raised = (!post_copy).then(|| self.stream_threads.raise());
        let t0 = Instant::now();
        crate::timeline::mark("src pause start");
        self.report.blackout_start_ms = self.elapsed_ms();
        control.pause().map_err(MigrateError::vm("pause"))?;
        let t_pause = Instant::now();
        crate::timeline::mark("src paused");
        // Set once the state may have reached the destination (when, and the final pages).
        let mut handed: Option<(Instant, u64)> = None;
        let switched = (|| -> Result<(Instant, Instant, Instant, u64), MigrateError> {
            // The destination gets ready (its vCPU threads wake, its control thread waits
            // actively) while this side harvests and saves.
            self.ctl.send(
                &Frame::Switchover {
                    kind,
                    pause_us: (t_pause - t0).as_micros() as u64,
                },
                &[],
            )?;
            crate::timeline::mark("src switchover sent");
            // The pages harvested after the last round were not sent yet: they join the
            // final set (pre-copy) or the stale set (post-copy), with what was written since.
            let final_ranges = if round == 0 {
                all.clone()
            } else {
                let mut r = std::mem::take(&mut pending);
                r.extend(self.harvest(dirty, &mut bitmap, true)?);
                r.sort_unstable();
                merge_ranges(self.layout, r)
            };
            let t_harvest = Instant::now();
            crate::timeline::mark("src harvested");
            // Stop-and-copy: the final pages (then the marker) go out while the state is saved.
            if !post_copy {
                self.dispatch(&final_ranges, true, Phase::Switchover)?;
                self.marker(SWITCH_ROUND, Phase::Switchover)?;
            }
            let t_dispatched = Instant::now();
            let blob = control
                .save_state()
                .map_err(MigrateError::vm("save state"))?;
            let t_save_done = Instant::now();
            crate::timeline::mark("src saved");
            let stale_pages = final_ranges.iter().map(|r| r.len).sum::<u64>() / ps;
            let mut first_touch = Vec::new();
            // The stale set, the first-touch hint and the state leave in one write.
            let mut frames = Vec::new();
            if post_copy {
                for chunk in final_ranges.chunks(MAX_LIST_RANGES) {
                    frames.push(Frame::StaleSet {
                        ranges: chunk.to_vec(),
                    });
                }
                // The push list (the urgent server answers requests whether or not a page is
                // on it), and the pages the vCPUs will touch first, pushed right behind the
                // state, ahead of everything else: the destination places them while it
                // restores, instead of the guest's first steps faulting on them one round trip
                // after another.
                // (The rest of the push list was filled before the pause.)
                if round > 0 {
                    for r in &final_ranges {
                        let (_, _, first) = self.layout.locate(*r)?;
                        to_send.set_range(first, r.len / ps);
                    }
                }
                let (hint, stale) = self.take_first_touch(control.first_touch_pages(), to_send);
                crate::timeline::mark("src first touch taken");
                if !hint.is_empty() {
                    // The destination maps the ones it has before the guest touches them.
                    frames.push(Frame::FirstTouch { ranges: hint });
                }
                first_touch = stale;
            }
            let state = Frame::State {
                kind: StateKind::Vm,
                version: STATE_VERSION,
                len: blob.len() as u64,
            };
            let mut batch: Vec<(&Frame, &[u8])> = frames.iter().map(|f| (f, &[][..])).collect();
            batch.push((&state, &blob));
            // The point of no return: from the first byte of the state on, the destination
            // may restore and run the VM.
            handed = Some((Instant::now(), stale_pages));
            self.ctl.send_all(&batch)?;
            // After the state: waking the stream threads must not delay it (on two cores they
            // preempt this thread).
            if !first_touch.is_empty() {
                self.report.first_touch_pages = first_touch.iter().map(|r| r.len).sum::<u64>() / ps;
                self.dispatch(&first_touch, true, Phase::Switchover)?;
            }
            // Report dispatching the final pages as part of `send`, not of `save`.
            let t_save = t_harvest + (t_save_done - t_dispatched);
            let t_send = Instant::now();
            crate::timeline::mark("src state sent");
            self.wait_ctl(
                "the destination to resume",
                |r| r.resumed.is_some(),
                Phase::Switchover,
            )?;
            Ok((t_harvest, t_save, t_send, stale_pages))
        })();
        let (t_harvest, t_save, t_send, stale_pages) = match switched {
            Ok(x) => x,
            Err(e) => {
                let _ = dirty.stop();
                let refused = matches!(e, MigrateError::PeerAborted { .. }) && !self.confirmed;
                match handed {
                    // The destination may have the state and run the VM: only its own refusal
                    // (`Error`/`Abort` before any `Resumed`: it promises its VM never runs)
                    // lets this side resume.
                    Some((at, final_pages)) if !refused => {
                        // As reported on success: post-copy, every page still to fetch.
                        let stale_pages = if post_copy {
                            to_send.count()
                        } else {
                            final_pages
                        };
                        warn!(
                            error = %ferry_protocol::handshake::error_chain(&e),
                            "switchover unconfirmed: the destination may run the VM; the source VM stays paused"
                        );
                        self.report.stale_pages = stale_pages;
                        return Ok(Switched::Unconfirmed {
                            post_copy,
                            cause: e,
                            handed: at,
                            t0,
                        });
                    }
                    // Before the state left, or the destination refused it: the VM is still
                    // ours. Resume it.
                    _ => {
                        warn!(%e, "switchover failed; resuming the VM on the source");
                        if let Err(re) = control.resume() {
                            warn!(%re, "resuming the source VM failed");
                        }
                        return Err(e);
                    }
                }
            }
        };
        let t_resumed = self.resumed.map_or_else(Instant::now, |r| r.1);
        crate::timeline::mark("src saw resumed");
        drop(streams_raised);
        drop(boost);
        let _ = dirty.stop();
        let timings = self.resumed.map(|r| r.0).unwrap_or_default();
        let us = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e6;
        self.report.blackout_us = us(t0, t_resumed);
        self.report.blackout_phases_us = BlackoutPhases {
            pause: us(t0, t_pause),
            harvest: us(t_pause, t_harvest),
            save: us(t_harvest, t_save),
            send: us(t_save, t_send),
            apply: timings.receive_us as f64,
            restore: timings.restore_us as f64,
            resume: timings.resume_us as f64,
        };
        self.report.switchover = if post_copy {
            "post-copy"
        } else {
            "stop-and-copy"
        }
        .into();
        // Every page the destination must fetch, counted once (post-copy: counted here, out
        // of the blackout).
        self.report.stale_pages = if post_copy {
            to_send.count()
        } else {
            stale_pages
        };
        info!(
            blackout_us = self.report.blackout_us,
            ?kind,
            stale_pages = self.report.stale_pages,
            "destination resumed"
        );

        Ok(Switched::Confirmed { post_copy })
    }

    /// After the destination resumed: post-copy push (stale pages, fault neighbourhoods
    /// first), then the digests. Errors here are returned as they are; the caller decides
    /// between recovery and [`MigrateError::PostCopyLost`].
    fn finish(
        &mut self,
        post_copy: bool,
        to_send: &AtomicBitmap,
        hints: &Receiver<u64>,
    ) -> Result<MigrationReport, MigrateError> {
        if post_copy {
            self.push(to_send, hints)?;
        }
        // A sample now, whatever the interval: the last round's bytes and what followed are in
        // it (a round that ends in a switchover takes none).
        self.last_sample = Instant::now() - Duration::from_secs(1);
        self.tick(Phase::Verifying);
        // The memory is paused: a recovery reuses the digest computed before the loss.
        let d = *self
            .src_digest
            .get_or_insert_with(|| digest::digest_memory(self.layout));
        self.report.digest = digest::hex(&d);
        self.ctl.send(
            &Frame::Complete {
                digest: d,
                pages: self.layout.total_pages(),
            },
            &[],
        )?;
        self.wait_ctl(
            "the destination's verdict",
            |r| r.verified.is_some(),
            Phase::Verifying,
        )?;
        let (ok, _) = self.verified.unwrap_or((false, [0; 16]));
        self.report.verified = ok;
        self.report.faults = self.fault_stats.clone().unwrap_or_default();
        self.report.total_ms = self.elapsed_ms();
        self.report.bytes_sent = self.bytes_sent();
        self.report.bytes_uncompressed = self
            .counters
            .iter()
            .map(|c| c.raw_bytes.load(Ordering::Relaxed))
            .sum();
        self.report.data_pages = self
            .counters
            .iter()
            .map(|c| c.data_pages.load(Ordering::Relaxed))
            .sum();
        self.report.zero_pages = self
            .counters
            .iter()
            .map(|c| c.zero_pages.load(Ordering::Relaxed))
            .sum();
        Ok(self.report.clone())
    }

    /// On a resumed session: waits for the destination's first frame, `Resumed` (it runs the
    /// VM) or `Abort` (it never ran it and never will: returned as
    /// [`MigrateError::PeerAborted`]). A switchover confirmed this way is reported with the
    /// blackout as the source saw it (until it learnt the answer) and the destination's phases.
    fn await_answer(
        &mut self,
        post_copy: bool,
        since: Option<(Instant, Instant)>,
    ) -> Result<(), MigrateError> {
        // Not reported yet: the switchover was confirmed here, not in `drive`.
        let first = self.report.switchover.is_empty();
        self.resumed = None;
        self.wait_ctl(
            "the destination to say whether it runs the VM",
            |r| r.resumed.is_some(),
            Phase::PostCopy,
        )?;
        if first && let Some((_, t0)) = since {
            let (timings, end) = self
                .resumed
                .unwrap_or_else(|| (Default::default(), Instant::now()));
            self.report.blackout_us = end.saturating_duration_since(t0).as_secs_f64() * 1e6;
            self.report.blackout_phases_us = BlackoutPhases {
                apply: timings.receive_us as f64,
                restore: timings.restore_us as f64,
                resume: timings.resume_us as f64,
                ..BlackoutPhases::default()
            };
            self.report.switchover = if post_copy {
                "post-copy"
            } else {
                "stop-and-copy"
            }
            .into();
            info!(
                blackout_us = self.report.blackout_us,
                "the destination runs the VM (confirmed on the resumed session)"
            );
        }
        Ok(())
    }

    /// The error for a connection lost after the switchover and not recovered.
    fn lost(
        &self,
        e: MigrateError,
        post_copy: bool,
        to_send: &AtomicBitmap,
        since: Option<(Instant, Instant)>,
    ) -> MigrateError {
        if !self.confirmed {
            return MigrateError::SwitchoverUnconfirmed {
                waited: since.map_or(Duration::ZERO, |(handed, _)| handed.elapsed()),
                stale_pages: if post_copy { to_send.count() } else { 0 },
                source: Box::new(e),
            };
        }
        if post_copy {
            MigrateError::PostCopyLost {
                missing: to_send.count(),
                source: Box::new(e),
            }
        } else {
            e
        }
    }

    /// Post-copy recovery: waits for the destination to name the pages it lacks and makes
    /// them, exactly, the pages left to push.
    fn take_missing(&mut self, to_send: &AtomicBitmap) -> Result<(), MigrateError> {
        self.missing.clear();
        self.missing_done = false;
        self.wait_ctl(
            "the destination's missing pages",
            |r| r.missing_done,
            Phase::PostCopy,
        )?;
        let ps = self.layout.page_size();
        to_send.clear();
        for r in &self.missing {
            let (_, _, first) = self.layout.locate(*r)?;
            to_send.set_range(first, r.len / ps);
        }
        info!(
            pages = to_send.count(),
            ranges = self.missing.len(),
            "destination named its missing pages"
        );
        Ok(())
    }

    /// The post-copy background push.
    fn push(&mut self, to_send: &AtomicBitmap, hints: &Receiver<u64>) -> Result<(), MigrateError> {
        let ps = self.layout.page_size();
        let chunk_pages = (self.policy.chunk_bytes / ps).max(1);
        let total = self.layout.total_pages();
        let mut cursor = 0u64;
        while cursor < total {
            // Fault neighbourhoods first.
            while let Ok(page) = hints.try_recv() {
                let lo = page.saturating_sub(self.policy.prefetch_pages / 4);
                let hi = (page + self.policy.prefetch_pages).min(total);
                let ranges = self.take_ranges(to_send, lo, hi);
                if !ranges.is_empty() {
                    self.dispatch(&ranges, true, Phase::PostCopy)?;
                }
            }
            let hi = (cursor + chunk_pages).min(total);
            let ranges = self.take_ranges(to_send, cursor, hi);
            cursor = hi;
            if !ranges.is_empty() {
                self.dispatch(&ranges, true, Phase::PostCopy)?;
            }
            self.poll_ctl()?;
            self.tick(Phase::PostCopy);
        }
        self.barrier(PUSH_DONE_ROUND, Phase::PostCopy)
    }

    /// The pages among `hint` (guest-physical addresses the VM says its vCPUs touch first;
    /// the first [`MAX_FIRST_TOUCH`] in guest memory count, others are ignored) as sorted,
    /// merged ranges, and those of them still unsent, claimed from `to_send`.
    fn take_first_touch(
        &self,
        hint: Vec<u64>,
        to_send: &AtomicBitmap,
    ) -> (Vec<GpaRange>, Vec<GpaRange>) {
        let ps = self.layout.page_size();
        let mut all = Vec::new();
        let mut stale = Vec::new();
        for gpa in hint {
            let page = GpaRange::new(gpa & !(ps - 1), ps);
            let Ok((_, _, p)) = self.layout.locate(page) else {
                continue;
            };
            if all.len() == MAX_FIRST_TOUCH {
                break;
            }
            all.push(page);
            if to_send.take(p) {
                stale.push(page);
            }
        }
        all.sort_unstable();
        stale.sort_unstable();
        (
            merge_ranges(self.layout, all),
            merge_ranges(self.layout, stale),
        )
    }

    /// Claims the still-unsent pages in `[lo, hi)` and returns them as ranges.
    fn take_ranges(&self, to_send: &AtomicBitmap, lo: u64, hi: u64) -> Vec<GpaRange> {
        let ps = self.layout.page_size();
        let mut out: Vec<GpaRange> = Vec::new();
        let mut p = lo;
        while p < hi {
            if to_send.take(p) {
                let gpa = self.layout.page_gpa(p);
                match out.last_mut() {
                    Some(l) if l.gpa + l.len == gpa => l.len += ps,
                    _ => out.push(GpaRange::new(gpa, ps)),
                }
            }
            p += 1;
        }
        out
    }
}

/// Most pages of [`VmControl::first_touch_pages`] sent at a post-copy switchover (1 MiB).
const MAX_FIRST_TOUCH: usize = 256;

/// Sorted ranges with overlaps and neighbours merged.
fn merge_ranges(layout: &Layout, sorted: Vec<GpaRange>) -> Vec<GpaRange> {
    let ps = layout.page_size();
    // Two ranges that only touch may lie in two adjacent regions (VMMs split RAM into
    // back-to-back slots): a merged range across them would fail every `locate`.
    let region = |gpa: u64| layout.locate(GpaRange::new(gpa, ps)).ok().map(|l| l.0);
    let mut out: Vec<GpaRange> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match out.last_mut() {
            Some(l)
                if r.gpa < l.gpa + l.len
                    || (r.gpa == l.gpa + l.len
                        && region(r.gpa).is_some()
                        && region(r.gpa) == region(r.gpa.wrapping_sub(ps))) =>
            {
                let end = (l.gpa + l.len).max(r.gpa + r.len);
                l.len = end - l.gpa;
            }
            _ => out.push(r),
        }
    }
    out
}

/// Serves post-copy page requests on the urgent stream: each request is answered at once,
/// from guest memory by reference, and its page becomes a prefetch hint for the push.
fn serve_urgent(
    mut stream: Box<dyn DataStream>,
    layout: &Layout,
    to_send: &AtomicBitmap,
    hints: Sender<u64>,
    checksums: bool,
) -> Result<(), MigrateError> {
    let err = |source| MigrateError::Stream {
        stream: usize::MAX,
        source,
    };
    let ps = layout.page_size();
    loop {
        let mut h = [0u8; HEADER_LEN];
        match stream.recv_exact(&mut h) {
            Ok(()) => {}
            Err(e) => {
                // The destination closes the urgent stream when post-copy is over.
                debug!(%e, "urgent stream closed");
                return Ok(());
            }
        }
        let header = FrameHeader::decode(&h).map_err(|source| MigrateError::Decode {
            stream: usize::MAX,
            source,
        })?;
        let mut meta = vec![0u8; header.meta_len as usize];
        stream.recv_exact(&mut meta).map_err(err)?;
        let frame = Frame::decode(&header, &meta).map_err(|source| MigrateError::Decode {
            stream: usize::MAX,
            source,
        })?;
        match frame {
            Frame::PageRequest { id, range } => {
                let (_, _, first) = layout.locate(range)?;
                let bytes = layout.bytes(range)?;
                let checksums = checksums.then(|| {
                    bytes
                        .chunks_exact(ps as usize)
                        .enumerate()
                        .map(|(i, p)| crate::pages::page_hash(range.gpa + i as u64 * ps, p))
                        .collect()
                });
                let reply = Frame::PageReply {
                    id,
                    range,
                    checksums,
                };
                stream.send_frame(&reply.encode(), &[range]).map_err(err)?;
                stream.flush().map_err(err)?;
                for p in first..first + range.len / ps {
                    to_send.take(p);
                }
                let _ = hints.send(first);
            }
            Frame::EndOfStream => return Ok(()),
            other => {
                return Err(MigrateError::Unexpected {
                    got: other.command().name(),
                    state: "serving page requests",
                });
            }
        }
    }
}

/// A bitmap of pages shared between the push and the urgent server.
#[derive(Debug)]
pub(crate) struct AtomicBitmap {
    words: Vec<AtomicU64>,
}

impl AtomicBitmap {
    pub fn new(bits: u64) -> Self {
        Self {
            words: (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Sets bits `first .. first + n`, a word at a time.
    pub fn set_range(&self, first: u64, n: u64) {
        let end = first + n;
        let mut p = first;
        while p < end {
            let bit = p % 64;
            let take = (64 - bit).min(end - p);
            let mask = if take == 64 {
                u64::MAX
            } else {
                ((1u64 << take) - 1) << bit
            };
            self.words[(p / 64) as usize].fetch_or(mask, Ordering::Relaxed);
            p += take;
        }
    }

    /// Clears bit `p`; true when it was set.
    pub fn take(&self, p: u64) -> bool {
        let m = 1u64 << (p % 64);
        self.words[(p / 64) as usize].fetch_and(!m, Ordering::AcqRel) & m != 0
    }

    /// Clears every bit.
    pub fn clear(&self) {
        for w in &self.words {
            w.store(0, Ordering::Relaxed);
        }
    }

    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::{AtomicBitmap, merge_ranges};
    use crate::layout::Layout;
    use crate::vm::{Backing, GuestMemory, GuestRegion};
    use ferry_protocol::GpaRange;

    /// Two regions back to back (no host memory behind them: only the layout is used).
    struct Adjacent([GuestRegion; 2]);

    // SAFETY: the regions are never accessed; the test only builds a `Layout` from them.
    unsafe impl GuestMemory for Adjacent {
        fn regions(&self) -> &[GuestRegion] {
            &self.0
        }
    }

    #[test]
    fn merged_ranges_never_cross_a_region_boundary() {
        let region = |gpa, len| GuestRegion {
            gpa,
            len,
            host_addr: 0x7000_0000_0000,
            backing: Backing::Anonymous,
            page_size: 4096,
        };
        let mem = Adjacent([region(0, 0x10000), region(0x10000, 0x10000)]);
        let layout = Layout::new(&mem).expect("layout");
        let r = |gpa, len| GpaRange::new(gpa, len);
        // Touching across the boundary: kept apart, and each still locates.
        let out = merge_ranges(&layout, vec![r(0xf000, 0x1000), r(0x10000, 0x2000)]);
        assert_eq!(out, vec![r(0xf000, 0x1000), r(0x10000, 0x2000)]);
        for x in &out {
            layout
                .locate(*x)
                .expect("every merged range lies in one region");
        }
        // Touching or overlapping inside a region: merged.
        let out = merge_ranges(
            &layout,
            vec![r(0x1000, 0x1000), r(0x2000, 0x1000), r(0x2800, 0x2000)],
        );
        assert_eq!(out, vec![r(0x1000, 0x3800)]);
    }

    #[test]
    fn set_range_sets_exactly_the_range() {
        for (first, n) in [
            (0, 0),
            (0, 1),
            (3, 61),
            (3, 62),
            (63, 2),
            (64, 64),
            (10, 300),
            (0, 640),
        ] {
            let b = AtomicBitmap::new(640);
            b.set_range(first, n);
            assert_eq!(b.count(), n, "{first}+{n}");
            for p in 0..640 {
                assert_eq!(
                    b.take(p),
                    (first..first + n).contains(&p),
                    "{first}+{n} bit {p}"
                );
            }
        }
    }
}
