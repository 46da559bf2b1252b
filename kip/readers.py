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
import contextlib
import contextvars
import dataclasses
import math
import os
import pickle
import re
import struct
import zipfile

import numpy as np

from kip.datasets import DATASETS

__all__ = ["FileFormatError", "UnsafeFileError", "Source", "Foreign", "FORMATS", "LAYOUTS",
           "DC_STATS", "PROTO_STATS", "read_torch", "read_foreign", "read_npz", "npz_format",
           "to_nhwc", "read_npy", "read_npy_file", "npz_keys", "read_npz_arrays", "numeric",
           "dataset_optional"]

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


_MAX_DEPTH = 100  # containers in a torch.save file nest a few levels; deeper is not a set
# What a zip file's entries may inflate to, all together: torch.save and np.savez store arrays
# uncompressed, np.savez_compressed gains little on floats, a zip bomb gains a thousandfold.
_INFLATE_FLOOR = 64 * 2**20
_INFLATE_RATIO = 64


class _Inflation:
  """Refuses a zip entry once the entries read from `path` would inflate past 64 MiB plus 64x
  the file's size, before it is inflated (the size comes from the zip directory, and reads stop
  there)."""

  def __init__(self, path: str):
    self.path, self.size = path, os.path.getsize(path)
    self.left = _INFLATE_FLOOR + _INFLATE_RATIO * self.size

  def take(self, info: zipfile.ZipInfo) -> None:
    if info.file_size > self.left:
      raise FileFormatError(f"{self.path}: refused: entry {info.filename} inflates to "
                            f"{info.file_size:,} bytes from a {self.size:,}-byte file (a zip "
                            "bomb, not a stored array)")
    self.left -= info.file_size


class _Sealed:
  """What `find_class` hands a pickle: made afresh for each request, and BUILD on it is refused,
  so a hostile file cannot change what the next file's reader gets."""

  __slots__ = ("what",)

  def __init__(self, what: str):
    self.what = what

  def __setstate__(self, state):
    raise UnsafeFileError(f"refused: the pickle tries to change {self.what}; nothing of it was "
                          "run")


class _StorageType(_Sealed):
  __slots__ = ("dtype",)

  def __init__(self, what: str, dtype: np.dtype):
    super().__init__(what)
    self.dtype = dtype


class _Function(_Sealed):
  __slots__ = ("fn",)

  def __init__(self, what: str, fn):
    super().__init__(what)
    self.fn = fn

  def __call__(self, *args):
    return self.fn(*args)


def _check_tensor_args(offset, size, stride) -> tuple[int, tuple, tuple]:
  size, stride = tuple(size), tuple(stride)
  if not (isinstance(offset, int) and all(isinstance(n, int) for n in (*size, *stride))):
    raise FileFormatError(f"a tensor whose offset {offset!r:.40}, shape {size!r:.40} or strides "
                          f"{stride!r:.40} are not whole numbers")
  if len(size) != len(stride) or min((*size, *stride, offset), default=0) < 0:
    raise FileFormatError(f"a tensor with shape {size}, strides {stride} and offset {offset} "
                          "does not describe its storage")
  return offset, size, stride


class _Tensors:
  """The tensors of one file: storages read once each, and tensors that together hold no more
  elements than their storages. A stride-0 view, or one storage viewed again and again, is how a
  700-byte file claims gigabytes; distilled sets never alias."""

  def __init__(self, path: str):
    self.path, self.storages, self.left = path, {}, 0

  def add(self, key: str, array: np.ndarray) -> None:
    self.storages[key] = array
    self.left += array.nbytes

  def rebuild(self, storage: np.ndarray, offset, size, stride) -> np.ndarray:
    """A tensor as a NumPy array: `size` elements of `storage` at `offset`, element `stride`."""
    offset, size, stride = _check_tensor_args(offset, size, stride)
    numel = math.prod(size)
    if numel > len(storage) - offset:
      raise FileFormatError(f"{self.path}: a tensor of shape {size} ({numel:,} elements) over "
                            f"{max(len(storage) - offset, 0):,} elements of its storage")
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
    if numel and extent > len(storage):
      raise FileFormatError(f"{self.path}: a tensor of shape {size} reaches past its storage "
                            f"({len(storage)})")
    if numel * storage.itemsize > self.left:
      raise FileFormatError(f"{self.path}: its tensors hold more elements than its storages "
                            "(views of one storage read again and again)")
    self.left -= numel * storage.itemsize
    if not size:
      return np.array(storage[offset])
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], size, [s * item for s in stride],
                                           writeable=False)
    return np.array(view)


