// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Peers that disconnect or stall: the other side gets a clear, typed error within a bounded
//! time, never a hang; and the registration can be released afterwards (no leaked guards).

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

    use anyhow::{Result, bail, ensure};
    use ferry_transport::{
        At, Backend, Batch, BulkError, BulkPusher, GpaRange, MemoryRegistration, StreamError,
        Target,
    };

    use super::common::*;

    fn backends() -> Vec<Backend> {
        let mut v = vec![Backend::Socket];
        if uring_available() {
            v.push(Backend::Uring);
        }
        v
    }

    /// The receiver reads part of a large frame and hangs up: the sender's send/flush fails
    /// promptly with a peer-gone error naming the stream and peer.
    #[test]
    fn sender_sees_receiver_disconnect() -> Result<()> {
        for backend in backends() {
            let src = Guest::new(&[32 * MIB], MIB, Some(1), None);
            let cfg = config(backend, Duration::from_secs(5));
            let (c, s) = socket_pairs(Net::Tcp, 1)?.pop().unwrap();
            let reader = std::thread::spawn(move || {
                let mut buf = vec![0u8; 512 * 1024];
                use std::io::Read;
                let Socket::Tcp(mut t, _) = s else { return };
                let _ = t.read_exact(&mut buf);
                // Dropping `t` with unread data resets the connection.
            });
            use ferry_transport::Socket;
            let mut tx = open(c, 3, &src.reg, &cfg)?;
            let start = Instant::now();
            let mut res = Ok(());
            for _ in 0..8 {
                res = tx
                    .send_frame(&header(0, 32 * MIB), &[GpaRange::new(0, 32 * MIB)])
                    .and_then(|()| tx.flush());
                if res.is_err() {
                    break;
                }
            }
            let elapsed = start.elapsed();
            reader.join().unwrap();
            let Err(e) = res else {
                bail!("{backend}: 256 MiB sent to a peer that hung up")
            };
            eprintln!("{backend}: after {elapsed:?}: {e}");
            ensure!(e.stream() == 3, "{e}");
            ensure!(e.to_string().contains("127.0.0.1"), "{e}");
            ensure!(e.is_peer_gone(), "{backend}: expected peer-gone, got {e:?}");
            ensure!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
            // Later calls say the stream is closed (uring) or fail again (socket), never hang.
            drop(tx);
            MemoryRegistration::unregister(src.reg.clone(), Duration::from_millis(1))
                .err()
                .map(|_| ())
                .unwrap_or(());
            ensure!(src.reg.inflight() == 0, "guards left");
        }
        Ok(())
    }

    /// The sender announces 8 MiB, sends 1 MiB and hangs up: the receiver gets `PeerClosed`
    /// with the counts and range.
    #[test]
    fn receiver_sees_sender_disconnect() -> Result<()> {
        for backend in backends() {
            let src = Guest::new(&[8 * MIB], MIB, Some(2), None);
            let dst = Guest::new(&[8 * MIB], MIB, None, None);
            let cfg = config(backend, Duration::from_secs(5));
            let (c, s) = socket_pairs(Net::Tcp, 1)?.pop().unwrap();
            let mut tx = open(c, 0, &src.reg, &cfg)?;
            let mut rx = open(s, 1, &dst.reg, &cfg)?;
            // Zero-copy sends complete only once the peer acknowledged them, so the sender
            // runs concurrently with the receiver.
            let sender = std::thread::spawn(move || -> Result<(), StreamError> {
                tx.send_frame(&header(0, 8 * MIB), &[GpaRange::new(0, MIB)])?;
                tx.shutdown()
            });
            let start = Instant::now();
            let mut h = [0u8; 16];
            rx.recv_exact(&mut h)?;
            let (gpa, len) = parse(&h);
            let err = rx
                .recv_into(&[GpaRange::new(gpa, len)], Target::Guest)
                .unwrap_err();
            eprintln!("{backend}: after {:?}: {err}", start.elapsed());
            match err {
                StreamError::PeerClosed {
                    stream: 1,
                    received,
                    expected,
                    at: At::Range(r),
                    ..
                } => {
                    ensure!(received == MIB, "received {received}");
                    ensure!(expected == 8 * MIB);
                    ensure!(r == GpaRange::new(0, 8 * MIB));
                }
                other => bail!("{backend}: expected PeerClosed, got {other:?}"),
            }
            sender.join().unwrap()?;
            ensure!(dst.mems[0].bytes()[..MIB as usize] == src.mems[0].bytes()[..MIB as usize]);
        }
        Ok(())
    }

    /// The same with a scatter list longer than one io_uring chain (600 pages, 300 sent):
    /// the counts cover the whole call.
    #[test]
    fn receiver_sees_sender_disconnect_scattered() -> Result<()> {
        const PAGE: u64 = 4096;
        let pages = |n: u64| -> Vec<GpaRange> {
            (0..n).map(|k| GpaRange::new(2 * k * PAGE, PAGE)).collect()
        };
        for backend in backends() {
            let src = Guest::new(&[8 * MIB], MIB, Some(5), None);
            let dst = Guest::new(&[8 * MIB], MIB, None, None);
            let cfg = config(backend, Duration::from_secs(5));
            let (c, s) = socket_pairs(Net::Tcp, 1)?.pop().unwrap();
            let mut tx = open(c, 0, &src.reg, &cfg)?;
            let mut rx = open(s, 1, &dst.reg, &cfg)?;
            let sender = std::thread::spawn(move || -> Result<(), StreamError> {
                tx.send_frame(&[], &pages(300))?;
                tx.shutdown()
            });
            let err = rx.recv_into(&pages(600), Target::Guest).unwrap_err();
            sender.join().unwrap()?;
            eprintln!("{backend}: {err}");
            match err {
                StreamError::PeerClosed {
                    received, expected, ..
                } => {
                    ensure!(received == 300 * PAGE, "{backend}: received {received}");
                    ensure!(expected == 600 * PAGE, "{backend}: expected {expected}");
                }
                other => bail!("{backend}: expected PeerClosed, got {other:?}"),
            }
        }
        Ok(())
    }

    /// A peer that accepts but never reads: the sender's flush fails with `Timeout` after about
    /// the configured time; a receiver whose peer never sends times out too. Afterwards the
    /// registration can be unregistered (zero-copy guards released).
    #[test]
    fn stalled_peer_times_out() -> Result<()> {
        for backend in backends() {
            let src = Guest::new(&[64 * MIB], MIB, Some(3), None);
            let timeout = Duration::from_millis(700);
            let cfg = config(backend, timeout);
            let (c, s) = socket_pairs(Net::Tcp, 1)?.pop().unwrap();
            let mut tx = open(c, 0, &src.reg, &cfg)?;
            let start = Instant::now();
            let res = tx
                .send_frame(&header(0, 64 * MIB), &[GpaRange::new(0, 64 * MIB)])
                .and_then(|()| tx.flush());
            let elapsed = start.elapsed();
            let Err(e) = res else {
                bail!("{backend}: 64 MiB flushed into a peer that never reads")
            };
            eprintln!("{backend}: send after {elapsed:?}: {e}");
            ensure!(matches!(e, StreamError::Timeout { .. }), "{e:?}");
            ensure!(elapsed < timeout * 4, "took {elapsed:?}");
            drop(tx);
            drop(s);
            // Nothing else holds the registration: the zero-copy guards were released when the
            // stream was dropped (the connection to the stalled peer was aborted).
            ensure!(
                src.reg.inflight() == 0,
                "guards left: {}",
                src.reg.inflight()
            );
            let Guest { mems, reg, .. } = src;
            MemoryRegistration::unregister(reg, Duration::from_secs(1))
                .map_err(|e| anyhow::anyhow!("{backend}: {e}"))?;
            drop(mems);
        }
        Ok(())
    }

    /// A peer that stays connected but sends nothing: a receive fails with `Timeout` after
    /// about the configured time.
    #[test]
    fn silent_peer_receive_times_out() -> Result<()> {
        for backend in backends() {
            let dst = Guest::new(&[MIB], MIB, None, None);
            let timeout = Duration::from_millis(500);
            let cfg = config(backend, timeout);
            let (c, s) = socket_pairs(Net::Tcp, 1)?.pop().unwrap();
            let mut rx = open(s, 2, &dst.reg, &cfg)?;
            for (what, res) in [
                ("header", {
                    let start = Instant::now();
                    let mut h = [0u8; 16];
                    (start, rx.recv_exact(&mut h))
                }),
                ("payload", {
                    let start = Instant::now();
                    (start, rx.recv_into(&[GpaRange::new(0, MIB)], Target::Guest))
                }),
            ] {
                let (start, res) = res;
                let elapsed = start.elapsed();
                let Err(e) = res else {
                    bail!("{backend}: {what} received from silence")
                };
                eprintln!("{backend}: {what} after {elapsed:?}: {e}");
                match backend {
                    // The socket backend stays usable after a receive timeout.
                    Backend::Socket => {
                        ensure!(matches!(e, StreamError::Timeout { stream: 2, .. }), "{e:?}")
                    }
                    // io_uring cancels and marks the stream failed after the first timeout.
                    Backend::Uring => ensure!(
                        matches!(
                            e,
                            StreamError::Timeout { stream: 2, .. }
                                | StreamError::Closed { stream: 2, .. }
                        ),
                        "{e:?}"
                    ),
                }
                ensure!(elapsed < timeout * 4, "took {elapsed:?}");
            }
            drop(c);
        }
        Ok(())
    }

    /// Through the bulk pusher: the first error is reported to the owner with its context.
    #[test]
    fn bulk_pusher_reports_first_error() -> Result<()> {
        for backend in backends() {
            let src = Guest::new(&[16 * MIB], MIB, Some(4), None);
            let dst = Guest::new(&[16 * MIB], MIB, None, None);
            let cfg = config(backend, Duration::from_secs(5));
            let mut pairs = socket_pairs(Net::Tcp, 2)?;
            let (c1, s1) = pairs.pop().unwrap();
            let (c0, s0) = pairs.pop().unwrap();
            // Stream 0 is served; stream 1's receiver hangs up at once.
            let mut rx0 = open(s0, 0, &dst.reg, &cfg)?;
            let served = std::thread::spawn(move || receive_frames(rx0.as_mut(), Target::Guest));
            drop(s1);
            let pusher = BulkPusher::new(
                vec![open(c0, 0, &src.reg, &cfg)?, open(c1, 1, &src.reg, &cfg)?],
                2,
            )?;
            let start = Instant::now();
            let mut first = None;
            for i in 0..400u64 {
                let mut b = Batch::new();
                let gpa = (i % 16) * MIB;
                b.push(&header(gpa, MIB), &[GpaRange::new(gpa, MIB)]);
                if let Err(e) = pusher.push(b) {
                    first = Some(e);
                    break;
                }
            }
            let flushed = pusher.flush(Duration::from_secs(10));
            let finished = pusher.finish();
            let _ = served.join();
            let e = match (first, flushed, finished) {
                (Some(e), _, _) | (None, Err(e), _) | (None, Ok(()), Err(e)) => e,
                (None, Ok(()), Ok(_)) => bail!("{backend}: no error from a dead stream"),
            };
            eprintln!(
                "{backend}: after {:?}: {e} / {:?}",
                start.elapsed(),
                std::error::Error::source(&e).map(ToString::to_string)
            );
            let BulkError::Stream { source } = e else {
                bail!("unexpected {e:?}")
            };
            ensure!(source.stream() == 1, "{source}");
            ensure!(source.is_peer_gone(), "{source:?}");
            ensure!(start.elapsed() < Duration::from_secs(10));
        }
        Ok(())
    }
}
