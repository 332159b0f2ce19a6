"""The contract every pyad detector follows, frozen-feature and trained alike.

- ``__init__`` only stores keyword parameters (shared groups from ``settings`` plus
  the detector's own); ``get_params`` / ``set_params`` round-trip them; learned
  state ends in an underscore (``memory_bank_``, ``threshold_``).
- ``fit(train, *, validation=None, labels=None)`` learns and returns ``self``. A
  seeded share of the training images (``validation``, default 10%) is held out as
  *normal validation images*: the image threshold (``threshold_``) and the pixel
  threshold (``pixel_threshold_``) are quantiles of their scores and map maxima, and
  trained detectors early-stop and normalise on them. Test images are never read.
- ``inference_module()`` is the one inference path: a torch ``nn.Module`` mapping a
  preprocessed batch [B, 3, S, S] float32 to (scores [B], maps [B, S, S]).
  ``predict``, ``evaluate``, the CLI and exported models all run it; pre-processing
  (``pyad.images.Preprocess``) and restoring each map to its image's size are shared.
- ``predict(images)`` -> ``Prediction`` (scores higher = more anomalous, maps at each
  image's resolution, labels, masks); ``predict_iter`` streams the same per image.
- ``save(path)`` / ``pyad.load(path)``: one file (``pyad.modelfile``, no pickle) with
  the parameters, the learned state and every network's weights.
- A fitted or loaded detector may be shared by many threads; detectors pickle and
  deep-copy (for DataLoader workers, joblib and Ray).

A new detector is one file: a subclass registered under a stable lower-case name
that implements ``_fit``, ``_build_module``, ``_state`` and ``_load_state``.
"""

from __future__ import annotations

import inspect
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import numpy as np
import torch
from torch import nn

from .. import _progress
from .. import images as imgs
from .. import modelfile
from .._version import __version__
from .settings import BackboneSettings, Preprocessing, Runtime, Thresholds, check

REGISTRY: dict[str, type["Detector"]] = {}


def register(name: str):
    """Class decorator: register a detector under a stable lower-case ``name``
    (saved in model files, used by the CLI)."""

    def deco(cls):
        if name in REGISTRY:
            raise ValueError(f"detector name {name!r} is already registered by {REGISTRY[name].__name__}")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return deco


class NotFittedError(ValueError):
    """predict/save before fit."""


@dataclass(frozen=True)
class Prediction:
    """scores [N] float32 (higher = more anomalous); maps [N, H, W] float32 at each
    image's resolution (a list when sizes differ; S×S with ``maps="low"``; None with
    ``maps="none"``); labels [N] bool once a threshold exists (``score > threshold_``);
    paths of file inputs; skipped: (path, reason) of unreadable files with
    ``on_error="skip"`` (those have no row)."""

    scores: np.ndarray
    maps: np.ndarray | list | None
    labels: np.ndarray | None = None
    pixel_threshold: float | None = None
    paths: list | None = None
    skipped: list = field(default_factory=list)

    def masks(self) -> list[np.ndarray] | None:
        """Binary defect masks, consistent with the labels: empty for an image labelled
        normal; for one labelled anomalous the pixels above the pixel threshold, and at
        least the map's peak (for detectors whose image score is not the map maximum)."""
        if self.maps is None or self.labels is None or self.pixel_threshold is None:
            return None
        return [mask_of(m, bool(lab), self.pixel_threshold) for m, lab in zip(self.maps, self.labels)]


def mask_of(amap: np.ndarray, label: bool, pixel_threshold: float) -> np.ndarray:
    """The mask rule of ``Prediction.masks`` for one map."""
    if not label:
        return np.zeros(amap.shape, bool)
    mask = amap > pixel_threshold
    return mask if mask.any() else amap >= amap.max()


@dataclass
class Validation:
    """Scores [n] and maps [n, S, S] (network resolution) of the normal validation
    images, scored by a model that did not learn from them."""

    scores: np.ndarray
    maps: np.ndarray


