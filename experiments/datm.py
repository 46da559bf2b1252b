"""Distil a dataset with DATM: `python -m experiments.datm --dataset mnist --ipc 10`.

Difficulty-aligned trajectory matching (Guo et al., ICLR 2024; methods/datm.py): MTT
(experiments/mtt.py, whose flags these are) with initial images that an expert classifies
correctly, soft labels initialised to its logits and learned (`--lr-y`), a start-epoch window
widening from `--max-start-epoch` to `--max-start-epoch-final` over the run, and updates skipped
when the matching loss exceeds `--threshold`. The initial images are chosen by the first expert
after `--max-start-epoch` epochs. The set is saved with its soft labels (probabilities, and the
logits as `label_logits`) and learned learning rate; `experiments.transfer` trains on them with
the soft cross-entropy at that rate. Experts: `python -m experiments.buffer --dataset mnist`.

Presets (our MNIST settings; DATM has none for MNIST):
- `cpu` (default): MTT's cpu settings with the window growing from 2 to 5 on the cpu buffer;
- `paper`: the official CIFAR-10 ipc-10 configuration (80 student steps, expert epochs 2, window
  10 -> 20, images lr 100, soft labels lr 2, threshold 1, 5,000 iterations) on the paper buffer.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from experiments.mtt import TrajectoryConfig, report, run_trajectory, store_path
from kip import cli
from methods.datm import correctly_classified, make_datm

f = cli.field

PRESETS = {
    "cpu": {"steps": 300, "syn_steps": 10, "expert_epochs": 2, "max_start_epoch": 2,
            "max_start_epoch_final": 5, "lr_img": 100.0},
    "paper": {"steps": 5000, "syn_steps": 80, "expert_epochs": 2, "max_start_epoch": 10,
              "max_start_epoch_final": 20, "lr_img": 100.0, "lr_y": 2.0, "eval_every": 500,
              "checkpoint_every": 100},
}


@dataclasses.dataclass(frozen=True)
class DatmConfig(TrajectoryConfig):
  """DATM's flags beyond MTT's (PAD shares them)."""

  max_start_epoch: int = f(2, "start epochs are drawn below this at the first iteration",
                           minimum=1)
  max_start_epoch_final: int = f(5, "... growing linearly to below this at the last", minimum=1)
  lr_y: float = f(2.0, "SGD learning rate of the soft labels (momentum 0.9; 0: fixed)",
                  minimum=0)
  threshold: float = f(1.0, "skip an update whose matching loss exceeds this (0: never)",
                       minimum=0)


@dataclasses.dataclass(frozen=True)
class Config(DatmConfig):
  pass


def expert_support(config: DatmConfig):
  """`init_support` for `run_trajectory`: ipc images per class the first expert (after
  --max-start-epoch epochs) classifies correctly, and its logits on them as the soft labels."""

  def init(data, model, template, store, experts):
    _, unravel = ravel_pytree(template)
    params = unravel(jnp.asarray(store.trajectory(experts[0])[config.max_start_epoch]))
    idx, logits = correctly_classified(model, params, data.x_train, data.labels_train,
                                       config.ipc, data.num_classes, config.seed)
    hits = float(np.mean(logits.argmax(-1) == data.labels_train[idx]))
    cli.log(f"initial images: {len(idx)} the expert classifies correctly ({100 * hits:.0f}%); "
            f"soft labels from its logits")
    return data.x_train[idx], np.asarray(jax.device_get(logits), np.float32)

  return init


def run_datm(config: DatmConfig, workdir: str, name: str, make_method=make_datm,
             buffer_flags: dict | None = None, **kwargs) -> dict:
  """Runs DATM (or `make_method`, e.g. PAD's, with `kwargs`) as configured in `workdir`."""
  return run_trajectory(config, workdir, name, make_method, init_support=expert_support(config),
                        buffer_flags=buffer_flags,
                        max_start_epoch_final=config.max_start_epoch_final, steps=config.steps,
                        lr_y=config.lr_y, threshold=config.threshold, **kwargs)


def main(argv=None) -> int:
  config = cli.parse_config(Config, argv, __doc__, presets=PRESETS)
  workdir = cli.prepare_workdir(config, "datm", [config.dataset, f"ipc{config.ipc}"],
                                inputs={"buffer": os.path.join(store_path(config), "store.json")})
  cli.log(f"devices: {cli.describe_devices()}; preset {config.preset}; workdir: {workdir}")
  report(run_datm(config, workdir, "datm"), workdir)
  return 0


if __name__ == "__main__":
  cli.run_main(main)
