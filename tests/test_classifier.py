"""DefectClassifier and pyad.classification: shapes, focal loss and weighted
cross-entropy against their definitions, balanced class weights, 1 - P(good),
Grad-CAM against autograd, which stages train for each unfreeze option (and that
frozen BatchNorm statistics stay put), the cached frozen prefix, augmentation,
warm-up, stratified splits, labels from folders, thresholds from validation
images, predict_proba, the metrics against scikit-learn, the evaluation hook,
save/load without the weights file, resume. Tiny ResNet-18 / MobileNetV2 at 32-64 px."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import pyad
from pyad import classification as C
from pyad import modelfile, training
from pyad.backbones import Backbone
from pyad.detectors import classifier as K
from conftest import noisy_images

TINY = dict(backbone="resnet18", weights=None, image_size=32, batch_size=4, max_epochs=5, lr=3e-2, augment=False,
            unfreeze="fc")


def painted(n=16, seed=0):
    """Images of three classes: good, a bright square ("spot"), a dark bar ("bar")."""
    train, _ = noisy_images(seed, 32, n, 1, 90, 160, 10)
    labels = [("good", "spot", "bar")[i % 3] for i in range(n)]
    for i, lab in enumerate(labels):
        if lab == "spot":
            train[i, 8:16, 8:16] = 255
        elif lab == "bar":
            train[i, 20:24, 4:28] = 0
    return train, labels


@pytest.fixture(scope="module")
def data():
    return painted(24), painted(9, seed=1)


@pytest.fixture(scope="module")
def small():
    return painted(12, seed=2)


@pytest.fixture(scope="module")
def fitted(data):
    (x, y), _ = data
    return pyad.DefectClassifier(**TINY).fit(x, labels=y)


def test_defaults_follow_the_best_run_of_the_sweep():
    p = pyad.DefectClassifier().get_params()
    assert (p["backbone"], p["weights"], p["unfreeze"], p["augment"], p["batch_size"]) == (
        "resnet50", "imagenet", "fc+layer3+layer4", True, 8)
    assert (p["lr"], p["weight_decay"], p["loss"], p["focal_gamma"], p["focal_alpha"]) == (1e-4, 0.01, "ce", 2.0, 0.25)
    assert (p["image_size"], p["max_epochs"], p["early_stopping_patience"]) == (224, 100, 10)


@pytest.mark.parametrize("name, channels", [("resnet18", 512), ("resnet50", 2048), ("mobilenet_v2", 1280)])
def test_network_shapes(name, channels):
    with torch.device("meta"):
        net = K.ClassifierNet(Backbone(name, (K._FINAL_TAP[K._family_of(name)],)), 4)
    assert net.fc.in_features == channels and net.fc.out_features == 4
    if name == "resnet18":
        net = K.ClassifierNet(Backbone(name, ("layer4",)), 4).eval()
        logits, feats = net(torch.rand(2, 3, 64, 64))
        assert logits.shape == (2, 4) and feats.shape == (2, 512, 2, 2)


def test_focal_loss_against_its_definition():
    g = torch.Generator().manual_seed(0)
    logits, t = torch.randn(6, 4, generator=g), torch.tensor([0, 1, 2, 3, 1, 0])
    w = torch.tensor([0.5, 1.0, 2.0, 4.0])
    p = torch.softmax(logits.double(), 1).numpy()
    for weight in (None, w):
        want = np.mean([0.25 * (1.0 if weight is None else float(w[k])) * (1 - p[i, k]) ** 2 * -np.log(p[i, k])
                        for i, k in enumerate(t.tolist())])
        assert K.focal_loss(logits, t, 2.0, 0.25, weight).item() == pytest.approx(want, rel=1e-5)
    # gamma 0, alpha 1: cross-entropy
    assert K.focal_loss(logits, t, 0.0, 1.0).item() == pytest.approx(F.cross_entropy(logits, t).item(), rel=1e-6)


def test_weighted_cross_entropy_and_balanced_weights():
    g = torch.Generator().manual_seed(1)
    logits, t = torch.randn(5, 3, generator=g), torch.tensor([0, 0, 0, 1, 2])
    w = K.balanced_weights(t.numpy(), 3)
    np.testing.assert_allclose(w.numpy(), [5 / (3 * 3), 5 / 3, 5 / 3], rtol=1e-6)  # N / (K n_c)
    from sklearn.utils.class_weight import compute_class_weight

    np.testing.assert_allclose(w.numpy(), compute_class_weight("balanced", classes=np.arange(3), y=t.numpy()), rtol=1e-6)
    p = torch.softmax(logits.double(), 1).numpy()
    wt = w.numpy()[t.numpy()]
    want = (wt * -np.log(p[np.arange(5), t.numpy()])).sum() / wt.sum()
    assert K.cross_entropy(logits, t, w).item() == pytest.approx(want, rel=1e-5)
    assert K.balanced_weights(np.array([0, 0, 2]), 3)[1] == 0  # an absent class


def _module_and_input(k=3, good=1):
    torch.manual_seed(0)
    net = K.ClassifierNet(Backbone("resnet18", ("layer4",)), k).eval()
    return K.ClassifierModule(net, good, 64).eval(), torch.randn(3, 3, 64, 64)


def test_score_is_one_minus_p_good_and_precise_when_tiny():
    module, x = _module_and_input()
    with torch.no_grad():
        scores, maps = module(x)
        p = module.proba(x)
    np.testing.assert_allclose(scores.numpy(), (1 - p[:, 1].double()).numpy(), rtol=1e-5)
    assert maps.shape == (3, 64, 64) and (maps >= 0).all()
    logits = torch.tensor([[0.0, 40.0, -5.0]])  # 1 - P(good) ~ e^-40: rounds to 0 as 1 - p in float32
    lg, bad = logits[:, 1], logits[:, [0, 2]]
    s = torch.sigmoid(torch.logsumexp(bad, 1) - lg)
    assert 0 < s.item() == pytest.approx(np.exp(-40) + np.exp(-45), rel=1e-4)


@pytest.mark.parametrize("k, good", [(3, 1), (2, 0)])
def test_map_is_grad_cam_of_the_anomaly_log_odds(k, good):
    """Grad-CAM computed with autograd (weights = spatial mean of the gradient of
    log P(defect) - log P(good) w.r.t. the last feature map) equals the module's map."""
    module, x = _module_and_input(k, good)
    net = module.net
    feats = net.run_stages(x).detach().float().requires_grad_(True)
    logits = net.head(feats)
    others = [i for i in range(k) if i != good]
    log_odds = torch.logsumexp(logits[:, others], 1) - logits[:, good]
    (grad,) = torch.autograd.grad(log_odds.sum(), feats)
    alpha = grad.mean((2, 3), keepdim=True)  # Grad-CAM eq. 1
    cam = torch.relu((alpha * feats).sum(1))  # eq. 2
    with torch.no_grad():
        _, maps = module(x)
    np.testing.assert_allclose(maps.numpy(), pyad.ops.upsample(cam.detach(), 64).numpy(), rtol=1e-4, atol=1e-6)
    if k == 2:  # binary: CAM with the weight difference (Zhou et al.)
        w = net.fc.weight.detach()
        cam2 = torch.relu(torch.einsum("c,bchw->bhw", w[1 - good] - w[good], feats.detach())) / feats[0, 0].numel()
        np.testing.assert_allclose(cam.detach().numpy(), cam2.numpy(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name, expect", [
    ("resnet18", {"body.conv1": "early", "body.layer2.1.bn2": "early", "body.layer3.0.conv1": "layer3",
                  "body.layer4.1.bn2.weight": "layer4"}),
    ("mobilenet_v2", {"body.features.0.0": "early", "body.features.6.conv.1": "early", "body.features.7.conv.0.1":
                      "layer3", "body.features.13": "layer3", "body.features.14.conv": "layer4", "body.features.18.0":
                      "layer4"}),
])
def test_stage_groups(name, expect):
    fam = K._family_of(name)
    for module, group in expect.items():
        assert K.trainable_group(fam, name, module) == group, module


