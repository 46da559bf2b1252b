"""MTT, matching training trajectories (Cazenavette et al., CVPR 2022).

The synthetic images and the student's learning rate are learned so that `syn_steps` SGD steps on
the images from an expert's parameters after epoch t land near the expert's parameters after epoch
t + M (methods/trajectory.py has the store, the unroll and the loss). Labels are hard and fixed;
every parameter is matched; every update is applied.

The command (`experiments.mtt`) is `JOB`: the flags MTT, DATM and PAD share (`TrajectoryConfig`),
the store they read (`store_path`, `open_store`, `chosen_experts`; the experts come from
`experiments.buffer`, methods/experts.py), and `run_trajectory`, the run all three make with
their own maker.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from kip import cli
from kip.augment import DSA_STRATEGY
from kip.cli import SelectionConfig
from kip.command import Job
from kip.io import write_json
from kip.method import Method
from kip.nets import default_depth
from kip.pipeline import (
  distill,
  finite_evaluator,
  held_out_split,
  initial_support,
  selecting_loop_config,
)
from methods.experts import default_buffer, expert_model
from methods.flags import PreprocessConfig, prepare_data
from methods.trajectory import ExpertStore, StoreMismatch, make_trajectory_matching

__all__ = ["make_mtt", "TrajectoryConfig", "Config", "PRESETS", "CPU_BATCH_SYN", "store_path",
           "open_store", "chosen_experts", "run_trajectory", "report", "run", "JOB"]


def make_mtt(model, params_template, store: ExpertStore, **kwargs) -> Method:
  """MTT as a `kip.method.Method`; arguments: `make_trajectory_matching`'s."""
  return make_trajectory_matching(model, params_template, store, **kwargs)


f = cli.field
CPU_BATCH_SYN = 100  # the cpu preset's student minibatch when --batch-syn is 0: 10 per class on
# 10-class data, so a larger set costs an iteration what 10 per class do (every image is still
# seen once per iteration at 100 per class with the 10 student steps)

PRESETS = {
    "cpu": {"steps": 300, "syn_steps": 10, "expert_epochs": 2, "max_start_epoch": 4,
            "lr_img": 100.0},
    "paper": {"steps": 5000, "syn_steps": 30, "expert_epochs": 2, "max_start_epoch": 20,
              "lr_img": 1000.0, "eval_every": 500, "checkpoint_every": 100},
}


@dataclasses.dataclass(frozen=True)
class TrajectoryConfig(cli.RunConfig, SelectionConfig, PreprocessConfig, cli.DataConfig):
  """The flags MTT, DATM and PAD share."""

  preset: str = f("cpu", "sizes: cpu (fits a 2-core CPU, with the cpu buffer) or paper (the "
                         "official CIFAR-10 settings, with the paper buffer)",
                  choices=("cpu", "paper"))
  buffer: str = f("", "the expert store (default: where `experiments.buffer --dataset D "
                      "--preset P` puts it)")
  experts: int = f(0, "use the store's first N experts (0: every finished one at the start)",
                   minimum=0)
  ipc: int = f(10, "synthetic images per class", minimum=1)
  steps: int = f(300, "matching iterations", minimum=1)
  syn_steps: int = f(10, "the student's SGD steps per iteration", minimum=1)
  expert_epochs: int = f(2, "M: expert epochs between the start and the target", minimum=1)
  max_start_epoch: int = f(4, "start epochs are drawn below this", minimum=1)
  batch_syn: int = f(0, "synthetic images per student step (0: all of them, at most "
                        f"{CPU_BATCH_SYN} with the cpu preset)", minimum=0)
  lr_img: float = f(100.0, "SGD learning rate of the images", above=0)
  lr_lr: float = f(1e-5, "SGD learning rate of the student's learning rate", minimum=0)
  lr_init: float = f(0.01, "the student's initial learning rate (MTT: the experts' 0.01)",
                     above=0)
  momentum: float = f(0.5, "SGD momentum of the images and the learning rate", minimum=0,
                    below=1)
  augment: str = f(DSA_STRATEGY, "DSA strategy of the student's steps, per image (none: off)")
  init: str = f("real", "initial synthetic images (noise: at the cpu preset DATM and PAD skip "
                        "nearly every update by --threshold and learn little at --lr-img 100; "
                        "--threshold 1000 --lr-img 1000 is the measured setting, see the README)",
                choices=("real", "noise"))
  eval_every: int = f(100, "iterations between finite-net evaluations (0: at the end)",
                      minimum=0)
  eval_steps: int = f(300, "training steps of the evaluation's ConvNet", minimum=1)


@dataclasses.dataclass(frozen=True)
class Config(TrajectoryConfig):
  pass


def store_path(config: TrajectoryConfig, **buffer_flags) -> str:
  """--buffer, or where `experiments.buffer` with the run's dataset, preset and preprocessing
  (and `buffer_flags`, e.g. PAD's curriculum) keeps its store."""
  return config.buffer or default_buffer(config.dataset, config.preset,
                                         preprocess=config.preprocessing(), **buffer_flags)


