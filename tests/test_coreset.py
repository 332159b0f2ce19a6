"""Greedy k-center selection: exact parity with the reference, ties, duplicates,
reduced-precision storage, and bad inputs."""

import numpy as np
import pytest

from pyad import kernels as K
from pyad.kernels import reference


def brute_radius(x, idx):
    """Distance of every point to its nearest selected point (float64)."""
    d2 = ((x[:, None, :].astype(np.float64) - x[idx][None].astype(np.float64)) ** 2).sum(-1)
    return np.sqrt(d2.min(1))


def integer_points(rng, m, d, dup=0):
    """Small integer coordinates: every distance is exact in float32, so all
    implementations must agree bit for bit, ties included."""
    x = rng.integers(-3, 4, size=(m, d)).astype(np.float32)
    if dup:
        x[-dup:] = x[:dup]
    return x


@pytest.mark.parametrize("m,d,k", [(1, 1, 1), (7, 3, 7), (50, 5, 20), (300, 17, 300), (40000, 9, 60)])
def test_integer_data_exact(backend, rng, m, d, k):
    x = integer_points(rng, m, d, dup=min(5, m // 3))
    idx, dist = K.greedy_coreset(x, k, start=m // 2, return_distances=True)
    mind = np.full(m, np.inf, np.float32)
    want = reference.greedy_coreset(x, k, m // 2, mind)
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_array_equal(dist, np.sqrt(mind))
    assert len(set(idx.tolist())) == k  # never selected twice
    np.testing.assert_allclose(dist, brute_radius(x, idx), rtol=1e-6)


def test_k_equals_m_is_a_permutation_even_with_duplicates(backend):
    x = np.zeros((64, 4), np.float32)  # all identical: every distance ties at 0
    idx = K.greedy_coreset(x, 64, start=5)
    assert idx[0] == 5
    np.testing.assert_array_equal(np.sort(idx), np.arange(64))
    np.testing.assert_array_equal(idx[1:], [i for i in range(64) if i != 5])  # ties to the lowest index


def test_float_data_matches_reference(backend, rng):
    x = rng.standard_normal((3000, 128)).astype(np.float32)
    idx, dist = K.greedy_coreset(x, 100, return_distances=True)
    mind = np.full(len(x), np.inf, np.float32)
    np.testing.assert_array_equal(idx, reference.greedy_coreset(x, 100, 0, mind))
    np.testing.assert_allclose(dist, np.sqrt(mind), rtol=1e-5)


@pytest.mark.parametrize("storage", ["float16", "int8"])
def test_reduced_storage_matches_reference(backend, rng, storage):
    x = integer_points(rng, 2000, 33)
    idx, dist = K.greedy_coreset(x, 50, storage=storage, return_distances=True)
    with K.use_backend("numpy"):
        ref_idx, ref_dist = K.greedy_coreset(x, 50, storage=storage, return_distances=True)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-6)


def test_reduced_storage_costs_little_coverage(rng):
    x = rng.standard_normal((5000, 64)).astype(np.float32)
    exact = brute_radius(x, K.greedy_coreset(x, 200)).max()
    for storage in ("float16", "int8"):
        radius = brute_radius(x, K.greedy_coreset(x, 200, storage=storage)).max()
        assert radius < exact * 1.05, storage


def test_init_distances_choose_the_first_point(backend, rng):
    x = integer_points(rng, 500, 6)
    init = rng.random(500) * 10
    idx = K.greedy_coreset(x, 30, start=None, init_distances=init)
    assert idx[0] == int(np.argmax(init))
    mind = (init**2).astype(np.float32)
    np.testing.assert_array_equal(idx, reference.greedy_coreset(x, 30, -1, mind))


def test_random_projection(rng):
    x = rng.standard_normal((400, 1024)).astype(np.float32)
    a = K.random_projection(x, 128, seed=3)
    np.testing.assert_array_equal(a, K.random_projection(x, 128, seed=3))
    assert a.shape == (400, 128) and a.dtype == np.float32
    assert not np.array_equal(a, K.random_projection(x, 128, seed=4))
    ratio = np.linalg.norm(a[:200] - a[200:], axis=1) / np.linalg.norm(x[:200] - x[200:], axis=1)
    assert 0.8 < ratio.mean() < 1.2  # Johnson-Lindenstrauss: distances roughly kept


def test_bad_inputs(rng):
    x = rng.standard_normal((20, 4)).astype(np.float32)
    for kwargs, match in [
        (dict(k=0), "k"),
        (dict(k=21), "k"),
        (dict(k=2.5), "k"),
        (dict(k=3, start=20), "start"),
        (dict(k=3, start=None), "start"),
        (dict(k=3, storage="bf16"), "storage"),
        (dict(k=3, init_distances=np.ones(3)), "init_distances"),
        (dict(k=3, init_distances=-np.ones(20)), "init_distances"),
    ]:
        with pytest.raises(ValueError, match=match):
            K.greedy_coreset(x, **kwargs)
    with pytest.raises(ValueError, match="features"):
        K.greedy_coreset(x[0], 1)
    bad = x.copy()
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        K.greedy_coreset(bad, 2)
    with pytest.raises(ValueError, match="float16 range"):
        K.greedy_coreset(x * 1e6, 2, storage="float16")
    with pytest.raises(ValueError, match="dim"):
        K.random_projection(x, 0)
