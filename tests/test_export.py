"""ONNX export and the ONNX Runtime detector against the torch inference module,
over the whole registry (CONFIGS of test_detectors: a new detector is covered by its
one line there), and static int8 quantisation.

Tolerances: ONNX Runtime and torch run the same graph with different kernels
(GEMM blocking, fused convolutions), so outputs agree to float32 rounding:
``rtol=1e-4`` and ``atol=1e-5 * max|map|`` on the raw scores and network-resolution
maps, and the same arg-max patch for every image whose maximum is unique.
"""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

import pyad  # noqa: E402
from pyad import export as E  # noqa: E402
from pyad.detectors import REGISTRY  # noqa: E402
from pyad.ops import portable  # noqa: E402
from test_detectors import CONFIGS, contract_data, fit, fitted_detector  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5  # ATOL relative to the largest map value
# Scores scaled by a fitted range amplify float32 rounding by 1/range: GANomaly
# min-max scales its latent distance by the normal validation scores, whose range is
# 2e-6 for the tiny test network (raw distances agree to 7e-7 relative, the scaled
# scores to 2e-4 of the largest). atol on the scores, relative to the largest score.
SCORE_ATOL = {"ganomaly": 1e-3}


@pytest.fixture(scope="module")
def data():
    return contract_data()


@pytest.fixture(scope="module")
def pairs(data, tmp_path_factory):
    """name -> (fitted torch detector, its ONNX export loaded back), built once;
    ``pairs.path(name)``: the file ``det.export`` wrote (one export per detector)."""
    cache, folder = {}, tmp_path_factory.mktemp("exports")

    def get(name):
        if name not in cache:
            det = fitted_detector(name)  # the contract suite's fitted detector (the same data)
            cache[name] = det, pyad.load(det.export(folder / f"{name}.onnx"))
        return cache[name]

    def path(name):
        get(name)
        return folder / f"{name}.onnx"

    get.path = path
    return get


@pytest.fixture(params=sorted(CONFIGS))
def pair(request, pairs):
    return pairs(request.param)


def _inputs(det, data):
    """The 4 test images and 4 training images, preprocessed once: the same tensor
    goes to torch and to ONNX Runtime."""
    return det.preprocessing(list(data[1]) + list(data[0][:4]))


def _close(got, want, scale):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL * scale)


def _close_scores(name, got, want, scale):
    atol = max(ATOL * scale, SCORE_ATOL.get(name, 0.0) * float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=atol)


def test_onnx_runtime_matches_the_torch_module(pair, data):
    det, onnx_det = pair
    x = _inputs(det, data)
    with torch.inference_mode(), portable():
        want_s, want_m = (t.numpy() for t in det.inference_module()(x))
    got_s, got_m = (t.numpy() for t in onnx_det.inference_module()(x))
    scale = max(1.0, float(np.abs(want_m).max()))
    assert got_s.shape == (8,) and got_m.shape == want_m.shape == (8, 64, 64)
    _close_scores(det.name, got_s, want_s, scale)
    _close(got_m, want_m, scale)
    for i in range(len(x)):
        flat = want_m[i].ravel()
        top = np.sort(flat)[-2:]
        if top[1] - top[0] > 10 * ATOL * scale:  # a unique maximum
            assert np.argmax(got_m[i]) == np.argmax(want_m[i]), f"image {i}: arg-max patch differs"


def test_onnx_predict_equals_torch_predict(pair, data):
    """Through predict: the same preprocessing code, map restoring, thresholds and labels."""
    det, onnx_det = pair
    tol = CONFIGS[det.name][1]  # the torch fast path (kernels, faiss) vs the twins
    want = det.predict(data[1])
    got = onnx_det.predict(data[1])
    scale = max(1.0, float(np.abs(want.maps).max()))
    score_atol = max(max(tol, ATOL) * scale, SCORE_ATOL.get(det.name, 0) * float(np.abs(want.scores).max()))
    np.testing.assert_allclose(got.scores, want.scores, rtol=max(tol, RTOL), atol=score_atol)
    np.testing.assert_allclose(got.maps, want.maps, rtol=max(tol, RTOL), atol=max(tol, ATOL) * scale)
    np.testing.assert_array_equal(got.labels, want.labels)
    assert got.pixel_threshold == want.pixel_threshold
    assert onnx_det.threshold_ == det.threshold_ and onnx_det.map_range_ == det.map_range_


