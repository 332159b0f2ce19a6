"""EfficientAD teacher distillation (``pyad distill-teacher``): the reference
``pretraining.py`` of nelson1425/EfficientAD @fcab514.

A PDN (with padding, l.70-75) learns to regress, at 1/4 of its input resolution,
the channel-normalised PatchCore embedding of an ImageNet backbone applied to the
same image at twice the size (l.167-245): the backbone's layer 2 and layer 3, each
3×3 neighbourhood (stride 1, zero padding 1) averaged to 1024 values (MeanMapper),
layer 3 bilinearly resized onto layer 2's grid, the two averaged to 384 values
(Aggregator). A 256 px PDN input therefore sees a 512 px backbone input and a
64×64×384 target.

- Images: any folder of natural images, searched recursively (an ImageNet
  ``train`` folder in the reference, l.30); RandomGrayscale(0.1) on the image both
  networks see (l.37-51); Resize((2S, 2S)) for the backbone, Resize((S, S)) for the
  PDN, each normalised as its weights expect.
- Target normalisation: per-channel mean and standard deviation over
  ``norm_images`` images (10,000, l.123-164): the mean of per-batch channel means,
  then the mean of per-batch mean squared deviations, on the batch stream before
  training.
- Training: MSE, Adam (lr 1e-4, weight decay 1e-5), batch 16, 60,000 steps (l.79-106).

Defaults are the reference's (Wide-ResNet-101-2, ImageNet weights). Any pyad
backbone with a stride-8 and a stride-16 tap works (e.g. the offline ImageNet
EfficientNet-Lite0 or MobileNetV2): a deviation from the paper's teacher, to be
reported as such. The output is the PDN's state_dict in the reference layout (it
loads in nelson1425's ``efficientad.py --weights`` and in
``pyad.EfficientAD(teacher=path)``), with a JSON record of how it was made next to it.
"""

from __future__ import annotations

import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import _progress, training
from .backbones import IMAGENET_MEAN, IMAGENET_STD, NAMES

REFERENCE = "nelson1425/EfficientAD@fcab514 pretraining.py"


class TargetExtractor(nn.Module):
    """[B, 3, 2S, 2S] (normalised for the backbone's weights) -> [B, 384, S/4, S/4]:
    the reference ``FeatureExtractor.embed`` (``pretraining.py`` l.167-245)."""

    def __init__(self, net: nn.Module, layers, out_channels: int = 384):
        super().__init__()
        from .detectors.patchcore import PatchCoreEmbed

        # MeanMapper to 1024 per layer, layers onto the first one's grid, Aggregator to 384
        self.embed = PatchCoreEmbed(net, layers, "unfold", 3, 1, 1, 1024, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x).permute(0, 3, 1, 2).contiguous()


class _EfficientNetTaps(nn.Module):
    """``pyad.efficientnet`` network -> {tap: feature map}, as ``Backbone`` returns."""

    def __init__(self, net, layers):
        super().__init__()
        self.net, self.layers = net, tuple(layers)

    def forward(self, x):
        from . import efficientnet as E

        return E.features(self.net, x.contiguous(memory_format=torch.channels_last), self.layers)


def backbone_network(backbone: str, layers, weights, size: int) -> tuple[nn.Module, tuple, tuple, str, str | None]:
    """(frozen network returning {layer: map}, input mean, input std, weights id,
    weights source) for the extractor at ``size`` px."""
    if backbone not in NAMES:
        raise ValueError(f"backbone: expected one of {', '.join(NAMES)}, got {backbone!r}")
    if backbone.startswith("efficientnet"):
        from . import efficientnet as E

        for tap in layers:
            E.resolve(backbone, tap)
        from .backbones import fold_batchnorm

        net = E.build(backbone, taps=layers, weights=weights, image_size=size).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        wid = "random" if weights is None else "sha256:" + str(net.weights_sha256)  # of the official weights
        fold_batchnorm(net)  # frozen: one memory pass less per convolution (Lite0 at 512 px: 1.4x)
        pre = E.PREPROCESSING[backbone]
        return _EfficientNetTaps(net, layers).eval(), pre.mean, pre.std, wid, net.weights_source
    from .backbones import Backbone

    plain = Backbone(backbone, layers, weights)
    return plain.frozen(), IMAGENET_MEAN, IMAGENET_STD, plain.weights_id, plain.weights_source


def image_files(images) -> list[Path]:
    """Image files of a folder (recursively: an ImageFolder root or a flat folder) or a list of paths."""
    from .images import EXTENSIONS

    if isinstance(images, (str, os.PathLike)):
        root = Path(images)
        if not root.is_dir():
            raise ValueError(f"images: {root} is not a folder")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        if not files:
            raise ValueError(f"images: no image files ({', '.join(EXTENSIONS)}) in {root}")
        return files
    files = [Path(p) for p in images]
    if not files:
        raise ValueError("images: no image files")
    return files


