// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Unit tests of the stream data path against the simulated fabric of [`super::sim`], one wire
//! per test, receiver-not-ready retries off (a WRITE_WITH_IMM without a posted receive fails at
//! once with RNR_RETRY_EXC), keys registered by hand.
// Test arithmetic on small, known sizes.
#![allow(clippy::cast_possible_truncation)]

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::memory::{BouncePool, RegisteredMemory, Role};
use super::region::{
    ChunkTable, GuestRange, GuestRegion, ImportLimits, LocalChunk, RemoteMap, plan_chunks,
};
use super::sim::{Fabric, FakeQueue};
use super::stream::{CompletionOp, RdmaStream, StreamConfig, StreamError, StreamKind};
use super::sys::AnonMapping;
use super::window::{WcStatus, WrOp};

const PAGE: u64 = 4096;

/// One side's guest memory: regions at gpa 0..32 pages and 40..56 pages, back to back in one
/// mapping, chunked by `chunk_pages`, with keys `key_base + i` registered in the fabric.
struct Guest {
    mem: AnonMapping,
    reg: Arc<RegisteredMemory>,
}

fn memory_map() -> Vec<GuestRange> {
    vec![
        GuestRange::new(0, 32 * PAGE),
        GuestRange::new(40 * PAGE, 16 * PAGE),
    ]
}

fn host_offset(gpa: u64) -> u64 {
    if gpa >= 40 * PAGE {
        gpa - 8 * PAGE
    } else {
        gpa
    }
}

fn guest(
    fabric: &Arc<Mutex<Fabric>>,
    chunk_pages: u64,
    key_base: u32,
    role: Role,
    seed: u8,
) -> Guest {
    let mem = AnonMapping::new((48 * PAGE) as usize).expect("mapping");
    if seed != 0 {
        let data: Vec<u8> = (0..mem.len())
            .map(|i| {
                ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(seed)).to_be_bytes()[0]
            })
            .collect();
        mem.write_for_test(0, &data);
    }
    let regions: Vec<GuestRegion> = memory_map()
        .iter()
        .map(|r| GuestRegion {
            gpa: r.gpa,
            host_addr: mem.addr() + host_offset(r.gpa),
            len: r.len,
        })
        .collect();
    let plan = plan_chunks(&regions, chunk_pages * PAGE, PAGE).expect("plan");
    let mut f = fabric.lock().expect("fabric lock");
    let chunks = plan
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let key = key_base + u32::try_from(i).expect("few chunks");
            f.keys.insert(key, (c.host_addr, c.len));
            LocalChunk {
                gpa: c.gpa,
                host_addr: c.host_addr,
                len: c.len,
                lkey: key,
                rkey: key,
            }
        })
        .collect();
    let reg = RegisteredMemory::for_test(ChunkTable::new(chunks).expect("table"), role, 0);
    Guest { mem, reg }
}

impl Guest {
    fn bytes(&self, gpa: u64, len: u64) -> &[u8] {
        // SAFETY: the simulator only touches this memory inside `post_send`, which is not
        // running while the test reads it.
        unsafe { self.mem.bytes(host_offset(gpa) as usize, len as usize) }.expect("in bounds")
    }
}

fn stream(
    fabric: &Arc<Mutex<Fabric>>,
    me: usize,
    kind: StreamKind,
    depth: usize,
    signal_every: usize,
    recv_depth: usize,
    max_wr_pages: u32,
) -> RdmaStream {
    let keep: Arc<dyn fmt::Debug + Send + Sync> = Arc::new(());
    let cfg = StreamConfig {
        index: me,
        kind,
        send_depth: depth,
        recv_depth,
        signal_every,
        max_wr_bytes: max_wr_pages * 4096,
        pd_key: 0,
    };
    let mut s = RdmaStream::new(
        Box::new(FakeQueue {
            fabric: Arc::clone(fabric),
            wire: 0,
            me,
        }),
        keep,
        cfg,
    );
    s.fill_receives().expect("receives");
    s
}

fn import(peer: &Guest) -> RemoteMap {
    RemoteMap::import(&peer.reg.export(), &memory_map(), ImportLimits::default()).expect("import")
}

const T: Duration = Duration::from_secs(5);

