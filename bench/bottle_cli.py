"""The command line the bottle scripts share (bench/distillation_bottle.py,
bench/efficientad_bottle.py): fit a detector on an MVTec AD category, or load a
saved one, and the evaluation and per-stage latency rows they print."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import pyad

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad"


def parser(doc: str) -> argparse.ArgumentParser:
    """--params, --category, --latency-images, --checkpoint, --save, --load, --threads, --pictures,
    --precision."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="{}", help="JSON of detector parameters")
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--latency-images", type=int, default=3)
    ap.add_argument("--checkpoint", help="resumable training checkpoint")
    ap.add_argument("--save", help="save the fitted model here")
    ap.add_argument("--load", help="evaluate a saved model instead of fitting")
    ap.add_argument("--threads", type=int, help="torch threads (default: pyad's; 1 is faster on a contended machine)")
    ap.add_argument("--pictures", help="write pyad.evaluate's report and defect pictures under this folder")
    ap.add_argument("--precision", help="evaluate with this precision (e.g. bfloat16) after fitting or loading")
    return ap


def params(args) -> dict:
    """--params with JSON lists as tuples (layer names, patch sizes)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.params).items()}


def fit_or_load(args, make):
    """(detector, dataset, seconds): ``make()`` fitted on the category's training
    images (saved with --save), or the --load model."""
    torch.set_num_threads(args.threads or pyad.info()["threads"])
    ds = pyad.datasets.mvtec_ad(ROOT, args.category)
    t0 = time.perf_counter()
    if args.load:
        det = pyad.load(args.load)
    else:
        det = make().fit(ds, checkpoint=args.checkpoint)
        if args.save:
            det.save(args.save)
    fit_s = time.perf_counter() - t0
    if args.precision:
        det.set_params(precision=args.precision)
    return det, ds, fit_s


def scores(det, ds, args, fit_s: float) -> dict:
    """Evaluation on the category's test images and per-stage latency (batch 1, 3
    warm-up and 5 timed runs per image on --latency-images test images; throughput
    at batch 1 and 8)."""
    r = pyad.evaluate(det, ds, out=args.pictures, pictures=bool(args.pictures))[args.category]
    lat = pyad.latency(det, ds, batch_sizes=(1, 8), max_images=args.latency_images)
    return {"category": args.category, "fit_s": round(fit_s, 1), "image_auroc": r.image_auroc,
            "pixel_auroc": r.pixel_auroc, "aupro": r.aupro, "f1_max": r.f1_max, "f1_at_validation_threshold": r.f1,
            "threshold": det.threshold_, "threshold_rule": det.threshold_rule_, "predict_ms_per_image": r.predict_ms,
            "latency_ms": lat.mean_ms, "stage_ms": lat.stage_ms(), "throughput_images_per_s": lat.throughput,
            "threads": torch.get_num_threads(), "precision": getattr(det, "precision", None)}
