"""Where a frozen-feature fit spends its CPU: PaDiM ResNet-18 and PatchCore
WRN50-2 (1%) on MVTec AD bottle (random init, 256 px, no crop, seed 0, the
default validation share), as CPU-seconds per stage on this machine's cores.

Two runs per configuration: the fit as users run it (wall and CPU seconds), and
an instrumented fit whose decoding runs in the main thread, so each stage's
``time.process_time`` (every thread of the process: torch's workers included)
belongs to that stage alone. A stage's time excludes the timed stages it calls.

    python bench/profile_fit.py            # a Markdown table per configuration (docs/profile.md)
    python bench/profile_fit.py --json     # the same as JSON
"""

import argparse
import json
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

import pyad
from pyad import images as imgs
from pyad.backbones import Backbone
from pyad import kernels as K
from pyad import ops
from pyad.detectors import padim, patchcore
from conftest import sgemm_gflops

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle" / "train" / "good"
CONFIGS = {
    "PaDiM R18": ("PaDiM", {"backbone": "resnet18"}),
    "PatchCore WRN50 1%": ("PatchCore", {"backbone": "wide_resnet50_2", "coreset_ratio": 0.01}),
}


class Profile:
    """Exclusive CPU-seconds per stage: a timed call's time minus its timed callees'."""

    def __init__(self):
        self.cpu = defaultdict(float)
        self.calls = defaultdict(int)
        self._stack: list[list[float]] = []

    @contextmanager
    def stage(self, name: str):
        self._stack.append([0.0])
        t0 = time.process_time()
        try:
            yield
        finally:
            spent = time.process_time() - t0
            inner = self._stack.pop()[0]
            self.cpu[name] += spent - inner
            self.calls[name] += 1
            if self._stack:
                self._stack[-1][0] += spent

    def wrap(self, owner, attr: str, name: str):
        original = getattr(owner, attr)

        def timed(*a, **k):
            with self.stage(name):
                return original(*a, **k)

        setattr(owner, attr, timed)
        return lambda: setattr(owner, attr, original)


def serial_batches(items, size, pre, **kw):
    """``images.load_batches`` in the calling thread (no overlap: clean attribution)."""
    for s in range(0, len(items), size):
        yield [imgs.Loaded(i, str(items[i]), pre.prepare(items[i]), None) for i in range(s, min(s + size, len(items)))]


# (owner, attribute, stage): what the instrumented fit times
STAGES = [
    (imgs, "_fast_png", "decode (PNG)"),
    (imgs.Preprocess, "prepare", "resize (bilinear, uint8)"),
    (imgs.Preprocess, "to_tensor", "normalise"),
    (Backbone, "forward", "backbone (BatchNorm folded, channels-last)"),
    (padim.PaDiMEmbed, "forward", "embedding (layer subset, upsampling)"),
    (patchcore.PatchCoreEmbed, "forward", "embedding (3x3 pooling, channel pooling)"),
    (padim.PaDiM, "_collect", "collect (buffer copies)"),
    (patchcore.PatchCore, "_collect", "collect (bank parts)"),
    (K.GaussianAccumulator, "update", "Gaussian update (batched GEMM)"),
    (K.GaussianAccumulator, "finalize", "Gaussian solve (Cholesky, inverse, held-out downdate)"),
    (padim.PaDiMHead, "to_map", "validation maps (upsample, blur)"),
    (K, "random_projection", "random projection (to 128)"),
    (patchcore.PatchCore, "_approximate_start", "coreset start (10 random points)"),
    (K, "greedy_coreset", "greedy coreset"),
    (patchcore, "validation_from", "validation scoring (nearest neighbours, maps)"),
    (patchcore.PatchCore, "_gather", "gather (selected rows)"),
    (patchcore.NearestNeighbours, "__call__", "continuation start (nearest neighbours)"),
    (pyad.detectors.base.Detector, "_learn_thresholds", "thresholds (from validation scores)"),
]


