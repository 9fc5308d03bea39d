// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The destination side: receive pre-copy rounds straight into guest memory, apply the
//! switchover (final pages or the post-copy stale set), restore and resume the VM, then in
//! post-copy resolve faults with userfaultfd (demand requests on the urgent stream, pushed pages
//! placed as they arrive), and verify the whole-memory digest.
//!
//! memfd regions are received through their alias mapping, into the
//! page cache only: the guest's own mapping stays empty until the VM runs. A page that turns
//! stale at a post-copy switchover therefore needs no unmapping inside the blackout (unmapping,
//! batched, costs ~0.1–1 µs per page here; a 1 GiB anonymous hybrid switch under a writer at
//! full speed unmaps 30k–200k pages); marking it is enough. At the switchover the arrived
//! pages the source names as touched first (`FirstTouch`) are mapped before the VM resumes;
//! after it, the guest's first touch of another page that did arrive is a minor fault resolved
//! locally (`UFFDIO_CONTINUE` of the page and its arrived neighbours, no request). When the
//! last page is here, guest memory is unregistered and the kernel maps page-cache pages on
//! first touch, as it does without post-copy.
//!
//! Every frame is checked against the negotiated memory map before a byte of its payload is
//! read into guest memory. Before the switchover, a failure leaves this VM unstarted (the source
//! still runs it). Once the whole `State` arrived, this side restores and resumes the VM
//! whatever happens to the connection, and from then on owns it: if `Resumed` cannot be sent
//! the VM keeps running here ([`MigrateError::ResumedUnconfirmed`] without recovery). An
//! `Error` sent before `Resumed` promises the source that the VM does not run here and never
//! will (a failed restore, or a failed resume whose vCPUs were paused again); the source then
//! resumes its own, so it is never sent while the VM may run here unannounced.
//!
//! ## Recovery
//!
//! With [`receive_with`] and a [`DestRecovery`], losing the control, a bulk or the urgent stream
//! after resuming the VM does not end the migration. On every resumed session this side first
//! sends `Resumed` again (the source may have lost the first one and kept its VM paused); in
//! stop-and-copy the source then goes on to `Complete`. A loss between `Switchover` and
//! resuming ends the migration here for good (the VM is never resumed), but this side still
//! waits, at most the window, for the source to resume the session and answers `Abort`, so a
//! source that handed over its state learns it may resume its own VM.
//!
//! In post-copy the VM keeps running; a thread that touches a missing page keeps waiting (the
//! fault thread keeps reading events and remembers what it asked for). The destination shuts
//! the old connections down, waits until every receiver of them has stopped, and gives back
//! every page claim whose data did not arrive whole (FILLING becomes STALE: a page is marked
//! present only after all its bytes arrived and were placed). It then waits, at most the
//! recovery window, for the source to resume the same session with the same key
//! (`ferry_transport::session::SessionListener::accept_resume`), sends `Resumed`, then the
//! pages it still lacks as `Missing` ranges (every page not PRESENT), re-sends its outstanding
//! page requests on the new urgent stream, and post-copy carries on to the digest as before.
//! If the window passes it fails with [`MigrateError::NotRecovered`] naming the missing pages;
//! guest memory then stays registered with userfaultfd, so whatever touches a missing page
//! stays blocked instead of reading zeroes.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded, unbounded};
use ferry_protocol::frame::MAX_LIST_RANGES;
use ferry_protocol::frame::{
    FaultSummary, FrameHeader, HEADER_LEN, MAX_FAULT_POINTS, MAX_STATE_LEN, ResumeTimings,
    SwitchoverKind,
};
use ferry_protocol::handshake::SessionId;
use ferry_protocol::memmap::partition;
use ferry_protocol::{Frame, GpaRange};
use ferry_transport::memory::Target;
use ferry_transport::session::{ControlChannel, SessionError};
use ferry_transport::{DataStream, Socket};
use hdrhistogram::Histogram;
use tracing::{debug, info, warn};

use crate::digest;
use crate::error::MigrateError;
use crate::layout::Layout;
use crate::memory::AliasMapping;
use crate::pages::page_hash;
use crate::source::{PRE_STALE_ROUND, SWITCH_ROUND};
use crate::sys;
use crate::uffd::{Event, Features, Fill, PlaceMode, RegisterMode, Uffd};
use crate::vm::{Backing, GuestMemory, VmControl};

/// Hash recorded for a page placed as zeroes: the real hash (xxh3 of 4 KiB of zeroes seeded
/// by the gpa, ~0.3 µs) is computed only for the final digest, after the VM resumed. Hashing
/// every zero page as it arrives made the receivers of a mostly-empty guest lag tens of ms
/// behind the source at the switchover (1 GiB: ~40 ms of blackout). A data page whose real
/// hash is 0 (probability 2^-64) would fail verification, never pass it wrongly.
const ZERO_PAGE: u64 = 0;

/// Stale sets with at least this many ranges are unmapped by two threads: four batched calls
/// or more (see [`sys::discard_many`]); fewer are not worth a thread started inside the blackout
/// (~70–180 µs here).
const PARALLEL_DISCARD_RANGES: usize = 4096;

const ABSENT: u8 = 0;
const PRESENT: u8 = 1;
const STALE: u8 = 2;
const FILLING: u8 = 3;

/// The destination VM, as the engine drives it. Its guest memory must be unused by anything
/// else during the migration and its vCPUs not running.
#[allow(missing_debug_implementations)]
pub struct DestVm<'a> {
    /// Guest memory.
    pub memory: &'a dyn GuestMemory,
    /// vCPU and device control.
    pub control: &'a mut dyn VmControl,
    /// Every byte of guest memory reads as zero and nothing wrote to it since it was
    /// allocated: a VM created for this migration, whose memory may have been allocated ahead
    /// (`fallocate` of a memfd, like QEMU's `-mem-prealloc`). The session then keeps the page
    /// cache of shared-backed regions rather than punching it out at its start, so a
    /// preallocation survives and pages arrive into memory that is already backed. False (a
    /// VM reused after a failed attempt, or memory of unknown content): the session empties
    /// shared-backed memory first (`MADV_REMOVE`), since a page that arrives as zeroes is not
    /// written. Anonymous memory is dropped from its mapping at session start either way.
    pub zeroed: bool,
}

/// The connections of a destination session.
#[allow(missing_debug_implementations)]
pub struct DestStreams {
    /// Control stream.
    pub control: ControlChannel,
    /// Bulk streams.
    pub bulk: Vec<Box<dyn DataStream>>,
    /// The post-copy demand path: where page requests are answered (the urgent stream's
    /// replies, or a fetch from the source's memory), and the socket the fault handler writes
    /// its requests to (a second handle on the urgent stream's socket, or the fetch's).
    pub urgent: Option<(Replies, Socket)>,
    /// Alias mappings of shared-backed regions (index = region), also given to the transport
    /// registration so pushed pages are received straight into them.
    pub aliases: Vec<Option<AliasMapping>>,
    /// Receive memfd regions' pages into their files through the page cache
    /// (`Target::File`; the registration must carry the files) instead of through the alias.
    pub page_cache: bool,
    /// Second handles on the receiving sockets, shut down when the migration ends (or fails)
    /// so no receiver waits on an idle stream.
    pub sockets: Vec<Socket>,
    /// The session these connections belong to.
    pub session: SessionId,
    /// Guest memory was already emptied ([`empty_guest_memory`]) before the transport
    /// registered it (RDMA; pinned in pre-copy): the receiver must not empty it again, or a
    /// pinned registration would write into pages no longer mapped.
    pub prepared: bool,
}

/// How post-copy page requests are answered.
#[derive(Debug)]
pub enum Replies {
    /// The source answers each request on this stream (`PageReply` frames).
    Stream(Box<dyn DataStream>),
    /// The pages are read from the source's memory without its CPU (RDMA READ): the fault
    /// handler's request frames are read back from `requests` (the other end of the socket it
    /// writes to) and each page is fetched by `fetch`.
    Fetch {
        /// Where the requests arrive.
        requests: Socket,
        /// What reads the pages.
        fetch: Box<dyn PageFetch>,
    },
}

/// Post-copy demand fetch without the source's CPU (one-sided RDMA READ): what a transport
/// that can read the source's memory offers the fault path. Used from one thread.
pub trait PageFetch: Send + fmt::Debug {
    /// Starts reading one page, `range`, of the source's memory: `in_place` into its own page
    /// cache (a memfd region: the fetch reads through its own mapping of the file, and the
    /// caller maps the page with `UFFDIO_CONTINUE`), else into a buffer of its own. `Ok(false)`
    /// when no buffer is free: poll and try again.
    fn start(&mut self, range: GpaRange, in_place: bool) -> Result<bool, MigrateError>;

    /// Calls `done` for every read completed since the last call, with its bytes unless it
    /// was in place. Returns how many completed.
    fn poll(&mut self, done: &mut FetchDone<'_>) -> Result<usize, MigrateError>;
}

/// What [`PageFetch::poll`] calls for each completed read: the page, and its bytes unless it
/// was read in place.
pub type FetchDone<'a> = dyn FnMut(GpaRange, Option<&[u8]>) -> Result<(), MigrateError> + 'a;

/// How the destination recovers a migration whose connection was lost after the switchover
/// (see the module docs).
#[allow(missing_debug_implementations)]
pub struct DestRecovery<'r> {
    /// How long to wait for the source to resume the session after a loss.
    pub window: Duration,
    /// Waits at most the given time for the source to resume `session` and returns its new
    /// connections (e.g. [`crate::session::accept_recovery`]); their `aliases` are ignored.
    pub accept: &'r mut dyn FnMut(SessionId, Duration) -> Result<DestStreams, MigrateError>,
}

/// The destination's account of a migration.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DestReport {
    /// `stop-and-copy` or `post-copy`.
    pub switchover: String,
    /// Pre-copy rounds seen.
    pub rounds: u32,
    /// Pages marked stale at a post-copy switchover.
    pub stale_pages: u64,
    /// Destination phases, µs.
    pub receive_us: u64,
    /// Restoring state, µs.
    pub restore_us: u64,
    /// Resuming, µs.
    pub resume_us: u64,
    /// Faults.
    pub faults: FaultSummaryReport,
    /// Whether the digest matched the source's.
    pub verified: bool,
    /// This side's digest, hex.
    pub digest: String,
    /// Pages whose live checksum failed (asked again).
    pub resend_requests: u64,
    /// Post-copy connections lost and recovered.
    pub recoveries: u32,
    /// Time spent without a connection during recoveries, ms.
    pub disconnected_ms: f64,
    /// Pages missing when the first connection was lost (0 without a loss).
    pub missing_at_loss: u64,
}

/// Serializable copy of [`FaultSummary`] (without the samples).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FaultSummaryReport {
    /// Faults.
    pub count: u64,
    /// Median µs.
    pub p50_us: u64,
    /// p99 µs.
    pub p99_us: u64,
    /// Max µs.
    pub max_us: u64,
    /// Summed stall, µs.
    pub total_stall_us: u64,
    /// Faults resolved locally (the page had arrived but was not mapped).
    pub local: u64,
}

struct PostCopy {
    uffd: Uffd,
    /// Set when every page is here and guest memory was unregistered: from then on the kernel
    /// resolves first touches itself (page-cache pages, zero pages).
    released: AtomicBool,
}

/// Most `FirstTouch` ranges the destination keeps at a switchover, and most pages it maps
/// from them (the source sends at most 256 pages).
const MAX_FIRST_TOUCH_RANGES: usize = 256;
/// See [`MAX_FIRST_TOUCH_RANGES`].
const MAX_FIRST_TOUCH_PAGES: u64 = 256;

/// Most pages mapped with one `UFFDIO_CONTINUE` (2 MiB of 4 KiB pages).
const MAP_RUN_PAGES: u64 = 512;
/// Post-copy receives and places pushed pages in pieces of this many pages (see `place_post`).
const POST_PIECE_PAGES: u64 = 64;

/// Arrived pages mapped after a locally resolved fault on a data page, the page included
/// (a guest walking memory then faults once per 256 KiB, not once per page).
const LOCAL_NEIGHBOURHOOD: u64 = 64;

