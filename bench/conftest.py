"""Shared set-up for the benchmarks: reference formulations, machine bounds, and a
results table that the last test of each file turns into ratios and checks."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pyad import _core
from pyad import kernels as K

RESULTS: dict[str, dict[str, float]] = {}
OUT = Path(os.environ.get("PYAD_BENCH_OUT", Path(__file__).parent / "results"))


def pytest_report_header(config):
    import pyad

    return [f"pyad {pyad.__version__}: {pyad.info()}, torch threads {torch.get_num_threads()}"]


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(_core.num_threads())


def record(benchmark, group: str, name: str, fn, *args, rounds: int = 5, warmup: int = 1, **kwargs):
    """Time ``fn`` with pytest-benchmark and keep its median for the ratio checks."""
    benchmark.group = group
    benchmark.name = name
    out = benchmark.pedantic(fn, args, kwargs, rounds=rounds, warmup_rounds=warmup, iterations=1)
    # best of the rounds: this is a shared 2-core VM, and the minimum is the
    # least disturbed estimate for every contender alike
    RESULTS.setdefault(group, {})[name] = benchmark.stats.stats.min
    return out


def record_predict(benchmark, table: str, key: str, impl: str, call, batch: int, group: str) -> None:
    """Time one predict ``call`` (5 rounds, 2 warm-up) and keep ms per image under
    ``RESULTS[table][key][impl]``."""
    record(benchmark, group, impl, call, rounds=5, warmup=2)
    RESULTS.setdefault(table, {}).setdefault(key, {})[impl] = RESULTS[group][impl] * 1e3 / batch


def save_training_and_predict(name: str, training: str, predict: str, reference: str) -> dict:
    """Save ``RESULTS[training]`` and ``RESULTS[predict]`` as bench/results/<name>.json,
    each predict row with its speed-up over ``reference``; returns the rows."""
    rows = {"training": RESULTS.get(training, {}), "predict_ms_per_image": RESULTS.get(predict, {})}
    for v in rows["predict_ms_per_image"].values():
        if "pyad" in v and reference in v:
            v["speedup"] = v[reference] / v["pyad"]
    save(name, rows)
    print(rows)
    return rows


def machine_bounds() -> dict[str, float]:
    """Measured read bandwidth (all threads, 1 GiB) and sgemm FLOP/s (torch, 4096²)."""
    x = np.ones(256 << 20, np.float32)
    _core.stream_sum(x)
    best = min(_timeit(lambda: _core.stream_sum(x)) for _ in range(10))
    return {"read_bandwidth_GBps": x.nbytes / best / 1e9, "sgemm_GFLOPs": sgemm_gflops()}


def sgemm_gflops() -> float:
    """This machine's float32 GEMM rate: torch, 4096², best of 3 (the bound of the
    benchmarks' arithmetic floors; also used by bench/profile_fit.py, spade_bound.py)."""
    a = torch.rand(4096, 4096)
    a @ a
    gemm = min(_timeit(lambda: a @ a) for _ in range(3))
    return 2 * 4096**3 / gemm / 1e9


def _timeit(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def save(name: str, payload: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(payload, indent=2))


_BOUNDS: dict[str, float] = {}


@pytest.fixture(scope="session", autouse=True)
def _measure_bounds_first():
    _BOUNDS.update(machine_bounds())


@pytest.fixture(scope="session")
def bounds():
    """Bounds measured at the start and again now; the best of the two."""
    again = machine_bounds()
    return {k: max(v, again[k]) for k, v in _BOUNDS.items()}


__all__ = ["K", "RESULTS", "record", "save"]
