"""pyad.DefectClassifier on MVTec AD bottle: classification (accuracy, per-class
precision / recall / F1, confusion matrix) and the anomaly metrics of its score
1 - P(good) and Grad-CAM map (image / pixel AUROC, AUPRO, F1) on a held-out
stratified test share, training time and per-stage latency.

    nice -n 10 python bench/classifier_bottle.py --backbone efficientnet_lite0 --weights imagenet

The labelled set is the category's test/ folder (the only defect images MVTec AD
has), split once, stratified, into train / validation / test = 60 / 20 / 20 %
(seed 0): the classifier never sees the test share, and every figure here is on
it (17 images: 4 good, 4 broken_large, 5 broken_small, 4 contamination).
Writes bench/results/classifier_bottle_<backbone>.json and, in --out, the
confusion matrix picture and the evaluation folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import pyad
from pyad import classification as C

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"
OUT = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--params", default="{}", help="JSON of other DefectClassifier parameters")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="/tmp/pyad-classifier-bottle")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    split = C.split(pyad.datasets.mvtec_ad(ROOT), test=0.2, validation=0.2, seed=0)
    print(split)
    det = pyad.DefectClassifier(backbone=args.backbone, weights=None if args.weights == "none" else args.weights,
                                max_epochs=args.epochs, early_stopping_patience=args.patience,
                                **json.loads(args.params))
    t0 = time.perf_counter()
    det.fit(split)
    fit_s = time.perf_counter() - t0
    print(f"fit {fit_s:.0f} s; {det.threshold_rule_}")
    report = pyad.evaluate(det, split.dataset(), out=args.out)  # anomaly metrics + the classification hook
    r = report["bottle"]
    cls = C.evaluate(det, split.test)
    print(cls.to_markdown())
    print(report.to_markdown())
    lat = pyad.latency(det, split.test.items[:10], batch_sizes=(1, 8))
    print(lat.to_markdown())
    result = {
        "params": {k: pyad.detectors.base._jsonable(v) for k, v in det.get_params().items()},
        "split": repr(split), "fit_s": fit_s, "history": det.history_, "classification": cls.to_dict(),
        "image_auroc": r.image_auroc, "pixel_auroc": r.pixel_auroc, "aupro": r.aupro, "f1_max": r.f1_max,
        "precision": r.precision, "recall": r.recall, "f1": r.f1, "threshold": r.threshold,
        "threshold_rule": r.threshold_rule, "latency_ms": lat.mean_ms, "stage_ms": lat.stage_ms(),
        "throughput": lat.throughput, "torch_threads": torch.get_num_threads(),
    }
    OUT.mkdir(exist_ok=True)
    (OUT / f"classifier_bottle_{args.backbone}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
