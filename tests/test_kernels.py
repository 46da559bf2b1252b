"""Parametrised kernels: a neural-feature kernel against float64 NumPy phi phi^T, the empirical
NTK against an explicit Jacobian contraction, and KRR through either."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kip.nets import make_net
from methods.flags import KERNELS, make_kernel

RNG = np.random.default_rng(0)
X1 = RNG.normal(size=(5, 8, 8, 1)).astype(np.float32)
X2 = RNG.normal(size=(7, 8, 8, 1)).astype(np.float32)


def rel(a, b):
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def test_feature_kernel_is_phi_phi_transpose():
  kernel = make_kernel("nfk-convnet3", width=6, image_shape=(8, 8, 1))
  variables = kernel.init(jax.random.key(0))
  net = make_net("convnet3", 10, width=6, norm="none", image_shape=(8, 8, 1))
  # The penultimate features, computed here by hand from the logits' readout input: the flattened
  # last block, so phi has 1 x 1 x 6 entries for 8x8 images.
  phi = [np.asarray(net.apply(variables, x, features=True), np.float64) for x in (X1, X2)]
  assert phi[0].shape == (5, 6)
  assert rel(kernel.apply(variables, X1, X2), phi[0] @ phi[1].T) < 1e-5
  # ... and the readout applied to those features gives the logits: they are the penultimate ones.
  w = variables["params"]["readout"]
  logits = phi[0] @ np.asarray(w["kernel"], np.float64) + np.asarray(w["bias"], np.float64)
  assert rel(net.apply(variables, X1), logits) < 1e-5


def test_empirical_ntk_is_the_jacobian_contraction_averaged_over_logits():
  kernel = make_kernel("entk-mlp", width=16, image_shape=(8, 8, 1))
  variables = kernel.init(jax.random.key(1))
  net = make_net("mlp", 10, width=16)

  def jac(x):
    j = jax.jacobian(lambda p: net.apply({"params": p}, x))(variables["params"])
    return np.concatenate([np.asarray(a, np.float64).reshape(len(x), 10, -1)
                           for a in jax.tree_util.tree_leaves(j)], axis=-1)

  expected = np.einsum("iop,jop->ij", jac(X1), jac(X2)) / 10
  assert rel(kernel.apply(variables, X1, X2), expected) < 1e-4


def test_the_empirical_ntk_is_differentiable_in_the_images():
  kernel = make_kernel("entk-mlp", width=8, image_shape=(8, 8, 1))
  with jax.enable_x64(True):  # central differences in float64 (ReLU kinks are far at this eps)
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64),
                                       kernel.init(jax.random.key(2)))
    x1, x2 = jnp.asarray(X1, jnp.float64), jnp.asarray(X2, jnp.float64)

    def f(x):
      return jnp.sum(jnp.sin(kernel.apply(variables, x, x2)))

    grad = jax.grad(f)(x1)
    direction = jnp.asarray(RNG.normal(size=X1.shape))
    eps = 1e-5
    numeric = (f(x1 + eps * direction) - f(x1 - eps * direction)) / (2 * eps)
    assert float(jnp.sum(grad * direction)) == pytest.approx(float(numeric), rel=1e-5)


def test_every_named_kernel_is_known_and_unknown_names_are_refused():
  assert "nfk-frepo_convnet" in KERNELS and "entk-resnet18" in KERNELS
  with pytest.raises(ValueError, match="choose one of"):
    make_kernel("nfk-vgg")


@pytest.mark.parametrize("arch", ["convnet", "convnet3"])
def test_offset_convnet_kernel_equals_neural_tangents(arch):
  """kip.convnet_kernel (the pixel offsets the readout needs) against neural-tangents' stax
  kernel (every pair of pixels), an independent implementation: NNGP and NTK of 12x12 images
  (pools 12 -> 6 -> 3 -> 1: an odd size on the way), 2 channels, more second images than first
  (the swapped path), the first among them (an image with itself: cos t = 1)."""
  from kip import kernels

  rng = np.random.default_rng(1)
  x1 = jnp.asarray(rng.normal(size=(1, 12, 12, 2)), jnp.float32)
  x2 = jnp.concatenate([x1, jnp.asarray(rng.normal(size=(1, 12, 12, 2)), jnp.float32)])
  for get in ("nngp", "ntk"):
    ours = kernels.make_kernel(arch, kernel_type=get).kernel_fn
    theirs = kernels.make_kernel(arch, kernel_type=get, implementation="neural-tangents").kernel_fn
    np.testing.assert_allclose(ours(x1, x2), theirs(x1, x2), rtol=2e-5)


def test_offset_convnet_kernel_gradient_equals_neural_tangents():
  """The NTK's gradient in the second images (8x8, one of them the first image itself: the
  angle's infinite derivative at cos t = 1 must not turn into NaN)."""
  from kip import kernels

  rng = np.random.default_rng(3)
  y1 = jnp.asarray(rng.normal(size=(1, 8, 8, 1)), jnp.float32)
  y2 = jnp.concatenate([y1, jnp.asarray(rng.normal(size=(1, 8, 8, 1)), jnp.float32)])

  def grad(kernel):
    return jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(kernel.kernel_fn(y1, x)))))(y2)

  ours = grad(kernels.make_kernel("convnet3"))
  theirs = grad(kernels.make_kernel("convnet3", implementation="neural-tangents"))
  assert rel(ours, np.asarray(theirs)) < 1e-4


