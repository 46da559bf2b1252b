"""What the KIP colab's finite-net transfer costs at its width (ConvNet, width 1024) on this CPU.

The colab trains KIP's ConvNet (an extra conv, 3 blocks, width 1024: 28.5M parameters on MNIST) on
a 100-image set with the learning rate from the empirical NTK of 50 of its images, 5,000 steps,
and tests on the 10,000 test images. This script compiles each piece once at that width, takes
XLA's FLOP count of it (cost analysis) and times the cheap ones (one call after a warm-up, CPU
seconds and wall seconds), then prices the rest at the measured rate. Rows:

  forward-50        one forward pass of the 50 estimate images (timed)
  train-step-100    one SGD step's value and gradient on the 100 images (timed)
  test-10000        the whole test split (forward-50 x 200; priced)
  ntk-exact-floor   the exact NTK of 50 images averaged over the 10 logits needs at least one
                    backward pass per logit (`kip.train._ntk_by_logit`): 10 x the value and
                    gradient of 50 images (priced)
  power-iteration   one iteration of `kip.train._ntk_top_eigenvalue` (10 VJPs and 10 JVPs of the
                    50 images; priced from its own FLOP count)

Then: the issue's target "estimate + 2 steps in 2 minutes" against the floor at the two cores'
measured matmul peak (bench/results/cpu_peak.json), and the colab's whole schedule.

  python -m bench.colab_width             # bench/results/colab_width.json (minutes)
  python -m bench.colab_width --width 64 # a quick look at a small width
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from kip.io import write_json
from kip.nets import ConvNet, count_params
from kip.train import ntk_logit_product


def _compiled(fn, *args):
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, float(compiled.cost_analysis()["flops"])


def _timed(compiled, *args) -> tuple[float, float]:
  jax.block_until_ready(compiled(*args))  # warm-up
  wall, cpu = time.perf_counter(), time.process_time()
  jax.block_until_ready(compiled(*args))
  return time.perf_counter() - wall, time.process_time() - cpu


def measure(width: int, seed: int = 0) -> dict:
  images = jax.random.normal(jax.random.key(seed), (100, 28, 28, 1), jnp.float32)
  net = ConvNet(num_classes=10, width=width)
  params = net.init(jax.random.key(seed), images[:1])["params"]

  def f(p, x):
    return net.apply({"params": p}, x)

  def loss(p, x):
    return 0.5 * jnp.mean(f(p, x) ** 2)

  def one_logit(p, x, v):  # one of the 10 NTK-vector products of an iteration (logit 0)
    return ntk_logit_product(f, p, x, v, 0, 10)

  forward, forward_flops = _compiled(f, params, images[:50])
  step, step_flops = _compiled(jax.value_and_grad(loss), params, images)
  _, half_step_flops = _compiled(jax.value_and_grad(loss), params, images[:50])
  _, logit_flops = _compiled(one_logit, params, images[:50], jnp.ones(50, jnp.float32))
  # kip.train._ntk_top_eigenvalue scans the logits (XLA counts a loop's body once): one
  # linearisation, then a VJP and a JVP per logit.
  power_flops = forward_flops + 10 * (logit_flops - forward_flops)
  rows = {}
  for name, compiled, flops, args in (("forward-50", forward, forward_flops, (params, images[:50])),
                                      ("train-step-100", step, step_flops, (params, images))):
    wall, cpu = _timed(compiled, *args)
    rows[name] = {"tflop": flops / 1e12, "wall_s": wall, "cpu_s": cpu, "timed": True}
  rate = sum(r["tflop"] for r in rows.values()) / sum(r["cpu_s"] for r in rows.values())
  for name, flops in (("test-10000", 200 * forward_flops),
                      ("ntk-exact-floor", 10 * half_step_flops),
                      ("power-iteration", power_flops)):
    rows[name] = {"tflop": flops / 1e12, "cpu_s": flops / 1e12 / rate, "timed": False}
  return {"width": width, "params": count_params(params), "tflop_per_cpu_s": rate, "rows": rows}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--width", type=int, default=1024, help="the colab's: 1024")
  parser.add_argument("--steps", type=int, default=5000, help="the colab's schedule: 5000")
  parser.add_argument("--peak", default="bench/results/cpu_peak.json",
                      help="the machine's measured matmul peak (python -m bench.cpu_peak)")
  parser.add_argument("--out", default="", help="default: bench/results/colab_width.json "
                      "(another width: colab_width_w<width>.json)")
  args = parser.parse_args(argv)
  args.out = args.out or ("bench/results/colab_width.json" if args.width == 1024
                          else f"bench/results/colab_width_w{args.width}.json")
  result = measure(args.width)
  peak = json.loads(Path(args.peak).read_text())["peak_gflops"] / 1e3 if Path(args.peak).exists() \
      else float("nan")
  rows = result["rows"]
  print(f"KIP ConvNet width {args.width} ({result['params'] / 1e6:.1f}M parameters), "
        f"{os.cpu_count()} CPU cores; measured {result['tflop_per_cpu_s'] * 1e3:.0f} GFLOP per "
        f"CPU-second; two-core matmul peak {peak * 1e3:.0f} GFLOP/s")
  print(f"{'piece':<18} {'TFLOP':>8} {'CPU-s':>9} {'at peak, s':>11}  how")
  for name, row in rows.items():
    row["s_at_peak"] = row["tflop"] / peak
    print(f"{name:<18} {row['tflop']:>8.3f} {row['cpu_s']:>9.1f} {row['s_at_peak']:>11.1f}  "
          f"{'timed' if row['timed'] else 'priced at the measured rate'}")
  floor = rows["ntk-exact-floor"]["tflop"] + 2 * rows["train-step-100"]["tflop"]
  result.update({
      "estimate_and_2_steps_floor_s_at_peak": floor / peak,
      "schedule_steps": args.steps,
      "schedule_hours_at_peak": args.steps * rows["train-step-100"]["tflop"] / peak / 3600,
      "peak_tflops": peak, "command": "python -m bench.colab_width" + (
          f" --width {args.width}" if args.width != 1024 else ""),
      "date": time.strftime("%Y-%m-%d"),
  })
  floor_s = result["estimate_and_2_steps_floor_s_at_peak"]
  print(f"exact NTK estimate + 2 steps: at least {floor_s:.0f} s at the two cores' peak "
        f"(target 120 s); the colab's {args.steps} steps: at least "
        f"{result['schedule_hours_at_peak']:.1f} h")
  write_json(args.out, result)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
