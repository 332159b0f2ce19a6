"""Reference figures for anomalib's Ganomaly, CPU, offline.

Run with the anomalib venv's python:
    /work/anomalib-venv/bin/python bench/anomalib_ref/ganomaly.py --steps 20

Prints one JSON line on stdout (everything else goes to stderr):
  (a) training throughput through anomalib's Engine.fit on the category's train images at
      --image-size, batch --batch-size (32, as anomalib's Ganomaly config uses); --steps
      counts training *batches* (GANomaly optimises manually with two optimisers, so
      Lightning's max_steps counts 2 optimiser steps per batch: max_steps = 2 * --steps).
      Timed by a Lightning callback from the end of the first batch to the end of the last;
      reported as images/s (the last batch of an epoch is smaller: 209 = 6*32 + 17 on bottle,
      so images are counted, not assumed) and batches/s;
  (b) predict latency of the torch model (model.model(x), eval mode, inference_mode) at
      --batch-sizes on real test images: --warmup untimed calls, mean of --repeats calls;
  (c) optionally the state_dict (--save-weights) and input batch + scores (--save-maps).
GANomaly has no pretrained part: nothing is downloaded.
"""
from __future__ import annotations

import time
from pathlib import Path

import _common as C

ap = C.base_parser(__doc__.splitlines()[0], default_steps=20)
ap.add_argument("--batch-size", type=int, default=32, help="train batch size (default 32, anomalib's config)")
args = ap.parse_args()
C.setup_torch(args)

import torch  # noqa: E402
from anomalib.data import MVTecAD  # noqa: E402
from anomalib.engine import Engine  # noqa: E402
from anomalib.models import Ganomaly  # noqa: E402

work = C.workdir(args)
size = (args.image_size, args.image_size)
# default GANomaly pre-processor: Resize + ImageNet Normalize (AnomalibModule's default)
model = Ganomaly(batch_size=args.batch_size, pre_processor=Ganomaly.configure_pre_processor(size))
if args.load_weights:
    model.model.load_state_dict(torch.load(args.load_weights, map_location="cpu", weights_only=True))

out: dict = {"runner": "anomalib_ref/ganomaly", "model": "ganomaly", "category": args.category,
             "image_size": args.image_size, "threads": args.threads, "num_workers": args.num_workers,
             "train_batch_size": args.batch_size, "versions": C.versions(),
             "params": {k: sum(p.numel() for p in getattr(model.model, k).parameters())
                        for k in ("generator", "discriminator")}}

dm = MVTecAD(root=args.root, category=args.category, train_batch_size=args.batch_size, eval_batch_size=32,
             num_workers=args.num_workers, seed=args.seed)
if args.steps > 0:
    timer = C.make_step_timer()
    engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir=work / "results",
                    callbacks=[timer], max_steps=2 * args.steps, enable_progress_bar=False,
                    limit_val_batches=0)  # validation (score min/max) is not part of the throughput
    t_fit = time.perf_counter()
    engine.fit(model=model, datamodule=dm)
    out["fit_wall_s"] = round(time.perf_counter() - t_fit, 2)
    out["torch_threads_in_fit"] = torch.get_num_threads()
    tr = timer.summary(t_fit)
    # name the per-batch rate for what it is
    for k in ("steps_per_s", "steps_per_s_incl_first"):
        if k in tr:
            tr[k.replace("steps", "batches")] = tr.pop(k)
    out["train"] = {"batches": args.steps, "lightning_max_steps": 2 * args.steps, **tr}
    out["peak_rss_gb_after_fit"] = round(C.vm_hwm_gb(), 3)

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
    Path(args.save_maps).parent.mkdir(parents=True, exist_ok=True)
    # GANomaly is image-level only: pred_score = mean((latent_i - latent_o)^2) over the latent
    np.savez_compressed(args.save_maps, x=x.numpy(), pred_score=pred.pred_score.numpy(),
                        paths=np.array(res["paths"]))
    out["saved_maps"] = args.save_maps
out["peak_rss_gb"] = round(C.vm_hwm_gb(), 3)
C.emit(out)
