"""GANomaly: the reference networks (shapes, module names, init), each loss term
against its formula, the reference's update order step for step, the
discriminator's re-initialisation, [-1, 1] input, scores scaled with validation
statistics only, eval-mode scoring, resume, save/load of every network. Tiny
networks (32-64 px, widths 8)."""

import numpy as np
import pytest
import torch

import pyad
from pyad import training
from pyad.detectors import ganomaly as gm
from conftest import noisy_images

TINY = dict(image_size=32, batch_size=4, latent_dim=8, ngf=8, ndf=8, max_epochs=2)


@pytest.fixture(scope="module")
def data():
    train, test = noisy_images(11, 32, 12, 3, 80, 170, 12)
    test[2, 8:20, 8:20] = 250
    return train, test


def test_defaults():
    p = pyad.GANomaly().get_params()
    assert (p["latent_dim"], p["ngf"], p["ndf"], p["extra_layers"]) == (100, 64, 64, 0)
    assert (p["adversarial"], p["contextual"], p["w_adv"], p["w_con"], p["w_enc"]) == ("feature", "l1", 1.0, 50.0, 1.0)
    assert (p["lr"], p["beta1"], p["reinit_below"]) == (2e-4, 0.5, 1e-5)
    assert (p["image_size"], p["batch_size"], p["max_epochs"]) == (256, 16, 300)


