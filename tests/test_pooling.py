"""Patch pooling, channel pooling and PatchCore's embedding against torch, an
independent reference for every semantic (padding, bins, layout)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyad import kernels as K

GEOMETRIES = [(3, 1, 1), (3, 2, 1), (3, 1, 0), (5, 1, 2), (5, 3, 1), (1, 1, 0), (7, 2, 3), (2, 2, 1)]


def torch_pool(x, k, s, p, mode):
    t = torch.from_numpy(x)
    parts = []
    if mode in ("avg", "avgmax"):
        parts.append(F.avg_pool2d(t, k, s, p))
    if mode in ("max", "avgmax"):
        parts.append(F.max_pool2d(t, k, s, p))
    return torch.cat(parts, 1).permute(0, 2, 3, 1).numpy()


def torch_channel_pool(x, d):
    t = torch.from_numpy(np.ascontiguousarray(x))
    return F.adaptive_avg_pool1d(t.reshape(-1, 1, t.shape[-1]), d).reshape(*t.shape[:-1], d).numpy()


def official_patchcore_layer(x, d, k=3, s=1, p=1):
    """patchcore-inspection's PatchMaker.patchify + MeanMapper, in torch."""
    t = torch.from_numpy(x)
    b = t.shape[0]
    cols = F.unfold(t, k, padding=p, stride=s)  # [B, C*k*k, L]
    ho = (t.shape[2] + 2 * p - k) // s + 1
    wo = (t.shape[3] + 2 * p - k) // s + 1
    patches = cols.reshape(b, t.shape[1], k, k, -1).permute(0, 4, 1, 2, 3)  # [B, L, C, k, k]
    flat = patches.reshape(-1, 1, t.shape[1] * k * k)
    return F.adaptive_avg_pool1d(flat, d).reshape(b, ho, wo, d).numpy()


@pytest.mark.parametrize("k,s,p", GEOMETRIES)
@pytest.mark.parametrize("mode", ["avg", "max", "avgmax"])
def test_patch_pool_matches_torch(backend, rng, k, s, p, mode):
    x = rng.standard_normal((2, 5, 11, 9)).astype(np.float32)
    got = K.patch_pool(x, k, s, p, mode)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(got, torch_pool(x, k, s, p, mode), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("l,d", [(1, 1), (7, 3), (3, 7), (4608, 1024), (2048, 1024), (100, 100), (33, 16)])
def test_channel_pool_matches_torch(backend, rng, l, d):
    x = rng.standard_normal((6, l)).astype(np.float32)
    np.testing.assert_allclose(K.channel_pool(x, d), torch_channel_pool(x, d), rtol=1e-5, atol=1e-6)


def test_channel_pool_keeps_leading_axes(rng):
    x = rng.standard_normal((2, 3, 4, 10)).astype(np.float32)
    assert K.channel_pool(x, 4).shape == (2, 3, 4, 4)
    np.testing.assert_allclose(K.channel_pool(x, 4), torch_channel_pool(x, 4), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "c,d,k,s,p",
    [(512, 1024, 3, 1, 1), (64, 1024, 3, 1, 1), (1024, 1024, 3, 1, 1), (7, 10, 3, 1, 1), (5, 8, 5, 2, 2), (3, 4, 1, 1, 0)],
)
def test_patch_embed_is_official_patchcore_embedding(backend, rng, c, d, k, s, p):
    x = rng.standard_normal((2, c, 6, 5)).astype(np.float32)
    got = K.patch_embed(x, d, k, s, p, mode="unfold")
    np.testing.assert_allclose(got, official_patchcore_layer(x, d, k, s, p), rtol=1e-5, atol=1e-6)


def test_unfold_equals_avg_pool_only_when_bins_align(rng):
    x = rng.standard_normal((1, 1024, 5, 5)).astype(np.float32)  # 1024*9 / 1024 = 9 per bin: aligned
    np.testing.assert_allclose(K.patch_embed(x, 1024), K.patch_pool(x), rtol=1e-5, atol=1e-6)
    y = rng.standard_normal((1, 512, 5, 5)).astype(np.float32)  # 4.5 per bin: WRN50 layer 2
    assert not np.allclose(K.patch_embed(y, 1024), K.channel_pool(K.patch_pool(y), 1024), atol=1e-3)


@pytest.mark.parametrize("mode", ["avg", "max", "avgmax"])
@pytest.mark.parametrize("d", [3, 16, 40])
def test_patch_embed_pooled_modes_are_fused_pool_then_reduce(backend, rng, mode, d):
    x = rng.standard_normal((3, 16, 7, 8)).astype(np.float32)
    want = torch_channel_pool(torch_pool(x, 3, 1, 1, mode), d)
    np.testing.assert_allclose(K.patch_embed(x, d, mode=mode), want, rtol=1e-5, atol=1e-6)


def test_layouts_give_equal_results(rng):
    x = rng.standard_normal((2, 6, 8, 8)).astype(np.float32)
    want = K.patch_pool(x)
    nhwc_view = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    for variant in (nhwc_view, np.asfortranarray(x), x.astype(np.float64), torch.from_numpy(x)):
        np.testing.assert_array_equal(np.asarray(K.patch_pool(variant)), want)


def test_bad_inputs(rng):
    x = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
    cases = [
        (lambda: K.patch_pool(x[0]), "fmap"),
        (lambda: K.patch_pool(x, padding=2), "padding"),
        (lambda: K.patch_pool(x, kernel=0), "kernel"),
        (lambda: K.patch_pool(x, stride=0), "stride"),
        (lambda: K.patch_pool(x, kernel=7, padding=1), "fmap"),
        (lambda: K.patch_pool(x, mode="sum"), "mode"),
        (lambda: K.patch_pool(x, mode="unfold"), "mode"),
        (lambda: K.patch_embed(x, 0), "out_dim"),
        (lambda: K.channel_pool(x, -1), "out_dim"),
        (lambda: K.patch_pool(np.full_like(x, np.nan)), "NaN"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
