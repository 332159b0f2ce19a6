"""The contract every detector in the registry follows, on tiny networks (fixed
seed, small images, a few training steps). A new detector adds one line to CONFIGS."""

import copy
import pickle
import threading

import numpy as np
import pytest
from PIL import Image

import pyad
from pyad.detectors import REGISTRY, NotFittedError
from pyad.ops import portable
from conftest import noisy_images

SMALL = dict(image_size=64, batch_size=4)
FROZEN = dict(weights=None, **SMALL)
CONFIGS = {  # name -> (parameters, atol of the exported (portable) path vs predict)
    "patchcore": (dict(backbone="resnet18", coreset_ratio=0.5, **FROZEN), 1e-4),
    "padim": (dict(backbone="resnet18", **FROZEN), 1e-4),
    "spade": (dict(backbone="resnet18", k_images=4, **FROZEN), 1e-4),
    "autoencoder": (dict(max_epochs=2, **SMALL), 1e-6),
    "efficientad": (dict(teacher="random", max_steps=4, **SMALL), 1e-6),
    # GANomaly's predict runs its weight-bound layers as GEMMs (ops.conv): its raw latent distances
    # agree with the exported path's to 4e-7 (float32 rounding), which the min-max scale magnifies
    # 2,000-fold here (these networks' validation distances span 0.05% of their value)
    "ganomaly": (dict(latent_dim=16, ngf=8, ndf=8, max_epochs=2, **SMALL), 1e-3),
    "simplenet": (dict(backbone="resnet18", crop_size=None, embed_dim=64, target_dim=64, dsc_hidden=32, max_epochs=4,
                       **FROZEN), 1e-4),
    "ast": (dict(backbone="resnet18", layers=("layer2",), teacher_hidden=16, student_hidden=16, student_blocks=1,
                 pos_enc_dim=8, max_epochs=3, **FROZEN), 1e-5),
    "efficientad_ast": (dict(backbone="resnet18", layers=("layer2",), teacher_hidden=16, student_hidden=16,
                             student_blocks=1, pos_enc_dim=8, ae_width=8, teacher_epochs=2, max_epochs=2, **FROZEN),
                        1e-5),
    "uninformed_students": (dict(teachers="random", patch_sizes=(17, 33), n_students=2, width=4, dim=8, max_epochs=2,
                                 **SMALL), 1e-5),
    "vae": (dict(max_epochs=2, latent_dim=16, widths=(8, 16, 16, 16), **SMALL), 1e-5),
    "classifier": (dict(backbone="resnet18", weights=None, unfreeze="all", augment=False, max_epochs=4, lr=1e-3,
                        **SMALL), 1e-5),
}
NEEDS_LABELS = {"classifier"}  # supervised: fit gets labelled images (see labelled)


def labelled(name, images):
    """(images, fit keywords): a detector in NEEDS_LABELS learns from the images with
    the test images' bright defect painted into every other one, labelled "defect"."""
    if name not in NEEDS_LABELS:
        return images, {}
    images = np.array(images, copy=True)
    images[1::2, 20:40, 20:40] = 255
    return images, {"labels": ["good" if i % 2 == 0 else "defect" for i in range(len(images))]}


def fit(det, images, **kw):
    images, extra = labelled(det.name, images)
    return det.fit(images, **extra, **kw)


def test_every_registered_detector_is_covered():
    assert set(REGISTRY) == set(CONFIGS)


@pytest.fixture(params=sorted(CONFIGS))
def make(request):
    name = request.param
    return lambda **kw: REGISTRY[name](**{**CONFIGS[name][0], **kw})


def contract_data():
    """(train, test): 20 normal images and 4 test images, a bright defect in the last two."""
    train, test = noisy_images(0, 64, 20, 4, 90, 160, 10)
    test[2:, 20:40, 20:40] = 255
    return train, test


_FITTED: dict = {}


