"""Finite-width networks trained on a distilled set beside real-data baselines
(`experiments.transfer`'s job): the rows (`distilled`, `random`, `full`), each seed's network
trained under a protocol of methods/protocols.py, the report written to transfer.json.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from kip import cli
from kip.command import Job
from kip.data import centered_one_hot, class_balanced_indices, validation_split
from kip.io import write_json
from kip.loop import NonFiniteLossError
from kip.nets import NORMS, PARAMETERIZATIONS, default_depth
from kip.train import TrainResult, resolve_schedule, train_and_evaluate
from methods.flags import SetPreprocessConfig, data_for_set
from methods.nets import NETS, make_net
from methods.protocols import PROTOCOLS, cpu_preset

__all__ = ["Config", "JOB", "format_table", "transfer"]

f = cli.field
ROWS = ("distilled", "random", "full")


@dataclasses.dataclass(frozen=True)
class Config(cli.RunConfig, SetPreprocessConfig, cli.DataConfig):
  support: str = f("", "the distilled set in any format kip.io reads: ours, KIP/LS, "
                       "RFAD best.npz, FRePo dumps, DC/DSA/DM res_*.pt, MTT/DATM/PAD "
                       "images_best.pt, DC-Bench pairs")
  net: str = f("auto", "finite network to train (auto: the protocol's: kip the architecture of "
                       "the set's kernel, fc -> mlp, conv, convnet, convnet3, else convnet; dc, "
                       "dsa and rfad convnet3; frepo frepo_convnet)", choices=("auto", *NETS))
  protocol: str = f("kip", "training protocol (kip: KIP authors' colab; dc: DC's own evaluation; "
                           "dsa: DSA/DM/MTT's; report: the MNIST/MHIST report's 50 epochs, "
                           "cosine; frepo: FRePo's; rfad: RFAD's, centred output, "
                           "decay to init, label scale 8)", choices=tuple(PROTOCOLS))
  preset: str = f("cpu", "sizes: cpu (kip width 64 and 1,000 steps, frepo width 32; dc as "
                          "published: on a 2-core CPU a 100-image set's rows take tens of "
                          "minutes, the progress bar's ETA says how long) or paper (every "
                          "protocol as published: kip width 1024 and 5,000 steps, frepo 128)",
                  choices=("cpu", "paper"))
  seeds: int = f(5, "networks per row (seeds 0..N-1 offset by --seed), mean +- std reported",
                 minimum=1)
  seeds_at_once: int = f(0, "networks trained together in one step (0: all)", minimum=0)
  seed_batching: str = f("auto", "how seeds share a step: vmap (one batched program, for "
                                 "GPU/TPU) or sequential (faster on CPU); auto picks",
                         choices=("auto", "vmap", "sequential"))
  steps: int = f(0, "training steps per network (0: the protocol's, or the cpu preset's: kip "
                    "5000 (cpu 1000); frepo 1000/2000/5000 by set size; dc 300 epochs, "
                    "1000 with augmentation)", minimum=0)
  full_steps: int = f(2000, "step budget of the full-training-set baseline", minimum=1)
  width: int = f(0, "channels / hidden units (0: the protocol's; resnet18: 64)", minimum=0)
  depth: int = f(0, "conv blocks of convnet/convnet3 (0: by image size, 3 up to 32 pixels, 7 "
                    "for 224x224 MHIST); conv layers of conv, hidden layers of mlp (0: the "
                    "set's kernel's, else 1 and 2)", minimum=0)
  norm: str = f("auto", "normalisation (auto: the protocol's; resnet18: batch)",
                choices=("auto", *NORMS))
  parameterization: str = f("standard", "weight parameterisation", choices=PARAMETERIZATIONS)
  lr: float = f(0.0, "learning rate (0: the set's learned one if it carries `lr`, as MTT's "
                    "sets, for its own row; else the protocol's; kip: max stable rate of the "
                    "NTK)", minimum=0)
  lr_grid: str = f("", "comma-separated learning rates to choose from, per row: each is trained "
                       "on the row's networks and scored on a validation split carved from the "
                       "training split (--val-size images, never the test split; the baselines "
                       "then train without them); the best rate's networks are retrained and "
                       "tested. xM: M times the rate the row would train at (a set's learned "
                       "one, the protocol's, or kip's NTK estimate), e.g. x0.3,x1,x3 for every "
                       "protocol and label type alike. Costs (rates + 1) x a row")
  val_size: int = f(5000, "with --lr-grid: training images held out as the validation split",
                    minimum=1)
  labels: str = f("set", "the distilled row's labels: set (as the set carries them: learned, "
                        "soft or hard) or hard (each image's largest label as its class, "
                        "centred one-hot: the hard-label evaluation of DD-Ranking's "
                        "label-robust score)", choices=("set", "hard"))
  augment: str = f("auto", "augmentation: a DSA strategy (e.g. "
                           "color_crop_cutout_flip_scale_rotate), DC's per-image "
                           "dc:crop_scale_rotate, or none (auto: the protocol's for the dataset)")
  center: str = f("auto", "train and predict with f(x) - f_init(x), the network's output at "
                          "initialisation subtracted, and the weight penalty pulling toward the "
                          "initial weights (as RFAD's evaluation): auto (the protocol's: rfad "
                          "on, others off), on or off. With a few images under MSE the initial "
                          "output's noise can outweigh what they teach (docs/transfer.md)",
                  choices=("auto", "on", "off"))
  baselines: str = f("random", "comma-separated baseline rows: random, full (or none)")
  distilled: bool = f(True, "train the set's own row (--no-distilled: the baselines only, e.g. "
                            "the random row beside a set measured before; the set then gives "
                            "the size and the preprocessing; transfer.json lists this call's "
                            "rows, each row's own folder keeps its records)")
  eval_every: int = f(0, "steps between test evaluations along the way, for the curve (0: 10 "
                         "per run)", minimum=0)


def _rows(config: Config) -> list[str]:
  names = [b.strip() for b in config.baselines.split(",") if b.strip() and b.strip() != "none"]
  unknown = [b for b in names if b not in ROWS[1:]]
  if unknown:
    raise cli.UserError(f"unknown baseline {', '.join(unknown)}; choose random, full or none")
  rows = ["distilled"] * config.distilled + list(dict.fromkeys(names))
  if not rows:
    raise cli.UserError("nothing to train: --no-distilled needs a baseline (--baselines random)")
  return rows


def _check(config: Config) -> list[str]:
  """The rows to train, once the flags and the set have been read: a bad file is refused before
  the workdir exists."""
  if not config.support:
    raise cli.UserError("--support FILE.npz is required")
  rows = _rows(config)
  if config.lr_grid and config.lr:
    raise cli.UserError("--lr and --lr-grid exclude each other: give one rate or rates to choose "
                        "from")
  _lr_grid(config)
  config.load(config.support, config.dataset)
  return rows


def _lr_grid(config: Config) -> list[tuple[float, float]]:
  """The entries of --lr-grid as (rate, multiple): (r, 1) for a rate r, (0, m) for xm, a multiple
  of the row's own rate (UserError naming a bad one)."""
  entries = []
  for text in filter(None, (t.strip() for t in config.lr_grid.split(","))):
    relative = text.lower().startswith("x")
    try:
      value = float(text[1:] if relative else text)
    except ValueError:
      value = np.nan
    if not np.isfinite(value) or value <= 0 or value > cli.FLOAT_MAXIMUM:
      raise cli.UserError(f"--lr-grid: {text!r} is not a positive learning rate (or xM, a "
                          "positive multiple of the row's rate)")
    entries.append((0.0, value) if relative else (value, 1.0))
  return sorted(set(entries))


