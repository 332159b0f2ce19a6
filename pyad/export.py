"""Deployment: ONNX export, the ONNX Runtime detector, static int8 quantisation.

One inference path. ``det.export("model.onnx")`` exports the detector's own
inference module (``Detector.inference_module``: preprocessed [B, 3, S, S] float32
in, scores [B] and maps [B, S, S] out, dynamic batch) with the current exporter
(``torch.export.export``, then ``torch.onnx.export``, opset 18: ``_onnx_program``),
its pure-torch twins forced (``pyad.ops.portable``: the nearest-neighbour search
is in the graph as an exact chunked matmul + min). Everything a deployment needs
travels in the file's metadata (key ``pyad``, JSON): the detector's name and
parameters, the image and pixel thresholds, the map range, the preprocessing
(image size, crop, mean/std) and the stage of every node, so nothing is re-fitted
or re-normalised at deployment.

``pyad.load("model.onnx")`` returns an ``OnnxDetector``: a ``Detector`` whose
inference module runs an ONNX Runtime session, so ``predict``, ``predict_iter``,
``evaluate``, ``pyad.latency`` and the CLI run it unchanged with the same
pre- and post-processing code (``pyad.images.Preprocess``: the same pixels;
pyad's resize is never inside the graph). CPU provider by default,
``provider="cuda"`` for ONNX Runtime's CUDA provider (onnxruntime-gpu).

``det.quantize(calibration_images)`` is static int8 post-training quantisation in
ONNX Runtime (QDQ format, ``quant_pre_process`` then ``quantize_static`` with a
calibration reader over *normal training images*, per-channel int8 weights,
uint8 activations): the same model file runs on x86 (VNNI/AVX2 kernels) and on
aarch64 (NEON/dot-product kernels). Only the nodes of learnt convolution and
linear layers (modules derived from ``nn.Conv1d``, ``nn.Conv2d``,
``nn.ConvTranspose2d``, ``nn.Linear``, and those with a BatchNorm folded in by
the exporter) are quantised; everything else stays float32 — the
nearest-neighbour search, Mahalanobis scoring, the Gaussian blur (a functional
convolution), resizing, score reductions — and ``FLOAT_SCOPES`` lists, per
detector, the learnt layers that stay float too (see ``quantized_parts``).
Calibration runs only the quantised nodes and what feeds them (``_region``; the
float rest is merged back unchanged): the search, scoring and maps are neither
run nor recorded, which gives the same int8 model as calibrating the whole graph.

The fit-once frozen-feature detectors (PatchCore, PaDiM, SPADE) measure distances
between backbone features and a head learnt from float features; int8 features
move every distance by the rounding. ``quantize(refit=...)`` (default: on for
those three, when given the torch detector) therefore quantises the backbone
alone with the same calibration, re-learns the head (memory bank, Gaussians,
gallery) and the thresholds from the int8 backbone's features of the calibration
images (pass the training images), and exports that head over the float backbone,
so the quantised graph computes the features the head was learnt on
(``quantization_["refit"]``; its ``check_max_rel_diff`` compares the int8 graph
with the refitted head on the int8 backbone).
``torch.ao.quantization`` is deprecated and may be absent, and torchao's PT2E
output needs a backend-specific lowering; ONNX Runtime's QDQ path needs neither.

Per-stage latency: every node carries the stage it belongs to (``backbone``,
``embedding``, ``search``, ``map``, ...), found by running the module once in
eager mode and matching each node's source stack to the ``stage()`` call that
ended it. With ``predict(stage_times=...)`` (``pyad.latency``, ``pyad bench``)
the graph runs as one session per stage, so each stage is timed by the wall
clock as in the torch path.

Requires the ``export`` extra: ``pip install 'pyad[export]'`` (onnx,
onnxruntime, onnxscript).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import images as imgs
from . import modelfile
from ._version import __version__
from .detectors import base
from .detectors.base import _FITTED, Detector, _jsonable, _split
from .detectors.settings import Preprocessing, Runtime, Thresholds, check
from .ops import portable

FORMAT = "pyad-onnx/1"
META_KEY = "pyad"
STAGE_KEY = "pyad.stage"
INPUT = "images"
OUTPUTS = ("scores", "maps")
OPSET = 18
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")

# Learnt layers kept in float32 per detector, by module path prefix in the inference
# module (measured on MVTec AD bottle, see docs/deployment.md). Everything that is
# not a learnt convolution / linear layer stays float32 for every detector.
FLOAT_SCOPES: dict[str, tuple[str, ...]] = {
    "ast": ("teacher",),  # the normalising flow: affine couplings (exp of a conv output) amplify int8 error
    # GANomaly's score is mean((z - ẑ)²) of two encoders' latents, min-max scaled by the
    # normal validation scores, whose spread is 1e-4..4e-4 of the distance itself: the
    # independent int8 errors of two quantised encoders (0.25-0.9% of the distance,
    # measured on the test's tiny network) swamp it and reversed the ranking of normal
    # and defect images. The latents are computed in float; the decoder (the map's
    # reconstruction, feeding ẑ through the float encoder) stays int8 (docs/deployment.md).
    "ganomaly": ("netg.encoder1", "netg.encoder2"),
    # SimpleNet's discriminator outputs the score itself: its uint8 output range, calibrated on
    # normal images, clipped every defect's score to the normal maximum (test network, data seed
    # 1: defect scores 0.213 / 0.216 -> 0.0809, the largest calibration score 0.0811; seed 2 alike)
    "simplenet": ("head",),
}

_HERE = os.path.dirname(os.path.abspath(__file__))
_SELF = os.path.abspath(__file__)


def require() -> None:
    """Import check for the ``export`` extra, with the command that installs it."""
    missing = []
    for mod in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ImportError(f"ONNX export and ONNX Runtime need {', '.join(missing)}: pip install 'pyad[export]'")


# -- export ------------------------------------------------------------------------------------------------
def export(det: Detector, path, *, opset: int = OPSET) -> Path:
    """Write ``det``'s inference module as ONNX to ``path`` (``.onnx``) with the
    metadata described in the module doc; returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise ValueError(f"path: the export format comes from the suffix; expected a .onnx file, got {str(path)!r}")
    if isinstance(det, OnnxDetector):
        det.save(path)
        return path
    model = to_onnx(det, opset=opset)
    modelfile.atomic_write(path, model.SerializeToString())
    return path


