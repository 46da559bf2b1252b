"""Autoencoder-based unsupervised distillation, as the report that ran it on MNIST describes it.

Models (`Autoencoder`): an encoder Dense d -> 64 + ReLU, a decoder Dense 64 -> d + sigmoid (or,
`tied`, the encoder's weights transposed: `sigmoid(relu(x W + b) W^T + b_dec)`), and a linear head
64 -> classes on the code. Pixels are in [0, 1]. PyTorch's default Linear initialisation (uniform
+-1/sqrt(fan_in) for weights and biases), as the report's code.

Phase 1 (`make_autoencoder_training`): the autoencoder on real images, MSE reconstruction; Adam
with L2 weight decay added to the gradient (PyTorch's `Adam(weight_decay=...)`), early stopping on
the validation loss (the loop's selection).

Phase 2 (`make_autoencoder_distillation`): one Adam over the autoencoder, the head and N synthetic
samples D, on labelled real batches:

    L = l_cls CE(head(enc(x_real)), y) + l_gp SmoothL1(g, 0) + w_rec l_rec R(D)
        - w_div l_div mean_i ||D_i - mean(D)||^2,   R(D) = MSE(dec(enc(D)), D),  g = dR/dD,

where the penalty on g differentiates through a gradient (second order) and the weights w_rec,
w_div follow a schedule over epochs (`SCHEDULES`). The report's remedies for the samples'
homogeneity are options: `reconstruct="both"` reconstructs the real batch and D together (R over
both; g is still taken with respect to D), and `reduction="sum"` sums R, the penalty and the
diversity over elements and samples instead of averaging them.

No model is trained on D in phase 2: what D is worth is measured after it (`worth`, phase 3 of
`experiments.autoencoder`: a fresh autoencoder pre-trained on D alone, then a linear probe on
labelled data). `JOB` is that command: its `Config` and `PRESETS`, the phases (`train_autoencoder`,
`distil`), `worth` and the pictures (`draw`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kip import cli, loop, pipeline
from kip.command import Job
from kip.data import Preprocessor, centered_one_hot, load_dataset
from kip.io import atomic_write, load_distilled, write_json
from kip.loop import Evaluator, LoopConfig, read_metrics
from kip.method import Batch, Data, Method, Trainer, make_sampler
from kip.plots import confusion_matrix, plot_confusion, plot_image_grid, plot_panels
from kip.train import linear_probe

__all__ = ["Autoencoder", "SCHEDULES", "LossWeights", "AutoencoderState", "DistillState",
           "reconstruction_error", "smooth_l1", "diversity", "distillation_loss",
           "mean_pairwise_distance", "params_from_extras", "make_autoencoder_training",
           "make_autoencoder_distillation", "PRESETS", "Config", "load", "train_autoencoder",
           "initial_samples", "distil", "fit_autoencoder", "codes", "draw", "worth",
           "format_report", "run", "JOB"]


def _torch_uniform(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Autoencoder(nn.Module):
  """Encoder d -> hidden (ReLU), decoder hidden -> d (sigmoid; `tied`: the encoder's kernel
  transposed plus its own bias), head hidden -> num_classes. Inputs (n, ...) are flattened."""

  dim: int
  hidden: int = 64
  num_classes: int = 10
  tied: bool = False

  def setup(self):
    self.w_enc = self.param("w_enc", _torch_uniform(self.dim), (self.dim, self.hidden))
    self.b_enc = self.param("b_enc", _torch_uniform(self.dim), (self.hidden,))
    if not self.tied:
      self.w_dec = self.param("w_dec", _torch_uniform(self.hidden), (self.hidden, self.dim))
    self.b_dec = self.param("b_dec", _torch_uniform(self.hidden), (self.dim,))
    self.w_head = self.param("w_head", _torch_uniform(self.hidden),
                             (self.hidden, self.num_classes))
    self.b_head = self.param("b_head", _torch_uniform(self.hidden), (self.num_classes,))

  def encode(self, x):
    return nn.relu(x.reshape(x.shape[0], -1) @ self.w_enc + self.b_enc)

  def decode(self, h):
    w = self.w_enc.T if self.tied else self.w_dec
    return nn.sigmoid(h @ w + self.b_dec)

  def classify(self, h):
    return h @ self.w_head + self.b_head

  def __call__(self, x):
    """(n, ...) -> (reconstruction (n, d), logits (n, num_classes))."""
    h = self.encode(x)
    return self.decode(h), self.classify(h)


# ----------------------------------------------------------------------------------------------
# Loss terms


def _reduce(x: jax.Array, reduction: str) -> jax.Array:
  if reduction == "mean":
    return jnp.mean(x)
  if reduction == "sum":
    return jnp.sum(x)
  raise ValueError(f"unknown reduction {reduction!r}; choose mean or sum")


def reconstruction_error(model: Autoencoder, params, x: jax.Array, reduction: str = "mean"):
  """The squared error of the autoencoder's reconstruction of x (n, ...) flattened, averaged (or
  summed) over every element."""
  flat = x.reshape(x.shape[0], -1)
  recon = model.apply({"params": params}, flat, method=lambda m, v: m.decode(m.encode(v)))
  return _reduce((recon - flat) ** 2, reduction)


def smooth_l1(g: jax.Array, reduction: str = "mean") -> jax.Array:
  """PyTorch's SmoothL1Loss(g, 0) with beta 1: 0.5 g^2 where |g| < 1, |g| - 0.5 elsewhere."""
  a = jnp.abs(g)
  return _reduce(jnp.where(a < 1.0, 0.5 * g * g, a - 0.5), reduction)


