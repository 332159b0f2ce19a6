"""Argument checks shared by the public kernels: clear errors, no silent surprises."""

from __future__ import annotations

from typing import Any

import numpy as np


def is_torch(x: Any) -> bool:
    """True for a torch.Tensor, without importing torch."""
    return type(x).__module__.startswith("torch") and hasattr(x, "device")


def is_cuda(x: Any) -> bool:
    return is_torch(x) and x.device.type != "cpu"


def array(x: Any, name: str, ndim: int | tuple[int, ...], *, dtype=np.float32, finite: bool = True) -> np.ndarray:
    """``x`` as a C-contiguous array of ``dtype``; ValueError naming ``name`` otherwise.

    Torch CPU tensors are viewed, not copied, when already of the right dtype
    and layout; other layouts and dtypes are converted.
    """
    if is_torch(x):
        x = x.detach().numpy()
    try:
        a = np.asarray(x)
    except Exception as exc:  # e.g. ragged lists
        raise ValueError(f"{name}: expected an array, got {type(x).__name__} ({exc})") from None
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if a.ndim not in dims:
        want = " or ".join(f"{d}-d" for d in dims)
        raise ValueError(f"{name}: expected a {want} array, got shape {a.shape}")
    if a.dtype.kind not in "fiu":
        raise ValueError(f"{name}: expected real numbers, got dtype {a.dtype}")
    if a.size == 0:
        raise ValueError(f"{name}: expected a non-empty array, got shape {a.shape}")
    if finite and a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"{name}: contains NaN or Inf")
    return np.ascontiguousarray(a, dtype=dtype)


def integer(v: Any, name: str, lo: int, hi: int | None = None) -> int:
    """``v`` as an int in [lo, hi]; ValueError naming ``name`` otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{name}: expected an integer, got {v!r}")
    v = int(v)
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name}: expected an integer {rng}, got {v}")
    return v


def choice(v: Any, name: str, options: tuple[str, ...]) -> str:
    if v not in options:
        raise ValueError(f"{name}: expected one of {options}, got {v!r}")
    return v
