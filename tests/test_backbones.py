"""Backbones: torchvision's layout and sizes, truncation, taps, checkpoints."""

from pathlib import Path

import pytest
import torch

from pyad.backbones import URLS, Backbone

WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights" / "mobilenet_v2_imagenet_from_tflite.pth"

# torchvision's parameter counts (classifier included), from its model docs
PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
    "mobilenet_v2": 3_504_872,
}
HEAD = {"mobilenet_v2": 1280 * 1000 + 1000, "resnet18": 512 * 1000 + 1000, "resnet34": 512 * 1000 + 1000}


@pytest.mark.parametrize("name", sorted(URLS))
def test_full_network_has_torchvision_parameter_count(name):
    deepest = ("features.18",) if name == "mobilenet_v2" else ("layer4",)
    net = Backbone(name, deepest)
    n = sum(p.numel() for p in net.parameters())
    assert n + HEAD.get(name, 2048 * 1000 + 1000) == PARAMS[name]


def test_truncation_builds_only_what_is_tapped():
    full = Backbone("resnet18", ("layer4",))
    short = Backbone("resnet18", ("layer2",))
    assert sum(p.numel() for p in short.parameters()) < sum(p.numel() for p in full.parameters()) / 10
    assert not any(k.startswith("body.layer3") for k in short.state_dict())


def test_taps_and_grey_input():
    net = Backbone("wide_resnet50_2", ("layer3", "layer2"))
    out = net(torch.randn(2, 1, 64, 64))
    assert list(out) == ["layer3", "layer2"]
    assert out["layer2"].shape == (2, 512, 8, 8) and out["layer3"].shape == (2, 1024, 4, 4)
    with pytest.raises(ValueError, match="layers"):
        Backbone("resnet18", ("layer5",))
    with pytest.raises(ValueError, match="backbone"):
        Backbone("vgg16")


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="shared MobileNetV2 checkpoint absent")
def test_real_mobilenet_checkpoint_loads_every_tensor():
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    net = Backbone("mobilenet_v2", ("features.18",), WEIGHTS)
    ours = {k.split(".", 1)[1] for k in net.state_dict()}
    assert ours == {k for k in state if k.startswith("features.")}
    assert net.weights_id == "sha256:7a5f36ebf431c0d220561aee88aa06b94d4c5625d1e9328076f237efe2887568"


def test_missing_weights_are_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint"):
        Backbone("resnet18", ("layer2",), tmp_path / "nope.pth")
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="lacks"):
        Backbone("resnet18", ("layer2",), tmp_path / "partial.pth")


def test_imagenet_weights_offline_error_and_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ValueError, match=r"resnet18-f37072fd\.pth.*hub/checkpoints"):
        Backbone("resnet18", ("layer2",), "imagenet")
    # a checkpoint already in the cache is used without any download
    full = Backbone("resnet18", ("layer4",))
    state = {k.split(".", 1)[1]: v for k, v in full.state_dict().items()}
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)  # the failed attempt made it
    torch.save(state, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    net = Backbone("resnet18", ("layer2",), "imagenet")
    assert net.weights_id.startswith("sha256:")
    torch.testing.assert_close(net.state_dict()["body.conv1.weight"], full.state_dict()["body.conv1.weight"])


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_fused_batchnorm_gives_the_same_features(name):
    import copy

    torch.manual_seed(0)
    net = Backbone(name, ("layer1", "layer2", "layer3"))
    for m in net.modules():  # non-trivial statistics, as in a trained network
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fused = net.frozen()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert not any(p.requires_grad for p in fused.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the original is untouched
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        a, b = net(x), fused(x)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4 * float(a[k].abs().max()))


def test_backbones_are_trainable():
    """Gradients flow and BatchNorm follows train(): a method may fine-tune."""
    torch.manual_seed(0)
    net = Backbone("resnet18", ("layer2",)).train()
    before = net.body["bn1"].running_mean.clone()
    out = net(torch.randn(2, 3, 64, 64))["layer2"]
    out.square().mean().backward()
    assert net.body["conv1"].weight.grad is not None and net.body["conv1"].weight.grad.abs().sum() > 0
    assert not torch.equal(before, net.body["bn1"].running_mean)


def test_checkpoint_of_another_architecture_names_the_right_backbone(tmp_path):
    torch.manual_seed(0)
    r18 = Backbone("resnet18", ("layer4",))
    path = tmp_path / "r18.pth"
    torch.save(r18.official_state_dict(), path)
    with pytest.raises(ValueError, match="looks like a resnet18 checkpoint: pass backbone='resnet18'"):
        Backbone("wide_resnet50_2", ("layer2",), path)
    net = Backbone("resnet18", ("layer2",), path)  # a truncated network takes what it needs
    assert net.weights_id.startswith("sha256:") and net.weights_source == str(path.resolve())


def test_micro_batches_scale_with_the_image_and_split_evenly(monkeypatch):
    # 4 images at 256 px and above; smaller images as many as hold 4 x 256^2 px
    from pyad import backbones

    assert [backbones._micro_batch(torch.zeros(1, 3, s, s)) for s in (512, 256, 128, 33)] == [4, 4, 16, 240]
    net = Backbone("resnet18", ("layer1", "layer2"), None).frozen()
    x = torch.rand(10, 3, 64, 64)
    calls = []
    real = net._run
    monkeypatch.setattr(net, "_run", lambda v: calls.append(len(v)) or real(v))
    monkeypatch.setattr(backbones, "MICRO_BATCH", 1)  # 1 x 256^2 px: 16 images of 64 px
    with torch.no_grad():
        whole = {k: v.contiguous() for k, v in real(x).items()}
        parts = net._taps(x)
        assert calls == [10] and all(torch.equal(parts[k], whole[k]) for k in whole)  # 10 <= 16: whole
        monkeypatch.setattr(backbones, "MICRO_BATCH_PIXELS", 64 * 64 * 3)  # 3 images: 4 parts of 2-3
        parts = net._taps(x)
    assert calls == [10, 2, 3, 2, 3]
    for k in whole:
        torch.testing.assert_close(parts[k], whole[k], rtol=0, atol=1e-5)
