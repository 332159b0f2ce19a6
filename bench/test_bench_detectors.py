"""PatchCore, PaDiM and SPADE on MVTec AD bottle (image size 256, no crop,
random-init weights, seed 0, 2 threads) against anomalib 2.7.0 **timed in the same
run** on the same machine (its own virtual environment: /work/anomalib-venv or
$PYAD_ANOMALIB_PYTHON, running ../shared/tools/anomalib_baseline.py; the reference
rows are skipped when it is absent). Ratios come from this run only; memory in GB
(10^9 bytes) on both sides.

Each configuration runs in its own process (bench/run_detector.py) so that its peak
memory is its own. Targets: PaDiM R18 fit >= 5x, predict >= 3x, memory
<= 0.5x; PatchCore WRN50 1% fit >= 10x, predict >= 2x, memory <= 0.5x; PatchCore
10%: nearest-neighbour search <= 1/3 of predict latency.

anomalib's figures, as its runner reports them: fit includes its Engine start-up,
test time includes writing one result picture per image (its default), peak memory
is ru_maxrss of its process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import RESULTS, save

HERE = Path(__file__).parent
SHARED = HERE.parents[1] / "shared"
ROOT = SHARED / "data" / "mvtec_ad" / "bottle"
ANOMALIB_PY = Path(os.environ.get("PYAD_ANOMALIB_PYTHON", "/work/anomalib-venv/bin/python"))
BASELINE = SHARED / "tools" / "anomalib_baseline.py"
pytestmark = pytest.mark.skipif(not ROOT.is_dir(), reason="MVTec AD bottle not present")

CONFIGS = {  # key -> (pyad detector, parameters, anomalib model and coreset or None)
    "PaDiM-resnet18": ("PaDiM", {"backbone": "resnet18"}, ("padim", None)),
    "PatchCore-wrn50-1%": ("PatchCore", {"backbone": "wide_resnet50_2", "coreset_ratio": 0.01}, ("patchcore", 0.01)),
    "PatchCore-wrn50-10%": ("PatchCore", {"backbone": "wide_resnet50_2", "coreset_ratio": 0.1}, None),
    "SPADE-wrn50": ("SPADE", {"backbone": "wide_resnet50_2"}, None),
    # the same with the backbone in bfloat16 on the CPU (precision="bfloat16": a documented
    # deviation, fast where the CPU has bfloat16 dot products), against the same anomalib run
    "PaDiM-resnet18-bf16": ("PaDiM", {"backbone": "resnet18", "precision": "bfloat16"}, None),
    "PatchCore-wrn50-1%-bf16": ("PatchCore", {"backbone": "wide_resnet50_2", "coreset_ratio": 0.01,
                                              "precision": "bfloat16"}, None),
}
FLOAT32 = {"PaDiM-resnet18-bf16": "PaDiM-resnet18", "PatchCore-wrn50-1%-bf16": "PatchCore-wrn50-1%"}
TARGETS = {
    "PaDiM-resnet18": {"fit": 5, "predict": 3, "memory": 0.5},
    "PatchCore-wrn50-1%": {"fit": 10, "predict": 2, "memory": 0.5},
}
TARGETS.update({k: TARGETS[v] for k, v in FLOAT32.items()})


def anomalib(model: str, coreset: float | None) -> dict:
    if not ANOMALIB_PY.exists():
        pytest.skip(f"no anomalib venv at {ANOMALIB_PY} (set PYAD_ANOMALIB_PYTHON)")
    args = [str(ANOMALIB_PY), str(BASELINE), str(ROOT.parent), "bottle", model, "--threads", "2"]
    if coreset is not None:
        args += ["--coreset", str(coreset)]
    p = subprocess.run(args, capture_output=True, text=True, timeout=7200)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("key", list(CONFIGS))
def test_pyad(key):
    name, params, _ = CONFIGS[key]
    params = {"weights": None, "image_size": 256, "crop_size": None, "seed": 0, **params}
    proc = subprocess.run([sys.executable, str(HERE / "run_detector.py"), name, "--params", json.dumps(params)],
                          capture_output=True, text=True, timeout=7200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    RESULTS.setdefault("detectors", {})[key] = json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("key", [k for k, v in CONFIGS.items() if v[2]])
def test_anomalib(key):
    model, coreset = CONFIGS[key][2]
    RESULTS.setdefault("anomalib", {})[key] = anomalib(model, coreset)


def test_summary():
    rows, misses = {}, []
    ours, refs = RESULTS.get("detectors", {}), RESULTS.get("anomalib", {})
    for key, r in ours.items():
        row = dict(r)
        ref = refs.get(FLOAT32.get(key, key))
        if key in FLOAT32 and FLOAT32[key] in ours:  # what the reduced backbone costs in accuracy
            base = ours[FLOAT32[key]]
            row["delta_vs_float32"] = {m: r[m] - base[m] for m in ("image_auroc", "pixel_auroc")}
        if ref:
            row["anomalib"] = {"fit_s": ref["fit_s"], "predict_ms_per_image": ref["ms_per_test_image"],
                               "peak_rss_gb": ref["peak_rss_gb"], "metrics": ref["metrics"]}
            row["fit_speedup"] = ref["fit_s"] / r["fit_s"]
            row["predict_speedup"] = ref["ms_per_test_image"] / r["predict_ms_per_image"]
            row["memory_ratio"] = r["peak_rss_gb"] / ref["peak_rss_gb"]
            want = TARGETS.get(key, {})
            for what, ok in (("fit", row["fit_speedup"] >= want.get("fit", 0)),
                             ("predict", row["predict_speedup"] >= want.get("predict", 0)),
                             ("memory", row["memory_ratio"] <= want.get("memory", 1e9))):
                print(f"{'met ' if ok else 'MISS'} {key} {what}")
                if not ok:
                    misses.append(f"{key} {what}")
        stage = r["stage_ms"]
        row["search_share"] = stage.get("search", 0.0) / sum(v for k, v in stage.items() if k != "read")
        if key == "PatchCore-wrn50-10%":
            ok = row["search_share"] <= 1 / 3
            print(f"{'met ' if ok else 'MISS'} {key} search {row['search_share']:.0%} of predict")
            if not ok:
                misses.append(f"{key} search share")
        rows[key] = row
    save("detectors", rows)
    print(json.dumps(rows, indent=1))
    assert not misses, misses