def _numpy_scalar(dtype, raw=None):
  dtype = dtype.dtype if isinstance(dtype, _DTypeState) else dtype
  if not isinstance(dtype, np.dtype) or not isinstance(raw, bytes) or len(raw) != dtype.itemsize:
    raise UnsafeFileError("a NumPy scalar with unexpected arguments")
  return np.frombuffer(raw, dtype)[0]


def _latin1(text, encoding="latin1"):
  """Protocol-2 pickles spell bytes as `_codecs.encode(text, "latin1")`; only that is done."""
  if not isinstance(text, str) or encoding != "latin1":
    raise UnsafeFileError("_codecs.encode with unexpected arguments")
  return text.encode("latin1")


def _numpy_dtype(name, *_):
  if not isinstance(name, str) or not re.fullmatch(r"[biuf]\d{1,2}|bool|float\d+|int\d+", name):
    raise UnsafeFileError(f"a NumPy dtype {name!r:.40}")
  return _DTypeState(np.dtype(name))


class _DTypeState:
  """np.dtype as pickled (the constructor, then BUILD with its byte order): only the byte order
  is taken from the state. A new one for each dtype in the file."""

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


# Immutable types (BUILD on them fails) handed out as they are.
_TYPES = {("collections", "OrderedDict"): collections.OrderedDict,
          ("builtins", "set"): set, ("builtins", "frozenset"): frozenset}


class _Unpickler(pickle.Unpickler):
  """Rebuilds tensors, storages, NumPy scalars and containers and nothing else; storages come
  from `load_storage(key, dtype, numel)`, tensors from `tensors.rebuild` (legacy storages are
  read after the pickle: their tensors wait as `_PendingTensor`)."""

  def __init__(self, file, path, load_storage, tensors: _Tensors | None = None):
    super().__init__(file)
    self._path, self._load_storage = path, load_storage
    self._tensors = tensors or _Tensors(path)

  def _tensor(self, storage, offset, size, stride, *_):
    if isinstance(storage, _Pending):
      _check_tensor_args(offset, size, stride)
      return _PendingTensor(storage, (offset, size, stride))
    if not isinstance(storage, np.ndarray):
      raise UnsafeFileError(f"{self._path}: refused: a tensor over something that is not a "
                            "storage")
    return self._tensors.rebuild(storage, offset, size, stride)

  def find_class(self, module, name):
    what = f"{module}.{name}"
    if (module, name) in _TYPES:
      return _TYPES[(module, name)]
    if module == "torch" and name.endswith("Storage") and name[:-len("Storage")] in _DTYPES:
      return _StorageType(what, np.dtype(_DTYPES[name[:-len("Storage")]]))
    functions = {("torch._utils", "_rebuild_tensor_v2"): self._tensor,
                 ("torch._utils", "_rebuild_tensor"): self._tensor,
                 ("torch._utils", "_rebuild_parameter"): lambda data, *_: data,
                 ("numpy.core.multiarray", "scalar"): _numpy_scalar,
                 ("numpy._core.multiarray", "scalar"): _numpy_scalar,
                 ("numpy", "dtype"): _numpy_dtype, ("_codecs", "encode"): _latin1}
    if (module, name) in functions:
      return _Function(what, functions[(module, name)])
    raise UnsafeFileError(f"{self._path}: refused: the pickle asks for {what}, which is not a "
                          "tensor or container; nothing of it was run")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[4], int) and pid[4] >= 0):
      raise UnsafeFileError(f"{self._path}: refused: a persistent object {pid!r:.60} that is not "
                            "a tensor storage")
    return self._load_storage(str(pid[2]), pid[1].dtype, pid[4])


