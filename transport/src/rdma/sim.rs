// SPDX-License-Identifier: Apache-2.0 OR MIT
//! An in-process RDMA fabric simulator, for tests only: it lets the RDMA data path and everything
//! above it (the engine's RDMA sessions) run on machines without an RDMA device. It is never a
//! source of performance figures: it has no wire and no NIC.
//!
//! It executes send work requests against real process memory, as a NIC would at the responder:
//! it checks lkeys and rkeys against the registrations made through it, copies the bytes (WRITE,
//! READ), consumes a posted receive for every WRITE_WITH_IMM, puts a completion in the
//! initiator's queue for signalled requests, and on a key violation fails the queue pair like
//! hardware does (an error completion for the failing request, flush errors for everything after
//! it). A WRITE_WITH_IMM that finds no posted receive either fails at once (RNR_RETRY_EXC, the
//! unit tests' fabric) or waits, with every later request of its queue pair, until the peer posts
//! one ([`SimProvider`]'s fabric: receiver-not-ready retries as `rnr_retry = 7` gives them).
//! Destroying a queue pair fails the requests its peer still has waiting (RETRY_EXC), and later
//! ones find it gone.
//!
//! What it does not model: wire timing, the NIC reading source memory later than at execution,
//! READ/atomic ordering rules beyond posting order, and pinning: its copies go through the
//! process's current page tables, as an on-demand-paging registration's do, so a pinned
//! registration's failure modes (pages dropped behind the device's back) cannot show here.
//!
//! [`SimProvider`] (cargo feature `rdma-sim`) is an [`RdmaProvider`]: listeners and connections
//! keyed by port inside one process, registrations that hand out keys and revoke them when
//! dropped.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sideway::ibverbs::completion::{PollCompletionQueueError, WorkCompletionOperationType as Op};
use sideway::ibverbs::queue_pair::{PostRecvError, PostSendError};

use super::conn::{ConnectError, ConnectOptions};
use super::memory::{BouncePool, RegisterError, RegisterOptions, RegisteredMemory, Role};
use super::provider::{RdmaAcceptor, RdmaLink, RdmaProvider};
use super::region::{ChunkTable, GuestRegion, LocalChunk, RemoteRegion, plan_chunks};
use super::stream::{QueueOps, RawWc, RdmaStream, StreamConfig, StreamKind};
use super::sys::{SendOp, SendWr};

pub(crate) const FLUSH: u32 = 5;
pub(crate) const LOC_PROT: u32 = 4;
pub(crate) const REM_ACCESS: u32 = 10;
pub(crate) const RETRY_EXC: u32 = 12;
pub(crate) const RNR_EXC: u32 = 13;

#[derive(Debug, Default)]
struct Side {
    cq: VecDeque<RawWc>,
    recvs: VecDeque<u64>,
    /// Requests waiting for a receive at the peer (receiver not ready), in posting order.
    pending: VecDeque<SendWr>,
    failed: bool,
    destroyed: bool,
}

/// The fabric: connected queue-pair pairs ("wires", sides 0 and 1) sharing one key space.
#[derive(Debug, Default)]
pub(crate) struct Fabric {
    wires: Vec<[Side; 2]>,
    /// Registered spans by key: (host address, length).
    pub(crate) keys: HashMap<u32, (u64, u64)>,
    /// Withhold successful send completions (a peer that stopped acknowledging).
    pub(crate) stall: bool,
    /// A WRITE_WITH_IMM without a posted receive waits instead of failing.
    pub(crate) rnr_retry: bool,
    next_key: u32,
    /// Counters of executed requests: (WRITEs and WRITE_WITH_IMMs that moved bytes, READs).
    executed: (u64, u64),
}

enum Executed {
    Done,
    Deferred,
}

fn wc(wr_id: u64, status: u32, opcode: u32) -> RawWc {
    RawWc {
        wr_id,
        status,
        opcode,
        vendor_err: if status == 0 { 0 } else { 0x99 },
        byte_len: 0,
        imm: 0,
    }
}