def _grid_name(rate: float, multiple: float) -> str:
  return f"x{multiple:g}" if rate == 0 else f"{rate:g}"


# The finite net of each analytic kernel: a set distilled with a kernel trains, under the `kip`
# protocol's `--net auto`, on the architecture it was distilled for (as the KIP papers transfer).
KERNEL_NET = {"fc": "mlp", "conv": "conv", "convnet": "convnet", "convnet3": "convnet3"}


def _kernel_net(distilled) -> tuple[str, int] | None:
  """(net, depth) of the analytic kernel the set was distilled with (ours: its recorded config;
  a KIP/LS release: the architecture its name says), None when it names none."""
  recorded = (distilled.meta.get("config") or {}) if distilled is not None else {}
  kernel = recorded.get("kernel") if isinstance(recorded, dict) else None
  if kernel in KERNEL_NET:
    depth = int(recorded.get("depth") or 0) if kernel in ("fc", "conv") else 0
    return KERNEL_NET[kernel], depth
  release = getattr(distilled, "release", None)
  arch = (release.arch or "").lower() if release is not None else ""
  return (arch, 0) if arch in ("convnet", "convnet3") else None


def _net_settings(config: Config, distilled=None) -> tuple[str, int, str, int, str]:
  """(net, width, norm, depth, why): the protocol's defaults where the flags say auto/0; under
  the `kip` protocol `--net auto` is the architecture of the set's kernel (`why` says so)."""
  protocol = PROTOCOLS[config.protocol]
  net, depth, why = protocol.net, config.depth, ""
  if config.net != "auto":
    net = config.net
  elif config.protocol == "kip" and (own := _kernel_net(distilled)) is not None:
    net, depth, why = own[0], config.depth or own[1], " (the architecture of the set's kernel)"
  cpu = config.preset == "cpu" and cpu_preset(config.protocol).width
  width = config.width or (64 if net == "resnet18" else
                           cpu_preset(config.protocol).width if cpu else protocol.width)
  if config.norm != "auto":
    norm = config.norm
  else:
    norm = {"resnet18": "batch", "mlp": "none", "conv": "none"}.get(net, protocol.norm)
  return net, width, norm, depth, why


