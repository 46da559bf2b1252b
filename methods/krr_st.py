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

`JOB` is the command `experiments.krr_st`: its `Config` and `PRESETS`, and `run_krr_st`, which
distils onto a teacher made by `experiments.teacher` (`methods.barlow`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import optax

from kip import cli
from kip.augment import random_crop
from kip.command import Job
from kip.data import Preprocessor
from kip.loop import Evaluator
from kip.method import Batch, Data, Method, tracing
from kip.pipeline import distill, prepare_data, selecting_loop_config
from kip.pool import PoolState, make_pool
from methods.barlow import default_teacher, load_teacher
from methods.nets import make_net

__all__ = ["KrrStState", "make_krr_st", "krr_st_loss", "pool_features", "DEFAULT_REG", "PRESETS",
           "Config", "teacher_file", "load_checked_teacher", "run_krr_st", "run", "JOB"]

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


f = cli.field

PRESETS = {
    "cpu": {"width": 32, "target_batch": 256, "steps": 2000, "max_online_updates": 100},
    "paper": {"width": 128, "target_batch": 1024, "steps": 160_000, "max_online_updates": 1000,
              "eval_every": 8000, "checkpoint_every": 1000},
}


@dataclasses.dataclass(frozen=True)
class Config(cli.RunConfig, cli.DataConfig):
  preset: str = f("cpu", "sizes: cpu (fits a 2-core CPU) or paper (the paper's, for a GPU)",
                  choices=tuple(PRESETS))
  size: int = f(100, "distilled images (no classes: the set is unlabelled)", minimum=1)
  teacher: str = f("", "teacher file (default: the one `experiments.teacher --dataset D "
                       "--preset P` makes, for this command's dataset and preset)")
  steps: int = f(2000, "outer (AdamW) steps", minimum=1)
  lr: float = f(1e-3, "outer AdamW learning rate, decaying linearly to 1e-3x", above=0)
  weight_decay: float = f(0.0, "outer AdamW weight decay", minimum=0)
  target_batch: int = f(256, "real images per step (uniform, unlabelled)", minimum=1)
  width: int = f(32, "pool ConvNets' first-block width (blocks: w, 2w, 4w)", minimum=1)
  num_models: int = f(10, "pool size", minimum=1)
  max_online_updates: int = f(100, "online SGD steps before a pool model is re-initialised",
                              minimum=2)
  reset: bool = f(True, "restart a re-initialised pool model's counter (the paper); "
                        "--no-reset: the official code's never-reset counter")
  online_lr: float = f(0.1, "pool models' SGD learning rate (momentum 0.9)", above=0)
  online_weight_decay: float = f(1e-3, "pool models' SGD weight decay", minimum=0)
  reg: float = f(DEFAULT_REG, "KRR ridge, relative to tr(K_ss) (not divided by n)", minimum=0)
  crop_pad: int = f(4, "random-crop padding of the real batch (0: no crop)", minimum=0)
  flip: bool = f(False, "random horizontal flips of the real batch (off for digits)")
  eval_every: int = f(200, "steps between validation measurements (0: at the end only)",
                      minimum=0)
  checkpoint_every: int = f(100, "steps between checkpoints (and distilled.npz updates)",
                            minimum=1)
  val_size: int = f(1000, "training images held out of distillation for the validation MSE",
                    minimum=1)


def teacher_file(config: Config) -> str:
  """`--teacher`, or the teacher `experiments.teacher` makes for the dataset and preset."""
  return config.teacher or default_teacher(config.dataset,
                                           "paper" if config.preset == "paper" else "cpu")


def load_checked_teacher(path: str, dataset: str):
  """The teacher at `path`, refused in one line if missing or trained on another dataset."""
  if not os.path.isfile(path):
    raise cli.UserError(f"no teacher at {path}: train it first with `python -m "
                        f"experiments.teacher --dataset {dataset}` (or pass --teacher FILE)")
  teacher = load_teacher(path)
  if teacher.config.get("dataset") != dataset:
    raise cli.UserError(f"{path} was trained on {teacher.config.get('dataset')}, not {dataset}")
  return teacher


def run_krr_st(config: Config, workdir: str, teacher_path: str) -> dict:
  """Runs KRR-ST as configured in `workdir`; returns the final evaluation."""
  teacher = load_checked_teacher(teacher_path, config.dataset)
  # The teacher's own standardisation (fitted on the whole training split), not one refitted on
  # what is left after holding out the validation images.
  preprocessor = Preprocessor(np.asarray(teacher.config["mean"]), np.asarray(teacher.config["std"]))
  data = prepare_data(config.dataset, preprocessor=preprocessor, data_dir=config.data_dir,
                      manual_dir=config.manual_dir, val_size=config.val_size, seed=config.seed)
  cli.log(f"{config.dataset}: {len(data.x_train)} unlabelled training images, "
          f"{len(data.x_test)} held out; teacher {teacher_path} ({teacher.dim}-d)")
  if config.size > len(data.x_train):
    raise cli.UserError(f"--size {config.size} exceeds the {len(data.x_train)} training images")
  image_shape = data.x_train.shape[1:]
  # Random real training images, no labels; their targets: the teacher's representations.
  idx = np.sort(np.random.default_rng(config.seed).choice(len(data.x_train), config.size,
                                                          replace=False))
  x_init = data.x_train[idx]
  y_init = np.asarray(teacher.features(x_init))
  black = (0.0 - data.preprocessor.mean) / data.preprocessor.std
  method = make_krr_st(
      image_shape=image_shape, teacher=teacher.apply,
      teacher_variables=jax.device_put(teacher.variables), target_dim=teacher.dim,
      steps=config.steps, width=config.width, num_models=config.num_models,
      max_online_updates=config.max_online_updates, reset=config.reset,
      online_lr=config.online_lr, online_weight_decay=config.online_weight_decay, lr=config.lr,
      weight_decay=config.weight_decay, target_batch=config.target_batch, reg=config.reg,
      crop_pad=config.crop_pad, flip=config.flip, fill=jnp.asarray(black, jnp.float32))
  y_val = jnp.asarray(teacher.features(data.x_test))
  x_val = jnp.asarray(data.x_test)
  features = pool_features(config.width, teacher.dim, image_shape)

  def validation_mse(state):
    # Averaged over every pool model (young and trained alike), so the number does not jump
    # with whichever model the next step happens to use.
    losses = []
    for i in range(config.num_models):
      pool = state.pool._replace(index=jnp.asarray(i, jnp.int32))
      loss, _ = krr_st_loss(features(pool, state.x), features(pool, x_val), state.y, y_val,
                            config.reg)
      losses.append(float(loss))
    return {"krr_validation_mse": float(np.mean(losses))}

  meta = {"method": "krr_st", "dataset": config.dataset, "kernel": "krr_st-pool",
          "seed": config.seed, "size": config.size, "teacher": teacher_path,
          "config": dataclasses.asdict(config)}
  loop_config = dataclasses.replace(
      selecting_loop_config(dataclasses.replace(config, val_size=0), ""), eval_at_start=True)
  result = distill(method, data, workdir=workdir, loop_config=loop_config, x_init=x_init,
                   y_init=y_init, meta=meta,
                   evaluators=[Evaluator("validation", validation_mse)], log=cli.log,
                   progress=config.progress)
  return result.evals | {"steps_per_s": result.steps_per_s}


def _check_teacher(config: Config) -> None:
  path = teacher_file(config)
  if not os.path.isfile(path):
    load_checked_teacher(path, config.dataset)  # the one-line error, before any workdir exists


def run(config: Config, workdir: str, devices) -> list[str]:
  del devices
  result = run_krr_st(config, workdir, teacher_file(config))
  return [f"KRR validation MSE to the teacher: {result.get('krr_validation_mse', np.nan):.5g}; "
          f"distilled set: {os.path.join(workdir, 'distilled.npz')}"]


JOB = Job("krr_st", Config, run, presets=PRESETS, folder=lambda c: [c.dataset, f"n{c.size}"],
          inputs=lambda c: {"teacher": teacher_file(c)}, check=_check_teacher)
