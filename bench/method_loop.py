"""What the loop around each method's step costs: every distillation command end to end against a
bare loop of its own step (issue 40: "the same overhead bound for every method").

  python -m bench.method_loop                       # every method, 2 rounds (about 25 min here)
  python -m bench.method_loop --methods dm,frepo --rounds 1

For each method, two fresh processes take turns, round by round, on real MNIST at the command's CPU
preset (10 images per class; KRR-ST 100 images), evaluations off (`--eval-every` beyond the run):
- **command**: `python -m experiments.<method> ... --steps 3N --checkpoint-every N`, everything
  the loop does (sampling, records, checkpoints and the distilled set written at every one, the
  progress bookkeeping); its time per step is (wall time at step 2N - at step N) / N, from its
  metrics.jsonl (one checkpoint in between, as in every N steps; the evaluation at the last
  step comes after), so loading, compiling and the first steps drop out.
- **bare**: the same command with `kip.pipeline.distill` replaced by the loop a user would write
  around the same `Method`: the batch drawn on the host from the same sampler, `update` called,
  nothing fetched; timed from step N to step 2N (waiting for the device at both).
The ratio bare / command is at least 0.95 when the loop adds under 5%. N is per method (steps of
about 0.1 s: 100; the trajectory methods' iterations of about 2 s: 5). Prints a table and writes
bench/results/method_loop.json (rows measured now replace the same methods' rows; the others
are kept, each with the command that measured it).
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

from kip.files import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "results", "method_loop.json")
TRAJECTORY_BUFFER = os.path.join(ROOT, "runs", "peers", "mtt", "experts", "ours")

# method -> (N, extra arguments); every command also gets --dataset mnist, evaluations off.
METHODS = {
    "kip": (100, ["--ipc", "10"]),
    "frepo": (100, ["--ipc", "10"]),
    "rfad": (100, ["--ipc", "10"]),
    "dm": (100, ["--ipc", "10"]),
    "datadam": (100, ["--ipc", "10"]),
    "moments": (100, ["--ipc", "10"]),  # evaluates only at its end: no --eval-every
    "krr_st": (50, ["--size", "100"]),
    "mtt": (5, ["--ipc", "10", "--buffer", TRAJECTORY_BUFFER]),
    "datm": (5, ["--ipc", "10", "--buffer", TRAJECTORY_BUFFER]),
}

NO_EVAL_EVERY = ("moments",)  # commands that evaluate only at the end

# The bare side: run the command with `distill` replaced; prints the seconds of steps N+1..2N.
BARE = r"""
import sys, time, runpy
import jax, jax.numpy as jnp
import kip.pipeline
from kip.method import make_sampler

module, first, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def bare(method, data, *, workdir, loop_config, x_init, y_init, **_):
  sampler = make_sampler(method.data, data.x_train, data.labels_train, data.y_train,
                         seed=loop_config.seed, num_classes=data.num_classes)
  root = jax.random.key(loop_config.seed)
  state = method.init(jax.random.fold_in(root, 0), x_init, y_init)
  start = None
  for step in range(1, 2 * first + 1):
    batch = sampler(step)
    state, _ = method.update(state, batch, jax.random.fold_in(root, step),
                             jnp.asarray(step, jnp.int32))
    if step == first:
      jax.block_until_ready(state)
      start = time.perf_counter()
  jax.block_until_ready(state)
  print("BARE_S", time.perf_counter() - start, flush=True)
  sys.exit(0)