def to_onnx(det: Detector, *, opset: int = OPSET):
    """``det``'s inference module as an ``onnx.ModelProto`` (in memory)."""
    require()
    import onnx

    det._fitted()
    check(isinstance(opset, int) and opset >= 18, "opset", "an int >= 18 (the dynamo exporter's minimum)", opset)
    if getattr(det, "precision", "float32") != "float32":  # the graph is float32, as its metadata says
        det = copy.deepcopy(det).set_params(precision="float32")
    module = det.inference_module()
    if next(iter(module.buffers()), torch.zeros(0)).device.type != "cpu" or str(det.device) != "cpu":
        module = copy.deepcopy(module).cpu()  # exported on the CPU; the graph itself is device-free
    size = det.preprocessing.size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))  # batch 2: no 0/1 specialisation
    stages = _record_stages(module, x)
    with portable():
        model = _onnx_program(module, x, list(OUTPUTS), opset).model_proto
    names = _label_stages(model, stages)
    meta = _metadata(det, opset)
    meta["stages"] = names
    _set_meta(model, meta)
    onnx.checker.check_model(model)
    return model


def _onnx_program(module: nn.Module, x: torch.Tensor, outputs: list[str], opset: int):
    """``module`` traced on ``x`` with a dynamic batch, as a ``torch.onnx.ONNXProgram``.

    torch.export runs here with the settings of torch 2.13's ONNX exporter
    (torch/onnx/_internal/exporter/_capture_strategies.py: non-strict,
    ``backed_size_oblivious``, and ``prefer_deferred_runtime_asserts_over_guards``, on
    by default through ``TORCH_ONNX_PREFER_DEFERRED_RUNTIME_ASSERTS_OVER_GUARDS``); torch
    2.9's exporter lacks the last. torch 2.9.1 (the aarch64 pin) guards ``batch > 1`` in
    its fake convolution (torch/_subclasses/fake_impls.py: the backend choice, which sets
    only the output's memory format), which contradicted ``Dim("batch", min=1)``: PatchCore
    and PaDiM did not export. Deferred, the guard is a runtime assertion, which the ONNX
    exporter drops (``remove_assertion_nodes``); a graph has no memory formats."""
    from torch.fx.experimental import _config as fx_config

    shapes = ({0: torch.export.Dim("batch", min=1)},)
    with _quiet(), torch.no_grad():
        with fx_config.patch(backed_size_oblivious=True):
            program = torch.export.export(module, (x,), dynamic_shapes=shapes, strict=False,
                                          prefer_deferred_runtime_asserts_over_guards=True)
        # dynamic_shapes again: the exporter names the graph's batch axis from it
        return torch.onnx.export(program, (x,), dynamo=True, opset_version=opset, input_names=[INPUT],
                                 output_names=outputs, dynamic_shapes=shapes, verbose=False, report=False,
                                 optimize=True)


def _metadata(det: Detector, opset: int) -> dict:
    pre = det.preprocessing
    return {
        "format": FORMAT,
        "pyad_version": __version__,
        "detector": det.name,
        "schema": det.schema,
        "params": {k: _jsonable(v) for k, v in det.get_params().items()},
        "fitted": {k: _jsonable(getattr(det, k, None)) for k in _FITTED},
        "preprocessing": {"image_size": pre.image_size, "crop_size": pre.crop_size,
                          "mean": [float(v) for v in pre.mean.flatten()], "std": [float(v) for v in pre.std.flatten()],
                          "resize": "bilinear (Pillow) on uint8, outside the graph", "layout": "NCHW float32"},
        "input": INPUT,
        "outputs": list(OUTPUTS),
        "state": _state_shapes(det),
        "precision": "float32",
        "opset": opset,
        "torch": torch.__version__,
    }


def _state_shapes(det: Detector) -> dict:
    """{name: shape} of the learnt arrays (the memory bank, Gaussians, gallery, ...)."""
    out = {}

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, w in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), w)
        elif hasattr(v, "shape") and len(getattr(v, "shape", ())) > 0:
            out[prefix] = [int(s) for s in v.shape]

    try:
        walk("", det._state())
    except (NotImplementedError, AttributeError):  # pragma: no cover - every registered detector has one
        pass
    return out


def _set_meta(model, meta: dict) -> None:
    for p in list(model.metadata_props):
        if p.key == META_KEY:
            model.metadata_props.remove(p)
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    model.producer_name = "pyad"
    model.producer_version = __version__
    model.doc_string = (f"pyad {meta['detector']} ({meta['precision']}): input {INPUT!r} [B, 3, S, S] float32, "
                        f"S = {meta['preprocessing']['crop_size'] or meta['preprocessing']['image_size']}, "
                        f"normalised ((x/255 - mean)/std, metadata 'pyad'); outputs scores [B] and maps [B, S, S]")


def _get_meta(model, where) -> dict:
    for p in model.metadata_props:
        if p.key == META_KEY:
            meta = json.loads(p.value)
            if meta.get("format") != FORMAT:
                raise ValueError(f"path: {where} has pyad metadata of format {meta.get('format')!r}; this pyad reads "
                                 f"{FORMAT!r}")
            return meta
    raise ValueError(f"path: {where} is an ONNX model without pyad metadata (export one with det.export(path))")


