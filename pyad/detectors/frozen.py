"""The frozen-feature family (PatchCore, PaDiM, SPADE): an ImageNet backbone used
as it is, one pass over the training images, no gradient descent.

A member defines its inference module as ``embed`` (backbone + embedding, also
used by ``fit``, so training and inference embed identically) and ``head`` (the
learned part: memory bank, Gaussians, gallery), and implements ``_begin``,
``_collect`` and ``_finish``. ``_finish`` scores the validation images with a model
that did not learn from them but without fitting twice (PatchCore continues its
greedy selection; PaDiM downdates the final Gaussians).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import _progress
from .. import images as imgs
from .. import ops
from .. import training
from ..backbones import Backbone, resolve_weights
from .base import Detector, Validation, _autocast
from .settings import BackboneSettings, Preprocessing, Runtime, Thresholds


class FrozenFeatureDetector(Detector):
    groups = (BackboneSettings, Preprocessing, Runtime, Thresholds)
    cpu_bfloat16 = True

    # -- the backbone ---------------------------------------------------------------------------------
    def _backbone_layers(self) -> tuple[str, ...]:
        return tuple(self.layers)

    def _plain_backbone(self) -> Backbone:
        """The backbone with its weights, unfused (official layout), seeded for random init."""
        with training.seeded(self.seed):
            net = Backbone(self.backbone, self._backbone_layers(), None)
        expected = getattr(self, "weights_id_", None)
        embedded = self._cache.get("weights_state")
        if embedded is not None:  # saved inside this (checksummed) model file: the fitted weights
            net.load_weights(embedded)
            net.weights_id, net.weights_source = expected, getattr(self, "weights_source_", None)
        elif self.weights is not None:
            net.load_weights(self._cache.get("weights_path") or self.weights)
        if expected is not None and net.weights_id != expected:
            raise ValueError(f"weights: the backbone weights ({net.weights_id}) differ from the ones this model "
                             f"was fitted with ({expected})")
        return net

    def _network(self) -> Backbone:
        """The frozen inference copy (BatchNorm folded), built on first use (thread-safe)."""
        net = self._cache.get("backbone")
        if net is None:
            with self._lock:
                net = self._cache.get("backbone")
                if net is None:
                    plain = self._plain_backbone()
                    self.weights_id_ = plain.weights_id
                    self.weights_source_ = plain.weights_source
                    net = plain.frozen().to(self.device)
                    self._cache["backbone"] = net
        return net

    def _backbone_state(self) -> dict:
        return {k: v.clone() for k, v in self._plain_backbone().official_state_dict().items()}

    def _resolve_weights_at_load(self, weights, embedded) -> None:
        """Find the backbone weights the model was fitted with now, not at first use:
        the embedded copy, ``weights``, the recorded absolute path, the path as given
        (also next to the model file), or the official checkpoint's usual places;
        each is checked against the recorded SHA-256."""
        expected = getattr(self, "weights_id_", "random")
        if expected == "random":
            return
        if embedded is not None:
            self._cache["weights_state"] = embedded
            return
        tried = []
        candidates = [weights] if weights is not None else [getattr(self, "weights_source_", None), self.weights]
        for cand in candidates:
            if cand is None:
                continue
            try:
                path, digest = resolve_weights(self.backbone, cand)
            except ValueError as exc:
                tried.append(f"{cand} ({exc})")
                continue
            if "sha256:" + digest == expected:
                self._cache["weights_path"] = os.fspath(Path(path).resolve())
                return
            tried.append(f"{path} (sha256:{digest[:12]}…, not the one fitted with)")
        raise ValueError(f"weights: the model was fitted with backbone weights {expected[:19]}… "
                         f"({getattr(self, 'weights_source_', None) or self.weights}); not found: "
                         f"{'; '.join(tried) or 'no candidate'}. Pass pyad.load(path, weights='/path/to/checkpoint') "
                         "(CLI: --weights), or save the model with include_weights=True")

    # -- fit ------------------------------------------------------------------------------------------------
    def _fit(self, items, val_items, *, labels=None, checkpoint=None) -> Validation | None:
        net = self._network()
        embed = self._embedder(net)
        pre = self.preprocessing
        self._begin(len(items), len(val_items))
        everything = list(items) + list(val_items)
        bar = _progress.bar(total=len(everything), desc=f"{type(self).__name__}: embedding", unit="img")
        seen = 0
        for batch in imgs.load_batches(everything, self.batch_size, pre):
            x = pre.to_tensor([b.pixels for b in batch]).to(self.device)
            with torch.inference_mode(), _autocast(self):  # embedded exactly as predict embeds
                emb = _cpu(embed(x))  # collected on the host (banks, accumulators are host arrays)
            held = np.array([seen + i >= len(items) for i in range(len(batch))])
            self._collect(emb, held)
            seen += len(batch)
            bar.update(len(batch))
        bar.close()
        ops.release_winograd(net)  # transformed weights: rebuilt by the first predict
        release_heap()  # the embedding pass's freed buffers, before the head's largest temporaries
        out = self._finish()
        release_heap()
        return out

    # -- subclass contract ------------------------------------------------------------------------------------
    def _embedder(self, net: Backbone) -> nn.Module:
        """backbone + embedding as a module (the first half of the inference module)."""
        raise NotImplementedError

    def _begin(self, n_fit: int, n_val: int) -> None:
        raise NotImplementedError

    def _collect(self, emb, held: np.ndarray) -> None:
        """Take one batch's embeddings; ``held`` marks validation images."""
        raise NotImplementedError

    def _finish(self) -> Validation | None:
        """Build the learned state from everything collected; return the validation
        images' scores and maps from a model that did not learn from them."""
        raise NotImplementedError


def release_heap() -> None:
    """Give memory that was freed back to the operating system (glibc's
    ``malloc_trim``; elsewhere nothing). Freed blocks of a few MB (backbone
    activations, per-chunk temporaries) otherwise stay in the process's heap: a
    PaDiM ResNet-18 fit on bottle ends at 0.75 GB resident for 0.35 GB of live
    data, and its peak, in the solve, falls from 1.00 to 0.91 GB."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc (CDLL(None) is a TypeError on Windows)
        pass


def _cpu(emb):
    """A tensor or a tuple of tensors on the CPU (no copy for CPU tensors)."""
    return tuple(_cpu(e) for e in emb) if isinstance(emb, (tuple, list)) else emb.cpu()


def validation_from(head: nn.Module, embeddings: list) -> Validation | None:
    """Score held-out embeddings with ``head`` (a model that did not see them)."""
    if not embeddings:
        return None
    scores, maps = [], []
    with torch.inference_mode():
        for emb in embeddings:
            s, m = head(emb)
            scores.append(s.float().cpu().numpy())
            maps.append(m.float().cpu().numpy())
    return Validation(np.concatenate(scores), np.concatenate(maps))

