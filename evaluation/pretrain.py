"""KRR-ST's pre-training evaluation (Lee et al., ICLR 2024): a distilled set is worth what a network
pre-trained on it gains on a target task, measured by a linear probe and by fine-tuning on the
target dataset's labels (rows: no pre-training, the KRR-ST set, a random real subset labelled by
the teacher, the teacher itself, supervised sets pre-trained by FRePo's protocol).

`JOB` is the command `experiments.pretrain` (its docstring has the details): `Config`, the rows
(`pretrain_and_transfer`) and the table (`format_table`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from kip import cli
from kip.command import Job
from kip.data import centered_one_hot, class_balanced_indices
from kip.io import load_distilled, write_json
from kip.pipeline import prepare_data
from kip.train import (
  TrainState,
  choose_seed_batching,
  init_states,
  linear_probe,
  make_optimizer,
  over_seeds,
  resolve_schedule,
  train_and_evaluate,
)
from methods.barlow import load_teacher
from methods.nets import NETS, make_net
from methods.protocols import PROTOCOLS, cpu_preset

__all__ = ["ROWS", "Config", "pretrain_and_transfer", "format_table", "run", "JOB"]


f = cli.field
ROWS = ("none", "distilled", "random", "teacher")


@dataclasses.dataclass(frozen=True)
class Config(cli.RunConfig, cli.DataConfig):
  dataset: str = f("fashion_mnist", "target dataset: probe and fine-tune on it",
                   choices=cli.DataConfig.__dataclass_fields__["dataset"].metadata["choices"])
  support: str = f("", "the KRR-ST set (.npz with `images` and `targets`)")
  rows: str = f("none,random,distilled", "comma-separated rows: none, distilled, random, teacher")
  supervised: str = f("", "comma-separated supervised sets (with labels) to compare, pre-trained "
                          "by FRePo's protocol")
  teacher: str = f("", "the teacher for the random and teacher rows (default: the set's own)")
  labelled: int = f(1000, "labelled target training images, class-balanced (0: the whole split)",
                    minimum=0)
  preset: str = f("cpu", "sizes: cpu (width 32, 500 fine-tuning steps) or paper (width 128, "
                         "10,000 steps)", choices=("cpu", "paper"))
  net: str = f("krr_st_convnet", "the pre-trained and fine-tuned network", choices=NETS)
  width: int = f(0, "its width (0: the preset's; mlp: hidden units; resnet18: first stage)",
                 minimum=0)
  seeds: int = f(3, "networks per row, mean +- std reported", minimum=1)
  pretrain_epochs: int = f(1000, "pre-training epochs on the set (MSE rows)", minimum=1,
                           maximum=cli.EPOCH_MAXIMUM)
  finetune_steps: int = f(0, "fine-tuning steps (0: the preset's)", minimum=0)
  probe_steps: int = f(500, "full-batch steps of the linear probe", minimum=1)


def _rows(config: Config) -> list[str]:
  names = [r.strip() for r in config.rows.split(",") if r.strip()]
  for name in names:
    cli.check_choice("--rows", name, ROWS, "row")
  return names + [f"supervised:{p}" for p in config.supervised.split(",") if p.strip()]


def _width(config: Config) -> int:
  if config.width:
    return config.width
  return {"mlp": 1024, "resnet18": 16 if config.preset == "cpu" else 64}.get(
      config.net, 32 if config.preset == "cpu" else 128)


def _stack(tree, n: int):
  """One network's variables repeated on a leading seed axis."""
  return jax.tree_util.tree_map(lambda a: jnp.stack([jnp.asarray(a)] * n), tree)


def _features_fn(net, states: TrainState):
  """Frozen features (inference mode) of each seed's network: x -> (n_seeds, n, d)."""
  def one(params, stats, x):
    return net.apply({"params": params, **({"batch_stats": stats} if stats else {})}, x,
                     train=False, features=True)

  per_seed = over_seeds(one, (0, 0, None), choose_seed_batching(net))

  def features(x):
    return np.concatenate([np.asarray(per_seed(states.params, states.batch_stats,
                                               jnp.asarray(x[j:j + 500])))
                           for j in range(0, len(x), 500)], axis=1)

  return features


