"""Distilled sets in other projects' formats, read without PyTorch.

`read_foreign(path)` recognises the format from the file (its suffix, keys and name) and returns
the arrays in our convention (images NHWC float32, labels (N, C) float32) with what the format
says about where they came from (`Source`: method, dataset, network, images per class, the
preprocessing the family applies, the accuracies the authors recorded). `kip.io.load_distilled`
turns that into a `DistilledSet`; every command reads sets through it.

Formats, named by what they hold (each is written by the projects named beside it):
  npz_platt   RFAD's `best.npz`: `images` NCHW, learned `labels`, the Platt parameter `k` (the
              cross-entropy scale is exp(k)) and the jitter `jit`; images standardised with
              training statistics, ZCA (reg 0.1) for CIFAR.
  npz_proto   FRePo dumps: `x_proto`/`y_proto`, or `image`/`label` (what its `save_proto_np`
              writes), NHWC, learned labels; images standardised with FRePo's published
              per-channel statistics (`PROTO_STATS`), ZCA (reg 0.1, per-pixel mean removed) for
              colour datasets.
  dc_results  DC / DSA / DM results `res_<method>_<dataset>_<net>_<ipc>ipc.pt`: a dict whose
              `data` is a list of [images NCHW, labels int64] pairs, one per experiment, and
              whose `accs_all_exps` maps an architecture to the accuracies the authors measured;
              images standardised with DC's fixed per-channel statistics.
  pair        MTT / DATM / PAD `images_best.pt` + `labels_best.pt` (+ `lr_best.pt`), DC-Bench's
              `<name>_images.pt` + `<name>_labels.pt`, and the same pairs as `.npy`: labels are
              class ids or (DATM) soft logits, made probabilities by a softmax; DC's statistics,
              and for CIFAR kornia's ZCA (absolute eps 0.1, unbiased covariance) as MTT's
              configs use.
The method a file came from is recorded (`Source.method`) where the file says it: a DC results
file's name, a pair's `images_best.pt` (trajectory matching); the `.npz` formats do not say.

`.pt` files are read in both `torch.save` formats (the zip archive of PyTorch >= 1.6 and the legacy
sequence of pickles before it) by an unpickler that rebuilds tensors, storages, numbers, strings
and containers and nothing else: a pickle that names any other global is refused with one line
(`UnsafeFileError`) before anything of it runs.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import re
import struct
import zipfile

import numpy as np

from kip.datasets import DATASETS

__all__ = ["FileFormatError", "UnsafeFileError", "Source", "Foreign", "FORMATS", "LAYOUTS",
           "DC_STATS", "PROTO_STATS", "read_torch", "read_foreign", "read_npz", "npz_format",
           "to_nhwc"]

FORMATS = ("npz_platt", "npz_proto", "dc_results", "pair")
LAYOUTS = ("auto", "nhwc", "nchw")

# DC's fixed per-channel (mean, std), by tfds name (`get_dataset` of DC, DSA, DM and MTT).
DC_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2861,), (0.3530,)),
    "svhn_cropped": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
}
# The `npz_proto` format's per-channel (mean, std): FRePo's published `data_stats`; CIFAR-10's std
# differs from DC's.
PROTO_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2861,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
}
# The names other projects give datasets in file names.
_DATASET_NAMES = {"mnist": "mnist", "fashionmnist": "fashion_mnist", "fashion": "fashion_mnist",
                  "fashion_mnist": "fashion_mnist", "cifar10": "cifar10", "cifar100": "cifar100",
                  "svhn": "svhn_cropped", "svhn_cropped": "svhn_cropped", "mhist": "mhist"}
_COLOUR = ("cifar10", "cifar100", "svhn_cropped")


class FileFormatError(ValueError):
  """A distilled-set file that cannot be used as one; the message says what is wrong."""


class UnsafeFileError(FileFormatError):
  """A pickle that asks for something other than tensors and containers; nothing of it ran."""


@dataclasses.dataclass(frozen=True)
class Source:
  """What an imported file says about its origin.

  stats: the fixed per-channel (mean, std) the family standardises with, or None when it uses
    the training split's own statistics. zca: the whitening its images are in (a PREPROCESSING
    name of kip.pipeline) or None. published: architecture -> accuracies the authors recorded.
  """

  format: str
  method: str | None = None
  dataset: str | None = None
  net: str | None = None
  ipc: int | None = None
  experiment: int | None = None
  stats: tuple | None = None
  zca: str | None = None
  published: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Foreign:
  """images: (N, H, W, C) float32; labels: (N, C) float32; extras: named arrays (e.g. `lr`)."""

  images: np.ndarray
  labels: np.ndarray
  source: Source
  extras: dict = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# torch.save files without torch

_DTYPES = {"Double": np.float64, "Float": np.float32, "Half": np.float16, "Long": np.int64,
           "Int": np.int32, "Short": np.int16, "Char": np.int8, "Byte": np.uint8,
           "Bool": np.bool_}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: np.dtype


def _rebuild_tensor(storage, offset, size, stride, *_):
  """A tensor as a NumPy array: `size` elements of `storage` at `offset` with element `stride`."""
  size, stride = tuple(size), tuple(stride)
  if not size:
    return np.array(storage[offset])
  if len(size) != len(stride) or min(stride) < 0 or offset < 0:
    raise FileFormatError(f"a tensor with shape {size}, strides {stride} and offset {offset} "
                          "does not describe its storage")
  extent = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
  if min(size) > 0 and extent > len(storage):
    raise FileFormatError(f"a tensor of shape {size} reaches past its storage ({len(storage)})")
  item = storage.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], size, [s * item for s in stride],
                                         writeable=False)
  return np.array(view)


def _rebuild_parameter(data, *_):
  return data


def _numpy_scalar(dtype, raw=None):
  dtype = dtype.dtype if isinstance(dtype, _DTypeState) else dtype
  if not isinstance(dtype, np.dtype) or not isinstance(raw, bytes):
    raise UnsafeFileError("a NumPy scalar with unexpected arguments")
  return np.frombuffer(raw, dtype)[0]


def _latin1(text, encoding="latin1"):
  """Protocol-2 pickles spell bytes as `_codecs.encode(text, "latin1")`; only that is done."""
  if not isinstance(text, str) or encoding != "latin1":
    raise UnsafeFileError("_codecs.encode with unexpected arguments")
  return text.encode("latin1")


def _numpy_dtype(name, *_):
  if not isinstance(name, str) or not re.fullmatch(r"[biuf]\d{1,2}|bool|float\d+|int\d+", name):
    raise UnsafeFileError(f"a NumPy dtype {name!r}")
  return _DTypeState(np.dtype(name))


class _DTypeState:
  """np.dtype as pickled (the constructor, then BUILD with its byte order): only the byte order
  is taken from the state."""

  def __init__(self, dtype):
    self.dtype = dtype

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
      self.dtype = self.dtype.newbyteorder(state[1]) if state[1] in "<>" else self.dtype


@dataclasses.dataclass(frozen=True)
class _Pending:
  """A legacy storage not read yet (its bytes follow the pickle)."""

  key: str


class _PendingTensor:
  def __init__(self, storage, args):
    self.storage, self.args = storage, args


def _deferred_rebuild(storage, *args):
  """Legacy files: tensors are rebuilt after their storages' bytes are read."""
  if isinstance(storage, _Pending):
    return _PendingTensor(storage, args)
  return _rebuild_tensor(storage, *args)


