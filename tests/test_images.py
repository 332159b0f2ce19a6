"""Preprocessing: the file path (fit's decoding threads) and the array path give
the same pixels, for RGB, grey, palette and RGBA files; unreadable files name
themselves; batches keep order with and without a transform."""

import numpy as np
import pytest
from PIL import Image

from pyad.images import Preprocess, batches, read_image


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA"])
@pytest.mark.parametrize("crop", [None, 48])
def test_prepare_from_file_equals_from_array(tmp_path, mode, crop):
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / "x.png"
    img.save(path)
    pre = Preprocess(64, crop)
    a, b = pre.prepare(path), pre.prepare(read_image(path))
    assert a.shape == (crop or 64, crop or 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_prepare_reports_an_unreadable_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="images: cannot read .*bad.png"):
        Preprocess(64, None).prepare(bad)


def test_batches_keep_order_with_a_transform(tmp_path):
    paths = []
    for i in range(7):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((8, 8, 3), i * 10, np.uint8)).save(paths[-1])
    plain = [b for batch in batches(paths, 3) for b in batch]
    shrunk = [b for batch in batches(paths, 3, transform=lambda p: read_image(p)[:2, :2]) for b in batch]
    assert [int(x[0, 0, 0]) for x in plain] == [int(x[0, 0, 0]) for x in shrunk] == [i * 10 for i in range(7)]
    arrays = [b for batch in batches(np.stack(plain), 3, transform=lambda a: a[:1]) for b in batch]
    assert [a.shape for a in arrays] == [(1, 8, 3)] * 7
