"""Each detector against a small independent implementation of its paper /
official code, on the same random-init backbone: scores agree to 1e-4."""

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyad.backbones import Backbone
from pyad.detectors import PaDiM, PatchCore, SPADE
from pyad.images import Preprocess
from pyad.ops import gaussian_blur, upsample
from conftest import noisy_images

scipy_ndimage = pytest.importorskip("scipy.ndimage")

COMMON = dict(weights=None, image_size=64, crop_size=56, batch_size=5, validation=0)


@pytest.fixture(scope="module")
def data():
    train, test = noisy_images(7, 72, 10, 3, 60, 200, 25)
    test[1, 30:45, 30:45] = 0
    return train, test


def features(name, layers, images, seed=0):
    torch.manual_seed(seed)
    net = Backbone(name, layers).eval()
    with torch.no_grad():
        return net(Preprocess(64, 56)(list(images)))


def blur_upsample(patch, size):
    """Official RescaleSegmentor: bilinear to the input size, then scipy's gaussian_filter(σ=4)."""
    up = F.interpolate(torch.from_numpy(patch)[:, None].double(), size=(size, size), mode="bilinear", align_corners=False)
    return np.stack([scipy_ndimage.gaussian_filter(m, sigma=4) for m in up[:, 0].numpy()])


def test_gaussian_blur_is_scipy_gaussian_filter():
    x = np.random.default_rng(0).random((2, 37, 50)).astype(np.float32)
    want = np.stack([scipy_ndimage.gaussian_filter(m.astype(np.float64), sigma=4) for m in x])
    np.testing.assert_allclose(gaussian_blur(torch.from_numpy(x), 4.0).numpy(), want, rtol=1e-5, atol=1e-6)


def official_patchcore_embed(feats, layers, d=1024):
    """patchcore-inspection PatchCore._embed: unfold each layer, resize the deeper
    layers' unfolded patches bilinearly, MeanMapper per layer, Aggregator."""
    per_layer, ref = [], None
    for name in layers:
        f = feats[name].double()
        b, c, h, w = f.shape
        patches = F.unfold(f, 3, padding=1).reshape(b, c, 3, 3, h, w)  # [B, C, 3, 3, h, w]
        if ref is None:
            ref = (h, w)
        elif (h, w) != ref:
            flat = patches.reshape(-1, 1, h, w)
            flat = F.interpolate(flat, size=ref, mode="bilinear", align_corners=False)
            patches = flat.reshape(b, c, 3, 3, *ref)
        vec = patches.permute(0, 4, 5, 1, 2, 3).reshape(-1, 1, c * 9)
        per_layer.append(F.adaptive_avg_pool1d(vec, d)[:, 0])
    stacked = torch.stack(per_layer, 1).reshape(len(per_layer[0]), 1, -1)
    return F.adaptive_avg_pool1d(stacked, d)[:, 0].reshape(-1, *ref, d)


@pytest.mark.parametrize("layers", [("layer2", "layer3"), ("layer1", "layer2", "layer3")])
def test_patchcore_matches_official_pipeline(data, layers):
    """Two layers: the Aggregator's average taken per layer before upsampling (1024 is
    a multiple of 2); three: over the concatenation (1024 is not a multiple of 3)."""
    train, test = data
    det = PatchCore(backbone="resnet18", coreset_ratio=1.0, layers=layers, **COMMON).fit(train)
    assert (det.inference_module().embed.per_layer is not None) == (len(layers) == 2)
    pred = det.predict(test)
    bank = official_patchcore_embed(features("resnet18", layers, train), layers).reshape(-1, 1024)
    q = official_patchcore_embed(features("resnet18", layers, test), layers)
    b, h, w, d = q.shape
    d2 = torch.cdist(q.reshape(-1, d), bank).square().min(1).values.reshape(b, h, w).numpy()  # faiss L2 = squared
    np.testing.assert_allclose(pred.scores, d2.reshape(b, -1).max(1), rtol=1e-4)
    full = blur_upsample(d2, 56)
    ours = gaussian_blur(upsample(torch.from_numpy(d2.astype(np.float32)), 56), 4.0).numpy()
    np.testing.assert_allclose(ours, full, rtol=1e-4, atol=1e-4 * full.max())
    assert pred.scores[1] == pred.scores.max()


