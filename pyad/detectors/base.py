"""The detector API every pyad detector follows.

- ``__init__`` only stores hyperparameters; ``fit(train)`` learns and returns
  ``self``; learned state ends in an underscore (``memory_bank_``, ``threshold_``).
- ``predict(images)`` -> ``Prediction``: ``scores`` float32 [N] (higher = more
  anomalous), ``maps`` float32 [N, H, W] at each image's own resolution (a list
  when sizes differ), ``labels`` bool [N] once a threshold exists. Evaluation,
  the CLI and saved models all call this one method.
- Threshold: by default the ``threshold_quantile`` of the scores of a held-out
  ``threshold_holdout`` share of the training images, scored by a model fitted
  without them (the final model is fitted on all images); ``calibrate`` replaces
  it with the F1-optimal threshold on labelled images. ``threshold_rule_`` says
  which.
- ``save(path)`` / ``pyad.load(path)``: one file, see ``pyad.modelfile``.
  Backbone weights are not stored; their identity (sha256, or "random" + seed)
  is, and is checked when the backbone is rebuilt on first use.
- A fitted or loaded detector's ``predict`` is safe to call from many threads.
"""

from __future__ import annotations

import inspect
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import _progress
from .. import images as imgs
from .. import modelfile
from .._version import __version__
from ..backbones import Backbone

REGISTRY: dict[str, type["Detector"]] = {}


def register(cls):
    REGISTRY[cls.__name__] = cls
    return cls


class NotFittedError(ValueError):
    """predict/save before fit."""


@dataclass(frozen=True)
class Prediction:
    scores: np.ndarray
    maps: np.ndarray | list
    labels: np.ndarray | None = None


def _check(cond: bool, name: str, expected: str, value) -> None:
    if not cond:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