@dataclass
class Scored:
    """One image of ``predict_iter``: its position in the input, path (files), score,
    label, map (per ``maps=``) or the reason it was skipped."""

    index: int
    path: str | None
    score: float | None = None
    label: bool | None = None
    map: np.ndarray | None = None
    error: str | None = None


class Detector:
    """Shared plumbing of every detector (see the module docstring)."""

    name: ClassVar[str] = ""
    schema: ClassVar[int] = 1  # version of this detector's saved state; bump on change
    groups: ClassVar[tuple] = (Preprocessing, Runtime, Thresholds)
    defaults: ClassVar[dict] = {}  # this detector's defaults for group parameters
    # parameters that may change on a fitted detector (they do not touch learned state)
    runtime_params: ClassVar[frozenset] = frozenset({"device", "batch_size", "precision"})
    # precision="bfloat16" on the CPU: a bfloat16 copy of the backbone (frozen-feature family), or
    # of the networks (EfficientAD)
    cpu_bfloat16: ClassVar[bool] = False
    _signature: ClassVar[inspect.Signature]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = []
        for klass in reversed(cls.__mro__):
            init = klass.__dict__.get("__init__")
            if init is None or klass is Detector:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.kind == p.KEYWORD_ONLY and p.name not in [q.name for q in own]:
                    own.append(p)
        common = []
        for group in cls.groups:
            for f in group.__dataclass_fields__.values():
                default = cls.defaults.get(f.name, f.default)
                common.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default))
        cls._signature = inspect.Signature(own + common)
        cls.__signature__ = cls._signature

    def __init__(self, **common):
        for group in self.groups:
            for f in group.__dataclass_fields__.values():
                value = common.pop(f.name, self.defaults.get(f.name, f.default))
                setattr(self, f.name, tuple(value) if isinstance(value, list) else value)
        if common:
            raise TypeError(f"{type(self).__name__}() got unexpected parameters {sorted(common)}; "
                            f"its parameters are: {', '.join(self._param_names())}")
        self._lock = threading.RLock()
        self._cache: dict = {}

    # -- parameters ---------------------------------------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        return list(cls._signature.parameters)

    def get_params(self, deep: bool = False) -> dict:
        return {p: getattr(self, p) for p in self._param_names()}

    def set_params(self, **params) -> "Detector":
        """Change parameters. On a fitted detector only ``runtime_params`` (device,
        batch size) may change: any other would leave the learned state stale —
        clone it (``pyad.clone(det, **changes)``) and fit again."""
        names = self._param_names()
        for k in params:
            if k not in names:
                raise ValueError(f"{k}: not a parameter of {type(self).__name__} (parameters: {', '.join(names)})")
        if self.is_fitted():
            frozen = [k for k, v in params.items() if k not in self.runtime_params and v != getattr(self, k)]
            if frozen:
                raise ValueError(f"{frozen[0]}: cannot change on a fitted {type(self).__name__} (it shapes the learned "
                                 f"model); use pyad.clone(detector, {frozen[0]}=...) and fit again")
        for k, v in params.items():
            setattr(self, k, tuple(v) if isinstance(v, list) else v)
        with self._lock:
            self._cache.clear()  # networks and modules are rebuilt from the new parameters
        return self

    def __repr__(self) -> str:
        changed = [f"{k}={v!r}" for k, v in self.get_params().items() if v != self._signature.parameters[k].default]
        return f"{type(self).__name__}({', '.join(changed)})"

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state["_cache"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def _check_params(self) -> None:
        for group in self.groups:
            group.of(self).check()
        if getattr(self, "precision", "float32") == "bfloat16" and not str(self.device).startswith("cuda"):
            if not self.cpu_bfloat16:
                raise ValueError(f"precision: 'bfloat16' on the CPU reduces the frozen-feature detectors' backbone "
                                 f"(PatchCore, PaDiM, SPADE) and EfficientAD's networks; {type(self).__name__} "
                                 "runs it on CUDA only "
                                 "(device='cuda'), or use det.quantize(calibration_images) for int8")
            from ..backbones import cpu_has_bfloat16

            if not cpu_has_bfloat16():
                warnings.warn("precision='bfloat16': this CPU has no native bfloat16 convolutions, so the backbone "
                              "runs several times slower than in float32 (same accuracy); use 'float32' here",
                              RuntimeWarning, stacklevel=3)
        self._check_own_params()

    def is_fitted(self) -> bool:
        return hasattr(self, "n_train_")

    def _fitted(self) -> None:
        if not self.is_fitted():
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit(train) or pyad.load(path) first")

    @property
    def preprocessing(self) -> imgs.Preprocess:
        """The shared pre-processing of this detector's inputs."""
        mean, std = self._normalisation()
        return imgs.Preprocess(self.image_size, self.crop_size, mean=mean, std=std)

    def _normalisation(self) -> tuple[tuple, tuple]:
        """Input mean/std: what the backbone's weights expect (ImageNet's, or e.g. the
        EfficientNet-Lite checkpoints' own), unless the method says otherwise."""
        from ..backbones import IMAGENET_MEAN, IMAGENET_STD, NAMES, normalisation

        backbone = getattr(self, "backbone", None)
        return normalisation(backbone) if backbone in NAMES else (IMAGENET_MEAN, IMAGENET_STD)

    # -- fit ------------------------------------------------------------------------------------------
    def fit(self, train, *, validation=None, labels=None, checkpoint=None) -> "Detector":
        """Learn from ``train`` (a folder, image paths, arrays, or a pyad dataset's
        training images) and return ``self``.

        validation: None (hold out the ``validation`` share of ``train``), a share, or
            normal images (then every training image is learnt from).
        labels: per-image labels for supervised detectors; the unsupervised ones learn
            from normal images only and refuse anomalous labels.
        checkpoint: trained detectors write resumable checkpoints there (an
            interrupted fit started again with the same path continues).
        """
        started = time.perf_counter()
        self._check_params()
        items = imgs.as_items(_split(train, "train"), "train")
        if labels is not None:
            labels = self._check_labels(labels, len(items))
        fit_items, val_items, fit_labels = self._split_validation(items, validation, labels)
        for attr in [k for k in self.__dict__ if k.endswith("_") and not k.startswith("_")]:
            delattr(self, attr)  # a refit starts from nothing
        with self._lock:
            self._cache.clear()
        self.threshold_ = self.pixel_threshold_ = None
        val = self._fit(fit_items, val_items, labels=fit_labels, checkpoint=checkpoint)
        self.n_train_ = len(items)
        if val is None and val_items:
            val = self._score_validation(val_items)
        self._learn_thresholds(val, len(items))
        self.fit_seconds_ = time.perf_counter() - started  # training time, kept in saved models
        return self

    def _check_labels(self, labels, n: int) -> np.ndarray:
        labels = np.asarray(labels)
        if len(labels) != n:
            raise ValueError(f"labels: expected one label per training image ({n}), got {len(labels)}")
        if labels.dtype.kind in "iub" and labels.astype(int).max(initial=0) > 0:
            raise ValueError(f"labels: {type(self).__name__} learns from normal images only, but "
                             f"{int((labels != 0).sum())} training images are labelled anomalous")
        return labels

    def _split_validation(self, items: list, validation, labels):
        """(fit items, validation items, fit labels): a seeded share of ``items``, or
        explicit validation images."""
        if len(items) < 2:
            raise ValueError(f"train: need at least 2 training images, got {len(items)}")
        if validation is not None and not isinstance(validation, (int, float)):
            val_items = imgs.as_items(_split(validation, "train"), "validation")
            return items, val_items, labels
        share = self.validation if validation is None else validation
        check(0 <= share < 1, "validation", "a share in [0, 1) or normal images", share)
        n_val = int(round(len(items) * share))
        if share > 0 and len(items) - n_val < 2:
            raise ValueError(f"train: need at least 2 training images besides the validation share, got {len(items)}")
        self._validation_note = None
        if n_val == 0:
            self._validation_note = (f"no validation images: {share} of {len(items)} training images rounds to 0, so no "
                                     "threshold was learnt; give more images, validation=<folder of normal images>, "
                                     "or call calibrate(images, labels)")
            return items, [], labels
        rng = np.random.default_rng(self.seed)
        held = np.zeros(len(items), bool)
        held[rng.choice(len(items), n_val, replace=False)] = True
        keep = [it for it, h in zip(items, held) if not h]
        val = [it for it, h in zip(items, held) if h]
        return keep, val, None if labels is None else labels[~held]

    def _score_validation(self, items: list) -> Validation:
        """Scores and network-resolution maps of validation images through the module."""
        scores, maps = [], []
        for s in self.predict_iter(items, maps="low", progress=False):
            scores.append(s.score)
            maps.append(s.map)
        return Validation(np.asarray(scores, np.float32), np.stack(maps))

    def _learn_thresholds(self, val: Validation | None, n_train: int) -> None:
        q = self.threshold_quantile
        self.threshold_ = self.pixel_threshold_ = self.map_range_ = None
        if val is None or len(val.scores) == 0:
            self.threshold_rule_ = getattr(self, "_validation_note", None) or "none: no validation images"
            return
        n = len(val.scores)
        self.threshold_ = float(np.quantile(val.scores, q, method="higher"))
        maxima = val.maps.reshape(n, -1).max(1)
        self.pixel_threshold_ = float(np.quantile(maxima, q, method="higher"))
        low = float(np.median(val.maps))
        high = low + 2 * (self.pixel_threshold_ - low) if self.pixel_threshold_ > low else float(val.maps.max())
        self.map_range_ = (low, high if high > low else low + 1.0)  # pixel threshold at mid-scale
        self.threshold_rule_ = (f"quantile {q} of the scores of {n} normal validation images (held out from "
                                f"{n_train} training images, seed {self.seed}); pixel threshold: the same quantile "
                                f"of their map maxima")

    def calibrate(self, images, labels=None, masks=None) -> "Detector":
        """Set the F1-optimal image threshold from labelled images (labels: 1 =
        anomalous), and the F1-optimal pixel threshold when masks are given (a pyad
        dataset brings its own test labels and masks)."""
        from ..datasets import Dataset
        from ..metrics import f1_max

        self._fitted()
        if isinstance(images, Dataset):
            ds = images
            labels = [s.label for s in ds.test] if labels is None else labels
            images = ds.test
            if masks is None and ds.has_masks:
                masks = "dataset"
        pred = self.predict(images)
        if labels is None or len(labels) != len(pred.scores):
            raise ValueError(f"labels: expected one label per image ({len(pred.scores)})")
        f1, self.threshold_ = f1_max(labels, pred.scores)
        self.threshold_rule_ = f"F1-optimal on {len(pred.scores)} labelled images (F1 = {f1:.4f})"
        if masks is not None:
            maps = list(pred.maps)
            if isinstance(masks, str):
                masks = [s.mask(m.shape) for s, m in zip(images, maps)]
            pixels = np.concatenate([m.ravel() for m in maps])
            truth = np.concatenate([np.asarray(k, bool).ravel() for k in masks])
            pf1, self.pixel_threshold_ = f1_max(truth, pixels)
            self.threshold_rule_ += f"; pixel threshold F1-optimal on their masks (F1 = {pf1:.4f})"
        return self

    # -- inference ------------------------------------------------------------------------------------------
    def inference_module(self) -> nn.Module:
        """The exportable inference path (built once from the fitted state, thread-safe):
        ``module(x [B, 3, S, S] float32) -> (scores [B], maps [B, S, S])``."""
        self._fitted()
        module = self._cache.get("module")
        if module is None:
            with self._lock:
                module = self._cache.get("module")
                if module is None:
                    module = self._build_module().to(self.device).eval()
                    for p in module.parameters():
                        p.requires_grad_(False)
                    self._cache["module"] = module
        return module

    def predict(self, images, *, maps: str = "full", on_error: str = "raise", channel_order: str = "rgb",
                stage_times: dict | None = None) -> Prediction:
        """Scores, maps and labels of ``images`` (see ``Prediction``).

        maps: "full" (each image's resolution), "low" (the S×S network resolution) or
            "none". Memory: "full" keeps N·H·W floats; use ``predict_iter`` to stream.
        on_error: "raise", or "skip" unreadable files (reported in ``skipped``).
        channel_order: "rgb", or "bgr" for arrays from OpenCV (files are always RGB).
        stage_times: a dict that receives seconds per stage (preprocess, backbone, ...).
        """
        items = imgs.as_items(_split(images, "test"), "images")
        scores, paths, skipped = [], [], []
        collected = _Maps(len(items))
        for s in self.predict_iter(items, maps=maps, on_error=on_error, channel_order=channel_order,
                                   stage_times=stage_times):
            if s.error:
                skipped.append((s.path, s.error))
                continue
            scores.append(s.score)
            paths.append(s.path)
            if maps != "none":
                collected.add(s.map)
        scores = np.array(scores, np.float32)
        labels = None if self.threshold_ is None else scores > self.threshold_
        out_maps = collected.result() if maps != "none" else None
        paths = paths if paths and paths[0] is not None else None
        return Prediction(scores, out_maps, labels, self.pixel_threshold_, paths, skipped)

    def predict_iter(self, images, *, maps: str = "full", on_error: str = "raise", channel_order: str = "rgb",
                     stage_times: dict | None = None, progress: bool = True) -> Iterator[Scored]:
        """``predict`` one image at a time, in input order, as each batch finishes
        (bounded memory: one batch of maps at a time)."""
        self._fitted()
        check(maps in ("full", "low", "none"), "maps", "'full', 'low' or 'none'", maps)
        check(on_error in ("raise", "skip"), "on_error", "'raise' or 'skip'", on_error)
        check(channel_order in ("rgb", "bgr"), "channel_order", "'rgb' or 'bgr'", channel_order)
        module = self.inference_module()
        pre = self.preprocessing
        items = imgs.as_items(_split(images, "test"), "images")
        bar = _progress.bar(total=len(items), desc=f"{type(self).__name__}: predicting", unit="img",
                            disable=(not progress) or len(items) <= self.batch_size or None)
        clock = _Clock(stage_times, self.device) if stage_times is not None else None
        index = 0
        for batch in imgs.load_batches(items, self.batch_size, pre, on_error=on_error, channel_order=channel_order):
            good = [b for b in batch if b.error is None]
            for b in batch:
                if b.error is not None:
                    yield Scored(b.index, b.path, error=b.error)
            if good:
                if clock:
                    clock.lap("read")
                x = pre.to_tensor([b.pixels for b in good]).to(self.device)
                if clock:
                    clock.lap("preprocess")
                with torch.inference_mode(), _timing(clock), _autocast(self):
                    scores, low = module(x)
                scores = scores.float().cpu().numpy()
                low = low.float().cpu().numpy() if maps != "none" else None
                if clock:
                    clock.lap("map")
                for i, b in enumerate(good):
                    amap = None
                    if maps == "low":
                        amap = low[i]
                    elif maps == "full":
                        amap = pre.restore(low[i], b.shape)
                    label = None if self.threshold_ is None else bool(scores[i] > self.threshold_)
                    yield Scored(b.index, b.path, float(scores[i]), label, amap)
                if clock:
                    clock.lap("map")
            index += len(batch)
            bar.update(len(batch))
        bar.close()

    # -- persistence ----------------------------------------------------------------------------------------
    def save(self, path, *, include_weights: bool = False) -> None:
        """One model file (zip of JSON + .npy, SHA-256, atomic write; no pickle) with the
        parameters, thresholds, learned state and every trained network's weights.
        ``include_weights``: also embed the frozen backbone's weights, so the file needs
        nothing else at load time."""
        self._fitted()
        meta = {
            "pyad_version": __version__,
            "detector": self.name,
            "schema": self.schema,
            "params": {k: _jsonable(v) for k, v in self.get_params().items()},
            "fitted": {k: _jsonable(getattr(self, k, None)) for k in _FITTED},
        }
        state = self._state()
        if include_weights:
            state = {**state, "_backbone_weights": self._backbone_state()}
        modelfile.write_tree(path, meta, state)

    # -- deployment (pyad.export) ---------------------------------------------------------------------------
    def export(self, path) -> "os.PathLike":
        """Export the inference module; the format comes from the suffix (``.onnx``:
        ONNX with thresholds and preprocessing in its metadata, ``pyad.export``)."""
        from .. import export

        return export.export(self, path)

    def quantize(self, calibration_images, **options) -> "Detector":
        """Static int8 post-training quantisation calibrated on ``calibration_images``
        (normal training images): an ONNX Runtime detector (``pyad.export.quantize``)."""
        from .. import export

        return export.quantize(self, calibration_images, **options)

    @classmethod
    def _from_file(cls, meta: dict, state: dict, weights=None) -> "Detector":
        params = dict(meta["params"])
        unknown = set(params) - set(cls._param_names())
        if unknown:
            raise ValueError(f"path: the model has parameters this pyad does not know ({', '.join(sorted(unknown))}); "
                             f"it was written by pyad {meta.get('pyad_version')}; upgrade pyad to load it")
        det = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})
        for k, v in meta["fitted"].items():
            setattr(det, k, tuple(v) if isinstance(v, list) and k == "map_range_" else v)
        embedded = state.pop("_backbone_weights", None)
        det._load_state(state)
        det._resolve_weights_at_load(weights, embedded)
        return det

    # -- backbone hooks (frozen-feature and fine-tuned detectors) -----------------------------------------
    def _backbone_state(self) -> dict:
        raise ValueError(f"include_weights: {type(self).__name__} has no frozen backbone to embed "
                         "(its networks are always saved)")

    def _resolve_weights_at_load(self, weights, embedded) -> None:
        if weights is not None:
            raise ValueError(f"weights: {type(self).__name__} has no backbone weights to resolve")

    # -- subclass contract ----------------------------------------------------------------------------------
    def _check_own_params(self) -> None: ...

    def _fit(self, items: list, val_items: list, *, labels=None, checkpoint=None) -> Validation | None:
        """Learn from ``items``; may return the validation images' scores and maps
        (e.g. from a model that did not see them), else the base scores
        ``val_items`` with the final inference module."""
        raise NotImplementedError

    def _build_module(self) -> nn.Module:
        raise NotImplementedError

    def _state(self) -> dict:
        """The learned state: a nested dict of JSON values, arrays and tensors."""
        raise NotImplementedError

    def _load_state(self, state: dict) -> None:
        raise NotImplementedError


