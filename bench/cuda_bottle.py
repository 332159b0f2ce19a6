"""CUDA figures on MVTec AD bottle (run by bench/gpu_check.sh on a GPU machine):
PatchCore and PaDiM with the MobileNetV2 ImageNet weights fitted on the GPU, then
scored in float32 and with ``precision="float16"`` (autocast; distances, blur and
maps stay float32): image / pixel AUROC of each, Spearman ρ of the image scores,
per-stage latency (batch 1, 3 warm-up + 5 timed runs per image, 3 images) and
throughput at batch 32. One JSON line per detector."""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import pyad
from pyad.metrics import image_auroc, pixel_auroc

SHARED = Path(__file__).resolve().parents[2] / "shared"
ROOT = SHARED / "data" / "mvtec_ad" / "bottle"
MNV2 = str(SHARED / "weights" / "mobilenet_v2_imagenet_from_tflite.pth")


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main(names) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ds = pyad.datasets.mvtec_ad(ROOT)
    test = [s.path for s in ds.test]
    labels = np.array([s.label for s in ds.test], bool)
    masks = None
    for name in names:
        det = getattr(pyad, name)(backbone="mobilenet_v2", weights=MNV2, device="cuda")
        t0 = time.perf_counter()
        det.fit(ds)
        out = {"detector": name, "device": torch.cuda.get_device_name(0), "fit_s": time.perf_counter() - t0}
        scores = {}
        for precision in ("float32", "float16"):
            det.set_params(precision=precision, batch_size=8)
            pred = det.predict(test)
            if masks is None:
                masks = [s.mask(m.shape) for s, m in zip(ds.test, pred.maps)]
            scores[precision] = pred.scores
            lat = pyad.latency(det, test[:3], warmup=3, runs=5, batch_sizes=(1, 32), max_images=3)
            out[precision] = {"image_auroc": image_auroc(labels, pred.scores), "pixel_auroc": pixel_auroc(masks, pred.maps),
                              "stage_ms": lat.stage_ms(), "latency_ms": lat.mean_ms, "images_per_s": lat.throughput}
        out["spearman_fp16_vs_fp32"] = spearman(scores["float16"], scores["float32"])
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["PatchCore", "PaDiM"])
