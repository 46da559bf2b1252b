"""DATM, difficulty-aligned trajectory matching (Guo et al., ICLR 2024): MTT plus three changes.

- Initial images that an expert classifies correctly (`correctly_classified`), with soft labels
  initialised to that expert's logits on them and learned (SGD, momentum 0.9); the student's loss
  is the cross-entropy against their softmax, and the set is saved with those probabilities.
- The start epoch's upper bound grows linearly over the run, from `max_start_epoch` to
  `max_start_epoch_final` (`start_window`): early trajectories first, later ones as the set grows
  richer (the paper's difficulty alignment).
- An update whose matching loss exceeds `threshold` is not applied.

The unroll, store and loss are methods/trajectory.py's. The command (`experiments.datm`) is `JOB`:
MTT's flags and run (methods/mtt.py) with DATM's (`DatmConfig`, which PAD shares), the initial
images an expert picks (`expert_support`) and `make_datm` (`run_datm`).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from kip import cli
from kip.command import Job
from kip.method import Method
from methods.mtt import TrajectoryConfig, report, run_trajectory, store_path
from methods.trajectory import ExpertStore, make_trajectory_matching

__all__ = ["make_datm", "start_window", "correctly_classified", "DatmConfig", "Config", "PRESETS",
           "expert_support", "run_datm", "run", "JOB"]


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


def run(config: Config, workdir: str, devices) -> list[str]:
  """`experiments.datm`: MTT's run with DATM's initial images and `make_datm`."""
  del devices
  return [report(run_datm(config, workdir, "datm"), workdir)]


JOB = Job("datm", Config, run, presets=PRESETS, folder=lambda c: [c.dataset, f"ipc{c.ipc}"],
          inputs=lambda c: {"buffer": os.path.join(store_path(c), "store.json")})
