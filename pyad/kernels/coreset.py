"""Greedy k-center coreset selection (PatchCore, Roth et al. 2022, §3.2) and the Johnson-Lindenstrauss projection used before it."""

from __future__ import annotations

import numpy as np

from . import _backend, _validate
from .gaussian import _torch_like

_STORAGE = ("float32", "float16", "int8")


def random_projection(features, dim: int = 128, seed: int = 0):
    """Project ``features`` [M, d] to [M, dim] with a seeded Gaussian matrix.

    Entries are N(0, 1/dim), so squared distances are preserved in expectation
    (Johnson-Lindenstrauss). The matrix depends only on (d, dim, seed).
    """
    dim = _validate.integer(dim, "dim", 1)
    seed = _validate.integer(seed, "seed", 0)
    cuda = _validate.is_cuda(features)
    x = features if cuda else _validate.array(features, "features", 2)
    rng = np.random.default_rng(seed)
    proj = (rng.standard_normal((x.shape[1], dim)) / np.sqrt(dim)).astype(np.float32)
    if cuda:
        import torch

        return features.float() @ torch.from_numpy(proj).to(features.device)
    return _torch_like(features, x @ proj)


def _quantize_int8(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Symmetric int8 codes around each dimension's mid-range; one global scale,
    so squared distances in codes times scale² approximate the true ones."""
    lo, hi = x.min(axis=0), x.max(axis=0)
    mid = (lo + hi) / 2
    scale = float(np.max(hi - lo) / 2 / 127) or 1.0
    return np.clip(np.rint((x - mid) / scale), -127, 127).astype(np.int8), scale


def greedy_coreset(
    features,
    k: int,
    start: int = 0,
    *,
    storage: str = "float32",
    init_distances=None,
    return_distances: bool = False,
):
    """Select ``k`` of the ``features`` [M, d] by exact farthest-point selection.

    Starts at index ``start`` (or, given ``init_distances`` [M] and
    ``start=None``, at the point farthest under them); each next point is the
    one farthest from everything selected so far, ties to the lowest index. A
    point is never selected twice, so ``k = M`` returns a permutation.

    ``storage`` sets the working precision of the features: "float32" is exact;
    "float16" and "int8" halve / quarter the memory traffic at a small cost in
    coverage (see bench/ and the README).

    Returns int64 indices [k] in selection order, and with
    ``return_distances=True`` also each point's Euclidean distance to the
    selection [M] (float32; its max is the coverage radius).
    """
    storage = _validate.choice(storage, "storage", _STORAGE)
    cuda = _validate.is_cuda(features)
    x = features if cuda else _validate.array(features, "features", 2)
    m = x.shape[0]
    k = _validate.integer(k, "k", 1, m)
    if start is None:
        if init_distances is None:
            raise ValueError("start: None needs init_distances to choose the first point")
        start = -1
    else:
        start = _validate.integer(start, "start", 0, m - 1)
    init = None
    if init_distances is not None:
        init = _validate.array(init_distances, "init_distances", 1, dtype=np.float64)
        if len(init) != m or (init < 0).any():
            raise ValueError(f"init_distances: expected {m} non-negative distances")
    if cuda:
        if storage != "float32":
            raise ValueError("storage: CUDA tensors are selected in float32 only")
        from . import _torch

        return _torch.greedy_coreset(x, k, start, init, return_distances)

    if storage == "int8":
        xs, scale = _quantize_int8(x)
        big = np.iinfo(np.int32).max
        mind = np.full(m, big, np.int32) if init is None else np.minimum(np.rint(init**2 / scale**2), big).astype(np.int32)
    else:
        if storage == "float16" and np.abs(x).max() > np.finfo(np.float16).max:
            raise ValueError("features: values exceed the float16 range; use storage='float32'")
        xs, scale = (x.astype(np.float16) if storage == "float16" else x), 1.0
        mind = np.full(m, np.inf, np.float32) if init is None else (init**2).astype(np.float32)
    idx = _backend.current().greedy_coreset(xs, k, start, mind)
    if not return_distances:
        return _torch_like(features, idx)
    dist = (np.sqrt(mind.astype(np.float64)) * scale).astype(np.float32)
    return _torch_like(features, idx), _torch_like(features, dist)