fn lock(f: &Mutex<Fabric>) -> std::sync::MutexGuard<'_, Fabric> {
    f.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Fabric {
    fn covers(&self, key: u32, addr: u64, len: u32) -> bool {
        self.keys.get(&key).is_some_and(|&(a, l)| {
            addr >= a && addr.checked_add(u64::from(len)).is_some_and(|e| e <= a + l)
        })
    }

    fn wire(&mut self, w: usize) -> &mut [Side; 2] {
        if self.wires.len() <= w {
            self.wires.resize_with(w + 1, Default::default);
        }
        &mut self.wires[w]
    }

    /// A new wire's index.
    fn add_wire(&mut self) -> usize {
        self.wires.push(Default::default());
        self.wires.len() - 1
    }

    fn fail(&mut self, w: usize, me: usize, wr_id: u64, status: u32) {
        let side = &mut self.wire(w)[me];
        side.failed = true;
        side.cq.push_back(wc(wr_id, status, 0));
        // Everything still waiting is flushed.
        while let Some(p) = side.pending.pop_front() {
            side.cq.push_back(wc(p.wr_id, FLUSH, 0));
        }
    }

    /// Executes one request of side `me` of wire `w`.
    fn execute(&mut self, w: usize, me: usize, wr: SendWr) -> Executed {
        let peer = 1 - me;
        let (rkey, raddr, opcode) = match wr.op {
            SendOp::Write { rkey, remote_addr }
            | SendOp::WriteImm {
                rkey, remote_addr, ..
            } => (rkey, remote_addr, Op::Write as u32),
            SendOp::Read { rkey, remote_addr } => (rkey, remote_addr, Op::Read as u32),
        };
        let status = if self.wire(w)[peer].destroyed {
            RETRY_EXC
        } else if !self.covers(wr.lkey, wr.local_addr, wr.len) {
            LOC_PROT
        } else if !self.covers(rkey, raddr, wr.len) {
            REM_ACCESS
        } else if matches!(wr.op, SendOp::WriteImm { .. }) && self.wire(w)[peer].recvs.is_empty() {
            if self.rnr_retry {
                return Executed::Deferred;
            }
            RNR_EXC
        } else {
            0
        };
        if status != 0 {
            self.fail(w, me, wr.wr_id, status);
            return Executed::Done;
        }
        let (src, dst) = match wr.op {
            SendOp::Read { .. } => (raddr, wr.local_addr),
            _ => (wr.local_addr, raddr),
        };
        // SAFETY: both spans were checked against live keys; a key is in the table only while
        // its registration lives (tests register spans of mappings they own for the whole
        // test; `SimProvider` registrations carry the caller's promise, as a real memory region
        // does, and remove their keys when dropped). Distinct registrations of one process
        // never overlap here (local and remote spans belong to different guests).
        unsafe {
            std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, wr.len as usize);
        }
        match wr.op {
            SendOp::Read { .. } => self.executed.1 += 1,
            _ if wr.len > 0 => self.executed.0 += 1,
            _ => {}
        }
        if let SendOp::WriteImm { imm_be, .. } = wr.op {
            let id = self.wire(w)[peer].recvs.pop_front().unwrap_or_default();
            self.wire(w)[peer].cq.push_back(RawWc {
                byte_len: wr.len,
                imm: imm_be,
                ..wc(id, 0, Op::ReceiveWithImmediate as u32)
            });
        }
        if wr.signalled && !self.stall {
            self.wire(w)[me].cq.push_back(wc(wr.wr_id, 0, opcode));
        }
        Executed::Done
    }

    fn post(&mut self, w: usize, me: usize, wr: SendWr) {
        let side = &mut self.wire(w)[me];
        if side.failed {
            side.cq.push_back(wc(wr.wr_id, FLUSH, 0));
        } else if !side.pending.is_empty() {
            side.pending.push_back(wr);
        } else if let Executed::Deferred = self.execute(w, me, wr) {
            self.wire(w)[me].pending.push_back(wr);
        }
    }

    /// Runs side `me`'s waiting requests while the peer has receives.
    fn drain(&mut self, w: usize, me: usize) {
        if self.wire(w)[me].destroyed {
            // A destroyed queue pair's work was flushed with it.
            self.wire(w)[me].pending.clear();
            return;
        }
        while let Some(wr) = self.wire(w)[me].pending.front().copied() {
            if self.wire(w)[me].failed {
                break;
            }
            match self.execute(w, me, wr) {
                Executed::Deferred => break,
                Executed::Done => {
                    // `execute` may have failed the side and flushed the queue already.
                    let side = &mut self.wire(w)[me];
                    if side.pending.front().is_some_and(|p| p.wr_id == wr.wr_id) {
                        side.pending.pop_front();
                    }
                }
            }
        }
    }

    fn allocate_key(&mut self, host_addr: u64, len: u64) -> u32 {
        self.next_key = self.next_key.wrapping_add(1).max(0x1000);
        while self.keys.contains_key(&self.next_key) {
            self.next_key = self.next_key.wrapping_add(1).max(0x1000);
        }
        self.keys.insert(self.next_key, (host_addr, len));
        self.next_key
    }
}

