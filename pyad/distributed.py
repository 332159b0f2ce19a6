"""Scale-out on Ray (``pip install "pyad[ray]"``): batch scoring, many product
lines in parallel, and PatchCore / PaDiM fits sharded over machines.

Every function connects to the running Ray cluster: ``ray.init(...)`` done by
the caller, else ``address=`` ("host:6379", "ray://host:10001", "auto", or
"local" to start one on this machine), else the ``RAY_ADDRESS`` environment
variable. Ray does the scheduling, retries and data movement; this module only
says what runs where:

- ``predict(model, images, out=...)``: Ray Data decodes and resizes the images
  in CPU tasks and scores them in an actor pool where each actor loads the model
  file once (CPU or GPU actors); the one inference module of the detector runs,
  so scores equal ``Detector.predict`` to float rounding. With ``out`` every scored batch is
  written at once, atomically, to ``out/parts/`` (Parquet, keyed by input path)
  with masks / heat maps as PNG named from the path; a retried task or a killed
  worker rewrites the same keys, a re-run skips finished files, and
  ``out/scores.parquet`` holds each input exactly once. Unreadable files are
  reported by name (``Prediction.skipped``) and the job goes on.
- ``fit(detector, train)``: PatchCore and PaDiM with feature extraction sharded
  over Ray tasks. PaDiM: one Gaussian accumulator per shard, merged exactly
  (Chan et al.), so the fit equals the single-machine one to rounding.
  PatchCore: composable coresets (greedy k-center per shard, then greedy
  k-center over the union of the shard coresets): coverage radius at most 4x the
  single-machine greedy's (module note below).
- ``ShardedBank``: a PatchCore memory bank split over actors and searched in
  parallel with a min-reduce, equal to the single exact index;
  ``predict(..., bank_shards=n)`` scores through it.
- ``fit_many(spec, data_root, categories, out=...)``: one model file and one
  report per product line as Ray tasks with declared resources, and the combined
  table; a failed line is reported while the others finish.

Composable coresets (Indyk et al., PODS 2014; Malkomes et al., NeurIPS 2015):
each shard X_i runs greedy k-center (Gonzalez 1985) to C_i; greedy k-center on
U = ∪ C_i gives S. Greedy's k picks plus its farthest point are k+1 points
pairwise at least its radius apart, two of them share a cluster of an optimal
k-center solution of X, so each stage's radius is at most 2·OPT(X); a point of
X_i is within r_i of C_i and C_i within r_U of S, so r(S) <= 4·OPT(X) <=
4·r(single-machine greedy). PatchCore's default approximate start
(``coreset_starts``) and the held-out continuation keep the same two stages but
not the proof; docs/scaling.md gives the radii measured on MVTec AD bottle.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

INSTALL_HINT = 'pyad.distributed needs Ray: pip install "pyad[ray]"'
COMPOSABLE_FACTOR = 4.0  # coverage radius vs the single-machine greedy (module docstring)


# -- connecting ------------------------------------------------------------------------------------------
def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return ray


def connect(address: str | None = None):
    """The ``ray`` module, connected: a cluster the caller already joined
    (``ray.init``), else ``address`` ("local" starts a Ray instance on this
    machine), else ``RAY_ADDRESS``; ValueError when there is none."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("address: not connected to a Ray cluster; call ray.init(...) first, pass address='HOST:6379' "
                         "(or 'ray://HOST:10001', 'auto'), or address='local' to start one on this machine")
    try:
        ray.init(address=address, ignore_reinit_error=True)
    except (ConnectionError, RuntimeError) as exc:
        raise ValueError(f"address: cannot connect to the Ray cluster at {address}: {exc}") from None
    return ray


def _cluster_cpus(ray) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


# -- model shipping ----------------------------------------------------------------------------------------
def _as_detector(detector_or_model_path):
    from .detectors.base import Detector, load

    if isinstance(detector_or_model_path, Detector):
        detector_or_model_path._fitted()
        return detector_or_model_path
    if isinstance(detector_or_model_path, (str, os.PathLike)):
        return load(detector_or_model_path)
    raise ValueError(f"detector_or_model_path: expected a fitted detector or a model file path, "
                     f"got {type(detector_or_model_path).__name__}")


def _model_bytes(det) -> bytes:
    """The detector as one self-contained model file (frozen backbone weights
    embedded when it has them, so no node needs the weights file)."""
    with tempfile.TemporaryDirectory(prefix="pyad-") as tmp:
        path = Path(tmp) / "model.pyad"
        try:
            det.save(path, include_weights=getattr(det, "weights", None) is not None)
        except ValueError:  # a detector without a frozen backbone: its networks are always saved
            det.save(path)
        return path.read_bytes()


def _content_id(data: bytes) -> str:
    """The model file's own SHA-256 over its members (the zip's timestamps vary)."""
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return z.read("SHA256").decode()


def _load_bytes(data: bytes):
    """``pyad.load`` of model-file bytes (checksummed, no pickle), once per actor."""
    from .detectors.base import load

    with tempfile.TemporaryDirectory(prefix="pyad-") as tmp:
        path = Path(tmp) / "model.pyad"
        path.write_bytes(data)
        return load(path)


