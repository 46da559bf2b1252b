"""DSA augmentation against NumPy references: flips, integer shifts with zero fill, a zeroed
square, colour as an affine map of the pixels, exact 90-degree warps; linearity in the images
(so gradients flow) and shared vs per-image draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kip.augment import DSA_STRATEGY, TRANSFORMS, _warp, dsa, parse_strategy

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
