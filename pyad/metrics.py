"""Detection metrics (a first part; issue 3 completes this module).

AUROC is computed exactly, ties included, as the Mann-Whitney statistic with
average ranks: one sort, no per-threshold loops.
"""

from __future__ import annotations

import numpy as np


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"scores: expected {labels.size} values, got {scores.size}")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("labels: AUROC needs both normal and anomalous samples")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    # average rank of each run of equal scores
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(s.size)
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image scores (labels: 1 = anomalous)."""
    return _auroc(labels, scores)


def pixel_auroc(masks, maps) -> float:
    """Area under the ROC curve over all pixels of all images."""
    masks = [np.asarray(m) for m in masks]
    maps = [np.asarray(m) for m in maps]
    if len(masks) != len(maps) or any(a.shape != b.shape for a, b in zip(masks, maps)):
        raise ValueError("maps: expected one map per mask, of the same shape")
    return _auroc(np.concatenate([m.ravel() > 0 for m in masks]), np.concatenate([m.ravel() for m in maps]))