# -- batch scoring ---------------------------------------------------------------------------------------
def _output_name(path: str) -> str:
    """A file name for an input path: its stem plus a hash of the absolute path
    (unique, and the same in every run, whatever else the job holds)."""
    digest = hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"{Path(path).stem}-{digest}"


def _decode(batch: dict, pre) -> dict:
    """CPU task: files (or arrays of a Ray Dataset's ``image`` column) -> prepared
    uint8 [n, S, S, 3], original sizes, and the error text of unreadable files
    (the same reading and messages as ``Detector.predict(on_error="skip")``)."""
    from . import images as imgs

    paths = [str(p) for p in batch["path"]]
    arrays = batch.get("image")
    s = pre.size
    pixels = np.zeros((len(paths), s, s, 3), np.uint8)
    shape = np.zeros((len(paths), 2), np.int32)
    errors = [""] * len(paths)
    if arrays is None:
        loaded = [b for chunk in imgs.load_batches(paths, max(1, -(-len(paths) // 2)), pre, on_error="skip")
                  for b in chunk]
        for i, b in enumerate(loaded):
            if b.error is not None:
                errors[i] = b.error
            else:
                pixels[i], shape[i] = b.pixels, b.shape
    else:
        for i, a in enumerate(arrays):
            try:
                a = imgs._check_array(np.asarray(a), f"image {paths[i]}")
                pixels[i], shape[i] = pre.prepare(a), a.shape[:2]
            except ValueError as exc:
                errors[i] = str(exc)
    out = {"path": np.array(paths, dtype=object), "pixels": pixels, "shape": shape,
           "error": np.array(errors, dtype=object)}
    if "index" in batch:
        out["index"] = np.asarray(batch["index"], np.int64)
    return out


class _Scorer:
    """Actor: loads the model once; each call scores one batch through the
    detector's inference module and, with ``out``, writes it (module doc)."""

    def __init__(self, model, maps: str, out: str | None, threads: int, device: str | None, bank=None):
        import torch

        import pyad

        ray = _ray()
        pyad.set_threads(max(1, threads))
        det = _load_bytes(ray.get(model[0]))
        if device:
            det.set_params(device=device)
        self.det, self.pre, self.maps, self.out = det, det.preprocessing, maps, out
        self.module = det.inference_module()
        if bank is not None:  # the memory bank lives in shard actors (ShardedBank)
            self.module.head.nn = _ShardedSearch(bank)
        self.torch = torch

    def __call__(self, batch: dict) -> dict:
        torch = self.torch
        det, n = self.det, len(batch["path"])
        errors = np.array([str(e) for e in batch["error"]], dtype=object)
        ok = np.flatnonzero(errors == "")
        scores = np.full(n, np.nan, np.float32)
        low = np.zeros((n, self.pre.size, self.pre.size), np.float32) if self.maps != "none" else None
        if len(ok):
            x = self.pre.to_tensor(torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))).to(det.device)
            with torch.inference_mode():
                s, m = self.module(x)
            scores[ok] = s.float().cpu().numpy()
            if low is not None:
                low[ok] = m.float().cpu().numpy()
        labels = np.full(n, -1, np.int8) if det.threshold_ is None else (scores > det.threshold_).astype(np.int8)
        labels[errors != ""] = -1
        out = {"path": batch["path"], "score": scores, "label": labels, "shape": batch["shape"], "error": errors}
        if "index" in batch:
            out["index"] = batch["index"]
        if low is not None:
            out["map"] = low
        if self.out is not None and len(ok):
            _write_part(Path(self.out), det, self.pre, out, ok, self.maps != "none")
        return out


def _write_part(out: Path, det, pre, rows: dict, ok: np.ndarray, with_maps: bool) -> None:
    """One scored batch: PNGs first, then ``parts/part-<maps|scores>-<hash>.parquet``
    (atomic; its name is a hash of the batch's paths, so a retried batch replaces
    its own file). A path is finished once a part holds it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from .detectors.base import mask_of
    from .modelfile import atomic_write

    paths = [str(rows["path"][i]) for i in ok]
    for sub in ("parts", "maps", "masks") if with_maps else ("parts",):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if with_maps:
        lo, hi = (det.map_range_ if getattr(det, "map_range_", None) else (0.0, 1.0))
        for i, p in zip(ok, paths):
            full = pre.restore(rows["map"][i], tuple(int(v) for v in rows["shape"][i]))
            name = _output_name(p)
            grey = np.clip((full - lo) / (hi - lo) * 65535.0, 0, 65535).round().astype(np.uint16)
            atomic_write(out / "maps" / f"{name}.png", _png(Image.fromarray(grey)))
            if det.threshold_ is not None:
                mask = mask_of(full, bool(rows["label"][i] == 1), det.pixel_threshold_)
                atomic_write(out / "masks" / f"{name}.png", _png(Image.fromarray((mask * 255).astype(np.uint8))))
    cols = {
        "path": pa.array(paths, pa.string()),
        "score": pa.array(rows["score"][ok], pa.float32()),
        "label": pa.array([None if rows["label"][i] < 0 else bool(rows["label"][i]) for i in ok], pa.bool_()),
        "height": pa.array(rows["shape"][ok, 0], pa.int32()),
        "width": pa.array(rows["shape"][ok, 1], pa.int32()),
    }
    if with_maps:
        cols["map"] = pa.array([rows["map"][i].astype(np.float32).tobytes() for i in ok], pa.binary())
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf)
    key = hashlib.sha1("\n".join(sorted(paths)).encode("utf-8", "surrogateescape")).hexdigest()[:20]
    atomic_write(out / "parts" / f"part-{'maps' if with_maps else 'scores'}-{key}.parquet", buf.getvalue())


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _finished(out: Path, with_maps: bool, size: int) -> dict:
    """path -> (score, label, (h, w), low map or None) of the parts already written."""
    import pyarrow.parquet as pq

    done = {}
    parts = out / "parts"
    if not parts.is_dir():
        return done
    for f in sorted(parts.glob("part-maps-*.parquet" if with_maps else "part-*.parquet")):
        t = pq.read_table(f).to_pydict()
        for j, p in enumerate(t["path"]):
            amap = None
            if with_maps:
                amap = np.frombuffer(t["map"][j], np.float32).reshape(size, size)
            done[p] = (t["score"][j], t["label"][j], (t["height"][j], t["width"][j]), amap)
    return done


def _check_job(out: Path, model_id: str, maps: str) -> None:
    """``out/job.json`` ties a folder to one model: a re-run with another model
    would otherwise keep the first model's finished scores."""
    from .modelfile import atomic_write

    job = out / "job.json"
    if job.is_file():
        old = json.loads(job.read_text())
        if old.get("model_sha256") != model_id:
            raise ValueError(f"out: {out} holds results of another model (sha256 {old.get('model_sha256', '?')[:12]}…); "
                             "use a new folder, or delete it to start again")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(job, json.dumps({"model_sha256": model_id, "maps": maps}, indent=1).encode())


@dataclass
class _Rows:
    """The results gathered on the driver, keyed by input position."""

    scores: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)
    maps: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)


