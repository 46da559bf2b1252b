"""Label Solve (Nguyen et al., ICLR 2021): the support labels that minimise the KRR loss on a
target set, in closed form.

`label_solve(kernel_fn, x_support, x_target, y_target)` is the algorithm (the target kernel
streamed in blocks across devices); `solve_labels(...)` is the job `experiments.label_solve`
runs: one-hot and solved labels of the same support images, evaluated on the test split in one
pass, and the set written with its preprocessing. `Config`, `solve` and `JOB` are that command's
flags, its run from them, and its description.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from kip import cli
from kip.command import Devices, Job
from kip.data import centered_one_hot
from kip.io import DistilledSet, atomic_write, load_distilled
from kip.krr import DEFAULT_REG, add_ridge_host, evaluate_labels, ridge_solve_host
from kip.pipeline import Data, initial_support, shard_kernels, write_distilled
from kip.sharding import rows_per_call, stream_rows, with_params
from methods.flags import KernelConfig, PreprocessConfig, prepare_data

__all__ = ["label_solve", "solve_labels", "Config", "solve", "run", "JOB"]


def label_solve(kernel_fn: Callable, x_support: jax.Array, x_target: np.ndarray,
                y_target: np.ndarray, *, reg: float = DEFAULT_REG, block_rows: int | None = None,
                progress: Callable | None = None, params=None) -> np.ndarray:
  """Label Solve: the support labels that minimise the KRR loss on the target set, in closed form.

  With K_st = K(x_s, x_t), the loss ||K_ts (K_ss + ridge)^-1 y_s - y_t||^2 is least squares in
  z = (K_ss + ridge)^-1 y_s, so z = (K_st K_ts + ridge)^-1 K_st y_t and y_s = (K_ss + ridge) z.
  K_ts is streamed in blocks (across the devices of a `kip.sharding.shard_kernel`) and only
  K_st K_ts (n_s x n_s) and K_st y_t (n_s x C) are kept, accumulated in float64 on the host, so
  the target set can be the whole training split.

  Args:
    x_support: (n_s, H, W, C) float32; x_target: (n_t, H, W, C) float32 with n_t >= n_s;
    y_target: (n_t, C) float32 targets (centred one-hot).
    block_rows: target rows per kernel call (default `kip.sharding.rows_per_call`).

  Returns:
    (n_s, C) float32 labels.
  """
  n_s, n_t = len(x_support), len(x_target)
  if n_t < n_s:
    raise ValueError(
        f"Label Solve needs at least as many targets as support images ({n_t} < {n_s})")
  x_support = jnp.asarray(x_support)
  if block_rows is None:
    block_rows = rows_per_call(kernel_fn, n_t, n_s, x_target.shape[1:])
  gram = np.zeros((n_s, n_s))
  rhs = np.zeros((n_s, y_target.shape[1]))
  for start, k_ts in stream_rows(kernel_fn, x_target, x_support, block_rows, params):
    k_ts = k_ts.astype(np.float64)
    gram += k_ts.T @ k_ts
    rhs += k_ts.T @ np.asarray(y_target[start:start + len(k_ts)], np.float64)
    if progress is not None:
      progress(len(k_ts))
  with jax.default_matmul_precision("highest"):
    k_ss = np.asarray(with_params(kernel_fn, params)(x_support, x_support), np.float64)
  z = ridge_solve_host(gram, rhs, reg)
  return (add_ridge_host(k_ss, reg) @ z).astype(np.float32)


def solve_labels(kernel_fn: Callable, data: Data, x_support: np.ndarray, *, labels: np.ndarray,
                 target_size: int = 0, reg: float = DEFAULT_REG, seed: int = 0, params=None,
                 workdir: str | None = None, meta: dict | None = None,
                 progress: bool = True) -> dict[str, dict[str, float]]:
  """Label Solve for the (n_s, H, W, C) `x_support` of classes `labels` (n_s,) int against the
  training split (or `target_size` random images of it); returns {"one_hot": metrics,
  "label_solve": metrics} of KRR on the test split, and with `workdir` writes `distilled.npz`
  (solved labels) and `metrics.jsonl` there."""
  y_one_hot = centered_one_hot(labels, data.num_classes)
  x_target, y_target = data.x_train, data.y_train
  if target_size:
    idx = np.random.default_rng([seed, 1]).permutation(len(x_target))[:target_size]
    x_target, y_target = x_target[idx], y_target[idx]
  with tqdm(total=len(x_target), disable=not progress, unit="img",
            desc="Label Solve: K(target, support)") as bar:
    y_solved = label_solve(kernel_fn, x_support, x_target, y_target, reg=reg,
                           progress=bar.update, params=params)
  with tqdm(total=len(data.x_test), disable=not progress, unit="img",
            desc="KRR evaluation: K(test, support)") as bar:
    one_hot, solved = evaluate_labels(kernel_fn, x_support, [y_one_hot, y_solved], data.x_test,
                                      data.labels_test, reg=reg, progress=bar.update,
                                      params=params)
  results = {"one_hot": one_hot, "label_solve": solved}
  if workdir is not None:
    records = [{"step": 0, "labels": name, "n_target": len(x_target), **m}
               for name, m in results.items()]
    write_distilled(os.path.join(workdir, "distilled.npz"),
                    {"images": x_support, "labels": y_solved}, data, meta or {})
    atomic_write(os.path.join(workdir, "metrics.jsonl"),
                 "".join(json.dumps(r) + "\n" for r in records).encode())
  return results


@dataclasses.dataclass(frozen=True)
class Config(cli.DeviceConfig, cli.RunConfig, KernelConfig, PreprocessConfig, cli.DataConfig):
  ipc: int = cli.field(10, "support images per class (class-balanced real images)", minimum=1)
  support: str = cli.field("", "solve labels for the images of this distilled .npz instead")
  target_size: int = cli.field(0, "class-balanced target images (0: the whole training split)",
                               minimum=0)
  val_size: int = cli.field(0, "hold out this many training images and evaluate on them "
                               "instead of test", minimum=0)


def solve(config: Config, workdir: str, given: DistilledSet | None = None, mesh=None,
          memory_bytes: float | None = None) -> dict[str, dict[str, float]]:
  """Label Solve as configured (for the images of `given`, if any), its kernel blocks across
  `mesh` (default: every device) within `memory_bytes` per device; returns
  {"one_hot": metrics, "label_solve": metrics}."""
  data = prepare_data(config.dataset, preprocess=config.preprocessing(), data_dir=config.data_dir,
                      manual_dir=config.manual_dir, val_size=config.val_size, seed=config.seed,
                      preprocessor=given.preprocessor if given else None)
  kernel = config.make_kernel(data)
  if given is not None:
    if given.labels is None:
      raise cli.UserError(f"{config.support} holds regression targets, not class labels")
    x_support, labels = given.images, given.labels.argmax(1)
  else:
    x_support, y_one_hot = initial_support(data, config.ipc, config.seed)
    labels = y_one_hot.argmax(1)
  _, kernel_fn = shard_kernels(kernel, mesh, memory_bytes)
  params = kernel.init(jax.random.key(config.seed))
  meta = {"method": "label_solve", "dataset": config.dataset, "kernel": kernel.name, "step": 0,
          "seed": config.seed, "ipc": len(x_support) // data.num_classes,
          "config": dataclasses.asdict(config)}
  return solve_labels(kernel_fn, data, x_support, labels=labels, target_size=config.target_size,
                      reg=config.reg, seed=config.seed, params=params,
                      workdir=workdir if cli.is_writer() else None, meta=meta,
                      progress=config.progress)


def _given(config: Config) -> DistilledSet | None:
  """The set of `--support`, if given (a missing or malformed file: one line)."""
  return load_distilled(config.support, config.dataset) if config.support else None


def run(config: Config, workdir: str, devices: Devices) -> list[str]:
  """`experiments.label_solve`'s job in `workdir` on `devices`: the KRR test accuracy with
  one-hot and with solved labels."""
  results = solve(config, workdir, _given(config), devices.mesh, devices.memory_bytes)
  return [*(f"{name:>11}: KRR test accuracy {100 * m['test_acc']:.2f}% (MSE {m['test_mse']:.5f})"
            for name, m in results.items()),
          f"distilled set: {os.path.join(workdir, 'distilled.npz')}"]


# The given set is read before the workdir is made (`check`), so a bad file leaves nothing
# behind, and again in `run`.
JOB = Job("label_solve", Config, run, folder=lambda c: [c.dataset, c.kernel, f"ipc{c.ipc}"],
          check=_given)
