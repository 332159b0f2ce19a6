"""The reconstruction detectors (AutoEncoder, VAE) on MVTec AD bottle, with a
stated CPU training budget, and the measurement behind their image-score default.

    nice -n 10 python bench/reconstruction_bottle.py autoencoder --epochs 8 --checkpoint /tmp/ae.ckpt
    nice -n 10 python bench/reconstruction_bottle.py vae --epochs 30 --checkpoint /tmp/vae.ckpt

1. Fit on train/good (the detector holds out its seeded 10% validation share;
   early stopping and thresholds use those normal images only). ``--checkpoint``
   makes the fit resumable: run again with more ``--epochs`` to continue.
2. Score choice, on the validation images only: every validation image, and
   synthetic anomalies made from it (``pyad.datasets.add_anomaly``, "perlin" and
   "cutpaste", ``--synthetic`` each, seeded), are scored by every image-score
   variant (mean / top-k mean of the squared-error map, blurred or not; for the
   VAE also the per-image negative ELBO at z = mu); the AUROC of normal vs
   synthetic separates them. The test-set AUROC of each variant is printed too,
   for information only: nothing is chosen on it.
3. ``pyad.evaluate`` of the detector as configured (its own defaults) on the test
   images, and ``pyad.latency`` (3 warm-up, 5 timed runs per image, batch 1) on
   ten test images.
Writes bench/results/<name>_bottle.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import pyad
from pyad import images as imgs
from pyad.datasets import add_anomaly
from pyad.detectors.autoencoder import image_score, to_grey
from pyad.detectors.vae import kl_divergence, reconstruction_error
from pyad.metrics import image_auroc
from pyad.ops import gaussian_blur

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"
OUT = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def variant_scores(det, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Image scores of every variant for images [H, W, 3] uint8, from one
    reconstruction each (the same functions the inference modules run)."""
    pre = det.preprocessing
    net = det.networks_["ae" if det.name == "autoencoder" else "vae"].eval()
    out: dict[str, list] = {}
    for start in range(0, len(arrays), 8):
        x = pre([a for a in arrays[start : start + 8]])
        x = to_grey(x) if det.grey else x
        if det.name == "vae":
            recon, mu, logvar = net(x)
            elbo = reconstruction_error(recon, x, det.reconstruction) + det.beta * kl_divergence(mu, logvar)
            out.setdefault("elbo", []).append(elbo)
        else:
            recon = net(x)
        err = (x - recon).square().mean(1)
        for sigma in (0.0, 4.0):
            m = gaussian_blur(err, sigma)
            for how, k in (("mean", 0.01), ("topk", 0.01), ("topk", 0.05)):
                name = f"{how}{'' if how == 'mean' else f' {k:.0%}'}, blur {sigma:g}"
                out.setdefault(name, []).append(image_score(m, how, k))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("detector", choices=["autoencoder", "vae"])
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--synthetic", type=int, default=2, help="synthetic anomalies of each kind per validation image")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--params", default="{}", help="JSON of extra detector parameters")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = pyad.datasets.mvtec_ad(ROOT)
    det = pyad.detectors.REGISTRY[args.detector](max_epochs=args.epochs, **json.loads(args.params))
    t0 = time.perf_counter()
    det.fit(ds, checkpoint=args.checkpoint)
    fit_s = time.perf_counter() - t0
    print(f"fit {fit_s:.0f} s; history: {det.history_}")

    # the detector's own validation images (the same seeded split fit made)
    _, val_items, _ = det._split_validation(imgs.as_items(ds.train), None, None)
    normal = [imgs.read_image(p) for p in val_items]
    rng = np.random.default_rng(0)
    synthetic = [add_anomaly(a, rng, kind)[0] for a in normal for kind in ("perlin", "cutpaste")
                 for _ in range(args.synthetic)]
    sv = variant_scores(det, normal + synthetic)
    y_val = np.r_[np.zeros(len(normal)), np.ones(len(synthetic))]
    test = [s.image for s in ds.test]
    y_test = np.array([s.label for s in ds.test])
    st = variant_scores(det, test)
    table = {k: {"validation_synthetic_auroc": image_auroc(y_val, sv[k]), "test_auroc": image_auroc(y_test, st[k])}
             for k in sv}
    print(f"{'image score':24s} {'val synthetic AUROC':>20s} {'test AUROC (info)':>18s}")
    for k, v in table.items():
        print(f"{k:24s} {v['validation_synthetic_auroc']:20.4f} {v['test_auroc']:18.4f}")

    report = pyad.evaluate(det, ds)
    r = report["bottle"]
    lat = pyad.latency(det, ds.test[:10], batch_sizes=(1, 8))
    print(report.to_markdown())
    print(lat.to_markdown())
    result = {
        "detector": args.detector, "params": {k: pyad.detectors.base._jsonable(v) for k, v in det.get_params().items()},
        "fit_s_this_run": fit_s, "fit_s": det.fit_seconds_, "history": det.history_,
        "n_validation": len(normal), "n_synthetic": len(synthetic), "score_variants": table,
        "image_auroc": r.image_auroc, "pixel_auroc": r.pixel_auroc, "aupro": r.aupro, "f1_max": r.f1_max,
        "precision": r.precision, "recall": r.recall, "f1": r.f1, "threshold": r.threshold,
        "threshold_rule": r.threshold_rule, "predict_ms": r.predict_ms,
        "latency_ms": lat.mean_ms, "stage_ms": lat.stage_ms(), "throughput": lat.throughput,
        "torch_threads": torch.get_num_threads(),
    }
    OUT.mkdir(exist_ok=True)
    (OUT / f"{args.detector}_bottle.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
