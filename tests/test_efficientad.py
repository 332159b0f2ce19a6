"""EfficientAD-S/-M and teacher distillation on tiny inputs: the networks against
the reference's own definitions (nelson1425/EfficientAD @fcab514 ``common.py``,
copied below, Apache-2.0), sizes, each loss against its formula, hard-feature
mining, exact quantiles, the quantile normalisation, the pad-4 alignment, the
teacher key layouts, validation-only normalisation, resuming, penalty images and
``distill_teacher``."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import pyad
from pyad import training
from pyad.detectors import efficientad as E


# -- the reference networks, verbatim from nelson1425/EfficientAD common.py (l.6-101) -------------------------
def ref_autoencoder(out_channels=384):
    return nn.Sequential(
        nn.Conv2d(in_channels=3, out_channels=32, kernel_size=4, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(in_channels=32, out_channels=32, kernel_size=4, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(in_channels=32, out_channels=64, kernel_size=4, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(in_channels=64, out_channels=64, kernel_size=4, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(in_channels=64, out_channels=64, kernel_size=4, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(in_channels=64, out_channels=64, kernel_size=8),
        nn.Upsample(size=3, mode='bilinear'),
        nn.Conv2d(in_channels=64, out_channels=64, kernel_size=4, stride=1, padding=2), nn.ReLU(inplace=True),
        nn.Dropout(0.2),
        nn.Upsample(size=8, mode='bilinear'),
        nn.Conv2d(in_channels=64, out_channels=64, kernel_size=4, stride=1, padding=2), nn.ReLU(inplace=True),
        nn.Dropout(0.2),
        nn.Upsample(size=15, mode='bilinear'),
        nn.Conv2d(in_channels=64, out_channels=64, kernel_size=4, stride=1, padding=2), nn.ReLU(inplace=True),
        nn.Dropout(0.2),
        nn.Upsample(size=32, mode='bilinear'),
        nn.Conv2d(in_channels=64, out_channels=64, kernel_size=4, stride=1, padding=2), nn.ReLU(inplace=True),
        nn.Dropout(0.2),
        nn.Upsample(size=63, mode='bilinear'),
        nn.Conv2d(in_channels=64, out_channels=64, kernel_size=4, stride=1, padding=2), nn.ReLU(inplace=True),
        nn.Dropout(0.2),
        nn.Upsample(size=127, mode='bilinear'),
        nn.Conv2d(in_channels=64, out_channels=64, kernel_size=4, stride=1, padding=2), nn.ReLU(inplace=True),
        nn.Dropout(0.2),
        nn.Upsample(size=56, mode='bilinear'),
        nn.Conv2d(in_channels=64, out_channels=64, kernel_size=3, stride=1, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(in_channels=64, out_channels=out_channels, kernel_size=3, stride=1, padding=1)
    )


def ref_pdn_small(out_channels=384, padding=False):
    pad_mult = 1 if padding else 0
    return nn.Sequential(
        nn.Conv2d(in_channels=3, out_channels=128, kernel_size=4, padding=3 * pad_mult), nn.ReLU(inplace=True),
        nn.AvgPool2d(kernel_size=2, stride=2, padding=1 * pad_mult),
        nn.Conv2d(in_channels=128, out_channels=256, kernel_size=4, padding=3 * pad_mult), nn.ReLU(inplace=True),
        nn.AvgPool2d(kernel_size=2, stride=2, padding=1 * pad_mult),
        nn.Conv2d(in_channels=256, out_channels=256, kernel_size=3, padding=1 * pad_mult), nn.ReLU(inplace=True),
        nn.Conv2d(in_channels=256, out_channels=out_channels, kernel_size=4)
    )


def ref_pdn_medium(out_channels=384, padding=False):
    pad_mult = 1 if padding else 0
    return nn.Sequential(
        nn.Conv2d(in_channels=3, out_channels=256, kernel_size=4, padding=3 * pad_mult), nn.ReLU(inplace=True),
        nn.AvgPool2d(kernel_size=2, stride=2, padding=1 * pad_mult),
        nn.Conv2d(in_channels=256, out_channels=512, kernel_size=4, padding=3 * pad_mult), nn.ReLU(inplace=True),
        nn.AvgPool2d(kernel_size=2, stride=2, padding=1 * pad_mult),
        nn.Conv2d(in_channels=512, out_channels=512, kernel_size=1), nn.ReLU(inplace=True),
        nn.Conv2d(in_channels=512, out_channels=512, kernel_size=3, padding=1 * pad_mult), nn.ReLU(inplace=True),
        nn.Conv2d(in_channels=512, out_channels=out_channels, kernel_size=4), nn.ReLU(inplace=True),
        nn.Conv2d(in_channels=out_channels, out_channels=out_channels, kernel_size=1)
    )


def n_params(net):
    return sum(p.numel() for p in net.parameters())


# -- networks and sizes -------------------------------------------------------------------------------------------
def test_parameter_counts_and_reference_layouts():
    with torch.device("meta"):
        nets = {"ts": E.pdn_small(), "ss": E.pdn_small(768), "tm": E.pdn_medium(), "sm": E.pdn_medium(768),
                "ae": E.autoencoder()}
        refs = {"ts": ref_pdn_small(), "ss": ref_pdn_small(768), "tm": ref_pdn_medium(), "sm": ref_pdn_medium(768),
                "ae": ref_autoencoder()}
    assert [n_params(nets[k]) for k in ("ts", "ss", "tm", "sm", "ae")] == [2_694_144, 4_267_392, 8_026_624,
                                                                             11_615_488, 1_096_320]
    for k in nets:  # the same keys and shapes: reference state_dicts load unchanged
        shapes = {n: t.shape for n, t in nets[k].state_dict().items()}
        assert shapes == {n: t.shape for n, t in refs[k].state_dict().items()}
    assert list(E.pdn_small().state_dict())[::2] == ["0.weight", "3.weight", "6.weight", "8.weight"]


@pytest.mark.parametrize("size", [256, 128, 100, 64])
@pytest.mark.parametrize("padding", [False, True])
def test_output_sizes(size, padding):
    x = torch.zeros(1, 3, size, size, device="meta")
    with torch.device("meta"):
        for net in (E.pdn_small(384, padding), E.pdn_medium(768, padding)):
            assert net(x).shape[-1] == E.pdn_output_size(size, padding)
        m = E.pdn_output_size(size, padding)
        assert E.autoencoder(384, size, m)(x).shape == (1, 384, m, m)
    if size == 256:
        assert E.pdn_output_size(256, padding) == (64 if padding else 56)
    assert E.decoder_sizes(256, 56) == (3, 8, 15, 32, 63, 127, 56)  # common.py l.26-56


def test_networks_compute_what_the_reference_computes():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 256, 256)
    ae, ref = E.autoencoder(), ref_autoencoder()
    ref.load_state_dict(ae.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ae.eval()(x), ref.eval()(x), rtol=0, atol=0)
        small = x[:, :, :72, :72]
        pairs = ((E.pdn_small(384), ref_pdn_small(384)), (E.pdn_medium(768, True), ref_pdn_medium(768, True)))
        for mine, theirs in pairs:
            theirs.load_state_dict(mine.state_dict())
            torch.testing.assert_close(mine(small), theirs(small), rtol=0, atol=0)


# -- quantiles and the losses -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 7, 1000, 3 * 56 * 56, 384 * 14 * 14])
@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 0.995, 0.999, 1.0])
def test_quantile_equals_torch_quantile(n, q):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    assert E.quantile(x, q).item() == torch.quantile(x, q).item()
    x[: n // 2] = 0.25  # ties
    assert E.quantile(x, q).item() == torch.quantile(x, q).item()


def test_quantile_beyond_torch_limit_is_exact():
    n = (1 << 24) + 12345  # torch.quantile refuses this (nelson1425/EfficientAD#40)
    x = torch.rand(n, generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError):
        torch.quantile(x, 0.9)
    for q in (0.995,):
        rank = torch.tensor(q) * (n - 1)
        lo = int(rank)
        below = torch.kthvalue(x, lo + 1).values
        above = torch.kthvalue(x, min(lo + 2, n)).values
        assert E.quantile(x, q).item() == torch.lerp(below, above, rank - lo).item()


def test_hard_feature_mining_selects_exactly_the_elements_at_or_above_the_quantile():
    d = torch.rand(1, 384, 9, 9, generator=torch.Generator().manual_seed(2)).requires_grad_()
    d.data[0, :5] = d.data[0, :5].clamp(min=0.9995)  # ties at the top
    loss = E.hard_loss(d, 0.999)
    thr = torch.quantile(d.detach(), 0.999)
    chosen = d.detach() >= thr
    torch.testing.assert_close(loss, d.detach()[chosen].mean(), rtol=0, atol=0)
    loss.backward()
    expect = torch.where(chosen, 1.0 / chosen.sum(), 0.0)
    torch.testing.assert_close(d.grad, expect)


def _reference_losses(student, ae, t_st, t_ae, x_st, x_ae, x_p):
    """efficientad.py l.177-198 as written there."""
    out_channels = 384
    student_output_st = student(x_st)[:, :out_channels]
    distance_st = (t_st - student_output_st) ** 2
    d_hard = torch.quantile(distance_st, q=0.999)
    loss_hard = torch.mean(distance_st[distance_st >= d_hard])
    if x_p is not None:
        student_output_penalty = student(x_p)[:, :out_channels]
        loss_penalty = torch.mean(student_output_penalty**2)
        loss_st = loss_hard + loss_penalty
    else:
        loss_st = loss_hard
    ae_output = ae(x_ae)
    student_output_ae = student(x_ae)[:, out_channels:]
    distance_ae = (t_ae - ae_output)**2
    distance_stae = (ae_output - student_output_ae)**2
    loss_ae = torch.mean(distance_ae)
    loss_stae = torch.mean(distance_stae)
    return loss_st + loss_ae + loss_stae, loss_ae, loss_stae


@pytest.mark.parametrize("penalty,model_size", [(False, "s"), (True, "s"), (True, "m")])
def test_step_losses_and_gradients_equal_the_reference_formulas(penalty, model_size, monkeypatch):
    # the formulas, on the same convolution arithmetic as the reference (test_winograd.py tests the
    # Winograd training path's gradients): another rounding flips the ReLU of the few activations
    # within ~1e-6 of zero, and the hard-feature loss's sparse gradient (25 elements here) can pass
    # through one of them: measured, M's second layer's bias gradient then differs by 0.8% of its
    # scale (direct float32 against float64 arithmetic flips such activations too, more rarely)
    monkeypatch.setenv("PYAD_WINOGRAD", "0")
    torch.manual_seed(3)
    size = 64
    m = E.pdn_output_size(size, False)
    student, ae = E.pdn(model_size, 768), E.autoencoder(384, size, m).eval()  # eval: no dropout, comparable
    x_st, x_ae, x_p = torch.randn(3, 1, 3, size, size)
    t_st, t_ae = torch.randn(2, 1, 384, m, m)
    mine = E.step_losses(student, ae, t_st, t_ae, x_st, x_ae, x_p if penalty else None)
    mine["total"].backward()
    got = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    ae.zero_grad()
    total, l_ae, l_stae = _reference_losses(student, ae, t_st, t_ae, x_st, x_ae, x_p if penalty else None)
    total.backward()
    torch.testing.assert_close(mine["total"], total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine["ae"], l_ae, rtol=1e-6, atol=0)
    torch.testing.assert_close(mine["stae"], l_stae, rtol=1e-5, atol=1e-7)
    for g, p in zip(got, student.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)


def test_color_jitter_matches_torchvision_formulas():
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    grey = 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    torch.testing.assert_close(E.color_jitter(x, 0, 1.2), (1.2 * x).clamp(0, 1))
    torch.testing.assert_close(E.color_jitter(x, 1, 0.8), (0.8 * x + 0.2 * grey.mean()).clamp(0, 1))
    torch.testing.assert_close(E.color_jitter(x, 2, 1.1), (1.1 * x - 0.1 * grey).clamp(0, 1))
    kinds = [E.jitter_choice(0, s) for s in range(300)]
    assert {k for k, _ in kinds} == {0, 1, 2} and all(0.8 <= f <= 1.2 for _, f in kinds)
    assert E.jitter_choice(0, 5) == E.jitter_choice(0, 5) != E.jitter_choice(1, 5)


# -- teacher layouts ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["s", "m"])
def test_teacher_key_layouts(size):
    ref = E.pdn(size).state_dict()
    named = {E.anomalib_key(k, size): v for k, v in ref.items()}
    assert list(named)[:2] == ["conv1.weight", "conv1.bias"]
    for state in (ref, named, {f"teacher.{k}": v for k, v in named.items()},
                  {**{f"model.teacher.{k}": v for k, v in named.items()},
                   "model.student.conv1.weight": ref["0.weight"]},
                  {"state_dict": ref}):
        out = E.teacher_state(state, size)
        assert list(out) == list(ref) and all(torch.equal(out[k], ref[k]) for k in ref)
    other = "m" if size == "s" else "s"
    with pytest.raises(ValueError, match=f"model_size='{size}'"):
        E.teacher_state(ref, other)
    bad = dict(ref)
    bad["0.weight"] = bad["0.weight"][:, :, :3]
    with pytest.raises(ValueError, match="'0.weight' has shape"):
        E.teacher_state(bad, size)
    with pytest.raises(ValueError, match="expected a state_dict"):
        E.teacher_state([1, 2], size)


def test_teacher_files_in_both_layouts_load_and_the_pretrained_one_is_checked(tmp_path, monkeypatch):
    train = _images(6, 64, seed=5)
    ref = E.pdn("s").state_dict()
    torch.save({E.anomalib_key(k, "s"): v for k, v in ref.items()}, tmp_path / "anomalib.pth")
    d = pyad.EfficientAD(teacher=tmp_path / "anomalib.pth", image_size=64, max_steps=1).fit(train)
    assert all(torch.equal(d.networks_["teacher"].state_dict()[k], ref[k]) for k in ref)
    assert d.teacher_source_.endswith("anomalib.pth")
    torch.save(E.pdn("s"), tmp_path / "module.pth")  # a pickled module is refused, not executed
    with pytest.raises(ValueError, match="not a torch state_dict file"):
        pyad.EfficientAD(teacher=tmp_path / "module.pth", image_size=64, max_steps=1).fit(train)
    with pytest.raises(ValueError, match="no teacher file"):
        pyad.EfficientAD(teacher=tmp_path / "none.pth", image_size=64, max_steps=1).fit(train)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ValueError, match="distill-teacher"):
        pyad.EfficientAD(image_size=64, max_steps=1).fit(train)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(ref, tmp_path / "hub" / "checkpoints" / "nelson1425_efficientad_teacher_small.pth")
    with pytest.raises(ValueError, match="git blob id differs"):
        pyad.EfficientAD(image_size=64, max_steps=1).fit(train)


def test_in_memory_teacher_state_dict_is_recorded_by_hash(tmp_path):
    ref = E.pdn("s").state_dict()
    d = pyad.EfficientAD(teacher=ref, image_size=64, max_steps=1).fit(_images(6, 64, seed=6))
    d.save(tmp_path / "m.pyad")
    back = pyad.load(tmp_path / "m.pyad")
    assert back.teacher == f"state_dict {d.teacher_id_}" and back.teacher_source_ == "state_dict (in memory)"
    assert torch.equal(back.networks_["teacher"].state_dict()["0.weight"], ref["0.weight"])
    with pytest.raises(ValueError, match="in-memory state_dict"):
        pyad.clone(back).fit(_images(6, 64, seed=6))


# -- a fitted tiny detector --------------------------------------------------------------------------------------------
def _images(n, size, seed=0, lo=80, hi=170):
    rng = np.random.default_rng(seed)
    base = rng.integers(lo, hi, (1, size, size, 3))
    return np.clip(base + rng.integers(-12, 12, (n, size, size, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def fitted():
    train = _images(10, 64)
    det = pyad.EfficientAD(teacher="random", image_size=64, max_steps=4, batch_size=4, seed=1).fit(train)
    return det, train


def _reference_maps(det, x):
    """efficientad.py predict() (l.300-316) with the fitted networks, then pad 4 and resize (l.279-281)."""
    nets = det.networks_
    mean, std = det.teacher_mean_[None, :, None, None], det.teacher_std_[None, :, None, None]
    with torch.no_grad():
        t = (nets["teacher"](x) - mean) / std
        s = nets["student"](x)
        a = nets["autoencoder"](x)
    map_st = torch.mean((t - s[:, :384]) ** 2, dim=1, keepdim=True)
    map_ae = torch.mean((a - s[:, 384:]) ** 2, dim=1, keepdim=True)
    return map_st, map_ae


def test_quantile_normalisation_from_validation_images_and_the_folded_module(fitted):
    det, train = fitted
    # the held-out images: the seeded validation split of fit
    rng = np.random.default_rng(det.seed)
    held = np.zeros(len(train), bool)
    held[rng.choice(len(train), int(round(len(train) * det.validation)), replace=False)] = True
    x_val = det.to_input(torch.from_numpy(train[held]))
    st, ae = _reference_maps(det, x_val)
    q = det.quantiles_
    # fit runs the networks through ops.sequential (Winograd on the CPU: rounding ~1e-7 relative here)
    close = lambda a, b: a == pytest.approx(b, rel=1e-5)  # noqa: E731
    assert close(q["qa_st"], torch.quantile(st, 0.9).item()) and close(q["qb_st"], torch.quantile(st, 0.995).item())
    assert close(q["qa_ae"], torch.quantile(ae, 0.9).item()) and close(q["qb_ae"], torch.quantile(ae, 0.995).item())
    assert f"{held.sum()} normal validation images" in det.map_normalisation_

    x = det.to_input(torch.from_numpy(_images(3, 64, seed=9)))
    st, ae = _reference_maps(det, x)
    st = 0.1 * (st - q["qa_st"]) / (q["qb_st"] - q["qa_st"])
    ae = 0.1 * (ae - q["qa_ae"]) / (q["qb_ae"] - q["qa_ae"])
    combined = F.pad(0.5 * st + 0.5 * ae, (4, 4, 4, 4))
    want = F.interpolate(combined, (64, 64), mode="bilinear", align_corners=False)[:, 0]
    with torch.no_grad():
        scores, maps = det.inference_module()(x)
    scale = float(want.abs().max())
    torch.testing.assert_close(maps, want, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(scores, want.amax(dim=(1, 2)), rtol=1e-4, atol=1e-5 * scale)


def test_stages_and_history(fitted):
    det, train = fitted
    times = {}
    det.predict(train[:2], stage_times=times)
    assert {"teacher", "student", "autoencoder", "map"} <= set(times)
    assert det.history_[-1]["step"] == 4 and set(det.history_[-1]) == {"step", "total", "hard", "ae", "stae"}
    assert det.penalty_source_.startswith("none") and det.steps_done_ == 4
    assert det.teacher_mean_.shape == (384,) and (det.teacher_std_ > 0).all()


def test_teacher_statistics_are_the_reference_two_pass_ones(fitted):
    det, train = fitted
    rng = np.random.default_rng(det.seed)
    held = np.zeros(len(train), bool)
    held[rng.choice(len(train), int(round(len(train) * det.validation)), replace=False)] = True
    with torch.no_grad():
        outs = [det.networks_["teacher"](det.to_input(torch.from_numpy(a[None]))) for a in train[~held]]
    mean = torch.stack([o.mean(dim=[0, 2, 3]) for o in outs]).mean(0)
    var = torch.stack([((o - mean[None, :, None, None]) ** 2).mean(dim=[0, 2, 3]) for o in outs]).mean(0)
    torch.testing.assert_close(det.teacher_mean_, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(det.teacher_std_, var.sqrt(), rtol=1e-5, atol=1e-6)


def test_without_validation_images_the_training_images_normalise_and_it_says_so():
    d = pyad.EfficientAD(teacher="random", image_size=64, max_steps=1, validation=0.0).fit(_images(4, 64))
    assert "training images (no validation images" in d.map_normalisation_


def test_pad4_alignment_a_defect_lands_where_it_is():
    """Teacher and student identical except for the student's response to the red
    channel, which is 0 (normalised) everywhere but in a defect square: the ST map
    is exactly 0 wherever no receptive field touches the defect. After the pad by 4
    and the resize the map's centre of mass sits on the defect (within the 1.5 px
    of the bilinear grid); stretching the unpadded map instead moves it by ~8 px."""
    size = 128
    torch.manual_seed(0)
    nets = pyad.EfficientAD(teacher="random", image_size=size)._networks()
    t, s, a = nets["teacher"], nets["student"], nets["autoencoder"]
    with torch.no_grad():
        for i in (0, 3, 6):
            s[i].weight.copy_(t[i].weight)
            s[i].bias.copy_(t[i].bias)
        s[0].weight[:, 0] += 0.5  # the student reacts differently to red only
        s[8].weight.zero_()
        s[8].bias.zero_()
        s[8].weight[:384] = t[8].weight  # ST half = the teacher's output; AE half = 0
        s[8].bias[:384] = t[8].bias
        a[-1].weight.zero_()
        a[-1].bias.zero_()  # autoencoder = 0 = the student's AE half: M_AE = 0
    q = {"qa_st": 0.0, "qb_st": 0.1, "qa_ae": 0.0, "qb_ae": 0.1}  # map = 0.5 M_ST
    padded = E.EfficientADModule(t, s, a, torch.zeros(384), torch.ones(384), q, size, (4, 4))
    stretched = E.EfficientADModule(t, s, a, torch.zeros(384), torch.ones(384), q, size, (0, 0))
    grid = torch.arange(size, dtype=torch.float64)

    def centre(m):
        m = m[0].double()
        return float((m.sum(1) * grid).sum() / m.sum()), float((m.sum(0) * grid).sum() / m.sum())

    rng = torch.Generator().manual_seed(1)
    for lo in (24, 88):
        x = torch.zeros(1, 3, size, size)
        x[:, 1:] = torch.randn(1, 2, size, size, generator=rng) * 0.5
        x[0, 0, lo : lo + 16, lo : lo + 16] = 2.0
        with torch.no_grad():
            m_st, _ = padded.raw_maps(x)
            # untouched rows: 0 up to rounding (Winograd's GEMMs for the teacher's 384 and the student's 768
            # output channels may round differently: 1e-17 here; the defect's reach would be ~1e-1)
            assert (m_st[0, : max(0, (lo - 32) // 4 - 1)] <= 1e-9 * m_st.max()).all()
            cy, cx = centre(padded(x)[1])
            sy, sx = centre(stretched(x)[1])
        want = lo + 7.5
        assert abs(cy - want) <= 3 and abs(cx - want) <= 3, (lo, cy, cx)
        assert abs(sy - want) >= 6 and abs(sx - want) >= 6, (lo, sy, sx)


# -- resume, penalty, determinism ---------------------------------------------------------------------------------
def test_training_resumes_from_a_checkpoint_to_the_same_state(tmp_path, monkeypatch):
    train = _images(8, 64, seed=7)
    kw = dict(teacher="random", image_size=64, max_steps=4, seed=2)
    straight = pyad.EfficientAD(**kw).fit(train)
    real_init = training.Run.__init__

    def every_step(self, *a, **k):
        k["checkpoint_every"] = 0.0
        real_init(self, *a, **k)

    monkeypatch.setattr(training.Run, "__init__", every_step)
    calls = {"n": 0}
    real_losses = E.step_losses

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # during step 3 of 4: the checkpoint holds 2 steps
            raise KeyboardInterrupt
        return real_losses(*a, **k)

    monkeypatch.setattr(E, "step_losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pyad.EfficientAD(**kw).fit(train, checkpoint=tmp_path / "ck")
    calls["n"] = -100  # counting only
    resumed = pyad.EfficientAD(**kw).fit(train, checkpoint=tmp_path / "ck")
    assert calls["n"] == -98  # steps 3 and 4 only: it resumed
    for k in ("student", "autoencoder"):
        a, b = straight.networks_[k].state_dict(), resumed.networks_[k].state_dict()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert straight.quantiles_ == resumed.quantiles_


def test_penalty_images_from_a_folder(tmp_path):
    folder = tmp_path / "natural" / "class_a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(8)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (50 + i, 70, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    pen = E.PenaltyImages(tmp_path / "natural", 64, 0)
    img = pen.load(0)
    with Image.open(pen.files[pen.index(0)]) as im:
        big = np.asarray(im.convert("RGB").resize((128, 128), Image.BILINEAR))
    crop = big[32:96, 32:96]
    assert img.shape == (64, 64, 3)
    grey = np.asarray(Image.fromarray(crop).convert("L").convert("RGB"))
    assert np.array_equal(img, crop) or np.array_equal(img, grey)  # RandomGrayscale(0.3)
    drawn = [pen.index(s) for s in range(6)]
    assert sorted(drawn[:3]) == [0, 1, 2] and sorted(drawn[3:]) == [0, 1, 2]  # each pass sees every image
    d = pyad.EfficientAD(teacher="random", image_size=64, max_steps=2, penalty_images=tmp_path / "natural")
    d.fit(_images(6, 64))
    assert d.penalty_source_.startswith("3 images from") and "penalty" in d.history_[-1]
    d.save(tmp_path / "m.pyad")
    assert pyad.load(tmp_path / "m.pyad").penalty_source_ == d.penalty_source_
    with pytest.raises(ValueError, match="penalty_images"):
        pyad.EfficientAD(teacher="random", image_size=64, max_steps=1, penalty_images=tmp_path / "nothing").fit(
            _images(6, 64))


def test_parameter_errors():
    train = _images(4, 64)
    for kw, name in ((dict(model_size="l"), "model_size"), (dict(teacher=3), "teacher"),
                     (dict(map_quantiles=(0.9, 0.5)), "map_quantiles"), (dict(hard_quantile=1.0), "hard_quantile"),
                     (dict(precision="float16"), "precision"), (dict(early_stopping_patience=3), "early_stopping_patience"),
                     (dict(image_size=48), "image_size")):
        with pytest.raises(ValueError, match=name):
            pyad.EfficientAD(**{"teacher": "random", "max_steps": 1, "image_size": 64, **kw}).fit(train)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_fp16_inference_close_to_fp32(fitted, tmp_path):
    det, train = fitted
    want = det.predict(train[:4]).maps
    det.save(tmp_path / "m.pyad")
    gpu = pyad.load(tmp_path / "m.pyad").set_params(device="cuda", precision="float16")
    got = gpu.predict(train[:4]).maps
    assert gpu.inference_module().dtype == torch.float16
    np.testing.assert_allclose(got, want, atol=2e-2 * float(np.abs(want).max()))



def test_cpu_bfloat16_inference_close_to_fp32_and_exports_float32(fitted, tmp_path):
    """precision="bfloat16" on the CPU runs the three networks in bfloat16 (maps in
    float32, close to float32's), may be set on a fitted model, is saved with it, and
    its ONNX export is the float32 graph (the metadata's precision)."""
    det, train = fitted
    want = det.predict(train[:4]).maps
    det.save(tmp_path / "m.pyad")
    low = pyad.load(tmp_path / "m.pyad").set_params(precision="bfloat16")
    module = low.inference_module()
    assert module.dtype == torch.bfloat16 and next(module.teacher.parameters()).dtype == torch.bfloat16
    got = low.predict(train[:4]).maps
    assert got.dtype == np.float32 and not np.array_equal(got, want)  # reduced, not float32
    np.testing.assert_allclose(got, want, atol=3e-2 * float(np.abs(want).max()))
    low.save(tmp_path / "low.pyad")
    assert pyad.load(tmp_path / "low.pyad").precision == "bfloat16"
    pytest.importorskip("onnxruntime")
    low.export(tmp_path / "m.onnx")
    onnx_det = pyad.load(tmp_path / "m.onnx")
    assert onnx_det.precision_ == "float32"
    np.testing.assert_allclose(onnx_det.predict(train[:4]).maps, want, rtol=1e-4,
                               atol=1e-4 * float(np.abs(want).max()))
    assert low.precision == "bfloat16" and low.inference_module() is module  # the export left it as it was

# -- distillation ---------------------------------------------------------------------------------------------------
def _natural(tmp_path, n=6):
    folder = tmp_path / "natural"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(11)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40 + i, 60, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _ref_embed(feats, out_channels=384):
    """pretraining.py FeatureExtractor.embed (l.195-245) for two layers, verbatim in effect."""
    def patchify(x):
        unf = torch.nn.Unfold(kernel_size=3, stride=1, padding=1, dilation=1)(x)
        u = unf.reshape(*x.shape[:2], 3, 3, -1).permute(0, 4, 1, 2, 3)
        return u, list(x.shape[-2:])

    out = [patchify(f) for f in feats]
    shapes = [o[1] for o in out]
    out = [o[0] for o in out]
    ref = shapes[0]
    f = out[1].reshape(out[1].shape[0], shapes[1][0], shapes[1][1], *out[1].shape[2:])
    f = f.permute(0, -3, -2, -1, 1, 2)
    base = f.shape
    f = f.reshape(-1, *f.shape[-2:])
    f = F.interpolate(f.unsqueeze(1), size=(ref[0], ref[1]), mode="bilinear", align_corners=False).squeeze(1)
    f = f.reshape(*base[:-2], ref[0], ref[1]).permute(0, -2, -1, 1, 2, 3)
    out[1] = f.reshape(len(f), -1, *f.shape[-3:])
    out = [x.reshape(-1, *x.shape[-3:]) for x in out]
    mapped = torch.stack([F.adaptive_avg_pool1d(x.reshape(len(x), 1, -1), 1024).squeeze(1) for x in out], dim=1)
    agg = F.adaptive_avg_pool1d(mapped.reshape(len(mapped), 1, -1), out_channels).reshape(len(mapped), -1)
    return agg.reshape(-1, ref[0], ref[1], out_channels).permute(0, 3, 1, 2)


def test_distillation_backbone_has_its_batchnorms_folded_to_the_same_taps():
    """The frozen EfficientNet of distill-teacher runs with every BatchNorm folded into
    its convolution: none is left, and the folded network gives the unfolded one's taps
    (non-trivial BatchNorm statistics, so a wrong fold would show)."""
    import copy

    from pyad import efficientnet as EN
    from pyad.backbones import fold_batchnorm
    from pyad.distill import backbone_network

    net = backbone_network("efficientnet_lite0", ("layer2", "layer3"), None, 128)[0]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    plain = EN.build("efficientnet_lite0", taps=("layer2", "layer3"), weights=None, image_size=128).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    folded = fold_batchnorm(copy.deepcopy(plain))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert n_bn > 10 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 128, 128, generator=g)
    with torch.no_grad():
        want, got = EN.features(plain, x, ("layer2", "layer3")), EN.features(folded, x, ("layer2", "layer3"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4 * float(want[k].abs().max()))


def test_distillation_target_is_the_reference_patchcore_embedding():
    torch.manual_seed(12)
    feats = {"layer2": torch.randn(2, 24, 16, 16), "layer3": torch.randn(2, 40, 8, 8)}
    extractor = pyad.distill.TargetExtractor(lambda x: feats, ("layer2", "layer3"))
    with torch.no_grad():
        got = extractor(torch.zeros(2, 3, 128, 128))
    want = _ref_embed([feats["layer2"], feats["layer3"]])
    assert got.shape == (2, 384, 16, 16)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_distill_teacher_writes_a_loadable_teacher_and_resumes(tmp_path):
    folder = _natural(tmp_path)
    kw = dict(backbone="resnet18", weights=None, image_size=64, batch_size=2, norm_images=4, seed=3)
    rec = pyad.distill_teacher(folder, tmp_path / "t.pth", steps=4, **kw)
    assert rec["steps"] == 4 and rec["images"]["count"] == 6 and rec["grid"] == 16 and rec["backbone_input"] == 128
    assert json.loads((tmp_path / "t.pth.json").read_text())["weights_id"] == "random"
    state = torch.load(tmp_path / "t.pth", weights_only=True)
    assert list(state)[::2] == ["0.weight", "3.weight", "6.weight", "8.weight"]
    d = pyad.EfficientAD(teacher=tmp_path / "t.pth", image_size=64, max_steps=1).fit(_images(6, 64))
    assert torch.equal(d.networks_["teacher"].state_dict()["8.weight"], state["8.weight"])
    # interrupted after 2 steps, continued to 4: the same teacher as the straight run
    pyad.distill_teacher(folder, tmp_path / "a.pth", steps=2, checkpoint=tmp_path / "ck", **kw)
    again = pyad.distill_teacher(folder, tmp_path / "a.pth", steps=4, checkpoint=tmp_path / "ck", **kw)
    assert again["resumed"]
    a = torch.load(tmp_path / "a.pth", weights_only=True)
    for k in state:
        torch.testing.assert_close(a[k], state[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="model_size"):
        pyad.distill_teacher(folder, tmp_path / "x.pth", model_size="x", steps=1, **kw)
    with pytest.raises(ValueError, match="images"):
        pyad.distill_teacher(tmp_path / "empty_nothing", tmp_path / "x.pth", steps=1, **kw)


def test_distill_teacher_cli(tmp_path):
    from pyad.cli import main

    folder = _natural(tmp_path, 3)
    code = main(["distill-teacher", str(folder), "--out", str(tmp_path / "t.pth"), "--backbone", "resnet18",
                 "--weights", "none", "--image-size", "64", "--steps", "1", "--batch-size", "2", "--norm-images", "2",
                 "-q"])
    assert code == 0 and (tmp_path / "t.pth").is_file() and (tmp_path / "t.pth.json").is_file()
