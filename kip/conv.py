"""A 2-D convolution whose derivatives are fast on XLA's CPU backend.

XLA:CPU computes a convolution's gradient with respect to its kernel ("backward filter") as a
convolution whose window is the whole image, 20-40x slower than the forward pass (one 3x3, 32 ->
32 channel layer on 256 28x28 images: forward 0.07 s, kernel gradient 2.7 s; openxla/xla
#34273 reports the same). `conv2d` computes the same convolution with XLA's forward kernel, but
defines its derivative (a `custom_jvp`, so gradients of gradients work too, as trajectory
matching and meta-learning need) as

  d conv(x, w) = conv(dx, w) + sum_ij shift_ij(x) @ dw[i, j],

whose transpose in `dw` is kh * kw matrix products over the batch and positions instead of the
slow convolution; the transpose in `dx` is XLA's fast backward-input convolution. `conv` picks it
on the CPU and XLA's own convolution elsewhere (cuDNN's backward filter is fast). Same numbers up
to float rounding (tests/test_nets.py checks first and second derivatives against XLA's in
float64). With `kip.nets.PerImageNorm`, a DC ConvNet-3 SGD step with DSA on 256 MNIST images is
2.5x faster than with XLA's gradient and flax's GroupNorm at width 32, 3.0x at width 128; a
gradient through one unrolled step, 2.6x / 3.3x (`python -m bench.conv_step`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

__all__ = ["PATCH_CHANNELS", "SHIFTED_GRADIENT", "conv", "conv2d", "shifted_conv"]

_DN = ("NHWC", "HWIO", "NHWC")
Padding = str | tuple[tuple[int, int], ...]
# None: `conv2d` on the CPU backend only; True / False: always / never (bench.conv_step compares).
SHIFTED_GRADIENT: bool | None = None


def _pads(x_shape: tuple[int, ...], w_shape: tuple[int, ...], strides: tuple[int, int],
          padding: Padding) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(x_shape[1:3], w_shape[:2], strides, padding))
  return padding


PATCH_CHANNELS = 4  # inputs with at most this many channels use one matrix product of patches


def shifted_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int],
                 padding: Padding) -> jax.Array:
  """The convolution (NHWC input, HWIO kernel) as a sum over kernel positions (i, j) of the
  input window shifted by (i, j), strided, times w[i, j]: kh * kw matrix products. For inputs
  with few channels (grey or RGB images: the first layer) the windows are concatenated along the
  channels instead and multiplied once by the (kh * kw * C_in, C_out) kernel, so that the kernel
  gradient reads the output gradient once, not kh * kw times (4.7x faster for a 1 -> 32 channel
  layer on 256 MNIST images)."""
  (top, bottom), (left, right) = _pads(x.shape, w.shape, strides, padding)
  xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  kh, kw, c_in, c_out = w.shape
  sh, sw = strides
  ho, wo = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
  windows = [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
             for i in range(kh) for j in range(kw)]
  if c_in <= PATCH_CHANNELS:
    patches = jnp.concatenate(windows, axis=-1).reshape(-1, kh * kw * c_in)
    out = patches @ w.reshape(kh * kw * c_in, c_out)
  else:
    out = sum(window.reshape(-1, c_in) @ wij
              for window, wij in zip(windows, w.reshape(kh * kw, c_in, c_out), strict=True))
  return out.reshape(x.shape[0], ho, wo, c_out)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: Padding) -> jax.Array:
  """XLA's convolution with the derivative described in the module docstring."""
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN)


def _conv2d_jvp(strides, padding, primals, tangents):
  x, w = primals
  dx, dw = tangents
  y = conv2d(x, w, strides, padding)
  dy = jnp.zeros_like(y)
  if not isinstance(dx, SymbolicZero):
    dy = dy + conv2d(dx, w, strides, padding)
  if not isinstance(dw, SymbolicZero):
    dy = dy + shifted_conv(x, dw, strides, padding)
  return y, dy


conv2d.defjvp(_conv2d_jvp, symbolic_zeros=True)


def conv(x: jax.Array, w: jax.Array, strides: Sequence[int],
         padding: str | Sequence[tuple[int, int]]) -> jax.Array:
  """NHWC x HWIO convolution: `conv2d` on the CPU, XLA's own elsewhere (see SHIFTED_GRADIENT)."""
  strides = tuple(strides)
  padding = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
  shifted = SHIFTED_GRADIENT
  if shifted is None:
    shifted = jax.default_backend() == "cpu"
  if shifted:
    return conv2d(x, w, strides, padding)
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN)
