// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Quick loopback throughput check of the transport backends (not the `ferry bench transport`
//! command, which runs sender and receiver as separate processes): moves a region several times
//! through the bulk pusher over N streams, verifies it with xxh3, and prints GB/s, CPU seconds
//! per GiB (whole process: sender + receiver + io-wq) and the SEND_ZC copy count.
//!
//! `cargo run --release -p ferry-transport --example loopback_throughput -- [MiB] [passes] [frame KiB]`
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::cast_sign_loss
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use ferry_transport::{
    Backend, Batch, BulkPusher, DataStream, Endpoint, GpaRange, GuestRegion, Listener,
    MemoryRegistration, RegistrationConfig, Socket, StreamConfig, StreamError, Target, ZeroCopy,
    open_stream,
};

struct Mem(*mut u8, usize);

impl Mem {
    fn new(len: usize) -> Self {
        // SAFETY: anonymous private mapping; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Mem(p.cast(), len)
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: mapped for `self.1` bytes.
        unsafe { std::slice::from_raw_parts(self.0, self.1) }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: mapped for `self.1` bytes, exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.0, self.1) }
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.0.cast(), self.1) };
    }
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn receive(stream: &mut dyn DataStream) -> Result<u64, StreamError> {
    let mut total = 0;
    loop {
        let mut h = [0u8; 16];
        match stream.recv_exact(&mut h) {
            Ok(()) => {}
            Err(StreamError::PeerClosed { received: 0, .. }) => return Ok(total),
            Err(e) => return Err(e),
        }
        let gpa = u64::from_le_bytes(h[..8].try_into().unwrap());
        let len = u64::from_le_bytes(h[8..].try_into().unwrap());
        stream.recv_into(&[GpaRange::new(gpa, len)], Target::Guest)?;
        total += len;
    }
}

fn run(
    backend: Backend,
    streams: usize,
    src: &Arc<MemoryRegistration>,
    dst: &Arc<MemoryRegistration>,
    size: u64,
    passes: u64,
    frame: u64,
) -> Result<()> {
    let env = |k: &str| std::env::var(k).ok();
    let cfg = StreamConfig {
        backend,
        zero_copy: match env("ZC").as_deref() {
            Some("0") => ZeroCopy::Off,
            Some("1") => ZeroCopy::Always,
            _ => ZeroCopy::Adaptive,
        },
        wait_all: env("WAITALL").is_none_or(|v| v != "0"),
        batch_bytes: env("BATCH_KIB").map_or(8 << 20, |v| v.parse::<u64>().unwrap() << 10),
        ..StreamConfig::default()
    };
    // The receiving side may use another backend (RX=socket|uring) to isolate send costs.
    let rx_cfg = StreamConfig {
        backend: match env("RX").as_deref() {
            Some("socket") => Backend::Socket,
            Some("uring") => Backend::Uring,
            _ => backend,
        },
        ..cfg
    };
    let listener = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".parse()?))?;
    let ep = listener.endpoint()?;
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for i in 0..streams {
        let c = Socket::connect(&ep, Duration::from_secs(5))?;
        let s = listener.accept(Duration::from_secs(5))?;
        senders.push(open_stream(c, i, src, &cfg)?);
        let mut rx = open_stream(s, i, dst, &rx_cfg)?;
        receivers.push(
            std::thread::Builder::new()
                .name(format!("rx-{i}"))
                .spawn(move || receive(rx.as_mut()))?,
        );
    }
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let pusher = BulkPusher::new(senders, 2 * streams)?;
    let frames_per_batch = (8 << 20) / frame;
    let mut gpa = 0u64;
    let total = size * passes;
    let mut queued = 0;
    while queued < total {
        let mut b = Batch::new();
        for _ in 0..frames_per_batch.max(1) {
            let mut h = [0u8; 16];
            h[..8].copy_from_slice(&gpa.to_le_bytes());
            h[8..].copy_from_slice(&frame.to_le_bytes());
            b.push(&h, &[GpaRange::new(gpa, frame)]);
            gpa = (gpa + frame) % size;
            queued += frame;
        }
        pusher.push(b)?;
    }
    let report = pusher.finish()?;
    let mut received = 0;
    for r in receivers {
        received += r.join().map_err(|_| anyhow!("receiver panicked"))??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let t = report.total();
    let gib = total as f64 / (1u64 << 30) as f64;
    println!(
        "{:<6} streams={streams} frame={:>5}KiB {:>6.2} GB/s {:>6.1} Gb/s  cpu {:.2} s/GiB  sqes {:>7} submits {:>6} zc_sends {:>6} zc_copied {:>6}  received {}",
        backend.to_string(),
        frame >> 10,
        total as f64 / secs / 1e9,
        total as f64 * 8.0 / secs / 1e9,
        cpu / gib,
        t.sqes,
        t.submits,
        t.zc_sends,
        t.zc_copied,
        received == total,
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let mib = args.first().copied().unwrap_or(256);
    let passes = args.get(1).copied().unwrap_or(4);
    let frame = args.get(2).copied().unwrap_or(1024) << 10;
    let size = mib << 20;
    let mut src = Mem::new(size as usize);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in src.bytes_mut().chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    let dst = Mem::new(size as usize);
    // SAFETY: the source mapping outlives the registration (dropped at the end of main, after
    // every stream has been joined).
    let sreg = unsafe {
        MemoryRegistration::new(
            &[GuestRegion::new(0, src.0, size)],
            RegistrationConfig::default(),
        )
    }?;
    // SAFETY: as above, for the destination mapping.
    let dreg = unsafe {
        MemoryRegistration::new(
            &[GuestRegion::new(0, dst.0, size)],
            RegistrationConfig::default(),
        )
    }?;
    let want = xxhash_rust::xxh3::xxh3_64(src.bytes());
    println!(
        "region {mib} MiB x {passes} passes, loopback TCP, {} cpus",
        std::thread::available_parallelism()?
    );
    let only = std::env::var("ONLY").ok();
    for backend in [Backend::Socket, Backend::Uring] {
        if only.as_deref().is_some_and(|o| o != backend.to_string()) {
            continue;
        }
        for streams in [1, 2, 4] {
            run(backend, streams, &sreg, &dreg, size, passes, frame)
                .with_context(|| format!("{backend} x{streams}"))?;
        }
    }
    let got = xxhash_rust::xxh3::xxh3_64(dst.bytes());
    println!("verified: {}", got == want);
    drop((sreg, dreg));
    Ok(())
}
