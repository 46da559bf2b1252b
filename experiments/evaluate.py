"""KRR test accuracy of any distilled set, ours or released:
`python -m experiments.evaluate --support FILE.npz --dataset mnist --kernel fc`.

The test split gets the preprocessing the set was made with: the one stored in our files, or for
a released set the one its name says (`zca`: standardisation + KIP's layer norm + ZCA fitted on
the real training split; `nozca`: standardisation with training statistics).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp

from kip import cli
from kip.data import DATASETS
from kip.io import load_distilled
from kip.kernels import ARCHITECTURES, KERNEL_TYPES, make_kernel
from kip.krr import DEFAULT_REG
from kip.pipeline import data_for_set, make_evaluator, shard_kernels

f = cli.field


@dataclasses.dataclass(frozen=True)
class Config:
  support: str = f("", "the distilled set (.npz with `images` NHWC and `labels`)")
  dataset: str = f("mnist", "tfds dataset whose test split is used", choices=tuple(DATASETS))
  kernel: str = f("fc", "architecture of the infinite-width kernel", choices=ARCHITECTURES)
  depth: int = f(1, "hidden layers of fc / conv kernels")
  kernel_type: str = f("ntk", "neural tangent or NNGP kernel", choices=KERNEL_TYPES)
  zca: str = f("auto", "treat the set as ZCA-space (auto: from its metadata or file name)",
               choices=("auto", "yes", "no"))
  reg: float = f(DEFAULT_REG, "KRR ridge, relative to tr(K_ss)/n_s")
  memory_mb: float = f(0.0, "per-device memory budget for kernel tiles, in MiB (0: half of each "
                       "device's free memory; on CPU, of the available RAM)")
  distributed: bool = f(False, "multi-host: call jax.distributed.initialize() (see "
                               "experiments.kip --help)")
  float64: bool = f(False, "kernels and the solve in float64 (slower)")
  manual_dir: str = f("", "offline: folder with <dataset>/ raw tfds files (or $KIP_MANUAL_DIR)")
  data_dir: str = f("", "where tfds keeps prepared datasets (or $KIP_DATA_DIR)")
  json_out: bool = f(False, "print the result as one JSON line")


def evaluate_file(config: Config, mesh=None, memory_bytes: float | None = None
                  ) -> dict[str, float]:
  """KRR test metrics of `config.support`, the test kernel across `mesh` (default: every
  device) within `memory_bytes` per device."""
  if not config.support:
    raise cli.UserError("--support FILE.npz is required")
  distilled = load_distilled(config.support, config.dataset)
  zca = {"yes": True, "no": False}.get(config.zca)
  data = data_for_set(distilled, config.dataset, zca=zca, data_dir=config.data_dir,
                      manual_dir=config.manual_dir)
  preprocessor = data.preprocessor
  kernel = make_kernel(config.kernel, depth=config.depth, kernel_type=config.kernel_type)
  with jax.enable_x64(config.float64):
    _, kernel_fn = shard_kernels(kernel, mesh, memory_bytes)
    evaluator = make_evaluator(kernel_fn, data, reg=config.reg,
                               dtype=jnp.float64 if config.float64 else jnp.float32)
    result = evaluator(distilled.images, distilled.labels)
  return result | {"n_support": len(distilled.images), "preprocessing": preprocessor.name,
                   "kernel": kernel.name}


def main(argv=None) -> int:
  config = cli.parse_config(Config, argv, __doc__)
  mesh, memory_bytes = cli.setup_devices(config)
  result = evaluate_file(config, mesh, memory_bytes)
  if config.json_out:
    cli.report(json.dumps(result))
  else:
    cli.report(f"{config.support}: {result['n_support']} images, {result['kernel']} kernel, "
               f"{result['preprocessing']}: KRR test accuracy {100 * result['test_acc']:.2f}% "
               f"(MSE {result['test_mse']:.5f})")
  return 0


if __name__ == "__main__":
  cli.run_main(main)
