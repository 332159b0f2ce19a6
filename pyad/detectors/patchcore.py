"""PatchCore (Roth et al., CVPR 2022), faithful to the official code
(amazon-science/patchcore-inspection, which produced the paper's 99.1% image
AUROC), with the lightweight variants of seed 003 §3.5 as parameters.

Defaults (official ``run_patchcore.py`` / ``patchcore.py``): Wide-ResNet-50-2,
layers 2+3, 3x3 neighbourhoods with stride 1, each layer adaptively averaged to
1024 (MeanMapper), layer 3 bilinearly resized to layer 2's grid, the layers
averaged to 1024 (Aggregator), resize 256 / crop 224, coreset 10% selected on a
random projection to 128 dims from the approximate start of 10 random points
(ApproximateGreedyCoresetSampler), exact nearest neighbour with faiss
IndexFlatL2 (so patch scores are squared L2 distances, as there), image score =
max patch score, map = bilinear upsampling + Gaussian blur σ=4.

Order of operations: the official code unfolds each layer, resizes layer 3's
unfolded patches and then adaptively averages them; averaging and bilinear
resizing are both linear and act on different axes, so pyad averages first (on
the small grid, in the fused kernel) and resizes 1024 channels instead of
9216; the result is the same up to float rounding (tested).
"""

from __future__ import annotations

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from .. import kernels as K
from .base import Detector, _check, register

_POOLING = ("unfold", "avg", "max", "avgmax")


