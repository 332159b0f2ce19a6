"""AST: Asymmetric Student-Teacher networks (Rudolph, Wehrbein, Rosenhahn, Wandt,
WACV 2023; official code marco-rudolph/AST @8c243ad, cited below as file:line).

A frozen ImageNet backbone gives a feature map (EfficientNet-B5 up to block 35:
304 channels at stride 32, 24×24 at the official 768 px; ``model.py`` l.41-56).
A *teacher* normalising flow maps it, conditioned on a 2-D sin/cos positional
encoding, to z_T and is trained by maximum likelihood (NLL); then a conventional
residual CNN *student* regresses z_T from the same features (MSE). The flow is
bijective, so it cannot ignore an anomalous input the way an identical student
architecture can; the student only learnt z_T on normal features. The map is
the per-position mean over channels of (z_T − z_S)², bicubic-upsampled; the
image score its maximum (``eval.py`` l.30-60; Rudolph in AST issue #13).

Faithful pieces: positional encoding (``model.py`` l.59-79, from CFLOW-AD), flow
of ``n_coupling_blocks`` fixed random channel permutations (``np.random.seed(k)``)
each followed by a GLOW affine coupling conditioned on the encoding, soft clamp
e(s) = exp(α·0.636·atan(s/α)), outputs clamped to ±1e6 (``freia_funcs.py``
l.25-155), subnets Conv-ReLU-Conv with replicate padding whose output is scaled
by a learnable γ initialised to 0 (identity flow at start, l.57-87), kernels
[3, 3, 3, 5]; student Conv3 + LeakyReLU, 4 residual blocks of
[Conv3-BN-LReLU-Conv3-BN-LReLU] + skip, Conv3 (``model.py`` l.124-168); NLL
0.5·Σ_c z² − log|det J| per position, mean over positions and batch (no /C, no
constant; ``utils.py`` l.72-81); Adam lr 2e-4, eps 1e-8, weight decay 1e-5,
batch 8 with drop_last, teacher first then student for the same number of
epochs (``train_teacher.py`` l.15, ``train_student.py`` l.21, ``utils.py`` l.188-193);
features pre-extracted once per fit, as the repository's recommended
``preprocess.py`` / ``pre_extracted=True`` path does.

Hyperparameters: the repository's ``config.py`` is set for MVTec 3D-AD (its README:
"paper-given parameters for MVTec 3D-AD"): clamp 1.9, 64 hidden flow channels,
3×24 = 72 epochs. For MVTec AD (RGB only) pyad's defaults are the 2-D settings
the paper is reported to use and that the follow-up code Dominic-dul/anomalib_old
(commit 63688c0, "as per paper") sets: clamp 3.0, 1024 hidden flow channels,
10×24 = 240 epochs. The paper text itself could not be read here; see
docs/detectors/ast.md.

Differences from the repository, all documented there: the backbone is any pyad
backbone (``efficientnet_b5`` with ``layers=("blocks.35",)`` is the official one;
without its ImageNet weights use e.g. ``efficientnet_lite0`` / ``mobilenet_v2`` at
stride 32, a substitute); images are resized to ``image_size`` by pyad's shared
pre-processing; the official code evaluates on the *test* set after every 24
epochs (it keeps the last model, so no selection happens); pyad only logs the
validation losses of held-out normal images. The teacher's outputs for the
training features are computed once per student phase (the teacher is frozen
and deterministic, so this equals recomputing them every step as
``train_student.py`` l.43 does).

Reusable pieces for other detectors (the EfficientAD-AST hybrid):
``positional_encoding_2d``, ``FlowTeacher``, ``Student``, ``nf_loss``, ``st_loss``.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import training
from .base import register, stage
from .frozen import FrozenFeatureDetector
from .settings import BackboneSettings, Preprocessing, Runtime, Thresholds, Training, check
from .trained import TrainedDetector


# -- positional encoding ---------------------------------------------------------------------------------
def positional_encoding_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """CFLOW-AD's 2-D sin/cos encoding as AST uses it (``model.py`` l.59-79):
    [1, dim, height, width]; channels 0..dim/2-1 encode the column (sin at even,
    cos at odd channels), dim/2.. the row, at frequencies exp(-2i·ln(1e4)/(dim/2))."""
    if dim % 4 != 0 or dim <= 0:
        raise ValueError(f"pos_enc_dim: expected a positive multiple of 4, got {dim}")
    p = torch.zeros(dim, height, width)
    half = dim // 2
    div = torch.exp(torch.arange(0.0, half, 2) * -(math.log(1e4) / half))
    pos_w = torch.arange(0.0, width).unsqueeze(1)
    pos_h = torch.arange(0.0, height).unsqueeze(1)
    p[0:half:2] = torch.sin(pos_w * div).T.unsqueeze(1).repeat(1, height, 1)
    p[1:half:2] = torch.cos(pos_w * div).T.unsqueeze(1).repeat(1, height, 1)
    p[half::2] = torch.sin(pos_h * div).T.unsqueeze(2).repeat(1, 1, width)
    p[half + 1 :: 2] = torch.cos(pos_h * div).T.unsqueeze(2).repeat(1, 1, width)
    return p[None]


# -- the normalising-flow teacher --------------------------------------------------------------------------
class SubNet(nn.Module):
    """``F_conv`` (``freia_funcs.py`` l.57-87): Conv k×k -> ReLU -> Conv k×k, both
    with replicate padding, the output scaled by a learnable γ initialised to 0."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, kernel: int):
        super().__init__()
        pad = kernel // 2
        self.conv1 = nn.Conv2d(in_channels, hidden, kernel, padding=pad, padding_mode="replicate")
        self.conv2 = nn.Conv2d(hidden, out_channels, kernel, padding=pad, padding_mode="replicate")
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x))) * self.gamma


