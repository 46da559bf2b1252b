"""The one distillation loop: target sampling, evaluation schedule, metrics, checkpoints, resume.

Every method runs here through its `Method(init, update, support)` functions; the loop owns every
side effect. Randomness is a pure function of (seed, step) - `fold_in(key, step)` for JAX and
`default_rng([seed, step])` for the target batches - so a run resumed from a checkpoint takes
exactly the steps an uninterrupted run would have taken. In a multi-host run every process runs
this loop on the same batches (a method's sharded kernels spread the work); only process 0 writes
the workdir, and every process resumes from it.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import time
from collections.abc import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from kip.data import sample_target_batch
from kip.io import atomic_write
from kip.kip import Method
from kip.sharding import is_main_process

__all__ = ["LoopConfig", "NonFiniteLossError", "run", "read_metrics", "truncate_metrics",
           "save_checkpoint", "restore_checkpoint", "latest_checkpoint"]


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint and distilled set are kept."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  steps: int = 1000
  target_batch: int = 5000
  eval_every: int = 100
  checkpoint_every: int = 100
  seed: int = 0
  keep_checkpoints: int = 2


def run(
    method: Method,
    *,
    workdir: str,
    config: LoopConfig,
    x_train: np.ndarray,
    y_train: np.ndarray,
    labels_train: np.ndarray,
    x_init: np.ndarray,
    y_init: np.ndarray,
    evaluate: Callable[[jax.Array, jax.Array], dict[str, float]],
    save_support: Callable[[np.ndarray, np.ndarray, int], None],
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, float]:
  """Runs (or resumes) `config.steps` updates of `method` and returns the final eval metrics.

  Args:
    x_train: (n, H, W, C) float32 preprocessed training images (host memory).
    y_train: (n, C) float32 targets; labels_train: (n,) int classes, for balanced batches.
    x_init, y_init: the initial support set, (n_s, H, W, C) and (n_s, C) float32.
    evaluate: (x_support, y_support) -> {"test_acc", "test_mse", ...}.
    save_support: writes the distilled set at `step` (atomically).
  """
  # Several processes (multi-host) run this same loop on the same data; only the first writes.
  writer = is_main_process()
  if writer:
    os.makedirs(os.path.join(workdir, "checkpoints"), exist_ok=True)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  num_classes = y_train.shape[1]
  root_key = jax.random.key(config.seed)
  state = method.init(jax.random.fold_in(root_key, 0), x_init, y_init)
  start_step, elapsed = 0, 0.0
  restored = restore_checkpoint(workdir, state)
  if restored is not None:
    state, start_step, elapsed = restored
    if writer:
      truncate_metrics(metrics_path, start_step)
    log(f"resuming from step {start_step} ({workdir})")

  def write_metrics(record: dict) -> None:
    if writer:
      with open(metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")

  def save(step: int, wall_time: float) -> None:
    if writer:
      x, y = method.support(state)
      save_support(np.asarray(x), np.asarray(y), step)
      save_checkpoint(workdir, state, step, wall_time, config.keep_checkpoints)

  last_eval: dict[str, float] = {}
  if start_step == 0:
    if writer:
      truncate_metrics(metrics_path, -1)
    last_eval = evaluate(*method.support(state))
    write_metrics({"step": 0, "wall_time": 0.0, **last_eval})
    log(f"step 0: test_acc {last_eval['test_acc']:.4f}  test_mse {last_eval['test_mse']:.5f}")
  else:
    last_eval = _last_eval(metrics_path)

  bar = tqdm(total=config.steps, initial=start_step, disable=not (progress and writer),
             unit="step", dynamic_ncols=True)
  if start_step < config.steps:
    bar.set_description("compiling the step")
  t0 = time.perf_counter() - elapsed
  for step in range(start_step + 1, config.steps + 1):
    idx = sample_target_batch(labels_train, config.target_batch, config.seed, step, num_classes)
    key = jax.random.fold_in(root_key, step)
    new_state, metrics = method.update(state, key, x_train[idx], y_train[idx])
    record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    if not math.isfinite(record["loss"]):
      bar.close()
      last = latest_checkpoint(workdir)
      raise NonFiniteLossError(
          f"loss became {record['loss']} at step {step}; stopped. The last good checkpoint "
          f"(step {last[0] if last else 0}) and distilled set are kept in {workdir}; "
          "try a lower --lr")
    state = new_state
    if step == start_step + 1:
      bar.set_description("distilling")
    if step % config.eval_every == 0 or step == config.steps:
      last_eval = evaluate(*method.support(state))
      record.update(last_eval)
    record["wall_time"] = round(time.perf_counter() - t0, 3)
    write_metrics(record)
    bar.set_postfix({k: f"{v:.4g}" for k, v in record.items()
                     if k in ("loss", "test_acc", "target_acc")}, refresh=False)
    bar.update(1)
    if step % config.checkpoint_every == 0 or step == config.steps:
      save(step, record["wall_time"])
  bar.close()
  if start_step == config.steps and writer:
    x, y = method.support(state)  # already finished: make sure the set on disk is this one
    save_support(np.asarray(x), np.asarray(y), config.steps)
  return last_eval


def read_metrics(path: str) -> list[dict]:
  """The records of a metrics.jsonl file."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise
      # A run killed mid-append leaves at most a partial last line; its step is redone anyway.
  return records


