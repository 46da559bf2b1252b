"""FRePo side by side: the official code (bench/peers/frepo/official.py) and `experiments.frepo`.

Issue 39: at equal compute (our `cpu` preset: pool nets of widths 32/64/128 with batch norm, 256
real images per step, 2,000 outer LAMB steps at 3e-4 cosine to 0.1x, a pool of 10 models with 100
online Adam updates each, learned labels), distil MNIST with both for each ipc and seed, taking
turns (official, then ours, for the same ipc and seed) so that the shared cores slow both alike.
Both distillations run pinned to one core (`--core`) with one XLA thread (same XLA_FLAGS on both
sides). Then every set is evaluated by one evaluator, ours: `experiments.transfer --protocol
frepo` (FRePo's evaluation: its ConvNet without norm, width 32 in the `cpu` preset, Adam 3e-4 with
500 warm-up steps and cosine to 0.01x, batch min(N, 500), MSE on the learned labels, one DSA
transformation per batch; 1,000 steps for 10 images, 2,000 for 100), `--eval-seeds` networks per
set, and KRR test accuracy (`experiments.evaluate`, fc and conv NTK kernels).

Runs under the project's Python and starts the official side with the FRePo environment's
(`--frepo-python`). Every run goes to its own folder under `--root` (runs/ is not tracked); a run
whose marker exists is skipped, so the command resumes. Writes `--out` (one record per run: side,
ipc, seed, distillation times, accuracies per evaluation network, KRR accuracies) and prints a
table: per side and ipc, the mean accuracy with a 95% t-interval over all evaluation networks of
all seeds (`kip.scores.interval95`), the distillation CPU-seconds, and the CPU-seconds per step.

    python bench/peers/frepo/compare.py --ipcs 1 --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

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

KRR_KERNELS = ("fc", "conv")
QUIET_TF = {"TF_CPP_MIN_LOG_LEVEL": "2"}
DSA = "color_crop_cutout_scale_rotate"
# Our sides, by the flags that differ: real-batch augmentation and the pool's batch-norm momentum
# (flax's: the weight of the old average). `ours` is the default since issue 39's FRePo findings;
# the two `bn09` sides are the earlier default (`ours_bn09_dsa`) and its no-augmentation variant.
OURS = {
    "ours": ["--augment", "none", "--bn-momentum", "0.1"],
    "ours_dsa": ["--augment", DSA, "--bn-momentum", "0.1"],
    "ours_bn09": ["--augment", "none", "--bn-momentum", "0.9"],
    "ours_bn09_dsa": ["--augment", DSA, "--bn-momentum", "0.9"],
}
SIDES = ("official", *OURS)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--ipcs", default="1", help="comma-separated images per class")
  p.add_argument("--seeds", default="0,1", help="comma-separated distillation seeds")
  p.add_argument("--sides", default="official,ours",
                 help="which sides to run: official; ours (the cpu preset: no augmentation of "
                      "the real batch, batch-norm momentum 0.1, as the official loop); ours_dsa "
                      "(one DSA transformation of the real batch per step); ours_bn09 and "
                      "ours_bn09_dsa (the same with the earlier batch-norm momentum 0.9)")
  p.add_argument("--steps", type=int, default=2000, help="outer steps on both sides")
  p.add_argument("--width", type=int, default=32, help="pool nets' first-block width")
  p.add_argument("--batch", type=int, default=256, help="real images per outer step")
  p.add_argument("--num-models", type=int, default=10, help="pool size")
  p.add_argument("--max-online-updates", type=int, default=100)
  p.add_argument("--root", default=os.path.join(REPO, "runs", "peers", "frepo"))
  p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "peers",
                                               "frepo_mnist.json"))
  p.add_argument("--frepo-python", default="/work/venvs/frepo/bin/python")
  p.add_argument("--frepo-root", default=os.environ.get("FREPO_ROOT", "/work/peers/FRePo"))
  p.add_argument("--core", default="1",
                 help="taskset CPU list the distillations are pinned to ('' for none)")
  p.add_argument("--eval-seeds", type=int, default=5, help="networks of our evaluator per set")
  p.add_argument("--eval-core", default="", help="taskset CPU list of the evaluations")
  p.add_argument("--no-distill", action="store_true", help="evaluate and tabulate what exists")
  p.add_argument("--no-eval", action="store_true", help="distil only")
  return p.parse_args(argv)


def support_path(args, side: str, folder: str) -> str:
  if side == "official":
    return os.path.join(folder, "np", f"step{str(args.steps).zfill(6)}.npz")
  return os.path.join(folder, "distilled.npz")


def distill_command(args, side: str, ipc: int, seed: int, folder: str) -> list[str]:
  if side == "official":
    return [args.frepo_python, os.path.join(HERE, "official.py"), "--frepo-root",
            args.frepo_root, "--ipc", str(ipc), "--seed", str(seed), "--steps", str(args.steps),
            "--width", str(args.width), "--depth", "3", "--normalization", "batch",
            "--batch-size", str(args.batch), "--num-nn-state", str(args.num_models),
            "--max-online-updates", str(args.max_online_updates), "--learn-label", "1",
            "--out", folder]
  cmd = [sys.executable, "-m", "experiments.frepo", "--dataset", "mnist", "--preset", "cpu",
         "--ipc", str(ipc), "--seed", str(seed), "--steps", str(args.steps), "--width",
         str(args.width), "--target-batch", str(args.batch), "--num-models",
         str(args.num_models), "--max-online-updates", str(args.max_online_updates),
         "--learn-labels", "--eval-every", "0", "--no-progress", "--workdir", folder]
  return cmd + OURS[side]


def steady_rates(side: str, folder: str) -> dict[str, float]:
  """Seconds per step over the run's second half (no compilation): wall for both sides (the
  official loop logs steps/s every 500 steps), CPU for ours (metrics.jsonl's cpu_time)."""
  if side == "official":
    rates = read_json(os.path.join(folder, "official.json"))["metrics"].get(
        "monitor/steps_per_second", [])
    late = [1 / v for step, v in rates if step % 500 == 0 and step > 500]
    return {"steady_wall_s_per_step": float(np.mean(late))} if late else {}
  steps = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))
           if '"train_time"' in line]
  half = len(steps) // 2
  a, b = steps[half], steps[-2]  # the last step also times the final KRR evaluation
  n = b["step"] - a["step"]
  return {"steady_wall_s_per_step": (b["train_time"] - a["train_time"]) / n,
          "steady_cpu_s_per_step": (b["cpu_time"] - a["cpu_time"]) / n}


