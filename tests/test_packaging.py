"""The installed dependencies satisfy what pyproject.toml promises (CI installs what
the README says: this checks the two agree), and ``import pyad`` stays light."""

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")
requirements = pytest.importorskip("packaging.requirements")

ROOT = Path(__file__).resolve().parents[1]


def test_installed_versions_satisfy_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for text in deps:
        req = requirements.Requirement(text)
        version = md.version(req.name)
        assert req.specifier.contains(version, prereleases=True), f"{req.name} {version} does not satisfy {text}"


def test_readme_installs_a_torch_pyproject_accepts():
    readme = (ROOT / "README.md").read_text()
    pinned = readme.split("torch==", 1)[1].split()[0].strip('"')
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = requirements.Requirement(next(d for d in deps if d.startswith("torch")))
    assert torch_req.specifier.contains(pinned)
    assert md.version("torch").split("+")[0] == pinned  # CI runs what the README installs


def test_import_pyad_loads_neither_torch_nor_numba():
    code = "import sys, pyad; print('torch' in sys.modules, 'numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
