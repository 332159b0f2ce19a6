"""Detectors. Every one follows the contract of ``base.Detector``; ``REGISTRY`` maps
each stable lower-case name (saved in model files, used by the CLI) to its class."""

from .ast import AST
from .autoencoder import AutoEncoder
from .classifier import DefectClassifier
from .base import REGISTRY, Detector, NotFittedError, Prediction, clone, load
from .efficientad import EfficientAD
from .efficientad_ast import EfficientADAST
from .ganomaly import GANomaly
from .padim import PaDiM
from .patchcore import PatchCore
from .simplenet import SimpleNet
from .spade import SPADE
from .uninformed_students import UninformedStudents
from .vae import VAE

__all__ = ["REGISTRY", "AST", "AutoEncoder", "DefectClassifier", "Detector", "EfficientAD", "EfficientADAST", "GANomaly", "NotFittedError", "PaDiM", "PatchCore", "Prediction", "SimpleNet", "SPADE", "UninformedStudents", "VAE", "clone", "load"]
