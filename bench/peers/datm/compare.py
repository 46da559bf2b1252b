"""DATM side by side: the official code (bench/peers/datm/official.py) and ours
(`experiments.datm`).

Issue 39: at equal compute (our `cpu` presets: 4 experts of ConvNet-3 width 32 with instance norm,
6 epochs of SGD lr 0.01 on all of MNIST with DSA per image; then 300 iterations of 10 student
steps, expert epochs 2, the start-epoch bound widening from 2 to 5, images lr 100, lr lr 1e-5,
soft labels lr 2 momentum 0.9, initial lr 0.01, updates above a loss of 1 skipped, initial images
an expert classifies correctly), run DATM on MNIST with both codes and evaluate every set with the
same evaluators. DATM's compute includes its experts. Expert sets (`EXPERTS`):

- `official`: DATM's own buffer script, `buffer_FTD.py`: GSAM around SGD (the README's rho 0.01,
  alpha 0.3), trained here (`--root`/experts/official);
- `ours`: our cpu buffer, which DATM shares with MTT: the MTT comparison's `ours` experts
  (`--mtt-runs`/experts/ours), reused, or trained there with the same command when absent;
- `mtt`: MTT's official `buffer.py` (plain SGD, our experts' settings): the MTT comparison's
  `official` experts, reused likewise.

Sides (`SIDES`: distiller, experts): `official` and `ours` (each code with its own buffer code:
the headline), `official_on_mtt` (the official distiller on the official SGD experts of our
settings), and the crosses `official_on_ours`, `ours_on_official`, `ours_on_mtt` on experts
converted between the formats (MTT's bench/peers/mtt/convert.py, checked by logits). Reused MTT
experts are checked to have been made with this comparison's settings.

Every set is evaluated by ours, `experiments.transfer --protocol dsa` at the set's learned lr with
its soft labels (soft cross-entropy), and with `--official-eval-nets K` by the official
`evaluate_synset` with DATM's `SoftCrossEntropy` (our sets converted to DC's space, their label
logits). Runs under the project's Python and starts the official side with the PyTorch
environment's. Runs go to `--root`: experts/, then <side>/ipc<ipc>_seed<seed>/; a step whose
marker exists is skipped, so the command resumes. Writes `--out` (.json: every record; .md: the
tables).

    KIP_MANUAL_DIR=/work/shared/data python bench/peers/datm/compare.py --ipcs 1,10 --seeds 0,1,2

bench/peers/pad/compare.py is this module with PAD's `Spec`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, REPO)  # run as a script: the repository's packages
from bench.peers.common import (  # noqa: E402
  interval_n,
  paired_differences,
  read_json,
  write_json,
)
from bench.peers.dm.compare import ours_times  # noqa: E402
from bench.peers.mtt import compare as mtt  # noqa: E402
from methods.datm import PRESETS as DATM_PRESETS  # noqa: E402
from methods.datm import Config as DATMConfig  # noqa: E402
from methods.experts import PRESETS as BUFFER_PRESETS  # noqa: E402
from methods.experts import Config as BufferConfig  # noqa: E402

BUFFER = mtt.BUFFER  # the experts' settings (our cpu preset), both sides
DATM = DATMConfig(**DATM_PRESETS["cpu"])  # the distillation's (DATM and PAD share the preset)


class Spec(NamedTuple):
  """What DATM's and PAD's comparisons do differently; the rest of this module serves both."""

  name: str  # datm | pad: our command experiments.<name>, the official set's file names
  title: str  # the tables' heading
  sides: dict  # side -> (distiller, variant, experts)
  default_sides: str
  contrasts: tuple  # (a, b, what a - b measures)
  official_py: str  # the official runner
  root_flag: str  # its checkout flag
  root_default: str
  experts_native: dict  # experts -> the format its code writes (official | ours)
  expert_dir: Callable  # (args, experts) -> folder of the experts in their own format
  make_experts: Callable  # (args, experts) -> record ({}: not made)
  variant_flags: Callable  # (args, side, ipc) -> extra flags of the side's distiller
  duplicate_of: Callable  # (args, side, ipc, sides) -> the side it equals at this ipc, or None


def parse_args(spec: Spec, argv=None, extra: Callable | None = None,
               doc: str | None = None) -> argparse.Namespace:
  """The command line; `extra(parser)` adds a method's flags, `doc` its description."""
  p = argparse.ArgumentParser(description=(doc or __doc__).split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--ipcs", default="1,10", help="comma-separated images per class")
  p.add_argument("--seeds", default="0,1,2", help="comma-separated distillation seeds")
  p.add_argument("--sides", default=spec.default_sides,
                 help=f"comma-separated, among {', '.join(spec.sides)}")
  g = p.add_argument_group("experts (defaults: experiments.buffer --preset cpu)")
  g.add_argument("--experts", type=int, default=BUFFER.experts)
  g.add_argument("--epochs", type=int, default=BUFFER.epochs, help="epochs per expert")
  g.add_argument("--width", type=int, default=BUFFER.width, help="ConvNet width")
  g.add_argument("--expert-seed", type=int, default=0)
  g.add_argument("--train-size", type=int, default=0,
                 help="experts train on a class-balanced subset of this many images (0: all; "
                      "smoke tests only)")
  g = p.add_argument_group(f"distillation (defaults: experiments.{spec.name} --preset cpu)")
  g.add_argument("--steps", type=int, default=DATM.steps, help="iterations")
  g.add_argument("--syn-steps", type=int, default=DATM.syn_steps)
  g.add_argument("--expert-epochs", type=int, default=DATM.expert_epochs)
  g.add_argument("--max-start-epoch", type=int, default=DATM.max_start_epoch,
                 help="the start epochs' bound at the first iteration (official: "
                      "--current-max-start-epoch)")
  g.add_argument("--max-start-epoch-final", type=int, default=DATM.max_start_epoch_final,
                 help="... at the last (official: --max-start-epoch, reached at iteration "
                      "steps - 1 by --expansion-end-epoch)")
  g.add_argument("--lr-img", type=float, default=DATM.lr_img)
  g.add_argument("--lr-lr", type=float, default=DATM.lr_lr)
  g.add_argument("--lr-init", type=float, default=DATM.lr_init)
  g.add_argument("--lr-y", type=float, default=DATM.lr_y)
  g.add_argument("--threshold", type=float, default=DATM.threshold)
  g.add_argument("--label-epoch", type=int, default=-1,
                 help="official --label-model-timestamp: the experts' epoch whose logits pick "
                      "the images and initialise the labels (-1: the last, the official default; "
                      "ours uses --max-start-epoch's)")
  g.add_argument("--run-eval-steps", type=int, default=DATM.eval_steps,
                 help="our run's own end-of-run evaluation (outside its timing; smoke tests: "
                      "fewer)")
  g = p.add_argument_group("evaluation")
  g.add_argument("--eval-seeds", type=int, default=5, help="networks of our evaluator per set")
  g.add_argument("--eval-width", type=int, default=0,
                 help="width of our evaluator's ConvNet (0: the experts' --width)")
  g.add_argument("--eval-steps", type=int, default=0,
                 help="training steps of our evaluator (0: the dsa protocol's 1000 epochs)")
  g.add_argument("--official-eval-nets", type=int, default=0,
                 help="networks of the official evaluate_synset per set (0: skip)")
  g.add_argument("--official-eval-epochs", type=int, default=1000)
  if extra:
    extra(p)
  p.add_argument("--root", default=os.path.join(REPO, "runs", "peers", spec.name))
  p.add_argument("--mtt-runs", default=os.path.join(REPO, "runs", "peers", "mtt"),
                 help="the MTT comparison's --root: its experts are reused (and converted "
                      "there) where the settings are the same")
  p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "peers",
                                               f"{spec.name}_mnist.json"),
                 help="records (.json); the tables go beside it (.md)")
  p.add_argument("--torch-python", default="/work/venvs/torch/bin/python")
  p.add_argument(spec.root_flag, dest="official_root",
                 default=os.environ.get(spec.root_flag[2:].replace("-", "_").upper(),
                                        spec.root_default))
  p.add_argument("--mtt-root",
                 default=os.environ.get("MTT_ROOT", "/work/peers/mtt-distillation"),
                 help="the MTT checkout: its runner converts experts between the formats (the "
                      "same ConvNetW<width> as DATM's and PAD's)")
  p.add_argument("--core", default="0",
                 help="taskset CPU list of the experts and distillations ('' for none)")
  p.add_argument("--eval-core", default="", help="taskset CPU list of the evaluations")
  p.add_argument("--no-distill", action="store_true",
                 help="no experts or distillations: evaluate and tabulate what exists")
  p.add_argument("--no-eval", action="store_true", help="experts and distillations only")
  args = p.parse_args(argv)
  if set(args.sides.split(",")) - set(spec.sides):
    p.error(f"unknown side in --sides {args.sides}; choose among {', '.join(spec.sides)}")
  return args


