"""Mahalanobis scoring: pyad's packed-factor kernel vs anomalib 2.x's formula
(full inverse covariance, one matmul per position) on PaDiM's shapes.

Targets (README): WRN50 N=1 native >= 5x the reference in float32 and >= 10x
in float16, each within 1.5x of its memory-bandwidth bound; numba within 3x
of native."""

import numpy as np
import pytest
import torch

from conftest import RESULTS, K, record, save

P = 3136  # 56 x 56 grid (PaDiM at 224 input, layer 1 resolution)
SHAPES = {"r18-n1": (1, 100), "r18-n32": (32, 100), "wrn50-n1": (1, 550)}


def synthetic_model(d: int, seed: int = 0) -> K.GaussianModel:
    """A valid model at full size without the fit: A lower-triangular with a
    positive diagonal (the kernel's cost does not depend on the values)."""
    rng = np.random.default_rng(seed)
    tri = d * (d + 1) // 2
    factor = (rng.standard_normal((P, tri), dtype=np.float32) / np.sqrt(d)).astype(np.float32)
    diag = np.arange(1, d + 1).cumsum() - 1
    factor[:, diag] = np.abs(factor[:, diag]) + 1
    mean = rng.standard_normal((P, d), dtype=np.float32)
    return K.GaussianModel(mean, factor, 0.01, 100)


def anomalib_reference(embedding: torch.Tensor, mean: torch.Tensor, inv_covariance: torch.Tensor) -> torch.Tensor:
    """anomalib.models.image.padim.anomaly_map.AnomalyMapGenerator.compute_distance
    (embedding [B, C, H*W], mean [C, H*W], inv_covariance [H*W, C, C])."""
    delta = (embedding - mean).permute(2, 0, 1)
    distances = (torch.matmul(delta, inv_covariance) * delta).sum(2).permute(1, 0)
    return distances.clamp(0).sqrt()


@pytest.fixture(scope="module", params=list(SHAPES), ids=list(SHAPES))
def case(request):
    n, d = SHAPES[request.param]
    model = synthetic_model(d)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, P, d), dtype=np.float32)
    yield request.param, x, model
    model._device_cache.clear()


def test_reference(benchmark, case):
    name, x, model = case
    a = torch.from_numpy(model.inverse_factor().astype(np.float32))
    inv = a.transpose(1, 2) @ a  # Σ⁻¹ = AᵀA, dense, as anomalib stores it
    del a
    emb = torch.from_numpy(x).permute(0, 2, 1).contiguous()
    mean = torch.from_numpy(model.mean).T.contiguous()
    out = record(benchmark, name, "reference", anomalib_reference, emb, mean, inv)
    np.testing.assert_allclose(out.numpy(), K.mahalanobis(x, model), rtol=1e-3)


@pytest.mark.parametrize("backend", ["native", "numba"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_pyad(benchmark, case, backend, dtype):
    name, x, model = case
    model = model.astype(dtype)
    with K.use_backend(backend):
        out = record(benchmark, name, f"{backend}-{dtype}", K.mahalanobis, x, model)
    np.testing.assert_allclose(out, K.mahalanobis(x, model.astype("float32")), rtol=1e-3)


def test_summary(bounds):
    """Ratios to the reference and to the bandwidth bound; checks the targets."""
    rows = {}
    for name, (n, d) in SHAPES.items():
        r = RESULTS.get(name, {})
        if "reference" not in r:
            continue
        tri = d * (d + 1) // 2
        for key, t in r.items():
            if key == "reference":
                continue
            nbytes = P * tri * (2 if key.endswith("16") else 4)
            bound = nbytes / (bounds["read_bandwidth_GBps"] * 1e9)
            rows[f"{name}/{key}"] = {
                "ms": t * 1e3,
                "speedup": r["reference"] / t,
                "bandwidth_bound_ms": bound * 1e3,
                "x_bound": t / bound,
            }
        rows[f"{name}/reference"] = {"ms": r["reference"] * 1e3}
    targets = []  # (what, value, limit, met)
    w = {k.split("/")[1]: v for k, v in rows.items() if k.startswith("wrn50-n1/")}
    if w:
        targets += [
            ("wrn50 native-float32 speedup >= 5", w["native-float32"]["speedup"], 5, w["native-float32"]["speedup"] >= 5),
            ("wrn50 native-float16 speedup >= 10", w["native-float16"]["speedup"], 10, w["native-float16"]["speedup"] >= 10),
            ("wrn50 native-float32 x_bound <= 1.5", w["native-float32"]["x_bound"], 1.5, w["native-float32"]["x_bound"] <= 1.5),
            ("wrn50 native-float16 x_bound <= 1.5", w["native-float16"]["x_bound"], 1.5, w["native-float16"]["x_bound"] <= 1.5),
        ]
    for name in SHAPES:
        for dt in ("float32", "float16"):
            if f"{name}/numba-{dt}" in rows:
                ratio = rows[f"{name}/numba-{dt}"]["ms"] / rows[f"{name}/native-{dt}"]["ms"]
                targets.append((f"{name} numba-{dt} / native <= 3", ratio, 3, ratio <= 3))
    save("mahalanobis", {"bounds": bounds, "rows": rows, "targets": targets})
    for k, v in rows.items():
        print(k, {kk: round(vv, 2) for kk, vv in v.items()})
    for what, value, _, met in targets:
        print(f"{'met ' if met else 'MISS'} {what}: {value:.2f}")
    missed = [t[0] for t in targets if not t[3]]
    assert not missed, missed
