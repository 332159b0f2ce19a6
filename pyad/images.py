"""Image input for the detectors: reading, validation, preprocessing, and
bringing anomaly maps back to each image's own resolution.

Preprocessing follows the official PatchCore / torchvision pipeline: resize to
``image_size`` (square, bilinear), optional centre crop to ``crop_size``,
ImageNet normalisation. Maps are computed on the crop; outside it (the border a
centre crop removes) the map holds the map's minimum, so the border never
raises a false alarm; the canvas is then resized bilinearly to the image's size.

Accepted inputs. Arrays: [H, W, C] or [C, H, W] with C = 3 (RGB, or BGR with
``channel_order="bgr"``) or 1 (grey); dtype uint8 (0..255), uint16 (0..65535) or
float16/32/64 in [0, 1]. Anything else (other integer dtypes, bool, floats
outside [0, 1] or not finite) is refused with a ``ValueError`` that says what
was found. Files: whatever Pillow reads, decoded as RGB; 16-bit grey files are
scaled to 8 bits (value / 257, rounded, as uint16 arrays are), 16-bit colour
PNGs keep each sample's high byte (Pillow's decoding: within one level of the
rounded value). Images are taken to 8 bits per channel before resizing, the
precision of the data the backbones were trained on. Files over ``MAX_PIXELS``
pixels are refused (a guard against decompression bombs). 8-bit grey, RGB and
RGBA PNGs are decoded here (the largest stage of a PaDiM fit after the backbone):
chunks parsed in Python, the image data inflated by zlib-ng (imagecodecs) and its
rows reconstructed by the compiled kernel (csrc/bind_png.cpp), the GIL released in
both; the same pixels as Pillow's (tested) at 7.4 ms per 900x900 RGB image (libpng
through imagecodecs 11.5, Pillow 21.0). Interlaced files and files without the
compiled module go through imagecodecs' libpng; Pillow decodes everything else, and
everything when imagecodecs is not installed.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

try:
    import imagecodecs
except ImportError:  # pragma: no cover - a dependency; Pillow decodes everything without it
    imagecodecs = None
try:
    from . import _core
except ImportError:  # pragma: no cover - imagecodecs' libpng then reconstructs the rows
    _core = None

from .backbones import IMAGENET_MEAN, IMAGENET_STD
from .ops import gaussian_blur  # noqa: F401  (re-exported: maps are blurred as in the official codes)

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def list_images(folder: str | os.PathLike, what: str = "images") -> list[Path]:
    """The image files under ``folder``, searched recursively in sorted order; folders
    named ``ground_truth`` (MVTec's masks) and hidden ones are skipped. One rule for
    fit, predict and the command line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{what}: {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()
                   and not any(part == "ground_truth" or part.startswith(".")
                               for part in p.relative_to(folder).parts[:-1]))
    if not files:
        raise ValueError(f"{what}: no image files ({', '.join(EXTENSIONS)}) in {folder}")
    return files


def _limit_from_env() -> int | None:
    """``PYAD_MAX_IMAGE_PIXELS``: a number of pixels, or ``none``/``0`` for no limit;
    unset: twice Pillow's default ``MAX_IMAGE_PIXELS``, the size Pillow refuses."""
    text = os.environ.get("PYAD_MAX_IMAGE_PIXELS", "").strip()
    if not text:
        return 2 * 89_478_485
    if text.lower() == "none":
        return None
    try:
        value = int(text)
        if value < 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"PYAD_MAX_IMAGE_PIXELS: expected a number of pixels, or 'none' for no limit; "
                         f"got {text!r}") from None
    return value or None


#: The most pixels (width x height) an image file may have; larger files are refused
#: with a ``ValueError`` before they are decoded (a decompression bomb: a small file
#: that decodes to gigabytes). Default 178,956,970, the size Pillow itself refuses,
#: or the environment variable ``PYAD_MAX_IMAGE_PIXELS``; ``None``: no limit.
#: pyad applies this limit instead of Pillow's ``Image.MAX_IMAGE_PIXELS`` (Pillow's
#: warning at half that size does not appear).
MAX_PIXELS: int | None = _limit_from_env()

_PILLOW_LIMIT = threading.Lock()


