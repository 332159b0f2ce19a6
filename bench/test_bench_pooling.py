"""Patch pooling on Wide-ResNet-50-2's layer-2 and layer-3 maps (batch 8, 224
input) vs the torch formulation anomalib uses (avg_pool2d, then permute to
channels-last), and PatchCore's full per-layer embedding vs the official
code's torch formulation (unfold + adaptive_avg_pool1d).

Targets: native >= 1.5x the reference; numba within 3x of native."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import RESULTS, K, record, save

SHAPES = {"layer2": (8, 512, 28, 28), "layer3": (8, 1024, 14, 14)}


@pytest.fixture(scope="module", params=list(SHAPES))
def fmap(request):
    rng = np.random.default_rng(0)
    return request.param, rng.standard_normal(SHAPES[request.param], dtype=np.float32)


def reference_pool(t: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(t, 3, 1, 1).permute(0, 2, 3, 1).contiguous()


def reference_embed(t: torch.Tensor, d: int = 1024) -> torch.Tensor:
    """patchcore-inspection: PatchMaker.patchify (unfold 3x3, pad 1) + MeanMapper."""
    b, c, h, w = t.shape
    cols = F.unfold(t, 3, padding=1).reshape(b, c * 9, h * w).transpose(1, 2)
    return F.adaptive_avg_pool1d(cols.reshape(-1, 1, c * 9), d).reshape(b, h, w, d)


def test_reference_pool(benchmark, fmap):
    name, x = fmap
    out = record(benchmark, f"pool-{name}", "reference", reference_pool, torch.from_numpy(x), rounds=10)
    np.testing.assert_allclose(out.numpy(), K.patch_pool(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["native", "numba"])
def test_pool(benchmark, fmap, backend):
    name, x = fmap
    with K.use_backend(backend):
        record(benchmark, f"pool-{name}", backend, K.patch_pool, x, rounds=10)


def test_reference_embed(benchmark, fmap):
    name, x = fmap
    out = record(benchmark, f"embed-{name}", "reference", reference_embed, torch.from_numpy(x), rounds=3)
    np.testing.assert_allclose(out.numpy(), K.patch_embed(x, 1024), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["native", "numba"])
def test_embed(benchmark, fmap, backend):
    name, x = fmap
    with K.use_backend(backend):
        record(benchmark, f"embed-{name}", backend, K.patch_embed, x, 1024, rounds=5)


def test_summary():
    rows = {}
    for group, r in RESULTS.items():
        if group.startswith(("pool-", "embed-")) and "reference" in r:
            for key, t in r.items():
                rows[f"{group}/{key}"] = {"ms": t * 1e3, "speedup": r["reference"] / t}
    save("pooling", rows)
    for k, v in rows.items():
        print(k, {kk: round(vv, 2) for kk, vv in v.items()})
    for layer in SHAPES:
        for op in ("pool", "embed"):
            assert rows[f"{op}-{layer}/native"]["speedup"] >= 1.5, (op, layer)
            assert rows[f"{op}-{layer}/numba"]["ms"] <= 3 * rows[f"{op}-{layer}/native"]["ms"], (op, layer)
