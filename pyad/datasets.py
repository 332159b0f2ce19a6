"""Datasets: MVTec AD, MVTec LOCO AD, a generic folder layout, and a synthetic
MVTec-layout generator with exact defect masks.

A ``Dataset`` is one category: ``train`` (defect-free) and ``test`` lists of
``Sample`` (path, label 1 = anomalous, defect type, mask files, and for LOCO the
anomaly kind "logical" / "structural"). Images are read at their native
resolution when used (``sample.image``, ``sample.mask()``), never at
construction; construction checks every file's header (cheap) so an unreadable
file, a mask without an image or a size mismatch is reported at once, with
the file named.

Detectors accept a dataset directly: ``det.fit(ds)`` trains on ``ds.train`` and
``det.predict(ds)`` scores ``ds.test``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .images import EXTENSIONS, open_image, read_image

# MVTec AD (Bergmann et al., CVPR 2019): 5 textures and 10 objects; grid, screw
# and zipper are single-channel images (read as grey, repeated to RGB).
TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
OBJECTS = ("bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper")
MVTEC_AD = TEXTURES + OBJECTS
GRAYSCALE = ("grid", "screw", "zipper")
# MVTec LOCO AD (Bergmann et al., IJCV 2022)
MVTEC_LOCO = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int = 0  # 1 = anomalous
    defect: str = "good"
    mask_paths: tuple[Path, ...] = ()
    kind: str = ""  # MVTec LOCO: "logical" / "structural" for anomalies

    @property
    def image(self) -> np.ndarray:
        """[H, W, 3] uint8 at native resolution."""
        return read_image(self.path)

    def mask(self, shape: tuple[int, int] | None = None) -> np.ndarray | None:
        """bool [H, W]: the union of the mask files (LOCO has several per image);
        all False for a good image; None for an anomaly without a mask."""
        if self.label == 0:
            if shape is None:
                shape = _size(self.path, "test")[::-1]
            return np.zeros(shape, bool)
        if not self.mask_paths:
            return None
        out = None
        for p in self.mask_paths:
            with open_image(p, "masks") as im:
                m = np.asarray(im.convert("L")) > 0
            out = m if out is None else out | m
        return out


@dataclass
class Dataset:
    name: str
    train: list[Sample]
    test: list[Sample] = field(default_factory=list)
    kind: str = ""  # "texture" / "object" / "" (unknown)
    root: Path | None = None

    def __repr__(self) -> str:
        bad = sum(s.label for s in self.test)
        return (f"Dataset({self.name!r}, train={len(self.train)}, test={len(self.test)} "
                f"({bad} anomalous), kind={self.kind!r})")

    @property
    def has_masks(self) -> bool:
        return any(s.label for s in self.test) and all(s.mask_paths for s in self.test if s.label)

    @property
    def defects(self) -> list[str]:
        return sorted({s.defect for s in self.test})


# -- checks --------------------------------------------------------------------------------
def _size(path: Path, what: str) -> tuple[int, int]:
    with open_image(path, what) as im:  # reads the header only
        return im.size


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS) if folder.is_dir() else []


def _check(ds: Dataset) -> Dataset:
    if not ds.train:
        raise ValueError(f"root: no training images for {ds.name!r} (looked in {ds.root})")
    for s in ds.train:
        _size(s.path, "train")
    for s in ds.test:
        size = _size(s.path, "test")
        for m in s.mask_paths:
            msize = _size(m, "masks")
            if msize != size:
                raise ValueError(f"masks: {m} is {msize[0]}x{msize[1]} but its image {s.path} is {size[0]}x{size[1]}")
    return ds


def _category_root(root, category: str | None, names: tuple[str, ...]) -> tuple[Path, str]:
    root = Path(root)
    if (root / "train").is_dir():
        return root, category or root.name
    if category is None:
        raise ValueError(f"category: {root} holds no train/ folder; name a category (one of {', '.join(names)})")
    if not (root / category / "train").is_dir():
        present = sorted(p.name for p in root.iterdir() if (p / "train").is_dir()) if root.is_dir() else []
        raise ValueError(f"category: no {category}/train under {root} (present: {', '.join(present) or 'none'})")
    return root / category, category


def _kind(name: str) -> str:
    if name.startswith("synthetic_"):  # written by synthetic()
        name = name.removeprefix("synthetic_")
        return name if name in ("texture", "object") else ""
    return "texture" if name in TEXTURES else "object" if name in OBJECTS or name in MVTEC_LOCO else ""


# -- MVTec AD ---------------------------------------------------------------------------------
def mvtec_ad(root, category: str | None = None) -> Dataset:
    """One MVTec AD category: ``root`` is the category folder, or the dataset
    folder with ``category``. Test images of defect type d have their mask at
    ``ground_truth/d/<stem>_mask.png``; a missing mask is an error."""
    folder, name = _category_root(root, category, MVTEC_AD)
    train = [Sample(p) for p in _images(folder / "train" / "good")]
    test = []
    for d in sorted(p.name for p in (folder / "test").iterdir() if p.is_dir()) if (folder / "test").is_dir() else []:
        for p in _images(folder / "test" / d):
            if d == "good":
                test.append(Sample(p))
                continue
            mask = folder / "ground_truth" / d / f"{p.stem}_mask.png"
            if not mask.is_file():
                raise ValueError(f"root: {p} has no mask (expected {mask})")
            test.append(Sample(p, 1, d, (mask,)))
    _orphans(folder / "ground_truth", test, lambda m: m.stem.removesuffix("_mask"))
    return _check(Dataset(name, train, test, _kind(name), folder))


def _orphans(gt: Path, test: list[Sample], stem_of) -> None:
    """A mask whose image does not exist is an error (it would silently drop a defect)."""
    if not gt.is_dir():
        return
    have = {(s.defect, s.path.stem) for s in test}
    for d in sorted(p for p in gt.iterdir() if p.is_dir()):
        for m in sorted(d.iterdir()):
            key = (d.name, stem_of(m))
            if (m.is_file() and m.suffix.lower() in EXTENSIONS or m.is_dir()) and key not in have:
                raise ValueError(f"masks: {m} has no test image {d.name}/{key[1]}.*")


# -- MVTec LOCO AD ----------------------------------------------------------------------------
def mvtec_loco(root, category: str | None = None) -> Dataset:
    """One MVTec LOCO AD category: ``test/{good,logical_anomalies,structural_anomalies}``,
    each anomaly with a folder of masks ``ground_truth/<type>/<stem>/*.png`` (their
    union is the image's mask). ``Sample.kind`` keeps logical vs structural so
    results can be reported separately. Training uses ``train/good`` only."""
    folder, name = _category_root(root, category, MVTEC_LOCO)
    train = [Sample(p) for p in _images(folder / "train" / "good")]
    test = [Sample(p) for p in _images(folder / "test" / "good")]
    for d, kind in (("logical_anomalies", "logical"), ("structural_anomalies", "structural")):
        for p in _images(folder / "test" / d):
            masks = tuple(_images(folder / "ground_truth" / d / p.stem))
            if not masks:
                raise ValueError(f"root: {p} has no masks (expected {folder / 'ground_truth' / d / p.stem}/*.png)")
            test.append(Sample(p, 1, d, masks, kind))
    _orphans(folder / "ground_truth", test, lambda m: m.name)
    return _check(Dataset(name, train, test, _kind(name), folder))


# -- generic folders -----------------------------------------------------------------------------
def folder(train, test=None, masks=None, name: str | None = None) -> Dataset:
    """Your own images. ``train``: a folder of defect-free images. ``test``
    (optional): a folder with one subfolder per class, ``good/`` for normal
    images and any other name for a defect type. ``masks`` (optional): a folder
    mirroring ``test``'s defect subfolders, with ``<stem>.png`` or
    ``<stem>_mask.png`` for each anomalous image (non-zero = defect)."""
    train = Path(train)
    if not train.is_dir():
        raise ValueError(f"train: {train} is not a folder")
    tr = [Sample(p) for p in _images(train)]
    if not tr:
        raise ValueError(f"train: no image files ({', '.join(EXTENSIONS)}) in {train}")
    te: list[Sample] = []
    if test is not None:
        test = Path(test)
        if not test.is_dir():
            raise ValueError(f"test: {test} is not a folder")
        loose = _images(test)
        if loose:
            raise ValueError(f"test: {loose[0]} lies directly in {test}; expected subfolders good/ and one per defect type")
        for d in sorted(p for p in test.iterdir() if p.is_dir()):
            for p in _images(d):
                if d.name == "good":
                    te.append(Sample(p))
                    continue
                found = ()
                if masks is not None:
                    cands = [Path(masks) / d.name / f"{p.stem}{suffix}" for suffix in ("_mask.png", ".png")]
                    found = tuple(c for c in cands if c.is_file())[:1]
                    if not found:
                        raise ValueError(f"masks: no mask for {p} (expected {cands[0]} or {cands[1]})")
                te.append(Sample(p, 1, d.name, found))
        if not te:
            raise ValueError(f"test: no images in the subfolders of {test}")
        if masks is not None:
            if not Path(masks).is_dir():
                raise ValueError(f"masks: {masks} is not a folder")
            _orphans(Path(masks), te, lambda m: m.stem.removesuffix("_mask"))
    return _check(Dataset(name or train.name, tr, te, "", train))


# -- discovery ----------------------------------------------------------------------------------
def load(root, category: str | None = None) -> Dataset:
    """MVTec AD or MVTec LOCO AD, told apart by the test folders."""
    folder, _ = _category_root(root, category, MVTEC_AD + MVTEC_LOCO)
    loco = (folder / "test" / "logical_anomalies").is_dir() or (folder / "test" / "structural_anomalies").is_dir()
    return (mvtec_loco if loco else mvtec_ad)(root, category)


def categories(root) -> list[str]:
    """Category folders (holding train/) under ``root``, in MVTec order, then the rest."""
    root = Path(root)
    if (root / "train").is_dir():
        return [root.name]
    if not root.is_dir():
        raise ValueError(f"data: {root} is not a folder")
    found = {p.name for p in root.iterdir() if (p / "train").is_dir()}
    if not found:
        raise ValueError(f"data: no category folders with a train/ folder under {root}")
    known = [c for c in MVTEC_AD + MVTEC_LOCO if c in found]
    return known + sorted(found - set(known))


def load_all(root, names: list[str] | None = None) -> list[Dataset]:
    root = Path(root)
    if (root / "train").is_dir():
        return [load(root)]
    return [load(root, c) for c in (names or categories(root))]


# -- synthetic anomalies ------------------------------------------------------------------------
def perlin(shape: tuple[int, int], scale: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin gradient noise in about [-1, 1] (Perlin 2002, the quintic fade),
    on a grid of ``scale`` cells; as used for DRAEM's anomaly masks."""
    h, w = shape
    gy, gx = scale
    angles = rng.uniform(0, 2 * np.pi, (gy + 1, gx + 1))
    grad = np.stack([np.cos(angles), np.sin(angles)], -1)
    y = np.linspace(0, gy, h, endpoint=False)
    x = np.linspace(0, gx, w, endpoint=False)
    yi, xi = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - yi)[:, None], (x - xi)[None, :]

    def dot(dy, dx):
        g = grad[(yi + dy)[:, None], (xi + dx)[None, :]]
        return g[..., 0] * (fx - dx) + g[..., 1] * (fy - dy)

    fade = lambda t: t * t * t * (t * (t * 6 - 15) + 10)  # noqa: E731
    uy, ux = fade(fy), fade(fx)
    top = dot(0, 0) * (1 - ux) + dot(0, 1) * ux
    bottom = dot(1, 0) * (1 - ux) + dot(1, 1) * ux
    return (top * (1 - uy) + bottom * uy) * np.sqrt(2)


def add_anomaly(image: np.ndarray, rng: np.random.Generator, kind: str = "perlin",
                region: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A copy of ``image`` ([H, W, 3] uint8) with one synthetic defect and its exact
    bool mask (every masked pixel is changed, no other pixel is).

    - "perlin": a thresholded Perlin-noise blob (DRAEM, Zavrtanik et al. 2021)
      filled with a blend of the image and a foreign noise texture.
    - "cutpaste": a rectangle of the image, colour-jittered and flipped, pasted
      elsewhere (CutPaste, Li et al. 2021).
    ``region`` (bool [H, W]) restricts the defect to the object's pixels."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"image: expected [H, W, 3] uint8, got {img.shape} {img.dtype}")
    h, w = img.shape[:2]
    out = img.astype(np.float32)
    if kind == "perlin":
        for _ in range(20):
            s = 2 ** rng.integers(1, 4, 2)
            mask = perlin((h, w), (int(s[0]), int(s[1])), rng) > 0.5
            if region is not None:
                mask &= region
            if 0.002 * h * w <= mask.sum() <= 0.2 * h * w:
                break
        texture = (perlin((h, w), (16, 16), rng)[..., None] * 0.5 + 0.5) * rng.uniform(0, 255, 3)
        beta = rng.uniform(0.2, 0.6)
        out[mask] = beta * out[mask] + (1 - beta) * texture[mask]
    elif kind == "cutpaste":
        ph, pw = int(h * rng.uniform(0.08, 0.2)), int(w * rng.uniform(0.08, 0.2))
        ys, xs = rng.integers(0, h - ph), rng.integers(0, w - pw)
        if region is not None and region.any():
            yy, xx = np.nonzero(region)
            i = rng.integers(len(yy))
            yd, xd = int(np.clip(yy[i] - ph // 2, 0, h - ph)), int(np.clip(xx[i] - pw // 2, 0, w - pw))
        else:
            yd, xd = rng.integers(0, h - ph), rng.integers(0, w - pw)
        patch = out[ys : ys + ph, xs : xs + pw][::-1, ::-1] * rng.uniform(0.6, 1.4, 3) + rng.uniform(-40, 40, 3)
        mask = np.zeros((h, w), bool)
        mask[yd : yd + ph, xd : xd + pw] = True
        out[mask] = patch.reshape(-1, 3)
    else:
        raise ValueError(f"kind: expected 'perlin' or 'cutpaste', got {kind!r}")
    new = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    mask &= (new != img).any(-1)  # exact: only pixels that really changed
    return new, mask


def _texture(size: int, rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """A stationary texture: woven gratings at fixed frequencies (random phase) plus fine noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    g = (np.sin(2 * np.pi * (24 * xx + 3 * yy) + rng.uniform(0, 2 * np.pi))
         + np.sin(2 * np.pi * (-4 * xx + 20 * yy) + rng.uniform(0, 2 * np.pi)))
    g = g / 4 + 0.15 * perlin((size, size), (8, 8), rng) + 0.05 * rng.standard_normal((size, size))
    return np.clip(base[None, None] * (1 + g[..., None]), 0, 255)


def _object(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A bottle seen from above: a ringed disc on a dark, slightly noisy background."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = size / 2 + rng.normal(0, size * 0.01, 2)
    r = np.hypot(yy - cy, xx - cx) / (size * 0.38)
    body = r < 1
    ring = 0.5 + 0.5 * np.cos(2 * np.pi * 3 * r)
    color = np.array([150.0, 120.0, 60.0]) * (0.6 + 0.4 * ring[..., None]) * (1 - 0.3 * r[..., None] ** 2)
    bg = np.full((size, size, 3), 25.0) + 4 * rng.standard_normal((size, size, 1))
    img = np.where(body[..., None], color + 3 * rng.standard_normal((size, size, 1)), bg)
    return np.clip(img, 0, 255), body


def synthetic(root, kinds=("texture", "object"), n_train: int = 40, n_good: int = 10, n_defect: int = 8,
              size: int = 256, seed: int = 0) -> list[Dataset]:
    """Write an MVTec-layout dataset under ``root`` (one category per kind:
    ``synthetic_texture``, ``synthetic_object``) with two defect types,
    ``perlin`` and ``cutpaste``, each with exact masks, and return it loaded.
    Deterministic for a seed."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    out = []
    for kind in kinds:
        if kind not in ("texture", "object"):
            raise ValueError(f"kinds: expected 'texture' or 'object', got {kind!r}")
        cat = root / f"synthetic_{kind}"
        base = np.array([120.0, 110.0, 95.0])

        def render():
            if kind == "texture":
                return _texture(size, rng, base).astype(np.uint8), None
            img, body = _object(size, rng)
            return img.astype(np.uint8), body

        def save(a, path):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(path)

        for i in range(n_train):
            save(render()[0], cat / "train" / "good" / f"{i:03d}.png")
        for i in range(n_good):
            save(render()[0], cat / "test" / "good" / f"{i:03d}.png")
        for defect in ("perlin", "cutpaste"):
            for i in range(n_defect):
                img, body = render()
                bad, mask = add_anomaly(img, rng, defect, body)
                save(bad, cat / "test" / defect / f"{i:03d}.png")
                save(mask.astype(np.uint8) * 255, cat / "ground_truth" / defect / f"{i:03d}_mask.png")
        (cat / "readme.txt").write_text(f"pyad synthetic {kind} dataset, seed {seed}, size {size}.\n")
        out.append(mvtec_ad(cat))
    return out


__all__ = ["Sample", "Dataset", "mvtec_ad", "mvtec_loco", "folder", "load", "load_all", "categories",
           "synthetic", "add_anomaly", "perlin", "TEXTURES", "OBJECTS", "MVTEC_AD", "MVTEC_LOCO", "GRAYSCALE"]
