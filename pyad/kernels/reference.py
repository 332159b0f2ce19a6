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

__all__ = ["mahalanobis", "greedy_coreset", "patch_pool", "channel_pool", "patch_embed", "winograd_input",
           "winograd_output", "winograd_output_grad", "knn_merge"]


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


# Winograd F(4x4, 3x3) and F(3x3, 4x4) (Lavin & Gray, "Fast Algorithms for Convolutional Neural
# Networks", CVPR 2016; the Toom-Cook construction with interpolation points 0, ±1, ±2 and ∞):
# Y = A^T [(G g G^T) ⊙ (B^T d B)] A for each 6x6 input tile d and its m x m outputs Y (m = 7 - r
# for an r x r kernel). A^T [i, j] = p_j^i, G [j, k] = p_j^k / prod_{l != j} (p_j - p_l) (the
# point at ∞ contributes the last column of A^T and row of G), and B^T solves the identity;
# both sizes share B^T (test_winograd.py derives all three from the points and checks them).
WINOGRAD_BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                        [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=np.float64)
WINOGRAD_G = {3: np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                           [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=np.float64),
              4: np.array([[1 / 4, 0, 0, 0], [-1 / 6, -1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6, 1 / 6],
                           [1 / 24, 1 / 12, 1 / 6, 1 / 3], [1 / 24, -1 / 12, 1 / 6, -1 / 3], [0, 0, 0, 1]],
                          dtype=np.float64)}
WINOGRAD_AT = {3: np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                           dtype=np.float64),
               4: np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 1]], dtype=np.float64)}


def winograd_tiles(b: int, ho: int, wo: int, kernel_size: int = 3) -> tuple[int, int, int]:
    """(tiles, tile rows, tile columns) of a [b, ho, wo] output in m x m tiles (m = 7 - kernel_size);
    tile t = (n·rows + ty)·columns + tx covers output rows m·ty .. m·ty + m - 1 (columns alike)."""
    m = 7 - kernel_size
    th, tw = (ho + m - 1) // m, (wo + m - 1) // m
    return b * th * tw, th, tw


def winograd_input(x: np.ndarray, kernel_size: int, pad: int, t0: int, out: np.ndarray) -> None:
    """Input transform of an r x r (``kernel_size`` 3 or 4) stride-1 convolution with zero padding
    ``pad``: ``x`` [B, H, W, C] float32 (channels-last), tiles [t0, t0 + T) -> ``out`` [36, T, C],
    out[6i + j, t] = (B^T d_t B)[i, j] with d_t the tile's 6x6 input window (rows
    m·ty - pad .. m·ty - pad + 5, m = 7 - r, zeros outside ``x``)."""
    b, h, w, c = x.shape
    r, m = kernel_size, 7 - kernel_size
    _, th, tw = winograd_tiles(b, h + 2 * pad - r + 1, w + 2 * pad - r + 1, r)
    xp = np.zeros((b, m * th + 6, m * tw + 6, c))
    xp[:, pad:pad + h, pad:pad + w] = x
    win = sliding_window_view(xp, (6, 6), axis=(1, 2))[:, : m * th : m, : m * tw : m]  # [B, th, tw, C, 6, 6]
    d = win.reshape(-1, c, 6, 6)[t0:t0 + out.shape[1]]
    out[:] = np.einsum("ia,tcab,jb->ijtc", WINOGRAD_BT, d, WINOGRAD_BT).reshape(36, -1, c)


def winograd_output(m: np.ndarray, kernel_size: int, t0: int, bias, residual, relu: bool, out: np.ndarray) -> None:
    """Output transform: ``m`` [36, T, K] (the per-position channel products of tiles
    [t0, t0 + T)) -> their outputs in ``out`` [B, Ho, Wo, K], Y = A^T M A cropped to the
    output, + ``bias`` [K], + ``residual`` [B, Ho, Wo, K] (each or None), then max(0, ·)
    if ``relu``."""
    b, ho, wo, k = out.shape
    at, s = WINOGRAD_AT[kernel_size], 7 - kernel_size
    _, th, tw = winograd_tiles(b, ho, wo, kernel_size)
    y = np.einsum("ia,abtk,jb->tijk", at, m.reshape(6, 6, -1, k).astype(np.float64), at)
    for t in range(m.shape[1]):
        n, q = divmod(t0 + t, th * tw)
        y0, x0 = s * (q // tw), s * (q % tw)
        ys, xs = slice(y0, min(y0 + s, ho)), slice(x0, min(x0 + s, wo))
        tile = y[t, : ys.stop - y0, : xs.stop - x0]
        if bias is not None:
            tile = tile + bias
        if residual is not None:
            tile = tile + residual[n, ys, xs]
        out[n, ys, xs] = np.maximum(tile, 0.0) if relu else tile


def winograd_output_grad(dy: np.ndarray, kernel_size: int, t0: int, out: np.ndarray) -> None:
    """The adjoint of the output transform (for the weight gradient): ``dy`` [B, Ho, Wo, K]
    float32 (the gradient of the convolution's output), tiles [t0, t0 + T) -> ``out``
    [36, T, K], out[6a + c, t] = (A dY_t A^T)[a, c] with dY_t the tile's m x m window of dy
    (rows m·ty .. m·ty + m - 1, zeros beyond the output)."""
    b, ho, wo, k = dy.shape
    at, s = WINOGRAD_AT[kernel_size], 7 - kernel_size
    _, th, tw = winograd_tiles(b, ho, wo, kernel_size)
    dp = np.zeros((b, s * th, s * tw, k))
    dp[:, :ho, :wo] = dy
    tiles = dp.reshape(b, th, s, tw, s, k).transpose(0, 1, 3, 2, 4, 5).reshape(-1, s, s, k)[t0:t0 + out.shape[1]]
    out[:] = np.einsum("ia,tijk,jc->actk", at, tiles, at).reshape(36, -1, k)


def knn_merge(g: np.ndarray, norms: np.ndarray, offset: int, dist: np.ndarray, idx: np.ndarray) -> None:
    """One block of an exact k-nearest-neighbour search: ``g`` [N, M] float32 holds the
    products q_i · b_j of N queries with bank rows offset .. offset + M - 1, ``norms`` [M]
    their squared norms. Per query, s_j = norms[j] - 2·g[i, j] (‖q_i − b_j‖² less ‖q_i‖²,
    rounded once in float32) is merged into ``dist`` / ``idx`` [N, k] (the k smallest so
    far, ascending; +inf / -1 where empty), in place: a stable merge, so ties keep the
    entry already held, then the lower column. NaN never enters."""
    s = norms[None, :] - np.float32(2.0) * g  # float32: -2g is exact, one rounding
    s = np.where(np.isnan(s), np.float32(np.inf), s)
    cols = np.broadcast_to(np.arange(offset, offset + g.shape[1], dtype=np.int64), s.shape)
    both_d, both_i = np.concatenate([dist, s], 1), np.concatenate([idx, cols], 1)
    order = np.argsort(both_d, axis=1, kind="stable")[:, : dist.shape[1]]
    dist[:], idx[:] = np.take_along_axis(both_d, order, 1), np.take_along_axis(both_i, order, 1)
