"""Fit and test one detector on MVTec AD bottle in this process and print JSON:
fit seconds, predict ms per image (all 83 test images, batched), per-stage
latency (Baßler, KIT master's thesis §3.4: batch 1, 3 warm-up and 5 timed runs per image, mean per
image, on the first ``--stage-images`` test images), image/pixel AUROC and the
peak resident memory of the process during fit and predict (read before the
metrics, whose full-resolution pixel AUROC needs memory of its own). Run by test_bench_detectors.py, one
process per configuration so each peak RSS is its own."""

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import pyad
from pyad.metrics import image_auroc, pixel_auroc

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"


def peak_rss() -> float:
    """Bytes: this process image's high-water mark (VmHWM). Not ru_maxrss, which
    Linux carries across exec from the parent: a large pytest parent would set
    the floor (measured: every child reported the parent's 1.36 GB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("detector")
    ap.add_argument("--params", default="{}", help="JSON of detector parameters")
    ap.add_argument("--stage-images", type=int, default=5)
    ap.add_argument("--scores", action="store_true", help="also print the test images' scores")
    args = ap.parse_args()
    torch.set_num_threads(pyad.info()["threads"])
    det = getattr(pyad, args.detector)(**json.loads(args.params))
    test = sorted((ROOT / "test").glob("*/*.png"))
    labels = np.array([p.parent.name != "good" for p in test])

    t0 = time.perf_counter()
    det.fit(ROOT / "train" / "good")
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = det.predict(test)
    predict_ms = (time.perf_counter() - t0) / len(test) * 1e3
    peak_rss_gb = peak_rss() / 2**30  # fit + predict only (GiB here; GB in the output)

    masks = [np.asarray(Image.open(ROOT / "ground_truth" / p.parent.name / f"{p.stem}_mask.png")) > 0
             if bad else np.zeros((900, 900), bool) for p, bad in zip(test, labels)]
    out = {
        "detector": args.detector,
        "params": json.loads(args.params),
        "fit_s": fit_s,
        "predict_ms_per_image": predict_ms,
        "image_auroc": image_auroc(labels, pred.scores),
        "pixel_auroc": pixel_auroc(masks, pred.maps),
    }
    if args.scores:
        out["scores"] = [float(v) for v in pred.scores]
    det.set_params(batch_size=1)
    images = [np.asarray(Image.open(p).convert("RGB")) for p in test[: args.stage_images]]
    stages: dict[str, float] = {}
    for img in images:
        for _ in range(3):
            det.predict([img])
        per: dict[str, float] = {}
        for _ in range(5):
            det.predict([img], stage_times=per)
        for k, v in per.items():
            stages[k] = stages.get(k, 0.0) + v / 5 / len(images) * 1e3
    out["stage_ms"] = stages
    out["peak_rss_gb"] = peak_rss_gb * 2**30 / 1e9  # GB, as the anomalib runner reports
    print(json.dumps(out))


if __name__ == "__main__":
    main()
