"""Supervised defect classification: an ImageNet backbone fine-tuned on labelled
images ``{good, defect types...}`` (the transfer-learning recipe of the MVTec AD
bottle homework studies: a torchvision ResNet's ``fc`` replaced by a layer with
one output per class, ``fc`` or ``fc + layer3 + layer4`` unfrozen, AdamW lr 1e-4 /
weight decay 0.01, batch 8 or 32, with or without augmentation; focal loss,
learning-rate warm-up and early stopping on a validation split).

Labels: class names (``"good"``, ``"broken_large"``...) or indices (0 = good, as
elsewhere in pyad). ``fit`` takes images and ``labels=``; a class-per-folder
folder; an MVTec-layout category folder (its ``test/<class>/`` images are the
labelled set: an MVTec category has defect images only there, so once a
classifier learns from them they are no longer test images — use
``pyad.classification.split`` to hold out a stratified test share, and evaluate
on that share only); or a ``pyad.classification.LabelledSplit`` (its train and
validation parts). The validation share is held out stratified by class; early
stopping watches the validation loss.

Outputs: per-class probabilities (``predict_proba``, ``classes_``) and, like every
pyad detector, an anomaly score, 1 − P(good) (computed as σ(logsumexp of the
defect logits − the good logit), exact in float32 where 1 − P would round to 0),
so thresholds, ``predict``, ``evaluate`` and the CLI work unchanged. The image
threshold is the ``threshold_quantile`` of the scores of the *good* validation
images (as the unsupervised detectors).

Anomaly map: Grad-CAM (Selvaraju et al., ICCV 2017, eqs. 1–2) of the anomaly
log-odds y = log P(defect) − log P(good) on the backbone's last feature map A
[C, h, w]. With the head a linear layer on globally average-pooled A, the
gradient is the same at every position, ∂y/∂A_k(i, j) = a_k / (h·w) with
a = Σ_{c≠good} q_c w_c − w_good and q_c = P(c | defect) (the softmax over the
defect logits), so Grad-CAM = ReLU(Σ_k a_k A_k) / (h·w) exactly: the class
activation map of Zhou et al. (CVPR 2016) for the weight vector a, computed
without autograd (exportable), bilinearly upsampled to the input size.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import images as imgs
from .. import training
from ..ops import upsample
from .base import Validation, _split, register, stage
from .settings import check
from .trained import TrainedDetector

UNFREEZE = ("fc", "fc+layer3+layer4", "all")
_FINAL_TAP = {"resnet": "layer4", "mobilenet": "features.18", "efficientnet": "head"}


def _family_of(backbone: str) -> str:
    from ..backbones import _family

    return _family(backbone)


def trainable_group(family: str, backbone: str, name: str) -> str:
    """"early", "layer3" or "layer4": the stage a backbone parameter or module
    (name relative to the ``Backbone``) belongs to. layer3 / layer4 are the
    stride-16 and stride-32 stages (torchvision's ResNet ``layer3`` / ``layer4``;
    MobileNetV2 ``features.7-13`` / ``features.14-18``; EfficientNet the blocks
    after layer2 up to layer3, then the rest and the head)."""
    if family == "resnet":
        m = re.match(r"body\.(layer[34])(\.|$)", name)
        return m.group(1) if m else "early"
    if family == "mobilenet":
        m = re.match(r"body\.features\.(\d+)(\.|$)", name)
        if not m:
            return "early"
        i = int(m.group(1))
        return "early" if i <= 6 else "layer3" if i <= 13 else "layer4"
    from .. import efficientnet as E

    m = re.search(r"(?:^|\.)_blocks\.(\d+)(\.|$)", name)
    if m:
        i = int(m.group(1))
        return "early" if i <= E.resolve(backbone, "layer2") else "layer3" if i <= E.resolve(backbone, "layer3") else "layer4"
    return "layer4" if re.search(r"(?:^|\.)(_conv_head|_bn1)(\.|$)", name) else "early"


class ClassifierNet(nn.Module):
    """A backbone truncated at its last feature map plus a linear head on the
    globally average-pooled features. ``forward(x) -> (logits [B, K], A [B, C, h, w])``."""

    def __init__(self, backbone, n_classes: int):
        super().__init__()
        self.backbone = backbone
        self.tap = backbone.layer_names[0]
        channels = backbone.shapes(64)[self.tap][0]
        self.fc = nn.Linear(channels, n_classes)

    def stages(self) -> list[tuple[str, nn.Module]]:
        """The backbone in order as (name, module) stages, so a frozen prefix can be
        run (and cached) apart from the trained rest; one stage for EfficientNet."""
        bb = self.backbone
        if bb.family == "resnet":
            return [(f"body.{k}", m) for k, m in bb.body.items()]
        if bb.family == "mobilenet":
            return [(f"body.features.{i}", m) for i, m in enumerate(bb.body["features"])]
        return [("body", bb)]

    def run_stages(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Stages ``start`` to ``stop`` (exclusive; None: to the last feature map)."""
        stages = self.stages()
        stop = len(stages) if stop is None else stop
        if start == 0:
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            x = x.contiguous(memory_format=torch.channels_last)
        for name, m in stages[start:stop]:
            x = m(x)
            if isinstance(x, dict):  # EfficientNet: the backbone itself
                x = x[self.tap]
        return x

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(feats.float().mean((2, 3)))

    def forward(self, x: torch.Tensor):
        feats = self.run_stages(x)
        return self.head(feats), feats


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-class focal loss (Lin et al., ICCV 2017, eq. 5, with a scalar α):
    mean_i α · w_{y_i} · (1 − p_i)^γ · (−log p_i), p_i = softmax(logits_i)[y_i];
    w: optional class weights (1 without)."""
    logp = F.log_softmax(logits.float(), 1).gather(1, target[:, None])[:, 0]
    w = 1.0 if weight is None else weight[target]
    return (alpha * w * (1 - logp.exp()).pow(gamma) * -logp).mean()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i w_{y_i}·(−log p_i) / Σ_i w_{y_i} (torch's weighted mean; the plain mean without weights)."""
    return F.cross_entropy(logits.float(), target, weight=weight)