def predict(detector_or_model_path, images, *, out=None, maps: str = "none", batch_size: int | None = None,
            actors: int | None = None, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0,
            decode_cpus: float = 1.0, bank_shards: int | None = None, address: str | None = None,
            progress: bool = True):
    """Score ``images`` on the Ray cluster; a ``Prediction`` in input order.

    images: a folder (searched recursively, as ``Detector.predict``), a list of
        paths, or a Ray Dataset with a ``path`` column (and, optionally, decoded
        arrays in ``image``, as ``ray.data.read_images(..., include_paths=True)``
        gives): rows then come in the order they finish (``Prediction.paths``
        says which is which), and a re-run scores them all again.
    out: a folder every node can write (a shared file system): ``parts/`` (the
        journal of scored batches), ``scores.parquet`` (path, score, label; each
        input once, input order), ``skipped.json`` (unreadable files and why),
        ``job.json``; with maps also ``maps/<name>.png`` (16-bit, the model's fixed
        heat-map scale ``map_range_``) and ``masks/<name>.png`` (``Prediction.masks``'s
        rule), name = file stem + a hash of the path. A re-run skips the files
        a part already holds.
    maps: "none" (scores and labels only), "low" (S x S network resolution) or
        "full" (each image's resolution), as ``Detector.predict``. With ``out``
        the low-resolution maps are kept in the parts (S·S·4 bytes per image).
    batch_size: images per scoring call (default: the detector's). Inputs are cut
        into blocks of this size, so each actor call scores the batch
        ``Detector.predict`` would; scores then differ from it by float rounding
        only (the actors' thread count changes the convolutions' blocking).
    actors: scoring actors (default: autoscaled from 1 to as many as the cluster's
        CPUs hold next to one decoding task; more is refused, since actors holding
        every CPU would starve the decoding); ``cpus_per_actor`` / ``gpus_per_actor``:
        their declared resources (GPU actors run the module on "cuda");
        ``decode_cpus``: per decoding task.
    bank_shards: PatchCore only: hold the memory bank in this many actors
        (``ShardedBank``) instead of in every scoring actor.
    """
    from . import _progress
    from . import images as imgs
    from .detectors.settings import check

    check(maps in ("none", "low", "full"), "maps", "'none', 'low' or 'full'", maps)
    check(lambda: cpus_per_actor > 0 and gpus_per_actor >= 0 and decode_cpus > 0, "cpus_per_actor",
          "cpus_per_actor > 0, gpus_per_actor >= 0 and decode_cpus > 0", (cpus_per_actor, gpus_per_actor, decode_cpus))
    check(lambda: actors is None or (isinstance(actors, int) and actors >= 1), "actors", "None or an int >= 1", actors)
    ray = connect(address)
    import ray.data

    det = _as_detector(detector_or_model_path)
    bs = det.batch_size if batch_size is None else batch_size
    check(lambda: isinstance(bs, int) and bs >= 1, "batch_size", "an int >= 1", bs)
    pre = det.preprocessing
    dataset_input = isinstance(images, ray.data.Dataset)
    if dataset_input:
        if "path" not in (images.columns() or []):
            raise ValueError("images: a Ray Dataset needs a 'path' column (e.g. ray.data.read_images(..., "
                             "include_paths=True)); its rows are keyed by it")
        paths = None
    else:
        items = imgs.as_items(images, "images")
        if not all(isinstance(p, (str, os.PathLike)) for p in items):
            raise ValueError("images: expected a folder, image file paths or a Ray Dataset; score arrays with "
                             "Detector.predict")
        paths = [os.path.abspath(os.fspath(p)) for p in items]  # the key of every output, on every node

    bank = None
    shipped = det
    if bank_shards is not None:
        bank, shipped = _shard_bank(det, bank_shards, ray)
    data = _model_bytes(shipped)
    model_id = _content_id(data)
    out = Path(out).resolve() if out is not None else None
    rows = _Rows()
    done = {}
    if out is not None:
        _check_job(out, model_id, maps)
        done = _finished(out, maps != "none", pre.size)
    todo = list(range(len(paths))) if paths is not None else None
    if paths is not None and done:
        for i, p in enumerate(paths):
            if p in done:
                score, label, shape, amap = done[p]
                rows.scores[i], rows.labels[i], rows.shapes[i], rows.maps[i] = score, label, shape, amap
        todo = [i for i in range(len(paths)) if paths[i] not in done]

    started = time.perf_counter()
    n_total = len(paths) if paths is not None else None
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars
    bar = _progress.bar(total=n_total, desc="pyad.distributed.predict", unit="img", disable=not progress or None)
    bar.update(len(paths) - len(todo) if todo is not None else 0)
    seen_paths, scored_now = [], 0
    try:
        ctx.enable_progress_bars = False  # pyad's own progress (counts, bad files, throughput) instead
        if dataset_input:
            ds = images
        elif todo:
            import pyarrow as pa

            # one block per scoring batch: every actor call sees the batch Detector.predict would
            blocks = [pa.table({"path": [paths[i] for i in todo[s : s + bs]], "index": todo[s : s + bs]})
                      for s in range(0, len(todo), bs)]
            ds = ray.data.from_arrow(blocks)
        else:
            ds = None
        if ds is not None:
            n_actors = _pool_size(ray, actors, cpus_per_actor, decode_cpus)
            if not dataset_input:
                n_actors = min(n_actors, len(blocks))  # Ray warns about a pool larger than its inputs
            # decoding stays in CPU tasks of its own (max_retries also keeps Ray Data from fusing it into the
            # actors, which it does when the remote arguments are equal)
            ds = ds.map_batches(_decode, fn_kwargs={"pre": pre}, batch_size=None if not dataset_input else bs,
                                batch_format="numpy", num_cpus=decode_cpus, max_retries=3)
            pool = ray.data.ActorPoolStrategy(size=n_actors) if actors else \
                ray.data.ActorPoolStrategy(min_size=1, max_size=n_actors)
            ds = ds.map_batches(
                _Scorer, batch_size=bs, batch_format="numpy", compute=pool, num_cpus=cpus_per_actor,
                num_gpus=gpus_per_actor or None,
                fn_constructor_kwargs={"model": [ray.put(data)], "maps": maps,
                                       "out": None if out is None else str(out),
                                       "threads": max(1, round(cpus_per_actor)),
                                       "device": "cuda" if gpus_per_actor else None, "bank": bank})
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                n = len(batch["path"])
                keys = batch["index"] if "index" in batch else range(len(seen_paths), len(seen_paths) + n)
                for j, key in enumerate(keys):
                    key = int(key)
                    if dataset_input:
                        seen_paths.append(str(batch["path"][j]))
                    if batch["error"][j]:
                        rows.errors[key] = str(batch["error"][j])
                        continue
                    rows.scores[key] = float(batch["score"][j])
                    scored_now += 1
                    lab = int(batch["label"][j])
                    rows.labels[key] = None if lab < 0 else bool(lab)
                    rows.shapes[key] = tuple(int(v) for v in batch["shape"][j])
                    if maps != "none":
                        rows.maps[key] = batch["map"][j]
                bar.update(n)
                rate = scored_now / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{len(rows.errors)} unreadable, {rate:.1f} img/s")
    finally:
        ctx.enable_progress_bars = saved
        bar.close()
        if bank is not None:
            bank.close()
    if dataset_input:
        paths = seen_paths
    seconds = time.perf_counter() - started
    pred = _assemble(det, paths, rows, maps, pre)
    if out is not None:
        _write_summary(out, pred)
    if progress:
        print(f"pyad: distributed predict: {len(pred.scores)} images scored ({scored_now} in this run, "
              f"{len(pred.scores) - scored_now} finished before), {len(pred.skipped)} unreadable, {seconds:.1f} s, "
              f"{scored_now / max(seconds, 1e-9):.1f} img/s", file=sys.stderr, flush=True)
    return pred


