"""Data: tfds loading of the real MNIST files, preprocessing, labels and sampling."""

import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, make_mhist_folder

import kip.data
from kip.data import (
  DataError,
  Preprocessor,
  centered_one_hot,
  class_balanced_indices,
  fit_preprocessor,
  load_dataset,
  one_hot,
  sample_target_batch,
)


def test_mnist_loads_from_raw_files_and_matches_published_statistics(mnist):
  train, test = mnist["train"], mnist["test"]
  assert train.images.shape == (60000, 28, 28, 1) and train.images.dtype == np.uint8
  assert test.images.shape == (10000, 28, 28, 1)
  # Pixel sums and class counts from shared/data/README.md (the canonical files).
  assert int(train.images.sum(dtype=np.int64)) == 1567298545
  assert int(test.images.sum(dtype=np.int64)) == 264923200
  assert np.bincount(train.labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265,
                                                5851, 5949]
  assert len(mnist["validation"].labels) == 0


@pytest.mark.slow
def test_fashion_mnist_is_not_mnist_when_both_share_a_data_dir(mnist, manual_dir, data_dir):
  """Both built offline into one data_dir (MNIST first, by the `mnist` fixture): Fashion-MNIST
  has its own pixels (tfds names extracted manual files by file name alone, and the two datasets'
  files share names). Sums and counts from shared/data/README.md."""
  if not manual_dir or not os.path.exists(os.path.join(manual_dir, "fashion_mnist",
                                                       "train-images-idx3-ubyte.gz")):
    pytest.skip("no Fashion-MNIST raw files to build from offline")
  fashion = load_dataset("fashion_mnist", data_dir=data_dir, manual_dir=manual_dir)
  assert int(fashion["train"].images.sum(dtype=np.int64)) == 3431114169
  assert int(fashion["test"].images.sum(dtype=np.int64)) == 573469082
  assert np.bincount(fashion["train"].labels).tolist() == [6000] * 10


def test_validation_split_is_carved_from_train(manual_dir, data_dir):
  splits = load_dataset("mnist", data_dir=data_dir, manual_dir=manual_dir, val_size=1000, seed=3)
  assert len(splits["validation"].labels) == 1000 and len(splits["train"].labels) == 59000
  counts = np.bincount(splits["validation"].labels, minlength=10)
  assert np.all(np.abs(counts - 100) <= 15)  # stratified: ~10% of the draw per class
  sums = splits["train"].images.sum(dtype=np.int64) + splits["validation"].images.sum(
      dtype=np.int64)
  assert int(sums) == 1567298545  # a partition of the training split


@pytest.mark.slow
def test_later_loads_read_the_decoded_splits_without_tensorflow(manual_dir, data_dir, tmp_path,
                                                                monkeypatch):
  """The first load decodes through tfds and leaves the arrays beside its files; the next reads
  them back bit for bit without tfds, and a damaged file is decoded again and replaced."""
  prepared = next(pathlib.Path(data_dir, "mnist").glob("[0-9]*/dataset_info.json")).parent
  copy = tmp_path / "tfds" / "mnist" / prepared.name
  shutil.copytree(prepared, copy, ignore=shutil.ignore_patterns(kip.data.ARRAY_CACHE + "*"))
  decoded = load_dataset("mnist", data_dir=str(tmp_path / "tfds"))  # through tfds
  cache = copy / kip.data.ARRAY_CACHE
  assert cache.is_file() and not list(copy.glob("*.tmp"))

  def no_tfds():
    raise AssertionError("tfds was imported")

  tfds = kip.data._import_tfds
  monkeypatch.setattr(kip.data, "_import_tfds", no_tfds)
  again = load_dataset("mnist", data_dir=str(tmp_path / "tfds"))
  for split in ("train", "test"):
    np.testing.assert_array_equal(again[split].images, decoded[split].images)
    np.testing.assert_array_equal(again[split].labels, decoded[split].labels)

  cache.write_bytes(cache.read_bytes()[:1000])  # a write cut short
  monkeypatch.setattr(kip.data, "_import_tfds", tfds)
  repaired = load_dataset("mnist", data_dir=str(tmp_path / "tfds"))
  np.testing.assert_array_equal(repaired["train"].images, decoded["train"].images)
  monkeypatch.setattr(kip.data, "_import_tfds", no_tfds)
  np.testing.assert_array_equal(load_dataset("mnist", data_dir=str(tmp_path / "tfds"))[
      "test"].labels, decoded["test"].labels)


