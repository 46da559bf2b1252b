"""The pieces every kernel job assembles: preprocessed data, the initial support set, the KRR
evaluator on the full test split, and the distilled-set writer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

from kip.data import (
  Preprocessor,
  centered_one_hot,
  check_dataset,
  class_balanced_indices,
  fit_preprocessor,
  load_dataset,
)
from kip.io import DistilledSet, save_distilled
from kip.kernels import Kernel
from kip.krr import evaluate
from kip.sharding import shard_kernel

__all__ = ["Data", "prepare_data", "data_for_set", "initial_support", "shard_kernels",
           "make_evaluator", "write_distilled"]


class Data(NamedTuple):
  """Preprocessed splits. x_*: (n, H, W, C) float32; y_train: (n, C) centred one-hot;
  labels_*: (n,) int32."""

  x_train: np.ndarray
  y_train: np.ndarray
  labels_train: np.ndarray
  x_test: np.ndarray
  labels_test: np.ndarray
  preprocessor: Preprocessor
  num_classes: int


def prepare_data(dataset: str, *, zca: bool = False, data_dir: str | None = None,
                 manual_dir: str | None = None, val_size: int = 0, seed: int = 0,
                 preprocessor: Preprocessor | None = None) -> Data:
  """Loads `dataset`, fits the preprocessing on its training split (unless one is given) and
  applies it to train and test. With `val_size`, the held-out validation split is the test set."""
  _, num_classes = check_dataset(dataset)
  splits = load_dataset(dataset, data_dir=data_dir or None, manual_dir=manual_dir or None,
                        val_size=val_size, seed=seed)
  train = splits["train"]
  test = splits["validation"] if val_size else splits["test"]
  preprocessor = preprocessor or fit_preprocessor(train.images, zca=zca)
  return Data(preprocessor.apply(train.images), centered_one_hot(train.labels, num_classes),
              train.labels, preprocessor.apply(test.images), test.labels, preprocessor,
              num_classes)


def data_for_set(distilled: DistilledSet, dataset: str, *, zca: bool | None = None,
                 data_dir: str | None = None, manual_dir: str | None = None) -> Data:
  """The real splits in the distilled set's own preprocessed space.

  The set's stored preprocessing is used when it has one (ours); a released set's is refitted on
  the real training split as its name says (`zca`: standardisation + KIP's layer norm + ZCA;
  `nozca`: standardisation). `zca` forces either reading (None: from the file; a file that says
  nothing is taken as standardised only).
  """
  preprocessor = distilled.preprocessor
  zca = bool(distilled.zca) if zca is None else zca
  if preprocessor is not None and zca != (preprocessor.zca is not None):
    preprocessor = None
  return prepare_data(dataset, zca=zca, data_dir=data_dir, manual_dir=manual_dir,
                      preprocessor=preprocessor)


def initial_support(data: Data, ipc: int, seed: int, init: str = "real"
                    ) -> tuple[np.ndarray, np.ndarray]:
  """`ipc` images per class: class-balanced real training images, or Gaussian noise with the
  training set's per-pixel scale; labels are centred one-hot. Returns (n_s, H, W, C), (n_s, C)."""
  rng = np.random.default_rng([seed, 0])
  idx = class_balanced_indices(data.labels_train, ipc, rng, data.num_classes)
  labels = data.labels_train[idx]
  if init == "real":
    x = data.x_train[idx]
  elif init == "noise":
    scale = data.x_train[:10000].std()
    x = (rng.standard_normal((len(idx),) + data.x_train.shape[1:]) * scale).astype(np.float32)
  else:
    raise ValueError(f"unknown init {init!r}; choose real or noise")
  return x, centered_one_hot(labels, data.num_classes)


def shard_kernels(kernel: Kernel, mesh=None, memory_bytes: float | None = None
                  ) -> tuple[Callable, Callable]:
  """The kernel with its blocks across `mesh` within `memory_bytes` per device, twice: tiled for
  a differentiated loss (KIP's step), and for the forward pass only (evaluation, Label Solve)."""
  return tuple(shard_kernel(kernel.kernel_fn, kernel.covariance, mesh, memory_bytes,
                            backward=backward) for backward in (True, False))


def make_evaluator(kernel_fn: Callable, data: Data, *, reg: float, dtype=None,
                   progress: bool = False) -> Callable[[jax.Array, jax.Array], dict[str, float]]:
  """(x_support, y_support) -> {"test_acc", "test_mse"} by KRR on the whole test split.

  kernel_fn: a kernel_fn, or one from `shard_kernels` (the test kernel across its devices).
  """

  def evaluator(x_support, y_support):
    with tqdm(total=len(data.x_test), unit="img", desc="KRR evaluation", leave=False,
              disable=not progress, dynamic_ncols=True) as bar:
      return evaluate(kernel_fn, x_support, y_support, data.x_test, data.labels_test, reg=reg,
                      dtype=dtype, progress=bar.update)

  return evaluator


def write_distilled(path: str, x: np.ndarray, y: np.ndarray, data: Data, meta: dict) -> None:
  """Saves the support set with its preprocessing and metadata (atomically)."""
  save_distilled(path, DistilledSet(np.asarray(x), np.asarray(y), meta, data.preprocessor))