def open_store(config: TrajectoryConfig, **buffer_flags) -> ExpertStore:
  """The run's expert store, checked to hold experts of the run's dataset and preprocessing."""
  path = store_path(config, **buffer_flags)
  try:
    store = ExpertStore.open(path)
  except FileNotFoundError:
    hint = "" if config.buffer else f" --preset {config.preset}" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in buffer_flags.items())
    raise cli.UserError(f"no expert store at {path}; make it first with python -m "
                        f"experiments.buffer --dataset {config.dataset}{hint}"
                        + (f" --buffer {path}" if config.buffer else "")) from None
  for key, value in (("dataset", config.dataset), ("preprocess", config.preprocessing())):
    if store.settings.get(key) != value:
      raise cli.UserError(f"the expert store {path} holds experts of {key} "
                          f"{store.settings.get(key)!r}, this run is {value!r}")
  return store


def chosen_experts(store: ExpertStore, config: TrajectoryConfig, workdir: str) -> list[int]:
  """The experts this run samples from, fixed at its first start (workdir/experts.json), so a
  resumed run draws as the uninterrupted one even if the store has grown since."""
  path = os.path.join(workdir, "experts.json")
  if os.path.exists(path):
    with open(path) as fh:
      return json.load(fh)
  finished = store.experts()
  experts = finished[:config.experts] if config.experts else finished
  if not experts or (config.experts and len(experts) < config.experts):
    raise cli.UserError(f"the expert store {store.path} holds {len(finished)} finished experts, "
                        f"this run needs {config.experts or 1}; train them with python -m "
                        "experiments.buffer")
  write_json(path, experts)
  return experts


def run_trajectory(config: TrajectoryConfig, workdir: str, method_name: str, make_method,
                   *, init_support=None, buffer_flags: dict | None = None,
                   **method_kwargs) -> dict:
  """Runs a trajectory-matching method as configured in `workdir`; returns the last evaluation.
  `make_method(model, params_template, store, **kwargs) -> Method`; `init_support(data, model,
  template, store, experts) -> (x, y)` replaces the class-balanced initial support (DATM)."""
  store = open_store(config, **(buffer_flags or {}))
  data = prepare_data(config.dataset, preprocess=config.preprocessing(), data_dir=config.data_dir,
                      manual_dir=config.manual_dir, val_size=config.val_size, seed=config.seed)
  split = held_out_split(config.val_size)
  image_shape = data.x_train.shape[1:]
  model = expert_model(store.settings, image_shape, data.num_classes)
  template = model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False)["params"]
  experts = chosen_experts(store, config, workdir)
  cli.log(f"{config.dataset}: {len(data.x_train)} train, {len(data.x_test)} {split} images; "
          f"store {store.path}: {len(experts)} experts of {store.epochs} epochs, width "
          f"{store.settings['width']}")
  try:
    method = make_method(
        model, template, store, image_shape=image_shape, syn_steps=config.syn_steps,
        expert_epochs=config.expert_epochs, max_start_epoch=config.max_start_epoch,
        batch_syn=config.batch_syn or (CPU_BATCH_SYN if config.preset == "cpu" else 0),
        lr_img=config.lr_img, lr_lr=config.lr_lr,
        lr_init=config.lr_init, momentum=config.momentum,
        augment="" if config.augment == "none" else config.augment, experts=experts,
        seed=config.seed, **method_kwargs)
  except (StoreMismatch, ValueError) as e:
    raise cli.UserError(str(e)) from None
  if init_support is None or config.init == "noise":
    x_init, y_init = initial_support(data, config.ipc, config.seed, config.init)
  else:
    x_init, y_init = init_support(data, model, template, store, experts)
  depth = store.settings["depth"] or default_depth(image_shape)
  finite = finite_evaluator(method, data, protocol="dc", steps=config.eval_steps,
                            seeds=(config.seed,), width=store.settings["width"], depth=depth,
                            dataset=config.dataset, split=split)
  meta = {"method": method_name, "dataset": config.dataset, "seed": config.seed,
          "ipc": config.ipc, "config": dataclasses.asdict(config), "buffer": store.path}
  result = distill(method, data, workdir=workdir,
                   loop_config=selecting_loop_config(config, f"finite_{split}_acc"),
                   x_init=x_init, y_init=y_init, meta=meta, evaluators=[finite], log=cli.log,
                   progress=config.progress)
  return result.evals | {"split": split, "lr": float(np.asarray(result.state.lr))}


def report(result: dict, workdir: str) -> str:
  """The command's result line: the evaluation ConvNet's accuracy at the learned rate, the set's
  file."""
  acc = result.get(f"finite_{result['split']}_acc", np.nan)
  return (f"ConvNet trained on the set at its learned lr {result['lr']:.4g} "
          f"({result['split']}): {100 * acc:.2f}%; distilled set: "
          f"{os.path.join(workdir, 'distilled.npz')}")


def run(config: Config, workdir: str, devices) -> list[str]:
  """`experiments.mtt`: trajectory matching with `make_mtt`."""
  del devices
  return [report(run_trajectory(config, workdir, "mtt", make_mtt), workdir)]


JOB = Job("mtt", Config, run, presets=PRESETS, folder=lambda c: [c.dataset, f"ipc{c.ipc}"],
          inputs=lambda c: {"buffer": os.path.join(store_path(c), "store.json")})
