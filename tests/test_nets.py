"""Finite networks: output shapes, parameter counts against closed forms, initial weight scales,
and the NTK-parameterised ConvNet's empirical NTK tending to the infinite-width kernel."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kip._compat import nt
from kip.kernels import make_kernel
from kip.nets import _norm, count_params, default_depth
from methods.nets import NETS, make_net


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_every_net_maps_images_to_logits(name, shape):
  net = make_net(name, 10, width=8, norm="batch" if name == "resnet18" else "none")
  x = np.random.default_rng(0).standard_normal((3, *shape)).astype(np.float32)
  variables = net.init(jax.random.key(0), x)
  assert net.apply(variables, x).shape == (3, 10)


def convnet_params(width, channels, side, extra_conv, num_classes=10):
  """Conv weights + biases, then the readout on the flattened (side // 8)^2 * width features."""
  # The first conv reads `channels`; the rest (3 with the extra conv, else 2) read `width`.
  convs = 9 * channels * width + width + (3 if extra_conv else 2) * (9 * width * width + width)
  readout = (side // 2 // 2 // 2) ** 2 * width * num_classes + num_classes
  return convs + readout


@pytest.mark.parametrize("name,extra", [("convnet", True), ("convnet3", False)])
def test_convnet_parameter_count(name, extra):
  net = make_net(name, 10, width=16)
  params = net.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))["params"]
  assert count_params(params) == convnet_params(16, 1, 28, extra)


def test_dc_convnet_pads_mnist_to_32():
  # The DC ConvNet-3 pads the first conv by 3 on 28x28 grey images: 32 -> 16 -> 8 -> 4.
  net = make_net("convnet3", 10, width=16, norm="instance", image_shape=(28, 28, 1),
                 dc_padding=True)
  params = net.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))["params"]
  assert params["readout"]["kernel"].shape == (4 * 4 * 16, 10)
  # Instance norm: a per-channel scale and bias per block (GroupNorm with one channel a group).
  assert params["norm_0"]["scale"].shape == (16,)


def test_default_depth_pools_the_side_down_to_two_pixels_or_less():
  """ConvNet-3 up to 32 pixels (the DC family's), then one 2x2 pooling per block until the side
  is 2 or less: ConvNet-7 for MHIST's 224 (the report's), 5 for 64, 6 for 128."""
  assert [default_depth((s, s, 1)) for s in (8, 28, 32)] == [3, 3, 3]
  assert [default_depth((s, s, 3)) for s in (64, 128, 224)] == [5, 6, 7]
  assert default_depth((224, 100, 3)) == 7  # the longer side
  for side in (64, 128, 224):  # the final feature map is 2 pixels or less, one block fewer is not
    depth = default_depth((side, side, 3))
    assert side / 2**depth <= 2 < side / 2**(depth - 1)


@pytest.mark.parametrize("kind, axes", [("instance", (1, 2)), ("layer", (1, 2, 3))])
def test_per_image_norms_match_numpy(kind, axes):
  """Instance / layer norm against the float64 formula (x - mean) / sqrt(biased var + 1e-5) *
  scale + bias over the image's H, W (and C), with non-trivial scale and bias."""
  rng = np.random.default_rng(0)
  x = (3.0 * rng.standard_normal((4, 5, 6, 3)) + 2.0).astype(np.float32)
  norm = _norm(kind, True, "n")
  params = norm.init(jax.random.key(0), x)["params"]
  assert {k: v.shape for k, v in params.items()} == {"scale": (3,), "bias": (3,)}
  scale, bias = rng.standard_normal(3), rng.standard_normal(3)
  out = norm.apply({"params": {"scale": jnp.asarray(scale, jnp.float32),
                               "bias": jnp.asarray(bias, jnp.float32)}}, x)
  x64 = x.astype(np.float64)
  mean, var = x64.mean(axes, keepdims=True), x64.var(axes, keepdims=True)
  np.testing.assert_allclose(out, (x64 - mean) / np.sqrt(var + 1e-5) * scale + bias, atol=2e-5)


def test_resnet18_has_the_standard_cifar_parameter_count():
  # The widely used CIFAR ResNet-18 (3x3 stem, batch norm, 512 -> 10 readout): 11,173,962.
  net = make_net("resnet18", 10, width=64, norm="batch")
  variables = jax.eval_shape(net.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
  assert count_params(variables["params"]) == 11_173_962


def test_mlp_parameter_count():
  net = make_net("mlp", 10, width=32)
  params = net.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))["params"]
  assert count_params(params) == 784 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10


