"""GANomaly against anomalib 2.7's Ganomaly on this machine, in the same run (CPU,
MVTec AD bottle, batch 32 as anomalib's config, 256 px by default):

- training throughput: anomalib through ``Engine.fit`` (bench/anomalib_ref/ganomaly.py),
  pyad through ``fit(max_steps=N)`` (bench/ganomaly_train.py), each in its own
  process, steady state (the end of batch 1 to the end of batch N), images per
  second. Each does the same work per batch: one generator forward, four
  discriminator forwards, a generator and a discriminator update (anomalib's first
  encoder convolution pads by 4 instead of 1: slightly larger maps);
- predict latency at batch 1 and 8: anomalib's torch model in eval mode (its runner:
  3 warm-up calls, 5 timed, minimum kept) and pyad's inference module (pytest-benchmark,
  2 warm-up rounds, 5 timed, minimum kept) on inputs of the same size. pyad's module
  also computes the anomaly map (the blurred contextual error), anomalib's none;
- per-stage latency by ``pyad.latency``.

No speed targets are set by the issue: ratios are reported. Batches:
PYAD_BENCH_GAN_STEPS (3), size: PYAD_BENCH_GAN_SIZE (256). Skipped without the
anomalib venv (PYAD_ANOMALIB_PYTHON or /work/anomalib-venv)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pyad
from conftest import RESULTS, record, save

HERE = Path(__file__).parent
BOTTLE = HERE.parents[1] / "shared" / "data" / "mvtec_ad" / "bottle"
ANOMALIB_PY = os.environ.get("PYAD_ANOMALIB_PYTHON", "/work/anomalib-venv/bin/python")
STEPS = int(os.environ.get("PYAD_BENCH_GAN_STEPS", 3))
SIZE = int(os.environ.get("PYAD_BENCH_GAN_SIZE", 256))
pytestmark = pytest.mark.skipif(not BOTTLE.is_dir(), reason="MVTec AD bottle not present")


def _json_run(cmd: list[str], timeout: float = 7200) -> dict:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def anomalib():
    if not Path(ANOMALIB_PY).exists():
        pytest.skip(f"no anomalib venv at {ANOMALIB_PY} (set PYAD_ANOMALIB_PYTHON)")
    return _json_run([ANOMALIB_PY, str(HERE / "anomalib_ref" / "ganomaly.py"), "--steps", str(STEPS),
                      "--image-size", str(SIZE), "--batch-size", "32", "--threads", str(torch.get_num_threads())])


@pytest.fixture(scope="module")
def det():
    """An untrained pyad GANomaly (latency does not depend on the weights)."""
    return pyad.GANomaly(image_size=SIZE, batch_size=8, max_steps=0).fit(sorted((BOTTLE / "train" / "good").glob("*.png"))[:20])


def test_anomalib_training_and_predict(anomalib):
    r = anomalib
    RESULTS.setdefault("ganomaly", {})["anomalib"] = {
        "images_per_s": r["train"].get("images_per_s"), "batches_per_s": r["train"].get("batches_per_s"),
        "predict_ms": {p["batch"]: p["ms_per_batch_min"] for p in r["predict"]}, "peak_rss_gb": r["peak_rss_gb"],
        "params": r.get("params"), "versions": r.get("versions")}


def test_pyad_training():
    r = _json_run([sys.executable, str(HERE / "ganomaly_train.py"), "--steps", str(STEPS), "--image-size", str(SIZE),
                   "--threads", str(torch.get_num_threads())])
    RESULTS.setdefault("ganomaly", {}).setdefault("pyad", {}).update(
        images_per_s=r["train"].get("images_per_s"), batches_per_s=r["train"].get("batches_per_s"),
        peak_rss_gb=r["peak_rss_gb"])


@pytest.mark.parametrize("batch", [1, 8])
def test_pyad_predict_latency(benchmark, det, batch):
    x = torch.rand(batch, 3, SIZE, SIZE) * 2 - 1
    module = det.inference_module()

    def call():
        with torch.inference_mode():
            return module(x)

    scores, maps = call()
    assert scores.shape == (batch,) and maps.shape == (batch, SIZE, SIZE) and torch.isfinite(scores).all()
    record(benchmark, "ganomaly predict", f"pyad-b{batch}", call, rounds=5, warmup=2)
    RESULTS.setdefault("ganomaly", {}).setdefault("pyad", {}).setdefault("predict_ms", {})[batch] = (
        1e3 * benchmark.stats.stats.min)


def test_stage_latency(det):
    ds = pyad.datasets.mvtec_ad(BOTTLE.parent, "bottle")
    lat = pyad.latency(det, ds, batch_sizes=(1,), max_images=2)
    RESULTS.setdefault("ganomaly", {}).setdefault("pyad", {})["stage_ms"] = lat.stage_ms()


def test_summary():
    res = RESULTS.get("ganomaly", {})
    mine, ref = res.get("pyad", {}), res.get("anomalib")
    if not ref or "images_per_s" not in mine:
        pytest.skip("no anomalib figures in this run")
    row = {"image_size": SIZE, "batches": STEPS, "pyad": mine, "anomalib": ref,
           "training_speedup": (mine["images_per_s"] or np.nan) / (ref["images_per_s"] or np.nan),
           "predict_speedup": {b: ref["predict_ms"][b] / mine["predict_ms"][b] for b in (1, 8)
                               if b in mine.get("predict_ms", {}) and b in ref["predict_ms"]}}
    save("ganomaly", row)
    print(json.dumps(row, indent=1, default=str))
    assert row["training_speedup"] > 0
