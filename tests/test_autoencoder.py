"""AutoEncoder: the source's network (32-64-128 encoder with max pooling, mirrored
decoder with nearest upsampling, sigmoid), the training step from its formula
(MSE of the augmented batch), the augmentation, grey conversion, the map and the
image scores against NumPy / SciPy, early stopping keeping the best epoch, resume,
thresholds from validation images only. 32 px images."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import pyad
from pyad import images as imgs
from pyad import modelfile, training
from pyad.detectors import autoencoder as A
from conftest import noisy_images

TINY = dict(image_size=32, batch_size=4, max_epochs=2)


@pytest.fixture(scope="module")
def data():
    train, test = noisy_images(3, 32, 12, 3, 80, 170, 12)
    test[2, 8:20, 8:20] = 250
    return train, test


@pytest.fixture(scope="module")
def fitted(data):
    return pyad.AutoEncoder(**TINY).fit(data[0])


def test_defaults_follow_the_source():
    p = pyad.AutoEncoder().get_params()
    assert (p["image_size"], p["batch_size"], p["max_epochs"], p["lr"], p["grey"], p["augment"]) == (
        256, 16, 100, 1e-4, True, True)
    assert p["validation"] == 0.1 and p["early_stopping_patience"] == 10
    assert p["score"] == "mean"  # the image MSE (the seed; chosen on validation anomalies, the detector's page)


def test_network_at_256_px():
    net = A.ConvAutoEncoder(1)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [m.out_channels for m in convs] == [32, 64, 128, 128, 64, 32, 1]
    assert all(m.kernel_size == (3, 3) and m.padding == (1, 1) for m in convs)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net.encoder) == 3
    ups = [m for m in net.decoder if isinstance(m, torch.nn.Upsample)]
    assert len(ups) == 3 and all(m.mode == "nearest" and m.scale_factor == 2 for m in ups)
    assert isinstance(net.decoder[-1], torch.nn.Sigmoid)
    with torch.no_grad():
        code = net.encoder(torch.rand(1, 1, 256, 256))
        out = net(torch.rand(1, 1, 256, 256))
    assert code.shape == (1, 128, 32, 32) and out.shape == (1, 1, 256, 256)


def test_training_forward_is_the_network_with_winograd_layers(monkeypatch):
    # forward_train: the same function and gradients, its dense 3x3 layers through conv2d_train.
    # The gradients are compared with average pools in place of the max pools: a 2x2 window of
    # ReLU zeros is a tie that 1e-7 differences in rounding break either way, moving that
    # window's gradient (measured: 4e-4 of the encoder's gradient scale with max pools; with
    # average pools both paths are within 5e-6 of float64)
    from pyad import ops

    torch.manual_seed(0)
    net, x = A.ConvAutoEncoder(1), torch.rand(2, 1, 128, 128)
    torch.testing.assert_close(net.forward_train(x), net(x), rtol=0, atol=1e-5)
    for i, m in enumerate(net.encoder):
        if isinstance(m, torch.nn.MaxPool2d):
            net.encoder[i] = torch.nn.AvgPool2d(2)
    taken = []
    real = ops.conv2d_train
    monkeypatch.setattr(ops, "conv2d_train", lambda *a: taken.append(a[1].shape) or real(*a))
    grads = []
    for f in (net.forward, net.forward_train):
        net.zero_grad()
        F.mse_loss(f(x), x).backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    assert len(taken) == 5  # all but the 1 -> 32 and 32 -> 1 layers (fewer than 16 channels)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5 * b.abs().max().item())


def test_grey_is_itu_601_luma_as_pil():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    x = torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255
    pil = np.asarray(Image.fromarray(a).convert("L"), np.float32) / 255
    np.testing.assert_allclose(A.to_grey(x)[0, 0].numpy(), pil, atol=1 / 255 + 1e-6)


def test_augmentation():
    x = torch.rand(6, 1, 16, 16)
    same = A.augment(x, torch.Generator().manual_seed(0), rotation=0, shift=0)
    for a, b in zip(same, x):  # each image itself or its mirror image, exactly (pixel centres)
        assert torch.allclose(a, b, atol=1e-6) or torch.allclose(a, b.flip(-1), atol=1e-6)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(same, x))
    a = A.augment(x, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, A.augment(x, torch.Generator().manual_seed(3)), rtol=0, atol=0)
    assert a.shape == x.shape and x.min() <= a.min() and a.max() <= x.max()  # bilinear + border fill stays in range


def test_image_scores_and_map_against_numpy_and_scipy():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(1)
    m = rng.random((2, 20, 20)).astype(np.float32)
    t = torch.from_numpy(m)
    np.testing.assert_allclose(A.image_score(t, "mean", 0.01).numpy(), m.reshape(2, -1).mean(1), rtol=1e-6)
    k = int(np.ceil(0.05 * 400))
    want = np.sort(m.reshape(2, -1), 1)[:, -k:].mean(1)
    np.testing.assert_allclose(A.image_score(t, "topk", 0.05).numpy(), want, rtol=1e-6)
    np.testing.assert_allclose(A.image_score(t, "topk", 1e-9).numpy(), m.reshape(2, -1).max(1), rtol=1e-6)
    net = A.ConvAutoEncoder(1).eval()
    x = torch.rand(2, 3, 32, 32)
    module = A.AutoEncoderModule(net, True, "mean", 0.01, 2.0)
    with torch.no_grad():
        scores, maps = module(x)
        err = (A.to_grey(x) - net(A.to_grey(x))).square()[:, 0].numpy()
    want = np.stack([gaussian_filter(e.astype(np.float64), 2.0, mode="reflect", truncate=4.0) for e in err])
    np.testing.assert_allclose(maps.numpy(), want, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(scores.numpy(), want.reshape(2, -1).mean(1), rtol=1e-4)


def test_first_training_step_is_the_mse_of_the_augmented_batch(data):
    train = data[0]
    det = pyad.AutoEncoder(**{**TINY, "max_steps": 1, "validation": 0.0}).fit(train)
    with training.seeded(det.seed):
        net = det._networks()["ae"]
    idx = training.Batches(len(train), det.batch_size, det.seed).epoch(0)[0]
    x = A.to_grey(det.preprocessing.to_tensor(list(train[idx])))
    x = A.augment(x, torch.Generator().manual_seed(det.seed * 100_003))
    assert det.history_[0]["loss"] == pytest.approx(F.mse_loss(net(x), x).item(), rel=1e-5)


def test_early_stopping_keeps_the_best_epoch(data, tmp_path):
    det = pyad.AutoEncoder(**{**TINY, "max_epochs": 4, "early_stopping_patience": 1}).fit(
        data[0], checkpoint=tmp_path / "c.ckpt")
    _, st = modelfile.read_tree(tmp_path / "c.ckpt")
    vals = [r["validation"] for r in det.history_]
    assert st["best_epoch"] == 1 + int(np.argmin(vals))
    assert len(vals) == 4 or (st["stopped_early"] and len(vals) == st["best_epoch"] + 1)
    for k, v in st["best_state"]["ae"].items():
        torch.testing.assert_close(det.networks_["ae"].state_dict()[k], v, rtol=0, atol=0)


def test_resume_from_a_checkpoint_reaches_the_same_state(data, tmp_path):
    train, test = data
    straight = pyad.AutoEncoder(**TINY).fit(train)
    ckpt = tmp_path / "a.ckpt"
    pyad.AutoEncoder(**{**TINY, "max_epochs": 1}).fit(train, checkpoint=ckpt)
    resumed = pyad.AutoEncoder(**TINY).fit(train, checkpoint=ckpt)
    np.testing.assert_array_equal(resumed.predict(test).scores, straight.predict(test).scores)


def test_scoring_parameters_do_not_block_resuming(data, tmp_path):
    train, test = data
    ckpt = tmp_path / "a.ckpt"
    a = pyad.AutoEncoder(**{**TINY, "score": "topk"}).fit(train, checkpoint=ckpt)
    b = pyad.AutoEncoder(**{**TINY, "score": "mean", "blur_sigma": 0.0}).fit(train, checkpoint=ckpt)  # no training
    for k, v in a.networks_["ae"].state_dict().items():
        assert torch.equal(b.networks_["ae"].state_dict()[k], v)
    with pytest.raises(ValueError, match="belongs to another run"):
        pyad.AutoEncoder(**{**TINY, "grey": False}).fit(train, checkpoint=ckpt)


def test_thresholds_come_from_the_validation_images(fitted, data):
    _, val, _ = fitted._split_validation(imgs.as_items(data[0]), None, None)
    pred = fitted.predict(val, maps="low")
    assert fitted.threshold_ == pytest.approx(float(np.quantile(pred.scores, 0.99, method="higher")), rel=1e-6)
    maxima = pred.maps.reshape(len(val), -1).max(1)
    assert fitted.pixel_threshold_ == pytest.approx(float(np.quantile(maxima, 0.99, method="higher")), rel=1e-6)


def test_rgb_and_scores(data):
    det = pyad.AutoEncoder(**{**TINY, "grey": False, "score": "mean", "blur_sigma": 0.0, "max_epochs": 1}).fit(data[0])
    net = det.networks_["ae"]
    assert net.encoder[0].in_channels == 3
    x = det.preprocessing(list(data[1]))
    with torch.no_grad():
        want = (x - net(x)).square().mean((1, 2, 3))
    np.testing.assert_allclose(det.predict(data[1]).scores, want.numpy(), rtol=1e-5)


@pytest.mark.parametrize("bad, match", [(dict(image_size=36), "divisible by 8"), (dict(score="max"), "score"),
                                        (dict(topk=2), "topk"), (dict(blur_sigma=-1), "blur_sigma")])
def test_bad_parameters(bad, match, data):
    with pytest.raises(ValueError, match=match):
        pyad.AutoEncoder(**{**TINY, **bad}).fit(data[0])
