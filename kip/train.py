"""Training finite-width networks on a (distilled) set and measuring them on the real test split.

The field's common evaluation protocols (`COMMON_PROTOCOLS`), each as its source describes it;
the protocols of single methods (FRePo's, RFAD's, KRR-ST's, the report's) are in
methods/protocols.py, which joins both into the registry the commands use:

- `kip`: the KIP authors' finite-network transfer colab (Nguyen et al., NeurIPS 2021). MSE
  `0.5 * mean((f(x) - y)^2)` on the set's own labels (centred one-hot, or learned labels as
  given), SGD with momentum 0.9, batch 100, 5000 steps, weight penalty `0.5 * 1e-3 * sum w^2`,
  cosine decay to 0, learning rate = the maximum stable rate of the empirical NTK of 50 training
  images at initialisation (`nt.empirical_ntk_fn` + `nt.predict.max_learning_rate`). Network: the
  ConvNet at width 1024, no normalisation, standard parameterisation.
- `dc`: DC's own evaluation (Zhao et al., ICLR 2021; VICO-UoE/DatasetCondensation `main.py` with
  `utils.evaluate_synset`, `get_daparam`, `augment`). Cross-entropy on hard labels (the argmax of
  the set's labels), SGD lr 0.01, momentum 0.9, weight decay 5e-4, lr x 0.1 at half way, batch 256
  (the last batch of an epoch partial, as PyTorch's DataLoader gives it), ConvNet-3 at width 128
  with instance norm. Augmentation by dataset, as `get_daparam`: MNIST DC's own crop / scale /
  rotate (`kip.augment.dc_augment`, one per image) and 1000 epochs; every other dataset none and
  300 epochs.
- `dsa`: the evaluation of DSA / DM / MTT (Zhao & Bilen, ICML 2021 and WACV 2023; Cazenavette et
  al., CVPR 2022): as `dc`, but DSA's `color_crop_cutout_flip_scale_rotate` on every dataset (one
  transformation per batch, its parameters drawn per image) and 1000 epochs. MTT trains at its
  set's learned learning rate (pass `lr`).

A protocol may also centre the output (train f(theta, x) - f(theta_0, x)), decay the weights
toward their initial values instead of 0, and scale the regression targets (RFAD's evaluation
does all three).

Several seeds train at once: the per-seed states are stacked and one jitted step runs them all,
`vmap`ped, or one after another for conv nets on CPU (`choose_seed_batching`); the training
images are shared, batches and augmentations are drawn per seed. Training runs in the one loop
(`kip.loop.run`) as a method that needs no real batch from it: same metrics schema, checkpoints
and resume as distillation. Randomness is a pure function of (seed, step), so a run resumed from
a checkpoint equals an uninterrupted one.

`linear_probe` measures frozen features instead: a softmax-regression classifier trained on them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from kip._compat import nt
from kip.augment import DC_STRATEGY, DSA_STRATEGY, apply_augment, parse_augment
from kip.loop import Evaluator, LoopConfig, read_metrics, run
from kip.method import Data, Trainer, make_sampler
from kip.nets import MLP, count_params

__all__ = ["Protocol", "COMMON_PROTOCOLS", "Schedule", "TrainState", "TrainResult",
           "resolve_schedule", "max_stable_lr", "make_optimizer", "choose_seed_batching",
           "over_seeds", "init_states", "make_train_step", "make_predict", "evaluate_states",
           "is_soft", "train_and_evaluate", "linear_probe"]


@dataclasses.dataclass(frozen=True)
class Protocol:
  """A transfer protocol. `steps` or `epochs` fixes its length; `lr=None` means the maximum
  stable rate of the empirical NTK; `schedule` is `cosine` (to 0) or `step` (x0.1 at half).
  `augment` is an augmentation spec (`kip.augment.parse_augment`), replaced for the datasets named
  in `augment_by_dataset` ((tfds name, spec) pairs); `augment_per_image` draws DSA's parameters per
  image instead of once per batch; `partial_batches` makes an epoch ceil(n / batch) steps, the
  last one the epoch's final `batch` images, instead of dropping the remainder.
  `hypers_by_size` ((max images, lr, weight decay), ...) replaces `lr` and `weight_decay` by the
  first row whose size the set does not exceed (the last row beyond): `at_size`."""

  name: str
  source: str
  loss: str
  lr: float | None
  momentum: float
  weight_decay: float
  batch_size: int
  schedule: str
  width: int
  norm: str
  steps: int | None = None
  epochs: int | None = None
  epochs_augmented: int | None = None
  augment: str = ""
  augment_by_dataset: tuple[tuple[str, str], ...] = ()
  augment_per_image: bool = False
  partial_batches: bool = False
  lr_ntk_images: int = 50
  dc_padding: bool = False
  net: str = "convnet"
  optimizer: str = "sgd"
  warmup_steps: int = 0
  final_lr_fraction: float = 0.0
  steps_by_size: tuple[tuple[int, int], ...] = ()
  center_output: bool = False  # train and predict with f(theta, x) - f(theta_0, x)
  decay_to_init: bool = False  # weight decay pulls toward the initial weights, not 0
  label_scale: float = 1.0  # targets x label_scale, MSE / label_scale^2
  hypers_by_size: tuple[tuple[int, float, float], ...] = ()

  def at_size(self, n_train: int) -> Protocol:
    """This protocol for a set of `n_train` images: its `hypers_by_size` row applied."""
    if not self.hypers_by_size:
      return self
    _, lr, wd = next((row for row in self.hypers_by_size if n_train <= row[0]),
                     self.hypers_by_size[-1])
    return dataclasses.replace(self, lr=lr, weight_decay=wd, hypers_by_size=())

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f"protocol {self.name}: unknown loss {self.loss!r}; choose one of "
                       f"{', '.join(LOSSES)}")
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"protocol {self.name}: unknown optimizer {self.optimizer!r}; choose one "
                       f"of {', '.join(OPTIMIZERS)}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"protocol {self.name}: unknown schedule {self.schedule!r}; choose one "
                       f"of {', '.join(SCHEDULES)}")


LOSSES = ("mse", "mse_mean", "xent")  # mse: 0.5 mean((f - y)^2); mse_mean: PyTorch's, no 0.5
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "step", "warmup_cosine", "constant")


# The field's common evaluations, which the methods' protocols (methods/protocols.py) join.
COMMON_PROTOCOLS: dict[str, Protocol] = {
    "kip": Protocol(
        name="kip", source="KIP authors' nn_training colab (Nguyen et al., NeurIPS 2021)",
        loss="mse", lr=None, momentum=0.9, weight_decay=1e-3, batch_size=100, schedule="cosine",
        width=1024, norm="none", steps=5000),
    "dc": Protocol(
        name="dc", source="DC's evaluation (Zhao et al., ICLR 2021, official code: MNIST with DC's "
        "crop/scale/rotate and 1000 epochs, other datasets no augmentation and 300 epochs)",
        loss="xent", lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=256, schedule="step",
        width=128, norm="instance", epochs=300, epochs_augmented=1000, augment="",
        augment_by_dataset=(("mnist", f"dc:{DC_STRATEGY}"),), partial_batches=True,
        dc_padding=True, net="convnet3"),
    "dsa": Protocol(
        name="dsa", source="DSA's evaluation, shared by the distribution and trajectory matching "
        "methods (Zhao & Bilen, ICML 2021 and WACV 2023; Cazenavette et al., CVPR 2022; official "
        "code: DSA per image, 1000 epochs)",
        loss="xent", lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=256, schedule="step",
        width=128, norm="instance", epochs=300, epochs_augmented=1000, augment=DSA_STRATEGY,
        augment_per_image=True, partial_batches=True, dc_padding=True, net="convnet3"),
}


class Schedule(NamedTuple):
  """The concrete length of a run: `steps` of `batch_size` images, `steps_per_epoch` per pass."""

  steps: int
  batch_size: int
  steps_per_epoch: int
  augment: str


def resolve_schedule(protocol: Protocol, n_train: int, *, steps: int = 0,
                     augment: str | None = None, dataset: str = "") -> Schedule:
  """Steps, batch and augmentation of `protocol` on `n_train` images of `dataset` (a tfds name, or
  '' when unknown). `steps` > 0 overrides the length; `augment=None` keeps the protocol's spec for
  the dataset, '' or 'none' turns augmentation off."""
  if augment is None:
    augment = dict(protocol.augment_by_dataset).get(dataset, protocol.augment)
  parse_augment(augment)
  batch = min(protocol.batch_size, n_train)
  # Fixed-size batches (jit), each epoch a new permutation; with `partial_batches` the last batch
  # is the permutation's final `batch` images (the step's slice start is clamped).
  per_epoch = max(1, -(-n_train // batch) if protocol.partial_batches else n_train // batch)
  if steps <= 0:
    if protocol.steps_by_size:
      steps = next((k for size, k in protocol.steps_by_size if n_train <= size),
                   protocol.steps_by_size[-1][1])
    elif protocol.steps is not None:
      steps = protocol.steps
    else:
      epochs = protocol.epochs_augmented if augment not in ("", "none") else protocol.epochs
      steps = epochs * per_epoch
  return Schedule(steps, batch, per_epoch, "" if augment == "none" else augment)


class TrainState(NamedTuple):
  """One network's state (a leading seed axis when stacked): params, batch-norm statistics
  (empty when the net has none), the optimiser's state, and the initial params (kept only by
  protocols that centre the output or decay toward the initialisation; else empty)."""

  params: Any
  batch_stats: Any
  opt_state: Any
  init_params: Any = ()


class TrainResult(NamedTuple):
  """test_acc: (n_seeds,) final accuracy on the whole test split (empty without a test split);
  curve: [{"step", "test_acc": [per seed]}]; lr: the learning rate used; train_time: seconds of
  training (no evaluation); images_per_s: training images processed per second, all seeds
  together, compilation included; wall_time: seconds of the whole run, evaluations included;
  states: the trained networks (`TrainState`, stacked over seeds); cpu_time: CPU seconds of the
  whole run (every thread; `kip.loop`'s record)."""

  test_acc: np.ndarray
  curve: list[dict]
  lr: float
  steps: int
  train_time: float
  images_per_s: float
  params: int
  wall_time: float = math.nan
  states: Any = None
  cpu_time: float = math.nan


def _variables(params, batch_stats) -> dict:
  return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def max_stable_lr(net: nn.Module, variables: dict, x: np.ndarray, momentum: float,
                  memory_bytes: float = 2**30, iterations: int = 100,
                  log: Callable[[str], None] | None = None) -> float:
  """The largest learning rate at which (momentum) gradient descent on the MSE
  `0.5 * mean((f - y)^2)` is stable for the linearised network: `2 (1 + momentum) * m * k /
  lambda_max`, lambda_max the top eigenvalue of the empirical NTK (averaged over the k logits) of
  `x` (m, H, W, C) at these parameters, as `nt.predict.max_learning_rate` computes it.

  When the Jacobian (m * k * params floats) fits in `memory_bytes`, the NTK is built by
  neural-tangents' Jacobian contraction and its eigenvalue taken exactly; when one logit's
  Jacobian (m * params) fits, the NTK is summed over the logits' Jacobians, one at a time (as
  exact; at the colab's width 1024 neither fits in 1 GiB); otherwise lambda_max comes from
  power iteration with NTK-vector products (one VJP and one JVP per logit per
  iteration; no Jacobian and no Gram matrix beyond m x m), within `iterations` or until it moves
  by less than 1e-5 relative (the rate to four digits). `log` hears how it is computed and, for
  power iteration, each iteration's estimate and time.
  """
  log = log or (lambda _: None)
  rest = {k: v for k, v in variables.items() if k != "params"}

  def f(params, images):
    return net.apply({"params": params, **rest}, images, train=False)

  params = variables["params"]
  num_outputs = jax.eval_shape(f, params, x[:1]).shape[-1]
  jacobian_bytes = 4 * len(x) * num_outputs * count_params(params)
  x = jnp.asarray(x)
  if jacobian_bytes < memory_bytes:
    log(f"learning rate: the empirical NTK of {len(x)} images ({jacobian_bytes / 2**20:.0f} MiB "
        "of Jacobian)")
    ntk_fn = jax.jit(nt.empirical_ntk_fn(
        f, vmap_axes=0, implementation=nt.NtkImplementation.JACOBIAN_CONTRACTION))
    with jax.default_matmul_precision("highest"):
      ntk = np.asarray(ntk_fn(x, None, params), np.float64)
    return float(nt.predict.max_learning_rate(ntk, y_train_size=len(x) * num_outputs,
                                              momentum=momentum))
  if jacobian_bytes / num_outputs < memory_bytes:
    log(f"learning rate: the empirical NTK of {len(x)} images, one logit's Jacobian at a time "
        f"({jacobian_bytes / num_outputs / 2**20:.0f} MiB each)")
    top = _ntk_by_logit(f, params, x, num_outputs)
  else:
    log(f"learning rate: the top eigenvalue of the empirical NTK of {len(x)} images by power "
        f"iteration ({num_outputs} VJPs and JVPs an iteration; its Jacobian, "
        f"{jacobian_bytes / 2**30:.1f} GiB, exceeds {memory_bytes / 2**30:.1f} GiB)")
    top = _ntk_top_eigenvalue(f, params, x, num_outputs, iterations, log)
  return float(2 * (1 + momentum) * len(x) * num_outputs / top)


def _ntk_by_logit(f: Callable, params, x: jax.Array, k: int) -> float:
  """The top eigenvalue of (1/k) sum_o J_o J_o^T, each J_o (m, params) built by per-image
  gradients of logit o and contracted leaf by leaf: m x params floats at a time, not k times
  that, and no iteration (about k backward passes of the m images)."""

  @jax.jit
  def gram(params, x, o):
    def logit(p, image):
      return f(p, image[None])[0, o]

    jac = jax.vmap(jax.grad(logit), in_axes=(None, 0))(params, x)
    return sum(jnp.einsum("i...,j...->ij", leaf, leaf)
               for leaf in jax.tree_util.tree_leaves(jac))

  with jax.default_matmul_precision("highest"):
    ntk = sum(np.asarray(gram(params, x, o), np.float64) for o in range(k)) / k
  return float(np.linalg.eigvalsh(ntk)[-1])


def ntk_logit_product(f: Callable, params, x: jax.Array, v: jax.Array, o, k: int) -> jax.Array:
  """J_o J_o^T v for logit `o` of `k`: a VJP then a JVP (J_o, the (m, params) Jacobian of `f`'s
  logit o at x; v, (m,))."""
  _, vjp = jax.vjp(lambda p: f(p, x), params)
  (u,) = vjp(jnp.zeros((len(x), k), v.dtype).at[:, o].set(v))
  return jax.jvp(lambda p: f(p, x), (params,), (u,))[1][:, o]


def _ntk_top_eigenvalue(f: Callable, params, x: jax.Array, k: int, iterations: int,
                        log: Callable[[str], None]) -> float:
  """Power iteration for the top eigenvalue of (1/k) sum_o J_o J_o^T, J_o the (m, params)
  Jacobian of logit o, with matrix-free products: J_o^T v by a VJP, J_o u by a JVP."""
  # Parameters and images are arguments, not closed over: a jitted function's captured arrays
  # become constants of its program (the activations of a VJP taken outside were 2 GB at
  # width 1024, and XLA constant-folded convolutions over them).
  @jax.jit
  def ntk_vector(params, x, v):
    def one_logit(total, o):
      return total + ntk_logit_product(f, params, x, v, o, k), None

    total, _ = jax.lax.scan(one_logit, jnp.zeros_like(v), jnp.arange(k))
    return total / k

  v = jnp.ones((len(x),), jnp.float32) / np.sqrt(len(x))
  value = 0.0
  with jax.default_matmul_precision("highest"):
    for i in range(iterations):
      start = time.perf_counter()
      w = ntk_vector(params, x, v)
      new = float(jnp.vdot(v, w))
      log(f"  power iteration {i + 1}: eigenvalue {new:.6g} ({time.perf_counter() - start:.1f} s)")
      v = w / jnp.linalg.norm(w)
      if abs(new - value) <= 1e-5 * abs(new):
        return new
      value = new
  return value


def make_optimizer(protocol: Protocol, lr: float, steps: int) -> optax.GradientTransformation:
  """The protocol's optimiser (SGD with momentum and weight decay, or Adam) and learning-rate
  schedule over `steps`."""
  if protocol.schedule == "constant":
    schedule = optax.constant_schedule(lr)
  elif protocol.schedule == "cosine":
    schedule = optax.cosine_decay_schedule(lr, steps, alpha=protocol.final_lr_fraction)
  elif protocol.schedule == "step":
    schedule = optax.piecewise_constant_schedule(lr, {steps // 2: 0.1})
  else:  # warmup_cosine: linear warm-up, then cosine to final_lr_fraction * lr
    warmup = min(protocol.warmup_steps, steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * protocol.final_lr_fraction)
  if protocol.optimizer == "adam":
    return optax.adam(schedule)
  if protocol.decay_to_init:  # the decay toward the initial weights is in the loss
    return optax.sgd(schedule, momentum=protocol.momentum)
  # Weight decay added to the gradient before momentum = the gradient of 0.5 * wd * sum w^2.
  return optax.chain(optax.add_decayed_weights(protocol.weight_decay),
                     optax.sgd(schedule, momentum=protocol.momentum))


def _seed_keys(seeds: Sequence[int]) -> jax.Array:
  return jnp.stack([jax.random.key(s) for s in seeds])


def init_states(net: nn.Module, tx: optax.GradientTransformation, seeds: Sequence[int],
                image_shape: tuple[int, ...], keep_init: bool = False) -> TrainState:
  """Stacked initial states, one per seed (init key `fold_in(key(seed), 0)`); `keep_init` keeps a
  copy of the initial params (centring the output, decay toward the initialisation)."""

  def init(key):
    variables = net.init(jax.random.fold_in(key, 0), jnp.zeros((1, *image_shape)), train=False)
    params = variables["params"]
    return TrainState(params, variables.get("batch_stats", {}), tx.init(params),
                      params if keep_init else ())

  return jax.jit(jax.vmap(init))(_seed_keys(seeds))


def choose_seed_batching(net: nn.Module, requested: str = "auto") -> str:
  """`vmap` on accelerators and for the MLP; `sequential` for conv nets on CPU (bench/transfer.py:
  vmapped conv nets run at 0.2-0.5x of one seed after another there, the MLP at ~1x, and the
  sequential MLP pays per-seed dispatch)."""
  if requested != "auto":
    return requested
  if jax.default_backend() != "cpu" or isinstance(net, MLP):
    return "vmap"
  return "sequential"


def over_seeds(fn: Callable, in_axes: tuple, seed_batching: str = "auto",
               donate_first: bool = False) -> Callable:
  """`fn` jitted and mapped over a leading seed axis of the arguments whose `in_axes` is 0.

  `vmap`: one batched program (a win on accelerators). `sequential`: the single-seed program
  called once per seed and the results stacked; on XLA:CPU this is several times faster for conv
  nets, because vmapping per-seed conv weights makes grouped convolutions (and `lax.map` puts the
  conv inside a loop), both of which XLA:CPU runs far slower (bench/transfer.py measures it).
  `auto`: see `choose_seed_batching`.
  """
  donate = (0,) if donate_first else ()
  if seed_batching == "vmap":
    return jax.jit(jax.vmap(fn, in_axes=in_axes), donate_argnums=donate)
  if seed_batching != "sequential":
    raise ValueError(f"unknown seed batching {seed_batching!r}; choose auto, vmap or sequential")
  single = jax.jit(fn, donate_argnums=donate)

  def sequential(*args):
    n = len(jax.tree_util.tree_leaves(args[in_axes.index(0)])[0])
    outputs = []
    for i in range(n):
      sliced = [jax.tree_util.tree_map(lambda a, i=i: a[i], arg) if axis == 0 else arg
                for arg, axis in zip(args, in_axes, strict=True)]
      outputs.append(single(*sliced))
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outputs)

  return sequential


def make_train_step(net: nn.Module, tx: optax.GradientTransformation, loss: str,
                    schedule: Schedule, n_train: int, per_seed_data: bool = False,
                    seed_batching: str = "vmap", protocol: Protocol | None = None) -> Callable:
  """(states, seed_keys, step, x_train, y_train) -> (states, losses (n_seeds,)); compiled, states
  donated. Batch `step` of a seed is a slice of that seed's permutation for the step's epoch.
  With `per_seed_data`, x_train and y_train carry a leading seed axis (one set per seed);
  `seed_batching` is how seeds share the step (see `over_seeds`). `protocol` brings the centred
  output, label scale and decay toward the initialisation, when it asks for them (RFAD's
  evaluation does), and whether DSA draws per image."""
  batch, per_epoch = schedule.batch_size, schedule.steps_per_epoch
  center_output = protocol is not None and protocol.center_output
  scale = protocol.label_scale if protocol is not None else 1.0
  decay_to_init = protocol.weight_decay if protocol is not None and protocol.decay_to_init else 0
  per_image = protocol is not None and protocol.augment_per_image

  def loss_fn(params, batch_stats, x, y, init_params):
    variables = _variables(params, batch_stats)
    if batch_stats:
      logits, updated = net.apply(variables, x, train=True, mutable=["batch_stats"])
      batch_stats = updated["batch_stats"]
    else:
      logits = net.apply(variables, x, train=True)
    if center_output:
      logits = logits - net.apply(_variables(init_params, batch_stats), x, train=False)
    if decay_to_init:
      value = 0.5 * decay_to_init * sum(
          jnp.sum((a - b) ** 2) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                 jax.tree_util.tree_leaves(init_params),
                                                 strict=True))
    else:
      value = 0.0
    if loss in ("mse", "mse_mean"):
      half = 0.5 if loss == "mse" else 1.0
      value = value + half * jnp.mean((logits - scale * y) ** 2) / scale**2
    elif loss == "xent" and y.ndim == logits.ndim:  # soft labels: probabilities
      value = value + optax.softmax_cross_entropy(logits, y).mean()
    elif loss == "xent":
      value = value + optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    else:
      raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    return value, batch_stats

  def one_seed(state: TrainState, key, step, x_train, y_train):
    key = jax.random.fold_in(jax.random.fold_in(key, 1), step // per_epoch)
    perm = jax.random.permutation(key, n_train)
    idx = jax.lax.dynamic_slice(perm, ((step % per_epoch) * batch,), (batch,))
    x, y = x_train[idx], y_train[idx]
    if schedule.augment:
      x = apply_augment(jax.random.fold_in(jax.random.fold_in(key, 2), step), x,
                        schedule.augment, batch_mode=not per_image)
    (value, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, x, y, state.init_params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), batch_stats, opt_state,
                      state.init_params), value

  data_axis = 0 if per_seed_data else None
  return over_seeds(one_seed, (0, 0, None, data_axis, data_axis), seed_batching,
                    donate_first=True)


def make_predict(net: nn.Module, seed_batching: str = "vmap", center_output: bool = False
                 ) -> Callable:
  """(states, x (b, H, W, C)) -> logits (n_seeds, b, num_classes); compiled. `center_output`
  subtracts the network's output at initialisation (RFAD's evaluation does)."""

  def predict(state: TrainState, x):
    out = net.apply(_variables(state.params, state.batch_stats), x, train=False)
    if center_output:
      out = out - net.apply(_variables(state.init_params, state.batch_stats), x, train=False)
    return out

  return over_seeds(predict, (0, None), seed_batching)


def evaluate_states(predict: Callable, states: TrainState, x_test: np.ndarray,
                    labels_test: np.ndarray, batch: int = 500, progress: bool = False
                    ) -> np.ndarray:
  """Accuracy of each stacked network on (n, H, W, C) / (n,) int: (n_seeds,) float64 (`progress`:
  a bar over the images, with its ETA: at the colab's width 1024 a pass over MNIST's test split
  takes minutes here)."""
  correct = None
  bar = tqdm(total=len(x_test), unit="img", desc="test accuracy", leave=False,
             disable=not progress, dynamic_ncols=True)
  for start in range(0, len(x_test), batch):
    xb = x_test[start:start + batch]
    pad = batch - len(xb)
    if pad:  # one compiled shape
      xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
    pred = np.asarray(jnp.argmax(predict(states, jnp.asarray(xb)), -1))[:, :batch - pad]
    hits = (pred == labels_test[start:start + batch]).sum(axis=1)
    correct = hits if correct is None else correct + hits
    bar.update(batch - pad)
  bar.close()
  return correct / len(x_test)


def is_soft(y: np.ndarray) -> bool:
  """Whether (..., n, C) labels are soft: probabilities (non-negative rows summing to 1) that are
  not all one class each (one entry above the rest, the others equal). Hard labels, one-hot or
  centred, and learned labels that are not probabilities (KIP's) are not."""
  y = np.asarray(y, np.float64)
  top = np.sum(y == y.max(-1, keepdims=True), -1) == 1
  rest = np.sum(y == y.min(-1, keepdims=True), -1) == y.shape[-1] - 1
  hard = bool(np.all(top & rest))
  return not hard and bool(np.all(y >= 0) and np.allclose(y.sum(-1), 1.0, atol=1e-4))


def train_and_evaluate(
    net: nn.Module,
    protocol: Protocol,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray | None,
    labels_test: np.ndarray | None,
    *,
    seeds: Sequence[int] = (0,),
    init_from: TrainState | None = None,
    steps: int = 0,
    lr: float = 0.0,
    lr_scale: float = 1.0,
    augment: str | None = None,
    dataset: str = "",
    eval_every: int = 0,
    workdir: str | None = None,
    checkpoint_every: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    description: str = "training",
    seed_batching: str = "auto",
    memory_bytes: float = 2**30,
    span: tuple[int, int] | None = None,
) -> TrainResult:
  """Trains one network per seed on (x_train, y_train) under `protocol`, in the one loop
  (`kip.loop.run`); returns their accuracy on the whole test split.

  Args:
    x_train: (n, H, W, C) float32 images in the set's preprocessed space, shared by all seeds,
      or (n_seeds, n, H, W, C): one set per seed (e.g. a different random subset each).
    y_train: (n, C) float32 labels as stored (centred one-hot or learned), or (n_seeds, n, C);
      `xent` protocols use their argmax, or, for soft labels (`is_soft`: probabilities, not
      one class a row), the cross-entropy against them (DATM's).
    x_test, labels_test: (n_test, H, W, C) float32 in the same space, (n_test,) int; None: no
      test evaluation (e.g. pre-training on regression targets).
    init_from: start from these trained networks (stacked over seeds, e.g. the `states` of a
      pre-training run of the same net) instead of a fresh initialisation: every parameter and
      batch statistic but the readout's (a new head, freshly initialised), fresh optimiser state.
    steps, lr, augment: overrides of the protocol (0 / None keep it).
    lr_scale: multiplies the rate, whichever it is (given, the protocol's, the NTK's).
    dataset: the tfds name of the set's dataset, for protocols whose augmentation depends on it
      (`dc`: MNIST only); '' uses the protocol's default (none for `dc`) and says so.
    eval_every: test-set evaluations along the way (0: only at the end), for the curve.
    seed_batching: `vmap`, `sequential` or `auto` (see `choose_seed_batching`).
    workdir: where the loop writes metrics.jsonl (`test_acc` per seed on evaluation steps,
      `loss` per seed every 100 steps) and checkpoints; a later call with the same workdir
      resumes (default: a temporary folder, no resume).
    memory_bytes: budget of the learning-rate estimate's Jacobian (see `max_stable_lr`).
    span: the progress bar's place in a longer job (see `kip.loop.run`).
  """
  per_seed = x_train.ndim == 5
  if per_seed and (len(x_train) != len(seeds) or len(y_train) != len(seeds)):
    raise ValueError(f"one training set per seed: got {len(x_train)} sets for {len(seeds)} seeds")
  first = x_train[0] if per_seed else x_train
  n_train = first.shape[0]
  protocol = protocol.at_size(n_train)
  schedule = resolve_schedule(protocol, n_train, steps=steps, augment=augment, dataset=dataset)
  if augment is None and not dataset and protocol.augment_by_dataset:
    log(f"protocol {protocol.name}: no dataset given, augmentation {protocol.augment or 'none'}; "
        f"pass dataset= for its per-dataset choice ({dict(protocol.augment_by_dataset)})")
  soft = protocol.loss == "xent" and is_soft(y_train)
  labels = y_train if protocol.loss != "xent" or soft else np.argmax(y_train, -1).astype(np.int32)
  x_dev, y_dev = jnp.asarray(x_train), jnp.asarray(labels)
  seed_keys = _seed_keys(seeds)

  if lr <= 0 and protocol.lr is None:
    # The colab's choice: the NTK of one initialisation, at `lr_ntk_images` training images.
    variables = net.init(jax.random.fold_in(jax.random.key(seeds[0]), 0), first[:1], train=False)
    pick = np.random.default_rng(seeds[0]).permutation(n_train)[:protocol.lr_ntk_images]
    lr = max_stable_lr(net, variables, first[np.sort(pick)], protocol.momentum, memory_bytes,
                       log=log)
    log(f"learning rate {lr:.4g} (maximum stable rate of the empirical NTK)")
  elif lr <= 0:
    lr = protocol.lr
  lr *= lr_scale
  tx = make_optimizer(protocol, lr, schedule.steps)
  seed_batching = choose_seed_batching(net, seed_batching)
  step_fn = make_train_step(net, tx, protocol.loss, schedule, n_train, per_seed, seed_batching,
                            protocol)
  predict = make_predict(net, seed_batching, protocol.center_output)

  def init(key, x_init, y_init):
    del key, x_init, y_init  # each seed's network starts from its own seed
    states = init_states(net, tx, seeds, first.shape[1:],
                         keep_init=protocol.center_output or protocol.decay_to_init)
    return states if init_from is None else _start_from(states, init_from, tx)

  def update(states, batch, key, step):
    del batch, key  # batches and augmentation come from each seed's own key, inside the step
    states, losses = step_fn(states, seed_keys, step - 1, x_dev, y_dev)
    return states, {"loss": losses}

  def test_accuracy(states) -> dict:
    acc = evaluate_states(predict, states, x_test, labels_test, progress=progress)
    return {"test_acc": [float(a) for a in acc], "test_acc_mean": float(np.mean(acc))}

  evaluators = [] if x_test is None else [Evaluator("test", test_accuracy)]
  trainer = Trainer(init, update, Data("none"), schedule_steps=schedule.steps)
  config = LoopConfig(steps=schedule.steps, eval_every=eval_every,
                      eval_at_start=eval_every > 0,
                      checkpoint_every=checkpoint_every or eval_every
                      or max(1, schedule.steps // 10), log_every=100)
  with contextlib.ExitStack() as stack:
    folder = workdir or stack.enter_context(tempfile.TemporaryDirectory())
    result = run(trainer, workdir=folder, config=config, sampler=make_sampler(Data("none"), None),
                 evaluators=evaluators, log=log, progress=progress,
                 description=description, span=span)
    records = read_metrics(os.path.join(folder, "metrics.jsonl"))
  curve = [r for r in records if "test_acc" in r]
  n_params = count_params(jax.tree_util.tree_map(lambda a: a[0], result.state.params))
  # From the run's own records, so a finished run read back reports what it measured then.
  train_time = records[-1]["train_time"] if records else result.train_time
  images = schedule.batch_size * len(seeds) * schedule.steps
  return TrainResult(np.asarray(result.evals.get("test_acc", [])), curve, float(lr),
                     schedule.steps, train_time, images / train_time if train_time else math.nan,
                     n_params, records[-1]["wall_time"] if records else result.wall_time,
                     result.state,
                     records[-1].get("cpu_time", math.nan) if records else math.nan)


def _start_from(states: TrainState, trained: TrainState, tx) -> TrainState:
  """`states` (fresh, stacked) with every parameter and batch statistic but the readout's taken
  from `trained` (stacked the same way); a fresh optimiser state."""
  def take(fresh, source):
    missing = sorted(set(fresh) - set(source) - {"readout"})
    if missing:
      raise ValueError(f"the pre-trained network lacks {', '.join(missing)}: another architecture")
    return {k: (fresh[k] if k == "readout" else source[k]) for k in fresh}

  params = take(states.params, trained.params)
  stats = take(states.batch_stats, trained.batch_stats) if states.batch_stats else {}
  opt_state = jax.vmap(tx.init)(params)
  init_params = params if states.init_params != () else ()
  return TrainState(params, stats, opt_state, init_params)


def linear_probe(f_train: np.ndarray, labels_train: np.ndarray, f_test: np.ndarray,
                 labels_test: np.ndarray, *, steps: int = 500, lr: float = 0.05,
                 l2: float = 1e-4) -> float:
  """Test accuracy of a softmax-regression classifier on frozen features: (n, d) float features
  standardised with the training statistics, full-batch Adam for `steps` steps with an L2 penalty
  (fixed settings: nothing is tuned on the test split)."""
  f_train = np.asarray(f_train, np.float32)
  mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
  x_train = jnp.asarray((f_train - mu) / sd)
  x_test = jnp.asarray((np.asarray(f_test, np.float32) - mu) / sd)
  classes = int(max(labels_train.max(), labels_test.max())) + 1
  y = jnp.asarray(labels_train)
  params = (jnp.zeros((x_train.shape[1], classes)), jnp.zeros((classes,)))
  tx = optax.adam(lr)

  def loss(params, x, y):
    logits = x @ params[0] + params[1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + l2 * jnp.sum(
        params[0] ** 2)

  @jax.jit
  def fit(params, x, y):  # the features are arguments: captured, they would be constants
    def body(_, carry):
      params, opt = carry
      updates, opt = tx.update(jax.grad(loss)(params, x, y), opt, params)
      return optax.apply_updates(params, updates), opt
    return jax.lax.fori_loop(0, steps, body, (params, tx.init(params)))[0]

  params = fit(params, x_train, y)
  pred = np.asarray(jnp.argmax(x_test @ params[0] + params[1], -1))
  return float(np.mean(pred == np.asarray(labels_test)))
