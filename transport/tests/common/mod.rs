// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Shared helpers for the transport integration tests: anonymous "guest memory", connected
//! socket pairs over loopback, and a trivial test-only framing (16-byte header: gpa, len; the
//! real frames come from ferry-protocol).
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_transport::{
    Backend, DataStream, Endpoint, GpaRange, GuestRegion, Listener, MemoryRegistration,
    RegistrationConfig, Socket, StreamConfig, StreamError, Target, open_stream,
};

pub const MIB: u64 = 1 << 20;

/// A private anonymous mapping standing in for guest RAM.
pub struct Mem {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; it is accessed through raw pointers
// by the transport and through `bytes()` by the test after the transfer.
unsafe impl Send for Mem {}
// SAFETY: as above; shared access is read-only from Rust.
unsafe impl Sync for Mem {}

impl Mem {
    pub fn new(len: usize) -> Self {
        // SAFETY: anonymous private mapping, no fixed address; checked for MAP_FAILED below.
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
        assert_ne!(ptr, libc::MAP_FAILED, "mmap {len} bytes");
        Self {
            ptr: ptr.cast(),
            len,
        }
    }

    /// Fills with a pseudo-random pattern derived from `seed`.
    pub fn fill(&mut self, seed: u64) {
        let mut x = seed | 1;
        // SAFETY: the mapping is `len` bytes, writable, and exclusively borrowed here.
        let words = unsafe { std::slice::from_raw_parts_mut(self.ptr.cast::<u64>(), self.len / 8) };
        for w in words {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *w = x;
        }
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: mapped for `len` bytes; callers read only after transfers completed.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn hash(&self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(self.bytes())
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Guest layout used by the tests: two regions with a hole between them.
pub struct Guest {
    pub mems: Vec<Mem>,
    pub layout: Vec<(u64, u64)>,
    pub reg: Arc<MemoryRegistration>,
}

impl Guest {
    /// Regions of `sizes` bytes at gpa 0, 1 GiB, 2 GiB, ...; `slice` is the fixed-buffer slice
    /// size. `alias` also maps an alias region per region.
    pub fn new(sizes: &[u64], slice: u64, seed: Option<u64>, alias: Option<&[Mem]>) -> Self {
        let mut mems = Vec::new();
        let mut layout = Vec::new();
        let mut regions = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            let mut m = Mem::new(usize::try_from(size).unwrap());
            if let Some(seed) = seed {
                m.fill(seed + i as u64);
            }
            let gpa = (i as u64) << 30;
            let mut r = GuestRegion::new(gpa, m.ptr(), size);
            if let Some(alias) = alias {
                r = r.with_alias(alias[i].ptr());
            }
            regions.push(r);
            layout.push((gpa, size));
            mems.push(m);
        }
        // SAFETY: the mappings live in `mems`, dropped after `reg` (field order) and the tests
        // drop every stream before the guest.
        let reg =
            unsafe { MemoryRegistration::new(&regions, RegistrationConfig { slice_size: slice }) }
                .unwrap();
        Self { mems, layout, reg }
    }

    pub fn hashes(&self) -> Vec<u64> {
        self.mems.iter().map(Mem::hash).collect()
    }
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    Tcp,
    Unix,
}

pub fn endpoint(net: Net) -> Endpoint {
    match net {
        Net::Tcp => Endpoint::Tcp("127.0.0.1:0".parse().unwrap()),
        Net::Unix => Endpoint::Unix(std::env::temp_dir().join(format!(
            "ferry-transport-test-{}-{}.sock",
            std::process::id(),
            UNIQUE.fetch_add(1, Ordering::Relaxed)
        ))),
    }
}

/// `n` connected socket pairs (client, server).
pub fn socket_pairs(net: Net, n: usize) -> Result<Vec<(Socket, Socket)>> {
    let listener = Listener::bind(&endpoint(net))?;
    let ep = listener.endpoint()?;
    let mut out = Vec::new();
    for _ in 0..n {
        let c = Socket::connect(&ep, Duration::from_secs(5))?;
        let s = listener.accept(Duration::from_secs(5))?;
        out.push((c, s));
    }
    Ok(out)
}

pub fn config(backend: Backend, timeout: Duration) -> StreamConfig {
    StreamConfig {
        backend,
        timeout,
        ..StreamConfig::default()
    }
}

/// Whether the io_uring backend can be opened here; prints the reason when not.
pub fn uring_available() -> bool {
    let reg = Guest::new(&[MIB], MIB, None, None);
    let pairs = match socket_pairs(Net::Tcp, 1) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("skipping: no loopback TCP: {e:#}");
            return false;
        }
    };
    let (c, _s) = pairs.into_iter().next().unwrap();
    match open_stream(
        c,
        0,
        &reg.reg,
        &config(Backend::Uring, Duration::from_secs(1)),
    ) {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var("FERRY_REQUIRE_CAPS").as_deref() != Ok("1"),
                "io_uring required (FERRY_REQUIRE_CAPS=1) but unavailable: {e}"
            );
            eprintln!("SKIP: io_uring backend unavailable: {e}");
            false
        }
    }
}

pub const END_GPA: u64 = u64::MAX;

pub fn header(gpa: u64, len: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&gpa.to_le_bytes());
    h[8..].copy_from_slice(&len.to_le_bytes());
    h
}

pub fn parse(h: &[u8; 16]) -> (u64, u64) {
    (
        u64::from_le_bytes(h[..8].try_into().unwrap()),
        u64::from_le_bytes(h[8..].try_into().unwrap()),
    )
}

/// Receives test frames until the end marker or an orderly close between frames; returns
/// payload bytes received.
pub fn receive_frames(stream: &mut dyn DataStream, target: Target) -> Result<u64, StreamError> {
    let mut total = 0;
    loop {
        let mut h = [0u8; 16];
        match stream.recv_exact(&mut h) {
            Ok(()) => {}
            Err(StreamError::PeerClosed {
                received: 0,
                at: ferry_transport::At::Header,
                ..
            }) => return Ok(total),
            Err(e) => return Err(e),
        }
        let (gpa, len) = parse(&h);
        if gpa == END_GPA {
            return Ok(total);
        }
        stream.recv_into(&[GpaRange::new(gpa, len)], target)?;
        total += len;
    }
}

/// Splits the regions into ranges of varying length (4 KiB up to ~3 MiB, so many straddle a
/// 1 MiB slice boundary), in address order.
pub fn ranges_for(layout: &[(u64, u64)]) -> Vec<GpaRange> {
    let sizes = [
        4096u64,
        3 * MIB + 4096,
        64 * 1024,
        20 * 1024,
        MIB,
        12 * 1024,
        2 * MIB - 8192,
    ];
    let mut out = Vec::new();
    let mut k = 0;
    for &(gpa, len) in layout {
        let mut off = 0;
        while off < len {
            let l = sizes[k % sizes.len()].min(len - off);
            out.push(GpaRange::new(gpa + off, l));
            off += l;
            k += 1;
        }
    }
    out
}

pub fn open(
    sock: Socket,
    i: usize,
    reg: &Arc<MemoryRegistration>,
    cfg: &StreamConfig,
) -> Result<Box<dyn DataStream>> {
    open_stream(sock, i, reg, cfg).with_context(|| format!("open stream {i}"))
}