#[test]
fn pushed_batches_land_at_the_same_gpa_and_release_their_guards() {
    let fabric = Arc::new(Mutex::new(Fabric::default()));
    let src = guest(&fabric, 8, 1000, Role::Source, 7);
    let dst = guest(&fabric, 5, 2000, Role::Destination, 0);
    // A small window and WR size force many posts, waits for slots and chunk-boundary splits.
    let mut tx = stream(&fabric, 0, StreamKind::Bulk, 4, 3, 0, 3);
    let mut rx = stream(&fabric, 1, StreamKind::Bulk, 4, 3, 8, 3);
    let remote = import(&dst);
    let batches: [&[GuestRange]; 3] = [
        &[GuestRange::new(0, 13 * PAGE)],
        &[
            GuestRange::new(13 * PAGE, 19 * PAGE),
            GuestRange::new(40 * PAGE, PAGE),
        ],
        &[GuestRange::new(42 * PAGE, 14 * PAGE - 100)],
    ];
    let mut wrs = 0;
    for (i, ranges) in batches.iter().enumerate() {
        let stats = tx
            .write_batch(&src.reg, &remote, ranges, 10 + i as u32, T)
            .expect("write");
        wrs += stats.work_requests;
    }
    tx.flush(T).expect("flush");
    assert_eq!(tx.outstanding(), 0);
    assert_eq!(
        Arc::strong_count(&src.reg),
        1,
        "every WR guard was released"
    );
    assert!(tx.stats().posts > 3, "the window forced several doorbells");
    assert_eq!(tx.stats().send_wrs, wrs as u64);
    let ids: Vec<u32> = (0..3)
        .map(|_| rx.wait_arrival(T).expect("arrival").batch)
        .collect();
    assert_eq!(ids, vec![10, 11, 12]);
    assert_eq!(rx.receives_posted(), 8, "consumed receives are reposted");
    for r in batches.iter().flat_map(|b| b.iter()) {
        assert_eq!(
            src.bytes(r.gpa, r.len),
            dst.bytes(r.gpa, r.len),
            "range {r:?}"
        );
    }
    // Page 41 was never pushed and the tail of the last range was not either.
    assert!(dst.bytes(41 * PAGE, PAGE).iter().all(|&b| b == 0));
    assert!(dst.bytes(56 * PAGE - 100, 100).iter().all(|&b| b == 0));
    assert_ne!(src.bytes(41 * PAGE, PAGE), dst.bytes(41 * PAGE, PAGE));
}

#[test]
fn receives_are_reposted_and_a_missing_receive_is_reported() {
    let fabric = Arc::new(Mutex::new(Fabric::default()));
    let src = guest(&fabric, 8, 1000, Role::Source, 3);
    let dst = guest(&fabric, 8, 2000, Role::Destination, 0);
    let mut tx = stream(&fabric, 0, StreamKind::Bulk, 16, 4, 0, 16);
    let mut rx = stream(&fabric, 1, StreamKind::Bulk, 16, 4, 2, 16);
    let remote = import(&dst);
    for batch in 0..5u32 {
        let r = GuestRange::new(u64::from(batch) * PAGE, PAGE);
        tx.write_batch(&src.reg, &remote, &[r], batch, T)
            .expect("write");
        assert_eq!(rx.wait_arrival(T).expect("arrival").batch, batch);
        assert_eq!(rx.receives_posted(), 2);
    }
    // Without the destination polling, the third WRITE_WITH_IMM finds no receive.
    for batch in 5..8u32 {
        let r = GuestRange::new(u64::from(batch) * PAGE, PAGE);
        tx.write_batch(&src.reg, &remote, &[r], batch, T)
            .expect("posted");
    }
    let err = tx.flush(T).expect_err("receiver not ready");
    let StreamError::Completion(c) = err else {
        panic!("expected a completion error, got {err}");
    };
    assert_eq!(c.status, WcStatus::RnrRetryExceeded);
    assert_eq!(c.op, CompletionOp::Send(WrOp::WriteImm));
    assert_eq!((c.gpa, c.len), (7 * PAGE, 4096));
    assert!(c.status.is_peer_lost());
}