def _allowed_globals() -> dict:
  allowed = {("torch._utils", "_rebuild_tensor_v2"): _deferred_rebuild,
             ("torch._utils", "_rebuild_tensor"): _deferred_rebuild,
             ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
             ("collections", "OrderedDict"): collections.OrderedDict,
             ("builtins", "set"): set, ("builtins", "frozenset"): frozenset}
  for name, dtype in _DTYPES.items():
    allowed[("torch", f"{name}Storage")] = _StorageType(np.dtype(dtype))
  for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    allowed[(module, "scalar")] = _numpy_scalar
  allowed[("numpy", "dtype")] = _numpy_dtype
  allowed[("_codecs", "encode")] = _latin1
  return allowed


_ALLOWED = _allowed_globals()


class _Unpickler(pickle.Unpickler):
  """Rebuilds only what `_ALLOWED` names; storages come from `load_storage(key, dtype, numel)`."""

  def __init__(self, file, path, load_storage):
    super().__init__(file)
    self._path, self._load_storage = path, load_storage

  def find_class(self, module, name):
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise UnsafeFileError(f"{self._path}: refused: the pickle asks for {module}.{name}, which "
                            "is not a tensor or container; nothing of it was run") from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and len(pid) >= 5
            and isinstance(pid[1], _StorageType)):
      raise UnsafeFileError(f"{self._path}: refused: a persistent object {pid!r:.60} that is not "
                            "a tensor storage")
    return self._load_storage(str(pid[2]), pid[1].dtype, int(pid[4]))


