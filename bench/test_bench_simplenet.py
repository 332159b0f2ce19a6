"""SimpleNet training pass and predict latency against a re-implementation of the
official training loop (DonaldRR/SimpleNet ``simplenet.py``: ``_train_discriminator``
recomputes the frozen backbone's features for every batch of every pass, with the
full torchvision network, unfused BatchNorm, ``Unfold`` + bilinear resizing of the
unfolded layer-3 patches + ``adaptive_avg_pool1d`` MeanMapper / Aggregator, and
``scipy.ndimage.gaussian_filter`` on the maps), in the same run, on MVTec AD bottle
training images (decoded once for both: the official DataLoader would also decode
and resize them every pass, which is not counted here).

- training: pyad extracts the features once and runs the passes on the cache; the
  reference recomputes them per batch. Seconds per pass from the steady state (the
  end of step 1 to the end of the last step, times the steps of a pass), the time
  pyad spends extracting the features once, and the projection to the official 160
  passes (features once + 160 passes vs 160 reference passes). Both runs start
  from the same networks and noise stream: their losses are checked equal.
- ``predict``: pyad's inference module (BatchNorm folded into the convolutions, the
  compiled embedding kernel, adaptor + first discriminator layer + BatchNorm1d
  folded into one Linear) vs the official ``_predict`` path, with pyad's trained
  weights in both: equal scores and maps (checked), batch 1 and 8.

Configurations: "official" (Wide-ResNet-50-2, 329 → 288 px, 1536-d; random
backbone weights, since the timing does not depend on them) and "light"
(MobileNetV2 with the ImageNet weights in /work/shared/weights when present, 256 px,
384-d). Images: PYAD_BENCH_SN_IMAGES (16), passes: PYAD_BENCH_SN_PASSES (2). No
speed targets are set by the issue: ratios are reported, correctness is asserted."""

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndimage
import torch
import torch.nn.functional as F

import pyad
from pyad import training
from pyad.backbones import Backbone
from pyad.detectors import simplenet as sn
from conftest import RESULTS, record, save

HERE = Path(__file__).parent
BOTTLE = HERE.parents[1] / "shared" / "data" / "mvtec_ad" / "bottle"
MOBILENET = HERE.parents[1] / "shared" / "weights" / "mobilenet_v2_imagenet_from_tflite.pth"
N_IMAGES = int(os.environ.get("PYAD_BENCH_SN_IMAGES", 16))
PASSES = int(os.environ.get("PYAD_BENCH_SN_PASSES", 2))
CONFIGS = {
    "official": dict(backbone="wide_resnet50_2", weights=None),
    "light": dict(backbone="mobilenet_v2", weights=str(MOBILENET) if MOBILENET.is_file() else None, image_size=256,
                  crop_size=None, embed_dim=384, target_dim=384),
}
pytestmark = pytest.mark.skipif(not BOTTLE.is_dir(), reason="MVTec AD bottle not present")