def _pool_size(ray, actors: int | None, cpus_per_actor: float, decode_cpus: float) -> int:
    """Scoring actors that leave the decoding tasks a CPU: actors holding every CPU
    would wait forever for inputs that no decoding task can be scheduled to make."""
    total = float(ray.cluster_resources().get("CPU", 0))
    room = int((total - decode_cpus) // cpus_per_actor)
    if room < 1:
        raise ValueError(f"cpus_per_actor: {cpus_per_actor} CPUs per actor and {decode_cpus} per decoding task do not "
                         f"fit the cluster's {total:g} CPUs together")
    if actors is not None and actors > room:
        raise ValueError(f"actors: {actors} actors of {cpus_per_actor} CPUs leave no CPU of the cluster's {total:g} for "
                         f"decoding ({decode_cpus} per task); use at most {room}")
    return actors or room


def _assemble(det, paths: list, rows: _Rows, maps: str, pre):
    from .detectors.base import Prediction

    keep = [i for i in range(len(paths)) if i in rows.scores]
    scores = np.array([rows.scores[i] for i in keep], np.float32)
    labels = None if det.threshold_ is None else scores > det.threshold_
    out_maps = None
    if maps != "none":
        out_maps = [rows.maps[i] if maps == "low" else pre.restore(rows.maps[i], rows.shapes[i]) for i in keep]
        if out_maps and len({m.shape for m in out_maps}) == 1:
            out_maps = np.stack(out_maps)
    skipped = [(paths[i], rows.errors[i]) for i in sorted(rows.errors) if i not in rows.scores]
    return Prediction(scores, out_maps, labels, det.pixel_threshold_, [paths[i] for i in keep], skipped)


def _write_summary(out: Path, pred) -> None:
    """``scores.parquet`` (each input once, input order) and ``skipped.json``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .modelfile import atomic_write

    seen, order = set(), []
    for i, p in enumerate(pred.paths or []):
        if p not in seen:  # a path listed twice is one output
            seen.add(p)
            order.append(i)
    labels = [None] * len(order) if pred.labels is None else [bool(pred.labels[i]) for i in order]
    table = pa.table({"path": pa.array([pred.paths[i] for i in order], pa.string()),
                      "score": pa.array(pred.scores[order], pa.float32()),
                      "label": pa.array(labels, pa.bool_())})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write(out / "scores.parquet", buf.getvalue())
    atomic_write(out / "skipped.json",
                 json.dumps([{"path": p, "error": e} for p, e in pred.skipped], indent=1).encode())


# -- the sharded memory bank --------------------------------------------------------------------------------
class _BankShard:
    """Actor: rows [offset, offset + n) of a memory bank in an exact index."""

    def __init__(self, rows, offset: int, threads: int = 1):
        import torch

        import pyad
        from .ops import NearestNeighbours

        pyad.set_threads(max(1, threads))
        self.nn = NearestNeighbours(torch.from_numpy(np.array(_ray().get(rows[0]), np.float32)))  # writable copy
        self.offset = offset

    def search(self, q: np.ndarray, k: int):
        import torch

        with torch.inference_mode():
            d, i = self.nn(torch.from_numpy(np.array(q)), k)  # object-store arrays are read-only
        return d.numpy(), i.numpy() + self.offset


class ShardedBank:
    """A memory bank [M, D] held as ``shards`` contiguous row blocks in Ray actors
    (each an exact ``ops.NearestNeighbours``, as PatchCore's single index) and searched
    in parallel; ``search`` min-reduces the shards' k nearest (ties to the lower
    row, as one index). Blocks are cut at multiples of ``align`` rows, so every
    distance is computed as the single index computes it (tested equal)."""

    align = 1024

    def __init__(self, bank, shards: int, *, cpus_per_shard: float = 1.0, address: str | None = None):
        from .detectors.settings import check

        check(lambda: isinstance(shards, int) and shards >= 1, "shards", "an int >= 1", shards)
        ray = connect(address)
        bank = np.ascontiguousarray(bank, np.float32)
        if bank.ndim != 2 or not len(bank):
            raise ValueError(f"bank: expected [M, D] with M >= 1, got {list(bank.shape)}")
        per = -(-len(bank) // shards)
        per = -(-per // self.align) * self.align if len(bank) > self.align * shards else per
        self.bounds = [(s, min(s + per, len(bank))) for s in range(0, len(bank), per)]
        actor = ray.remote(num_cpus=cpus_per_shard)(_BankShard)
        self.actors = [actor.remote([ray.put(bank[a:b])], a, max(1, int(cpus_per_shard))) for a, b in self.bounds]
        self.size, self.dim = bank.shape

    def search(self, q, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 distances [N, k] float32, row indices [N, k] int64), nearest first."""
        ray = _ray()
        q = np.ascontiguousarray(q, np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"q: expected [N, {self.dim}], got {list(q.shape)}")
        k = min(k, self.size)
        qref = ray.put(q)  # once, whatever the number of shards
        parts = ray.get([a.search.remote(qref, k) for a in self.actors])
        dist = np.concatenate([d for d, _ in parts], 1)
        idx = np.concatenate([i for _, i in parts], 1)
        order = np.lexsort((idx, dist), axis=1)[:, :k]  # by distance, then by row
        return np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1)

    def close(self) -> None:
        ray = _ray()
        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def __reduce__(self):  # handles travel to the scoring actors; the bank stays put
        return (_rebuild_bank, (self.actors, self.bounds, self.size, self.dim))


