"""RFAD, random-feature approximation of the NNGP for dataset distillation (Loo et al.,
NeurIPS 2022).

Each step samples `num_models` ConvNets afresh (no normalisation, ReLU, average pooling, weights
N(0, 2/fan_in), biases N(0, 0.1^2): `kip.nets`' `convnet3` in standard parameterisation), takes
their flattened conv features of the support images and of a class-balanced real batch,
`Phi = concat_m phi_m / sqrt(num_models * D)`, and uses the NNGP of the readout layer,
`K = 2 Phi Phi^T + 0.01`, with jitter `5e-3 * tr(K_ss)/n`. Loss: `0.5 * mean((pred - y)^2)` of the
KRR prediction, or with `platt=True` the cross-entropy of `exp(k) * pred` against the real labels,
with a learned log-scale k (init 0, its own learning rate). Support images and labels are learned
by AdaBelief. As the official code (PyTorch) does, except: the solve runs in float32 with the
highest matmul precision (the official casts K_ss to float64; there is no float64 flag here), and
early stopping on a held-out split is left to the caller (the loop records the validation metric
each evaluation).

As the official code, a linear map of the support's pixels is learned with the images,
`x -> x_flat @ T` (T of (H W C)^2 entries, initialised to the identity, AdaBelief at
`transform_lr` 5e-5), and the mapped images are the set (so it is self-contained). The paper's
text, which could not be read here, is not known to describe it; the official code, which
produced the published figures, always learns it, and at equal compute it is worth 9 points on
MNIST at 1 image per class (`bench/peers/README.md`, RFAD). `transform_lr=0` learns the images
alone.

`Config`, `PRESETS`, `run_rfad`, `JOB` and `make_main` are the job `experiments.rfad` runs. Its
sizes are written once, in `PRESETS`: the `cpu` preset's are `Config`'s defaults, the `paper`
preset's are the paper's, which `make_rfad`'s keyword defaults also are; the command passes every
value from its `Config`.
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
from kip.cli import SelectionConfig
from kip.command import Devices, Job
from kip.krr import accuracy, krr_predict
from kip.method import Batch, Data, Method
from kip.nets import make_net
from kip.pipeline import (
  distill,
  held_out_split,
  initial_support,
  krr_evaluator,
  make_evaluator,
  selecting_loop_config,
)
from methods.flags import PreprocessConfig, prepare_data

__all__ = ["RfadState", "make_rfad", "random_features", "nngp_readout", "Config", "PRESETS",
           "run_rfad", "run", "JOB"]


class RfadState(NamedTuple):
  """x: (n, H, W, C) support images; y: (n, C) learned labels; log_scale: () Platt log-scale;
  opt_state / scale_opt_state: AdaBelief's over (x, y) and over the log-scale; transform /
  transform_opt_state: the learned (D, D) pixel map and its AdaBelief state (None when off)."""

  x: jax.Array
  y: jax.Array
  log_scale: jax.Array
  opt_state: Any
  scale_opt_state: Any
  transform: Any = None
  transform_opt_state: Any = None


def random_features(num_classes: int, image_shape, *, width: int, num_models: int,
                    chunk: int = 0, over_models: str = "auto", differentiated: bool = True):
  """(key, x) -> Phi (n, num_models * D): the flattened conv features of `num_models` ConvNets
  drawn from `key`, scaled by 1 / sqrt(num_models * D).

  With `chunk` > 0 and more than `chunk` images, the features are computed one net and `chunk`
  images at a time (a sequential map), so memory holds one net's activations of `chunk` images
  instead of every net's of all `n`: at the paper's size (5,120 target images, 8 nets of width
  256) all at once is a single 67 GB buffer. Same numbers either way.

  `over_models`: how the nets are batched. `vmap` makes one program whose convolutions are
  grouped over the nets (per-net weights): a win on accelerators, but XLA:CPU runs grouped
  convolutions 5x slower than the nets one at a time. `map` runs the nets in a compiled loop
  (`lax.map`), fast on the CPU for features that are not differentiated (a gradient through the
  loop is slow there); `unroll` writes one copy of the net per model into the program, the
  fastest gradient on the CPU. `auto`: `vmap` off the CPU; on the CPU `unroll` when the features
  are `differentiated` (the support's), else `map` (the real batch's). At the CPU preset (2 nets
  of width 32, 256 real and 10 support images) an RFAD step takes 106 CPU-ms with `vmap` and
  47 with `auto`; 190 and 93 at 100 support images (`python -m bench.cpu_paths`). Same numbers
  up to float rounding."""
  net = make_net("convnet3", num_classes, width=width, norm="none", image_shape=image_shape)
  if over_models == "auto":
    over_models = "vmap" if jax.default_backend() != "cpu" else \
        "unroll" if differentiated else "map"
  if over_models not in ("vmap", "map", "unroll"):
    raise ValueError(f"over_models must be auto, vmap, map or unroll, not {over_models!r}")

  def one(key, x):
    variables = net.init(key, jnp.zeros((1, *image_shape), x.dtype), train=False)
    return net.apply(variables, x, train=False, features=True)

  def features(key, x):
    keys = jax.random.split(key, num_models)
    n = x.shape[0]
    if chunk and n > chunk:
      pad = -n % chunk
      blocks = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
      blocks = blocks.reshape(-1, chunk, *x.shape[1:])
      per_model = jax.lax.map(
          lambda k: jax.lax.map(lambda b: one(k, b), blocks).reshape(n + pad, -1)[:n], keys)
    elif over_models == "map":
      per_model = jax.lax.map(lambda k: one(k, x), keys)
    elif over_models == "unroll":
      per_model = [one(keys[i], x) for i in range(num_models)]
    else:
      per_model = jax.vmap(one, in_axes=(0, None))(keys, x)
    d = per_model[0].shape[-1]
    return jnp.concatenate(list(per_model), axis=-1) / jnp.sqrt(num_models * d).astype(x.dtype)

  return features


def nngp_readout(phi1: jax.Array, phi2: jax.Array) -> jax.Array:
  """The readout layer's NNGP on features: 2 Phi1 Phi2^T + 0.01 (W_std^2 = 2, b_std^2 = 0.01)."""
  with jax.default_matmul_precision("highest"):
    return 2.0 * phi1 @ phi2.T + 0.01


