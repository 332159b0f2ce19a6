"""Command line: ``pyad info``, ``pyad demo``."""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def _info(args: argparse.Namespace) -> int:
    import pyad

    print(json.dumps(pyad.info(), indent=2))
    return 0


def _timed(fn, repeat: int = 3) -> tuple[float, object]:
    fn()  # warm-up (JIT compilation, caches)
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _demo(args: argparse.Namespace) -> int:
    """Run every kernel on every available backend against the NumPy reference."""
    import pyad
    from pyad import kernels as K

    rng = np.random.default_rng(0)
    print(f"pyad {pyad.__version__}: {json.dumps(K.info())}")
    feats = rng.standard_normal((40, 196, 64)).astype(np.float32)
    fitted = K.gaussian_fit(feats[:32])
    bank = rng.standard_normal((20000, 128)).astype(np.float32)
    fmap = rng.standard_normal((4, 256, 28, 28)).astype(np.float32)
    jobs = {
        "mahalanobis   8x196x64": lambda: K.mahalanobis(feats[32:], fitted),
        "greedy_coreset 20000x128, k=200": lambda: K.greedy_coreset(bank, 200),
        "patch_pool    4x256x28x28": lambda: K.patch_pool(fmap),
        "patch_embed   4x256x28x28 -> 1024": lambda: K.patch_embed(fmap, 1024),
    }
    backends = ["numpy"]
    for name in ("numba", "native"):
        try:
            with K.use_backend(name):
                backends.append(name)
        except ImportError as exc:
            print(f"  ({name} unavailable: {exc})")
    print(f"{'kernel':36s}" + "".join(f"{b:>12s}" for b in backends) + "   max |diff| vs numpy")
    for label, job in jobs.items():
        times, outs = [], []
        for b in backends:
            with K.use_backend(b):
                t, out = _timed(job, 1 if b == "numpy" else 3)
            times.append(t)
            outs.append(np.asarray(out, dtype=np.float64))
        diff = max(float(np.abs(o - outs[0]).max()) for o in outs[1:])
        print(f"{label:36s}" + "".join(f"{t * 1e3:10.1f}ms" for t in times) + f"   {diff:.2e}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyad", description="Visual anomaly detection for industrial inspection.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print version, kernel backend, instruction set and threads as JSON").set_defaults(
        func=_info
    )
    sub.add_parser("demo", help="run every kernel on every backend against the NumPy reference").set_defaults(
        func=_demo
    )
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ImportError) as exc:
        print(f"pyad: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
