"""Steps per second of FRePo's and RFAD's distillation step at the CPU preset and at the papers'
sizes, on MNIST-shaped data (28x28x1, 10 classes), 10 images per class.

  python -m bench.method_step --rounds 3

Each row: one compiled step (compile time reported apart), then `--rounds` timed steps, median;
the step's FLOPs by XLA's cost analysis, its GFLOP/s and their fraction of this machine's matmul
peak (`python -m bench.cpu_peak` first; "-" without it).
Paper sizes are slow on a CPU (seconds to minutes per step); `--only cpu` skips them,
`--methods rfad` measures one method. Prints a table and writes bench/results/method_step.json
(rows measured now replace the same rows of the file; the others are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

from bench.cpu_peak import read_peak
from kip.method import Batch
from methods.frepo import PRESETS as FREPO_PRESETS
from methods.frepo import make_frepo
from methods.rfad import PRESETS as RFAD_PRESETS
from methods.rfad import make_rfad

SHAPE, CLASSES, N_SUPPORT = (28, 28, 1), 10, 100
# The commands' own presets, so the bench measures what `--preset cpu|paper` runs.
_SIZE_KEYS = ("width", "num_models", "target_batch")
SIZES = {(name, preset): {k: v for k, v in presets[preset].items() if k in _SIZE_KEYS}
         for name, presets in (("frepo", FREPO_PRESETS), ("rfad", RFAD_PRESETS))
         for preset in ("cpu", "paper")}


def _method(name: str, size: dict):
  if name == "frepo":
    return make_frepo(num_classes=CLASSES, image_shape=SHAPE, steps=1000, **size)
  return make_rfad(num_classes=CLASSES, image_shape=SHAPE, **size)


def measure(name: str, preset: str, rounds: int) -> dict:
  size = SIZES[(name, preset)]
  method = _method(name, size)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((N_SUPPORT, *SHAPE)).astype(np.float32)
  y = (np.eye(CLASSES)[np.arange(N_SUPPORT) % CLASSES] - 0.1).astype(np.float32)
  n_t = size["target_batch"]
  batch = Batch(rng.standard_normal((n_t, *SHAPE)).astype(np.float32),
                (np.eye(CLASSES)[rng.integers(0, CLASSES, n_t)] - 0.1).astype(np.float32))
  state = method.init(jax.random.key(0), x, y)
  t0 = time.perf_counter()
  state, metrics = method.update(state, batch, jax.random.key(1), 1)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(rounds):
    t0 = time.perf_counter()
    state, metrics = method.update(state, batch, jax.random.key(i + 2), i + 2)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  flops = step_flops(method.update, state, batch, jax.random.key(0), 0)
  peak = read_peak()
  return {"method": name, "preset": preset, **size, "n_support": N_SUPPORT,
          "compile_and_first_step_s": compile_s, "step_s": step_s, "steps_per_s": 1 / step_s,
          "rounds": rounds, "gflop_per_step": flops / 1e9, "gflops": flops / 1e9 / step_s,
          "fraction_of_peak": flops / 1e9 / step_s / peak if peak else None}


def step_flops(jitted, *args) -> float:
  """The FLOPs of one call of `jitted` on `args`, by XLA's cost analysis of the compiled
  program (what the step must do, whatever it takes)."""
  analysis = jitted.lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan")))


def _write(rows: list[dict]) -> str:
  """Writes the rows measured now over the same (method, preset) rows of the file, keeping the
  others (each row records its own command)."""
  out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "method_step.json")
  command = " ".join(["python -m bench.method_step", *sys.argv[1:]])
  machine = (f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
             f"JAX {jax.__version__} on {jax.default_backend()}")
  rows = [r | {"command": command, "machine": machine} for r in rows]
  if os.path.exists(out):
    with open(out) as f:
      old = json.load(f)
    kept = [{"command": old["command"], "machine": old["machine"]} | r for r in old["rows"]]
    fresh = {(r["method"], r["preset"]): r for r in rows}
    rows = [fresh.pop((r["method"], r["preset"]), r) for r in kept] + list(fresh.values())
  with open(out + ".tmp", "w") as f:
    json.dump({"command": command, "machine": machine, "rows": rows}, f, indent=2)
  os.replace(out + ".tmp", out)
  return out


def _percent(fraction: float | None) -> str:
  return "-" if fraction is None else f"{100 * fraction:.0f}%"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--only", choices=("all", "cpu", "paper"), default="all")
  parser.add_argument("--methods", default="frepo,rfad", help="comma-separated: frepo, rfad")
  args = parser.parse_args(argv)
  unknown = set(args.methods.split(",")) - {"frepo", "rfad"}
  if unknown:
    parser.error(f"unknown --methods {', '.join(sorted(unknown))}; choose frepo, rfad")
  print(f"{'method':<7} {'preset':<6} {'size':<45} {'compile s':>9} {'s/step':>8} {'steps/s':>8} "
        f"{'GFLOP/s':>8} {'of peak':>7}", flush=True)
  rows = []
  for name, preset in SIZES:  # the slowest (RFAD at paper size) last; each row saved as it ends
    if args.only not in ("all", preset) or name not in args.methods.split(","):
      continue
    r = measure(name, preset, args.rounds)
    rows.append(r)
    size = ", ".join(f"{k} {r[k]}" for k in SIZES[(r["method"], r["preset"])])
    print(f"{r['method']:<7} {r['preset']:<6} {size:<45} {r['compile_and_first_step_s']:>9.1f} "
          f"{r['step_s']:>8.3f} {r['steps_per_s']:>8.3f} {r['gflops']:>8.1f} "
          f"{_percent(r['fraction_of_peak']):>7}", flush=True)
    out = _write(rows)
  print(f"written {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
