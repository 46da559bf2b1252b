"""Train a Barlow Twins teacher: `python -m experiments.teacher --dataset mnist`.

KRR-ST regresses onto a self-supervised teacher's representations (methods/barlow.py). This trains
one on the unlabelled training split of `--dataset`: a ResNet-18 backbone (3x3 stem, no max-pool)
and a projector, Barlow Twins' loss on two augmented views per image. The default preset `cpu`
fits a 2-core CPU (backbone width 16, projector 512-512-512, AdamW 2e-3, 3 epochs of batches of
256: about 20 minutes); `--preset paper` is a CIFAR-size recipe for a GPU (width 64, projector
2048-2048-2048, LARS 0.3, weight decay 1e-4, 1,000 epochs, 10 warm-up epochs; the KRR-ST code
ships no teacher training, so this recipe is ours, after the Barlow Twins paper). Explicit flags
override the preset.

The teacher is saved as teacher.msgpack in its workdir, by default
runs/teachers/<dataset>-<digest of the config>, which is where `experiments.krr_st` looks for it:
the same command finds (and resumes) the same teacher, and any other setting makes another one, so
a teacher made with other settings is never reused. At the end the backbone's linear-probe
accuracy (softmax regression on frozen features of the full training split, fixed settings) on
the test split is logged; `--probe-steps 0` skips it.
"""

from __future__ import annotations

import dataclasses
import math
import os

from kip import cli
from kip.loop import Evaluator, LoopConfig, run
from kip.method import make_sampler
from kip.pipeline import prepare_data
from kip.store import digest_path
from kip.train import linear_probe
from methods.barlow import DEFAULT_VIEWS, load_teacher, make_barlow_twins, save_teacher
from methods.nets import NETS

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
  epochs: float = f(3.0, "passes over the training split", above=0)
  optimizer: str = f("adamw", "lars (the paper's) or adamw", choices=("lars", "adamw"))
  lr: float = f(2e-3, "peak learning rate (linear warm-up, then cosine to 0)", above=0)
  weight_decay: float = f(1e-4, "weight decay (LARS: weights only)", minimum=0)
  warmup_epochs: float = f(0.2, "epochs of linear learning-rate warm-up", minimum=0)
  views: str = f(DEFAULT_VIEWS, "view augmentations joined by '_' among crop, flip, jitter, "
                 "gray, blur, solarize (no flip for digits)")
  min_scale: float = f(0.3, "smallest area fraction of a random resized crop", above=0)
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
    if self.min_scale > 1:
      raise cli.UserError(f"--min-scale must be at most 1, got {self.min_scale}")

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

  evaluators = [Evaluator("linear_probe", probe, 0)] if config.probe_steps else []
  loop_config = LoopConfig(steps=steps, eval_every=0, checkpoint_every=config.checkpoint_every,
                           seed=config.seed, log_every=10)
  sampler = make_sampler(method.data, data.x_train, seed=config.seed)
  result = run(method, workdir=workdir, config=loop_config, sampler=sampler,
               evaluators=evaluators, save=save, log=cli.log, progress=config.progress,
               description="training the teacher")
  return result.evals | {"steps_per_s": result.steps_per_s}


def main(argv=None) -> int:
  config = cli.parse_config(Config, argv, __doc__, presets=PRESETS)
  config = dataclasses.replace(config, workdir=config.workdir or config.default_workdir())
  workdir = cli.prepare_workdir(config, "teacher", [config.dataset], ignore=_NOT_THE_TEACHER)
  cli.log(f"devices: {cli.describe_devices()}; preset {config.preset}; workdir: {workdir}")
  result = train_teacher(config, workdir)
  acc = result.get("probe_test_acc")
  probe = f"linear-probe test accuracy {100 * acc:.2f}%; " if acc is not None else ""
  cli.report(f"{probe}teacher: {os.path.join(workdir, TEACHER_FILE)}")
  return 0


if __name__ == "__main__":
  cli.run_main(main)
