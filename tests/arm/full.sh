#!/usr/bin/env bash
# The whole package on aarch64, under emulation: a Debian arm64 root file system
# (debootstrap --foreign, second stage run through qemu-aarch64-static and binfmt_misc),
# pyad's real dependencies from their aarch64 wheels (tests/arm/requirements.txt),
# `_core` compiled natively inside it by the aarch64 g++, `pyad info` checked for
# `neon`, then a named subset of the test suite (SUBSET below).
#
#   sudo bash tests/arm/full.sh        # root: debootstrap, chroot and mounts need it
#
# Cached outside the repository in $PYAD_ARM_CACHE (default /work/.cache/arm when /work
# exists, else ~/.cache/pyad-arm): the wheels, and the root file system with the
# dependencies installed as one tarball whose name carries a hash of what went into it
# (suite, packages, requirements, this script's ROOTFS_RECIPE), so a change rebuilds it.
# Each run unpacks a fresh copy, copies the work tree in (tracked and untracked files,
# not ignored ones: no host build; or the commit PYAD_ARM_REF names, e.g. HEAD), and
# removes it afterwards. Durations are in
# docs/arm.md. Another emulator-free check of the kernels alone is tests/arm/run.sh.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
if [ -d /work ] && [ -w /work ]; then default_cache=/work/.cache/arm; else default_cache=${HOME:-/root}/.cache/pyad-arm; fi
cache=${PYAD_ARM_CACHE:-$default_cache}
suite=bookworm                   # Python 3.11, g++ 12, cmake 3.25
packages=python3,python3-venv,python3-dev,g++,cmake,make,ca-certificates
ROOTFS_RECIPE=1                  # raise to force a rebuild when the recipe below changes
threads=${PYAD_ARM_THREADS:-2}
# The emulated CPU: the Raspberry Pi 4's Cortex-A72 (NEON, no SVE). Under qemu's default
# ("max") torch's oneDNN JIT emits instructions qemu then refuses (SIGILL in ConvTranspose2d),
# and its CPU probing and ONNX Runtime's read the host's /sys (x86 topology), so the test run
# gets no /sys: ONNX Runtime segfaults while loading with it (probed 2026-12-02).
qemu_cpu=${PYAD_ARM_CPU:-cortex-a72}

# The subset: the kernels against their NumPy spec (NEON and scalar, numba twins; the Winograd
# convolutions and the k-NN search through them), the
# backend selection, the model-file format, image decoding (the PNG row kernel against
# Pillow); every registered detector fitted once on tiny
# images, predict, save/load and the exported (pure torch) path (tests/arm/test_smoke.py);
# where the package has them (pyad/export.py, tests/test_export.py), ONNX Runtime
# against torch and the int8 path for one detector of each kind (memory bank, Gaussian,
# trained network). Emulation costs 10-50x: the rest of the suite runs on x86 only.
SUBSET=(tests/test_gaussian.py tests/test_coreset.py tests/test_pooling.py tests/test_winograd.py tests/test_knn.py
        tests/test_backend.py tests/test_modelfile.py tests/test_images.py tests/arm/test_smoke.py)
OPTIONAL=(tests/test_export.py)
SELECT=${PYAD_ARM_SELECT:-"not test_export or ((test_onnx_predict_equals_torch_predict or test_int8_every_detector) and (patchcore or padim or autoencoder))"}  # PYAD_ARM_SELECT: another pytest -k
# PYAD_ARM_TESTS="tests/a.py tests/b.py": only these files (no optional ones), e.g. what a change touched
if [ -n "${PYAD_ARM_TESTS:-}" ]; then read -ra SUBSET <<< "$PYAD_ARM_TESTS"; OPTIONAL=(); fi

say() { printf '[arm %(%H:%M:%S)T] %s\n' -1 "$*"; }
t_start=$SECONDS
lap() { say "$1: $((SECONDS - ${2:-$t_start})) s"; }

[ "$(id -u)" -eq 0 ] || { echo "tests/arm/full.sh needs root (debootstrap, chroot, mounts)" >&2; exit 1; }

