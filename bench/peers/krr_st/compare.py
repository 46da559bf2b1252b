"""KRR-ST side by side: the official code (bench/peers/krr_st/official.py) and `experiments.krr_st`.

At equal compute (our `cpu` preset, `methods.krr_st.PRESETS["cpu"]`: a pool of 10 ConvNets of
width 32 (blocks 32/64/128, batch norm) re-initialised after 100 online SGD updates, 256 real
images per step with random crops (no flips: digits), 2,000 AdamW steps at 1e-3 decaying linearly
to 1e-3x, 100 distilled images), distil the source dataset (MNIST by default, as the committed
bench/results/krr_st_mnist_fashion_mnist.json) with both, for each size and seed, sides taking
turns so that shared cores slow them alike, each pinned to one core (`--core`) with one thread.
Both regress onto one teacher: ours (`python -m experiments.teacher --dataset <source>`, the
default teacher bench/krr_st.py uses, trained here if missing), converted for PyTorch by
convert.py and checked by official.py; the official repository has no teacher training.

Sides (`--sides`): `official` (the official code as it is: a pool model's counter is never reset,
the support starts from raw [0, 1] images, the first conv pads 28x28 inputs by 1); `ours` (our
default: counters reset, as the paper); `ours_noreset` (`--no-reset`, the official pool: the
like-for-like side); and ablations of the official code (official.py flags): `official_reset`,
`official_pad3` (first conv padded by 3, as our `krr_st_convnet`), `official_stdinit` (support
started from standardised images, as ours).

Every set is then evaluated by one evaluator, ours, with bench/krr_st.py's protocol:
`python -m experiments.pretrain --rows distilled --dataset <target> --labelled <L>` (a fresh
`krr_st_convnet` of width 32 pre-trained on the set by MSE to its targets for 1,000 epochs, then on
L class-balanced labelled target images a linear probe and fine-tuning, 500 steps; network seeds
0..`--eval-seeds`-1, the same for every set), and with `--official-eval-seeds K` also by the
official evaluation (official_eval.py: `pretrain_krr_st` + `finetune`, and `linear_eval`, at the
same sizes). `--reference` adds, once per size and budget, the rows without pre-training and with
a random real subset (bench/krr_st.py's `none` and `random`).

Runs under the project's Python and starts the official side with the PyTorch environment's
(`--torch-python`). Every run has its own folder under `--root` (runs/ is not tracked); a run whose
marker exists (`run.json`, `eval-*/pretrain.json`, `official_eval-*.json`) is skipped, so the
command resumes. Writes `--out` (one record per side, size, seed and budget: times, losses,
accuracies per evaluation network) and the same tables as Markdown beside it (`.md`), and prints
them: per side the mean accuracy with a 95% t-interval over all evaluation networks of all seeds
(bench/peers/common.py `interval_n`), and the contrasts paired by (seed, evaluation network).

    python bench/peers/krr_st/compare.py --sizes 100 --seeds 0,1,2 [--labelled 1000,0]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import textwrap

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, REPO)  # run as a script: the repository's packages
from bench.peers.common import (  # noqa: E402
  interval_n,
  paired_differences,
  read_json,
  run_child,
  write_json,
)

QUIET_TF = {"TF_CPP_MIN_LOG_LEVEL": "2"}
# side -> (which code distils, its extra flags)
SIDES = {
    "official": ("official", []),
    "ours": ("ours", []),
    "ours_noreset": ("ours", ["--no-reset"]),
    "official_reset": ("official", ["--reset"]),
    "official_pad3": ("official", ["--first-padding", "3"]),
    "official_stdinit": ("official", ["--syn-init", "normalised"]),
}
# (mine, other, what the difference measures)
CONTRASTS = (
    ("ours_noreset", "official", "same pool rule (never reset): the implementations"),
    ("ours", "official", "our default against the official code"),
    ("ours", "ours_noreset", "ours: counter reset (paper) vs never (official code)"),
    ("official_reset", "official", "official: counter reset vs never"),
    ("official_pad3", "official", "official: first conv padded by 3 (ours) vs 1"),
    ("official_stdinit", "official", "official: support started standardised (ours) vs raw"),
)
# (record key, label): our evaluator's, then the official evaluator's
METRICS = (("probe", "ours: linear probe"), ("finetune", "ours: fine-tuned"),
           ("official_linear", "official: linear_eval"),
           ("official_finetune", "official: finetune"))


def parse_args(argv=None) -> argparse.Namespace:
  from methods.krr_st import PRESETS, Config  # noqa: PLC0415

  cpu = Config(**PRESETS["cpu"])
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--source", default="mnist", choices=("mnist", "fashion_mnist"),
                 help="distilled (unlabelled) dataset")
  p.add_argument("--target", default="fashion_mnist", choices=("mnist", "fashion_mnist"),
                 help="dataset the sets are evaluated on")
  p.add_argument("--sizes", default=str(cpu.size), help="comma-separated set sizes")
  p.add_argument("--seeds", default="0,1,2", help="comma-separated distillation seeds")
  p.add_argument("--sides", default="official,ours_noreset,ours",
                 help=f"comma-separated among {', '.join(SIDES)}")
  p.add_argument("--steps", type=int, default=cpu.steps, help="outer steps, both sides")
  p.add_argument("--width", type=int, default=cpu.width, help="pool ConvNets' first width")
  p.add_argument("--batch", type=int, default=cpu.target_batch, help="real images per step")
  p.add_argument("--num-models", type=int, default=cpu.num_models, help="pool size")
  p.add_argument("--max-online-updates", type=int, default=cpu.max_online_updates,
                 help="online updates before a pool model is re-initialised")
  p.add_argument("--lr", type=float, default=cpu.lr, help="outer AdamW learning rate")
  p.add_argument("--teacher", default="",
                 help="teacher file (default: experiments.teacher's for --source, trained if "
                      "missing)")
  p.add_argument("--teacher-args", default="",
                 help="extra flags for experiments.teacher (then its workdir is "
                      "<root>/teacher-<source>), e.g. for a smoke test")
  p.add_argument("--labelled", default="1000",
                 help="comma-separated labelled target budgets (0: the whole split)")
  p.add_argument("--eval-seeds", type=int, default=3, help="networks per set (both evaluators)")
  p.add_argument("--pretrain-epochs", type=int, default=1000, help="pre-training on the set")
  p.add_argument("--finetune-steps", type=int, default=0,
                 help="fine-tuning steps (0: experiments.pretrain's cpu preset, 500)")
  p.add_argument("--probe-steps", type=int, default=500, help="our linear probe's steps")
  p.add_argument("--eval-args", default="", help="extra flags for experiments.pretrain")
  p.add_argument("--official-eval-seeds", type=int, default=0,
                 help="also run the official evaluation (official_eval.py) with seeds "
                      "0..K-1 (0: not)")
  p.add_argument("--official-eval-args", default="", help="extra flags for official_eval.py")
  p.add_argument("--reference", action="store_true",
                 help="also evaluate the rows none and random (once per size and budget)")
  p.add_argument("--root", default=os.path.join(REPO, "runs", "peers", "krr_st"))
  p.add_argument("--out", default="", help="results JSON (default: bench/results/peers/"
                                           "krr_st_<source>_<target>.json)")
  p.add_argument("--torch-python", default="/work/venvs/torch/bin/python")
  p.add_argument("--selfsup-root",
                 default=os.environ.get("SELFSUP_DD_ROOT", "/work/peers/selfsup_dd"))
  p.add_argument("--manual-dir", default=os.environ.get("KIP_MANUAL_DIR", "/work/shared/data"))
  p.add_argument("--data-dir", default=os.path.join(REPO, ".cache", "tfds"))
  p.add_argument("--core", default="1",
                 help="taskset CPU list of the teacher and the distillations ('' for none)")
  p.add_argument("--eval-core", default="", help="taskset CPU list of the evaluations")
  p.add_argument("--no-distill", action="store_true", help="evaluate and tabulate what exists")
  p.add_argument("--no-eval", action="store_true", help="distil only")
  args = p.parse_args(argv)
  unknown = set(args.sides.split(",")) - set(SIDES)
  if unknown:
    p.error(f"unknown side {', '.join(sorted(unknown))}; choose among {', '.join(SIDES)}")
  if args.source == args.target:
    p.error("--target must differ from --source (transfer to another dataset)")
  args.out = args.out or os.path.join(REPO, "bench", "results", "peers",
                                      f"krr_st_{args.source}_{args.target}.json")
  return args


def data_flags(args) -> list[str]:
  return ["--manual-dir", args.manual_dir, "--data-dir", args.data_dir]


def our_env(args) -> dict[str, str]:
  return QUIET_TF | {"KIP_MANUAL_DIR": args.manual_dir}


def teacher_finished(path: str) -> bool:
  """Whether `path` holds a teacher whose training reached its last step."""
  if not os.path.exists(path):
    return False
  from methods.barlow import load_teacher  # noqa: PLC0415

  config = load_teacher(path).config
  return config.get("step") is not None and config.get("step") == config.get("steps")


def ensure_teacher(args) -> str:
  """The teacher file: `--teacher`, or experiments.teacher's for the source (trained, pinned to
  `--core`, when it is missing or unfinished)."""
  if args.teacher:
    if not os.path.exists(args.teacher):
      sys.exit(f"--teacher {args.teacher}: no such file")
    return args.teacher
  extra = shlex.split(args.teacher_args)
  if extra:
    workdir = os.path.join(args.root, f"teacher-{args.source}")
    path, where = os.path.join(workdir, "teacher.msgpack"), ["--workdir", workdir]
  else:
    from methods.barlow import default_teacher  # noqa: PLC0415

    path, where = os.path.join(REPO, default_teacher(args.source)), []
  if not teacher_finished(path):
    cmd = [sys.executable, "-m", "experiments.teacher", "--dataset", args.source,
           "--no-progress", *data_flags(args), *where, *extra]
    print(f"training the teacher -> {path}", flush=True)
    os.makedirs(args.root, exist_ok=True)
    cpu, wall, rc = run_child(cmd, os.path.join(args.root, f"teacher-{args.source}.log"),
                              args.core, our_env(args))
    if rc:
      sys.exit(f"the teacher failed (exit {rc}); see {args.root}/teacher-{args.source}.log")
    print(f"  {wall:.0f} s wall, {cpu:.0f} CPU-s", flush=True)
  return path


def export_teacher(args, teacher: str) -> str:
  """The teacher for the official side (convert.py), re-exported when the teacher is newer."""
  from bench.peers.krr_st.convert import export_teacher as export  # noqa: PLC0415

  name = os.path.basename(os.path.dirname(os.path.abspath(teacher)))
  npz = os.path.join(args.root, "teachers", f"{name}.npz")
  if not os.path.exists(npz) or os.path.getmtime(npz) < os.path.getmtime(teacher):
    print(f"exporting the teacher for the official side -> {npz}", flush=True)
    export(teacher, npz, args.manual_dir)
  return npz


def run_folder(args, side: str, size: int, seed: int) -> str:
  return os.path.join(args.root, side, f"{args.source}_n{size}_seed{seed}")


def distill_command(args, side: str, size: int, seed: int, folder: str, teacher: str,
                    teacher_npz: str) -> list[str]:
  code, flags = SIDES[side]
  common = ["--size", str(size), "--seed", str(seed), "--steps", str(args.steps), "--width",
            str(args.width), "--num-models", str(args.num_models), "--max-online-updates",
            str(args.max_online_updates), "--lr", str(args.lr)]
  if code == "official":
    return [args.torch_python, os.path.join(HERE, "official.py"), "--root", args.selfsup_root,
            "--dataset", args.source, "--manual-dir", args.manual_dir, "--teacher-npz",
            teacher_npz, "--out", folder, "--batch", str(args.batch), "--threads", "1",
            *common, *flags]
  return [sys.executable, "-m", "experiments.krr_st", "--dataset", args.source, "--preset",
          "cpu", "--teacher", teacher, "--target-batch", str(args.batch), "--eval-every", "0",
          "--no-progress", "--workdir", folder, *data_flags(args), *common, *flags]


def official_times(folder: str) -> dict:
  """The official loop's CPU seconds, steady CPU seconds per step over the second half, the mean
  outer loss of the last logged interval, and the pool at the end (official.json)."""
  record = read_json(os.path.join(folder, "official.json"))
  rows = record["loss_log"]["rows"]  # step, mean loss, loop CPU-s, loop wall-s
  a, b = rows[(len(rows) - 1) // 2], rows[-1]
  steady = (b[2] - a[2]) / (b[0] - a[0]) if b[0] > a[0] else b[2] / b[0]
  return {"distill_cpu_s": record["distill_cpu_s"], "distill_wall_s": record["distill_wall_s"],
          "pool_warmup_cpu_s": record["pool_warmup_cpu_s"], "steady_cpu_s_per_step": steady,
          "final_loss": b[1], "pool_expired_final": record["pool_expired_final"],
          "teacher_relative_error": record["teacher_relative_error"],
          "commit": record["commit"]}


def ours_times(folder: str, window: int) -> dict:
  """Our loop's CPU seconds from metrics.jsonl (every step logged; the last record also holds the
  final validation, so the step before it is scaled to all steps), steady CPU seconds per step
  over the second half, the mean loss over the last `window` steps, the pool at the end."""
  steps = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))
           if '"train_time"' in line and '"loss"' in line]
  a, b = steps[len(steps) // 2], steps[-2] if len(steps) > 1 else steps[-1]
  steady = (b["cpu_time"] - a["cpu_time"]) / (b["step"] - a["step"]) if b["step"] > a["step"] \
      else b["cpu_time"] / b["step"]
  return {"distill_cpu_s": b["cpu_time"] * steps[-1]["step"] / b["step"],
          "distill_wall_s": steps[-1]["train_time"], "steady_cpu_s_per_step": steady,
          "final_loss": float(np.mean([r["loss"] for r in steps[-window:]])),
          "pool_expired_final": steps[-1].get("pool_expired")}


def distill(args, side: str, size: int, seed: int, folder: str, teacher: str,
            teacher_npz: str) -> None:
  """One distillation into `folder`; `folder/run.json` marks it done (times of the command)."""
  marker = os.path.join(folder, "run.json")
  if os.path.exists(marker):
    return
  os.makedirs(folder, exist_ok=True)
  cmd = distill_command(args, side, size, seed, folder, teacher, teacher_npz)
  print(f"distil {side} n {size} seed {seed} -> {folder}", flush=True)
  env = QUIET_TF if SIDES[side][0] == "official" else our_env(args)
  cpu, wall, rc = run_child(cmd, os.path.join(folder, "distill.log"), args.core, env)
  if rc:
    sys.exit(f"{side} n {size} seed {seed} failed (exit {rc}); see {folder}/distill.log")
  record = {"size": size, "seed": seed, "steps": args.steps, "command": cmd, "teacher": teacher,
            "process_cpu_s": cpu, "process_wall_s": wall, "core": args.core}
  record |= official_times(folder) if SIDES[side][0] == "official" else \
      ours_times(folder, min(100, args.steps))
  write_json(marker, record)
  print(f"  {wall:.0f} s wall, {cpu:.0f} CPU-s", flush=True)


def pretrain_command(args, support: str, labelled: str, rows: str, workdir: str,
                     teacher: str = "") -> list[str]:
  return [sys.executable, "-m", "experiments.pretrain", "--support", support, "--dataset",
          args.target, "--labelled", labelled, "--rows", rows, "--seeds", str(args.eval_seeds),
          "--pretrain-epochs", str(args.pretrain_epochs), "--finetune-steps",
          str(args.finetune_steps), "--probe-steps", str(args.probe_steps), "--workdir",
          workdir, "--no-progress", *data_flags(args),
          *(["--teacher", teacher] if teacher else []), *shlex.split(args.eval_args)]


def evaluate_ours(args, folder: str, labelled: str, first: str) -> dict:
  """bench/krr_st.py's evaluation of the set in `folder` (row `distilled`): per evaluation
  network the probe and fine-tuned test accuracies. The pre-training is shared between budgets
  (bench/krr_st.py `_share_pretraining`: it never sees the labels)."""
  from bench.krr_st import _share_pretraining  # noqa: PLC0415

  workdir = os.path.join(folder, f"eval-{args.target}-{labelled}")
  report = os.path.join(workdir, "pretrain.json")
  if not os.path.exists(report):
    _share_pretraining(first, workdir)
    cmd = pretrain_command(args, os.path.join(folder, "distilled.npz"), labelled, "distilled",
                           workdir)
    print(f"evaluate (ours) {folder} on {args.target}, {labelled} labels", flush=True)
    cpu, wall, rc = run_child(cmd, workdir + ".log", args.eval_core, our_env(args))
    if rc:
      sys.exit(f"evaluation of {folder} failed (exit {rc}); see {workdir}.log")
    print(f"  {wall:.0f} s wall, {cpu:.0f} CPU-s", flush=True)
  row = next(r for r in read_json(report)["rows"] if r["row"] == "distilled")
  return {"probe": row["probe_acc"], "finetune": row["finetune_acc"], "eval_net": row["net"],
          "finetune_steps": row["finetune_steps"]}


def evaluate_official(args, folder: str, labelled: str) -> dict:
  """official_eval.py's accuracies of the set in `folder` (seeds 0..--official-eval-seeds-1)."""
  out = os.path.join(folder, f"official_eval-{args.target}-{labelled}.json")
  if not os.path.exists(out):
    seeds = ",".join(str(s) for s in range(args.official_eval_seeds))
    cmd = [args.torch_python, os.path.join(HERE, "official_eval.py"), "--root",
           args.selfsup_root, "--support", os.path.join(folder, "distilled.npz"), "--target",
           args.target, "--labelled", labelled, "--seeds", seeds, "--width", str(args.width),
           "--pretrain-epochs", str(args.pretrain_epochs), "--finetune-steps",
           str(args.finetune_steps or 500), "--manual-dir", args.manual_dir, "--threads", "1",
           "--out", out, *shlex.split(args.official_eval_args)]
    print(f"evaluate (official) {folder} on {args.target}, {labelled} labels", flush=True)
    cpu, wall, rc = run_child(cmd, out[:-len(".json")] + ".log", args.eval_core, QUIET_TF)
    if rc:
      sys.exit(f"official evaluation of {folder} failed (exit {rc}); see {out[:-5]}.log")
    print(f"  {wall:.0f} s wall, {cpu:.0f} CPU-s", flush=True)
  result = read_json(out)
  return {"official_finetune": result["finetune_acc"], "official_linear": result["linear_acc"]}


