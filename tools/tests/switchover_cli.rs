// SPDX-License-Identifier: Apache-2.0 OR MIT
//! `ferry send` / `ferry recv` with a KVM guest when the destination's `Resumed` frame is lost:
//! `recv --fault-cut-after-resume` shuts every connection down right after the guest resumed.
//! Without recovery, `send` must not resume its VM and says so (exit non-zero) while `recv`
//! reports that the VM runs there; with recovery, the session is resumed, the destination says
//! it runs the VM, and the migration verifies. Skipped without /dev/kvm.

mod common;

#[cfg(test)]
mod tests {
    use super::common::{ferry, kvm_or_skip, listening};
    use std::process::{Output, Stdio};

    use anyhow::{Context, Result, ensure};

    /// Runs `recv --fault-cut-after-resume` and `send` with `mode`, the recovery window on both
    /// sides and the VM flags `vm`; returns both outputs (recv's stdout holds its `RESULT` line, if any).
    fn migrate(mode: &str, window_s: &str, vm: &[&str]) -> Result<(Output, Output)> {
        let mut recv = ferry()
            .args([
                "recv",
                "--listen",
                "127.0.0.1:0",
                "--machine-output",
                "--insecure-no-auth",
                "--fault-cut-after-resume",
                "--run-after-s",
                "0.3",
                "--recovery-window-s",
                window_s,
            ])
            .args(vm)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let (addr, lines) = listening(&mut recv)?;
        let send = ferry()
            .args([
                "send",
                "--to",
                &addr,
                "--insecure-no-auth",
                "--mode",
                mode,
                "--max-blackout-us",
                "200000",
                "--warmup-s",
                "0.2",
                "--recovery-window-s",
                window_s,
                "--json",
            ])
            .args(vm)
            .output()?;
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let mut recv_out = recv.wait_with_output()?;
        recv_out.stdout = rest.join("\n").into_bytes();
        Ok((send, recv_out))
    }

    #[test]
    fn lost_resumed_leaves_the_source_paused_and_says_so() -> Result<()> {
        if !kvm_or_skip() {
            return Ok(());
        }
        // A guest pre-copy converges with (the verifier rewrites all its memory).
        let vm = [
            "--mem-mib",
            "128",
            "--vcpus",
            "1",
            "--workload",
            "writer",
            "--write-mib-s",
            "2",
            "--working-set-mib",
            "16",
        ];
        let (send, recv) = migrate("precopy", "0", &vm)?;
        let send_err = String::from_utf8_lossy(&send.stderr);
        let recv_err = String::from_utf8_lossy(&recv.stderr);
        eprintln!("send: {send_err}\nrecv: {recv_err}");
        ensure!(!send.status.success(), "send succeeded");
        ensure!(
            send_err.contains("NOT confirmed")
                && send_err.contains("the source VM is left paused (not resumed)"),
            "{send_err}"
        );
        ensure!(!recv.status.success(), "recv succeeded");
        ensure!(
            recv_err.contains("the VM runs on this side"),
            "recv: {recv_err}"
        );
        Ok(())
    }

    #[test]
    fn lost_resumed_is_recovered_in_postcopy() -> Result<()> {
        if !kvm_or_skip() {
            return Ok(());
        }
        let vm = ["--mem-mib", "128", "--vcpus", "1", "--workload", "verifier"];
        let (send, recv) = migrate("postcopy", "20", &vm)?;
        let send_err = String::from_utf8_lossy(&send.stderr);
        let recv_out = String::from_utf8_lossy(&recv.stdout);
        ensure!(send.status.success(), "send failed: {send_err}");
        let src: serde_json::Value = serde_json::from_slice(&send.stdout)?;
        let result = recv_out
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .context("recv gave no result")?;
        let dst: serde_json::Value = serde_json::from_str(result)?;
        eprintln!(
            "source: {} confirmed after {} µs, recoveries {}; destination recoveries {}, model bad pages {}",
            src["switchover"],
            src["blackout_us"],
            src["recoveries"],
            dst["dest"]["recoveries"],
            dst["model_bad_pages"]
        );
        ensure!(src["recoveries"] == 1, "{src}");
        ensure!(dst["dest"]["recoveries"] == 1, "{result}");
        ensure!(src["verified"] == true && dst["dest"]["verified"] == true);
        ensure!(dst["model_bad_pages"] == 0, "verifier model: {result}");
        ensure!(recv.status.success(), "recv failed");
        Ok(())
    }
}
