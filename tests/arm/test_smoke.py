"""The detectors on aarch64 (tests/arm/full.sh runs this under qemu-aarch64): every
registered detector fitted once on a few tiny images with the contract suite's
configuration (tests/test_detectors.py CONFIGS, a new detector is covered there) cut to
one epoch, then predict, the save/load round trip and the exported (pure torch) path
against predict. Emulation is 10-50x slower than the host, so this is the contract
suite's cheapest useful part; the full suite runs on x86 in CI. Skipped elsewhere."""

import platform

import numpy as np
import pytest

if platform.machine().lower() not in ("aarch64", "arm64"):
    pytest.skip("aarch64 only: tests/arm/full.sh runs it under qemu-aarch64", allow_module_level=True)

import pyad  # noqa: E402
from pyad.detectors import REGISTRY  # noqa: E402
from pyad.ops import portable  # noqa: E402
from test_detectors import CONFIGS, contract_data, fit  # noqa: E402  (tests/ is on sys.path: its conftest)

SHORT = {"max_epochs": 1, "max_steps": 2}  # where a configuration trains: the least that exercises training


def short(name: str) -> dict:
    params = dict(CONFIGS[name][0])
    for k, v in SHORT.items():
        if params.get(k) is not None:
            params[k] = v
    return params


@pytest.fixture(scope="module")
def data():
    # the contract suite's 20 training images: fewer leave the supervised classifier's
    # validation share without a defect image, and so without a learnt threshold
    return contract_data()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_fit_predict_save_load_export(name, data, tmp_path):
    train, test = data
    det = fit(REGISTRY[name](**short(name)), train)
    pred = det.predict(test)
    assert pred.scores.dtype == np.float32 and pred.scores.shape == (4,)
    assert pred.maps.dtype == np.float32 and pred.maps.shape == (4, 64, 64)
    assert np.isfinite(pred.scores).all() and np.isfinite(pred.maps).all()
    assert det.threshold_ is not None

    det.save(tmp_path / "m.pyad")
    back = pyad.load(tmp_path / "m.pyad")
    got = back.predict(test)
    np.testing.assert_array_equal(got.scores, pred.scores)
    np.testing.assert_array_equal(got.maps, pred.maps)

    tol = CONFIGS[name][1]  # the pure-torch twins (what ONNX exports) against the fast path
    with portable():
        twin = det.predict(test)
    scale = max(1.0, float(np.abs(pred.maps).max()))
    np.testing.assert_allclose(twin.scores, pred.scores, atol=tol * scale, rtol=tol)
    np.testing.assert_allclose(twin.maps, pred.maps, atol=tol * scale, rtol=tol)
