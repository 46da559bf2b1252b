"""DATM, difficulty-aligned trajectory matching (Guo et al., ICLR 2024): MTT plus three changes.

- Initial images that an expert classifies correctly (`correctly_classified`), with soft labels
  initialised to that expert's logits on them and learned (SGD, momentum 0.9); the student's loss
  is the cross-entropy against their softmax, and the set is saved with those probabilities.
- The start epoch's upper bound grows linearly over the run, from `max_start_epoch` to
  `max_start_epoch_final` (`start_window`): early trajectories first, later ones as the set grows
  richer (the paper's difficulty alignment).
- An update whose matching loss exceeds `threshold` is not applied.

The unroll, store and loss are methods/trajectory.py's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kip.method import Method
from methods.trajectory import ExpertStore, make_trajectory_matching

__all__ = ["make_datm", "start_window", "correctly_classified"]


def start_window(step: int, *, first: int, last: int, steps: int) -> int:
  """The start epoch's (exclusive) upper bound at `step` (1-based) of `steps`: `first` at the
  start, growing linearly to `last` at the end."""
  if last <= first:
    return first
  if steps <= 1:
    return last
  return first + int(np.floor((last - first) * (step - 1) / (steps - 1)))


def correctly_classified(model, params, x: np.ndarray, labels: np.ndarray, ipc: int,
                         num_classes: int, seed: int, chunk: int = 500
                         ) -> tuple[np.ndarray, np.ndarray]:
  """`ipc` indices per class (class 0's first) of images `model` with `params` classifies
  correctly, in a random order per class (`rng([seed, 1])`), and the (n, C) logits on them.
  A class with too few correct images is completed with incorrect ones (in the same order).

  Each class is classified in that order, `chunk` images at a time, only until `ipc` correct
  ones are found (the whole class when it has fewer): the same picks as classifying every
  image, without a pass over the whole training set."""
  predict = jax.jit(lambda xb: model.apply({"params": params}, xb, train=False))

  def classify(idx: np.ndarray) -> np.ndarray:  # padded to `chunk` rows: one compiled shape
    batch = np.zeros((chunk, *x.shape[1:]), x.dtype)
    batch[:len(idx)] = x[idx]
    return np.asarray(predict(jnp.asarray(batch)))[:len(idx)]

  rng = np.random.default_rng([seed, 1])
  picks, picked_logits = [], []
  for c in range(num_classes):
    members = rng.permutation(np.flatnonzero(labels == c))
    if len(members) < ipc:
      raise ValueError(f"class {c} has {len(members)} training images, fewer than ipc {ipc}")
    seen, logits, found = [], [], 0
    for s in range(0, len(members), chunk):
      seen.append(members[s:s + chunk])
      logits.append(classify(seen[-1]))
      found += int(np.sum(logits[-1].argmax(-1) == c))
      if found >= ipc:
        break
    seen, logits = np.concatenate(seen), np.concatenate(logits)
    correct = logits.argmax(-1) == c
    ranked = np.concatenate([np.flatnonzero(correct), np.flatnonzero(~correct)])[:ipc]
    picks.append(seen[ranked])
    picked_logits.append(logits[ranked])
  return np.concatenate(picks), np.concatenate(picked_logits)


def make_datm(model, params_template, store: ExpertStore, *, max_start_epoch: int,
              max_start_epoch_final: int, steps: int, lr_y: float = 2.0,
              threshold: float = 1.0, **kwargs) -> Method:
  """DATM as a `kip.method.Method`: soft labels learned at `lr_y`, the start window widening from
  `max_start_epoch` to `max_start_epoch_final` over `steps`, updates skipped above `threshold`
  (0: never). Other arguments: `make_trajectory_matching`'s."""
  last = max(max_start_epoch, max_start_epoch_final)
  return make_trajectory_matching(
      model, params_template, store, soft_labels=True, lr_y=lr_y, skip_above=threshold,
      max_start_epoch=lambda step: start_window(step, first=max_start_epoch, last=last,
                                                steps=steps),
      largest_start=last, **kwargs)
