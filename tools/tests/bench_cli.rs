// SPDX-License-Identifier: Apache-2.0 OR MIT
//! `ferry bench` end to end with the real binary: the suite runs in one process and starts its
//! peer as a second process (`ferry __bench-peer`); checks the JSON lines and that the bytes
//! were verified (never the performance). Migrations in post-copy-capable modes skip with a
//! printed reason when userfaultfd is unavailable (unless FERRY_REQUIRE_CAPS=1).

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result, bail, ensure};
    use serde_json::Value;

    /// Runs `ferry <args>` with a deadline; returns its standard output.
    fn ferry(args: &[&str], deadline: Duration) -> Result<String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("Cannot start ferry")?;
        let mut stdout = child.stdout.take().context("no stdout")?;
        let mut stderr = child.stderr.take().context("no stderr")?;
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if start.elapsed() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("ferry {args:?} did not finish within {deadline:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = out.join().map_err(|_| anyhow::anyhow!("reader panicked"))?;
        let err = err.join().map_err(|_| anyhow::anyhow!("reader panicked"))?;
        eprint!("{err}");
        ensure!(status.success(), "ferry {args:?} failed ({status}): {err}");
        Ok(out)
    }

    fn json_lines(out: &str) -> Result<Vec<Value>> {
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
            .collect()
    }

    fn uffd_or_skip() -> bool {
        let ok = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
            .is_ok();
        if !ok {
            assert!(
                std::env::var("FERRY_REQUIRE_CAPS").as_deref() != Ok("1"),
                "userfaultfd required (FERRY_REQUIRE_CAPS=1) but /dev/userfaultfd cannot be opened"
            );
            eprintln!("SKIP: /dev/userfaultfd cannot be opened");
        }
        ok
    }

    #[test]
    fn bench_transport_json_two_processes() -> Result<()> {
        let out = ferry(
            &["bench", "transport", "--size-gib", "0.03", "--json"],
            Duration::from_secs(120),
        )?;
        let lines = json_lines(&out)?;
        ensure!(lines.len() == 1, "expected one result, got {}", lines.len());
        let v = &lines[0];
        ensure!(v["suite"] == "transport");
        ensure!(v["transport"] == "uring");
        ensure!(v["streams"] == 2);
        // 0.03 GiB (32212254.72 bytes), rounded down to whole pages.
        ensure!(v["bytes"] == 32_212_254u64 / 4096 * 4096);
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
            ensure!(
                v[k].as_f64().is_some_and(|x| x.is_finite() && x >= 0.0),
                "{k} = {}",
                v[k]
            );
        }
        ensure!(v["zc_sends"].is_u64() && v["zc_copied"].is_u64());
        ensure!(v["verified"] == true, "bytes differ: {v}");
        ensure!(v["machine"]["cores"].is_u64() || v["machine"]["cores"].is_null());
        Ok(())
    }

    #[test]
    fn bench_transport_rdma_says_no_device() -> Result<()> {
        let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args([
                "bench",
                "transport",
                "--transport",
                "rdma",
                "--size-gib",
                "0.01",
            ])
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        if std::fs::read_dir("/sys/class/infiniband").is_ok_and(|mut d| d.next().is_some()) {
            eprintln!("SKIP: an RDMA device exists here");
            return Ok(());
        }
        ensure!(!out.status.success(), "RDMA without a device succeeded");
        ensure!(err.contains("RDMA"), "unclear message: {err}");
        ensure!(out.stdout.is_empty(), "RDMA printed a result");
        Ok(())
    }

    #[test]
    fn bench_migrate_json_two_processes() -> Result<()> {
        if !uffd_or_skip() {
            return Ok(());
        }
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("results.jsonl");
        let file_s = file.to_str().context("path")?;
        let out = ferry(
            &[
                "bench",
                "migrate",
                "--mem-gib",
                "0.03",
                "--json",
                "--out",
                file_s,
            ],
            Duration::from_secs(120),
        )?;
        let lines = json_lines(&out)?;
        ensure!(lines.len() == 1, "expected one result, got {}", lines.len());
        let v = &lines[0];
        ensure!(v["suite"] == "migrate");
        ensure!(v["mode"] == "hybrid");
        ensure!(v["transport"] == "uring");
        ensure!(v["write_rate"] == "max" && v["write_mib_s"].is_null());
        // 0.03 GiB rounded down to whole MiB per region (two regions).
        ensure!(
            v["mem_bytes"] == 30u64 << 20,
            "mem_bytes {}",
            v["mem_bytes"]
        );
        ensure!(v["blackout_us"].as_f64().is_some_and(|b| b > 0.0));
        for p in [
            "pause", "harvest", "save", "send", "apply", "restore", "resume",
        ] {
            ensure!(v["blackout_phases_us"][p].is_number(), "phase {p} missing");
        }
        for k in [
            "total_ms",
            "blackout_start_ms",
            "guest_max_gap_us",
            "guest_stall_ms",
        ] {
            ensure!(v[k].as_f64().is_some_and(|x| x >= 0.0), "{k} = {}", v[k]);
        }
        ensure!(v["bytes_sent"].as_u64().is_some_and(|b| b > 0));
        ensure!(v["rounds"].is_u64() && v["rounds_detail"].is_array());
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
        ensure!(v["fault_floor_us"].as_f64().is_some_and(|f| f > 0.0));
        ensure!(
            v["guest_writes"].as_u64().is_some_and(|w| w > 0),
            "writers did not run"
        );
        ensure!(v["machine"].is_object());
        ensure!(v["verified"] == true, "digests differ: {}", v["dest"]);
        // --out appended the same line.
        let saved = json_lines(&std::fs::read_to_string(&file)?)?;
        ensure!(saved == lines, "--out file differs from stdout");
        Ok(())
    }
}
