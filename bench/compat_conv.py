"""Speed of the pooled ConvNet NTK through one of `kip._compat`'s CPU speed patches against
neural-tangents' own code: `--patch conv` (default), the shifted-sum convolution against its
depthwise convolutions; `--patch arctan2`, the polynomial angle of the ReLU kernels against XLA's
arctan2. The other patch stays in place on both sides.

KIP differentiates the kernel in the support images, so the number that matters is the reverse-
mode gradient of a KRR-style loss of `K(x_target, x_support)` and `K(x_support, x_support)` in
`x_support`; the forward kernel and a forward-mode derivative (`jax.jvp` in one direction) are
measured too. Each is jitted and compiled first; the time is the best of `--repeats` runs,
alternating between the two implementations so that load from other processes hits both alike.

  python -m bench.compat_conv                    # 4 support x 4 target 28x28x1 images
  python -m bench.compat_conv --n 8 --repeats 7
  python -m bench.compat_conv --patch arctan2
Prints one line per implementation and quantity (milliseconds).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kip.kernels import make_kernel

PATCHES = {"conv": ("neural_tangents._src.stax.linear", "_conv_kernel_full_spatial_shared"),
           "arctan2": ("neural_tangents._src.stax.elementwise", "_arctan2")}


def _time_ms(fn, args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return 1e3 * (time.perf_counter() - start)


def make_functions(kernel_fn):
  """Jitted forward kernel, reverse-mode gradient and forward-mode JVP of a KRR-style loss."""

  def loss(x_support, x_target):
    k_ts = kernel_fn(x_target, x_support)
    k_ss = kernel_fn(x_support, x_support)
    return jnp.sum(k_ts**2) + jnp.sum(k_ss)

  forward = jax.jit(lambda x_support, x_target: kernel_fn(x_target, x_support))
  grad = jax.jit(jax.value_and_grad(loss))
  jvp = jax.jit(lambda x_support, x_target, v: jax.jvp(lambda x: loss(x, x_target),
                                                        (x_support,), (v,)))
  return forward, grad, jvp


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=4, help="support and target images")
  parser.add_argument("--side", type=int, default=28, help="image side")
  parser.add_argument("--repeats", type=int, default=5, help="timed runs per quantity")
  parser.add_argument("--patch", default="conv", choices=tuple(PATCHES))
  args = parser.parse_args(argv)

  module_name, attribute = PATCHES[args.patch]
  module = sys.modules[module_name]
  patched = getattr(module, attribute)
  rng = np.random.default_rng(0)
  shape = (args.n, args.side, args.side, 1)
  x_support, x_target, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
                            for _ in range(3))
  print(f"{jax.devices()[0].device_kind}, {args.n} support x {args.n} target "
        f"{args.side}x{args.side}x1, best of {args.repeats} (ms)")

  inputs = {"forward": (x_support, x_target), "grad": (x_support, x_target),
            "jvp": (x_support, x_target, v)}
  compiled, errors = {}, {}
  for name, conv in (("patched", patched), ("original", patched.original)):
    # The stax layers look the function up when traced, so compile with it in place.
    setattr(module, attribute, conv)
    try:
      fns = dict(zip(inputs, make_functions(make_kernel("convnet").kernel_fn), strict=True))
      for label, fn in fns.items():
        try:
          jax.block_until_ready(fn(*inputs[label]))
          compiled[name, label] = fn
        except Exception as e:  # noqa: BLE001  (a bench reports what does not run)
          errors[name, label] = type(e).__name__
    finally:
      setattr(module, attribute, patched)

  best = {key: float("inf") for key in compiled}
  for _ in range(args.repeats):  # alternate, so that load from other processes hits both alike
    for key, fn in compiled.items():
      best[key] = min(best[key], _time_ms(fn, inputs[key[1]]))
  for name in ("patched", "original"):
    cells = [f"{label} " + (f"{best[name, label]:8.1f}" if (name, label) in best
                            else f"n/a ({errors[name, label]})") for label in inputs]
    print(f"{name:>9}: " + "  ".join(cells))
  for label in inputs:
    if ("patched", label) in best and ("original", label) in best:
      ratio = best["original", label] / best["patched", label]
      print(f"{label}: original / patched = {ratio:.1f}x")


if __name__ == "__main__":
  main()