def balanced_weights(targets: np.ndarray, n_classes: int) -> torch.Tensor:
    """w_c = N / (K · n_c) (scikit-learn's ``class_weight="balanced"``); 0 for a class absent from ``targets``."""
    counts = np.bincount(targets, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, len(targets) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def augment(x: torch.Tensor, gen: torch.Generator, rotation: float = 15.0, scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3),
            jitter: float = 0.2) -> torch.Tensor:
    """Per image, on [B, 3, S, S] in [0, 1]: random resized crop (area share in
    ``scale``, aspect in ``ratio``, back to S×S), rotation (± degrees, black
    corners as torchvision's RandomRotation) and colour jitter (brightness,
    contrast and saturation factors in [1 − jitter, 1 + jitter]), bilinear."""
    b = x.shape[0]
    u = torch.rand(b, 8, generator=gen)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    sw = torch.sqrt(area * torch.exp(logr)).clamp(max=1.0)
    sh = torch.sqrt(area / torch.exp(logr)).clamp(max=1.0)
    cx, cy = (u[:, 2] * 2 - 1) * (1 - sw), (u[:, 3] * 2 - 1) * (1 - sh)
    angle = (u[:, 4] * 2 - 1) * math.radians(rotation)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([sw * cos, -sw * sin, cx], 1), torch.stack([sh * sin, sh * cos, cy], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    f = (1 - jitter + 2 * jitter * u[:, 5:8]).to(x).view(b, 3, 1, 1, 1).unbind(1)
    x = (x * f[0]).clamp(0, 1)  # brightness
    grey = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = ((x - grey.mean((2, 3), keepdim=True)) * f[1] + grey.mean((2, 3), keepdim=True)).clamp(0, 1)  # contrast
    grey = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return ((x - grey) * f[2] + grey).clamp(0, 1)  # saturation


class ClassifierModule(nn.Module):
    """Normalised [B, 3, S, S] -> (1 − P(good) [B], Grad-CAM of the anomaly
    log-odds [B, S, S]); ``proba(x)`` -> P [B, K]."""

    def __init__(self, net: ClassifierNet, good: int, size: int):
        super().__init__()
        self.net, self.good, self.size = net, good, size
        k = net.fc.out_features
        self.register_buffer("others", torch.tensor([i for i in range(k) if i != good], dtype=torch.long))

    def proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x)[0], 1)

    def forward(self, x: torch.Tensor):
        feats = self.net.run_stages(x).float()
        stage("backbone")
        logits = self.net.head(feats)
        good = logits[:, self.good]
        bad = logits.index_select(1, self.others)
        scores = torch.sigmoid(torch.logsumexp(bad, 1) - good)  # 1 − P(good)
        w = self.net.fc.weight
        a = torch.softmax(bad, 1) @ w.index_select(0, self.others) - w[self.good]  # [B, C]
        cam = torch.relu((a[:, :, None, None] * feats).sum(1)) / (feats.shape[2] * feats.shape[3])
        maps = upsample(cam, self.size)
        stage("map")
        return scores, maps


