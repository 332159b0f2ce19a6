"""The family of detectors trained with gradient descent (EfficientAD, AST, SimpleNet,
autoencoders, GANomaly, the supervised classifier, ...).

A member lists its networks (``_networks``: built from the parameters, untrained),
writes its training loop with ``pyad.training.Run`` in ``_train`` and builds its
inference module from the trained networks and buffers. This base handles the
images (decoded and resized once, held as uint8), saving every network's weights
with the model, and the common training parameters (``settings.Training``).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from .. import _progress
from .. import images as imgs
from .base import Detector, Validation
from .settings import Preprocessing, Runtime, Thresholds, Training


class TrainedDetector(Detector):
    groups = (Preprocessing, Runtime, Thresholds, Training)
    # parameters that do not touch training: a checkpoint resumes across them
    resume_across: ClassVar[frozenset] = frozenset()

    # -- subclass contract ---------------------------------------------------------------------------------
    def _networks(self) -> dict[str, nn.Module]:
        """The networks this detector trains, freshly built (seeded by the caller)."""
        raise NotImplementedError

    def _train(self, nets: dict[str, nn.Module], train: torch.Tensor, val: torch.Tensor, *, labels=None,
               checkpoint=None) -> Validation | None:
        """Train ``nets`` on ``train`` (uint8 [N, S, S, 3], decoded and resized once);
        ``val`` holds the normal validation images (may be empty). Set any fitted
        buffers (e.g. normalisation statistics) as attributes ending in ``_``."""
        raise NotImplementedError

    def _buffers(self) -> dict:
        """Fitted values besides the networks' weights (arrays, tensors, numbers)."""
        return {}

    def _load_buffers(self, state: dict) -> None: ...

    # -- shared machinery ------------------------------------------------------------------------------------
    def _fit(self, items, val_items, *, labels=None, checkpoint=None):
        from .. import training

        train = self.load_images(items, "train")
        val = self.load_images(val_items, "validation") if val_items else train[:0]
        with training.seeded(self.seed, self.device):
            nets = {k: v.to(self.device) for k, v in self._networks().items()}
            out = self._train(nets, train, val, labels=labels, checkpoint=checkpoint)
        self.networks_ = {k: v.cpu().eval() for k, v in nets.items()}
        for net in self.networks_.values():
            for p in net.parameters():
                p.requires_grad_(False)
        return out

    def run_settings(self) -> dict:
        """What a checkpoint must match to be resumed: every parameter except the
        runtime ones, the budget (a finished run may be continued with more) and
        ``resume_across`` (those that do not touch training, e.g. the image score)."""
        skip = self.runtime_params | self.resume_across | {"max_epochs", "max_steps", "early_stopping_patience"}
        return {k: v for k, v in self.get_params().items() if k not in skip}

    def load_images(self, items: list, what: str = "images") -> torch.Tensor:
        """Images decoded and resized once: uint8 [N, S, S, 3] (S = the network input)."""
        pre = self.preprocessing
        out = None
        bar = _progress.bar(total=len(items), desc=f"{type(self).__name__}: reading {what}", unit="img")
        n = 0
        for batch in imgs.load_batches(items, self.batch_size, pre):
            if out is None:
                out = np.empty((len(items), *batch[0].pixels.shape), np.uint8)
            for b in batch:
                out[n] = b.pixels
                n += 1
            bar.update(len(batch))
        bar.close()
        if out is None:
            raise ValueError(f"{what}: no images")
        return torch.from_numpy(out)

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, S, S, 3] -> the inference module's input [B, 3, S, S] float32 (the
        shared pre-processing's normalisation), on the detector's device."""
        return self.preprocessing.to_tensor(list(images.numpy())).to(self.device)

    def _state(self) -> dict:
        return {"networks": {k: v.state_dict() for k, v in self.networks_.items()}, "buffers": self._buffers()}

    def _load_state(self, state: dict) -> None:
        from .. import training

        with training.seeded(self.seed):
            nets = self._networks()
        for k, net in nets.items():
            net.load_state_dict(state["networks"][k])
            net.eval()
            for p in net.parameters():
                p.requires_grad_(False)
        self.networks_ = nets
        self._load_buffers(state["buffers"])
