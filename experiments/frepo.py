"""Distil a dataset with FRePo: `python -m experiments.frepo --dataset mnist --ipc 10`.

Neural feature regression with a pool of online ConvNets (Zhou et al., NeurIPS 2022; see
methods/frepo.py). The default preset `cpu` fits a 2-core CPU (first-block width 32, 256 real
images per step, 2,000 steps: about 15 minutes at 10 images per class); `--preset paper` takes the
paper's sizes (width 128, 1,024 real images per step, 500,000 steps: a GPU job). Explicit flags
override the preset. Every `--eval-every` steps the loop measures KRR test accuracy on the
features of the current pool model (`krr_test_acc`, or `krr_validation_acc` on a held-out split
with `--val-size`, which picks distilled_best.npz and with `--patience` stops early); train finite
networks on the result with
`python -m experiments.transfer --support WORKDIR/distilled.npz --protocol frepo`.

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
from kip.krr import DEFAULT_REG
from kip.pipeline import (
  distill,
  held_out_split,
  initial_support,
  krr_evaluator,
  make_evaluator,
  selecting_loop_config,
)
from methods.flags import PreprocessConfig, prepare_data
from methods.frepo import make_frepo, pool_features

f = cli.field

PRESETS = {
    "cpu": {"width": 32, "target_batch": 256, "steps": 2000},
    "paper": {"width": 128, "target_batch": 1024, "steps": 500_000, "eval_every": 10_000,
              "checkpoint_every": 1000},
}


@dataclasses.dataclass(frozen=True)
class Config(cli.RunConfig, SelectionConfig, PreprocessConfig, cli.DataConfig):
  preset: str = f("cpu", "sizes: cpu (fits a 2-core CPU) or paper (the paper's, for a GPU)",
                  choices=tuple(PRESETS))
  ipc: int = f(10, "support images per class", minimum=1)
  steps: int = f(2000, "outer (LAMB) steps", minimum=0)
  lr: float = f(3e-4, "outer LAMB learning rate, cosine-decayed to 0.1x", above=0)
  target_batch: int = f(256, "class-balanced real images per step", minimum=1)
  width: int = f(32, "pool nets' first-block width (blocks: w, 2w, 4w)", minimum=1)
  num_models: int = f(10, "pool size", minimum=1)
  max_online_updates: int = f(100, "online updates before a pool model is re-initialised",
                              minimum=1)
  online_lr: float = f(3e-4, "pool models' Adam learning rate", above=0)
  online_batch: int = f(1000, "support images per online update (at most)", minimum=1)
  augment: str = f("color_crop_cutout_scale_rotate", "DSA transformations of the real batch, "
                   "one per step (none: off); FRePo uses no flips on digits")
  learn_labels: bool = f(True, "learn the support labels too")
  init: str = f("real", "initial support images", choices=("real", "noise"))
  reg: float = f(DEFAULT_REG, "KRR ridge, relative to tr(K_ss)/n_s", minimum=0)
  eval_every: int = f(200, "steps between KRR evaluations on the pool features (0: at the end)",
                      minimum=0)


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
                      learn_labels=config.learn_labels, augment=augment)
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


def main(argv=None) -> int:
  config = cli.parse_config(Config, argv, __doc__, presets=PRESETS)
  workdir = cli.prepare_workdir(config, "frepo", [config.dataset, f"ipc{config.ipc}"])
  cli.log(f"devices: {cli.describe_devices()}; preset {config.preset}; workdir: {workdir}")
  result = run_frepo(config, workdir)
  split = held_out_split(config.val_size)
  acc = result.get(f"krr_{split}_acc", np.nan)
  cli.report(f"KRR {split} accuracy on the pool features: {100 * acc:.2f}%; distilled set: "
             f"{os.path.join(workdir, 'distilled.npz')}")
  return 0


if __name__ == "__main__":
  cli.run_main(main)
