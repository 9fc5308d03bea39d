#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR MIT
# Runs each cargo-fuzz target for N seconds (default 60). Needs a nightly toolchain; installs
# cargo-fuzz from crates.io if missing. Says so and succeeds when there is no nightly.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-60}"
if [ "${FERRY_SKIP_FUZZ:-}" = 1 ]; then echo "fuzz: skipped (FERRY_SKIP_FUZZ=1)"; exit 0; fi
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "fuzz: SKIP: no nightly toolchain on this machine; the fuzz targets were not run"
  exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi
for t in $(cargo +nightly fuzz list); do
  echo "fuzz: $t for ${secs}s"
  mkdir -p "corpus/$t"
  log="$(mktemp)"
  if ! cargo +nightly fuzz run "$t" -- -max_total_time="$secs" -rss_limit_mb=1024 >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz: $t FAILED"
    exit 1
  fi
  grep -E "^#[0-9]+.*DONE|^Done [0-9]+ runs" "$log" | tail -n 2 || tail -n 3 "$log"
  rm -f "$log"
done
