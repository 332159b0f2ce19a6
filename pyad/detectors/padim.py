"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly
Detection and Localization", ICPR 2020; official code xiahaifeng1995/PaDiM-Anomaly-
Detection-Localization-master).

Layers 1-3 concatenated on layer 1's grid (nearest upsampling), a seeded random
subset of channels (``n_features``), one Gaussian per position (sample covariance
+ eps·I, eps = 0.01) fitted streaming with the compiled accumulator, Mahalanobis
map, bilinear upsampling, Gaussian blur σ = 4, image score = map maximum.

``n_features="auto"``: the paper's 100 for ResNet-18 and 550 for Wide-ResNet-50-2;
for any other backbone 100 when layers 1-3 hold at most 512 channels (ResNet-34,
MobileNetV2, EfficientNet-Lite/B0-B3), else 550 — about the paper's share of the
channels. Before any work, ``fit`` refuses a configuration whose statistics
(float64 accumulator, P·d(d+1)/2 values, plus the factor) exceed ``memory_budget_gb``.

Validation without solving twice: the validation images are accumulated with the
others, and their distances under the Gaussians fitted *without* them come from
the final factorisation by a low-rank (Woodbury) downdate
(``GaussianAccumulator.finalize(holdout=...)``; that model's eps is eps·(N-1)/(n-1)).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import _progress
from .. import kernels as K
from ..ops import Mahalanobis, gaussian_blur, upsample
from .base import Validation, register, stage
from .frozen import FrozenFeatureDetector
from .settings import check

N_FEATURES = {"resnet18": 100, "wide_resnet50_2": 550}


class PaDiMEmbed(nn.Module):
    """Backbone + channel subset on the first layer's grid: [B, 3, S, S] -> [B, P, d]."""

    def __init__(self, net: nn.Module, layers, channels: np.ndarray, layer_channels: list[int]):
        super().__init__()
        self.net, self.layers = net, tuple(layers)
        start = 0
        for i, c in enumerate(layer_channels):
            sel = channels[(channels >= start) & (channels < start + c)] - start
            self.register_buffer(f"sel{i}", torch.from_numpy(sel.astype(np.int64)), persistent=False)
            start += c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.net(x)
        stage("backbone")
        maps = [feats[name] for name in self.layers]
        h0, w0 = maps[0].shape[-2:]
        parts = []
        for i, m in enumerate(maps):  # the channel subset before upsampling: same result, a fraction of the work
            sel = getattr(self, f"sel{i}")
            if not len(sel):
                continue
            h, w = m.shape[-2:]
            if h0 % h or w0 % w:  # a non-integer scale: torch's nearest resize
                parts.append(F.interpolate(m.index_select(1, sel), size=(h0, w0), mode="nearest").permute(0, 2, 3, 1))
                continue
            # position-major [B, h, w, k] (a view of the channels-last backbone's output); nearest
            # upsampling by an integer factor repeats each cell, written once by the concatenation
            # (was: select, upsample, concatenate, transpose: four passes; PaDiM R18 fit 5.5 -> 2 ms/image)
            m = m.permute(0, 2, 3, 1).index_select(3, sel)
            if (h, w) != (h0, w0):
                rh, rw = h0 // h, w0 // w
                m = m[:, :, None, :, None, :].expand(-1, h, rh, w, rw, -1).reshape(m.shape[0], h0, w0, len(sel))
            parts.append(m)
        out = torch.cat(parts, 3).flatten(1, 2)
        stage("embedding")
        return out


class PaDiMHead(nn.Module):
    """Gaussian scoring: [B, P, d] -> (scores [B], maps [B, S, S])."""

    def __init__(self, gaussian: K.GaussianModel, grid: tuple[int, int], size: int, blur_sigma: float):
        super().__init__()
        self.maha = Mahalanobis(torch.from_numpy(gaussian.mean), torch.from_numpy(gaussian.factor),
                                gaussian.eps, gaussian.count)
        self.grid, self.size, self.blur_sigma = tuple(grid), size, blur_sigma

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.maha(emb).reshape(emb.shape[0], *self.grid)
        stage("search")
        return self.to_map(dist)

    def to_map(self, dist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = gaussian_blur(upsample(dist, self.size), self.blur_sigma)  # PaDiM scores the smoothed map
        stage("map")
        return maps.flatten(1).max(1).values, maps


class PaDiMModule(nn.Module):
    def __init__(self, embed: PaDiMEmbed, head: PaDiMHead):
        super().__init__()
        self.embed, self.head = embed, head

    def forward(self, x):
        return self.head(self.embed(x))


@register("padim")
class PaDiM(FrozenFeatureDetector):
    """PaDiM. ``gaussian_`` (mean [P, d], packed factor), ``channels_`` and ``grid_`` after fit.

    n_features: "auto" (see the module docstring), an int, or None (all channels).
    factor_dtype: "float32" or "float16" (half the model, scores within 1e-3).
    memory_budget_gb: refuse configurations whose Gaussian statistics exceed it.
    batch_size: 16 keeps the peak memory of a bottle-sized ResNet-18 fit near 1 GB.
    """

    defaults = dict(backbone="resnet18", layers=("layer1", "layer2", "layer3"), batch_size=16)

    def __init__(self, *, n_features="auto", eps=0.01, factor_dtype="float32", memory_budget_gb=8.0, blur_sigma=4.0,
                 **common):
        super().__init__(**common)
        self.n_features = n_features
        self.eps = eps
        self.factor_dtype = factor_dtype
        self.memory_budget_gb = memory_budget_gb
        self.blur_sigma = blur_sigma

    def _check_own_params(self):
        check(lambda: self.n_features in ("auto", None) or (isinstance(self.n_features, int) and self.n_features >= 1),
              "n_features", "'auto', None or a positive int", self.n_features)
        check(lambda: self.eps >= 0, "eps", "a number >= 0", self.eps)
        check(self.factor_dtype in ("float32", "float16"), "factor_dtype", "'float32' or 'float16'", self.factor_dtype)
        check(lambda: self.memory_budget_gb > 0, "memory_budget_gb", "a positive number", self.memory_budget_gb)
        check(lambda: self.blur_sigma >= 0, "blur_sigma", "a number >= 0", self.blur_sigma)

    def _choose_channels(self, net) -> None:
        """``channels_`` and ``grid_`` from the backbone's shapes, and the memory check,
        before any image is read."""
        shapes = net.shapes(self.preprocessing.size)
        per_layer = [shapes[name][0] for name in self.layers]
        total = sum(per_layer)
        n = self.n_features
        if n == "auto":
            n = min(total, N_FEATURES.get(self.backbone, 100 if total <= 512 else 550))
        elif n is None:
            n = total
        if n > total:
            raise ValueError(f"n_features: {n} exceeds the {total} channels of layers {self.layers}")
        grid = shapes[self.layers[0]][1:]
        p = grid[0] * grid[1]
        need = p * (n * (n + 1) // 2) * (8 + np.dtype(self.factor_dtype).itemsize) / 2**30
        if need > self.memory_budget_gb:
            raise ValueError(f"n_features: {n} channels at {grid[0]}x{grid[1]} positions need about {need:.1f} GB of "
                             f"Gaussian statistics, over memory_budget_gb={self.memory_budget_gb}; use fewer "
                             "n_features, a smaller image_size, or raise memory_budget_gb")
        rng = np.random.default_rng(self.seed)
        self.channels_ = np.sort(rng.choice(total, n, replace=False)) if n < total else np.arange(total)
        self.grid_ = tuple(int(v) for v in grid)
        self._layer_channels = per_layer

    # -- the inference module ---------------------------------------------------------------------------
    def _embedder(self, net):
        if not hasattr(self, "_layer_channels"):
            self._layer_channels = [net.shapes(self.preprocessing.size)[name][0] for name in self.layers]
        return PaDiMEmbed(net, self.layers, self.channels_, self._layer_channels)

    def _head(self, gaussian) -> PaDiMHead:
        return PaDiMHead(gaussian, self.grid_, self.preprocessing.size, self.blur_sigma)

    def _build_module(self):
        return PaDiMModule(self._embedder(self._network()), self._head(self.gaussian_))

    # -- fitting ------------------------------------------------------------------------------------------
    # embeddings are buffered to this many images per accumulator update: one larger
    # GEMM and one packing pass per 64 images instead of per batch (fit 2x faster in
    # the update step for 80 MB of buffer at ResNet-18's d = 100)
    _UPDATE_IMAGES = 64

    def _fit(self, items, val_items, *, labels=None, checkpoint=None):
        self._choose_channels(self._network())
        return super()._fit(items, val_items, labels=labels, checkpoint=checkpoint)

    def _begin(self, n_fit, n_val):
        self._acc = K.GaussianAccumulator(self.eps, self.factor_dtype)
        self._val, self._buffer, self._fill = [], None, 0

    def _collect(self, emb, held):
        emb = emb.numpy()
        self._add(emb)  # validation images too: their scores come from a downdate (see the module doc)
        if held.any():
            self._val.append(emb[held].copy())

    def _add(self, emb):
        """Copy into one preallocated buffer; update the accumulator when it is full."""
        while len(emb):
            if self._buffer is None:
                self._buffer, self._fill = np.empty((self._UPDATE_IMAGES, *emb.shape[1:]), np.float32), 0
            take = min(len(emb), len(self._buffer) - self._fill)
            self._buffer[self._fill : self._fill + take] = emb[:take]
            self._fill += take
            emb = emb[take:]
            if self._fill == len(self._buffer):
                self._flush()

    def _flush(self):
        if self._buffer is not None and self._fill:
            self._acc.update(self._buffer[: self._fill])
            self._fill = 0

    def _finish(self):
        self._flush()
        self._buffer = None  # not held while the model is solved
        held = np.concatenate(self._val) if self._val else None
        self._val = None
        p, d = self._acc._shift.shape
        with _progress.stage(f"PaDiM: solving {p:,} Gaussians of dimension {d}"):
            if held is not None:
                self.gaussian_, held_dist = self._acc.finalize(holdout=held)
            else:
                self.gaussian_ = self._acc.finalize()
        del self._acc
        if held is None:
            return None
        head = self._head(self.gaussian_)
        scores, maps = [], []
        with torch.inference_mode():
            for start in range(0, len(held_dist), self.batch_size):
                d = torch.from_numpy(held_dist[start : start + self.batch_size]).reshape(-1, *self.grid_)
                s, m = head.to_map(d)
                scores.append(s.numpy())
                maps.append(m.numpy())
        return Validation(np.concatenate(scores), np.concatenate(maps))

    # -- state ----------------------------------------------------------------------------------------------
    def _state(self):
        g = self.gaussian_
        return {"mean": g.mean, "factor": g.factor, "eps": g.eps, "count": g.count,
                "channels": self.channels_, "grid": list(self.grid_)}

    def _load_state(self, state):
        mean, factor, channels, grid = (np.asarray(state[k]) for k in ("mean", "factor", "channels", "grid"))
        if (mean.ndim != 2 or factor.shape != (mean.shape[0], mean.shape[1] * (mean.shape[1] + 1) // 2)
                or channels.shape != (mean.shape[1],) or int(np.prod(grid)) != mean.shape[0]):
            raise ValueError(f"gaussian: inconsistent shapes: mean {list(mean.shape)}, factor {list(factor.shape)}, "
                             f"channels {list(channels.shape)}, grid {list(grid)}")
        self.gaussian_ = K.GaussianModel(np.asarray(state["mean"], np.float32), np.asarray(state["factor"]),
                                         float(state["eps"]), int(state["count"]))
        self.channels_ = np.asarray(state["channels"], np.int64)
        self.grid_ = tuple(int(v) for v in state["grid"])
