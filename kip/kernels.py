"""Kernels as explicit objects with parameters: `kernel.init(key) -> params` and
`kernel.apply(params, x1, x2) -> (n1, n2)`.

- Analytic (neural-tangents `stax`): `make_kernel("fc", depth=1)` is the infinite-width NTK or
  NNGP of a named architecture; it has no parameters (`init` returns `()`), and `kernel_fn(x1,
  x2)` is the same kernel without them. Any `stax` kernel_fn of the user's own plugs in through
  `from_stax`. `covariance` (what one entry keeps per layer) sizes `kip.sharding`'s tiles.
- Neural features (`make_feature_kernel`): `phi(params, x1) phi(params, x2)^T` on the penultimate
  features of a Flax net from `kip.nets`; `features` is `phi`, and `kip.sharding` shards such a
  kernel by images (features gathered, one matmul) instead of by entries.
- Empirical NTK (`make_empirical_ntk`): `J(x1) J(x2)^T` of a Flax net at its parameters, averaged
  over the logits (neural-tangents' Jacobian contraction).

`make_kernel(name)` knows them all by name (`KERNELS`): `nfk-<net>` and `entk-<net>` for the
neural-feature and empirical-NTK kernels of any net in `kip.nets.NETS`, or of any net another
`make_net` builds (`methods.flags.make_kernel` passes the methods' nets).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kip._compat import nt, stax

__all__ = ["ARCHITECTURES", "KERNELS", "KERNEL_NETS", "KERNEL_TYPES", "COVARIANCES", "Kernel",
           "make_kernel", "kernel_names", "from_stax", "make_feature_kernel", "make_empirical_ntk",
           "no_params"]

ARCHITECTURES = ("fc", "conv", "convnet", "convnet3")
# kip.nets.NETS, named here without importing flax
KERNEL_NETS = ("convnet", "convnet3", "mlp", "resnet18")


def kernel_names(nets: Iterable[str]) -> tuple[str, ...]:
  """Every kernel name on the finite nets `nets`: the analytic ones, `nfk-<net>`, `entk-<net>`."""
  nets = tuple(nets)
  return (*ARCHITECTURES, *(f"nfk-{n}" for n in nets), *(f"entk-{n}" for n in nets))


KERNELS = kernel_names(KERNEL_NETS)
KERNEL_TYPES = ("ntk", "nngp")
# What a kernel keeps per entry, which sets its memory and cost: one number (fc), one per pixel
# (conv without pooling), one per pair of pixels (full spatial covariances: pooled ConvNets).
# `features`: a finite feature map, sharded by images.
COVARIANCES = ("none", "diagonal", "full", "offsets", "features")
IMPLEMENTATIONS = ("offsets", "neural-tangents")  # of the pooled ConvNets' analytic kernels
W_STD = math.sqrt(2.0)
B_STD = 0.1


def _no_params(key: jax.Array) -> tuple:
  del key
  return ()


def no_params(kernel_fn: Callable[[jax.Array, jax.Array], jax.Array]) -> Callable:
  """A parameter-free `kernel_fn(x1, x2)` as `apply(params, x1, x2)` (params ignored)."""

  def apply(params, x1: jax.Array, x2: jax.Array) -> jax.Array:
    del params
    return kernel_fn(x1, x2)

  return apply


class Kernel(NamedTuple):
  """A kernel and its parameters.

  init: key -> params (analytic kernels: `()`).
  apply: (params, (n1, H, W, C), (n2, H, W, C)) -> (n1, n2) float32.
  covariance: what one entry keeps per layer (see COVARIANCES): `full` costs O(pixels^2);
    `features` marks a feature kernel.
  kernel_fn: analytic kernels only: `apply` without parameters, (x1, x2) -> (n1, n2).
  features: feature kernels only: (params, (n, H, W, C)) -> (n, D), with apply = scale * F1 F2^T.
  init_fn, apply_fn: analytic kernels: the finite stax network whose limit the kernel is.
  """

  name: str
  init_fn: Callable | None
  apply_fn: Callable | None
  kernel_fn: Callable[[jax.Array, jax.Array], jax.Array] | None
  covariance: str = "full"
  init: Callable[[jax.Array], Any] = _no_params
  apply: Callable[..., jax.Array] | None = None
  features: Callable[[Any, jax.Array], jax.Array] | None = None


def _conv(width: int):
  return stax.Conv(width, (3, 3), padding="SAME", W_std=W_STD, b_std=B_STD)


def _layers(arch: str, depth: int, width: int) -> tuple[list, str]:
  if arch == "fc":
    body = [stax.Flatten()]
    for _ in range(depth):
      body += [stax.Dense(width, W_std=W_STD, b_std=B_STD), stax.Relu()]
    return body, "none"
  if arch == "conv":
    body = []
    for _ in range(depth):
      body += [_conv(width), stax.Relu()]
    return body + [stax.Flatten()], "diagonal"
  if arch in ("convnet", "convnet3"):
    # KIP's ConvNet: an extra 3x3 conv + ReLU, then 3 x [conv, ReLU, 2x2 average pool].
    body = [_conv(width), stax.Relu()] if arch == "convnet" else []
    for _ in range(3):
      body += [_conv(width), stax.Relu(), stax.AvgPool((2, 2), strides=(2, 2))]
    return body + [stax.Flatten()], "full"
  raise ValueError(f"unknown kernel {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def make_kernel(arch: str, *, depth: int = 1, kernel_type: str = "ntk", width: int = 0,
                num_outputs: int = 1, image_shape: tuple[int, int, int] = (28, 28, 1),
                num_classes: int = 10, make_net: Callable[..., Any] | None = None,
                nets: Sequence[str] | None = None, implementation: str = "offsets") -> Kernel:
  """The named kernel (one of KERNELS).

  Args:
    arch: analytic (W_std sqrt(2), b_std 0.1, NTK parameterisation): `fc` (depth x [Dense,
      ReLU]), `conv` (depth x [3x3 conv, ReLU], no pooling), `convnet` or `convnet3` (KIP's
      ConvNets with pooling; depth is fixed by the architecture). `nfk-<net>` / `entk-<net>`:
      the neural-feature kernel / empirical NTK of `kip.nets`' net at a random initialisation.
    depth: hidden layers for `fc` and `conv`.
    kernel_type: `ntk` or `nngp` (analytic kernels).
    width: hidden width of the finite network (analytic: only its stax network, default 1024,
      the kernel is the infinite-width limit; finite kernels: default 128, resnet18 64).
    num_outputs: readout width of the analytic kernel's finite network.
    image_shape, num_classes: of the data, for the finite nets of `nfk-`/`entk-` kernels.
    make_net, nets: how the finite net is built by name (`kip.nets.make_net`'s signature) and
      the names it knows (default: `kip.nets`' own).
    implementation: of the pooled ConvNets' analytic kernels: `offsets` (kip.convnet_kernel:
      the same numbers on the pixel offsets the readout needs, 10-20x faster on a CPU) or
      `neural-tangents` (stax's kernel_fn, every pair of pixels).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown implementation {implementation!r}; choose one of "
                     f"{', '.join(IMPLEMENTATIONS)}")
  if arch.startswith(("nfk-", "entk-")):
    if make_net is None:
      from kip import nets as core  # noqa: PLC0415  (flax only when a finite kernel is used)

      make_net, nets = core.make_net, nets or core.NETS
    kind, _, net_name = arch.partition("-")
    if nets is not None and net_name not in nets:
      raise ValueError(f"unknown kernel {arch!r}; choose one of "
                       f"{', '.join(kernel_names(nets))}")
    width = width or (64 if net_name == "resnet18" else 128)
    net = make_net(net_name, num_classes, width=width,
                   norm="batch" if net_name == "resnet18" else "none", image_shape=image_shape)
    make = make_feature_kernel if kind == "nfk" else make_empirical_ntk
    return make(net, image_shape, name=arch)
  width = width or 1024
  if kernel_type not in KERNEL_TYPES:
    raise ValueError(f"unknown kernel type {kernel_type!r}; choose ntk or nngp")
  if depth < 1:
    raise ValueError(f"depth must be at least 1, got {depth}")
  body, covariance = _layers(arch, depth, width)
  init_fn, apply_fn, kernel_fn = stax.serial(
      *body, stax.Dense(num_outputs, W_std=W_STD, b_std=B_STD))
  if arch in ("convnet", "convnet3") and implementation == "offsets":
    from kip.convnet_kernel import convnet_kernel  # noqa: PLC0415

    def kernel_fn(x1, x2, get):
      return convnet_kernel(x1, x2, arch=arch, get=get, w_std=W_STD, b_std=B_STD)
    covariance = "offsets"
  return from_stax(kernel_fn, kernel_type, name=arch, init_fn=init_fn, apply_fn=apply_fn,
                   covariance=covariance)


def from_stax(kernel_fn: Callable, kernel_type: str = "ntk", *, name: str = "custom",
              init_fn: Callable | None = None, apply_fn: Callable | None = None,
              covariance: str = "full") -> Kernel:
  """Wraps a user's `neural_tangents.stax` kernel_fn (signature `kernel_fn(x1, x2, get)`).

  covariance: what one entry keeps (`none`, `diagonal` or `full`; `full` is the safe guess).
  """
  if covariance not in COVARIANCES:
    raise ValueError(f"unknown covariance {covariance!r}; choose one of {', '.join(COVARIANCES)}")

  def bound(x1: jax.Array, x2: jax.Array) -> jax.Array:
    return kernel_fn(x1, x2, kernel_type)

  return Kernel(f"{name}-{kernel_type}", init_fn, apply_fn, bound, covariance,
                apply=no_params(bound))


def _init_variables(net, image_shape):
  def init(key: jax.Array):
    return net.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)

  return init