def test_missing_raw_files_offline_say_which_and_where(tmp_path):
  (tmp_path / "manual" / "fashion_mnist").mkdir(parents=True)
  with pytest.raises(DataError, match=r"lacks .*train-images-idx3-ubyte\.gz.*put tfds' raw"):
    load_dataset("fashion_mnist", data_dir=str(tmp_path / "tfds"),
                 manual_dir=str(tmp_path / "manual"))
  with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
    load_dataset("imagenet")


def test_the_missing_files_hint_names_what_the_user_set(tmp_path, monkeypatch):
  """The folder came from --manual-dir or from $KIP_MANUAL_DIR: the hint names that one."""
  (tmp_path / "manual" / "fashion_mnist").mkdir(parents=True)
  monkeypatch.setenv("KIP_MANUAL_DIR", str(tmp_path / "manual"))
  with pytest.raises(DataError, match=r"unset KIP_MANUAL_DIR to download\)$") as info:
    load_dataset("fashion_mnist", data_dir=str(tmp_path / "tfds"))
  assert "--manual-dir" not in str(info.value)
  with pytest.raises(DataError, match=r"drop --manual-dir to download\)$"):
    load_dataset("fashion_mnist", data_dir=str(tmp_path / "tfds"),
                 manual_dir=str(tmp_path / "manual"))


def test_offline_without_manual_dir_fails_at_once(tmp_path, monkeypatch):
  """No network: one DataError line within seconds, not minutes of tfds' download retries."""
  kip.data._import_tfds()  # TensorFlow's import is not what this times
  probes = []

  def unreachable(host, port, timeout):
    probes.append((host, port, timeout))
    raise TimeoutError("timed out")

  monkeypatch.setattr(kip.data, "_connect", unreachable)
  monkeypatch.delenv("KIP_MANUAL_DIR", raising=False)
  start = time.monotonic()
  with pytest.raises(DataError) as error:
    load_dataset("mnist", data_dir=str(tmp_path / "fresh"), manual_dir="")
  assert time.monotonic() - start < 5
  message = str(error.value)
  assert "\n" not in message and message.startswith("could not download mnist (no connection to ")
  assert "offline, pass --manual-dir DIR with" in message and "DIR/mnist/" in message
  assert len(probes) == 1 and probes[0][2] <= 3


@pytest.mark.parametrize("url, proxies, expected", [
    ("https://storage.googleapis.com/a/b.gz", {}, ("storage.googleapis.com", 443)),
    ("http://ufldl.stanford.edu/x.mat", {}, ("ufldl.stanford.edu", 80)),
    ("https://storage.googleapis.com/a/b.gz", {"HTTPS_PROXY": "http://proxy.example:3128"},
     ("proxy.example", 3128)),
])
def test_connectivity_probe_targets_the_download_host_or_its_proxy(url, proxies, expected,
                                                                   monkeypatch):
  for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
    monkeypatch.delenv(name, raising=False)
  for name, value in proxies.items():
    monkeypatch.setenv(name, value)
  probes = []
  monkeypatch.setattr(kip.data, "_connect", lambda *args: probes.append(args))
  assert kip.data.unreachable_host([url]) is None
  assert probes == [(*expected, kip.data.PROBE_TIMEOUT_S)]
  assert kip.data.unreachable_host([]) is None and len(probes) == 1  # nothing to download


@pytest.mark.slow
def test_tensorflow_import_prints_nothing():
  """TensorFlow's C++ start-up lines (absl pre-init warning, oneDNN and CUDA notices, `E0000 ...
  failed call to cuInit` without a GPU) stay out of a command's stderr, even without the
  TF_CPP_MIN_LOG_LEVEL the test runner sets."""
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  code = ("from kip.data import _import_tfds\n"
          "tfds = _import_tfds()\n"
          "import tensorflow as tf\n"
          "print(int(tf.constant(2) * 3))\n")
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == "6"
  for noise in ("cuInit", "E0000", "I0000", "W0000", "WARNING: All log messages before absl"):
    assert noise not in done.stderr, done.stderr