struct Shared<'a> {
    layout: &'a Layout,
    states: Vec<AtomicU8>,
    hashes: Vec<AtomicU64>,
    present: AtomicU64,
    post: OnceLock<PostCopy>,
    /// Alias mappings of shared-backed regions (index = region): everything received for
    /// such a region goes through its alias (see the module docs).
    aliases: Vec<Option<AliasMapping>>,
    /// Staged (memfd) regions are received into their files (`Target::File`), not through
    /// the alias; the alias still serves reads (hashing) and local writes.
    page_cache: bool,
    faults: Mutex<HashMap<u64, Instant>>,
    hist: Mutex<Histogram<u64>>,
    points: Mutex<Vec<(u32, u32)>>,
    resumed_at: OnceLock<Instant>,
    /// The switchover's stale set is applied. The fault path starts before that (inside the
    /// blackout, while the source saves) and must neither resolve a fault nor end (every page
    /// may look present until then) before it.
    stale_applied: AtomicBool,
    resolved_by_push: AtomicU64,
    fault_count: AtomicU64,
    local_faults: AtomicU64,
    stall_us: AtomicU64,
    done: AtomicBool,
    zero_hash_scratch: Vec<u8>,
    /// Write handle on the current urgent stream, handed to the fault thread; replaced after a
    /// recovery (then `urgent_gen` grows).
    urgent_writer: Mutex<Option<Socket>>,
    urgent_gen: AtomicU64,
    /// The bulk receiver threads, raised for a stop-and-copy switchover (its final pages).
    recv_threads: crate::boost::ThreadSet,
}

enum Note {
    Barrier(u32),
    Resend(Vec<GpaRange>),
    /// A connection worker (bulk receiver, reply receiver) stopped with this error.
    Failed(MigrateError),
    /// A connection worker's stream ended cleanly (a bulk receiver's, or the replies').
    Ended {
        /// A bulk receiver.
        bulk: bool,
    },
    /// A failure no reconnection repairs (fault handling, mapping).
    Fatal(MigrateError),
}

/// Receives a VM migrated by the source at the other end of `streams`. Without recovery: a
/// lost connection ends the migration (see [`receive_with`]).
pub fn receive(
    vm: DestVm<'_>,
    streams: DestStreams,
    timeout: Duration,
) -> Result<DestReport, MigrateError> {
    receive_with(vm, streams, timeout, None)
}

/// Receives a VM migrated by the source at the other end of `streams`; with `recovery`, a
/// post-copy migration survives lost connections (see the module docs).
pub fn receive_with(
    vm: DestVm<'_>,
    streams: DestStreams,
    timeout: Duration,
    recovery: Option<DestRecovery<'_>>,
) -> Result<DestReport, MigrateError> {
    let layout = Layout::new(vm.memory)?;
    let total = layout.total_pages();
    let DestStreams {
        control,
        bulk,
        urgent,
        aliases,
        page_cache,
        sockets,
        session,
        prepared,
    } = streams;
    let mut shared = Shared {
        layout: &layout,
        states: (0..total).map(|_| AtomicU8::new(ABSENT)).collect(),
        hashes: (0..total).map(|_| AtomicU64::new(0)).collect(),
        present: AtomicU64::new(0),
        post: OnceLock::new(),
        aliases,
        page_cache,
        faults: Mutex::new(HashMap::new()),
        hist: Mutex::new(
            Histogram::new_with_bounds(1, 60_000_000, 3)
                .map_err(|_| MigrateError::Worker("histogram"))?,
        ),
        points: Mutex::new(Vec::new()),
        resumed_at: OnceLock::new(),
        stale_applied: AtomicBool::new(false),
        resolved_by_push: AtomicU64::new(0),
        fault_count: AtomicU64::new(0),
        local_faults: AtomicU64::new(0),
        stall_us: AtomicU64::new(0),
        done: AtomicBool::new(false),
        zero_hash_scratch: vec![0u8; layout.page_size() as usize],
        urgent_writer: Mutex::new(None),
        urgent_gen: AtomicU64::new(0),
        recv_threads: crate::boost::ThreadSet::default(),
    };
    let n = bulk.len();
    let ctl_reader = control.try_clone()?;
    // Open userfaultfd up front (outside the blackout); registration happens at switchover.
    let uffd = Uffd::open(
        false,
        Features::MISSING_SHMEM | Features::MINOR_SHMEM | Features::THREAD_ID,
    );
    let post_flag = AtomicBool::new(false);
    // Make sure no page is populated before anything arrives (see `apply_stale`), here rather
    // than inside the blackout: on untouched memory this is a page-table walk whose cost grows
    // with guest size. Before the receivers start: the source sends its first round right
    // after the handshake, and a page placed before this ran would be dropped while counted as
    // present (read as zeroes later, or a fault that never resolves).
    if !prepared {
        discard_guest_memory(&layout, vm.zeroed)?;
    }
    let result = thread::scope(|s| {
        let (note_tx, note_rx) = unbounded();
        let (go_tx, go_rx) = bounded::<()>(n.max(1));
        for (i, stream) in bulk.into_iter().enumerate() {
            spawn_receiver(s, i, stream, &shared, &note_tx, go_rx.clone(), &post_flag)?;
        }
        let (ctl_tx, ctl_rx) = unbounded();
        thread::Builder::new()
            .name("ferry-dst-ctl".into())
            .spawn_scoped(s, move || dest_control_reader(ctl_reader, ctl_tx))
            .map_err(|_| MigrateError::Worker("control reader"))?;
        let mut d = DestRun {
            shared: &shared,
            ctl: control,
            sockets,
            session,
            recovery,
            workers: n,
            ctl_rx,
            notes: note_rx,
            note_tx: note_tx.clone(),
            go: go_tx,
            n,
            timeout,
            report: DestReport::default(),
            barriers: 0,
            pre_stale_pages: 0,
            pre_barriers: 0,
            pre_rounds: 0,
            switching: false,
            vm_may_run: false,
            resumed_sent: false,
            error_sent: false,
            timings: None,
        };
        let r = d.drive(vm.control, uffd, urgent, s, &post_flag);
        shared.done.store(true, Ordering::Release);
        // An `Error` before `Resumed` tells the source that this side does not run the VM (it
        // may then resume its own): never send one while the VM may run here unannounced.
        let mut told = d.error_sent;
        if let Err(e) = &r
            && !d.error_sent
            && (!d.vm_may_run || d.resumed_sent)
        {
            told = d
                .ctl
                .send(
                    &Frame::Error {
                        code: 1,
                        message: ferry_protocol::handshake::error_chain(e),
                    },
                    &[],
                )
                .is_ok();
        }
        // Unblocks the control reader (the source sends nothing more after `Verified`) and
        // any receiver still waiting.
        d.ctl.shutdown();
        for s in &d.sockets {
            let _ = s.shutdown();
        }
        match r {
            // The source may have handed over the state and lost the connection: it then
            // resumes the session to learn whether this side runs the VM. It does not, and
            // never will: answer `Abort` if it comes back within the window.
            Err(e)
                if d.switching
                    && !d.vm_may_run
                    && d.recovery.is_some()
                    && (!told || e.is_connection_loss()) =>
            {
                d.give_up(&e);
                Err(e)
            }
            r => r,
        }
    });
    if result.is_err()
        && let Some(post) = shared.post.take()
        && shared.present.load(Ordering::Acquire) < total
    {
        // The VM runs here with pages missing: keep guest memory registered (the descriptor
        // stays open until the process ends), so a thread touching a missing page stays
        // blocked rather than reading a zero page or stale page-cache data.
        warn!(
            missing = total - shared.present.load(Ordering::Acquire),
            "post-copy failed: guest memory stays registered with userfaultfd"
        );
        std::mem::forget(post);
    }
    result
}

/// Starts the receiver of bulk stream `i`; it reports its end as a [`Note`].
fn spawn_receiver<'scope>(
    s: &'scope thread::Scope<'scope, '_>,
    i: usize,
    stream: Box<dyn DataStream>,
    shared: &'scope Shared<'_>,
    note_tx: &Sender<Note>,
    go_rx: Receiver<()>,
    post_flag: &'scope AtomicBool,
) -> Result<(), MigrateError> {
    let note_tx = note_tx.clone();
    thread::Builder::new()
        .name(format!("ferry-recv-{i}"))
        .spawn_scoped(s, move || {
            let _enrolled = shared.recv_threads.enrol();
            crate::warm::thread();
            let r = recv_loop(i, stream, shared, &note_tx, &go_rx, post_flag);
            let _ = note_tx.send(match r {
                Ok(()) => Note::Ended { bulk: true },
                Err(e) => Note::Failed(e),
            });
        })
        .map_err(|_| MigrateError::Worker("receiver"))?;
    Ok(())
}

/// Starts the receiver of urgent page replies (or the fetch of requested pages); it reports
/// its end as a [`Note`]. With `start`, it first waits for the post-copy switchover (and
/// returns without a note if there is none).
fn spawn_reply_receiver<'scope>(
    s: &'scope thread::Scope<'scope, '_>,
    replies: Replies,
    shared: &'scope Shared<'_>,
    note_tx: &Sender<Note>,
    start: Option<Receiver<()>>,
) -> Result<(), MigrateError> {
    let note_tx = note_tx.clone();
    thread::Builder::new()
        .name("ferry-replies".into())
        .spawn_scoped(s, move || {
            raise_priority();
            crate::warm::thread();
            if let Some(start) = start
                && start.recv().is_err()
            {
                return;
            }
            let r = match replies {
                Replies::Stream(stream) => reply_loop(shared, stream),
                Replies::Fetch { requests, fetch } => fetch_loop(shared, requests, fetch),
            };
            let _ = note_tx.send(match r {
                Ok(()) => Note::Ended { bulk: false },
                Err(e) => Note::Failed(e),
            });
        })
        .map_err(|_| MigrateError::Worker("reply receiver"))?;
    Ok(())
}

fn dest_control_reader(ctl: ControlChannel, tx: Sender<Result<(Frame, Vec<u8>), SessionError>>) {
    // Timeouts are the control thread's business; this thread blocks until the socket closes.
    let _ = ctl.set_read_timeout(None);
    // Mostly idle; inside the blackout it delivers the switchover's frames (the state's
    // receive buffer comes from the memory warmed here).
    crate::boost::raise(None);
    crate::warm::thread();
    loop {
        let r = ctl.recv().and_then(|(h, f)| {
            let payload = if h.payload_len > 0 {
                ctl.read_payload_vec(h.payload_len, MAX_STATE_LEN)?
            } else {
                Vec::new()
            };
            Ok((f, payload))
        });
        if let Ok((f, _)) = &r {
            match f {
                Frame::Switchover { .. } => crate::timeline::mark("dst reader got switchover"),
                Frame::State { .. } => crate::timeline::mark("dst reader got state"),
                _ => {}
            }
        }
        let stop = r.is_err();
        if tx.send(r).is_err() || stop {
            return;
        }
    }
}

struct DestRun<'s, 'a, 'r> {
    shared: &'s Shared<'a>,
    /// The current control stream (replaced by a recovery).
    ctl: ControlChannel,
    /// Second handles on the current connections' receiving sockets.
    sockets: Vec<Socket>,
    session: SessionId,
    recovery: Option<DestRecovery<'r>>,
    /// Connection workers (bulk and reply receivers) running; each ends with one
    /// `Note::Ended` or `Note::Failed`.
    workers: usize,
    ctl_rx: Receiver<Result<(Frame, Vec<u8>), SessionError>>,
    notes: Receiver<Note>,
    note_tx: Sender<Note>,
    go: Sender<()>,
    n: usize,
    timeout: Duration,
    report: DestReport,
    barriers: usize,
    /// Pages invalidated before the switchover (hybrid's pre-switch stale set).
    pre_stale_pages: u64,
    /// Pre-switch markers passed by bulk streams (their earlier data is all placed).
    pre_barriers: usize,
    /// Pre-switch drop rounds completed (acknowledged).
    pre_rounds: usize,
    /// `Switchover` arrived: the source may hand over the state (and then, after a loss,
    /// resume the session to learn whether this side runs the VM).
    switching: bool,
    /// `resume` was called and the VM was not paused again: it may run here.
    vm_may_run: bool,
    /// `Resumed` went out on the control stream (anything sent later follows it).
    resumed_sent: bool,
    /// An `Error` frame was sent already.
    error_sent: bool,
    /// The resume's timings, sent in `Resumed` (again on every resumed session).
    timings: Option<ResumeTimings>,
}

impl<'s, 'a, 'r> DestRun<'s, 'a, 'r> {
    fn handle_note(&mut self, note: Note) -> Result<(), MigrateError> {
        match note {
            Note::Barrier(r) if r == SWITCH_ROUND => self.barriers += 1,
            Note::Barrier(r) if r == PRE_STALE_ROUND => self.pre_barriers += 1,
            Note::Barrier(_) => {}
            Note::Ended { .. } => self.workers = self.workers.saturating_sub(1),
            Note::Resend(ranges) => {
                self.report.resend_requests += ranges.len() as u64;
                self.ctl.send(&Frame::Resend { ranges }, &[])?;
            }
            Note::Failed(e) => {
                self.workers = self.workers.saturating_sub(1);
                return Err(e);
            }
            Note::Fatal(e) => return Err(e),
        }
        Ok(())
    }