def _load(unpickler: _Unpickler, path: str):
  try:
    obj = unpickler.load()
  except FileFormatError:
    raise
  except Exception as e:  # noqa: BLE001  (any unpickling error means a damaged file)
    raise FileFormatError(f"{path}: not a readable torch.save file ({type(e).__name__}: "
                          f"{e})") from e
  return _unwrap(obj, path)


def _unwrap(obj, path):
  """Replaces the dtype placeholders of NumPy scalars' pickles; refuses anything else foreign."""
  if isinstance(obj, _DTypeState):
    return obj.dtype
  if isinstance(obj, dict):
    return type(obj)((_unwrap(k, path), _unwrap(v, path)) for k, v in obj.items())
  if isinstance(obj, list | tuple):
    return type(obj)(_unwrap(v, path) for v in obj)
  return obj


def read_torch(path: str):
  """The object a `torch.save` file holds, tensors as NumPy arrays; both on-disk formats.

  Raises UnsafeFileError (nothing of the pickle run) for any global other than tensors, storages,
  NumPy scalars and containers, FileFormatError for a file that is not a torch.save file.
  """
  if zipfile.is_zipfile(path):
    return _read_torch_zip(path)
  with open(path, "rb") as f:
    magic = _safe_pickle(f, path)
    if magic != _LEGACY_MAGIC:
      raise FileFormatError(f"{path}: not a torch.save file (no zip archive, no legacy magic "
                            "number)")
    return _read_torch_legacy(f, path)


def _safe_pickle(f, path):
  return _load(_Unpickler(f, path, _no_storage(path)), path)


def _no_storage(path):
  def load(*_):
    raise UnsafeFileError(f"{path}: refused: a storage where none belongs")
  return load


def _read_torch_zip(path: str):
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise FileFormatError(f"{path}: a zip archive, but not a torch.save file (no data.pkl)")
    root = pickles[0][: -len("data.pkl")]
    order = archive.read(root + "byteorder").decode().strip() if root + "byteorder" in names \
        else "little"

    def load_storage(key, dtype, numel):
      raw = archive.read(f"{root}data/{key}")
      array = np.frombuffer(raw, dtype.newbyteorder("<" if order == "little" else ">"))
      if len(array) < numel:
        raise FileFormatError(f"{path}: storage {key} holds {len(array)} of {numel} elements")
      return array.astype(dtype)

    with archive.open(pickles[0]) as f:
      return _load(_Unpickler(f, path, load_storage), path)


def _read_torch_legacy(f, path: str):
  """PyTorch < 1.6: pickles of the magic number, the protocol version, system info, the object
  (storages as persistent ids), the list of storage keys; then each storage's element count
  (int64) and raw little-endian bytes, in key order."""
  _safe_pickle(f, path)  # protocol version
  info = _safe_pickle(f, path)
  if not isinstance(info, dict) or not info.get("little_endian", True):
    raise FileFormatError(f"{path}: a big-endian legacy torch file is not supported")
  wanted = {}

  def load_storage(key, dtype, numel):
    wanted[key] = (dtype, numel)
    return _Pending(key)

  obj = _load(_Unpickler(f, path, load_storage), path)
  keys = _safe_pickle(f, path)
  storages = {}
  for key in keys:
    dtype, _ = wanted.get(key, (None, 0))
    (count,) = struct.unpack("<q", f.read(8))
    if dtype is None:
      raise FileFormatError(f"{path}: storage {key} is not referenced by the object")
    raw = f.read(count * dtype.itemsize)
    if len(raw) != count * dtype.itemsize:
      raise FileFormatError(f"{path}: storage {key} is cut short")
    storages[key] = np.frombuffer(raw, dtype.newbyteorder("<")).astype(dtype)
  return _unwrap(_resolve(obj, storages, path), path)