def distill(args, side: str, ipc: int, seed: int, folder: str) -> None:
  """One distillation into `folder`; `folder/run.json` marks it done (times of the command)."""
  marker = os.path.join(folder, "run.json")
  if os.path.exists(marker):
    return
  os.makedirs(folder, exist_ok=True)
  cmd = distill_command(args, side, ipc, seed, folder)
  print(f"distil {side} ipc {ipc} seed {seed} -> {folder}", flush=True)
  cpu, wall, rc = run_child(cmd, os.path.join(folder, "distill.log"), args.core, QUIET_TF)
  if rc:
    sys.exit(f"{side} ipc {ipc} seed {seed} failed (exit {rc}); see {folder}/distill.log")
  record = {"side": side, "ipc": ipc, "seed": seed, "steps": args.steps, "command": cmd,
            "process_cpu_s": cpu, "process_wall_s": wall, "core": args.core}
  if side == "official":
    official = read_json(os.path.join(folder, "official.json"))
    record |= {"distill_cpu_s": official["distill_cpu_s"],
               "distill_wall_s": official["distill_wall_s"], "commit": official["commit"]}
  else:
    steps = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))
             if '"train_time"' in line]
    # cpu_time counts the final KRR evaluation too; the step before the last does not.
    record |= {"distill_cpu_s": steps[-2]["cpu_time"] * len(steps) / (len(steps) - 1),
               "distill_wall_s": steps[-1]["train_time"], "steps_logged": len(steps)}
  record |= steady_rates(side, folder)
  write_json(marker, record)
  print(f"  {wall:.0f} s wall, {cpu:.0f} CPU-s", flush=True)


def evaluate_transfer(args, side: str, folder: str) -> tuple[list[float], dict]:
  """Accuracies of `--eval-seeds` networks trained by `experiments.transfer --protocol frepo`."""
  workdir = os.path.join(folder, "eval_frepo")
  report = os.path.join(workdir, "transfer.json")
  if not os.path.exists(report):
    cmd = [sys.executable, "-m", "experiments.transfer", "--support",
           support_path(args, side, folder), "--dataset", "mnist", "--protocol", "frepo",
           "--seeds", str(args.eval_seeds), "--baselines", "none", "--eval-every", "100000",
           "--no-progress", "--workdir", workdir]
    print(f"evaluate (ours, frepo protocol) {folder}", flush=True)
    cpu, wall, rc = run_child(cmd, os.path.join(folder, "eval_frepo.log"), args.eval_core,
                               QUIET_TF)
    if rc:
      sys.exit(f"evaluation of {folder} failed (exit {rc}); see {folder}/eval_frepo.log")
    print(f"  {wall:.0f} s wall, {cpu:.0f} CPU-s", flush=True)
  row = read_json(report)["rows"][0]
  return row["test_acc"], {k: row[k] for k in ("net", "width", "norm", "protocol", "steps", "lr",
                                                "train_time")}


