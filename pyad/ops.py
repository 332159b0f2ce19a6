"""Torch modules for the one inference path.

Each op runs pyad's fast CPU implementation (the compiled kernels; ``pyad.search``
for the nearest-neighbour search) in eager mode on the CPU, the kernels' torch-CUDA
implementations (``pyad.kernels._torch``) in eager mode on CUDA, and a pure-torch
twin everywhere else: under ``torch.export`` / ``torch.compile`` / ONNX export,
and inside ``portable()``. The twins define the same function (tested equal), so
``predict``, evaluation, the CLI and exported models compute the same scores
whichever runs. Distances (nearest neighbours, Mahalanobis) and the map blur run
in float32 even under CUDA autocast (``precision="float16"``): squared distances
lose most of their digits in half precision (‖q‖² − 2q·b + ‖b‖² cancels).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_PORTABLE = contextvars.ContextVar("pyad_portable", default=False)


@contextlib.contextmanager
def portable():
    """Force the pure-torch twins (what an exported model runs) in this block."""
    token = _PORTABLE.set(True)
    try:
        yield
    finally:
        _PORTABLE.reset(token)


def fast_path(x: torch.Tensor) -> bool:
    """True when the CPU fast path may run: eager mode, a CPU tensor, not ``portable()``."""
    return (x.device.type == "cpu" and not _PORTABLE.get() and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing())


def cuda_path(x: torch.Tensor) -> bool:
    """True when the kernels' torch-CUDA implementations may run: eager mode, a CUDA
    tensor, not ``portable()``."""
    return (x.device.type == "cuda" and not _PORTABLE.get() and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing())


def full_precision(x: torch.Tensor):
    """A context that turns CUDA autocast off (a no-op for CPU tensors)."""
    if x.device.type == "cuda":
        return torch.autocast(device_type="cuda", enabled=False)
    return contextlib.nullcontext()


# -- channel pooling and the PatchCore embedding ----------------------------------------------------------
def _adaptive_windows(length: int, out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``adaptive_avg_pool1d`` as a gather: bin i averages x[floor(i·L/out) : ceil((i+1)·L/out)].
    Returns (index [out, w] int64, weight [out, w] float32) with zero weight on padding."""
    starts = [(i * length) // out for i in range(out)]
    ends = [-((-(i + 1) * length) // out) for i in range(out)]
    w = max(e - s for s, e in zip(starts, ends))
    index = np.zeros((out, w), np.int64)
    weight = np.zeros((out, w), np.float32)
    for i, (s, e) in enumerate(zip(starts, ends)):
        index[i, : e - s] = np.arange(s, e)
        weight[i, : e - s] = 1.0 / (e - s)
    return torch.from_numpy(index), torch.from_numpy(weight)


def channel_pool(x: torch.Tensor, out_dim: int) -> torch.Tensor:
    """Adaptive average over the last axis, [..., L] -> [..., out_dim]; the kernel
    on the CPU fast path, an exportable gather-and-weight twin elsewhere."""
    if x.shape[-1] == out_dim:
        return x
    if fast_path(x) or cuda_path(x):
        from . import kernels as K

        return K.channel_pool(x.contiguous(), out_dim)
    index, weight = _adaptive_windows(x.shape[-1], out_dim)
    index, weight = index.to(x.device), weight.to(x.device, x.dtype)
    return (x[..., index] * weight).sum(-1)


class PatchEmbed(nn.Module):
    """Neighbourhood aggregation + channel reduction, [B, C, H, W] -> [B, H', W', D]
    (``pyad.kernels.patch_embed``): "unfold" is the official PatchCore per-layer
    embedding (zero-padded C×k×k neighbourhood, channel-major, adaptive average
    to ``out_dim``), "avg" / "max" / "avgmax" pool each channel first."""

    def __init__(self, out_dim: int | None, kernel: int = 3, stride: int = 1, padding: int = 1, mode: str = "unfold"):
        super().__init__()
        self.out_dim, self.kernel, self.stride, self.padding, self.mode = out_dim, kernel, stride, padding, mode

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        k, s, p = self.kernel, self.stride, self.padding
        c = fmap.shape[1]
        dim = self.out_dim or (c * k * k if self.mode == "unfold" else c * (2 if self.mode == "avgmax" else 1))
        if fast_path(fmap) or cuda_path(fmap):
            from . import kernels as K

            if self.out_dim is None and self.mode != "unfold":
                return K.patch_pool(fmap.contiguous(), k, s, p, self.mode)
            return K.patch_embed(fmap.contiguous(), dim, k, s, p, self.mode)
        if self.mode == "unfold":
            b = fmap.shape[0]
            ho = (fmap.shape[2] + 2 * p - k) // s + 1
            wo = (fmap.shape[3] + 2 * p - k) // s + 1
            cols = F.unfold(fmap, k, padding=p, stride=s)  # [B, C*k*k, L], channel-major
            return channel_pool(cols.transpose(1, 2), dim).reshape(b, ho, wo, dim)
        parts = []
        if self.mode in ("avg", "avgmax"):
            parts.append(F.avg_pool2d(fmap, k, s, p))
        if self.mode in ("max", "avgmax"):
            parts.append(F.max_pool2d(fmap, k, s, p))
        return channel_pool(torch.cat(parts, 1).permute(0, 2, 3, 1), dim)


# -- nearest neighbours ------------------------------------------------------------------------------------
# Banks at least this large search through pyad.search.BoundedIndex (exact: projected lower
# bounds, then exact distances of the best candidates; measured on a WRN50 PatchCore bank of
# 6,144 x 1,024 from bottle, 5,120 queries: 639 -> ~175 ms, 12 of 5,120 queries exhaustive)
BOUNDED_MIN_ROWS = 1024  # WRN50 1% bank (2,140 x 1,024): search 25 -> 11 ms per image
BOUNDED_MIN_DIM = 512
HNSW_EF_SEARCH = 64


class NearestNeighbours(nn.Module):
    """Exact k-nearest neighbours of query rows in a bank, squared L2 distances (the
    official PatchCore's faiss ``IndexFlatL2``). CPU fast path: ``pyad.search`` (exact:
    ``FlatIndex``, or ``BoundedIndex`` for large banks; or faiss's HNSW graph with
    ``index="hnsw"``: approximate); twin: chunked matmul + min/top-k.

    ``forward(q [N, D]) -> (sqdist [N, k], index [N, k] int64)``, nearest first.
    """

    def __init__(self, bank: torch.Tensor, k: int = 1, index: str = "flat", chunk: int = 8192):
        super().__init__()
        self.register_buffer("bank", bank.float().contiguous())
        self.k, self.index, self.chunk = k, index, chunk
        self._index = None
        self._lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_index"], state["_lock"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def search_index(self):
        """The CPU index over ``bank``, built once on first use (thread-safe)."""
        if self._index is None:
            with self._lock:
                if self._index is None:
                    m, d = self.bank.shape
                    if self.index == "hnsw":
                        import faiss

                        index = faiss.IndexHNSWFlat(d, 32)
                        index.add(self.bank.numpy())
                        # faiss's default efSearch 16 breaks PatchCore (WRN50 10% on bottle: image
                        # AUROC 0.92 -> 0.50); 64: 0.926, recall@1 0.998 (bench/search_recall.py)
                        index.hnsw.efSearch = HNSW_EF_SEARCH
                    elif m >= BOUNDED_MIN_ROWS and d >= BOUNDED_MIN_DIM:  # exact, fewer FLOPs
                        from .search import BoundedIndex

                        index = BoundedIndex(self.bank.numpy())
                    else:  # faiss IndexFlatL2's distances, 2-4x faster (docs/profile.md)
                        from .search import FlatIndex

                        index = FlatIndex(self.bank.numpy())
                    self._index = index
        return self._index

    def forward(self, q: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(k or self.k, self.bank.shape[0])
        if fast_path(q):
            dist, idx = self.search_index().search(np.ascontiguousarray(q.detach().numpy(), dtype=np.float32), k)
            return torch.from_numpy(dist), torch.from_numpy(idx)
        return knn(q, self.bank, k, self.chunk)


def knn(q: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k-NN in torch: ‖q‖² − 2q·b + ‖b‖² per bank chunk, the k smallest kept
    (float32, also under CUDA autocast)."""
    with full_precision(q):
        return _knn(q.float(), bank, k, chunk)


def _knn(q: torch.Tensor, bank: torch.Tensor, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    qq = (q * q).sum(1, keepdim=True)
    best_d, best_i = None, None
    for start in range(0, bank.shape[0], chunk):
        b = bank[start : start + chunk]
        d = (qq - 2.0 * (q @ b.T) + (b * b).sum(1)[None]).clamp_min(0.0)
        kk = min(k, b.shape[0])
        if kk == 1:
            v, i = d.min(1, keepdim=True)
        else:
            v, i = torch.topk(d, kk, dim=1, largest=False)
        i = i + start
        if best_d is None:
            best_d, best_i = v, i
        else:  # merge: min / topk, not sort (aten.sort.stable has no ONNX translation)
            cat_d, cat_i = torch.cat([best_d, v], 1), torch.cat([best_i, i], 1)
            if k == 1:
                best_d, order = cat_d.min(1, keepdim=True)  # the first minimum: the earlier chunk on ties
            else:
                best_d, order = torch.topk(cat_d, min(k, cat_d.shape[1]), dim=1, largest=False)
            best_i = cat_i.gather(1, order)
    return best_d, best_i


# -- Mahalanobis -------------------------------------------------------------------------------------------
class Mahalanobis(nn.Module):
    """Per-position Mahalanobis distance with the packed inverse Cholesky factor of
    ``pyad.kernels.GaussianModel`` (Σ⁻¹ = AᵀA): ``forward(x [B, P, d]) -> [B, P]``.
    CPU fast path: the compiled kernel; twin: position chunks unpacked and batched GEMM."""

    def __init__(self, mean: torch.Tensor, factor: torch.Tensor, eps: float, count: int, chunk_bytes: int = 64 << 20):
        super().__init__()
        self.register_buffer("mean", mean.float().contiguous())
        self.register_buffer("factor", factor.contiguous())  # float32 or float16, packed rows
        self.eps, self.count, self.chunk_bytes = float(eps), int(count), chunk_bytes
        d = mean.shape[1]
        rows, cols = np.tril_indices(d)
        self.register_buffer("_flat", torch.from_numpy(rows * d + cols), persistent=False)

    # the CUDA kernel holds the dense factor [P, d, d] on the device (once); above this
    # many bytes the twin unpacks chunks per call instead
    cuda_dense_bytes = 2 << 30

    def model(self):
        from . import kernels as K

        return K.GaussianModel(self.mean.cpu().numpy(), self.factor.cpu().numpy(), self.eps, self.count)

    def __getstate__(self):
        state = super().__getstate__().copy()
        state.pop("_cuda_model", None)  # device caches are rebuilt on use
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fast_path(x):
            from . import kernels as K

            return K.mahalanobis(x.contiguous(), self.model())
        with full_precision(x):
            p, d = self.mean.shape
            if cuda_path(x) and p * d * d * 4 <= self.cuda_dense_bytes:
                from . import kernels as K

                model = self.__dict__.get("_cuda_model")
                if model is None:  # one host model; the kernel caches its device factor in it
                    model = self.__dict__["_cuda_model"] = self.model()
                return K.mahalanobis(x.contiguous(), model)
            return self._twin(x.float())

    def _twin(self, x: torch.Tensor) -> torch.Tensor:
        p, d = self.mean.shape
        step = max(1, self.chunk_bytes // (4 * d * d))
        out = []
        for start in range(0, p, step):
            f = self.factor[start : start + step].float()
            a = f.new_zeros(f.shape[0], d * d).index_copy(1, self._flat, f).view(-1, d, d)
            z = (x[:, start : start + step] - self.mean[start : start + step]).transpose(0, 1)  # [c, B, d]
            y = torch.bmm(z, a.transpose(1, 2))
            out.append(y.square().sum(-1).sqrt().transpose(0, 1))
        return torch.cat(out, 1)


# -- weight-bound convolutions ------------------------------------------------------------------------------
# output (Conv2d) or input (ConvTranspose2d) positions per image for the GEMM: at most 64 (weight-bound),
# at least 16 (below, MKL's sgemm sums a column differently at batch 1 than in a batch; from 16 on it is
# the same, so an image scores the same alone or in a batch: measured, and tested in test_ganomaly.py)
GEMM_POSITIONS = (16, 64)


def conv(layer: nn.Module, x: torch.Tensor, relu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``relu?(layer(x) + residual)``. On the CPU fast path, outside autograd:

    - a dense 3x3 or 4x4 stride-1 Conv2d (``_winograd_ok``) runs as Winograd F(4x4, 3x3) or
      F(3x3, 4x4) (``pyad.kernels.winograd``: 4x fewer multiplications; bias, residual and
      ReLU fused into its output transform). Measured on 2 cores (AVX2), batch 16:
      ResNet-18's and Wide-ResNet-50-2's 3x3 layers 1.6-2.9x faster than torch 2.13's oneDNN
      convolution. Rounding differs from the direct convolution by about 1e-5 of the output's
      scale. ``PYAD_WINOGRAD=0`` turns it off.
    - a Conv2d or ConvTranspose2d with 16 to 64 positions per image (``GEMM_POSITIONS``;
      the choice does not depend on the batch size) runs as one GEMM straight on its
      weights (``conv_as_gemm``). Such a layer is weight-bound: GANomaly's 4x4 convolution
      from 1024 to 2048 channels at 8x8 reads 134 MB of weights for 1 GFLOP, and torch
      2.13's oneDNN convolution copies those weights into its blocked layout on every call
      (81 ms at batch 1 against 15 ms as a GEMM, 2 threads).

    Elsewhere (CUDA, autograd, export, ``portable()``, other layers) the layer itself runs,
    so exported graphs keep their Conv nodes."""
    if fast_path(x) and not torch.is_grad_enabled():
        if _winograd_ok(layer, x):
            return _winograd(layer, x, relu, residual)
        if _gemm_ok(layer, x):
            y = conv_as_gemm(layer, x)
            return _epilogue(y, relu, residual)
    return _epilogue(layer(x), relu, residual)


def _epilogue(y: torch.Tensor, relu: bool, residual: torch.Tensor | None) -> torch.Tensor:
    if torch.is_grad_enabled():
        if residual is not None:
            y = y + residual
        return F.relu(y) if relu else y
    if residual is not None:  # y is the layer's fresh output: in place, no extra pass or buffer
        y = y.add_(residual)
    return y.relu_() if relu else y


# a 3x3 or 4x4 layer takes Winograd with at least this many input and output channels and 16 output
# tiles (13x13 outputs for 3x3, 10x10 for 4x4) per image: below, the transforms cost more than the multiplications they save
# (measured at batch 1: 8x8 maps run faster as one GEMM or directly). With one tile per image MKL's GEMM
# sums a row differently alone than in a batch; from 4 tiles on the results are bitwise equal, so an
# image scores the same alone and in a batch (tested in test_winograd.py)
WINOGRAD_MIN_CHANNELS = 16
WINOGRAD_MIN_TILES = 16


def _winograd_ok(layer: nn.Module, x: torch.Tensor) -> bool:
    if type(layer) is not nn.Conv2d or x.dim() != 4 or x.dtype != torch.float32:
        return False
    if (layer.stride != (1, 1) or layer.dilation != (1, 1) or layer.groups != 1 or layer.padding_mode != "zeros"
            or isinstance(layer.padding, str) or layer.padding[0] != layer.padding[1]
            or layer.kernel_size[0] != layer.kernel_size[1]):
        return False
    return _winograd_shape_ok(layer.weight.shape, layer.padding[0], x)


def _winograd_shape_ok(weight_shape, padding: int, x: torch.Tensor) -> bool:
    """A stride-1 convolution with a [K, C, r, r] kernel and zero padding ``padding`` of x
    takes Winograd: r = 3 or 4, padding < r, enough channels and output tiles, a fast backend."""
    k, c, r = weight_shape[0], weight_shape[1], weight_shape[-1]
    if r not in (3, 4) or weight_shape[-2] != r or not 0 <= padding <= r - 1 or x.dim() != 4 or x.shape[1] != c:
        return False
    if min(c, k) < WINOGRAD_MIN_CHANNELS:
        return False
    ho, wo = x.shape[2] + 2 * padding - r + 1, x.shape[3] + 2 * padding - r + 1
    m = 7 - r  # outputs per tile side
    if ho < 1 or wo < 1 or ((ho + m - 1) // m) * ((wo + m - 1) // m) < WINOGRAD_MIN_TILES:
        return False
    if os.environ.get("PYAD_WINOGRAD", "1") == "0":
        return False
    from .kernels import _backend

    return _backend.name() in ("native", "numba")  # the NumPy reference is a specification, not a fast path


class _WinogradConv(torch.autograd.Function):
    """conv2d(x, w, b, stride 1, padding p) with a 3x3 or 4x4 kernel, forward and backward by
    Winograd: dx is the convolution of dy with the flipped, transposed kernel (padding r-1-p),
    dw the adjoint of the forward's tiles (``winograd_weight_grad``), db the sum of dy."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        from .kernels import winograd

        r = weight.shape[-1]
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        b = None if bias is None else bias.detach()
        return winograd.winograd_conv(x.detach(), winograd.winograd_weights(weight), r, b, padding)

    @staticmethod
    def backward(ctx, dy):
        from .kernels import winograd

        x, weight = ctx.saved_tensors
        r, p = weight.shape[-1], ctx.padding
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            flipped = weight.detach().flip(2, 3).transpose(0, 1)
            dx = winograd.winograd_conv(dy, winograd.winograd_weights(flipped), r, None, r - 1 - p)
        if ctx.needs_input_grad[1]:
            dw = winograd.winograd_weight_grad(x.detach(), dy, r, p)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3))
        return dx, dw, db, None


def conv2d_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 padding: int = 0) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=padding)`` (stride 1) for training: on the CPU fast
    path, float32 and outside autocast, a 3x3 or 4x4 kernel (``_winograd_shape_ok``) runs forward
    and backward by Winograd (``_WinogradConv``); the weight gradient is the costly part of a
    training step and torch 2.13's oneDNN computes it at a third of its forward's speed on AVX2
    (EfficientAD-S's 128->256 4x4 layer at batch 3, forward and backward: 1,605 ms against 532,
    ``bench/winograd_training.py``). Rounding
    differs from the direct convolution by about 1e-5 of the scale. Elsewhere, F.conv2d."""
    if (fast_path(x) and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and _winograd_shape_ok(weight.shape, padding, x)):
        return _WinogradConv.apply(x, weight, bias, padding)
    return F.conv2d(x, weight, bias, padding=padding)


def release_winograd(net: nn.Module) -> None:
    """Drop the transformed weights cached on ``net``'s layers (4x the 3x3 weights, 2.25x the
    4x4: Wide-ResNet-50-2's up to layer 3 hold 224 MB); the next call transforms them again.
    The frozen-feature detectors' fit calls it before building their memory bank or Gaussians."""
    for module in net.modules():
        module.__dict__.pop("_pyad_winograd", None)


def _winograd(layer: nn.Conv2d, x: torch.Tensor, relu: bool, residual: torch.Tensor | None) -> torch.Tensor:
    from .kernels import winograd

    w = layer.weight
    # an inference tensor has no version counter (it can only change in place inside inference_mode)
    key = (w.data_ptr(), -1 if w.is_inference() else w._version)
    cached = layer.__dict__.get("_pyad_winograd")
    if cached is None or cached[0] != key:  # transformed once per weight version (BatchNorm folding changes it)
        cached = (key, winograd.winograd_weights(w))
        layer.__dict__["_pyad_winograd"] = cached
    b = None if layer.bias is None else layer.bias.detach()
    return winograd.winograd_conv(x, cached[1], layer.kernel_size[0], b, layer.padding[0], residual, relu)


def _gemm_ok(layer: nn.Module, x: torch.Tensor) -> bool:
    if not isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)) or x.dim() != 4:
        return False
    if layer.groups != 1 or layer.dilation != (1, 1) or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        return False
    ho, wo = x.shape[2:] if isinstance(layer, nn.ConvTranspose2d) else _conv_output_size(layer, x)
    return GEMM_POSITIONS[0] <= ho * wo <= GEMM_POSITIONS[1]


def _conv_output_size(layer: nn.Conv2d, x: torch.Tensor) -> tuple[int, int]:
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    return (x.shape[2] + 2 * ph - kh) // sh + 1, (x.shape[3] + 2 * pw - kw) // sw + 1


def conv_as_gemm(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Conv2d (im2col, then [C_out, C_in·k²] × [C_in·k², B·L]) or ConvTranspose2d
    ([C_out·k², C_in] × [C_in, B·H·W], then col2im) as one GEMM over the whole batch, the
    weights read once in their own layout. groups 1, dilation 1, zero padding."""
    w, b = layer.weight, layer.bias
    n = x.shape[0]
    if isinstance(layer, nn.Conv2d):
        ho, wo = _conv_output_size(layer, x)
        cols = F.unfold(x, layer.kernel_size, padding=layer.padding, stride=layer.stride)  # [B, C_in·k², L]
        cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)
        y = (w.reshape(w.shape[0], -1) @ cols).view(w.shape[0], n, ho, wo).transpose(0, 1)
    else:
        (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
        (oh, ow), (h, wd) = layer.output_padding, x.shape[2:]
        size = ((h - 1) * sh - 2 * ph + kh + oh, (wd - 1) * sw - 2 * pw + kw + ow)
        xs = x.reshape(n, x.shape[1], h * wd).transpose(0, 1).reshape(x.shape[1], n * h * wd)
        cols = (w.reshape(w.shape[0], -1).T @ xs).view(-1, n, h * wd).transpose(0, 1)  # [B, C_out·k², H·W]
        y = F.fold(cols, size, layer.kernel_size, padding=layer.padding, stride=layer.stride)
    if b is not None:
        y = y + b.view(1, -1, 1, 1)
    return y.contiguous()


def sequential(layers: nn.Sequential, x: torch.Tensor, train: bool = False) -> torch.Tensor:
    """Run ``layers`` in order, each through ``conv`` (which runs any other layer as is); a
    ReLU right after a convolution is fused into it. ``train``: under autograd, the dense
    stride-1 3x3 and 4x4 convolutions run through ``conv2d_train`` (Winograd forward and
    backward on the CPU), the other layers as they are."""
    mods = list(layers)
    i = 0
    while i < len(mods):
        layer = mods[i]
        if train and torch.is_grad_enabled() and _winograd_ok(layer, x):
            x = conv2d_train(x, layer.weight, layer.bias, layer.padding[0])
            i += 1
            continue
        fuse = isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)) and i + 1 < len(mods) and type(mods[i + 1]) is nn.ReLU
        x = conv(layer, x, relu=fuse)
        i += 2 if fuse else 1
    return x


# -- maps ----------------------------------------------------------------------------------------------------
def gaussian_kernel(sigma: float) -> torch.Tensor:
    """The 1-d kernel of ``scipy.ndimage.gaussian_filter`` (truncate 4)."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def _symmetric_pad(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """numpy 'symmetric' (scipy 'reflect') padding along ``dim``, any r."""
    n = x.shape[dim]
    idx = torch.arange(-r, n + r, device=x.device) % (2 * n)
    idx = torch.where(idx >= n, 2 * n - 1 - idx, idx)
    return x.index_select(dim, idx)


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter(m, sigma)`` per map (truncate 4, mode 'reflect'),
    as the official PatchCore and PaDiM code smooth anomaly maps. [B, H, W]."""
    if sigma <= 0:
        return maps
    with full_precision(maps):
        return _blur(maps.float(), sigma)


def _blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    k = gaussian_kernel(sigma).to(maps.device, maps.dtype)
    r = (len(k) - 1) // 2
    out = maps[:, None]
    out = F.conv2d(_symmetric_pad(out, r, 2), k.view(1, 1, -1, 1))
    out = F.conv2d(_symmetric_pad(out, r, 3), k.view(1, 1, 1, -1))
    return out[:, 0]


def upsample(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """[B, h, w] -> [B, H, W], bilinear (align_corners=False, no antialias: the same in
    every path, as torch, ONNX Runtime and the official codes resize maps)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def log2_ceil(n: int) -> int:
    return int(math.ceil(math.log2(max(1, n))))