    /// Next control frame, handling worker notes meanwhile.
    fn next_ctl(&mut self) -> Result<(Frame, Vec<u8>), MigrateError> {
        let mut deadline = Instant::now() + self.timeout;
        let mut present = self.shared.present.load(Ordering::Acquire);
        loop {
            while let Ok(note) = self.notes.try_recv() {
                self.handle_note(note)?;
            }
            match self.ctl_rx.recv_timeout(Duration::from_millis(20)) {
                Ok(r) => return Ok(r?),
                Err(RecvTimeoutError::Timeout) => {
                    // In post-copy the control stream is quiet for the whole push: only a
                    // source that also stopped sending pages is silent.
                    let now_present = self.shared.present.load(Ordering::Acquire);
                    if self.shared.post.get().is_some() && now_present != present {
                        present = now_present;
                        deadline = Instant::now() + self.timeout;
                    }
                    if Instant::now() > deadline {
                        return Err(MigrateError::Timeout {
                            what: "the source",
                            waited: self.timeout,
                        });
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(MigrateError::Worker("control reader"));
                }
            }
        }
    }

    fn wait_until(
        &mut self,
        what: &'static str,
        pred: impl Fn(&Self) -> bool,
    ) -> Result<(), MigrateError> {
        let deadline = Instant::now() + self.timeout;
        while !pred(self) {
            match self.notes.recv_timeout(Duration::from_millis(5)) {
                Ok(note) => self.handle_note(note)?,
                Err(RecvTimeoutError::Timeout) => {
                    if Instant::now() > deadline {
                        return Err(MigrateError::Timeout {
                            what,
                            waited: self.timeout,
                        });
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(MigrateError::Worker("receiver"));
                }
            }
        }
        Ok(())
    }

    fn drive<'scope>(
        &mut self,
        control: &mut dyn VmControl,
        uffd: Result<Uffd, crate::uffd::UffdOpenError>,
        urgent: Option<(Replies, Socket)>,
        s: &'scope thread::Scope<'scope, '_>,
        post_flag: &'scope AtomicBool,
    ) -> Result<DestReport, MigrateError>
    where
        's: 'scope,
    {
        let shared = self.shared;
        let layout = shared.layout;
        let mut uffd = Some(uffd);
        let mut resumed = false;
        let mut post_copy = false;
        // The fault path's threads exist before the switchover (spawning them inside the
        // blackout cost ~70-180 µs here) and wait for `fault_path` to start them. If the
        // migration ends without post-copy, dropping the sender lets them return.
        let has_urgent = urgent.is_some();
        let (fault_path, started) = bounded::<()>(2);
        if let Some((replies, requests)) = urgent {
            shared.set_urgent_writer(requests);
            let note_tx = self.note_tx.clone();
            let go = started.clone();
            thread::Builder::new()
                .name("ferry-faults".into())
                .spawn_scoped(s, move || {
                    raise_priority();
                    crate::warm::thread();
                    if go.recv().is_err() {
                        return;
                    }
                    if let Err(e) = fault_loop(shared) {
                        warn!(%e, "fault handler failed");
                        let _ = note_tx.send(Note::Fatal(e));
                    }
                })
                .map_err(|_| MigrateError::Worker("fault handler"))?;
            spawn_reply_receiver(s, replies, shared, &self.note_tx, Some(started))?;
        }
        // Raised while it waits for the switchover, not only once it has it: at normal
        // priority its wake-up for `Switchover` waited behind the bulk receivers for up to
        // ~2 ms here (pre-copy's final pages keep them busy). It sleeps until a frame comes, and
        // the work it does before the switchover (dropping a hybrid's stale pages) must finish
        // before the switchover anyway. Back to normal once the VM runs, as below.
        let mut waiting = Some(crate::boost::Boost::current());
        // This thread restores and resumes the VM inside the blackout (again at each round, in
        // case something returned the memory since).
        crate::warm::thread();
        loop {
            let (frame, _) = match self.next_ctl() {
                Ok(x) => x,
                Err(e) if resumed && shared.done.load(Ordering::Acquire) => {
                    debug!(%e, "control closed after completion");
                    break;
                }
                Err(e) if resumed && self.can_recover(&e) => {
                    self.recover(e, s, post_flag)?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.switching |= matches!(frame, Frame::Switchover { .. });
            match frame {
                Frame::RoundBegin { round, .. } => {
                    self.report.rounds = round;
                    crate::warm::thread();
                }
                // Hybrid, before the switchover: the source will switch to post-copy and names
                // the pages dirty now; drop them while its VM still runs, so only pages
                // dirtied from here on are dropped inside the blackout.
                Frame::StaleSet { ranges } => {
                    // The control stream can overtake the bulk streams: drop nothing before
                    // every receiver placed its last pre-copy pages (it then passes the marker
                    // of this drain round).
                    self.wait_until(
                        "the bulk streams to drain before dropping stale pages",
                        |d| d.pre_barriers >= d.n * (d.pre_rounds + 1),
                    )?;
                    let t = Instant::now();
                    self.pre_stale_pages += self.invalidate(&ranges)?;
                    debug!(
                        ranges = ranges.len(),
                        pages = self.pre_stale_pages,
                        us = t.elapsed().as_micros() as u64,
                        "pre-switch stale set dropped"
                    );
                }
                // A drain round, before the switchover: the answer says every receiver placed
                // what came before the round's marker (and the stale set sent with it is
                // dropped), so that no backlog of the last rounds lands inside the blackout.
                Frame::RoundEnd { round } if round == PRE_STALE_ROUND => {
                    self.wait_until("the bulk streams to drain before the switchover", |d| {
                        d.pre_barriers >= d.n * (d.pre_rounds + 1)
                    })?;
                    self.pre_rounds += 1;
                    self.ctl.send(&Frame::RoundEnd { round }, &[])?;
                }
                Frame::RoundEnd { .. } | Frame::Progress(_) => {}
                Frame::Switchover { kind, .. } => {
                    let t_sw = Instant::now();
                    crate::timeline::mark("dst main got switchover");
                    // Inside the blackout: this thread and the VM's threads go ahead of the
                    // others until the VM runs.
                    let boost = waiting.take().unwrap_or_else(crate::boost::Boost::current);
                    control.prepare_restore();
                    post_copy = kind == SwitchoverKind::PostCopy;
                    if post_copy && !has_urgent {
                        return Err(MigrateError::Unexpected {
                            got: "Switchover(post-copy)",
                            state: "without an urgent stream",
                        });
                    }
                    // Stop-and-copy: the final pages are still coming on the bulk streams.
                    let recv_raised = (!post_copy).then(|| shared.recv_threads.raise());
                    self.wait_until("the bulk streams to reach the switchover", |d| {
                        d.barriers >= d.n
                    })?;
                    drop(recv_raised);
                    let t_barrier = Instant::now();
                    crate::timeline::mark("dst barrier");
                    if post_copy {
                        // While the source saves: register guest memory with userfaultfd and
                        // start the fault path. Nothing touches the guest mapping before the
                        // state is restored (the receivers are past the marker and wait for
                        // `go`; pages are received through the alias mapping), so no fault
                        // can reach the handler before the stale set below is applied.
                        let uffd = match uffd.take() {
                            Some(Ok(u)) => u,
                            Some(Err(e)) => {
                                return Err(MigrateError::Uffd {
                                    what: ferry_protocol::handshake::error_chain(&e),
                                });
                            }
                            None => return Err(MigrateError::Worker("uffd")),
                        };
                        self.register_post_copy(uffd)?;
                        // Fault handling and urgent replies.
                        for _ in 0..2 {
                            fault_path
                                .send(())
                                .map_err(|_| MigrateError::Worker("fault handler"))?;
                        }
                        self.workers += 1;
                    }
                    let mut next = self.next_ctl()?;
                    if post_copy {
                        let mut stale = Vec::new();
                        let mut first_touch = Vec::new();
                        loop {
                            match &next {
                                (Frame::StaleSet { ranges }, _) => {
                                    for r in ranges {
                                        layout.locate(*r)?;
                                    }
                                    stale.extend_from_slice(ranges);
                                }
                                // A hint, checked against the memory map like every frame.
                                (Frame::FirstTouch { ranges }, _) => {
                                    // Bounded like the source's list: it is mapped inside the
                                    // blackout.
                                    let room =
                                        MAX_FIRST_TOUCH_RANGES.saturating_sub(first_touch.len());
                                    first_touch.extend(ranges.iter().take(room));
                                }
                                _ => break,
                            }
                            next = self.next_ctl()?;
                        }
                        let t_state = Instant::now();
                        crate::timeline::mark("dst main got state");
                        self.report.stale_pages = self.apply_stale(&stale)?;
                        shared.stale_applied.store(true, Ordering::Release);
                        // The arrived pages the vCPUs touch first are mapped now (a few pages,
                        // tens of µs), or each would be a local fault in the guest's first
                        // steps. A thread doing this beside restore, then sweeping everything
                        // at low priority, was measured here to add ~3 ms to most blackouts
                        // (it held the CPU, or mmap_lock, when the control and vCPU threads
                        // needed them).
                        let hot = map_first_touch(shared, &first_touch)?;
                        post_flag.store(true, Ordering::Release);
                        let t_applied = Instant::now();
                        crate::timeline::mark("dst applied");
                        debug!(
                            barrier_us = (t_barrier - t_sw).as_micros() as u64,
                            stale_and_state_us = (t_state - t_barrier).as_micros() as u64,
                            apply_us = (t_applied - t_state).as_micros() as u64,
                            first_touch_mapped = hot,
                            start_us = t_applied.elapsed().as_micros() as u64,
                            "post-copy switchover"
                        );
                    }
                    if !post_copy {
                        debug!(
                            barrier_us = (t_barrier - t_sw).as_micros() as u64,
                            state_us = t_barrier.elapsed().as_micros() as u64,
                            "stop-and-copy switchover"
                        );
                    }
                    for _ in 0..self.n {
                        let _ = self.go.send(());
                    }
                    let blob = match next {
                        (Frame::State { .. }, blob) => blob,
                        (other, _) => {
                            return Err(MigrateError::Unexpected {
                                got: other.command().name(),
                                state: "waiting for the VM state",
                            });
                        }
                    };
                    let t_apply = Instant::now();
                    if let Err(e) = control.restore_state(&blob) {
                        // No vCPU ran: say so before giving up, so the source may resume its VM.
                        let e = MigrateError::vm("restore state")(e);
                        self.refuse_vm(&e, "");
                        return Err(e);
                    }
                    let t_restore = Instant::now();
                    crate::timeline::mark("dst restored");
                    self.vm_may_run = true;
                    if let Err(e) = control.resume() {
                        // Some vCPUs may have started: stop them all before saying this side
                        // does not run the VM. If even that fails, say nothing: the source must
                        // not resume a VM that may run here.
                        let e = MigrateError::vm("resume")(e);
                        match control.pause() {
                            Ok(()) => {
                                self.vm_may_run = false;
                                self.refuse_vm(&e, "; its vCPUs were paused again");
                            }
                            Err(pe) => warn!(
                                error = %pe,
                                "pausing the VM after a failed resume failed: it may run here; not telling the source to resume its own"
                            ),
                        }
                        return Err(e);
                    }
                    let t_resume = Instant::now();
                    crate::timeline::mark("dst resumed");
                    let _ = shared.resumed_at.set(t_resume);
                    resumed = true;
                    let timings = ResumeTimings {
                        receive_us: (t_apply - t_sw).as_micros() as u64,
                        restore_us: (t_restore - t_apply).as_micros() as u64,
                        resume_us: (t_resume - t_restore).as_micros() as u64,
                    };
                    self.report.receive_us = timings.receive_us;
                    self.report.restore_us = timings.restore_us;
                    self.report.resume_us = timings.resume_us;
                    self.report.switchover = if post_copy {
                        "post-copy"
                    } else {
                        "stop-and-copy"
                    }
                    .into();
                    self.timings = Some(timings);
                    // `Resumed` ends the blackout as the source measures it: sent while this
                    // thread is still raised, then back to normal (recovery can take long).
                    let sent = self.ctl.send(&Frame::Resumed { timings }, &[]);
                    drop(boost);
                    match sent {
                        Ok(()) => self.resumed_sent = true,
                        // This side owns the VM now, and keeps it running. With recovery, the
                        // source resumes the session and is told (`Resumed` again).
                        Err(e) => {
                            let e = MigrateError::from(e);
                            if !self.can_recover(&e) {
                                return Err(MigrateError::ResumedUnconfirmed {
                                    missing: layout.total_pages()
                                        - shared.present.load(Ordering::Acquire),
                                    source: Box::new(e),
                                });
                            }
                            self.recover(e, s, post_flag)?;
                        }
                    }
                    crate::timeline::mark("dst resumed sent");
                    info!(?timings, post_copy, "resumed");
                }
                Frame::Complete { digest: theirs, .. } => match self.complete(theirs, post_copy) {
                    // The source closes the streams next.
                    Ok(()) => break,
                    Err(e) if self.can_recover(&e) => {
                        self.recover(e, s, post_flag)?;
                    }
                    Err(e) => return Err(e),
                },
                Frame::Abort { reason } => return Err(MigrateError::PeerAborted { reason }),
                Frame::Error { message, .. } => {
                    return Err(MigrateError::PeerAborted { reason: message });
                }
                other => {
                    return Err(MigrateError::Unexpected {
                        got: other.command().name(),
                        state: "receiving (destination)",
                    });
                }
            }
        }
        // Wait for the bulk streams' EndOfStream (bounded).
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut ended = 0;
        while ended < self.n && Instant::now() < deadline {
            match self.notes.recv_timeout(Duration::from_millis(50)) {
                Ok(Note::Ended { bulk: true }) => ended += 1,
                Ok(Note::Failed(e)) => debug!(%e, "stream ended with an error after completion"),
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        Ok(self.report.clone())
    }

    /// Tells the source that this side does not run the VM and never will (an `Error` before
    /// `Resumed`): the source may then resume its own.
    fn refuse_vm(&mut self, e: &MigrateError, what: &str) {
        let message = format!(
            "{}{what}; the VM does not run on the destination",
            ferry_protocol::handshake::error_chain(e)
        );
        warn!(%message, "giving the VM up");
        self.error_sent = self
            .ctl
            .send(&Frame::Error { code: 1, message }, &[])
            .is_ok();
    }

    /// After a failure between `Switchover` and resuming that the source may not have heard
    /// of (a lost connection): this side never resumes the VM. Waits, at most the recovery
    /// window, for the source to resume the session, and answers `Abort` so it may resume its
    /// own VM (without that answer it keeps it paused).
    fn give_up(&mut self, cause: &MigrateError) {
        let Some(rec) = self.recovery.as_mut() else {
            return;
        };
        let end = Instant::now() + rec.window;
        let reason = format!(
            "The destination never resumed the VM and never will ({})",
            ferry_protocol::handshake::error_chain(cause)
        );
        warn!(window = ?rec.window, %reason, "waiting for the source to resume the session, to tell it");
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                warn!(
                    "the source did not resume the session: it was not told that the VM does not run here"
                );
                return;
            }
            match (rec.accept)(self.session, left) {
                Ok(st) => {
                    let sent = st.control.send(
                        &Frame::Abort {
                            reason: reason.clone(),
                        },
                        &[],
                    );
                    // Let the source read it and close first (bounded).
                    if sent.is_ok() {
                        let _ = st.control.set_read_timeout(Some(Duration::from_secs(2)));
                        while st.control.recv().is_ok() {}
                    }
                    st.control.shutdown();
                    for sock in &st.sockets {
                        let _ = sock.shutdown();
                    }
                    match sent {
                        Ok(()) => {
                            info!("told the resumed session that the VM does not run here");
                            return;
                        }
                        Err(e) => debug!(%e, "telling the source failed; waiting again"),
                    }
                }
                Err(e) => {
                    debug!(%e, "no resumption yet");
                    thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// Whether `e`, after the VM was resumed here, is a lost connection this side may recover.
    fn can_recover(&self, e: &MigrateError) -> bool {
        self.recovery.is_some() && e.is_connection_loss()
    }

    /// Recovers a post-copy migration after losing a connection (see the module docs), again
    /// if the resumed connection is lost before the missing pages were named.
    fn recover<'scope>(
        &mut self,
        cause: MigrateError,
        s: &'scope thread::Scope<'scope, '_>,
        post_flag: &'scope AtomicBool,
    ) -> Result<(), MigrateError>
    where
        's: 'scope,
    {
        let mut cause = cause;
        loop {
            match self.recover_once(cause, s, post_flag) {
                Err(e) if self.can_recover(&e) => cause = e,
                r => return r,
            }
        }
    }

    /// One recovery: ends the old connections and their workers, gives back half-received
    /// claims, waits for the source to resume the session within the window, names the
    /// missing pages, and starts the new connections' workers. Fails with
    /// [`MigrateError::NotRecovered`].
    fn recover_once<'scope>(
        &mut self,
        cause: MigrateError,
        s: &'scope thread::Scope<'scope, '_>,
        post_flag: &'scope AtomicBool,
    ) -> Result<(), MigrateError>
    where
        's: 'scope,
    {
        let shared = self.shared;
        let total = shared.layout.total_pages();
        let t_lost = Instant::now();
        let Some(window) = self.recovery.as_ref().map(|r| r.window) else {
            return Err(cause);
        };
        warn!(
            error = %ferry_protocol::handshake::error_chain(&cause),
            missing = total - shared.present.load(Ordering::Acquire),
            "post-copy connection lost; waiting for the source to resume the session"
        );
        // End every old connection, so each of its workers stops, and wait for them: after
        // that nobody holds a page claim.
        self.ctl.shutdown();
        for sock in self.sockets.drain(..) {
            let _ = sock.shutdown();
        }
        shared.clear_urgent_writer();
        let drain_deadline = Instant::now() + Duration::from_secs(10);
        while self.workers > 0 {
            match self.notes.recv_timeout(Duration::from_millis(20)) {
                Ok(Note::Ended { .. }) => self.workers -= 1,
                Ok(Note::Failed(e)) => {
                    self.workers -= 1;
                    if !e.is_connection_loss() {
                        return Err(e);
                    }
                    debug!(%e, "old connection worker stopped");
                }
                Ok(Note::Fatal(e)) => return Err(e),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) if Instant::now() < drain_deadline => {}
                Err(_) => return Err(MigrateError::Worker("receiver (did not stop)")),
            }
        }
        // A page claimed by a receiver whose stream died before all its bytes arrived was
        // never placed (placing happens only after the whole page is in): missing again.
        for st in &shared.states {
            let _ = st.compare_exchange(FILLING, STALE, Ordering::AcqRel, Ordering::Acquire);
        }
        let missing_now = total - shared.present.load(Ordering::Acquire);
        if self.report.recoveries == 0 {
            self.report.missing_at_loss = missing_now;
        }
        let not_recovered = |missing: u64, source: MigrateError| MigrateError::NotRecovered {
            missing,
            window,
            source: Box::new(source),
        };
        let end = t_lost + window;
        let streams = loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(not_recovered(
                    total - shared.present.load(Ordering::Acquire),
                    cause,
                ));
            }
            let Some(rec) = self.recovery.as_mut() else {
                return Err(cause);
            };
            match (rec.accept)(self.session, left) {
                Ok(st) if st.session == self.session => break st,
                Ok(st) => {
                    warn!(session = %st.session, "a different session connected; still waiting");
                    st.control.shutdown();
                    for sock in &st.sockets {
                        let _ = sock.shutdown();
                    }
                }
                Err(e) => {
                    debug!(%e, "no resumption yet");
                    if Instant::now() >= end {
                        return Err(not_recovered(
                            total - shared.present.load(Ordering::Acquire),
                            cause,
                        ));
                    }
                    thread::sleep(Duration::from_millis(50));
                }
            }
        };
        self.start_connection(streams, s, post_flag)?;
        // First: this side runs the VM (the source may have missed the first `Resumed`).
        let timings = self.timings.unwrap_or_default();
        self.ctl.send(&Frame::Resumed { timings }, &[])?;
        self.resumed_sent = true;
        if shared.post.get().is_none() {
            // Stop-and-copy: every page is here; the source goes on to `Complete`.
            let gap = t_lost.elapsed();
            self.report.recoveries += 1;
            self.report.disconnected_ms += gap.as_secs_f64() * 1000.0;
            info!(
                disconnected_ms = gap.as_millis() as u64,
                "session resumed after the switchover"
            );
            return Ok(());
        }
        // Every page not placed, as ranges, in order.
        let missing = shared.missing_ranges();
        let pages: u64 = missing.iter().map(|r| r.len).sum::<u64>() / shared.layout.page_size();
        let mut chunks = missing.chunks(MAX_LIST_RANGES).peekable();
        if chunks.peek().is_none() {
            self.ctl.send(
                &Frame::Missing {
                    ranges: Vec::new(),
                    last: true,
                },
                &[],
            )?;
        }
        while let Some(c) = chunks.next() {
            self.ctl.send(
                &Frame::Missing {
                    ranges: c.to_vec(),
                    last: chunks.peek().is_none(),
                },
                &[],
            )?;
        }
        let gap = t_lost.elapsed();
        self.report.recoveries += 1;
        self.report.disconnected_ms += gap.as_secs_f64() * 1000.0;
        info!(
            missing_pages = pages,
            ranges = missing.len(),
            disconnected_ms = gap.as_millis() as u64,
            "post-copy session resumed"
        );
        Ok(())
    }

    /// Adopts a resumed session's connections: a new control reader, one receiver per bulk
    /// stream, the reply receiver, and the urgent writer for the fault thread (which then
    /// re-sends its outstanding requests).
    fn start_connection<'scope>(
        &mut self,
        streams: DestStreams,
        s: &'scope thread::Scope<'scope, '_>,
        post_flag: &'scope AtomicBool,
    ) -> Result<(), MigrateError>
    where
        's: 'scope,
    {
        let shared = self.shared;
        let DestStreams {
            control,
            bulk,
            urgent,
            sockets,
            ..
        } = streams;
        let post = shared.post.get().is_some();
        let urgent = match urgent {
            Some(u) if post => Some(u),
            None if post => {
                return Err(MigrateError::Unexpected {
                    got: "a resumed session",
                    state: "without an urgent stream",
                });
            }
            // Stop-and-copy: no page is requested; its socket is shut down with the others.
            _ => None,
        };
        let reader = control.try_clone()?;
        let (ctl_tx, ctl_rx) = unbounded();
        thread::Builder::new()
            .name("ferry-dst-ctl".into())
            .spawn_scoped(s, move || dest_control_reader(reader, ctl_tx))
            .map_err(|_| MigrateError::Worker("control reader"))?;
        self.ctl = control;
        self.ctl_rx = ctl_rx;
        self.sockets = sockets;
        self.n = bulk.len();
        // Resumed sessions carry no switchover marker: receivers never wait on `go`.
        let (_, no_go) = bounded::<()>(0);
        for (i, stream) in bulk.into_iter().enumerate() {
            spawn_receiver(
                s,
                i,
                stream,
                shared,
                &self.note_tx,
                no_go.clone(),
                post_flag,
            )?;
            self.workers += 1;
        }
        if let Some((replies, requests)) = urgent {
            spawn_reply_receiver(s, replies, shared, &self.note_tx, None)?;
            self.workers += 1;
            shared.set_urgent_writer(requests);
        }
        Ok(())
    }

    /// `Complete` from the source: waits for every page, compares the digests, answers with
    /// the fault statistics (post-copy) and the verdict.
    fn complete(&mut self, theirs: [u8; 16], post_copy: bool) -> Result<(), MigrateError> {
        let shared = self.shared;
        let layout = shared.layout;
        let total = layout.total_pages();
        self.wait_until("every page to arrive", |d| {
            d.shared.present.load(Ordering::Acquire) >= total
        })?;
        shared.done.store(true, Ordering::Release);
        let ours = digest::digest_of(shared.hashes.iter().enumerate().map(|(p, h)| {
            match h.load(Ordering::Acquire) {
                ZERO_PAGE => shared.zero_hash(layout.page_gpa(p as u64)),
                h => h,
            }
        }));
        let ok = ours == theirs;
        self.report.verified = ok;
        self.report.digest = digest::hex(&ours);
        if post_copy {
            let f = self.fault_summary();
            self.report.faults = FaultSummaryReport {
                count: f.count,
                p50_us: f.p50_us,
                p99_us: f.p99_us,
                max_us: f.max_us,
                total_stall_us: f.total_stall_us,
                local: f.local,
            };
            self.ctl.send(&Frame::FaultStats(f), &[])?;
        }
        self.ctl.send(&Frame::Verified { ok, digest: ours }, &[])?;
        if !ok {
            warn!(ours = %digest::hex(&ours), theirs = %digest::hex(&theirs), "digest mismatch");
        }
        Ok(())
    }

    /// Marks `ranges` stale and drops their pages from guest memory; returns the page count.
    fn invalidate(&mut self, ranges: &[GpaRange]) -> Result<u64, MigrateError> {
        let shared = self.shared;
        let layout = shared.layout;
        let ps = layout.page_size();
        let mut pages = 0;
        // Pages of shared-backed regions were received into the page cache only and were never
        // mapped in guest memory: marking them is enough. The others are unmapped: their gpas
        // (for errors) and host ranges.
        let mut gpas = Vec::new();
        let mut unmap = Vec::new();
        for r in ranges {
            let (region, _, first) = layout.locate(*r)?;
            let n = r.len / ps;
            for p in first..first + n {
                if shared.states[p as usize].swap(STALE, Ordering::AcqRel) == PRESENT {
                    shared.present.fetch_sub(1, Ordering::AcqRel);
                }
            }
            pages += n;
            if !shared.staged(region) {
                gpas.push(r.gpa);
                unmap.push((layout.host_addr(*r)?, r.len));
            }
        }
        // Unmapping costs page-table work per page and a TLB flush per call: `discard_many`
        // batches 1,024 ranges per call (~0.1–1 µs per page here, against ~2–12 µs one call
        // per page). With many ranges, split it over two threads (the destination VM is not
        // running, so the other core is free).
        let discard_all = |host: &[(usize, u64)], gpas: &[u64]| -> Result<(), MigrateError> {
            // SAFETY: page-aligned ranges (checked by `host_addr`'s locate), each inside one
            // region's mapping, of guest memory of a VM that is not running here; the engine
            // owns its contents during the migration and nobody holds references into it.
            unsafe { sys::discard_many(host) }.map_err(|(i, source)| MigrateError::Place {
                gpa: gpas.get(i).copied().unwrap_or_default(),
                source,
            })
        };
        if unmap.len() >= PARALLEL_DISCARD_RANGES {
            let half = unmap.len() / 2;
            let ((ha, hb), (ga, gb)) = (unmap.split_at(half), gpas.split_at(half));
            thread::scope(|s| {
                let h = s.spawn(|| discard_all(hb, gb));
                let ra = discard_all(ha, ga);
                let rb = h.join().map_err(|_| MigrateError::Worker("discard"))?;
                ra.and(rb)
            })?;
        } else {
            discard_all(&unmap, &gpas)?;
        }
        Ok(pages)
    }

    /// Marks the stale pages, makes sure no page the engine will place is populated (only
    /// regions without an alias can be: the others were received into the page cache), and
    /// registers userfaultfd.
    ///
    /// userfaultfd reports a fault only on a page that is not mapped (MISSING) or, for shared
    /// memory registered MINOR, not mapped but in the page cache. A page that something else
    /// populated (a pinning registration, a stray write) never faults: the guest would read
    /// whatever is there, and placing our data later fails with `EEXIST` (anonymous memory),
    /// so it never lands. Every page not PRESENT of a region received into guest memory is
    /// therefore dropped from the mapping here (`MADV_DONTNEED`), just before registering:
    /// anonymous pages become missing. Memfd regions are received into the page cache only
    /// (see [`Shared::staged`]), so their guest mapping holds nothing the engine wrote: their
    /// stale pages are only marked. This relies on nothing else populating the destination's
    /// guest mapping before the VM runs (the `DestVm` contract: unused by anything else, not
    /// running); session start drops whatever was there.
    fn apply_stale(&mut self, stale: &[GpaRange]) -> Result<u64, MigrateError> {
        let shared = self.shared;
        let layout = shared.layout;
        let ps = layout.page_size();
        let t0 = Instant::now();
        let pages;
        if shared.present.load(Ordering::Acquire) == 0 {
            // Pure post-copy: nothing was received, every page is ABSENT (which claims and the
            // fault handler treat like STALE), and `drive` dropped every region whole before
            // anything arrived.
            pages = stale.iter().map(|r| r.len / ps).sum();
        } else {
            pages = self.invalidate(stale)?;
            // Pages never received (ABSENT) outside the stale set are missing too; there are
            // none once a full first round arrived, so walk the states only if some exist.
            let present = shared.present.load(Ordering::Acquire);
            if layout.total_pages() - present > pages + self.pre_stale_pages {
                for (i, r) in layout.regions().iter().enumerate() {
                    if shared.staged(i) {
                        continue;
                    }
                    let first = layout.first_pages()[i];
                    let mut q = 0;
                    while q < r.pages() {
                        if shared.states[(first + q) as usize].load(Ordering::Acquire) != ABSENT {
                            q += 1;
                            continue;
                        }
                        let start = q;
                        while q < r.pages()
                            && shared.states[(first + q) as usize].load(Ordering::Acquire) == ABSENT
                        {
                            q += 1;
                        }
                        discard(layout, r.gpa + start * ps, (q - start) * ps)?;
                    }
                }
            }
        }
        debug!(
            pages,
            ranges = stale.len(),
            discard_us = t0.elapsed().as_micros() as u64,
            "stale set applied"
        );
        Ok(pages)
    }

    /// Registers guest memory with userfaultfd for post-copy (MISSING, and MINOR where the
    /// backing is shared) and publishes it to the fault path.
    fn register_post_copy(&mut self, uffd: Uffd) -> Result<(), MigrateError> {
        let shared = self.shared;
        let layout = shared.layout;
        let t0 = Instant::now();
        for r in layout.regions() {
            let shared_backing =
                matches!(r.backing, Backing::Memfd { .. } | Backing::Hugetlbfs { .. });
            let mode = if shared_backing {
                RegisterMode::MISSING | RegisterMode::MINOR
            } else {
                RegisterMode::MISSING
            };
            // SAFETY: guest memory the engine manages for the migration: nothing holds Rust
            // references into it, and the VM is not running yet.
            unsafe { uffd.register(r.host_addr as u64, r.len, mode) }.map_err(|e| {
                MigrateError::Uffd {
                    what: ferry_protocol::handshake::error_chain(&e),
                }
            })?;
        }
        let _ = shared.post.set(PostCopy {
            uffd,
            released: AtomicBool::new(false),
        });
        debug!(
            register_us = t0.elapsed().as_micros() as u64,
            "guest memory registered with userfaultfd"
        );
        Ok(())
    }

    fn fault_summary(&self) -> FaultSummary {
        let s = self.shared;
        let h = s.hist.lock().map(|h| h.clone()).ok();
        let q = |p: f64| h.as_ref().map_or(0, |h| h.value_at_quantile(p));
        let mut points = s.points.lock().map(|p| p.clone()).unwrap_or_default();
        points.truncate(MAX_FAULT_POINTS);
        FaultSummary {
            count: s.fault_count.load(Ordering::Relaxed),
            p50_us: q(0.5),
            p90_us: q(0.9),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: h.as_ref().map_or(0, Histogram::max),
            total_stall_us: s.stall_us.load(Ordering::Relaxed),
            resolved_by_push: s.resolved_by_push.load(Ordering::Relaxed),
            local: s.local_faults.load(Ordering::Relaxed),
            points,
        }
    }
}

impl Shared<'_> {
    /// Hands the fault thread a new urgent stream to write requests on.
    fn set_urgent_writer(&self, socket: Socket) {
        if let Ok(mut w) = self.urgent_writer.lock() {
            *w = Some(socket);
        }
        self.urgent_gen.fetch_add(1, Ordering::AcqRel);
    }

