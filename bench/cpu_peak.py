"""This machine's float32 matmul peak, the yardstick of every step's efficiency (issue 40).

  python -m bench.cpu_peak                  # n = 2048 and 4096, every core and one core
  python -m bench.cpu_peak --sizes 4096 --seconds 5

Times a jitted (n, n) @ (n, n) float32 matmul (2 n^3 FLOPs) repeatedly, best of `--rounds`
rounds of at least `--seconds` each, in a fresh process on every core and pinned to one core
(`taskset -c 0` and XLA's single-thread flags: the flags alone still use both cores). The best
GFLOP/s over sizes is the peak a step's FLOP rate (XLA's cost analysis of its compiled program
over its measured time) is held against: boost clocks count, as they do for the steps. Prints a
table, writes bench/results/cpu_peak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from kip.files import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "results", "cpu_peak.json")
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def matmul_gflops(n: int, seconds: float, rounds: int) -> float:
  """Best GFLOP/s of an (n, n) float32 matmul in this process."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()  # compile
  best = 0.0
  for _ in range(rounds):
    repeats, start = 0, time.perf_counter()
    while True:
      matmul(a, b).block_until_ready()
      repeats += 1
      elapsed = time.perf_counter() - start
      if elapsed >= seconds:
        break
    best = max(best, 2 * n**3 * repeats / elapsed / 1e9)
  return best


def measure(n: int, threads: str, seconds: float, rounds: int) -> float:
  """GFLOP/s in a fresh process (`threads`: default, every core; or one core)."""
  env = dict(os.environ)
  pin = []
  if threads == "one":
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {ONE_THREAD}".strip()
    pin = ["taskset", "-c", "0"]
  code = (f"from bench.cpu_peak import matmul_gflops; "
          f"print(matmul_gflops({n}, {seconds}, {rounds}))")
  out = subprocess.run([*pin, sys.executable, "-c", code], cwd=ROOT, env=env, check=True,
                       capture_output=True, text=True).stdout
  return float(out.strip().splitlines()[-1])


def read_peak(path: str = OUT) -> float | None:
  """The measured peak GFLOP/s of every core (None before `python -m bench.cpu_peak`)."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)["peak_gflops"]


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--sizes", default="2048,4096", help="matrix sides")
  p.add_argument("--seconds", type=float, default=3.0, help="least time of one round")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--out", default=OUT)
  args = p.parse_args(argv)
  import jax

  rows = []
  for n in (int(v) for v in args.sizes.split(",")):
    for threads in ("default", "one"):
      gflops = measure(n, threads, args.seconds, args.rounds)
      rows.append({"n": n, "threads": threads, "gflops": gflops})
      print(f"n {n:5d}  threads {threads:7s}  {gflops:8.1f} GFLOP/s", flush=True)
  result = {
      "command": " ".join(["python -m bench.cpu_peak", *(argv or sys.argv[1:])]),
      "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
                 f"JAX {jax.__version__}",
      "date": time.strftime("%Y-%m-%d"), "rows": rows,
      "peak_gflops": max(r["gflops"] for r in rows if r["threads"] == "default"),
      "peak_gflops_one_core": max(r["gflops"] for r in rows if r["threads"] == "one")}
  print(f"peak: {result['peak_gflops']:.1f} GFLOP/s (every core), "
        f"{result['peak_gflops_one_core']:.1f} (one core)")
  write_json(args.out, result)
  print(f"written {args.out}")


if __name__ == "__main__":
  main()