@contextlib.contextmanager
def _quiet():
    """The exporter's own warnings and log lines (torchvision ops it skips, deprecations
    inside torch) are not the user's concern here: pytest treats warnings as errors."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


# -- stages of the nodes ---------------------------------------------------------------------------------
def _pyad_frames(frames) -> tuple:
    """(file, line) of the pyad ``forward`` frames of a stack of (file, line, function),
    outermost first. The exporter's stack traces keep only frames of functions named
    ``forward`` (torch/fx/proxy.py ``TracerBase._filter_traceback_frames`` with
    ``_record_forward_stack_traces_only``, set by the non-strict export's tracer): a
    helper's frame (``Backbone._taps``, ``efficientnet.features``, PaDiM's ``to_map``)
    is in the recorded stack but not in the node's, so both keep the same frames."""
    return tuple((f, n) for f, n, name in frames if name == "forward" and f.startswith(_HERE) and f != _SELF)


def _record_stages(module: nn.Module, x: torch.Tensor) -> list[tuple[str, set]]:
    """Run ``module`` once (its exported twins) and return, per ``stage()`` call in
    order, (stage name, the source stacks of the torch calls it ended)."""
    from torch.overrides import TorchFunctionMode

    stages, pending = [], set()
    top = sys._getframe()

    class Clock:
        def lap(self, name):
            stages.append((name, set(pending)))
            pending.clear()

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            frames, f = [], sys._getframe(1)
            while f is not None and f is not top:
                frames.append((f.f_code.co_filename, f.f_lineno, f.f_code.co_name))
                f = f.f_back
            pending.add(_pyad_frames(reversed(frames)))
            return func(*args, **(kwargs or {}))

    with _quiet(), portable(), torch.no_grad(), base._timing(Clock()), Record():
        module(x[:1])
    if pending:
        stages.append((stages[-1][0] if stages else "network", set(pending)))
    return stages


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def _label_stages(model, recorded: list[tuple[str, set]]) -> list[str]:
    """Write each node's stage into its metadata (``pyad.stage``); returns the stage
    names in order. A node's stage is the one whose torch calls share its pyad source
    stack (the longest matching prefix), at least that of its inputs."""
    order, index = [], {}
    for name, _ in recorded:
        if name not in order:
            order.append(name)
    lookup = {}
    for name, keys in recorded:
        for key in keys:
            lookup.setdefault(key, order.index(name))
    labels = {}
    for node in model.graph.node:
        trace = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.stack_trace"), "")
        key = _pyad_frames((f, int(n), name) for f, n, name in _FRAME.findall(trace))
        while key and key not in lookup:
            key = key[:-1]
        if key:
            labels[node.name] = lookup[key]
    _write_labels(model, labels, order)
    return order


def _write_labels(model, labels: dict, order: list[str]) -> None:
    """Complete ``labels`` (node -> stage index) over the graph and store them: an
    unlabelled node takes the latest stage of its inputs, or (weights, constants) the
    earliest of its consumers; every node is at least as late as its inputs, so the
    stages run one after another."""
    g = model.graph
    producer = {o: n.name for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in _node_inputs(n):
            consumers.setdefault(i, []).append(n)
    stage = {}
    for n in g.node:  # topological order
        ins = [stage[producer[i]] for i in _node_inputs(n)
               if i in producer and stage.get(producer[i]) is not None]
        own = labels.get(n.name)
        if own is None and ins:
            own = max(ins)
        stage[n.name] = max([own] + ins) if own is not None else None
    for n in reversed(g.node):
        if stage[n.name] is None:
            later = [stage[c.name] for o in n.output for c in consumers.get(o, []) if stage.get(c.name) is not None]
            stage[n.name] = min(later) if later else 0
    for n in g.node:
        for p in list(n.metadata_props):
            if p.key == STAGE_KEY:
                n.metadata_props.remove(p)
        e = n.metadata_props.add()
        e.key, e.value = STAGE_KEY, order[stage[n.name]]


def _node_inputs(node) -> list[str]:
    """A node's inputs, with the outer-scope names its subgraphs read."""
    names = [i for i in node.input if i]
    for attr in node.attribute:
        for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for n in g.node:
                names += _node_inputs(n)
    return names


def _split_stages(model, order: list[str]) -> list[tuple[str, object]]:
    """One model per stage (nodes in graph order): inputs are what it reads from the
    graph input or earlier stages, outputs what later stages or the graph need."""
    import onnx
    from onnx import helper

    g = model.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - types then come from the graph only
        inferred = g
    types = {v.name: v for v in list(inferred.value_info) + list(g.input) + list(g.output)}
    inits = {t.name: t for t in g.initializer}
    of = {n.name: next(p.value for p in n.metadata_props if p.key == STAGE_KEY) for n in g.node}
    final = {o.name for o in g.output}
    parts = []
    for s, name in enumerate(order):
        nodes = [n for n in g.node if of[n.name] == name]
        if not nodes:
            continue
        made = {o for n in nodes for o in n.output}
        later = {i for n in g.node if order.index(of[n.name]) > s for i in _node_inputs(n)} | final
        needed = []
        for n in nodes:
            for i in _node_inputs(n):
                if i not in made and i not in inits and i not in needed:
                    needed.append(i)
        outs = [o for n in nodes for o in n.output if o in later]

        def info(t):
            if t in types:
                return types[t]
            return helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)

        graph = helper.make_graph(nodes, f"{g.name}_{name}", [info(i) for i in needed], [info(o) for o in outs],
                                  initializer=[inits[i] for n in nodes for i in _node_inputs(n) if i in inits])
        # an initializer used by several nodes appears once
        seen, uniq = set(), []
        for t in graph.initializer:
            if t.name not in seen:
                seen.add(t.name)
                uniq.append(t)
        del graph.initializer[:]
        graph.initializer.extend(uniq)
        sub = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
        sub.functions.extend(model.functions)
        parts.append((name, sub))
    return parts


