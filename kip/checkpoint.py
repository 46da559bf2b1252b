"""Checkpoints of any state pytree, keyed by tree path, and the lock on a run's workdir.

One format for every run of the loop (distillers, experts, teachers, finite-net training):
`<workdir>/checkpoints/ckpt_<step>.npz`, written atomically, holding

- `state<path>` for every leaf, `<path>` being `jax.tree_util.keystr` of its tree path
  (`state.opt_state[0].mu`, `state['params']['Dense_0']['kernel']`...); typed PRNG keys as their key
  data, with `keyimpl<path>` naming the implementation;
- `__format__` (`FORMAT`), `step`, `wall_time`, `train_time`, and `__meta__`: JSON the loop
  records (e.g. the step count a method's schedule was built for).

A checkpoint is restored onto a template (`jax.eval_shape` of the method's `init`) by name: a
checkpoint whose paths, shapes or key types differ from the template is refused, never matched by
position, so two same-shaped fields that swapped places cannot restore each other's values. When the
newest checkpoint cannot be read (truncated, empty, not a checkpoint), the previous one is used and
a line says so. Checkpoints of the format before tree paths are refused in one line.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kip.files import atomic_write
from kip.readers import FileFormatError, read_npz_arrays

__all__ = ["FORMAT", "ResumeError", "CheckpointError", "WorkdirBusyError", "Restored",
           "save_checkpoint", "restore_checkpoint", "list_checkpoints", "latest_checkpoint",
           "remove_temporaries", "workdir_lock"]

FORMAT = "kip-checkpoint/2 (leaves keyed by tree path)"


class ResumeError(ValueError):
  """The workdir cannot be resumed as asked (e.g. it holds more steps than requested)."""


class CheckpointError(ResumeError):
  """A checkpoint that cannot be resumed (another state's, or an older format); one line."""


class WorkdirBusyError(ResumeError):
  """Another process is running in this workdir."""


class Restored(NamedTuple):
  """state: the restored pytree; step, wall_time, train_time: where the run stood; meta: the
  JSON the loop recorded with it; path: the file it came from."""

  state: Any
  step: int
  wall_time: float
  train_time: float
  meta: dict
  path: str


class _Damaged(Exception):
  """The file is not a readable checkpoint (truncated, empty, garbage)."""


def _is_key(leaf) -> bool:
  return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _leaves(tree) -> list[tuple[str, Any]]:
  return [(jax.tree_util.keystr(path), leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def list_checkpoints(workdir: str) -> list[tuple[int, str]]:
  """(step, path) of every checkpoint in `workdir`, oldest first."""
  found = []
  for path in glob.glob(os.path.join(workdir, "checkpoints", "ckpt_*.npz")):
    digits = os.path.basename(path)[5:-4]
    if digits.isdigit():
      found.append((int(digits), path))
  return sorted(found)


def latest_checkpoint(workdir: str) -> tuple[int, str] | None:
  """(step, path) of the newest checkpoint file in `workdir` (readable or not), or None."""
  found = list_checkpoints(workdir)
  return found[-1] if found else None


def save_checkpoint(workdir: str, state, step: int, wall_time: float, keep: int = 2,
                    train_time: float = 0.0, meta: dict | None = None) -> str:
  """Writes `state` to `workdir/checkpoints/ckpt_<step>.npz` atomically and keeps the newest
  `keep` checkpoints; returns the path."""
  arrays: dict[str, np.ndarray] = {}
  for name, leaf in _leaves(state):
    if _is_key(leaf):
      arrays["state" + name] = np.asarray(jax.random.key_data(leaf))
      arrays["keyimpl" + name] = np.asarray(str(jax.random.key_impl(leaf)))
    else:
      arrays["state" + name] = np.asarray(jax.device_get(leaf))
  arrays |= {"__format__": np.asarray(FORMAT), "step": np.asarray(step),
             "wall_time": np.asarray(wall_time), "train_time": np.asarray(train_time),
             "__meta__": np.asarray(json.dumps(meta or {}, sort_keys=True))}
  path = os.path.join(workdir, "checkpoints", f"ckpt_{step:08d}.npz")
  atomic_write(path, arrays)
  for _, old in list_checkpoints(workdir)[:-keep]:
    os.remove(old)
  return path


def _read(path: str) -> dict[str, np.ndarray]:
  try:  # sizes checked before anything is inflated (kip.readers): a damaged file costs no memory
    return read_npz_arrays(path)
  except FileFormatError as e:
    raise _Damaged(str(e).removeprefix(f"{path}: ")) from None


def _restore_one(path: str, template) -> Restored:
  data = _read(path)
  if "__format__" not in data:
    if any(k.startswith("leaf_") for k in data):
      raise CheckpointError(
          f"{path} was written before checkpoints were keyed by tree path (its leaves are "
          "matched by position only, which can restore values into the wrong fields); it "
          "cannot be resumed: start afresh with a new --workdir (or delete its checkpoints/)")
    raise _Damaged("no format marker: not a checkpoint")
  if str(data["__format__"]) != FORMAT:
    raise CheckpointError(f"{path} is a checkpoint of format {str(data['__format__'])!r}, not "
                          f"{FORMAT!r}; use a new --workdir")
  expected = _leaves(template)
  stored = {k[len("state"):] for k in data if k.startswith("state")}
  names = {name for name, _ in expected}
  problems = [f"missing {n}" for n in sorted(names - stored)]
  problems += [f"unexpected {n}" for n in sorted(stored - names)]
  for name, leaf in expected:
    if name not in stored:
      continue
    shape = _template_shape(leaf)
    if data["state" + name].shape != shape:
      problems.append(f"{name} has shape {data['state' + name].shape}, this run's {shape}")
    if _is_key(leaf) != ("keyimpl" + name in data):
      problems.append(f"{name} is {'' if _is_key(leaf) else 'not '}a PRNG key in this run")
    elif _is_key(leaf) and str(data["keyimpl" + name]) != leaf.dtype._impl.name:
      problems.append(f"{name} is a {data['keyimpl' + name]} key, this run's "
                      f"{leaf.dtype._impl.name}")
  if problems:
    shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4
                                       else "")
    raise CheckpointError(f"checkpoint {path} does not match this run's state ({shown}); use a "
                          "new --workdir, or the settings that made it")
  leaves = []
  for name, leaf in expected:
    value = data["state" + name]
    if _is_key(leaf):
      restored = jax.random.wrap_key_data(jnp.asarray(value), impl=str(data["keyimpl" + name]))
    else:
      dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
      restored = jnp.asarray(value.astype(dtype, copy=False))
    sharding = getattr(leaf, "sharding", None)
    # Placed like the template only where the template is committed (a mesh's replication):
    # `jit` keys its programs on commitment, so committing what a fresh state leaves uncommitted
    # would compile the step again.
    if sharding is not None and (isinstance(leaf, jax.ShapeDtypeStruct)
                                 or getattr(leaf, "committed", False)):
      restored = jax.device_put(restored, sharding)
    leaves.append(restored)
  state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)
  meta = json.loads(str(data["__meta__"])) if "__meta__" in data else {}
  return Restored(state, int(data["step"]), float(data["wall_time"]),
                  float(data["train_time"]), meta, path)


def _template_shape(leaf) -> tuple[int, ...]:
  if _is_key(leaf):
    # A key's data: the key array's shape, then its implementation's (threefry: (2,)).
    return tuple(leaf.shape) + tuple(leaf.dtype._impl.key_shape)
  return tuple(np.shape(leaf))


def restore_checkpoint(workdir: str, template, log: Callable[[str], None] = print
                       ) -> Restored | None:
  """The newest readable checkpoint of `workdir` restored onto `template` (a pytree of arrays or
  `jax.ShapeDtypeStruct`s with the state's paths, shapes and dtypes), or None when there is none.

  A damaged newest checkpoint is skipped for the one before it, with one line through `log`;
  `CheckpointError` when a readable checkpoint does not match the template, or when every
  checkpoint is damaged.
  """
  found = list_checkpoints(workdir)
  damaged = []
  for step, path in reversed(found):
    try:
      restored = _restore_one(path, template)
    except _Damaged as e:
      damaged.append(f"{os.path.basename(path)} ({e})")
      continue
    if damaged:
      log(f"checkpoint {', '.join(damaged)} is damaged: resuming from the previous one, step "
          f"{step}")
    return restored
  if damaged:
    raise CheckpointError(f"every checkpoint in {os.path.join(workdir, 'checkpoints')} is "
                          f"damaged ({'; '.join(damaged)}); start afresh with a new --workdir")
  return None


def remove_temporaries(workdir: str) -> list[str]:
  """Removes the temporary files an interrupted atomic write left in `workdir` and its
  `checkpoints/` (`<name>.<random>.tmp`); returns their paths."""
  leftovers = glob.glob(os.path.join(workdir, "*.tmp")) + glob.glob(
      os.path.join(workdir, "checkpoints", "*.tmp"))
  for path in leftovers:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
  return leftovers


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
  """Holds an exclusive lock on the folder `workdir` while a process works in it (POSIX `flock`
  on the folder itself, so no lock file is left behind; released when the process dies).
  `WorkdirBusyError` at once when another process holds it."""
  try:
    import fcntl  # noqa: PLC0415
  except ImportError:  # no flock on this platform: no lock
    yield
    return
  fd = os.open(workdir, os.O_RDONLY)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirBusyError(
          f"another process is running in {workdir}; wait for it to finish (or stop it), or use "
          "another --workdir") from None
    try:
      yield
    finally:
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)
