#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR MIT
# ferry's test command (README's second command). Installs what the tests need, then fails on the
# first error: rustfmt, clippy (default features and --all-features), rustdoc, every test, and a
# short run of each fuzz target when a nightly toolchain is present.
#
# Environment: FERRY_FUZZ_SECONDS (default 60) per fuzz target; FERRY_SKIP_FUZZ=1 to skip fuzzing.
# Under CI (CI=true) tests that need KVM, userfaultfd or io_uring fail instead of skipping when the
# capability is missing (FERRY_REQUIRE_CAPS=1): the machine is supposed to have them.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
step() { printf '\n==> %s (%ss)\n' "$*" "$(( $(date +%s) - start ))"; }

step "setup"
bash ci/setup.sh

if [ "${CI:-}" = "true" ]; then export FERRY_REQUIRE_CAPS=1; fi

step "cargo fmt --check"
cargo fmt --all --check

step "clippy (default features)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "clippy (--all-features: rdma)"
cargo clippy --workspace --all-targets --locked --all-features -- -D warnings

step "rustdoc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --all-features

step "tests (--all-features)"
out="${CARGO_TARGET_DIR:-target}/test-output.txt"
mkdir -p "$(dirname "$out")"
cargo test --workspace --locked --all-features 2>&1 | tee "$out"
grep -h "SKIP" "$out" | sort | uniq -c || true

step "fuzz"
bash ci/fuzz.sh "${FERRY_FUZZ_SECONDS:-60}"

step "build did not modify tracked files"
git diff --exit-code --stat

step "done"
