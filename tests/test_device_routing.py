"""The CUDA routing of pyad.ops and the frozen detectors, exercised on a CPU-only
machine: with CUDA tensors simulated (the CPU fast path off, ``cuda_path`` on, the
kernels' device check answering "CUDA" for torch tensors) the detectors run the
kernels' torch implementations (``pyad.kernels._torch``, the code CUDA tensors
take) and score as on the fast path. tests/test_cuda.py runs the real thing on a GPU."""

import numpy as np
import pytest
import torch

from pyad import ops
from pyad.kernels import _torch, _validate
from conftest import noisy_images
from test_detectors import CONFIGS, REGISTRY, fit


@pytest.fixture(scope="module")
def data():
    train, test = noisy_images(0, 64, 20, 4, 90, 160, 10)
    test[2:, 20:40, 20:40] = 255
    return train, test


@pytest.fixture
def simulated_cuda(monkeypatch):
    calls = []
    for fn in ("greedy_coreset", "patch_embed", "channel_pool", "mahalanobis"):
        real = getattr(_torch, fn)
        monkeypatch.setattr(_torch, fn, lambda *a, _f=fn, _r=real, **k: (calls.append(_f), _r(*a, **k))[1])

    def on():
        monkeypatch.setattr(ops, "fast_path", lambda x: False)
        monkeypatch.setattr(ops, "cuda_path", lambda x: True)
        monkeypatch.setattr(_validate, "is_cuda", _validate.is_torch)

    return on, calls


@pytest.mark.parametrize("name, kernels", [("patchcore", {"patch_embed", "channel_pool"}), ("padim", {"mahalanobis"})])
def test_inference_takes_the_kernels_device_path(name, kernels, data, simulated_cuda):
    on, calls = simulated_cuda
    det = fit(REGISTRY[name](**CONFIGS[name][0]), data[0])
    want = det.predict(data[1])
    on()
    det.set_params(batch_size=4)  # a fresh inference module
    got = det.predict(data[1])
    assert kernels <= set(calls)
    scale = float(np.abs(want.maps).max())
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(got.maps, want.maps, rtol=1e-4, atol=1e-5 * scale)


def test_patchcore_fit_selects_the_coreset_on_the_device(data, simulated_cuda, monkeypatch):
    on, calls = simulated_cuda
    on()
    det = REGISTRY["patchcore"](**CONFIGS["patchcore"][0])
    monkeypatch.setattr(type(det), "_on_device",
                        lambda self, rows: torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)))
    fit(det, data[0])
    assert "greedy_coreset" in calls
    assert det.memory_bank_.shape == (640, 1024) and det.predict(data[1]).scores[2:].min() > 0


def test_distances_and_blur_stay_float32():
    """The half-precision guard: knn, Mahalanobis and the blur compute in float32."""
    q = torch.randn(5, 8).half()
    bank = torch.randn(20, 8)
    d, i = ops.knn(q, bank, 2)
    assert d.dtype == torch.float32
    want = ((q.float()[:, None] - bank[None]) ** 2).sum(-1).sort(1).values[:, :2]
    torch.testing.assert_close(d, want, rtol=1e-5, atol=1e-5)
    assert ops.gaussian_blur(torch.rand(2, 16, 16).half(), 1.0).dtype == torch.float32
