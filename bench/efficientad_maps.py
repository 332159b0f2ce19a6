"""Where a fitted EfficientAD's pixel AUROC comes from: the ST and AE halves of the map
alone and combined, over the whole 256² map and over the interior (the unpadded PDN's
output; the border is the reference's zero padding), on the category's test images at
the network resolution (masks resized to S×S, nearest). One JSON line.

    python bench/efficientad_maps.py MODEL.pyad [--category bottle]

Used for the diagnosis in docs/detectors/efficientad.md."""

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import pyad
from pyad import metrics
from pyad.ops import upsample
from bottle_cli import ROOT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--category", default="bottle")
    args = ap.parse_args()
    det = pyad.load(args.model)
    ds = pyad.datasets.mvtec_ad(ROOT, args.category)
    module = det.inference_module()
    s = det.preprocessing.size
    lo, hi = module.pad
    a, b, c = (float(v) for v in module.coef)
    parts = {"st": [], "ae": [], "combined": []}
    masks, labels = [], []
    for sample in ds.test:
        x = det.preprocessing([sample.image])
        with torch.inference_mode():
            st, ae = module(x, raw=True)
        for name, m in (("st", a * st + c / 2), ("ae", b * ae + c / 2), ("combined", a * st + b * ae + c)):
            m = F.pad(m, (lo, hi, lo, hi))
            parts[name].append(upsample(m, s)[0])  # as the module's forward: pad, then upsample
        mask = sample.mask()
        masks.append(np.asarray(Image.fromarray(mask).resize((s, s), Image.NEAREST)))
        labels.append(sample.label)
    masks = np.stack(masks)
    inner = np.zeros((s, s), bool)
    k = int(round(s * (lo + 1) / (st.shape[-1] + lo + hi)))  # interpolated border of the zero padding
    inner[k:s - k, k:s - k] = True
    out = {"model": args.model, "category": args.category, "interior_px": int(inner.sum()), "border_px": k}
    for name, maps in parts.items():
        maps = torch.stack(maps).numpy()
        out[name] = {"image_auroc": metrics.image_auroc(labels, maps.reshape(len(maps), -1).max(1)),
                     "pixel_auroc": metrics.pixel_auroc(masks, maps),
                     "pixel_auroc_interior": metrics.pixel_auroc(masks[:, inner][..., None], maps[:, inner][..., None]),
                     "image_auroc_interior": metrics.image_auroc(labels, maps[:, inner].max(1))}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
