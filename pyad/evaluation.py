"""Evaluation on labelled datasets and the latency protocol.

``evaluate(detector, data)`` fits (when needed), predicts the test images through
the one ``predict`` path, and computes the metrics the seeds report: image and
pixel AUROC, AUPRO (FPR <= 0.3), F1-max with its threshold, and precision /
recall / F1 at the detector's own threshold. Several categories give a table
with mean, textures and objects rows (as MVTec AD results are reported);
MVTec LOCO categories get extra rows for logical and structural anomalies.

``latency(detector, images)`` is the CPU latency protocol of Baßler, KIT master's thesis §3.4: per image, 3
warm-up runs then 5 timed runs, averaged; then averaged over images; the same
for each stage (preprocess, backbone = feature extraction, embedding, search =
nearest-neighbour search or scoring, map); plus throughput at batch sizes.
Decoding the files is not timed (the seed excludes it).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import _progress
from . import metrics as M
from .datasets import Dataset
from .modelfile import atomic_write

METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "precision", "recall", "f1")
COLUMNS = {  # key -> table header
    "image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO", "f1_max": "F1-max",
    "precision": "precision", "recall": "recall", "f1": "F1", "fit_s": "fit s", "predict_ms": "ms/image",
}


@dataclass
class Result:
    """One category (or one LOCO anomaly kind of it)."""

    category: str
    kind: str = ""
    n_train: int = 0
    n_test: int = 0
    image_auroc: float | None = None
    pixel_auroc: float | None = None
    aupro: float | None = None
    f1_max: float | None = None
    f1_max_threshold: float | None = None
    threshold: float | None = None  # the detector's own
    threshold_rule: str = ""
    precision: float | None = None  # at the detector's threshold
    recall: float | None = None
    f1: float | None = None
    fit_s: float | None = None
    predict_ms: float | None = None  # wall time of predict over the test set, per image
    images: list[dict] = field(default_factory=list, repr=False)  # path, defect, label, score, predicted
    extra: dict = field(default_factory=dict)  # a detector's own metrics (evaluation_extras), e.g. classification


@dataclass
class Report:
    results: list[Result]

    def __getitem__(self, category: str) -> Result:
        for r in self.results:
            if r.category == category:
                return r
        raise KeyError(category)

    def rows(self) -> list[dict]:
        """Per-category rows, then mean / textures / objects (over whole categories only)."""
        keys = list(COLUMNS)
        rows = [{"category": r.category, "kind": r.kind, **{k: getattr(r, k) for k in keys}} for r in self.results]
        main = [r for r in self.results if "/" not in r.category]
        groups = [("mean", main)]
        textures = [r for r in main if r.kind == "texture"]
        objects = [r for r in main if r.kind == "object"]
        if textures and objects:
            groups += [("textures", textures), ("objects", objects)]
        if len(main) > 1:
            for name, rs in groups:
                row = {"category": name, "kind": ""}
                for k in keys:
                    vals = [getattr(r, k) for r in rs if getattr(r, k) is not None]
                    row[k] = float(np.mean(vals)) if vals else None
                rows.append(row)
        return rows

    def to_markdown(self) -> str:
        head = ["category", *COLUMNS.values()]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows():
            cells = [row["category"]] + [_fmt(k, row[k]) for k in COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, ["category", "kind", *COLUMNS], lineterminator="\n")
        w.writeheader()
        for row in self.rows():
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
        return buf.getvalue()

    def to_json(self) -> str:
        return json.dumps({"results": [asdict(r) for r in self.results], "summary": self.rows()}, indent=1)

    def save(self, folder) -> list[Path]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        out = []
        for ext, text in (("md", self.to_markdown() + "\n"), ("csv", self.to_csv()), ("json", self.to_json())):
            out.append(folder / f"results.{ext}")
            _write_text(out[-1], text)
        return out


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if key == "fit_s":
        return f"{v:.1f}"
    if key == "predict_ms":
        return f"{v:.0f}"
    return f"{v:.4f}"


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode())


# -- evaluation ----------------------------------------------------------------------------------
def evaluate(detector, data, *, out=None, pictures: bool = True, per_defect: int = 6, save_model=None) -> Report:
    """Evaluate ``detector`` on a dataset or a list of datasets (categories).

    - One category: a fitted detector is used as is; an unfitted one is fitted
      on ``data.train`` first (the time is reported as ``fit_s``).
    - Several categories: a fresh detector with the same parameters is fitted
      per category (``detector`` is left untouched).
    - ``out``: a folder that receives results.{md,csv,json}, per-category
      scores.csv and, with ``pictures``, heat-map grids per defect type (misses
      first: false negatives and false positives, ``per_defect`` rows) and
      ROC / PR curves (see ``pyad.plots``).
    - ``save_model``: a path (one category) or a folder (one ``<category>.pyad``
      each) where the fitted models are saved.
    """
    datasets = [data] if isinstance(data, Dataset) else list(data)
    if not datasets or not all(isinstance(d, Dataset) for d in datasets):
        raise ValueError("data: expected a pyad dataset or a list of them (see pyad.datasets)")
    for d in datasets:
        if not d.test or not any(s.label for s in d.test) or all(s.label for s in d.test):
            raise ValueError(f"data: {d.name!r} needs test images of both classes (good/ and a defect type)")
    out = Path(out) if out is not None else None
    if out is not None:
        _check_folder(out, "out")
    if save_model is not None and len(datasets) > 1:
        _check_folder(Path(save_model), "save_model")
    results = []
    bar = _progress.bar(datasets, desc="evaluating", unit="category")
    for d in bar:
        bar.set_postfix_str(d.name)
        det = detector if len(datasets) == 1 else detector.__class__(**detector.get_params())
        results += _evaluate_one(det, d, out / d.name if out is not None else None, pictures, per_defect)
        if save_model is not None:
            det.save(Path(save_model) / f"{d.name}.pyad" if len(datasets) > 1 else save_model)
        report = Report(results)
        if out is not None:
            report.save(out)
    return Report(results)


def _check_folder(folder: Path, what: str) -> None:
    """An output folder that exists or can be made, and is writable: checked before
    any work (a long fit is not thrown away for a typo in the output path)."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what}: {folder} exists and is not a folder")
    parent = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: cannot write into {parent}")


