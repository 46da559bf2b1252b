"""Distil a dataset with RFAD: `python -m experiments.rfad --dataset mnist --ipc 10`.

Random-feature NNGP of freshly sampled ConvNets each step (Loo et al., NeurIPS 2022; see
methods/rfad.py). The default preset `cpu` fits a 2-core CPU (2 nets of width 32 per step, 256
real images, 1,000 steps); `--preset paper` takes the paper's sizes (8 nets of width 256, 5,120
real images per step, 100,000 steps, 16 evaluation nets: a GPU job). Explicit flags override the
preset. Every `--eval-every` steps the loop measures KRR accuracy with `--eval-models` random nets
drawn from a fixed seed (`rf_test_acc`; with `--val-size`, `rf_validation_acc` on a held-out
training split, which picks `distilled_best.npz` and, with `--patience`, stops the run early as
RFAD does; the paper preset holds out 5,000 images with patience 1,000). Train finite networks on
the result with `experiments.transfer`.

Writes config.json, metrics.jsonl, distilled.npz and checkpoints/ in the workdir; re-running the
same command with the same --workdir resumes.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from kip import cli
from kip.cli import SelectionConfig
from kip.pipeline import (
  distill,
  held_out_split,
  initial_support,
  krr_evaluator,
  make_evaluator,
  selecting_loop_config,
)
from methods.flags import PreprocessConfig, prepare_data
from methods.rfad import make_rfad, nngp_readout, random_features

f = cli.field

PRESETS = {
    "cpu": {"width": 32, "num_models": 2, "target_batch": 256, "steps": 1000, "eval_models": 4},
    "paper": {"width": 256, "num_models": 8, "target_batch": 5120, "steps": 100_000,
              "eval_models": 16, "eval_every": 40, "checkpoint_every": 1000,
              "val_size": 5000, "patience": 1000},
}


@dataclasses.dataclass(frozen=True)
class Config(cli.RunConfig, SelectionConfig, PreprocessConfig, cli.DataConfig):
  preset: str = f("cpu", "sizes: cpu (fits a 2-core CPU) or paper (the paper's, for a GPU)",
                  choices=tuple(PRESETS))
  ipc: int = f(10, "support images per class", minimum=1)
  steps: int = f(1000, "AdaBelief steps", minimum=0)
  lr: float = f(1e-3, "AdaBelief learning rate of the support set", above=0)
  target_batch: int = f(256, "class-balanced real images per step", minimum=1)
  target_chunk: int = f(1280, "real images whose features are computed at once, one random net "
                              "at a time, bounding memory (0: all images and nets at once)",
                        minimum=0)
  width: int = f(32, "channels of the random ConvNets", minimum=1)
  num_models: int = f(2, "random ConvNets drawn per step", minimum=1)
  jitter: float = f(5e-3, "ridge relative to tr(K_ss)/n_s", minimum=0)
  platt: bool = f(False, "Platt-scaled cross-entropy loss (learned scale) instead of MSE")
  learn_labels: bool = f(True, "learn the support labels too")
  init: str = f("real", "initial support images", choices=("real", "noise"))
  eval_models: int = f(4, "random nets (fixed seed) of the KRR evaluation", minimum=1)
  eval_every: int = f(100, "steps between KRR evaluations (0: at the end)", minimum=0)


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
                     learn_labels=config.learn_labels)
  eval_features = random_features(data.num_classes, image_shape, width=config.width,
                                  num_models=config.eval_models, chunk=config.target_chunk)

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


def main(argv=None) -> int:
  config = cli.parse_config(Config, argv, __doc__, presets=PRESETS)
  workdir = cli.prepare_workdir(  # target_chunk changes memory only, not the numbers
      config, "rfad", [config.dataset, f"ipc{config.ipc}"],
      ignore=(*cli.NOT_SETTINGS, "steps", "eval_every", "target_chunk"))
  cli.log(f"devices: {cli.describe_devices()}; preset {config.preset}; workdir: {workdir}")
  result = run_rfad(config, workdir)
  acc = result.get(f"rf_{result['split']}_acc", np.nan)
  cli.report(f"KRR {result['split']} accuracy on random features: {100 * acc:.2f}%; "
             f"distilled set: {os.path.join(workdir, 'distilled.npz')}")
  return 0


if __name__ == "__main__":
  cli.run_main(main)
