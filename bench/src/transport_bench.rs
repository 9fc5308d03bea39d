// SPDX-License-Identifier: Apache-2.0 OR MIT
//! `ferry bench transport`: how fast a transport moves guest memory between two processes,
//! beside the same-run floor.
//!
//! This process is the sender, the peer process (see [`crate::cli`]) the receiver. Both hold
//! guest-like memory from `ferry_engine::memory` (one anonymous, pre-populated region; the
//! sender's filled with pseudo-random bytes). Guest memory is split into frames
//! ([`TransportBench::frame_bytes`], 1 MiB by default); frame *k* goes on stream *k mod N*, as a
//! 16-byte header (guest-physical address, length) followed by the range, sent by reference
//! from registered memory through `ferry_transport`'s [`DataStream`]s, one thread per stream,
//! and received straight into the receiver's registered memory. Afterwards both sides hash the
//! whole region (xxh3-128) and the main process compares.
//!
//! The **floor** is measured in the same run between the same two processes: the same frames
//! over N plain blocking `std::net::TcpStream`s with `write_all`/`read_exact` of 1 MiB (no ferry
//! code on the data path), from the same sender memory into a pre-touched buffer in the
//! receiver, verified the same way. It runs twice, before and after the transport, and the
//! faster pass counts (so neither order nor a noisy moment favours the transport); both passes
//! are in `floor_passes_gbit_per_s`.
//!
//! Timing: from the moment both sides are connected and armed (the receiver's threads wait in
//! their first receive) to the receiver's report that every byte arrived. CPU: each process's
//! `getrusage(RUSAGE_SELF)` user + system time over that window, so the sender's figure includes
//! io-wq workers and whatever softirq work the kernel charged to it.
//!
//! Not here: RDMA (no device on this machine: `--transport rdma` says so and stops), setup costs
//! (connection, ring and buffer registration happen before the window).

use std::io::{BufRead, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::ValueEnum;
use ferry_engine::layout::Layout;
use ferry_engine::memory::{MemBacking, MemOptions, PAGE_SIZE, ProcessMemory};
use ferry_transport::memory::RegistrationConfig;
use ferry_transport::{
    Backend, DataStream, Endpoint, GpaRange, Listener, MemoryRegistration, Socket, StreamConfig,
    StreamStats, Target, open_stream,
};
use serde::{Deserialize, Serialize};

use crate::cli::{
    CpuTime, PeerLauncher, PeerLink, PeerOut, SuiteName, TransportArgs, gib_to_bytes, peer_read,
    u64_f64,
};
use crate::machine::Machine;

/// Frame header: guest-physical address and length, little-endian.
const HEADER: usize = 16;
/// The header that ends a stream.
const END_GPA: u64 = u64::MAX;
/// Most streams.
pub const MAX_STREAMS: usize = 64;

/// The transport a benchmark uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// io_uring over TCP (fixed buffers, `SEND_ZC`).
    Uring,
    /// Blocking TCP sockets (`sendmsg`/`recvmsg` with iovecs into guest memory).
    Tcp,
    /// Blocking Unix-domain sockets.
    Unix,
    /// RDMA verbs (needs a device; none here).
    Rdma,
}

impl TransportChoice {
    /// The name used in results.
    pub fn name(self) -> &'static str {
        match self {
            TransportChoice::Uring => "uring",
            TransportChoice::Tcp => "tcp",
            TransportChoice::Unix => "unix",
            TransportChoice::Rdma => "rdma",
        }
    }

    /// The data path of a stream.
    pub fn backend(self) -> Backend {
        match self {
            TransportChoice::Uring => Backend::Uring,
            _ => Backend::Socket,
        }
    }
}

/// Refuses RDMA with the reason: never a faked result.
pub fn check_rdma() -> Result<()> {
    let devices: Vec<String> = std::fs::read_dir("/sys/class/infiniband")
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    if devices.is_empty() {
        bail!(
            "RDMA: no RDMA device on this machine (/sys/class/infiniband is empty or absent); \
             nothing to measure"
        );
    }
    bail!(
        "RDMA: device(s) {} present, but the RDMA transport benchmark is not implemented in \
         this version of ferry",
        devices.join(", ")
    )
}

