#!/usr/bin/env bash
# Cross-compiles the kernels and their tests for aarch64 and runs them under
# qemu-aarch64: proves the NEON path (and the scalar path on ARM) without an
# ARM machine. Needs Debian's g++-aarch64-linux-gnu and qemu-user.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${ARM_BUILD_DIR:-$root/build/arm}
cxx=${CXX_AARCH64:-aarch64-linux-gnu-g++}
mkdir -p "$out"
command -v "$cxx" >/dev/null || { echo "missing $cxx (apt-get install g++-aarch64-linux-gnu)" >&2; exit 1; }
command -v qemu-aarch64 >/dev/null || { echo "missing qemu-aarch64 (apt-get install qemu-user)" >&2; exit 1; }
"$cxx" -O2 -std=c++17 -fopenmp -Wall -Wextra -I"$root/csrc" \
  "$root/tests/arm/test_kernels.cpp" "$root/csrc/kernels/dispatch.cpp" \
  "$root/csrc/kernels/isa_scalar.cpp" "$root/csrc/kernels/isa_neon.cpp" \
  -o "$out/test_kernels"
file "$out/test_kernels" | grep -q aarch64
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} qemu-aarch64 -L /usr/aarch64-linux-gnu "$out/test_kernels"