class AffineCoupling(nn.Module):
    """``glow_coupling_layer_cond`` (``freia_funcs.py`` l.90-155). x = [x1, x2]
    (split C//2, C - C//2); with [s2, t2] = F2([x2, cond]) and [s1, t1] = F1([y1, cond]):
    y1 = e(s2)·x1 + t2, y2 = e(s1)·x2 + t1, e(s) = exp(α·0.636·atan(s/α))
    (α = ``clamp``; 0 = no clamp). log|det J| per position = Σ_c log e(s1) + Σ_c log e(s2)."""

    def __init__(self, channels: int, cond_channels: int, hidden: int, kernel: int, clamp: float):
        super().__init__()
        self.len1, self.len2 = channels // 2, channels - channels // 2
        self.clamp = float(clamp)
        self.s1 = SubNet(self.len1 + cond_channels, self.len2 * 2, hidden, kernel)
        self.s2 = SubNet(self.len2 + cond_channels, self.len1 * 2, hidden, kernel)

    def log_e(self, s):
        return self.clamp * 0.636 * torch.atan(s / self.clamp) if self.clamp > 0 else s

    def forward(self, x, cond):
        x1, x2 = x[:, : self.len1], x[:, self.len1 :]
        s2, t2 = self.s2(torch.cat([x2, cond], 1)).chunk(2, 1)
        log2 = self.log_e(s2)
        y1 = torch.exp(log2) * x1 + t2
        s1, t1 = self.s1(torch.cat([y1, cond], 1)).chunk(2, 1)
        log1 = self.log_e(s1)
        y2 = torch.exp(log1) * x2 + t1
        y = torch.clamp(torch.cat([y1, y2], 1), -1e6, 1e6)
        return y, log1.sum(1) + log2.sum(1)

    def inverse(self, y, cond):
        y1, y2 = y[:, : self.len1], y[:, self.len1 :]
        s1, t1 = self.s1(torch.cat([y1, cond], 1)).chunk(2, 1)
        x2 = (y2 - t1) / torch.exp(self.log_e(s1))
        s2, t2 = self.s2(torch.cat([x2, cond], 1)).chunk(2, 1)
        x1 = (y1 - t2) / torch.exp(self.log_e(s2))
        return torch.cat([x1, x2], 1)


