"""Distil a dataset with PAD: `python -m experiments.pad --dataset mnist --ipc 10`.

Prioritising alignment (Li et al., 2024; methods/pad.py): DATM (experiments/datm.py, whose flags
these are) on experts trained with PAD's difficulty curriculum, with the shallowest `--ratio` of
the parameters left out of the matching loss (the paper; -1: by images per class as the paper's
settings, 0 at 1, 0.5 at 10, 0.25 at 50 and above). `--mask smallest_error` is the current
official code's variant instead: leave out that fraction of the parameters the student matches
best at each update. Experts: `python -m experiments.buffer --dataset mnist --curriculum pad`
(found where that command puts them, a store of PAD's experts by its settings' digest; `--buffer
DIR` may name any store, plain experts included). Presets: DATM's.
"""

from __future__ import annotations

import dataclasses
import os

from experiments.datm import PRESETS, DatmConfig, report, run_datm
from experiments.mtt import store_path
from kip import cli
from methods.pad import MASKS, make_pad

f = cli.field
RATIO_BY_IPC = ((1, 0.0), (10, 0.5), (50, 0.25))  # the paper's settings, CIFAR-10


@dataclasses.dataclass(frozen=True)
class Config(DatmConfig):
  ratio: float = f(-1.0, "fraction of the parameters left out of the loss (-1: by ipc, 0 at 1, "
                         "0.5 at 10, 0.25 at 50+)")
  mask: str = f("shallow", "which: shallow (the paper's, shallowest layers first) or "
                           "smallest_error (the official code's, best-matched at each update)",
                choices=MASKS)

  def __post_init__(self):
    super().__post_init__()
    if not (self.ratio == -1 or 0 <= self.ratio < 1):
      raise cli.UserError(f"--ratio must be in [0, 1) or -1, got {self.ratio}")

  def mask_ratio(self) -> float:
    if self.ratio >= 0:
      return self.ratio
    return [r for ipc, r in RATIO_BY_IPC if self.ipc >= ipc][-1]


PAD_BUFFER = {"curriculum": "pad"}


def main(argv=None) -> int:
  config = cli.parse_config(Config, argv, __doc__, presets=PRESETS)
  path = store_path(config, **PAD_BUFFER)
  workdir = cli.prepare_workdir(config, "pad", [config.dataset, f"ipc{config.ipc}"],
                                inputs={"buffer": os.path.join(path, "store.json")})
  cli.log(f"devices: {cli.describe_devices()}; preset {config.preset}; workdir: {workdir}; "
          f"{config.mask} mask, ratio {config.mask_ratio()}")
  report(run_datm(config, workdir, "pad", make_pad, buffer_flags=PAD_BUFFER,
                  ratio=config.mask_ratio(), mask=config.mask), workdir)
  return 0


if __name__ == "__main__":
  cli.run_main(main)