def diversity(d: jax.Array, reduction: str = "mean") -> jax.Array:
  """The mean (or sum) over samples of the squared distance of each flattened sample to their
  mean."""
  flat = d.reshape(d.shape[0], -1)
  return _reduce(jnp.sum((flat - flat.mean(0)) ** 2, axis=-1), reduction)


def mean_pairwise_distance(x) -> float:
  """The mean Euclidean distance between distinct samples of x (n, ...), in float64 on the host
  (direct differences: no cancellation for near-identical samples): the report's
  "homogeneity" as a number (0 when all samples are equal)."""
  flat = np.asarray(x, np.float64).reshape(len(x), -1)
  n = len(flat)
  if n < 2:
    return 0.0
  total = sum(np.linalg.norm(flat[i + 1:] - flat[i], axis=1).sum() for i in range(n - 1))
  return float(2 * total / (n * (n - 1)))


class LossWeights(NamedTuple):
  """The constant weights l_* of the four terms."""

  cls: float = 1.0
  rec: float = 5.0
  gp: float = 100.0
  div: float = 1.0


def _report_schedule(epoch):
  """The report: w_rec = min(1, (epoch + 1) / 50), w_div = min(1, (epoch + 1) / 30)."""
  return jnp.minimum(1.0, (epoch + 1) / 50), jnp.minimum(1.0, (epoch + 1) / 30)


def _code_schedule(epoch):
  """The later code: w_rec decays from 1 to 1e-3 over the first 100 epochs (geometrically: our
  reading of "1 -> 1e-3"), then stays; w_div as the report."""
  return 1e-3 ** jnp.minimum(epoch / 100, 1.0), jnp.minimum(1.0, (epoch + 1) / 30)


# name -> (the l_* weights, epoch -> (w_rec, w_div))
SCHEDULES: dict[str, tuple[LossWeights, Callable]] = {
    "report": (LossWeights(cls=1.0, rec=5.0, gp=100.0, div=1.0), _report_schedule),
    "code": (LossWeights(cls=1.0, rec=1.0, gp=100.0, div=1.0), _code_schedule),
}


