"""KRR test accuracy against KIP step for one or more runs, from their metrics.jsonl.

  python -m bench.plot_curves runs/mnist-fc-ipc10 runs/mnist-fc-ipc1 \
      --out bench/results/mnist_fc.png
"""

from __future__ import annotations

import argparse
import json
import os

from kip.plots import plot_curves, read_curve


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdirs", nargs="+", help="run folders holding metrics.jsonl")
  parser.add_argument("--out", default="bench/results/curves.png", help="PNG to write")
  args = parser.parse_args(argv)
  curves = []
  for workdir in args.workdirs:
    with open(os.path.join(workdir, "config.json")) as f:
      config = json.load(f)
    label = f"{config['dataset']} {config['kernel']} ipc {config['ipc']}"
    curves.append(read_curve(os.path.join(workdir, "metrics.jsonl"), label))
  plot_curves(curves, args.out, xlabel="KIP step", ylabel="KRR test accuracy (%)", log_x=True)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
