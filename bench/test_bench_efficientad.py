"""EfficientAD-S and -M against anomalib 2.7's EfficientAd on this machine, in the
same run (CPU, 256 px, batch 1 training, random teacher so nothing is downloaded,
penalty images from /work/shared/data/imagenet_samples for both):

- training steps per second: anomalib through ``Engine.fit(max_steps=N)``
  (bench/anomalib_ref/efficientad.py), pyad through ``fit(max_steps=N)``
  (bench/efficientad_train.py), each in its own process, steady state (the end of
  step 1 to the end of step N);
- predict latency at batch 1 and 8: anomalib's torch model in eval mode (its runner:
  3 warm-up calls, mean of 5) and pyad's inference module here with pytest-benchmark
  (3 warm-up rounds, 5 timed, minimum kept as for every pyad bench), on the same
  input batch;
- equal maps for equal weights: anomalib's trained weights (teacher, student,
  autoencoder, teacher statistics, quantiles) loaded into pyad give anomalib's maps.
  anomalib normalises the maps after padding and resizing them (the reference before),
  so its border differs by c·(1 − U(P(1))), c the folded offset, which is added back;
- per-stage latency (teacher / student / autoencoder / map) by ``pyad.latency``;
- the same with bfloat16 (a deviation, CPUs with AVX512-BF16 / AMX / Arm BF16):
  training under ``amp="bf16"`` autocast, predict with ``precision="bfloat16"``, and
  how far its maps are from float32's on anomalib's weights.

Targets (2-core machine): pyad >= 1.5x anomalib's training steps/s and >= 1.5x lower
predict latency (stretch 2x). Steps: PYAD_BENCH_EAD_STEPS (default 12 for S, 6 for M);
model sizes: PYAD_BENCH_EAD_SIZES (default "s,m").
Skipped without the anomalib venv (PYAD_ANOMALIB_PYTHON or /work/anomalib-venv)."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pyad
from conftest import RESULTS, record, save

HERE = Path(__file__).parent
DATA = HERE.parents[1] / "shared" / "data"
BOTTLE = DATA / "mvtec_ad" / "bottle"
PENALTY = DATA / "imagenet_samples"
ANOMALIB_PY = os.environ.get("PYAD_ANOMALIB_PYTHON", "/work/anomalib-venv/bin/python")
SIZES = {k: v for k, v in {"s": "small", "m": "medium"}.items()
         if k in os.environ.get("PYAD_BENCH_EAD_SIZES", "s,m").split(",")}
STEPS = {"s": 12, "m": 6}
pytestmark = pytest.mark.skipif(not BOTTLE.is_dir(), reason="MVTec AD bottle not present")


def steps(size: str) -> int:
    return int(os.environ.get("PYAD_BENCH_EAD_STEPS", STEPS[size]))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("efficientad")


def _json_run(cmd: list[str], timeout: float = 7200) -> dict:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def anomalib(work):
    """anomalib's figures, weights and maps per model size (run once each)."""
    if not Path(ANOMALIB_PY).exists():
        pytest.skip(f"no anomalib venv at {ANOMALIB_PY} (set PYAD_ANOMALIB_PYTHON)")
    cache = {}

    def get(size):
        if size not in cache:
            args = [ANOMALIB_PY, str(HERE / "anomalib_ref" / "efficientad.py"), "--model-size", SIZES[size],
                    "--steps", str(steps(size)), "--imagenet-dir", str(PENALTY), "--save-weights",
                    str(work / f"anomalib_{size}.pth"), "--save-maps", str(work / f"anomalib_{size}.npz")]
            if size == "m":
                args.append("--skip-teacher-stats")  # start-up only (209 teacher-M forwards); per-step work equal
            cache[size] = _json_run(args)
        return cache[size]

    return get


@pytest.fixture(scope="module")
def imported(anomalib, work):
    """pyad detectors holding anomalib's trained weights, and the anomalib maps."""
    cache = {}

    def get(size):
        if size not in cache:
            anomalib(size)
            state = torch.load(work / f"anomalib_{size}.pth", map_location="cpu", weights_only=True)
            det = pyad.EfficientAD(model_size=size, teacher="random", image_size=256).load_anomalib_state(state)
            cache[size] = (det, dict(np.load(work / f"anomalib_{size}.npz")))
        return cache[size]

    return get


@pytest.mark.parametrize("size", list(SIZES))
def test_anomalib_training_and_predict(anomalib, size):
    r = anomalib(size)
    RESULTS.setdefault("efficientad", {})[f"anomalib-{size}"] = {
        "steps_per_s": r["train"]["steps_per_s"], "predict_ms": {p["batch"]: p["ms_per_batch"] for p in r["predict"]},
        "peak_rss_gb": r["peak_rss_gb"]}


VARIANTS = {"": "float32", "-bf16": "bfloat16"}  # RESULTS key suffix -> precision (amp="bf16" in training)


@contextlib.contextmanager
def precision(det, value: str):
    """``det`` with ``precision=value`` inside, float32 again after."""
    det.set_params(precision=value)
    try:
        yield det
    finally:
        det.set_params(precision="float32")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("size", list(SIZES))
def test_pyad_training(size, variant):
    amp = ["--amp", "bf16"] if variant else []
    r = _json_run([sys.executable, str(HERE / "efficientad_train.py"), "--model-size", size, "--steps",
                   str(steps(size)), "--penalty", str(PENALTY), *amp])
    RESULTS.setdefault("efficientad", {}).setdefault(f"pyad-{size}{variant}", {}).update(
        {"steps_per_s": r["train"]["steps_per_s"], "peak_rss_gb": r["peak_rss_gb"]})