class Detector:
    """Shared plumbing. Subclasses implement ``_embed``, ``_collect``,
    ``_finish`` and ``_score`` (see PatchCore for the contract)."""

    def __init__(self, *, backbone, weights, layers, image_size, crop_size, device, batch_size, seed,
                 threshold_quantile, threshold_holdout, blur_sigma):
        self.backbone = backbone
        self.weights = weights
        self.layers = tuple(layers)
        self.image_size = image_size
        self.crop_size = crop_size
        self.device = device
        self.batch_size = batch_size
        self.seed = seed
        self.threshold_quantile = threshold_quantile
        self.threshold_holdout = threshold_holdout
        self.blur_sigma = blur_sigma
        self._lock = threading.Lock()
        self._net: Backbone | None = None

    # -- parameters ---------------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self) -> dict:
        return {p: getattr(self, p) for p in self._param_names()}

    def set_params(self, **params) -> "Detector":
        for k, v in params.items():
            if k not in self._param_names():
                raise ValueError(f"{k}: not a parameter of {type(self).__name__}")
            setattr(self, k, v)
        return self

    def _check_params(self) -> None:
        _check(isinstance(self.image_size, int) and self.image_size >= 32, "image_size", "an int >= 32", self.image_size)
        _check(self.crop_size is None or (isinstance(self.crop_size, int) and 32 <= self.crop_size <= self.image_size),
               "crop_size", "None or an int in [32, image_size]", self.crop_size)
        _check(self.device in ("cpu", "cuda") or str(self.device).startswith("cuda:"), "device", "'cpu' or 'cuda'", self.device)
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "a positive int", self.batch_size)
        _check(isinstance(self.seed, int), "seed", "an int", self.seed)
        _check(0 < self.threshold_quantile <= 1, "threshold_quantile", "a number in (0, 1]", self.threshold_quantile)
        _check(0 <= self.threshold_holdout < 1, "threshold_holdout", "a number in [0, 1)", self.threshold_holdout)
        _check(self.blur_sigma >= 0, "blur_sigma", "a number >= 0", self.blur_sigma)

    # -- backbone -------------------------------------------------------------
    def _backbone_layers(self) -> tuple[str, ...]:
        return self.layers

    def _network(self) -> Backbone:
        """The backbone, built on first use (thread-safe), seeded for random init."""
        if self._net is None:
            with self._lock:
                if self._net is None:
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(self.seed)
                        net = Backbone(self.backbone, self._backbone_layers(), None)
                    if self.weights is not None:
                        net.load_weights(self.weights)
                    expected = getattr(self, "weights_id_", None)
                    if expected is not None and net.weights_id != expected and not (expected == "random" and self.weights is None):
                        raise ValueError(f"weights: backbone weights {net.weights_id} differ from the ones this model was fitted with ({expected})")
                    self._net = net.fuse_batchnorm().to(self.device).eval()  # frozen: fold BN
        return self._net

    @property
    def _pre(self) -> imgs.Preprocess:
        return imgs.Preprocess(self.image_size, self.crop_size)

    def _features(self, batch: list[np.ndarray], clock: "_Clock | None" = None,
                  prepared: bool = False) -> dict[str, torch.Tensor]:
        """Backbone maps of a batch; ``prepared``: already resized and cropped by
        ``Preprocess.prepare`` (the fit path does that in the decoding threads)."""
        x = (self._pre.to_tensor(batch) if prepared else self._pre(batch)).to(self.device)
        if clock:
            clock.lap("preprocess")
        with torch.inference_mode():
            out = {k: v.float().cpu() for k, v in self._network()(x).items()}
        if clock:
            clock.lap("backbone")
        return out

    # -- fit --------------------------------------------------------------------
    def fit(self, train) -> "Detector":
        started = time.perf_counter()
        train = _split(train, "train")
        self._check_params()
        self._check_own_params()
        total = imgs.count(train)
        rng = np.random.default_rng(self.seed)
        hold = set()
        if total and self.threshold_holdout > 0 and total * self.threshold_holdout >= 1 and total >= 5:
            hold = set(rng.choice(total, max(1, int(round(total * self.threshold_holdout))), replace=False).tolist())
        self._begin_fit()
        seen, held = 0, []
        bar = _progress.bar(total=total, desc=f"{type(self).__name__}: fitting", unit="img")
        pre = self._pre
        for batch in imgs.batches(train, self.batch_size, transform=pre.prepare):
            emb = self._embed(self._features(batch, prepared=True))
            mask = np.array([seen + i in hold for i in range(len(batch))])
            self._collect(emb, mask)
            if mask.any():
                held.append(self._take(emb, mask))
            seen += len(batch)
            bar.update(len(batch))
        bar.close()
        if seen < 2:
            raise ValueError(f"train: need at least 2 images, got {seen}")
        self.threshold_, self.threshold_rule_ = None, "none (no held-out images)"
        if held:
            partial = self._finish(exclude_holdout=True)
            scores = np.concatenate([self._score(partial, h)[0] for h in held])
            del partial, held  # not alive while the final model is built
            self.threshold_ = float(np.quantile(scores, self.threshold_quantile, method="higher"))
            self.threshold_rule_ = (f"quantile {self.threshold_quantile} of the scores of {len(scores)} held-out "
                                    f"training images (seed {self.seed})")
        self._set_state(self._finish(exclude_holdout=False))
        self.weights_id_ = self._network().weights_id
        self.n_train_ = seen
        self.fit_seconds_ = time.perf_counter() - started  # training time, kept in saved models
        return self

    def calibrate(self, images, labels=None) -> "Detector":
        """Set the F1-optimal threshold from labelled images (labels: 1 = anomalous;
        a pyad dataset brings its own test labels)."""
        from ..datasets import Dataset
        from ..metrics import f1_max

        if isinstance(images, Dataset) and labels is None:
            labels = [s.label for s in images.test]
        scores = self.predict(images).scores
        if labels is None or len(labels) != len(scores):
            raise ValueError(f"labels: expected one label per image ({len(scores)})")
        f1, self.threshold_ = f1_max(labels, scores)
        self.threshold_rule_ = f"F1-optimal on {len(scores)} labelled images (F1 = {f1:.4f})"
        return self

    # -- predict ----------------------------------------------------------------
    def _fitted(self) -> None:
        if not hasattr(self, "n_train_"):
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit(train) or pyad.load(path) first")

    def predict(self, images, stage_times: dict | None = None) -> Prediction:
        """Scores, maps at each image's resolution and labels (see the module doc).

        ``stage_times``: a dict that receives the seconds spent per stage (seed
        003 §3.4): read, preprocess, backbone, embedding, search, map.
        """
        self._fitted()
        images = _split(images, "test")
        state = self._get_state()
        clock = _Clock(stage_times) if stage_times is not None else None
        total = imgs.count(images)
        scores, maps = [], _Maps(total)
        bar = _progress.bar(total=total, desc=f"{type(self).__name__}: predicting", unit="img",
                            disable=not total or total <= self.batch_size or None)
        for batch in imgs.batches(images, self.batch_size):
            if clock:
                clock.lap("read")
            emb = self._embed(self._features(batch, clock))
            if clock:
                clock.lap("embedding")
            s, patch_maps = self._score(state, emb)
            if clock:
                clock.lap("search")
            full = patch_maps if patch_maps.shape[-1] == self._pre.size else self._upsample(patch_maps)
            scores.append(s)
            for m, img in zip(full, batch):
                maps.add(self._pre.restore(m, img.shape[:2]))
            bar.update(len(batch))
            if clock:
                clock.lap("map")
        bar.close()
        scores = np.concatenate(scores).astype(np.float32)
        labels = None if self.threshold_ is None else scores > self.threshold_
        return Prediction(scores, maps.result(), labels)

    def _upsample(self, patch_maps: np.ndarray) -> np.ndarray:
        """[B, h, w] patch scores -> [B, S, S] on the network input: bilinear, then
        Gaussian blur (official PatchCore RescaleSegmentor; PaDiM, σ = 4)."""
        t = torch.from_numpy(np.ascontiguousarray(patch_maps, dtype=np.float32))[:, None]
        t = F.interpolate(t, size=(self._pre.size,) * 2, mode="bilinear", align_corners=False)[:, 0]
        return imgs.gaussian_blur(t, self.blur_sigma).numpy()

    # -- persistence ------------------------------------------------------------
    def save(self, path) -> None:
        self._fitted()
        meta = {
            "pyad_version": __version__,
            "detector": type(self).__name__,
            "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.get_params().items()},
            "weights_id": self.weights_id_,
            "n_train": self.n_train_,
            "fit_seconds": self.fit_seconds_,
            "threshold": self.threshold_,
            "threshold_rule": self.threshold_rule_,
        }
        modelfile.write(path, meta, self._arrays())

    @classmethod
    def _from_file(cls, meta: dict, arrays: dict) -> "Detector":
        params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["params"].items()}
        det = cls(**params)
        det.weights_id_ = meta["weights_id"]
        det.n_train_ = meta["n_train"]
        det.fit_seconds_ = meta.get("fit_seconds")
        det.threshold_ = meta["threshold"]
        det.threshold_rule_ = meta["threshold_rule"]
        det._load_arrays(arrays)
        return det

    # -- subclass contract ------------------------------------------------------
    def _check_own_params(self) -> None: ...
    def _begin_fit(self) -> None: ...
    def _embed(self, feats: dict[str, torch.Tensor]): raise NotImplementedError
    def _collect(self, emb, holdout_mask: np.ndarray) -> None: raise NotImplementedError
    def _take(self, emb, mask: np.ndarray):
        """The held-out images' part of a batch's embedding."""
        return emb[mask]
    def _finish(self, exclude_holdout: bool): raise NotImplementedError
    def _set_state(self, state) -> None: raise NotImplementedError
    def _get_state(self): raise NotImplementedError
    def _score(self, state, emb) -> tuple[np.ndarray, np.ndarray]: raise NotImplementedError
    def _arrays(self) -> dict: raise NotImplementedError
    def _load_arrays(self, arrays: dict) -> None: raise NotImplementedError


