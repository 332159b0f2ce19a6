"""pyad GANomaly training throughput, measured as bench/anomalib_ref/ganomaly.py
measures anomalib's: ``fit`` on the category's training images with ``max_steps``
batches (batch 32, anomalib's config), the end of every batch (its discriminator
step) stamped; steady state = (n − 1) batches over the time from the end of batch 1
to the end of batch n (start-up, i.e. decoding the images, and the first batch
excluded). Prints one JSON line.

    python bench/ganomaly_train.py --steps 4 --image-size 256
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
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    stamps: list[float] = []
    images: list[int] = []
    real = training.Run.backward

    def stamped(self, loss, *opts):
        real(self, loss, *opts)
        if opts == ("d",):  # the batch's last update
            stamps.append(time.perf_counter())

    training.Run.backward = stamped
    det = pyad.GANomaly(image_size=args.image_size, batch_size=args.batch_size, max_steps=args.steps, seed=args.seed)
    ds = pyad.datasets.mvtec_ad(ROOT, args.category)
    t0 = time.perf_counter()
    det.fit(ds)
    fit_s = time.perf_counter() - t0
    n = len(stamps)
    out = {"runner": "bench/ganomaly_train.py", "image_size": args.image_size, "threads": torch.get_num_threads(),
           "train_batch_size": args.batch_size,
           "train": {"batches": args.steps, "train_steps_done": n, "fit_wall_s": round(fit_s, 2)},
           "peak_rss_gb": round(vm_hwm_gb(), 3), "torch": torch.__version__}
    if n >= 2:
        steady = stamps[-1] - stamps[0]
        out["train"].update({"train_s_steady": round(steady, 3), "batches_per_s": round((n - 1) / steady, 4),
                             "images_per_s": round((n - 1) * args.batch_size / steady, 3)})
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