class _Stream:
    """The reference's infinite shuffled loader as a function of the batch position:
    batch b = batch b mod len of the seeded epoch b // len; each image grey with
    probability ``grayscale`` (seeded by position), resized to 2S (backbone) and S
    (PDN). Decoded by background threads a few batches ahead."""

    def __init__(self, files, batch_size, size, grayscale, seed, ahead: int = 3):
        self.files, self.size, self.grayscale, self.seed = files, size, grayscale, seed
        self.batches = training.Batches(len(files), batch_size, seed)
        self.pool = ThreadPoolExecutor(max_workers=2)
        self.ahead = ahead
        self.pending: dict[int, object] = {}

    def _one(self, b: int, j: int, index: int):
        from PIL import Image

        from .images import open_image

        with open_image(self.files[index]) as im:
            im = im.convert("RGB")
            if np.random.default_rng([self.seed, b, j]).random() < self.grayscale:
                im = im.convert("L").convert("RGB")  # torchvision RandomGrayscale on PIL
            big = np.asarray(im.resize((2 * self.size, 2 * self.size), Image.BILINEAR))
            small = np.asarray(im.resize((self.size, self.size), Image.BILINEAR))
        return big, small

    def _load(self, b: int):
        idx = self.batches.step(b)
        pairs = [self._one(b, j, int(i)) for j, i in enumerate(idx)]
        return (torch.from_numpy(np.stack([p[0] for p in pairs])), torch.from_numpy(np.stack([p[1] for p in pairs])))

    def get(self, b: int):
        for k in range(b + 1, b + 1 + self.ahead):
            if k not in self.pending:
                self.pending[k] = self.pool.submit(self._load, k)
        fut = self.pending.pop(b, None)
        out = fut.result() if fut is not None else self._load(b)
        for k in [k for k in self.pending if k < b]:
            self.pending.pop(k).cancel()
        return out

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


def _normalise(u8: torch.Tensor, mean, std, device) -> torch.Tensor:
    x = u8.to(device).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous(memory_format=torch.channels_last)


