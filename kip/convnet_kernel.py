"""KIP's pooled ConvNet kernels (`convnet`, `convnet3`) computed on the pixel offsets they need.

neural-tangents keeps, for every pair of images, the covariance of every pair of pixels: 784 x 784
numbers per pair at 28x28, through every layer. A convolution's covariance update keeps a pair of
pixels' offset (it shifts both pixels alike), ReLU acts entry by entry, and the readout (Flatten,
Dense) reads only equal pixels (offset 0). Only the 2x2 average pools widen what is needed: an
offset r after a pool needs offsets up to 2r + 1 before it. So the final offset 0 after three
pools needs offsets within 1, 3 and 7 pixels at 7x7, 14x14 and 28x28: 225 offsets per pixel at
28x28 instead of 784, and the same arithmetic as neural-tangents on those entries. Each layer is
a few shifted sums (XLA fuses them): `python -m bench.convnet_kernel` times both.

Entries are laid out (..., D, D, P): offset (dy, dx) in [-r, r]^2 outermost, then the pixel
(y, x) flattened to y * W + x, the covariance of pixel (y, x) of the first image with pixel
(y + dy, x + dx) of the second; entries whose second pixel falls outside the image are zero (SAME
padding's zeros). The long minor axis matters: XLA:CPU ran the same elementwise work 3-12x slower
on a (H, W, D, D) layout, whose minor axis has 15 entries (`python -m bench.convnet_kernel`).

The recursion (NTK parameterisation, as `neural_tangents.stax` with W_std, b_std):
  input:   K = x1 . x2 / C (per pixel pair), NTK 0;
  conv:    K' = W^2 box3x3(K) + b^2,  NTK' = W^2 box3x3(NTK) + K'  (box: mean over the 9 shifts);
  ReLU:    K' = sqrt(q1 q2) (sin t + (pi - t) cos t) / 2pi,  NTK' = NTK (pi - t) / 2pi,
           cos t = K / sqrt(q1 q2), q the images' own variances at the two pixels;
  pool:    the mean over the 2x2 windows of both pixels;
  readout: Flatten + Dense: K' = W^2 mean_pixels K(offset 0) + b^2, NTK' = K' + W^2 mean NTK.
"""

from __future__ import annotations

import functools
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
  """(D, D, h * w): 1 where pixel (y + dy, x + dx) lies in the image."""
  d = jnp.arange(-r, r + 1)
  my = ((jnp.arange(h)[None, :] + d[:, None]) >= 0) & ((jnp.arange(h)[None, :] + d[:, None]) < h)
  mx = ((jnp.arange(w)[None, :] + d[:, None]) >= 0) & ((jnp.arange(w)[None, :] + d[:, None]) < w)
  mask = my[:, None, :, None] & mx[None, :, None, :]  # (dy, dx, y, x)
  return mask.reshape(2 * r + 1, 2 * r + 1, h * w).astype(jnp.float32)


def _offsets(a: jax.Array, r: int) -> jax.Array:
  """(..., H, W) -> (..., D, D, H * W): a at pixel (y + dy, x + dx), zero outside the image."""
  lead, (h, w), d = a.shape[:-2], a.shape[-2:], 2 * r + 1
  flat = a.reshape(-1, h, w, 1)
  # One patch extraction (a convolution with the identity filters) instead of D^2 slices, whose
  # stacked program took a minute to compile.
  patches = jax.lax.conv_general_dilated_patches(
      flat, (d, d), (1, 1), [(r, r), (r, r)], dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)  # (N, H, W, D * D)
  return jnp.moveaxis(patches.reshape(-1, h * w, d, d), 1, -1).reshape(*lead, d, d, h * w)


def _input(x1: jax.Array, x2s: jax.Array) -> jax.Array:
  """x1 (H, W, C), x2s (C, D, D, P) the second image at the offset pixels -> (D, D, P): the
  per-pixel-pair products / C."""
  flat = x1.reshape(-1, x1.shape[-1]).T  # (C, P)
  # A broadcast product and a sum over the few channels: as an einsum XLA made it a batched dot
  # over the pixels and transposed the (D, D, P) tables around it, forward and backward.
  return jnp.sum(flat[:, None, None, :] * x2s, axis=0) / x1.shape[-1]