def instrumented(name: str, params: dict) -> dict:
    prof = Profile()
    undo = [prof.wrap(*stage) for stage in STAGES]
    saved_loader = imgs.load_batches
    imgs.load_batches = serial_batches
    try:
        det = getattr(pyad, name)(weights=None, image_size=256, crop_size=None, seed=0, **params)
        with prof.stage("fit (rest: loops, copies, bookkeeping)"):
            det.fit(ROOT)
    finally:
        imgs.load_batches = saved_loader
        for u in undo:
            u()
    return dict(prof.cpu)


def backbone_gflop(name: str, params: dict) -> tuple[float, float]:
    """Multiply-adds x 2 of the backbone's convolutions and linear layers for one
    256 x 256 image, counted by forward hooks: (direct convolution, as computed), where
    "as computed" counts the layers that take Winograd (``pyad.ops.conv``) at their 36
    products per output tile (the GEMMs; transforms not counted)."""
    det = getattr(pyad, name)(weights=None, image_size=256, crop_size=None, seed=0, **params)
    net = det._network()
    direct, computed = [], []

    def hook(m, inp, out):
        if isinstance(m, torch.nn.Conv2d):
            k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            direct.append(2 * out.numel() * k)
            if ops._winograd_ok(m, inp[0]):
                t = 7 - m.kernel_size[0]  # outputs per tile side
                tiles = out.shape[0] * ((out.shape[2] + t - 1) // t) * ((out.shape[3] + t - 1) // t)
                computed.append(2 * 36 * tiles * m.in_channels * m.out_channels)
            else:
                computed.append(direct[-1])
        elif isinstance(m, torch.nn.Linear):
            direct.append(2 * out.numel() * m.in_features)
            computed.append(direct[-1])

    handles = [m.register_forward_hook(hook) for m in net.modules()]
    with torch.inference_mode(), ops.portable():  # every layer through its module, so the hooks see it
        net(torch.zeros(1, 3, 256, 256))
    for h in handles:
        h.remove()
    return sum(direct) / 1e9, sum(computed) / 1e9


def plain(name: str, params: dict) -> tuple[float, float]:
    det = getattr(pyad, name)(weights=None, image_size=256, crop_size=None, seed=0, **params)
    w, c = time.perf_counter(), time.process_time()
    det.fit(ROOT)
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", choices=list(CONFIGS))
    args = ap.parse_args()
    torch.set_num_threads(pyad.info()["threads"])
    out = {}
    rate = sgemm_gflops()
    n_images = len(list(ROOT.glob("*.png")))
    for label, (name, params) in CONFIGS.items():
        if args.only and label != args.only:
            continue
        wall, cpu = plain(name, params)
        stages = instrumented(name, params)
        direct, gflop = backbone_gflop(name, params)
        out[label] = {"wall_s": wall, "cpu_s": cpu, "threads": torch.get_num_threads(), "stages_cpu_s": stages,
                      "backbone_gflop_per_image": gflop, "backbone_direct_gflop_per_image": direct,
                      "sgemm_gflops": rate, "images": n_images, "backbone_floor_s": n_images * gflop / rate,
                      "winograd": os.environ.get("PYAD_WINOGRAD", "1") != "0"}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    for label, r in out.items():
        total = sum(r["stages_cpu_s"].values())
        print(f"\n{label}: fit {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} CPU-s on {r['threads']} threads; "
              f"instrumented (serial decoding) {total:.1f} CPU-s. Backbone: {r['backbone_gflop_per_image']:.2f} "
              f"GFLOP per image as computed ({r['backbone_direct_gflop_per_image']:.2f} as direct convolutions) x "
              f"{r['images']} images at this machine's sgemm rate ({r['sgemm_gflops']:.0f} GFLOP/s) = "
              f"{r['backbone_floor_s']:.1f} s, the float32 floor of the fit\n")
        print("| stage | CPU-s | share |\n|---|---|---|")
        for k, v in sorted(r["stages_cpu_s"].items(), key=lambda kv: -kv[1]):
            print(f"| {k} | {v:.2f} | {v / total:.0%} |")


if __name__ == "__main__":
    main()
