"""Winograd F(4x4, 3x3) convolutions (pyad.kernels.winograd, pyad.ops.conv): every backend's
transforms against the NumPy reference, the convolution against torch's, and where ops.conv
takes it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyad import kernels as K
from pyad import ops
from pyad.backbones import Backbone
from pyad.kernels import reference as ref
from pyad.kernels import winograd as W

# (batch, in channels, out channels, height, width, padding): channel counts off the SIMD width,
# partial tiles at the right and bottom edges, the three paddings
SHAPES = [(2, 5, 7, 11, 9, 1), (1, 8, 16, 13, 13, 0), (3, 17, 9, 6, 7, 2), (2, 24, 40, 16, 16, 1)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_reference_transforms_are_lavin_and_gray():
    # B^T, G, A^T satisfy the defining identity on one tile, in float64: a 1-d 3-tap correlation
    # of 6 inputs gives 4 outputs, Y = A^T [(G g) * (B^T d)]
    rng = np.random.default_rng(0)
    d, g = rng.standard_normal(6), rng.standard_normal(3)
    want = np.array([d[i:i + 3] @ g for i in range(4)])
    got = ref.WINOGRAD_AT @ ((ref.WINOGRAD_G @ g) * (ref.WINOGRAD_BT @ d))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_each_backend_transforms_equal_the_reference(backend, shape):
    b, c, k, h, w, pad = shape
    rng = np.random.default_rng(1)
    x = rng.standard_normal((b, h, w, c)).astype(np.float32)
    ho, wo = h + 2 * pad - 2, w + 2 * pad - 2
    tiles = ref.winograd_tiles(b, ho, wo)[0]
    t0, tc = tiles // 3, tiles - tiles // 3  # a block that starts inside the batch
    want, got = np.empty((36, tc, c), np.float32), np.empty((36, tc, c), np.float32)
    ref.winograd_input(x, pad, t0, want)
    K._backend.current().winograd_input(x, pad, t0, got)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())

    m = rng.standard_normal((36, tc, k)).astype(np.float32)
    bias = rng.standard_normal(k).astype(np.float32)
    res = rng.standard_normal((b, ho, wo, k)).astype(np.float32)
    for args in [(None, None, False), (bias, res, True)]:
        want, got = np.full((b, ho, wo, k), 7.0, np.float32), np.full((b, ho, wo, k), 7.0, np.float32)
        ref.winograd_output(m, t0, *args, want)
        K._backend.current().winograd_output(m, t0, *args, got)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        assert (got.reshape(-1, k)[: (t0 // ((ho + 3) // 4 * ((wo + 3) // 4))) * ho * wo] == 7.0).all()  # untouched


@pytest.mark.parametrize("shape", SHAPES)
def test_winograd_convolution_equals_torch(backend, shape, monkeypatch):
    b, c, k, h, w, pad = shape
    torch.manual_seed(0)
    x, weight, bias = torch.randn(b, c, h, w), torch.randn(k, c, 3, 3), torch.randn(k)
    want = F.conv2d(x, weight, bias, padding=pad)
    res = torch.randn_like(want)
    u = W.winograd_weights(weight)
    assert _rel(W.winograd_conv3x3(x, u, bias, pad), want) < 2e-5
    assert _rel(W.winograd_conv3x3(x, u, None, pad), want - bias.view(1, -1, 1, 1)) < 2e-5
    fused = W.winograd_conv3x3(x, u, bias, pad, residual=res, relu=True)
    assert _rel(fused, torch.relu(want + res)) < 2e-5
    assert fused.is_contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(W, "BLOCK_TILES", 5)  # many GEMM blocks, boundaries inside tile rows and images
    assert _rel(W.winograd_conv3x3(x, u, bias, pad, residual=res, relu=True), fused) < 1e-5  # GEMMs of 5 rows
    # may sum in another order than one of many rows: equal to rounding


def test_bad_arguments_name_the_argument():
    x, u = torch.randn(1, 4, 8, 8), W.winograd_weights(torch.randn(6, 4, 3, 3))
    with pytest.raises(ValueError, match="weight"):
        W.winograd_weights(torch.randn(6, 4, 5, 5))
    with pytest.raises(ValueError, match="^u:"):
        W.winograd_conv3x3(torch.randn(1, 5, 8, 8), u)
    with pytest.raises(ValueError, match="^x:"):
        W.winograd_conv3x3(x.double(), u)
    with pytest.raises(ValueError, match="padding"):
        W.winograd_conv3x3(x, u, padding=3)
    with pytest.raises(ValueError, match="bias"):
        W.winograd_conv3x3(x, u, torch.randn(5))
    with pytest.raises(ValueError, match="residual"):
        W.winograd_conv3x3(x, u, residual=torch.randn(1, 6, 7, 7))
    with pytest.raises(ValueError, match="^x:"):
        W.winograd_conv3x3(torch.randn(1, 4, 1, 1), u, padding=0)


def test_conv_takes_winograd_for_dense_3x3_layers_outside_autograd_on_the_cpu_fast_path(monkeypatch):
    calls = []
    real = ops._winograd
    monkeypatch.setattr(ops, "_winograd", lambda layer, x, relu, res: calls.append(tuple(x.shape)) or real(layer, x, relu, res))
    conv = torch.nn.Conv2d(16, 32, 3, padding=1)
    x = torch.randn(2, 16, 16, 16)  # 16 tiles per image
    with torch.no_grad():
        torch.testing.assert_close(ops.conv(conv, x, relu=True), torch.relu(conv(x)), rtol=1e-4, atol=1e-4)
        with ops.portable():  # what export runs
            ops.conv(conv, x)
        ops.conv(conv, torch.randn(2, 16, 12, 12))  # 9 tiles: the layer runs
        ops.conv(torch.nn.Conv2d(16, 32, 3, 2, 1), x)  # stride 2
        ops.conv(torch.nn.Conv2d(8, 32, 3, padding=1), torch.randn(2, 8, 16, 16))  # 8 input channels
        ops.conv(torch.nn.Conv2d(16, 32, 3, padding=1, dilation=2), x)
        ops.conv(torch.nn.Conv2d(16, 32, 3, padding=1, groups=2), x)
        ops.conv(conv, x.double().float().to(torch.bfloat16).float())  # float32 again: taken
        monkeypatch.setenv("PYAD_WINOGRAD", "0")
        ops.conv(conv, x)
        monkeypatch.delenv("PYAD_WINOGRAD")
        with K.use_backend("numpy"):  # the specification is not a fast path
            ops.conv(conv, x)
    ops.conv(conv, x)  # autograd on: the layer runs
    assert calls == [tuple(x.shape)] * 2


def test_weights_are_transformed_again_when_they_change():
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(1, 16, 16, 16)
    with torch.no_grad():
        ops.conv(conv, x)
        conv.weight.mul_(2.0)  # in place, as BatchNorm folding does
        torch.testing.assert_close(ops.conv(conv, x), conv(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "wide_resnet50_2"])
def test_backbone_features_equal_the_direct_convolutions_and_are_batch_invariant(name):
    torch.manual_seed(0)
    net = Backbone(name, ("layer1", "layer2", "layer3"), None).frozen()
    x = torch.randn(3, 3, 128, 128)
    calls = []
    real = ops._winograd
    ops._winograd = lambda *a: calls.append(1) or real(*a)
    try:
        with torch.inference_mode():
            got = net(x)
            alone = net(x[1:2])
            with ops.portable():
                want = net(x)
    finally:
        ops._winograd = real
    assert calls  # the 3x3 layers took it
    for key in want:
        assert _rel(got[key], want[key]) < 1e-5, key
        assert torch.equal(alone[key][0], got[key][1]), key  # alone = in a batch, bitwise