def distillation_loss(model: Autoencoder, params, d: jax.Array, x: jax.Array, labels: jax.Array,
                      weights: LossWeights, w_rec, w_div, *, reconstruct: str = "synthetic",
                      reduction: str = "mean") -> tuple[jax.Array, dict]:
  """Phase 2's loss and its four terms for params, samples d (N, ...), a real batch x (n, ...)
  with integer labels (n,)."""
  if reconstruct not in ("synthetic", "both"):
    raise ValueError(f"unknown reconstruct {reconstruct!r}; choose synthetic or both")
  flat_x = x.reshape(x.shape[0], -1)

  def rec_fn(d_):
    flat_d = d_.reshape(d_.shape[0], -1)
    both = flat_d if reconstruct == "synthetic" else jnp.concatenate([flat_d, flat_x])
    return reconstruction_error(model, params, both, reduction)

  rec, g = jax.value_and_grad(rec_fn)(d)
  logits = model.apply({"params": params}, flat_x, method=lambda m, v: m.classify(m.encode(v)))
  cls = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  gp = smooth_l1(g, reduction)
  div = diversity(d, reduction)
  loss = weights.cls * cls + weights.gp * gp + w_rec * weights.rec * rec - w_div * weights.div * div
  return loss, {"cls": cls, "rec": rec, "gp": gp, "div": div,
                "train_acc": jnp.mean(jnp.argmax(logits, -1) == labels)}


def params_from_extras(extras: dict) -> dict:
  """The autoencoder's params from a saved set's `ae_<param>` extras."""
  return {k[len("ae_"):]: jnp.asarray(v) for k, v in extras.items() if k.startswith("ae_")}


# ----------------------------------------------------------------------------------------------
# Methods


class AutoencoderState(NamedTuple):
  """Phase 1: the autoencoder's params (and the head's, left at their initialisation) and Adam's
  state."""

  params: Any
  opt_state: Any


class DistillState(NamedTuple):
  """Phase 2: params of the autoencoder and head, the samples d (N, H, W, C), Adam's state over
  both."""

  params: Any
  d: jax.Array
  opt_state: Any


_HEAD = ("w_head", "b_head")


def _adam_l2(lr: float, weight_decay: float) -> optax.GradientTransformation:
  """PyTorch's Adam(lr, weight_decay): the L2 term added to the gradient before Adam."""
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr))


