"""KIP, Kernel Inducing Points (Nguyen et al., ICLR 2021): learn support images (and labels).

One step: on a class-balanced target batch, predict the targets by kernel ridge regression from the
support set, `pred = K_ts (K_ss + reg * tr(K_ss)/n_s * I)^-1 y_s`, and take an Adam step on the
support images (and, with `learn_labels`, the support labels) against `0.5 * mean((pred - y_t)^2)`.

`make_kip(...)` returns a `kip.method.Method`: pure functions, hyperparameters in the closure,
arrays in the state, `update` compiled once. The kernel is any `kernel_fn(params, x1, x2)`: an
analytic NTK/NNGP (no parameters), or a neural-feature / empirical-NTK kernel of a Flax net whose
parameters `kernel_init(key)` draws once and the state keeps (`kip.kernels`).
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
from kip.method import Batch, Data, Method

__all__ = ["KipState", "make_kip"]


class KipState(NamedTuple):
  """x: (n_s, H, W, C) float32 support images; y: (n_s, C) float32 labels; opt_state: Adam's;
  kernel_params: the kernel's parameters (an empty tuple for analytic kernels)."""

  x: jax.Array
  y: jax.Array
  opt_state: optax.OptState
  kernel_params: Any = ()


def make_kip(kernel_fn: Callable[[Any, jax.Array, jax.Array], jax.Array], *, lr: float = 0.04,
             learn_labels: bool = True, reg: float = DEFAULT_REG, target_batch: int = 5000,
             kernel_init: Callable[[jax.Array], Any] | None = None, mesh=None,
             dtype=jnp.float32) -> Method:
  """KIP with Adam(lr) on the support images, and on the labels when `learn_labels`.

  Args:
    kernel_fn: (params, (n1, H, W, C), (n2, H, W, C)) -> (n1, n2), differentiable in both image
      arguments; `kip.kernels.Kernel.apply`, or one sharded by `kip.sharding`.
    lr: Adam learning rate (the authors' colab: 0.04).
    learn_labels: also learn the support labels; otherwise they stay as initialised.
    reg: ridge strength relative to tr(K_ss)/n_s (the authors': 1e-6).
    target_batch: class-balanced real images per step.
    kernel_init: key -> the kernel's parameters (default: none).
    mesh: the mesh a sharded kernel computes on; the state is replicated there, as the step's
      outputs are (so the second step does not recompile, and on several hosts the state is one
      global array).
    dtype: of the support set and its optimiser state; float64 needs `jax.enable_x64()`.
  """
  if lr <= 0 or reg < 0:
    raise ValueError(f"KIP needs lr > 0 and reg >= 0, got lr {lr}, reg {reg}")
  optimizer = optax.adam(lr)

  def trainable(x, y):
    return (x, y) if learn_labels else (x,)

  def loss_fn(params, y_fixed, kernel_params, x_target, y_target):
    x_support = params[0]
    y_support = params[1] if learn_labels else y_fixed
    with jax.default_matmul_precision("highest"):
      # Two calls, not one on [x_t; x_s]: a joint call would also differentiate w.r.t. the
      # target rows, a wasted (n_t x d) gradient as large as the useful one.
      k_ts = kernel_fn(kernel_params, x_target, x_support)
      k_ss = kernel_fn(kernel_params, x_support, x_support)
      pred = krr_predict(k_ts, k_ss, y_support, reg)
    return mse_loss(pred, y_target), pred

  def init(key: jax.Array, x_init: jax.Array, y_init: jax.Array) -> KipState:
    x_init, y_init = jnp.asarray(x_init, dtype), jnp.asarray(y_init, dtype)
    kernel_params = () if kernel_init is None else kernel_init(key)
    state = KipState(x_init, y_init, optimizer.init(trainable(x_init, y_init)), kernel_params)
    if mesh is not None:
      state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    return state

  # The state is donated: the new support and Adam moments reuse its buffers in place.
  @functools.partial(jax.jit, donate_argnums=0)
  def update(state: KipState, batch: Batch, key: jax.Array, step: jax.Array):
    del key, step  # KIP's step is deterministic given the target batch
    params = trainable(state.x, state.y)
    x_target, y_target = batch.x.astype(state.x.dtype), batch.y.astype(state.x.dtype)
    (loss, pred), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, state.y, state.kernel_params, x_target, y_target)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    params = optax.apply_updates(params, updates)
    y = params[1] if learn_labels else state.y
    metrics = {"loss": loss, "target_acc": accuracy(pred, jnp.argmax(y_target, -1)),
               "grad_norm": optax.global_norm(grads)}
    return KipState(params[0], y, opt_state, state.kernel_params), metrics

  def export(state: KipState) -> dict[str, jax.Array]:
    return {"images": state.x, "labels": state.y}

  return Method(init, update, export, Data("labelled", target_batch),
                state_sharding=None if mesh is None else NamedSharding(mesh, PartitionSpec()))