@pytest.mark.parametrize("unfreeze, trained", [("fc", set()), ("fc+layer3+layer4", {"layer3", "layer4"}),
                                               ("all", {"early", "layer3", "layer4"})])
def test_unfreeze_trains_only_the_chosen_stages(small, unfreeze, trained):
    x, y = small
    det = pyad.DefectClassifier(**{**TINY, "unfreeze": unfreeze, "max_epochs": 1, "lr": 1e-3})
    det.fit(x, labels=y)
    with training.seeded(det.seed):
        init = det._networks()["net"].state_dict()  # the same seeded initial weights
    after = det.networks_["net"].state_dict()
    for key, v in after.items():
        if key.endswith("num_batches_tracked"):
            continue
        changed = not torch.equal(v, init[key])
        group = "fc" if key.startswith("fc.") else K.trainable_group("resnet", "resnet18", key.split(".", 1)[1])
        assert changed == (group == "fc" or group in trained), key  # frozen BN running stats included


def test_train_bn_false_keeps_running_statistics(small):
    x, y = small
    det = pyad.DefectClassifier(**{**TINY, "unfreeze": "fc+layer3+layer4", "max_epochs": 1, "lr": 1e-3,
                                   "train_bn": False}).fit(x, labels=y)
    with training.seeded(det.seed):
        init = det._networks()["net"].state_dict()
    after = det.networks_["net"].state_dict()
    assert all(torch.equal(after[k], init[k]) for k in after if "running_" in k)  # statistics untouched
    assert not torch.equal(after["backbone.body.layer4.1.bn2.weight"], init["backbone.body.layer4.1.bn2.weight"])