def official(args, spec: Spec, command: str, *flags: str) -> list[str]:
  return [args.torch_python, spec.official_py, command, spec.root_flag, args.official_root,
          "--width", str(args.width), "--threads", "1", *flags]


def mtt_args(args, root: str | None = None) -> argparse.Namespace:
  """What the MTT comparison's expert functions read: its experts of this comparison's settings
  under `root` (default --mtt-runs)."""
  return argparse.Namespace(root=root or args.mtt_runs, experts=args.experts,
                            epochs=args.epochs, width=args.width, expert_seed=args.expert_seed,
                            train_size=args.train_size, core=args.core,
                            no_distill=args.no_distill, torch_python=args.torch_python,
                            mtt_root=args.mtt_root)


def expert_folder(spec: Spec, args, experts: str, fmt: str) -> str:
  """The folder of `experts` in format `fmt` (official .pt files or our store)."""
  base = spec.expert_dir(args, experts)
  return base if spec.experts_native[experts] == fmt else f"{base}_as_{fmt}"


def convert(spec: Spec, args, experts: str) -> dict:
  """`experts` in the other format (once; MTT's conversion with its logit check)."""
  base = spec.expert_dir(args, experts)
  ns = mtt_args(args, root=os.path.dirname(os.path.dirname(base)))
  return mtt.convert_experts(ns, os.path.basename(base), native=spec.experts_native[experts])


