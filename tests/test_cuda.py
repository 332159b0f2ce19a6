"""The torch CUDA path against the CPU kernels (runs only where a GPU is present)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

from pyad import kernels as K  # noqa: E402


def test_mahalanobis_cuda(rng):
    x = rng.standard_normal((40, 30, 16)).astype(np.float32)
    model = K.gaussian_fit(x[:32])
    got = K.mahalanobis(torch.from_numpy(x[32:]).cuda(), model)
    assert got.is_cuda
    np.testing.assert_allclose(got.cpu().numpy(), K.mahalanobis(x[32:], model), rtol=1e-4, atol=1e-4)


def test_coreset_cuda(rng):
    x = rng.integers(-3, 4, size=(3000, 12)).astype(np.float32)
    idx, dist = K.greedy_coreset(torch.from_numpy(x).cuda(), 100, return_distances=True)
    want, wdist = K.greedy_coreset(x, 100, return_distances=True)
    np.testing.assert_array_equal(idx.cpu().numpy(), want)
    np.testing.assert_allclose(dist.cpu().numpy(), wdist, rtol=1e-6)


@pytest.mark.parametrize("mode", ["avg", "max", "avgmax"])
def test_pooling_cuda(rng, mode):
    x = rng.standard_normal((2, 512, 9, 9)).astype(np.float32)
    t = torch.from_numpy(x).cuda()
    np.testing.assert_allclose(K.patch_pool(t, mode=mode).cpu().numpy(), K.patch_pool(x, mode=mode), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(K.patch_embed(t, 1024).cpu().numpy(), K.patch_embed(x, 1024), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(K.patch_embed(t, 100, mode=mode).cpu().numpy(), K.patch_embed(x, 100, mode=mode), rtol=1e-5, atol=1e-6)