def _resolve(obj, storages, path):
  if isinstance(obj, _PendingTensor):
    if obj.storage.key not in storages:
      raise FileFormatError(f"{path}: storage {obj.storage.key} is missing")
    return _rebuild_tensor(storages[obj.storage.key], *obj.args)
  if isinstance(obj, dict):
    return type(obj)((k, _resolve(v, storages, path)) for k, v in obj.items())
  if isinstance(obj, list | tuple):
    return type(obj)(_resolve(v, storages, path) for v in obj)
  return obj


# ------------------------------------------------------------------------------------------------
# Formats

def to_nhwc(images: np.ndarray, layout: str, path: str) -> np.ndarray:
  """(N, C, H, W) or (N, H, W, C) -> (N, H, W, C). `auto`: NCHW when the second axis has 1 or 3
  entries and the last does not; a shape that fits both readings needs `--layout`."""
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
  images = np.asarray(images)
  if images.ndim != 4:
    raise FileFormatError(f"{path}: images must have 4 axes (N, H, W, C or N, C, H, W), got "
                          f"shape {images.shape}")
  if layout == "auto":
    first, last = images.shape[1] in (1, 3), images.shape[-1] in (1, 3)
    if first and last:
      raise FileFormatError(f"{path}: images {images.shape} read as NCHW or NHWC alike; say "
                            "which with --layout")
    layout = "nchw" if first else "nhwc"
  return np.transpose(images, (0, 2, 3, 1)) if layout == "nchw" else images


def npz_format(keys: set) -> str | None:
  """"npz_proto" or "npz_platt" when an .npz's keys are that format's, else None (ours, or a
  released set)."""
  if {"x_proto", "y_proto"} <= keys or {"image", "label"} <= keys:
    return "npz_proto"
  if {"images", "labels", "k", "jit"} <= keys:
    return "npz_platt"
  return None


def read_foreign(path: str, *, layout: str = "auto", experiment: int = -1,
                 dataset: str | None = None) -> Foreign:
  """Reads a .pt / .npy set (DC results, pairs; .npz files go through `read_npz`).
  `experiment`: which of a DC results file's experiments (-1: the last); `dataset`: the
  caller's, used where the file does not name one."""
  if not os.path.exists(path):
    raise FileFormatError(f"{path}: no such file")
  name = os.path.basename(path)
  if name.startswith("res_") and name.endswith((".pt", ".pth")):
    return _read_dc(path, layout, experiment, dataset)
  if name.endswith((".pt", ".pth", ".npy")):
    return _read_pair(path, layout, dataset)
  raise FileFormatError(f"{path}: unknown format; expected .npz (ours, a released set, "
                        "images/labels/k/jit or x_proto/y_proto), res_*.pt (DC-style results), "
                        "or an images/labels pair (.pt or .npy)")


def read_npz(path: str, arrays: dict, *, layout: str = "auto",
             dataset: str | None = None) -> Foreign:
  """An `npz_proto` or `npz_platt` set (see the module docstring) from the arrays of its .npz
  (`kip.io` has read them)."""
  kind = npz_format(set(arrays))
  if kind == "npz_proto":
    x, y = ("x_proto", "y_proto") if "x_proto" in arrays else ("image", "label")
    images = to_nhwc(arrays[x], layout if layout != "auto" else "nhwc", path)
    labels = _labels(arrays[y], len(images), path, dataset, y)
    dataset = dataset or _dataset_from_path(path)
    return Foreign(images, labels, _source(kind, None, dataset, PROTO_STATS, "zca", path))
  if kind == "npz_platt":
    images = to_nhwc(arrays["images"], layout if layout != "auto" else "nchw", path)
    labels = _labels(arrays["labels"], len(images), path, dataset, "labels")
    dataset = dataset or _dataset_from_path(path)
    zca = "layernorm_zca" if dataset == "svhn_cropped" else "zca"
    extras = {"platt_scale": np.exp(np.asarray(arrays["k"], np.float32)),
              "jitter": np.asarray(arrays["jit"], np.float32)}
    return Foreign(images, labels, _source(kind, None, dataset, None, zca, path), extras)
  raise FileFormatError(f"{path}: not a known foreign .npz (keys {sorted(arrays)})")


