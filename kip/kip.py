"""KIP, Kernel Inducing Points (Nguyen et al., ICLR 2021): learn support images (and labels).

One step: on a class-balanced target batch, predict the targets by kernel ridge regression from the
support set, `pred = K_ts (K_ss + reg * tr(K_ss)/n_s * I)^-1 y_s`, and take an Adam step on the
support images (and, with `learn_labels`, the support labels) against `0.5 * mean((pred - y_t)^2)`.

Like every method here, `make_kip(...)` returns `Method(init, update, support)`: pure functions,
hyperparameters in the closure, arrays in the state, `update` compiled once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from kip.krr import DEFAULT_REG, accuracy, krr_predict, mse_loss

__all__ = ["Method", "KipState", "make_kip"]


class Method(NamedTuple):
  """The protocol every distiller follows (see DESIGN.md).

  init(key, x_init, y_init) -> state
  update(state, key, x_target, y_target) -> (state, metrics)   jit-compiled, pure; it may donate
      `state` (reuse its buffers), so use only the state it returns
  support(state) -> (x_support, y_support)
  """

  init: Callable[..., Any]
  update: Callable[..., tuple[Any, dict[str, jax.Array]]]
  support: Callable[[Any], tuple[jax.Array, jax.Array]]


class KipState(NamedTuple):
  """x: (n_s, H, W, C) float32 support images; y: (n_s, C) float32 labels; opt_state: Adam's."""

  x: jax.Array
  y: jax.Array
  opt_state: optax.OptState


def make_kip(kernel_fn: Callable[[jax.Array, jax.Array], jax.Array], *, lr: float = 0.04,
             learn_labels: bool = True, reg: float = DEFAULT_REG,
             dtype=jnp.float32) -> Method:
  """KIP with Adam(lr) on the support images, and on the labels when `learn_labels`.

  Args:
    kernel_fn: (n1, H, W, C), (n2, H, W, C) -> (n1, n2), differentiable in both arguments;
      one from `kip.sharding.shard_kernel` shards the step's kernel blocks across its devices.
    lr: Adam learning rate (the authors' colab: 0.04).
    learn_labels: also learn the support labels; otherwise they stay as initialised.
    reg: ridge strength relative to tr(K_ss)/n_s (the authors': 1e-6).
    dtype: of the support set and its optimiser state; float64 needs `jax.enable_x64()`.
  """
  optimizer = optax.adam(lr)
  # A kernel from `kip.sharding.shard_kernel` computes on its mesh: the state lives there too,
  # replicated, as the step's outputs do (so the second step does not recompile for new input
  # shardings, and on several hosts the state is one global array).
  mesh = getattr(kernel_fn, "mesh", None)

  def trainable(x, y):
    return (x, y) if learn_labels else (x,)

  def loss_fn(params, y_fixed, x_target, y_target):
    x_support = params[0]
    y_support = params[1] if learn_labels else y_fixed
    with jax.default_matmul_precision("highest"):
      # Two calls, not one on [x_t; x_s]: a joint call would also differentiate w.r.t. the
      # target rows, a wasted (n_t x d) gradient as large as the useful one.
      k_ts = kernel_fn(x_target, x_support)
      k_ss = kernel_fn(x_support, x_support)
      pred = krr_predict(k_ts, k_ss, y_support, reg)
    return mse_loss(pred, y_target), pred

  def init(key: jax.Array, x_init: jax.Array, y_init: jax.Array) -> KipState:
    del key  # initialisation is deterministic given the initial support set
    x_init, y_init = jnp.asarray(x_init, dtype), jnp.asarray(y_init, dtype)
    state = KipState(x_init, y_init, optimizer.init(trainable(x_init, y_init)))
    if mesh is not None:
      state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    return state

  # The state is donated: the new support and Adam moments reuse its buffers in place.
  @functools.partial(jax.jit, donate_argnums=0)
  def update(state: KipState, key: jax.Array, x_target: jax.Array, y_target: jax.Array):
    del key  # KIP's step is deterministic given the target batch
    params = trainable(state.x, state.y)
    x_target, y_target = x_target.astype(state.x.dtype), y_target.astype(state.x.dtype)
    (loss, pred), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, state.y, x_target, y_target)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    params = optax.apply_updates(params, updates)
    y = params[1] if learn_labels else state.y
    metrics = {"loss": loss, "target_acc": accuracy(pred, jnp.argmax(y_target, -1)),
               "grad_norm": optax.global_norm(grads)}
    return KipState(params[0], y, opt_state), metrics

  def support(state: KipState) -> tuple[jax.Array, jax.Array]:
    return state.x, state.y

  return Method(init, update, support)
