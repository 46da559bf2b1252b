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
DSA's own evaluation (`utils.epoch` -> `DiffAugment(img, strategy, param=...)` with no seed, so
`param.Siamese = False`) draws the parameters per image: `batch_mode=False`.

`dc_augment` is DC's separate, non-differentiable evaluation augmentation (Zhao et al., ICLR 2021;
VICO-UoE/DatasetCondensation `utils.py: augment, get_daparam`): per image, one transformation
chosen at random among the strategy's (`crop`, `scale`, `rotate`, `noise`); see its docstring.

`apply_augment` runs an augmentation spec: a DSA strategy (`color_crop`, or `dsa:color_crop`), DC's
(`dc:crop_scale_rotate`), or `''`/`none`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["DSA_STRATEGY", "TRANSFORMS", "dsa", "parse_strategy", "DC_STRATEGY",
           "DC_TRANSFORMS", "dc_augment", "parse_augment", "apply_augment", "random_crop"]

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


def parse_strategy(strategy: str, transforms=None, what: str = "augmentation"
                   ) -> tuple[str, ...]:
  """'color_crop_...' -> ('color', 'crop', ...); '' or 'none' -> (); names not in `transforms`
  (default: DSA's `TRANSFORMS`) raise, naming the kind of augmentation (`what`)."""
  transforms = TRANSFORMS if transforms is None else transforms
  if strategy in ("", "none"):
    return ()
  names = tuple(strategy.split("_"))
  unknown = [n for n in names if n not in transforms]
  if unknown:
    raise ValueError(f"unknown {what} {', '.join(unknown)}; choose from "
                     f"{', '.join(transforms)} joined by '_'")
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


def random_crop(key: jax.Array, x: jax.Array, pad: int = 4, fill=0.0, flip: bool = False
                ) -> jax.Array:
  """torchvision's / kornia's `RandomCrop(size, padding=pad)` (and `RandomHorizontalFlip` with
  `flip`): per image, pad by `pad` with `fill` (e.g. the preprocessed value of a black pixel, (C,)
  or a scalar) and cut a random window of the original size. (n, H, W, C) -> same shape."""
  n, h, w, c = x.shape
  k_rows, k_cols, k_flip = jax.random.split(key, 3)
  padded = jnp.pad(x - fill, ((0, 0), (pad, pad), (pad, pad), (0, 0))) + fill
  rows = jax.random.randint(k_rows, (n,), 0, 2 * pad + 1)
  cols = jax.random.randint(k_cols, (n,), 0, 2 * pad + 1)
  out = jax.vmap(lambda im, r, q: jax.lax.dynamic_slice(im, (r, q, 0), (h, w, c)))(
      padded, rows, cols)
  if flip:
    out = jnp.where(jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1)), out[:, :, ::-1], out)
  return out


# DC's evaluation augmentation. Every rule below is read off VICO-UoE/DatasetCondensation,
# `utils.py`: `get_daparam` (the parameters and which datasets get a strategy) and `augment` (the
# transformations); the first version of the repository (2021-01-15) has the same code.
DC_STRATEGY = "crop_scale_rotate"  # get_daparam: MNIST; every other dataset 'none'
DC_TRANSFORMS = ("crop", "scale", "rotate", "noise")
DC_CROP, DC_SCALE, DC_ROTATE_DEG, DC_NOISE = 4, 0.2, 45, 0.001


def _dc_crop(key, x, crop):
  """`augment.cropfun`: pad by `crop` with the batch's per-channel mean, then cut the image back at
  offset `np.random.permutation(2 * crop)[0]` per axis: a shift by -crop .. crop - 1 pixels."""
  n, h, w, c = x.shape
  fill = x.mean(axis=(0, 1, 2))
  padded = jnp.broadcast_to(fill, (n, h + 2 * crop, w + 2 * crop, c))
  padded = padded.at[:, crop:crop + h, crop:crop + w].set(x)
  offsets = jax.random.randint(key, (n, 2), 0, 2 * crop)
  return jax.vmap(lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, c)))(
      padded, offsets)


