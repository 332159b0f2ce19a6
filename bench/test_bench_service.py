"""A service that loads one model and predicts from many request threads (the README's
"Services" pattern): throughput of 8 request threads, each predicting one image per
request, with torch / OpenMP / faiss threads left at their defaults against
``pyad.set_threads(1)`` (one core per request thread), and one thread predicting
alone for scale. Every configuration scores the same images and must give the same
scores as the single-threaded run (concurrent predict is exact).

    cd bench && pytest -s test_bench_service.py      # PYAD_MODEL / PYAD_IMAGES: your own

Without PYAD_MODEL a MobileNetV2 (ImageNet, ../shared/weights) or seeded-random
ResNet-18 PatchCore is fitted on MVTec AD bottle when present, else on synthetic data.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pyad
from pyad.images import iter_images

from conftest import OUT

SHARED = Path(__file__).resolve().parents[2] / "shared"
REQUESTS = 48
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    if os.environ.get("PYAD_MODEL"):
        det = pyad.load(os.environ["PYAD_MODEL"])
        images = list(iter_images(os.environ["PYAD_IMAGES"]))[:REQUESTS]
        return det, images, os.environ["PYAD_MODEL"]
    bottle = SHARED / "data" / "mvtec_ad" / "bottle"
    weights = SHARED / "weights" / "mobilenet_v2_imagenet_from_tflite.pth"
    params = (dict(backbone="mobilenet_v2", weights=str(weights)) if weights.exists()
              else dict(backbone="resnet18", weights=None))
    det = pyad.PatchCore(coreset_ratio=0.1, **params)
    if bottle.exists():
        ds = pyad.datasets.mvtec_ad(bottle.parent, "bottle")
        what = f"PatchCore {params['backbone']}, MVTec AD bottle"
    else:
        root = tmp_path_factory.mktemp("data")
        ds = pyad.datasets.synthetic(root, kinds=("object",), n_train=20, n_good=8, n_defect=8)[0]
        what = f"PatchCore {params['backbone']}, synthetic"
    path = tmp_path_factory.mktemp("model") / "service.pyad"
    det.fit(ds).save(path)
    images = [s.image for s in ds.test[:REQUESTS]]  # decoded once: requests carry arrays
    images = (images * REQUESTS)[:REQUESTS]
    return pyad.load(path), images, what  # load once, as a service does at start-up


def _serve(det, images, workers: int) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        scores = list(pool.map(lambda im: det.predict([im], maps="full").scores[0], images))
    return time.perf_counter() - t0, np.asarray(scores)


@pytest.mark.parametrize("config", ["1 thread, default threads", "8 threads, default threads",
                                    "8 threads, set_threads(1)"])
def test_service(benchmark, service, config):
    det, images, what = service
    workers = 1 if config.startswith("1 ") else 8
    before = torch.get_num_threads()
    if "set_threads(1)" in config:
        pyad.set_threads(1)
    try:
        _serve(det, images[:8], workers)  # warm-up: networks and indexes built on first use
        benchmark.group = f"service: {what}, {len(images)} requests"
        seconds, scores = benchmark.pedantic(_serve, (det, images, workers), rounds=3, iterations=1)
    finally:
        pyad.set_threads(before)
    best = benchmark.stats.stats.min
    RESULTS[config] = {"images_per_s": len(images) / best, "ms_per_request_wall": best / len(images) * 1e3,
                       "scores": scores}
    if "1 thread, default threads" in RESULTS:  # concurrent predict is exact
        np.testing.assert_allclose(scores, RESULTS["1 thread, default threads"]["scores"], rtol=1e-5, atol=1e-6)


def test_report(service):
    if len(RESULTS) < 3:
        pytest.skip("run the whole file")
    det, images, what = service
    rows = {k: {q: round(v, 2) for q, v in r.items() if q != "scores"} for k, r in RESULTS.items()}
    out = {"what": what, "requests": len(images), "cores": os.cpu_count(), "info": pyad.info(), "rows": rows}
    print(json.dumps(out, indent=1))
    OUT.mkdir(exist_ok=True)
    (OUT / "service.json").write_text(json.dumps(out, indent=1) + "\n")
