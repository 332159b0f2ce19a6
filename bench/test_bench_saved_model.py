"""How to benchmark a saved pyad model inside your own pytest-benchmark suite
(the pattern the README shows): a fixture loads the model once, each benchmark
times ``predict`` on decoded images with the seed-003 protocol (3 warm-up
rounds, 5 timed). Set PYAD_MODEL / PYAD_IMAGES to your own model file and
image folder; without them a small model is fitted on synthetic data.

    pytest bench/test_bench_saved_model.py --benchmark-json=run1.json
    pytest-benchmark compare run1.json run2.json
"""

import os

import pytest

import pyad
from pyad.images import iter_images


@pytest.fixture(scope="module")
def model_and_images(tmp_path_factory):
    if os.environ.get("PYAD_MODEL"):
        det = pyad.load(os.environ["PYAD_MODEL"])
        images = list(iter_images(os.environ["PYAD_IMAGES"]))[:8]
    else:
        root = tmp_path_factory.mktemp("data")
        ds = pyad.datasets.synthetic(root, kinds=("object",), n_train=20, n_good=4, n_defect=2)[0]
        path = root / "object.pyad"
        pyad.PatchCore(backbone="resnet18", weights=None, coreset_ratio=0.1).fit(ds).save(path)
        det = pyad.load(path)  # load once: what a service does at start-up
        images = [s.image for s in ds.test]
    return det, images


@pytest.mark.parametrize("batch", [1, 8])
def test_predict(benchmark, model_and_images, batch):
    det, images = model_and_images
    batch_images = (images * 8)[:batch]
    benchmark.group = f"saved model, batch {batch}"
    pred = benchmark.pedantic(det.predict, (batch_images,), rounds=5, warmup_rounds=3, iterations=1)
    assert pred.scores.shape == (batch,)
    stages = {}
    det.predict(batch_images, stage_times=stages)
    benchmark.extra_info["stages_ms"] = {k: v * 1e3 for k, v in stages.items()}
