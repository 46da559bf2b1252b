"""DM side by side: the official code (bench/peers/dm/official.py) and ours (`experiments.dm`).

Issue 39: at equal compute (our `cpu` preset: ConvNet-3 width 32 with instance norm, 64 real
images per class, 1,000 image updates, SGD lr 1 momentum 0.5, initialisation from real images,
DSA), distil MNIST with both for each ipc and seed, taking turns (official, then ours, for the same
ipc and seed) so that the shared cores slow both alike, then evaluate every set with one evaluator:
`experiments.transfer --protocol dc` (ConvNet-3 width 128, instance norm, SGD 0.01, momentum 0.9,
weight decay 5e-4, lr x0.1 at half, batch min(256, N), 1000 epochs, DC's crop/scale/rotate per
image on MNIST). With `--official-eval-nets K`, also the official `evaluate_synset` (ConvNet width
128, the same optimiser, 1000 epochs, DSA) on both sides' sets.

Runs under the project's Python and starts the official side with the PyTorch environment's
(`--torch-python`). Every run goes to its own folder under `--root` (runs/ is not tracked); a run
whose output exists is skipped, so the command resumes. Writes `--out` (one record per run: side,
ipc, seed, distillation times, accuracies per evaluation network) and prints a table: per side and
ipc, the mean accuracy with a 95% t-interval over all evaluation networks of all seeds.

    python bench/peers/dm/compare.py --ipcs 1,10 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, REPO)  # run as a script: the repository's packages
from bench.peers.common import (  # noqa: E402
  interval,
  interval_n,
  paired_differences,
  read_json,
  run_child,
  write_json,
)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--ipcs", default="1,10", help="comma-separated images per class")
  p.add_argument("--seeds", default="0,1,2", help="comma-separated distillation seeds")
  p.add_argument("--sides", default="official,ours", help="which sides to run")
  p.add_argument("--steps", type=int, default=1000, help="image updates on both sides")
  p.add_argument("--root", default=os.path.join(REPO, "runs", "peers", "dm"))
  p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "peers", "dm_mnist.json"))
  p.add_argument("--torch-python", default="/work/venvs/torch/bin/python")
  p.add_argument("--dc-root", default=os.environ.get("DC_ROOT", "/work/peers/DatasetCondensation"))
  p.add_argument("--core", default="0",
                 help="taskset CPU list every child is pinned to ('' for none): one thread each")
  p.add_argument("--eval-seeds", type=int, default=5, help="networks of our evaluator per set")
  p.add_argument("--eval-width", type=int, default=0,
                 help="width of our evaluator's ConvNet (0: the dc protocol's 128)")
  p.add_argument("--eval-steps", type=int, default=0,
                 help="training steps of our evaluator (0: the dc protocol's 1000 epochs)")
  p.add_argument("--eval-core", default="",
                 help="taskset CPU list of the evaluations ('': unpinned, both cores)")
  p.add_argument("--official-eval-nets", type=int, default=0,
                 help="networks of the official evaluate_synset per set (0: skip)")
  p.add_argument("--official-eval-model", default="ConvNet",
                 help="official model name for evaluate_synset (ConvNet: width 128; ConvNetW32)")
  p.add_argument("--no-distill", action="store_true", help="evaluate and tabulate what exists")
  p.add_argument("--no-eval", action="store_true", help="distil only")
  return p.parse_args(argv)


def support_path(side: str, folder: str) -> str:
  return os.path.join(folder, "images_dm_official.npy" if side == "official" else "distilled.npz")


def ours_times(folder: str) -> dict:
  """Our run's distillation time from its metrics.jsonl: the loop's wall and CPU seconds at the
  last step (`train_time` leaves out evaluations and checkpoints; `cpu_time`, where logged, is
  the process's CPU time spent in steps)."""
  steps = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))
           if '"train_time"' in line]
  times = {"distill_wall_s": steps[-1]["train_time"], "steps_logged": len(steps)}
  # the last step's record includes the final evaluation in its cpu_time: take the one before,
  # scaled to all steps
  plain = [r for r in steps if "cpu_time" in r and not any(k.startswith("finite_") for k in r)]
  if plain:
    times["distill_cpu_s"] = plain[-1]["cpu_time"] * steps[-1]["step"] / plain[-1]["step"]
  return times


