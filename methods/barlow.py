"""Barlow Twins (Zbontar et al., ICML 2021): the self-supervised teacher stage of KRR-ST.

A backbone (ResNet-18 with a 3x3 stem, as KRR-ST's teacher) plus a projector is trained on two
augmented views of unlabelled images so that the cross-correlation matrix of the two views'
batch-normalised projections is close to the identity:

    loss = sum_i (1 - c_ii)^2 + lambda * sum_{i != j} c_ij^2,   c = z1n^T z2n / n

(`barlow_twins_loss`; lambda 0.0051 as the official code). The backbone's output (the projector is
dropped) is the teacher's representation, KRR-ST's regression target.

The views, in pixel space ([0, 1]; images are mapped there and back with the standardisation's
mean and std), one draw per image, as the paper's augmentations (`VIEW_TRANSFORMS`):

- crop: random resized crop, area fraction in [min_scale, 1], aspect ratio in [3/4, 4/3], bilinear
  resampling back to the full size (the paper: [0.08, 1] on ImageNet; digits lose their identity
  below about a third of the image, so `min_scale` defaults to 0.3 here);
- flip: horizontal flip with probability 1/2 (off by default for digits: a mirrored 2 is no digit);
- jitter: with probability 0.8, brightness x U(0.6, 1.4) then contrast x U(0.6, 1.4) about the
  image mean (the paper's 0.4 / 0.4), clipped to [0, 1]; its saturation and hue jitter are not
  implemented (they do nothing to one-channel images);
- gray: grayscale with probability 0.2 (three-channel images only; nothing on one channel);
- blur: Gaussian blur, sigma in [0.1, 2], kernel about a tenth of the side (3 px at 28), with
  probability 1.0 in the first view and 0.1 in the second (the paper's asymmetry);
- solarize: x -> 1 - x above 0.5, with probability 0 in the first view and 0.2 in the second.

`make_barlow_twins` is the training step as a `kip.method.Trainer` (uniform unlabelled batches), so
the teacher trains, checkpoints and resumes in the one loop. A trained teacher is one file
(`save_teacher` / `load_teacher`) holding its variables and the settings that made it (paths and
display flags left out). `JOB` is the command `experiments.teacher`: its `Config` and `PRESETS`,
`train_teacher`, and `default_teacher`, the file it writes for a dataset and preset (where
`experiments.krr_st` looks for it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.ndimage import map_coordinates

from kip import cli, loop
from kip.augment import parse_strategy
from kip.command import Job
from kip.files import atomic_write
from kip.io import FileFormatError
from kip.method import Batch, Data, Trainer, make_sampler
from kip.pipeline import prepare_data
from kip.store import digest_path
from kip.train import linear_probe
from methods.nets import NETS, make_net

__all__ = ["VIEW_TRANSFORMS", "DEFAULT_VIEWS", "random_resized_crop", "two_views",
           "BarlowTwins", "barlow_twins_loss", "BarlowState", "make_barlow_twins", "Teacher",
           "save_teacher", "load_teacher", "PRESETS", "TEACHER_FILE", "Config", "default_teacher",
           "train_teacher", "run", "JOB"]

VIEW_TRANSFORMS = ("crop", "flip", "jitter", "gray", "blur", "solarize")
DEFAULT_VIEWS = "crop_jitter_blur_solarize"


def _uniform(key, n, low, high):
  return jax.random.uniform(key, (n,), minval=low, maxval=high)


def random_resized_crop(key: jax.Array, x: jax.Array, min_scale: float = 0.3,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> jax.Array:
  """(n, H, W, C) -> (n, H, W, C): per image, a random box of area fraction in [min_scale, 1] and
  aspect ratio (w/h) in `ratio`, resampled bilinearly to H x W."""
  n, h, w, c = x.shape
  k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
  area = _uniform(k_area, n, min_scale, 1.0) * h * w
  aspect = jnp.exp(_uniform(k_ratio, n, math.log(ratio[0]), math.log(ratio[1])))
  box_w = jnp.minimum(jnp.sqrt(area * aspect), w)
  box_h = jnp.minimum(jnp.sqrt(area / aspect), h)
  top = jax.random.uniform(k_top, (n,)) * (h - box_h)
  left = jax.random.uniform(k_left, (n,)) * (w - box_w)

  def one(image, top, left, box_h, box_w):
    rows = top + (jnp.arange(h) + 0.5) * box_h / h - 0.5
    cols = left + (jnp.arange(w) + 0.5) * box_w / w - 0.5
    rr, cc = jnp.meshgrid(rows, cols, indexing="ij")
    return jnp.stack([map_coordinates(image[..., k], [rr, cc], order=1, mode="nearest")
                      for k in range(c)], axis=-1)

  return jax.vmap(one)(x, top, left, box_h, box_w)


def _flip(key, x):
  flip = jax.random.bernoulli(key, 0.5, (len(x), 1, 1, 1))
  return jnp.where(flip, x[:, :, ::-1], x)


def _jitter(key, x, p=0.8, brightness=0.4, contrast=0.4):
  n = len(x)
  k_apply, k_b, k_c = jax.random.split(key, 3)
  b = _uniform(k_b, n, 1 - brightness, 1 + brightness)[:, None, None, None]
  c = _uniform(k_c, n, 1 - contrast, 1 + contrast)[:, None, None, None]
  y = jnp.clip(x * b, 0, 1)
  mean = y.mean(axis=(1, 2, 3), keepdims=True)
  y = jnp.clip((y - mean) * c + mean, 0, 1)
  return jnp.where(jax.random.bernoulli(k_apply, p, (n, 1, 1, 1)), y, x)


def _gray(key, x, p=0.2):
  if x.shape[-1] != 3:
    return x
  gray = jnp.broadcast_to(x @ jnp.array([0.299, 0.587, 0.114])[:, None], x.shape)
  return jnp.where(jax.random.bernoulli(key, p, (len(x), 1, 1, 1)), gray, x)


def _blur(key, x, p):
  n, h = x.shape[:2]
  radius = max(1, round(0.1 * h) // 2)
  k_apply, k_sigma = jax.random.split(key)
  sigma = _uniform(k_sigma, n, 0.1, 2.0)
  taps = jnp.arange(-radius, radius + 1, dtype=x.dtype)
  weights = jnp.exp(-taps[None] ** 2 / (2 * sigma[:, None] ** 2))
  weights = weights / weights.sum(1, keepdims=True)  # (n, 2r + 1)
  pad = jnp.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="reflect")
  rows = sum(weights[:, t, None, None, None] * pad[:, t:t + h] for t in range(2 * radius + 1))
  w = x.shape[2]
  y = sum(weights[:, t, None, None, None] * rows[:, :, t:t + w] for t in range(2 * radius + 1))
  return jnp.where(jax.random.bernoulli(k_apply, p, (n, 1, 1, 1)), y, x)


def _solarize(key, x, p):
  y = jnp.where(x >= 0.5, 1 - x, x)
  return jnp.where(jax.random.bernoulli(key, p, (len(x), 1, 1, 1)), y, x)


def _view(key, x, names, first: bool, min_scale: float):
  k_crop, k_flip, k_jitter, k_gray, k_blur, k_solar = jax.random.split(key, 6)
  if "crop" in names:
    x = random_resized_crop(k_crop, x, min_scale)
  if "flip" in names:
    x = _flip(k_flip, x)
  if "jitter" in names:
    x = _jitter(k_jitter, x)
  if "gray" in names:
    x = _gray(k_gray, x)
  if "blur" in names:
    x = _blur(k_blur, x, 1.0 if first else 0.1)
  if "solarize" in names and not first:
    x = _solarize(k_solar, x, 0.2)
  return x


def two_views(key: jax.Array, x: jax.Array, strategy: str = DEFAULT_VIEWS, *,
              min_scale: float = 0.3) -> tuple[jax.Array, jax.Array]:
  """(n, H, W, C) images in [0, 1] -> two independently augmented views (the second with the
  paper's weaker blur and its solarisation); `strategy` names `VIEW_TRANSFORMS` joined by '_'."""
  names = parse_strategy(strategy, VIEW_TRANSFORMS, "view augmentation")
  k1, k2 = jax.random.split(key)
  return _view(k1, x, names, True, min_scale), _view(k2, x, names, False, min_scale)


class BarlowTwins(nn.Module):
  """A backbone (`kip.nets` name `net` and width, batch norm) and the projector: for each of
  `projector` but the last, Dense (no bias) -> BatchNorm -> ReLU, then a last Dense (no bias).
  `features=True` returns the backbone's output (the teacher's representation)."""

  net: str = "resnet18"
  width: int = 64
  projector: Sequence[int] = (2048, 2048, 2048)

  def setup(self):
    self.backbone = make_net(self.net, 1, width=self.width, norm="batch")
    self.hidden = [nn.Dense(d, use_bias=False) for d in self.projector[:-1]]
    self.norms = [nn.BatchNorm(momentum=0.9, epsilon=1e-5) for _ in self.projector[:-1]]
    self.out = nn.Dense(self.projector[-1], use_bias=False)

  def __call__(self, x: jax.Array, train: bool = False, features: bool = False) -> jax.Array:
    h = self.backbone(x, train=train, features=True)
    if features:
      return h
    for dense, norm in zip(self.hidden, self.norms, strict=True):
      h = nn.relu(norm(dense(h), use_running_average=not train))
    return self.out(h)


def barlow_twins_loss(z1: jax.Array, z2: jax.Array, lambd: float = 0.0051) -> jax.Array:
  """(n, D), (n, D) projections of two views -> Barlow Twins' loss: each dimension standardised
  over the batch (biased variance, eps 1e-5, as batch norm without affine), c = z1n^T z2n / n,
  sum_i (1 - c_ii)^2 + lambd * sum_{i != j} c_ij^2."""

  def standardise(z):
    return (z - z.mean(0)) / jnp.sqrt(z.var(0) + 1e-5)

  with jax.default_matmul_precision("highest"):
    c = standardise(z1).T @ standardise(z2) / z1.shape[0]
  on_diagonal = jnp.sum((1 - jnp.diagonal(c)) ** 2)
  off_diagonal = jnp.sum(c**2) - jnp.sum(jnp.diagonal(c) ** 2)
  return on_diagonal + lambd * off_diagonal


class BarlowState(NamedTuple):
  """params / batch_stats of the `BarlowTwins` model; opt_state: the optimiser's."""

  params: Any
  batch_stats: Any
  opt_state: Any


def make_barlow_twins(*, image_shape: tuple[int, int, int], mean: np.ndarray, std: np.ndarray,
                      steps: int, batch: int = 256, backbone: str = "resnet18", width: int = 64,
                      projector: Sequence[int] = (2048, 2048, 2048), lambd: float = 0.0051,
                      optimizer: str = "lars", lr: float = 0.2, weight_decay: float = 1.5e-6,
                      warmup_steps: int = 0, views: str = DEFAULT_VIEWS,
                      min_scale: float = 0.3) -> tuple[Trainer, BarlowTwins]:
  """Barlow Twins training as a `kip.method.Trainer` on uniform unlabelled batches of `batch`
  standardised images (`mean`, `std`: the standardisation's per-channel (C,) statistics, to
  augment in pixel space). Returns (method, model).

  Args:
    steps: the run's length, for the learning-rate schedule: linear warm-up over
      `warmup_steps`, then cosine decay to 0.
    optimizer: `lars` (the paper's, trust ratio 0.001, momentum 0.9; biases and norms excluded
      from the adaptation and the decay) or `adamw`.
  """
  parse_strategy(views, VIEW_TRANSFORMS, "view augmentation")
  model = BarlowTwins(backbone, width, tuple(projector))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, max(warmup_steps, 1), max(steps, warmup_steps + 1), end_value=0.0)
  if optimizer == "lars":
    def matrices(params):
      return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)
    tx = optax.lars(schedule, weight_decay=weight_decay, weight_decay_mask=matrices,
                    trust_ratio_mask=matrices, momentum=0.9)
  elif optimizer == "adamw":
    tx = optax.adamw(schedule, weight_decay=weight_decay)
  else:
    raise ValueError(f"unknown optimizer {optimizer!r}; choose lars or adamw")
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)

  @jax.jit  # one program: op by op, a ResNet-18's initialisation dispatches hundreds of ops
  def initial_state(key: jax.Array) -> BarlowState:
    variables = model.init(key, jnp.zeros((2, *image_shape)), train=False)
    return BarlowState(variables["params"], variables["batch_stats"],
                       tx.init(variables["params"]))

  def init(key: jax.Array, x_init=None, y_init=None) -> BarlowState:
    del x_init, y_init
    return initial_state(key)

  def loss_fn(params, batch_stats, v1, v2):
    z1, updated = model.apply({"params": params, "batch_stats": batch_stats}, v1, train=True,
                              mutable=["batch_stats"])
    z2, updated = model.apply({"params": params, "batch_stats": updated["batch_stats"]}, v2,
                              train=True, mutable=["batch_stats"])
    return barlow_twins_loss(z1, z2, lambd), updated["batch_stats"]

  @jax.jit
  def update(state: BarlowState, data: Batch, key: jax.Array, step: jax.Array):
    del step  # the schedule counts in the optimiser state
    pixels = jnp.clip(data.x * std + mean, 0, 1)
    v1, v2 = two_views(key, pixels, views, min_scale=min_scale)
    v1, v2 = (v1 - mean) / std, (v2 - mean) / std
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, v1, v2)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return BarlowState(params, batch_stats, opt_state), {
        "loss": loss, "grad_norm": optax.global_norm(grads)}

  return Trainer(init, update, Data("unlabelled", batch), schedule_steps=steps), model