/// One transport benchmark.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransportBench {
    /// Transport.
    pub transport: TransportChoice,
    /// Streams (1 to [`MAX_STREAMS`]).
    pub streams: usize,
    /// Bytes of memory to move (a multiple of 4 KiB).
    pub bytes: u64,
    /// Bytes per frame (a multiple of 4 KiB).
    pub frame_bytes: u64,
    /// Stall timeout of every stream and socket.
    pub timeout: Duration,
}

impl TransportBench {
    /// From the command line.
    pub fn from_args(a: &TransportArgs) -> Result<Self> {
        let frame_bytes = a
            .frame_kib
            .checked_mul(1024)
            .filter(|f| *f >= PAGE_SIZE && f.is_multiple_of(PAGE_SIZE) && *f <= 64 << 20)
            .context("--frame-kib must be a multiple of 4 up to 65536")?;
        let cfg = Self {
            transport: a.transport,
            streams: a.streams,
            bytes: gib_to_bytes(a.size_gib, PAGE_SIZE)?,
            frame_bytes,
            timeout: Duration::from_secs(30),
        };
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<()> {
        ensure!(
            (1..=MAX_STREAMS).contains(&self.streams),
            "--streams must be 1 to {MAX_STREAMS}"
        );
        ensure!(
            self.bytes > 0 && self.bytes.is_multiple_of(PAGE_SIZE),
            "Size must be a positive multiple of 4 KiB"
        );
        ensure!(
            self.frame_bytes > 0 && self.frame_bytes.is_multiple_of(PAGE_SIZE),
            "Frame size must be a positive multiple of 4 KiB"
        );
        Ok(())
    }

    /// The frames of stream `i`.
    fn share(&self, i: usize) -> impl Iterator<Item = GpaRange> + '_ {
        let n = self.bytes.div_ceil(self.frame_bytes);
        (0..n)
            .filter(move |k| usize::try_from(k % self.streams as u64).ok() == Some(i))
            .map(|k| {
                let gpa = k * self.frame_bytes;
                GpaRange::new(gpa, self.frame_bytes.min(self.bytes - gpa))
            })
    }
}

/// One transport result (a JSON line with `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct TransportResult {
    /// Always `"transport"`.
    pub suite: &'static str,
    /// Transport name.
    pub transport: String,
    /// Streams.
    pub streams: usize,
    /// Bytes moved.
    pub bytes: u64,
    /// Bytes per frame.
    pub frame_bytes: u64,
    /// Transfer time, seconds.
    pub seconds: f64,
    /// Throughput, gigabits per second.
    pub gbit_per_s: f64,
    /// The floor's transfer time, seconds (its faster pass).
    pub floor_seconds: f64,
    /// The floor's throughput, Gb/s (the faster of its two passes).
    pub floor_gbit_per_s: f64,
    /// Both floor passes, Gb/s: before and after the transport.
    pub floor_passes_gbit_per_s: [f64; 2],
    /// `gbit_per_s / floor_gbit_per_s`.
    pub ratio_to_floor: f64,
    /// Sender CPU (user + system) per GiB moved, seconds.
    pub sender_cpu_s_per_gib: f64,
    /// Receiver CPU per GiB, seconds.
    pub receiver_cpu_s_per_gib: f64,
    /// The floor's sender CPU per GiB, seconds.
    pub floor_sender_cpu_s_per_gib: f64,
    /// The floor's receiver CPU per GiB, seconds.
    pub floor_receiver_cpu_s_per_gib: f64,
    /// (sender + receiver CPU) / (the floor's sender + receiver CPU).
    pub cpu_ratio_to_floor: f64,
    /// Sender CPU split (user, system).
    pub sender_cpu: CpuTime,
    /// Receiver CPU split.
    pub receiver_cpu: CpuTime,
    /// The floor's sender CPU split.
    pub floor_sender_cpu: CpuTime,
    /// The floor's receiver CPU split.
    pub floor_receiver_cpu: CpuTime,
    /// `SEND_ZC` operations (io_uring).
    pub zc_sends: u64,
    /// Zero-copy sends the kernel reported it copied (always, over loopback).
    pub zc_copied: u64,
    /// Submission-queue entries / send calls on the sender.
    pub sqes: u64,
    /// Whether the transport's bytes arrived intact (xxh3-128 of the whole region).
    pub transport_verified: bool,
    /// Whether the floor's bytes arrived intact.
    pub floor_verified: bool,
    /// Both of the above.
    pub verified: bool,
    /// The machine.
    pub machine: Machine,
}

