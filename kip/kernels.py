"""Named infinite-width architectures -> neural-tangents NTK/NNGP kernels, and blocked evaluation.

`make_kernel("fc", depth=1)` returns a `Kernel`: the finite network's `init_fn`/`apply_fn` and a
`kernel_fn(x1, x2)` already bound to NTK or NNGP. Any `neural_tangents.stax` kernel_fn of the user's
own plugs in through `from_stax`. `kip.sharding.shard_kernel` turns a kernel_fn into one that
computes its blocks across devices within a memory budget, sized by the kernel's `covariance`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax

from kip._compat import stax

__all__ = ["ARCHITECTURES", "KERNEL_TYPES", "COVARIANCES", "Kernel", "make_kernel", "from_stax"]

ARCHITECTURES = ("fc", "conv", "convnet", "convnet3")
KERNEL_TYPES = ("ntk", "nngp")
# What a kernel keeps per entry, which sets its memory and cost: one number (fc), one per pixel
# (conv without pooling), one per pair of pixels (full spatial covariances: pooled ConvNets).
COVARIANCES = ("none", "diagonal", "full")
W_STD = math.sqrt(2.0)
B_STD = 0.1


class Kernel(NamedTuple):
  """An architecture's finite network and infinite-width kernel.

  kernel_fn: (n1, H, W, C), (n2, H, W, C) float32 -> (n1, n2) float32 (NTK or NNGP).
  covariance: what one entry keeps per layer (see COVARIANCES): `full` costs O(pixels^2).
  """

  name: str
  init_fn: Callable
  apply_fn: Callable
  kernel_fn: Callable[[jax.Array, jax.Array], jax.Array]
  covariance: str = "full"


def _conv(width: int):
  return stax.Conv(width, (3, 3), padding="SAME", W_std=W_STD, b_std=B_STD)


def _layers(arch: str, depth: int, width: int) -> tuple[list, str]:
  if arch == "fc":
    body = [stax.Flatten()]
    for _ in range(depth):
      body += [stax.Dense(width, W_std=W_STD, b_std=B_STD), stax.Relu()]
    return body, "none"
  if arch == "conv":
    body = []
    for _ in range(depth):
      body += [_conv(width), stax.Relu()]
    return body + [stax.Flatten()], "diagonal"
  if arch in ("convnet", "convnet3"):
    # KIP's ConvNet: an extra 3x3 conv + ReLU, then 3 x [conv, ReLU, 2x2 average pool].
    body = [_conv(width), stax.Relu()] if arch == "convnet" else []
    for _ in range(3):
      body += [_conv(width), stax.Relu(), stax.AvgPool((2, 2), strides=(2, 2))]
    return body + [stax.Flatten()], "full"
  raise ValueError(f"unknown kernel {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def make_kernel(arch: str, *, depth: int = 1, kernel_type: str = "ntk", width: int = 1024,
                num_outputs: int = 1) -> Kernel:
  """The named architecture's kernel (W_std sqrt(2), b_std 0.1, NTK parameterisation).

  Args:
    arch: `fc` (depth x [Dense, ReLU]), `conv` (depth x [3x3 conv, ReLU], no pooling), `convnet`
      or `convnet3` (KIP's ConvNets with pooling; depth is fixed by the architecture).
    depth: hidden layers for `fc` and `conv`.
    kernel_type: `ntk` or `nngp`.
    width: hidden width of the finite network (the kernel is the infinite-width limit).
    num_outputs: readout width of the finite network.
  """
  if kernel_type not in KERNEL_TYPES:
    raise ValueError(f"unknown kernel type {kernel_type!r}; choose ntk or nngp")
  if depth < 1:
    raise ValueError(f"depth must be at least 1, got {depth}")
  body, covariance = _layers(arch, depth, width)
  init_fn, apply_fn, kernel_fn = stax.serial(
      *body, stax.Dense(num_outputs, W_std=W_STD, b_std=B_STD))
  return from_stax(kernel_fn, kernel_type, name=arch, init_fn=init_fn, apply_fn=apply_fn,
                   covariance=covariance)


def from_stax(kernel_fn: Callable, kernel_type: str = "ntk", *, name: str = "custom",
              init_fn: Callable | None = None, apply_fn: Callable | None = None,
              covariance: str = "full") -> Kernel:
  """Wraps a user's `neural_tangents.stax` kernel_fn (signature `kernel_fn(x1, x2, get)`).

  covariance: what one entry keeps (`none`, `diagonal` or `full`; `full` is the safe guess).
  """
  if covariance not in COVARIANCES:
    raise ValueError(f"unknown covariance {covariance!r}; choose one of {', '.join(COVARIANCES)}")

  def bound(x1: jax.Array, x2: jax.Array) -> jax.Array:
    return kernel_fn(x1, x2, kernel_type)

  return Kernel(f"{name}-{kernel_type}", init_fn, apply_fn, bound, covariance)
