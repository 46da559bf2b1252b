"""DM, distribution matching (Zhao & Bilen, WACV 2023): DataDAM's embedding term alone.

Each step a fresh ConvNet-3 (instance norm, frozen); per class, the squared distance between the
mean embedding of a real batch and of the class's synthetic images after the same DSA draw, summed
over classes; images by SGD (lr 1, momentum 0.5). No attention term: `make_matching` with
`attention_weight=0` (methods/datadam.py).

The command (`experiments.dm`) is `JOB`: DataDAM's flags (`methods.datadam.MatchConfig`) with DM's
defaults and presets, run by `methods.datadam.run_matching` with `make_dm`.
"""

from __future__ import annotations

import dataclasses

from kip import cli
from kip.command import Job
from kip.method import Method
from kip.nets import NORMS
from methods.datadam import MatchConfig, make_matching, report, run_matching

__all__ = ["make_dm", "Config", "PRESETS", "run", "JOB"]


def make_dm(*, num_classes: int, image_shape: tuple[int, int, int], norm: str = "instance",
            real_per_class: int = 256, **kwargs) -> Method:
  """DM as a `kip.method.Method`; other arguments: `methods.datadam.make_matching`'s."""
  return make_matching(num_classes=num_classes, image_shape=image_shape, norm=norm,
                       attention_weight=0.0, embedding_weight=1.0,
                       real_per_class=real_per_class, **kwargs)


f = cli.field

PRESETS = {
    "cpu": {"width": 32, "real_per_class": 64, "steps": 1000, "eval_width": 32},
    "paper": {"width": 128, "real_per_class": 256, "steps": 20_000, "eval_every": 2000,
              "checkpoint_every": 500},
}


@dataclasses.dataclass(frozen=True)
class Config(MatchConfig):
  preset: str = f("cpu", "sizes: cpu (fits a 2-core CPU) or paper (the official code's)",
                  choices=tuple(PRESETS))
  norm: str = f("instance", "the drawn ConvNet's normalisation (DM: instance)", choices=NORMS)
  real_per_class: int = f(64, "real images per class per step", minimum=1)


def run(config: Config, workdir: str, devices) -> list[str]:
  """`experiments.dm`: the matching run with `make_dm` (the embedding term alone)."""
  del devices
  return [report(run_matching(config, workdir, "dm", make=make_dm), workdir)]


JOB = Job("dm", Config, run, presets=PRESETS, folder=lambda c: [c.dataset, f"ipc{c.ipc}"])