def evaluate_reference(args, size: int, labelled: str, support: str, teacher: str) -> list[dict]:
  """bench/krr_st.py's rows `none` and `random` for this size and budget (once)."""
  workdir = os.path.join(args.root, "reference", f"{args.source}_n{size}-{args.target}-{labelled}")
  report = os.path.join(workdir, "pretrain.json")
  if not os.path.exists(report) or len(read_json(report)["rows"]) < 2:
    cmd = pretrain_command(args, support, labelled, "none,random", workdir, teacher)
    print(f"evaluate the reference rows (none, random), n {size}, {labelled} labels", flush=True)
    _, wall, rc = run_child(cmd, workdir + ".log", args.eval_core, our_env(args))
    if rc:
      sys.exit(f"reference evaluation failed (exit {rc}); see {workdir}.log")
    print(f"  {wall:.0f} s wall", flush=True)
  return [{"side": f"reference: {r['row']}", "ipc": size, "size": size, "seed": "-",
           "labelled": labelled, "probe": r["probe_acc"], "finetune": r["finetune_acc"]}
          for r in read_json(report)["rows"]]


SUMMARY_HEADER = ("labels", "side", "n", "seeds", "ours: probe %", "ours: fine-tuned %",
                  "official: linear_eval %", "official: finetune %", "loss (last 100)",
                  "pool expired", "distill CPU-s", "CPU-ms/step", "process CPU-s")


