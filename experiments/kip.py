"""Distil a dataset with KIP: `python -m experiments.kip --dataset mnist`.

Writes config.json, metrics.jsonl, distilled.npz and checkpoints/ in the workdir and prints the
final KRR test accuracy. Re-running the same command with the same --workdir resumes.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from kip import cli
from kip.data import DATASETS
from kip.kernels import ARCHITECTURES, KERNEL_TYPES, make_kernel
from kip.kip import make_kip
from kip.krr import DEFAULT_REG
from kip.loop import LoopConfig, run
from kip.pipeline import (
  initial_support,
  make_evaluator,
  prepare_data,
  shard_kernels,
  write_distilled,
)

f = cli.field


@dataclasses.dataclass(frozen=True)
class Config:
  dataset: str = f("mnist", "tfds dataset to distil", choices=tuple(DATASETS))
  ipc: int = f(10, "support images per class")
  kernel: str = f("fc", "architecture of the infinite-width kernel", choices=ARCHITECTURES)
  depth: int = f(1, "hidden layers of fc / conv kernels")
  kernel_type: str = f("ntk", "neural tangent or NNGP kernel", choices=KERNEL_TYPES)
  steps: int = f(1000, "KIP (Adam) steps")
  lr: float = f(0.04, "Adam learning rate (the authors' colab: 0.04)")
  target_batch: int = f(5000, "class-balanced real target images per step")
  learn_labels: bool = f(True, "learn the support labels too")
  init: str = f("real", "initial support images", choices=("real", "noise"))
  zca: bool = f(False, "KIP's layer norm + ZCA (reg 0.1) after standardisation")
  reg: float = f(DEFAULT_REG, "KRR ridge, relative to tr(K_ss)/n_s")
  seed: int = f(0, "seed of the support init, target batches and everything random")
  eval_every: int = f(100, "steps between KRR evaluations on the full test split")
  checkpoint_every: int = f(100, "steps between checkpoints (and distilled.npz updates)")
  val_size: int = f(0, "hold out this many training images and evaluate on them instead of test")
  memory_mb: float = f(0.0, "per-device memory budget for kernel tiles, in MiB (0: half of each "
                       "device's free memory; on CPU, of the available RAM)")
  float64: bool = f(False, "kernels, solves and the support set in float64 (slower)")
  distributed: bool = f(False, "multi-host: call jax.distributed.initialize() (SLURM, Open MPI, "
                               "TPU pods, or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/"
                               "JAX_PROCESS_ID); needs --workdir")
  workdir: str = f("", "run folder (default: a new folder under ./runs); re-use it to resume")
  manual_dir: str = f("", "offline: folder with <dataset>/ raw tfds files (or $KIP_MANUAL_DIR)")
  data_dir: str = f("", "where tfds keeps prepared datasets (or $KIP_DATA_DIR)")
  progress: bool = f(True, "show a progress bar")


def distill(config: Config, workdir: str, mesh=None, memory_bytes: float | None = None
            ) -> dict[str, float]:
  """Runs KIP as configured in `workdir`, its kernel blocks across `mesh` (default: every
  device) within `memory_bytes` per device; returns the final test metrics."""
  with jax.enable_x64(config.float64):
    return _distill(config, workdir, jnp.float64 if config.float64 else jnp.float32, mesh,
                    memory_bytes)


def _distill(config: Config, workdir: str, dtype, mesh, memory_bytes) -> dict[str, float]:
  data = prepare_data(config.dataset, zca=config.zca, data_dir=config.data_dir,
                      manual_dir=config.manual_dir, val_size=config.val_size, seed=config.seed)
  cli.log(f"{config.dataset}: {len(data.x_train)} train, {len(data.x_test)} "
          f"{'validation' if config.val_size else 'test'} images; {data.preprocessor.name}")
  kernel = make_kernel(config.kernel, depth=config.depth, kernel_type=config.kernel_type)
  x_init, y_init = initial_support(data, config.ipc, config.seed, config.init)
  step_kernel, eval_kernel = shard_kernels(kernel, mesh, memory_bytes)
  image_shape = data.x_train.shape[1:]
  n_support = len(x_init)
  for what, fn, n_rows in (("K(target, support)", step_kernel, config.target_batch),
                           ("K(support, support)", step_kernel, n_support),
                           ("K(test, support)", eval_kernel, len(data.x_test))):
    layout = fn.layout(n_rows, n_support, image_shape, jnp.dtype(dtype).itemsize)
    cli.log(f"{what}: {n_rows} x {n_support} in tiles of {layout.tiles.rows} x "
            f"{layout.tiles.cols}, {layout.rows_per_device} rows per device"
            + (", recomputed in the backward pass" if layout.remat else ""))
  method = make_kip(step_kernel, lr=config.lr, learn_labels=config.learn_labels,
                    reg=config.reg, dtype=dtype)
  meta = {"method": "kip", "dataset": config.dataset, "kernel": kernel.name,
          "seed": config.seed, "ipc": config.ipc, "config": dataclasses.asdict(config)}

  def save(x, y, step):
    write_distilled(os.path.join(workdir, "distilled.npz"), x, y, data, meta | {"step": step})

  cli.log(f"host memory before the first kernel: {cli.peak_rss_mib():.0f} MiB peak RSS")
  loop_config = LoopConfig(steps=config.steps, target_batch=config.target_batch,
                           eval_every=config.eval_every,
                           checkpoint_every=config.checkpoint_every, seed=config.seed)
  return run(method, workdir=workdir, config=loop_config, x_train=data.x_train,
             y_train=data.y_train, labels_train=data.labels_train, x_init=x_init, y_init=y_init,
             evaluate=make_evaluator(eval_kernel, data, reg=config.reg, dtype=dtype,
                                     progress=config.progress),
             save_support=save, log=cli.log, progress=config.progress)


def main(argv=None) -> int:
  config = cli.parse_config(Config, argv, __doc__)
  if config.ipc < 1 or config.steps < 0 or config.target_batch < 1:
    raise cli.UserError("--ipc and --target-batch must be positive and --steps non-negative")
  mesh, memory_bytes = cli.setup_devices(config)
  workdir = cli.prepare_workdir(config, "kip", [config.dataset, config.kernel,
                                                f"ipc{config.ipc}"])
  cli.log_devices(memory_bytes, workdir)
  result = distill(config, workdir, mesh, memory_bytes)
  cli.log(f"peak host memory: {cli.peak_rss_mib():.0f} MiB RSS")
  cli.report(f"final KRR test accuracy: {100 * result['test_acc']:.2f}% "
             f"(test MSE {result['test_mse']:.5f}); distilled set: "
             f"{os.path.join(workdir, 'distilled.npz')}")
  return 0


if __name__ == "__main__":
  cli.run_main(main)
