"""EfficientAD-AST (the thesis hybrid, Dominic-dul/anomalib_old ``EfficientAD-main/``):
shapes and the student's channel split, each loss and the map against the formulas,
the feature autoencoder's architecture, one shared backbone pass equal to the
thesis's three, backbones in eval mode while training, early stopping on
validation images only, the test-set protocol only on request, penalty images,
save/load and resuming. Tiny random networks."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import pyad
from pyad import training
from pyad.detectors import efficientad_ast as H
from pyad.detectors.ast import FlowTeacher, Student, positional_encoding_2d
from conftest import defect_images

TINY = dict(backbone="resnet18", weights=None, layers=("layer2",), image_size=32, batch_size=4, teacher_hidden=8,
            student_hidden=8, student_blocks=1, pos_enc_dim=4, ae_width=4, teacher_epochs=1, max_epochs=2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images():
    return defect_images(5, 32, 14, 4, (8, 20))


@pytest.fixture(scope="module")
def fitted(images):
    return pyad.EfficientADAST(**TINY).fit(images[0])


# -- formulas ---------------------------------------------------------------------------------------------
def test_losses_and_map_from_the_formulas():
    g = torch.Generator().manual_seed(0)
    c = 5
    z = torch.randn(2, c, 3, 4, generator=g)
    s = torch.randn(2, 2 * c, 3, 4, generator=g)
    a = torch.rand(2, c, 3, 4, generator=g)
    sp = torch.randn(2, 2 * c, 3, 4, generator=g)
    zn, sn, an, spn = (t.double().numpy() for t in (z, s, a, sp))
    want = {"st": ((zn - sn[:, :c]) ** 2).sum() / zn.size,  # efficientad.py l.202-203
            "penalty": (spn[:, :c] ** 2).sum() / zn.size,  # l.206-208
            "ae": ((zn - an) ** 2).sum() / zn.size,  # l.214, 216
            "stae": ((an - sn[:, c:]) ** 2).sum() / zn.size}  # l.215, 217
    got = H.hybrid_losses(z, s, a, sp)
    for k, v in want.items():
        assert got[k].item() == pytest.approx(v, rel=1e-5), k
    assert got["total"].item() == pytest.approx(sum(want.values()), rel=1e-5)  # l.209, 218: equal weights
    assert H.hybrid_losses(z, s, a)["penalty"].item() == 0.0
    # map: 0.5 mean_c (T - S[:C])^2 + 0.5 mean_c (A - S[C:])^2 (l.389-393)
    m = H.hybrid_map(z, s, a).double().numpy()
    want_map = 0.5 * ((zn - sn[:, :c]) ** 2).mean(1) + 0.5 * ((an - sn[:, c:]) ** 2).mean(1)
    np.testing.assert_allclose(m, want_map, rtol=1e-5)
    # the split: the first C channels only meet the teacher, the last C only the autoencoder
    s2 = s.clone()
    s2[:, c:] += 1.0
    assert H.hybrid_losses(z, s2, a)["st"].item() == got["st"].item()
    assert H.hybrid_losses(z, s2, a)["stae"].item() != got["stae"].item()


def test_gradients_of_stae_reach_the_autoencoder():
    z = torch.randn(1, 2, 2, 2)
    s = torch.randn(1, 4, 2, 2, requires_grad=True)
    a = torch.rand(1, 2, 2, 2, requires_grad=True)
    H.hybrid_losses(z, s, a)["stae"].backward()
    assert a.grad is not None and a.grad.abs().sum() > 0  # not detached, as in the thesis


def test_grey_is_rgb_to_grayscale_on_the_normalised_tensor():
    # torchvision's RandomGrayscale after Normalize (efficientad.py l.41-45): rgb_to_grayscale
    # on the normalised tensor, 0.2989 R + 0.587 G + 0.114 B, repeated on 3 channels
    x = torch.randn(2, 3, 5, 5)
    g = H.to_grey(x)
    want = 0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for ch in range(3):
        torch.testing.assert_close(g[:, ch], want)


# -- the feature autoencoder ------------------------------------------------------------------------------
def test_autoencoder_architecture_of_the_thesis():
    ae = H.feature_autoencoder(336, 304, (24, 24))  # utils.py l.760-798 at the thesis's sizes
    convs = [m for m in ae if isinstance(m, nn.Conv2d)]
    assert len(convs) == 12
    assert [(m.in_channels, m.out_channels) for m in convs] == [
        (336, 32), (32, 32), (32, 64), (64, 64), (64, 64), (64, 64),
        (64, 64), (64, 64), (64, 64), (64, 64), (64, 64), (64, 304)]
    assert all(m.kernel_size == (3, 3) and m.stride == (1, 1) and m.padding == (1, 1) for m in convs)
    ups = [m for m in ae if isinstance(m, nn.Upsample)]
    assert len(ups) == 3 and all(u.mode == "nearest" and u.scale_factor == 2 for u in ups)
    assert sum(isinstance(m, nn.Dropout) and m.p == 0.2 for m in ae) == 6
    # the last convolution is followed by ReLU and Dropout, then the pooling back to 24x24
    kinds = [type(m) for m in ae][-4:]
    assert kinds == [nn.Conv2d, nn.ReLU, nn.Dropout, nn.AdaptiveAvgPool2d] and ae[-1].output_size == (24, 24)
    assert sum(p.numel() for p in ae.parameters()) == sum(
        3 * 3 * i * o + o for i, o in [(m.in_channels, m.out_channels) for m in convs])


def test_autoencoder_sizes_non_negative_output_and_dropout():
    torch.manual_seed(0)
    ae = H.feature_autoencoder(12, 6, (3, 4), dropout=0.2, width=8)
    x = torch.randn(2, 12, 3, 4)
    inner = ae[:-1](x)  # before the pooling: three x2 upsamplings
    assert inner.shape == (2, 6, 24, 32)
    ae.eval()
    y = ae(x)
    assert y.shape == (2, 6, 3, 4) and (y >= 0).all()  # ReLU output: z_T can be negative, A cannot
    torch.testing.assert_close(ae(x), y)  # eval: no dropout
    torch.testing.assert_close(y, nn.functional.avg_pool2d(ae[:-1](x), 8))  # the pooling is exact 8x8 means
    ae.train()
    assert not torch.equal(ae(x), ae(x))  # train: dropout active


# -- networks, module, one backbone pass -------------------------------------------------------------------
def test_network_shapes_and_channel_split(fitted):
    det = fitted
    c, h, w = det._feature_shape()
    assert (c, h, w) == (128, 4, 4)
    nets = det.networks_
    feat = torch.randn(3, c, h, w)
    pe = det._pe().expand(3, -1, -1, -1)
    z, logdet = nets["teacher"](feat, pe)
    inp = torch.cat([pe, feat], 1)
    assert z.shape == (3, c, h, w) and logdet.shape == (3, h, w)
    assert nets["student"](inp).shape == (3, 2 * c, h, w)  # 2 x C: teacher half, autoencoder half
    assert nets["ae"](inp).shape == (3, c, h, w)
    assert isinstance(nets["teacher"], FlowTeacher) and isinstance(nets["student"], Student)
    assert nets["teacher"].couplings[0].clamp == 3.0
    module = det.inference_module()
    scores, maps = module(det.to_input(torch.from_numpy(np.zeros((2, 32, 32, 3), np.uint8))))
    assert scores.shape == (2,) and maps.shape == (2, 32, 32)
    torch.testing.assert_close(scores, maps.flatten(1).amax(1))  # image score = map maximum (l.334)


class ThesisModel(nn.Module):
    """``StudentTeacherModel`` (utils.py l.800-832): each network owns its backbone copy
    and runs it on every call."""

    def __init__(self, backbone, layer, net, kind, pe):
        super().__init__()
        self.feature_extractor, self.layer, self.net, self.kind = copy.deepcopy(backbone), layer, net, kind
        self.pos_enc = pe

    def forward(self, x):
        with torch.no_grad():
            inp = self.feature_extractor(x)[self.layer].float()
        cond = self.pos_enc.tile(inp.shape[0], 1, 1, 1)
        if self.kind == "ae":
            return self.net(torch.cat([cond, inp], 1))
        if self.kind == "teacher":
            return self.net(inp, cond)[0]
        return self.net(torch.cat([cond, inp], 1))


def test_one_shared_backbone_pass_equals_three_and_costs_a_third(fitted, images, monkeypatch):
    det = fitted
    module = det.inference_module()
    x = det.to_input(torch.from_numpy(images[1]))
    backbone = det._network()
    pe = det._pe()
    t, s, a = (ThesisModel(backbone, det.layers[0], det.networks_[k], k, pe).eval()
               for k in ("teacher", "student", "ae"))
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in (backbone, t.feature_extractor,
                                                                            s.feature_extractor, a.feature_extractor)]
    with torch.no_grad():
        scores, maps = module(x)
        n_shared = len(calls)
        low = H.hybrid_map(t(x), s(x), a(x))  # efficientad.py predict(), l.377-394
        n_thesis = len(calls) - n_shared
    for hk in hooks:
        hk.remove()
    want = nn.functional.interpolate(low[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(maps, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores, want.flatten(1).amax(1), rtol=1e-5, atol=1e-6)
    assert (n_shared, n_thesis) == (1, 3)  # a third of the backbone calls


def test_features_are_extracted_once_per_fit_with_every_backbone_in_eval_mode(images, monkeypatch):
    from pyad import backbones

    calls, modes = [], []
    real = backbones.Backbone.forward

    def counting(self, x):
        if x.device.type != "meta":
            calls.append(len(x))
            modes.append(self.training)
        return real(self, x)

    monkeypatch.setattr(backbones.Backbone, "forward", counting)
    counts = []
    for epochs in (1, 3):
        calls.clear()
        det = pyad.EfficientADAST(**{**TINY, "max_epochs": epochs, "early_stopping_patience": None}).fit(images[0])
        counts.append(sum(calls))
    # 13 training + 1 validation image once per fit, + the validation image scored for the
    # thresholds: independent of the epochs (the thesis: 3 B5 passes per image per step)
    assert counts == [15, 15]
    assert modes and not any(modes)  # every backbone call in eval mode
    assert not det._network().training


def test_early_stopping_reads_only_validation_images(images, monkeypatch):
    train, test = images
    val = train[10:]
    seen = []
    real = H.EfficientADAST.extract

    def spying(self, u8):
        seen.append(u8.numpy().copy())
        return real(self, u8)

    monkeypatch.setattr(H.EfficientADAST, "extract", spying)
    for monitor in ("loss", "synthetic"):
        seen.clear()
        det = pyad.EfficientADAST(**{**TINY, "max_epochs": 4, "early_stopping_patience": 2, "monitor": monitor})
        det.fit(train[:10], validation=val)
        allowed = [a for a in train]
        for batch in seen:
            for img in batch:
                if monitor == "synthetic" and not any(np.array_equal(img, a) for a in allowed):
                    # a synthetic defect on a validation image: equal outside the defect
                    assert any((img != v).any(-1).mean() < 0.25 for v in val)
                else:
                    assert any(np.array_equal(img, a) for a in allowed)
                assert not any(np.array_equal(img, t) for t in test)
        vals = [r["validation"] for r in det.history_ if "validation" in r]
        assert 1 <= len(vals) <= 4 and det.best_epoch_ == int(np.argmin(vals)) + 1
        assert det.selection_.startswith("validation") and "TEST" not in det.selection_


def test_restored_weights_are_the_best_validation_epoch(images):
    train = images[0]
    det = pyad.EfficientADAST(**{**TINY, "max_epochs": 4, "early_stopping_patience": 2}).fit(train[:10],
                                                                                           validation=train[10:])
    pe = det._pe()
    vf = det.extract(torch.from_numpy(train[10:]))
    nets = {k: copy.deepcopy(v) for k, v in det.networks_.items()}
    value = det._val_value(nets, pe, vf, det._teacher_outputs(nets["teacher"], vf, pe), None)
    vals = [r["validation"] for r in det.history_ if "validation" in r]
    assert value == pytest.approx(min(vals), rel=1e-5)


def test_test_set_selection_only_on_request(images):
    train, test = images
    with pytest.raises(ValueError, match="select_on_test"):
        pyad.EfficientADAST(**{**TINY, "selection": "test"}).fit(train)
    labels = [0, 0, 1, 1]
    masks = [None, None] + [np.pad(np.ones((12, 12), bool), ((8, 12), (8, 12)))] * 2
    det = pyad.EfficientADAST(**{**TINY, "selection": "test", "max_epochs": 3})
    det.select_on_test(test, labels, masks).fit(train)
    assert det.selection_.startswith("TEST-SET selection")
    rows = [r for r in det.history_ if "test_image_auroc" in r]
    assert len(rows) == 3 and all(0 <= r["test_pixel_auroc"] <= 1 for r in rows)
    assert not hasattr(det, "_test_selection")  # not kept with the model
    with pytest.raises(ValueError, match="labels"):
        det.select_on_test(test, [0, 1])


def test_penalty_images_give_a_penalty_loss(images, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    det = pyad.EfficientADAST(**{**TINY, "penalty_images": str(tmp_path)}).fit(images[0])
    student_rows = [r for r in det.history_ if "st" in r]
    assert student_rows and all(r["penalty"] > 0 for r in student_rows)
    assert det.penalty_source_.startswith("5 of 5 images")
    assert "penalty" not in pyad.EfficientADAST(**TINY).fit(images[0]).history_[-1]
    with pytest.raises(ValueError, match="penalty_images"):
        pyad.EfficientADAST(**{**TINY, "penalty_images": str(tmp_path / "missing")}).fit(images[0])


def test_save_load_round_trip(fitted, images, tmp_path):
    path = tmp_path / "m.pyad"
    fitted.save(path)
    back = pyad.load(path)
    a, b = fitted.predict(images[1]), back.predict(images[1])
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.maps, b.maps)
    assert back.selection_ == fitted.selection_ and back.history_ == fitted.history_


def test_resume_continues_to_the_same_state(images, tmp_path, monkeypatch):
    train = images[0]
    want = pyad.EfficientADAST(**TINY).fit(train)
    real = training.Run.save_checkpoint
    for stop_after in (1, 2):  # after the teacher phase, in the student phase
        path = tmp_path / f"ck{stop_after}.pyad"

        def interrupting(self):
            real(self)
            if self.epoch == stop_after:
                raise KeyboardInterrupt

        monkeypatch.setattr(training.Run, "save_checkpoint", interrupting)
        with pytest.raises(KeyboardInterrupt):
            pyad.EfficientADAST(**TINY).fit(train, checkpoint=path)
        monkeypatch.setattr(training.Run, "save_checkpoint", real)
        got = pyad.EfficientADAST(**TINY).fit(train, checkpoint=path)
        for name in ("teacher", "student", "ae"):
            for (k, a), b in zip(want.networks_[name].state_dict().items(), got.networks_[name].state_dict().values()):
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name}.{k} after resuming at {stop_after}")


def test_bad_parameters_name_the_argument(images):
    for kw, name in [({"teacher_epochs": -1}, "teacher_epochs"), ({"monitor": "auroc"}, "monitor"),
                     ({"selection": "best"}, "selection"), ({"ae_dropout": 1.0}, "ae_dropout"),
                     ({"kernels": (3, 3)}, "kernels"), ({"layers": ("layer1", "layer2")}, "layers")]:
        with pytest.raises(ValueError, match=name):
            pyad.EfficientADAST(**{**TINY, **kw}).fit(images[0])


def test_defaults_are_the_thesis_settings():
    d = pyad.EfficientADAST()
    assert (d.backbone, d.layers, d.preprocessing.size) == ("efficientnet_b5", ("blocks.35",), 768)
    assert (d.teacher_hidden, d.clamp, d.kernels, d.pos_enc_dim, d.teacher_epochs) == (1024, 3.0, (3, 3, 3, 5), 32, 240)
    assert (d.student_hidden, d.student_blocks, d.ae_width, d.ae_dropout) == (1024, 4, 64, 0.2)
    assert (d.lr, d.batch_size, d.max_epochs, d.early_stopping_patience) == (2e-4, 8, 100, 10)
    assert (d.weight_decay, d.adam_eps, d.selection) == (1e-5, 1e-8, "validation")
    pe = positional_encoding_2d(32, 24, 24)
    assert pe.shape == (1, 32, 24, 24)
