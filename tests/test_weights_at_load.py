"""A model file says at load what backbone weights it needs, and finds them: the
recorded absolute path, the path as given, ``pyad.load(weights=...)``, or the copy
embedded with ``save(include_weights=True)``; checked by SHA-256 at load, not at the
first predict."""

import os

import numpy as np
import pytest
import torch

import pyad
from pyad.backbones import Backbone
from conftest import noisy_images

SMALL = dict(backbone="resnet18", image_size=64, batch_size=4, coreset_ratio=0.5)


@pytest.fixture(scope="module")
def data():
    return noisy_images(4, 64, 8, 2, 80, 170, 12)


def checkpoint(path, seed):
    torch.manual_seed(seed)
    torch.save(Backbone("resnet18", ("layer4",)).official_state_dict(), path)
    return path


def test_relative_weights_path_works_from_another_folder(data, tmp_path, monkeypatch):
    train, test = data
    (tmp_path / "w").mkdir()
    checkpoint(tmp_path / "w" / "r18.pth", 1)
    monkeypatch.chdir(tmp_path)
    det = pyad.PatchCore(weights="w/r18.pth", **SMALL).fit(train)
    want = det.predict(test).scores
    det.save(tmp_path / "m.pyad")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    back = pyad.load(tmp_path / "m.pyad")  # the recorded absolute path is found
    np.testing.assert_array_equal(back.predict(test).scores, want)


def test_missing_weights_fail_at_load_naming_what_is_needed(data, tmp_path):
    train, test = data
    path = checkpoint(tmp_path / "r18.pth", 1)
    det = pyad.PatchCore(weights=str(path), **SMALL).fit(train)
    want = det.predict(test).scores
    det.save(tmp_path / "m.pyad")
    moved = tmp_path / "moved.pth"
    os.replace(path, moved)
    with pytest.raises(ValueError, match=r"weights: the model was fitted with backbone weights sha256:.*weights="):
        pyad.load(tmp_path / "m.pyad")
    np.testing.assert_array_equal(pyad.load(tmp_path / "m.pyad", weights=moved).predict(test).scores, want)
    other = checkpoint(tmp_path / "other.pth", 2)
    with pytest.raises(ValueError, match="not the one fitted with"):
        pyad.load(tmp_path / "m.pyad", weights=other)


def test_embedded_weights_need_no_file(data, tmp_path):
    train, test = data
    path = checkpoint(tmp_path / "r18.pth", 1)
    det = pyad.PatchCore(weights=str(path), **SMALL).fit(train)
    want = det.predict(test).scores
    det.save(tmp_path / "m.pyad", include_weights=True)
    os.remove(path)
    np.testing.assert_array_equal(pyad.load(tmp_path / "m.pyad").predict(test).scores, want)


def test_random_init_models_need_no_weights(data, tmp_path):
    train, test = data
    det = pyad.PatchCore(weights=None, **SMALL).fit(train)
    det.save(tmp_path / "m.pyad")
    np.testing.assert_array_equal(pyad.load(tmp_path / "m.pyad").predict(test).scores, det.predict(test).scores)