def test_captured_stderr_is_shown_only_when_the_import_fails(capfd):
  with kip.data._stderr_captured():
    os.write(2, b"chatter\n")
  with pytest.raises(RuntimeError), kip.data._stderr_captured():
    os.write(2, b"the reason it failed\n")
    raise RuntimeError("import failed")
  err = capfd.readouterr().err
  assert "chatter" not in err and "the reason it failed" in err


def test_standardisation_is_fitted_on_train_and_inverts(mnist):
  pre = fit_preprocessor(mnist["train"].images[:5000])
  x = pre.apply(mnist["train"].images[:5000])
  assert x.dtype == np.float32
  np.testing.assert_allclose(x.mean(), 0, atol=1e-5)
  np.testing.assert_allclose(x.std(), 1, atol=1e-4)
  np.testing.assert_allclose(pre.invert(x) * 255, mnist["train"].images[:5000], atol=1e-3)


def test_zca_whitens_with_the_published_regulariser():
  """After layer norm, W = U diag((s + 0.1 tr/d)^-1/2) U^T, so the whitened covariance has
  eigenvalues s / (s + reg): checked against an independent eigendecomposition."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(500, 4, 4, 3)).astype(np.uint8)
  pre = fit_preprocessor(images, zca=True)
  x = (images / 255.0 - images.reshape(-1, 3).mean(0) / 255.0) / (images.reshape(-1, 3) / 255.0
                                                                    ).std(0)
  x = x - x.mean(axis=(1, 2, 3), keepdims=True)
  x = x / np.linalg.norm(x.reshape(500, -1), axis=1)[:, None, None, None]
  flat = x.reshape(500, -1)
  s = np.linalg.eigvalsh(flat.T @ flat / 500)
  reg = 0.1 * s.sum() / len(s)
  white = pre.apply(images).reshape(500, -1).astype(np.float64)
  got = np.sort(np.linalg.eigvalsh(white.T @ white / 500))
  np.testing.assert_allclose(got, np.sort(np.maximum(s, 0) / (np.maximum(s, 0) + reg)),
                             atol=2e-5)
  assert pre.name == "standardize+layernorm+zca"


def _reference_frepo_zca(images, reg_coef):
  """FRePo's recipe in float64 NumPy: per-channel standardisation, per-pixel centring,
  cov = X^T X / n, W = U diag((s + reg tr/d)^-1/2) U^T. Returns (centred X, cov, U, s, reg)."""
  x = images.astype(np.float64) / 255.0
  channels = x.reshape(-1, x.shape[-1])
  flat = ((x - channels.mean(0)) / channels.std(0)).reshape(len(x), -1)
  flat = flat - flat.mean(0)
  cov = flat.T @ flat / len(flat)
  s, u = np.linalg.eigh(cov)
  return flat, cov, u, s, reg_coef * s.sum() / len(s)


def test_zca_without_layer_norm_follows_frepo():
  rng = np.random.default_rng(1)
  # Correlated pixels, so whitening has something to undo.
  base = rng.normal(size=(600, 4, 4, 1)) * 40 + rng.normal(size=(600, 4, 4, 3)) * 20 + 128
  images = np.clip(base, 0, 255).astype(np.uint8)
  pre = fit_preprocessor(images, zca=True, zca_layer_norm=False)
  flat, cov, u, s, reg = _reference_frepo_zca(images, 0.1)
  w = pre.zca
  expected = (u * (s / (s + reg))) @ u.T
  rel = np.linalg.norm(w @ cov @ w - expected) / np.linalg.norm(expected)
  assert rel < 1e-10
  # The whitened training set has exactly that covariance and zero per-pixel mean.
  white = pre.apply(images).reshape(600, -1).astype(np.float64)
  np.testing.assert_allclose(white.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(white, flat @ ((u * (s + reg) ** -0.5) @ u.T), atol=1e-5)
  rel = np.linalg.norm(white.T @ white / 600 - expected) / np.linalg.norm(expected)
  assert rel < 1e-5
  # No layer norm to lose: inverting recovers the pixels.
  np.testing.assert_allclose(pre.invert(pre.apply(images)) * 255, images, atol=1e-3)
  assert pre.name == "standardize+zca" and not pre.zca_layer_norm


def test_zca_without_layer_norm_leaves_unseen_directions_unscaled_when_n_below_d():
  """FRePo's rank control: with n < d, the d - n smallest-variance directions keep scale 1."""
  images = np.random.default_rng(2).integers(0, 256, size=(20, 4, 4, 3)).astype(np.uint8)
  pre = fit_preprocessor(images, zca=True, zca_layer_norm=False)
  _, _, _, s, reg = _reference_frepo_zca(images, 0.1)
  got = np.sort(np.linalg.eigvalsh(pre.zca))
  want = np.sort(np.concatenate([np.ones(48 - 20), (np.maximum(s[-20:], 0) + reg) ** -0.5]))
  np.testing.assert_allclose(got, want, rtol=1e-10)


