"""PAD, prioritising alignment in dataset distillation (Li et al., 2024): DATM on experts that saw
their data in order of difficulty, matching only the deeper parameters.

- Experts: `experiments.buffer --curriculum pad` (methods/trajectory.py: EL2N-sorted data, the
  easiest first, growing to all, then the easiest dropped late).
- The matching loss leaves out the shallowest `ratio` of the parameters (`depth_mask`), as the
  paper describes: shallow layers carry low-level features that the set gains little from
  matching. The official code has since switched to leaving out the parameters with the smallest
  matching error at each update (`drop_smallest`); `mask="smallest_error"` keeps that behaviour.

Everything else (soft labels, widening window, loss threshold) is DATM's (methods/datm.py).
"""

from __future__ import annotations

from kip.method import Method
from methods.datm import make_datm
from methods.trajectory import ExpertStore, depth_mask

__all__ = ["make_pad", "MASKS"]

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