def _split(source, which: str):
    """A pyad dataset stands for its training images in fit, its test images in predict."""
    from ..datasets import Dataset

    if isinstance(source, Dataset):
        samples = getattr(source, which)
        if not samples:
            raise ValueError(f"images: dataset {source.name!r} has no {which} images")
        return samples
    return source


class _Maps:
    """Collects maps into one preallocated [N, H, W] array while they share a shape
    (no stacking copy: halves the peak memory of a large predict), else a list."""

    def __init__(self, total: int | None):
        self.total = total
        self.array: np.ndarray | None = None
        self.items: list[np.ndarray] = []
        self.n = 0

    def add(self, m: np.ndarray) -> None:
        if self.n == 0 and self.total:
            self.array = np.empty((self.total, *m.shape), np.float32)
        if self.array is not None and (m.shape != self.array.shape[1:] or self.n >= len(self.array)):
            self.items = list(self.array[: self.n])  # views; from here on a list
            self.array = None
        if self.array is not None:
            self.array[self.n] = m
        else:
            self.items.append(m)
        self.n += 1

    def result(self) -> np.ndarray | list[np.ndarray]:
        if self.array is not None:
            return self.array[: self.n]
        if self.items and len({m.shape for m in self.items}) == 1:
            return np.stack(self.items)
        return self.items


class _Clock:
    """Accumulates perf_counter laps into a dict of stage -> seconds."""

    def __init__(self, into: dict):
        import time

        self._now = time.perf_counter
        self.into = into
        self.t = self._now()

    def lap(self, stage: str) -> None:
        t = self._now()
        self.into[stage] = self.into.get(stage, 0.0) + t - self.t
        self.t = t


def load(path) -> Detector:
    """A detector saved with ``save``; checks format, checksum and version."""
    meta, arrays = modelfile.read(path)
    name = meta.get("detector")
    if name not in REGISTRY:
        raise ValueError(f"path: unknown detector {name!r} in {path}")
    return REGISTRY[name]._from_file(meta, arrays)
