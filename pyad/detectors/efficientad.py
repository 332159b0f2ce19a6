"""EfficientAD-S and -M (Batzner, Heckler, König, "EfficientAD: Accurate Visual
Anomaly Detection at Millisecond-Level Latencies", WACV 2024), faithful to the
code that reproduces the paper and that anomalib adopted, nelson1425/EfficientAD
@fcab514 (``efficientad.py``, ``common.py``; the teacher from ``pretraining.py``:
``pyad.distill_teacher``).

Networks (``common.py`` l.6-101), kept in that code's ``nn.Sequential`` layout so
its state_dicts load unchanged:

- teacher: a patch description network (PDN; S: 4 convolutions, M: 6) with 384
  output channels, distilled from ImageNet features, frozen; trained and used
  *without padding* (``efficientad.py`` l.138-142), so a 256² image gives 56×56
  features although the teacher was distilled with padding (same weights);
- student: the same PDN with 768 channels: 0-383 imitate the teacher, 384-767 the
  autoencoder;
- autoencoder: on the image, six stride-2 convolutions to a 64×1×1 bottleneck,
  decoder of bilinear upsamplings (to 3, 8, 15, 32, 63, 127 and the map size at
  256 px; derived from the image size otherwise) each followed by a 4×4 conv, ReLU
  and Dropout(0.2).

Training (``efficientad.py`` l.159-203), batch 1, ``max_steps`` (70,000) steps:
the teacher's outputs are normalised per channel by the mean / std over the
unaugmented training images (l.341-366); L_ST = mean of the student-teacher
squared differences at or above their 0.999-quantile over C×H×W (hard-feature
loss), plus the mean squared student output on one natural image when
``penalty_images`` is given (Resize 2S, RandomGrayscale 0.3, CenterCrop S;
l.118-134; ``None`` drops it, as the reference's default); L_AE and L_STAE on a
colour-jittered copy (brightness, contrast or saturation, factor U(0.8, 1.2));
one Adam over student and autoencoder, lr 1e-4, weight decay 1e-5, lr ×0.1 after
95% of the steps.

Inference (l.262-339): M_ST = mean_c (T̃ − S[:384])², M_AE = mean_c (A − S[384:])²,
each mapped by 0.1·(M − q_a)/(q_b − q_a) with q_a, q_b its 0.9- and 0.995-quantiles
over all pixels of the validation images' raw maps (normal images held out from
training; never test images), combined 0.5/0.5, padded by 4 with zeros (the
unpadded PDN's output pixel i is the padded one's i + 4), resized bilinearly to
the input size. Image score = the map's maximum. The inference module folds the
teacher normalisation into the teacher's last convolution and the quantile
normalisation into one multiply-add per map, as ``benchmark.py`` does.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import _progress
from .. import training
from ..ops import conv2d_train, sequential, upsample
from .base import register, stage
from .settings import check
from .trained import TrainedDetector

OUT_CHANNELS = 384

# nelson1425/EfficientAD @fcab514 models/teacher_{small,medium}.pth: the teachers
# distilled there from Wide-ResNet-101-2 on ImageNet (pretraining.py), checked by
# their git blob ids (SHA-1 of "blob <size>\0" + bytes), the hashes GitHub serves.
REFERENCE_COMMIT = "fcab5146f84ae17597044ad5ddf1656ccf805401"
PRETRAINED = {
    "s": ("teacher_small.pth", "631c66c9efa7f1c0629bba344e8583fed9380bf0"),
    "m": ("teacher_medium.pth", "29db5c54b462ef32eec8ac1046b4a9770ac1dcb5"),
}


# -- networks (common.py) ---------------------------------------------------------------------------------
def pdn_small(out_channels: int = OUT_CHANNELS, padding: bool = False) -> nn.Sequential:
    """EfficientAD-S PDN (``common.py`` get_pdn_small, l.64-79)."""
    p = 1 if padding else 0
    return nn.Sequential(
        nn.Conv2d(3, 128, 4, padding=3 * p), nn.ReLU(inplace=True),
        nn.AvgPool2d(2, 2, padding=p),
        nn.Conv2d(128, 256, 4, padding=3 * p), nn.ReLU(inplace=True),
        nn.AvgPool2d(2, 2, padding=p),
        nn.Conv2d(256, 256, 3, padding=p), nn.ReLU(inplace=True),
        nn.Conv2d(256, out_channels, 4),
    )


def pdn_medium(out_channels: int = OUT_CHANNELS, padding: bool = False) -> nn.Sequential:
    """EfficientAD-M PDN (``common.py`` get_pdn_medium, l.81-101)."""
    p = 1 if padding else 0
    return nn.Sequential(
        nn.Conv2d(3, 256, 4, padding=3 * p), nn.ReLU(inplace=True),
        nn.AvgPool2d(2, 2, padding=p),
        nn.Conv2d(256, 512, 4, padding=3 * p), nn.ReLU(inplace=True),
        nn.AvgPool2d(2, 2, padding=p),
        nn.Conv2d(512, 512, 1), nn.ReLU(inplace=True),
        nn.Conv2d(512, 512, 3, padding=p), nn.ReLU(inplace=True),
        nn.Conv2d(512, out_channels, 4), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 1),
    )


def pdn(model_size: str, out_channels: int = OUT_CHANNELS, padding: bool = False) -> nn.Sequential:
    return (pdn_small if model_size == "s" else pdn_medium)(out_channels, padding)


def pdn_output_size(size: int, padding: bool) -> int:
    """Side of the PDN output for a size×size input (S and M alike): 256 -> 56
    unpadded, 64 padded."""
    p = 1 if padding else 0
    s = size + 6 * p - 3  # conv 4×4, padding 3p
    s = (s + 2 * p - 2) // 2 + 1  # avg pool 2/2, padding p
    s = s + 6 * p - 3
    s = (s + 2 * p - 2) // 2 + 1
    s = s + 2 * p - 2  # conv 3×3, padding p
    return s - 3  # conv 4×4


def decoder_sizes(size: int, map_size: int) -> tuple[int, ...]:
    """The decoder's upsampling sizes: (3, 8, 15, 32, 63, 127, 56) at 256 px
    (``common.py`` l.26-56); for other sizes the same fractions of the image
    (anomalib ``torch_model.py`` Decoder: S/64-1, S/32, S/16-1, S/8, S/4-1, S/2-1),
    at least 1, and the PDN's output size last."""
    fractions = [(64, -1), (32, 0), (16, -1), (8, 0), (4, -1), (2, -1)]
    return tuple(max(1, size // d + o) for d, o in fractions) + (map_size,)


def autoencoder(out_channels: int = OUT_CHANNELS, size: int = 256, map_size: int = 56) -> nn.Sequential:
    """The autoencoder (``common.py`` get_autoencoder, l.6-62). Encoder: five 4×4
    stride-2 convolutions and one to a 64×1×1 bottleneck (an 8×8 kernel at 256 px;
    size//32 in general, so the bottleneck stays 1×1); decoder: ``decoder_sizes``."""
    enc = []
    c = 3
    for w in (32, 32, 64, 64, 64):
        enc += [nn.Conv2d(c, w, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
        c = w
    enc.append(nn.Conv2d(64, 64, max(1, size // 32)))
    dec = []
    sizes = decoder_sizes(size, map_size)
    for s in sizes[:-1]:
        dec += [nn.Upsample(size=s, mode="bilinear", align_corners=False), nn.Conv2d(64, 64, 4, stride=1, padding=2),
                nn.ReLU(inplace=True), nn.Dropout(0.2)]
    dec += [nn.Upsample(size=sizes[-1], mode="bilinear", align_corners=False),
            nn.Conv2d(64, 64, 3, stride=1, padding=1),
            nn.ReLU(inplace=True), nn.Conv2d(64, out_channels, 3, stride=1, padding=1)]
    return nn.Sequential(*enc, *dec)


# -- teacher weights: the reference (Sequential) and anomalib (named) layouts -------------------------------
# anomalib efficient_ad/torch_model.py names the convolutions conv1..; its released
# teachers are the reference's with these names (anomalib PR #2015).
_NAMED = {"s": ("0", "3", "6", "8"), "m": ("0", "3", "6", "8", "10", "12")}
_KEY = re.compile(r"^(.*?)(conv\d+|\d+)\.(weight|bias)$")


def teacher_state(state: Mapping, model_size: str) -> dict[str, torch.Tensor]:
    """A teacher state_dict in the reference ``nn.Sequential`` layout (``0.weight``,
    ``3.weight``, ...) from either that layout or anomalib's (``conv1.weight``, ...),
    also inside a whole model's state_dict (``teacher.`` / ``model.teacher.``
    prefix) or under a ``state_dict`` key. ``ValueError`` says what does not fit."""
    if not isinstance(state, Mapping):
        raise ValueError(f"teacher: expected a state_dict (a mapping of tensors), got {type(state).__name__}")
    if isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    groups: dict[str, dict] = {}
    for k, v in state.items():
        m = _KEY.match(str(k))
        if m and isinstance(v, torch.Tensor):
            groups.setdefault(m.group(1), {})[f"{m.group(2)}.{m.group(3)}"] = v
    prefixes = [p for p in groups if p == "" or p.endswith("teacher.")] or list(groups)
    if len(prefixes) != 1:
        raise ValueError(f"teacher: cannot tell the teacher's tensors in this state_dict (groups: "
                         f"{', '.join(repr(p) for p in groups) or 'none'})")
    layers = groups[prefixes[0]]
    convs = sorted({k.split(".")[0] for k in layers})
    if len(convs) not in (4, 6):
        raise ValueError(f"teacher: expected the 4 (S) or 6 (M) convolutions of a PDN, found {len(convs)} layers")
    found = "s" if len(convs) == 4 else "m"
    if found != model_size:
        raise ValueError(f"teacher: the state_dict holds an EfficientAD-{found.upper()} teacher; pass "
                         f"model_size={found!r}")
    if any(c.startswith("conv") for c in convs):  # anomalib's names
        rename = {f"conv{i + 1}": idx for i, idx in enumerate(_NAMED[found])}
        layers = {rename.get(k.split(".")[0], k.split(".")[0]) + "." + k.split(".", 1)[1]: v for k, v in layers.items()}
    want = {k: tuple(v.shape) for k, v in pdn(model_size).state_dict().items()}
    for k, shape in want.items():
        if k not in layers:
            raise ValueError(f"teacher: the state_dict lacks {k!r} (reference layout {', '.join(want)}; "
                             f"anomalib's conv1.weight, ...)")
        if tuple(layers[k].shape) != shape:
            raise ValueError(f"teacher: {k!r} has shape {tuple(layers[k].shape)}, expected {shape} for "
                             f"EfficientAD-{model_size.upper()}")
    return {k: layers[k].detach().to(torch.float32).cpu().clone() for k in want}


def anomalib_key(key: str, model_size: str) -> str:
    """Reference key -> anomalib's (``8.weight`` -> ``conv4.weight`` for S)."""
    idx, rest = key.split(".", 1)
    return f"conv{_NAMED[model_size].index(idx) + 1}.{rest}"


# anomalib's AutoEncoder names (torch_model.py Encoder/Decoder) for the Sequential indices
_AE_NAMED = {**{f"encoder.enconv{i + 1}": str(2 * i) for i in range(6)},
             **{f"decoder.deconv{i + 1}": str(12 + 4 * i) for i in range(6)},
             "decoder.deconv7": "36", "decoder.deconv8": "38"}


def from_anomalib(state: Mapping, model_size: str) -> dict[str, dict[str, torch.Tensor]]:
    """anomalib's ``EfficientAdModel.state_dict()`` -> {"teacher", "student",
    "autoencoder": reference-layout state_dicts, "mean", "std", "quantiles"}."""
    out = {"teacher": teacher_state({k: v for k, v in state.items() if k.startswith("teacher.")}, model_size)}
    student = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    rename = {f"conv{i + 1}": idx for i, idx in enumerate(_NAMED[model_size])}
    out["student"] = {rename[k.split(".")[0]] + "." + k.split(".", 1)[1]: v.float() for k, v in student.items()}
    ae = {}
    for k, v in state.items():
        if k.startswith("ae."):
            layer, param = k[3:].rsplit(".", 1)
            ae[f"{_AE_NAMED[layer]}.{param}"] = v.float()
    out["autoencoder"] = ae
    out["mean"] = state["mean_std.mean"].float().reshape(-1)
    out["std"] = state["mean_std.std"].float().reshape(-1)
    out["quantiles"] = {k: float(state[f"quantiles.{k}"]) for k in ("qa_st", "qb_st", "qa_ae", "qb_ae")}
    return out


def _git_blob_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def pretrained_teacher(model_size: str) -> Path:
    """The reference's distilled teacher (nelson1425/EfficientAD @fcab514, Apache-2.0):
    from torch hub's checkpoint folder, downloaded once (git blob id checked); offline,
    an error says where to put it and how to distil one instead."""
    name, blob = PRETRAINED[model_size]
    url = f"https://raw.githubusercontent.com/nelson1425/EfficientAD/{REFERENCE_COMMIT}/models/{name}"
    target = Path(torch.hub.get_dir()) / "checkpoints" / f"nelson1425_efficientad_{name}"
    if not target.is_file():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".part")
            torch.hub.download_url_to_file(url, os.fspath(tmp), progress=False)
            if _git_blob_sha1(tmp) != blob:
                tmp.unlink()
                raise ValueError(f"the file's git blob id is not {blob}")
            tmp.replace(target)
        except Exception as exc:  # offline, HTTP error, wrong bytes: one actionable message
            raise ValueError(
                f"teacher: could not download the reference teacher {url} ({type(exc).__name__}: {exc}). Offline, "
                f"put models/{name} of nelson1425/EfficientAD at {target}, pass teacher='/path/to/{name}' (its or "
                f"anomalib's pretrained_teacher_*.pth), or distil one with `pyad distill-teacher`") from None
    elif _git_blob_sha1(target) != blob:
        raise ValueError(f"teacher: {target} is not the reference {name} (git blob id differs); delete it")
    return target


# -- exact quantiles ----------------------------------------------------------------------------------------
def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(x, q)`` (linear interpolation, the same float32 rank
    arithmetic) over all elements, for any number of them: ``torch.quantile``
    refuses more than 2^24 (nelson1425/EfficientAD#40, anomalib#1177; anomalib
    subsamples at random). Two order statistics by ``topk`` on the shorter side:
    no full sort, no subsampling."""
    flat = x.reshape(-1)
    n = flat.numel()
    if n == 0:
        raise ValueError("quantile: no values")
    rank = torch.tensor(q, dtype=flat.dtype) * (n - 1)
    lo = int(rank)
    hi = min(int(torch.ceil(rank)), n - 1)
    if n - lo <= lo + 2:
        top = torch.topk(flat, n - lo, largest=True, sorted=True).values
        below, above = top[n - lo - 1], top[n - hi - 1]
    else:
        bottom = torch.topk(flat, hi + 1, largest=False, sorted=True).values
        below, above = bottom[lo], bottom[hi]
    return torch.lerp(below, above, (rank - lo).to(below.device))


# -- the losses (efficientad.py l.174-198) ------------------------------------------------------------------
def hard_loss(distance: torch.Tensor, q: float = 0.999) -> torch.Tensor:
    """L_hard = mean(D[D >= quantile_q(D)]) over all C×H×W elements of D (l.178-180)."""
    with torch.no_grad():
        d_hard = quantile(distance.detach(), q)
    return distance[distance >= d_hard].mean()


def student_halves(student: nn.Sequential, x: torch.Tensor, halves: list[slice]) -> list[torch.Tensor]:
    """``student(x[i:i+1])[:, halves[i]]`` for each image of x: the shared layers run
    once on the whole batch and the last layer computes only the channels each image's
    loss uses (for S that layer is half the student's work; the result is the same)."""
    trunk = sequential(student[:-1], x, train=True)
    last = student[-1]
    return [conv2d_train(trunk[i : i + 1], last.weight[h], last.bias[h], last.padding[0]) for i, h in enumerate(halves)]


def step_losses(student, ae, t_st, t_ae, x_st, x_ae, x_penalty=None, q: float = 0.999) -> dict[str, torch.Tensor]:
    """One training step's losses, batch 1 (l.174-198). ``t_st``, ``t_ae``: the
    normalised teacher outputs of the clean and the augmented image; ``x_penalty``:
    the penalty image or None. Returns {"total", "hard", "penalty", "ae", "stae"}."""
    c = t_st.shape[1]
    xs = [x_st, x_ae] + ([x_penalty] if x_penalty is not None else [])
    halves = [slice(0, c), slice(c, 2 * c)] + ([slice(0, c)] if x_penalty is not None else [])
    outs = student_halves(student, torch.cat(xs), halves)
    loss_hard = hard_loss((t_st - outs[0]) ** 2, q)
    loss_penalty = outs[2].square().mean() if x_penalty is not None else torch.zeros((), device=x_st.device)
    ae_out = sequential(ae, x_ae, train=True)
    loss_ae = (t_ae - ae_out).square().mean()
    loss_stae = (ae_out - outs[1]).square().mean()
    total = loss_hard + loss_penalty + loss_ae + loss_stae
    return {"total": total, "hard": loss_hard, "penalty": loss_penalty, "ae": loss_ae, "stae": loss_stae}


# -- augmentation (efficientad.py l.54-61) ------------------------------------------------------------------
def _grey(x: torch.Tensor) -> torch.Tensor:
    """torchvision's rgb_to_grayscale on tensors (ITU-R 601-2 luma), [B, 1, H, W]."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def color_jitter(x: torch.Tensor, kind: int, factor: float) -> torch.Tensor:
    """torchvision ColorJitter with one of brightness (0), contrast (1) or saturation
    (2) at ``factor``, on [0, 1] images [B, 3, H, W] (torchvision's tensor formulas:
    blend with black, the grey mean, or the grey image; clamped to [0, 1])."""
    if kind == 0:
        other = torch.zeros_like(x)
    elif kind == 1:
        other = _grey(x).mean(dim=(-3, -2, -1), keepdim=True)
    else:
        other = _grey(x)
    return (factor * x + (1.0 - factor) * other).clamp(0.0, 1.0)


def jitter_choice(seed: int, step: int) -> tuple[int, float]:
    """RandomChoice of the three ColorJitters and its factor ~ U(0.8, 1.2), from
    (seed, step) only (a resumed run augments the same)."""
    rng = np.random.default_rng([seed, step, 2])
    return int(rng.integers(3)), float(rng.uniform(0.8, 1.2))


# -- penalty images (efficientad.py l.118-134) --------------------------------------------------------------
class PenaltyImages:
    """One natural image per step from a folder (searched recursively, as an
    ImageFolder root or a flat folder): Resize((2S, 2S)) bilinear, RandomGrayscale
    (p = 0.3), CenterCrop(S) (l.120-127). Image order: a seeded permutation per pass
    over the folder; the grey draw from (seed, step). Decoded by a background thread
    one step ahead."""

    def __init__(self, folder, size: int, seed: int):
        from ..images import EXTENSIONS

        root = Path(folder)
        if not root.is_dir():
            raise ValueError(f"penalty_images: {root} is not a folder")
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        if not self.files:
            raise ValueError(f"penalty_images: no image files ({', '.join(EXTENSIONS)}) in {root}")
        self.root, self.size, self.seed = root, size, seed
        self._pool = None
        self._pending: dict[int, object] = {}

    def index(self, step: int) -> int:
        n = len(self.files)
        return int(np.random.default_rng([self.seed, step // n, 1]).permutation(n)[step % n])

    def load(self, step: int) -> np.ndarray:
        """[S, S, 3] uint8 of ``step``."""
        from PIL import Image

        from ..images import open_image

        s = self.size
        with open_image(self.files[self.index(step)]) as im:
            im = im.convert("RGB").resize((2 * s, 2 * s), Image.BILINEAR)
        if np.random.default_rng([self.seed, step, 3]).random() < 0.3:
            im = im.convert("L").convert("RGB")
        o = s // 2  # torchvision center_crop: round((2S - S) / 2)
        return np.array(im)[o : o + s, o : o + s]

    def get(self, step: int) -> np.ndarray:
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1)
        fut = self._pending.pop(step, None)
        out = fut.result() if fut is not None else self.load(step)
        self._pending[step + 1] = self._pool.submit(self.load, step + 1)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._pending.clear()

    def describe(self) -> str:
        return f"{len(self.files)} images from {self.root.resolve()}"


# -- the inference module -----------------------------------------------------------------------------------
def fold_normalisation(teacher: nn.Sequential, mean: torch.Tensor, std: torch.Tensor) -> nn.Sequential:
    """A copy of the teacher whose last convolution outputs (T − μ)/σ directly:
    W' = W/σ, b' = (b − μ)/σ (one fewer pass over the features)."""
    net = copy.deepcopy(teacher)
    last = net[-1]
    with torch.no_grad():
        s = std.to(last.weight)
        last.weight.div_(s.view(-1, 1, 1, 1))
        last.bias.sub_(mean.to(last.bias)).div_(s)
    return net


def map_coefficients(q: dict) -> tuple[float, float, float]:
    """0.5·0.1·(M_ST − q_a)/(q_b − q_a) + 0.5·0.1·(M_AE − q_a')/(q_b' − q_a') as
    a·M_ST + b·M_AE + c (``efficientad.py`` l.311-315; ``benchmark.py`` l.79-81)."""
    def span(a, b):
        return max(b - a, 1e-12 * max(1.0, abs(a), abs(b)))  # constant maps: a finite map, not NaN

    a = 0.05 / span(q["qa_st"], q["qb_st"])
    b = 0.05 / span(q["qa_ae"], q["qb_ae"])
    return a, b, -(a * q["qa_st"] + b * q["qa_ae"])


class EfficientADModule(nn.Module):
    """[B, 3, S, S] ImageNet-normalised -> (scores [B], maps [B, S, S]): teacher,
    student and autoencoder, the two maps, the folded normalisation, pad and resize."""

    def __init__(self, teacher, student, ae, mean, std, quantiles: dict, size: int, pad: tuple[int, int],
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.teacher = fold_normalisation(teacher, mean, std)
        self.student = copy.deepcopy(student)
        self.ae = copy.deepcopy(ae)
        a, b, c = map_coefficients(quantiles)
        self.register_buffer("coef", torch.tensor([a, b, c], dtype=torch.float32))
        self.size, self.pad, self.dtype = size, tuple(pad), dtype
        self.channels = int(mean.numel())
        for net in (self.teacher, self.student, self.ae):
            net.eval().to(memory_format=torch.channels_last)
            net.to(dtype)

    def raw_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M_ST, M_AE) [B, h, w] before normalisation (h = w = 56 at 256 px)."""
        return self(x, raw=True)

    def forward(self, x: torch.Tensor, raw: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, maps); ``raw``: (M_ST, M_AE) before normalisation instead."""
        # Each network runs from its own line of forward: the ONNX exporter's stack traces
        # keep forward frames only, so that line is what tells a node's stage (export.py).
        x = x.contiguous(memory_format=torch.channels_last)
        x = x.to(self.dtype)
        t = sequential(self.teacher, x).float()  # ops.sequential: Winograd 3x3 / 4x4 on the CPU fast path
        stage("teacher")
        s = sequential(self.student, x).float()
        stage("student")
        a = sequential(self.ae, x).float()
        stage("autoencoder")
        c = self.channels
        m_st, m_ae = (t - s[:, :c]).square().mean(1), (a - s[:, c:]).square().mean(1)
        if raw:
            return m_st, m_ae
        m = m_st * self.coef[0] + m_ae * self.coef[1] + self.coef[2]
        if self.pad != (0, 0):
            lo, hi = self.pad
            m = F.pad(m, (lo, hi, lo, hi))  # zeros, after normalisation (efficientad.py l.279)
        m = upsample(m, self.size)
        scores = m.amax(dim=(1, 2))
        stage("map")
        return scores, m


# -- the detector -------------------------------------------------------------------------------------------
@register("efficientad")
class EfficientAD(TrainedDetector):
    """EfficientAD-S / -M (module docstring). After fit: ``networks_`` (teacher,
    student, autoencoder; reference layout), ``teacher_mean_`` / ``teacher_std_``
    [384], ``quantiles_`` (qa_st, qb_st, qa_ae, qb_ae), ``teacher_source_``,
    ``penalty_source_``, ``history_``.

    model_size: "s" or "m".
    teacher: "pretrained" (the reference's distilled teacher, downloaded once), a path
        to a teacher state_dict (the reference's or anomalib's layout, or one written by
        ``pyad.distill_teacher``), a state_dict, or "random" (seeded random init: not the
        method, for tests and timing).
    penalty_images: a folder of natural images for the penalty loss (ImageNet in the
        paper; any natural images in the reference), or None (no penalty, the
        reference's default).
    hard_quantile: the hard-feature mining quantile (0.999).
    map_quantiles: (q_a, q_b) of the map normalisation ((0.9, 0.995)).
    weight_decay: Adam's (1e-5).
    padding: the PDNs with padding (maps cover the border; the reference trains
        without: ``False``); pad_maps: pad unpadded maps by 4 to align them (True).
    """

    defaults = dict(max_steps=70_000, lr=1e-4, batch_size=8, image_size=256)
    schema = 1
    # precision="bfloat16" on the CPU: the three networks in bfloat16 (as float16 on CUDA, benchmark.py
    # l.58-61); the map arithmetic stays float32. A deviation, measured in docs/detectors/efficientad.md.
    cpu_bfloat16 = True

    def __init__(self, *, model_size="s", teacher="pretrained", penalty_images=None, hard_quantile=0.999,
                 map_quantiles=(0.9, 0.995), weight_decay=1e-5, padding=False, pad_maps=True, **common):
        super().__init__(**common)
        self.model_size = model_size
        self.teacher = teacher
        self.penalty_images = penalty_images
        self.hard_quantile = hard_quantile
        self.map_quantiles = tuple(map_quantiles) if isinstance(map_quantiles, list) else map_quantiles
        self.weight_decay = weight_decay
        self.padding = padding
        self.pad_maps = pad_maps

    def _check_own_params(self):
        check(self.model_size in ("s", "m"), "model_size", "'s' or 'm'", self.model_size)
        t = self.teacher
        check(isinstance(t, (str, os.PathLike, Mapping)), "teacher",
              "'pretrained', 'random', a path to a teacher state_dict, or a state_dict", t)
        if isinstance(t, str) and t.startswith("state_dict "):
            raise ValueError("teacher: this model was fitted with an in-memory state_dict; pass that state_dict "
                             "(or its file) again to fit")
        check(self.penalty_images is None or isinstance(self.penalty_images, (str, os.PathLike)), "penalty_images",
              "None or a folder of natural images", self.penalty_images)
        check(lambda: 0 < self.hard_quantile < 1, "hard_quantile", "a number in (0, 1)", self.hard_quantile)
        mq = self.map_quantiles
        check(lambda: len(mq) == 2 and 0 <= mq[0] < mq[1] <= 1, "map_quantiles", "(q_a, q_b) with 0 <= q_a < q_b <= 1",
              mq)
        check(lambda: self.weight_decay >= 0, "weight_decay", "a number >= 0", self.weight_decay)
        check(isinstance(self.padding, bool), "padding", "True or False", self.padding)
        check(isinstance(self.pad_maps, bool), "pad_maps", "True or False", self.pad_maps)
        check(self.early_stopping_patience is None, "early_stopping_patience",
              "None (EfficientAD trains for a fixed number of steps, as the reference)", self.early_stopping_patience)
        check(self.preprocessing.size >= 64, "image_size", "a network input of at least 64 px (the PDN's receptive "
              "field is 33 px and the autoencoder encodes by 32)", self.preprocessing.size)

    # -- sizes ------------------------------------------------------------------------------------------------
    def map_size(self) -> int:
        """The side of the PDN / autoencoder output (56 at 256 px)."""
        return pdn_output_size(self.preprocessing.size, self.padding)

    def _pad(self) -> tuple[int, int]:
        """Zero padding of the unpadded maps onto the padded PDN's grid: (4, 4) at 256."""
        if self.padding or not self.pad_maps:
            return (0, 0)
        s = self.preprocessing.size
        extra = pdn_output_size(s, True) - pdn_output_size(s, False)
        return (4, extra - 4)

    def _networks(self):
        s = self.preprocessing.size
        return {"teacher": pdn(self.model_size, OUT_CHANNELS, self.padding),
                "student": pdn(self.model_size, 2 * OUT_CHANNELS, self.padding),
                "autoencoder": autoencoder(OUT_CHANNELS, s, self.map_size())}

    def _dtype(self) -> torch.dtype:
        """The networks' dtype in the inference module: ``precision="float16"`` on CUDA
        runs them in half precision throughout, as ``benchmark.py`` l.58-61 (maps in float32)."""
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[self.precision]

    def _module(self, nets, mean, std, quantiles) -> EfficientADModule:
        return EfficientADModule(nets["teacher"], nets["student"], nets["autoencoder"], mean, std, quantiles,
                                 self.preprocessing.size, self._pad(), self._dtype())

    def _build_module(self):
        return self._module(self.networks_, self.teacher_mean_, self.teacher_std_, self.quantiles_)

    # -- the teacher ----------------------------------------------------------------------------------------------
    def _load_teacher(self, net: nn.Sequential) -> None:
        t = self.teacher
        if isinstance(t, str) and t == "random":
            self.teacher_source_ = f"random init (seed {self.seed}): not a distilled teacher"
        else:
            if isinstance(t, Mapping):
                state, source = t, "state_dict (in memory)"
            else:
                path = pretrained_teacher(self.model_size) if t == "pretrained" else Path(t)
                if not path.is_file():
                    raise ValueError(f"teacher: no teacher file at {path}")
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True)
                except Exception as exc:  # noqa: BLE001 - pickled modules, foreign formats
                    raise ValueError(f"teacher: {path} is not a torch state_dict file ({type(exc).__name__}: "
                                     f"{str(exc)[:200]}); save the teacher's state_dict()") from None
                source = os.fspath(path.resolve())
                if t == "pretrained":
                    source = f"nelson1425/EfficientAD@{REFERENCE_COMMIT[:7]} models/{PRETRAINED[self.model_size][0]}"
            net.load_state_dict(teacher_state(state, self.model_size))
            self.teacher_source_ = source
        digest = hashlib.sha256()
        for k, v in net.state_dict().items():
            digest.update(k.encode())
            digest.update(v.detach().cpu().contiguous().numpy().tobytes())
        self.teacher_id_ = "sha256:" + digest.hexdigest()

    @torch.no_grad()
    def _teacher_outputs(self, teacher, train: torch.Tensor):
        """Teacher outputs of the unaugmented training images: (cache or None, μ, σ)
        with μ_c = mean over images of each image's channel mean and σ_c² = mean over
        images of each image's mean (T − μ_c)² (``teacher_normalization``, l.341-366).
        The outputs are kept (the clean image's teacher output then costs nothing per
        step) when they fit in ``_CACHE_BYTES``; otherwise two passes, as the reference."""
        m = self.map_size()
        n = len(train)
        keep = n * OUT_CHANNELS * m * m * 4 <= _CACHE_BYTES
        cache = torch.empty(n, OUT_CHANNELS, m, m, device=self.device) if keep else None
        means = []
        for start in _progress.bar(range(0, n, self.batch_size), desc=f"{type(self).__name__}: teacher statistics"):
            out = sequential(teacher, self._input(train[start : start + self.batch_size]))
            means.append(out.mean(dim=(2, 3)))
            if keep:
                cache[start : start + len(out)] = out
        mean = torch.cat(means).mean(0)
        dists = []
        for start in range(0, n, self.batch_size):
            if keep:
                out = cache[start : start + self.batch_size]
            else:
                out = sequential(teacher, self._input(train[start : start + self.batch_size]))
            dists.append((out - mean[None, :, None, None]).square().mean(dim=(2, 3)))
        std = torch.cat(dists).mean(0).sqrt()
        if keep:
            cache.sub_(mean[None, :, None, None]).div_(std[None, :, None, None])
        return cache, mean, std

    # -- training -------------------------------------------------------------------------------------------------
    def _input(self, u8: torch.Tensor, jitter: tuple[int, float] | None = None) -> torch.Tensor:
        """uint8 [B, S, S, 3] -> normalised [B, 3, S, S] on the device, optionally
        colour-jittered first (on [0, 1] values, before the normalisation)."""
        pre = self.preprocessing
        x = u8.to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        if jitter is not None:
            x = color_jitter(x, *jitter)
        x = (x - pre.mean.to(x.device)) / pre.std.to(x.device)
        return x.contiguous(memory_format=torch.channels_last)

    def _budget(self, n: int) -> int:
        steps = [b for b in (self.max_steps, None if self.max_epochs is None else self.max_epochs * n) if b is not None]
        return min(steps)

    def _train(self, nets, train, val, *, labels=None, checkpoint=None):
        teacher, student, ae = nets["teacher"], nets["student"], nets["autoencoder"]
        self._load_teacher(teacher)
        teacher.eval().to(memory_format=torch.channels_last)
        for p in teacher.parameters():
            p.requires_grad_(False)
        cache, mean, std = self._teacher_outputs(teacher, train)
        self.teacher_mean_, self.teacher_std_ = mean.cpu(), std.cpu()
        mean4, std4 = mean[None, :, None, None], std[None, :, None, None]
        penalty = None
        if self.penalty_images is not None:
            penalty = PenaltyImages(self.penalty_images, self.preprocessing.size, self.seed)
        self.penalty_source_ = penalty.describe() if penalty else "none (no penalty loss)"

        student.train().to(memory_format=torch.channels_last)
        ae.train().to(memory_format=torch.channels_last)
        steps = self._budget(len(train))
        opt = training.optimizer("adam", itertools.chain(student.parameters(), ae.parameters()), self.lr,
                                 weight_decay=self.weight_decay)
        sched = training.scheduler("step", opt, total=steps, step_at=0.95, gamma=0.1)
        run = training.Run(self.name, modules={"student": student, "autoencoder": ae}, optimizers={"adam": opt},
                           schedulers={"step": sched}, max_steps=steps, checkpoint=checkpoint, device=self.device,
                           amp=self.amp, settings=self.run_settings())
        order = training.Batches(len(train), 1, self.seed)
        sums, count = {}, 0  # losses since the last history row (rows go in run.history: checkpointed)
        try:
            for step in run.steps():
                i = order.step(step)
                u8 = train[torch.from_numpy(i)]
                x_st = self._input(u8)
                x_ae = self._input(u8, jitter_choice(self.seed, step))
                x_p = self._input(torch.from_numpy(penalty.get(step))[None]) if penalty else None
                with torch.no_grad():
                    if cache is not None:
                        t_st = cache[int(i[0]) : int(i[0]) + 1]
                    else:
                        t_st = (sequential(teacher, x_st) - mean4) / std4
                    t_ae = (sequential(teacher, x_ae) - mean4) / std4
                with run.autocast():
                    losses = step_losses(student, ae, t_st, t_ae, x_st, x_ae, x_p, self.hard_quantile)
                run.backward(losses["total"])
                shown = {k: float(v.detach()) for k, v in losses.items() if k != "penalty" or penalty}
                run.log(**shown)
                for k, v in shown.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                if (step + 1) % 100 == 0 or step + 1 == steps:  # mean losses of the last (up to) 100 steps
                    run.history.append({"step": step + 1, **{k: v / count for k, v in sums.items()}})
                    sums, count = {}, 0
        finally:
            if penalty:
                penalty.close()
        del cache
        self.history_ = list(run.history)
        self.steps_done_ = run.step

        # map normalisation from the normal validation images, never test images (l.318-339)
        student.eval()
        ae.eval()
        source = val if len(val) else train
        self.quantiles_ = self._map_quantiles(nets, mean, std, source)
        self.map_normalisation_ = (f"quantiles {self.map_quantiles} of the raw maps of {len(source)} "
                                   + ("normal validation images" if len(val) else
                                      "training images (no validation images were held out)"))
        return None

    @torch.no_grad()
    def _map_quantiles(self, nets, mean, std, images: torch.Tensor) -> dict:
        teacher, student, ae = nets["teacher"], nets["student"], nets["autoencoder"]
        mean4, std4 = mean[None, :, None, None], std[None, :, None, None]
        sts, aes = [], []
        for start in range(0, len(images), self.batch_size):
            x = self._input(images[start : start + self.batch_size])
            t = (sequential(teacher, x) - mean4) / std4
            s = sequential(student, x)
            a = sequential(ae, x)
            sts.append((t - s[:, :OUT_CHANNELS]).square().mean(1).cpu())
            aes.append((a - s[:, OUT_CHANNELS:]).square().mean(1).cpu())
        st, ae_maps = torch.cat(sts), torch.cat(aes)
        qa, qb = self.map_quantiles
        return {"qa_st": float(quantile(st, qa)), "qb_st": float(quantile(st, qb)),
                "qa_ae": float(quantile(ae_maps, qa)), "qb_ae": float(quantile(ae_maps, qb))}

    # -- state -----------------------------------------------------------------------------------------------------
    def _buffers(self):
        return {"teacher_mean": self.teacher_mean_, "teacher_std": self.teacher_std_, "quantiles": self.quantiles_,
                "teacher_source": self.teacher_source_, "teacher_id": self.teacher_id_,
                "penalty_source": self.penalty_source_, "map_normalisation": self.map_normalisation_,
                "steps_done": self.steps_done_, "history": getattr(self, "history_", [])}

    def _load_buffers(self, state):
        self.teacher_mean_ = torch.as_tensor(state["teacher_mean"], dtype=torch.float32)
        self.teacher_std_ = torch.as_tensor(state["teacher_std"], dtype=torch.float32)
        self.quantiles_ = {k: float(v) for k, v in state["quantiles"].items()}
        self.teacher_source_ = state["teacher_source"]
        self.teacher_id_ = state["teacher_id"]
        self.penalty_source_ = state["penalty_source"]
        self.map_normalisation_ = state["map_normalisation"]
        self.steps_done_ = int(state["steps_done"])
        self.history_ = state.get("history", [])

    def save(self, path, *, include_weights: bool = False) -> None:
        """As ``Detector.save``; a teacher given as an in-memory state_dict is recorded
        by its hash (its weights are in the file with the other networks)."""
        if not isinstance(self.teacher, Mapping):
            return super().save(path, include_weights=include_weights)
        self._fitted()
        shallow = copy.copy(self)
        shallow.teacher = f"state_dict {self.teacher_id_}"
        return super(EfficientAD, shallow).save(path, include_weights=include_weights)

    def load_anomalib_state(self, state: Mapping) -> "EfficientAD":
        """Take the weights, teacher statistics and quantiles of anomalib's
        ``EfficientAdModel.state_dict()`` (same model size and image size), making this
        detector fitted with them (thresholds are not set: ``calibrate`` or fit)."""
        self._check_params()
        conv = from_anomalib(state, self.model_size)
        with training.seeded(self.seed):
            nets = self._networks()
        for k in ("teacher", "student", "autoencoder"):
            nets[k].load_state_dict(conv[k])
            nets[k].eval()
            for p in nets[k].parameters():
                p.requires_grad_(False)
        self.networks_ = nets
        self.teacher_mean_, self.teacher_std_ = conv["mean"], conv["std"]
        if not float(conv["std"].abs().sum()):  # anomalib's "not set": identity normalisation
            self.teacher_std_ = torch.ones_like(conv["std"])
        self.quantiles_ = conv["quantiles"]
        if not any(self.quantiles_.values()):  # not set: anomalib returns the raw maps
            self.quantiles_ = {"qa_st": 0.0, "qb_st": 0.1, "qa_ae": 0.0, "qb_ae": 0.1}
        self.teacher_source_, self.teacher_id_ = "anomalib state_dict", "anomalib"
        self.penalty_source_, self.map_normalisation_ = "unknown (anomalib)", "anomalib quantiles"
        self.steps_done_, self.history_ = 0, []
        self.n_train_, self.fit_seconds_ = 0, 0.0
        self.threshold_ = self.pixel_threshold_ = self.map_range_ = None
        self.threshold_rule_ = "none: weights imported from anomalib"
        with self._lock:
            self._cache.clear()
        return self


_CACHE_BYTES = 1 << 30  # teacher outputs kept during training up to this size (bottle at 256 px: 0.84 GiB)
