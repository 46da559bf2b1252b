"""DataDAM side by side: the official code (bench/peers/datadam/official.py) and ours.

Issue 39: at equal compute (our `experiments.datadam --preset cpu`: ConvNet-3 width 32 with batch
norm, 32 real images per class, 1,000 image updates, SGD lr 1 momentum 0.5, initialisation from
real images, DSA, attention power p = 4, attention x 100 and embedding x 100 x 0.01), distil
MNIST with both for each ipc and seed, taking turns (official, then ours, for the same ipc and
seed) so that the shared cores slow both alike; both pinned to one core (`--core`) with one
thread. Then every set is evaluated by one evaluator, ours: `experiments.transfer --protocol dc`
(ConvNet-3, instance norm, SGD 0.01, momentum 0.9, weight decay 5e-4, lr x0.1 at half, batch
min(256, N), 1000 epochs, DC's crop/scale/rotate per image on MNIST), at `--eval-width` (32 as
the preset's; 0 for the protocol's 128). With `--official-eval-nets K`, also the official
`evaluate_synset` (DataDAM's defaults: 1800 (+1) epochs, batch 64, DSA; its ConvNet with batch
norm at `--official-eval-width`) on both sides' sets.

Sides: `official` (main_DataDAM.py's loop: all classes through the network in one forward pass,
so batch norm's statistics mix the classes), `ours`, and, on request, `official_classbn` (the
official code with one forward pass per class, batch-norm statistics per class as ours: it tells
the two implementations' remaining differences from this one).

Runs under the project's Python and starts the official side with the PyTorch environment's
(`--torch-python`). Every run goes to its own folder under `--root` (runs/ is not tracked); a run
whose `run.json` marker exists is skipped, so the command resumes (a marker made with other
settings stops it). Writes `--out` (one record per run: side, ipc, seed, settings, distillation
times, the images' spread, accuracies per evaluation network) and beside it a `.md` with the
tables it prints: per side and ipc, the mean accuracy with a 95% t-interval
(`kip.scores.interval95`) over all evaluation networks of all seeds; ours minus official, paired
by (seed, evaluation network).

    python bench/peers/datadam/compare.py --ipcs 1,10 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, REPO)  # run as a script: the repository's packages
from bench.peers.common import (  # noqa: E402
  interval,  # noqa: E402
  read_json,
  run_child,
  write_json,
)
from bench.peers.dm.compare import dc_pair, ours_times, paired  # noqa: E402

# Our sides: `ours_all` takes batch norm's statistics over every class at once, as the official
# code (`--norm-groups all`); `ours` per class.
OURS = {"ours": ["--norm-groups", "class"], "ours_all": ["--norm-groups", "all"]}
SIDES = ("official", "ours", "official_classbn", "ours_all")
PAIRS = (("ours", "official"), ("ours_all", "official"), ("ours", "official_classbn"),
         ("ours_all", "ours"))
OFFICIAL_BN_BATCH = {"official": "all", "official_classbn": "class"}
SETTINGS = ("steps", "batch_real", "width", "power")  # what a run's marker must match


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--ipcs", default="1,10", help="comma-separated images per class")
  p.add_argument("--seeds", default="0,1,2", help="comma-separated distillation seeds")
  p.add_argument("--sides", default="official,ours",
                 help=f"which sides to run, of {', '.join(SIDES)}")
  p.add_argument("--steps", type=int, default=1000, help="image updates on both sides")
  p.add_argument("--batch-real", type=int, default=32, help="real images per class per update")
  p.add_argument("--width", type=int, default=32, help="the matching ConvNet's width")
  p.add_argument("--power", type=float, default=4.0,
                 help="p of the attention |f|^p on both sides (ours' default and the paper's "
                      "table: 4; the official code: 1)")
  p.add_argument("--root", default=os.path.join(REPO, "runs", "peers", "datadam"))
  p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "peers",
                                               "datadam_mnist.json"))
  p.add_argument("--torch-python", default="/work/venvs/torch/bin/python")
  p.add_argument("--datadam-root", default=os.environ.get("DATADAM_ROOT", "/work/peers/DataDAM"))
  p.add_argument("--manual-dir", default=os.environ.get("KIP_MANUAL_DIR", "/work/shared/data"),
                 help="our side's offline MNIST ($KIP_MANUAL_DIR)")
  p.add_argument("--core", default="0",
                 help="taskset CPU list every distillation is pinned to ('' for none): one thread")
  p.add_argument("--eval-core", default="",
                 help="taskset CPU list of the evaluations ('': unpinned)")
  p.add_argument("--eval-seeds", type=int, default=5, help="networks of our evaluator per set")
  p.add_argument("--eval-width", type=int, default=32,
                 help="width of our evaluator's ConvNet (0: the dc protocol's 128)")
  p.add_argument("--eval-steps", type=int, default=0,
                 help="training steps of our evaluator (0: the dc protocol's 1000 epochs)")
  p.add_argument("--official-eval-nets", type=int, default=0,
                 help="networks of the official evaluate_synset per set (0: skip)")
  p.add_argument("--official-eval-width", type=int, default=32,
                 help="width of the official evaluation ConvNet (batch norm; the code's: 128)")
  p.add_argument("--official-eval-epochs", type=int, default=1800,
                 help="epochs of the official evaluate_synset (the code's default 1800)")
  p.add_argument("--no-distill", action="store_true", help="evaluate and tabulate what exists")
  p.add_argument("--no-eval", action="store_true", help="distil only")
  return p.parse_args(argv)


def support_path(side: str, folder: str) -> str:
  if side in OURS:
    return os.path.join(folder, "distilled.npz")
  return os.path.join(folder, "images_datadam_official.npy")


def distill_command(args, side: str, ipc: int, seed: int, folder: str) -> list[str]:
  if side in OURS:
    return [sys.executable, "-m", "experiments.datadam", "--dataset", "mnist", "--preset", "cpu",
            "--ipc", str(ipc), "--seed", str(seed), "--steps", str(args.steps), "--width",
            str(args.width), "--real-per-class", str(args.batch_real), "--power",
            str(args.power), "--norm", "batch", "--lr", "1.0", "--momentum", "0.5",
            "--task-balance", "100", "--lambda-mmd", "0.01", "--init", "real",
            "--eval-every", "0", "--no-progress", "--workdir", folder, *OURS[side]]
  return [args.torch_python, os.path.join(HERE, "official.py"), "--datadam-root",
          args.datadam_root, "--ipc", str(ipc), "--seed", str(seed), "--iterations",
          str(args.steps), "--batch-real", str(args.batch_real), "--width", str(args.width),
          "--norm", "batch", "--power", str(args.power), "--attention-weight", "100",
          "--task-balance", "0.01", "--lr-img", "1.0", "--init", "real", "--bn-batch",
          OFFICIAL_BN_BATCH[side], "--threads", "1", "--out", folder]


def settings(args) -> dict:
  return {k: getattr(args, k) for k in SETTINGS}


def distill(args, side: str, ipc: int, seed: int, folder: str) -> None:
  """One distillation into `folder`; `folder/run.json` marks it done (times of the command)."""
  marker = os.path.join(folder, "run.json")
  if os.path.exists(marker):
    return
  os.makedirs(folder, exist_ok=True)
  cmd = distill_command(args, side, ipc, seed, folder)
  print(f"distil {side} ipc {ipc} seed {seed} -> {folder}", flush=True)
  cpu, wall, rc = run_child(cmd, os.path.join(folder, "distill.log"), args.core,
                            {"KIP_MANUAL_DIR": args.manual_dir})
  if rc:
    sys.exit(f"{side} ipc {ipc} seed {seed} failed (exit {rc}); see {folder}/distill.log")
  record = {"side": side, "ipc": ipc, "seed": seed, "settings": settings(args), "command": cmd,
            "process_cpu_s": cpu, "process_wall_s": wall, "core": args.core}
  if side in OURS:
    record |= ours_times(folder)
  else:
    official = read_json(os.path.join(folder, "official.json"))
    record |= {k: official[k] for k in ("distill_cpu_s", "distill_wall_s", "commit")}
  write_json(marker, record)
  print(f"  {wall:.0f} s wall, {cpu:.0f} CPU-s", flush=True)


def eval_ours_name(args) -> str:
  """Our evaluation's folder in a run, named by its settings (a resumed call with other evaluation
  flags evaluates anew)."""
  return f"eval_dc_w{args.eval_width}_steps{args.eval_steps}_n{args.eval_seeds}"


def eval_official_name(args) -> str:
  return (f"eval_official_w{args.official_eval_width}_e{args.official_eval_epochs}"
          f"_n{args.official_eval_nets}")


def evaluate_ours(args, side: str, folder: str) -> tuple[list[float], dict]:
  """Accuracies of `--eval-seeds` networks trained by `experiments.transfer --protocol dc`."""
  workdir = os.path.join(folder, eval_ours_name(args))
  report = os.path.join(workdir, "transfer.json")
  if not os.path.exists(report):
    cmd = [sys.executable, "-m", "experiments.transfer", "--support", support_path(side, folder),
           "--dataset", "mnist", "--protocol", "dc", "--seeds", str(args.eval_seeds),
           "--baselines", "none", "--width", str(args.eval_width), "--steps",
           str(args.eval_steps), "--eval-every", "100000", "--no-progress", "--workdir", workdir]
    print(f"evaluate (ours, dc) {folder}", flush=True)
    log = workdir + ".log"
    cpu, wall, rc = run_child(cmd, log, args.eval_core, {"KIP_MANUAL_DIR": args.manual_dir})
    if rc:
      sys.exit(f"evaluation of {folder} failed (exit {rc}); see {log}")
    print(f"  {wall:.0f} s wall, {cpu:.0f} CPU-s", flush=True)
  row = read_json(report)["rows"][0]
  return row["test_acc"], {k: row[k] for k in ("net", "width", "norm", "protocol", "steps", "lr",
                                                "train_time")}


def dc_images(side: str, folder: str) -> str:
  """The set as an images/labels .npy pair in DC's space (NCHW)."""
  return support_path(side, folder) if side not in OURS else dc_pair(side, folder)


