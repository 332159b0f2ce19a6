"""AST training epochs and predict latency against the official code path as its
repository runs it without pre-extracted features (bench/ast_reference.py:
marco-rudolph/AST ``model.py`` / ``freia_funcs.py`` / ``train_*.py`` / ``eval.py``), in
the same run, on MVTec AD bottle training images decoded once for both.

- training: pyad extracts the backbone features once per fit and trains the flow
  and the student on them (the teacher's outputs computed once per student phase);
  the reference runs its teacher's backbone on every teacher step, and on every
  student step both the teacher's and the student's backbones (each ``Model`` owns
  one) plus the teacher flow. Seconds per epoch for each phase, pyad's one-off
  extraction, and the projection to 240 + 240 epochs on 209 images.
- predict: pyad's inference module (one backbone pass, BatchNorm folded) vs the
  reference ``eval.py`` path (two backbone passes), batch 1 and 8, with pyad's
  trained weights copied into the reference (fresh backbones: the reference's own
  were in train mode while it trained, which moves their BatchNorm running
  statistics; recorded): equal image scores (asserted).

Configurations: "budget" (the CPU configuration of docs/detectors/ast.md: MobileNetV2
with the ImageNet weights in /work/shared/weights, layer4 = 320 channels, 512 px,
flow hidden 64, student hidden 256) and, with PYAD_BENCH_AST_OFFICIAL=1, "official"
(EfficientNet-B5 blocks.35, 768 px, hidden 1024 / 1024; random backbone weights, the
timing does not depend on them). Images: PYAD_BENCH_AST_IMAGES (16), epochs:
PYAD_BENCH_AST_EPOCHS (1). No speed target is set by the issue: ratios are
reported, correctness is asserted."""

import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pyad
from pyad import training
from pyad.backbones import Backbone
import ast_reference as ref
from conftest import RESULTS, record_predict, save_training_and_predict

HERE = Path(__file__).parent
BOTTLE = HERE.parents[1] / "shared" / "data" / "mvtec_ad" / "bottle"
MOBILENET = HERE.parents[1] / "shared" / "weights" / "mobilenet_v2_imagenet_from_tflite.pth"
N_IMAGES = int(os.environ.get("PYAD_BENCH_AST_IMAGES", 16))
EPOCHS = int(os.environ.get("PYAD_BENCH_AST_EPOCHS", 1))
CONFIGS = {
    "budget": dict(backbone="mobilenet_v2", weights=str(MOBILENET) if MOBILENET.is_file() else None,
                   layers=("layer4",), image_size=512, teacher_hidden=64, student_hidden=256),
}
if os.environ.get("PYAD_BENCH_AST_OFFICIAL"):
    CONFIGS["official"] = dict(backbone="efficientnet_b5", weights=None, layers=("blocks.35",), image_size=768)
pytestmark = pytest.mark.skipif(not BOTTLE.is_dir(), reason="MVTec AD bottle not present")


