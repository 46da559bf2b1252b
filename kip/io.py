"""Distilled sets on disk: our `distilled.npz`, the KIP/LS authors' released `.npz` files, and
(through `kip.readers`) every other project's format: RFAD, FRePo, DC/DSA/DM, MTT/DATM/PAD,
DC-Bench.

Both share the released layout: `images` (N, H, W, C) float32 in preprocessed space and `labels`
(N, C) float32. Ours adds metadata keys (dataset, preprocessing and its parameters, kernel, step,
seed, config) that a reader of the released format ignores. A set distilled for regression
(KRR-ST) holds `targets` (N, D) instead of `labels`, and a method's named extras (a learned
learning rate, a Platt scale) are stored as `extra_<name>`. Released files are recognised by their
published names (and the common renames), from which ssize, ZCA, label learning, augmentation and
checkpoint are read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np

from kip.data import Preprocessor
from kip.datasets import DATASETS, DataError
from kip.files import atomic_write, file_lock, write_json  # re-exported: kip.io's names before
from kip.readers import (
  LAYOUTS,
  FileFormatError,
  Foreign,
  Source,
  npz_format,
  npz_keys,
  numeric,
  read_foreign,
  read_npz,
  read_npz_arrays,
)

__all__ = ["DistilledSet", "ReleaseInfo", "FileFormatError", "atomic_write", "write_json",
           "file_lock", "save_distilled", "load_distilled", "parse_release_name", "LAYOUTS"]


@dataclasses.dataclass
class DistilledSet:
  """images: (N, H, W, C) float32, preprocessed; labels: (N, C) float32, or None for a set with
  regression `targets` (N, D) float32 instead; extras: named arrays a method exported beside them.

  meta: dataset, kernel, step, seed, ... (strings and numbers); preprocessor: how `images` were
  mapped from pixels, when known (ours always; released sets through `release`; other projects'
  formats through `source`, exactly when their family uses fixed statistics and no ZCA).
  """

  images: np.ndarray
  labels: np.ndarray | None
  meta: dict = dataclasses.field(default_factory=dict)
  preprocessor: Preprocessor | None = None
  release: ReleaseInfo | None = None
  targets: np.ndarray | None = None
  extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  source: Source | None = None

  @classmethod
  def from_export(cls, arrays: dict[str, np.ndarray], meta: dict,
                  preprocessor: Preprocessor | None) -> DistilledSet:
    """A set from a method's exported arrays (`images`, `labels` or `targets`, extras)."""
    extras = {k: np.asarray(v) for k, v in arrays.items()
              if k not in ("images", "labels", "targets")}
    return cls(np.asarray(arrays["images"]), _maybe(arrays.get("labels")), meta, preprocessor,
               targets=_maybe(arrays.get("targets")), extras=extras)

  @property
  def dataset(self) -> str | None:
    if self.meta.get("dataset"):
      return self.meta["dataset"]
    origin = self.release or self.source
    return origin.dataset if origin else None

  @property
  def zca(self) -> bool | None:
    """Whether the images live in ZCA space (None: unknown)."""
    if self.preprocessor is not None:
      return self.preprocessor.zca is not None
    if self.source is not None:
      return self.source.zca is not None
    return self.release.zca if self.release else None


@dataclasses.dataclass(frozen=True)
class ReleaseInfo:
  """What a released file's name says: `kip/mnist/ConvNet_ssize100_nozca_l_noaug_ckpt1000.npz`."""

  method: str | None  # "kip" or "ls"
  dataset: str | None
  arch: str | None
  ssize: int
  zca: bool
  learned_labels: bool | None
  augmented: bool | None
  checkpoint: int | None


_RELEASE_RE = re.compile(
    r"ssize(?P<ssize>\d+)_(?P<zca>zca|nozca)(?:_(?P<labels>l|nol))?(?:_(?P<aug>aug|noaug))?"
    r"(?:_ckpt(?P<ckpt>\d+))?$")


