#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR MIT
# Installs what the build and the tests need on a fresh Debian machine, and checks the kernel
# features the tests use. The default build needs no apt package; the `rdma` feature (sideway ->
# rdma-mummy-sys) needs cmake and clang/libclang at build time and dlopens libibverbs/librdmacm
# at run time; the HTML report test renders in headless chromium.
set -euo pipefail
pkgs=(cmake clang libclang-dev libibverbs1 librdmacm1 ibverbs-providers chromium)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "missing packages (run as root to install): ${missing[*]}" >&2
    exit 1
  fi
fi
# Kernel features the tests use (they skip with a reason when absent outside CI).
echo "kernel: $(uname -r)"
[ -r /dev/kvm ] && echo "kvm: /dev/kvm present" || echo "kvm: /dev/kvm missing"
[ -e /dev/userfaultfd ] && echo "userfaultfd: /dev/userfaultfd present" || echo "userfaultfd: device missing (syscall fallback)"
echo "io_uring_disabled: $(cat /proc/sys/kernel/io_uring_disabled 2>/dev/null || echo n/a)"
if [ -d /sys/class/infiniband ] && [ -n "$(ls -A /sys/class/infiniband 2>/dev/null)" ]; then
  echo "rdma: devices: $(ls /sys/class/infiniband | tr '\n' ' ')"
else
  echo "rdma: no device (RDMA device tests will skip)"
fi