/// One side of one wire: implements the verbs a stream uses.
#[derive(Debug)]
pub(crate) struct FakeQueue {
    pub(crate) fabric: Arc<Mutex<Fabric>>,
    pub(crate) wire: usize,
    pub(crate) me: usize,
}

impl QueueOps for FakeQueue {
    unsafe fn post_send(&mut self, wrs: &[SendWr]) -> Result<(), PostSendError> {
        let mut f = lock(&self.fabric);
        for wr in wrs {
            f.post(self.wire, self.me, *wr);
        }
        Ok(())
    }

    fn post_recv(&mut self, wr_ids: &[u64]) -> Result<(), PostRecvError> {
        let mut f = lock(&self.fabric);
        f.wire(self.wire)[self.me].recvs.extend(wr_ids);
        f.drain(self.wire, 1 - self.me);
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<RawWc>) -> Result<(), PollCompletionQueueError> {
        let mut f = lock(&self.fabric);
        out.extend(f.wire(self.wire)[self.me].cq.drain(..));
        Ok(())
    }

    fn qp_number(&self) -> u32 {
        let n = self.wire * 2 + self.me;
        0x100 + u32::try_from(n).unwrap_or(0)
    }
}

impl Drop for FakeQueue {
    fn drop(&mut self) {
        let mut f = lock(&self.fabric);
        let me = self.me;
        let side = &mut f.wire(self.wire)[me];
        side.destroyed = true;
        side.recvs.clear();
        // Our own requests still waiting for the peer's receives go with us.
        side.pending.clear();
        // The peer's requests waiting for our receives can never run now.
        let peer = 1 - me;
        if let Some(wr) = f.wire(self.wire)[peer].pending.pop_front() {
            f.fail(self.wire, peer, wr.wr_id, RETRY_EXC);
        }
    }
}

/// Removes a simulated registration's keys from the fabric when the registration is dropped.
#[derive(Debug)]
pub(crate) struct SimKeys {
    fabric: Arc<Mutex<Fabric>>,
    keys: Vec<u32>,
}

impl Drop for SimKeys {
    fn drop(&mut self) {
        let mut f = lock(&self.fabric);
        for k in &self.keys {
            f.keys.remove(k);
        }
    }
}

/// The wires of one connection, in stream order, with each stream's kind.
type Wires = Vec<(usize, StreamKind)>;

/// Connections waiting to be accepted, by listening port.
#[derive(Debug, Default)]
struct Rendezvous {
    waiting: Mutex<HashMap<u16, VecDeque<Wires>>>,
    cond: Condvar,
}

/// An in-process RDMA "device": listeners, connections and registrations of one process,
/// joined by the simulated fabric (see the module docs). For tests of code above the RDMA
/// data path on machines without an RDMA device; it measures nothing.
#[derive(Debug, Clone)]
pub struct SimProvider {
    fabric: Arc<Mutex<Fabric>>,
    rendezvous: Arc<Rendezvous>,
}

impl Default for SimProvider {
    fn default() -> Self {
        Self::new()
    }
}

impl SimProvider {
    /// A fabric with receiver-not-ready retries (a WRITE_WITH_IMM waits for a receive).
    pub fn new() -> Self {
        Self {
            fabric: Arc::new(Mutex::new(Fabric {
                rnr_retry: true,
                ..Fabric::default()
            })),
            rendezvous: Arc::new(Rendezvous::default()),
        }
    }

    /// Keys currently registered (a registration's keys go when it is dropped).
    pub fn registered_keys(&self) -> usize {
        lock(&self.fabric).keys.len()
    }

