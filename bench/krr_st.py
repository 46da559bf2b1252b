"""KRR-ST on a 2-core CPU: teacher, distillation (with and without the pool's counter reset) and
the pre-train / fine-tune table of the paper's Table 1, for one source -> target pair.

  python -m bench.krr_st --source mnist --target fashion_mnist --sizes 100 --labelled 1000,0

Every step is a command of this project run in its own workdir under --root, so an interrupted
benchmark resumes where it stopped and finished parts are read back, not redone:
  teacher:       the default teacher of `experiments.teacher --dataset <source>` (runs/teachers/)
  distillation:  <root>/krr_st-<source>-n<size>[-noreset]
  evaluation:    <root>/krr_st-<source>-n<size>/pretrain-<target>-<labelled>[-<net>]
Rows: no pre-training, a random real subset, the KRR-ST set (paper: counter reset), the KRR-ST set
made with the official code's never-reset pool, and `--supervised` sets (e.g. FRePo's) and the
teacher when asked; `--nets` repeats the table for other architectures (generalisation). Prints
one table and writes bench/results/krr_st_<source>_<target>[_<tag>].json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from kip import cli

NETS_DEFAULT = "krr_st_convnet"  # experiments.pretrain's default network
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args: list[str]) -> float:
  t0 = time.perf_counter()
  print(f"$ python -m {' '.join(shlex.quote(a) for a in args)}", flush=True)
  done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT)
  if done.returncode:
    raise SystemExit(f"failed ({done.returncode}): python -m {' '.join(args)}")
  return time.perf_counter() - t0


def _metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _share_pretraining(done: str, edir: str) -> None:
  """Seed <edir>/<row>/pretrain from a finished budget's: pre-training never sees the labels.

  experiments.pretrain keeps each row's pre-training in <workdir>/<row>/pretrain (the one loop's
  workdir), and it depends on the set, the network and the pre-training flags only, which all
  budgets of one (size, net) share; without this every labelled budget pre-trains again.
  """
  if done == edir or not os.path.isdir(done):
    return
  for row in sorted(os.listdir(done)):
    src, dst = os.path.join(done, row, "pretrain"), os.path.join(edir, row, "pretrain")
    if os.path.isdir(src) and not os.path.exists(dst):
      shutil.copytree(src, dst + ".tmp", dirs_exist_ok=True)
      os.replace(dst + ".tmp", dst)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--source", default="mnist", help="distilled (unlabelled) dataset")
  parser.add_argument("--target", default="fashion_mnist", help="fine-tuning dataset")
  parser.add_argument("--sizes", default="100", help="distilled set sizes, comma-separated")
  parser.add_argument("--labelled", default="1000,0",
                      help="labelled target images, comma-separated (0: the whole split)")
  parser.add_argument("--rows", default="none,random,distilled",
                      help="rows of experiments.pretrain (the no-reset set is added)")
  parser.add_argument("--no-reset-row", action=argparse.BooleanOptionalAction, default=True,
                      help="also distil with the official never-reset pool and evaluate it")
  parser.add_argument("--supervised", default="", help="supervised sets to add as rows")
  parser.add_argument("--nets", default=NETS_DEFAULT,
                      help="architectures pre-trained and fine-tuned on the same sets, e.g. "
                      "krr_st_convnet,mlp,resnet18 (the no-reset and supervised rows: "
                      "krr_st_convnet only)")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--root", default="runs/bench")
  parser.add_argument("--manual-dir", default=os.path.join(ROOT, "..", "shared", "data"))
  parser.add_argument("--data-dir", default=os.path.join(ROOT, ".cache", "tfds"))
  parser.add_argument("--tag", default="", help="suffix of the results file's name")
  parser.add_argument("--eval-args", default="", help="extra flags for experiments.pretrain")
  parser.add_argument("--distil-args", default="",
                      help="extra flags for experiments.krr_st, e.g. --steps 1000")
  args = parser.parse_args(argv)
  data = ["--manual-dir", args.manual_dir, "--data-dir", args.data_dir]

  teacher_time = _run(["experiments.teacher", "--dataset", args.source, "--no-progress", *data])
  from methods.barlow import default_teacher  # noqa: PLC0415

  teacher = default_teacher(args.source)
  teacher_metrics = _metrics(os.path.dirname(teacher))
  rows, all_sets = [], {}
  for size in args.sizes.split(","):
    variants = [("reset", [])] + ([("noreset", ["--no-reset"])] if args.no_reset_row else [])
    sets = {}
    for name, flags in variants:
      workdir = os.path.join(args.root, f"krr_st-{args.source}-n{size}"
                             + ("-noreset" if name == "noreset" else ""))
      seconds = _run(["experiments.krr_st", "--dataset", args.source, "--size", size,
                      "--workdir", workdir, "--no-progress", *flags, *data,
                      *shlex.split(args.distil_args)])
      records = _metrics(workdir)
      sets[name] = {"workdir": workdir, "this_call_s": seconds,
                    "wall_time": records[-1]["wall_time"], "steps": records[-1]["step"],
                    "krr_validation_mse": [r["krr_validation_mse"] for r in records
                                           if "krr_validation_mse" in r][-1],
                    "pool_expired": records[-1].get("pool_expired")}
    all_sets[size] = sets
    base = sets["reset"]["workdir"]
    first_edir = {}  # net -> the first budget's evaluation workdir
    for labelled, net in itertools.product(args.labelled.split(","), args.nets.split(",")):
      default_net = net == NETS_DEFAULT
      supervised = [s for s in args.supervised.split(",") if s] if default_net else []
      suffix = "" if default_net else f"-{net}"
      edir = os.path.join(base, f"pretrain-{args.target}-{labelled}{suffix}")
      _share_pretraining(first_edir.setdefault(net, edir), edir)
      _run(["experiments.pretrain", "--support", os.path.join(base, "distilled.npz"),
            "--dataset", args.target, "--labelled", labelled, "--rows", args.rows,
            "--seeds", str(args.seeds), "--workdir", edir, "--no-progress",
            *(["--supervised", ",".join(supervised)] if supervised else []),
            *([] if default_net else ["--net", net]), *data, *shlex.split(args.eval_args)])
      with open(os.path.join(edir, "pretrain.json")) as f:
        report = json.load(f)
      found = report["rows"]
      if "noreset" in sets and default_net:
        ndir = os.path.join(sets["noreset"]["workdir"], f"pretrain-{args.target}-{labelled}")
        _run(["experiments.pretrain", "--support",
              os.path.join(sets["noreset"]["workdir"], "distilled.npz"), "--dataset",
              args.target, "--labelled", labelled, "--rows", "distilled", "--seeds",
              str(args.seeds), "--workdir", ndir, "--no-progress", *data,
              *shlex.split(args.eval_args)])
        with open(os.path.join(ndir, "pretrain.json")) as f:
          extra = json.load(f)["rows"]
        found = found + [dict(r, row="distilled (no reset)") for r in extra]
      for r in found:
        rows.append({"source": args.source, "target": args.target, "size": int(size),
                     "labelled": report["labelled"], **r})
  print(cli.format_table(
      ("size", "labelled", "pre-training", "net", "linear probe (%)", "fine-tuned (%)"),
      [(str(r["size"]), str(r["labelled"]), r["row"], r["net"],
        cli.percent(r["probe_acc_mean"], r["probe_acc_std"]),
        cli.percent(r["finetune_acc_mean"], r["finetune_acc_std"])) for r in rows]))
  tag = f"_{args.tag}" if args.tag else ""
  out = os.path.join(ROOT, "bench", "results", f"krr_st_{args.source}_{args.target}{tag}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out + ".tmp", "w") as f:
    json.dump({"command": " ".join(sys.argv), "teacher": teacher,
               "teacher_probe_test_acc": teacher_metrics[-1].get("probe_test_acc"),
               "teacher_wall_time": teacher_metrics[-1]["wall_time"],
               "teacher_this_call_s": teacher_time, "sets": all_sets, "rows": rows}, f, indent=2)
  os.replace(out + ".tmp", out)
  print(f"written {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
