"""The autoencoder-based distillation of the MNIST report and its proposed remedies, measured.

  python -m bench.autoencoder                      # every variant at --preset paper (~4 min each)
  python -m bench.autoencoder --variants report,sum --preset cpu

Each variant is `python -m experiments.autoencoder` with its flags in its own workdir
(<root>/autoencoder-<dataset>-<preset>-<variant>), so an interrupted benchmark resumes and finished
variants are read back. Variants: `report` (the report's settings), `primed` (25% real + 75%
noise initialisation), `tied` (tied weights), `code` (the later code's weight schedule), `both`
(reconstruct real and synthetic samples together: a remedy), `sum` (sum reductions: a remedy),
`clip` (samples kept in [0, 1]). Prints one table (validation accuracy of encoder + head, the
selected epoch, the samples' homogeneity, and the linear probe of an autoencoder pre-trained on
the samples beside random real images and no pre-training) and writes
bench/results/autoencoder_<dataset>_<preset>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time

from kip import cli
from kip.io import write_json
from kip.loop import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "report": [],
    "primed": ["--init", "primed"],
    "tied": ["--tied"],
    "code": ["--schedule", "code"],
    "both": ["--reconstruct", "both"],
    "sum": ["--reduction", "sum"],
    "clip": ["--clip"],
}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dataset", default="mnist")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--preset", default="paper", choices=("cpu", "paper"))
  parser.add_argument("--root", default="runs/bench")
  parser.add_argument("--tag", default="", help="suffix of the results file's name")
  args = parser.parse_args(argv)
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
  rows = []
  for variant in variants:
    workdir = os.path.join(args.root, f"autoencoder-{args.dataset}-{args.preset}-{variant}")
    command = ["experiments.autoencoder", "--dataset", args.dataset, "--preset", args.preset,
               *VARIANTS[variant], "--workdir", workdir, "--no-progress"]
    print(f"$ python -m {shlex.join(command)}", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", *command], cwd=ROOT)
    if done.returncode:
      raise SystemExit(f"failed ({done.returncode}): python -m {shlex.join(command)}")
    with open(os.path.join(ROOT, workdir, "worth.json")) as f:
      worth = json.load(f)
    evals = [r for r in read_metrics(os.path.join(ROOT, workdir, "metrics.jsonl"))
             if "validation_acc" in r]
    selected = next(r for r in evals if r["step"] == worth["selected_step"])  # what was probed
    spe = worth["steps_per_epoch"]
    probe = {r["row"]: r for r in worth["rows"]}
    rows.append({
        "variant": variant, "flags": " ".join(VARIANTS[variant]), "workdir": workdir,
        "command": f"python -m {shlex.join(command)}",
        "validation_acc": selected["validation_acc"], "selected_epoch": selected["step"] // spe,
        "epochs_run": evals[-1]["step"] // spe,
        "homogeneity": probe["distilled"]["homogeneity"],
        "initial_homogeneity": worth["initial_homogeneity"],
        "real_homogeneity": probe["random"]["homogeneity"],
        "probe": {k: [v["probe_acc_mean"], v["probe_acc_std"]] for k, v in probe.items()},
        "this_call_s": round(time.perf_counter() - t0, 1),
        "wall_time": evals[-1]["wall_time"]})
  header = ["variant", "val. acc (enc+head)", "epoch (of)", "mean pairwise dist.",
            "probe: samples", "probe: random real", "probe: none", "probe: phase 1"]
  table = [[r["variant"], f"{100 * r['validation_acc']:.2f}",
            f"{r['selected_epoch']} ({r['epochs_run']})", f"{r['homogeneity']:.2f}",
            *(cli.percent(*r["probe"][k]) for k in ("distilled", "random", "none", "real"))]
           for r in rows]
  print(cli.format_table(header, table))
  out = os.path.join(ROOT, "bench", "results", f"autoencoder_{args.dataset}_{args.preset}"
                     f"{'_' + args.tag if args.tag else ''}.json")
  previous = {}
  if os.path.exists(out):  # rows of other variants at the same preset, measured before
    with open(out) as f:
      previous = {r["variant"]: r for r in json.load(f).get("rows", [])}
  merged = previous | {r["variant"]: r for r in rows}
  write_json(out, {"machine": f"{platform.machine()} {os.cpu_count()} cores",
                   "preset": args.preset, "rows": list(merged.values())})
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
