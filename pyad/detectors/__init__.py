"""Detectors. Every one follows the API of ``base.Detector``."""

from .base import REGISTRY, Detector, NotFittedError, Prediction, load
from .padim import PaDiM
from .patchcore import PatchCore
from .spade import SPADE

__all__ = ["REGISTRY", "Detector", "NotFittedError", "PaDiM", "PatchCore", "Prediction", "SPADE", "load"]