def _open(path) -> Image.Image:
    """``Image.open`` with Pillow's decompression-bomb check lifted: it warns
    (``DecompressionBombWarning``) above ``Image.MAX_IMAGE_PIXELS`` and raises above
    twice that, and has no per-call setting; ``open_image`` applies ``MAX_PIXELS``
    instead. ``Image.open`` reads only the header, so the module setting is lifted
    for that moment, under a lock (warning filters are process-wide too, and
    ``warnings.catch_warnings`` is not thread-safe)."""
    with _PILLOW_LIMIT:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


@contextmanager
def open_image(path: str | os.PathLike, what: str = "images"):
    """``PIL.Image.open`` whose failures, opening or decoding inside the block,
    become ``ValueError("<what>: cannot read <path>: ...")``; a file over
    ``MAX_PIXELS`` pixels is refused before it is decoded."""
    try:
        with _open(path) as im:
            _check_pixels(im, path, what)
            yield im
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc}") from None
    except Image.DecompressionBombError as exc:  # some formats check frames or tiles while decoding
        raise ValueError(f"{what}: {path}: {exc} Pillow applies its own limit while decoding this file; "
                         f"raise PIL.Image.MAX_IMAGE_PIXELS as well to read it") from None


def _check_pixels(im: Image.Image, path, what: str) -> None:
    limit = MAX_PIXELS
    w, h = im.size
    if limit is not None and w * h > limit:
        raise ValueError(
            f"{what}: {path} has {w * h:,} pixels ({w} x {h}), over the limit of {limit:,} (a guard against "
            f"decompression bombs); if you trust the file, raise it: pyad.images.MAX_PIXELS = n (None: no "
            f"limit) or the environment variable PYAD_MAX_IMAGE_PIXELS")


# Pillow's modes for 16-bit grey (PNG, TIFF, PGM) and 32-bit integer images. Pillow
# converts them to "L"/"RGB" by clipping to 0..255, which saturates 16-bit data.
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _eight_bit(im: Image.Image, path) -> Image.Image:
    """``im``, or for 16-bit grey an "L" image of value / 257, rounded (65535 -> 255).
    A 32-bit integer ("I") image is read the same way when its values fit 16 bits."""
    if im.mode not in _WIDE_GREY:
        return im
    a = np.asarray(im)
    if im.mode == "I":
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise ValueError(f"images: {path} is a 32-bit integer image with values in [{lo}, {hi}]; "
                             f"expected 8- or 16-bit values (0..65535)")
    return Image.fromarray(_u16_to_u8(a))  # 2-d uint8: mode "L"


def _u16_to_u8(a: np.ndarray) -> np.ndarray:
    """round(a / 257) for a in 0..65535, in integers: (a + 128) // 257 (no ties)."""
    return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _fast_png(im: Image.Image, path) -> Image.Image:
    """``im`` (opened, header read) decoded by imagecodecs when it is an 8-bit
    grey, RGB or RGBA PNG (alpha dropped, as Pillow's RGBA -> RGB conversion
    does); otherwise ``im`` itself, which Pillow decodes when it is used."""
    if (imagecodecs is None or im.format != "PNG" or im.mode not in ("L", "RGB", "RGBA")
            or len(im.tile) != 1 or im.tile[0][3] != im.mode):  # rawmode "RGB;16B", "L;4"...: other bit depths
        return im
    try:
        data = Path(path).read_bytes()
        a = _png_pixels(data)
        if a is None:
            a = imagecodecs.png_decode(data)
    except Exception:  # noqa: BLE001 - a damaged file: Pillow decodes it and reports the error
        return im
    if a.dtype != np.uint8 or a.shape[:2] != (im.height, im.width):
        return im
    return Image.fromarray(a[..., :3] if im.mode == "RGBA" else a)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 6: 4}  # colour type -> samples per pixel (grey, RGB, RGBA)


