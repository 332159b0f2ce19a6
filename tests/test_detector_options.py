"""Detector options beyond the defaults: the lightweight PatchCore variants of
the lightweight study (Baßler's thesis §3.5), the approximate index, the paper's reweighting, PaDiM's float16
factor, and the coreset selection PatchCore performs."""

import warnings

import numpy as np
import pytest

import pyad
from pyad import kernels as K
from pyad.kernels import reference
from conftest import noisy_images

SMALL = dict(weights=None, image_size=64, crop_size=None, batch_size=4, validation=0)


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


def test_patchcore_validation_continues_the_greedy_selection(data):
    """With validation images: the training part's greedy selection scores them (the
    threshold), then the selection continues over every patch; one selection in all."""
    train, _ = data
    val_kw = dict(SMALL, validation=0.3)
    det = pyad.PatchCore(backbone="resnet18", coreset_ratio=0.2, **val_kw).fit(train)
    full = pyad.PatchCore(backbone="resnet18", coreset_ratio=1.0, **SMALL).fit(train).memory_bank_  # every patch, in order
    rng = np.random.default_rng(0)
    held = np.zeros(len(train), bool)
    held[rng.choice(len(train), 3, replace=False)] = True
    per = len(full) // len(train)
    order = np.concatenate([np.flatnonzero(~held), np.flatnonzero(held)])  # fit streams training then validation images
    rows = np.concatenate([np.arange(i * per, (i + 1) * per) for i in order])
    feats = full[rows]
    proj = K.random_projection(feats, 128, seed=0)
    fit_rows = np.arange((~held).sum() * per)
    starts = proj[fit_rows[rng.__class__(rng.bit_generator.__class__(0)).choice(len(fit_rows), 10, replace=False)]]
    init = np.linalg.norm(proj[:, None] - starts[None], axis=2).mean(1)
    k_fit = int(len(fit_rows) * 0.2)
    mind = (init[fit_rows] ** 2).astype(np.float32)
    prefix = reference.greedy_coreset(proj[fit_rows], k_fit, -1, mind)
    cont = (init**2).astype(np.float32)
    cont[fit_rows] = mind
    d_val = ((proj[len(fit_rows):, None] - proj[prefix][None]) ** 2).sum(-1).min(1)
    cont[len(fit_rows):] = np.minimum(cont[len(fit_rows):], d_val)
    cont[prefix] = 0
    more = reference.greedy_coreset(proj, int(len(feats) * 0.2) - k_fit, -1, cont)
    want = feats[np.concatenate([prefix, more])]
    np.testing.assert_allclose(det.memory_bank_, want, rtol=1e-5, atol=1e-5)
    # the threshold: validation images scored against the prefix bank only
    val_feats = feats[len(fit_rows):].reshape(3, per, -1)
    bank = feats[prefix]
    scores = ((val_feats[:, :, None] - bank[None, None]) ** 2).sum(-1).min(-1).max(1)
    assert det.threshold_ == pytest.approx(float(scores.max()), rel=1e-4)


def test_padim_validation_downdate_equals_a_fit_without_them(data):
    """The validation images' scores come from the final Gaussians downdated without
    them; equal to fitting the training part alone with eps·(N-1)/(n-1)."""
    train, _ = data
    det = pyad.PaDiM(backbone="resnet18", **{**SMALL, "validation": 0.3}).fit(train)
    rng = np.random.default_rng(0)
    held = np.zeros(len(train), bool)
    held[rng.choice(len(train), 3, replace=False)] = True
    n = (~held).sum()
    eps = 0.01 * (len(train) - 1) / (n - 1)
    part = pyad.PaDiM(backbone="resnet18", eps=eps, **SMALL).fit(train[~held])
    want = part.predict(train[held], maps="low").scores
    assert det.threshold_ == pytest.approx(float(want.max()), rel=1e-4)
    alone = pyad.PaDiM(backbone="resnet18", **SMALL).fit(train)  # the final model uses every image
    np.testing.assert_allclose(det.gaussian_.factor, alone.gaussian_.factor, rtol=1e-5, atol=1e-6)


