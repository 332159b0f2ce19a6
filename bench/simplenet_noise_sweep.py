"""Choose SimpleNet's noise σ for a backbone on validation images only: for each σ,
fit on the category's training images with select="synthetic" and report the image
and pixel AUROC on the normal validation images plus their synthetic-anomaly copies
(no test image is read). σ = 0.015 is the official value for Wide-ResNet-50-2
features; the right σ scales with the features' spread, which this prints too.
The patch features are extracted once and shared by all σ (they do not depend on it).

    python bench/simplenet_noise_sweep.py --sigmas 0.015,0.05,0.15 --epochs 4 --params '{"backbone":
        "mobilenet_v2", "weights": "/work/shared/weights/mobilenet_v2_imagenet_from_tflite.pth",
        "image_size": 256, "crop_size": null, "embed_dim": 384, "target_dim": 384}'
"""

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import pyad
from pyad.detectors import simplenet as sn

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="{}")
    ap.add_argument("--sigmas", default="0.015,0.05,0.15")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    pyad.set_threads(args.threads or pyad.info()["threads"])
    ds = pyad.datasets.mvtec_ad(ROOT, args.category)
    memo: dict = {}
    real = sn.SimpleNet._features

    def cached(self, embed, images):
        key = hashlib.sha256(images.numpy().tobytes()).hexdigest()
        if key not in memo:
            memo[key] = real(self, embed, images)
        return memo[key]

    sn.SimpleNet._features = cached
    for sigma in (float(s) for s in args.sigmas.split(",")):
        det = pyad.SimpleNet(**json.loads(args.params), noise_std=sigma, max_epochs=args.epochs, select="synthetic",
                             select_every=args.epochs)
        t0 = time.perf_counter()
        det.fit(ds)
        feats = next(iter(memo.values()))
        spread = float(feats.reshape(-1, feats.shape[-1]).std(0).median())
        print(json.dumps({"noise_std": sigma, "epochs": args.epochs, "fit_s": round(time.perf_counter() - t0, 1),
                          "feature_channel_std_median": spread, "sigma_over_spread": sigma / spread,
                          "validation": det.selection_, "loss": det.history_[-1]}))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
