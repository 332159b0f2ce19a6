"""VAE: the source's network shapes, the loss terms against their formulas (KL
closed form and torch.distributions, summed BCE / squared error), a training step
reproduced from the formula, deterministic inference at z = mu (no sampling),
the image-score options, BatchNorm in eval mode when predicting, ReduceLROnPlateau
and early stopping on the validation loss, resume, thresholds from validation
images only, save/load of every weight and running statistic. Tiny networks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pyad
from pyad import images as imgs
from pyad import modelfile, training
from pyad.detectors import vae as V
from pyad.detectors.autoencoder import to_grey
from conftest import noisy_images

TINY = dict(image_size=32, batch_size=4, latent_dim=8, widths=(4, 8, 8, 8), max_epochs=2)


@pytest.fixture(scope="module")
def data():
    train, test = noisy_images(5, 32, 12, 3, 80, 170, 12)
    test[2, 8:20, 8:20] = 250
    return train, test


@pytest.fixture(scope="module")
def fitted(data):
    return pyad.VAE(**TINY).fit(data[0])


def test_defaults_follow_the_source():
    p = pyad.VAE().get_params()
    assert (p["image_size"], p["batch_size"], p["max_epochs"], p["lr"]) == (256, 16, 100, 1e-4)
    assert (p["beta"], p["grey"], p["reconstruction"], p["early_stopping_patience"]) == (1.0, True, "bce", 10)
    assert (p["plateau_patience"], p["plateau_factor"]) == (5, 0.5)
    assert (p["score"], p["topk"], p["blur_sigma"]) == ("topk", 0.05, 4.0)  # measured: docs/detectors/vae.md


def test_scoring_parameters_do_not_block_resuming(data, tmp_path):
    train, test = data
    ckpt = tmp_path / "v.ckpt"
    a = pyad.VAE(**TINY).fit(train, checkpoint=ckpt)
    b = pyad.VAE(**{**TINY, "score": "elbo", "blur_sigma": 0.0}).fit(train, checkpoint=ckpt)  # resumes: no training
    np.testing.assert_array_equal(a.predict(test, maps="low").maps,
                                  pyad.ops.gaussian_blur(torch.from_numpy(b.predict(test, maps="low").maps), 4.0).numpy())
    with pytest.raises(ValueError, match="belongs to another run"):
        pyad.VAE(**{**TINY, "latent_dim": 4}).fit(train, checkpoint=ckpt)


def test_network_shapes_at_256_px():
    with torch.device("meta"):
        net = V.VAENet(1, 256)
    convs = [m for m in net.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [(m.out_channels, m.stride, m.kernel_size) for m in convs] == [(w, (2, 2), (3, 3)) for w in (32, 64, 64, 64)]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.encoder) == 4
    assert sum(isinstance(m, torch.nn.LeakyReLU) and m.negative_slope == 0.3 for m in net.encoder) == 4
    assert (net.grid, net.top) == (16, 64) and net.mu.in_features == net.logvar.in_features == 16 * 16 * 64
    assert net.dense[0].out_features == 16 * 16 * 64  # reshaped to 16x16x64
    convts = [m for m in net.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [m.out_channels for m in convts] == [64, 64, 32, 1] and isinstance(net.decoder[-1], torch.nn.Sigmoid)
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert (bn.eps, bn.momentum) == (1e-3, 0.1)  # Keras's epsilon, PyTorch's momentum (module doc)


def test_forward_shapes():
    net = V.VAENet(1, 32, (4, 8, 8, 8), 8)
    x = torch.rand(3, 1, 32, 32)
    recon, mu, logvar = net(x)
    assert recon.shape == x.shape and mu.shape == logvar.shape == (3, 8)
    assert 0 < recon.min() and recon.max() < 1
    rgb = V.VAENet(3, 64, (4, 8, 8, 8), 8)
    assert rgb(torch.rand(2, 3, 64, 64))[0].shape == (2, 3, 64, 64)


def test_kl_against_its_closed_form_and_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    got = V.kl_divergence(mu, logvar)
    m, lv = mu.double().numpy(), logvar.double().numpy()
    want = 0.5 * (np.exp(lv) + m**2 - 1 - lv).sum(1)  # KL(N(mu, s^2) || N(0, 1)) summed over dimensions
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    np.testing.assert_allclose(got.numpy(), torch.distributions.kl_divergence(q, p).sum(1).numpy(), rtol=1e-5)
    assert V.kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3)).abs().max() == 0


def test_reconstruction_terms_against_their_formulas():
    g = torch.Generator().manual_seed(1)
    x, r = torch.rand(2, 1, 8, 8, generator=g), torch.rand(2, 1, 8, 8, generator=g) * 0.98 + 0.01
    bce = V.reconstruction_error(r, x, "bce")
    xn, rn = x.double().numpy(), r.double().numpy()
    want = -(xn * np.log(rn) + (1 - xn) * np.log(1 - rn)).reshape(2, -1).sum(1)
    np.testing.assert_allclose(bce.numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(bce.numpy(), F.binary_cross_entropy(r, x, reduction="none").flatten(1).sum(1).numpy(),
                               rtol=1e-5)
    np.testing.assert_allclose(V.reconstruction_error(r, x, "mse").numpy(), ((r - x) ** 2).flatten(1).sum(1).numpy(),
                               rtol=1e-6)
    # saturated outputs: torch's clamp of the log at -100, not inf
    assert torch.isfinite(V.reconstruction_error(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]), "bce")).all()
    mu, lv = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    loss = V.vae_loss(r, x, mu, lv, 0.5, "bce")
    torch.testing.assert_close(loss, (bce + 0.5 * V.kl_divergence(mu, lv)).mean())
    # ... and a finite training gradient there (torch's BCE backward; clamped logs give 0 * inf = NaN)
    logits = torch.tensor([[120.0, -120.0, 0.5]], requires_grad=True)
    sat = torch.sigmoid(logits)
    assert sat[0, 0].item() == 1.0 and sat[0, 1].item() == 0.0
    V.vae_loss(sat, torch.tensor([[0.0, 1.0, 0.3]]), mu[:1], lv[:1], 1.0, "bce").backward()
    assert torch.isfinite(logits.grad).all()


def test_first_training_step_is_the_formula(data):
    """The logged loss of step 1 = the negative ELBO of the first batch with z = mu +
    sigma * eps, eps drawn from the seeded global stream after the networks' init."""
    train = data[0]
    det = pyad.VAE(**{**TINY, "max_steps": 1, "validation": 0.0}).fit(train)
    with training.seeded(det.seed):
        net = det._networks()["vae"].train()
        idx = training.Batches(len(train), det.batch_size, det.seed).epoch(0)[0]
        x = to_grey(det.preprocessing.to_tensor(list(train[idx])))
        recon, mu, logvar = net(x, sample=True)
    want = V.vae_loss(recon, x, mu, logvar, 1.0, "bce").item()
    assert det.history_[0]["loss"] == pytest.approx(want, rel=1e-5)  # (trained channels-last, checked here in NCHW)
    # the fitted network is back in the default layout (stored and run as such)
    assert all(t.is_contiguous() for t in det.networks_["vae"].state_dict().values())