def _box_sum(k: jax.Array, w: int) -> jax.Array:
  """The mean over the 3x3 shifts of the pixel (zero padded), offsets kept: (..., P) with rows of
  `w` pixels. Shifts along the flat pixel axis: a row above or below is a shift by w (the padding
  of w + 1 zeros covers the first and last rows), a pixel left or right a shift by 1, whose
  wrap-around into the neighbouring row the column masks remove."""
  n = k.shape[-1]
  p = jnp.pad(k, [(0, 0)] * (k.ndim - 1) + [(w + 1, w + 1)])

  def column(dx):  # the three rows' sum at horizontal shift dx
    return sum(jax.lax.slice_in_dim(p, w + 1 + dx + dy, w + 1 + dx + dy + n, axis=-1)
               for dy in (-w, 0, w))

  x = jnp.arange(n) % w
  return (column(0) + jnp.where(x > 0, column(-1), 0.0)
          + jnp.where(x < w - 1, column(1), 0.0)) / 9.0


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _box(k: jax.Array, w: int) -> jax.Array:
  """`_box_sum`, differentiated as itself: the 3x3 mean with zero padding is its own adjoint.
  XLA otherwise fused the ReLU's backward expression into each of the nine shifted sums of the
  box's backward and computed it nine times (25x slower than the two apart)."""
  return _box_sum(k, w)


def _box_fwd(k, w):
  return _box_sum(k, w), None


def _box_bwd(w, _, g):
  return (_box_sum(jax.lax.optimization_barrier(g), w),)


_box.defvjp(_box_fwd, _box_bwd)


def _pool(k: jax.Array, w: int, r_out: int) -> jax.Array:
  """2x2 average pool (stride 2, VALID) of both pixels: (D_in, D_in, P) with rows of `w` pixels
  -> (D_out, D_out, P / 4), D_in = 2 r_out + 3 (offset r_in = 2 r_out + 1)."""
  d_in, h = k.shape[0], k.shape[-1] // w
  k = k.reshape(d_in, d_in, h, w)
  h2, w2 = h // 2, w // 2
  d_out = 2 * r_out + 1
  r_in = (d_in - 1) // 2

  def axis_pool(k, pixel_axis, offset_axis, n):
    total = 0.0
    for a in (0, 1):
      rows = jax.lax.slice_in_dim(k, a, a + 2 * n - 1, 2, axis=pixel_axis)
      for b in (0, 1):
        start = r_in - 2 * r_out + b - a  # offset 2 j + b - a, index j + r_out
        total = total + jax.lax.slice_in_dim(rows, start, start + 2 * d_out - 1, 2,
                                             axis=offset_axis)
    return total / 4.0

  return axis_pool(axis_pool(k, 2, 0, h2), 3, 1, w2).reshape(d_out, d_out, h2 * w2)


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


def _relu(k, ntk, q1, q2, mask):
  """ReLU's arc-cosine update of one pair's entries (D, D, P): q1 the first image's variances at
  its pixels (P,), q2 the second's at the offset pixels (D, D, P; 1 outside the image). cos t is
  k / sqrt(q1 q2), which is exactly 1 for an image's own pixel (arccos is steepest there)."""
  norm = jnp.sqrt(q1 * q2)
  cos = jnp.clip(k / norm, -1.0, 1.0)
  rest = (math.pi - _arccos(cos)) / (2 * math.pi)  # (pi - t) / 2pi
  sin = _sqrt(1.0 - cos * cos)
  k_out = norm * (sin / (2 * math.pi) + rest * cos)
  return k_out * mask, None if ntk is None else ntk * rest * mask


