"""Uninformed Students: student-teacher anomaly detection with discriminative latent
embeddings (Bergmann, Fauser, Sattlegger, Steger, CVPR 2020). MVTec released no code;
the third-party implementations LuyaooChen/uninformed-students-pytorch @3c5661e and
denguir/student-teacher-anomaly-detection @fc279ef were read for comparison.

1. A *patch teacher* T̂ maps a p×p patch to a d = 128 descriptor (§3.1): a small CNN
   without padding, LeakyReLU(5e-3) after every convolution but the last, for
   receptive fields p ∈ {17, 33, 65} (``ARCHITECTURES``). It is distilled once, on
   natural-image patches, from a pretrained network's globally pooled descriptor φ(p)
   through a fully connected decoder D (128 -> dim φ, 512 for the paper's ResNet-18):
   L = λ_k‖D(T̂(p)) − φ(p)‖² + λ_c Σ_{i≠j} c_ij (+ λ_m triplet loss, off by default:
   the authors found metric learning unhelpful), c the correlation matrix of the 128
   descriptor dimensions over the minibatch (``distill_patch_teacher``;
   ``pyad distill-teacher --method uninformed_students``).
2. The dense teacher T applies T̂ at every pixel of an image in one pass with the fast
   dense feature extraction of Bailer et al. (BMVC 2017): the image is padded by p−1
   (reflection, centring each patch on its pixel) and every 2×2 max-pooling is
   replaced by the four pooled copies at offsets (0,0), (0,1), (1,0), (1,1) stacked
   into the batch ("multi-pool"), which the end interleaves back ("unwrap"), so the
   result equals T̂ on each pixel's patch (tested) at the cost of one
   full-resolution pass.
3. M = 3 students per scale, each T̂'s architecture, randomly initialised, regress
   the teacher's output normalised per channel with the mean and standard deviation
   over all training pixels (§3.2): L(S_i) = mean over pixels of ‖μ^{S_i} − (y^T − μ)/σ‖².
4. Score (§3.3) per scale: regression error e = ‖mean_i μ^{S_i} − (y^T − μ)/σ‖², predictive
   variance v = mean_i ‖μ^{S_i}‖² − ‖mean_i μ^{S_i}‖², s̃ = (e − e_μ)/e_σ + (v − v_μ)/v_σ with
   e_μ, e_σ, v_μ, v_σ over all pixels of the *validation* images (normal images held out
   from training); the map is the mean of s̃ over the scales. The paper scores no
   images; pyad's image score is the map maximum.

Choices where the sources disagree or are silent (docs/detectors/uninformed_students.md):
the first kernel of the p = 33 net is 5×5 (denguir; LuyaooChen's 3×3 contradicts the
29×29 output size recorded in its own comments, which a 5×5 kernel gives); the
compactness term is the paper's Σ_{i≠j} c_ij over the 128-d descriptor (LuyaooChen
squares sample-by-sample correlations of the decoded 512-d output); e is squared, as
the paper writes (LuyaooChen uses the norm); the decoder has no activation (LuyaooChen;
denguir adds LeakyReLU and dropout).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import training
from .base import Validation, register, stage
from .settings import check
from .trained import TrainedDetector

# Layer plans: ("conv", kernel, channels) with channels "w" = width, "2w" = 2·width,
# "d" = descriptor dim; ("pool",) = 2×2 max-pooling, stride 2. p×p input -> 1×1 output.
ARCHITECTURES = {
    17: (("conv", 6, "w"), ("conv", 5, "2w"), ("conv", 5, "2w"), ("conv", 4, "d")),
    33: (("conv", 5, "w"), ("pool",), ("conv", 5, "2w"), ("pool",), ("conv", 2, "2w"), ("conv", 4, "d")),
    65: (("conv", 5, "w"), ("pool",), ("conv", 5, "w"), ("pool",), ("conv", 5, "w"), ("pool",), ("conv", 4, "2w"),
         ("conv", 1, "d")),
}
SLOPE = 5e-3  # LeakyReLU slope


class PatchNet(nn.Module):
    """T̂ (and each student) for receptive field ``patch_size``.

    ``patch(x [B, 3, p, p]) -> [B, dim]``: the patch network.
    ``forward(x [B, 3, H, W]) -> [B, dim, H, W]``: the dense network T, one descriptor
    per pixel for the p×p patch centred on it (reflection padding at the borders),
    by fast dense feature extraction (module docstring, item 2).
    ``forward(x, pad=False)``: ``x`` is already padded; output [B, dim, H−p+1, W−p+1]
    (training crops taken from a padded image equal the full image's values)."""

    def __init__(self, patch_size: int = 33, width: int = 128, dim: int = 128):
        super().__init__()
        if patch_size not in ARCHITECTURES:
            raise ValueError(f"patch_sizes: expected sizes among {sorted(ARCHITECTURES)}, got {patch_size!r}")
        self.patch_size, self.dim = patch_size, dim
        sizes = {"w": width, "2w": 2 * width, "d": dim}
        self.plan = tuple(op[0] for op in ARCHITECTURES[patch_size])
        convs, cin = [], 3
        for op in ARCHITECTURES[patch_size]:
            if op[0] == "conv":
                convs.append(nn.Conv2d(cin, sizes[op[2]], op[1]))
                cin = sizes[op[2]]
        self.convs = nn.ModuleList(convs)
        self.stride = 2 ** self.plan.count("pool")

    def _layers(self, y, dense: bool):
        c = 0
        for op in self.plan:
            if op == "conv":
                y = self.convs[c](y)
                c += 1
                if c < len(self.convs):
                    y = F.leaky_relu(y, SLOPE)
            elif dense:  # multi-pool: the four offsets of the 2×2 pooling grid, into the batch
                ho, wo = (y.shape[2] - 1) // 2, (y.shape[3] - 1) // 2
                parts = [F.max_pool2d(y[:, :, oy : oy + 2 * ho, ox : ox + 2 * wo], 2) for oy in (0, 1) for ox in (0, 1)]
                y = torch.stack(parts, 1).flatten(0, 1)
            else:
                y = F.max_pool2d(y, 2)
        return y

    def patch(self, x: torch.Tensor) -> torch.Tensor:
        return self._layers(x, dense=False).flatten(1)

    def padding(self) -> tuple[int, int]:
        """(before, after) reflection padding that centres a patch on each pixel
        (LuyaooChen multiPoolPrepare: ceil and floor of (p−1)/2)."""
        return math.ceil((self.patch_size - 1) / 2), (self.patch_size - 1) // 2

    def forward(self, x: torch.Tensor, pad: bool = True) -> torch.Tensor:
        if pad:
            lo, hi = self.padding()
            x = F.pad(x, (lo, hi, lo, hi), mode="reflect")
        h, w = x.shape[2] - self.patch_size + 1, x.shape[3] - self.patch_size + 1
        s = self.stride
        eh, ew = (-h) % s, (-w) % s  # unused rows so every pooling grid has whole windows
        if eh or ew:
            x = F.pad(x, (0, ew, 0, eh))
        y = self._layers(x, dense=True)
        k = self.plan.count("pool")
        if k:  # unwrap: output row = s·i + Σ_j 2^(j−1)·offset_j (pool j = 1 the finest)
            hh, ww = y.shape[2], y.shape[3]
            y = y.reshape(-1, *([2, 2] * k), self.dim, hh, ww)
            ys = [1 + 2 * j for j in reversed(range(k))]
            xs = [2 + 2 * j for j in reversed(range(k))]
            y = y.permute(0, 1 + 2 * k, 2 + 2 * k, *ys, 3 + 2 * k, *xs).reshape(-1, self.dim, hh * s, ww * s)
        return y[:, :, :h, :w]


# -- scoring ----------------------------------------------------------------------------------------------
def error_and_variance(teacher: torch.Tensor, students: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised teacher [B, d, H, W] and the students' outputs -> (e, v) [B, H, W]:
    e = ‖mean_i S_i − T‖², v = mean_i ‖S_i‖² − ‖mean_i S_i‖² (paper eq. 6, 7)."""
    mean = sum(students) / len(students)
    sq = sum(s.square().sum(1) for s in students) / len(students)
    return (mean - teacher).square().sum(1), sq - mean.square().sum(1)


class StudentsModule(nn.Module):
    """Normalised image [B, 3, S, S] -> (scores [B], maps [B, S, S]): per scale the
    normalised teacher, the students, e and v standardised with the validation
    statistics, averaged over scales; image score = map maximum."""

    def __init__(self, teachers: nn.ModuleList, students: nn.ModuleList, t_mean, t_std, stats):
        super().__init__()
        self.teachers, self.students = teachers, students
        self.register_buffer("t_mean", t_mean.float())  # [L, d]
        self.register_buffer("t_std", t_std.float())
        self.register_buffer("stats", stats.float())  # [L, 4]: e_mu, e_sigma, v_mu, v_sigma

    def teacher(self, level: int, x: torch.Tensor) -> torch.Tensor:
        """The teacher of scale ``level``, normalised with the training statistics."""
        t = self.teachers[level](x)
        return (t - self.t_mean[level].view(1, -1, 1, 1)) / self.t_std[level].view(1, -1, 1, 1)

    def scale(self, level: int, x: torch.Tensor, t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(e, v) [B, H, W] of scale ``level`` before standardisation; ``t``: its
        ``teacher`` output when already computed."""
        t = self.teacher(level, x) if t is None else t
        return error_and_variance(t, [s(x) for s in self.students[level]])

    def forward(self, x):
        total = None
        for level in range(len(self.teachers)):
            # teacher and students from their own lines of forward: the ONNX exporter's stack
            # traces keep forward frames only, so those lines tell a node's stage (export.py)
            t = self.teacher(level, x)
            stage("teacher")
            e, v = self.scale(level, x, t)
            stage("students")
            st = self.stats[level]
            s = (e - st[0]) / st[1] + (v - st[2]) / st[3]
            total = s if total is None else total + s
        maps = total / len(self.teachers)
        scores = maps.flatten(1).amax(1)
        stage("map")
        return scores, maps


@register("uninformed_students")
class UninformedStudents(TrainedDetector):
    """Uninformed Students (module docstring). ``networks_``: "teacher<p>" and
    "student<p>_<i>" for each patch size p.

    teachers: the distilled patch teachers, one file per patch size in
        ``patch_sizes`` order (``distill_patch_teacher`` / ``pyad distill-teacher
        --method uninformed_students``), or "random" (seeded random teachers: tests
        and ablations only, not the method).
    patch_sizes: receptive fields among 17, 33, 65 (the paper's multi-scale: all three).
    n_students: students per scale (M = 3).
    width, dim: channels of the patch nets (128, 256 = 2·width) and descriptor size (128).
    weight_decay: Adam's (1e-5).
    train_crop: None (each step regresses the whole image's map, as the paper) or a
        side s: each step regresses a random s×s window of the map (the same values
        as the full map there; a cheaper stochastic estimate of the same loss).
    """

    defaults = dict(image_size=256, max_epochs=100, lr=1e-4, batch_size=1)

    def __init__(self, *, teachers=None, patch_sizes=(17, 33, 65), n_students=3, width=128, dim=128,
                 weight_decay=1e-5, train_crop=None, **common):
        super().__init__(**common)
        self.teachers = tuple(teachers) if isinstance(teachers, list) else teachers
        self.patch_sizes = tuple(patch_sizes) if isinstance(patch_sizes, list) else patch_sizes
        self.n_students = n_students
        self.width = width
        self.dim = dim
        self.weight_decay = weight_decay
        self.train_crop = train_crop

    # -- parameters -------------------------------------------------------------------------------------
    def _check_own_params(self):
        def pos_int(v):
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        check(isinstance(self.patch_sizes, tuple) and len(self.patch_sizes) > 0
              and all(p in ARCHITECTURES for p in self.patch_sizes) and len(set(self.patch_sizes)) == len(self.patch_sizes),
              "patch_sizes", f"distinct sizes among {sorted(ARCHITECTURES)}", self.patch_sizes)
        check(self.teachers == "random" or (isinstance(self.teachers, tuple) and len(self.teachers) == len(self.patch_sizes)),
              "teachers", f"{len(self.patch_sizes)} teacher files (one per patch size {self.patch_sizes}) from "
              "pyad distill-teacher --method uninformed_students (pyad.detectors.uninformed_students."
              "distill_patch_teacher), or 'random' (untrained teachers, not the method)", self.teachers)
        if isinstance(self.teachers, tuple):
            for path in self.teachers:
                check(Path(path).is_file(), "teachers", "existing teacher files", path)
        check(pos_int(self.n_students) and self.n_students >= 2, "n_students",
              "an int >= 2 (the predictive variance needs two students)", self.n_students)
        check(pos_int(self.width), "width", "an int >= 1", self.width)
        check(pos_int(self.dim), "dim", "an int >= 1", self.dim)
        check(lambda: float(self.weight_decay) >= 0 and not isinstance(self.weight_decay, bool), "weight_decay",
              "a number >= 0", self.weight_decay)
        size = self.preprocessing.size
        check(self.train_crop is None or (pos_int(self.train_crop) and self.train_crop <= size), "train_crop",
              f"None or an int in [1, {size}] (the network input size)", self.train_crop)
        big = max(self.patch_sizes)
        check(size > big // 2, "image_size", f"a network input larger than {big // 2} px (the reflection padding "
              f"of the {big}×{big} patches)", size)

    # -- networks -----------------------------------------------------------------------------------------
    def _networks(self):
        nets = {}
        for p in self.patch_sizes:
            nets[f"teacher{p}"] = PatchNet(p, self.width, self.dim)
            for i in range(self.n_students):
                nets[f"student{p}_{i}"] = PatchNet(p, self.width, self.dim)
        return nets

    def _module(self, nets) -> StudentsModule:
        teachers = nn.ModuleList(nets[f"teacher{p}"] for p in self.patch_sizes)
        students = nn.ModuleList(nn.ModuleList(nets[f"student{p}_{i}"] for i in range(self.n_students))
                                 for p in self.patch_sizes)
        return StudentsModule(teachers, students, torch.as_tensor(self.t_mean_), torch.as_tensor(self.t_std_),
                              torch.as_tensor(self.stats_))

    def _build_module(self):
        return self._module(self.networks_)

    # -- training ---------------------------------------------------------------------------------------------
    def _load_teachers(self, nets) -> list[dict]:
        records = []
        if self.teachers == "random":
            return records
        for p, path in zip(self.patch_sizes, self.teachers):
            net, meta = load_patch_teacher(path)
            if (meta["patch_size"], meta["width"], meta["dim"]) != (p, self.width, self.dim):
                raise ValueError(f"teachers: {path} holds a p={meta['patch_size']} teacher of width {meta['width']} and "
                                 f"dim {meta['dim']}; expected p={p}, width {self.width}, dim {self.dim}")
            nets[f"teacher{p}"].load_state_dict(net.state_dict())
            records.append({k: meta.get(k) for k in ("patch_size", "backbone", "layer", "weights_id", "steps",
                                                     "final_loss")} | {"file": str(path)})
        return records

    @torch.no_grad()
    def _teacher_statistics(self, teacher, images) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and standard deviation of the dense teacher over all pixels
        of ``images`` (float64 sums)."""
        s = s2 = None
        n = 0
        for start in range(0, len(images), self.batch_size):
            t = teacher(self.to_input(images[start : start + self.batch_size])).double()
            a, b = t.sum((0, 2, 3)), t.square().sum((0, 2, 3))
            s, s2 = (a, b) if s is None else (s + a, s2 + b)
            n += t.shape[0] * t.shape[2] * t.shape[3]
        mean = s / n
        return mean.float(), (s2 / n - mean.square()).clamp_min(1e-12).sqrt().float()

    def _train(self, nets, train, val, *, labels=None, checkpoint=None):
        started = time.perf_counter()
        self.teacher_records_ = self._load_teachers(nets)
        teachers = [nets[f"teacher{p}"].eval().requires_grad_(False) for p in self.patch_sizes]
        stats = [self._teacher_statistics(t, train) for t in teachers]
        self.t_mean_ = torch.stack([m for m, _ in stats]).cpu().numpy()
        self.t_std_ = torch.stack([s for _, s in stats]).cpu().numpy()
        mean = [m.to(self.device).view(1, -1, 1, 1) for m, _ in stats]
        std = [s.to(self.device).view(1, -1, 1, 1) for _, s in stats]
        students = {k: v for k, v in nets.items() if k.startswith("student")}
        params = [q for s in students.values() for q in s.parameters()]
        # one Adam over all students = one Adam per student (Adam is elementwise)
        opt = training.optimizer("adam", params, self.lr, weight_decay=self.weight_decay)
        run = training.Run(self.name, modules=students, optimizers={"adam": opt}, max_epochs=self.max_epochs,
                           max_steps=self.max_steps, checkpoint=checkpoint, device=self.device, amp=self.amp,
                           settings=self.run_settings())
        batches = training.Batches(len(train), self.batch_size, self.seed)
        size = self.preprocessing.size
        prep = time.perf_counter() - started
        clock, epochs = time.perf_counter(), 0
        for epoch in run.epochs():
            for s in students.values():
                s.train()
            rng = np.random.default_rng([self.seed, epoch, 7])
            for idx in run.each(batches.epoch(epoch)):
                x = self.to_input(train[torch.from_numpy(idx)])
                c = self.train_crop or size
                y0, x0 = (int(v) for v in rng.integers(0, size - c + 1, 2))
                total = 0.0
                with run.autocast():
                    for level, p in enumerate(self.patch_sizes):
                        lo, hi = teachers[level].padding()
                        window = F.pad(x, (lo, hi, lo, hi), mode="reflect")[..., y0 : y0 + c + p - 1, x0 : x0 + c + p - 1]
                        with torch.no_grad():
                            target = (teachers[level](window, pad=False) - mean[level]) / std[level]
                        for i in range(self.n_students):
                            total = total + F.mse_loss(students[f"student{p}_{i}"](window, pad=False).float(), target,
                                                       reduction="sum") / target[:, 0].numel()
                loss = total / (len(self.patch_sizes) * self.n_students)  # the mean per-student loss
                run.backward(loss)
                run.log(loss=loss)
            epochs += 1
        run.finish()
        train_s = time.perf_counter() - clock
        for s in students.values():
            s.eval()
        self.history_ = run.history
        clock = time.perf_counter()
        out = self._normalise_scores(nets, train, val)
        self.timing_ = {"teacher_statistics_s": prep, "epochs": epochs, "s_per_epoch": train_s / max(1, epochs),
                        "score_statistics_s": time.perf_counter() - clock}
        return out

    @torch.no_grad()
    def _normalise_scores(self, nets, train, val) -> Validation | None:
        """e_μ, e_σ, v_μ, v_σ per scale over all pixels of the validation images (the
        training images when there are none; recorded in ``normalisation_``), and the
        validation images' scores and maps with them (so fit scores them once)."""
        images = val if len(val) else train
        self.normalisation_ = (f"{len(val)} validation images" if len(val) else
                               f"{len(train)} training images (no validation images were held out)")
        self.stats_ = np.ones((len(self.patch_sizes), 4), np.float32)
        module = self._module(nets).to(self.device).eval()
        ev = [[], []]
        for start in range(0, len(images), self.batch_size):
            x = self.to_input(images[start : start + self.batch_size])
            per = [module.scale(level, x) for level in range(len(self.patch_sizes))]
            ev[0].append(torch.stack([e for e, _ in per], 1).cpu())  # [B, L, S, S]
            ev[1].append(torch.stack([v for _, v in per], 1).cpu())
        e, v = torch.cat(ev[0]).double(), torch.cat(ev[1]).double()
        stats = []
        for level in range(len(self.patch_sizes)):
            a, b = e[:, level], v[:, level]
            stats.append([a.mean(), a.std(unbiased=False).clamp_min(1e-12), b.mean(), b.std(unbiased=False).clamp_min(1e-12)])
        self.stats_ = np.array([[float(x) for x in row] for row in stats], np.float32)
        if not len(val):
            return None
        st = torch.as_tensor(self.stats_, dtype=torch.float64)
        maps = ((e - st[:, 0].view(1, -1, 1, 1)) / st[:, 1].view(1, -1, 1, 1)
                + (v - st[:, 2].view(1, -1, 1, 1)) / st[:, 3].view(1, -1, 1, 1)).mean(1).float()
        return Validation(maps.flatten(1).amax(1).numpy(), maps.numpy())

    def _buffers(self):
        return {"t_mean": self.t_mean_, "t_std": self.t_std_, "stats": self.stats_,
                "normalisation": self.normalisation_, "history": getattr(self, "history_", []),
                "timing": getattr(self, "timing_", {}), "teacher_records": getattr(self, "teacher_records_", [])}

    def _load_buffers(self, state):
        self.t_mean_, self.t_std_, self.stats_ = (np.asarray(state[k], np.float32) for k in ("t_mean", "t_std", "stats"))
        self.normalisation_ = state["normalisation"]
        self.history_ = state.get("history", [])
        self.timing_ = state.get("timing", {})
        self.teacher_records_ = state.get("teacher_records", [])


# -- teacher distillation ------------------------------------------------------------------------------------
TEACHER_KIND = "uninformed_students_teacher"


def compactness_loss(desc: torch.Tensor) -> torch.Tensor:
    """Σ_{i≠j} c_ij, c the correlation matrix of the descriptor dimensions over the
    minibatch (paper eq. 3): desc [B, d]."""
    z = desc - desc.mean(0, keepdim=True)
    z = z / z.std(0, keepdim=True).clamp_min(1e-8)
    corr = z.T @ z / (desc.shape[0] - 1)
    return corr.sum() - corr.diagonal().sum()


def distillation_loss(decoded: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖D(T̂(p)) − φ(p)‖², averaged over the minibatch (paper eq. 1)."""
    return (decoded - target).square().sum(1).mean()


def triplet_loss(anchor, positive, negative, margin: float) -> torch.Tensor:
    """max(0, δ + δ⁺ − δ⁻), δ⁺ = ‖T̂(p) − T̂(p⁺)‖², δ⁻ = min(‖T̂(p) − T̂(p⁻)‖², ‖T̂(p⁺) − T̂(p⁻)‖²)
    (paper eq. 2), averaged over the minibatch."""
    d_pos = (anchor - positive).square().sum(1)
    d_neg = torch.minimum((anchor - negative).square().sum(1), (positive - negative).square().sum(1))
    return F.relu(margin + d_pos - d_neg).mean()


class _Patches:
    """Random patches of natural images: torchvision's RandomResizedCrop(p) (area
    0.08-1 of the image, aspect 3/4-4/3, bilinear with antialiasing), as the
    LuyaooChen reimplementation samples ImageNet; images decoded once with the
    shorter side resized to ``short`` px. Batch b depends only on (seed, b)."""

    def __init__(self, files, patch: int, seed: int, short: int = 256):
        from PIL import Image

        self.patch, self.seed = patch, seed
        self.images = []
        for f in files:
            with Image.open(f) as im:
                im = im.convert("RGB")
                scale = short / min(im.size)
                if scale < 1:
                    im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))),
                                   Image.Resampling.BILINEAR)
                self.images.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))

    def batch(self, b: int, size: int) -> torch.Tensor:
        """uint8 [size, 3, p, p]."""
        rng = np.random.default_rng([self.seed, b])
        out = []
        for k in rng.integers(0, len(self.images), size):
            img = self.images[k]
            h, w = img.shape[1:]
            for _ in range(10):  # torchvision RandomResizedCrop.get_params
                area = h * w * rng.uniform(0.08, 1.0)
                ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
                cw, ch = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
                if 0 < cw <= w and 0 < ch <= h:
                    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
                    break
            else:
                ch = cw = min(h, w)
                y0, x0 = (h - ch) // 2, (w - cw) // 2
            crop = img[:, y0 : y0 + ch, x0 : x0 + cw][None].float()
            out.append(F.interpolate(crop, size=(self.patch, self.patch), mode="bilinear", align_corners=False,
                                     antialias=True).round().clamp(0, 255)[0])
        return torch.stack(out).to(torch.uint8)


def distill_patch_teacher(images, output, *, patch_size: int = 33, backbone: str = "resnet18", weights="imagenet",
                          layer: str = "layer4", width: int = 128, dim: int = 128, steps: int = 40_000,
                          batch_size: int = 64, lr: float = 2e-4, weight_decay: float = 1e-5, lambda_k: float = 1.0,
                          lambda_c: float = 1.0, lambda_m: float = 0.0, margin: float = 1.0, noise: float = 0.1,
                          seed: int = 0, device: str = "cpu", checkpoint=None) -> dict:
    """Distil an Uninformed Students patch teacher T̂ (module docstring, item 1) and write
    it to ``output`` (a pyad model file; ``UninformedStudents(teachers=(...))`` reads it).

    images: a folder of natural images (recursively) or a list of paths (the paper:
        ImageNet). backbone / weights / layer: φ, globally average-pooled (the paper:
        ImageNet ResNet-18, layer4 -> 512). steps × batch_size patches: 40,000 × 64 is
        LuyaooChen's two ImageNet epochs. Adam lr 2e-4, weight decay 1e-5 (LuyaooChen).
    lambda_k / lambda_c / lambda_m: loss weights of distillation, compactness and the
        triplet loss (off by default); margin: δ; noise: the positive patch's Gaussian
        noise (std, normalised units) next to a brightness factor U(0.8, 1.2).
    Returns a record (also stored in the file): steps, seconds, final losses."""
    from .. import modelfile
    from ..backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone
    from ..images import list_images

    if patch_size not in ARCHITECTURES:
        raise ValueError(f"patch_size: expected one of {sorted(ARCHITECTURES)}, got {patch_size!r}")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("width", width), ("dim", dim)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    if batch_size < 2 and lambda_c:
        raise ValueError("batch_size: the compactness loss needs at least 2 patches per step")
    files = list_images(images, "images") if not isinstance(images, (list, tuple)) else [Path(f) for f in images]
    if not files:
        raise ValueError("images: no image files")
    started = time.perf_counter()
    with training.seeded(seed, device):
        phi = Backbone(backbone, (layer,), weights).frozen().to(device)
        net = PatchNet(patch_size, width, dim).to(device)
        with torch.no_grad():
            out_dim = phi(torch.zeros(1, 3, patch_size, patch_size, device=device))[layer].shape[1]
        decoder = nn.Linear(dim, out_dim).to(device)
        opt = training.optimizer("adam", list(net.parameters()) + list(decoder.parameters()), lr,
                                 weight_decay=weight_decay)
        settings = dict(patch_size=patch_size, backbone=backbone, weights=str(weights), layer=layer, width=width,
                        dim=dim, batch_size=batch_size, lr=lr, weight_decay=weight_decay, lambda_k=lambda_k,
                        lambda_c=lambda_c, lambda_m=lambda_m, margin=margin, noise=noise, seed=seed,
                        files=len(files))
        run = training.Run("uninformed-students-teacher", modules={"teacher": net, "decoder": decoder},
                           optimizers={"adam": opt}, max_steps=steps, checkpoint=checkpoint, device=device,
                           settings=settings)
        patches = _Patches(files, patch_size, seed)
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        last = {}
        for step in run.steps():
            x = (patches.batch(step, batch_size).to(device).float() / 255 - mean) / std
            with torch.no_grad():
                target = phi(x)[layer].float().mean((2, 3))
            desc = net.patch(x)
            terms = {"distillation": distillation_loss(decoder(desc), target)}
            if lambda_c:
                terms["compactness"] = compactness_loss(desc)
            if lambda_m:
                gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + step)
                bright = (torch.rand(len(x), 1, 1, 1, generator=gen) * 0.4 + 0.8).to(device)
                positive = (x * std + mean) * bright
                positive = (positive - mean) / std + noise * torch.randn(x.shape, generator=gen).to(device)
                terms["triplet"] = triplet_loss(desc, net.patch(positive), desc.roll(1, 0), margin)
            loss = (lambda_k * terms["distillation"] + lambda_c * terms.get("compactness", 0.0)
                    + lambda_m * terms.get("triplet", 0.0))
            run.backward(loss)
            run.log(loss=loss, **terms)
            last = {k: float(v.detach()) for k, v in terms.items()}
    record = {"kind": TEACHER_KIND, **settings, "out_dim": out_dim, "weights_id": phi.weights_id,
              "steps": run.step, "seconds": time.perf_counter() - started, "final_loss": last}
    modelfile.write_tree(output, record, {"teacher": net.state_dict(), "decoder": decoder.state_dict()})
    return record


def load_patch_teacher(path) -> tuple[PatchNet, dict]:
    """(T̂, its record) from a file written by ``distill_patch_teacher``."""
    from .. import modelfile

    meta, state = modelfile.read_tree(path)
    if meta.get("kind") != TEACHER_KIND:
        raise ValueError(f"teachers: {path} is not an Uninformed Students patch teacher (kind {meta.get('kind')!r})")
    net = PatchNet(meta["patch_size"], meta["width"], meta["dim"])
    net.load_state_dict(state["teacher"])
    return net.eval(), meta
