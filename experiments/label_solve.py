"""Label Solve: closed-form support labels, `python -m experiments.label_solve --dataset mnist`.

Takes class-balanced real support images (or the images of --support FILE.npz), solves for the
labels that minimise the KRR loss on the target set (by default the whole training split, streamed
in blocks), and reports the KRR test accuracy with one-hot labels and with solved labels. Writes
config.json, metrics.jsonl and distilled.npz in the workdir.
"""

from __future__ import annotations

import dataclasses
import os

from kip import cli
from kip.io import DistilledSet, load_distilled
from kip.pipeline import initial_support, shard_kernels
from methods.flags import KernelConfig, PreprocessConfig, prepare_data
from methods.label_solve import solve_labels

f = cli.field


@dataclasses.dataclass(frozen=True)
class Config(cli.DeviceConfig, cli.RunConfig, KernelConfig, PreprocessConfig, cli.DataConfig):
  ipc: int = f(10, "support images per class (class-balanced real images)", minimum=1)
  support: str = f("", "solve labels for the images of this distilled .npz instead")
  target_size: int = f(0, "class-balanced target images (0: the whole training split)",
                       minimum=0)
  val_size: int = f(0, "hold out this many training images and evaluate on them instead of test",
                    minimum=0)


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
  import jax  # noqa: PLC0415

  params = kernel.init(jax.random.key(config.seed))
  meta = {"method": "label_solve", "dataset": config.dataset, "kernel": kernel.name, "step": 0,
          "seed": config.seed, "ipc": len(x_support) // data.num_classes,
          "config": dataclasses.asdict(config)}
  return solve_labels(kernel_fn, data, x_support, labels=labels, target_size=config.target_size,
                      reg=config.reg, seed=config.seed, params=params,
                      workdir=workdir if cli.is_writer() else None, meta=meta,
                      progress=config.progress)


def main(argv=None) -> int:
  config = cli.parse_config(Config, argv, __doc__)
  # Read the given set before creating the workdir, so a bad file leaves nothing behind.
  given = load_distilled(config.support, config.dataset) if config.support else None
  mesh, memory_bytes = cli.setup_devices(config)
  workdir = cli.prepare_workdir(config, "label_solve",
                                [config.dataset, config.kernel, f"ipc{config.ipc}"])
  cli.log_devices(memory_bytes, workdir)
  results = solve(config, workdir, given, mesh, memory_bytes)
  for name, m in results.items():
    cli.report(f"{name:>11}: KRR test accuracy {100 * m['test_acc']:.2f}% "
               f"(MSE {m['test_mse']:.5f})")
  cli.report(f"distilled set: {os.path.join(workdir, 'distilled.npz')}")
  return 0


if __name__ == "__main__":
  cli.run_main(main)