def test_standard_parameterisation_initial_scales():
  net = make_net("convnet", 10, width=256)
  params = net.init(jax.random.key(1), np.zeros((1, 28, 28, 1), np.float32))["params"]
  kernel = np.asarray(params["conv_1"]["kernel"])  # fan_in 9 * 256
  assert kernel.std() == pytest.approx(math.sqrt(2 / (9 * 256)), rel=0.02)
  assert np.asarray(params["conv_1"]["bias"]).std() == pytest.approx(0.1, rel=0.2)
  ntk_net = make_net("convnet", 10, width=256, parameterization="ntk")
  ntk_params = ntk_net.init(jax.random.key(1), np.zeros((1, 28, 28, 1), np.float32))["params"]
  assert np.asarray(ntk_params["conv_1"]["kernel"]).std() == pytest.approx(1.0, rel=0.02)


def test_torch_parameterisation_is_pytorchs_default_uniform_init():
  """`torch`: weights and biases uniform in +-1/sqrt(fan_in), what PyTorch's kaiming_uniform_(a=
  sqrt(5)) and bias init give nn.Conv2d and nn.Linear (closed form: std bound / sqrt(3)); norm
  layers start at scale 1, bias 0."""
  net = make_net("convnet3", 10, width=64, norm="instance", parameterization="torch",
                 image_shape=(28, 28, 1), dc_padding=True)
  params = net.init(jax.random.key(2), np.zeros((1, 28, 28, 1), np.float32))["params"]
  for layer, fan_in in (("conv_1", 9 * 64), ("readout", 64 * 4 * 4)):
    bound = 1 / math.sqrt(fan_in)
    for name in ("kernel", "bias"):
      assert np.abs(np.asarray(params[layer][name])).max() <= bound
    assert np.abs(np.asarray(params[layer]["kernel"])).max() > 0.95 * bound
    assert np.asarray(params[layer]["kernel"]).std() == pytest.approx(bound / math.sqrt(3),
                                                                      rel=0.03)
  np.testing.assert_array_equal(np.asarray(params["norm_0"]["scale"]), 1)
  with pytest.raises(ValueError, match="standard, ntk, torch"):
    make_net("convnet", 10, width=8, parameterization="pytorch")


def test_weights_are_flax_normal_draws_value_for_value():
  """Our initializer draws flat and reshapes (XLA:CPU compiles that faster): the same numbers as
  flax's `initializers.normal` drawing in the parameter's shape."""
  from flax import linen as nn

  from kip.nets import normal_init

  for shape in [(3, 3, 8, 16), (7,), (256, 10), (2, 1, 3)]:
    key = jax.random.key(len(shape))
    ours = np.asarray(normal_init(0.3)(key, shape))
    assert ours.shape == shape and ours.std() > 0.1
    np.testing.assert_array_equal(ours, np.asarray(nn.initializers.normal(0.3)(key, shape)))