def fitted_detector(name, put=None):
    """One fitted detector per registry entry (CONFIGS, seed 0, on contract_data()'s
    training images), shared by the read-only tests of this file and of test_export
    (fitting is most of the suite's time); test_fit_returns_self_and_predict_shapes,
    which runs first, puts its detector here. Tests that change it restore it."""
    if put is not None:
        _FITTED[name] = put
    if name not in _FITTED:
        _FITTED[name] = fit(REGISTRY[name](**CONFIGS[name][0]), contract_data()[0])
    return _FITTED[name]


@pytest.fixture(scope="module")
def data():
    return contract_data()


@pytest.fixture(scope="module")
def fitted():
    return fitted_detector


@pytest.fixture
def det(make, fitted):
    return fitted(make().name)


def test_fit_returns_self_and_predict_shapes(make, data, fitted):
    train, test = data
    d = make()
    assert fit(d, train) is d
    fitted(d.name, put=d)
    pred = d.predict(test)
    assert pred.scores.dtype == np.float32 and pred.scores.shape == (4,)
    assert pred.maps.dtype == np.float32 and pred.maps.shape == (4, 64, 64)
    assert pred.labels.dtype == bool and pred.labels.shape == (4,)
    assert d.threshold_ is not None and d.pixel_threshold_ is not None
    assert "validation images" in d.threshold_rule_
    assert pred.scores[2:].min() > pred.scores[:2].max()  # the defect scores higher


def test_repr_shows_changed_parameters(make):
    text = repr(make(seed=5))
    assert text.startswith(type(make()).__name__ + "(") and "seed=5" in text


def test_params_round_trip_and_unknown_parameters(make):
    d = make()
    assert type(d)(**d.get_params()).get_params() == d.get_params()
    with pytest.raises(TypeError, match="unexpected parameters"):
        make(no_such_parameter=1)
    with pytest.raises(ValueError, match="no_such_parameter"):
        d.set_params(no_such_parameter=1)


def test_set_params_on_a_fitted_detector_refuses_what_would_go_stale(det):
    with pytest.raises(ValueError, match="image_size: cannot change on a fitted"):
        det.set_params(image_size=96)
    det.set_params(batch_size=3)  # runtime parameters may change
    det.set_params(batch_size=4)
    fresh = pyad.clone(det, image_size=96)
    assert not fresh.is_fitted() and fresh.image_size == 96


def test_maps_follow_each_image_resolution(det):
    rng = np.random.default_rng(1)
    odd = [rng.integers(0, 255, (50, 70, 3), dtype=np.uint8), rng.integers(0, 255, (64, 64), dtype=np.uint8)]
    pred = det.predict(odd)
    assert [m.shape for m in pred.maps] == [(50, 70), (64, 64)]
    assert det.predict(odd, maps="low").maps.shape == (2, 64, 64)
    assert det.predict(odd, maps="none").maps is None


def test_predict_before_fit_raises(make, data):
    with pytest.raises(NotFittedError, match="not fitted"):
        make().predict(data[1])


def test_seed_determinism(make, data, fitted):
    train, test = data
    a = fit(make(seed=0), train).predict(test)
    b = fitted(make().name).predict(test)  # another fit with the same seed
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.maps, b.maps)


def test_exported_path_equals_predict(det, data):
    """The pure-torch twins (what torch.export / ONNX run) against the CPU fast path
    (compiled kernels, faiss): same scores and maps within the stated tolerance."""
    tol = CONFIGS[det.name][1]
    want = det.predict(data[1])
    with portable():
        got = det.predict(data[1])
    scale = max(1.0, float(np.abs(want.maps).max()))
    np.testing.assert_allclose(got.scores, want.scores, atol=tol * scale, rtol=tol)
    np.testing.assert_allclose(got.maps, want.maps, atol=tol * scale, rtol=tol)
    assert np.argmax(got.maps[3]) == np.argmax(want.maps[3])