def make_autoencoder_training(*, image_shape: tuple[int, ...], hidden: int = 64,
                              num_classes: int = 10, tied: bool = False, batch: int = 128,
                              lr: float = 1e-3, weight_decay: float = 1e-4) -> Trainer:
  """Phase 1 as a `kip.method.Trainer` on unlabelled real batches: init(key, params=None, _)
  starts from fresh weights (or the given params), `export` returns {"params": ...}."""
  model = Autoencoder(math.prod(image_shape), hidden, num_classes, tied)
  # The head is not part of phase 1 (the report's phase 1 has none): it keeps its initialisation,
  # where Adam's L2 term alone (its loss gradient is 0) would shrink it to ~0 within an epoch.
  tx = optax.multi_transform(
      {"autoencoder": _adam_l2(lr, weight_decay), "head": optax.set_to_zero()},
      lambda params: {k: "head" if k in _HEAD else "autoencoder" for k in params})

  def init(key, params=None, y_init=None) -> AutoencoderState:
    del y_init
    if params is None:
      params = model.init(key, jnp.zeros((1, math.prod(image_shape))))["params"]
    params = jax.tree_util.tree_map(jnp.array, params)  # copies: the step donates its state
    return AutoencoderState(params, tx.init(params))

  @functools.partial(jax.jit, donate_argnums=0)
  def update(state: AutoencoderState, data: Batch, key, step):
    del key, step
    loss, grads = jax.value_and_grad(
        lambda p: reconstruction_error(model, p, data.x))(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return AutoencoderState(optax.apply_updates(state.params, updates), opt_state), {
        "loss": loss}

  return Trainer(init, update, Data("unlabelled", batch))


def make_autoencoder_distillation(*, image_shape: tuple[int, ...], params: Any,
                                  steps_per_epoch: int, hidden: int = 64, num_classes: int = 10,
                                  tied: bool = False, batch: int = 128, lr: float = 1e-4,
                                  weight_decay: float = 1e-4, schedule: str = "report",
                                  reconstruct: str = "synthetic",
                                  reduction: str = "mean", clip: bool = False) -> Method:
  """Phase 2 as a `kip.method.Method` on class-balanced labelled real batches of `batch`.

  Args:
    params: phase 1's trained params (the starting autoencoder and head).
    steps_per_epoch: steps per pass over the training split: the schedule counts epochs.
    schedule: a key of SCHEDULES (the report's weights and ramps, or the later code's).
    reconstruct, reduction: see `distillation_loss` and the module docstring.
    clip: keep the samples in [0, 1] (the pixels' range) after every step; the report does not,
      and its diversity term, unbounded, then drives the samples out of that range.
  init(key, d_init (N, H, W, C), _) starts the samples at d_init; export returns `images` (the
  samples), `targets` (the head's class probabilities for them: the samples have no labels) and
  the autoencoder and head that go with them as extras `ae_<param>` (`params_from_extras`).
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
  weights, weights_at = SCHEDULES[schedule]
  model = Autoencoder(math.prod(image_shape), hidden, num_classes, tied)
  tx = _adam_l2(lr, weight_decay)
  if reduction not in ("mean", "sum"):
    raise ValueError(f"unknown reduction {reduction!r}; choose mean or sum")
  if reconstruct not in ("synthetic", "both"):
    raise ValueError(f"unknown reconstruct {reconstruct!r}; choose synthetic or both")

  def init(key, d_init, y_init=None) -> DistillState:
    del key, y_init
    d = jnp.array(d_init, jnp.float32)  # copies: the step donates its state
    start = jax.tree_util.tree_map(jnp.array, params)
    return DistillState(start, d, tx.init((start, d)))

  @functools.partial(jax.jit, donate_argnums=0)
  def update(state: DistillState, data: Batch, key, step):
    del key
    epoch = ((step - 1) // steps_per_epoch).astype(jnp.float32)
    labels = jnp.argmax(data.y, axis=-1)

    def loss_fn(trained):
      w_rec, w_div = weights_at(epoch)
      return distillation_loss(model, *trained, data.x, labels, weights, w_rec, w_div,
                               reconstruct=reconstruct, reduction=reduction)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)((state.params, state.d))
    updates, opt_state = tx.update(grads, state.opt_state, (state.params, state.d))
    params_, d = optax.apply_updates((state.params, state.d), updates)
    if clip:
      d = jnp.clip(d, 0.0, 1.0)
    return DistillState(params_, d, opt_state), {"loss": loss, **metrics}

  def export(state: DistillState) -> dict[str, Any]:
    logits = model.apply({"params": state.params}, state.d.reshape(state.d.shape[0], -1),
                         method=lambda m, v: m.classify(m.encode(v)))
    return {"images": state.d, "targets": jax.nn.softmax(logits, -1),
            **{f"ae_{name}": value for name, value in state.params.items()}}

  return Method(init, update, export, Data("labelled", batch))


f = cli.field

PRESETS = {
    "cpu": {"pretrain_epochs": 30, "epochs": 40},
    "paper": {"pretrain_epochs": 100, "epochs": 250},
}
PHASE1_DIR = "autoencoder"
PHASE1_FILE = "autoencoder_best.msgpack"


@dataclasses.dataclass(frozen=True)
class Config(cli.RunConfig, cli.DataConfig):
  preset: str = f("cpu", "sizes: cpu (fits a 2-core CPU in minutes) or paper (the report's "
                         "epochs)", choices=tuple(PRESETS))
  samples: int = f(80, "synthetic samples", minimum=1)
  init: str = f("uniform", "initial samples: uniform in [0, 1], or primed (0.25 x a random real "
                           "image + 0.75 x uniform noise)", choices=("uniform", "primed"))
  hidden: int = f(64, "code size", minimum=1)
  tied: bool = f(False, "decoder = the encoder's weights transposed")
  batch: int = f(128, "real images per step (phase 2: class-balanced)", minimum=1)
  val_size: int = f(6000, "training images held out for validation (early stopping)",
                    minimum=1)
  pretrain_epochs: int = f(30, "phase 1 epochs at most (0: the initial weights)", minimum=0,
                           maximum=cli.EPOCH_MAXIMUM)
  pretrain_patience: int = f(10, "phase 1: stop after this many epochs without a better "
                                 "validation loss (0: never)", minimum=0)
  pretrain_lr: float = f(1e-3, "phase 1 Adam learning rate", above=0)
  epochs: int = f(40, "phase 2 epochs at most", minimum=1, maximum=cli.EPOCH_MAXIMUM)
  patience: int = f(10, "phase 2: stop after this many epochs without a better validation "
                        "accuracy (0: never)", minimum=0)
  lr: float = f(1e-4, "phase 2 Adam learning rate", above=0)
  weight_decay: float = f(1e-4, "L2 weight decay of both phases' Adam", minimum=0)
  schedule: str = f("report", "loss weights and their ramps: report or code (the later code's)",
                    choices=tuple(SCHEDULES))
  reconstruct: str = f("synthetic", "what the reconstruction term reconstructs: synthetic (the "
                                    "report) or both (real and synthetic: its remedy)",
                       choices=("synthetic", "both"))
  reduction: str = f("mean", "reduction of the reconstruction, penalty and diversity terms: mean "
                             "(the report) or sum (its remedy)", choices=("mean", "sum"))
  clip: bool = f(False, "keep the samples in [0, 1] after every step (the report does not: its "
                       "diversity term then pushes them out of the pixel range)")
  worth_steps: int = f(1000, "phase 3: full-batch Adam steps of the autoencoder trained on a set",
                       minimum=1)
  probe_steps: int = f(500, "phase 3: linear-probe steps", minimum=1)
  probe_seeds: int = f(3, "phase 3: seeds per row", minimum=1)


def load(config: Config) -> tuple[pipeline.Data, np.ndarray, np.ndarray]:
  """Train and validation splits in [0, 1] (as `kip.pipeline.Data`, validation in the test
  slots), and the test split (images, labels)."""
  splits = load_dataset(config.dataset, data_dir=config.data_dir or None,
                        manual_dir=config.manual_dir or None, val_size=config.val_size,
                        seed=config.seed)
  train, val, test = splits["train"], splits["validation"], splits["test"]
  classes = int(train.labels.max()) + 1
  channels = train.images.shape[-1]
  unit = Preprocessor(np.zeros(channels), np.ones(channels))  # pixels / 255
  data = pipeline.Data(unit.apply(train.images), centered_one_hot(train.labels, classes),
                       train.labels, unit.apply(val.images), val.labels, unit, classes)
  return data, unit.apply(test.images), test.labels


def train_autoencoder(config: Config, data: pipeline.Data, workdir: str) -> dict:
  """Phase 1 in workdir/autoencoder/; returns the best epoch's params."""
  folder = os.path.join(workdir, PHASE1_DIR)
  image_shape = data.x_train.shape[1:]
  spe = math.ceil(len(data.x_train) / config.batch)
  method = make_autoencoder_training(image_shape=image_shape, hidden=config.hidden,
                                     num_classes=data.num_classes, tied=config.tied,
                                     batch=config.batch, lr=config.pretrain_lr,
                                     weight_decay=config.weight_decay)
  model = Autoencoder(math.prod(image_shape), config.hidden, data.num_classes, config.tied)
  # The validation images are an argument, not captured: closed over, they would be a constant
  # of the compiled program (19 MB on MNIST).
  x_val = jnp.asarray(data.x_test)
  error = jax.jit(lambda p, x: reconstruction_error(model, p, x))
  path = os.path.join(folder, PHASE1_FILE)

  def save_best(state, step):
    atomic_write(path, flax.serialization.msgpack_serialize(jax.device_get(state.params)))

  loop_config = LoopConfig(steps=config.pretrain_epochs * spe, eval_every=spe,
                           checkpoint_every=spe, log_every=spe, seed=config.seed,
                           select_metric="validation_loss", select_mode="min",
                           patience=config.pretrain_patience * spe)
  evaluator = Evaluator("validation_loss", lambda s: {"validation_loss": error(s.params, x_val)})
  result = loop.run(method, workdir=folder, config=loop_config,
                    sampler=make_sampler(method.data, data.x_train, seed=config.seed),
                    evaluators=[evaluator], save_best=save_best, log=cli.log,
                    progress=config.progress, description="phase 1: autoencoder")
  if not os.path.exists(path):  # 0 epochs: the initial weights
    save_best(result.state, 0)
  template = method.init(jax.random.key(0)).params
  with open(path, "rb") as fh:
    return flax.serialization.from_bytes(template, fh.read())


def initial_samples(config: Config, data: pipeline.Data) -> np.ndarray:
  rng = np.random.default_rng([config.seed, 5])
  shape = (config.samples, *data.x_train.shape[1:])
  noise = rng.uniform(0, 1, shape).astype(np.float32)
  if config.init == "uniform":
    return noise
  real = data.x_train[rng.choice(len(data.x_train), config.samples, replace=False)]
  return (0.25 * real + 0.75 * noise).astype(np.float32)


def distil(config: Config, data: pipeline.Data, params, workdir: str):
  """Phase 2 in workdir; returns the loop's result."""
  image_shape = data.x_train.shape[1:]
  spe = math.ceil(len(data.x_train) / config.batch)
  options = {"reconstruct": config.reconstruct, "reduction": config.reduction}
  method = make_autoencoder_distillation(
      image_shape=image_shape, params=params, steps_per_epoch=spe, hidden=config.hidden,
      num_classes=data.num_classes, tied=config.tied, batch=config.batch, lr=config.lr,
      weight_decay=config.weight_decay, schedule=config.schedule, clip=config.clip, **options)
  model = Autoencoder(math.prod(image_shape), config.hidden, data.num_classes, config.tied)
  weights = SCHEDULES[config.schedule][0]
  x_val, labels_val = jnp.asarray(data.x_test), jnp.asarray(data.labels_test)

  @jax.jit
  def measure(state, x_val, labels_val):
    # The raw terms on the validation split (the weights only scale them; the steps' records
    # have the weighted loss). The split is an argument: captured, it would be a constant of
    # the program (19 MB on MNIST).
    _, terms = distillation_loss(model, state.params, state.d, x_val, labels_val, weights,
                                 1.0, 1.0, **options)
    return {"validation_acc": terms["train_acc"], "val_cls": terms["cls"], "rec": terms["rec"],
            "gp": terms["gp"], "div": terms["div"]}

  def evaluate(state):
    out = {k: float(v) for k, v in measure(state, x_val, labels_val).items()}
    return out | {"homogeneity": mean_pairwise_distance(state.d)}

  meta = {"method": "autoencoder", "dataset": config.dataset, "seed": config.seed,
          "config": dataclasses.asdict(config)}
  loop_config = LoopConfig(steps=config.epochs * spe, eval_every=spe, checkpoint_every=spe,
                           log_every=spe, seed=config.seed, select_metric="validation_acc",
                           patience=config.patience * spe, eval_at_start=True)
  return pipeline.distill(method, data, workdir=workdir, loop_config=loop_config,
                 x_init=initial_samples(config, data), y_init=None, meta=meta,
                 evaluators=[Evaluator("epoch", evaluate)], log=cli.log,
                 progress=config.progress)


def fit_autoencoder(model: Autoencoder, x: np.ndarray, key, steps: int, lr: float = 1e-3):
  """A fresh autoencoder trained on x alone: full-batch Adam on the reconstruction MSE."""
  params = model.init(key, jnp.zeros((1, model.dim)))["params"]
  tx = optax.adam(lr)
  x = jnp.asarray(x)

  @jax.jit
  def fit(params):
    def body(_, carry):
      params, opt = carry
      grads = jax.grad(lambda p: reconstruction_error(model, p, x))(params)
      updates, opt = tx.update(grads, opt, params)
      return optax.apply_updates(params, updates), opt
    return jax.lax.fori_loop(0, steps, body, (params, tx.init(params)))[0]

  return fit(params)


@functools.cache
def _encoder(model: Autoencoder):
  """The jitted encoder of `model`, compiled once per model (not once per call of `codes`)."""
  return jax.jit(lambda p, v: model.apply({"params": p}, v, method=Autoencoder.encode))


def codes(model: Autoencoder, params, x: np.ndarray, batch: int = 10_000) -> np.ndarray:
  encode = _encoder(model)
  return np.concatenate([np.asarray(encode(params, jnp.asarray(x[i:i + batch])))
                         for i in range(0, len(x), batch)])


def draw(config: Config, data: pipeline.Data, workdir: str, real_params, chosen) -> None:
  """reconstructions.png, samples.png, curves.png, confusion.png in workdir."""
  model = Autoencoder(math.prod(data.x_train.shape[1:]), config.hidden, data.num_classes,
                      config.tied)
  first = [int(np.flatnonzero(data.labels_test == c)[0]) for c in range(data.num_classes)]
  originals = data.x_test[first]
  recon = np.asarray(model.apply({"params": real_params}, jnp.asarray(originals))[0])
  recon = recon.reshape(originals.shape)
  rows = np.repeat(np.eye(2, dtype=np.float32), data.num_classes, axis=0)
  plot_image_grid(np.concatenate([originals, recon]), rows,
                  os.path.join(workdir, "reconstructions.png"), per_class=data.num_classes,
                  class_names=["real", "recon."], captions=False,
                  title="phase 1: a validation image of every class over its reconstruction")
  plot_image_grid(np.clip(chosen.images, 0, 1), chosen.targets,
                  os.path.join(workdir, "samples.png"),
                  title=f"{len(chosen.images)} samples, rows by the head's class (caption: its "
                        f"probability)")
  spe = math.ceil(len(data.x_train) / config.batch)
  records = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
             if "validation_acc" in r]
  series = {name: np.array([r[key] for r in records]) for name, key in (
      ("cross-entropy (val)", "val_cls"),
      ("reconstruction of D" + (" and val" if config.reconstruct == "both" else ""), "rec"),
      ("gradient penalty", "gp"), ("diversity", "div"),
      ("validation accuracy", "validation_acc"), ("mean pairwise distance", "homogeneity"))}
  plot_panels(np.array([r["step"] / spe for r in records]), series,
              os.path.join(workdir, "curves.png"),
              title="phase 2: the four terms (unweighted), validation accuracy, homogeneity")
  # The selected epoch's classifier (saved with its samples) on the validation split.
  logits = model.apply({"params": params_from_extras(chosen.extras)}, jnp.asarray(data.x_test),
                       method=lambda m, v: m.classify(m.encode(v)))
  matrix = confusion_matrix(data.labels_test, np.asarray(jnp.argmax(logits, -1)),
                            data.num_classes)
  plot_confusion(matrix, os.path.join(workdir, "confusion.png"),
                 title=f"encoder + head, validation ({100 * np.trace(matrix) / matrix.sum():.2f}%)")