#[test]
fn read_to_bounce_fetches_across_peer_chunks_without_the_peer() {
    let fabric = Arc::new(Mutex::new(Fabric::default()));
    let src = guest(&fabric, 8, 1000, Role::Source, 9);
    let pool = BouncePool::for_test(2, (4 * PAGE) as usize, 3000, 0);
    fabric
        .lock()
        .expect("lock")
        .keys
        .insert(3000, pool.test_span());
    let mut urgent = stream(&fabric, 1, StreamKind::Urgent, 8, 8, 0, 1);
    let remote = import(&src);
    // 6..10 pages straddles the source's 8-page chunk boundary; WR limit of one page.
    let range = GuestRange::new(6 * PAGE, 4 * PAGE);
    let filled = urgent
        .read_to_bounce(&remote, range, &pool, T)
        .expect("read");
    assert_eq!(filled.gpa(), 6 * PAGE);
    assert_eq!(filled.len(), (4 * PAGE) as usize);
    assert_eq!(filled.bytes(), src.bytes(6 * PAGE, 4 * PAGE));
    assert_eq!(urgent.stats().send_wrs, 4);
    assert_eq!(pool.available(), 1);
    // Two tickets in flight at once, completed out of the order they are awaited in.
    let slot = filled.into_slot();
    let other = pool.try_acquire().expect("second slot");
    let a = urgent
        .post_read(&remote, GuestRange::new(40 * PAGE, PAGE), slot, T)
        .expect("post a");
    let b = urgent
        .post_read(&remote, GuestRange::new(55 * PAGE, PAGE), other, T)
        .expect("post b");
    let fb = urgent.wait_read(b, T).expect("b");
    let fa = urgent.wait_read(a, T).expect("a");
    assert_eq!(fa.bytes(), src.bytes(40 * PAGE, PAGE));
    assert_eq!(fb.bytes(), src.bytes(55 * PAGE, PAGE));
    assert_eq!(pool.available(), 0);
    assert!(matches!(
        urgent.read_to_bounce(&remote, range, &pool, T),
        Err(StreamError::PoolExhausted { slots: 2, .. })
    ));
    drop((fa, fb));
    assert_eq!(pool.available(), 2);
    let too_big = GuestRange::new(0, 5 * PAGE);
    assert!(matches!(
        urgent.read_to_bounce(&remote, too_big, &pool, T),
        Err(StreamError::Translate { .. })
    ));
    assert_eq!(pool.available(), 2, "the slot of a rejected read goes back");
}

#[test]
fn read_in_place_lands_at_the_same_gpa_in_our_registration() {
    let fabric = Arc::new(Mutex::new(Fabric::default()));
    let src = guest(&fabric, 8, 1000, Role::Source, 9);
    let dst = guest(&fabric, 5, 2000, Role::Destination, 0);
    // One-page work requests: the range straddles both sides' chunk boundaries.
    let mut urgent = stream(&fabric, 1, StreamKind::Urgent, 16, 4, 0, 1);
    let remote = import(&src);
    let range = GuestRange::new(3 * PAGE, 8 * PAGE);
    // SAFETY: the test owns `dst`'s memory and reads it only after the READ completed.
    let t = unsafe { urgent.post_read_in_place(&dst.reg, &remote, range, T) }.expect("post");
    urgent.flush(T).expect("completed");
    let done = urgent.take_reads();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].0, t);
    assert!(matches!(
        done[0].1,
        crate::rdma::ReadDone::InPlace { gpa, len } if gpa == 3 * PAGE && len == 8 * PAGE
    ));
    assert_eq!(dst.bytes(3 * PAGE, 8 * PAGE), src.bytes(3 * PAGE, 8 * PAGE));
    assert!(dst.bytes(2 * PAGE, PAGE).iter().all(|&b| b == 0));
    assert_eq!(Arc::strong_count(&dst.reg), 1, "every guard was released");
    // A range our registration does not cover is refused before anything is posted.
    // SAFETY: as above; nothing is posted.
    let outside = unsafe {
        urgent.post_read_in_place(&dst.reg, &remote, GuestRange::new(60 * PAGE, PAGE), T)
    };
    assert!(matches!(outside, Err(StreamError::Translate { .. })));
}

