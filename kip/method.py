"""The interface every distiller follows, and the real data the loop fetches for it each step.

A distiller is a few pure functions, like an optax transformation (see DESIGN.md):

    method = make_something(hyperparameters...)            # a `Method`
    state = method.init(key, x_init, y_init)               # everything a first step needs
    state, metrics = method.update(state, batch, key, step)   # jitted; may donate `state`
    arrays = method.export(state)      # {"images": ..., "labels" or "targets": ..., extras}

Hyperparameters live in the closure, arrays in the state (any pytree, PRNG keys included). `init`
must be traceable by `jax.eval_shape` (no host round trips on its outputs): a resumed run restores
its checkpoint onto `jax.eval_shape(init)` and never calls `init`, however costly it is (a pool of
networks trained to its start). The loop checks what `export` returns (`check_export`).

Experts, teachers and finite-net training run through the same loop with the smaller `Trainer`
interface: `init`, `update` and `data`, no export (their outputs are written by their command).

`data` says what real data `update` needs each step, and the loop fetches exactly that:

- `Data("labelled", n)`: a class-balanced batch of n training images and their labels (KIP,
  FRePo, RFAD, DM, DataDAM);
- `Data("unlabelled", n)`: n uniformly drawn training images, `batch.y` None (KRR-ST, autoencoder);
- `Data("none")`: nothing, `batch` is None (trajectory matching reads its own expert store,
  finite-net training samples its set inside the step).

`schedule_steps`: the run length a schedule inside `update` was built for (a cosine or linear
decay over `--steps`), 0 when none depends on it. The loop records it in every checkpoint and
refuses to resume under another value, which would silently change the schedule.

Batches are a pure function of (seed, step), so a resumed run sees the batches an uninterrupted
one would. `update` receives the step as a traced int32 scalar (it compiles once).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import numpy as np

__all__ = ["DATA_KINDS", "Data", "Batch", "Method", "Trainer", "Sampler", "make_sampler",
           "check_export", "ExportError", "tracing"]

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
  """A distiller. init(key, x_init, y_init) -> state; update(state, batch, key, step) ->
  (state, metrics); export(state) -> {name: array}; data: what `update` needs each step;
  schedule_steps: the step count a schedule in `update` was built for (0: none);
  state_sharding: where `init` places every leaf of the state (e.g. replicated on the mesh a
  sharded kernel computes on), so a restored state is placed there too (None: not placed).

  `export` must return `images` (N, H, W, C) and either `labels` (N, C) or `targets` (N, D);
  anything else is a named extra saved beside them (a learned learning rate, a Platt scale...).
  """

  init: Callable[..., Any]
  update: Callable[..., tuple[Any, dict[str, Any]]]
  export: Callable[[Any], dict[str, Any]]
  data: Data = Data()
  schedule_steps: int = 0
  state_sharding: Any = None


class Trainer(NamedTuple):
  """What the loop needs of a network trained on real or distilled data (an expert, a teacher,
  finite-net evaluation): `Method` without `export`."""

  init: Callable[..., Any]
  update: Callable[..., tuple[Any, dict[str, Any]]]
  data: Data = Data()
  schedule_steps: int = 0
  state_sharding: Any = None


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


def tracing(x: Any) -> bool:
  """Whether `x` is abstract: `init` runs under `jax.eval_shape` to give a resumed run its
  template, and may skip costly host work there that changes no shape (a pool's warm-up)."""
  return isinstance(x, jax.core.Tracer)


class ExportError(ValueError):
  """A method's `export` broke its contract (a bug in the method, not the user's mistake)."""


def check_export(arrays: dict[str, Any]) -> dict[str, np.ndarray]:
  """The exported arrays on the host, checked: `images` (N, H, W, C) float, exactly one of
  `labels` / `targets` (N, D), every value finite."""
  if not isinstance(arrays, dict):
    raise ExportError(f"a method's export must return a dict of arrays, got {type(arrays)}")
  arrays = {k: np.asarray(jax.device_get(v)) for k, v in arrays.items()}
  if "images" not in arrays or arrays["images"].ndim != 4:
    raise ExportError(f"a method must export `images` (N, H, W, C); got "
                      f"{ {k: v.shape for k, v in arrays.items()} }")
  kinds = [k for k in ("labels", "targets") if k in arrays]
  if len(kinds) != 1:
    raise ExportError(f"a method must export one of `labels` or `targets`; got {sorted(arrays)}")
  n = len(arrays["images"])
  try:
    chex.assert_rank(arrays[kinds[0]], 2)
    chex.assert_equal_shape_prefix([arrays["images"], arrays[kinds[0]]], 1)
  except AssertionError as e:
    raise ExportError(f"`{kinds[0]}` must be (N, D) with N = {n}, got "
                      f"{arrays[kinds[0]].shape}: {e}") from None
  for name, value in arrays.items():
    if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
      raise ExportError(f"the exported `{name}` holds non-finite values")
  return arrays
