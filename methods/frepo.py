"""FRePo, neural feature regression with pooling (Zhou, Nezhadarya & Ba, NeurIPS 2022).

The support images and their labels are learned through kernel ridge regression on the features of
a pool of online networks: each outer step takes one pool model (in inference mode), computes
`F_s = phi(x_support)` and `F_t = phi(x_real)` for a class-balanced real batch, predicts
`K_ts (K_ss + reg * tr(K_ss)/n * I)^-1 y_s` with `K = F F^T`, and takes a LAMB step (cosine decay to
0.1x) on the support images and labels against `mean over the batch of sum_c 0.5 (pred - y)^2`.
Then that pool model takes one online step: Adam on MSE(model(x_support), y_support) over a batch
of at most 1000 support images, no augmentation; after `max_online_updates` updates it is
re-initialised. The pool's counters start staggered (0, 10, ..., 90 for 10 models and 100
updates), so re-initialisations are spread out; the model of the next step is drawn at random.

As the official code (JAX/Flax) does: labels initialised to centred one-hot / sqrt(C / 10); the
network is `methods.nets.frepo_convnet` (3 blocks conv -> ReLU -> avg-pool, widths w, 2w, 4w, batch
norm before every conv but the first during distillation, its running averages kept with flax
momentum 0.1, i.e. `0.1 old + 0.9 batch`); the real batch is not augmented (the official loop
augments only the networks that evaluate a set). `augment` adds one DSA transformation per batch
of the real images (colour, crop, cutout, scale, rotation; `kip.augment`): measured beside the
official code at the `cpu` preset it scores lower (`bench/peers/frepo/README.md`), so it is off
by default. Not reproduced: the official loss's
label-margin regulariser (off here; ANCHORS notes it), and its `best_ckpt`, which is picked on test
accuracy (our runs keep the last step, and evaluate on a validation split if asked).

`Config`, `PRESETS`, `run_frepo` and `JOB` are the job `experiments.frepo` runs. Its sizes are
written once, in `PRESETS`: the `cpu` preset's are `Config`'s defaults, the `paper` preset's are
the paper's (and the official code's), which `make_frepo`'s keyword defaults also are; the command
passes every value from its `Config`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kip import cli
from kip.augment import dsa
from kip.cli import SelectionConfig
from kip.command import Devices, Job
from kip.krr import DEFAULT_REG, accuracy, krr_predict
from kip.method import Batch, Data, Method, tracing
from kip.pipeline import (
  distill,
  held_out_split,
  initial_support,
  krr_evaluator,
  make_evaluator,
  selecting_loop_config,
)
from kip.pool import PoolState, make_pool
from methods.flags import PreprocessConfig, prepare_data
from methods.nets import FREPO_BN_MOMENTUM, make_net

__all__ = ["FrepoState", "make_frepo", "pool_features", "Config", "PRESETS", "run_frepo", "run",
           "JOB"]


class FrepoState(NamedTuple):
  """x: (n, H, W, C) support images; y: (n, C) learned labels; opt_state: LAMB's over (x, y);
  pool: the online models (`kip.pool.PoolState`)."""

  x: jax.Array
  y: jax.Array
  opt_state: Any
  pool: PoolState


def _half_sum_squares(out, y):
  return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))


def make_frepo(*, num_classes: int, image_shape: tuple[int, int, int], steps: int,
               width: int = 128, norm: str = "batch", num_models: int = 10,
               max_online_updates: int = 100, lr: float = 3e-4, final_lr_fraction: float = 0.1,
               online_lr: float = 3e-4, online_batch: int = 1000, target_batch: int = 1024,
               reg: float = DEFAULT_REG, learn_labels: bool = True, augment: str = "",
               bn_momentum: float = FREPO_BN_MOMENTUM) -> Method:
  """FRePo as a `kip.method.Method` (labelled real batches of `target_batch` images).

  The keyword defaults are the paper's values (`PRESETS["paper"]`); the command's own sizes are
  its `Config`'s.

  Args:
    steps: the run's length, for the cosine schedule of the outer LAMB.
    width: the first block's channels (w, 2w, 4w); the paper's 128.
    norm: the pool nets' normalisation during distillation (the official `batch`).
    num_models, max_online_updates: pool size and a model's online updates before it is
      re-initialised (the official 10 and 100).
    lr, final_lr_fraction: outer LAMB, cosine from lr to lr * final_lr_fraction.
    online_lr, online_batch: the pool model's Adam step and its batch of support images.
    reg: ridge, relative to tr(K_ss)/n.
    augment: DSA transformations applied to the real batch (one per step), '' for none (the
      official loop's).
    bn_momentum: the pool nets' batch-norm running-average weight (flax's; the official 0.1).
  """
  if lr <= 0 or online_lr <= 0:
    raise ValueError("FRePo needs positive learning rates")
  net = make_net("frepo_convnet", num_classes, width=width, norm=norm, image_shape=image_shape,
                 bn_momentum=bn_momentum)
  optimizer = optax.lamb(optax.cosine_decay_schedule(lr, max(steps, 1), alpha=final_lr_fraction))
  # Fresh models with staggered counters, each re-initialised right after its last update.
  pool = make_pool(net, image_shape, optax.adam(online_lr), loss=_half_sum_squares,
                   num_models=num_models, max_updates=max_online_updates, start="stagger",
                   reinit="after", online_batch=online_batch)

  def trainable(x, y):
    return (x, y) if learn_labels else (x,)

  def init(key: jax.Array, x_init, y_init) -> FrepoState:
    x = jnp.asarray(x_init, jnp.float32)
    # The official label scale: centred one-hot / sqrt(C / 10).
    y = jnp.asarray(y_init, jnp.float32) / math.sqrt(num_classes / 10)
    pool_state = pool.fresh(key)
    if not tracing(pool_state.steps):  # a resume's template needs no trained pool
      pool_state = pool.warm(pool_state, key, x, y)
    return FrepoState(x, y, optimizer.init(trainable(x, y)), pool_state)

  def outer_loss(trained, y_fixed, pool_state, x_target, y_target):
    x_support = trained[0]
    y_support = trained[1] if learn_labels else y_fixed
    with jax.default_matmul_precision("highest"):
      f_s = pool.features(pool_state, x_support)
      f_t = pool.features(pool_state, x_target)
      pred = krr_predict(f_t @ f_s.T, f_s @ f_s.T, y_support, reg)
    return _half_sum_squares(pred, y_target), pred

  @functools.partial(jax.jit, donate_argnums=0)
  def update(state: FrepoState, batch: Batch, key: jax.Array, step: jax.Array):
    del step  # the schedule counts in the optimiser state
    k_aug, k_pool = jax.random.split(key)
    i = state.pool.index
    x_target = dsa(k_aug, batch.x, augment) if augment else batch.x
    y_target = batch.y / math.sqrt(num_classes / 10)
    trained = trainable(state.x, state.y)
    (loss, pred), grads = jax.value_and_grad(outer_loss, has_aux=True)(
        trained, state.y, state.pool, x_target, y_target)
    updates, opt_state = optimizer.update(grads, state.opt_state, trained)
    trained = optax.apply_updates(trained, updates)
    x, y = trained[0], trained[1] if learn_labels else state.y
    # The pool model's online step on the (new) support set, then re-initialisation if due.
    pool_state, online_value = pool.step(state.pool, k_pool, x, y)
    metrics = {"loss": loss, "target_acc": accuracy(pred, jnp.argmax(y_target, -1)),
               "grad_norm": optax.global_norm(grads), "online_loss": online_value,
               "pool_index": i}
    return FrepoState(x, y, opt_state, pool_state), metrics

  def export(state: FrepoState) -> dict[str, jax.Array]:
    return {"images": state.x, "labels": state.y}

  return Method(init, update, export, Data("labelled", target_batch), schedule_steps=steps)


def pool_features(width: int, num_classes: int, image_shape, norm: str = "batch"):
  """(params, stats, x) -> the penultimate features of one pool model, in inference mode: what
  the outer step regresses on, and what evaluators run KRR on."""
  net = make_net("frepo_convnet", num_classes, width=width, norm=norm, image_shape=image_shape)

  @jax.jit
  def features(params, stats, x):
    return net.apply({"params": params, **({"batch_stats": stats} if stats else {})}, x,
                     train=False, features=True)

  return features


# The sizes of each preset. `cpu` is the default: `Config`'s defaults are its values.
PRESETS = {
    "cpu": {"width": 32, "target_batch": 256, "steps": 2000},
    "paper": {"width": 128, "target_batch": 1024, "steps": 500_000, "eval_every": 10_000,
              "checkpoint_every": 1000},
}
_CPU = PRESETS["cpu"]


@dataclasses.dataclass(frozen=True)
class Config(cli.RunConfig, SelectionConfig, PreprocessConfig, cli.DataConfig):
  # Runs recorded before --bn-momentum existed kept batch norm's averages at 0.9.
  RECORDED_BEFORE: ClassVar[dict] = {"bn_momentum": 0.9}

  preset: str = cli.field("cpu", "sizes: cpu (fits a 2-core CPU) or paper (the paper's, for a "
                                 "GPU)", choices=tuple(PRESETS))
  ipc: int = cli.field(10, "support images per class", minimum=1)
  steps: int = cli.field(_CPU["steps"], "outer (LAMB) steps", minimum=1)
  lr: float = cli.field(3e-4, "outer LAMB learning rate, cosine-decayed to 0.1x", above=0)
  target_batch: int = cli.field(_CPU["target_batch"], "class-balanced real images per step",
                                minimum=1)
  width: int = cli.field(_CPU["width"], "pool nets' first-block width (blocks: w, 2w, 4w)",
                         minimum=1)
  num_models: int = cli.field(10, "pool size", minimum=1)
  max_online_updates: int = cli.field(100, "online updates before a pool model is "
                                           "re-initialised", minimum=1)
  online_lr: float = cli.field(3e-4, "pool models' Adam learning rate", above=0)
  online_batch: int = cli.field(1000, "support images per online update (at most)", minimum=1)
  augment: str = cli.field("none", "DSA transformations of the real batch, one per step, e.g. "
                           "color_crop_cutout_scale_rotate (none: off, as the official loop)")
  bn_momentum: float = cli.field(FREPO_BN_MOMENTUM, "pool nets' batch-norm running average: "
                                 "new = m * old + (1 - m) * batch (the official 0.1; PyTorch's "
                                 "momentum 0.1 is 0.9 here)", minimum=0, maximum=1)
  learn_labels: bool = cli.field(True, "learn the support labels too")
  init: str = cli.field("real", "initial support images", choices=("real", "noise"))
  reg: float = cli.field(DEFAULT_REG, "KRR ridge, relative to tr(K_ss)/n_s", minimum=0)
  eval_every: int = cli.field(200, "steps between KRR evaluations on the pool features (0: at "
                                   "the end)", minimum=0)


def run_frepo(config: Config, workdir: str) -> dict:
  """Runs FRePo as configured in `workdir`; returns the final evaluation."""
  data = prepare_data(config.dataset, preprocess=config.preprocessing(), data_dir=config.data_dir,
                      manual_dir=config.manual_dir, val_size=config.val_size, seed=config.seed)
  cli.log(f"{config.dataset}: {len(data.x_train)} train, {len(data.x_test)} "
          f"{'validation' if config.val_size else 'test'} images; {data.preprocessor.name}")
  image_shape = data.x_train.shape[1:]
  x_init, y_init = initial_support(data, config.ipc, config.seed, config.init)
  augment = "" if config.augment == "none" else config.augment
  method = make_frepo(num_classes=data.num_classes, image_shape=image_shape, steps=config.steps,
                      width=config.width, num_models=config.num_models,
                      max_online_updates=config.max_online_updates, lr=config.lr,
                      online_lr=config.online_lr, online_batch=config.online_batch,
                      target_batch=config.target_batch, reg=config.reg,
                      learn_labels=config.learn_labels, augment=augment,
                      bn_momentum=config.bn_momentum)
  features = pool_features(config.width, data.num_classes, image_shape)

  def pool_kernel(params, x1, x2):
    return features(*params, x1) @ features(*params, x2).T

  def current_pool_model(state):
    pool = state.pool
    return jax.tree_util.tree_map(lambda a: a[int(pool.index)], (pool.params, pool.stats))

  split = held_out_split(config.val_size)
  pool_krr = krr_evaluator(make_evaluator(pool_kernel, data, reg=config.reg), method,
                           params=current_pool_model, name="pool_krr", prefix="krr", split=split)
  meta = {"method": "frepo", "dataset": config.dataset, "kernel": "frepo-pool",
          "seed": config.seed, "ipc": config.ipc, "config": dataclasses.asdict(config)}
  loop_config = selecting_loop_config(config, f"krr_{split}_acc")
  result = distill(method, data, workdir=workdir, loop_config=loop_config, x_init=x_init,
                   y_init=y_init, meta=meta, evaluators=[pool_krr],
                   log=cli.log, progress=config.progress)
  return result.evals | {"steps_per_s": result.steps_per_s}


def run(config: Config, workdir: str, devices: Devices) -> list[str]:
  """`experiments.frepo`'s job in `workdir`: the final KRR accuracy on the pool features."""
  del devices  # one device; the command has no device flags
  result = run_frepo(config, workdir)
  split = held_out_split(config.val_size)
  acc = result.get(f"krr_{split}_acc", np.nan)
  return [f"KRR {split} accuracy on the pool features: {100 * acc:.2f}%; distilled set: "
          f"{os.path.join(workdir, 'distilled.npz')}"]


JOB = Job("frepo", Config, run, presets=PRESETS, folder=lambda c: [c.dataset, f"ipc{c.ipc}"])
