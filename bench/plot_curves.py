"""KRR test accuracy against KIP step for one or more runs, from their metrics.jsonl.

  python -m bench.plot_curves runs/mnist-fc-ipc10 runs/mnist-fc-ipc1 \
      --out bench/results/mnist_fc.png
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kip.loop import read_metrics  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdirs", nargs="+", help="run folders holding metrics.jsonl")
  parser.add_argument("--out", default="bench/results/curves.png", help="PNG to write")
  args = parser.parse_args(argv)
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for workdir in args.workdirs:
    evals = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "test_acc" in r]
    with open(os.path.join(workdir, "config.json")) as f:
      config = json.load(f)
    label = f"{config['dataset']} {config['kernel']} ipc {config['ipc']}"
    ax.plot([r["step"] for r in evals], [100 * r["test_acc"] for r in evals], label=label)
  ax.set_xlabel("KIP step")
  ax.set_ylabel("KRR test accuracy (%)")
  ax.set_xscale("symlog", linthresh=100)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  fig.savefig(args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
