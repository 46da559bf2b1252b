"""`torch.save` files written without PyTorch, honest or hostile, for the reader's tests.

A pickle is spelt opcode by opcode (protocol 2, what torch.save writes), so a test can say what
a real PyTorch would write and also what it never would: a tensor with stride 0, a storage that
claims more than it holds, a list that contains itself, a BUILD on an allow-listed global.
"""

from __future__ import annotations

import io
import struct
import zipfile
from typing import Any, NamedTuple

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
STORAGES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
            np.dtype(np.int64): "LongStorage", np.dtype(np.uint8): "ByteStorage"}


class Global(NamedTuple):
  module: str
  name: str


class Call(NamedTuple):
  """`fn(*args)` (REDUCE)."""

  fn: Any
  args: tuple


class Build(NamedTuple):
  """`obj` then BUILD with `state` (what `__setstate__` or a `__dict__` update receives)."""

  obj: Any
  state: Any


class Storage(NamedTuple):
  """A persistent id naming storage `key` of `numel` elements of `dtype`."""

  key: str
  dtype: np.dtype
  numel: int


class Tensor(NamedTuple):
  """`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`."""

  storage: Storage
  offset: int
  size: tuple
  stride: tuple


class Raw(NamedTuple):
  """Opcodes spelt by hand."""

  code: bytes


class Pickler:
  """Writes values as protocol-2 opcodes; a container met again is fetched from the memo (so a
  list may contain itself)."""

  def __init__(self):
    self.out = io.BytesIO()
    self.memo: dict[int, int] = {}

  def dumps(self, value) -> bytes:
    self.out.write(b"\x80\x02")
    self.save(value)
    self.out.write(b".")
    return self.out.getvalue()

  def _put(self, value) -> None:
    index = len(self.memo)
    self.memo[id(value)] = index
    self.out.write(b"r" + struct.pack("<I", index))

  def save(self, value) -> None:
    w = self.out.write
    if id(value) in self.memo:
      w(b"j" + struct.pack("<I", self.memo[id(value)]))
    elif isinstance(value, Raw):
      w(value.code)
    elif value is None:
      w(b"N")
    elif value is True or value is False:
      w(b"\x88" if value else b"\x89")
    elif isinstance(value, int):
      if -2**31 <= value < 2**31:
        w(b"J" + struct.pack("<i", value))
      else:
        data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
        w(b"\x8a" + bytes([len(data)]) + data)
    elif isinstance(value, float):
      w(b"G" + struct.pack(">d", value))
    elif isinstance(value, str):
      data = value.encode()
      w(b"X" + struct.pack("<I", len(data)) + data)
    elif isinstance(value, Global):
      w(b"c" + f"{value.module}\n{value.name}\n".encode())
    elif isinstance(value, Call):
      self.save(value.fn)
      self.save(tuple(value.args))
      w(b"R")
    elif isinstance(value, Build):
      self.save(value.obj)
      self.save(value.state)
      w(b"b")
    elif isinstance(value, Storage):
      self.save(("storage", Global("torch", STORAGES[np.dtype(value.dtype)]), value.key, "cpu",
                 value.numel))
      w(b"Q")
    elif isinstance(value, Tensor):
      self.save(Call(Global("torch._utils", "_rebuild_tensor_v2"),
                     (value.storage, value.offset, tuple(value.size), tuple(value.stride), False,
                      Call(Global("collections", "OrderedDict"), ()))))
    elif isinstance(value, tuple):
      w(b"(")
      for item in value:
        self.save(item)
      w(b"t")
    elif isinstance(value, list):
      w(b"]")
      self._put(value)
      for item in value:
        w(b"(")
        self.save(item)
        w(b"e")
    elif isinstance(value, dict):
      w(b"}")
      self._put(value)
      for k, v in value.items():
        self.save(k)
        self.save(v)
        w(b"s")
    else:
      raise TypeError(f"cannot spell {type(value).__name__}")


def dumps(value) -> bytes:
  return Pickler().dumps(value)


def tensor(key: str, array: np.ndarray) -> tuple[Tensor, bytes]:
  """A contiguous tensor over a storage of its own, and the storage's bytes."""
  array = np.ascontiguousarray(array)
  strides = tuple(s // array.itemsize for s in array.strides)
  return (Tensor(Storage(key, array.dtype, array.size), 0, array.shape, strides),
          array.astype(array.dtype.newbyteorder("<")).tobytes())


def write_zip(path, obj, storages: dict[str, bytes], compress: dict | None = None) -> None:
  """The zip format of PyTorch >= 1.6: `archive/data.pkl`, `archive/data/<key>` (stored, as
  torch.save does, unless `compress` names the key), `archive/byteorder`, `archive/version`.
  A storage given as (chunk, count) is written as `count` repeats of `chunk`."""
  compress = compress or {}
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", dumps(obj))
    archive.writestr("archive/byteorder", "little")
    for key, data in storages.items():
      info = zipfile.ZipInfo(f"archive/data/{key}")
      info.compress_type = zipfile.ZIP_DEFLATED if key in compress else zipfile.ZIP_STORED
      chunk, count = data if isinstance(data, tuple) else (data, 1)
      with archive.open(info, "w", force_zip64=True) as f:
        for _ in range(count):
          f.write(chunk)
    archive.writestr("archive/version", "3\n")


def write_legacy(path, obj, storages: dict[str, bytes] | None = None, *,
                 keys: Any = None, counts: dict[str, int] | None = None,
                 tail: bytes | None = None) -> None:
  """The legacy format (PyTorch < 1.6): magic, protocol, system info, the object, the storage
  keys, then each storage's element count and bytes. `keys`, `counts` and `tail` replace what
  an honest writer would put there."""
  storages = storages or {}
  info = {"protocol_version": 1001, "little_endian": True,
          "type_sizes": {"short": 2, "int": 4, "long": 4}}
  parts = [dumps(LEGACY_MAGIC), dumps(1001), dumps(info), dumps(obj),
           dumps(list(storages) if keys is None else keys)]
  if tail is None:
    body = b""
    for key, data in storages.items():
      count = (counts or {}).get(key, len(data) // 4)
      body += struct.pack("<q", count) + data
    tail = body
  with open(path, "wb") as f:
    f.write(b"".join(parts) + tail)
