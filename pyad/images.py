"""Image input for the detectors: reading, validation, preprocessing, and
bringing anomaly maps back to each image's own resolution.

Preprocessing follows the official PatchCore / torchvision pipeline: resize to
``image_size`` (square, bilinear), optional centre crop to ``crop_size``,
ImageNet normalisation. Maps are computed on the crop; outside it (the border a
centre crop removes) the map holds the map's minimum, so the border never
raises a false alarm; the canvas is then resized bilinearly to the image's size.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .backbones import IMAGENET_MEAN, IMAGENET_STD

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"images: {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS)
    if not files:
        raise ValueError(f"images: no image files ({', '.join(EXTENSIONS)}) in {folder}")
    return files


@contextmanager
def open_image(path: str | os.PathLike, what: str = "images"):
    """``PIL.Image.open`` whose failures, opening or decoding inside the block,
    become ``ValueError("<what>: cannot read <path>: ...")``."""
    try:
        with Image.open(path) as im:
            yield im
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc}") from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """[H, W, 3] uint8 RGB (grey images are repeated to three channels)."""
    with open_image(path) as im:
        return np.asarray(im.convert("RGB"))


def _check_array(a: np.ndarray, where: str) -> np.ndarray:
    """One image as [H, W, C] (uint8, or float in [0, 1]) with C in {1, 3}."""
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"images: {where} has shape {a.shape}; expected [H, W, C] or [C, H, W]")
    if a.shape[-1] not in (1, 3) and a.shape[0] in (1, 3):
        a = np.moveaxis(a, 0, -1)  # [C, H, W] -> [H, W, C]
    if a.shape[-1] not in (1, 3):
        raise ValueError(f"images: {where} has {a.shape[-1]} channels; expected 1 (grey) or 3 (RGB)")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"images: {where} contains NaN or Inf")
    if a.dtype.kind not in "uif":
        raise ValueError(f"images: {where} has dtype {a.dtype}; expected uint8 or float")
    return a


def iter_images(source) -> Iterator[np.ndarray]:
    """Images from a folder, a list of paths or arrays, an array batch
    ([N, H, W, C] uint8 or [N, C, H, W] float), or a dataset of dicts/samples
    with an ``image`` entry. Yields [H, W, C] arrays."""
    if isinstance(source, (str, os.PathLike)):
        for p in list_images(source):
            yield read_image(p)
        return
    if _is_tensor(source):
        source = source.detach().cpu().numpy()
    if isinstance(source, np.ndarray):
        if source.ndim != 4:
            raise ValueError(f"images: an array batch must be 4-d [N, H, W, C] or [N, C, H, W], got {source.shape}")
        if len(source) == 0:
            raise ValueError("images: the batch is empty")
        for i, a in enumerate(source):
            yield _check_array(a, f"image {i}")
        return
    count = 0
    for i, item in enumerate(source):
        if isinstance(item, dict):
            item = item["image"]
        elif hasattr(item, "path"):
            item = item.path
        elif hasattr(item, "image"):
            item = item.image
        if isinstance(item, (str, os.PathLike)):
            yield read_image(item)
        else:
            yield _check_array(np.asarray(item.detach().cpu().numpy() if _is_tensor(item) else item), f"image {i}")
        count += 1
    if count == 0:
        raise ValueError("images: no images given")


def _is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


def batches(source, size: int, transform=None) -> Iterator[list[np.ndarray]]:
    """Lists of up to ``size`` images, or of ``transform(item)`` when given: the
    item is the file path for file sources, the [H, W, C] array otherwise. Files
    are decoded (and transformed) by two background threads, ahead of use (PIL
    releases the GIL while decoding and resizing)."""
    paths = _paths(source)
    if paths is None:
        batch: list[np.ndarray] = []
        for img in iter_images(source):
            batch.append(img if transform is None else transform(img))
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch
        return
    from concurrent.futures import ThreadPoolExecutor

    def load(group):
        _lower_priority()
        return [read_image(p) if transform is None else transform(p) for p in group]

    groups = [paths[i : i + size] for i in range(0, len(paths), size)]
    # transformed (resized) images are small, so decoding may run further ahead
    ahead = 4 if transform is not None else 1
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = [pool.submit(load, g) for g in groups[:ahead]]
        for i in range(len(groups)):
            if i + ahead < len(groups):
                pending.append(pool.submit(load, groups[i + ahead]))
            yield pending[i].result()
            pending[i] = None


def _lower_priority(nice: int = 10) -> None:
    """Run this (decoding) thread at a lower priority than the compute threads: on
    a machine with as many busy torch threads as cores, decoding then fills idle
    time instead of stalling every convolution's thread barrier (measured on 2
    cores, PaDiM bottle fit: backbone time 7.4 s -> 4.4 s, fit 11.0 -> 10.4 s).
    Linux sets niceness per thread; elsewhere this does nothing."""
    import threading

    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (OSError, AttributeError):
        pass


def _paths(source) -> list | None:
    """The file paths behind a folder, a list of paths or of dataset samples; else None."""
    if isinstance(source, (str, os.PathLike)):
        return list_images(source)
    if isinstance(source, (list, tuple)) and source:
        found = [getattr(s, "path", s) for s in source]  # dataset samples carry their path
        if all(isinstance(s, (str, os.PathLike)) for s in found):
            return found
    return None


def count(source) -> int | None:
    """Number of images when it is known without reading them (for progress bars)."""
    if isinstance(source, (str, os.PathLike)):
        return len(list_images(source))
    try:
        return len(source)
    except TypeError:
        return None


class Preprocess:
    """[H, W, C] images -> normalised [B, 3, S, S] float32 tensor (S = crop or size)."""

    def __init__(self, image_size: int = 256, crop_size: int | None = 224):
        self.image_size = image_size
        self.crop_size = crop_size
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    @property
    def size(self) -> int:
        return self.crop_size or self.image_size

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return self.to_tensor([self.prepare(a) for a in images])

    def prepare(self, a) -> np.ndarray:
        """One [H, W, C] image, or an image file, -> [S, S, 3] uint8, resized and
        cropped. Thread-safe; the fit path runs it in the decoding threads, on the
        file directly (no full-resolution array copies: 28.7 -> 23.1 ms per
        900x900 PNG). Grey is resized, then repeated (the same pixels)."""
        size = (self.image_size, self.image_size)
        if isinstance(a, (str, os.PathLike)):
            with open_image(a) as im:
                im = im if im.mode in ("RGB", "L") else im.convert("RGB")
                out = np.asarray(im.resize(size, Image.BILINEAR).convert("RGB"))
        else:
            if a.dtype != np.uint8:  # float images are taken to be in [0, 1]
                a = (np.clip(a.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
            im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
            out = np.asarray(im.resize(size, Image.BILINEAR).convert("RGB"))
        if self.crop_size:
            o = (self.image_size - self.crop_size) // 2
            out = out[o : o + self.crop_size, o : o + self.crop_size]
        return out

    def to_tensor(self, prepared: Sequence[np.ndarray]) -> torch.Tensor:
        """[S, S, 3] uint8 arrays -> normalised [B, 3, S, S] float32 in channels-last
        memory (the layout the backbones run in: no transposing copy)."""
        x = torch.from_numpy(np.stack(prepared)).permute(0, 3, 1, 2).float()
        return x.div_(255.0).sub_(self.mean).div_(self.std)

    def restore(self, amap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """A [S, S] map on the (cropped) network input -> [H, W] on the original image."""
        if self.crop_size:
            canvas = np.full((self.image_size, self.image_size), amap.min(), dtype=np.float32)
            o = (self.image_size - self.crop_size) // 2
            canvas[o : o + self.crop_size, o : o + self.crop_size] = amap
            amap = canvas
        t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
        return F.interpolate(t, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter(m, sigma) per map (truncate 4, mode 'reflect'),
    as the official PatchCore and PaDiM code apply to anomaly maps. [B, H, W]."""
    if sigma <= 0:
        return maps
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).float()
    out = maps[:, None]
    for dim in (2, 3):
        out = _symmetric_pad(out, radius, dim)
        w = k.view(1, 1, -1, 1) if dim == 2 else k.view(1, 1, 1, -1)
        out = F.conv2d(out, w)
    return out[:, 0]


def _symmetric_pad(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """numpy 'symmetric' (scipy 'reflect') padding along ``dim``, any r."""
    n = x.shape[dim]
    idx = torch.arange(-r, n + r)
    period = 2 * n
    idx = idx % period
    idx = torch.where(idx >= n, period - 1 - idx, idx)
    return x.index_select(dim, idx)