def format_report(report: dict) -> str:
  """Step 3's table: each row's linear-probe accuracy and its set's homogeneity."""
  table = [[r["name"], cli.percent(r["probe_acc_mean"], r["probe_acc_std"]),
            "" if r["homogeneity"] is None else f"{r['homogeneity']:.3f}"]
           for r in report["rows"]]
  return cli.format_table(["encoder", "linear probe (test)", "mean pairwise distance"], table)


WORTH_ROWS = ("distilled", "random", "none", "real")
ROW_NAMES = {"distilled": "pre-trained on the samples", "random": "pre-trained on random real "
             "images", "none": "no pre-training (random encoder)",
             "real": "phase 1 (all real images)"}


def worth(config: Config, data: pipeline.Data, x_test: np.ndarray, labels_test: np.ndarray,
          samples: np.ndarray, real_params) -> dict:
  """Step 3: linear-probe accuracy of each row's encoder (mean, std over seeds) and the
  homogeneity (mean pairwise distance) of each row's set."""
  model = Autoencoder(math.prod(samples.shape[1:]), config.hidden, data.num_classes,
                      config.tied)
  rows = {}
  for row in WORTH_ROWS:
    accs, spreads = [], []
    for s in range(config.probe_seeds):
      seed = config.seed + s
      key = jax.random.fold_in(jax.random.key(seed), 7)
      x = None
      if row == "distilled":
        x = samples
      elif row == "random":
        pick = np.random.default_rng([seed, 6]).choice(len(data.x_train), len(samples),
                                                       replace=False)
        x = data.x_train[pick]
      if row == "real":
        params = real_params
      elif x is None:
        params = model.init(key, jnp.zeros((1, model.dim)))["params"]
      else:
        params = fit_autoencoder(model, x, key, config.worth_steps)
        spreads.append(mean_pairwise_distance(x))
      accs.append(linear_probe(codes(model, params, data.x_train), data.labels_train,
                               codes(model, params, x_test), labels_test,
                               steps=config.probe_steps))
      if row == "real":
        break  # deterministic: one run
    rows[row] = {"row": row, "name": ROW_NAMES[row], "probe_acc": accs,
                 "probe_acc_mean": float(np.mean(accs)), "probe_acc_std": float(np.std(accs)),
                 "homogeneity": float(np.mean(spreads)) if spreads else None}
  return {"rows": list(rows.values()), "samples": len(samples),
          "initial_homogeneity": mean_pairwise_distance(initial_samples(config, data)),
          "probe": {"train": len(data.x_train), "test": len(x_test),
                    "steps": config.probe_steps, "worth_steps": config.worth_steps}}