def _source(fmt, method, dataset, stats_table, zca, path, **kw) -> Source:
  stats = None
  if stats_table is not None:
    if dataset is None:
      raise FileFormatError(f"{path}: the file does not say its dataset; give --dataset")
    if dataset not in stats_table:
      raise FileFormatError(f"{path}: the {fmt} format has no published statistics for "
                            f"{dataset}")
    stats = stats_table[dataset]
  return Source(fmt, method, dataset, stats=stats, zca=zca if dataset in _COLOUR else None, **kw)


_DC_NAME = re.compile(r"res_(?P<method>[A-Za-z0-9]+)_(?P<dataset>[A-Za-z0-9]+)"
                      r"_(?P<net>[A-Za-z0-9]+)_(?P<ipc>\d+)ipc\.pth?$")


def _read_dc(path, layout, experiment, dataset) -> Foreign:
  match = _DC_NAME.search(os.path.basename(path))
  obj = read_torch(path)
  if not isinstance(obj, dict) or "data" not in obj:
    raise FileFormatError(f"{path}: a DC results file holds a dict with `data`; found "
                          f"{type(obj).__name__}")
  runs = obj["data"]
  if not isinstance(runs, list | tuple) or not runs:
    raise FileFormatError(f"{path}: `data` holds no experiments")
  if not -len(runs) <= experiment < len(runs):
    raise FileFormatError(f"{path}: experiment {experiment} asked for, the file has {len(runs)}")
  pair = runs[experiment]
  if not (isinstance(pair, list | tuple) and len(pair) == 2):
    raise FileFormatError(f"{path}: each experiment is [images, labels]; found {type(pair)}")
  images = to_nhwc(np.asarray(pair[0]), layout, path)
  file_dataset = _DATASET_NAMES.get(match["dataset"].lower()) if match else None
  if dataset and file_dataset and dataset != file_dataset:
    raise FileFormatError(f"{path}: made from {file_dataset}, not {dataset}")
  dataset = dataset or file_dataset
  labels = _labels(np.asarray(pair[1]), len(images), path, dataset, "labels")
  ipc = int(match["ipc"]) if match else None
  _check_ipc(labels, ipc, path)
  published = {str(k): [float(a) for a in v] for k, v in dict(obj.get("accs_all_exps", {})).items()}
  source = _source("dc_results", match["method"].lower() if match else "dc", dataset, DC_STATS,
                   None, path, net=match["net"] if match else None, ipc=ipc,
                   experiment=experiment % len(runs), published=published)
  return Foreign(images.astype(np.float32), labels, source)


def _check_ipc(labels: np.ndarray, ipc: int | None, path: str) -> None:
  if ipc is None:
    return
  counts = np.bincount(labels.argmax(-1), minlength=labels.shape[1])
  if len(labels) != ipc * labels.shape[1]:
    raise FileFormatError(f"{path}: the name says {ipc} per class ({ipc * labels.shape[1]} "
                          f"images), the file holds {len(labels)} (per class: "
                          f"{counts.tolist()})")


def _pair_paths(path: str) -> tuple[str, str, str | None]:
  folder, name = os.path.split(path)
  if "images" not in name and "labels" in name:
    name = name.replace("labels", "images")
  if "images" not in name:
    raise FileFormatError(f"{path}: a pair file is named *images*.pt / *images*.npy beside its "
                          "*labels* file")
  images = os.path.join(folder, name)
  labels = os.path.join(folder, name.replace("images", "labels"))
  lr = os.path.join(folder, name.replace("images", "lr"))
  if not os.path.exists(images):
    raise FileFormatError(f"{images}: no such file (the images of pair {path})")
  if not os.path.exists(labels):
    raise FileFormatError(f"{images}: its labels file {labels} does not exist")
  return images, labels, lr if os.path.exists(lr) else None