def test_batch_invariance(det, data):
    """Image i scored alone equals image i scored in a batch (no batch statistics)."""
    test = data[1]
    together = det.predict(test)
    scale = float(np.abs(together.maps).max())
    for i in range(len(test)):  # float rounding only (GEMM blocking varies with the batch)
        alone = det.predict(test[i : i + 1])
        np.testing.assert_allclose(alone.scores, together.scores[i : i + 1], rtol=1e-4, atol=1e-6 * scale)
        np.testing.assert_allclose(alone.maps[0], together.maps[i], rtol=1e-4, atol=1e-5 * scale)


def test_save_load_round_trip(det, data, tmp_path):
    test = data[1]
    want = det.predict(test)
    det.save(tmp_path / "m.pyad")
    back = pyad.load(tmp_path / "m.pyad")
    assert back.get_params() == det.get_params()
    assert back.threshold_ == det.threshold_ and back.pixel_threshold_ == det.pixel_threshold_
    got = back.predict(test)
    np.testing.assert_array_equal(got.scores, want.scores)
    np.testing.assert_array_equal(got.maps, want.maps)
    np.testing.assert_array_equal(got.labels, want.labels)


def test_pickle_and_deepcopy(det, data):
    want = det.predict(data[1]).scores
    for other in (pickle.loads(pickle.dumps(det)), copy.deepcopy(det)):
        np.testing.assert_array_equal(other.predict(data[1]).scores, want)
    pickle.dumps(type(det)(**det.get_params()))  # unfitted too


def test_altered_or_truncated_model_files_are_refused(det, tmp_path):
    path = tmp_path / "m.pyad"
    det.save(path)
    raw = path.read_bytes()
    (tmp_path / "cut.pyad").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated"):
        pyad.load(tmp_path / "cut.pyad")
    i = raw.index(b"threshold_rule")  # flip one byte inside meta.json: the zip CRC catches it
    (tmp_path / "bad.pyad").write_bytes(raw[:i] + b"T" + raw[i + 1 :])
    with pytest.raises(ValueError, match="corrupt"):
        pyad.load(tmp_path / "bad.pyad")
    import zipfile  # a consistent zip with an edited member: the SHA256 catches it

    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp_path / "edit.pyad", "w") as dst:
        for name in src.namelist():
            body = src.read(name)
            dst.writestr(name, body.replace(b'"n_train_": 20', b'"n_train_": 21') if name == "meta.json" else body)
    with pytest.raises(ValueError, match="checksum"):
        pyad.load(tmp_path / "edit.pyad")


def test_concurrent_predict_matches_serial(det, data, tmp_path):
    test = data[1]
    det.save(tmp_path / "m.pyad")
    loaded = pyad.load(tmp_path / "m.pyad")  # networks and modules built lazily, under concurrency
    results = [None] * 8

    def work(i):
        results[i] = loaded.predict(test)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    serial = loaded.predict(test)
    for r in results:
        np.testing.assert_array_equal(r.scores, serial.scores)
        np.testing.assert_array_equal(r.maps, serial.maps)


def test_folder_input_and_bad_files(make, data, fitted, tmp_path):
    train, test = data
    images, kw = labelled(make().name, train)
    good = tmp_path / "good"
    good.mkdir()
    for i, a in enumerate(images):
        Image.fromarray(a).save(good / f"{i:03d}.png")
    d = make().fit(good, **kw)
    np.testing.assert_allclose(d.predict(test).scores, fitted(d.name).predict(test).scores, rtol=1e-5, atol=1e-6)
    one = good / "000.png"
    assert d.predict(one).scores.shape == (1,)  # a single path works
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        make().fit(tmp_path / "empty")
    (good / "zzz.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read .*zzz.png"):
        make().fit(good, **labelled(make().name, np.concatenate([train, train[:1]]))[1])
    pred = d.predict([one, good / "zzz.png", good / "001.png"], on_error="skip")
    assert pred.scores.shape == (2,) and [str(p).endswith(n) for p, n in zip(pred.paths, ("000.png", "001.png"))]
    assert len(pred.skipped) == 1 and pred.skipped[0][0].endswith("zzz.png") and "cannot read" in pred.skipped[0][1]


