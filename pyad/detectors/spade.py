"""SPADE (Cohen & Hoshen, "Sub-Image Anomaly Detection with Deep Pyramid
Correspondences", 2020).

Image level: the K = 50 nearest training images under the global-average-pooled
``image_layer`` (default layer 4, the pooled vector before the classifier); image
score = mean squared distance to them. Pixel level: every location's feature
pyramid (``layers`` concatenated on the first layer's grid, bilinear) against the
gallery of all locations of those K images; pixel score = mean squared distance to
its κ = 1 nearest gallery features. Map: bilinear upsampling + Gaussian blur σ = 4.
The gallery is held in float16. Validation images are scored against the gallery
of the other training images (the final gallery holds all).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.knn import search_blocks
from ..ops import fast_path, gaussian_blur, knn, upsample
from .base import Validation, register, stage
from .frozen import FrozenFeatureDetector
from .settings import check


class SPADEEmbed(nn.Module):
    """[B, 3, S, S] -> (pooled image features [B, Cg], pyramid [B, h, w, C])."""

    def __init__(self, net: nn.Module, layers, image_layer: str):
        super().__init__()
        self.net, self.layers, self.image_layer = net, tuple(layers), image_layer

    def forward(self, x: torch.Tensor):
        feats = self.net(x)
        stage("backbone")
        glob = feats[self.image_layer].mean((2, 3))
        maps = [feats[name] for name in self.layers]
        size = maps[0].shape[-2:]
        pyr = torch.cat([m if m.shape[-2:] == size else
                         F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps], 1)
        out = glob, pyr.permute(0, 2, 3, 1).contiguous()
        stage("embedding")
        return out


class SPADEHead(nn.Module):
    """Image kNN then pixel kNN against the K nearest images' pyramids."""

    def __init__(self, train_global: torch.Tensor, train_pyramid: torch.Tensor, k_images: int, k_pixels: int,
                 size: int, blur_sigma: float):
        super().__init__()
        self.register_buffer("train_global", train_global.float())
        self.register_buffer("train_pyramid", train_pyramid.half())
        self.k_images, self.k_pixels, self.size, self.blur_sigma = k_images, k_pixels, size, blur_sigma

    def forward(self, emb) -> tuple[torch.Tensor, torch.Tensor]:
        glob, pyr = emb
        k = min(self.k_images, self.train_global.shape[0])
        d2, nearest = knn(glob, self.train_global, k)
        scores = d2.mean(1)
        b, h, w, c = pyr.shape
        if fast_path(pyr):
            maps = torch.from_numpy(self._maps_cpu(pyr.numpy(), nearest.numpy()))
        else:
            maps = self._maps_torch(pyr.reshape(b, h * w, c), nearest).reshape(b, h, w)
        stage("search")
        maps = gaussian_blur(upsample(maps, self.size), self.blur_sigma)
        stage("map")
        return scores, maps

    # gallery images per search: about 64 MB of float32 gallery rows (WRN50 layers 1-3 at
    # 256 px: 2 images; converting and indexing all 50 at once held 2.9 GB per query image)
    _GALLERY_BYTES = 64 << 20

    def _maps_cpu(self, pyr: np.ndarray, nearest: np.ndarray) -> np.ndarray:
        """The exhaustive search over each query image's K gallery images, a few at a time
        (``pyad.kernels.knn_search``'s blocks: the distances reduced to the κ smallest while
        in cache), the κ smallest of all kept: [B, h, w]."""
        b, h, w, c = pyr.shape
        tp = self.train_pyramid.numpy()
        per = max(1, self._GALLERY_BYTES // (4 * tp[0].size))
        maps = np.empty((b, h, w), np.float32)
        for i in range(b):
            q = np.ascontiguousarray(pyr[i].reshape(-1, c), dtype=np.float32)
            best = None
            for s in range(0, nearest.shape[1], per):
                g = np.ascontiguousarray(tp[nearest[i, s : s + per]].reshape(-1, c), dtype=np.float32)
                d, _ = search_blocks(q, g, min(self.k_pixels, len(g)), np.einsum("ij,ij->i", g, g))
                if best is not None:  # the κ smallest of both
                    both = np.concatenate([best, d], 1)
                    d = np.partition(both, min(self.k_pixels, both.shape[1]) - 1, axis=1)[:, : self.k_pixels]
                best = d
            maps[i] = best.mean(1).reshape(h, w)
        return maps

    def _maps_torch(self, q: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """[B, L, C] queries against each image's K gallery images, one gallery image
        at a time (batched over B), the κ smallest kept: [B, L]. Each step is one
        ``baddbmm`` (‖b‖² − 2q·b) and one min / top-κ over its output; ‖q‖² is added
        to the κ kept, not to every pair (the same order)."""
        b, length, c = q.shape
        gallery = self.train_pyramid.reshape(self.train_pyramid.shape[0], -1, c)
        best = None
        for j in range(nearest.shape[1]):
            g = gallery.index_select(0, nearest[:, j]).float()  # [B, L', C]
            d = torch.baddbmm((g * g).sum(-1)[:, None], q, g.transpose(1, 2), alpha=-2.0)
            kk = min(self.k_pixels, d.shape[-1])
            v = d.min(-1, keepdim=True).values if kk == 1 else torch.topk(d, kk, dim=-1, largest=False).values
            best = v if best is None else torch.topk(torch.cat([best, v], -1), min(self.k_pixels, best.shape[-1] + kk),
                                                     dim=-1, largest=False).values
        return (best[..., : self.k_pixels] + (q * q).sum(-1, keepdim=True)).clamp_min(0.0).mean(-1)


class SPADEModule(nn.Module):
    def __init__(self, embed: SPADEEmbed, head: SPADEHead):
        super().__init__()
        self.embed, self.head = embed, head

    def forward(self, x):
        return self.head(self.embed(x))


@register("spade")
class SPADE(FrozenFeatureDetector):
    """SPADE. ``train_global_`` [N, Cg] and ``train_pyramid_`` [N, H, W, C] (float16) after fit."""

    defaults = dict(backbone="wide_resnet50_2", layers=("layer1", "layer2", "layer3"), batch_size=8)

    def __init__(self, *, image_layer="layer4", k_images=50, k_pixels=1, blur_sigma=4.0, **common):
        super().__init__(**common)
        self.image_layer = image_layer
        self.k_images = k_images
        self.k_pixels = k_pixels
        self.blur_sigma = blur_sigma

    def _check_own_params(self):
        check(lambda: isinstance(self.k_images, int) and self.k_images >= 1, "k_images", "a positive int", self.k_images)
        check(lambda: isinstance(self.k_pixels, int) and self.k_pixels >= 1, "k_pixels", "a positive int", self.k_pixels)
        check(isinstance(self.image_layer, str), "image_layer", "a layer name", self.image_layer)
        check(lambda: self.blur_sigma >= 0, "blur_sigma", "a number >= 0", self.blur_sigma)

    def _backbone_layers(self):
        return tuple(self.layers) + ((self.image_layer,) if self.image_layer not in self.layers else ())

    def _embedder(self, net):
        return SPADEEmbed(net, self.layers, self.image_layer)

    def _head(self, glob, pyr) -> SPADEHead:
        return SPADEHead(torch.as_tensor(glob), torch.as_tensor(pyr), self.k_images, self.k_pixels,
                         self.preprocessing.size, self.blur_sigma)

    def _build_module(self):
        return SPADEModule(self._embedder(self._network()), self._head(self.train_global_, self.train_pyramid_))

    def _begin(self, n_fit, n_val):
        self._globs, self._pyrs, self._masks = [], [], []

    def _collect(self, emb, held):
        glob, pyr = emb
        self._globs.append(glob.numpy().copy())
        self._pyrs.append(pyr.numpy().astype(np.float16))
        self._masks.append(held)

    def _finish(self):
        held = np.concatenate(self._masks)
        glob, pyr = np.concatenate(self._globs), np.concatenate(self._pyrs)
        del self._globs, self._pyrs, self._masks
        self.train_global_, self.train_pyramid_ = glob, pyr
        if not held.any():
            return None
        head = self._head(glob[~held], pyr[~held])  # the gallery without the validation images
        scores, maps = [], []
        with torch.inference_mode():
            idx = np.flatnonzero(held)
            for start in range(0, len(idx), self.batch_size):
                at = idx[start : start + self.batch_size]
                s, m = head((torch.from_numpy(glob[at]), torch.from_numpy(pyr[at].astype(np.float32))))
                scores.append(s.numpy())
                maps.append(m.numpy())
        return Validation(np.concatenate(scores), np.concatenate(maps))

    def _state(self):
        return {"train_global": self.train_global_, "train_pyramid": self.train_pyramid_}

    def _load_state(self, state):
        g, p = np.asarray(state["train_global"]), np.asarray(state["train_pyramid"])
        if g.ndim != 2 or p.ndim != 4 or len(g) != len(p):
            raise ValueError(f"train_global / train_pyramid: expected [N, C] and [N, H, W, C'], got {list(g.shape)} "
                             f"and {list(p.shape)}")
        self.train_global_ = np.asarray(state["train_global"], np.float32)
        self.train_pyramid_ = np.asarray(state["train_pyramid"], np.float16)
