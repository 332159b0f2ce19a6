"""The exportable ops against direct formulations: chunked k-NN, channel pooling,
the Mahalanobis twin, convolutions as GEMMs, blur and upsampling."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyad import kernels as K
from pyad import ops
from pyad.ops import Mahalanobis, NearestNeighbours, PatchEmbed, _knn, channel_pool, knn, portable


@pytest.mark.parametrize("k", [1, 3])
def test_chunked_knn_equals_brute_force(k):
    g = torch.Generator().manual_seed(0)
    bank, q = torch.randn(1000, 16, generator=g), torch.randn(37, 16, generator=g)
    d, i = knn(q, bank, k, chunk=128)  # 8 chunks: the running top-k merge
    full = torch.cdist(q.double(), bank.double()).square()
    want_d, want_i = full.topk(k, dim=1, largest=False)
    torch.testing.assert_close(d.double(), want_d, rtol=1e-4, atol=1e-4)
    assert torch.equal(i, want_i)
    fast = NearestNeighbours(bank, k)
    fd, fi = fast(q)  # faiss on the CPU fast path
    torch.testing.assert_close(fd.double(), want_d, rtol=1e-4, atol=1e-4)
    assert torch.equal(fi, want_i)


def test_channel_pool_twin_equals_adaptive_avg_pool1d():
    x = torch.randn(3, 5, 4608)
    want = F.adaptive_avg_pool1d(x.reshape(-1, 1, 4608), 1024).reshape(3, 5, 1024)
    with portable():
        torch.testing.assert_close(channel_pool(x, 1024), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(channel_pool(x, 1024), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["unfold", "avg", "max", "avgmax"])
def test_patch_embed_twin_equals_the_kernel(mode):
    x = torch.randn(2, 24, 9, 11)
    fast = PatchEmbed(40, 3, 1, 1, mode)(x)
    with portable():
        twin = PatchEmbed(40, 3, 1, 1, mode)(x)
    torch.testing.assert_close(twin, fast, rtol=1e-4, atol=1e-5)


def test_mahalanobis_twin_equals_the_kernel():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 30, 6)).astype(np.float32)
    model = K.gaussian_fit(x[:15])
    op = Mahalanobis(torch.from_numpy(model.mean), torch.from_numpy(model.factor), model.eps, model.count,
                     chunk_bytes=4 * 6 * 6 * 7)  # several position chunks
    fast = op(torch.from_numpy(x[15:]))
    with portable():
        twin = op(torch.from_numpy(x[15:]))
    torch.testing.assert_close(twin, fast, rtol=1e-5, atol=1e-5)


def _patch_like(m: int, d: int, rank: int, seed: int) -> np.ndarray:
    """Rows with most variance in ``rank`` directions (as patch features), plus noise."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, rank)))[0]
    return (rng.standard_normal((m, rank)) * np.linspace(3, 0.5, rank)) @ basis.T + 0.05 * rng.standard_normal((m, d))


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("structured", [True, False])
def test_bounded_search_is_exact(k, structured):
    """Large banks search by projected lower bounds (pyad.search.BoundedIndex): the same
    neighbours and distances as the exhaustive search, whether the bounds are tight
    (low-rank rows: almost no query falls back) or useless (isotropic rows: every query
    falls back to the exhaustive search, still exact)."""
    from pyad.ops import BOUNDED_MIN_DIM, BOUNDED_MIN_ROWS
    from pyad.search import BoundedIndex

    m, d = BOUNDED_MIN_ROWS + 100, BOUNDED_MIN_DIM
    rows = _patch_like(m + 300, d, 64, 0) if structured else np.random.default_rng(0).standard_normal((m + 300, d))
    bank, q = torch.from_numpy(rows[:m]).float(), torch.from_numpy(rows[m:]).float()
    q[:5] = bank[[3, 50, 700, m // 2, m - 1]]  # exact hits: distance 0
    nn_ = NearestNeighbours(bank, k=k)
    assert isinstance(nn_.search_index(), BoundedIndex)
    got_d, got_i = nn_(q)
    want_d, want_i = _knn(q.double(), bank.double(), k, 8192)  # the exhaustive search in float64
    torch.testing.assert_close(got_d.double(), want_d, rtol=1e-4, atol=1e-4)
    assert (got_i == want_i).float().mean() > 0.99  # float32 vs float64: near-ties may swap
    exact = torch.gather(((q[:, None].double() - bank[got_i].double()) ** 2).sum(-1), 1, torch.arange(k)[None].expand(len(q), k))
    torch.testing.assert_close(exact, want_d, rtol=1e-4, atol=1e-4)  # any swapped index is at the same distance
    assert (got_i[:5, 0] == torch.tensor([3, 50, 700, m // 2, m - 1])).all()
    index = nn_.search_index()
    fell_back = index.fallbacks / len(q)
    assert fell_back < 0.1 if structured else fell_back > 0.9
    assert index.second_looks >= index.fallbacks  # the exhaustive search only after 8x the candidates


CONVS = [  # (layer, input height and width)
    (lambda: torch.nn.Conv2d(16, 24, 4, 2, 1, bias=False), (6, 5)),  # GANomaly's encoder pyramid
    (lambda: torch.nn.Conv2d(16, 8, 3, 1, 1), (6, 5)),  # bias, stride 1
    (lambda: torch.nn.Conv2d(16, 8, (3, 2), (2, 1), (0, 1)), (6, 5)),  # non-square everything
    (lambda: torch.nn.Conv2d(16, 5, 4, 1, 0, bias=False), (4, 4)),  # GANomaly's final 4x4 -> 1x1
    (lambda: torch.nn.ConvTranspose2d(16, 24, 4, 2, 1, bias=False), (6, 5)),  # GANomaly's decoder pyramid
    (lambda: torch.nn.ConvTranspose2d(16, 8, 4, 1, 0), (1, 1)),  # GANomaly's 1x1 -> 4x4, with a bias
    (lambda: torch.nn.ConvTranspose2d(16, 8, 3, 2, 1, output_padding=1), (6, 5)),
    (lambda: torch.nn.ConvTranspose2d(16, 8, (3, 2), (2, 1), (1, 0)), (6, 5)),
]


@pytest.mark.parametrize("make,hw", CONVS)
@pytest.mark.parametrize("batch", [1, 3])
def test_convolution_as_one_gemm_equals_the_layer(make, hw, batch):
    torch.manual_seed(0)
    layer, x = make(), torch.randn(batch, 16, *hw)
    with torch.no_grad():
        want, got = layer(x), ops.conv_as_gemm(layer, x)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_conv_takes_the_gemm_for_16_to_64_positions_outside_autograd_on_the_cpu_fast_path(monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "conv_as_gemm", lambda layer, x: calls.append(x.shape) or layer(x))
    conv = torch.nn.Conv2d(4, 4, 4, 2, 1)
    small, large = torch.randn(5, 4, 16, 16), torch.randn(1, 4, 18, 18)  # 64 and 81 output positions per image
    with torch.no_grad():
        ops.conv(conv, small)
        ops.conv(conv, large)
        with portable():  # what export runs
            ops.conv(conv, small)
        ops.conv(conv, torch.randn(1, 4, 6, 6))  # 9 output positions: below 16, the layer runs
        ops.conv(torch.nn.Conv2d(4, 4, 3, dilation=2), small)  # dilation: not handled, the layer runs
        ops.conv(torch.nn.Conv2d(4, 4, 3, groups=2), small)
    ops.conv(conv, small)  # autograd on: the layer runs
    assert calls == [small.shape]
    with torch.no_grad():
        ops.conv(torch.nn.ConvTranspose2d(4, 4, 4, 2, 1), torch.randn(3, 4, 8, 8))  # input positions count
        ops.conv(torch.nn.ConvTranspose2d(4, 4, 4, 2, 1), torch.randn(3, 4, 8, 9))
    assert calls == [small.shape, (3, 4, 8, 8)]
