"""Uninformed Students (Bergmann et al., CVPR 2020): the patch networks, fast dense
feature extraction equal to patch-by-patch evaluation, the losses and scores from
their formulas, teacher normalisation from the training images and score
normalisation from the validation images only, teacher distillation and its file,
resuming an interrupted fit."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pyad
from pyad import training
from pyad.detectors import uninformed_students as U
from conftest import defect_images

TINY = dict(teachers="random", patch_sizes=(17, 33), n_students=2, width=4, dim=8, image_size=40, batch_size=2,
            max_epochs=2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images():
    return defect_images(5, 40, 12, 4, (12, 28))


def _net(p, seed=0, width=4, dim=8):
    torch.manual_seed(seed)
    return U.PatchNet(p, width, dim).eval().requires_grad_(False)


@pytest.mark.parametrize("p", [17, 33, 65])
def test_patch_networks_map_a_patch_to_one_descriptor(p):
    net = _net(p)
    assert net.patch(torch.randn(3, 3, p, p)).shape == (3, 8)
    assert all(c.padding == (0, 0) for c in net.convs)
    kernels = [op[1] for op in U.ARCHITECTURES[p] if op[0] == "conv"]
    assert [c.kernel_size[0] for c in net.convs] == kernels
    assert net.stride == {17: 1, 33: 4, 65: 8}[p]
    full = U.PatchNet(p)  # the paper's widths: 128 / 256, descriptor 128
    assert full.convs[-1].out_channels == 128 and max(c.out_channels for c in full.convs) == 256
    # receptive field (input rows reaching the output): 17, 32 and 60 px of the p×p patch
    x = torch.randn(1, 3, p, p, requires_grad=True)
    net.requires_grad_(True).patch(x).sum().backward()
    rows = (x.grad.abs().sum((0, 1, 3)) > 0).nonzero()
    assert int(rows.max() - rows.min() + 1) == {17: 17, 33: 32, 65: 60}[p]


def test_leaky_relu_slope_and_no_activation_after_the_last_layer():
    net = _net(17)
    x = torch.randn(2, 3, 17, 17)
    y = x
    for i, conv in enumerate(net.convs):
        y = conv(y)
        if i < len(net.convs) - 1:
            y = torch.where(y > 0, y, 5e-3 * y)
    torch.testing.assert_close(net.patch(x), y.flatten(1))


@pytest.mark.parametrize("p,shape", [(17, (19, 22)), (33, (20, 27)), (65, (40, 37))])
def test_dense_extraction_equals_patch_by_patch(p, shape):
    """Bailer et al.'s multi-pool / unwrap result at every pixel = T̂ on the p×p patch
    centred there (reflection-padded image), also for sizes that are not multiples of
    the pooling stride."""
    net = _net(p, seed=p)
    x = torch.randn(2, 3, *shape)
    dense = net(x)
    assert dense.shape == (2, 8, *shape)
    lo, hi = net.padding()
    padded = F.pad(x, (lo, hi, lo, hi), mode="reflect")
    patches = padded.unfold(2, p, 1).unfold(3, p, 1)  # [2, 3, H, W, p, p]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, p, p)
    by_patch = torch.cat([net.patch(patches[i : i + 512]) for i in range(0, len(patches), 512)])
    torch.testing.assert_close(dense.permute(0, 2, 3, 1).reshape(-1, 8), by_patch, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("p", [33, 65])
def test_windows_of_the_padded_image_equal_the_full_map(p):
    """Training crops: a window of the padded image gives the full map's values there."""
    net = _net(p, seed=1)
    x = torch.randn(1, 3, 44, 44)
    full = net(x)
    lo, hi = net.padding()
    padded = F.pad(x, (lo, hi, lo, hi), mode="reflect")
    y0, x0, c = 7, 13, 21
    window = net(padded[..., y0 : y0 + c + p - 1, x0 : x0 + c + p - 1], pad=False)
    torch.testing.assert_close(window, full[..., y0 : y0 + c, x0 : x0 + c], rtol=1e-4, atol=1e-5)