#[test]
fn a_bad_rkey_fails_the_stream_with_the_range_and_keeps_guards_until_drop() {
    let fabric = Arc::new(Mutex::new(Fabric::default()));
    let src = guest(&fabric, 8, 1000, Role::Source, 5);
    let dst = guest(&fabric, 8, 2000, Role::Destination, 0);
    let mut tx = stream(&fabric, 0, StreamKind::Bulk, 32, 4, 0, 2);
    let _rx = stream(&fabric, 1, StreamKind::Bulk, 32, 4, 8, 2);
    let mut desc = dst.reg.export();
    let last = desc.len() - 1;
    desc[last].rkey ^= 0x5a5a;
    let remote = RemoteMap::import(&desc, &memory_map(), ImportLimits::default()).expect("import");
    let bad_from = desc[last].gpa;
    tx.write_batch(
        &src.reg,
        &remote,
        &[GuestRange::new(bad_from - 4 * PAGE, 8 * PAGE)],
        1,
        T,
    )
    .expect("posted");
    let err = tx.flush(T).expect_err("remote access error");
    let StreamError::Completion(c) = &err else {
        panic!("expected a completion error, got {err}");
    };
    assert_eq!(c.status, WcStatus::RemoteAccess);
    assert_eq!(c.op, CompletionOp::Send(WrOp::Write));
    assert_eq!(c.gpa, bad_from, "the first WR into the bad region is named");
    assert!(c.status.is_protection());
    assert!(err.to_string().contains(&format!("{bad_from:#x}")), "{err}");
    assert!(matches!(
        tx.poll(),
        Err(StreamError::Failed { stream: 0, .. })
    ));
    assert!(matches!(
        tx.write_batch(&src.reg, &remote, &[GuestRange::new(0, PAGE)], 2, T),
        Err(StreamError::Failed { .. })
    ));
    assert!(
        Arc::strong_count(&src.reg) > 1,
        "guards held while the queue pair lives"
    );
    drop(tx);
    assert_eq!(Arc::strong_count(&src.reg), 1);
}