def test_onnx_batch_invariance(pair, data):
    """Image i alone equals image i in a batch of 8 (dynamic batch, no batch statistics)."""
    det, onnx_det = pair
    x = _inputs(det, data)
    module = onnx_det.inference_module()
    s8, m8 = (t.numpy() for t in module(x))
    scale = max(1.0, float(np.abs(m8).max()))
    for i in range(len(x)):
        s1, m1 = (t.numpy() for t in module(x[i : i + 1]))
        _close_scores(det.name, s1, s8[i : i + 1], scale)
        _close(m1[0], m8[i], scale)


def test_metadata_carries_what_deployment_needs(pair, pairs):
    det, onnx_det = pair
    path = pairs.path(det.name)  # written by det.export
    model = onnx.load(path)
    meta = json.loads(next(p.value for p in model.metadata_props if p.key == "pyad"))
    assert meta["detector"] == det.name and meta["params"]["image_size"] == det.image_size
    assert meta["fitted"]["threshold_"] == det.threshold_
    assert meta["fitted"]["pixel_threshold_"] == det.pixel_threshold_
    pre = det.preprocessing
    assert meta["preprocessing"]["mean"] == pytest.approx(pre.mean.flatten().tolist())
    assert meta["preprocessing"]["std"] == pytest.approx(pre.std.flatten().tolist())
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["scores", "maps"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert model.opset_import[0].version >= 18
    assert all(any(p.key == "pyad.stage" for p in n.metadata_props) for n in model.graph.node)
    back = pyad.load(path)
    assert isinstance(back, E.OnnxDetector) and back.source_ == det.name
    assert back.get_params()["image_size"] == det.image_size and back.crop_size == det.crop_size
    assert back.threshold_ == det.threshold_ and back.stages_ == onnx_det.stages_


def test_save_load_and_stage_times(pairs, data, tmp_path):
    det, onnx_det = pairs("patchcore")
    onnx_det.save(tmp_path / "m.onnx")
    back = pyad.load(tmp_path / "m.onnx")
    want = onnx_det.predict(data[1])
    got = back.predict(data[1])
    np.testing.assert_array_equal(got.scores, want.scores)
    np.testing.assert_array_equal(got.maps, want.maps)
    st = {}
    staged = back.predict(data[1], stage_times=st)  # one session per stage
    assert list(k for k in st if k not in ("read", "preprocess")) == ["backbone", "embedding", "search", "map"]
    np.testing.assert_allclose(staged.scores, want.scores, rtol=RTOL)
    fp = back.footprint()
    assert fp["state"]["memory_bank"] == list(det.memory_bank_.shape)
    assert fp["weights_bytes_per_stage"]["search"] >= det.memory_bank_.nbytes
    # no session's pool threads spin after a run: torch pre- and post-processes on the same
    # cores and the stages run one session after another (export._session_options)
    runner = back.inference_module().session
    sessions = [runner.session] + [sess for _, sess in runner.staged()]
    assert all(sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
               for sess in sessions)


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "efficientnet_lite0"])
@pytest.mark.parametrize("name", ["patchcore", "padim"])
def test_stage_labels_of_the_convolutions(name, backbone, data, tmp_path):
    """Every convolution of the backbone is in the "backbone" stage and the blur's two
    in "map" (the per-stage sessions time them there). The backbone runs from helpers
    (``Backbone._taps``, ``efficientnet.features``) and PaDiM's blur from ``to_map``: frames
    the exporter's stack traces leave out, which left those nodes in the embedding and
    search stages."""
    det = fit(REGISTRY[name](**{**CONFIGS[name][0], "backbone": backbone}), data[0])
    model = onnx.load(det.export(tmp_path / "m.onnx"))
    convs = [next(p.value for p in n.metadata_props if p.key == "pyad.stage") for n in model.graph.node
             if n.op_type == "Conv"]
    layers = sum(isinstance(m, torch.nn.Conv2d) for m in det._network().modules())
    assert sorted(convs) == ["backbone"] * layers + ["map"] * 2


# stage -> the inference module's network run in it
STAGE_NETWORKS = {
    "efficientad": {"teacher": "teacher", "student": "student", "autoencoder": "ae"},
    "efficientad_ast": {"backbone": "backbone", "teacher": "teacher", "student": "student", "autoencoder": "ae"},
    "uninformed_students": {"teacher": "teachers", "students": "students"},
}


