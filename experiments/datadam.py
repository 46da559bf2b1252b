"""Distil a dataset with DataDAM: `python -m experiments.datadam --dataset mnist --ipc 10`.

Attention matching (Sajedi et al., ICCV 2023; see methods/datadam.py): each step a freshly drawn
ConvNet-3 compares the spatial attention of its hidden blocks and its final embedding on real and
synthetic images of every class. Presets:

- `cpu` (default): ConvNet-3 width 32, 32 real images per class, 1,000 steps (minutes on a 2-core
  CPU);
- `paper`: the official code's settings (width 128, 64 real per class, 20,000 steps, attention x
  100, MMD x 100 x 0.01, images by SGD lr 1, momentum 0.5);
- `report`: the settings of the report that ran DataDAM on MNIST (ANCHORS.md, "seed settings":
  width 128, 256 real per class, image lr 0.1, lambda 0.01, K 100 x T 10 = 1,000 steps);
- `report_mhist`: the same report on MHIST (`--dataset mhist --manual-dir DIR`, the folder as
  published): ConvNet-7 width 32, 50 images per class, 128 real per class, K 200 x T 10 = 2,000
  steps.

`--power` is p of the attention |f|^p: 4 as the paper's hyperparameter table (the default), 1 as
its code; `--norm batch` (the code's and the maintainers' choice) or `instance` (the paper's).
`--standardise` (ours) writes each image standardised to the real images' average per-image mean
and std: the normalised matching network hardly sees an image's contrast, so SGD inflates it
(5.7x at 1 image per class on MNIST), which the normalised evaluation ConvNet ignores and an MLP
does not.
Every `--eval-every` steps the loop trains a `dc`-protocol ConvNet-3 on the current set for
`--eval-steps` steps and records its accuracy (`finite_test_acc`, or `finite_validation_acc` with
`--val-size`); the full evaluation is `python -m experiments.transfer --support
WORKDIR/distilled.npz --protocol dc`. Writes config.json, metrics.jsonl, distilled.npz and
checkpoints/ in the workdir; re-running the same command with the same --workdir resumes.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from kip import cli
from kip.augment import DSA_STRATEGY
from kip.cli import SelectionConfig
from kip.nets import NORMS, default_depth
from kip.pipeline import (
  distill,
  finite_evaluator,
  held_out_split,
  initial_support,
  selecting_loop_config,
)
from methods.datadam import image_stats, make_matching
from methods.flags import PreprocessConfig, prepare_data

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
  steps: int = f(1000, "matching steps (a fresh network each)", minimum=0)
  lr: float = f(1.0, "SGD learning rate of the images", above=0)
  momentum: float = f(0.5, "SGD momentum of the images", minimum=0)
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
  power: float = f(4.0, "p of the attention sum_c |f|^p (4: the paper's table; 1: its code)",
                   above=0)
  task_balance: float = f(100.0, "weight of the attention term", minimum=0)
  lambda_mmd: float = f(0.01, "weight of the embedding (MMD) term, times --task-balance",
                        minimum=0)


METHOD = "datadam"


def run_matching(config: MatchConfig, workdir: str, method_name: str, *,
                 attention_weight: float, embedding_weight: float, power: float = 4.0) -> dict:
  """Runs attention/embedding matching (DataDAM, or DM with no attention) as configured in
  `workdir`; returns the last evaluation."""
  data = prepare_data(config.dataset, preprocess=config.preprocessing(), data_dir=config.data_dir,
                      manual_dir=config.manual_dir, val_size=config.val_size, seed=config.seed)
  split = held_out_split(config.val_size)
  cli.log(f"{config.dataset}: {len(data.x_train)} train, {len(data.x_test)} {split} images; "
          f"{data.preprocessor.name}")
  image_shape = data.x_train.shape[1:]
  x_init, y_init = initial_support(data, config.ipc, config.seed, config.init)
  depth = config.depth or default_depth(image_shape)
  method = make_matching(num_classes=data.num_classes, image_shape=image_shape,
                         width=config.width, depth=depth, norm=config.norm,
                         attention_weight=attention_weight, embedding_weight=embedding_weight,
                         power=power, lr=config.lr, momentum=config.momentum,
                         real_per_class=config.real_per_class,
                         augment="" if config.augment == "none" else config.augment,
                         export_stats=image_stats(data.x_train) if config.standardise else None)
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


def report(result: dict, workdir: str) -> None:
  acc = result.get(f"finite_{result['split']}_acc", np.nan)
  cli.report(f"ConvNet-{result['depth']} trained on the set ({result['split']}): "
             f"{100 * acc:.2f}%; distilled "
             f"set: {os.path.join(workdir, 'distilled.npz')}")


def main(argv=None) -> int:
  config = cli.parse_config(Config, argv, __doc__, presets=PRESETS)
  workdir = cli.prepare_workdir(config, METHOD, [config.dataset, f"ipc{config.ipc}"])
  cli.log(f"devices: {cli.describe_devices()}; preset {config.preset}; workdir: {workdir}")
  report(run_matching(config, workdir, METHOD, attention_weight=config.task_balance,
                      embedding_weight=config.task_balance * config.lambda_mmd,
                      power=config.power), workdir)
  return 0


if __name__ == "__main__":
  cli.run_main(main)
