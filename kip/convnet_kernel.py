"""KIP's pooled ConvNet kernels (`convnet`, `convnet3`) computed on the pixel offsets they need.

neural-tangents keeps, for every pair of images, the covariance of every pair of pixels: 784 x 784
numbers per pair at 28x28, through every layer. A convolution's covariance update keeps a pair of
pixels' offset (it shifts both pixels alike), ReLU acts entry by entry, and the readout (Flatten,
Dense) reads only equal pixels (offset 0). Only the 2x2 average pools widen what is needed: an
offset r after a pool needs offsets up to 2r + 1 before it. So the final offset 0 after three
pools needs offsets within 1, 3 and 7 pixels at 7x7, 14x14 and 28x28: 225 offsets per pixel at
28x28 instead of 784, and the same arithmetic as neural-tangents on those entries. Each layer is
a few shifted sums (XLA fuses them): `python -m bench.convnet_kernel` times both.

Entries are laid out (..., H, W, D, D): pixel (y, x) and offset (dy, dx) in [-r, r]^2, the
covariance of pixel (y, x) of the first image with pixel (y + dy, x + dx) of the second; entries
whose second pixel falls outside the image are zero (SAME padding's zeros).

The recursion (NTK parameterisation, as `neural_tangents.stax` with W_std, b_std):
  input:   K = x1 . x2 / C (per pixel pair), NTK 0;
  conv:    K' = W^2 box3x3(K) + b^2,  NTK' = W^2 box3x3(NTK) + K'  (box: mean over the 9 shifts);
  ReLU:    K' = sqrt(q1 q2) (sin t + (pi - t) cos t) / 2pi,  NTK' = NTK (pi - t) / 2pi,
           cos t = K / sqrt(q1 q2), q the images' own variances at the two pixels;
  pool:    the mean over the 2x2 windows of both pixels;
  readout: Flatten + Dense: K' = W^2 mean_pixels K(offset 0) + b^2, NTK' = K' + W^2 mean NTK.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["convnet_kernel", "offset_radii"]


def offset_radii(pools: int) -> list[int]:
  """The offset radius needed at each resolution, input first: 0 after the last pool, 2r + 1
  before a pool that leaves radius r (offsets past the image's size are zero entries)."""
  radii = [0]
  for _ in range(pools):
    radii.append(2 * radii[-1] + 1)
  return radii[::-1]


def _mask(h: int, w: int, r: int) -> jax.Array:
  """(h, w, D, D): 1 where pixel (y + dy, x + dx) lies in the image."""
  d = jnp.arange(-r, r + 1)
  my = ((jnp.arange(h)[:, None] + d[None, :]) >= 0) & ((jnp.arange(h)[:, None] + d) < h)
  mx = ((jnp.arange(w)[:, None] + d[None, :]) >= 0) & ((jnp.arange(w)[:, None] + d) < w)
  return (my[:, None, :, None] & mx[None, :, None, :]).astype(jnp.float32)


def _offsets(a: jax.Array, r: int) -> jax.Array:
  """(..., H, W) -> (..., H, W, D, D): a at pixel (y + dy, x + dx), zero outside the image."""
  lead, (h, w), d = a.shape[:-2], a.shape[-2:], 2 * r + 1
  flat = a.reshape(-1, h, w, 1)
  # One patch extraction (a convolution with the identity filters) instead of D^2 slices, whose
  # stacked program took a minute to compile.
  patches = jax.lax.conv_general_dilated_patches(
      flat, (d, d), (1, 1), [(r, r), (r, r)], dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)
  return patches.reshape(*lead, h, w, d, d)


def _input(x1: jax.Array, x2s: jax.Array) -> jax.Array:
  """x1 (H, W, C), x2s (C, H, W, D, D) the second image at the offset pixels -> (H, W, D, D):
  the per-pixel-pair products / C."""
  return jnp.einsum("hwc,chwyx->hwyx", x1, x2s, precision="highest") / x1.shape[-1]


def _box(k: jax.Array) -> jax.Array:
  """The mean over the 3x3 shifts of the pixel (zero padded), offsets kept: (H, W, D, D)."""
  h, w = k.shape[:2]
  p = jnp.pad(k, [(1, 1), (1, 1), (0, 0), (0, 0)])
  rows = p[0:h] + p[1:h + 1] + p[2:h + 2]
  return (rows[:, 0:w] + rows[:, 1:w + 1] + rows[:, 2:w + 2]) / 9.0


def _pool(k: jax.Array, r_out: int) -> jax.Array:
  """2x2 average pool (stride 2, VALID) of both pixels: (H, W, D_in, D_in) -> (H//2, W//2,
  D_out, D_out), D_in = 2 r_out + 3 (offset r_in = 2 r_out + 1)."""
  h2, w2 = k.shape[0] // 2, k.shape[1] // 2
  d_out = 2 * r_out + 1
  r_in = (k.shape[2] - 1) // 2

  def axis_pool(k, pixel_axis, offset_axis, n):
    total = 0.0
    for a in (0, 1):
      rows = jax.lax.slice_in_dim(k, a, a + 2 * n - 1, 2, axis=pixel_axis)
      for b in (0, 1):
        start = r_in - 2 * r_out + b - a  # offset 2 j + b - a, index j + r_out
        total = total + jax.lax.slice_in_dim(rows, start, start + 2 * d_out - 1, 2,
                                             axis=offset_axis)
    return total / 4.0

  return axis_pool(axis_pool(k, 0, 2, h2), 1, 3, w2)


# arccos(x) = sqrt(1 - x) (a0 + a1 x + ... + a7 x^7) on [0, 1], error under 2e-8 (Abramowitz and
# Stegun 4.4.46); arccos(-x) = pi - arccos(x). XLA's arccos (an arctan2) and the sine and
# cosine of the angle were most of a ReLU layer's time.
_ACOS = (1.5707963050, -0.2145988016, 0.0889789874, -0.0501743046, 0.0308918810, -0.0170881256,
         0.0066700901, -0.0012624911)


@jax.custom_jvp
def _sqrt(x: jax.Array) -> jax.Array:
  """sqrt(max(x, 0)) whose derivative is 0 at 0 and below: at cos t = 1 (an image's own pixel)
  the angle's derivative is infinite but its argument does not move, and inf x 0 would be NaN
  (neural-tangents does the same)."""
  return jnp.sqrt(jnp.maximum(x, 0.0))


@_sqrt.defjvp
def _sqrt_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  out = _sqrt(x)
  return out, jnp.where(x > 0, t / (2 * jnp.where(x > 0, out, 1.0)), 0.0)


def _arccos(x: jax.Array) -> jax.Array:
  a = jnp.abs(x)
  poly = _ACOS[-1]
  for c in _ACOS[-2::-1]:
    poly = poly * a + c
  angle = _sqrt(1.0 - a) * poly
  return jnp.where(x < 0, math.pi - angle, angle)


def _relu(k, ntk, q1, q2_off, mask):
  """ReLU's arc-cosine update of one pair's entries; q1 (H, W) the first image's variances,
  q2_off (H, W, D, D) the second's at the offset pixel (1 outside the image)."""
  norm = jnp.sqrt(q1[:, :, None, None] * q2_off)
  cos = jnp.clip(k / norm, -1.0, 1.0)
  rest = (math.pi - _arccos(cos)) / (2 * math.pi)  # (pi - t) / 2pi
  sin = _sqrt(1.0 - cos * cos)
  k_out = norm * (sin / (2 * math.pi) + rest * cos)
  return k_out * mask, ntk * rest * mask


def _layers(arch: str) -> list[str]:
  if arch not in ("convnet", "convnet3"):
    raise ValueError(f"no offset kernel for {arch!r}: convnet or convnet3")
  return (["conv", "relu"] if arch == "convnet" else []) + ["conv", "relu", "pool"] * 3


def _second(x2, q2s, layers, radii):
  """What a pair needs of its second image, laid out on the offsets once for every first image:
  its pixels (C, H, W, D, D) and its variances at every ReLU (H, W, D, D; 1 outside)."""
  h, w = x2.shape[:2]
  level, offs = 0, []
  for layer in layers:
    if layer == "relu":
      mask = _mask(h, w, radii[level])
      offs.append(jnp.where(mask > 0, _offsets(q2s[len(offs)], radii[level]), 1.0))
    elif layer == "pool":
      level, h, w = level + 1, h // 2, w // 2
  return _offsets(jnp.moveaxis(x2, -1, 0), radii[0]), offs


def _pair(x1, x2s, q1s, q2_offs, layers, radii, w_var, b_var):
  """One pair's (nngp, ntk) before the readout; x2s, q2_offs: `_second`'s; q1s: the first
  image's own variances at every ReLU ((H, W) per ReLU, in order)."""
  h, w = x1.shape[:2]
  level = 0
  mask = _mask(h, w, radii[0])
  k = _input(x1, x2s) * mask
  ntk = jnp.zeros_like(k)
  relu = 0
  for layer in layers:
    if layer == "conv":
      k = (w_var * _box(k) + b_var) * mask
      ntk = (w_var * _box(ntk)) * mask + k
    elif layer == "relu":
      k, ntk = _relu(k, ntk, q1s[relu], q2_offs[relu], mask)
      relu += 1
    else:
      level += 1
      h, w = k.shape[0] // 2, k.shape[1] // 2
      mask = _mask(h, w, radii[level])
      k, ntk = _pool(k, radii[level]) * mask, _pool(ntk, radii[level]) * mask
  return k, ntk


def _variances(x, layers, w_var, b_var):
  """An image's own variance at every pixel before each ReLU ((H, W) per ReLU), from the
  recursion of the pair (x, x) (a pool mixes neighbouring pixels, so offsets are needed)."""
  radii = offset_radii(layers.count("pool"))
  h, w = x.shape[:2]
  level, mask = 0, _mask(h, w, radii[0])
  k = _input(x, _offsets(jnp.moveaxis(x, -1, 0), radii[0])) * mask
  out = []
  for layer in layers:
    if layer == "conv":
      k = (w_var * _box(k) + b_var) * mask
    elif layer == "relu":
      r = radii[level]
      q = k[:, :, r, r]
      out.append(q)
      q_off = jnp.where(mask > 0, _offsets(q, r), 1.0)
      k, _ = _relu(k, jnp.zeros_like(k), q, q_off, mask)
    else:
      level += 1
      h, w = k.shape[0] // 2, k.shape[1] // 2
      mask = _mask(h, w, radii[level])
      k = _pool(k, radii[level]) * mask
  return out


def convnet_kernel(x1: jax.Array, x2: jax.Array, *, arch: str = "convnet", get: str = "ntk",
                   w_std: float = math.sqrt(2.0), b_std: float = 0.1) -> jax.Array:
  """The infinite-width `arch` kernel (`get`: ntk or nngp) of x1 (n1, H, W, C) and x2 (n2, H,
  W, C), square images: (n1, n2). One row of x1 at a time (memory: n2 pairs' entries)."""
  if get not in ("ntk", "nngp"):
    raise ValueError(f"get must be ntk or nngp, not {get!r}")
  if len(x2) > len(x1):  # the second images' tables are kept whole: the fewer images
    return convnet_kernel(x2, x1, arch=arch, get=get, w_std=w_std, b_std=b_std).T
  if x1.shape[1] != x1.shape[2]:
    raise ValueError(f"square images only, got {x1.shape[1:3]}")
  layers = _layers(arch)
  w_var, b_var = w_std ** 2, b_std ** 2
  radii = offset_radii(layers.count("pool"))
  v1 = jax.vmap(lambda x: _variances(x, layers, w_var, b_var))(x1)
  v2 = jax.vmap(lambda x: _variances(x, layers, w_var, b_var))(x2)

  def readout(k, ntk):
    nngp = w_var * jnp.mean(k[:, :, radii[-1], radii[-1]]) + b_var
    return nngp if get == "nngp" else nngp + w_var * jnp.mean(ntk[:, :, radii[-1], radii[-1]])

  x2s, q2_offs = jax.vmap(lambda x, q: _second(x, q, layers, radii))(x2, v2)

  # Checkpointed: a gradient recomputes each row's entries instead of keeping every row's.
  @jax.checkpoint
  def row(args):
    a, qa = args
    return jax.vmap(lambda b, qb: readout(*_pair(a, b, qa, qb, layers, radii, w_var, b_var)))(
        x2s, q2_offs)

  return jax.lax.map(row, (x1, v1))
