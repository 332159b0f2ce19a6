"""Raspberry Pi 4B latency estimates for every registered detector, from counted work.

ARM latency is estimated, not measured under emulation (qemu's speed says nothing about
a Cortex-A72). The method (docs/arm.md):

1. Calibration. Baßler (KIT master's thesis, Table 2.4) measured whole networks on a
   Raspberry Pi 4B, 224 px, batch 1: ResNet-18 820 ms, ResNet-34 1,450 ms, WRN50-2
   3,000 ms. Dividing each network's FLOPs (counted here the same way as below) by its
   time gives an effective rate per network family.
2. Counts. Each detector is fitted (random weights: FLOPs and bytes do not depend on
   them; one epoch or step: training length does not change the inference module) and
   its inference module run once on a [1, 3, S, S] input in the pure-torch twin
   (``pyad.ops.portable()``: the path ONNX exports, every matrix product visible), under
   ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs = 2 x multiply-adds of
   convolutions and matrix products) and a dispatch mode that adds up the bytes every
   operator reads and writes. The learned state outside the networks (memory bank,
   Gaussian mean and factor, gallery) is the bytes of the module's tensors that do not
   belong to a convolution, linear or normalisation layer.
3. State that grows with the training set (PatchCore's coreset, SPADE's gallery) is
   counted at two training-set sizes and extrapolated linearly to MVTec AD bottle's 209
   training images (``--train-images``); a trained detector with under 1 MB of such
   state (normalisation statistics) is counted once.
4. Estimate = FLOPs / rate of the detector's backbone family + state bytes / the Pi 4's
   streaming bandwidth (no overlap of the two: pessimistic). Networks of none of the
   three families (MobileNetV2, EfficientNet, the trained detectors' own networks) get
   a range, from ResNet-18's rate (the lowest) to WRN50-2's (the highest); "maybe" in
   the last column means 1 s lies inside it.

    python bench/arm_estimate.py                 # every registered detector, default and light configurations
    python bench/arm_estimate.py patchcore padim  # some of them
    python bench/arm_estimate.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

import pyad
from pyad.backbones import Backbone
from pyad.detectors import REGISTRY
from pyad.detectors.frozen import FrozenFeatureDetector
from pyad.ops import portable

# Baßler, KIT master's thesis, Table 2.4: whole network, 224 x 224 x 3, batch 1, Raspberry Pi 4B
# (Cortex-A72, 64-bit Raspberry Pi OS, PyTorch 2.0.1).
RPI4_SECONDS = {"resnet18": 0.820, "resnet34": 1.450, "wide_resnet50_2": 3.000}
# Streaming read bandwidth of a Raspberry Pi 4B: STREAM "scale", 5.56 GB/s, headless
# (sci-pi.org.uk/bench/stream.html; 5.16 GB/s with a display attached). An assumption:
# the thesis has no bandwidth figure.
RPI4_BANDWIDTH = 5.5e9
TARGET_S = 1.0  # Baßler's deployment goal: one image per second on the Pi
# which calibration rate a network uses: its own, else that of the same block type; any
# other network (MobileNetV2, EfficientNet, the trained detectors' own) gets the range
# between ResNet-18's rate and WRN50-2's (see timed)
FAMILY = {"resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "wide_resnet50_2",
          "wide_resnet50_2": "wide_resnet50_2", "wide_resnet101_2": "wide_resnet50_2"}
NETWORK_LAYERS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d,
                  nn.InstanceNorm2d, nn.LayerNorm, nn.GroupNorm)
BOTTLE_TRAIN_IMAGES = 209  # MVTec AD bottle's training images
STATE_GROWS_ABOVE = 1e6  # bytes of state outside the networks above which a second training-set size is counted

# Lightweight configurations worth knowing on a Pi, per registry name (on top of each
# detector's defaults). Detectors without an entry are estimated at their defaults only.
LIGHT = {
    "patchcore": {
        "WRN50-2, 1% coreset": dict(coreset_ratio=0.01),
        "WRN50-2, |M| = 1000": dict(memory_bank_size=1000),
        "R18 layer2+3, |M| = 1000": dict(backbone="resnet18", memory_bank_size=1000),
        "MobileNetV2 layer2+3, |M| = 1000": dict(backbone="mobilenet_v2", memory_bank_size=1000),
        # Baßler's lightweight embedding: avg pool 3x3, channels kept (no projection to 1024)
        "R34 layer2, avg pool (d = 128), |M| = 1000": dict(backbone="resnet34", layers=("layer2",), pooling="avg",
                                                            embed_dim=None, target_dim=None, memory_bank_size=1000),
        "R18 layer2, avg pool (d = 128), |M| = 1000": dict(backbone="resnet18", layers=("layer2",), pooling="avg",
                                                            embed_dim=None, target_dim=None, memory_bank_size=1000),
        "R18 layer2, avg pool stride 2 (d = 128), |M| = 1000": dict(
            backbone="resnet18", layers=("layer2",), pooling="avg", patch_stride=2, embed_dim=None, target_dim=None,
            memory_bank_size=1000),
    },
    "padim": {
        "R18, float16 factor": dict(factor_dtype="float16"),
        # not WRN50-2 (d = 550): fitting it needs over 10 GB at 256 px (docs/arm.md gives it by hand)
        "MobileNetV2": dict(backbone="mobilenet_v2"),
    },
    "spade": {"R18": dict(backbone="resnet18")},
    "simplenet": {"R18 at 256": dict(backbone="resnet18", image_size=256, crop_size=None)},
    "efficientad": {"PDN-M": dict(model_size="m")},
    "ast": {"R18 layer2 at 256": dict(backbone="resnet18", layers=("layer2",), image_size=256)},
    "classifier": {"R18": dict(backbone="resnet18")},
    "uninformed_students": {"one scale (17 px)": dict(patch_sizes=(17,))},
}


class Traffic(TorchDispatchMode):
    """Bytes read and written by every operator that is not a view (each distinct
    tensor argument and result once): an upper bound on memory traffic (no cache reuse)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            seen = set()
            for t in tree_flatten((args, kwargs, out))[0]:
                if isinstance(t, torch.Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    self.bytes += t.numel() * t.element_size()
        return out


def count(module: nn.Module, x: torch.Tensor) -> dict:
    """FLOPs and operator traffic of one forward pass, and the module's network and
    state bytes (each storage once)."""
    with torch.no_grad():
        fc = FlopCounterMode(display=False)
        with fc:
            module(x)
        tr = Traffic()
        with tr:
            module(x)
    network, seen = set(), {}
    for m in module.modules():
        if isinstance(m, NETWORK_LAYERS):
            network.update(id(t) for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)))
    weights = state = 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape)
        if key in seen:
            continue
        seen[key] = True
        n = t.numel() * t.element_size()
        if id(t) in network:
            weights += n
        else:
            state += n
    return {"flops": float(fc.get_total_flops()), "traffic": float(tr.bytes), "weights": float(weights),
            "state": float(state)}


