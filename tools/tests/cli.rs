// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The `ferry` binary end to end: help, keygen, and a live migration of a real KVM guest
//! between two processes (skipped without /dev/kvm unless FERRY_REQUIRE_CAPS=1).

mod common;

#[cfg(test)]
mod tests {
    use super::common::{ferry, kvm_or_skip, listening};

    use anyhow::{Context, Result, ensure};

    #[test]
    fn help_lists_every_subcommand() -> Result<()> {
        let out = ferry().arg("--help").output()?;
        ensure!(out.status.success());
        let text = String::from_utf8(out.stdout)?;
        for sub in ["demo", "send", "recv", "bench", "report", "keygen"] {
            ensure!(text.contains(sub), "--help lacks {sub}: {text}");
        }
        Ok(())
    }

    #[test]
    fn keygen_writes_a_usable_key() -> Result<()> {
        let out = ferry().arg("keygen").output()?;
        ensure!(out.status.success());
        let key = String::from_utf8(out.stdout)?;
        ensure!(key.trim().len() == 64 && key.trim().chars().all(|c| c.is_ascii_hexdigit()));
        ferry_protocol::Psk::from_hex(&key).context("keygen output does not parse")?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("key");
        ensure!(
            ferry()
                .args(["keygen", "-o"])
                .arg(&path)
                .status()?
                .success()
        );
        // Refuses to overwrite.
        ensure!(
            !ferry()
                .args(["keygen", "-o"])
                .arg(&path)
                .status()?
                .success()
        );
        Ok(())
    }

    #[test]
    fn send_without_key_is_refused_clearly() -> Result<()> {
        let out = ferry()
            .args(["send", "--to", "127.0.0.1:9"])
            .env_remove("FERRY_KEY")
            .output()?;
        ensure!(!out.status.success());
        let err = String::from_utf8(out.stderr)?;
        ensure!(err.contains("No key"), "{err}");
        Ok(())
    }

    #[test]
    fn hybrid_reserve_outside_0_to_1_is_refused() -> Result<()> {
        for bad in ["1.5", "-0.1", "NaN", "lots"] {
            let out = ferry()
                .args(["demo", &format!("--hybrid-reserve={bad}")])
                .output()?;
            ensure!(!out.status.success(), "--hybrid-reserve {bad} accepted");
            let err = String::from_utf8(out.stderr)?;
            ensure!(
                err.contains("outside 0 to 1") || err.contains("Not a number"),
                "{bad}: {err}"
            );
        }
        Ok(())
    }

    #[test]
    fn demo_refuses_rdma_because_loopback_cannot_carry_it() -> Result<()> {
        let out = ferry().args(["demo", "--transport", "rdma"]).output()?;
        ensure!(!out.status.success());
        let err = String::from_utf8(out.stderr)?;
        ensure!(err.contains("rdmacm cannot route"), "{err}");
        ensure!(err.contains("ferry send"), "no way forward named: {err}");
        Ok(())
    }