# --- host tools --------------------------------------------------------------------------
missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
command -v zstd >/dev/null || missing+=(zstd)
command -v update-binfmts >/dev/null || missing+=(binfmt-support)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- binfmt_misc: the kernel runs aarch64 ELF files through qemu-aarch64-static ----------
# The F flag opens the interpreter when registering, so it works inside the chroot
# without a copy of qemu there.
binfmt=/proc/sys/fs/binfmt_misc
[ -e $binfmt/register ] || mount -t binfmt_misc binfmt_misc $binfmt
if [ ! -e $binfmt/qemu-aarch64 ]; then
  update-binfmts --enable qemu-aarch64 2>/dev/null || true
fi
if [ ! -e $binfmt/qemu-aarch64 ] || ! grep -q '^flags: .*F' $binfmt/qemu-aarch64 \
   || ! grep -q 'enabled' $binfmt/qemu-aarch64; then
  echo "binfmt_misc has no enabled qemu-aarch64 entry with the F flag (see $binfmt/qemu-aarch64);" \
       "install qemu-user-static and binfmt-support, or run: update-binfmts --enable qemu-aarch64" >&2
  exit 1
fi

# --- wheels (host side: pip download for the target platform, no resolution) -------------
mkdir -p "$cache/wheels"
req=$root/tests/arm/requirements.txt
late=$root/tests/arm/requirements-run.txt   # installed per run (see that file)
stamp=$cache/wheels/.complete-$(cat "$req" "$late" | sha256sum | cut -c1-16)
if [ ! -e "$stamp" ]; then
  t0=$SECONDS
  pip=(python3 -m pip)
  if ! python3 -m pip --version >/dev/null 2>&1; then   # a system Python without pip
    python3 -m venv "$cache/host-venv" && pip=("$cache/host-venv/bin/python" -m pip)
  fi
  "${pip[@]}" download -q --no-deps --only-binary=:all: -d "$cache/wheels" \
    --platform manylinux_2_36_aarch64 --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
    --platform manylinux_2_17_aarch64 --platform linux_aarch64 \
    --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none -r "$req" -r "$late"
  touch "$stamp"
  lap "wheels" $t0
fi

# --- mounts for a chroot, in a private mount namespace (gone when it exits) --------------
# in_chroot DIR COMMAND...: run COMMAND in DIR as root file system with /proc, /dev, /sys,
# the host's DNS settings and the wheel cache (read-only, at /wheels).
in_chroot() {
  local dir=$1; shift
  cp -L /etc/resolv.conf "$dir/etc/resolv.conf" 2>/dev/null || true
  mkdir -p "$dir/wheels"
  unshare --mount --propagation private -- bash -euo pipefail -c '
    dir=$1; wheels=$2; sys=$3; shift 3
    mount -t proc proc "$dir/proc"
    mount --rbind /dev "$dir/dev"
    [ "$sys" = 1 ] && mount --rbind /sys "$dir/sys"
    mount --bind "$wheels" "$dir/wheels" && mount -o remount,ro,bind "$dir/wheels"
    exec chroot "$dir" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb QEMU_CPU='"$qemu_cpu"' \
      PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      OMP_NUM_THREADS='"$threads"' CMAKE_BUILD_PARALLEL_LEVEL='"$threads"' "$@"
  ' in_chroot "$dir" "$cache/wheels" "${SYS_MOUNT:-1}" "$@"
}

