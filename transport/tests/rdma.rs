// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Device tests of the RDMA backend. Each test checks for what it needs and returns early with a
//! printed reason when it is missing:
//! - an RDMA device (`ibv_get_device_list` non-empty) for registration tests;
//! - additionally `FERRY_RDMA_ADDR` (an IP address of an RDMA-capable interface, e.g. the address
//!   of the netdev under a ConnectX port or an rxe device) for the rdmacm loopback tests, since
//!   rdmacm cannot route 127.0.0.1.
//!
//! `connect_without_route_fails_cleanly` runs everywhere: it checks that a connection attempt
//! that cannot succeed ends in a typed error within its timeout.
#![cfg(feature = "rdma")]
#![allow(clippy::unwrap_used)]

#[cfg(test)]
mod tests {

    use std::net::{IpAddr, SocketAddr};
    use std::sync::{Arc, mpsc};
    use std::thread;
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result, bail};
    use ferry_transport::rdma::{
        self, ConnEvent, ConnectError, ConnectOptions, GuestRange, GuestRegion, ImportLimits,
        RdmaDevice, RegisterOptions, RegisteredMemory, RemoteMap, RemoteRegion, Role, StreamError,
        WcStatus,
    };

    const MIB: u64 = 1 << 20;
    const PAGE: u64 = 4096;

    /// Anonymous test memory, accessed only through raw pointers while registered.
    struct TestMem {
        ptr: *mut u8,
        len: usize,
    }

    // SAFETY: plain process memory; the tests synchronise access through RDMA completions.
    unsafe impl Send for TestMem {}

    impl TestMem {
        fn new(len: u64) -> Self {
            let len = usize::try_from(len).unwrap();
            // SAFETY: a fresh anonymous mapping touches no existing memory.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                    -1,
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED, "mmap failed");
            Self {
                ptr: ptr.cast(),
                len,
            }
        }

        fn addr(&self) -> u64 {
            self.ptr as u64
        }

        fn fill_pattern(&mut self, seed: u8) {
            for i in 0..self.len {
                let x = (i as u64) ^ (u64::from(seed) << 40);
                let byte = x.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes()[0];
                // SAFETY: `i < len`: in bounds of the mapping.
                let p = unsafe { self.ptr.add(i) };
                // SAFETY: valid, exclusively owned memory; no device access yet.
                unsafe { p.write(byte) };
            }
        }

        fn bytes(&self, off: u64, len: u64) -> &[u8] {
            let (off, len) = (usize::try_from(off).unwrap(), usize::try_from(len).unwrap());
            assert!(off + len <= self.len);
            // SAFETY: `off <= len` of the mapping.
            let p = unsafe { self.ptr.add(off) };
            // SAFETY: in bounds; callers read only after the transfer's completion.
            unsafe { std::slice::from_raw_parts(p, len) }
        }
    }

    impl Drop for TestMem {
        fn drop(&mut self) {
            // SAFETY: we own the mapping and every registration over it was dropped before us.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    fn device_or_skip(test: &str) -> Option<RdmaDevice> {
        match RdmaDevice::open(None) {
            Ok(d) => Some(d),
            Err(e) if e.is_no_device() => {
                let cause =
                    std::error::Error::source(&e).map_or(String::new(), |c| format!(": {c}"));
                eprintln!(
                    "skipping {test}: {e}{cause} (ibv_get_device_list is empty or unavailable)"
                );
                None
            }
            Err(e) => panic!("{test}: opening the RDMA device failed: {e}"),
        }
    }

    fn rdma_addr_or_skip(test: &str) -> Option<IpAddr> {
        device_or_skip(test)?;
        match std::env::var("FERRY_RDMA_ADDR") {
            Ok(s) => Some(s.parse().expect("FERRY_RDMA_ADDR must be an IP address")),
            Err(_) => {
                eprintln!(
                    "skipping {test}: set FERRY_RDMA_ADDR to an IP address of an RDMA interface \
                 (rdmacm cannot use 127.0.0.1)"
                );
                None
            }
        }
    }

    #[test]
    fn registration_chunks_keys_and_guards() -> Result<()> {
        let Some(dev) = device_or_skip("registration_chunks_keys_and_guards") else {
            return Ok(());
        };
        let limits = dev.limits();
        assert!(
            limits.max_qp_wr > 0 && limits.max_mr_size >= MIB,
            "{limits:?}"
        );
        let pd = dev.alloc_pd()?;
        let mem = TestMem::new(4 * MIB);
        let regions = [GuestRegion {
            gpa: 0x1_0000_0000,
            host_addr: mem.addr(),
            len: 4 * MIB,
        }];
        let opts = RegisterOptions {
            max_chunk: Some(MIB),
            page_size: PAGE,
            on_demand: false,
        };
        for role in [Role::Source, Role::Destination] {
            // SAFETY: `mem` outlives the registration (dropped at the end of this iteration).
            let reg = unsafe { pd.register_guest_memory(&regions, role, opts) }?;
            assert_eq!(reg.region_count(), 4);
            let desc = reg.export();
            assert_eq!(desc.len(), 4);
            for (i, d) in desc.iter().enumerate() {
                assert_eq!(d.gpa, 0x1_0000_0000 + i as u64 * MIB);
                assert_eq!(d.addr, mem.addr() + i as u64 * MIB);
                assert_eq!(d.rkey, reg.table().chunks()[i].rkey);
            }
            let segs = reg.translate(0x1_0000_0000 + MIB - PAGE, 2 * PAGE)?;
            assert_eq!(segs.len(), 2);
            assert_ne!(segs[0].lkey, segs[1].lkey, "one memory region per chunk");
            // A clone (as an outstanding work request holds) blocks deregistration.
            let held = Arc::clone(&reg);
            let busy = RegisteredMemory::try_deregister(reg).expect_err("registration is held");
            let rdma::DeregisterError::Busy {
                outstanding,
                registration,
                ..
            } = busy;
            assert_eq!(outstanding, 1);
            drop(held);
            RegisteredMemory::try_deregister(registration)?;
        }
        let pool = pd.bounce_pool(4, 8192)?;
        let a = pool.try_acquire().context("slot")?;
        assert_eq!((a.capacity(), pool.available()), (8192, 3));
        drop(a);
        assert_eq!(pool.available(), 4);
        Ok(())
    }

    #[test]
    fn connect_without_route_fails_cleanly() {
        // 127.0.0.1 is never routable for rdmacm, and on machines without RDMA even the event
        // channel is missing: either way a typed error must come back within the timeout.
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut opts = ConnectOptions::new(Role::Source);
            opts.timeout = Duration::from_secs(2);
            let start = Instant::now();
            let r = rdma::connect("127.0.0.1:7471".parse().unwrap(), &opts);
            let _ = tx.send((r.map(|_| ()), start.elapsed()));
        });
        let (result, took) = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("connect hung past its timeout");
        let err = result.expect_err("connecting to loopback over rdmacm cannot succeed");
        eprintln!("connect error after {took:?}: {err}");
        assert!(
            matches!(
                err,
                ConnectError::Verbs { .. }
                    | ConnectError::Event { .. }
                    | ConnectError::Timeout { .. }
                    | ConnectError::NoDeviceForRoute { .. }
            ),
            "unexpected error kind: {err:?}"
        );
    }

    /// Memory map used by the loopback tests: two guest regions with a hole at 3..4 MiB.
    fn memory_map() -> Vec<GuestRange> {
        vec![
            GuestRange::new(0, 3 * MIB),
            GuestRange::new(4 * MIB, 2 * MIB),
        ]
    }

    /// The two regions, back to back in one 5 MiB test mapping.
    fn regions_for(mem: &TestMem) -> Vec<GuestRegion> {
        memory_map()
            .iter()
            .map(|r| GuestRegion {
                gpa: r.gpa,
                host_addr: mem.addr() + host_offset(r.gpa),
                len: r.len,
            })
            .collect()
    }

    fn host_offset(gpa: u64) -> u64 {
        if gpa >= 4 * MIB { gpa - MIB } else { gpa }
    }

    struct DestReport {
        arrivals: Vec<(usize, u32)>,
        digest_ok: bool,
        read_ok: bool,
        saw_disconnect: bool,
    }

    #[test]
    fn loopback_write_imm_read_and_disconnect() -> Result<()> {
        let Some(ip) = rdma_addr_or_skip("loopback_write_imm_read_and_disconnect") else {
            return Ok(());
        };
        let addr = SocketAddr::new(ip, 7472);
        let listener = rdma::RdmaListener::bind(addr)?;
        let (src_desc_tx, src_desc_rx) = mpsc::channel::<Vec<RemoteRegion>>();
        let (dst_desc_tx, dst_desc_rx) = mpsc::channel::<Vec<RemoteRegion>>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let streams = 2;
        let register = RegisterOptions {
            max_chunk: Some(MIB),
            page_size: PAGE,
            on_demand: false,
        };
        let timeout = Duration::from_secs(10);

        // Destination: accept, register zeroed memory, expose it, wait for the batches, verify.
        let dest = thread::spawn(move || -> Result<DestReport> {
            let mut opts = ConnectOptions::new(Role::Destination);
            opts.streams = streams;
            // Declared before `conn`, so dropped after it (and after every registration over it).
            let mem = TestMem::new(5 * MIB);
            let mut conn = listener.accept(&opts)?;
            // SAFETY: `mem` outlives `conn` (declared earlier, dropped later) and is read only
            // after the arrivals say the data is placed.
            let reg = unsafe {
                conn.pd()
                    .register_guest_memory(&regions_for(&mem), Role::Destination, register)
            }?;
            dst_desc_tx.send(conn.expose(&reg)?)?;
            let src = RemoteMap::import(
                &src_desc_rx.recv_timeout(timeout)?,
                &memory_map(),
                ImportLimits::default(),
            )?;
            let mut arrivals = Vec::new();
            for (i, s) in conn.streams_mut().iter_mut().enumerate() {
                for _ in 0..2 {
                    arrivals.push((i, s.wait_arrival(timeout)?.batch));
                }
            }
            // The source filled its memory with pattern 7; compare what landed here.
            let mut expect = TestMem::new(5 * MIB);
            expect.fill_pattern(7);
            let digest_ok = xxhash_rust::xxh3::xxh3_64(mem.bytes(0, 5 * MIB))
                == xxhash_rust::xxh3::xxh3_64(expect.bytes(0, 5 * MIB));
            // Post-copy demand fetch: one page straddling nothing, one range straddling two source
            // chunks, read one-sided from the source into bounce slots.
            let pool = conn.pd().bounce_pool(4, usize::try_from(2 * PAGE)?)?;
            let urgent = conn.urgent_mut().context("urgent stream")?;
            let mut read_ok = true;
            for gpa in [4 * MIB + 5 * PAGE, MIB - PAGE] {
                let filled =
                    urgent.read_to_bounce(&src, GuestRange::new(gpa, 2 * PAGE), &pool, timeout)?;
                read_ok &= filled.gpa() == gpa
                    && filled.bytes() == expect.bytes(host_offset(gpa), 2 * PAGE);
            }
            done_tx.send(())?;
            let mut saw_disconnect = false;
            let start = Instant::now();
            while start.elapsed() < timeout {
                if let Some(ConnEvent::Disconnected { .. }) =
                    conn.poll_event(Duration::from_millis(200))?
                {
                    saw_disconnect = true;
                    break;
                }
            }
            Ok(DestReport {
                arrivals,
                digest_ok,
                read_ok,
                saw_disconnect,
            })
        });

        // Source: connect, register patterned memory, expose it, push two batches per stream.
        let mut opts = ConnectOptions::new(Role::Source);
        opts.streams = streams;
        opts.max_wr_bytes = 256 * 1024;
        opts.signal_every = 4;
        let mut mem = TestMem::new(5 * MIB);
        mem.fill_pattern(7);
        let mut conn = rdma::connect(addr, &opts)?;
        // SAFETY: `mem` outlives `conn`; nothing writes it while registered.
        let reg = unsafe {
            conn.pd()
                .register_guest_memory(&regions_for(&mem), Role::Source, register)
        }?;
        src_desc_tx.send(conn.expose(&reg)?)?;
        let dst = RemoteMap::import(
            &dst_desc_rx.recv_timeout(timeout)?,
            &memory_map(),
            ImportLimits::default(),
        )?;
        // Batches: stream 0 moves region 0 (3 MiB, crossing 1 MiB chunks at odd offsets), stream 1
        // moves region 1; two batches each.
        let plan: [[&[GuestRange]; 2]; 2] = [
            [
                &[GuestRange::new(0, MIB + PAGE)],
                &[GuestRange::new(MIB + PAGE, 2 * MIB - PAGE)],
            ],
            [
                &[
                    GuestRange::new(4 * MIB, PAGE),
                    GuestRange::new(4 * MIB + PAGE, MIB),
                ],
                &[GuestRange::new(5 * MIB + PAGE, MIB - PAGE)],
            ],
        ];
        for (i, s) in conn.streams_mut().iter_mut().enumerate() {
            for (b, ranges) in plan[i].iter().enumerate() {
                let batch = u32::try_from(i * 100 + b)?;
                s.write_batch(&reg, &dst, ranges, batch, timeout)?;
            }
            s.flush(timeout)?;
            assert_eq!(s.outstanding(), 0);
        }
        // A write to a range the peer never registered is refused locally with a typed error.
        let err = conn.streams_mut()[0]
            .write_batch(&reg, &dst, &[GuestRange::new(3 * MIB, PAGE)], 9, timeout)
            .expect_err("gpa 3 MiB is in no region");
        assert!(matches!(err, StreamError::Translate { .. }), "{err}");
        done_rx.recv_timeout(timeout)?;
        conn.disconnect()?;
        let report = dest
            .join()
            .map_err(|_| anyhow::anyhow!("destination panicked"))??;
        let mut got = report.arrivals.clone();
        got.sort();
        assert_eq!(
            got,
            vec![(0, 0), (0, 1), (1, 100), (1, 101)],
            "batch ids per stream, in order"
        );
        assert!(
            report.digest_ok,
            "destination memory differs from the source after the push"
        );
        assert!(report.read_ok, "one-sided READ returned wrong bytes");
        assert!(
            report.saw_disconnect,
            "destination did not observe the disconnect"
        );
        drop(reg);
        Ok(())
    }

    #[test]
    fn bad_rkey_surfaces_as_remote_access_error() -> Result<()> {
        let Some(ip) = rdma_addr_or_skip("bad_rkey_surfaces_as_remote_access_error") else {
            return Ok(());
        };
        let addr = SocketAddr::new(ip, 7473);
        let listener = rdma::RdmaListener::bind(addr)?;
        let (desc_tx, desc_rx) = mpsc::channel::<Vec<RemoteRegion>>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let timeout = Duration::from_secs(10);
        let dest = thread::spawn(move || -> Result<()> {
            let mut opts = ConnectOptions::new(Role::Destination);
            opts.streams = 1;
            opts.urgent = false;
            let mem = TestMem::new(MIB);
            let conn = listener.accept(&opts)?;
            let regions = [GuestRegion {
                gpa: 0,
                host_addr: mem.addr(),
                len: MIB,
            }];
            // SAFETY: `mem` outlives `conn`.
            let reg = unsafe {
                conn.pd().register_guest_memory(
                    &regions,
                    Role::Destination,
                    RegisterOptions::default(),
                )
            }?;
            let mut desc = conn.expose(&reg)?;
            // Corrupt the rkey the source will use.
            desc[0].rkey ^= 0x5a5a_5a5a;
            desc_tx.send(desc)?;
            let _ = done_rx.recv_timeout(timeout);
            Ok(())
        });
        let mut opts = ConnectOptions::new(Role::Source);
        opts.streams = 1;
        opts.urgent = false;
        let mem = TestMem::new(MIB);
        let mut conn = rdma::connect(addr, &opts)?;
        let regions = [GuestRegion {
            gpa: 0,
            host_addr: mem.addr(),
            len: MIB,
        }];
        // SAFETY: `mem` outlives `conn`.
        let reg = unsafe {
            conn.pd()
                .register_guest_memory(&regions, Role::Source, RegisterOptions::default())
        }?;
        let dst = RemoteMap::import(
            &desc_rx.recv_timeout(timeout)?,
            &[GuestRange::new(0, MIB)],
            ImportLimits::default(),
        )?;
        let s = &mut conn.streams_mut()[0];
        s.write_batch(&reg, &dst, &[GuestRange::new(0, 8 * PAGE)], 1, timeout)?;
        let err = match s.flush(timeout) {
            Ok(()) => bail!("write with a corrupted rkey completed"),
            Err(e) => e,
        };
        let StreamError::Completion(c) = &err else {
            bail!("expected a completion error, got {err}");
        };
        assert_eq!(c.status, WcStatus::RemoteAccess, "{c}");
        assert_eq!((c.stream, c.gpa), (0, 0), "{c}");
        // The stream stays failed.
        assert!(matches!(s.poll(), Err(StreamError::Failed { .. })));
        done_tx.send(())?;
        dest.join()
            .map_err(|_| anyhow::anyhow!("destination panicked"))??;
        drop(conn);
        drop(reg);
        Ok(())
    }
}