class Teacher(NamedTuple):
  """A trained teacher: `features(x)` maps (n, H, W, C) standardised images to (n, dim)
  representations (batched, jitted); `apply(variables, x)` is the same, pure, for use inside a
  jitted step; `config` holds the settings it was trained with."""

  features: Callable[[Any], jax.Array]
  apply: Callable[[Any, jax.Array], jax.Array]
  dim: int
  config: dict
  variables: Any


def save_teacher(path: str, state: BarlowState, config: dict) -> None:
  """Writes the teacher's variables and its config to one file, atomically."""
  payload = {"config": json.dumps(config, sort_keys=True),
             "variables": {"params": jax.device_get(state.params),
                           "batch_stats": jax.device_get(state.batch_stats)}}
  atomic_write(path, flax.serialization.msgpack_serialize(payload))


def load_teacher(path: str, batch_size: int = 1000) -> Teacher:
  """Reads a file written by `save_teacher`; its `config` must name the backbone, width,
  projector (`backbone`, `width`, `projector` as 'a-b-c') and `image_shape` (H, W, C)."""
  try:
    with open(path, "rb") as f:
      payload = flax.serialization.msgpack_restore(f.read())
    config = json.loads(payload["config"])
    variables = payload["variables"]
    model = BarlowTwins(config["backbone"], int(config["width"]),
                        tuple(int(d) for d in str(config["projector"]).split("-")))
    dim = _feature_dim(model, variables, config)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise FileFormatError(f"{path} is not a teacher written by experiments.teacher ({e})") from e

  def apply(variables, x):
    return model.apply(variables, x, train=False, features=True)

  jitted = jax.jit(apply)

  def features(x) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    return jnp.concatenate([jitted(variables, x[i:i + batch_size])
                            for i in range(0, len(x), batch_size)])

  return Teacher(features, apply, dim, config, variables)