def _rebuild_bank(actors, bounds, size, dim) -> ShardedBank:
    bank = ShardedBank.__new__(ShardedBank)
    bank.actors, bank.bounds, bank.size, bank.dim = actors, bounds, size, dim
    return bank


def _shard_search_module():
    import torch
    from torch import nn

    class ShardedSearch(nn.Module):
        """Drop-in for ``ops.NearestNeighbours`` in PatchCore's head: the search
        runs on the bank's shard actors."""

        def __init__(self, bank: ShardedBank):
            super().__init__()
            self.bank_shards = bank

        def forward(self, q, k=None):
            d, i = self.bank_shards.search(q.detach().float().cpu().numpy(), k or 1)
            return torch.from_numpy(d).to(q.device), torch.from_numpy(i).to(q.device)

    return ShardedSearch


def _ShardedSearch(bank):
    return _shard_search_module()(bank)


def _shard_bank(det, shards: int, ray):
    """(ShardedBank of ``det``'s memory bank, a copy of ``det`` carrying one row
    of it, which the scoring actors load without the bank)."""
    from .detectors.patchcore import PatchCore

    if not isinstance(det, PatchCore):
        raise ValueError(f"bank_shards: only PatchCore has a memory bank, not {type(det).__name__}")
    if det.nn_index != "flat" or det.reweight_neighbors:
        raise ValueError("bank_shards: needs nn_index='flat' and reweight_neighbors=None (the sharded search is "
                         "the exact nearest neighbour)")
    bank = ShardedBank(det.memory_bank_, shards)
    light = copy.copy(det)
    light.memory_bank_ = det.memory_bank_[:1].copy()
    return bank, light


