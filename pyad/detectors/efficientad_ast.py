"""EfficientAD-AST: EfficientAD's student-teacher-autoencoder scheme with AST's
normalising-flow teacher (D. Dulevičius, bachelor thesis "Anomaly Detection in
Industrial Manufacturing Using Deep Neural Networks", Vilnius University, §2.6
"Process of integrating AST into EfficientAD"; code Dominic-dul/anomalib_old,
``EfficientAD-main/``, cited below as file:line).

The thesis replaces EfficientAD's ImageNet-distilled PDN teacher by AST's
normalising flow (``pyad.detectors.ast``), trained per category on frozen
backbone features, and EfficientAD's PDN student and image autoencoder by an AST
residual student with 2·C outputs and a *feature* autoencoder:

- teacher: ``FlowTeacher`` (4 GLOW couplings, fixed permutations, soft clamp 3.0,
  subnets of 1024 hidden channels with γ = 0 at start, kernels [3, 3, 3, 5]),
  conditioned on the 32-channel 2-D positional encoding (``utils.py`` l.682-703);
  trained by the NLL for ``teacher_epochs`` (240, ``train_nf_teacher.py`` l.28) on
  pre-extracted features (``preprocess.py``), Adam 2e-4 / eps 1e-8 / wd 1e-5,
  batch 8; the last model is kept (l.171-174).
- student: AST's residual student (``Student`` of ``ast.py``), input [PE, features],
  2·C outputs: channels :C imitate the teacher, C: the autoencoder (``utils.py``
  l.731-758).
- autoencoder: on the [PE, features] map, six 3×3 stride-1 convolutions with ReLU
  (C+P -> 32, 32, 64, 64, 64, 64), a decoder of six 3×3 convolutions each followed
  by ReLU + Dropout(0.2), with nearest ×2 upsamplings after the 1st, 2nd and 4th, the
  last convolution (64 -> C) also followed by ReLU + Dropout, then
  AdaptiveAvgPool2d back to the feature size (``utils.py`` l.760-798). Its output
  is non-negative while z_T is not; there is no spatial bottleneck.
- loss per step (``efficientad.py`` l.195-218): L = L_ST + L_penalty + L_AE + L_STAE
  with L_ST = mean (z_T − S[:C])² (no hard-feature quantile), L_penalty = mean
  S(penalty image)[:C]², L_AE = mean (z_T − A)², L_STAE = mean (A − S[C:])²; no
  teacher normalisation; one Adam (2e-4, eps 1e-8, wd 1e-5) over student and
  autoencoder (l.180), batch 8 with drop_last, no scheduler, at most 100 epochs
  (l.34), patience 10 (l.176).
- penalty images (l.39-59, 161-162): ``len(train)`` images drawn once from a folder
  (ImageNet in the thesis), Resize to the input size, Normalize, RandomGrayscale
  (p 0.3, on the *normalised* tensor, as the thesis's transform order does), batch 8,
  shuffled per epoch, zipped with the training batches.
- map (l.377-394): 0.5·mean_c (z_T − S[:C])² + 0.5·mean_c (A − S[C:])², no map
  normalisation, bilinearly upsampled to the network input size; image score =
  its maximum (l.309, 334).

Deviations (docs/detectors/efficientad_ast.md):

1. One backbone pass per image shared by teacher, student and autoencoder, with
   features pre-extracted once per fit; the thesis wraps a B5 copy into each of
   the three networks (``StudentTeacherModel``, ``utils.py`` l.800-832) and runs all
   three per image. With every copy in eval mode the outputs are the same
   (tests/test_efficientad_ast.py) at a third of the backbone work.
2. Every backbone in eval mode: the thesis's ``student.train()`` /
   ``autoencoder.train()`` also put their B5 copies in train mode (BatchNorm batch
   statistics, drop-connect) while the teacher's stayed in eval mode.
3. Early stopping on normal *validation* images (``monitor``: "loss", the mean of
   L_ST + L_AE + L_STAE on them, or "synthetic", 1 − image AUROC of the validation
   images against copies with ``pyad.datasets.add_anomaly`` defects); the thesis
   stopped on test-set image/pixel AUROC (l.232-256). ``selection="test"`` with
   ``select_on_test(...)`` reproduces that protocol for comparison only.
4. Penalty features are pre-extracted too: each penalty image's colour and grey
   versions once per fit, the grey draw (p 0.3) per use, seeded. No penalty
   folder (``penalty_images=None``, the default: ImageNet is not shipped) drops
   L_penalty.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import training
from ..ops import sequential
from .ast import AST, FlowTeacher, Student, teacher_epoch
from .base import register, stage
from .frozen import FrozenFeatureDetector
from .settings import BackboneSettings, Preprocessing, Runtime, Thresholds, Training, check
from .trained import TrainedDetector

GREY = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale on tensors


# -- the feature autoencoder ------------------------------------------------------------------------------
def feature_autoencoder(in_channels: int, out_channels: int, size: tuple[int, int], dropout: float = 0.2,
                        width: int = 64) -> nn.Sequential:
    """The thesis's "autoencoder" (``utils.py`` l.760-798, ``get_autoencoder``) on the
    [positional encoding, features] map: encoder of six 3×3 stride-1 convolutions
    with ReLU (in -> 32, 32, 64, 64, 64, 64), decoder of six 3×3 convolutions, each
    followed by ReLU + Dropout, nearest ×2 upsamplings after the 1st, 2nd and 4th;
    the last (64 -> ``out_channels``) also ends with ReLU + Dropout; then
    AdaptiveAvgPool2d to ``size`` (the feature map's). ``width`` = 64 in the thesis
    (the encoder's first two layers have width // 2)."""
    half = width // 2

    def conv(i, o):
        return nn.Conv2d(i, o, 3, stride=1, padding=1)

    enc = [conv(in_channels, half), conv(half, half), conv(half, width), conv(width, width), conv(width, width),
           conv(width, width)]
    layers: list[nn.Module] = []
    for c in enc:
        layers += [c, nn.ReLU(inplace=True)]
    dec_out = [width] * 5 + [out_channels]
    for i, o in enumerate(dec_out):
        layers += [conv(width, o), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        if i in (0, 1, 3):
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
    layers.append(nn.AdaptiveAvgPool2d(tuple(size)))
    return nn.Sequential(*layers)


# -- losses and maps --------------------------------------------------------------------------------------
def hybrid_losses(z_t: torch.Tensor, s: torch.Tensor, a: torch.Tensor,
                  s_penalty: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``efficientad.py`` l.195-218 (C = channels of z_T): st = mean (z_T − S[:C])²,
    penalty = mean S_p[:C]² (0 without penalty images), ae = mean (z_T − A)²,
    stae = mean (A − S[C:])² (gradients reach A, as in the thesis);
    total = st + penalty + ae + stae."""
    c = z_t.shape[1]
    st = (z_t - s[:, :c]).square().mean()
    penalty = s_penalty[:, :c].square().mean() if s_penalty is not None else z_t.new_zeros(())
    ae = (z_t - a).square().mean()
    stae = (a - s[:, c:]).square().mean()
    return {"total": st + penalty + ae + stae, "st": st, "penalty": penalty, "ae": ae, "stae": stae}


def hybrid_map(z_t: torch.Tensor, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """[B, h, w]: 0.5·mean_c (z_T − S[:C])² + 0.5·mean_c (A − S[C:])² (``efficientad.py``
    l.388-393; no map normalisation)."""
    c = z_t.shape[1]
    return 0.5 * (z_t - s[:, :c]).square().mean(1) + 0.5 * (a - s[:, c:]).square().mean(1)


def to_grey(x: torch.Tensor) -> torch.Tensor:
    """RandomGrayscale's conversion on a (normalised) tensor [B, 3, H, W] -> [B, 3, H, W]."""
    g = GREY[0] * x[:, 0] + GREY[1] * x[:, 1] + GREY[2] * x[:, 2]
    return g[:, None].expand(-1, 3, -1, -1).contiguous()


# -- the inference module -----------------------------------------------------------------------------------
class EfficientADASTModule(nn.Module):
    """Normalised image [B, 3, S, S] -> (scores [B], maps [B, S, S]): one backbone
    pass shared by teacher, student and autoencoder; the map bilinearly upsampled
    to S (``efficientad.py`` l.309), the score its maximum (l.334). Without a backbone
    (fit's validation on pre-extracted features), ``x`` is the features [B, C, h, w]."""

    def __init__(self, backbone, layer: str, teacher: FlowTeacher, student: Student, ae: nn.Module,
                 pe: torch.Tensor, size: int):
        super().__init__()
        self.backbone, self.layer = backbone, layer
        self.teacher, self.student, self.ae = teacher, student, ae
        self.register_buffer("pe", pe)
        self.size = size

    def forward(self, x):
        # Each stage runs from its own lines of forward: the ONNX exporter's stack traces
        # keep forward frames only, so those lines are what tell a node's stage (export.py).
        feat = x if self.backbone is None else self.backbone(x)[self.layer].float()
        stage("backbone")
        cond = self.pe.expand(feat.shape[0], -1, -1, -1)
        z_t, _ = self.teacher(feat, cond, with_logdet=False)
        stage("teacher")
        inp = torch.cat([cond, feat], 1)
        s = self.student(inp)
        stage("student")
        a = self.ae(inp)
        stage("autoencoder")
        low = hybrid_map(z_t, s, a)
        maps = F.interpolate(low[:, None], size=(self.size, self.size), mode="bilinear", align_corners=False)[:, 0]
        scores = maps.flatten(1).amax(1)
        stage("map")
        return scores, maps


@register("efficientad_ast")
class EfficientADAST(TrainedDetector, FrozenFeatureDetector):
    """EfficientAD with AST's normalising-flow teacher (see the module docstring).
    ``networks_`` after fit: {"teacher": FlowTeacher, "student": Student (2·C outputs),
    "ae": the feature autoencoder}; the backbone is frozen, resolved like AST's.

    backbone / weights / layers: the feature tap (one layer). Thesis: efficientnet_b5,
        "imagenet", ("blocks.35",) — 304 channels at stride 32, 24×24 at 768 px.
    teacher_epochs: the flow's epochs (240, ``train_nf_teacher.py`` l.28).
        ``max_epochs`` (100) is the student + autoencoder phase's budget and
        ``early_stopping_patience`` (10) its patience; ``max_steps`` caps each phase's
        optimiser steps.
    coupling_blocks, kernels, teacher_hidden, clamp, pos_enc_dim: the flow (4,
        (3, 3, 3, 5), 1024, 3.0, 32; ``utils.py`` l.682-703).
    student_hidden, student_blocks: the student (1024, 4).
    ae_width, ae_dropout: the autoencoder's convolution width and dropout (64, 0.2).
    penalty_images: a folder of natural images for L_penalty (ImageNet in the
        thesis), or None (no penalty loss).
    monitor: the early-stopping quantity on the normal validation images: "loss"
        (L_ST + L_AE + L_STAE) or "synthetic" (1 − image AUROC against copies with
        synthetic defects, ``pyad.datasets.add_anomaly``).
    selection: "validation" (default: the monitor above; never reads test images) or
        "test": the thesis's TEST-SET model selection (``efficientad.py`` l.232-256:
        patience reset whenever the test image or pixel AUROC improves, the best
        epoch kept) on labelled test images given with ``select_on_test`` before
        ``fit``. Leaks the test set into the model: for reproducing the thesis's
        protocol only; recorded in ``selection_``.
    weight_decay, adam_eps: Adam's (1e-5, 1e-8; both phases).
    """

    groups = (BackboneSettings, Preprocessing, Runtime, Thresholds, Training)
    defaults = dict(backbone="efficientnet_b5", weights="imagenet", layers=("blocks.35",), image_size=768,
                    max_epochs=100, lr=2e-4, batch_size=8, early_stopping_patience=10)

    # AST's feature plumbing, reused as is (functions without super())
    _feature_shape = AST._feature_shape
    _pe = AST._pe
    extract = AST.extract

    def __init__(self, *, teacher_epochs=240, coupling_blocks=4, kernels=(3, 3, 3, 5), teacher_hidden=1024,
                 clamp=3.0, student_hidden=1024, student_blocks=4, pos_enc_dim=32, ae_width=64, ae_dropout=0.2,
                 penalty_images=None, monitor="loss", selection="validation", weight_decay=1e-5, adam_eps=1e-8,
                 **common):
        super().__init__(**common)
        self.teacher_epochs = teacher_epochs
        self.coupling_blocks = coupling_blocks
        self.kernels = tuple(kernels) if isinstance(kernels, list) else kernels
        self.teacher_hidden = teacher_hidden
        self.clamp = clamp
        self.student_hidden = student_hidden
        self.student_blocks = student_blocks
        self.pos_enc_dim = pos_enc_dim
        self.ae_width = ae_width
        self.ae_dropout = ae_dropout
        self.penalty_images = os.fspath(penalty_images) if isinstance(penalty_images, Path) else penalty_images
        self.monitor = monitor
        self.selection = selection
        self.weight_decay = weight_decay
        self.adam_eps = adam_eps

    # -- parameters ---------------------------------------------------------------------------------------
    def _check_own_params(self):
        def pos_int(v, lo=1):
            return isinstance(v, int) and not isinstance(v, bool) and v >= lo

        def num(v, lo, strict=False):
            return lambda: not isinstance(v, bool) and (float(v) > lo if strict else float(v) >= lo)

        check(pos_int(self.teacher_epochs, 0), "teacher_epochs", "an int >= 0", self.teacher_epochs)
        check(pos_int(self.coupling_blocks), "coupling_blocks", "an int >= 1", self.coupling_blocks)
        check(isinstance(self.kernels, tuple) and len(self.kernels) == self.coupling_blocks
              and all(pos_int(k) and k % 2 == 1 for k in self.kernels), "kernels",
              f"a tuple of {self.coupling_blocks} odd kernel sizes (one per coupling block)", self.kernels)
        check(pos_int(self.teacher_hidden), "teacher_hidden", "an int >= 1", self.teacher_hidden)
        check(num(self.clamp, 0), "clamp", "a number >= 0", self.clamp)
        check(pos_int(self.student_hidden), "student_hidden", "an int >= 1", self.student_hidden)
        check(pos_int(self.student_blocks, 0), "student_blocks", "an int >= 0", self.student_blocks)
        check(pos_int(self.pos_enc_dim, 0) and self.pos_enc_dim % 4 == 0, "pos_enc_dim",
              "0 or a positive multiple of 4", self.pos_enc_dim)
        check(pos_int(self.ae_width, 2) and self.ae_width % 2 == 0, "ae_width", "an even int >= 2", self.ae_width)
        check(lambda: not isinstance(self.ae_dropout, bool) and 0 <= float(self.ae_dropout) < 1, "ae_dropout",
              "a number in [0, 1)", self.ae_dropout)
        check(self.penalty_images is None or isinstance(self.penalty_images, str), "penalty_images",
              "None or a folder of natural images", self.penalty_images)
        if self.penalty_images is not None and not Path(self.penalty_images).is_dir():
            raise ValueError(f"penalty_images: {self.penalty_images} is not a folder")
        check(self.monitor in ("loss", "synthetic"), "monitor", "'loss' or 'synthetic'", self.monitor)
        check(self.selection in ("validation", "test"), "selection", "'validation' or 'test'", self.selection)
        check(num(self.weight_decay, 0), "weight_decay", "a number >= 0", self.weight_decay)
        check(num(self.adam_eps, 0, strict=True), "adam_eps", "a number > 0", self.adam_eps)
        check(len(self.layers) == 1, "layers", "exactly one feature layer (the thesis uses one map)", self.layers)
        self._feature_shape()  # the layer must exist for this backbone (ValueError naming layers)

    def _normalisation(self):
        if self.backbone.startswith("efficientnet_lite"):
            from .. import efficientnet as E  # the Lite checkpoints' inception-style mean/std

            return E.LITE_MEAN, E.LITE_STD
        return super()._normalisation()

    # -- networks -----------------------------------------------------------------------------------------------
    def _networks(self):
        c, h, w = self._feature_shape()
        return {
            "teacher": FlowTeacher(c, self.pos_enc_dim, self.teacher_hidden, self.clamp, self.kernels),
            "student": Student(c + self.pos_enc_dim, 2 * c, self.student_hidden, self.student_blocks),
            "ae": feature_autoencoder(c + self.pos_enc_dim, c, (h, w), self.ae_dropout, self.ae_width),
        }

    def _module(self, nets) -> EfficientADASTModule:
        return EfficientADASTModule(self._network(), self.layers[0], nets["teacher"], nets["student"], nets["ae"],
                                    self._pe(), self.preprocessing.size)

    def _build_module(self):
        return self._module(self.networks_)

    # -- test-set selection (the thesis's protocol, for comparison only) ----------------------------------------
    def select_on_test(self, images, labels, masks=None) -> "EfficientADAST":
        """Give the labelled TEST images for ``selection="test"`` (the thesis's early
        stopping on test-set image / pixel AUROC). ``images``: anything ``predict``
        takes (e.g. ``ds.test``); ``labels``: 1 = anomalous; ``masks``: bool [H, W] per
        image (None for a good image) or None (image AUROC only). Used by the next
        ``fit`` only, not saved with the model."""
        from .. import images as imgs

        items = imgs.as_items(images, "images")
        labels = np.asarray(labels).astype(int)
        if len(labels) != len(items):
            raise ValueError(f"labels: expected one label per image ({len(items)}), got {len(labels)}")
        if masks is not None and len(masks) != len(items):
            raise ValueError(f"masks: expected one mask (or None) per image ({len(items)}), got {len(masks)}")
        self._test_selection = (items, labels, masks)
        return self

    def _test_set(self):
        from PIL import Image

        items, labels, masks = self._test_selection
        u8 = self.load_images(items, "test images (test-set selection)")
        s = self.preprocessing.size
        m = None
        if masks is not None:  # efficientad.py l.128-134: Resize, ToTensor, > 0.5
            m = np.zeros((len(items), s, s), bool)
            for i, mk in enumerate(masks):
                if mk is not None:
                    im = Image.fromarray(np.asarray(mk, np.uint8) * 255).resize((s, s), Image.BILINEAR)
                    m[i] = np.asarray(im) / 255.0 > 0.5
        return u8, labels, m

    # -- training ------------------------------------------------------------------------------------------------
    def _penalty_set(self, n: int):
        """Up to ``n`` penalty images (a seeded sample of the folder, efficientad.py l.49-50), uint8."""
        from ..images import EXTENSIONS

        files = sorted(p for p in Path(self.penalty_images).rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        if not files:
            raise ValueError(f"penalty_images: no image files in {self.penalty_images}")
        pick = np.random.default_rng([self.seed, 7]).permutation(len(files))[: min(n, len(files))]
        self.penalty_source_ = f"{len(pick)} of {len(files)} images from {Path(self.penalty_images).resolve()}"
        return self.load_images([files[i] for i in sorted(pick)], "penalty images")

    @torch.no_grad()
    def _extract_grey(self, images: torch.Tensor) -> torch.Tensor:
        net = self._network()
        out = [net(to_grey(self.to_input(images[s : s + self.batch_size])))[self.layers[0]].float()
               for s in range(0, len(images), self.batch_size)]
        return torch.cat(out)

    def _synthetic(self, val: torch.Tensor) -> torch.Tensor:
        """A copy of each validation image with one synthetic defect (seeded)."""
        from ..datasets import add_anomaly

        rng = np.random.default_rng([self.seed, 11])
        return torch.from_numpy(np.stack([add_anomaly(v.numpy(), rng)[0] for v in val]))

    def _train(self, nets, train, val, *, labels=None, checkpoint=None):
        teacher, student, ae = nets["teacher"], nets["student"], nets["ae"]
        test_mode = self.selection == "test"
        if test_mode and getattr(self, "_test_selection", None) is None:
            raise ValueError("selection: 'test' needs labelled test images: call select_on_test(images, labels, "
                             "masks) before fit (the thesis's test-set model selection)")
        clock = time.perf_counter()
        feats, val_feats = self.extract(train), self.extract(val)
        pen_feats = pen_grey = None
        self.penalty_source_ = "none (no penalty loss)"
        if self.penalty_images is not None:
            pen = self._penalty_set(len(train))
            pen_feats, pen_grey = self.extract(pen), self._extract_grey(pen)
        syn_feats = test = None
        if test_mode:
            t_u8, t_labels, t_masks = self._test_set()
            test = (self.extract(t_u8), t_labels, t_masks)
            self.selection_ = ("TEST-SET selection (the thesis's protocol, efficientad.py l.232-256): epochs chosen "
                               f"on {len(t_labels)} labelled test images; test metrics of this model are optimistic")
        elif self.monitor == "synthetic" and len(val):
            syn_feats = self.extract(self._synthetic(val))
        if not test_mode and len(val):
            what = "L_ST + L_AE + L_STAE" if self.monitor == "loss" else "1 - image AUROC vs synthetic anomalies"
            self.selection_ = f"validation: {what} on {len(val)} normal validation images"
        elif not test_mode:
            self.selection_ = "none: no validation images, the whole epoch budget is trained"
        seconds = {"extract": time.perf_counter() - clock, "teacher": 0.0, "student": 0.0}
        counted = {"teacher": 0, "student": 0}
        pe = self._pe().to(self.device)
        batches = training.Batches(len(feats), self.batch_size, self.seed, drop_last=True)
        pen_batches = (training.Batches(len(pen_feats), self.batch_size, self.seed + 1, drop_last=True)
                       if pen_feats is not None else None)
        epochs_s = self.max_epochs if self.max_epochs is not None else -(-self.max_steps // len(batches))
        epochs_t = self.teacher_epochs
        kw = dict(weight_decay=self.weight_decay, eps=self.adam_eps)
        opts = {"teacher": training.optimizer("adam", teacher.parameters(), self.lr, **kw),  # train_nf_teacher.py l.88
                "student": training.optimizer("adam", itertools.chain(student.parameters(), ae.parameters()),
                                              self.lr, **kw)}  # efficientad.py l.180
        patience = self.early_stopping_patience
        if test_mode and patience is None:
            patience = 10  # efficientad.py l.176
        elif not test_mode and not len(val):
            patience = None  # nothing to stop on: the fixed budget
        run = training.Run(self.name, modules=nets, optimizers=opts, max_epochs=epochs_t + epochs_s,
                           checkpoint=checkpoint, device=self.device, amp=self.amp, settings=self.run_settings(),
                           early_stopping_patience=patience)
        targets = None
        for epoch in run.epochs():
            clock = time.perf_counter()
            phase = "teacher" if epoch < epochs_t else "student"
            first = epoch if phase == "teacher" else epoch - epochs_t
            order = batches.epoch(epoch)
            if self.max_steps is not None:  # a per-phase step budget
                order = order[: max(0, self.max_steps - first * len(batches))]
            if phase == "teacher":
                teacher_epoch(run, teacher, feats, pe, order)
            else:
                if targets is None:  # the frozen teacher's outputs, once (equal to recomputing them per step)
                    targets = self._teacher_outputs(teacher, feats, pe)
                    val_targets = self._teacher_outputs(teacher, val_feats, pe)
                student.train()
                ae.train()
                pen_order = pen_batches.epoch(first) if pen_batches is not None else None
                for j, idx in enumerate(run.each(order)):
                    i = torch.from_numpy(idx).to(feats.device)
                    f = feats[i]
                    p = None
                    if pen_order is not None:
                        if j >= len(pen_order):  # zip(train_loader, penalty_loader) stops at the shorter
                            break
                        p = self._penalty_batch(pen_feats, pen_grey, pen_order[j], first, j)
                    with run.autocast():
                        cond = pe.expand(len(f), -1, -1, -1)
                        inp = torch.cat([cond, f], 1)
                        s, a = student(inp), sequential(ae, inp, train=True)  # Winograd under autograd
                        s_p = student(torch.cat([pe.expand(len(p), -1, -1, -1), p], 1)) if p is not None else None
                        losses = hybrid_losses(targets[i], s.float(), a.float(),
                                               None if s_p is None else s_p.float())
                    run.backward(losses["total"], "student")
                    run.log(**{k: v for k, v in losses.items() if k != "penalty" or p is not None})
                if test_mode:
                    value = self._test_value(run, nets, pe, test)
                elif len(val_feats):
                    value = self._val_value(nets, pe, val_feats, val_targets, syn_feats)
                else:
                    value = None
                if value is not None:
                    run.validate(value)
            seconds[phase] += time.perf_counter() - clock
            counted[phase] += 1
        run.finish()
        for net in nets.values():
            net.eval()
        self.history_ = run.history
        self.best_epoch_ = None if run.best_epoch is None else run.best_epoch - epochs_t
        self.timing_ = {"extract_s": seconds["extract"], "teacher_epochs": counted["teacher"],
                        "teacher_s_per_epoch": seconds["teacher"] / max(1, counted["teacher"]),
                        "student_epochs": counted["student"],
                        "student_s_per_epoch": seconds["student"] / max(1, counted["student"])}
        self.__dict__.pop("_test_selection", None)  # test images are never kept with the model
        return None

    def _penalty_batch(self, colour, grey, idx, epoch: int, j: int) -> torch.Tensor:
        """Penalty features of one batch: per image the grey version with p = 0.3
        (RandomGrayscale), drawn from (seed, epoch, step)."""
        g = np.random.default_rng([self.seed, epoch, j, 3]).random(len(idx)) < 0.3
        i = torch.from_numpy(idx)
        return torch.where(torch.from_numpy(g)[:, None, None, None].to(colour.device), grey[i], colour[i])

    @torch.no_grad()
    def _teacher_outputs(self, teacher, feats, pe):
        teacher.eval()
        out = [teacher(feats[s : s + self.batch_size], pe.expand(len(feats[s : s + self.batch_size]), -1, -1, -1),
                       with_logdet=False)[0] for s in range(0, len(feats), self.batch_size)]
        return torch.cat(out) if out else feats[:0]

    @torch.no_grad()
    def _scores_maps(self, nets, pe, feats) -> tuple[torch.Tensor, torch.Tensor]:
        head = EfficientADASTModule(None, "", nets["teacher"], nets["student"], nets["ae"], pe,
                                    self.preprocessing.size)
        out = [head(feats[s : s + self.batch_size]) for s in range(0, len(feats), self.batch_size)]
        return torch.cat([o[0] for o in out]).cpu(), torch.cat([o[1] for o in out]).cpu()

    @torch.no_grad()
    def _val_value(self, nets, pe, val_feats, val_targets, syn_feats) -> float:
        """The early-stopping quantity on normal validation images (lower is better)."""
        student, ae = nets["student"], nets["ae"]
        student.eval()
        ae.eval()
        try:
            if self.monitor == "loss":
                total = 0.0
                for s in range(0, len(val_feats), self.batch_size):
                    f = val_feats[s : s + self.batch_size]
                    inp = torch.cat([pe.expand(len(f), -1, -1, -1), f], 1)
                    losses = hybrid_losses(val_targets[s : s + self.batch_size], student(inp), ae(inp))
                    total += float(losses["st"] + losses["ae"] + losses["stae"]) * len(f)
                return total / len(val_feats)
            from .. import metrics

            normal, _ = self._scores_maps(nets, pe, val_feats)
            anomalous, _ = self._scores_maps(nets, pe, syn_feats)
            labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
            return 1.0 - metrics.image_auroc(labels, np.r_[normal.numpy(), anomalous.numpy()])
        finally:
            student.train()
            ae.train()

    @torch.no_grad()
    def _test_value(self, run, nets, pe, test) -> float:
        """The thesis's rule (efficientad.py l.239-256) as a value for ``Run.validate``:
        minus the number of epochs so far in which the test image or pixel AUROC
        improved (so an improvement of either resets the patience and keeps the
        weights); the AUROCs are logged in the history."""
        from .. import metrics

        feats, labels, masks = test
        nets["student"].eval()
        nets["ae"].eval()
        scores, maps = self._scores_maps(nets, pe, feats)
        nets["student"].train()
        nets["ae"].train()
        img = metrics.image_auroc(labels, scores.numpy())
        px = metrics.pixel_auroc(list(masks), list(maps.numpy())) if masks is not None else float("nan")
        rows = [r for r in run.history if "test_image_auroc" in r]
        best_img = max([r["test_image_auroc"] for r in rows], default=0.0)
        best_px = max([r["test_pixel_auroc"] for r in rows if r["test_pixel_auroc"] == r["test_pixel_auroc"]],
                      default=0.0)
        improved = img > best_img or (px == px and px > best_px)
        count = -(run.best or 0.0) + (1 if improved else 0)
        run.log(test_image_auroc=img, test_pixel_auroc=px)
        return -count

    def _buffers(self):
        return {"history": getattr(self, "history_", []), "timing": getattr(self, "timing_", {}),
                "selection": getattr(self, "selection_", ""), "best_epoch": getattr(self, "best_epoch_", None),
                "penalty_source": getattr(self, "penalty_source_", "")}

    def _load_buffers(self, state):
        self.history_ = state.get("history", [])
        self.timing_ = state.get("timing", {})
        self.selection_ = state.get("selection", "")
        self.best_epoch_ = state.get("best_epoch")
        self.penalty_source_ = state.get("penalty_source", "")
