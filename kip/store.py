"""A store: a folder named by a digest of the settings that made it, holding entries that are
each written atomically as a unit.

Everything the toolkit keeps for reuse goes through it (expert trajectories, a teacher's run
folder, ...): `digest_path(base, name, settings)` names the folder, `Store.open(path, settings)`
opens or makes it (`store.json` records the settings; a store made with other settings is refused,
naming what differs), and `store.put(entry, files)` writes one entry's files into a temporary
folder that is renamed into place only once every file is written. A process killed between two
files of an entry leaves a temporary folder that the next `open` removes, never half an entry:
`entries()` lists only complete ones.

Layout: `<path>/store.json`, `<path>/<entry>/<file>` for each finished entry,
`<path>/work/<entry>/` for an entry in progress (a resumable run's workdir), and transient
`<path>/.<entry>.<random>.tmp/` folders while an entry is written.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from kip.files import atomic_write, write_json

__all__ = ["STORE_FILE", "StoreMismatch", "Store", "digest", "digest_path"]

STORE_FILE = "store.json"


class StoreMismatch(ValueError):
  """The store at this path was made with other settings, or in another layout."""


def digest(settings: dict) -> str:
  """12 hex digits of the SHA-256 of `settings` as sorted JSON: names a store by what made it."""
  text = json.dumps(settings, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def digest_path(base: str, name: str, settings: dict) -> str:
  """`<base>/<name>-<digest of settings>`: the default folder of a store."""
  return os.path.join(base, f"{name}-{digest(settings)}")


def _differences(old: dict, new: dict) -> list[str]:
  keys = sorted(set(old) | set(new))
  return [f"{k}: store {old.get(k)!r}, asked {new.get(k)!r}" for k in keys
          if old.get(k) != new.get(k)]


def _write(path: str, content: bytes | str | dict | np.ndarray) -> None:
  """One file of an entry: JSON for a `.json` name, else bytes, text, an array (`.npy`) or a
  dict of arrays (`.npz`), as `kip.files` writes them."""
  if path.endswith(".json"):
    write_json(path, content)
  else:
    atomic_write(path, content.encode() if isinstance(content, str) else content)


class Store:
  """The store at `path` with its `settings` (see the module docstring)."""

  def __init__(self, path: str, settings: dict, meta: dict | None = None):
    self.path, self.settings, self.meta = path, settings, meta or {}

  @classmethod
  def open(cls, path: str, settings: dict | None = None, *, create: bool = True,
           meta: dict | None = None, what: str = "store", hint: str = "") -> Store:
    """The store at `path`, made (with `settings` and `meta`) if absent and `create`.

    With `settings` given, a store made with other settings raises `StoreMismatch` naming what
    differs; with `meta` given, each of its keys must match too. Temporary folders an interrupted
    `put` left behind are removed. `what` and `hint` word the errors (e.g. "expert store",
    "make one with python -m experiments.buffer")."""
    file = os.path.join(path, STORE_FILE)
    if not os.path.exists(file):
      if not create or settings is None:
        raise FileNotFoundError(f"no {what} at {path} (no {STORE_FILE})"
                                + (f"; {hint}" if hint else ""))
      write_json(file, {"settings": settings, **(meta or {})})
    with open(file) as f:
      record = json.load(f)
    if "settings" not in record:
      raise StoreMismatch(f"{file} is not a {what} record; use another folder")
    store = cls(path, record["settings"], {k: v for k, v in record.items() if k != "settings"})
    if settings is not None and store.settings != settings:
      raise StoreMismatch(f"the {what} {path} was made with other settings ("
                          + "; ".join(_differences(store.settings, settings))
                          + "); use another folder")
    for key, value in (meta or {}).items():
      if store.meta.get(key) != value:
        raise StoreMismatch(f"the {what} {path} holds {key} {store.meta.get(key)!r}, this run "
                            f"needs {value!r}; use another folder")
    store.remove_temporaries()
    return store

  def remove_temporaries(self) -> None:
    for tmp in glob.glob(os.path.join(self.path, ".*.tmp")):
      shutil.rmtree(tmp, ignore_errors=True)

  def entries(self, prefix: str = "") -> list[str]:
    """Names of the complete entries (starting with `prefix`), sorted."""
    if not os.path.isdir(self.path):
      return []
    return sorted(n for n in os.listdir(self.path) if n.startswith(prefix) and not
                  n.startswith(".") and n != "work" and os.path.isdir(os.path.join(self.path, n)))

  def has(self, entry: str) -> bool:
    return os.path.isdir(os.path.join(self.path, entry))

  def file(self, entry: str, name: str) -> str:
    """The path of file `name` of `entry`."""
    return os.path.join(self.path, entry, name)

  def work_dir(self, entry: str) -> str:
    """Where a resumable run that makes `entry` keeps its workdir until the entry is put."""
    return os.path.join(self.path, "work", entry)

  def put(self, entry: str, files: dict[str, Any]) -> None:
    """Writes `entry` as a unit: `files` maps a file name to bytes, text, a JSON-able dict (a
    `.json` name), a dict of arrays (`.npz`) or an array (`.npy`). An existing entry is replaced
    once the new one is complete (a kill between the two renames loses the entry, never mixes
    the two)."""
    if not entry or "/" in entry or entry.startswith(".") or entry == "work":
      raise ValueError(f"bad entry name {entry!r}")
    tmp = tempfile.mkdtemp(dir=self.path, prefix=f".{entry}.", suffix=".tmp")
    try:
      for name, content in files.items():
        _write(os.path.join(tmp, name), content)
      final = os.path.join(self.path, entry)
      if os.path.isdir(final):  # replace: move the old one aside first (rename is atomic)
        old = tempfile.mkdtemp(dir=self.path, prefix=f".{entry}.old.", suffix=".tmp")
        os.rename(final, os.path.join(old, entry))
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
      else:
        os.rename(tmp, final)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
