"""Gaussian fit and Mahalanobis scoring against the NumPy reference and an
independent formulation (inverse covariance, as anomalib computes it)."""

import copy

import numpy as np
import pytest

from pyad import kernels as K
from pyad.kernels import reference


def correlated(rng, n, p, d):
    """Features with strongly correlated channels, like CNN activations."""
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    base = rng.standard_normal((n, p, d)) @ mix + 0.3 * rng.standard_normal((n, p, d))
    return (base + rng.standard_normal((1, p, d))).astype(np.float32)


def inverse_covariance_distance(train, test, eps):
    """sqrt(zᵀ Σ⁻¹ z) with Σ the sample covariance + eps·I, per position (float64)."""
    n, p, d = train.shape
    out = np.empty(test.shape[:2])
    for q in range(p):
        cov = np.cov(train[:, q].astype(np.float64), rowvar=False, ddof=1).reshape(d, d) + eps * np.eye(d)
        z = test[:, q] - train[:, q].astype(np.float64).mean(0)
        out[:, q] = np.sqrt(np.einsum("ni,ij,nj->n", z, np.linalg.inv(cov), z))
    return out


@pytest.mark.parametrize("p,d", [(1, 1), (3, 5), (7, 17), (2, 33)])
def test_fit_matches_sample_covariance(backend, rng, p, d):
    x = correlated(rng, 20, p, d)
    model = K.gaussian_fit(x, eps=0.05)
    np.testing.assert_allclose(model.mean, x.astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    for q in range(p):
        cov = np.cov(x[:, q].astype(np.float64), rowvar=False).reshape(d, d) + 0.05 * np.eye(d)
        np.testing.assert_allclose(model.precision()[q], np.linalg.inv(cov), rtol=1e-4, atol=1e-4)
    assert model.factor.shape == (p, d * (d + 1) // 2)
    assert model.count == 20


def test_streaming_equals_one_shot(rng):
    x = correlated(rng, 23, 9, 12)
    one = K.gaussian_fit(x)
    acc = K.GaussianAccumulator()
    for lo, hi in [(0, 1), (1, 4), (4, 15), (15, 23)]:
        acc.update(x[lo:hi])
    streamed = acc.finalize()
    np.testing.assert_allclose(streamed.mean, one.mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(streamed.factor, one.factor, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,p,d", [(1, 1, 1), (1, 5, 3), (5, 3, 17), (6, 4, 40), (9, 2, 100), (33, 3, 20), (70, 2, 9)])
def test_mahalanobis_matches_reference(backend, rng, n, p, d):
    train = correlated(rng, 3 * d + 5, p, d)
    test = correlated(rng, n, p, d)
    model = K.gaussian_fit(train, eps=0.01)
    got = K.mahalanobis(test, model)
    assert got.dtype == np.float32 and got.shape == (n, p)
    want = reference.mahalanobis(test, model.mean, model.factor)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(got, inverse_covariance_distance(train, test, 0.01), rtol=1e-3)


def test_float16_factor_within_1e3(backend, rng):
    train = correlated(rng, 200, 6, 100)
    test = correlated(rng, 5, 6, 100) + rng.standard_normal((5, 6, 100)).astype(np.float32)
    model = K.gaussian_fit(train)
    half = K.gaussian_fit(train, dtype="float16")
    assert half.factor.dtype == np.float16 and half.factor.nbytes * 2 == model.factor.nbytes
    full = K.mahalanobis(test, model)
    np.testing.assert_allclose(K.mahalanobis(test, half), full, rtol=1e-3)
    np.testing.assert_allclose(
        K.mahalanobis(test, half), reference.mahalanobis(test, half.mean, half.factor), rtol=2e-5
    )


def test_layouts_give_equal_results(rng):
    train = correlated(rng, 30, 4, 6)
    model = K.gaussian_fit(train)
    x = correlated(rng, 3, 4, 6)
    want = K.mahalanobis(x, model)
    fortran = np.asfortranarray(x)
    strided = np.concatenate([x, x], axis=2)[:, :, ::2]
    strided[...] = x
    for variant in (fortran, strided, x.astype(np.float64)):
        np.testing.assert_array_equal(K.mahalanobis(variant, model), want)


def test_torch_cpu_tensors_pass_through(rng):
    torch = pytest.importorskip("torch")
    train = correlated(rng, 30, 4, 6)
    model = K.gaussian_fit(torch.from_numpy(train))
    x = correlated(rng, 3, 4, 6)
    out = K.mahalanobis(torch.from_numpy(x), model)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_array_equal(out.numpy(), K.mahalanobis(x, model))


def test_bad_inputs(rng):
    x = correlated(rng, 10, 4, 6)
    model = K.gaussian_fit(x)
    with pytest.raises(ValueError, match="features"):
        K.mahalanobis(x[0], model)
    with pytest.raises(ValueError, match="features"):
        K.mahalanobis(x[:, :3], model)
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        K.mahalanobis(bad, model)
    with pytest.raises(ValueError, match="fitted"):
        K.mahalanobis(x, "model")
    with pytest.raises(ValueError, match="eps"):
        K.gaussian_fit(x, eps=-1)
    with pytest.raises(ValueError, match="dtype"):
        K.gaussian_fit(x, dtype="int8")
    with pytest.raises(ValueError, match="at least 2"):
        K.gaussian_fit(x[:1])
    with pytest.raises(ValueError, match="batch"):
        K.GaussianAccumulator().update(x).update(x[:, :, :3])
    with pytest.raises(ValueError, match="batch"):
        K.gaussian_fit(np.array([["a"]]))
    with pytest.raises(ValueError, match="positive definite"):
        K.gaussian_fit(np.zeros((3, 2, 2)), eps=0)



def test_merge_equals_a_single_pass_and_keeps_updating(rng):
    """merge (Chan et al.) then further updates: the same model as one pass over
    everything (the shifted-sum invariant survives the merge)."""
    x = (rng.standard_normal((40, 9, 6)) * rng.uniform(0.5, 3, (1, 9, 6)) + 50).astype(np.float32)
    a = K.GaussianAccumulator(0.01).update(x[:11])
    b = K.GaussianAccumulator(0.01).update(x[11:30])
    merged = a.merge(b).update(x[30:]).finalize()
    single = K.gaussian_fit(x, 0.01)
    wide = correlated(rng, 64, 64, 100)  # PaDiM's dimension: a merge then the compiled finalize (C order kept)
    halves = K.GaussianAccumulator(0.01).update(wide[:32]).merge(K.GaussianAccumulator(0.01).update(wide[32:]))
    assert halves._s2.flags.c_contiguous and halves._s1.flags.c_contiguous
    _, held = halves.finalize(holdout=wide[:5])
    np.testing.assert_allclose(held, K.GaussianAccumulator(0.01).update(wide).finalize(holdout=wide[:5])[1], rtol=1e-4)
    np.testing.assert_allclose(merged.mean, single.mean, rtol=1e-6)
    np.testing.assert_allclose(merged.factor, single.factor, rtol=1e-4, atol=1e-6)
    assert merged.count == 40
    with pytest.raises(ValueError, match="other"):
        a.merge(K.GaussianAccumulator(0.01).update(x[:5, :3]))


def test_holdout_distances_equal_a_fit_without_them(backend, rng):
    """finalize(holdout=...): distances under the Gaussians fitted without the held-out
    images (eps·(N-1)/(n-1)), from one factorisation (Woodbury downdate); the compiled
    factorisation (every ISA) and torch's LAPACK path (the numba backend)."""
    x = (rng.standard_normal((30, 7, 5)) * rng.uniform(0.5, 2, (1, 7, 5)) + 3).astype(np.float32)
    model, held = K.GaussianAccumulator(0.01).update(x).finalize(holdout=x[24:])
    np.testing.assert_allclose(model.factor, K.gaussian_fit(x, 0.01).factor, rtol=1e-6)
    direct = K.gaussian_fit(x[:24], 0.01 * 29 / 23)
    np.testing.assert_allclose(held, K.mahalanobis(x[24:], direct), rtol=1e-4)
    with pytest.raises(ValueError, match="holdout"):
        K.GaussianAccumulator(0.01).update(x[:3]).finalize(holdout=x[:2])


def test_compiled_factorisation_equals_lapack(rng):
    """The compiled Cholesky, inverse and held-out downdate (every ISA) against torch's
    LAPACK path, at PaDiM's dimension; a covariance that is not positive definite is
    refused by both."""
    x = correlated(rng, 60, 5, 100)
    with K.use_backend("numba"):  # the same sums for both: only the factorisation differs
        acc = K.GaussianAccumulator(0.01).update(x)
        want, want_held = copy.deepcopy(acc).finalize(holdout=x[:9])
    from pyad.kernels import _backend

    try:
        isas = _backend._core().supported_isas()
    except ImportError:
        pytest.skip("no compiled kernels")
    for isa in isas:
        with K.use_backend("native", isa):
            got, held = copy.deepcopy(acc).finalize(holdout=x[:9])
            np.testing.assert_allclose(got.factor, want.factor, rtol=1e-5, atol=1e-6 * np.abs(want.factor).max())
            np.testing.assert_allclose(held, want_held, rtol=1e-5)
            flat = x.copy()
            flat[:, :, 7] = 1.5  # a constant channel: zero variance, a zero pivot
            with pytest.raises(ValueError, match="positive definite"):
                K.GaussianAccumulator(0.0).update(flat).finalize(holdout=flat[:3])


@pytest.mark.parametrize("n,p,d", [(70, 3, 100), (5, 4, 1), (9, 2, 7), (3, 5, 33)])
def test_compiled_update_equals_float64_sums(rng, n, p, d):
    """The compiled update (every ISA; blocks of 64 images, register blocks of 4 rows that
    overhang d) sums in float64: s1, s2 equal NumPy's float64 sums of the deviations from the
    shift; torch's path (float32 products per batch) agrees to float32 rounding."""
    x = correlated(rng, n, p, d) * 3 + 5
    from pyad.kernels import _backend

    try:
        isas = _backend._core().supported_isas()
    except ImportError:
        pytest.skip("no compiled kernels")
    with K.use_backend("numba"):
        torch_path = K.GaussianAccumulator(0.01).update(x[:2]).update(x[2:])
    for isa in isas:
        with K.use_backend("native", isa):
            acc = K.GaussianAccumulator(0.01).update(x[:2]).update(x[2:])
        y = x.astype(np.float64) - acc._shift  # the shift: a float32 value of the first batch's mean
        rows, cols = np.tril_indices(d)
        np.testing.assert_allclose(acc._s1, y.sum(0), rtol=1e-12, atol=1e-12 * np.abs(y).sum(0).max())
        want = np.einsum("npi,npj->pij", y, y)[:, rows, cols]
        np.testing.assert_allclose(acc._s2, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
        np.testing.assert_allclose(acc._s2, torch_path._s2, rtol=1e-4, atol=1e-5 * np.abs(want).max())
        assert acc.count == torch_path.count == n
