"""Patch pooling and PatchCore's neighbourhood embedding (Roth et al. 2022, §3.1;
the lightweight study of Baßler, KIT master's thesis, §3.5.2). All outputs are channels-last: [B, H', W', C]."""

from __future__ import annotations


from . import _backend, _validate
from .gaussian import _torch_like

_MODES = ("avg", "max", "avgmax")


def _window(fmap, kernel, stride, padding):
    kernel = _validate.integer(kernel, "kernel", 1)
    stride = _validate.integer(stride, "stride", 1)
    padding = _validate.integer(padding, "padding", 0, kernel // 2)
    h, w = fmap.shape[2:]
    if h + 2 * padding < kernel or w + 2 * padding < kernel:
        raise ValueError(f"fmap: spatial size {h}x{w} is smaller than kernel {kernel} with padding {padding}")
    return kernel, stride, padding


def patch_pool(fmap, kernel: int = 3, stride: int = 1, padding: int = 1, mode: str = "avg"):
    """Pool each channel over k×k windows: [B, C, H, W] -> [B, H', W', C].

    ``mode``: "avg" (zero padding counted, as torch ``avg_pool2d``), "max"
    (padding ignored) or "avgmax" (both concatenated, [..., 2C], average first).
    H' = floor((H + 2·padding - kernel) / stride) + 1.
    """
    mode = _validate.choice(mode, "mode", _MODES)
    if _validate.is_cuda(fmap):
        from . import _torch

        return _torch.patch_pool(fmap, *_window(fmap, kernel, stride, padding), mode)
    x = _validate.array(fmap, "fmap", 4)
    out = _backend.current().patch_pool(x, *_window(x, kernel, stride, padding), mode)
    return _torch_like(fmap, out)


def channel_pool(x, out_dim: int):
    """Adaptive average over the last axis (torch ``adaptive_avg_pool1d``):
    [..., L] -> [..., out_dim]."""
    out_dim = _validate.integer(out_dim, "out_dim", 1)
    if _validate.is_cuda(x):
        from . import _torch

        return _torch.channel_pool(x, out_dim)
    a = _validate.array(x, "x", tuple(range(1, 8)))
    flat = a.reshape(-1, a.shape[-1])
    out = _backend.current().channel_pool(flat, out_dim).reshape(a.shape[:-1] + (out_dim,))
    return _torch_like(x, out)


def patch_embed(fmap, out_dim: int, kernel: int = 3, stride: int = 1, padding: int = 1, mode: str = "unfold"):
    """One fused pass: neighbourhood aggregation, channel reduction to
    ``out_dim`` and channels-last layout, [B, C, H, W] -> [B, H', W', out_dim].

    ``mode="unfold"`` is the official PatchCore per-layer embedding: each
    location's zero-padded C×k×k neighbourhood, flattened channel-major, then
    adaptively averaged to ``out_dim`` (equal to k×k average pooling only when
    C·k² is a multiple of ``out_dim``). "avg", "max" and "avgmax" are
    ``channel_pool(patch_pool(fmap, ...), out_dim)`` in one pass.
    """
    mode = _validate.choice(mode, "mode", _MODES + ("unfold",))
    out_dim = _validate.integer(out_dim, "out_dim", 1)
    if _validate.is_cuda(fmap):
        from . import _torch

        return _torch.patch_embed(fmap, out_dim, *_window(fmap, kernel, stride, padding), mode)
    x = _validate.array(fmap, "fmap", 4)
    out = _backend.current().patch_embed(x, out_dim, *_window(x, kernel, stride, padding), mode)
    return _torch_like(fmap, out)


__all__ = ["patch_pool", "channel_pool", "patch_embed"]