def test_frozen_prefix_runs_apart_from_the_rest():
    torch.manual_seed(0)
    net = K.ClassifierNet(Backbone("mobilenet_v2", ("features.18",)), 3).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        whole = net.run_stages(x)
        for cut in (0, 5, 14, 19):
            torch.testing.assert_close(net.run_stages(net.run_stages(x, 0, cut), cut), whole, rtol=1e-5, atol=1e-5)


def test_augmentation():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16)
    same = K.augment(x, g, rotation=0, scale=(1, 1), ratio=(1, 1), jitter=0)
    torch.testing.assert_close(same, x, rtol=1e-5, atol=1e-6)  # the identity at zero ranges
    a = K.augment(x, torch.Generator().manual_seed(5))
    b = K.augment(x, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.shape == x.shape and 0 <= a.min() and a.max() <= 1 and not torch.allclose(a, x)
    bright = K.augment(torch.full((1, 3, 8, 8), 0.5), torch.Generator().manual_seed(1), rotation=0, scale=(1, 1),
                       ratio=(1, 1))  # a flat grey image: only brightness changes it
    assert 0.5 * 0.8 - 1e-6 <= bright.min() and bright.max() <= 0.5 * 1.2 + 1e-6


def test_warmup_and_adamw(small, tmp_path):
    x, y = small
    pyad.DefectClassifier(**{**TINY, "max_epochs": 1, "warmup_epochs": 4, "weight_decay": 0.05}).fit(
        x, labels=y, checkpoint=tmp_path / "c.ckpt")
    _, st = modelfile.read_tree(tmp_path / "c.ckpt")
    group = st["optimizers"]["adamw"]["param_groups"][0]
    assert group["lr"] == pytest.approx(3e-2 * 2 / 4) and group["weight_decay"] == 0.05  # (epoch + 1) / warm-up


def test_stratified_split():
    labels = ["good"] * 20 + ["a"] * 10 + ["b"] * 5 + ["c"] * 2
    tr, va, te = C.stratified_split(labels, test=0.2, validation=0.2, seed=3)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(len(labels)))  # disjoint and complete
    assert len(te) == round(0.2 * 37) and len(va) == round(0.2 * 37)
    lab = np.array(labels)
    for c, n in (("good", 20), ("a", 10), ("b", 5)):
        assert abs((lab[te] == c).sum() - 0.2 * n) <= 1 and abs((lab[va] == c).sum() - 0.2 * n) <= 1
    assert all((lab[tr] == c).any() for c in ("good", "a", "b", "c"))  # every class keeps a training image
    again = C.stratified_split(labels, test=0.2, validation=0.2, seed=3)
    assert all(np.array_equal(p, q) for p, q in zip((tr, va, te), again))
    with pytest.raises(ValueError, match="test"):
        C.stratified_split(labels, test=1.5)


