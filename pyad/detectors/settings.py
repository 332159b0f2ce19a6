"""The settings every detector shares, as small dataclasses.

Users still pass plain keyword arguments (``pyad.PatchCore(image_size=320)``);
each detector declares which groups it takes and its own defaults for them,
and the groups validate their values (a ``ValueError`` naming the parameter).
"""

from __future__ import annotations

from dataclasses import dataclass, fields


def check(cond, name: str, expected: str, value) -> None:
    """Raise ``ValueError("<name>: expected <expected>, got <value>")`` unless ``cond``
    (a callable is evaluated here, so a type error in it reports the same way)."""
    try:
        ok = cond() if callable(cond) else cond
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def _int(v, lo=None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Group:
    """Base of a settings group: ``names()`` and ``of(detector)``."""

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def of(cls, obj) -> "Group":
        return cls(**{n: getattr(obj, n) for n in cls.names()})

    def check(self) -> None: ...


@dataclass(frozen=True)
class Preprocessing(Group):
    """Square resize to ``image_size`` (bilinear), then an optional centre crop to
    ``crop_size`` (None: no crop, the whole image is scored)."""

    image_size: int = 256
    crop_size: int | None = None

    def check(self):
        check(_int(self.image_size, 16), "image_size", "an int >= 16", self.image_size)
        check(self.crop_size is None or (_int(self.crop_size, 16) and self.crop_size <= self.image_size),
              "crop_size", "None or an int in [16, image_size]", self.crop_size)

    @property
    def size(self) -> int:
        return self.crop_size or self.image_size


@dataclass(frozen=True)
class BackboneSettings(Group):
    """backbone: a name of ``pyad.backbones.NAMES``; weights: "imagenet", a checkpoint
    path, or None (seeded random init); layers: the feature taps."""

    backbone: str = "wide_resnet50_2"
    weights: str | None = "imagenet"
    layers: tuple = ("layer2", "layer3")

    def check(self):
        from ..backbones import NAMES

        check(self.backbone in NAMES, "backbone", f"one of {', '.join(NAMES)}", self.backbone)
        check(self.weights is None or isinstance(self.weights, str) or hasattr(self.weights, "__fspath__"),
              "weights", "'imagenet', a checkpoint path or None", self.weights)
        if self.weights is not None and self.weights != "imagenet":
            from pathlib import Path

            if not Path(self.weights).is_file():
                raise ValueError(f"weights: no checkpoint file at {self.weights} (expected 'imagenet', a checkpoint "
                                 "path or None)")
        check(isinstance(self.layers, (tuple, list)) and len(self.layers) > 0 and all(isinstance(x, str) for x in self.layers),
              "layers", "a non-empty tuple of layer names", self.layers)


@dataclass(frozen=True)
class Runtime(Group):
    """device: "cpu", "cuda" or "cuda:N"; batch_size: images per forward pass;
    seed: random init, data order and the validation split; precision: inference
    arithmetic, "float32", or "float16" / "bfloat16" (CUDA autocast; distances and
    maps stay float32); on the CPU "bfloat16" runs the frozen-feature detectors'
    backbone (fit and predict) under CPU autocast, everything after it in float32, and
    EfficientAD's three networks at predict (fast where the CPU has bfloat16 dot
    products: AVX512-BF16, AMX, Arm BF16); exports stay float32; and
    ``det.quantize`` gives int8."""

    device: str = "cpu"
    batch_size: int = 8
    seed: int = 0
    precision: str = "float32"

    def check(self):
        check(isinstance(self.device, str) and (self.device in ("cpu", "cuda") or self.device.startswith("cuda:")),
              "device", "'cpu', 'cuda' or 'cuda:N'", self.device)
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"device: {self.device!r} was asked for but CUDA is not available "
                                 f"(torch {torch.__version__}); use device='cpu'")
        check(_int(self.batch_size, 1), "batch_size", "a positive int", self.batch_size)
        check(_int(self.seed), "seed", "an int", self.seed)
        check_precision(self.precision, self.device)


PRECISIONS = ("float32", "float16", "bfloat16")


def check_precision(precision, device) -> None:
    check(precision in PRECISIONS, "precision", f"one of {PRECISIONS}", precision)
    if precision == "float16" and not str(device).startswith("cuda"):
        raise ValueError("precision: 'float16' runs on CUDA only (device='cuda'); on the CPU use 'bfloat16' "
                         "or det.quantize(calibration_images) for int8")


@dataclass(frozen=True)
class Thresholds(Group):
    """validation: the share of the training images held out as normal validation
    images (seeded), from which the image threshold (``threshold_quantile`` of their
    scores) and the pixel threshold (the same quantile of their maps' maxima) are
    learnt; ``fit(..., validation=images)`` passes them explicitly instead."""

    threshold_quantile: float = 0.99
    validation: float = 0.1

    def check(self):
        check(_num(self.threshold_quantile) and 0 < self.threshold_quantile <= 1, "threshold_quantile",
              "a number in (0, 1]", self.threshold_quantile)
        check(_num(self.validation) and 0 <= self.validation < 1, "validation", "a share in [0, 1)", self.validation)


@dataclass(frozen=True)
class Training(Group):
    """The names every gradient-trained detector shares. ``max_steps`` and
    ``max_epochs``: the budget (the method counts in one; the other also limits);
    ``early_stopping_patience``: validations without improvement of the validation
    loss (normal validation images only) before stopping, None = off; ``amp``:
    None, "auto", "bf16" or "fp16"."""

    max_epochs: int | None = None
    max_steps: int | None = None
    lr: float = 1e-4
    early_stopping_patience: int | None = None
    amp: str | None = None

    def check(self):
        check(self.max_epochs is None or _int(self.max_epochs, 0), "max_epochs", "None or an int >= 0", self.max_epochs)
        check(self.max_steps is None or _int(self.max_steps, 0), "max_steps", "None or an int >= 0", self.max_steps)
        check(self.max_epochs is not None or self.max_steps is not None, "max_epochs",
              "max_epochs or max_steps to be set", self.max_epochs)
        check(_num(self.lr) and self.lr > 0, "lr", "a positive number", self.lr)
        check(self.early_stopping_patience is None or _int(self.early_stopping_patience, 1),
              "early_stopping_patience", "None or an int >= 1", self.early_stopping_patience)
        check(self.amp in (None, "auto", "bf16", "fp16"), "amp", "None, 'auto', 'bf16' or 'fp16'", self.amp)