def _last_eval(path: str) -> dict[str, float]:
  evals = [r for r in read_metrics(path) if "test_acc" in r]
  if not evals:
    return {}
  return {k: v for k, v in evals[-1].items() if k.startswith("test_")}


def truncate_metrics(path: str, last_step: int) -> None:
  """Drops records after `last_step` (they belong to steps the checkpoint does not hold)."""
  records = [r for r in read_metrics(path) if r["step"] <= last_step]
  atomic_write(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def _checkpoints(workdir: str) -> list[tuple[int, str]]:
  paths = glob.glob(os.path.join(workdir, "checkpoints", "ckpt_*.npz"))
  return sorted((int(os.path.basename(p)[5:-4]), p) for p in paths)


def latest_checkpoint(workdir: str) -> tuple[int, str] | None:
  """(step, path) of the newest checkpoint in `workdir`, or None."""
  found = _checkpoints(workdir)
  return found[-1] if found else None


def save_checkpoint(workdir: str, state, step: int, wall_time: float, keep: int = 2) -> None:
  """Writes the pytree `state`'s leaves to `workdir/checkpoints/ckpt_<step>.npz` (atomically),
  keeping the newest `keep` checkpoints."""
  leaves = jax.tree_util.tree_leaves(state)
  arrays = {f"leaf_{i:04d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
  arrays["step"] = np.asarray(step)
  arrays["wall_time"] = np.asarray(wall_time)
  path = os.path.join(workdir, "checkpoints", f"ckpt_{step:08d}.npz")
  atomic_write(path, arrays)
  for _, old in _checkpoints(workdir)[:-keep]:
    os.remove(old)


def restore_checkpoint(workdir: str, template):
  """(state, step, wall_time) from the latest checkpoint, or None when there is none."""
  latest = latest_checkpoint(workdir)
  if latest is None:
    return None
  leaves, treedef = jax.tree_util.tree_flatten(template)
  with np.load(latest[1]) as data:
    stored = [data[f"leaf_{i:04d}"] for i in range(len(leaves)) if f"leaf_{i:04d}" in data]
    if len(stored) != len(leaves) or any(
        a.shape != np.shape(b) for a, b in zip(stored, leaves, strict=True)):
      raise ValueError(f"checkpoint {latest[1]} does not match this run's state; use a new "
                       "--workdir or delete the checkpoint")
    step, wall_time = int(data["step"]), float(data["wall_time"])
  # Each leaf goes where the template's is (e.g. replicated on a mesh), as the step expects it.
  state = jax.tree_util.tree_unflatten(treedef, [
      jax.device_put(np.asarray(a, np.asarray(b).dtype), getattr(b, "sharding", None))
      for a, b in zip(stored, leaves, strict=True)])
  return state, step, wall_time