def test_split_of_an_mvtec_layout_holds_out_test_images(tmp_path):
    root = tmp_path / "cat"
    x, y = painted(18)
    for i, (a, lab) in enumerate(zip(x, y)):
        (root / "test" / lab).mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(root / "test" / lab / f"{i:03d}.png")
        if lab != "good":
            (root / "ground_truth" / lab).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((32, 32), 255, np.uint8)).save(root / "ground_truth" / lab / f"{i:03d}_mask.png")
    (root / "train" / "good").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(x[0]).save(root / "train" / "good" / f"{i:03d}.png")
    ds = pyad.datasets.mvtec_ad(root)
    sp = C.split(ds, test=0.3, validation=0.2, extra_good=2)
    assert sp.classes == ["bar", "good", "spot"]
    seen = {str(s.path) for s in sp.train.items} | {str(s.path) for s in sp.validation.items}
    assert not seen & {str(s.path) for s in sp.test.items}
    assert sum(1 for s in sp.train.items if "train" in str(s.path)) == 2  # extra good from train/good
    tds = sp.dataset()
    assert [s.path for s in tds.test] == [s.path for s in sp.test.items]
    folder = C.labelled_folder(root)  # the MVTec layout: test/<class>/ is the labelled set
    assert len(folder) == 18 and set(folder.labels) == {"good", "spot", "bar"}
    det = pyad.DefectClassifier(**{**TINY, "max_epochs": 1}).fit(root)  # fit on the folder itself
    assert det.classes_ == ["bar", "good", "spot"] and det.n_train_ == 18
    from pyad.cli import main  # the CLI's fit passes the labelled folder as it is

    assert main(["fit", "--model", "classifier", "--data", str(root), "--out", str(tmp_path / "c.pyad"), "--backbone",
                 "resnet18", "--weights", "none", "--image-size", "32", "--set", "max_epochs=1", "--quiet"]) == 0
    assert pyad.load(tmp_path / "c.pyad").classes_ == ["bar", "good", "spot"]


