"""AST (Rudolph et al., WACV 2023): the normalising-flow teacher (exact inverse,
log-determinant against autograd's Jacobian, soft clamp, γ = 0 start, the official
permutations), the positional encoding, the losses from their formulas, the
inference module, pre-extraction once per fit, and resuming an interrupted fit."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pyad
from pyad import training
from pyad.detectors import ast as A
from conftest import defect_images

TINY = dict(backbone="resnet18", weights=None, layers=("layer2",), image_size=64, batch_size=4, teacher_hidden=8,
            student_hidden=8, student_blocks=1, pos_enc_dim=8, max_epochs=2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images():
    return defect_images(3, 64, 14, 4, (16, 40))


def _random_gammas(flow, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in flow.modules():
            if isinstance(m, A.SubNet):
                m.gamma.copy_(torch.randn(1, generator=g) * 0.5 + 1.0)
    return flow.requires_grad_(False)


def test_positional_encoding_matches_the_formula():
    d, h, w = 8, 3, 5
    pe = A.positional_encoding_2d(d, h, w)[0]
    half = d // 2
    for i in range(half // 2):
        freq = math.exp(-2 * i * math.log(1e4) / half)
        for y in range(h):
            for x in range(w):
                assert pe[2 * i, y, x] == pytest.approx(math.sin(x * freq), abs=1e-6)
                assert pe[2 * i + 1, y, x] == pytest.approx(math.cos(x * freq), abs=1e-6)
                assert pe[half + 2 * i, y, x] == pytest.approx(math.sin(y * freq), abs=1e-6)
                assert pe[half + 2 * i + 1, y, x] == pytest.approx(math.cos(y * freq), abs=1e-6)
    with pytest.raises(ValueError, match="pos_enc_dim"):
        A.positional_encoding_2d(6, 2, 2)


def test_permutations_are_the_official_ones():
    flow = A.FlowTeacher(10, 4, 8, 1.9, (3, 3, 3, 5))
    for k in range(4):
        np.random.seed(k)  # freia_funcs.py permute_layer
        want = np.random.permutation(10)
        np.testing.assert_array_equal(getattr(flow, f"perm{k}").numpy(), want)
        np.testing.assert_array_equal(getattr(flow, f"perm{k}")[getattr(flow, f"inv{k}")].numpy(), np.arange(10))


def test_gamma_zero_start_is_a_permutation_with_zero_log_determinant():
    torch.manual_seed(0)
    flow = A.FlowTeacher(6, 4, 8, 3.0, (3, 3, 3, 5)).requires_grad_(False)
    x, cond = torch.randn(2, 6, 4, 5), torch.randn(2, 4, 4, 5)
    z, logdet = flow(x, cond)
    perm = torch.arange(6)
    for k in range(4):
        perm = perm[getattr(flow, f"perm{k}")]
    torch.testing.assert_close(z, x[:, perm])
    assert torch.equal(logdet, torch.zeros(2, 4, 5))
    assert all(m.gamma.item() == 0.0 for m in flow.modules() if isinstance(m, A.SubNet))


def test_flow_is_exactly_invertible():
    torch.manual_seed(1)
    flow = _random_gammas(A.FlowTeacher(7, 4, 16, 1.9, (3, 3, 3, 5))).double()  # odd channels: 3/4 split
    x, cond = torch.randn(3, 7, 5, 6, dtype=torch.float64), torch.randn(3, 4, 5, 6, dtype=torch.float64)
    z, _ = flow(x, cond)
    assert (z - x).abs().max() > 0.1  # not the identity
    torch.testing.assert_close(flow.inverse(z, cond), x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("clamp", [1.9, 3.0, 0.0])
def test_log_determinant_equals_autograd_jacobian(clamp):
    """The per-position log-determinants sum to log|det J| of the whole map (the
    subnets' convolutions mix positions, but the coupling is block-triangular)."""
    torch.manual_seed(2)
    flow = _random_gammas(A.FlowTeacher(4, 2, 8, clamp, (3, 3, 3, 5)), seed=3).double()
    x, cond = torch.randn(1, 4, 3, 3, dtype=torch.float64), torch.randn(1, 2, 3, 3, dtype=torch.float64)
    z, logdet = flow(x, cond)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v.view_as(x), cond)[0].flatten(), x.flatten(),
                                         vectorize=True)
    sign, logabs = torch.linalg.slogdet(jac)
    assert sign != 0
    assert float(logdet.sum()) == pytest.approx(float(logabs), abs=1e-9)
    assert abs(float(logabs)) > 0.1  # a non-trivial volume change


