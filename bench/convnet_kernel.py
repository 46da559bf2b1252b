"""KIP's pooled ConvNet kernel (`--kernel convnet`) on 28x28 MNIST-shaped images: our offset
implementation (kip.convnet_kernel) against neural-tangents' (every pair of pixels), per kernel
entry, forward and gradient in the second images (KIP's support).

  python -m bench.convnet_kernel [--rows 4 --cols 10 --rounds 3]

Both compiled first (compile time apart), then `--rounds` rounds, the two taking turns; medians.
Also the largest difference of the two kernels' values (relative). Prints a table and writes
bench/results/convnet_kernel.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import kip._compat  # noqa: F401  (neural-tangents on current JAX)
from kip import cli
from kip.files import write_json
from kip.kernels import make_kernel


def _timed(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m bench.convnet_kernel", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", type=int, default=4, help="first images (KIP: the targets)")
  parser.add_argument("--cols", type=int, default=10, help="second images (KIP: the support)")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out", default="bench/results/convnet_kernel.json")
  args = parser.parse_args(argv)
  rng = np.random.default_rng(0)
  x1 = jnp.asarray(rng.normal(size=(args.rows, 28, 28, 1)), jnp.float32)
  x2 = jnp.asarray(rng.normal(size=(args.cols, 28, 28, 1)), jnp.float32)
  programs, compile_s = {}, {}
  for name, implementation in (("ours", "offsets"), ("neural-tangents", "neural-tangents")):
    fn = make_kernel("convnet", implementation=implementation).kernel_fn
    programs[name, "forward"] = jax.jit(fn)
    programs[name, "gradient"] = jax.jit(jax.grad(lambda x, f=fn: jnp.sum(f(x1, x))))
  values = {}
  for (name, kind), program in programs.items():
    arg = (x1, x2) if kind == "forward" else (x2,)
    compile_s[name, kind] = _timed(program, *arg)
    if kind == "forward":
      values[name] = np.asarray(program(*arg))
  times = {key: [] for key in programs}
  for _ in range(args.rounds):
    for (name, kind), program in programs.items():
      times[name, kind].append(_timed(program, *((x1, x2) if kind == "forward" else (x2,))))
  entries = args.rows * args.cols
  rows = []
  for kind in ("forward", "gradient"):
    ours, theirs = (statistics.median(times[n, kind]) / entries * 1e3
                    for n in ("ours", "neural-tangents"))
    rows.append({"pass": kind, "ours_ms_per_entry": ours, "nt_ms_per_entry": theirs,
                 "speedup": theirs / ours, "ours_compile_s": compile_s["ours", kind],
                 "nt_compile_s": compile_s["neural-tangents", kind]})
  difference = float(np.max(np.abs(values["ours"] - values["neural-tangents"])
                            / np.abs(values["neural-tangents"])))
  print(cli.format_table(
      ("pass", "ours (ms/entry)", "neural-tangents (ms/entry)", "speed-up", "compile (s)"),
      [(r["pass"], f"{r['ours_ms_per_entry']:.2f}", f"{r['nt_ms_per_entry']:.1f}",
        f"{r['speedup']:.1f}x", f"{r['ours_compile_s']:.0f} / {r['nt_compile_s']:.0f}")
       for r in rows]))
  print(f"largest relative difference of the values: {difference:.1e}")
  write_json(args.out, {"command": "python -m bench.convnet_kernel " + " ".join(argv or
                                                                                sys.argv[1:]),
                        "machine": cli.describe_devices(), "date": time.strftime("%Y-%m-%d"),
                        "block": [args.rows, args.cols], "rows": rows,
                        "max_relative_difference": difference})
  print(f"written {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