def _evaluate_one(det, ds: Dataset, out: Path | None, pictures: bool, per_defect: int = 6) -> list[Result]:
    if not det.is_fitted():
        det.fit(ds)
    fit_s = det.fit_seconds_  # measured by fit, kept in saved models
    test = ds.test
    t0 = time.perf_counter()
    pred = det.predict(test)
    predict_ms = (time.perf_counter() - t0) / len(test) * 1e3
    labels = np.array([s.label for s in test], bool)
    maps = list(pred.maps)
    masks = [s.mask(m.shape) for s, m in zip(test, maps)] if ds.has_masks else None

    def result(name: str, keep: np.ndarray) -> Result:
        r = Result(name, ds.kind, len(ds.train), int(keep.sum()), fit_s=fit_s, predict_ms=predict_ms,
                   threshold=det.threshold_, threshold_rule=det.threshold_rule_)
        y, s = labels[keep], pred.scores[keep]
        r.image_auroc = M.image_auroc(y, s)
        r.f1_max, r.f1_max_threshold = M.f1_max(y, s)
        if det.threshold_ is not None:
            r.precision, r.recall, r.f1 = M.precision_recall_f1(y, s, det.threshold_)
        if masks is not None:
            mk = [masks[i] for i in np.flatnonzero(keep)]
            mp = [maps[i] for i in np.flatnonzero(keep)]
            r.pixel_auroc = M.pixel_auroc(mk, mp)
            r.aupro = M.aupro(mk, mp)
        return r

    everything = np.ones(len(test), bool)
    main = result(ds.name, everything)
    main.images = [
        {"path": str(s.path), "defect": s.defect, "kind": s.kind, "label": int(s.label), "score": float(v),
         "predicted": None if pred.labels is None else bool(p)}
        for s, v, p in zip(test, pred.scores, pred.labels if pred.labels is not None else [None] * len(test))
    ]
    extras = getattr(det, "evaluation_extras", None)  # e.g. the classifier: accuracy, confusion matrix
    if extras is not None:
        main.extra = extras(ds, pred, out)
    out_results = [main]
    kinds = sorted({s.kind for s in test if s.kind})
    for kind in kinds:  # MVTec LOCO: good images + one kind of anomaly
        keep = np.array([s.label == 0 or s.kind == kind for s in test])
        out_results.append(result(f"{ds.name}/{kind}", keep))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _write_scores(out / "scores.csv", main.images)
        if pictures:
            from . import plots

            plots.category_pictures(out, ds, pred, masks, labels, det, per_defect=per_defect)
    return out_results


