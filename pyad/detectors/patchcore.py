"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection",
CVPR 2022), faithful to the official code (amazon-science/patchcore-inspection,
``patchcore/patchcore.py``, ``common.py``, ``sampler.py``), with the lightweight
variants studied for CPU deployment as parameters.

Defaults as the official ``run_patchcore.py``: Wide-ResNet-50-2, layers 2+3, 3x3
neighbourhoods with stride 1, each layer adaptively averaged to 1024 (MeanMapper),
layer 3 bilinearly resized to layer 2's grid, the layers averaged to 1024
(Aggregator), coreset 10% selected on a random projection to 128 dims from the
approximate start of 10 random points (ApproximateGreedyCoresetSampler), exact
nearest neighbour (faiss ``IndexFlatL2``: patch scores are squared L2 distances, as
there), image score = max patch score, map = bilinear upsampling + Gaussian blur
σ = 4. The official resize 256 / centre crop 224 is ``crop_size=224``; pyad's
default scores the whole 256² image (no blind border).

Order of operations: the official code unfolds each layer, resizes layer 3's
unfolded patches and then averages them; averaging and bilinear resizing are both
linear and act on different axes, so pyad averages first (on the small grid, in
the fused kernel) and resizes 1024 channels instead of 9216 (equal up to float
rounding, tested).

Validation without selecting twice: the coreset of the training part is selected
first and scores the held-out validation images; the greedy selection then
continues over all patches (a greedy prefix is a valid start of greedy k-center),
so the final bank covers every training image and costs one selection.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import _progress
from .. import kernels as K
from ..ops import NearestNeighbours, PatchEmbed, channel_pool, gaussian_blur, upsample
from .base import register, stage
from .frozen import FrozenFeatureDetector, validation_from
from .settings import check

_POOLING = ("unfold", "avg", "max", "avgmax")


def _host(a):
    """A kernel result as a host array (CUDA tensors are copied back)."""
    return a.cpu().numpy() if isinstance(a, torch.Tensor) else a


class PatchCoreEmbed(nn.Module):
    """Backbone + patch embedding: [B, 3, S, S] -> [B, H, W, D] (H, W: first layer's grid)."""

    def __init__(self, net: nn.Module, layers, pooling: str, kernel: int, stride: int, padding: int,
                 embed_dim: int | None, target_dim: int | None):
        super().__init__()
        self.net = net
        self.layers = tuple(layers)
        dim = embed_dim if (embed_dim or pooling != "unfold") else None
        self.embeds = nn.ModuleList(PatchEmbed(dim, kernel, stride, padding, pooling) for _ in self.layers)
        self.target_dim = target_dim
        # The Aggregator's adaptive average over the layer-major concatenation never
        # straddles two layers when target_dim is a multiple of the layer count: it is
        # then the same average per layer, taken before upsampling (both are linear, one
        # over channels, one over positions): WRN50 embedding 14.4 -> 8.3 ms per image.
        n = len(self.layers)
        self.per_layer = target_dim // n if target_dim and n > 1 and target_dim % n == 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.net(x)
        stage("backbone")
        ref, out = None, []
        for name, embed in zip(self.layers, self.embeds):
            e = embed(feats[name])  # per layer: MeanMapper(unfold)
            if self.per_layer:
                e = channel_pool(e, self.per_layer)
            if ref is None:
                ref = tuple(e.shape[1:3])
            elif tuple(e.shape[1:3]) != ref:  # deeper layers onto the first layer's grid
                e = F.interpolate(e.permute(0, 3, 1, 2), size=ref, mode="bilinear",
                                  align_corners=False).permute(0, 2, 3, 1)
            out.append(e)
        cat = torch.cat(out, -1) if len(out) > 1 else out[0]  # layer-major, as the Aggregator stacks them
        emb = channel_pool(cat, self.target_dim) if self.target_dim and not self.per_layer else cat
        stage("embedding")
        return emb


