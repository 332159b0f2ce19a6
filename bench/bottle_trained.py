"""Fit one trained detector on MVTec AD bottle and print one JSON line per budget:
fit seconds, image / pixel AUROC, AUPRO, F1 (F1-max over the test scores, and F1
at the threshold learnt from normal validation images), the training history
(per-epoch losses, SimpleNet's synthetic-validation selection) and, for the last
budget, per-stage latency (``pyad.latency``: batch 1, 3 warm-up and 5 timed runs
per image on the first ``--latency-images`` test images).

``--schedule 4,8,16`` trains to 4 epochs, evaluates, continues the same run (a
checkpoint) to 8, evaluates, ... (a resumed run reaches the same state as a
straight one: tests/test_simplenet.py, tests/test_ganomaly.py); ``fit_s`` is the
cumulative training time. ``--also-last`` (SimpleNet with select="synthetic")
also evaluates the last pass of the same run, read from its checkpoint.

    python bench/bottle_trained.py SimpleNet --schedule 4,8,16 --also-last --params '{
        "backbone": "mobilenet_v2", "weights": "/work/shared/weights/mobilenet_v2_imagenet_from_tflite.pth",
        "image_size": 256, "crop_size": null, "embed_dim": 384, "target_dim": 384, "select": "synthetic"}'

Used for the figures in docs/detectors/simplenet.md and docs/detectors/ganomaly.md.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import pyad

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad"


def measure(det, ds, category: str) -> dict:
    r = pyad.evaluate(det, ds, pictures=False)[category]
    out = {"image_auroc": r.image_auroc, "pixel_auroc": r.pixel_auroc, "aupro": r.aupro, "f1_max": r.f1_max,
           "f1_at_validation_threshold": r.f1, "precision": r.precision, "recall": r.recall,
           "threshold": det.threshold_, "predict_ms_per_image": r.predict_ms}
    for attr in ("selected_epoch_", "selection_", "d_reinits_", "score_min_", "score_max_", "score_stats_"):
        if hasattr(det, attr):
            out[attr.rstrip("_")] = getattr(det, attr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("detector")
    ap.add_argument("--params", default="{}", help="JSON of detector parameters")
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--schedule", help="comma-separated max_epochs budgets, trained as one resumed run")
    ap.add_argument("--also-last", action="store_true", help="also evaluate the last pass (SimpleNet synthetic)")
    ap.add_argument("--latency-images", type=int, default=3)
    ap.add_argument("--checkpoint", help="checkpoint path (default: a temporary file)")
    ap.add_argument("--save", help="save the final model here")
    ap.add_argument("--threads", type=int, help="torch / kernel threads (default: pyad's)")
    args = ap.parse_args()
    pyad.set_threads(args.threads or pyad.info()["threads"])
    params = json.loads(args.params)
    cls = getattr(pyad, args.detector)
    ds = pyad.datasets.mvtec_ad(ROOT, args.category)
    budgets = [int(b) for b in args.schedule.split(",")] if args.schedule else [params.get("max_epochs")]
    ckpt = Path(args.checkpoint or tempfile.mkdtemp(prefix="pyad_bottle_")) / "run.ckpt"
    spent = 0.0
    for i, budget in enumerate(budgets):
        kw = dict(params) if budget is None else {**params, "max_epochs": budget}
        det = cls(**kw)
        t0 = time.perf_counter()
        det.fit(ds, checkpoint=ckpt)
        spent += time.perf_counter() - t0
        out = {"detector": args.detector, "category": args.category, "params": kw, "fit_s": round(spent, 1),
               "threads": torch.get_num_threads(), **measure(det, ds, args.category)}
        if args.also_last:
            last = cls(**{**kw, "select": "last"}).fit(ds, checkpoint=ckpt)  # the same run's last pass
            out["last_pass"] = measure(last, ds, args.category)
        if i == len(budgets) - 1:
            lat = pyad.latency(det, ds, batch_sizes=(1, 8), max_images=args.latency_images)
            out.update(latency_ms=lat.mean_ms, stage_ms=lat.stage_ms(), throughput_images_per_s=lat.throughput,
                       threshold_rule=det.threshold_rule_, history=getattr(det, "history_", []))
            if args.save:
                det.save(args.save)
        print(json.dumps(out))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
