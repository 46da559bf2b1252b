"""PAD, prioritising alignment in dataset distillation (Li et al., 2024): DATM on experts that saw
their data in order of difficulty, matching only the deeper parameters.

- Experts: `experiments.buffer --curriculum pad` (methods/trajectory.py: EL2N-sorted data, the
  easiest first, growing to all, then the easiest dropped late).
- The matching loss leaves out the shallowest `ratio` of the parameters (`depth_mask`), as the
  paper describes: shallow layers carry low-level features that the set gains little from
  matching. The official code has since switched to leaving out the parameters with the smallest
  matching error at each update (`drop_smallest`); `mask="smallest_error"` keeps that behaviour.

Everything else (soft labels, widening window, loss threshold) is DATM's (methods/datm.py). The
command (`experiments.pad`) is `JOB`: DATM's flags, presets and run (`run_datm`) with PAD's mask
(`Config`), its experts (`PAD_BUFFER`) and `make_pad`.
"""

from __future__ import annotations

import dataclasses
import os

from kip import cli
from kip.command import Job
from kip.method import Method
from methods.datm import PRESETS, DatmConfig, make_datm, run_datm
from methods.mtt import report, store_path
from methods.trajectory import ExpertStore, depth_mask

__all__ = ["make_pad", "MASKS", "RATIO_BY_IPC", "Config", "PAD_BUFFER", "run", "JOB"]

MASKS = ("shallow", "smallest_error")


def make_pad(model, params_template, store: ExpertStore, *, ratio: float,
             mask: str = "shallow", **kwargs) -> Method:
  """PAD as a `kip.method.Method`: DATM (`make_datm`'s arguments) with `ratio` of the parameters
  left out of the loss, the shallowest (`mask="shallow"`, the paper) or the best-matched at each
  update (`"smallest_error"`, the current official code)."""
  if mask not in MASKS:
    raise ValueError(f"unknown PAD mask {mask!r}; choose one of {', '.join(MASKS)}")
  if mask == "shallow":
    return make_datm(model, params_template, store,
                     param_mask=depth_mask(params_template, ratio) if ratio else None, **kwargs)
  return make_datm(model, params_template, store, drop_smallest=ratio, **kwargs)


f = cli.field
RATIO_BY_IPC = ((1, 0.0), (10, 0.5), (50, 0.25))  # the paper's settings, CIFAR-10


@dataclasses.dataclass(frozen=True)
class Config(DatmConfig):
  ratio: float = f(-1.0, "fraction of the parameters left out of the loss (-1: by ipc, 0 at 1, "
                         "0.5 at 10, 0.25 at 50+)", minimum=-1, below=1)
  mask: str = f("shallow", "which: shallow (the paper's, shallowest layers first) or "
                           "smallest_error (the official code's, best-matched at each update)",
                choices=MASKS)

  def __post_init__(self):
    if not (self.ratio == -1 or 0 <= self.ratio < 1):
      raise cli.UserError(f"--ratio must be in [0, 1) or -1, got {self.ratio}")

  def mask_ratio(self) -> float:
    if self.ratio >= 0:
      return self.ratio
    return [r for ipc, r in RATIO_BY_IPC if self.ipc >= ipc][-1]


PAD_BUFFER = {"curriculum": "pad"}  # PAD's experts: `experiments.buffer --curriculum pad`


def run(config: Config, workdir: str, devices) -> list[str]:
  """`experiments.pad`: DATM's run on PAD's experts with `make_pad`."""
  del devices
  cli.log(f"{config.mask} mask, ratio {config.mask_ratio()}")
  return [report(run_datm(config, workdir, "pad", make_pad, buffer_flags=PAD_BUFFER,
                          ratio=config.mask_ratio(), mask=config.mask), workdir)]


JOB = Job("pad", Config, run, presets=PRESETS, folder=lambda c: [c.dataset, f"ipc{c.ipc}"],
          inputs=lambda c: {"buffer": os.path.join(store_path(c, **PAD_BUFFER), "store.json")})
