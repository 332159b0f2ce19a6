"""Stride-1 convolutions with 3x3 and 4x4 kernels by Winograd's minimal filtering, F(4x4, 3x3)
and F(3x3, 4x4) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016).

Each 6x6 input tile d gives m x m outputs (m = 4 for a 3x3 kernel, 3 for a 4x4 one)
Y = A^T [(G g G^T) ⊙ (B^T d B)] A: summed over input channels, the 36 element-wise products are
36 independent GEMMs, [tiles, C] x [C, K], with 36 multiplications per tile where the direct
convolution needs 144 (16 outputs x 9 taps, or 9 x 16): 4x fewer. The transforms (memory-bound)
are kernels like the others here (``reference.py`` defines them; compiled and numba twins); the
GEMMs run in torch (MKL on x86). Rounding differs from the direct convolution by about 1e-5 of
the output's scale (float32; tested).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from . import _backend, _validate
from .reference import WINOGRAD_G, winograd_tiles

# Tiles per GEMM block: V [36, 256, C] and M [36, 256, K] stay in the caches for C, K <= 256,
# and the transformed weights [36, C, K] are read once per 256 tiles. Measured on 2 cores
# (AMD EPYC, AVX2; ResNet-18 and Wide-ResNet-50-2 layers at batch 16): within 10% of the
# best block size for every layer, where whole-batch blocks lose up to 2x on 64x64 maps.
BLOCK_TILES = 256

if TYPE_CHECKING:
    import torch


def winograd_weights(weight) -> "torch.Tensor":
    """Transformed weights of a [K, C, r, r] convolution (r = 3 or 4): [36, C, K] float32,
    U = G g G^T (computed in float64)."""
    import torch  # not at import: `import pyad` stays light

    w = weight.detach().cpu().double() if _validate.is_torch(weight) else torch.from_numpy(np.asarray(weight, np.float64))
    if w.dim() != 4 or w.shape[2] != w.shape[3] or w.shape[2] not in WINOGRAD_G:
        raise ValueError(f"weight: expected a [K, C, 3, 3] or [K, C, 4, 4] array, got shape {tuple(w.shape)}")
    g = torch.from_numpy(WINOGRAD_G[w.shape[2]])
    u = (g @ w @ g.T).permute(2, 3, 1, 0).reshape(36, w.shape[1], w.shape[0])  # [K, C, 6, 6] -> [36, C, K]
    return u.float().contiguous()


def winograd_conv(x: "torch.Tensor", u: "torch.Tensor", kernel_size: int = 3, bias: "torch.Tensor | None" = None,
                  padding: int = 1, residual: "torch.Tensor | None" = None, relu: bool = False) -> "torch.Tensor":
    """``relu?(conv2d(x, w, bias, stride=1, padding=padding) + residual)`` for an r x r kernel
    (``kernel_size`` r = 3 or 4) given as ``u = winograd_weights(w)``. ``x`` [B, C, H, W] float32
    on the CPU (channels-last is read without a copy); returns [B, K, Ho, Wo] channels-last,
    Ho = H + 2·padding - r + 1. ``bias`` [K] and ``residual`` [B, K, Ho, Wo] are optional."""
    import torch

    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError("x: expected a 4-d float32 CPU tensor [B, C, H, W]")
    r = _validate.choice(kernel_size, "kernel_size", (3, 4))
    padding = _validate.integer(padding, "padding", 0, r - 1)
    b, c, h, w = x.shape
    if u.dim() != 3 or u.shape[0] != 36 or u.shape[1] != c:
        raise ValueError(f"u: expected [36, {c}, K] (winograd_weights of a [K, {c}, {r}, {r}] kernel), "
                         f"got {tuple(u.shape)}")
    k, ho, wo = u.shape[2], h + 2 * padding - r + 1, w + 2 * padding - r + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"x: spatial size {h}x{w} is smaller than the {r}x{r} kernel with padding {padding}")
    if bias is not None and tuple(bias.shape) != (k,):
        raise ValueError(f"bias: expected shape ({k},), got {tuple(bias.shape)}")
    if residual is not None and tuple(residual.shape) != (b, k, ho, wo):
        raise ValueError(f"residual: expected shape {(b, k, ho, wo)}, got {tuple(residual.shape)}")
    backend = _backend.current()
    xn = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).numpy()
    out = torch.empty(b, k, ho, wo, memory_format=torch.channels_last)
    on = out.permute(0, 2, 3, 1).numpy()
    bn = None if bias is None else bias.detach().contiguous().numpy()
    rn = None if residual is None else residual.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).numpy()
    u = u.contiguous()
    tiles = winograd_tiles(b, ho, wo, r)[0]
    for t0 in range(0, tiles, BLOCK_TILES):
        tc = min(BLOCK_TILES, tiles - t0)
        v = torch.empty(36, tc, c)
        backend.winograd_input(xn, r, padding, t0, v.numpy())
        m = torch.bmm(v, u)
        backend.winograd_output(m.numpy(), r, t0, bn, rn, relu, on)
    return out


__all__ = ["BLOCK_TILES", "winograd_conv", "winograd_weights"]