def distill_teacher(images, output, *, model_size: str = "s", backbone: str = "wide_resnet101_2",
                    weights="imagenet", layers=("layer2", "layer3"), image_size: int = 256, steps: int = 60_000,
                    batch_size: int = 16, lr: float = 1e-4, weight_decay: float = 1e-5, norm_images: int = 10_000,
                    grayscale: float = 0.1, seed: int = 0, device: str = "cpu", amp: str | None = None,
                    checkpoint=None) -> dict:
    """Distil an EfficientAD teacher (module docstring) and write it to ``output``
    (a ``.pth`` state_dict in the reference layout) and ``output + ".json"`` (how it
    was made). Returns that record.

    images: a folder of natural images (recursively) or a list of image paths.
    model_size: "s" or "m". backbone / weights / layers: the feature extractor
        (reference: "wide_resnet101_2", ImageNet weights, layer2 + layer3).
    image_size: the PDN's input S (256); the backbone sees 2S.
    steps, batch_size, lr, weight_decay: the optimisation (60,000, 16, 1e-4, 1e-5).
    norm_images: images for the target's channel mean/std (10,000).
    grayscale: RandomGrayscale probability (0.1).
    amp: None (float32, the reference) or "bf16" / "fp16" autocast of the PDN's
        forward (bf16 halves the time on CPUs with AVX512-BF16; a deviation).
    checkpoint: a path for resumable checkpoints (an interrupted run started again
        with the same path continues; the target statistics are kept there too).
    """
    from .detectors.efficientad import pdn, pdn_output_size
    from .detectors.settings import _int, check

    check(model_size in ("s", "m"), "model_size", "'s' or 'm'", model_size)
    check(_int(image_size, 64), "image_size", "an int >= 64", image_size)
    check(_int(steps, 0), "steps", "an int >= 0", steps)
    check(_int(batch_size, 1), "batch_size", "a positive int", batch_size)
    check(_int(norm_images, 1), "norm_images", "a positive int", norm_images)
    check(lambda: lr > 0, "lr", "a positive number", lr)
    check(lambda: weight_decay >= 0, "weight_decay", "a number >= 0", weight_decay)
    check(lambda: 0 <= grayscale <= 1, "grayscale", "a probability in [0, 1]", grayscale)
    check(isinstance(layers, (tuple, list)) and len(layers) >= 1, "layers", "a non-empty tuple of layer names", layers)
    out_path = Path(output)
    if out_path.is_dir():
        raise ValueError(f"output: {out_path} is a folder; give a file name such as teacher_small.pth")
    files = image_files(images)
    started = time.perf_counter()

    with training.seeded(seed, device):
        net, mean_in, std_in, weights_id, weights_source = backbone_network(backbone, layers, weights, 2 * image_size)
        extractor = TargetExtractor(net.to(device), layers).eval()
        student = pdn(model_size, 384, padding=True).to(device)
    grid = pdn_output_size(image_size, True)
    with torch.no_grad():
        probe = extractor(torch.zeros(1, 3, 2 * image_size, 2 * image_size, device=device))
    if tuple(probe.shape[2:]) != (grid, grid):
        raise ValueError(f"layers: the first layer ({layers[0]}) of {backbone} gives a {tuple(probe.shape[2:])} grid "
                         f"at {2 * image_size} px; the PDN's is {grid}x{grid}: use a stride-8 tap first (e.g. layer2)")

    stats = nn.Module()  # the target statistics travel in the checkpoint
    stats.register_buffer("mean", torch.zeros(384, device=device))
    stats.register_buffer("std", torch.ones(384, device=device))
    stats.register_buffer("done", torch.zeros((), device=device))
    student.train().to(memory_format=torch.channels_last)
    opt = training.optimizer("adam", student.parameters(), lr, weight_decay=weight_decay)
    settings = {"model_size": model_size, "backbone": backbone, "weights_id": weights_id, "layers": list(layers),
                "image_size": image_size, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                "norm_images": norm_images, "grayscale": grayscale, "seed": seed, "images": len(files), "amp": amp}
    run = training.Run("distill-teacher", modules={"pdn": student, "stats": stats}, optimizers={"adam": opt},
                       max_steps=steps, checkpoint=checkpoint, device=device, amp=amp, settings=settings)
    stream = _Stream(files, batch_size, image_size, grayscale, seed)
    n_norm = -(-norm_images // batch_size)  # batches: the reference stops at >= norm_images images
    history, losses = [], []
    try:
        if not float(stats.done):
            with torch.no_grad():
                means = []
                for b in _progress.bar(range(n_norm), desc="distill-teacher: target mean"):
                    target = extractor(_normalise(stream.get(b)[0], mean_in, std_in, device))
                    means.append(target.mean(dim=(0, 2, 3)))
                mean = torch.stack(means).mean(0)
                dists = []
                for b in _progress.bar(range(n_norm, 2 * n_norm), desc="distill-teacher: target std"):
                    target = extractor(_normalise(stream.get(b)[0], mean_in, std_in, device))
                    dists.append((target - mean[None, :, None, None]).square().mean(dim=(0, 2, 3)))
                stats.mean.copy_(mean)
                stats.std.copy_(torch.stack(dists).mean(0).sqrt())
                stats.done.fill_(1.0)
        mean4, std4 = stats.mean[None, :, None, None], stats.std[None, :, None, None]
        for step in run.steps():
            big, small = stream.get(2 * n_norm + step)
            with torch.no_grad():
                target = (extractor(_normalise(big, mean_in, std_in, device)) - mean4) / std4
            with run.autocast():
                pred = student(_normalise(small, IMAGENET_MEAN, IMAGENET_STD, device))
            loss = (target - pred.float()).square().mean()
            run.backward(loss)
            run.log(loss=loss)
            losses.append(float(loss.detach()))
            if len(losses) == 100 or step + 1 == steps:
                history.append({"step": step + 1, "loss": float(np.mean(losses))})
                losses = []
    finally:
        stream.close()

    state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    from .modelfile import atomic_write

    atomic_write(out_path, buf.getvalue())
    from ._version import __version__

    record = {
        "teacher": os.fspath(out_path.resolve()), "reference": REFERENCE, "pyad_version": __version__,
        "model_size": model_size, "backbone": backbone,
        "weights": weights if isinstance(weights, str) or weights is None else os.fspath(weights), "weights_id": weights_id, "weights_source": weights_source, "layers": list(layers),
        "image_size": image_size, "backbone_input": 2 * image_size, "grid": grid, "steps": run.step,
        "steps_asked": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "norm_images": n_norm * batch_size, "grayscale": grayscale, "seed": seed, "amp": amp,
        "images": {"count": len(files), "first": os.fspath(files[0])},
        "resumed": run.resumed, "seconds": time.perf_counter() - started,
        "final_loss": history[-1]["loss"] if history else None, "history": history,
    }
    atomic_write(Path(os.fspath(out_path) + ".json"), (json.dumps(record, indent=2) + "\n").encode())
    return record