kip.pipeline.distill = bare
sys.argv = [module, *args]
runpy.run_module(module, run_name="__main__")
"""


def _common(method: str, first: int, extra: list[str], workdir: str) -> list[str]:
  evaluations = [] if method in NO_EVAL_EVERY else ["--eval-every", str(10 * first)]
  return ["--dataset", "mnist", *extra, "--steps", str(3 * first), "--checkpoint-every",
          str(first), *evaluations, "--workdir", workdir, "--no-progress"]


def command_seconds(method: str, first: int, extra: list[str]) -> float:
  """Seconds from step N to step 2N of the command itself (its metrics.jsonl); the command is
  stopped once step 2N is recorded (the rest, and the final evaluation, would measure nothing)."""
  workdir = tempfile.mkdtemp(prefix=f"method_loop_{method}_")
  path = os.path.join(workdir, "metrics.jsonl")
  wall = {}
  try:
    proc = subprocess.Popen([sys.executable, "-m", f"experiments.{method}",
                             *_common(method, first, extra, workdir)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while 2 * first not in wall:
      if proc.poll() is not None:
        raise RuntimeError(f"experiments.{method} ended (exit {proc.returncode}) before step "
                           f"{2 * first}: {proc.stderr.read()[-2000:]}")
      time.sleep(0.5)
      if os.path.exists(path):
        with open(path) as f:
          for line in f:
            record = json.loads(line) if line.endswith("\n") else {}
            if record.get("step") in (first, 2 * first):
              wall[record["step"]] = record["wall_time"]
    proc.terminate()
    proc.wait()
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  return wall[2 * first] - wall[first]


def bare_seconds(method: str, first: int, extra: list[str]) -> float:
  """Seconds from step N to step 2N of a bare loop around the command's own `Method`."""
  workdir = tempfile.mkdtemp(prefix=f"method_loop_{method}_bare_")
  try:
    out = subprocess.run([sys.executable, "-c", BARE, f"experiments.{method}", str(first),
                          *_common(method, first, extra, workdir)], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  return float(next(line for line in out.splitlines() if line.startswith("BARE_S")).split()[1])


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
  p.add_argument("--rounds", type=int, default=2, help="turns of both sides per method")
  p.add_argument("--out", default=OUT)
  args = p.parse_args(argv)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    p.error(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
  rows = []
  print(f"{'method':<9} {'N':>4} {'bare ms/step':>13} {'command ms/step':>16} {'bare/command':>13}"
        "  per round", flush=True)
  for method in methods:
    first, extra = METHODS[method]
    bare, command = [], []
    t0 = time.perf_counter()
    try:
      for _ in range(args.rounds):
        bare.append(bare_seconds(method, first, extra) / first)
        command.append(command_seconds(method, first, extra) / first)
    except (RuntimeError, subprocess.CalledProcessError, StopIteration, KeyError) as e:
      detail = getattr(e, "stderr", "") or str(e)
      print(f"{method:<9} failed: {detail.strip().splitlines()[-1] if detail.strip() else e}",
            flush=True)
      rows.append({"method": method, "error": str(detail)[-2000:]})
      continue
    ratios = [b / c for b, c in zip(bare, command, strict=True)]
    row = {"method": method, "steps": [first, 2 * first], "extra_args": extra,
           "command": " ".join(["python -m bench.method_loop", *(argv or sys.argv[1:])]),
           "date": time.strftime("%Y-%m-%d"),
           "bare_ms_per_step": [1e3 * v for v in bare],
           "command_ms_per_step": [1e3 * v for v in command],
           "ratio_bare_over_command": ratios, "median_ratio": statistics.median(ratios),
           "seconds": time.perf_counter() - t0}
    rows.append(row)
    print(f"{method:<9} {first:>4} {1e3 * statistics.median(bare):>13.1f} "
          f"{1e3 * statistics.median(command):>16.1f} {row['median_ratio']:>13.2f}  "
          f"{', '.join(f'{r:.2f}' for r in ratios)}", flush=True)
  import jax  # noqa: PLC0415  (only for the machine line)

  # Rows measured now replace the same methods' rows of an earlier file; the others are kept.
  if os.path.exists(args.out):
    with open(args.out) as f:
      kept = [r for r in json.load(f).get("rows", []) if r["method"] not in methods]
    rows = sorted(kept + rows, key=lambda r: list(METHODS).index(r["method"])
                  if r["method"] in METHODS else len(METHODS))
  result = {
      "command": " ".join(["python -m bench.method_loop", *(argv or sys.argv[1:])]),
      "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
                 f"JAX {jax.__version__} on {jax.default_backend()}",
      "date": time.strftime("%Y-%m-%d"), "rows": rows}
  write_json(args.out, result)
  print(f"written {args.out}")


if __name__ == "__main__":
  main()