# -- the official code, re-implemented -----------------------------------------------------------------
class OfficialEmbed:
    """simplenet.py ``_embed`` (228-286) with common.py ``Preprocessing`` / ``MeanMapper`` /
    ``Aggregator``, on the full backbone (the hooks' early exit is commented out there)."""

    def __init__(self, det: pyad.SimpleNet):
        deepest = {"wide_resnet50_2": ("layer4",), "mobilenet_v2": ("features.18",)}[det.backbone]
        with training.seeded(det.seed):  # pyad's random init (built in the same order) when weights=None
            net = Backbone(det.backbone, tuple(det.layers) + deepest, None)
        if det.weights is not None:
            net.load_weights(det.weights)
        self.net = net.to(memory_format=torch.contiguous_format).eval()
        self.taps = net.taps[: len(det.layers)]
        self.family = net.family
        self.dim, self.target = det.embed_dim, det.target_dim
        self.patchsize = det.patch_size

    def features(self, x: torch.Tensor) -> dict:
        out, body = {}, self.net.body
        if self.family == "resnet":
            for key, stage in body.items():
                x = stage(x)
                out[key] = x
        else:
            for i, block in enumerate(body["features"]):
                x = block(x)
                out[f"features.{i}"] = x
        return [out[t] for t in self.taps]

    def patchify(self, features):
        padding = (self.patchsize - 1) // 2
        unfolded = F.unfold(features, self.patchsize, padding=padding, stride=1)
        n_patches = [s + 2 * padding - (self.patchsize - 1) for s in features.shape[-2:]]
        unfolded = unfolded.reshape(*features.shape[:2], self.patchsize, self.patchsize, -1).permute(0, 4, 1, 2, 3)
        return unfolded, n_patches

    @torch.no_grad()
    def __call__(self, images: torch.Tensor):
        features = [self.patchify(f) for f in self.features(images)]
        shapes = [f[1] for f in features]
        features = [f[0] for f in features]
        ref = shapes[0]
        for i in range(1, len(features)):
            f = features[i].reshape(features[i].shape[0], shapes[i][0], shapes[i][1], *features[i].shape[2:])
            f = f.permute(0, -3, -2, -1, 1, 2)
            base = f.shape
            f = f.reshape(-1, *f.shape[-2:])
            f = F.interpolate(f.unsqueeze(1), size=(ref[0], ref[1]), mode="bilinear", align_corners=False).squeeze(1)
            f = f.reshape(*base[:-2], ref[0], ref[1]).permute(0, -2, -1, 1, 2, 3)
            features[i] = f.reshape(len(f), -1, *f.shape[-3:])
        features = [x.reshape(-1, *x.shape[-3:]) for x in features]
        mapped = [F.adaptive_avg_pool1d(f.reshape(len(f), 1, -1), self.dim).squeeze(1) for f in features]
        stacked = torch.stack(mapped, dim=1)
        out = F.adaptive_avg_pool1d(stacked.reshape(len(stacked), 1, -1), self.target)
        return out.reshape(len(out), -1), shapes


def official_pass(embed: OfficialEmbed, nets: dict, opts: dict, images: torch.Tensor, det, order,
                  stamps: list) -> float:
    """One ``_train_discriminator`` pass: features recomputed per batch; returns the
    mean loss and stamps the end of every step."""
    adaptor, dsc = nets["adaptor"].train(), nets["discriminator"].train()
    losses = []
    for idx in order:
        for o in opts.values():
            o.zero_grad()
        x = det.preprocessing.to_tensor(images[torch.from_numpy(idx)]).contiguous()
        feats, _ = embed(x)
        loss, _, _ = sn.training_loss(adaptor, dsc, feats, det.noise_std, det.margin)
        loss.backward()
        for o in opts.values():
            o.step()
        losses.append(loss.item())
        stamps.append(time.perf_counter())
    return float(np.mean(losses))


