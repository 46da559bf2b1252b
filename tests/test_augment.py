"""DSA augmentation against NumPy references: flips, integer shifts with zero fill, a zeroed
square, colour as an affine map of the pixels, exact 90-degree warps; linearity in the images
(so gradients flow) and shared vs per-image draws. DC's evaluation augmentation against
NumPy/SciPy transcriptions of DC's `utils.augment`: a shift with mean fill, a centred nearest
resize, SciPy's cubic rotation by whole degrees, absolute Gaussian noise, one choice per image."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from kip.augment import (
  DC_STRATEGY,
  DC_TRANSFORMS,
  DSA_STRATEGY,
  TRANSFORMS,
  _warp,
  apply_augment,
  dc_augment,
  dsa,
  parse_augment,
  parse_strategy,
)

X = np.random.default_rng(0).standard_normal((4, 16, 16, 3)).astype(np.float32)


def shifted(x, dy, dx):
  """x shifted so out[i, j] = x[i + dy, j + dx], zero outside."""
  out = np.zeros_like(x)
  h, w = x.shape[1:3]
  for i in range(h):
    for j in range(w):
      if 0 <= i + dy < h and 0 <= j + dx < w:
        out[:, i, j] = x[:, i + dy, j + dx]
  return out


def test_flip_is_a_horizontal_mirror_or_nothing():
  seen = set()
  for k in range(16):
    y = np.asarray(dsa(jax.random.key(k), X, "flip"))
    if np.array_equal(y, X[:, :, ::-1]):
      seen.add("flip")
    else:
      np.testing.assert_array_equal(y, X)
      seen.add("same")
  assert seen == {"flip", "same"}


def test_crop_is_a_zero_filled_integer_shift_shared_by_the_batch():
  shift = 2  # 16 * 0.125
  for k in range(6):
    y = np.asarray(dsa(jax.random.key(k), X, "crop"))
    matches = [(dy, dx) for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)
               if np.array_equal(y, shifted(X, dy, dx))]
    assert len(matches) == 1


def test_cutout_zeroes_one_square_of_half_the_side():
  for k in range(6):
    y = np.asarray(dsa(jax.random.key(k), X, "cutout"))
    changed = np.any(y != X, axis=(0, 3))
    zero = np.all(y == 0, axis=(0, 3))
    assert np.array_equal(changed, zero)  # every change is a zeroing
    rows, cols = np.flatnonzero(zero.any(1)), np.flatnonzero(zero.any(0))
    assert len(rows) <= 8 and len(cols) <= 8 and zero.sum() == len(rows) * len(cols)
    if 0 < rows[0] and rows[-1] < 15 and 0 < cols[0] and cols[-1] < 15:
      assert zero.sum() == 64  # fully inside: the whole 8 x 8 square


def test_color_is_an_affine_map_of_grey_pixels():
  grey = X[..., :1]
  for k in range(4):
    y = np.asarray(dsa(jax.random.key(k), grey, "color"), np.float64)
    for i in range(len(grey)):
      # Grey: saturation is a no-op, so y = c * (x - mean) + mean + b with c in [0.5, 1.5].
      slope, intercept = np.polyfit(grey[i].ravel(), y[i].ravel(), 1)
      np.testing.assert_allclose(slope * grey[i].ravel() + intercept, y[i].ravel(), atol=1e-4)
      assert 0.5 <= slope <= 1.5
      assert abs(y[i].mean() - grey[i].mean()) <= 0.5 + 1e-5


def test_warp_reproduces_exact_90_degree_rotations_and_the_identity():
  square = jnp.asarray(X)
  identity = jnp.broadcast_to(jnp.eye(2), (4, 2, 2))
  np.testing.assert_allclose(_warp(square, identity), X, atol=1e-5)
  quarter = jnp.broadcast_to(jnp.array([[0.0, 1.0], [-1.0, 0.0]]), (4, 2, 2))
  out = np.asarray(_warp(square, quarter))
  matches = [np.allclose(out, np.rot90(X, k, axes=(1, 2)), atol=1e-5) for k in (1, 3)]
  assert any(matches)


@pytest.mark.parametrize("name", ["crop", "cutout", "flip", "scale", "rotate"])
def test_geometric_transforms_are_linear_in_the_images(name):
  key = jax.random.key(3)
  a, b = jnp.asarray(X), jnp.asarray(X[::-1].copy())
  lhs = dsa(key, 2.0 * a - b, name)
  rhs = 2.0 * dsa(key, a, name) - dsa(key, b, name)
  np.testing.assert_allclose(lhs, rhs, atol=1e-4)
  grad = jax.grad(lambda x: jnp.sum(dsa(key, x, name) * b))(a)
  assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).sum() > 0


def test_per_image_draws_differ_and_batch_draws_agree():
  same = np.broadcast_to(X[:1], (32, 16, 16, 3))
  shared = np.asarray(dsa(jax.random.key(0), same, "rotate", batch_mode=True))
  assert np.allclose(shared, shared[:1], atol=1e-6)
  separate = np.asarray(dsa(jax.random.key(0), same, "rotate", batch_mode=False))
  assert not np.allclose(separate, separate[:1], atol=1e-3)


def test_single_mode_applies_one_transform_and_strategies_parse():
  assert parse_strategy(DSA_STRATEGY) == tuple(TRANSFORMS)
  assert parse_strategy("none") == ()
  np.testing.assert_array_equal(dsa(jax.random.key(0), X, "none"), X)
  with pytest.raises(ValueError, match="unknown augmentation"):
    parse_strategy("color_blur")
  for k in range(6):
    # The same key drives the choice and the draw, so the mix equals exactly one transform
    # applied alone with that key.
    outputs = [np.asarray(dsa(jax.random.key(k), X, name)) for name in TRANSFORMS]
    mixed = np.asarray(dsa(jax.random.key(k), X, DSA_STRATEGY))
    assert sum(np.allclose(mixed, o, atol=1e-5) for o in outputs) == 1
    assert not np.array_equal(mixed, X) or any(np.array_equal(o, X) for o in outputs)


# DC's evaluation augmentation (`dc_augment`) against NumPy/SciPy transcriptions of DC's
# `utils.augment` (VICO-UoE/DatasetCondensation): each output image must equal the reference for
# exactly one of the parameters DC can draw.
GREY = np.random.default_rng(1).standard_normal((6, 16, 16, 1)).astype(np.float32)


def dc_crop_reference(image, fill, r, c, crop=4):
  """DC's cropfun: a canvas of the channel means, the image at (crop, crop), cut at (r, c)."""
  h, w, ch = image.shape
  canvas = np.empty((h + 2 * crop, w + 2 * crop, ch), np.float32)
  canvas[:] = fill
  canvas[crop:crop + h, crop:crop + w] = image
  return canvas[r:r + h, c:c + w]