def _load(unpickler: _Unpickler, path: str):
  try:
    obj = unpickler.load()
  except FileFormatError as e:
    raise type(e)(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
  except Exception as e:  # noqa: BLE001  (any unpickling error means a damaged file)
    raise FileFormatError(f"{path}: not a readable torch.save file ({type(e).__name__}: "
                          f"{str(e):.200})") from None
  return obj


def _finish(obj, path: str, tensors: _Tensors | None = None):
  """`obj` with NumPy dtypes for their pickled placeholders and (legacy files) tensors for the
  pending ones, walked without recursion: containers nested deeper than `_MAX_DEPTH` or holding
  themselves are refused; a container reached twice is rebuilt once."""
  done: dict[int, object] = {}
  active: set[int] = set()
  stack = [(obj, 0, False)]

  def leaf(x):
    if isinstance(x, _DTypeState):
      return x.dtype
    if isinstance(x, _PendingTensor):
      if tensors is None or x.storage.key not in tensors.storages:
        raise FileFormatError(f"{path}: storage {x.storage.key} is missing")
      return tensors.rebuild(tensors.storages[x.storage.key], *x.args)
    return done.get(id(x), x)

  while stack:
    node, depth, expanded = stack.pop()
    if not isinstance(node, dict | list | tuple) or (not expanded and id(node) in done):
      continue
    if expanded:
      active.discard(id(node))
      if isinstance(node, dict):
        done[id(node)] = type(node)((leaf(k), leaf(v)) for k, v in node.items())
      else:
        done[id(node)] = type(node)(leaf(v) for v in node)
      continue
    if id(node) in active:
      raise FileFormatError(f"{path}: a {type(node).__name__} that contains itself")
    if depth >= _MAX_DEPTH:
      raise FileFormatError(f"{path}: containers nested more than {_MAX_DEPTH} deep")
    active.add(id(node))
    stack.append((node, depth, True))
    children = [x for kv in node.items() for x in kv] if isinstance(node, dict) else node
    stack.extend((child, depth + 1, False) for child in children)
  return leaf(obj)


@contextlib.contextmanager
def _damaged(path: str, what: str):
  """Reading `path`: any error but ours (and running out of memory) means a damaged file, said in
  one line; zipfile alone raises a dozen kinds (BadZipFile, NotImplementedError for an unknown
  compression, UnicodeDecodeError for a mangled name, ...)."""
  try:
    yield
  except (FileFormatError, MemoryError):
    raise
  except Exception as e:  # noqa: BLE001
    raise FileFormatError(f"{path}: {what} ({type(e).__name__}: {str(e):.200})") from None


def read_torch(path: str):
  """The object a `torch.save` file holds, tensors as NumPy arrays; both on-disk formats.

  Raises UnsafeFileError (nothing of the pickle run) for any global other than tensors, storages,
  NumPy scalars and containers, FileFormatError for a file that is not a torch.save file, is
  damaged, or claims more memory than its size allows (see the module docstring).
  """
  with _damaged(path, "not a readable torch.save file"):
    if zipfile.is_zipfile(path):
      return _read_torch_zip(path)
    with open(path, "rb") as f:
      magic = _safe_pickle(f, path)
      if magic != _LEGACY_MAGIC:
        raise FileFormatError(f"{path}: not a torch.save file (no zip archive, no legacy magic "
                              "number)")
      return _read_torch_legacy(f, path)


def _safe_pickle(f, path):
  def no_storage(*_):
    raise UnsafeFileError(f"{path}: refused: a storage where none belongs")
  return _finish(_load(_Unpickler(f, path, no_storage), path), path)


def _read_torch_zip(path: str):
  inflation = _Inflation(path)
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise FileFormatError(f"{path}: a zip archive, but not a torch.save file (no data.pkl)")
    root = pickles[0][: -len("data.pkl")]
    order = "little"
    if root + "byteorder" in names:
      inflation.take(archive.getinfo(root + "byteorder"))
      order = archive.read(root + "byteorder")[:16].decode("ascii", "replace").strip()
    if order not in ("little", "big"):
      raise FileFormatError(f"{path}: byte order {order!r:.20} is neither little nor big")
    tensors = _Tensors(path)

    def load_storage(key, dtype, numel):
      if key in tensors.storages:
        if tensors.storages[key].dtype != dtype:
          raise FileFormatError(f"{path}: storage {key} read as two types")
        return tensors.storages[key]
      try:
        info = archive.getinfo(f"{root}data/{key}")
      except KeyError:
        raise FileFormatError(f"{path}: storage {key} is missing") from None
      need = numel * dtype.itemsize
      if info.file_size != need:
        raise FileFormatError(f"{path}: storage {key} holds {info.file_size:,} bytes where its "
                              f"{numel:,} {dtype} elements take {need:,}")
      inflation.take(info)
      with archive.open(info) as f:
        raw = f.read(need)
      if len(raw) != need:
        raise FileFormatError(f"{path}: storage {key} is cut short")
      array = np.frombuffer(raw, dtype.newbyteorder("<" if order == "little" else ">"))
      tensors.add(key, array.astype(dtype))
      return tensors.storages[key]

    inflation.take(archive.getinfo(pickles[0]))
    with archive.open(pickles[0]) as f:
      obj = _load(_Unpickler(f, path, load_storage, tensors), path)
    return _finish(obj, path, tensors)


def _read_torch_legacy(f, path: str):
  """PyTorch < 1.6: pickles of the magic number, the protocol version, system info, the object
  (storages as persistent ids), the list of storage keys; then each storage's element count
  (int64) and raw little-endian bytes, in key order. Every count is checked against the bytes
  the file has left before anything is read."""
  with _damaged(path, "a damaged legacy torch.save file"):
    return _legacy_body(f, path)


def _legacy_body(f, path: str):
  size = os.fstat(f.fileno()).st_size
  _safe_pickle(f, path)  # protocol version
  info = _safe_pickle(f, path)
  if not isinstance(info, dict) or not info.get("little_endian", True):
    raise FileFormatError(f"{path}: a big-endian legacy torch file is not supported")
  wanted = {}

  def load_storage(key, dtype, numel):
    wanted[key] = dtype
    return _Pending(key)

  tensors = _Tensors(path)
  obj = _load(_Unpickler(f, path, load_storage, tensors), path)
  keys = _safe_pickle(f, path)
  if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
    raise FileFormatError(f"{path}: the list of storage keys is a {type(keys).__name__}, not a "
                          "list of keys")
  if len(set(keys)) != len(keys):
    raise FileFormatError(f"{path}: a storage key is listed twice")
  for key in keys:
    if key not in wanted:
      raise FileFormatError(f"{path}: storage {key} is not referenced by the object")
    dtype = wanted[key]
    header = f.read(8)
    if len(header) != 8:
      raise FileFormatError(f"{path}: cut short in the header of storage {key}")
    (count,) = struct.unpack("<q", header)
    left = size - f.tell()
    if count < 0 or count * dtype.itemsize > left:
      raise FileFormatError(f"{path}: storage {key} declares {count:,} elements of {dtype}; the "
                            f"file has {left:,} bytes left (cut short or damaged)")
    raw = f.read(count * dtype.itemsize)
    if len(raw) != count * dtype.itemsize:
      raise FileFormatError(f"{path}: storage {key} is cut short")
    tensors.add(key, np.frombuffer(raw, dtype.newbyteorder("<")).astype(dtype))
  return _finish(obj, path, tensors)


# ------------------------------------------------------------------------------------------------
# .npy and .npz without trusting their headers

def read_npy(f, size: int, path: str, name: str = "") -> np.ndarray:
  """One `.npy` array from the open binary file `f` of `size` bytes (a file, or an entry of an
  .npz): the shape and dtype its header declares must take exactly the bytes that follow, which
  is checked before anything is allocated; pickled (object) arrays are refused."""
  where = f"{path}{f' entry {name}' if name else ''}"
  with _damaged(where, "not a readable .npy array"):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
      raise FileFormatError(f"{where}: .npy format version {version} is not supported")
  if dtype.hasobject:
    raise FileFormatError(f"{where}: refused: an array of Python objects (a pickle), not "
                          "numbers")
  need = math.prod(shape) * dtype.itemsize
  left = size - f.tell()
  if need != left:
    raise FileFormatError(f"{where}: declares shape {shape} of {dtype} ({need:,} bytes) but "
                          f"holds {left:,} bytes")
  array = np.empty(shape[::-1] if fortran else shape, dtype)
  with _damaged(where, "damaged"):
    got = f.readinto(array.reshape(-1).view(np.uint8)) if need else 0
  if got != need:
    raise FileFormatError(f"{where}: cut short ({got:,} of {need:,} bytes)")
  return array.T if fortran else array


def read_npy_file(path: str) -> np.ndarray:
  """A `.npy` file, read as `read_npy` does."""
  with open(path, "rb") as f:
    return read_npy(f, os.fstat(f.fileno()).st_size, path)


def npz_keys(path: str) -> list[str]:
  """The array names of an .npz file, from its zip directory (nothing is inflated)."""
  with _damaged(path, "not a readable .npz file"), zipfile.ZipFile(path) as archive:
    names = archive.namelist()
  return [n[:-len(".npy")] for n in names if n.endswith(".npy")]


def read_npz_arrays(path: str, keys=None) -> dict[str, np.ndarray]:
  """The arrays `keys` (an iterable of names; None: all) of an .npz file; names it lacks are
  left out. Each entry's size comes from the zip directory and counts against what the file may
  inflate to (`_Inflation`), and each header is checked as `read_npy` does, before the entry is
  read: a file's arrays take memory in proportion to the file."""
  inflation = _Inflation(path)
  arrays = {}
  with _damaged(path, "not a readable .npz file"), zipfile.ZipFile(path) as archive:
    infos = {i.filename[:-len(".npy")]: i for i in archive.infolist()
             if i.filename.endswith(".npy")}
    for key in infos if keys is None else [k for k in keys if k in infos]:
      inflation.take(infos[key])
      with archive.open(infos[key]) as f:
        arrays[key] = read_npy(f, infos[key].file_size, path, key)
  return arrays


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
  for key, array in arrays.items():
    numeric(array, key, path)
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
    for name, value in extras.items():
      if value.size != 1 or not np.isfinite(value).all():
        raise FileFormatError(f"{path}: {'k' if name == 'platt_scale' else 'jit'} must be one "
                              f"finite number, found {value.size} value(s)")
    return Foreign(images, labels, _source(kind, None, dataset, None, zca, path), extras)
  raise FileFormatError(f"{path}: not a known foreign .npz (keys {sorted(arrays)})")


def numeric(array: np.ndarray, key: str, path: str) -> np.ndarray:
  """`array` if it holds numbers (booleans, integers, floats), else one line naming `key`."""
  if array.dtype.kind not in "biuf":
    raise FileFormatError(f"{path}: {key} must hold numbers, found {array.dtype} values")
  return array


_DATASET_OPTIONAL = contextvars.ContextVar("dataset_optional", default=False)


@contextlib.contextmanager
def dataset_optional():
  """Within it, a file whose format normalises with a dataset's published statistics but that
  names no dataset (an MTT `images_best.pt`, say) is read without them (`Source.stats` None, so
  no preprocessor), for callers that only look at the images (`experiments.show`); outside it,
  such a file asks for --dataset."""
  token = _DATASET_OPTIONAL.set(True)
  try:
    yield
  finally:
    _DATASET_OPTIONAL.reset(token)


def _source(fmt, method, dataset, stats_table, zca, path, **kw) -> Source:
  stats = None
  if stats_table is not None and not (dataset is None and _DATASET_OPTIONAL.get()):
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
    return read_npy_file(path)
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
  # MTT/DATM/PAD's `images_<name>.pt` (torch.save) are in ZCA space on colour data (their
  # configs' --zca); DC-Bench's coreset pairs and `.npy` pairs (any other code's) are
  # DC-normalised only.
  name = os.path.basename(images_path)
  trajectory = name.startswith("images_") and name.endswith((".pt", ".pth"))
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
