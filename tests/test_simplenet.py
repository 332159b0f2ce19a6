"""SimpleNet: the official run.sh defaults, the truncated L1 loss and one training
step against their formulas, the folded eval-mode scoring MLP, features extracted
once per fit, last-epoch and synthetic-validation selection, resume, thresholds
from validation images only, and the frozen backbone's weights identity in saved
models. Tiny networks (ResNet-18 random init, 32-d features, 64 px)."""

import numpy as np
import pytest
import torch

import pyad
from pyad import training
from pyad.detectors import simplenet as sn
from conftest import noisy_images

TINY = dict(backbone="resnet18", weights=None, image_size=64, crop_size=None, batch_size=4, embed_dim=32,
            target_dim=32, dsc_hidden=16, max_epochs=3)


@pytest.fixture(scope="module")
def data():
    train, test = noisy_images(7, 64, 12, 3, 80, 170, 12)
    test[2, 16:40, 16:40] = 250
    return train, test


def test_defaults_are_the_official_run_sh():
    d = pyad.SimpleNet()
    p = d.get_params()
    assert (p["backbone"], p["layers"], p["image_size"], p["crop_size"]) == ("wide_resnet50_2", ("layer2", "layer3"),
                                                                              329, 288)
    assert (p["embed_dim"], p["target_dim"], p["patch_size"], p["adaptor_layers"]) == (1536, 1536, 3, 1)
    assert (p["dsc_layers"], p["dsc_hidden"], p["noise_std"], p["margin"]) == (2, 1024, 0.015, 0.5)
    assert (p["lr"], p["adaptor_weight_decay"], p["dsc_lr"], p["dsc_weight_decay"]) == (1e-4, 0.01, 2e-4, 1e-5)
    assert (p["max_epochs"], p["batch_size"], p["select"], p["blur_sigma"]) == (160, 8, "last", 4.0)


def test_network_shapes_and_init():
    with training.seeded(0):
        nets = pyad.SimpleNet()._networks()
    a, d = nets["adaptor"], nets["discriminator"]
    assert [tuple(m.weight.shape) for m in a.modules() if isinstance(m, torch.nn.Linear)] == [(1536, 1536)]
    lin, bn, act = d.body[0]
    assert tuple(lin.weight.shape) == (1024, 1536) and bn.num_features == 1024 and act.negative_slope == 0.2
    assert tuple(d.tail.weight.shape) == (1, 1024) and d.tail.bias is None
    # xavier-normal: std = sqrt(2 / (fan_in + fan_out))
    assert abs(a.layers[0].weight.std().item() - (2 / 3072) ** 0.5) < 1e-3
    assert abs(lin.weight.std().item() - (2 / 2560) ** 0.5) < 1e-3
    assert d(torch.zeros(5, 1536)).shape == (5, 1)


def test_patch_features_shape_at_the_official_size():
    det = pyad.SimpleNet(backbone="resnet18", weights=None)  # resize 329, crop 288
    emb = det._embedder(det._network())
    with torch.inference_mode():
        out = emb(torch.zeros(2, 3, 288, 288))
    assert out.shape == (2, 36, 36, 1536)  # 1296 patches of 1536 values per image


def test_truncated_l1_against_the_formula():
    rng = np.random.default_rng(0)
    t, f = rng.normal(0, 1, (50, 1)), rng.normal(0, 1, (50, 1))
    th = 0.5
    want = np.mean([max(0.0, th - v) for v in t.ravel()]) + np.mean([max(0.0, v + th) for v in f.ravel()])
    got = sn.truncated_l1(torch.from_numpy(t), torch.from_numpy(f), th)
    assert got.item() == pytest.approx(want, rel=1e-12)
    assert sn.truncated_l1(torch.full((3, 1), 0.7), torch.full((3, 1), -0.9), th).item() == 0.0  # beyond margins


def test_training_loss_is_the_official_step():
    """q = G(p); q⁻ = q + N(0, σ²) drawn from torch's generator; D over [q; q⁻] at once
    (BatchNorm in train mode over both halves); truncated L1."""
    with training.seeded(1):
        nets = pyad.SimpleNet(target_dim=8, dsc_hidden=4)._networks()
    a, d = nets["adaptor"].train(), nets["discriminator"].train()
    p = torch.randn(20, 8)
    torch.manual_seed(5)
    loss, p_true, p_fake = sn.training_loss(a, d, p, 0.015, 0.5)
    torch.manual_seed(5)
    noise = torch.normal(0.0, 0.015, (20, 8))
    q = p @ a.layers[0].weight.T + a.layers[0].bias
    h = torch.cat([q, q + noise]) @ d.body[0][0].weight.T + d.body[0][0].bias
    h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5) * d.body[0][1].weight + d.body[0][1].bias
    s = torch.where(h > 0, h, 0.2 * h) @ d.tail.weight.T
    want = torch.clamp(0.5 - s[:20], min=0).mean() + torch.clamp(s[20:] + 0.5, min=0).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert p_true.item() == pytest.approx((s[:20] >= 0.5).float().mean().item())
    assert p_fake.item() == pytest.approx((s[20:] < -0.5).float().mean().item())