class FlowTeacher(nn.Module):
    """AST's teacher (``model.py`` get_nf, l.14-38): ``len(kernels)`` blocks of a fixed
    channel permutation (``np.random.seed(k)``; permutation k of the official code)
    and an ``AffineCoupling`` conditioned on the positional encoding.

    forward(x [B, C, h, w], cond [B, P, h, w]) -> (z [B, C, h, w], log|det J| [B, h, w]);
    ``inverse(z, cond)`` -> x (exact up to float rounding)."""

    def __init__(self, channels: int, cond_channels: int = 32, hidden: int = 1024, clamp: float = 3.0,
                 kernels=(3, 3, 3, 5)):
        super().__init__()
        self.couplings = nn.ModuleList(AffineCoupling(channels, cond_channels, hidden, k, clamp) for k in kernels)
        for k in range(len(kernels)):
            perm = np.random.RandomState(k).permutation(channels)  # = np.random.seed(k); permutation
            self.register_buffer(f"perm{k}", torch.from_numpy(perm).long(), persistent=False)
            self.register_buffer(f"inv{k}", torch.from_numpy(np.argsort(perm)).long(), persistent=False)

    def forward(self, x, cond, with_logdet: bool = True):
        logdet = x.new_zeros(x.shape[0], x.shape[2], x.shape[3]) if with_logdet else None
        for k, coupling in enumerate(self.couplings):
            x, ld = coupling(x[:, getattr(self, f"perm{k}")], cond)
            if with_logdet:
                logdet = logdet + ld
        return x, logdet

    def inverse(self, z, cond):
        for k in reversed(range(len(self.couplings))):
            z = self.couplings[k].inverse(z, cond)[:, getattr(self, f"inv{k}")]
        return z


# -- the student -------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """``res_block`` (``model.py`` l.124-143): Conv3-BN-LReLU-Conv3-BN-LReLU, + input."""

    def __init__(self, channels: int):
        super().__init__()
        self.l1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.l2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = F.leaky_relu(self.bn1(self.l1(x)), 0.01)
        y = F.leaky_relu(self.bn2(self.l2(y)), 0.01)
        return y + x


class Student(nn.Module):
    """AST's conventional student (``model.py`` l.146-168): Conv3 (in -> hidden) +
    LeakyReLU(0.01), ``n_blocks`` residual blocks, Conv3 (hidden -> out), no output
    activation. The input is the concatenation [positional encoding, features]."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 1024, n_blocks: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.res = nn.ModuleList(ResBlock(hidden) for _ in range(n_blocks))
        self.conv2 = nn.Conv2d(hidden, out_channels, 3, padding=1)

    def forward(self, x):
        x = F.leaky_relu(self.conv1(x), 0.01)
        for block in self.res:
            x = block(x)
        return self.conv2(x)


# -- losses --------------------------------------------------------------------------------------------------
def nf_loss(z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    """Teacher NLL (``utils.py`` get_nf_loss, mask ≡ 1): mean over positions and
    batch of 0.5·Σ_c z² − log|det J|."""
    return (0.5 * z.square().sum(1) - logdet).mean()


def teacher_epoch(run, teacher: nn.Module, feats: torch.Tensor, pe: torch.Tensor, order) -> None:
    """One epoch of the flow teacher on pre-extracted features (``train_nf_teacher.py``):
    the NLL of each batch of ``order`` (index arrays), one optimiser step each."""
    teacher.train()
    for idx in run.each(order):
        f = feats[torch.from_numpy(idx).to(feats.device)]
        with run.autocast():
            z, logdet = teacher(f, pe.expand(len(f), -1, -1, -1))
            loss = nf_loss(z.float(), logdet.float())
        run.backward(loss, "teacher")
        run.log(nll=loss)


def st_loss(z_teacher: torch.Tensor, z_student: torch.Tensor) -> torch.Tensor:
    """Student loss (``utils.py`` get_st_loss): mean over channels, positions and batch
    of (z_T − z_S)²."""
    return (z_teacher - z_student).square().mean()


def anomaly_map(z_teacher: torch.Tensor, z_student: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] x 2 -> [B, h, w]: mean over channels of (z_T − z_S)²."""
    return (z_teacher - z_student).square().mean(1)


