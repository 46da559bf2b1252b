"""KIP step speed and memory: ours against a minimal baseline written the way the authors' colab
writes it (a jitted `kernel_fn`, `jax.value_and_grad` of the KRR loss, a separate Adam update).

For `fc` and `conv` kernels at a few support and target sizes on MNIST-shaped images, measures
steps/s (best of 5 interleaved timings; speed-up = median of the per-round ratios), kernel
entries/s ((n_t + n_s) x n_s entries per step) and the compiled step's peak device memory (XLA's
memory analysis: arguments + outputs + temporaries). Prints a table, writes JSON.

  python -m bench.kip_step                    # the full table
  python -m bench.kip_step --quick            # two sizes, for a smoke check
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import optax

from kip.files import write_json
from kip.kernels import make_kernel
from kip.method import Batch
from methods.kip import make_kip

SIZES = {
    "fc": [(10, 1000), (100, 1000), (100, 5000), (500, 5000)],
    "conv": [(10, 500), (50, 500), (100, 1000)],
}
QUICK = {"fc": [(100, 1000)], "conv": [(10, 500)]}


def colab_baseline(kernel_fn, lr=0.04, reg=1e-6):
  """The colab's structure, on today's APIs (optax for the removed `jax.experimental.optimizers`,
  `assume_a="pos"` for the removed `sym_pos=True`)."""
  kernel_fn = jax.jit(kernel_fn)

  def loss_fn(params, x_target, y_target):
    x_support, y_support = params["x"], params["y"]
    k_ss = kernel_fn(x_support, x_support)
    k_ts = kernel_fn(x_target, x_support)
    k_ss_reg = k_ss + jnp.abs(reg) * jnp.trace(k_ss) * jnp.eye(k_ss.shape[0]) / k_ss.shape[0]
    pred = jnp.dot(k_ts, jsl.solve(k_ss_reg, y_support, assume_a="pos"))
    return 0.5 * jnp.mean((pred - y_target) ** 2)

  value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
  optimizer = optax.adam(lr)

  @jax.jit
  def apply(grads, opt_state, params):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def step(carry, x_target, y_target):
    params, opt_state = carry
    loss, grads = value_and_grad(params, x_target, y_target)
    params, opt_state = apply(grads, opt_state, params)
    return (params, opt_state), loss

  def memory(carry, x_target, y_target):
    params, opt_state = carry
    grads = params
    return max(_peak(value_and_grad, params, x_target, y_target),
               _peak(apply, grads, opt_state, params))

  return optimizer, step, memory


def _peak(jitted, *args) -> int:
  analysis = jitted.lower(*args).compile().memory_analysis()
  if analysis is None:
    return -1
  return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def _time(step_fn, carry, batches, repeats):
  carry = jax.tree_util.tree_map(jnp.copy, carry)  # our update donates its state
  carry, loss = step_fn(carry, *batches[0])  # compile
  jax.block_until_ready(loss)
  start = time.perf_counter()
  for i in range(repeats):
    carry, loss = step_fn(carry, *batches[i % len(batches)])
  jax.block_until_ready((carry, loss))
  return repeats / (time.perf_counter() - start)


def measure(arch: str, n_support: int, n_target: int, min_seconds: float, rounds: int) -> dict:
  kernel = make_kernel(arch)
  rng = np.random.default_rng(0)
  x_s = jnp.asarray(rng.normal(size=(n_support, 28, 28, 1)), jnp.float32)
  y_s = jnp.asarray(np.eye(10)[np.arange(n_support) % 10] - 0.1, jnp.float32)
  batches = [(jnp.asarray(rng.normal(size=(n_target, 28, 28, 1)), jnp.float32),
              jnp.asarray(np.eye(10)[rng.integers(0, 10, n_target)] - 0.1, jnp.float32))
             for _ in range(2)]

  ours = make_kip(kernel.apply)
  state = ours.init(jax.random.key(0), x_s, y_s)
  key = jax.random.key(1)

  def ours_step(state, x_t, y_t):
    state, metrics = ours.update(state, Batch(x_t, y_t), key, 0)
    return state, metrics["loss"]

  optimizer, base_step, base_memory = colab_baseline(kernel.kernel_fn)
  params = {"x": x_s, "y": y_s}
  carry = (params, optimizer.init(params))

  # Calibrate repeats so each side runs for about `min_seconds`.
  probe = _time(ours_step, state, batches, 2)
  repeats = max(3, int(min_seconds * probe))
  entries = (n_target + n_support) * n_support
  row = {"kernel": arch, "n_support": n_support, "n_target": n_target, "repeats": repeats}
  sides = (("ours", ours_step, state), ("colab", base_step, carry))
  rates = {name: [] for name, _, _ in sides}
  for _ in range(rounds):  # interleaved, so drifts in machine load hit both sides alike
    for name, fn, init in sides:
      rates[name].append(_time(fn, init, batches, repeats))
  for name in rates:
    row[f"{name}_steps_per_s"] = float(np.max(rates[name]))  # best of `rounds`
    row[f"{name}_entries_per_s"] = row[f"{name}_steps_per_s"] * entries
  row["ours_peak_bytes"] = _peak(ours.update, state, Batch(*batches[0]), key, 0)
  row["colab_peak_bytes"] = base_memory(carry, *batches[0])
  # Median of the per-round ratios: each round times both sides back to back, so a burst of load
  # from elsewhere on the machine shifts one ratio, not the median.
  row["speedup"] = float(np.median(np.array(rates["ours"]) / np.array(rates["colab"])))
  row["speedup_min_max"] = [float(np.min(np.array(rates["ours"]) / np.array(rates["colab"]))),
                            float(np.max(np.array(rates["ours"]) / np.array(rates["colab"])))]
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="one size per kernel")
  parser.add_argument("--min-seconds", type=float, default=3.0, help="timing per measurement")
  parser.add_argument("--rounds", type=int, default=5, help="interleaved timings; best is kept")
  parser.add_argument("--out", default="bench/results/kip_step.json", help="JSON output")
  args = parser.parse_args(argv)
  sizes = QUICK if args.quick else SIZES
  rows = []
  header = (f"{'kernel':<6} {'n_s':>5} {'n_t':>6} | {'ours st/s':>9} {'colab st/s':>10} "
            f"{'speedup':>7} | {'ours Ment/s':>11} {'colab Ment/s':>12} | {'ours MiB':>8} "
            f"{'colab MiB':>9}")
  print(header)
  print("-" * len(header))
  for arch, shapes in sizes.items():
    for n_s, n_t in shapes:
      r = measure(arch, n_s, n_t, args.min_seconds, args.rounds)
      rows.append(r)
      print(f"{arch:<6} {n_s:>5} {n_t:>6} | {r['ours_steps_per_s']:>9.2f} "
            f"{r['colab_steps_per_s']:>10.2f} {r['speedup']:>6.2f}x | "
            f"{r['ours_entries_per_s'] / 1e6:>11.2f} {r['colab_entries_per_s'] / 1e6:>12.2f} | "
            f"{r['ours_peak_bytes'] / 2**20:>8.1f} {r['colab_peak_bytes'] / 2**20:>9.1f}",
            flush=True)
  result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpus": os.cpu_count(), "devices": [str(d) for d in jax.devices()],
                        "jax": jax.__version__},
            "rows": rows}
  write_json(args.out, result)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