#[test]
fn back_pressure_is_bounded_by_the_timeout() {
    let fabric = Arc::new(Mutex::new(Fabric::default()));
    let src = guest(&fabric, 8, 1000, Role::Source, 1);
    let dst = guest(&fabric, 8, 2000, Role::Destination, 0);
    let mut tx = stream(&fabric, 0, StreamKind::Bulk, 4, 2, 0, 1);
    let _rx = stream(&fabric, 1, StreamKind::Bulk, 4, 2, 64, 1);
    let remote = import(&dst);
    fabric.lock().expect("lock").stall = true;
    let start = Instant::now();
    let err = tx
        .write_batch(
            &src.reg,
            &remote,
            &[GuestRange::new(0, 8 * PAGE)],
            1,
            Duration::from_millis(50),
        )
        .expect_err("window never drains");
    assert!(
        matches!(
            err,
            StreamError::Timeout {
                what: "send-queue slots",
                ..
            }
        ),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(tx.outstanding(), 4);
}

#[test]
fn bad_requests_are_refused_before_posting() {
    let fabric = Arc::new(Mutex::new(Fabric::default()));
    let src = guest(&fabric, 8, 1000, Role::Source, 1);
    let dst = guest(&fabric, 8, 2000, Role::Destination, 0);
    let mut tx = stream(&fabric, 0, StreamKind::Bulk, 8, 2, 0, 4);
    let remote = import(&dst);
    assert!(matches!(
        tx.write_batch(&src.reg, &remote, &[], 3, T),
        Err(StreamError::EmptyBatch { batch: 3, .. })
    ));
    assert!(matches!(
        tx.write_batch(&src.reg, &remote, &[GuestRange::new(32 * PAGE, PAGE)], 3, T),
        Err(StreamError::Translate { .. })
    ));
    let foreign = RegisteredMemory::for_test(src.reg.table().clone(), Role::Source, 77);
    assert!(matches!(
        tx.write_batch(&foreign, &remote, &[GuestRange::new(0, PAGE)], 3, T),
        Err(StreamError::ForeignRegistration { .. })
    ));
    assert_eq!(tx.stats().send_wrs, 0);
    assert_eq!(tx.qp_number(), 0x100);
}

// The framed stream (`framed.rs`): headers over a real loopback TCP connection, payload through
// the simulated queue pairs.

mod framed_streams {
    use super::*;
    use crate::memory::{GpaRange, GuestRegion as HostRegion, MemoryRegistration, Target};
    use crate::rdma::framed::{FramedError, PushTarget, RdmaDataStream, encode_imm};
    use crate::socket::{Endpoint, Listener, Socket};
    use crate::stream::{Backend, DataStream, StreamConfig as SocketConfig, open_stream};
    use crate::{RegistrationConfig, StreamError as DataError};

    /// Registers the first region (gpa 0, 32 pages) of `g` for a socket stream.
    fn socket_registration(g: &Guest) -> Arc<MemoryRegistration> {
        let region = HostRegion::new(0, g.mem.addr() as *mut u8, 32 * PAGE);
        // SAFETY: the mapping outlives the streams (the tests drop them first).
        unsafe { MemoryRegistration::new(&[region], RegistrationConfig::default()) }
            .expect("registration")
    }

    /// Two plain TCP streams connected over loopback, for frame headers (and in-band payload,
    /// from `src`'s memory into `dst`'s).
    fn header_pair(src: &Guest, dst: &Guest) -> (Box<dyn DataStream>, Box<dyn DataStream>) {
        let (reg_tx, reg_rx) = (socket_registration(src), socket_registration(dst));
        let l = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".parse().expect("addr"))).expect("bind");
        let ep = l.endpoint().expect("endpoint");
        let c = Socket::connect(&ep, T).expect("connect");
        let a = l.accept(T).expect("accept");
        let cfg = SocketConfig {
            backend: Backend::Socket,
            timeout: T,
            ..SocketConfig::default()
        };
        (
            open_stream(c, 0, &reg_tx, &cfg).expect("open"),
            open_stream(a, 0, &reg_rx, &cfg).expect("open"),
        )
    }

    struct Pair {
        src: Guest,
        dst: Guest,
        tx: RdmaDataStream,
        rx: RdmaDataStream,
    }

    fn pair(max_units: u64, raw: impl FnOnce(&mut RdmaStream, &Guest, &RemoteMap)) -> Pair {
        let fabric = Arc::new(Mutex::new(Fabric::default()));
        let src = guest(&fabric, 8, 1000, Role::Source, 11);
        let dst = guest(&fabric, 8, 2000, Role::Destination, 0);
        let mut q_tx = stream(&fabric, 0, StreamKind::Bulk, 16, 4, 0, 4);
        let q_rx = stream(&fabric, 1, StreamKind::Bulk, 16, 4, 8, 4);
        let remote = import(&dst);
        raw(&mut q_tx, &src, &remote);
        let (h_tx, h_rx) = header_pair(&src, &dst);
        let target = PushTarget {
            local: Arc::clone(&src.reg),
            remote: Arc::new(remote),
        };
        let tx = RdmaDataStream::source(h_tx, q_tx, target, T).with_max_batch_units(max_units);
        let rx = RdmaDataStream::destination(h_rx, q_rx, T);
        Pair { src, dst, tx, rx }
    }

    fn inner(e: &DataError) -> String {
        match e {
            DataError::Rdma { source, .. } => source.to_string(),
            other => panic!("expected an RDMA error, got {other}"),
        }
    }

    #[test]
    fn frames_land_by_write_with_headers_over_tcp_across_batches() {
        // Batches of at most 5 pages: the second frame spans four batches.
        let mut p = pair(5, |_, _, _| {});
        let a = [GpaRange::new(0, 3 * PAGE)];
        let b = [
            GpaRange::new(8 * PAGE, 12 * PAGE),
            GpaRange::new(40 * PAGE, 4 * PAGE),
        ];
        p.tx.send_frame(b"first", &a).expect("a");
        p.tx.send_frame(b"second", &b).expect("b");
        p.tx.send_frame(b"end", &[]).expect("end");
        p.tx.flush().expect("flush");

        let mut h = [0u8; 5];
        p.rx.recv_exact(&mut h).expect("header a");
        assert_eq!(&h, b"first");
        p.rx.recv_into(&a, Target::Guest).expect("payload a");
        let mut h = [0u8; 6];
        p.rx.recv_exact(&mut h).expect("header b");
        assert_eq!(&h, b"second");
        // The receiver asks in pieces that do not match the batches (as the engine does when a
        // frame's ranges land in different mappings).
        p.rx.recv_into(&b[..1], Target::Guest).expect("payload b0");
        p.rx.recv_into(&b[1..], Target::Alias).expect("payload b1");
        let mut h = [0u8; 3];
        p.rx.recv_exact(&mut h).expect("header end");
        assert_eq!(&h, b"end");
        for r in a.iter().chain(&b) {
            assert_eq!(
                p.src.bytes(r.gpa, r.len),
                p.dst.bytes(r.gpa, r.len),
                "{r:?}"
            );
        }
        // Never pushed: still zero on the destination.
        assert!(p.dst.bytes(3 * PAGE, 5 * PAGE).iter().all(|&x| x == 0));
        let (tx, rx) = (p.tx.stats(), p.rx.stats());
        assert_eq!(tx.bytes_sent, 14 + 19 * PAGE, "headers plus pushed payload");
        assert_eq!(rx.bytes_received, 14 + 19 * PAGE);
        assert_eq!(p.tx.backend(), "rdma");
    }

    #[test]
    fn after_the_in_band_marker_payload_travels_on_tcp_in_order() {
        let mut p = pair(64, |_, _, _| {});
        let a = [GpaRange::new(0, 2 * PAGE)];
        let b = [GpaRange::new(4 * PAGE, 3 * PAGE)];
        p.tx.send_frame(b"A", &a).expect("a");
        p.tx.end_direct_placement().expect("switch");
        p.tx.end_direct_placement()
            .expect("switching twice is harmless");
        p.tx.send_frame(b"B", &b).expect("b");
        p.tx.flush().expect("flush");
        let writes = p.tx.stats().sqes;
        let mut h = [0u8; 1];
        p.rx.recv_exact(&mut h).expect("header a");
        p.rx.recv_into(&a, Target::Guest).expect("payload a (RDMA)");
        p.rx.recv_exact(&mut h).expect("header b");
        assert_eq!(&h, b"B");
        // The marker comes where batch 1 would; this payload and the rest are in-band.
        p.rx.recv_into(&b[..], Target::Guest)
            .expect("payload b (TCP)");
        for r in a.iter().chain(&b) {
            assert_eq!(
                p.src.bytes(r.gpa, r.len),
                p.dst.bytes(r.gpa, r.len),
                "{r:?}"
            );
        }
        // In-band receives may target a file-backed region again.
        p.rx.recv_into(&[], Target::File)
            .expect("in-band receives take any target");
        assert_eq!(
            writes,
            p.tx.stats().sqes,
            "nothing more was posted after the marker"
        );
    }

    #[test]
    fn the_destination_revokes_direct_writes_at_the_switch() {
        let mut p = pair(64, |_, _, _| {});
        let remote = import(&p.dst);
        let a = [GpaRange::new(0, PAGE)];
        p.tx.send_frame(b"A", &a).expect("a");
        p.tx.end_direct_placement().expect("switch");
        p.tx.send_frame(b"B", &a).expect("b (in-band)");
        let mut h = [0u8; 1];
        p.rx.recv_exact(&mut h).expect("header a");
        p.rx.recv_into(&a, Target::Guest).expect("payload a");
        // Before the first frame after the switch: waits for the marker, destroys the QP.
        p.rx.end_direct_placement().expect("revoke");
        p.rx.end_direct_placement()
            .expect("revoking twice is harmless");
        p.rx.recv_exact(&mut h).expect("header b");
        p.rx.recv_into(&a, Target::Guest).expect("payload b");
        // A WRITE from the source's queue pair now finds no peer.
        let q = p.tx.queue_pair().expect("the source keeps its queue pair");
        q.write_batch(
            &p.src.reg,
            &remote,
            &[GuestRange::new(8 * PAGE, PAGE)],
            encode_imm(9, 1),
            T,
        )
        .expect("posted");
        let e = q.flush(T).expect_err("the destination revoked it");
        let StreamError::Completion(c) = e else {
            panic!("expected a completion error, got {e}");
        };
        assert!(c.status.is_peer_lost(), "{c}");
        assert!(p.dst.bytes(8 * PAGE, PAGE).iter().all(|&x| x == 0));
    }

    #[test]
    fn a_batch_where_the_switch_is_due_fails() {
        let mut p = pair(64, |_, _, _| {});
        p.tx.send_frame(b"A", &[GpaRange::new(0, PAGE)]).expect("a");
        let mut h = [0u8; 1];
        p.rx.recv_exact(&mut h).expect("header");
        // The engine expects the switch here, but batch 0 is still unclaimed: the frame's
        // payload was not received, so its credit is not there either; the batch comes first.
        let e = p.rx.end_direct_placement().expect_err("no marker");
        assert_eq!(
            inner(&e),
            FramedError::BatchAfterSwitch { sequence: 0 }.to_string()
        );
    }

    #[test]
    fn a_marker_inside_a_frame_fails() {
        // Batch 0 with one page, then the marker (number 1), where the frame expects two pages.
        let mut p = pair(64, |q, src, remote| {
            q.write_batch(
                &src.reg,
                remote,
                &[GuestRange::new(0, PAGE)],
                encode_imm(0, 1),
                T,
            )
            .expect("raw write");
            q.post_marker(&src.reg, remote, encode_imm(1, 0), T)
                .expect("raw marker");
        });
        p.tx.send_frame(b"h", &[]).expect("header");
        let mut h = [0u8; 1];
        p.rx.recv_exact(&mut h).expect("header");
        let e =
            p.rx.recv_into(&[GpaRange::new(0, 2 * PAGE)], Target::Guest)
                .expect_err("marker inside the frame");
        assert_eq!(
            inner(&e),
            FramedError::MarkerInFrame {
                sequence: 1,
                consumed: PAGE
            }
            .to_string()
        );
    }

    #[test]
    fn a_frame_that_leaves_batch_bytes_unclaimed_fails() {
        let mut p = pair(64, |_, _, _| {});
        p.tx.send_frame(b"h", &[GpaRange::new(0, 4 * PAGE)])
            .expect("send");
        p.tx.send_frame(b"n", &[]).expect("send");
        let mut h = [0u8; 1];
        p.rx.recv_exact(&mut h).expect("header");
        p.rx.recv_into(&[GpaRange::new(0, 2 * PAGE)], Target::Guest)
            .expect("part");
        let e = p.rx.recv_exact(&mut h).expect_err("leftover");
        assert_eq!(
            inner(&e),
            FramedError::Leftover {
                sequence: 0,
                left: 2 * PAGE
            }
            .to_string()
        );
    }

    #[test]
    fn an_out_of_sequence_batch_fails_the_receiver() {
        // A batch with sequence 5 goes first, where 0 is due.
        let mut p = pair(64, |q, src, remote| {
            q.write_batch(
                &src.reg,
                remote,
                &[GuestRange::new(0, PAGE)],
                encode_imm(5, 1),
                T,
            )
            .expect("raw write");
        });
        p.tx.send_frame(b"h", &[GpaRange::new(PAGE, PAGE)])
            .expect("send");
        let mut h = [0u8; 1];
        p.rx.recv_exact(&mut h).expect("header");
        let e =
            p.rx.recv_into(&[GpaRange::new(PAGE, PAGE)], Target::Guest)
                .expect_err("sequence");
        assert_eq!(
            inner(&e),
            FramedError::Sequence {
                expected: 0,
                got: 5
            }
            .to_string()
        );
    }

    #[test]
    fn unusable_ranges_targets_and_sides_are_refused() {
        let mut p = pair(64, |_, _, _| {});
        let e =
            p.tx.send_frame(b"h", &[GpaRange::new(0, 100)])
                .expect_err("unaligned");
        assert_eq!(
            inner(&e),
            FramedError::Unaligned { gpa: 0, len: 100 }.to_string()
        );
        assert_eq!(p.tx.stats().bytes_sent, 0, "nothing was posted or sent");
        // A page pushed into registered memory cannot be claimed as received into a file.
        p.tx.send_frame(b"h", &[GpaRange::new(0, PAGE)])
            .expect("send");
        let mut h = [0u8; 1];
        p.rx.recv_exact(&mut h).expect("header");
        let e =
            p.rx.recv_into(&[GpaRange::new(0, PAGE)], Target::File)
                .expect_err("file");
        assert!(inner(&e).contains("File"), "{e}");
        assert!(
            p.tx.recv_into(&[GpaRange::new(0, PAGE)], Target::Guest)
                .is_err()
        );
        assert!(p.rx.send_frame(b"h", &[GpaRange::new(0, PAGE)]).is_err());
        // After shutdown the queue pair is gone.
        p.rx.shutdown().expect("shutdown");
        let e =
            p.rx.recv_into(&[GpaRange::new(0, PAGE)], Target::Guest)
                .expect_err("gone");
        assert_eq!(inner(&e), FramedError::Gone.to_string());
    }
}
