"""The expert stage of trajectory matching (`python -m experiments.buffer`): its settings,
presets and run. Experts are ConvNets trained on the real training split as MTT's `buffer.py`
trains them, their parameters stored after every epoch in an `ExpertStore` (methods/trajectory.py,
which has the store, the training of an expert and PAD's curriculum); `methods.mtt`,
`methods.datm` and `methods.pad` find a store by `default_buffer` and build its network by
`expert_model`.

The store's folder is named by the digest of the settings that make the experts
(`Config.expert_settings`: everything but paths, display and the number of experts), so another
command asking for other settings never shares it.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from kip import cli
from kip.augment import DSA_STRATEGY, parse_augment
from kip.command import Job
from kip.io import atomic_write
from kip.nets import NORMS, default_depth, make_net
from kip.store import digest_path
from methods.flags import PreprocessConfig, prepare_data
from methods.trajectory import (
  ExpertStore,
  StoreMismatch,
  curriculum_window,
  el2n_scores,
  epoch_plan,
  expert_steps,
  train_expert,
)

__all__ = ["Config", "PRESETS", "NOT_THE_EXPERTS", "default_buffer", "balanced_subset",
           "expert_model", "build_buffer", "run", "JOB"]

f = cli.field

PRESETS = {
    "cpu": {"experts": 4, "width": 32, "epochs": 6, "add_end_epoch": 2, "drops": "3:0.1,5:0.2"},
    "paper": {"experts": 100, "width": 128, "epochs": 50, "add_end_epoch": 20,
              "drops": "40:0.1,60:0.2"},
}
# Settings that do not change the experts (paths, display, how many to train).
NOT_THE_EXPERTS = ("workdir", "buffer", "manual_dir", "data_dir", "progress", "experts")


@dataclasses.dataclass(frozen=True)
class Config(cli.RunConfig, PreprocessConfig, cli.DataConfig):
  preset: str = f("cpu", "sizes: cpu (fits a 2-core CPU) or paper (the official CIFAR-10 "
                         "buffers)", choices=tuple(PRESETS))
  buffer: str = f("", "the expert store's folder (default: runs/buffers/<dataset>-<digest>)")
  experts: int = f(4, "experts to have in the store (finished ones are kept)", minimum=1)
  epochs: int = f(6, "epochs per expert (parameters stored after each)", minimum=1,
                   maximum=cli.EPOCH_MAXIMUM)
  width: int = f(32, "ConvNet channels", minimum=1)
  depth: int = f(0, "ConvNet blocks (0: by image size, 3 up to 32 pixels)", minimum=0)
  norm: str = f("instance", "ConvNet normalisation (MTT: instance)", choices=NORMS)
  init: str = f("standard", "the experts' weight initialisation: standard (N(0, 2 / fan_in) "
                            "weights, N(0, 0.01) biases) or torch (PyTorch's default, uniform in "
                            "+-1/sqrt(fan_in), as the official MTT, DATM and PAD code)",
                choices=("standard", "torch"))
  lr: float = f(0.01, "SGD learning rate of the experts", above=0)
  momentum: float = f(0.0, "SGD momentum (MTT: 0)", minimum=0, below=1)
  weight_decay: float = f(0.0, "weight decay (MTT: 0)", minimum=0)
  batch: int = f(256, "images per step", minimum=1)
  augment: str = f(DSA_STRATEGY, "DSA strategy drawn per image (none: off)")
  curriculum: str = f("none", "none (MTT/DATM experts) or pad (difficulty-ordered data)",
                      choices=("none", "pad"))
  init_ratio: float = f(0.75, "pad: the easiest fraction of each class at epoch 0", above=0,
                        maximum=1)
  add_end_epoch: int = f(2, "pad: the epoch by which all images are in", minimum=0)
  drops: str = f("3:0.1,5:0.2", "pad: epoch:fraction of the easiest images left out from then on")
  score_nets: int = f(2, "pad: networks averaged for the EL2N scores", minimum=1)
  score_steps: int = f(200, "pad: SGD steps of each scoring network", minimum=1)
  val_size: int = f(0, "hold out this many training images (never seen by the experts)",
                    minimum=0)
  train_size: int = f(0, "train on a class-balanced random subset of this many images (0: the "
                         "whole training split)", minimum=0)

  def __post_init__(self):
    parse_augment("" if self.augment == "none" else self.augment)
    self.drop_schedule()

  def drop_schedule(self) -> tuple[tuple[int, float], ...]:
    try:
      drops = tuple((int(e), float(x)) for e, x in
                    (item.split(":") for item in self.drops.split(",") if item.strip()))
    except ValueError:
      drops = ((-1, -1.0),)
    if any(e < 0 or not 0 <= x < 1 for e, x in drops):
      raise cli.UserError(f"--drops must be epoch:fraction pairs with fractions in [0, 1), got "
                          f"{self.drops!r}")
    return drops

  def expert_settings(self) -> dict:
    """What makes the experts: everything but paths, display and their number."""
    settings = {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_THE_EXPERTS}
    if self.init == "standard":  # stores made before `init` existed keep their folder
      settings.pop("init")
    if self.curriculum == "none":  # the curriculum's knobs do not change these experts
      for k in ("init_ratio", "add_end_epoch", "drops", "score_nets", "score_steps"):
        settings.pop(k)
    return settings

  def default_buffer(self) -> str:
    return digest_path(os.path.join("runs", "buffers"), self.dataset, self.expert_settings())


def default_buffer(dataset: str, preset: str = "cpu", **flags) -> str:
  """Where `python -m experiments.buffer --dataset <dataset> [--preset P] [flags]` keeps its
  store: the folder the distillation commands use unless told another."""
  config = Config(**(PRESETS[preset] | {"dataset": dataset, "preset": preset} | flags))
  return config.default_buffer()


def balanced_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
  """Sorted indices of `size` images, as equal a share of each class as `size` allows."""
  classes = np.unique(labels)
  rng = np.random.default_rng([seed, 7])
  per_class = [size // len(classes) + (i < size % len(classes)) for i in range(len(classes))]
  picks = [rng.choice(np.flatnonzero(labels == c), k, replace=False)
           for c, k in zip(classes, per_class, strict=True)]
  return np.sort(np.concatenate(picks))


def expert_model(settings: dict, image_shape: tuple[int, ...], num_classes: int):
  """The experts' network, from a store's settings."""
  depth = settings["depth"] or default_depth(image_shape)
  return make_net("convnet3", num_classes, width=settings["width"], depth=depth,
                  norm=settings["norm"], image_shape=image_shape, dc_padding=True,
                  parameterization=settings.get("init", "standard"))


def build_buffer(config: Config, path: str) -> dict:
  """Trains the missing experts of the store at `path`; returns a summary."""
  data = prepare_data(config.dataset, preprocess=config.preprocessing(),
                      data_dir=config.data_dir, manual_dir=config.manual_dir,
                      val_size=config.val_size, seed=config.seed)
  x, labels = data.x_train, data.labels_train
  if config.train_size:
    keep = balanced_subset(labels, config.train_size, config.seed)
    x, labels = x[keep], labels[keep]
  image_shape = x.shape[1:]
  model = expert_model(config.expert_settings(), image_shape, data.num_classes)
  template = model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False)["params"]
  num_params = int(ravel_pytree(template)[0].size)
  try:
    store = ExpertStore.create(path, config.expert_settings(), num_params, config.epochs)
  except StoreMismatch as e:
    raise cli.UserError(str(e)) from None
  cli.log(f"{config.dataset}: {len(x)} training images; ConvNet-"
          f"{config.depth or default_depth(image_shape)} width {config.width} ({num_params} "
          f"parameters); store {path}: {len(store.experts())} of {config.experts} experts")
  order = window = None
  to_train = set(range(config.experts)) - set(store.experts())
  if config.curriculum == "pad" and to_train:  # the scores order only an expert still to train
    scores_path = os.path.join(path, "difficulty.npy")
    if not os.path.exists(scores_path):
      cli.log(f"EL2N difficulty: {config.score_nets} networks x {config.score_steps} steps")
      scores = el2n_scores(model, x, labels, data.num_classes, nets=config.score_nets,
                           steps=config.score_steps, batch=config.batch, lr=config.lr * 10,
                           seed=config.seed)
      atomic_write(scores_path, scores)
    order = np.argsort(np.load(scores_path), kind="stable")  # easiest first

    def window(epoch):
      return curriculum_window(epoch, init_ratio=config.init_ratio,
                               add_end_epoch=config.add_end_epoch, drops=config.drop_schedule())
  plan = epoch_plan(labels, config.epochs, order=order, window=window)
  predict = jax.jit(lambda params, xb: jnp.argmax(model.apply({"params": params}, xb), -1))

  def test_accuracy(params) -> float:
    hits = sum(int(np.sum(np.asarray(predict(params, data.x_test[s:s + 1000]))
                          == data.labels_test[s:s + 1000]))
               for s in range(0, len(data.x_test), 1000))
    return hits / len(data.x_test)

  t0 = time.perf_counter()
  records = []
  # One progress bar over every expert still to train: its ETA is the whole store's.
  each = expert_steps(plan, config.batch)
  pending = sorted(to_train)
  if len(pending) > 1:
    cli.log_job(f"{len(pending)} experts to train, {each:,} steps each ({len(plan)} epochs)",
                len(pending) * each)
  for i, span in enumerate(bar_spans(to_train, config.experts, each)):
    records.append(train_expert(
        store, i, model, x, labels, plan=plan, batch=config.batch, lr=config.lr,
        momentum=config.momentum, weight_decay=config.weight_decay,
        augment="" if config.augment == "none" else config.augment,
        seed=config.seed * 10_000 + i, evaluate=test_accuracy, log=cli.log,
        progress=config.progress, span=span))
    acc = records[-1]["test_acc"]
    cli.log(f"expert {i}: {'' if acc is None else f'{100 * acc:.2f}% test accuracy, '}"
            f"{records[-1]['train_time']:.0f} s of training")
  accs = [r["test_acc"] for r in records if r["test_acc"] is not None]
  return {"experts": len(records), "test_acc_mean": float(np.mean(accs)) if accs else None,
          "expert_train_time": [r["train_time"] for r in records],
          "this_call_s": time.perf_counter() - t0,
          "epoch_images": [len(p) for p in plan] if to_train else None}


def bar_spans(to_train: set[int], experts: int, each: int) -> list[tuple[int, int] | None]:
  """Expert i's place on the one progress bar over the experts still to train (`kip.loop.run`'s
  `span`: the steps done before it, the bar's total), `each` steps an expert; None for an expert
  already in the store or one trained alone (its own bar)."""
  pending = sorted(to_train)
  if len(pending) < 2:
    return [None] * experts
  return [(pending.index(i) * each, len(pending) * each) if i in to_train else None
          for i in range(experts)]


def run(config: Config, workdir: str, devices) -> list[str]:
  """`experiments.buffer`: fills the store (--buffer, or its default folder); no run folder."""
  del workdir, devices
  path = config.buffer or config.default_buffer()
  cli.log(f"devices: {cli.describe_devices()}; preset {config.preset}; buffer: {path}")
  summary = build_buffer(config, path)
  acc = summary["test_acc_mean"]
  return [f"{summary['experts']} experts in {path}"
          + ("" if acc is None else f"; mean final test accuracy {100 * acc:.2f}%")]


JOB = Job("buffer", Config, run, presets=PRESETS, workdir=False)