def evaluate_official(args, side: str, folder: str) -> dict:
  """The official evaluate_synset's accuracies on the set (`--official-eval-nets` networks)."""
  path = os.path.join(folder, eval_official_name(args) + ".json")
  if not os.path.exists(path):
    cmd = [args.torch_python, os.path.join(HERE, "official.py"), "--datadam-root",
           args.datadam_root, "--eval-only", "--support", dc_images(side, folder), "--eval-nets",
           str(args.official_eval_nets), "--eval-width", str(args.official_eval_width),
           "--eval-epochs", str(args.official_eval_epochs), "--threads", "1", "--out", folder]
    print(f"evaluate (official evaluate_synset) {folder}", flush=True)
    log = os.path.join(folder, eval_official_name(args) + ".log")
    cpu, wall, rc = run_child(cmd, log, args.eval_core)
    if rc:
      sys.exit(f"official evaluation of {folder} failed (exit {rc}); see {log}")
    last = [line for line in open(log) if line.startswith('{"support"')][-1]
    write_json(path, json.loads(last) | {"cpu_s": cpu, "wall_s": wall,
                                         "width": args.official_eval_width,
                                         "epochs": args.official_eval_epochs})
    print(f"  {wall:.0f} s wall, {cpu:.0f} CPU-s", flush=True)
  return read_json(path)


