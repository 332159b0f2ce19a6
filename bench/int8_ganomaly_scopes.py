"""Which quantised layers break GANomaly's int8 score (docs/deployment.md, the
GANomaly table): the test network of tests/test_export.py (CONFIGS of
test_detectors, 64 px, 20 noisy training images of data seed SEED, 2 of the 4 test
images with a bright defect), quantised with each part of the generator kept in
float in turn; prints the float scores, the spread of the normal validation scores
and the defect gap relative to the raw latent distance, then per variant the int8
scores, whether the defects still rank first, and the largest relative error of
the raw distance.

    python bench/int8_ganomaly_scopes.py 0     # from the repository root
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import noisy_images  # noqa: E402
from test_detectors import CONFIGS, REGISTRY, fit  # noqa: E402

from pyad import export as E  # noqa: E402

VARIANTS = [(), ("netg.encoder1",), ("netg.encoder2",), ("netg.decoder",), ("netg.encoder1", "netg.encoder2"),
            ("netg.encoder1", "netg.decoder"), ("netg.decoder", "netg.encoder2")]


def main(seed: int) -> None:
    train, test = noisy_images(seed, 64, 20, 4, 90, 160, 10)
    test[2:, 20:40, 20:40] = 255
    det = fit(REGISTRY["ganomaly"](**CONFIGS["ganomaly"][0]), train)
    span = det.score_max_ - det.score_min_
    fs = E.as_onnx(det).predict(test).scores
    fd = fs * span + det.score_min_  # the raw latent distances
    print("float", np.round(fs, 2), "validation spread / distance", span / det.score_min_,
          "defect gap / distance", (fd[2:].min() - fd[:2].max()) / fd.mean())
    saved = E.FLOAT_SCOPES.pop("ganomaly", None)  # measure from nothing kept float
    try:
        for keep in VARIANTS:
            s = det.quantize(train, max_images=16, exclude=keep).predict(test).scores
            d = s * span + det.score_min_
            ok = s[2:].min() > s[:2].max()
            print("float:", keep or "-", "int8 scores", np.round(s, 2), "ok" if ok else "REVERSED",
                  "max rel err", float(np.abs(d - fd).max() / fd.mean()))
    finally:
        if saved is not None:
            E.FLOAT_SCOPES["ganomaly"] = saved


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
