import importlib

import numpy as np
import pytest

from pyad import kernels as K


def _backends():
    """(backend, isa) pairs this machine runs: native at every supported ISA."""
    out = [("numpy", None), ("numba", None)]
    try:
        core = importlib.import_module("pyad._core")
        out += [("native", isa) for isa in core.supported_isas()]
    except ImportError:
        pass
    return out


BACKENDS = _backends()
FAST = [b for b in BACKENDS if b[0] != "numpy"]


def _id(b):
    return b[0] if b[1] is None else f"{b[0]}-{b[1]}"


def pytest_report_header(config):
    import pyad

    return [f"pyad {pyad.__version__}: {pyad.info()}", "kernel backends under test: " + ", ".join(map(_id, BACKENDS))]


@pytest.fixture(params=FAST, ids=_id)
def backend(request):
    """Each fast backend (numba, native at every ISA), compared to the NumPy reference."""
    with K.use_backend(*request.param):
        yield request.param


def noisy_images(seed, size, n_train, n_test, lo, hi, noise):
    """(train, test) uint8 [N, size, size, 3]: one random base image plus uniform
    noise in [-noise, noise) per image; the detector tests add defects to test."""
    rng = np.random.default_rng(seed)
    base = rng.integers(lo, hi, (1, size, size, 3))
    train = np.clip(base + rng.integers(-noise, noise, (n_train, size, size, 3)), 0, 255).astype(np.uint8)
    test = np.clip(base + rng.integers(-noise, noise, (n_test, size, size, 3)), 0, 255).astype(np.uint8)
    return train, test


def defect_images(seed, size, n_train, n_test, defect: tuple[int, int]):
    """``noisy_images`` (grey levels 90..160, noise 10) whose test images from the
    third on carry a bright square over rows and columns ``defect`` [lo, hi)."""
    train, test = noisy_images(seed, size, n_train, n_test, 90, 160, 10)
    test[2:, defect[0] : defect[1], defect[0] : defect[1]] = 250
    return train, test


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks train fastest on one thread (no synchronisation: 3.5x faster on
    a busy 2-core machine); a module opts in with ``pytestmark = usefixtures``."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def pytest_terminal_summary(terminalreporter):
    import sys

    mod = sys.modules.get("test_bottle")
    lines = mod.pytest_terminal_summary_lines() if mod else []
    if lines:
        terminalreporter.write_sep("-", "MVTec AD bottle")
        for line in lines:
            terminalreporter.write_line(line)