@pytest.mark.parametrize("name", sorted(STAGE_NETWORKS))
def test_stage_labels_of_the_networks(name, pairs, data):
    """Every stage the torch path times owns nodes, and each network's convolutions are
    in its own stage. These modules called ``stage()`` from helpers (``raw_maps``,
    ``heads``, ``scale``), frames the exporter's stack traces leave out, so the networks
    ran under one forward line and took its first stage: EfficientAD's all "teacher",
    EfficientAD-AST's autoencoder and Uninformed Students' students too."""
    det, _ = pairs(name)
    times = {}
    det.predict(data[1], stage_times=times)
    stages = [k for k in times if k not in ("read", "preprocess")]
    model = onnx.load(pairs.path(name))
    label = {n.name: next(p.value for p in n.metadata_props if p.key == "pyad.stage") for n in model.graph.node}
    assert sorted(set(label.values())) == sorted(stages)  # each stage owns nodes
    module = det.inference_module()
    want = sorted(s for s, net in STAGE_NETWORKS[name].items()
                  for m in getattr(module, net).modules() if isinstance(m, torch.nn.Conv2d))
    assert sorted(label[n.name] for n in model.graph.node if n.op_type == "Conv") == want


def test_calibrate_and_save_keep_thresholds(pairs, data, tmp_path):
    _, onnx_det = pairs("padim")
    d = pyad.load(onnx_det.export(tmp_path / "a.onnx"))
    d.calibrate(data[1], [0, 0, 1, 1])
    d.save(tmp_path / "b.onnx")
    back = pyad.load(tmp_path / "b.onnx")
    assert back.threshold_ == d.threshold_ and "F1-optimal" in back.threshold_rule_


def test_bad_input(pairs, data, tmp_path):
    det, onnx_det = pairs("autoencoder")
    with pytest.raises(ValueError, match="path: .*expected a .onnx file"):
        det.export(tmp_path / "m.pt")
    with pytest.raises(ValueError, match="not fitted again"):
        onnx_det.fit(data[0])
    with pytest.raises(ValueError, match="provider"):
        pyad.load(onnx_det.export(tmp_path / "m.onnx"), provider="tpu").predict(data[1])
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(ValueError, match="provider: 'cuda' was asked for"):
            pyad.load(tmp_path / "m.onnx", provider="cuda").predict(data[1])
    with pytest.raises(ValueError, match="provider: applies to .onnx models only"):
        pyad.load(tmp_path / "m.pyad", provider="cpu")
    with pytest.raises(ValueError, match="weights"):
        pyad.load(tmp_path / "m.onnx", weights="x.pth")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        pyad.load(tmp_path / "junk.onnx")
    bare = onnx.load(tmp_path / "m.onnx")
    del bare.metadata_props[:]
    onnx.save(bare, tmp_path / "bare.onnx")
    with pytest.raises(ValueError, match="without pyad metadata"):
        pyad.load(tmp_path / "bare.onnx")
    with pytest.raises(ValueError, match="save"):
        onnx_det.save(tmp_path / "m.pyad")
    with pytest.raises(ValueError, match="method"):
        det.quantize(data[0], method="kl")
    with pytest.raises(ValueError, match="already int8"):
        onnx_det.quantize(data[0], max_images=4).quantize(data[0])
    with pytest.raises(ValueError, match="refit: only the fit-once frozen-feature detectors"):
        det.quantize(data[0], refit=True)


def test_int8_without_refit(pairs, data):
    """refit=False quantises a frozen-feature detector's backbone under its float head
    (thresholds unchanged); the ONNX detector can only be quantised that way."""
    det, onnx_det = pairs("padim")
    q = onnx_det.quantize(data[0], max_images=8)
    assert q.quantization_["refit"] is None and q.threshold_ == det.threshold_
    assert q.predict(data[1]).scores[2:].min() > q.predict(data[1]).scores[:2].max()
    with pytest.raises(ValueError, match="load the .pyad model"):
        onnx_det.quantize(data[0], refit=True)


# -- int8 -------------------------------------------------------------------------------------------------
REFIT = ("patchcore", "padim", "spade")  # quantize re-learns their head on the int8 backbone's features