# -- the inference module --------------------------------------------------------------------------------------
class ASTModule(nn.Module):
    """Normalised image [B, 3, S, S] -> (scores [B], maps [B, S, S]).

    score "max": the maximum of the map bicubic-upsampled ×8 (``eval.py`` l.30, l.57-60:
    scale_factor = depth_len // map_len = 8 at every image size); "mean": the mean of
    the map at feature resolution (the official "mean over maps")."""

    def __init__(self, backbone, layer: str, teacher: FlowTeacher, student: Student, pe: torch.Tensor,
                 size: int, score: str):
        super().__init__()
        self.backbone, self.layer, self.teacher, self.student = backbone, layer, teacher, student
        self.register_buffer("pe", pe)
        self.size, self.score = size, score

    def forward(self, x):
        feat = self.backbone(x)[self.layer].float()
        stage("backbone")
        cond = self.pe.expand(feat.shape[0], -1, -1, -1)
        z_t, _ = self.teacher(feat, cond, with_logdet=False)
        stage("teacher")
        z_s = self.student(torch.cat([cond, feat], 1))
        stage("student")
        low = anomaly_map(z_t, z_s)
        if self.score == "max":
            up8 = F.interpolate(low[:, None], scale_factor=8, mode="bicubic", align_corners=False)
            scores = up8.flatten(1).amax(1)
        else:
            scores = low.flatten(1).mean(1)
        maps = F.interpolate(low[:, None], size=(self.size, self.size), mode="bicubic", align_corners=False)[:, 0]
        stage("map")
        return scores, maps