def parse_release_name(path: str) -> ReleaseInfo | None:
  """Reads the released-set naming scheme leniently; None when the name does not follow it.

  Accepts `kip/{dataset}/{Arch}_ssize{N}_{zca|nozca}_{l|nol}_{aug|noaug}_ckpt{K}.npz`,
  `ls/{dataset}/{Arch}_ssize{N}_{zca|nozca}.npz`, copies without the `Arch_` prefix and DC-Bench's
  `kip_{dataset}_{Arch}_ssize{N}_...npz`; method and dataset may also come from the folders.
  """
  stem = os.path.basename(path)
  stem = stem[:-4] if stem.endswith(".npz") else stem
  match = _RELEASE_RE.search(stem)
  if match is None:
    return None
  prefix = stem[:match.start()].strip("_")
  folders = os.path.normpath(path).split(os.sep)[:-1]
  method = next((p for p in reversed(folders) if p in ("kip", "ls")), None)
  dataset = next((p for p in reversed(folders) if p in DATASETS), None)
  head, _, rest = prefix.partition("_")
  if head in ("kip", "ls"):
    method, prefix = head, rest
  for name in sorted(DATASETS, key=len, reverse=True):  # fashion_mnist before mnist
    if prefix == name or prefix.startswith(name + "_"):
      dataset, prefix = name, prefix[len(name):].strip("_")
      break
  return ReleaseInfo(
      method=method, dataset=dataset, arch=prefix or None, ssize=int(match["ssize"]),
      zca=match["zca"] == "zca",
      learned_labels=None if match["labels"] is None else match["labels"] == "l",
      augmented=None if match["aug"] is None else match["aug"] == "aug",
      checkpoint=None if match["ckpt"] is None else int(match["ckpt"]))


def _maybe(a):
  return None if a is None else np.asarray(a, np.float32)


def save_distilled(path: str, distilled: DistilledSet) -> None:
  """Writes `distilled` atomically in the released layout plus our metadata keys."""
  if (distilled.labels is None) == (distilled.targets is None):
    raise ValueError("a distilled set holds exactly one of labels and targets")
  arrays = {"images": np.asarray(distilled.images, np.float32)}
  if distilled.labels is not None:
    arrays["labels"] = np.asarray(distilled.labels, np.float32)
  else:
    arrays["targets"] = np.asarray(distilled.targets, np.float32)
  for name, value in distilled.extras.items():
    arrays[f"extra_{name}"] = np.asarray(value)
  for key, value in distilled.meta.items():
    arrays[key] = np.asarray(json.dumps(value) if isinstance(value, dict) else value)
  if distilled.preprocessor is not None:
    arrays.update(distilled.preprocessor.to_arrays())
  _check(arrays["images"], arrays.get("labels"), path, distilled.dataset, arrays.get("targets"))
  atomic_write(path, arrays)


# Our metadata keys and what each holds (one value each; `config` is the JSON of the command's
# settings).
_META = {"dataset": str, "kernel": str, "kernel_type": str, "method": str, "step": int,
         "seed": int, "ipc": int, "size": int, "teacher": str, "config": dict}
_PRE_KEYS = ("preprocessing", "pre_mean", "pre_std", "pre_zca", "zca_reg", "pre_zca_layer_norm",
             "pre_zca_mean", "pre_zca_absolute")
_OUR_KEYS = ("images", "labels", "targets", *_META, *_PRE_KEYS)
_FOREIGN_KEYS = ("x_proto", "y_proto", "image", "label", "images", "labels", "k", "jit")
_MAX_JSON = 1 << 20  # a config is a few KB of settings


def _meta(arrays: dict[str, np.ndarray], path: str) -> dict:
  """Our metadata keys, each checked to hold one value of its kind."""
  meta = {}
  for key, kind in _META.items():
    if key not in arrays:
      continue
    array = arrays[key]
    want = {str: "U", int: "iu", dict: "U"}[kind]
    if array.shape != () or array.dtype.kind not in want:
      raise FileFormatError(f"{path}: {key!r} must hold one "
                            f"{'JSON text' if kind is dict else kind.__name__}, found "
                            f"{array.dtype} of shape {array.shape}")
    value = array.item()
    if kind is dict:
      value = _json(value, key, path)
    meta[key] = value
  return meta


