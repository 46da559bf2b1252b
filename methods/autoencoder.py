"""Autoencoder-based unsupervised distillation, as the report that ran it on MNIST describes it.

Models (`Autoencoder`): an encoder Dense d -> 64 + ReLU, a decoder Dense 64 -> d + sigmoid (or,
`tied`, the encoder's weights transposed: `sigmoid(relu(x W + b) W^T + b_dec)`), and a linear head
64 -> classes on the code. Pixels are in [0, 1]. PyTorch's default Linear initialisation (uniform
+-1/sqrt(fan_in) for weights and biases), as the report's code.

Phase 1 (`make_autoencoder_training`): the autoencoder on real images, MSE reconstruction; Adam
with L2 weight decay added to the gradient (PyTorch's `Adam(weight_decay=...)`), early stopping on
the validation loss (the loop's selection).

Phase 2 (`make_autoencoder_distillation`): one Adam over the autoencoder, the head and N synthetic
samples D, on labelled real batches:

    L = l_cls CE(head(enc(x_real)), y) + l_gp SmoothL1(g, 0) + w_rec l_rec R(D)
        - w_div l_div mean_i ||D_i - mean(D)||^2,   R(D) = MSE(dec(enc(D)), D),  g = dR/dD,

where the penalty on g differentiates through a gradient (second order) and the weights w_rec,
w_div follow a schedule over epochs (`SCHEDULES`). The report's remedies for the samples'
homogeneity are options: `reconstruct="both"` reconstructs the real batch and D together (R over
both; g is still taken with respect to D), and `reduction="sum"` sums R, the penalty and the
diversity over elements and samples instead of averaging them.

No model is trained on D here: what D is worth is measured by `experiments.autoencoder` (a fresh
autoencoder pre-trained on D alone, then a linear probe on labelled data).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kip.method import Batch, Data, Method, Trainer

__all__ = ["Autoencoder", "SCHEDULES", "LossWeights", "AutoencoderState", "DistillState",
           "reconstruction_error", "smooth_l1", "diversity", "distillation_loss",
           "mean_pairwise_distance", "params_from_extras", "make_autoencoder_training",
           "make_autoencoder_distillation"]


def _torch_uniform(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Autoencoder(nn.Module):
  """Encoder d -> hidden (ReLU), decoder hidden -> d (sigmoid; `tied`: the encoder's kernel
  transposed plus its own bias), head hidden -> num_classes. Inputs (n, ...) are flattened."""

  dim: int
  hidden: int = 64
  num_classes: int = 10
  tied: bool = False

  def setup(self):
    self.w_enc = self.param("w_enc", _torch_uniform(self.dim), (self.dim, self.hidden))
    self.b_enc = self.param("b_enc", _torch_uniform(self.dim), (self.hidden,))
    if not self.tied:
      self.w_dec = self.param("w_dec", _torch_uniform(self.hidden), (self.hidden, self.dim))
    self.b_dec = self.param("b_dec", _torch_uniform(self.hidden), (self.dim,))
    self.w_head = self.param("w_head", _torch_uniform(self.hidden),
                             (self.hidden, self.num_classes))
    self.b_head = self.param("b_head", _torch_uniform(self.hidden), (self.num_classes,))

  def encode(self, x):
    return nn.relu(x.reshape(x.shape[0], -1) @ self.w_enc + self.b_enc)

  def decode(self, h):
    w = self.w_enc.T if self.tied else self.w_dec
    return nn.sigmoid(h @ w + self.b_dec)

  def classify(self, h):
    return h @ self.w_head + self.b_head

  def __call__(self, x):
    """(n, ...) -> (reconstruction (n, d), logits (n, num_classes))."""
    h = self.encode(x)
    return self.decode(h), self.classify(h)


# ----------------------------------------------------------------------------------------------
# Loss terms


def _reduce(x: jax.Array, reduction: str) -> jax.Array:
  if reduction == "mean":
    return jnp.mean(x)
  if reduction == "sum":
    return jnp.sum(x)
  raise ValueError(f"unknown reduction {reduction!r}; choose mean or sum")


def reconstruction_error(model: Autoencoder, params, x: jax.Array, reduction: str = "mean"):
  """The squared error of the autoencoder's reconstruction of x (n, ...) flattened, averaged (or
  summed) over every element."""
  flat = x.reshape(x.shape[0], -1)
  recon = model.apply({"params": params}, flat, method=lambda m, v: m.decode(m.encode(v)))
  return _reduce((recon - flat) ** 2, reduction)


def smooth_l1(g: jax.Array, reduction: str = "mean") -> jax.Array:
  """PyTorch's SmoothL1Loss(g, 0) with beta 1: 0.5 g^2 where |g| < 1, |g| - 0.5 elsewhere."""
  a = jnp.abs(g)
  return _reduce(jnp.where(a < 1.0, 0.5 * g * g, a - 0.5), reduction)