def image_std(side: str, folder: str) -> float:
  """Mean over images of each one's standard deviation over its pixels, in DC's space."""
  images = np.load(dc_images(side, folder))
  return float(images.reshape(len(images), -1).std(1).mean())


def table(records: list[dict]) -> str:
  from kip.cli import format_table  # noqa: PLC0415

  rows = []
  for ipc in sorted({r["ipc"] for r in records}):
    for side in SIDES:
      rs = [r for r in records if r["side"] == side and r["ipc"] == ipc]
      if not rs:
        continue
      ours_eval = [a for r in rs for a in r.get("acc_ours_dc", [])]
      official_eval = [a for r in rs for a in r.get("acc_official_dsa", [])]
      cpu = [r["distill_cpu_s"] / r["settings"]["steps"] for r in rs if "distill_cpu_s" in r]
      rows.append((side, str(ipc), ",".join(str(r["seed"]) for r in rs),
                   f"{interval(ours_eval)} (n={len(ours_eval)})",
                   f"{interval(official_eval)} (n={len(official_eval)})" if official_eval else "-",
                   f"{np.mean([r['image_std'] for r in rs]):.2f}",
                   f"{np.mean(cpu):.3f}" if cpu else "-",
                   f"{np.mean([r['distill_wall_s'] for r in rs]):.0f}",
                   f"{np.mean([r['process_cpu_s'] for r in rs]):.0f}"))
  return format_table(("side", "ipc", "seeds", "acc %, ours dc eval: mean [95% t]",
                       "acc %, official eval (DSA): mean [95% t]", "image std (DC space)",
                       "distill CPU-s/update", "distill wall-s", "command CPU-s"), rows)


def write_text(path: str, text: str) -> None:
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def main(argv=None) -> None:
  args = parse_args(argv)
  command = shlex.join(sys.argv[1:] if argv is None else argv)
  ipcs = [int(v) for v in args.ipcs.split(",")]
  seeds = [int(v) for v in args.seeds.split(",")]
  sides = args.sides.split(",")
  if set(sides) - set(SIDES):
    sys.exit(f"unknown side in --sides {args.sides}; choose among {', '.join(SIDES)}")
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
        if record["settings"] != settings(args):
          sys.exit(f"{folder} was distilled with {record['settings']}, not {settings(args)}: "
                   "pass the same flags or another --root")
        record["image_std"] = image_std(side, folder)
        if not args.no_eval or os.path.exists(
            os.path.join(folder, eval_ours_name(args), "transfer.json")):
          record["acc_ours_dc"], record["eval_ours_dc"] = evaluate_ours(args, side, folder)
        if args.official_eval_nets and not args.no_eval:
          evaluate_official(args, side, folder)
        official_eval = os.path.join(folder, eval_official_name(args) + ".json")
        if args.official_eval_nets and os.path.exists(official_eval):
          done = read_json(official_eval)
          record["acc_official_dsa"] = done["accs"]
          record["official_eval"] = {k: done[k] for k in ("width", "epochs", "cpu_s")}
        records.append(record)
        write_json(args.out, {"settings": vars(args), "runs": records})
  summary = (f"{table(records)}\n\ndifferences paired by (seed, evaluation network):\n"
             f"{paired(records, PAIRS)}")
  print(summary)
  md = os.path.splitext(args.out)[0] + ".md"
  write_text(md, "# DataDAM on MNIST: the official code beside ours (issue 39)\n\n"
                 f"Written by `python bench/peers/datadam/compare.py {command}`;"
                 " set-up and settings: bench/peers/README.md; per-run records in "
                 f"`{os.path.basename(args.out)}`. Accuracies: mean and 95% t-interval over all"
                 " evaluation networks of all seeds.\n\n```\n" + summary + "\n```\n")
  print(f"written {args.out} and {md}")


if __name__ == "__main__":
  main()
