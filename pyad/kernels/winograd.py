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

# Tiles per block of the weight gradient: its GEMMs [C, tiles] x [tiles, K] sum over the tiles, and
# reach MKL's speed only with long sums (EfficientAD-S's 128 -> 256 layer: 74 GFLOP/s at 256 tiles,
# 121 at 1024; 2 cores, AVX2).
GRAD_BLOCK_TILES = 1024

if TYPE_CHECKING:
    import torch


def winograd_weights(weight) -> "torch.Tensor":
    """Transformed weights of a [K, C, r, r] convolution (r = 3 or 4): [36, C, K] float32,
    U = G g G^T (computed in float64)."""
    import torch  # not at import: `import pyad` stays light

    w = weight.detach().cpu().double() if _validate.is_torch(weight) else torch.from_numpy(np.asarray(weight, np.float64))
    if w.dim() != 4 or w.shape[2] != w.shape[3] or w.shape[2] not in WINOGRAD_G:
        raise ValueError(f"weight: expected a [K, C, 3, 3] or [K, C, 4, 4] array, got shape {tuple(w.shape)}")
    k, c, r = w.shape[0], w.shape[1], w.shape[2]
    u = _kron_g(r) @ w.reshape(k * c, r * r).T  # (G ⊗ G) vec(g) = vec(G g G^T): one GEMM, [36, K·C]
    return u.float().reshape(36, k, c).transpose(1, 2).contiguous()


def _kron_g(r: int) -> "torch.Tensor":
    import torch

    g = torch.from_numpy(WINOGRAD_G[r])
    return torch.kron(g, g)  # [36, r·r], row 6i + j, column r·a + b: G[i, a]·G[j, b]


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


def winograd_weight_grad(x: "torch.Tensor", dy: "torch.Tensor", kernel_size: int = 3, padding: int = 1) -> "torch.Tensor":
    """The weight gradient of ``conv2d(x, w, stride=1, padding=padding)`` for an r x r kernel
    given the output's gradient ``dy`` [B, K, Ho, Wo]: [K, C, r, r] float32, by the adjoint of
    the Winograd forward (Lavin & Gray §4: the same tiles, 4x fewer multiplications than the
    direct correlation). With V = B^T d B the input tiles and Y = A^T M A, M = U ⊙ V summed over
    C, U = G w G^T: dU = Σ_tiles V^T (A dY A^T) (36 GEMMs [C, tiles] x [tiles, K]) and
    dw = G^T dU G (float64). ``x`` [B, C, H, W] float32 CPU."""
    import torch

    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError("x: expected a 4-d float32 CPU tensor [B, C, H, W]")
    r = _validate.choice(kernel_size, "kernel_size", (3, 4))
    padding = _validate.integer(padding, "padding", 0, r - 1)
    b, c, h, w = x.shape
    ho, wo = h + 2 * padding - r + 1, w + 2 * padding - r + 1
    if (not isinstance(dy, torch.Tensor) or dy.dim() != 4 or dy.dtype != torch.float32 or dy.shape[0] != b
            or tuple(dy.shape[2:]) != (ho, wo)):
        raise ValueError(f"dy: expected a float32 tensor [{b}, K, {ho}, {wo}] (the output's gradient)")
    k = dy.shape[1]
    backend = _backend.current()
    xn = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).numpy()
    dn = dy.detach().contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).numpy()
    tiles = winograd_tiles(b, ho, wo, r)[0]
    du = None
    for t0 in range(0, tiles, GRAD_BLOCK_TILES):
        tc = min(GRAD_BLOCK_TILES, tiles - t0)
        v, dm = torch.empty(36, tc, c), torch.empty(36, tc, k)
        backend.winograd_input(xn, r, padding, t0, v.numpy())
        backend.winograd_output_grad(dn, r, t0, dm.numpy())
        du = torch.bmm(v.transpose(1, 2), dm) if du is None else du.baddbmm_(v.transpose(1, 2), dm)
    dw = _kron_g(r).T @ du.double().reshape(36, c * k)  # dw = G^T dU G, one GEMM: [r·r, C·K]
    return dw.reshape(r, r, c, k).permute(3, 2, 0, 1).float().contiguous()


__all__ = ["BLOCK_TILES", "GRAD_BLOCK_TILES", "winograd_conv", "winograd_weight_grad", "winograd_weights"]
