"""The contract every detector in the registry follows, on small random-init
backbones (fixed seed)."""

import threading

import numpy as np
import pytest
from PIL import Image

import pyad
from pyad.detectors import REGISTRY, NotFittedError
from conftest import noisy_images

SMALL = dict(weights=None, image_size=64, crop_size=None, batch_size=4)
CONFIGS = {
    "PatchCore": dict(backbone="resnet18", coreset_ratio=0.5, **SMALL),
    "PaDiM": dict(backbone="resnet18", **SMALL),
    "SPADE": dict(backbone="resnet18", k_images=4, **SMALL),
}


def test_every_registered_detector_is_covered():
    assert set(REGISTRY) == set(CONFIGS)


@pytest.fixture(params=sorted(CONFIGS))
def make(request):
    return lambda **kw: REGISTRY[request.param](**{**CONFIGS[request.param], **kw})


@pytest.fixture(scope="module")
def data():
    train, test = noisy_images(0, 64, 14, 4, 90, 160, 10)
    test[2:, 20:40, 20:40] = 255  # a bright defect in the last two
    return train, test


def test_fit_returns_self_and_predict_shapes(make, data):
    train, test = data
    det = make()
    assert det.fit(train) is det
    pred = det.predict(test)
    assert pred.scores.dtype == np.float32 and pred.scores.shape == (4,)
    assert pred.maps.dtype == np.float32 and pred.maps.shape == (4, 64, 64)
    assert pred.labels.dtype == bool and pred.labels.shape == (4,)
    assert det.threshold_ is not None and "held-out" in det.threshold_rule_
    assert pred.scores[2:].min() > pred.scores[:2].max()  # the defect scores higher


def test_maps_follow_each_image_resolution(make, data):
    train, _ = data
    det = make().fit(train)
    rng = np.random.default_rng(1)
    odd = [rng.integers(0, 255, (50, 70, 3), dtype=np.uint8), rng.integers(0, 255, (64, 64), dtype=np.uint8)]
    pred = det.predict(odd)
    assert [m.shape for m in pred.maps] == [(50, 70), (64, 64)]


def test_predict_before_fit_raises(make, data):
    with pytest.raises(NotFittedError, match="not fitted"):
        make().predict(data[1])


def test_seed_determinism(make, data):
    train, test = data
    a = make(seed=3).fit(train).predict(test)
    b = make(seed=3).fit(train).predict(test)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.maps, b.maps)


def test_save_load_round_trip(make, data, tmp_path):
    train, test = data
    det = make().fit(train)
    want = det.predict(test)
    det.save(tmp_path / "m.pyad")
    back = pyad.load(tmp_path / "m.pyad")
    assert back.get_params() == det.get_params()
    got = back.predict(test)
    np.testing.assert_array_equal(got.scores, want.scores)
    np.testing.assert_array_equal(got.maps, want.maps)
    np.testing.assert_array_equal(got.labels, want.labels)


def test_altered_or_truncated_model_files_are_refused(make, data, tmp_path):
    det = make().fit(data[0])
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
            data = src.read(name)
            dst.writestr(name, data.replace(b'"n_train": 14', b'"n_train": 15') if name == "meta.json" else data)
    with pytest.raises(ValueError, match="checksum"):
        pyad.load(tmp_path / "edit.pyad")


def test_concurrent_predict_matches_serial(make, data, tmp_path):
    train, test = data
    make().fit(train).save(tmp_path / "m.pyad")
    det = pyad.load(tmp_path / "m.pyad")  # backbone built lazily, under concurrency
    results = [None] * 8

    def work(i):
        results[i] = det.predict(test)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    serial = det.predict(test)
    for r in results:
        np.testing.assert_array_equal(r.scores, serial.scores)
        np.testing.assert_array_equal(r.maps, serial.maps)


def test_folder_input_and_bad_files(make, data, tmp_path):
    train, test = data
    good = tmp_path / "good"
    good.mkdir()
    for i, a in enumerate(train):
        Image.fromarray(a).save(good / f"{i:03d}.png")
    det = make().fit(good)
    np.testing.assert_allclose(det.predict(test).scores, make().fit(train).predict(test).scores, rtol=1e-5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        make().fit(tmp_path / "empty")
    (good / "zzz.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read .*zzz.png"):
        make().fit(good)


def test_bad_arrays(make, data):
    train, test = data
    with pytest.raises(ValueError, match="channels"):
        make().fit(np.zeros((4, 32, 32, 4), np.uint8))
    nan = test.astype(np.float32) / 255
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        make().fit(train).predict(nan)
    with pytest.raises(ValueError, match="image_size"):
        make(image_size=8).fit(train)
    with pytest.raises(ValueError, match="at least 2"):
        make(threshold_holdout=0).fit(train[:1])


def test_calibrate_sets_an_f1_optimal_threshold(make, data):
    train, test = data
    det = make().fit(train).calibrate(test, [0, 0, 1, 1])
    assert "F1-optimal" in det.threshold_rule_
    np.testing.assert_array_equal(det.predict(test).labels, [False, False, True, True])


def test_float_nchw_batches_equal_uint8(make, data):
    train, test = data
    det = make().fit(train)
    as_float = test.transpose(0, 3, 1, 2).astype(np.float32) / 255
    np.testing.assert_allclose(det.predict(as_float).scores, det.predict(test).scores, rtol=1e-6)
