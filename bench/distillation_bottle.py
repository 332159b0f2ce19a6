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

import json
import sys

import numpy as np

import pyad
import bottle_cli


def main() -> None:
    ap = bottle_cli.parser(__doc__)
    ap.add_argument("detector")
    args = ap.parse_args()
    params = bottle_cli.params(args)
    det, ds, fit_s = bottle_cli.fit_or_load(args, lambda: getattr(pyad, args.detector)(**params))
    out = {"detector": args.detector, "params": json.loads(args.params), "timing": getattr(det, "timing_", None),
           **bottle_cli.scores(det, ds, args, fit_s)}
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
    out["history"] = getattr(det, "history_", [])
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
