"""Coreset baselines: real training images chosen per class without any optimisation.

`random`: a class-balanced random subset. `herding` (Welling, ICML 2009; the coreset baseline of
DC, Zhao et al., ICLR 2021): greedily add the image that keeps the running mean of the chosen
features closest to the class mean. `kcenter` (greedy k-center, Sener & Savarese, ICLR 2018):
start from a random image, then repeatedly add the image farthest from everything chosen so far,
a 2-approximation of the smallest covering radius. Features are the preprocessed pixels,
flattened (DC used a trained ConvNet's embedding; pixels need no network and are deterministic).

`Config`, `run` and `JOB` are the job `experiments.coreset` runs: the chosen images saved as a
distilled set with centred one-hot labels and the preprocessing.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from kip import cli
from kip.command import Devices, Job
from kip.data import centered_one_hot
from kip.pipeline import write_distilled
from methods.flags import PreprocessConfig, prepare_data

__all__ = ["SELECTIONS", "herding", "k_center", "select", "Config", "run", "JOB"]

SELECTIONS = ("random", "herding", "kcenter")


def herding(features: np.ndarray, k: int) -> np.ndarray:
  """(n, d) features -> (k,) distinct indices in the order herding picks them."""
  x = np.asarray(features, np.float64).reshape(len(features), -1)
  mean = x.mean(axis=0)
  chosen: list[int] = []
  total = np.zeros_like(mean)
  available = np.ones(len(x), bool)
  for t in range(k):
    gap = np.linalg.norm(mean - (total + x) / (t + 1), axis=1)
    gap[~available] = np.inf
    i = int(np.argmin(gap))
    chosen.append(i)
    total += x[i]
    available[i] = False
  return np.asarray(chosen)


def k_center(features: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  """(n, d) features -> (k,) distinct indices by greedy k-center from a random first image."""
  x = np.asarray(features, np.float64).reshape(len(features), -1)
  chosen = [int(rng.integers(len(x)))]
  nearest = np.linalg.norm(x - x[chosen[0]], axis=1)
  for _ in range(k - 1):
    i = int(np.argmax(nearest))
    chosen.append(i)
    nearest = np.minimum(nearest, np.linalg.norm(x - x[i], axis=1))
  return np.asarray(chosen)


def select(selection: str, x_train: np.ndarray, labels: np.ndarray, ipc: int, seed: int,
           num_classes: int) -> np.ndarray:
  """Indices of `ipc` training images of every class (class 0 first) chosen by `selection`.

  x_train: (n, H, W, C) float32 preprocessed images; labels: (n,) int class ids.
  """
  if selection not in SELECTIONS:
    raise ValueError(f"unknown selection {selection!r}; choose one of {', '.join(SELECTIONS)}")
  rng = np.random.default_rng([seed, 2])
  start = np.random.default_rng([seed, 3])  # k-center's first picks: not random's draws
  chosen = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) < ipc:
      raise ValueError(f"class {c} has {len(members)} images, fewer than the {ipc} requested")
    if selection == "random":
      picked = rng.choice(len(members), ipc, replace=False)
    elif selection == "herding":
      picked = herding(x_train[members], ipc)
    else:
      picked = k_center(x_train[members], ipc, start)
    chosen.append(members[picked])
  return np.concatenate(chosen)


@dataclasses.dataclass(frozen=True)
class Config(cli.RunConfig, PreprocessConfig, cli.DataConfig):
  ipc: int = cli.field(10, "images per class", minimum=1)
  select: str = cli.field("herding", "how images are chosen: random (class-balanced), herding "
                                     "(running mean closest to the class mean) or kcenter "
                                     "(greedy k-center), in the preprocessed pixel space",
                          choices=SELECTIONS)


def run(config: Config, workdir: str, devices: Devices) -> list[str]:
  """`experiments.coreset`'s job: the chosen images as `workdir`/distilled.npz."""
  del devices  # no kernels: numpy on the host
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
  return [f"{config.select}: {len(idx)} training images ({config.ipc} per class) -> {path}"]


JOB = Job("coreset", Config, run, folder=lambda c: [c.select, c.dataset, f"ipc{c.ipc}"])