@register
class PatchCore(Detector):
    """PatchCore. ``memory_bank_`` [k, D] float32 after ``fit``.

    pooling: "unfold" (official embedding) or the lightweight "avg", "max",
        "avgmax" pooling of seed 003 §3.5.2, with ``patch_size`` (kernel),
        ``patch_stride`` and ``patch_padding`` (None = kernel // 2).
    embed_dim: per-layer length (None: keep the pooled channels).
    target_dim: length after aggregating the layers (None: concatenate).
    coreset_ratio / memory_bank_size: share of patches kept, or an absolute
        number (seed 003 §3.4 uses 1000); ratio 1.0 keeps every patch.
    coreset_starts: random starting points of the approximate greedy start
        (official: 10); 0 starts the exact greedy selection at patch 0.
    coreset_storage: "float32" (exact) or "float16" / "int8" working storage.
    nn_index: "flat" (exact, official) or "hnsw" (approximate, faster search).
    reweight_neighbors: b of the paper's §3.3 image-score reweighting; None
        keeps the official maximum.
    memory_budget_gb: above this many GB of patch features the unsampled bank
        is held in float16 (selection runs on projected float32 features). The
        bank is held once: fitting needs about (1 + projection_dim / D) x the
        bank's bytes (x 1/2 over budget) plus the backbone.
    """

    def __init__(self, backbone="wide_resnet50_2", weights="imagenet", layers=("layer2", "layer3"),
                 image_size=256, crop_size=224, pooling="unfold", patch_size=3, patch_stride=1, patch_padding=None,
                 embed_dim=1024, target_dim=1024, coreset_ratio=0.1, memory_bank_size=None, projection_dim=128,
                 coreset_starts=10, coreset_storage="float32", nn_index="flat", reweight_neighbors=None,
                 memory_budget_gb=4.0, blur_sigma=4.0, device="cpu", batch_size=8, seed=0,
                 threshold_quantile=0.99, threshold_holdout=0.1):
        super().__init__(backbone=backbone, weights=weights, layers=layers, image_size=image_size,
                         crop_size=crop_size, device=device, batch_size=batch_size, seed=seed,
                         threshold_quantile=threshold_quantile, threshold_holdout=threshold_holdout,
                         blur_sigma=blur_sigma)
        self.pooling = pooling
        self.patch_size = patch_size
        self.patch_stride = patch_stride
        self.patch_padding = patch_padding
        self.embed_dim = embed_dim
        self.target_dim = target_dim
        self.coreset_ratio = coreset_ratio
        self.memory_bank_size = memory_bank_size
        self.projection_dim = projection_dim
        self.coreset_starts = coreset_starts
        self.coreset_storage = coreset_storage
        self.nn_index = nn_index
        self.reweight_neighbors = reweight_neighbors
        self.memory_budget_gb = memory_budget_gb

    def _check_own_params(self):
        _check(self.pooling in _POOLING, "pooling", f"one of {_POOLING}", self.pooling)
        _check(isinstance(self.patch_size, int) and self.patch_size >= 1, "patch_size", "a positive int", self.patch_size)
        _check(0 < self.coreset_ratio <= 1, "coreset_ratio", "a number in (0, 1]", self.coreset_ratio)
        _check(self.memory_bank_size is None or (isinstance(self.memory_bank_size, int) and self.memory_bank_size >= 1),
               "memory_bank_size", "None or a positive int", self.memory_bank_size)
        _check(self.nn_index in ("flat", "hnsw"), "nn_index", "'flat' or 'hnsw'", self.nn_index)
        _check(self.reweight_neighbors is None or (isinstance(self.reweight_neighbors, int) and self.reweight_neighbors >= 1),
               "reweight_neighbors", "None or a positive int", self.reweight_neighbors)

    # -- embedding --------------------------------------------------------------
    def _embed(self, feats):
        """{layer: [B, C, h, w]} -> [B, H, W, D] float32 patch features."""
        k, s = self.patch_size, self.patch_stride
        p = (k - 1) // 2 if self.patch_padding is None else self.patch_padding
        ref, out = None, []
        for name in self.layers:
            f = feats[name].numpy()
            if self.embed_dim is None and self.pooling != "unfold":
                e = K.patch_pool(f, k, s, p, self.pooling)
            else:
                dim = self.embed_dim or f.shape[1] * k * k
                e = K.patch_embed(f, dim, k, s, p, self.pooling)  # per layer: MeanMapper(unfold)
            if ref is None:
                ref = e.shape[1:3]
            elif e.shape[1:3] != ref:  # bring deeper layers to the first layer's grid
                t = torch.from_numpy(e).permute(0, 3, 1, 2)
                e = F.interpolate(t, size=ref, mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
            out.append(np.ascontiguousarray(e))
        cat = np.concatenate(out, axis=-1)  # layer-major, as the official Aggregator stacks them
        return K.channel_pool(cat, self.target_dim) if self.target_dim else cat

    # -- fitting ----------------------------------------------------------------
    # Patch features are kept per batch and projected as they arrive; selection
    # runs on the projected rows and only the selected rows are gathered, so the
    # unsampled bank is never copied (peak memory: the bank once, plus its
    # 128-d projection).
    def _begin_fit(self):
        self._parts, self._proj, self._holdmask, self._bytes = [], [], [], 0

    def _projects(self, d: int) -> bool:
        return bool(self.projection_dim) and self.projection_dim < d

    def _collect(self, emb, mask):
        flat = emb.reshape(-1, emb.shape[-1])
        self._bytes += flat.nbytes
        if self._bytes > self.memory_budget_gb * 2**30 and self._parts and self._parts[0].dtype != np.float16:
            self._parts = [q.astype(np.float16) for q in self._parts]  # over budget: hold the bank in half
        if self._projects(flat.shape[1]):
            self._proj.append(K.random_projection(flat, self.projection_dim, seed=self.seed))
        self._parts.append(flat.astype(self._parts[0].dtype) if self._parts else flat)
        self._holdmask.append(np.repeat(mask, len(flat) // len(mask)))

    def _finish(self, exclude_holdout):
        held = np.concatenate(self._holdmask)
        rows = np.flatnonzero(~held) if exclude_holdout else np.arange(len(held))
        k = min(len(rows), self.memory_bank_size or max(1, int(len(rows) * self.coreset_ratio)))
        if k < len(rows):
            d = self._parts[0].shape[1]
            space = np.concatenate(self._proj) if self._projects(d) else np.concatenate(self._parts)
            rows = rows[self._select(np.ascontiguousarray(space[rows], dtype=np.float32), k)]
        bank = self._gather(rows)
        if not exclude_holdout:
            del self._parts, self._proj, self._holdmask
        return self._index(bank)

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """Rows of the per-batch feature parts, in the order given, as float32."""
        offsets = np.cumsum([0] + [len(q) for q in self._parts])
        part = np.searchsorted(offsets, rows, side="right") - 1
        out = np.empty((len(rows), self._parts[0].shape[1]), np.float32)
        for i in np.unique(part):
            at = np.flatnonzero(part == i)
            out[at] = self._parts[i][rows[at] - offsets[i]]
        return out

    def _select(self, proj: np.ndarray, k: int) -> np.ndarray:
        """ApproximateGreedyCoresetSampler on (projected) features: start from the
        point with the largest mean distance to ``coreset_starts`` random points,
        then greedy farthest-point selection."""
        if not self.coreset_starts:
            return K.greedy_coreset(proj, k, 0, storage=self.coreset_storage)
        rng = np.random.default_rng(self.seed)
        starts = proj[rng.choice(len(proj), min(self.coreset_starts, len(proj)), replace=False)]
        sq = (proj * proj).sum(1)[:, None] - 2 * proj @ starts.T + (starts * starts).sum(1)[None]
        init = np.sqrt(np.clip(sq, 0, None)).mean(1)
        return K.greedy_coreset(proj, k, None, init_distances=init, storage=self.coreset_storage)

    def _index(self, bank: np.ndarray):
        if self.nn_index == "hnsw":
            index = faiss.IndexHNSWFlat(bank.shape[1], 32)
        else:
            index = faiss.IndexFlatL2(bank.shape[1])
        index.add(bank)
        return bank, index

    def _set_state(self, state):
        self.memory_bank_, self._faiss = state

    def _get_state(self):
        if getattr(self, "_faiss", None) is None:
            with self._lock:
                if getattr(self, "_faiss", None) is None:
                    self._faiss = self._index(self.memory_bank_)[1]
        return self.memory_bank_, self._faiss

    # -- scoring ----------------------------------------------------------------
    def _score(self, state, emb):
        bank, index = state
        b, h, w, d = emb.shape
        q = np.ascontiguousarray(emb.reshape(-1, d), dtype=np.float32)
        dist, nn = index.search(q, 1)  # squared L2, as the official FaissNN
        patch = dist[:, 0].reshape(b, h * w)
        scores = patch.max(1)
        if self.reweight_neighbors:
            scores = self._reweight(bank, index, q.reshape(b, h * w, d), patch, nn[:, 0].reshape(b, h * w), scores)
        return scores, patch.reshape(b, h, w)

    def _reweight(self, bank, index, q, patch, nn, scores):
        """Paper §3.3: s = (1 - exp‖m_test* - m*‖ / Σ_{m ∈ N_b(m*)} exp‖m_test* - m‖) · s*."""
        out = scores.astype(np.float64).copy()
        for i in range(len(q)):
            p = int(np.argmax(patch[i]))
            m_star = bank[nn[i, p]][None]
            _, nb = index.search(m_star, min(self.reweight_neighbors, len(bank)))
            dists = np.linalg.norm(bank[nb[0]] - q[i, p], axis=1).astype(np.float64)
            own = np.linalg.norm(bank[nn[i, p]] - q[i, p])
            out[i] = (1.0 - 1.0 / np.exp(dists - own).sum()) * scores[i]
        return out.astype(np.float32)

    def _arrays(self):
        return {"memory_bank": self.memory_bank_}

    def _load_arrays(self, arrays):
        self.memory_bank_ = np.ascontiguousarray(arrays["memory_bank"], dtype=np.float32)
        self._faiss = None