/// Messages from the receiving peer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
enum FromPeer {
    /// Memory allocated, listening.
    Ready { endpoint: String, floor: String },
    /// Connections accepted, receivers waiting.
    Armed,
    /// Every byte arrived.
    Received { cpu: CpuTime, bytes: u64 },
    /// The region's hash.
    Hashed { hash: String },
}

/// Runs one transport benchmark with its peer; `progress(message, done, total)` is called
/// from the sending threads.
pub fn run(
    cfg: &TransportBench,
    launcher: &PeerLauncher,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<TransportResult> {
    cfg.check()?;
    if cfg.transport == TransportChoice::Rdma {
        check_rdma()?;
    }
    let machine = Machine::detect();
    let mut link = PeerLink::spawn(launcher, SuiteName::Transport, cfg)?;
    progress("filling memory", 0, cfg.bytes);
    let mem = ProcessMemory::new(
        &[(0, cfg.bytes)],
        MemBacking::Anonymous,
        MemOptions {
            hugepage: false,
            populate: true,
        },
    )
    .context("Cannot allocate the sender's memory")?;
    fill(&mem, 0x5eed_f00d)?;
    let layout = Layout::new(&mem)?;
    let all = ferry_protocol::GpaRange::new(0, cfg.bytes);
    let src_hash = hash_hex(layout.bytes(all)?);
    let reg = layout.register(None, false, RegistrationConfig::default())?;
    let setup_timeout = Duration::from_secs(60) + secs_per_gib(cfg.bytes, 20);
    let xfer_timeout = Duration::from_secs(30) + secs_per_gib(cfg.bytes, 30);
    let (endpoint, floor) = match link.recv(setup_timeout)? {
        FromPeer::Ready { endpoint, floor } => (parse_endpoint(&endpoint)?, floor),
        other => bail!("Unexpected peer message {other:?}"),
    };
    let floor_addr: SocketAddr = floor
        .parse()
        .with_context(|| format!("Bad floor address {floor}"))?;

    // The floor, before the transport.
    let floor_a = floor_send(
        cfg,
        &layout,
        &mut link,
        floor_addr,
        &src_hash,
        (setup_timeout, xfer_timeout),
        progress,
    )?;

    // The transport.
    let stream_cfg = StreamConfig {
        backend: cfg.transport.backend(),
        timeout: cfg.timeout,
        ..StreamConfig::default()
    };
    let mut streams = Vec::with_capacity(cfg.streams);
    for i in 0..cfg.streams {
        let sock = Socket::connect(&endpoint, cfg.timeout)
            .with_context(|| format!("Stream {i}: cannot connect to {endpoint}"))?;
        streams.push(open_stream(sock, i, &reg, &stream_cfg)?);
    }
    expect_armed(&mut link, setup_timeout)?;
    let sent = AtomicU64::new(0);
    let cpu0 = CpuTime::now();
    let t0 = Instant::now();
    let stats = thread::scope(|s| -> Result<StreamStats> {
        let handles: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(i, mut st)| {
                let sent = &sent;
                s.spawn(move || send_share(st.as_mut(), cfg.share(i), sent, cfg, progress))
            })
            .collect();
        let mut total = StreamStats::default();
        let mut first_err = None;
        for h in handles {
            match h.join().map_err(|_| anyhow!("A sender thread panicked"))? {
                Ok(st) => total.add(&st),
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(total),
        }
    })?;
    progress("waiting for the receiver", cfg.bytes, cfg.bytes);
    let (rx_cpu, rx_bytes) = match link.recv(xfer_timeout)? {
        FromPeer::Received { cpu, bytes } => (cpu, bytes),
        other => bail!("Unexpected peer message {other:?}"),
    };
    let seconds = t0.elapsed().as_secs_f64();
    let tx_cpu = CpuTime::now().since(&cpu0);
    ensure!(
        rx_bytes == cfg.bytes,
        "Receiver got {rx_bytes} of {} bytes",
        cfg.bytes
    );
    let transport_verified = expect_hash(&mut link, setup_timeout)? == src_hash;
    drop(reg);

    // The floor again, after the transport (the faster of the two passes counts).
    let floor_b = floor_send(
        cfg,
        &layout,
        &mut link,
        floor_addr,
        &src_hash,
        (setup_timeout, xfer_timeout),
        progress,
    )?;
    link.finish(Duration::from_secs(30))?;

    let gib = u64_f64(cfg.bytes) / u64_f64(1 << 30);
    let gbit = |secs: f64| u64_f64(cfg.bytes) * 8.0 / secs.max(1e-9) / 1e9;
    let floor_passes_gbit_per_s = [gbit(floor_a.seconds), gbit(floor_b.seconds)];
    let floor_verified = floor_a.verified && floor_b.verified;
    let fl = if floor_a.seconds <= floor_b.seconds {
        floor_a
    } else {
        floor_b
    };
    let (floor_seconds, ftx_cpu, frx_cpu) = (fl.seconds, fl.tx_cpu, fl.rx_cpu);
    let (gbit_per_s, floor_gbit_per_s) = (gbit(seconds), gbit(floor_seconds));
    Ok(TransportResult {
        suite: "transport",
        transport: cfg.transport.name().into(),
        streams: cfg.streams,
        bytes: cfg.bytes,
        frame_bytes: cfg.frame_bytes,
        seconds,
        gbit_per_s,
        floor_seconds,
        floor_gbit_per_s,
        floor_passes_gbit_per_s,
        ratio_to_floor: gbit_per_s / floor_gbit_per_s,
        sender_cpu_s_per_gib: tx_cpu.total() / gib,
        receiver_cpu_s_per_gib: rx_cpu.total() / gib,
        floor_sender_cpu_s_per_gib: ftx_cpu.total() / gib,
        floor_receiver_cpu_s_per_gib: frx_cpu.total() / gib,
        cpu_ratio_to_floor: (tx_cpu.total() + rx_cpu.total())
            / (ftx_cpu.total() + frx_cpu.total()).max(1e-9),
        sender_cpu: tx_cpu,
        receiver_cpu: rx_cpu,
        floor_sender_cpu: ftx_cpu,
        floor_receiver_cpu: frx_cpu,
        zc_sends: stats.zc_sends,
        zc_copied: stats.zc_copied,
        sqes: stats.sqes,
        transport_verified,
        floor_verified,
        verified: transport_verified && floor_verified,
        machine,
    })
}

/// One pass of the floor, as the sender saw it.
struct FloorPass {
    seconds: f64,
    tx_cpu: CpuTime,
    rx_cpu: CpuTime,
    verified: bool,
}

/// One floor pass: the same frames over plain blocking TCP (`write_all` of each frame from
/// the same memory), timed and verified like the transport.
fn floor_send(
    cfg: &TransportBench,
    layout: &Layout,
    link: &mut PeerLink,
    addr: SocketAddr,
    src_hash: &str,
    (setup_timeout, xfer_timeout): (Duration, Duration),
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<FloorPass> {
    progress("floor (plain TCP)", 0, cfg.bytes);
    let mut conns = Vec::with_capacity(cfg.streams);
    for i in 0..cfg.streams {
        let mut c = TcpStream::connect_timeout(&addr, cfg.timeout)
            .with_context(|| format!("Floor connection {i}: cannot connect to {addr}"))?;
        c.set_write_timeout(Some(cfg.timeout))?;
        c.set_read_timeout(Some(cfg.timeout))?;
        c.write_all(&(i as u64).to_le_bytes())?;
        conns.push(c);
    }
    expect_armed(link, setup_timeout)?;
    let sent = AtomicU64::new(0);
    let cpu0 = CpuTime::now();
    let t0 = Instant::now();
    thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, mut c)| {
                let sent = &sent;
                s.spawn(move || -> Result<()> {
                    for r in cfg.share(i) {
                        let bytes = layout.bytes(ferry_protocol::GpaRange::new(r.gpa, r.len))?;
                        c.write_all(bytes)
                            .with_context(|| format!("Floor connection {i}: write failed"))?;
                        let done = sent.fetch_add(r.len, Ordering::Relaxed) + r.len;
                        progress("floor (plain TCP)", done, cfg.bytes);
                    }
                    c.flush()?;
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow!("A floor sender panicked"))??;
        }
        Ok(())
    })?;
    let (rx_cpu, rx_bytes) = match link.recv(xfer_timeout)? {
        FromPeer::Received { cpu, bytes } => (cpu, bytes),
        other => bail!("Unexpected peer message {other:?}"),
    };
    let seconds = t0.elapsed().as_secs_f64();
    let tx_cpu = CpuTime::now().since(&cpu0);
    ensure!(
        rx_bytes == cfg.bytes,
        "Floor receiver got {rx_bytes} of {} bytes",
        cfg.bytes
    );
    let verified = expect_hash(link, setup_timeout)? == src_hash;
    Ok(FloorPass {
        seconds,
        tx_cpu,
        rx_cpu,
        verified,
    })
}

