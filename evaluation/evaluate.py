"""KRR test accuracy of any distilled set (`experiments.evaluate`'s job): the set read in any
format kip/readers.py knows, the test split given the preprocessing the set was made with, the
kernel the set was distilled with unless told another (`resolve_kernel`).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp

from kip import cli
from kip.command import Job
from kip.io import DistilledSet
from kip.pipeline import make_evaluator, shard_kernels
from methods.flags import KERNELS, KernelConfig, SetPreprocessConfig, data_for_set

__all__ = ["Config", "JOB", "evaluate_file", "resolve_kernel"]

f = cli.field
_KERNEL_FIELDS = ("kernel", "depth", "kernel_type", "kernel_width")


@dataclasses.dataclass(frozen=True)
class Config(cli.DeviceConfig, KernelConfig, SetPreprocessConfig, cli.DataConfig):
  support: str = f("", "the distilled set in any format kip.io reads: ours, KIP/LS, "
                       "RFAD best.npz, FRePo dumps, DC/DSA/DM res_*.pt, MTT/DATM/PAD "
                       "images_best.pt, DC-Bench pairs")
  kernel: str = f("auto", "kernel (auto: the one the set was distilled with, as its file "
                          "records it, else fc); see experiments.kip --help",
                  choices=("auto", *KERNELS))
  float64: bool = f(False, "kernels and the solve in float64 (slower)")
  seed: int = f(0, "seed of a finite kernel's (nfk-/entk-) random initialisation", minimum=0,
                maximum=cli.SEED_MAXIMUM)
  json_out: bool = f(False, "print the result as one JSON line")


def resolve_kernel(config: Config, distilled: DistilledSet) -> tuple[Config, str]:
  """The config with the kernel the set was distilled with when `--kernel auto` (a note when the
  file records none or the user's choice differs from it)."""
  recorded = distilled.meta.get("config") or {}
  recorded = {k: recorded[k] for k in _KERNEL_FIELDS if k in recorded}
  if recorded.get("kernel") not in KERNELS:
    recorded = {}
  if config.kernel == "auto":
    own = distilled.meta.get("kernel")
    if not recorded and own and own not in KERNELS:
      # FRePo, RFAD and KRR-ST score their sets with the features of their own trained or
      # random networks, which the file does not hold.
      method = distilled.meta.get("method", "its method")
      return dataclasses.replace(config, kernel="fc"), (
          f"the set was scored during distillation with {method}'s own kernel ({own}), built "
          f"from networks the file does not hold: evaluating with fc, so this accuracy is not "
          f"the one {method} reported")
    if not recorded:
      return dataclasses.replace(config, kernel="fc"), "the file records no kernel: using fc"
    return dataclasses.replace(config, **recorded), f"kernel {recorded['kernel']} (from the file)"
  if recorded and recorded["kernel"] != config.kernel:
    return config, (f"note: the set was distilled with the {recorded['kernel']} kernel, "
                    f"evaluating with {config.kernel} as asked")
  return config, ""


def evaluate_file(config: Config, mesh=None, memory_bytes: float | None = None
                  ) -> dict[str, float]:
  """KRR test metrics of `config.support`, the test kernel across `mesh` (default: every
  device) within `memory_bytes` per device."""
  if not config.support:
    raise cli.UserError("--support FILE.npz is required")
  distilled = config.load(config.support, config.dataset)
  if distilled.labels is None:
    raise cli.UserError(f"{config.support} holds regression targets, not class labels: KRR "
                        "classification needs labels")
  config, note = resolve_kernel(config, distilled)
  if note:
    cli.log(note)
  data = data_for_set(distilled, config.dataset, preprocess=config.preprocessing(),
                      data_dir=config.data_dir, manual_dir=config.manual_dir)
  preprocessor = data.preprocessor
  kernel = config.make_kernel(data)
  with jax.enable_x64(config.float64):
    _, kernel_fn = shard_kernels(kernel, mesh, memory_bytes)
    evaluator = make_evaluator(kernel_fn, data, reg=config.reg,
                               dtype=jnp.float64 if config.float64 else jnp.float32)
    result = evaluator(distilled.images, distilled.labels,
                       kernel.init(jax.random.key(config.seed)))
  return result | {"n_support": len(distilled.images), "preprocessing": preprocessor.name,
                   "kernel": kernel.name}


def run(config: Config, workdir: str, devices) -> list[str]:
  result = evaluate_file(config, devices.mesh, devices.memory_bytes)
  if config.json_out:
    return [json.dumps(result)]
  return [f"{config.support}: {result['n_support']} images, {result['kernel']} kernel, "
          f"{result['preprocessing']}: KRR test accuracy {100 * result['test_acc']:.2f}% "
          f"(MSE {result['test_mse']:.5f})"]


JOB = Job("evaluate", Config, run, workdir=False)