def _json(text: str, key: str, path: str) -> dict:
  if len(text) > _MAX_JSON:
    raise FileFormatError(f"{path}: {key!r} is {len(text):,} characters of JSON; a record of "
                          "settings is a few thousand")
  try:
    value = json.loads(text)
  except (ValueError, RecursionError) as e:
    why = "nested too deep" if isinstance(e, RecursionError) else e
    raise FileFormatError(f"{path}: {key!r} is not readable JSON ({why})") from None
  if not isinstance(value, dict):
    raise FileFormatError(f"{path}: {key!r} must be a JSON object, found "
                          f"{type(value).__name__}")
  return value


def _preprocessor(arrays: dict[str, np.ndarray], path: str) -> Preprocessor | None:
  """The stored preprocessing, checked against the images before it is used: per-channel mean
  and std of the images' channels, finite, std above zero; a whitening matrix and pixel mean of
  the images' size, finite."""
  for key in _PRE_KEYS[1:]:
    if key in arrays:
      numeric(arrays[key], key, path)
  if "pre_mean" in arrays and "pre_std" not in arrays:
    raise FileFormatError(f"{path}: the stored preprocessing has pre_mean but no pre_std")
  try:
    pre = Preprocessor.from_arrays(arrays)
  except (DataError, ValueError, TypeError) as e:
    raise FileFormatError(f"{path}: the stored preprocessing is unusable ({e})") from None
  if pre is None:
    return None
  images = arrays["images"]
  if images.ndim != 4:
    return pre  # `_check` refuses the images
  channels, d = images.shape[-1], math.prod(images.shape[1:])
  expected = {"pre_mean": (pre.mean, (channels,)), "pre_std": (pre.std, (channels,)),
              "pre_zca": (pre.zca, (d, d)), "pre_zca_mean": (pre.zca_mean, (d,))}
  for key, (value, shape) in expected.items():
    if value is None:
      continue
    if value.shape != shape:
      raise FileFormatError(f"{path}: the stored preprocessing's {key} has shape {value.shape}; "
                            f"for images {images.shape[1:]} it must be {shape}")
    if not np.all(np.isfinite(value)):
      raise FileFormatError(f"{path}: the stored preprocessing's {key} holds NaN or infinite "
                            "values")
  if np.any(pre.std <= 0):
    raise FileFormatError(f"{path}: the stored preprocessing's pre_std must be above zero, got "
                          f"{pre.std.tolist()}")
  if pre.zca_reg is not None and not (np.isfinite(pre.zca_reg) and pre.zca_reg >= 0):
    raise FileFormatError(f"{path}: the stored preprocessing's zca_reg must be a finite number "
                          f">= 0, got {pre.zca_reg}")
  return pre