def torch_nearest(image, h, w):
  """`F.interpolate(mode='nearest')` as PyTorch computes it: source = floor(dst * (in / out)),
  float32."""
  def source(n_in, n_out):
    ratio = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * ratio), n_in - 1).astype(int)

  return image[source(image.shape[0], h)][:, source(image.shape[1], w)]


def dc_scale_reference(image, h, w):
  """DC's scalefun: resize, paste centred on a zero canvas of side max(h, w, H, W), cut the
  centre."""
  big, small = image.shape[0], image.shape[1]
  side = max(h, w, big, small)
  canvas = np.zeros((side, side, image.shape[2]), np.float32)
  r, c = int((side - h) / 2), int((side - w) / 2)
  canvas[r:r + h, c:c + w] = torch_nearest(image, h, w)
  r, c = int((side - big) / 2), int((side - small) / 2)
  return canvas[r:r + big, c:c + small]


def dc_rotate_reference(image, angle, cval):
  """DC's rotatefun: scipy.ndimage.rotate (order 3, constant, reshape) of the CHW image, the
  centre cut out."""
  chw = np.moveaxis(image, -1, 0).astype(np.float64)
  out = ndimage.rotate(chw, angle=angle, axes=(-2, -1), cval=cval)
  r = int((out.shape[-2] - chw.shape[-2]) / 2)
  c = int((out.shape[-1] - chw.shape[-1]) / 2)
  return np.moveaxis(out[:, r:r + chw.shape[-2], c:c + chw.shape[-1]], 0, -1)


def test_dc_crop_is_a_shift_filled_with_the_batch_channel_means():
  fill = X.mean(axis=(0, 1, 2))
  offsets = set()
  for k in range(3):
    y = np.asarray(dc_augment(jax.random.key(k), X, "crop"))
    for i in range(len(X)):
      matches = [(r, c) for r in range(8) for c in range(8)
                 if np.array_equal(y[i], dc_crop_reference(X[i], fill, r, c))]
      assert len(matches) == 1
      offsets.add(matches[0])
  assert len(offsets) > 4  # per image, and over DC's range 0..7 (shifts -4..3)
  assert all(0 <= r < 8 and 0 <= c < 8 for r, c in offsets)