def test_losses_from_the_formulas():
    g = torch.Generator().manual_seed(0)
    desc = torch.randn(16, 5, generator=g)
    corr = np.corrcoef(desc.numpy().T)
    want = corr.sum() - np.trace(corr)
    assert float(U.compactness_loss(desc)) == pytest.approx(want, rel=1e-4, abs=1e-5)
    dec, target = torch.randn(6, 12, generator=g), torch.randn(6, 12, generator=g)
    assert float(U.distillation_loss(dec, target)) == pytest.approx(
        np.mean([float(((dec[i] - target[i]) ** 2).sum()) for i in range(6)]), rel=1e-5)
    a, pos, neg = (torch.randn(6, 4, generator=g) for _ in range(3))
    want = np.mean([max(0.0, 0.5 + float(((a[i] - pos[i]) ** 2).sum())
                        - min(float(((a[i] - neg[i]) ** 2).sum()), float(((pos[i] - neg[i]) ** 2).sum())))
                    for i in range(6)])
    assert float(U.triplet_loss(a, pos, neg, 0.5)) == pytest.approx(want, rel=1e-5)


def test_error_and_variance_from_the_formulas():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(2, 4, 3, 3, generator=g)
    s = [torch.randn(2, 4, 3, 3, generator=g) for _ in range(3)]
    e, v = U.error_and_variance(t, s)
    for b, i, j in ((0, 0, 0), (1, 2, 1)):
        vecs = [x[b, :, i, j] for x in s]
        mean = sum(vecs) / 3
        assert float(e[b, i, j]) == pytest.approx(float(((mean - t[b, :, i, j]) ** 2).sum()), rel=1e-5)
        assert float(v[b, i, j]) == pytest.approx(float(np.mean([float((x ** 2).sum()) for x in vecs])
                                                        - float((mean ** 2).sum())), rel=1e-4, abs=1e-6)
        assert float(v[b, i, j]) >= -1e-6


def _stats(det, images, level):
    module = det.inference_module()
    with torch.no_grad():
        ev = [module.scale(level, det.to_input(torch.from_numpy(images[i : i + 1]))) for i in range(len(images))]
    e = torch.cat([a for a, _ in ev]).double()
    v = torch.cat([b for _, b in ev]).double()
    return np.array([e.mean(), e.std(unbiased=False), v.mean(), v.std(unbiased=False)])


def test_fit_statistics_and_scores(images):
    train, test = images
    fit_images, val_images = train[:9], train[9:]
    d = pyad.UninformedStudents(**TINY).fit(fit_images, validation=val_images)
    assert sorted(d.networks_) == ["student17_0", "student17_1", "student33_0", "student33_1", "teacher17", "teacher33"]
    # teacher normalisation: per-channel mean / std of the dense teacher over the training pixels
    with torch.no_grad():
        t = torch.cat([d.networks_["teacher33"](d.to_input(torch.from_numpy(fit_images[i : i + 1])))
                       for i in range(9)]).double()
    np.testing.assert_allclose(d.t_mean_[1], t.mean((0, 2, 3)).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d.t_std_[1], t.std((0, 2, 3), unbiased=False).numpy(), rtol=1e-4, atol=1e-5)
    # score normalisation: over all pixels of the validation images, and only those
    for level in (0, 1):
        np.testing.assert_allclose(d.stats_[level], _stats(d, val_images, level), rtol=1e-4)
        assert not np.allclose(d.stats_[level], _stats(d, fit_images, level), rtol=1e-3)
    assert d.normalisation_ == "3 validation images" and "3 normal validation images" in d.threshold_rule_
    # the module: mean over scales of the standardised e + v; image score = map maximum
    x = d.to_input(torch.from_numpy(test))
    with torch.no_grad():
        scores, maps = d.inference_module()(x)
        want = 0
        for level in (0, 1):
            e, v = d.inference_module().scale(level, x)
            st = d.stats_[level]
            want = want + (e - st[0]) / st[1] + (v - st[2]) / st[3]
    torch.testing.assert_close(maps, want / 2)
    torch.testing.assert_close(scores, maps.flatten(1).amax(1))
    assert maps.shape == (4, 40, 40) and scores[2:].min() > scores[:2].max()
    # the thresholds come from the same validation maps
    val_scores = d.predict(val_images, maps="none").scores
    assert d.threshold_ == pytest.approx(float(np.quantile(val_scores, 0.99, method="higher")), rel=1e-5)


def test_without_validation_images_the_training_images_normalise(images):
    d = pyad.UninformedStudents(**{**TINY, "validation": 0}).fit(images[0])
    assert d.normalisation_.startswith("12 training images") and d.threshold_ is None
    np.testing.assert_allclose(d.stats_[0], _stats(d, images[0], 0), rtol=1e-4)


