"""Seconds per ConvNet-3 training step on the CPU with XLA's convolution gradient and with
kip.conv's (the kernel gradient as matrix products), on MNIST-shaped inputs (28x28x1, 10 classes).

  python -m bench.conv_step

Rows, each at width 32 (the trajectory experts and the CPU evaluations) and 128 (the DC
protocol's): `train`, one SGD step of the DC ConvNet-3 (instance norm, DC's padding) with DSA
drawn per image on a batch of 256, as the experts and the `dc` evaluation train; `meta`, the
gradient in 100 synthetic images of a real-batch loss after one differentiable SGD step on them
(a gradient of a gradient, as trajectory matching and meta-learning take). Compile time apart,
two warm-up steps, then the median of `--rounds` steps, the variants alternating. Prints a
table and writes bench/results/conv_step.json.

Variants: `xla`, XLA's convolution gradient and flax's GroupNorm as the instance norm (the nets
before kip.conv); `shifted`, kip.conv's kernel gradient as 9 shifted products in every layer,
flax's GroupNorm (kip.conv's first version); `current`, what kip.nets does now (the first layer's
few input channels as one product of patches, `kip.nets.PerImageNorm`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import kip.conv
import kip.nets
from kip.augment import DSA_STRATEGY
from kip.method import Batch
from kip.nets import make_net
from methods.trajectory import make_expert

SHAPE, CLASSES = (28, 28, 1), 10


def _seconds(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


_NORM, _PATCH_CHANNELS = kip.nets._norm, kip.conv.PATCH_CHANNELS  # what kip does now


def _flax_norm(kind, train, name, *args):
  """kip.nets' norms as before PerImageNorm: flax's GroupNorm for the instance norm."""
  if kind == "instance":
    return nn.GroupNorm(num_groups=None, group_size=1, epsilon=1e-5, name=name)
  return _NORM(kind, train, name, *args)


VARIANTS = {"xla": dict(shifted=False, patch_channels=0, flax_norm=True),
            "shifted": dict(shifted=True, patch_channels=0, flax_norm=True),
            "current": dict(shifted=True, patch_channels=_PATCH_CHANNELS, flax_norm=False)}


def compare(kind: str, width: int, rounds: int) -> dict:
  """Every variant's step built and compiled, two warm-up steps each, then `rounds` timed steps
  taken alternately (so a change in the machine's load hits all alike); medians."""
  steps, row = {}, {"step": kind, "width": width}
  for name, variant in VARIANTS.items():
    # Read when the step is traced (its first call, below).
    kip.conv.SHIFTED_GRADIENT = variant["shifted"]
    kip.conv.PATCH_CHANNELS = variant["patch_channels"]
    kip.nets._norm = _flax_norm if variant["flax_norm"] else _NORM
    steps[name] = make_step(kind, width)
    row[f"{name}_compile_s"] = _seconds(steps[name])
    _seconds(steps[name])
    _seconds(steps[name])
  kip.conv.SHIFTED_GRADIENT, kip.conv.PATCH_CHANNELS, kip.nets._norm = None, _PATCH_CHANNELS, _NORM
  times = {name: [] for name in steps}
  for _ in range(rounds):
    for name, step in steps.items():
      times[name].append(_seconds(step))
  for name in steps:
    row[f"{name}_step_s"] = statistics.median(times[name])
  row["speedup"] = row["xla_step_s"] / row["current_step_s"]
  return row


def make_step(kind: str, width: int):
  """A function taking one compiled step of `kind` (traced on its first call)."""
  model = make_net("convnet3", CLASSES, width=width, norm="instance", image_shape=SHAPE,
                   dc_padding=True)
  keys = jax.random.split(jax.random.key(0), 4)
  if kind == "train":
    expert = make_expert(model, SHAPE, augment=DSA_STRATEGY)
    state = expert.init(keys[0])
    batch = Batch(jax.random.normal(keys[1], (256, *SHAPE)),
                  jax.random.randint(keys[2], (256,), 0, CLASSES))
    holder = [state]

    def step():
      holder[0], out = expert.update(holder[0], batch, keys[3], jnp.asarray(1))
      return out["loss"]

    return step
  params = model.init(keys[0], jnp.zeros((1, *SHAPE)), train=False)["params"]
  x_syn = jax.random.normal(keys[1], (100, *SHAPE))
  y_syn = jnp.arange(100) % CLASSES
  x_real = jax.random.normal(keys[2], (256, *SHAPE))
  y_real = jax.random.randint(keys[3], (256,), 0, CLASSES)

  def loss(p, x, y):
    logits = model.apply({"params": p}, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def meta(x_syn):
    def outer(x_syn):
      grads = jax.grad(loss)(params, x_syn, y_syn)
      student = jax.tree.map(lambda p, g: p - 0.01 * g, params, grads)
      return loss(student, x_real, y_real)
    return jax.grad(outer)(x_syn)

  return lambda: meta(x_syn)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=5, help="timed steps per row and gradient "
                      "(median)")
  parser.add_argument("--widths", default="32,128", help="comma-separated ConvNet widths")
  parser.add_argument("--out", default="bench/results/conv_step.json")
  args = parser.parse_args(argv)
  rows = []
  print("| step | width | XLA gradient (s) | shifted products (s) | current (s) | speed-up |")
  print("|---|---|---|---|---|---|")
  for kind in ("train", "meta"):
    for width in (int(w) for w in args.widths.split(",")):
      row = compare(kind, width, args.rounds)
      rows.append(row)
      print(f"| {kind} | {width} | {row['xla_step_s']:.3f} | {row['shifted_step_s']:.3f} | "
            f"{row['current_step_s']:.3f} | {row['speedup']:.2f}x |", flush=True)
  result = {"command": "python -m bench.conv_step " + " ".join(sys.argv[1:]),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "devices": [str(d) for d in jax.devices()], "jax": jax.__version__},
            "rows": rows}
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"written {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
