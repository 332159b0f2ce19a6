"""Fit AST or Uninformed Students on MVTec AD bottle and print one JSON line: fit
seconds and the detector's own per-phase timing (``timing_``: seconds per epoch),
image / pixel AUROC, AUPRO, F1-max, F1 at the validation threshold, per-stage
latency (``pyad.latency``: batch 1, 3 warm-up and 5 timed runs per image on the first
``--latency-images`` test images; throughput at batch 1 and 8) and the history.

    nice -n 10 python bench/distillation_bottle.py AST --params '{"backbone": "mobilenet_v2",
        "weights": "/work/shared/weights/mobilenet_v2_imagenet_from_tflite.pth", "layers": ["layer4"],
        "image_size": 512, "teacher_hidden": 64, "student_hidden": 256, "max_epochs": 12}'

Used for the figures in docs/detectors/ast.md and docs/detectors/uninformed_students.md.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import pyad

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("detector")
    ap.add_argument("--params", default="{}", help="JSON of detector parameters")
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--latency-images", type=int, default=3)
    ap.add_argument("--checkpoint", help="resumable training checkpoint")
    ap.add_argument("--save", help="save the fitted model here")
    ap.add_argument("--load", help="evaluate a saved model instead of fitting")
    ap.add_argument("--threads", type=int, help="torch threads (default: pyad's; 1 is faster on a contended machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or pyad.info()["threads"])
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.params).items()}
    ds = pyad.datasets.mvtec_ad(ROOT, args.category)
    t0 = time.perf_counter()
    if args.load:
        det = pyad.load(args.load)
    else:
        det = getattr(pyad, args.detector)(**params).fit(ds, checkpoint=args.checkpoint)
        if args.save:
            det.save(args.save)
    fit_s = time.perf_counter() - t0
    r = pyad.evaluate(det, ds, pictures=False)[args.category]
    out = {
        "detector": args.detector, "category": args.category, "params": json.loads(args.params),
        "fit_s": round(fit_s, 1), "timing": getattr(det, "timing_", None),
        "image_auroc": r.image_auroc, "pixel_auroc": r.pixel_auroc, "aupro": r.aupro, "f1_max": r.f1_max,
        "f1_at_validation_threshold": r.f1, "threshold_rule": det.threshold_rule_,
        "predict_ms_per_image": r.predict_ms, "threads": torch.get_num_threads(),
    }
    if args.detector == "AST":  # the other image score from the same maps ("mean over maps")
        other = "mean" if det.score == "max" else "max"
        alt = pyad.clone(det, score=other)
        for k in ("networks_", "n_train_", "weights_id_", "weights_source_", "threshold_", "pixel_threshold_",
                  "threshold_rule_", "map_range_"):
            setattr(alt, k, getattr(det, k))
        alt._cache.update({k: v for k, v in det._cache.items() if k != "module"})
        labels = np.array([s.label for s in ds.test])
        scores = alt.predict(ds.test, maps="none").scores
        out[f"image_auroc_score_{other}"] = pyad.metrics.image_auroc(labels, scores)
    lat = pyad.latency(det, ds, batch_sizes=(1, 8), max_images=args.latency_images)
    out.update({"latency_ms": lat.mean_ms, "stage_ms": lat.stage_ms(), "throughput_images_per_s": lat.throughput})
    out["history"] = getattr(det, "history_", [])
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