def official_predict(embed: OfficialEmbed, nets: dict, x: torch.Tensor, size: int):
    """``_predict`` (simplenet.py:576-612) + ``RescaleSegmentor`` (common.py:76-121)."""
    adaptor, dsc = nets["adaptor"].eval(), nets["discriminator"].eval()
    with torch.no_grad():
        feats, shapes = embed(x)
        patch = -dsc(adaptor(feats))
        b = len(x)
        scores = patch.reshape(b, -1).max(1).values.numpy()
        patch = patch.reshape(b, *shapes[0])
        up = F.interpolate(patch[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
    return scores, np.stack([ndimage.gaussian_filter(m, sigma=4) for m in up])


# -- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images():
    return sorted((BOTTLE / "train" / "good").glob("*.png"))[:N_IMAGES]


@pytest.fixture(scope="module", params=list(CONFIGS))
def setup(request, images):
    det = pyad.SimpleNet(**CONFIGS[request.param], max_epochs=PASSES, validation=0)
    return request.param, det, det.load_images(images)


# -- benchmarks ----------------------------------------------------------------------------------------
def steady_step_s(stamps: list) -> float:
    """Seconds per step from the end of step 1 to the end of step n."""
    assert len(stamps) >= 2, "need at least 2 steps: raise PYAD_BENCH_SN_IMAGES or PYAD_BENCH_SN_PASSES"
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def test_training(setup, images, monkeypatch):
    name, det, u8 = setup
    stamps: list[float] = []
    real = training.Run.backward

    def stamped(self, *a, **k):
        real(self, *a, **k)
        stamps.append(time.perf_counter())

    monkeypatch.setattr(training.Run, "backward", stamped)
    det.fit(images)
    monkeypatch.undo()
    features_s = _time_features(det, u8)

    embed = OfficialEmbed(det)
    ref_stamps: list[float] = []
    with training.seeded(det.seed):  # pyad's initial networks and noise stream
        nets = det._networks()
        opts = {"discriminator": torch.optim.Adam(nets["discriminator"].parameters(), lr=det.dsc_lr, weight_decay=1e-5),
                "adaptor": torch.optim.AdamW(nets["adaptor"].parameters(), lr=det.lr)}
        batches = training.Batches(len(u8), det.batch_size, det.seed)
        ref_loss = [official_pass(embed, nets, opts, u8, det, batches.epoch(e), ref_stamps) for e in range(PASSES)]
    pyad_loss = [r["loss"] for r in det.history_]
    # the same algorithm: the same losses up to the features' float rounding (BN folding, kernels)
    np.testing.assert_allclose(pyad_loss, ref_loss, rtol=2e-3)
    steps = len(batches)
    pyad_pass, ref_pass = steady_step_s(stamps) * steps, steady_step_s(ref_stamps) * steps
    RESULTS.setdefault("simplenet", {})[name] = {
        "images": len(u8), "passes": PASSES, "steps_per_pass": steps, "pyad_features_once_s": features_s,
        "pyad_s_per_pass": pyad_pass, "official_s_per_pass": ref_pass, "speedup_per_pass": ref_pass / pyad_pass,
        "projected_160_passes_speedup": 160 * ref_pass / (features_s + 160 * pyad_pass),
        "loss_pyad": pyad_loss, "loss_official": ref_loss,
    }


def _time_features(det, u8) -> float:
    embed = det._embedder(det._network())
    t0 = time.perf_counter()
    det._features(embed, u8)
    return time.perf_counter() - t0


@pytest.mark.parametrize("batch", [1, 8])
def test_predict_latency(benchmark, setup, batch):
    name, det, u8 = setup
    if not det.is_fitted():
        pytest.skip("test_training did not run")
    x = det.preprocessing.to_tensor(u8[:batch]).contiguous()
    module = det.inference_module()

    def pyad_call():
        with torch.inference_mode():
            return module(x)

    embed = OfficialEmbed(det)
    ref = {"adaptor": det.networks_["adaptor"], "discriminator": det.networks_["discriminator"]}
    want_s, want_m = official_predict(embed, ref, x, det.preprocessing.size)
    got_s, got_m = (t.numpy() for t in pyad_call())
    scale = float(np.abs(want_m).max())
    np.testing.assert_allclose(got_s, want_s, rtol=1e-3, atol=1e-4 * max(1.0, abs(want_s).max()))
    np.testing.assert_allclose(got_m, want_m, rtol=1e-3, atol=1e-4 * max(1.0, scale))
    record(benchmark, f"simplenet-{name} predict b{batch}", "pyad", pyad_call, rounds=5, warmup=2)
    pyad_ms = 1e3 * benchmark.stats.stats.min
    ts = []
    for _ in range(2):
        official_predict(embed, ref, x, det.preprocessing.size)
    for _ in range(5):
        t0 = time.perf_counter()
        official_predict(embed, ref, x, det.preprocessing.size)
        ts.append(time.perf_counter() - t0)
    RESULTS.setdefault("simplenet", {}).setdefault(name, {})[f"predict_b{batch}"] = {
        "pyad_ms": pyad_ms, "official_ms": 1e3 * min(ts), "speedup": min(ts) * 1e3 / pyad_ms}


def test_stage_latency(setup):
    name, det, _ = setup
    if not det.is_fitted():
        pytest.skip("test_training did not run")
    ds = pyad.datasets.mvtec_ad(BOTTLE.parent, "bottle")
    lat = pyad.latency(det, ds, batch_sizes=(1,), max_images=2)
    RESULTS.setdefault("simplenet", {}).setdefault(name, {})["stage_ms"] = lat.stage_ms()


def test_summary():
    rows = RESULTS.get("simplenet", {})
    if not rows:
        pytest.skip("no SimpleNet figures in this run")
    save("simplenet", rows)
    print(json.dumps(rows, indent=1, default=lambda v: v if not isinstance(v, float) or math.isfinite(v) else None))
    for name, r in rows.items():
        assert r["pyad_s_per_pass"] > 0 and r["official_s_per_pass"] > 0, name