class PatchCoreHead(nn.Module):
    """Memory-bank scoring: [B, H, W, D] -> (scores [B], maps [B, S, S])."""

    def __init__(self, bank: torch.Tensor, size: int, blur_sigma: float, nn_index: str = "flat",
                 reweight_neighbors: int | None = None):
        super().__init__()
        self.nn = NearestNeighbours(bank, 1, nn_index)
        self.size, self.blur_sigma, self.reweight = size, blur_sigma, reweight_neighbors

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, w, d = emb.shape
        q = emb.reshape(b * h * w, d)
        dist, idx = self.nn(q)  # squared L2, as the official FaissNN
        patch = dist[:, 0].reshape(b, h * w)
        scores = patch.max(1).values
        if self.reweight:
            scores = self._reweight(q.reshape(b, h * w, d), patch, idx[:, 0].reshape(b, h * w), scores)
        stage("search")
        maps = gaussian_blur(upsample(patch.reshape(b, h, w), self.size), self.blur_sigma)
        stage("map")
        return scores, maps

    def _reweight(self, q, patch, nn_idx, scores):
        """Paper §3.3: s = (1 − exp‖m_test* − m*‖ / Σ_{m ∈ N_b(m*)} exp‖m_test* − m‖) · s*."""
        bank = self.nn.bank
        p = patch.argmax(1)
        rows = torch.arange(len(q), device=q.device)
        q_star = q[rows, p]  # [B, D]
        m_star = bank[nn_idx[rows, p]]  # [B, D]
        _, nb = self.nn(m_star, k=min(self.reweight, bank.shape[0]))  # [B, b]
        dists = (bank[nb] - q_star[:, None]).double().norm(dim=-1)
        own = (m_star - q_star).double().norm(dim=-1, keepdim=True)
        return ((1.0 - 1.0 / torch.exp(dists - own).sum(1)) * scores.double()).float()


class PatchCoreModule(nn.Module):
    def __init__(self, embed: PatchCoreEmbed, head: PatchCoreHead):
        super().__init__()
        self.embed, self.head = embed, head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.embed(x))


