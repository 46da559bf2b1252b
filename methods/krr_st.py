"""KRR-ST, kernel ridge regression on self-supervised targets (Lee et al., ICLR 2024).

Self-supervised dataset distillation for transfer learning: no labels anywhere. The support set is
`n` images (initialised to random real training images) and their target representations
(initially a self-supervised teacher's representations of them, `methods.barlow`), both learned.
Each outer step takes one model of a pool of ConvNets (`kip.pool`, in inference mode), computes
features with a column of ones for the bias, `F_s` of the support images and `F_t` of a uniformly
drawn real batch after random crop (and flip, off for digits), and predicts the teacher's
representations of that augmented batch by KRR:

    pred = K_ts (K_ss + 1e-6 tr(K_ss) I)^-1 Y_s,   K = F F^T    (ridge NOT divided by n)
    loss = mean((pred - teacher(x_target))^2)                   (mean over batch and dimensions)

and takes an AdamW step (learning rate decaying linearly to 1e-3x over the run) on the images and
targets. Then that pool model takes one full-batch SGD step (lr 0.1, momentum 0.9, weight decay
1e-3) on MSE(model(x_s), Y_s), or is re-initialised once it has taken `max_online_updates` steps.
Each pool model starts trained a random number of steps in [1, max_online_updates - 1].

The paper describes a pool model restarting its count when it is re-initialised (`reset=True`,
our default). The official code never resets the counter, so after its first re-initialisation a
model is re-initialised at every visit and never trained: after about 10 x max_online_updates
outer steps the pool holds only freshly initialised networks (`reset=False` reproduces it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import optax

from kip.augment import random_crop
from kip.method import Batch, Data, Method, tracing
from kip.pool import PoolState, make_pool
from methods.nets import make_net

__all__ = ["KrrStState", "make_krr_st", "krr_st_loss", "pool_features", "DEFAULT_REG"]

DEFAULT_REG = 1e-6


class KrrStState(NamedTuple):
  """x: (n, H, W, C) support images; y: (n, D) learned target representations; opt_state:
  AdamW's over (x, y); pool: the online models (`kip.pool.PoolState`)."""

  x: jax.Array
  y: jax.Array
  opt_state: Any
  pool: PoolState


def _mse(out, y):
  return jnp.mean((out - y) ** 2)


def _with_bias(f):
  return jnp.concatenate([f, jnp.ones((f.shape[0], 1), f.dtype)], axis=1)


def krr_st_loss(f_s: jax.Array, f_t: jax.Array, y_s: jax.Array, y_t: jax.Array,
                reg: float = DEFAULT_REG) -> tuple[jax.Array, jax.Array]:
  """KRR-ST's outer loss on features (without their bias column): (n_s, d), (n_t, d), (n_s, D),
  (n_t, D) -> (loss, prediction (n_t, D)). Ridge `reg * tr(K_ss)`, not divided by n_s; the trace
  is a constant for the gradient, as the official code's `detach()`."""
  f_s, f_t = _with_bias(f_s), _with_bias(f_t)
  with jax.default_matmul_precision("highest"):
    k_ss = f_s @ f_s.T
    k_ts = f_t @ f_s.T
    ridge = reg * jax.lax.stop_gradient(jnp.trace(k_ss))
    alpha = jsl.solve(k_ss + ridge * jnp.eye(len(k_ss), dtype=k_ss.dtype), y_s, assume_a="pos")
    pred = k_ts @ alpha
  return _mse(pred, y_t), pred


def _pool_net(width: int, target_dim: int, image_shape):
  return make_net("krr_st_convnet", target_dim, width=width, norm="batch", image_shape=image_shape)


def pool_features(width: int, target_dim: int, image_shape, batch_size: int = 500):
  """(pool state, x (n, H, W, C)) -> (n, d) features of the pool's current model in inference
  mode (no bias column), in batches: what evaluators run KRR on."""
  net = _pool_net(width, target_dim, image_shape)

  @jax.jit
  def one(pool: PoolState, x):
    params = jax.tree_util.tree_map(lambda a: a[pool.index], pool.params)
    stats = jax.tree_util.tree_map(lambda a: a[pool.index], pool.stats)
    return net.apply({"params": params, "batch_stats": stats}, x, train=False, features=True)

  def features(pool: PoolState, x) -> jax.Array:
    return jnp.concatenate([one(pool, x[i:i + batch_size]) for i in range(0, len(x), batch_size)])

  return features


