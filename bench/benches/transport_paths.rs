// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Criterion micro-benchmarks of the transport's per-frame hot paths: translating guest ranges
//! into fixed-buffer segments (range splitting at slice boundaries), building a batch of
//! frames (what becomes one io_uring submission), and the engine's chunk dispatch shape
//! (splitting dirty ranges by chunk). Completion handling inside the io_uring backend is not
//! public API and is measured end to end by `ferry bench transport` instead.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ferry_engine::memory::{MemOptions, MemRegion};
use ferry_protocol::memmap::partition;
use ferry_protocol::{Frame, GpaRange};
use ferry_transport::memory::{GuestRegion, RegistrationConfig, Target};
use ferry_transport::{Batch, MemoryRegistration};

const MIB: u64 = 1 << 20;

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("transport");
    g.measurement_time(Duration::from_secs(2)).sample_size(20);
    let Ok(mem) = MemRegion::anonymous(64 * MIB, MemOptions::default()) else {
        eprintln!("SKIP: cannot map 64 MiB");
        return;
    };
    // SAFETY: `mem` stays mapped for the whole benchmark and outlives `reg`.
    let Ok(reg) = (unsafe {
        MemoryRegistration::new(
            &[GuestRegion::new(0, mem.as_ptr(), 64 * MIB)],
            RegistrationConfig { slice_size: MIB },
        )
    }) else {
        eprintln!("SKIP: registration refused");
        return;
    };
    // 4 KiB pages scattered every other page across 1 MiB slices: many ranges, some crossing.
    let ranges: Vec<GpaRange> = (0..4096u64)
        .map(|i| GpaRange::new(i * 8192 + 4096, 8192))
        .collect();
    g.throughput(Throughput::Elements(ranges.len() as u64));
    g.bench_function("segments_4096_ranges_1MiB_slices", |b| {
        b.iter(|| {
            let mut n = 0usize;
            for r in &ranges {
                n += reg.segments(*r, Target::Guest).map_or(0, |s| s.len());
            }
            black_box(n)
        });
    });
    g.bench_function("batch_256_frames", |b| {
        let frames: Vec<(Vec<u8>, GpaRange)> = ranges[..256]
            .iter()
            .map(|r| {
                let f = Frame::Pages {
                    ranges: vec![*r],
                    checksums: None,
                    last: false,
                };
                (f.encode(), *r)
            })
            .collect();
        b.iter(|| {
            let mut batch = Batch::new();
            for (h, r) in &frames {
                batch.push(h, std::slice::from_ref(r));
            }
            black_box(batch.len())
        });
    });
    g.bench_function("partition_1GiB_into_4MiB_chunks", |b| {
        let big = [GpaRange::new(0, 1 << 30)];
        b.iter(|| black_box(partition(&big, 4 * MIB, 4096).len()));
    });
    g.finish();
}

criterion_group!(group, benches);
criterion_main!(group);
