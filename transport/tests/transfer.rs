// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Moves guest memory over each runnable backend with 1, 2 and 4 streams on loopback through
//! the bulk pusher and verifies it (xxh3 of both sides), with 1 MiB fixed-buffer slices so many
//! ranges straddle a slice boundary.

mod common;

#[cfg(test)]
// Test sizes are small (MiB) and latencies positive, so the casts cannot truncate or lose sign.
#[allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]
mod tests {
    use std::time::{Duration, Instant};

    use anyhow::{Result, anyhow, ensure};
    use ferry_transport::{
        Backend, Batch, BulkPusher, StreamConfig, StreamStats, Target, ZeroCopy,
    };
    use ferry_transport::{GpaRange, StreamError};

    use super::common::*;

    fn run_transfer(backend: Backend, net: Net, streams: usize) -> Result<()> {
        run_transfer_with(config(backend, Duration::from_secs(10)), net, streams)
    }

    fn run_transfer_with(cfg: StreamConfig, net: Net, streams: usize) -> Result<()> {
        let backend = cfg.backend;
        let sizes = [24 * MIB, 8 * MIB + 12288];
        let src = Guest::new(&sizes, MIB, Some(0x5eed + streams as u64), None);
        let dst = Guest::new(&sizes, MIB, None, None);
        let pairs = socket_pairs(net, streams)?;
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for (i, (c, s)) in pairs.into_iter().enumerate() {
            senders.push(open(c, i, &src.reg, &cfg)?);
            let mut rx = open(s, i, &dst.reg, &cfg)?;
            receivers.push(std::thread::spawn(move || {
                (receive_frames(rx.as_mut(), Target::Guest), rx.stats())
            }));
        }
        let start = Instant::now();
        let pusher = BulkPusher::new(senders, 4)?;
        let ranges = ranges_for(&src.layout);
        let total: u64 = ranges.iter().map(|r| r.len).sum();
        for chunk in ranges.chunks(8) {
            let mut b = Batch::new();
            for r in chunk {
                b.push(&header(r.gpa, r.len), &[*r]);
            }
            pusher.push(b)?;
        }
        let flushed = pusher.flush(Duration::from_secs(30));
        let report = pusher.finish();
        let mut received = 0;
        let mut rx_stats = StreamStats::default();
        for h in receivers {
            let (n, stats) = h.join().map_err(|_| anyhow!("receiver panicked"))?;
            received += n?;
            rx_stats.add(&stats);
        }
        flushed?;
        let report = report?;
        let secs = start.elapsed().as_secs_f64();
        let t = report.total();
        eprintln!(
            "{backend} {net:?} x{streams}: {} MiB in {secs:.3} s = {:.2} GB/s; sqes {} zc_sends {} \
             zc_notifs {} zc_copied {}; resubmits tx {} rx {}; batches per stream {:?}",
            total >> 20,
            total as f64 / secs / 1e9,
            t.sqes,
            t.zc_sends,
            t.zc_notifs,
            t.zc_copied,
            t.resubmits,
            rx_stats.resubmits,
            report.batches
        );
        ensure!(received == total, "received {received} of {total}");
        ensure!(
            t.bytes_sent == total + 16 * ranges.len() as u64,
            "sent {} bytes",
            t.bytes_sent
        );
        ensure!(t.frames_sent == ranges.len() as u64);
        ensure!(src.hashes() == dst.hashes(), "contents differ");
        if backend == Backend::Uring && !cfg.wait_all {
            ensure!(
                t.resubmits + rx_stats.resubmits > 0,
                "no short completion was exercised"
            );
        }
        if backend == Backend::Uring && net == Net::Tcp && cfg.zero_copy != ZeroCopy::Off {
            ensure!(t.zc_sends > 0, "large ranges must go by SEND_ZC");
            ensure!(t.zc_notifs == t.zc_sends, "every SEND_ZC notified");
        }
        ensure!(src.reg.inflight() == 0, "guards left after finish");
        Ok(())
    }

    #[test]
    fn tcp_socket_backend_1_2_4_streams() -> Result<()> {
        for n in [1, 2, 4] {
            run_transfer(Backend::Socket, Net::Tcp, n)?;
        }
        Ok(())
    }

    #[test]
    fn unix_socket_backend_1_2_4_streams() -> Result<()> {
        for n in [1, 2, 4] {
            run_transfer(Backend::Socket, Net::Unix, n)?;
        }
        Ok(())
    }

    #[test]
    fn uring_tcp_1_2_4_streams() -> Result<()> {
        if !uring_available() {
            return Ok(());
        }
        for n in [1, 2, 4] {
            run_transfer(Backend::Uring, Net::Tcp, n)?;
        }
        Ok(())
    }

    #[test]
    fn uring_unix_1_2_4_streams() -> Result<()> {
        if !uring_available() {
            return Ok(());
        }
        for n in [1, 2, 4] {
            run_transfer(Backend::Uring, Net::Unix, n)?;
        }
        Ok(())
    }

    /// Without `MSG_WAITALL` the kernel completes sends and receives short whenever the socket
    /// fills or drains; the stream must resubmit each remainder, in order, across severed link
    /// chains, with zero-copy sends in the mix.
    #[test]
    fn uring_short_completions_are_resubmitted() -> Result<()> {
        if !uring_available() {
            return Ok(());
        }
        for n in [1, 2] {
            let cfg = StreamConfig {
                wait_all: false,
                zero_copy: ZeroCopy::Always,
                ..config(Backend::Uring, Duration::from_secs(10))
            };
            run_transfer_with(cfg, Net::Tcp, n)?;
            let cfg = StreamConfig {
                wait_all: false,
                ..config(Backend::Uring, Duration::from_secs(10))
            };
            run_transfer_with(cfg, Net::Unix, n)?;
        }
        Ok(())
    }

