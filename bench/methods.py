"""Distil with FRePo / RFAD / KIP / DataDAM / DM on a 2-core CPU, then train finite networks on
every set under the named protocols beside a random real subset of the same size; print one
table, write JSON.

  python -m bench.methods --runs frepo:mnist:10 --protocols frepo,dc --seeds 5

Each run is `method:dataset:ipc`, or `method:dataset:ipc:flag=value:...` for a variant with its
own workdir (e.g. `datadam:mnist:10:init=noise` adds `--init noise`; a bare `flag` adds the
switch `--flag`). Every step is a command of this project run in its own workdir under --root
(distillation: runs/<method>-<dataset>-ipc<ipc>[-<flag>-<value>]; transfer:
runs/<...>/transfer-<protocol>), so an interrupted benchmark resumes where it stopped and
finished parts are read back, not redone.
Extra flags for a method go after `--method-args`, e.g.
`--method-args kip="--kernel nfk-convnet3 --steps 300"`; `--nets convnet3,mlp` evaluates each set
with each network (cross-architecture columns). Results: bench/results/methods_<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

from evaluation.benchmark import last_metrics
from kip import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args: list[str], log) -> float:
  t0 = time.perf_counter()
  log(f"$ python -m {' '.join(shlex.quote(a) for a in args)}")
  done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT)
  if done.returncode:
    raise SystemExit(f"failed ({done.returncode}): python -m {' '.join(args)}")
  return time.perf_counter() - t0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--runs", default="frepo:mnist:10",
                      help="method:dataset:ipc, comma-separated")
  parser.add_argument("--protocols", default="frepo,dc", help="transfer protocols")
  parser.add_argument("--nets", default="auto",
                      help="evaluation networks, comma-separated (auto: the protocol's; "
                           "another, e.g. mlp, gets the workdir transfer-<protocol>-<net>)")
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--root", default="runs/bench", help="workdirs of every step")
  parser.add_argument("--manual-dir", default=os.path.join(ROOT, "..", "shared", "data"))
  parser.add_argument("--data-dir", default=os.path.join(ROOT, ".cache", "tfds"))
  parser.add_argument("--method-args", action="append", default=[],
                      help='method="extra flags" for its distillation command')
  parser.add_argument("--transfer-args", default="", help="extra flags for every transfer run")
  parser.add_argument("--tag", default="mnist")
  args = parser.parse_args(argv)
  extra = {}
  for item in args.method_args:
    name, _, flags = item.partition("=")
    extra[name] = shlex.split(flags)
  data = ["--manual-dir", args.manual_dir, "--data-dir", args.data_dir]
  rows = []
  for run in args.runs.split(","):
    method, dataset, ipc, *options = run.split(":")
    # method:dataset:ipc[:flag=value...]: a variant, with its own workdir.
    flags = [a for o in options for a in (f"--{o.partition('=')[0]}", o.partition("=")[2])
             if a != ""]  # a bare `flag` is a boolean switch
    variant = "".join(f"-{o.replace('=', '-')}" for o in options)
    workdir = os.path.join(args.root, f"{method}-{dataset}-ipc{ipc}{variant}")
    distil_time = _run([f"experiments.{method}", "--dataset", dataset, "--ipc", ipc,
                        "--workdir", workdir, "--no-progress", *data, *extra.get(method, []),
                        *flags], print)
    metrics = last_metrics(workdir)
    support = os.path.join(workdir, "distilled.npz")
    for protocol, net in [(p, n) for p in args.protocols.split(",")
                          for n in args.nets.split(",")]:
      tdir = os.path.join(workdir, f"transfer-{protocol}" + ("" if net == "auto" else f"-{net}"))
      _run(["experiments.transfer", "--support", support, "--dataset", dataset, "--protocol",
            protocol, "--net", net, "--seeds", str(args.seeds), "--workdir", tdir,
            "--no-progress", *data, *shlex.split(args.transfer_args)], print)
      with open(os.path.join(tdir, "transfer.json")) as f:
        report = json.load(f)
      for r in report["rows"]:
        rows.append({"method": method + variant, "dataset": dataset, "ipc": int(ipc),
                     "distil_steps": metrics.get("step"),
                     "distil_wall_time": metrics.get("wall_time"),
                     "distil_krr_acc": next((v for k, v in metrics.items()
                                             if k in ("test_acc", "krr_test_acc",
                                                      "rf_test_acc", "finite_test_acc")), None),
                     "this_call_s": distil_time, **{k: r[k] for k in (
                         "row", "net", "width", "protocol", "seeds", "test_acc", "test_acc_mean",
                         "test_acc_std", "steps", "lr", "train_time")}})
  print(cli.format_table(
      ("method", "dataset", "ipc", "set", "net", "protocol", "test acc (%)", "distil steps",
       "distil wall"),
      [(r["method"], r["dataset"], str(r["ipc"]), r["row"], f"{r['net']}-{r['width']}",
        r["protocol"], cli.percent(r["test_acc_mean"], r["test_acc_std"]),
        str(r["distil_steps"]), f"{r['distil_wall_time'] or 0:.0f} s") for r in rows]))
  out = os.path.join(ROOT, "bench", "results", f"methods_{args.tag}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out + ".tmp", "w") as f:
    json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=2)
  os.replace(out + ".tmp", out)
  print(f"written {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