def official_buffer_flags(args) -> list[str]:
  """The official buffer script's flags at our buffer preset's settings."""
  return ["--experts", str(args.experts), "--epochs", str(args.epochs), "--lr-teacher",
          str(BUFFER.lr), "--mom", str(BUFFER.momentum), "--l2", str(BUFFER.weight_decay),
          "--batch-train", str(BUFFER.batch), "--dsa-strategy", BUFFER.augment, "--seed",
          str(args.expert_seed), "--train-size", str(args.train_size)]


def train_official_experts(spec: Spec, args, experts: str, *flags: str) -> dict:
  """The method's own official buffer script into expert_dir (once); experts/<name>.json marks
  it done."""
  folder = spec.expert_dir(args, experts)
  marker = folder + ".json"
  if os.path.exists(marker):
    return read_json(marker)
  if args.no_distill:
    return {}
  os.makedirs(os.path.dirname(folder), exist_ok=True)
  cmd = official(args, spec, "buffer", *official_buffer_flags(args), *flags, "--out", folder)
  cpu, wall = mtt.run(cmd, folder + ".log", args.core, f"experts ({experts}) -> {folder}")
  record = {"side": experts, "command": cmd, "process_cpu_s": cpu, "process_wall_s": wall,
            "core": args.core} | mtt.expert_records("official", folder)
  write_json(marker, record)
  return record


def our_buffer_settings(args, **flags) -> dict:
  """The expert settings `experiments.buffer --preset cpu` records for this comparison."""
  config = BufferConfig(**(BUFFER_PRESETS["cpu"] | {
      "dataset": "mnist", "preset": "cpu", "experts": args.experts, "epochs": args.epochs,
      "width": args.width, "seed": args.expert_seed, "train_size": args.train_size} | flags))
  return json.loads(json.dumps(config.expert_settings()))


def check_settings(folder: str, have: dict, want: dict, count: int, needed: int) -> None:
  differ = [f"{k} {have.get(k)!r} (here {v!r})" for k, v in want.items() if have.get(k) != v]
  if differ:
    sys.exit(f"{folder}: its experts were made with other settings: {'; '.join(differ)}; "
             "pass another --mtt-runs (or these settings)")
  if count < needed:
    sys.exit(f"{folder}: {count} experts, this comparison needs {needed}")


def check_mtt_experts(args, experts: str, folder: str) -> None:
  """The MTT comparison's experts serve here only if made with this comparison's settings."""
  if experts == "ours":
    from methods.trajectory import ExpertStore  # noqa: PLC0415

    store = ExpertStore.open(folder)
    check_settings(folder, store.settings, our_buffer_settings(args), len(store.experts()),
                   args.experts)
  else:
    done = read_json(os.path.join(folder, "buffer.json"))
    want = {"width": args.width, "seed": args.expert_seed, "epochs": args.epochs,
            "lr_teacher": BUFFER.lr, "mom": BUFFER.momentum, "l2": BUFFER.weight_decay,
            "batch_train": BUFFER.batch, "dsa_strategy": BUFFER.augment,
            "train_size": args.train_size}
    check_settings(folder, done["settings"], want, len(done["experts"]), args.experts)


