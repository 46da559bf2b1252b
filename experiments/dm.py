"""Distil a dataset with DM: `python -m experiments.dm --dataset mnist --ipc 10`.

Distribution matching (Zhao & Bilen, WACV 2023; see methods/dm.py): DataDAM's command
(experiments/datadam.py) with the embedding term alone and instance norm. Presets: `cpu` (default:
ConvNet-3 width 32, 64 real images per class, 1,000 steps) and `paper` (the official code: width
128, 256 real per class, 20,000 steps, images by SGD lr 1, momentum 0.5). The loop trains a
`dc`-protocol ConvNet-3 on the set every `--eval-every` steps; the full evaluation is
`python -m experiments.transfer --support WORKDIR/distilled.npz --protocol dc`.
"""

from __future__ import annotations

import dataclasses

from experiments.datadam import MatchConfig, report, run_matching
from kip import cli
from kip.nets import NORMS

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


def main(argv=None) -> int:
  config = cli.parse_config(Config, argv, __doc__, presets=PRESETS)
  workdir = cli.prepare_workdir(config, "dm", [config.dataset, f"ipc{config.ipc}"])
  cli.log(f"devices: {cli.describe_devices()}; preset {config.preset}; workdir: {workdir}")
  report(run_matching(config, workdir, "dm", attention_weight=0.0, embedding_weight=1.0), workdir)
  return 0


if __name__ == "__main__":
  cli.run_main(main)