def _png_pixels(data: bytes) -> np.ndarray | None:
    """An 8-bit, non-interlaced grey / RGB / RGBA PNG -> [H, W, C] uint8; None for
    any other kind (or without the compiled module). Raises on damaged data (the
    zlib stream's checksum covers the image data)."""
    if _core is None or not data.startswith(_PNG_SIGNATURE):
        return None
    view, pos, parts, header = memoryview(data), 8, [], None
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        body = view[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = bytes(body)
        elif kind == b"IDAT":
            parts.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length  # length, type, data, CRC
    if header is None or len(header) != 13 or not parts:
        return None
    width, height = int.from_bytes(header[:4], "big"), int.from_bytes(header[4:8], "big")
    depth, colour, compression, filtering, interlace = header[8:13]
    channels = _PNG_CHANNELS.get(colour)
    if depth != 8 or channels is None or (compression, filtering, interlace) != (0, 0, 0) or width * height < 1:
        return None
    raw = imagecodecs.zlibng_decode(b"".join(parts) if len(parts) > 1 else parts[0])
    rows = _core.png_unfilter(np.frombuffer(raw, np.uint8), height, width * channels, channels)
    return rows.reshape(height, width, channels) if channels > 1 else rows


def read_image(path: str | os.PathLike) -> np.ndarray:
    """[H, W, 3] uint8 RGB (grey images are repeated to three channels; 16-bit
    images scaled to 8 bits, see the module doc)."""
    with open_image(path) as im:
        return np.asarray(_eight_bit(_fast_png(im, path), path).convert("RGB"))


_ORDERS = ("rgb", "bgr")


def _check_order(channel_order: str) -> None:
    if channel_order not in _ORDERS:
        raise ValueError(f"channel_order: expected 'rgb' or 'bgr', got {channel_order!r}")


_EXPECTED = "expected uint8 (0..255), uint16 (0..65535) or float16/32/64 in [0, 1]"


def _check_array(a: np.ndarray, where: str, channel_order: str = "rgb") -> np.ndarray:
    """One image -> [H, W, C] uint8 RGB with C in {1, 3}: the accepted dtypes and
    ranges (module doc) checked and scaled; uint8 RGB is returned as a view."""
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"images: {where} has shape {a.shape}; expected [H, W, C] or [C, H, W]")
    if a.shape[-1] not in (1, 3) and a.shape[0] in (1, 3):
        a = np.moveaxis(a, 0, -1)  # [C, H, W] -> [H, W, C]
    if a.shape[-1] not in (1, 3):
        raise ValueError(f"images: {where} has {a.shape[-1]} channels; expected 1 (grey) or 3 (RGB)")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"images: {where} is empty (shape {a.shape})")
    a = _to_uint8(a, where)
    if channel_order == "bgr" and a.shape[-1] == 3:
        a = np.ascontiguousarray(a[..., ::-1])
    return a