def diversity(d: jax.Array, reduction: str = "mean") -> jax.Array:
  """The mean (or sum) over samples of the squared distance of each flattened sample to their
  mean."""
  flat = d.reshape(d.shape[0], -1)
  return _reduce(jnp.sum((flat - flat.mean(0)) ** 2, axis=-1), reduction)


def mean_pairwise_distance(x) -> float:
  """The mean Euclidean distance between distinct samples of x (n, ...), in float64 on the host
  (direct differences: no cancellation for near-identical samples): the report's
  "homogeneity" as a number (0 when all samples are equal)."""
  flat = np.asarray(x, np.float64).reshape(len(x), -1)
  n = len(flat)
  if n < 2:
    return 0.0
  total = sum(np.linalg.norm(flat[i + 1:] - flat[i], axis=1).sum() for i in range(n - 1))
  return float(2 * total / (n * (n - 1)))


class LossWeights(NamedTuple):
  """The constant weights l_* of the four terms."""

  cls: float = 1.0
  rec: float = 5.0
  gp: float = 100.0
  div: float = 1.0


def _report_schedule(epoch):
  """The report: w_rec = min(1, (epoch + 1) / 50), w_div = min(1, (epoch + 1) / 30)."""
  return jnp.minimum(1.0, (epoch + 1) / 50), jnp.minimum(1.0, (epoch + 1) / 30)


def _code_schedule(epoch):
  """The later code: w_rec decays from 1 to 1e-3 over the first 100 epochs (geometrically: our
  reading of "1 -> 1e-3"), then stays; w_div as the report."""
  return 1e-3 ** jnp.minimum(epoch / 100, 1.0), jnp.minimum(1.0, (epoch + 1) / 30)


# name -> (the l_* weights, epoch -> (w_rec, w_div))
SCHEDULES: dict[str, tuple[LossWeights, Callable]] = {
    "report": (LossWeights(cls=1.0, rec=5.0, gp=100.0, div=1.0), _report_schedule),
    "code": (LossWeights(cls=1.0, rec=1.0, gp=100.0, div=1.0), _code_schedule),
}


def distillation_loss(model: Autoencoder, params, d: jax.Array, x: jax.Array, labels: jax.Array,
                      weights: LossWeights, w_rec, w_div, *, reconstruct: str = "synthetic",
                      reduction: str = "mean") -> tuple[jax.Array, dict]:
  """Phase 2's loss and its four terms for params, samples d (N, ...), a real batch x (n, ...)
  with integer labels (n,)."""
  if reconstruct not in ("synthetic", "both"):
    raise ValueError(f"unknown reconstruct {reconstruct!r}; choose synthetic or both")
  flat_x = x.reshape(x.shape[0], -1)

  def rec_fn(d_):
    flat_d = d_.reshape(d_.shape[0], -1)
    both = flat_d if reconstruct == "synthetic" else jnp.concatenate([flat_d, flat_x])
    return reconstruction_error(model, params, both, reduction)

  rec, g = jax.value_and_grad(rec_fn)(d)
  logits = model.apply({"params": params}, flat_x, method=lambda m, v: m.classify(m.encode(v)))
  cls = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  gp = smooth_l1(g, reduction)
  div = diversity(d, reduction)
  loss = weights.cls * cls + weights.gp * gp + w_rec * weights.rec * rec - w_div * weights.div * div
  return loss, {"cls": cls, "rec": rec, "gp": gp, "div": div,
                "train_acc": jnp.mean(jnp.argmax(logits, -1) == labels)}


def params_from_extras(extras: dict) -> dict:
  """The autoencoder's params from a saved set's `ae_<param>` extras."""
  return {k[len("ae_"):]: jnp.asarray(v) for k, v in extras.items() if k.startswith("ae_")}


# ----------------------------------------------------------------------------------------------
# Methods


class AutoencoderState(NamedTuple):
  """Phase 1: the autoencoder's params (and the head's, left at their initialisation) and Adam's
  state."""

  params: Any
  opt_state: Any


class DistillState(NamedTuple):
  """Phase 2: params of the autoencoder and head, the samples d (N, H, W, C), Adam's state over
  both."""

  params: Any
  d: jax.Array
  opt_state: Any


_HEAD = ("w_head", "b_head")


def _adam_l2(lr: float, weight_decay: float) -> optax.GradientTransformation:
  """PyTorch's Adam(lr, weight_decay): the L2 term added to the gradient before Adam."""
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr))