@pytest.mark.parametrize("size", list(SIZES))
def test_equal_maps_for_equal_weights(imported, size):
    det, ref = imported(size)
    x01 = torch.from_numpy(ref["x"]).float()
    pre = det.preprocessing
    x = (x01 - pre.mean) / pre.std
    with torch.inference_mode():
        scores, maps = det.inference_module()(x)
    a, b, c = (float(v) for v in det.inference_module().coef)
    ones = F.pad(torch.ones(1, 56, 56), (4, 4, 4, 4))
    border = 1.0 - F.interpolate(ones[:, None], size=(256, 256), mode="bilinear", align_corners=False)[:, 0]
    want = torch.from_numpy(ref["anomaly_map"]).float()[:, 0]
    got = maps + c * border  # anomalib normalises after padding and resizing
    scale = float(want.abs().max())
    diff = float((got - want).abs().max())
    interior = float((maps - want)[:, 24:-24, 24:-24].abs().max())
    RESULTS.setdefault("efficientad", {})[f"equal-maps-{size}"] = {"max_abs_diff": diff, "interior_max_abs_diff":
                                                                  interior, "map_scale": scale}
    assert diff <= 1e-4 * max(1.0, scale), (diff, scale)
    assert interior <= 1e-4 * max(1.0, scale)
    with precision(det, "bfloat16"), torch.inference_mode():  # the bfloat16 rows' maps on the same weights
        _, maps16 = det.inference_module()(x)
    d16 = float((maps16 - maps).abs().max())
    RESULTS["efficientad"][f"equal-maps-{size}"]["bf16_max_abs_diff_to_float32"] = d16
    print(f"EfficientAD-{size.upper()} bfloat16 maps: max |diff| to float32 {d16:.4g} (map scale {scale:.4g})")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("size", list(SIZES))
def test_pyad_predict_latency(benchmark, imported, size, batch, variant):
    det, ref = imported(size)
    pre = det.preprocessing
    x = ((torch.from_numpy(ref["x"]).float() - pre.mean) / pre.std)[:batch].contiguous()
    with precision(det, VARIANTS[variant]):
        module = det.inference_module()

        def call():
            with torch.inference_mode():
                return module(x)

        record(benchmark, "efficientad predict", f"pyad-{size}{variant}-b{batch}", call, rounds=5, warmup=3)
    RESULTS.setdefault("efficientad", {}).setdefault(f"pyad-{size}{variant}", {}).setdefault("predict_ms", {})[
        batch] = 1e3 * benchmark.stats.stats.min


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("size", list(SIZES))
def test_stage_latency(imported, size, variant):
    det, _ = imported(size)
    ds = pyad.datasets.mvtec_ad(BOTTLE.parent, "bottle")
    with precision(det, VARIANTS[variant]):
        lat = pyad.latency(det, ds, batch_sizes=(1,), max_images=3)
    RESULTS.setdefault("efficientad", {}).setdefault(f"pyad-{size}{variant}", {})["stage_ms"] = lat.stage_ms()


PAPER_MS = {"s": 2.2, "m": 4.5}  # batch 1, fp16, RTX A6000 (paper; nelson1425 benchmark.py: M 4.4 ms)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("size", list(SIZES))
def test_cuda_fp16_latency(size):
    """Batch 1, fp16, 256 px, random weights (latency does not depend on them):
    ``pyad.latency`` per image (predict: host -> GPU, the module, maps back, as
    benchmark.py times it, plus pyad's resize of the map to the image) next to the paper."""
    x = np.random.default_rng(0).integers(0, 255, (4, 256, 256, 3), dtype=np.uint8)
    det = pyad.EfficientAD(model_size=size, teacher="random", image_size=256, max_steps=0, device="cuda",
                           precision="float16").fit(x)
    lat = pyad.latency(det, list(x), warmup=50, runs=200, batch_sizes=(1,), max_images=4)
    RESULTS.setdefault("efficientad", {})[f"cuda-fp16-{size}"] = {
        "gpu": torch.cuda.get_device_name(), "ms_per_image": lat.mean_ms,
        "stage_ms": lat.stage_ms(), "paper_ms": PAPER_MS[size]}
    print(RESULTS["efficientad"][f"cuda-fp16-{size}"])


def test_summary():
    res = RESULTS.get("efficientad", {})
    rows, misses = {}, []
    for size, variant in ((s, v) for s in SIZES for v in VARIANTS):
        mine, ref = res.get(f"pyad-{size}{variant}", {}), res.get(f"anomalib-{size}")
        if not ref or "steps_per_s" not in mine or "predict_ms" not in mine:
            continue
        row = {"pyad": mine, "anomalib": ref,
               "training_speedup": mine["steps_per_s"] / ref["steps_per_s"],
               "predict_speedup": {b: ref["predict_ms"][b] / mine["predict_ms"][b] for b in (1, 8)
                                   if b in mine["predict_ms"] and b in ref["predict_ms"]},
               "equal_maps": res.get(f"equal-maps-{size}")}
        rows[size + variant] = row
        checks = [("training >= 1.5x", row["training_speedup"] >= 1.5)]
        checks += [(f"predict b{b} >= 1.5x", v >= 1.5) for b, v in row["predict_speedup"].items()]
        for what, ok in checks:
            print(f"{'met ' if ok else 'MISS'} EfficientAD-{size.upper()}{variant} {what}")
            if not ok:
                misses.append(f"{size}{variant} {what}")
    if not rows:
        pytest.skip("no anomalib figures in this run")
    save("efficientad", rows)
    print(json.dumps(rows, indent=1, default=str))
    assert not misses, misses
