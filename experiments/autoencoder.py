"""Autoencoder-based unsupervised distillation: `python -m experiments.autoencoder --dataset mnist`.

The method of the report that ran it on MNIST (methods/autoencoder.py; ANCHORS.md): a 784-64-784
autoencoder (`--tied`: decoder = encoder transposed) with a linear head, pixels in [0, 1], the
training split cut into train / validation (`--val-size`, 6,000 of 60,000 as the report's 90/10).

1. Phase 1 (WORKDIR/autoencoder/): the autoencoder on real images (MSE, Adam 1e-3 with L2 1e-4,
   batches of 128), early stopping on the validation loss (`--pretrain-patience` epochs); the best
   epoch's weights start phase 2.
2. Phase 2 (WORKDIR): `--samples` synthetic samples (uniform in [0, 1], or `--init primed`:
   0.25 x a random real image + 0.75 x uniform noise) learned together with the autoencoder and
   head (Adam 1e-4, L2 1e-4) by the four-term loss, the weights ramped by `--schedule` (report:
   l_rec 5, w_rec = min(1, (epoch+1)/50), w_div = min(1, (epoch+1)/30); code: l_rec 1, w_rec
   1 -> 1e-3 over 100 epochs), early stopping on validation accuracy (`--patience` epochs;
   distilled_best.npz is the best epoch, the one measured below). The report's remedies:
   `--reconstruct both` (real and synthetic reconstructed together), `--reduction sum`.
3. What the samples are worth (WORKDIR/worth.json, `--probe-seeds` seeds): a fresh autoencoder
   trained on the samples alone (`--worth-steps` full-batch Adam steps), then a linear probe of its
   codes on the labelled training split, tested on the test split; beside it the same with as many
   random real training images, with no pre-training (a random encoder) and with phase 1's
   encoder (trained on all real images). Homogeneity: the mean pairwise distance of each set.

Pictures in WORKDIR: reconstructions.png (an original of every class over phase 1's
reconstruction), samples.png (the samples, grouped by the head's class), curves.png (the four
terms, validation accuracy and homogeneity per epoch), confusion.png (the head on validation).

Presets: `cpu` (default: phase 1 up to 30 epochs, phase 2 up to 40: 4 minutes on a 2-core CPU
shared with another job) and `paper` (the report's: up to 100 + 250 epochs, 4-8 minutes there;
each part stops early). Re-running with the same --workdir resumes each part.
The report's 96.7% is the validation accuracy of the encoder + head trained on real data (step 2's
`validation_acc`); no model there was trained on the samples, which is what step 3 measures.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kip import cli
from kip.data import Preprocessor, centered_one_hot, load_dataset
from kip.io import atomic_write, load_distilled, write_json
from kip.loop import Evaluator, LoopConfig, read_metrics, run
from kip.method import make_sampler
from kip.pipeline import Data, distill
from kip.plots import confusion_matrix, plot_confusion, plot_image_grid, plot_panels
from kip.train import linear_probe
from methods.autoencoder import (
  SCHEDULES,
  Autoencoder,
  distillation_loss,
  make_autoencoder_distillation,
  make_autoencoder_training,
  mean_pairwise_distance,
  params_from_extras,
  reconstruction_error,
)

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
  pretrain_epochs: int = f(30, "phase 1 epochs at most", minimum=0)
  pretrain_patience: int = f(10, "phase 1: stop after this many epochs without a better "
                                 "validation loss (0: never)", minimum=0)
  pretrain_lr: float = f(1e-3, "phase 1 Adam learning rate", above=0)
  epochs: int = f(40, "phase 2 epochs at most", minimum=0)
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
  worth_steps: int = f(1000, "step 3: full-batch Adam steps of the autoencoder trained on a set",
                       minimum=1)
  probe_steps: int = f(500, "step 3: linear-probe steps", minimum=1)
  probe_seeds: int = f(3, "step 3: seeds per row", minimum=1)


def load(config: Config) -> tuple[Data, np.ndarray, np.ndarray]:
  """Train and validation splits in [0, 1] (as `Data`, validation in the test slots), and the
  test split (images, labels)."""
  splits = load_dataset(config.dataset, data_dir=config.data_dir or None,
                        manual_dir=config.manual_dir or None, val_size=config.val_size,
                        seed=config.seed)
  train, val, test = splits["train"], splits["validation"], splits["test"]
  classes = int(train.labels.max()) + 1
  channels = train.images.shape[-1]
  unit = Preprocessor(np.zeros(channels), np.ones(channels))  # pixels / 255
  data = Data(unit.apply(train.images), centered_one_hot(train.labels, classes), train.labels,
              unit.apply(val.images), val.labels, unit, classes)
  return data, unit.apply(test.images), test.labels


def train_autoencoder(config: Config, data: Data, workdir: str) -> dict:
  """Phase 1 in workdir/autoencoder/; returns the best epoch's params."""
  folder = os.path.join(workdir, PHASE1_DIR)
  image_shape = data.x_train.shape[1:]
  spe = math.ceil(len(data.x_train) / config.batch)
  method = make_autoencoder_training(image_shape=image_shape, hidden=config.hidden,
                                     num_classes=data.num_classes, tied=config.tied,
                                     batch=config.batch, lr=config.pretrain_lr,
                                     weight_decay=config.weight_decay)
  model = Autoencoder(math.prod(image_shape), config.hidden, data.num_classes, config.tied)
  val_loss = jax.jit(lambda p: reconstruction_error(model, p, jnp.asarray(data.x_test)))
  path = os.path.join(folder, PHASE1_FILE)

  def save_best(state, step):
    atomic_write(path, flax.serialization.msgpack_serialize(jax.device_get(state.params)))

  loop = LoopConfig(steps=config.pretrain_epochs * spe, eval_every=spe, checkpoint_every=spe,
                    log_every=spe, seed=config.seed, select_metric="validation_loss",
                    select_mode="min", patience=config.pretrain_patience * spe)
  evaluator = Evaluator("validation_loss", lambda s: {"validation_loss": val_loss(s.params)})
  result = run(method, workdir=folder, config=loop,
               sampler=make_sampler(method.data, data.x_train, seed=config.seed),
               evaluators=[evaluator], save_best=save_best, log=cli.log,
               progress=config.progress, description="phase 1: autoencoder")
  if not os.path.exists(path):  # 0 epochs: the initial weights
    save_best(result.state, 0)
  template = method.init(jax.random.key(0)).params
  with open(path, "rb") as fh:
    return flax.serialization.from_bytes(template, fh.read())


