"""The NumPy reference that defines every kernel.

Each function here is the specification of the kernel of the same name in the
compiled core (``pyad._core``) and in the numba twins (``_numba.py``): same
signature, same inputs (validated, C-contiguous), same outputs. They are
written for clarity, in float64 where that makes the definition exact, and
are what the tests compare every backend against.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["mahalanobis", "greedy_coreset", "patch_pool", "channel_pool", "patch_embed"]


def mahalanobis(x: np.ndarray, mean: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Mahalanobis distance through a packed factor of the precision.

    ``x`` [N, P, d] float32, ``mean`` [P, d] float32, ``factor`` [P, d(d+1)/2]
    float32 or float16 holding, row by row, the lower triangle of A_p with
    Sigma_p^-1 = A_p^T A_p. Returns [N, P] float32:
    ``sqrt((x - mu)^T Sigma^-1 (x - mu)) = ||A (x - mu)||`` (PaDiM §3).
    """
    _, p, d = x.shape
    rows, cols = np.tril_indices(d)
    a = np.zeros((p, d, d))
    a[:, rows, cols] = factor
    z = x.astype(np.float64) - mean
    y = np.einsum("pij,npj->npi", a, z)
    return np.sqrt((y * y).sum(-1)).astype(np.float32)


def greedy_coreset(x: np.ndarray, k: int, start: int, mind: np.ndarray) -> np.ndarray:
    """Greedy k-center (farthest point) selection, Sener & Savarese 2018.

    ``x`` [M, d] float32, float16 or int8; ``mind`` [M] squared distance of each
    point to the selection so far (float32; int32 for int8 input), updated in
    place. The first centre is ``start``, or ``argmax(mind)`` when ``start < 0``.
    Each next centre is the unselected point with the largest ``mind``, ties to
    the lowest index; a point is never selected twice. On return ``mind`` holds
    the squared distance of every point to the k selected ones. Returns the
    int64 indices [k] in selection order.
    """
    wide = np.int64 if x.dtype == np.int8 else np.float64
    xs = x.astype(wide)
    selected = np.zeros(len(x), dtype=bool)
    idx = np.empty(k, dtype=np.int64)
    sel = int(start) if start >= 0 else int(np.argmax(mind))
    for it in range(k):
        idx[it] = sel
        selected[sel] = True
        dist = ((xs - xs[sel]) ** 2).sum(axis=1).astype(mind.dtype)
        np.minimum(mind, dist, out=mind)
        sel = int(np.argmax(np.where(selected, -1, mind)))
    mind[selected] = 0
    return idx


def _windows(x: np.ndarray, kernel: int, stride: int, padding: int, fill: float) -> np.ndarray:
    """[B, C, H, W] -> [B, C, Ho, Wo, k, k] views of the padded neighbourhoods."""
    pad = ((0, 0), (0, 0), (padding, padding), (padding, padding))
    xp = np.pad(x, pad, constant_values=fill)
    return sliding_window_view(xp, (kernel, kernel), axis=(2, 3))[:, :, ::stride, ::stride]


def patch_pool(x: np.ndarray, kernel: int, stride: int, padding: int, mode: str) -> np.ndarray:
    """Spatial pooling, channels last: [B, C, H, W] -> [B, Ho, Wo, C].

    ``avg`` counts zero padding (torch ``avg_pool2d`` default); ``max`` ignores
    padding; ``avgmax`` concatenates both ([..., 2C], average first).
    """
    parts = []
    if mode in ("avg", "avgmax"):
        parts.append(_windows(x.astype(np.float64), kernel, stride, padding, 0.0).mean(axis=(-2, -1)))
    if mode in ("max", "avgmax"):
        parts.append(_windows(x, kernel, stride, padding, -np.inf).max(axis=(-2, -1)))
    out = np.concatenate(parts, axis=1)  # [B, C or 2C, Ho, Wo]
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1), dtype=np.float32)


def channel_pool(x: np.ndarray, out_dim: int) -> np.ndarray:
    """Adaptive average over the last axis (torch ``adaptive_avg_pool1d``):
    [R, L] -> [R, out_dim], bin i covering [floor(i*L/D), ceil((i+1)*L/D))."""
    length = x.shape[-1]
    out = np.empty(x.shape[:-1] + (out_dim,), dtype=np.float32)
    for i in range(out_dim):
        lo, hi = (i * length) // out_dim, -((-(i + 1) * length) // out_dim)
        out[..., i] = x[..., lo:hi].astype(np.float64).mean(axis=-1)
    return out


def patch_embed(x: np.ndarray, out_dim: int, kernel: int, stride: int, padding: int, mode: str) -> np.ndarray:
    """Pooling, channel reduction and channels-last layout: [B, C, H, W] -> [B, Ho, Wo, out_dim].

    ``unfold`` is PatchCore's per-layer embedding (official code,
    ``patchcore/common.py`` PatchMaker + MeanMapper): every location's
    zero-padded C x k x k neighbourhood, flattened channel-major, adaptively
    averaged to ``out_dim``. Other modes are ``channel_pool(patch_pool(...))``.
    """
    if mode != "unfold":
        pooled = patch_pool(x, kernel, stride, padding, mode)
        return channel_pool(pooled, out_dim)
    win = _windows(x, kernel, stride, padding, 0.0)  # [B, C, Ho, Wo, k, k]
    b, c, ho, wo = win.shape[:4]
    flat = win.transpose(0, 2, 3, 1, 4, 5).reshape(b, ho, wo, c * kernel * kernel)
    return channel_pool(flat, out_dim)