def test_training_runs_channels_last_on_the_cpu(data, monkeypatch):
    seen = []
    real = torch.nn.Conv2d._conv_forward
    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward",
                        lambda self, x, w, b: seen.append(w.is_contiguous(memory_format=torch.channels_last)) or real(self, x, w, b))
    pyad.VAE(**{**TINY, "max_steps": 1, "validation": 0.0}).fit(data[0])
    assert seen and all(seen)


def test_inference_uses_mu_and_is_deterministic(fitted, data):
    test = data[1]
    a, b = fitted.predict(test), fitted.predict(test)
    np.testing.assert_array_equal(a.scores, b.scores)
    net = fitted.networks_["vae"]
    x = to_grey(fitted.preprocessing(list(test)))
    with torch.no_grad():
        mu, logvar = net.encode(x)
        recon = net.decode(mu)
    err = (x - recon).square().mean(1)
    maps = fitted.predict(test, maps="low").maps
    np.testing.assert_allclose(maps, pyad.ops.gaussian_blur(err, fitted.blur_sigma).numpy(), rtol=1e-5, atol=1e-7)
    k = int(np.ceil(0.05 * 32 * 32))  # score="topk", topk=0.05: the mean of the top 5 % of the map
    np.testing.assert_allclose(a.scores, np.sort(maps.reshape(3, -1), 1)[:, -k:].mean(1), rtol=1e-5)
    with torch.no_grad():
        elbo, _ = fitted._module(net, score="elbo")(fitted.preprocessing(list(test)))
    want = V.reconstruction_error(recon, x, "bce") + V.kl_divergence(mu, logvar)
    np.testing.assert_allclose(elbo.numpy(), want.numpy(), rtol=1e-5)


