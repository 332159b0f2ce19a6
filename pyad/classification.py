"""Supervised defect classification: labelled image sets, stratified splits and
classification metrics (for ``pyad.DefectClassifier``; any object with
``predict_classes`` and ``classes_`` works).

    split = pyad.classification.split(pyad.datasets.mvtec_ad(root, "bottle"), test=0.2, validation=0.2)
    det = pyad.DefectClassifier(backbone="mobilenet_v2", weights=path).fit(split)   # train + validation parts
    report = pyad.classification.evaluate(det, split.test)   # accuracy, per-class P/R/F1, confusion matrix
    report.save("out/")                                      # classification.{md,json} + confusion_matrix.png
    pyad.evaluate(det, split.dataset())                      # AUROC, AUPRO, F1... of 1 - P(good) on the test part

Where labelled images come from:
- An MVTec-layout category (a ``pyad.datasets`` dataset, or its folder): defect
  images exist only under ``test/<defect>/``, so the labelled set is the test
  folder (``good`` and every defect type). A classifier that learns from some of
  them must be evaluated on the others only: ``split`` holds out a stratified test
  share that fit never sees, and ``split.dataset()`` is a dataset whose test
  images are exactly that share. (The category's ``train/good`` images can be
  added to the good class of the training part with ``extra_good``.)
- A class-per-folder layout: ``root/<class>/*.png``.
- Images with ``labels`` (class names or indices).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .datasets import Dataset, Sample, _images
from .modelfile import atomic_write


@dataclass
class Labelled:
    """Images (paths, arrays or dataset samples) and one label each."""

    items: list
    labels: list

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class LabelledSplit:
    """Stratified train / validation / test parts of one labelled set."""

    train: Labelled
    validation: Labelled
    test: Labelled
    classes: list
    good: object = "good"
    name: str = "split"

    def __repr__(self) -> str:
        def counts(part):
            return {c: int(sum(1 for v in part.labels if v == c)) for c in self.classes}

        return (f"LabelledSplit({self.name!r}, classes={self.classes}, train={counts(self.train)}, "
                f"validation={counts(self.validation)}, test={counts(self.test)})")

    def dataset(self) -> Dataset:
        """A pyad dataset for ``pyad.evaluate``: ``test`` = the test part (label 1 =
        not good, defect type, masks when the source had them); ``train`` = the
        training part's samples (labelled: for a supervised detector only)."""

        def samples(part: Labelled) -> list[Sample]:
            out = []
            for item, lab in zip(part.items, part.labels):
                if isinstance(item, Sample):
                    out.append(item)
                elif isinstance(item, (str, Path)):
                    out.append(Sample(Path(item), int(lab != self.good), "good" if lab == self.good else str(lab)))
                else:
                    raise ValueError("split: dataset() needs image files or dataset samples, not arrays")
            return out

        return Dataset(self.name, samples(self.train), samples(self.test), "", None)