def run(config: Config, workdir: str, devices) -> list[str]:
  """The command: phase 1, phase 2, phase 3 (read back when it already ran on the selected set)
  and the pictures; returns phase 3's table."""
  del devices
  data, x_test, labels_test = load(config)
  cli.log(f"{config.dataset}: {len(data.x_train)} train, {len(data.x_test)} validation, "
          f"{len(x_test)} test images; pixels in [0, 1]")
  params = train_autoencoder(config, data, workdir)
  distil(config, data, params, workdir)
  best = os.path.join(workdir, "distilled_best.npz")
  chosen = load_distilled(best if os.path.exists(best) else os.path.join(workdir, "distilled.npz"))
  cli.log(f"phase 3 (evaluation): what the {len(chosen.images)} samples (epoch "
          f"{chosen.meta.get('step', 0) // math.ceil(len(data.x_train) / config.batch)}) are worth")
  path = os.path.join(workdir, "worth.json")
  report = None
  if os.path.exists(path):  # a finished phase 3 of the same set (the workdir fixes the settings)
    with open(path) as fh:
      report = json.load(fh)
    if report.get("selected_step") != chosen.meta.get("step"):
      report = None
  if report is None:
    report = worth(config, data, x_test, labels_test, chosen.images, params)
    report["selected_step"] = chosen.meta.get("step")
    report["steps_per_epoch"] = math.ceil(len(data.x_train) / config.batch)
    write_json(path, report)
  draw(config, data, workdir, params, chosen)
  return [format_report(report)]


JOB = Job("autoencoder", Config, run, presets=PRESETS)
