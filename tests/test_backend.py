"""Backend selection, reporting, overrides and concurrency."""

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

import pyad
from pyad import kernels as K

core = pytest.importorskip("pyad._core")


def run(code, *args, **env):
    """Run ``python -c code`` (or ``python *args``) in a fresh interpreter,
    outside the source tree, whose pyad/ has no compiled module and would shadow
    the installed package."""
    import os
    import tempfile

    return subprocess.run(
        [sys.executable, *(args or ("-c", code))],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
        cwd=tempfile.gettempdir(),
    )


def test_info_reports_the_live_implementation():
    info = pyad.info()
    assert {"version", "backend", "isa", "threads"} <= info.keys()
    assert info["backend"] in K.BACKENDS
    assert info["isa"] in ("avx512", "avx2", "sse", "neon", "scalar")
    assert info["threads"] >= 1


def test_cli_info():
    proc = run(None, "-m", "pyad", "info")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["version"] == pyad.__version__


@pytest.mark.parametrize("backend", ["native", "numba", "numpy"])
def test_pyad_backend_env_forces_a_backend(backend):
    proc = run("import pyad; print(pyad.info()['backend'])", PYAD_BACKEND=backend)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == backend


@pytest.mark.parametrize("isa", core.supported_isas())
def test_pyad_isa_caps_the_instruction_set(isa):
    proc = run("import pyad; print(pyad.info()['isa'])", PYAD_ISA=isa)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == isa


def test_forcing_something_unavailable_raises():
    proc = run("import pyad; pyad.info()", PYAD_BACKEND="gpu")
    assert proc.returncode != 0 and "backend" in proc.stderr
    missing = [i for i in ("scalar", "sse", "avx2", "avx512", "neon") if i not in core.supported_isas()]
    proc = run("import pyad; pyad.info()", PYAD_ISA=missing[0])
    assert proc.returncode != 0 and "PYAD_ISA" in proc.stderr
    with pytest.raises(ValueError, match="isa"):
        K.set_backend("numba", "avx2")


def test_import_is_light():
    proc = run("import sys, pyad; pyad.info(); print('numba' in sys.modules, 'torch' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]  # no JIT, no torch at import


def test_concurrent_calls_match_serial(rng):
    x = rng.standard_normal((4, 50, 20)).astype(np.float32)
    model = K.gaussian_fit(x)
    fmap = rng.standard_normal((2, 64, 14, 14)).astype(np.float32)
    bank = rng.standard_normal((5000, 32)).astype(np.float32)
    serial = (K.mahalanobis(x, model), K.patch_embed(fmap, 100), K.greedy_coreset(bank, 30))
    results, errors = [None] * 8, []

    def work(i):
        try:
            results[i] = (K.mahalanobis(x, model), K.patch_embed(fmap, 100), K.greedy_coreset(bank, 30))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r in results:
        for a, b in zip(r, serial):
            np.testing.assert_array_equal(a, b)


def test_thread_count_is_settable():
    before = core.num_threads()
    try:
        K.set_num_threads(1)
        assert pyad.info()["threads"] == 1
    finally:
        core.set_num_threads(0)
    assert core.num_threads() == before
    with pytest.raises(ValueError, match="n"):
        K.set_num_threads(0)