# -- sharded fitting ---------------------------------------------------------------------------------------
def fit(detector, train, *, validation=None, shards: int | None = None, cpus_per_shard: float = 1.0,
        gpus_per_shard: float = 0.0, address: str | None = None):
    """Fit a PatchCore or PaDiM with its feature extraction sharded over Ray tasks
    and return it (fitted, as ``detector.fit(train, validation=...)`` would be:
    same validation split, thresholds and saved state).

    shards: contiguous shares of the images, one task each (default: the
        cluster's CPUs / ``cpus_per_shard``, at most one per 2 images).
    PaDiM: per-shard accumulators merged exactly, equal to ``fit`` to rounding.
    PatchCore: greedy k-center per shard (the same bank size k as the single
    machine, then continued over the shard's held-out patches), then greedy over
    the union: coverage radius <= 4x the single-machine greedy's (module doc).
    Bytes to the driver per shard: PaDiM P·d(d+1)/2·8 (its statistics) + the
    held-out images' features; PatchCore min(n_i, k)·(D + projection_dim)·4.
    """
    from .detectors.padim import PaDiM
    from .detectors.patchcore import PatchCore

    if not isinstance(detector, (PatchCore, PaDiM)):
        raise ValueError(f"detector: pyad.distributed.fit shards PatchCore and PaDiM, not {type(detector).__name__}; "
                         "fit other detectors with detector.fit, or many product lines at once with fit_many")
    ray = connect(address)

    def sharded(items, val_items, *, labels=None, checkpoint=None):
        return _fit_sharded(detector, items, val_items, shards, cpus_per_shard, gpus_per_shard, ray)

    detector._fit = sharded  # the base fit keeps its split, thresholds and bookkeeping; only _fit runs remotely
    try:
        detector.fit(train, validation=validation)
    finally:
        detector.__dict__.pop("_fit", None)
    return detector


