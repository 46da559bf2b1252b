"""Data: tfds loading of the real MNIST files, preprocessing, labels and sampling."""

import numpy as np
import pytest

from kip.data import (
  DataError,
  centered_one_hot,
  class_balanced_indices,
  fit_preprocessor,
  load_dataset,
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


def test_validation_split_is_carved_from_train(manual_dir, data_dir):
  splits = load_dataset("mnist", data_dir=data_dir, manual_dir=manual_dir, val_size=1000, seed=3)
  assert len(splits["validation"].labels) == 1000 and len(splits["train"].labels) == 59000
  counts = np.bincount(splits["validation"].labels, minlength=10)
  assert np.all(np.abs(counts - 100) <= 15)  # stratified: ~10% of the draw per class
  sums = splits["train"].images.sum(dtype=np.int64) + splits["validation"].images.sum(
      dtype=np.int64)
  assert int(sums) == 1567298545  # a partition of the training split


def test_missing_raw_files_offline_say_which_and_where(tmp_path):
  (tmp_path / "manual" / "fashion_mnist").mkdir(parents=True)
  with pytest.raises(DataError, match=r"lacks .*train-images-idx3-ubyte\.gz.*put tfds' raw"):
    load_dataset("fashion_mnist", data_dir=str(tmp_path / "tfds"),
                 manual_dir=str(tmp_path / "manual"))
  with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
    load_dataset("imagenet")


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
