"""What the held-out threshold costs a fit: PaDiM ResNet-18 and PatchCore WRN50-2 (1%)
on MVTec AD bottle (random init, 256 px, no crop, seed 0) fitted with the default
validation share (0.1: thresholds from 21 held-out normal images, without fitting
twice) and with validation=0 (no threshold).

    python bench/threshold_cost.py        # prints seconds per configuration as JSON

Measured 2026-12-02 (2 idle cores): PaDiM 11.8 s vs 10.4 s, PatchCore 1% 44.1 s vs 41.1 s.
"""

import json
import time
from pathlib import Path

import pyad

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad"


def main() -> None:
    ds = pyad.datasets.mvtec_ad(ROOT, "bottle")
    out = {}
    for name, kw in [("PaDiM", dict(backbone="resnet18")),
                     ("PatchCore", dict(backbone="wide_resnet50_2", coreset_ratio=0.01))]:
        for val in (0.1, 0.0):
            det = getattr(pyad, name)(weights=None, image_size=256, crop_size=None, seed=0, validation=val, **kw)
            t0 = time.perf_counter()
            det.fit(ds)
            out[f"{name} validation={val}"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
