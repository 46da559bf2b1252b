"""Label Solve: closed-form support labels, `python -m experiments.label_solve --dataset mnist`.

Takes class-balanced real support images (or the images of --support FILE.npz), solves for the
labels that minimise the KRR loss on the target set (by default the whole training split, streamed
in blocks), and reports the KRR test accuracy with one-hot labels and with solved labels. Writes
config.json, metrics.jsonl and distilled.npz in the workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from tqdm.auto import tqdm

from kip import cli
from kip.data import DATASETS, centered_one_hot
from kip.io import DistilledSet, atomic_write, load_distilled
from kip.kernels import ARCHITECTURES, KERNEL_TYPES, make_kernel
from kip.krr import DEFAULT_REG, evaluate_labels, label_solve
from kip.pipeline import initial_support, prepare_data, shard_kernels, write_distilled

f = cli.field


@dataclasses.dataclass(frozen=True)
class Config:
  dataset: str = f("mnist", "tfds dataset", choices=tuple(DATASETS))
  ipc: int = f(10, "support images per class (class-balanced real images)")
  support: str = f("", "solve labels for the images of this distilled .npz instead")
  kernel: str = f("fc", "architecture of the infinite-width kernel", choices=ARCHITECTURES)
  depth: int = f(1, "hidden layers of fc / conv kernels")
  kernel_type: str = f("ntk", "neural tangent or NNGP kernel", choices=KERNEL_TYPES)
  target_size: int = f(0, "class-balanced target images (0: the whole training split)")
  zca: bool = f(False, "KIP's layer norm + ZCA (reg 0.1) after standardisation")
  reg: float = f(DEFAULT_REG, "ridge, relative to the trace over n")
  seed: int = f(0, "seed of the support and target draws")
  val_size: int = f(0, "hold out this many training images and evaluate on them instead of test")
  memory_mb: float = f(0.0, "per-device memory budget for kernel tiles, in MiB (0: half of each "
                       "device's free memory; on CPU, of the available RAM)")
  distributed: bool = f(False, "multi-host: call jax.distributed.initialize() (see "
                               "experiments.kip --help); needs --workdir")
  workdir: str = f("", "run folder (default: a new folder under ./runs)")
  manual_dir: str = f("", "offline: folder with <dataset>/ raw tfds files (or $KIP_MANUAL_DIR)")
  data_dir: str = f("", "where tfds keeps prepared datasets (or $KIP_DATA_DIR)")
  progress: bool = f(True, "show a progress bar")


def solve(config: Config, workdir: str, given: DistilledSet | None = None, mesh=None,
          memory_bytes: float | None = None) -> dict[str, dict[str, float]]:
  """Label Solve as configured (for the images of `given`, if any), its kernel blocks across
  `mesh` (default: every device) within `memory_bytes` per device; returns
  {"one_hot": metrics, "label_solve": metrics}."""
  data = prepare_data(config.dataset, zca=config.zca, data_dir=config.data_dir,
                      manual_dir=config.manual_dir, val_size=config.val_size, seed=config.seed,
                      preprocessor=given.preprocessor if given else None)
  kernel = make_kernel(config.kernel, depth=config.depth, kernel_type=config.kernel_type)
  if given is not None:
    x_support = given.images
    y_one_hot = centered_one_hot(given.labels.argmax(1), data.num_classes)
  else:
    x_support, y_one_hot = initial_support(data, config.ipc, config.seed)
  x_target, y_target = data.x_train, data.y_train
  if config.target_size:
    idx = np.random.default_rng([config.seed, 1]).permutation(len(x_target))[:config.target_size]
    x_target, y_target = x_target[idx], y_target[idx]
  _, kernel_fn = shard_kernels(kernel, mesh, memory_bytes)
  with tqdm(total=len(x_target), disable=not config.progress, unit="img",
            desc="Label Solve: K(target, support)") as bar:
    y_solved = label_solve(kernel_fn, x_support, x_target, y_target, reg=config.reg,
                           progress=bar.update)
  with tqdm(total=len(data.x_test), disable=not config.progress, unit="img",
            desc="KRR evaluation: K(test, support)") as bar:
    one_hot, solved = evaluate_labels(kernel_fn, x_support, [y_one_hot, y_solved], data.x_test,
                                      data.labels_test, reg=config.reg, progress=bar.update)
  results = {"one_hot": one_hot, "label_solve": solved}
  meta = {"method": "label_solve", "dataset": config.dataset, "kernel": kernel.name, "step": 0,
          "seed": config.seed, "ipc": len(x_support) // data.num_classes,
          "config": dataclasses.asdict(config)}
  records = [{"step": 0, "labels": name, "n_target": len(x_target), **m}
             for name, m in results.items()]
  if cli.is_writer():
    write_distilled(os.path.join(workdir, "distilled.npz"), x_support, y_solved, data, meta)
    atomic_write(os.path.join(workdir, "metrics.jsonl"),
                 "".join(json.dumps(r) + "\n" for r in records).encode())
  return results


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