def _to_uint8(a: np.ndarray, where: str) -> np.ndarray:
    """uint8 as is; uint16 / 257 and float [0, 1] * 255, rounded; anything else refused."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.uint16:
        return _u16_to_u8(a)
    if a.dtype.kind == "f" and a.dtype.itemsize <= 8:
        lo, hi = float(a.min()), float(a.max())  # NaN propagates through min/max
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"images: {where} is {a.dtype} with NaN or Inf values; float images must be finite "
                             f"and lie in [0, 1]")
        if lo < 0 or hi > 1:
            hint = ("divide by 255, or pass uint8" if lo >= 0 and hi <= 255 else
                    "divide by 65535, or pass uint16" if lo >= 0 and hi <= 65535 else
                    "pass the image before normalisation (pyad normalises itself)" if lo < 0 else
                    "scale it to [0, 1]")
            raise ValueError(f"images: {where} is {a.dtype} with values in [{lo:g}, {hi:g}]; float images must "
                             f"lie in [0, 1] — {hint}")
        return (a.astype(np.float32) * 255 + 0.5).astype(np.uint8)
    if a.dtype.kind in "iu":
        lo, hi = int(a.min()), int(a.max())
        hint = (" — these values fit uint8: pass a.astype(np.uint8)" if lo >= 0 and hi <= 255 else
                " — these values fit uint16: pass a.astype(np.uint16)" if lo >= 0 and hi <= 65535 else "")
        raise ValueError(f"images: {where} is {a.dtype} with values in [{lo}, {hi}]; integer images must be "
                         f"uint8 (0..255) or uint16 (0..65535){hint}")
    raise ValueError(f"images: {where} is {a.dtype}; {_EXPECTED}")


def iter_images(source, channel_order: str = "rgb") -> Iterator[np.ndarray]:
    """Images from a folder, a list of paths or arrays, an array batch
    ([N, H, W, C] or [N, C, H, W]; numpy or torch), or a dataset of dicts/samples
    with an ``image`` entry. Yields [H, W, C] uint8 RGB arrays, C = 3 or 1 (grey).

    Arrays must be uint8, uint16 or float in [0, 1] (module doc); others raise
    ``ValueError`` naming the image's index. ``channel_order="bgr"``: arrays hold
    blue, green, red (OpenCV's order) and are flipped to RGB; files are always
    decoded as RGB. uint8 RGB arrays are yielded without a copy."""
    _check_order(channel_order)
    if isinstance(source, (str, os.PathLike)):
        for p in list_images(source):
            yield read_image(p)
        return
    if _is_tensor(source):
        source = _numpy(source)
    if isinstance(source, np.ndarray):
        if source.ndim != 4:
            raise ValueError(f"images: an array batch must be 4-d [N, H, W, C] or [N, C, H, W], got {source.shape}")
        if len(source) == 0:
            raise ValueError("images: the batch is empty")
        for i, a in enumerate(source):
            yield _check_array(a, f"image {i}", channel_order)
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
            yield _check_array(np.asarray(_numpy(item) if _is_tensor(item) else item), f"image {i}", channel_order)
        count += 1
    if count == 0:
        raise ValueError("images: no images given")


def _is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # NumPy has no bfloat16


def batches(source, size: int, transform=None, channel_order: str = "rgb") -> Iterator[list[np.ndarray]]:
    """Lists of up to ``size`` images, or of ``transform(item)`` when given: the
    item is the file path for file sources, the [H, W, C] uint8 RGB array from
    ``iter_images`` otherwise (``channel_order`` as there: arrays only). Files
    are decoded (and transformed) by two background threads, ahead of use (PIL
    releases the GIL while decoding and resizing)."""
    _check_order(channel_order)
    paths = _paths(source)
    if paths is None:
        batch: list[np.ndarray] = []
        for img in iter_images(source, channel_order):
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
    """The one pre-processing of every inference path: [H, W, C] images -> normalised
    [B, 3, S, S] float32 (S = crop or size): square bilinear resize (Pillow, on
    uint8), optional centre crop, (x/255 - mean)/std; and ``restore`` back."""

    def __init__(self, image_size: int = 256, crop_size: int | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.image_size = image_size
        self.crop_size = crop_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @property
    def size(self) -> int:
        return self.crop_size or self.image_size

    def __call__(self, images: Sequence[np.ndarray], channel_order: str = "rgb") -> torch.Tensor:
        _check_order(channel_order)
        return self.to_tensor([self.prepare(a, channel_order, where=f"image {i}") for i, a in enumerate(images)])

    def prepare(self, a, channel_order: str = "rgb", *, where: str = "image") -> np.ndarray:
        """One [H, W, C] image (any accepted dtype, module doc), or an image file,
        -> [S, S, 3] uint8, resized and cropped. ``channel_order`` applies to arrays
        (files are decoded as RGB). Thread-safe; the fit path runs it in the
        decoding threads, on the file directly (no full-resolution array copies:
        28.7 -> 23.1 ms per 900x900 PNG). Grey is resized, then repeated (the same
        pixels)."""
        size = (self.image_size, self.image_size)
        if isinstance(a, (str, os.PathLike)):
            with open_image(a) as im:
                im = _eight_bit(_fast_png(im, a), a)
                im = im if im.mode in ("RGB", "L") else im.convert("RGB")
                out = np.asarray(im.resize(size, Image.BILINEAR).convert("RGB"))
        else:
            _check_order(channel_order)
            a = _check_array(np.asarray(_numpy(a) if _is_tensor(a) else a), where, channel_order)
            im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
            out = np.asarray(im.resize(size, Image.BILINEAR).convert("RGB"))
        if self.crop_size:
            o = (self.image_size - self.crop_size) // 2
            out = out[o : o + self.crop_size, o : o + self.crop_size]
        return out

    def to_tensor(self, prepared) -> torch.Tensor:
        """[S, S, 3] uint8 arrays (or a uint8 tensor [B, S, S, 3]) -> normalised
        [B, 3, S, S] float32 in channels-last memory (the layout the backbones run
        in: no transposing copy)."""
        u8 = prepared if isinstance(prepared, torch.Tensor) else torch.from_numpy(np.stack(prepared))
        x = u8.permute(0, 3, 1, 2).float()
        return x.div_(255.0).sub_(self.mean.to(x.device)).div_(self.std.to(x.device))

    def restore(self, amap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """A [S, S] map on the (cropped) network input -> [H, W] on the original image."""
        if self.crop_size:
            canvas = np.full((self.image_size, self.image_size), amap.min(), dtype=np.float32)
            o = (self.image_size - self.crop_size) // 2
            canvas[o : o + self.crop_size, o : o + self.crop_size] = amap
            amap = canvas
        amap = np.ascontiguousarray(amap, dtype=np.float32)
        if not amap.flags.writeable:  # e.g. a zero-copy view of an Arrow / Ray object-store buffer
            amap = amap.copy()
        t = torch.from_numpy(amap)[None, None]
        return F.interpolate(t, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()


def as_items(source, what: str = "images") -> list:
    """The images of ``source`` as a list of file paths or [H, W, C] arrays (not yet
    read): a folder (its image files, sorted), one file path, a list of paths,
    arrays, tensors or dataset samples, or an array / tensor batch [N, ...]."""
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_file():
            return [p]
        if not p.exists():
            raise ValueError(f"{what}: {p} does not exist")
        return list_images(p, what)
    if _is_tensor(source):
        source = _numpy(source)
    if isinstance(source, np.ndarray):
        if source.ndim != 4:
            raise ValueError(f"{what}: an array batch must be 4-d [N, H, W, C] or [N, C, H, W], got {source.shape}")
        items = list(source)
    else:
        try:
            items = list(source)
        except TypeError:
            raise ValueError(f"{what}: expected a folder, image paths, arrays or a dataset, "
                             f"got {type(source).__name__}") from None
        out = []
        for item in items:
            if isinstance(item, dict):
                item = item["image"]
            elif hasattr(item, "path"):
                item = item.path
            elif hasattr(item, "image") and not isinstance(item, np.ndarray):
                item = item.image
            out.append(_numpy(item) if _is_tensor(item) else item)
        items = out
    if not items:
        raise ValueError(f"{what}: no images given")
    return items


class Loaded:
    """One image of ``load_batches``: its index in the input, path (files), the
    prepared pixels [S, S, 3] uint8, its original (H, W), or the error text."""

    __slots__ = ("index", "path", "pixels", "shape", "error")

    def __init__(self, index, path, pixels=None, shape=None, error=None):
        self.index, self.path, self.pixels, self.shape, self.error = index, path, pixels, shape, error


def load_batches(items: list, size: int, pre: Preprocess, *, on_error: str = "raise",
                 channel_order: str = "rgb", ahead: int = 4) -> Iterator[list[Loaded]]:
    """Batches of prepared images (``pre.prepare``: decoded, resized, cropped) in
    input order. Files are decoded by two background threads at lower priority,
    ``ahead`` batches in advance (PIL releases the GIL while decoding and
    resizing); with ``on_error="skip"`` an unreadable file becomes a ``Loaded``
    with its error instead of raising."""
    _check_order(channel_order)

    def one(i, item):
        path = os.fspath(item) if isinstance(item, (str, os.PathLike)) else None
        try:
            if path is not None:
                with open_image(item) as im:
                    shape = (im.height, im.width)
                return Loaded(i, path, pre.prepare(item), shape)
            a = _check_array(np.asarray(item), f"image {i}", channel_order)
            return Loaded(i, None, pre.prepare(a), a.shape[:2])
        except ValueError as exc:
            if on_error == "skip" and path is not None:
                return Loaded(i, path, error=str(exc))
            raise

    def group(start):
        _lower_priority()
        return [one(i, items[i]) for i in range(start, min(start + size, len(items)))]

    starts = list(range(0, len(items), size))
    if not any(isinstance(it, (str, os.PathLike)) for it in items):
        for s in starts:
            yield [one(i, items[i]) for i in range(s, min(s + size, len(items)))]
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = [pool.submit(group, s) for s in starts[:ahead]]
        for k in range(len(starts)):
            if k + ahead < len(starts):
                pending.append(pool.submit(group, starts[k + ahead]))
            yield pending[k].result()
            pending[k] = None