def initial_samples(config: Config, data: Data) -> np.ndarray:
  rng = np.random.default_rng([config.seed, 5])
  shape = (config.samples, *data.x_train.shape[1:])
  noise = rng.uniform(0, 1, shape).astype(np.float32)
  if config.init == "uniform":
    return noise
  real = data.x_train[rng.choice(len(data.x_train), config.samples, replace=False)]
  return (0.25 * real + 0.75 * noise).astype(np.float32)


def distil(config: Config, data: Data, params, workdir: str):
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
  def measure(state):
    # The raw terms on the validation split (the weights only scale them; the steps' records
    # have the weighted loss).
    _, terms = distillation_loss(model, state.params, state.d, x_val, labels_val, weights,
                                 1.0, 1.0, **options)
    return {"validation_acc": terms["train_acc"], "val_cls": terms["cls"], "rec": terms["rec"],
            "gp": terms["gp"], "div": terms["div"]}

  def evaluate(state):
    out = {k: float(v) for k, v in measure(state).items()}
    return out | {"homogeneity": mean_pairwise_distance(state.d)}

  meta = {"method": "autoencoder", "dataset": config.dataset, "seed": config.seed,
          "config": dataclasses.asdict(config)}
  loop = LoopConfig(steps=config.epochs * spe, eval_every=spe, checkpoint_every=spe,
                    log_every=spe, seed=config.seed, select_metric="validation_acc",
                    patience=config.patience * spe, eval_at_start=True)
  return distill(method, data, workdir=workdir, loop_config=loop,
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


def draw(config: Config, data: Data, workdir: str, real_params, chosen) -> None:
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


def print_report(report: dict) -> None:
  table = [[r["name"], cli.percent(r["probe_acc_mean"], r["probe_acc_std"]),
            "" if r["homogeneity"] is None else f"{r['homogeneity']:.3f}"]
           for r in report["rows"]]
  cli.report(cli.format_table(["encoder", "linear probe (test)", "mean pairwise distance"], table))


WORTH_ROWS = ("distilled", "random", "none", "real")
ROW_NAMES = {"distilled": "pre-trained on the samples", "random": "pre-trained on random real "
             "images", "none": "no pre-training (random encoder)",
             "real": "phase 1 (all real images)"}


def worth(config: Config, data: Data, x_test: np.ndarray, labels_test: np.ndarray,
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


def main(argv=None) -> int:
  config = cli.parse_config(Config, argv, __doc__, presets=PRESETS)
  workdir = cli.prepare_workdir(config, "autoencoder", [config.dataset])
  cli.log(f"devices: {cli.describe_devices()}; preset {config.preset}; workdir: {workdir}")
  data, x_test, labels_test = load(config)
  cli.log(f"{config.dataset}: {len(data.x_train)} train, {len(data.x_test)} validation, "
          f"{len(x_test)} test images; pixels in [0, 1]")
  params = train_autoencoder(config, data, workdir)
  distil(config, data, params, workdir)
  best = os.path.join(workdir, "distilled_best.npz")
  chosen = load_distilled(best if os.path.exists(best) else os.path.join(workdir, "distilled.npz"))
  cli.log(f"step 3: what the {len(chosen.images)} samples (epoch "
          f"{chosen.meta.get('step', 0) // math.ceil(len(data.x_train) / config.batch)}) are worth")
  path = os.path.join(workdir, "worth.json")
  report = None
  if os.path.exists(path):  # a finished step 3 of the same set (the workdir fixes the settings)
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
  print_report(report)
  return 0


if __name__ == "__main__":
  cli.run_main(main)
