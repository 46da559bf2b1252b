"""The protocol every distiller follows, and the real data the loop fetches for it each step.

A method is a pair of pure functions, like an optax transformation (see DESIGN.md):

    method = make_something(hyperparameters...)
    state = init_state(method, key, x_init, y_init)      # init, then the optional `prepare`
    state, metrics = method.update(state, batch, key, step)   # jitted; may donate `state`
    arrays = method.export(state)      # {"images": ..., "labels" or "targets": ..., extras}

Hyperparameters live in the closure, arrays in the state (any pytree, PRNG keys included).
`method.data` says what real data `update` needs each step, and the loop fetches exactly that:

- `Data("labelled", n)`: a class-balanced batch of n training images and their labels (KIP,
  FRePo, RFAD, DM, DataDAM);
- `Data("unlabelled", n)`: n uniformly drawn training images, `batch.y` None (KRR-ST, autoencoder);
- `Data("none")`: nothing, `batch` is None (trajectory matching reads its own expert store,
  finite-net training samples its set inside the step).

Batches are a pure function of (seed, step), so a resumed run sees the batches an uninterrupted
one would. `update` receives the step as a traced int32 scalar (it compiles once).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

__all__ = ["DATA_KINDS", "Data", "Batch", "Method", "Sampler", "make_sampler", "check_export",
           "init_state"]

DATA_KINDS = ("labelled", "unlabelled", "none")


class Data(NamedTuple):
  """What real data a method's `update` needs each step: `kind` (one of DATA_KINDS), `size`."""

  kind: str = "labelled"
  size: int = 0


class Batch(NamedTuple):
  """One step's real data. x: (n, H, W, C) float32; y: (n, C) float32 training targets (labels
  as the dataset's pipeline encodes them, e.g. centred one-hot), or None when unlabelled."""

  x: Any
  y: Any = None


class Method(NamedTuple):
  """init(key, x_init, y_init) -> state; update(state, batch, key, step) -> (state, metrics);
  export(state) -> {name: array}; data: what `update` needs each step; prepare (optional):
  (key, state) -> state, work a fresh state needs once before its first step (e.g. training a
  model pool to its start), given init's key. A run resumed from a checkpoint restores onto
  init's (cheap) state and skips `prepare`; `init_state` does both for a fresh start.

  `export` must return `images` (N, H, W, C) and either `labels` (N, C) or `targets` (N, D);
  anything else is a named extra saved beside them (a learned learning rate, a Platt scale...).
  """

  init: Callable[..., Any]
  update: Callable[..., tuple[Any, dict[str, Any]]]
  export: Callable[[Any], dict[str, Any]]
  data: Data = Data()
  prepare: Callable[[Any, Any], Any] | None = None


def init_state(method: Method, key: Any, x_init: Any = None, y_init: Any = None) -> Any:
  """A fresh state ready for its first step: `init`, then `prepare` when the method has one."""
  state = method.init(key, x_init, y_init)
  return state if method.prepare is None else method.prepare(key, state)


Sampler = Callable[[int], Batch | None]


def make_sampler(data: Data, x_train: np.ndarray | None, labels_train: np.ndarray | None = None,
                 y_train: np.ndarray | None = None, *, seed: int = 0,
                 num_classes: int | None = None) -> Sampler:
  """step -> the batch `data` asks for, a pure function of (seed, step).

  Args:
    x_train: (n, H, W, C) float32 training images on the host (unused for `none`).
    labels_train: (n,) int class ids (class-balanced draws).
    y_train: (n, C) float32 targets handed to the method with the images (default: one-hot of
      `labels_train`, centred).
  """
  if data.kind not in DATA_KINDS:
    raise ValueError(f"unknown data kind {data.kind!r}; choose one of {', '.join(DATA_KINDS)}")
  if data.kind == "none":
    return lambda step: None
  if data.size < 1:
    raise ValueError(f"a {data.kind} batch needs a positive size, got {data.size}")
  if data.kind == "unlabelled":
    n = len(x_train)

    def unlabelled(step: int) -> Batch:
      idx = np.sort(np.random.default_rng([seed, step, 2]).choice(n, data.size, replace=False))
      return Batch(x_train[idx])

    return unlabelled
  from kip.data import centered_one_hot, sample_target_batch  # noqa: PLC0415

  if labels_train is None:
    raise ValueError("a labelled batch needs labels_train")
  num_classes = num_classes or int(labels_train.max()) + 1
  targets = centered_one_hot(labels_train, num_classes) if y_train is None else y_train

  def labelled(step: int) -> Batch:
    idx = sample_target_batch(labels_train, data.size, seed, step, num_classes)
    return Batch(x_train[idx], targets[idx])

  return labelled


def check_export(arrays: dict[str, Any]) -> dict[str, np.ndarray]:
  """The exported arrays on the host, checked: `images` (N, H, W, C) and exactly one of
  `labels` / `targets` with N rows."""
  arrays = {k: np.asarray(jax.device_get(v)) for k, v in arrays.items()}
  if "images" not in arrays or arrays["images"].ndim != 4:
    raise ValueError(f"a method must export `images` (N, H, W, C); got {sorted(arrays)}")
  kinds = [k for k in ("labels", "targets") if k in arrays]
  if len(kinds) != 1:
    raise ValueError(f"a method must export one of `labels` or `targets`; got {sorted(arrays)}")
  if arrays[kinds[0]].ndim != 2 or len(arrays[kinds[0]]) != len(arrays["images"]):
    raise ValueError(f"`{kinds[0]}` must be (N, D) with N = {len(arrays['images'])}, got "
                     f"{arrays[kinds[0]].shape}")
  return arrays