def _protocol(config: Config):
  """The protocol as configured: `--center on/off` overrides its own output centring and, with
  it, where the weight penalty pulls (a penalty toward 0 would shrink the weights and bring the
  subtracted initial output back as -f_init(x))."""
  protocol = PROTOCOLS[config.protocol]
  if config.center == "auto":
    return protocol
  on = config.center == "on"
  return dataclasses.replace(protocol, center_output=on, decay_to_init=on)


def transfer(config: Config, workdir: str) -> dict:
  """Trains every row's networks (resuming finished rows from `workdir`); returns the report."""
  rows = _check(config)
  distilled = config.load(config.support, config.dataset)
  data = data_for_set(distilled, config.dataset, preprocess=config.preprocessing(),
                      data_dir=config.data_dir, manual_dir=config.manual_dir)
  protocol = _protocol(config)
  net_name, width, norm, depth, why = _net_settings(config, distilled)
  image_shape = distilled.images.shape[1:]
  if net_name in ("convnet", "convnet3"):
    depth = depth or default_depth(image_shape)
  net = make_net(net_name, data.num_classes, width=width, norm=norm,
                 parameterization=config.parameterization, image_shape=image_shape,
                 dc_padding=protocol.dc_padding, depth=depth or None)
  depth = getattr(net, "depth", 0)
  seeds = [config.seed + i for i in range(config.seeds)]
  n_support = len(distilled.images)
  cli.log(f"{config.support}: {n_support} images; test split: {len(data.x_test)} images, "
          f"{data.preprocessor.name}; net {net_name}{why} (width {width}, "
          f"{f'depth {depth}, ' if depth else ''}"
          f"norm {norm}, "
          f"{config.parameterization}); protocol {config.protocol} ({protocol.source})"
          f"{'; output at initialisation subtracted' if protocol.center_output else ''}")
  augment = None if config.augment == "auto" else config.augment
  set_lr = float(np.asarray(distilled.extras["lr"])) if "lr" in distilled.extras else 0.0
  grid = _lr_grid(config)
  if set_lr <= 0 and "lr" in distilled.extras and not config.lr and not grid:
    cli.log(f"the set's learned learning rate {set_lr:.4g} is not positive: its row trains at "
            "the protocol's rate instead (--lr or --lr-grid to choose)")
    set_lr = 0.0
  elif set_lr and not config.lr and not grid:
    cli.log(f"the set carries a learned learning rate: {set_lr:.4g} for its own row (--lr to "
            "override)")
  validation = None
  if grid:
    if config.val_size >= len(data.labels_train):
      raise cli.UserError(f"--val-size {config.val_size}: the training split has only "
                          f"{len(data.labels_train)} images")
    val_idx, keep = validation_split(data.labels_train, config.val_size, config.seed)
    validation = (data.x_train[val_idx], data.labels_train[val_idx])
    data = data._replace(x_train=data.x_train[keep], y_train=data.y_train[keep],
                         labels_train=data.labels_train[keep])
    cli.log(f"--lr-grid {', '.join(_grid_name(*e) for e in grid)}: each row's rate chosen on "
            f"{config.val_size} validation images held out of the training split")
  # The whole job, planned before it starts: one progress bar counts every training's steps, so
  # its ETA is the job's remaining steps at the current step rate (the evaluations and the
  # compilation still to come are not foreseen).
  at_once = config.seeds_at_once or len(seeds)
  groups = -(-len(seeds) // at_once)
  planned = {}
  for row in rows:
    x, y, steps = _row_data(row, config, distilled, data, seeds)
    total_steps = resolve_schedule(protocol, x.shape[-4], steps=steps, augment=augment,
                                   dataset=config.dataset).steps
    planned[row] = (x, y, steps, total_steps)
  runs = (len(grid) + 1) * groups
  job_steps = sum(runs * p[3] for p in planned.values())
  evals = config.eval_every and "test evaluations every " + str(config.eval_every) + " steps"
  cli.log_job(f"{len(rows)} row{'s' * (len(rows) > 1)} ("
              + ", ".join(f"{r} {p[3]:,} steps" for r, p in planned.items())
              + f"), {len(seeds)} seeds each" + (f" in {groups} groups" if groups > 1 else "")
              + (f", {len(grid)} validation runs and a final one per row" if grid else ""),
              job_steps, f" with {evals or '10 test evaluations per training'}")
  done = [0]  # steps of the job's finished trainings

  results = []
  for index, row in enumerate(rows):
    row_dir = os.path.join(workdir, row)  # the loop's workdir: a finished row is not redone
    x, y, steps, total_steps = planned[row]
    label = f"[{index + 1}/{len(rows)}] {row}" if len(rows) > 1 else row

    def train(lr, x_eval, labels_eval, folder, description, lr_scale=1.0, row=row, x=x, y=y,
              steps=steps, total_steps=total_steps):
      trained: list[TrainResult] = []
      for start in range(0, len(seeds), at_once):
        group = seeds[start:start + at_once]
        part = (slice(start, start + len(group)),) if x.ndim == 5 else ()
        suffix = f"seeds{group[0]}-{group[-1]}" if at_once < len(seeds) else ""
        trained.append(train_and_evaluate(
            net, protocol, x[part] if part else x, y[part] if part else y, x_eval, labels_eval,
            seeds=group, steps=steps, lr=lr, lr_scale=lr_scale, augment=augment,
            eval_every=config.eval_every or max(1, total_steps // 10),
            workdir=os.path.join(folder, suffix) if suffix else folder,
            progress=config.progress, log=cli.log, description=description,
            seed_batching=config.seed_batching, dataset=config.dataset,
            span=(done[0], job_steps)))
        done[0] += total_steps
      return trained

    own = config.lr or (set_lr if row == "distilled" else 0.0)  # 0: the protocol's or kip's NTK
    search, search_wall = [], 0.0
    if grid:
      for rate, multiple in grid:
        name = _grid_name(rate, multiple)
        try:
          tried = train(rate or own, *validation, os.path.join(row_dir, f"lr{name}"),
                        f"{label} lr {name}", lr_scale=multiple)
        except NonFiniteLossError as e:
          # A rate whose networks diverge is a candidate that lost, not the end of the job.
          search.append({"lr": None, "grid": name, "val_acc": None, "val_acc_mean": None,
                         "diverged": str(e).split(";")[0]})
          cli.log(f"{row}, lr {name}: diverged ({search[-1]['diverged']}); not chosen")
          continue
        val_acc = np.concatenate([t.test_acc for t in tried])
        search_wall += sum(t.wall_time for t in tried)
        search.append({"lr": tried[0].lr, "grid": name, "val_acc": [float(a) for a in val_acc],
                       "val_acc_mean": float(val_acc.mean())})
        cli.log(f"{row}, lr {tried[0].lr:.4g} ({name}): validation "
                f"{cli.percent(val_acc.mean(), val_acc.std())}%")
      finished = [i for i in range(len(grid)) if search[i]["val_acc_mean"] is not None]
      if not finished:
        raise cli.UserError(f"{row}: every rate of --lr-grid diverged; try smaller ones")
      best = max(finished, key=lambda i: search[i]["val_acc_mean"])  # ties: the first
      rate, multiple = grid[best]
      own = rate or own
      cli.log(f"{row}: lr {search[best]['lr']:.4g} ({search[best]['grid']}) chosen on the "
              "validation split")
    trained = train(own, data.x_test, data.labels_test, row_dir, label,
                    lr_scale=multiple if grid else 1.0)
    acc = np.concatenate([t.test_acc for t in trained])
    result = {
        "row": row, "set": os.path.basename(config.support) if row == "distilled" else row,
        "n_images": int(x.shape[-4]), "net": net_name, "width": width, "norm": norm,
        "protocol": config.protocol, "seeds": seeds, "centered": protocol.center_output,
        "labels": config.labels if row == "distilled" else "hard",
        "test_acc": [float(a) for a in acc], "test_acc_mean": float(acc.mean()),
        "test_acc_std": float(acc.std()), "steps": trained[0].steps, "lr": trained[0].lr,
        "train_time": float(sum(t.train_time for t in trained)),
        "wall_time": float(sum(t.wall_time for t in trained) + search_wall),
        "cpu_time": float(sum(t.cpu_time for t in trained)),
        "images_per_s": float(np.nanmean([t.images_per_s for t in trained])),
        "params": trained[0].params,
    }
    if search:
      result |= {"lr_search": search, "val_size": config.val_size}
    results.append(result)
    cli.log(f"{row}: {_format_acc(result)}")
  report = {"config": dataclasses.asdict(config), "preprocessing": data.preprocessor.name,
            "test_images": len(data.x_test), "rows": results}
  write_json(os.path.join(workdir, "transfer.json"), report)
  return report


def _row_data(row: str, config: Config, distilled, data, seeds):
  """(x, y, steps) of a row; the random baseline has one subset per seed: (n_seeds, n, ...)."""
  if row == "distilled":
    if distilled.labels is None:
      raise cli.UserError(f"{config.support} holds regression targets, not labels: the kip, dc "
                          "and frepo protocols train classifiers")
    labels = distilled.labels
    if config.labels == "hard":
      labels = centered_one_hot(np.argmax(labels, -1), labels.shape[-1])
    return distilled.images, labels, _steps(config)
  if row == "full":
    return data.x_train, data.y_train, config.full_steps
  n = len(distilled.images)
  if n % data.num_classes:
    raise cli.UserError(f"the set has {n} images, not a multiple of {data.num_classes} classes; "
                        "the random baseline needs a class-balanced size")
  ipc = n // data.num_classes
  idx = np.stack([class_balanced_indices(data.labels_train, ipc, np.random.default_rng([s, 7]),
                                         data.num_classes) for s in seeds])
  return (data.x_train[idx], centered_one_hot(data.labels_train[idx], data.num_classes),
          _steps(config))


def _steps(config: Config) -> int:
  preset = cpu_preset(config.protocol)
  if config.steps or config.preset != "cpu" or preset.steps is None:
    return config.steps
  return preset.steps


def _format_acc(result: dict) -> str:
  return (f"{cli.percent(result['test_acc_mean'], result['test_acc_std'])}% "
          f"({len(result['seeds'])} seeds)")


def format_table(report: dict) -> str:
  # "updates": the final trainings' steps alone; "wall": the row's whole time (compilation, the
  # test evaluations along the way, and the validation runs of an --lr-grid).
  return cli.format_table(
      ("set", "images", "net", "protocol", "test acc (%)", "steps", "lr", "updates (s)",
       "wall (s)", "img/s"),
      [(r["set"], str(r["n_images"]), f"{r['net']}-{r['width']}", r["protocol"],
        cli.percent(r["test_acc_mean"], r["test_acc_std"]), str(r["steps"]), f"{r['lr']:.3g}",
        f"{r['train_time']:.0f}", f"{r['wall_time']:.0f}", f"{r['images_per_s']:.0f}")
       for r in report["rows"]])


def run(config: Config, workdir: str, devices) -> list[str]:
  report = transfer(config, workdir)
  return [format_table(report),
          f"test split: {report['test_images']} images ({report['preprocessing']}); "
          f"written {os.path.join(workdir, 'transfer.json')}"]


# What a re-run in the same workdir may change: rows are folders of their own (add or leave out
# any); the curve's cadence may change. Unlike `cli.prepare_workdir`'s default, `steps` is compared.
NOT_SETTINGS = (*cli.NOT_SETTINGS, "seeds_at_once", "seed_batching", "eval_every", "baselines",
                "distilled")

JOB = Job("transfer", Config, run,
          folder=lambda c: [c.dataset, _net_settings(c)[0], c.protocol],
          inputs=lambda c: {"support": c.support}, check=_check, ignore=NOT_SETTINGS)
