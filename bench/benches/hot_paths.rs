// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Criterion micro-benchmarks of ferry's per-page hot paths: dirty bitmap → ranges, zero-page
//! detection, the xxh3 page checksum, zstd at the levels the engine uses, `Pages` frame
//! encode/decode, and userfaultfd page placement (`UFFDIO_COPY` at 4 KiB / 64 KiB / 2 MiB per
//! call, `UFFDIO_CONTINUE` per 4 KiB page; skipped with a printed reason without userfaultfd).
//!
//! Each benchmark measures for 2 s with 20 samples so `cargo bench -p ferry-bench` finishes in
//! a few minutes on a 2-core machine. The machine is shared and noisy: compare numbers from the
//! same run, and read them as orders of magnitude. Filter with e.g.
//! `cargo bench -p ferry-bench --bench hot_paths -- zstd`.

// Synthetic-data generation indexes with small, bounded u64 values; benches run on 64-bit hosts.
#![allow(clippy::cast_possible_truncation)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ferry_engine::memory::{MemOptions, MemRegion};
use ferry_engine::pages::{is_zero, page_hash};
use ferry_engine::uffd::{Features, Fill, PlaceMode, RegisterMode, Uffd};
use ferry_protocol::frame::decode_buffer;
use ferry_protocol::memmap::bitmap_to_ranges;
use ferry_protocol::{Frame, GpaRange};

const PAGE: usize = 4096;
const PAGE_U64: u64 = 4096;

/// Deterministic xorshift64 for synthetic data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20)
}

/// Dirty bitmaps of one 1 GiB region (262,144 pages): a scattered 1 % (a light writer),
/// clustered runs covering ~30 % (a writer streaming through buffers), and everything dirty
/// (the first round).
fn bitmaps() -> Vec<(&'static str, Vec<u64>)> {
    const WORDS: usize = (1 << 30) / PAGE / 64;
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut scattered = vec![0u64; WORDS];
    for _ in 0..(WORDS * 64 / 100) {
        let bit = rng.below((WORDS * 64) as u64);
        scattered[(bit / 64) as usize] |= 1 << (bit % 64);
    }
    let mut runs = vec![0u64; WORDS];
    let mut bit = 0u64;
    let total = (WORDS * 64) as u64;
    while bit < total {
        // A run of 1..512 dirty pages, then a clean gap about 2.3x as long.
        let len = 1 + rng.below(512);
        for b in bit..(bit + len).min(total) {
            runs[(b / 64) as usize] |= 1 << (b % 64);
        }
        bit += len + 1 + rng.below(len * 46 / 10 + 1);
    }
    let full = vec![u64::MAX; WORDS];
    vec![
        ("scattered_1pct", scattered),
        ("runs_30pct", runs),
        ("all_dirty", full),
    ]
}

fn bench_bitmap(c: &mut Criterion) {
    let mut g = c.benchmark_group("bitmap_to_ranges_1GiB");
    let mut out = Vec::with_capacity(1 << 18);
    for (name, bm) in bitmaps() {
        let pages: u64 = bm.iter().map(|w| u64::from(w.count_ones())).sum();
        out.clear();
        bitmap_to_ranges(&bm, 0, PAGE_U64, 1 << 20, &mut out);
        eprintln!("bitmap {name}: {pages} dirty pages -> {} ranges", out.len());
        g.throughput(Throughput::Elements((bm.len() * 64) as u64));
        g.bench_with_input(BenchmarkId::from_parameter(name), &bm, |b, bm| {
            b.iter(|| {
                out.clear();
                // Ranges capped at 1 MiB, as the sender partitions them.
                bitmap_to_ranges(black_box(bm), 0x1_0000_0000, PAGE_U64, 1 << 20, &mut out);
                black_box(out.len())
            })
        });
    }
    g.finish();
}

fn bench_zero(c: &mut Criterion) {
    let mut g = c.benchmark_group("is_zero_4KiB");
    g.throughput(Throughput::Bytes(PAGE_U64));
    let zero = vec![0u8; PAGE];
    let mut first = vec![0u8; PAGE];
    first[0] = 1;
    let mut last = vec![0u8; PAGE];
    last[PAGE - 1] = 1;
    for (name, page) in [
        ("zero_page", &zero),
        ("nonzero_first_byte", &first),
        ("nonzero_last_byte", &last),
    ] {
        g.bench_with_input(BenchmarkId::new("ferry", name), page, |b, p| {
            b.iter(|| is_zero(black_box(p)))
        });
    }
    // Baseline: the obvious byte loop, to show what the word-wise version buys.
    g.bench_with_input(
        BenchmarkId::new("naive_bytes", "zero_page"),
        &zero,
        |b, p| b.iter(|| black_box(p).iter().all(|&x| x == 0)),
    );
    g.finish();
}

