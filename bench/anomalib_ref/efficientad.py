"""Reference figures for anomalib's EfficientAd (small / medium), CPU, offline.

Run with the anomalib venv's python:
    /work/anomalib-venv/bin/python bench/anomalib_ref/efficientad.py --model-size small --steps 200

Prints one JSON line on stdout (everything else goes to stderr):
  (a) training throughput through anomalib's Engine.fit with max_steps=--steps on the
      category's train images at --image-size, batch 1 (anomalib requires it); timed by a
      Lightning callback from the end of the first training step to the end of the last
      (start-up -- teacher channel statistics, data setup, first step -- excluded);
  (b) predict latency of the torch model (model.model(x), eval mode, inference_mode) at
      --batch-sizes on real test images: --warmup untimed calls, mean of --repeats calls;
  (c) optionally the torch model's state_dict (--save-weights) and the input batch and
      outputs (--save-maps) for equal-weights/equal-maps checks.

Nothing is downloaded: the teacher stays randomly initialised (seeded) unless
--teacher-weights gives a state_dict for it, the ImageNet penalty images come from
--imagenet-dir (a flat folder of images is wrapped as a one-class ImageFolder), and
anomalib's download_and_extract is replaced by a function that raises.
"""
from __future__ import annotations

import time
from pathlib import Path

import _common as C

ap = C.base_parser(__doc__.splitlines()[0], default_steps=200)
ap.add_argument("--model-size", choices=["small", "medium"], default="small")
ap.add_argument("--imagenet-dir", default=C.DEFAULT_IMAGENET,
                help="penalty images: an ImageFolder root, or a flat folder of images (default %(default)s)")
ap.add_argument("--teacher-weights", help="state_dict for the teacher PDN (default: random init, nothing downloaded)")
ap.add_argument("--skip-teacher-stats", action="store_true",
                help="smoke runs only: set teacher mean/std to 0/1 instead of computing them over the train set "
                     "in on_train_start (start-up only; the per-step work is identical)")
ap.add_argument("--quantiles", action="store_true",
                help="after training, compute the map-normalisation quantiles on the validation split as "
                     "on_validation_start does (implied by --save-weights / --save-maps when --steps > 0)")
args = ap.parse_args()
C.setup_torch(args)

import torch  # noqa: E402
import anomalib.models.image.efficient_ad.lightning_model as ead_lm  # noqa: E402
from anomalib.data import MVTecAD  # noqa: E402
from anomalib.engine import Engine  # noqa: E402
from anomalib.models import EfficientAd  # noqa: E402


def _no_download(*a, **k):
    raise RuntimeError(f"anomalib tried to download ({a}, {k}); this runner is offline")


ead_lm.download_and_extract = _no_download  # both teacher weights and Imagenette go through it


def imagenet_root(d: str, work: Path) -> Path:
    """torchvision ImageFolder needs class sub-folders; wrap a flat folder of images."""
    p = Path(d)
    if not p.is_dir():
        raise SystemExit(f"--imagenet-dir {p} is not a folder")
    if any(f.suffix.lower() in C.IMG_EXT for f in p.iterdir() if f.is_file()):
        root = work / "imagenet"
        root.mkdir()
        (root / "samples").symlink_to(p.resolve(), target_is_directory=True)
        return root
    return p


work = C.workdir(args)
size = (args.image_size, args.image_size)
model = EfficientAd(
    imagenet_dir=imagenet_root(args.imagenet_dir, work),
    model_size=args.model_size,
    pre_processor=EfficientAd.configure_pre_processor(size),  # Resize only; ImageNet norm is inside the nets
)
if args.load_weights:
    model.model.load_state_dict(torch.load(args.load_weights, map_location="cpu", weights_only=True))


def _prepare_teacher() -> None:
    # replaces EfficientAd.prepare_pretrained_model (called from on_train_start), which downloads
    if args.teacher_weights:
        model.model.teacher.load_state_dict(torch.load(args.teacher_weights, map_location="cpu", weights_only=True))


model.prepare_pretrained_model = _prepare_teacher
if args.skip_teacher_stats and not model.model.is_set(model.model.mean_std):
    c = model.model.teacher_out_channels
    model.model.mean_std.update({"mean": torch.zeros(1, c, 1, 1), "std": torch.ones(1, c, 1, 1)})

out: dict = {"runner": "anomalib_ref/efficientad", "model": "efficientad", "model_size": args.model_size,
             "category": args.category, "image_size": args.image_size, "threads": args.threads,
             "num_workers": args.num_workers, "train_batch_size": 1,
             "teacher": args.teacher_weights or "random-init", "versions": C.versions()}
n_params = {k: sum(p.numel() for p in getattr(model.model, k).parameters()) for k in ("teacher", "student", "ae")}
out["params"] = n_params

dm = MVTecAD(root=args.root, category=args.category, train_batch_size=1, eval_batch_size=32,
             num_workers=args.num_workers, seed=args.seed)
if args.steps > 0:
    timer = C.make_step_timer()
    engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir=work / "results",
                    callbacks=[timer], max_steps=args.steps, enable_progress_bar=False,
                    limit_val_batches=0)  # validation (quantiles, metrics) is not part of the throughput
    t_fit = time.perf_counter()
    engine.fit(model=model, datamodule=dm)
    out["fit_wall_s"] = round(time.perf_counter() - t_fit, 2)
    out["torch_threads_in_fit"] = torch.get_num_threads()
    out["train"] = {"max_steps": args.steps, **timer.summary(t_fit)}
    out["peak_rss_gb_after_fit"] = round(C.vm_hwm_gb(), 3)
    if args.quantiles or args.save_weights or args.save_maps:
        t0 = time.perf_counter()
        if not hasattr(dm, "val_data"):
            dm.setup("validate")
        model.model.quantiles.update(model.map_norm_quantiles(dm.val_dataloader()))
        out["quantiles_s"] = round(time.perf_counter() - t0, 2)
        out["quantiles"] = {k: float(v) for k, v in model.model.quantiles.items()}

torch.manual_seed(args.seed)
res = C.predict_latency(model.model, args, model.pre_processor.transform, out)
out["torch_threads_in_predict"] = torch.get_num_threads()

if args.save_weights:
    Path(args.save_weights).parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.model.state_dict(), args.save_weights)
    out["saved_weights"] = args.save_weights
if args.save_maps:
    import numpy as np

    with torch.inference_mode():
        x = res["x"]
        pred = model.model(x)
        map_st, map_stae = model.model.get_maps(x, normalize=True)
    Path(args.save_maps).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.save_maps, x=x.numpy(), anomaly_map=pred.anomaly_map.numpy(),
                        pred_score=pred.pred_score.numpy(), map_st=map_st.numpy(), map_stae=map_stae.numpy(),
                        paths=np.array(res["paths"]))
    out["saved_maps"] = args.save_maps
out["peak_rss_gb"] = round(C.vm_hwm_gb(), 3)
C.emit(out)