def test_batchnorm_is_in_eval_mode_when_predicting(fitted, data):
    module = fitted.inference_module()
    assert not any(m.training for m in module.modules())
    before = {k: v.clone() for k, v in fitted.networks_["vae"].state_dict().items()}
    fitted.predict(data[1])
    for k, v in fitted.networks_["vae"].state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)  # running statistics untouched
    alone = fitted.predict(data[1][2:3]).scores
    np.testing.assert_allclose(alone, fitted.predict(data[1]).scores[2:3], rtol=1e-5)


def test_plateau_scheduler_and_early_stopping_on_validation_loss(data, tmp_path):
    det = pyad.VAE(**{**TINY, "max_epochs": 3, "plateau_patience": 2, "plateau_factor": 0.25}).fit(
        data[0], checkpoint=tmp_path / "c.ckpt")
    _, st = modelfile.read_tree(tmp_path / "c.ckpt")
    plateau = st["schedulers"]["plateau"]
    assert (plateau["patience"], plateau["factor"], plateau["mode"]) == (2, 0.25, "min")
    assert plateau["best"] == pytest.approx(min(r["validation"] for r in det.history_), rel=1e-3)
    assert [r["epoch"] for r in det.history_] == [1, 2, 3] and all("validation" in r for r in det.history_)
    assert st["best_epoch"] == 1 + int(np.argmin([r["validation"] for r in det.history_]))


def test_plateau_reduces_the_learning_rate():
    net = torch.nn.Linear(2, 1)
    opt = training.optimizer("adam", net.parameters(), 1e-3)
    sched = training.scheduler("plateau", opt, patience=1, factor=0.5)
    run = training.Run("t", modules={"n": net}, optimizers={"o": opt}, schedulers={"p": sched}, max_epochs=5,
                       early_stopping_patience=3)
    for v in (1.0, 1.0, 1.0):
        stop = run.validate(v)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4) and not stop
    assert run.validate(1.0) and run.stopped_early


def test_resume_from_a_checkpoint_reaches_the_same_state(data, tmp_path):
    train, test = data
    straight = pyad.VAE(**TINY).fit(train)
    ckpt = tmp_path / "v.ckpt"
    pyad.VAE(**{**TINY, "max_epochs": 1}).fit(train, checkpoint=ckpt)
    resumed = pyad.VAE(**TINY).fit(train, checkpoint=ckpt)
    np.testing.assert_array_equal(resumed.predict(test).scores, straight.predict(test).scores)
    for k, v in straight.networks_["vae"].state_dict().items():
        torch.testing.assert_close(resumed.networks_["vae"].state_dict()[k], v, rtol=0, atol=0)


def test_threshold_is_a_quantile_of_the_validation_images(fitted, data):
    _, val, _ = fitted._split_validation(imgs.as_items(data[0]), None, None)
    scores = fitted.predict(val).scores
    assert fitted.threshold_ == pytest.approx(float(np.quantile(scores, 0.99, method="higher")), rel=1e-6)
    assert "normal validation images" in fitted.threshold_rule_


def test_save_load_keeps_every_weight_and_running_statistic(fitted, data, tmp_path):
    fitted.save(tmp_path / "v.pyad")
    back = pyad.load(tmp_path / "v.pyad")
    for k, v in fitted.networks_["vae"].state_dict().items():
        torch.testing.assert_close(back.networks_["vae"].state_dict()[k], v, rtol=0, atol=0)
    np.testing.assert_array_equal(back.predict(data[1]).scores, fitted.predict(data[1]).scores)
    assert back.history_ == fitted.history_


@pytest.mark.parametrize("bad, match", [
    (dict(image_size=40), "divisible by 16"), (dict(score="max"), "score"), (dict(reconstruction="l1"), "reconstruction"),
    (dict(beta=-1), "beta"), (dict(latent_dim=0), "latent_dim"), (dict(widths=()), "widths"),
    (dict(plateau_factor=1.5), "plateau_factor"), (dict(topk=0), "topk")])
def test_bad_parameters(bad, match, data):
    with pytest.raises(ValueError, match=match):
        pyad.VAE(**{**TINY, **bad}).fit(data[0])