def test_padim_matches_dense_inverse_covariance(data):
    train, test = data
    layers = ("layer1", "layer2", "layer3")
    det = PaDiM(backbone="resnet18", n_features=None, **COMMON).fit(train)
    pred = det.predict(test)

    def emb(images):
        f = features("resnet18", layers, images)
        size = f["layer1"].shape[-2:]
        cat = torch.cat([F.interpolate(f[k], size=size, mode="nearest") for k in layers], 1).double()
        return cat.flatten(2).permute(2, 0, 1), size  # [P, N, C]

    x, size = emb(train)
    mean = x.mean(1, keepdim=True)
    cov = (x - mean).transpose(1, 2) @ (x - mean) / (x.shape[1] - 1) + 0.01 * torch.eye(x.shape[2], dtype=torch.float64)
    z = emb(test)[0] - mean
    m = torch.einsum("pni,pij,pnj->pn", z, torch.linalg.inv(cov), z).sqrt().T.reshape(-1, *size).numpy()
    full = blur_upsample(m, 56)
    np.testing.assert_allclose(pred.scores, full.reshape(len(full), -1).max(1), rtol=1e-4)
    pre = Preprocess(64, 56)
    want = np.stack([pre.restore(x.astype(np.float32), (72, 72)) for x in full])
    np.testing.assert_allclose(pred.maps, want, rtol=1e-4, atol=1e-4 * want.max())


@pytest.mark.parametrize("k_pixels", [1, 3])
@pytest.mark.parametrize("twin", [False, True])
def test_spade_matches_brute_force(data, monkeypatch, k_pixels, twin):
    """Both searches (faiss over the gallery one image at a time here, so the κ smallest
    are merged across calls; and the exportable torch twin) against cdist."""
    from pyad.detectors import spade
    from pyad.ops import portable

    monkeypatch.setattr(spade.SPADEHead, "_GALLERY_BYTES", 1)
    train, test = data
    det = SPADE(backbone="resnet18", k_images=4, k_pixels=k_pixels, **COMMON).fit(train)
    with portable() if twin else contextlib.nullcontext():
        pred = det.predict(test)
    layers = ("layer1", "layer2", "layer3")
    ftr = features("resnet18", layers + ("layer4",), train)
    fte = features("resnet18", layers + ("layer4",), test)
    g_tr, g_te = ftr["layer4"].mean((2, 3)).double(), fte["layer4"].mean((2, 3)).double()
    d2 = torch.cdist(g_te, g_tr).square()
    knn = d2.topk(4, largest=False)
    np.testing.assert_allclose(pred.scores, knn.values.mean(1).numpy(), rtol=1e-4)

    def pyramid(f):
        size = f["layer1"].shape[-2:]
        cat = torch.cat([F.interpolate(f[k], size=size, mode="bilinear", align_corners=False) for k in layers], 1)
        return cat.permute(0, 2, 3, 1).double()

    p_tr, p_te = pyramid(ftr).half().double(), pyramid(fte)  # SPADE keeps its gallery in float16
    maps = []
    for i in range(len(test)):
        gallery = p_tr[knn.indices[i]].reshape(-1, p_tr.shape[-1])
        d2 = torch.cdist(p_te[i].reshape(-1, p_te.shape[-1]), gallery).square()
        maps.append(d2.topk(k_pixels, 1, largest=False).values.mean(1).reshape(p_te.shape[1:3]))
    full = blur_upsample(torch.stack(maps).numpy(), 56)
    pre = Preprocess(64, 56)
    want = np.stack([pre.restore(m.astype(np.float32), (72, 72)) for m in full])
    np.testing.assert_allclose(pred.maps, want, rtol=1e-3, atol=1e-3 * want.max())