def make_rfad(*, num_classes: int, image_shape: tuple[int, int, int], width: int = 256,
              num_models: int = 8, lr: float = 1e-3, scale_lr: float = 1e-2,
              jitter: float = 5e-3, platt: bool = False, target_batch: int = 5120,
              target_chunk: int = 1280, learn_labels: bool = True, transform_lr: float = 5e-5,
              dtype=jnp.float32) -> Method:
  """RFAD as a `kip.method.Method` (labelled real batches of `target_batch` images).

  The keyword defaults are the paper's values (`PRESETS["paper"]`); the command's own sizes are
  its `Config`'s.

  Args:
    width, num_models: channels of the random ConvNets and how many are drawn per step (the
      paper's 256 and 8).
    lr, scale_lr: AdaBelief on the support set; on the Platt log-scale.
    jitter: ridge relative to tr(K_ss)/n (the official 5e-3).
    platt: cross-entropy of the Platt-scaled prediction instead of the MSE.
    target_chunk: real images whose features are computed at once, one net at a time (the
      official code's 1,280; 0: all images and nets at once, fastest on a CPU when it fits).
    transform_lr: > 0 learns the official code's linear pixel map (identity at first) with
      AdaBelief at this rate; the support the kernel sees and the set exported are the mapped
      images (the official 5e-5). 0: no map, the images learned alone.
  """
  if lr <= 0 or scale_lr <= 0 or jitter < 0 or num_models < 1 or target_chunk < 0 or \
      transform_lr < 0:
    raise ValueError("RFAD needs positive learning rates and num_models, jitter and "
                     "target_chunk >= 0")
  features = random_features(num_classes, image_shape, width=width, num_models=num_models)
  target_features = random_features(num_classes, image_shape, width=width,
                                    num_models=num_models, chunk=target_chunk,
                                    differentiated=False)
  optimizer = optax.adabelief(lr)
  scale_optimizer = optax.adabelief(scale_lr)
  transform_optimizer = optax.adabelief(transform_lr) if transform_lr > 0 else None

  def trainable(x, y):
    return (x, y) if learn_labels else (x,)

  def init(key: jax.Array, x_init, y_init) -> RfadState:
    del key
    x, y = jnp.asarray(x_init, dtype), jnp.asarray(y_init, dtype)
    log_scale = jnp.zeros((), dtype)
    transform = transform_state = None
    if transform_optimizer is not None:
      transform = jnp.eye(math.prod(x.shape[1:]), dtype=dtype)
      transform_state = transform_optimizer.init(transform)
    return RfadState(x, y, log_scale, optimizer.init(trainable(x, y)),
                     scale_optimizer.init(log_scale), transform, transform_state)

  def mapped(x, transform):
    if transform is None:
      return x
    with jax.default_matmul_precision("highest"):
      return (x.reshape(len(x), -1) @ transform).reshape(x.shape)

  def loss_fn(trained, log_scale, transform, y_fixed, key, x_target, y_target):
    x_support = mapped(trained[0], transform)
    y_support = trained[1] if learn_labels else y_fixed
    phi_s, phi_t = features(key, x_support), target_features(key, x_target)
    pred = krr_predict(nngp_readout(phi_t, phi_s), nngp_readout(phi_s, phi_s), y_support, jitter)
    if platt:
      value = optax.softmax_cross_entropy_with_integer_labels(
          jnp.exp(log_scale) * pred, jnp.argmax(y_target, -1)).mean()
    else:
      value = 0.5 * jnp.mean((pred - y_target) ** 2)
    return value, pred

  @functools.partial(jax.jit, donate_argnums=0)
  def update(state: RfadState, batch: Batch, key: jax.Array, step: jax.Array):
    del step
    trained = trainable(state.x, state.y)
    x_target, y_target = batch.x.astype(dtype), batch.y.astype(dtype)
    (loss, pred), (grads, scale_grad, transform_grad) = jax.value_and_grad(
        loss_fn, argnums=(0, 1, 2), has_aux=True)(
        trained, state.log_scale, state.transform, state.y, key, x_target, y_target)
    updates, opt_state = optimizer.update(grads, state.opt_state, trained)
    trained = optax.apply_updates(trained, updates)
    scale_state = state.scale_opt_state
    log_scale = state.log_scale
    if platt:
      u, scale_state = scale_optimizer.update(scale_grad, scale_state, log_scale)
      log_scale = optax.apply_updates(log_scale, u)
    transform, transform_state = state.transform, state.transform_opt_state
    if transform_optimizer is not None:
      u, transform_state = transform_optimizer.update(transform_grad, transform_state, transform)
      transform = optax.apply_updates(transform, u)
    y = trained[1] if learn_labels else state.y
    metrics = {"loss": loss, "target_acc": accuracy(pred, jnp.argmax(y_target, -1)),
               "grad_norm": optax.global_norm(grads), "platt_scale": jnp.exp(log_scale)}
    return RfadState(trained[0], y, log_scale, opt_state, scale_state, transform,
                     transform_state), metrics

  def export(state: RfadState) -> dict[str, jax.Array]:
    out = {"images": mapped(state.x, state.transform), "labels": state.y}
    if platt:
      out["platt_scale"] = jnp.exp(state.log_scale)
    return out

  return Method(init, update, export, Data("labelled", target_batch))