fn secs_per_gib(bytes: u64, secs: u64) -> Duration {
    Duration::from_secs(bytes.div_ceil(1 << 30) * secs)
}

fn expect_armed(link: &mut PeerLink, timeout: Duration) -> Result<()> {
    match link.recv(timeout)? {
        FromPeer::Armed => Ok(()),
        other => bail!("Unexpected peer message {other:?}"),
    }
}

fn expect_hash(link: &mut PeerLink, timeout: Duration) -> Result<String> {
    match link.recv(timeout)? {
        FromPeer::Hashed { hash } => Ok(hash),
        other => bail!("Unexpected peer message {other:?}"),
    }
}

fn send_share(
    st: &mut dyn DataStream,
    share: impl Iterator<Item = GpaRange>,
    sent: &AtomicU64,
    cfg: &TransportBench,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<StreamStats> {
    for r in share {
        st.send_frame(&header(r.gpa, r.len), &[r])?;
        let done = sent.fetch_add(r.len, Ordering::Relaxed) + r.len;
        progress(cfg.transport.name(), done, cfg.bytes);
    }
    st.send_frame(&header(END_GPA, 0), &[])?;
    st.flush()?;
    let stats = st.stats();
    st.shutdown()?;
    Ok(stats)
}

fn header(gpa: u64, len: u64) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(&gpa.to_le_bytes());
    h[8..].copy_from_slice(&len.to_le_bytes());
    h
}

