"""Distilled-set files: our layout, the released names and layout, malformed files."""

import os

import numpy as np
import pytest

from kip.data import fit_preprocessor
from kip.io import DistilledSet, FileFormatError, load_distilled, parse_release_name, save_distilled

RNG = np.random.default_rng(0)


def test_round_trip_keeps_release_keys_metadata_and_preprocessing(tmp_path):
  images = RNG.normal(size=(20, 28, 28, 1)).astype(np.float32)
  labels = (np.eye(10)[np.arange(20) % 10] - 0.1).astype(np.float32)
  pre = fit_preprocessor(RNG.integers(0, 256, (50, 28, 28, 1)).astype(np.uint8))
  path = tmp_path / "distilled.npz"
  meta = {"dataset": "mnist", "kernel": "fc-ntk", "step": 7, "seed": 3, "config": {"lr": 0.04}}
  save_distilled(str(path), DistilledSet(images, labels, meta, pre))
  assert os.listdir(tmp_path) == ["distilled.npz"]  # no temporary file left behind
  with np.load(path) as raw:  # the released layout, readable without this library
    assert raw["images"].shape == (20, 28, 28, 1) and raw["labels"].dtype == np.float32
  loaded = load_distilled(str(path), "mnist")
  np.testing.assert_array_equal(loaded.images, images)
  np.testing.assert_array_equal(loaded.labels, labels)
  assert loaded.meta == meta
  np.testing.assert_allclose(loaded.preprocessor.mean, pre.mean)
  assert loaded.zca is False


@pytest.mark.parametrize("name, expected", [
    ("kip/mnist/ConvNet_ssize100_nozca_l_noaug_ckpt1000.npz",
     ("kip", "mnist", "ConvNet", 100, False, True, False, 1000)),
    ("ls/cifar10/ConvNet_ssize500_zca.npz",
     ("ls", "cifar10", "ConvNet", 500, True, None, None, None)),
    ("kip_cifar10_ConvNet3_ssize100_zca_nol_noaug_ckpt1000.npz",
     ("kip", "cifar10", "ConvNet3", 100, True, False, False, 1000)),
    ("x/kip_fashion_mnist_ConvNet_ssize10_nozca_l_aug_ckpt50.npz",
     ("kip", "fashion_mnist", "ConvNet", 10, False, True, True, 50)),
    ("kip/svhn_cropped/ssize10_zca_l_noaug_ckpt500.npz",
     ("kip", "svhn_cropped", None, 10, True, True, False, 500)),
])
def test_release_names_are_parsed(name, expected):
  info = parse_release_name(name)
  assert (info.method, info.dataset, info.arch, info.ssize, info.zca, info.learned_labels,
          info.augmented, info.checkpoint) == expected


def test_unrelated_names_are_not_releases():
  assert parse_release_name("runs/distilled.npz") is None


def test_released_layout_loads_with_its_name(tmp_path):
  folder = tmp_path / "kip" / "mnist"
  folder.mkdir(parents=True)
  path = folder / "ConvNet_ssize20_nozca_l_noaug_ckpt1000.npz"
  np.savez(path, images=RNG.normal(size=(20, 28, 28, 1)),  # float64, as some copies are
           labels=RNG.normal(size=(20, 10)))
  loaded = load_distilled(str(path))
  assert loaded.images.dtype == np.float32 and loaded.dataset == "mnist"
  assert loaded.zca is False and loaded.release.learned_labels is True


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((4, 28, 28, 1))}, "missing key 'labels'"),
    ({"x_proto": np.zeros((4, 28, 28, 1)), "y_proto": np.zeros((5, 10))}, "4 images but 5 y_proto"),
    ({"images": np.zeros((4, 1, 28, 28)), "labels": np.zeros((4, 10))}, "NCHW"),
    ({"images": np.zeros((4, 28, 28, 1)), "labels": np.zeros((4, 3))}, "width 3.*10 classes"),
    ({"images": np.full((4, 28, 28, 1), np.nan), "labels": np.zeros((4, 10))}, "NaN"),
    ({"images": np.zeros((4, 28, 28, 1)), "labels": np.zeros((5, 10))}, r"\(N, C\)"),
])
def test_malformed_files_say_what_is_wrong(tmp_path, arrays, message):
  path = tmp_path / "bad.npz"
  np.savez(path, **arrays)
  with pytest.raises(FileFormatError, match=message):
    load_distilled(str(path), "mnist")


def test_not_an_npz(tmp_path):
  path = tmp_path / "junk.npz"
  path.write_text("not a zip")
  with pytest.raises(FileFormatError, match="not a readable .npz"):
    load_distilled(str(path))