# The sizes of each preset. `cpu` is the default: `Config`'s defaults are its values.
PRESETS = {
    "cpu": {"width": 32, "num_models": 2, "target_batch": 256, "steps": 1000, "eval_models": 4},
    "paper": {"width": 256, "num_models": 8, "target_batch": 5120, "steps": 100_000,
              "eval_models": 16, "eval_every": 40, "checkpoint_every": 1000,
              "val_size": 5000, "patience": 1000},
}
_CPU = PRESETS["cpu"]


@dataclasses.dataclass(frozen=True)
class Config(cli.RunConfig, SelectionConfig, PreprocessConfig, cli.DataConfig):
  # Runs recorded before --transform-lr existed learned no map.
  RECORDED_BEFORE: ClassVar[dict] = {"transform_lr": 0.0}

  preset: str = cli.field("cpu", "sizes: cpu (fits a 2-core CPU) or paper (the paper's, for a "
                                 "GPU)", choices=tuple(PRESETS))
  ipc: int = cli.field(10, "support images per class", minimum=1)
  steps: int = cli.field(_CPU["steps"], "AdaBelief steps", minimum=1)
  lr: float = cli.field(1e-3, "AdaBelief learning rate of the support set", above=0)
  target_batch: int = cli.field(_CPU["target_batch"], "class-balanced real images per step",
                                minimum=1)
  target_chunk: int = cli.field(1280, "real images whose features are computed at once, one "
                                      "random net at a time, bounding memory (0: all images and "
                                      "nets at once)", minimum=0)
  width: int = cli.field(_CPU["width"], "channels of the random ConvNets", minimum=1)
  num_models: int = cli.field(_CPU["num_models"], "random ConvNets drawn per step", minimum=1)
  jitter: float = cli.field(5e-3, "ridge relative to tr(K_ss)/n_s", minimum=0)
  platt: bool = cli.field(False, "Platt-scaled cross-entropy loss (learned scale) instead of MSE")
  learn_labels: bool = cli.field(True, "learn the support labels too")
  transform_lr: float = cli.field(5e-5, "AdaBelief rate of the official code's learned linear "
                                        "map of the support's pixels (identity at first; the set "
                                        "is the mapped images); 0: the images learned alone",
                                  minimum=0)
  init: str = cli.field("real", "initial support images", choices=("real", "noise"))
  eval_models: int = cli.field(_CPU["eval_models"], "random nets (fixed seed) of the KRR "
                               "evaluation", minimum=1)
  eval_every: int = cli.field(100, "steps between KRR evaluations (0: at the end)", minimum=0)