@register("classifier")
class DefectClassifier(TrainedDetector):
    """A fine-tuned ImageNet backbone classifying ``{good, defect types...}``;
    ``networks_["net"]`` after fit (see the module doc).

    backbone: resnet18/34/50, wide_resnet50_2, mobilenet_v2 or an EfficientNet
        (``pyad.backbones.NAMES``); weights: "imagenet", a checkpoint path, or None
        (seeded random init).
    unfreeze: "fc" (the head only), "fc+layer3+layer4" or "all".
    augment: random resized crop, rotation and colour jitter on (True) or off.
    loss: "ce" (cross-entropy) or "focal" (focal_gamma, focal_alpha).
    class_weight: None or "balanced" (w_c = N / (K·n_c), for long-tailed classes).
    weight_decay: AdamW's; warmup_epochs: linear learning-rate warm-up.
    train_bn: BatchNorm of the unfrozen stages in train mode (batch statistics; the
        usual fine-tuning) or, False, kept in eval mode with the checkpoint's running
        statistics (their affine weights still train; a remedy for small batches).
    good_class: the normal class's name (index labels: 0 is good).
    """

    defaults = dict(image_size=224, batch_size=8, max_epochs=100, lr=1e-4, early_stopping_patience=10)
    supervised = True  # fit needs labels (the CLI's fit passes a labelled folder as it is)

    def __init__(self, *, backbone="resnet50", weights="imagenet", unfreeze="fc+layer3+layer4", augment=True,
                 loss="ce", focal_gamma=2.0, focal_alpha=0.25, class_weight=None, weight_decay=0.01,
                 warmup_epochs=0, train_bn=True, good_class="good", **common):
        super().__init__(**common)
        self.backbone = backbone
        self.weights = weights
        self.unfreeze = unfreeze
        self.augment = augment
        self.loss = loss
        self.focal_gamma = focal_gamma
        self.focal_alpha = focal_alpha
        self.class_weight = class_weight
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.train_bn = train_bn
        self.good_class = good_class

    # -- parameters ---------------------------------------------------------------------------------
    def _check_own_params(self):
        from ..backbones import NAMES

        def num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        check(self.backbone in NAMES, "backbone", f"one of {', '.join(NAMES)}", self.backbone)
        check(self.weights is None or isinstance(self.weights, str) or hasattr(self.weights, "__fspath__"),
              "weights", "'imagenet', a checkpoint path or None", self.weights)
        check(self.unfreeze in UNFREEZE, "unfreeze", " or ".join(map(repr, UNFREEZE)), self.unfreeze)
        check(isinstance(self.augment, bool), "augment", "True or False", self.augment)
        check(self.loss in ("ce", "focal"), "loss", "'ce' or 'focal'", self.loss)
        check(num(self.focal_gamma) and self.focal_gamma >= 0, "focal_gamma", "a number >= 0", self.focal_gamma)
        check(num(self.focal_alpha) and self.focal_alpha > 0, "focal_alpha", "a number > 0", self.focal_alpha)
        check(self.class_weight in (None, "balanced"), "class_weight", "None or 'balanced'", self.class_weight)
        check(num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number >= 0", self.weight_decay)
        check(isinstance(self.warmup_epochs, int) and not isinstance(self.warmup_epochs, bool)
              and self.warmup_epochs >= 0, "warmup_epochs", "an int >= 0", self.warmup_epochs)
        check(isinstance(self.train_bn, bool), "train_bn", "True or False", self.train_bn)
        check(isinstance(self.good_class, (str, int)) and not isinstance(self.good_class, bool), "good_class",
              "a class name or index", self.good_class)

    # -- labels ---------------------------------------------------------------------------------------
    def fit(self, train, *, validation=None, labels=None, checkpoint=None) -> "DefectClassifier":
        """Learn from labelled images (module doc): ``train`` with ``labels=``, a
        class-per-folder or MVTec-layout folder, dataset samples (their defect
        type is the label), or a ``pyad.classification.LabelledSplit``.
        ``validation``: a share (stratified), ``(images, labels)``, or normal images."""
        from .. import classification as C

        self._check_params()
        if isinstance(train, C.LabelledSplit):
            if validation is None and len(train.validation):
                validation = (train.validation.items, train.validation.labels)
            train = train.train
        if isinstance(train, C.Labelled):
            train, labels = (train.items, train.labels) if labels is None else (train.items, labels)
        if labels is None:
            train, labels = C.labels_of(_split(train, "train"))
        return super().fit(train, validation=validation, labels=labels, checkpoint=checkpoint)

    def _check_labels(self, labels, n: int) -> np.ndarray:
        if n < 2:
            raise ValueError(f"train: need at least 2 training images, got {n}")
        labels = _as_labels(labels, "labels")
        if len(labels) != n:
            raise ValueError(f"labels: expected one label per training image ({n}), got {len(labels)}")
        good = self._good_label(labels)
        classes = sorted(set(labels.tolist()))
        if len(classes) < 2:
            raise ValueError(f"labels: {type(self).__name__} needs at least two classes (good and a defect type), "
                             f"got only {classes[0]!r}; an MVTec category's train/ holds good images only: use "
                             "pyad.classification.split(dataset) or pass labelled defect images")
        if good not in classes:
            raise ValueError(f"labels: no image of the good class {good!r} (classes: {classes}); the anomaly score "
                             "1 - P(good) needs it (set good_class=...)")
        self._pending = {"classes": classes}
        return labels

    def _good_label(self, labels: np.ndarray):
        if labels.dtype.kind in "iu":
            return 0 if self.good_class == "good" else self.good_class
        return str(self.good_class)

    def _split_validation(self, items: list, validation, labels):
        """Stratified by class: each class gives its share of validation images
        (at least one training image kept per class). Explicit validation:
        ``(images, labels)``, or plain images = normal (good) validation images."""
        from .. import classification as C

        if len(items) < 2:
            raise ValueError(f"train: need at least 2 training images, got {len(items)}")
        self._validation_note = None
        if validation is not None and not isinstance(validation, (int, float)):
            if isinstance(validation, C.Labelled):
                validation = (validation.items, validation.labels)
            if isinstance(validation, tuple) and len(validation) == 2 and _is_label_list(validation[1]):
                val_items = imgs.as_items(_split(validation[0], "train"), "validation")
                val_labels = _as_labels(validation[1], "validation")
                if len(val_labels) != len(val_items):
                    raise ValueError(f"validation: expected one label per validation image ({len(val_items)}), "
                                     f"got {len(val_labels)}")
            else:
                val_items = imgs.as_items(_split(validation, "train"), "validation")
                val_labels = np.array([self._good_label(labels)] * len(val_items), dtype=labels.dtype)
            if val_labels.dtype.kind != labels.dtype.kind:
                raise ValueError("validation: its labels must be of the training labels' kind (names or indices)")
            unknown = sorted(set(val_labels.tolist()) - set(self._pending["classes"]))
            if unknown:
                raise ValueError(f"validation: classes {unknown} do not occur in the training labels")
            self._pending["val_labels"] = val_labels
            return items, val_items, labels
        share = self.validation if validation is None else validation
        check(0 <= share < 1, "validation", "a share in [0, 1) or normal images", share)
        n_val = int(round(len(items) * share))
        if share > 0 and len(items) - n_val < 2:
            raise ValueError(f"train: need at least 2 training images besides the validation share, got {len(items)}")
        keep, held, _ = C.stratified_split(labels, test=0.0, validation=share, seed=self.seed)
        if len(held) == 0:
            self._validation_note = (f"no validation images: {share} of {len(items)} training images rounds to 0, so no "
                                     "threshold was learnt; give more images, validation=<folder of normal images>, "
                                     "or call calibrate(images, labels)")
        self._pending["val_labels"] = labels[held]
        return [items[i] for i in keep], [items[i] for i in held], labels[keep]

    def _fit(self, items, val_items, *, labels=None, checkpoint=None):
        pending = self.__dict__.pop("_pending")
        self.classes_ = pending["classes"]
        self.good_index_ = self.classes_.index(self._good_label(labels))
        index = {c: i for i, c in enumerate(self.classes_)}
        self._targets = (np.array([index[v] for v in labels.tolist()], np.int64),
                         np.array([index[v] for v in pending["val_labels"].tolist()], np.int64))
        try:
            return super()._fit(items, val_items, labels=self._targets[0], checkpoint=checkpoint)
        finally:
            del self._targets

    # -- networks -----------------------------------------------------------------------------------
    def _family(self) -> str:
        return _family_of(self.backbone)

    def _networks(self):
        from ..backbones import Backbone

        loading = getattr(self, "_loading", False)
        bb = Backbone(self.backbone, (_FINAL_TAP[self._family()],), None if loading else self.weights)
        if not loading:
            self.weights_id_, self.weights_source_ = bb.weights_id, bb.weights_source
        return {"net": ClassifierNet(bb, len(self.classes_))}

    def _load_state(self, state):
        self.classes_ = list(state["buffers"]["classes"])
        self._loading = True
        try:
            super()._load_state(state)
        finally:
            del self._loading

    def _module(self, net):
        return ClassifierModule(net, self.good_index_, self.preprocessing.size)

    def _build_module(self):
        return self._module(self.networks_["net"])

    def _buffers(self):
        return {"classes": list(self.classes_), "good_index": self.good_index_, "history": getattr(self, "history_", [])}

    def _load_buffers(self, state):
        self.good_index_ = int(state["good_index"])
        self.history_ = state.get("history", [])

    # -- training -------------------------------------------------------------------------------------
    def _trainable(self, group: str) -> bool:
        return self.unfreeze == "all" or (self.unfreeze == "fc+layer3+layer4" and group in ("layer3", "layer4"))

    def _set_modes(self, net: ClassifierNet) -> None:
        """Train mode (BatchNorm batch statistics, running averages updated) for the
        trained stages only; frozen stages stay in eval mode with ImageNet statistics."""
        net.eval()
        net.fc.train()
        for name, m in net.backbone.named_modules():
            if name and self._trainable(trainable_group(net.backbone.family, self.backbone, name)):
                m.train()
        if not self.train_bn:
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def _criterion(self, weight):
        if self.loss == "focal":
            return lambda logits, t: focal_loss(logits, t, self.focal_gamma, self.focal_alpha, weight)
        return lambda logits, t: cross_entropy(logits, t, weight)

    def _train(self, nets, train, val, *, labels=None, checkpoint=None):
        net: ClassifierNet = nets["net"]
        y_train, y_val = (torch.from_numpy(t) for t in self._targets)
        fam = net.backbone.family
        for name, p in net.backbone.named_parameters():
            p.requires_grad_(self._trainable(trainable_group(fam, self.backbone, name)))
        params = [p for p in net.parameters() if p.requires_grad]
        opt = training.optimizer("adamw", params, self.lr, weight_decay=self.weight_decay)
        warm = training.scheduler("warmup", opt, warmup=self.warmup_epochs) if self.warmup_epochs else None
        run = training.Run(self.name, modules=nets, optimizers={"adamw": opt}, schedulers={"warmup": warm},
                           max_epochs=self.max_epochs, max_steps=self.max_steps, checkpoint=checkpoint,
                           device=self.device, amp=self.amp,
                           early_stopping_patience=self.early_stopping_patience if len(val) else None,
                           settings=self.run_settings())
        weight = balanced_weights(self._targets[0], len(self.classes_)).to(self.device) if self.class_weight else None
        criterion = self._criterion(weight)
        # the frozen stages before the first trained one: run once and cached when the
        # inputs do not change between epochs (no augmentation)
        stages = net.stages()
        first = next((i for i, (n, m) in enumerate(stages) if any(p.requires_grad for p in m.parameters())),
                     len(stages))
        cache = None
        if not self.augment and first > 0:
            cache = self._prefix(net, train, first)
        batches = training.Batches(len(train), self.batch_size, self.seed)
        for epoch in run.epochs():
            self._set_modes(net)
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            for idx in run.each(batches.epoch(epoch)):
                if len(idx) == 1 and self.batch_size > 1:
                    continue  # a trailing batch of one image (BatchNorm batch statistics need more)
                t = torch.from_numpy(idx)
                with run.autocast():
                    if cache is not None:
                        feats = net.run_stages(cache[t].to(self.device), first)
                    else:
                        x = self._train_input(train[t], gen)
                        with torch.no_grad():
                            h = net.run_stages(x, 0, first)
                        feats = net.run_stages(h, first)
                    logits = net.head(feats)
                loss = criterion(logits, y_train[t].to(self.device))
                run.backward(loss)
                run.log(loss=loss)
            if len(val):
                val_loss, acc = self._validate(net, val, y_val, criterion)
                stop = run.validate(val_loss)
                run.history[-1]["val_accuracy"] = acc
                if stop:
                    break
        run.finish()
        self.history_ = run.history
        if len(val):
            self._scored_validation(net, val, y_val)
        return self._normal_validation(net, val, y_val)

    @torch.no_grad()
    def _prefix(self, net, images, first) -> torch.Tensor:
        net.eval()
        out = [net.run_stages(self.to_input(images[s : s + self.batch_size]), 0, first).cpu()
               for s in range(0, len(images), self.batch_size)]
        return torch.cat(out)

    def _train_input(self, u8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if not self.augment:
            return self.to_input(u8)
        x = augment(u8.permute(0, 3, 1, 2).float().div(255), gen).to(self.device)
        pre = self.preprocessing
        return ((x - pre.mean.to(x.device)) / pre.std.to(x.device)).contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def _validate(self, net, val, y_val, criterion) -> tuple[float, float]:
        """Loss (the training criterion) and accuracy on the labelled validation images."""
        net.eval()
        logits = torch.cat([net(self.to_input(val[s : s + self.batch_size]))[0].float()
                            for s in range(0, len(val), self.batch_size)])
        y_val = y_val.to(logits.device)
        return float(criterion(logits, y_val)), float((logits.argmax(1) == y_val).float().mean())

    @torch.no_grad()
    def _normal_validation(self, net, val, y_val) -> Validation:
        """Scores and maps of the good validation images (the image / pixel thresholds)."""
        good = val[(y_val == self.good_index_).numpy()] if len(val) else val
        if len(good) == 0:
            return Validation(np.zeros(0, np.float32), np.zeros((0, self.preprocessing.size, self.preprocessing.size),
                                                                np.float32))
        module = self._module(net).eval()
        scores, maps = [], []
        for s in range(0, len(good), self.batch_size):
            a, b = module(self.to_input(good[s : s + self.batch_size]))
            scores.append(a.float().cpu())
            maps.append(b.float().cpu())
        return Validation(torch.cat(scores).numpy(), torch.cat(maps).numpy())

    @torch.no_grad()
    def _scored_validation(self, net, val, y_val) -> None:
        """Scores of every labelled validation image, for the F1-optimal threshold."""
        module = self._module(net).eval()
        scores = [module(self.to_input(val[s : s + self.batch_size]))[0].float().cpu()
                  for s in range(0, len(val), self.batch_size)]
        self._val_scored = (torch.cat(scores).numpy(), (y_val != self.good_index_).numpy())

    def _learn_thresholds(self, val, n_train):
        """The pixel threshold (and, without defect images to validate on, the image
        threshold) from the good validation images, as every detector; with good
        and defect validation images the image threshold is the F1-optimal one on
        them (midway between the two scores where it changes)."""
        from ..metrics import f1_max

        super()._learn_thresholds(val, n_train)
        scored = self.__dict__.pop("_val_scored", None)
        if scored is None:
            return
        scores, bad = scored
        if bad.any() and (~bad).any():
            f1, self.threshold_ = f1_max(bad, scores)
            self.threshold_rule_ = (f"F1-optimal on the scores of {len(scores)} labelled validation images "
                                    f"({int((~bad).sum())} good, {int(bad.sum())} defect; held out from {n_train} "
                                    f"training images, seed {self.seed}; validation F1 {f1:.4f}); pixel threshold: "
                                    f"quantile {self.threshold_quantile} of the good validation images' map maxima")

    # -- class outputs -------------------------------------------------------------------------------
    def predict_proba(self, images, *, channel_order: str = "rgb") -> np.ndarray:
        """Class probabilities [N, K] float32, columns in ``classes_`` order."""
        module = self.inference_module()
        pre = self.preprocessing
        items = imgs.as_items(_split(images, "test"), "images")
        out = []
        for batch in imgs.load_batches(items, self.batch_size, pre, channel_order=channel_order):
            x = pre.to_tensor([b.pixels for b in batch]).to(self.device)
            with torch.inference_mode():
                out.append(module.proba(x).float().cpu().numpy())
        return np.concatenate(out)

    def predict_classes(self, images, *, channel_order: str = "rgb") -> list:
        """The most probable class of each image (names or indices, as trained)."""
        proba = self.predict_proba(images, channel_order=channel_order)
        return [self.classes_[i] for i in proba.argmax(1)]

    def evaluation_extras(self, ds, pred, out) -> dict:
        """``pyad.evaluate`` hook: accuracy, per-class precision / recall / F1 and the
        confusion matrix on the dataset's test images (their defect type is the true
        class), and the confusion-matrix picture in ``out``."""
        from .. import classification as C

        report = C.evaluate(self, ds.test, [s.defect for s in ds.test])
        if out is not None:
            report.save(out)
        return report.to_dict()


def _as_labels(labels, what: str) -> np.ndarray:
    """Class names (str) or indices (int) as a 1-d array; anything else is refused."""
    if isinstance(labels, torch.Tensor):
        labels = labels.cpu().numpy()
    try:
        arr = np.asarray(labels)
    except Exception:  # noqa: BLE001 - a ragged or odd object
        raise ValueError(f"{what}: expected a list of class names or indices") from None
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected one class name or index per image, got an array of shape {arr.shape}")
    if arr.dtype.kind == "b":
        arr = arr.astype(np.int64)
    if arr.dtype.kind in "iu":
        if len(arr) and arr.min() < 0:
            raise ValueError(f"{what}: class indices must be >= 0, got {int(arr.min())}")
        return arr.astype(np.int64)
    if arr.dtype.kind == "U":
        return arr
    if arr.dtype.kind == "O" and all(isinstance(v, str) for v in arr.tolist()):
        return arr.astype(str)
    raise ValueError(f"{what}: expected class names (str) or indices (int), got {arr.dtype} values")


def _is_label_list(x) -> bool:
    """A 1-d sequence of class names or indices (not an image, not a path)."""
    if isinstance(x, (str, bytes)) or hasattr(x, "__fspath__"):
        return False
    try:
        arr = np.asarray(x)
    except Exception:  # noqa: BLE001
        return False
    return arr.ndim == 1 and arr.dtype.kind in "iuUOb"