fn parse_header(h: &[u8; HEADER]) -> (u64, u64) {
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&h[..8]);
    b.copy_from_slice(&h[8..]);
    (u64::from_le_bytes(a), u64::from_le_bytes(b))
}

/// Fills memory with pseudo-random bytes (splitmix64 per word, seeded per 1 MiB chunk).
fn fill(mem: &ProcessMemory, seed: u64) -> Result<()> {
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK];
    for r in ferry_engine::vm::GuestMemory::regions(mem) {
        let mut off = 0u64;
        while off < r.len {
            let n = usize::try_from((r.len - off).min(CHUNK as u64))?;
            let mut x = seed ^ (r.gpa + off).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            for w in buf[..n].chunks_exact_mut(8) {
                x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = x;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                w.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
            }
            mem.write_gpa(r.gpa + off, &buf[..n])?;
            off += n as u64;
        }
    }
    Ok(())
}

fn hash_hex(bytes: &[u8]) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(bytes))
}

pub(crate) fn endpoint_string(e: &Endpoint) -> String {
    e.to_string()
}

pub(crate) fn parse_endpoint(s: &str) -> Result<Endpoint> {
    if let Some(a) = s.strip_prefix("tcp:") {
        return Ok(Endpoint::Tcp(
            a.parse().with_context(|| format!("Bad address {a}"))?,
        ));
    }
    if let Some(p) = s.strip_prefix("unix:") {
        return Ok(Endpoint::Unix(PathBuf::from(p)));
    }
    bail!("Bad endpoint {s}")
}