def _spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_int8_every_detector(pair, data, tmp_path):
    """Every detector quantises, keeps the stated parts in float, saves and loads as
    an ONNX model, and still ranks the defect images first (tiny random networks:
    an accuracy test on real data is in test_int8_bottle / bench/test_bench_int8.py)."""
    det, onnx_det = pair
    # the torch detector where a refit needs it; otherwise its export (the same graph, not exported again)
    q = (det if det.name in REFIT else onnx_det).quantize(data[0], max_images=16)
    assert q.precision_ == "int8" and q.quantization_["calibration_images"] == 16
    assert q.quantization_["quantized_nodes"] > 0
    refit = q.quantization_["refit"]
    if det.name in REFIT:
        assert refit["n_train"] == len(data[0]) and refit["check_max_rel_diff"] < 1e-4
        assert q.threshold_ != det.threshold_
    else:
        assert refit is None and q.threshold_ == det.threshold_
    model = onnx.load_from_string(q.model_bytes())
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    for scope in E.FLOAT_SCOPES.get(det.name, ()):
        assert not any(s == scope or s.startswith(scope + ".") for s in q.quantization_["int8_scopes"])
    want = onnx_det.predict(data[1])
    got = q.predict(data[1])
    assert np.isfinite(got.scores).all() and np.isfinite(got.maps).all()
    assert got.scores[2:].min() > got.scores[:2].max(), (got.scores, want.scores)
    q.save(tmp_path / "q.onnx")
    back = pyad.load(tmp_path / "q.onnx")
    assert back.precision_ == "int8" and back.quantization_ == q.quantization_
    np.testing.assert_array_equal(back.predict(data[1]).scores, got.scores)


@pytest.mark.parametrize("name", ["spade", "patchcore", "efficientad", "ganomaly"])
def test_int8_calibration_runs_only_what_it_quantises(pairs, data, name, monkeypatch):
    """Calibration runs the quantised nodes and their inputs only (not SPADE's or
    PatchCore's in-graph search, not the maps) and records the quantised op types only:
    the same int8 model, and the same scores, as ONNX Runtime's calibration of the whole
    graph recording everything."""
    _, onnx_det = pairs(name)
    float_model = onnx.load_from_string(onnx_det.model_bytes())
    scope, region = E._calibration_scope, E._region
    recorded, regions = [], []
    monkeypatch.setattr(E, "_calibration_scope", lambda m, n: recorded.append(scope(m, n)) or recorded[-1])
    monkeypatch.setattr(E, "_region", lambda m, n: regions.append(region(m, n)) or regions[-1])
    ours_det = onnx_det.quantize(data[0], max_images=6)
    ours = onnx.load_from_string(ours_det.model_bytes())
    monkeypatch.setattr(E, "_calibration_scope", lambda m, n: {})
    monkeypatch.setattr(E, "_region", lambda m, n: {x.name for x in m.graph.node})
    whole_det = onnx_det.quantize(data[0], max_images=6)
    everything = onnx.load_from_string(whole_det.model_bytes())
    assert "MatMul" not in recorded[0]["op_types_to_quantize"]  # the search's and the heads' matmuls
    stage = {n.name: next(p.value for p in n.metadata_props if p.key == "pyad.stage") for n in float_model.graph.node}
    left_out = {stage[n] for n in stage if n not in regions[0]}
    assert "map" in left_out and len(regions[0]) < len(stage)
    if name in ("spade", "patchcore"):  # the nearest-neighbour search is not run
        assert "search" in left_out and not any(stage[n] == "search" for n in regions[0])

    def qdq(model):
        init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        return {n.name: (n.op_type, [init.get(i) for i in n.input[1:]]) for n in model.graph.node
                if n.op_type in ("QuantizeLinear", "DequantizeLinear")}

    a, b = qdq(ours), qdq(everything)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert a[k][0] == b[k][0]
        for x, y in zip(a[k][1], b[k][1]):
            np.testing.assert_array_equal(x, y)
    assert sorted(n.op_type for n in ours.graph.node) == sorted(n.op_type for n in everything.graph.node)
    got, want = ours_det.predict(data[1]), whole_det.predict(data[1])
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.maps, want.maps, rtol=1e-5, atol=1e-6)