def test_bad_arrays_and_parameters(make, data, fitted):
    train, test = data
    with pytest.raises(ValueError, match="channels"):
        fit(make(), np.zeros((4, 32, 32, 4), np.uint8))
    nan = test.astype(np.float32) / 255
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fitted(make().name).predict(nan)
    with pytest.raises(ValueError, match="image_size"):
        fit(make(image_size=8), train)
    with pytest.raises(ValueError, match="batch_size"):
        make(batch_size="abc").fit(train)
    with pytest.raises(ValueError, match="at least 2"):
        fit(make(), train[:1])


def test_calibrate_sets_an_f1_optimal_threshold(det, data):
    test = data[1]
    old = det.threshold_, det.pixel_threshold_, det.threshold_rule_
    try:
        det.calibrate(test, [0, 0, 1, 1])
        assert "F1-optimal" in det.threshold_rule_
        np.testing.assert_array_equal(det.predict(test).labels, [False, False, True, True])
    finally:
        det.threshold_, det.pixel_threshold_, det.threshold_rule_ = old


def test_float_nchw_batches_equal_uint8(det, data):
    test = data[1]
    as_float = test.transpose(0, 3, 1, 2).astype(np.float32) / 255
    np.testing.assert_allclose(det.predict(as_float).scores, det.predict(test).scores, rtol=1e-6, atol=1e-7)


def test_bgr_arrays(det, data):
    test = data[1]
    np.testing.assert_array_equal(det.predict(test[..., ::-1].copy(), channel_order="bgr").scores,
                                  det.predict(test).scores)


def test_masks_agree_with_labels(det, data):
    """Empty masks for images labelled normal, non-empty ones for images labelled
    anomalous; few validation-like normal pixels are marked."""
    pred = det.predict(data[1])
    masks = pred.masks()
    for m, lab in zip(masks, pred.labels):
        assert m.any() == bool(lab)
    assert pred.labels[2:].all()


def test_fit_never_reads_test_images(make, data, tmp_path, monkeypatch):
    """fit(dataset) reads the training images only (the validation split comes
    from them); a test image opened during fit fails the test."""
    from pyad import datasets

    train, test = data
    images, kw = labelled(make().name, train)
    root = tmp_path / "cat"
    for sub, imgs in (("train/good", images), ("test/good", test[:2]), ("test/defect", test[2:])):
        (root / sub).mkdir(parents=True)
        for i, a in enumerate(imgs):
            Image.fromarray(a).save(root / sub / f"{i:03d}.png")
    ds = datasets.folder(root / "train/good", root / "test")
    import pyad.images as imgs_mod

    real = imgs_mod.open_image

    def guarded(path, *a, **kw):
        assert "test" not in str(path).split("cat", 1)[1], f"fit read a test image: {path}"
        return real(path, *a, **kw)

    monkeypatch.setattr(imgs_mod, "open_image", guarded)
    d = make().fit(ds, **kw)
    assert d.n_train_ == len(train)


def test_unsupervised_detectors_refuse_anomalous_labels(make, data):
    labels = np.zeros(len(data[0]), int)
    labels[0] = 1
    if make().name == "classifier":
        pytest.skip("supervised")
    with pytest.raises(ValueError, match="normal images only"):
        make().fit(data[0], labels=labels)


def test_explicit_validation_images(make, data):
    train, _ = data
    d = fit(make(), train[:14], validation=train[14:])
    assert d.n_train_ == 14 and "6 normal validation images" in d.threshold_rule_


def test_too_few_images_for_validation_says_what_to_do(make, data):
    d = fit(make(validation=0.05), data[0][:6])
    assert d.threshold_ is None and "no validation images" in d.threshold_rule_
    assert "calibrate" in d.threshold_rule_
