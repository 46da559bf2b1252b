"""What the loop around a step costs: `experiments.kip` end to end against a colab-style loop
(issue 40).

  python -m bench.loop_overhead                 # KIP, 300 and 600 steps, 2 rounds (about 6 min)
  python -m bench.loop_overhead --rounds 3 --steps 300,900

Both sides run in fresh processes on real MNIST (`KIP_MANUAL_DIR` or tfds' download), the same
FC kernel (depth 1), 10 images per class with learned labels, Adam lr 0.04 and 5,000 class-balanced
targets a step, drawn on the host each step. The colab-style side is the 15 lines of the KIP
authors' demo on today's APIs: a jitted value-and-grad of the KRR loss and an Adam update, one call
a step, the next targets drawn with `rng.choice` on the host while JAX's asynchronous dispatch
runs the step, the loss fetched only at the end. Ours is `experiments.kip --dataset mnist --ipc 10
--kernel fc --depth 1 --learn-labels --target-batch 5000 --eval-every 100000` in a fresh workdir
(its `metrics.jsonl` says when each step finished: checkpoints and records count).

Each side's time per step is its marginal time: (time to the last step of a long run - that of a
short run) / (difference in steps), which removes loading, compiling and the final evaluation.
The sides take turns, round by round; the ratio colab / ours (at least 1.0: the loop adds
nothing) is the median over rounds of the per-round ratios. Prints a table, writes
bench/results/loop_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import jax

from kip.files import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "results", "loop_overhead.json")
KIP_ARGS = ["--dataset", "mnist", "--ipc", "10", "--kernel", "fc", "--depth", "1",
            "--learn-labels", "--target-batch", "5000", "--eval-every", "100000"]

# The colab-style loop; prints the seconds from its first step's start to its last step's end.
COLAB = r"""
import sys, time, numpy as np, jax, jax.numpy as jnp, optax
from bench.kip_step import colab_baseline
from kip.data import centered_one_hot, class_balanced_indices
from kip.kernels import make_kernel
from kip.pipeline import prepare_data
steps = int(sys.argv[1])
data = prepare_data("mnist", manual_dir=None)
x_train, labels = data.x_train, data.labels_train
y_train = centered_one_hot(labels, 10)
rng = np.random.default_rng(0)
support = class_balanced_indices(labels, 10, rng)
optimizer, step, _ = colab_baseline(make_kernel("fc", depth=1).kernel_fn, lr=0.04)
params = {"x": jnp.asarray(x_train[support]), "y": jnp.asarray(y_train[support])}
carry = (params, optimizer.init(params))
idx = rng.choice(len(x_train), 5000, replace=False)
carry, loss = step(carry, x_train[idx], y_train[idx])  # compile
jax.block_until_ready(loss)
start = time.perf_counter()
for _ in range(steps - 1):
  idx = rng.choice(len(x_train), 5000, replace=False)
  carry, loss = step(carry, x_train[idx], y_train[idx])
jax.block_until_ready((carry, loss))
print("STEPS_S", time.perf_counter() - start, float(loss))
"""


def colab_time(steps: int) -> float:
  """Seconds of steps 2..`steps` of the colab-style loop (the first compiles)."""
  out = subprocess.run([sys.executable, "-c", COLAB, str(steps)], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  line = next(line for line in out.splitlines() if line.startswith("STEPS_S"))
  return float(line.split()[1])


def ours_time(steps: int) -> float:
  """Seconds from our first step's record to the last's (`metrics.jsonl`'s `wall_time`: every
  step, checkpoint and record of the loop, and the evaluation at the last step, which both runs
  have and the difference cancels; the first step compiles)."""
  workdir = tempfile.mkdtemp(prefix="loop_overhead_")
  try:
    subprocess.run([sys.executable, "-m", "experiments.kip", *KIP_ARGS, "--steps", str(steps),
                    "--workdir", workdir, "--no-progress"], cwd=ROOT, check=True,
                   capture_output=True, text=True)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      records = {r["step"]: r for r in map(json.loads, f) if r["step"] in (1, steps)}
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  return records[steps]["wall_time"] - records[1]["wall_time"]


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--steps", default="300,600", help="the short and the long run's steps")
  p.add_argument("--rounds", type=int, default=2, help="turns of both sides")
  p.add_argument("--out", default=OUT)
  args = p.parse_args(argv)
  short, long = (int(v) for v in args.steps.split(","))
  if not 1 < short < long:
    p.error("--steps takes two step counts, short < long, both above 1")
  sides = {"colab": colab_time, "ours": ours_time}
  per_step = {name: [] for name in sides}
  for r in range(args.rounds):
    for name, fn in sides.items():
      t0 = time.perf_counter()
      marginal = (fn(long) - fn(short)) / (long - short)
      per_step[name].append(marginal)
      print(f"round {r + 1}: {name:5s} {1e3 * marginal:7.2f} ms/step "
            f"({time.perf_counter() - t0:.0f} s)", flush=True)
  ratios = [c / o for c, o in zip(per_step["colab"], per_step["ours"], strict=True)]
  result = {
      "command": " ".join(["python -m bench.loop_overhead", *(argv or sys.argv[1:])]),
      "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
                 f"JAX {jax.__version__} on {jax.default_backend()}",
      "date": time.strftime("%Y-%m-%d"), "ours_command": "python -m experiments.kip "
      + " ".join(KIP_ARGS), "steps": [short, long],
      "colab_ms_per_step": [1e3 * v for v in per_step["colab"]],
      "ours_ms_per_step": [1e3 * v for v in per_step["ours"]],
      "ratio_colab_over_ours": ratios, "median_ratio": statistics.median(ratios)}
  print(f"\nmarginal ms per step (steps {long} - {short}), median of {args.rounds} rounds: "
        f"colab {1e3 * statistics.median(per_step['colab']):.2f}, "
        f"ours {1e3 * statistics.median(per_step['ours']):.2f}; colab / ours "
        f"{result['median_ratio']:.2f} (per round: {', '.join(f'{r:.2f}' for r in ratios)})")
  write_json(args.out, result)
  print(f"written {args.out}")


if __name__ == "__main__":
  main()