# ----------------------------------------------------------------------------- DATM's spec

def datm_expert_dir(args, experts: str) -> str:
  if experts == "official":
    return os.path.join(args.root, "experts", "official")
  return os.path.join(args.mtt_runs, "experts", {"ours": "ours", "mtt": "official"}[experts])


def datm_make_experts(args, experts: str) -> dict:
  if experts == "official":  # buffer_FTD.py: GSAM at the README's rho and alpha (runner defaults)
    return train_official_experts(DATM_SPEC, args, "official")
  record = mtt.make_experts(mtt_args(args), {"ours": "ours", "mtt": "official"}[experts])
  if record:
    check_mtt_experts(args, experts, datm_expert_dir(args, experts))
  return record


DATM_SPEC = Spec(
    name="datm", title="DATM",
    sides={"official": ("official", "-", "official"), "ours": ("ours", "-", "ours"),
           "official_on_mtt": ("official", "-", "mtt"),
           "official_on_ours": ("official", "-", "ours"),
           "ours_on_official": ("ours", "-", "official"), "ours_on_mtt": ("ours", "-", "mtt")},
    default_sides="official,ours,official_on_mtt",
    contrasts=(
        ("ours", "official", "headline: each code on its own buffer code's experts"),
        ("ours", "official_on_mtt", "each code on SGD experts of its own code, same settings"),
        ("ours", "official_on_ours", "distiller, our experts: ours - official"),
        ("ours_on_mtt", "official_on_mtt", "distiller, MTT's official experts: ours - official"),
        ("ours_on_official", "official", "distiller, GSAM experts: ours - official"),
        ("official_on_mtt", "official", "experts, official distiller: SGD - GSAM"),
        ("official_on_ours", "official_on_mtt", "experts, official distiller: ours - official "
                                                "SGD")),
    official_py=os.path.join(HERE, "official.py"), root_flag="--datm-root",
    root_default="/work/peers/DATM",
    experts_native={"official": "official", "ours": "ours", "mtt": "official"},
    expert_dir=datm_expert_dir, make_experts=datm_make_experts,
    variant_flags=lambda args, side, ipc: [],
    duplicate_of=lambda args, side, ipc, sides: None)


# ----------------------------------------------------------------------------- distillation

def distill(spec: Spec, args, side: str, ipc: int, seed: int, folder: str) -> None:
  """One distillation into `folder`; `folder/run.json` marks it done."""
  marker = os.path.join(folder, "run.json")
  if os.path.exists(marker):
    return
  os.makedirs(folder, exist_ok=True)
  distiller, _, experts = spec.sides[side]
  common = ["--ipc", str(ipc), "--seed", str(seed), "--syn-steps", str(args.syn_steps),
            "--expert-epochs", str(args.expert_epochs), "--batch-syn", str(mtt.batch_syn(ipc)),
            "--lr-img", str(args.lr_img), "--lr-lr", str(args.lr_lr), "--lr-y", str(args.lr_y),
            "--threshold", str(args.threshold), *spec.variant_flags(args, side, ipc)]
  buffer = expert_folder(spec, args, experts, distiller)
  if distiller == "official":
    cmd = official(args, spec, "distill", "--buffer", buffer, *common, "--iterations",
                   str(args.steps), "--lr-teacher", str(args.lr_init),
                   "--current-max-start-epoch", str(args.max_start_epoch), "--max-start-epoch",
                   str(args.max_start_epoch_final), "--label-model-timestamp",
                   str(args.label_epoch), "--out", folder)
  else:
    cmd = [sys.executable, "-m", f"experiments.{spec.name}", "--dataset", "mnist", "--preset",
           "cpu", "--buffer", buffer, "--experts", str(args.experts), *common, "--steps",
           str(args.steps), "--lr-init", str(args.lr_init), "--max-start-epoch",
           str(args.max_start_epoch), "--max-start-epoch-final", str(args.max_start_epoch_final),
           "--eval-every", "0", "--eval-steps", str(args.run_eval_steps), "--no-progress",
           "--workdir", folder]
  cpu, wall = mtt.run(cmd, os.path.join(folder, "distill.log"), args.core,
                      f"distil {side} ipc {ipc} seed {seed} -> {folder}")
  record = {"side": side, "ipc": ipc, "seed": seed, "command": cmd, "process_cpu_s": cpu,
            "process_wall_s": wall, "core": args.core}
  if distiller == "official":
    done = read_json(os.path.join(folder, "official.json"))
    record |= {k: done[k] for k in ("distill_cpu_s", "distill_wall_s", "commit",
                                    "skipped_fraction", "initial_label_acc")}
    record["lr"] = done["syn_lr"][-1]
  else:
    record |= ours_times(folder)
    with np.load(os.path.join(folder, "distilled.npz")) as f:
      record["lr"] = float(f["extra_lr"])
    steps = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))
             if '"skipped"' in line]
    record["skipped_fraction"] = float(np.mean([r["skipped"] for r in steps])) if steps else None
  record["steady_cpu_s_per_step"] = mtt.steady_cpu_per_step(side, folder, distiller)
  write_json(marker, record)