    #[test]
    fn send_over_rdma_names_what_is_missing() -> Result<()> {
        // Checked before any VM starts: no KVM needed.
        let out = ferry()
            .args([
                "send",
                "--to",
                "127.0.0.1:9",
                "--insecure-no-auth",
                "--mem-mib",
                "64",
                "--transport",
                "rdma",
                "--mode",
                "hybrid",
            ])
            .output()?;
        ensure!(!out.status.success());
        let err = String::from_utf8(out.stderr)?;
        // Without the feature the build says so; with it, the missing device.
        ensure!(
            err.contains("`rdma` cargo feature") || err.contains("without an RDMA device"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn demo_migrates_a_kvm_guest_precopy() -> Result<()> {
        if !kvm_or_skip() {
            return Ok(());
        }
        let out = ferry()
            .args([
                // The verifier rewrites all its memory, so pre-copy cannot converge to a small
                // blackout: a generous budget makes this a stop-and-copy after round 1, which
                // still checks every page against the guest's memory model.
                "demo",
                "--mode",
                "precopy",
                "--mem-mib",
                "64",
                "--vcpus",
                "1",
                "--workload",
                "verifier",
                "--json",
                "--max-blackout-us",
                "30000000",
                // The destination allocates its memfd first and is received into it; the
                // prediction's VM part and the hybrid reserve are passed through and reported.
                "--prefault",
                "--switch-overhead-us",
                "450",
                "--hybrid-reserve",
                "0.25",
                // Received into the memfd through the page cache (`splice`).
                "--recv-into",
                "page-cache",
            ])
            .output()?;
        let stdout = String::from_utf8(out.stdout)?;
        let stderr = String::from_utf8(out.stderr)?;
        ensure!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
        let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))?;
        ensure!(v["verified"] == serde_json::json!(true), "{v}");
        ensure!(v["switch_overhead_us"] == serde_json::json!(450), "{v}");
        ensure!(v["hybrid_reserve"] == serde_json::json!(0.25), "{v}");
        ensure!(v["recv_into"] == serde_json::json!("page-cache"), "{v}");
        ensure!(
            v["prefault_ms"].as_f64().is_some(),
            "no prefault reported: {v}"
        );
        ensure!(v["model_bad_pages"] == serde_json::json!(0), "{v}");
        ensure!(v["guest_progress_after"].as_u64().unwrap_or(0) > 0, "{v}");
        for k in [
            "mode",
            "mem_bytes",
            "vcpus",
            "workload",
            "transport",
            "streams",
            "blackout_us",
            "blackout_phases_us",
            "total_ms",
            "bytes_sent",
            "rounds",
            "faults",
            "guest_max_gap_us",
            "guest_stall_ms",
        ] {
            ensure!(!v[k].is_null(), "missing {k}: {v}");
        }
        check_gap_split(&v)?;
        Ok(())
    }

    /// The guest's gaps split at the switchover: present, consistent with the whole run,
    /// and the stop of a 64 MiB stop-and-copy (or post-copy switch) is seen across it.
    fn check_gap_split(v: &serde_json::Value) -> Result<()> {
        for k in [
            "guest_switch_gap_us",
            "guest_pre_max_gap_us",
            "guest_pre_stall_ms",
            "guest_pre_stalls",
            "guest_after_max_gap_us",
            "guest_after_stall_ms",
            "guest_after_stalls",
            "guest_gap_log_lost",
        ] {
            ensure!(v[k].is_number(), "missing {k}: {v}");
        }
        ensure!(
            v["guest_gap_split_complete"] == serde_json::json!(true),
            "{v}"
        );
        let whole = v["guest_max_gap_us"].as_u64().unwrap_or(0);
        let switch = v["guest_switch_gap_us"].as_u64().unwrap_or(0);
        ensure!(switch >= 100, "no gap across the switchover: {v}");
        for k in [
            "guest_switch_gap_us",
            "guest_pre_max_gap_us",
            "guest_after_max_gap_us",
        ] {
            ensure!(
                v[k].as_u64().unwrap_or(u64::MAX) <= whole,
                "{k} > whole run: {v}"
            );
        }
        let stall = v["guest_stall_ms"].as_f64().unwrap_or(0.0);
        let after = v["guest_after_stall_ms"].as_f64().unwrap_or(f64::MAX);
        ensure!(
            after <= stall + 0.001,
            "after-switchover stalls > whole run: {v}"
        );
        Ok(())
    }

    #[test]
    fn demo_over_tcp_with_checksums_in_hybrid() -> Result<()> {
        if !kvm_or_skip() {
            return Ok(());
        }
        let out = ferry()
            .args([
                "demo",
                "--mode",
                "hybrid",
                "--mem-mib",
                "64",
                "--vcpus",
                "1",
                "--workload",
                "writer",
                "--write-mib-s",
                "20",
                "--working-set-mib",
                "8",
                "--transport",
                "tcp",
                "--streams",
                "4",
                "--checksums",
                "--json",
                "--max-blackout-us",
                "20000",
            ])
            .output()?;
        let stdout = String::from_utf8(out.stdout)?;
        ensure!(
            out.status.success(),
            "demo failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))?;
        ensure!(v["verified"] == serde_json::json!(true), "{v}");
        ensure!(v["streams"] == serde_json::json!(4), "{v}");
        Ok(())
    }

    /// A destination that disappears during pre-copy leaves the source VM running.
    #[test]
    fn connection_cut_in_precopy_leaves_the_source_running() -> Result<()> {
        use std::process::Stdio;
        use std::time::Duration;
        if !kvm_or_skip() {
            return Ok(());
        }
        let vm = ["--mem-mib", "64", "--vcpus", "1", "--workload", "verifier"];
        let mut recv = ferry()
            .args([
                "recv",
                "--listen",
                "127.0.0.1:0",
                "--machine-output",
                "--insecure-no-auth",
            ])
            .args(vm)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let (addr, _lines) = listening(&mut recv)?;
        let send = ferry()
            .args([
                "send",
                "--to",
                &addr,
                "--insecure-no-auth",
                "--mode",
                "precopy",
            ])
            .args([
                "--max-blackout-us",
                "1",
                "--max-rounds",
                "1000",
                "--warmup-s",
                "0.2",
            ])
            .args(vm)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        // Let a few rounds go, then cut the connection by killing the destination.
        std::thread::sleep(Duration::from_secs(2));
        recv.kill()?;
        let _ = recv.wait();
        let out = send.wait_with_output()?;
        let err = String::from_utf8(out.stderr)?;
        ensure!(!out.status.success(), "send should fail");
        ensure!(err.contains("the VM keeps running on the source"), "{err}");
        Ok(())
    }

    #[test]
    fn bench_kvm_suite_reports_a_postcopy_migration() -> Result<()> {
        if !kvm_or_skip() {
            return Ok(());
        }
        let out = ferry()
            .args([
                "bench",
                "kvm",
                "--mode",
                "postcopy",
                "--mem-mib",
                "64",
                "--vcpus",
                "1",
                "--json",
            ])
            .output()?;
        let stdout = String::from_utf8(out.stdout)?;
        ensure!(
            out.status.success(),
            "bench kvm failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))?;
        ensure!(v["suite"] == serde_json::json!("kvm"), "{v}");
        ensure!(v["verified"] == serde_json::json!(true), "{v}");
        ensure!(!v["machine"]["kernel"].is_null(), "{v}");
        ensure!(v["faults"]["count"].as_u64().unwrap_or(0) > 0, "{v}");
        check_gap_split(&v)?;
        Ok(())
    }

    #[test]
    fn bench_harvest_times_both_dirty_modes() -> Result<()> {
        if !kvm_or_skip() {
            return Ok(());
        }
        let out = ferry()
            .args([
                "bench",
                "harvest",
                "--mem-mib",
                "64,128",
                "--working-set-mib",
                "16",
                "--iterations",
                "3",
                "--json",
            ])
            .output()?;
        let stdout = String::from_utf8(out.stdout)?;
        ensure!(
            out.status.success(),
            "bench harvest failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rows: Vec<serde_json::Value> = stdout
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        // Per size, the bitmap then the ring, each with three timed harvests that found the
        // pages the writer dirtied.
        ensure!(rows.len() == 4, "{stdout}");
        for (v, (mib, mode)) in rows.iter().zip([
            (64u64, "bitmap"),
            (64, "ring"),
            (128, "bitmap"),
            (128, "ring"),
        ]) {
            ensure!(v["suite"] == serde_json::json!("harvest"), "{v}");
            ensure!(v["mem_bytes"].as_u64() == Some(mib << 20), "{v}");
            ensure!(v["dirty_mode"] == serde_json::json!(mode), "{v}");
            ensure!(v["iterations"].as_u64() == Some(3), "{v}");
            ensure!(v["pages_p50"].as_u64().unwrap_or(0) > 0, "{v}");
            ensure!(v["final_harvest"]["count"].as_u64() == Some(3), "{v}");
            ensure!(
                v["final_harvest"]["max_us"].as_f64().unwrap_or(0.0) > 0.0,
                "{v}"
            );
            ensure!(!v["machine"]["kernel"].is_null(), "{v}");
        }
        ensure!(
            rows[1]["active_dirty_mode"]
                .as_str()
                .is_some_and(|m| m.starts_with("Ring")),
            "{stdout}"
        );
        Ok(())
    }
}
