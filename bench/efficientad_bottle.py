"""Fit EfficientAD on an MVTec AD category (bottle) and print one JSON line: fit
seconds, image / pixel AUROC, AUPRO, F1-max, F1 at the validation threshold,
per-stage latency (``pyad.latency``: batch 1, 3 warm-up and 5 timed runs per image
on the first ``--latency-images`` test images; throughput at batch 1 and 8), the
teacher / penalty / normalisation records and the loss history.

    nice -n 10 python bench/efficientad_bottle.py --params '{"teacher": "out/efficientad/teacher.pth",
        "image_size": 128, "max_steps": 1000}' --checkpoint out/efficientad/s.ckpt --save out/efficientad/s.pyad

``--teacher-from CKPT --teacher-out PTH`` first writes the PDN of a ``pyad
distill-teacher`` checkpoint (an unfinished distillation) as a teacher file.
Used for the figures in docs/detectors/efficientad.md.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import pyad

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad"


def teacher_from_checkpoint(ckpt: str, out: str) -> int:
    """The PDN of a distill-teacher checkpoint -> a teacher state_dict file; returns its step."""
    from pyad import modelfile

    meta, state = modelfile.read_tree(ckpt)
    torch.save({k: v.contiguous() for k, v in state["modules"]["pdn"].items()}, out)
    return int(state["step"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="{}", help="JSON of EfficientAD parameters")
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--latency-images", type=int, default=3)
    ap.add_argument("--checkpoint", help="resumable training checkpoint")
    ap.add_argument("--save", help="save the fitted model here")
    ap.add_argument("--load", help="evaluate a saved model instead of fitting")
    ap.add_argument("--teacher-from", help="a distill-teacher checkpoint to take the teacher from")
    ap.add_argument("--teacher-out", help="where to write that teacher (then used as params['teacher'])")
    args = ap.parse_args()
    torch.set_num_threads(pyad.info()["threads"])
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.params).items()}
    extra = {}
    if args.teacher_from:
        extra["teacher_distill_step"] = teacher_from_checkpoint(args.teacher_from, args.teacher_out)
        params["teacher"] = args.teacher_out
    ds = pyad.datasets.mvtec_ad(ROOT, args.category)
    t0 = time.perf_counter()
    if args.load:
        det = pyad.load(args.load)
    else:
        det = pyad.EfficientAD(**params).fit(ds, checkpoint=args.checkpoint)
        if args.save:
            det.save(args.save)
    fit_s = time.perf_counter() - t0
    r = pyad.evaluate(det, ds, pictures=False)[args.category]
    lat = pyad.latency(det, ds, batch_sizes=(1, 8), max_images=args.latency_images)
    out = {
        "detector": "EfficientAD", "category": args.category, "params": {k: str(v) for k, v in det.get_params().items()},
        "fit_s": round(fit_s, 1), "image_auroc": r.image_auroc, "pixel_auroc": r.pixel_auroc, "aupro": r.aupro,
        "f1_max": r.f1_max, "f1_at_validation_threshold": r.f1, "threshold": det.threshold_,
        "threshold_rule": det.threshold_rule_, "predict_ms_per_image": r.predict_ms, "latency_ms": lat.mean_ms,
        "stage_ms": lat.stage_ms(), "throughput_images_per_s": lat.throughput, "threads": torch.get_num_threads(),
        "teacher_source": det.teacher_source_, "penalty_source": det.penalty_source_,
        "map_normalisation": det.map_normalisation_, "quantiles": det.quantiles_, "steps_done": det.steps_done_,
        **extra, "history": det.history_,
    }
    print(json.dumps(out, default=str))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