def test_labels_are_checked(small):
    x, y = small
    det = pyad.DefectClassifier(**TINY)
    with pytest.raises(ValueError, match="needs labels"):
        det.fit(x)
    with pytest.raises(ValueError, match="at least two classes"):
        det.fit(x, labels=["good"] * len(x))
    with pytest.raises(ValueError, match="no image of the good class"):
        det.fit(x, labels=["a", "b"] * (len(x) // 2))
    with pytest.raises(ValueError, match="one label per training image"):
        det.fit(x, labels=y[:-1])
    with pytest.raises(ValueError, match="class names"):
        det.fit(x, labels=[0.5] * len(x))
    idx = pyad.DefectClassifier(**{**TINY, "max_epochs": 1}).fit(x, labels=[i % 3 for i in range(len(x))])
    assert idx.classes_ == [0, 1, 2] and idx.good_index_ == 0  # indices: 0 is good


def test_predictions_and_validation_thresholds(fitted, data):
    _, (xt, yt) = data
    p = fitted.predict_proba(xt)
    assert p.shape == (9, 3) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert fitted.predict_classes(xt) == [fitted.classes_[i] for i in p.argmax(1)]
    assert np.mean(np.array(fitted.predict_classes(xt)) == np.array(yt)) >= 2 / 3
    np.testing.assert_allclose(fitted.predict(xt).scores, 1 - p[:, fitted.classes_.index("good")], atol=1e-5)
    assert "F1-optimal" in fitted.threshold_rule_ and "labelled validation images" in fitted.threshold_rule_


def test_plain_validation_images_are_normal_ones(small):
    x, y = small
    det = pyad.DefectClassifier(**{**TINY, "max_epochs": 1}).fit(x[:9], labels=y[:9], validation=x[9:])
    assert "3 normal validation images" in det.threshold_rule_
    expl = pyad.DefectClassifier(**{**TINY, "max_epochs": 1}).fit(x[:9], labels=y[:9], validation=(x[9:], y[9:]))
    assert "3 labelled validation images" in expl.threshold_rule_


def test_metrics_against_scikit_learn():
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    rng = np.random.default_rng(0)
    classes = ["bar", "good", "spot", "never"]
    t = rng.choice(classes[:3], 40).tolist()
    p = rng.choice(classes[:3], 40).tolist()
    r = C.report(t, p, classes)
    np.testing.assert_array_equal(r.matrix, confusion_matrix(t, p, labels=classes))
    pr, rc, f1, sup = precision_recall_fscore_support(t, p, labels=classes, zero_division=0)
    np.testing.assert_allclose([r.precision, r.recall, r.f1, r.support], [pr, rc, f1, sup])
    assert r.accuracy == pytest.approx(accuracy_score(t, p))
    assert "| **accuracy** |" in r.to_markdown()


def test_evaluate_hook_and_confusion_picture(fitted, data, tmp_path):
    _, (xt, yt) = data
    files = []
    for i, (a, lab) in enumerate(zip(xt, yt)):
        (tmp_path / "imgs").mkdir(exist_ok=True)
        Image.fromarray(a).save(tmp_path / "imgs" / f"{i}.png")
        files.append(tmp_path / "imgs" / f"{i}.png")
    sp = C.LabelledSplit(C.Labelled([], []), C.Labelled([], []), C.Labelled(files, yt), fitted.classes_)
    rep = pyad.evaluate(fitted, sp.dataset(), out=tmp_path / "out", pictures=False)["split"]
    direct = C.evaluate(fitted, sp)
    assert rep.extra["accuracy"] == direct.accuracy and rep.extra["confusion_matrix"] == direct.matrix.tolist()
    assert (tmp_path / "out" / "split" / "confusion_matrix.png").is_file()
    with Image.open(tmp_path / "out" / "split" / "confusion_matrix.png") as im:
        assert im.size[0] > 100
    with pytest.raises(ValueError, match="were not trained"):
        C.evaluate(fitted, files, ["scratch"] * len(files))


def test_save_load_needs_no_weights_file(small, data, tmp_path):
    x, y = small
    _, (xt, _) = data
    torch.manual_seed(7)
    path = tmp_path / "r18.pth"
    torch.save(Backbone("resnet18", ("layer4",)).official_state_dict(), path)
    det = pyad.DefectClassifier(**{**TINY, "weights": str(path), "max_epochs": 1}).fit(x, labels=y)
    assert det.weights_id_.startswith("sha256:")
    det.save(tmp_path / "m.pyad")
    path.unlink()
    back = pyad.load(tmp_path / "m.pyad")
    assert back.classes_ == det.classes_ and back.good_index_ == det.good_index_
    np.testing.assert_array_equal(back.predict_proba(xt), det.predict_proba(xt))


def test_resume_from_a_checkpoint_reaches_the_same_state(small, data, tmp_path):
    x, y = small
    _, (xt, _) = data
    kw = {**TINY, "augment": True, "max_epochs": 2}
    straight = pyad.DefectClassifier(**kw).fit(x, labels=y)
    ckpt = tmp_path / "c.ckpt"
    pyad.DefectClassifier(**{**kw, "max_epochs": 1}).fit(x, labels=y, checkpoint=ckpt)
    resumed = pyad.DefectClassifier(**kw).fit(x, labels=y, checkpoint=ckpt)
    np.testing.assert_array_equal(resumed.predict_proba(xt), straight.predict_proba(xt))


@pytest.mark.parametrize("bad, match", [
    (dict(unfreeze="layer4"), "unfreeze"), (dict(loss="bce"), "loss"), (dict(class_weight="auto"), "class_weight"),
    (dict(warmup_epochs=-1), "warmup_epochs"), (dict(backbone="vgg16"), "backbone"), (dict(focal_gamma=-1), "focal_gamma")])
def test_bad_parameters(bad, match, small):
    x, y = small
    with pytest.raises(ValueError, match=match):
        pyad.DefectClassifier(**{**TINY, **bad}).fit(x, labels=y)
