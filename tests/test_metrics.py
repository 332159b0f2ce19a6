"""Metrics against scikit-learn, scipy's labelling and an independent AUPRO
written from the definition (a loop over every distinct threshold)."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from pyad import metrics as M


def _tied(rng, n, levels=7):
    """Scores with many ties (few distinct values) and labels correlated with them."""
    scores = rng.integers(0, levels, n).astype(np.float32)
    labels = rng.random(n) < 0.2 + 0.08 * scores
    labels[:2] = [True, False]
    return labels, scores


@pytest.mark.parametrize("tied", [True, False])
def test_auroc_and_curves_match_sklearn(rng, tied):
    for _ in range(5):
        labels, scores = _tied(rng, 300) if tied else (rng.random(300) < 0.3, rng.standard_normal(300).astype(np.float32))
        labels[:2] = [True, False]
        assert M.image_auroc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
        fpr, tpr, thr = M.roc_curve(labels, scores)
        efpr, etpr, ethr = skm.roc_curve(labels, scores, drop_intermediate=False)
        np.testing.assert_allclose(fpr, efpr)
        np.testing.assert_allclose(tpr, etpr)
        np.testing.assert_array_equal(thr[1:], ethr[1:])
        p, r, t = M.pr_curve(labels, scores)
        ep, er, et = skm.precision_recall_curve(labels, scores)
        np.testing.assert_allclose(p, ep)
        np.testing.assert_allclose(r, er)
        np.testing.assert_array_equal(t, et)


def test_f1_max_and_threshold_agree_with_sklearn(rng):
    for tied in (True, False):
        labels, scores = _tied(rng, 500) if tied else (rng.random(500) < 0.3, rng.random(500).astype(np.float32))
        labels[:2] = [True, False]
        f1, thr = M.f1_max(labels, scores)
        p, r, _ = skm.precision_recall_curve(labels, scores)
        expected = np.max(np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0))
        assert f1 == pytest.approx(expected, abs=1e-12)
        # the threshold realises that F1 with the "score > threshold" rule
        prec, rec, f1_at = M.precision_recall_f1(labels, scores, thr)
        assert f1_at == pytest.approx(f1, abs=1e-12)
        pred = scores > thr
        assert prec == pytest.approx(skm.precision_score(labels, pred))
        assert rec == pytest.approx(skm.recall_score(labels, pred))
        assert f1_at == pytest.approx(skm.f1_score(labels, pred))


def test_pixel_auroc_matches_sklearn(rng):
    masks = [rng.random((20, 30)) < 0.1 for _ in range(4)] + [np.zeros((20, 30), bool)]
    maps = [np.round(rng.random((20, 30)) * 10 + 3 * m, 1).astype(np.float32) for m in masks]
    expected = skm.roc_auc_score(np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps]))
    assert M.pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert M.pixel_auroc(np.stack(masks).astype(np.uint8) * 255, np.stack(maps)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_label_regions_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((37, 53)) < [0.2, 0.45, 0.6][seed % 3]
    lab, n = M.label_regions(mask)
    expected, n_expected = ndimage.label(mask, structure=np.ones((3, 3), int))
    assert n == n_expected
    np.testing.assert_array_equal(lab, expected)


def _aupro_reference(masks, maps, limit):
    """From the definition: at each distinct threshold (descending), PRO = mean over
    regions of the covered share, FPR over normal pixels; trapezoid to the limit,
    with linear interpolation at the limit; divided by the limit."""
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3), int))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    normal = np.concatenate([(~m).ravel() for m in masks])
    flat = np.concatenate([a.ravel() for a in maps])
    xs, ys = [0.0], [0.0]
    for t in np.unique(flat)[::-1]:
        xs.append(float((flat[normal] >= t).mean()))
        ys.append(float(np.mean([(maps[i][r] >= t).mean() for i, r in regions])))
    xs.append(1.0)
    ys.append(1.0)
    xs, ys = np.array(xs), np.array(ys)
    grid_x = xs[xs <= limit]
    grid_y = ys[xs <= limit]
    if grid_x[-1] < limit:
        grid_y = np.r_[grid_y, np.interp(limit, xs, ys)]
        grid_x = np.r_[grid_x, limit]
    return np.trapezoid(grid_y, grid_x) / limit


@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_aupro_matches_the_definition(seed, limit):
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for i in range(5):
        m = np.zeros((24, 32), bool)
        if i % 4:
            for _ in range(rng.integers(1, 4)):  # a few rectangular regions of different sizes
                y, x = rng.integers(0, 20), rng.integers(0, 28)
                m[y : y + rng.integers(1, 6), x : x + rng.integers(1, 6)] = True
        masks.append(m)
        levels = 12 if seed == 0 else 10_000  # seed 0: many ties
        maps.append((np.floor(rng.random(m.shape) * levels) / levels + 0.4 * m * rng.random()).astype(np.float32))
    got = M.aupro(masks, maps, fpr_limit=limit)
    assert got == pytest.approx(_aupro_reference(masks, maps, limit), abs=1e-9)


def test_aupro_perfect_and_inverted_maps():
    m = np.zeros((32, 32), bool)
    m[4:10, 4:10] = True
    m[20:30, 15:18] = True
    assert M.aupro([m, np.zeros_like(m)], [m.astype(np.float32), np.zeros((32, 32), np.float32)]) == pytest.approx(1.0)
    assert M.aupro([m], [(~m).astype(np.float32)]) == pytest.approx(0.0)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="labels: need both"):
        M.image_auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="scores: expected the shape"):
        M.image_auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="scores: contains NaN"):
        M.f1_max([0, 1], [np.nan, 0.2])
    with pytest.raises(ValueError, match="labels: expected 0/1"):
        M.image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="maps: map 0 has shape"):
        M.pixel_auroc([np.zeros((4, 4))], [np.zeros((4, 5))])
    with pytest.raises(ValueError, match="fpr_limit"):
        M.aupro([np.eye(4)], [np.eye(4)], fpr_limit=0)
    with pytest.raises(ValueError, match="threshold"):
        M.precision_recall_f1([0, 1], [0.1, 0.2], float("nan"))