def test_padim_feature_rule_and_memory_budget(data):
    train, _ = data
    assert len(pyad.PaDiM(backbone="resnet18", **SMALL).fit(train).channels_) == 100
    assert len(pyad.PaDiM(backbone="mobilenet_v2", **SMALL).fit(train).channels_) == 100  # 152 channels -> 100
    big = pyad.PaDiM(backbone="resnet50", memory_budget_gb=0.001, **SMALL)
    with pytest.raises(ValueError, match="memory_budget_gb"):
        big.fit(train)


def test_predict_maps_one_block_or_a_list_per_size(data):
    """``predict`` writes same-sized maps into one [N, H, W] array (each equal to the
    streamed one) and returns a list, each map at its image's size, when sizes differ."""
    train, test = data
    det = pyad.PaDiM(backbone="resnet18", **SMALL).fit(train)
    streamed = [s.map for s in det.predict_iter(list(test))]
    same = det.predict(list(test))
    assert isinstance(same.maps, np.ndarray) and same.maps.shape == (3, 64, 64)
    for got, want in zip(same.maps, streamed):
        np.testing.assert_array_equal(got, want)
    big = np.repeat(np.repeat(test[0], 2, 0), 2, 1)  # 128 x 128
    mixed = det.predict([test[0], big, test[1]])
    assert isinstance(mixed.maps, list) and [m.shape for m in mixed.maps] == [(64, 64), (128, 128), (64, 64)]
    np.testing.assert_array_equal(mixed.maps[0], streamed[0])
    np.testing.assert_array_equal(mixed.maps[2], streamed[1])
    assert det.predict(list(test), maps="none").maps is None


@pytest.mark.parametrize("name", ["PaDiM", "PatchCore", "SPADE"])
def test_cpu_bfloat16_reduces_the_backbone_only(data, name, monkeypatch):
    """precision="bfloat16" on the CPU: the backbone's convolutions run in bfloat16
    (its taps differ from float32 at bfloat16's resolution), everything after it in
    float32 (heads and maps are float32), and scores stay close to float32's; the
    trained detectors refuse it on the CPU, float16 is refused on the CPU."""
    import torch
    from pyad.backbones import cpu_autocast

    from pyad.backbones import cpu_has_bfloat16

    train, test = data
    kw = dict(backbone="resnet18", **SMALL)
    ref = getattr(pyad, name)(**kw).fit(train)
    with warnings.catch_warnings(record=True) as caught:  # native or not, the results are the same
        warnings.simplefilter("always")
        det = getattr(pyad, name)(precision="bfloat16", **kw).fit(train)
    slow = [w for w in caught if "no native bfloat16" in str(w.message)]
    assert bool(slow) == (not cpu_has_bfloat16()), [str(w.message) for w in caught]
    net = det._network()
    x = det.preprocessing(list(test))
    with torch.inference_mode():
        want = net(x)
        with cpu_autocast(torch.bfloat16):
            got = net(x)
    for k in want:
        assert got[k].dtype == torch.float32
        rel = float((got[k] - want[k]).abs().max() / want[k].abs().max())
        assert 1e-5 < rel < 0.05, (k, rel)  # reduced (not float32), within bfloat16's few significant bits
    a, b = ref.predict(list(test)), det.predict(list(test))
    assert b.maps.dtype == np.float32 and np.isfinite(b.maps).all()
    np.testing.assert_allclose(b.scores, a.scores, rtol=0.05)
    assert not np.array_equal(b.scores, a.scores)  # predict ran the reduced backbone too
    assert np.argmax(b.scores) == np.argmax(a.scores)
    with pytest.raises(ValueError, match="precision"):
        getattr(pyad, name)(precision="float16", **kw).fit(train)
    with pytest.raises(ValueError, match="precision: 'bfloat16' on the CPU"):
        pyad.AutoEncoder(precision="bfloat16", image_size=64).fit(train)
    from pyad import backbones

    monkeypatch.setattr(backbones, "cpu_has_bfloat16", lambda: False)  # a CPU without bfloat16 units
    with pytest.warns(RuntimeWarning, match="precision='bfloat16': this CPU has no native bfloat16"):
        getattr(pyad, name)(precision="bfloat16", **kw)._check_params()