# -- the ONNX Runtime detector -----------------------------------------------------------------------------
def _session_options(threads: int | None):
    """ONNX Runtime session options: ``threads`` intra-op threads (torch's count by
    default), no inter-op pool, and no spinning. ONNX Runtime's pool threads spin
    after each run by default; in pyad's process torch pre- and post-processes on
    the same cores, and per-stage timing runs one session per stage, so spinning
    threads starve whatever runs next. Measured 2026-12-03 (2-core AVX2 machine,
    PatchCore MobileNetV2, batch 1, first rounds): predict 389 -> 326 ms, the
    backbone stage 21.7 -> 7.9 ms, preprocessing 17.2 -> 0.5 ms (docs/deployment.md)."""
    import onnxruntime as ort

    opt = ort.SessionOptions()
    opt.intra_op_num_threads = threads or torch.get_num_threads()
    opt.inter_op_num_threads = 1
    opt.log_severity_level = 3
    opt.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opt


class _Session:
    """An ONNX Runtime session (and, on first timed use, one session per stage)."""

    def __init__(self, data: bytes, order: list[str], provider: str, threads: int | None):
        import onnxruntime as ort

        self.data, self.order, self.provider, self.threads = data, order, provider, threads
        self.providers = [PROVIDERS[provider], "CPUExecutionProvider"] if provider == "cuda" else [PROVIDERS["cpu"]]
        self.session = ort.InferenceSession(data, self._options(), providers=self.providers)
        self._stages = None
        self._lock = threading.Lock()

    def _options(self):
        return _session_options(self.threads)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = self.session.run(list(OUTPUTS), {INPUT: x})
        return scores, maps

    def staged(self) -> list:
        if self._stages is None:
            import onnx
            import onnxruntime as ort

            with self._lock:
                if self._stages is None:
                    model = onnx.load_from_string(self.data)
                    self._stages = [(name, ort.InferenceSession(sub.SerializeToString(), self._options(),
                                                                providers=self.providers))
                                    for name, sub in _split_stages(model, self.order)]
        return self._stages

    def run_staged(self, x: np.ndarray, clock) -> tuple[np.ndarray, np.ndarray]:
        if self._stages is None:
            self.staged()
            clock.t = time.perf_counter()  # building the stage sessions is not a stage
        values = {INPUT: x}
        for name, sess in self.staged():
            feeds = {i.name: values[i.name] for i in sess.get_inputs()}
            outs = sess.run(None, feeds)
            values.update(zip([o.name for o in sess.get_outputs()], outs))
            clock.lap(name)
        return values[OUTPUTS[0]], values[OUTPUTS[1]]


class OnnxModule(nn.Module):
    """The inference module of an ``OnnxDetector``: ``x [B, 3, S, S] float32 ->
    (scores [B], maps [B, S, S])`` through ONNX Runtime (thread-safe)."""

    def __init__(self, session: _Session):
        super().__init__()
        self.session = session

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        clock = getattr(base._CLOCK, "clock", None)
        scores, maps = self.session.run_staged(arr, clock) if clock is not None else self.session.run(arr)
        return torch.from_numpy(scores).to(x.device), torch.from_numpy(maps).to(x.device)