def test_preprocessing_is_stored_and_files_without_the_flag_mean_layer_norm():
  images = np.random.default_rng(3).integers(0, 256, size=(200, 4, 4, 3)).astype(np.uint8)
  for layer_norm in (True, False):
    pre = fit_preprocessor(images, zca=True, zca_layer_norm=layer_norm)
    arrays = pre.to_arrays()
    assert bool(arrays["pre_zca_layer_norm"]) is layer_norm and str(arrays["preprocessing"]) == (
        "standardize+layernorm+zca" if layer_norm else "standardize+zca")
    loaded = Preprocessor.from_arrays(arrays)
    assert loaded.zca_layer_norm is layer_norm
    np.testing.assert_allclose(loaded.apply(images), pre.apply(images), atol=1e-4)
  old = fit_preprocessor(images, zca=True).to_arrays()
  del old["pre_zca_layer_norm"]  # written before the flag existed
  assert Preprocessor.from_arrays(old).zca_layer_norm is True
  broken = fit_preprocessor(images, zca=True, zca_layer_norm=False).to_arrays()
  del broken["pre_zca_mean"]
  with pytest.raises(DataError, match="lacks 'pre_zca_mean'"):
    Preprocessor.from_arrays(broken)
  assert Preprocessor.from_arrays(fit_preprocessor(images).to_arrays()).zca is None


def test_one_hot_plain_and_centred():
  y = one_hot(np.array([2, 0]), 3)
  assert y.dtype == np.float32 and y.tolist() == [[0, 0, 1], [1, 0, 0]]
  np.testing.assert_allclose(centered_one_hot(np.array([2, 0]), 3),
                             [[-1 / 3, -1 / 3, 2 / 3], [2 / 3, -1 / 3, -1 / 3]], rtol=1e-6)
  with pytest.raises(DataError):
    one_hot(np.array([-1]), 3)


def test_centered_one_hot_any_class_count():
  y = centered_one_hot(np.array([0, 99, 5]), 100)
  assert y.shape == (3, 100) and y.dtype == np.float32
  np.testing.assert_allclose(y.sum(1), 0, atol=1e-5)
  assert y[1, 99] == pytest.approx(0.99) and y[1, 0] == pytest.approx(-0.01)
  with pytest.raises(DataError):
    centered_one_hot(np.array([10]), 10)


def test_class_balanced_sampling_is_seeded_and_balanced():
  labels = np.repeat(np.arange(10), 50)
  a = class_balanced_indices(labels, 7, np.random.default_rng(1))
  b = class_balanced_indices(labels, 7, np.random.default_rng(1))
  c = class_balanced_indices(labels, 7, np.random.default_rng(2))
  assert np.array_equal(a, b) and not np.array_equal(a, c)
  assert np.bincount(labels[a]).tolist() == [7] * 10 and len(set(a)) == 70
  batch = sample_target_batch(labels, 53, seed=0, step=4, num_classes=10)
  counts = np.bincount(labels[batch], minlength=10)
  assert len(batch) == 53 and counts.min() == 5 and counts.max() == 6
  assert np.array_equal(batch, sample_target_batch(labels, 53, seed=0, step=4, num_classes=10))
  assert not np.array_equal(batch, sample_target_batch(labels, 53, seed=0, step=5,
                                                       num_classes=10))


