// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The urgent path: post-copy page requests are answered on their own connection and thread
//! while bulk streams saturate the link, and the replies land in the destination's alias
//! mapping. Latency is measured and printed, not asserted.

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
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use anyhow::{Result, anyhow, ensure};
    use ferry_transport::urgent::{Priority, Serve, raise_thread_priority, urgent_config};
    use ferry_transport::{
        Backend, Batch, BulkPusher, DataStream, GpaRange, StreamConfig, StreamError, Target,
        UrgentServer,
    };

    use super::common::*;

    const PAGE: u64 = 4096;

    fn latencies(label: &str, mut v: Vec<Duration>) {
        v.sort();
        let pct = |p: f64| v[((v.len() - 1) as f64 * p) as usize];
        eprintln!(
            "urgent {label}: n={} p50={:?} p99={:?} max={:?}",
            v.len(),
            pct(0.5),
            pct(0.99),
            v[v.len() - 1]
        );
    }

    /// One request/reply: ask for `range`, receive the reply header and the page into the alias
    /// mapping.
    fn fetch(client: &mut dyn DataStream, range: GpaRange) -> Result<Duration, StreamError> {
        let start = Instant::now();
        client.send_frame(&header(range.gpa, range.len), &[])?;
        client.flush()?;
        let mut h = [0u8; 16];
        client.recv_exact(&mut h)?;
        let (gpa, len) = parse(&h);
        client.recv_into(&[GpaRange::new(gpa, len)], Target::Alias)?;
        Ok(start.elapsed())
    }

    #[test]
    fn urgent_request_answered_while_bulk_saturated() -> Result<()> {
        let bulk_backend = if uring_available() {
            Backend::Uring
        } else {
            Backend::Socket
        };
        let size = 32 * MIB;
        let src = Guest::new(&[size], MIB, Some(7), None);
        let alias = vec![Mem::new(size as usize)];
        let dst = Guest::new(&[size], MIB, None, Some(&alias));
        let timeout = Duration::from_secs(10);

        let priority = match std::env::var("URGENT_PRIORITY").as_deref() {
            Ok("fifo") => Priority::Fifo(1),
            Ok("none") => Priority::Unchanged,
            _ => Priority::default(),
        };
        eprintln!("urgent threads at {priority:?}");
        // Urgent connection: the destination asks, the source serves.
        let (client_sock, server_sock) = socket_pairs(Net::Tcp, 1)?.pop().unwrap();
        let server = UrgentServer::spawn(
            server_sock,
            9,
            &src.reg,
            &urgent_config(timeout),
            priority,
            |s: &mut dyn DataStream| {
                let mut h = [0u8; 16];
                s.recv_exact(&mut h)?;
                let (gpa, len) = parse(&h);
                if gpa == END_GPA {
                    return Ok(Serve::Stop);
                }
                s.send_frame(&h, &[GpaRange::new(gpa, len)])?;
                s.flush()?;
                Ok(Serve::Continue)
            },
        )?;
        let mut client = open(client_sock, 9, &dst.reg, &urgent_config(timeout))?;
        // The requesting thread plays the destination's fault handler.
        if let Err(e) = raise_thread_priority(priority) {
            eprintln!("fault thread keeps normal priority: {e}");
        }
        let page_at = |i: u64| GpaRange::new((i * 7919 * PAGE) % size, PAGE);

        let idle: Vec<Duration> = (0..100)
            .map(|i| fetch(client.as_mut(), page_at(i)))
            .collect::<Result<_, _>>()?;

        // Bulk: 2 streams pushing 1 MiB frames round and round until told to stop.
        let cfg = config(bulk_backend, timeout);
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for (i, (c, s)) in socket_pairs(Net::Tcp, 2)?.into_iter().enumerate() {
            senders.push(open(c, i, &src.reg, &cfg)?);
            let mut rx = open(s, i, &dst.reg, &cfg)?;
            receivers.push(std::thread::spawn(move || {
                receive_frames(rx.as_mut(), Target::Guest)
            }));
        }
        let pusher = Arc::new(BulkPusher::new(senders, 4)?);
        let stop = Arc::new(AtomicBool::new(false));
        let producer = {
            let (pusher, stop) = (Arc::clone(&pusher), Arc::clone(&stop));
            std::thread::spawn(move || -> Result<u64, ferry_transport::BulkError> {
                let mut sent = 0u64;
                let mut gpa = 0;
                while !stop.load(Ordering::Acquire) {
                    let mut b = Batch::new();
                    for _ in 0..4 {
                        b.push(&header(gpa, MIB), &[GpaRange::new(gpa, MIB)]);
                        gpa = (gpa + MIB) % size;
                    }
                    sent += b.payload_bytes();
                    pusher.push(b)?;
                }
                Ok(sent)
            })
        };
        let bulk_bytes = |p: &BulkPusher| -> u64 {
            p.counters()
                .iter()
                .map(|c| c.bytes.load(Ordering::Relaxed))
                .sum()
        };
        // Let the bulk streams get going.
        let warm = Instant::now();
        while bulk_bytes(&pusher) < 64 * MIB && warm.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let before = bulk_bytes(&pusher);
        let busy_start = Instant::now();
        let mut busy = Vec::new();
        for i in 100..400 {
            busy.push(fetch(client.as_mut(), page_at(i))?);
            ensure!(!producer.is_finished(), "bulk producer ended early");
        }
        // 300 requests can take only a few ms, less than one 4 MiB batch of bulk on a busy
        // machine: go on asking (bounded) until the bulk counters move, so that the check below
        // is that bulk flows while urgent requests are served, not a race with the batch size.
        let mut i = 400;
        while bulk_bytes(&pusher) == before && busy_start.elapsed() < Duration::from_secs(5) {
            busy.push(fetch(client.as_mut(), page_at(i))?);
            ensure!(!producer.is_finished(), "bulk producer ended early");
            i += 1;
        }
        let busy_elapsed = busy_start.elapsed();
        let after = bulk_bytes(&pusher);
        ensure!(
            !producer.is_finished(),
            "bulk producer ended before the urgent requests"
        );
        stop.store(true, Ordering::Release);
        let pushed = producer
            .join()
            .map_err(|_| anyhow!("producer panicked"))??;
        let pusher = Arc::try_unwrap(pusher).map_err(|_| anyhow!("pusher still shared"))?;
        pusher.flush(Duration::from_secs(30))?;
        let report = pusher.finish()?;
        let mut received = 0;
        for h in receivers {
            received += h.join().map_err(|_| anyhow!("receiver panicked"))??;
        }

        client.send_frame(&header(END_GPA, 0), &[])?;
        client.flush()?;
        let ureport = server.join()?;

        latencies("idle", idle);
        latencies(&format!("under {bulk_backend} bulk x2"), busy);
        let rate = (after - before) as f64 / busy_elapsed.as_secs_f64() / 1e9;
        eprintln!(
            "bulk moved {} MiB during the urgent phase ({rate:.2} GB/s); total {} MiB, served {}",
            (after - before) >> 20,
            report.total().bytes_sent >> 20,
            ureport.served
        );
        ensure!(
            after > before,
            "bulk made no progress during the urgent phase"
        );
        ensure!(received == pushed, "bulk received {received} of {pushed}");
        // Every request (100 idle, 300 or more under bulk) and the end marker.
        let asked = i;
        ensure!(
            ureport.served == asked + 1,
            "served {} of {}",
            ureport.served,
            asked + 1
        );
        // Every requested page arrived in the alias mapping, intact.
        for i in 0..asked {
            let r = page_at(i);
            let (a, b) = (r.gpa as usize, (r.gpa + r.len) as usize);
            ensure!(
                alias[0].bytes()[a..b] == src.mems[0].bytes()[a..b],
                "page {r}"
            );
        }
        ensure!(src.hashes() == dst.hashes(), "bulk contents differ");
        Ok(())
    }

    /// `stop` wakes a server blocked waiting for a request and reports cleanly, in bounded
    /// time; a handler error ends the server and is reported by `join`.
    #[test]
    fn urgent_server_stops_and_reports_errors() -> Result<()> {
        let src = Guest::new(&[MIB], MIB, Some(1), None);
        let timeout = Duration::from_secs(10);
        let (client, server_sock) = socket_pairs(Net::Tcp, 1)?.pop().unwrap();
        let server = UrgentServer::spawn(
            server_sock,
            5,
            &src.reg,
            &urgent_config(timeout),
            Priority::default(),
            |s: &mut dyn DataStream| {
                let mut h = [0u8; 16];
                s.recv_exact(&mut h)?;
                Ok(Serve::Continue)
            },
        )?;
        std::thread::sleep(Duration::from_millis(50));
        ensure!(!server.is_finished());
        let start = Instant::now();
        let report = server.stop()?;
        ensure!(
            start.elapsed() < Duration::from_secs(2),
            "stop took {:?}",
            start.elapsed()
        );
        ensure!(report.served == 0);
        drop(client);

        // A request for memory that is not registered: the handler's error surfaces.
        let (client, server_sock) = socket_pairs(Net::Tcp, 1)?.pop().unwrap();
        let server = UrgentServer::spawn(
            server_sock,
            6,
            &src.reg,
            &urgent_config(timeout),
            Priority::default(),
            |s: &mut dyn DataStream| {
                let mut h = [0u8; 16];
                s.recv_exact(&mut h)?;
                let (gpa, len) = parse(&h);
                s.send_frame(&h, &[GpaRange::new(gpa, len)])?;
                Ok(Serve::Continue)
            },
        )?;
        let mut c = open(client, 6, &src.reg, &urgent_config(timeout))?;
        c.send_frame(&header(64 * MIB, PAGE), &[])?;
        c.flush()?;
        let err = server.join().unwrap_err();
        eprintln!(
            "urgent handler error: {err}: {:?}",
            std::error::Error::source(&err).map(ToString::to_string)
        );
        let ferry_transport::BulkError::Stream { source } = err else {
            anyhow::bail!("unexpected {err:?}")
        };
        ensure!(
            matches!(*source, StreamError::Range { stream: 6, .. }),
            "{source:?}"
        );
        Ok(())
    }

    /// Request/reply over io_uring streams on both sides (sends and receives interleaved on one
    /// ring), replies into the alias mapping; latency printed for comparison with sockets.
    #[test]
    fn request_reply_over_each_backend() -> Result<()> {
        let mut backends = vec![Backend::Socket];
        if uring_available() {
            backends.push(Backend::Uring);
        }
        let size = 4 * MIB;
        for backend in backends {
            let src = Guest::new(&[size], MIB, Some(11), None);
            let alias = vec![Mem::new(size as usize)];
            let dst = Guest::new(&[size], MIB, None, Some(&alias));
            let cfg = StreamConfig {
                backend,
                ..urgent_config(Duration::from_secs(5))
            };
            let (c, s) = socket_pairs(Net::Tcp, 1)?.pop().unwrap();
            let server = UrgentServer::spawn(s, 1, &src.reg, &cfg, Priority::default(), |s| {
                let mut h = [0u8; 16];
                s.recv_exact(&mut h)?;
                let (gpa, len) = parse(&h);
                if gpa == END_GPA {
                    return Ok(Serve::Stop);
                }
                s.send_frame(&h, &[GpaRange::new(gpa, len)])?;
                s.flush()?;
                Ok(Serve::Continue)
            })?;
            let mut client = open(c, 1, &dst.reg, &cfg)?;
            let mut lat = Vec::new();
            for i in 0..300u64 {
                let r = GpaRange::new((i * 13 * PAGE) % size, PAGE * (1 + i % 4));
                lat.push(fetch(client.as_mut(), r)?);
                let (a, b) = (r.gpa as usize, (r.gpa + r.len) as usize);
                ensure!(
                    alias[0].bytes()[a..b] == src.mems[0].bytes()[a..b],
                    "{backend}: {r}"
                );
            }
            client.send_frame(&header(END_GPA, 0), &[])?;
            client.flush()?;
            let report = server.join()?;
            ensure!(report.served == 301);
            latencies(&format!("idle request/reply over {backend}"), lat);
        }
        Ok(())
    }
}
