"""PatchCore's nearest-neighbour search on MVTec AD bottle: the exact default (projected
bounds + ``knn_search``, equal to faiss ``IndexFlatL2``) against the approximate
``nn_index="hnsw"`` option (faiss ``IndexHNSWFlat``, M = 32, efSearch 64 as pyad sets it, and
faiss's default 16):
recall@1 of every test patch's nearest neighbour, patch-score error, search time per image
(batch 1, median over the test images) and image / pixel AUROC.

    python bench/search_recall.py [--model fitted.pyad] [--coreset 0.1]

Without ``--model`` it fits PatchCore WRN50-2 (random init, 256 px, no crop, seed 0), as
``test_bench_detectors.py`` does. Writes ``bench/results/search_recall.json``.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import pyad
from pyad.metrics import image_auroc, pixel_auroc

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"
OUT = Path(__file__).resolve().parent / "results" / "search_recall.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="a fitted PatchCore model file (default: fit one)")
    ap.add_argument("--coreset", type=float, default=0.1)
    args = ap.parse_args()
    torch.set_num_threads(pyad.info()["threads"])
    if args.model:
        det = pyad.load(args.model)
    else:
        det = pyad.PatchCore(backbone="wide_resnet50_2", coreset_ratio=args.coreset, weights=None, image_size=256,
                             crop_size=None, seed=0).fit(ROOT / "train" / "good")
    test = sorted((ROOT / "test").glob("*/*.png"))
    labels = np.array([p.parent.name != "good" for p in test])
    masks = [np.asarray(Image.open(ROOT / "ground_truth" / p.parent.name / f"{p.stem}_mask.png")) > 0
             if bad else np.zeros((900, 900), bool) for p, bad in zip(test, labels)]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in test]
    module = det.inference_module()
    with torch.inference_mode():
        queries = [module.embed(det.preprocessing([im])).reshape(-1, module.head.nn.bank.shape[1]) for im in images]
    nn_ = module.head.nn
    rows = {}
    truth = None
    for index, ef in (("flat", None), ("hnsw", 64), ("hnsw", 16)):
        nn_.index, nn_._index = index, None
        built = time.perf_counter()
        faiss_index = nn_.search_index()
        built = time.perf_counter() - built
        if ef is not None:
            faiss_index.hnsw.efSearch = ef
        found, times = [], []
        for q in queries:
            nn_(q)  # warm-up
            t0 = time.perf_counter()
            found.append(nn_(q))
            times.append(time.perf_counter() - t0)
        dist = torch.cat([d[:, 0] for d, _ in found]).numpy()
        idx = torch.cat([i[:, 0] for _, i in found]).numpy()
        if truth is None:
            truth = (dist, idx)
        pred = det.predict(images)
        if index == "flat":
            exact_scores = pred.scores
        name = index if ef is None else f"hnsw (efSearch {ef})"
        rows[name] = {
            "index_build_s": built,
            "search_ms_per_image": float(np.median(times) * 1e3),
            "recall_at_1": float((idx == truth[1]).mean()),
            # an approximate neighbour is farther: its patch score is too high
            "patch_scores_within_1pct": float(np.mean(dist <= truth[0] * 1.01 + 1e-6)),
            "patch_score_excess_mean_rel": float(np.mean(dist - truth[0]) / np.mean(truth[0])),
            "image_score_max_rel_excess": float(np.max(np.abs(pred.scores - exact_scores) / exact_scores)),
            "image_auroc": image_auroc(labels, pred.scores),
            "pixel_auroc": pixel_auroc(masks, pred.maps),
        }
        print(name, json.dumps(rows[name]), flush=True)
    nn_.index, nn_._index = "flat", None
    result = {"bank": list(nn_.bank.shape), "queries_per_image": int(queries[0].shape[0]), "threads": pyad.info()["threads"],
              "rows": rows}
    OUT.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