def _write_scores(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, ["path", "defect", "kind", "label", "score", "predicted"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    _write_text(path, buf.getvalue())


# -- latency -----------------------------------------------------------------------------------------
# stages of the frozen-feature detectors; trained ones name theirs (teacher, student, ...)
STAGES = ("preprocess", "backbone", "embedding", "search", "map")


@dataclass
class Latency:
    """Seconds. ``per_image``: the mean of the timed runs of each image;
    ``stages``: stage -> the same per image; ``throughput``: batch size ->
    images per second (and ``batch_times``: the timed runs, seconds per batch)."""

    per_image: list[float]
    stages: dict[str, list[float]]
    throughput: dict[int, float]
    batch_times: dict[int, list[float]]
    warmup: int
    runs: int

    @property
    def mean_ms(self) -> float:
        return float(np.mean(self.per_image) * 1e3)

    def stage_ms(self) -> dict[str, float]:
        return {k: float(np.mean(v) * 1e3) for k, v in self.stages.items()}

    def to_markdown(self) -> str:
        st = self.stage_ms()
        lines = ["| stage | ms / image |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in st.items()]
        lines.append(f"| **total** | **{self.mean_ms:.1f}** |")
        lines += ["", "| batch size | images / s |", "|---|---|"]
        lines += [f"| {b} | {v:.2f} |" for b, v in self.throughput.items()]
        return "\n".join(lines)


def latency(detector, images, *, warmup: int = 3, runs: int = 5, batch_sizes=(1, 8), max_images: int | None = 10) -> Latency:
    """The latency protocol (module doc) on up to ``max_images`` images."""
    from . import images as imgs
    from .detectors.base import _split

    if warmup < 0 or runs < 1:
        raise ValueError(f"runs: expected warmup >= 0 and runs >= 1, got {warmup} and {runs}")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes: expected positive ints, got {batch_sizes!r}")
    decoded = list(imgs.iter_images(_split(images, "test")))[: max_images or None]
    detector._fitted()
    per_image, stages = [], {}
    for img in _progress.bar(decoded, desc="latency", unit="img"):
        for _ in range(warmup):  # the timed path, so one-off set-up (ONNX Runtime's per-stage sessions) warms up too
            detector.predict([img], stage_times={})
        times, st = [], {}
        for _ in range(runs):
            t0 = time.perf_counter()
            detector.predict([img], stage_times=st)
            times.append(time.perf_counter() - t0)
        per_image.append(float(np.mean(times)))
        for k, v in st.items():
            if k != "read":  # decoding is not timed by the protocol
                stages.setdefault(k, []).append(v / runs)
    throughput, batch_times = {}, {}
    old = detector.batch_size
    try:
        for b in map(int, batch_sizes):
            batch = [decoded[i % len(decoded)] for i in range(b)]
            detector.batch_size = b
            detector.predict(batch)  # one warm-up per batch size
            ts = []
            for _ in range(runs):
                t0 = time.perf_counter()
                detector.predict(batch)
                ts.append(time.perf_counter() - t0)
            batch_times[b] = ts
            throughput[b] = b / float(np.mean(ts))
    finally:
        detector.batch_size = old
    return Latency(per_image, {k: v for k, v in stages.items() if any(v)}, throughput, batch_times, warmup, runs)


# -- pytest-benchmark JSON ------------------------------------------------------------------------
def _stats(data: list[float]) -> dict:
    """pytest-benchmark's statistics of one benchmark (seconds)."""
    d = sorted(data)
    n = len(d)
    mean = float(np.mean(d))
    sd = float(np.std(d, ddof=1)) if n > 1 else 0.0
    q1, med, q3 = (float(np.percentile(d, q)) for q in (25, 50, 75))
    iqr = q3 - q1
    lo = min((x for x in d if x >= q1 - 1.5 * iqr), default=d[0])
    hi = max((x for x in d if x <= q3 + 1.5 * iqr), default=d[-1])
    iqr_out = sum(1 for x in d if x < q1 - 1.5 * iqr or x > q3 + 1.5 * iqr)
    sd_out = sum(1 for x in d if x < mean - sd or x > mean + sd)
    return {"min": d[0], "max": d[-1], "mean": mean, "stddev": sd, "rounds": n, "median": med, "iqr": iqr,
            "q1": q1, "q3": q3, "iqr_outliers": iqr_out, "stddev_outliers": sd_out,
            "outliers": f"{sd_out};{iqr_out}", "ld15iqr": lo, "hd15iqr": hi, "ops": 1.0 / mean if mean else math.inf,
            "total": float(np.sum(d)), "data": list(map(float, data)), "iterations": 1}


def benchmark_json(lat: Latency, name: str, extra: dict | None = None) -> dict:
    """A pytest-benchmark-compatible document (``pytest-benchmark compare`` reads it):
    one benchmark for the per-image latency, one per stage, one per batch size
    (seconds per image)."""
    import datetime
    import platform

    from ._version import __version__
    from .kernels import info

    options = {"disable_gc": False, "timer": "perf_counter", "min_rounds": lat.runs, "max_time": 0.0,
               "min_time": 0.0, "warmup": lat.warmup > 0}
    extra = {"pyad": __version__, **info(), **(extra or {})}

    def bench(test: str, param: str, data: list[float], more: dict | None = None) -> dict:
        return {"group": f"pyad {name}", "name": f"{test}[{param}]", "fullname": f"pyad::{name}::{test}[{param}]",
                "params": {"case": param}, "param": param, "extra_info": {**extra, **(more or {})},
                "options": options, "stats": _stats(data)}

    benches = [bench("latency", "image", lat.per_image, {"protocol": f"{lat.warmup} warm-up, {lat.runs} timed runs per image"})]
    benches += [bench("stage", k, v) for k, v in lat.stages.items()]
    benches += [bench("throughput", f"batch{b}", [t / b for t in ts], {"images_per_s": lat.throughput[b]})
                for b, ts in lat.batch_times.items()]
    machine = {"node": platform.node(), "processor": platform.processor(), "machine": platform.machine(),
               "python_compiler": platform.python_compiler(), "python_implementation": platform.python_implementation(),
               "python_implementation_version": platform.python_version(), "python_version": platform.python_version(),
               "python_build": list(platform.python_build()), "release": platform.release(), "system": platform.system(),
               "cpu": {"count": os.cpu_count(), "arch_string_raw": platform.machine(), "brand_raw": _cpu_brand()}}
    return {"machine_info": machine,
            "commit_info": {"id": "unversioned", "time": None, "author_time": None, "dirty": False, "project": "pyad",
                            "branch": "(unknown)"},
            "benchmarks": benches,
            "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "version": "5.2.3"}


def _cpu_brand() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