def distill(args, side: str, ipc: int, seed: int, folder: str) -> None:
  """One distillation into `folder`; `folder/run.json` marks it done (times of the command)."""
  marker = os.path.join(folder, "run.json")
  if os.path.exists(marker):
    return
  os.makedirs(folder, exist_ok=True)
  if side == "official":
    cmd = [args.torch_python, os.path.join(HERE, "official.py"), "--dc-root", args.dc_root,
           "--ipc", str(ipc), "--seed", str(seed), "--iterations", str(args.steps),
           "--batch-real", "64", "--width", "32", "--lr-img", "1.0", "--init", "real",
           "--threads", "1", "--out", folder]
  else:
    cmd = [sys.executable, "-m", "experiments.dm", "--dataset", "mnist", "--preset", "cpu",
           "--ipc", str(ipc), "--seed", str(seed), "--steps", str(args.steps),
           "--eval-every", "0", "--no-progress", "--workdir", folder]
  print(f"distil {side} ipc {ipc} seed {seed} -> {folder}", flush=True)
  cpu, wall, rc = run_child(cmd, os.path.join(folder, "distill.log"), args.core)
  if rc:
    sys.exit(f"{side} ipc {ipc} seed {seed} failed (exit {rc}); see {folder}/distill.log")
  record = {"side": side, "ipc": ipc, "seed": seed, "command": cmd, "process_cpu_s": cpu,
            "process_wall_s": wall}
  if side == "official":
    official = read_json(os.path.join(folder, "official.json"))
    record |= {"distill_cpu_s": official["distill_cpu_s"],
               "distill_wall_s": official["distill_wall_s"], "commit": official["commit"]}
  else:
    record |= ours_times(folder)
  write_json(marker, record)
  print(f"  {wall:.0f} s wall, {cpu:.0f} CPU-s", flush=True)


def evaluate_ours(args, side: str, folder: str) -> list[float]:
  """Accuracies of `--eval-seeds` networks trained by `experiments.transfer --protocol dc`."""
  workdir = os.path.join(folder, "eval_dc")
  report = os.path.join(workdir, "transfer.json")
  if not os.path.exists(report):
    cmd = [sys.executable, "-m", "experiments.transfer", "--support", support_path(side, folder),
           "--dataset", "mnist", "--protocol", "dc", "--seeds", str(args.eval_seeds),
           "--baselines", "none", "--width", str(args.eval_width), "--steps",
           str(args.eval_steps), "--eval-every", "100000", "--no-progress", "--workdir", workdir]
    print(f"evaluate (ours, dc) {folder}", flush=True)
    cpu, wall, rc = run_child(cmd, os.path.join(folder, "eval_dc.log"), args.eval_core)
    if rc:
      sys.exit(f"evaluation of {folder} failed (exit {rc}); see {folder}/eval_dc.log")
    print(f"  {wall:.0f} s wall, {cpu:.0f} CPU-s", flush=True)
  row = read_json(report)["rows"][0]
  return row["test_acc"], {k: row[k] for k in ("net", "width", "norm", "protocol", "steps", "lr",
                                                "train_time")}


def dc_pair(side: str, folder: str) -> str:
  """The set as an images/labels .npy pair in DC's space (NCHW), for the official evaluator."""
  if side == "official":
    return support_path(side, folder)
  from kip.io import load_distilled  # noqa: PLC0415

  d = load_distilled(support_path(side, folder), "mnist")
  pre = d.preprocessor
  mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
  pixels = d.images * std + mean  # ours: per-channel standardisation, training statistics
  images = ((pixels - 0.1307) / 0.3081).transpose(0, 3, 1, 2).astype(np.float32)
  path = os.path.join(folder, "images_dm_ours_dcspace.npy")
  np.save(path, images)
  np.save(path.replace("images_", "labels_"), d.labels.argmax(-1).astype(np.int64))
  return path


