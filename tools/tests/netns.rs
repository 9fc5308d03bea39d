// SPDX-License-Identifier: Apache-2.0 OR MIT
//! `ferry send` and `ferry recv` between two hosts: two network namespaces the test creates,
//! joined by a veth pair, so the migration crosses a real network stack (not loopback). Needs
//! root, iproute2 and /dev/kvm; skips with a printed reason otherwise (fails under
//! FERRY_REQUIRE_CAPS=1 only for KVM, since namespaces are a test-harness facility).

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    use anyhow::{Context, Result, bail, ensure};

    /// Two namespaces and a veth pair, removed on drop.
    struct Hosts {
        src: String,
        dst: String,
    }

    fn ip(args: &[&str]) -> Result<()> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .context("Cannot run ip")?;
        if !out.status.success() {
            bail!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    impl Hosts {
        fn new() -> Result<Self> {
            let id = std::process::id() % 100_000;
            let h = Hosts {
                src: format!("ferry-src-{id}"),
                dst: format!("ferry-dst-{id}"),
            };
            ip(&["netns", "add", &h.src])?;
            ip(&["netns", "add", &h.dst])?;
            let (a, b) = (format!("fs{id}"), format!("fd{id}"));
            ip(&[
                "link", "add", &a, "netns", &h.src, "type", "veth", "peer", "name", &b, "netns",
                &h.dst,
            ])?;
            ip(&["-n", &h.src, "addr", "add", "10.213.0.1/24", "dev", &a])?;
            ip(&["-n", &h.dst, "addr", "add", "10.213.0.2/24", "dev", &b])?;
            for (ns, dev) in [(&h.src, &a), (&h.dst, &b)] {
                ip(&["-n", ns, "link", "set", dev, "up"])?;
                ip(&["-n", ns, "link", "set", "lo", "up"])?;
            }
            Ok(h)
        }
    }

    impl Drop for Hosts {
        fn drop(&mut self) {
            let _ = ip(&["netns", "del", &self.src]);
            let _ = ip(&["netns", "del", &self.dst]);
        }
    }

    #[test]
    fn send_recv_across_a_veth_link() -> Result<()> {
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            assert!(
                std::env::var("FERRY_REQUIRE_CAPS").as_deref() != Ok("1"),
                "/dev/kvm required (FERRY_REQUIRE_CAPS=1)"
            );
            eprintln!("SKIP: /dev/kvm cannot be opened");
            return Ok(());
        }
        let hosts = match Hosts::new() {
            Ok(h) => h,
            Err(e) => {
                eprintln!(
                    "SKIP: cannot create network namespaces (root and iproute2 needed): {e:#}"
                );
                return Ok(());
            }
        };
        let bin = env!("CARGO_BIN_EXE_ferry");
        let dir = tempfile::tempdir()?;
        let key = dir.path().join("key");
        ensure!(
            Command::new(bin)
                .args(["keygen", "-o"])
                .arg(&key)
                .status()?
                .success()
        );
        let vm = ["--mem-mib", "64", "--vcpus", "1", "--workload", "verifier"];
        let mut recv = Command::new("ip")
            .args([
                "netns",
                "exec",
                &hosts.dst,
                bin,
                "recv",
                "--listen",
                "10.213.0.2:0",
            ])
            .arg("--key-file")
            .arg(&key)
            .args(["--machine-output", "--run-after-s", "0.3"])
            .args(vm)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = recv.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let line = lines.next().context("recv exited before listening")??;
            if let Some(a) = line.strip_prefix("LISTENING tcp:") {
                break a.trim().to_string();
            }
        };
        ensure!(addr.starts_with("10.213.0.2:"), "{addr}");
        let send = Command::new("ip")
            .args(["netns", "exec", &hosts.src, bin, "send", "--to", &addr])
            .arg("--key-file")
            .arg(&key)
            .args([
                "--mode",
                "precopy",
                "--max-blackout-us",
                "30000000",
                "--warmup-s",
                "0.3",
                "--json",
            ])
            .args(vm)
            .output()?;
        let result = lines
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("RESULT ").map(str::to_string))
            .context("no result from recv")?;
        let _ = recv.wait();
        let stdout = String::from_utf8(send.stdout)?;
        ensure!(
            send.status.success(),
            "send failed: {stdout} {}",
            String::from_utf8_lossy(&send.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(stdout.trim())?;
        ensure!(v["verified"] == serde_json::json!(true), "{v}");
        let d: serde_json::Value = serde_json::from_str(&result)?;
        ensure!(d["model_bad_pages"] == serde_json::json!(0), "{d}");
        ensure!(d["guest_progress_after"].as_u64().unwrap_or(0) > 0, "{d}");
        Ok(())
    }
}