def _layers(arch: str) -> list[str]:
  if arch not in ("convnet", "convnet3"):
    raise ValueError(f"no offset kernel for {arch!r}: convnet or convnet3")
  return (["conv", "relu"] if arch == "convnet" else []) + ["conv", "relu", "pool"] * 3


def _at_offsets(q: jax.Array, h: int, w: int, r: int, mask: jax.Array) -> jax.Array:
  """An image's variances (P,) at the offset pixels (D, D, P), 1 outside the image."""
  return jnp.where(mask > 0, _offsets(q.reshape(h, w), r), 1.0)


def _walk(x1, x2s, layers, radii, w_var, b_var, first=None, second=None, ntk=True):
  """The recursion of one pair from the input through `layers` to the readout's input: (nngp,
  ntk or None, own) entries (D, D, P) at the last resolution. x2s: the second image at the
  input's offset pixels (C, D, D, P). first / second: per ReLU, the images' own variances (the
  first at its pixels, the second at the offset pixels, `_second`); None for an
  image with itself, whose variances are read off offset 0 as the walk goes and returned in
  `own` (the NNGP alone then: ntk=False)."""
  h, w = x1.shape[:2]
  level, relu, own = 0, 0, []
  mask = _mask(h, w, radii[0])
  k = _input(x1, x2s) * mask
  t = jnp.zeros_like(k) if ntk else None
  for layer in layers:
    if layer == "conv":
      k = (w_var * _box(k, w) + b_var) * mask
      t = None if t is None else (w_var * _box(t, w)) * mask + k
    elif layer == "relu":
      if first is None:
        r = radii[level]
        own.append(k[r, r])
        k, t = _relu(k, t, own[-1], _at_offsets(own[-1], h, w, r, mask), mask)
      else:
        k, t = _relu(k, t, first[relu], second[relu], mask)
      relu += 1
    else:
      level += 1
      k = _pool(k, w, radii[level])
      t = None if t is None else _pool(t, w, radii[level])
      h, w = h // 2, w // 2
      mask = _mask(h, w, radii[level])
      k, t = k * mask, None if t is None else t * mask
  return k, t, own


def _own(x, layers, radii, w_var, b_var):
  """An image's own variance at every pixel before each ReLU ((P,) per ReLU), from the NNGP
  recursion of the pair (x, x) (a pool mixes neighbouring pixels, so offsets are needed)."""
  x_off = _offsets(jnp.moveaxis(x, -1, 0), radii[0])
  return _walk(x, x_off, layers, radii, w_var, b_var, ntk=False)[2]


def _second(x2, q2s, layers, radii):
  """What a pair needs of its second image, laid out on the offsets once for every first image:
  its pixels (C, D, D, P) and its variances at every ReLU (D, D, P; 1 outside)."""
  h, w = x2.shape[:2]
  level, offs = 0, []
  for layer in layers:
    if layer == "relu":
      mask = _mask(h, w, radii[level])
      offs.append(_at_offsets(q2s[len(offs)], h, w, radii[level], mask))
    elif layer == "pool":
      level, h, w = level + 1, h // 2, w // 2
  return _offsets(jnp.moveaxis(x2, -1, 0), radii[0]), offs


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
  v1 = jax.vmap(lambda x: _own(x, layers, radii, w_var, b_var))(x1)
  v2 = jax.vmap(lambda x: _own(x, layers, radii, w_var, b_var))(x2)
  r = radii[-1]

  def readout(k, ntk):
    nngp = w_var * jnp.mean(k[r, r]) + b_var
    return nngp if get == "nngp" else nngp + w_var * jnp.mean(ntk[r, r])

  x2s, seconds = jax.vmap(lambda x, q: _second(x, q, layers, radii))(x2, v2)

  # Checkpointed: a gradient recomputes each row's entries instead of keeping every row's.
  @jax.checkpoint
  def row(args):
    a, qa = args
    return jax.vmap(lambda b, sb: readout(*_walk(a, b, layers, radii, w_var, b_var, qa, sb,
                                                 ntk=get == "ntk")[:2]))(x2s, seconds)

  return jax.lax.map(row, (x1, v1))