class OnnxDetector(Detector):
    """A detector exported to ONNX, run by ONNX Runtime behind the same ``predict``.

    Made by ``pyad.load("model.onnx")`` or ``det.quantize(...)``; not fitted again
    (fit the source detector and export it). ``source_`` / ``source_params_``: the
    detector it was exported from and its parameters; ``precision_``: "float32" or
    "int8"; ``quantization_``: how it was quantised. ``calibrate`` and ``save`` keep
    the thresholds in the file's metadata.

    provider: "cpu" (default), "cuda" (ONNX Runtime's CUDA provider; onnxruntime-gpu)
        or "auto" (CUDA when installed). threads: ONNX Runtime's intra-op threads
        (None: torch's thread count, as ``pyad.set_threads`` sets it).
    """

    name = "onnx"  # not registered: a deployment form of the registered detectors
    groups = (Preprocessing, Runtime, Thresholds)
    runtime_params = frozenset({"device", "batch_size", "provider", "threads"})

    def __init__(self, *, provider="cpu", threads=None, **common):
        super().__init__(**common)
        self.provider = provider
        self.threads = threads

    def _check_own_params(self):
        check(self.provider in ("cpu", "cuda", "auto"), "provider", "'cpu', 'cuda' or 'auto'", self.provider)
        check(self.threads is None or (isinstance(self.threads, int) and self.threads >= 1), "threads",
              "None or a positive int", self.threads)

    def __repr__(self) -> str:
        src = getattr(self, "source_", "?")
        return f"OnnxDetector({src}, {getattr(self, 'precision_', '?')}, provider={self.provider!r})"

    # -- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_bytes(cls, data: bytes, *, where="model", provider: str = "cpu", threads: int | None = None,
                   batch_size: int | None = None) -> "OnnxDetector":
        require()
        import onnx

        try:
            model = onnx.load_from_string(data)
        except Exception as exc:  # noqa: BLE001 - protobuf raises its own DecodeError
            raise ValueError(f"path: {where} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
        meta = _get_meta(model, where)
        pre = meta["preprocessing"]
        params = meta["params"]
        det = cls(provider=provider, threads=threads, image_size=pre["image_size"], crop_size=pre["crop_size"],
                  batch_size=batch_size or params.get("batch_size", 8), seed=params.get("seed", 0),
                  threshold_quantile=params.get("threshold_quantile", 0.99), validation=params.get("validation", 0.1))
        det._check_own_params()
        for k, v in meta["fitted"].items():
            setattr(det, k, tuple(v) if isinstance(v, list) and k == "map_range_" else v)
        det.source_ = meta["detector"]
        det.source_params_ = params
        det.precision_ = meta.get("precision", "float32")
        det.quantization_ = meta.get("quantization")
        det.stages_ = list(meta.get("stages") or [])
        det._meta = meta
        det._onnx = data
        det._mean, det._std = tuple(pre["mean"]), tuple(pre["std"])
        return det

    def _normalisation(self):
        return self._mean, self._std

    # -- the contract ----------------------------------------------------------------------------------------
    def fit(self, train, *, validation=None, labels=None, checkpoint=None):
        raise ValueError(f"{type(self).__name__}: an exported model is not fitted again; fit the source detector "
                         f"(pyad.{getattr(self, 'source_', 'PatchCore')}) and export it")

    def _build_module(self) -> nn.Module:
        return OnnxModule(_Session(self._onnx, self.stages_, self._provider(), self.threads))

    def _provider(self) -> str:
        import onnxruntime as ort

        self._check_own_params()
        have = ort.get_available_providers()
        if self.provider == "auto":
            return "cuda" if PROVIDERS["cuda"] in have else "cpu"
        if self.provider == "cuda" and PROVIDERS["cuda"] not in have:
            raise ValueError(f"provider: 'cuda' was asked for but this onnxruntime has no CUDA provider (it has "
                             f"{', '.join(have)}); install onnxruntime-gpu, or use provider='cpu'")
        return self.provider

    def model_bytes(self) -> bytes:
        """The ONNX file as saved now (metadata with the current thresholds)."""
        import onnx

        model = onnx.load_from_string(self._onnx)
        meta = dict(self._meta)
        meta["fitted"] = {k: _jsonable(getattr(self, k, None)) for k in _FITTED}
        meta["params"] = {**meta["params"], "batch_size": self.batch_size}
        _set_meta(model, meta)
        return model.SerializeToString()

    def save(self, path, *, include_weights: bool = False) -> None:
        """Write the ONNX file (``.onnx``), thresholds included; every weight is inside."""
        self._fitted()
        if Path(path).suffix.lower() != ".onnx":
            raise ValueError(f"path: an {type(self).__name__} saves as ONNX; expected a .onnx file, got {str(path)!r}")
        modelfile.atomic_write(path, self.model_bytes())

    def export(self, path) -> Path:
        return export(self, path)

    def quantize(self, calibration_images, **kw) -> "OnnxDetector":
        return quantize(self, calibration_images, **kw)

    def _state(self):
        return {}

    def footprint(self) -> dict:
        """Sizes: the ONNX file, the weights per stage, and the learnt arrays of the
        source detector (e.g. PatchCore's memory bank [k, D])."""
        import onnx

        model = onnx.load_from_string(self._onnx)
        where = {}
        for n in model.graph.node:
            st = next((p.value for p in n.metadata_props if p.key == STAGE_KEY), "?")
            for i in _node_inputs(n):
                where.setdefault(i, st)
        per = {}
        for t in model.graph.initializer:
            nbytes = len(t.raw_data) if t.raw_data else int(np.prod(t.dims, dtype=np.int64)) * 4
            per[where.get(t.name, "?")] = per.get(where.get(t.name, "?"), 0) + nbytes
        return {"file_bytes": len(self._onnx), "precision": self.precision_, "weights_bytes_per_stage": per,
                "state": self._meta.get("state", {})}


def load(path, *, provider: str = "cpu", threads: int | None = None) -> OnnxDetector:
    """An ``OnnxDetector`` from a ``.onnx`` file written by ``det.export`` / ``save``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: no model file at {path}")
    det = OnnxDetector.from_bytes(path.read_bytes(), where=str(path), provider=provider, threads=threads)
    base._check_version(det._meta, path)
    return det


def as_onnx(det: Detector) -> OnnxDetector:
    """``det`` exported and loaded back (in memory)."""
    if isinstance(det, OnnxDetector):
        return det
    model = to_onnx(det)
    return OnnxDetector.from_bytes(model.SerializeToString(), where=f"{det.name} export", batch_size=det.batch_size)


# -- static int8 quantisation ------------------------------------------------------------------------------
_QUANTIZABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _module_class(node):
    """The innermost ``nn.Module`` class a node was traced in (None if unknown)."""
    raw = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.class_hierarchy"), None)
    if not raw:
        return None
    import ast

    try:
        names = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return None
    for qual in reversed(names):
        mod, _, cls = qual.rpartition(".")
        if not mod or mod.startswith("aten"):
            continue
        try:
            return getattr(sys.modules.get(mod) or __import__(mod, fromlist=[cls]), cls)
        except (ImportError, AttributeError):
            return None
    return None


def _scope(node) -> str:
    raw = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
    if not raw:
        return ""
    import ast

    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return ""
    mods = [s for s in scopes[:-1] if s]
    return mods[-1] if mods else ""


def quantized_parts(model, detector: str, exclude=()) -> tuple[list[str], dict]:
    """(names of the nodes to quantise, {"int8": [module scopes], "float_layers":
    [learnt layers kept float]}) of an exported float model: the nodes of learnt
    convolution / linear layers, minus ``FLOAT_SCOPES[detector]`` and ``exclude``
    (module path prefixes)."""
    # a BatchNorm after a convolution is folded into it by the exporter: the folded
    # Conv node carries the BatchNorm's module
    layers = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Conv1d, nn.modules.batchnorm._BatchNorm)
    skip = tuple(FLOAT_SCOPES.get(detector, ())) + tuple(exclude)
    chosen, int8, flt = [], set(), set()
    for n in model.graph.node:
        if n.op_type not in _QUANTIZABLE:
            continue
        cls = _module_class(n)
        scope = _scope(n)
        if not (isinstance(cls, type) and issubclass(cls, layers)):
            continue  # functional: the NN search's matmul, the blur's convolution, ...
        parent = scope.rsplit(".", 1)[0] if "." in scope else scope
        if any(scope == s or scope.startswith(s + ".") for s in skip):
            flt.add(parent)
        else:
            chosen.append(n.name)
            int8.add(parent)
    return _follow(model, chosen), {"int8": sorted(int8), "float_layers": sorted(flt)}


# activations, pooling and residual additions fed only by quantised layers run in
# int8 too (ONNX Runtime fuses them with the convolutions); nothing downstream of a
# float op is quantised, so heads (distances, normalisation, blur) stay float
_FOLLOWERS = {"Relu", "Clip", "LeakyRelu", "Add", "MaxPool", "AveragePool", "GlobalAveragePool", "Concat",
              "BatchNormalization"}


def _follow(model, chosen: list[str]) -> list[str]:
    g = model.graph
    const = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n.name for n in g.node for o in n.output}
    keep = set(chosen)
    for n in g.node:  # topological order: one pass
        if n.name in keep or n.op_type not in _FOLLOWERS:
            continue
        live = [i for i in n.input if i and i not in const]
        if live and all(producer.get(i) in keep for i in live):
            keep.add(n.name)
    return [n.name for n in g.node if n.name in keep]


_PLUMBING = {"QuantizeLinear", "DequantizeLinear", "Shape", "Reshape", "Unsqueeze", "Squeeze", "Gather", "Concat",
             "Transpose", "Range", "Constant", "ConstantOfShape", "Expand", "Slice", "Cast", "Identity", "Flatten",
             "GatherND", "ScatterND", "Where", "Equal", "Less", "Greater", "Not", "And", "Split"}


def _float_ops(model, quantized: set) -> dict:
    """{stage: the computing op types left in float32} of a quantised model."""
    out: dict[str, set] = {}
    for n in model.graph.node:
        if n.name in quantized or n.op_type in _PLUMBING:
            continue
        st = next((p.value for p in n.metadata_props if p.key == STAGE_KEY), "?")
        out.setdefault(st, set()).add(n.op_type)
    return {k: sorted(v) for k, v in out.items()}


class _Reader:
    """ONNX Runtime's CalibrationDataReader over preprocessed images, one at a time."""

    def __init__(self, pre: imgs.Preprocess, items: list):
        self.pre, self.items, self.i = pre, items, 0

    def get_next(self):
        if self.i >= len(self.items):
            return None
        x = self.pre([self.items[self.i]])
        self.i += 1
        return {INPUT: x.numpy()}

    def rewind(self):
        self.i = 0


def quantize(det: Detector, calibration_images, *, method: str = "minmax", max_images: int | None = 300,
             per_channel: bool = True, exclude=(), refit: bool | None = None, seed: int = 0) -> OnnxDetector:
    """Static int8 post-training quantisation (module doc).

    calibration_images: normal training images (a folder, paths, arrays, or a pyad
        dataset, whose training images are used); at most ``max_images`` of them (a
        seeded sample) set the activation ranges.
    method: activation ranges from "minmax" (default), "entropy" or "percentile"
        (99.999%) calibration (the last two hold every activation of every
        calibration image in memory).
    refit: re-learn the head of a fit-once frozen-feature detector (PatchCore's
        memory bank, PaDiM's Gaussians, SPADE's gallery) and its thresholds from the
        int8 backbone's features of ``calibration_images`` (pass the training
        images: the head learns from all of them, not only the ``max_images``
        sample). Default: on for
        those detectors given as torch detectors (their distances otherwise measure
        the int8 rounding; docs/deployment.md), off for trained detectors
        (refitting is training) and for an ``OnnxDetector`` (its head is in the graph).
    exclude: more module path prefixes to keep in float32.

    Returns the int8 detector (``.save("model-int8.onnx")``, ``pyad.load``)."""
    require()
    check(method in CALIBRATION_METHODS, "method", f"one of {CALIBRATION_METHODS}", method)
    check(max_images is None or (isinstance(max_images, int) and max_images >= 1), "max_images",
          "None or a positive int", max_images)
    check(refit in (None, True, False), "refit", "None, True or False", refit)
    if isinstance(exclude, str):
        exclude = (exclude,)
    items = imgs.as_items(_split(calibration_images, "train"), "calibration_images")
    sample = items
    if max_images is not None and len(items) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(items), max_images, replace=False))
        sample = [items[i] for i in keep]
    refittable = _refittable(det)
    refit = refittable if refit is None else refit
    if refit and not refittable:
        raise ValueError(f"refit: only the fit-once frozen-feature detectors (PatchCore, PaDiM, SPADE) as torch "
                         f"detectors re-learn their head on int8 features, not {type(det).__name__}"
                         + (" (load the .pyad model)" if isinstance(det, OnnxDetector) else ""))
    refit_info = None
    if refit:
        det, refit_info, int8_net = _refit_head(det, calibration_images, sample, method, per_channel, exclude)
    src = as_onnx(det)
    if src.precision_ != "float32":
        raise ValueError(f"det: this model is already {src.precision_}; quantise the float32 export")
    import onnx

    meta = dict(src._meta)
    started = time.perf_counter()
    q, nodes, parts = _quantize_model(onnx.load_from_string(src._onnx), meta["detector"], src.preprocessing, sample,
                                      method, per_channel, exclude)
    seconds = time.perf_counter() - started
    order = meta.get("stages") or ["network"]
    labels = {n.name: order.index(v) for n in q.graph.node for p in n.metadata_props
              if p.key == STAGE_KEY for v in [p.value] if v in order}
    _write_labels(q, labels, order)
    meta["precision"] = "int8"
    meta["quantization"] = {
        "tool": "onnxruntime.quantization.quantize_static", "onnxruntime": _ort_version(), "format": "QDQ",
        "weights": "int8 in a 7-bit range (reduce_range), " + ("per channel" if per_channel else "per tensor"),
        "activations": "uint8, per tensor",
        "calibration": method, "calibration_images": len(sample), "seconds": round(seconds, 2),
        "quantized_nodes": len(nodes), "int8_scopes": parts["int8"], "float_layers": parts["float_layers"],
        "float": _float_ops(q, set(nodes)), "refit": refit_info, "backends": quantization_backends(),
    }
    _set_meta(q, meta)

    def detector():
        return OnnxDetector.from_bytes(q.SerializeToString(), where=f"{meta['detector']} int8", provider=src.provider,
                                       threads=src.threads, batch_size=src.batch_size)

    if refit_info is not None:  # the int8 graph scores as the refitted head did on the int8 backbone
        probe = sample[: min(4, len(sample))]
        got = detector().predict(probe, maps="none").scores
        want = _with_backbone(det, int8_net).predict(probe, maps="none").scores
        refit_info["check_max_rel_diff"] = float(np.max(np.abs(got - want)) / max(1e-12, float(np.abs(want).max())))
        _set_meta(q, meta)
    return detector()


