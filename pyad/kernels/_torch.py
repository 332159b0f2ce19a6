"""The kernels on torch CUDA tensors: the same semantics as reference.py, run
on the GPU with no host round trip per step."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _check(x: torch.Tensor, name: str, ndim: int) -> torch.Tensor:
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    x = x.detach().float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or Inf")
    return x


def mahalanobis(features: torch.Tensor, fitted) -> torch.Tensor:
    """Batched GEMM over positions: y[p] = z[p] @ A[p]ᵀ, distance = ||y||."""
    x = _check(features, "features", 3)
    if tuple(x.shape[1:]) != fitted.mean.shape:
        raise ValueError(f"features: expected [N, {fitted.positions}, {fitted.dim}], got {list(x.shape)}")
    key = (str(x.device), "A")
    if key not in fitted._device_cache:  # dense factor and mean on the device, once
        d = fitted.dim
        rows, cols = np.tril_indices(d)
        a = torch.zeros(fitted.positions, d, d, device=x.device)
        a[:, torch.from_numpy(rows).to(x.device), torch.from_numpy(cols).to(x.device)] = torch.from_numpy(
            fitted.factor.astype(np.float32)
        ).to(x.device)
        fitted._device_cache[key] = (a, torch.from_numpy(fitted.mean).to(x.device))
    a, mean = fitted._device_cache[key]
    z = (x - mean).transpose(0, 1)  # [P, N, d]
    y = torch.bmm(z, a.transpose(1, 2))
    return y.square().sum(-1).sqrt().transpose(0, 1).contiguous()


def greedy_coreset(x: torch.Tensor, k: int, start: int, init, return_distances: bool):
    """The greedy loop on the device: argmax and indexing stay tensors, so no
    iteration waits for the host."""
    x = _check(x, "features", 2)
    m = x.shape[0]
    if init is None:
        mind = torch.full((m,), float("inf"), device=x.device)
    else:
        mind = torch.from_numpy(np.asarray(init, np.float32) ** 2).to(x.device)
    sel = torch.argmax(mind) if start < 0 else torch.tensor(start, device=x.device)
    idx = torch.empty(k, dtype=torch.long, device=x.device)
    selected = torch.zeros(m, dtype=torch.bool, device=x.device)
    neg = torch.tensor(-1.0, device=x.device)
    for it in range(k):
        idx[it] = sel
        selected[sel] = True
        dist = (x - x[sel]).square().sum(1)
        mind = torch.minimum(mind, dist)
        sel = torch.argmax(torch.where(selected, neg, mind))  # first maximum: lowest index
    mind = torch.where(selected, torch.zeros_like(mind), mind)
    return (idx, mind.sqrt()) if return_distances else idx


def patch_pool(fmap: torch.Tensor, kernel: int, stride: int, padding: int, mode: str) -> torch.Tensor:
    x = _check(fmap, "fmap", 4)
    parts = []
    if mode in ("avg", "avgmax"):
        parts.append(F.avg_pool2d(x, kernel, stride, padding))
    if mode in ("max", "avgmax"):
        parts.append(F.max_pool2d(x, kernel, stride, padding))
    return torch.cat(parts, 1).permute(0, 2, 3, 1).contiguous()


def channel_pool(x: torch.Tensor, out_dim: int) -> torch.Tensor:
    x = x.detach().float()
    shape = x.shape
    out = F.adaptive_avg_pool1d(x.reshape(-1, 1, shape[-1]), out_dim)
    return out.reshape(*shape[:-1], out_dim)


def patch_embed(fmap: torch.Tensor, out_dim: int, kernel: int, stride: int, padding: int, mode: str):
    x = _check(fmap, "fmap", 4)
    if mode != "unfold":
        return channel_pool(patch_pool(x, kernel, stride, padding, mode), out_dim)
    b = x.shape[0]
    ho = (x.shape[2] + 2 * padding - kernel) // stride + 1
    wo = (x.shape[3] + 2 * padding - kernel) // stride + 1
    cols = F.unfold(x, kernel, padding=padding, stride=stride)  # [B, C*k*k, L], channel-major
    return channel_pool(cols.transpose(1, 2), out_dim).reshape(b, ho, wo, out_dim)