def make_krr_st(*, image_shape: tuple[int, int, int],
                teacher: Callable[[Any, jax.Array], jax.Array], teacher_variables: Any,
                target_dim: int, steps: int, width: int = 128, num_models: int = 10,
                max_online_updates: int = 1000, reset: bool = True, online_lr: float = 0.1,
                online_momentum: float = 0.9, online_weight_decay: float = 1e-3,
                lr: float = 1e-3, final_lr_fraction: float = 1e-3, weight_decay: float = 0.0,
                target_batch: int = 1024, reg: float = DEFAULT_REG, crop_pad: int = 4,
                flip: bool = False, fill: Any = 0.0) -> Method:
  """KRR-ST as a `kip.method.Method` on uniform unlabelled real batches of `target_batch`.

  Args:
    teacher, teacher_variables: (variables, x (n, H, W, C)) -> (n, target_dim) representations,
      pure, and its variables (passed to the compiled step as an argument, not baked into it as
      a constant).
    steps: the run's length, for the linear decay of the outer learning rate.
    width: the pool ConvNets' first-block width (w, 2w, 4w; the paper's 128), batch norm.
    num_models, max_online_updates, reset: the pool (see the module docstring).
    online_lr, online_momentum, online_weight_decay: the pool models' SGD.
    lr, final_lr_fraction, weight_decay: the outer AdamW, decaying linearly to lr x fraction.
    crop_pad, flip, fill: the real batch's augmentation: random crop with this padding (0: none),
      filled with `fill` (the preprocessed value of a black pixel), and horizontal flips.
  """
  if lr <= 0 or online_lr <= 0:
    raise ValueError("KRR-ST needs positive learning rates")
  net = _pool_net(width, target_dim, image_shape)
  online = optax.chain(optax.add_decayed_weights(online_weight_decay),
                       optax.sgd(online_lr, momentum=online_momentum))
  pool = make_pool(net, image_shape, online, loss=_mse, num_models=num_models,
                   max_updates=max_online_updates, start="random", reinit="before",
                   reset=reset)
  schedule = optax.linear_schedule(lr, lr * final_lr_fraction, max(steps, 1))
  optimizer = optax.adamw(schedule, weight_decay=weight_decay)

  def init(key: jax.Array, x_init, y_init) -> KrrStState:
    x = jnp.asarray(x_init, jnp.float32)
    y = jnp.asarray(y_init, jnp.float32)
    pool_state = pool.fresh(key)
    if not tracing(pool_state.steps):  # a resume's template needs no trained pool
      pool_state = pool.warm(pool_state, key, x, y)
    return KrrStState(x, y, optimizer.init((x, y)), pool_state)

  def outer_loss(trained, pool_state, f_t, y_target):
    x_support, y_support = trained
    return krr_st_loss(pool.features(pool_state, x_support), f_t, y_support, y_target, reg)

  @functools.partial(jax.jit, donate_argnums=0)
  def step_fn(state: KrrStState, batch: Batch, key: jax.Array, teacher_variables: Any):
    k_aug, k_pool = jax.random.split(key)
    x_target = random_crop(k_aug, batch.x, crop_pad, fill, flip) if crop_pad or flip \
        else batch.x
    y_target = jax.lax.stop_gradient(teacher(teacher_variables, x_target))
    f_t = jax.lax.stop_gradient(pool.features(state.pool, x_target))
    trained = (state.x, state.y)
    (loss, _), grads = jax.value_and_grad(outer_loss, has_aux=True)(
        trained, state.pool, f_t, y_target)
    updates, opt_state = optimizer.update(grads, state.opt_state, trained)
    x, y = optax.apply_updates(trained, updates)
    index = state.pool.index
    pool_state, online_value = pool.step(state.pool, k_pool, x, y)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "online_loss": online_value,
               "pool_index": index,
               # How far the pool is from "every model re-initialised at every visit": the
               # fraction of models whose counter has reached the limit (without reset).
               "pool_expired": jnp.mean(pool_state.steps >= max_online_updates)}
    return KrrStState(x, y, opt_state, pool_state), metrics

  def update(state: KrrStState, batch: Batch, key: jax.Array, step: jax.Array):
    del step  # the schedule counts in the optimiser state
    return step_fn(state, batch, key, teacher_variables)

  def export(state: KrrStState) -> dict[str, jax.Array]:
    return {"images": state.x, "targets": state.y}

  return Method(init, update, export, Data("unlabelled", target_batch), schedule_steps=steps)