# ----------------------------------------------------------------------------- evaluation

def support_path(spec: Spec, side: str, folder: str) -> str:
  if spec.sides[side][0] == "official":
    return os.path.join(folder, f"images_{spec.name}_official.npy")
  return os.path.join(folder, "distilled.npz")


def dc_triple(spec: Spec, folder: str) -> str:
  """Our set as an images/labels/lr .npy triple for the official evaluate_synset: images in DC's
  space (NCHW), labels as logits (our learned ones; the softmax is the set's labels)."""
  from kip.io import load_distilled  # noqa: PLC0415
  from kip.readers import DC_STATS  # noqa: PLC0415

  d = load_distilled(os.path.join(folder, "distilled.npz"), "mnist")
  (dc_mean,), (dc_std,) = DC_STATS["mnist"]
  pixels = d.images * np.asarray(d.preprocessor.std) + np.asarray(d.preprocessor.mean)
  logits = d.extras.get("label_logits")
  if logits is None:  # probabilities: their log has the same softmax
    logits = np.log(np.clip(d.labels, 1e-30, None))
  path = os.path.join(folder, f"images_{spec.name}_ours_dcspace.npy")
  np.save(path, ((pixels - dc_mean) / dc_std).transpose(0, 3, 1, 2).astype(np.float32))
  np.save(path.replace("images_", "labels_"), np.asarray(logits, np.float32))
  np.save(path.replace("images_", "lr_"), np.asarray(d.extras["lr"], np.float32))
  return path


def evaluate_official(spec: Spec, args, side: str, folder: str, lr: float) -> list[float]:
  """Accuracies of `--official-eval-nets` networks of the official evaluate_synset at `lr`."""
  path = os.path.join(folder, "eval_official.json")
  if not os.path.exists(path):
    support = (support_path(spec, side, folder) if spec.sides[side][0] == "official"
               else dc_triple(spec, folder))
    log = os.path.join(folder, "eval_official.log")
    cmd = official(args, spec, "evaluate", "--support", support, "--nets",
                   str(args.official_eval_nets), "--eval-epochs",
                   str(args.official_eval_epochs), "--lr", repr(lr))
    cpu, wall = mtt.run(cmd, log, args.eval_core,
                        f"evaluate (official evaluate_synset) {folder}")
    last = [line for line in open(log) if line.startswith('{"support"')][-1]
    write_json(path, json.loads(last) | {"process_cpu_s": cpu, "process_wall_s": wall})
  return read_json(path)["accs"]


# ----------------------------------------------------------------------------- tables

def table(spec: Spec, records: list[dict]) -> str:
  from kip.cli import format_table  # noqa: PLC0415

  def pct(v):
    return f"{100 * v:.0f}" if v is not None else "-"

  rows = []
  for ipc in sorted({r["ipc"] for r in records}):
    for side in spec.sides:
      rs = [r for r in records if r["side"] == side and r["ipc"] == ipc]
      if not rs:
        continue
      ours_eval = [a for r in rs for a in r.get("acc_ours_dsa", [])]
      official_eval = [a for r in rs for a in r.get("acc_official", [])]
      steady = [r["steady_cpu_s_per_step"] for r in rs if r.get("steady_cpu_s_per_step")]
      cpu = [r["distill_cpu_s"] for r in rs if "distill_cpu_s" in r]
      rows.append((side, *spec.sides[side], str(ipc), ",".join(str(r["seed"]) for r in rs),
                   interval_n(ours_eval), interval_n(official_eval),
                   ", ".join(f"{r['lr']:.4f}" for r in rs),
                   ", ".join(pct(r.get("skipped_fraction")) for r in rs),
                   f"{np.mean(cpu):.0f}" if cpu else "-",
                   f"{np.mean(steady):.2f}" if steady else "-"))
  return format_table(("side", "distiller", "variant", "experts", "ipc", "seeds",
                       "acc %, ours dsa eval: mean [95% t]", "acc %, official eval",
                       "learned lr", "skipped %", "distill CPU-s", "steady CPU-s / iteration"),
                      rows)


