"""Datasets through tensorflow-datasets, KIP's preprocessing, centred labels and seeded sampling.

Loading goes through tfds' own builders: online they download as usual; offline they are built from
the raw files of tfds' download placed in `manual_dir/<dataset>/` (passed to tfds as
`DownloadConfig(manual_dir=...)`). Without a manual dir and without a network connection, loading
fails at once with a message saying what to do, instead of sitting in tfds' download retries.
The first load also writes the decoded splits beside tfds' prepared files (`kip_arrays.npz`, plain
uint8 arrays), so every later load reads them in a fraction of a second without TensorFlow.
TensorFlow is imported only here, lazily, kept off accelerators and with its start-up chatter
kept out of the user's terminal.

Preprocessing is fitted on the training split and applied identically to every split; it is saved
with a distilled set and can be inverted for display.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import os
import socket
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from kip.datasets import DATASETS, FOLDER_DATASETS, DataError, check_dataset
from kip.files import atomic_write, file_lock

__all__ = [
    "DATASETS",
    "FOLDER_DATASETS",
    "DataError",
    "check_dataset",
    "validation_split",
    "Split",
    "Preprocessor",
    "load_dataset",
    "prepare_dataset",
    "load_mhist",
    "fit_preprocessor",
    "one_hot",
    "centered_one_hot",
    "class_balanced_indices",
    "sample_target_batch",
    "unreachable_host",
]

MANUAL_DIR_ENV = "KIP_MANUAL_DIR"
DATA_DIR_ENV = "KIP_DATA_DIR"
# The decoded splits, written beside tfds' prepared files after the first load.
ARRAY_CACHE = "kip_arrays.npz"


class Split(NamedTuple):
  """One split: `images` (n, H, W, C) uint8 and `labels` (n,) int32."""

  images: np.ndarray
  labels: np.ndarray


def _raw_files(builder) -> list[str]:
  return sorted({url.rstrip("/").split("/")[-1] for url in (builder.url_infos or {})})


def prepare_dataset(name: str, *, data_dir: str | None = None, manual_dir: str | None = None):
  """Makes sure tfds has `name` prepared in `data_dir` (building it once) and returns its builder.

  Args: as for `load_dataset`. Raises DataError with one line when the raw files are missing from
  `manual_dir`, or when there is neither a manual dir nor a network connection.
  """
  check_dataset(name)
  if name in FOLDER_DATASETS:
    raise DataError(f"{name} is not a tfds dataset; load it with load_dataset")
  data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or None
  # The hint names what the user did: a flag, or the environment variable.
  drop = "drop --manual-dir" if manual_dir else f"unset {MANUAL_DIR_ENV}"
  manual_dir = manual_dir or os.environ.get(MANUAL_DIR_ENV) or None
  tfds = _import_tfds()
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    return builder
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
          f"for {name} there (or, online, {drop} to download)")
    download_config = tfds.download.DownloadConfig(manual_dir=folder)
  else:
    # tfds retries a failed download for minutes before giving up; a quick probe fails at once.
    unreachable = unreachable_host(builder.url_infos or {})
    if unreachable:
      raise _download_error(name, builder, f"no connection to {unreachable}")
  # Two processes sharing a data dir (parallel tests, two runs at once) build it once: the
  # second waits for the first and then finds it prepared.
  with file_lock(os.path.join(builder.data_dir_root, f"{name}.lock")):
    if builder.is_prepared():
      return tfds.builder(name, data_dir=data_dir)
    try:
      # One download folder per dataset: tfds names extracted manual files by their file name
      # alone (downloads/extracted/GZIP.train-images-idx3-ubyte.gz), so with a shared folder a
      # Fashion-MNIST build silently reused MNIST's extracted images.
      with contextlib.ExitStack() as quiet:
        if manual_dir is not None:
          # tfds announces a download ("Downloading and preparing dataset Unknown size") and
          # shows download bars while it reads local files: say what happens instead.
          print(f"preparing {name} from {folder} (once: kept in {builder.data_dir_root})",
                file=sys.stderr, flush=True)
          quiet.enter_context(contextlib.redirect_stdout(quiet.enter_context(
              open(os.devnull, "w"))))
          tfds.disable_progress_bar()
          quiet.callback(tfds.enable_progress_bar)
        builder.download_and_prepare(
            download_dir=os.path.join(builder.data_dir_root, "downloads", name),
            download_config=download_config)
    except Exception as e:  # noqa: BLE001  (tfds raises many types for a failed download)
      if manual_dir is not None:
        raise
      raise _download_error(name, builder, type(e).__name__) from e
  return builder


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    val_size: int = 0,
    seed: int = 0,
) -> dict[str, Split]:
  """Loads `train`, `validation` and `test` splits of an image-classification dataset.

  Args:
    name: a name from `DATASETS`: a tfds dataset, or one of FOLDER_DATASETS (MHIST), read from
      `manual_dir/<name>/` in its published layout.
    data_dir: where tfds keeps prepared datasets (default: `$KIP_DATA_DIR`, else tfds' default).
    manual_dir: a folder with one subfolder per dataset holding the raw files of tfds' download, for
      building offline (default: `$KIP_MANUAL_DIR`; None or "" with neither set: tfds downloads).
      Unused once the dataset is prepared. The first load writes the decoded splits to
      `ARRAY_CACHE` in the prepared dataset's folder; later loads read that file instead of tfds.
    val_size: images carved from the training split (a seeded, class-stratified draw) to form
      `validation`; the rest stays in `train`. 0 leaves `validation` empty.
    seed: seed of that draw.

  Returns:
    {"train", "validation", "test"} -> Split with uint8 images in NHWC.
  """
  check_dataset(name)
  if name in FOLDER_DATASETS:
    splits = load_mhist(_dataset_folder(name, manual_dir))
  else:
    splits = _read_array_cache(name, data_dir)
    if splits is None:
      builder = prepare_dataset(name, data_dir=data_dir, manual_dir=manual_dir)
      tfds = _import_tfds()
      splits = {}
      for split in ("train", "test"):
        arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        splits[split] = Split(arrays["image"].astype(np.uint8), arrays["label"].astype(np.int32))
      _write_array_cache(str(builder.data_dir), splits)
  train = splits["train"]
  if val_size < 0 or val_size >= len(train.labels):
    raise DataError(f"val_size must be in [0, {len(train.labels)}), got {val_size}")
  val_idx, keep = validation_split(train.labels, val_size, seed)
  splits["validation"] = Split(train.images[val_idx], train.labels[val_idx])
  splits["train"] = Split(train.images[keep], train.labels[keep])
  return splits


def _tfds_root(data_dir: str | None) -> str:
  """The folder tfds prepares datasets in: as `tfds.builder` resolves it, without importing it."""
  root = (data_dir or os.environ.get(DATA_DIR_ENV) or os.environ.get("TFDS_DATA_DIR")
          or os.path.join("~", "tensorflow_datasets"))
  return os.path.expanduser(root)


def _read_array_cache(name: str, data_dir: str | None) -> dict[str, Split] | None:
  """The train and test splits an earlier load wrote beside tfds' files, or None when there is no
  such file, it is damaged, or more than one prepared version makes the folder ambiguous."""
  prepared = glob.glob(os.path.join(_tfds_root(data_dir), name, "[0-9]*", "dataset_info.json"))
  if len(prepared) != 1:
    return None
  try:
    with np.load(os.path.join(os.path.dirname(prepared[0]), ARRAY_CACHE)) as arrays:
      splits = {split: Split(arrays[f"{split}_images"], arrays[f"{split}_labels"])
                for split in ("train", "test")}
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
    return None
  shape = DATASETS[name][0]
  if any(s.images.dtype != np.uint8 or s.images.shape[1:] != shape or s.labels.dtype != np.int32
         or s.labels.shape != s.images.shape[:1] for s in splits.values()):
    return None
  return splits


def _write_array_cache(folder: str, splits: dict[str, Split]) -> None:
  """Writes the decoded splits to `folder/ARRAY_CACHE` atomically; a folder that cannot be
  written (read-only, remote) just goes without."""
  with contextlib.suppress(OSError):
    atomic_write(os.path.join(folder, ARRAY_CACHE),
                 {f"{split}_{part}": getattr(splits[split], part)
                  for split in ("train", "test") for part in ("images", "labels")})


# ----------------------------------------------------------------------------------------------
# Folder datasets

MHIST_URL = "https://bmirds.github.io/MHIST/"
MHIST_CLASSES = ("HP", "SSA")  # label ids 0, 1: hyperplastic polyp, sessile serrated adenoma
_MHIST_COLUMNS = ("Image Name", "Majority Vote Label", "Partition")


def _dataset_folder(name: str, manual_dir: str | None) -> str:
  """`manual_dir/<name>/`, or `manual_dir` itself when it is the dataset's folder."""
  manual_dir = manual_dir or os.environ.get(MANUAL_DIR_ENV) or None
  if manual_dir is None:
    raise DataError(f"{name} is not in tensorflow-datasets: download it from {MHIST_URL} and "
                    f"pass --manual-dir DIR with its annotations.csv and images/ in DIR/{name}/")
  folder = os.path.join(manual_dir, name)
  if not os.path.isdir(folder) and os.path.isfile(os.path.join(manual_dir, "annotations.csv")):
    folder = manual_dir
  return folder


def load_mhist(folder: str) -> dict[str, Split]:
  """Reads MHIST in its published layout: `folder/annotations.csv` (columns `Image Name`,
  `Majority Vote Label` HP or SSA, `Partition` train or test; others ignored) and the 224 x 224
  RGB images it names in `folder/images/`. Returns {"train", "test"} -> Split in the csv's order,
  labels HP = 0, SSA = 1. Anything missing or malformed is one DataError line naming the file."""
  import csv  # noqa: PLC0415

  from PIL import Image  # noqa: PLC0415  (a dependency of matplotlib)

  csv_path = os.path.join(folder, "annotations.csv")
  if not os.path.isfile(csv_path):
    raise DataError(f"MHIST needs {csv_path} (and the images in {folder}/images/); download it "
                    f"from {MHIST_URL}")
  image_dir = os.path.join(folder, "images")
  if not os.path.isdir(image_dir):
    hint = " (unzip images.zip there)" if os.path.isfile(image_dir + ".zip") else ""
    raise DataError(f"MHIST needs its images in {image_dir}/{hint}")
  try:
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f)
      header = {k.strip() for k in reader.fieldnames or []}
      rows = list(reader)
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise DataError(f"{csv_path} is not a readable csv file ({e})") from e
  missing = [c for c in _MHIST_COLUMNS if c not in header]
  if missing:
    raise DataError(f"{csv_path} lacks the column(s) {', '.join(missing)}")
  if not rows:
    raise DataError(f"{csv_path} lists no images")
  shape = DATASETS["mhist"][0]
  images = {"train": [], "test": []}
  labels = {"train": [], "test": []}
  for line, row in enumerate(rows, start=2):
    row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
    where = f"{csv_path} line {line}"
    label, partition = row["Majority Vote Label"], row["Partition"].lower()
    if label not in MHIST_CLASSES:
      raise DataError(f"{where}: label {label!r} is not one of {', '.join(MHIST_CLASSES)}")
    if partition not in images:
      raise DataError(f"{where}: partition {row['Partition']!r} is not train or test")
    path = os.path.join(image_dir, row["Image Name"])
    try:
      with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), np.uint8)
    except (OSError, ValueError) as e:
      raise DataError(f"{where}: cannot read image {path} ({e})") from e
    if array.shape != shape:
      raise DataError(f"{where}: {path} is {'x'.join(map(str, array.shape))}, MHIST images are "
                      f"{'x'.join(map(str, shape))}")
    images[partition].append(array)
    labels[partition].append(MHIST_CLASSES.index(label))
  for partition in images:
    if not images[partition]:
      raise DataError(f"{csv_path} has no {partition} images")
  return {k: Split(np.stack(images[k]), np.asarray(labels[k], np.int32)) for k in images}


