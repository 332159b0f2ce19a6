"""The training engine of the gradient-trained detectors: a plain PyTorch loop.

A detector writes its loop top to bottom; ``Run`` only does the bookkeeping
every trained detector needs (progress with the loss, optimiser steps with AMP
and gradient clipping, schedulers, early stopping on a *validation* quantity,
resumable checkpoints in the model-file format):

    run = Run("efficientad", modules={"student": s, "ae": a}, optimizers={"adam": opt},
              schedulers={"step": sched}, max_steps=70_000, checkpoint=path, device="cpu")
    for step in run.steps():               # resumes where an interrupted run stopped
        x = next(images)
        with run.autocast():
            loss = ...
        run.backward(loss)                 # scale (fp16), clip, step every optimiser, zero grads
        run.log(loss=loss)                 # progress bar postfix and history

    for epoch in run.epochs():             # epoch-based methods
        for batch in loader(epoch):
            ...
        if run.validate(val_loss):         # early stopping (lower is better); True = stop
            break
    run.finish()                           # best weights back when early stopping was used

Checkpoints hold the modules, optimisers, schedulers, step, epoch, RNG states
and early-stopping state; they are written atomically (never a partial file),
so Ctrl-C leaves the last good one, and a run started with the same checkpoint
path and settings continues from it to the same final state.

Validation data always comes from normal *training* images (pyad never selects
epochs, thresholds or normalisation on test images).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from . import _progress


# -- factories --------------------------------------------------------------------------------------
def optimizer(name: str, params, lr: float, weight_decay: float = 0.0, **kwargs) -> torch.optim.Optimizer:
    """``"adam"``, ``"adamw"`` or ``"sgd"`` over ``params``."""
    name = name.lower()
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **kwargs)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, **kwargs)
    raise ValueError(f"optimizer: expected 'adam', 'adamw' or 'sgd', got {name!r}")


def scheduler(name: str | None, opt: torch.optim.Optimizer, *, total: int = 1, step_at: float = 0.95,
              gamma: float = 0.1, warmup: int = 0, patience: int = 5, factor: float = 0.1):
    """``None``/"none", ``"step"`` (lr × ``gamma`` once ``step_at`` of ``total``
    steps are done, as EfficientAD's StepLR), ``"cosine"`` (to 0 over ``total``),
    ``"warmup"`` (linear warm-up over ``warmup`` steps, then constant),
    ``"warmup_cosine"`` or ``"plateau"`` (ReduceLROnPlateau, stepped with the
    validation value by ``Run.validate``)."""
    if name in (None, "none"):
        return None
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, int(step_at * total)), gamma=gamma)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total))
    if name in ("warmup", "warmup_cosine"):
        cosine = name == "warmup_cosine"

        def factor_at(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            if not cosine:
                return 1.0
            t = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor_at)
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=patience, factor=factor)
    raise ValueError(f"scheduler: expected None, 'step', 'cosine', 'warmup', 'warmup_cosine' or 'plateau', got {name!r}")


@contextlib.contextmanager
def seeded(seed: int, device: str = "cpu"):
    """Run a block with torch's global RNG seeded, and restore the caller's RNG state
    afterwards (fitting a detector does not disturb the user's random streams)."""
    devices = [torch.device(device).index or 0] if str(device).startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def amp_dtype(amp: str | None, device: str) -> torch.dtype | None:
    """The autocast dtype for ``amp`` = None/"off", "bf16", "fp16" or "auto" (fp16 on
    CUDA, off on CPU: on these CPUs bf16 autocast made training slower, measured)."""
    if amp in (None, "off", False):
        return None
    if amp == "auto":
        return torch.float16 if str(device).startswith("cuda") else None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if not str(device).startswith("cuda"):
            raise ValueError("amp: 'fp16' needs device='cuda'; use 'bf16' on the CPU")
        return torch.float16
    raise ValueError(f"amp: expected None, 'auto', 'bf16' or 'fp16', got {amp!r}")


# -- the run ------------------------------------------------------------------------------------------
class Run:
    """Bookkeeping of one training run (see the module docstring).

    name:        shown in progress and checked when resuming.
    modules:     {name: nn.Module} trained (and checkpointed) by this run.
    optimizers:  {name: optimizer}; ``backward`` steps all of them unless told which.
    schedulers:  {name: scheduler}; stepped per step (``steps``) or per epoch (``epochs``);
                 a ReduceLROnPlateau is stepped by ``validate``.
    max_steps / max_epochs: the budget (whichever the method counts in).
    checkpoint:  a path; when it exists and its settings match, the run resumes from it.
    checkpoint_every: seconds between checkpoints in ``steps`` mode (epochs: every epoch).
    settings:    a JSON-able dict that must match for a checkpoint to be resumed.
    early_stopping_patience: epochs (validations) without improvement before stopping.
    """

    def __init__(self, name: str, *, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                 schedulers: dict | None = None, max_steps: int | None = None, max_epochs: int | None = None,
                 checkpoint=None, checkpoint_every: float = 60.0, settings: dict | None = None,
                 device: str = "cpu", amp: str | None = None, grad_clip: float | None = None,
                 early_stopping_patience: int | None = None, min_delta: float = 0.0):
        if max_steps is None and max_epochs is None:
            raise ValueError("max_steps / max_epochs: give at least one training budget")
        for label, v in (("max_steps", max_steps), ("max_epochs", max_epochs)):
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"{label}: expected a non-negative int or None, got {v!r}")
        if early_stopping_patience is not None and early_stopping_patience < 1:
            raise ValueError(f"early_stopping_patience: expected None or an int >= 1, got {early_stopping_patience!r}")
        self.name = name
        self.modules = modules
        self.optimizers = optimizers
        self.schedulers = {k: v for k, v in (schedulers or {}).items() if v is not None}
        self.max_steps, self.max_epochs = max_steps, max_epochs
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.checkpoint_every = checkpoint_every
        self.settings = settings or {}
        self.device = str(device)
        self.amp = amp_dtype(amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        self.grad_clip = grad_clip
        self.patience = early_stopping_patience
        self.min_delta = min_delta
        self.step = 0
        self.epoch = 0
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.stopped_early = False
        self.history: list[dict] = []  # one row per epoch / validation
        self._best_state: dict | None = None
        self._running: dict[str, list[float]] = {}
        self._bar = None
        self._last_save = time.monotonic()
        self.resumed = self._resume()

    # -- loop drivers --------------------------------------------------------------------------------
    def steps(self) -> Iterator[int]:
        """Step indices from where the run is to ``max_steps`` (per-step schedulers
        stepped, progress shown, a checkpoint every ``checkpoint_every`` seconds)."""
        total = self.max_steps
        self._bar = _progress.bar(total=total, initial=self.step, desc=f"{self.name}: training", unit="step")
        try:
            while self.step < total:
                yield self.step
                self.step += 1
                for s in self.schedulers.values():
                    if not isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau):
                        s.step()
                self._bar.update(1)
                self._show()
                if self.checkpoint and time.monotonic() - self._last_save > self.checkpoint_every:
                    self.save_checkpoint()
        finally:
            self._bar.close()
        if self.checkpoint:
            self.save_checkpoint()

    def epochs(self) -> Iterator[int]:
        """Epoch indices from where the run is to ``max_epochs`` (per-epoch schedulers
        stepped, checkpoint after each epoch); stops early when ``validate`` says so
        or when ``max_steps`` is reached."""
        self._bar = _progress.bar(total=self.max_epochs, initial=self.epoch, desc=f"{self.name}: training",
                                  unit="epoch")
        try:
            while self.epoch < self.max_epochs and not self.stopped_early:
                if self.max_steps is not None and self.step >= self.max_steps:
                    break
                yield self.epoch
                self.epoch += 1
                for s in self.schedulers.values():
                    if not isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau):
                        s.step()
                self._bar.update(1)
                self._epoch_row()
                if self.checkpoint:
                    self.save_checkpoint()
        finally:
            self._bar.close()

    def each(self, batches) -> Iterator:
        """The items of one epoch's ``batches``, counting a step after each and
        stopping once ``max_steps`` are done (epoch mode with a step budget)."""
        for item in batches:
            if self.max_steps is not None and self.step >= self.max_steps:
                return
            yield item
            self.step += 1

    # -- one step ------------------------------------------------------------------------------------
    def autocast(self):
        """Autocast context for the forward pass (no-op without AMP)."""
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=self.amp)

    def backward(self, loss: torch.Tensor, *optimizers: str) -> None:
        """Backward pass, gradient clipping, and a step of the named optimisers (all
        by default); gradients are zeroed afterwards. Raises on a non-finite loss
        (a diverged run is an error, not a silent NaN model)."""
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"{self.name}: the training loss became {loss.item()} at step {self.step}; "
                                     "lower lr or enable grad_clip")
        opts = [self.optimizers[n] for n in optimizers] if optimizers else list(self.optimizers.values())
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            for opt in opts:
                self.scaler.unscale_(opt)
        else:
            loss.backward()
        if self.grad_clip:
            params = [p for opt in opts for g in opt.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        for opt in opts:
            if self.scaler is not None:
                self.scaler.step(opt)
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()

    def log(self, **values) -> None:
        """Running values (losses) shown in the progress bar and averaged per epoch."""
        for k, v in values.items():
            self._running.setdefault(k, []).append(float(v.detach()) if isinstance(v, torch.Tensor) else float(v))

    def _show(self) -> None:
        if self._bar is not None and self._running and self.step % 10 == 0:
            self._bar.set_postfix({k: f"{np.mean(v[-50:]):.4g}" for k, v in self._running.items()}, refresh=False)

    def _epoch_row(self) -> None:
        row = {"epoch": self.epoch, "step": self.step, **{k: float(np.mean(v)) for k, v in self._running.items()}}
        if self.history and self.history[-1].get("epoch") == self.epoch:
            self.history[-1].update(row)
        else:
            self.history.append(row)
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k not in ("epoch", "step")}, refresh=False)
        self._running = {}

    # -- early stopping ---------------------------------------------------------------------------------
    def validate(self, value: float) -> bool:
        """Record a validation value (lower is better; computed on normal validation
        images). Keeps the best modules' weights; returns True when training should
        stop (``early_stopping_patience`` validations without improvement)."""
        value = float(value)
        row = {"epoch": self.epoch + 1, "validation": value}
        if self.history and self.history[-1].get("epoch") == self.epoch + 1:
            self.history[-1].update(row)
        else:
            self.history.append(row)
        for s in self.schedulers.values():
            if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau):
                s.step(value)
        if not math.isfinite(value):
            raise FloatingPointError(f"{self.name}: the validation value became {value} at epoch {self.epoch + 1}")
        if self.best is None or value < self.best - self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, self.epoch + 1, 0
            self._best_state = {k: copy.deepcopy(m.state_dict()) for k, m in self.modules.items()}
        else:
            self.bad_epochs += 1
        if self.patience is not None and self.bad_epochs >= self.patience:
            self.stopped_early = True
        return self.stopped_early

    def finish(self) -> None:
        """Restore the best weights (by validation) when early stopping was used."""
        if self.patience is not None and self._best_state is not None:
            for k, m in self.modules.items():
                m.load_state_dict(self._best_state[k])

    # -- checkpoints ------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "name": self.name, "settings": self.settings, "step": self.step, "epoch": self.epoch,
            "best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
            "stopped_early": self.stopped_early, "history": self.history,
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "best_state": self._best_state,
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state() if self.device.startswith("cuda") else None,
        }

    def save_checkpoint(self) -> None:
        """Write the checkpoint atomically (model-file format, no pickle)."""
        from . import modelfile

        modelfile.write_tree(self.checkpoint, {"kind": "checkpoint"}, self.state())
        self._last_save = time.monotonic()

    def _resume(self) -> bool:
        if self.checkpoint is None or not self.checkpoint.exists():
            return False
        from . import modelfile

        meta, st = modelfile.read_tree(self.checkpoint)
        if meta.get("kind") != "checkpoint":
            raise ValueError(f"checkpoint: {self.checkpoint} is not a training checkpoint")
        if st["name"] != self.name or _jsonable(st["settings"]) != _jsonable(self.settings):
            raise ValueError(f"checkpoint: {self.checkpoint} belongs to another run ({st['name']}, settings "
                             f"{st['settings']}); delete it or pass another checkpoint path")
        for k, m in self.modules.items():
            m.load_state_dict(st["modules"][k])
        for k, o in self.optimizers.items():
            o.load_state_dict(st["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(st["schedulers"][k])
        if self.scaler is not None and st["scaler"] is not None:
            self.scaler.load_state_dict(st["scaler"])
        for key in ("step", "epoch", "best", "best_epoch", "bad_epochs", "stopped_early", "history"):
            setattr(self, key, st[key])
        self._best_state = st["best_state"]
        torch.set_rng_state(st["rng_torch"])
        if st.get("rng_cuda") is not None and self.device.startswith("cuda"):
            torch.cuda.set_rng_state(st["rng_cuda"])
        return True


def _jsonable(x):
    import json

    return json.loads(json.dumps(x, default=str))


# -- data ----------------------------------------------------------------------------------------------
class Batches:
    """Seeded shuffled minibatches over ``n`` items, epoch after epoch. The order of
    epoch e depends only on (seed, e), so a resumed run sees the same batches."""

    def __init__(self, n: int, batch_size: int, seed: int, drop_last: bool = False):
        if n < 1:
            raise ValueError("train: no training images")
        self.n, self.batch_size, self.seed, self.drop_last = n, batch_size, seed, drop_last

    def epoch(self, e: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.seed, e]).permutation(self.n)
        cut = self.n - self.n % self.batch_size if self.drop_last and self.n >= self.batch_size else self.n
        return [order[i : i + self.batch_size] for i in range(0, cut, self.batch_size)]

    def __len__(self) -> int:
        return len(self.epoch(0))

    def step(self, s: int) -> np.ndarray:
        """The batch of global step ``s`` (an endless stream of epochs)."""
        per = len(self)
        return self.epoch(s // per)[s % per]


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