def _refittable(det) -> bool:
    from .detectors.frozen import FrozenFeatureDetector
    from .detectors.trained import TrainedDetector

    return isinstance(det, FrozenFeatureDetector) and not isinstance(det, TrainedDetector)


def _quantize_model(model, detector: str, pre: imgs.Preprocess, sample: list, method: str, per_channel: bool,
                    exclude=()):
    """(QDQ int8 model, quantised node names, parts) of an exported float model."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    with tempfile.TemporaryDirectory(prefix="pyad-quantize-") as tmp:
        f32, pre_path, out = (os.path.join(tmp, n) for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(model, f32)
        with _quiet():
            # shape inference only: the exporter already folded BatchNorm into the convolutions,
            # and ONNX Runtime's offline constant folding would store folded constants (PaDiM's
            # packed factors unpacked to [P, d, d]: twice the file)
            quant_pre_process(f32, pre_path, skip_optimization=True, skip_symbolic_shape=True)
        pre_model = onnx.load(pre_path)
        _carry_metadata(model, pre_model)
        nodes, parts = quantized_parts(pre_model, detector, exclude)
        if not nodes:
            raise ValueError(f"det: {detector} has no convolution or linear layer left to quantise "
                             f"(kept in float32: {FLOAT_SCOPES.get(detector, ()) + tuple(exclude)})")
        calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]

        def quantise(m):
            onnx.save(m, pre_path)
            with _quiet():
                quantize_static(pre_path, out, _Reader(pre, sample), quant_format=QuantFormat.QDQ,
                                per_channel=per_channel, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8, nodes_to_quantize=nodes, calibrate_method=calib,
                                **_calibration_scope(pre_model, nodes),
                                # 7-bit weights: x86 CPUs without VNNI multiply uint8 x int8 pairs with
                                # pmaddubsw, whose int16 sums saturate at 8-bit weights (ONNX Runtime's
                                # quantization guide); on this AVX2 machine the tiny AST lost its defect
                                # ranking without it (tests/test_export.py::test_int8_every_detector)
                                reduce_range=True)
            return onnx.load(out)

        region = _region(pre_model, nodes)
        q = None
        if len(region) < len(pre_model.graph.node):
            q = _merge(pre_model, region, quantise(_sub_model(pre_model, region)))
        if q is None:  # the whole graph: nothing outside the region, or a quantiser that renamed its outputs
            q = quantise(pre_model)
    _carry_metadata(pre_model, q)
    return q, nodes, parts


def _region(model, nodes: list[str]) -> set[str]:
    """The nodes calibration has to run: the quantised ones and everything they depend
    on. What only consumes their outputs (PatchCore's and SPADE's in-graph search,
    Gaussian scoring, maps) stays float and is neither run nor recorded: SPADE's
    calibration of the whole graph peaked at 16.9 GB (its search's distance buffers),
    and every frozen-feature detector ran its search once per calibration image."""
    producer = {o: n for n in model.graph.node for o in n.output}
    by_name = {n.name: n for n in model.graph.node}
    keep, todo = set(), [by_name[n] for n in nodes]
    while todo:
        n = todo.pop()
        if n.name in keep:
            continue
        keep.add(n.name)
        todo += [producer[i] for i in _node_inputs(n) if i in producer and producer[i].name not in keep]
    return keep


def _sub_model(model, region: set[str]):
    """The float model of ``region`` alone (ancestor-closed): graph inputs it reads in,
    every tensor it makes that the rest of the graph or the graph's outputs read out."""
    import onnx
    from onnx import helper

    g = model.graph
    inside = [n for n in g.node if n.name in region]
    made = {o for n in inside for o in n.output}
    read_outside = {i for n in g.node if n.name not in region for i in _node_inputs(n)} | {o.name for o in g.output}
    used = {i for n in inside for i in _node_inputs(n)}
    types = {v.name: v for v in list(g.value_info) + list(g.input) + list(g.output)}
    outs = [types.get(o) or helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None)
            for n in inside for o in n.output if o in read_outside]
    graph = helper.make_graph(inside, f"{g.name}_quantised_region", [i for i in g.input if i.name in used], outs,
                              initializer=[t for t in g.initializer if t.name in used],
                              value_info=[v for v in g.value_info if v.name in made | used])
    sub = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    sub.functions.extend(model.functions)
    return sub


