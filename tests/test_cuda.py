"""The torch CUDA path against the CPU kernels (runs only where a GPU is present)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

import pyad  # noqa: E402
from pyad import kernels as K  # noqa: E402


def test_mahalanobis_cuda(rng):
    x = rng.standard_normal((40, 30, 16)).astype(np.float32)
    model = K.gaussian_fit(x[:32])
    got = K.mahalanobis(torch.from_numpy(x[32:]).cuda(), model)
    assert got.is_cuda
    np.testing.assert_allclose(got.cpu().numpy(), K.mahalanobis(x[32:], model), rtol=1e-4, atol=1e-4)


def test_coreset_cuda(rng):
    x = rng.integers(-3, 4, size=(3000, 12)).astype(np.float32)
    idx, dist = K.greedy_coreset(torch.from_numpy(x).cuda(), 100, return_distances=True)
    want, wdist = K.greedy_coreset(x, 100, return_distances=True)
    np.testing.assert_array_equal(idx.cpu().numpy(), want)
    np.testing.assert_allclose(dist.cpu().numpy(), wdist, rtol=1e-6)


@pytest.mark.parametrize("mode", ["avg", "max", "avgmax"])
def test_pooling_cuda(rng, mode):
    x = rng.standard_normal((2, 512, 9, 9)).astype(np.float32)
    t = torch.from_numpy(x).cuda()
    np.testing.assert_allclose(K.patch_pool(t, mode=mode).cpu().numpy(), K.patch_pool(x, mode=mode), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(K.patch_embed(t, 1024).cpu().numpy(), K.patch_embed(x, 1024), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(K.patch_embed(t, 100, mode=mode).cpu().numpy(), K.patch_embed(x, 100, mode=mode), rtol=1e-5, atol=1e-6)


# -- detectors on CUDA (every registered detector; bench/gpu_check.sh runs these) ----------------------
from conftest import noisy_images  # noqa: E402
from test_detectors import CONFIGS, REGISTRY, fit  # noqa: E402


@pytest.fixture(scope="module")
def images():
    train, test = noisy_images(0, 64, 20, 4, 90, 160, 10)
    test[2:, 20:40, 20:40] = 255
    return train, test


@pytest.fixture(scope="module")
def fitted_cpu(images):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = fit(REGISTRY[name](**CONFIGS[name][0]), images[0])
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_detector_inference_on_cuda(name, images, fitted_cpu):
    """Fitted on the CPU, predicting on CUDA (float32): the CPU's scores and maps
    (float32 rounding: GPU GEMMs accumulate differently, TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    det = fitted_cpu(name)
    want = det.predict(images[1])
    det.set_params(device="cuda")
    try:
        got = det.predict(images[1])
    finally:
        det.set_params(device="cpu")
    scale = max(1.0, float(np.abs(want.maps).max()))
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-3, atol=1e-4 * scale)
    np.testing.assert_allclose(got.maps, want.maps, rtol=1e-3, atol=1e-4 * scale)
    np.testing.assert_array_equal(got.labels, want.labels)


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_detector_half_precision_on_cuda(name, precision, images, fitted_cpu):
    """Autocast inference: the defect images still rank first, scores within 2%
    of float32 (distances, blur and maps stay float32 in pyad.ops)."""
    det = fitted_cpu(name)
    det.set_params(device="cuda")
    try:
        full = det.predict(images[1])
        det.set_params(precision=precision)
        half = det.predict(images[1])
    finally:
        det.set_params(device="cpu", precision="float32")
    assert half.scores.dtype == np.float32 and np.isfinite(half.maps).all()
    assert half.scores[2:].min() > half.scores[:2].max()
    np.testing.assert_allclose(half.scores, full.scores, rtol=0.02, atol=0.02 * float(np.abs(full.scores).max()))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_detector_fit_on_cuda(name, images, tmp_path):
    det = fit(REGISTRY[name](**{**CONFIGS[name][0], "device": "cuda"}), images[0])
    pred = det.predict(images[1])
    assert pred.scores[2:].min() > pred.scores[:2].max()
    det.save(tmp_path / "m.pyad")
    back = pyad.load(tmp_path / "m.pyad")  # loads on the CPU
    np.testing.assert_allclose(back.predict(images[1]).scores, pred.scores, rtol=1e-3,
                               atol=1e-4 * float(np.abs(pred.scores).max()))


def test_detectors_reach_the_kernels_cuda_paths(images, monkeypatch):
    """PatchCore's coreset selection and patch embedding, PaDiM's Mahalanobis
    distances run the kernels' torch-CUDA implementations on a CUDA detector."""
    from pyad.kernels import _torch

    calls = []
    for fn in ("greedy_coreset", "patch_embed", "channel_pool", "mahalanobis"):
        real = getattr(_torch, fn)
        monkeypatch.setattr(_torch, fn, lambda *a, _f=fn, _r=real, **k: (calls.append(_f), _r(*a, **k))[1])
    pc = pyad.PatchCore(**{**CONFIGS["patchcore"][0], "device": "cuda"}).fit(images[0])
    assert "greedy_coreset" in calls and "patch_embed" in calls
    calls.clear()
    pc.predict(images[1])
    assert "patch_embed" in calls
    padim = pyad.PaDiM(**{**CONFIGS["padim"][0], "device": "cuda"}).fit(images[0])
    calls.clear()
    padim.predict(images[1])
    assert "mahalanobis" in calls


def test_onnx_runtime_cuda_provider(images, fitted_cpu, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without the CUDA provider (install onnxruntime-gpu)")
    det = fitted_cpu("patchcore")
    det.export(tmp_path / "m.onnx")
    cpu = pyad.load(tmp_path / "m.onnx").predict(images[1])
    gpu = pyad.load(tmp_path / "m.onnx", provider="cuda")
    got = gpu.predict(images[1])
    np.testing.assert_allclose(got.scores, cpu.scores, rtol=1e-3, atol=1e-4 * float(np.abs(cpu.scores).max()))
    assert "CUDAExecutionProvider" in gpu.inference_module().session.session.get_providers()
