"""Files written safely: atomically (a crash leaves the old file or the new one, never half of
one), as JSON, and under an exclusive lock between processes.

Imports nothing of `kip`, so every module (data, io, loop, checkpoints, stores) can use it
without an import circle.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile

import numpy as np

__all__ = ["atomic_write", "write_json", "file_lock"]


def atomic_write(path: str, content: bytes | np.ndarray | dict[str, np.ndarray]) -> None:
  """Writes bytes, an array as .npy, or a dict of arrays as .npz, to a temporary file, then
  renames it to `path`.

  A crash leaves either the old file or the new one, never half of one. A failed write (disk
  full, a read-only folder) removes its temporary file and raises OSError naming `path`.
  """
  if isinstance(content, dict | np.ndarray):
    buffer = io.BytesIO()
    if isinstance(content, dict):
      np.savez(buffer, **content)
    else:
      np.save(buffer, content)
    content = buffer.getvalue()
  try:
    _write_and_rename(path, content)
  except OSError as e:  # disk full, read-only, no permission: named by the file we meant
    raise OSError(e.errno, e.strerror or str(e), path) from None


def _write_and_rename(path: str, content: bytes) -> None:
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    # mkstemp makes the file 0600; give it the mode a plain open() would (0666 minus the umask),
    # so collaborators on a shared filesystem can read the outputs.
    os.chmod(tmp, 0o666 & ~_umask())
    with os.fdopen(fd, "wb") as f:
      f.write(content)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_json(path: str, payload) -> None:
  """Writes `payload` as indented JSON, atomically (see `atomic_write`)."""
  atomic_write(path, (json.dumps(payload, indent=2) + "\n").encode())


@contextlib.contextmanager
def file_lock(path: str, wait: bool = True):
  """An exclusive lock on the file `path` (created if missing) between processes; yields True
  once it is held, or, with `wait=False`, False at once when another holder has it. POSIX
  `flock` (per open file, so two opens in one process exclude each other too); where there is
  none, no lock: yields True."""
  try:
    import fcntl  # noqa: PLC0415
  except ImportError:
    yield True
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as handle:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
      held = True
    except BlockingIOError:
      held = False
    try:  # yielded outside the except block, so the caller's errors do not chain onto it
      yield held
    finally:
      if held:
        fcntl.flock(handle, fcntl.LOCK_UN)