@pytest.mark.parametrize("adaptor_layers,dsc_layers", [(1, 2), (0, 2), (2, 3), (1, 1)])
def test_folded_scoring_equals_the_eval_mode_networks(adaptor_layers, dsc_layers):
    with training.seeded(2):
        nets = pyad.SimpleNet(target_dim=16, dsc_hidden=8, adaptor_layers=adaptor_layers,
                              dsc_layers=dsc_layers)._networks()
    a, d = nets["adaptor"], nets["discriminator"]
    for m in d.modules():  # running statistics away from the init
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(30, 16)
    with torch.no_grad():
        want = d.eval()(a.eval()(x))
        got = sn.fold(a, d)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_features_are_extracted_once_per_fit(data, monkeypatch):
    train, _ = data
    seen = []
    real = sn.PatchCoreEmbed.forward

    def counting(self, x):
        seen.append(len(x))
        return real(self, x)

    monkeypatch.setattr(sn.PatchCoreEmbed, "forward", counting)
    det = pyad.SimpleNet(**{**TINY, "max_epochs": 5}).fit(train)
    assert sum(seen) == len(train)  # 11 training + 1 validation image, not 5 passes
    assert len(det.history_) == 5 and det.selected_epoch_ == 5


def test_batchnorm_is_in_eval_mode_when_predicting(data):
    train, test = data
    det = pyad.SimpleNet(**TINY).fit(train)
    module = det.inference_module()
    assert not any(m.training for m in module.modules())
    alone = np.concatenate([det.predict(test[i : i + 1]).scores for i in range(len(test))])
    np.testing.assert_allclose(alone, det.predict(test).scores, rtol=1e-5)
    assert det.predict(test).scores.argmax() == 2


