"""Metrics at MVTec AD scale: 83 maps of 900 x 900 (bottle's test set), about
5% anomalous pixels in 63 of them. pyad's pixel AUROC vs scikit-learn's
``roc_auc_score``; pyad's AUPRO vs the official MVTec formulation
(``evaluation/generic_util.py``: argsort of all pixels, cumulative sums).

Target: seconds, not minutes; and faster than both references."""

import numpy as np
import pytest
from scipy import ndimage

from conftest import RESULTS, record, save
from pyad import metrics as M


@pytest.fixture(scope="module")
def maps():
    rng = np.random.default_rng(0)
    masks, maps = [], []
    yy, xx = np.mgrid[0:900, 0:900]
    for i in range(83):
        m = np.zeros((900, 900), bool)
        if i >= 20:
            for _ in range(rng.integers(1, 4)):
                cy, cx, r = rng.integers(100, 800), rng.integers(100, 800), rng.integers(20, 90)
                m |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        masks.append(m)
        maps.append((rng.random((900, 900)) + 0.6 * m).astype(np.float32))
    return masks, maps


def official_aupro(masks, maps, limit=0.3):
    """MVTec AD's compute_pro + trapezoid (their code, paraphrased)."""
    fp_changes, pro_changes, n_regions, n_ok = [], [], 0, 0
    for gt in masks:
        lab, n = ndimage.label(gt, np.ones((3, 3), int))
        n_regions += n
        ok = lab == 0
        n_ok += ok.sum()
        pro = np.zeros(gt.shape)
        for k in range(1, n + 1):
            region = lab == k
            pro[region] = 1.0 / region.sum()
        fp_changes.append(ok.ravel())
        pro_changes.append(pro.ravel())
    scores = np.concatenate([m.ravel() for m in maps])
    order = np.argsort(scores)[::-1]
    scores = scores[order]
    fprs = np.cumsum(np.concatenate(fp_changes)[order]) / n_ok
    pros = np.cumsum(np.concatenate(pro_changes)[order]) / n_regions
    keep = np.append(np.diff(scores) != 0, True)
    fprs, pros = np.r_[0, fprs[keep], 1], np.r_[0, pros[keep], 1]
    inside = fprs <= limit
    area = np.trapezoid(pros[inside], fprs[inside])
    i = inside.sum()
    y = pros[i - 1] + (pros[i] - pros[i - 1]) * (limit - fprs[i - 1]) / (fprs[i] - fprs[i - 1])
    return (area + 0.5 * (y + pros[i - 1]) * (limit - fprs[i - 1])) / limit


def test_pixel_auroc_sklearn(benchmark, maps):
    from sklearn.metrics import roc_auc_score

    masks, m = maps
    y = np.concatenate([a.ravel() for a in masks])
    s = np.concatenate([a.ravel() for a in m])
    out = record(benchmark, "pixel-auroc", "reference", roc_auc_score, y, s, rounds=1, warmup=0)
    assert out == pytest.approx(M.pixel_auroc(masks, m), abs=1e-9)


def test_pixel_auroc_pyad(benchmark, maps):
    record(benchmark, "pixel-auroc", "pyad", M.pixel_auroc, *maps, rounds=3)


def test_aupro_official(benchmark, maps):
    out = record(benchmark, "aupro", "reference", official_aupro, *maps, rounds=1, warmup=0)
    assert out == pytest.approx(M.aupro(*maps), abs=1e-6)


def test_aupro_pyad(benchmark, maps):
    record(benchmark, "aupro", "pyad", M.aupro, *maps, rounds=3)


def test_summary():
    rows = {g: {"reference_s": r["reference"], "pyad_s": r["pyad"], "speedup": r["reference"] / r["pyad"]}
            for g, r in RESULTS.items() if g in ("pixel-auroc", "aupro")}
    save("metrics", rows)
    for k, v in rows.items():
        print(k, {kk: round(vv, 2) for kk, vv in v.items()})
    for v in rows.values():
        assert v["pyad_s"] < 10 and v["speedup"] > 1