def _dc_scale(key, x, scale):
  """`augment.scalefun`: new height and width `int(U(1 - scale, 1 + scale) * H)` (both from H, as
  DC writes it), a nearest-neighbour resize (`F.interpolate`'s default: source index
  `floor(i * (in / out))` in float32), pasted at the centre of a zero canvas of side
  max(h, w, H, W) (offset `int((side - h) / 2)`), and the centre H x W cut back out (zero fill)."""
  n, h, w, _ = x.shape
  size = jnp.floor(jax.random.uniform(key, (n, 2), minval=1 - scale, maxval=1 + scale) * h)
  size = size.astype(jnp.int32)
  side = jnp.maximum(jnp.max(size, axis=1), max(h, w))

  def axis(in_len, new_len):
    # Row (or column) i of the output is row i + (side - in) // 2 of the canvas, which holds the
    # resized image from (side - new) // 2 on.
    pos = jnp.arange(in_len)[None] + ((side - in_len) // 2 - (side - new_len) // 2)[:, None]
    ratio = jnp.float32(in_len) / new_len.astype(jnp.float32)
    src = jnp.floor(pos.astype(jnp.float32) * ratio[:, None]).astype(jnp.int32)
    return jnp.clip(src, 0, in_len - 1), (pos >= 0) & (pos < new_len[:, None])

  rows, row_ok = axis(h, size[:, 0])
  cols, col_ok = axis(w, size[:, 1])
  out = jax.vmap(lambda image, r, c: image[r][:, c])(x, rows, cols)
  inside = row_ok[:, :, None] & col_ok[:, None, :]
  return jnp.where(inside[..., None], out, 0.0)


def _mirror(k: np.ndarray, n: int) -> np.ndarray:
  k = np.abs(k)
  return np.where(k > n - 1, 2 * (n - 1) - k, k)


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """Cubic B-spline weights of the samples at floor - 1 .. floor + 2 for fractions `t`."""
  return np.stack([(1 - t) ** 3 / 6, 2 / 3 - t**2 + t**3 / 2,
                   2 / 3 - (1 - t) ** 2 + (1 - t) ** 3 / 2, t**3 / 6], axis=-1)


@functools.lru_cache(maxsize=8)
def _spline_prefilter(n: int) -> np.ndarray:
  """(n, n) float64: samples -> cubic B-spline coefficients with mirror-symmetric extension
  (what `scipy.ndimage`'s prefilter does for mode 'constant')."""
  a = np.zeros((n, n))
  for i in range(n):
    a[i, i] += 2 / 3
    for j in (i - 1, i + 1):
      a[i, _mirror(np.array(j), n)] += 1 / 6
  return np.linalg.inv(a)


@functools.lru_cache(maxsize=8)
def _rotation_table(h: int, w: int, max_deg: int):
  """Per integer angle in [-max_deg, max_deg): the source pixels and cubic weights of the H x W
  output, the geometry of `scipy.ndimage.rotate(image, angle, axes=(-2, -1))` (reshape=True,
  rotation about the centre) followed by DC's cut at `int((out - H) / 2)`; float64, so which
  samples fall outside the input (and get the fill) is decided as SciPy decides it."""
  rows, row_w, cols, col_w, inside = [], [], [], [], []
  for angle in range(-max_deg, max_deg):
    cos, sin = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
    m = np.array([[cos, sin], [-sin, cos]])
    corners = m @ np.array([[0, 0, h, h], [0, w, 0, w]])
    out = (np.ptp(corners, axis=1) + 0.5).astype(int)
    offset = (np.array([h, w]) - 1) / 2 - m @ ((out - 1) / 2)
    i, j = np.meshgrid(np.arange(h) + (out[0] - h) // 2, np.arange(w) + (out[1] - w) // 2,
                       indexing="ij")
    src = np.einsum("ab,bij->aij", m, np.stack([i, j])) + offset[:, None, None]
    inside.append((src[0] >= 0) & (src[0] <= h - 1) & (src[1] >= 0) & (src[1] <= w - 1))
    base = np.floor(src)
    rows.append(_mirror(base[0].astype(int)[..., None] + np.arange(-1, 3), h))
    cols.append(_mirror(base[1].astype(int)[..., None] + np.arange(-1, 3), w))
    row_w.append(_cubic_weights(src[0] - base[0]))
    col_w.append(_cubic_weights(src[1] - base[1]))
  return (np.asarray(rows, np.int32), np.asarray(row_w, np.float32), np.asarray(cols, np.int32),
          np.asarray(col_w, np.float32), np.asarray(inside))


def _dc_rotate(key, x, max_deg):
  """`augment.rotatefun`: `scipy.ndimage.rotate` by `np.random.randint(-max_deg, max_deg)` whole
  degrees (so -45 .. 44), order-3 spline (its default), mode 'constant' with cval = the mean of
  the batch's per-channel means, reshape=True, then the centre H x W cut back out."""
  n, h, w, _ = x.shape
  rows, row_w, cols, col_w, inside = (jnp.asarray(t) for t in _rotation_table(h, w, max_deg))
  angle = jax.random.randint(key, (n,), 0, 2 * max_deg)
  highest = jax.lax.Precision.HIGHEST
  coef = jnp.einsum("ab,nbdc,ed->naec", jnp.asarray(_spline_prefilter(h), jnp.float32), x,
                    jnp.asarray(_spline_prefilter(w), jnp.float32), precision=highest)

  def one(image_coef, a):
    values = image_coef[rows[a][..., :, None], cols[a][..., None, :]]  # (h, w, 4, 4, c)
    return jnp.einsum("ijp,ijq,ijpqc->ijc", row_w[a], col_w[a], values, precision=highest)

  out = jax.vmap(one)(coef, angle)
  return jnp.where(inside[angle][..., None], out, x.mean(axis=(0, 1, 2)).mean())


def _dc_noise(key, x, noise):
  """`augment.noisefun`: additive Gaussian noise of standard deviation `noise` (absolute)."""
  return x + noise * jax.random.normal(key, x.shape, x.dtype)


def _parse_dc(strategy: str) -> tuple[str, ...]:
  return parse_strategy(strategy, DC_TRANSFORMS, "DC augmentation")


def dc_augment(key: jax.Array, x: jax.Array, strategy: str = DC_STRATEGY, *, crop: int = DC_CROP,
               scale: float = DC_SCALE, rotate: int = DC_ROTATE_DEG,
               noise: float = DC_NOISE) -> jax.Array:
  """DC's evaluation augmentation of a batch (n, H, W, C) float32 (DatasetCondensation
  `utils.augment` with `get_daparam`'s parameters): each image gets one transformation, chosen
  uniformly at random per image among the strategy's (`np.random.permutation(augs)[0]`), with its
  own random parameters:

  - crop: shift by -crop .. crop - 1 pixels per axis, fill = the batch's per-channel mean.
  - scale: nearest-neighbour resize to int(U(1 +- scale) * H) per axis, centred, zero fill.
  - rotate: whole degrees in [-rotate, rotate), cubic spline, fill = the batch's mean.
  - noise: + noise * N(0, 1) per pixel.

  The fills are computed from the batch before any image is changed, as DC does. The images are
  in DC's normalised space (for MNIST `(x - 0.1307) / 0.3081`, which our per-channel
  standardisation reproduces), where the zero fill of `scale` is the mean pixel, not black.
  """
  names = _parse_dc(strategy)
  if not names:
    return x
  fns = {"crop": lambda k: _dc_crop(k, x, crop), "scale": lambda k: _dc_scale(k, x, scale),
         "rotate": lambda k: _dc_rotate(k, x, rotate), "noise": lambda k: _dc_noise(k, x, noise)}
  choose, *keys = jax.random.split(key, 1 + len(names))
  outputs = jnp.stack([fns[name](k) for name, k in zip(names, keys, strict=True)], axis=1)
  choice = jax.random.randint(choose, (len(x),), 0, len(names))
  return outputs[jnp.arange(len(x)), choice]


def parse_augment(spec: str) -> tuple[str, tuple[str, ...]]:
  """An augmentation spec -> (family, names): `''`/`none` -> ('', ()); `dc:crop_scale_rotate` ->
  ('dc', ...) (DC's `dc_augment`); `color_crop` or `dsa:color_crop` -> ('dsa', ...) (DSA's `dsa`).
  Unknown names raise."""
  family, _, strategy = spec.rpartition(":")
  if family in ("", "dsa"):
    names = parse_strategy(strategy)
    return ("dsa" if names else ""), names
  if family == "dc":
    names = _parse_dc(strategy)
    return ("dc" if names else ""), names
  raise ValueError(f"unknown augmentation family {family!r} in {spec!r}; write a DSA strategy "
                   "(color_crop..., optionally dsa:...), dc:<DC strategy> or none")


def apply_augment(key: jax.Array, x: jax.Array, spec: str, *, batch_mode: bool = True
                  ) -> jax.Array:
  """Augments a batch (n, H, W, C) float32 by `spec` (see `parse_augment`); `batch_mode` is DSA's
  (one draw for the batch, or one per image); DC's augmentation always draws per image."""
  family, names = parse_augment(spec)
  if family == "dsa":
    return dsa(key, x, "_".join(names), batch_mode=batch_mode)
  if family == "dc":
    return dc_augment(key, x, "_".join(names))
  return x