    /// Breaks every queue pair, as a failed link or NIC would: requests waiting and every
    /// later one complete with an error.
    pub fn break_all(&self) {
        let mut f = lock(&self.fabric);
        for w in 0..f.wires.len() {
            for me in 0..2 {
                let side = &mut f.wire(w)[me];
                if side.destroyed || side.failed {
                    continue;
                }
                side.failed = true;
                while let Some(p) = side.pending.pop_front() {
                    side.cq.push_back(wc(p.wr_id, RETRY_EXC, 0));
                }
            }
        }
    }

    /// Work requests executed so far: (WRITEs and WRITE_WITH_IMMs that moved bytes; READs).
    pub fn executed(&self) -> (u64, u64) {
        lock(&self.fabric).executed
    }

    fn link(&self, wires: &[(usize, StreamKind)], side: usize, opts: &ConnectOptions) -> SimLink {
        static PDS: AtomicUsize = AtomicUsize::new(1);
        let pd_key = PDS.fetch_add(1, Ordering::Relaxed);
        let exposed: Arc<Mutex<Vec<Arc<RegisteredMemory>>>> = Arc::default();
        let keep: Arc<dyn fmt::Debug + Send + Sync> = exposed.clone();
        let recv_depth = if opts.role == Role::Destination {
            opts.recv_depth.max(1) as usize
        } else {
            0
        };
        let mut streams = Vec::new();
        let mut urgent = None;
        for (index, &(wire, kind)) in wires.iter().enumerate() {
            let cfg = StreamConfig {
                index,
                kind,
                send_depth: opts.send_depth.max(1) as usize,
                recv_depth,
                signal_every: opts.signal_every.max(1) as usize,
                max_wr_bytes: opts.max_wr_bytes.max(1),
                pd_key,
            };
            let queue = FakeQueue {
                fabric: Arc::clone(&self.fabric),
                wire,
                me: side,
            };
            let mut s = RdmaStream::new(Box::new(queue), Arc::clone(&keep), cfg);
            // Cannot fail: the simulator's post_recv is infallible.
            let _ = s.fill_receives();
            match kind {
                StreamKind::Bulk => streams.push(s),
                StreamKind::Urgent => urgent = Some(s),
            }
        }
        SimLink {
            fabric: Arc::clone(&self.fabric),
            streams,
            urgent,
            exposed,
            pd_key,
        }
    }
}

/// A simulated listener.
#[derive(Debug)]
pub struct SimListener {
    provider: SimProvider,
    addr: SocketAddr,
}

/// One side of a simulated connection.
#[derive(Debug)]
pub struct SimLink {
    fabric: Arc<Mutex<Fabric>>,
    streams: Vec<RdmaStream>,
    urgent: Option<RdmaStream>,
    exposed: Arc<Mutex<Vec<Arc<RegisteredMemory>>>>,
    pd_key: usize,
}

impl RdmaProvider for SimProvider {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn listen(&self, addr: SocketAddr) -> Result<Box<dyn RdmaAcceptor>, ConnectError> {
        Ok(Box::new(SimListener {
            provider: self.clone(),
            addr,
        }))
    }

    fn connect(
        &self,
        peer: SocketAddr,
        opts: &ConnectOptions,
    ) -> Result<Box<dyn RdmaLink>, ConnectError> {
        if opts.streams == 0 {
            return Err(ConnectError::Options {
                what: "streams must be at least 1",
            });
        }
        let wires: Wires = {
            let mut f = lock(&self.fabric);
            (0..opts.streams + usize::from(opts.urgent))
                .map(|i| {
                    let kind = if i < opts.streams {
                        StreamKind::Bulk
                    } else {
                        StreamKind::Urgent
                    };
                    (f.add_wire(), kind)
                })
                .collect()
        };
        let link = self.link(&wires, 0, opts);
        let r = &self.rendezvous;
        r.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(peer.port())
            .or_default()
            .push_back(wires);
        r.cond.notify_all();
        Ok(Box::new(link))
    }
}

