"""Named infinite-width architectures -> neural-tangents NTK/NNGP kernels, and blocked evaluation.

`make_kernel("fc", depth=1)` returns a `Kernel`: the finite network's `init_fn`/`apply_fn` and a
`kernel_fn(x1, x2)` already bound to NTK or NNGP. Any `neural_tangents.stax` kernel_fn of the user's
own plugs in through `from_stax`. Kernels between large sets (test x support, train x support) are
computed by `kernel_in_blocks`, a block of rows at a time, never as one giant array.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kip._compat import stax

__all__ = ["ARCHITECTURES", "KERNEL_TYPES", "Kernel", "make_kernel", "from_stax",
           "kernel_in_blocks", "rows_per_block"]

ARCHITECTURES = ("fc", "conv", "convnet", "convnet3")
KERNEL_TYPES = ("ntk", "nngp")
W_STD = math.sqrt(2.0)
B_STD = 0.1


class Kernel(NamedTuple):
  """An architecture's finite network and infinite-width kernel.

  kernel_fn: (n1, H, W, C), (n2, H, W, C) float32 -> (n1, n2) float32 (NTK or NNGP).
  pooled: whether entries cost O(pixels^2) (spatial covariances are kept), which sizes blocks.
  """

  name: str
  init_fn: Callable
  apply_fn: Callable
  kernel_fn: Callable[[jax.Array, jax.Array], jax.Array]
  pooled: bool = False


def _conv(width: int):
  return stax.Conv(width, (3, 3), padding="SAME", W_std=W_STD, b_std=B_STD)


def _layers(arch: str, depth: int, width: int) -> tuple[list, bool]:
  if arch == "fc":
    body = [stax.Flatten()]
    for _ in range(depth):
      body += [stax.Dense(width, W_std=W_STD, b_std=B_STD), stax.Relu()]
    return body, False
  if arch == "conv":
    body = []
    for _ in range(depth):
      body += [_conv(width), stax.Relu()]
    return body + [stax.Flatten()], False
  if arch in ("convnet", "convnet3"):
    # KIP's ConvNet: an extra 3x3 conv + ReLU, then 3 x [conv, ReLU, 2x2 average pool].
    body = [_conv(width), stax.Relu()] if arch == "convnet" else []
    for _ in range(3):
      body += [_conv(width), stax.Relu(), stax.AvgPool((2, 2), strides=(2, 2))]
    return body + [stax.Flatten()], True
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
  body, pooled = _layers(arch, depth, width)
  init_fn, apply_fn, kernel_fn = stax.serial(
      *body, stax.Dense(num_outputs, W_std=W_STD, b_std=B_STD))
  return from_stax(kernel_fn, kernel_type, name=arch, init_fn=init_fn, apply_fn=apply_fn,
                   pooled=pooled)


def from_stax(kernel_fn: Callable, kernel_type: str = "ntk", *, name: str = "custom",
              init_fn: Callable | None = None, apply_fn: Callable | None = None,
              pooled: bool = True) -> Kernel:
  """Wraps a user's `neural_tangents.stax` kernel_fn (signature `kernel_fn(x1, x2, get)`)."""

  def bound(x1: jax.Array, x2: jax.Array) -> jax.Array:
    return kernel_fn(x1, x2, kernel_type)

  return Kernel(f"{name}-{kernel_type}", init_fn, apply_fn, bound, pooled)


def rows_per_block(kernel: Kernel, image_shape: tuple[int, ...], n_cols: int,
                   memory_bytes: float = 2**30) -> int:
  """Rows of a kernel block whose intermediates fit in about `memory_bytes`.

  Per entry, a kernel without pooling keeps O(pixels) floats (per-pixel covariances); with pooling
  it keeps O(pixels^2) (full spatial covariances). A factor of 8 covers the copies XLA keeps alive
  (NNGP and NTK, forward and activation).
  """
  pixels = int(np.prod(image_shape[:-1]))
  per_entry = 4 * 8 * (pixels**2 if kernel.pooled else pixels)
  return int(max(1, min(8192, memory_bytes // (per_entry * max(n_cols, 1)))))


def kernel_in_blocks(kernel_fn: Callable, x1: np.ndarray, x2: jax.Array, block_rows: int,
                     progress: Callable | None = None) -> np.ndarray:
  """K(x1, x2) as a host (n1, n2) array (the kernel's dtype), `block_rows` rows of x1 at a time.

  Each block is padded to `block_rows` so the jitted kernel compiles once; results stream to host
  memory, so only one block lives on the device.
  """
  fn = jax.jit(kernel_fn)  # jit caches by function, so repeated calls compile once
  n1 = len(x1)
  x2 = jnp.asarray(x2)
  out = None
  with jax.default_matmul_precision("highest"):
    for start in range(0, n1, block_rows):
      block = np.asarray(x1[start:start + block_rows])
      rows = len(block)
      if rows < block_rows:
        block = np.concatenate([block, np.zeros((block_rows - rows,) + block.shape[1:],
                                                block.dtype)])
      k = np.asarray(fn(jnp.asarray(block, x2.dtype), x2))[:rows]
      if out is None:
        out = np.empty((n1, len(x2)), k.dtype)
      out[start:start + rows] = k
      if progress is not None:
        progress(rows)
  return out

