"""The command line: every command on a tiny synthetic dataset, exit codes,
messages, --quiet and --help. Mostly in-process (``pyad.cli.main``); one
subprocess checks ``python -m pyad`` and the installed entry point."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pyad import datasets as D
from pyad.cli import build_parser, main

SMALL = ["--backbone", "resnet18", "--weights", "none", "--image-size", "64", "--crop-size", "none"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    D.synthetic(root / "data", n_train=10, n_good=3, n_defect=2, size=64, seed=5)
    return root / "data"


@pytest.fixture(scope="module")
def model(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "object.pyad"
    assert main(["fit", "--data", str(data / "synthetic_object"), "--out", str(path), "--model", "patchcore",
                 "--set", "coreset_ratio=0.5", "--quiet", *SMALL]) == 0
    return path


def test_fit_writes_a_loadable_model(model):
    import pyad

    det = pyad.load(model)
    assert type(det).__name__ == "PatchCore" and det.coreset_ratio == 0.5 and det.crop_size is None
    assert det.n_train_ == 10


def test_predict_writes_scores_overlays_and_masks(model, data, tmp_path, capsys):
    test = data / "synthetic_object" / "test"
    assert main(["predict", str(model), str(test), "--out", str(tmp_path), "--quiet"]) == 0
    doc = json.loads((tmp_path / "scores.json").read_text())
    assert len(doc["images"]) == 7 and doc["threshold"] is not None
    names = sorted(p.name for p in (tmp_path / "overlays").iterdir())
    assert len(names) == 7 and "good_000.png" in names and "perlin_001.png" in names  # stems repeat: parent prefixed
    with Image.open(tmp_path / "masks" / "perlin_000.png") as m:
        assert m.size == (64, 64) and set(np.unique(np.asarray(m))) <= {0, 255}
    assert capsys.readouterr().out == ""  # --quiet with --out: nothing on stdout
    assert main(["predict", str(model), str(test / "good" / "000.png"), "--out", str(tmp_path / "c"), "--format", "csv",
                 "--no-pictures"]) == 0
    lines = (tmp_path / "c" / "scores.csv").read_text().splitlines()
    assert lines[0] == "path,score,anomalous" and len(lines) == 2
    assert not (tmp_path / "c" / "overlays").exists()
    assert main(["predict", str(model), str(test / "good" / "000.png")]) == 0  # no --out: scores printed
    assert "000.png" in capsys.readouterr().out


def test_evaluate_with_a_saved_model_and_fitting_per_category(model, data, tmp_path, capsys):
    assert main(["evaluate", "--data", str(data), "--category", "synthetic_object", "--load", str(model),
                 "--out", str(tmp_path / "a"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| synthetic_object |" in out and (tmp_path / "a" / "results.csv").is_file()
    assert (tmp_path / "a" / "synthetic_object" / "defects_perlin.png").is_file()
    assert main(["evaluate", "--data", str(data), "--model", "padim", "--out", str(tmp_path / "b"), "--no-pictures",
                 "--quiet", *SMALL]) == 0
    rows = json.loads((tmp_path / "b" / "results.json").read_text())["summary"]
    assert [r["category"] for r in rows] == ["synthetic_object", "synthetic_texture", "mean", "textures", "objects"]


def test_bench_writes_pytest_benchmark_json(model, data, tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", str(model), str(data / "synthetic_object" / "test" / "good"), "--warmup", "1", "--runs", "2",
                 "--batch-sizes", "1,2", "--max-images", "2", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert {b["name"] for b in doc["benchmarks"]} >= {"latency[image]", "stage[backbone]", "throughput[batch2]"}
    assert doc["benchmarks"][0]["stats"]["rounds"] == 2
    assert doc["benchmarks"][0]["extra_info"]["fit_seconds"] > 0  # training time travels with the model
    assert "| **total** |" in capsys.readouterr().out


def test_demo_on_given_data(data, tmp_path, capsys):
    assert main(["demo", "--data", str(data / "synthetic_texture"), "--out", str(tmp_path), "--quiet",
                 "--image-size", "64", "--crop-size", "none"]) == 0
    out = capsys.readouterr().out
    assert "| synthetic_texture |" in out and "| **total** |" in out
    assert (tmp_path / "results.md").is_file() and (tmp_path / "synthetic_texture" / "curves.png").is_file()


def test_info_is_json(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"version", "backend", "isa", "threads", "device", "cuda"} <= set(info)


def _bad_inputs(data, model, tmp):
    """(argv, message) for every bad input a user can give; each must exit 2 with a
    message naming the argument, before any work."""
    obj = str(data / "synthetic_object")
    png = str(data / "synthetic_object" / "test" / "good" / "000.png")
    fit = ["fit", "--data", obj, "--out", str(tmp / "m.pyad"), *SMALL]
    ro = tmp / "readonly"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o555)
    newer = tmp / "newer.pyad"
    import pyad
    from pyad import modelfile

    meta, state = modelfile.read_tree(model)
    modelfile.write_tree(newer, {**meta, "pyad_version": "99.0.0"}, state)
    broken = tmp / "broken.pyad"
    modelfile.write_tree(broken, meta, {k: v for k, v in state.items() if k != "memory_bank"})
    shaped = tmp / "shaped.pyad"
    modelfile.write_tree(shaped, meta, {**state, "memory_bank": np.zeros((5, 3), np.float32)})
    bomb = tmp / "bomb.png"
    Image.new("L", (20000, 10000)).save(bomb)
    return [
        (["predict", "missing.pyad", "x.png"], "model: missing.pyad is not a file"),
        (["fit", "--data", "nowhere", "--out", "m.pyad"], "--data: nowhere does not exist"),
        (["evaluate", "--data", "nowhere", "--out", "o"], "--data: nowhere does not exist"),
        ([*fit[:-len(SMALL)], "--model", "nosuch"], "--model: expected one of"),
        ([*fit, "--set", "bogus=1"], "--set: expected KEY=VALUE with KEY one of"),
        ([*fit, "--set", "coreset_ratio=abc"], "--set coreset_ratio: expected a number in (0, 1], got 'abc'"),
        ([*fit, "--image-size", "8"], "--image-size: expected an int >= 16"),
        ([*fit, "--device", "cuda"], "--device: 'cuda' was asked for but CUDA is not available"),
        ([*fit[:-len(SMALL)], *SMALL[:2], "--weights", str(tmp / "none.pth"), *SMALL[4:]], "--weights: no checkpoint file"),
        (["fit", "--data", obj, "--out", str(tmp), *SMALL], "--out: " + str(tmp) + " is a folder"),
        (["fit", "--data", obj, "--out", str(tmp / "no" / "m.pyad"), *SMALL], "--out: the folder"),
        (["fit", "--data", obj, "--out", str(ro / "m.pyad"), *SMALL], "--out: cannot write"),
        (["fit", "--data", str(data), "--out", str(tmp / "m.pyad"), *SMALL], "--data: " + str(data) + " holds several categories"),
        (["predict", str(model), png, "--out", str(ro / "o")], "--out: cannot write into"),
        (["predict", str(model), str(tmp / "none.png")], "images: "),
        (["predict", str(newer), png], "newer than this pyad"),
        (["predict", str(broken), png], "is not a valid patchcore model"),
        (["predict", str(shaped), png], "memory_bank"),
        (["predict", str(model), str(bomb)], "decompression bombs"),
        (["bench", str(model), png, "--json", str(tmp)], "--json: " + str(tmp) + " is a folder"),
        (["evaluate", "--data", str(data), "--out", str(ro / "x"), *SMALL], "--out: cannot write into"),
    ]


def test_bad_inputs_exit_2_naming_the_argument(data, model, tmp_path, capsys, monkeypatch):
    import os

    if os.geteuid() == 0:  # root ignores permissions: make the read-only folder a read-only mount's stand-in
        monkeypatch.setattr(os, "access", lambda p, mode: "readonly" not in str(p))
    monkeypatch.chdir(tmp_path)
    for argv, message in _bad_inputs(data, model, tmp_path):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert err.startswith("pyad: error: ") and message in err, (argv, err)
        assert "Traceback" not in err
    assert not (tmp_path / "m.pyad").exists()


def test_help_explains_every_option():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"demo", "fit", "predict", "evaluate", "bench", "info", "kernels"} <= set(sub.choices)
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, f"pyad {name} {action.option_strings or action.dest} has no help"
        assert "exit codes" in p.format_help()


def test_module_entry_point_and_usage_errors(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "pyad", *a], capture_output=True, text=True, cwd=tmp_path)
    out = run("--help")
    assert out.returncode == 0 and "fit" in out.stdout and "exit codes" in out.stdout
    out = run("fit")  # missing required options: argparse usage error, exit 2
    assert out.returncode == 2 and "--data" in out.stderr
    out = run("--version")
    assert out.returncode == 0 and out.stdout.startswith("pyad ")


def test_fit_on_a_plain_folder_and_on_a_dataset_root(data, tmp_path, capsys):
    plain = data / "synthetic_texture" / "train" / "good"
    assert main(["fit", "--data", str(plain), "--out", str(tmp_path / "a.pyad"), "--model", "padim", *SMALL]) == 0
    assert "10 images in" in capsys.readouterr().out
    assert main(["fit", "--data", str(data), "--category", "synthetic_texture", "--out", str(tmp_path / "b.pyad"),
                 "--model", "padim", "--quiet", *SMALL]) == 0
    import pyad

    a, b = pyad.load(tmp_path / "a.pyad"), pyad.load(tmp_path / "b.pyad")
    assert a.n_train_ == b.n_train_ == 10
    np.testing.assert_array_equal(a.gaussian_.factor, b.gaussian_.factor)  # same images, same model


def test_overlays_use_the_models_fixed_scale(model, data, tmp_path):
    """The same image and model give the same overlay whatever else is in the batch
    (the colour scale comes from the model, not from the current call)."""
    test = data / "synthetic_object" / "test"
    one = test / "good" / "000.png"
    assert main(["predict", str(model), str(one), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert main(["predict", str(model), str(test), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    a = np.asarray(Image.open(tmp_path / "a" / "overlays" / "000.png"))
    b = np.asarray(Image.open(tmp_path / "b" / "overlays" / "good_000.png"))
    assert a.shape == b.shape and a.shape[0] > 64  # the colour bar and the score line under the image
    diff = np.abs(a[:64].astype(int) - b[:64].astype(int))  # the heat map: float rounding of batched GEMMs only
    assert diff.max() <= 2, diff.max()


def test_predict_skip_bad_reports_and_writes_the_rest(model, data, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    good = data / "synthetic_object" / "test" / "good"
    for name in ("000.png", "001.png"):
        (folder / name).write_bytes((good / name).read_bytes())
    (folder / "002.png").write_bytes(b"broken")
    assert main(["predict", str(model), str(folder), "--out", str(tmp_path / "o")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["predict", str(model), str(folder), "--out", str(tmp_path / "o"), "--skip-bad", "--quiet"]) == 0
    assert "skipped" in capsys.readouterr().err
    doc = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert len(doc["images"]) == 2 and doc["skipped"][0]["path"].endswith("002.png")


def test_evaluate_saves_the_fitted_model(data, tmp_path):
    path = tmp_path / "m.pyad"
    assert main(["evaluate", "--data", str(data / "synthetic_texture"), "--out", str(tmp_path / "r"), "--no-pictures",
                 "--save-model", str(path), "--model", "padim", "--quiet", *SMALL]) == 0
    import pyad

    assert pyad.load(path).n_train_ == 10