def test_soft_clamp_formula_and_bound():
    c = A.AffineCoupling(4, 0, 4, 3, clamp=1.9)
    s = torch.linspace(-100, 100, 101)
    torch.testing.assert_close(c.log_e(s), 1.9 * 0.636 * torch.atan(s / 1.9))
    assert c.log_e(s).abs().max() <= 1.9 * 0.636 * math.pi / 2
    assert torch.equal(A.AffineCoupling(4, 0, 4, 3, clamp=0).log_e(s), s)


def test_subnet_replicate_padding_and_kernels():
    flow = A.FlowTeacher(6, 4, 8, 3.0, (3, 3, 3, 5))
    for coupling, k in zip(flow.couplings, (3, 3, 3, 5)):
        for sub in (coupling.s1, coupling.s2):
            assert sub.conv1.kernel_size == (k, k) and sub.conv1.padding_mode == "replicate"
            assert sub.conv2.padding == (k // 2, k // 2) and sub.conv2.padding_mode == "replicate"
    c = flow.couplings[0]
    assert (c.s2.conv1.in_channels, c.s2.conv2.out_channels) == (3 + 4, 3 * 2)  # [x2, cond] -> [s2, t2] for x1


def test_losses_and_map_from_the_formulas():
    g = torch.Generator().manual_seed(4)
    z, logdet = torch.randn(3, 5, 4, 4, generator=g), torch.randn(3, 4, 4, generator=g)
    want = np.mean([[[0.5 * float((z[b, :, i, j] ** 2).sum()) - float(logdet[b, i, j]) for j in range(4)]
                     for i in range(4)] for b in range(3)])
    assert float(A.nf_loss(z, logdet)) == pytest.approx(want, rel=1e-5)
    zs = torch.randn(3, 5, 4, 4, generator=g)
    assert float(A.st_loss(z, zs)) == pytest.approx(float(((z - zs) ** 2).sum()) / z.numel(), rel=1e-5)
    m = A.anomaly_map(z, zs)
    assert m.shape == (3, 4, 4)
    assert float(m[1, 2, 3]) == pytest.approx(float(((z[1, :, 2, 3] - zs[1, :, 2, 3]) ** 2).mean()), rel=1e-6)


def test_student_shapes_and_official_layout():
    s = A.Student(8 + 6, 6, hidden=16, n_blocks=4)
    assert s(torch.randn(2, 14, 5, 7)).shape == (2, 6, 5, 7)
    assert len(s.res) == 4 and s.conv1.kernel_size == (3, 3) and s.conv2.out_channels == 6
    assert isinstance(s.res[0].bn1, torch.nn.BatchNorm2d)


def test_fit_predict_module_and_scores(images):
    train, test = images
    d = pyad.AST(**TINY).fit(train)
    c, h, w = d._feature_shape()
    assert (c, h, w) == (128, 8, 8)
    assert d.networks_["teacher"].couplings[0].s1.conv1.out_channels == 8
    module = d.inference_module()
    x = d.preprocessing.to_tensor(list(test))
    with torch.no_grad():
        scores, maps = module(x)
        feat = module.backbone(x)["layer2"]
        pe = A.positional_encoding_2d(8, h, w).expand(len(x), -1, -1, -1)
        z_t, _ = d.networks_["teacher"](feat, pe)
        z_s = d.networks_["student"](torch.cat([pe, feat], 1))
        low = ((z_t - z_s) ** 2).mean(1)
    assert maps.shape == (4, 64, 64)
    up8 = F.interpolate(low[:, None], scale_factor=8, mode="bicubic", align_corners=False)
    torch.testing.assert_close(scores, up8.flatten(1).amax(1))
    torch.testing.assert_close(maps, F.interpolate(low[:, None], size=(64, 64), mode="bicubic",
                                                   align_corners=False)[:, 0])
    assert scores[2:].min() > scores[:2].max()  # the bright square
    mean = pyad.clone(d, score="mean").fit(train).inference_module()
    with torch.no_grad():
        torch.testing.assert_close(mean(x)[0], low.flatten(1).mean(1), rtol=1e-4, atol=1e-6)
    rows = d.history_
    assert [("nll" in r, "st" in r) for r in rows] == [(True, False)] * 2 + [(False, True)] * 2
    assert all("val_nll" in r for r in rows[:2]) and all("val_st" in r for r in rows[2:])


def test_features_are_extracted_once_per_fit(images, monkeypatch):
    from pyad import backbones

    calls = []
    real = backbones.Backbone.forward

    def counting(self, x):
        if x.device.type != "meta":  # the shape dry runs compute nothing
            calls.append(len(x))
        return real(self, x)

    monkeypatch.setattr(backbones.Backbone, "forward", counting)
    counts = []
    for epochs in (1, 3):
        calls.clear()
        pyad.AST(**{**TINY, "max_epochs": epochs}).fit(images[0])
        counts.append(sum(calls))
    # 13 training + 1 validation image through the backbone once, plus the validation image
    # scored once more for the thresholds; independent of the number of epochs
    assert counts == [15, 15]


def test_teacher_epochs_and_step_budget(images):
    d = pyad.AST(**{**TINY, "teacher_epochs": 1, "max_epochs": 2}).fit(images[0])
    assert [("nll" in r) for r in d.history_] == [True, False, False]
    d = pyad.AST(**{**TINY, "max_steps": 2, "max_epochs": 2}).fit(images[0])
    assert [r["step"] for r in d.history_] == [2, 2, 4, 4]  # 3 batches per epoch, 2 steps per network


def test_resume_continues_to_the_same_state(images, tmp_path, monkeypatch):
    train = images[0]
    want = pyad.AST(**TINY).fit(train)
    real = training.Run.save_checkpoint
    for stop_after in (1, 3):  # in the teacher phase, in the student phase
        path = tmp_path / f"ck{stop_after}.pyad"
        saves = []

        def interrupting(self):
            real(self)
            saves.append(self.epoch)
            if self.epoch == stop_after:
                raise KeyboardInterrupt

        monkeypatch.setattr(training.Run, "save_checkpoint", interrupting)
        with pytest.raises(KeyboardInterrupt):
            pyad.AST(**TINY).fit(train, checkpoint=path)
        monkeypatch.setattr(training.Run, "save_checkpoint", real)
        got = pyad.AST(**TINY).fit(train, checkpoint=path)
        for name in ("teacher", "student"):
            for (k, a), b in zip(want.networks_[name].state_dict().items(), got.networks_[name].state_dict().values()):
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name}.{k} after resuming at {stop_after}")


def test_bad_parameters_name_the_argument(images):
    for kw, name in ((dict(kernels=(3, 3, 3)), "kernels"), (dict(kernels=(3, 3, 3, 4)), "kernels"),
                     (dict(clamp=-1), "clamp"), (dict(pos_enc_dim=6), "pos_enc_dim"), (dict(score="top"), "score"),
                     (dict(layers=("layer2", "layer3")), "layers"), (dict(layers=("features.3",)), "layers"),
                     (dict(early_stopping_patience=3), "early_stopping_patience"),
                     (dict(teacher_hidden=0), "teacher_hidden")):
        with pytest.raises(ValueError, match=name):
            pyad.AST(**{**TINY, **kw}).fit(images[0])


def test_lite_backbones_use_their_normalisation():
    from pyad import efficientnet as E

    d = pyad.AST(backbone="efficientnet_lite0", weights=None, layers=("stage6",))
    assert d._normalisation() == (E.LITE_MEAN, E.LITE_STD)
    assert pyad.AST()._normalisation() == (E.IMAGENET_MEAN, E.IMAGENET_STD)