impl RdmaAcceptor for SimListener {
    fn accept(&self, opts: &ConnectOptions) -> Result<Box<dyn RdmaLink>, ConnectError> {
        let r = &self.provider.rendezvous;
        let start = Instant::now();
        let mut waiting = r.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(wires) = waiting
                .get_mut(&self.addr.port())
                .and_then(VecDeque::pop_front)
            {
                drop(waiting);
                return Ok(Box::new(self.provider.link(&wires, 1, opts)));
            }
            let left = opts.timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(ConnectError::Timeout {
                    step: "accept",
                    stream: 0,
                    peer: self.addr,
                    waited: start.elapsed(),
                });
            }
            waiting = r
                .cond
                .wait_timeout(waiting, left.min(Duration::from_millis(100)))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl RdmaLink for SimLink {
    unsafe fn register_guest_memory(
        &self,
        regions: &[GuestRegion],
        role: Role,
        opts: RegisterOptions,
    ) -> Result<Arc<RegisteredMemory>, RegisterError> {
        // Chunks of at most 1 GiB, as a device with that `max_mr_size` would cut them.
        let max_chunk = opts.max_chunk.unwrap_or(1 << 30).min(1 << 30);
        let plan = plan_chunks(regions, max_chunk, opts.page_size)?;
        let mut f = lock(&self.fabric);
        let mut keys = Vec::with_capacity(plan.len());
        let chunks = plan
            .iter()
            .map(|c| {
                let key = f.allocate_key(c.host_addr, c.len);
                keys.push(key);
                LocalChunk {
                    gpa: c.gpa,
                    host_addr: c.host_addr,
                    len: c.len,
                    lkey: key,
                    rkey: key,
                }
            })
            .collect();
        drop(f);
        let guard = SimKeys {
            fabric: Arc::clone(&self.fabric),
            keys,
        };
        let table = ChunkTable::new(chunks)?;
        Ok(RegisteredMemory::simulated(
            table,
            role,
            self.pd_key,
            Some(guard),
        ))
    }

    fn expose(&self, mem: &Arc<RegisteredMemory>) -> Result<Vec<RemoteRegion>, ConnectError> {
        if mem.pd_key() != self.pd_key {
            return Err(ConnectError::ForeignRegistration);
        }
        self.exposed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::clone(mem));
        Ok(mem.export())
    }

    fn take_streams(&mut self) -> (Vec<RdmaStream>, Option<RdmaStream>) {
        (std::mem::take(&mut self.streams), self.urgent.take())
    }

    fn bounce_pool(&self, slots: usize, slot_size: usize) -> Result<BouncePool, RegisterError> {
        BouncePool::simulated(slots, slot_size, self.pd_key, |addr, len| {
            let key = lock(&self.fabric).allocate_key(addr, len);
            (
                key,
                SimKeys {
                    fabric: Arc::clone(&self.fabric),
                    keys: vec![key],
                },
            )
        })
    }
}