@pytest.fixture(scope="module")
def images():
    files = sorted((BOTTLE / "train" / "good").glob("*.png"))[:N_IMAGES]
    return [np.asarray(pyad.images.read_image(f)) for f in files]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def trained(request, images):
    """(config name, pyad detector fitted on the images, reference teacher/student
    with its own timing) for one configuration."""
    name = request.param
    det = pyad.AST(**CONFIGS[name], max_epochs=EPOCHS, validation=0, seed=0)
    t0 = time.perf_counter()
    det.fit(images)
    fit_s = time.perf_counter() - t0
    # the reference, from the same initial weights and batch order
    with training.seeded(det.seed):
        init = det._networks()
    plain = Backbone(det.backbone, det.layers, det.weights)
    c, h, w = det._feature_shape()
    cfg = dict(pos_enc_dim=det.pos_enc_dim, teacher_hidden=det.teacher_hidden, clamp=det.clamp, kernels=det.kernels,
               student_hidden=det.student_hidden, student_blocks=det.student_blocks)
    teacher = ref.Model(plain, det.layers[0], c, h, nf=True, cfg=cfg)
    student = ref.Model(plain, det.layers[0], c, h, nf=False, cfg=cfg)
    ref.load_pyad_weights(teacher, init["teacher"])
    ref.load_pyad_weights(student, init["student"])
    x_all = det.preprocessing.to_tensor([det.preprocessing.prepare(a) for a in images])
    batches = training.Batches(len(images), det.batch_size, det.seed, drop_last=True)
    opt_t, opt_s = ref.adam(teacher, det.lr), ref.adam(student, det.lr)
    times = {"teacher": [], "student": []}
    for e in range(EPOCHS):
        loader = [x_all[torch.from_numpy(i)] for i in batches.epoch(e)]
        t0 = time.perf_counter()
        ref.train_teacher_epoch(teacher, opt_t, loader)
        times["teacher"].append(time.perf_counter() - t0)
    for e in range(EPOCHS, 2 * EPOCHS):
        loader = [x_all[torch.from_numpy(i)] for i in batches.epoch(e)]
        t0 = time.perf_counter()
        ref.train_student_epoch(student, teacher, opt_s, loader)
        times["student"].append(time.perf_counter() - t0)
    RESULTS.setdefault("ast_training", {})[name] = {
        "images": len(images), "epochs": EPOCHS, "pyad_fit_s": fit_s, "pyad": det.timing_,
        "reference_teacher_s_per_epoch": float(np.mean(times["teacher"])),
        "reference_student_s_per_epoch": float(np.mean(times["student"])),
    }
    # The reference's backbones ran in train mode (model.train() reaches them): their BatchNorm
    # running statistics moved on the training images. Recorded, then the predict comparison
    # uses fresh backbones (the state eval.py would load from ImageNet weights + saved flows).
    moved = max(float((a - b).abs().max()) for (k, a), b in zip(teacher.feature_extractor.state_dict().items(),
                                                                 plain.state_dict().values()) if "running_mean" in k)
    RESULTS["ast_training"][name]["reference_backbone_bn_running_mean_max_change"] = moved
    teacher = ref.Model(plain, det.layers[0], c, h, nf=True, cfg=cfg)
    student = ref.Model(plain, det.layers[0], c, h, nf=False, cfg=cfg)
    ref.load_pyad_weights(teacher, det.networks_["teacher"])
    ref.load_pyad_weights(student, det.networks_["student"])
    return name, det, teacher, student, x_all


def test_training_epoch(trained):
    name, det, *_ = trained
    r = RESULTS["ast_training"][name]
    t = r["pyad"]
    per_image = len(trained[4]) / 209  # bottle: 209 training images
    pyad_480 = t["extract_s"] / per_image + 240 * (t["teacher_s_per_epoch"] + t["student_s_per_epoch"]) / per_image
    ref_480 = 240 * (r["reference_teacher_s_per_epoch"] + r["reference_student_s_per_epoch"]) / per_image
    r.update(teacher_epoch_speedup=r["reference_teacher_s_per_epoch"] / t["teacher_s_per_epoch"],
             student_epoch_speedup=r["reference_student_s_per_epoch"] / t["student_s_per_epoch"],
             projected_240_240_epochs_bottle_s={"pyad": pyad_480, "reference": ref_480, "speedup": ref_480 / pyad_480})
    print(name, r)
    assert t["teacher_epochs"] == EPOCHS and t["student_epochs"] == EPOCHS


@pytest.mark.parametrize("impl", ["pyad", "reference"])
@pytest.mark.parametrize("batch", [1, 8])
def test_predict(benchmark, trained, batch, impl):
    name, det, teacher, student, x_all = trained
    x = x_all[[i % len(x_all) for i in range(batch)]]
    module = det.inference_module()

    def pyad_call():
        with torch.inference_mode():
            return module(x)

    scores, maps = pyad_call()
    want_scores, want_maps = ref.evaluate(teacher, student, x)
    torch.testing.assert_close(scores, want_scores, rtol=1e-3, atol=1e-5)  # same weights, same scores
    call = pyad_call if impl == "pyad" else (lambda: ref.evaluate(teacher, student, x))
    record_predict(benchmark, "ast_predict", f"{name}/batch {batch}", impl, call, batch,
                   f"AST {name}, predict batch {batch}")


def test_summary():
    rows = save_training_and_predict("ast", "ast_training", "ast_predict", "reference")
    assert all(math.isfinite(v.get("speedup", 1.0)) for v in rows["predict_ms_per_image"].values())
