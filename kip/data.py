"""Datasets through tensorflow-datasets, KIP's preprocessing, centred labels and seeded sampling.

Loading goes through tfds' own builders: online they download as usual; offline they are built from
the raw files of tfds' download placed in `manual_dir/<dataset>/` (passed to tfds as
`DownloadConfig(manual_dir=...)`). Preprocessing is fitted on the training split and applied
identically to every split; it is saved with a distilled set and can be inverted for display.
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import numpy as np

__all__ = [
    "DATASETS",
    "DataError",
    "Split",
    "Preprocessor",
    "load_dataset",
    "fit_preprocessor",
    "centered_one_hot",
    "class_balanced_indices",
    "sample_target_batch",
]

# tfds name -> (image shape, number of classes); what the loaders and file checks agree on.
DATASETS: dict[str, tuple[tuple[int, int, int], int]] = {
    "mnist": ((28, 28, 1), 10),
    "fashion_mnist": ((28, 28, 1), 10),
    "cifar10": ((32, 32, 3), 10),
    "cifar100": ((32, 32, 3), 100),
    "svhn_cropped": ((32, 32, 3), 10),
}

MANUAL_DIR_ENV = "KIP_MANUAL_DIR"
DATA_DIR_ENV = "KIP_DATA_DIR"


class DataError(ValueError):
  """A problem with the data a user asked for (unknown name, missing files)."""


class Split(NamedTuple):
  """One split: `images` (n, H, W, C) uint8 and `labels` (n,) int32."""

  images: np.ndarray
  labels: np.ndarray


def check_dataset(name: str) -> tuple[tuple[int, int, int], int]:
  if name not in DATASETS:
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
  return DATASETS[name]


def _raw_files(builder) -> list[str]:
  return sorted({url.rstrip("/").split("/")[-1] for url in (builder.url_infos or {})})


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    val_size: int = 0,
    seed: int = 0,
) -> dict[str, Split]:
  """Loads `train`, `validation` and `test` splits of a tfds image-classification dataset.

  Args:
    name: a tfds name from `DATASETS`.
    data_dir: where tfds keeps prepared datasets (default: `$KIP_DATA_DIR`, else tfds' default).
    manual_dir: a folder with one subfolder per dataset holding the raw files of tfds' download, for
      building offline (default: `$KIP_MANUAL_DIR`). Unused once the dataset is prepared.
    val_size: images carved from the training split (a seeded, class-stratified draw) to form
      `validation`; the rest stays in `train`. 0 leaves `validation` empty.
    seed: seed of that draw.

  Returns:
    {"train", "validation", "test"} -> Split with uint8 images in NHWC.
  """
  check_dataset(name)
  data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or None
  manual_dir = manual_dir or os.environ.get(MANUAL_DIR_ENV) or None
  tfds = _import_tfds()
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    download_config = None
    if manual_dir is not None:
      folder = os.path.join(manual_dir, name)
      if not os.path.isdir(folder) and all(
          os.path.exists(os.path.join(manual_dir, f)) for f in _raw_files(builder)):
        folder = manual_dir  # the raw files were given directly, without the dataset subfolder
      missing = [f for f in _raw_files(builder) if not os.path.exists(os.path.join(folder, f))]
      if missing:
        raise DataError(
            f"{name} is not prepared and {folder} lacks {', '.join(missing)}: put tfds' raw files "
            f"for {name} there (or drop --manual-dir to download)")
      download_config = tfds.download.DownloadConfig(manual_dir=folder)
    try:
      builder.download_and_prepare(download_config=download_config)
    except Exception as e:  # noqa: BLE001  (tfds raises many types for a failed download)
      if manual_dir is not None:
        raise
      raise DataError(
          f"could not download {name} ({type(e).__name__}); offline, pass --manual-dir DIR with "
          f"{', '.join(_raw_files(builder))} in DIR/{name}/") from e
  splits = {}
  for split in ("train", "test"):
    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    splits[split] = Split(arrays["image"].astype(np.uint8), arrays["label"].astype(np.int32))
  train = splits["train"]
  if val_size < 0 or val_size >= len(train.labels):
    raise DataError(f"val_size must be in [0, {len(train.labels)}), got {val_size}")
  rng = np.random.default_rng(seed)
  val_idx = _stratified_draw(train.labels, val_size, rng)
  keep = np.ones(len(train.labels), bool)
  keep[val_idx] = False
  splits["validation"] = Split(train.images[val_idx], train.labels[val_idx])
  splits["train"] = Split(train.images[keep], train.labels[keep])
  return splits


def _import_tfds():
  # Imported here, not at module level: TensorFlow costs seconds to import and must never take
  # accelerator memory that JAX needs. Its C++ start-up chatter (CUDA probes) is silenced.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import tensorflow as tf  # noqa: PLC0415
  import tensorflow_datasets as tfds  # noqa: PLC0415

  tf.config.set_visible_devices([], "GPU")
  return tfds


def _stratified_draw(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
  """`n` indices, spread over classes in proportion to their frequency."""
  if n == 0:
    return np.zeros(0, np.int64)
  order = rng.permutation(len(labels))
  # Sorting a random permutation by class and taking every k-th keeps class proportions.
  by_class = order[np.argsort(labels[order], kind="stable")]
  picks = np.linspace(0, len(labels), n, endpoint=False).astype(np.int64)
  return np.sort(by_class[picks])


# ----------------------------------------------------------------------------------------------
# Preprocessing


@dataclasses.dataclass(frozen=True)
class Preprocessor:
  """Per-channel standardisation, optionally followed by KIP's per-image layer norm and ZCA.

  Attributes:
    mean, std: (C,) float64 per-channel statistics of the training images scaled to [0, 1].
    zca: (d, d) float64 whitening matrix (d = H*W*C) or None.
    zca_reg: the regulariser strength it was fitted with (x tr(cov)/d), or None.
  """

  mean: np.ndarray
  std: np.ndarray
  zca: np.ndarray | None = None
  zca_reg: float | None = None

  @property
  def name(self) -> str:
    return "standardize" if self.zca is None else "standardize+layernorm+zca"

  def apply(self, images: np.ndarray) -> np.ndarray:
    """(n, H, W, C) uint8 (or [0, 255] float) -> (n, H, W, C) float32 in preprocessed space."""
    x = (np.asarray(images, np.float64) / 255.0 - self.mean) / self.std
    if self.zca is not None:
      x = _layer_norm(x)
      x = (x.reshape(len(x), -1) @ self.zca).reshape(x.shape)
    return x.astype(np.float32)

  def invert(self, x: np.ndarray) -> np.ndarray:
    """Preprocessed (n, H, W, C) -> (n, H, W, C) float in [0, 1], for display.

    ZCA is undone exactly; the per-image mean and scale removed by layer norm are not recoverable,
    so each image is rescaled to the training set's standardised range before un-standardising.
    """
    x = np.asarray(x, np.float64)
    if self.zca is not None:
      x = np.linalg.solve(self.zca, x.reshape(len(x), -1).T).T.reshape(x.shape)
      x = x / (x.std(axis=(1, 2, 3), keepdims=True) + 1e-12)
    return np.clip(x * self.std + self.mean, 0.0, 1.0)

  def to_arrays(self) -> dict[str, np.ndarray]:
    out = {"preprocessing": np.asarray(self.name), "pre_mean": self.mean, "pre_std": self.std}
    if self.zca is not None:
      out["pre_zca"] = self.zca.astype(np.float32)
      out["zca_reg"] = np.asarray(self.zca_reg)
    return out

  @classmethod
  def from_arrays(cls, arrays) -> Preprocessor | None:
    if "pre_mean" not in arrays:
      return None
    zca = np.asarray(arrays["pre_zca"], np.float64) if "pre_zca" in arrays else None
    reg = float(arrays["zca_reg"]) if "zca_reg" in arrays else None
    mean = np.asarray(arrays["pre_mean"], np.float64)
    return cls(mean, np.asarray(arrays["pre_std"], np.float64), zca, reg)


def _layer_norm(x: np.ndarray) -> np.ndarray:
  """KIP's per-image normalisation: subtract the image's mean, divide by its L2 norm."""
  x = x - x.mean(axis=(1, 2, 3), keepdims=True)
  return x / np.linalg.norm(x.reshape(len(x), -1), axis=1).reshape(-1, 1, 1, 1)


def fit_preprocessor(train_images: np.ndarray, *, zca: bool = False,
                     zca_reg: float = 0.1) -> Preprocessor:
  """Fits the preprocessing on (n, H, W, C) uint8 training images, in float64.

  ZCA (as in the KIP/LS releases): after standardisation and layer norm, `cov = X^T X / n`,
  `W = U diag((s + zca_reg * tr(cov)/d)^-1/2) U^T`.
  """
  x = np.asarray(train_images, np.float64) / 255.0
  mean = x.mean(axis=(0, 1, 2))
  std = x.std(axis=(0, 1, 2))
  if not zca:
    return Preprocessor(mean, std)
  flat = _layer_norm((x - mean) / std).reshape(len(x), -1)
  cov = flat.T @ flat / len(flat)
  s, u = np.linalg.eigh(cov)
  reg = zca_reg * np.trace(cov) / cov.shape[0]
  whiten = (u * (np.maximum(s, 0.0) + reg) ** -0.5) @ u.T
  return Preprocessor(mean, std, whiten, zca_reg)


# ----------------------------------------------------------------------------------------------
# Labels and sampling


def centered_one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """(n,) int -> (n, num_classes) float32 one-hot minus 1/num_classes, as in KIP."""
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
  return (np.eye(num_classes, dtype=np.float32)[labels] - 1.0 / num_classes).astype(np.float32)


def class_balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator,
                           num_classes: int | None = None) -> np.ndarray:
  """`per_class` distinct random indices of each class, grouped by class (class 0 first)."""
  num_classes = num_classes or int(labels.max()) + 1
  chosen = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) < per_class:
      raise DataError(f"class {c} has {len(members)} images, fewer than the {per_class} requested")
    chosen.append(rng.choice(members, per_class, replace=False))
  return np.concatenate(chosen)


def sample_target_batch(labels: np.ndarray, batch: int, seed: int, step: int,
                        num_classes: int) -> np.ndarray:
  """Class-balanced target indices for one step; a pure function of (seed, step) so resumes match.

  `batch // num_classes` images of every class, and the remainder from distinct random classes.
  """
  rng = np.random.default_rng([seed, step, 1])
  per_class, extra = divmod(batch, num_classes)
  counts = np.full(num_classes, per_class)
  counts[rng.choice(num_classes, extra, replace=False)] += 1
  chosen = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    chosen.append(rng.choice(members, counts[c], replace=len(members) < counts[c]))
  return np.concatenate(chosen)
