"""Pictures: heat-map overlays, defect grids (image | ground truth | heat map |
predicted mask), ROC and PR curves.

Overlays and grids need only Pillow. Curves need matplotlib, an optional extra
(``pip install "pyad[plot]"``); without it ``curves`` raises ImportError with
that hint and the CLI says so and carries on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import metrics as M

MATPLOTLIB_HINT = 'ROC/PR plots need matplotlib: pip install "pyad[plot]" (or pip install matplotlib)'


def colorize(amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """[H, W] -> [H, W, 3] uint8 with the 'jet' colour map (blue = low, red = high)."""
    t = np.clip((np.asarray(amap, np.float32) - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    r = np.clip(1.5 - np.abs(4 * t - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * t - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * t - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255 + 0.5).astype(np.uint8)


def overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """The heat map blended over the image ([H, W, 3] uint8; map at the image's size)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, -1)
    if image.shape[:2] != amap.shape:
        raise ValueError(f"amap: expected the image's size {image.shape[:2]}, got {amap.shape}")
    mixed = (1 - alpha) * image[..., :3].astype(np.float32) + alpha * colorize(amap, vmin, vmax)
    return (mixed + 0.5).astype(np.uint8)


def contour(image: np.ndarray, mask: np.ndarray, color=(255, 255, 0)) -> np.ndarray:
    """The image with the mask's outline drawn in ``color``."""
    m = np.asarray(mask, bool)
    edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    out = np.array(image, copy=True)
    out[edge] = color
    return out


def _cell(a: np.ndarray, size: int) -> Image.Image:
    im = Image.fromarray(a if a.dtype == np.uint8 else (np.clip(a, 0, 1) * 255).astype(np.uint8))
    return im.convert("RGB").resize((size, size), Image.BILINEAR)


def grid(rows: list[list[np.ndarray]], titles: list[str], labels: list[str] | None = None, size: int = 192) -> Image.Image:
    """Rows of equally many pictures ([H, W, 3] uint8 or [H, W] bool/float in [0, 1]),
    column titles on top and an optional label per row."""
    cols = len(titles)
    pad, head = 4, 18
    w = cols * (size + pad) + pad
    h = head + len(rows) * (size + pad + (14 if labels else 0)) + pad
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, t in enumerate(titles):
        draw.text((pad + c * (size + pad) + 4, 3), t, fill=(0, 0, 0))
    y = head
    for r, row in enumerate(rows):
        if labels:
            draw.text((pad + 2, y), labels[r], fill=(0, 0, 0))
            y += 14
        for c, a in enumerate(row):
            canvas.paste(_cell(np.asarray(a), size), (pad + c * (size + pad), y))
        y += size + pad
    return canvas


def map_scale(det, maps=None) -> tuple[float, float]:
    """The colour scale of a model's heat maps: fixed by the model (normal validation
    maps' median at blue, the pixel threshold at mid-scale) so that pictures of
    different runs and batches compare; the maps' 1st-99.9th percentile otherwise."""
    rng = getattr(det, "map_range_", None)
    if rng:
        return float(rng[0]), float(rng[1])
    sample = np.concatenate([m.ravel()[:: max(1, m.size // 20000)] for m in maps])
    lo, hi = (float(v) for v in np.percentile(sample, [1, 99.9]))
    return lo, hi if hi > lo else lo + 1.0


def covered(det, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right) of the image region the network sees, or None when
    it sees everything (no centre crop)."""
    if not getattr(det, "crop_size", None):
        return None
    h, w = shape
    off = (det.image_size - det.crop_size) / 2 / det.image_size
    return int(off * h), int(off * w), int(h - off * h), int(w - off * w)


def category_pictures(out: Path, ds, pred, masks, labels, det, per_defect: int = 6) -> list[Path]:
    """One grid per defect type (image | ground truth | heat map | predicted mask),
    the misses first (false negatives, then false positives, then the rest, up to
    ``per_defect`` rows; good images appear in the "good" grid), and, with
    matplotlib, ``curves.png``. Heat maps use the model's fixed colour scale; the
    predicted mask is the model's own (``Prediction.masks``: its pixel threshold)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    maps = list(pred.maps)
    vmin, vmax = map_scale(det, maps)
    pixel_roc = None
    if masks is not None:
        pixel_roc = M._roc_from(*M._Sorted.of(*M._pixels(masks, maps)).counts())
    model_masks = pred.masks()
    written = []
    for defect in ds.defects:
        idx = [i for i, s in enumerate(ds.test) if s.defect == defect]
        if pred.labels is not None:  # misses first: a wrong label sorts before a right one
            idx.sort(key=lambda i: (bool(pred.labels[i]) == bool(labels[i]), i))
        rows, names = [], []
        for i in idx[:per_defect]:
            s = ds.test[i]
            img = s.image
            gt = masks[i] if masks is not None else np.zeros(img.shape[:2], bool)
            pm = model_masks[i] if model_masks is not None else np.zeros(img.shape[:2], bool)
            heat = overlay(img, maps[i], vmin, vmax)
            box = covered(det, img.shape[:2])
            if box is not None:
                heat = _rectangle(heat, box)
            rows.append([contour(img, gt), gt, heat, pm])
            verdict = "" if pred.labels is None else ("  -> anomalous" if pred.labels[i] else "  -> normal")
            miss = "" if pred.labels is None or bool(pred.labels[i]) == bool(labels[i]) else "  MISS"
            names.append(f"{s.path.name}  score {pred.scores[i]:.3g}{verdict}{miss}")
        path = out / f"defects_{defect}.png"
        grid(rows, ["image", "ground truth", "heat map", "predicted mask"], names).save(path)
        written.append(path)
    try:
        written.append(curves(out / "curves.png", labels, pred.scores, pixel_roc, title=ds.name))
    except ImportError:
        pass
    return written


def _rectangle(a: np.ndarray, box, color=(255, 255, 255)) -> np.ndarray:
    im = Image.fromarray(a)
    ImageDraw.Draw(im).rectangle((box[1], box[0], box[3] - 1, box[2] - 1), outline=color)
    return np.asarray(im)


def annotated_overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, *, score: float,
                      threshold: float | None, pixel_threshold: float | None, label: bool | None,
                      box=None) -> Image.Image:
    """The heat-map overlay with a colour bar (the pixel threshold marked), the score,
    threshold and verdict written under it, and the covered region outlined."""
    heat = overlay(image, amap, vmin, vmax)
    if box is not None:
        heat = _rectangle(heat, box)
    h, w = heat.shape[:2]
    bar_h, text_h = max(8, h // 40), 16
    canvas = Image.new("RGB", (w, h + bar_h + text_h + 4), (255, 255, 255))
    canvas.paste(Image.fromarray(heat), (0, 0))
    ramp = colorize(np.tile(np.linspace(vmin, vmax, w, dtype=np.float32), (bar_h, 1)), vmin, vmax)
    canvas.paste(Image.fromarray(ramp), (0, h + 2))
    draw = ImageDraw.Draw(canvas)
    if pixel_threshold is not None and vmax > vmin:
        x = int(np.clip((pixel_threshold - vmin) / (vmax - vmin), 0, 1) * (w - 1))
        draw.line((x, h + 1, x, h + 2 + bar_h), fill=(0, 0, 0), width=2)
    verdict = "" if label is None else ("ANOMALOUS" if label else "normal")
    thr = "" if threshold is None else f" / threshold {threshold:.4g}"
    draw.text((2, h + bar_h + 4), f"score {score:.4g}{thr}  {verdict}", fill=(0, 0, 0))
    return canvas


def curves(path, labels, scores, pixel_roc=None, title: str = "") -> Path:
    """ROC and PR curves of the image scores, and the pixel ROC when given
    (``pyad.metrics.roc_curve`` of the flattened masks and maps)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(MATPLOTLIB_HINT) from None
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    fpr, tpr, _ = M.roc_curve(labels, scores)
    axes[0].plot(fpr, tpr, label=f"image (AUROC {M.image_auroc(labels, scores):.3f})")
    if pixel_roc is not None:
        pf, pt, _ = pixel_roc
        auroc = float(np.sum(np.diff(pf) * (pt[1:] + pt[:-1]) / 2))  # exact: the curve has every threshold
        keep = np.unique(np.linspace(0, pf.size - 1, 2000).astype(int))  # thin to draw
        axes[0].plot(pf[keep], pt[keep], label=f"pixel (AUROC {auroc:.3f})")
    axes[0].plot([0, 1], [0, 1], ":", color="grey")
    axes[0].set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    p, r, _ = M.pr_curve(labels, scores)
    axes[1].plot(r, p, label=f"image (F1-max {M.f1_max(labels, scores)[0]:.3f})")
    axes[1].set(xlabel="recall", ylabel="precision", title="precision-recall", ylim=(0, 1.02))
    for ax in axes:
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_overlay(path, image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float) -> None:
    Image.fromarray(overlay(image, amap, vmin, vmax)).save(path)