#[cfg(test)]
// Test arithmetic on small, known sizes.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::rdma::region::{GuestRange, RemoteMap};
    use crate::rdma::stream::StreamError;
    use crate::rdma::sys::AnonMapping;
    use crate::rdma::window::WcStatus;

    const PAGE: u64 = 4096;
    const T: Duration = Duration::from_secs(5);
    const PORT: u16 = 4791;

    struct Side {
        mem: AnonMapping,
        link: Box<dyn RdmaLink>,
        reg: Arc<RegisteredMemory>,
    }

    fn side(link: Box<dyn RdmaLink>, role: Role, seed: u8) -> Side {
        let mem = AnonMapping::new((16 * PAGE) as usize).expect("mapping");
        mem.write_for_test(0, &vec![seed; mem.len()]);
        let region = GuestRegion {
            gpa: 0,
            host_addr: mem.addr(),
            len: 16 * PAGE,
        };
        // SAFETY: `mem` outlives the registration (dropped first, field order in the tests).
        let reg =
            unsafe { link.register_guest_memory(&[region], role, RegisterOptions::default()) }
                .expect("register");
        Side { mem, link, reg }
    }

    impl Side {
        fn page(&self, i: u64) -> u8 {
            // SAFETY: in bounds; no request runs while the test reads.
            unsafe { self.mem.bytes((i * PAGE) as usize, 1) }.expect("in bounds")[0]
        }
    }

    fn connected(recv_depth: u32) -> (SimProvider, Side, Side) {
        let p = SimProvider::new();
        let addr: SocketAddr = ([10, 0, 0, 1], PORT).into();
        let listener = p.listen(addr).expect("listen");
        let mut o = ConnectOptions::new(Role::Source);
        o.streams = 1;
        o.urgent = false;
        let src = p.connect(addr, &o).expect("connect");
        let mut o = ConnectOptions::new(Role::Destination);
        o.streams = 1;
        o.urgent = false;
        o.recv_depth = recv_depth;
        let dst = listener.accept(&o).expect("accept");
        (
            p.clone(),
            side(src, Role::Source, 7),
            side(dst, Role::Destination, 0),
        )
    }

    fn remote(dst: &Side) -> RemoteMap {
        let exported = dst.link.expose(&dst.reg).expect("expose");
        RemoteMap::import(
            &exported,
            &[GuestRange::new(0, 16 * PAGE)],
            crate::rdma::ImportLimits::default(),
        )
        .expect("import")
    }

    /// Posts batches 0..n, batch `b` being page `b`.
    fn push_pages(tx: &mut RdmaStream, src: &Side, map: &RemoteMap, n: u32) {
        for b in 0..n {
            let page = [GuestRange::new(u64::from(b) * PAGE, PAGE)];
            tx.write_batch(&src.reg, map, &page, b, T).expect("post");
        }
    }

    #[test]
    fn a_write_with_imm_waits_for_a_receive_and_later_ones_keep_their_order() {
        let (_p, mut src, mut dst) = connected(1);
        let map = remote(&dst);
        let (mut tx, _) = src.link.take_streams();
        let (mut rx, _) = dst.link.take_streams();
        // Three batches against one posted receive: two wait (receiver not ready).
        push_pages(&mut tx[0], &src, &map, 3);
        assert_eq!(dst.page(0), 7, "the first batch ran");
        assert_eq!(dst.page(1), 0, "the second waits for a receive");
        // Each arrival reposts a receive, which lets the next batch run, in order.
        let got: Vec<u32> = (0..3)
            .map(|_| rx[0].wait_arrival(T).expect("arrival").batch)
            .collect();
        assert_eq!(got, vec![0, 1, 2]);
        tx[0].flush(T).expect("all completed");
        assert_eq!((dst.page(1), dst.page(2), dst.page(3)), (7, 7, 0));
        drop((tx, rx));
        drop(src.reg);
        drop(dst.reg);
    }

    #[test]
    fn destroying_the_receiver_fails_what_waits_and_what_follows() {
        let (_p, mut src, mut dst) = connected(1);
        let map = remote(&dst);
        let (mut tx, _) = src.link.take_streams();
        let (rx, _) = dst.link.take_streams();
        push_pages(&mut tx[0], &src, &map, 2);
        drop(rx);
        let e = tx[0].flush(T).expect_err("peer gone");
        let StreamError::Completion(c) = e else {
            panic!("expected a completion error, got {e}");
        };
        assert_eq!(c.status, WcStatus::from_raw(RETRY_EXC));
        assert_eq!(dst.page(1), 0, "the waiting batch never ran");
    }

    #[test]
    fn a_dropped_registration_revokes_its_keys() {
        let (p, mut src, dst) = connected(4);
        let before = p.registered_keys();
        assert_eq!(before, 2);
        let map = RemoteMap::import(
            &dst.reg.export(),
            &[GuestRange::new(0, 16 * PAGE)],
            crate::rdma::ImportLimits::default(),
        )
        .expect("import");
        let Side { mem, reg, link } = dst;
        drop(reg);
        assert_eq!(p.registered_keys(), 1);
        let (mut tx, _) = src.link.take_streams();
        tx[0]
            .write_batch(&src.reg, &map, &[GuestRange::new(0, PAGE)], 0, T)
            .expect("post");
        let e = tx[0].flush(T).expect_err("revoked");
        let StreamError::Completion(c) = e else {
            panic!("expected a completion error, got {e}");
        };
        assert_eq!(c.status, WcStatus::RemoteAccess);
        // SAFETY: in bounds; nothing writes it.
        assert_eq!(unsafe { mem.bytes(0, 1) }.expect("in bounds")[0], 0);
        drop(link);
    }

    #[test]
    fn accept_times_out_without_a_peer() {
        let p = SimProvider::new();
        let l = p.listen(([10, 0, 0, 2], 1).into()).expect("listen");
        let mut o = ConnectOptions::new(Role::Destination);
        o.timeout = Duration::from_millis(20);
        assert!(matches!(
            l.accept(&o),
            Err(ConnectError::Timeout { step: "accept", .. })
        ));
    }
}