_FITTED = ("n_train_", "fit_seconds_", "threshold_", "threshold_rule_", "pixel_threshold_", "map_range_",
           "weights_id_", "weights_source_")


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _split(source, which: str):
    """A pyad dataset stands for its training images in fit, its test images in predict."""
    from ..datasets import Dataset

    if isinstance(source, Dataset):
        samples = getattr(source, which)
        if not samples:
            raise ValueError(f"images: dataset {source.name!r} has no {which} images")
        return samples
    return source


class _Clock:
    """Accumulates perf_counter laps into a dict of stage -> seconds (synchronising
    CUDA first, so a stage's time is its own)."""

    def __init__(self, into: dict, device: str = "cpu"):
        self.into = into
        self.cuda = str(device).startswith("cuda")
        self.t = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        self.into[stage] = self.into.get(stage, 0.0) + t - self.t
        self.t = t


_CLOCK = threading.local()


def _autocast(det: Detector):
    """CUDA autocast for ``precision="float16"`` / ``"bfloat16"`` (ops keep distances
    and maps in float32); on the CPU, ``"bfloat16"`` for the backbone only
    (``backbones.cpu_autocast``); nothing for float32."""
    import contextlib

    precision = getattr(det, "precision", "float32")
    if precision == "float32":
        return contextlib.nullcontext()
    from .settings import check_precision

    check_precision(precision, det.device)
    if not str(det.device).startswith("cuda"):
        from ..backbones import cpu_autocast

        return cpu_autocast(torch.bfloat16)
    return torch.autocast(device_type="cuda", dtype=torch.float16 if precision == "float16" else torch.bfloat16)