def _feature_dim(model, variables, config) -> int:
  shape = tuple(config["image_shape"])
  out = jax.eval_shape(lambda x: model.apply(variables, x, features=True),
                       jax.ShapeDtypeStruct((1, *shape), jnp.float32))
  return int(out.shape[-1])


f = cli.field

PRESETS = {
    "cpu": {"width": 16, "projector": "512-512-512", "optimizer": "adamw", "lr": 2e-3,
            "weight_decay": 1e-4, "epochs": 3.0, "warmup_epochs": 0.2},
    "paper": {"width": 64, "projector": "2048-2048-2048", "optimizer": "lars", "lr": 0.3,
              "weight_decay": 1e-4, "epochs": 1000.0, "warmup_epochs": 10.0,
              "checkpoint_every": 2000},
}
TEACHER_FILE = "teacher.msgpack"
# Settings that do not change the teacher (paths, display, resources, cadence).
_NOT_THE_TEACHER = (*cli.NOT_SETTINGS, "checkpoint_every")


@dataclasses.dataclass(frozen=True)
class Config(cli.RunConfig, cli.DataConfig):
  preset: str = f("cpu", "sizes: cpu (fits a 2-core CPU) or paper (a CIFAR-size recipe, GPU)",
                  choices=tuple(PRESETS))
  backbone: str = f("resnet18", "backbone network (its pooled features are the teacher's "
                                "representation)", choices=NETS)
  width: int = f(16, "backbone width (ResNet-18: the first stage's channels)", minimum=1)
  projector: str = f("512-512-512", "projector layer sizes, joined by '-'")
  lambd: float = f(0.0051, "Barlow Twins' off-diagonal weight lambda", minimum=0)
  batch: int = f(256, "images per step (each in two views)", minimum=2)
  epochs: float = f(3.0, "passes over the training split", above=0,
                    maximum=cli.EPOCH_MAXIMUM)
  optimizer: str = f("adamw", "lars (the paper's) or adamw", choices=("lars", "adamw"))
  lr: float = f(2e-3, "peak learning rate (linear warm-up, then cosine to 0)", above=0)
  weight_decay: float = f(1e-4, "weight decay (LARS: weights only)", minimum=0)
  warmup_epochs: float = f(0.2, "epochs of linear learning-rate warm-up", minimum=0,
                           maximum=cli.EPOCH_MAXIMUM)
  views: str = f(DEFAULT_VIEWS, "view augmentations joined by '_' among crop, flip, jitter, "
                 "gray, blur, solarize (no flip for digits)")
  min_scale: float = f(0.3, "smallest area fraction of a random resized crop", above=0,
                       maximum=1)
  probe_steps: int = f(500, "full-batch steps of the final linear probe (0: no probe)",
                       minimum=0)
  checkpoint_every: int = f(200, "steps between checkpoints (and teacher.msgpack updates)",
                            minimum=1)

  def __post_init__(self):
    try:
      dims = [int(d) for d in self.projector.split("-")]
    except ValueError:
      dims = []
    if not dims or min(dims) < 1:
      raise cli.UserError(f"--projector must be positive sizes joined by '-', got "
                          f"{self.projector!r}")

  def teacher_settings(self) -> dict:
    """The settings that define the teacher (everything but paths, display and cadence)."""
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_THE_TEACHER}

  def default_workdir(self) -> str:
    return digest_path(os.path.join("runs", "teachers"), self.dataset, self.teacher_settings())


