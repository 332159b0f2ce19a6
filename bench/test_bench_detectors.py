"""Detectors on MVTec AD bottle (image size 256, random-init weights, seed 0)
against anomalib 2.7.0 on this same 2-core machine.

The anomalib figures are the ones measured here and quoted in issue 4 (its
separate CUDA-torch environment was not re-run by this benchmark):
PaDiM ResNet-18 fits in 57 s, tests at 313 ms per image, 2.2 GB peak RSS;
PatchCore Wide-ResNet-50-2 with a 1% coreset fits in 1,113 s, tests at 884 ms
per image, 4.0 GB peak RSS; at 10% its coreset step alone takes about 76 min.

Each configuration runs in its own process (bench/run_detector.py) so that
its peak RSS is its own. Targets: PatchCore fit >= 10x (1%) and >= 20x (10%),
predict >= 2x with the nearest-neighbour search below a third of it, peak
memory <= half; PaDiM fit >= 5x, predict >= 3x, memory <= half."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import RESULTS, save

HERE = Path(__file__).parent
ROOT = HERE.parents[1] / "shared" / "data" / "mvtec_ad" / "bottle"
pytestmark = pytest.mark.skipif(not ROOT.is_dir(), reason="MVTec AD bottle not present")

ANOMALIB = {
    "PaDiM-resnet18": {"fit_s": 57.0, "predict_ms_per_image": 313.0, "peak_rss_gb": 2.2},
    "PatchCore-wrn50-1%": {"fit_s": 1113.0, "predict_ms_per_image": 884.0, "peak_rss_gb": 4.0},
    # 1% fit plus the extra coreset time at 10% (about 76 min)
    "PatchCore-wrn50-10%": {"fit_s": 1113.0 + 76 * 60, "predict_ms_per_image": float("nan"), "peak_rss_gb": 4.0},
}
CONFIGS = {
    "PaDiM-resnet18": ("PaDiM", {"backbone": "resnet18"}),
    "PatchCore-wrn50-1%": ("PatchCore", {"backbone": "wide_resnet50_2", "coreset_ratio": 0.01}),
    "PatchCore-wrn50-10%": ("PatchCore", {"backbone": "wide_resnet50_2", "coreset_ratio": 0.1}),
}
# anomalib's test time was measured for the 1% model only, so the predict
# target applies there; the 10% row reports its latency without a target.
TARGETS = {
    "PaDiM-resnet18": {"fit": 5, "predict": 3, "memory": 0.5},
    "PatchCore-wrn50-1%": {"fit": 10, "predict": 2, "memory": 0.5},
    "PatchCore-wrn50-10%": {"fit": 20, "predict": None, "memory": 0.5},
}


@pytest.mark.parametrize("key", list(CONFIGS))
def test_detector(key):
    name, params = CONFIGS[key]
    params = {"weights": None, "image_size": 256, "crop_size": None, "seed": 0, **params}
    proc = subprocess.run(
        [sys.executable, str(HERE / "run_detector.py"), name, "--params", json.dumps(params)],
        capture_output=True, text=True, timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    RESULTS.setdefault("detectors", {})[key] = json.loads(proc.stdout.strip().splitlines()[-1])


def test_summary():
    rows, misses = {}, []
    for key, r in RESULTS.get("detectors", {}).items():
        ref, want = ANOMALIB[key], TARGETS[key]
        row = {
            **r,
            "fit_speedup": ref["fit_s"] / r["fit_s"],
            "predict_speedup": ref["predict_ms_per_image"] / r["predict_ms_per_image"],
            "memory_ratio": r["peak_rss_gb"] / ref["peak_rss_gb"],
        }
        rows[key] = row
        checks = [("fit", row["fit_speedup"] >= want["fit"]), ("memory", row["memory_ratio"] <= want["memory"])]
        if want["predict"]:
            checks.append(("predict", row["predict_speedup"] >= want["predict"]))
        if key == "PatchCore-wrn50-1%":
            stage = r["stage_ms"]
            checks.append(("search < 1/3 of predict", stage["search"] < sum(stage.values()) / 3))
        for what, ok in checks:
            print(f"{'met ' if ok else 'MISS'} {key} {what}")
            if not ok:
                misses.append(f"{key} {what}")
    save("detectors", rows)
    print(json.dumps(rows, indent=1))
    assert not misses, misses
