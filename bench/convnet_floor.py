"""The pooled ConvNet kernel's cost floor on this CPU (issue 40): is it arithmetic or memory?

KIP's analytic ConvNet NTK keeps, for every pair of images, covariance tensors over pairs of pixel
positions: at 28x28, 28^4 = 614,656 floats (2.35 MB) per entry and per tensor (the NNGP and the
NTK), at full resolution for the first two conv + ReLU layers. For a block of `--n` x `--n`
entries this script measures, one core, each jitted and run once before timing:
- the machine's streaming bandwidth (`a + b` on 256 MB float32 arrays, 3 arrays moved);
- the kernel's forward pass and the gradient of a KRR-style loss in the support images: time per
  entry, XLA's own count of bytes accessed and FLOPs (cost analysis), and the rate those bytes
  imply;
- the floors: FLOPs at the two cores' matmul peak (bench/results/cpu_peak.json), XLA's bytes at
  the measured bandwidth, and a minimal traffic of `--passes` tensor reads or writes per entry
  (each of the ~10 elementwise and shifted-sum steps of the two full-resolution layers reading
  and writing its tensors once: 20 passes of 2.35 MB).

  python -m bench.convnet_floor               # 4 x 4 entries; bench/results/convnet_floor.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kip.io import write_json
from kip.kernels import make_kernel


def _best(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--n", type=int, default=4, help="support and target images (n x n)")
  parser.add_argument("--side", type=int, default=28)
  parser.add_argument("--passes", type=int, default=20, help="the minimal traffic, in tensors")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--peak", default="bench/results/cpu_peak.json")
  parser.add_argument("--out", default="bench/results/convnet_floor.json")
  args = parser.parse_args(argv)

  elements = 1 << 26
  a, b = jnp.ones(elements, jnp.float32), jnp.ones(elements, jnp.float32)
  bandwidth = 3 * 4 * elements / _best(jax.jit(jnp.add), a, b, repeats=3)
  del a, b

  kernel_fn = make_kernel("convnet").kernel_fn
  rng = np.random.default_rng(0)
  shape = (args.n, args.side, args.side, 1)
  support, target = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))

  def forward(s, t):
    return kernel_fn(t, s)

  def loss(s, t):
    return jnp.sum(kernel_fn(t, s) ** 2) + jnp.sum(kernel_fn(s, s))

  peak = (json.loads(Path(args.peak).read_text())["peak_gflops"] * 1e9
          if Path(args.peak).exists() else float("nan"))
  tensor = 4 * args.side**4
  rows = {}
  for name, fn, entries in (("forward", forward, args.n**2),
                            ("gradient", jax.grad(loss), 2 * args.n**2)):
    compiled = jax.jit(fn).lower(support, target).compile()
    cost = compiled.cost_analysis()
    seconds = _best(compiled, support, target, repeats=args.repeats)
    per_entry = seconds / entries
    moved = cost["bytes accessed"] / entries
    rows[name] = {
        "entries": entries, "ms_per_entry": 1e3 * per_entry,
        "xla_bytes_per_entry": moved, "xla_flops_per_entry": cost["flops"] / entries,
        "implied_GBps": moved / per_entry / 1e9,
        "flop_floor_ms": 1e3 * cost["flops"] / entries / peak,
        "xla_bytes_floor_ms": 1e3 * moved / bandwidth,
        "minimal_traffic_floor_ms": 1e3 * args.passes * tensor / bandwidth,
    }
  print(f"bandwidth {bandwidth / 1e9:.1f} GB/s (a + b, one core); a covariance tensor "
        f"{tensor / 2**20:.2f} MiB per entry")
  print(f"{'':9} {'ms/entry':>9} {'XLA MB/entry':>13} {'implied GB/s':>13} {'FLOP floor':>11} "
        f"{'XLA-bytes floor':>16} {f'{args.passes}-pass floor':>14} (ms)")
  for name, r in rows.items():
    print(f"{name:9} {r['ms_per_entry']:>9.1f} {r['xla_bytes_per_entry'] / 1e6:>13.0f} "
          f"{r['implied_GBps']:>13.1f} {r['flop_floor_ms']:>11.2f} "
          f"{r['xla_bytes_floor_ms']:>16.1f} {r['minimal_traffic_floor_ms']:>14.2f}")
  write_json(args.out, {
      "command": "python -m bench.convnet_floor", "date": time.strftime("%Y-%m-%d"),
      "machine": f"{os.cpu_count()} CPU cores, JAX {jax.__version__}",
      "bandwidth_GBps": bandwidth / 1e9, "tensor_bytes": tensor, "n": args.n,
      "side": args.side, "passes": args.passes, "rows": rows})
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