def test_int8_region_merge_refuses_renamed_outputs(pairs, data, monkeypatch):
    """The float rest is merged back only where the quantised region still makes every
    tensor the rest reads; a quantiser that renamed one gets None (quantize then
    calibrates the whole graph)."""
    _, onnx_det = pairs("patchcore")
    model = onnx.load_from_string(onnx_det.model_bytes())
    nodes, _ = E.quantized_parts(model, "PatchCore")
    region = E._region(model, nodes)
    sub = E._sub_model(model, region)
    merged = E._merge(model, region, sub)  # the float region merged back: the model again
    assert merged is not None and len(merged.graph.node) == len(model.graph.node)
    onnx.checker.check_model(merged)
    name = sub.graph.output[0].name
    for n in sub.graph.node:
        n.output[:] = [o + "_renamed" if o == name else o for o in n.output]
    assert E._merge(model, region, sub) is None
    calls = []
    monkeypatch.setattr(E, "_merge", lambda *a: calls.append(1))  # always refuses: the whole graph
    q = onnx_det.quantize(data[0], max_images=4)
    assert calls and q.precision_ == "int8" and np.isfinite(q.predict(data[1]).scores).all()


def test_int8_calibrates_on_the_given_images_only(pairs, data, monkeypatch):
    """Calibration reads exactly the images passed (normal training images): a
    seeded sample of at most max_images, nothing else."""
    det, onnx_det = pairs("patchcore")
    seen = []
    real = E._Reader.get_next

    def spy(self):
        out = real(self)
        if out is not None:
            seen.append(out["images"].copy())
        return out

    monkeypatch.setattr(E._Reader, "get_next", spy)
    onnx_det.quantize(data[0], max_images=5, seed=1)
    train = det.preprocessing(list(data[0])).numpy()
    assert 0 < len(seen) and all(any(np.array_equal(s[0], t) for t in train) for s in seen)
    assert len({s.tobytes() for s in seen}) == 5


def test_cli_export_quantize_predict_bench(pairs, data, tmp_path, capsys):
    from PIL import Image

    from pyad.cli import main

    det, _ = pairs("patchcore")
    det.save(tmp_path / "m.pyad")
    good = tmp_path / "good"
    good.mkdir()
    for i, a in enumerate(data[0][:6]):
        Image.fromarray(a).save(good / f"{i}.png")
    assert main(["export", str(tmp_path / "m.pyad"), "--out", str(tmp_path / "m.onnx"), "-q"]) == 0
    assert main(["quantize", str(tmp_path / "m.pyad"), "--calibration", str(good), "--out",
                 str(tmp_path / "q.onnx"), "--max-images", "4", "--refit", "off", "-q"]) == 0
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "m.onnx"), str(good)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    scores = np.array([float(line.split()[0]) for line in lines])
    np.testing.assert_allclose(scores, det.predict(sorted(good.iterdir())).scores, rtol=1e-4)
    assert main(["bench", str(tmp_path / "q.onnx"), str(good), "--max-images", "1", "--runs", "1", "--warmup", "0",
                 "--batch-sizes", "1", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "ONNX file" in out and "int8" in out and "memory_bank" in out and "| backbone |" in out
    assert main(["export", str(tmp_path / "m.pyad"), "--out", str(tmp_path / "m.pt")]) == 2


@pytest.mark.parametrize("k", [1, 3])
def test_chunked_nearest_neighbours_export(k, tmp_path):
    """A memory bank of several chunks (PatchCore's banks pass 8,192 rows): the chunk
    merge exports (min / TopK) and ONNX Runtime finds the exact neighbours."""
    import onnxruntime as ort

    from pyad.ops import NearestNeighbours

    class Search(torch.nn.Module):
        def __init__(self, bank):
            super().__init__()
            self.nn = NearestNeighbours(bank, k, chunk=64)

        def forward(self, q):
            return self.nn(q)

    g = torch.Generator().manual_seed(0)
    bank, q = torch.randn(300, 16, generator=g), torch.randn(50, 16, generator=g)
    module = Search(bank).eval()
    want_d = torch.cdist(q, bank).square().sort(1).values[:, :k]
    with portable(), E._quiet():
        d, i = module(q)
        torch.onnx.export(module, (q,), tmp_path / "nn.onnx", dynamo=True, opset_version=18,
                          dynamic_shapes=({0: torch.export.Dim("n", min=1)},))
    torch.testing.assert_close(d, want_d, rtol=1e-4, atol=1e-4)
    got_d, got_i = ort.InferenceSession(str(tmp_path / "nn.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"q": q.numpy()})
    np.testing.assert_allclose(got_d, want_d.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got_i, i.numpy())