    /// Takes the urgent writer away (its connection is gone).
    fn clear_urgent_writer(&self) {
        if let Ok(mut w) = self.urgent_writer.lock() {
            *w = None;
        }
    }

    /// Every page not PRESENT, as ranges in guest-physical order.
    fn missing_ranges(&self) -> Vec<GpaRange> {
        let layout = self.layout;
        let ps = layout.page_size();
        let mut out: Vec<GpaRange> = Vec::new();
        for (i, r) in layout.regions().iter().enumerate() {
            let first = layout.first_pages()[i];
            for q in 0..r.pages() {
                if self.states[(first + q) as usize].load(Ordering::Acquire) == PRESENT {
                    continue;
                }
                let gpa = r.gpa + q * ps;
                match out.last_mut() {
                    // Never across a region boundary (a range lies in one region).
                    Some(l) if q > 0 && l.gpa + l.len == gpa => l.len += ps,
                    _ => out.push(GpaRange::new(gpa, ps)),
                }
            }
        }
        out
    }

    /// Records page `p` as placed with hash `h`; accounts for a waiting fault.
    fn placed(&self, p: u64, h: u64, by_push: bool) {
        self.hashes[p as usize].store(h, Ordering::Release);
        if self.states[p as usize].swap(PRESENT, Ordering::AcqRel) != PRESENT {
            self.present.fetch_add(1, Ordering::AcqRel);
        }
        if self.post.get().is_none() {
            // No faults before post-copy: skip the lock on the pre-copy path.
            return;
        }
        let waited = self.faults.lock().ok().and_then(|mut f| f.remove(&p));
        if let Some(t0) = waited {
            let us = t0.elapsed().as_micros() as u64;
            if let Ok(mut hist) = self.hist.lock() {
                hist.saturating_record(us.max(1));
            }
            self.fault_count.fetch_add(1, Ordering::Relaxed);
            self.stall_us.fetch_add(us, Ordering::Relaxed);
            if by_push {
                self.resolved_by_push.fetch_add(1, Ordering::Relaxed);
            }
            if let (Ok(mut pts), Some(r)) = (self.points.lock(), self.resumed_at.get())
                && pts.len() < MAX_FAULT_POINTS
            {
                let t = t0.saturating_duration_since(*r).as_millis() as u32;
                pts.push((t, us.min(u64::from(u32::MAX)) as u32));
            }
        }
    }

