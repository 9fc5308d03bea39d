// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Tiny runs of the `transport` and `migrate` benchmark suites with the peer in a thread of the
//! test process: they check the result's shape and that the bytes were verified, never the
//! performance. Post-copy and hybrid skip with a printed reason when userfaultfd is unavailable
//! (unless `FERRY_REQUIRE_CAPS=1`).

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use anyhow::{Result, ensure};
    use ferry_bench::cli::{MigrateArgs, ModeArg, PeerLauncher, TransportArgs};
    use ferry_bench::migrate_bench::{self, BackingArg, MigrateBench, PatternArg, WriteRate};
    use ferry_bench::transport_bench::{self, TransportBench, TransportChoice};
    use serde_json::Value;

    fn no_progress(_: &str, _: u64, _: u64) {}

    fn uring_available() -> bool {
        // The transport's io_uring backend needs io_uring_setup; probe with a tiny ring.
        match std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
            Ok(s) if s.trim() != "0" => {
                eprintln!("SKIP uring: io_uring_disabled = {}", s.trim());
                false
            }
            _ => true,
        }
    }

    fn transport(t: TransportChoice, streams: usize) -> Result<Value> {
        let cfg = TransportBench::from_args(&TransportArgs {
            transport: t,
            streams,
            size_gib: 16.0 / 1024.0,
            frame_kib: 1024,
            runs: 1,
        })?;
        let r = transport_bench::run(&cfg, &PeerLauncher::Thread, &no_progress)?;
        let v = serde_json::to_value(&r)?;
        eprintln!("{v}");
        Ok(v)
    }

    fn check_transport(v: &Value, t: &str, streams: u64) -> Result<()> {
        ensure!(v["suite"] == "transport");
        ensure!(v["transport"] == t);
        ensure!(v["streams"] == streams);
        ensure!(v["bytes"] == 16u64 << 20);
        for k in [
            "seconds",
            "gbit_per_s",
            "floor_gbit_per_s",
            "ratio_to_floor",
            "sender_cpu_s_per_gib",
            "receiver_cpu_s_per_gib",
            "floor_sender_cpu_s_per_gib",
            "floor_receiver_cpu_s_per_gib",
        ] {
            let x = v[k].as_f64();
            ensure!(
                x.is_some_and(|x| x.is_finite() && x >= 0.0),
                "{k} = {}",
                v[k]
            );
        }
        ensure!(v["gbit_per_s"].as_f64().is_some_and(|x| x > 0.0));
        // Two floor passes; the reported floor is the faster one.
        let passes: Vec<f64> = v["floor_passes_gbit_per_s"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        ensure!(
            passes.len() == 2,
            "floor passes {}",
            v["floor_passes_gbit_per_s"]
        );
        let best = passes.iter().copied().fold(0.0, f64::max);
        ensure!(
            v["floor_gbit_per_s"]
                .as_f64()
                .is_some_and(|f| (f - best).abs() < 1e-9)
        );
        ensure!(v["zc_sends"].is_u64() && v["zc_copied"].is_u64());
        ensure!(v["transport_verified"] == true, "transport bytes differ");
        ensure!(v["floor_verified"] == true, "floor bytes differ");
        ensure!(v["verified"] == true);
        ensure!(v["machine"]["kernel"].is_string() || v["machine"]["kernel"].is_null());
        ensure!(v["machine"].get("kvm").is_some());
        Ok(())
    }

    #[test]
    fn transport_tcp_two_streams() -> Result<()> {
        let v = transport(TransportChoice::Tcp, 2)?;
        check_transport(&v, "tcp", 2)
    }

    #[test]
    fn transport_uring_two_streams() -> Result<()> {
        if !uring_available() {
            return Ok(());
        }
        let v = transport(TransportChoice::Uring, 2)?;
        check_transport(&v, "uring", 2)?;
        ensure!(v["sqes"].as_u64().is_some_and(|n| n > 0));
        Ok(())
    }

    #[test]
    fn transport_unix_one_stream() -> Result<()> {
        let v = transport(TransportChoice::Unix, 1)?;
        check_transport(&v, "unix", 1)
    }

    #[test]
    fn transport_rdma_refuses_without_device() {
        let cfg = TransportBench::from_args(&TransportArgs {
            transport: TransportChoice::Rdma,
            streams: 1,
            size_gib: 0.01,
            frame_kib: 1024,
            runs: 1,
        });
        let r = cfg.and_then(|c| transport_bench::run(&c, &PeerLauncher::Thread, &no_progress));
        match r {
            Ok(_) => panic!("RDMA produced a result on a machine without RDMA support"),
            Err(e) => {
                let msg = format!("{e:#}");
                assert!(msg.contains("RDMA"), "unclear message: {msg}");
            }
        }
    }

    fn migrate(
        mode: ModeArg,
        rate: WriteRate,
        t: TransportChoice,
        backing: BackingArg,
    ) -> Result<Option<Value>> {
        if mode != ModeArg::Precopy
            && let Some(why) = migrate_bench::uffd_unavailable()
        {
            if std::env::var("FERRY_REQUIRE_CAPS").is_ok_and(|v| v == "1") {
                anyhow::bail!("userfaultfd required (FERRY_REQUIRE_CAPS=1) but unavailable: {why}");
            }
            eprintln!("SKIP {mode:?}: userfaultfd unavailable: {why}");
            return Ok(None);
        }
        let cfg = MigrateBench::from_args(&MigrateArgs {
            mode,
            mem_gib: 16.0 / 1024.0,
            write_mib_s: rate,
            writers: 1,
            streams: 2,
            transport: t,
            backing,
            pattern: PatternArg::Random,
            // Pre-copy converges however busy the machine is (these tests check the report, not
            // the speed); the other modes keep the budget they always had.
            max_blackout_us: if mode == ModeArg::Precopy {
                200_000
            } else {
                5000
            },
            checksums: false,
            runs: 1,
        })?;
        let t0 = Instant::now();
        let r = migrate_bench::run(&cfg, &PeerLauncher::Thread, &no_progress)?;
        ensure!(t0.elapsed() < Duration::from_secs(60));
        let v = r.to_json().clone();
        eprintln!(
            "{mode:?}: switchover {} blackout {} µs faults {} floor {} µs gap {} µs",
            v["switchover"],
            v["blackout_us"],
            v["faults"]["count"],
            v["fault_floor_us"],
            v["guest_max_gap_us"]
        );
        Ok(Some(v))
    }

    fn check_migrate(v: &Value, mode: &str) -> Result<()> {
        ensure!(v["suite"] == "migrate");
        ensure!(v["mode"] == mode);
        ensure!(v["mem_bytes"] == 16u64 << 20);
        ensure!(v["streams"] == 2);
        for k in [
            "blackout_us",
            "blackout_start_ms",
            "total_ms",
            "guest_max_gap_us",
            "guest_stall_ms",
        ] {
            ensure!(v[k].as_f64().is_some_and(|x| x >= 0.0), "{k} = {}", v[k]);
        }
        ensure!(v["blackout_us"].as_f64().is_some_and(|x| x > 0.0));
        for p in [
            "pause", "harvest", "save", "send", "apply", "restore", "resume",
        ] {
            ensure!(v["blackout_phases_us"][p].is_number(), "phase {p} missing");
        }
        ensure!(v["bytes_sent"].as_u64().is_some_and(|b| b > 0));
        ensure!(v["rounds"].is_u64());
        ensure!(v["rounds_detail"].is_array());
        ensure!(v["throughput_series"].is_array());
        for k in [
            "count",
            "p50_us",
            "p90_us",
            "p99_us",
            "p999_us",
            "max_us",
            "total_stall_ms",
        ] {
            ensure!(v["faults"][k].is_number(), "faults.{k} missing");
        }
        ensure!(v["faults"]["timeline"].is_array() && v["faults"]["histogram"].is_array());
        ensure!(
            v["fault_floor"]["rtt_p50_us"]
                .as_f64()
                .is_some_and(|x| x > 0.0)
        );
        ensure!(v["fault_floor"]["rtt_samples"] == 200);
        ensure!(v["machine"].is_object());
        ensure!(
            v["verified"] == true,
            "digests differ: source {} dest {}",
            v["digest"],
            v["dest"]
        );
        ensure!(v["dest"]["verified"] == true);
        Ok(())
    }

    #[test]
    fn migrate_precopy_with_writer() -> Result<()> {
        let Some(v) = migrate(
            ModeArg::Precopy,
            WriteRate::MibS(8),
            TransportChoice::Uring,
            BackingArg::Memfd,
        )?
        else {
            return Ok(());
        };
        check_migrate(&v, "precopy")?;
        ensure!(v["switchover"] == "stop-and-copy");
        ensure!(v["rounds"].as_u64().is_some_and(|r| r >= 1));
        ensure!(v["write_mib_s"] == 8);
        ensure!(
            v["guest_writes"].as_u64().is_some_and(|w| w > 0),
            "writers did not run"
        );
        Ok(())
    }

    #[test]
    fn migrate_postcopy_with_writer() -> Result<()> {
        // memfd (alias placement, UFFDIO_CONTINUE) over TCP; the other tests cover io_uring
        // and anonymous memory.
        let Some(v) = migrate(
            ModeArg::Postcopy,
            WriteRate::Max,
            TransportChoice::Tcp,
            BackingArg::Memfd,
        )?
        else {
            return Ok(());
        };
        check_migrate(&v, "postcopy")?;
        ensure!(v["switchover"] == "post-copy");
        ensure!(v["write_mib_s"].is_null() && v["write_rate"] == "max");
        ensure!(v["fault_floor_us"].as_f64().is_some_and(|x| x > 0.0));
        Ok(())
    }

    #[test]
    fn migrate_hybrid_idle() -> Result<()> {
        let Some(v) = migrate(
            ModeArg::Hybrid,
            WriteRate::Idle,
            TransportChoice::Unix,
            BackingArg::Anon,
        )?
        else {
            return Ok(());
        };
        check_migrate(&v, "hybrid")?;
        ensure!(v["write_mib_s"] == 0);
        ensure!(v["guest_writes"] == 0, "an idle VM wrote");
        Ok(())
    }
}
