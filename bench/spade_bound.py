"""SPADE's predict against its arithmetic bound, on MVTec AD bottle (256 px, no crop).

The pixel search of one image compares each of its Q = h·w feature-pyramid locations
with the G = K·h·w locations of its K = 50 nearest training images, in D dimensions:
2·Q·G·D floating-point operations. The bound is that count at this machine's float32
GEMM rate (torch, 4096², best of 3, measured in the same run): no exact brute-force
search can be faster. pyad's search is the exhaustive ``knn_search`` over the K gallery
images a few at a time (``SPADEHead._maps_cpu``).

    python bench/spade_bound.py                    # MobileNetV2 (5 images) and WRN50-2 (2 images)
    python bench/spade_bound.py --only mobilenet_v2

Fitted with ``validation=0``: only predict is timed (SPADE's held-out scoring costs
one predict per validation image). Prints one JSON object per configuration.
"""

import argparse
import json
import time
from pathlib import Path

import torch

import pyad
from conftest import sgemm_gflops

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1] / "shared" / "data" / "mvtec_ad" / "bottle"
MNV2 = HERE.parents[1] / "shared" / "weights" / "mobilenet_v2_imagenet_from_tflite.pth"
CONFIGS = {
    "mobilenet_v2": (dict(backbone="mobilenet_v2", weights=str(MNV2) if MNV2.is_file() else None), 5),
    "wide_resnet50_2": (dict(backbone="wide_resnet50_2", weights=None), 2),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=list(CONFIGS))
    args = ap.parse_args()
    torch.set_num_threads(pyad.info()["threads"])
    test = sorted((ROOT / "test").glob("*/*.png"))
    for name, (params, n) in CONFIGS.items():
        if args.only and name != args.only:
            continue
        det = pyad.SPADE(image_size=256, crop_size=None, seed=0, validation=0, **params)
        t0 = time.perf_counter()
        det.fit(ROOT / "train" / "good")
        fit_s = time.perf_counter() - t0
        _, h, w, d = det.train_pyramid_.shape
        k = min(det.k_images, len(det.train_pyramid_))
        det.set_params(batch_size=1)
        det.predict(test[:1], maps="none")  # warm-up
        stages: dict[str, float] = {}
        t0 = time.perf_counter()
        for path in test[:n]:
            det.predict([path], stage_times=stages)
        predict_s = (time.perf_counter() - t0) / n
        rate = max(sgemm_gflops(), sgemm_gflops())  # the best of two: a bound must not be pessimistic
        flop = 2 * (h * w) * (k * h * w) * d
        bound_s = flop / (rate * 1e9)
        search_s = stages.get("search", 0.0) / n
        print(json.dumps({
            "backbone": name, "images": n, "fit_s": round(fit_s, 1), "queries": h * w, "gallery": k * h * w,
            "dim": d, "tflop_per_image": flop / 1e12, "sgemm_gflops": round(rate, 1), "bound_s": round(bound_s, 3),
            "search_s": round(search_s, 3), "predict_s": round(predict_s, 3),
            "search_over_bound": round(search_s / bound_s, 3), "predict_over_bound": round(predict_s / bound_s, 3),
            "stages_ms": {s: round(v / n * 1e3, 1) for s, v in stages.items()},
        }), flush=True)
        del det


if __name__ == "__main__":
    main()
