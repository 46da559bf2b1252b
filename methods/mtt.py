"""MTT, matching training trajectories (Cazenavette et al., CVPR 2022).

The synthetic images and the student's learning rate are learned so that `syn_steps` SGD steps on
the images from an expert's parameters after epoch t land near the expert's parameters after epoch
t + M (methods/trajectory.py has the store, the unroll and the loss). Labels are hard and fixed;
every parameter is matched; every update is applied.
"""

from __future__ import annotations

from kip.method import Method
from methods.trajectory import ExpertStore, make_trajectory_matching

__all__ = ["make_mtt"]


def make_mtt(model, params_template, store: ExpertStore, **kwargs) -> Method:
  """MTT as a `kip.method.Method`; arguments: `make_trajectory_matching`'s."""
  return make_trajectory_matching(model, params_template, store, **kwargs)