@register("ast")
class AST(TrainedDetector, FrozenFeatureDetector):
    """Asymmetric Student-Teacher (see the module docstring). ``networks_`` after fit:
    {"teacher": FlowTeacher, "student": Student}; the backbone is frozen and
    resolved like the frozen-feature detectors' (``weights``, ``include_weights``).

    backbone / weights / layers: the feature tap (one layer). Official: efficientnet_b5,
        "imagenet" (lukemelas checkpoint), ("blocks.35",) — 304 channels at stride 32.
    coupling_blocks, kernels: the flow's blocks and their subnet kernel sizes.
    teacher_hidden, clamp: subnet width and soft-clamp α (MVTec AD: 1024 and 3.0;
        the repository's MVTec 3D-AD config: 64 and 1.9).
    student_hidden, student_blocks: the student's width and residual blocks (1024, 4).
    pos_enc_dim: channels of the positional encoding (32; 0 = none).
    teacher_epochs: the teacher's epochs (None = ``max_epochs``, as the official code
        trains both networks for meta_epochs × sub_epochs). ``max_epochs`` is the
        student's; ``max_steps`` caps each network's optimiser steps.
    score: "max" (the authors' image score, AST issue #13) or "mean".
    """

    groups = (BackboneSettings, Preprocessing, Runtime, Thresholds, Training)
    defaults = dict(backbone="efficientnet_b5", weights="imagenet", layers=("blocks.35",), image_size=768,
                    max_epochs=240, lr=2e-4, batch_size=8)

    def __init__(self, *, coupling_blocks=4, kernels=(3, 3, 3, 5), teacher_hidden=1024, clamp=3.0,
                 student_hidden=1024, student_blocks=4, pos_enc_dim=32, teacher_epochs=None, weight_decay=1e-5,
                 adam_eps=1e-8, score="max", **common):
        super().__init__(**common)
        self.coupling_blocks = coupling_blocks
        self.kernels = tuple(kernels) if isinstance(kernels, list) else kernels
        self.teacher_hidden = teacher_hidden
        self.clamp = clamp
        self.student_hidden = student_hidden
        self.student_blocks = student_blocks
        self.pos_enc_dim = pos_enc_dim
        self.teacher_epochs = teacher_epochs
        self.weight_decay = weight_decay
        self.adam_eps = adam_eps
        self.score = score

    # -- parameters ---------------------------------------------------------------------------------------
    def _check_own_params(self):
        def pos_int(v, lo=1):
            return isinstance(v, int) and not isinstance(v, bool) and v >= lo

        check(pos_int(self.coupling_blocks), "coupling_blocks", "an int >= 1", self.coupling_blocks)
        check(isinstance(self.kernels, tuple) and len(self.kernels) == self.coupling_blocks
              and all(pos_int(k) and k % 2 == 1 for k in self.kernels), "kernels",
              f"a tuple of {self.coupling_blocks} odd kernel sizes (one per coupling block)", self.kernels)
        check(pos_int(self.teacher_hidden), "teacher_hidden", "an int >= 1", self.teacher_hidden)
        check(lambda: float(self.clamp) >= 0 and not isinstance(self.clamp, bool), "clamp", "a number >= 0",
              self.clamp)
        check(pos_int(self.student_hidden), "student_hidden", "an int >= 1", self.student_hidden)
        check(pos_int(self.student_blocks, 0), "student_blocks", "an int >= 0", self.student_blocks)
        check(pos_int(self.pos_enc_dim, 0) and self.pos_enc_dim % 4 == 0, "pos_enc_dim",
              "0 or a positive multiple of 4", self.pos_enc_dim)
        check(self.teacher_epochs is None or pos_int(self.teacher_epochs, 0), "teacher_epochs", "None or an int >= 0",
              self.teacher_epochs)
        check(lambda: float(self.weight_decay) >= 0 and not isinstance(self.weight_decay, bool), "weight_decay",
              "a number >= 0", self.weight_decay)
        check(lambda: float(self.adam_eps) > 0 and not isinstance(self.adam_eps, bool), "adam_eps", "a number > 0",
              self.adam_eps)
        check(self.score in ("max", "mean"), "score", "'max' or 'mean'", self.score)
        check(len(self.layers) == 1, "layers", "exactly one feature layer (AST uses one map)", self.layers)
        check(self.early_stopping_patience is None, "early_stopping_patience",
              "None (AST trains a fixed number of epochs, as the official code; validation losses are logged)",
              self.early_stopping_patience)
        self._feature_shape()  # the layer must exist for this backbone (ValueError naming layers)

    def _normalisation(self):
        if self.backbone.startswith("efficientnet_lite"):
            from .. import efficientnet as E  # the Lite checkpoints' inception-style mean/std

            return E.LITE_MEAN, E.LITE_STD
        return super()._normalisation()

    def _feature_shape(self) -> tuple[int, int, int]:
        """(channels, h, w) of the tapped layer at the network input size, from a dry
        run on the meta device (no weights, no compute)."""
        key = ("shape", self.backbone, tuple(self.layers), self.preprocessing.size)
        if key not in self._cache:
            from ..backbones import Backbone

            with torch.device("meta"):
                net = Backbone(self.backbone, tuple(self.layers))
                out = net(torch.zeros(1, 3, self.preprocessing.size, self.preprocessing.size))
            self._cache[key] = tuple(out[self.layers[0]].shape[1:])
        return self._cache[key]

    # -- networks -----------------------------------------------------------------------------------------------
    def _networks(self):
        c, _, _ = self._feature_shape()
        return {
            "teacher": FlowTeacher(c, self.pos_enc_dim, self.teacher_hidden, self.clamp, self.kernels),
            "student": Student(c + self.pos_enc_dim, c, self.student_hidden, self.student_blocks),
        }

    def _pe(self) -> torch.Tensor:
        _, h, w = self._feature_shape()
        return positional_encoding_2d(self.pos_enc_dim, h, w) if self.pos_enc_dim else torch.zeros(1, 0, h, w)

    def _build_module(self):
        nets = self.networks_
        return ASTModule(self._network(), self.layers[0], nets["teacher"], nets["student"], self._pe(),
                         self.preprocessing.size, self.score)

    # -- training ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features of uint8 images [N, S, S, 3] -> [N, C, h, w] float32 (the
        frozen backbone in eval mode, once per fit: the official pre-extraction)."""
        net = self._network()
        out = []
        for start in range(0, len(images), self.batch_size):
            out.append(net(self.to_input(images[start : start + self.batch_size]))[self.layers[0]].float())
        c, h, w = self._feature_shape()
        return torch.cat(out) if out else torch.zeros(0, c, h, w, device=self.device)

    def _train(self, nets, train, val, *, labels=None, checkpoint=None):
        teacher, student = nets["teacher"], nets["student"]
        clock = time.perf_counter()
        feats, val_feats = self.extract(train), self.extract(val)
        seconds = {"extract": time.perf_counter() - clock, "teacher": 0.0, "student": 0.0}
        counted = {"teacher": 0, "student": 0}
        pe = self._pe().to(self.device)
        batches = training.Batches(len(feats), self.batch_size, self.seed, drop_last=True)  # utils.py l.188-193
        epochs_s = self.max_epochs if self.max_epochs is not None else -(-self.max_steps // len(batches))
        epochs_t = epochs_s if self.teacher_epochs is None else self.teacher_epochs
        kw = dict(weight_decay=self.weight_decay, eps=self.adam_eps)
        opts = {"teacher": training.optimizer("adam", teacher.parameters(), self.lr, **kw),
                "student": training.optimizer("adam", student.parameters(), self.lr, **kw)}
        run = training.Run(self.name, modules=nets, optimizers=opts, max_epochs=epochs_t + epochs_s,
                           checkpoint=checkpoint, device=self.device, amp=self.amp, settings=self.run_settings())
        targets = None
        for epoch in run.epochs():
            clock = time.perf_counter()
            phase = "teacher" if epoch < epochs_t else "student"
            first = epoch if phase == "teacher" else epoch - epochs_t
            order = batches.epoch(epoch)
            if self.max_steps is not None:  # a per-network step budget
                order = order[: max(0, self.max_steps - first * len(batches))]
            if phase == "teacher":
                teacher_epoch(run, teacher, feats, pe, order)
                if len(val_feats):
                    run.log(val_nll=self._val_nll(teacher, val_feats, pe))
            else:
                if targets is None:  # the frozen teacher's outputs, once (equal to recomputing each step)
                    targets = self._teacher_outputs(teacher, feats, pe)
                    val_targets = self._teacher_outputs(teacher, val_feats, pe)
                student.train()
                for idx in run.each(order):
                    i = torch.from_numpy(idx).to(feats.device)
                    f = feats[i]
                    with run.autocast():
                        z_s = student(torch.cat([pe.expand(len(f), -1, -1, -1), f], 1))
                        loss = st_loss(targets[i], z_s.float())
                    run.backward(loss, "student")
                    run.log(st=loss)
                if len(val_feats):
                    run.log(val_st=self._val_st(student, val_feats, val_targets, pe))
            seconds[phase] += time.perf_counter() - clock
            counted[phase] += 1
        run.finish()
        teacher.eval()
        student.eval()
        self.history_ = run.history
        # wall time of this fit's epochs (a resumed fit counts only its own)
        self.timing_ = {"extract_s": seconds["extract"], "teacher_epochs": counted["teacher"],
                        "teacher_s_per_epoch": seconds["teacher"] / max(1, counted["teacher"]),
                        "student_epochs": counted["student"],
                        "student_s_per_epoch": seconds["student"] / max(1, counted["student"])}
        return None

    @torch.no_grad()
    def _teacher_outputs(self, teacher, feats, pe):
        teacher.eval()
        out = [teacher(feats[s : s + self.batch_size], pe.expand(len(feats[s : s + self.batch_size]), -1, -1, -1),
                       with_logdet=False)[0] for s in range(0, len(feats), self.batch_size)]
        return torch.cat(out) if out else feats[:0]

    @torch.no_grad()
    def _val_nll(self, teacher, feats, pe) -> float:
        teacher.eval()
        total = 0.0
        for s in range(0, len(feats), self.batch_size):
            f = feats[s : s + self.batch_size]
            z, logdet = teacher(f, pe.expand(len(f), -1, -1, -1))
            total += float(nf_loss(z, logdet)) * len(f)
        teacher.train()
        return total / len(feats)

    @torch.no_grad()
    def _val_st(self, student, feats, targets, pe) -> float:
        student.eval()
        total = 0.0
        for s in range(0, len(feats), self.batch_size):
            f = feats[s : s + self.batch_size]
            total += float(st_loss(targets[s : s + self.batch_size],
                                   student(torch.cat([pe.expand(len(f), -1, -1, -1), f], 1)))) * len(f)
        student.train()
        return total / len(feats)

    def _buffers(self):
        return {"history": getattr(self, "history_", []), "timing": getattr(self, "timing_", {})}

    def _load_buffers(self, state):
        self.history_ = state.get("history", [])
        self.timing_ = state.get("timing", {})