def make_feature_kernel(net, image_shape: tuple[int, int, int], *, name: str = "nfk",
                        scale: float = 1.0) -> Kernel:
  """`scale * phi(x1) phi(x2)^T`, phi = the penultimate features of the Flax `net` (a net of
  `kip.nets`, called with `features=True`) at variables `init(key)`, in inference mode.

  Args:
    image_shape: (H, W, C) of the inputs.
    scale: a constant factor (RFAD uses its own scaling; FRePo none).
  """

  def features(variables, x: jax.Array) -> jax.Array:
    return net.apply(variables, x, train=False, features=True)

  def apply(variables, x1: jax.Array, x2: jax.Array) -> jax.Array:
    with jax.default_matmul_precision("highest"):
      return scale * features(variables, x1) @ features(variables, x2).T

  return Kernel(name, None, None, None, "features", _init_variables(net, image_shape), apply,
                features)


def make_empirical_ntk(net, image_shape: tuple[int, int, int], *, name: str = "entk") -> Kernel:
  """The empirical NTK of the Flax `net` at variables `init(key)`: `sum_p J(x1) J(x2)^T`
  averaged over the logits (`nt.empirical_ntk_fn`, Jacobian contraction), differentiable in the
  images. Only the `params` collection is differentiated; batch statistics stay fixed."""

  def logits(params, x, rest):
    return net.apply({"params": params, **rest}, x, train=False)

  def apply(variables, x1: jax.Array, x2: jax.Array) -> jax.Array:
    rest = {k: v for k, v in variables.items() if k != "params"}
    ntk = nt.empirical_ntk_fn(lambda p, x: logits(p, x, rest), trace_axes=(-1,), vmap_axes=0,
                              implementation=nt.NtkImplementation.JACOBIAN_CONTRACTION)
    with jax.default_matmul_precision("highest"):
      return ntk(x1, x2, variables["params"])  # tracing the logit axis averages over it

  return Kernel(name, None, None, None, "none", _init_variables(net, image_shape), apply)