def evaluate_official(args, side: str, folder: str) -> list[float]:
  path = os.path.join(folder, "eval_official.json")
  if not os.path.exists(path):
    support = dc_pair(side, folder)
    cmd = [args.torch_python, os.path.join(HERE, "official.py"), "--dc-root", args.dc_root,
           "--eval-only", "--support", support, "--eval-nets", str(args.official_eval_nets),
           "--eval-model", args.official_eval_model,
           "--threads", "1", "--out", folder]
    print(f"evaluate (official evaluate_synset) {folder}", flush=True)
    log = os.path.join(folder, "eval_official.log")
    cpu, wall, rc = run_child(cmd, log, args.eval_core)
    if rc:
      sys.exit(f"official evaluation of {folder} failed (exit {rc}); see {log}")
    last = [line for line in open(log) if line.startswith('{"support"')][-1]
    write_json(path, json.loads(last) | {"cpu_s": cpu, "wall_s": wall,
                                         "model": args.official_eval_model})
  return read_json(path)["accs"]


def table(records: list[dict]) -> str:
  from kip.cli import format_table  # noqa: PLC0415

  rows = []
  for ipc in sorted({r["ipc"] for r in records}):
    for side in ("official", "ours"):
      rs = [r for r in records if r["side"] == side and r["ipc"] == ipc]
      if not rs:
        continue
      ours_eval = [a for r in rs for a in r.get("acc_ours_dc", [])]
      official_eval = [a for r in rs for a in r.get("acc_official_dsa", [])]
      cpu = [r["distill_cpu_s"] for r in rs if "distill_cpu_s" in r]
      rows.append((side, str(ipc), ",".join(str(r["seed"]) for r in rs),
                   f"{interval(ours_eval)} (n={len(ours_eval)})",
                   f"{interval(official_eval)} (n={len(official_eval)})" if official_eval else "-",
                   f"{np.mean([r['distill_wall_s'] for r in rs]):.0f}",
                   f"{np.mean(cpu):.0f}" if cpu else "-",
                   f"{np.mean([r['process_cpu_s'] for r in rs]):.0f}"))
  return format_table(("side", "ipc", "seeds", "acc %, ours dc eval: mean [95% t]",
                       "acc %, official eval (DSA)", "distill wall-s", "distill CPU-s",
                       "command CPU-s"), rows)


def paired(records: list[dict], pairs=(("ours", "official"),)) -> str:
  """A side minus another (`pairs`, default ours - official) per (ipc, seed, evaluation
  network), under each evaluator (`common.paired_differences`)."""
  from kip.cli import format_table  # noqa: PLC0415

  rows = []
  for mine, other in pairs:
    for key, name in (("acc_ours_dc", "ours dc eval"), ("acc_official_dsa", "official eval")):
      for ipc, seeds, diffs in paired_differences(records, mine, other, key):
        rows.append((f"{mine} - {other}", name, str(ipc), ",".join(seeds), interval_n(diffs)))
  return format_table(("comparison", "evaluator", "ipc", "seeds", "points: mean [95% t]"), rows)


def main(argv=None) -> None:
  args = parse_args(argv)
  ipcs = [int(v) for v in args.ipcs.split(",")]
  seeds = [int(v) for v in args.seeds.split(",")]
  sides = args.sides.split(",")
  records = []
  for seed in seeds:
    for ipc in ipcs:
      for side in sides:
        folder = os.path.join(args.root, side, f"ipc{ipc}_seed{seed}")
        if not args.no_distill:
          distill(args, side, ipc, seed, folder)
        marker = os.path.join(folder, "run.json")
        if not os.path.exists(marker):
          continue
        record = read_json(marker)
        if side == "ours":  # the times as the run logged them (also for runs made before)
          record |= ours_times(folder)
        if not args.no_eval:
          record["acc_ours_dc"], record["eval_ours_dc"] = evaluate_ours(args, side, folder)
          if args.official_eval_nets:
            evaluate_official(args, side, folder)
        elif os.path.exists(os.path.join(folder, "eval_dc", "transfer.json")):
          record["acc_ours_dc"], record["eval_ours_dc"] = evaluate_ours(args, side, folder)
        official_eval = os.path.join(folder, "eval_official.json")
        if os.path.exists(official_eval):  # measured now or by an earlier call
          done = read_json(official_eval)
          record["acc_official_dsa"], record["official_eval_model"] = done["accs"], done["model"]
        records.append(record)
        write_json(args.out, {"settings": vars(args), "runs": records})
  print(table(records))
  print(paired(records))
  print(f"written {args.out}")


if __name__ == "__main__":
  main()