def _download_error(name: str, builder, reason: str) -> DataError:
  return DataError(
      f"could not download {name} ({reason}); offline, pass --manual-dir DIR with "
      f"{', '.join(_raw_files(builder))} in DIR/{name}/")


PROBE_TIMEOUT_S = 3.0


def unreachable_host(urls: Iterable[str], timeout: float = PROBE_TIMEOUT_S) -> str | None:
  """The host (or proxy) that the first download URL needs, if no TCP connection to it opens within
  `timeout` seconds; None when it opens or there is nothing to download."""
  url = next(iter(urls), None)
  if url is None:
    return None
  parts = urllib.parse.urlsplit(url)
  if not parts.hostname:
    return None
  host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
  proxy = urllib.request.getproxies().get(parts.scheme)
  if proxy and not urllib.request.proxy_bypass(host):
    # Downloads go through the proxy (requests honours the same variables): probe that instead.
    proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host, port = proxy_parts.hostname or host, proxy_parts.port or 80
  try:
    _connect(host, port, timeout)
  except OSError:  # DNS failure, refused, unreachable network and timeouts alike
    return f"{host}:{port}"
  return None


def _connect(host: str, port: int, timeout: float) -> None:
  socket.create_connection((host, port), timeout=timeout).close()


@functools.cache
def _import_tfds():
  """Imports tensorflow_datasets with TensorFlow kept off accelerators and quiet.

  Imported here, not at module level: TensorFlow costs seconds to import and must never take
  accelerator memory that JAX needs. TensorFlow's C++ side logs through absl before
  `absl::InitializeLog()`, which writes to file descriptor 2 whatever TF_CPP_MIN_LOG_LEVEL says
  (oneDNN and CUDA-stub notices at import; on CPU-only machines `E0000 ... failed call to cuInit`
  when devices are first listed), so fd 2 is pointed at a temporary file for the import and the
  device setup; what was captured is shown only if they fail. tfds' Python-side absl warnings are
  raised to errors.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  with _stderr_captured():
    try:
      import tensorflow as tf  # noqa: PLC0415
      import tensorflow_datasets as tfds  # noqa: PLC0415
    except ImportError as e:
      raise DataError(f"loading a dataset needs tensorflow-datasets ({e}); install it with pip "
                      "install 'kip-jax[data]' (reading or showing a set needs none)") from None
    from absl import logging as absl_logging  # noqa: PLC0415

    tf.config.set_visible_devices([], "GPU")
    tf.config.list_logical_devices()  # initialises the runtime (and its cuInit probe) in here
  absl_logging.set_verbosity(absl_logging.ERROR)
  return tfds


@contextlib.contextmanager
def _stderr_captured():
  """Sends file descriptor 2 (where C++ libraries write, bypassing `sys.stderr`) to a temporary
  file for the body; replays the capture on stderr if the body raises."""
  try:
    saved = os.dup(2)
  except OSError:  # no fd 2 at all: nothing to keep clean
    yield
    return
  with tempfile.TemporaryFile() as capture:
    sys.stderr.flush()
    os.dup2(capture.fileno(), 2)
    failed = True
    try:
      yield
      failed = False
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      if failed:
        capture.seek(0)
        sys.stderr.write(capture.read().decode(errors="replace"))
        sys.stderr.flush()


def validation_split(labels: np.ndarray, val_size: int, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(validation indices, boolean mask of the rest): `val_size` images of a training split drawn
  with `seed`, spread over the classes in proportion (what `load_dataset(val_size=...)` holds
  out)."""
  val_idx = _stratified_draw(labels, val_size, np.random.default_rng(seed))
  keep = np.ones(len(labels), bool)
  keep[val_idx] = False
  return val_idx, keep


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
  """Per-channel standardisation, optionally followed by ZCA whitening.

  Two ZCA flavours: KIP's (`zca_layer_norm=True`: each standardised image is centred and scaled to
  unit L2 norm, then whitened) and FRePo's (`zca_layer_norm=False`: the training set's per-pixel
  mean is subtracted, then whitened). See `fit_preprocessor`.

  Attributes:
    mean, std: (C,) float64 per-channel statistics of the training images scaled to [0, 1].
    zca: (d, d) float64 whitening matrix (d = H*W*C) or None.
    zca_reg: the regulariser strength it was fitted with (x tr(cov)/d), or None.
    zca_layer_norm: whether KIP's per-image layer norm precedes the whitening.
    zca_mean: (d,) float64 per-pixel mean of the standardised training images, subtracted before
      the whitening when `zca_layer_norm` is False; None otherwise.
    zca_absolute: whether `zca_reg` is kornia's absolute eps (MTT's sets) rather than a multiple
      of the mean eigenvalue.
  """

  mean: np.ndarray
  std: np.ndarray
  zca: np.ndarray | None = None
  zca_reg: float | None = None
  zca_layer_norm: bool = True
  zca_mean: np.ndarray | None = None
  zca_absolute: bool = False

  @property
  def name(self) -> str:
    if self.zca is None:
      return "standardize"
    if self.zca_layer_norm:
      return "standardize+layernorm+zca"
    return "standardize+kornia_zca" if self.zca_absolute else "standardize+zca"

  def apply(self, images: np.ndarray) -> np.ndarray:
    """(n, H, W, C) uint8 (or [0, 255] float) -> (n, H, W, C) float32 in preprocessed space."""
    x = (np.asarray(images, np.float64) / 255.0 - self.mean) / self.std
    if self.zca is not None:
      if self.zca_layer_norm:
        flat = _layer_norm(x).reshape(len(x), -1)
      else:
        flat = x.reshape(len(x), -1) - self.zca_mean
      x = (flat @ self.zca).reshape(x.shape)
    return x.astype(np.float32)

  def invert(self, x: np.ndarray) -> np.ndarray:
    """Preprocessed (n, H, W, C) -> (n, H, W, C) float in [0, 1], for display.

    ZCA is undone exactly, and so is the per-pixel mean subtraction; the per-image mean and scale
    removed by KIP's layer norm are not recoverable, so there each image is rescaled to the
    training set's standardised range before un-standardising.
    """
    x = np.asarray(x, np.float64)
    if self.zca is not None:
      flat = np.linalg.solve(self.zca, x.reshape(len(x), -1).T).T
      if self.zca_layer_norm:
        x = flat.reshape(x.shape)
        x = x / (x.std(axis=(1, 2, 3), keepdims=True) + 1e-12)
      else:
        x = (flat + self.zca_mean).reshape(x.shape)
    return np.clip(x * self.std + self.mean, 0.0, 1.0)

  def to_arrays(self) -> dict[str, np.ndarray]:
    """The arrays a distilled-set file stores (read back by `from_arrays`)."""
    out = {"preprocessing": np.asarray(self.name), "pre_mean": self.mean, "pre_std": self.std}
    if self.zca is not None:
      out["pre_zca"] = self.zca.astype(np.float32)
      out["zca_reg"] = np.asarray(self.zca_reg)
      out["pre_zca_layer_norm"] = np.asarray(self.zca_layer_norm)
      if self.zca_mean is not None:
        out["pre_zca_mean"] = np.asarray(self.zca_mean, np.float64)
      if self.zca_absolute:
        out["pre_zca_absolute"] = np.asarray(True)
    return out

  @classmethod
  def from_arrays(cls, arrays) -> Preprocessor | None:
    """The preprocessing stored by `to_arrays`, or None for a file without one. Files written
    before `pre_zca_layer_norm` existed used KIP's layer norm."""
    if "pre_mean" not in arrays:
      return None
    zca = np.asarray(arrays["pre_zca"], np.float64) if "pre_zca" in arrays else None
    reg = float(arrays["zca_reg"]) if "zca_reg" in arrays else None
    layer_norm = bool(arrays["pre_zca_layer_norm"]) if "pre_zca_layer_norm" in arrays else True
    zca_mean = None
    if zca is not None and not layer_norm:
      if "pre_zca_mean" not in arrays:
        raise DataError("the stored preprocessing whitens without layer norm but lacks "
                        "'pre_zca_mean'; re-save the set with this version")
      zca_mean = np.asarray(arrays["pre_zca_mean"], np.float64)
    mean = np.asarray(arrays["pre_mean"], np.float64)
    absolute = bool(arrays["pre_zca_absolute"]) if "pre_zca_absolute" in arrays else False
    return cls(mean, np.asarray(arrays["pre_std"], np.float64), zca, reg, layer_norm, zca_mean,
               absolute)


