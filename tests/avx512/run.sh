#!/usr/bin/env bash
# Runs the AVX-512 kernels on a CPU without AVX-512 (this project's AVX2 machines; qemu
# does not emulate AVX-512): tests/avx512/isa_avx512_simde.cpp compiles the unchanged
# csrc/kernels/isa_avx512.cpp against SIMDe's AVX-512 emulation, and tests/arm/test_kernels.cpp
# (every kernel against its own double-precision reference) checks it beside the natively
# compiled scalar, SSE and AVX2 tables. Needs g++ and Debian's libsimde-dev.
# On a CPU with AVX-512 the real path is tested instead by PYAD_ISA=avx512 pytest tests/test_kernels.py.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${AVX512_BUILD_DIR:-$root/build/avx512}
cxx=${CXX:-g++}
mkdir -p "$out"
[ "$(uname -m)" = x86_64 ] || { echo "tests/avx512/run.sh needs an x86-64 host" >&2; exit 1; }
[ -f /usr/include/simde/x86/avx512.h ] || { echo "missing SIMDe (apt-get install libsimde-dev)" >&2; exit 1; }
flags=(-O2 -std=c++17 -fopenmp -Wall -Wextra -I"$root/csrc")
"$cxx" "${flags[@]}" -c "$root/csrc/kernels/isa_scalar.cpp" -o "$out/isa_scalar.o"
"$cxx" "${flags[@]}" -msse4.1 -c "$root/csrc/kernels/isa_sse.cpp" -o "$out/isa_sse.o"
"$cxx" "${flags[@]}" -mavx2 -mfma -mf16c -c "$root/csrc/kernels/isa_avx2.cpp" -o "$out/isa_avx2.o"
# Deliberately without -mavx512*: every AVX-512 instruction is SIMDe's emulation.
"$cxx" "${flags[@]}" -Wno-unused-parameter -mavx2 -mfma -mf16c -c "$root/tests/avx512/isa_avx512_simde.cpp" -o "$out/isa_avx512.o"
if objdump -d "$out/isa_avx512.o" | grep -q zmm; then echo "the emulated AVX-512 object holds zmm instructions" >&2; exit 1; fi
"$cxx" "${flags[@]}" -DPYAD_TEST_EMULATED_AVX512 "$root/tests/arm/test_kernels.cpp" "$root/csrc/kernels/dispatch.cpp" \
  "$out/isa_scalar.o" "$out/isa_sse.o" "$out/isa_avx2.o" "$out/isa_avx512.o" -o "$out/test_kernels"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$out/test_kernels" avx512 avx2 sse scalar