class _timing:
    """Makes ``stage(name)`` calls inside an inference module lap ``clock``."""

    def __init__(self, clock: _Clock | None):
        self.clock = clock

    def __enter__(self):
        self.prev = getattr(_CLOCK, "clock", None)
        _CLOCK.clock = self.clock

    def __exit__(self, *exc):
        _CLOCK.clock = self.prev


class _Maps:
    """``predict``'s maps: written into one [N, H, W] block, allocated at the first
    map, while their shapes agree (then a list). Stacking a list at the end held
    every map twice, and the per-map blocks left the heap fragmented: PaDiM R18 on
    the 83 bottle test images (0.27 GB of maps) peaked at 1.04 GB, now 0.8 GB."""

    def __init__(self, n: int):
        self.n, self.count = n, 0
        self.block: np.ndarray | None = None
        self.listed: list | None = None

    def add(self, m: np.ndarray) -> None:
        if self.block is None and self.listed is None:
            self.block = np.empty((self.n, *m.shape), m.dtype)
        if self.listed is None and m.shape == self.block.shape[1:]:
            self.block[self.count] = m
        else:
            if self.listed is None:
                self.listed, self.block = [b.copy() for b in self.block[: self.count]], None
            self.listed.append(m)
        self.count += 1

    def result(self):
        if self.listed is not None:
            return self.listed
        return [] if self.block is None else self.block[: self.count]


