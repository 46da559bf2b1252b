"""Fair scores (kip/scores.py) against hand computations: Student's t interval, DD-Ranking's
label- and augmentation-robust scores, a set's storage cost."""

import math

import numpy as np
import pytest

from kip.scores import (
  augmentation_robust_score,
  interval95,
  label_robust_score,
  storage_bytes,
)


def test_interval_is_students_t_over_the_standard_error():
  # Five networks: mean 0.94, sample std sqrt(0.001) = 0.0316228, standard error 0.0141421;
  # t(0.975, 4) = 2.7764451 (tables), so the half-width is 0.0392649.
  interval = interval95([0.90, 0.92, 0.94, 0.96, 0.98])
  assert interval.mean == pytest.approx(0.94)
  assert interval.half == pytest.approx(0.0392649, abs=1e-7)
  assert (interval.low, interval.high) == pytest.approx((0.9007351, 0.9792649), abs=1e-7)
  # Two networks: t(0.975, 1) = 12.7062047; std of (0.5, 0.7) is 0.1414214, se 0.1.
  assert interval95([0.5, 0.7]).half == pytest.approx(1.27062047, abs=1e-7)
  assert math.isnan(interval95([0.5]).half)
  with pytest.raises(ValueError):
    interval95([])


def test_label_robust_score_by_hand():
  # HLR = 0.99 - 0.89 = 0.10, IOR = 0.95 - 0.85 = 0.10: a = 0, LRS = (1 - 1/e) / (e - 1/e).
  score = label_robust_score(real_hard=0.99, set_hard=0.89, set_any=0.95, random_any=0.85)
  assert score["hlr"] == pytest.approx(0.10) and score["ior"] == pytest.approx(0.10)
  assert score["lrs"] == pytest.approx(26.894142, abs=1e-6)
  # The full data recovered (HLR 0) and IOR 1: a = 0.5, (e^0.5 - e^-1) / (e - e^-1) = 0.5449458.
  assert label_robust_score(0.9, 0.9, 1.0, 0.0)["lrs"] == pytest.approx(54.49458, abs=1e-5)
  assert label_robust_score(0.9, 0.9, 1.0, 0.0, w=1.0)["lrs"] == pytest.approx(100.0)
  assert label_robust_score(1.0, 0.0, 0.5, 0.5, w=0.0)["lrs"] == pytest.approx(0.0, abs=1e-12)
  with pytest.raises(ValueError):
    label_robust_score(0.9, 0.9, 1.0, 0.0, w=1.5)


def test_augmentation_robust_score_by_hand():
  # +0.20 over random with augmentation, +0.10 without: b = 0.15,
  # (e^0.15 - e^-1) / (e - e^-1) = (1.1618342 - 0.3678794) / 2.3504024 = 0.3377953.
  score = augmentation_robust_score(0.80, 0.60, 0.70, 0.60)
  assert (score["ior_aug"], score["ior_plain"]) == pytest.approx((0.20, 0.10))
  assert score["ars"] == pytest.approx(33.77953, abs=1e-5)
  assert augmentation_robust_score(0.8, 0.6, 0.7, 0.6, gamma=0.0)["ars"] == pytest.approx(
      100 * (math.exp(0.1) - math.exp(-1)) / (math.e - math.exp(-1)))


def test_storage_counts_what_must_travel_with_the_set():
  images = np.zeros((10, 28, 28, 1), np.float32)
  hard = np.eye(10, dtype=np.float32) - 0.1  # our centred one-hot: a class id each
  cost = storage_bytes(images, hard, preprocessing={
      "preprocessing": np.asarray("standardize"), "pre_mean": np.asarray([0.13]),
      "pre_std": np.asarray([0.31])})
  assert cost == {"images": 31_360, "labels": 10, "extras": 0, "preprocessing": 8,
                  "total": 31_378}
  soft = np.random.default_rng(0).random((10, 10)).astype(np.float32)
  cost = storage_bytes(images, soft, extras={"lr": np.asarray(0.01)})
  assert (cost["labels"], cost["extras"], cost["total"]) == (400, 4, 31_764)
  assert storage_bytes(images, np.arange(10))["labels"] == 10  # class ids as stored by DC
  tie = hard.copy()
  tie[0, 1] = tie[0, 0]  # two classes at the top: not a hard label
  assert storage_bytes(images, tie)["labels"] == 400
