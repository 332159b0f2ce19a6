"""Detection and localisation metrics, exact on ties and fast at MVTec scale.

Conventions (one for all of pyad): labels and masks are 1/True = anomalous;
scores and maps are higher = more anomalous; a sample is *predicted* anomalous
when ``score > threshold`` (the rule of ``Prediction.labels``).

Speed: everything is built on ``np.sort`` of the scores of each class (SIMD
sort, about 1 s for the 67 M pixels of 83 maps of 900 x 900) and binary
searches; there is no argsort over all pixels and no loop over thresholds.

- ``image_auroc`` / ``pixel_auroc``: the Mann-Whitney statistic, ties counted
  one half (equal to the area under the exact ROC curve, as scikit-learn's
  ``roc_auc_score``).
- ``aupro``: the MVTec AD definition (Bergmann et al., IJCV 2021, §4.2 and the
  official ``evaluation/generic_util.py``): the per-region overlap (PRO) is the
  mean over every connected ground-truth region (8-connectivity, per image) of
  the share of its pixels at or above the threshold; the false positive rate is
  over all normal pixels of all images; the PRO-vs-FPR curve through every
  distinct threshold is integrated with the trapezoidal rule up to
  ``fpr_limit`` (linear interpolation at the limit) and divided by it.
- ``f1_max``, ``precision_recall_f1``, ``roc_curve``, ``pr_curve``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# -- input checks ---------------------------------------------------------------
def _binary(labels, scores, what: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if labels.shape != scores.shape:
        raise ValueError(f"scores: expected the shape of {what} {labels.shape}, got {scores.shape}")
    if labels.dtype != bool:
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(f"{what}: expected 0/1 or bool values")
        labels = labels.astype(bool)
    if scores.dtype.kind not in "fiub":
        raise ValueError(f"scores: expected numbers, got dtype {scores.dtype}")
    if scores.dtype.kind == "f" and not np.isfinite(scores).all():
        raise ValueError("scores: contains NaN or Inf")
    labels, scores = labels.ravel(), scores.ravel()
    if labels.all() or not labels.any():
        raise ValueError(f"{what}: need both normal (0) and anomalous (1) samples")
    return labels, scores


def _pixels(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """Lists (or stacks) of [H, W] masks and maps -> flat labels and scores."""
    masks = [np.asarray(m) for m in masks]
    maps = [np.asarray(m) for m in maps]
    if len(masks) != len(maps):
        raise ValueError(f"maps: expected one map per mask ({len(masks)}), got {len(maps)}")
    for i, (a, b) in enumerate(zip(masks, maps)):
        if a.shape != b.shape or a.ndim != 2:
            raise ValueError(f"maps: map {i} has shape {b.shape}; expected [H, W] equal to its mask's {a.shape}")
    labels = np.concatenate([m.ravel() > 0 for m in masks])
    scores = np.concatenate([m.ravel() for m in maps])
    return _binary(labels, scores, "masks")


# -- the sorted core ------------------------------------------------------------------
@dataclass(frozen=True)
class _Sorted:
    pos: np.ndarray  # scores of anomalous samples, ascending
    neg: np.ndarray  # scores of normal samples, ascending

    @classmethod
    def of(cls, labels: np.ndarray, scores: np.ndarray) -> "_Sorted":
        return cls(np.sort(scores[labels]), np.sort(scores[~labels]))

    def auroc(self) -> float:
        # sum over positives of (#neg below + half #neg equal): exact with ties
        lo = np.searchsorted(self.neg, self.pos, "left")
        hi = np.searchsorted(self.neg, self.pos, "right")
        u = (lo.sum(dtype=np.float64) + hi.sum(dtype=np.float64)) / 2
        return float(u / (self.pos.size * self.neg.size))

    def counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Distinct thresholds t (descending) with tp(t), fp(t) = counts of score >= t."""
        t = np.unique(np.concatenate([self.pos, self.neg]))[::-1]
        tp = self.pos.size - np.searchsorted(self.pos, t, "left")
        fp = self.neg.size - np.searchsorted(self.neg, t, "left")
        return t, tp, fp


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image scores (labels: 1 = anomalous)."""
    return _Sorted.of(*_binary(labels, scores)).auroc()


def pixel_auroc(masks, maps) -> float:
    """Area under the ROC curve over all pixels of all images."""
    return _Sorted.of(*_pixels(masks, maps)).auroc()


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) through every distinct score, thresholds descending,
    starting at (0, 0) with threshold +inf: scikit-learn's ``roc_curve`` with
    ``drop_intermediate=False``. Here a point counts ``score >= threshold``."""
    return _roc_from(*_Sorted.of(*_binary(labels, scores)).counts())


