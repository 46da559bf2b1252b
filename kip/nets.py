"""Finite-width Flax networks that distilled sets are transferred to.

- `ConvNet`: KIP's ConvNet (an extra 3x3 conv + ReLU, then `depth` x [3x3 conv, norm, ReLU, 2x2
  average pool], a linear readout) and ConvNet3 (no extra conv); also the DC-protocol ConvNet-3
  (width 128, instance norm). Standard or NTK parameterisation, weights N(0, W_std^2 / fan_in) and
  biases N(0, b_std^2) with W_std = sqrt(2), b_std = 0.1 as in `kip.kernels`: in NTK
  parameterisation (and without normalisation) the empirical NTK tends to `kip.kernels`' kernel of
  the same name as the width grows. `torch`: standard parameterisation initialised as PyTorch's
  layers are (weights and biases uniform in +-1/sqrt(fan_in)), as the DC family's official code.
- `PlainConvNet` (`conv`): `depth` x [3x3 conv, ReLU] without pooling, flatten, dense: the finite
  net of `kip.kernels`' `conv` kernel.
- `MLP`: flatten, `depth` x [dense, ReLU], dense (the finite net of the `fc` kernel).
- `ResNet18`: the ResNet-18 layout for small images (3x3 stem, four stages of two basic blocks,
  global average pooling), for cross-architecture checks.

Every network maps (n, H, W, C) float32 images to (n, num_classes) logits and takes `train` (batch
norm's mode; other layers ignore it); with `features=True` it returns its penultimate features
(n, D) instead (what feature kernels and KRR on features use), and every hidden block's output is
sown into the `intermediates` collection (`net.apply(..., mutable=["intermediates"])`), which is
what attention matching reads. `make_net` builds them by name; the variants a method's paper
defines (FRePo's and KRR-ST's ConvNets) are `ConvNet`s built in methods/nets.py, with every name
(`methods.nets.NETS`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kip.conv import conv

__all__ = ["NETS", "NORMS", "PARAMETERIZATIONS", "Dense", "Conv", "ConvNet", "PlainConvNet", "MLP",
           "ResNet18", "PerImageNorm", "make_net", "check_net_options", "default_depth",
           "count_params"]

W_STD, B_STD = math.sqrt(2.0), 0.1
# The generic nets; the variants a paper defines are built from `ConvNet` in methods/nets.py.
NETS = ("conv", "convnet", "convnet3", "mlp", "resnet18")
NORMS = ("none", "instance", "layer", "batch")
# torch: standard parameterisation drawn as PyTorch's nn.Linear / nn.Conv2d initialise (weights
# and biases uniform in +-1/sqrt(fan_in)), the networks of the DC family's official code (MTT,
# DATM, PAD train their experts with it).
PARAMETERIZATIONS = ("standard", "ntk", "torch")


def normal_init(stddev: float):
  """flax's `initializers.normal(stddev)`, value for value, drawn flat and then reshaped.

  JAX's threefry gives the same numbers for a shape and for its element count flat, but XLA:CPU
  compiles it over some 4-d shapes many times slower (JAX 0.10.2: the random bits of a 3x3x8x16
  kernel 4.7 s, a normal draw of its 1,152 values flat 0.24 s), paid by every program that
  initialises a ConvNet."""

  def init(key, shape, dtype=jnp.float32):
    return stddev * jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)

  return init


def uniform_init(bound: float):
  """Uniform in [-bound, bound), drawn flat and reshaped (see `normal_init`)."""

  def init(key, shape, dtype=jnp.float32):
    flat = jax.random.uniform(key, (math.prod(shape),), dtype, -bound, bound)
    return flat.reshape(shape)

  return init


def _weight_init(parameterization: str, w_std: float, fan_in: int):
  # NTK parameterisation keeps unit-variance weights and moves W_std / sqrt(fan_in) into the
  # forward pass, which is what makes its NTK converge to the infinite-width kernel.
  if parameterization == "torch":  # kaiming_uniform_(a=sqrt(5)): bound sqrt(6 / (6 fan_in))
    return uniform_init(1 / math.sqrt(fan_in))
  return normal_init(1.0 if parameterization == "ntk" else w_std / math.sqrt(fan_in))


def _bias_init(parameterization: str, b_std: float, fan_in: int):
  if parameterization == "torch":
    return uniform_init(1 / math.sqrt(fan_in))
  return normal_init(1.0 if parameterization == "ntk" else b_std)


def _check_parameterization(parameterization: str) -> None:
  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(f"unknown parameterization {parameterization!r}; choose one of "
                     f"{', '.join(PARAMETERIZATIONS)}")


def _affine(module: nn.Module, kernel_shape: tuple[int, ...], fan_in: int, apply,
            use_bias: bool = True) -> jax.Array:
  """`apply(kernel)` plus a bias, with `kernel` and `bias` created on `module` in its
  parameterisation (NTK: unit-variance parameters, scales in the forward pass)."""
  _check_parameterization(module.parameterization)
  ntk = module.parameterization == "ntk"
  kernel = module.param("kernel", _weight_init(module.parameterization, module.w_std, fan_in),
                        kernel_shape)
  y = apply(kernel)
  if ntk:
    y = module.w_std / math.sqrt(fan_in) * y
  if use_bias:
    bias = module.param("bias", _bias_init(module.parameterization, module.b_std, fan_in),
                        (kernel_shape[-1],))
    y = y + (module.b_std * bias if ntk else bias)
  return y


class Dense(nn.Module):
  """A dense layer in standard or NTK parameterisation (see the module docstring)."""

  features: int
  parameterization: str = "standard"
  w_std: float = W_STD
  b_std: float = B_STD

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1]
    return _affine(self, (fan_in, self.features), fan_in, lambda kernel: x @ kernel)


class Conv(nn.Module):
  """A 2-D convolution (NHWC, HWIO kernel) in standard or NTK parameterisation."""

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  padding: str | Sequence[tuple[int, int]] = "SAME"
  use_bias: bool = True
  parameterization: str = "standard"
  w_std: float = W_STD
  b_std: float = B_STD

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1] * self.kernel_size[0] * self.kernel_size[1]

    return _affine(self, (*self.kernel_size, x.shape[-1], self.features), fan_in,
                   lambda kernel: conv(x, kernel, self.strides, self.padding), self.use_bias)


class PerImageNorm(nn.Module):
  """Normalise each image over `axes` (instance norm: H, W; layer norm: H, W, C) to zero mean and
  unit (biased) variance, then a learned per-channel scale and bias: flax's GroupNorm with one
  channel a group / one group, same parameter names, written out because XLA:CPU differentiates
  this two-pass form ~1.2x faster in a width-32 ConvNet-3 step."""
  axes: tuple[int, ...]
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
    centred = x - x.mean(self.axes, keepdims=True)
    var = jnp.square(centred).mean(self.axes, keepdims=True)
    return centred * jax.lax.rsqrt(var + self.epsilon) * scale + bias


def _norm(kind: str, train: bool, name: str, bn_momentum: float = 0.9):
  """instance: per image and channel over H, W (as the DC ConvNet's GroupNorm(C, C)); layer: per
  image over H, W, C; batch: over the batch, its running averages kept as
  `bn_momentum * old + (1 - bn_momentum) * batch` (flax's convention: PyTorch's momentum 0.1 is
  0.9 here)."""
  if kind == "none":
    return lambda x: x
  if kind == "instance":
    return PerImageNorm((1, 2), name=name)
  if kind == "layer":
    return PerImageNorm((1, 2, 3), name=name)
  if kind == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=bn_momentum, epsilon=1e-5,
                        name=name)
  raise ValueError(f"unknown norm {kind!r}; choose one of {', '.join(NORMS)}")


class ConvNet(nn.Module):
  """KIP's ConvNet / ConvNet3 and the DC ConvNet-3.

  Attributes:
    extra_conv: KIP's ConvNet has an extra 3x3 conv + ReLU (no pooling) before the blocks.
    first_padding: padding of the first conv; the DC ConvNet pads 28x28 grey images by 3 so the
      blocks see 32x32, as for CIFAR (None: "SAME").
    readout: `flatten` (KIP, DC) or `gap` (global average pooling).
    width_growth: block i has `width * width_growth**i` channels (FRePo's nets double: 2).
    norm_first: normalise a block's input before its conv (FRePo: every block but the first)
      instead of after the conv (KIP, DC).
    bn_momentum: weight of the old running average of batch norm (flax's convention; 0.9 is
      PyTorch's default momentum 0.1, which the DC ConvNet's official code uses).
  """

  num_classes: int
  width: int = 1024
  depth: int = 3
  extra_conv: bool = True
  norm: str = "none"
  readout: str = "flatten"
  parameterization: str = "standard"
  first_padding: int | None = None
  width_growth: int = 1
  norm_first: bool = False
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, features: bool = False) -> jax.Array:
    p = self.parameterization
    padding = "SAME" if self.first_padding is None else [(self.first_padding,) * 2] * 2
    layer = 0
    if self.extra_conv:
      x = nn.relu(Conv(self.width, padding=padding, parameterization=p, name="conv_0")(x))
      padding, layer = "SAME", 1
    for block in range(self.depth):
      width = self.width * self.width_growth**block
      if self.norm_first and block > 0:
        x = _norm(self.norm, train, f"norm_{block}", self.bn_momentum)(x)
      x = Conv(width, padding=padding, parameterization=p, name=f"conv_{layer}")(x)
      padding, layer = "SAME", layer + 1
      if not self.norm_first:
        x = _norm(self.norm, train, f"norm_{block}", self.bn_momentum)(x)
      x = nn.relu(x)
      self.sow("intermediates", f"block_{block}", x)
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    if self.readout == "gap":
      x = x.mean(axis=(1, 2))
    elif self.readout == "flatten":
      x = x.reshape(len(x), -1)
    else:
      raise ValueError(f"unknown readout {self.readout!r}; choose flatten or gap")
    if features:
      return x
    return Dense(self.num_classes, parameterization=p, name="readout")(x)


class PlainConvNet(nn.Module):
  """`depth` x [3x3 conv, norm, ReLU] at full resolution, flatten, dense: the finite network whose
  infinite-width limit is `kip.kernels`' `conv` kernel (no pooling), so a set distilled with that
  kernel can be trained on the architecture it was distilled for."""

  num_classes: int
  width: int = 1024
  depth: int = 1
  norm: str = "none"
  parameterization: str = "standard"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, features: bool = False) -> jax.Array:
    for i in range(self.depth):
      x = Conv(self.width, parameterization=self.parameterization, name=f"conv_{i}")(x)
      x = nn.relu(_norm(self.norm, train, f"norm_{i}")(x))
      self.sow("intermediates", f"block_{i}", x)
    x = x.reshape(len(x), -1)
    if features:
      return x
    return Dense(self.num_classes, parameterization=self.parameterization, name="readout")(x)


class MLP(nn.Module):
  """Flatten, `depth` x [dense(width), ReLU], dense(num_classes)."""

  num_classes: int
  width: int = 1024
  depth: int = 2
  parameterization: str = "standard"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, features: bool = False) -> jax.Array:
    x = x.reshape(len(x), -1)
    for i in range(self.depth):
      x = nn.relu(Dense(self.width, parameterization=self.parameterization, name=f"dense_{i}")(x))
      self.sow("intermediates", f"block_{i}", x)
    if features:
      return x
    return Dense(self.num_classes, parameterization=self.parameterization, name="readout")(x)


class _BasicBlock(nn.Module):
  features: int
  strides: int
  norm: str
  parameterization: str

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    p = self.parameterization
    s = (self.strides, self.strides)
    y = Conv(self.features, strides=s, use_bias=False, parameterization=p, name="conv_a")(x)
    y = nn.relu(_norm(self.norm, train, "norm_a")(y))
    y = Conv(self.features, use_bias=False, parameterization=p, name="conv_b")(y)
    y = _norm(self.norm, train, "norm_b")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = Conv(self.features, (1, 1), strides=s, use_bias=False, parameterization=p,
               name="shortcut")(x)
      x = _norm(self.norm, train, "norm_shortcut")(x)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """ResNet-18 for small images: 3x3 stem, stages of 2 basic blocks at width x (1, 2, 4, 8)
  (strides 1, 2, 2, 2), global average pooling, dense readout."""

  num_classes: int
  width: int = 64
  norm: str = "batch"
  parameterization: str = "standard"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, features: bool = False) -> jax.Array:
    p = self.parameterization
    x = Conv(self.width, use_bias=False, parameterization=p, name="stem")(x)
    x = nn.relu(_norm(self.norm, train, "norm_stem")(x))
    for stage, multiple in enumerate((1, 2, 4, 8)):
      for block in range(2):
        strides = 2 if stage > 0 and block == 0 else 1
        x = _BasicBlock(self.width * multiple, strides, self.norm, p,
                        name=f"stage{stage}_block{block}")(x, train)
      self.sow("intermediates", f"stage_{stage}", x)
    x = x.mean(axis=(1, 2))
    if features:
      return x
    return Dense(self.num_classes, parameterization=p, name="readout")(x)


def make_net(name: str, num_classes: int, *, width: int, norm: str = "none",
             parameterization: str = "standard", image_shape: tuple[int, int, int] | None = None,
             dc_padding: bool = False, depth: int | None = None) -> nn.Module:
  """The network `name` (one of `NETS`).

  Args:
    width: channels (convnets; the first stage of resnet18) or hidden units (mlp).
    depth: conv blocks of `convnet` / `convnet3` (default 3; e.g. ConvNet-7 for 224x224 images),
      conv layers of `conv` (default 1), hidden layers of `mlp` (default 2).
    norm: one of `NORMS` (ignored by mlp).
    image_shape: (H, W, C) of the inputs, needed only with `dc_padding`.
    dc_padding: pad the first conv of a ConvNet by 3 on 28x28x1 images, as the DC ConvNet does.
  """
  check_net_options(norm, parameterization)
  if name in ("convnet", "convnet3"):
    first_padding = 3 if dc_padding and image_shape == (28, 28, 1) else None
    return ConvNet(num_classes, width=width, depth=3 if depth is None else depth,
                   extra_conv=name == "convnet", norm=norm, parameterization=parameterization,
                   first_padding=first_padding)
  if name == "conv":
    return PlainConvNet(num_classes, width=width, depth=depth or 1, norm=norm,
                        parameterization=parameterization)
  if name == "mlp":
    return MLP(num_classes, width=width, depth=depth or 2, parameterization=parameterization)
  if name == "resnet18":
    return ResNet18(num_classes, width=width, norm=norm, parameterization=parameterization)
  raise ValueError(f"unknown net {name!r}; choose one of {', '.join(NETS)}")


def check_net_options(norm: str, parameterization: str) -> None:
  """ValueError naming the choices when `norm` is not one of NORMS or `parameterization` not one
  of PARAMETERIZATIONS (every net builder checks them first)."""
  if norm not in NORMS:
    raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
  _check_parameterization(parameterization)


def default_depth(image_shape: tuple[int, ...]) -> int:
  """ConvNet blocks for images of `image_shape` (H, W, C): 3 up to 32 pixels (the DC family's
  ConvNet-3); beyond, enough 2x2 poolings to bring the side to 2 or less: 5 at 64, 6 at 128, 7 at
  224 (MHIST's ConvNet-7, as the report that ran DataDAM on it)."""
  side = max(image_shape[:2])
  return 3 if side <= 32 else math.ceil(math.log2(side / 2))


def count_params(params) -> int:
  return int(sum(jnp.size(p) for p in jax.tree_util.tree_leaves(params)))