def pretrain_and_transfer(config: Config, workdir: str) -> dict:
  """Runs every row; returns the report written to pretrain.json."""
  distilled = load_distilled(config.support)
  if distilled.targets is None:
    raise cli.UserError(f"{config.support} holds labels, not regression targets: pass a KRR-ST "
                        "set as --support and supervised sets with --supervised")
  source = distilled.dataset
  teacher_path = config.teacher or distilled.meta.get("teacher", "")
  rows = _rows(config)
  needs_teacher = any(r in ("random", "teacher") for r in rows)
  teacher = load_teacher(teacher_path) if needs_teacher and teacher_path else None
  if needs_teacher and teacher is None:
    raise cli.UserError("the random and teacher rows need the teacher: pass --teacher FILE")
  target = prepare_data(config.dataset, preprocess="standard", data_dir=config.data_dir,
                        manual_dir=config.manual_dir)
  x_tgt, labels_tgt = target.x_train, target.labels_train
  if config.labelled:
    per_class = max(1, config.labelled // target.num_classes)
    idx = class_balanced_indices(labels_tgt, per_class, np.random.default_rng([config.seed, 11]),
                                 target.num_classes)
    x_tgt, labels_tgt = x_tgt[idx], labels_tgt[idx]
  y_tgt = centered_one_hot(labels_tgt, target.num_classes)
  cli.log(f"source {source} ({len(distilled.images)} distilled images), target {config.dataset}: "
          f"{len(x_tgt)} labelled training images, {len(target.x_test)} test images")
  seeds = [config.seed + i for i in range(config.seeds)]
  width = _width(config)
  preset_steps = cpu_preset("krr_st_finetune").steps if config.preset == "cpu" else 0
  finetune_steps = config.finetune_steps or preset_steps
  report = {"config": dataclasses.asdict(config), "source": source, "target": config.dataset,
            "labelled": len(x_tgt), "rows": []}

  # The whole job, planned first: one progress bar counts every pre-training and fine-tuning
  # step of every row, so its ETA is the job's remaining steps at the current rate (the linear
  # probes' short fits are not counted).
  tune_steps = resolve_schedule(PROTOCOLS["krr_st_finetune"], len(x_tgt), steps=finetune_steps,
                                dataset=config.dataset).steps
  plan = {row: (_pretraining_steps(row, distilled, config), tune_steps) for row in rows}
  job_steps = sum(pre + tune for pre, tune in plan.values())
  cli.log_job(f"{len(rows)} row{'s' * (len(rows) > 1)} ("
              + ", ".join(f"{row} {pre:,} + {tune:,} steps" for row, (pre, tune) in plan.items())
              + f", pre-training + fine-tuning), {len(seeds)} seed{'s' * (len(seeds) > 1)} each",
              job_steps)
  done = 0

  for row in rows:
    folder = os.path.join(workdir, row.replace(":", "-").replace("/", "_"))
    net_name, row_width = config.net, width
    init_from, pretrain_time = None, 0.0
    if row == "teacher":
      net_name, row_width = teacher.config["backbone"], int(teacher.config["width"])
      variables = teacher.variables
      init_from = TrainState(_stack(variables["params"]["backbone"], len(seeds)),
                             _stack(variables["batch_stats"]["backbone"], len(seeds)), ())
    elif row != "none":
      x_pre, y_pre, protocol = _pretraining_set(row, distilled, teacher, config, seeds)
      net = make_net(net_name, y_pre.shape[-1], width=row_width,
                     norm=PROTOCOLS["krr_st_pretrain"].norm if net_name != "mlp" else "none",
                     image_shape=x_pre.shape[-3:])
      n, steps = x_pre.shape[-4], plan[row][0]  # the planned steps: the same epochs of n images
      cli.log(f"{row}: pre-training {net_name}-{row_width} on {n} images ({protocol}, {steps} "
              "steps)")
      pre = train_and_evaluate(net, PROTOCOLS[protocol], x_pre, y_pre, None, None, seeds=seeds,
                               steps=steps, dataset=source or "",
                               workdir=os.path.join(folder, "pretrain"),
                               progress=config.progress, log=cli.log,
                               description=f"{row}: pre-training", span=(done, job_steps))
      done += steps
      init_from, pretrain_time = pre.states, pre.train_time
    net = make_net(net_name, target.num_classes, width=row_width,
                   norm="batch" if net_name != "mlp" else "none", image_shape=x_tgt.shape[1:])
    if init_from is None:  # no pre-training: the probe sees freshly initialised networks
      init_from = init_states(net, make_optimizer(PROTOCOLS["krr_st_finetune"], 0.01, 1), seeds,
                              x_tgt.shape[1:])
    probe = _probe(net, init_from, x_tgt, labels_tgt, target, config, seeds,
                   os.path.join(folder, "probe.json"))
    cli.log(f"{row}: linear probe {cli.percent(np.mean(probe), np.std(probe))}%")
    fine = train_and_evaluate(net, PROTOCOLS["krr_st_finetune"], x_tgt, y_tgt, target.x_test,
                              target.labels_test, seeds=seeds, steps=finetune_steps,
                              init_from=None if row == "none" else init_from,
                              dataset=config.dataset, workdir=os.path.join(folder, "finetune"),
                              progress=config.progress, log=cli.log,
                              description=f"{row}: fine-tuning", span=(done, job_steps))
    done += fine.steps
    result = {"row": row, "net": f"{net_name}-{row_width}", "seeds": seeds,
              "probe_acc": probe, "probe_acc_mean": float(np.mean(probe)),
              "probe_acc_std": float(np.std(probe)),
              "finetune_acc": [float(a) for a in fine.test_acc],
              "finetune_acc_mean": float(np.mean(fine.test_acc)),
              "finetune_acc_std": float(np.std(fine.test_acc)),
              "finetune_steps": fine.steps, "pretrain_time": pretrain_time,
              "finetune_time": fine.train_time}
    cli.log(f"{row}: fine-tuned "
            f"{cli.percent(result['finetune_acc_mean'], result['finetune_acc_std'])}%")
    report["rows"].append(result)
    write_json(os.path.join(workdir, "pretrain.json"), report)
  return report


# What a row's networks and its probe depend on (not paths, display, or the fine-tuning).
_PROBE_SETTINGS = ("dataset", "support", "teacher", "labelled", "preset", "net", "width",
                   "pretrain_epochs", "probe_steps", "seed")


def _probe(net, states, x_tgt, labels_tgt, target, config: Config, seeds, path: str
           ) -> list[float]:
  """Each seed's linear-probe test accuracy on the frozen features of `states`; read back from
  `path` when this row's probe already ran with the same settings (its features cover every
  training and test image, the slow part of re-running a finished command)."""
  settings = {k: getattr(config, k) for k in _PROBE_SETTINGS} | {"seeds": seeds}
  try:
    with open(path) as f:
      done = json.load(f)
    if done["settings"] == settings:
      cli.log(f"linear probe read back from {path}")
      return done["probe_acc"]
  except (OSError, ValueError, KeyError, TypeError):
    pass
  features = _features_fn(net, states)
  f_train, f_test = features(x_tgt), features(target.x_test)
  probe = [linear_probe(a, labels_tgt, b, target.labels_test, steps=config.probe_steps)
           for a, b in zip(f_train, f_test, strict=True)]
  write_json(path, {"settings": settings, "probe_acc": probe})
  return probe


def _pretraining_steps(row: str, distilled, config: Config) -> int:
  """The pre-training steps of `row` (as the row runs them), before its set is built."""
  if row in ("none", "teacher"):
    return 0
  if row.startswith("supervised:"):
    n, protocol = len(load_distilled(row.split(":", 1)[1]).images), "frepo"
  else:  # distilled, or a random real subset of the same size
    n, protocol = len(distilled.images), "krr_st_pretrain"
  return config.pretrain_epochs * -(-n // PROTOCOLS[protocol].batch_size)


def _pretraining_set(row: str, distilled, teacher, config: Config, seeds):
  """(x, y, protocol) a row pre-trains on; the random row has one subset per seed."""
  if row == "distilled":
    return distilled.images, distilled.targets, "krr_st_pretrain"
  if row == "random":
    data = prepare_data(distilled.dataset, preprocess="standard", data_dir=config.data_dir,
                        manual_dir=config.manual_dir)
    n = len(distilled.images)
    idx = np.stack([np.sort(np.random.default_rng([s, 13]).choice(len(data.x_train), n,
                                                                  replace=False)) for s in seeds])
    x = data.x_train[idx]
    y = np.stack([np.asarray(teacher.features(xs)) for xs in x])
    return x, y, "krr_st_pretrain"
  path = row.split(":", 1)[1]
  supervised = load_distilled(path)
  if supervised.labels is None:
    raise cli.UserError(f"{path} holds regression targets, not labels: pass it as --support")
  return supervised.images, supervised.labels, "frepo"


def format_table(report: dict) -> str:
  return cli.format_table(
      ("pre-training", "net", "linear probe (%)", "fine-tuned (%)", "pre-train time",
       "fine-tune time"),
      [(r["row"], r["net"], cli.percent(r["probe_acc_mean"], r["probe_acc_std"]),
        cli.percent(r["finetune_acc_mean"], r["finetune_acc_std"]), f"{r['pretrain_time']:.0f} s",
        f"{r['finetune_time']:.0f} s") for r in report["rows"]])


def _check(config: Config) -> None:
  if not config.support:
    raise cli.UserError("--support is required: the KRR-ST set to evaluate")
  _rows(config)


def run(config: Config, workdir: str, devices) -> list[str]:
  """The evaluation in its workdir; returns the table and a line naming pretrain.json."""
  del devices
  report = pretrain_and_transfer(config, workdir)
  return [format_table(report),
          f"source {report['source']} -> target {report['target']} ({report['labelled']} "
          f"labelled images); written {os.path.join(workdir, 'pretrain.json')}"]


def _inputs(config: Config) -> dict[str, str]:
  # A supervised set's file is an input too: another content at the same path is refused.
  return {"support": config.support} | {
      f"supervised:{r.split(':', 1)[1]}": r.split(":", 1)[1]
      for r in _rows(config) if r.startswith("supervised:")}


# Each row is a folder of its own: rows may be added or left out in the same workdir.
JOB = Job("pretrain", Config, run, check=_check, inputs=_inputs,
          ignore=(*cli.NOT_SETTINGS, "rows", "supervised"))