def test_mhist_loads_from_its_published_folder_layout(tmp_path):
  rows = [("HP", "train"), ("SSA", "test"), ("SSA", "train"), ("HP", "train"), ("HP", "test"),
          ("SSA", "train")]
  folder, pixels = make_mhist_folder(tmp_path, rows)
  splits = load_dataset("mhist", manual_dir=str(tmp_path), val_size=2, seed=0)
  train, val, test = splits["train"], splits["validation"], splits["test"]
  assert test.images.shape == (2, 224, 224, 3) and test.images.dtype == np.uint8
  np.testing.assert_array_equal(test.images[0], pixels["MHIST_001.png"])
  np.testing.assert_array_equal(test.images[1], pixels["MHIST_004.png"])
  assert test.labels.tolist() == [1, 0]  # HP = 0, SSA = 1
  # Train (csv order 0, 2, 3, 5) minus a 2-image class-stratified validation draw.
  assert len(train.labels) == 2 and len(val.labels) == 2
  assert sorted(val.labels.tolist()) == [0, 1] and sorted(train.labels.tolist()) == [0, 1]
  everything = {img.tobytes() for img in np.concatenate([train.images, val.images])}
  assert everything == {pixels[f"MHIST_{i:03d}.png"].tobytes() for i in (0, 2, 3, 5)}
  # The folder itself as --manual-dir works too.
  assert len(load_dataset("mhist", manual_dir=str(folder))["test"].labels) == 2


@pytest.mark.parametrize("damage, message", [
    ("no_folder", r"MHIST needs .*annotations\.csv.*download it from https://bmirds"),
    ("no_images", r"MHIST needs its images in .*images/ \(unzip images\.zip there\)"),
    ("column", r"annotations\.csv lacks the column\(s\) Partition"),
    ("empty", r"annotations\.csv lists no images"),
    ("label", r"annotations\.csv line 3: label 'TA' is not one of HP, SSA"),
    ("partition", r"line 2: partition 'dev' is not train or test"),
    ("size", r"line 2: .*MHIST_000\.png is 100x100x3, MHIST images are 224x224x3"),
    ("missing_image", r"line 3: cannot read image .*MHIST_001\.png"),
])
def test_a_malformed_mhist_folder_is_one_clear_error(tmp_path, damage, message):
  rows = [("HP", "train"), ("SSA", "test")]
  if damage == "no_folder":
    (tmp_path / "mhist").mkdir()
  else:
    size = (100, 100) if damage == "size" else (224, 224)
    folder, _ = make_mhist_folder(tmp_path, rows, size=size)
    csv = folder / "annotations.csv"
    text = csv.read_text()
    if damage == "no_images":
      (folder / "images").rename(folder / "other")
      (folder / "images.zip").write_bytes(b"")
    elif damage == "empty":
      csv.write_text(text.splitlines()[0] + "\n")
    elif damage == "column":
      csv.write_text(text.replace(",Partition", ",Split"))
    elif damage == "label":
      csv.write_text(text.replace("SSA,3", "TA,3"))
    elif damage == "partition":
      csv.write_text(text.replace("HP,1,train", "HP,1,dev"))
    elif damage == "missing_image":
      (folder / "images" / "MHIST_001.png").unlink()
  with pytest.raises(DataError, match=message):
    load_dataset("mhist", manual_dir=str(tmp_path))


def test_loading_without_tensorflow_datasets_is_one_line_naming_the_extra(monkeypatch):
  import sys

  from kip.data import DataError, _import_tfds

  monkeypatch.setitem(sys.modules, "tensorflow", None)  # as if neither were installed
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(DataError, match=r"pip install 'kip-jax\[data\]'"):
    _import_tfds.__wrapped__()  # past the cache an earlier load in this process may have filled