    fn claim(&self, p: u64) -> bool {
        self.claim_from(p).is_some()
    }

    /// Like [`Shared::claim`], returning the state the page had (`ABSENT`: it never arrived;
    /// `STALE`: an older version is in memory).
    fn claim_from(&self, p: u64) -> Option<u8> {
        let st = &self.states[p as usize];
        if st
            .compare_exchange(STALE, FILLING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            Some(STALE)
        } else if st
            .compare_exchange(ABSENT, FILLING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            Some(ABSENT)
        } else {
            None
        }
    }

    fn zero_hash(&self, gpa: u64) -> u64 {
        page_hash(gpa, &self.zero_hash_scratch)
    }

    /// The post-copy state (userfaultfd), set at a post-copy switchover.
    fn post(&self) -> Result<&PostCopy, MigrateError> {
        self.post
            .get()
            .ok_or(MigrateError::Worker("post-copy state"))
    }

    /// The alias mapping of region `region`, if it has one.
    fn alias(&self, region: usize) -> Option<&AliasMapping> {
        self.aliases.get(region).and_then(Option::as_ref)
    }

    /// Whether region `region` is received through its alias (into the page cache only): memfd
    /// regions. hugetlbfs regions keep the alias for post-copy placement only (local mapping
    /// of arrived pages assumes 4 KiB pages and `UFFDIO_ZEROPAGE`, which hugetlbfs lacks).
    fn staged(&self, region: usize) -> bool {
        self.alias(region).is_some()
            && matches!(
                self.layout.regions().get(region).map(|r| &r.backing),
                Some(Backing::Memfd { .. })
            )
    }

    /// How the transport receives into a staged region. Pages arriving for the first time
    /// (`fresh`) go into the file through the page cache when enabled: allocating them there
    /// costs no page fault. Pages received before are allocated and mapped in the alias
    /// already; receiving through the alias is then cheaper than `splice` (measured here: 1 GiB
    /// twice over loopback, receiving thread's CPU, second pass 0.17 s through the mapping
    /// against 0.30 s by splice; first pass 0.59 s by splice against 0.95 s).
    fn staged_target(&self, fresh: bool) -> Target {
        if self.page_cache && fresh {
            Target::File
        } else {
            Target::Alias
        }
    }

    /// Where data for `range` (inside one region, checked) is written before the VM runs, and
    /// how the transport writes it: through the alias (or into the file behind it, see
    /// [`Shared::staged_target`]; the range's first page decides) when the region has one,
    /// else into guest memory. The address is in the mapping that shows the bytes.
    fn landing(&self, range: GpaRange) -> Result<(usize, Target), MigrateError> {
        let (region, off, first) = self.layout.locate(range)?;
        Ok(match self.alias(region) {
            // `off` < region length, which fits the address space (the alias maps it all).
            Some(a) if self.staged(region) => {
                let fresh = self.states[first as usize].load(Ordering::Acquire) == ABSENT;
                (a.addr() as usize + off as usize, self.staged_target(fresh))
            }
            _ => (self.layout.host_addr(range)?, Target::Guest),
        })
    }

