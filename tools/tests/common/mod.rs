// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Helpers shared by the `ferry` binary's integration tests.
#![allow(dead_code)]

use std::process::Command;

/// The `ferry` binary under test.
pub fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

/// Whether /dev/kvm can be opened; prints the reason when not. Fails instead of skipping
/// under `FERRY_REQUIRE_CAPS=1` (CI).
pub fn kvm_or_skip() -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        return true;
    }
    assert!(
        std::env::var("FERRY_REQUIRE_CAPS").as_deref() != Ok("1"),
        "/dev/kvm required (FERRY_REQUIRE_CAPS=1) but cannot be opened"
    );
    eprintln!("SKIP: /dev/kvm cannot be opened");
    false
}

/// Reads a `ferry recv --machine-output` child's stdout up to its `LISTENING tcp:ADDR` line;
/// returns the address and the rest of its lines (its `RESULT` line comes later).
pub fn listening(
    recv: &mut std::process::Child,
) -> anyhow::Result<(
    String,
    std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
)> {
    use std::io::BufRead;
    let stdout = recv
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    loop {
        let line = lines
            .next()
            .ok_or_else(|| anyhow::anyhow!("recv exited"))??;
        if let Some(a) = line.strip_prefix("LISTENING tcp:") {
            return Ok((a.trim().to_string(), lines));
        }
    }
}
