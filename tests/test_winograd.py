"""Winograd F(4x4, 3x3) and F(3x3, 4x4) convolutions (pyad.kernels.winograd, pyad.ops.conv,
pyad.ops.conv2d_train): the matrices from their construction, every backend's transforms against
the NumPy reference, the convolution and its gradients against torch's, and where ops takes it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyad import kernels as K
from pyad import ops
from pyad.backbones import Backbone
from pyad.kernels import reference as ref
from pyad.kernels import winograd as W

# (batch, in channels, out channels, height, width, kernel, padding): channel counts off the SIMD
# width, partial tiles at the right and bottom edges, every padding
SHAPES = [(2, 5, 7, 11, 9, 3, 1), (1, 8, 16, 13, 13, 3, 0), (3, 17, 9, 6, 7, 3, 2), (2, 24, 40, 16, 16, 3, 1),
          (2, 5, 7, 11, 9, 4, 0), (1, 9, 16, 14, 13, 4, 2), (2, 17, 8, 7, 8, 4, 3), (1, 16, 24, 12, 12, 4, 1)]
IDS = [f"k{s[5]}p{s[6]}-{s[1]}x{s[3]}x{s[4]}" for s in SHAPES]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("r", [3, 4])
def test_matrices_follow_from_the_interpolation_points(r):
    # Toom-Cook with points 0, ±1, ±2 and ∞ (Lavin & Gray 2016, §4): A^T [i, j] = p_j^i,
    # G [j, k] = p_j^k / prod_{l != j}(p_j - p_l), the point at ∞ in the last column / row;
    # B^T then solves A^T [(G g) ⊙ (B^T d)] = the correlation of d and g for every d and g
    m, pts = 7 - r, np.array([0.0, 1.0, -1.0, 2.0, -2.0])
    at = np.zeros((m, 6))
    at[:, :5] = pts[None, :] ** np.arange(m)[:, None]
    at[m - 1, 5] = 1
    g = np.zeros((6, r))
    for j, p in enumerate(pts):
        g[j] = p ** np.arange(r) / np.prod([p - q for q in pts if q != p])
    g[5, r - 1] = 1
    np.testing.assert_allclose(ref.WINOGRAD_AT[r], at, atol=1e-12)
    np.testing.assert_allclose(ref.WINOGRAD_G[r], g, atol=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(5):
        d, w = rng.standard_normal(6), rng.standard_normal(r)
        want = np.array([d[i:i + r] @ w for i in range(m)])
        np.testing.assert_allclose(at @ ((g @ w) * (ref.WINOGRAD_BT @ d)), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_each_backend_transforms_equal_the_reference(backend, shape):
    b, c, k, h, w, r, pad = shape
    rng = np.random.default_rng(1)
    x = rng.standard_normal((b, h, w, c)).astype(np.float32)
    ho, wo = h + 2 * pad - r + 1, w + 2 * pad - r + 1
    tiles = ref.winograd_tiles(b, ho, wo, r)[0]
    t0, tc = tiles // 3, tiles - tiles // 3  # a block that starts inside the batch
    want, got = np.empty((36, tc, c), np.float32), np.empty((36, tc, c), np.float32)
    ref.winograd_input(x, r, pad, t0, want)
    K._backend.current().winograd_input(x, r, pad, t0, got)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())

    m = rng.standard_normal((36, tc, k)).astype(np.float32)
    bias = rng.standard_normal(k).astype(np.float32)
    res = rng.standard_normal((b, ho, wo, k)).astype(np.float32)
    for args in [(None, None, False), (bias, res, True)]:
        want, got = np.full((b, ho, wo, k), 7.0, np.float32), np.full((b, ho, wo, k), 7.0, np.float32)
        ref.winograd_output(m, r, t0, *args, want)
        K._backend.current().winograd_output(m, r, t0, *args, got)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        first = t0 // (tiles // b) * ho * wo  # positions of the images before the block: untouched
        assert (got.reshape(-1, k)[:first] == 7.0).all()


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_each_backend_output_gradient_transform_equals_the_reference(backend, shape):
    b, c, k, h, w, r, pad = shape
    ho, wo = h + 2 * pad - r + 1, w + 2 * pad - r + 1
    dy = np.random.default_rng(2).standard_normal((b, ho, wo, k)).astype(np.float32)
    tiles = ref.winograd_tiles(b, ho, wo, r)[0]
    t0, tc = tiles // 3, tiles - tiles // 3
    want, got = np.empty((36, tc, k), np.float32), np.empty((36, tc, k), np.float32)
    ref.winograd_output_grad(dy, r, t0, want)
    K._backend.current().winograd_output_grad(dy, r, t0, got)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # it is the output transform's adjoint: <output(m), dy> = <m, output_grad(dy)>
    m = np.random.default_rng(3).standard_normal((36, tiles, k)).astype(np.float32)
    y = np.zeros((b, ho, wo, k), np.float32)
    ref.winograd_output(m, r, 0, None, None, False, y)
    full = np.empty((36, tiles, k), np.float32)
    ref.winograd_output_grad(dy, r, 0, full)
    np.testing.assert_allclose((y.astype(np.float64) * dy).sum(), (m.astype(np.float64) * full).sum(), rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_training_convolution_and_its_gradients_equal_torch(backend, shape, monkeypatch):
    b, c, k, h, w, r, pad = shape
    torch.manual_seed(0)
    x = torch.randn(b, c, h, w, requires_grad=True)
    weight, bias = torch.randn(k, c, r, r, requires_grad=True), torch.randn(k, requires_grad=True)
    want = F.conv2d(x, weight, bias, padding=pad)
    dy = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (x, weight, bias), dy)
    monkeypatch.setattr(ops, "WINOGRAD_MIN_CHANNELS", 1)  # every shape here takes it
    monkeypatch.setattr(ops, "WINOGRAD_MIN_TILES", 1)
    got = ops.conv2d_train(x, weight, bias, pad)
    assert type(got.grad_fn).__name__ == "_WinogradConvBackward"
    assert _rel(got, want) < 2e-5
    for g, e in zip(torch.autograd.grad(got, (x, weight, bias), dy), want_grads):
        assert _rel(g, e) < 2e-5
    monkeypatch.setattr(W, "GRAD_BLOCK_TILES", 5)  # the weight gradient summed over many blocks
    assert _rel(W.winograd_weight_grad(x.detach(), dy, r, pad), want_grads[1]) < 2e-5
    # only what is asked for: no input gradient for an input that needs none
    got = ops.conv2d_train(x.detach(), weight, None, pad)
    (gw,) = torch.autograd.grad(got, (weight,), dy)
    assert _rel(gw, want_grads[1]) < 2e-5


def test_training_convolution_falls_back_to_torch_where_winograd_does_not_apply(monkeypatch):
    x, weight = torch.randn(1, 16, 16, 16, requires_grad=True), torch.randn(16, 16, 3, 3, requires_grad=True)
    assert type(ops.conv2d_train(x, weight, None, 1).grad_fn).__name__ == "_WinogradConvBackward"
    others = [ops.conv2d_train(x, torch.randn(16, 16, 5, 5), None, 2),  # 5x5
              ops.conv2d_train(x, torch.randn(16, 16, 3, 3), None, 3),  # padding > r - 1
              ops.conv2d_train(x[:, :8], torch.randn(16, 8, 3, 3), None, 1),  # 8 input channels
              ops.conv2d_train(x.double(), weight.double(), None, 1)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        others.append(ops.conv2d_train(x, weight, None, 1))
    with ops.portable():
        others.append(ops.conv2d_train(x, weight, None, 1))
    monkeypatch.setenv("PYAD_WINOGRAD", "0")
    others.append(ops.conv2d_train(x, weight, None, 1))
    assert all(type(o.grad_fn).__name__ != "_WinogradConvBackward" for o in others)


def test_sequential_in_training_takes_winograd_under_autograd_and_matches_the_layers():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 4), torch.nn.ReLU(inplace=True), torch.nn.AvgPool2d(2),
                              torch.nn.Conv2d(16, 24, 4, padding=2), torch.nn.ReLU(inplace=True),
                              torch.nn.Conv2d(24, 32, 3), torch.nn.Conv2d(32, 8, 1))
    x = torch.randn(2, 3, 40, 40)
    got = ops.sequential(net, x, train=True)
    got.square().sum().backward()
    mine = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    want = net(x)
    want.square().sum().backward()
    assert _rel(got, want) < 2e-5
    for g, p in zip(mine, net.parameters()):
        assert _rel(g, p.grad) < 1e-4
    seen, fn = set(), got.grad_fn  # the 4x4 and 3x3 layers ran through it
    stack = [fn]
    while stack:
        fn = stack.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            stack.extend(f for f, _ in fn.next_functions)
    assert sum(type(f).__name__ == "_WinogradConvBackward" for f in seen) == 2


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_winograd_convolution_equals_torch(backend, shape, monkeypatch):
    b, c, k, h, w, r, pad = shape
    torch.manual_seed(0)
    x, weight, bias = torch.randn(b, c, h, w), torch.randn(k, c, r, r), torch.randn(k)
    want = F.conv2d(x, weight, bias, padding=pad)
    res = torch.randn_like(want)
    u = W.winograd_weights(weight)
    assert _rel(W.winograd_conv(x, u, r, bias, pad), want) < 2e-5
    assert _rel(W.winograd_conv(x, u, r, None, pad), want - bias.view(1, -1, 1, 1)) < 2e-5
    fused = W.winograd_conv(x, u, r, bias, pad, residual=res, relu=True)
    assert _rel(fused, torch.relu(want + res)) < 2e-5
    assert fused.is_contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(W, "BLOCK_TILES", 5)  # many GEMM blocks, boundaries inside tile rows and images
    assert _rel(W.winograd_conv(x, u, r, bias, pad, residual=res, relu=True), fused) < 1e-5  # GEMMs of 5 rows
    # may sum in another order than one of many rows: equal to rounding


def test_bad_arguments_name_the_argument():
    x, u = torch.randn(1, 4, 8, 8), W.winograd_weights(torch.randn(6, 4, 3, 3))
    with pytest.raises(ValueError, match="weight"):
        W.winograd_weights(torch.randn(6, 4, 5, 5))
    with pytest.raises(ValueError, match="^u:"):
        W.winograd_conv(torch.randn(1, 5, 8, 8), u)
    with pytest.raises(ValueError, match="^x:"):
        W.winograd_conv(x.double(), u)
    with pytest.raises(ValueError, match="kernel_size"):
        W.winograd_conv(x, u, 5)
    with pytest.raises(ValueError, match="padding"):
        W.winograd_conv(x, u, 3, padding=3)
    with pytest.raises(ValueError, match="bias"):
        W.winograd_conv(x, u, 3, torch.randn(5))
    with pytest.raises(ValueError, match="residual"):
        W.winograd_conv(x, u, 3, residual=torch.randn(1, 6, 7, 7))
    with pytest.raises(ValueError, match="^x:"):
        W.winograd_conv(torch.randn(1, 4, 1, 1), u, 3, padding=0)
    with pytest.raises(ValueError, match="^dy:"):
        W.winograd_weight_grad(x, torch.randn(1, 6, 7, 7), 3, 1)
    with pytest.raises(ValueError, match="^x:"):
        W.winograd_weight_grad(x.double(), torch.randn(1, 6, 8, 8), 3, 1)
    with pytest.raises(ValueError, match="padding"):
        W.winograd_weight_grad(x, torch.randn(1, 6, 8, 8), 3, 4)


def test_conv_takes_winograd_for_dense_3x3_and_4x4_layers_outside_autograd_on_the_cpu_fast_path(monkeypatch):
    calls = []
    real = ops._winograd
    monkeypatch.setattr(ops, "_winograd", lambda layer, x, relu, res: calls.append(tuple(x.shape)) or real(layer, x, relu, res))
    conv = torch.nn.Conv2d(16, 32, 3, padding=1)
    x = torch.randn(2, 16, 16, 16)  # 16 tiles per image
    with torch.no_grad():
        torch.testing.assert_close(ops.conv(conv, x, relu=True), torch.relu(conv(x)), rtol=1e-4, atol=1e-4)
        conv4 = torch.nn.Conv2d(16, 32, 4)
        torch.testing.assert_close(ops.conv(conv4, x), conv4(x), rtol=1e-4, atol=1e-4)  # 13x13: 25 tiles of 3x3
        with ops.portable():  # what export runs
            ops.conv(conv, x)
        ops.conv(conv, torch.randn(2, 16, 12, 12))  # 9 tiles: the layer runs
        ops.conv(torch.nn.Conv2d(16, 32, 3, 2, 1), x)  # stride 2
        ops.conv(torch.nn.Conv2d(16, 32, 5, padding=2), x)  # 5x5
        ops.conv(torch.nn.Conv2d(8, 32, 3, padding=1), torch.randn(2, 8, 16, 16))  # 8 input channels
        ops.conv(torch.nn.Conv2d(16, 32, 3, padding=1, dilation=2), x)
        ops.conv(torch.nn.Conv2d(16, 32, 3, padding=1, groups=2), x)
        ops.conv(conv.double(), x.double()).float()  # float64: the layer runs
        conv.float()
    with torch.no_grad():
        monkeypatch.setenv("PYAD_WINOGRAD", "0")
        ops.conv(conv, x)
        monkeypatch.delenv("PYAD_WINOGRAD")
        with K.use_backend("numpy"):  # the specification is not a fast path
            ops.conv(conv, x)
    ops.conv(conv, x)  # autograd on: the layer runs
    assert calls == [tuple(x.shape)] * 2


def test_sequential_fuses_a_relu_after_a_convolution():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3), torch.nn.ReLU(inplace=True), torch.nn.AvgPool2d(2),
                              torch.nn.Conv2d(16, 24, 4), torch.nn.ReLU(), torch.nn.Conv2d(24, 8, 1))
    x = torch.randn(2, 16, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(ops.sequential(net, x), net(x.clone()), rtol=1e-4, atol=1e-5)


def test_weights_are_transformed_again_when_they_change():
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(1, 16, 16, 16)
    with torch.no_grad():
        ops.conv(conv, x)
        conv.weight.mul_(2.0)  # in place, as BatchNorm folding does
        torch.testing.assert_close(ops.conv(conv, x), conv(x), rtol=1e-4, atol=1e-4)


def test_layers_built_under_inference_mode_take_it():
    with torch.inference_mode():  # weights that are inference tensors (no version counter)
        conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ops.conv(conv, x), conv(x), rtol=1e-4, atol=1e-4)
        assert "_pyad_winograd" in conv.__dict__


@pytest.mark.parametrize("name", ["resnet18", "wide_resnet50_2"])
def test_backbone_features_equal_the_direct_convolutions_and_are_batch_invariant(name, monkeypatch):
    torch.manual_seed(0)
    net = Backbone(name, ("layer1", "layer2", "layer3"), None).frozen()
    x = torch.randn(3, 3, 128, 128)
    calls = []
    real = ops._winograd
    monkeypatch.setattr(ops, "_winograd", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        got = net(x)
        alone = net(x[1:2])
        with ops.portable():
            want = net(x)
    assert calls  # the 3x3 layers took it
    for key in want:
        assert _rel(got[key], want[key]) < 1e-5, key
        assert torch.equal(alone[key][0], got[key][1]), key  # alone = in a batch, bitwise
