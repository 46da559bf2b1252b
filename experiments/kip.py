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
from kip.cli import log_kernel_layouts
from kip.loop import LoopConfig
from kip.pipeline import distill, initial_support, krr_evaluator, make_evaluator, shard_kernels
from methods.flags import KernelConfig, PreprocessConfig, prepare_data
from methods.kip import make_kip

f = cli.field


@dataclasses.dataclass(frozen=True)
class Config(cli.DeviceConfig, cli.RunConfig, KernelConfig, PreprocessConfig, cli.DataConfig):
  ipc: int = f(10, "support images per class", minimum=1)
  steps: int = f(1000, "KIP (Adam) steps", minimum=0)
  lr: float = f(0.04, "Adam learning rate (the authors' colab: 0.04)", above=0)
  target_batch: int = f(5000, "class-balanced real target images per step", minimum=1)
  learn_labels: bool = f(True, "learn the support labels too")
  init: str = f("real", "initial support images", choices=("real", "noise"))
  eval_every: int = f(100, "steps between KRR evaluations on the full test split (0: only at "
                           "the end)", minimum=0)
  checkpoint_every: int = f(100, "steps between checkpoints (and distilled.npz updates)",
                            minimum=1)
  val_size: int = f(0, "hold out this many training images and evaluate on them instead of test",
                    minimum=0)
  float64: bool = f(False, "kernels, solves and the support set in float64 (slower)")


def run_kip(config: Config, workdir: str, mesh=None, memory_bytes: float | None = None
            ) -> dict[str, float]:
  """Runs KIP as configured in `workdir`, its kernel blocks across `mesh` (default: every
  device) within `memory_bytes` per device; returns the final test metrics."""
  with jax.enable_x64(config.float64):
    return _run(config, workdir, jnp.float64 if config.float64 else jnp.float32, mesh,
                memory_bytes)


def _run(config: Config, workdir: str, dtype, mesh, memory_bytes) -> dict[str, float]:
  data = prepare_data(config.dataset, preprocess=config.preprocessing(), data_dir=config.data_dir,
                      manual_dir=config.manual_dir, val_size=config.val_size, seed=config.seed)
  cli.log(f"{config.dataset}: {len(data.x_train)} train, {len(data.x_test)} "
          f"{'validation' if config.val_size else 'test'} images; {data.preprocessor.name}")
  kernel = config.make_kernel(data)
  x_init, y_init = initial_support(data, config.ipc, config.seed, config.init)
  step_kernel, eval_kernel = shard_kernels(kernel, mesh, memory_bytes)
  log_kernel_layouts(step_kernel, eval_kernel, len(x_init),
                     {"K(target, support)": config.target_batch,
                      "K(support, support)": len(x_init), "K(test, support)": len(data.x_test)},
                     data.x_train.shape[1:], jnp.dtype(dtype).itemsize)
  method = make_kip(step_kernel, lr=config.lr, learn_labels=config.learn_labels,
                    reg=config.reg, target_batch=config.target_batch, kernel_init=kernel.init,
                    mesh=getattr(step_kernel, "mesh", None), dtype=dtype)
  meta = {"method": "kip", "dataset": config.dataset, "kernel": kernel.name,
          "seed": config.seed, "ipc": config.ipc, "config": dataclasses.asdict(config)}
  evaluate = make_evaluator(eval_kernel, data, reg=config.reg, dtype=dtype,
                            progress=config.progress)
  cli.log(f"host memory before the first kernel: {cli.peak_rss_mib():.0f} MiB peak RSS")
  loop_config = LoopConfig(steps=config.steps, eval_every=config.eval_every,
                           eval_at_start=config.eval_every > 0,
                           checkpoint_every=config.checkpoint_every, seed=config.seed)
  result = distill(method, data, workdir=workdir, loop_config=loop_config, x_init=x_init,
                   y_init=y_init, meta=meta, log=cli.log, progress=config.progress,
                   evaluators=[krr_evaluator(evaluate, method,
                                             params=lambda state: state.kernel_params)])
  return result.evals


def main(argv=None) -> int:
  config = cli.parse_config(Config, argv, __doc__)
  mesh, memory_bytes = cli.setup_devices(config)
  workdir = cli.prepare_workdir(config, "kip", [config.dataset, config.kernel,
                                                f"ipc{config.ipc}"])
  cli.log_devices(memory_bytes, workdir)
  result = run_kip(config, workdir, mesh, memory_bytes)
  cli.log(f"peak host memory: {cli.peak_rss_mib():.0f} MiB RSS")
  cli.report(f"final KRR test accuracy: {100 * result['test_acc']:.2f}% "
             f"(test MSE {result['test_mse']:.5f}); distilled set: "
             f"{os.path.join(workdir, 'distilled.npz')}")
  return 0


if __name__ == "__main__":
  cli.run_main(main)
