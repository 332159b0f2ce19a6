"""pyad: fast, faithful visual anomaly detection for industrial inspection.

Train a detector on defect-free images, then score new images and localise
defects. Scores follow one convention throughout: **higher = more anomalous**
(the opposite of scikit-learn's ``score_samples``).
"""

from ._version import __version__
from . import kernels


def info() -> dict:
    """Version and the kernels in use: ``{"version", "backend", "isa", "threads", ...}``."""
    return {"version": __version__, **kernels.info()}


__all__ = ["__version__", "info", "kernels"]