def calibration() -> dict:
    """{network: effective FLOP/s on the Pi}: its FLOPs at 224 px (whole network: layer4,
    global average pool, 1000-way linear) over the thesis' time."""
    rates = {}
    for name, seconds in RPI4_SECONDS.items():
        torch.manual_seed(0)
        body = Backbone(name, layers=("layer4",))
        fc = nn.Linear(body.shapes(224)["layer4"][0], 1000)
        net = nn.Sequential(_Tap(body, "layer4"), _GlobalPool(), fc).eval()
        c = count(net, torch.zeros(1, 3, 224, 224))
        rates[name] = {"flops": c["flops"], "seconds": seconds, "rate": c["flops"] / seconds}
    return rates


class _Tap(nn.Module):
    def __init__(self, body, tap):
        super().__init__()
        self.body, self.tap = body, tap

    def forward(self, x):
        return self.body(x)[self.tap]


class _GlobalPool(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


def counting_params(cls, params: dict) -> dict:
    """The configuration with what does not change the inference module's cost made
    cheap: random weights and teachers, one training step."""
    defaults = cls().get_params()
    cheap = {"weights": None, "teacher": "random", "teachers": "random", "teacher_epochs": 0,
             "early_stopping_patience": None, "augment": False, "max_epochs": 1, "max_steps": 1}
    return {**{k: v for k, v in cheap.items() if k in defaults}, **params}


def synthetic(n: int, size: int, seed: int) -> np.ndarray:
    """n noisy uint8 images [n, size, size, 3] around one random base image."""
    rng = np.random.default_rng(seed)
    base = rng.integers(90, 160, (1, size, size, 3))
    return np.clip(base + rng.integers(-10, 10, (n, size, size, 3)), 0, 255).astype(np.uint8)


def measure(name: str, params: dict, n_train: int) -> dict:
    cls = REGISTRY[name]
    det = cls(**counting_params(cls, params))
    size = det.image_size
    images = synthetic(n_train, size, 0)
    try:
        det.fit(images)
    except ValueError as e:  # a supervised detector: every other image gets a bright defect and its label
        if "label" not in str(e):
            raise
        images[1::2, size // 4 : size // 2, size // 4 : size // 2] = 255
        det.fit(images, labels=["good" if i % 2 == 0 else "defect" for i in range(n_train)])
    s = det.preprocessing.size
    with portable():
        c = count(det.inference_module(), torch.zeros(1, 3, s, s))
    c["size"] = s
    c["backbone"] = det.get_params().get("backbone")
    return c


def training_sizes(params: dict) -> tuple[int, int]:
    """Two training-set sizes whose costs bracket the linear regime: above SPADE's
    k_images (its pixel search covers min(k, N) images)."""
    k = int(params.get("k_images") or 0)
    return (max(10, k + 2), max(20, k + 12))


def estimate(name: str, label: str, params: dict, rates: dict, n_ref: int) -> dict:
    full = {**REGISTRY[name]().get_params(), **params}
    n1, n2 = training_sizes(full)
    t0 = time.perf_counter()
    a = measure(name, params, n1)
    # a second size only where the state can grow: detectors that keep training features,
    # or any with more than STATE_GROWS_ABOVE of it (trained networks' statistics are fixed)
    grows = issubclass(REGISTRY[name], FrozenFeatureDetector) or a["state"] > STATE_GROWS_ABOVE
    b = measure(name, params, n2) if grows else a
    row = {"detector": name, "configuration": label, "params": params, "size": a["size"]}
    for q in ("flops", "traffic", "state"):  # affine in the number of training images
        row[q] = a[q] + (b[q] - a[q]) / (n2 - n1) * (n_ref - n1)
    row["weights"] = a["weights"]
    row["backbone"] = a["backbone"]
    row["count_seconds"] = time.perf_counter() - t0
    return timed(row, rates)


def timed(row: dict, rates: dict) -> dict:
    """Add the estimate to a row of counts. A network calibrated on the Pi (or of the
    same block type) uses its rate; any other gets a range: ResNet-18's rate (the
    slowest per FLOP of the three) to WRN50-2's (the fastest)."""
    family = FAMILY.get(row.get("backbone") or "")
    slow = rates[family or "resnet18"]["rate"]
    fast = rates[family or "wide_resnet50_2"]["rate"]
    row["rate_from"] = family or "resnet18..wide_resnet50_2"
    row["compute_s"] = row["flops"] / slow
    row["state_s"] = row["state"] / RPI4_BANDWIDTH
    row["estimate_s"] = row["compute_s"] + row["state_s"]
    row["estimate_low_s"] = row["flops"] / fast + row["state_s"]
    row["meets_1s"] = "yes" if row["estimate_s"] <= TARGET_S else "maybe" if row["estimate_low_s"] <= TARGET_S else "no"
    return row


def configurations(names) -> list[tuple[str, str, dict]]:
    out = []
    for name in names:
        out.append((name, "defaults", {}))
        out += [(name, label, p) for label, p in LIGHT.get(name, {}).items()]
    return out


def describe(name: str) -> str:
    p = REGISTRY[name]().get_params()
    bits = [str(p[k]) for k in ("backbone", "model_size") if k in p]
    return ", ".join(bits)


def table(rows: list[dict], rates: dict) -> str:
    lines = ["| detector | configuration | input | GFLOP | state MB | weights MB | traffic MB | "
             "compute s | state s | **RPi 4 estimate** | ≤ 1 s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = r["configuration"]
        if label == "defaults" and describe(r["detector"]):
            label = f"defaults ({describe(r['detector'])})"
        est = f"**{r['estimate_s']:.2f} s**"
        if r["estimate_low_s"] < r["estimate_s"]:
            est = f"**{r['estimate_low_s']:.2f}–{r['estimate_s']:.2f} s**"
        lines.append(f"| {r['detector']} | {label} | {r['size']} | {r['flops'] / 1e9:.2f} | {r['state'] / 1e6:.1f} | "
                     f"{r['weights'] / 1e6:.1f} | {r['traffic'] / 1e6:.0f} | {r['compute_s']:.2f} | "
                     f"{r['state_s']:.2f} | {est} | {r['meets_1s']} |")
    cal = "; ".join(f"{k}: {v['flops'] / 1e9:.2f} GFLOP / {v['seconds']:.2f} s = {v['rate'] / 1e9:.2f} GFLOP/s"
                    for k, v in rates.items())
    return "\n".join(lines) + f"\n\nCalibration (whole network, 224 px): {cal}; state read at " \
                              f"{RPI4_BANDWIDTH / 1e9:.1f} GB/s."


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("detectors", nargs="*", help="registry names (default: all registered)")
    ap.add_argument("--defaults-only", action="store_true", help="skip the lightweight configurations")
    ap.add_argument("--train-images", type=int, default=BOTTLE_TRAIN_IMAGES,
                    help="training-set size the memory banks are extrapolated to (MVTec AD bottle: 209)")
    ap.add_argument("--json", help="also write the rows here, after each one; rows already there are kept, not recounted")
    ap.add_argument("--table-from", metavar="JSON", help="print the table of an earlier --json run (no counting)")
    args = ap.parse_args(argv)
    if args.table_from:
        with open(args.table_from) as f:
            saved = json.load(f)
        print(table([timed(r, saved["calibration"]) for r in saved["rows"]], saved["calibration"]))
        return 0
    names = args.detectors or sorted(REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        ap.error(f"unknown detector(s) {', '.join(unknown)}; registered: {', '.join(sorted(REGISTRY))}")
    torch.set_num_threads(pyad.info()["threads"])
    rates = calibration()
    rows = []
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            saved = json.load(f)["rows"]
        wanted = {(n, lab): json.loads(json.dumps(p, default=str)) for n, lab, p in configurations(names)}
        rows = [r for r in saved if wanted.get((r["detector"], r["configuration"]), "-") == r["params"]]
    done = {(r["detector"], r["configuration"]) for r in rows}
    todo = [(n, lab, p) for n, lab, p in configurations(names)
            if not (args.defaults_only and lab != "defaults") and (n, lab) not in done]
    for name, label, params in todo:
        try:
            rows.append(estimate(name, label, params, rates, args.train_images))
            r = rows[-1]
            if args.json:
                save(args.json, rates, args.train_images, rows)
            print(f"{name:20s} {label:45s} {r['flops'] / 1e9:8.2f} GFLOP  {r['state'] / 1e6:8.1f} MB state  "
                  f"{r['estimate_low_s']:6.2f}-{r['estimate_s']:6.2f} s  ({r['count_seconds']:.0f} s to count)",
                  file=sys.stderr, flush=True)
        except Exception as e:  # a detector another engineer is still writing must not stop the table
            print(f"{name:20s} {label:45s} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    order = {key: i for i, key in enumerate((n, lab) for n, lab, _ in configurations(names))}
    rows.sort(key=lambda r: order.get((r["detector"], r["configuration"]), len(order)))
    print(table([timed(r, rates) for r in rows], rates))
    return 0


def save(path: str, rates: dict, train_images: int, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"calibration": rates, "bandwidth": RPI4_BANDWIDTH, "train_images": train_images, "rows": rows},
                  f, indent=1, default=str)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