def _mean(records, key, fmt):
  values = [r[key] for r in records if r.get(key) is not None]
  return format(np.mean(values), fmt) if values else "-"


def summary(records: list[dict]) -> tuple[tuple, list[list[str]]]:
  rows = []
  for labelled in dict.fromkeys(r["labelled"] for r in records):
    for size in sorted({r["size"] for r in records}):
      for side in dict.fromkeys(r["side"] for r in records):
        rs = [r for r in records if r["side"] == side and r["size"] == size
              and r["labelled"] == labelled]
        if not rs:
          continue
        accs = [interval_n([a for r in rs for a in r.get(key) or []]) for key, _ in METRICS]
        steady = [r["steady_cpu_s_per_step"] for r in rs if "steady_cpu_s_per_step" in r]
        rows.append([labelled, side, str(size), ",".join(str(r["seed"]) for r in rs), *accs,
                     _mean(rs, "final_loss", ".4f"), _mean(rs, "pool_expired_final", ".2f"),
                     _mean(rs, "distill_cpu_s", ".0f"),
                     f"{1000 * np.mean(steady):.0f}" if steady else "-",
                     _mean(rs, "process_cpu_s", ".0f")])
  return SUMMARY_HEADER, rows


def paired(records: list[dict]) -> tuple[tuple, list[list[str]]]:
  """Each contrast per budget and metric, paired by (size, seed, evaluation network)."""
  rows = []
  for labelled in dict.fromkeys(r["labelled"] for r in records):
    rs = [r for r in records if r["labelled"] == labelled and not r["side"].startswith("ref")]
    for mine, other, meaning in CONTRASTS:
      for key, label in METRICS:
        for size, seeds, diffs in paired_differences(rs, mine, other, key):
          rows.append([labelled, f"{mine} - {other}", meaning, label, str(size),
                       ",".join(seeds), interval_n(diffs)])
  return ("labels", "comparison", "measures", "evaluation", "n", "seeds",
          "points: mean [95% t] (pairs)"), rows


