"""Convolutional autoencoder (the reconstruction baseline of the MVTec AD wood study,
"Model 1": Keras, 256×256 grey input in [0, 1], MSE, Adam 1e-4, batch 16, 100
epochs, 10% validation split, rotation / shift / horizontal-flip augmentation).

Network: Conv(32) → MaxPool → Conv(64) → MaxPool → Conv(128) → MaxPool (a 32×32×128
bottleneck at 256 px), then Conv(128) → Up → Conv(64) → Up → Conv(32) → Up →
Conv(C, sigmoid). Unstated in the source and filled with Keras's usual values:
3×3 kernels, "same" padding, ReLU, 2×2 max pooling, nearest ×2 upsampling;
augmentation ±10° rotation, ±10% shifts, horizontal flips (p = 0.5).

Map: per-pixel squared error (mean over channels), optionally blurred. Image
score: ``score="mean"`` (the image MSE: the seed's reading, and the variant that
separates synthetic anomalies on the normal validation images best after 79 and
100 epochs on bottle, docs/detectors/autoencoder.md) or "topk" (mean of the top ``topk`` share
of the map). Training stops early on the validation reconstruction loss
(normal images only; patience 10) and keeps the best epoch's weights. The source's
"optimal threshold" was chosen on test data; pyad's comes from validation images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import training
from ..ops import gaussian_blur, sequential
from .base import register, stage
from .settings import check
from .trained import TrainedDetector


class ConvAutoEncoder(nn.Module):
    def __init__(self, channels: int = 1, widths=(32, 64, 128)):
        super().__init__()
        enc, c = [], channels
        for w in widths:
            enc += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = w
        dec = []
        for w in reversed(widths):
            dec += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(inplace=True), nn.Upsample(scale_factor=2, mode="nearest")]
            c = w
        dec += [nn.Conv2d(c, channels, 3, padding=1), nn.Sigmoid()]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    def forward(self, x):
        return self.decoder(self.encoder(x))

    def forward_train(self, x):
        """The same function for training: its dense 3x3 layers forward and backward by
        Winograd on the CPU (``ops.sequential(train=True)``)."""
        return sequential(self.decoder, sequential(self.encoder, x, train=True), train=True)


def to_grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, as Keras/PIL convert RGB to grey: [B, 3, H, W] -> [B, 1, H, W]."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def image_score(maps: torch.Tensor, how: str, topk: float) -> torch.Tensor:
    """[B, H, W] -> [B]: the mean, or the mean of the top ``topk`` share of pixels."""
    flat = maps.flatten(1)
    if how == "mean":
        return flat.mean(1)
    k = max(1, int(math.ceil(topk * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(1)


class AutoEncoderModule(nn.Module):
    def __init__(self, net: ConvAutoEncoder, grey: bool, score: str, topk: float, blur_sigma: float):
        super().__init__()
        self.net, self.grey, self.score, self.topk, self.blur_sigma = net, grey, score, topk, blur_sigma

    def forward(self, x: torch.Tensor):
        x = to_grey(x) if self.grey else x
        recon = self.net(x)
        stage("backbone")
        maps = gaussian_blur((x - recon).square().mean(1), self.blur_sigma)
        stage("map")
        return image_score(maps, self.score, self.topk), maps


def augment(x: torch.Tensor, gen: torch.Generator, rotation: float = 10.0, shift: float = 0.1) -> torch.Tensor:
    """Random rotation (± degrees), shift (± share of the size) and horizontal flip,
    per image, with nearest-edge filling as Keras's ImageDataGenerator."""
    b = x.shape[0]
    angle = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(rotation)
    t = (torch.rand(b, 2, generator=gen) * 2 - 1) * shift * 2  # affine_grid works in [-1, 1]
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * flip, -sin, t[:, 0]], 1), torch.stack([sin * flip, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@register("autoencoder")
class AutoEncoder(TrainedDetector):
    """The seed's convolutional autoencoder. ``networks_["ae"]`` after fit.

    grey: reconstruct the grey image (the source) or RGB.
    score: "mean" or "topk" (see the module doc); topk: the share of pixels.
    augment: the rotation / shift / flip augmentation on (the source) or off.
    blur_sigma: Gaussian blur of the map (0: none).
    """

    defaults = dict(max_epochs=100, lr=1e-4, batch_size=16, early_stopping_patience=10)
    # a checkpoint resumes across the scoring parameters (also one of the earlier default score="topk")
    resume_across = frozenset({"score", "topk", "blur_sigma"})

    def __init__(self, *, grey=True, score="mean", topk=0.01, augment=True, blur_sigma=4.0, **common):
        super().__init__(**common)
        self.grey = grey
        self.score = score
        self.topk = topk
        self.augment = augment
        self.blur_sigma = blur_sigma

    def _check_own_params(self):
        check(isinstance(self.grey, bool), "grey", "True or False", self.grey)
        check(self.score in ("topk", "mean"), "score", "'topk' or 'mean'", self.score)
        check(lambda: 0 < self.topk <= 1, "topk", "a share in (0, 1]", self.topk)
        check(isinstance(self.augment, bool), "augment", "True or False", self.augment)
        check(lambda: self.blur_sigma >= 0, "blur_sigma", "a number >= 0", self.blur_sigma)
        check(self.preprocessing.size % 8 == 0, "image_size", "a size divisible by 8 (three poolings)",
              self.preprocessing.size)

    def _normalisation(self):
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # input in [0, 1], as the source

    def _networks(self):
        return {"ae": ConvAutoEncoder(1 if self.grey else 3)}

    def _module(self, net):
        return AutoEncoderModule(net, self.grey, self.score, self.topk, self.blur_sigma)

    def _build_module(self):
        return self._module(self.networks_["ae"])

    def _train(self, nets, train, val, *, labels=None, checkpoint=None):
        ae = nets["ae"]
        opt = training.optimizer("adam", ae.parameters(), self.lr)
        run = training.Run(self.name, modules=nets, optimizers={"adam": opt}, max_epochs=self.max_epochs,
                           max_steps=self.max_steps, checkpoint=checkpoint, device=self.device, amp=self.amp,
                           early_stopping_patience=self.early_stopping_patience if len(val) else None,
                           settings=self.run_settings())
        batches = training.Batches(len(train), self.batch_size, self.seed)
        for epoch in run.epochs():
            ae.train()
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            for idx in run.each(batches.epoch(epoch)):
                x = self.to_input(train[torch.from_numpy(idx)])
                x = to_grey(x) if self.grey else x
                if self.augment:
                    x = augment(x, gen)
                with run.autocast():
                    loss = F.mse_loss(ae.forward_train(x), x)
                run.backward(loss)
                run.log(loss=loss)
            if len(val):
                if run.validate(self._val_loss(ae, val)):
                    break
        run.finish()
        self.history_ = run.history
        return None

    @torch.no_grad()
    def _val_loss(self, ae, val) -> float:
        ae.eval()
        total, n = 0.0, 0
        for start in range(0, len(val), self.batch_size):
            x = self.to_input(val[start : start + self.batch_size])
            x = to_grey(x) if self.grey else x
            total += F.mse_loss(ae(x), x, reduction="sum").item()
            n += x.numel()
        return total / n

    def _buffers(self):
        return {"history": getattr(self, "history_", [])}

    def _load_buffers(self, state):
        self.history_ = state.get("history", [])
