"""KRR-ST's knowledge-distillation evaluation (Lee et al., ICLR 2024): a classifier trained on the
target dataset is distilled into students that see only a set's images (or random real images, or
Gaussian noise) and learn the teacher's soft predictions on them (`make_student`, a `Data("none")`
trainer of the one loop); the students' target test accuracy is what the inputs are worth.

`JOB` is the command `experiments.kd` (its docstring has the details): `Config` and `run_kd`.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kip import cli, loop
from kip.augment import dsa
from kip.command import Job
from kip.io import load_distilled, write_json
from kip.loop import Evaluator, LoopConfig
from kip.method import Data, Trainer, make_sampler
from kip.pipeline import prepare_data
from kip.train import (
  TrainState,
  choose_seed_batching,
  evaluate_states,
  init_states,
  make_optimizer,
  make_predict,
  over_seeds,
  resolve_schedule,
  train_and_evaluate,
)
from methods.nets import make_net
from methods.protocols import PROTOCOLS

__all__ = ["ROWS", "Config", "make_student", "run_kd", "run", "JOB"]


f = cli.field
ROWS = ("distilled", "random", "gaussian")


@dataclasses.dataclass(frozen=True)
class Config(cli.RunConfig, cli.DataConfig):
  dataset: str = f("fashion_mnist", "target dataset: the teacher classifier's, and the test split",
                   choices=cli.DataConfig.__dataclass_fields__["dataset"].metadata["choices"])
  support: str = f("", "the distilled set whose images are the student's inputs")
  rows: str = f("distilled,random,gaussian", "comma-separated input rows: distilled, random, "
                                             "gaussian")
  width: int = f(32, "the ConvNets' first-block width (teacher and student)", minimum=1)
  teacher_steps: int = f(2000, "steps of the teacher classifier on the whole target split",
                         minimum=1)
  steps: int = f(1000, "student steps", minimum=1)
  batch: int = f(256, "inputs per student step (at most the set's size)", minimum=1)
  augment: str = f("color_crop_cutout_scale_rotate", "DSA transformations of the inputs (no "
                   "flips for digits; none: off)")
  seeds: int = f(3, "students per row, mean +- std reported", minimum=1)


def _soft_cross_entropy(student_logits, teacher_logits):
  return -jnp.mean(jnp.sum(jax.nn.softmax(teacher_logits) * jax.nn.log_softmax(student_logits),
                           axis=-1))


def make_student(net, teacher: TrainState, inputs: np.ndarray | None, *, seeds, steps: int,
                 batch: int, augment: str, image_shape) -> Trainer:
  """Students (one per seed, stacked) trained on the teacher's soft predictions of `inputs`
  (None: Gaussian noise) as a `Data("none")` method of the one loop."""
  protocol = PROTOCOLS["krr_st_finetune"]
  tx = make_optimizer(protocol, protocol.lr, steps)
  teacher_vars = {"params": teacher.params, "batch_stats": teacher.batch_stats}
  n = 0 if inputs is None else len(inputs)
  batch = batch if inputs is None else min(batch, n)
  x_inputs = None if inputs is None else jnp.asarray(inputs)
  seed_keys = jnp.stack([jax.random.key(s) for s in seeds])

  def one_seed(state: TrainState, key, step):
    key = jax.random.fold_in(key, step)
    k_pick, k_aug = jax.random.split(key)
    if x_inputs is None:
      x = jax.random.normal(k_pick, (batch, *image_shape))
    else:
      x = x_inputs[jax.random.choice(k_pick, n, (batch,), replace=False)]
      x = dsa(k_aug, x, augment, batch_mode=False) if augment else x
    target = jax.lax.stop_gradient(net.apply(teacher_vars, x, train=False))

    def loss_fn(params, stats):
      logits, updated = net.apply({"params": params, "batch_stats": stats}, x, train=True,
                                  mutable=["batch_stats"])
      return _soft_cross_entropy(logits, target), updated["batch_stats"]

    (value, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params,
                                                                       state.batch_stats)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), stats, opt_state), value

  step_fn = over_seeds(one_seed, (0, 0, None), choose_seed_batching(net), donate_first=True)

  def init(key, x_init, y_init):
    del key, x_init, y_init
    return init_states(net, tx, seeds, image_shape)

  def update(states, data, key, step):
    del data, key  # inputs and augmentation come from each seed's own key
    states, losses = step_fn(states, seed_keys, step)
    return states, {"loss": losses}

  return Trainer(init, update, Data("none"))


def run_kd(config: Config, workdir: str) -> dict:
  distilled = load_distilled(config.support)
  rows = [r.strip() for r in config.rows.split(",") if r.strip()]
  for row in rows:
    cli.check_choice("--rows", row, ROWS, "row")
  target = prepare_data(config.dataset, preprocess="standard", data_dir=config.data_dir,
                        manual_dir=config.manual_dir)
  image_shape = target.x_train.shape[1:]
  if distilled.images.shape[1:] != image_shape:
    raise cli.UserError(f"the set's images are {distilled.images.shape[1:]}, the target's "
                        f"{image_shape}")
  net = make_net("krr_st_convnet", target.num_classes, width=config.width, norm="batch",
                 image_shape=image_shape)
  # The whole job, planned first: one progress bar counts the teacher's steps and every row's
  # student steps, so its ETA is the job's remaining steps at the current rate.
  teacher_steps = resolve_schedule(PROTOCOLS["krr_st_finetune"], len(target.x_train),
                                   steps=config.teacher_steps, dataset=config.dataset).steps
  job_steps = teacher_steps + len(rows) * config.steps
  cli.log_job(f"the teacher classifier {teacher_steps:,} steps, then {len(rows)} student "
              f"row{'s' * (len(rows) > 1)} of {config.steps:,} steps", job_steps)
  cli.log(f"teacher classifier: krr_st_convnet-{config.width} on {len(target.x_train)} "
          f"{config.dataset} images, {config.teacher_steps} steps")
  teacher = train_and_evaluate(net, PROTOCOLS["krr_st_finetune"], target.x_train,
                               target.y_train, target.x_test, target.labels_test,
                               seeds=[config.seed], steps=config.teacher_steps,
                               dataset=config.dataset, workdir=os.path.join(workdir, "teacher"),
                               progress=config.progress, log=cli.log,
                               description="teacher classifier", span=(0, job_steps))
  teacher_state = jax.tree_util.tree_map(lambda a: a[0], teacher.states)
  report = {"config": dataclasses.asdict(config), "source": distilled.dataset,
            "target": config.dataset, "teacher_test_acc": float(teacher.test_acc[0]),
            "rows": []}
  cli.log(f"teacher classifier: {100 * report['teacher_test_acc']:.2f}% on the target test split")
  seeds = [config.seed + i for i in range(config.seeds)]
  predict = make_predict(net, choose_seed_batching(net))
  augment = "" if config.augment == "none" else config.augment
  for index, row in enumerate(rows):
    inputs = None
    if row == "distilled":
      inputs = distilled.images
    elif row == "random":
      source = prepare_data(distilled.dataset, preprocessor=distilled.preprocessor,
                            data_dir=config.data_dir, manual_dir=config.manual_dir)
      pick = np.random.default_rng([config.seed, 17]).choice(len(source.x_train),
                                                             len(distilled.images), replace=False)
      inputs = source.x_train[np.sort(pick)]
    student = make_student(net, teacher_state, inputs, seeds=seeds, steps=config.steps,
                           batch=config.batch, augment="" if inputs is None else augment,
                           image_shape=image_shape)

    def test_accuracy(states):
      acc = evaluate_states(predict, states, target.x_test, target.labels_test)
      return {"test_acc": [float(a) for a in acc], "test_acc_mean": float(np.mean(acc))}

    result = loop.run(student, workdir=os.path.join(workdir, row),
                      config=LoopConfig(steps=config.steps, eval_every=0,
                                        checkpoint_every=max(1, config.steps // 5), log_every=50,
                                        seed=config.seed),
                      sampler=make_sampler(Data("none"), None),
                      evaluators=[Evaluator("test", test_accuracy)], log=cli.log,
                      progress=config.progress, description=f"{row}: student",
                      span=(teacher_steps + index * config.steps, job_steps))
    acc = np.asarray(result.evals["test_acc"])
    report["rows"].append({"row": row, "seeds": seeds, "test_acc": acc.tolist(),
                           "test_acc_mean": float(acc.mean()), "test_acc_std": float(acc.std()),
                           "train_time": result.train_time})
    cli.log(f"{row}: student {cli.percent(acc.mean(), acc.std())}%")
    write_json(os.path.join(workdir, "kd.json"), report)
  return report


def _check(config: Config) -> None:
  if not config.support:
    raise cli.UserError("--support is required: the set whose images the student sees")


def run(config: Config, workdir: str, devices) -> list[str]:
  del devices
  report = run_kd(config, workdir)
  return [f"teacher classifier ({report['target']}): {100 * report['teacher_test_acc']:.2f}%"] + [
      f"student from {r['row']} inputs: {cli.percent(r['test_acc_mean'], r['test_acc_std'])}%"
      for r in report["rows"]]


JOB = Job("kd", Config, run, inputs=lambda c: {"support": c.support}, check=_check)