def markdown(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def write_markdown(args, records: list[dict], tables) -> None:
  commits = sorted({r["commit"] for r in records if r.get("commit")})
  errors = [r["teacher_relative_error"] for r in records if "teacher_relative_error" in r]
  nets = " / ".join(sorted({r["eval_net"] for r in records if "eval_net" in r})) or "-"
  text = [
      f"# KRR-ST on {args.source} -> {args.target}: the official code beside ours at equal "
      "compute (issue 39)", "",
      "Produced by `python bench/peers/krr_st/compare.py` (set-up and every setting difference: "
      f"bench/peers/krr_st/README.md); per-set records in `{os.path.basename(args.out)}`, runs "
      "in `runs/peers/krr_st/` (not tracked).", "",
      f"Official: db-Lee/selfsup_dd {', '.join(commits) or '(no run yet)'} (`train.py` repeated "
      "by bench/peers/krr_st/official.py around the official `ModelPool` and `distill.run`). "
      "Ours: `python -m experiments.krr_st --preset cpu`. Both: pool of "
      f"{args.num_models} ConvNets of width {args.width}, re-initialised after "
      f"{args.max_online_updates} online updates, {args.batch} real images per step, "
      f"{args.steps} AdamW steps at lr {args.lr}, one teacher (ours, converted; torch vs ours "
      f"relative error at most {max(errors, default=float('nan')):.1e}); distillations pinned "
      f"to core {args.core or '(none)'} with one thread.", "",
      "Evaluation, identical for every set: bench/krr_st.py's "
      f"`experiments.pretrain --rows distilled --dataset {args.target}` ({nets}, "
      f"{args.pretrain_epochs} pre-training epochs, then linear probe and fine-tuning; "
      f"network seeds 0..{args.eval_seeds - 1}); official: official_eval.py (`pretrain_krr_st`, "
      "`finetune`, `linear_eval`). Accuracies: mean and 95% t-interval over all evaluation "
      "networks of all seeds. Distill CPU-s: the loop's (official: `time.process_time` around "
      "the steps; ours: `cpu_time` of metrics.jsonl, the first step's compilation included); "
      "neither counts the pool's warm-up or a final evaluation; CPU-ms/step: over the second "
      "half; process CPU-s: the whole command.", ""]
  text = [textwrap.fill(line, 100) if line else line for line in text]
  for header, rows in tables:
    text += [markdown(header, rows), ""]
  path = os.path.splitext(args.out)[0] + ".md"
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write("\n".join(text))
  os.replace(tmp, path)


def main(argv=None) -> None:
  args = parse_args(argv)
  from kip.cli import format_table  # noqa: PLC0415

  sizes = [int(v) for v in args.sizes.split(",")]
  seeds = [int(v) for v in args.seeds.split(",")]
  sides = args.sides.split(",")
  budgets = [v.strip() for v in args.labelled.split(",") if v.strip()]
  teacher = teacher_npz = ""
  if not args.no_distill:
    teacher = ensure_teacher(args)
    if any(SIDES[s][0] == "official" for s in sides):
      teacher_npz = export_teacher(args, teacher)
  records, first_eval = [], {}
  for size in sizes:
    for seed in seeds:
      for side in sides:
        folder = run_folder(args, side, size, seed)
        if not args.no_distill:
          distill(args, side, size, seed, folder, teacher, teacher_npz)
        marker = os.path.join(folder, "run.json")
        if not os.path.exists(marker):
          continue
        run = read_json(marker)
        if run["steps"] != args.steps:
          sys.exit(f"{folder} was distilled with {run['steps']} steps, not --steps "
                   f"{args.steps}; give another --root")
        for labelled in budgets:
          record = run | {"side": side, "ipc": size, "labelled": labelled,
                          "support": os.path.join(folder, "distilled.npz")}
          record.pop("command", None)
          done = os.path.exists(os.path.join(folder, f"eval-{args.target}-{labelled}",
                                             "pretrain.json"))
          if not args.no_eval or done:
            first = first_eval.setdefault(
                (side, size, seed), os.path.join(folder, f"eval-{args.target}-{labelled}"))
            record |= evaluate_ours(args, folder, labelled, first)
          official_done = os.path.exists(
              os.path.join(folder, f"official_eval-{args.target}-{labelled}.json"))
          if args.official_eval_seeds and (not args.no_eval or official_done):
            record |= evaluate_official(args, folder, labelled)
          records.append(record)
          write_json(args.out, {"settings": vars(args), "runs": records})
  if args.reference and not args.no_eval:
    for size in sizes:
      support = next((r["support"] for r in records if r["size"] == size), None)
      for labelled in budgets if support else []:
        records += evaluate_reference(args, size, labelled, support,
                                      teacher or read_json(os.path.join(
                                          os.path.dirname(support), "run.json"))["teacher"])
    write_json(args.out, {"settings": vars(args), "runs": records})
  tables = [summary(records), paired(records)]
  for header, rows in tables:
    print(format_table(header, rows))
  write_markdown(args, records, tables)
  print(f"written {args.out} and its .md")


if __name__ == "__main__":
  main()
