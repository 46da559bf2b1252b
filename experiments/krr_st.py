"""KRR-ST on an unlabelled dataset: `python -m experiments.krr_st --dataset mnist --size 100`.

Self-supervised dataset distillation for transfer learning (Lee et al., ICLR 2024; see
methods/krr_st.py): `--size` images and their target representations, regressed by KRR on a pool
of ConvNets' features onto a Barlow Twins teacher's representations of real images. No label is
used. The teacher comes from `python -m experiments.teacher --dataset <dataset>` (run it first;
`--teacher` names another teacher file); the distillation refuses a teacher trained on another
dataset, and a workdir whose teacher file has changed.

The default preset `cpu` fits a 2-core CPU (pool width 32, 256 real images per step, 2,000 steps,
pool models re-initialised after 100 updates: about 10 minutes); `--preset paper` takes the paper's
sizes (width 128, 1,024 real images per step, 160,000 steps, 1,000 updates: a GPU job). Explicit
flags override the preset. `--no-reset` reproduces the official code's pool, whose counters are
never reset (see methods/krr_st.py). At the start and every `--eval-every` steps the loop
measures the KRR prediction's MSE to the teacher on `--val-size` training images held out of the
distillation, averaged over the pool's models (`krr_validation_mse`). Evaluate the set by
pre-training and fine-tuning with `python -m experiments.pretrain --support WORKDIR/distilled.npz`,
and by knowledge distillation with `python -m experiments.kd --support WORKDIR/distilled.npz`.

Writes config.json, metrics.jsonl, distilled.npz (images + targets) and checkpoints/ in the
workdir; re-running the same command with the same --workdir resumes.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments.teacher import default_teacher
from kip import cli
from kip.data import Preprocessor
from kip.loop import Evaluator
from kip.pipeline import distill, prepare_data, selecting_loop_config
from methods.barlow import load_teacher
from methods.krr_st import DEFAULT_REG, krr_st_loss, make_krr_st, pool_features

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
  steps: int = f(2000, "outer (AdamW) steps", minimum=0)
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


def main(argv=None) -> int:
  config = cli.parse_config(Config, argv, __doc__, presets=PRESETS)
  teacher_path = config.teacher or default_teacher(
      config.dataset, "paper" if config.preset == "paper" else "cpu")
  if not os.path.isfile(teacher_path):
    load_checked_teacher(teacher_path, config.dataset)  # the one-line error
  workdir = cli.prepare_workdir(config, "krr_st", [config.dataset, f"n{config.size}"],
                                inputs={"teacher": teacher_path})
  cli.log(f"devices: {cli.describe_devices()}; preset {config.preset}; workdir: {workdir}")
  result = run_krr_st(config, workdir, teacher_path)
  cli.report(f"KRR validation MSE to the teacher: {result.get('krr_validation_mse', np.nan):.5g}; "
             f"distilled set: {os.path.join(workdir, 'distilled.npz')}")
  return 0


if __name__ == "__main__":
  cli.run_main(main)
