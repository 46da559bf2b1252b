"""Differentiable siamese augmentation (DSA; Zhao & Bilen, ICML 2021), written in JAX.

The transformations of DSA's default strategy `color_crop_cutout_flip_scale_rotate`, each
differentiable in the images (so distillers can back-propagate through them) and each drawing one
random parameter set per call that every image of the batch shares (`batch_mode=True`, the issue's
"same draw for every image"; `False` draws per image):

- color: brightness + U(-0.5, 0.5); saturation x U(0, 2) about the per-pixel channel mean;
  contrast x U(0.5, 1.5) about the image mean.
- crop: a shift by up to 1/8 of the side in each direction (integer pixels), zero fill.
- cutout: a zeroed square of half the side at a random centre.
- flip: a horizontal flip with probability 1/2.
- scale: independent x/y scale factors in [1/1.2, 1.2] about the centre, bilinear, zero fill.
- rotate: a rotation by up to +-15 degrees about the centre, bilinear, zero fill.

DSA's default mode ("S") applies one of the strategy's transformations, chosen at random per call;
`mode="all"` applies them all in order. Images are NHWC in whatever (preprocessed) space they live.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["DSA_STRATEGY", "TRANSFORMS", "dsa", "parse_strategy"]

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
BRIGHTNESS, SATURATION, CONTRAST = 1.0, 2.0, 0.5
CROP, CUTOUT, SCALE, ROTATE_DEG = 0.125, 0.5, 1.2, 15.0


def _draw(key, n, batch_mode, shape=()):
  """U(0, 1) of shape (n, *shape), one row repeated when `batch_mode`."""
  u = jax.random.uniform(key, (1 if batch_mode else n, *shape))
  return jnp.broadcast_to(u, (n, *shape))


def _color(key, x, batch_mode):
  n = len(x)
  kb, ks, kc = jax.random.split(key, 3)
  b = _draw(kb, n, batch_mode)[:, None, None, None]
  x = x + (b - 0.5) * BRIGHTNESS
  s = _draw(ks, n, batch_mode)[:, None, None, None] * SATURATION
  mean = x.mean(axis=-1, keepdims=True)
  x = (x - mean) * s + mean
  c = _draw(kc, n, batch_mode)[:, None, None, None] + CONTRAST
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  return (x - mean) * c + mean


def _crop(key, x, batch_mode):
  n, h, w, c = x.shape
  sh, sw = int(h * CROP + 0.5), int(w * CROP + 0.5)
  shifts = jnp.floor(_draw(key, n, batch_mode, (2,)) * jnp.array([2 * sh + 1, 2 * sw + 1]))
  shifts = shifts.astype(jnp.int32) - jnp.array([sh, sw])
  padded = jnp.pad(x, ((0, 0), (sh, sh), (sw, sw), (0, 0)))

  def one(image, shift):
    return jax.lax.dynamic_slice(image, (sh + shift[0], sw + shift[1], 0), (h, w, c))

  return jax.vmap(one)(padded, shifts)


def _cutout(key, x, batch_mode):
  n, h, w, _ = x.shape
  size_h, size_w = int(h * CUTOUT + 0.5), int(w * CUTOUT + 0.5)
  centre = _draw(key, n, batch_mode, (2,)) * jnp.array([h, w])
  rows = jnp.arange(h)[None, :] - centre[:, :1]  # (n, h)
  cols = jnp.arange(w)[None, :] - centre[:, 1:]
  inside = ((jnp.abs(rows + 0.5) < size_h / 2)[:, :, None]
            & (jnp.abs(cols + 0.5) < size_w / 2)[:, None, :])
  return jnp.where(inside[..., None], 0.0, x)


def _flip(key, x, batch_mode):
  flip = _draw(key, len(x), batch_mode) < 0.5
  return jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)


def _warp(x, matrices):
  """Samples each image at `matrices @ (u, v)` (output coordinates in [-1, 1] about the
  centre, corners aligned), bilinear with zero fill; matrices: (n, 2, 2)."""
  n, h, w, c = x.shape
  v, u = jnp.meshgrid(jnp.linspace(-1, 1, h), jnp.linspace(-1, 1, w), indexing="ij")
  grid = jnp.stack([u.ravel(), v.ravel()])  # (2, h*w), (x, y) order

  def one(image, matrix):
    src = matrix @ grid
    cols = (src[0] + 1) * (w - 1) / 2
    rows = (src[1] + 1) * (h - 1) / 2
    sample = jax.vmap(lambda ch: jax.scipy.ndimage.map_coordinates(
        ch, [rows, cols], order=1, mode="constant", cval=0.0), in_axes=-1, out_axes=-1)
    return sample(image).reshape(h, w, c)

  return jax.vmap(one)(x, matrices)


def _scale(key, x, batch_mode):
  s = _draw(key, len(x), batch_mode, (2,)) * (SCALE - 1 / SCALE) + 1 / SCALE
  return _warp(x, jax.vmap(jnp.diag)(s))


def _rotate(key, x, batch_mode):
  theta = (_draw(key, len(x), batch_mode) - 0.5) * 2 * ROTATE_DEG / 180 * math.pi
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  matrices = jnp.stack([jnp.stack([cos, sin], -1), jnp.stack([-sin, cos], -1)], -2)
  return _warp(x, matrices)


TRANSFORMS = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale,
              "rotate": _rotate}


def parse_strategy(strategy: str) -> tuple[str, ...]:
  """'color_crop_...' -> ('color', 'crop', ...); '' or 'none' -> (); unknown names raise."""
  if strategy in ("", "none"):
    return ()
  names = tuple(strategy.split("_"))
  unknown = [n for n in names if n not in TRANSFORMS]
  if unknown:
    raise ValueError(f"unknown augmentation {', '.join(unknown)}; choose from "
                     f"{', '.join(TRANSFORMS)} joined by '_'")
  return names


def dsa(key: jax.Array, x: jax.Array, strategy: str = DSA_STRATEGY, *, mode: str = "single",
        batch_mode: bool = True) -> jax.Array:
  """Augments a batch (n, H, W, C) float32 with DSA's transformations.

  Args:
    key: the draw; pass the same key for the real and the synthetic batch to make it siamese.
    strategy: transformation names joined by '_' (see `TRANSFORMS`).
    mode: `single` (DSA's default: one transformation, chosen at random) or `all`.
    batch_mode: one draw shared by every image of the batch (True) or one per image.
  """
  names = parse_strategy(strategy)
  if not names:
    return x
  fns = [TRANSFORMS[n] for n in names]
  choose, key = jax.random.split(key)
  if mode == "single":
    branches = [lambda k, x, f=f: f(k, x, batch_mode) for f in fns]
    return jax.lax.switch(jax.random.randint(choose, (), 0, len(fns)), branches, key, x)
  if mode == "all":
    for f, k in zip(fns, jax.random.split(key, len(fns)), strict=True):
      x = f(k, x, batch_mode)
    return x
  raise ValueError(f"unknown augmentation mode {mode!r}; choose single or all")