def test_image_score_is_the_raw_patch_maximum_and_the_map_is_blurred(data):
    train, test = data
    det = pyad.SimpleNet(**TINY).fit(train)
    x = det.preprocessing(list(test))
    module = det.inference_module()
    with torch.inference_mode():
        emb = module.embed(x)
        b, h, w, dim = emb.shape
        patch = -det.networks_["discriminator"](det.networks_["adaptor"](emb.reshape(-1, dim))).reshape(b, h, w)
        scores, maps = module(x)
    torch.testing.assert_close(scores, patch.reshape(b, -1).max(1).values, rtol=1e-5, atol=1e-6)
    up = torch.nn.functional.interpolate(patch[:, None], size=64, mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(maps, pyad.ops.gaussian_blur(up, 4.0), rtol=1e-4, atol=1e-5)


def test_thresholds_come_from_the_validation_images(data):
    train, test = data
    det = pyad.SimpleNet(**TINY, threshold_quantile=1.0).fit(train[:8], validation=train[8:])
    val = det.predict(train[8:], maps="low")
    assert det.threshold_ == pytest.approx(float(val.scores.max()), rel=1e-5)
    assert det.pixel_threshold_ == pytest.approx(float(val.maps.max()), rel=1e-5)
    assert "4 normal validation images" in det.threshold_rule_


def test_synthetic_selection_keeps_the_best_evaluation(data):
    """Evaluations every select_every passes on validation + synthetic anomalies; the
    kept networks are exactly those of the chosen pass (the selection does not
    change the training trajectory: a last-epoch run stopped there is identical)."""
    train, _ = data
    kw = {**TINY, "max_epochs": 6, "validation": 0.34}
    det = pyad.SimpleNet(**kw, select="synthetic", select_every=2).fit(train)
    assert [r["epoch"] for r in det.selection_] == [2, 4, 6]
    best = max(det.selection_, key=lambda r: (r["image_auroc"], r["pixel_auroc"]))
    first_best = next(r for r in det.selection_ if (r["image_auroc"], r["pixel_auroc"]) ==
                      (best["image_auroc"], best["pixel_auroc"]))
    assert det.selected_epoch_ == first_best["epoch"]
    last = pyad.SimpleNet(**{**kw, "max_epochs": det.selected_epoch_}).fit(train)
    for k in ("adaptor", "discriminator"):
        for (n, p), q in zip(det.networks_[k].state_dict().items(), last.networks_[k].state_dict().values()):
            torch.testing.assert_close(p, q, msg=n)


def test_a_synthetic_run_checkpoint_also_gives_the_last_pass(data, tmp_path):
    train, test = data
    kw = {**TINY, "max_epochs": 4, "validation": 0.34}
    ckpt = tmp_path / "synthetic.ckpt"
    pyad.SimpleNet(**kw, select="synthetic", select_every=2).fit(train, checkpoint=ckpt)
    from_ckpt = pyad.SimpleNet(**kw).fit(train, checkpoint=ckpt)  # select="last": nothing left to train
    straight = pyad.SimpleNet(**kw).fit(train)
    np.testing.assert_array_equal(from_ckpt.predict(test).scores, straight.predict(test).scores)
    more = pyad.SimpleNet(**{**kw, "max_epochs": 6}, select="synthetic", select_every=2).fit(train, checkpoint=ckpt)
    assert [r["epoch"] for r in more.selection_] == [2, 4, 6]  # resumed with its evaluations
    last_ckpt = tmp_path / "last.ckpt"
    pyad.SimpleNet(**kw).fit(train, checkpoint=last_ckpt)
    with pytest.raises(ValueError, match="without select='synthetic' evaluations"):
        pyad.SimpleNet(**{**kw, "max_epochs": 6}, select="synthetic", select_every=2).fit(train, checkpoint=last_ckpt)


def test_synthetic_selection_needs_validation_images(data):
    with pytest.raises(ValueError, match="select: 'synthetic' needs validation images"):
        pyad.SimpleNet(**TINY, select="synthetic", validation=0).fit(data[0])


def test_resume_from_a_checkpoint_reaches_the_same_state(data, tmp_path):
    train, test = data
    ckpt = tmp_path / "run.ckpt"
    pyad.SimpleNet(**{**TINY, "max_epochs": 2}).fit(train, checkpoint=ckpt)
    resumed = pyad.SimpleNet(**{**TINY, "max_epochs": 4}).fit(train, checkpoint=ckpt)
    straight = pyad.SimpleNet(**{**TINY, "max_epochs": 4}).fit(train)
    np.testing.assert_array_equal(resumed.predict(test).scores, straight.predict(test).scores)
    with pytest.raises(ValueError, match="belongs to another run"):
        pyad.SimpleNet(**{**TINY, "noise_std": 0.02}).fit(train, checkpoint=ckpt)


def test_saved_model_records_and_checks_the_backbone_weights(data, tmp_path):
    """The frozen backbone's weights are found again at load time by their recorded
    SHA-256 (or embedded with include_weights); the trained adaptor and
    discriminator are always in the file."""
    from pyad.backbones import Backbone

    train, test = data
    with training.seeded(3):
        ckpt = Backbone("resnet18", ("layer2", "layer3")).official_state_dict()
    torch.save(ckpt, tmp_path / "r18.pth")
    det = pyad.SimpleNet(**{**TINY, "weights": str(tmp_path / "r18.pth")}).fit(train)
    assert det.weights_id_.startswith("sha256:")
    want = det.predict(test).scores
    det.save(tmp_path / "m.pyad")
    det.save(tmp_path / "full.pyad", include_weights=True)
    back = pyad.load(tmp_path / "m.pyad")
    np.testing.assert_array_equal(back.predict(test).scores, want)
    for k in ("adaptor", "discriminator"):
        for p, q in zip(back.networks_[k].state_dict().values(), det.networks_[k].state_dict().values()):
            torch.testing.assert_close(p, q)
    (tmp_path / "r18.pth").unlink()
    with pytest.raises(ValueError, match="weights: the model was fitted with backbone weights"):
        pyad.load(tmp_path / "m.pyad")
    np.testing.assert_array_equal(pyad.load(tmp_path / "full.pyad").predict(test).scores, want)


@pytest.mark.parametrize("bad,match", [
    (dict(select="best_on_test"), "select"), (dict(noise_std=0), "noise_std"), (dict(margin=-1), "margin"),
    (dict(patch_size=2), "patch_size"), (dict(adaptor_layers=-1), "adaptor_layers"), (dict(dsc_layers=0), "dsc_layers"),
    (dict(early_stopping_patience=3), "early_stopping_patience"), (dict(embed_dim=0), "embed_dim"),
])
def test_bad_parameters_name_themselves(data, bad, match):
    with pytest.raises(ValueError, match=match):
        pyad.SimpleNet(**{**TINY, **bad}).fit(data[0])