    /// Frames of many non-contiguous 4 KiB pages (every other page), received with the same
    /// scatter list: the io_uring backend coalesces them into SENDMSG/RECVMSG iovecs.
    #[test]
    fn scatter_gather_frames() -> Result<()> {
        let mut backends = vec![Backend::Socket];
        if uring_available() {
            backends.push(Backend::Uring);
        }
        const PAGE: u64 = 4096;
        for backend in backends {
            let size = 8 * MIB;
            let src = Guest::new(&[size], MIB, Some(99), None);
            let dst = Guest::new(&[size], MIB, None, None);
            let cfg = config(backend, Duration::from_secs(10));
            let (c, s) = socket_pairs(Net::Tcp, 1)?.pop().unwrap();
            let mut tx = open(c, 0, &src.reg, &cfg)?;
            let mut rx = open(s, 0, &dst.reg, &cfg)?;
            let pages = |start: u64, n: u64| -> Vec<GpaRange> {
                (0..n)
                    .map(|k| GpaRange::new(start + 2 * k * PAGE, PAGE))
                    .collect()
            };
            let per_frame = 48u64;
            let receiver = std::thread::spawn(move || -> Result<StreamStats, StreamError> {
                loop {
                    let mut h = [0u8; 16];
                    rx.recv_exact(&mut h)?;
                    let (start, n) = parse(&h);
                    if start == END_GPA {
                        return Ok(rx.stats());
                    }
                    rx.recv_into(&pages(start, n), Target::Guest)?;
                }
            });
            // Even pages, then odd pages; each frame spans 2 * per_frame pages.
            for parity in [0, PAGE] {
                let mut start = parity;
                while start < size {
                    let n = per_frame.min((size - start).div_ceil(2 * PAGE));
                    tx.send_frame(&header(start, n), &pages(start, n))?;
                    start += 2 * n * PAGE;
                }
            }
            tx.send_frame(&header(END_GPA, 0), &[])?;
            tx.flush()?;
            let rx_stats = receiver
                .join()
                .map_err(|_| anyhow!("receiver panicked"))??;
            let t = tx.stats();
            eprintln!(
                "{backend} scatter-gather: tx sqes {} submits {}, rx sqes {}",
                t.sqes, t.submits, rx_stats.sqes
            );
            ensure!(src.hashes() == dst.hashes(), "{backend}: contents differ");
            if backend == Backend::Uring {
                // 2048 pages + 44 headers as single requests would be ~2100 SQEs.
                ensure!(
                    t.sqes < 200,
                    "{backend}: sends not coalesced ({} SQEs)",
                    t.sqes
                );
                ensure!(
                    rx_stats.sqes < 200,
                    "receives not coalesced ({} SQEs)",
                    rx_stats.sqes
                );
            }
        }
        Ok(())
    }

    /// With every optional io_uring feature in use (fixed file, fixed buffers, SEND_ZC,
    /// SENDMSG/RECVMSG), ranges that straddle 1 MiB fixed-buffer slices go by SEND_ZC with the
    /// right buffer indices (a wrong index would send another slice's bytes or fail).
    #[test]
    fn uring_fixed_buffers_across_slices() -> Result<()> {
        use ferry_transport::DataStream;
        use ferry_transport::uring::UringStream;
        if !uring_available() {
            return Ok(());
        }
        let src = Guest::new(&[16 * MIB], MIB, Some(42), None);
        let dst = Guest::new(&[16 * MIB], MIB, None, None);
        let cfg = StreamConfig {
            zero_copy: ZeroCopy::Always,
            ..config(Backend::Uring, Duration::from_secs(10))
        };
        let (c, s) = socket_pairs(Net::Tcp, 1)?.pop().unwrap();
        let mut tx = UringStream::new(c, 0, &src.reg, &cfg)?;
        let caps = tx.caps();
        eprintln!("{caps:?}");
        ensure!(caps.fixed_file && caps.fixed_buffers && caps.send_zc && caps.msg_ops);
        let mut rx = open(s, 0, &dst.reg, &cfg)?;
        let receiver = std::thread::spawn(move || receive_frames(rx.as_mut(), Target::Guest));
        // 3 MiB - 12 KiB ranges starting 4 KiB before a slice boundary: each spans 4 slices.
        let mut gpa = MIB - 4096;
        let mut sent = 0;
        while gpa + 3 * MIB <= 16 * MIB {
            let len = 3 * MIB - 12288;
            tx.send_frame(&header(gpa, len), &[GpaRange::new(gpa, len)])?;
            sent += len;
            gpa += 3 * MIB;
        }
        tx.shutdown()?;
        let got = receiver
            .join()
            .map_err(|_| anyhow!("receiver panicked"))??;
        ensure!(got == sent);
        let t = tx.stats();
        eprintln!(
            "zc_sends {} zc_notifs {} zc_copied {}",
            t.zc_sends, t.zc_notifs, t.zc_copied
        );
        // Per frame: 4 KiB (below the threshold, copied), then three pieces of ~1 MiB by ZC.
        ensure!(t.zc_sends == 3 * 5, "ZC sends {}", t.zc_sends);
        ensure!(t.zc_notifs == t.zc_sends);
        let (a, b) = (src.mems[0].bytes(), dst.mems[0].bytes());
        let mut gpa = (MIB - 4096) as usize;
        while gpa + 3 * MIB as usize <= 16 * MIB as usize {
            let len = (3 * MIB - 12288) as usize;
            ensure!(a[gpa..gpa + len] == b[gpa..gpa + len], "range at {gpa:#x}");
            gpa += 3 * MIB as usize;
        }
        Ok(())
    }
}