# --- the root file system with the dependencies (built once, cached as a tarball) --------
key=$( { echo "$suite $packages $ROOTFS_RECIPE"; cat "$req"; } | sha256sum | cut -c1-16)
tarball=$cache/rootfs-$suite-arm64-$key.tar.zst
if [ ! -e "$tarball" ]; then
  say "building the root file system ($tarball)"
  build=$(mktemp -d "$cache/build.XXXXXX")
  trap 'rm -rf "$build"' EXIT
  t0=$SECONDS
  debootstrap --foreign --arch=arm64 --variant=minbase --include="$packages" "$suite" "$build/rootfs" \
    > "$build/debootstrap.log" 2>&1 || { tail -20 "$build/debootstrap.log" >&2; exit 1; }
  lap "debootstrap, first stage (download, unpack)" $t0
  t0=$SECONDS
  in_chroot "$build/rootfs" /debootstrap/debootstrap --second-stage \
    > "$build/second-stage.log" 2>&1 || { tail -20 "$build/second-stage.log" >&2; exit 1; }
  lap "debootstrap, second stage (under qemu)" $t0
  cp "$req" "$build/rootfs/requirements.txt"
  t0=$SECONDS
  in_chroot "$build/rootfs" bash -euo pipefail -c '
    python3 -m venv /opt/venv
    pip install -q --no-index --find-links /wheels -r /requirements.txt
    apt-get clean
    rm -rf /root/.cache /var/lib/apt/lists/*'
  lap "virtual environment (under qemu)" $t0
  t0=$SECONDS
  tar --zstd -cf "$build/rootfs.tar.zst" -C "$build/rootfs" --exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' .
  rm -f "$cache"/rootfs-"$suite"-arm64-*.tar.zst   # older recipes
  mv "$build/rootfs.tar.zst" "$tarball"
  rm -rf "$build"
  trap - EXIT
  lap "tarball" $t0
fi

# --- a fresh copy, the work tree in /src ---------------------------------------------------
run=$(mktemp -d "$cache/run.XXXXXX")
trap 'rm -rf "$run"' EXIT
t0=$SECONDS
mkdir "$run/rootfs"
tar --zstd -xf "$tarball" -C "$run/rootfs"
mkdir "$run/rootfs/src"
if [ -n "${PYAD_ARM_REF:-}" ]; then   # a commit instead of the work tree
  git -C "$root" archive "$PYAD_ARM_REF" | tar -xf - -C "$run/rootfs/src"
else
  (cd "$root" && git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf -) | tar -xf - -C "$run/rootfs/src"
fi
lap "unpack + copy" $t0

# --- inside: build _core natively, check the ISA, run the subset -------------------------
t_in=$SECONDS
SYS_MOUNT=0 in_chroot "$run/rootfs" nice -n 10 bash -euo pipefail -c '
  say() { printf "[arm %(%H:%M:%S)T] %s\n" -1 "$*"; }
  cd /src
  uname -m | grep -qx aarch64
  pip install -q --no-index --find-links /wheels -r tests/arm/requirements-run.txt
  t0=$SECONDS
  pip install -q --no-index --no-build-isolation --no-deps .
  say "pip install . (compiles _core with the aarch64 g++): $((SECONDS - t0)) s"
  cd /tmp   # import the installed package, not /src/pyad
  pyad info | tee /tmp/info.json
  python3 -c "import json, sys; i = json.load(open(\"/tmp/info.json\")); \
sys.exit(0 if i[\"isa\"] == \"neon\" and i[\"backend\"] == \"native\" else \"pyad info: expected native/neon, got %s/%s\" % (i[\"backend\"], i[\"isa\"]))"
  say "pyad info reports neon"
  cd /src
  tests=("$@")
  # ONNX Runtime'"'"'s aarch64 wheel segfaults while loading under qemu-user (seen with 1.32.0:
  # inside onnxruntime/capi/_pybind_state.py); a crash in a probe process, not in pytest,
  # drops the ONNX part with a message instead of taking the run down
  if python3 -c "import onnxruntime" 2>/dev/null; then
    for f in '"${OPTIONAL[*]}"'; do [ -e "$f" ] && tests+=("$f"); done
  else
    say "onnxruntime does not load under this emulator (exit $?): tests/test_export.py not run"
  fi
  say "pytest ${tests[*]}"
  t0=$SECONDS
  pytest -p no:cacheprovider -q -rs --durations=10 -k "'"$SELECT"'" "${tests[@]}"
  say "pytest: $((SECONDS - t0)) s"
' full "${SUBSET[@]}"
lap "inside the emulated system" $t_in
lap "total"