def _read_array(path: str) -> np.ndarray:
  if path.endswith(".npy"):
    try:
      return np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
      raise FileFormatError(f"{path}: not a readable .npy file ({e})") from e
  obj = read_torch(path)
  if not isinstance(obj, np.ndarray):
    raise FileFormatError(f"{path}: expected one tensor, found {type(obj).__name__}")
  return obj


def _read_pair(path, layout, dataset) -> Foreign:
  images_path, labels_path, lr_path = _pair_paths(path)
  raw_images = _read_array(images_path)
  raw_labels = _read_array(labels_path)
  if raw_labels.ndim == 4:
    raise FileFormatError(f"{labels_path}: holds images {raw_labels.shape}, not labels")
  images = to_nhwc(raw_images, layout, images_path)
  dataset = dataset or _dataset_from_path(path)
  labels = _labels(raw_labels, len(images), labels_path, dataset, "labels", logits=True)
  extras = {}
  if lr_path:
    lr = np.asarray(_read_array(lr_path), np.float32)
    if lr.size != 1:
      raise FileFormatError(f"{lr_path}: a learning rate is one number, got shape {lr.shape}")
    extras["lr"] = lr.reshape(())
  match = re.search(r"IPC(\d+)", path)
  ipc = int(match[1]) if match else None
  if ipc is not None:
    _check_ipc(labels, ipc, path)
  # MTT/DATM/PAD's `images_best.pt` are in ZCA space on colour data (their configs' --zca);
  # DC-Bench's coreset pairs are DC-normalised only.
  trajectory = os.path.basename(images_path).startswith("images_")
  source = _source("pair", "trajectory" if trajectory else None, dataset, DC_STATS,
                   "kornia_zca" if trajectory else None, path, ipc=ipc)
  return Foreign(images.astype(np.float32), labels, source, extras)


def _labels(raw: np.ndarray, n: int, path: str, dataset: str | None, key: str,
            logits: bool = False) -> np.ndarray:
  """Class ids -> centred one-hot (as our sets); (N, C) floats kept, or made probabilities by a
  softmax when `logits` and they are not one-hot already."""
  raw = np.asarray(raw)
  if len(raw) != n:
    raise FileFormatError(f"{path}: {n} images but {len(raw)} {key}")
  if raw.ndim == 1 or (raw.ndim == 2 and raw.shape[1] == 1):
    ids = raw.reshape(-1)
    if not np.issubdtype(ids.dtype, np.integer):
      if not np.all(ids == np.round(ids)):
        raise FileFormatError(f"{path}: {key} are one number per image but not class ids")
      ids = ids.astype(np.int64)
    num_classes = _num_classes(dataset) or int(ids.max()) + 1
    if ids.min() < 0 or ids.max() >= num_classes:
      raise FileFormatError(f"{path}: class ids lie in [{ids.min()}, {ids.max()}], outside "
                            f"[0, {num_classes})")
    return (np.eye(num_classes, dtype=np.float32)[ids] - 1.0 / num_classes).astype(np.float32)
  if raw.ndim != 2:
    raise FileFormatError(f"{path}: {key} must be class ids (N,) or (N, C), got {raw.shape}")
  y = raw.astype(np.float64)
  hard = np.all((y == 0) | (y == 1)) and np.all(y.sum(-1) == 1)
  if logits and not hard:
    y = np.exp(y - y.max(-1, keepdims=True))
    y = y / y.sum(-1, keepdims=True)
  return y.astype(np.float32)


def _num_classes(dataset: str | None) -> int | None:
  return DATASETS[dataset][1] if dataset in DATASETS else None


def _dataset_from_path(path: str) -> str | None:
  parts = re.split(r"[/\\_.\-]", os.path.normpath(path).lower())
  for i in range(len(parts)):
    for joined in (parts[i] + "_" + parts[i + 1] if i + 1 < len(parts) else None, parts[i]):
      if joined in _DATASET_NAMES:
        return _DATASET_NAMES[joined]
  return None