def _roc_from(t, tp, fp) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC curve from ``_Sorted.counts`` (at the lowest threshold all are counted)."""
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]], np.r_[np.inf, t.astype(np.float64)]


def pr_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) as scikit-learn's ``precision_recall_curve``:
    every distinct score as a threshold, ascending (``score >= threshold``), and a
    last point at precision 1, recall 0."""
    t, tp, fp = _Sorted.of(*_binary(labels, scores)).counts()
    t, tp, fp = t[::-1], tp[::-1], fp[::-1]
    precision = tp / (tp + fp)
    recall = tp / tp[0]
    return np.r_[precision, 1.0], np.r_[recall, 0.0], t.astype(np.float64)


def f1_max(labels, scores) -> tuple[float, float]:
    """(best F1 over all thresholds, a threshold that gives it with ``score > threshold``:
    midway between the lowest score labelled anomalous and the next lower score)."""
    return _f1_from(*_Sorted.of(*_binary(labels, scores)).counts())


def _f1_from(t, tp, fp) -> tuple[float, float]:
    """``f1_max`` from ``_Sorted.counts``."""
    f1 = 2 * tp / (tp + fp + tp[-1])
    best = int(np.argmax(f1))
    below = t[best + 1] if best + 1 < t.size else None
    if below is None:
        threshold = float(np.nextafter(t[best], -np.inf))
    else:
        threshold = float((np.float64(t[best]) + np.float64(below)) / 2)
        if not below < threshold < t[best]:  # adjacent floats: no midpoint between them
            threshold = float(below)
    return float(f1[best]), threshold


def precision_recall_f1(labels, scores, threshold: float) -> tuple[float, float, float]:
    """Precision, recall and F1 when ``score > threshold`` is predicted anomalous
    (precision is 0 when nothing is predicted anomalous)."""
    labels, scores = _binary(labels, scores)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold: expected a finite number, got {threshold!r}")
    pred = scores > threshold
    tp = int((pred & labels).sum())
    fp = int((pred & ~labels).sum())
    fn = int((~pred & labels).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


# -- AUPRO ------------------------------------------------------------------------------
def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (see the module doc)."""
    fpr, pro = pro_curve(masks, maps, fpr_limit)
    return _trapezoid(fpr, pro, fpr_limit) / fpr_limit


def pro_curve(masks, maps, fpr_limit: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) at every distinct threshold, from (0, 0); points beyond the first
    one past ``fpr_limit`` are left out (they do not change the integral), and
    the curve ends at (1, 1) as in the official code."""
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit: expected a number in (0, 1], got {fpr_limit!r}")
    masks = [np.asarray(m) > 0 for m in masks]
    labels, scores = _pixels(masks, maps)
    regions, weights = [], []
    for m in masks:
        if m.any():
            lab, n = label_regions(m)
            area = np.bincount(lab.ravel(), minlength=n + 1)[1:]
            regions.append(n)
            weights.append(1.0 / area[lab[m] - 1])
        else:
            regions.append(0)
    n_regions = sum(regions)
    # positives in the same order as scores[labels]: masks raveled in order
    w = np.concatenate(weights) / n_regions
    pos_scores = scores[labels]
    order = np.argsort(pos_scores, kind="stable")
    pos, w = pos_scores[order], w[order]
    neg = np.sort(scores[~labels])
    n_neg = neg.size
    # thresholds: every distinct value down to the first whose FPR exceeds the limit
    k = min(n_neg - 1, int(np.floor(fpr_limit * n_neg)) + 1)  # index from the top
    floor = neg[n_neg - 1 - k]
    t = np.unique(np.concatenate([pos[pos >= floor], neg[n_neg - 1 - k :]]))[::-1]
    fp = n_neg - np.searchsorted(neg, t, "left")
    cum = np.r_[0.0, np.cumsum(w[::-1])]  # cum[j] = weight of the j highest positives
    pro = cum[pos.size - np.searchsorted(pos, t, "left")]
    fpr = np.r_[0.0, fp / n_neg, 1.0]
    pro = np.minimum(np.r_[0.0, pro, 1.0], 1.0)
    return fpr, pro


def _trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under y(x) for x <= x_max, interpolating y at x_max
    (x ascending, as the official MVTec ``trapezoid``)."""
    inside = x <= x_max
    area = float(np.sum(0.5 * (y[inside][1:] + y[inside][:-1]) * np.diff(x[inside])))
    i = int(np.count_nonzero(inside))  # first point beyond x_max
    if i < x.size and x[i - 1] < x_max:
        y_at = y[i - 1] + (y[i] - y[i - 1]) * (x_max - x[i - 1]) / (x[i] - x[i - 1])
        area += 0.5 * (y_at + y[i - 1]) * (x_max - x[i - 1])
    return area


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected regions of a 2-D boolean mask, 8-connectivity (the official
    MVTec evaluation's ``scipy.ndimage.label`` with a 3 x 3 structure):
    (int32 labels 1..n in raster order of first pixel, 0 = background; n)."""
    mask = np.ascontiguousarray(np.asarray(mask) > 0)
    if mask.ndim != 2:
        raise ValueError(f"mask: expected a 2-d array, got shape {mask.shape}")
    from ._regions import label8

    lab = np.zeros(mask.shape, np.int32)
    n = label8(mask, lab)
    return lab, int(n)