def _fit_sharded(det, items, val_items, shards, cpus, gpus, ray):
    from .detectors.padim import PaDiM

    padim = isinstance(det, PaDiM)
    if padim:
        det._choose_channels(det._network())
    else:
        det._network()  # weights_id_ / weights_source_ recorded here, as in the single-machine fit
    n = shards or max(1, int(_cluster_cpus(ray) // max(cpus, 1)))
    n = max(1, min(n, (len(items) + len(val_items)) // 2))
    # shard i: the i-th contiguous share of the training images and of the held-out ones
    fit_cut = np.linspace(0, len(items), n + 1).round().astype(int)
    val_cut = np.linspace(0, len(val_items), n + 1).round().astype(int)
    parts = [(list(items[fit_cut[i] : fit_cut[i + 1]]) + list(val_items[val_cut[i] : val_cut[i + 1]]),
              np.arange(fit_cut[i + 1] - fit_cut[i] + val_cut[i + 1] - val_cut[i]) >= fit_cut[i + 1] - fit_cut[i])
             for i in range(n)]
    ship = copy.copy(det)  # parameters and chosen channels; caches are not pickled
    ship.__dict__.pop("_fit", None)
    weights = ray.put(det._backbone_state()) if det.weights is not None else None
    task = ray.remote(num_cpus=cpus, num_gpus=gpus or None)(_shard_task)
    k = None
    if not padim:
        per_image = _patches_per_image(det)
        k = (det._bank_size(len(items) * per_image), det._bank_size((len(items) + len(val_items)) * per_image))
    refs = [task.remote(ship, [weights], [os.path.abspath(os.fspath(p)) if isinstance(p, (str, os.PathLike)) else p
                                          for p in part], held, k, int(max(1, cpus)), "cuda" if gpus else None)
            for part, held in parts if part]
    if padim:
        acc, val = None, []
        for ref in refs:  # in shard order: the same merged result whatever finishes first
            part, h = ray.get(ref)
            acc = part if acc is None else acc.merge(part)
            if h is not None:
                val.append(h)
        det._acc, det._val, det._buffer, det._fill = acc, val, None, 0
        return det._finish()
    return _union_coreset(det, [ray.get(r) for r in refs], k)


def _patches_per_image(det) -> int:
    """Rows of the memory bank each image contributes (the embedding grid)."""
    import torch

    with torch.inference_mode():
        s = det.preprocessing.size
        emb = det._embedder(det._network())(torch.zeros(1, 3, s, s).to(det.device))
    return int(emb.shape[1] * emb.shape[2])


def _shard_task(det, weights, items, held, k, threads, device):
    """Ray task: embed one shard through the detector's own ``embed`` and
    ``_collect``; PaDiM returns its accumulator, PatchCore its shard coreset."""
    import torch

    import pyad
    from . import images as imgs
    from .detectors.frozen import _cpu

    pyad.set_threads(threads)
    if weights[0] is not None:
        det._cache["weights_state"] = _ray().get(weights[0])
    if device:
        det.set_params(device=device)
    net = det._network()
    embed = det._embedder(net)
    pre = det.preprocessing
    det._begin(int((~held).sum()), int(held.sum()))
    seen = 0
    for batch in imgs.load_batches(items, det.batch_size, pre):
        x = pre.to_tensor([b.pixels for b in batch]).to(det.device)
        with torch.inference_mode():
            emb = _cpu(embed(x))  # as FrozenFeatureDetector._fit: collected on the host
        det._collect(emb, held[seen : seen + len(batch)])
        seen += len(batch)
    if k is None:  # PaDiM
        det._flush()
        return det._acc, (np.concatenate(det._val) if det._val else None)
    return _shard_coreset(det, *k)


def _shard_coreset(det, k_fit: int, k_all: int):
    """Greedy k-center on one shard's training patches (k_fit), continued over its
    held-out patches to k_all, as the single-machine selection does on all of
    them; returns the candidates' projected and full features, their held flags
    and the held-out images' embeddings."""
    import torch

    from . import kernels as K
    from .detectors.patchcore import _host
    from .ops import NearestNeighbours

    held = np.concatenate(det._held)
    space = np.concatenate(det._proj) if det._proj else np.concatenate([q.astype(np.float32) for q in det._parts])
    fit_rows, val_rows = np.flatnonzero(~held), np.flatnonzero(held)
    rows = fit_rows
    if len(fit_rows):
        init = det._approximate_start(space, fit_rows)
        kf = min(k_fit, len(fit_rows))
        if kf < len(fit_rows):
            sel, dist = K.greedy_coreset(det._on_device(space[fit_rows]), kf, None if init is not None else 0,
                                         init_distances=None if init is None else init[fit_rows],
                                         storage=det.coreset_storage, return_distances=True)
            sel, dist = _host(sel), _host(dist)
            rows = fit_rows[np.asarray(sel)]
        else:
            dist = np.zeros(len(fit_rows), np.float32)
        ka = min(k_all, len(held))
        if len(val_rows) and ka > len(rows):
            start = np.full(len(held), 1e30, np.float32) if init is None else init.copy()
            start[fit_rows] = dist
            nearest = NearestNeighbours(torch.from_numpy(np.ascontiguousarray(space[rows])))  # faiss: blocked
            d2, _ = nearest(torch.from_numpy(np.ascontiguousarray(space[val_rows])))
            start[val_rows] = np.minimum(start[val_rows], d2[:, 0].clamp_min(0).sqrt().numpy())
            start[rows] = 0.0
            more = K.greedy_coreset(det._on_device(space), ka - len(rows), None, init_distances=start,
                                    storage=det.coreset_storage)
            rows = np.concatenate([rows, np.asarray(_host(more))])
    else:  # a shard of held-out images only
        ka = min(k_all, len(held))
        rows = np.asarray(_host(K.greedy_coreset(det._on_device(space), ka, 0))) if ka < len(held) else \
            np.arange(len(held))
    val = np.concatenate([e.numpy() for e in det._held_embeddings(val_rows)]) if len(val_rows) else None
    proj = space[rows] if det._proj else None
    return proj, det._gather(rows), held[rows], val


def _union_coreset(det, shards: list, k: tuple):
    """Greedy k-center over the union of the shard coresets, with the single-machine
    bank sizes and PatchCore's own selection (validation scored by the training
    part's selection, then continued over the held-out patches)."""
    import torch

    feats = np.concatenate([s[1] for s in shards])
    held = np.concatenate([s[2] for s in shards])
    projected = shards[0][0] is not None
    space = np.concatenate([s[0] for s in shards]) if projected else feats
    det._parts, det._proj, det._held = [feats], [space] if projected else [], [held]
    held_embeddings = [torch.from_numpy(np.array(s[3])) for s in shards if s[3] is not None]  # writable copies
    fit_rows, val_rows = np.flatnonzero(~held), np.flatnonzero(held)
    init = det._approximate_start(space, fit_rows)
    return det._select(space, held, fit_rows, val_rows, init, k[0], k[1], held_embeddings)


# -- many product lines -------------------------------------------------------------------------------------
@dataclass
class ManyReport:
    """``fit_many``'s result: the combined table of the lines that finished, each
    line's model file, and the lines that failed with their error."""

    report: object  # pyad.evaluation.Report
    models: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)

    def to_markdown(self) -> str:
        text = self.report.to_markdown() if self.report.results else "(no product line finished)"
        if self.failed:
            text += "\n\nfailed:\n" + "\n".join(f"- {c}: {e}" for c, e in self.failed.items())
        return text


def _spec_detector(spec):
    """A fresh unfitted detector from ``spec``: a detector (its parameters), or a
    dict {"model": registry name, **parameters}."""
    from .detectors.base import REGISTRY, Detector, clone

    if isinstance(spec, Detector):
        return clone(spec)
    if isinstance(spec, dict) and "model" in spec:
        params = dict(spec)
        name = str(params.pop("model")).lower()
        if name not in REGISTRY:
            raise ValueError(f"spec: unknown model {name!r} (known: {', '.join(sorted(REGISTRY))})")
        return REGISTRY[name](**params)
    raise ValueError("spec: expected a detector or a dict {'model': name, **parameters}")


def _fit_line(spec, data_root: str, category: str, out: str, pictures: bool, threads: int) -> list:
    """Ray task: fit and evaluate one product line; writes ``out/<category>.pyad``
    and ``out/<category>/`` (scores, pictures); returns its report rows."""
    import pyad
    from . import datasets
    from .evaluation import evaluate

    pyad.set_threads(threads)
    det = _spec_detector(spec)
    ds = datasets.load(data_root, category)
    report = evaluate(det, ds, out=Path(out) / category, pictures=pictures, save_model=Path(out) / f"{category}.pyad")
    return report.results


def fit_many(spec, data_root, categories=None, *, out, cpus_per_line: float = 1.0, gpus_per_line: float = 0.0,
             memory_per_line: int | None = None, pictures: bool = False, address: str | None = None,
             progress: bool = True) -> ManyReport:
    """Fit and evaluate one model per product line (category of ``data_root``) as
    Ray tasks declaring ``cpus_per_line`` / ``gpus_per_line`` / ``memory_per_line``
    (bytes). Writes ``out/<category>.pyad``, ``out/<category>/`` (that line's
    ``pyad.evaluate`` output: results.{md,csv,json}, ``<category>/scores.csv``,
    pictures with ``pictures``), the combined ``out/results.{md,csv,json}`` and
    ``out/failed.json``. A line that fails is reported; the others finish.
    ``data_root`` and ``out`` must be readable / writable on every node."""
    from . import _progress
    from . import datasets
    from .evaluation import Report
    from .modelfile import atomic_write

    _spec_detector(spec)._check_params()  # bad parameters fail here, not once per line
    ray = connect(address)
    root = os.path.abspath(os.fspath(data_root))
    names = list(categories) if categories else datasets.categories(root)
    if not names:
        raise ValueError(f"categories: none given and none found under {root}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    task = ray.remote(num_cpus=cpus_per_line, num_gpus=gpus_per_line or None, memory=memory_per_line,
                      max_retries=1)(_fit_line)
    refs = {task.remote(spec, root, c, str(out), pictures, int(max(1, cpus_per_line))): c for c in names}
    results, failed = {}, {}
    bar = _progress.bar(total=len(names), desc="pyad.distributed.fit_many", unit="line", disable=not progress or None)
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        name = refs[ready[0]]
        try:
            results[name] = ray.get(ready[0])
        except Exception as exc:  # a failed line is reported; the others go on
            cause = getattr(exc, "cause", None) or exc
            failed[name] = f"{type(cause).__name__}: {cause}"
            if progress:
                print(f"pyad: fit_many: {name} failed: {failed[name]}", file=sys.stderr, flush=True)
        bar.update(1)
        bar.set_postfix_str(f"{len(failed)} failed")
    bar.close()
    report = Report([r for c in names if c in results for r in results[c]])
    if report.results:
        report.save(out)
    atomic_write(out / "failed.json", json.dumps(failed, indent=1).encode())
    models = {c: out / f"{c}.pyad" for c in names if c in results}
    return ManyReport(report, models, failed)