def load_distilled(path: str, dataset: str | None = None, *, layout: str = "auto",
                   experiment: int = -1) -> DistilledSet:
  """Loads ours, a released KIP/LS set or another project's (see `kip.readers`); raises
  FileFormatError with one line on bad files.

  Args:
    dataset: the dataset the caller will use the set with; checked against the file's own.
    layout: an imported file's image layout (auto, nhwc or nchw); ours are NHWC.
    experiment: which experiment of a DC/DSA/DM results file (-1: the last).
  """
  if not os.path.exists(path):
    raise FileFormatError(f"{path}: no such file")
  if not path.endswith(".npz"):
    return _imported(path, dataset, read_foreign(path, layout=layout, experiment=experiment,
                                                 dataset=dataset))
  keys = set(npz_keys(path))
  if npz_format(keys):  # only the keys a format uses are read: the rest may be anything
    arrays = read_npz_arrays(path, _FOREIGN_KEYS)
    return _imported(path, dataset, read_npz(path, arrays, layout=layout, dataset=dataset))
  for key in ("images", "labels"):
    if key not in keys and not (key == "labels" and "targets" in keys):
      alt = {"x_syn": "a trajectory-matching run"}
      hint = next((f" (looks like {v}'s format)" for k, v in alt.items() if k in keys), "")
      raise FileFormatError(f"{path}: missing key {key!r}{hint}; found {sorted(keys)}")
  arrays = read_npz_arrays(path, [k for k in keys if k in _OUR_KEYS or k.startswith("extra_")])
  for key in ("images", "labels", "targets"):
    if key in arrays:
      numeric(arrays[key], key, path)
  meta = _meta(arrays, path)
  release = None if "dataset" in meta else parse_release_name(path)
  extras = {k[len("extra_"):]: numeric(arrays[k], k, path) for k in arrays
            if k.startswith("extra_")}
  distilled = DistilledSet(np.asarray(arrays["images"], np.float32),
                           _maybe(arrays.get("labels")), meta,
                           _preprocessor(arrays, path), release,
                           targets=None if "labels" in arrays else _maybe(arrays["targets"]),
                           extras=extras)
  if dataset is not None and distilled.dataset not in (None, dataset):
    raise FileFormatError(f"{path}: made from {distilled.dataset}, not {dataset}")
  _check(distilled.images, distilled.labels, path, dataset or distilled.dataset,
         distilled.targets, distilled.extras)
  return distilled


def _imported(path: str, dataset: str | None, foreign: Foreign) -> DistilledSet:
  source = foreign.source
  preprocessor = None
  if source.stats is not None and source.zca is None:  # fully known without the training data
    mean, std = (np.asarray(v, np.float64) for v in source.stats)
    preprocessor = Preprocessor(mean, std)
  meta = {"method": source.method} if source.method else {}
  distilled = DistilledSet(foreign.images, foreign.labels, meta, preprocessor,
                           extras=foreign.extras, source=source)
  _check(distilled.images, distilled.labels, path, dataset or distilled.dataset,
         extras=distilled.extras)
  return distilled


def _check(images: np.ndarray, labels: np.ndarray | None, path: str, dataset: str | None,
           targets: np.ndarray | None = None, extras: dict | None = None) -> None:
  if images.ndim != 4:
    raise FileFormatError(f"{path}: images must be (N, H, W, C), got shape {images.shape}")
  if not len(images):
    raise FileFormatError(f"{path}: holds no images")
  if images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
    raise FileFormatError(f"{path}: images look NCHW {images.shape}; transpose to NHWC "
                          "(N, H, W, C) first")
  name, values = ("labels", labels) if labels is not None else ("targets", targets)
  if values.ndim != 2 or len(values) != len(images):
    raise FileFormatError(f"{path}: {name} must be (N, {'C' if labels is not None else 'D'}) "
                          f"with N = {len(images)}, got {values.shape}")
  if dataset is not None and dataset in DATASETS:
    shape, num_classes = DATASETS[dataset]
    if labels is not None and labels.shape[1] != num_classes:
      raise FileFormatError(f"{path}: labels have width {labels.shape[1]}, but {dataset} has "
                            f"{num_classes} classes")
    if images.shape[1:] != shape:
      # A file that names no dataset meets the command's default one (mnist): say which fit.
      fits = [name for name, (other, classes) in DATASETS.items() if other == images.shape[1:]
              and (labels is None or labels.shape[1] == classes)]
      hint = f"; give --dataset ({', '.join(fits)} have such images)" if fits else ""
      raise FileFormatError(f"{path}: images are {images.shape[1:]}, {dataset} images are "
                            f"{shape}{hint}")
  for key, value in (("images", images), (name, values), *(extras or {}).items()):
    if not np.all(np.isfinite(value)):
      raise FileFormatError(f"{path}: {key} contain NaN or infinite values")
