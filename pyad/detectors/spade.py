"""SPADE (Cohen & Hoshen 2020; seed 003 §2.6).

Image level: the K = 50 nearest training images under the global-average-pooled
``image_layer`` (default layer 4, the pooled vector before the classifier);
image score = mean squared distance to them. Pixel level: every location's
feature pyramid (``layers`` concatenated on the first layer's grid, bilinear)
against the gallery of all locations of those K images; pixel score = mean
squared distance to its κ = 1 nearest gallery features. Map: bilinear
upsampling + Gaussian blur σ=4. The gallery is held in float16.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from .base import Detector, _check, register


@register
class SPADE(Detector):
    """SPADE. ``train_global_`` [N, Cg] and ``train_pyramid_`` [N, H, W, C] after fit."""

    def __init__(self, backbone="wide_resnet50_2", weights="imagenet", layers=("layer1", "layer2", "layer3"),
                 image_layer="layer4", k_images=50, k_pixels=1, image_size=256, crop_size=224, blur_sigma=4.0,
                 device="cpu", batch_size=8, seed=0, threshold_quantile=0.99, threshold_holdout=0.1):
        super().__init__(backbone=backbone, weights=weights, layers=layers, image_size=image_size,
                         crop_size=crop_size, device=device, batch_size=batch_size, seed=seed,
                         threshold_quantile=threshold_quantile, threshold_holdout=threshold_holdout,
                         blur_sigma=blur_sigma)
        self.image_layer = image_layer
        self.k_images = k_images
        self.k_pixels = k_pixels

    def _check_own_params(self):
        _check(isinstance(self.k_images, int) and self.k_images >= 1, "k_images", "a positive int", self.k_images)
        _check(isinstance(self.k_pixels, int) and self.k_pixels >= 1, "k_pixels", "a positive int", self.k_pixels)

    def _backbone_layers(self):
        return self.layers + ((self.image_layer,) if self.image_layer not in self.layers else ())

    def _embed(self, feats):
        glob = feats[self.image_layer].mean((2, 3)).numpy()
        maps = [feats[name] for name in self.layers]
        size = maps[0].shape[-2:]
        pyr = torch.cat([m if m.shape[-2:] == size else
                         F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps], 1)
        return glob, pyr.permute(0, 2, 3, 1).contiguous().numpy()

    def _begin_fit(self):
        self._globs, self._pyrs, self._masks = [], [], []

    def _collect(self, emb, mask):
        self._globs.append(emb[0])
        self._pyrs.append(emb[1].astype(np.float16))
        self._masks.append(mask)

    def _take(self, emb, mask):
        return emb[0][mask], emb[1][mask]

    def _finish(self, exclude_holdout):
        keep = ~np.concatenate(self._masks) if exclude_holdout else slice(None)
        state = np.concatenate(self._globs)[keep], np.concatenate(self._pyrs)[keep]
        if not exclude_holdout:
            del self._globs, self._pyrs, self._masks
        return state

    def _set_state(self, state):
        self.train_global_, self.train_pyramid_ = state

    def _get_state(self):
        return self.train_global_, self.train_pyramid_

    def _score(self, state, emb):
        tg, tp = state
        glob, pyr = emb
        k = min(self.k_images, len(tg))
        d2 = (glob * glob).sum(1)[:, None] - 2 * glob @ tg.T + (tg * tg).sum(1)[None]
        d2 = np.clip(d2, 0, None)
        nearest = np.argsort(d2, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(d2, nearest, 1).mean(1)
        b, h, w, c = pyr.shape
        maps = np.empty((b, h, w), np.float32)
        for i in range(b):
            index = faiss.IndexFlatL2(c)
            index.add(np.ascontiguousarray(tp[nearest[i]].reshape(-1, c), dtype=np.float32))
            dist, _ = index.search(np.ascontiguousarray(pyr[i].reshape(-1, c)), min(self.k_pixels, index.ntotal))
            maps[i] = dist.mean(1).reshape(h, w)
        return scores.astype(np.float32), maps

    def _arrays(self):
        return {"train_global": self.train_global_, "train_pyramid": self.train_pyramid_}

    def _load_arrays(self, arrays):
        self.train_global_ = arrays["train_global"]
        self.train_pyramid_ = arrays["train_pyramid"]
