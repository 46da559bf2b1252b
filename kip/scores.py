"""Fair scores of a distilled set, beside its accuracy: what the set is worth once what its labels
and its evaluation's augmentation contribute is taken out, what it costs to store, and how sure a
mean over a few networks is.

Accuracies are fractions in [0, 1], each the mean over the evaluation networks of one evaluation.
The label- and augmentation-robust scores are DD-Ranking's (Li et al., "DD-Ranking: Rethinking the
Evaluation of Dataset Distillation", 2025):

  HLR = acc(real, hard labels) - acc(set, hard labels)        hard-label recovery (lower: better)
  IOR = acc(set, its own evaluation) - acc(random real subset of the same size, same evaluation)
  LRS = 100 (e^a - e^-1) / (e - e^-1),  a = w IOR - (1 - w) HLR        (w = 0.5)
  ARS = 100 (e^b - e^-1) / (e - e^-1),  b = g (set - random, augmented)
                                          + (1 - g) (set - random, not augmented)  (g = 0.5)

a and b lie in [-1, 1], so both scores lie in [0, 100]; a set no better than random real images
with the same labels and augmentation, and as far from the full data as they are, scores about
27 (a = 0). The names of the evaluation a figure comes from travel with it: a score is only
compared with one made under the same evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["Interval", "interval95", "improvement_over_random", "label_robust_score",
           "augmentation_robust_score", "storage_bytes"]


class Interval(tuple):
  """(mean, half-width) of a 95% interval; `low` and `high` are its ends."""

  __slots__ = ()

  def __new__(cls, mean: float, half: float):
    return super().__new__(cls, (mean, half))

  @property
  def mean(self) -> float:
    return self[0]

  @property
  def half(self) -> float:
    return self[1]

  @property
  def low(self) -> float:
    return self[0] - self[1]

  @property
  def high(self) -> float:
    return self[0] + self[1]


def interval95(values: Sequence[float]) -> Interval:
  """The mean of `values` (one accuracy per evaluation network) and the half-width of its 95%
  interval, Student's t with n - 1 degrees of freedom times the standard error (the sample
  standard deviation, n - 1 in its denominator, over sqrt(n)); nan for one value."""
  from scipy import stats  # noqa: PLC0415  (scipy comes with jax)

  x = np.asarray(values, np.float64)
  if x.ndim != 1 or not len(x):
    raise ValueError(f"interval95 needs a list of values, got shape {x.shape}")
  if len(x) == 1:
    return Interval(float(x[0]), math.nan)
  half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
  return Interval(float(x.mean()), float(half))


def improvement_over_random(acc_set: float, acc_random: float) -> float:
  """IOR: the set's accuracy minus that of a random real subset of the same size under the same
  evaluation (same labels' kind, same augmentation, same networks)."""
  return acc_set - acc_random


def _normalised(x: float) -> float:
  return 100.0 * (math.exp(x) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


def label_robust_score(real_hard: float, set_hard: float, set_any: float, random_any: float,
                       w: float = 0.5) -> dict[str, float]:
  """HLR, IOR and LRS (see the module docstring) from four accuracies: the full real training set
  and the set, both with hard labels; the set and a random real subset of its size, both under
  the set's own evaluation (its learned or soft labels, its loss)."""
  if not 0 <= w <= 1:
    raise ValueError(f"w must lie in [0, 1], got {w}")
  hlr = real_hard - set_hard
  ior = improvement_over_random(set_any, random_any)
  return {"hlr": hlr, "ior": ior, "lrs": _normalised(w * ior - (1 - w) * hlr)}


def augmentation_robust_score(set_aug: float, random_aug: float, set_plain: float,
                              random_plain: float, gamma: float = 0.5) -> dict[str, float]:
  """The set's improvement over a random real subset of its size with the evaluation's
  augmentation and without it, and ARS (see the module docstring)."""
  if not 0 <= gamma <= 1:
    raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
  with_aug, without = set_aug - random_aug, set_plain - random_plain
  return {"ior_aug": with_aug, "ior_plain": without,
          "ars": _normalised(gamma * with_aug + (1 - gamma) * without)}


def storage_bytes(images: np.ndarray, labels: np.ndarray | None, extras: dict | None = None,
                  preprocessing: dict | None = None) -> dict[str, int]:
  """What a set costs to store, in bytes, each part as float32 unless it is hard: images;
  labels (one byte per image when they are hard class labels, a one-hot row per image each
  equal to the others up to a shift; else N x C float32); each extra (a learned learning rate,
  a Platt scale) as its float32 values; the preprocessing that must travel with the set (its
  arrays, e.g. per-channel mean and std, a whitening matrix)."""
  out = {"images": int(np.asarray(images).size) * 4}
  out["labels"] = 0 if labels is None else _label_bytes(np.asarray(labels))
  out["extras"] = sum(int(np.asarray(v).size) * 4 for v in (extras or {}).values())
  out["preprocessing"] = sum(int(np.asarray(v).size) * 4 for v in (preprocessing or {}).values()
                             if np.asarray(v).dtype.kind == "f")
  out["total"] = sum(out.values())
  return out


def _label_bytes(labels: np.ndarray) -> int:
  if labels.ndim == 1:
    return len(labels)  # class ids
  top = labels.max(axis=1, keepdims=True)
  rest = np.where(labels == top, -np.inf, labels).max(axis=1, keepdims=True)
  one_hot_like = (np.sum(labels == top, axis=1) == 1).all() and np.allclose(
      np.where(labels == top, rest, labels), rest)
  return len(labels) if one_hot_like else labels.size * 4
