"""fp32 vs int8 for one detector on MVTec AD bottle, in one process, printing one
JSON line: the torch model (fp32), its ONNX export under ONNX Runtime (fp32) and
the static int8 model (``det.quantize``: ONNX Runtime QDQ, per-channel int8
weights, uint8 activations, calibrated on the bottle *training* images), each
scored on the 83 test images:

- image / pixel AUROC and ΔAUROC int8 − fp32 (against the torch model and the
  fp32 ONNX model), Spearman ρ of the image scores int8 vs fp32;
- per-stage latency (Baßler, KIT thesis §3.4: batch 1, 3 warm-up and 5 timed runs
  per image, resizing excluded, the first ``--latency-images`` test images): the
  three variants interleaved, ``--rounds`` times, the best round per variant kept
  (a shared, loaded machine: see docs/deployment.md);
- sizes: the .pyad file (backbone weights included), the fp32 and int8 ONNX files,
  the weights per stage, the learnt state (memory bank, Gaussians).

    python bench/int8_bottle.py PatchCore --params '{"backbone": "mobilenet_v2",
        "weights": "/work/shared/weights/mobilenet_v2_imagenet_from_tflite.pth"}'

``--model FILE`` starts from a fitted .pyad instead of fitting (``--save FILE``
keeps the fitted one); ``--refit off`` quantises without re-learning a frozen-feature
head (to measure what the refit buys). Run by test_bench_int8.py, one process per
detector.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import pyad
from pyad import export as E
from pyad.metrics import image_auroc, pixel_auroc

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("detector")
    ap.add_argument("--params", default="{}", help="JSON of detector parameters")
    ap.add_argument("--model", help="a fitted .pyad to start from (no fit)")
    ap.add_argument("--save", help="save the fitted fp32 model here")
    ap.add_argument("--method", default="minmax", help="int8 calibration method")
    ap.add_argument("--calibration-images", type=int, default=300)
    ap.add_argument("--latency-images", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--refit", choices=("auto", "on", "off"), default="auto",
                    help="re-learn a frozen-feature head on the int8 features (quantize's default: auto)")
    args = ap.parse_args()
    torch.set_num_threads(pyad.info()["threads"])
    params = json.loads(args.params)
    ds = pyad.datasets.mvtec_ad(ROOT)
    out = {"detector": args.detector, "params": params, "threads": torch.get_num_threads(),
           "cpu": pyad.evaluation._cpu_brand(), "isa": pyad.info()["isa"], "load_average_start": os.getloadavg()}

    if args.detector == "DefectClassifier":
        # supervised: the labelled set is bottle's test/ folder, split once, stratified, 60 / 20 / 20
        # (bench/classifier_bottle.py); fit and calibration see the training share only, every
        # figure is on the 17-image test share
        from pyad import classification as C

        split = C.split(ds, test=0.2, validation=0.2, seed=0)
        fit_source, calibration, test_samples = split, [s.path for s in split.train.items], split.dataset().test
        out["split"] = repr(split)
    else:
        fit_source, calibration, test_samples = ds, ds, ds.test  # calibration: the training images
    if args.model:
        det = pyad.load(args.model)
        out["model"] = args.model
    else:
        det = getattr(pyad, args.detector)(**params)
        t0 = time.perf_counter()
        det.fit(fit_source)
        out["fit_s"] = time.perf_counter() - t0
    if args.save:
        det.save(args.save)

    tmp = Path(tempfile.mkdtemp(prefix="pyad_int8_"))
    t0 = time.perf_counter()
    det.export(tmp / "fp32.onnx")
    out["export_s"] = time.perf_counter() - t0
    fp32 = pyad.load(tmp / "fp32.onnx")
    t0 = time.perf_counter()
    refit = {"auto": None, "on": True, "off": False}[args.refit]
    source = det if refit is not False else fp32  # a refit needs the torch detector
    int8 = source.quantize(calibration, method=args.method, max_images=args.calibration_images, refit=refit)
    out["quantize_s"] = time.perf_counter() - t0
    int8.save(tmp / "int8.onnx")
    out["quantization"] = int8.quantization_
    out["stages"] = fp32.stages_

    try:  # the frozen backbone's weights too, where there is one (a trained network is always saved)
        det.save(tmp / "model.pyad", include_weights=True)
    except ValueError:
        det.save(tmp / "model.pyad")
    out["bytes"] = {"pyad": (tmp / "model.pyad").stat().st_size, "onnx_fp32": (tmp / "fp32.onnx").stat().st_size,
                    "onnx_int8": (tmp / "int8.onnx").stat().st_size,
                    "weights_per_stage_fp32": fp32.footprint()["weights_bytes_per_stage"],
                    "weights_per_stage_int8": int8.footprint()["weights_bytes_per_stage"],
                    "state": fp32.footprint()["state"]}

    test = [s.path for s in test_samples]
    labels = np.array([s.label for s in test_samples], bool)
    masks = None
    variants = {"torch_fp32": det, "onnx_fp32": fp32, "onnx_int8": int8}
    scores = {}
    for name, d in variants.items():
        pred = d.predict(test)
        if masks is None:
            masks = [s.mask(m.shape) for s, m in zip(test_samples, pred.maps)]
        scores[name] = pred.scores
        out[name] = {"image_auroc": image_auroc(labels, pred.scores), "pixel_auroc": pixel_auroc(masks, pred.maps)}
        del pred
    for ref in ("torch_fp32", "onnx_fp32"):
        out[f"delta_vs_{ref}"] = {k: out["onnx_int8"][k] - out[ref][k] for k in ("image_auroc", "pixel_auroc")}
        out[f"spearman_vs_{ref}"] = spearman(scores["onnx_int8"], scores[ref])
    out["spearman_onnx_fp32_vs_torch"] = spearman(scores["onnx_fp32"], scores["torch_fp32"])

    images = [np.asarray(Image.open(p).convert("RGB")) for p in test[: args.latency_images]]
    best: dict[str, dict] = {}
    for _ in range(args.rounds):  # interleaved: each variant sees the same machine load
        for name, d in variants.items():
            d.set_params(batch_size=1)
            lat = pyad.latency(d, images, warmup=3, runs=5, batch_sizes=(1,), max_images=len(images))
            st = {k: v for k, v in lat.stage_ms().items() if k not in ("read",)}
            st["total"] = lat.mean_ms
            if name not in best or st["total"] < best[name]["total"]:
                best[name] = st
    out["latency_ms"] = best
    for ref in ("torch_fp32", "onnx_fp32"):
        out[f"speedup_vs_{ref}"] = {k: best[ref][k] / best["onnx_int8"][k]
                                    for k in best["onnx_int8"] if k in best[ref] and best["onnx_int8"][k] > 0}
    out["load_average_end"] = os.getloadavg()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