def _layer_norm(x: np.ndarray) -> np.ndarray:
  """KIP's per-image normalisation: subtract the image's mean, divide by its L2 norm."""
  x = x - x.mean(axis=(1, 2, 3), keepdims=True)
  return x / np.linalg.norm(x.reshape(len(x), -1), axis=1).reshape(-1, 1, 1, 1)


def fit_preprocessor(train_images: np.ndarray, *, zca: bool = False, zca_reg: float = 0.1,
                     zca_layer_norm: bool = True, stats: tuple | None = None,
                     zca_eps: float | None = None) -> Preprocessor:
  """Fits the preprocessing on (n, H, W, C) uint8 training images, in float64.

  Both ZCA flavours whiten `X` (n, d) with `cov = X^T X / n` and
  `W = U diag((s + zca_reg * tr(cov)/d)^-1/2) U^T` (`U diag(s) U^T = cov`); they differ in `X`:

  - `zca_layer_norm=True` (KIP/LS releases): the standardised images after KIP's per-image layer
    norm (centred, unit L2 norm).
  - `zca_layer_norm=False` (FRePo, github.com/yongchao97/FRePo, `lib/dataset/ops.py`:
    `compute_zca_mean_cov_ds`, `get_whitening_transform`, `get_preprocess_op_np`; `zca_reg=0.1` in
    its scripts): the standardised images minus their per-pixel training mean, which `apply`
    subtracts too. As there, when n < d the d - n directions of smallest variance are left
    unscaled. FRePo standardises with fixed published per-channel statistics and applies no ZCA
    to MNIST/Fashion-MNIST; here the statistics are fitted and ZCA is the caller's choice. MTT
    (kornia's `ZCAWhitening(eps=0.1)`) differs in using an absolute `eps` instead of
    `reg * tr(cov)/d` and the unbiased covariance: `zca_eps` selects that (with
    `zca_layer_norm=False`), for sets imported from MTT/DATM/PAD.

  stats: fixed per-channel (mean, std) to standardise with instead of the training split's (the
    published constants of DC/MTT and FRePo, for their sets).
  """
  x = np.asarray(train_images, np.float64) / 255.0
  if stats is not None:
    mean, std = (np.asarray(v, np.float64) for v in stats)
  else:
    mean = x.mean(axis=(0, 1, 2))
    std = x.std(axis=(0, 1, 2))
  if not zca:
    return Preprocessor(mean, std)
  standardised = (x - mean) / std
  zca_mean = None
  if zca_layer_norm:
    flat = _layer_norm(standardised).reshape(len(x), -1)
  else:
    flat = standardised.reshape(len(x), -1)
    zca_mean = flat.mean(axis=0)
    flat = flat - zca_mean
  cov = flat.T @ flat / (len(flat) - (zca_eps is not None))
  s, u = np.linalg.eigh(cov)  # ascending
  reg = zca_eps if zca_eps is not None else zca_reg * np.trace(cov) / cov.shape[0]
  scale = (np.maximum(s, 0.0) + reg) ** -0.5
  if not zca_layer_norm and zca_eps is None and len(flat) < len(s):
    scale[: len(s) - len(flat)] = 1.0  # FRePo's rank control
  whiten = (u * scale) @ u.T
  return Preprocessor(mean, std, whiten, zca_eps if zca_eps is not None else zca_reg,
                      zca_layer_norm, zca_mean, zca_eps is not None)


# ----------------------------------------------------------------------------------------------
# Labels and sampling


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """(n,) int class ids (as in `Split.labels`) -> (n, num_classes) float32 one-hot (0 and 1)."""
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
  return np.eye(num_classes, dtype=np.float32)[labels]


def centered_one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """(n,) int class ids -> (n, num_classes) float32 one-hot minus 1/num_classes, as in KIP."""
  return (one_hot(labels, num_classes) - 1.0 / num_classes).astype(np.float32)


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
