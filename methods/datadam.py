"""DataDAM, attention matching (Sajedi et al., ICCV 2023): distillation with no inner loop.

Each step draws a fresh ConvNet (its parameters frozen, in train mode: batch norm uses the batch's
statistics) and, for every class at once, passes a real batch of that class and the class's
synthetic images through it after the same DSA draw (siamese augmentation: one key per class,
shared by the real and the synthetic images). For each hidden block but the last, the spatial
attention of the block's ReLU output, `a = sum_channels |f|^p` flattened and L2-normalised per
image, is averaged over the class's images; the loss sums, over classes,

    attention_weight * sum_blocks ||mean a_real - mean a_syn||^2
      + embedding_weight * ||mean e_real - mean e_syn||^2,

where `e` is the final embedding (the flattened features the readout would see): the second term
is the MMD with a linear kernel. The synthetic images are learned by SGD with momentum; labels
stay one-hot. The official code weighs the attention by 100 and the embedding by 100 x 0.01
(lambda 0.01), uses p = 1 where the paper's hyperparameter table says p = 4, and batch norm (the
maintainers' choice; the paper's ConvNet has instance norm): `power` and `norm` keep both. With
batch norm the official code passes every class's real images through the network at once (and
every synthetic image at once), so the statistics mix the classes; `norm_groups="all"` (the
default) does the same, `"class"` normalises each class's batch apart (beside the official code
on MNIST at 1 per class, 0.91 points lower: `bench/peers/README.md`, DataDAM).

Neither the paper nor the code bounds the images, and with normalisation in the drawn network the
loss hardly sees an image's contrast: at 1 image per class with each class normalised apart
(batch norm over one image's pixels) it does not at all, so every gradient is orthogonal to the
image and SGD only ever grows it
(|x + lr g|^2 = |x|^2 + lr^2 |g|^2): DataDAM's MNIST images end at 5.7x the real ones' spread.
The ConvNets that evaluate a set normalise too, but a network that does not (an MLP) sees images
far outside the real data. `export_stats` (ours, off by default as the paper) standardises each
exported image over its pixels and gives it the real images' average per-image mean and standard
deviation: the state, and so the learning, is untouched; only the written set changes.

DM (Zhao & Bilen, WACV 2023) is the embedding term alone, with instance norm: `methods/dm.py`.

The command (`experiments.datadam`) is `JOB`: the flags DataDAM and DM share (`MatchConfig`),
DataDAM's weights (`Config`), its presets, and `run_matching`, the run both commands make with
their own maker (`make_datadam`, `methods.dm.make_dm`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kip import cli
from kip.augment import DSA_STRATEGY, dsa
from kip.cli import SelectionConfig
from kip.command import Job
from kip.method import Batch, Data, Method
from kip.nets import NORMS, default_depth, make_net
from kip.pipeline import (
  distill,
  finite_evaluator,
  held_out_split,
  initial_support,
  selecting_loop_config,
)
from methods.flags import PreprocessConfig, prepare_data

__all__ = ["MatchState", "make_matching", "make_datadam", "attention_map", "class_grouped",
           "image_stats", "standardised", "MatchConfig", "Config", "PRESETS", "run_matching",
           "report", "run", "JOB"]


class MatchState(NamedTuple):
  """x: (n, H, W, C) synthetic images, grouped by class (class 0's first); y: (n, C) their fixed
  labels; opt_state: the images' optimiser state."""

  x: jax.Array
  y: jax.Array
  opt_state: Any


def image_stats(x) -> tuple[float, float]:
  """(mean, std) of images (n, H, W, C): the average over images of each one's mean and standard
  deviation over its pixels and channels."""
  means, stds = [], []
  for i in range(0, len(x), 4096):  # in chunks: a training split in float64 would be large
    flat = np.asarray(x[i:i + 4096], np.float64).reshape(-1, int(np.prod(np.shape(x)[1:])))
    means.append(flat.mean(1))
    stds.append(flat.std(1))
  return float(np.concatenate(means).mean()), float(np.concatenate(stds).mean())


def standardised(x: jax.Array, mean: float, std: float) -> jax.Array:
  """Each image of `x` standardised over its own pixels and channels, then given `mean` and `std`
  (an image with no spread gets `mean` everywhere)."""
  flat = x.reshape(x.shape[0], -1)
  own_mean, own_std = flat.mean(-1, keepdims=True), flat.std(-1, keepdims=True)
  z = (flat - own_mean) / jnp.where(own_std > 0, own_std, 1.0)
  return (mean + std * z).reshape(x.shape)


def attention_map(f: jax.Array, power: float) -> jax.Array:
  """(n, H, W, C) activations -> (n, H*W) spatial attention sum_c |f|^p, L2-normalised per image
  (a zero map stays zero)."""
  a = jnp.sum(jnp.abs(f) ** power, axis=-1).reshape(f.shape[0], -1)
  return a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def class_grouped(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(x, y) reordered by class (stable), checked to hold the same number of images per class."""
  labels = np.argmax(np.asarray(y), axis=-1)
  counts = np.bincount(labels, minlength=y.shape[-1])
  if len(set(counts.tolist())) != 1:
    raise ValueError(f"matching needs the same number of synthetic images per class, got "
                     f"{counts.tolist()}")
  order = np.argsort(labels, kind="stable")
  return np.asarray(x)[order], np.asarray(y)[order]


def make_matching(*, num_classes: int, image_shape: tuple[int, int, int], net: str = "convnet3",
                  width: int = 128, depth: int = 3, norm: str = "batch",
                  attention_weight: float = 100.0, embedding_weight: float = 1.0,
                  power: float = 4.0, lr: float = 1.0, momentum: float = 0.5,
                  real_per_class: int = 64, augment: str = DSA_STRATEGY,
                  export_stats: tuple[float, float] | None = None,
                  norm_groups: str = "class") -> Method:
  """Attention and embedding matching as a `kip.method.Method` (labelled real batches of
  `real_per_class` images per class). See the module docstring for the loss.

  Args:
    net, width, depth, norm: the freshly drawn network (a `kip.nets` ConvNet, no extra conv).
    attention_weight: weight of the hidden blocks' attention term (0: DM, no attention).
    embedding_weight: weight of the final embedding's mean-matching (MMD) term.
    power: p of the attention |f|^p.
    lr, momentum: SGD on the synthetic images.
    augment: DSA strategy applied siamese-wise (one draw per class); "" for none.
    export_stats: (mean, std) every exported image is standardised to (None: as learned), e.g.
      `image_stats` of the real training images.
    norm_groups: the images one forward pass holds, so the images batch norm's statistics are
      taken over: `class` (each class's real batch, and its synthetic images, apart) or `all`
      (every class's real images in one pass, every synthetic image in another, as DataDAM's
      official code). Per-image norms (instance) give the same loss either way.
  """
  if norm_groups not in ("class", "all"):
    raise ValueError(f"unknown norm_groups {norm_groups!r}; choose class or all")
  if lr <= 0 or real_per_class < 1 or power <= 0:
    raise ValueError("matching needs a positive lr, power and real_per_class")
  if attention_weight < 0 or embedding_weight < 0 or attention_weight + embedding_weight == 0:
    raise ValueError("the attention and embedding weights must be >= 0, not both 0")
  model = make_net(net, num_classes, width=width, depth=depth, norm=norm,
                   image_shape=image_shape, dc_padding=True)
  optimizer = optax.sgd(lr, momentum=momentum)

  def embed(variables, x):
    """(n, H, W, C) -> (list of (n, H_l * W_l) attention maps, (n, D) embedding)."""
    out, collections = model.apply(variables, x, train=True, features=True,
                                   mutable=["intermediates", "batch_stats"])
    blocks = collections["intermediates"]
    names = sorted(blocks, key=lambda k: int(k.rsplit("_", 1)[1]))[:-1]  # all but the last
    return [attention_map(blocks[k][0], power) for k in names], out

  def class_loss(variables, key, x_real, x_syn):
    if augment:
      x_real, x_syn = dsa(key, x_real, augment), dsa(key, x_syn, augment)
    maps_real, e_real = embed(variables, x_real)
    maps_syn, e_syn = embed(variables, x_syn)
    att = jnp.zeros(())  # DM: no attention term, none computed
    if attention_weight:
      att = sum(jnp.sum((a.mean(0) - b.mean(0)) ** 2)
                for a, b in zip(maps_real, maps_syn, strict=True))
    mmd = jnp.sum((e_real.mean(0) - e_syn.mean(0)) ** 2)
    return attention_weight * att + embedding_weight * mmd, (att, mmd)

  def loss_fn(x_syn, variables, keys, x_real):
    if norm_groups == "all":
      return all_classes_loss(x_syn, variables, keys, x_real)
    per_class = jax.vmap(class_loss, in_axes=(None, 0, 0, 0))
    values, (att, mmd) = per_class(variables, keys, x_real, x_syn)
    return values.sum(), (att.sum(), mmd.sum())

  def all_classes_loss(x_syn, variables, keys, x_real):
    """The same sum over classes, from one pass of every class's real images and one of every
    synthetic image (the DSA draws still one per class)."""
    if augment:
      x_real, x_syn = jax.vmap(lambda k, r, s: (dsa(k, r, augment), dsa(k, s, augment)))(
          keys, x_real, x_syn)
    classes = x_real.shape[0]

    def class_means(a):  # (classes * n, ...) -> (classes, ...): each class's mean
      return a.reshape(classes, -1, *a.shape[1:]).mean(1)

    maps_real, e_real = embed(variables, x_real.reshape(-1, *image_shape))
    maps_syn, e_syn = embed(variables, x_syn.reshape(-1, *image_shape))
    att = jnp.zeros(())
    if attention_weight:
      att = sum(jnp.sum((class_means(a) - class_means(b)) ** 2)
                for a, b in zip(maps_real, maps_syn, strict=True))
    mmd = jnp.sum((class_means(e_real) - class_means(e_syn)) ** 2)
    return attention_weight * att + embedding_weight * mmd, (att, mmd)

  def init(key: jax.Array, x_init, y_init) -> MatchState:
    del key
    x, y = class_grouped(x_init, y_init)
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    return MatchState(x, y, optimizer.init(x))

  @functools.partial(jax.jit, donate_argnums=0)
  def update(state: MatchState, batch: Batch, key: jax.Array, step: jax.Array):
    del step
    k_net, k_aug = jax.random.split(key)
    variables = model.init(k_net, jnp.zeros((1, *image_shape)), train=False)
    order = jnp.argsort(jnp.argmax(batch.y, -1), stable=True)
    x_real = batch.x[order].reshape(num_classes, -1, *image_shape)
    x_syn = state.x.reshape(num_classes, -1, *image_shape)
    (loss, (att, mmd)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        x_syn, variables, jax.random.split(k_aug, num_classes), x_real)
    grads = grads.reshape(state.x.shape)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.x)
    x = optax.apply_updates(state.x, updates)
    metrics = {"loss": loss, "attention_loss": att, "embedding_loss": mmd,
               "grad_norm": optax.global_norm(grads),
               "image_std": jnp.std(x.reshape(x.shape[0], -1), axis=-1).mean()}
    return MatchState(x, state.y, opt_state), metrics

  def export(state: MatchState) -> dict[str, jax.Array]:
    x = state.x if export_stats is None else standardised(state.x, *export_stats)
    return {"images": x, "labels": state.y}

  return Method(init, update, export, Data("labelled", real_per_class * num_classes))


def make_datadam(*, num_classes: int, image_shape: tuple[int, int, int], lambda_mmd: float = 0.01,
                 task_balance: float = 100.0, norm_groups: str = "all", **kwargs) -> Method:
  """DataDAM with the official weighting: attention x `task_balance`, the embedding's MMD x
  `task_balance * lambda_mmd`. Other arguments: `make_matching`'s."""
  return make_matching(num_classes=num_classes, image_shape=image_shape,
                       attention_weight=task_balance, embedding_weight=task_balance * lambda_mmd,
                       norm_groups=norm_groups, **kwargs)


f = cli.field

PRESETS = {
    "cpu": {"width": 32, "real_per_class": 32, "steps": 1000, "eval_width": 32},
    "paper": {"width": 128, "real_per_class": 64, "steps": 20_000, "eval_every": 2000,
              "checkpoint_every": 500},
    "report": {"width": 128, "real_per_class": 256, "steps": 1000, "lr": 0.1},
    "report_mhist": {"width": 32, "depth": 7, "ipc": 50, "real_per_class": 128, "steps": 2000,
                     "lr": 0.1},
}


@dataclasses.dataclass(frozen=True)
class MatchConfig(cli.RunConfig, SelectionConfig, PreprocessConfig, cli.DataConfig):
  """The flags DataDAM and DM share."""

  preset: str = f("cpu", "sizes: cpu (fits a 2-core CPU), paper (the official code's) or "
                         "report / report_mhist (the seed settings of the report on MNIST / "
                         "MHIST)", choices=tuple(PRESETS))
  ipc: int = f(10, "synthetic images per class", minimum=1)
  steps: int = f(1000, "matching steps (a fresh network each)", minimum=1)
  lr: float = f(1.0, "SGD learning rate of the images", above=0)
  momentum: float = f(0.5, "SGD momentum of the images", minimum=0, below=1)
  width: int = f(32, "the drawn ConvNet's channels", minimum=1)
  depth: int = f(0, "ConvNet blocks of the matching and evaluation nets (0: by image size, 3 up "
                    "to 32 pixels, 7 for 224x224 MHIST as the report)", minimum=0)
  norm: str = f("batch", "the drawn ConvNet's normalisation (batch: the code; instance: the "
                         "paper)", choices=NORMS)
  real_per_class: int = f(32, "real images per class per step", minimum=1)
  augment: str = f(DSA_STRATEGY, "DSA transformations, one siamese draw per class (none: off)")
  init: str = f("real", "initial synthetic images", choices=("real", "noise"))
  eval_every: int = f(250, "steps between finite-net evaluations (0: at the end)", minimum=0)
  eval_steps: int = f(300, "training steps of the evaluation's ConvNet", minimum=1)
  eval_width: int = f(0, "channels of the evaluation's ConvNet (0: the dc protocol's 128)",
                      minimum=0)
  standardise: bool = f(False, "ours, not the paper's: write each image standardised to the "
                               "real training images' average per-image mean and std (the loss "
                               "hardly sees an image's contrast, so SGD inflates it; for "
                               "networks without normalisation, e.g. an MLP)")


@dataclasses.dataclass(frozen=True)
class Config(MatchConfig):
  # Runs recorded before --norm-groups existed took batch norm's statistics per class.
  RECORDED_BEFORE: ClassVar[dict] = {"norm_groups": "class"}

  power: float = f(4.0, "p of the attention sum_c |f|^p (4: the paper's table; 1: its code)",
                   above=0)
  task_balance: float = f(100.0, "weight of the attention term", minimum=0)
  lambda_mmd: float = f(0.01, "weight of the embedding (MMD) term, times --task-balance",
                        minimum=0)
  norm_groups: str = f("all", "the images batch norm's statistics are taken over: all (every "
                              "class in one pass, as the official code) or class (each class's "
                              "batch apart); instance norm: no difference",
                       choices=("class", "all"))


def run_matching(config: MatchConfig, workdir: str, method_name: str, make: Callable[..., Method],
                 **method_kwargs) -> dict:
  """Runs attention/embedding matching as configured in `workdir`; returns the last evaluation.
  `make(num_classes=, image_shape=, width=, depth=, norm=, lr=, momentum=, real_per_class=,
  augment=, export_stats=, **method_kwargs) -> Method`: `make_datadam`, or `methods.dm.make_dm`."""
  data = prepare_data(config.dataset, preprocess=config.preprocessing(), data_dir=config.data_dir,
                      manual_dir=config.manual_dir, val_size=config.val_size, seed=config.seed)
  split = held_out_split(config.val_size)
  cli.log(f"{config.dataset}: {len(data.x_train)} train, {len(data.x_test)} {split} images; "
          f"{data.preprocessor.name}")
  image_shape = data.x_train.shape[1:]
  x_init, y_init = initial_support(data, config.ipc, config.seed, config.init)
  depth = config.depth or default_depth(image_shape)
  method = make(num_classes=data.num_classes, image_shape=image_shape, width=config.width,
                depth=depth, norm=config.norm, lr=config.lr, momentum=config.momentum,
                real_per_class=config.real_per_class,
                augment="" if config.augment == "none" else config.augment,
                export_stats=image_stats(data.x_train) if config.standardise else None,
                **method_kwargs)
  finite = finite_evaluator(method, data, protocol="dc", steps=config.eval_steps,
                            seeds=(config.seed,), width=config.eval_width, depth=depth,
                            dataset=config.dataset, split=split)
  meta = {"method": method_name, "dataset": config.dataset, "seed": config.seed,
          "ipc": config.ipc, "config": dataclasses.asdict(config)}
  result = distill(method, data, workdir=workdir,
                   loop_config=selecting_loop_config(config, f"finite_{split}_acc"),
                   x_init=x_init, y_init=y_init, meta=meta, evaluators=[finite], log=cli.log,
                   progress=config.progress)
  return result.evals | {"split": split, "depth": depth}


def report(result: dict, workdir: str) -> str:
  """The command's result line: the evaluation ConvNet's accuracy and the set's file."""
  acc = result.get(f"finite_{result['split']}_acc", np.nan)
  return (f"ConvNet-{result['depth']} trained on the set ({result['split']}): "
          f"{100 * acc:.2f}%; distilled "
          f"set: {os.path.join(workdir, 'distilled.npz')}")


def run(config: Config, workdir: str, devices) -> list[str]:
  """`experiments.datadam`: DataDAM with the official weighting (`make_datadam`)."""
  del devices
  result = run_matching(config, workdir, "datadam", make=make_datadam, power=config.power,
                        task_balance=config.task_balance, lambda_mmd=config.lambda_mmd,
                        norm_groups=config.norm_groups)
  return [report(result, workdir)]


JOB = Job("datadam", Config, run, presets=PRESETS, folder=lambda c: [c.dataset, f"ipc{c.ipc}"])
