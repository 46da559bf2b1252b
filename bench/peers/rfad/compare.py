"""RFAD side by side: the official code (bench/peers/rfad/official.py) and `experiments.rfad`.

Issue 39: at equal compute (our `cpu` preset: 2 random ConvNets of width 32 drawn afresh every
step, 256 real images per step, 1,000 AdaBelief steps at lr 1e-3, learned labels, MSE loss (no
Platt scaling), jitter 5e-3), distil MNIST with both for each ipc and seed, taking turns
(official, then ours, for the same ipc and seed) so that the shared cores slow both alike. Both
distillations run pinned to one core (`--core`) with one thread (torch `set_num_threads(1)`; the
same OMP/XLA single-thread settings on both sides). The official loop also validates every 40
steps (16 fixed networks, 5,000 training images): its CPU seconds are measured and reported apart.
Then every set is evaluated by one evaluator, ours: `experiments.transfer --protocol rfad` (RFAD's
finite-network evaluation: ConvNet-3 without norm, MSE on the learned labels x 8, the output at
initialisation subtracted, weight decay 1e-3 toward the initial weights, SGD 0.01 momentum 0.9,
batch 513; its `cpu` preset: width 128, 2,000 steps), `--eval-seeds` networks per set (the same
network seeds for every set), and KRR test accuracy (`experiments.evaluate`, `--krr-kernels`).

The official side's set is the one after exactly `--steps` updates (`<steps>.npz`), like ours
(`distilled.npz`; the `cpu` preset holds out no validation split); `--sides official_best`
evaluates, from the same official run, the set its early stopping would keep (`best.npz`: lowest
loss on its validation images, which are training images).

Runs under the project's Python and starts the official side with the PyTorch environment's
(`--torch-python`). Every run goes to its own folder under `--root` (runs/ is not tracked); a run
whose marker (`run.json`; `eval_*/transfer.json`, `eval_krr*.json`) exists is skipped, so the
command resumes. Writes `--out` (one record per set: side, ipc, seed, distillation times,
accuracies per evaluation network, KRR accuracies) and the same tables as Markdown beside it
(`.md`), and prints them: per side and ipc, the mean accuracy with a 95% t-interval over all
evaluation networks of all seeds (`kip.scores.interval95`), distillation CPU-seconds and
CPU-seconds per step; and ours minus official paired by (ipc, seed, evaluation network).

    python bench/peers/rfad/compare.py --ipcs 1,10 --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import os
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
# The sets compared: which distillation made each, and its file in that run's folder.
# `ours_map`: ours with the official code's learned linear pixel map (`--transform-lr 5e-5`, our
# default since this comparison); `ours`: the images learned alone (`--transform-lr 0`).
SETS = {"official": "official", "official_best": "official", "ours": "ours",
        "ours_map": "ours_map"}
OURS_FLAGS = {"ours": ["--transform-lr", "0"], "ours_map": ["--transform-lr", "5e-5"]}
SIDES = tuple(SETS)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--ipcs", default="1,10", help="comma-separated images per class")
  p.add_argument("--seeds", default="0,1", help="comma-separated distillation seeds")
  p.add_argument("--sides", default="official,ours",
                 help="sets to evaluate: official (the official run's set after --steps), "
                      "official_best (the same run's best.npz, picked by its validation), ours")
  p.add_argument("--steps", type=int, default=1000,
                 help="updates on both sides (a multiple of 40)")
  p.add_argument("--width", type=int, default=32, help="random ConvNets' channels")
  p.add_argument("--num-models", type=int, default=2, help="random ConvNets per step")
  p.add_argument("--batch", type=int, default=256, help="real images per step")
  p.add_argument("--lr", type=float, default=1e-3, help="AdaBelief learning rate")
  p.add_argument("--jitter", type=float, default=5e-3, help="ridge relative to tr(K_ss)/n")
  p.add_argument("--val-per-class", type=int, default=500,
                 help="the official loop's validation images per class (its own 500; only its "
                      "validation cost and best.npz depend on it)")
  p.add_argument("--root", default=os.path.join(REPO, "runs", "peers", "rfad"))
  p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "peers",
                                               "rfad_mnist.json"))
  p.add_argument("--torch-python", default="/work/venvs/torch/bin/python")
  p.add_argument("--rfad-root", default=os.environ.get("RFAD_ROOT", "/work/peers/RFAD"))
  p.add_argument("--manual-dir", default=os.environ.get("KIP_MANUAL_DIR", "/work/shared/data"),
                 help="our side's offline MNIST (KIP_MANUAL_DIR of our commands)")
  p.add_argument("--core", default="1",
                 help="taskset CPU list the distillations are pinned to ('' for none)")
  p.add_argument("--eval-seeds", type=int, default=5, help="networks of our evaluator per set")
  p.add_argument("--eval-width", type=int, default=0,
                 help="width of our evaluator's ConvNet (0: the rfad protocol's cpu preset, 128)")
  p.add_argument("--eval-steps", type=int, default=0,
                 help="training steps of our evaluator (0: the rfad protocol's cpu preset, 2000)")
  p.add_argument("--krr-kernels", default="fc,conv",
                 help="experiments.evaluate kernels, each NAME or NAME:nngp (e.g. convnet3:nngp)")
  p.add_argument("--eval-core", default="", help="taskset CPU list of the evaluations")
  p.add_argument("--no-distill", action="store_true", help="evaluate and tabulate what exists")
  p.add_argument("--no-eval", action="store_true", help="distil only")
  args = p.parse_args(argv)
  if args.steps % 40:
    p.error("--steps must be a multiple of 40 (the official loop dumps its set every 40 steps)")
  unknown = set(args.sides.split(",")) - set(SIDES)
  if unknown:
    p.error(f"unknown side {', '.join(sorted(unknown))}; choose among {', '.join(SIDES)}")
  return args


def run_folder(args, side: str, ipc: int, seed: int) -> str:
  return os.path.join(args.root, SETS[side], f"ipc{ipc}_seed{seed}")


def support_path(args, side: str, folder: str) -> str:
  return os.path.join(folder, {"official": f"{args.steps}.npz", "official_best": "best.npz",
                               "ours": "distilled.npz", "ours_map": "distilled.npz"}[side])


def eval_suffix(side: str) -> str:
  return "_best" if side == "official_best" else ""


def our_env(args) -> dict[str, str]:
  return QUIET_TF | {"KIP_MANUAL_DIR": args.manual_dir}


def distill_command(args, side: str, ipc: int, seed: int, folder: str) -> list[str]:
  if side == "official":
    return [args.torch_python, os.path.join(HERE, "official.py"), "--rfad-root", args.rfad_root,
            "--ipc", str(ipc), "--seed", str(seed), "--steps", str(args.steps), "--width",
            str(args.width), "--num-models", str(args.num_models), "--batch-size",
            str(args.batch), "--n-batches", "1", "--lr", str(args.lr), "--jit", str(args.jitter),
            "--learn-labels", "1", "--init", "random", "--val-per-class",
            str(args.val_per_class), "--threads", "1", "--out", folder]
  return [sys.executable, "-m", "experiments.rfad", "--dataset", "mnist", "--preset", "cpu",
          "--ipc", str(ipc), "--seed", str(seed), "--steps", str(args.steps), "--width",
          str(args.width), "--num-models", str(args.num_models), "--target-batch",
          str(args.batch), "--lr", str(args.lr), "--jitter", str(args.jitter), "--learn-labels",
          "--no-platt", "--init", "real", "--eval-every", "0", "--no-progress", "--workdir",
          folder, *OURS_FLAGS[side]]


def official_times(folder: str) -> dict[str, float]:
  """The official loop's CPU seconds, with and without its validation, and the steady CPU
  seconds per step without it over the run's second half (from its validation log)."""
  official = read_json(os.path.join(folder, "official.json"))
  rows = official["validation"]["rows"]  # step, loss, acc, loop CPU-s, validation CPU-s
  a, b = rows[(len(rows) - 1) // 2], rows[-1]
  steady = ((b[3] - b[4]) - (a[3] - a[4])) / (b[0] - a[0]) if b[0] > a[0] else np.nan
  return {"distill_cpu_s": official["distill_cpu_s_without_validation"],
          "validation_cpu_s": official["validation_cpu_s"],
          "distill_cpu_s_with_validation": official["distill_cpu_s"],
          "distill_wall_s": official["distill_wall_s"], "steady_cpu_s_per_step": steady,
          "best_iter": official.get("best_iter"), "commit": official["commit"]}


def ours_times(folder: str) -> dict[str, float]:
  """Our loop's CPU seconds from metrics.jsonl: the last step's record also counts the final
  KRR evaluation, so the step before it is scaled to all steps; steady CPU seconds per step over
  the second half."""
  steps = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))
           if '"train_time"' in line]
  a, b = steps[len(steps) // 2], steps[-2]
  return {"distill_cpu_s": steps[-2]["cpu_time"] * len(steps) / (len(steps) - 1),
          "distill_wall_s": steps[-1]["train_time"], "steps_logged": len(steps),
          "steady_cpu_s_per_step": (b["cpu_time"] - a["cpu_time"]) / (b["step"] - a["step"])}


def distill(args, side: str, ipc: int, seed: int, folder: str) -> None:
  """One distillation into `folder`; `folder/run.json` marks it done (times of the command)."""
  marker = os.path.join(folder, "run.json")
  if os.path.exists(marker):
    return
  os.makedirs(folder, exist_ok=True)
  cmd = distill_command(args, side, ipc, seed, folder)
  print(f"distil {side} ipc {ipc} seed {seed} -> {folder}", flush=True)
  env = QUIET_TF if side == "official" else our_env(args)
  cpu, wall, rc = run_child(cmd, os.path.join(folder, "distill.log"), args.core, env)
  if rc:
    sys.exit(f"{side} ipc {ipc} seed {seed} failed (exit {rc}); see {folder}/distill.log")
  record = {"ipc": ipc, "seed": seed, "steps": args.steps, "command": cmd,
            "process_cpu_s": cpu, "process_wall_s": wall, "core": args.core}
  record |= official_times(folder) if side == "official" else ours_times(folder)
  write_json(marker, record)
  print(f"  {wall:.0f} s wall, {cpu:.0f} CPU-s", flush=True)


def evaluate_transfer(args, side: str, folder: str) -> tuple[list[float], dict]:
  """Accuracies of `--eval-seeds` networks trained by `experiments.transfer --protocol rfad`."""
  name = "eval_rfad" + eval_suffix(side)
  workdir = os.path.join(folder, name)
  report = os.path.join(workdir, "transfer.json")
  if not os.path.exists(report):
    cmd = [sys.executable, "-m", "experiments.transfer", "--support",
           support_path(args, side, folder), "--dataset", "mnist", "--protocol", "rfad",
           "--seeds", str(args.eval_seeds), "--baselines", "none", "--width",
           str(args.eval_width), "--steps", str(args.eval_steps), "--eval-every", "100000",
           "--no-progress", "--workdir", workdir]
    print(f"evaluate (ours, rfad protocol) {support_path(args, side, folder)}", flush=True)
    cpu, wall, rc = run_child(cmd, os.path.join(folder, name + ".log"), args.eval_core,
                              our_env(args))
    if rc:
      sys.exit(f"evaluation of {folder} failed (exit {rc}); see {folder}/{name}.log")
    print(f"  {wall:.0f} s wall, {cpu:.0f} CPU-s", flush=True)
  row = read_json(report)["rows"][0]
  return row["test_acc"], {k: row[k] for k in ("net", "width", "norm", "protocol", "steps", "lr",
                                                "train_time")}


def evaluate_krr(args, side: str, folder: str, compute: bool = True) -> dict[str, float]:
  """KRR test accuracy of the set (`experiments.evaluate --json-out`), per `--krr-kernels`
  (those measured before are read back; with `compute` False, only those)."""
  path = os.path.join(folder, f"eval_krr{eval_suffix(side)}.json")
  done = read_json(path) if os.path.exists(path) else {}
  todo = [k for k in args.krr_kernels.split(",") if k and k not in done] if compute else []
  for spec in todo:
    kernel, _, kernel_type = spec.partition(":")
    cmd = [sys.executable, "-m", "experiments.evaluate", "--support",
           support_path(args, side, folder), "--dataset", "mnist", "--kernel", kernel,
           "--json-out"] + (["--kernel-type", kernel_type] if kernel_type else [])
    log = os.path.join(folder, f"eval_krr{eval_suffix(side)}.log")
    _, _, rc = run_child(cmd, log, args.eval_core, our_env(args))
    with open(log) as f:
      lines = [line for line in f if line.startswith("{")]
    if rc or not lines:
      sys.exit(f"KRR evaluation ({spec}) of {folder} failed (exit {rc}); see {log}")
    done[spec] = json.loads(lines[-1])["test_acc"]
    write_json(path, done)
  return done


SUMMARY_HEADER = ("side", "ipc", "seeds", "transfer acc %: mean [95% t] (nets)", "KRR % ({})",
                  "distill CPU-s", "official validation CPU-s", "CPU-ms/step (steady)",
                  "CPU/step official/this")


def summary(records: list[dict], kernels: list[str]) -> tuple[tuple, list[list[str]]]:
  rows, per_step = [], {}
  for ipc in sorted({r["ipc"] for r in records}):
    for side in SIDES:
      rs = [r for r in records if r["side"] == side and r["ipc"] == ipc]
      if not rs:
        continue
      accs = [a for r in rs for a in r.get("acc_transfer", [])]
      krr = [[r["krr"][k] for r in rs if k in r.get("krr", {})] for k in kernels]
      steady = np.mean([r["steady_cpu_s_per_step"] for r in rs])
      per_step[side, ipc] = steady
      validation = [r["validation_cpu_s"] for r in rs if "validation_cpu_s" in r]
      rows.append([side, str(ipc), ",".join(str(r["seed"]) for r in rs), interval_n(accs),
                   " / ".join(f"{100 * np.mean(v):.2f}" if v else "-" for v in krr),
                   f"{np.mean([r['distill_cpu_s'] for r in rs]):.0f}",
                   f"{np.mean(validation):.0f}" if validation else "",
                   f"{1000 * steady:.0f}"])
  for row in rows:
    side, ipc = row[0], int(row[1])
    ratio = per_step.get(("official", ipc), np.nan) / per_step[side, ipc]
    row.append(f"{ratio:.2f}" if side in OURS_FLAGS and np.isfinite(ratio) else "")
  header = SUMMARY_HEADER[:4] + (SUMMARY_HEADER[4].format(" / ".join(kernels)),) + \
      SUMMARY_HEADER[5:]
  return header, rows


def paired(records: list[dict]) -> tuple[tuple, list[list[str]]]:
  """A side minus another per (ipc, seed, evaluation network), for each contrast."""
  rows = [[f"{mine} - {other}", str(ipc), ",".join(seeds), interval_n(diffs)]
          for mine, other in (("ours", "official"), ("ours", "official_best"),
                              ("ours_map", "official"), ("ours_map", "ours"))
          for ipc, seeds, diffs in paired_differences(records, mine, other, "acc_transfer")]
  return ("comparison", "ipc", "seeds", "points: mean [95% t] (pairs)"), rows


def markdown(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def write_markdown(args, records: list[dict], tables) -> None:
  commits = sorted({r["commit"] for r in records if r.get("commit")})

  def evaluated(key: str) -> str:
    values = sorted({r["eval_transfer"][key] for r in records if "eval_transfer" in r})
    return " / ".join(str(v) for v in values) or "-"

  text = [
      "# RFAD on MNIST: the official code beside ours at equal compute (issue 39)", "",
      "Produced by `python bench/peers/rfad/compare.py` (set-up, patch and every setting "
      "difference: bench/peers/README.md, section RFAD); per-set records in "
      f"`{os.path.basename(args.out)}`, runs in `runs/peers/rfad/` (not tracked).", "",
      f"Official: yolky/RFAD {', '.join(commits) or '(no run yet)'} (`distill_dataset`, "
      "bench/peers/rfad/official.py). Ours: `python -m experiments.rfad --preset cpu`. Both: "
      f"{args.num_models} random ConvNets of width {args.width} per step, {args.batch} real "
      f"images per step, {args.steps} AdaBelief steps at lr {args.lr}, jitter {args.jitter}, "
      "learned labels, MSE loss; distillations pinned to "
      f"core {args.core or '(none)'} with one thread.", "",
      "Evaluation, identical for every set: `experiments.transfer --protocol rfad` "
      f"(ConvNet width {evaluated('width')}, {evaluated('steps')} steps, network seeds 0.."
      f"{max((len(r['acc_transfer']) for r in records if 'acc_transfer' in r), default=0) - 1})"
      ", and KRR (`experiments.evaluate`). Distill CPU-s: "
      "the loop without the official validation (reported in its own column) and without our "
      "final evaluation; steady: per step over the run's second half.", ""]
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

  ipcs = [int(v) for v in args.ipcs.split(",")]
  seeds = [int(v) for v in args.seeds.split(",")]
  sides = args.sides.split(",")
  kernels = [k for k in args.krr_kernels.split(",") if k]
  records = []
  for ipc in ipcs:
    for seed in seeds:
      for side in sides:
        folder = run_folder(args, side, ipc, seed)
        if not args.no_distill:
          distill(args, SETS[side], ipc, seed, folder)
        marker = os.path.join(folder, "run.json")
        if not os.path.exists(marker):
          continue
        record = read_json(marker) | {"side": side, "support": support_path(args, side, folder)}
        if record["steps"] != args.steps:
          sys.exit(f"{folder} was distilled with {record['steps']} steps, not --steps "
                   f"{args.steps}; give another --root")
        done = os.path.exists(os.path.join(folder, f"eval_rfad{eval_suffix(side)}",
                                           "transfer.json"))
        if not args.no_eval or done:
          record["acc_transfer"], record["eval_transfer"] = evaluate_transfer(args, side, folder)
        record["krr"] = evaluate_krr(args, side, folder, compute=not args.no_eval)
        records.append(record)
        write_json(args.out, {"settings": vars(args), "runs": records})
  tables = [summary(records, kernels), paired(records)]
  for header, rows in tables:
    print(format_table(header, rows))
  write_markdown(args, records, tables)
  print(f"written {args.out} and its .md")


if __name__ == "__main__":
  main()