/// One page of "text-like" data: words from a small vocabulary, like logs or source code.
fn text_page(rng: &mut Rng) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "the ",
        "migration ",
        "page ",
        "dirty ",
        "vcpu ",
        "round ",
        "stream ",
        "ferry ",
        "memory ",
        "kernel ",
        "0x7f3a ",
        "error=0 ",
        "\n",
        "INFO ",
        "bytes=4096 ",
        "ok ",
    ];
    let mut p = Vec::with_capacity(PAGE + 16);
    while p.len() < PAGE {
        p.extend_from_slice(WORDS[rng.below(16) as usize].as_bytes());
    }
    p.truncate(PAGE);
    p
}

fn random_page(rng: &mut Rng) -> Vec<u8> {
    let mut p = Vec::with_capacity(PAGE);
    while p.len() < PAGE {
        p.extend_from_slice(&rng.next().to_le_bytes());
    }
    p
}

/// 1 MiB of realistic guest pages: half zero, a quarter text-like, a quarter random
/// (compressed or encrypted data), interleaved.
fn realistic_batch() -> Vec<u8> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::with_capacity(256 * PAGE);
    for i in 0..256 {
        match i % 4 {
            0 | 2 => out.extend_from_slice(&[0u8; PAGE]),
            1 => out.extend_from_slice(&text_page(&mut rng)),
            _ => out.extend_from_slice(&random_page(&mut rng)),
        }
    }
    out
}

fn bench_hash(c: &mut Criterion) {
    let mut g = c.benchmark_group("page_checksum_4KiB");
    g.throughput(Throughput::Bytes(PAGE_U64));
    let page = random_page(&mut Rng(7));
    g.bench_function("xxh3_64_seeded", |b| {
        b.iter(|| page_hash(black_box(0x1234_5000), black_box(&page)))
    });
    // For comparison: the keyed MAC the handshake-authenticated stream may use per chunk.
    let key = [7u8; 32];
    g.bench_function("blake3_keyed", |b| {
        b.iter(|| blake3::keyed_hash(&key, black_box(&page)))
    });
    g.finish();
}

fn bench_zstd(c: &mut Criterion) {
    let batch = realistic_batch();
    let mut g = c.benchmark_group("zstd_1MiB_mixed_pages");
    g.throughput(Throughput::Bytes(batch.len() as u64));
    let mut dst = vec![0u8; zstd::zstd_safe::compress_bound(batch.len())];
    for level in [-3, 1, 3] {
        let mut comp = zstd::bulk::Compressor::new(level).expect("zstd compressor");
        let n = comp
            .compress_to_buffer(&batch, &mut dst)
            .expect("zstd compress");
        eprintln!(
            "zstd level {level}: 1 MiB mixed pages -> {n} bytes (ratio {:.2})",
            batch.len() as f64 / n as f64
        );
        g.bench_with_input(BenchmarkId::new("compress_level", level), &level, |b, _| {
            b.iter(|| {
                comp.compress_to_buffer(black_box(&batch), &mut dst)
                    .expect("zstd compress")
            })
        });
    }
    let compressed = zstd::bulk::compress(&batch, 1).expect("zstd compress");
    let mut dec = zstd::bulk::Decompressor::new().expect("zstd decompressor");
    let mut out = vec![0u8; batch.len()];
    g.bench_function("decompress_level_1", |b| {
        b.iter(|| {
            dec.decompress_to_buffer(black_box(&compressed), &mut out)
                .expect("zstd decompress")
        })
    });
    g.finish();
}

/// A `Pages` frame with 256 ranges of 1..=8 pages and one checksum per page.
fn pages_frame() -> Frame {
    let mut rng = Rng(42);
    let mut ranges = Vec::with_capacity(256);
    let mut gpa = 0x1_0000_0000u64;
    let mut pages = 0u64;
    for _ in 0..256 {
        let n = 1 + rng.below(8);
        ranges.push(GpaRange::new(gpa, n * PAGE_U64));
        pages += n;
        gpa += (n + 1 + rng.below(16)) * PAGE_U64;
    }
    let checksums = (0..pages).map(|_| rng.next()).collect();
    Frame::Pages {
        ranges,
        checksums: Some(checksums),
        last: false,
    }
}

fn bench_frame(c: &mut Criterion) {
    let frame = pages_frame();
    let encoded = frame.encode();
    eprintln!(
        "Pages frame, 256 ranges + checksums: {} bytes of header+metadata",
        encoded.len()
    );
    let mut g = c.benchmark_group("frame_pages_256_ranges");
    g.throughput(Throughput::Elements(256));
    g.bench_function("encode", |b| b.iter(|| black_box(&frame).encode()));
    g.bench_function("decode", |b| {
        b.iter(|| decode_buffer(black_box(&encoded)).expect("decode"))
    });
    g.finish();
}

/// Size of the registered area the userfaultfd benchmarks place pages into.
const UFFD_LEN: u64 = 64 << 20;