def paired(spec: Spec, records: list[dict]) -> str:
  """a - b per (ipc, seed, evaluation network) for each of the spec's contrasts
  (`common.paired_differences`), under each evaluator."""
  from kip.cli import format_table  # noqa: PLC0415

  rows = [(name, what, str(ipc), ",".join(seeds), interval_n(diffs))
          for key, name in (("acc_ours_dsa", "ours dsa eval"), ("acc_official", "official eval"))
          for a, b, what in spec.contrasts
          for ipc, seeds, diffs in paired_differences(records, a, b, key)]
  return format_table(("evaluator", "contrast", "ipc", "seeds", "difference, points: mean [95% t]"),
                      rows)


def main(spec: Spec = DATM_SPEC, argv=None, extra: Callable | None = None,
         doc: str | None = None) -> None:
  """Experts, conversions, distillations and evaluations of the chosen sides, then the tables;
  PAD's compare calls it with its `Spec`, flags and description."""
  args = parse_args(spec, argv, extra, doc)
  ipcs = [int(v) for v in args.ipcs.split(",")]
  seeds = [int(v) for v in args.seeds.split(",")]
  sides = args.sides.split(",")
  needed = list(dict.fromkeys(spec.sides[side][2] for side in sides))
  experts = {name: spec.make_experts(args, name) for name in needed}
  conversions = {}
  for side in sides:
    distiller, _, source = spec.sides[side]
    if spec.experts_native[source] != distiller and source not in conversions:
      conversions[source] = convert(spec, args, source)
  records = []
  for seed in seeds:
    for ipc in ipcs:
      for side in sides:
        same = spec.duplicate_of(args, side, ipc, sides)
        if same:
          print(f"{side} at ipc {ipc} is {same} (no parameter left out): not run", flush=True)
          continue
        distiller, _, source = spec.sides[side]
        folder = os.path.join(args.root, side, f"ipc{ipc}_seed{seed}")
        if (not args.no_distill
                and os.path.exists(expert_folder(spec, args, source, distiller) + ".json")):
          distill(spec, args, side, ipc, seed, folder)
        marker = os.path.join(folder, "run.json")
        if not os.path.exists(marker):
          continue
        record = read_json(marker)
        record["eval_lr"] = lr = mtt.eval_lr(record)
        if not args.no_eval or os.path.exists(os.path.join(folder, "eval_dsa", "transfer.json")):
          record["acc_ours_dsa"], record["eval_ours_dsa"] = mtt.evaluate_ours(
              args, side, folder, lr, support=support_path(spec, side, folder))
        if ((args.official_eval_nets and not args.no_eval)
                or os.path.exists(os.path.join(folder, "eval_official.json"))):
          record["acc_official"] = evaluate_official(spec, args, side, folder, lr)
        records.append(record)
        write_json(args.out, {"settings": vars(args), "experts": experts,
                              "conversions": conversions, "runs": records})
  tables = [mtt.expert_table(experts), table(spec, records), paired(spec, records)]
  print("\n\n".join(tables))
  md = os.path.splitext(args.out)[0] + ".md"
  with open(md + ".tmp", "w") as f:
    f.write(f"# {spec.title} on MNIST: the official code beside ours (issue 39)\n\nTables "
            f"written by `python bench/peers/{spec.name}/compare.py "
            + shlex.join(argv or sys.argv[1:]) + f"` (settings and differences: "
            f"bench/peers/{spec.name}/README.md; records: {os.path.basename(args.out)}).\n\n"
            + "\n\n".join(f"```\n{t}\n```" for t in tables) + "\n")
  os.replace(md + ".tmp", md)
  print(f"written {args.out} and {md}")


if __name__ == "__main__":
  main()