@register("patchcore")
class PatchCore(FrozenFeatureDetector):
    """PatchCore. ``memory_bank_`` [k, D] float32 after ``fit``.

    pooling: "unfold" (official embedding) or the lightweight "avg", "max",
        "avgmax" pooling (Baßler, KIT thesis 2024: avg 3x3 / stride 1 best on CPU),
        with ``patch_size`` (kernel), ``patch_stride`` and ``patch_padding``
        (None = kernel // 2).
    embed_dim: per-layer length (None: keep the pooled channels).
    target_dim: length after aggregating the layers (None: concatenate).
    coreset_ratio / memory_bank_size: share of patches kept, or an absolute number
        (e.g. 1000 for the lightweight setting); ratio 1.0 keeps every patch.
    coreset_starts: random starting points of the approximate greedy start
        (official: 10); 0 starts the exact greedy selection at patch 0.
    coreset_storage: "float32" (exact) or "float16" / "int8" working storage.
    nn_index: "flat" (exact, official) or "hnsw" (approximate, faster search).
    reweight_neighbors: b of the paper's §3.3 image-score reweighting; None keeps
        the official maximum.
    memory_budget_gb: above this many GB of patch features the unsampled bank is
        held in float16 (selection runs on projected float32 features).
    """

    defaults = dict(backbone="wide_resnet50_2", layers=("layer2", "layer3"), batch_size=8)

    def __init__(self, *, pooling="unfold", patch_size=3, patch_stride=1, patch_padding=None, embed_dim=1024,
                 target_dim=1024, coreset_ratio=0.1, memory_bank_size=None, projection_dim=128, coreset_starts=10,
                 coreset_storage="float32", nn_index="flat", reweight_neighbors=None, memory_budget_gb=4.0,
                 blur_sigma=4.0, **common):
        super().__init__(**common)
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
        self.blur_sigma = blur_sigma

    def _check_own_params(self):
        check(self.pooling in _POOLING, "pooling", f"one of {_POOLING}", self.pooling)
        check(lambda: isinstance(self.patch_size, int) and self.patch_size >= 1, "patch_size", "a positive int",
              self.patch_size)
        check(lambda: isinstance(self.patch_stride, int) and self.patch_stride >= 1, "patch_stride", "a positive int",
              self.patch_stride)
        check(lambda: 0 < self.coreset_ratio <= 1, "coreset_ratio", "a number in (0, 1]", self.coreset_ratio)
        check(lambda: self.memory_bank_size is None or (isinstance(self.memory_bank_size, int)
                                                        and self.memory_bank_size >= 1),
              "memory_bank_size", "None or a positive int", self.memory_bank_size)
        check(self.coreset_storage in ("float32", "float16", "int8"), "coreset_storage",
              "'float32', 'float16' or 'int8'", self.coreset_storage)
        check(self.nn_index in ("flat", "hnsw"), "nn_index", "'flat' or 'hnsw'", self.nn_index)
        check(lambda: self.reweight_neighbors is None or (isinstance(self.reweight_neighbors, int)
                                                          and self.reweight_neighbors >= 1),
              "reweight_neighbors", "None or a positive int", self.reweight_neighbors)
        check(lambda: self.blur_sigma >= 0, "blur_sigma", "a number >= 0", self.blur_sigma)
        check(lambda: self.memory_budget_gb > 0, "memory_budget_gb", "a positive number", self.memory_budget_gb)

    # -- the inference module -------------------------------------------------------------------------
    def _embedder(self, net):
        k = self.patch_size
        p = (k - 1) // 2 if self.patch_padding is None else self.patch_padding
        return PatchCoreEmbed(net, self.layers, self.pooling, k, self.patch_stride, p, self.embed_dim, self.target_dim)

    def _head(self, bank) -> PatchCoreHead:
        bank = torch.as_tensor(bank, dtype=torch.float32)
        return PatchCoreHead(bank, self.preprocessing.size, self.blur_sigma, self.nn_index, self.reweight_neighbors)

    def _build_module(self):
        return PatchCoreModule(self._embedder(self._network()), self._head(self.memory_bank_))

    # -- fitting ----------------------------------------------------------------------------------------
    # Patch features are kept per batch and projected as they arrive; selection runs
    # on the projected rows and only the selected rows are gathered, so the
    # unsampled bank is never copied (peak: the bank once plus its projection).
    def _begin(self, n_fit, n_val):
        self._parts, self._proj, self._held, self._bytes, self._grid = [], [], [], 0, None

    def _projects(self, d: int) -> bool:
        return bool(self.projection_dim) and self.projection_dim < d

    def _collect(self, emb, held):
        self._grid = tuple(emb.shape[1:3])  # the held images' rows are gathered back from the parts when scored
        flat = emb.reshape(-1, emb.shape[-1]).numpy()
        self._bytes += flat.nbytes
        if self._bytes > self.memory_budget_gb * 2**30 and self._parts and self._parts[0].dtype != np.float16:
            self._parts = [q.astype(np.float16) for q in self._parts]  # over budget: hold the bank in half
        if self._projects(flat.shape[1]):
            self._proj.append(K.random_projection(flat, self.projection_dim, seed=self.seed))
        self._parts.append(flat.astype(self._parts[0].dtype) if self._parts else np.array(flat))
        self._held.append(np.repeat(held, len(flat) // len(held)))

    def _bank_size(self, rows: int) -> int:
        return min(rows, self.memory_bank_size or max(1, int(rows * self.coreset_ratio)))

    def _finish(self):
        held = np.concatenate(self._held)
        space = np.concatenate(self._proj) if self._projects(self._parts[0].shape[1]) else None
        if space is None:
            space = np.concatenate([q.astype(np.float32) for q in self._parts])
        fit_rows, val_rows = np.flatnonzero(~held), np.flatnonzero(held)
        init = self._approximate_start(space, fit_rows)
        k_fit = self._bank_size(len(fit_rows))
        k_all = self._bank_size(len(held))
        with _progress.stage(f"PatchCore: selecting a coreset of {k_all:,} of {len(held):,} patches"):
            return self._select(space, held, fit_rows, val_rows, init, k_fit, k_all)

    def _select(self, space, held, fit_rows, val_rows, init, k_fit, k_all, held_embeddings=None):
        """``held_embeddings``: the validation images' embeddings when the parts do not hold
        their rows (a sharded fit's union, distributed.py); by default gathered from the parts."""
        if k_fit < len(fit_rows):
            sel, dist = K.greedy_coreset(self._on_device(space[fit_rows]), k_fit, None if init is not None else 0,
                                         init_distances=None if init is None else init[fit_rows],
                                         storage=self.coreset_storage, return_distances=True)
            sel, dist = _host(sel), _host(dist)
            prefix = fit_rows[np.asarray(sel)]
        else:
            prefix, dist = fit_rows, np.zeros(len(fit_rows), np.float32)
        if held_embeddings is None:
            held_embeddings = self._held_embeddings(val_rows)
        val = validation_from(self._head(self._gather(prefix)), held_embeddings)
        rows = prefix
        if len(val_rows) and k_all > len(prefix):
            # continue the greedy selection over every patch from the training part's selection
            start = np.full(len(held), 1e30, np.float32) if init is None else init.copy()  # 1e30: not reached yet
            start[fit_rows] = dist
            nearest = NearestNeighbours(torch.from_numpy(np.ascontiguousarray(space[prefix])))  # faiss: blocked
            d2, _ = nearest(torch.from_numpy(np.ascontiguousarray(space[val_rows])))
            start[val_rows] = np.minimum(start[val_rows], d2[:, 0].clamp_min(0).sqrt().numpy())
            start[prefix] = 0.0
            more = K.greedy_coreset(self._on_device(space), k_all - len(prefix), None, init_distances=start,
                                    storage=self.coreset_storage)
            rows = np.concatenate([prefix, np.asarray(_host(more))])
        self.memory_bank_ = self._gather(rows)
        del self._parts, self._proj, self._held
        return val

    def _held_embeddings(self, val_rows: np.ndarray):
        """The validation images' embeddings [n, H, W, D], ``batch_size`` images at a time,
        gathered from the bank parts (not kept twice while embedding: 67 MB for bottle's 21
        held-out images with WRN50, at the fit's memory peak)."""
        if not len(val_rows):
            return []
        per = self._grid[0] * self._grid[1]

        def batches():
            for i in range(0, len(val_rows), per * self.batch_size):
                rows = val_rows[i : i + per * self.batch_size]
                yield torch.from_numpy(self._gather(rows)).view(-1, *self._grid, self._parts[0].shape[1])

        return batches()

    def _on_device(self, rows: np.ndarray):
        """The selection's features: a CUDA tensor on a CUDA detector (the kernel's
        torch-CUDA greedy loop, float32 storage), else the host array."""
        if str(self.device).startswith("cuda") and self.coreset_storage == "float32":
            return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(self.device)
        return np.ascontiguousarray(rows)

    def _approximate_start(self, space, fit_rows):
        """ApproximateGreedyCoresetSampler's start: each row's mean distance to
        ``coreset_starts`` random training rows (None: exact greedy from row 0)."""
        if not self.coreset_starts:
            return None
        rng = np.random.default_rng(self.seed)
        starts = space[fit_rows[rng.choice(len(fit_rows), min(self.coreset_starts, len(fit_rows)), replace=False)]]
        sq = (space * space).sum(1)[:, None] - 2 * space @ starts.T + (starts * starts).sum(1)[None]
        return np.sqrt(np.clip(sq, 0, None)).mean(1).astype(np.float32)

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """Rows of the per-batch feature parts, in the order given, as float32."""
        offsets = np.cumsum([0] + [len(q) for q in self._parts])
        part = np.searchsorted(offsets, rows, side="right") - 1
        out = np.empty((len(rows), self._parts[0].shape[1]), np.float32)
        for i in np.unique(part):
            at = np.flatnonzero(part == i)
            out[at] = self._parts[i][rows[at] - offsets[i]]
        return out

    # -- state ------------------------------------------------------------------------------------------
    def _state(self):
        return {"memory_bank": self.memory_bank_}

    def _load_state(self, state):
        bank = np.asarray(state["memory_bank"])
        if bank.ndim != 2 or bank.shape[0] < 1 or (self.target_dim and bank.shape[1] != self.target_dim):
            raise ValueError(f"memory_bank: expected [k, {self.target_dim or 'D'}], got {list(bank.shape)}")
        self.memory_bank_ = np.ascontiguousarray(bank, dtype=np.float32)