/// Times `place(offset)` for consecutive chunks of `chunk` bytes over a region of
/// [`UFFD_LEN`], calling `reset(bytes)` (untimed) whenever the region is used up so the pages
/// are missing again.
fn time_placements(
    iters: u64,
    chunk: u64,
    mut place: impl FnMut(u64),
    mut reset: impl FnMut(u64),
) -> Duration {
    let per_fill = UFFD_LEN / chunk;
    let mut total = Duration::ZERO;
    let mut done = 0;
    while done < iters {
        let n = (iters - done).min(per_fill);
        let t = Instant::now();
        for i in 0..n {
            place(i * chunk);
        }
        total += t.elapsed();
        reset(n * chunk);
        done += n;
    }
    total
}

fn bench_uffd_copy(c: &mut Criterion) {
    let uffd = match Uffd::open(false, Features::NONE) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("skipping uffd_copy benchmarks: no userfaultfd: {e}");
            return;
        }
    };
    let region = MemRegion::anonymous(UFFD_LEN, MemOptions::default()).expect("anonymous region");
    // SAFETY: `region` is a fresh private mapping owned by this function; nothing reads it
    // through a Rust reference, it is only filled by UFFDIO_COPY and emptied by `discard`.
    unsafe { uffd.register(region.addr(), UFFD_LEN, RegisterMode::MISSING) }
        .expect("register MISSING");
    let mut rng = Rng(3);
    let src: Vec<u8> = (0..(2 << 20) / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    let mut g = c.benchmark_group("uffd_copy");
    for (name, chunk) in [("4KiB", 4u64 << 10), ("64KiB", 64 << 10), ("2MiB", 2 << 20)] {
        g.throughput(Throughput::Bytes(chunk));
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                time_placements(
                    iters,
                    chunk,
                    |off| {
                        let r = uffd
                            .copy(region.addr() + off, &src, chunk, PlaceMode::WAKE)
                            .expect("UFFDIO_COPY");
                        assert_eq!(r, Fill::Done);
                    },
                    |bytes| region.discard(0, bytes).expect("discard"),
                )
            })
        });
    }
    g.finish();
}

fn bench_uffd_continue(c: &mut Criterion) {
    let uffd = match Uffd::open(false, Features::MINOR_SHMEM) {
        Ok(u) if u.features().contains(Features::MINOR_SHMEM) => u,
        Ok(_) => {
            eprintln!("skipping uffd_continue benchmark: kernel lacks UFFD_FEATURE_MINOR_SHMEM");
            return;
        }
        Err(e) => {
            eprintln!("skipping uffd_continue benchmark: no userfaultfd: {e}");
            return;
        }
    };
    let region = MemRegion::memfd("ferry-bench-minor", UFFD_LEN, MemOptions::default())
        .expect("memfd region");
    // Fill the page cache through a second mapping; the region's own mapping stays unpopulated,
    // so its first touch of each page is a MINOR fault that UFFDIO_CONTINUE resolves.
    let alias = region.alias().expect("alias mapping");
    let page: Vec<u8> = (0..PAGE).map(|i| (i % 251) as u8 + 1).collect();
    for off in (0..UFFD_LEN).step_by(PAGE) {
        alias.write(off, &page).expect("fill page cache");
    }
    // SAFETY: `region` is a fresh shared mapping owned by this function; nothing reads it
    // through a Rust reference, its page-table entries are only installed by UFFDIO_CONTINUE
    // and dropped by MADV_DONTNEED below.
    unsafe { uffd.register(region.addr(), UFFD_LEN, RegisterMode::MINOR) }.expect("register MINOR");
    let unmap_ptes = |bytes: u64| {
        let len = usize::try_from(bytes).expect("length fits usize");
        // SAFETY: `region.as_ptr()..+len` lies inside the region's mapping (len <= UFFD_LEN).
        // MADV_DONTNEED on a shared memfd mapping only drops this mapping's page-table
        // entries; the data stays in the page cache, so no memory is freed under anyone.
        unsafe {
            rustix::mm::madvise(
                region.as_ptr().cast(),
                len,
                rustix::mm::Advice::LinuxDontNeed,
            )
        }
        .expect("MADV_DONTNEED");
    };
    let mut g = c.benchmark_group("uffd_continue");
    g.throughput(Throughput::Bytes(PAGE_U64));
    g.bench_function("4KiB", |b| {
        b.iter_custom(|iters| {
            time_placements(
                iters,
                PAGE_U64,
                |off| {
                    let r = uffd
                        .continue_(region.addr() + off, PAGE_U64, PlaceMode::WAKE)
                        .expect("UFFDIO_CONTINUE");
                    assert_eq!(r, Fill::Done);
                },
                unmap_ptes,
            )
        })
    });
    g.finish();
}

criterion_group! {
    name = hot_paths;
    config = config();
    targets = bench_bitmap, bench_zero, bench_hash, bench_zstd, bench_frame, bench_uffd_copy,
        bench_uffd_continue
}
criterion_main!(hot_paths);