# -- labelled sources --------------------------------------------------------------------------------
def labelled_folder(root) -> Labelled:
    """The labelled images of a folder: an MVTec-layout category (``test/<class>/``)
    or a class-per-folder layout (``root/<class>/``); the class is the folder name."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"train: {root} is not a folder")
    base = root / "test" if (root / "test").is_dir() and (root / "train").is_dir() else root
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and _images(p))
    if not classes:
        from .images import as_items

        as_items(root, "train")  # an empty folder: "no image files"
        raise ValueError(f"labels: {root} holds no class subfolders with images (expected <class>/*.png, or an MVTec "
                         "category with test/<class>/); pass labels=... with the images")
    items, labels = [], []
    for c in classes:
        for p in _images(base / c):
            items.append(p)
            labels.append(c)
    return Labelled(items, labels)


def labels_of(source) -> tuple[list, list]:
    """(items, labels) of a labelled source: a folder (``labelled_folder``), a
    ``Labelled``, or dataset samples (their defect type: "good" or the defect)."""
    if isinstance(source, Labelled):
        return list(source.items), list(source.labels)
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        lab = labelled_folder(source)
        return lab.items, lab.labels
    if isinstance(source, (list, tuple)) and source and all(isinstance(s, Sample) for s in source):
        return list(source), [s.defect for s in source]
    raise ValueError("labels: a supervised detector needs labels: pass labels=[...] (one class name or index per "
                     "image), a class-per-folder or MVTec-layout folder, or pyad.classification.split(...)")


# -- stratified splits -----------------------------------------------------------------------------
def stratified_split(labels, *, test: float = 0.2, validation: float = 0.0, seed: int = 0):
    """(train, validation, test) index arrays, stratified by class: each part gets
    round(share · N) images, spread over the classes in proportion to their counts
    (largest remainders), and every class keeps at least one training image.
    Deterministic for a seed; indices ascending within each part."""
    labels = np.asarray(labels)
    for name, share in (("test", test), ("validation", validation)):
        if not (isinstance(share, (int, float)) and not isinstance(share, bool) and 0 <= share < 1):
            raise ValueError(f"{name}: expected a share in [0, 1), got {share!r}")
    if test + validation >= 1:
        raise ValueError(f"test + validation: expected a sum below 1, got {test + validation}")
    n = len(labels)
    classes = sorted(set(labels.tolist()))
    members = {c: np.flatnonzero(labels == c) for c in classes}
    rng = np.random.default_rng(seed)
    order = {c: rng.permutation(members[c]) for c in classes}
    left = {c: len(members[c]) - 1 for c in classes}  # one training image kept per class
    taken = {c: 0 for c in classes}
    parts = []
    for share in (test, validation):
        want = min(int(round(share * n)), sum(left.values()))
        raw = {c: share * len(members[c]) for c in classes}
        alloc = {c: min(int(np.floor(raw[c])), left[c]) for c in classes}
        rest = want - sum(alloc.values())
        for c in sorted(classes, key=lambda c: (-(raw[c] - np.floor(raw[c])), -len(members[c]), str(c))):
            if rest <= 0:
                break
            if alloc[c] < left[c]:
                alloc[c] += 1
                rest -= 1
        while rest > 0:  # classes whose remainder was 0 but have room
            c = max((c for c in classes if alloc[c] < left[c]), key=lambda c: left[c] - alloc[c])
            alloc[c] += 1
            rest -= 1
        idx = []
        for c in classes:
            idx += order[c][taken[c] : taken[c] + alloc[c]].tolist()
            taken[c] += alloc[c]
            left[c] -= alloc[c]
        parts.append(np.sort(np.array(idx, np.int64)))
    train = np.sort(np.concatenate([order[c][taken[c] :] for c in classes]).astype(np.int64))
    return train, parts[1], parts[0]


def split(source, labels=None, *, test: float = 0.2, validation: float = 0.2, seed: int = 0, good="good",
          extra_good: int = 0) -> LabelledSplit:
    """Stratified train / validation / test parts of a labelled set (module doc).

    source: a pyad dataset (its test images: good and each defect type), an
        MVTec-layout or class-per-folder folder, or images with ``labels``.
    extra_good: for a dataset, add up to this many of its train/good images to the
        good class of the training part (seeded choice; they are never test images).
    """
    name = "split"
    extra: list = []
    if isinstance(source, Dataset):
        name = source.name
        if labels is not None:
            raise ValueError("labels: a dataset brings its own labels (the defect type of each test image)")
        items, labs = list(source.test), [s.defect for s in source.test]
        if not items:
            raise ValueError(f"source: dataset {source.name!r} has no test images to learn defect types from")
        if extra_good:
            pick = np.random.default_rng(seed).permutation(len(source.train))[: int(extra_good)]
            extra = [source.train[i] for i in sorted(pick)]
    elif labels is None:
        items, labs = labels_of(source)
        if isinstance(source, (str, Path)):
            name = Path(source).name
    else:
        from . import images as imgs

        items = imgs.as_items(source, "source")
        labs = list(np.asarray(labels).tolist())
        if len(labs) != len(items):
            raise ValueError(f"labels: expected one label per image ({len(items)}), got {len(labs)}")
    tr, va, te = stratified_split(labs, test=test, validation=validation, seed=seed)

    def part(idx):
        return Labelled([items[i] for i in idx], [labs[i] for i in idx])

    train = part(tr)
    if extra:
        train = Labelled(train.items + extra, train.labels + [good] * len(extra))
    classes = sorted(set(labs))
    return LabelledSplit(train, part(va), part(te), classes, good, name)


# -- metrics ------------------------------------------------------------------------------------------
def confusion_matrix(y_true, y_pred, classes) -> np.ndarray:
    """[K, K] int64: row = true class, column = predicted class, in ``classes`` order."""
    index = {c: i for i, c in enumerate(classes)}
    m = np.zeros((len(classes), len(classes)), np.int64)
    for t, p in zip(y_true, y_pred):
        if t not in index or p not in index:
            raise ValueError(f"labels: class {t if t not in index else p!r} is not one of {list(classes)}")
        m[index[t], index[p]] += 1
    return m


@dataclass
class ClassificationReport:
    """Accuracy, per-class precision / recall / F1 / support, macro averages and
    the confusion matrix (rows = true class). A class never predicted has
    precision 0 (scikit-learn's ``zero_division=0``)."""

    classes: list
    matrix: np.ndarray
    accuracy: float
    precision: list
    recall: list
    f1: list
    support: list
    predictions: list = field(default_factory=list, repr=False)

    @property
    def macro_f1(self) -> float:
        return float(np.mean(self.f1))

    def to_dict(self) -> dict:
        return {"classes": [_plain(c) for c in self.classes], "accuracy": self.accuracy, "macro_f1": self.macro_f1,
                "per_class": {str(c): {"precision": p, "recall": r, "f1": f, "support": s}
                              for c, p, r, f, s in zip(self.classes, self.precision, self.recall, self.f1, self.support)},
                "confusion_matrix": self.matrix.tolist()}

    def to_markdown(self) -> str:
        lines = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for c, p, r, f, s in zip(self.classes, self.precision, self.recall, self.f1, self.support):
            lines.append(f"| {c} | {p:.4f} | {r:.4f} | {f:.4f} | {s} |")
        lines.append(f"| **accuracy** | | | **{self.accuracy:.4f}** | {int(sum(self.support))} |")
        lines.append(f"| macro | {np.mean(self.precision):.4f} | {np.mean(self.recall):.4f} | {self.macro_f1:.4f} | |")
        lines += ["", "| true \\ predicted | " + " | ".join(map(str, self.classes)) + " |",
                  "|---|" + "---|" * len(self.classes)]
        for c, row in zip(self.classes, self.matrix):
            lines.append(f"| {c} | " + " | ".join(map(str, row)) + " |")
        return "\n".join(lines)

    def picture(self, cell: int = 72):
        """The confusion matrix as a PIL image (rows = true, columns = predicted)."""
        return confusion_picture(self.matrix, self.classes, cell)

    def save(self, folder) -> list[Path]:
        """classification.md, classification.json and confusion_matrix.png in ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        out = [folder / "classification.md", folder / "classification.json", folder / "confusion_matrix.png"]
        atomic_write(out[0], (self.to_markdown() + "\n").encode())
        atomic_write(out[1], json.dumps(self.to_dict(), indent=1).encode())
        import io

        buf = io.BytesIO()
        self.picture().save(buf, format="PNG")
        atomic_write(out[2], buf.getvalue())
        return out


def report(y_true, y_pred, classes=None) -> ClassificationReport:
    """The classification report of true vs predicted classes."""
    y_true, y_pred = list(np.asarray(y_true).tolist()), list(np.asarray(y_pred).tolist())
    if len(y_true) != len(y_pred):
        raise ValueError(f"labels: expected one prediction per label ({len(y_true)}), got {len(y_pred)}")
    if not y_true:
        raise ValueError("labels: no images to evaluate")
    classes = sorted(set(y_true) | set(y_pred)) if classes is None else list(classes)
    m = confusion_matrix(y_true, y_pred, classes)
    tp = np.diag(m).astype(np.float64)
    pred_n, true_n = m.sum(0), m.sum(1)
    precision = np.divide(tp, pred_n, out=np.zeros_like(tp), where=pred_n > 0)
    recall = np.divide(tp, true_n, out=np.zeros_like(tp), where=true_n > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return ClassificationReport(classes, m, float(tp.sum() / m.sum()), precision.tolist(), recall.tolist(),
                                f1.tolist(), true_n.tolist(), y_pred)


def evaluate(detector, images, labels=None) -> ClassificationReport:
    """Classify ``images`` with a fitted classifier and compare with ``labels``
    (class names or indices as it was trained). ``images`` may be a ``Labelled``
    (e.g. ``split.test``), a ``LabelledSplit`` (its test part) or a labelled folder."""
    if isinstance(images, LabelledSplit):
        images = images.test
    if labels is None:
        images, labels = labels_of(images)
    labels = list(np.asarray(labels).tolist())
    known = set(detector.classes_)
    unknown = sorted({str(v) for v in labels if v not in known})
    if unknown:
        raise ValueError(f"labels: classes {unknown} were not trained (the classifier knows {list(detector.classes_)})")
    return report(labels, detector.predict_classes(images), detector.classes_)


def confusion_picture(matrix: np.ndarray, classes, cell: int = 72):
    """A PIL image of a confusion matrix: cells shaded by the share of the true
    class (row), with the count written in each; row and column labels."""
    from PIL import Image, ImageDraw

    k = len(classes)
    margin = 150
    img = Image.new("RGB", (margin + k * cell + 10, margin + k * cell + 10), "white")
    draw = ImageDraw.Draw(img)
    rows = matrix.sum(1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, np.float64), where=rows > 0)
    for i in range(k):
        for j in range(k):
            x0, y0 = margin + j * cell, margin + i * cell
            v = int(255 - 200 * share[i, j])
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=(v, v, 255), outline=(160, 160, 160))
            draw.text((x0 + cell // 2 - 6, y0 + cell // 2 - 6), str(int(matrix[i, j])),
                      fill="white" if share[i, j] > 0.6 else "black")
    for i, c in enumerate(classes):
        draw.text((4, margin + i * cell + cell // 2 - 6), str(c)[:22], fill="black")
        label = str(c)[:12]
        draw.text((margin + i * cell + 4, margin - 18 - 12 * (i % 2)), label, fill="black")
    draw.text((4, 4), "rows: true class", fill="black")
    draw.text((4, 20), "columns: predicted class", fill="black")
    return img


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v


__all__ = ["Labelled", "LabelledSplit", "labelled_folder", "labels_of", "stratified_split", "split",
           "confusion_matrix", "ClassificationReport", "report", "evaluate", "confusion_picture"]
