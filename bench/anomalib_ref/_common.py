"""Shared helpers for the anomalib reference runners in this folder.

Imported by efficientad.py and ganomaly.py (the script's own folder is first on
sys.path when a script is run by path). Runs only under the anomalib venv's python.

Conventions of every runner:
- all library chatter (Lightning tables, tqdm, warnings, even C-level prints) goes to
  stderr; stdout carries exactly one JSON line, written at the end;
- peak memory is VmHWM of /proc/self/status (the process's resident high-water mark),
  reported in GB (10^9 bytes);
- latency: `warmup` untimed calls, then the mean of `repeats` timed calls, under
  torch.inference_mode() (what Lightning's predict/test loops use), model in eval mode.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Keep stdout clean for the single JSON line: point fd 1 at stderr for the whole run and
# keep a private handle on the real stdout. Done at import, before torch/lightning load.
_REAL_STDOUT_FD = os.dup(1)
sys.stdout.flush()
os.dup2(2, 1)

DEFAULT_ROOT = "/work/shared/data/mvtec_ad"
DEFAULT_IMAGENET = "/work/shared/data/imagenet_samples"
IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def base_parser(description: str, default_steps: int) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--root", default=DEFAULT_ROOT, help="MVTec-AD layout root (default %(default)s)")
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=default_steps,
                    help="training batches run through Engine.fit (0: no training, latency only)")
    ap.add_argument("--num-workers", type=int, default=0,
                    help="DataLoader workers of the MVTec datamodule (default 0: loading on the main process)")
    ap.add_argument("--batch-sizes", default="1,8", help="predict-latency batch sizes, comma-separated")
    ap.add_argument("--warmup", type=int, default=3, help="untimed predict calls per batch size")
    ap.add_argument("--repeats", type=int, default=5, help="timed predict calls per batch size (mean reported)")
    ap.add_argument("--load-weights", help="state_dict (torch.save of model.model.state_dict()) loaded into the "
                    "torch model before training/prediction")
    ap.add_argument("--save-weights", help="write model.model.state_dict() here after training")
    ap.add_argument("--save-maps", help="write an .npz with the predict input batch and the model outputs")
    ap.add_argument("--keep-workdir", action="store_true", help="keep Lightning's temporary root dir")
    return ap


def setup_torch(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


def vm_hwm_gb() -> float:
    """Peak resident set size of this process (VmHWM), GB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def versions() -> dict:
    import anomalib
    import lightning
    import torch

    return {"anomalib": anomalib.__version__, "torch": torch.__version__, "lightning": lightning.__version__,
            "python": platform.python_version()}


def emit(obj: dict) -> None:
    """Write the one JSON line to the real stdout."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(_REAL_STDOUT_FD, (json.dumps(obj) + "\n").encode())


def workdir(args) -> Path:
    d = Path(tempfile.mkdtemp(prefix="anomalib_ref_"))
    if not args.keep_workdir:
        import atexit

        atexit.register(shutil.rmtree, d, True)
    return d


def make_step_timer():
    """A Lightning callback that stamps the end of every training batch."""
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.first_start: float | None = None
            self.ends: list[float] = []
            self.images: list[int] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.first_start is None:
                self.first_start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.ends.append(time.perf_counter())
            self.images.append(int(batch.image.shape[0]))

        def summary(self, fit_called: float) -> dict:
            n = len(self.ends)
            out = {"train_steps_done": n, "train_images_done": sum(self.images)}
            if n == 0:
                return out
            out["fit_startup_s"] = round(self.first_start - fit_called, 3)
            out["first_step_s"] = round(self.ends[0] - self.first_start, 4)
            all_s = self.ends[-1] - self.first_start
            out["train_s_all_steps"] = round(all_s, 3)
            if n >= 2:
                # steady state: the n-1 intervals from the end of step 1 to the end of step n
                # (each interval = fetch + pre-process + forward + backward + optimiser + hooks)
                s = self.ends[-1] - self.ends[0]
                out["train_s_steady"] = round(s, 3)
                out["steps_per_s"] = round((n - 1) / s, 4)
                out["images_per_s"] = round(sum(self.images[1:]) / s, 3)
            out["steps_per_s_incl_first"] = round(n / all_s, 4)
            return out

    return StepTimer()


def test_image_paths(root: str, category: str, n: int) -> list[Path]:
    """n test images of the category, defects first then good ones, sorted (deterministic)."""
    test = Path(root) / category / "test"
    defect = sorted(p for d in sorted(test.iterdir()) if d.is_dir() and d.name != "good"
                    for p in d.iterdir() if p.suffix.lower() in IMG_EXT)
    good = sorted(p for p in (test / "good").iterdir() if p.suffix.lower() in IMG_EXT) if (test / "good").is_dir() else []
    paths = [*defect, *good]
    if not paths:
        sys.exit(f"no test images under {test}")
    return [paths[i % len(paths)] for i in range(n)]


def load_batch(paths: list[Path], transform):
    """Read images as anomalib's datasets do (PIL RGB -> float [0,1] CHW), resize each
    as the dataset does (the model's Resize is appended to the dataset augmentations),
    stack, then apply the model's pre-processor transform (as the PreProcessor callback
    does on the batch)."""
    import torch
    from anomalib.data.utils import read_image
    from anomalib.data.transforms.utils import extract_transforms_by_type
    from torchvision.transforms.v2 import Resize

    resizes = extract_transforms_by_type(transform, Resize) if transform is not None else []
    imgs = []
    for p in paths:
        im = read_image(p, as_tensor=True)  # float32 [0,1], CHW
        if resizes:
            im = resizes[0](im)
        imgs.append(im)
    x = torch.stack(imgs)
    if transform is not None:
        x = transform(x)
    return x.contiguous()


def time_calls(fn, x, warmup: int, repeats: int) -> dict:
    import torch

    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            ts.append(time.perf_counter() - t0)
    b = x.shape[0]
    mean = sum(ts) / len(ts)
    return {"batch": b, "ms_per_batch": round(1000 * mean, 2), "ms_per_image": round(1000 * mean / b, 2),
            "ms_per_batch_min": round(1000 * min(ts), 2), "calls": repeats, "warmup": warmup}


def predict_latency(torch_model, args, transform, out: dict) -> dict:
    """Latency of torch_model(x) in eval mode at each --batch-sizes; returns the largest batch used."""
    torch_model.eval()
    sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    paths = test_image_paths(args.root, args.category, max(sizes))
    big = load_batch(paths, transform)
    out["predict_input"] = {"shape": list(big.shape), "source": "first test images of the category, "
                            "dataset resize + model pre-processor"}
    out["predict"] = [time_calls(torch_model, big[:b], args.warmup, args.repeats) for b in sizes]
    return {"x": big, "paths": [str(p.relative_to(args.root)) for p in paths]}