def test_offset_convnet_kernel_at_28_pixels_equals_neural_tangents():
  """MNIST's size: offsets within 7, 3, 1 and 0 pixels at 28, 14, 7 and 3."""
  from kip import kernels
  from kip.convnet_kernel import offset_radii

  assert offset_radii(3) == [7, 3, 1, 0]
  rng = np.random.default_rng(2)
  x1 = jnp.asarray(rng.normal(size=(1, 28, 28, 1)), jnp.float32)
  x2 = jnp.asarray(rng.normal(size=(1, 28, 28, 1)), jnp.float32)
  ours = kernels.make_kernel("convnet").kernel_fn(x1, x2)
  theirs = kernels.make_kernel("convnet", implementation="neural-tangents").kernel_fn(x1, x2)
  np.testing.assert_allclose(ours, theirs, rtol=2e-5)


def test_polynomial_arccos_against_float64_numpy():
  from kip.convnet_kernel import _arccos

  x = np.concatenate([np.linspace(-1, 1, 100_001), [-1.0, -0.0, 0.0, 1.0]]).astype(np.float32)
  np.testing.assert_allclose(_arccos(jnp.asarray(x)), np.arccos(x.astype(np.float64)), atol=1e-6)


def test_offset_box_is_the_zero_padded_3x3_mean_and_its_own_adjoint():
  """kip.convnet_kernel's box on the flattened pixel axis against a float64 NumPy 3x3 mean with
  zero padding on an odd-shaped 5 x 7 image, and its hand-written VJP (the box itself behind a
  barrier) against JAX's derivative of the shifted sums."""
  from kip.convnet_kernel import _box, _box_sum

  rng = np.random.default_rng(0)
  k = rng.standard_normal((3, 3, 5 * 7))
  padded = np.pad(k.reshape(3, 3, 5, 7), [(0, 0), (0, 0), (1, 1), (1, 1)])
  expected = sum(padded[:, :, dy:dy + 5, dx:dx + 7] for dy in range(3) for dx in range(3)) / 9
  np.testing.assert_allclose(_box(jnp.asarray(k, jnp.float32), 7), expected.reshape(3, 3, 35),
                             atol=1e-6)
  g = jnp.asarray(rng.standard_normal((3, 3, 35)), jnp.float32)
  x = jnp.asarray(k, jnp.float32)
  ours = jax.vjp(lambda a: _box(a, 7), x)[1](g)[0]
  autodiff = jax.vjp(lambda a: _box_sum(a, 7), x)[1](g)[0]
  np.testing.assert_allclose(ours, autodiff, atol=1e-6)
