"""Detector options beyond the defaults: the lightweight PatchCore variants of
seed 003 §3.5, the approximate index, the paper's reweighting, PaDiM's float16
factor, and the coreset selection PatchCore performs."""

import numpy as np
import pytest

import pyad
from pyad import kernels as K
from pyad.kernels import reference
from conftest import noisy_images

SMALL = dict(weights=None, image_size=64, crop_size=None, batch_size=4, threshold_holdout=0)


@pytest.fixture(scope="module")
def data():
    train, test = noisy_images(3, 64, 10, 3, 80, 170, 15)
    test[2, 10:30, 10:30] = 0
    return train, test


@pytest.mark.parametrize(
    "variant",
    [
        dict(backbone="resnet18", layers=("layer2",), pooling="avg"),
        dict(backbone="resnet34", layers=("layer2", "layer3"), pooling="max", embed_dim=None, target_dim=None),
        dict(backbone="resnet18", layers=("layer1", "layer2", "layer3"), pooling="avgmax", embed_dim=256),
        dict(backbone="resnet18", pooling="avg", patch_size=5, patch_stride=2, patch_padding=1),
        dict(backbone="resnet18", memory_bank_size=50),
        dict(backbone="mobilenet_v2", coreset_storage="int8"),
    ],
)
def test_lightweight_variants(data, variant):
    train, test = data
    det = pyad.PatchCore(**SMALL, **variant).fit(train)
    pred = det.predict(test)
    assert pred.scores.shape == (3,) and np.isfinite(pred.scores).all()
    assert pred.scores[2] == pred.scores.max()
    if "memory_bank_size" in variant:
        assert len(det.memory_bank_) == 50


def test_patchcore_memory_bank_is_the_documented_selection(data):
    """Bank = rows chosen by greedy selection on the seeded 128-d projection,
    started from the largest mean distance to 10 seeded random points."""
    train, _ = data
    det = pyad.PatchCore(backbone="resnet18", coreset_ratio=0.2, **SMALL)
    full = pyad.PatchCore(backbone="resnet18", coreset_ratio=1.0, **SMALL).fit(train).memory_bank_
    det.fit(train)
    proj = K.random_projection(full, 128, seed=0)
    rng = np.random.default_rng(0)
    starts = proj[rng.choice(len(proj), 10, replace=False)]
    init = np.linalg.norm(proj[:, None] - starts[None], axis=2).mean(1)
    mind = (init**2).astype(np.float32)
    idx = reference.greedy_coreset(proj, int(len(full) * 0.2), -1, mind)
    np.testing.assert_allclose(det.memory_bank_, full[idx], rtol=1e-6)


def test_hnsw_index_approximates_flat(data):
    train, test = data
    flat = pyad.PatchCore(backbone="resnet18", **SMALL).fit(train).predict(test)
    hnsw = pyad.PatchCore(backbone="resnet18", nn_index="hnsw", **SMALL).fit(train).predict(test)
    np.testing.assert_allclose(hnsw.scores, flat.scores, rtol=0.05)


def test_reweighting_scales_the_maximum(data):
    train, test = data
    plain = pyad.PatchCore(backbone="resnet18", **SMALL).fit(train).predict(test)
    rew = pyad.PatchCore(backbone="resnet18", reweight_neighbors=3, **SMALL).fit(train).predict(test)
    assert (rew.scores <= plain.scores + 1e-6).all() and (rew.scores >= 0).all()
    np.testing.assert_array_equal(rew.maps, plain.maps)  # maps are not reweighted


def test_padim_float16_factor(data, tmp_path):
    train, test = data
    f32 = pyad.PaDiM(backbone="resnet18", **SMALL).fit(train)
    f16 = pyad.PaDiM(backbone="resnet18", factor_dtype="float16", **SMALL).fit(train)
    np.testing.assert_allclose(f16.predict(test).scores, f32.predict(test).scores, rtol=1e-3)
    f32.save(tmp_path / "a.pyad")
    f16.save(tmp_path / "b.pyad")
    assert (tmp_path / "b.pyad").stat().st_size < 0.6 * (tmp_path / "a.pyad").stat().st_size


def test_bad_options(data):
    train, _ = data
    for kw, match in [
        (dict(pooling="median"), "pooling"),
        (dict(coreset_ratio=0), "coreset_ratio"),
        (dict(nn_index="ivf"), "nn_index"),
        (dict(memory_bank_size=0), "memory_bank_size"),
        (dict(layers=("layer9",)), "layers"),
    ]:
        with pytest.raises(ValueError, match=match):
            pyad.PatchCore(backbone="resnet18", **{**SMALL, **kw}).fit(train)
    with pytest.raises(ValueError, match="n_features"):
        pyad.PaDiM(backbone="resnet18", n_features=10_000, **SMALL).fit(train)
    with pytest.raises(ValueError, match="factor_dtype"):
        pyad.PaDiM(backbone="resnet18", factor_dtype="int8", **SMALL).fit(train)