    /// The received bytes of `range` (see [`Shared::landing`]), for hashing.
    fn landed(&self, range: GpaRange) -> Result<&[u8], MigrateError> {
        let (addr, _) = self.landing(range)?;
        // SAFETY: `landing` checked that the range lies in one region and returned its address
        // in a mapping that covers the whole region and lives as long as `self` (the guest
        // memory or its alias). Only the caller writes these pages now: before the VM runs, a
        // page travels on one stream; in post-copy the caller claimed them (FILLING) and the
        // guest cannot see them yet. The bytes are plain data.
        Ok(unsafe { std::slice::from_raw_parts(addr as *const u8, range.len as usize) })
    }
}

/// The post-copy fault path (fault reader, requester, reply placer) must not queue behind bulk
/// receivers or vCPUs for the CPU: raise its threads' priority (needs `CAP_SYS_NICE`).
fn raise_priority() {
    use ferry_transport::urgent::{Priority, raise_thread_priority};
    if let Err(e) = raise_thread_priority(Priority::default()) {
        debug!(%e, "fault-path thread keeps normal priority");
    }
}

fn stream_err(stream: usize) -> impl Fn(ferry_transport::StreamError) -> MigrateError {
    move |source| MigrateError::Stream { stream, source }
}

/// Reads one frame (header + metadata) from a data stream and checks its ranges.
fn read_frame(
    i: usize,
    stream: &mut dyn DataStream,
    layout: &Layout,
) -> Result<(FrameHeader, Frame), MigrateError> {
    let mut h = [0u8; HEADER_LEN];
    stream.recv_exact(&mut h).map_err(stream_err(i))?;
    let header =
        FrameHeader::decode(&h).map_err(|source| MigrateError::Decode { stream: i, source })?;
    let mut meta = vec![0u8; header.meta_len as usize];
    stream.recv_exact(&mut meta).map_err(stream_err(i))?;
    let frame = Frame::decode(&header, &meta)
        .map_err(|source| MigrateError::Decode { stream: i, source })?;
    frame
        .check_ranges(layout.map())
        .map_err(|source| MigrateError::Range { stream: i, source })?;
    Ok((header, frame))
}

fn recv_loop(
    i: usize,
    mut stream: Box<dyn DataStream>,
    shared: &Shared<'_>,
    notes: &Sender<Note>,
    go: &Receiver<()>,
    post_flag: &AtomicBool,
) -> Result<(), MigrateError> {
    let layout = shared.layout;
    let ps = layout.page_size();
    let mut staging: Vec<u8> = Vec::new();
    loop {
        let (_, frame) = read_frame(i, stream.as_mut(), layout)?;
        let post = post_flag.load(Ordering::Acquire);
        match frame {
            Frame::Pages {
                ranges,
                checksums,
                last,
            } => {
                if last {
                    crate::timeline::mark("dst stream got final pages");
                }
                if post {
                    place_post(
                        i,
                        stream.as_mut(),
                        shared,
                        &ranges,
                        checksums.as_deref(),
                        &mut staging,
                        true,
                    )?;
                    continue;
                }
                // Consecutive ranges with the same landing mapping in one receive.
                let mut a = 0;
                while a < ranges.len() {
                    let target = shared.landing(ranges[a])?.1;
                    let mut b = a + 1;
                    while b < ranges.len() && shared.landing(ranges[b])?.1 == target {
                        b += 1;
                    }
                    stream
                        .recv_into(&ranges[a..b], target)
                        .map_err(stream_err(i))?;
                    a = b;
                }
                let mut k = 0usize;
                let mut resend = Vec::new();
                for r in &ranges {
                    let (_, _, first) = layout.locate(*r)?;
                    let bytes = shared.landed(*r)?;
                    for (j, page) in bytes.chunks_exact(ps as usize).enumerate() {
                        let gpa = r.gpa + j as u64 * ps;
                        let h = page_hash(gpa, page);
                        if let Some(c) = &checksums
                            && c[k] != h
                        {
                            if last {
                                return Err(MigrateError::Checksum {
                                    gpa,
                                    expected: c[k],
                                    got: h,
                                });
                            }
                            resend.push(GpaRange::new(gpa, ps));
                        }
                        k += 1;
                        shared.placed(first + j as u64, h, true);
                    }
                }
                if !resend.is_empty() {
                    let _ = notes.send(Note::Resend(resend));
                }
            }
            Frame::ZeroPages { ranges } => {
                for r in &ranges {
                    let (_, _, first) = layout.locate(*r)?;
                    for j in 0..r.len / ps {
                        let p = first + j;
                        let gpa = r.gpa + j * ps;
                        if post {
                            if shared.claim(p) {
                                place_zero_post(shared, p, gpa)?;
                            }
                            continue;
                        }
                        if shared.states[p as usize].load(Ordering::Acquire) != ABSENT {
                            // It held data before (a stale page of a shared-backed region still
                            // holds it in the page cache): clear it.
                            let (addr, _) = shared.landing(GpaRange::new(gpa, ps))?;
                            // SAFETY: a checked page of guest memory; the VM is not running
                            // (pre-copy) and the engine owns the contents during migration.
                            unsafe { std::ptr::write_bytes(addr as *mut u8, 0, ps as usize) };
                        }
                        shared.placed(p, ZERO_PAGE, true);
                    }
                }
            }
            Frame::CompressedPages {
                ranges,
                compressed_len,
            } => {
                let mut comp = vec![0u8; compressed_len as usize];
                stream.recv_exact(&mut comp).map_err(stream_err(i))?;
                let raw: u64 = ranges.iter().map(|r| r.len).sum();
                let data = zstd::bulk::decompress(&comp, raw as usize).map_err(|e| {
                    MigrateError::Compression {
                        stream: i,
                        message: e.to_string(),
                    }
                })?;
                if data.len() as u64 != raw {
                    return Err(MigrateError::Compression {
                        stream: i,
                        message: format!("decompressed {} bytes, expected {raw}", data.len()),
                    });
                }
                let mut off = 0usize;
                for r in &ranges {
                    let (_, _, first) = layout.locate(*r)?;
                    for j in 0..r.len / ps {
                        let gpa = r.gpa + j * ps;
                        let page = &data[off..off + ps as usize];
                        off += ps as usize;
                        let p = first + j;
                        if post {
                            if shared.claim(p) {
                                place_bytes_post(shared, gpa, page)?;
                                shared.placed(p, page_hash(gpa, page), true);
                            }
                            continue;
                        }
                        let (addr, _) = shared.landing(GpaRange::new(gpa, ps))?;
                        // SAFETY: a checked page of guest memory (or its alias), `page` is a
                        // separate buffer of exactly one page; the VM is not running during
                        // pre-copy receive.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                page.as_ptr(),
                                addr as *mut u8,
                                page.len(),
                            )
                        };
                        shared.placed(p, page_hash(gpa, page), true);
                    }
                }
            }
            Frame::RoundEnd { round } => {
                if round == SWITCH_ROUND {
                    crate::timeline::mark("dst stream got marker");
                }
                let _ = notes.send(Note::Barrier(round));
                if round == SWITCH_ROUND {
                    // Wait until the control thread applied the switchover.
                    let _ = go.recv();
                    if post_flag.load(Ordering::Acquire) {
                        // Post-copy: the guest is about to run on this memory, and the source
                        // switched this stream to in-band payload before the switchover (its
                        // marker is here already): revoke its direct access now, whether or
                        // not a post-copy frame ever comes on this stream. (A resumed
                        // session's streams carry no direct placement to revoke.)
                        stream.end_direct_placement().map_err(stream_err(i))?;
                    }
                }
            }
            Frame::EndOfStream => return Ok(()),
            other => {
                return Err(MigrateError::Unexpected {
                    got: other.command().name(),
                    state: "receiving pages",
                });
            }
        }
    }
}