def _merge(model, region: set[str], q):
    """``model`` with its ``region`` replaced by the quantised region ``q``, whose
    output tensors keep their names (ONNX Runtime's QDQ quantiser names a graph
    output's DequantizeLinear output after it); None if a tensor the rest reads is
    no longer made (a quantiser that renames them)."""
    import onnx

    made = {o for n in q.graph.node for o in n.output} | {t.name for t in model.graph.initializer}
    made |= {i.name for i in model.graph.input}
    rest_reads = {i for n in model.graph.node if n.name not in region for i in _node_inputs(n)}
    rest_reads |= {o.name for o in model.graph.output}
    rest_made = {o for n in model.graph.node if n.name not in region for o in n.output}
    if not rest_reads - rest_made <= made:
        return None

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    rest = [n for n in model.graph.node if n.name not in region]
    del g.node[:]
    g.node.extend(list(q.graph.node) + rest)
    have = {t.name for t in q.graph.initializer}
    used = {i for n in rest for i in _node_inputs(n)}
    inits = list(q.graph.initializer) + [t for t in model.graph.initializer if t.name in used and t.name not in have]
    del g.initializer[:]
    g.initializer.extend(inits)
    named = {v.name for v in q.graph.value_info}
    infos = list(q.graph.value_info) + [v for v in model.graph.value_info if v.name not in named]
    del g.value_info[:]
    g.value_info.extend(infos)
    domains = {o.domain: o.version for o in model.opset_import}
    for o in q.opset_import:
        domains[o.domain] = max(domains.get(o.domain, 0), o.version)
    del out.opset_import[:]
    out.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in domains.items())
    return out