/// A fresh endpoint on loopback for `transport`: TCP on 127.0.0.1 (port chosen at bind), or a
/// Unix socket path in the temporary directory.
pub(crate) fn loopback_endpoint(transport: TransportChoice, what: &str) -> Endpoint {
    match transport {
        TransportChoice::Unix => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            Endpoint::Unix(std::env::temp_dir().join(format!(
                "ferry-bench-{what}-{}-{nanos}.sock",
                std::process::id()
            )))
        }
        _ => Endpoint::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
    }
}

/// The receiving peer (runs in the second process).
pub(crate) fn peer(input: &mut dyn BufRead, out: &mut PeerOut) -> Result<()> {
    let cfg: TransportBench = peer_read(input)?;
    cfg.check()?;
    let mem = ProcessMemory::new(
        &[(0, cfg.bytes)],
        MemBacking::Anonymous,
        MemOptions {
            hugepage: false,
            populate: true,
        },
    )
    .context("Cannot allocate the receiver's memory")?;
    let layout = Layout::new(&mem)?;
    let reg = layout.register(None, false, RegistrationConfig::default())?;
    let len = usize::try_from(cfg.bytes)?;
    // Pre-touched (non-zero memset), like the populated guest memory above.
    let mut floor_buf = vec![0xA5u8; len];
    let listener = Listener::bind(&loopback_endpoint(cfg.transport, "data"))?;
    let floor_listener =
        Listener::bind(&Endpoint::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))))?;
    let floor_addr = match floor_listener.endpoint()? {
        Endpoint::Tcp(a) => a,
        Endpoint::Unix(_) => bail!("Floor listener is not TCP"),
    };
    out.send(&FromPeer::Ready {
        endpoint: endpoint_string(&listener.endpoint()?),
        floor: floor_addr.to_string(),
    })?;

    // The floor, before the transport.
    floor_recv(&cfg, &floor_listener, &mut floor_buf, out)?;

    // The transport.
    let stream_cfg = StreamConfig {
        backend: cfg.transport.backend(),
        timeout: cfg.timeout,
        ..StreamConfig::default()
    };
    let accept_timeout = Duration::from_secs(60);
    let mut streams = Vec::with_capacity(cfg.streams);
    for i in 0..cfg.streams {
        let sock = listener
            .accept(accept_timeout)
            .with_context(|| format!("Stream {i}: no connection"))?;
        streams.push(open_stream(sock, i, &reg, &stream_cfg)?);
    }
    let cpu0 = CpuTime::now();
    let received = thread::scope(|s| -> Result<u64> {
        let handles: Vec<_> = streams
            .into_iter()
            .map(|mut st| s.spawn(move || receive_stream(st.as_mut(), cfg.bytes)))
            .collect();
        out.send(&FromPeer::Armed)?;
        let mut total = 0;
        let mut first_err = None;
        for h in handles {
            match h
                .join()
                .map_err(|_| anyhow!("A receiver thread panicked"))?
            {
                Ok(n) => total += n,
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(total),
        }
    })?;
    let cpu = CpuTime::now().since(&cpu0);
    out.send(&FromPeer::Received {
        cpu,
        bytes: received,
    })?;
    out.send(&FromPeer::Hashed {
        hash: hash_hex(layout.bytes(ferry_protocol::GpaRange::new(0, cfg.bytes))?),
    })?;
    MemoryRegistration::unregister(reg, Duration::from_secs(10))?;

    // The floor again.
    floor_recv(&cfg, &floor_listener, &mut floor_buf, out)?;
    Ok(())
}