def test_train_crop_and_resume(images, tmp_path, monkeypatch):
    train = images[0]
    params = {**TINY, "train_crop": 16, "max_epochs": 3}
    want = pyad.UninformedStudents(**params).fit(train)
    assert pyad.clone(want, train_crop=None).fit(train).history_[0]["loss"] != want.history_[0]["loss"]
    real = training.Run.save_checkpoint
    path = tmp_path / "ck.pyad"

    def interrupting(self):
        real(self)
        if self.epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(training.Run, "save_checkpoint", interrupting)
    with pytest.raises(KeyboardInterrupt):
        pyad.UninformedStudents(**params).fit(train, checkpoint=path)
    monkeypatch.setattr(training.Run, "save_checkpoint", real)
    got = pyad.UninformedStudents(**params).fit(train, checkpoint=path)
    for k in want.networks_:
        for a, b in zip(want.networks_[k].state_dict().values(), got.networks_[k].state_dict().values()):
            assert torch.equal(a, b), k
    np.testing.assert_array_equal(want.stats_, got.stats_)


def test_distilled_teacher_file_round_trip_and_use(images, tmp_path):
    folder = tmp_path / "natural"
    folder.mkdir()
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (50 + 7 * i, 60, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    kw = dict(patch_size=17, backbone="resnet18", weights=None, width=4, dim=8, steps=3, batch_size=4)
    rec = U.distill_patch_teacher(folder, tmp_path / "t17.pyad", **kw)
    assert rec["steps"] == 3 and rec["out_dim"] == 512 and set(rec["final_loss"]) == {"distillation", "compactness"}
    net, meta = U.load_patch_teacher(tmp_path / "t17.pyad")
    assert (meta["patch_size"], meta["width"], meta["dim"]) == (17, 4, 8)
    # resuming a distillation from its checkpoint gives the uninterrupted result
    U.distill_patch_teacher(folder, tmp_path / "a.pyad", **{**kw, "steps": 2}, checkpoint=tmp_path / "ck.pyad")
    U.distill_patch_teacher(folder, tmp_path / "b.pyad", **kw, checkpoint=tmp_path / "ck.pyad")
    resumed, _ = U.load_patch_teacher(tmp_path / "b.pyad")
    for a, b in zip(net.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    d = pyad.UninformedStudents(**{**TINY, "patch_sizes": (17,), "teachers": (str(tmp_path / "t17.pyad"),)})
    d.fit(images[0])
    for a, b in zip(net.state_dict().values(), d.networks_["teacher17"].state_dict().values()):
        assert torch.equal(a, b)
    assert d.teacher_records_[0]["patch_size"] == 17
    with pytest.raises(ValueError, match="teachers: .* width 4 .* expected p=17, width 6"):
        pyad.UninformedStudents(**{**TINY, "patch_sizes": (17,), "width": 6,
                                   "teachers": (str(tmp_path / "t17.pyad"),)}).fit(images[0])


def test_distill_teacher_command(tmp_path):
    from PIL import Image

    from pyad.cli import main

    folder = tmp_path / "natural"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 50, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "t33.pyad"
    argv = ["distill-teacher", str(folder), "--out", str(out), "--method", "uninformed_students", "--patch-size", "33",
            "--weights", "none", "--width", "4", "--dim", "8", "--steps", "2", "--batch-size", "4", "--quiet"]
    assert main(argv) == 0
    net, meta = U.load_patch_teacher(out)
    assert (meta["patch_size"], meta["backbone"], meta["layer"], meta["steps"], meta["lr"]) == (33, "resnet18", "layer4",
                                                                                                2, 2e-4)
    assert main(argv[:-1] + ["--layers", "layer3,layer4", "--quiet"]) == 2  # one pooled layer


def test_bad_parameters_name_the_argument(images):
    for kw, name in ((dict(teachers=None), "teachers"), (dict(teachers=("a.pyad",)), "teachers"),
                     (dict(teachers=("missing1", "missing2")), "teachers"), (dict(patch_sizes=(17, 30)), "patch_sizes"),
                     (dict(n_students=1), "n_students"), (dict(train_crop=41), "train_crop"),
                     (dict(patch_sizes=(65,), image_size=32), "image_size")):
        with pytest.raises(ValueError, match=name):
            pyad.UninformedStudents(**{**TINY, **kw}).fit(images[0])
    with pytest.raises(ValueError, match="patch_size"):
        U.distill_patch_teacher([], "x.pyad", patch_size=20)
