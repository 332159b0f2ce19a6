"""evaluate / Report / latency / pytest-benchmark JSON / pictures, on a tiny
synthetic dataset and small random-init detectors."""

import csv
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

import pyad
from pyad import datasets as D
from pyad import plots
from pyad.evaluation import Report, Result, benchmark_json, evaluate, latency

SMALL = dict(backbone="resnet18", weights=None, image_size=64, crop_size=None, batch_size=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return D.synthetic(tmp_path_factory.mktemp("syn"), n_train=10, n_good=4, n_defect=3, size=64, seed=2)


def test_one_category_fits_an_unfitted_detector_and_matches_direct_metrics(data, tmp_path):
    ds = data[1]
    det = pyad.PatchCore(coreset_ratio=0.5, **SMALL)
    rep = evaluate(det, ds, out=tmp_path)
    r = rep[ds.name]
    assert hasattr(det, "n_train_") and r.fit_s > 0 and r.n_train == 10 and r.n_test == 10
    pred = det.predict(ds)  # the same single inference path
    labels = [s.label for s in ds.test]
    assert r.image_auroc == pytest.approx(roc_auc_score(labels, pred.scores))
    masks = np.concatenate([s.mask().ravel() for s in ds.test])
    assert r.pixel_auroc == pytest.approx(roc_auc_score(masks, pred.maps.ravel()))
    assert 0 <= r.aupro <= 1 and 0 < r.f1_max <= 1
    assert r.threshold == det.threshold_ and "validation images" in r.threshold_rule
    pr, rc, _ = pyad.metrics.precision_recall_f1(labels, pred.scores, det.threshold_)
    assert (r.precision, r.recall) == (pr, rc)
    assert [row["score"] for row in r.images] == pytest.approx(pred.scores.tolist())
    # files: tables, per-image scores, one grid per defect type, curves
    for name in ("results.md", "results.csv", "results.json", f"{ds.name}/scores.csv",
                 f"{ds.name}/defects_perlin.png", f"{ds.name}/defects_cutpaste.png", f"{ds.name}/defects_good.png",
                 f"{ds.name}/curves.png"):
        assert (tmp_path / name).is_file(), name
    with Image.open(tmp_path / ds.name / "defects_perlin.png") as grid:
        assert grid.width > 4 * 192 and grid.height > 3 * 192  # 4 columns, 3 images


def test_a_fitted_detector_is_used_as_is(data):
    ds = data[0]
    det = pyad.PaDiM(**SMALL).fit(ds)
    before = det.threshold_
    r = evaluate(det, ds, pictures=False)[ds.name]
    assert r.fit_s == det.fit_seconds_ and det.threshold_ == before  # the fit time kept by the model


def test_several_categories_give_mean_textures_objects(data, tmp_path):
    det = pyad.PaDiM(**SMALL)
    rep = evaluate(det, data, out=tmp_path, pictures=False)
    assert not hasattr(det, "n_train_")  # the template is left untouched
    rows = {row["category"]: row for row in rep.rows()}
    assert list(rows) == ["synthetic_texture", "synthetic_object", "mean", "textures", "objects"]
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert rows["mean"][key] == pytest.approx((rows["synthetic_texture"][key] + rows["synthetic_object"][key]) / 2)
        assert rows["textures"][key] == rows["synthetic_texture"][key]
    md = rep.to_markdown().splitlines()
    assert md[0].startswith("| category | image AUROC | pixel AUROC | AUPRO | F1-max") and len(md) == 7
    parsed = list(csv.DictReader(io.StringIO(rep.to_csv())))
    assert [p["category"] for p in parsed] == list(rows)
    assert float(parsed[0]["image_auroc"]) == pytest.approx(rows["synthetic_texture"]["image_auroc"])
    doc = json.loads((tmp_path / "results.json").read_text())
    assert len(doc["results"]) == 2 and doc["summary"][2]["category"] == "mean"


def test_loco_rows_split_logical_and_structural(tmp_path):
    # a LOCO-layout category from synthetic images: perlin = "logical", cutpaste = "structural"
    src = D.synthetic(tmp_path / "src", kinds=("object",), n_train=8, n_good=3, n_defect=3, size=64, seed=4)[0]
    cat = tmp_path / "loco" / "pushpins"
    for s in src.train:
        (cat / "train" / "good").mkdir(parents=True, exist_ok=True)
        shutil.copy(s.path, cat / "train" / "good" / s.path.name)
    for s in src.test:
        d = {"good": "good", "perlin": "logical_anomalies", "cutpaste": "structural_anomalies"}[s.defect]
        (cat / "test" / d).mkdir(parents=True, exist_ok=True)
        shutil.copy(s.path, cat / "test" / d / s.path.name)
        if s.label:
            (cat / "ground_truth" / d / s.path.stem).mkdir(parents=True)
            shutil.copy(s.mask_paths[0], cat / "ground_truth" / d / s.path.stem / "000.png")
    ds = D.load(tmp_path / "loco", "pushpins")
    rep = evaluate(pyad.PaDiM(**SMALL), ds, pictures=False)
    names = [r.category for r in rep.results]
    assert names == ["pushpins", "pushpins/logical", "pushpins/structural"]
    assert rep["pushpins/logical"].n_test == 6 and rep["pushpins/structural"].n_test == 6
    scores = {row["path"]: row["score"] for row in rep["pushpins"].images}
    logical = [s for s in ds.test if s.kind != "structural"]
    expected = roc_auc_score([s.label for s in logical], [scores[str(s.path)] for s in logical])
    assert rep["pushpins/logical"].image_auroc == pytest.approx(expected)
    assert [r["category"] for r in rep.rows()] == names + ["mean"] or [r["category"] for r in rep.rows()] == names


def test_evaluate_rejects_bad_data(data, tmp_path):
    with pytest.raises(ValueError, match="data: expected a pyad dataset"):
        evaluate(pyad.PaDiM(**SMALL), "not a dataset")
    only_good = D.Dataset("x", data[0].train, [s for s in data[0].test if s.label == 0])
    with pytest.raises(ValueError, match="needs test images of both classes"):
        evaluate(pyad.PaDiM(**SMALL), only_good)


def test_latency_protocol_and_pytest_benchmark_json(data, tmp_path):
    det = pyad.PatchCore(coreset_ratio=0.5, **SMALL).fit(data[0])
    calls, staged = [], []
    original = det.predict

    def predict(imgs, stage_times=None):
        calls.append(len(imgs))
        staged.append(stage_times is not None)
        return original(imgs, stage_times=stage_times)

    det.predict = predict
    lat = latency(det, data[0], warmup=3, runs=5, batch_sizes=(1, 4), max_images=2)
    # 2 images x (3 warm-up + 5 timed), then per batch size 1 warm-up + 5 timed
    assert calls == [1] * 16 + [1] * 6 + [4] * 6
    # per image, warm-up takes the stage-timed path as the timed runs do (ONNX Runtime builds
    # its per-stage sessions on the first such call: it must not land in a timed run)
    assert staged == [True] * 16 + [False] * 12
    assert len(lat.per_image) == 2 and set(lat.throughput) == {1, 4}
    assert {"backbone", "embedding", "search", "map"} <= set(lat.stages)
    assert sum(lat.stage_ms().values()) <= lat.mean_ms * 1.05
    doc = benchmark_json(lat, "PatchCore-resnet18")
    names = [b["name"] for b in doc["benchmarks"]]
    assert names[0] == "latency[image]" and "stage[backbone]" in names and "throughput[batch4]" in names
    assert doc["benchmarks"][0]["stats"]["mean"] == pytest.approx(np.mean(lat.per_image))
    path = tmp_path / "0001_run.json"
    path.write_text(json.dumps(doc))
    out = subprocess.run([sys.executable, "-c", "from pytest_benchmark.cli import main; main()", "compare", str(path),
                          "--columns", "min,mean"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "latency[image]" in out.stdout and "throughput[batch4]" in out.stdout
    with pytest.raises(ValueError, match="batch_sizes"):
        latency(det, data[0], batch_sizes=(0,))


def test_pictures_helpers():
    amap = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    rgb = plots.colorize(amap, 0, 1)
    assert tuple(rgb[0, 0]) == (0, 0, 128) and tuple(rgb[-1, -1]) == (128, 0, 0)  # jet: dark blue -> dark red
    img = np.full((64, 64, 3), 200, np.uint8)
    ov = plots.overlay(img, amap, 0, 1, alpha=0.5)
    assert ov.shape == (64, 64, 3) and ov[0, 0, 2] == 164
    with pytest.raises(ValueError, match="amap: expected the image's size"):
        plots.overlay(img, amap[:10], 0, 1)
    m = np.zeros((64, 64), bool)
    m[10:20, 10:20] = True
    c = plots.contour(img, m)
    edge = (c != img).any(-1)
    assert edge.sum() == 36 and edge[10, 10] and not edge[15, 15]


def test_curves_need_matplotlib_or_say_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r'pip install "pyad\[plot\]"'):
        plots.curves(tmp_path / "c.png", [0, 1], [0.1, 0.2])


def test_report_formats_missing_values():
    rep = Report([Result("a", "object", image_auroc=0.5), Result("b", "texture", image_auroc=1.0)])
    md = rep.to_markdown()
    assert "| a | 0.5000 | - |" in md and "| mean | 0.7500 |" in md