/// One floor pass on the receiving side: accepts the connections, receives every frame with
/// `read_exact` into its place in `buf`, reports, hashes, and resets `buf` for the next pass.
fn floor_recv(
    cfg: &TransportBench,
    floor_listener: &Listener,
    floor_buf: &mut [u8],
    out: &mut PeerOut,
) -> Result<()> {
    let accept_timeout = Duration::from_secs(60);
    let mut conns: Vec<Option<TcpStream>> = (0..cfg.streams).map(|_| None).collect();
    for _ in 0..cfg.streams {
        let sock = floor_listener.accept(accept_timeout)?;
        let mut c = match sock {
            Socket::Tcp(c, _) => c,
            Socket::Unix(..) => bail!("Floor connection is not TCP"),
        };
        c.set_read_timeout(Some(cfg.timeout))?;
        c.set_write_timeout(Some(cfg.timeout))?;
        let mut idx = [0u8; 8];
        c.read_exact(&mut idx)?;
        let i = usize::try_from(u64::from_le_bytes(idx))?;
        let slot = conns
            .get_mut(i)
            .with_context(|| format!("Floor connection index {i} out of range"))?;
        ensure!(slot.is_none(), "Floor connection index {i} twice");
        *slot = Some(c);
    }
    // Frame k of the buffer goes to connection k mod N, as on the sender.
    let frame = usize::try_from(cfg.frame_bytes)?;
    let mut shares: Vec<Vec<&mut [u8]>> = (0..cfg.streams).map(|_| Vec::new()).collect();
    for (k, c) in floor_buf.chunks_mut(frame).enumerate() {
        shares[k % cfg.streams].push(c);
    }
    let cpu0 = CpuTime::now();
    let received = thread::scope(|s| -> Result<u64> {
        let handles: Vec<_> = conns
            .into_iter()
            .zip(shares)
            .enumerate()
            .map(|(i, (c, share))| {
                s.spawn(move || -> Result<u64> {
                    let mut c = c.with_context(|| format!("Floor connection {i} missing"))?;
                    let mut n = 0u64;
                    for chunk in share {
                        c.read_exact(chunk)
                            .with_context(|| format!("Floor connection {i}: read failed"))?;
                        n += chunk.len() as u64;
                    }
                    Ok(n)
                })
            })
            .collect();
        out.send(&FromPeer::Armed)?;
        let mut total = 0;
        for h in handles {
            total += h
                .join()
                .map_err(|_| anyhow!("A floor receiver panicked"))??;
        }
        Ok(total)
    })?;
    let cpu = CpuTime::now().since(&cpu0);
    out.send(&FromPeer::Received {
        cpu,
        bytes: received,
    })?;
    out.send(&FromPeer::Hashed {
        hash: hash_hex(floor_buf),
    })?;
    // Reset, so the next pass is verified on its own.
    floor_buf.fill(0xA5);
    Ok(())
}

/// Receives frames until the end header; returns the payload bytes.
fn receive_stream(st: &mut dyn DataStream, total: u64) -> Result<u64> {
    let mut n = 0u64;
    loop {
        let mut h = [0u8; HEADER];
        st.recv_exact(&mut h)?;
        let (gpa, len) = parse_header(&h);
        if gpa == END_GPA {
            return Ok(n);
        }
        ensure!(
            gpa.checked_add(len).is_some_and(|e| e <= total) && len > 0,
            "Stream {}: frame {gpa:#x}+{len:#x} outside the {total:#x}-byte region",
            st.index()
        );
        st.recv_into(&[GpaRange::new(gpa, len)], Target::Guest)?;
        n += len;
    }
}