def _calibration_scope(model, nodes: list[str]) -> dict:
    """What ONNX Runtime's calibrator records, kept to what the quantised nodes need:
    by default it reduces every float tensor of every quantisable op type (SPADE's
    in-graph search: 50 gallery images x [4,096 x 4,096] distances per image). Only
    the chosen nodes' op types are recorded; the set of quantised nodes is unchanged
    (the intersection with ``nodes_to_quantize``), and so are their ranges (tested)."""
    chosen = set(nodes)
    return {"op_types_to_quantize": sorted({n.op_type for n in model.graph.node if n.name in chosen})}


class _OrtBackbone(nn.Module):
    """A frozen backbone run by an ONNX Runtime session (the int8 backbone): the
    ``Backbone`` interface the frozen-feature detectors use (``forward`` -> {layer:
    features}, ``shapes``, ``layer_names``)."""

    def __init__(self, data: bytes, names: list[str], shapes: dict, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        self.session = ort.InferenceSession(data, _session_options(threads), providers=[PROVIDERS["cpu"]])
        self.layer_names, self._shapes = list(names), dict(shapes)

    def shapes(self, size: int = 224) -> dict:
        return self._shapes

    def forward(self, x: torch.Tensor) -> dict:
        outs = self.session.run(self.layer_names, {INPUT: np.ascontiguousarray(x.detach().cpu().float().numpy())})
        return {n: torch.from_numpy(o) for n, o in zip(self.layer_names, outs)}


def _refit_head(det, calibration_images, sample, method, per_channel, exclude):
    """A copy of ``det`` whose head and thresholds are learnt from the int8 backbone's
    features (its backbone stays the float one: exported and quantised with the same
    calibration, the int8 graph then computes the features the head was fitted on)."""
    import onnx

    started = time.perf_counter()
    net = det._network()
    if next(net.parameters()).device.type != "cpu":
        net = copy.deepcopy(net).cpu()
    size = det.preprocessing.size
    names = list(net.layer_names)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    program = _onnx_program(net, x, names, OPSET)
    # the same layers as in the full graph: exclusions are paths in the inference module
    at = next((n for n, m in det.inference_module().named_modules() if m is det._network()), "")
    own = tuple(e[len(at) + 1 :] for e in exclude if at and e.startswith(at + "."))
    backbone, _, _ = _quantize_model(program.model_proto, "backbone", det.preprocessing, sample, method, per_channel,
                                     own)
    int8_net = _OrtBackbone(backbone.SerializeToString(), names, net.shapes(size))
    clone = _with_backbone(base.clone(det, device="cpu"), int8_net)
    clone.fit(calibration_images)  # the frozen-feature fit takes its backbone from _network()
    clone.weights_id_ = getattr(det, "weights_id_", None)
    clone.weights_source_ = getattr(det, "weights_source_", None)
    info = {"head": "re-learnt from the int8 backbone's features of the calibration images",
            "n_train": clone.n_train_, "threshold_rule": clone.threshold_rule_,
            "seconds": round(time.perf_counter() - started, 2)}
    float_twin = base.clone(clone)  # the same learnt state on the float backbone: what is exported
    for k in [a for a in clone.__dict__ if a.endswith("_") and not a.startswith("_")]:
        setattr(float_twin, k, getattr(clone, k))
    float_twin._cache["backbone"] = net
    return float_twin, info, int8_net


def _with_backbone(det, net):
    """``det`` with ``net`` as its frozen backbone (an instance override of
    ``_network``, module cache cleared)."""
    det._network = lambda: net
    with det._lock:
        det._cache.clear()
    return det


def _carry_metadata(src, dst) -> None:
    """Copy node metadata (stage, module scopes) by node name; ONNX Runtime's
    pre-processing and quantiser keep node names but not always their metadata."""
    by_name = {n.name: n.metadata_props for n in src.graph.node}
    for n in dst.graph.node:
        have = {p.key for p in n.metadata_props}
        for p in by_name.get(n.name, []):
            if p.key not in have:
                e = n.metadata_props.add()
                e.key, e.value = p.key, p.value
    for p in src.metadata_props:
        if p.key == META_KEY and not any(q.key == META_KEY for q in dst.metadata_props):
            e = dst.metadata_props.add()
            e.key, e.value = p.key, p.value


def quantization_backends() -> dict:
    """What this installation offers for int8 (feature-detected, nothing imported that
    warns): ONNX Runtime (pyad's path), torchao's PT2E quantisation, and the deprecated
    ``torch.ao.quantization`` (which may be absent from the torch users have)."""
    import importlib.metadata as md
    import importlib.util

    def version(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    try:
        legacy = importlib.util.find_spec("torch.ao.quantization") is not None
    except (ImportError, ValueError):
        legacy = False
    return {"onnxruntime": version("onnxruntime") or version("onnxruntime-gpu"), "torchao": version("torchao"),
            "torch.ao.quantization": legacy, "used": "onnxruntime"}


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
