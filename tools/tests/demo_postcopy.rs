// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Pure post-copy of a real KVM guest with the `ferry` binary over the default io_uring
//! transport: the destination resumes with none of the guest's memory, every page the vCPUs
//! (or KVM on their behalf) touch must arrive through a userfaultfd fault, and the verifier
//! guest must then run on and check out page by page, for memfd and anonymous guest RAM.
//!
//! This caught the destination registering guest RAM as io_uring fixed buffers: that pins, so
//! populates, every page, userfaultfd never saw a fault, and the guest ran on zero-filled
//! memory (triple fault; with anonymous RAM `UFFDIO_COPY` also said `EEXIST`, so the data never
//! landed). Skips without /dev/kvm or userfaultfd unless FERRY_REQUIRE_CAPS=1.

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result, bail, ensure};
    use serde_json::{Value, json};

    fn require_caps() -> bool {
        std::env::var("FERRY_REQUIRE_CAPS").as_deref() == Ok("1")
    }

    /// True if /dev/kvm and a kernel-fault-capable userfaultfd are usable; else prints why.
    fn caps_or_skip() -> bool {
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm");
        if let Err(e) = kvm {
            assert!(
                !require_caps(),
                "/dev/kvm required (FERRY_REQUIRE_CAPS=1): {e}"
            );
            eprintln!("SKIP: /dev/kvm cannot be opened: {e}");
            return false;
        }
        // Not user-mode-only: KVM touches guest pages from the kernel.
        if let Err(e) = ferry_engine::uffd::Uffd::open(false, ferry_engine::uffd::Features::NONE) {
            assert!(
                !require_caps(),
                "userfaultfd required (FERRY_REQUIRE_CAPS=1): {e}"
            );
            eprintln!("SKIP: userfaultfd unavailable: {e}");
            return false;
        }
        true
    }

    /// Runs `ferry demo <args> --json` with a deadline; returns its JSON line (even when the
    /// demo reports failure, so the assertion can show what went wrong).
    fn demo(args: &[&str], deadline: Duration) -> Result<Value> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .arg("demo")
            .args(args)
            .arg("--json")
            .stdin(Stdio::null())
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
                // The destination child exits when its connection closes.
                let _ = child.kill();
                let _ = child.wait();
                bail!("ferry demo {args:?} did not finish within {deadline:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = out.join().map_err(|_| anyhow::anyhow!("reader panicked"))?;
        let err = err.join().map_err(|_| anyhow::anyhow!("reader panicked"))?;
        let Some(line) = out.lines().rev().find(|l| l.starts_with('{')) else {
            bail!("ferry demo {args:?} gave no result ({status}):\n{out}\n{err}");
        };
        let v: Value = serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        eprintln!(
            "{args:?}: {status}; blackout {} µs, faults {} (p50 {} µs, p99 {} µs), guest max gap {} µs, ran on {} iterations, fault {}",
            v["blackout_us"],
            v["faults"]["count"],
            v["faults"]["p50_us"],
            v["faults"]["p99_us"],
            v["guest_max_gap_us"],
            v["guest_progress_after"],
            v["guest_fault"]
        );
        if !status.success() {
            eprint!("{err}");
        }
        Ok(v)
    }

    fn check_postcopy(v: &Value) -> Result<()> {
        ensure!(v["switchover"] == json!("post-copy"), "not post-copy: {v}");
        ensure!(v["rounds"] == json!(0), "pre-copy rounds ran: {v}");
        ensure!(v["guest_fault"].is_null(), "the guest crashed: {v}");
        ensure!(
            v["model_bad_pages"] == json!(0),
            "guest memory does not match the verifier's model: {v}"
        );
        ensure!(
            v["guest_progress_after"].as_u64().unwrap_or(0) > 0,
            "the guest made no progress at the destination: {v}"
        );
        ensure!(
            v["faults"]["count"].as_u64().unwrap_or(0) > 0,
            "the guest ran without a single post-copy fault: {v}"
        );
        ensure!(v["verified"] == json!(true), "digest not verified: {v}");
        // The guest's own gap log splits at the switchover, and the switch is seen across it.
        ensure!(v["guest_gap_split_complete"] == json!(true), "{v}");
        ensure!(
            v["guest_switch_gap_us"].as_u64().unwrap_or(0) >= 100,
            "no guest-visible gap across the switchover: {v}"
        );
        ensure!(v["guest_after_stalls"].is_u64(), "{v}");
        // The window until the destination finished is part of the whole time after it.
        for (d, a) in [
            ("guest_migrating_stalls", "guest_after_stalls"),
            ("guest_migrating_stall_ms", "guest_after_stall_ms"),
        ] {
            let (during, after) = (&v[d], &v[a]);
            ensure!(
                during
                    .as_f64()
                    .zip(after.as_f64())
                    .is_some_and(|(x, y)| x <= y),
                "{d} {during} not within {a} {after}: {v}"
            );
        }
        Ok(())
    }

    const DEADLINE: Duration = Duration::from_secs(120);

    #[test]
    fn postcopy_kvm_guest_memfd_over_uring() -> Result<()> {
        if !caps_or_skip() {
            return Ok(());
        }
        let v = demo(
            &[
                "--mode",
                "postcopy",
                "--mem-mib",
                "64",
                "--vcpus",
                "2",
                "--workload",
                "verifier",
                "--transport",
                "uring",
            ],
            DEADLINE,
        )?;
        check_postcopy(&v)
    }

    #[test]
    fn postcopy_kvm_guest_anonymous_over_uring() -> Result<()> {
        if !caps_or_skip() {
            return Ok(());
        }
        let v = demo(
            &[
                "--mode",
                "postcopy",
                "--mem-mib",
                "64",
                "--vcpus",
                "1",
                "--workload",
                "verifier",
                "--transport",
                "uring",
                "--anonymous",
            ],
            DEADLINE,
        )?;
        check_postcopy(&v)
    }
}