def test_dc_scale_is_a_centred_nearest_resize_with_zero_fill():
  sizes = set()
  for k in range(3):
    y = np.asarray(dc_augment(jax.random.key(k), GREY, "scale"))
    for i in range(len(GREY)):
      # int(U(0.8, 1.2) * 16): 12 .. 19 per axis
      matches = [(h, w) for h in range(12, 20) for w in range(12, 20)
                 if np.array_equal(y[i], dc_scale_reference(GREY[i], h, w))]
      assert matches  # several sizes can give the same image; one of them was drawn
      sizes.add(matches[0])
  assert len(sizes) > 4


def test_dc_rotate_is_scipy_cubic_rotation_by_whole_degrees_filled_with_the_batch_mean():
  cval = float(X.mean(axis=(0, 1, 2)).mean())
  angles = []
  y = np.asarray(dc_augment(jax.random.key(0), X, "rotate"))
  for i in range(len(X)):
    errors = [np.abs(y[i] - dc_rotate_reference(X[i], a, cval)).max() for a in range(-45, 45)]
    best = int(np.argmin(errors))
    assert errors[best] < 1e-4  # float32 against SciPy's float64
    assert sorted(errors)[1] > 1e-2  # and no other angle fits
    angles.append(best - 45)
  assert len(set(angles)) > 1


def test_dc_rotate_matches_scipy_at_every_angle_on_a_known_pattern():
  pattern = np.zeros((1, 20, 20, 1), np.float32)
  pattern[0, 4:16, 9:11] = 1.0  # a bar, off-centre parts included
  pattern[0, 3:6, 3:6] = -2.0
  cval = float(pattern.mean())
  seen = set()
  for k in range(40):
    y = np.asarray(dc_augment(jax.random.key(k), pattern, "rotate"))[0]
    errors = [np.abs(y - dc_rotate_reference(pattern[0], a, cval)).max() for a in range(-45, 45)]
    assert min(errors) < 1e-4
    seen.add(int(np.argmin(errors)) - 45)
  assert min(seen) < -20 and max(seen) > 20


def test_dc_noise_is_gaussian_with_the_absolute_std():
  x = np.zeros((8, 28, 28, 1), np.float32) + 3.0
  d = np.asarray(dc_augment(jax.random.key(0), x, "noise"), np.float64) - 3.0
  # 6272 samples: the std estimate's relative error is ~1/sqrt(2 n) = 0.9%; the mean's sd 1.3e-5.
  assert d.std() == pytest.approx(1e-3, rel=0.05)
  assert abs(d.mean()) < 6e-5


def test_dc_chooses_one_transformation_per_image():
  same = np.broadcast_to(GREY[:1], (24, 16, 16, 1))
  fill = float(GREY[0].mean())
  y = np.asarray(dc_augment(jax.random.key(0), same, DC_STRATEGY))
  kinds = []
  for i in range(len(y)):
    kind = set()
    if any(np.allclose(y[i], dc_crop_reference(GREY[0], fill, r, c), rtol=0, atol=1e-6)
           for r in range(8) for c in range(8)):
      kind.add("crop")
    if any(np.array_equal(y[i], dc_scale_reference(GREY[0], h, w))
           for h in range(12, 20) for w in range(12, 20)):
      kind.add("scale")
    if any(np.abs(y[i] - dc_rotate_reference(GREY[0], a, fill)).max() < 1e-4
           for a in range(-45, 45)):
      kind.add("rotate")
    assert kind  # each image is one of DC's transformations of itself
    kinds.append(kind)
  unambiguous = {next(iter(k)) for k in kinds if len(k) == 1}
  assert unambiguous == {"crop", "scale", "rotate"}  # within one batch


def test_augment_specs_parse_and_dispatch():
  assert parse_augment("dc:crop_scale_rotate") == ("dc", ("crop", "scale", "rotate"))
  assert parse_augment("color_crop") == ("dsa", ("color", "crop"))
  assert parse_augment("dsa:color_crop") == ("dsa", ("color", "crop"))
  assert parse_augment("none") == parse_augment("") == parse_augment("dc:none") == ("", ())
  assert set(DC_TRANSFORMS) == {"crop", "scale", "rotate", "noise"}
  with pytest.raises(ValueError, match="unknown DC augmentation flip"):
    parse_augment("dc:crop_flip")
  with pytest.raises(ValueError, match="unknown augmentation family"):
    parse_augment("kornia:crop")
  np.testing.assert_array_equal(apply_augment(jax.random.key(0), X, "none"), X)
  # DC's crop and DSA's crop fill differently: the spec decides which runs.
  dc = np.asarray(apply_augment(jax.random.key(0), X, "dc:crop"))
  assert any(np.array_equal(dc[0], dc_crop_reference(X[0], X.mean(axis=(0, 1, 2)), r, c))
             for r in range(8) for c in range(8))