def evaluate_krr(args, side: str, folder: str) -> dict[str, float]:
  """KRR test accuracy of the set (`experiments.evaluate`), per kernel of KRR_KERNELS."""
  path = os.path.join(folder, "eval_krr.json")
  if not os.path.exists(path):
    out = {}
    for kernel in KRR_KERNELS:
      cmd = [sys.executable, "-m", "experiments.evaluate", "--support",
             support_path(args, side, folder), "--dataset", "mnist", "--kernel", kernel,
             "--json-out"]
      result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                              env=dict(os.environ) | {"TF_CPP_MIN_LOG_LEVEL": "2"})
      lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
      if result.returncode or not lines:
        sys.exit(f"KRR evaluation of {folder} failed: {result.stderr[-500:]}")
      out[kernel] = json.loads(lines[-1])["test_acc"]
    write_json(path, out)
  return read_json(path)


def table(records: list[dict]) -> str:
  from kip.cli import format_table  # noqa: PLC0415

  rows = []
  per_step = {}
  for ipc in sorted({r["ipc"] for r in records}):
    for side in SIDES:
      rs = [r for r in records if r["side"] == side and r["ipc"] == ipc]
      if not rs:
        continue
      accs = [a for r in rs for a in r.get("acc_transfer", [])]
      krr = {k: [r["krr"][k] for r in rs if "krr" in r] for k in KRR_KERNELS}
      cpu = np.mean([r["distill_cpu_s"] for r in rs])
      per_step[side, ipc] = cpu / rs[0]["steps"]
      wall_step = [r["steady_wall_s_per_step"] for r in rs if "steady_wall_s_per_step" in r]
      rows.append([side, str(ipc), ",".join(str(r["seed"]) for r in rs), interval_n(accs),
                   " / ".join(f"{100 * np.mean(v):.2f}" if v else "-" for v in krr.values()),
                   f"{cpu:.0f}", f"{1000 * cpu / rs[0]['steps']:.0f}",
                   f"{1000 * np.mean(wall_step):.0f}" if wall_step else "-"])
  for row in rows:
    side, ipc = row[0], int(row[1])
    ratio = per_step.get(("official", ipc), np.nan) / per_step.get((side, ipc), np.nan)
    row.append(f"{ratio:.2f}" if side != "official" and np.isfinite(ratio) else "")
  return format_table(("side", "ipc", "seeds", "transfer acc %: mean [95% t] (nets)",
                       "KRR fc / conv %", "distill CPU-s", "CPU-ms/step", "steady ms/step",
                       "CPU/step official/this"), rows)


PAIRS = (("ours", "official"), ("ours_dsa", "ours"), ("ours_bn09", "ours"),
         ("ours_bn09_dsa", "ours_dsa"))


def paired(records: list[dict]) -> str:
  """A side minus another per (ipc, seed, evaluation network) for each pair of PAIRS."""
  from kip.cli import format_table  # noqa: PLC0415

  rows = [[f"{mine} - {other}", str(ipc), ",".join(seeds), interval_n(diffs)]
          for mine, other in PAIRS
          for ipc, seeds, diffs in paired_differences(records, mine, other, "acc_transfer")]
  return format_table(("comparison", "ipc", "seeds", "points: mean [95% t] (pairs)"), rows)


def main(argv=None) -> None:
  args = parse_args(argv)
  ipcs = [int(v) for v in args.ipcs.split(",")]
  seeds = [int(v) for v in args.seeds.split(",")]
  sides = args.sides.split(",")
  if set(sides) - set(SIDES):
    sys.exit(f"unknown side in --sides {args.sides}; choose among {', '.join(SIDES)}")
  records = []
  for ipc in ipcs:
    for seed in seeds:
      for side in sides:
        folder = os.path.join(args.root, side, f"ipc{ipc}_seed{seed}")
        if not args.no_distill:
          distill(args, side, ipc, seed, folder)
        marker = os.path.join(folder, "run.json")
        if not os.path.exists(marker):
          continue
        record = read_json(marker)
        done = os.path.exists(os.path.join(folder, "eval_frepo", "transfer.json"))
        if not args.no_eval or done:
          record["acc_transfer"], record["eval_transfer"] = evaluate_transfer(args, side, folder)
          record["krr"] = evaluate_krr(args, side, folder)
        records.append(record)
        write_json(args.out, {"settings": vars(args), "runs": records})
  print(table(records))
  print()
  print(paired(records))
  print(f"written {args.out}")


if __name__ == "__main__":
  main()
