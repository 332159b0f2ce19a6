"""Which implementation runs the kernels: chosen once, reported, overridable.

Order of preference: the compiled core (``native``), then ``numba``, then the
NumPy reference (``numpy``). ``PYAD_BACKEND`` forces one; ``PYAD_ISA`` caps the
instruction set of the native kernels. Forcing something unavailable raises.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
from types import ModuleType
from typing import Iterator

BACKENDS = ("native", "numba", "numpy")
X86_ISAS = ("scalar", "sse", "avx2", "avx512")
ARM_ISAS = ("scalar", "neon")

_module: ModuleType | None = None
_name: str | None = None
_native_error: str | None = None


def _core() -> ModuleType:
    """The compiled module; ImportError with the reason if it cannot load."""
    global _native_error
    try:
        return importlib.import_module("pyad._core")
    except ImportError as exc:  # keep the reason for the message below
        _native_error = str(exc)
        raise ImportError(
            f"pyad's compiled kernels (pyad._core) did not load: {exc}. Reinstall with "
            "`pip install --force-reinstall --no-deps pyad` (needs a C++17 compiler), or set "
            "PYAD_BACKEND=numba to use the numba kernels."
        ) from exc


def _load(name: str) -> ModuleType:
    if name == "native":
        return _core()
    if name == "numba":
        try:
            return importlib.import_module("pyad.kernels._numba")
        except ImportError as exc:
            raise ImportError(f"PYAD_BACKEND=numba but numba is not importable: {exc}") from exc
    if name == "numpy":
        return importlib.import_module("pyad.kernels.reference")
    raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")


def host_isas() -> tuple[str, ...]:
    """Instruction sets this CPU runs, narrowest first (from the OS, no compiled code)."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return ARM_ISAS
    if machine not in ("x86_64", "amd64"):
        return ("scalar",)
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    out = ["scalar"]
    if "sse4_1" in flags:
        out.append("sse")
    if {"avx2", "fma", "f16c"} <= flags:
        out.append("avx2")
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags and "avx2" in out:
        out.append("avx512")
    return tuple(out)


def _apply_isa_cap(core: ModuleType, cap: str) -> None:
    known = ARM_ISAS if "neon" in core.compiled_isas() else X86_ISAS
    if cap not in known:
        raise ValueError(f"PYAD_ISA: expected one of {known}, got {cap!r}")
    supported = core.supported_isas()
    if cap not in supported:
        raise ValueError(f"PYAD_ISA={cap!r} is not available on this machine (available: {supported})")
    core.set_isa(cap)


def set_backend(name: str, isa: str | None = None) -> None:
    """Use backend ``name`` (and, for native, instruction set ``isa``) from now on."""
    global _module, _name
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    module = _load(name)
    if name == "native":
        _apply_isa_cap(module, isa or module.supported_isas()[-1])
    elif isa is not None:
        raise ValueError(f"isa: only the native backend takes an instruction set, not {name!r}")
    _module, _name = module, name


def _choose() -> None:
    forced = os.environ.get("PYAD_BACKEND", "").strip().lower()
    cap = os.environ.get("PYAD_ISA", "").strip().lower() or None
    if forced:
        set_backend(forced, cap if forced == "native" else None)
        return
    for name in BACKENDS:
        try:
            set_backend(name, cap if name == "native" else None)
            return
        except ImportError:
            continue


def current() -> ModuleType:
    """The module whose functions run the kernels (chosen on first use)."""
    if _module is None:
        _choose()
    assert _module is not None
    return _module


def name() -> str:
    current()
    assert _name is not None
    return _name


@contextlib.contextmanager
def use_backend(backend: str, isa: str | None = None) -> Iterator[None]:
    """Temporarily run the kernels on ``backend`` (process-wide; for tests and benchmarks)."""
    prev_module, prev_name = _module, _name
    prev_isa = _core().isa() if prev_name == "native" else None
    set_backend(backend, isa)
    try:
        yield
    finally:
        globals().update(_module=prev_module, _name=prev_name)
        if prev_isa is not None:
            _core().set_isa(prev_isa)


def set_num_threads(n: int) -> None:
    """Threads for the native and numba kernels (default: OMP_NUM_THREADS, else all cores)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive integer, got {n!r}")
    with contextlib.suppress(ImportError):
        _core().set_num_threads(n)
    import sys

    if "numba" in sys.modules:
        sys.modules["numba"].set_num_threads(min(n, sys.modules["numba"].config.NUMBA_NUM_THREADS))


def info() -> dict:
    """``{"backend", "isa", "threads", ...}`` for the kernels in use."""
    backend = name()
    if backend == "native":
        core = _core()
        isa, threads = core.isa(), core.num_threads()
        extra = {"compiled_isas": list(core.compiled_isas()), "supported_isas": list(core.supported_isas())}
    else:
        isa = host_isas()[-1]
        threads = 1
        if backend == "numba":
            import numba

            threads = numba.get_num_threads()
        extra = {"native_error": _native_error} if _native_error else {}
    return {"backend": backend, "isa": isa, "threads": threads, **extra}