def make_autoencoder_training(*, image_shape: tuple[int, ...], hidden: int = 64,
                              num_classes: int = 10, tied: bool = False, batch: int = 128,
                              lr: float = 1e-3, weight_decay: float = 1e-4) -> Trainer:
  """Phase 1 as a `kip.method.Trainer` on unlabelled real batches: init(key, params=None, _)
  starts from fresh weights (or the given params), `export` returns {"params": ...}."""
  model = Autoencoder(math.prod(image_shape), hidden, num_classes, tied)
  # The head is not part of phase 1 (the report's phase 1 has none): it keeps its initialisation,
  # where Adam's L2 term alone (its loss gradient is 0) would shrink it to ~0 within an epoch.
  tx = optax.multi_transform(
      {"autoencoder": _adam_l2(lr, weight_decay), "head": optax.set_to_zero()},
      lambda params: {k: "head" if k in _HEAD else "autoencoder" for k in params})

  def init(key, params=None, y_init=None) -> AutoencoderState:
    del y_init
    if params is None:
      params = model.init(key, jnp.zeros((1, math.prod(image_shape))))["params"]
    params = jax.tree_util.tree_map(jnp.array, params)  # copies: the step donates its state
    return AutoencoderState(params, tx.init(params))

  @functools.partial(jax.jit, donate_argnums=0)
  def update(state: AutoencoderState, data: Batch, key, step):
    del key, step
    loss, grads = jax.value_and_grad(
        lambda p: reconstruction_error(model, p, data.x))(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return AutoencoderState(optax.apply_updates(state.params, updates), opt_state), {
        "loss": loss}

  return Trainer(init, update, Data("unlabelled", batch))


def make_autoencoder_distillation(*, image_shape: tuple[int, ...], params: Any,
                                  steps_per_epoch: int, hidden: int = 64, num_classes: int = 10,
                                  tied: bool = False, batch: int = 128, lr: float = 1e-4,
                                  weight_decay: float = 1e-4, schedule: str = "report",
                                  reconstruct: str = "synthetic",
                                  reduction: str = "mean", clip: bool = False) -> Method:
  """Phase 2 as a `kip.method.Method` on class-balanced labelled real batches of `batch`.

  Args:
    params: phase 1's trained params (the starting autoencoder and head).
    steps_per_epoch: steps per pass over the training split: the schedule counts epochs.
    schedule: a key of SCHEDULES (the report's weights and ramps, or the later code's).
    reconstruct, reduction: see `distillation_loss` and the module docstring.
    clip: keep the samples in [0, 1] (the pixels' range) after every step; the report does not,
      and its diversity term, unbounded, then drives the samples out of that range.
  init(key, d_init (N, H, W, C), _) starts the samples at d_init; export returns `images` (the
  samples), `targets` (the head's class probabilities for them: the samples have no labels) and
  the autoencoder and head that go with them as extras `ae_<param>` (`params_from_extras`).
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
  weights, weights_at = SCHEDULES[schedule]
  model = Autoencoder(math.prod(image_shape), hidden, num_classes, tied)
  tx = _adam_l2(lr, weight_decay)
  if reduction not in ("mean", "sum"):
    raise ValueError(f"unknown reduction {reduction!r}; choose mean or sum")
  if reconstruct not in ("synthetic", "both"):
    raise ValueError(f"unknown reconstruct {reconstruct!r}; choose synthetic or both")

  def init(key, d_init, y_init=None) -> DistillState:
    del key, y_init
    d = jnp.array(d_init, jnp.float32)  # copies: the step donates its state
    start = jax.tree_util.tree_map(jnp.array, params)
    return DistillState(start, d, tx.init((start, d)))

  @functools.partial(jax.jit, donate_argnums=0)
  def update(state: DistillState, data: Batch, key, step):
    del key
    epoch = ((step - 1) // steps_per_epoch).astype(jnp.float32)
    labels = jnp.argmax(data.y, axis=-1)

    def loss_fn(trained):
      w_rec, w_div = weights_at(epoch)
      return distillation_loss(model, *trained, data.x, labels, weights, w_rec, w_div,
                               reconstruct=reconstruct, reduction=reduction)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)((state.params, state.d))
    updates, opt_state = tx.update(grads, state.opt_state, (state.params, state.d))
    params_, d = optax.apply_updates((state.params, state.d), updates)
    if clip:
      d = jnp.clip(d, 0.0, 1.0)
    return DistillState(params_, d, opt_state), {"loss": loss, **metrics}

  def export(state: DistillState) -> dict[str, Any]:
    logits = model.apply({"params": state.params}, state.d.reshape(state.d.shape[0], -1),
                         method=lambda m, v: m.classify(m.encode(v)))
    return {"images": state.d, "targets": jax.nn.softmax(logits, -1),
            **{f"ae_{name}": value for name, value in state.params.items()}}

  return Method(init, update, export, Data("labelled", batch))
