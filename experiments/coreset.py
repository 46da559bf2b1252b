"""Coreset baselines as distilled sets, `python -m experiments.coreset --dataset mnist --ipc 10
--select herding`: real training images chosen per class by random sampling, herding or greedy
k-center (methods/coreset.py), saved as distilled.npz with one-hot (centred) labels and the
preprocessing, so every command (transfer, evaluate, show, benchmark) treats them like any set.
Takes seconds (herding on MNIST at 50 per class: about half a minute on 2 CPU cores).
"""

from __future__ import annotations

import dataclasses
import os

from kip import cli
from kip.data import centered_one_hot
from kip.pipeline import write_distilled
from methods.coreset import SELECTIONS, select
from methods.flags import PreprocessConfig, prepare_data

f = cli.field


@dataclasses.dataclass(frozen=True)
class Config(cli.RunConfig, PreprocessConfig, cli.DataConfig):
  ipc: int = f(10, "images per class", minimum=1)
  select: str = f("herding", "how images are chosen: random (class-balanced), herding (running "
                             "mean closest to the class mean) or kcenter (greedy k-center), in "
                             "the preprocessed pixel space", choices=SELECTIONS)


def main(argv=None) -> int:
  config = cli.parse_config(Config, argv, __doc__)
  workdir = cli.prepare_workdir(config, "coreset", [config.select, config.dataset,
                                                    f"ipc{config.ipc}"])
  data = prepare_data(config.dataset, preprocess=config.preprocessing(),
                      data_dir=config.data_dir, manual_dir=config.manual_dir)
  try:
    idx = select(config.select, data.x_train, data.labels_train, config.ipc, config.seed,
                 data.num_classes)
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  meta = {"method": f"coreset-{config.select}", "dataset": config.dataset, "step": 0,
          "seed": config.seed, "ipc": config.ipc, "config": dataclasses.asdict(config)}
  path = os.path.join(workdir, "distilled.npz")
  write_distilled(path, {"images": data.x_train[idx],
                         "labels": centered_one_hot(data.labels_train[idx], data.num_classes)},
                  data, meta)
  cli.report(f"{config.select}: {len(idx)} training images ({config.ipc} per class) -> {path}")
  return 0


if __name__ == "__main__":
  cli.run_main(main)
