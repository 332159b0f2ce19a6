"""pyad: fast, faithful visual anomaly detection for industrial inspection.

Train a detector on defect-free images, then score new images and localise
defects. Scores follow one convention throughout: **higher = more anomalous**
(the opposite of scikit-learn's ``score_samples``).

    import pyad
    det = pyad.PatchCore().fit("bottle/train/good")
    pred = det.predict("bottle/test/broken_large")   # scores [N], maps [N, H, W], labels [N]
    det.save("bottle.pyad"); det = pyad.load("bottle.pyad")
    report = pyad.evaluate(pyad.PatchCore(), pyad.datasets.mvtec_ad("mvtec_ad", "bottle"))

Detectors are imported on first use, so ``import pyad`` loads neither torch nor
numba.
"""

from ._version import __version__
from . import kernels

_LAZY = {"AST", "UninformedStudents", "PatchCore", "PaDiM", "SPADE", "AutoEncoder", "SimpleNet", "GANomaly", "EfficientAD", "EfficientADAST", "VAE", "DefectClassifier", "Detector", "Prediction", "NotFittedError", "load", "clone", "REGISTRY"}
_EVALUATION = {"evaluate", "latency", "Report"}
_MODULES = {"classification", "datasets", "metrics", "evaluation", "plots", "backbones", "images", "training", "ops", "distill", "export"}
_FUNCTIONS = {"distill_teacher": "distill", "OnnxDetector": "export"}  # name -> module holding it


def __getattr__(name):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(".detectors", __name__), name)
    if name in _EVALUATION:
        return getattr(importlib.import_module(".evaluation", __name__), name)
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(f".{_FUNCTIONS[name]}", __name__), name)
    raise AttributeError(f"module 'pyad' has no attribute {name!r}")


def set_threads(n: int) -> None:
    """Threads for everything pyad runs: torch (intra-op), the compiled and numba
    kernels (OpenMP) and faiss. A service that predicts from several threads should
    give each request few threads (e.g. ``set_threads(1)`` with one request per core):
    oversubscribed cores make every call slower."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive integer, got {n!r}")
    import torch

    torch.set_num_threads(n)
    kernels.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:  # pragma: no cover - faiss is a dependency
        pass


def info() -> dict:
    """Version and the kernels in use: ``{"version", "backend", "isa", "threads", ...}``."""
    return {"version": __version__, **kernels.info()}


__all__ = ["__version__", "info", "kernels", "set_threads", *sorted(_LAZY | _EVALUATION | _MODULES | set(_FUNCTIONS))]
