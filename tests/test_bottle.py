"""Real data: MVTec AD bottle (skipped when ../shared/data is absent), with the
real ImageNet MobileNetV2 checkpoint and with random-init weights (seed 0).
The AUROCs are printed at the end of the run."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pyad
from pyad.metrics import image_auroc, pixel_auroc

SHARED = Path(__file__).resolve().parents[2] / "shared"
ROOT = SHARED / "data" / "mvtec_ad" / "bottle"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_from_tflite.pth"
pytestmark = pytest.mark.skipif(not ROOT.is_dir(), reason="MVTec AD bottle not present")

RESULTS: dict[str, tuple[float, float]] = {}


@pytest.fixture(scope="module")
def bottle():
    test = sorted((ROOT / "test").glob("*/*.png"))
    labels = np.array([p.parent.name != "good" for p in test])
    masks = [
        np.asarray(Image.open(ROOT / "ground_truth" / p.parent.name / f"{p.stem}_mask.png")) > 0
        if bad else np.zeros((900, 900), bool)
        for p, bad in zip(test, labels)
    ]
    return ROOT / "train" / "good", test, labels, masks


def run(det, bottle, key):
    train, test, labels, masks = bottle
    pred = det.fit(train).predict(test)
    assert pred.maps.shape == (len(test), 900, 900)
    RESULTS[key] = (image_auroc(labels, pred.scores), pixel_auroc(masks, pred.maps))
    return RESULTS[key]


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
    return [f"{k:45s} image AUROC {v[0]:.4f}  pixel AUROC {v[1]:.4f}" for k, v in RESULTS.items()]
