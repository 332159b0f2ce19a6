"""Real data: MVTec AD bottle (skipped when ../shared/data is absent), with the
real ImageNet MobileNetV2 checkpoint and with random-init weights (seed 0).
The AUROCs are printed at the end of the run."""

from pathlib import Path

import pytest

import pyad

SHARED = Path(__file__).resolve().parents[2] / "shared"
ROOT = SHARED / "data" / "mvtec_ad" / "bottle"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_from_tflite.pth"
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
    RESULTS[key] = {"image AUROC": r.image_auroc, "pixel AUROC": r.pixel_auroc, "AUPRO": r.aupro, "F1-max": r.f1_max}
    return r.image_auroc, r.pixel_auroc


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="shared MobileNetV2 checkpoint absent")
@pytest.mark.parametrize("name", ["PatchCore", "PaDiM"])
def test_real_checkpoint_separates_defects(bottle, name):
    det = getattr(pyad, name)(backbone="mobilenet_v2", weights=WEIGHTS)
    image, pixel = run(det, bottle, f"{name} mobilenet_v2 (ImageNet)")
    assert image >= 0.95 and pixel >= 0.93


@pytest.mark.parametrize("name", ["PatchCore", "PaDiM"])
def test_random_init_runs_end_to_end(bottle, name):
    det = getattr(pyad, name)(backbone="resnet18", weights=None, seed=0)
    image, pixel = run(det, bottle, f"{name} resnet18 (random init, seed 0)")
    assert 0.0 <= image <= 1.0 and 0.0 <= pixel <= 1.0


def pytest_terminal_summary_lines():
    return [f"{k:42s} " + "  ".join(f"{m} {v:.4f}" for m, v in r.items()) for k, r in RESULTS.items()]