def run_rfad(config: Config, workdir: str) -> dict:
  """Runs RFAD as configured in `workdir`; returns the final evaluation."""
  data = prepare_data(config.dataset, preprocess=config.preprocessing(), data_dir=config.data_dir,
                      manual_dir=config.manual_dir,
                      val_size=config.val_size, seed=config.seed)
  split = held_out_split(config.val_size)
  cli.log(f"{config.dataset}: {len(data.x_train)} train, {len(data.x_test)} {split} images; "
          f"{data.preprocessor.name}")
  image_shape = data.x_train.shape[1:]
  x_init, y_init = initial_support(data, config.ipc, config.seed, config.init)
  method = make_rfad(num_classes=data.num_classes, image_shape=image_shape, width=config.width,
                     num_models=config.num_models, lr=config.lr, jitter=config.jitter,
                     platt=config.platt, target_batch=config.target_batch,
                     target_chunk=config.target_chunk,
                     learn_labels=config.learn_labels, transform_lr=config.transform_lr)
  eval_features = random_features(data.num_classes, image_shape, width=config.width,
                                  num_models=config.eval_models, chunk=config.target_chunk,
                                  differentiated=False)

  def eval_kernel(key, x1, x2):
    return nngp_readout(eval_features(key, x1), eval_features(key, x2))

  eval_key = jax.random.key(10_000 + config.seed)  # fixed nets for every evaluation
  rf_krr = krr_evaluator(make_evaluator(eval_kernel, data, reg=config.jitter), method,
                         params=lambda state: eval_key, name="rf_krr", prefix="rf", split=split)
  meta = {"method": "rfad", "dataset": config.dataset, "kernel": "rfad-nngp",
          "seed": config.seed, "ipc": config.ipc, "config": dataclasses.asdict(config)}
  loop_config = selecting_loop_config(config, f"rf_{split}_acc")
  result = distill(method, data, workdir=workdir, loop_config=loop_config, x_init=x_init,
                   y_init=y_init, meta=meta, evaluators=[rf_krr],
                   log=cli.log, progress=config.progress)
  return result.evals | {"steps_per_s": result.steps_per_s, "split": split}


def run(config: Config, workdir: str, devices: Devices) -> list[str]:
  """`experiments.rfad`'s job in `workdir`: the final KRR accuracy on random features."""
  del devices  # one device; the command has no device flags
  result = run_rfad(config, workdir)
  acc = result.get(f"rf_{result['split']}_acc", np.nan)
  return [f"KRR {result['split']} accuracy on random features: {100 * acc:.2f}%; "
          f"distilled set: {os.path.join(workdir, 'distilled.npz')}"]


# --target-chunk changes memory only, not the numbers: a resume may take another.
JOB = Job("rfad", Config, run, presets=PRESETS, folder=lambda c: [c.dataset, f"ipc{c.ipc}"],
          ignore=(*cli.NOT_SETTINGS, "steps", "eval_every", "target_chunk"))