/// Post-copy placement of a `Pages` frame (bulk push or urgent reply): claims each page;
/// claimed pages of shared backings are received straight into the alias mapping and mapped
/// with `UFFDIO_CONTINUE`; anonymous ones go through a staging buffer and `UFFDIO_COPY`; each
/// run of consecutive claimed pages is placed with one ioctl. Pages already placed (the other
/// path won the race) are read and dropped.
fn place_post(
    i: usize,
    stream: &mut dyn DataStream,
    shared: &Shared<'_>,
    ranges: &[GpaRange],
    checksums: Option<&[u64]>,
    staging: &mut Vec<u8>,
    by_push: bool,
) -> Result<(), MigrateError> {
    let layout = shared.layout;
    let ps = layout.page_size();
    let post = shared.post()?;
    let mut k = 0usize;
    // Claimed, received and placed in pieces of POST_PIECE_PAGES, not a whole range (up to a
    // 4 MiB chunk): a fault on a claimed page waits for its piece only, and the receiving
    // thread leaves the kernel between pieces. On this host's non-preemptible kernel a 4 MiB
    // receive into unallocated memory held a CPU for milliseconds (allocating each page), while
    // a vCPU thread woken from its fault waited for that CPU.
    for r in &partition(ranges, POST_PIECE_PAGES * ps, ps) {
        let (region, _, first) = layout.locate(*r)?;
        let n = r.len / ps;
        // The state each page was claimed from (`None`: not claimed, the other path has it).
        let claimed: Vec<Option<u8>> = (0..n).map(|j| shared.claim_from(first + j)).collect();
        let alias = shared.alias(region);
        // Receive in runs of equal claim status (and claimed-from state). If the stream fails
        // part-way, the claims not placed yet are given back (STALE): a page is marked present
        // only once all its bytes arrived and were placed, never from a partial receive.
        let mut placed_all = || -> Result<(), MigrateError> {
            let mut j = 0u64;
            while j < n {
                let c = claimed[j as usize];
                let mut e = j;
                while e < n && claimed[e as usize] == c {
                    e += 1;
                }
                let run = GpaRange::new(r.gpa + j * ps, (e - j) * ps);
                if let Some(from) = c
                    && alias.is_some()
                {
                    // Replies to faults go through the alias: a waiting vCPU's page is one
                    // small receive, where a `splice` pair costs more latency than the page
                    // fault it saves.
                    let target = if shared.staged(region) {
                        shared.staged_target(by_push && from == ABSENT)
                    } else {
                        Target::Alias
                    };
                    stream.recv_into(&[run], target).map_err(stream_err(i))?;
                } else {
                    staging.resize(run.len as usize, 0);
                    stream.recv_exact(staging).map_err(stream_err(i))?;
                }
                if c.is_some() {
                    let mut hashes = Vec::with_capacity((e - j) as usize);
                    for q in j..e {
                        let gpa = r.gpa + q * ps;
                        let page: &[u8] = match alias {
                            Some(a) => {
                                let off = gpa - layout.regions()[region].gpa;
                                // SAFETY: the alias maps the whole region; `off` is a checked page
                                // offset inside it; the page is FILLING (claimed by us), so no other
                                // engine thread writes it, and the guest cannot see it yet.
                                unsafe {
                                    std::slice::from_raw_parts(
                                        (a.addr() as usize + off as usize) as *const u8,
                                        ps as usize,
                                    )
                                }
                            }
                            None => &staging[((q - j) * ps) as usize..((q - j + 1) * ps) as usize],
                        };
                        let h = page_hash(gpa, page);
                        if let Some(cs) = checksums
                            && cs[k + (q - j) as usize] != h
                        {
                            return Err(MigrateError::Checksum {
                                gpa,
                                expected: cs[k + (q - j) as usize],
                                got: h,
                            });
                        }
                        hashes.push(h);
                    }
                    let src = if alias.is_some() {
                        Src::PageCache
                    } else {
                        Src::Bytes(staging)
                    };
                    fill(shared, run, src)?;
                    for (q, h) in (j..e).zip(hashes) {
                        shared.placed(first + q, h, by_push);
                    }
                } else {
                    // Already placed by the other path; make sure nobody sleeps on them.
                    let addr = layout.host_addr(run)? as u64;
                    let _ = post.uffd.wake(addr, run.len);
                }
                k += (e - j) as usize;
                j = e;
            }
            Ok(())
        };
        if let Err(e) = placed_all() {
            for (j, c) in claimed.iter().enumerate() {
                if c.is_some() {
                    let _ = shared.states[(first + j as u64) as usize].compare_exchange(
                        FILLING,
                        STALE,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Where [`fill`] takes a range's bytes from.
enum Src<'b> {
    /// The page cache (written through the alias mapping): `UFFDIO_CONTINUE`.
    PageCache,
    /// These bytes, as long as the range: `UFFDIO_COPY`.
    Bytes(&'b [u8]),
    /// Zeroes: `UFFDIO_ZEROPAGE`.
    Zero,
}

/// Places `range` (pages this thread claimed) with one placing ioctl, waking the waiters;
/// continues after partial progress.
fn fill(shared: &Shared<'_>, range: GpaRange, src: Src<'_>) -> Result<(), MigrateError> {
    let post = shared.post()?;
    let addr = shared.layout.host_addr(range)? as u64;
    let len = range.len;
    let mut off = 0u64;
    while off < len {
        let r = match src {
            Src::PageCache => post.uffd.continue_(addr + off, len - off, PlaceMode::WAKE),
            Src::Bytes(b) => post.uffd.copy(
                addr + off,
                b.get(off as usize..).unwrap_or(&[]),
                len - off,
                PlaceMode::WAKE,
            ),
            Src::Zero => post.uffd.zeropage(addr + off, len - off, PlaceMode::WAKE),
        };
        match r {
            Ok(Fill::Done) => break,
            Ok(Fill::Partial { bytes }) => off += bytes,
            Ok(Fill::Exists) => return Err(populated_behind(range.gpa + off)),
            Ok(Fill::Again) => thread::yield_now(),
            Err(e) => {
                return Err(MigrateError::Uffd {
                    what: ferry_protocol::handshake::error_chain(&e),
                });
            }
        }
    }
    Ok(())
}

/// Empties guest memory before a transport pins it (see [`DestStreams::prepared`]): every page
/// dropped from its mapping and from the page cache of shared-backed regions, so that pages the
/// source sends as zero (never written) read as zero.
pub fn empty_guest_memory(layout: &Layout) -> Result<(), MigrateError> {
    discard_guest_memory(layout, false)
}

/// Drops every page of guest memory from its mapping (see [`discard`]) before a session
/// receives anything; unless the memory is known to read as zero ([`DestVm::zeroed`]), the page
/// cache of shared-backed regions is emptied too (`MADV_REMOVE`), since pre-copy data lands
/// there and a page received as zeroes is not written: whatever a stray write left must not
/// show through.
fn discard_guest_memory(layout: &Layout, zeroed: bool) -> Result<(), MigrateError> {
    for r in layout.regions() {
        // Every shared-backed region (memfd, hugetlbfs): dropping the mapping alone would leave
        // its page cache, which a fault maps again.
        if r.backing.file().is_some() && !zeroed {
            // SAFETY: guest memory of a VM that is not running here, a whole region of a
            // shared mapping; the engine owns its contents during the migration, and no
            // receiver runs yet.
            unsafe { sys::remove(r.host_addr, r.len) }
                .map_err(|source| MigrateError::Place { gpa: r.gpa, source })?;
        }
        discard(layout, r.gpa, r.len)?;
    }
    Ok(())
}

/// Drops `gpa..gpa+len` of guest memory from its mapping (`MADV_DONTNEED`): anonymous pages
/// become missing, shared ones stay in the page cache and fault as minor once registered.
/// Only while the VM is not running on this side.
fn discard(layout: &Layout, gpa: u64, len: u64) -> Result<(), MigrateError> {
    let addr = layout.host_addr(GpaRange::new(gpa, len))?;
    // SAFETY: guest memory of a VM that is not running here; the engine owns its contents
    // during the migration and nobody holds references into it.
    unsafe { sys::discard(addr, len) }.map_err(|source| MigrateError::Place { gpa, source })
}

/// `EEXIST` from a placing ioctl for a page this thread claimed. Only the claimer places a
/// page, and `apply_stale` dropped every unplaced page before registering, so the page was
/// mapped by someone else without a fault: the guest may have read it before our data, and
/// for anonymous memory our data never landed. That is corruption, not a benign race.
fn populated_behind(gpa: u64) -> MigrateError {
    MigrateError::Uffd {
        what: format!("Page {gpa:#x} was mapped before its data was placed (no fault was seen)"),
    }
}

/// Places one claimed page's bytes (anonymous: `UFFDIO_COPY`; shared: alias write +
/// `UFFDIO_CONTINUE`).
fn place_bytes_post(shared: &Shared<'_>, gpa: u64, page: &[u8]) -> Result<(), MigrateError> {
    let layout = shared.layout;
    let ps = layout.page_size();
    let one = GpaRange::new(gpa, ps);
    let (region, off, _) = layout.locate(one)?;
    if let Some(a) = shared.alias(region) {
        // SAFETY: the alias maps the whole region; `off` is a checked page offset; the page is
        // claimed (FILLING) by this thread, and `page` is a separate buffer of one page.
        unsafe {
            std::ptr::copy_nonoverlapping(
                page.as_ptr(),
                (a.addr() as usize + off as usize) as *mut u8,
                ps as usize,
            )
        };
        return fill(shared, one, Src::PageCache);
    }
    fill(shared, one, Src::Bytes(page))
}

/// Places one claimed zero page (anonymous: `UFFDIO_ZEROPAGE`; shared: zeroes written through
/// the alias, since the page cache may hold an older version of the page).
fn place_zero_post(shared: &Shared<'_>, p: u64, gpa: u64) -> Result<(), MigrateError> {
    let layout = shared.layout;
    let ps = layout.page_size();
    let (region, _, _) = layout.locate(GpaRange::new(gpa, ps))?;
    if shared.alias(region).is_some() {
        place_bytes_post(shared, gpa, &shared.zero_hash_scratch)?;
    } else {
        fill(shared, GpaRange::new(gpa, ps), Src::Zero)?;
    }
    shared.placed(p, ZERO_PAGE, true);
    Ok(())
}

/// Reads userfaultfd events; each fault on a missing page becomes one urgent request, written
/// on the urgent stream by this thread at once (the faults of one read go out in one write),
/// so a fault costs no thread hand-off before its request leaves. Ends with `EndOfStream` once
/// every page is here or the migration is over.
///
/// A failed write (the connection is lost) does not stop it: it keeps reading faults and
/// remembering the pages asked for, and when a recovery hands it a new urgent stream it asks
/// again for every requested page still missing.
fn fault_loop(shared: &Shared<'_>) -> Result<(), MigrateError> {
    use std::io::Write;
    let layout = shared.layout;
    let ps = layout.page_size();
    let post = shared.post()?;
    let write = |socket: &Socket, buf: &[u8]| -> std::io::Result<()> {
        match socket {
            Socket::Tcp(s, _) => (&*s).write_all(buf),
            Socket::Unix(s, _) => (&*s).write_all(buf),
        }
    };
    let mut writer: Option<Socket> = None;
    let mut gen_seen = 0u64;
    let mut events = Vec::with_capacity(64);
    let mut requested = std::collections::HashSet::new();
    let mut out = Vec::new();
    let mut id = 0u64;
    let total = layout.total_pages();
    while !shared.done.load(Ordering::Acquire)
        && (!shared.stale_applied.load(Ordering::Acquire)
            || shared.present.load(Ordering::Acquire) < total)
    {
        let generation = shared.urgent_gen.load(Ordering::Acquire);
        if generation != gen_seen {
            gen_seen = generation;
            writer = shared.urgent_writer.lock().ok().and_then(|mut w| w.take());
            // A new connection: ask again for what was asked on the old one and is missing.
            out.clear();
            let mut again: Vec<u64> = requested
                .iter()
                .copied()
                .filter(|p: &u64| shared.states[*p as usize].load(Ordering::Acquire) != PRESENT)
                .collect();
            again.sort_unstable();
            for p in again {
                id += 1;
                out.extend_from_slice(
                    &Frame::PageRequest {
                        id,
                        range: GpaRange::new(layout.page_gpa(p), ps),
                    }
                    .encode(),
                );
            }
            if let Some(w) = &writer
                && !out.is_empty()
                && let Err(e) = write(w, &out)
            {
                debug!(%e, "re-sending page requests failed");
                writer = None;
            }
        }
        let ready = post
            .uffd
            .poll(Some(Duration::from_millis(20)))
            .map_err(|e| MigrateError::Uffd {
                what: ferry_protocol::handshake::error_chain(&e),
            })?;
        if !ready {
            continue;
        }
        // Nothing touches guest memory before the state is restored, which follows the stale
        // set; should something fault earlier, it waits for the stale set like everyone.
        while !shared.stale_applied.load(Ordering::Acquire) && !shared.done.load(Ordering::Acquire)
        {
            thread::sleep(Duration::from_micros(20));
        }
        events.clear();
        post.uffd
            .read_events(&mut events, 64)
            .map_err(|e| MigrateError::Uffd {
                what: ferry_protocol::handshake::error_chain(&e),
            })?;
        out.clear();
        let mut first_gpa = None;
        for ev in events.drain(..) {
            let Event::PageFault { addr, .. } = ev else {
                debug!(?ev, "userfaultfd event");
                continue;
            };
            let Some((gpa, p)) = host_to_page(layout, addr) else {
                warn!(
                    addr = format_args!("{addr:#x}"),
                    "fault outside guest memory"
                );
                continue;
            };
            let now = Instant::now();
            if shared.states[p as usize].load(Ordering::Acquire) == PRESENT {
                // The page is here but not mapped: pre-copy data in the page cache, or a zero
                // page that was never written. No request needed.
                // A failure here must not end the fault thread: every later fault would wait
                // forever. Wake the thread; if the page still is not mapped it faults again.
                if let Err(e) = map_arrived(shared, p, gpa) {
                    warn!(%e, gpa = format_args!("{gpa:#x}"), "mapping an arrived page failed");
                    let _ = post.uffd.wake(addr & !(ps - 1), ps);
                }
                shared.local_faults.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if let Ok(mut f) = shared.faults.lock() {
                f.entry(p).or_insert(now);
            }
            // Re-check: the page may have landed between the first check and the insert.
            if shared.states[p as usize].load(Ordering::Acquire) == PRESENT {
                if let Ok(mut f) = shared.faults.lock() {
                    f.remove(&p);
                }
                let _ = post.uffd.wake(addr & !(ps - 1), ps);
                continue;
            }
            if requested.insert(p) {
                id += 1;
                first_gpa.get_or_insert(gpa);
                out.extend_from_slice(
                    &Frame::PageRequest {
                        id,
                        range: GpaRange::new(gpa, ps),
                    }
                    .encode(),
                );
            }
        }
        if let Some(gpa) = first_gpa
            && let Some(w) = &writer
            && let Err(e) = write(w, &out)
        {
            // The connection is lost: the requests are remembered and go out again on the
            // next one (recovery), or the migration fails.
            debug!(%e, gpa = format_args!("{gpa:#x}"), "page request not sent");
            writer = None;
        }
    }
    if shared.present.load(Ordering::Acquire) < total {
        // The migration ended without every page (it failed): guest memory stays registered,
        // so a touch of a missing page keeps waiting instead of reading a zero page.
        return Ok(());
    }
    // Post-copy is over. Pages that arrived but are not mapped yet (page-cache data, zero pages
    // never written) still fault: unregister guest memory so the kernel resolves those touches
    // itself (unregistering wakes the threads waiting on the range). Nobody places pages any
    // more: every page is present, so every claim fails.
    post.released.store(true, Ordering::Release);
    for r in layout.regions() {
        if let Err(e) = post.uffd.unregister(r.host_addr as u64, r.len) {
            warn!(%e, gpa = format_args!("{:#x}", r.gpa), "unregistering guest memory failed");
        }
    }
    if let Some(w) = &writer {
        let _ = write(w, &Frame::EndOfStream.encode());
    }
    Ok(())
}

/// Maps page `p` (at `gpa`), which has arrived (PRESENT) but may not be mapped: a data page of a
/// shared-backed region is in the page cache (`UFFDIO_CONTINUE`); a zero page may be a hole
/// that was never written (`UFFDIO_ZEROPAGE`), or, in a shared-backed region, a page-cache page
/// cleared through the alias (`EEXIST` from the zero page, then `UFFDIO_CONTINUE`). `EEXIST`
/// from the last step means someone mapped it meanwhile: wake the waiters. After mapping a
/// data page, maps its arrived neighbours too ([`LOCAL_NEIGHBOURHOOD`]).
fn map_arrived(shared: &Shared<'_>, p: u64, gpa: u64) -> Result<(), MigrateError> {
    let layout = shared.layout;
    let ps = layout.page_size();
    let post = shared.post()?;
    let range = GpaRange::new(gpa, ps);
    let (region, _, _) = layout.locate(range)?;
    let addr = layout.host_addr(range)? as u64;
    let staged = shared.staged(region);
    let zero = shared.hashes[p as usize].load(Ordering::Acquire) == ZERO_PAGE;
    let uffd_err = |e: crate::uffd::UffdOpError| MigrateError::Uffd {
        what: ferry_protocol::handshake::error_chain(&e),
    };
    let mut steps: &[Src<'_>] = match (zero, staged) {
        (true, true) => &[Src::Zero, Src::PageCache],
        (true, false) => &[Src::Zero],
        (false, true) => &[Src::PageCache],
        // Anonymous data pages are written in place: PRESENT means mapped.
        (false, false) => &[],
    };
    let mut tries = 0;
    while let Some(step) = steps.first() {
        let r = match step {
            Src::Zero => post.uffd.zeropage(addr, ps, PlaceMode::WAKE),
            _ => post.uffd.continue_(addr, ps, PlaceMode::WAKE),
        };
        match r.map_err(uffd_err)? {
            Fill::Done | Fill::Partial { .. } => {
                if staged && !zero {
                    // Its neighbours are likely next; map those that arrived too.
                    let q = p - layout.first_pages()[region];
                    map_arrived_run(shared, region, q + 1, q + LOCAL_NEIGHBOURHOOD)?;
                }
                return Ok(());
            }
            Fill::Exists => steps = &steps[1..],
            Fill::Again if tries < 100 => {
                tries += 1;
                thread::yield_now();
            }
            Fill::Again => break,
        }
    }
    post.uffd.wake(addr, ps).map_err(uffd_err)
}

/// At a post-copy switchover: maps the arrived data pages among `ranges` (the pages the
/// source's vCPUs touch first) at once, so the guest's first steps do not take a local fault
/// on each. Returns the pages mapped.
fn map_first_touch(shared: &Shared<'_>, ranges: &[GpaRange]) -> Result<u64, MigrateError> {
    let layout = shared.layout;
    let ps = layout.page_size();
    let mut mapped = 0;
    // The hint comes from the network and is mapped inside the blackout: at most
    // MAX_FIRST_TOUCH_PAGES pages are considered, whatever the ranges say.
    let mut budget = MAX_FIRST_TOUCH_PAGES;
    for r in ranges {
        let Ok((region, off, _)) = layout.locate(*r) else {
            continue;
        };
        if !shared.staged(region) {
            continue;
        }
        let n = (r.len / ps).min(budget);
        budget -= n;
        if n == 0 {
            break;
        }
        match map_arrived_run(shared, region, off / ps, off / ps + n)? {
            Some(n) => mapped += n,
            None => break,
        }
    }
    Ok(mapped)
}

/// Maps the arrived, unmapped data pages among region `region`'s pages `from..to` (region-
/// relative) with `UFFDIO_CONTINUE`, in runs of up to [`MAP_RUN_PAGES`]; pages mapped meanwhile
/// are skipped. Returns the pages mapped, or `None` when post-copy ended meanwhile (guest
/// memory unregistered: the kernel maps the rest on first touch).
fn map_arrived_run(
    shared: &Shared<'_>,
    region: usize,
    from: u64,
    to: u64,
) -> Result<Option<u64>, MigrateError> {
    let layout = shared.layout;
    let ps = layout.page_size();
    let post = shared.post()?;
    let r = &layout.regions()[region];
    let first = layout.first_pages()[region];
    let to = to.min(r.pages());
    let ready = |p: u64| {
        shared.states[p as usize].load(Ordering::Acquire) == PRESENT
            && shared.hashes[p as usize].load(Ordering::Acquire) != ZERO_PAGE
    };
    let mut mapped = 0;
    let mut q = from;
    while q < to {
        if shared.done.load(Ordering::Acquire) || post.released.load(Ordering::Acquire) {
            return Ok(None);
        }
        if !ready(first + q) {
            q += 1;
            continue;
        }
        let start = q;
        while q < to && q - start < MAP_RUN_PAGES && ready(first + q) {
            q += 1;
        }
        let addr = r.host_addr as u64 + start * ps;
        let sum = match post
            .uffd
            .continue_all(addr, (q - start) * ps, PlaceMode::WAKE)
        {
            Ok(sum) => sum,
            Err(_) if post.released.load(Ordering::Acquire) => return Ok(None),
            Err(e) => {
                return Err(MigrateError::Uffd {
                    what: ferry_protocol::handshake::error_chain(&e),
                });
            }
        };
        mapped += sum.placed / ps;
        if let Some(at) = sum.again_at {
            // The mapping is changing; retry the rest of the run.
            q = start + at / ps;
            thread::yield_now();
        }
    }
    Ok(Some(mapped))
}

fn host_to_page(layout: &Layout, addr: u64) -> Option<(u64, u64)> {
    let ps = layout.page_size();
    for (i, r) in layout.regions().iter().enumerate() {
        let base = r.host_addr as u64;
        if addr >= base && addr < base + r.len {
            let off = (addr - base) & !(ps - 1);
            return Some((r.gpa + off, layout.first_pages()[i] + off / ps));
        }
    }
    None
}

/// Answers the fault handler's page requests (read back from `requests`) with one-sided reads
/// of the source's memory: claims each page, reads it (into its page cache where the region is
/// a memfd, else into the fetch's buffer), and places it like a reply. A page already claimed
/// or present is left to whoever has it. Ends at `EndOfStream` or when `requests` closes,
/// after the reads in flight; on an error, the pages it claimed and did not place are given
/// back (STALE), so a recovery asks for them again.
fn fetch_loop(
    shared: &Shared<'_>,
    requests: Socket,
    mut fetch: Box<dyn PageFetch>,
) -> Result<(), MigrateError> {
    use std::io::{ErrorKind, Read};
    let layout = shared.layout;
    let ps = layout.page_size();
    let Socket::Unix(mut sock, _) = requests else {
        return Err(MigrateError::Unexpected {
            got: "a TCP socket",
            state: "reading page requests for a fetch",
        });
    };
    // Any failure of the fetch is a lost demand path: a recovery asks again over TCP.
    let io = |e: std::io::Error| MigrateError::Stream {
        stream: usize::MAX,
        source: ferry_transport::StreamError::Rdma {
            stream: usize::MAX,
            peer: "page requests".into(),
            source: Box::new(e),
        },
    };
    // Claimed pages whose read is in flight, by gpa.
    let mut inflight: HashMap<u64, u64> = HashMap::new();
    let mut pending: std::collections::VecDeque<(u64, u64)> = std::collections::VecDeque::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut ended = false;
    let mut blocking = true;
    let mut idle = 0u32;
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(io)?;
    let result = (|| -> Result<(), MigrateError> {
        loop {
            let busy = !inflight.is_empty() || !pending.is_empty();
            if busy == blocking {
                blocking = !busy;
                sock.set_nonblocking(busy).map_err(io)?;
            }
            let mut progress = false;
            if !ended {
                match sock.read(&mut chunk) {
                    Ok(0) => {
                        // Closed without `EndOfStream`: the connection is being replaced (a
                        // recovery asks again for what is missing) or the migration is over.
                        // Finish the reads in flight, start no more.
                        ended = true;
                        pending.clear();
                        buf.clear();
                    }
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        progress = true;
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                        ) => {}
                    Err(e) if shared.done.load(Ordering::Acquire) => {
                        debug!(%e, "page requests closed");
                        ended = true;
                    }
                    Err(e) => return Err(io(e)),
                }
            }
            // Whole frames only: page requests (checked against the memory map) or the end.
            while buf.len() >= HEADER_LEN {
                let mut h = [0u8; HEADER_LEN];
                h.copy_from_slice(&buf[..HEADER_LEN]);
                let header = FrameHeader::decode(&h).map_err(|source| MigrateError::Decode {
                    stream: usize::MAX,
                    source,
                })?;
                let total = HEADER_LEN + header.meta_len as usize;
                if buf.len() < total {
                    break;
                }
                let frame = Frame::decode(&header, &buf[HEADER_LEN..total]).map_err(|source| {
                    MigrateError::Decode {
                        stream: usize::MAX,
                        source,
                    }
                })?;
                buf.drain(..total);
                match frame {
                    Frame::PageRequest { range, .. } => {
                        let (_, _, first) = layout.locate(range)?;
                        for j in 0..range.len / ps {
                            pending.push_back((range.gpa + j * ps, first + j));
                        }
                    }
                    Frame::EndOfStream => ended = true,
                    other => {
                        return Err(MigrateError::Unexpected {
                            got: other.command().name(),
                            state: "fetching requested pages",
                        });
                    }
                }
            }
            while let Some(&(gpa, p)) = pending.front() {
                if inflight.contains_key(&gpa) {
                    pending.pop_front();
                    continue;
                }
                let one = GpaRange::new(gpa, ps);
                let (region, _, _) = layout.locate(one)?;
                if shared.claim_from(p).is_none() {
                    // Present, or being placed by the push: it wakes the waiters.
                    pending.pop_front();
                    continue;
                }
                match fetch.start(one, shared.staged(region)) {
                    Ok(true) => {
                        inflight.insert(gpa, p);
                        pending.pop_front();
                        progress = true;
                    }
                    Ok(false) => {
                        unclaim(shared, p);
                        break;
                    }
                    Err(e) => {
                        unclaim(shared, p);
                        return Err(e);
                    }
                }
            }
            if !inflight.is_empty() {
                let n = fetch.poll(&mut |range, bytes| {
                    let Some(p) = inflight.remove(&range.gpa) else {
                        return Ok(());
                    };
                    let placed = match bytes {
                        Some(b) => {
                            place_bytes_post(shared, range.gpa, b).map(|()| page_hash(range.gpa, b))
                        }
                        None => placed_in_page_cache(shared, range),
                    };
                    match placed {
                        Ok(h) => {
                            shared.placed(p, h, false);
                            Ok(())
                        }
                        Err(e) => {
                            unclaim(shared, p);
                            Err(e)
                        }
                    }
                })?;
                progress |= n > 0;
            }
            if ended && pending.is_empty() && inflight.is_empty() {
                return Ok(());
            }
            if progress {
                idle = 0;
            } else if busy {
                idle = idle.saturating_add(1);
                if idle < 64 {
                    std::hint::spin_loop();
                } else if idle < 256 {
                    thread::yield_now();
                } else {
                    thread::sleep(Duration::from_micros(20));
                }
            }
        }
    })();
    if result.is_err() {
        // Destroys the queue pair first: no READ may still write a page given back.
        drop(fetch);
        for p in inflight.into_values() {
            unclaim(shared, p);
        }
    }
    result
}

/// Gives a claim back: the page is STALE again (someone asks for it again).
fn unclaim(shared: &Shared<'_>, p: u64) {
    let _ = shared.states[p as usize].compare_exchange(
        FILLING,
        STALE,
        Ordering::AcqRel,
        Ordering::Acquire,
    );
}

/// Maps a claimed page of a memfd region that a fetch read into its page cache
/// (`UFFDIO_CONTINUE`) and returns its hash, read through the alias.
fn placed_in_page_cache(shared: &Shared<'_>, range: GpaRange) -> Result<u64, MigrateError> {
    let (region, _, _) = shared.layout.locate(range)?;
    if !shared.staged(region) {
        return Err(MigrateError::Unexpected {
            got: "a page read into the page cache",
            state: "placing a page of a region not received through its alias",
        });
    }
    let h = page_hash(range.gpa, shared.landed(range)?);
    fill(shared, range, Src::PageCache)?;
    Ok(h)
}

/// Receives page replies on the urgent stream and places them.
fn reply_loop(shared: &Shared<'_>, mut stream: Box<dyn DataStream>) -> Result<(), MigrateError> {
    let layout = shared.layout;
    let mut staging = Vec::new();
    loop {
        let (_, frame) = match read_frame(usize::MAX, stream.as_mut(), layout) {
            Ok(x) => x,
            // Once every page is here the requester closes the urgent stream.
            Err(e)
                if shared.done.load(Ordering::Acquire)
                    || shared.present.load(Ordering::Acquire) >= layout.total_pages() =>
            {
                debug!(%e, "urgent stream closed");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        match frame {
            Frame::PageReply {
                range, checksums, ..
            } => {
                place_post(
                    usize::MAX,
                    stream.as_mut(),
                    shared,
                    &[range],
                    checksums.as_deref(),
                    &mut staging,
                    false,
                )?;
            }
            Frame::EndOfStream => return Ok(()),
            other => {
                return Err(MigrateError::Unexpected {
                    got: other.command().name(),
                    state: "receiving page replies",
                });
            }
        }
    }
}
