// SPDX-License-Identifier: Apache-2.0 OR MIT
//! `ferry send` / `ferry recv` recover a post-copy migration of a real KVM guest whose every TCP
//! connection is killed (`ss -K`, both ends) in the middle of the push: the sender resumes the
//! session, the receiver names its missing pages, and the guest's memory verifies (digest and
//! the verifier guest's page-by-page model). Skipped without /dev/kvm or `ss`.

mod common;

#[cfg(test)]
mod tests {
    use super::common::{ferry, listening};
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::sync::mpsc;
    use std::time::Duration;

    use anyhow::{Context, Result, bail, ensure};

    fn kvm_and_ss_or_skip() -> bool {
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        let ss = Command::new("ss")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        if kvm && ss {
            return true;
        }
        assert!(
            std::env::var("FERRY_REQUIRE_CAPS").as_deref() != Ok("1") || kvm,
            "/dev/kvm required (FERRY_REQUIRE_CAPS=1) but cannot be opened"
        );
        eprintln!("SKIP: needs /dev/kvm ({kvm}) and iproute2's ss ({ss})");
        false
    }

    /// Kills every TCP connection to or from `port` (both ends); returns how many sockets.
    fn cut(port: &str) -> Result<usize> {
        let filter = format!("( dport = :{port} or sport = :{port} )");
        let list = Command::new("ss").args(["-tnH", &filter]).output()?;
        let n = String::from_utf8_lossy(&list.stdout).lines().count();
        let k = Command::new("ss").args(["-K", "-tn", &filter]).output()?;
        ensure!(k.status.success(), "ss -K failed: {k:?}");
        Ok(n)
    }

    #[test]
    fn postcopy_kvm_guest_recovers_after_every_connection_is_killed() -> Result<()> {
        if !kvm_and_ss_or_skip() {
            return Ok(());
        }
        let vm = ["--mem-mib", "512", "--vcpus", "2", "--workload", "verifier"];
        let mut recv = ferry()
            .args([
                "recv",
                "--listen",
                "127.0.0.1:0",
                "--machine-output",
                "--insecure-no-auth",
                "--run-after-s",
                "0.5",
                "--recovery-window-s",
                "20",
            ])
            .args(vm)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let (addr, mut lines) = listening(&mut recv)?;
        let port = addr.rsplit(':').next().context("no port")?.to_string();
        let mut send = ferry()
            .env("FERRY_LOG", "ferry_engine=info")
            .args([
                "send",
                "--to",
                &addr,
                "--insecure-no-auth",
                "--mode",
                "postcopy",
                "--warmup-s",
                "0.3",
                "--recovery-window-s",
                "20",
                "--json",
            ])
            .args(vm)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = send.stderr.take().context("no stderr")?;
        let (tx, rx) = mpsc::channel();
        let log = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("destination resumed") {
                    let _ = tx.send(());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        rx.recv_timeout(Duration::from_secs(60))
            .context("the destination never resumed")?;
        std::thread::sleep(Duration::from_millis(200));
        let killed = cut(&port)?;
        eprintln!("killed {killed} sockets of port {port}");
        let out = send.wait_with_output()?;
        let send_log = log.join().unwrap_or_default();
        let result = loop {
            let line = lines.next().context("recv exited without a result")??;
            if let Some(r) = line.strip_prefix("RESULT ") {
                break r.to_string();
            }
        };
        let _ = recv.wait();
        ensure!(out.status.success(), "send failed: {send_log}");
        if killed == 0 {
            bail!("the migration ended before the connections were killed: {send_log}");
        }
        let src: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let dst: serde_json::Value = serde_json::from_str(&result)?;
        eprintln!(
            "source: recoveries {} without a connection {} ms; destination: recoveries {} ({} ms); model bad pages {}",
            src["recoveries"],
            src["disconnected_ms"],
            dst["dest"]["recoveries"],
            dst["dest"]["disconnected_ms"],
            dst["model_bad_pages"]
        );
        ensure!(src["recoveries"] == 1, "source did not recover: {send_log}");
        ensure!(dst["dest"]["recoveries"] == 1, "destination: {result}");
        ensure!(src["verified"] == true && dst["dest"]["verified"] == true);
        ensure!(dst["model_bad_pages"] == 0, "verifier model: {result}");
        Ok(())
    }
}
