"""pyad EfficientAD training throughput, measured as bench/anomalib_ref/efficientad.py
measures anomalib's: ``fit`` on the category's training images with ``max_steps``
steps (batch 1), the end of every step stamped; steady state = (n − 1) steps over
the time from the end of step 1 to the end of step n (start-up, i.e. decoding the
images and the teacher statistics, and the first step excluded). Prints one JSON line.

    python bench/efficientad_train.py --model-size s --steps 12 --penalty /work/shared/data/imagenet_samples
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import pyad
from pyad import training

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad"


def vm_hwm_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-size", choices=("s", "m"), default="s")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--penalty", help="penalty image folder (anomalib always uses one)")
    ap.add_argument("--teacher", default="random")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--amp", help="autocast dtype for training: bf16 (a deviation; default float32 as the reference)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    stamps: list[float] = []
    real = training.Run.backward

    def stamped(self, *a, **k):
        real(self, *a, **k)
        stamps.append(time.perf_counter())

    training.Run.backward = stamped
    det = pyad.EfficientAD(model_size=args.model_size, teacher=args.teacher, penalty_images=args.penalty,
                           image_size=args.image_size, max_steps=args.steps, seed=args.seed, amp=args.amp)
    ds = pyad.datasets.mvtec_ad(ROOT, args.category)
    t0 = time.perf_counter()
    det.fit(ds)
    fit_s = time.perf_counter() - t0
    n = len(stamps)
    out = {"runner": "bench/efficientad_train.py", "model_size": args.model_size, "image_size": args.image_size,
           "threads": torch.get_num_threads(), "penalty": args.penalty, "teacher": args.teacher, "amp": args.amp,
           "train": {"max_steps": args.steps, "train_steps_done": n, "fit_wall_s": round(fit_s, 2)},
           "peak_rss_gb": round(vm_hwm_gb(), 3), "torch": torch.__version__}
    if n >= 2:
        steady = stamps[-1] - stamps[0]
        out["train"].update({"train_s_steady": round(steady, 3), "steps_per_s": round((n - 1) / steady, 4)})
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