def default_teacher(dataset: str, preset: str = "cpu") -> str:
  """Where `python -m experiments.teacher --dataset <dataset> [--preset paper]` saves its
  teacher: the file `experiments.krr_st` uses unless told another."""
  config = Config(**(PRESETS[preset] | {"dataset": dataset, "preset": preset}))
  return os.path.join(config.default_workdir(), TEACHER_FILE)


def train_teacher(config: Config, workdir: str) -> dict:
  """Trains (or resumes) the teacher in `workdir`; returns its final metrics."""
  data = prepare_data(config.dataset, preprocess="standard", data_dir=config.data_dir,
                      manual_dir=config.manual_dir)
  image_shape = data.x_train.shape[1:]
  steps = math.ceil(config.epochs * len(data.x_train) / config.batch)
  cli.log(f"{config.dataset}: {len(data.x_train)} unlabelled training images; {steps} steps of "
          f"{config.batch}")
  method, _ = make_barlow_twins(
      image_shape=image_shape, mean=data.preprocessor.mean, std=data.preprocessor.std,
      steps=steps, batch=config.batch, backbone=config.backbone, width=config.width,
      projector=[int(d) for d in config.projector.split("-")], lambd=config.lambd,
      optimizer=config.optimizer, lr=config.lr, weight_decay=config.weight_decay,
      warmup_steps=round(config.warmup_epochs * len(data.x_train) / config.batch),
      views=config.views, min_scale=config.min_scale)
  # Only what makes the teacher: paths and display flags would change the file's bytes (and so
  # its digest in the runs made from it) each time a finished run is resumed from elsewhere.
  record = config.teacher_settings() | {"image_shape": list(image_shape),
                                         "preprocessing": "standardize",
                                         "mean": data.preprocessor.mean.tolist(),
                                         "std": data.preprocessor.std.tolist()}
  path = os.path.join(workdir, TEACHER_FILE)

  def save(state, step):
    save_teacher(path, state, record | {"step": step, "steps": steps})

  def probe(state):
    save(state, steps)
    teacher = load_teacher(path)
    acc = linear_probe(teacher.features(data.x_train), data.labels_train,
                       teacher.features(data.x_test), data.labels_test,
                       steps=config.probe_steps)
    return {"probe_test_acc": acc}

  evaluators = [loop.Evaluator("linear_probe", probe, 0)] if config.probe_steps else []
  loop_config = loop.LoopConfig(steps=steps, eval_every=0,
                                checkpoint_every=config.checkpoint_every, seed=config.seed,
                                log_every=10)
  sampler = make_sampler(method.data, data.x_train, seed=config.seed)
  result = loop.run(method, workdir=workdir, config=loop_config, sampler=sampler,
                    evaluators=evaluators, save=save, log=cli.log, progress=config.progress,
                    description="training the teacher")
  return result.evals | {"steps_per_s": result.steps_per_s}


def run(config: Config, workdir: str, devices) -> list[str]:
  """The teacher job: the training, and the report line."""
  del devices
  result = train_teacher(config, workdir)
  acc = result.get("probe_test_acc")
  probe = f"linear-probe test accuracy {100 * acc:.2f}%; " if acc is not None else ""
  return [f"{probe}teacher: {os.path.join(workdir, TEACHER_FILE)}"]


# The folder is named by the teacher's settings (where `experiments.krr_st` looks for it), and
# anything that is not the teacher (paths, display, cadences) may change on resume.
JOB = Job("teacher", Config, run, presets=PRESETS, folder=lambda c: [c.dataset],
          ignore=_NOT_THE_TEACHER, default_workdir=lambda c: c.default_workdir())
