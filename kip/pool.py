"""A pool of online networks whose features a kernel method regresses on (FRePo, KRR-ST).

Each outer step of a pool method uses one pool model (in inference mode) as its feature map, then
that model takes one online step on the current support set, or is re-initialised when it has
taken `max_updates` of them; the model of the next step is drawn at random. The pool keeps models
at every stage of training, so the support set is optimised for features of young and of trained
networks alike.

    pool = make_pool(net, image_shape, optax.adam(3e-4), loss=..., num_models=10, max_updates=100)
    pool_state = pool.init(key, x_support, y_support)  # = pool.warm(pool.fresh(key), key, ...)
    f = pool.features(pool_state, x)                                  # the current model
    pool_state, online_loss = pool.step(pool_state, key, x_support, y_support)

The two methods differ in three rules, each a parameter here:

- `start`: FRePo creates fresh models with staggered counters (0, 10, ..., 90 for 10 models and
  100 updates: `stagger`); KRR-ST trains each model a random number of full-batch steps in
  [1, max_updates - 1] first and starts its counter there (`random`).
- `reinit`: FRePo re-initialises right after the update that reaches `max_updates` (`after`);
  KRR-ST checks at a visit and re-initialises instead of updating (`before`).
- `reset`: whether a re-initialised model's counter restarts at 0. The paper of KRR-ST describes a
  restart; its official code never resets, so after a model's first re-initialisation it is
  re-initialised at every visit and never trained again (`reset=False` reproduces that).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["PoolState", "Pool", "make_pool", "STARTS", "REINITS"]

STARTS = ("stagger", "random")
REINITS = ("after", "before")


class PoolState(NamedTuple):
  """params / stats / opt: every model's parameters, batch statistics and optimiser state, stacked
  on a leading (num_models,) axis; steps: (num_models,) int32 online updates since each model's
  (re-)initialisation (or, without `reset`, since the start); index: the model the next outer step
  uses."""

  params: Any
  stats: Any
  opt: Any
  steps: jax.Array
  index: jax.Array


class Pool(NamedTuple):
  """init(key, x, y) -> PoolState, ready to use: `warm(fresh(key), key, x, y)`; fresh(key) ->
  the models as initialised, with their start counters (cheap); warm(state, key, x, y) -> the
  models trained to their counters on (x, y) (the `random` start's work; nothing for `stagger`);
  features(state, x) -> (n, d) features of the current model in inference mode; step(state, key,
  x, y) -> (state, online_loss): the current model's online step (or re-initialisation), then a
  new random current model."""

  init: Callable[..., PoolState]
  features: Callable[[PoolState, jax.Array], jax.Array]
  step: Callable[..., tuple[PoolState, jax.Array]]
  fresh: Callable[[jax.Array], PoolState]
  warm: Callable[..., PoolState]


def _take(tree, i):
  return jax.tree_util.tree_map(lambda a: a[i], tree)


def _put(tree, i, value):
  return jax.tree_util.tree_map(lambda a, v: a.at[i].set(v), tree, value)


def _where(cond, a, b):
  return jax.tree_util.tree_map(lambda u, v: jnp.where(cond, u, v), a, b)


def make_pool(net: nn.Module, image_shape: tuple[int, ...], optimizer: optax.GradientTransformation,
              *, loss: Callable[[jax.Array, jax.Array], jax.Array], num_models: int,
              max_updates: int, start: str = "stagger", reinit: str = "after",
              reset: bool = True, online_batch: int = 0) -> Pool:
  """A pool of `num_models` copies of `net` (fresh initialisations), trained online.

  Args:
    net: a Flax module called as `net.apply(variables, x, train=..., features=...)`.
    image_shape: (H, W, C) of the inputs.
    optimizer: the online optimiser of every model (FRePo: Adam 3e-4; KRR-ST: SGD 0.1, momentum
      0.9, weight decay 1e-3).
    loss: (net outputs (n, D), targets (n, D)) -> scalar, the online regression loss.
    max_updates: online updates before a model is re-initialised.
    start, reinit, reset: see the module docstring.
    online_batch: support images per online update, drawn at random (0: all of them).
  """
  if start not in STARTS:
    raise ValueError(f"unknown pool start {start!r}; choose one of {', '.join(STARTS)}")
  if reinit not in REINITS:
    raise ValueError(f"unknown pool re-initialisation rule {reinit!r}; choose one of "
                     f"{', '.join(REINITS)}")
  if num_models < 1 or max_updates < 1:
    raise ValueError("a pool needs num_models and max_updates of at least 1")
  if reinit == "after" and not reset:
    raise ValueError("reset=False (a model's counter never restarts) needs reinit='before'")
  if start == "random" and max_updates < 2:
    raise ValueError("a randomly started pool needs max_updates of at least 2")

  def init_model(key):
    variables = net.init(key, jnp.zeros((1, *image_shape)), train=False)
    params = variables["params"]
    return params, variables.get("batch_stats", {}), optimizer.init(params)

  # Compiled once: called outside a compiled step (a run's first pool), a vmapped init would
  # dispatch and compile every initializer's operations one by one (seconds for a ResNet).
  init_models = jax.jit(jax.vmap(init_model))

  def online_loss(params, stats, x, y):
    if stats:
      out, updated = net.apply({"params": params, "batch_stats": stats}, x, train=True,
                               mutable=["batch_stats"])
      return loss(out, y), updated["batch_stats"]
    return loss(net.apply({"params": params}, x, train=True), y), stats

  def train_model(model, key, x, y):
    params, stats, opt = model
    n = x.shape[0]
    if 0 < online_batch < n:
      idx = jax.random.permutation(key, n)[:online_batch]
      x, y = x[idx], y[idx]
    (value, stats), grads = jax.value_and_grad(online_loss, has_aux=True)(params, stats, x, y)
    updates, opt = optimizer.update(grads, opt, params)
    return (optax.apply_updates(params, updates), stats, opt), value

  def fresh(key: jax.Array) -> PoolState:
    k_models, k_steps, _, k_index = jax.random.split(key, 4)
    params, stats, opt = init_models(jax.random.split(k_models, num_models))
    if start == "stagger":
      steps = jnp.arange(num_models, dtype=jnp.int32) * (max_updates // num_models)
    else:
      steps = jax.random.randint(k_steps, (num_models,), 1, max_updates, jnp.int32)
    index = jax.random.randint(k_index, (), 0, num_models)
    return PoolState(params, stats, opt, steps, index)

  def warm(state: PoolState, key: jax.Array, x: jax.Array, y: jax.Array) -> PoolState:
    if start == "stagger":
      return state
    k_train = jax.random.split(key, 4)[2]
    x, y = jax.lax.stop_gradient(x), jax.lax.stop_gradient(y)
    train_step = jax.jit(lambda model, key: train_model(model, key, x, y)[0])
    # A Python loop of compiled steps, one model after another: XLA:CPU runs convolutions inside
    # a compiled loop (fori_loop) or vmapped over models (grouped convolutions) several times
    # slower (bench/transfer.py measures the latter).
    keys = jax.random.split(k_train, num_models)
    trained = []
    for i, count in enumerate(np.asarray(state.steps)):
      model = _take((state.params, state.stats, state.opt), i)
      for t in range(int(count)):
        model = train_step(model, jax.random.fold_in(keys[i], t))
      trained.append(model)
    params, stats, opt = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trained)
    return state._replace(params=params, stats=stats, opt=opt)

  def init(key: jax.Array, x: jax.Array, y: jax.Array) -> PoolState:
    return warm(fresh(key), key, x, y)

  def features(state: PoolState, x: jax.Array) -> jax.Array:
    params, stats = _take(state.params, state.index), _take(state.stats, state.index)
    variables = {"params": params, **({"batch_stats": stats} if stats else {})}
    return net.apply(variables, x, train=False, features=True)

  def step(state: PoolState, key: jax.Array, x: jax.Array, y: jax.Array):
    k_train, k_reinit, k_next = jax.random.split(key, 3)
    i = state.index
    model = _take((state.params, state.stats, state.opt), i)
    count = state.steps[i]
    x, y = jax.lax.stop_gradient(x), jax.lax.stop_gradient(y)
    fresh = init_model(k_reinit)
    # The online loss reported is that of the model before its update (or re-initialisation).
    if reinit == "after":
      model, value = train_model(model, k_train, x, y)
      count = count + 1
      due = count >= max_updates
      model = _where(due, fresh, model)
      count = jnp.where(due, 0, count)
    else:
      due = count >= max_updates
      trained, value = train_model(model, k_train, x, y)
      model = _where(due, fresh, trained)
      count = jnp.where(due, 0 if reset else count, count + 1)
    params, stats, opt = model
    new = PoolState(_put(state.params, i, params), _put(state.stats, i, stats),
                    _put(state.opt, i, opt), state.steps.at[i].set(count),
                    jax.random.randint(k_next, (), 0, num_models))
    return new, value

  return Pool(init, features, step, fresh, warm)
