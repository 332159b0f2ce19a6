"""Exact k-nearest-neighbour search by blocks (pyad.kernels.knn_search): every backend's
block merge equal to the NumPy reference bit for bit (ties, NaN, k beyond the block), the
search equal to the brute force, and clear errors."""

import numpy as np
import pytest
import torch

from pyad import kernels as K
from pyad.kernels import knn as KN
from pyad.kernels import reference as ref


def _merge_blocks(merge, g, norms, k, block):
    n, m = g.shape
    dist, idx = np.full((n, k), np.inf, np.float32), np.full((n, k), -1, np.int64)
    for s in range(0, m, block):
        merge(np.ascontiguousarray(g[:, s : s + block]), norms[s : s + block], s, dist, idx)
    return dist, idx


@pytest.mark.parametrize("k", [1, 2, 9, 40])
@pytest.mark.parametrize("ties", [False, True])
def test_each_backend_merge_equals_the_reference(backend, k, ties):
    rng = np.random.default_rng(k)
    n, m = 37, 29  # a SIMD vector tail in every block
    if ties:  # small integers: many equal values, which go to the held entry, then the lower column
        g = rng.integers(-3, 4, (n, m)).astype(np.float32)
        norms = rng.integers(0, 5, m).astype(np.float32)
    else:
        g, norms = rng.standard_normal((n, m)).astype(np.float32), rng.random(m).astype(np.float32)
    g[3, 5] = np.nan  # never enters
    want = _merge_blocks(ref.knn_merge, g, norms, k, 11)
    got = _merge_blocks(K._backend.current().knn_merge, g, norms, k, 11)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    # the definition: the k smallest of norms - 2g, ties to the lower column; +inf / -1 beyond m
    s = np.where(np.isnan(g), np.inf, norms[None] - np.float32(2) * g)
    order = np.argsort(s, 1, kind="stable")[:, :k]
    kk = min(k, m - 1)  # row 3's NaN is last in the sort and absent from the merge
    np.testing.assert_array_equal(want[1][:, :kk], order[:, :kk])
    assert 5 not in want[1][3]
    if k > m:
        assert (want[1][:, m:] == -1).all() and np.isinf(want[0][:, m:]).all()


@pytest.mark.parametrize("k", [1, 7])
def test_search_equals_the_brute_force(backend, k, monkeypatch):
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((1000, 33)).astype(np.float32)
    q = rng.standard_normal((300, 33)).astype(np.float32)
    q[:3] = bank[[0, 517, 999]]  # exact hits
    monkeypatch.setattr(KN, "QUERY_BLOCK", 128)  # several query and bank blocks, ragged last ones
    monkeypatch.setattr(KN, "BLOCK", 128 * 300)
    dist, idx = K.knn_search(q, bank, k)
    want = ((q[:, None].astype(np.float64) - bank[None]) ** 2).sum(-1)
    order = np.argsort(want, 1, kind="stable")[:, :k]
    assert (idx == order).mean() > 0.999  # float32 near-ties may swap
    np.testing.assert_allclose(dist, np.take_along_axis(want, idx, 1), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(dist, np.take_along_axis(want, order, 1), rtol=1e-4, atol=1e-3)
    assert (idx[:3, 0] == [0, 517, 999]).all()
    assert (np.diff(dist, axis=1) >= 0).all()


def test_search_backends_agree_and_take_torch():
    rng = np.random.default_rng(1)
    bank, q = rng.standard_normal((700, 20)).astype(np.float32), rng.standard_normal((50, 20)).astype(np.float32)
    with K.use_backend("numpy"):
        want = K.knn_search(q, bank, 5)
    got = K.knn_search(torch.from_numpy(q), torch.from_numpy(bank), 5,
                       bank_norms=np.einsum("ij,ij->i", bank, bank))
    assert isinstance(got[0], torch.Tensor) and got[1].dtype == torch.int64
    np.testing.assert_array_equal(got[0].numpy(), want[0])
    np.testing.assert_array_equal(got[1].numpy(), want[1])


def test_bad_input_names_the_argument():
    bank, q = np.zeros((10, 4), np.float32), np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="queries"):
        K.knn_search(np.zeros((3, 5), np.float32), bank)
    with pytest.raises(ValueError, match="k"):
        K.knn_search(q, bank, 11)
    with pytest.raises(ValueError, match="bank_norms"):
        K.knn_search(q, bank, 1, bank_norms=np.zeros(9, np.float32))
    with pytest.raises(ValueError, match="bank"):
        K.knn_search(q, np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="queries"):
        K.knn_search(np.full((3, 4), np.nan, np.float32), bank)