def test_network_shapes_at_256_px():
    with torch.device("meta"):
        g, d = gm.NetG(256), gm.NetD(256)
    convs = [m for m in g.encoder1.main if isinstance(m, torch.nn.Conv2d)]
    assert [m.out_channels for m in convs] == [64, 128, 256, 512, 1024, 2048, 100]
    assert all(m.bias is None for m in g.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)))
    convts = [m for m in g.decoder.main if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [m.out_channels for m in convts] == [2048, 1024, 512, 256, 128, 64, 3]
    assert isinstance(g.decoder.main[-1], torch.nn.Tanh)
    assert [m.out_channels for m in d.features if isinstance(m, torch.nn.Conv2d)] == [64, 128, 256, 512, 1024, 2048]
    assert isinstance(d.classifier[-1], torch.nn.Sigmoid) and d.classifier[0].out_channels == 1


def test_forward_shapes_and_reference_state_dict_keys():
    g, d = gm.NetG(32, 8, 3, 8), gm.NetD(32, 3, 8)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    fake, zi, zo = g(x)
    assert fake.shape == x.shape and zi.shape == zo.shape == (2, 8, 1, 1)
    assert fake.abs().max() <= 1
    pred, feat = d(x)
    assert pred.shape == (2,) and feat.shape == (2, 32, 4, 4)
    keys = set(g.state_dict())  # lib/networks.py's names, so netG.pth loads unchanged
    assert {"encoder1.main.initial-conv-3-8.weight", "encoder1.main.pyramid-8-16-conv.weight",
            "encoder1.main.pyramid-16-batchnorm.running_mean", "encoder1.main.final-32-1-conv.weight",
            "decoder.main.initial-8-32-convt.weight", "decoder.main.pyramid-32-16-convt.weight",
            "decoder.main.final-8-3-convt.weight", "encoder2.main.initial-conv-3-8.weight"} <= keys
    assert {"features.0.weight", "features.3.running_var", "classifier.0.weight"} <= set(d.state_dict())  # re-listed layers


def test_weights_init():
    torch.manual_seed(0)
    g = gm.NetG(64, 100, 3, 64)
    g.apply(gm.weights_init)
    w = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))])
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3
    bn = [m for m in g.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    gamma = torch.cat([m.weight for m in bn])
    assert abs(gamma.mean().item() - 1) < 2e-3 and abs(gamma.std().item() - 0.02) < 2e-3
    assert all((m.bias == 0).all() for m in bn)


def test_generator_loss_terms_against_their_formulas():
    torch.manual_seed(1)
    d = gm.NetD(32, 3, 8).train()
    x, fake = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 - 1
    zi, zo = torch.randn(3, 8, 1, 1), torch.randn(3, 8, 1, 1)
    fx, ff = d(x)[1].detach().numpy(), d(fake)[1].detach().numpy()
    pf = d(fake)[0].detach().numpy().astype(np.float64)
    xn, fn, zin, zon = (t.numpy().astype(np.float64) for t in (x, fake, zi, zo))
    adv_fm = np.mean((fx.astype(np.float64) - ff) ** 2)
    adv_bce = np.mean(-np.log(pf))
    con_l1, con_mse = np.mean(np.abs(fn - xn)), np.mean((fn - xn) ** 2)
    enc = np.mean((zon - zin) ** 2)
    total, (a, c, e) = gm.generator_loss(d, x, fake, zi, zo)
    assert (a.item(), c.item(), e.item()) == pytest.approx((adv_fm, con_l1, enc), rel=1e-5)
    assert total.item() == pytest.approx(adv_fm + 50 * con_l1 + enc, rel=1e-5)
    total, (a, c, _) = gm.generator_loss(d, x, fake, zi, zo, adversarial="bce", contextual="mse", w_adv=2, w_con=3,
                                         w_enc=4)
    assert (a.item(), c.item()) == pytest.approx((adv_bce, con_mse), rel=1e-5)
    assert total.item() == pytest.approx(2 * adv_bce + 3 * con_mse + 4 * enc, rel=1e-5)


def test_discriminator_loss_and_score_against_their_formulas():
    p_real, p_fake = torch.tensor([0.9, 0.6, 0.99]), torch.tensor([0.2, 0.05, 0.7])
    want = 0.5 * (np.mean(-np.log(p_real.numpy())) + np.mean(-np.log(1 - p_fake.numpy())))
    assert gm.discriminator_loss(p_real, p_fake).item() == pytest.approx(want, rel=1e-6)
    zi, zo = torch.randn(4, 8, 1, 1), torch.randn(4, 8, 1, 1)
    np.testing.assert_allclose(gm.latent_distance(zi, zo).numpy(), ((zi - zo) ** 2).reshape(4, -1).mean(1).numpy())


def test_discriminator_loss_gradient_is_finite_when_the_sigmoid_saturates():
    """A confident D outputs exactly 1.0 (real) or 0.0 (fake) in float32; the loss and its
    gradient must stay finite there, as nn.BCELoss's are (a clamped −log(1 − p) gives 0 · ∞ = NaN:
    the bottle run that diverged at step 70)."""
    logits = torch.tensor([30.0, 2.0, -120.0, 20.0], requires_grad=True)
    p = torch.sigmoid(logits)
    assert p[0].item() == 1.0 and p[2].item() == 0.0  # saturated in float32
    loss = gm.discriminator_loss(p[:2], p[2:]) + gm.bce(p[[0]], 0.0) + gm.bce(p[[2]], 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    ref = torch.nn.BCELoss()
    q = torch.sigmoid(logits.detach())
    want = 0.5 * (ref(q[:2], torch.ones(2)) + ref(q[2:], torch.zeros(2))) + ref(q[[0]], torch.zeros(1)) + \
        ref(q[[2]], torch.ones(1))
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


def _reference_epoch(netg, netd, batches, lr, reinit_below=1e-5):
    """lib/model.py's optimize_params, line for line, over the given batches."""
    l2 = lambda a, b: torch.mean(torch.pow(a - b, 2))  # noqa: E731 - lib/loss.py l2_loss
    l1, bce = torch.nn.L1Loss(), torch.nn.BCELoss()
    opt_d = torch.optim.Adam(netd.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(netg.parameters(), lr=lr, betas=(0.5, 0.999))
    netg.train()
    netd.train()
    reinits = 0
    for x in batches:
        fake, latent_i, latent_o = netg(x)  # forward_g
        pred_real, _ = netd(x)  # forward_d
        pred_fake, _ = netd(fake.detach())
        opt_g.zero_grad()  # backward_g
        err_g = l2(netd(x)[1], netd(fake)[1]) * 1 + l1(fake, x) * 50 + l2(latent_o, latent_i) * 1
        err_g.backward(retain_graph=True)
        opt_g.step()
        opt_d.zero_grad()  # backward_d
        err_d = (bce(pred_real, torch.ones(len(x))) + bce(pred_fake, torch.zeros(len(x)))) * 0.5
        err_d.backward()
        opt_d.step()
        if err_d.item() < reinit_below:
            netd.apply(gm.weights_init)
            reinits += 1
    return reinits


def test_training_follows_the_reference_update_order(data):
    train, _ = data
    det = pyad.GANomaly(**{**TINY, "max_epochs": 1}, validation=0).fit(train)
    with training.seeded(det.seed):
        nets = det._networks()
    order = training.Batches(len(train), det.batch_size, det.seed, drop_last=True).epoch(0)
    x = det.preprocessing(list(train))
    _reference_epoch(nets["netg"], nets["netd"], [x[torch.from_numpy(i)] for i in order], det.lr)
    for k in ("netg", "netd"):
        got, want = det.networks_[k].state_dict(), nets[k].state_dict()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=f"{k}.{name}")


def test_discriminator_is_reinitialised_below_the_threshold(data):
    train, _ = data
    det = pyad.GANomaly(**TINY, validation=0, reinit_below=100.0).fit(train)  # every step
    assert det.d_reinits_ == 2 * (len(train) // det.batch_size)
    assert pyad.GANomaly(**TINY, validation=0).fit(train).d_reinits_ == 0


def test_input_is_scaled_to_minus_one_one():
    x = pyad.GANomaly(image_size=32).preprocessing([np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8)])
    assert x[0].min().item() == -1.0 and x[1].max().item() == 1.0


def test_scores_are_scaled_with_validation_statistics_only(data):
    train, test = data
    det = pyad.GANomaly(**TINY).fit(train[:8], validation=train[8:])
    netg = det.networks_["netg"].eval()
    with torch.no_grad():
        _, zi, zo = netg(det.preprocessing(list(train[8:])))
    raw = gm.latent_distance(zi, zo).numpy()
    assert det.score_min_ == pytest.approx(float(raw.min()), rel=1e-5)
    assert det.score_max_ == pytest.approx(float(raw.max()), rel=1e-5)
    val = det.predict(train[8:]).scores
    assert val.min() == pytest.approx(0.0, abs=1e-5) and val.max() == pytest.approx(1.0, abs=1e-5)
    assert "4 normal validation images" in det.score_stats_
    assert det.threshold_ == pytest.approx(float(np.quantile(val, 0.99, method="higher")), abs=1e-6)
    # the test images do not move the scale: scored alone or with others, the same
    # (compared in raw units: these tiny networks' validation distances lie within 2% of each
    # other, so the min-max scale magnifies float32 rounding 50-fold)
    alone = np.concatenate([det.predict(test[i : i + 1]).scores for i in range(len(test))])
    span = det.score_max_ - det.score_min_
    np.testing.assert_allclose(alone * span, det.predict(test).scores * span, rtol=0, atol=1e-6 * det.score_max_)
    # without validation images, the training images give the statistics (said so)
    solo = pyad.GANomaly(**TINY, validation=0).fit(train)
    assert "training (no validation images)" in solo.score_stats_ and solo.threshold_ is None


def test_networks_are_in_eval_mode_when_scoring(data):
    train, test = data
    det = pyad.GANomaly(**TINY, validation=0.34).fit(train)
    module = det.inference_module()
    assert not any(m.training for m in module.modules())
    x = det.preprocessing(list(test))
    with torch.inference_mode():
        scores, maps = module(x)
        fake, zi, zo = det.networks_["netg"](x)
    want = (gm.latent_distance(zi, zo) - det.score_min_) / (det.score_max_ - det.score_min_)
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps, pyad.ops.gaussian_blur((x - fake).abs().mean(1), 4.0), rtol=1e-5, atol=1e-6)


def test_weight_bound_layers_as_gemms_give_the_exported_scores(data, monkeypatch):
    """The CPU fast path runs the generator's layers with few output positions as GEMMs
    (ops.conv); portable() (what export runs) uses the layers themselves."""
    train, test = data
    det = pyad.GANomaly(**TINY).fit(train)
    x = det.preprocessing(list(test))
    calls, gemm = [], pyad.ops.conv_as_gemm
    monkeypatch.setattr(pyad.ops, "conv_as_gemm", lambda layer, h: calls.append(type(layer).__name__) or gemm(layer, h))
    module = det.inference_module()
    with torch.inference_mode():
        fast = module(x)
        with pyad.ops.portable():
            exported = module(x)
    assert "Conv2d" in calls and "ConvTranspose2d" in calls
    torch.testing.assert_close(fast, exported, rtol=1e-5, atol=1e-6)


def test_save_load_keeps_every_network(data, tmp_path):
    train, test = data
    det = pyad.GANomaly(**TINY).fit(train)
    det.save(tmp_path / "m.pyad")
    back = pyad.load(tmp_path / "m.pyad")
    for k in ("netg", "netd"):
        for (n, p), q in zip(det.networks_[k].state_dict().items(), back.networks_[k].state_dict().values()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    assert (back.score_min_, back.score_max_) == (det.score_min_, det.score_max_)
    np.testing.assert_array_equal(back.predict(test).scores, det.predict(test).scores)


def test_resume_from_a_checkpoint_reaches_the_same_state(data, tmp_path):
    train, test = data
    ckpt = tmp_path / "run.ckpt"
    pyad.GANomaly(**{**TINY, "max_epochs": 1}).fit(train, checkpoint=ckpt)
    resumed = pyad.GANomaly(**{**TINY, "max_epochs": 3}).fit(train, checkpoint=ckpt)
    straight = pyad.GANomaly(**{**TINY, "max_epochs": 3}).fit(train)
    np.testing.assert_array_equal(resumed.predict(test).scores, straight.predict(test).scores)


def test_early_stopping_watches_the_validation_reconstruction(data):
    train, _ = data
    det = pyad.GANomaly(**{**TINY, "max_epochs": 4}, early_stopping_patience=1).fit(train)
    rows = [r for r in det.history_ if "validation" in r]
    assert rows and all(np.isfinite(r["validation"]) for r in rows)


@pytest.mark.parametrize("bad,match", [
    (dict(image_size=40), "image_size"), (dict(adversarial="wgan"), "adversarial"), (dict(contextual="l2"), "contextual"),
    (dict(latent_dim=0), "latent_dim"), (dict(ngf=7), "ngf"), (dict(w_con=-1), "w_con"), (dict(beta1=1.0), "beta1"),
])
def test_bad_parameters_name_themselves(data, bad, match):
    with pytest.raises(ValueError, match=match):
        pyad.GANomaly(**{**TINY, **bad}).fit(data[0])