def stage(name: str) -> None:
    """Mark the end of stage ``name`` inside an inference module's forward (per-stage
    latency; a no-op unless ``predict(stage_times=...)`` is timing, and when exporting)."""
    clock = getattr(_CLOCK, "clock", None)
    if clock is not None and not torch.compiler.is_compiling():
        clock.lap(name)


def clone(detector: Detector, **changes) -> Detector:
    """An unfitted detector with ``detector``'s parameters, updated by ``changes``."""
    return type(detector)(**{**detector.get_params(), **changes})


def load(path, *, weights=None, provider: str | None = None) -> Detector:
    """A detector saved with ``save``; checks format, checksum, version and that the
    backbone weights it needs are found (``weights``: a checkpoint path to use
    instead of the recorded one). A ``.onnx`` file (``det.export``) loads as a
    ``pyad.export.OnnxDetector`` run by ONNX Runtime (``provider``: "cpu", "cuda")."""
    if str(path).lower().endswith(".onnx"):
        from .. import export

        if weights is not None:
            raise ValueError("weights: an ONNX model holds its weights; pass no weights")
        return export.load(path, provider=provider or "cpu")
    if provider is not None:
        raise ValueError(f"provider: applies to .onnx models only, not {path}")
    meta, state = modelfile.read_tree(path)
    _check_version(meta, path)
    name = meta.get("detector")
    if name not in REGISTRY:
        raise ValueError(f"path: {path} holds a {name!r} detector, which this pyad does not know "
                         f"(known: {', '.join(sorted(REGISTRY))})")
    cls = REGISTRY[name]
    if int(meta.get("schema", 0)) > cls.schema:
        raise ValueError(f"path: {path} was written by pyad {meta.get('pyad_version')} with a newer {name} format "
                         f"(schema {meta.get('schema')} > {cls.schema}); upgrade pyad to load it")
    try:
        return cls._from_file(meta, state, weights)
    except (KeyError, TypeError, AttributeError, RuntimeError, IndexError) as exc:
        raise ValueError(f"path: {path} is not a valid {name} model ({type(exc).__name__}: {exc})") from None


def _check_version(meta: dict, path) -> None:
    written = str(meta.get("pyad_version", "0"))

    def parts(v: str) -> tuple:
        out = []
        for p in v.split(".")[:3]:
            digits = "".join(ch for ch in p if ch.isdigit())
            out.append(int(digits or 0))
        return tuple(out)

    if parts(written)[:2] > parts(__version__)[:2]:
        raise ValueError(f"path: {path} was written by pyad {written}, newer than this pyad {__version__}; "
                         "upgrade pyad to load it")
