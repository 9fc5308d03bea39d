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