def test_ntk_parameterised_convnet_tends_to_the_infinite_width_kernel():
  """The seed-averaged empirical NTK of ConvNet3 (8x8 images: 8 -> 4 -> 2 -> 1) approaches
  `kip.kernels`' analytic convnet3 NTK as the width grows: the error falls by more than 2x from
  width 16 to 256 and is below 10% at 256 (measured: ~30% and ~3%)."""
  x = np.random.default_rng(0).standard_normal((6, 8, 8, 1)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    exact = np.asarray(jax.jit(make_kernel("convnet3", kernel_type="ntk").kernel_fn)(x, x),
                       np.float64)
  errors = {}
  for width in (16, 256):
    net = make_net("convnet3", 1, width=width, parameterization="ntk")
    ntk_fn = jax.jit(nt.empirical_ntk_fn(lambda p, x, net=net: net.apply({"params": p}, x),
                                         trace_axes=(), vmap_axes=0))
    init = jax.jit(net.init)
    samples = []
    for seed in range(6):
      params = init(jax.random.key(seed), x)["params"]
      with jax.default_matmul_precision("highest"):
        samples.append(np.asarray(ntk_fn(x, None, params), np.float64).reshape(6, 6))
    mean = np.mean(samples, axis=0)
    errors[width] = np.linalg.norm(mean - exact) / np.linalg.norm(exact)
  assert errors[256] < errors[16] / 2
  assert errors[256] < 0.1


@pytest.mark.parametrize("strides, padding", [((1, 1), "SAME"), ((2, 2), "SAME"),
                                              ((1, 1), ((3, 3), (3, 3))), ((2, 2), "VALID")])
@pytest.mark.parametrize("c_in", [2, 6])  # one product of patches; a sum of shifted products
def test_cpu_conv_derivatives_match_xlas_to_second_order(strides, padding, c_in):
  """kip.conv's convolution (the CPU path of every net) against XLA's own convolution, in
  float64: values, first derivatives and a second derivative (a gradient of a gradient norm,
  as trajectory matching takes)."""
  from kip.conv import PATCH_CHANNELS, conv2d, shifted_conv

  assert (c_in <= PATCH_CHANNELS) == (c_in == 2)

  def xla(x, w, s, p):
    return jax.lax.conv_general_dilated(x, w, s, p, dimension_numbers=("NHWC", "HWIO", "NHWC"))

  with jax.enable_x64(True):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (3, 9, 8, c_in), jnp.float64)
    w = jax.random.normal(kw, (3, 3, c_in, 4), jnp.float64)

    def loss(f):
      return lambda x, w: jnp.sum(jnp.sin(f(x, w, strides, padding)))

    def meta(f):  # ||dL/dw||^2, differentiated again in x and w
      return lambda x, w: jnp.sum(jax.grad(loss(f), argnums=1)(x, w) ** 2)

    np.testing.assert_allclose(shifted_conv(x, w, strides, padding),
                               xla(x, w, strides, padding), atol=1e-12)
    for order in (loss, meta):
      ours = jax.grad(order(conv2d), argnums=(0, 1))(x, w)
      ref = jax.grad(order(xla), argnums=(0, 1))(x, w)
      for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
    # Forward mode too (a custom_jvp, not a custom_vjp).
    tangent = jax.jvp(lambda w: conv2d(x, w, strides, padding), (w,), (jnp.ones_like(w),))[1]
    np.testing.assert_allclose(tangent, xla(x, jnp.ones_like(w), strides, padding), atol=1e-10)


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_frepo_batch_norm_keeps_the_official_running_average(momentum):
  """One training-mode pass from fresh statistics (mean 0, var 1): the second block's norm reads
  the first block's pooled activations, so its running mean must be (1 - m) * their batch mean in
  float64 NumPy, with m = 0.1 (FRePo's flax momentum, the default) or the 0.9 asked for."""
  m = 0.1 if momentum is None else momentum
  net = make_net("frepo_convnet", 10, width=4, norm="batch", image_shape=(28, 28, 1),
                 bn_momentum=momentum)
  x = np.random.default_rng(1).standard_normal((6, 28, 28, 1)).astype(np.float32)
  variables = net.init(jax.random.key(0), x)
  _, state = net.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"])
  block0 = np.asarray(state["intermediates"]["block_0"][0], np.float64)  # (6, 32, 32, 4)
  pooled = block0.reshape(6, 16, 2, 16, 2, 4).mean(axis=(2, 4))
  np.testing.assert_allclose(state["batch_stats"]["norm_1"]["mean"],
                             (1 - m) * pooled.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)


def test_core_nets_refuse_a_batch_norm_momentum():
  with pytest.raises(ValueError, match="no bn_momentum"):
    make_net("convnet", 10, width=4, norm="batch", bn_momentum=0.1)


def test_plain_conv_net_is_the_finite_net_of_the_conv_kernel():
  """`conv` (depth x [3x3 conv, ReLU], flatten, dense): parameters by the closed form, and in NTK
  parameterisation its seed-averaged empirical NTK approaches neural-tangents' analytic `conv`
  kernel of the same depth (error below 10% at width 256 and falling from width 16)."""
  net = make_net("conv", 10, width=8, depth=2)
  params = net.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))["params"]
  assert count_params(params) == (9 * 8 + 8) + (9 * 8 * 8 + 8) + 784 * 8 * 10 + 10
  assert make_net("conv", 10, width=8).depth == 1 and make_net("mlp", 10, width=8).depth == 2
  x = np.random.default_rng(0).standard_normal((5, 6, 6, 1)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    exact = np.asarray(jax.jit(make_kernel("conv", depth=2).kernel_fn)(x, x), np.float64)
  errors = {}
  for width in (16, 256):
    net = make_net("conv", 1, width=width, depth=2, parameterization="ntk")
    ntk_fn = jax.jit(nt.empirical_ntk_fn(lambda p, x, net=net: net.apply({"params": p}, x),
                                         trace_axes=(), vmap_axes=0))
    samples = []
    for seed in range(6):
      p = net.init(jax.random.key(seed), x)["params"]
      with jax.default_matmul_precision("highest"):
        samples.append(np.asarray(ntk_fn(x, None, p), np.float64).reshape(5, 5))
    errors[width] = np.linalg.norm(np.mean(samples, 0) - exact) / np.linalg.norm(exact)
  assert errors[256] < errors[16] / 2
  assert errors[256] < 0.1
