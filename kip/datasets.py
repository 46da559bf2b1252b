"""What the toolkit knows about each dataset without loading it: image shape and number of
classes, and which datasets are read from a folder instead of tensorflow-datasets.

No heavy imports (no NumPy, no TensorFlow): the file readers, the command line and the data
loaders all agree on these facts through this module.
"""

from __future__ import annotations

__all__ = ["DATASETS", "FOLDER_DATASETS", "DataError", "check_dataset"]

# tfds name -> (image shape, number of classes); what the loaders and file checks agree on.
DATASETS: dict[str, tuple[tuple[int, int, int], int]] = {
    "mnist": ((28, 28, 1), 10),
    "fashion_mnist": ((28, 28, 1), 10),
    "cifar10": ((32, 32, 3), 10),
    "cifar100": ((32, 32, 3), 100),
    "svhn_cropped": ((32, 32, 3), 10),
    "mhist": ((224, 224, 3), 2),  # not in tfds: read from its published folder (`load_mhist`)
}
# Datasets read from a folder in their own published layout under `manual_dir/<name>/`.
FOLDER_DATASETS = ("mhist",)


class DataError(ValueError):
  """A problem with the data a user asked for (unknown name, missing files)."""


def check_dataset(name: str) -> tuple[tuple[int, int, int], int]:
  """(image shape, number of classes) of `name`; a DataError naming the choices if unknown."""
  if name not in DATASETS:
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
  return DATASETS[name]
