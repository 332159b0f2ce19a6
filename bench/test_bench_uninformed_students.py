"""Uninformed Students: the cost of a dense map, training epochs and predict latency.

MVTec released no code for the method, so there is no official training loop to
time against. The reference here is what fast dense feature extraction (Bailer et
al., BMVC 2017) replaces: the patch network T̂ run on every pixel's p×p patch,
batched. Both give the same descriptors (asserted); the ratio is the factor the
multi-pool / unwrap evaluation saves.

- dense vs patch-by-patch: one patch network per receptive field at a small image
  (PYAD_BENCH_US_SIZE, default 32 px; 40 px for p = 65, which needs more than 32 px
  for its reflection padding), width PYAD_BENCH_US_WIDTH (default 32).
- training: seconds per epoch of the configuration used for the bottle figures in
  docs/detectors/uninformed_students.md (128 px, p ∈ {33, 65}, 3 students, width 32,
  descriptor 64, 32×32 training windows, random teachers: the timing does not depend
  on their weights) on PYAD_BENCH_US_IMAGES (8) bottle images, projected to 209.
- predict: that detector's inference module at batch 1 and 8.
No speed target is set by the issue: ratios are reported, correctness is asserted."""

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pyad
from pyad.detectors import uninformed_students as U
from conftest import RESULTS, record, save

HERE = Path(__file__).parent
BOTTLE = HERE.parents[1] / "shared" / "data" / "mvtec_ad" / "bottle"
SIZE = int(os.environ.get("PYAD_BENCH_US_SIZE", 32))
WIDTH = int(os.environ.get("PYAD_BENCH_US_WIDTH", 32))
N_IMAGES = int(os.environ.get("PYAD_BENCH_US_IMAGES", 8))
BOTTLE_CONFIG = dict(teachers="random", image_size=128, patch_sizes=(33, 65), n_students=3, width=32, dim=64,
                     train_crop=32, max_epochs=1, validation=0, seed=0)


def _patchwise(net: U.PatchNet, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    lo, hi = net.padding()
    p = net.patch_size
    padded = F.pad(x, (lo, hi, lo, hi), mode="reflect")
    patches = padded.unfold(2, p, 1).unfold(3, p, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, p, p)
    out = torch.cat([net.patch(patches[i : i + chunk]) for i in range(0, len(patches), chunk)])
    return out.reshape(x.shape[0], x.shape[2], x.shape[3], -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("impl", ["dense", "patch-by-patch"])
@pytest.mark.parametrize("p", [17, 33, 65])
def test_dense_map(benchmark, p, impl):
    torch.manual_seed(p)
    net = U.PatchNet(p, WIDTH, 128).eval().requires_grad_(False)
    size = max(SIZE, 40) if p == 65 else SIZE
    x = torch.randn(1, 3, size, size)
    if impl == "dense":
        torch.testing.assert_close(net(x), _patchwise(net, x), rtol=1e-4, atol=1e-4)
    fn = net if impl == "dense" else (lambda v: _patchwise(net, v))
    with torch.inference_mode():
        record(benchmark, f"US dense map p={p} {size}px", impl, fn, x, rounds=2 if impl == "dense" else 1, warmup=1)
    RESULTS.setdefault("us_dense", {}).setdefault(f"p={p}, {size}x{size}, width {WIDTH}", {})[impl + "_s"] = (
        RESULTS[f"US dense map p={p} {size}px"][impl])


@pytest.fixture(scope="module")
def fitted():
    if not BOTTLE.is_dir():
        pytest.skip("MVTec AD bottle not present")
    files = sorted((BOTTLE / "train" / "good").glob("*.png"))[:N_IMAGES]
    images = [pyad.images.read_image(f) for f in files]
    det = pyad.UninformedStudents(**BOTTLE_CONFIG)
    t0 = time.perf_counter()
    det.fit(images)
    RESULTS["us_training"] = {"images": len(images), "fit_s": time.perf_counter() - t0, **det.timing_,
                              "s_per_epoch_209_images": det.timing_["s_per_epoch"] * 209 / len(images)}
    return det, images


@pytest.mark.parametrize("batch", [1, 8])
def test_predict(benchmark, fitted, batch):
    det, images = fitted
    x = det.preprocessing.to_tensor([det.preprocessing.prepare(images[i % len(images)]) for i in range(batch)])
    module = det.inference_module()
    with torch.inference_mode():
        scores, maps = record(benchmark, "US predict", f"batch {batch}", module, x, rounds=2, warmup=1)
    assert scores.shape == (batch,) and maps.shape == (batch, 128, 128)
    RESULTS.setdefault("us_predict_ms_per_image", {})[f"batch {batch}"] = RESULTS["US predict"][f"batch {batch}"] * 1e3 / batch


def test_summary():
    rows = {k: RESULTS.get(k) for k in ("us_dense", "us_training", "us_predict_ms_per_image")}
    for v in (rows["us_dense"] or {}).values():
        if "dense_s" in v and "patch-by-patch_s" in v:
            v["speedup"] = v["patch-by-patch_s"] / v["dense_s"]
    save("uninformed_students", rows)
    print(rows)
    assert all(v.get("speedup", 2) > 1 for v in (rows["us_dense"] or {}).values())
