"""Dataset layouts (built in a temporary folder), their errors, the synthetic
generator, and the real MVTec AD bottle folder when present."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pyad
from pyad import datasets as D

BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"


def _png(path: Path, size=(40, 30), value=100, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)
    else:
        Image.fromarray(np.full((*size[::-1], 3), value, np.uint8)).save(path)


def _mask(path: Path, size=(40, 30), box=(5, 5, 12, 12)):
    m = np.zeros(size[::-1], np.uint8)
    m[box[1] : box[3], box[0] : box[2]] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(m).save(path)


@pytest.fixture
def mvtec(tmp_path):
    root = tmp_path / "mvtec"
    for name, mode in (("grid", "L"), ("bottle", "RGB")):
        cat = root / name
        for i in range(3):
            _png(cat / "train" / "good" / f"{i:03d}.png", mode=mode)
        _png(cat / "test" / "good" / "000.png", mode=mode)
        for d in ("crack", "hole"):
            _png(cat / "test" / d / "000.png", mode=mode)
            _mask(cat / "ground_truth" / d / "000_mask.png")
    return root


def test_mvtec_ad_layout_and_grayscale(mvtec):
    ds = D.mvtec_ad(mvtec, "grid")
    assert (ds.name, ds.kind, len(ds.train), len(ds.test)) == ("grid", "texture", 3, 3)
    assert [s.defect for s in ds.test] == ["crack", "good", "hole"] and [s.label for s in ds.test] == [1, 0, 1]
    assert ds.has_masks and ds.defects == ["crack", "good", "hole"]
    img = ds.test[0].image
    assert img.shape == (30, 40, 3) and img.dtype == np.uint8  # grey read as RGB, native size
    m = ds.test[0].mask()
    assert m.dtype == bool and m.shape == (30, 40) and m.sum() == 49
    assert not ds.test[1].mask().any()
    # the category folder itself works too, and the loader detects the layout
    assert len(D.mvtec_ad(mvtec / "bottle").test) == 3 and D.load(mvtec, "bottle").kind == "object"
    assert D.categories(mvtec) == ["grid", "bottle"]  # MVTec order
    assert [d.name for d in D.load_all(mvtec)] == ["grid", "bottle"]


def test_mvtec_ad_errors_name_the_file(mvtec):
    with pytest.raises(ValueError, match="category: no carpet/train"):
        D.mvtec_ad(mvtec, "carpet")
    with pytest.raises(ValueError, match="name a category"):
        D.mvtec_ad(mvtec)
    (mvtec / "grid" / "ground_truth" / "hole" / "000_mask.png").unlink()
    with pytest.raises(ValueError, match=r"has no mask.*000_mask\.png"):
        D.mvtec_ad(mvtec, "grid")
    _mask(mvtec / "grid" / "ground_truth" / "hole" / "000_mask.png", size=(41, 30))
    with pytest.raises(ValueError, match="masks: .* is 41x30 but its image .* is 40x30"):
        D.mvtec_ad(mvtec, "grid")
    _mask(mvtec / "grid" / "ground_truth" / "hole" / "000_mask.png")
    _mask(mvtec / "grid" / "ground_truth" / "hole" / "007_mask.png")
    with pytest.raises(ValueError, match="masks: .*007_mask.png has no test image hole/007"):
        D.mvtec_ad(mvtec, "grid")
    (mvtec / "grid" / "ground_truth" / "hole" / "007_mask.png").unlink()
    (mvtec / "grid" / "train" / "good" / "001.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="train: cannot read .*001.png"):
        D.mvtec_ad(mvtec, "grid")


def test_mvtec_loco_keeps_logical_and_structural_apart(tmp_path):
    cat = tmp_path / "loco" / "juice_bottle"
    for i in range(2):
        _png(cat / "train" / "good" / f"{i:03d}.png")
    _png(cat / "validation" / "good" / "000.png")
    _png(cat / "test" / "good" / "000.png")
    _png(cat / "test" / "logical_anomalies" / "000.png")
    _mask(cat / "ground_truth" / "logical_anomalies" / "000" / "000.png", box=(0, 0, 4, 4))
    _mask(cat / "ground_truth" / "logical_anomalies" / "000" / "001.png", box=(20, 20, 30, 25))
    _png(cat / "test" / "structural_anomalies" / "000.png")
    _mask(cat / "ground_truth" / "structural_anomalies" / "000" / "000.png")
    ds = D.load(tmp_path / "loco", "juice_bottle")
    assert [(s.defect, s.kind) for s in ds.test] == [("good", ""), ("logical_anomalies", "logical"),
                                                     ("structural_anomalies", "structural")]
    assert len(ds.train) == 2  # validation/ is not training data
    assert ds.test[1].mask().sum() == 16 + 50  # the union of its two masks
    (cat / "ground_truth" / "structural_anomalies" / "000" / "000.png").unlink()
    with pytest.raises(ValueError, match="has no masks"):
        D.mvtec_loco(cat)


def test_folder_dataset_and_its_errors(tmp_path):
    for i in range(3):
        _png(tmp_path / "ok" / f"{i}.png")
    _png(tmp_path / "test" / "good" / "a.png")
    _png(tmp_path / "test" / "scratch" / "b.png")
    _mask(tmp_path / "masks" / "scratch" / "b.png")
    ds = D.folder(tmp_path / "ok", tmp_path / "test", tmp_path / "masks", name="widget")
    assert (ds.name, len(ds.train), [s.label for s in ds.test]) == ("widget", 3, [0, 1])
    assert ds.test[1].mask().sum() == 49
    assert D.folder(tmp_path / "ok").test == []
    with pytest.raises(ValueError, match="train: .* is not a folder"):
        D.folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="masks: no mask for .*b.png"):
        D.folder(tmp_path / "ok", tmp_path / "test", tmp_path / "nomasks")
    _mask(tmp_path / "masks" / "scratch" / "c.png")
    with pytest.raises(ValueError, match="masks: .*c.png has no test image scratch/c"):
        D.folder(tmp_path / "ok", tmp_path / "test", tmp_path / "masks")
    (tmp_path / "masks" / "scratch" / "c.png").unlink()
    _mask(tmp_path / "masks" / "scratch" / "b.png", size=(10, 10), box=(0, 0, 2, 2))
    with pytest.raises(ValueError, match="is 10x10 but its image"):
        D.folder(tmp_path / "ok", tmp_path / "test", tmp_path / "masks")
    _png(tmp_path / "test" / "loose.png")
    with pytest.raises(ValueError, match="lies directly in"):
        D.folder(tmp_path / "ok", tmp_path / "test")
    (tmp_path / "ok" / "1.png").write_text("garbage")
    with pytest.raises(ValueError, match="train: cannot read .*1.png"):
        D.folder(tmp_path / "ok")


@pytest.mark.parametrize("kind", ["perlin", "cutpaste"])
def test_synthetic_anomalies_have_exact_masks(kind):
    rng = np.random.default_rng(3)
    img = rng.integers(0, 255, (96, 80, 3), dtype=np.uint8)
    for _ in range(5):
        bad, mask = D.add_anomaly(img, rng, kind)
        changed = (bad != img).any(-1)
        assert mask.any()
        np.testing.assert_array_equal(mask, changed)  # every masked pixel changed, no other did
    region = np.zeros((96, 80), bool)
    region[30:70, 20:60] = True
    if kind == "perlin":
        _, mask = D.add_anomaly(img, rng, kind, region)
        assert not (mask & ~region).any()
    with pytest.raises(ValueError, match="kind"):
        D.add_anomaly(img, rng, "scribble")
    with pytest.raises(ValueError, match="image: expected"):
        D.add_anomaly(img[..., 0], rng, kind)


def test_synthetic_dataset_is_mvtec_layout_and_deterministic(tmp_path):
    a = D.synthetic(tmp_path / "a", n_train=3, n_good=2, n_defect=2, size=64, seed=1)
    b = D.synthetic(tmp_path / "b", n_train=3, n_good=2, n_defect=2, size=64, seed=1)
    assert [d.name for d in a] == ["synthetic_texture", "synthetic_object"] and [d.kind for d in a] == ["texture", "object"]
    for da, db in zip(a, b):
        assert da.defects == ["cutpaste", "good", "perlin"] and da.has_masks
        for sa, sb in zip(da.test, db.test):
            np.testing.assert_array_equal(sa.image, sb.image)
            np.testing.assert_array_equal(sa.mask(), sb.mask())
        # reloading the written folder gives the same dataset
        assert len(D.mvtec_ad(tmp_path / "a" / da.name).test) == len(da.test)


def test_detectors_take_a_dataset(tmp_path):
    ds = D.synthetic(tmp_path, kinds=("object",), n_train=6, n_good=2, n_defect=2, size=64)[0]
    det = pyad.PaDiM(backbone="resnet18", weights=None, image_size=64, crop_size=None).fit(ds)
    assert det.n_train_ == 6
    pred = det.predict(ds)
    assert pred.scores.shape == (len(ds.test),)
    det.calibrate(ds)
    assert "F1-optimal" in det.threshold_rule_


@pytest.mark.skipif(not BOTTLE.is_dir(), reason="MVTec AD bottle not present")
def test_real_bottle_folder():
    ds = D.mvtec_ad(BOTTLE)
    assert (ds.name, ds.kind, len(ds.train), len(ds.test)) == ("bottle", "object", 209, 83)
    assert ds.defects == ["broken_large", "broken_small", "contamination", "good"]
    s = next(s for s in ds.test if s.label)
    assert s.mask().shape == (900, 900) and s.mask().any()
